"""Keep a real Mosquitto 2.0 broker in line with fleettrust's revocations.

Measured facts this module works around (Mosquitto 2.0.11): the broker rereads its ``crlfile``
only on SIGHUP; OpenSSL checks only the leaf's issuer CRL (``X509_V_FLAG_CRL_CHECK``), so the
bundle must hold a CRL of *every* issuing CA (a CA with none refuses all its devices), and revoked
batch/factory CAs must be listed leaf by leaf (the CRL builder does); clients already connected
stay connected when their certificate is revoked.

:func:`configure` writes, into one directory:

* ``mosquitto.conf`` — a TLS listener (``require_certificate``, ``use_identity_as_username``: the
  username is the certificate's CN, the device id), ``cafile`` = root + every CA, ``certfile`` /
  ``keyfile`` = a server certificate issued by the fleet CA (``ServerCredential`` purpose
  ``mqtt``; Mosquitto needs its key unencrypted, so it is a 0600 file only the broker reads),
  ``crlfile`` = ``crl-bundle.pem``, the dynamic-security plugin, an ``acl_file`` and a plain
  listener on 127.0.0.1 for fleettrust's own admin client;
* ``dynamic-security.json`` — one admin client ``fleettrust-admin`` (password in
  ``admin.secret``, 0600) allowed ``$CONTROL/dynamic-security/#`` and to publish the feed;
* ``acl`` — every client may read ``fleettrust/revocations/#`` (a ``pattern`` line: devices are
  not dynamic-security clients - dynsec defers for unknown usernames and the ACL file decides);
  nothing else is granted to devices.

:class:`MosquittoSync` then keeps the broker current (``fleettrust mosquitto sync [--follow]``):
on every new event of the ``revocations`` log it rewrites the CRL bundle (and the CA bundle when a
CA was added), sends SIGHUP (pid from ``pid_file``), and kicks every connected device whose
certificate was revoked or put on hold: dynamic security ``createClient`` + ``deleteClient`` of the
device-id username, sent to ``$CONTROL/dynamic-security/v1`` by the admin client (deleting a client
disconnects every connection with that username, and leaves nothing behind in the dynsec file).
The kick is repeated once after :data:`REKICK_S` to cover a device that reconnected before the
broker finished rereading its CRL. Reconnecting then fails the TLS handshake (certificate
revoked). A released hold needs no broker action: the next CRL no longer lists it.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select

from fleettrust import pki
from fleettrust.errors import ConflictError, ValidationError
from fleettrust.ids import new_id
from fleettrust.revocation.mqtt import BrokerSettings, FileLeader, make_client
from fleettrust.services import audit
from fleettrust.services.auth import Principal
from fleettrust.services.context import ServiceContext
from fleettrust.services.hierarchy import ca_chain, fleet_ca, pem, urls
from fleettrust.storage.models import (
    Certificate,
    CertificateAuthority,
    Revocation,
    ServerCredential,
)

log = logging.getLogger("fleettrust.revocation.mosquitto")

DYNSEC_PLUGIN: Final = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
ADMIN_USER: Final = "fleettrust-admin"
CONTROL_TOPIC: Final = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC: Final = "$CONTROL/dynamic-security/v1/response"
CREDENTIAL_PURPOSE: Final = "mqtt"
RENEW_BEFORE: Final = dt.timedelta(days=30)
REKICK_S: Final = 1.5
RELOAD_GRACE_S: Final = 0.2  # time Mosquitto takes to act on SIGHUP before the kick
KICK_CHUNK: Final = 250  # devices per $CONTROL message
DELTA_CRL_SHARD: Final = -2


@dataclass(frozen=True)
class MosquittoFiles:
    """Where everything lives (one directory per broker)."""

    dir: Path

    @property
    def conf(self) -> Path:
        return self.dir / "mosquitto.conf"

    @property
    def cafile(self) -> Path:
        return self.dir / "ca-bundle.pem"

    @property
    def certfile(self) -> Path:
        return self.dir / "server-chain.pem"

    @property
    def keyfile(self) -> Path:
        return self.dir / "server.key"

    @property
    def crlfile(self) -> Path:
        return self.dir / "crl-bundle.pem"

    @property
    def dynsec(self) -> Path:
        return self.dir / "dynamic-security.json"

    @property
    def acl(self) -> Path:
        return self.dir / "acl"

    @property
    def pidfile(self) -> Path:
        return self.dir / "mosquitto.pid"

    @property
    def admin_secret(self) -> Path:
        return self.dir / "admin.secret"

    @property
    def settings(self) -> Path:
        return self.dir / "fleettrust-mosquitto.json"

    @property
    def state(self) -> Path:
        return self.dir / "fleettrust-sync-state.json"


@dataclass(frozen=True)
class MosquittoOptions:
    tls_port: int = 8883
    tls_host: str = ""  # "" = every interface
    admin_port: int = 1884  # plain listener on 127.0.0.1 for fleettrust's admin client
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ("127.0.0.1",)
    user: str | None = None  # `user` option (Mosquitto drops root privileges to it)
    persistence: bool = True
    plugin: str = DYNSEC_PLUGIN

    def __post_init__(self) -> None:
        for p in (self.tls_port, self.admin_port):
            if not 0 < p < 65536:
                raise ValidationError(f"port out of range: {p}")
        if self.tls_port == self.admin_port:
            raise ValidationError("the TLS and admin ports must differ")
        if not self.dns_names and not self.ip_addresses:
            raise ValidationError("the broker certificate needs a DNS name or an IP address")


@dataclass(frozen=True)
class MosquittoSetup:
    files: MosquittoFiles
    options: MosquittoOptions
    admin_password: str = ""

    def admin_broker(self) -> BrokerSettings:
        return BrokerSettings("127.0.0.1", self.options.admin_port, ADMIN_USER,
                              self.admin_password)

    @classmethod
    def load(cls, directory: Path) -> MosquittoSetup:
        files = MosquittoFiles(Path(directory))
        try:
            raw = json.loads(files.settings.read_text())
        except FileNotFoundError as exc:
            raise ConflictError(f"{directory} has no fleettrust Mosquitto configuration; run "
                                "`fleettrust mosquitto configure` first",
                                code="mosquitto_not_configured") from exc
        opts = MosquittoOptions(**{**raw, "dns_names": tuple(raw["dns_names"]),
                                   "ip_addresses": tuple(raw["ip_addresses"])})
        return cls(files, opts, files.admin_secret.read_text().strip())


def _write(path: Path, data: str | bytes, mode: int = 0o644) -> bool:
    """Atomic write; returns ``False`` (and writes nothing) if the content is unchanged."""
    raw = data.encode() if isinstance(data, str) else data
    with contextlib.suppress(FileNotFoundError):
        if path.read_bytes() == raw:
            return False
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(raw)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


# --- PKI material ---------------------------------------------------------------------------------


def ca_bundle_pem(ctx: ServiceContext) -> str:
    """Root and every CA certificate with one (active or revoked: Mosquitto must be able to
    build the chain of a revoked device to see it revoked)."""
    with ctx.sessions() as s:
        rows = s.execute(select(CertificateAuthority.id, CertificateAuthority.certificate_der)
                         .where(CertificateAuthority.certificate_der.is_not(None))
                         .order_by(CertificateAuthority.created_at, CertificateAuthority.id)).all()
    return "".join(pem(x509.load_der_x509_certificate(der)) for _, der in rows if der)


def _crl_pem(der: bytes) -> str:
    b64 = base64.b64encode(der).decode()
    body = "\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    return f"-----BEGIN X509 CRL-----\n{body}\n-----END X509 CRL-----\n"


def stored_crls(ctx: ServiceContext) -> tuple[list[bytes], set[str]]:
    """(DER of every published complete CRL - each shard and the CA-level one, no delta CRLs -,
    the ids of the CAs they cover), from the CRL publisher's ``crl_documents`` table."""
    from fleettrust.revocation.models import CrlDocument

    with ctx.sessions() as s:
        rows = s.execute(select(CrlDocument.ca_id, CrlDocument.der)
                         .where(CrlDocument.kind == "full")
                         .order_by(CrlDocument.ca_id, CrlDocument.shard)).all()
    return [r[1] for r in rows], {r[0] for r in rows}


