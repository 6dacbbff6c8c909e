"""The webhook sender: POSTs the outbox's events to each ``[[webhook]]``, in order.

One sender per node, in delivery worker 0 (:mod:`tachymail.delivery.worker`), so the
events of one message leave in the order they were recorded. It does two things:

- fans recorded events out (:func:`tachymail.queue.events.fan_out`) into one outbox
  key space per webhook that wants their type, a page at a time;
- for each webhook, in its own task, reads the oldest events of its key space (up to
  ``batch_size``; a short batch waits ``batch_ms`` for company), POSTs them as one JSON
  array, and removes them from the outbox only once the receiver answered 2xx, in a
  synced commit. Any other answer, a timeout or a connection failure is retried with
  exponential back-off (1 s doubling to 5 minutes, with jitter) and the same events
  first: a receiver never sees an event before an older one of the same webhook.

A webhook that is down holds up no other (each has its own key space and task). An event
may be POSTed twice (the process dies between the 2xx and the commit, or a reload runs
two senders for a moment): delivery is at least once, and the receiver deduplicates on
the event's ``id``.

Each POST carries ``Content-Type: application/json`` and, when the webhook has a
``secret``, ``X-Tachymail-Signature: sha256=<hex>``: the HMAC-SHA256 of the exact body
bytes with the secret as key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import time

import aiohttp
import lmdb

from tachymail.config import Config, WebhookConfig
from tachymail.metrics import m
from tachymail.queue import events
from tachymail.queue.commit import GroupCommitter
from tachymail.queue.store import QueueStore

log = logging.getLogger(__name__)

#: seconds between looks at the outbox for newly recorded events
POLL = 0.1
#: recorded events fanned out per commit
FAN_OUT_PAGE = 1000
#: the retry back-off: first delay and longest delay, in seconds
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 300.0
SIGNATURE_HEADER = "X-Tachymail-Signature"


def signature(secret: str, body: bytes) -> str:
    """The ``X-Tachymail-Signature`` value of *body*: ``sha256=`` and the hex HMAC."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def backoff(failures: int) -> float:
    """Seconds to wait after *failures* failures in a row: 1 s doubling to 5 minutes,
    times a random factor between 0.8 and 1.2 (receivers coming back are not hit by
    every node at once), never above 5 minutes."""
    base = min(BACKOFF_MAX, BACKOFF_FIRST * float(2 ** min(max(failures - 1, 0), 20)))
    return min(BACKOFF_MAX, base * random.uniform(0.8, 1.2))


