"""Configuration: one TOML file read once into typed, validated objects.

Every setting has a default, so an empty file (or none) gives a working relay
on 127.0.0.1. `tachymail config check FILE` runs :func:`load` and prints the
errors, each naming the setting it is about. The reference of every setting is
``docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import ipaddress
import os
import re
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field
from logging.handlers import SysLogHandler
from pathlib import Path
from typing import Any

from tachymail.net import split_hostport

#: SMTP listener roles (the ones sender_login may name)
SMTP_ROLES = ("mx", "submission", "smtps")
#: every listener role: SMTP, LMTP (RFC 2033: another MTA hands us mail for local mailboxes)
#: POP3 (plain with STLS, or implicit TLS on pop3s) and IMAP (STARTTLS on imap, implicit TLS
#: on imaps)
ROLES = (*SMTP_ROLES, "lmtp", "pop3", "pop3s", "imap", "imaps", "http")

#: seconds a reload waits for the new SMTP workers to listen before it retires the old
#: workers anyway (a new delivery worker waits that long more for its predecessor)
RELOAD_READY_TIMEOUT = 15.0

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
    #: implicit TLS (RFC 8314); lmtp: LMTP (RFC 2033) into the local mailboxes, for
    #: clients in policy.trusted_networks only
    role: str = "mx"
    #: inbound authentication (SPF, DKIM, DMARC, ARC, iprev, DNSBL: see [mailauth]):
    #: "enforce" (policy applied), "tag" (Authentication-Results only, nothing refused),
    #: "off"; "" = by role: "enforce" on mx, "off" on the others
    mailauth: str = ""
    #: role http only: serve HTTPS (the server's certificate, [tls]) instead of plain HTTP
    tls: bool = False

    @property
    def mailauth_mode(self) -> str:
        """The inbound authentication mode of this listener: enforce, tag or off."""
        if self.mailauth:
            return self.mailauth
        return "enforce" if self.role == "mx" else "off"

    @property
    def host(self) -> str:
        return split_hostport(self.address)[0]

    @property
    def port(self) -> int:
        return split_hostport(self.address)[1]


def _qualified(name: str) -> bool:
    return "." in name and name.split(".")[0].lower() != "localhost"


def default_hostname() -> str:
    """The machine's fully qualified name, for ``server.hostname``.

    ``socket.getfqdn()`` when it gives a dotted name other than localhost, else the
    kernel's host name when that is dotted, else that name plus ``.localdomain`` (what
    Postfix's ``myhostname`` defaults to on a host without a domain).
    """
    fqdn = socket.getfqdn()
    if _qualified(fqdn):
        return fqdn
    short = socket.gethostname()
    if _qualified(short):
        return short
    return f"{short.split('.')[0] or 'localhost'}.localdomain"


@dataclass(slots=True)
class ServerConfig:
    #: name in the greeting, EHLO reply and Received headers; default: the machine's fully
    #: qualified name (see default_hostname: "<host>.localdomain" when it has no domain)
    hostname: str = field(default_factory=default_hostname)
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
    #: seconds one command line may take from its first octet to its CRLF, however steadily
    #: it trickles in (slowloris); 421 4.4.2 beyond (0: off)
    command_deadline: float = 60.0
    #: seconds a whole DATA body or BDAT transfer may take; 421 4.4.2 beyond (0: off)
    data_deadline: float = 600.0
    #: octets per second a DATA/BDAT transfer must average once data_rate_grace seconds have
    #: passed; 421 4.4.2 below (0: off). 500 as Postfix's smtpd_min_data_rate: any real link
    #: is far faster, while a drip of a few octets a second is cut after the grace period
    min_data_rate: int = 500
    data_rate_grace: float = 30.0
    #: connections of max_connections held back from untrusted clients on mx listeners, so
    #: trusted networks and the submission/smtps listeners are still served in a flood;
    #: -1: a tenth of max_connections
    reserved_connections: int = -1
    #: seconds of silence allowed between commands while a worker has 80% of its share of
    #: max_connections open (stress mode, as Postfix's), instead of command_timeout (0: off)
    stress_command_timeout: float = 10.0

    @property
    def reserved(self) -> int:
        """Connections reserved for trusted clients and submission (see reserved_connections)."""
        if self.reserved_connections < 0:
            return self.max_connections // 10
        return self.reserved_connections


@dataclass(slots=True)
class PolicyConfig:
    #: domains whose mail is delivered here, into the mailboxes of the users file's users
    #: (and through the aliases file); from any client, a recipient that is neither a user
    #: nor an alias is refused at RCPT with 550 5.1.1, a full mailbox with 452 4.2.2; none
    #: by default
    local_domains: list[str] = field(default_factory=list)
    #: domains we accept mail for from anyone and relay onwards
    relay_domains: list[str] = field(default_factory=list)
    #: clients that may relay anywhere without AUTH
    trusted_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    #: bare CR or LF inside DATA: "reject" (550 5.6.0, nothing queued) or "normalize" (to CRLF)
    bare_newline: str = "reject"
    #: Received and Delivered-To fields a message may arrive with (a mail loop beyond:
    #: 554 5.4.6 Too many hops, after DATA); 50 as Postfix's hopcount_limit; 0: no limit
    max_hops: int = 50
    #: octets of each text part that [[body_check]] rules read (Postfix's
    #: body_checks_size_limit); the rest of the part is not inspected
    body_check_size_limit: int = 51200
    #: probe the next hop at RCPT for recipients in relay_domains from untrusted,
    #: unauthenticated clients (as Postfix's reject_unverified_recipient): 550 5.1.1 when it
    #: refuses the address, 450 4.1.1 when it cannot say; results cached in data_dir/verify
    verify_recipients: bool = False
    #: seconds a client waits for a probe; then 450 4.1.1 (or verify_tempfail), while the
    #: probe goes on for up to twice as long again and caches its result for the retry
    verify_timeout: float = 10.0
    #: the probe's MAIL FROM; empty: the null sender <>
    verify_sender: str = ""
    #: a probe that ends in a 4xx, a timeout or no connection: "defer" (450 4.1.1) or
    #: "accept" (250, as if verification were off)
    verify_tempfail: str = "defer"
    #: seconds a result is cached: deliverable, refused (5xx), and could not tell
    verify_positive_ttl: float = 86400.0
    verify_negative_ttl: float = 3600.0
    verify_tempfail_ttl: float = 120.0

    def trusted(self) -> list[IPNetwork]:
        return [ipaddress.ip_network(n, strict=False) for n in self.trusted_networks]


CHECK_ACTIONS = ("reject", "hold", "discard", "strip", "add")
BODY_CHECK_ACTIONS = ("reject", "hold", "discard")


@dataclass(slots=True)
class ContentCheckConfig:
    """One [[header_check]] or [[body_check]] rule (see tachymail.smtp.checks)."""

    #: regular expression (Python syntax, case-insensitive) over one unfolded header field
    #: ("Subject: hello") or one body line
    pattern: str = ""
    #: "reject" (550 5.7.1 text), "hold" (queued on hold), "discard" (250, not queued),
    #: and for headers only "strip" (remove the field) and "add" (prepend text as a field)
    action: str = ""
    #: the reject reply's text, or the whole "Name: value" field that "add" prepends
    text: str = ""


@dataclass(slots=True)
class AuthConfig:
    #: users file (one "name:scrypt-hash" per line); empty: data_dir/users
    users_file: str = ""
    #: seconds added before answering a failed AUTH, times the failures counted for its
    #: client address or user (a tarpit), at most max_failure_delay
    failure_delay: float = 1.0
    max_failure_delay: float = 15.0
    #: failed AUTH attempts in one session before 421 4.7.0 and close
    max_failures: int = 3
    #: failed AUTH attempts counted across every session and worker, per client address (an
    #: IPv6 /64) and per user name, before AUTH from that address or for that user gets
    #: 454 4.7.0 for `lockout` seconds without a password check; 0: no such limit
    max_failures_per_ip: int = 20
    max_failures_per_user: int = 10
    lockout: float = 900.0
    #: each failure counts 1 and its weight halves every failure_half_life seconds
    failure_half_life: float = 900.0
    #: listener roles on which an authenticated user may use only a MAIL FROM it owns
    #: (553 5.7.1 otherwise); [] turns the sender-login policy off
    sender_login: list[str] = field(default_factory=lambda: ["submission", "smtps"])
    #: user -> the addresses ("bob@example.com") and domains ("@example.org") it may send
    #: as; a login that is an address always owns that address
    senders: dict[str, list[str]] = field(default_factory=dict)
    #: whether an authenticated user under sender_login may send with MAIL FROM:<>
    #: (read receipts, RFC 8098, use it)
    null_sender: bool = True


@dataclass(slots=True)
class MailboxConfig:
    """The mailbox store of local users (tachymail.mailbox) and local delivery into it."""

    #: aliases file ("source: target, target" per line; "@domain" is a catch-all), managed
    #: by `tachymail alias`; empty: data_dir/aliases
    aliases_file: str = ""
    #: quota of a user added without --quota, in MiB; 0: unlimited
    default_quota_mb: int = 0
    #: separator of sub-addresses: alice+tag@ is delivered to alice@ ("" turns it off)
    recipient_delimiter: str = "+"
    #: initial and maximum size of the mailbox store's LMDB map, in MiB; it doubles on demand
    map_size_mb: int = 256
    max_map_size_mb: int = 64 * 1024
    #: local deliveries in flight at once per delivery worker
    local_concurrency: int = 64
    #: most deliveries in one group commit of the store
    max_batch: int = 256
    #: where the store's commits run, in the SMTP workers (LMTP, POP3) and the delivery
    #: workers (local delivery): "inline" in the event loop (the loop waits for each sync)
    #: or "thread" (the loop runs on while a thread syncs, so batches grow with load)
    commit: str = "thread"
    #: inline commits wait this long (ms) for more deliveries to join a batch
    commit_linger_ms: float = 1.0
    #: a user on vacation (JMAP VacationResponse) answers each sender at most once in this
    #: many days (RFC 3834 §2)
    vacation_reply_days: float = 7.0


@dataclass(slots=True)
class Pop3Config:
    """The POP3 front end (listener roles pop3 and pop3s)."""

    #: whether clients outside policy.trusted_networks may log in before TLS (USER/PASS or
    #: AUTH on a plain pop3 listener without STLS); false as for submission
    plaintext_auth: bool = False
    #: retrieving a message (RETR, not TOP) marks it \Seen for IMAP
    mark_seen: bool = True
    #: seconds of client silence before the session is closed (RFC 1939 §3: at least 600)
    idle_timeout: float = 600.0
    #: longest command line, CRLF included (RFC 2449 §4: 255); "-ERR Line too long" beyond,
    #: and the line is discarded. SASL continuation lines may be up to 12,288 octets
    max_command_line: int = 255


@dataclass(slots=True)
class ImapConfig:
    """The IMAP front end (listener roles imap and imaps)."""

    #: whether clients outside policy.trusted_networks may log in before TLS (LOGIN or
    #: AUTHENTICATE on a plain imap listener without STARTTLS); false as for submission
    plaintext_auth: bool = False
    #: seconds of client silence before the session is closed, IDLE included (RFC 9051
    #: §5.4: at least 30 minutes once logged in)
    idle_timeout: float = 1800.0
    #: longest command text, CRLFs included, literals excluded; longer commands get BAD
    #: (as Dovecot's 64 KiB: long UID sets and ID strings exceed RFC 7162's 8192)
    max_command_line: int = 65536
    #: largest literal (an APPENDed message): APPENDLIMIT; NO [TOOBIG] beyond
    max_literal: int = 64 * 1024 * 1024
    #: sessions one user may have open at once in each worker process (0: no limit)
    max_sessions_per_user: int = 20
    #: offer COMPRESS=DEFLATE (RFC 4978)
    compress: bool = True
    #: messages of selected mailboxes each worker process keeps as compact columns shared
    #: by its sessions (about 40 octets a message: the default is about 40 MB a process);
    #: least recently used mailboxes go first, a bigger mailbox alone is read at each SELECT
    index_cache_messages: int = 1_000_000
    #: MiB of BODYSTRUCTURE, BODY and ENVELOPE renderings each worker process keeps in
    #: memory (the store keeps them too); the oldest go first
    rendered_cache_mb: int = 64


@dataclass(slots=True)
class QueueConfig:
    #: initial and maximum size of the LMDB map, in MiB; it doubles on demand
    map_size_mb: int = 256
    max_map_size_mb: int = 64 * 1024
    #: most messages in one group commit
    max_batch: int = 512
    #: where intake commits run: "inline" in the SMTP worker's event loop (least CPU; the
    #: loop waits for each sync), "thread" (the loop runs on while a thread syncs: for
    #: disks whose sync takes milliseconds) or "journal" (each worker appends to its own
    #: journal in data_dir/journal with one fdatasync per batch; LMDB follows behind)
    commit: str = "inline"
    #: an inline commit waits for more messages to join its batch until none has for this
    #: long, in milliseconds (and at most four times this long)
    commit_linger_ms: float = 1.0
    #: disk space kept in data_dir/queue/reserve, in MiB, given up on a full disk so that
    #: `tachymail queue delete` can still commit (LMDB needs free pages even to delete);
    #: 0: none
    reserve_mb: int = 4


TLS_POLICIES = ("none", "opportunistic", "required")


@dataclass(slots=True)
class DeliveryConfig:
    #: delivery worker processes; messages are sharded across them by queue id, each worker
    #: keeping its own pool per destination with its share of the [pool] limits
    workers: int = 1
    #: "HOST:PORT" to send everything through (routes still win); empty: DNS MX
    smarthost: str = ""
    smarthost_tls: str = "opportunistic"
    #: verify the smarthost's certificate; unset: only when smarthost_auth is set (credentials
    #: go only to a verified peer, so false together with smarthost_auth is refused)
    smarthost_tls_verify: bool | None = None
    #: PEM file of the CAs (or the self-signed certificate) to verify the smarthost against;
    #: empty: the system's CAs
    smarthost_tls_ca: str = ""
    #: "user:password" for AUTH PLAIN at the smarthost, sent only under verified TLS
    smarthost_auth: str = ""
    #: DNS server "HOST:PORT" for every lookup (delivery MX and addresses, recipient probes,
    #: the inbound checks of [mailauth]); empty: the system's resolvers
    resolver: str = ""
    #: seconds one DNS lookup may take, retries included; then the message is deferred (4.4.3)
    dns_timeout: float = 10.0
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
    #: verify the host's certificate; unset: only when auth is set (false with auth is refused)
    tls_verify: bool | None = None
    #: PEM file of the CAs (or the self-signed certificate) to verify the host against
    tls_ca: str = ""
    #: "user:password" for AUTH PLAIN, sent only under verified TLS
    auth: str = ""


@dataclass(slots=True)
class DkimConfig:
    #: sender domain -> selector; keys come from data_dir/dkim/<domain>/<selector>.key
    #: (make one with `tachymail dkim keygen`)
    domains: dict[str, str] = field(default_factory=dict)


#: listener.mailauth values ("" = by role)
MAILAUTH_MODES = ("enforce", "tag", "off")


@dataclass(slots=True)
class MailauthConfig:
    #: the authserv-id of our Authentication-Results fields (RFC 8601); "" = server.hostname
    authserv_id: str = ""
    #: check SPF (RFC 7208) of MAIL FROM and HELO
    spf: bool = True
    #: refuse MAIL FROM with 550 5.7.23 when SPF says fail ("-all"); off: DMARC decides
    spf_reject_fail: bool = False
    #: verify DKIM signatures (RFC 6376, RFC 8463)
    dkim: bool = True
    #: signatures verified per message; the rest are ignored
    dkim_max_signatures: int = 5
    #: evaluate DMARC (RFC 7489) on the From domain
    dmarc: bool = True
    #: what a p=reject failure gets: "reject" (550 5.7.1 after DATA), "quarantine", "none"
    dmarc_reject: str = "reject"
    #: what quarantine does: "hold" (queued on hold) or "header" (accepted with
    #: "X-Tachymail-Quarantine: dmarc")
    dmarc_quarantine: str = "hold"
    #: keep DMARC aggregate report data in data_dir/dmarc (`tachymail dmarc report`)
    dmarc_reports: bool = True
    #: verify ARC chains (RFC 8617)
    arc: bool = True
    #: seal relayed mail: { domain = "example.com", selector = "arc1" }, the key in
    #: data_dir/dkim/<domain>/<selector>.key (`tachymail dkim keygen`); {} = no sealing
    arc_seal: dict[str, str] = field(default_factory=dict)
    #: reverse DNS of the client with forward confirmation (RFC 8601 §3 iprev)
    iprev: bool = True
    #: DNS block lists (RFC 5782) checked at connect: a listed client gets 554 5.7.1
    dnsbl_zones: list[str] = field(default_factory=list)
    #: DNS allow lists: a listed client skips the later checks
    dnswl_zones: list[str] = field(default_factory=list)


@dataclass(slots=True)
class MetricsConfig:
    #: "HOST:PORT" of the supervisor's /metrics, /healthz and /readyz; empty: no endpoint.
    #: A taken port stops the start, as a taken SMTP port does
    address: str = "127.0.0.1:9525"
    #: next hops with their own destination label per delivery worker; the rest are "other"
    destinations: int = 20
    #: prometheus-client's multiprocess directory, emptied at start and removed at exit;
    #: empty: one in /dev/shm (shared memory), or data_dir/metrics where there is none
    directory: str = ""
    #: seconds an endpoint client may take from connecting to the end of its answer (and
    #: the longest silence); then it is disconnected
    client_timeout: float = 10.0
    #: endpoint clients served at once; a new one beyond it displaces the oldest client that
    #: has not finished sending its request, or gets 503 when none has
    max_clients: int = 64


LOG_FORMATS = ("text", "json", "logfmt")
LOG_TARGETS = ("stderr", "file", "syslog")


@dataclass(slots=True)
class LogConfig:
    #: "text" for people, "json" (one object per line) or "logfmt" for log pipelines
    format: str = "text"
    #: where log lines go: "stderr", "file" (``path``) or "syslog" (``syslog_socket``, which
    #: journald also serves); `tachymail serve` prints where at start
    target: str = "stderr"
    #: the log file of target "file", reopened when logrotate moves it away (no copytruncate
    #: needed); its directory is made if missing; empty: data_dir/tachymail.log
    path: str = ""
    #: syslog facility of target "syslog" ("mail", "daemon", "local0" ... "local7", ...)
    syslog_facility: str = "mail"
    #: syslog socket of target "syslog": a Unix socket path, or "HOST:PORT" for UDP
    syslog_socket: str = "/dev/log"


@dataclass(slots=True)
class HttpConfig:
    """The HTTP API (listener role ``http``): injection, queue admin, suppressions."""

    #: largest request body in octets; a bigger one gets 413 (the default fits an
    #: injection of 10,000 recipients with their content)
    max_body_bytes: int = 64 * 1024 * 1024
    #: the API tokens file (`tachymail token add`); empty: data_dir/http-tokens
    tokens_file: str = ""


@dataclass(slots=True)
class JmapConfig:
    """JMAP (RFC 8620/8621) on the ``http`` listener: the limits announced in the session
    object and enforced, and the lifetime of the web page's bearer tokens."""

    #: largest blob upload in octets (a bigger one gets 413 with the JMAP "limit" problem)
    max_size_upload: int = 50_000_000
    #: largest API request body in octets
    max_size_request: int = 10_000_000
    #: API requests one user may have running at once, per worker process
    max_concurrent_requests: int = 8
    #: method calls in one API request
    max_calls_in_request: int = 64
    #: ids one /get may ask for (and the largest Email/query page)
    max_objects_in_get: int = 1000
    #: creates, updates and destroys one /set may ask for
    max_objects_in_set: int = 1000
    #: seconds a bearer token from POST /jmap/login stays valid
    token_lifetime: int = 7 * 86400
    #: MiB of Email properties made from the messages' octets (from, subject, preview,
    #: hasAttachment...) each worker process keeps for Email/get; 0 keeps none
    property_cache_mb: int = 16
    #: EmailSubmission records kept per user (RFC 8621 §7), the oldest removed first
    submission_records: int = 1000
    #: days an EmailSubmission record is kept after it was sent
    submission_days: float = 30.0


