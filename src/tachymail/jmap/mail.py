"""RFC 8621 Mailbox, Email, Thread and SearchSnippet methods on the mailbox store.

Every read comes from one snapshot of the user's emails (``tachymail.jmap.view``) and the
summaries the store keeps; every write is a store operation through the worker's group
committer, so it is synced when the response is sent, and IMAP sessions of any process
see it at once (the store's change notification). Threads: the conversation the store
recorded at delivery (``tachymail.mailbox.threads``), read through ``Views.threads_of``.
"""

from __future__ import annotations

import asyncio
import html
import logging
import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson

from tachymail.jmap.account import Account
from tachymail.jmap.core import Call, MethodError, arg, id_list, unsigned
from tachymail.jmap.render import (
    BODY_PROPERTIES,
    DEFAULT_BODY_PROPERTIES,
    DEFAULT_PROPERTIES,
    HEADER_CONVENIENCE,
    BodyView,
    as_addresses,
    as_date,
    as_message_ids,
    as_text,
    body_octets,
    body_value,
    find_part,
    header_fields,
    header_value,
    parse_header_property,
    plain_text,
    preview,
    walk_parts,
)
from tachymail.jmap.threadcounts import COUNTS
from tachymail.jmap.view import (
    KEYWORD_FLAGS,
    Email,
    Snapshot,
    email_id,
    mailbox_id,
    mailbox_state,
    parse_email_state,
    parse_id,
    role_of,
    thread_id,
)
from tachymail.mailbox import (
    Delivered,
    InvalidMailboxName,
    MailboxExists,
    MailboxInfo,
    NoSuchMailbox,
    OverQuota,
    copy_messages,
    create_mailbox,
    delete_mailbox,
    deliver,
    expunge,
    move_messages,
    prepare_delivery,
    rename_mailbox,
    set_flags,
    subscribe,
)
from tachymail.mailbox.summary import build_summary

log = logging.getLogger(__name__)

MAILBOX_PROPERTIES = (
    "id", "name", "parentId", "role", "sortOrder", "totalEmails", "unreadEmails",
    "totalThreads", "unreadThreads", "myRights", "isSubscribed",
)  # fmt: skip
_RIGHTS = dict.fromkeys(
    (
        "mayReadItems", "mayAddItems", "mayRemoveItems", "maySetSeen", "maySetKeywords",
        "mayCreateChild", "mayRename", "mayDelete", "maySubmit",
    ),
    True,
)  # fmt: skip
_ROLE_USE = {
    "drafts": "\\Drafts", "sent": "\\Sent", "trash": "\\Trash", "junk": "\\Junk",
    "archive": "\\Archive", "all": "\\All", "flagged": "\\Flagged", "important": "\\Important",
}  # fmt: skip
_SORTS = {"receivedAt", "size", "from", "to", "subject", "sentAt", "hasKeyword", "id"}
_KEYWORD = re.compile(r"^[\x21-\x7e]{1,255}$")
_FORBIDDEN_KEYWORD = set(["(", ")", "{", "]", "%", "*", '"', "\\"])


def content_key(content: int) -> bytes:
    return content.to_bytes(8, "big")


#: formatted receivedAt dates by timestamp (each email of each page needs one)
_UTC_MEMO: dict[float, str] = {}


def utc_date(when: float) -> str:
    """*when* (seconds since the epoch) as an RFC 8620 UTCDate, memoised."""
    found = _UTC_MEMO.get(when)
    if found is None:
        if len(_UTC_MEMO) >= 50_000:  # about 8 MB at most
            _UTC_MEMO.clear()
        # time.gmtime is about three times faster than datetime
        found = _UTC_MEMO[when] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
    return found


def _parse_utc(value: Any, name: str) -> float:
    if not isinstance(value, str):
        raise MethodError("invalidArguments", f"{name!r} must be a UTCDate")
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise MethodError("invalidArguments", f"{name!r} is not a date: {value!r}") from None


# --- Mailbox ------------------------------------------------------------------------------


def _parents(infos: list[MailboxInfo]) -> dict[str, MailboxInfo]:
    return {info.name: info for info in infos}


def mailbox_object(
    info: MailboxInfo,
    by_name: dict[str, MailboxInfo],
    threads: dict[int, tuple[int, int, int]] | None = None,
) -> dict[str, Any]:
    """The Mailbox object of *info*; *threads*: mailbox id -> (totalThreads,
    unreadThreads, unreadEmails) (``tachymail.jmap.threadcounts``); without it the thread
    counts are 0 and unreadEmails is the store's unseen count (drafts included)."""
    total_threads, unread_threads, unread_emails = (threads or {}).get(info.id, (0, 0, info.unseen))
    parent_name, slash, leaf = info.name.rpartition("/")
    parent = by_name.get(parent_name) if slash else None
    role = role_of(info)
    return {
        "id": mailbox_id(info),
        "name": leaf if parent is not None else info.name,
        "parentId": mailbox_id(parent) if parent is not None else None,
        "role": role,
        "sortOrder": 1 if role == "inbox" else (10 if role else 100),
        "totalEmails": info.messages,
        "unreadEmails": unread_emails,
        "totalThreads": total_threads,
        "unreadThreads": unread_threads,
        "myRights": dict(_RIGHTS, mayRename=role != "inbox", mayDelete=role != "inbox"),
        "isSubscribed": info.subscribed,
    }


def requested_properties(args: dict[str, Any], known: tuple[str, ...]) -> list[str]:
    """The ``properties`` argument of a /get, "id" first (all of *known* when absent);
    invalidArguments naming any property not in *known*."""
    props = arg(args, "properties", list)
    if props is None:
        return list(known)
    bad = [p for p in props if not isinstance(p, str) or p not in known]
    if bad:
        raise MethodError("invalidArguments", "unknown properties", properties=bad)
    return ["id", *[p for p in props if p != "id"]]


async def mailbox_get(account: Account, call: Call) -> dict[str, Any]:
    args = call.args
    account.check_account(args)
    ids = id_list(args, "ids")
    props = requested_properties(args, MAILBOX_PROPERTIES)
    threads = None
    if "totalThreads" in props or "unreadThreads" in props or "unreadEmails" in props:
        # from the index, memoised per state (tachymail.jmap.threadcounts)
        snap = account.snapshot(fresh=True)
        infos = snap.infos
        threads = COUNTS.counts(account.jmap.views, snap)
    else:
        infos = account.store.mailboxes(account.user)
    by_name = _parents(infos)
    by_id = {mailbox_id(info): info for info in infos}
    if ids is not None and len(ids) > account.jmap.limits.max_objects_in_get:
        raise MethodError("requestTooLarge", "more ids than maxObjectsInGet")
    found, missing = [], []
    for wanted in ids if ids is not None else list(by_id):
        info = by_id.get(wanted)
        if info is None:
            missing.append(wanted)
            continue
        whole = mailbox_object(info, by_name, threads)
        found.append({p: whole[p] for p in props})
    return {
        "accountId": account.id,
        "state": mailbox_state(infos),
        "list": found,
        "notFound": missing,
    }


