"""RFC 8621 Identity, EmailSubmission and VacationResponse.

EmailSubmission/set sends an email of the user's mailboxes the way SMTP AUTH submission
does: the envelope sender must be an address the user may send as (``[auth] senders``,
the same check as MAIL FROM after AUTH), the Bcc field is removed, a Received field is
added, the message is DKIM-signed by ``[dkim]`` and queued through the worker's group
commit (the response comes after the synced commit), and delivery handles retries and
DSNs as for any queued message.

Each submission is kept as an EmailSubmission record in the user's mailbox store
(``tachymail.mailbox.submissions``, bounded by ``[jmap] submission_records`` and
``submission_days``), so /get, /changes, /query and /queryChanges see it from every
worker process. ``undoStatus`` is "final" at once (nothing is held back for an undo:
``maxDelayedSend`` is 0), so an update to "canceled" is ``cannotUnsend``; destroy removes
the record, never the delivery. ``deliveryStatus`` is read from the queue at each /get
(see :func:`_delivery_status`); as it is not part of the record, its changes do not change
the EmailSubmission state.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from tachymail.jmap.account import Account
from tachymail.jmap.core import Call, MethodError, arg, id_list, unsigned
from tachymail.jmap.mail import content_key, email_set, requested_properties, utc_date
from tachymail.jmap.render import as_addresses, header_fields
from tachymail.jmap.view import email_id, parse_id, thread_id
from tachymail.mailbox.submissions import (
    SubmissionRecord,
    SubmissionState,
    add_submission,
    destroy_submissions,
    read_submissions,
    submission_state,
)
from tachymail.mailbox.submissions import submission_changes as submission_changes_since
from tachymail.mailbox.vacation import parse_utc_date, vacation_path
from tachymail.queue.envelope import (
    ACTIVE,
    BOUNCED,
    DELIVERED,
    HELD,
    Envelope,
    Recipient,
    new_queue_id,
)
from tachymail.queue.store import put_message
from tachymail.smtp.checks import DISCARD, HOLD, REJECT, checks_for

log = logging.getLogger(__name__)

IDENTITY = "i0"
VACATION_ID = "singleton"
VACATION_PROPERTIES = ("id", "isEnabled", "fromDate", "toDate", "subject", "textBody", "htmlBody")


def identity(account: Account) -> dict[str, Any]:
    return {
        "id": IDENTITY,
        "name": "",
        "email": account.user,
        "replyTo": None,
        "bcc": None,
        "textSignature": "",
        "htmlSignature": "",
        "mayDelete": False,
    }


async def identity_get(account: Account, call: Call) -> dict[str, Any]:
    account.check_account(call.args)
    ids = id_list(call.args, "ids")
    mine = identity(account)
    found = [mine] if ids is None or IDENTITY in ids else []
    missing = [i for i in ids or () if i != IDENTITY]
    return {"accountId": account.id, "state": "0", "list": found, "notFound": missing}


def _strip_bcc(content: bytes) -> bytes:
    """The message without its Bcc field(s) (RFC 8621 §7.5: removed on sending)."""
    end = content.find(b"\r\n\r\n")
    end = len(content) if end < 0 else end + 2
    lines = content[:end].split(b"\r\n")
    kept: list[bytes] = []
    dropping = False
    for line in lines:
        if line[:1] in (b" ", b"\t") and dropping:
            continue
        dropping = line.lower().startswith(b"bcc:")
        if not dropping:
            kept.append(line)
    return b"\r\n".join(kept) + content[end:]


def _without_trace(content: bytes) -> bytes:
    """The message as the user wrote it: the Return-Path and Delivered-To the store's
    delivery put on top are not sent on."""
    while content[:12].lower() in (b"return-path:", b"delivered-to") and b"\r\n" in content:
        line_end = content.index(b"\r\n") + 2
        while content[line_end : line_end + 1] in (b" ", b"\t"):
            line_end = content.index(b"\r\n", line_end) + 2
        content = content[line_end:]
    return content


async def _send(
    account: Account, props: dict[str, Any], client_ip: str
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Queue one submission; (created object, None) or (None, SetError)."""
    if props.get("identityId") != IDENTITY:
        return None, {"type": "invalidProperties", "properties": ["identityId"]}
    content_id = parse_id(props.get("emailId"), "e")
    snap = account.snapshot(fresh=True)
    if content_id is None or content_id not in snap.emails:
        return None, {"type": "invalidProperties", "properties": ["emailId"]}
    content = account.store.content(content_key(content_id))
    if content is None:
        return None, {"type": "invalidProperties", "properties": ["emailId"]}
    content = _without_trace(content)
    block_end = content.find(b"\r\n\r\n")
    fields = header_fields(content[: block_end + 2 if block_end >= 0 else len(content)])

    def addresses(name: str) -> list[str]:
        return [
            a["email"]
            for field, value in fields
            if field.lower() == name
            for a in as_addresses(value)
        ]

    given = props.get("envelope")
    if given is not None:
        try:
            sender = given["mailFrom"]["email"]
            recipients = [r["email"] for r in given["rcptTo"]]
            assert isinstance(sender, str) and all(isinstance(r, str) for r in recipients)
        except (KeyError, TypeError, AssertionError):
            return None, {"type": "invalidProperties", "properties": ["envelope"]}
    else:
        senders = addresses("sender") or addresses("from")
        sender = senders[0] if senders else account.user
        recipients = list(dict.fromkeys(addresses("to") + addresses("cc") + addresses("bcc")))
    if not recipients:
        return None, {"type": "noRecipients", "description": "no recipient"}
    bad = [r for r in recipients if "@" not in r or any(c in r for c in " <>\r\n,")]
    if bad:
        return None, {"type": "invalidRecipients", "invalidRecipients": bad}
    worker = account.worker
    if not worker.sender_ownership.owns(account.user, sender):
        return None, {
            "type": "forbiddenMailFrom",
            "description": f"{account.user} may not send as {sender}",
        }
    from_addresses = addresses("from")
    if from_addresses and not all(
        worker.sender_ownership.owns(account.user, a) for a in from_addresses
    ):
        return None, {"type": "forbiddenFrom", "description": "From is not the user's address"}
    limits = worker.config.limits
    if len(recipients) > limits.max_recipients:
        return None, {"type": "tooManyRecipients", "maxRecipients": limits.max_recipients}
    content = _strip_bcc(content)
    if len(content) > limits.max_message_size:
        return None, {"type": "tooLarge", "maxSize": limits.max_message_size}
    now = time.time()
    queue_id = new_queue_id()
    # The operator's [[header_check]]/[[body_check]] rules, as for SMTP submission and the
    # HTTP API: reject (nothing queued), hold, discard (reported sent, not queued).
    verdict = checks_for(worker.config).check(content)
    if verdict.action == REJECT:
        reason = verdict.reply.decode("utf-8", "replace").strip()
        log.warning("jmap: submission by %s refused by content checks: %s", account.user, reason)
        return None, {"type": "forbiddenToSend", "description": f"refused: {reason}"}
    if verdict.action == DISCARD:
        log.info("jmap: %s discarded, not queued: %s", queue_id, verdict.reason)
        return _record(account, queue_id, content_id, now, sender, recipients, props, False), None
    content = verdict.content
    params: dict[str, str] = {}
    if not content.isascii():
        params["BODY"] = "8BITMIME"
    if not sender.isascii() or not "".join(recipients).isascii():
        params["SMTPUTF8"] = ""
    envelope = Envelope(
        id=queue_id,
        sender=sender,
        recipients=[Recipient(address, {}) for address in recipients],
        mail_params=params,
        arrival=now,
        client_ip=client_ip,
        listener="http",
        auth=account.user,
        state=HELD if verdict.action == HOLD else ACTIVE,
    )
    signature = b""
    signer = worker.dkim
    if signer is not None:
        domain = signer.signing_domain(sender, content)
        if domain is not None:
            try:
                signature = await worker.loop.run_in_executor(None, signer.sign, content, domain)
            except ValueError as exc:  # no From: queued unsigned, as SMTP submission does
                log.error("jmap: DKIM signing of %s failed: %s", queue_id, exc)
    received = (
        f"Received: from [{client_ip}]\r\n\tby {worker.hostname} (Tachymail) with HTTP (JMAP) "
        f"id {queue_id}\r\n\t(authenticated as {account.user});\r\n"
        f"\t{email.utils.formatdate(now)}\r\n"
    ).encode()
    whole = signature + received + content
    envelope.size = len(whole)
    try:
        refused = await worker.committer.submit_operation(put_message(envelope, whole))
    except Exception as exc:  # the commit failed (storage full or an I/O error): try later
        log.error("jmap: queueing %s failed: %s", queue_id, exc)
        return None, {"type": "serverFail", "description": "the queue cannot take it now"}
    if isinstance(refused, Exception):
        log.error("jmap: queueing %s refused: %s", queue_id, refused)
        return None, {"type": "serverFail", "description": "the queue cannot take it now"}
    if worker.notifier is not None:
        worker.notifier.queued(queue_id, envelope.recipients)
    worker.accepted += 1
    log.info(
        "jmap: %s queued %s from <%s> to %d recipient(s)",
        account.user,
        queue_id,
        sender,
        len(recipients),
    )
    return _record(account, queue_id, content_id, now, sender, recipients, props, True), None


