"""The package layering of DESIGN.md, checked on the source: intake and delivery meet only in
the queue, and parsers and message authentication know nothing of the front ends."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "tachymail"

#: package -> packages it must never import (directly, at any depth of the module)
FORBIDDEN = {
    # intake: the front ends and what only they use
    "smtp": {"delivery"},
    "lmtp": {"delivery"},
    "pop3": {"delivery"},
    # IMAP reads and writes mail through mailbox only (smtp: the worker's context, for types)
    "imap": {"delivery", "lmtp", "pop3", "queue", "mailauth", "cli"},
    "frontend": {"delivery"},
    # lower layers
    "protocol": {
        "smtp", "lmtp", "pop3", "imap", "delivery", "queue", "mailbox", "mailauth", "cli"
    },
    "mailauth": {"smtp", "lmtp", "pop3", "imap", "delivery", "cli", "frontend"},
    "dns": {"smtp", "lmtp", "pop3", "imap", "delivery", "mailbox", "mailauth", "cli"},
    "queue": {"smtp", "lmtp", "pop3", "imap", "http", "delivery", "mailauth", "cli"},
    # delivery (the scheduler, DSNs, the webhook sender) meets intake only in the queue
    "delivery": {"smtp", "lmtp", "pop3", "imap", "http", "cli"},
    # the store knows nothing of the queue: its callers queue what a delivery asks for
    # (vacation replies)
    "mailbox": {
        "smtp", "lmtp", "pop3", "imap", "jmap", "delivery", "mailauth", "cli", "queue"
    },
    # what local delivery and LMTP both queue (vacation replies), built from plain values
    "queue/autoreply": {"mailbox", "jmap", "http", "smtp", "lmtp", "delivery", "cli"},
    "smtpclient": {"smtp", "lmtp", "pop3", "imap", "delivery", "cli"},
    # the HTTP API is a front end like smtp (smtp: the worker's context, its intake checks)
    "http": {"delivery", "lmtp", "pop3", "imap", "cli", "jmap"},
    # JMAP is a front end like IMAP: the store through mailbox, sending through the queue
    # (smtp: the worker's context, for types), the http package's app plumbing
    "jmap": {"delivery", "lmtp", "pop3", "imap", "cli", "cluster", "smtpclient"},
    # the suppression list is read by smtp, http and delivery alike: it needs none of them
    "queue/suppression": {"smtp", "http", "delivery", "mailbox", "mailauth", "cli", "config"},
    # the cluster's Redis link and list replication: below delivery and the front ends
    "cluster": {"smtp", "lmtp", "pop3", "imap", "http", "delivery", "mailbox", "cli"},
    # the replicated lists' outbox knows nothing of Redis or of who writes the lists
    "queue/changes": {"cluster", "smtp", "http", "delivery", "mailbox", "cli", "config"},
    # bounce classes are plain rules over a reply: no queue, no front end
    "delivery/classify": {"smtp", "http", "queue", "mailbox", "mailauth", "cli"},
}  # fmt: skip


def imported_packages(path: Path) -> set[str]:
    """The tachymail subpackages (or top-level modules) *path* imports, wherever the import
    statement is (inside functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "tachymail" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_a_higher_layer(package: str) -> None:
    target = PACKAGE / package
    files = sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")]
    assert files and all(f.exists() for f in files), package
    offences = {
        f"{path.relative_to(PACKAGE)} imports tachymail.{name}"
        for path in files
        for name in imported_packages(path) & FORBIDDEN[package]
    }
    assert not offences, sorted(offences)
