"""RFC 8620 core request processing, with no HTTP in it: a parsed request object in, the
response object out.

What callers may rely on:

- :func:`check_request` raises :class:`RequestError` (a request-level problem, RFC 8620
  §3.6.1: ``notRequest``, ``unknownCapability``, ``limit`` with its ``limit`` name) before
  any method runs.
- :func:`run_calls` runs the method calls in order; each call's failure is a method-level
  ``["error", {"type": ...}, callId]`` response (§3.6.2) and never stops the next call.
  Result references (``#name`` arguments, §3.7) are resolved against earlier responses of
  the same request, JSON Pointer paths with ``*`` included; a reference that does not
  resolve is ``invalidResultReference``.
- A method handler raising :class:`MethodError` answers that error; any other exception
  is logged with its traceback and answered ``serverFail`` (never an HTTP 500).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

CORE = "urn:ietf:params:jmap:core"
MAIL = "urn:ietf:params:jmap:mail"
SUBMISSION = "urn:ietf:params:jmap:submission"
VACATION = "urn:ietf:params:jmap:vacationresponse"
#: the capabilities a request may name in "using"
CAPABILITIES = (CORE, MAIL, SUBMISSION, VACATION)

ERROR_PREFIX = "urn:ietf:params:jmap:error:"


class RequestError(Exception):
    """A request-level error (RFC 8620 §3.6.1): an RFC 7807 problem with HTTP *status*."""

    def __init__(self, kind: str, detail: str, status: int = 400, **extra: Any) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.status = status
        self.extra = extra

    def problem(self) -> dict[str, Any]:
        """The problem details object (RFC 7807) of this error."""
        return {
            "type": ERROR_PREFIX + self.kind,
            "status": self.status,
            "detail": self.detail,
            **self.extra,
        }


class MethodError(Exception):
    """A method-level error (RFC 8620 §3.6.2): *kind* is its "type"; *extra* more
    properties of the error object (such as ``properties`` for invalidArguments)."""

    def __init__(self, kind: str, description: str = "", **extra: Any) -> None:
        super().__init__(description or kind)
        self.kind = kind
        self.description = description
        self.extra = extra

    def response(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.kind, **self.extra}
        if self.description:
            body["description"] = self.description
        return body


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits announced in the session's core capability and enforced here."""

    max_size_upload: int = 50_000_000
    max_concurrent_upload: int = 4
    max_size_request: int = 10_000_000
    max_concurrent_requests: int = 8
    max_calls_in_request: int = 64
    max_objects_in_get: int = 1000
    max_objects_in_set: int = 1000

    def capability(self) -> dict[str, Any]:
        """The value of ``urn:ietf:params:jmap:core`` in the session object."""
        return {
            "maxSizeUpload": self.max_size_upload,
            "maxConcurrentUpload": self.max_concurrent_upload,
            "maxSizeRequest": self.max_size_request,
            "maxConcurrentRequests": self.max_concurrent_requests,
            "maxCallsInRequest": self.max_calls_in_request,
            "maxObjectsInGet": self.max_objects_in_get,
            "maxObjectsInSet": self.max_objects_in_set,
            "collationAlgorithms": ["i;ascii-casemap", "i;unicode-casemap"],
        }


@dataclass(slots=True)
class Call:
    """One method call being run: what a handler gets besides its arguments."""

    name: str
    args: dict[str, Any]
    call_id: str
    #: responses this handler adds after its own (an implicit Email/set of
    #: EmailSubmission/set's onSuccessUpdateEmail, RFC 8621 §7.5)
    extra: list[list[Any]] = field(default_factory=list)
    #: the request's creation ids -> the ids made (RFC 8620 §5.3 "#creationId" references)
    created_ids: dict[str, str] = field(default_factory=dict)


Method = Callable[[Call], Awaitable[dict[str, Any]]]


def check_request(data: Any, limits: Limits) -> tuple[list[str], list[list[Any]], dict[str, str]]:
    """(using, methodCalls, createdIds) of a request object; raises RequestError."""
    if not isinstance(data, dict):
        raise RequestError("notRequest", "the request is not a JSON object")
    using, calls = data.get("using"), data.get("methodCalls")
    if not isinstance(using, list) or not all(isinstance(u, str) for u in using):
        raise RequestError("notRequest", "'using' must be an array of strings")
    if not isinstance(calls, list):
        raise RequestError("notRequest", "'methodCalls' must be an array")
    for call in calls:
        if (
            not isinstance(call, list)
            or len(call) != 3
            or not isinstance(call[0], str)
            or not isinstance(call[1], dict)
            or not isinstance(call[2], str)
        ):
            raise RequestError(
                "notRequest", "each method call must be [name, arguments object, call id]"
            )
    unknown = [u for u in using if u not in CAPABILITIES]
    if unknown:
        raise RequestError("unknownCapability", f"unknown capability {unknown[0]!r}")
    if len(calls) > limits.max_calls_in_request:
        raise RequestError(
            "limit",
            f"more than {limits.max_calls_in_request} method calls",
            limit="maxCallsInRequest",
        )
    created = data.get("createdIds", {})
    if not isinstance(created, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in created.items()
    ):
        raise RequestError("notRequest", "'createdIds' must map strings to strings")
    return using, calls, dict(created)


