"""TLS transport for the fleettrust HTTPS listeners (operator API and device gateway).

What this module does
---------------------
* :func:`build_server_ssl_context` builds a server-side :class:`ssl.SSLContext`: TLS 1.2 or
  newer, ECDHE-only AEAD cipher suites for TLS 1.2 (TLS 1.3 suites are all forward-secret),
  client certificates verified against the fleet root bundle (``CERT_REQUIRED`` on the device
  gateway), optional leaf CRL checking, session tickets and the server session cache left on so
  devices can resume sessions, renegotiation off, ALPN ``http/1.1``.
* :class:`TLSH11Protocol` (always) and ``TLSHttpToolsProtocol`` (only when ``httptools`` is
  importable) are uvicorn HTTP protocol subclasses. Stock uvicorn does not hand the client
  certificate to the application; these classes read it once per connection, in
  ``connection_made`` (the TLS handshake is complete by then), and put a copy of
  :class:`TLSScopeInfo` into ``scope["extensions"]["tls"]`` of every HTTP request on that
  connection. :func:`tls_protocol_class` picks httptools when installed, h11 otherwise (the
  same rule as uvicorn's ``http="auto"``).
* :class:`ConnectionRegistry` tracks the open TLS connections of a listener. The application
  binds a connection to a key of its choosing (device id, certificate serial, ...) with
  :meth:`ConnectionRegistry.bind` and can drop every open connection of that key at once with
  :meth:`ConnectionRegistry.close` (for example right after revoking a device). Safe to call
  from the event loop or from any other thread; connections unregister themselves on close.
  A closed connection sends TLS close_notify and is aborted if the peer has not answered
  within :data:`CLOSE_GRACE_SECONDS` (asyncio would wait up to 30 s for an idle peer); the
  same bound applies to idle connections at server shutdown.
* :func:`make_server` builds a :class:`ManagedServer` (a ``uvicorn.Server``) wired to the
  protocol class, the SSL context and a registry; :func:`serve_many` runs several of them on
  one event loop (operator API and device gateway side by side) with one signal handler and
  shared fate: when one stops or fails, all are shut down gracefully.

How the application uses it::

    registry = ConnectionRegistry()
    app.state.gateway_connections = registry            # the app keeps its own reference
    gateway = make_server(app, host="0.0.0.0", port=8443, registry=registry,
                          ssl_context=build_server_ssl_context(..., require_client_cert=True))

    # inside a request handler (``request.scope`` is the ASGI scope):
    info = tls_info(request.scope)                      # TLSScopeInfo | None
    der = info["peer_cert_der"]                         # leaf DER, verified by the handshake
    registry.bind(info["connection_id"], device_id)
    ...
    registry.close(device_id)                           # drop all of that device's connections

What this module does NOT do
----------------------------
* No authorisation and no revocation decision. The handshake proves the peer holds a key
  certified by the configured CA bundle (and, with ``crl_file``, that the leaf was not on that
  CRL when the *full* handshake happened). A *resumed* session skips chain and CRL checks and
  carries the certificate of the original handshake, so the application must check the
  certificate's revocation state itself on every request (by serial) and must not treat
  "connected" as "still trusted". Session tickets stay valid for OpenSSL's default lifetime
  (7200 s, measured); Python offers no way to shorten or invalidate them short of building a
  new context and restarting the listener. Closing a revoked device's connections does not
  stop it from reconnecting by resumption within that window.
* Only the leaf certificate is exposed. Python 3.11's ``ssl`` has no ``get_verified_chain``
  (3.13 has); the issuing intermediate is not available.
* The key ``scope["extensions"]["tls"]`` is the same key the ASGI TLS extension specification
  uses, but the content is this module's :class:`TLSScopeInfo`, not that specification's
  fields (``client_cert_chain``, integer ``tls_version``, ...). Third-party middleware that
  expects the specification's format must not be mounted on these listeners.
* No WebSocket support (``ws="none"`` is forced): uvicorn hands an upgraded transport to a
  different protocol object, which would neither carry the TLS extension nor unregister from
  the registry. No HTTP/2.
* No CRL reload: the CRL (if any) is read when the context is built.
* No logging of failed handshakes, and no TLS alert to the rejected client: asyncio drops
  handshake errors silently (``OSError`` subclasses; logged only in loop debug mode) and
  discards the fatal alert OpenSSL generated (CPython gh-98078), so a device without a valid
  certificate sees EOF or a reset - during the handshake on TLS 1.2, on its first read on
  TLS 1.3 (whose client finishes the handshake before the server checks the certificate).
* No TLS handshake timeout of our own: uvicorn does not pass ``ssl_handshake_timeout``, so
  asyncio's default (60 s) applies to peers that connect and stall.
* Relies on uvicorn internals (see docs/adr/0003-device-gateway-mtls-transport.md for the
  pinned range and how a change is detected): the protocol constructor signature, the
  per-connection ``app`` attribute read for every request, the ``transport``/``loop``
  attributes, ``connection_made``/``connection_lost``/``shutdown``, ``Config.http`` accepting
  a class, ``Config.ssl_context_factory``, and ``Server.capture_signals``/``servers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import logging
import os
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Generator, Hashable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, ClassVar, Literal, TypedDict, cast

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = [
    "CLOSE_GRACE_SECONDS",
    "HTTPTOOLS_AVAILABLE",
    "TLS12_CIPHERS",
    "ConnectionRegistry",
    "ManagedServer",
    "TLSH11Protocol",
    "TLSScopeInfo",
    "build_server_ssl_context",
    "make_server",
    "serve_many",
    "tls_info",
    "tls_protocol_class",
]

logger = logging.getLogger(__name__)

StrPath = str | os.PathLike[str]

#: TLS 1.2 cipher suites: ECDHE key exchange with AEAD only (ECDSA or RSA server keys).
#: ``set_ciphers`` does not affect TLS 1.3, whose suites are all ECDHE/DHE + AEAD anyway.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"

#: Whether the faster httptools parser is importable (then it is the default protocol base).
HTTPTOOLS_AVAILABLE: bool = importlib.util.find_spec("httptools") is not None

#: Seconds a closing TLS connection may wait for the peer's close_notify before it is aborted
#: (asyncio's own limit is 30 s). Used by ConnectionRegistry.close and at server shutdown.
CLOSE_GRACE_SECONDS = 1.0

# Process-wide connection ids; ``next()`` on itertools.count is atomic under the GIL.
_CONNECTION_IDS = itertools.count(1)


# --------------------------------------------------------------------------------------------
# SSL context
# --------------------------------------------------------------------------------------------


def build_server_ssl_context(
    *,
    certfile: StrPath,
    keyfile: StrPath | None,
    client_ca_file: StrPath | None,
    require_client_cert: bool,
    crl_file: StrPath | None = None,
    password: bytes | None = None,
) -> ssl.SSLContext:
    """Build a server-side TLS context for one listener.

    ``password`` decrypts an encrypted PEM ``keyfile`` (the key never touches disk in clear).

    ``certfile`` is the server certificate (optionally followed by its chain), ``keyfile`` its
    private key (``None`` if the key is in ``certfile``). ``client_ca_file`` is the PEM bundle
    of CAs that client certificates must chain to (the fleet root; intermediates may be in the
    bundle or sent by the client); it is the *only* trust store, system CAs are never loaded.

    ``require_client_cert=True`` sets ``CERT_REQUIRED``: a handshake without a certificate
    that chains to the bundle fails. ``False`` with a bundle requests but does not require a
    certificate (``CERT_OPTIONAL``, a presented certificate must still verify); ``False``
    without a bundle does not ask for one. ``crl_file`` (PEM CRL of the leaf's issuer) turns on
    ``VERIFY_CRL_CHECK_LEAF``; an expired CRL then fails every handshake (fail closed).

    Use one context per listener: session tickets and the session cache belong to a context,
    so sharing one would let a session from one listener resume on the other.
    """
    if require_client_cert and client_ca_file is None:
        raise ValueError("require_client_cert=True needs client_ca_file (the fleet root bundle)")
    if crl_file is not None and client_ca_file is None:
        raise ValueError("crl_file needs client_ca_file")

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= (
        ssl.OP_NO_COMPRESSION
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_SINGLE_ECDH_USE
        | ssl.OP_NO_RENEGOTIATION
    )
    # Session resumption: stateless tickets (TLS 1.2 and 1.3) plus OpenSSL's server-side
    # session cache (TLS 1.2 session ids, on by default). CPython sets a session-id context on
    # every SSLContext, which OpenSSL requires to resume sessions with verified client certs.
    ctx.options &= ~ssl.OP_NO_TICKET
    ctx.num_tickets = 2
    ctx.load_cert_chain(certfile=certfile, keyfile=keyfile, password=password)
    if client_ca_file is not None:
        ctx.load_verify_locations(cafile=client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        if crl_file is not None:
            ctx.load_verify_locations(cafile=crl_file)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    else:
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


# --------------------------------------------------------------------------------------------
# Connection registry
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    key: Hashable | None = None
    closing: bool = False


class ConnectionRegistry:
    """Open TLS connections of one or more listeners, indexed by an application-chosen key.

    The protocol classes call :meth:`register` when a TLS connection is established and
    :meth:`unregister` when it is lost, so the registry holds exactly the open connections.
    The application calls :meth:`bind` (connection id from ``scope["extensions"]["tls"]``)
    and :meth:`close`. All methods take a short internal lock, never block on I/O and may be
    called from the event loop or from other threads (e.g. a sync FastAPI endpoint): closing a
    transport owned by another thread's loop is handed to that loop.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}
        self._by_key: dict[Hashable, set[int]] = {}

    # -- used by the protocol classes ---------------------------------------------------------

    def register(
        self, connection_id: int, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop
    ) -> None:
        """Record a new open connection (called by the protocol in ``connection_made``)."""
        with self._lock:
            if connection_id in self._entries:
                raise ValueError(f"connection {connection_id} is already registered")
            self._entries[connection_id] = _Entry(transport=transport, loop=loop)

    def unregister(self, connection_id: int) -> None:
        """Forget a connection (called by the protocol in ``connection_lost``). Idempotent."""
        with self._lock:
            entry = self._entries.pop(connection_id, None)
            if entry is not None and entry.key is not None:
                self._discard_from_key(entry.key, connection_id)

    # -- used by the application --------------------------------------------------------------

    def bind(self, connection_id: int, key: Hashable) -> bool:
        """Associate an open connection with ``key`` (replacing a previous key).

        Returns ``False`` if the connection is no longer open or is being closed, so the
        caller can tell that it raced with a disconnect.
        """
        if key is None:
            raise ValueError("key must not be None")
        with self._lock:
            entry = self._entries.get(connection_id)
            if entry is None or entry.closing:
                return False
            if entry.key is not None:
                self._discard_from_key(entry.key, connection_id)
            entry.key = key
            self._by_key.setdefault(key, set()).add(connection_id)
            return True

    def close(self, key: Hashable, *, grace: float = CLOSE_GRACE_SECONDS) -> int:
        """Close every open connection bound to ``key``; return how many were closed.

        Each connection is closed gracefully (buffered data flushed, TLS close_notify sent)
        and, if the peer has not completed the TLS shutdown within ``grace`` seconds, aborted
        (TCP connection dropped): asyncio would otherwise keep waiting for the peer's
        close_notify for up to 30 s, and an idle client that is not reading never sends it.
        ``grace=0`` aborts at once. A request in flight on such a connection gets no (or a
        truncated) response - including the request calling this method, if it runs on one
        of these connections. The connections are unbound immediately and leave the registry
        when the transport reports them lost.
        """
        with self._lock:
            ids = self._by_key.pop(key, set())
            targets: list[tuple[int, _Entry]] = []
            for connection_id in ids:
                entry = self._entries.get(connection_id)
                if entry is None:
                    continue
                entry.key = None
                entry.closing = True
                targets.append((connection_id, entry))
        for connection_id, entry in targets:
            _call_on_loop(
                entry.loop, self._close_on_loop, connection_id, entry.transport, entry.loop, grace
            )
        return len(targets)

    def _close_on_loop(
        self,
        connection_id: int,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        grace: float,
    ) -> None:
        if grace <= 0:
            transport.abort()
            return
        transport.close()
        loop.call_later(grace, self._abort_if_open, connection_id, transport)

    def _abort_if_open(self, connection_id: int, transport: asyncio.Transport) -> None:
        with self._lock:
            entry = self._entries.get(connection_id)
            still_open = entry is not None and entry.transport is transport
        if still_open:
            transport.abort()

    def connection_ids(self, key: Hashable) -> frozenset[int]:
        """Ids of the open connections currently bound to ``key``."""
        with self._lock:
            return frozenset(self._by_key.get(key, ()))

    def key_of(self, connection_id: int) -> Hashable | None:
        """The key bound to an open connection, or ``None``."""
        with self._lock:
            entry = self._entries.get(connection_id)
            return None if entry is None else entry.key

    def __contains__(self, connection_id: object) -> bool:
        with self._lock:
            return connection_id in self._entries

    def __len__(self) -> int:
        """Number of open (registered, not yet lost) connections."""
        with self._lock:
            return len(self._entries)

    def _discard_from_key(self, key: Hashable, connection_id: int) -> None:
        ids = self._by_key.get(key)
        if ids is not None:
            ids.discard(connection_id)
            if not ids:
                del self._by_key[key]


def _call_on_loop(loop: asyncio.AbstractEventLoop, func: Callable[..., None], *args: Any) -> None:
    """Run ``func(*args)`` on ``loop``: now if we are on it, else via call_soon_threadsafe."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        func(*args)
        return
    try:
        loop.call_soon_threadsafe(func, *args)
    except RuntimeError:
        # The owning loop is closed: its transports are gone already.
        logger.debug("event loop closed before a registry close could be delivered")


# --------------------------------------------------------------------------------------------
# Protocol classes
# --------------------------------------------------------------------------------------------


class TLSScopeInfo(TypedDict):
    """What the protocol puts into ``scope["extensions"]["tls"]`` (a fresh copy per request)."""

    peer_cert_der: bytes | None
    """DER of the client's leaf certificate; ``None`` if the client sent none."""
    tls_version: str
    """e.g. ``"TLSv1.3"``."""
    cipher: str
    """OpenSSL cipher suite name, e.g. ``"TLS_AES_256_GCM_SHA384"``."""
    session_reused: bool
    """True if this connection resumed an earlier TLS session (no certificate verification
    happened on this handshake; ``peer_cert_der`` comes from the original one)."""
    connection_id: int
    """Process-wide id of the TLS connection, the handle for :class:`ConnectionRegistry`."""


def tls_info(scope: Scope) -> TLSScopeInfo | None:
    """The TLS information of a request, or ``None`` (plain HTTP or not served by us)."""
    extensions = scope.get("extensions")
    if not isinstance(extensions, dict):
        return None
    return cast("TLSScopeInfo | None", extensions.get("tls"))


def _read_tls_info(ssl_object: ssl.SSLObject, connection_id: int) -> TLSScopeInfo:
    cipher = ssl_object.cipher()
    return {
        "peer_cert_der": ssl_object.getpeercert(binary_form=True),
        "tls_version": ssl_object.version() or "",
        "cipher": cipher[0] if cipher is not None else "",
        "session_reused": ssl_object.session_reused,
        "connection_id": connection_id,
    }


class _TLSScopeApp:
    """Per-connection ASGI wrapper adding the connection's TLS info to each HTTP scope."""

    __slots__ = ("_app", "_info")

    def __init__(self, app: ASGIApp, info: TLSScopeInfo) -> None:
        self._app = app
        self._info = info

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            extensions = scope.get("extensions")
            if extensions is None:
                extensions = scope["extensions"] = {}
            extensions["tls"] = self._info.copy()
        await self._app(scope, receive, send)


class _TLSScopeMixin(asyncio.Protocol):
    """Shared logic of the TLS protocol classes; must precede the uvicorn base in the MRO.

    Relies on these uvicorn protocol internals (h11 and httptools alike): ``self.app`` is set
    in ``__init__`` and read for every request; ``self.transport`` and ``self.loop`` exist;
    ``connection_made``/``connection_lost`` are the standard asyncio callbacks, the first one
    called after the TLS handshake; ``shutdown()`` is called per connection by the server.
    """

    #: Set on the per-server subclass made by :func:`tls_protocol_class`.
    registry: ClassVar[ConnectionRegistry | None] = None

    app: Any
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    _tls_connection_id: int | None = None
    _tls_lost: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not hasattr(self, "app") or not hasattr(self, "loop"):
            raise RuntimeError(
                "unsupported uvicorn version: the HTTP protocol no longer has the 'app'/'loop' "
                "attributes fleettrust.api.tls relies on (see ADR 0003)"
            )

    def connection_made(  # type: ignore[override]  # uvicorn narrows to Transport as well
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        # Small request/response exchanges: never let Nagle wait for a delayed ACK (~40 ms),
        # whatever the listening socket was created with.
        sock: socket.socket | None = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return  # plain-HTTP listener: no TLS extension, not tracked
        connection_id = next(_CONNECTION_IDS)
        info = _read_tls_info(ssl_object, connection_id)
        self.app = _TLSScopeApp(self.app, info)
        registry = type(self).registry
        if registry is not None:
            registry.register(connection_id, transport, self.loop)
        self._tls_connection_id = connection_id

    def connection_lost(self, exc: Exception | None) -> None:
        self._tls_lost = True
        try:
            super().connection_lost(exc)
        finally:
            registry = type(self).registry
            if registry is not None and self._tls_connection_id is not None:
                registry.unregister(self._tls_connection_id)

    def shutdown(self) -> None:
        """Server shutdown: uvicorn closes idle connections; bound the TLS close to the grace
        period so an idle peer that never answers close_notify cannot stall the shutdown."""
        super().shutdown()  # type: ignore[misc]  # defined by the uvicorn base, not asyncio
        if self._tls_connection_id is not None and self.transport.is_closing():
            self.loop.call_later(CLOSE_GRACE_SECONDS, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if not self._tls_lost:
            self.transport.abort()


class TLSH11Protocol(_TLSScopeMixin, H11Protocol):
    """uvicorn's h11 protocol plus ``scope["extensions"]["tls"]`` and registry bookkeeping."""


_PROTOCOL_BASES: dict[str, type[_TLSScopeMixin]] = {"h11": TLSH11Protocol}

if HTTPTOOLS_AVAILABLE:  # pragma: no cover - depends on the environment
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class TLSHttpToolsProtocol(_TLSScopeMixin, HttpToolsProtocol):
        """uvicorn's httptools protocol plus the TLS extension and registry bookkeeping."""

    _PROTOCOL_BASES["httptools"] = TLSHttpToolsProtocol
    __all__ += ["TLSHttpToolsProtocol"]


def tls_protocol_class(
    registry: ConnectionRegistry | None,
    *,
    implementation: Literal["auto", "h11", "httptools"] = "auto",
) -> type[asyncio.Protocol]:
    """A protocol class (for ``uvicorn.Config(http=...)``) bound to ``registry``.

    ``"auto"`` picks httptools when it is installed and h11 otherwise, as uvicorn does.
    Each call returns a new subclass, so two listeners can use two registries.
    """
    if implementation == "auto":
        implementation = "httptools" if "httptools" in _PROTOCOL_BASES else "h11"
    try:
        base = _PROTOCOL_BASES[implementation]
    except KeyError:
        raise ValueError(f"HTTP implementation {implementation!r} is not installed") from None
    bound = type(base.__name__, (base,), {"registry": registry, "__module__": __name__})
    return cast("type[asyncio.Protocol]", bound)


# --------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------

#: ``uvicorn.Config`` arguments that :func:`make_server` sets itself or that would bypass it.
_RESERVED_KWARGS = frozenset(
    {
        "app", "host", "port", "uds", "fd", "http", "http2", "ws", "workers", "reload",
        "ssl_keyfile", "ssl_certfile", "ssl_keyfile_password", "ssl_version", "ssl_cert_reqs",
        "ssl_ca_certs", "ssl_ciphers", "ssl_context_factory",
    }
)  # fmt: skip


class ManagedServer(uvicorn.Server):
    """A ``uvicorn.Server`` whose signal handling :func:`serve_many` can take over."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        #: When False the server installs no signal handlers (its owner handles signals).
        self.handle_signals = True
        #: Pre-bound listening sockets (inherited from a supervisor process), if any.
        self.listen_sockets: list[socket.socket] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        await super().serve(sockets=sockets if sockets is not None else self.listen_sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if not self.handle_signals:
            yield
            return
        with super().capture_signals():
            yield

    def bound_ports(self) -> list[int]:
        """TCP ports the server listens on (useful with ``port=0``); empty before startup."""
        ports: list[int] = []
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                ports.append(int(sock.getsockname()[1]))
        return ports


def make_server(
    app: ASGIApp,
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None,
    registry: ConnectionRegistry | None,
    **uvicorn_kwargs: Any,
) -> ManagedServer:
    """A uvicorn server for one listener, using the TLS protocol class and ``ssl_context``.

    ``ssl_context=None`` serves plain HTTP (no TLS extension, nothing registered). Extra
    keyword arguments go to ``uvicorn.Config``; those that would replace the protocol, the TLS
    setup or the process model are rejected. Defaults differ from uvicorn's in three places:
    ``ws="none"`` (forced), ``proxy_headers=False`` (TLS terminates here, so no proxy can be
    trusted to rewrite the client address) and ``timeout_graceful_shutdown=10``.
    """
    reserved = _RESERVED_KWARGS.intersection(uvicorn_kwargs)
    if reserved:
        raise TypeError(f"make_server() does not accept {sorted(reserved)}")
    uvicorn_kwargs.setdefault("proxy_headers", False)
    uvicorn_kwargs.setdefault("timeout_graceful_shutdown", 10)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=tls_protocol_class(registry),
        ws="none",
        ssl_context_factory=None if ssl_context is None else _fixed_context(ssl_context),
        **uvicorn_kwargs,
    )
    return ManagedServer(config)


def _fixed_context(
    context: ssl.SSLContext,
) -> Callable[[uvicorn.Config, Callable[[], ssl.SSLContext]], ssl.SSLContext]:
    def factory(_config: uvicorn.Config, _default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return context

    return factory


_HANDLED_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


async def serve_many(servers: Sequence[uvicorn.Server]) -> None:
    """Run several uvicorn servers on the current event loop until one of them stops.

    The first server to finish (a signal, ``should_exit`` set by the caller, or a startup
    failure such as a port in use) makes all others shut down gracefully; this coroutine
    returns when every server has finished. If the calling thread is the main thread, SIGINT
    and SIGTERM are handled here once for all servers (a second SIGINT forces exit) and, after
    the shutdown, re-raised with the previous handlers restored - as ``uvicorn.Server.serve``
    does. A server that failed makes this coroutine raise its error (``RuntimeError`` for a
    uvicorn startup failure) after the others have stopped. Cancelling it shuts all down too.
    """
    if len({id(server) for server in servers}) != len(servers):
        raise ValueError("the same server was passed twice")
    if not servers:
        return
    for server in servers:
        if isinstance(server, ManagedServer):
            server.handle_signals = False
        elif threading.current_thread() is threading.main_thread():
            raise TypeError("serve_many() in the main thread needs servers from make_server()")

    captured: list[int] = []

    def on_signal(sig: int, _frame: FrameType | None) -> None:
        captured.append(sig)
        for server in servers:
            if server.should_exit and sig == signal.SIGINT:
                server.force_exit = True
            else:
                server.should_exit = True

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in _HANDLED_SIGNALS:
            previous[sig] = signal.signal(sig, on_signal)

    tasks = [
        asyncio.create_task(_serve_one(server), name=f"uvicorn:{server.config.port}")
        for server in servers
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for server in servers:
            server.should_exit = True
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    errors = [result for result in results if isinstance(result, BaseException)]
    for extra in errors[1:]:
        logger.error("another server failed as well", exc_info=extra)
    for captured_sig in reversed(captured):
        signal.raise_signal(captured_sig)
    if errors:
        raise errors[0]


async def _serve_one(server: uvicorn.Server) -> None:
    try:
        await server.serve()
    except SystemExit as exc:
        # uvicorn calls sys.exit() when it cannot bind or the lifespan startup fails; inside
        # a task that would tear down the whole loop and the other servers with it.
        raise RuntimeError(
            f"uvicorn server on {server.config.host}:{server.config.port} failed to start "
            f"(exit code {exc.code})"
        ) from exc