async def mailbox_changes(account: Account, call: Call) -> dict[str, Any]:
    args = call.args
    account.check_account(args)
    since = arg(args, "sinceState", str)
    if since is None:
        raise MethodError("invalidArguments", "'sinceState' is required")
    unsigned(args, "maxChanges")
    infos = account.store.mailboxes(account.user)
    now = mailbox_state(infos)
    digest, dash, vector = since.partition("-")
    old = parse_email_state(vector) if dash else None
    if old is None:
        raise MethodError("cannotCalculateChanges", "not a state of this server")
    current = {info.id: info for info in infos}
    created = [mailbox_id(i) for box, i in current.items() if box not in old]
    destroyed = [f"m{box:x}" for box in old if box not in current]
    names_changed = digest != now.partition("-")[0]
    moved = {
        box for box, info in current.items() if old.get(box) != (info.highestmodseq, info.uidnext)
    }
    # a change in one mailbox may change the thread counts of any other that has emails
    # (unreadThreads looks at the whole thread, RFC 8621 §2): those are reported too
    updated = [
        mailbox_id(info)
        for box, info in current.items()
        if box in old and (names_changed or box in moved or (moved and info.messages))
    ]
    return {
        "accountId": account.id,
        "oldState": since,
        "newState": now,
        "hasMoreChanges": False,
        "created": created,
        "updated": updated,
        "destroyed": destroyed,
        "updatedProperties": (
            None
            if names_changed or created or destroyed
            else ["totalEmails", "unreadEmails", "totalThreads", "unreadThreads"]
        ),
    }


async def mailbox_query(account: Account, call: Call) -> dict[str, Any]:
    args = call.args
    account.check_account(args)
    infos = account.store.mailboxes(account.user)
    by_name = _parents(infos)
    objects = [mailbox_object(info, by_name) for info in infos]
    condition = arg(args, "filter", dict, {})
    for key, value in condition.items():
        if key == "parentId":
            objects = [o for o in objects if o["parentId"] == value]
        elif key == "name" and isinstance(value, str):
            objects = [o for o in objects if value.lower() in o["name"].lower()]
        elif key == "role":
            objects = [o for o in objects if o["role"] == value]
        elif key == "hasAnyRole" and isinstance(value, bool):
            objects = [o for o in objects if (o["role"] is not None) == value]
        elif key == "isSubscribed" and isinstance(value, bool):
            objects = [o for o in objects if o["isSubscribed"] == value]
        else:
            raise MethodError("unsupportedFilter", f"cannot filter mailboxes on {key!r}")
    for comparator in reversed(arg(args, "sort", list, [])):
        if not isinstance(comparator, dict) or comparator.get("property") not in (
            "name",
            "sortOrder",
        ):
            raise MethodError("unsupportedSort", "mailboxes sort on name or sortOrder")
        prop = comparator["property"]
        objects.sort(key=lambda o: o[prop], reverse=comparator.get("isAscending") is False)
    ids = [o["id"] for o in objects]
    position = unsigned(args, "position", 0) or 0
    limit = unsigned(args, "limit")
    page = ids[position : position + limit if limit is not None else None]
    out: dict[str, Any] = {
        "accountId": account.id,
        "queryState": mailbox_state(infos),
        "canCalculateChanges": False,
        "position": position,
        "ids": page,
    }
    if args.get("calculateTotal"):
        out["total"] = len(ids)
    return out


async def mailbox_set(account: Account, call: Call) -> dict[str, Any]:
    args = call.args
    account.check_account(args)
    user = account.user
    infos = account.store.mailboxes(user)
    old_state = mailbox_state(infos)
    if_in = arg(args, "ifInState", str)
    if if_in is not None and if_in != old_state:
        raise MethodError("stateMismatch", "the mailboxes changed since that state")
    create = arg(args, "create", dict, {})
    update = arg(args, "update", dict, {})
    destroy = id_list(args, "destroy") or []
    if len(create) + len(update) + len(destroy) > account.jmap.limits.max_objects_in_set:
        raise MethodError("requestTooLarge", "more changes than maxObjectsInSet")
    remove_emails = bool(args.get("onDestroyRemoveEmails"))
    out: dict[str, Any] = {
        "accountId": account.id,
        "oldState": old_state,
        "created": {},
        "updated": {},
        "destroyed": [],
        "notCreated": {},
        "notUpdated": {},
        "notDestroyed": {},
    }

    def names() -> dict[str, MailboxInfo]:
        return {mailbox_id(i): i for i in account.store.mailboxes(user)}

    def resolve(value: Any) -> str | None:
        if isinstance(value, str) and value.startswith("#"):
            return call.created_ids.get(value[1:])
        return value if isinstance(value, str) else None

    for creation_id, props in create.items():
        if not isinstance(props, dict) or not isinstance(props.get("name"), str):
            out["notCreated"][creation_id] = {
                "type": "invalidProperties", "properties": ["name"]
            }  # fmt: skip
            continue
        leaf = props["name"]
        parent = props.get("parentId")
        full = leaf
        if parent is not None:
            parent_info = names().get(resolve(parent) or "")
            if parent_info is None:
                out["notCreated"][creation_id] = {
                    "type": "invalidProperties", "properties": ["parentId"]
                }  # fmt: skip
                continue
            full = f"{parent_info.name}/{leaf}"
        role = props.get("role")
        use = _ROLE_USE.get(role, "") if isinstance(role, str) else ""
        if "/" in leaf or not leaf:
            result: object = InvalidMailboxName("bad name")
        else:
            result = await account.commit(
                create_mailbox(user, full, use, subscribed=props.get("isSubscribed", True) is True)
            )
        if isinstance(result, MailboxExists):
            out["notCreated"][creation_id] = {"type": "alreadyExists", "description": str(result)}
        elif isinstance(result, Exception):
            out["notCreated"][creation_id] = {
                "type": "invalidProperties", "properties": ["name"], "description": str(result)
            }  # fmt: skip
        else:
            assert isinstance(result, MailboxInfo)
            new_id = mailbox_id(result)
            call.created_ids[creation_id] = new_id
            out["created"][creation_id] = {
                "id": new_id, "totalEmails": 0, "unreadEmails": 0, "totalThreads": 0,
                "unreadThreads": 0, "myRights": _RIGHTS, "sortOrder": 100, "role": role,
            }  # fmt: skip

    for target, props in update.items():
        info = names().get(resolve(target) or "")
        if info is None:
            out["notUpdated"][target] = {"type": "notFound"}
            continue
        if not isinstance(props, dict):
            out["notUpdated"][target] = {"type": "invalidPatch"}
            continue
        problem: dict[str, Any] | None = None
        if "name" in props or "parentId" in props:
            parent_name, _slash, leaf = info.name.rpartition("/")
            leaf = props.get("name", leaf)
            if "parentId" in props:
                parent_id = props["parentId"]
                if parent_id is None:
                    parent_name = ""
                else:
                    parent_info = names().get(resolve(parent_id) or "")
                    parent_name = parent_info.name if parent_info is not None else "\0"
            if not isinstance(leaf, str) or not leaf or "/" in leaf or "\0" in parent_name:
                problem = {"type": "invalidProperties", "properties": ["name", "parentId"]}
            else:
                new_name = f"{parent_name}/{leaf}" if parent_name else leaf
                if new_name != info.name:
                    result = await account.commit(rename_mailbox(user, info.name, new_name))
                    if isinstance(result, MailboxExists):
                        problem = {"type": "alreadyExists"}
                    elif isinstance(result, Exception):
                        problem = {"type": "invalidProperties", "description": str(result)}
        if problem is None and "isSubscribed" in props:
            value = props["isSubscribed"]
            if not isinstance(value, bool):
                problem = {"type": "invalidProperties", "properties": ["isSubscribed"]}
            else:
                current = names().get(mailbox_id(info))
                name = current.name if current is not None else info.name
                await account.commit(subscribe(user, name, value))
        unknown = set(props) - {"name", "parentId", "isSubscribed", "sortOrder", "role"}
        if problem is None and unknown:
            problem = {"type": "invalidProperties", "properties": sorted(unknown)}
        if problem is not None:
            out["notUpdated"][target] = problem
        else:
            out["updated"][target] = None

    for target in destroy:
        info = names().get(resolve(target) or "")
        if info is None:
            out["notDestroyed"][target] = {"type": "notFound"}
            continue
        if info.name == "INBOX":
            out["notDestroyed"][target] = {"type": "forbidden", "description": "INBOX stays"}
            continue
        if any(other.name.startswith(info.name + "/") for other in names().values()):
            out["notDestroyed"][target] = {"type": "mailboxHasChild"}
            continue
        if info.messages and not remove_emails:
            out["notDestroyed"][target] = {"type": "mailboxHasEmail"}
            continue
        result = await account.commit(delete_mailbox(user, info.name))
        if isinstance(result, Exception):
            out["notDestroyed"][target] = {"type": "notFound", "description": str(result)}
        else:
            out["destroyed"].append(target)
    out["newState"] = mailbox_state(account.store.mailboxes(user))
    return out


