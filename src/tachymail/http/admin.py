"""The queue commands over HTTP (scope admin): list, show, hold, release, flush, bounce,
delete, and flush everything deferred.

The same logic as ``tachymail queue`` (tachymail.queue.admin): the same message data,
filters and actions. Reads run off the event loop, in one LMDB read snapshot each; every
change runs in the worker's group commit, and the reply is sent once it is synced.

- ``GET /api/v1/queue``: a page of messages, oldest first, filtered by ``sender`` (an
  address, a domain, or ``<>`` for bounces), ``recipient``, ``domain`` (of a pending
  recipient), ``state`` (active, deferred, held) and ``older_than`` (``90s``, ``30m``,
  ``2h``, ``1d``); ``limit`` (1 to 1000, default 100) and ``cursor`` (the previous
  page's ``next_cursor``; null at the end). A page reads at most 50 times its limit
  (at least 10,000) envelopes, so a filter that matches little may return a short or
  empty page with a cursor to go on from.
- ``GET /api/v1/queue/{id}``: one message: envelope, state, next attempt, last reason and
  its header section.
- ``POST /api/v1/queue/{id}/hold|release|flush|bounce`` and ``DELETE /api/v1/queue/{id}``:
  ``{"id", "action", "changed", "note"}``; a message already so (hold of a held message)
  is no error: ``changed`` is false and ``note`` says why. 404 ``not_found`` when there
  is no such message. A bounce queues the sender's failure report in the same commit.
- ``POST /api/v1/queue/flush``: every deferred message due now, 500 messages per commit.

A change the queue's disk has no room for is 503 ``storage_full``. Deleting on a full
disk is the command line's job (``tachymail queue delete`` spends the queue's reserve).
"""

from __future__ import annotations

import functools
import logging
import re
import time
from typing import Any, Literal

import lmdb
from aiohttp import web
from pydantic import BaseModel

from tachymail.http.errors import ApiError, json_response
from tachymail.http.openapi import error_response, json_content, model_schemas
from tachymail.http.server import HTTP, HttpContext
from tachymail.queue import admin
from tachymail.queue.select import MessageFilter, parse_age
from tachymail.queue.stats import STATES
from tachymail.queue.store import QueueStore, StorageFull

__all__ = ["OPENAPI", "setup"]

log = logging.getLogger(__name__)

#: queue ids are hex (tachymail.queue.envelope.new_queue_id: 20 digits)
ID_PATTERN = "[0-9a-fA-F]{1,40}"
#: the same in the route (aiohttp takes no braces inside a variable's expression)
ROUTE_ID = "[0-9a-fA-F]+"
_ID = re.compile(ID_PATTERN)
#: the single-message actions by POST
POST_ACTIONS = ("hold", "release", "flush", "bounce")
#: messages per commit of POST /api/v1/queue/flush
FLUSH_CHUNK = 500
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
#: the query parameters of the listing
LIST_PARAMETERS = ("sender", "recipient", "domain", "state", "older_than", "limit", "cursor")
#: what a note says about an action that changed nothing on a message that is there
NOTES = {"hold": "is already held", "release": "is not held", "flush": "is not deferred"}


# --- the bodies, as documented (the handlers send the queue's own dicts) ----------------


class QueuedRecipient(BaseModel):
    """One recipient of a queued message and its delivery state."""

    address: str
    params: dict[str, Any]
    state: Literal["queued", "delivered", "bounced"]
    attempts: int
    next_attempt: float
    last_attempt: float
    last_reply: str
    status: str
    remote_mta: str


class QueuedMessage(BaseModel):
    """A queued message's envelope as the queue keeps it, with its state now."""

    id: str
    sender: str
    recipients: list[QueuedRecipient]
    mail_params: dict[str, Any]
    arrival: float
    size: int
    client_ip: str
    client_port: int
    helo: str
    listener: str
    tls: str | None
    auth: str | None
    state: Literal["active", "deferred", "held"]
    due: float
    warned: bool
    tags: list[str]
    metadata: dict[str, Any]
    pool: str
    version: int
    next_attempt: float | None
    last_reason: str


class QueuedMessageDetail(QueuedMessage):
    """A queued message with its header section (as text; undecodable octets replaced)."""

    headers: str


class QueuePage(BaseModel):
    """One page of the queue listing."""

    messages: list[QueuedMessage]
    next_cursor: str | None
    total: int


class QueueActionResult(BaseModel):
    """What an action did to one message."""

    id: str
    action: Literal["hold", "release", "flush", "bounce", "delete"]
    changed: bool
    note: str | None


class QueueFlushResult(BaseModel):
    """What flushing the whole queue did."""

    action: Literal["flush"]
    changed: int


# --- handlers --------------------------------------------------------------------------------


