"""Where a recipient domain's mail goes next: a configured route, the smarthost, or DNS MX.

The destination key names the next-hop host set, so domains that share MX hosts
share one connection pool.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tachymail.config import Config, RouteConfig, split_hostport
from tachymail.delivery.client import ClientSettings
from tachymail.dns.resolver import Resolver

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NextHop:
    """Hosts to try in order for one destination, and how to talk to them."""

    key: str  # pool key: the destination
    hosts: tuple[str, ...]  # host names or address literals, in the order to try
    port: int
    settings: ClientSettings
    local: bool = False


@dataclass(frozen=True, slots=True)
class RoutingFailure:
    """No next hop: ``permanent`` failures bounce, others are retried."""

    permanent: bool
    code: int
    status: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.status} {self.text}"


def _auth(value: str) -> tuple[str, str] | None:
    if not value:
        return None
    user, _, password = value.partition(":")
    return user, password


class Router:
    """Resolves recipient domains to next hops, in this order: route, smarthost, DNS MX."""

    def __init__(self, config: Config, resolver: Resolver) -> None:
        self.config = config
        self.resolver = resolver
        delivery = config.delivery
        self.helo = delivery.helo_name or config.server.hostname
        self.routes: dict[str, RouteConfig] = {r.domain.lower(): r for r in config.routes}
        self.local_domains = {d.lower() for d in config.policy.local_domains}
        self.smarthost: NextHop | None = None
        if delivery.smarthost:
            host, port = split_hostport(delivery.smarthost)
            self.smarthost = NextHop(
                f"smarthost:{host}:{port}",
                (host,),
                port,
                self._settings(
                    delivery.smarthost_tls,
                    delivery.smarthost_tls_verify,
                    delivery.smarthost_auth,
                    delivery.smarthost_tls_ca,
                ),
            )

    def _settings(self, tls: str, verify: bool | None, auth: str, ca: str = "") -> ClientSettings:
        """How to talk to a hop. With credentials the certificate is always verified (an
        explicit ``false`` is refused by the configuration check): they go nowhere else."""
        delivery = self.config.delivery
        return ClientSettings(
            helo=self.helo,
            tls=tls,
            tls_verify=bool(auth) or bool(verify),
            tls_ca=ca,
            auth=_auth(auth),
            connect_timeout=delivery.connect_timeout,
            command_timeout=delivery.command_timeout,
        )

    async def route(self, domain: str) -> NextHop | RoutingFailure:
        domain = domain.lower()
        route = self.routes.get(domain)
        if route is not None:
            if route.host == "local":
                return NextHop("local", (), 0, self._settings("none", False, ""), local=True)
            host, port = split_hostport(route.host)
            settings = self._settings(route.tls, route.tls_verify, route.auth, route.tls_ca)
            return NextHop(f"route:{host}:{port}", (host,), port, settings)
        if domain in self.local_domains:
            return NextHop("local", (), 0, self._settings("none", False, ""), local=True)
        if self.smarthost is not None:
            return self.smarthost
        resolution = await self.resolver.mx(domain)
        if resolution.status == "ok":
            names = tuple(h.name for h in resolution.hosts)
            settings = self._settings(self.config.delivery.tls, self.config.delivery.tls_verify, "")
            key = "mx:" + ",".join(sorted(names))
            return NextHop(key, names, self.config.delivery.port, settings)
        if resolution.status == "null_mx":
            return RoutingFailure(True, 556, "5.1.10", f"{domain} accepts no mail (null MX)")
        if resolution.status in ("nxdomain", "no_host"):
            return RoutingFailure(
                True, 550, "5.1.2", f"{domain}: {resolution.detail or 'no such domain'}"
            )
        return RoutingFailure(
            False, 451, "4.4.3", f"{domain}: DNS lookup failed ({resolution.detail})"
        )