# --- Email/get ----------------------------------------------------------------------------


class _Reader:
    """Reads of one message's octets through the request's ContentReader."""

    def __init__(self, reader: Any, content: int) -> None:
        self.reader = reader
        self.key = content_key(content)

    def __call__(self, offset: int, length: int) -> bytes:
        data: bytes = self.reader.read(self.key, offset, length)
        return data


def _no_read(offset: int, length: int) -> bytes:
    """The reader of an Email/get that needs no octets (every property known)."""
    raise AssertionError("no read expected: every property is known")


def _get_options(args: dict[str, Any]) -> dict[str, Any]:
    props = arg(args, "properties", list)
    if props is None:
        props = list(DEFAULT_PROPERTIES)
    known = set(DEFAULT_PROPERTIES) | {"headers", "bodyStructure"}
    bad = [
        p
        for p in props
        if not isinstance(p, str) or (p not in known and parse_header_property(p) is None)
    ]
    if bad:
        raise MethodError("invalidArguments", "unknown properties", properties=bad)
    body_props = arg(args, "bodyProperties", list)
    if body_props is None:
        body_props = list(DEFAULT_BODY_PROPERTIES)
    bad = [p for p in body_props if p not in BODY_PROPERTIES]
    if bad:
        raise MethodError("invalidArguments", "unknown body properties", properties=bad)
    return {
        "properties": ["id", *[p for p in props if p != "id"]],
        "body": body_props,
        "text": arg(args, "fetchTextBodyValues", bool, False),
        "html": arg(args, "fetchHTMLBodyValues", bool, False),
        "all": arg(args, "fetchAllBodyValues", bool, False),
        "max": unsigned(args, "maxBodyValueBytes", 0) or 0,
    }


#: Email properties read from the snapshot's index columns alone
_INDEX_PROPERTIES = frozenset(
    ("id", "threadId", "mailboxIds", "keywords", "size", "receivedAt", "blobId")
)
#: Email properties made from the message's octets alone, kept per process by
#: ``PropertyCache`` (the header conveniences, preview, hasAttachment)
CONTENT_PROPERTIES = frozenset((*HEADER_CONVENIENCE, "preview", "hasAttachment"))


