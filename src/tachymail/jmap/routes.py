"""The JMAP endpoints on the ``http`` listener (RFC 8620 §2, §3, §6, §7.3).

- ``GET /.well-known/jmap`` (and ``/jmap/session``): the session object.
- ``POST /jmap/api``: the API (method calls).
- ``POST /jmap/upload/{accountId}``, ``GET /jmap/download/{accountId}/{blobId}/{name}``.
- ``GET /jmap/eventsource``: push (StateChange events), woken by the store's change
  notification (``tachymail.mailbox.notify``) in whatever process the change was made.
- ``POST /jmap/login``: a per-user bearer token for the web page.

Authentication (every route but login): ``Authorization: Basic`` with a virtual user's
password (only over TLS or from ``policy.trusted_networks``; a success is remembered for
:data:`BASIC_CACHE_SECONDS` so that each request does not pay for scrypt again), or
``Authorization: Bearer <token>`` with a token from ``/jmap/login``. EventSource and
download cannot send headers from a browser: they also take ``?access_token=<token>``.
Tokens are signed (HMAC-SHA256 with a per-node secret in ``data_dir/jmap/secret``) over
the user, the expiry and the user's password hash: a password change revokes them; they
expire after ``[jmap] token_lifetime`` seconds. A failure is 401 with an RFC 7807 body,
after the AUTH throttle's delay (the one IMAP and SMTP AUTH use; lockouts are shared).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from tachymail.frontend import is_trusted, log_locked_out, tarpit_delay
from tachymail.http.server import HTTP
from tachymail.jmap import mail, submission
from tachymail.jmap.account import Account, JmapContext, account_id
from tachymail.jmap.core import (
    CAPABILITIES,
    CORE,
    MAIL,
    SUBMISSION,
    VACATION,
    Call,
    Limits,
    Method,
    RequestError,
    check_request,
    run_calls,
)
from tachymail.jmap.view import email_state, mailbox_state
from tachymail.mailbox import create_user
from tachymail.mailbox.submissions import submission_state
from tachymail.metrics import m

log = logging.getLogger(__name__)

API_URL = "/jmap/api"
UPLOAD_URL = "/jmap/upload/{accountId}"
DOWNLOAD_URL = "/jmap/download/{accountId}/{blobId}/{name}?type={type}"
EVENTSOURCE_URL = "/jmap/eventsource?types={types}&closeafter={closeafter}&ping={ping}"
#: seconds a successful Basic login is remembered (per process, by a hash of the pair)
BASIC_CACHE_SECONDS = 300.0
JMAP = web.AppKey("tachymail_jmap", JmapContext)

MethodTable = dict[str, tuple[str, Callable[[Account, Call], Awaitable[dict[str, Any]]]]]

METHODS: MethodTable = {
    "Core/echo": (CORE, lambda account, call: _echo(call)),
    "Mailbox/get": (MAIL, mail.mailbox_get),
    "Mailbox/changes": (MAIL, mail.mailbox_changes),
    "Mailbox/query": (MAIL, mail.mailbox_query),
    "Mailbox/set": (MAIL, mail.mailbox_set),
    "Email/get": (MAIL, mail.email_get),
    "Email/query": (MAIL, mail.email_query),
    "Email/queryChanges": (MAIL, mail.email_query_changes),
    "Email/changes": (MAIL, mail.email_changes),
    "Email/set": (MAIL, mail.email_set),
    "Email/import": (MAIL, mail.email_import),
    "Email/parse": (MAIL, mail.email_parse),
    "Thread/get": (MAIL, mail.thread_get),
    "Thread/changes": (MAIL, mail.email_changes),
    "SearchSnippet/get": (MAIL, mail.search_snippet_get),
    "Identity/get": (SUBMISSION, submission.identity_get),
    "EmailSubmission/get": (SUBMISSION, submission.submission_get),
    "EmailSubmission/changes": (SUBMISSION, submission.submission_changes),
    "EmailSubmission/query": (SUBMISSION, submission.submission_query),
    "EmailSubmission/queryChanges": (SUBMISSION, submission.submission_query_changes),
    "EmailSubmission/set": (SUBMISSION, submission.submission_set),
    "VacationResponse/get": (VACATION, submission.vacation_get),
    "VacationResponse/set": (VACATION, submission.vacation_set),
}


async def _echo(call: Call) -> dict[str, Any]:
    return call.args


class Unauthorized(Exception):
    pass


def problem(status: int, kind: str, detail: str, **extra: Any) -> web.Response:
    """An RFC 7807 problem response (``application/problem+json``)."""
    body = {"type": kind, "status": status, "detail": detail, **extra}
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/problem+json"
    )


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


# --- authentication -----------------------------------------------------------------------


class Authenticator:
    """Basic and Bearer checks of one process (see the module docstring)."""

    def __init__(self, jmap: JmapContext) -> None:
        self.jmap = jmap
        self.worker = jmap.worker
        self.lifetime = jmap.worker.config.jmap.token_lifetime
        self._secret: bytes | None = None
        self._basic: dict[bytes, tuple[str, float]] = {}
        self._trusted: dict[str, bool] = {}
        self._trusted_for: object = None

    def secret(self) -> bytes:
        """The node's token key, made on first use (every worker reads the same file)."""
        if self._secret is None:
            path = self.jmap.directory / "secret"
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "wb") as out:
                    out.write(secrets.token_bytes(32).hex().encode())
            for _ in range(50):  # another worker may be writing it this instant
                data = path.read_bytes().strip()
                if len(data) == 64:
                    self._secret = bytes.fromhex(data.decode())
                    break
                time.sleep(0.01)
            else:
                raise RuntimeError(f"{path}: not a token key")
        return self._secret

    def _sign(self, user: str, expiry: int) -> str:
        encoded = self.worker.users.users().get(user, "")
        message = f"{user}\0{expiry}\0{encoded}".encode()
        return hmac.new(self.secret(), message, hashlib.sha256).hexdigest()[:43]

    def token(self, user: str) -> str:
        expiry = int(time.time() + self.lifetime)
        name = base64.urlsafe_b64encode(user.encode()).decode().rstrip("=")
        return f"{name}.{expiry:x}.{self._sign(user, expiry)}"

    def check_token(self, token: str) -> str | None:
        """The user a token is valid for, or None."""
        try:
            name, expiry_hex, signature = token.split(".")
            user = base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
            expiry = int(expiry_hex, 16)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return None
        if expiry < time.time() or user not in self.worker.users.users():
            return None
        if not hmac.compare_digest(signature, self._sign(user, expiry)):
            return None
        return user

    def may_use_password(self, request: web.Request) -> bool:
        """Passwords only over TLS or from a trusted client."""
        if request.secure:
            return True
        # parsing the address costs more than the rest of a cached Basic login: remember
        # the answer per address (for the networks it was given for)
        remote, networks = request.remote or "", self.worker.trusted
        if networks is not self._trusted_for:
            self._trusted.clear()
            self._trusted_for = networks
        known = self._trusted.get(remote)
        if known is None:
            if len(self._trusted) >= 4096:
                self._trusted.clear()
            known = self._trusted[remote] = is_trusted(remote, networks)
        return known

    async def password(self, request: web.Request, name: str, password: str) -> str | None:
        """The user when *password* is right (through the shared AUTH throttle), else None
        after the tarpit's delay; a locked-out address gets None at once plus the delay."""
        user = name.strip().lower()
        # the stored hash is part of the key: a password change ends the remembered login
        encoded = self.worker.users.users().get(user, "")
        key = hashlib.sha256(f"{user}\0{password}\0{encoded}".encode()).digest()
        cached = self._basic.get(key)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        worker, ip = self.worker, request.remote or ""
        _, at, domain = user.rpartition("@")
        local = bool(at) and domain in worker.local_domains
        users, store = worker.users, worker.mailbox

        def work() -> Any:
            return worker.auth_throttle.attempt(
                ip, user, lambda: users.check(user, password) and local
            )

        try:
            verdict = await worker.loop.run_in_executor(None, work)
        except Exception as exc:  # the check failed, not the client
            log.error("jmap %s: password check failed: %s", ip, exc)
            return None
        auth = worker.config.auth
        if verdict.ok:
            if len(self._basic) > 10_000:
                self._basic.clear()
            self._basic[key] = (user, time.monotonic() + BASIC_CACHE_SECONDS)
            if store.mailbox(user, "INBOX") is None:  # the first login makes the mailboxes
                await worker.mailbox_committer.submit_operation(create_user(user))
            return user
        shown = user[:100]
        if verdict.lockout is not None:
            m.auth_locked_attempts.inc()
            log_locked_out(log, f"jmap {ip}", "login", shown, verdict.lockout)
            await asyncio.sleep(auth.failure_delay)
            return None
        log.warning("jmap %s: login failed for %r", ip, shown)
        await asyncio.sleep(tarpit_delay(verdict, auth, ip, shown, log))
        return None

    async def user(self, request: web.Request) -> str:
        """The authenticated user of *request*; raises Unauthorized."""
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        value = value.strip()
        if not header and "access_token" in request.query:
            scheme, value = "bearer", request.query["access_token"]
        if scheme.lower() == "bearer" and value:
            user = self.check_token(value)
            if user is not None:
                return user
            await asyncio.sleep(self.worker.config.auth.failure_delay)
            raise Unauthorized("the token is not valid")
        if scheme.lower() == "basic" and value:
            if not self.may_use_password(request):
                raise Unauthorized("passwords only over TLS or from trusted networks")
            try:
                name, colon, password = (
                    base64.b64decode(value, validate=True).decode().partition(":")
                )
            except (binascii.Error, ValueError, UnicodeDecodeError):
                raise Unauthorized("malformed Basic credentials") from None
            if colon:
                user = await self.password(request, name, password)
                if user is not None:
                    return user
            raise Unauthorized("wrong user name or password")
        raise Unauthorized("credentials are needed")


