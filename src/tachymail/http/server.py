"""The HTTP API application of one SMTP worker process (listener role ``http``).

:func:`build_app` makes an aiohttp application served on the worker's own event loop
(the worker hands it the listener's SO_REUSEPORT socket). The handler modules ``admin``,
``inject``, ``suppressions`` and ``destinations`` each add their routes (``setup``) and
describe them (``OPENAPI``); the document of them all is served at
``GET /api/v1/openapi.json``. A module that does not exist is skipped.

What every request goes through, outermost first:

- **errors and the access log**: an :class:`~tachymail.http.errors.ApiError`, or one of
  aiohttp's HTTP errors (404, 405, 413...), becomes the JSON error body
  ``{"error": {"code", "message", "details"?}}`` with its status; anything else is logged
  with its traceback and answered 500 ``internal`` (a bug: the tests assert it never
  happens). One INFO line per request: client, method, path, status, token name, duration;
  and ``tachymail_http_requests_total{route,status}``.
- **authentication**: every ``/api/v1/`` route but the OpenAPI document needs
  ``Authorization: Bearer <token>`` (tachymail.auth.tokens): none or an unknown one is 401
  ``unauthorized`` with ``WWW-Authenticate: Bearer``; a token whose scope does not cover
  the route is 403 ``forbidden``. A wrong token is counted against the client address by
  the AUTH throttle every worker shares (tachymail.auth.throttle): its 401 waits
  ``auth.failure_delay`` times the failures counted (at most ``auth.max_failure_delay``),
  and after ``auth.max_failures_per_ip`` the address gets 429 ``too_many_failures`` with
  Retry-After for ``auth.lockout`` seconds, whatever token it sends. A valid token is
  checked in memory only (no lockout lookup): tokens are 256-bit random, guessing one is
  hopeless, and the throttle is there to make a flood of guesses cheap to refuse.
- **the body limit**: a declared Content-Length over ``[http] max_body_bytes`` is 413
  ``too_large`` before any handler runs; bodies read by ``read_json`` or ``request.read``
  stop at that limit too.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from tachymail.auth.tokens import TokenStore, allows
from tachymail.config import Config
from tachymail.frontend import log_locked_out, tarpit_delay
from tachymail.http import openapi
from tachymail.http.errors import ApiError, error_body
from tachymail.metrics import m

if TYPE_CHECKING:
    from tachymail.queue.admin import Reporter
    from tachymail.smtp.worker import WorkerContext

log = logging.getLogger(__name__)

#: the handler modules, in the order their routes are added (tachymail.http.<name>)
HANDLER_MODULES = ("admin", "inject", "suppressions", "destinations")
#: front ends served by the same application, each with ``setup(app)`` and no OpenAPI
#: part (imported by name: http never depends on them; one that is missing is skipped)
FRONT_END_MODULES = ("tachymail.jmap.routes",)

#: the error code of each HTTP status aiohttp itself may answer
_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
    429: "too_many_failures",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HttpContext:
    """What every request of one worker's HTTP application shares (``request.app[HTTP]``).

    ``worker``: the SMTP worker's context (``worker.committer`` the queue's group committer,
    ``worker.committer.store`` the QueueStore, ``worker.dkim``, ``worker.resolver``,
    ``worker.directory``, ``worker.notifier``, ``worker.auth_throttle``); ``config`` its
    configuration; ``tokens`` the bearer tokens; ``reporter`` the builder of the reports
    ``POST /api/v1/queue/{id}/bounce`` queues (None: bouncing is not available here);
    ``max_body_bytes`` the request body limit.
    """

    def __init__(
        self, worker: WorkerContext, tokens: TokenStore, reporter: Reporter | None = None
    ) -> None:
        self.worker = worker
        self.config: Config = worker.config
        self.tokens = tokens
        self.reporter = reporter
        self.max_body_bytes = worker.config.http.max_body_bytes


HTTP = web.AppKey("tachymail_http", HttpContext)


class _Refused(ApiError):
    """An ApiError whose response carries extra headers (WWW-Authenticate, Retry-After)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str]) -> None:
        super().__init__(status, code, message)
        self.headers = headers


def handler_modules() -> list[ModuleType]:
    """The handler modules that exist, in HANDLER_MODULES order. Only a module's own
    absence is skipped: a missing import inside it is an error like any other."""
    found = []
    for name in HANDLER_MODULES:
        full = f"tachymail.http.{name}"
        try:
            found.append(importlib.import_module(full))
        except ModuleNotFoundError as exc:
            if exc.name != full:
                raise
            log.debug("http: no %s module, its routes are not served", full)
    return found


class _ProtocolLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The log aiohttp's connection handler writes to: a request it refuses before any
    handler runs (a request line or header over its limits, bad framing: a 400 it answers
    itself) is one INFO line naming the client and the reason, not a traceback; anything
    else goes through as aiohttp logs it."""

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 400) < 500:
            self.logger.info("http: request refused before routing: %s: %s", str(msg) % args, exc)
            m.http_requests.labels("unmatched", str(exc.code or 400)).inc()
            return
        self.logger.exception(msg, *args, **kwargs)


def protocol_logger() -> logging.Logger:
    """The ``logger`` to give aiohttp's AppRunner (see :class:`_ProtocolLog`)."""
    return cast(logging.Logger, _ProtocolLog(log, {}))