def crl_serials(ders: Iterable[bytes]) -> set[int]:
    """Every serial listed by the CRLs (for checking that they cover the new events)."""
    out: set[int] = set()
    for der in ders:
        out.update(r.serial_number for r in x509.load_der_x509_crl(der))
    return out


def issuing_ca_ids(ctx: ServiceContext) -> set[str]:
    """CAs that issue certificates Mosquitto may see (everything but the offline root)."""
    with ctx.sessions() as s:
        return set(s.scalars(select(CertificateAuthority.id).where(
            CertificateAuthority.kind != "root",
            CertificateAuthority.certificate_der.is_not(None))))


CrlSource = Callable[[ServiceContext], tuple[list[bytes], set[str]]]


def _default_crl_source(ctx: ServiceContext) -> tuple[list[bytes], set[str]]:
    return stored_crls(ctx)


def ensure_mqtt_credential(ctx: ServiceContext, files: MosquittoFiles,
                           options: MosquittoOptions) -> x509.Certificate:
    """Reuse or issue the broker's TLS server certificate (fleet CA, server profile, 397 days)
    and write ``server-chain.pem`` and ``server.key``."""
    now = ctx.clock.now()
    names = {"dns": sorted(options.dns_names), "ip": sorted(options.ip_addresses),
             "key": str(files.keyfile)}
    with ctx.transaction() as s:
        current = s.scalars(select(ServerCredential)
                            .where(ServerCredential.purpose == CREDENTIAL_PURPOSE)
                            .order_by(ServerCredential.created_at.desc())).first()
        key_ok = files.keyfile.exists()
        if (current is None or current.names != names or not key_ok
                or current.not_after - now < RENEW_BEFORE):
            fca = fleet_ca(s)
            assert fca.key_id is not None
            assert fca.certificate_der is not None
            key = ec.generate_private_key(ec.SECP256R1())
            u = urls(ctx, fca.id)
            serial = pki.new_serial()
            cert = pki.issue_server_certificate(
                ctx.signer(fca.key_id), x509.load_der_x509_certificate(fca.certificate_der),
                key.public_key(), dns_names=list(options.dns_names),
                ip_addresses=[ipaddress.ip_address(i) for i in options.ip_addresses],
                organization=ctx.settings.organization, serial=serial, now=now,
                validity_days=397, crl_url=u["crl"], ocsp_url=u["ocsp"],
                ca_issuers_url=u["ca_issuers"])
            der = cert.public_bytes(serialization.Encoding.DER)
            _write(files.keyfile, key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()), 0o600)
            current = ServerCredential(id=new_id("srv"), purpose=CREDENTIAL_PURPOSE,
                                       key_id=f"file:{files.keyfile}", certificate_der=der,
                                       names=names, not_after=cert.not_valid_after_utc,
                                       created_at=now)
            s.add(current)
            s.add(Certificate(
                serial_hex=format(serial, "x"), ca_id=fca.id, kind="server", device_id=None,
                subject_ca_id=None, der=der,
                public_key_sha256=pki.public_key_fingerprint(key.public_key()),
                not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
                status="good", revoked_at=None, revocation_reason=None, created_at=now))
            audit.record(s, Principal("-", "system", "fleettrust"), "mqtt.certificate",
                         "server", current.id, now, serial=format(serial, "x"), names=names)
        leaf = x509.load_der_x509_certificate(current.certificate_der)
        chain = ca_chain(s, fleet_ca(s).id)
    _write(files.certfile, pem(leaf) + "".join(pem(c) for c in chain[:-1]))
    return leaf