class _Unresolved(Exception):
    pass


def _walk(value: Any, parts: list[str]) -> Any:
    """RFC 8620 §3.7's JSON Pointer with ``*`` over arrays (results flattened)."""
    if not parts:
        return value
    head, rest = parts[0].replace("~1", "/").replace("~0", "~"), parts[1:]
    if isinstance(value, list):
        if head == "*":
            out: list[Any] = []
            for item in value:
                found = _walk(item, rest)
                if isinstance(found, list):
                    out.extend(found)
                else:
                    out.append(found)
            return out
        if head.isdigit() and int(head) < len(value):
            return _walk(value[int(head)], rest)
        raise _Unresolved(f"no index {head!r}")
    if isinstance(value, dict) and head in value:
        return _walk(value[head], rest)
    raise _Unresolved(f"no member {head!r}")


def resolve_references(args: dict[str, Any], responses: list[list[Any]]) -> dict[str, Any]:
    """*args* with every ``#name`` ResultReference replaced by what it points to; raises
    MethodError("invalidResultReference" / "invalidArguments")."""
    out: dict[str, Any] = {}
    for key, value in args.items():
        if not key.startswith("#"):
            out[key] = value
            continue
        plain = key[1:]
        if plain in args:
            raise MethodError("invalidArguments", f"both {plain!r} and {key!r} are given")
        if (
            not isinstance(value, dict)
            or not isinstance(value.get("resultOf"), str)
            or not isinstance(value.get("name"), str)
            or not isinstance(value.get("path"), str)
        ):
            raise MethodError("invalidResultReference", f"{key}: not a ResultReference")
        source = next((r for r in responses if r[2] == value["resultOf"]), None)
        if source is None or source[0] != value["name"]:
            raise MethodError(
                "invalidResultReference",
                f"{key}: no {value['name']} response with call id {value['resultOf']!r}",
            )
        path = value["path"]
        if path and not path.startswith("/"):
            raise MethodError("invalidResultReference", f"{key}: bad path {path!r}")
        try:
            out[plain] = _walk(source[1], path.split("/")[1:] if path else [])
        except _Unresolved as exc:
            raise MethodError("invalidResultReference", f"{key}: {exc}") from None
    return out


async def run_calls(
    calls: list[list[Any]],
    using: list[str],
    methods: dict[str, tuple[str, Method]],
    created_ids: dict[str, str],
) -> list[list[Any]]:
    """The methodResponses of *calls*; *methods*: name -> (capability it needs, handler)."""
    responses: list[list[Any]] = []
    for name, raw_args, call_id in calls:
        try:
            found = methods.get(name)
            if found is None:
                raise MethodError("unknownMethod", f"no method {name!r}")
            capability, handler = found
            if capability not in using:
                raise MethodError("unknownMethod", f"{name} needs {capability} in 'using'")
            args = resolve_references(raw_args, responses)
            call = Call(name, args, call_id, created_ids=created_ids)
            result = await handler(call)
            responses.append([name, result, call_id])
            responses.extend(call.extra)
        except MethodError as exc:
            responses.append(["error", exc.response(), call_id])
        except Exception:
            log.exception("jmap: %s failed", name)
            responses.append(["error", {"type": "serverFail"}, call_id])
    return responses


# --- argument checks every method uses ------------------------------------------------------


def arg(args: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """The argument *name* (absent or null: *default*), checked to be of *kind*; raises
    invalidArguments otherwise (a bool is never taken for an int)."""
    value = args.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise MethodError("invalidArguments", f"{name!r} has the wrong type")
    if not isinstance(value, kinds):
        raise MethodError("invalidArguments", f"{name!r} has the wrong type")
    return value


def id_list(args: dict[str, Any], name: str) -> list[str] | None:
    """An optional array of ids (strings); raises invalidArguments otherwise."""
    value = arg(args, name, list)
    if value is not None and not all(isinstance(item, str) for item in value):
        raise MethodError("invalidArguments", f"{name!r} must be an array of ids")
    return list(value) if value is not None else None


def unsigned(args: dict[str, Any], name: str, default: int | None = None) -> int | None:
    value = arg(args, name, int, default)
    if value is not None and value < 0:
        raise MethodError("invalidArguments", f"{name!r} must not be negative")
    return int(value) if value is not None else None
