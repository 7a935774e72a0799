"""RFC 9457 problem documents for every error the API returns, and the request guards.

Each error body is ``application/problem+json`` with ``type``, ``title``, ``status``, ``detail``,
a stable ``code`` and, for bulk requests, the per-line ``errors``. Unexpected exceptions become a
500 with no internals in the body (they are logged).

Two ASGI guards run before any route:

* :class:`BodyLimitMiddleware` refuses bodies above a limit with 413 ``request_too_large``. The
  limit is enforced on the declared Content-Length *and* while the body is streamed, so a lying
  or absent Content-Length (chunked transfer) cannot get past it.
* :class:`JsonBodyMiddleware` refuses a POST/PUT/PATCH to the API whose Content-Type is not JSON
  with 415 ``unsupported_media_type`` (every API body is JSON; this also keeps browsers from
  sending "simple" cross-site form posts).

Validation errors from FastAPI/pydantic are mapped to precise codes: ``malformed_json`` (400),
``unknown_field``, ``missing_field``, ``invalid_date``, ``value_too_long``,
``invalid_path_parameter``, ``invalid_query_parameter``, custom codes raised by the schemas
(``csr_too_large``) and ``invalid_request`` for the rest (422); ``detail`` names the first
offending location and ``errors`` lists them all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleettrust.errors import FleetTrustError, RateLimitedError

log = logging.getLogger("fleettrust.api")
PROBLEM = "application/problem+json"

#: Extra members of a FleetTrustError's details that are safe and useful in the problem body.
_PUBLIC_DETAILS = ("errors", "retry_after", "field")
#: Error types raised by our own pydantic validators; the type is the problem code.
CUSTOM_CODES = frozenset({"csr_too_large"})


def problem(status: int, code: str, detail: str, *, headers: dict[str, str] | None = None,
            **extra: Any) -> JSONResponse:
    body = {"type": f"urn:fleettrust:problem:{code}", "title": code.replace("_", " "),
            "status": status, "detail": detail, "code": code, **extra}
    hdrs = dict(headers or {})
    if status == 429 and "retry_after" in extra:
        hdrs["Retry-After"] = str(extra["retry_after"])
    if status == 401:
        hdrs["WWW-Authenticate"] = 'Bearer realm="fleettrust"'
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=hdrs)


def _location(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc)


def validation_problem(errors: Sequence[Any]) -> JSONResponse:
    """The problem document for a list of pydantic/FastAPI validation errors."""
    listed = [
        {"location": _location(e.get("loc", ())), "type": e.get("type", ""),
         "message": e.get("msg", "")}
        for e in errors[:50]
    ]
    if not errors:
        return problem(422, "invalid_request", "request is invalid", errors=listed)
    first = errors[0]
    kind = str(first.get("type", ""))
    loc = tuple(first.get("loc", ()))
    where = _location(loc)
    msg = str(first.get("msg", ""))
    if kind == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "JSON decode error")
        pos = loc[1] if len(loc) > 1 else "?"
        return problem(400, "malformed_json",
                       f"request body is not valid JSON: {reason} at character {pos}")
    if kind in CUSTOM_CODES:
        return problem(422, kind, f"{where}: {msg}", errors=listed)
    if kind == "extra_forbidden":
        return problem(422, "unknown_field", f"unknown field {where!r}", errors=listed)
    if kind == "missing":
        if loc == ("body",):
            return problem(422, "missing_body", "a JSON request body is required", errors=listed)
        return problem(422, "missing_field", f"missing required field {where!r}", errors=listed)
    if loc and loc[0] == "path":
        return problem(422, "invalid_path_parameter", f"{where}: {msg}", errors=listed)
    if loc and loc[0] == "query":
        return problem(422, "invalid_query_parameter", f"{where}: {msg}", errors=listed)
    if kind.startswith(("date", "datetime")):
        return problem(422, "invalid_date", f"{where}: {msg}", errors=listed)
    if kind == "string_too_long":
        return problem(422, "value_too_long", f"{where}: {msg}", errors=listed)
    return problem(422, "invalid_request", f"{where}: {msg}", errors=listed)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FleetTrustError)
    async def _fleettrust(request: Request, exc: FleetTrustError) -> JSONResponse:
        if exc.status >= 500:
            log.error("%s on %s %s: %s", exc.code, request.method, request.url.path,
                      exc.message)
            return problem(exc.status, exc.code, "server-side failure; see the server log")
        extra = {k: v for k, v in exc.details.items() if k in _PUBLIC_DETAILS}
        if isinstance(exc, RateLimitedError):
            extra.setdefault("retry_after", 60)
        return problem(exc.status, exc.code, exc.message, **extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_problem(list(exc.errors()))

    @app.exception_handler(IntegrityError)
    async def _integrity(request: Request, exc: IntegrityError) -> JSONResponse:
        # Services check uniqueness first; this is a concurrent request winning the race.
        log.warning("integrity error on %s %s: %s", request.method, request.url.path,
                    exc.orig)
        return problem(409, "concurrent_conflict",
                       "the request conflicts with a concurrent change; retry it")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:
            return problem(404, "no_such_route", f"no route {request.url.path}")
        if status == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            return problem(405, "method_not_allowed",
                           f"{request.method} is not allowed on {request.url.path}"
                           + (f" (allowed: {allowed})" if allowed else ""),
                           headers={"Allow": allowed} if allowed else None)
        if status == 413:
            return problem(413, "request_too_large", str(exc.detail))
        if status == 400:  # FastAPI could not read/parse the body (e.g. nesting too deep)
            return problem(400, "malformed_body", f"request body could not be read: {exc.detail}")
        return problem(status, "http_error", str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "internal_error", "internal error; see the server log")


async def _send_problem(send: Send, status: int, code: str, detail: str) -> None:
    resp = problem(status, code, detail)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", PROBLEM.encode()),
                            (b"content-length", str(len(resp.body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": resp.body})


class _BodyTooLargeError(Exception):
    pass


class BodyLimitMiddleware:
    """Refuse request bodies above a limit (413) — checked on Content-Length and while reading.

    When the streamed body crosses the limit, reading it raises inside the application; whatever
    the application then answers (FastAPI turns body-read errors into a 400) is replaced by the
    413, so the client always learns the real reason.
    """

    def __init__(self, app: ASGIApp, *, default_limit: int,
                 limit_for: Callable[[str], int | None] | None = None) -> None:
        self.app = app
        self.default_limit = default_limit
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = (self.limit_for(scope["path"]) if self.limit_for else None) or self.default_limit
        too_large_detail = f"request body exceeds the limit of {limit} bytes"
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0:
                    await _send_problem(send, 400, "bad_content_length",
                                        "Content-Length is not a non-negative number")
                    return
                if declared > limit:
                    await _send_problem(send, 413, "request_too_large",
                                        f"{too_large_detail} (Content-Length: {declared})")
                    return
        received = 0
        too_large = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            if too_large:
                raise _BodyTooLargeError
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    raise _BodyTooLargeError
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if too_large:
                # The app answered after the limit tripped: answer 413 instead, once.
                if message["type"] == "http.response.start" and not response_started:
                    response_started = True
                    await _send_problem(send, 413, "request_too_large", too_large_detail)
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not too_large:
                raise
        if too_large and not response_started:
            await _send_problem(send, 413, "request_too_large", too_large_detail)


JSON_METHODS = frozenset({"POST", "PUT", "PATCH"})


def is_json_media_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


class JsonBodyMiddleware:
    """Refuse (415) a body-carrying request under ``prefix`` whose Content-Type is not JSON."""

    def __init__(self, app: ASGIApp, *, prefix: str = "/v1/") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope.get("method") in JSON_METHODS
                and str(scope.get("path", "")).startswith(self.prefix)):
            content_type = ""
            for name, value in scope.get("headers", []):
                if name == b"content-type":
                    content_type = value.decode("latin-1")
                    break
            if not is_json_media_type(content_type):
                shown = content_type[:100] if content_type else "none"
                await _send_problem(
                    send, 415, "unsupported_media_type",
                    f"request body must be application/json (Content-Type was {shown})")
                return
        await self.app(scope, receive, send)