#: the event types a ``[[webhook]]`` may subscribe to (tachymail.queue.events.EVENT_TYPES)
EVENT_TYPES = (
    "reception",
    "delivery",
    "transient_failure",
    "bounce",
    "delay",
    "suppression",
    "expiry",
)


@dataclass(slots=True)
class WebhookConfig:
    """One receiver of delivery events (``[[webhook]]``): batches of events POSTed as JSON."""

    #: http:// or https:// URL the JSON arrays of events are POSTed to (required)
    url: str = ""
    #: names the receiver in metrics and in the outbox (letters, digits, "_", "-", ".");
    #: "" = "webhook-" and 8 hex digits of the URL's SHA-256. Changing it (or the URL of an
    #: unnamed one) starts a new outbox: events still waiting in the old one stay there
    name: str = ""
    #: the event types it receives (a subset of EVENT_TYPES); empty: all of them
    events: list[str] = field(default_factory=list)
    #: most events in one POST
    batch_size: int = 100
    #: milliseconds a batch waits for more events before it is sent short
    batch_ms: int = 1000
    #: HMAC-SHA256 key of the X-Tachymail-Signature header; "" = requests are not signed
    secret: str = ""
    #: seconds a POST may take before it counts as failed (and is retried)
    timeout: float = 10.0

    @property
    def key(self) -> str:
        """The receiver's name: ``name``, or one derived from the URL."""
        if self.name:
            return self.name
        return "webhook-" + hashlib.sha256(self.url.encode()).hexdigest()[:8]

    @property
    def wanted(self) -> frozenset[str]:
        """The event types it receives."""
        return frozenset(self.events or EVENT_TYPES)


