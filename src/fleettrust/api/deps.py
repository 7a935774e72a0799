"""FastAPI dependencies as named ``Annotated`` aliases: the service context and the caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from fleettrust.errors import AuthenticationError
from fleettrust.services.auth import Principal, authenticate
from fleettrust.services.context import ServiceContext


def get_ctx(request: Request) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx


CtxDep = Annotated[ServiceContext, Depends(get_ctx)]


def remote_addr(request: Request) -> str | None:
    return request.client.host if request.client else None


def get_principal(request: Request, ctx: CtxDep) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise AuthenticationError("missing Authorization: Bearer <token>", code="no_token")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("Authorization must be 'Bearer <token>'", code="token_malformed")
    with ctx.sessions() as session:
        return authenticate(session, token.strip(), ctx.clock.now(), remote_addr(request))


PrincipalDep = Annotated[Principal, Depends(get_principal)]
