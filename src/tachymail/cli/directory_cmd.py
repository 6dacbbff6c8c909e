"""``tachymail user ...`` and ``tachymail alias ...``: the users file and the aliases file.

Both files are re-read by a running server when they change, so every command here takes
effect without a restart. Exit status 0 on success, 2 with one line on stderr otherwise.
"""

from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

from tachymail.cli.commands import _config, _fail  # one way to read -c/--data-dir, to fail
from tachymail.config import Config, ConfigError

if TYPE_CHECKING:
    from tachymail.auth.users import UsersFile
    from tachymail.mailbox import MailboxStore

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?", re.IGNORECASE)
_UNLIMITED = ("none", "unlimited")


def parse_size(text: str) -> int:
    """Bytes of a size such as ``500M``, ``1.5G``, ``800K``, ``1048576`` (units are powers
    of 1024; ``B``/``iB`` may follow); 0 for ``0``, ``none`` or ``unlimited``. Raises
    ValueError for anything else."""
    text = text.strip()
    if text.lower() in _UNLIMITED:
        return 0
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a size: {text!r} (e.g. 500M, 2G, 0 for unlimited)")
    return int(float(match[1]) * _UNITS[match[2].upper()])


def format_size(size: int) -> str:
    """*size* bytes the way parse_size reads it back, to three significant digits."""
    for unit in ("T", "G", "M", "K"):
        if size >= _UNITS[unit]:
            value = size / _UNITS[unit]
            return (
                f"{value:.0f}{unit}"
                if value >= 100 or value == int(value)
                else f"{value:.3g}{unit}"
            )
    return str(size)


def _config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument("--data-dir", metavar="DIR", help="data directory (users, aliases, mail)")


def _password_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from the first line of standard input instead of asking "
        "(the default when standard input is not a terminal)",
    )


def add_user_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``tachymail user``."""
    user = sub.add_parser(
        "user",
        help="manage users: SMTP AUTH, POP3 logins and local mailboxes with quotas",
        description="Manage the users file: one password serves submission, POP3 and IMAP; "
        "a user whose name is an address in a local domain (policy.local_domains) has a "
        "mailbox. A running server sees every change at once.",
    )
    user_sub = user.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    add = user_sub.add_parser(
        "add",
        help="add a user or change a password",
        description="Add a user or change a password. The password is asked for twice on "
        "the terminal; when standard input is not a terminal (echo pw | tachymail user add "
        "NAME), or with --password-stdin, its first line is the password. An address in "
        "a local domain is stored lower-cased.",
    )
    _config_options(add)
    add.add_argument("name")
    _password_option(add)
    add.add_argument(
        "--quota",
        metavar="SIZE",
        help="mailbox quota: 500M, 2G, 0 for unlimited (default for a new user: "
        "mailbox.default_quota_mb; an existing user keeps its quota)",
    )
    delete = user_sub.add_parser(
        "del",
        help="delete a user (its mail stays unless --purge)",
        description="Delete a user: it can no longer log in and mail for it is refused "
        "(550 5.1.1). Its mailboxes stay in the store (tachymail mailbox ... exports "
        "them) unless --purge deletes them too.",
    )
    _config_options(delete)
    delete.add_argument("name")
    delete.add_argument(
        "--purge", action="store_true", help="also delete the user's mailboxes and messages"
    )
    listing = user_sub.add_parser(
        "list",
        help="list users, with quota and mailbox usage for local users",
        description="One user per line: the name, then for users with a quota or a "
        "mailbox, the quota and the bytes and messages in the mailbox store.",
    )
    _config_options(listing)
    listing.add_argument("--json", action="store_true", help="one JSON object per user and line")
    passwd = user_sub.add_parser(
        "passwd",
        help="change a user's password (the quota stays)",
        description="Change an existing user's password; asked for as by user add.",
    )
    _config_options(passwd)
    passwd.add_argument("name")
    _password_option(passwd)
    quota = user_sub.add_parser(
        "quota",
        help="set a user's mailbox quota",
        description="Set a user's mailbox quota: 500M, 2G, 0 or unlimited for none. Mail "
        "for a user whose mailbox holds the quota or more is refused at RCPT with 452 "
        "4.2.2; a message that would overflow it is deferred at delivery.",
    )
    _config_options(quota)
    quota.add_argument("name")
    quota.add_argument("size", metavar="SIZE")
    user.set_defaults(handler=cmd_user)


def add_alias_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``tachymail alias``."""
    alias = sub.add_parser(
        "alias",
        help="manage aliases and catch-alls of the local domains",
        description="Manage the aliases file (mailbox.aliases_file): an alias sends mail "
        "for its source address to each target; targets outside the local domains are "
        "relayed; a source @domain is that domain's catch-all (for addresses that are "
        "neither a user nor an alias). A running server sees every change at once.",
    )
    alias_sub = alias.add_subparsers(dest="alias_command", metavar="ACTION", required=True)
    add = alias_sub.add_parser(
        "add",
        help="add an alias, or targets to an existing one",
        description="Add TARGETs to the alias SOURCE (made if new). SOURCE: an address or "
        "@domain (catch-all); TARGET: addresses.",
    )
    _config_options(add)
    add.add_argument("source")
    add.add_argument("targets", metavar="TARGET", nargs="+")
    delete = alias_sub.add_parser("del", help="delete an alias, or one of its targets")
    _config_options(delete)
    delete.add_argument("source")
    delete.add_argument("target", nargs="?", help="only this target (default: the whole alias)")
    listing = alias_sub.add_parser("list", help="list the aliases: 'source: target, target'")
    _config_options(listing)
    listing.add_argument("--json", action="store_true", help="one JSON object per alias and line")
    alias.set_defaults(handler=cmd_alias)


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _read_password(args: argparse.Namespace) -> str | None:
    """The new password (None after a message on stderr: nothing given, or a mismatch)."""
    if args.password_stdin or not sys.stdin.isatty():
        # Piped in (echo pw | tachymail user add alice): one line, no prompt, no echo games.
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        try:
            password = getpass.getpass(f"password for {args.name}: ")
            if password != getpass.getpass("again: "):
                _fail("the passwords differ")
                return None
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            _fail("no password given; nothing changed")
            return None
    if not password:
        _fail("empty password")
        return None
    return password


