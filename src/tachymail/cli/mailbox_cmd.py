"""``tachymail mailbox list|stats|export|import``: the mailbox store of local users.

Safe beside a running server: list, stats and export open the store read-only (a
consistent snapshot each); import commits in batches like live deliveries do. Exit status
0 on success, 2 with one line on stderr otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tachymail.cli.commands import _config, _fail
from tachymail.cli.directory_cmd import _config_options
from tachymail.config import Config, ConfigError

if TYPE_CHECKING:
    from tachymail.mailbox import MailboxStore


def add_mailbox_parser(sub: Any) -> None:
    """Register ``tachymail mailbox ...`` on the top-level subparsers *sub*."""
    parser = sub.add_parser(
        "mailbox",
        help="inspect, export and import local users' mailboxes (safe while serving)",
        description="The mailbox store of local users (data_dir/mailbox): list a user's "
        "mailboxes or messages, count what the store holds, and move mail to and from a "
        "Maildir that mutt, Dovecot and other tools read.",
    )
    parser.set_defaults(handler=cmd_mailbox)
    actions = parser.add_subparsers(dest="mailbox_command", metavar="ACTION", required=True)

    listing = actions.add_parser(
        "list",
        help="a user's mailboxes (messages, unseen, size), or --messages of one",
        description="One line per mailbox: name, messages, unseen, size, UIDVALIDITY, "
        "UIDNEXT and its special use. With --messages, one line per message of MAILBOX "
        "(default INBOX): UID, size, internal date and flags, read from the index alone.",
    )
    _config_options(listing)
    listing.add_argument("user", help="the user (an address of a local domain)")
    listing.add_argument(
        "--messages",
        nargs="?",
        const="INBOX",
        metavar="MAILBOX",
        help="list the messages of MAILBOX (default INBOX) instead",
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line")

    stats = actions.add_parser(
        "stats",
        help="users, messages and bytes in the store; per user with quota",
        description="Totals of the store (users, messages, bytes), then one line per user "
        "(messages, bytes, quota and how full); with USER, that user only.",
    )
    _config_options(stats)
    stats.add_argument("user", nargs="?", help="only this user")
    stats.add_argument("--json", action="store_true", help="the figures as one JSON object")

    export = actions.add_parser(
        "export",
        help="write a user's mailboxes as a Maildir (mutt, Dovecot)",
        description="Write every mailbox of USER under DIR as a Maildir: INBOX in "
        "DIR/{cur,new,tmp}, other mailboxes as Maildir++ folders DIR/.Name; flags as "
        "':2,' info (D F P R S T), LF line ends, the internal date as modification time.",
    )
    _config_options(export)
    export.add_argument("user", help="the user")
    export.add_argument("directory", metavar="DIR", help="the Maildir to write (made if missing)")

    importing = actions.add_parser(
        "import",
        help="add the messages of a Maildir to a user's mailboxes",
        description="Read DIR's new/ and cur/ (and its .Folder Maildir++ folders) into "
        "USER's mailboxes: flags from the ':2,' info, internal date from the modification "
        "time. Files imported before (same folder and name, within a week) are skipped.",
    )
    _config_options(importing)
    importing.add_argument("user", help="the user (must exist: tachymail user add)")
    importing.add_argument("directory", metavar="DIR", help="the Maildir to read")


def _size(size: int) -> str:
    from tachymail.cli.directory_cmd import format_size

    return format_size(size)


def cmd_mailbox(args: argparse.Namespace) -> int:
    import lmdb

    from tachymail.mailbox import MailboxStore, StorageFull

    try:
        config = _config(args)
    except ConfigError as exc:
        return _fail(f"invalid configuration:\n{exc}")
    command = args.mailbox_command
    user = args.user.lower() if getattr(args, "user", None) else None
    if command == "import":
        return _import(config, args.user.lower(), Path(args.directory))
    try:
        store = MailboxStore(config.mailbox_path, readonly=True)
    except FileNotFoundError:
        if command == "stats":  # an empty store: nothing was ever delivered
            return _stats(config, None, user, args.json)
        return _fail(f"mailbox {command}: no mailbox store at {config.mailbox_path}")
    except (lmdb.Error, OSError) as exc:
        return _fail(f"mailbox {command}: cannot open the mailbox store: {exc}")
    try:
        if command == "list":
            return _list(store, args.user.lower(), args.messages, args.json)
        if command == "stats":
            return _stats(config, store, user, args.json)
        from tachymail.mailbox import export_maildir

        if not store.mailboxes(args.user):
            return _fail(f"mailbox export: {args.user} has no mailboxes")
        count = export_maildir(store, args.user, Path(args.directory))
        print(f"exported {count} messages of {args.user.lower()} to {args.directory}")
        return 0
    except (lmdb.Error, OSError, StorageFull) as exc:
        return _fail(f"mailbox {command}: {exc}")
    finally:
        store.close()


def _list(store: MailboxStore, user: str, messages: str | None, as_json: bool) -> int:
    if messages is not None:
        if store.mailbox(user, messages) is None:
            return _fail(f"mailbox list: {user} has no mailbox {messages!r}")
        for message in store.messages(user, messages):
            flags = sorted(message.flags)
            if as_json:
                record = {
                    "uid": message.uid,
                    "size": message.size,
                    "internaldate": message.internaldate,
                    "flags": flags,
                    "modseq": message.modseq,
                }
                print(json.dumps(record))
            else:
                date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(message.internaldate))
                print(f"{message.uid:>8} {message.size:>10} {date} {' '.join(flags)}".rstrip())
        return 0
    boxes = store.mailboxes(user)
    if not boxes:
        return _fail(f"mailbox list: {user} has no mailboxes (nothing delivered yet?)")
    if not as_json:
        print(
            f"{'MAILBOX':<24} {'MESSAGES':>8} {'UNSEEN':>7} {'SIZE':>8} "
            f"{'UIDVALIDITY':>11} {'UIDNEXT':>8} SPECIAL-USE"
        )
    for box in boxes:
        if as_json:
            print(
                json.dumps(
                    {
                        "mailbox": box.name,
                        "messages": box.messages,
                        "unseen": box.unseen,
                        "size": box.size,
                        "uidvalidity": box.uidvalidity,
                        "uidnext": box.uidnext,
                        "highestmodseq": box.highestmodseq,
                        "special_use": box.special_use,
                        "subscribed": box.subscribed,
                    }
                )
            )
        else:
            print(
                f"{box.name:<24} {box.messages:>8} {box.unseen:>7} {_size(box.size):>8} "
                f"{box.uidvalidity:>11} {box.uidnext:>8} {box.special_use}".rstrip()
            )
    return 0


def _stats(config: Config, store: MailboxStore | None, user: str | None, as_json: bool) -> int:
    from tachymail.mailbox import Directory

    directory = Directory(config)
    if store is None:
        totals = (0, 0, 0)
        users: list[str] = []
    else:
        totals = store.totals()
        users = store.users()
    if user is not None:
        users = [user]
    rows: list[dict[str, Any]] = []
    for name in users:
        size, count = store.usage(name) if store is not None else (0, 0)
        quota = directory.quota(name)
        rows.append({"user": name, "messages": count, "bytes": size, "quota": quota})
    if as_json:
        total_bytes, total_messages, total_users = totals
        print(
            json.dumps(
                {
                    "users": total_users,
                    "messages": total_messages,
                    "bytes": total_bytes,
                    "per_user": rows,
                }
            )
        )
        return 0
    total_bytes, total_messages, total_users = totals
    print(f"{total_users} users, {total_messages} messages, {_size(total_bytes)}")
    for row in rows:
        quota = int(row["quota"])
        used = int(row["bytes"])
        limit = f"{_size(quota)} ({100 * used / quota:.0f}%)" if quota else "unlimited"
        print(f"{row['user']:<32} {row['messages']:>8} messages {_size(used):>8}  quota {limit}")
    return 0


def _import(config: Config, user: str, directory: Path) -> int:
    import lmdb

    from tachymail.mailbox import (
        ChangeNotifier,
        Directory,
        MailboxStore,
        StorageFull,
        import_maildir,
    )
    from tachymail.mailbox.notify import DIRECTORY
    from tachymail.mailbox.store import MiB

    if Directory(config).user_of(user) != user:
        return _fail(f"mailbox import: {user} is no user (tachymail user add {user})")
    try:
        store = MailboxStore(
            config.mailbox_path,
            map_size=config.mailbox.map_size_mb * MiB,
            max_map_size=config.mailbox.max_map_size_mb * MiB,
        )
    except (lmdb.Error, OSError) as exc:
        return _fail(f"mailbox import: cannot open the mailbox store: {exc}")
    notifier = ChangeNotifier(config.data_path / DIRECTORY)  # IMAP sessions see the import
    store.on_commit = notifier.publish
    try:
        count = import_maildir(store, user, directory)
    except FileNotFoundError as exc:
        return _fail(f"mailbox import: {exc}")
    except StorageFull as exc:
        return _fail(f"mailbox import: the store is full ({exc}); earlier batches are kept")
    except (lmdb.Error, OSError) as exc:
        return _fail(f"mailbox import: {exc}")
    finally:
        store.close()
        notifier.close()
    print(f"imported {count} messages from {directory} for {user}")
    return 0