def email_object(
    content: int,
    summary: dict[str, Any],
    read: Callable[[int, int], bytes],
    opts: dict[str, Any],
    email: Email | None,
    threads: dict[int, int] | None = None,
    known: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The Email object (the properties in *opts*) of one message; *email* None for a
    message that is not in a mailbox (Email/parse): its metadata are null. *threads*:
    content id -> thread key (``Views.threads_of``), needed for ``threadId``. *known*:
    values of CONTENT_PROPERTIES computed before (``PropertyCache``), taken as they are;
    when they and the index give every property, *summary* and *read* are not used."""
    out: dict[str, Any] = {}
    rest: list[str] = []
    threads = threads or {}
    for prop in opts["properties"]:
        if known is not None and prop in known:
            out[prop] = known[prop]
        elif prop == "id":
            out[prop] = email_id(content) if email is not None else None
        elif prop == "blobId":
            out[prop] = f"B{content:x}"
        elif prop == "threadId":
            out[prop] = thread_id(threads.get(content, content)) if email is not None else None
        elif prop == "mailboxIds":
            out[prop] = {f"m{box:x}": True for box in email.places} if email is not None else None
        elif prop == "keywords":
            out[prop] = email.keywords() if email is not None else None
        elif prop == "size":
            body = summary.get("body") or {}
            out[prop] = email.size if email is not None else int(body.get("end", 0))
        elif prop == "receivedAt":
            out[prop] = utc_date(email.received) if email is not None else None
        else:
            out[prop] = None  # its place in the object's order, filled below
            rest.append(prop)
    if rest:
        _content_values(out, rest, content, summary, read, opts)
    return out


def _content_values(
    out: dict[str, Any],
    props: list[str],
    content: int,
    summary: dict[str, Any],
    read: Callable[[int, int], bytes],
    opts: dict[str, Any],
) -> None:
    """Set *out*'s *props*, those made from the message's summary and octets."""
    body = summary.get("body") or {}
    fields: list[tuple[str, str]] | None = None
    view: BodyView | None = None
    lists: tuple[Any, Any, Any] | None = None

    def get_fields() -> list[tuple[str, str]]:
        nonlocal fields
        if fields is None:
            start, end = int(body.get("start", 0)), int(body.get("body_start", 0))
            fields = header_fields(read(start, max(0, end - start)))
        return fields

    def get_view() -> BodyView:
        nonlocal view
        if view is None:
            view = BodyView(content, summary, read, opts["body"])
        return view

    def get_lists() -> tuple[Any, Any, Any]:
        nonlocal lists
        if lists is None:
            lists = get_view().lists()
        return lists

    envelope = summary.get("envelope") or {}
    for prop in props:
        if prop in HEADER_CONVENIENCE:
            name, form = HEADER_CONVENIENCE[prop]
            raw = envelope.get(name) if name in envelope else None
            if name in envelope:  # the summary kept it: no header read
                if raw is None:
                    out[prop] = None
                elif form == "Addresses":
                    out[prop] = as_addresses(raw) or None
                elif form == "MessageIds":
                    out[prop] = as_message_ids(raw)
                elif form == "Date":
                    out[prop] = as_date(raw)
                else:
                    out[prop] = as_text(raw)
            else:
                value = header_value(get_fields(), name, form, False)
                out[prop] = value if value != [] else None
        elif prop == "headers":
            out[prop] = [{"name": n, "value": v} for n, v in get_fields()]
        elif prop.startswith("header:"):
            parsed = parse_header_property(prop)
            assert parsed is not None
            out[prop] = header_value(get_fields(), *parsed)
        elif prop == "bodyStructure":
            out[prop] = get_view().structure()
        elif prop in ("textBody", "htmlBody", "attachments"):
            index = ("textBody", "htmlBody", "attachments").index(prop)
            out[prop] = [get_view().part(node) for node in get_lists()[index]]
        elif prop == "hasAttachment":
            out[prop] = bool(get_lists()[2])
        elif prop == "preview":
            out[prop] = preview(read, get_lists()[0])
        elif prop == "bodyValues":
            values: dict[str, Any] = {}
            text, html_parts, _attachments = get_lists()
            wanted: list[dict[str, Any]] = []
            if opts["all"]:
                wanted = [
                    n
                    for _part, n in walk_parts(body)
                    if n.get("parts") is None and n.get("type") == "text"
                ]
            else:
                if opts["text"]:
                    wanted.extend(text)
                if opts["html"]:
                    wanted.extend(html_parts)
            for node in wanted:
                if node.get("type") != "text":
                    continue
                part_id = get_view().ids.get(id(node), "1")
                if part_id not in values:
                    values[part_id] = body_value(read, node, opts["max"])
            out[prop] = values


async def email_get(account: Account, call: Call) -> dict[str, Any]:
    args = call.args
    account.check_account(args)
    ids = id_list(args, "ids")
    opts = _get_options(args)
    snap = account.snapshot(fresh=True)
    limit = account.jmap.limits.max_objects_in_get
    if ids is None:
        if len(snap.emails) > limit:
            raise MethodError("requestTooLarge", "more emails than maxObjectsInGet: pass ids")
        ids = [email_id(content) for content in snap.emails]
    elif len(ids) > limit:
        raise MethodError("requestTooLarge", "more ids than maxObjectsInGet")
    found, missing = [], []
    store = account.store
    # the properties made from the octets are kept per process (PropertyCache): a page
    # served again reads no summary for them
    cache = account.jmap.properties
    derived = frozenset(p for p in opts["properties"] if p in CONTENT_PROPERTIES)
    others = any(
        p not in _INDEX_PROPERTIES and p not in CONTENT_PROPERTIES for p in opts["properties"]
    )
    emails = snap.emails
    wanted_ids = list(dict.fromkeys(ids))
    contents = [parse_id(wanted, "e") for wanted in wanted_ids]
    threads: dict[int, int] = {}
    if "threadId" in opts["properties"]:
        threads = account.jmap.views.threads_of(
            c for c in contents if c is not None and c in emails
        )
    reader = store.reader()
    try:
        for wanted, content in zip(wanted_ids, contents, strict=True):
            if content is None or content not in emails:
                missing.append(wanted)
                continue
            email = emails[content]
            summary: dict[str, Any] = {}
            read: Callable[[int, int], bytes] = _no_read
            known = cache.get(content) if derived else None
            fresh = bool(derived) and (known is None or not known.keys() >= derived)
            if others or fresh:
                loaded = store.summary(content_key(content))
                if loaded is None:  # expunged since the snapshot
                    missing.append(wanted)
                    continue
                summary, read = loaded, _Reader(reader, content)
            made = email_object(content, summary, read, opts, email, threads, known)
            if fresh:
                cache.add(content, {p: made[p] for p in derived})
            found.append(made)
    finally:
        reader.close()
    return {"accountId": account.id, "state": snap.state, "list": found, "notFound": missing}


def message_blob(account: Account, blob_id: str) -> bytes | None:
    """The octets of ``B<content>`` (the message) or ``B<content>.<partId>`` (a part's
    decoded body), if the content is one of the user's messages."""
    head, _, part_id = blob_id.partition(".")
    content = parse_id(head, "B")
    if content is None or content not in account.snapshot().emails:
        return None
    key = content_key(content)
    if not part_id:
        return account.store.content(key)
    summary = account.store.summary(key)
    node = find_part(summary.get("body") or {}, part_id) if summary else None
    if node is None:
        return None
    return body_octets(lambda offset, length: account.store.read(key, offset, length), node)


# --- Email/query --------------------------------------------------------------------------


#: summaries and decoded texts a matcher keeps (the email being tested, and a few more)
_MATCH_CACHE = 8
#: a query over more emails than this that cannot use the index alone runs off the loop
_OFF_LOOP = 2000


class _Matcher:
    """Evaluates Email/query filters on a snapshot, loading summaries and texts lazily."""

    def __init__(self, account: Account, snap: Snapshot) -> None:
        self.account = account
        self.snap = snap
        self.summaries: dict[int, dict[str, Any]] = {}
        self.texts: dict[int, str] = {}

    def thread_keyword(self, word: str) -> tuple[set[int], set[int], dict[int, int]]:
        """(threads where some email has *word*, threads where all have it, content ->
        thread) over the whole snapshot (RFC 8621 §4.4.1: the thread in every mailbox)."""
        threads = self.account.jmap.views.threads_of(self.snap.emails)
        some: set[int] = set()
        lacking: set[int] = set()
        for email in self.snap.emails.values():
            (some if word in email.keywords() else lacking).add(threads[email.content])
        return some, some - lacking, threads

    def summary(self, content: int) -> dict[str, Any]:
        found = self.summaries.get(content)
        if found is None:
            found = self.account.store.summary(content_key(content)) or {}
            if len(self.summaries) >= _MATCH_CACHE:  # bounded: filters look at one email
                self.summaries.clear()  # at a time, and a query may cover 100,000
            self.summaries[content] = found
        return found

    def envelope_text(self, content: int, name: str) -> str:
        raw = (self.summary(content).get("envelope") or {}).get(name)
        if not raw:
            return ""
        if name in ("from", "to", "cc", "bcc", "reply-to", "sender"):
            return " ".join(f"{a['name'] or ''} {a['email']}" for a in as_addresses(raw)).lower()
        return as_text(raw).lower()

    def body_text(self, content: int) -> str:
        found = self.texts.get(content)
        if found is None:
            key = content_key(content)
            store = self.account.store
            parts = BodyView(content, self.summary(content), lambda o, n: b"", []).lists()[0]

            def read(offset: int, length: int) -> bytes:
                return store.read(key, offset, length)

            found = " ".join(plain_text(read, node, 0) for node in parts).lower()
            if len(self.texts) >= _MATCH_CACHE:
                self.texts.clear()
            self.texts[content] = found
        return found

    def check(self, node: Any) -> Callable[[Email], bool]:
        """A predicate for a FilterOperator or FilterCondition; raises on bad input."""
        if not isinstance(node, dict):
            raise MethodError("invalidArguments", "a filter must be an object")
        if "operator" in node:
            operator, conditions = node.get("operator"), node.get("conditions")
            if operator not in ("AND", "OR", "NOT") or not isinstance(conditions, list):
                raise MethodError("invalidArguments", "bad FilterOperator")
            parts = [self.check(c) for c in conditions]
            if operator == "AND":
                return lambda e: all(c(e) for c in parts)
            if operator == "OR":
                return lambda e: any(c(e) for c in parts)
            return lambda e: not any(c(e) for c in parts)
        checks = [self._condition(key, value) for key, value in node.items()]
        return lambda e: all(c(e) for c in checks)

    def _condition(self, key: str, value: Any) -> Callable[[Email], bool]:
        def need(kind: type) -> Any:
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
                raise MethodError("invalidArguments", f"filter {key!r} has the wrong type")
            return value

        if key == "inMailbox":
            box = parse_id(need(str), "m")
            return lambda e: box in e.places
        if key == "inMailboxOtherThan":
            boxes = {parse_id(b, "m") for b in need(list)}
            return lambda e: any(b not in boxes for b in e.places)
        if key in ("before", "after"):
            when = _parse_utc(value, key)
            if key == "before":
                return lambda e: e.received < when
            return lambda e: e.received >= when
        if key == "minSize":
            size = need(int)
            return lambda e: e.size >= size
        if key == "maxSize":
            size = need(int)
            return lambda e: e.size < size
        if key == "hasKeyword":
            word = need(str).lower()
            return lambda e: word in e.keywords()
        if key == "notKeyword":
            word = need(str).lower()
            return lambda e: word not in e.keywords()
        if key in ("allInThreadHaveKeyword", "someInThreadHaveKeyword"):
            some, every, threads = self.thread_keyword(need(str).lower())
            wanted = every if key.startswith("all") else some
            return lambda e: threads[e.content] in wanted
        if key == "noneInThreadHaveKeyword":
            some, _, threads = self.thread_keyword(need(str).lower())
            return lambda e: threads[e.content] not in some
        if key == "hasAttachment":
            want = need(bool)
            return lambda e: (
                bool(BodyView(e.content, self.summary(e.content), lambda o, n: b"", []).lists()[2])
                == want
            )
        if key in ("from", "to", "cc", "bcc", "subject"):
            term = need(str).lower()
            return lambda e: term in self.envelope_text(e.content, key)
        if key == "body":
            term = need(str).lower()
            return lambda e: term in self.body_text(e.content)
        if key == "text":
            term = need(str).lower()
            names = ("from", "to", "cc", "bcc", "subject")
            return lambda e: (
                any(term in self.envelope_text(e.content, n) for n in names)
                or term in self.body_text(e.content)
            )
        if key == "header":
            items = need(list)
            if not items or len(items) > 2 or not all(isinstance(i, str) for i in items):
                raise MethodError("invalidArguments", "filter 'header' is [name] or [name, value]")
            name = items[0]
            term = items[1].lower() if len(items) > 1 else None

            def header_check(e: Email) -> bool:
                key_bytes = content_key(e.content)
                body = self.summary(e.content).get("body") or {}
                block = self.account.store.read(key_bytes, 0, int(body.get("body_start", 0)))
                values = header_value(header_fields(block), name, "Text", True)
                return bool(values) and (term is None or any(term in v.lower() for v in values))

            return header_check
        raise MethodError("unsupportedFilter", f"cannot filter on {key!r}")

    def sort_key(self, comparators: list[dict[str, Any]]) -> Callable[[Email], Any]:
        keys: list[Callable[[Email], Any]] = []
        for comparator in comparators:
            prop = comparator["property"]
            if prop == "receivedAt":
                keys.append(_received_of)
            elif prop == "size":
                keys.append(_size_of)
            elif prop == "id":
                keys.append(_content_of)
            elif prop in ("from", "to", "subject"):
                keys.append(self._text_key(prop))
            elif prop == "sentAt":
                keys.append(
                    lambda e: (
                        as_date((self.summary(e.content).get("envelope") or {}).get("date") or "")
                        or ""
                    )
                )
            else:  # hasKeyword
                keys.append(_keyword_key(str(comparator.get("keyword", "")).lower()))
        return lambda e: tuple(k(e) for k in keys)

    def _text_key(self, name: str) -> Callable[[Email], str]:
        return lambda e: self.envelope_text(e.content, name)


def _keyword_key(word: str) -> Callable[[Email], bool]:
    return lambda e: word in e.keywords()


def _size_of(email: Email) -> int:
    return email.size


def _content_of(email: Email) -> int:
    return email.content


def _received_of(email: Email) -> float:
    return email.received


def _comparators(args: dict[str, Any]) -> list[dict[str, Any]]:
    sort = arg(args, "sort", list)
    if sort is None:
        return [{"property": "receivedAt", "isAscending": False}]
    out = []
    for comparator in sort:
        if not isinstance(comparator, dict) or not isinstance(comparator.get("property"), str):
            raise MethodError("invalidArguments", "a sort comparator is an object with property")
        if comparator["property"] not in _SORTS:
            raise MethodError("unsupportedSort", f"cannot sort on {comparator['property']!r}")
        if comparator["property"] == "hasKeyword" and not isinstance(
            comparator.get("keyword"), str
        ):
            raise MethodError("invalidArguments", "hasKeyword sorts need 'keyword'")
        out.append(comparator)
    return out


def _fast_query(
    snap: Snapshot, condition: Any, comparators: list[dict[str, Any]]
) -> list[int] | None:
    """The common list query (one mailbox, sorted by date, size or id) straight from the
    index columns, with no object per message; None when the query is not that one."""
    if not isinstance(condition, dict) or set(condition) != {"inMailbox"}:
        return None
    if len(comparators) != 1 or comparators[0]["property"] not in ("receivedAt", "size", "id"):
        return None
    box = parse_id(condition["inMailbox"], "m")
    if box is None:
        return None
    columns = snap.emails.columns_of(box)
    if columns is None:
        return []
    prop = comparators[0]["property"]
    keys = columns.dates if prop == "receivedAt" else (
        columns.sizes if prop == "size" else columns.contents
    )  # fmt: skip
    order = sorted(
        range(len(keys)),
        key=keys.__getitem__,
        reverse=comparators[0].get("isAscending", True) is False,
    )
    contents = columns.contents
    return list(dict.fromkeys(contents[i] for i in order))  # a content twice in one mailbox


def _memo_key(condition: Any, comparators: list[dict[str, Any]]) -> tuple[bytes, bytes]:
    return (
        orjson.dumps(condition, option=orjson.OPT_SORT_KEYS),
        orjson.dumps(comparators, option=orjson.OPT_SORT_KEYS),
    )


def query_ids(account: Account, snap: Snapshot, args: dict[str, Any]) -> list[int]:
    """The content ids of every email matching the query's filter, in its sort order
    (memoised on the snapshot: a page of the same query costs a slice)."""
    condition = args.get("filter")
    comparators = _comparators(args)
    memo_key = (*_memo_key(condition, comparators), args.get("collapseThreads") is True)
    found: list[int] | None = snap.memo.get(memo_key)
    if found is not None:
        return found
    found = _fast_query(snap, condition, comparators)
    if found is None:
        matcher = _Matcher(account, snap)
        emails = list(snap.emails.values())
        if condition is not None:
            check = matcher.check(condition)
            emails = [e for e in emails if check(e)]
        directions = {
            comparator.get("isAscending", True) is not False for comparator in comparators
        }
        if len(directions) == 1:  # one sort on a composite key; the id breaks ties
            key = matcher.sort_key(comparators)
            emails.sort(key=lambda e: (*key(e), e.content), reverse=not directions.pop())
        else:  # stable sorts from the last comparator to the first
            emails.sort(key=lambda e: e.content, reverse=True)
            for comparator in reversed(comparators):
                emails.sort(
                    key=matcher.sort_key([comparator]),
                    reverse=comparator.get("isAscending", True) is False,
                )
        found = [e.content for e in emails]
    if args.get("collapseThreads") is True:
        # the first email of each thread in the sort order (RFC 8621 §4.4.3)
        threads = account.jmap.views.threads_of(found)
        seen: set[int] = set()
        collapsed = []
        for content in found:
            thread = threads[content]
            if thread not in seen:
                seen.add(thread)
                collapsed.append(content)
        found = collapsed
    if len(snap.memo) > 16:
        snap.memo.clear()
    snap.memo[memo_key] = found
    return found


async def _query_ids_off_loop(account: Account, snap: Snapshot, args: dict[str, Any]) -> list[int]:
    """:func:`query_ids`, in an executor thread when it may read many messages (a text
    search over a big mailbox must not hold the event loop): it reads only the snapshot,
    taken on the loop, and the store, whose reads are thread-safe."""
    memo_key = (
        *_memo_key(args.get("filter"), _comparators(args)),
        args.get("collapseThreads") is True,
    )
    if len(snap.emails) <= _OFF_LOOP or memo_key in snap.memo:
        return query_ids(account, snap, args)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, query_ids, account, snap, args)


