"""``tachymail log MESSAGE-ID|QUEUE-ID``: one message's whole story, read from the logs."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Iterator

from tachymail.config import ConfigError, load


def add_log_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``tachymail log``."""
    parser = sub.add_parser(
        "log",
        help="show a message's whole story (intake, every attempt, outcome) from the logs",
        description="Print every log line about one message, by its Message-ID or its queue "
        "id: the intake, each delivery attempt per recipient, the session that brought it; "
        "then a summary with each recipient's last result and the outcome. Reads the "
        'configured log file ([log] target = "file"), the files given with --file (in '
        "order: rotated ones first), or standard input (e.g. journalctl -t tachymail -o cat "
        "| tachymail log ID). Any of the text, json and logfmt formats.",
    )
    parser.add_argument("id", metavar="MESSAGE-ID|QUEUE-ID", help="<id@host> or a queue id")
    parser.add_argument("-c", "--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument("--data-dir", metavar="DIR", help="data directory (for the default path)")
    parser.add_argument(
        "--file",
        action="append",
        metavar="FILE",
        help="a log file to read instead of the configured one ('-': standard input); repeatable",
    )
    parser.set_defaults(handler=cmd_log)


def _sources(args: argparse.Namespace) -> list[str] | str:
    """The files to read ("-" is stdin), or why there is none."""
    if args.file:
        return list(args.file)
    config = load(args.config)
    if args.data_dir:
        config.server.data_dir = args.data_dir
    if config.log.target == "file":
        return [str(config.log_path)]
    if not sys.stdin.isatty():
        return ["-"]
    return (
        f"the log goes to {config.log.target}, not to a file: give --file FILE, or pipe the "
        "lines in (journalctl -t tachymail -o cat | tachymail log ID)"
    )


def cmd_log(args: argparse.Namespace) -> int:
    """Exit 0 with the story on stdout; 1 when no line mentions the id; 2 on a bad source."""
    from tachymail.metrics.logs import print_stories, story

    try:
        sources = _sources(args)
    except ConfigError as exc:
        print(f"tachymail: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    if isinstance(sources, str):
        print(f"tachymail: {sources}", file=sys.stderr)
        return 2
    for name in sources:
        if name != "-":
            try:
                with open(name, encoding="utf-8", errors="replace"):
                    pass
            except OSError as exc:
                print(f"tachymail: cannot read {name}: {exc.strerror}", file=sys.stderr)
                return 2
    # Files are streamed, twice for a Message-ID; standard input, readable once only, is
    # spooled to a temporary file for the second pass.
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as spool:
        if "-" in sources:
            shutil.copyfileobj(sys.stdin, spool)

        def lines() -> Iterator[str]:
            for name in sources:
                if name == "-":
                    spool.seek(0)
                    yield from (line.rstrip("\r\n") for line in spool)
                else:
                    with open(name, encoding="utf-8", errors="replace") as handle:
                        yield from (line.rstrip("\r\n") for line in handle)

        found = story(lines, args.id.strip())
    if not found:
        print(f"tachymail: no log line mentions {args.id} in {', '.join(sources)}", file=sys.stderr)
        return 1
    print_stories(found)
    return 0
