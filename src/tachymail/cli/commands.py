"""The subcommands of ``tachymail``: thin bridges from parsed arguments to the packages."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

from tachymail.config import Config, ConfigError, load

if TYPE_CHECKING:
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
    from tachymail.smtp.supervisor import Supervisor, apply_overrides

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
    from tachymail.metrics.logs import use_format

    use_format(config.log.format)
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
    where = args.file or "embedded defaults"
    listeners = ", ".join(f"{lst.address} ({lst.role})" for lst in config.listeners)
    print(f"{where}: ok — listeners {listeners}; data in {config.data_path}")
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    import lmdb

    from tachymail.queue.store import QueueStore

    if args.queue_command in ("flush", "delete", "hold", "release", "bounce"):
        return _queue_admin(args)
    try:
        config = _config(args)
        store = QueueStore(config.data_path / "queue", readonly=True)
    except ConfigError as exc:
        return _fail(f"invalid configuration:\n{exc}")
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
    """count, list, show: from one read-only store (nothing is written, even on a full disk)."""
    if args.queue_command == "count":
        print(store.count())
    elif args.queue_command == "list":
        for envelope in store.iter_envelopes():
            if args.json:
                print(json.dumps(envelope.summary()))
            else:
                rcpts = ", ".join(r.address for r in envelope.recipients)
                print(
                    f"{envelope.id}  {envelope.size:>9}  {envelope.state:<7} "
                    f"<{envelope.sender}> -> {rcpts}"
                )
    elif args.queue_command == "show":
        found = store.envelope(args.id)
        if found is None:
            return _fail(f"no message {args.id} in the queue")
        print(json.dumps(found.summary(), indent=2))
        content = store.content(args.id) or b""
        end = content.find(b"\r\n\r\n")
        shown = content if args.body or end < 0 else content[: end + 2]
        sys.stdout.write("\n" + shown.decode("utf-8", "replace"))
    return 0


def cmd_user(args: argparse.Namespace) -> int:
    from tachymail.auth.users import UsersFile

    try:
        config = _config(args)
    except ConfigError as exc:
        return _fail(f"invalid configuration:\n{exc}")
    users = UsersFile(config.users_path)
    if args.user_command == "list":
        for name in sorted(users.users()):
            print(name)
        return 0
    if args.user_command == "del":
        if not users.delete(args.name):
            return _fail(f"no user {args.name!r}")
        return 0
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if password != getpass.getpass("again: "):
            return _fail("the passwords differ")
    if not password:
        return _fail("empty password")
    try:
        users.add(args.name, password)
    except ValueError as exc:
        return _fail(str(exc))
    print(f"user {args.name} saved in {users.path}")
    return 0


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
    try:
        changed = admin.run(store, config, action, target)
        if store.reserve_spent:
            print(
                f"{action}: the disk was full; the queue's reserve file "
                f"({store.reserve_spent / MiB:.1f} MiB) was deleted to make room for this "
                "commit (it is made again at the next start or queue command with room)"
            )
        store.ensure_reserve()
    except StorageFull as exc:
        hint = "" if action == "delete" else "; free space, or delete messages first"
        return _fail(f"queue {action}: no room on the queue's disk ({exc}){hint}")
    except (lmdb.Error, OSError) as exc:
        return _fail(f"queue {action}: storage error: {exc}")
    finally:
        store.close()
    if target is not None and not changed:
        return _fail(f"no message {target} in the queue")
    print(f"{action}: {changed} message(s)")
    return 0


def cmd_dkim(args: argparse.Namespace) -> int:
    from tachymail.delivery.dkim import keygen

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
