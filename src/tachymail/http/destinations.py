"""The destinations API: per-destination status, suspend and resume.

- ``GET /api/v1/destinations?limit=&cursor=``: one entry per destination (see
  :func:`tachymail.queue.destinations.merge`), sorted by name, paged;
- ``POST /api/v1/destinations/{destination}/suspend`` with an optional body
  ``{"until": <epoch seconds> | "<duration: 30m, 2h, 1d>", "reason": "..."}``: deliveries to
  the destination (a domain, a mail host, ``*.domain``; tachymail.queue.suspensions) stop
  until resumed or until ``until``; the delivery workers see it within a second;
- ``POST /api/v1/destinations/{destination}/resume``: 404 when it was not suspended
  (``?source=NAME``: the suspension of that egress source only);
- ``GET /api/v1/shaping``: the providers, rules and reactions in force (the built-in set
  and the ``[shaping] files``), the throttles reactions have put on (rule, source, factor,
  until), the suspensions of one egress source towards a destination, and each delivery
  worker's limiters (rate, connections in use, cluster-wide or not, on the local share
  while Redis is away), as the delivery workers publish them once a second.

The queue's counts come from a scan of the queue in a thread, shared by the requests of the
next :data:`COUNT_TTL` seconds (a listing of a huge queue costs one scan, not one per page).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from tachymail.http.errors import ApiError, json_response, read_json
from tachymail.http.openapi import error_response, json_content, model_schemas
from tachymail.http.server import HTTP
from tachymail.queue.destinations import QueueCounts, merge, page, queue_counts, read_statuses
from tachymail.queue.suspensions import (
    MAX_REASON,
    Suspension,
    SuspensionError,
    Suspensions,
    normalize_destination,
    parse_until,
)

__all__ = ["OPENAPI", "setup"]

#: seconds a count of the queue serves listings before the queue is counted again
COUNT_TTL = 2.0
#: the largest suspend body read
MAX_BODY = 4096
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000


class SuspendRequest(BaseModel):
    """The body of a suspend (all optional; no body at all: until resumed, no reason)."""

    model_config = ConfigDict(extra="forbid")
    until: float | str | None = Field(
        default=None,
        description="When the suspension lifts by itself: epoch seconds, or a duration from "
        'now ("90s", "30m", "2h", "1d", "1w"); absent, null or 0: until resumed.',
    )
    reason: str = Field(default="", max_length=MAX_REASON, description="Why (for people).")
    source: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9._-]{0,64}$",
        description="Stop only the mail leaving from this egress source ([[egress_source]] "
        'name; "default" for the host\'s own address); absent: from every source.',
    )


class SuspensionModel(BaseModel):
    destination: str = Field(description="domain, mail host, IP address or *.domain")
    until: float = Field(description="epoch seconds; 0: until resumed")
    reason: str
    created: float
    source: str = Field(default="", description='the egress source it stops; "": every one')


class SuspendReply(BaseModel):
    suspension: SuspensionModel


class ResumeReply(BaseModel):
    destination: str
    resumed: bool


class LastError(BaseModel):
    code: int
    reply: str
    time: float


class Destination(BaseModel):
    destination: str = Field(description="recipient domain (or a suspended host or pattern)")
    queued: int = Field(description="pending recipients in the queue")
    in_flight: int = Field(description="recipients being attempted now")
    connections: int = Field(description="open connections of the domain's next hop")
    attempts_per_second: float = Field(description="attempts per second over the last minute")
    last_error: LastError | None
    next_hop: str = Field(description='the pool key ("mx:...", "route:host:port"); "" unknown')
    suspension: SuspensionModel | None
    source_suspensions: list[SuspensionModel] = Field(
        default=[], description="suspensions of one egress source towards it (shaping reactions)"
    )


class DestinationList(BaseModel):
    destinations: list[Destination]
    next_cursor: str | None
    queue_exact: bool = Field(description="false: a huge queue was counted in part")


@dataclass(slots=True)
class _State:
    """Per application: the suspensions (opened on first use) and the last queue count."""

    suspensions: Suspensions | None = None
    path: Path | None = None
    counts: QueueCounts | None = None
    counted: float = float("-inf")
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


_STATE = web.AppKey("tachymail_destinations", _State)


def setup(app: web.Application) -> None:
    """Add the destinations routes to *app* (needs ``app[HTTP]`` when serving)."""
    app[_STATE] = _State()
    app.router.add_get("/api/v1/destinations", list_destinations)
    app.router.add_post("/api/v1/destinations/{destination}/suspend", suspend)
    app.router.add_post("/api/v1/destinations/{destination}/resume", resume)
    app.router.add_get("/api/v1/shaping", show_shaping)
    app.on_cleanup.append(_close)


# LMDB lets a process open an environment once: the applications of a worker's several
# http listeners share one Suspensions per data directory (path -> it, applications using it).
_OPEN: dict[Path, tuple[Suspensions, int]] = {}


async def _close(app: web.Application) -> None:
    state = app[_STATE]
    if state.suspensions is None or state.path is None:
        return
    suspensions, users = _OPEN.pop(state.path, (state.suspensions, 1))
    if users > 1:
        _OPEN[state.path] = (suspensions, users - 1)
    else:
        suspensions.close()
    state.suspensions = None


def _suspensions(request: web.Request) -> Suspensions:
    state = request.app[_STATE]
    if state.suspensions is None:
        path = request.app[HTTP].config.data_path
        shared = _OPEN.get(path)
        if shared is None:
            try:
                shared = (Suspensions(path), 0)
            except (lmdb.Error, OSError) as exc:
                raise ApiError(503, "unavailable", f"cannot open the suspensions: {exc}") from None
        _OPEN[path] = (shared[0], shared[1] + 1)
        state.suspensions, state.path = shared[0], path
    return state.suspensions


def _destination(request: web.Request) -> str:
    try:
        return normalize_destination(request.match_info["destination"])
    except SuspensionError as exc:
        raise ApiError(400, "invalid_destination", str(exc)) from None


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ApiError(400, "invalid_parameter", f"{name} must be an integer from {low} to {high}")
    return value


async def list_destinations(request: web.Request) -> web.Response:
    limit = _int_param(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    cursor = request.query.get("cursor") or None
    data_path = request.app[HTTP].config.data_path
    state = request.app[_STATE]
    suspensions = _suspensions(request)
    async with state.lock:  # one scan of the queue at a time, shared while fresh
        if state.counts is None or time.monotonic() - state.counted > COUNT_TTL:
            store = request.app[HTTP].worker.committer.store
            try:
                state.counts = await asyncio.to_thread(queue_counts, store)
            except (lmdb.Error, OSError) as exc:
                raise ApiError(503, "unavailable", f"cannot read the queue: {exc}") from None
            state.counted = time.monotonic()
        counts = state.counts
    now = time.time()
    try:
        table = await asyncio.to_thread(suspensions.active, now)
        statuses = await asyncio.to_thread(read_statuses, data_path, now)
    except (lmdb.Error, OSError) as exc:
        raise ApiError(503, "unavailable", f"cannot read the suspensions: {exc}") from None
    entries = merge(statuses, counts, table, now)
    try:
        chosen, next_cursor = page(entries, cursor, limit)
    except ValueError as exc:
        raise ApiError(400, "invalid_cursor", str(exc)) from None
    return json_response(
        {"destinations": chosen, "next_cursor": next_cursor, "queue_exact": counts.exact}
    )


async def suspend(request: web.Request) -> web.Response:
    destination = _destination(request)
    body = SuspendRequest()
    if request.body_exists:
        body = await read_json(request, SuspendRequest, MAX_BODY)
    try:
        until = parse_until(body.until)
    except SuspensionError as exc:
        details = [{"field": "until", "problem": str(exc)}]
        raise ApiError(422, "invalid_body", f"until: {exc}", details) from None
    suspensions = _suspensions(request)
    try:
        made: Suspension = await asyncio.to_thread(
            suspensions.suspend, destination, until, body.reason, None, body.source
        )
    except SuspensionError as exc:  # the table is full
        raise ApiError(409, "too_many", str(exc)) from None
    except (lmdb.Error, OSError) as exc:
        raise ApiError(503, "unavailable", f"cannot store the suspension: {exc}") from None
    return json_response({"suspension": made.as_dict()})


async def resume(request: web.Request) -> web.Response:
    destination = _destination(request)
    source = request.query.get("source", "")
    suspensions = _suspensions(request)
    try:
        resumed = await asyncio.to_thread(suspensions.resume, destination, source)
    except (lmdb.Error, OSError) as exc:
        raise ApiError(503, "unavailable", f"cannot store the resumption: {exc}") from None
    if not resumed:
        what = f"{destination} (source {source})" if source else destination
        raise ApiError(404, "not_found", f"{what} is not suspended")
    return json_response({"destination": destination, "resumed": True})


async def show_shaping(request: web.Request) -> web.Response:
    data_path = request.app[HTTP].config.data_path
    now = time.time()
    try:
        statuses = await asyncio.to_thread(read_statuses, data_path, now)
        table = await asyncio.to_thread(_suspensions(request).active, now)
    except (lmdb.Error, OSError) as exc:
        raise ApiError(503, "unavailable", f"cannot read the delivery status: {exc}") from None
    workers = [
        {
            "index": status.get("index", 0),
            "throttles": status.get("shaping", {}).get("throttles", []),
            "limits": status.get("shaping", {}).get("limits", {}),
        }
        for status in statuses
    ]
    rules: dict[str, Any] = next((s["shaping"] for s in statuses if "shaping" in s), {})
    return json_response(
        {
            "files": rules.get("files", []),
            "providers": rules.get("providers", []),
            "rules": rules.get("rules", []),
            "reactions": rules.get("reactions", []),
            "source_suspensions": [s.as_dict() for s in table.values() if s.source],
            "workers": workers,
        }
    )


# --- OpenAPI ---------------------------------------------------------------------------------

_UNAVAILABLE = {"503": error_response(503, "The queue or the suspensions cannot be read now")}
_DESTINATION_PARAM = {
    "name": "destination",
    "in": "path",
    "required": True,
    "description": "a recipient domain, a mail host (or IP address) or *.domain",
    "schema": {"type": "string"},
}

_OBJECT_LIST = {"type": "array", "items": {"type": "object"}}

#: the OpenAPI 3.1 fragment of these routes (merged by tachymail.http.server)
OPENAPI: dict[str, Any] = {
    "paths": {
        "/api/v1/destinations": {
            "get": {
                "operationId": "listDestinations",
                "summary": "Per destination: queued, in flight, connections, rate, last "
                "error, suspension",
                "tags": ["destinations"],
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_LIMIT,
                            "default": DEFAULT_LIMIT,
                        },
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "required": False,
                        "description": "next_cursor of the previous page",
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": json_content("DestinationList", "a page of destinations, by name"),
                    "400": error_response(400, "a bad limit or cursor"),
                    **_UNAVAILABLE,
                },
            }
        },
        "/api/v1/destinations/{destination}/suspend": {
            "post": {
                "operationId": "suspendDestination",
                "summary": "Stop deliveries to a destination, until resumed or until a time",
                "tags": ["destinations"],
                "parameters": [_DESTINATION_PARAM],
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/SuspendRequest"}
                        }
                    },
                },
                "responses": {
                    "200": json_content("SuspendReply", "the suspension now in force"),
                    "400": error_response(400, "not a destination, or a body that is not JSON"),
                    "404": error_response(404, "no such route (a destination with a slash)"),
                    "409": error_response(409, "too many destinations are suspended already"),
                    "413": error_response(413, "a body over 4 KiB"),
                    "422": error_response(
                        422, "a wrong or unknown field in the body, or an until in the past"
                    ),
                    **_UNAVAILABLE,
                },
            }
        },
        "/api/v1/shaping": {
            "get": {
                "operationId": "showShaping",
                "summary": "Shaping rules and reactions in force, throttles, source "
                "suspensions and limiter states",
                "tags": ["shaping"],
                "responses": {
                    "200": {
                        "description": "the shaping state (rules as the delivery workers "
                        "published them within the last seconds; empty while none runs)",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": [
                                        "files",
                                        "providers",
                                        "rules",
                                        "reactions",
                                        "source_suspensions",
                                        "workers",
                                    ],
                                    "properties": {
                                        "files": {"type": "array", "items": {"type": "string"}},
                                        "providers": _OBJECT_LIST,
                                        "rules": _OBJECT_LIST,
                                        "reactions": _OBJECT_LIST,
                                        "source_suspensions": _OBJECT_LIST,
                                        "workers": _OBJECT_LIST,
                                    },
                                }
                            }
                        },
                    },
                    "503": error_response(503, "the status or the suspensions cannot be read"),
                },
            }
        },
        "/api/v1/destinations/{destination}/resume": {
            "post": {
                "operationId": "resumeDestination",
                "summary": "Resume deliveries to a suspended destination",
                "tags": ["destinations"],
                "parameters": [
                    _DESTINATION_PARAM,
                    {
                        "name": "source",
                        "in": "query",
                        "required": False,
                        "description": "resume only the suspension of this egress source",
                        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{0,64}$"},
                    },
                ],
                "responses": {
                    "200": json_content("ResumeReply", "resumed"),
                    "400": error_response(400, "not a destination"),
                    "404": error_response(404, "the destination is not suspended"),
                    **_UNAVAILABLE,
                },
            }
        },
    },
    "components": {
        "schemas": model_schemas(SuspendRequest, SuspendReply, ResumeReply, DestinationList)
    },
}
