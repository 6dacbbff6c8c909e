"""``POST /api/v1/messages``: HTTP injection, with SMTP intake's durability promise.

What a client may rely on:

- The reply is sent only after every accepted message is in a synced queue commit (the
  group committer's futures): a 200 lists a queue id per accepted recipient
  (``queue_ids``) and a reason per refused one (``failed_recipients``), with their counts.
- Up to 10,000 recipients. The whole request is refused, nothing queued, with a JSON error
  when the body is not JSON (400 ``bad_json``), not ``application/json`` (415), over
  ``[http] max_body_bytes`` (413 ``too_large``), has an unknown or wrong field (422
  ``invalid_body``), an address SMTP would refuse (422 ``invalid_address``: the envelope
  sender or a recipient, checked with the SMTP command parser's RFC 5321 grammar), a
  template that does not compile or render for some recipient (422 ``template_error``,
  naming the recipient), content that does not make a message (422 ``invalid_content``)
  or a message over ``[limits] max_message_size`` (413 ``message_too_large``).
- The envelope sender may not be null: injected mail is originated mail, whose bounces
  and hard-bounce suppressions need a return path; the null reverse-path is for
  notifications (RFC 5321 §4.5.5, RFC 3834).
- A recipient is refused alone, in ``failed_recipients``, when it repeats an earlier one
  (domain compared case-insensitively), is on the suppression list for the envelope
  sender's domain or globally (``suppressed: <reason>``), when the operator's content
  checks (``[[header_check]]``, ``[[body_check]]``, hop count) reject its message, or when
  the queue cannot take it (``storage full, try later`` or ``queue error, try later``).
  When the queue refused every accepted recipient the reply is 503 ``storage_full`` or
  ``queue_error`` instead: nothing was queued, try later (SMTP's 452 4.3.1 and 451 4.3.0).
- Messages: one per distinct rendered content (``"static"`` content, or templates that
  render alike, share one), split into envelopes of at most ``[limits] max_recipients``
  recipients as an SMTP transaction would be. Each gets a Received field (``with HTTP``,
  the token's name), is DKIM-signed like submitted mail (``[dkim]``, by its From domain,
  else the envelope sender's), and is queued held when a content check says hold. The
  envelope records listener ``http``, the client address, the token name as ``auth``, and
  the request's tags, metadata and pool; reception events go to the webhooks' outbox in
  the same commit when a ``[[webhook]]`` wants them.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, NotRequired

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator
from typing_extensions import TypedDict

from tachymail.frontend import log_intake
from tachymail.http.compose import (
    ContentProblem,
    MessageFrame,
    MessageParts,
    Rendered,
    TemplateProblem,
    Templates,
    message_id,
    prepare_raw,
)
from tachymail.http.errors import ApiError, json_response, read_json
from tachymail.http.openapi import error_response, json_content, model_schemas
from tachymail.http.server import HTTP, HttpContext
from tachymail.metrics import m
from tachymail.protocol import commands as C
from tachymail.protocol.errors import SmtpSyntaxError
from tachymail.protocol.mime import header_value
from tachymail.queue.envelope import ACTIVE, HELD, Envelope, Recipient, new_queue_id
from tachymail.queue.events import events_wanted, make_event, record_events
from tachymail.queue.store import QueueStore, StorageFull, put_message
from tachymail.queue.suppression import SuppressionList, shared_list
from tachymail.smtp.checks import DISCARD, HOLD, REJECT, checks_for

__all__ = ["OPENAPI", "InjectReply", "InjectRequest", "setup"]

log = logging.getLogger(__name__)

PATH = "/api/v1/messages"
MAX_RECIPIENTS = 10_000
#: messages built, signed and committed per round: bounds the memory one request holds
#: (with its octets bound below) and lets other clients in between
ROUND_MESSAGES = 256
ROUND_OCTETS = 32 * 1024 * 1024
#: renders between two yields to the event loop (a render costs tens of microseconds)
RENDERS_PER_YIELD = 200
#: the rendered texts of one request may come to this many times [http] max_body_bytes
RENDER_FACTOR = 4
FULL = "storage full, try later"
QUEUE_ERROR = "queue error, try later"
DUPLICATE = "duplicate of an earlier recipient"


class RecipientIn(TypedDict):
    """One recipient, with substitutions overriding the request's (a TypedDict, not a
    model: ten thousand of them validate in half the time)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    email: Annotated[str, Field(min_length=3, max_length=254)]
    substitutions: NotRequired[dict[str, Any] | None]


