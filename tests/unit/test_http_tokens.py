"""The HTTP API's token store (tachymail.auth.tokens): what is kept on disk, what a check
answers, and that a change by another process (the `tachymail token` command) is seen."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tachymail.auth.tokens import TokenError, TokenStore, allows


def test_a_token_is_shown_once_and_only_its_digest_kept(tmp_path: Path) -> None:
    path = tmp_path / "http-tokens"
    store = TokenStore(path)
    token = store.add("ops", "admin")
    assert token.startswith("tm_") and len(token) == 46
    assert token not in path.read_text() and token[3:] not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert store.check(token) == ("ops", "admin")
    assert store.check(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert store.check("") is None and store.check("tm_" + "x" * 500) is None
    assert [(t.name, t.scope) for t in store.list()] == [("ops", "admin")]
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away


def test_changes_by_another_process_are_seen_at_the_next_check(tmp_path: Path) -> None:
    path = tmp_path / "http-tokens"
    server, command = TokenStore(path), TokenStore(path)
    assert server.check("tm_nothing") is None  # no file yet: no tokens
    first = command.add("app", "inject")
    assert server.check(first) == ("app", "inject")
    second = command.add("ops", "all")
    assert server.check(second) == ("ops", "all")
    assert command.delete("app") and not command.delete("app")
    assert server.check(first) is None and server.check(second) == ("ops", "all")


def test_bad_names_scopes_and_duplicates_are_refused(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "http-tokens")
    store.add("ops")
    for name, scope in (("ops", "all"), ("", "all"), ("with space", "all"), ("x", "root")):
        with pytest.raises(TokenError):
            store.add(name, scope)
    assert [t.name for t in store.list()] == ["ops"]


def test_a_broken_file_means_no_tokens_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "http-tokens"
    store = TokenStore(path)
    token = store.add("ops")
    path.write_text("{not json")
    assert store.check(token) is None
    with pytest.raises(ValueError):
        store.list()


def test_scopes() -> None:
    assert allows("all", "inject") and allows("all", "admin")
    assert allows("inject", "inject") and not allows("inject", "admin")
    assert allows("admin", "admin") and not allows("admin", "inject")
