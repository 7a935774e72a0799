"""The agent's local state: ``state.json`` plus the identity files it points at.

Layout of a state directory (mode 0700)::

    state.json              the only mutable file; replaced atomically on every write
    key-<tag>.pem           device key, unencrypted PKCS#8, 0600 (absent in PKCS#11 mode)
    cert-<tag>.pem          device certificate followed by its issuing chain (what TLS sends)
    chain-<tag>.pem         the issuing chain alone (issuing CA first, root excluded)
    root-<tag>.pem          the pinned fleet root: the agent's ONLY trust anchor
    enroll-request.json     {csr, manifest} for the factory station (enrollment only)
    agent.lock              flock(2) held by the one process allowed to write

``<tag>`` is 16 random hex digits shared by one identity's files. Files are never rewritten in
place: a new identity (installation, renewal) is written under a new tag — each file atomically
(temp file in the same directory, fsync, ``os.replace``, directory fsync) — and only then does
ONE atomic replacement of ``state.json`` switch key and certificate together. Files no state
points at are removed afterwards (:meth:`StateStore.cleanup`). A SIGKILL or power cut at any
instant therefore leaves either the old or the new consistent identity, never a mix; at worst
some unreferenced files, which the next writer removes.

``generation`` increases by one on every write (the check-in reports it); :meth:`StateStore.save`
refuses to write if the file on disk is not at the generation the caller read (``state_conflict``).

Loading (:meth:`StateStore.load`) validates precisely and raises :class:`StateError` with a stable
``code``: ``state_missing``, ``state_corrupt`` (not JSON), ``state_schema_invalid`` (field named),
``state_file_missing``, ``state_file_invalid``, ``state_key_mismatch`` (certificate is not for
the key), ``state_chain_invalid`` (certificate does not chain to the pinned root),
``state_root_mismatch`` (root file is not the pinned root), ``state_locked``, ``state_conflict``.

Not here: deciding *when* to renew or check in (``runner``), networking, manifest gathering.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import errno
import fcntl
import json
import os
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleettrust.agent.identity import (
    DeviceKey,
    FileDeviceKey,
    TokenDeviceKey,
    atomic_write_bytes,
    fsync_directory,
    public_key_matches,
)
from fleettrust.errors import FleetTrustError, KeyStoreError, ValidationError
from fleettrust.pki.chain import fingerprint_sha256, verify_chain

__all__ = [
    "ENROLL_REQUEST_FILE",
    "STATE_FILE",
    "STATE_FORMAT",
    "STATE_VERSION",
    "AgentState",
    "CheckinRecord",
    "Identity",
    "KeyRef",
    "RenewalInfo",
    "StateError",
    "StateStore",
    "certificates_pem",
    "check_chain",
    "format_time",
    "load_token_key",
    "new_state",
    "parse_time",
    "verification_time",
]

STATE_FILE: Final = "state.json"
LOCK_FILE: Final = "agent.lock"
ENROLL_REQUEST_FILE: Final = "enroll-request.json"
STATE_FORMAT: Final = "fleettrust-agent-state"
STATE_VERSION: Final = 1
STATE_MAX_BYTES: Final = 256 * 1024
_IDENTITY_FILE_RE: Final = re.compile(r"^(key|cert|chain|root)-[0-9a-f]{16}\.pem$")
_TMP_PREFIX: Final = ".tmp-"

Phase = Literal["enrolling", "enrolled"]
Outcome = Literal["ok", "refused", "error"]


class StateError(FleetTrustError):
    """The agent state is missing, corrupt or inconsistent (see module docstring for codes)."""

    status = 500
    code = "state_invalid"


# --- time helpers -------------------------------------------------------------------------------


def format_time(moment: dt.datetime) -> str:
    """RFC 3339 UTC with a ``Z`` suffix, second precision."""
    if moment.tzinfo is None:
        raise ValueError("datetime must be timezone-aware")
    return moment.astimezone(dt.UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> dt.datetime:
    """Parse RFC 3339 (``Z`` or offset); ValueError if malformed or without a zone."""
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    return value.astimezone(dt.UTC)


# --- the state document -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyRef:
    """Where the device key is: a file in the state directory, or a PKCS#11 token object."""

    kind: Literal["file", "pkcs11"]
    file: str | None = None
    key_id: str | None = None
    module: str | None = None
    token_label: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.kind == "file":
            return {"kind": "file", "file": self.file}
        return {"kind": "pkcs11", "key_id": self.key_id, "module": self.module,
                "token_label": self.token_label}