AUTH = web.AppKey("tachymail_jmap_auth", Authenticator)


def _unauthorized(detail: str) -> web.Response:
    response = problem(401, "about:blank", detail, title="Unauthorized")
    response.headers["WWW-Authenticate"] = 'Basic realm="tachymail", charset="UTF-8"'
    return response


async def _authenticated(request: web.Request) -> Account | web.Response:
    try:
        user = await request.app[AUTH].user(request)
    except Unauthorized as exc:
        return _unauthorized(str(exc))
    account = Account(request.app[JMAP], user)
    account.client_ip = request.remote or ""
    return account


# --- the session, the API ----------------------------------------------------------------


def session_object(account: Account, limits: Limits, origin: str = "") -> dict[str, Any]:
    """The RFC 8620 §2 session object; the URLs are absolute under *origin* (the scheme
    and host the client used: clients such as jmapc do not resolve relative ones)."""
    return _session_body(account, limits, origin) | {"state": session_state(account, limits)}


def session_state(account: Account, limits: Limits) -> str:
    """The session object's ``state`` (and every API response's ``sessionState``): a
    digest of the rest of the object, its URLs taken relative. RFC 8620 §2: it changes
    when the object does, not with the user's mail (clients such as jmapc fetch the
    session again whenever it changes). Kept per process and user: the object depends
    only on the user and the settings, fixed for the process's life."""
    states = account.jmap.session_states
    found = states.get(account.user)
    if found is None:
        body = orjson.dumps(_session_body(account, limits, ""), option=orjson.OPT_SORT_KEYS)
        found = hashlib.blake2b(body, digest_size=8).hexdigest()
        if len(states) >= 10_000:
            states.clear()
        states[account.user] = found
    return found


