"""RFC 9457 problem documents for every error the API returns, and the request-size limit.

Each error body is ``application/problem+json`` with ``type``, ``title``, ``status``, ``detail``,
a stable ``code`` and, for bulk requests, the per-line ``errors``. Unexpected exceptions become a
500 with no internals in the body (they are logged). The size limit is enforced while the body is
streamed, so a lying or absent Content-Length cannot get past it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fleettrust.errors import FleetTrustError, RateLimitedError

log = logging.getLogger("fleettrust.api")
PROBLEM = "application/problem+json"


def problem(status: int, code: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": f"urn:fleettrust:problem:{code}", "title": code.replace("_", " "),
            "status": status, "detail": detail, "code": code, **extra}
    headers = {}
    if status == 429 and "retry_after" in extra:
        headers["Retry-After"] = str(extra["retry_after"])
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="fleettrust"'
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FleetTrustError)
    async def _fleettrust(_: Request, exc: FleetTrustError) -> JSONResponse:
        extra = {k: v for k, v in exc.details.items() if k in ("errors", "retry_after")}
        if isinstance(exc, RateLimitedError):
            extra.setdefault("retry_after", 60)
        return problem(exc.status, exc.code, exc.message, **extra)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"location": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg", "")}
            for e in exc.errors()[:50]
        ]
        return problem(422, "invalid_request", "request body or parameters are invalid",
                       errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
            exc.status_code, "http_error")
        return problem(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem(500, "internal_error", "internal error; see the server log")


class BodyLimitMiddleware:
    """Refuse request bodies above a limit (413) — checked on Content-Length and while reading."""

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
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_413(send, "Content-Length is not a number", 400, "bad_length")
                    return
                if declared > limit:
                    await _send_413(send, f"request body exceeds {limit} bytes")
                    return
        received = 0
        too_large = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    raise _BodyTooLargeError
            return message

        response_started = False

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLargeError:
            if not response_started:
                await _send_413(send, f"request body exceeds {limit} bytes")
        except Exception:
            if too_large and not response_started:
                await _send_413(send, f"request body exceeds {limit} bytes")
            else:
                raise


class _BodyTooLargeError(Exception):
    pass


async def _send_413(send: Send, detail: str, status: int = 413,
                    code: str = "request_too_large") -> None:
    resp = problem(status, code, detail)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", PROBLEM.encode()),
                            (b"content-length", str(len(resp.body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": resp.body})


AsyncHandler = Callable[..., Awaitable[Any]]