def _is_local(config: Config, name: str) -> bool:
    _, at, domain = name.rpartition("@")
    return bool(at) and domain.lower() in config.local_delivery_domains


@contextmanager
def _mailbox_store(config: Config) -> Iterator[MailboxStore | None]:
    """The mailbox store, read-only, or None when there is none (yet) or it cannot open."""
    if not (config.mailbox_path / "data.mdb").exists():
        yield None
        return
    import lmdb

    from tachymail.mailbox import MailboxStore

    try:
        store = MailboxStore(config.mailbox_path, readonly=True)
    except (lmdb.Error, OSError) as exc:  # the listing is still worth printing
        _warn(f"cannot read the mailbox store at {config.mailbox_path}: {exc}")
        yield None
        return
    try:
        yield store
    finally:
        store.close()


def cmd_user(args: argparse.Namespace) -> int:
    from tachymail.auth.users import UsersFile

    try:
        config = _config(args)
    except ConfigError as exc:
        return _fail(f"invalid configuration:\n{exc}")
    users = UsersFile(config.users_path)
    command = args.user_command
    if command == "list":
        return _user_list(args, config, users)
    # An existing user is found in any case, as mail and logins find it.
    name = _existing_name(users, args.name) or args.name
    if command == "del":
        return _user_del(args, config, users, name)
    if command == "quota":
        try:
            size = parse_size(args.size)
        except ValueError as exc:
            return _fail(str(exc))
        if not users.set_quota(name, size):
            return _fail(f"no user {args.name!r}")
        print(f"user {name}: quota {format_size(size) if size else 'unlimited'}")
        return 0
    if command == "passwd":
        if name not in users.users():
            return _fail(f"no user {args.name!r}")
        password = _read_password(args)
        if password is None:
            return 2
        if not users.passwd(name, password):
            return _fail(f"no user {args.name!r}")
        print(f"user {name}: password changed")
        return 0
    return _user_add(args, config, users, name)


def _existing_name(users: UsersFile, name: str) -> str | None:
    known = users.users()
    if name in known:
        return name
    same = [n for n in known if n.lower() == name.lower()]
    return same[0] if len(same) == 1 else None


def _user_add(args: argparse.Namespace, config: Config, users: UsersFile, name: str) -> int:
    local = _is_local(config, name)
    if local and name not in users.users():
        name = name.lower()  # mailbox users are lower-cased addresses
    quota: int | None = None
    if args.quota is not None:
        try:
            quota = parse_size(args.quota)
        except ValueError as exc:
            return _fail(str(exc))
    elif name not in users.users() and "@" in name:
        quota = config.mailbox.default_quota_mb << 20
    password = _read_password(args)
    if password is None:
        return 2
    try:
        users.add(name, password, quota=quota)
    except ValueError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot write {users.path}: {exc}")
    print(f"user {name} saved in {users.path}")
    if "@" in name and not local:
        domain = name.rpartition("@")[2]
        _warn(
            f"{domain} is not a local domain (policy.local_domains): {name} can log in, "
            "but mail for it is not delivered here"
        )
    return 0