def _session_body(account: Account, limits: Limits, origin: str) -> dict[str, Any]:
    capabilities = {
        CORE: limits.capability(),
        MAIL: {},
        SUBMISSION: {},
        VACATION: {},
    }
    return {
        "capabilities": capabilities,
        "accounts": {
            account.id: {
                "name": account.user,
                "isPersonal": True,
                "isReadOnly": False,
                "accountCapabilities": {
                    MAIL: {
                        "maxMailboxesPerEmail": None,
                        "maxMailboxDepth": None,
                        "maxSizeMailboxName": 255,
                        "maxSizeAttachmentsPerEmail": account.worker.config.limits.max_message_size,
                        "emailQuerySortOptions": sorted(mail._SORTS),
                        "mayCreateTopLevelMailbox": True,
                    },
                    SUBMISSION: {"maxDelayedSend": 0, "submissionExtensions": {}},
                    VACATION: {},
                },
            }
        },
        "primaryAccounts": {capability: account.id for capability in CAPABILITIES[1:]}
        | {CORE: account.id},
        "username": account.user,
        "apiUrl": origin + API_URL,
        "downloadUrl": origin + DOWNLOAD_URL,
        "uploadUrl": origin + UPLOAD_URL,
        "eventSourceUrl": origin + EVENTSOURCE_URL,
    }