def _store(ctx: HttpContext) -> QueueStore:
    return ctx.worker.committer.store


def _invalid(parameter: str, problem: str) -> ApiError:
    return ApiError(
        400,
        "invalid_query",
        f"{parameter}: {problem}",
        [{"field": parameter, "problem": problem}],
    )


def _message_filter(query: Any) -> MessageFilter:
    """The listing's filters from the query string; raises 400 ``invalid_query``."""
    unknown = sorted(set(query) - set(LIST_PARAMETERS))
    if unknown:
        raise _invalid(unknown[0], "unknown parameter")
    state = query.get("state")
    if state is not None and state not in STATES:
        raise _invalid("state", f"must be one of {', '.join(STATES)}")
    older_than = None
    if query.get("older_than") is not None:
        try:
            older_than = parse_age(query["older_than"])
        except ValueError as exc:
            raise _invalid("older_than", str(exc)) from None
    return MessageFilter(
        state=state,
        domain=query.get("domain"),
        sender=query.get("sender"),
        older_than=older_than,
        recipient=query.get("recipient"),
    )


def _limit(query: Any) -> int:
    text = query.get("limit")
    if text is None:
        return DEFAULT_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise _invalid("limit", f"an integer from 1 to {MAX_LIMIT}")
    return int(text)


async def list_queue(request: web.Request) -> web.Response:
    ctx = request.app[HTTP]
    query = request.query
    chosen = _message_filter(query)
    limit = _limit(query)
    cursor = query.get("cursor", "")
    if cursor and not _ID.fullmatch(cursor):
        raise _invalid("cursor", "not a cursor this listing gave")
    now = time.time()
    store = _store(ctx)
    work = functools.partial(admin.page, store, chosen, now, after=cursor.lower(), limit=limit)
    found, next_cursor = await ctx.worker.loop.run_in_executor(None, work)
    return json_response(
        {
            "messages": [admin.message_data(envelope, now) for envelope in found],
            "next_cursor": next_cursor,
            "total": store.count(),
        }
    )


def _queue_id(request: web.Request) -> str:
    return request.match_info["id"].lower()


async def show_message(request: web.Request) -> web.Response:
    ctx = request.app[HTTP]
    queue_id = _queue_id(request)
    found = await ctx.worker.loop.run_in_executor(None, _read_message, _store(ctx), queue_id)
    if found is None:
        raise ApiError(404, "not_found", f"no message {queue_id} in the queue")
    envelope, content = found
    return json_response(admin.show_data(envelope, content, time.time(), body=False))


def _read_message(store: QueueStore, queue_id: str) -> tuple[Any, bytes] | None:
    envelope = store.envelope(queue_id)
    if envelope is None:
        return None
    return envelope, store.content(queue_id) or b""


async def _commit(ctx: HttpContext, action: admin.QueueAction) -> None:
    """Run *action* in the worker's next group commit and wait until it is synced; wake
    the delivery workers for what it made due. Raises 503 when storage refuses."""

    def operation(store: QueueStore, txn: lmdb.Transaction) -> Exception | None:
        try:
            action(store, txn)
        except lmdb.Error:
            raise  # the storage's failure: the whole commit's
        except Exception as exc:  # a bug of this action alone: fail it, not the batch
            log.exception("http: queue %s failed", action.action)
            return exc
        return None

    try:
        await ctx.worker.committer.submit_operation(operation)
    except StorageFull as exc:
        raise ApiError(503, "storage_full", f"no room on the queue's disk: {exc}") from None
    except lmdb.Error as exc:
        raise ApiError(503, "storage_error", f"the queue failed: {exc}") from None
    notifier = ctx.worker.notifier
    if notifier is not None:
        for envelope in action.due_now:
            notifier.queued(envelope.id, envelope.pending())


async def _act(request: web.Request, action_name: str) -> web.Response:
    ctx = request.app[HTTP]
    queue_id = _queue_id(request)
    if action_name == "bounce" and ctx.reporter is None:
        raise ApiError(503, "unavailable", "bouncing is not available in this process")
    action = admin.QueueAction(action_name, [queue_id], ctx.reporter)
    await _commit(ctx, action)
    note = None
    if not action.changed:
        if _store(ctx).envelope(queue_id) is None:
            raise ApiError(404, "not_found", f"no message {queue_id} in the queue")
        note = NOTES.get(action_name, "is unchanged")
    return json_response(
        {"id": queue_id, "action": action_name, "changed": bool(action.changed), "note": note}
    )


def _post_action(action_name: str) -> Any:
    async def handler(request: web.Request) -> web.Response:
        return await _act(request, action_name)

    handler.__name__ = f"queue_{action_name}"
    return handler


async def delete_message(request: web.Request) -> web.Response:
    return await _act(request, "delete")