async def email_query(account: Account, call: Call) -> dict[str, Any]:
    args = call.args
    account.check_account(args)
    snap = account.snapshot(fresh=True)
    ordered = await _query_ids_off_loop(account, snap, args)
    position = arg(args, "position", int, 0)
    limit = unsigned(args, "limit")
    anchor = arg(args, "anchor", str)
    total = len(ordered)
    if anchor is not None:
        content = parse_id(anchor, "e")
        try:
            index = ordered.index(content) if content is not None else -1
        except ValueError:
            index = -1
        if index < 0:
            raise MethodError("anchorNotFound", "the anchor is not in the results")
        position = max(0, index + arg(args, "anchorOffset", int, 0))
    elif position < 0:
        position = max(0, total + position)
    cap = account.jmap.limits.max_objects_in_get
    limit = cap if limit is None else min(limit, cap)
    page = ordered[position : position + limit]
    out: dict[str, Any] = {
        "accountId": account.id,
        "queryState": snap.state,
        "canCalculateChanges": True,
        "position": position,
        "ids": [email_id(c) for c in page],
        "limit": limit,
    }
    if args.get("calculateTotal"):
        out["total"] = total
    return out


# --- changes ------------------------------------------------------------------------------


def email_changes_since(
    account: Account, since: str, gone_threads: dict[int, int] | None = None
) -> tuple[list[int], list[int], list[int], Snapshot]:
    """(created, updated, destroyed) content ids since the Email state *since*; raises
    cannotCalculateChanges when the state is not ours or the store cannot tell. With
    *gone_threads*, it is filled with content id -> thread key of every email that left a
    mailbox since (from the store's expunge records; cannotCalculateChanges when one was
    written before they kept the thread key)."""
    old = parse_email_state(since)
    if old is None:
        raise MethodError("cannotCalculateChanges", "not a state of this server")
    snap = account.snapshot(fresh=True)
    current = {info.id: info for info in snap.infos}
    if any(box not in current for box in old):
        raise MethodError("cannotCalculateChanges", "a mailbox was deleted since that state")
    store = account.store
    changed: set[int] = set()
    gone: set[int] = set()
    arrived: dict[int, set[int]] = {}  # content -> mailboxes it arrived in since
    known: set[int] = set()  # contents that left a mailbox they were in at that state
    for box, info in current.items():
        modseq, uidnext = old.get(box, (0, 0))
        if (info.highestmodseq, info.uidnext) == (modseq, uidnext):
            continue
        changes = store.changes_since(account.user, info.name, modseq)
        if changes is None:
            raise MethodError("cannotCalculateChanges", "a mailbox changed meanwhile")
        for uid, content in zip(changes.changed.uids, changes.changed.contents, strict=True):
            changed.add(content)
            if uid >= uidnext:
                arrived.setdefault(content, set()).add(box)
        if changes.expunged:
            records = store.expunged_threads_since(
                info.id, modseq, need_threads=gone_threads is not None
            )
            if records is None:
                raise MethodError("cannotCalculateChanges", "the store cannot tell what left")
            for uid, content, thread in records:
                gone.add(content)
                if uid < uidnext:  # it was there at that state: the client knew it
                    known.add(content)
                if gone_threads is not None:
                    gone_threads[content] = thread
    created: list[int] = []
    updated: list[int] = []
    destroyed: list[int] = []
    for content in changed | gone:
        email = snap.emails.get(content)
        if email is None:
            if content in known:  # else made and removed since: the client never saw it
                destroyed.append(content)
            continue
        new_everywhere = content not in gone and set(email.places) == arrived.get(content)
        (created if new_everywhere else updated).append(content)
    return sorted(created), sorted(updated), sorted(destroyed), snap