@dataclass(slots=True)
class SuppressionConfig:
    #: refuse a suppressed recipient at RCPT with 550 5.7.1 (recipients relayed onward,
    #: not those delivered into local mailboxes): the sender learns at once, and nothing
    #: is bounced later
    refuse_at_rcpt: bool = True
    #: classes of permanent failures (see [bounce]) that put the recipient on the list
    #: (scope global, source "bounce"); [] adds none
    on_bounce_classes: list[str] = field(default_factory=lambda: ["invalid_recipient"])
    #: how long a suppression added by a bounce lasts, in seconds (0: until removed)
    bounce_expiry: float = 0.0


@dataclass(slots=True)
class BounceConfig:
    #: a TOML file of [[rule]] tables (class, and code, enhanced, text regexes) tried
    #: before the built-in rules; "" = the built-in rules only
    rules_file: str = ""


@dataclass(slots=True)
class ClusterConfig:
    """Several nodes sharing limits, suppressions and suspensions through Redis
    (tachymail.cluster). Without ``redis`` the node is on its own."""

    #: "redis://HOST:PORT/DB" (or rediss://); "" = no cluster
    redis: str = ""
    #: this node's name in the cluster (leases, logs); "" = server.hostname
    node: str = ""
    #: the expected node count: each node's fallback share of a cluster limit is 1/nodes
    nodes: int = 1
    #: the share of a cluster limit a node uses while Redis is away; 0 = 1/nodes
    fallback_share: float = 0.0
    #: seconds a connection lease lives unless renewed: a dead node's connections free
    #: themselves within this time
    lease_ttl: float = 30.0
    #: seconds to wait for Redis before falling back to the local share
    timeout: float = 0.5
    #: seconds between attempts to reach Redis again after it failed
    retry_interval: float = 5.0
    #: prefix of every key this cluster writes (several clusters may share one Redis)
    key_prefix: str = "tachymail"