def build_app(worker: WorkerContext, reporter: Reporter | None = None) -> web.Application:
    """The HTTP API application of *worker*: every handler module's routes, the OpenAPI
    document, the middlewares described in the module docstring. *reporter*: see
    :class:`HttpContext`."""
    config = worker.config
    app = web.Application(
        middlewares=[_errors, _guard],
        client_max_size=config.http.max_body_bytes,
    )
    app[HTTP] = HttpContext(worker, TokenStore(config.http_tokens_path), reporter)
    modules = handler_modules()
    for module in modules:
        module.setup(app)
    for name in FRONT_END_MODULES:
        try:
            front_end = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        front_end.setup(app)
    body = orjson.dumps(openapi.document(module.OPENAPI for module in modules))

    async def serve_document(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app.router.add_get(openapi.OPENAPI_PATH, serve_document)
    return app


def document() -> dict[str, Any]:
    """The OpenAPI document the server serves (for tools and tests without a server)."""
    return openapi.document(module.OPENAPI for module in handler_modules())


# --- the middlewares ---------------------------------------------------------------------


def _error_response(
    status: int, code: str, message: str, details: Any = None, headers: Any = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(error_body(code, message, details)),
        status=status,
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as the JSON error body; the access log line and the request metric."""
    started = time.perf_counter()
    try:
        response = await handler(request)
    except ApiError as exc:
        response = _error_response(
            exc.status, exc.code, exc.message, exc.details, getattr(exc, "headers", None)
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # a redirect or such: aiohttp answers it as it is
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
        code = _CODES.get(exc.status, f"http_{exc.status}")
        response = _error_response(exc.status, code, exc.reason, None, headers)
    except asyncio.CancelledError:
        _observe(request, 499, started)  # the client went away first (nginx's number)
        raise
    except Exception:
        log.exception("http %s %s: internal error", request.method, request.path)
        response = _error_response(500, "internal", "internal server error")
    _observe(request, response.status, started)
    return response


def _observe(request: web.Request, status: int, started: float) -> None:
    resource = getattr(request.match_info.route, "resource", None)
    route = resource.canonical if resource is not None else "unmatched"
    m.http_requests.labels(route, str(status)).inc()
    log.info(
        "http %s %s %s %d token=%s %.1fms",
        request.remote,
        request.method,
        request.path,
        status,
        request.get("token", "-"),
        (time.perf_counter() - started) * 1000,
    )


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer-token authentication by scope, then the body limit."""
    needed = openapi.required_scope(request.method, request.path)
    ctx = request.app[HTTP]
    if needed is not None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _Refused(
                401,
                "unauthorized",
                "a bearer token is needed (Authorization: Bearer <token>)",
                {"WWW-Authenticate": 'Bearer realm="tachymail"'},
            )
        found = ctx.tokens.check(token)
        if found is None:
            await _wrong_token(request, ctx, token)
            raise AssertionError("_wrong_token always raises")  # pragma: no cover
        name, scope = found
        request["token"] = name
        if not allows(scope, needed):
            raise ApiError(
                403,
                "forbidden",
                f"token {name!r} has scope {scope}; {request.method} {request.path} needs {needed}",
            )
    length = request.content_length
    if length is not None and length > ctx.max_body_bytes:
        raise ApiError(413, "too_large", f"the body is over {ctx.max_body_bytes} octets")
    return await handler(request)


async def _wrong_token(request: web.Request, ctx: HttpContext, token: str) -> None:
    """Count a wrong token against the client address, wait the tarpit's delay, and raise
    401 (or 429 during a lockout of the address)."""
    worker, auth = ctx.worker, ctx.config.auth
    ip = request.remote or ""
    # Each guess its own "user": the per-user limit must not let anyone lock every client
    # of the API out; the address's count is what stops a guesser.
    user = "http-token:" + token[:128]
    throttle = worker.auth_throttle
    try:
        verdict = await worker.loop.run_in_executor(None, throttle.attempt, ip, user, lambda: False)
    except Exception as exc:  # the check failed, not the client: refuse, uncounted
        log.error("http %s: token failure accounting failed: %s", ip, exc)
        verdict = None
    if verdict is not None and verdict.lockout is not None:
        m.auth_locked_attempts.inc()
        log_locked_out(log, f"http {ip}", "bearer token", "-", verdict.lockout)
        await asyncio.sleep(auth.failure_delay)
        retry = max(1, math.ceil(verdict.lockout.until - time.time()))
        raise _Refused(
            429,
            "too_many_failures",
            f"too many failed authentications from {ip}; try again in {retry} seconds",
            {"Retry-After": str(retry)},
        )
    m.http_auth_failures.inc()
    log.warning("http %s: %s %s with a wrong bearer token", ip, request.method, request.path)
    await asyncio.sleep(tarpit_delay(verdict, auth, ip, "-", log))
    raise _Refused(
        401,
        "unauthorized",
        "the bearer token is not valid",
        {"WWW-Authenticate": 'Bearer realm="tachymail", error="invalid_token"'},
    )
