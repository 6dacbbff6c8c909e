"""Errors of the HTTP API as JSON, and request bodies read into pydantic models.

Every failure a client can cause is a 4xx whose body is
``{"error": {"code": "<machine-readable>", "message": "<for a person>", "details": ...}}``
(``details`` only when there is more to say, such as the fields a body got wrong). Handlers
raise :class:`ApiError`; the server's middleware turns it (and aiohttp's own HTTP errors)
into that body.
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

__all__ = ["ApiError", "error_body", "json_response", "read_body", "read_json"]

M = TypeVar("M", bound=BaseModel)


class ApiError(Exception):
    """A refusal of the request: HTTP *status* (4xx, or 503 for "try later"), a short
    machine-readable *code* (``"bad_json"``, ``"invalid_body"``, ``"not_found"``...), a
    *message* for a person, and optional *details* (plain JSON data)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return {"error": error}


def json_response(data: Any, status: int = 200) -> web.Response:
    """*data* as an ``application/json`` response (orjson: the replies can be big)."""
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def read_body(request: web.Request, max_bytes: int) -> bytes:
    """The request's body; 413 ``too_large`` beyond *max_bytes*, declared or streamed (read
    no further)."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise ApiError(413, "too_large", f"the body is over {max_bytes} octets")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, "too_large", f"the body is over {max_bytes} octets")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: web.Request, model: type[M], max_bytes: int) -> M:
    """The request's JSON body as *model*: 413 ``too_large`` beyond *max_bytes* (read no
    further), 415 ``unsupported_media_type`` unless it says JSON, 400 ``bad_json`` when it
    does not parse, 422 ``invalid_body`` naming each field that is wrong (unknown fields
    included: the models forbid extras)."""
    if request.content_type not in ("application/json", ""):
        raise ApiError(415, "unsupported_media_type", "the body must be application/json")
    body = await read_body(request, max_bytes)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"the body is not JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [
            {
                "field": ".".join(str(part) for part in error["loc"]) or "(body)",
                "problem": error["msg"],
            }
            for error in exc.errors(include_url=False, include_input=False)
        ]
        first = problems[0]
        message = f"{first['field']}: {first['problem']}"
        raise ApiError(422, "invalid_body", message, problems) from None
