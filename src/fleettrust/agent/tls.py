"""Client-side TLS for the agent and the simulator: pinned fleet root, device certificate.

* :func:`client_ssl_context` — ``PROTOCOL_TLS_CLIENT`` (hostname check and certificate
  verification on), TLS 1.2 minimum, the pinned fleet root as the ONLY trust anchor (no system
  CA store is ever loaded), and the device's certificate chain + key for mutual TLS.
* :class:`SessionSlot` / :func:`enable_session_resumption` — TLS session resumption for one
  context. Neither httpx nor anyio passes an ``ssl.SSLSession`` to new connections, so the
  context's documented ``sslobject_class`` hook is set to a subclass of :class:`ssl.SSLObject`
  whose constructor (``SSLObject._create``, a private but long-stable CPython classmethod)
  injects the slot's last session and records the new object. After a request the caller
  stores ``slot.capture()``; the next connection on that context then offers the session
  (TLS 1.3 ticket / TLS 1.2 session). The slot also counts connections (= handshakes).

Not here: HTTP, retries, certificate checks beyond what OpenSSL does in the handshake.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SessionSlot", "client_ssl_context", "enable_session_resumption"]


def client_ssl_context(
    *, root: Path, certificate: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """An mTLS client context trusting only ``root`` (``certificate`` = leaf + chain PEM)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname + CERT_REQUIRED
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cafile=str(root))
    if certificate is not None:
        context.load_cert_chain(certfile=str(certificate),
                                keyfile=str(key) if key is not None else None)
    context.set_alpn_protocols(["http/1.1"])
    return context


@dataclass
class SessionSlot:
    """The resumable session of one client context, and connection statistics."""

    session: ssl.SSLSession | None = None
    last: ssl.SSLObject | None = None
    connections: int = 0
    resumed: int = 0
    resume: bool = True
    _counted: ssl.SSLObject | None = None

    def capture(self) -> bool | None:
        """After a request: returns whether the last connection was resumed (None if no
        connection was made through this slot yet). The first call for a connection counts it
        and, when resuming, keeps its session for the next connection; later calls for the
        same connection are cheap (reading ``SSLObject.session`` copies the whole session,
        peer certificate included: about 0.7 ms, far more than a kept-alive request)."""
        obj = self.last
        if obj is None:
            return None
        reused = bool(obj.session_reused)
        if obj is self._counted:
            return reused
        self._counted = obj
        if reused:
            self.resumed += 1
        if self.resume:
            try:
                session = obj.session
            except (ValueError, ssl.SSLError):
                session = None
            if session is not None:
                self.session = session
        return reused


class _ResumingSSLObject(ssl.SSLObject):
    @classmethod
    def _create(  # mirrors CPython's private classmethod (not in typeshed)
        cls,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: Any = None,
        session: ssl.SSLSession | None = None,
        context: ssl.SSLContext | None = None,
    ) -> ssl.SSLObject:
        slot: SessionSlot | None = getattr(context, "_fleettrust_session_slot", None)
        if slot is not None and session is None and slot.resume:
            session = slot.session
        create = super()._create  # type: ignore[misc]
        obj: ssl.SSLObject = create(incoming, outgoing, server_side=server_side,
                                    server_hostname=server_hostname, session=session,
                                    context=context)
        if slot is not None:
            slot.last = obj
            slot.connections += 1
        return obj


def enable_session_resumption(context: ssl.SSLContext, *, resume: bool = True) -> SessionSlot:
    """Attach a :class:`SessionSlot` to ``context`` (``resume=False``: only count handshakes).

    Only connections made through :meth:`ssl.SSLContext.wrap_bio` (asyncio/anyio, i.e. the
    simulator's ``httpx.AsyncClient``) go through the hook."""
    if not hasattr(ssl.SSLObject, "_create"):  # pragma: no cover - future CPython
        raise RuntimeError("this Python's ssl module has no SSLObject._create hook")
    slot = SessionSlot(resume=resume)
    context._fleettrust_session_slot = slot  # type: ignore[attr-defined]
    context.sslobject_class = _ResumingSSLObject
    return slot