async def email_changes(account: Account, call: Call) -> dict[str, Any]:
    args = call.args
    account.check_account(args)
    since = arg(args, "sinceState", str)
    if since is None:
        raise MethodError("invalidArguments", "'sinceState' is required")
    max_changes = unsigned(args, "maxChanges")
    prefix = "e"
    if call.name.startswith("Thread"):
        prefix = "t"
        gone_threads: dict[int, int] = {}
        created, updated, destroyed, snap = email_changes_since(account, since, gone_threads)
        created, updated, destroyed = _thread_changes(
            account, snap, created, destroyed, gone_threads
        )
    else:
        created, updated, destroyed, snap = email_changes_since(account, since)
    if max_changes is not None and len(created) + len(updated) + len(destroyed) > max_changes:
        raise MethodError("cannotCalculateChanges", "more changes than maxChanges")
    return {
        "accountId": account.id,
        "oldState": since,
        "newState": snap.state,
        "hasMoreChanges": False,
        "created": [f"{prefix}{c:x}" for c in created],
        "updated": [f"{prefix}{c:x}" for c in updated],
        "destroyed": [f"{prefix}{c:x}" for c in destroyed],
    }


def _thread_changes(
    account: Account,
    snap: Snapshot,
    created: list[int],
    destroyed: list[int],
    gone_threads: dict[int, int],
) -> tuple[list[int], list[int], list[int]]:
    """Email changes as Thread changes (thread keys, RFC 8621 §3.2: a Thread's only
    property is emailIds): a thread that had an email at the old state and has none now was
    destroyed, one that had none then and has some now was created, any other thread that
    gained or lost an email was updated. Flags and moves between mailboxes change no
    Thread. *gone_threads*: the thread of each email that left a mailbox since."""
    views = account.jmap.views
    new = set(created)
    threads = views.threads_of(created)
    touched: dict[int, bool] = {}  # thread key -> it had an email at the old state
    for content in created:
        touched.setdefault(threads[content], False)
    for content in destroyed:  # destroyed emails existed at the old state
        touched[gone_threads.get(content) or content] = True
    made, changed, gone = [], [], []
    for key, existed in touched.items():
        members = views.thread_members(account.user, snap, key)
        existed = existed or any(member not in new for member in members)
        if members and existed:
            changed.append(key)
        elif members:
            made.append(key)
        elif existed:
            gone.append(key)
    return sorted(made), sorted(changed), sorted(gone)


async def email_query_changes(account: Account, call: Call) -> dict[str, Any]:
    args = call.args
    account.check_account(args)
    since = arg(args, "sinceQueryState", str)
    if since is None:
        raise MethodError("invalidArguments", "'sinceQueryState' is required")
    created, updated, destroyed, snap = email_changes_since(account, since)
    ordered = await _query_ids_off_loop(account, snap, args)
    position = {content: index for index, content in enumerate(ordered)}
    touched = set(created) | set(updated)
    removed = [email_id(c) for c in sorted(touched | set(destroyed))]
    added = [
        {"id": email_id(c), "index": position[c]}
        for c in sorted(touched, key=lambda c: position.get(c, -1))
        if c in position
    ]
    max_changes = unsigned(args, "maxChanges")
    if max_changes is not None and len(removed) + len(added) > max_changes:
        raise MethodError("cannotCalculateChanges", "more changes than maxChanges")
    out: dict[str, Any] = {
        "accountId": account.id,
        "oldQueryState": since,
        "newQueryState": snap.state,
        "removed": removed,
        "added": added,
    }
    if args.get("calculateTotal"):
        out["total"] = len(ordered)
    return out


# --- Email/set, import, parse -------------------------------------------------------------


def _check_keyword(word: Any) -> str | None:
    if not isinstance(word, str) or not _KEYWORD.match(word):
        return None
    if any(ch in _FORBIDDEN_KEYWORD for ch in word):
        return None
    return word.lower()


def _flags_of(keywords: dict[str, Any]) -> list[str] | None:
    """IMAP flags of JMAP keywords; None when one is not a valid keyword."""
    flags = []
    for word, value in keywords.items():
        checked = _check_keyword(word)
        if checked is None or value is not True:
            return None
        flags.append(KEYWORD_FLAGS.get(checked, checked))
    return flags


def _imap_flags(email: Email) -> set[str]:
    """The IMAP flags (as stored, case kept) an email's keywords stand for."""
    flags = {KEYWORD_FLAGS[w] for w in email.keywords() if w in KEYWORD_FLAGS}
    flags.update(email.words or ())
    return flags


def _apply_patch(current: dict[str, bool], props: dict[str, Any], name: str) -> Any:
    """The new value of *name* after a full value or ``name/key`` patches; None when the
    patch is invalid; the unchanged dict when it does not touch *name*."""
    if name in props:
        value = props[name]
        if not isinstance(value, dict):
            return None
        return dict(value)
    out = dict(current)
    prefix = name + "/"
    for key, value in props.items():
        if key.startswith(prefix):
            item = key[len(prefix) :].replace("~1", "/").replace("~0", "~")
            if value is True:
                out[item] = True
            elif value is None or value is False:
                out.pop(item, None)
            else:
                return None
    return out