@dataclass(frozen=True, slots=True)
class CheckinRecord:
    """Outcome of the last check-in attempt."""

    at: str
    outcome: Outcome
    http_status: int | None = None
    code: str | None = None
    detail: str | None = None
    device_status: str | None = None
    next_checkin_s: int | None = None
    server_time: str | None = None


@dataclass(frozen=True, slots=True)
class RenewalInfo:
    """Renewal bookkeeping."""

    count: int = 0
    last_renewed_at: str | None = None
    last_attempt_at: str | None = None
    last_error: str | None = None
    consecutive_failures: int = 0
    next_attempt_at: str | None = None
    previous_serial: str | None = None


@dataclass(frozen=True, slots=True)
class AgentState:
    """One version of ``state.json``. Immutable: derive new versions with :meth:`evolve`."""

    generation: int
    phase: Phase
    key: KeyRef
    manifest: dict[str, Any]
    created_at: str
    updated_at: str
    manifest_override_file: str | None = None
    device_id: str | None = None
    certificate_file: str | None = None
    chain_file: str | None = None
    root_file: str | None = None
    certificate_serial: str | None = None
    certificate_not_after: str | None = None
    root_fingerprint: str | None = None
    gateway_url: str | None = None
    operator_url: str | None = None
    boot_counter: int = 0
    checkins_ok: int = 0
    last_checkin: CheckinRecord | None = None
    renewal: RenewalInfo = field(default_factory=RenewalInfo)

    def evolve(self, **changes: Any) -> AgentState:
        return dataclasses.replace(self, **changes)

    def referenced_files(self) -> set[str]:
        names = {self.certificate_file, self.chain_file, self.root_file}
        if self.key.kind == "file":
            names.add(self.key.file)
        return {n for n in names if n is not None}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "generation": self.generation,
            "phase": self.phase,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "device_id": self.device_id,
            "key": self.key.to_json(),
            "certificate_file": self.certificate_file,
            "chain_file": self.chain_file,
            "root_file": self.root_file,
            "certificate_serial": self.certificate_serial,
            "certificate_not_after": self.certificate_not_after,
            "root_fingerprint": self.root_fingerprint,
            "gateway_url": self.gateway_url,
            "operator_url": self.operator_url,
            "manifest": self.manifest,
            "manifest_override_file": self.manifest_override_file,
            "boot_counter": self.boot_counter,
            "checkins_ok": self.checkins_ok,
            "last_checkin": (
                None if self.last_checkin is None else dataclasses.asdict(self.last_checkin)
            ),
            "renewal": dataclasses.asdict(self.renewal),
        }

    @classmethod
    def from_json(cls, doc: object, *, source: str = STATE_FILE) -> AgentState:
        """Strict schema check of a decoded ``state.json`` (StateError ``state_schema_invalid``)."""
        r = _Reader(doc, source)
        if r.req_str("format") != STATE_FORMAT:
            raise r.fail("format", f"must be {STATE_FORMAT!r}")
        version = r.req_int("version")
        if version != STATE_VERSION:
            raise r.fail("version", f"is {version}; this agent understands {STATE_VERSION}")
        phase = r.req_str("phase")
        if phase not in ("enrolling", "enrolled"):
            raise r.fail("phase", "must be 'enrolling' or 'enrolled'")
        key_doc = r.req_obj("key")
        kr = _Reader(key_doc, source, "key.")
        kind = kr.req_str("kind")
        if kind == "file":
            key = KeyRef(kind="file", file=kr.req_file("file", "key"))
            kr.only({"kind", "file"})
        elif kind == "pkcs11":
            key = KeyRef(kind="pkcs11", key_id=kr.req_str("key_id"), module=kr.req_str("module"),
                         token_label=kr.req_str("token_label"))
            kr.only({"kind", "key_id", "module", "token_label"})
        else:
            raise kr.fail("kind", "must be 'file' or 'pkcs11'")
        last = r.opt_obj("last_checkin")
        last_checkin: CheckinRecord | None = None
        if last is not None:
            lr = _Reader(last, source, "last_checkin.")
            outcome = lr.req_str("outcome")
            if outcome not in ("ok", "refused", "error"):
                raise lr.fail("outcome", "must be 'ok', 'refused' or 'error'")
            last_checkin = CheckinRecord(
                at=lr.req_time("at"), outcome=outcome,  # type: ignore[arg-type]
                http_status=lr.opt_int("http_status"), code=lr.opt_str("code"),
                detail=lr.opt_str("detail"), device_status=lr.opt_str("device_status"),
                next_checkin_s=lr.opt_int("next_checkin_s"),
                server_time=lr.opt_str("server_time"),
            )
            lr.only({f.name for f in dataclasses.fields(CheckinRecord)})
        ren = _Reader(r.req_obj("renewal"), source, "renewal.")
        renewal = RenewalInfo(
            count=ren.req_int("count"),
            last_renewed_at=ren.opt_time("last_renewed_at"),
            last_attempt_at=ren.opt_time("last_attempt_at"),
            last_error=ren.opt_str("last_error"),
            consecutive_failures=ren.req_int("consecutive_failures"),
            next_attempt_at=ren.opt_time("next_attempt_at"),
            previous_serial=ren.opt_str("previous_serial"),
        )
        ren.only({f.name for f in dataclasses.fields(RenewalInfo)})
        state = cls(
            generation=r.req_int("generation"),
            phase=phase,  # type: ignore[arg-type]
            key=key,
            manifest=r.req_obj("manifest"),
            created_at=r.req_time("created_at"),
            updated_at=r.req_time("updated_at"),
            manifest_override_file=r.opt_str("manifest_override_file"),
            device_id=r.opt_str("device_id"),
            certificate_file=r.opt_file("certificate_file", "cert"),
            chain_file=r.opt_file("chain_file", "chain"),
            root_file=r.opt_file("root_file", "root"),
            certificate_serial=r.opt_str("certificate_serial"),
            certificate_not_after=r.opt_time("certificate_not_after"),
            root_fingerprint=r.opt_str("root_fingerprint"),
            gateway_url=r.opt_str("gateway_url"),
            operator_url=r.opt_str("operator_url"),
            boot_counter=r.req_int("boot_counter"),
            checkins_ok=r.req_int("checkins_ok"),
            last_checkin=last_checkin,
            renewal=renewal,
        )
        r.only({"format", "version", "generation", "phase", "created_at", "updated_at",
                "device_id", "key", "certificate_file", "chain_file", "root_file",
                "certificate_serial", "certificate_not_after", "root_fingerprint",
                "gateway_url", "operator_url", "manifest", "manifest_override_file",
                "boot_counter", "checkins_ok", "last_checkin", "renewal"})
        if state.phase == "enrolled":
            for name in ("device_id", "certificate_file", "chain_file", "root_file",
                         "certificate_serial", "certificate_not_after", "root_fingerprint"):
                if getattr(state, name) is None:
                    raise r.fail(name, "is required once the device is enrolled")
        return state


