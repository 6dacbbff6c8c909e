"""Where a recipient domain's mail goes next: a configured route, the smarthost, or DNS MX.

The destination key names the next-hop host set, so domains that share MX hosts
share one connection pool.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass

from tachymail.config import Config, RouteConfig
from tachymail.dns.resolver import Resolver
from tachymail.net import split_hostport
from tachymail.smtpclient.client import ClientSettings

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


def _canonical(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """One spelling per address: an IPv4-mapped IPv6 address as the IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _listener_addresses(host: str) -> list[str]:
    """The addresses a listener's host stands for (a name is resolved once, at start)."""
    try:
        ipaddress.ip_address(host)
        return [host]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return [str(info[4][0]) for info in infos]


class OwnEndpoints:
    """Where we ourselves accept mail: a next hop there is a mail loop (RFC 5321 §5.1).

    "Ourselves" is exactly the host:port of one of our listeners: another server on the
    same machine (another port, another address) is not us. A listener on a wildcard
    address (0.0.0.0, ::) owns its port on every local address (one the kernel lets us
    bind). A next-hop name equal to ``server.hostname`` on a port we listen on is us too,
    whatever DNS says. Postfix finds "mail for DOMAIN loops back to myself" the same way
    from its own interface addresses; it also compares the peer's greeting name with its
    own, which we do not: servers sharing a name (tests, a cluster behind one name) are
    not loops.
    """

    def __init__(self, config: Config) -> None:
        self.hostname = config.server.hostname.lower().rstrip(".")
        self.ports = {listener.port for listener in config.listeners}
        self.exact: set[tuple[str, int]] = set()
        self.wildcard_v4: set[int] = set()  # ports of 0.0.0.0 listeners
        self.wildcard_v6: set[int] = set()  # ports of :: listeners (dual stack: IPv4 too)
        for listener in config.listeners:
            for address in _listener_addresses(listener.host):
                ip = ipaddress.ip_address(address.partition("%")[0])
                if not ip.is_unspecified:
                    self.exact.add((_canonical(ip), listener.port))
                elif ip.version == 4:
                    self.wildcard_v4.add(listener.port)
                else:
                    self.wildcard_v6.add(listener.port)
        self._local: dict[str, bool] = {}

    def is_own_name(self, host: str, port: int) -> bool:
        """Whether the next-hop name *host* on *port* is ourselves by name."""
        return host.lower().rstrip(".") == self.hostname and port in self.ports

    def is_own(self, address: str, port: int) -> bool:
        """Whether connecting to *address* (an IP literal) on *port* reaches a listener of
        ours; False for anything that is not an address."""
        try:
            ip = ipaddress.ip_address(address.strip("[]").partition("%")[0])
        except ValueError:
            return False
        key = _canonical(ip)
        if (key, port) in self.exact:
            return True
        v4 = "." in key
        if port in self.wildcard_v6 or (v4 and port in self.wildcard_v4):
            return self._is_local(key)
        return False

    def _is_local(self, address: str) -> bool:
        known = self._local.get(address)
        if known is None:
            ip = ipaddress.ip_address(address)
            known = ip.is_loopback or _bindable(address, ip.version)
            self._local[address] = known
        return known


def _bindable(address: str, version: int) -> bool:
    """Whether *address* is one of this machine's (the kernel lets us bind to it)."""
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True
