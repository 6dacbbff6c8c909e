"""A delivery worker process: one uvloop event loop running a DeliveryWorker."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys

import uvloop

from tachymail import metrics
from tachymail.cluster.replication import replicate
from tachymail.config import Config
from tachymail.delivery.local import LocalDelivery
from tachymail.delivery.scheduler import DeliveryWorker
from tachymail.delivery.webhooks import WebhookSender
from tachymail.queue.commit import GroupCommitter
from tachymail.queue.store import MiB, QueueStore

log = logging.getLogger(__name__)


async def serve_delivery(config: Config, index: int, count: int) -> int:
    loop = asyncio.get_running_loop()
    store = QueueStore(
        config.data_path / "queue",
        map_size=config.queue.map_size_mb * MiB,
        max_map_size=config.queue.max_map_size_mb * MiB,
        # Delivery results may be lost in a power cut at worst: the message then goes again.
        metasync=False,
    )
    # Results wait up to 10 ms for company, and commit in the loop: see tachymail.queue.commit.
    committer = GroupCommitter(store, max_batch=config.queue.max_batch, linger=0.01, inline=True)
    # The mailbox store opens now when some domain is local, else when one appears (made
    # by LMTP or the CLI) or on the first local hop; its gauges read 0 until then.
    local = LocalDelivery(config)
    local.queue = committer  # vacation replies
    if config.local_delivery_domains:
        local.open()
    else:
        local.update_gauges(force=True)
    worker = DeliveryWorker(config, index, count, store, committer, local)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the supervisor handles reloads
    log.info("delivery worker %d/%d (pid %d) started", index, count, os.getpid())
    gc.collect()  # the start-up heap out of every later full collection: see serve_worker
    gc.freeze()
    parent = os.getppid()
    runner = loop.create_task(worker.run(stop))
    # One webhook sender per node keeps each message's events in order: worker 0's.
    sender = WebhookSender(config, store, committer) if index == 0 and config.webhooks else None
    sending = loop.create_task(sender.run(stop)) if sender is not None else None
    # One replicator per node shares the suppression list and suspensions: worker 0's.
    replicating = (
        loop.create_task(replicate(config, worker.gate.suspensions, stop)) if index == 0 else None
    )
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except TimeoutError:
            local.update_gauges()
            metrics.flush()  # the hot-path tallies reach /metrics within about a second
            if os.getppid() != parent:
                log.warning("delivery worker %d: supervisor died, shutting down", index)
                stop.set()
    try:
        await asyncio.wait_for(runner, config.server.drain_timeout)
    except TimeoutError:
        log.warning(
            "delivery worker %d: %d messages still in flight at exit; they stay queued",
            index,
            len(worker.active),
        )
    if sending is not None:  # unacknowledged events stay in the outbox for the next start
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sending, 5.0)
    if replicating is not None:  # what it did not push stays in the outbox for the next start
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(replicating, 5.0)
    while not (committer.idle and local.idle):
        await asyncio.sleep(0.01)
    committer.close()
    local.close()
    worker.log.close()
    store.close()
    log.info(
        "delivery worker %d stopped: %d attempts, %d delivered",
        index,
        worker.attempts,
        worker.delivered,
    )
    return 0


def run_delivery_worker(config: Config, index: int, count: int) -> int:
    """Entry point in the forked child."""
    sys.setswitchinterval(0.0002)  # see tachymail.smtp.worker.run_worker
    return uvloop.run(serve_delivery(config, index, count))