class _Reader:
    """Typed field access with precise ``state_schema_invalid`` errors."""

    def __init__(self, doc: object, source: str, prefix: str = "") -> None:
        if not isinstance(doc, dict):
            raise StateError(
                f"{source}: {prefix.rstrip('.') or 'document'} must be a JSON object",
                code="state_schema_invalid",
            )
        self.doc: dict[str, Any] = doc
        self.source = source
        self.prefix = prefix

    def fail(self, name: str, message: str) -> StateError:
        return StateError(
            f"{self.source}: field {self.prefix}{name!s} {message}",
            code="state_schema_invalid",
            field=f"{self.prefix}{name}",
        )

    def only(self, allowed: set[str]) -> None:
        extra = sorted(set(self.doc) - allowed)
        if extra:
            raise self.fail(extra[0], "is not a known field")

    def _get(self, name: str, required: bool) -> Any:
        if name not in self.doc:
            if required:
                raise self.fail(name, "is missing")
            return None
        return self.doc[name]

    def req_str(self, name: str) -> str:
        value = self._get(name, True)
        if not isinstance(value, str) or not value:
            raise self.fail(name, "must be a non-empty string")
        return value

    def opt_str(self, name: str) -> str | None:
        value = self._get(name, False)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(name, "must be a non-empty string or null")
        return value

    def req_int(self, name: str) -> int:
        value = self._get(name, True)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
            raise self.fail(name, "must be an integer in 0..2^53")
        return value

    def opt_int(self, name: str) -> int | None:
        if self._get(name, False) is None:
            return None
        return self.req_int(name)

    def req_obj(self, name: str) -> dict[str, Any]:
        value = self._get(name, True)
        if not isinstance(value, dict):
            raise self.fail(name, "must be a JSON object")
        return value

    def opt_obj(self, name: str) -> dict[str, Any] | None:
        if self._get(name, False) is None:
            return None
        return self.req_obj(name)

    def req_time(self, name: str) -> str:
        value = self.req_str(name)
        try:
            parse_time(value)
        except ValueError:
            raise self.fail(name, "must be an RFC 3339 time with zone") from None
        return value

    def opt_time(self, name: str) -> str | None:
        if self._get(name, False) is None:
            return None
        return self.req_time(name)

    def req_file(self, name: str, kind: str) -> str:
        value = self.req_str(name)
        match = _IDENTITY_FILE_RE.fullmatch(value)
        if match is None or match.group(1) != kind:
            raise self.fail(name, f"must be a file name '{kind}-<16 hex>.pem', got {value!r}")
        return value

    def opt_file(self, name: str, kind: str) -> str | None:
        if self._get(name, False) is None:
            return None
        return self.req_file(name, kind)