def _record(
    account: Account,
    queue_id: str,
    content_id: int,
    now: float,
    sender: str,
    recipients: list[str],
    props: dict[str, Any],
    queued: bool,
) -> dict[str, Any]:
    """What is kept of a sent submission (tachymail.mailbox.submissions): its immutable
    properties, and the queue id its delivery status is read from."""
    key = account.jmap.views.threads_of([content_id])[content_id]
    return {
        "identityId": props["identityId"],
        "emailId": email_id(content_id),
        "threadId": thread_id(key),
        "envelope": {
            "mailFrom": {"email": sender, "parameters": None},
            "rcptTo": [{"email": r, "parameters": None} for r in recipients],
        },
        "sendAt": utc_date(now),
        "queueId": queue_id,
        "queued": queued,
    }


#: the EmailSubmission properties (RFC 8621 §7)
SUBMISSION_PROPERTIES = (
    "id", "identityId", "emailId", "threadId", "envelope", "sendAt", "undoStatus",
    "deliveryStatus", "dsnBlobIds", "mdnBlobIds",
)  # fmt: skip


def _delivery_status(account: Account, data: dict[str, Any]) -> dict[str, Any]:
    """deliveryStatus (RFC 8621 §7) read from the queue now: per recipient "queued" while
    the queue still has it to deliver, "no" once it bounced, "yes" once stored in a local
    mailbox, "unknown" once relayed onwards or when the queue is done with the message
    (which removes its record: the delivery log has the outcome)."""
    queue_id = data.get("queueId", "")
    envelope = account.worker.committer.store.envelope(queue_id) if data.get("queued") else None
    states = {r.address.lower(): r for r in envelope.recipients} if envelope else {}
    out: dict[str, Any] = {}
    for item in data["envelope"]["rcptTo"]:
        address = item["email"]
        rcpt = states.get(address.lower())
        reply = " ".join(rcpt.last_reply.split()) if rcpt is not None else ""
        if rcpt is None:
            status = {"smtpReply": "250 2.0.0 the queue is done with it", "delivered": "unknown"}
        elif rcpt.state == BOUNCED:
            status = {"smtpReply": reply or "550 5.0.0 failed", "delivered": "no"}
        elif rcpt.state == DELIVERED:
            local = rcpt.remote_mta == "local"  # the delivery workers' name of the local hop
            status = {
                "smtpReply": reply or "250 2.0.0 ok",
                "delivered": "yes" if local else "unknown",
            }
        else:
            status = {
                "smtpReply": reply or f"250 2.0.0 queued as {queue_id}",
                "delivered": "queued",
            }
        status["displayed"] = "unknown"
        out[address] = status
    return out


