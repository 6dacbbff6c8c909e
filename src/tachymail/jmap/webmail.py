"""The webmail page at ``/mail/``: the static files of ``tachymail/jmap/webmail/``.

:func:`setup` adds ``GET /mail/`` (``index.html``) and ``GET /mail/{file}`` to the http
listener's application. The page is a client of the JMAP API only (``POST /jmap/login``,
``/.well-known/jmap``, the API, upload, download and EventSource endpoints); it needs no
route of its own beyond these files.

What callers may rely on:

- only the regular files directly in the ``webmail`` folder are served, read once when the
  routes are added (a handful of small files); any other name (a sub-folder, a path with
  ``..``, a dot file, a file of a type not in :data:`CONTENT_TYPES`) is 404, and there is
  no directory listing. ``GET /mail`` redirects to ``/mail/``.
- every response carries the page's Content-Security-Policy (:data:`PAGE_CSP`) plus
  ``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer`` and
  ``Cache-Control: no-cache`` (a new release is picked up at the next load).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

__all__ = ["CONTENT_TYPES", "PAGE_CSP", "PREFIX", "setup", "static_files"]

#: where the page is served
PREFIX = "/mail/"

#: the page's own policy. Scripts, styles, frames and requests only from this origin; a
#: message's HTML is shown in a sandboxed srcdoc frame with a stricter policy of its own.
#: A srcdoc frame inherits this policy (both must allow a load), hence two additions: img-src
#: names http: and https:, or "show images" could never load a remote image (until the
#: reader allows them, the frame's own img-src data: still blocks every one), and style-src
#: allows inline styles, which nearly every HTML message uses (the page itself puts no
#: message content into its own DOM as markup, so this opens nothing there).
PAGE_CSP = (
    "default-src 'self'; frame-src 'self'; img-src 'self' data: https: http:; "
    "style-src 'self' 'unsafe-inline'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)

#: the types of the files the page is made of; a file of another type is not served
CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".txt": "text/plain",
}

#: the types served with "; charset=utf-8"
_TEXT_TYPES = {
    "text/html",
    "text/javascript",
    "text/css",
    "text/plain",
    "image/svg+xml",
    "application/json",
}

_HEADERS = {
    "Content-Security-Policy": PAGE_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def static_files(folder: Path | None = None) -> dict[str, tuple[bytes, str]]:
    """Name -> (content, content type) of every file the page serves from *folder* (the
    package's ``webmail`` folder by default): regular files directly in it, not dot files,
    of a type in :data:`CONTENT_TYPES`."""
    root = folder or Path(__file__).resolve().parent / "webmail"
    files: dict[str, tuple[bytes, str]] = {}
    for path in sorted(root.iterdir()):
        kind = CONTENT_TYPES.get(path.suffix.lower())
        if kind is None or path.name.startswith(".") or not path.is_file():
            continue
        if kind in _TEXT_TYPES:
            kind += "; charset=utf-8"
        files[path.name] = (path.read_bytes(), kind)
    return files


def setup(app: web.Application, folder: Path | None = None) -> None:
    """Add ``GET /mail``, ``GET /mail/`` and ``GET /mail/{file}`` to *app* (HEAD too)."""
    files = static_files(folder)
    if "index.html" not in files:
        raise FileNotFoundError("the webmail folder has no index.html")

    def respond(name: str) -> web.Response:
        found = files.get(name)
        if found is None:
            raise web.HTTPNotFound()
        body, kind = found
        response = web.Response(body=body, headers=_HEADERS)
        response.headers["Content-Type"] = kind
        return response

    async def index(request: web.Request) -> web.Response:
        return respond("index.html")

    async def static(request: web.Request) -> web.Response:
        # aiohttp's {file} never spans a "/": a name is looked up as it is, and anything
        # that is not one of the files read above ("..", "%2e%2e", a folder) is not found.
        return respond(request.match_info["file"])

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently(PREFIX)

    app.router.add_get(PREFIX.rstrip("/"), redirect)
    app.router.add_get(PREFIX, index)
    app.router.add_get(PREFIX + "{file}", static)
