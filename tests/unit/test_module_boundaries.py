"""Package boundaries (issue 17, "Structure"): shared helpers have one home, and no
package reaches into another's private names or into a front end it does not serve.

The checks read the package's source with :mod:`ast` (nothing is imported), so they
hold for every module, including ones no other test imports.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import tachymail

PACKAGE = Path(tachymail.__file__).resolve().parent


def modules() -> Iterator[tuple[str, ast.Module]]:
    """(dotted module name, parsed source) of every module of the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, ast.parse(path.read_text(), str(path))


def imports(tree: ast.Module) -> Iterator[tuple[str, str | None]]:
    """(module, imported name or None) for every import statement anywhere in *tree*."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                yield node.module, alias.name


def subpackage(module: str) -> str:
    """ "tachymail.queue.store" → "queue"; top-level modules are their own subpackage."""
    return module.split(".")[1] if module.count(".") else ""


def is_module(dotted: str) -> bool:
    relative = Path(*dotted.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").exists() or (PACKAGE / relative).is_dir()


def test_the_load_test_tools_import_no_front_end() -> None:
    """The sink and the generator share helpers with the server, never its SMTP worker."""
    offenders = [
        (name, target)
        for name, tree in modules()
        if name.startswith("tachymail.loadtest")
        for target, _ in imports(tree)
        if target == "tachymail.smtp" or target.startswith("tachymail.smtp.")
    ]
    assert offenders == []


def test_no_package_imports_another_packages_private_names() -> None:
    offenders = [
        (name, f"{target}.{imported}")
        for name, tree in modules()
        for target, imported in imports(tree)
        if imported
        and target.startswith("tachymail.")
        and imported.startswith("_")
        and not imported.startswith("__")
        and subpackage(target) != subpackage(name)
        and not is_module(f"{target}.{imported}")  # a private submodule is its own matter
    ]
    assert offenders == []


def test_shared_helpers_and_queue_statistics_have_one_home() -> None:
    homes = {
        "split_hostport": "tachymail.net",
        "reuseport_socket": "tachymail.net",
        "queue_stats": "tachymail.queue.stats",
        "QueueStats": "tachymail.queue.stats",
        "SCAN_LIMIT": "tachymail.queue.stats",
    }
    defined: dict[str, list[str]] = {helper: [] for helper in homes}
    for name, tree in modules():
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = [node.target.id]
            else:
                continue
            for helper in set(names) & set(homes):
                defined[helper].append(name)
    assert defined == {helper: [home] for helper, home in homes.items()}
