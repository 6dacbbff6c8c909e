"""Configuration: one TOML file read once into typed, validated objects.

Every setting has a default, so an empty file (or none) gives a working relay
on 127.0.0.1. `tachymail config check FILE` runs :func:`load` and prints the
errors, each naming the setting it is about. The reference of every setting is
``docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("mx", "submission", "smtps")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """The configuration is invalid; ``problems`` lists every error found, one per setting."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(slots=True)
class ListenerConfig:
    """One listening address and what it is for."""

    address: str = "127.0.0.1:2525"
    #: mx: mail from anyone for our domains, relaying only for trusted or authenticated
    #: clients; submission: AUTH (after STARTTLS) required; smtps: submission with
    #: implicit TLS (RFC 8314)
    role: str = "mx"

    @property
    def host(self) -> str:
        return split_hostport(self.address)[0]

    @property
    def port(self) -> int:
        return split_hostport(self.address)[1]


@dataclass(slots=True)
class ServerConfig:
    #: name in the greeting, EHLO reply and Received headers
    hostname: str = field(default_factory=socket.getfqdn)
    #: where the queue, TLS material and users file live
    data_dir: str = "./tachymail-data"
    #: SMTP worker processes; 0: one per CPU core, less the delivery workers (at least one)
    workers: int = 0
    #: accept and queue, deliver nothing
    hold: bool = False
    #: seconds the supervisor waits for open sessions to finish on SIGTERM
    drain_timeout: float = 30.0


@dataclass(slots=True)
class TlsConfig:
    #: PEM certificate chain and key; empty: a self-signed pair made in data_dir/tls
    cert: str = ""
    key: str = ""
    #: lowest protocol version offered: "TLSv1.2" or "TLSv1.3"
    min_version: str = "TLSv1.2"


@dataclass(slots=True)
class LimitsConfig:
    #: octets; advertised with SIZE (RFC 1870); 552 5.3.4 beyond
    max_message_size: int = 35 * 1024 * 1024
    #: RCPTs per transaction (RFC 5321 §4.5.3.1.8 asks for at least 100); 452 4.5.3 beyond
    max_recipients: int = 1000
    #: command line length including CRLF (RFC 5321 §4.5.3.1.4); 500 5.5.0 beyond
    max_command_line: int = 512
    #: longest text line in a message, CRLF included (RFC 5321 §4.5.3.1.6 says 1000);
    #: 0 accepts any length, as most MTAs do, since much real mail breaks the rule
    max_text_line: int = 0
    #: concurrent connections for the whole server and per client IP (trusted networks are
    #: exempt from the latter); 421 4.7.0 beyond
    max_connections: int = 2000
    max_connections_per_ip: int = 100
    #: bad commands per session before 421 4.7.0 and close
    max_errors: int = 10
    #: seconds to wait before the greeting; a client talking before it gets 554 (0: off)
    greeting_delay: float = 0.0
    #: seconds a client may stay silent between commands (RFC 5321 §4.5.3.2.7: 5 min)
    command_timeout: float = 300.0
    #: seconds a client may stay silent inside DATA/BDAT (§4.5.3.2.5: 3 min per block)
    data_timeout: float = 180.0


@dataclass(slots=True)
class PolicyConfig:
    #: domains we accept mail for from anyone (delivered here)
    local_domains: list[str] = field(default_factory=lambda: ["localhost"])
    #: domains we accept mail for from anyone and relay onwards
    relay_domains: list[str] = field(default_factory=list)
    #: clients that may relay anywhere without AUTH
    trusted_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    #: bare CR or LF inside DATA: "reject" (550 5.6.0, nothing queued) or "normalize" (to CRLF)
    bare_newline: str = "reject"

    def trusted(self) -> list[IPNetwork]:
        return [ipaddress.ip_network(n, strict=False) for n in self.trusted_networks]