async def serve_session(request: web.Request) -> web.StreamResponse:
    account = await _authenticated(request)
    if isinstance(account, web.Response):
        return account
    origin = f"{'https' if request.secure else 'http'}://{request.host}"
    return _json(session_object(account, request.app[JMAP].limits, origin))


async def _read_limited(request: web.Request, limit: int) -> bytes | None:
    """The body, or None when it is over *limit* octets (declared or streamed)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


class _Slot:
    """One of the user's maxConcurrentRequests (or uploads), per process."""

    def __init__(self, table: dict[str, int], user: str, limit: int) -> None:
        self.table, self.user, self.limit = table, user, limit
        self.entered = False

    def __enter__(self) -> bool:
        """Whether the slot was taken (False: the user is at the limit)."""
        if self.table.get(self.user, 0) >= self.limit:
            return False
        self.table[self.user] = self.table.get(self.user, 0) + 1
        self.entered = True
        return True

    def __exit__(self, *exc: object) -> None:
        if not self.entered:
            return  # refused: it holds nothing to give back
        self.entered = False
        left = self.table.get(self.user, 1) - 1
        if left > 0:
            self.table[self.user] = left
        else:
            self.table.pop(self.user, None)


async def serve_api(request: web.Request) -> web.StreamResponse:
    account = await _authenticated(request)
    if isinstance(account, web.Response):
        return account
    jmap = request.app[JMAP]
    limits = jmap.limits
    try:
        with _Slot(jmap.running, account.user, limits.max_concurrent_requests) as entered:
            if not entered:
                raise RequestError(
                    "limit", "too many concurrent requests", limit="maxConcurrentRequests"
                )
            body = await _read_limited(request, limits.max_size_request)
            if body is None:
                raise RequestError(
                    "limit",
                    f"the request is over {limits.max_size_request} octets",
                    limit="maxSizeRequest",
                )
            try:
                data = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise RequestError("notJSON", f"the body is not JSON: {exc}") from None
            using, calls, created = check_request(data, limits)
            # only the methods the request calls are bound (a closure each)
            methods: dict[str, tuple[str, Method]] = {
                name: (METHODS[name][0], _bind(METHODS[name][1], account))
                for name in {call[0] for call in calls}
                if name in METHODS
            }
            responses = await run_calls(calls, using, methods, created)
    except RequestError as exc:
        log.info("jmap %s %s: %s", request.remote, account.user, exc.detail)
        return web.Response(
            body=orjson.dumps(exc.problem()),
            status=exc.status,
            content_type="application/problem+json",
        )
    result: dict[str, Any] = {
        "methodResponses": responses,
        "sessionState": session_state(account, jmap.limits),
    }
    if "createdIds" in data:
        result["createdIds"] = created
    return _json(result)


def _bind(
    handler: Callable[[Account, Call], Awaitable[dict[str, Any]]], account: Account
) -> Method:
    async def bound(call: Call) -> dict[str, Any]:
        return await handler(account, call)

    return bound


