"""The subcommands of ``tachymail``: thin bridges from parsed arguments to the packages."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

from tachymail.config import Config, ConfigError, load

if TYPE_CHECKING:
    from tachymail.queue.admin import Reporter
    from tachymail.queue.select import MessageFilter
    from tachymail.queue.store import QueueStore


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _config(args: argparse.Namespace) -> Config:
    """The configuration named by -c (or the defaults), with --data-dir applied."""
    config = load(getattr(args, "config", None))
    if getattr(args, "data_dir", None):
        config.server.data_dir = args.data_dir
    return config


def _fail(message: str) -> int:
    print(f"tachymail: {message}", file=sys.stderr)
    return 2


def cmd_serve(args: argparse.Namespace) -> int:
    from tachymail.cli.supervisor import Supervisor, apply_overrides

    _setup_logging(args.log_level)
    overrides: dict[str, Any] = {}
    if args.listen:
        overrides["listen"] = args.listen
    if args.data_dir:
        overrides["data_dir"] = args.data_dir
    if args.workers is not None:
        overrides["workers"] = args.workers
    if args.hold:
        overrides["hold"] = True
    if args.smarthost:
        overrides["smarthost"] = args.smarthost
    if args.resolver:
        overrides["resolver"] = args.resolver
    if args.metrics is not None:
        overrides["metrics"] = args.metrics
    try:
        config = apply_overrides(load(args.config), overrides)
    except ConfigError as exc:
        return _fail(f"invalid configuration:\n{exc}")
    from tachymail.delivery.classify import rules_problems
    from tachymail.delivery.shaping import problems as shaping_problems

    if problems := rules_problems(config) + shaping_problems(config):
        return _fail("invalid configuration:\n" + "\n".join(problems))
    from tachymail.metrics.logs import configure

    try:
        where = configure(config.log, config.log_path)
    except OSError as exc:
        return _fail(str(exc))
    if where != "stderr":  # said where the operator started it: the lines go elsewhere now
        print(f"tachymail: logging to {where}", file=sys.stderr, flush=True)
    return Supervisor(config, overrides).run()


def cmd_config(args: argparse.Namespace) -> int:
    if args.config_command == "defaults":
        from tachymail.config import defaults_toml

        print(defaults_toml(), end="")
        return 0
    try:
        config = load(args.file)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    from tachymail.delivery.classify import rules_problems
    from tachymail.delivery.shaping import problems as shaping_problems

    # The rules and shaping files are read by the delivery layer, which config may not import.
    problems = rules_problems(config) + shaping_problems(config)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return 1
    where = args.file or "embedded defaults"
    listeners = ", ".join(f"{lst.address} ({lst.role})" for lst in config.listeners)
    print(f"{where}: ok — listeners {listeners}; data in {config.data_path}")
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    if args.queue_command in ("flush", "delete", "hold", "release", "bounce"):
        return _queue_admin(args)
    try:
        config = _config(args)
    except ConfigError as exc:
        return _fail(f"invalid configuration:\n{exc}")
    return queue_read_with(args, config)


def queue_read_with(args: argparse.Namespace, config: Config) -> int:
    """count, list, show, summary, mailq on the queue of *config*: exit status 2 with one
    line on stderr when the queue is missing or unreadable."""
    import lmdb

    from tachymail.queue.store import QueueStore

    try:
        store = QueueStore(config.data_path / "queue", readonly=True)
    except FileNotFoundError as exc:
        return _fail(str(exc))
    except (lmdb.Error, OSError) as exc:
        return _fail(f"queue {args.queue_command}: cannot open the queue: {exc}")
    try:
        return _queue_read(args, store)
    except (lmdb.Error, OSError) as exc:
        return _fail(f"queue {args.queue_command}: cannot read the queue: {exc}")
    finally:
        store.close()


def _queue_read(args: argparse.Namespace, store: QueueStore) -> int:
    """count, list, show, summary, mailq: from one read-only store (nothing is written,
    even on a full disk); states are decided once, at one instant."""
    import time

    from tachymail.cli import queueview
    from tachymail.queue.stats import STATES, message_state, queue_shape

    now = time.time()
    command = args.queue_command
    if command == "count":
        if not args.json:
            print(store.count())
            return 0
        counts = dict.fromkeys(STATES, 0)
        for envelope in store.iter_envelopes():
            counts[message_state(envelope, now)] += 1
        print(json.dumps({"total": sum(counts.values()), **counts}))
    elif command == "list":
        try:
            chosen = _message_filter(args)
        except ValueError as exc:
            return _fail(f"queue list: {exc}")
        total = store.count()
        listed = (e for e in store.iter_envelopes() if chosen.matches(e, now))
        queueview.print_list(listed, now, sys.stdout, as_json=args.json, total=total)
    elif command == "summary":
        try:
            chosen = _message_filter(args)
        except ValueError as exc:
            return _fail(f"queue summary: {exc}")
        shape = queue_shape((e for e in store.iter_envelopes() if chosen.matches(e, now)), now)
        if args.json:
            print(json.dumps(shape.as_dict()))
        else:
            queueview.print_summary(shape, sys.stdout)
    elif command == "mailq":
        queueview.print_mailq(store.iter_envelopes(), now, sys.stdout)
    elif command == "show":
        found = store.envelope(args.id)
        if found is None:
            return _fail(f"no message {args.id} in the queue")
        content = store.content(args.id) or b""
        shown = queueview.show_data(found, content, now, body=args.body)
        if args.json:
            print(json.dumps(shown))
            return 0
        text = shown.pop("content", None) or shown.pop("headers")
        shown.pop("headers", None)
        print(json.dumps(shown, indent=2))
        sys.stdout.write("\n" + text)
    return 0


def _message_filter(args: argparse.Namespace) -> MessageFilter:
    """The filters of `queue list` / `queue summary`; raises ValueError for a bad age or
    regular expression."""
    from tachymail.queue.select import MessageFilter, compile_reason, parse_age

    try:
        older_than = None if args.older_than is None else parse_age(args.older_than)
    except ValueError as exc:
        raise ValueError(f"--older-than: {exc}") from None
    try:
        reason = None if args.reason is None else compile_reason(args.reason)
    except ValueError as exc:
        raise ValueError(f"--reason: {exc}") from None
    return MessageFilter(
        state=args.state,
        domain=args.domain,
        sender=args.sender,
        older_than=older_than,
        reason=reason,
    )


def cmd_mailq(args: argparse.Namespace) -> int:
    """`tachymail mailq` (and a `mailq` symlink): the queue as postqueue -p prints it."""
    args.queue_command = "mailq"
    return cmd_queue(args)


def _bounce_reporter(config: Config) -> Reporter:
    """The report builder `queue bounce` queues with: the delivery package's, the one
    the delivery worker uses (the CLI composes queue and delivery; neither imports the
    other's way)."""
    import functools
    import socket

    from tachymail.delivery.bounce import operator_bounce

    hostname = config.server.hostname or socket.getfqdn()
    return functools.partial(operator_bounce, reporting_mta=hostname)


def _queue_admin(args: argparse.Namespace) -> int:
    """flush, delete, hold, release, bounce: one write transaction on the live queue.

    A storage error (a full disk above all) is one line on stderr and exit status 2,
    never a traceback; on a full disk, delete still works (it spends the queue's reserve
    file, see ``queue.reserve_mb``) and says so.
    """
    import lmdb

    from tachymail.queue import admin
    from tachymail.queue.store import MiB, QueueStore, StorageFull

    action = args.queue_command
    target = None if action == "flush" or getattr(args, "all", False) else args.id
    if action != "flush" and target is None and not args.all:
        return _fail(f"queue {action}: name a queue id or --all")
    try:
        config = _config(args)
        if not (config.data_path / "queue" / "data.mdb").exists():
            return _fail(f"no queue at {config.data_path / 'queue'} (wrong --data-dir?)")
        store = QueueStore(config.data_path / "queue", reserve=config.queue.reserve_mb * MiB)
    except ConfigError as exc:
        return _fail(f"invalid configuration:\n{exc}")
    except (lmdb.Error, OSError) as exc:
        return _fail(f"queue {action}: cannot open the queue: {exc}")
    unchanged = None
    try:
        changed = admin.run(store, config, action, target, _bounce_reporter(config))
        if target is not None and not changed:
            unchanged = store.envelope(target)  # there but already so, or gone?
        if store.reserve_spent:
            print(
                f"{action}: the disk was full; the queue's reserve file "
                f"({store.reserve_spent / MiB:.1f} MiB) was deleted to make room for this "
                "commit (it is made again at the next start or queue command with room)",
                file=sys.stderr if args.json else sys.stdout,
            )
        store.ensure_reserve()
    except StorageFull as exc:
        hint = "" if action == "delete" else "; free space, or delete messages first"
        return _fail(f"queue {action}: no room on the queue's disk ({exc}){hint}")
    except (lmdb.Error, OSError) as exc:
        return _fail(f"queue {action}: storage error: {exc}")
    finally:
        store.close()
    if target is not None and not changed and unchanged is None:
        return _fail(f"no message {target} in the queue")
    note = ""
    if unchanged is not None:
        # The message is there, already as asked: say so, and it is no failure.
        note = {"hold": "is already held", "release": "is not held"}.get(action, "is unchanged")
    if args.json:
        done: dict[str, Any] = {"action": action, "changed": changed}
        if note:
            done.update(id=target, note=note)
        print(json.dumps(done))
    elif note:
        print(f"{action}: {target} {note}")
    else:
        print(f"{action}: {changed} message(s)")
    return 0


def cmd_dkim(args: argparse.Namespace) -> int:
    from tachymail.mailauth.dkim import keygen

    try:
        config = _config(args)
        record = keygen(
            config.data_path, args.domain, args.selector, args.algorithm, force=args.force
        )
    except ConfigError as exc:
        return _fail(f"invalid configuration:\n{exc}")
    except (ValueError, FileExistsError) as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot write the key: {exc}")
    print(record)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tachymail.loadtest import generator

    _setup_logging(args.log_level)
    return generator.main(args)


def cmd_sink(args: argparse.Namespace) -> int:
    from tachymail.loadtest import sink

    _setup_logging(args.log_level)
    return sink.main(args)