class WebhookSender:
    """Fans out and sends the node's events (see the module docstring).

    :meth:`run` returns once *stop* is set; events not yet acknowledged stay in the
    outbox for the next start.
    """

    def __init__(self, config: Config, store: QueueStore, committer: GroupCommitter) -> None:
        self.store = store
        self.committer = committer
        self.webhooks = list(config.webhooks)
        self.routes = {hook.key: hook.wanted for hook in self.webhooks}
        #: set when new events reached the webhooks' key spaces
        self.fanned = {hook.key: asyncio.Event() for hook in self.webhooks}
        #: counters for tests and logs
        self.posted = 0
        self.failures = 0

    async def run(self, stop: asyncio.Event) -> None:
        self._report_orphans()
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            tasks = [asyncio.create_task(self._fan_out(stop))]
            tasks += [
                asyncio.create_task(self._send(hook, session, stop)) for hook in self.webhooks
            ]
            try:
                await stop.wait()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def _report_orphans(self) -> None:
        try:
            waiting = events.outboxes(self.store)
        except lmdb.Error as exc:
            log.error("webhooks: cannot read the outbox: %s", exc)
            return
        for name, n in waiting.items():
            if name not in self.routes:
                log.warning(
                    "webhooks: %d events wait in the outbox of %r, which is no longer "
                    "configured; they are kept until a [[webhook]] of that name returns",
                    n,
                    name,
                )

    async def _fan_out(self, stop: asyncio.Event) -> None:
        """Move recorded events into the webhooks' key spaces, a page per commit."""
        while not stop.is_set():
            try:
                entries = events.incoming(self.store, FAN_OUT_PAGE)
                if entries:
                    await self.committer.submit_operation(events.fan_out(entries, self.routes))
                    for name, fanned in self.fanned.items():
                        fanned.set()
                        # also while its sender waits out a back-off
                        m.webhook_outbox_depth.labels(name).set(events.depth(self.store, name))
                    if len(entries) == FAN_OUT_PAGE:
                        continue  # more waiting: no pause
            except Exception as exc:  # a full disk, a read error: try again shortly
                log.error("webhooks: fanning out events failed: %s", exc)
                await _wait(stop, 1.0)
                continue
            await _wait(stop, POLL)

    async def _send(
        self, hook: WebhookConfig, session: aiohttp.ClientSession, stop: asyncio.Event
    ) -> None:
        """Deliver webhook *hook*'s events, oldest first, until *stop*."""
        name = hook.key
        fanned = self.fanned[name]
        depth = m.webhook_outbox_depth.labels(name)
        failures = 0
        waiting_since: float | None = None
        while not stop.is_set():
            fanned.clear()
            try:
                page = events.pending(self.store, name, hook.batch_size)
                depth.set(events.depth(self.store, name))
            except lmdb.Error as exc:
                log.error("webhook %s: cannot read the outbox: %s", name, exc)
                await _wait(stop, 1.0)
                continue
            if not page:
                waiting_since = None
                await _wait(stop, 1.0, fanned)
                continue
            if len(page) < hook.batch_size and hook.batch_ms:
                # A short batch waits for company, from when it was first seen.
                now = time.monotonic()
                if waiting_since is None:
                    waiting_since = now
                left = waiting_since + hook.batch_ms / 1000 - now
                if left > 0:
                    await _wait(stop, min(left, POLL * 5), fanned)
                    continue
            waiting_since = None
            body = b"[" + b",".join(value for _, value in page) + b"]"
            problem = await self._post(hook, session, body, len(page))
            if problem is None:
                failures = 0
                try:
                    await self.committer.submit_operation(
                        events.remove(name, [key for key, _ in page])
                    )
                except Exception as exc:  # sent again later: at least once
                    log.error("webhook %s: removing sent events failed: %s", name, exc)
                    await _wait(stop, 1.0)
                continue
            failures += 1
            delay = backoff(failures)
            log.warning(
                "webhook %s: POST of %d events to %s failed (%s; %d in a row); retry in %.1fs",
                name,
                len(page),
                hook.url,
                problem,
                failures,
                delay,
            )
            await _wait(stop, delay)

    async def _post(
        self, hook: WebhookConfig, session: aiohttp.ClientSession, body: bytes, count: int
    ) -> str | None:
        """POST *body* to *hook*: None when it answered 2xx, else what went wrong."""
        headers = {"Content-Type": "application/json", "User-Agent": "Tachymail"}
        if hook.secret:
            headers[SIGNATURE_HEADER] = signature(hook.secret, body)
        name = hook.key
        try:
            async with session.post(
                hook.url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=hook.timeout),
            ) as response:
                status = response.status
        except TimeoutError:
            result, detail = "timeout", f"no answer within {hook.timeout}s"
        except (aiohttp.ClientError, OSError) as exc:
            result, detail = "connection_error", str(exc) or type(exc).__name__
        else:
            if 200 <= status < 300:
                m.webhook_posts.labels(name, "ok").inc()
                self.posted += count
                return None
            result, detail = "http_error", f"answered {status}"
        m.webhook_posts.labels(name, result).inc()
        m.webhook_failures.labels(name).inc()
        self.failures += 1
        return detail


async def _wait(stop: asyncio.Event, seconds: float, wake: asyncio.Event | None = None) -> None:
    """Sleep *seconds*, or less when *stop* (or *wake*) is set."""
    waits = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waits.append(asyncio.ensure_future(wake.wait()))
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()