# --- a loaded, validated identity ---------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """The validated state together with its key and (once enrolled) certificates."""

    state: AgentState
    directory: Path
    key: DeviceKey
    certificate: x509.Certificate | None = None
    chain: tuple[x509.Certificate, ...] = ()
    root: x509.Certificate | None = None

    def path(self, name: str | None) -> Path:
        if name is None:
            raise StateError("identity file not set in state", code="state_file_missing")
        return self.directory / name

    @property
    def certificate_path(self) -> Path:
        """Leaf + chain PEM, as the TLS client presents it."""
        return self.path(self.state.certificate_file)

    @property
    def root_path(self) -> Path:
        return self.path(self.state.root_file)

    @property
    def key_path(self) -> Path | None:
        return self.path(self.state.key.file) if self.state.key.kind == "file" else None

    def not_after(self) -> dt.datetime:
        if self.certificate is None:
            raise StateError("device is not enrolled yet", code="not_enrolled")
        return self.certificate.not_valid_after_utc


def _pem_certificates(path: Path, what: str) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StateError(f"{what} file {path} is missing", code="state_file_missing") from None
    except OSError as exc:
        raise StateError(
            f"cannot read {what} file {path}: {exc.strerror}", code="state_file_invalid"
        ) from exc
    try:
        certs = x509.load_pem_x509_certificates(data) if data.strip() else []
    except ValueError as exc:
        raise StateError(
            f"{what} file {path} is not valid PEM certificates: {exc}", code="state_file_invalid"
        ) from exc
    return certs


def certificates_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def verification_time(leaf: x509.Certificate, now: dt.datetime) -> dt.datetime:
    """``now`` clamped into the leaf's validity: structural checks must not depend on a device
    clock that may be wrong at boot (expiry is the renewal logic's business)."""
    return min(max(now, leaf.not_valid_before_utc), leaf.not_valid_after_utc)


