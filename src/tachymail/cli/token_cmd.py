"""``tachymail token add|list|del``: the HTTP API's bearer tokens (tachymail.auth.tokens).

Safe beside a running server: every worker sees a change at its next request. Exit status
0 on success, 1 when ``token del`` finds no such token, 2 with one line on stderr for a
bad argument, configuration or file.
"""

from __future__ import annotations

import argparse
import datetime
import json
from typing import Any

from tachymail.auth.tokens import SCOPES, TokenError, TokenStore
from tachymail.cli.commands import _config, _fail
from tachymail.config import ConfigError


def add_token_parser(sub: Any) -> None:
    """Register ``tachymail token ...`` on the top-level subparsers *sub*."""
    parser = sub.add_parser(
        "token",
        help="manage the HTTP API's bearer tokens",
        description="Bearer tokens of the HTTP API (listener role http). A token is shown "
        "once, when it is added; only its SHA-256 digest is stored, in data_dir/http-tokens "
        "([http] tokens_file). Changes apply to a running server at once.",
    )
    actions = parser.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    add = actions.add_parser(
        "add",
        help="make a new token and print it (once)",
        description="Make a token named NAME and print it on stdout: keep it, it is never "
        "shown again. Scope inject: POST /api/v1/messages; admin: every other /api/v1/ "
        "route; all: both.",
    )
    add.add_argument("name", metavar="NAME", help="the token's name (shown in the access log)")
    add.add_argument("--scope", choices=SCOPES, default="all", help="what it may do (all)")
    listing = actions.add_parser("list", help="list the tokens (names, scopes, creation)")
    listing.add_argument("--json", action="store_true", help="one JSON object per token")
    delete = actions.add_parser("del", help="delete a token (its clients get 401 at once)")
    delete.add_argument("name", metavar="NAME")
    for action in (add, listing, delete):
        action.set_defaults(handler=cmd_token)
        action.add_argument("-c", "--config", metavar="FILE", help="TOML configuration file")
        action.add_argument("--data-dir", metavar="DIR", help="data directory (http-tokens)")


def cmd_token(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
    except ConfigError as exc:
        return _fail(f"invalid configuration:\n{exc}")
    store = TokenStore(config.http_tokens_path)
    command = args.token_command
    try:
        if command == "add":
            print(store.add(args.name, args.scope))
        elif command == "list":
            for token in store.list():
                created = datetime.datetime.fromtimestamp(token.created, datetime.UTC)
                if args.json:
                    entry = {"name": token.name, "scope": token.scope, "created": token.created}
                    print(json.dumps(entry))
                else:
                    print(f"{token.name}\t{token.scope}\t{created:%Y-%m-%dT%H:%M:%SZ}")
        elif not store.delete(args.name):
            print(f"tachymail: no token named {args.name!r}")
            return 1
    except TokenError as exc:
        return _fail(f"token {command}: {exc}")
    except (OSError, ValueError) as exc:
        return _fail(f"token {command}: {exc}")
    return 0
