"""Loading both implementations of a kernel, for tests and benchmarks."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

IMPLS = ("compiled", "pure")


def load_impl(kernel: str, impl: str) -> ModuleType:
    """Import one implementation of *kernel* directly, bypassing TACHYMAIL_PURE."""
    if impl == "pure":
        return importlib.import_module(f"tachymail.protocol.{kernel}_py")
    try:
        return importlib.import_module(f"tachymail.protocol._{kernel}")
    except ImportError as exc:  # a missing extension is a build failure, not a skip
        pytest.fail(f"compiled kernel {kernel!r} is not built: {exc}")


def both_impls(kernel: str) -> tuple[ModuleType, ModuleType]:
    """(compiled, pure) modules of *kernel*, for tests that compare the twins."""
    return load_impl(kernel, "compiled"), load_impl(kernel, "pure")
