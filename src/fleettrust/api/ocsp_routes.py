"""HTTP front of the OCSP responder (RFC 6960 appendix A, RFC 5019 §5-6).

* ``POST /ocsp`` (and ``/ocsp/``) with an ``application/ocsp-request`` body;
* ``GET /ocsp/{url-encoded base64 of the DER request}`` (``/``, ``+``, ``=`` may be percent
  encoded or not); ``HEAD`` likewise, and ``If-None-Match`` with the response's ETag gives 304.

Every answer is ``200 application/ocsp-response``, including ``malformedRequest`` (garbage,
truncated, empty, larger than 4 KiB) and ``unauthorized`` (not one of our CAs): OCSP errors are
OCSP responses, never an HTTP 500. Other methods get 405.

The endpoint is a raw ASGI application (:class:`OcspEndpoint`): no FastAPI dependency
injection, no Request object. A request whose bytes were seen before is answered by one dict
lookup and two ``send`` calls; everything else runs :meth:`OcspResponder.resolve` in a worker
thread.

Two ways to serve it:

* ``router`` (alias ``ocsp_router``): an ``APIRouter`` with the two routes, for the operator app
  (``app.include_router(router)``). The :class:`OcspResponder` is created on the first request
  from ``app.state.ctx`` and kept in ``app.state.ocsp_responder``; if the application already
  has a revocation index in ``app.state.revocation_index`` the responder subscribes to it.
  Wrapping the application in :class:`OcspFastPath` (``OcspFastPath(app)``, or
  ``app.add_middleware(OcspFastPath)`` last) answers cached POSTs without the FastAPI stack.
* :func:`create_ocsp_app` / :func:`build_ocsp_app_from_env`: a tiny standalone ASGI app serving
  only ``/ocsp`` (with lifespan start/stop of the responder), e.g. as its own listener::

      uvicorn --factory fleettrust.api.ocsp_routes:build_ocsp_app_from_env --workers 2 \\
          --http fleettrust.api.ocsp_routes:FastHttpToolsProtocol

  (:class:`FastHttpToolsProtocol`: without it, uvicorn with several workers and no uvloop
  leaves Nagle's algorithm on and every response waits ~40 ms for a delayed ACK; it also sends
  each response with one system call instead of two.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

import anyio.to_thread
from fastapi import APIRouter
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fleettrust.revocation.ocsp import MAX_REQUEST_BYTES
from fleettrust.revocation.ocsp_responder import (
    CONTENT_TYPE,
    INTERNAL_ERROR,
    MALFORMED,
    CachedResponse,
    OcspResponder,
)
from fleettrust.services.context import ServiceContext

log = logging.getLogger("fleettrust.api.ocsp")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PREFIX: Final = "/ocsp"
_ALLOW: Final = [(b"allow", b"GET, HEAD, POST"), (b"content-length", b"0")]
#: Body bytes read (and thrown away) past the limit before answering, to keep the connection.
_DRAIN_LIMIT: Final = 64 * 1024
_CREATE_LOCK = threading.Lock()


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or ``None`` if it exceeds ``limit`` (or the client went away)."""
    message = await receive()
    if message["type"] != "http.request":
        return None
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body if len(body) <= limit else None
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > _DRAIN_LIMIT:
            return None
    return b"".join(chunks) if size <= limit else None


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return None