def _submission_object(
    account: Account, record: SubmissionRecord, props: list[str] | None = None
) -> dict[str, Any]:
    data = record.data
    whole: dict[str, Any] = {
        "id": record.id,
        "identityId": data["identityId"],
        "emailId": data["emailId"],
        "threadId": data["threadId"],
        "envelope": data["envelope"],
        "sendAt": data["sendAt"],
        "undoStatus": "final",  # sent at once: nothing can be recalled
        "dsnBlobIds": [],
        "mdnBlobIds": [],
    }
    if props is None or "deliveryStatus" in props:
        whole["deliveryStatus"] = _delivery_status(account, data)
    return whole if props is None else {p: whole[p] for p in props}


async def submission_get(account: Account, call: Call) -> dict[str, Any]:
    args = call.args
    account.check_account(args)
    ids = id_list(args, "ids")
    props = requested_properties(args, SUBMISSION_PROPERTIES)
    limit = account.jmap.limits.max_objects_in_get
    if ids is not None and len(ids) > limit:
        raise MethodError("requestTooLarge", "more ids than maxObjectsInGet")
    state, records = read_submissions(account.store, account.user, ids)
    if ids is None and len(records) > limit:
        raise MethodError("requestTooLarge", "more submissions than maxObjectsInGet: pass ids")
    found = {r.id: r for r in records}
    return {
        "accountId": account.id,
        "state": str(state.last),
        "list": [
            _submission_object(account, found[i], props) for i in (ids or found) if i in found
        ],
        "notFound": [i for i in ids or () if i not in found],
    }