@dataclass(slots=True)
class ShapingConfig:
    """Traffic shaping per provider, destination and source (tachymail.delivery.shaping)."""

    #: TOML files of [[provider]], [[rule]] and [[reaction]] tables, read in order after
    #: the built-in set (re-read on SIGHUP; a broken file keeps the running rules)
    files: list[str] = field(default_factory=list)
    #: use the built-in rules for the big mailbox providers (delivery/shaping.toml)
    builtin: bool = True


@dataclass(slots=True)
class EgressSourceConfig:
    """A local address to send from, with the name it gives in EHLO."""

    name: str = ""
    #: the local IP address connections bind to
    address: str = ""
    #: the EHLO name from this source; "" = delivery.helo_name or server.hostname
    ehlo_name: str = ""
    #: connections from this source to all destinations together; 0 = no limit
    max_connections: int = 0
    #: messages per time from this source to all destinations ("N/s", "N/min", "N/h"); "" = none
    rate: str = ""
    #: warm-up: the first day of the schedule (YYYY-MM-DD, UTC); "" = no warm-up
    warmup_start: str = ""
    #: warm-up: messages allowed on day 1, day 2, ... of the schedule; after its last
    #: day the source is warm and has no daily cap
    warmup_daily: list[int] = field(default_factory=list)


@dataclass(slots=True)
class EgressPoolConfig:
    """A named set of sources, used in proportion to their weights."""

    name: str = ""
    #: [{ name = SOURCE, weight = N }]
    sources: list[dict[str, str | int]] = field(default_factory=list)
    #: sender domains whose mail uses this pool unless the message names another
    sender_domains: list[str] = field(default_factory=list)