def _content_kind(value: Any) -> str:
    return "raw" if isinstance(value, str) else "parts"


Content = Annotated[
    Annotated[str, Tag("raw"), Field(min_length=1)] | Annotated[MessageParts, Tag("parts")],
    Discriminator(_content_kind),
]


class InjectRequest(BaseModel):
    """The body of ``POST /api/v1/messages``: ``content`` is an RFC 5322 message as a
    string, or the parts of one to build."""

    model_config = ConfigDict(extra="forbid")

    envelope_sender: str = Field(max_length=254)
    recipients: list[RecipientIn] = Field(min_length=1, max_length=MAX_RECIPIENTS)
    content: Content
    substitutions: dict[str, Any] = Field(default_factory=dict)
    template_dialect: Literal["jinja", "static"] = "static"
    pool: str = Field(default="", max_length=64, pattern=r"^[A-Za-z0-9._-]*$")
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=32
    )
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        # It travels in every envelope record and every event of the message.
        try:
            encoded = orjson.dumps(value)
        except orjson.JSONEncodeError:  # nested deeper than the queue record can hold
            raise ValueError("cannot be stored: nested too deeply") from None
        if len(encoded) > 4096:
            raise ValueError("must be at most 4096 octets as JSON")
        return value


class InjectReply(BaseModel):
    """The outcome: a queue id per accepted recipient, a reason per refused one."""

    model_config = ConfigDict(extra="forbid")

    success_count: int
    fail_count: int
    queue_ids: dict[str, str]
    failed_recipients: dict[str, str]


def check_address(address: str) -> str | None:
    """The problem with *address* as an RFC 5321 mailbox with a domain (the SMTP command
    parser's grammar, UTF-8 allowed as with SMTPUTF8), or None when it is one."""
    try:
        mailbox, params = C.parse_rcpt(f"TO:<{address}>".encode("utf-8", "surrogatepass"), True)
    except SmtpSyntaxError as exc:
        return exc.text
    except UnicodeError:
        return "not valid Unicode"
    if params or mailbox != address or "@" not in mailbox:
        return "not a mailbox address (local-part@domain)"
    return None


@dataclass(slots=True)
class _Group:
    """Recipients that get the same rendered message."""

    rendered: Rendered
    recipients: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Outcome:
    queue_ids: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    storage_full: int = 0
    queue_error: int = 0
    #: refused recipients by metric label, counted once the request is answered 200
    refused: Counter[str] = field(default_factory=Counter)


async def inject_messages(request: web.Request) -> web.Response:
    """Queue the request's messages; see the module docstring for every reply."""
    http = request.app[HTTP]
    worker = http.worker
    # Counted from the first octet read: the queue's next commit lingers for a request
    # that may still join it, as for an open SMTP session.
    worker.http_injections += 1
    try:
        body = await read_json(request, InjectRequest, http.config.http.max_body_bytes)
        outcome = await Injection(http, request, body).run()
    finally:
        worker.http_injections -= 1
    accepted = len(outcome.queue_ids)
    if not accepted and (outcome.storage_full or outcome.queue_error):
        if outcome.storage_full:
            raise ApiError(503, "storage_full", "the queue is full: nothing was queued, try later")
        raise ApiError(503, "queue_error", "the queue failed: nothing was queued, try later")
    reply = {
        "success_count": accepted,
        "fail_count": len(outcome.failed),
        "queue_ids": outcome.queue_ids,
        "failed_recipients": outcome.failed,
    }
    return json_response(reply)