def _since(args: dict[str, Any], name: str) -> int:
    since = arg(args, name, str)
    if since is None:
        raise MethodError("invalidArguments", f"{name!r} is required")
    if not since.isdigit() or len(since) > 20:
        raise MethodError("cannotCalculateChanges", "not a state of this server")
    return int(since)


async def submission_changes(account: Account, call: Call) -> dict[str, Any]:
    args = call.args
    account.check_account(args)
    since = _since(args, "sinceState")
    max_changes = unsigned(args, "maxChanges")
    if max_changes == 0:
        raise MethodError("invalidArguments", "'maxChanges' must be above 0")
    found = submission_changes_since(account.store, account.user, since)
    if found is None:
        raise MethodError("cannotCalculateChanges", "that state is too old or not ours")
    state, changes = found
    new_state = state.last
    more = max_changes is not None and len(changes) > max_changes
    if more:
        assert max_changes is not None
        changes = changes[:max_changes]
        new_state = changes[-1][0]  # the changes up to that change number, no further
    return {
        "accountId": account.id,
        "oldState": str(since),
        "newState": str(new_state),
        "hasMoreChanges": more,
        "created": [ident for _c, ident, made in changes if made],
        "updated": [],  # the properties are immutable; deliveryStatus is read live
        "destroyed": [ident for _c, ident, made in changes if not made],
    }


_FILTERS = {"identityIds", "emailIds", "threadIds", "undoStatus", "before", "after"}
_SUBMISSION_SORTS = {"emailId": "emailId", "threadId": "threadId", "sentAt": "sendAt"}


Predicate = Callable[[SubmissionRecord], bool]


def _submission_filter(node: Any) -> Predicate:
    """A predicate of a FilterOperator / FilterCondition (RFC 8621 §7.3)."""
    if not isinstance(node, dict):
        raise MethodError("invalidArguments", "a filter must be an object")
    if "operator" in node:
        operator, conditions = node.get("operator"), node.get("conditions")
        if operator not in ("AND", "OR", "NOT") or not isinstance(conditions, list):
            raise MethodError("invalidArguments", "bad FilterOperator")
        parts = [_submission_filter(c) for c in conditions]

        def combined(record: SubmissionRecord) -> bool:
            results = (part(record) for part in parts)
            if operator == "AND":
                return all(results)
            return any(results) if operator == "OR" else not any(results)

        return combined
    unknown = set(node) - _FILTERS
    if unknown:
        raise MethodError("unsupportedFilter", f"cannot filter on {sorted(unknown)}")
    chosen: dict[str, set[str]] = {}
    for name, prop in (
        ("identityIds", "identityId"),
        ("emailIds", "emailId"),
        ("threadIds", "threadId"),
    ):
        values = id_list(node, name)
        if values is not None:
            chosen[prop] = set(values)
    status = arg(node, "undoStatus", str)
    bounds: list[float | None] = []
    for name in ("before", "after"):
        value = arg(node, name, str)
        when = parse_utc_date(value) if value is not None else None
        if value is not None and when is None:
            raise MethodError("invalidArguments", f"{name!r} is not a UTCDate")
        bounds.append(when)
    before, after = bounds

    def condition(record: SubmissionRecord) -> bool:
        if any(record.data[prop] not in values for prop, values in chosen.items()):
            return False
        if status is not None and status != "final":  # every submission is final
            return False
        if before is not None and not record.sent < before:
            return False
        return after is None or record.sent >= after

    return condition