def default_listeners() -> list[ListenerConfig]:
    return [
        ListenerConfig("127.0.0.1:2525", "mx"),
        ListenerConfig("127.0.0.1:2587", "submission"),
        ListenerConfig("127.0.0.1:2465", "smtps"),
        ListenerConfig("127.0.0.1:2110", "pop3"),
        ListenerConfig("127.0.0.1:2995", "pop3s"),
        ListenerConfig("127.0.0.1:2143", "imap"),
        ListenerConfig("127.0.0.1:2993", "imaps"),
        ListenerConfig("127.0.0.1:2080", "http"),
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
    mailbox: MailboxConfig = field(default_factory=MailboxConfig)
    pop3: Pop3Config = field(default_factory=Pop3Config)
    imap: ImapConfig = field(default_factory=ImapConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    pool_overrides: list[PoolOverride] = field(default_factory=list)
    routes: list[RouteConfig] = field(default_factory=list)
    header_checks: list[ContentCheckConfig] = field(default_factory=list)
    body_checks: list[ContentCheckConfig] = field(default_factory=list)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    mailauth: MailauthConfig = field(default_factory=MailauthConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    suppression: SuppressionConfig = field(default_factory=SuppressionConfig)
    bounce: BounceConfig = field(default_factory=BounceConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    jmap: JmapConfig = field(default_factory=JmapConfig)
    webhooks: list[WebhookConfig] = field(default_factory=list)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    shaping: ShapingConfig = field(default_factory=ShapingConfig)
    egress_sources: list[EgressSourceConfig] = field(default_factory=list)
    egress_pools: list[EgressPoolConfig] = field(default_factory=list)
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

    @property
    def http_tokens_path(self) -> Path:
        """The HTTP API's token file (``tachymail token``)."""
        return (
            Path(self.http.tokens_file) if self.http.tokens_file else self.data_path / "http-tokens"
        )

    @property
    def aliases_path(self) -> Path:
        return (
            Path(self.mailbox.aliases_file)
            if self.mailbox.aliases_file
            else self.data_path / "aliases"
        )

    @property
    def mailbox_path(self) -> Path:
        """The mailbox store's LMDB environment (beside the queue)."""
        return self.data_path / "mailbox"

    @property
    def log_path(self) -> Path:
        """The log file of ``[log] target = "file"`` (``tachymail log`` reads it too)."""
        return Path(self.log.path).resolve() if self.log.path else self.data_path / "tachymail.log"

    @property
    def local_delivery_domains(self) -> frozenset[str]:
        """Lower-cased domains whose mail goes to the local hop, as delivery routes them:
        every ``[[route]]`` with ``host = "local"``, and each of ``policy.local_domains``
        that no ``[[route]]`` sends elsewhere (a route wins)."""
        routed = {r.domain.lower(): r.host == "local" for r in self.routes}
        local = {d.lower() for d in self.policy.local_domains if routed.get(d.lower(), True)}
        return frozenset(local | {d for d, is_local in routed.items() if is_local})


# TOML table → dataclass, checking names and types so that every mistake is reported.

_SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "tls": TlsConfig,
    "limits": LimitsConfig,
    "policy": PolicyConfig,
    "auth": AuthConfig,
    "queue": QueueConfig,
    "mailbox": MailboxConfig,
    "pop3": Pop3Config,
    "imap": ImapConfig,
    "delivery": DeliveryConfig,
    "pool": PoolConfig,
    "dkim": DkimConfig,
    "mailauth": MailauthConfig,
    "metrics": MetricsConfig,
    "log": LogConfig,
    "suppression": SuppressionConfig,
    "bounce": BounceConfig,
    "http": HttpConfig,
    "jmap": JmapConfig,
    "cluster": ClusterConfig,
    "shaping": ShapingConfig,
}
# [[name]] arrays of tables -> (Config attribute, element type)
_ARRAYS: dict[str, tuple[str, type[Any]]] = {
    "listener": ("listeners", ListenerConfig),
    "route": ("routes", RouteConfig),
    "pool_override": ("pool_overrides", PoolOverride),
    "header_check": ("header_checks", ContentCheckConfig),
    "body_check": ("body_checks", ContentCheckConfig),
    "webhook": ("webhooks", WebhookConfig),
    "egress_source": ("egress_sources", EgressSourceConfig),
    "egress_pool": ("egress_pools", EgressPoolConfig),
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
    if isinstance(hint, types.UnionType):  # "bool | None": None only means "not set"
        return " or ".join(_type_name(h) for h in typing.get_args(hint) if h is not type(None))
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
        if listener.mailauth and listener.mailauth not in MAILAUTH_MODES:
            problems.append(
                f'{where}.mailauth: must be "" (by role) or one of {", ".join(MAILAUTH_MODES)},'
                f" got {listener.mailauth!r}"
            )
        elif listener.mailauth not in ("", "off") and listener.role not in SMTP_ROLES:
            # LMTP carries mail its client already checked; POP3 carries no mail in
            problems.append(
                f"{where}.mailauth: the inbound checks run on SMTP listeners only "
                f"({', '.join(SMTP_ROLES)}), not on {listener.role}"
            )
        if listener.tls and listener.role != "http":
            # the other roles have their own TLS: STARTTLS, or implicit by role (smtps...)
            problems.append(f"{where}.tls: only for role http, not {listener.role}")
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
    for name in (
        "greeting_delay",
        "command_timeout",
        "data_timeout",
        "command_deadline",
        "data_deadline",
        "min_data_rate",
        "data_rate_grace",
        "stress_command_timeout",
    ):
        if getattr(limits, name) < 0:
            problems.append(f"limits.{name}: must not be negative")
    if not -1 <= limits.reserved_connections < max(limits.max_connections, 1):
        problems.append(
            "limits.reserved_connections: -1 (a tenth of max_connections) or 0 up to "
            "max_connections - 1"
        )
    problems.extend(_validate_auth(config))
    problems.extend(_validate_mailbox(config))
    if config.policy.bare_newline not in ("reject", "normalize"):
        problems.append('policy.bare_newline: must be "reject" or "normalize"')
    problems.extend(_validate_content_checks(config))
    problems.extend(_validate_verify(config.policy))
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
    if config.queue.commit not in ("inline", "thread", "journal"):
        problems.append(f"queue.commit: {config.queue.commit!r} is not inline, thread or journal")
    if not 0 <= config.queue.commit_linger_ms <= 100:
        problems.append("queue.commit_linger_ms: must be between 0 and 100")
    if not 0 <= config.queue.reserve_mb <= 1024:
        problems.append("queue.reserve_mb: must be between 0 and 1024")
    if config.metrics.address:
        try:
            split_hostport(config.metrics.address)
        except ValueError as exc:
            problems.append(f"metrics.address: {exc}")
    if config.metrics.destinations < 0:
        problems.append("metrics.destinations: must not be negative")
    if not 0 < config.metrics.client_timeout <= 3600:
        problems.append("metrics.client_timeout: must be more than 0 and at most 3600 seconds")
    if config.metrics.max_clients < 1:
        problems.append("metrics.max_clients: must be at least 1")
    problems.extend(_validate_log(config.log))
    problems.extend(_validate_suppression(config))
    problems.extend(_validate_delivery(config))
    problems.extend(_validate_mailauth(config))
    problems.extend(_validate_webhooks(config.webhooks))
    problems.extend(_validate_cluster(config.cluster))
    problems.extend(_validate_egress(config))
    if not 1024 <= config.http.max_body_bytes <= 1 << 31:
        problems.append("http.max_body_bytes: between 1024 and 2147483648")
    jmap = config.jmap
    for name in (
        "max_size_upload",
        "max_size_request",
        "max_concurrent_requests",
        "max_calls_in_request",
        "max_objects_in_get",
        "max_objects_in_set",
        "token_lifetime",
    ):
        if not 1 <= getattr(jmap, name) <= 1 << 31:
            problems.append(f"jmap.{name}: between 1 and 2147483648")
    if not 0 <= jmap.property_cache_mb <= 64 * 1024:
        problems.append("jmap.property_cache_mb: between 0 and 65536")
    if not 1 <= jmap.submission_records <= 100_000:
        problems.append("jmap.submission_records: between 1 and 100000")
    if not 0 < jmap.submission_days <= 3650:
        problems.append("jmap.submission_days: above 0, at most 3650")
    return problems


_WEBHOOK_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _validate_webhooks(webhooks: list[WebhookConfig]) -> list[str]:
    problems: list[str] = []
    names: set[str] = set()
    for i, hook in enumerate(webhooks):
        where = f"webhook[{i}]"
        scheme, _, rest = hook.url.partition("://")
        if scheme.lower() not in ("http", "https") or not rest or rest.startswith("/"):
            problems.append(f"{where}.url: must be an http:// or https:// URL, got {hook.url!r}")
        if hook.name and not _WEBHOOK_NAME.fullmatch(hook.name):
            problems.append(
                f"{where}.name: 1 to 64 letters, digits, '_', '-' or '.', got {hook.name!r}"
            )
        elif hook.key in names:
            problems.append(f"{where}: a second webhook named {hook.key!r} (set name apart)")
        names.add(hook.key)
        unknown = [e for e in hook.events if e not in EVENT_TYPES]
        if unknown:
            problems.append(
                f"{where}.events: unknown event type {', '.join(map(repr, unknown))} "
                f"(known: {', '.join(EVENT_TYPES)})"
            )
        if not 1 <= hook.batch_size <= 10_000:
            problems.append(f"{where}.batch_size: between 1 and 10000")
        if not 0 <= hook.batch_ms <= 3_600_000:
            problems.append(f"{where}.batch_ms: between 0 and 3600000 milliseconds")
        if not 0 < hook.timeout <= 3600:
            problems.append(f"{where}.timeout: more than 0 and at most 3600 seconds")
    return problems


_DNS_LABELS = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)(\.(?!-)[a-z0-9_-]{1,63}(?<!-))*")


def _validate_mailauth(config: Config) -> list[str]:
    problems: list[str] = []
    settings = config.mailauth
    if settings.authserv_id and (
        not settings.authserv_id.isascii() or re.search(r'[\s;()"\\]', settings.authserv_id)
    ):
        # RFC 8601 §2.5: a value (token or quoted string); keep it a plain token
        problems.append(
            "mailauth.authserv_id: must be a host name or other token, got "
            f"{settings.authserv_id!r}"
        )
    if not 1 <= settings.dkim_max_signatures <= 50:
        problems.append("mailauth.dkim_max_signatures: must be between 1 and 50")
    if settings.dmarc_reject not in ("reject", "quarantine", "none"):
        problems.append(
            f'mailauth.dmarc_reject: must be "reject", "quarantine" or "none", got '
            f"{settings.dmarc_reject!r}"
        )
    if settings.dmarc_quarantine not in ("hold", "header"):
        problems.append(
            f'mailauth.dmarc_quarantine: must be "hold" or "header", got '
            f"{settings.dmarc_quarantine!r}"
        )
    if settings.arc_seal:
        unknown = sorted(set(settings.arc_seal) - {"domain", "selector"})
        domain = settings.arc_seal.get("domain", "").strip().rstrip(".").lower()
        selector = settings.arc_seal.get("selector", "").strip().rstrip(".").lower()
        if unknown:
            problems.append(
                f"mailauth.arc_seal: unknown key {', '.join(unknown)} (known: domain, selector)"
            )
        if not domain or not selector:
            problems.append("mailauth.arc_seal: needs both domain and selector, or {} for none")
        elif not _DNS_LABELS.fullmatch(domain) or not _DNS_LABELS.fullmatch(selector):
            problems.append(f"mailauth.arc_seal: {domain!r} / {selector!r} is not a DNS name")
        else:
            # the DKIM key layout (tachymail.mailauth.dkim.key_path); checked now, not at
            # the first relayed message
            key = config.data_path / "dkim" / domain / f"{selector}.key"
            if not key.is_file():
                problems.append(
                    f"mailauth.arc_seal: key {key} does not exist: create it with "
                    f"`tachymail dkim keygen --domain {domain} --selector {selector}`"
                )
    for name in ("dnsbl_zones", "dnswl_zones"):
        for i, zone in enumerate(getattr(settings, name)):
            if not _DNS_LABELS.fullmatch(zone.strip().rstrip(".").lower()):
                problems.append(f"mailauth.{name}[{i}]: {zone!r} is not a DNS zone name")
    return problems


def _validate_mailbox(config: Config) -> list[str]:
    problems: list[str] = []
    mailbox, pop3 = config.mailbox, config.pop3
    for name in ("default_quota_mb", "map_size_mb", "max_map_size_mb"):
        if getattr(mailbox, name) < 0:
            problems.append(f"mailbox.{name}: must not be negative")
    if mailbox.map_size_mb < 1:
        problems.append("mailbox.map_size_mb: must be at least 1")
    if mailbox.max_map_size_mb < mailbox.map_size_mb:
        problems.append("mailbox.max_map_size_mb: must not be less than mailbox.map_size_mb")
    for name in ("local_concurrency", "max_batch"):
        if getattr(mailbox, name) < 1:
            problems.append(f"mailbox.{name}: must be at least 1")
    if mailbox.commit not in ("inline", "thread"):
        problems.append(f"mailbox.commit: {mailbox.commit!r} is not inline or thread")
    if mailbox.commit_linger_ms < 0:
        problems.append("mailbox.commit_linger_ms: must not be negative")
    if not 0 < mailbox.vacation_reply_days <= 365:
        problems.append("mailbox.vacation_reply_days: must be above 0 and at most 365")
    delimiter = mailbox.recipient_delimiter
    if delimiter and (len(delimiter) > 1 or delimiter in '@"\\ '):
        problems.append(
            "mailbox.recipient_delimiter: one character other than @, quote, backslash "
            'or space, or "" for none'
        )
    if pop3.idle_timeout < 600:
        problems.append("pop3.idle_timeout: RFC 1939 §3 requires at least 600 seconds")
    if not 255 <= pop3.max_command_line <= 8192:
        problems.append("pop3.max_command_line: between 255 (RFC 2449 §4) and 8192")
    imap = config.imap
    if imap.idle_timeout < 1800:
        problems.append("imap.idle_timeout: RFC 9051 §5.4 requires at least 1800 seconds")
    if not 1000 <= imap.max_command_line <= 1024 * 1024:
        problems.append("imap.max_command_line: between 1000 and 1048576")
    if not 64 * 1024 <= imap.max_literal <= 4 * 1024 * 1024 * 1024:
        problems.append("imap.max_literal: between 65536 and 4294967296")
    if imap.max_sessions_per_user < 0:
        problems.append("imap.max_sessions_per_user: must not be negative")
    if imap.index_cache_messages < 0:
        problems.append("imap.index_cache_messages: must not be negative")
    if not 0 <= imap.rendered_cache_mb <= 64 * 1024:
        problems.append("imap.rendered_cache_mb: between 0 and 65536")
    return problems


def _validate_verify(policy: PolicyConfig) -> list[str]:
    problems: list[str] = []
    if not 0 < policy.verify_timeout <= 300:
        problems.append("policy.verify_timeout: must be more than 0 and at most 300 seconds")
    if policy.verify_tempfail not in ("defer", "accept"):
        problems.append('policy.verify_tempfail: must be "defer" or "accept"')
    sender = policy.verify_sender
    if sender and (sender.count("@") != 1 or any(c.isspace() or c in "<>" for c in sender)):
        problems.append('policy.verify_sender: an address such as "verify@example.com", or ""')
    for name in ("verify_positive_ttl", "verify_negative_ttl", "verify_tempfail_ttl"):
        if getattr(policy, name) < 0:
            problems.append(f"policy.{name}: must not be negative (0: not cached)")
    return problems


# A field that "add" prepends: a name of printable ASCII without ":", a colon, a value.
_ADDED_FIELD = re.compile(r"[!-9;-~]+:[ \t]*[^\r\n]*")


def _validate_content_checks(config: Config) -> list[str]:
    problems: list[str] = []
    policy = config.policy
    if policy.max_hops < 0:
        problems.append("policy.max_hops: must be 0 (no limit) or more")
    if policy.body_check_size_limit < 0:
        problems.append("policy.body_check_size_limit: must not be negative")
    for name, rules, actions in (
        ("header_check", config.header_checks, CHECK_ACTIONS),
        ("body_check", config.body_checks, BODY_CHECK_ACTIONS),
    ):
        for i, rule in enumerate(rules):
            where = f"{name}[{i}]"
            if not rule.pattern:
                problems.append(f"{where}.pattern: required")
            else:
                try:
                    re.compile(rule.pattern.encode("utf-8"), re.IGNORECASE | re.MULTILINE)
                except re.error as exc:
                    problems.append(f"{where}.pattern: not a valid regular expression: {exc}")
            if rule.action not in actions:
                problems.append(f"{where}.action: must be one of {', '.join(actions)}")
            if rule.action == "add" and not _ADDED_FIELD.fullmatch(rule.text):
                problems.append(f'{where}.text: "add" needs a whole header field, "Name: value"')
            elif rule.text and not rule.text.isprintable():  # CR and LF are not printable
                problems.append(f"{where}.text: must be one line of printable text")
    return problems


def _validate_suppression(config: Config) -> list[str]:
    problems: list[str] = []
    for i, name in enumerate(config.suppression.on_bounce_classes):
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,39}", name):
            problems.append(f"suppression.on_bounce_classes[{i}]: not a class name: {name!r}")
    if config.suppression.bounce_expiry < 0:
        problems.append("suppression.bounce_expiry: must not be negative")
    if config.bounce.rules_file and not Path(config.bounce.rules_file).is_file():
        problems.append(f"bounce.rules_file: {config.bounce.rules_file} does not exist")
    return problems


def _validate_log(settings: LogConfig) -> list[str]:
    problems: list[str] = []
    if settings.format not in LOG_FORMATS:
        problems.append(f"log.format: must be one of {', '.join(LOG_FORMATS)}")
    if settings.target not in LOG_TARGETS:
        problems.append(f"log.target: must be one of {', '.join(LOG_TARGETS)}")
    if settings.syslog_facility not in SysLogHandler.facility_names:
        known = ", ".join(sorted(SysLogHandler.facility_names))
        problems.append(f"log.syslog_facility: must be one of {known}")
    where = settings.syslog_socket
    if not where:
        problems.append('log.syslog_socket: a socket path (such as "/dev/log") or HOST:PORT')
    elif not where.startswith("/"):
        try:
            split_hostport(where)
        except ValueError as exc:
            problems.append(f"log.syslog_socket: {exc} (nor an absolute socket path)")
    return problems


def _validate_auth(config: Config) -> list[str]:
    problems: list[str] = []
    auth = config.auth
    for name in ("failure_delay", "max_failure_delay", "lockout"):
        if getattr(auth, name) < 0:
            problems.append(f"auth.{name}: must not be negative")
    if auth.max_failure_delay < auth.failure_delay:
        problems.append("auth.max_failure_delay: must not be less than auth.failure_delay")
    if auth.failure_half_life <= 0:
        problems.append("auth.failure_half_life: must be more than 0 seconds")
    for name in ("max_failures", "max_failures_per_ip", "max_failures_per_user"):
        if getattr(auth, name) < (1 if name == "max_failures" else 0):
            problems.append(f"auth.{name}: must be at least {1 if name == 'max_failures' else 0}")
    for i, role in enumerate(auth.sender_login):
        if role not in SMTP_ROLES:
            problems.append(f"auth.sender_login[{i}]: must be one of {', '.join(SMTP_ROLES)}")
    for user, owned in auth.senders.items():
        for item in owned:
            _, at, domain = item.rpartition("@")
            if not at or not domain or any(c.isspace() for c in item):
                problems.append(
                    f"auth.senders.{user}: {item!r} is neither an address nor an @domain"
                )
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
    if not 0 < delivery.dns_timeout <= 300:
        problems.append("delivery.dns_timeout: must be more than 0 and at most 300 seconds")
    if not delivery.retry_schedule or any(t < 1 for t in delivery.retry_schedule):
        problems.append("delivery.retry_schedule: a non-empty list of positive seconds")
    if delivery.max_lifetime < 60 or delivery.bounce_lifetime < 60:
        problems.append("delivery: max_lifetime and bounce_lifetime must be at least 60 seconds")
    if delivery.smarthost_auth and ":" not in delivery.smarthost_auth:
        problems.append('delivery.smarthost_auth: must be "user:password"')
    problems.extend(
        _credential_problems(
            "delivery.smarthost_",
            delivery.smarthost_auth,
            delivery.smarthost_tls,
            delivery.smarthost_tls_verify,
            delivery.smarthost_tls_ca,
        )
    )
    if delivery.max_active < 1:
        problems.append("delivery.max_active: must be at least 1 (0 would stop all delivery)")
    for name in ("connect_timeout", "command_timeout"):
        if getattr(delivery, name) <= 0:
            problems.append(f"delivery.{name}: must be more than 0 seconds")
    if delivery.delay_warning < 0:
        problems.append("delivery.delay_warning: 0 (never) or more seconds")
    pool = config.pool
    if pool.max_connections < 1 or pool.max_messages_per_connection < 1 or pool.max_recipients < 1:
        problems.append("pool: max_connections, max_messages_per_connection, max_recipients >= 1")
    if not 1 <= pool.initial_connections <= pool.max_connections:
        problems.append("pool.initial_connections: must be between 1 and pool.max_connections")
    if pool.rate < 0:
        problems.append("pool.rate: 0 (no limit) or more messages per second")
    if pool.idle_timeout <= 0:
        problems.append("pool.idle_timeout: must be more than 0 seconds")
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
        problems.extend(
            _credential_problems(f"{where}.", route.auth, route.tls, route.tls_verify, route.tls_ca)
        )
    for i, override in enumerate(config.pool_overrides):
        if not override.match:
            problems.append(f"pool_override[{i}].match: required (a domain or host)")
        # 0 (and -1 for rate) mean "as [pool]": the limits that apply are the merged ones.
        most = override.max_connections or pool.max_connections
        first = override.initial_connections or pool.initial_connections
        if override.max_connections < 0 or override.initial_connections < 0:
            problems.append(f"pool_override[{i}]: connection counts must not be negative")
        elif first > most:
            problems.append(
                f"pool_override[{i}].initial_connections: {first} is more than "
                f"max_connections {most}"
            )
    return problems


_RATE_UNITS = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "hour": 3600.0}
_RATE_UNITS |= {"d": 86400.0, "day": 86400.0}


def parse_rate(text: str) -> float:
    """Messages per second of a rate written "N/s", "N/min", "N/h" or "N/day" (N may have a
    fraction). Raises ValueError naming the mistake."""
    count, slash, unit = text.strip().partition("/")
    if not slash:
        raise ValueError(f'bad rate {text!r}: write it as "N/s", "N/min", "N/h" or "N/day"')
    try:
        value = float(count)
    except ValueError:
        raise ValueError(f"bad rate {text!r}: {count.strip()!r} is not a number") from None
    seconds = _RATE_UNITS.get(unit.strip().lower())
    if seconds is None:
        raise ValueError(f"bad rate {text!r}: unit {unit.strip()!r} is not one of s, min, h, day")
    if not 0 < value < 1e9 or value != value:
        raise ValueError(f"bad rate {text!r}: the count must be more than 0")
    return value / seconds


def _validate_cluster(cluster: ClusterConfig) -> list[str]:
    problems: list[str] = []
    if cluster.redis and not cluster.redis.startswith(("redis://", "rediss://", "unix://")):
        problems.append('cluster.redis: a URL such as "redis://127.0.0.1:6379/0"')
    if cluster.nodes < 1:
        problems.append("cluster.nodes: at least 1")
    if not 0 <= cluster.fallback_share <= 1:
        problems.append("cluster.fallback_share: between 0 (1/nodes) and 1")
    for name in ("lease_ttl", "timeout", "retry_interval"):
        if getattr(cluster, name) <= 0:
            problems.append(f"cluster.{name}: must be more than 0 seconds")
    return problems


def _validate_egress(config: Config) -> list[str]:
    problems: list[str] = []
    names: set[str] = set()
    for i, source in enumerate(config.egress_sources):
        where = f"egress_source[{i}]"
        if not source.name:
            problems.append(f"{where}.name: required")
        elif source.name in names:
            problems.append(f"{where}.name: {source.name!r} is defined twice")
        names.add(source.name)
        try:
            ipaddress.ip_address(source.address)
        except ValueError:
            problems.append(f"{where}.address: {source.address!r} is not an IP address")
        if source.max_connections < 0:
            problems.append(f"{where}.max_connections: 0 (no limit) or more")
        if source.rate:
            try:
                parse_rate(source.rate)
            except ValueError as exc:
                problems.append(f"{where}.rate: {exc}")
        if source.warmup_start:
            try:
                datetime.date.fromisoformat(source.warmup_start)
            except ValueError:
                problems.append(f"{where}.warmup_start: a date written YYYY-MM-DD")
            if not source.warmup_daily or any(n < 1 for n in source.warmup_daily):
                problems.append(f"{where}.warmup_daily: a list of positive daily message counts")
        elif source.warmup_daily:
            problems.append(f"{where}.warmup_daily: needs warmup_start")
    pools: set[str] = set()
    for i, pool in enumerate(config.egress_pools):
        where = f"egress_pool[{i}]"
        if not pool.name:
            problems.append(f"{where}.name: required")
        elif pool.name in pools:
            problems.append(f"{where}.name: {pool.name!r} is defined twice")
        pools.add(pool.name)
        if not pool.sources:
            problems.append(f"{where}.sources: at least one {{ name, weight }}")
        for j, member in enumerate(pool.sources):
            unknown = set(member) - {"name", "weight"}
            if unknown:
                problems.append(f"{where}.sources[{j}]: unknown key {', '.join(sorted(unknown))}")
            name, weight = member.get("name"), member.get("weight", 1)
            if not isinstance(name, str) or name not in names:
                known = ", ".join(sorted(names)) or "none defined"
                problems.append(
                    f"{where}.sources[{j}].name: {name!r} is not an egress_source ({known})"
                )
            if not isinstance(weight, int) or weight < 1:
                problems.append(f"{where}.sources[{j}].weight: a whole number of at least 1")
    return problems


def _credential_problems(
    prefix: str, auth: str, tls: str, verify: bool | None, ca: str
) -> list[str]:
    """Credentials are sent only under TLS with a verified certificate (see routing.py)."""
    problems: list[str] = []
    if ca and not Path(ca).is_file():
        problems.append(f"{prefix}tls_ca: {ca} does not exist")
    if not auth:
        return problems
    if tls == "none":
        problems.append(f'{prefix}tls: "none" would never send the configured credentials')
    if verify is False:
        problems.append(
            f"{prefix}tls_verify: credentials go only to a verified peer; for a private CA or"
            f" a self-signed certificate set {prefix}tls_ca to its PEM file instead"
        )
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
            value = getattr(getattr(config, name), item.name)
            if value is None:  # TOML has no null: an unset setting is left out
                out.append(f"# {item.name} = (unset)")
                continue
            out.append(f"{item.name} = {_toml_value(value)}")
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
        "# Header and body checks (reject, hold, discard; strip and add for headers):",
        "# [[header_check]]",
        "# pattern = '^Subject: .*viagra'",
        '# action = "reject"',
        '# text = "Spam is not welcome here"',
        "",
        "# Delivery events POSTed to a receiver (see docs/configuration.md, [[webhook]]):",
        "# [[webhook]]",
        '# url = "https://hooks.example.com/tachymail"',
        '# events = ["delivery", "bounce", "expiry"]',
        '# secret = "a long random string"',
        "",
    ]
    return "\n".join(out)


