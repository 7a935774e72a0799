"""CRLs over plain HTTP (public, on the operator listener) and the root-CRL upload (admin).

    GET  /crl/{ca_id}.crl                 CA-level complete CRL (no IDP; sub-CAs and every leaf)
    GET  /crl/{ca_id}/delta.crl           its delta CRL
    GET  /crl/{ca_id}/{shard}.crl         shard complete CRL (the device certificates' CRL DP)
    GET  /crl/{ca_id}/{shard}-delta.crl   its delta CRL
    POST /v1/crl/root                     {"crl": PEM or base64 DER} signed offline by the root
    POST /v1/crl/{ca_id}/publish          regenerate now (admin)

Answers are DER, ``application/pkix-crl``, with ``ETag`` (``If-None-Match`` gets 304),
``Last-Modified`` (thisUpdate), ``Expires`` (nextUpdate) and ``Cache-Control: public,
max-age=`` at most 60 s and never past nextUpdate. The CRLs are regenerated before answering
when stale (:class:`~fleettrust.revocation.crl_publisher.CrlPublisher`), so they are current
even where no background publisher runs; :func:`start_publisher` runs one (regeneration right
after revocations, before nextUpdate).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from email.utils import format_datetime
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Header, Request, Response
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from fleettrust.api.deps import CtxDep, PrincipalDep
from fleettrust.api.schemas import IdPath, Strict
from fleettrust.errors import NotFoundError, ValidationError
from fleettrust.revocation.crl_publisher import CA_LEVEL, CrlPublisher, PublishedCrl, max_age
from fleettrust.revocation.index import RevocationIndex, follow
from fleettrust.services.auth import require
from fleettrust.services.context import ServiceContext

MEDIA_TYPE = "application/pkix-crl"
_NAME = re.compile(r"^(?:(?P<shard>[0-9]{1,4})(?P<d1>-delta)?|(?P<d2>delta))\.crl$")

public_router = APIRouter(tags=["pki"])
admin_router = APIRouter(prefix="/v1/crl", tags=["pki"])


def publisher(request: Request) -> CrlPublisher:
    """The application's publisher (created on first use)."""
    state = request.app.state
    pub: CrlPublisher | None = getattr(state, "crl_publisher", None)
    if pub is None:
        ctx: ServiceContext = state.ctx
        pub = state.crl_publisher = CrlPublisher(ctx)
    return pub


def _answer(doc: PublishedCrl, ctx: ServiceContext, if_none_match: str | None) -> Response:
    headers = {
        "ETag": doc.etag,
        "Cache-Control": f"public, max-age={max_age(doc, ctx.clock.now())}",
        "Last-Modified": format_datetime(doc.this_update, usegmt=True),
        "Expires": format_datetime(doc.next_update, usegmt=True),
    }
    if if_none_match is not None and doc.etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=304, headers=headers)
    return Response(doc.der, media_type=MEDIA_TYPE, headers=headers)


IfNoneMatch = Annotated[str | None, Header(max_length=1024)]


@public_router.get("/crl/{ca_id}.crl", response_class=Response)
async def ca_level_crl(ca_id: IdPath, request: Request, ctx: CtxDep,
                       if_none_match: IfNoneMatch = None) -> Response:
    doc = await run_in_threadpool(publisher(request).document, ca_id, CA_LEVEL, "full")
    return _answer(doc, ctx, if_none_match)


@public_router.get("/crl/{ca_id}/{name}", response_class=Response)
async def shard_crl(ca_id: IdPath, name: str, request: Request, ctx: CtxDep,
                    if_none_match: IfNoneMatch = None) -> Response:
    m = _NAME.match(name)
    if m is None:
        raise NotFoundError("CRL names are <shard>.crl, <shard>-delta.crl and delta.crl",
                            code="crl_not_found")
    shard = CA_LEVEL if m["d2"] else int(m["shard"])
    kind = "delta" if (m["d1"] or m["d2"]) else "full"
    doc = await run_in_threadpool(publisher(request).document, ca_id, shard, kind)
    return _answer(doc, ctx, if_none_match)


class RootCrlIn(Strict):
    crl: str = Field(max_length=8 << 20, description="PEM, or base64 of the DER")


@admin_router.post("/root")
async def upload_root_crl(body: RootCrlIn, request: Request, ctx: CtxDep,
                          who: PrincipalDep) -> dict[str, Any]:
    require(who, "admin")
    text = body.crl.strip()
    if text.startswith("-----"):
        data = text.encode()
    else:
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValidationError("crl must be PEM or base64 DER", code="crl_malformed") from exc
    doc = await run_in_threadpool(publisher(request).store_uploaded, data)
    return {"ca_id": doc.ca_id, "crl_number": doc.crl_number,
            "this_update": doc.this_update.isoformat(),
            "next_update": doc.next_update.isoformat(),
            "url": f"{ctx.settings.base_url}/crl/{doc.ca_id}.crl"}


@admin_router.post("/{ca_id}/publish")
async def publish(ca_id: IdPath, request: Request, who: PrincipalDep) -> dict[str, Any]:
    require(who, "admin")
    pub = publisher(request)
    await run_in_threadpool(pub.document, ca_id, CA_LEVEL, "full")  # checks the CA
    written = await run_in_threadpool(lambda: pub.publish_ca(ca_id, force=True))
    return {"ca_id": ca_id, "documents": written}


async def start_publisher(app: FastAPI, ctx: ServiceContext) -> list[asyncio.Task[None]]:
    """Start the background CRL publisher of ``app`` (and the revocation index it follows).

    For the application's lifespan: ``tasks = await start_publisher(app, ctx)`` at start-up,
    cancel the tasks at shutdown.
    """
    pub: CrlPublisher | None = getattr(app.state, "crl_publisher", None)
    if pub is None:
        pub = app.state.crl_publisher = CrlPublisher(ctx)
    index = RevocationIndex(ctx)
    await asyncio.to_thread(index.load)
    app.state.revocation_index = index
    return [asyncio.create_task(follow(index)), asyncio.create_task(pub.run(index))]


__all__ = ["MEDIA_TYPE", "admin_router", "public_router", "publisher", "start_publisher"]