# --- blobs --------------------------------------------------------------------------------


async def serve_upload(request: web.Request) -> web.StreamResponse:
    account = await _authenticated(request)
    if isinstance(account, web.Response):
        return account
    if request.match_info["accountId"] != account.id:
        return problem(404, "about:blank", "no such account")
    jmap = request.app[JMAP]
    limits = jmap.limits
    with _Slot(jmap.uploads, account.user, limits.max_concurrent_upload) as entered:
        if not entered:
            return problem(
                429,
                "urn:ietf:params:jmap:error:limit",
                "too many concurrent uploads",
                limit="maxConcurrentUpload",
            )
        data = await _read_limited(request, limits.max_size_upload)
        if data is None:
            return problem(
                413,
                "urn:ietf:params:jmap:error:limit",
                f"the upload is over {limits.max_size_upload} octets",
                limit="maxSizeUpload",
            )
        blob_id = await account.save_blob(data)
    return _json(
        {
            "accountId": account.id,
            "blobId": blob_id,
            "type": request.headers.get("Content-Type", "application/octet-stream"),
            "size": len(data),
        },
        201,
    )


_SAFE_TYPE = set("abcdefghijklmnopqrstuvwxyz0123456789-+./")


async def serve_download(request: web.Request) -> web.StreamResponse:
    account = await _authenticated(request)
    if isinstance(account, web.Response):
        return account
    if request.match_info["accountId"] != account.id:
        return problem(404, "about:blank", "no such account")
    blob_id = request.match_info["blobId"]
    account.snapshot()  # taken here, on the loop: the snapshot cache is not thread-safe
    data = await asyncio.get_running_loop().run_in_executor(None, account.read_blob, blob_id)
    if data is None:
        return problem(404, "about:blank", "no such blob")
    kind = request.query.get("type", "application/octet-stream").lower()
    if not kind or not set(kind) <= _SAFE_TYPE or "/" not in kind:
        kind = "application/octet-stream"
    name = request.match_info["name"].replace('"', "").replace("\\", "")
    disposition = "inline" if request.query.get("disposition") == "inline" else "attachment"
    return web.Response(
        body=data,
        content_type=kind,
        headers={
            "Content-Disposition": f"{disposition}; filename*=UTF-8''" + _quote(name or "download"),
            "X-Content-Type-Options": "nosniff",
            # a downloaded HTML attachment must not run in the page's origin
            "Content-Security-Policy": "sandbox; default-src 'none'",
            "Cache-Control": "private, immutable, max-age=604800",
        },
    )


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


# --- login --------------------------------------------------------------------------------


async def serve_login(request: web.Request) -> web.StreamResponse:
    auth = request.app[AUTH]
    body = await _read_limited(request, 8192)
    if body is None:
        return problem(413, "about:blank", "the login form is too large")
    fields: dict[str, Any] = {}
    if request.content_type == "application/json":
        with contextlib.suppress(orjson.JSONDecodeError):
            loaded = orjson.loads(body)
            fields = loaded if isinstance(loaded, dict) else {}
    else:
        from urllib.parse import parse_qs

        fields = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
    name, password = fields.get("username"), fields.get("password")
    if not isinstance(name, str) or not isinstance(password, str) or not name:
        return problem(400, "about:blank", "username and password are needed")
    if not auth.may_use_password(request):
        return _unauthorized("passwords only over TLS or from trusted networks")
    user = await auth.password(request, name, password)
    if user is None:
        return _unauthorized("wrong user name or password")
    return _json({"token": auth.token(user), "accountId": account_id(user), "username": user})


# --- push ---------------------------------------------------------------------------------

_PUSH_TYPES = ("Email", "Mailbox", "Thread", "EmailDelivery", "EmailSubmission")
#: seconds between looks at whether a quiet push client (ping=0) is still connected
_CHECK_GONE = 5.0