def _changed(item: Any, default: Any) -> list[str]:
    """``name = value`` lines for the fields of *item* that differ from *default*'s."""
    lines = []
    for spec in dataclasses.fields(item):
        value = getattr(item, spec.name)
        if value is not None and value != getattr(default, spec.name):
            if spec.name in _CREDENTIALS and value:
                # Output that is pasted into tickets must not carry the relay's password.
                value = value.partition(":")[0] + ":" + REDACTED
            elif spec.name == "secret" and value:  # a webhook's HMAC key: no user part
                value = REDACTED
            lines.append(f"{spec.name} = {_toml_value(value)}")
    return lines


#: "user:password" settings whose password `config diff` hides
_CREDENTIALS = frozenset({"smarthost_auth", "auth"})
REDACTED = "<redacted>"


def changed_toml(config: Config) -> str:
    """The settings of *config* that differ from the defaults, as TOML (`config diff`).

    Read back, the text gives the same configuration, but for the passwords of credentials
    (``delivery.smarthost_auth``, a route's ``auth``), shown as ``user:<redacted>``. A
    ``[[listener]]`` list that differs from the default listeners is shown whole (it
    replaces them); ``[[route]]`` and
    ``[[pool_override]]`` entries show each entry's non-default fields. Empty when nothing
    differs.
    """
    defaults = Config()
    out: list[str] = []
    for name in _SECTIONS:
        lines = _changed(getattr(config, name), getattr(defaults, name))
        if lines:
            out += [f"[{name}]", *lines, ""]
    for name, (attribute, element) in _ARRAYS.items():
        items = getattr(config, attribute)
        if items == getattr(defaults, attribute):
            continue
        for item in items:
            out += [f"[[{name}]]", *_changed(item, element()), ""]
    return "\n".join(out)