# --- configuration files ------------------------------------------------------------------------


def dynsec_password_entry(password: str) -> dict[str, Any]:
    """Mosquitto dynamic-security password fields (PBKDF2-SHA512, 101 iterations, as
    ``mosquitto_ctrl dynsec init`` writes them)."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return {"salt": base64.b64encode(salt).decode(),
            "password": base64.b64encode(digest).decode(), "iterations": 101}


def dynsec_document(admin_password: str) -> dict[str, Any]:
    acl = [{"acltype": t, "topic": topic, "allow": True} for t, topic in (
        ("publishClientSend", "$CONTROL/dynamic-security/#"),
        ("publishClientReceive", "$CONTROL/dynamic-security/#"),
        ("subscribePattern", "$CONTROL/dynamic-security/#"),
        ("publishClientSend", "fleettrust/#"),
        ("publishClientReceive", "fleettrust/#"),
        ("subscribePattern", "fleettrust/#"),
        ("unsubscribePattern", "#"),
    )]
    return {
        "clients": [{"username": ADMIN_USER, "textName": "fleettrust revocation sync",
                     **dynsec_password_entry(admin_password),
                     "roles": [{"rolename": "fleettrust-admin"}]}],
        "roles": [{"rolename": "fleettrust-admin", "acls": acl}],
        "groups": [],
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": True,
                             "subscribe": False, "unsubscribe": True},
    }


ACL_TEXT: Final = """\
# written by fleettrust: devices (any client) may read the revocation feed, nothing else.
pattern read fleettrust/revocations/#
user fleettrust-admin
topic readwrite $CONTROL/dynamic-security/#
topic readwrite fleettrust/#
"""


def config_text(files: MosquittoFiles, options: MosquittoOptions) -> str:
    d = files.dir
    lines = [
        "# written by `fleettrust mosquitto configure`; run it again rather than editing.",
        "per_listener_settings false",
        f"persistence {'true' if options.persistence else 'false'}",
        f"persistence_location {d / 'data'}/",
        f"pid_file {files.pidfile}",
        "log_dest stderr",
        "connection_messages true",
    ]
    if options.user:
        lines.append(f"user {options.user}")
    lines += [
        f"plugin {options.plugin}",
        f"plugin_opt_config_file {files.dynsec}",
        f"acl_file {files.acl}",
        "",
        "# devices: mutual TLS; the certificate CN (the device id) is the username",
        f"listener {options.tls_port} {options.tls_host}".rstrip(),
        "protocol mqtt",
        f"cafile {files.cafile}",
        f"certfile {files.certfile}",
        f"keyfile {files.keyfile}",
        f"crlfile {files.crlfile}",
        "require_certificate true",
        "use_identity_as_username true",
        "tls_version tlsv1.2",
        "",
        "# fleettrust's own admin client (dynamic-security password), loopback only",
        f"listener {options.admin_port} 127.0.0.1",
        "protocol mqtt",
        "",
    ]
    return "\n".join(lines)


def configure(ctx: ServiceContext, directory: Path, options: MosquittoOptions, *,
              crl_source: CrlSource | None = None) -> MosquittoSetup:
    """Write (or refresh) everything a broker in ``directory`` needs. Idempotent: the admin
    password and dynamic-security file are kept when they exist."""
    files = MosquittoFiles(Path(directory).resolve())
    files.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (files.dir / "data").mkdir(exist_ok=True, mode=0o700)
    if files.admin_secret.exists():
        password = files.admin_secret.read_text().strip()
    else:
        password = secrets.token_urlsafe(24)
        _write(files.admin_secret, password + "\n", 0o600)
    if not files.dynsec.exists():
        _write(files.dynsec, json.dumps(dynsec_document(password), indent=1), 0o600)
    _write(files.acl, ACL_TEXT, 0o644)
    ensure_mqtt_credential(ctx, files, options)
    _write(files.cafile, ca_bundle_pem(ctx))
    write_crl_bundle(ctx, files, crl_source or _default_crl_source)
    settings = {"tls_port": options.tls_port, "tls_host": options.tls_host,
                "admin_port": options.admin_port, "dns_names": list(options.dns_names),
                "ip_addresses": list(options.ip_addresses), "user": options.user,
                "persistence": options.persistence, "plugin": options.plugin}
    _write(files.settings, json.dumps(settings, indent=1))
    _write(files.conf, config_text(files, options))
    if options.user:
        _chown_for_broker(files, options.user)
    return MosquittoSetup(files, options, password)


def _chown_for_broker(files: MosquittoFiles, user: str) -> None:
    """Let the broker's user read its key and rewrite the dynsec file (root runs configure)."""
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        log.warning("user %s does not exist; file ownership left as is", user)
        return
    if os.geteuid() != 0:
        return
    for p in (files.dir, files.dir / "data", files.keyfile, files.dynsec):
        os.chown(p, pw.pw_uid, pw.pw_gid)


