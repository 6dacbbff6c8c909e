"""Entry point of the ``tachymail`` command: builds the parser and dispatches.

Each subcommand's work lives in the subpackage that owns it (``smtp`` for
``serve``, ``queue`` for ``queue …``, ``auth`` and ``mailbox`` for ``user …``); the
``cli.commands`` module holds the thin functions that bridge the two.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tachymail import __version__
from tachymail.cli import (
    commands,
    config_cmd,
    destinations_cmd,
    directory_cmd,
    dmarc_cmd,
    logs,
    mailauth_cmd,
    mailbox_cmd,
    suppression_cmd,
    token_cmd,
)

KERNELS = ("commands", "data", "mime", "imap")


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


def _json_option(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--json", action="store_true", help=text)


def _filter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state", choices=["active", "deferred", "held"], help="only messages in this state"
    )
    parser.add_argument(
        "--domain", metavar="DOMAIN", help="only messages with a pending recipient at DOMAIN"
    )
    parser.add_argument(
        "--sender",
        metavar="ADDRESS",
        help="only messages from this address, or from any address at this domain; "
        "'<>' for bounces (the null sender)",
    )
    parser.add_argument(
        "--older-than",
        "--age",
        dest="older_than",
        metavar="AGE",
        help="only messages at least this old: 90s, 30m, 2h, 1d (a bare number: minutes)",
    )
    parser.add_argument(
        "--reason",
        metavar="REGEX",
        help="only messages whose last reply (for a pending recipient) matches this "
        "regular expression (case-insensitive; a plain word matches as a substring)",
    )


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
        "127.0.0.1:2587 (submission), 127.0.0.1:2465 (smtps), 127.0.0.1:2110 (pop3), "
        "127.0.0.1:2995 (pop3s), 127.0.0.1:2143 (imap), 127.0.0.1:2993 (imaps) and "
        "127.0.0.1:2080 (http, the API), data in ./tachymail-data.",
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
        "--resolver",
        metavar="HOST:PORT",
        help="DNS server for every lookup: MX, and the inbound checks (default: system)",
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
    config_cmd.add_diff_parser(config_sub)

    logs.add_log_parser(sub)

    queue = sub.add_parser(
        "queue",
        help="inspect and manage the queue (safe while serving)",
        description="Inspect and manage the queue, live beside a running server. A message "
        "is active (due now or being delivered), deferred (waiting for its next attempt) "
        "or held (queue hold). Every action takes --json.",
    )
    queue_sub = queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    listing = queue_sub.add_parser(
        "list",
        help="list queued messages (state, next attempt, last reason); filters",
        description="One line per message: id, size, state, arrival, next attempt, sender "
        "-> pending recipients, and the last reason in parentheses. Filters combine (AND).",
    )
    _config_options(listing)
    _json_option(listing, "one JSON object per message and line")
    _filter_options(listing)
    summary = queue_sub.add_parser(
        "summary",
        help="pending recipients per destination domain by age and by state (like qshape)",
        description="Per recipient domain, the pending recipients: in total (T), by age in "
        "minutes (columns 5, 10, 20 ... 1280: up to that age; 1280+: older), and by their "
        "message's state; TOTAL first, then domains by size. Takes the filters of list.",
    )
    _config_options(summary)
    _json_option(summary, "the summary as one JSON object")
    _filter_options(summary)
    show = queue_sub.add_parser("show", help="show one message's envelope and headers")
    _config_options(show)
    show.add_argument("id", help="queue id")
    show.add_argument("--body", action="store_true", help="print the whole content too")
    _json_option(show, "one JSON object: envelope, state, headers (and content with --body)")
    count = queue_sub.add_parser("count", help="print the number of queued messages")
    _config_options(count)
    _json_option(count, "the total and the count by state, as one JSON object")
    flush = queue_sub.add_parser("flush", help="retry every deferred message now")
    _config_options(flush)
    _json_option(flush, "the outcome as one JSON object")
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
        _json_option(one, "the outcome as one JSON object")
    destinations_cmd.add_queue_parsers(queue_sub, _config_options)

    mailq = sub.add_parser(
        "mailq",
        help="print the queue as mailq / postqueue -p do",
        description="The queue in the layout of Postfix's postqueue -p: queue id (then * "
        "active, ! held), size, arrival time, sender, and each pending recipient under its "
        "deferral reason in parentheses; the footer '-- N Kbytes in M Requests.'. Also run "
        "as 'mailq' through a symlink to the tachymail script.",
    )
    _config_options(mailq)

    sub.add_parser(
        "sendmail",
        add_help=False,
        help="sendmail-compatible submission (tachymail sendmail --help for its options)",
    )

    directory_cmd.add_user_parser(sub)
    directory_cmd.add_alias_parser(sub)
    mailbox_cmd.add_mailbox_parser(sub)
    dmarc_cmd.add_dmarc_parser(sub)
    mailauth_cmd.add_mailauth_parser(sub)
    suppression_cmd.add_suppression_parser(sub)
    token_cmd.add_token_parser(sub)

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
    """Run the command line *argv* (default: this process's arguments); the exit status.

    Called through a symlink named ``sendmail`` or ``mailq`` (``/usr/sbin/sendmail`` ->
    the tachymail script), the arguments are sendmail's or mailq's.
    """
    from tachymail.cli import sendmail

    if argv is None:
        called = Path(sys.argv[0]).name
        argv = sys.argv[1:]
        if called == "sendmail":
            return sendmail.main(argv, prog="sendmail")
        if called == "mailq":
            return sendmail.mailq_main(argv)
    if argv and argv[0] == "sendmail":
        # sendmail's own option syntax (-oi, -bs, -f addr, recipients anywhere), exit
        # statuses from sysexits.h: not an argparse subcommand
        return sendmail.main(argv[1:])
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
    # Subcommands in modules of their own name their handler; the rest are in commands.
    handler = getattr(args, "handler", None) or getattr(commands, f"cmd_{args.command}")
    result: int = handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