def check_chain(
    leaf: x509.Certificate,
    chain: Sequence[x509.Certificate],
    root: x509.Certificate,
    now: dt.datetime,
) -> None:
    """StateError ``state_chain_invalid`` unless ``leaf`` chains through ``chain`` to ``root``."""
    try:
        verify_chain(leaf, list(chain), root, now=verification_time(leaf, now))
    except ValidationError as exc:
        raise StateError(
            f"device certificate does not chain to the pinned root: {exc.message}",
            code="state_chain_invalid",
        ) from exc


# --- the store ----------------------------------------------------------------------------------


class StateStore:
    """Reads, validates and atomically writes one agent state directory.

    ``durable=False`` skips fsync (simulated devices only; still atomic against process kills).
    """

    def __init__(self, directory: Path, *, durable: bool = True) -> None:
        self.directory = Path(directory)
        self.durable = durable
        self._lock_fd: int | None = None

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    def ensure_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)

    def exists(self) -> bool:
        return self.state_path.exists()

    # -- locking

    def acquire_lock(self) -> None:
        """Take the writer lock (non-blocking); StateError ``state_locked`` if held elsewhere."""
        if self._lock_fd is not None:
            return
        self.ensure_directory()
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StateError(
                    f"another agent process holds {self.directory / LOCK_FILE}",
                    code="state_locked",
                ) from None
            raise
        self._lock_fd = fd

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextlib.contextmanager
    def locked(self) -> Iterator[StateStore]:
        self.acquire_lock()
        try:
            yield self
        finally:
            self.release_lock()

    # -- reading

    def read(self) -> AgentState:
        """Parse and schema-check ``state.json`` (no file or key checks)."""
        try:
            with open(self.state_path, "rb") as handle:
                data = handle.read(STATE_MAX_BYTES + 1)
        except FileNotFoundError:
            raise StateError(
                f"no agent state in {self.directory} ({STATE_FILE} missing): enroll first",
                code="state_missing",
            ) from None
        except OSError as exc:
            raise StateError(
                f"cannot read {self.state_path}: {exc.strerror}", code="state_corrupt"
            ) from exc
        if len(data) > STATE_MAX_BYTES:
            raise StateError(f"{self.state_path} is larger than {STATE_MAX_BYTES} bytes",
                             code="state_corrupt")
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise StateError(f"{self.state_path} is not valid JSON: {exc}",
                             code="state_corrupt") from exc
        return AgentState.from_json(doc, source=str(self.state_path))

    def load(
        self,
        *,
        pkcs11_pin: str | None = None,
        now: dt.datetime | None = None,
        verify_chain_to_root: bool = True,
    ) -> Identity:
        """Read and fully validate: files present, key loads, certificate matches key, chain
        reaches the pinned root. Returns the :class:`Identity`."""
        state = self.read()
        key = self._load_key(state, pkcs11_pin)
        if state.phase == "enrolling":
            return Identity(state=state, directory=self.directory, key=key)
        # schema-checked: enrolled states name all three files
        assert state.certificate_file is not None
        assert state.chain_file is not None
        assert state.root_file is not None
        bundle = _pem_certificates(self.directory / state.certificate_file, "certificate")
        if not bundle:
            raise StateError(f"certificate file {state.certificate_file} is empty",
                             code="state_file_invalid")
        leaf, bundled_chain = bundle[0], bundle[1:]
        chain = _pem_certificates(self.directory / state.chain_file, "chain")
        roots = _pem_certificates(self.directory / state.root_file, "root")
        if len(roots) != 1:
            raise StateError(f"root file {state.root_file} must hold exactly one certificate",
                             code="state_file_invalid")
        root = roots[0]
        if not public_key_matches(leaf.public_key(), key.public_key()):
            raise StateError(
                f"certificate {state.certificate_file} is not for the device key "
                f"({state.key.file or state.key.key_id})",
                code="state_key_mismatch",
            )
        if [c.public_bytes(serialization.Encoding.DER) for c in bundled_chain] != [
            c.public_bytes(serialization.Encoding.DER) for c in chain
        ]:
            raise StateError(
                f"{state.certificate_file} does not carry the chain in {state.chain_file}",
                code="state_file_invalid",
            )
        if state.certificate_serial is not None and _serial_int(
            state.certificate_serial
        ) != leaf.serial_number:
            raise StateError(
                f"state names certificate serial {state.certificate_serial}, file holds "
                f"{leaf.serial_number:x}",
                code="state_file_invalid",
            )
        if fingerprint_sha256(root) != state.root_fingerprint:
            raise StateError(
                f"root file {state.root_file} (fingerprint {fingerprint_sha256(root)}) is not "
                f"the pinned root {state.root_fingerprint}",
                code="state_root_mismatch",
            )
        if verify_chain_to_root:
            check_chain(leaf, chain, root, now or dt.datetime.now(dt.UTC))
        return Identity(state=state, directory=self.directory, key=key, certificate=leaf,
                        chain=tuple(chain), root=root)

    def _load_key(self, state: AgentState, pkcs11_pin: str | None) -> DeviceKey:
        ref = state.key
        if ref.kind == "file":
            assert ref.file is not None
            path = self.directory / ref.file
            if not path.exists():
                raise StateError(f"device key file {path} is missing", code="state_file_missing")
            try:
                return FileDeviceKey.load(path)
            except KeyStoreError as exc:
                raise StateError(exc.message, code="state_file_invalid") from exc
        return load_token_key(ref, pkcs11_pin)

    # -- writing

    def save(self, state: AgentState, *, now: dt.datetime | None = None) -> AgentState:
        """Write ``state`` as generation ``state.generation + 1``; returns what was written.

        The caller must hold the lock (or be the only writer). Refuses with
        ``state_conflict`` if the file on disk is not at ``state.generation`` (a stale copy).
        """
        if self.exists():
            on_disk = self._disk_generation()
            if on_disk != state.generation:
                raise StateError(
                    f"{self.state_path} is at generation {on_disk}, the update was based on "
                    f"{state.generation}; refusing to overwrite",
                    code="state_conflict",
                )
        stamp = format_time(now or dt.datetime.now(dt.UTC))
        new = state.evolve(generation=state.generation + 1, updated_at=stamp)
        data = json.dumps(new.to_json(), indent=2, sort_keys=True).encode("utf-8") + b"\n"
        atomic_write_bytes(self.state_path, data, mode=0o600, durable=self.durable)
        return new

    def _disk_generation(self) -> int | None:
        try:
            doc = json.loads(self.state_path.read_bytes())
        except (OSError, ValueError):
            return None
        value = doc.get("generation") if isinstance(doc, dict) else None
        return value if isinstance(value, int) else None

    def create(self, state: AgentState, *, now: dt.datetime | None = None) -> AgentState:
        """Write the first state (generation 1); ``state_conflict`` if one exists."""
        if self.exists():
            raise StateError(f"{self.state_path} already exists", code="state_conflict")
        self.ensure_directory()
        return self.save(state.evolve(generation=0), now=now)

    @staticmethod
    def new_tag() -> str:
        return secrets.token_hex(8)

    def write_key(self, key: FileDeviceKey, tag: str | None = None) -> str:
        """Write a new file key under a fresh name; returns the file name (not yet referenced)."""
        name = f"key-{tag or self.new_tag()}.pem"
        key.write(self.directory / name, durable=self.durable)
        return name

    def install_identity(
        self,
        state: AgentState,
        *,
        key: DeviceKey,
        key_ref: KeyRef | None,
        device_id: str,
        certificate: x509.Certificate,
        chain: Sequence[x509.Certificate],
        root: x509.Certificate,
        now: dt.datetime | None = None,
        renewal: RenewalInfo | None = None,
        cleanup: bool = True,
    ) -> AgentState:
        """Switch to a new identity atomically: write key (file mode, if not yet written),
        certificate, chain and root under one new tag, then ONE state.json replacement that
        references them, then remove the files the old state referenced.

        ``key_ref`` is where the key lives (None: write ``key`` as a new file key)."""
        if not public_key_matches(certificate.public_key(), key.public_key()):
            raise StateError("the new certificate is not for the new key",
                             code="state_key_mismatch")
        tag = self.new_tag()
        if key_ref is None:
            if not isinstance(key, FileDeviceKey):
                raise TypeError("a token key needs its KeyRef")
            key_ref = KeyRef(kind="file", file=self.write_key(key, tag))
        cert_name, chain_name, root_name = (f"cert-{tag}.pem", f"chain-{tag}.pem",
                                            f"root-{tag}.pem")
        atomic_write_bytes(self.directory / cert_name, certificates_pem([certificate, *chain]),
                           mode=0o644, durable=self.durable)
        atomic_write_bytes(self.directory / chain_name, certificates_pem(chain), mode=0o644,
                           durable=self.durable)
        atomic_write_bytes(self.directory / root_name, certificates_pem([root]), mode=0o644,
                           durable=self.durable)
        new = state.evolve(
            phase="enrolled",
            key=key_ref,
            device_id=device_id,
            certificate_file=cert_name,
            chain_file=chain_name,
            root_file=root_name,
            certificate_serial=format(certificate.serial_number, "x"),
            certificate_not_after=format_time(certificate.not_valid_after_utc),
            root_fingerprint=fingerprint_sha256(root),
            renewal=renewal if renewal is not None else state.renewal,
        )
        saved = self.save(new, now=now)  # <- the atomic switch
        if cleanup:
            self.cleanup(saved)
        return saved

    def cleanup(self, state: AgentState) -> list[str]:
        """Remove identity files ``state`` does not reference and stale temp files.

        Only safe for the lock holder (a concurrent writer's temp files would be removed)."""
        keep = state.referenced_files()
        removed: list[str] = []
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return removed
        for entry in entries:
            name = entry.name
            stale = name.startswith(_TMP_PREFIX) or (
                _IDENTITY_FILE_RE.fullmatch(name) is not None and name not in keep
            )
            if stale:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(name)
        if removed and self.durable:
            fsync_directory(self.directory)
        return removed