def _sort_key(prop: str) -> Callable[[SubmissionRecord], Any]:
    if prop == "sendAt":
        return lambda record: record.sent

    def by_id(record: SubmissionRecord) -> tuple[int, str]:
        # our ids are a letter and hex digits: compared by number, as they were made
        value = str(record.data[prop])
        return (parse_id(value, value[:1]) or 0, value)

    return by_id


def _query_order(account: Account, args: dict[str, Any]) -> tuple[SubmissionState, list[str]]:
    """The state and the ids of the records matching the query's filter, in
    its sort order (creation order when it has none)."""
    condition = args.get("filter")
    test = _submission_filter(condition) if condition is not None else None
    comparators = arg(args, "sort", list, [])
    for comparator in comparators:
        if not isinstance(comparator, dict) or comparator.get("property") not in _SUBMISSION_SORTS:
            raise MethodError(
                "unsupportedSort", "EmailSubmission sorts on emailId, threadId, sentAt"
            )
    state, records = read_submissions(account.store, account.user)
    matching = [r for r in records if test is None or test(r)]
    for comparator in reversed(comparators):
        prop = _SUBMISSION_SORTS[comparator["property"]]
        descending = comparator.get("isAscending") is False
        matching.sort(key=_sort_key(prop), reverse=descending)
    return state, [r.id for r in matching]


async def submission_query(account: Account, call: Call) -> dict[str, Any]:
    args = call.args
    account.check_account(args)
    state, ordered = _query_order(account, args)
    ids = ordered
    position = arg(args, "position", int, 0)
    anchor = arg(args, "anchor", str)
    if anchor is not None:
        if anchor not in ids:
            raise MethodError("anchorNotFound", "the anchor is not in the results")
        position = max(0, ids.index(anchor) + arg(args, "anchorOffset", int, 0))
    elif position < 0:
        position = max(0, len(ids) + position)
    limit = unsigned(args, "limit")
    cap = account.jmap.limits.max_objects_in_get
    limit = cap if limit is None else min(limit, cap)
    out: dict[str, Any] = {
        "accountId": account.id,
        "queryState": str(state.last),
        "canCalculateChanges": True,
        "position": position,
        "ids": ids[position : position + limit],
        "limit": limit,
    }
    if args.get("calculateTotal"):
        out["total"] = len(ids)
    return out


async def submission_query_changes(account: Account, call: Call) -> dict[str, Any]:
    args = call.args
    account.check_account(args)
    since = _since(args, "sinceQueryState")
    found = submission_changes_since(account.store, account.user, since)
    if found is None:
        raise MethodError("cannotCalculateChanges", "that state is too old or not ours")
    _state, changes = found
    state, ordered = _query_order(account, args)
    if state.last != _state.last:  # a change between the two reads: the client asks again
        raise MethodError("cannotCalculateChanges", "the submissions changed meanwhile")
    position = {number: index for index, number in enumerate(ordered)}
    touched = [ident for _c, ident, _made in changes]
    # records never change, so only those created or destroyed since may have moved
    removed = list(dict.fromkeys(touched))
    added = [
        {"id": n, "index": position[n]}
        for n in sorted((n for n in touched if n in position), key=position.__getitem__)
    ]
    max_changes = unsigned(args, "maxChanges")
    if max_changes is not None and len(removed) + len(added) > max_changes:
        raise MethodError("tooManyChanges", "more changes than maxChanges")
    out: dict[str, Any] = {
        "accountId": account.id,
        "oldQueryState": str(since),
        "newQueryState": str(state.last),
        "removed": removed,
        "added": added,
    }
    if args.get("calculateTotal"):
        out["total"] = len(ordered)
    return out


