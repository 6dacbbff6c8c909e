"""The directory of local users and aliases (tachymail.mailbox.directory), the users file's
quotas (tachymail.auth.users) and the sizes `tachymail user --quota` reads."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from tachymail.auth.users import UsersFile, verify_password
from tachymail.cli.directory_cmd import format_size, parse_size
from tachymail.config import Config, from_dict
from tachymail.mailbox.directory import MAX_ALIAS_DEPTH, AliasesFile, Directory, Resolution

# A fixed hash: these tests are about names and quotas, not passwords (scrypt is slow).
HASH = "$scrypt$n=16384,r=8,p=1$c2FsdA==$a2V5"


def make_config(tmp_path: Path, delimiter: str = "+", **policy: object) -> Config:
    return from_dict(
        {
            "server": {"data_dir": str(tmp_path)},
            "policy": {"local_domains": ["example.test", "other.test"], **policy},
            "mailbox": {"recipient_delimiter": delimiter},
        }
    )


def write_users(config: Config, *lines: str) -> None:
    config.users_path.write_text("".join(f"{line}\n" for line in lines))


def write_aliases(config: Config, text: str) -> None:
    config.aliases_path.write_text(text)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    config = make_config(tmp_path)
    write_users(
        config,
        f"alice@example.test:{HASH}:1000",
        f"bob@example.test:{HASH}",
        f"carol@other.test:{HASH}",
        f"relay-client:{HASH}",
    )
    return config


def local(*addresses: str) -> Resolution:
    return Resolution(tuple(addresses), ())


def test_users_resolve_to_themselves_and_unknown_ones_to_none(config: Config) -> None:
    directory = Directory(config)
    assert directory.resolve("alice@example.test") == local("alice@example.test")
    assert directory.resolve("carol@other.test") == local("carol@other.test")
    assert directory.resolve("nobody@example.test") is None
    # A user of the users file outside the local domains has no mailbox here.
    assert directory.resolve("relay-client") is None


def test_lookups_ignore_case(config: Config) -> None:
    write_aliases(config, "Sales@Example.TEST: Bob@Example.test\n")
    directory = Directory(config)
    assert directory.resolve("ALICE@Example.Test") == local("alice@example.test")
    assert directory.resolve("sales@example.test") == local("bob@example.test")
    assert directory.user_of("Alice@EXAMPLE.test") == "alice@example.test"
    assert directory.quota("ALICE@example.test") == 1000
    assert directory.is_local_domain("EXAMPLE.test")


def test_outside_the_local_domains_an_address_is_relayed_as_it_is(config: Config) -> None:
    directory = Directory(config)
    assert not directory.is_local_domain("elsewhere.test")
    found = directory.resolve("Someone@Elsewhere.test")
    assert found == Resolution((), ("Someone@Elsewhere.test",))


def test_an_exact_alias_wins_over_the_user_of_the_same_name(config: Config) -> None:
    write_aliases(config, "alice@example.test: bob@example.test\n")
    assert Directory(config).resolve("alice@example.test") == local("bob@example.test")


def test_aliases_expand_to_local_and_remote_targets(config: Config) -> None:
    write_aliases(
        config,
        "# the team\n"
        "team@example.test: alice@example.test, bob@example.test\n"
        "team@example.test: friend@elsewhere.test carol@other.test\n",
    )
    found = Directory(config).resolve("team@example.test")
    assert found == Resolution(
        ("alice@example.test", "bob@example.test", "carol@other.test"), ("friend@elsewhere.test",)
    )


def test_aliases_expand_recursively_without_duplicates(config: Config) -> None:
    write_aliases(
        config,
        "all@example.test: team@example.test, alice@example.test, ext@elsewhere.test\n"
        "team@example.test: alice@example.test, bob@example.test, EXT@elsewhere.test\n",
    )
    found = Directory(config).resolve("all@example.test")
    assert found == Resolution(("alice@example.test", "bob@example.test"), ("EXT@elsewhere.test",))


def test_alias_nesting_stops_at_the_depth_limit(config: Config) -> None:
    chain = [f"a{i}@example.test" for i in range(MAX_ALIAS_DEPTH + 1)]

    def aliases(length: int) -> str:
        links = [f"{chain[i]}: {chain[i + 1]}\n" for i in range(length - 1)]
        return "".join(links) + f"{chain[length - 1]}: alice@example.test\n"

    write_aliases(config, aliases(MAX_ALIAS_DEPTH))  # ten aliases, then the user: fine
    directory = Directory(config)
    assert directory.resolve(chain[0]) == local("alice@example.test")
    write_aliases(config, aliases(MAX_ALIAS_DEPTH + 1))  # one level too deep: dropped
    assert directory.resolve(chain[0]) is None


def test_alias_loops_end(config: Config) -> None:
    write_aliases(
        config,
        "ping@example.test: pong@example.test\n"
        "pong@example.test: ping@example.test\n"
        # An alias that names itself keeps a copy for the user of that name (as Postfix).
        "bob@example.test: bob@example.test, archive@elsewhere.test\n",
    )
    directory = Directory(config)
    assert directory.resolve("ping@example.test") is None
    assert directory.resolve("bob@example.test") == Resolution(
        ("bob@example.test",), ("archive@elsewhere.test",)
    )


def test_targets_that_resolve_to_nothing_are_dropped(config: Config) -> None:
    write_aliases(
        config,
        "list@example.test: gone@example.test, alice@example.test\n"
        "broken@example.test: gone@example.test\n",
    )
    directory = Directory(config)
    assert directory.resolve("list@example.test") == local("alice@example.test")
    assert directory.resolve("broken@example.test") is None


def test_sub_addresses_deliver_to_the_user_or_alias(config: Config) -> None:
    write_aliases(config, "sales@example.test: bob@example.test\n")
    directory = Directory(config)
    # The tag stays in the envelope address as written; the user part is lower-cased.
    assert directory.resolve("Alice+Lists@example.test") == local("alice+Lists@example.test")
    assert directory.resolve("sales+2024@example.test") == local("bob@example.test")
    assert directory.resolve("nobody+x@example.test") is None
    assert directory.resolve("+x@example.test") is None
    assert directory.user_of("alice+lists@example.test") == "alice@example.test"
    assert directory.user_of("nobody+x@example.test") is None


def test_an_exact_user_or_alias_with_the_delimiter_wins(config: Config) -> None:
    write_users(config, f"alice@example.test:{HASH}", f"alice+x@example.test:{HASH}")
    write_aliases(config, "alice+y@example.test: ext@elsewhere.test\n")
    directory = Directory(config)
    assert directory.resolve("alice+x@example.test") == local("alice+x@example.test")
    assert directory.user_of("alice+x@example.test") == "alice+x@example.test"
    assert directory.resolve("alice+y@example.test") == Resolution((), ("ext@elsewhere.test",))


def test_the_delimiter_is_configurable_and_can_be_off(config: Config, tmp_path: Path) -> None:
    dash = Directory(make_config(tmp_path, delimiter="-"))
    assert dash.resolve("alice-news@example.test") == local("alice-news@example.test")
    assert dash.resolve("alice+news@example.test") is None
    off = Directory(make_config(tmp_path, delimiter=""))
    assert off.resolve("alice+news@example.test") is None
    assert off.user_of("alice+news@example.test") is None


def test_catch_all_takes_only_what_nothing_else_takes(config: Config) -> None:
    write_aliases(
        config,
        "@example.test: bob@example.test\nsales@example.test: carol@other.test\n",
    )
    directory = Directory(config)
    assert directory.resolve("whoever@example.test") == local("bob@example.test")
    assert directory.resolve("alice@example.test") == local("alice@example.test")
    assert directory.resolve("alice+tag@example.test") == local("alice+tag@example.test")
    assert directory.resolve("sales@example.test") == local("carol@other.test")
    assert directory.resolve("whoever@other.test") is None  # the catch-all is per domain


def test_a_catch_all_to_an_unknown_address_of_its_domain_does_not_loop(config: Config) -> None:
    write_aliases(config, "@example.test: nobody@example.test\n")
    assert Directory(config).resolve("x@example.test") is None


def test_bare_postmaster_is_postmaster_of_each_local_domain_in_turn(config: Config) -> None:
    directory = Directory(config)
    assert directory.resolve("postmaster") is None
    write_aliases(config, "postmaster@other.test: carol@other.test\n")
    assert directory.resolve("Postmaster") == local("carol@other.test")
    write_aliases(
        config,
        "postmaster@other.test: carol@other.test\npostmaster@example.test: alice@example.test\n",
    )
    assert directory.resolve("POSTMASTER") == local("alice@example.test")  # example < other
    assert directory.resolve("abuse") is None


def test_quota_and_user_of(config: Config) -> None:
    directory = Directory(config)
    assert directory.quota("alice@example.test") == 1000
    assert directory.quota("bob@example.test") == 0
    assert directory.quota("nobody@example.test") == 0
    assert directory.over_quota("alice@example.test", 1000)
    assert not directory.over_quota("alice@example.test", 999)
    assert not directory.over_quota("bob@example.test", 10**12)
    assert directory.user_of("nobody@example.test") is None


def test_file_changes_are_seen_without_a_new_directory(config: Config) -> None:
    directory = Directory(config)
    assert directory.resolve("dave@example.test") is None
    UsersFile(config.users_path).add("dave@example.test", "pw", quota=5)
    assert directory.resolve("dave@example.test") == local("dave@example.test")
    assert directory.quota("dave@example.test") == 5
    AliasesFile(config.aliases_path).add("info@example.test", ["dave@example.test"])
    assert directory.resolve("info@example.test") == local("dave@example.test")
    AliasesFile(config.aliases_path).delete("info@example.test")
    UsersFile(config.users_path).delete("dave@example.test")
    assert directory.resolve("info@example.test") is None
    assert directory.resolve("dave@example.test") is None
    os.unlink(config.users_path)  # no file at all: nobody
    assert directory.resolve("alice@example.test") is None


def test_users_file_keeps_old_lines_and_reads_quotas(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text(
        f"# comment\nold:{HASH}\nquota:{HASH}:2048\nbroken:{HASH}:lots\nnegative:{HASH}:-5\n"
    )
    users = UsersFile(path)
    assert users.users() == {name: HASH for name in ("old", "quota", "broken", "negative")}
    assert [users.quota(n) for n in ("old", "quota", "broken", "negative", "none")] == [
        0,
        2048,
        0,
        0,
        0,
    ]


def test_users_file_add_passwd_and_quota(tmp_path: Path) -> None:
    users = UsersFile(tmp_path / "users")
    users.add("alice@example.test", "one", quota=100)
    users.add("plain", "pw")
    lines = (tmp_path / "users").read_text().splitlines()
    assert lines[1].startswith("alice@example.test:$scrypt$") and lines[1].endswith(":100")
    assert lines[2].startswith("plain:$scrypt$") and lines[2].count(":") == 1
    users.add("alice@example.test", "two")  # a new password keeps the quota
    assert users.quota("alice@example.test") == 100
    assert users.check("alice@example.test", "two")
    assert users.passwd("alice@example.test", "three")
    assert users.quota("alice@example.test") == 100
    assert verify_password("three", users.users()["alice@example.test"])
    assert users.set_quota("alice@example.test", 0)
    assert users.quota("alice@example.test") == 0
    assert not users.passwd("nobody", "x")
    assert not users.set_quota("nobody", 1)
    with pytest.raises(ValueError):
        users.add("bad:name", "x")
    with pytest.raises(ValueError):
        users.set_quota("plain", -1)
    assert (tmp_path / "users").stat().st_mode & 0o777 == 0o600


def _add_many(path: str, prefix: str) -> None:
    users = UsersFile(Path(path))
    for i in range(6):
        users.add(f"{prefix}{i}", "pw")


def test_concurrent_changes_are_not_lost(tmp_path: Path) -> None:
    path = tmp_path / "users"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_add_many, args=(str(path), p)) for p in ("a", "b", "c")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert len(UsersFile(path).users()) == 18


def test_aliases_file_edits_keep_comments_and_order(tmp_path: Path) -> None:
    path = tmp_path / "aliases"
    path.write_text(
        "# hand-written\nsales@example.test: bob@example.test\n\n# the catch-all\n"
        "@example.test: alice@example.test\n"
    )
    aliases = AliasesFile(path)
    assert aliases.add("Sales@example.test", ["carol@other.test", "BOB@example.test"]) == [
        "carol@other.test"
    ]
    assert aliases.add("new@example.test", ["x@elsewhere.test"]) == ["x@elsewhere.test"]
    assert path.read_text() == (
        "# hand-written\nsales@example.test: bob@example.test, carol@other.test\n\n"
        "# the catch-all\n@example.test: alice@example.test\nnew@example.test: x@elsewhere.test\n"
    )
    assert aliases.delete("sales@example.test", "bob@example.test")
    assert not aliases.delete("sales@example.test", "bob@example.test")
    assert aliases.delete("@example.test")
    assert not aliases.delete("@example.test")
    assert aliases.aliases() == {
        "sales@example.test": ("carol@other.test",),
        "new@example.test": ("x@elsewhere.test",),
    }
    assert "# the catch-all" in path.read_text()
    for source, targets in (("no-at", ["a@b.test"]), ("a@b.test", ["no-at"]), ("a@b.test", [])):
        with pytest.raises(ValueError):
            aliases.add(source, targets)


def test_bad_alias_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "aliases"
    path.write_text(
        "no colon here\nfoo: bar@example.test\nok@example.test: a@b.test, not-an-address\n"
    )
    assert AliasesFile(path).aliases() == {"ok@example.test": ("a@b.test",)}


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("unlimited", 0),
        ("None", 0),
        ("1048576", 1048576),
        ("512K", 512 * 1024),
        ("500M", 500 * 1024**2),
        ("500mb", 500 * 1024**2),
        ("2GiB", 2 * 1024**3),
        ("1.5G", 3 * 1024**3 // 2),
        ("1T", 1024**4),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "-1", "5X", "M", "1,5G", "lots"])
def test_parse_size_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("size", [1, 1000, 1024, 1536, 500 * 1024**2, 3 * 1024**3 // 2, 1024**4])
def test_format_size_reads_back(size: int) -> None:
    assert abs(parse_size(format_size(size)) - size) <= size * 0.01
