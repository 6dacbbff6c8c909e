"""`tachymail user ...` and `tachymail alias ...` as an operator runs them: the files they
write, what they print, their exit status, and the mailbox store they read and purge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server import tachymail_cmd
from tachymail.auth.users import UsersFile
from tachymail.mailbox import MailboxStore, deliver, prepare_delivery


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "tachymail.toml"
    path.write_text(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\n'
        '[policy]\nlocal_domains = ["example.test"]\n'
        "[mailbox]\ndefault_quota_mb = 100\n"
    )
    return path


def run(config: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*tachymail_cmd(), *args, "-c", str(config)],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
    )


def ok(config: Path, *args: str, stdin: str = "") -> str:
    done = run(config, *args, stdin=stdin)
    assert done.returncode == 0, done.stderr
    return done.stdout


def users_file(config: Path) -> Path:
    return config.parent / "data" / "users"


def test_user_add_quota_passwd_and_list(config: Path) -> None:
    ok(config, "user", "add", "Alice@Example.TEST", "--quota", "500M", stdin="one\n")
    ok(config, "user", "add", "bob@example.test", stdin="pw\n")
    out = run(config, "user", "add", "relay-client", stdin="pw\n")
    assert out.returncode == 0 and out.stderr == ""
    out = run(config, "user", "add", "carol@elsewhere.test", "--quota", "0", stdin="pw\n")
    assert "elsewhere.test is not a local domain" in out.stderr
    users = UsersFile(users_file(config))
    # A local address is stored lower-cased; a new one without --quota gets the default.
    assert users.quota("alice@example.test") == 500 << 20
    assert users.quota("bob@example.test") == 100 << 20
    assert users.quota("relay-client") == 0
    # No quota, no third field: the line reads as before quotas existed.
    [relay] = [x for x in users_file(config).read_text().splitlines() if x.startswith("relay-")]
    assert relay.startswith("relay-client:$scrypt$") and relay.count(":") == 1

    ok(config, "user", "passwd", "ALICE@example.test", "--password-stdin", stdin="two\n")
    assert users.check("alice@example.test", "two")
    assert users.quota("alice@example.test") == 500 << 20
    ok(config, "user", "add", "alice@example.test", stdin="three\n")  # keeps the quota
    assert users.quota("alice@example.test") == 500 << 20
    assert ok(config, "user", "quota", "alice@example.test", "1.5G").strip() == (
        "user alice@example.test: quota 1.5G"
    )
    ok(config, "user", "quota", "bob@example.test", "unlimited")

    lines = ok(config, "user", "list").splitlines()
    assert lines == [
        "alice@example.test  quota 1.5G  used 0 in 0 message(s)",
        "bob@example.test  quota unlimited  used 0 in 0 message(s)",
        "carol@elsewhere.test",
        "relay-client",
    ]
    rows = [json.loads(line) for line in ok(config, "user", "list", "--json").splitlines()]
    assert rows[0] == {
        "name": "alice@example.test",
        "quota": 3 << 29,
        "local": True,
        "bytes": 0,
        "messages": 0,
    }
    assert rows[3] == {"name": "relay-client", "quota": 0, "local": False}


def test_user_commands_fail_clearly(config: Path) -> None:
    for args in (
        ("user", "passwd", "nobody@example.test", "--password-stdin"),
        ("user", "quota", "nobody@example.test", "1M"),
        ("user", "del", "nobody@example.test"),
        ("user", "add", "alice@example.test", "--quota", "lots"),
        ("user", "add", "bad name", "--password-stdin"),
    ):
        done = run(config, *args, stdin="pw\n")
        assert done.returncode == 2, args
        assert done.stderr.startswith("tachymail: "), done.stderr
        assert "Traceback" not in done.stderr
    assert run(config, "user", "add", "alice@example.test", stdin="\n").returncode == 2
    assert not users_file(config).exists()  # nothing was written by any of them


def test_user_list_shows_usage_and_del_keeps_or_purges_mail(config: Path) -> None:
    ok(config, "user", "add", "alice@example.test", "--quota", "1M", stdin="pw\n")
    ok(config, "user", "add", "bob@example.test", stdin="pw\n")
    store = MailboxStore(config.parent / "data" / "mailbox")
    try:
        for n in range(3):
            message = b"Subject: %d\r\n\r\n" % n + b"x" * 1000
            store.apply([deliver(prepare_delivery("alice@example.test", message))])
        store.apply([deliver(prepare_delivery("bob@example.test", b"Subject: b\r\n\r\nb\r\n"))])
        used, count = store.usage("alice@example.test")
    finally:
        store.close()
    assert count == 3
    listing = ok(config, "user", "list").splitlines()
    assert listing[0].startswith("alice@example.test  quota 1M  used ")
    assert listing[0].endswith(" in 3 message(s)")
    rows = [json.loads(line) for line in ok(config, "user", "list", "--json").splitlines()]
    assert (rows[0]["bytes"], rows[0]["messages"]) == (used, 3)

    out = ok(config, "user", "del", "bob@example.test")
    assert "its mail stays in the mailbox store" in out
    out = ok(config, "user", "del", "alice@example.test", "--purge")
    assert "mailboxes of alice@example.test deleted: 3 message(s)" in out
    # A user deleted before can still have its mail purged.
    assert "mailboxes of bob@example.test deleted: 1 message(s)" in ok(
        config, "user", "del", "bob@example.test", "--purge"
    )
    store = MailboxStore(config.parent / "data" / "mailbox", readonly=True)
    try:
        assert store.usage("alice@example.test") == (0, 0)
        assert store.usage("bob@example.test") == (0, 0)
    finally:
        store.close()
    assert ok(config, "user", "list") == ""


def test_alias_add_del_list(config: Path) -> None:
    ok(config, "user", "add", "alice@example.test", stdin="pw\n")
    out = run(config, "alias", "add", "Sales@example.test", "alice@example.test", "x@remote.test")
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout.strip() == "alias sales@example.test: added alice@example.test, x@remote.test"
    out = run(
        config, "alias", "add", "sales@example.test", "alice@example.test", "ghost@example.test"
    )
    assert out.stdout.strip() == "alias sales@example.test: added ghost@example.test"
    assert "ghost@example.test is no local user or alias" in out.stderr
    out = run(config, "alias", "add", "@elsewhere.test", "alice@example.test")
    assert out.returncode == 0
    assert "elsewhere.test is not a local domain" in out.stderr
    ok(config, "alias", "add", "@example.test", "alice@example.test")
    assert ok(config, "alias", "list").splitlines() == [
        "@elsewhere.test: alice@example.test",
        "@example.test: alice@example.test",
        "sales@example.test: alice@example.test, x@remote.test, ghost@example.test",
    ]
    ok(config, "alias", "del", "sales@example.test", "GHOST@example.test")
    ok(config, "alias", "del", "@elsewhere.test")
    rows = [json.loads(line) for line in ok(config, "alias", "list", "--json").splitlines()]
    assert rows == [
        {"source": "@example.test", "targets": ["alice@example.test"]},
        {"source": "sales@example.test", "targets": ["alice@example.test", "x@remote.test"]},
    ]
    # Deleting a user that aliases name says so.
    out = run(config, "user", "del", "alice@example.test")
    assert out.returncode == 0
    assert "aliases still name alice@example.test: @example.test, sales@example.test" in out.stderr
    for args in (
        ("alias", "del", "nobody@example.test"),
        ("alias", "del", "sales@example.test", "nobody@example.test"),
        ("alias", "add", "no-domain", "alice@example.test"),
        ("alias", "add", "a@example.test", "not an address"),
    ):
        done = run(config, *args)
        assert done.returncode == 2, args
        assert done.stderr.startswith("tachymail: ") and "Traceback" not in done.stderr