async def submission_set(account: Account, call: Call) -> dict[str, Any]:
    args = call.args
    account.check_account(args)
    settings = account.worker.config.jmap
    create = arg(args, "create", dict, {})
    update = arg(args, "update", dict, {})
    destroy = id_list(args, "destroy") or []
    if len(create) + len(update) + len(destroy) > account.jmap.limits.max_objects_in_set:
        raise MethodError("requestTooLarge", "more changes than maxObjectsInSet")
    on_update = arg(args, "onSuccessUpdateEmail", dict, {})
    on_destroy = id_list(args, "onSuccessDestroyEmail") or []
    old_state = str(submission_state(account.store, account.user).last)
    if_in = arg(args, "ifInState", str)
    if if_in is not None and if_in != old_state:
        raise MethodError("stateMismatch", "the submissions changed since that state")
    out: dict[str, Any] = {
        "accountId": account.id,
        "oldState": old_state,
        "created": {},
        "notCreated": {},
        "updated": {},
        "notUpdated": {},
        "destroyed": [],
        "notDestroyed": {},
    }
    done: dict[str, str] = {}  # "#creation id" or submission id -> the email it sent
    client_ip = account.client_ip
    for creation_id, props in create.items():
        if not isinstance(props, dict):
            out["notCreated"][creation_id] = {"type": "invalidProperties"}
            continue
        email_ref = props.get("emailId")
        if isinstance(email_ref, str) and email_ref.startswith("#"):
            props = {**props, "emailId": call.created_ids.get(email_ref[1:], email_ref)}
        record, error = await _send(account, props, client_ip)
        if error is not None or record is None:
            out["notCreated"][creation_id] = error
            continue
        sent_at = time.time()
        keep = add_submission(
            account.user,
            record["queueId"],
            record,
            sent_at,
            keep=settings.submission_records,
            max_age=settings.submission_days * 86400,
        )
        try:
            number = await account.commit(keep)
        except Exception as exc:  # the store is full or failing
            number = exc
        if not isinstance(number, int):  # sent all the same: only its record is missing
            log.error("jmap: record of submission %s not kept: %s", record["queueId"], number)
            number = 0
        kept = SubmissionRecord(number, record["queueId"], sent_at, record)
        created = _submission_object(account, kept)
        out["created"][creation_id] = {
            p: created[p]
            for p in ("id", "threadId", "envelope", "sendAt", "undoStatus", "deliveryStatus",
                      "dsnBlobIds", "mdnBlobIds")
        }  # fmt: skip
        call.created_ids[creation_id] = created["id"]
        done["#" + creation_id] = record["emailId"]

    def resolve(target: str) -> str:  # "#creation id": a submission made by this request
        return call.created_ids.get(target[1:], target) if target.startswith("#") else target

    update = {resolve(target): patch for target, patch in update.items()}
    destroy = [resolve(target) for target in destroy]
    _state, records = read_submissions(account.store, account.user, [*update, *destroy])
    emails = {r.id: r.data["emailId"] for r in records}
    for target, patch in update.items():
        if target not in emails:
            out["notUpdated"][target] = {"type": "notFound"}
        elif not isinstance(patch, dict):
            out["notUpdated"][target] = {"type": "invalidPatch"}
        elif patch.get("undoStatus") == "canceled":
            out["notUpdated"][target] = {
                "type": "cannotUnsend",
                "description": "the email was sent at once: it cannot be recalled",
            }
        elif any(k != "undoStatus" or v != "final" for k, v in patch.items()):
            bad = sorted(k for k, v in patch.items() if k != "undoStatus" or v != "final")
            out["notUpdated"][target] = {"type": "invalidProperties", "properties": bad}
        else:
            out["updated"][target] = None
            done[target] = emails[target]
    doomed = [t for t in destroy if t in emails]
    if doomed:
        gone = await account.commit(
            destroy_submissions(account.user, doomed, keep=settings.submission_records)
        )
        for ident in gone if isinstance(gone, list) else ():
            out["destroyed"].append(ident)
            done[ident] = emails[ident]
    for target in destroy:
        if target not in out["destroyed"]:
            out["notDestroyed"][target] = {"type": "notFound"}
    out["newState"] = str(submission_state(account.store, account.user).last)
    # the implicit Email/set (RFC 8621 §7.5) for the submissions that succeeded
    update_emails: dict[str, Any] = {}
    for key, patch in on_update.items():
        if key in done:
            update_emails[done[key]] = patch
    destroy_emails = list(dict.fromkeys(done[key] for key in on_destroy if key in done))
    if update_emails or destroy_emails:
        implicit = Call(
            "Email/set",
            {"accountId": account.id, "update": update_emails, "destroy": destroy_emails},
            call.call_id,
            created_ids=call.created_ids,
        )
        call.extra.append(["Email/set", await email_set(account, implicit), call.call_id])
    return out


