"""This node's link to Redis: one asyncio client, with the health state that decides when
to use Redis and when to fall back to the local share.

Every call goes through :meth:`Cluster.call`, which bounds it by ``cluster.timeout``.
A failed or slow call marks Redis down (logged once, counted in
``tachymail_cluster_redis_errors_total``); while it is down, calls return
:data:`UNAVAILABLE` at once without touching the network, and one probe every
``cluster.retry_interval`` seconds finds out whether it is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tachymail.config import Config
from tachymail.metrics import m

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class _Unavailable:
    """The result of a call made while Redis is away: use the local share."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "UNAVAILABLE"


UNAVAILABLE: Final = _Unavailable()


class Cluster:
    """The cluster as seen from one process (see the module docstring)."""

    def __init__(self, config: Config) -> None:
        settings = config.cluster
        self.settings = settings
        self.enabled = bool(settings.redis)
        self.node = settings.node or config.server.hostname
        self.prefix = settings.key_prefix
        #: the share of a cluster limit this node uses while Redis is away
        self.fallback_share = settings.fallback_share or 1.0 / settings.nodes
        self.client: aioredis.Redis | None = None
        if self.enabled:
            self.client = aioredis.Redis.from_url(
                settings.redis,
                socket_timeout=settings.timeout,
                socket_connect_timeout=settings.timeout,
                # One connection per concurrent call; the calls are few (batched grants).
                max_connections=64,
                health_check_interval=0,
                # A pooled connection that died with a restarted Redis: one retry on a new
                # one, rather than calling Redis down for retry_interval.
                retry=Retry(NoBackoff(), 1),
            )
        self.up = self.enabled
        self.down_since = 0.0
        self.next_probe = 0.0
        m.cluster_redis_up.set(1 if self.enabled else 0)

    def key(self, *parts: str) -> str:
        """A key of this cluster: ``PREFIX:part:part``."""
        return ":".join((self.prefix, *parts))

    @property
    def usable(self) -> bool:
        """Whether to try Redis now: it is up, or it is time to probe it again."""
        if not self.enabled:
            return False
        return self.up or time.monotonic() >= self.next_probe

    async def call(self, work: Callable[[aioredis.Redis], Awaitable[_T]]) -> _T | _Unavailable:
        """``await work(client)`` within the timeout, or UNAVAILABLE when Redis is away."""
        client = self.client
        if client is None or not self.usable:
            return UNAVAILABLE
        try:
            result = await asyncio.wait_for(work(client), self.settings.timeout)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return UNAVAILABLE
        if not self.up:
            log.warning(
                "cluster: Redis is back after %.0fs; shared limits resume",
                time.monotonic() - self.down_since,
            )
            self.up = True
            m.cluster_redis_up.set(1)
        return result

    def _failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self.next_probe = now + self.settings.retry_interval
        m.cluster_redis_errors.inc()
        if self.up:
            self.up = False
            self.down_since = now
            m.cluster_redis_up.set(0)
            log.error(
                "cluster: Redis unavailable (%s: %s); using this node's local share (%.2f) "
                "of cluster limits until it is back",
                type(exc).__name__,
                exc or "timeout",
                self.fallback_share,
            )

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    def script(self, source: str) -> Any:
        """A Lua script registered on the client (EVALSHA, loaded on first use)."""
        assert self.client is not None
        return self.client.register_script(source)