def _user_del(args: argparse.Namespace, config: Config, users: UsersFile, name: str) -> int:
    from tachymail.mailbox.directory import AliasesFile

    lowered = name.lower()
    if users.delete(name):
        print(f"user {name} deleted; mail for it is now refused")
    elif not (args.purge and lowered in _stored_users(config)):
        return _fail(f"no user {args.name!r}")  # --purge still clears a deleted user's mail
    naming = sorted(
        source
        for source, targets in AliasesFile(config.aliases_path).aliases().items()
        if lowered in (t.lower() for t in targets)
    )
    if naming:
        _warn(f"aliases still name {name}: {', '.join(naming)} (tachymail alias del)")
    if args.purge:
        return _purge(config, lowered)
    if lowered in _stored_users(config):
        print(
            f"its mail stays in the mailbox store ({config.mailbox_path}): `tachymail mailbox "
            f"export {lowered} DIR` saves it, `tachymail user del --purge {lowered}` deletes it"
        )
    return 0


def _stored_users(config: Config) -> list[str]:
    """The users with mailboxes in the store ([] when there is no store)."""
    with _mailbox_store(config) as store:
        return store.users() if store is not None else []


def _purge(config: Config, user: str) -> int:
    """Delete *user*'s mailboxes and messages in one synced transaction."""
    if not (config.mailbox_path / "data.mdb").exists():
        return 0
    import lmdb

    from tachymail.mailbox import ChangeNotifier, MailboxStore, StorageFull, delete_user
    from tachymail.mailbox.notify import DIRECTORY

    try:
        store = MailboxStore(
            config.mailbox_path,
            map_size=config.mailbox.map_size_mb << 20,
            max_map_size=config.mailbox.max_map_size_mb << 20,
        )
    except (lmdb.Error, OSError) as exc:  # one line, not a traceback
        return _fail(f"cannot open the mailbox store: {exc}")
    notifier = ChangeNotifier(config.data_path / DIRECTORY)  # open IMAP sessions learn of it
    store.on_commit = notifier.publish
    try:
        [outcome] = store.apply([delete_user(user)])
    except StorageFull as exc:
        return _fail(f"no room on the mailbox store's disk to delete ({exc})")
    except lmdb.Error as exc:
        return _fail(f"mailboxes of {user} not deleted: {exc}")
    finally:
        store.close()
        notifier.close()
    if isinstance(outcome, Exception):
        return _fail(f"mailboxes of {user} not deleted: {outcome}")
    freed, messages = cast("tuple[int, int]", outcome)
    print(f"mailboxes of {user} deleted: {messages} message(s), {format_size(freed)} freed")
    return 0


def _user_list(args: argparse.Namespace, config: Config, users: UsersFile) -> int:
    entries = users.entries()
    with _mailbox_store(config) as store:
        for name in sorted(entries):
            quota = entries[name].quota
            local = _is_local(config, name)
            used, messages = store.usage(name.lower()) if store is not None and local else (0, 0)
            if args.json:
                row: dict[str, Any] = {"name": name, "quota": quota, "local": local}
                if local:
                    row.update(bytes=used, messages=messages)
                print(json.dumps(row))
            elif local or quota:
                # Plain AUTH users stay one name per line, as before mailboxes existed.
                limit = format_size(quota) if quota else "unlimited"
                usage = f"  used {format_size(used)} in {messages} message(s)" if local else ""
                print(f"{name}  quota {limit}{usage}")
            else:
                print(name)
    return 0


def cmd_alias(args: argparse.Namespace) -> int:
    from tachymail.mailbox.directory import AliasesFile, Directory

    try:
        config = _config(args)
    except ConfigError as exc:
        return _fail(f"invalid configuration:\n{exc}")
    aliases = AliasesFile(config.aliases_path)
    command = args.alias_command
    if command == "list":
        for source, targets in sorted(aliases.aliases().items()):
            if args.json:
                print(json.dumps({"source": source, "targets": list(targets)}))
            else:
                print(f"{source}: {', '.join(targets)}")
        return 0
    if command == "del":
        if not aliases.delete(args.source, args.target):
            what = f"target {args.target} in alias" if args.target else "alias"
            return _fail(f"no {what} {args.source}")
        gone = f"target {args.target}" if args.target else "alias"
        print(f"alias {args.source.lower()}: {gone} deleted")
        return 0
    try:
        added = aliases.add(args.source, args.targets)
    except ValueError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot write {aliases.path}: {exc}")
    source = args.source.lower()
    if added:
        print(f"alias {source}: added {', '.join(added)}")
    else:
        print(f"alias {source}: already has every target given")
    domain = source.rpartition("@")[2]
    directory = Directory(config)
    if not directory.is_local_domain(domain):
        _warn(f"{domain} is not a local domain (policy.local_domains): this alias is not used")
    for target in added:
        if directory.is_local_domain(target.rpartition("@")[2]) and not directory.resolve(target):
            _warn(f"{target} is no local user or alias (yet): it is skipped when the alias is used")
    return 0