# --- VacationResponse ---------------------------------------------------------------------


def _vacation_path(account: Account) -> Path:
    # the file local delivery and LMTP read to send the replies (tachymail.mailbox.vacation)
    return vacation_path(Path(account.worker.config.data_path), account.user)


def vacation(account: Account) -> dict[str, Any]:
    """The user's VacationResponse (disabled when never set)."""
    try:
        stored: dict[str, Any] = orjson.loads(_vacation_path(account).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        stored = {}
    out: dict[str, Any] = dict.fromkeys(VACATION_PROPERTIES)
    out.update({k: v for k, v in stored.items() if k in VACATION_PROPERTIES})
    out["id"] = VACATION_ID
    out["isEnabled"] = bool(out.get("isEnabled"))
    return out


async def vacation_get(account: Account, call: Call) -> dict[str, Any]:
    account.check_account(call.args)
    ids = id_list(call.args, "ids")
    found = [vacation(account)] if ids is None or VACATION_ID in ids else []
    missing = [i for i in ids or () if i != VACATION_ID]
    return {
        "accountId": account.id,
        "state": _vacation_state(account),
        "list": found,
        "notFound": missing,
    }


def _vacation_state(account: Account) -> str:
    try:
        return str(_vacation_path(account).stat().st_mtime_ns)
    except OSError:
        return "0"


async def vacation_set(account: Account, call: Call) -> dict[str, Any]:
    args = call.args
    account.check_account(args)
    old = _vacation_state(account)
    out: dict[str, Any] = {
        "accountId": account.id,
        "oldState": old,
        "created": {},
        "notCreated": {k: {"type": "singleton"} for k in arg(args, "create", dict, {})},
        "updated": {},
        "notUpdated": {},
        "destroyed": [],
        "notDestroyed": {k: {"type": "singleton"} for k in id_list(args, "destroy") or []},
    }
    for target, patch in arg(args, "update", dict, {}).items():
        if target != VACATION_ID:
            out["notUpdated"][target] = {"type": "notFound"}
            continue
        if not isinstance(patch, dict):
            out["notUpdated"][target] = {"type": "invalidPatch"}
            continue
        current = vacation(account)
        bad = [k for k in patch if k not in VACATION_PROPERTIES or k == "id"]
        if "isEnabled" in patch and not isinstance(patch["isEnabled"], bool):
            bad.append("isEnabled")
        for key in ("fromDate", "toDate", "subject", "textBody", "htmlBody"):
            if key in patch and patch[key] is not None and not isinstance(patch[key], str):
                bad.append(key)
        for key in ("fromDate", "toDate"):  # UTCDate (RFC 8620 §1.4): delivery compares them
            value = patch.get(key)
            if isinstance(value, str) and (parse_utc_date(value) is None or value[-1:] != "Z"):
                bad.append(key)
        if bad:
            out["notUpdated"][target] = {"type": "invalidProperties", "properties": bad}
            continue
        current.update(patch)
        path = _vacation_path(account)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(orjson.dumps(current))
        temporary.replace(path)
        out["updated"][target] = None
    out["newState"] = _vacation_state(account)
    return out
