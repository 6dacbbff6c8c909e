"""``tachymail queue suspend|resume|destinations``: stop and restart deliveries to a
destination, and see each destination's state.

They work beside a running server: the suspensions are an LMDB environment of their own
(data_dir/suspensions) that the delivery workers look at every second, and the status
comes from the files the delivery workers publish (tachymail.queue.destinations). Exit
status 0; 2 with one line on stderr for a bad argument, configuration or storage error;
``resume`` of a destination that was not suspended is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from tachymail.cli.commands import _config, _fail
from tachymail.config import ConfigError


def add_queue_parsers(queue_sub: Any, config_options: Any) -> None:
    """Register ``suspend``, ``resume`` and ``destinations`` on the ``queue`` subparsers;
    *config_options* adds -c/--data-dir to a parser."""
    suspend = queue_sub.add_parser(
        "suspend",
        help="stop deliveries to a domain or mail host (until resumed, or for a while)",
        description="Stop deliveries to DEST: a recipient domain (example.com), a mail host "
        "of the next hop (mx1.example.com, or an IP address), or every name below a domain "
        "(*.example.com). Its recipients stay queued, with no attempt counted and no DSN, "
        "and go again when the suspension ends. Attempts under way finish. Suspending DEST "
        "again replaces its suspension.",
    )
    suspend.set_defaults(handler=cmd_suspend)
    config_options(suspend)
    suspend.add_argument("destination", metavar="DEST", help="domain, mail host or *.domain")
    until = suspend.add_mutually_exclusive_group()
    until.add_argument(
        "--for",
        dest="duration",
        metavar="DURATION",
        help="lift it by itself after DURATION: 90s, 30m, 2h, 1d, 1w",
    )
    until.add_argument("--until", metavar="EPOCH", help="lift it by itself at EPOCH (seconds)")
    suspend.add_argument("--reason", default="", help="why (shown in the listing and the API)")
    suspend.add_argument("--json", action="store_true", help="the suspension as JSON")
    resume = queue_sub.add_parser(
        "resume",
        help="resume deliveries to a suspended destination",
        description="End the suspension of DEST (named as it was suspended); the recipients "
        "it held back go within a second or so (within a minute after a restart).",
    )
    resume.set_defaults(handler=cmd_resume)
    config_options(resume)
    resume.add_argument("destination", metavar="DEST", help="domain, mail host or *.domain")
    resume.add_argument("--json", action="store_true", help="the outcome as JSON")
    listing = queue_sub.add_parser(
        "destinations",
        help="per destination: queued, in flight, connections, rate, last error, suspension",
        description="One line per destination: every recipient domain with pending "
        "recipients, every domain a delivery worker is working on, every suspended "
        "destination. CONN: open connections of the domain's next hop; RATE: attempts per "
        "second over the last minute.",
    )
    listing.set_defaults(handler=cmd_destinations)
    config_options(listing)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")


def cmd_suspend(args: argparse.Namespace) -> int:
    import lmdb

    from tachymail.queue.suspensions import SuspensionError, Suspensions, parse_until

    try:
        config = _config(args)
        until = parse_until(args.duration or args.until)
    except ConfigError as exc:
        return _fail(f"invalid configuration:\n{exc}")
    except SuspensionError as exc:
        return _fail(f"queue suspend: {exc}")
    try:
        suspensions = Suspensions(config.data_path)
    except (lmdb.Error, OSError) as exc:  # one line, not a traceback
        return _fail(f"queue suspend: cannot open the suspensions: {exc}")
    try:
        suspension = suspensions.suspend(args.destination, until, args.reason)
    except SuspensionError as exc:
        return _fail(f"queue suspend: {exc}")
    except (lmdb.Error, OSError) as exc:
        return _fail(f"queue suspend: storage error: {exc}")
    finally:
        suspensions.close()
    if args.json:
        print(json.dumps(suspension.as_dict()))
    else:
        print(f"suspended: {suspension.destination} {_until_text(suspension.until)}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    import lmdb

    from tachymail.queue.suspensions import SuspensionError, Suspensions, normalize_destination

    try:
        config = _config(args)
        name = normalize_destination(args.destination)
    except ConfigError as exc:
        return _fail(f"invalid configuration:\n{exc}")
    except SuspensionError as exc:
        return _fail(f"queue resume: {exc}")
    try:
        suspensions = Suspensions(config.data_path)
    except (lmdb.Error, OSError) as exc:
        return _fail(f"queue resume: cannot open the suspensions: {exc}")
    try:
        resumed = suspensions.resume(name)
    except (lmdb.Error, OSError) as exc:
        return _fail(f"queue resume: storage error: {exc}")
    finally:
        suspensions.close()
    if args.json:
        print(json.dumps({"destination": name, "resumed": resumed}))
    elif resumed:
        print(f"resumed: {name}")
    else:
        print(f"queue resume: {name} was not suspended", file=sys.stderr)
    return 0 if resumed else 1


def cmd_destinations(args: argparse.Namespace) -> int:
    import lmdb

    from tachymail.queue.destinations import QueueCounts, merge, queue_counts, read_statuses
    from tachymail.queue.store import QueueStore
    from tachymail.queue.suspensions import Suspensions

    try:
        config = _config(args)
    except ConfigError as exc:
        return _fail(f"invalid configuration:\n{exc}")
    data_path = config.data_path
    now = time.time()
    try:
        suspensions = Suspensions(data_path)
        try:
            table = suspensions.active(now)
        finally:
            suspensions.close()
    except (lmdb.Error, OSError) as exc:
        return _fail(f"queue destinations: cannot read the suspensions: {exc}")
    counts = QueueCounts({}, 0, True)
    if (data_path / "queue" / "data.mdb").exists():
        try:
            store = QueueStore(data_path / "queue", readonly=True)
            try:
                counts = queue_counts(store)
            finally:
                store.close()
        except (lmdb.Error, OSError) as exc:
            return _fail(f"queue destinations: cannot read the queue: {exc}")
    entries = merge(read_statuses(data_path, now), counts, table, now)
    if args.json:
        for entry in entries:
            print(json.dumps(entry))
        return 0
    print(_table(entries, now))
    if not counts.exact:
        print(f"(queue counted over its first {counts.messages} messages only)")
    return 0


def _until_text(until: float) -> str:
    if not until:
        return "until resumed"
    return "until " + time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until))


def _table(entries: list[dict[str, Any]], now: float) -> str:
    head = ("DESTINATION", "QUEUED", "IN-FLIGHT", "CONN", "RATE/S", "SUSPENDED", "LAST ERROR")
    rows = [head]
    for entry in entries:
        suspension = entry["suspension"]
        suspended = "-"
        if suspension is not None:
            suspended = _until_text(suspension["until"])
            if suspension["destination"] != entry["destination"]:
                suspended += f" (as {suspension['destination']})"
            if suspension["reason"]:
                suspended += f": {suspension['reason']}"
        error = entry["last_error"]
        last = "-"
        if error:
            last = f"{error['reply']} ({max(0, now - error['time']):.0f}s ago)"
        rows.append(
            (
                entry["destination"],
                str(entry["queued"]),
                str(entry["in_flight"]),
                str(entry["connections"]),
                f"{entry['attempts_per_second']:.2f}",
                suspended,
                last,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join(
            [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)] + [row[-1]]
        )
        for row in rows
    )
