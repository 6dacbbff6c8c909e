"""The OpenAPI 3.1 document of the HTTP API (``GET /api/v1/openapi.json``), assembled from
the fragments of the handler modules, and helpers those modules build their fragments with.

The assembly adds what every route shares, so a fragment only describes its own routes:
the bearer security requirement with the scope the route needs (``security: [{"bearer":
["admin"]}]``, and ``x-tachymail-scope``), the 401, 403 and 429 the auth middleware may
answer, and for a route with a JSON body the 400, 413, 415 and 422 of
:func:`tachymail.http.errors.read_json`. Each of those refers to the ``Error`` schema.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from tachymail import __version__

#: the document's own path (no token needed)
OPENAPI_PATH = "/api/v1/openapi.json"
#: the one route of scope inject; every other /api/v1/ route needs admin
INJECT_ROUTE = ("POST", "/api/v1/messages")
API_PREFIX = "/api/v1/"

_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

#: the body of every error (tachymail.http.errors.error_body)
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {
                    "type": "string",
                    "description": "machine-readable: unauthorized, forbidden, not_found, "
                    "method_not_allowed, bad_json, invalid_body, too_large, ...",
                },
                "message": {"type": "string", "description": "for a person"},
                "details": {"description": "more, such as the fields a body got wrong"},
            },
        }
    },
}

#: what each shared status means, for its description
STATUS_TEXT = {
    400: "Bad request: a parameter or the JSON body does not parse",
    401: "No bearer token, or not a current one (WWW-Authenticate: Bearer)",
    403: "The token's scope does not allow this route",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict with the current state",
    413: "The request body is over [http] max_body_bytes",
    415: "The body is not application/json",
    422: "The JSON body is not what the route takes (details name each field)",
    429: "Too many failed authentications from this address (Retry-After)",
    503: "The queue cannot take the change now (storage full or failing), try later",
}


def required_scope(method: str, path: str) -> str | None:
    """The token scope a request needs: None (no token: the OpenAPI document, anything
    outside /api/v1/), "inject" (POST /api/v1/messages) or "admin" (the rest)."""
    if not path.startswith(API_PREFIX) or path == OPENAPI_PATH:
        return None
    if (method.upper(), path) == INJECT_ROUTE:
        return "inject"
    return "admin"


def error_response(status: int, description: str = "") -> dict[str, Any]:
    """An OpenAPI response object for an error *status* with the Error body."""
    return {
        "description": description or STATUS_TEXT.get(status, "Error"),
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def json_content(schema_name: str, description: str) -> dict[str, Any]:
    """An OpenAPI response (or request body) object whose JSON body is *schema_name*."""
    return {
        "description": description,
        "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}
        },
    }


def model_schemas(*models: type[BaseModel]) -> dict[str, Any]:
    """``components.schemas`` entries for pydantic *models*, nested models hoisted beside
    them (references point at ``#/components/schemas/<Name>``)."""
    found: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        found.update(schema.pop("$defs", {}))
        found[model.__name__] = schema
    return found


def document(fragments: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The whole OpenAPI 3.1 document: *fragments* (each ``{"paths", "components":
    {"schemas"}}``) merged, with the shared security and error responses added."""
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {"Error": ERROR_SCHEMA}
    for fragment in fragments:
        for path, item in copy.deepcopy(fragment.get("paths", {})).items():
            paths.setdefault(path, {}).update(item)
        schemas.update(copy.deepcopy(fragment.get("components", {}).get("schemas", {})))
    paths[OPENAPI_PATH] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "responses": {
                "200": {
                    "description": "The OpenAPI 3.1 document of the API",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    }
    for path, item in paths.items():
        for method, operation in item.items():
            if method in _METHODS:
                _add_shared(method, path, operation)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tachymail HTTP API",
            "version": __version__,
            "description": "Injection, queue administration, suppression list and "
            "destinations of a Tachymail node. Authenticate with `Authorization: Bearer "
            "<token>` (`tachymail token add NAME --scope inject|admin|all`). Every error is "
            'a JSON body `{"error": {"code", "message", "details"?}}`. Listings page with '
            "`limit` (at most 1000) and `cursor` (the previous page's `next_cursor`).",
        },
        "servers": [{"url": "/"}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from `tachymail token add`; its scope (inject, "
                    "admin or all) is named in each operation's security requirement.",
                }
            },
        },
    }


def _add_shared(method: str, path: str, operation: dict[str, Any]) -> None:
    """Add to one *operation* the security and the responses every such route shares."""
    responses = operation.setdefault("responses", {})
    scope = required_scope(method, path)
    if scope is None:
        operation["security"] = []
    else:
        operation["security"] = [{"bearer": [scope]}]
        operation["x-tachymail-scope"] = scope
        for status in (401, 403, 429):
            responses.setdefault(str(status), error_response(status))
        # A declared Content-Length over the limit is refused before any handler runs.
        responses.setdefault("413", error_response(413))
    if "requestBody" in operation:
        for status in (400, 413, 415, 422):
            responses.setdefault(str(status), error_response(status))