class Injection:
    """One request's work: checks, rendering, building, signing, committing."""

    def __init__(self, http: HttpContext, request: web.Request, body: InjectRequest) -> None:
        self.http = http
        self.worker = http.worker
        self.config = http.config
        self.body = body
        self.loop = asyncio.get_running_loop()
        self.client_ip = request.remote or ""
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.client_port = int(peer[1]) if isinstance(peer, tuple) and len(peer) > 1 else 0
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        self.tls = (
            f"{ssl_object.version()} {ssl_object.cipher()[0]}" if ssl_object is not None else None
        )
        self.token = _token_name(request)
        self.outcome = _Outcome()
        #: the built messages' shared parts (None for raw content)
        self.frame: MessageFrame | None = None
        self.events = events_wanted(self.config, "reception")

    async def run(self) -> _Outcome:
        body = self.body
        pools = {p.name for p in self.config.egress_pools}
        if body.pool and body.pool != "default" and body.pool not in pools:
            known = ", ".join(sorted(pools | {"default"}))
            problem = f"no egress pool {body.pool!r} is configured (known: {known})"
            raise ApiError(
                422, "invalid_body", f"pool: {problem}", [{"field": "pool", "problem": problem}]
            )
        recipients, problems = self._check_recipients()
        if problems:
            first = problems[0]
            message = f"{first['field']}: {first['problem']}"
            raise ApiError(422, "invalid_address", message, problems)
        recipients = self._not_suppressed(recipients)
        try:
            templates = Templates(body.content, body.template_dialect)
        except TemplateProblem as exc:
            raise ApiError(422, "template_error", str(exc), {"field": exc.field}) from None
        if not isinstance(body.content, str):
            try:
                self.frame = MessageFrame(body.content)
            except ContentProblem as exc:
                raise ApiError(422, "invalid_content", str(exc), {"field": exc.field}) from None
        groups = await self._render(templates, recipients)
        now = time.time()
        refuse_now = True
        pending: list[tuple[Envelope, bytes]] = []
        octets = 0
        for group in groups:
            for envelope, content in self._messages(group, now, refuse_now):
                refuse_now = False
                pending.append((envelope, content))
                octets += len(content)
                if len(pending) >= ROUND_MESSAGES or octets >= ROUND_OCTETS:
                    await self._commit(pending)
                    pending, octets = [], 0
        if pending:
            await self._commit(pending)
        for result, count in self.outcome.refused.items():
            m.http_injected_recipients[result].inc(count)
        return self.outcome

    # --- checks ------------------------------------------------------------------------

    def _check_recipients(
        self,
    ) -> tuple[list[tuple[str, dict[str, Any] | None]], list[dict[str, str]]]:
        """The distinct recipients with their substitutions (a repeated one is refused
        alone), and the address problems (up to 100; any refuses the request)."""
        body = self.body
        problems: list[dict[str, str]] = []
        if not body.envelope_sender:
            problems.append(
                {
                    "field": "envelope_sender",
                    "problem": "the null sender is for notifications (RFC 5321 §4.5.5); "
                    "injected mail needs a return path",
                }
            )
        else:
            sender_problem = check_address(body.envelope_sender)
            if sender_problem is not None:
                problems.append({"field": "envelope_sender", "problem": sender_problem})
        seen: set[str] = set()
        kept: list[tuple[str, dict[str, Any] | None]] = []
        for index, rcpt in enumerate(body.recipients):
            address = rcpt["email"]
            problem = check_address(address)
            if problem is not None:
                problems.append({"field": f"recipients.{index}.email", "problem": problem})
                if len(problems) >= 100:
                    break
                continue
            key = address
            if not address.islower():  # the domain compares case-insensitively
                at = address.rfind("@")
                key = address[:at] + address[at:].lower()
            if key in seen:
                self._fail(address, DUPLICATE, "duplicate")
                continue
            seen.add(key)
            kept.append((address, rcpt.get("substitutions")))
        return kept, problems

    def _not_suppressed(
        self, recipients: list[tuple[str, dict[str, Any] | None]]
    ) -> list[tuple[str, dict[str, Any] | None]]:
        suppressions = _suppression_list(self.http)
        if suppressions.is_empty():
            return recipients
        domain = self.body.envelope_sender.rpartition("@")[2].lower()
        kept = []
        now = time.time()
        for address, substitutions in recipients:
            entry = suppressions.check(address, domain, now)
            if entry is None:
                kept.append((address, substitutions))
                continue
            scope = "" if entry.scope == "global" else f" for {entry.scope}"
            self._fail(address, f"suppressed{scope}: {entry.reason}", "suppressed")
        return kept

    def _fail(self, address: str, reason: str, metric: str) -> None:
        self.outcome.failed[address] = reason
        self.outcome.refused[metric] += 1

    # --- rendering -------------------------------------------------------------------------

    async def _render(
        self, templates: Templates, recipients: list[tuple[str, dict[str, Any] | None]]
    ) -> list[_Group]:
        """Every recipient's rendered parts, grouped by equal results; all of them before
        anything is queued, so that a template error refuses the whole request."""
        if not recipients:
            return []
        if not templates.personal:
            return [_Group(templates.render("", {}), [a for a, _ in recipients])]
        groups: dict[Rendered, _Group] = {}
        shared = self.body.substitutions
        budget = RENDER_FACTOR * self.config.http.max_body_bytes
        for count, (address, own) in enumerate(recipients, 1):
            variables = {**shared, **own} if own else shared
            try:
                rendered = templates.render(address, variables)
            except TemplateProblem as exc:
                details = {"recipient": exc.recipient, "field": exc.field, "problem": exc.problem}
                message = f"recipient {exc.recipient}: {exc}"
                raise ApiError(422, "template_error", message, details) from None
            group = groups.get(rendered)
            if group is None:
                budget -= sum(len(part) for part in rendered if part)
                if budget < 0:
                    raise ApiError(
                        413, "too_large", "the rendered messages are too large for one request"
                    )
                group = groups[rendered] = _Group(rendered)
            group.recipients.append(address)
            if count % RENDERS_PER_YIELD == 0:
                await asyncio.sleep(0)  # other clients of this worker get their turn
        return list(groups.values())

    # --- building --------------------------------------------------------------------------

    def _messages(
        self, group: _Group, now: float, refuse_now: bool
    ) -> Iterator[tuple[Envelope, bytes]]:
        """The envelopes and contents of *group*: its message built and checked once, its
        recipients split by ``[limits] max_recipients``. A problem with the message refuses
        the whole request when *refuse_now* (nothing is queued yet), else only the group."""
        body = self.body
        per_envelope = self.config.limits.max_recipients
        chunks = [
            group.recipients[i : i + per_envelope]
            for i in range(0, len(group.recipients), per_envelope)
        ]
        ids = [new_queue_id() for _ in chunks]
        msgid = message_id(ids[0], self.worker.hostname)
        try:
            if isinstance(body.content, str):
                content = prepare_raw(group.rendered[0], msgid=msgid, now=now)
            else:
                personal = len(group.recipients) == 1
                to = group.recipients[0] if personal else "undisclosed-recipients:;"
                assert self.frame is not None
                content = self.frame.build(group.rendered, to=to, msgid=msgid, now=now)
        except ContentProblem as exc:
            if refuse_now:
                raise ApiError(422, "invalid_content", str(exc), {"field": exc.field}) from None
            for address in group.recipients:
                self._fail(address, f"invalid content: {exc}", "invalid")
            return
        limit = self.config.limits.max_message_size
        if len(content) > limit:
            if refuse_now:
                raise ApiError(
                    413, "message_too_large", f"the message is over {limit} octets ({len(content)})"
                )
            for address in group.recipients:
                self._fail(address, f"message over {limit} octets", "invalid")
            return
        verdict = checks_for(self.config).check(content)
        if verdict.action == REJECT:
            reason = verdict.reply.decode("utf-8", "replace").strip()
            log.warning("HTTP injection refused by content checks: %s", verdict.reason)
            for address in group.recipients:
                self._fail(address, f"refused: {reason}", "rejected")
            return
        if verdict.action == DISCARD:
            log.info("%s discarded, not queued: %s", ids[0], verdict.reason)
            for queue_id, chunk in zip(ids, chunks, strict=True):
                for address in chunk:
                    self.outcome.queue_ids[address] = queue_id
            return
        content = verdict.content
        state = HELD if verdict.action == HOLD else ACTIVE
        mail_params: dict[str, str] = {}
        if not content.isascii():
            mail_params["BODY"] = "8BITMIME"
        for queue_id, chunk in zip(ids, chunks, strict=True):
            params = dict(mail_params)
            if not body.envelope_sender.isascii() or not "".join(chunk).isascii():
                params["SMTPUTF8"] = ""
            envelope = Envelope(
                id=queue_id,
                sender=body.envelope_sender,
                recipients=[Recipient(address, {}) for address in chunk],
                mail_params=params,
                arrival=now,
                client_ip=self.client_ip,
                client_port=self.client_port,
                listener="http",
                tls=self.tls,
                auth=self.token,
                state=state,
                tags=list(body.tags),
                metadata=dict(body.metadata),
                pool=body.pool,
            )
            yield envelope, content

    def _received(self, envelope: Envelope) -> bytes:
        protocol = "HTTPS" if self.tls else "HTTP"
        auth = f" (token {self.token})" if self.token else ""
        rcpt = (
            f"\r\n\tfor <{envelope.recipients[0].address}>" if len(envelope.recipients) == 1 else ""
        )
        return (
            f"Received: from [{self.client_ip}]\r\n\tby {self.worker.hostname} (Tachymail) "
            f"with {protocol} id {envelope.id}{auth}{rcpt};\r\n"
            f"\t{email.utils.formatdate(envelope.arrival)}\r\n"
        ).encode()

    # --- committing ------------------------------------------------------------------------

    async def _commit(self, batch: list[tuple[Envelope, bytes]]) -> None:
        """Sign, then queue *batch*; returns once its commits resolved."""
        signer = self.worker.dkim
        signatures = [b""] * len(batch)
        if signer is not None:
            # Signing hashes every message: off the event loop, once per distinct content.
            signatures = await self.loop.run_in_executor(None, _sign_all, signer, batch)
        operations = []
        for (envelope, content), signature in zip(batch, signatures, strict=True):
            # On top as submission has it: the signature, then our Received, then the rest.
            whole = b"".join((signature, self._received(envelope), content))
            envelope.size = len(whole)
            operations.append(self._operation(envelope, whole))

        def round_operation(store: QueueStore, txn: Any) -> list[Exception | None]:
            return [operation(store, txn) for operation in operations]

        # The round is one operation of the group commit: one future, and no commit can
        # start with only the first messages of the round in it.
        results: list[Any]
        try:
            results = await self.worker.committer.submit_operation(round_operation)
        except Exception as exc:  # the whole commit failed: StorageFull or a storage error
            results = [exc] * len(batch)
        for (envelope, content), result in zip(batch, results, strict=True):
            self._committed(envelope, content, result)

    def _operation(self, envelope: Envelope, content: bytes) -> Any:
        """The message's put, and its reception events in the same transaction."""
        put = put_message(envelope, content)
        if not self.events:
            return put
        events = [
            make_event(
                "reception",
                envelope=envelope,
                recipient=r.address,
                sender=envelope.sender,
                remote_ip=self.client_ip,
                code=250,
                enhanced_code="2.0.0",
                reply=f"queued as {envelope.id}",
            )
            for r in envelope.recipients
        ]
        record = record_events(events)

        def operation(store: QueueStore, txn: Any) -> Exception | None:
            refused = put(store, txn)
            if refused is None:
                record(store, txn)
            return refused

        return operation

    def _committed(self, envelope: Envelope, content: bytes, result: object) -> None:
        addresses = [r.address for r in envelope.recipients]
        if isinstance(result, BaseException):
            if isinstance(result, StorageFull):
                log.error("queue full, HTTP injection of %s refused: %s", envelope.id, result)
                self.outcome.storage_full += 1
                reason, metric = FULL, "storage_full"
            else:
                log.error("queue commit of HTTP injection %s failed: %s", envelope.id, result)
                self.outcome.queue_error += 1
                reason, metric = QUEUE_ERROR, "error"
            for address in addresses:
                self._fail(address, reason, metric)
            return
        for address in addresses:
            self.outcome.queue_ids[address] = envelope.id
        m.http_injected_recipients["accepted"].inc(len(addresses))
        notifier = self.worker.notifier
        if notifier is not None:
            notifier.queued(envelope.id, envelope.recipients)
        self.worker.accepted += 1
        if log.isEnabledFor(logging.INFO):
            found = header_value(content, b"Message-ID")
            log_intake(log, envelope, found.decode("utf-8", "replace") if found else "")


