"""Request plumbing the Serve apps share (``slimray.serving.app`` and ``slimray.serving.embed``).

Every error is JSON ``{"error": message}`` with a 4xx/5xx status: ``RequestError`` carries one out of a route,
``install_error_handlers`` turns FastAPI's own 404/405/422 and unexpected exceptions into the same shape.
``api_key_denied`` checks ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` in constant time;
``read_json_body`` enforces the body-size limit before parsing.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException


class RequestError(Exception):
    """A bad request: ``status`` (4xx) and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def json_response(payload: Any) -> Response:
    """Compact JSON without response-model validation (the payload is built by the route; NaN already null)."""
    return Response(json.dumps(payload, separators=(",", ":")), media_type="application/json")


def validation_message(err: ValidationError | RequestValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors())


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


async def read_json_body(request: Request, *, limit: int, hint: str) -> Any:
    """The parsed JSON body; ``RequestError`` 413 over ``limit`` bytes (declared or actual), 400 empty or not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes exceeds the limit of {limit}")
    body = await request.body()
    if len(body) > limit:
        raise RequestError(413, f"request body of {len(body)} bytes exceeds the limit of {limit}")
    if not body:
        raise RequestError(400, f"empty request body: send JSON {hint}")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise RequestError(400, f"request body is not valid JSON: {err}") from None


def unknown_model(name: str, served: str) -> JSONResponse | None:
    """None when ``name`` is the served model; else the 404 answer (compared as a string only: a model name
    never reaches the filesystem)."""
    if name == served:
        return None
    return error_response(404, f"unknown model {name[:100]!r}; this endpoint serves {served!r}")


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
