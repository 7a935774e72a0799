"""Build the device gateway listener: its TLS credential, SSL context and uvicorn server.

The gateway asks for client certificates (verified against the fleet root and the fleet's CA
certificates) but does not require them at the TLS layer, so that a missing certificate gets a
precise HTTP 401 and shared-secret devices can use the challenge-response endpoints.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from fastapi import FastAPI

from fleettrust.api.gateway import create_gateway_app, install_handshake_logging
from fleettrust.api.tls import (
    ConnectionRegistry,
    ManagedServer,
    build_server_ssl_context,
    make_server,
)
from fleettrust.services.context import ServiceContext, read_keystore_passphrase
from fleettrust.services.gateway import GatewayCredential, ensure_gateway_credential

KEEP_ALIVE_S = 420


@dataclass
class Gateway:
    app: FastAPI
    server: ManagedServer
    registry: ConnectionRegistry
    ssl_context: ssl.SSLContext
    credential: GatewayCredential


def build_gateway(
    ctx: ServiceContext,
    *,
    host: str | None = None,
    port: int | None = None,
    log_level: str = "warning",
) -> Gateway:
    settings = ctx.settings
    cred = ensure_gateway_credential(
        ctx, dns_names=list(settings.gateway_dns_names), ip_addresses=list(settings.gateway_ips)
    )
    context = build_server_ssl_context(
        certfile=cred.cert_chain_path,
        keyfile=cred.key_path,
        client_ca_file=cred.client_ca_path,
        require_client_cert=False,
        password=read_keystore_passphrase(settings),
    )
    install_handshake_logging(context)
    registry = ConnectionRegistry()
    app = create_gateway_app(ctx, registry, context)
    server = make_server(
        app,
        host=host or settings.gateway_host,
        port=settings.gateway_port if port is None else port,
        ssl_context=context,
        registry=registry,
        log_level=log_level,
        # Devices check in every ~300 s (+-20 %): keep their connection (and session) open
        # across check-ins instead of uvicorn's 5 s default.
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    return Gateway(app, server, registry, context, cred)