def write_crl_bundle(ctx: ServiceContext, files: MosquittoFiles,
                     crl_source: CrlSource) -> bool:
    """Rewrite ``crl-bundle.pem``; returns whether it changed."""
    ders, covered_cas = crl_source(ctx)
    missing = issuing_ca_ids(ctx) - covered_cas
    if missing:
        log.warning("no CRL for CA(s) %s yet: Mosquitto refuses their devices until one is "
                    "published", ", ".join(sorted(missing)))
    return _write(files.crlfile, "".join(_crl_pem(d) for d in ders))


# --- dynamic security admin -----------------------------------------------------------------------


class DynsecError(RuntimeError):
    pass


class DynsecAdmin:
    """Sends dynamic-security commands as the admin client and waits for each reply."""

    def __init__(self, broker: BrokerSettings) -> None:
        self.client = make_client(broker, f"fleettrust-dynsec-{os.getpid()}")
        self._cond = threading.Condition()
        self._replies: dict[str, list[dict[str, Any]]] = {}
        self._subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, broker.keepalive)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise DynsecError(f"could not subscribe to {RESPONSE_TOPIC} on "
                              f"{broker.host}:{broker.port} (admin credentials?)")

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if not rc.is_failure:
            client.subscribe(RESPONSE_TOPIC, qos=1)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            responses = json.loads(msg.payload)["responses"]
        except (ValueError, KeyError):
            return
        with self._cond:
            for r in responses:
                cid = str(r.get("correlationData", ""))
                self._replies.setdefault(cid, []).append(r)
            self._cond.notify_all()

    def run(self, commands: Sequence[dict[str, Any]], timeout: float = 30.0
            ) -> list[dict[str, Any]]:
        """Send ``commands`` in one message; returns one reply per command (in order)."""
        cid = uuid.uuid4().hex
        payload = {"commands": [{**c, "correlationData": cid} for c in commands]}
        info = self.client.publish(CONTROL_TOPIC, json.dumps(payload), qos=1)
        info.wait_for_publish(timeout)
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._replies.get(cid, [])) < len(commands):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DynsecError("dynamic-security did not answer in time")
                self._cond.wait(left)
            return self._replies.pop(cid)

    def kick(self, usernames: Iterable[str]) -> int:
        """Disconnect every connection of each username (createClient + deleteClient)."""
        names = sorted(set(usernames))
        for i in range(0, len(names), KICK_CHUNK):
            chunk = names[i:i + KICK_CHUNK]
            cmds: list[dict[str, Any]] = []
            for u in chunk:
                cmds.append({"command": "createClient", "username": u,
                             "password": secrets.token_urlsafe(18)})
                cmds.append({"command": "deleteClient", "username": u})
            for reply in self.run(cmds):
                err = reply.get("error")
                if err and not (reply.get("command") == "createClient"
                                and "already exists" in str(err)):
                    raise DynsecError(f"{reply.get('command')}: {err}")
        return len(names)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
            self.client.loop_stop()