async def flush_queue(request: web.Request) -> web.Response:
    """Every deferred message due now, FLUSH_CHUNK messages per commit (a long queue never
    holds the write lock, or the event loop of an inline commit, for long)."""
    ctx = request.app[HTTP]
    store = _store(ctx)
    ids = await ctx.worker.loop.run_in_executor(None, store.ids)
    changed = 0
    now = time.time()
    for start in range(0, len(ids), FLUSH_CHUNK):
        action = admin.QueueAction("flush", ids[start : start + FLUSH_CHUNK], now=now)
        await _commit(ctx, action)
        changed += action.changed
    return json_response({"action": "flush", "changed": changed})


def setup(app: web.Application) -> None:
    """Add the queue routes to *app*."""
    one = f"/api/v1/queue/{{id:{ROUTE_ID}}}"
    app.router.add_get("/api/v1/queue", list_queue)
    app.router.add_post("/api/v1/queue/flush", flush_queue)
    app.router.add_get(one, show_message)
    app.router.add_delete(one, delete_message)
    for action_name in POST_ACTIONS:
        app.router.add_post(f"{one}/{action_name}", _post_action(action_name))


# --- the OpenAPI fragment ----------------------------------------------------------------


def _parameter(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


_ID_PARAMETER = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "queue id",
    "schema": {"type": "string", "pattern": f"^{ID_PATTERN}$"},
}


def _action_operation(action_name: str, summary: str) -> dict[str, Any]:
    responses: dict[str, Any] = {
        "200": json_content("QueueActionResult", "Done (or already so: see note)"),
        "404": error_response(404, "No such message in the queue"),
        "503": error_response(503),
    }
    return {
        "operationId": f"queue_{action_name}",
        "summary": summary,
        "tags": ["queue"],
        "parameters": [_ID_PARAMETER],
        "responses": responses,
    }


def _fragment() -> dict[str, Any]:
    one = "/api/v1/queue/{id}"
    paths: dict[str, Any] = {
        "/api/v1/queue": {
            "get": {
                "operationId": "queue_list",
                "summary": "List queued messages, oldest first, filtered and paged",
                "tags": ["queue"],
                "parameters": [
                    _parameter(
                        "sender",
                        "an address, a domain, or <> for bounces",
                        {"type": "string", "maxLength": 320},
                    ),
                    _parameter(
                        "recipient",
                        "a pending recipient's address",
                        {"type": "string", "maxLength": 320},
                    ),
                    _parameter(
                        "domain",
                        "a pending recipient's domain",
                        {"type": "string", "maxLength": 255},
                    ),
                    _parameter("state", "the message's state", {"enum": list(STATES)}),
                    _parameter(
                        "older_than",
                        "at least this old: 90s, 30m, 2h, 1d (a bare number: minutes)",
                        {"type": "string", "pattern": r"^\d{1,6}[smhd]?$"},
                    ),
                    _parameter(
                        "limit",
                        f"messages per page, at most {MAX_LIMIT}",
                        {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                    ),
                    _parameter(
                        "cursor",
                        "the previous page's next_cursor",
                        {"type": "string", "pattern": f"^{ID_PATTERN}$"},
                    ),
                ],
                "responses": {
                    "200": json_content("QueuePage", "A page of messages"),
                    "400": error_response(400, "A query parameter is wrong (invalid_query)"),
                },
            }
        },
        "/api/v1/queue/flush": {
            "post": {
                "operationId": "queue_flush_all",
                "summary": "Make every deferred message due now",
                "tags": ["queue"],
                "responses": {
                    "200": json_content("QueueFlushResult", "How many messages changed"),
                    "503": error_response(503),
                },
            }
        },
        one: {
            "get": {
                "operationId": "queue_show",
                "summary": "One message: envelope, state and header section",
                "tags": ["queue"],
                "parameters": [_ID_PARAMETER],
                "responses": {
                    "200": json_content("QueuedMessageDetail", "The message"),
                    "404": error_response(404, "No such message in the queue"),
                },
            },
            "delete": _action_operation("delete", "Delete a message without notice"),
        },
    }
    summaries = {
        "hold": "Keep a message from delivery until released",
        "release": "Let a held message be delivered again",
        "flush": "Retry a deferred message now",
        "bounce": "Give up on a message and send its sender a failure report",
    }
    for action_name in POST_ACTIONS:
        paths[f"{one}/{action_name}"] = {
            "post": _action_operation(action_name, summaries[action_name])
        }
    schemas = model_schemas(QueuePage, QueuedMessageDetail, QueueActionResult, QueueFlushResult)
    return {"paths": paths, "components": {"schemas": schemas}}


OPENAPI: dict[str, Any] = _fragment()