@dataclass(slots=True)
class AuthConfig:
    #: users file (one "name:scrypt-hash" per line); empty: data_dir/users
    users_file: str = ""
    #: seconds added before answering a failed AUTH
    failure_delay: float = 1.0
    #: failed AUTH attempts in one session before 421 4.7.0 and close
    max_failures: int = 3


@dataclass(slots=True)
class QueueConfig:
    #: initial and maximum size of the LMDB map, in MiB; it doubles on demand
    map_size_mb: int = 256
    max_map_size_mb: int = 64 * 1024
    #: most messages in one group commit
    max_batch: int = 512
    #: where intake commits run: "inline" in the SMTP worker's event loop (least CPU; the
    #: loop waits for each sync) or "thread" (the loop runs on while a thread syncs: for
    #: disks whose sync takes milliseconds)
    commit: str = "inline"
    #: inline commits wait this long for more messages to join a batch, in milliseconds
    commit_linger_ms: float = 1.0


TLS_POLICIES = ("none", "opportunistic", "required")


@dataclass(slots=True)
class DeliveryConfig:
    #: delivery worker processes; destinations are sharded across them
    workers: int = 1
    #: "HOST:PORT" to send everything through (routes still win); empty: DNS MX
    smarthost: str = ""
    smarthost_tls: str = "opportunistic"
    smarthost_tls_verify: bool = False
    #: "user:password" for AUTH PLAIN at the smarthost (after TLS)
    smarthost_auth: str = ""
    #: DNS server "HOST:PORT" for MX lookups; empty: the system's resolvers
    resolver: str = ""
    #: remote SMTP port for MX delivery
    port: int = 25
    #: STARTTLS towards MX hosts: "opportunistic", "required" or "none"
    tls: str = "opportunistic"
    tls_verify: bool = False
    #: name sent in EHLO; empty: server.hostname
    helo_name: str = ""
    #: seconds between attempts; the last one repeats. Each gets +-10% jitter.
    retry_schedule: list[int] = field(default_factory=lambda: [60, 300, 900, 1800, 3600])
    #: seconds after arrival to give up and bounce (RFC 5321 §4.5.4.1: 4-5 days)
    max_lifetime: int = 5 * 86400
    #: lifetime of a bounce (DSN) itself; it is dropped, never bounced, when it runs out
    bounce_lifetime: int = 2 * 86400
    #: seconds after arrival to warn the sender of a delay (RFC 3464 "delayed"); 0: never
    delay_warning: int = 4 * 3600
    #: most messages held in memory for delivery at once per worker
    max_active: int = 10000
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    #: JSON-lines delivery log; empty: data_dir/delivery.log
    log_file: str = ""


@dataclass(slots=True)
class PoolConfig:
    """Limits of one destination's connection pool."""

    max_connections: int = 20
    #: connections opened at first; grows by one per success up to max (slow start)
    initial_connections: int = 5
    max_messages_per_connection: int = 1000
    max_recipients: int = 100
    #: messages per second to this destination (token bucket); 0: no limit
    rate: float = 0.0
    #: seconds an unused connection stays open
    idle_timeout: float = 30.0


@dataclass(slots=True)
class PoolOverride:
    """Different pool limits for one destination: a recipient domain or a next-hop host."""

    match: str = ""
    max_connections: int = 0
    initial_connections: int = 0
    max_messages_per_connection: int = 0
    max_recipients: int = 0
    rate: float = -1.0
    idle_timeout: float = 0.0


@dataclass(slots=True)
class RouteConfig:
    """A fixed next hop for a recipient domain (before smarthost and DNS)."""

    domain: str = ""
    #: "HOST:PORT", or "local" for local delivery (not supported yet: such mail waits)
    host: str = ""
    tls: str = "opportunistic"
    tls_verify: bool = False
    #: "user:password" for AUTH PLAIN (after TLS)
    auth: str = ""