def _serial_int(text: str) -> int | None:
    try:
        return int(text, 16)
    except ValueError:
        return None


def load_token_key(ref: KeyRef, pin: str | None) -> TokenDeviceKey:
    """Open the PKCS#11 token named by ``ref`` and return its key (needs the user PIN)."""
    if not pin:
        raise StateError(
            f"the device key is on PKCS#11 token {ref.token_label!r}: set "
            "FLEETTRUST_AGENT_PKCS11_PIN (or --pkcs11-pin-file)",
            code="pkcs11_pin_required",
        )
    from fleettrust.signing.pkcs11 import Pkcs11Config, Pkcs11KeyStore

    if not (ref.module and ref.token_label and ref.key_id):
        raise StateError("incomplete PKCS#11 key reference in state", code="state_schema_invalid")
    try:
        store = Pkcs11KeyStore(Pkcs11Config(module=ref.module, token_label=ref.token_label,
                                            user_pin=pin))
        return TokenDeviceKey(store.load(ref.key_id))
    except KeyStoreError as exc:
        raise StateError(f"cannot load the device key from the token: {exc.message}",
                         code="state_file_invalid") from exc


def new_state(
    *,
    key: KeyRef,
    manifest: Mapping[str, Any],
    now: dt.datetime,
    manifest_override_file: str | None = None,
    gateway_url: str | None = None,
    operator_url: str | None = None,
) -> AgentState:
    """A fresh ``enrolling`` state (generation 0 until :meth:`StateStore.create` writes it)."""
    stamp = format_time(now)
    return AgentState(
        generation=0,
        phase="enrolling",
        key=key,
        manifest=dict(manifest),
        created_at=stamp,
        updated_at=stamp,
        manifest_override_file=manifest_override_file,
        gateway_url=gateway_url,
        operator_url=operator_url,
    )