def _if_none_match(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers", ()):
        if name == b"if-none-match":
            return bytes(value)
    return None


class OcspEndpoint:
    """Raw ASGI app for ``/ocsp``: POST body or GET path segment -> OCSP response.

    With ``responder=None`` the responder is taken from (or created in) the state of the
    application that routed the request (``scope["app"].state``).
    """

    def __init__(self, responder: OcspResponder | None = None, *, prefix: str = PREFIX) -> None:
        self._responder = responder
        self._prefix = prefix.rstrip("/")

    async def _app_responder(self, scope: Scope) -> OcspResponder:
        app = scope.get("app")
        state = getattr(app, "state", None)
        if state is None:
            raise RuntimeError("OcspEndpoint without a responder needs scope['app'].state.ctx")
        responder: OcspResponder | None = getattr(state, "ocsp_responder", None)
        if responder is not None:
            return responder

        def build() -> OcspResponder:
            # A thread lock, not an asyncio one: the module-level router may serve several
            # applications on several event loops (tests do).
            with _CREATE_LOCK:
                existing: OcspResponder | None = getattr(state, "ocsp_responder", None)
                if existing is not None:
                    return existing
                created = OcspResponder(state.ctx,
                                        index=getattr(state, "revocation_index", None)).start()
                state.ocsp_responder = created
                return created

        return await anyio.to_thread.run_sync(build)

    def _segment(self, scope: Scope) -> str:
        params = scope.get("path_params")
        if params and "rest" in params:
            return str(params["rest"])
        path: str = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if path.startswith(self._prefix):
            path = path[len(self._prefix):]
        return path.lstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method = scope["method"]
        responder = self._responder
        if responder is None:
            responder = await self._app_responder(scope)
        resp: CachedResponse | None
        if method == "POST":
            declared = _declared_length(scope)
            if declared is not None and (declared < 0 or declared > _DRAIN_LIMIT):
                await _send(send, MALFORMED, head=False)
                return
            body = await _read_body(receive, MAX_REQUEST_BYTES)
            if body is None:
                resp = MALFORMED
            else:
                resp = responder.lookup_post(body)
                if resp is None:
                    resp = await _run(responder.resolve, body)
            await _send(send, resp, head=False)
            return
        if method in ("GET", "HEAD"):
            segment = self._segment(scope)
            resp = responder.lookup_get(segment)
            if resp is None:
                resp = await _run(responder.resolve_get, segment)
            if resp.etag and _if_none_match(scope) == resp.etag:
                await send({"type": "http.response.start", "status": 304,
                            "headers": [h for h in resp.headers
                                        if h[0] not in (b"content-length", b"content-type")]})
                await send({"type": "http.response.body", "body": b""})
                return
            await _send(send, resp, head=method == "HEAD")
            return
        await send({"type": "http.response.start", "status": 405, "headers": _ALLOW})
        await send({"type": "http.response.body", "body": b""})


async def _run(fn: Callable[[Any], CachedResponse], arg: Any) -> CachedResponse:
    try:
        return await anyio.to_thread.run_sync(fn, arg)
    except Exception:  # resolve() already maps its own errors; this is the last resort
        log.exception("OCSP request failed")
        return INTERNAL_ERROR


async def _send(send: Send, resp: CachedResponse, *, head: bool) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": resp.headers})
    await send({"type": "http.response.body", "body": b"" if head else resp.body})


# --- the router for the operator app -----------------------------------------------------------

_endpoint = OcspEndpoint()
router = APIRouter()
router.add_route(PREFIX, _endpoint, methods=["GET", "POST"], include_in_schema=False,  # type: ignore[arg-type]
                 name="ocsp")
router.add_route(PREFIX + "/{rest:path}", _endpoint, methods=["GET", "POST"],  # type: ignore[arg-type]
                 include_in_schema=False, name="ocsp_get")
ocsp_router = router


def _replay(first: Message, receive: Receive) -> Receive:
    """A ``receive`` that returns ``first`` once, then reads on."""
    pending: list[Message] = [first]

    async def replay() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replay


class OcspFastPath:
    """ASGI middleware for the operator app: answers cached OCSP POSTs before anything else.

    The router's endpoint sits behind the whole FastAPI stack (error and body-limit middleware,
    routing over every API route), which costs several times the answer itself. This serves
    ``POST /ocsp`` requests whose bytes the app's responder has answered before and hands
    everything else, unchanged, to the application (whose router then does the full work).
    Either wrap the application given to the server (cheapest)::

        app = create_app(ctx); app.include_router(router)
        uvicorn.run(OcspFastPath(app), ...)

    or add it as the outermost user middleware (``app.add_middleware(OcspFastPath)`` last; it
    then still runs inside Starlette's error middleware).
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self._state = getattr(app, "state", None)  # wrapping the application itself

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == PREFIX:
            state = self._state or getattr(scope.get("app"), "state", None)
            responder: OcspResponder | None = getattr(state, "ocsp_responder", None)
            if responder is not None:
                message = await receive()
                if message["type"] == "http.request" and not message.get("more_body", False):
                    resp = responder.lookup_post(message.get("body", b""))
                    if resp is not None:
                        await send(resp.start_message)
                        await send(resp.body_message)
                        return
                receive = _replay(message, receive)
        await self.app(scope, receive, send)


# --- the standalone app ------------------------------------------------------------------------


class OcspApp:
    """Minimal ASGI app: ``/ocsp`` and ``/ocsp/...`` only; lifespan starts/stops the responder.

    ``create_responder`` runs at lifespan startup (in a worker thread), or on the first
    request when the server does not send lifespan events.
    """

    def __init__(self, create_responder: Callable[[], OcspResponder]) -> None:
        self._create = create_responder
        self.responder: OcspResponder | None = None
        self._endpoint: OcspEndpoint | None = None
        self._lock = threading.Lock()
        self._prefix_slash = PREFIX + "/"

    def _build(self) -> OcspEndpoint:
        with self._lock:
            endpoint = self._endpoint
            if endpoint is None:
                self.responder = self._create()
                endpoint = self._endpoint = OcspEndpoint(self.responder)
            return endpoint

    async def _ready(self) -> OcspEndpoint:
        endpoint = self._endpoint
        if endpoint is None:
            endpoint = await anyio.to_thread.run_sync(self._build)
        return endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            responder = self.responder
            if responder is not None and scope["method"] == "POST" and scope["path"] == PREFIX:
                # Hot path: one-message body, seen before -> the pre-built messages as they are.
                message = await receive()
                if message["type"] == "http.request" and not message.get("more_body", False):
                    body = message.get("body", b"")
                    resp = responder.lookup_post(body)
                    if resp is None:
                        resp = MALFORMED if len(body) > MAX_REQUEST_BYTES \
                            else await _run(responder.resolve, body)
                    await send(resp.start_message)
                    await send(resp.body_message)
                    return
                receive = _replay(message, receive)
            endpoint = self._endpoint or await self._ready()
            path: str = scope["path"]
            if path == PREFIX or path.startswith(self._prefix_slash):
                await endpoint(scope, receive, send)
                return
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        if kind == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    try:
                        await self._ready()
                    except Exception as exc:
                        log.exception("OCSP responder failed to start")
                        await send({"type": "lifespan.startup.failed", "message": str(exc)})
                        return
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if self.responder is not None:
                        await anyio.to_thread.run_sync(self.responder.close)
                    await send({"type": "lifespan.shutdown.complete"})
                    return


class _CoalescingTransport(asyncio.Transport):
    """Transport proxy: the writes of one event-loop iteration go out in one ``send()``.

    uvicorn writes a response as two ``transport.write`` calls (status line and headers, then
    the body), i.e. two system calls per response, which is most of the cost of a cached OCSP
    answer. Buffering until the end of the current loop iteration (``call_soon``) joins them;
    ``close`` flushes first, ``abort`` drops the buffer.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._buffer: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._buffer:
            self._loop.call_soon(self._flush)
        self._buffer.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _flush(self) -> None:
        buffer = self._buffer
        if buffer:
            data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
            buffer.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._buffer.clear()
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(b) for b in self._buffer)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()


class FastHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol tuned for small cached answers (the OCSP listener).

    * ``TCP_NODELAY`` on every connection. asyncio sets it only on sockets accepted from a
      listening socket created with ``proto=IPPROTO_TCP``; the socket uvicorn binds itself for
      ``--workers N`` has ``proto=0``, so with several workers (and without uvloop) Nagle's
      algorithm stays on and each response waits for the client's delayed ACK (~40 ms).
    * One ``send()`` per response instead of two (:class:`_CoalescingTransport`).

    Use ``uvicorn --http fleettrust.api.ocsp_routes:FastHttpToolsProtocol``.
    """

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if isinstance(transport, asyncio.Transport):
            transport = _CoalescingTransport(transport, self.loop)
        super().connection_made(transport)  # type: ignore[arg-type]


def create_ocsp_app(ctx: ServiceContext, **responder_options: Any) -> OcspApp:
    """Standalone OCSP app for ``ctx`` (options go to :class:`OcspResponder`)."""
    return OcspApp(lambda: OcspResponder(ctx, **responder_options).start())


def build_ocsp_app_from_env() -> OcspApp:
    """Factory for ``uvicorn --factory`` (settings from ``FLEETTRUST_*``), one per worker."""
    from fleettrust.config import Settings

    return create_ocsp_app(ServiceContext.create(Settings.load()))


__all__ = [
    "CONTENT_TYPE",
    "FastHttpToolsProtocol",
    "OcspApp",
    "OcspEndpoint",
    "OcspFastPath",
    "build_ocsp_app_from_env",
    "create_ocsp_app",
    "ocsp_router",
    "router",
]
