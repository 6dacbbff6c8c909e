"""The suppression list over HTTP (scope admin): list, add, remove, import CSV.

The same list as ``tachymail suppression`` and the RCPT check (tachymail.queue.suppression):
a change is seen at once by every process of the node. Writes are synced before the reply,
and run off the event loop.

- ``GET /api/v1/suppressions``: a page of unexpired entries in (scope, address) order;
  ``scope`` (``global`` or a sender domain) filters; ``limit`` (1 to 1000, default 100) and
  ``cursor`` (the previous page's ``next_cursor``; null at the end).
- ``POST /api/v1/suppressions``: one entry ``{"address", "scope"?, "reason"?,
  "expires"?}`` or a list of up to 10,000; ``expires`` is epoch seconds, or a string: a
  duration (``30d``) or an ISO 8601 time; absent or 0: never. All or nothing: 422
  ``invalid_body`` names every bad entry (``0.address``...). Replies ``{"added",
  "suppressions"}``; a "suppression" event per entry when a webhook wants them.
- ``DELETE /api/v1/suppressions/{address}?scope=``: ``{"removed": true, "address",
  "scope"}``; 404 ``not_found`` when there is no such entry; 400 ``invalid_query`` for a
  malformed address or scope.
- ``POST /api/v1/suppressions/import``: a ``text/csv`` body ``address,scope,reason,expires``
  with that header line, at most ``[http] max_body_bytes``; all or nothing: 400
  ``invalid_csv`` lists the bad lines (``line N: ...``). Replies ``{"imported"}``.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, RootModel

from tachymail.http.errors import ApiError, json_response, read_body, read_json
from tachymail.http.openapi import error_response, json_content, model_schemas
from tachymail.http.server import HTTP, HttpContext
from tachymail.queue.events import events_wanted, make_event, record_events
from tachymail.queue.suppression import (
    GLOBAL,
    Suppression,
    SuppressionError,
    SuppressionList,
    make_entry,
    parse_csv,
    parse_expiry,
    shared_list,
)

__all__ = ["OPENAPI", "setup"]

log = logging.getLogger(__name__)

PATH = "/api/v1/suppressions"
IMPORT_PATH = "/api/v1/suppressions/import"
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
#: entries per POST (a bigger list is an import's job)
MAX_ENTRIES = 10_000
LIST_PARAMETERS = ("scope", "limit", "cursor")


# --- bodies -------------------------------------------------------------------------------


class SuppressionIn(BaseModel):
    """An entry to add: the address, its scope ("global" or a sender domain), why, and
    when it lapses (epoch seconds, a duration such as "30d", an ISO 8601 time; 0: never)."""

    model_config = ConfigDict(extra="forbid")

    address: str = Field(min_length=3, max_length=254)
    scope: str = Field(default=GLOBAL, max_length=253)
    reason: str = Field(default="", max_length=500)
    expires: float | str = 0


class SuppressionsIn(RootModel[SuppressionIn | list[SuppressionIn]]):
    """One entry, or a list of up to 10,000."""


class SuppressionOut(BaseModel):
    """An entry as stored: lower-cased address and scope, where it came from (bounce, api,
    cli, import), when it was made and when it lapses (epoch seconds; 0: never)."""

    address: str
    scope: str
    reason: str
    source: str
    created: float
    expires: float


class SuppressionPage(BaseModel):
    """A page of entries and the cursor of the next (null at the end)."""

    suppressions: list[SuppressionOut]
    next_cursor: str | None


class SuppressionsAdded(BaseModel):
    """What a POST added."""

    added: int
    suppressions: list[SuppressionOut]


class SuppressionRemoved(BaseModel):
    """What a DELETE removed."""

    removed: bool
    address: str
    scope: str


class SuppressionsImported(BaseModel):
    """How many entries an import added."""

    imported: int


# --- handlers -------------------------------------------------------------------------------


def _list(ctx: HttpContext) -> SuppressionList:
    """The process's one list: the SMTP worker's (its RCPT check's), else shared_list's."""
    own = getattr(ctx.worker, "suppressions", None)
    if isinstance(own, SuppressionList):
        return own
    return shared_list(ctx.config.data_path)


def _invalid(parameter: str, problem: str) -> ApiError:
    return ApiError(
        400, "invalid_query", f"{parameter}: {problem}", [{"field": parameter, "problem": problem}]
    )


async def _in_thread(ctx: HttpContext, work: Any) -> Any:
    return await ctx.worker.loop.run_in_executor(None, work)


async def list_suppressions(request: web.Request) -> web.Response:
    ctx = request.app[HTTP]
    query = request.query
    unknown = [name for name in query if name not in LIST_PARAMETERS]
    if unknown:
        raise _invalid(unknown[0], "unknown parameter")
    text = query.get("limit")
    limit = DEFAULT_LIMIT
    if text is not None:
        if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
            raise _invalid("limit", f"an integer from 1 to {MAX_LIMIT}")
        limit = int(text)
    suppressions = _list(ctx)
    work = functools.partial(
        suppressions.list, query.get("scope") or None, query.get("cursor") or None, limit
    )
    try:
        page, cursor = await _in_thread(ctx, work)
    except SuppressionError as exc:
        field = "cursor" if "cursor" in str(exc) else "scope"
        raise _invalid(field, str(exc)) from None
    return json_response(
        {"suppressions": [entry.as_dict() for entry in page], "next_cursor": cursor}
    )


def _entries(body: SuppressionsIn, now: float) -> list[Suppression]:
    """The validated entries of *body*; ApiError 422 naming every bad one."""
    items = body.root if isinstance(body.root, list) else [body.root]
    if len(items) > MAX_ENTRIES:
        raise ApiError(
            422, "invalid_body", f"at most {MAX_ENTRIES} entries per request (import a CSV)"
        )
    entries: list[Suppression] = []
    problems: list[dict[str, str]] = []
    for number, item in enumerate(items):
        where = f"{number}." if isinstance(body.root, list) else ""
        try:
            expires = (
                parse_expiry(item.expires, now)
                if isinstance(item.expires, str)
                else float(item.expires)
            )
            if expires and expires <= now:
                raise SuppressionError(f"expires in the past: {item.expires!r}")
            entries.append(make_entry(item.address, item.scope, item.reason, "api", expires, now))
        except SuppressionError as exc:
            field = str(exc).partition(":")[0].removeprefix("not an ").removeprefix("not a ")
            field = field if field in ("address", "scope") else "expires"
            problems.append({"field": f"{where}{field}", "problem": str(exc)})
    if problems:
        first = problems[0]
        raise ApiError(422, "invalid_body", f"{first['field']}: {first['problem']}", problems)
    return entries


async def add_suppressions(request: web.Request) -> web.Response:
    ctx = request.app[HTTP]
    body = await read_json(request, SuppressionsIn, ctx.max_body_bytes)
    now = time.time()
    entries = _entries(body, now)
    suppressions = _list(ctx)
    await _in_thread(ctx, functools.partial(suppressions.add_many, entries))
    log.info(
        "http: %d suppression(s) added by %s",
        len(entries),
        getattr(request.get("token"), "name", "a token"),
    )
    await _report(ctx, entries, now)
    return json_response(
        {"added": len(entries), "suppressions": [entry.as_dict() for entry in entries]}
    )


async def _report(ctx: HttpContext, entries: list[Suppression], now: float) -> None:
    """A "suppression" event per entry, when a webhook wants them (committed before the
    reply: the entries are on the list already, the events follow at least once)."""
    if not entries or not events_wanted(ctx.config, "suppression"):
        return
    events = [
        make_event("suppression", recipient=entry.address, reply=entry.reason, when=now)
        for entry in entries
    ]
    await ctx.worker.committer.submit_operation(record_events(events))


async def delete_suppression(request: web.Request) -> web.Response:
    ctx = request.app[HTTP]
    unknown = [name for name in request.query if name != "scope"]
    if unknown:
        raise _invalid(unknown[0], "unknown parameter")
    address = request.match_info["address"]
    scope = request.query.get("scope") or GLOBAL
    suppressions = _list(ctx)
    try:
        removed = await _in_thread(ctx, functools.partial(suppressions.remove, address, scope))
    except SuppressionError as exc:
        field = "scope" if "scope" in str(exc) else "address"
        raise _invalid(field, str(exc)) from None
    if not removed:
        raise ApiError(404, "not_found", f"no suppression of {address} in scope {scope}")
    return json_response({"removed": True, "address": address.lower(), "scope": scope.lower()})


async def import_suppressions(request: web.Request) -> web.Response:
    ctx = request.app[HTTP]
    if request.content_type not in ("text/csv", "text/plain"):
        raise ApiError(415, "unsupported_media_type", "the body must be text/csv")
    body = await read_body(request, ctx.max_body_bytes)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "invalid_csv", f"the body is not UTF-8: {exc}") from None
    now = time.time()
    try:
        entries = await _in_thread(
            ctx, functools.partial(parse_csv, text.splitlines(keepends=True), now=now)
        )
    except SuppressionError as exc:
        lines = str(exc).splitlines()
        raise ApiError(400, "invalid_csv", lines[0], lines) from None
    suppressions = _list(ctx)
    count = await _in_thread(ctx, functools.partial(suppressions.add_many, entries))
    log.info("http: %d suppressions imported", count)
    await _report(ctx, entries, now)
    return json_response({"imported": count})


def setup(app: web.Application) -> None:
    """Add the suppression routes to *app*."""
    app.router.add_get(PATH, list_suppressions)
    app.router.add_post(PATH, add_suppressions)
    app.router.add_post(IMPORT_PATH, import_suppressions)
    app.router.add_delete(PATH + "/{address}", delete_suppression)


# --- the OpenAPI fragment -----------------------------------------------------------------


def _parameter(name: str, where: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "description": description,
        "schema": schema,
    }


_SCOPE_SCHEMA = {"type": "string", "maxLength": 253}


def _fragment() -> dict[str, Any]:
    paths: dict[str, Any] = {
        PATH: {
            "get": {
                "operationId": "suppressions_list",
                "summary": "List the suppression list's unexpired entries, paged",
                "tags": ["suppressions"],
                "parameters": [
                    _parameter(
                        "scope",
                        "query",
                        "only this scope: global or a sender domain",
                        _SCOPE_SCHEMA,
                    ),
                    _parameter(
                        "limit",
                        "query",
                        f"entries per page, at most {MAX_LIMIT}",
                        {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                    ),
                    _parameter(
                        "cursor",
                        "query",
                        "the previous page's next_cursor",
                        {"type": "string", "maxLength": 700},
                    ),
                ],
                "responses": {
                    "200": json_content("SuppressionPage", "A page of entries"),
                    "400": error_response(400, "A query parameter is wrong (invalid_query)"),
                },
            },
            "post": {
                "operationId": "suppressions_add",
                "summary": "Add (or replace) one entry or a list of up to 10,000",
                "tags": ["suppressions"],
                "requestBody": {**json_content("SuppressionsIn", "The entries"), "required": True},
                "responses": {
                    "200": json_content("SuppressionsAdded", "The entries, as stored"),
                },
            },
        },
        IMPORT_PATH: {
            "post": {
                "operationId": "suppressions_import",
                "summary": "Add the entries of a CSV file (address,scope,reason,expires)",
                "tags": ["suppressions"],
                "requestBody": {
                    "required": True,
                    "content": {"text/csv": {"schema": {"type": "string"}}},
                },
                "responses": {
                    "200": json_content("SuppressionsImported", "How many were added"),
                    "400": error_response(400, "A line is wrong (invalid_csv: every one named)"),
                    "413": error_response(413),
                    "415": error_response(415, "The body is not text/csv"),
                },
            }
        },
        PATH + "/{address}": {
            "delete": {
                "operationId": "suppressions_delete",
                "summary": "Remove an entry",
                "tags": ["suppressions"],
                "parameters": [
                    _parameter("address", "path", "the suppressed address", {"type": "string"}),
                    _parameter("scope", "query", "its scope (default global)", _SCOPE_SCHEMA),
                ],
                "responses": {
                    "200": json_content("SuppressionRemoved", "Removed"),
                    "400": error_response(400, "Not an address or scope (invalid_query)"),
                    "404": error_response(404, "No such entry"),
                },
            }
        },
    }
    schemas = model_schemas(
        SuppressionsIn,
        SuppressionPage,
        SuppressionsAdded,
        SuppressionRemoved,
        SuppressionsImported,
    )
    return {"paths": paths, "components": {"schemas": schemas}}


OPENAPI: dict[str, Any] = _fragment()
