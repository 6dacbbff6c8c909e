"""``tachymail suppression add|del|list|import``: the suppression list, beside a running
server (tachymail.queue.suppression: every process of the node shares it, a change is seen
by the next RCPT).

Exit status 0 on success; 1 when ``del`` finds no such entry; 2 with one line on stderr
for a bad argument, a bad CSV file (every bad line named) or configuration.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

from tachymail.cli.commands import _config, _fail
from tachymail.config import ConfigError
from tachymail.queue.suppression import (
    Suppression,
    SuppressionError,
    SuppressionList,
    parse_expiry,
)


def add_suppression_parser(sub: Any) -> None:
    """Register ``tachymail suppression ...`` on the top-level subparsers *sub*."""
    parser = sub.add_parser(
        "suppression",
        help="the suppression list: recipients never to be mailed again",
        description="Recipients on the suppression list are refused at injection (HTTP) "
        "and at SMTP RCPT (550 5.7.1, [suppression] refuse_at_rcpt). An entry is global or "
        "for one sender domain (scope); addresses compare case-insensitively. Hard bounces "
        "add entries by themselves ([suppression] on_bounce_classes). Safe while serving.",
    )
    parser.set_defaults(handler=cmd_suppression)
    actions = parser.add_subparsers(dest="suppression_command", metavar="ACTION", required=True)

    def common(action: argparse.ArgumentParser) -> None:
        action.add_argument("-c", "--config", metavar="FILE", help="TOML configuration file")
        action.add_argument("--data-dir", metavar="DIR", help="data directory")

    add = actions.add_parser("add", help="add (or replace) an entry")
    common(add)
    add.add_argument("address", help="the recipient address")
    add.add_argument(
        "--scope", default="global", help='"global" (default) or the sender domain it is for'
    )
    add.add_argument("--reason", default="", help="why (shown in the 550 reply)")
    add.add_argument(
        "--expires",
        default="",
        metavar="WHEN",
        help="a duration (90m, 12h, 30d, 2w) or a time (epoch seconds, ISO 8601); default: never",
    )
    add.add_argument("--json", action="store_true", help="print the entry as JSON")

    delete = actions.add_parser("del", help="remove an entry")
    common(delete)
    delete.add_argument("address", help="the recipient address")
    delete.add_argument("--scope", default="global", help='"global" (default) or a domain')

    listing = actions.add_parser("list", help="list the entries (unexpired), by scope and address")
    common(listing)
    listing.add_argument("--scope", help="only this scope (global or a sender domain)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")

    importing = actions.add_parser(
        "import",
        help="add the entries of a CSV file: address,scope,reason,expires",
        description="Add every entry of FILE ('-': standard input), a CSV file whose first "
        "line is the header address,scope,reason,expires (scope empty: global; expires "
        "empty: never, else as add --expires). Every line is checked first: one bad line "
        "and nothing is added.",
    )
    common(importing)
    importing.add_argument("file", help="the CSV file, or - for standard input")


def _when(epoch: float) -> str:
    if not epoch:
        return "never"
    moment = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _line(entry: Suppression) -> str:
    return (
        f"{entry.address}\t{entry.scope}\t{entry.source}\t{_when(entry.created)}\t"
        f"expires {_when(entry.expires)}\t{entry.reason}"
    )


def cmd_suppression(args: argparse.Namespace) -> int:
    """Run one action; see the module doc for the exit status."""
    try:
        config = _config(args)
    except ConfigError as exc:
        return _fail(f"invalid configuration:\n{exc}")
    try:
        suppressions = SuppressionList(config.data_path)
    except OSError as exc:
        return _fail(f"cannot open the suppression list: {exc}")
    try:
        return _run(args, suppressions)
    except SuppressionError as exc:
        return _fail(str(exc))
    finally:
        suppressions.close()


def _run(args: argparse.Namespace, suppressions: SuppressionList) -> int:
    action = args.suppression_command
    if action == "add":
        entry = suppressions.add(
            args.address,
            args.scope,
            args.reason,
            "cli",
            parse_expiry(args.expires),
        )
        print(json.dumps(entry.as_dict()) if args.json else f"added: {_line(entry)}")
        return 0
    if action == "del":
        if suppressions.remove(args.address, args.scope):
            print(f"removed: {args.address} ({args.scope})")
            return 0
        print(f"tachymail: no entry for {args.address} in scope {args.scope}", file=sys.stderr)
        return 1
    if action == "list":
        cursor: str | None = None
        while True:
            page, cursor = suppressions.list(args.scope, cursor, 1000)
            for entry in page:
                print(json.dumps(entry.as_dict()) if args.json else _line(entry))
            if cursor is None:
                return 0
    # import
    if args.file == "-":
        count = suppressions.import_csv(sys.stdin, source="import")
    else:
        try:
            with open(args.file, encoding="utf-8", newline="") as lines:
                count = suppressions.import_csv(lines, source="import")
        except OSError as exc:
            return _fail(f"cannot read {args.file}: {exc.strerror or exc}")
        except UnicodeDecodeError as exc:
            return _fail(f"{args.file} is not UTF-8: {exc}")
    print(f"imported {count} entries")
    return 0
