"""Every metric Tachymail exports, built by :func:`build` (at import and on ``enable``).

Names follow the Prometheus conventions: ``tachymail_`` prefix, ``_total`` counters,
``_seconds`` and ``_bytes`` base units, histograms for latencies and sizes. No label
carries a per-message or per-recipient value; the destination label is bounded by
:func:`destination` (the first ``DESTINATIONS`` next hops a process sees, then "other").

The hottest counters (commands and replies, several per message) are tallied in plain
lists (:data:`COMMANDS`, :data:`REPLIES`, a few ns per count), and the per-message and
per-commit ones in :class:`CounterTally` and :class:`HistogramTally`; :func:`flush`, which
each worker calls about once a second, moves them into the shared values. A shared value
update takes a lock, packs a struct and writes the mmap, microseconds each, several times
per message. Everything else is counted directly on labelled children bound in :func:`build`.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from tachymail.protocol import commands as C

#: own destination labels per process; later destinations share "other"
DESTINATIONS = 20

LISTENER_ROLES = ("mx", "submission", "smtps", "lmtp")
REFUSE_REASONS = ("max_connections", "max_per_ip", "early_talker", "dnsbl")
#: why the server cut a session off (a timeout of some kind, or a client that never reads)
CUT_REASONS = (
    "command_timeout",
    "data_timeout",
    "stress_timeout",
    "command_deadline",
    "data_deadline",
    "min_data_rate",
    "write_stalled",
)
REJECT_REASONS = (
    "too_big",
    "line_too_long",
    "bare_newline",
    "queue_full",
    "queue_error",
    "loop",
    "content",
    "dmarc",
    "dmarc_tempfail",
    "mailauth_error",
)
RCPT_REJECT_REASONS = (
    "relay_denied",
    "too_many",
    "syntax",
    "unknown_user",
    "unverified",
    "over_quota",
    "suppressed",
)
#: what became of one recipient of an HTTP injection (POST /api/v1/messages)
INJECT_RESULTS = (
    "accepted",
    "duplicate",
    "suppressed",
    "rejected",
    "invalid",
    "storage_full",
    "error",
)
#: what became of one LMTP recipient's message (its reply after DATA)
LMTP_RESULTS = ("delivered", "over_quota", "storage_full", "error", "loop")
#: outcomes of an address-verification probe (policy.verify_recipients)
PROBE_RESULTS = ("deliverable", "undeliverable", "unverified")
MAIL_REJECT_REASONS = ("not_owned", "spf")
LOCKOUT_SCOPES = ("ip", "user")
RESULTS = ("delivered", "deferred", "bounced")
#: results of local deliveries: "duplicate" = already in the mailbox, nothing written
LOCAL_RESULTS = ("delivered", "deferred", "bounced", "duplicate")
DSN_KINDS = ("failed", "delayed", "delivered")
DNS_TYPES = ("MX", "A", "AAAA", "TXT", "PTR")
WORKER_KINDS = ("smtp", "delivery")
#: POP3 listener roles, and how a POP3 login ended (in_use: the maildrop was locked)
POP3_ROLES = ("pop3", "pop3s")
POP3_LOGIN_RESULTS = ("success", "failure", "locked_out", "in_use")
#: IMAP listener roles, how an IMAP login ended (limit: max_sessions_per_user reached), and
#: the commands counted by name (anything else is "other")
IMAP_ROLES = ("imap", "imaps")
IMAP_LOGIN_RESULTS = ("success", "failure", "locked_out", "limit")
IMAP_COMMANDS = (
    "CAPABILITY", "NOOP", "LOGOUT", "ID", "STARTTLS", "LOGIN", "AUTHENTICATE", "ENABLE",
    "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST",
    "LSUB", "NAMESPACE", "STATUS", "APPEND", "IDLE", "CHECK", "CLOSE", "UNSELECT", "EXPUNGE",
    "SEARCH", "FETCH", "STORE", "COPY", "MOVE", "SORT", "THREAD", "UID EXPUNGE", "UID SEARCH",
    "UID FETCH", "UID STORE", "UID COPY", "UID MOVE", "UID SORT", "UID THREAD", "GETQUOTA",
    "GETQUOTAROOT", "SETQUOTA", "COMPRESS", "other",
)  # fmt: skip
#: inbound message-authentication methods and their RFC 8601 result keywords (the label
#: sets exported from the start); at connect, dnsbl counts "fail" for a client listed on a
#: DNSBL zone and "pass" otherwise, dnswl "pass" for a client on a DNSWL zone, else "none"
AUTH_METHODS = ("spf", "spf_helo", "dkim", "dmarc", "arc", "iprev", "dnsbl", "dnswl")
AUTH_RESULTS = (
    "pass",
    "fail",
    "softfail",
    "neutral",
    "none",
    "policy",
    "temperror",
    "permerror",
)

VERBS: dict[int, str] = {
    C.VERB_HELO: "HELO",
    C.VERB_EHLO: "EHLO",
    C.VERB_MAIL: "MAIL",
    C.VERB_RCPT: "RCPT",
    C.VERB_DATA: "DATA",
    C.VERB_BDAT: "BDAT",
    C.VERB_RSET: "RSET",
    C.VERB_NOOP: "NOOP",
    C.VERB_QUIT: "QUIT",
    C.VERB_VRFY: "VRFY",
    C.VERB_EXPN: "EXPN",
    C.VERB_HELP: "HELP",
    C.VERB_STARTTLS: "STARTTLS",
    C.VERB_AUTH: "AUTH",
    C.VERB_UNKNOWN: "unknown",
}

#: commands by verb number: ``COMMANDS[verb] += 1`` on the hot path
COMMANDS: list[int] = [0] * (max(VERBS) + 1)
#: replies by first digit (index 0-9): ``REPLIES[reply[0] - 48] += 1``
REPLIES: list[int] = [0] * 10

_BYTE_BUCKETS = tuple(float(1 << n) for n in range(10, 27, 2))  # 1 KiB .. 64 MiB
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_DELIVERY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10, 30, 60, 300, 900, 3600, 14400)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class CounterTally:
    """Increments of one counter (child) summed in a float until :func:`flush`."""

    __slots__ = ("child", "pending")

    def __init__(self, child: Counter) -> None:
        self.child = child
        self.pending = 0.0
        _TALLIES.append(self)

    def inc(self, amount: float = 1.0) -> None:
        self.pending += amount

    def flush(self) -> None:
        if self.pending:
            amount, self.pending = self.pending, 0.0
            self.child.inc(amount)


class HistogramTally:
    """Observations of one histogram counted per bucket until :func:`flush`.

    prometheus-client has no bulk observe, so the flush adds each bucket's count to the
    histogram's own bucket values, as ``observe`` does one at a time.
    """

    __slots__ = ("counts", "histogram", "sum", "upper_bounds")

    def __init__(self, histogram: Histogram, buckets: tuple[float, ...]) -> None:
        self.histogram = histogram
        self.upper_bounds = [*buckets, float("inf")]
        self.counts = [0] * len(self.upper_bounds)
        self.sum = 0.0
        _TALLIES.append(self)

    def observe(self, value: float) -> None:
        self.sum += value
        # The first bucket whose upper bound is >= value, as Histogram.observe chooses.
        self.counts[bisect_left(self.upper_bounds, value)] += 1

    def flush(self) -> None:
        if not any(self.counts):
            return
        counts, self.counts = self.counts, [0] * len(self.upper_bounds)
        total, self.sum = self.sum, 0.0
        self.histogram._sum.inc(total)
        for bucket, count in zip(self.histogram._buckets, counts, strict=True):
            if count:
                bucket.inc(count)


class ResultsTally:
    """Messages that got one set of (method, result) pairs (:func:`auth_results_of`),
    added to each pair's counter at :func:`flush`: one increment per message, not one per
    result."""

    __slots__ = ("children", "pending")

    def __init__(self, children: list[CounterTally]) -> None:
        self.children = children
        self.pending = 0.0
        _TALLIES.append(self)

    def inc(self) -> None:
        self.pending += 1.0

    def flush(self) -> None:
        if self.pending:
            amount, self.pending = self.pending, 0.0
            for tally in self.children:
                tally.child.inc(amount)


_TALLIES: list[CounterTally | HistogramTally | ResultsTally] = []
#: most distinct result sets with a tally of their own; others count result by result
RESULT_SETS_KEPT = 1024

# --- the metrics (rebuilt by build()) -------------------------------------------------------
smtp_connections_open: dict[str, Gauge]
smtp_connections: dict[str, Counter]
smtp_connections_refused: dict[str, Counter]
smtp_sessions_cut: dict[str, Counter]
smtp_stress: Gauge
smtp_commands: dict[int, Counter]
smtp_replies: dict[int, Counter]
messages_accepted: dict[str, CounterTally]
messages_rejected: dict[str, Counter]
recipients_rejected: dict[str, Counter]
received_bytes: dict[str, CounterTally]
message_size: HistogramTally
tls_handshakes: dict[str, Counter]
tls_failures: dict[str, Counter]
auth_successes: Counter
auth_failures: Counter
auth_lockouts: dict[str, Counter]
auth_locked_attempts: Counter
senders_rejected: dict[str, Counter]
address_probes: dict[str, Counter]
commit_batch_size: HistogramTally
commit_duration: HistogramTally
commit_failures: Counter
delivery_attempts: Counter
delivery_latency: HistogramTally
outbound_connections_open: Gauge
outbound_connections: Counter
outbound_connections_reused: CounterTally
outbound_connection_failures: Counter
destination_suspended: Gauge
bounces: dict[str, Counter]
local_deliveries: dict[str, CounterTally]
local_delivery_seconds: HistogramTally
mailbox_bytes: Gauge
mailbox_messages: Gauge
dns_queries: dict[str, Counter]
dns_failures: dict[str, Counter]
dns_duration: Histogram
dns_cache_hits: CounterTally
worker_restarts: dict[str, Counter]
pop3_sessions: dict[str, Counter]
pop3_sessions_open: dict[str, Gauge]
pop3_logins: dict[str, Counter]
pop3_retrieved_messages: CounterTally
pop3_retrieved_bytes: CounterTally
pop3_deleted_messages: Counter
imap_sessions: dict[str, Counter]
imap_sessions_open: dict[str, Gauge]
imap_logins: dict[str, Counter]
imap_commands: dict[str, CounterTally]
lmtp_deliveries: dict[str, CounterTally]
auth_results_total: Counter
auth_results: dict[tuple[str, str], CounterTally]
http_injected_recipients: dict[str, CounterTally]
http_requests: Counter
http_auth_failures: Counter
webhook_outbox_depth: Gauge
webhook_posts: Counter
webhook_failures: Counter
bounce_classes: Counter
suppressions_added: Counter
cluster_redis_up: Gauge
cluster_redis_errors: Counter
cluster_fallbacks: Counter
shaping_waits: Counter
shaping_reactions: Counter
source_suspended: Gauge
shaping_rate_factor: Gauge
egress_messages: Counter
warmup_deferred: Counter

_destinations: dict[str, str] = {}
_attempts: dict[tuple[str, str], CounterTally] = {}
_egress_tallies: dict[str, CounterTally] = {}
_result_sets: dict[tuple[tuple[str, str], ...], ResultsTally] = {}


def build() -> None:
    """(Re)create every metric with prometheus-client's current value class."""
    global smtp_connections_open, smtp_connections, smtp_connections_refused
    global smtp_sessions_cut, smtp_stress
    global smtp_commands, smtp_replies, messages_accepted, messages_rejected, recipients_rejected
    global received_bytes, message_size, tls_handshakes, tls_failures, auth_successes
    global auth_failures, auth_lockouts, auth_locked_attempts, senders_rejected, address_probes
    global commit_batch_size, commit_duration, commit_failures
    global delivery_attempts, delivery_latency, outbound_connections_open, outbound_connections
    global outbound_connections_reused, outbound_connection_failures, bounces
    global destination_suspended
    global local_deliveries, local_delivery_seconds, mailbox_bytes, mailbox_messages
    global dns_queries, dns_failures, dns_duration, dns_cache_hits, worker_restarts
    global pop3_sessions, pop3_sessions_open, pop3_logins, pop3_retrieved_messages
    global pop3_retrieved_bytes, pop3_deleted_messages
    global imap_sessions, imap_sessions_open, imap_logins, imap_commands
    global lmtp_deliveries, auth_results_total, auth_results
    global http_injected_recipients
    global http_requests, http_auth_failures
    global webhook_outbox_depth, webhook_posts, webhook_failures
    global bounce_classes, suppressions_added
    global cluster_redis_up, cluster_redis_errors, cluster_fallbacks
    global shaping_waits, shaping_reactions, source_suspended, shaping_rate_factor
    global egress_messages, warmup_deferred

    def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, doc, labels, registry=None)

    def by(metric: MetricWrapperBase, values: tuple[str, ...]) -> dict[str, Counter]:
        return {v: metric.labels(v) for v in values}  # type: ignore[misc]

    def tallied(children: dict[str, Counter]) -> dict[str, CounterTally]:
        return {v: CounterTally(child) for v, child in children.items()}

    _TALLIES.clear()

    open_gauge = Gauge(
        "tachymail_smtp_connections_open",
        "Inbound SMTP connections open now, by listener role.",
        ["listener"],
        registry=None,
        multiprocess_mode="livesum",
    )
    smtp_connections_open = {r: open_gauge.labels(r) for r in LISTENER_ROLES}
    listener = ("listener",)
    smtp_connections = by(
        counter(
            "tachymail_smtp_connections_total",
            "Inbound SMTP connections accepted by the kernel, by listener role.",
            listener,
        ),
        LISTENER_ROLES,
    )
    smtp_connections_refused = by(
        counter(
            "tachymail_smtp_connections_refused_total",
            "Inbound connections refused with 421 or 554, by reason.",
            ("reason",),
        ),
        REFUSE_REASONS,
    )
    smtp_sessions_cut = by(
        counter(
            "tachymail_smtp_sessions_cut_total",
            "Inbound SMTP sessions the server ended with 421 4.4.2 (or aborted), by limit.",
            ("reason",),
        ),
        CUT_REASONS,
    )
    smtp_stress = Gauge(
        "tachymail_smtp_workers_in_stress",
        "SMTP workers in stress mode now (near their connection limit, short idle timeouts).",
        registry=None,
        multiprocess_mode="livesum",
    )
    commands = counter("tachymail_smtp_commands_total", "SMTP commands received.", ("verb",))
    smtp_commands = {n: commands.labels(v) for n, v in VERBS.items()}
    replies = counter(
        "tachymail_smtp_replies_total", "SMTP replies sent, by code class (2xx..5xx).", ("class",)
    )
    smtp_replies = {d: replies.labels(f"{d}xx") for d in range(2, 6)}
    messages_accepted = tallied(
        by(
            counter(
                "tachymail_messages_accepted_total",
                "Messages committed to the queue and acknowledged with 250, by listener role.",
                listener,
            ),
            LISTENER_ROLES,
        )
    )
    messages_rejected = by(
        counter(
            "tachymail_messages_rejected_total",
            "Messages refused at the end of DATA/BDAT, by reason.",
            ("reason",),
        ),
        REJECT_REASONS,
    )
    recipients_rejected = by(
        counter(
            "tachymail_recipients_rejected_total", "RCPT commands refused, by reason.", ("reason",)
        ),
        RCPT_REJECT_REASONS,
    )
    received_bytes = tallied(
        by(
            counter(
                "tachymail_received_bytes_total",
                "Octets of accepted messages (as queued), by listener role.",
                listener,
            ),
            LISTENER_ROLES,
        )
    )
    message_size = HistogramTally(
        Histogram(
            "tachymail_message_size_bytes",
            "Size of accepted messages.",
            buckets=_BYTE_BUCKETS,
            registry=None,
        ),
        _BYTE_BUCKETS,
    )
    tls_handshakes = by(
        counter(
            "tachymail_tls_handshakes_total",
            "Inbound TLS handshakes completed (STARTTLS or implicit), by listener role.",
            listener,
        ),
        LISTENER_ROLES,
    )
    tls_failures = by(
        counter(
            "tachymail_tls_handshake_failures_total",
            "Inbound STARTTLS handshakes that failed, by listener role.",
            listener,
        ),
        LISTENER_ROLES,
    )
    auth_successes = counter("tachymail_auth_successes_total", "Successful SMTP AUTH.")
    auth_failures = counter("tachymail_auth_failures_total", "Failed SMTP AUTH attempts.")
    auth_lockouts = by(
        counter(
            "tachymail_auth_lockouts_total",
            "AUTH lockouts begun after too many failures, by scope (client ip or user).",
            ("scope",),
        ),
        LOCKOUT_SCOPES,
    )
    auth_locked_attempts = counter(
        "tachymail_auth_locked_attempts_total",
        "AUTH attempts refused with 454 4.7.0 during a lockout, without checking a password.",
    )
    senders_rejected = by(
        counter(
            "tachymail_senders_rejected_total",
            "MAIL FROM commands refused, by reason.",
            ("reason",),
        ),
        MAIL_REJECT_REASONS,
    )
    address_probes = by(
        counter(
            "tachymail_address_probes_total",
            "Recipient-verification probes to a relay domain's next hop, by result.",
            ("result",),
        ),
        PROBE_RESULTS,
    )
    commit_batch_size = HistogramTally(
        Histogram(
            "tachymail_queue_commit_batch_size",
            "Operations (messages or delivery results) per synced queue transaction.",
            buckets=_BATCH_BUCKETS,
            registry=None,
        ),
        _BATCH_BUCKETS,
    )
    commit_duration = HistogramTally(
        Histogram(
            "tachymail_queue_commit_duration_seconds",
            "Time from the start of a group commit to its fsync.",
            buckets=_LATENCY_BUCKETS,
            registry=None,
        ),
        _LATENCY_BUCKETS,
    )
    commit_failures = counter("tachymail_queue_commit_failures_total", "Failed group commits.")
    delivery_attempts = counter(
        "tachymail_delivery_attempts_total",
        "Recipient delivery attempts, by result and destination (top N next hops, else other).",
        ("result", "destination"),
    )
    delivery_latency = HistogramTally(
        Histogram(
            "tachymail_delivery_latency_seconds",
            "Time from acceptance to successful delivery, per recipient.",
            buckets=_DELIVERY_BUCKETS,
            registry=None,
        ),
        _DELIVERY_BUCKETS,
    )
    outbound_connections_open = Gauge(
        "tachymail_outbound_connections_open",
        "Outbound SMTP connections open now.",
        registry=None,
        multiprocess_mode="livesum",
    )
    outbound_connections = counter(
        "tachymail_outbound_connections_total", "Outbound SMTP connections opened."
    )
    destination_suspended = Gauge(
        "tachymail_destination_suspended",
        "1 while deliveries to the destination (domain, mail host or *.pattern) are "
        "suspended, 0 once resumed (tachymail queue suspend); set by the delivery workers.",
        ["destination"],
        registry=None,
        multiprocess_mode="livemax",
    )
    outbound_connections_reused = CounterTally(
        counter(
            "tachymail_outbound_connections_reused_total",
            "Outbound transactions sent on a connection that had already carried one.",
        )
    )
    outbound_connection_failures = counter(
        "tachymail_outbound_connection_failures_total",
        "Next hops that could not be connected to (every host and address failed).",
    )
    bounces = by(
        counter(
            "tachymail_dsn_generated_total",
            "Delivery status notifications queued, by kind (failed = bounces).",
            ("kind",),
        ),
        DSN_KINDS,
    )
    local_deliveries = tallied(
        by(
            counter(
                "tachymail_local_deliveries_total",
                "Recipient deliveries into local mailboxes, by result (duplicate: already "
                "stored by an earlier attempt, not stored again).",
                ("result",),
            ),
            LOCAL_RESULTS,
        )
    )
    local_delivery_seconds = HistogramTally(
        Histogram(
            "tachymail_local_delivery_seconds",
            "Time from submitting a local delivery to the mailbox store's group commit to its "
            "sync.",
            buckets=_LATENCY_BUCKETS,
            registry=None,
        ),
        _LATENCY_BUCKETS,
    )
    # Every delivery worker reads the same node totals: the latest reading is the value.
    mailbox_bytes = Gauge(
        "tachymail_mailbox_bytes",
        "Octets of the messages in the node's mailbox store (all users).",
        registry=None,
        multiprocess_mode="livemostrecent",
    )
    mailbox_messages = Gauge(
        "tachymail_mailbox_messages",
        "Messages in the node's mailbox store (all users).",
        registry=None,
        multiprocess_mode="livemostrecent",
    )
    queries = counter("tachymail_dns_queries_total", "DNS queries sent, by type.", ("type",))
    dns_queries = by(queries, DNS_TYPES)
    dns_failures = by(
        counter(
            "tachymail_dns_query_failures_total",
            "DNS queries without a usable answer (timeout, SERVFAIL, refused), by type.",
            ("type",),
        ),
        DNS_TYPES,
    )
    dns_duration = Histogram(
        "tachymail_dns_query_duration_seconds",
        "DNS query latency.",
        buckets=_LATENCY_BUCKETS,
        registry=None,
    )
    # tallies: the inbound checks answer several lookups per message from the cache
    dns_cache_hits = CounterTally(
        counter("tachymail_dns_cache_hits_total", "Lookups answered from the cache.")
    )
    worker_restarts = by(
        counter(
            "tachymail_worker_restarts_total",
            "Workers that died unexpectedly and were restarted, by kind.",
            ("kind",),
        ),
        WORKER_KINDS,
    )
    lmtp_deliveries = tallied(
        by(
            counter(
                "tachymail_lmtp_deliveries_total",
                "LMTP recipients answered after DATA, by result (250 only when synced).",
                ("result",),
            ),
            LMTP_RESULTS,
        )
    )
    pop3_sessions = by(
        counter(
            "tachymail_pop3_sessions_total",
            "POP3 connections accepted, by listener role (pop3, pop3s).",
            ("listener",),
        ),
        POP3_ROLES,
    )
    pop3_open = Gauge(
        "tachymail_pop3_sessions_open",
        "POP3 sessions open now, by listener role.",
        ["listener"],
        registry=None,
        multiprocess_mode="livesum",
    )
    pop3_sessions_open = {r: pop3_open.labels(r) for r in POP3_ROLES}
    pop3_logins = by(
        counter(
            "tachymail_pop3_logins_total",
            "POP3 logins (USER/PASS and AUTH), by result; failures are also counted by the "
            "shared AUTH lockout metrics.",
            ("result",),
        ),
        POP3_LOGIN_RESULTS,
    )
    pop3_retrieved_messages = CounterTally(
        counter("tachymail_pop3_retrieved_messages_total", "Messages sent whole by POP3 RETR.")
    )
    pop3_retrieved_bytes = CounterTally(
        counter(
            "tachymail_pop3_retrieved_bytes_total",
            "Octets of messages sent by POP3 RETR and TOP (dot-stuffed wire form).",
        )
    )
    pop3_deleted_messages = counter(
        "tachymail_pop3_deleted_messages_total",
        "Messages expunged by POP3 DELE at the end of a session (UPDATE state).",
    )
    imap_sessions = by(
        counter(
            "tachymail_imap_sessions_total",
            "IMAP connections accepted, by listener role (imap, imaps).",
            ("listener",),
        ),
        IMAP_ROLES,
    )
    imap_open = Gauge(
        "tachymail_imap_sessions_open",
        "IMAP sessions open now, by listener role.",
        ["listener"],
        registry=None,
        multiprocess_mode="livesum",
    )
    imap_sessions_open = {r: imap_open.labels(r) for r in IMAP_ROLES}
    imap_logins = by(
        counter(
            "tachymail_imap_logins_total",
            "IMAP logins (LOGIN and AUTHENTICATE), by result; failures are also counted by "
            "the shared AUTH lockout metrics.",
            ("result",),
        ),
        IMAP_LOGIN_RESULTS,
    )
    imap_commands = tallied(
        by(
            counter(
                "tachymail_imap_commands_total",
                "IMAP commands received, by command (other: unknown or malformed).",
                ("command",),
            ),
            IMAP_COMMANDS,
        )
    )
    auth_results_total = counter(
        "tachymail_auth_results_total",
        "Inbound message-authentication results, by method and RFC 8601 result "
        "(one per message and method; dkim one per signature checked).",
        ("method", "result"),
    )
    # tallies: six results per message on an MX, each an mmap write as a plain counter
    auth_results = {
        (method, result): CounterTally(auth_results_total.labels(method, result))
        for method in AUTH_METHODS
        for result in AUTH_RESULTS
    }
    # Labelled by the configured webhooks' names (a bounded set); only delivery worker 0
    # sends, so its latest reading is the node's.
    webhook_outbox_depth = Gauge(
        "tachymail_webhook_outbox_depth",
        "Events waiting in the durable outbox for a webhook, by webhook name.",
        ["webhook"],
        registry=None,
        multiprocess_mode="livemostrecent",
    )
    webhook_posts = counter(
        "tachymail_webhook_posts_total",
        "Batches of events POSTed to webhooks, by webhook and result (ok: a 2xx answer; "
        "http_error: any other status; timeout; connection_error).",
        ("webhook", "result"),
    )
    webhook_failures = counter(
        "tachymail_webhook_failures_total",
        "POSTs to a webhook that failed and will be retried, by webhook.",
        ("webhook",),
    )
    # class: a bounce class of the rules (built-in ones and the operator's: a bounded set)
    bounce_classes = counter(
        "tachymail_bounces_total",
        "Recipients that failed permanently, by the bounce class of the last reply "
        "(unknown: no rule matched).",
        ("class",),
    )
    suppressions_added = counter(
        "tachymail_suppressions_added_total",
        "Recipients put on the suppression list by the delivery worker, by bounce class.",
        ("class",),
    )
    cluster_redis_up = Gauge(
        "tachymail_cluster_redis_up",
        "1 while this process reaches the cluster's Redis ([cluster] redis), 0 while it "
        "works on its local share of cluster limits.",
        registry=None,
        multiprocess_mode="livemin",
    )
    cluster_redis_errors = counter(
        "tachymail_cluster_redis_errors_total",
        "Redis calls that failed or timed out (each one makes the node use its local share).",
    )
    # what: "rate", "connections" or "replication" (a bounded set)
    cluster_fallbacks = counter(
        "tachymail_cluster_fallbacks_total",
        "Grants of a cluster-wide limit taken from the node's local share because Redis "
        "was away, and list changes that waited for it.",
        ("what",),
    )
    # rule: a shaping rule's name (the operator's and the built-in ones: a bounded set)
    shaping_waits = counter(
        "tachymail_shaping_waits_total",
        "Messages that waited for a shaping rule's rate or connection limit, by rule.",
        ("rule",),
    )
    # action: suspend_destination, suspend_source or throttle
    shaping_reactions = counter(
        "tachymail_shaping_reactions_total",
        "Automatic reactions to replies (a shaping [[reaction]] matched), by action.",
        ("action",),
    )
    source_suspended = Gauge(
        "tachymail_source_suspended",
        "1 while an egress source is suspended towards a destination by a shaping "
        "reaction, 0 once lifted.",
        ["source", "destination"],
        registry=None,
        multiprocess_mode="livemax",
    )
    shaping_rate_factor = Gauge(
        "tachymail_shaping_rate_factor",
        "The factor a throttle reaction applies to a rule's rate now (1: the rule's rate).",
        ["rule", "source"],
        registry=None,
        multiprocess_mode="livemin",
    )
    egress_messages = counter(
        "tachymail_egress_messages_total",
        'Transactions sent from each egress source (the default source is "default").',
        ("source",),
    )
    warmup_deferred = counter(
        "tachymail_warmup_deferred_total",
        "Messages held back because their source's warm-up cap for the day was reached.",
        ("source",),
    )
    # route: the route's path template (a bounded set; "unmatched" for any other path)
    http_requests = counter(
        "tachymail_http_requests_total",
        "HTTP API requests answered, by route and status code.",
        ("route", "status"),
    )
    http_auth_failures = counter(
        "tachymail_http_auth_failures_total",
        "HTTP API requests with a wrong bearer token (also counted by the shared AUTH "
        "lockout metrics).",
    )
    http_injected_recipients = tallied(
        by(
            counter(
                "tachymail_http_injected_recipients_total",
                "Recipients of HTTP injections (POST /api/v1/messages), by result: accepted "
                "(queued), or why refused.",
                ("result",),
            ),
            INJECT_RESULTS,
        )
    )
    _destinations.clear()
    _attempts.clear()
    _egress_tallies.clear()
    _result_sets.clear()