async def serve_eventsource(request: web.Request) -> web.StreamResponse:
    account = await _authenticated(request)
    if isinstance(account, web.Response):
        return account
    wanted_raw = request.query.get("types", "*")
    wanted = set(_PUSH_TYPES) if wanted_raw in ("*", "") else set(wanted_raw.split(","))
    close_after = request.query.get("closeafter", "no") == "state"
    try:
        ping = max(0, min(3600, int(request.query.get("ping", "0"))))
    except ValueError:
        ping = 0
    worker = account.worker
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    woken = asyncio.Event()
    jmap = request.app[JMAP]
    jmap.streams.add(woken)
    unsubscribe = worker.mailbox_notifier.subscribe(account.user, woken.set)
    sent: dict[str, str] = {}
    first = True
    try:
        while True:
            infos = account.store.mailboxes(account.user)
            states = {
                "Email": email_state(infos),
                "Thread": email_state(infos),
                "Mailbox": mailbox_state(infos),
                # moves by the user raise uidnext too: a hint, as RFC 8621 §1.5 allows
                "EmailDelivery": f"{sum(i.uidnext for i in infos):x}",
                # the state EmailSubmission/get shows (its records' change counter)
                "EmailSubmission": str(submission_state(account.store, account.user).last),
            }
            changed = {
                kind: state
                for kind, state in states.items()
                if kind in wanted and sent.get(kind) != state
            }
            # closeafter=state: the first event is a change after the connection, not the
            # state at connection (that one would close the long poll at once)
            if changed and not (first and close_after):
                event = {"@type": "StateChange", "changed": {account.id: changed}}
                await response.write(b"event: state\ndata: " + orjson.dumps(event) + b"\n\n")
                if close_after:
                    break
            sent.update(states)
            first = False
            woken.clear()
            if jmap.closing:
                break
            try:
                await asyncio.wait_for(woken.wait(), timeout=ping or _CHECK_GONE)
                if jmap.closing:
                    break  # the worker stops: end the stream, the client reconnects
            except TimeoutError:
                transport = request.transport
                if transport is None or transport.is_closing():
                    break  # the client left (aiohttp does not cancel the handler for it)
                if ping:
                    data = orjson.dumps({"interval": ping})
                    await response.write(b"event: ping\ndata: " + data + b"\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        unsubscribe()
        jmap.streams.discard(woken)
    return response


# --- the application ----------------------------------------------------------------------


async def _end_streams(app: web.Application) -> None:
    """At shutdown: wake every push stream so that it ends now (aiohttp would otherwise wait
    for them until its shutdown timeout, the worker's whole drain time)."""
    jmap = app[JMAP]
    jmap.closing = True
    for woken in list(jmap.streams):
        woken.set()


def setup(app: web.Application) -> None:
    """Add the JMAP routes (and the webmail page's, when it is there) to *app*."""
    worker = app[HTTP].worker
    settings = worker.config.jmap
    limits = Limits(
        max_size_upload=settings.max_size_upload,
        max_size_request=settings.max_size_request,
        max_concurrent_requests=settings.max_concurrent_requests,
        max_calls_in_request=settings.max_calls_in_request,
        max_objects_in_get=settings.max_objects_in_get,
        max_objects_in_set=settings.max_objects_in_set,
    )
    jmap = JmapContext(worker, limits)
    app[JMAP] = jmap
    app[AUTH] = Authenticator(jmap)
    app.router.add_get("/.well-known/jmap", serve_session)
    app.router.add_get("/jmap/session", serve_session)
    app.router.add_post(API_URL, serve_api)
    app.router.add_post("/jmap/upload/{accountId}", serve_upload)
    app.router.add_get("/jmap/download/{accountId}/{blobId}/{name}", serve_download)
    app.router.add_get("/jmap/eventsource", serve_eventsource)
    app.router.add_post("/jmap/login", serve_login)
    app.on_shutdown.append(_end_streams)
    try:
        from tachymail.jmap import webmail
    except ModuleNotFoundError as exc:
        if exc.name != "tachymail.jmap.webmail":
            raise
    else:
        webmail.setup(app)