async def _update_email(
    account: Account, email: Email, props: dict[str, Any], snap: Snapshot, call: Call
) -> dict[str, Any] | None:
    """Apply one Email/set update; the SetError, or None when done."""
    unknown = [
        k
        for k in props
        if k not in ("keywords", "mailboxIds")
        and not k.startswith("keywords/")
        and not k.startswith("mailboxIds/")
    ]
    if unknown:
        return {"type": "invalidProperties", "properties": unknown}
    user = account.user
    keywords = _apply_patch(email.keywords(), props, "keywords")
    boxes_in = _apply_patch({f"m{b:x}": True for b in email.places}, props, "mailboxIds")
    if keywords is None:
        return {"type": "invalidProperties", "properties": ["keywords"]}
    if boxes_in is None:
        return {"type": "invalidProperties", "properties": ["mailboxIds"]}
    flags = _flags_of(keywords)
    if flags is None:
        return {"type": "invalidProperties", "properties": ["keywords"]}
    targets: set[int] = set()
    for key, value in boxes_in.items():
        if isinstance(key, str) and key.startswith("#"):
            key = call.created_ids.get(key[1:], "")
        box = parse_id(key, "m")
        if box is None or box not in snap.by_id or value is not True:
            return {"type": "invalidProperties", "properties": ["mailboxIds"]}
        targets.add(box)
    if not targets:
        return {"type": "invalidProperties", "properties": ["mailboxIds"], "description": "empty"}
    # keywords: every copy gets the same flags (\Deleted, which JMAP does not show, stays)
    old_flags = _imap_flags(email)
    wanted = set(flags)
    lower_wanted = {f.lower() for f in wanted}
    add = [f for f in wanted if f.lower() not in {o.lower() for o in old_flags}]
    remove = [f for f in old_flags if f.lower() not in lower_wanted]
    for box, uid in email.places.items():
        name = snap.by_id[box].name
        if add:
            await account.commit(set_flags(user, name, [uid], add, "add"))
        if remove:
            await account.commit(set_flags(user, name, [uid], remove, "remove"))
    # mailboxes: moves first (a pair of one left and one joined), then copies, then removals
    current = dict(email.places)
    leaving = [b for b in current if b not in targets]
    joining = [b for b in targets if b not in current]
    while leaving and joining:
        source, dest = leaving.pop(), joining.pop()
        result = await account.commit(
            move_messages(user, snap.by_id[source].name, snap.by_id[dest].name, [current[source]])
        )
        if isinstance(result, Exception):
            return {"type": "notFound", "description": str(result)}
        current.pop(source)
    for dest in joining:
        source = next(iter(current))
        result = await account.commit(
            copy_messages(
                user,
                snap.by_id[source].name,
                snap.by_id[dest].name,
                [current[source]],
                quota=account.worker.users.quota(user),
            )
        )
        if isinstance(result, OverQuota):
            return {"type": "overQuota", "description": str(result)}
        if isinstance(result, Exception):
            return {"type": "notFound", "description": str(result)}
    for source in leaving:
        await account.commit(expunge(user, snap.by_id[source].name, [current[source]]))
    return None


async def _destroy_email(account: Account, email: Email, snap: Snapshot) -> None:
    for box, uid in email.places.items():
        await account.commit(expunge(account.user, snap.by_id[box].name, [uid]))


async def store_message(
    account: Account,
    data: bytes,
    mailbox_ids: Any,
    keywords: Any,
    received: float | None,
    call: Call,
) -> tuple[int | None, dict[str, Any] | None]:
    """Deliver *data* into the first mailbox of *mailbox_ids* (copies into the others);
    (content id, None) or (None, SetError)."""
    snap = account.snapshot(fresh=True)
    if not isinstance(mailbox_ids, dict) or not mailbox_ids:
        return None, {"type": "invalidProperties", "properties": ["mailboxIds"]}
    boxes: list[MailboxInfo] = []
    for key, value in mailbox_ids.items():
        if isinstance(key, str) and key.startswith("#"):
            key = call.created_ids.get(key[1:], "")
        box = parse_id(key, "m")
        if box is None or box not in snap.by_id or value is not True:
            return None, {"type": "invalidProperties", "properties": ["mailboxIds"]}
        boxes.append(snap.by_id[box])
    flags = _flags_of(keywords if isinstance(keywords, dict) else {})
    if flags is None:
        return None, {"type": "invalidProperties", "properties": ["keywords"]}
    limit = account.worker.config.limits.max_message_size
    if len(data) > limit:
        return None, {"type": "tooLarge", "description": f"over {limit} octets"}
    quota = account.worker.users.quota(account.user)
    delivery = prepare_delivery(
        account.user,
        data,
        mailbox=boxes[0].name,
        flags=flags,
        internaldate=received,
        quota=quota,
        create=False,
    )
    result = await account.commit(deliver(delivery))
    if isinstance(result, OverQuota):
        return None, {"type": "overQuota", "description": str(result)}
    if isinstance(result, NoSuchMailbox):
        return None, {"type": "invalidProperties", "properties": ["mailboxIds"]}
    if isinstance(result, Exception):
        return None, {"type": "serverFail", "description": str(result)}
    if not isinstance(result, Delivered):
        return None, {"type": "serverFail", "description": "not stored"}
    # the new entry is above the modseq the mailbox had before this commit: read only
    # what changed since then, never the whole mailbox
    changes = account.store.changes_since(account.user, boxes[0].name, boxes[0].highestmodseq)
    content = None
    if changes is not None:
        for uid, found in zip(changes.changed.uids, changes.changed.contents, strict=True):
            if uid == result.uid:
                content = found
                break
    if content is None:
        return None, {"type": "serverFail", "description": "stored but not found"}
    for other in boxes[1:]:
        await account.commit(
            copy_messages(account.user, boxes[0].name, other.name, [result.uid], quota=quota)
        )
    return content, None


def _created_email(account: Account, content: int, size: int) -> dict[str, Any]:
    return {
        "id": email_id(content),
        "blobId": f"B{content:x}",
        "threadId": thread_id(account.jmap.views.threads_of([content])[content]),
        "size": size,
    }


async def email_set(account: Account, call: Call) -> dict[str, Any]:
    from tachymail.jmap.compose import build_message  # drafts: only Email/set creates them

    args = call.args
    account.check_account(args)
    snap = account.snapshot(fresh=True)
    if_in = arg(args, "ifInState", str)
    if if_in is not None and if_in != snap.state:
        raise MethodError("stateMismatch", "the emails changed since that state")
    create = arg(args, "create", dict, {})
    update = arg(args, "update", dict, {})
    destroy = id_list(args, "destroy") or []
    if len(create) + len(update) + len(destroy) > account.jmap.limits.max_objects_in_set:
        raise MethodError("requestTooLarge", "more changes than maxObjectsInSet")
    out: dict[str, Any] = {
        "accountId": account.id,
        "oldState": snap.state,
        "created": {},
        "updated": {},
        "destroyed": [],
        "notCreated": {},
        "notUpdated": {},
        "notDestroyed": {},
    }
    for creation_id, props in create.items():
        if not isinstance(props, dict):
            out["notCreated"][creation_id] = {"type": "invalidProperties"}
            continue
        try:
            # uploads of up to maxSizeUpload each are read and encoded: off the event loop,
            # which serves SMTP and IMAP too (blob lookups use the snapshot taken above)
            data = await asyncio.get_running_loop().run_in_executor(
                None, build_message, account, props
            )
        except ValueError as exc:
            out["notCreated"][creation_id] = {
                "type": "invalidProperties", "description": str(exc)
            }  # fmt: skip
            continue
        await _store_created(account, call, out, creation_id, data, props)
    if create:
        snap = account.snapshot(fresh=True)  # "#creation" targets name the new emails
    # One snapshot serves every target: changing one email moves no other email's places
    # or flags, and rebuilding it reads every email of the user. Only an email changed
    # earlier in this call is looked up again.
    touched: set[int] = set()
    for target, props in update.items():
        if target.startswith("#"):
            target = call.created_ids.get(target[1:], target)
        content = parse_id(target, "e")
        if content in touched:
            snap = account.snapshot(fresh=True)
        if content is not None:
            touched.add(content)
        email = snap.emails.get(content) if content is not None else None
        if email is None:
            out["notUpdated"][target] = {"type": "notFound"}
            continue
        if not isinstance(props, dict):
            out["notUpdated"][target] = {"type": "invalidPatch"}
            continue
        error = await _update_email(account, email, props, snap, call)
        if error is not None:
            out["notUpdated"][target] = error
        else:
            out["updated"][target] = None
    for target in destroy:
        content = parse_id(target, "e")
        if content in touched:
            snap = account.snapshot(fresh=True)
        if content is not None:
            touched.add(content)
        email = snap.emails.get(content) if content is not None else None
        if email is None:
            out["notDestroyed"][target] = {"type": "notFound"}
            continue
        await _destroy_email(account, email, snap)
        out["destroyed"].append(target)
    out["newState"] = account.snapshot(fresh=True).state
    return out