def destination(key: str) -> str:
    """The label for next hop *key*: itself for the first DESTINATIONS seen, else "other"."""
    if key in _destinations:
        return key
    if len(_destinations) < DESTINATIONS:
        _destinations[key] = key
        return key
    return "other"


def delivery_attempt(result: str, hop: str) -> None:
    """Count one recipient's attempt with *result* ("delivered", "deferred", "bounced")."""
    label = destination(hop)
    tally = _attempts.get((result, label))
    if tally is None:
        tally = CounterTally(delivery_attempts.labels(result, label))
        _attempts[(result, label)] = tally
    tally.inc()


def auth_result(method: str, result: str) -> None:
    """Count one *result* of *method* (``tachymail_auth_results_total``). A pair outside
    AUTH_METHODS x AUTH_RESULTS counts under result "other" (and method "other" for an
    unknown method), so that no label carries an unbounded value."""
    _auth_tally(method, result).inc()


def auth_results_of(results: tuple[tuple[str, str], ...]) -> None:
    """Count each (method, result) of one message, as :func:`auth_result` does: one
    increment of the tally of this set of results (an MX sees few sets, over and over)."""
    tally = _result_sets.get(results)
    if tally is None:
        if len(_result_sets) >= RESULT_SETS_KEPT:
            for method, result in results:
                auth_result(method, result)
            return
        tally = _result_sets[results] = ResultsTally([_auth_tally(*pair) for pair in results])
    tally.inc()


def _auth_tally(method: str, result: str) -> CounterTally:
    child = auth_results.get((method, result))
    if child is None:
        key = (method if method in AUTH_METHODS else "other", "other")
        child = auth_results.get(key)
        if child is None:
            child = auth_results[key] = CounterTally(auth_results_total.labels(*key))
    return child


def egress_tally(source: str) -> CounterTally:
    """The tally of egress *source*'s transactions (``.pending += 1`` per transaction)."""
    tally = _egress_tallies.get(source)
    if tally is None:
        tally = _egress_tallies[source] = CounterTally(egress_messages.labels(source))
    return tally


def flush() -> None:
    """Add the hot-path tallies to the counters and zero them."""
    for verb, count in enumerate(COMMANDS):
        if count:
            COMMANDS[verb] = 0
            smtp_commands.get(verb, smtp_commands[C.VERB_UNKNOWN]).inc(count)
    for digit, count in enumerate(REPLIES):
        if count:
            REPLIES[digit] = 0
            child = smtp_replies.get(digit)
            if child is not None:
                child.inc(count)
    for tally in _TALLIES:
        tally.flush()


build()