# --- keeping the broker current -------------------------------------------------------------------


@dataclass
class SyncReport:
    reloaded: bool
    kicked: list[str]
    seq: int


class MosquittoSync:
    """Follows the revocation log and applies it to one broker (see the module docstring)."""

    def __init__(self, ctx: ServiceContext, directory: Path, *, pid: int | None = None,
                 crl_source: CrlSource | None = None, poll_s: float = 0.1,
                 crl_wait_s: float = 10.0) -> None:
        self.ctx = ctx
        self.setup = MosquittoSetup.load(Path(directory).resolve())
        self.files = self.setup.files
        self._pid = pid
        self.crl_source = crl_source or _default_crl_source
        self.poll_s = poll_s
        self.crl_wait_s = crl_wait_s
        self.last_seq = self._load_state()
        self._admin: DynsecAdmin | None = None
        self._rekick: list[tuple[float, list[str]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.leader = FileLeader(self.files.dir / "sync.lock")
        self.reports: list[SyncReport] = []

    # --- state ---------------------------------------------------------------------------

    def _load_state(self) -> int:
        try:
            return int(json.loads(self.files.state.read_text())["last_seq"])
        except (FileNotFoundError, ValueError, KeyError):
            with self.ctx.sessions() as s:  # first run: CRLs cover the past, no kicks due
                from fleettrust.revocation.feed import head_seq

                return head_seq(s)

    def _save_state(self) -> None:
        _write(self.files.state, json.dumps({"last_seq": self.last_seq}), 0o600)

    def pid(self) -> int | None:
        if self._pid is not None:
            return self._pid
        try:
            return int(self.files.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def reload_broker(self) -> bool:
        pid = self.pid()
        if pid is None:
            log.warning("no Mosquitto pid (%s): CRL written but not reloaded", self.files.pidfile)
            return False
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            log.warning("Mosquitto pid %d is not running", pid)
            return False
        return True

    def admin(self) -> DynsecAdmin:
        if self._admin is None:
            self._admin = DynsecAdmin(self.setup.admin_broker())
        return self._admin

    # --- one pass ------------------------------------------------------------------------

    def _new_events(self) -> list[tuple[int, str | None, str, str, str]]:
        with self.ctx.sessions() as s:
            return [(int(r[0]), r[1], r[2], r[3], r[4]) for r in s.execute(
                select(Revocation.seq, Revocation.device_id, Revocation.action,
                       Revocation.serial_hex, Revocation.kind)
                .where(Revocation.seq > self.last_seq).order_by(Revocation.seq).limit(200_000))]

    def _wait_for_crls(self, events: Sequence[tuple[int, str | None, str, str, str]]) -> None:
        """Wait (bounded) until the published CRLs list every device certificate the events
        revoke or hold (the CRL publisher regenerates them on every revocation)."""
        state: dict[int, bool] = {}
        for _, _, action, serial_hex, kind in events:
            if kind == "device":
                state[int(serial_hex, 16)] = action != "release"
        wanted = {s for s, listed in state.items() if listed}
        deadline = time.monotonic() + self.crl_wait_s
        while wanted:
            missing = wanted - crl_serials(self.crl_source(self.ctx)[0])
            if not missing:
                return
            if time.monotonic() >= deadline:
                log.warning("%d revoked certificate(s) not on the published CRLs after %.0f s;"
                            " reloading anyway", len(missing), self.crl_wait_s)
                return
            time.sleep(0.05)

    def sync_once(self, *, force_reload: bool = False) -> SyncReport:
        events = self._new_events()
        target = events[-1][0] if events else self.last_seq
        if events:
            self._wait_for_crls(events)
        ca_changed = _write(self.files.cafile, ca_bundle_pem(self.ctx))
        crl_changed = write_crl_bundle(self.ctx, self.files, self.crl_source)
        reloaded = False
        if crl_changed or ca_changed or force_reload:
            reloaded = self.reload_broker()
        kick = sorted({d for _, d, action, _, _ in events if d and action in ("revoke", "hold")})
        if kick:
            if reloaded:
                time.sleep(RELOAD_GRACE_S)
            self.admin().kick(kick)
            self._rekick.append((time.monotonic() + REKICK_S, kick))
            log.info("kicked %d revoked device(s) off the broker", len(kick))
        self.last_seq = target
        self._save_state()
        report = SyncReport(reloaded, kick, target)
        if events:
            self.reports.append(report)
        return report

    def _due_rekicks(self) -> None:
        now = time.monotonic()
        due = [names for t, names in self._rekick if t <= now]
        self._rekick = [(t, n) for t, n in self._rekick if t > now]
        for names in due:
            self.admin().kick(names)

    # --- follow --------------------------------------------------------------------------

    def start(self) -> MosquittoSync:
        self._thread = threading.Thread(target=self.follow, name="mosquitto-sync", daemon=True)
        self._thread.start()
        return self

    def follow(self) -> None:
        """Apply every new revocation until :meth:`stop` (one follower per broker directory)."""
        while not self._stop.is_set() and not self.leader.try_acquire():
            self._stop.wait(1.0)
        try:
            while not self._stop.is_set():
                try:
                    self.sync_once()
                    self._due_rekicks()
                except Exception:
                    log.exception("Mosquitto sync failed; retrying")
                    self._close_admin()
                    self._stop.wait(1.0)
                self._stop.wait(self.poll_s)
        finally:
            self.leader.release()
            self._close_admin()

    def _close_admin(self) -> None:
        if self._admin is not None:
            self._admin.close()
            self._admin = None

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._close_admin()
