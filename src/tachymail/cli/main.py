"""Entry point of the ``tachymail`` command: builds the parser and dispatches.

Each subcommand's work lives in the subpackage that owns it (``smtp`` for
``serve``, ``queue`` for ``queue …``, ``auth`` for ``user …``); the
``cli.commands`` module holds the thin functions that bridge the two.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from tachymail import __version__
from tachymail.cli import commands

KERNELS = ("commands", "data", "mime")


def kernel_report() -> str:
    """Which implementation each hot-path kernel uses: "compiled" or "pure"."""
    import importlib

    from tachymail.protocol import _select

    for name in KERNELS:
        importlib.import_module(f"tachymail.protocol.{name}")
    return ", ".join(f"{name}: {_select.loaded[name]}" for name in KERNELS)


def _config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument("--data-dir", metavar="DIR", help="data directory (queue, TLS pair, users)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tachymail",
        description=(
            "Tachymail, a fast and durable mail transfer agent: it accepts mail over SMTP, "
            "keeps it in a durable LMDB queue and relays it over persistent, pipelined "
            "connections."
        ),
        epilog=(
            "Environment: TACHYMAIL_PURE=1 uses the pure-Python twins of the compiled "
            "hot path (for comparison and debugging)."
        ),
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"tachymail {__version__}",
        help="print the version and exit",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging threshold (default INFO)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser(
        "info",
        help="print the version and which hot-path kernels are compiled",
        description="Print the version and, for each hot-path kernel, whether the compiled "
        "extension or its pure-Python twin is in use.",
    )

    serve = sub.add_parser(
        "serve",
        help="run the MTA (supervisor and SMTP workers)",
        description="Run the MTA. With no configuration it listens on 127.0.0.1:2525 (mx), "
        "127.0.0.1:2587 (submission) and 127.0.0.1:2465 (smtps), data in ./tachymail-data.",
    )
    _config_options(serve)
    serve.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help="an mx listener (repeatable); replaces the configured listeners",
    )
    serve.add_argument("--workers", type=int, metavar="N", help="SMTP worker processes")
    serve.add_argument(
        "--hold",
        action="store_true",
        default=None,
        help="accept and queue, deliver nothing (maintenance, intake benchmarks)",
    )
    serve.add_argument(
        "--smarthost", metavar="HOST:PORT", help="relay everything through this host"
    )
    serve.add_argument(
        "--resolver", metavar="HOST:PORT", help="DNS server for MX lookups (default: system)"
    )
    serve.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve /metrics, /healthz, /readyz here (default 127.0.0.1:9525; '' turns it off)",
    )

    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    check = config_sub.add_parser("check", help="validate a configuration file")
    check.add_argument("file", nargs="?", help="the TOML file (default: the embedded defaults)")
    config_sub.add_parser("defaults", help="print the embedded default configuration as TOML")

    queue = sub.add_parser("queue", help="inspect and manage the queue (safe while serving)")
    queue_sub = queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    listing = queue_sub.add_parser("list", help="list queued messages")
    _config_options(listing)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = queue_sub.add_parser("show", help="show one message's envelope and headers")
    _config_options(show)
    show.add_argument("id", help="queue id")
    show.add_argument("--body", action="store_true", help="print the whole content too")
    count = queue_sub.add_parser("count", help="print the number of queued messages")
    _config_options(count)
    flush = queue_sub.add_parser("flush", help="retry every deferred message now")
    _config_options(flush)
    for action, text in (
        ("delete", "delete a message without notice"),
        ("hold", "keep a message from delivery until released"),
        ("release", "let a held message be delivered again"),
        ("bounce", "give up on a message now and send the sender a bounce"),
    ):
        one = queue_sub.add_parser(action, help=text)
        _config_options(one)
        one.add_argument("id", nargs="?", help="queue id")
        one.add_argument("--all", action="store_true", help="every message in the queue")

    user = sub.add_parser("user", help="manage SMTP AUTH users")
    user_sub = user.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    add = user_sub.add_parser("add", help="add a user or change a password")
    _config_options(add)
    add.add_argument("name")
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input instead of asking",
    )
    delete = user_sub.add_parser("del", help="delete a user")
    _config_options(delete)
    delete.add_argument("name")
    users = user_sub.add_parser("list", help="list user names")
    _config_options(users)

    dkim = sub.add_parser("dkim", help="manage DKIM signing keys")
    dkim_sub = dkim.add_subparsers(dest="dkim_command", metavar="ACTION", required=True)
    keygen = dkim_sub.add_parser(
        "keygen",
        help="make a signing key and print the DNS TXT record to publish",
        description="Make a DKIM key pair, keep the private key in DATA_DIR/dkim/DOMAIN/"
        "SELECTOR.key (mode 0600) and print the DNS TXT record of its public key.",
    )
    _config_options(keygen)
    keygen.add_argument("--domain", required=True, help="the signing domain (d=)")
    keygen.add_argument("--selector", required=True, help="the selector (s=)")
    keygen.add_argument(
        "--algorithm",
        choices=["rsa", "ed25519"],
        default="rsa",
        help="rsa (2048 bits, rsa-sha256; the default) or ed25519 (ed25519-sha256)",
    )
    keygen.add_argument("--force", action="store_true", help="replace an existing key")

    from tachymail.loadtest.options import add_bench_arguments, add_sink_arguments

    bench = sub.add_parser(
        "bench",
        help="SMTP load generator (see docs/load-testing.md)",
        description="Load an SMTP server with many pipelined sessions and print what it "
        "answered: counts by reply code, msgs/s, transaction latency percentiles.",
    )
    add_bench_arguments(bench)
    sink = sub.add_parser(
        "sink",
        help="receive-only SMTP server for benchmarks (see docs/load-testing.md)",
        description="Accept and discard mail (or store it with --store), with optional reply "
        "mixes and latency; print counters on exit (SIGTERM/SIGINT).",
    )
    add_sink_arguments(sink)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        print(f"tachymail {__version__}")
        print(f"python {sys.version.split()[0]}")
        print(f"kernels: {kernel_report()}")
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    handler = getattr(commands, f"cmd_{args.command}")
    result: int = handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