async def email_import(account: Account, call: Call) -> dict[str, Any]:
    args = call.args
    account.check_account(args)
    snap = account.snapshot(fresh=True)
    if_in = arg(args, "ifInState", str)
    if if_in is not None and if_in != snap.state:
        raise MethodError("stateMismatch", "the emails changed since that state")
    emails = arg(args, "emails", dict)
    if emails is None:
        raise MethodError("invalidArguments", "'emails' is required")
    if len(emails) > account.jmap.limits.max_objects_in_set:
        raise MethodError("requestTooLarge", "more emails than maxObjectsInSet")
    out: dict[str, Any] = {
        "accountId": account.id,
        "oldState": snap.state,
        "created": {},
        "notCreated": {},
    }
    for creation_id, props in emails.items():
        if not isinstance(props, dict) or not isinstance(props.get("blobId"), str):
            out["notCreated"][creation_id] = {
                "type": "invalidProperties", "properties": ["blobId"]
            }  # fmt: skip
            continue
        data = account.read_blob(props["blobId"])
        if data is None:
            out["notCreated"][creation_id] = {"type": "blobNotFound", "notFound": [props["blobId"]]}
            continue
        await _store_created(account, call, out, creation_id, data, props)
    out["newState"] = account.snapshot(fresh=True).state
    return out


async def _store_created(
    account: Account,
    call: Call,
    out: dict[str, Any],
    creation_id: str,
    data: bytes,
    props: dict[str, Any],
) -> None:
    """Store one created or imported message and record it in *out* (created or
    notCreated), as Email/set create and Email/import both do."""
    received = _parse_utc(props["receivedAt"], "receivedAt") if "receivedAt" in props else None
    content, error = await store_message(
        account, data, props.get("mailboxIds"), props.get("keywords", {}), received, call
    )
    if error is not None or content is None:
        out["notCreated"][creation_id] = error
        return
    call.created_ids[creation_id] = email_id(content)
    out["created"][creation_id] = _created_email(account, content, len(data))


async def email_parse(account: Account, call: Call) -> dict[str, Any]:
    args = call.args
    account.check_account(args)
    blob_ids = id_list(args, "blobIds") or []
    if len(blob_ids) > account.jmap.limits.max_objects_in_get:
        raise MethodError("requestTooLarge", "more blobIds than maxObjectsInGet")
    opts = _get_options(args)
    opts["properties"] = [
        p for p in opts["properties"] if p not in ("id", "threadId", "mailboxIds")
    ] if args.get("properties") is None else opts["properties"]  # fmt: skip
    parsed: dict[str, Any] = {}
    not_parsable, not_found = [], []
    for blob_id in blob_ids:
        data = account.read_blob(blob_id)
        if data is None:
            not_found.append(blob_id)
            continue
        summary = build_summary(data)
        if not summary.get("body"):
            not_parsable.append(blob_id)
            continue

        def read(offset: int, length: int, data: bytes = data) -> bytes:
            return data[offset : offset + length]

        content = parse_id(blob_id.partition(".")[0], "B") or 0
        parsed[blob_id] = email_object(content, summary, read, opts, None)
        if "blobId" in parsed[blob_id]:
            parsed[blob_id]["blobId"] = blob_id
    return {
        "accountId": account.id,
        "parsed": parsed,
        "notParsable": not_parsable,
        "notFound": not_found,
    }


# --- Thread, SearchSnippet ----------------------------------------------------------------


async def thread_get(account: Account, call: Call) -> dict[str, Any]:
    args = call.args
    account.check_account(args)
    ids = id_list(args, "ids")
    snap = account.snapshot(fresh=True)
    if ids is None:
        if len(snap.emails) > account.jmap.limits.max_objects_in_get:
            # as Email/get: listing every thread of a big mailbox is not a /get
            raise MethodError("requestTooLarge", "more emails than maxObjectsInGet: pass ids")
        ids = list(
            dict.fromkeys(map(thread_id, account.jmap.views.threads_of(snap.emails).values()))
        )
    if len(ids) > account.jmap.limits.max_objects_in_get:
        raise MethodError("requestTooLarge", "more ids than maxObjectsInGet")
    found, missing = [], []
    views = account.jmap.views
    for wanted in ids:
        key = parse_id(wanted, "t")
        members = views.thread_members(account.user, snap, key) if key is not None else []
        if not members:
            missing.append(wanted)
        else:
            found.append({"id": wanted, "emailIds": [email_id(c) for c in members]})
    return {"accountId": account.id, "state": snap.state, "list": found, "notFound": missing}


def _terms(node: Any, out: list[str]) -> list[str]:
    if isinstance(node, dict):
        if "conditions" in node and node.get("operator") != "NOT":
            for child in node.get("conditions") or ():
                _terms(child, out)
        for key in ("text", "body", "subject"):
            if isinstance(node.get(key), str) and node[key].strip():
                out.append(node[key].strip())
    return out


def _highlight(text: str, terms: list[str]) -> str | None:
    lowered = text.lower()
    spans = []
    for term in terms:
        start = lowered.find(term.lower())
        while start >= 0:
            spans.append((start, start + len(term)))
            start = lowered.find(term.lower(), start + len(term))
    if not spans:
        return None
    spans.sort()
    out, position = [], 0
    for start, end in spans:
        if start < position:
            continue
        out.append(html.escape(text[position:start]))
        out.append(f"<mark>{html.escape(text[start:end])}</mark>")
        position = end
    out.append(html.escape(text[position:]))
    return "".join(out)


async def search_snippet_get(account: Account, call: Call) -> dict[str, Any]:
    args = call.args
    account.check_account(args)
    ids = id_list(args, "emailIds")
    if ids is None:
        raise MethodError("invalidArguments", "'emailIds' is required")
    if len(ids) > account.jmap.limits.max_objects_in_get:
        raise MethodError("requestTooLarge", "more ids than maxObjectsInGet")
    terms = _terms(args.get("filter"), [])
    snap = account.snapshot(fresh=True)
    matcher = _Matcher(account, snap)
    found, missing = [], []
    for wanted in ids:
        content = parse_id(wanted, "e")
        if content is None or content not in snap.emails:
            missing.append(wanted)
            continue
        raw_subject = (matcher.summary(content).get("envelope") or {}).get("subject")
        subject = as_text(raw_subject) if raw_subject else ""
        body = matcher.body_text(content)
        snippet = None
        for term in terms:
            at = body.find(term.lower())
            if at >= 0:
                start = max(0, at - 60)
                snippet = _highlight(body[start : start + 200], terms)
                break
        found.append({"emailId": wanted, "subject": _highlight(subject, terms), "preview": snippet})
    return {"accountId": account.id, "list": found, "notFound": missing}