def _sign_all(signer: Any, batch: list[tuple[Envelope, bytes]]) -> list[bytes]:
    """The DKIM-Signature field for each content of *batch* (b"" when its signer has no
    domain for it); a content shared by several envelopes is signed once. Runs in an
    executor thread."""
    signed: dict[int, bytes] = {}
    out = []
    for envelope, content in batch:
        signature = signed.get(id(content))
        if signature is None:
            signature = b""
            domain = signer.signing_domain(envelope.sender, content)
            if domain is not None:
                try:
                    signature = signer.sign(content, domain)
                except ValueError as exc:  # no From (raw content): queued unsigned, as SMTP
                    log.error("DKIM signing of %s failed: %s; queued unsigned", envelope.id, exc)
            signed[id(content)] = signature
        out.append(signature)
    return out


def _token_name(request: web.Request) -> str | None:
    """The name of the token the request authenticated with (H1's middleware keeps it)."""
    token = request.get("token")
    name = getattr(token, "name", token)
    return str(name) if name else None


def _suppression_list(http: HttpContext) -> SuppressionList:
    """The process's one suppression list (LMDB must not open an environment twice in a
    process): the SMTP worker's (its RCPT check's), else the queue module's shared one."""
    own = getattr(http.worker, "suppressions", None)
    if isinstance(own, SuppressionList):
        return own
    return shared_list(http.config.data_path)