@dataclass(slots=True)
class DkimConfig:
    #: sender domain -> selector; keys come from data_dir/dkim/<domain>/<selector>.key
    #: (make one with `tachymail dkim keygen`)
    domains: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class MetricsConfig:
    #: "HOST:PORT" of the supervisor's /metrics, /healthz and /readyz; empty: no endpoint
    address: str = "127.0.0.1:9525"
    #: next hops with their own destination label per delivery worker; the rest are "other"
    destinations: int = 20
    #: prometheus-client's multiprocess directory, emptied at start and removed at exit;
    #: empty: one in /dev/shm (shared memory), or data_dir/metrics where there is none
    directory: str = ""


LOG_FORMATS = ("text", "json", "logfmt")


@dataclass(slots=True)
class LogConfig:
    #: "text" for people, "json" (one object per line) or "logfmt" for log pipelines
    format: str = "text"


def default_listeners() -> list[ListenerConfig]:
    return [
        ListenerConfig("127.0.0.1:2525", "mx"),
        ListenerConfig("127.0.0.1:2587", "submission"),
        ListenerConfig("127.0.0.1:2465", "smtps"),
    ]


@dataclass(slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    listeners: list[ListenerConfig] = field(default_factory=default_listeners)
    tls: TlsConfig = field(default_factory=TlsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    pool_overrides: list[PoolOverride] = field(default_factory=list)
    routes: list[RouteConfig] = field(default_factory=list)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    #: the file it was read from, if any (SIGHUP re-reads it)
    source: str = ""

    @property
    def data_path(self) -> Path:
        return Path(self.server.data_dir).resolve()

    @property
    def worker_count(self) -> int:
        """SMTP workers: as configured, else the cores the delivery workers leave free.

        Every process of a relay is busy under load; more processes than cores only adds
        context switches and splits group commits into smaller ones (measured: on two
        cores, one SMTP worker beside the delivery worker relays a third more mail than two).
        """
        if self.server.workers:
            return self.server.workers
        cores = os.cpu_count() or 1
        if self.server.hold:
            return cores
        return max(1, cores - self.delivery.workers)

    @property
    def users_path(self) -> Path:
        return Path(self.auth.users_file) if self.auth.users_file else self.data_path / "users"


def split_hostport(address: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" → (host, port); raises ValueError with a readable message."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT")
    host = host.strip("[]")
    if not host:
        raise ValueError(f"{address!r} has no host")
    return host, int(port)


# TOML table → dataclass, checking names and types so that every mistake is reported.

_SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "tls": TlsConfig,
    "limits": LimitsConfig,
    "policy": PolicyConfig,
    "auth": AuthConfig,
    "queue": QueueConfig,
    "delivery": DeliveryConfig,
    "pool": PoolConfig,
    "dkim": DkimConfig,
    "metrics": MetricsConfig,
    "log": LogConfig,
}
# [[name]] arrays of tables -> (Config attribute, element type)
_ARRAYS: dict[str, tuple[str, type[Any]]] = {
    "listener": ("listeners", ListenerConfig),
    "route": ("routes", RouteConfig),
    "pool_override": ("pool_overrides", PoolOverride),
}


def _check_type(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        return isinstance(value, dict) and all(
            _check_type(k, key_type) and _check_type(v, value_type) for k, v in value.items()
        )
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_check_type(v, item) for v in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, types.UnionType):
        return any(_check_type(value, h) for h in typing.get_args(hint))
    return isinstance(value, hint)


def _build(cls: type[Any], table: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(table, dict):
        problems.append(f"{where}: must be a table")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in names:
            problems.append(f"{where}.{key}: unknown setting (known: {', '.join(sorted(names))})")
        elif not _check_type(value, hints[key]):
            problems.append(f"{where}.{key}: expected {_type_name(hints[key])}, got {value!r}")
        else:
            values[key] = value
    return cls(**values)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        hint, str(hint)
    )


def from_dict(data: dict[str, Any], source: str = "") -> Config:
    """Build and validate a :class:`Config` from parsed TOML; raises ConfigError."""
    problems: list[str] = []
    config = Config(source=source)
    for key, value in data.items():
        if key in _SECTIONS:
            setattr(config, key, _build(_SECTIONS[key], value, key, problems))
        elif key in _ARRAYS:
            attribute, element = _ARRAYS[key]
            if not isinstance(value, list):
                problems.append(f"{key}: must be an array of tables ([[{key}]])")
                continue
            items = [_build(element, item, f"{key}[{i}]", problems) for i, item in enumerate(value)]
            setattr(config, attribute, items)
        else:
            known = ", ".join([*_SECTIONS, *_ARRAYS])
            problems.append(f"{key}: unknown section (known: {known})")
    problems.extend(validate(config))
    if problems:
        raise ConfigError(problems)
    return config


def validate(config: Config) -> list[str]:
    """Checks across settings that types alone do not catch."""
    problems: list[str] = []
    if not config.listeners:
        problems.append("listener: at least one listener is needed")
    seen: set[tuple[str, int]] = set()
    for i, listener in enumerate(config.listeners):
        where = f"listener[{i}]"
        if listener.role not in ROLES:
            problems.append(
                f"{where}.role: must be one of {', '.join(ROLES)}, got {listener.role!r}"
            )
        try:
            hostport = split_hostport(listener.address)
        except ValueError as exc:
            problems.append(f"{where}.address: {exc}")
        else:
            if hostport in seen:
                problems.append(f"{where}.address: {listener.address} is listed twice")
            seen.add(hostport)
    server, limits = config.server, config.limits
    if server.workers < 0:
        problems.append("server.workers: must be 0 (one per core) or more")
    if not server.hostname:
        problems.append("server.hostname: must not be empty")
    if limits.max_recipients < 100:
        problems.append("limits.max_recipients: RFC 5321 §4.5.3.1.8 requires at least 100")
    if limits.max_command_line < 512:
        problems.append("limits.max_command_line: RFC 5321 §4.5.3.1.4 requires at least 512")
    if limits.max_message_size < 65536:
        problems.append("limits.max_message_size: RFC 5321 §4.5.3.1.7 requires at least 64 KiB")
    if limits.max_text_line and limits.max_text_line < 1000:
        problems.append("limits.max_text_line: 0 (no limit) or at least 1000 (RFC 5321)")
    for name in ("max_connections", "max_connections_per_ip", "max_errors"):
        if getattr(limits, name) < 1:
            problems.append(f"limits.{name}: must be at least 1")
    for name in ("greeting_delay", "command_timeout", "data_timeout"):
        if getattr(limits, name) < 0:
            problems.append(f"limits.{name}: must not be negative")
    if config.policy.bare_newline not in ("reject", "normalize"):
        problems.append('policy.bare_newline: must be "reject" or "normalize"')
    for i, network in enumerate(config.policy.trusted_networks):
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError as exc:
            problems.append(f"policy.trusted_networks[{i}]: {exc}")
    if config.tls.min_version not in ("TLSv1.2", "TLSv1.3"):
        problems.append('tls.min_version: must be "TLSv1.2" or "TLSv1.3"')
    if bool(config.tls.cert) != bool(config.tls.key):
        problems.append("tls: set both cert and key, or neither (for a self-signed pair)")
    for name in ("cert", "key"):
        path = getattr(config.tls, name)
        if path and not Path(path).is_file():
            problems.append(f"tls.{name}: {path} does not exist")
    if config.queue.map_size_mb < 1 or config.queue.max_map_size_mb < config.queue.map_size_mb:
        problems.append("queue: need 1 <= map_size_mb <= max_map_size_mb")
    if config.queue.max_batch < 1:
        problems.append("queue.max_batch: must be at least 1")
    if config.queue.commit not in ("inline", "thread"):
        problems.append(f"queue.commit: {config.queue.commit!r} is not inline or thread")
    if not 0 <= config.queue.commit_linger_ms <= 100:
        problems.append("queue.commit_linger_ms: must be between 0 and 100")
    if config.metrics.address:
        try:
            split_hostport(config.metrics.address)
        except ValueError as exc:
            problems.append(f"metrics.address: {exc}")
    if config.metrics.destinations < 0:
        problems.append("metrics.destinations: must not be negative")
    if config.log.format not in LOG_FORMATS:
        problems.append(f"log.format: must be one of {', '.join(LOG_FORMATS)}")
    problems.extend(_validate_delivery(config))
    return problems


def _validate_delivery(config: Config) -> list[str]:
    problems: list[str] = []
    delivery = config.delivery
    if delivery.workers < 1:
        problems.append("delivery.workers: must be at least 1")
    for name in ("smarthost", "resolver"):
        value = getattr(delivery, name)
        if value:
            try:
                split_hostport(value if name == "smarthost" or ":" in value else value + ":53")
            except ValueError as exc:
                problems.append(f"delivery.{name}: {exc}")
    for where, value in (
        ("delivery.tls", delivery.tls),
        ("delivery.smarthost_tls", delivery.smarthost_tls),
    ):
        if value not in TLS_POLICIES:
            problems.append(f"{where}: must be one of {', '.join(TLS_POLICIES)}")
    if not delivery.retry_schedule or any(t < 1 for t in delivery.retry_schedule):
        problems.append("delivery.retry_schedule: a non-empty list of positive seconds")
    if delivery.max_lifetime < 60 or delivery.bounce_lifetime < 60:
        problems.append("delivery: max_lifetime and bounce_lifetime must be at least 60 seconds")
    if delivery.smarthost_auth and ":" not in delivery.smarthost_auth:
        problems.append('delivery.smarthost_auth: must be "user:password"')
    pool = config.pool
    if pool.max_connections < 1 or pool.max_messages_per_connection < 1 or pool.max_recipients < 1:
        problems.append("pool: max_connections, max_messages_per_connection, max_recipients >= 1")
    for i, route in enumerate(config.routes):
        where = f"route[{i}]"
        if not route.domain:
            problems.append(f"{where}.domain: required")
        if route.host != "local":
            try:
                split_hostport(route.host)
            except ValueError as exc:
                problems.append(f'{where}.host: {exc} (or "local")')
        if route.tls not in TLS_POLICIES:
            problems.append(f"{where}.tls: must be one of {', '.join(TLS_POLICIES)}")
        if route.auth and ":" not in route.auth:
            problems.append(f'{where}.auth: must be "user:password"')
    for i, override in enumerate(config.pool_overrides):
        if not override.match:
            problems.append(f"pool_override[{i}].match: required (a domain or host)")
    return problems


def load(path: str | Path | None) -> Config:
    """Read *path* (or nothing: the embedded defaults) into a validated Config."""
    if path is None:
        return from_dict({})
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc
    return from_dict(data, source=str(path))


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{_toml_value(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def defaults_toml() -> str:
    """The embedded defaults as a TOML file (`tachymail config defaults`)."""
    config = Config()
    out: list[str] = ["# tachymail configuration: every setting with its default value", ""]
    for name in _SECTIONS:
        out.append(f"[{name}]")
        for item in dataclasses.fields(getattr(config, name)):
            out.append(f"{item.name} = {_toml_value(getattr(getattr(config, name), item.name))}")
        out.append("")
    for listener in config.listeners:
        out += ["[[listener]]", f"address = {_toml_value(listener.address)}"]
        out += [f"role = {_toml_value(listener.role)}", ""]
    out += [
        "# Fixed next hops and per-destination pool limits, for example:",
        "# [[route]]",
        '# domain = "example.net"',
        '# host = "10.0.0.5:25"',
        "# [[pool_override]]",
        '# match = "gmail.com"',
        "# max_connections = 10",
        "",
    ]
    return "\n".join(out)
