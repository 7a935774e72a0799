"""HTTP side of the device revocation feed: pages, the compact snapshot and server-sent events.

Two routers with the same three paths:

* :data:`operator_router` — for the operator API (``create_app``): public reads, like CRLs.
* :data:`gateway_router` — for the device gateway: the caller must be an authenticated device
  (mutual TLS or a shared-secret session; quarantined devices included). A device that gets
  revoked while streaming has its connection closed by the gateway's status watcher.

Paths (``format`` is ``v1`` or ``v2``, see :mod:`fleettrust.revocation.feed`):

* ``GET /v1/revocations?since=N&format=v1&limit=L`` — one page of events after ``N``.
* ``GET /v1/revocations/snapshot`` — the compact filter (:mod:`fleettrust.revocation.filter`),
  ``ETag: "<seq>"``; ``If-None-Match`` gets 304.
* ``GET /v1/revocations/stream?since=N&format=v1`` — ``text/event-stream``. Resumes from the
  ``Last-Event-ID`` header when present (it wins over ``since``), else from ``since``, else from
  now. Each event is ``id: <last seq>``, ``event: revocations``, ``data: <one feed page>``;
  a client too far behind gets one ``event: snapshot`` (a page with ``snapshot_required``) and the
  stream ends. ``: keep-alive`` comments every 15 s.

Push inside one process: a :class:`FeedHub` per application polls the ``revocations`` table
(``seq > last``, every 50 ms, only while someone listens) and hands each new batch to every open
stream; a batch is rendered once per format whatever the number of listeners. Polling the table
(not an in-process callback) is what makes a revocation made through another server process reach
this process's streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Final

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from fleettrust.revocation import feed
from fleettrust.revocation.filter import MEDIA_TYPE, Snapshot, snapshot_from_db
from fleettrust.services.context import ServiceContext

log = logging.getLogger("fleettrust.revocation.feed")

POLL_S: Final = 0.05
HEARTBEAT_S: Final = 15.0
QUEUE_MAX: Final = 256  # batches a slow stream may lag before it is dropped (it resumes)
SNAPSHOT_MAX_AGE: Final = dt.timedelta(minutes=10)
_OVERFLOW: Final = object()


def _ctx(request: Request) -> ServiceContext:
    state = request.app.state
    ctx: ServiceContext | None = getattr(state, "ctx", None)
    if ctx is None:
        ctx = state.gateway.ctx  # the device gateway keeps it in its GatewayState
    assert ctx is not None
    return ctx


# --- push within one process -------------------------------------------------------------------


@dataclass
class Batch:
    """New events seen by one poll; rendered once per format, shared by every stream."""

    since: int
    events: tuple[feed.FeedEvent, ...]
    _rendered: dict[str, bytes] = field(default_factory=dict)

    @property
    def next(self) -> int:
        return self.events[-1].seq

    def sse(self, fmt: str) -> bytes:
        chunk = self._rendered.get(fmt)
        if chunk is None:
            chunk = sse_page(feed.FeedPage(self.since, self.next, self.next, False, False,
                                           self.events), fmt)
            self._rendered[fmt] = chunk
        return chunk


def sse_page(page: feed.FeedPage, fmt: str) -> bytes:
    event = "snapshot" if page.snapshot_required else "revocations"
    data = feed.dumps(feed.render(page, fmt))
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (page.next, event.encode(), data)


class FeedHub:
    """Polls the revocation log while streams are open and fans new batches out to them."""

    def __init__(self, ctx: ServiceContext, poll_s: float = POLL_S) -> None:
        self.ctx = ctx
        self.poll_s = poll_s
        self.last = -1  # -1: not known yet
        self._queues: set[asyncio.Queue[object]] = set()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0

    def subscribe(self) -> asyncio.Queue[object]:
        q: asyncio.Queue[object] = asyncio.Queue(QUEUE_MAX)
        self._queues.add(q)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return q

    def unsubscribe(self, q: asyncio.Queue[object]) -> None:
        self._queues.discard(q)

    @property
    def listeners(self) -> int:
        return len(self._queues)

    def head(self) -> int:
        with self.ctx.sessions() as s:
            return feed.head_seq(s)

    def _read(self, since: int) -> tuple[feed.FeedEvent, ...]:
        with self.ctx.sessions() as s:
            return feed.events_after(s, since, feed.MAX_LIMIT)

    async def _run(self) -> None:
        if self.last < 0:
            self.last = await run_in_threadpool(self.head)
        while self._queues:
            try:
                events = await run_in_threadpool(self._read, self.last)
            except Exception:
                log.exception("revocation feed poll failed; retrying")
                events = ()
            if events:
                batch = Batch(self.last, events)
                self.last = batch.next
                self.batches += 1
                for q in list(self._queues):
                    try:
                        q.put_nowait(batch)
                    except asyncio.QueueFull:
                        self._queues.discard(q)
                        with contextlib.suppress(asyncio.QueueFull):
                            q.get_nowait()
                            q.put_nowait(_OVERFLOW)
                continue  # more may be waiting (pages of MAX_LIMIT)
            await asyncio.sleep(self.poll_s)


def hub_for(request: Request) -> FeedHub:
    state = request.app.state
    hub: FeedHub | None = getattr(state, "revocation_feed_hub", None)
    if hub is None:
        hub = FeedHub(_ctx(request))
        state.revocation_feed_hub = hub
    return hub


# --- snapshot cache ----------------------------------------------------------------------------


class SnapshotCache:
    """The last snapshot built by this process; rebuilt when the log moved or it is old."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: tuple[int, dt.datetime, bytes] | None = None

    def get(self, ctx: ServiceContext) -> tuple[int, bytes]:
        with self._lock:
            with ctx.sessions() as s:
                head = feed.head_seq(s)
                now = ctx.clock.now()
                cached = self._value
                if cached and cached[0] == head and now - cached[1] < SNAPSHOT_MAX_AGE:
                    return head, cached[2]
                t0 = time.perf_counter()
                snap: Snapshot = snapshot_from_db(s, now=now, seq=head)
            data = snap.to_bytes()
            log.info("revocation snapshot seq %d: %d bytes, %d revoked of %d, built in %.2f s",
                     head, len(data), snap.revoked, snap.universe, time.perf_counter() - t0)
            self._value = (head, now, data)
            return head, data