def setup(app: web.Application) -> None:
    """Add ``POST /api/v1/messages`` to *app*."""
    app.router.add_post(PATH, inject_messages)


#: the OpenAPI 3.1 fragment of this module's route (merged by http/server.py, which adds
#: the security requirement and the 401, 403 and 429 of its auth middleware)
OPENAPI: dict[str, Any] = {
    "paths": {
        PATH: {
            "post": {
                "operationId": "injectMessages",
                "summary": "Inject messages: queued (synced) before the reply",
                "description": "Builds (or takes as given) the message, renders per-recipient "
                "templates (template_dialect jinja), DKIM-signs as submission does, refuses "
                "suppressed and duplicate recipients alone, and answers once the queue "
                "commit is synced.",
                "tags": ["injection"],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/InjectRequest"}
                        }
                    },
                },
                "responses": {
                    "200": json_content(
                        "InjectReply",
                        "Queued: a queue id per accepted recipient, a reason per refused one",
                    ),
                    "400": error_response(400, "The body is not JSON (bad_json)"),
                    "413": error_response(
                        413,
                        "The body is over [http] max_body_bytes (too_large), or a message "
                        "built from it over [limits] max_message_size (message_too_large)",
                    ),
                    "415": error_response(415),
                    "422": error_response(
                        422,
                        "Nothing queued: invalid_body (a field is wrong or unknown), "
                        "invalid_address, template_error (names the recipient), "
                        "invalid_content",
                    ),
                    "503": error_response(
                        503,
                        "The queue took none of the messages (storage_full, queue_error): "
                        "nothing was queued, try later",
                    ),
                },
            }
        }
    },
    "components": {"schemas": model_schemas(InjectRequest, InjectReply)},
}
