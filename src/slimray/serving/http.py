"""Request plumbing every protocol shares: JSON errors, the API key, the streaming body limit, JSON answers.

Every error is JSON ``{"error": message}`` with a 4xx/5xx status: ``RequestError`` carries one out of a route,
``install_error_handlers`` turns FastAPI's own 404/405/422 and unexpected exceptions into the same shape.
``api_key_denied`` checks ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` in constant time; ``read_api_key``
reads the key inside the replica, from its own environment or a file (it is never passed through Ray).
``read_body`` counts bytes as they arrive and stops at the limit with a 413 (a chunked body is never read whole);
``json_response`` writes NaN/Inf as ``null`` so every answer is valid JSON. ``AllowOptions`` answers ``OPTIONS``
with the ``Allow`` header of the route the path matches (the methods it really takes).
"""

from __future__ import annotations

import hmac
import json
import math
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from slimray.codec import RequestError


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN/Inf float (at any depth of lists and dicts) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    return value


def json_bytes(payload: Any) -> bytes:
    """Compact JSON; non-finite floats become ``null`` (plain ``json.dumps`` would write invalid ``NaN``)."""
    try:
        return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        return json.dumps(finite_or_none(payload), separators=(",", ":"), allow_nan=False).encode()


def json_response(payload: Any, *, headers: dict[str, str] | None = None) -> Response:
    """Compact JSON without response-model validation (the route builds the payload)."""
    return Response(json_bytes(payload), media_type="application/json", headers=headers)


def validation_message(err: ValidationError | RequestValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors())


def read_api_key(*, env: str, file: str | None) -> str | None:
    """The API key as this process sees it: the file ``file`` (e.g. a mounted Kubernetes Secret) when given,
    else the environment variable ``env``; None when neither holds one. Raises if ``file`` is unreadable or
    empty, so a missing Secret never leaves the endpoint open."""
    if file:
        try:
            key = Path(file).read_text().strip()
        except OSError as err:
            raise RuntimeError(f"api_key_file {file!r} is not readable: {err.strerror}") from None
        if not key:
            raise RuntimeError(f"api_key_file {file!r} is empty")
        return key
    return os.environ.get(env) or None


def api_key_denied(request: Request, api_key: str | None) -> JSONResponse | None:
    """None when no key is configured or the request carries it; else the 401 answer."""
    if api_key is None:
        return None
    given = request.headers.get("x-api-key") or ""
    auth = request.headers.get("authorization") or ""
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if hmac.compare_digest(given.encode(), api_key.encode()):
        return None
    return error_response(401, "missing or wrong API key", {"WWW-Authenticate": "Bearer"})


async def read_body(request: Request, *, limit: int) -> bytes:
    """The request body, read chunk by chunk: ``RequestError`` 413 as soon as more than ``limit`` bytes are
    declared or have arrived (the rest is never read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes, *, hint: str) -> Any:
    """The parsed JSON ``body``; ``RequestError`` 400 when empty or not JSON."""
    if not body:
        raise RequestError(400, f"empty request body: send JSON {hint}")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise RequestError(400, f"request body is not valid JSON: {err}") from None


async def read_json_body(request: Request, *, limit: int, hint: str) -> Any:
    """``read_body`` then ``parse_json``."""
    return parse_json(await read_body(request, limit=limit), hint=hint)


def unknown_model(name: str, served: str) -> JSONResponse | None:
    """None when ``name`` is the served model; else the 404 answer (compared as a string only: a model name
    never reaches the filesystem)."""
    if name == served:
        return None
    return error_response(404, f"unknown model {name[:100]!r}; this endpoint serves {served!r}")


class AllowOptions:
    """Pure ASGI middleware: ``OPTIONS PATH`` gets 204 with ``Allow`` listing the methods PATH's routes take (plus
    OPTIONS), or the app's own 404 when no route matches. No CORS headers: cross-origin calls stay refused."""

    def __init__(self, app, api: FastAPI) -> None:
        self.app, self.api = app, api

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "OPTIONS":
            await self.app(scope, receive, send)
            return
        from starlette.routing import Match

        methods: set[str] = set()
        for route in self.api.router.routes:  # PARTIAL: the path matches, the method (OPTIONS) does not
            if getattr(route, "methods", None) and route.matches(scope)[0] is not Match.NONE:
                methods |= set(route.methods)
        if not methods:
            await self.app(scope, receive, send)  # the app's 404
            return
        allow = ", ".join(sorted(methods | {"OPTIONS"}))
        await send({"type": "http.response.start", "status": 204, "headers": [(b"allow", allow.encode())]})
        await send({"type": "http.response.body", "body": b""})


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, validation_message(exc))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(500, "internal error")


def install_error_handlers(api: FastAPI) -> None:
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(Exception, _unexpected_error)