def snapshot_cache(ctx: ServiceContext) -> SnapshotCache:
    cache: SnapshotCache = ctx.cached("revocation-feed", "snapshot", SnapshotCache)
    return cache


# --- handlers (shared by both routers) ---------------------------------------------------------

Since = Annotated[int, Query(ge=0, le=2**62, description="last seq the client has applied")]
Fmt = Annotated[str, Query(alias="format", pattern="^v[12]$", description="v1 or v2")]
Limit = Annotated[int, Query(ge=1, le=feed.MAX_LIMIT)]


async def get_page(request: Request, since: Since = 0, fmt: Fmt = "v1",
                   limit: Limit = feed.DEFAULT_LIMIT) -> Response:
    ctx = _ctx(request)

    def read() -> bytes:
        with ctx.sessions() as s:
            return feed.dumps(feed.render(feed.read_page(s, since, limit), fmt))

    body = await run_in_threadpool(read)
    return Response(body, media_type="application/json", headers={"Cache-Control": "no-cache"})


async def get_snapshot(request: Request,
                       if_none_match: Annotated[str | None, Header()] = None) -> Response:
    ctx = _ctx(request)
    seq, data = await run_in_threadpool(snapshot_cache(ctx).get, ctx)
    etag = f'"{seq}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Revocation-Seq": str(seq)}
    if if_none_match is not None and etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=MEDIA_TYPE, headers=headers)


async def get_stream(request: Request, since: Annotated[int | None, Query(ge=0, le=2**62)] = None,
                     fmt: Fmt = "v1",
                     last_event_id: Annotated[str | None, Header()] = None) -> StreamingResponse:
    ctx = _ctx(request)
    start = since
    if last_event_id is not None and last_event_id.strip().isdigit():
        start = int(last_event_id.strip())
    hub = hub_for(request)
    queue = hub.subscribe()

    def read(pos: int) -> feed.FeedPage:
        with ctx.sessions() as s:
            return feed.read_page(s, pos, feed.MAX_LIMIT)

    async def catch_up(pos: int, until: int | None) -> AsyncIterator[feed.FeedPage]:
        while until is None or pos < until:
            page = await run_in_threadpool(read, pos)
            if page.snapshot_required or page.events:
                yield page
            if page.snapshot_required or not page.more:
                return
            pos = page.next

    async def stream() -> AsyncIterator[bytes]:
        try:
            pos = start if start is not None else await run_in_threadpool(hub.head)
            yield b"retry: 2000\n: fleettrust revocation feed\n\n"
            async for page in catch_up(pos, None):
                yield sse_page(page, fmt)
                if page.snapshot_required:
                    return
                pos = page.next
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
                except TimeoutError:
                    yield b": keep-alive\n\n"
                    continue
                if item is _OVERFLOW:
                    return  # too slow: the client reconnects with Last-Event-ID
                assert isinstance(item, Batch)
                if item.since > pos:  # events between pos and the batch: read them first
                    async for page in catch_up(pos, item.since):
                        yield sse_page(page, fmt)
                        if page.snapshot_required:
                            return
                        pos = page.next
                if item.next <= pos:
                    continue
                if item.since == pos:
                    yield item.sse(fmt)
                else:
                    rest = tuple(e for e in item.events if e.seq > pos)
                    yield sse_page(feed.FeedPage(pos, item.next, item.next, False, False, rest),
                                   fmt)
                pos = item.next
        finally:
            hub.unsubscribe(queue)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _routes(router: APIRouter) -> APIRouter:
    router.add_api_route("/v1/revocations", get_page, methods=["GET"],
                         summary="Revocation feed: events after a sequence number")
    router.add_api_route("/v1/revocations/snapshot", get_snapshot, methods=["GET"],
                         summary="Compact snapshot (exact filter over issued device serials)",
                         response_class=Response)
    router.add_api_route("/v1/revocations/stream", get_stream, methods=["GET"],
                         summary="Revocation feed as server-sent events",
                         response_class=StreamingResponse)
    return router


async def _authenticated_device(request: Request) -> Any:
    """The gateway's device authentication (imported lazily: ``api.gateway`` may include this
    router while it is itself being imported)."""
    from fleettrust.api.gateway import device_any

    return await device_any(request)


#: Include in the operator API app (public read, like CRLs).
operator_router = _routes(APIRouter(tags=["revocation feed"]))
#: Include in the device gateway app (authenticated devices only).
gateway_router = _routes(APIRouter(tags=["revocation feed"],
                                   dependencies=[Depends(_authenticated_device)]))
