"""RFC 8621 Identity, EmailSubmission and VacationResponse.

EmailSubmission/set sends an email of the user's mailboxes the way SMTP AUTH submission
does: the envelope sender must be an address the user may send as (``[auth] senders``,
the same check as MAIL FROM after AUTH), the Bcc field is removed, a Received field is
added, the message is DKIM-signed by ``[dkim]`` and queued through the worker's group
commit (the response comes after the synced commit), and delivery handles retries and
DSNs as for any queued message. Submissions are not kept after they are queued:
EmailSubmission/get finds none (their ``undoStatus`` is "final" at once).
"""

from __future__ import annotations

import email.utils
import logging
import time
from pathlib import Path
from typing import Any

import orjson

from tachymail.jmap.account import Account
from tachymail.jmap.core import Call, MethodError, arg, id_list
from tachymail.jmap.mail import content_key, email_set
from tachymail.jmap.render import as_addresses, header_fields
from tachymail.jmap.view import parse_id
from tachymail.mailbox.vacation import parse_utc_date, vacation_path
from tachymail.queue.envelope import ACTIVE, HELD, Envelope, Recipient, new_queue_id
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


async def submission_get(account: Account, call: Call) -> dict[str, Any]:
    account.check_account(call.args)
    ids = id_list(call.args, "ids") or []
    return {"accountId": account.id, "state": "0", "list": [], "notFound": ids}


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
        return _created(queue_id, content_id, now, sender, recipients), None
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
    return _created(queue_id, content_id, now, sender, recipients), None


def _created(
    queue_id: str, content_id: int, now: float, sender: str, recipients: list[str]
) -> dict[str, Any]:
    """The EmailSubmission a successful /set create returns."""
    return {
        "id": queue_id,
        "threadId": f"t{content_id:x}",
        "sendAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "undoStatus": "final",
        "envelope": {
            "mailFrom": {"email": sender, "parameters": None},
            "rcptTo": [{"email": r, "parameters": None} for r in recipients],
        },
    }


async def submission_set(account: Account, call: Call) -> dict[str, Any]:
    args = call.args
    account.check_account(args)
    create = arg(args, "create", dict, {})
    if len(create) > account.jmap.limits.max_objects_in_set:
        raise MethodError("requestTooLarge", "more submissions than maxObjectsInSet")
    on_update = arg(args, "onSuccessUpdateEmail", dict, {})
    on_destroy = id_list(args, "onSuccessDestroyEmail") or []
    out: dict[str, Any] = {
        "accountId": account.id,
        "oldState": "0",
        "newState": "0",
        "created": {},
        "notCreated": {},
        "updated": {},
        "notUpdated": {key: {"type": "notFound"} for key in arg(args, "update", dict, {})},
        "destroyed": [],
        "notDestroyed": {key: {"type": "notFound"} for key in id_list(args, "destroy") or []},
    }
    sent: dict[str, str] = {}  # creation id -> email id
    client_ip = account.client_ip
    for creation_id, props in create.items():
        if not isinstance(props, dict):
            out["notCreated"][creation_id] = {"type": "invalidProperties"}
            continue
        email_ref = props.get("emailId")
        if isinstance(email_ref, str) and email_ref.startswith("#"):
            props = {**props, "emailId": call.created_ids.get(email_ref[1:], email_ref)}
        created, error = await _send(account, props, client_ip)
        if error is not None or created is None:
            out["notCreated"][creation_id] = error
            continue
        out["created"][creation_id] = created
        sent[creation_id] = str(props["emailId"])
    update: dict[str, Any] = {}
    for key, patch in on_update.items():
        target = sent.get(key[1:]) if key.startswith("#") else None
        if target is not None:
            update[target] = patch
    destroy = [sent[key[1:]] for key in on_destroy if key.startswith("#") and key[1:] in sent]
    if update or destroy:
        implicit = Call(
            "Email/set",
            {"accountId": account.id, "update": update, "destroy": destroy},
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
