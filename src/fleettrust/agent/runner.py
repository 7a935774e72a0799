"""The running agent: mTLS check-ins with the gateway, back-off, renewal, clean shutdown.

:class:`Agent` (synchronous, one ``httpx.Client``):

* ``start()`` takes the state directory's writer lock, loads and validates the identity,
  removes leftovers of an interrupted write, gathers the manifest, increments ``boot_counter``
  (once per agent start, persisted before the first check-in) and opens the HTTPS client:
  ``verify=`` an SSL context whose ONLY trust anchor is the pinned fleet root (no system CAs;
  ``trust_env=False`` so no proxy or ``SSL_CERT_FILE`` from the environment applies), the
  certificate chain + key file for mutual TLS, one kept-alive connection.
* ``checkin()`` makes one attempt and persists its result (``last_checkin``, ``generation``);
  after a successful check-in it renews the certificate when the gateway says ``renew: true``
  or the certificate expires within ``renew_before`` (30 days), unless a failed renewal is
  still backing off.
* ``renew()`` — new key, CSR signed by it, ``old_key_proof`` by the current key; the answer is
  checked (key, device id, pinned root, chain) and stored with one atomic switch; the client
  is then rebuilt with the new certificate.
* ``run()`` loops: next check-in after ``next_checkin_s`` ±20 %; after a transient failure
  (network, TLS, 5xx, 429) full-jitter exponential back-off (1 s doubling, capped at 300 s,
  ``Retry-After`` honoured); after a refusal (401/403 problem codes) a precise ERROR log line
  and the next attempt after ``refusal_retry_s`` (1 h) ±20 %. ``request_stop()`` (what the
  SIGTERM/SIGINT handlers call) wakes the loop at once; an in-flight request is finished
  (bounded by ``timeout_s``) and its result persisted before ``run()`` returns.

A PKCS#11 device key cannot be used for the TLS handshake from Python (see
:mod:`fleettrust.agent.identity`): ``start()`` refuses it with ``tls_key_unavailable``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import random
import select
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal

import httpx

from fleettrust import __version__
from fleettrust.agent.backoff import BackoffPolicy, jittered_interval
from fleettrust.agent.identity import FileDeviceKey
from fleettrust.agent.manifest import gather_manifest
from fleettrust.agent.protocol import (
    CHECKIN_PATH,
    RENEW_PATH,
    CheckinResponse,
    GatewayError,
    build_checkin_body,
    build_renew_request,
    classify_response,
    classify_transport_error,
    parse_checkin_response,
    parse_renew_response,
    renewal_due,
    system_health,
    system_uptime_s,
)
from fleettrust.agent.state import (
    CheckinRecord,
    Identity,
    RenewalInfo,
    StateError,
    StateStore,
    format_time,
    parse_time,
)
from fleettrust.agent.tls import client_ssl_context
from fleettrust.errors import ValidationError
from fleettrust.pki.manifest import Manifest, normalize_manifest

__all__ = ["Agent", "AgentConfig", "CheckinOutcome", "RunSummary"]

if TYPE_CHECKING:
    from fleettrust.agent_feed import RevocationFollower

REVOCATIONS_FILE = "revocations.json"
log = logging.getLogger("fleettrust.agent")

DEFAULT_FIRMWARE_VERSION = f"fleettrust-agent-{__version__}"


@dataclass(frozen=True)
class AgentConfig:
    """Everything :class:`Agent` needs besides the state directory's contents."""

    state_dir: Path
    gateway_url: str | None = None  # None: the URL stored in the state
    firmware_version: str = DEFAULT_FIRMWARE_VERSION
    manifest_file: Path | None = None  # None: the enrollment's override file, else the system
    pkcs11_pin: str | None = None
    timeout_s: float = 10.0
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    refusal_retry_s: float = 3600.0
    renew_before: dt.timedelta = dt.timedelta(days=30)
    renew_backoff: BackoffPolicy = field(
        default_factory=lambda: BackoffPolicy(base_s=60.0, cap_s=6 * 3600.0))
    keepalive_expiry_s: float = 3600.0
    min_checkin_interval_s: float = 1.0  # a gateway asking for less is clamped (and logged)
    durable: bool = True


@dataclass(frozen=True)
class CheckinOutcome:
    """Result of one check-in attempt."""

    ok: bool
    latency_s: float
    response: CheckinResponse | None = None
    error: GatewayError | None = None
    renewed: bool = False


@dataclass
class RunSummary:
    """What :meth:`Agent.run` did, and the CLI exit code it maps to."""

    checkins_ok: int = 0
    failures: int = 0
    refusals: int = 0
    renewals: int = 0
    last_error_code: str | None = None
    last_outcome: Literal["ok", "refused", "error", "none"] = "none"
    stopped_by: Literal["once", "max_checkins", "stop", "none"] = "none"

    @property
    def exit_code(self) -> int:
        """0 ok / stopped cleanly, 3 last attempt refused, 4 last attempt failed (network)."""
        if self.stopped_by == "once":
            return {"ok": 0, "refused": 3, "error": 4, "none": 4}[self.last_outcome]
        return 0


class _Waiter:
    """Sleep that ``wake()`` interrupts at once, also from a signal handler (self-pipe)."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self.stopped = False

    def wake(self) -> None:
        self.stopped = True
        with contextlib.suppress(OSError):
            os.write(self._w, b"x")

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` s; True if a stop was requested."""
        if self.stopped:
            return True
        deadline = time.monotonic() + max(0.0, timeout)
        while not self.stopped:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            readable, _, _ = select.select([self._r], [], [], remaining)
            if readable:
                with contextlib.suppress(OSError):
                    os.read(self._r, 64)
        return self.stopped

    def close(self) -> None:
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)


class Agent:
    """One device's agent. Use ``with Agent(config) as agent: agent.run()``."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], dt.datetime] | None = None,
        manifest: Manifest | None = None,
    ) -> None:
        self.config = config
        self.store = StateStore(config.state_dir, durable=config.durable)
        self._rng = rng or random.SystemRandom()
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._manifest_override = manifest
        self._waiter = _Waiter()
        self._client: httpx.Client | None = None
        self._follower: RevocationFollower | None = None  # created on first use
        self._identity: Identity | None = None
        self._manifest: Manifest | None = None
        self._gateway: str | None = None
        self._started_monotonic = time.monotonic()

    # -- lifecycle

    @property
    def identity(self) -> Identity:
        if self._identity is None:
            raise RuntimeError("agent not started")
        return self._identity

    @property
    def gateway_url(self) -> str:
        if self._gateway is None:
            raise RuntimeError("agent not started")
        return self._gateway

    def start(self) -> None:
        """Lock, validate, clean up, count this boot, open the client."""
        self.store.acquire_lock()
        try:
            identity = self.store.load(pkcs11_pin=self.config.pkcs11_pin, now=self._clock())
            state = identity.state
            if state.phase != "enrolled":
                raise StateError(
                    f"{self.store.directory} is not enrolled yet (phase {state.phase}): "
                    "install the issued certificate first (fleettrust agent install)",
                    code="not_enrolled")
            if not isinstance(identity.key, FileDeviceKey):
                raise StateError(
                    "the device key is on a PKCS#11 token; Python's ssl module cannot use a "
                    "token key for the mTLS handshake, so this agent cannot check in with it",
                    code="tls_key_unavailable")
            gateway = self.config.gateway_url or state.gateway_url
            if not gateway:
                raise StateError("no gateway URL: pass --gateway (it is then remembered)",
                                 code="gateway_url_missing")
            if not gateway.startswith("https://"):
                raise ValidationError(f"gateway URL must be https://, got {gateway!r}",
                                      code="gateway_url_invalid")
            self._gateway = gateway.rstrip("/")
            removed = self.store.cleanup(state)
            if removed:
                log.info("removed %d leftover file(s) of an interrupted write: %s",
                         len(removed), ", ".join(sorted(removed)))
            self._manifest = self._resolve_manifest(state.manifest, state.manifest_override_file)
            state = self.store.save(
                state.evolve(boot_counter=state.boot_counter + 1, gateway_url=self._gateway),
                now=self._clock())
            self._identity = Identity(state=state, directory=identity.directory,
                                      key=identity.key, certificate=identity.certificate,
                                      chain=identity.chain, root=identity.root)
            self._client = self._make_client()
            log.info("agent started: device %s, boot %d, generation %d, certificate %s "
                     "valid until %s, gateway %s", state.device_id, state.boot_counter,
                     state.generation, state.certificate_serial, state.certificate_not_after,
                     self._gateway)
        except BaseException:
            self.store.release_lock()
            raise

    def _resolve_manifest(self, enrolled: dict[str, Any], override: str | None) -> Manifest:
        if self._manifest_override is not None:
            return self._manifest_override
        enrolled_manifest = normalize_manifest(enrolled)
        override_path = self.config.manifest_file or (Path(override) if override else None)
        if override_path is not None and not override_path.exists():
            log.warning("manifest override file %s is gone; reporting the system's manifest",
                        override_path)
            override_path = None
        try:
            current = gather_manifest(override_file=override_path)
        except ValidationError as exc:
            log.warning("cannot gather the hardware manifest (%s); reporting the enrolled one",
                        exc.message)
            return enrolled_manifest
        if current != enrolled_manifest:
            log.warning("hardware manifest differs from the one enrolled at the factory; "
                        "reporting the current one")
        return current

    def _make_client(self) -> httpx.Client:
        identity = self.identity
        key_path = identity.key_path
        context = client_ssl_context(root=identity.root_path,
                                     certificate=identity.certificate_path, key=key_path)
        return httpx.Client(
            base_url=self.gateway_url,
            verify=context,
            trust_env=False,
            timeout=httpx.Timeout(self.config.timeout_s),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1,
                                keepalive_expiry=self.config.keepalive_expiry_s),
            headers={"User-Agent": f"fleettrust-agent/{__version__}"},
        )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._waiter.close()
        self.store.release_lock()

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request_stop(self) -> None:
        """Ask ``run()`` to return; safe to call from a signal handler or another thread."""
        self._waiter.wake()

    @contextlib.contextmanager
    def signal_handlers(self) -> Iterator[None]:
        """SIGTERM/SIGINT -> :meth:`request_stop` (main thread only)."""

        def handler(signum: int, _frame: FrameType | None) -> None:
            self.request_stop()

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # -- one check-in

    def _post(self, path: str, body: dict[str, Any], what: str) -> httpx.Response:
        assert self._client is not None
        try:
            response = self._client.post(path, json=body)
        except httpx.TransportError as exc:
            raise classify_transport_error(exc, what) from exc
        if response.status_code != 200:
            raise classify_response(response, what)
        return response

    def checkin(self) -> CheckinOutcome:
        """One check-in attempt; persists its result; renews afterwards when due."""
        identity = self.identity
        state = identity.state
        assert self._manifest is not None
        uptime = system_uptime_s()
        if uptime is None:
            uptime = int(time.monotonic() - self._started_monotonic)
        body = build_checkin_body(
            key=identity.key, manifest=self._manifest,
            firmware_version=self.config.firmware_version, boot_counter=state.boot_counter,
            uptime_s=uptime, agent_generation=state.generation,
            health=system_health(extra={"agent_checkins_ok": float(state.checkins_ok)}),
        )
        started = time.perf_counter()
        now = self._clock()
        try:
            response = self._post(CHECKIN_PATH, body, "check-in")
            parsed = parse_checkin_response(response)
        except GatewayError as exc:
            latency = time.perf_counter() - started
            record = CheckinRecord(
                at=format_time(now), outcome="refused" if exc.kind == "refused" else "error",
                http_status=exc.http_status, code=exc.code,
                detail=(exc.detail or exc.message)[:500])
            self._save(state.evolve(last_checkin=record))
            return CheckinOutcome(ok=False, latency_s=latency, error=exc)
        latency = time.perf_counter() - started
        if parsed.device_id != state.device_id:
            log.warning("gateway answered for device %s, this device is %s",
                        parsed.device_id, state.device_id)
        record = CheckinRecord(
            at=format_time(now), outcome="ok", http_status=200, device_status=parsed.status,
            next_checkin_s=round(parsed.next_checkin_s), server_time=parsed.server_time)
        self._save(state.evolve(last_checkin=record, checkins_ok=state.checkins_ok + 1))
        self.follow_revocations()
        renewed = False
        if self._renewal_wanted(parsed):
            renewed = self.renew(reason="gateway asked" if parsed.renew else "expiry near")
        return CheckinOutcome(ok=True, latency_s=latency, response=parsed, renewed=renewed)

    def follow_revocations(self) -> int:
        """Catch up on the fleet's revocation feed (``since=N``) over the authenticated channel;
        the local copy (``revocations.json`` in the state directory, written atomically) answers
        :meth:`peer_revoked` for peers. Failures are logged and retried at the next check-in."""
        from fleettrust.agent_feed import FeedError, RevocationFollower

        assert self._client is not None
        if self._follower is None or self._follower.client is not self._client:
            self._follower = RevocationFollower(
                self._client, self.config.state_dir / REVOCATIONS_FILE)
        try:
            applied = self._follower.catch_up()
        except (FeedError, httpx.HTTPError, OSError) as exc:
            log.warning("revocation feed catch-up failed: %s", exc)
            return 0
        if applied:
            log.info("revocation feed: %d new event(s), position %d", applied,
                     self._follower.last_seq)
        return applied

    def peer_revoked(self, serial_hex: str) -> bool:
        """Whether a peer's certificate serial is revoked, from the local feed copy."""
        return self._follower is not None and self._follower.is_revoked(serial_hex)

    def _save(self, state: Any) -> None:
        saved = self.store.save(state, now=self._clock())
        self._identity = Identity(state=saved, directory=self.identity.directory,
                                  key=self.identity.key, certificate=self.identity.certificate,
                                  chain=self.identity.chain, root=self.identity.root)

    def _renewal_wanted(self, response: CheckinResponse) -> bool:
        now = self._clock()
        due = response.renew or renewal_due(self.identity.not_after(), now,
                                            renew_before=self.config.renew_before)
        if not due:
            return False
        next_attempt = self.identity.state.renewal.next_attempt_at
        if next_attempt is not None and now < parse_time(next_attempt):
            log.info("renewal due but backing off until %s after %d failure(s)", next_attempt,
                     self.identity.state.renewal.consecutive_failures)
            return False
        return True

    # -- renewal

    def renew(self, *, reason: str = "requested") -> bool:
        """Renew the certificate now; True on success (failures are logged and recorded)."""
        identity = self.identity
        state = identity.state
        assert state.device_id is not None
        assert identity.root is not None
        now = self._clock()
        old_serial = state.certificate_serial
        new_key = FileDeviceKey.generate()
        body, _csr = build_renew_request(identity.key, new_key, state.device_id)
        log.info("renewing certificate %s (%s)", old_serial, reason)
        try:
            response = self._post(RENEW_PATH, body, "renewal")
            renewed = parse_renew_response(response, new_key=new_key, pinned_root=identity.root,
                                           device_id=state.device_id, now=now)
        except GatewayError as exc:
            failures = state.renewal.consecutive_failures
            delay = self.config.renew_backoff.delay(failures, self._rng,
                                                    retry_after_s=exc.retry_after_s)
            renewal = RenewalInfo(
                count=state.renewal.count, last_renewed_at=state.renewal.last_renewed_at,
                last_attempt_at=format_time(now), last_error=f"{exc.code}: {exc.message}"[:500],
                consecutive_failures=failures + 1,
                next_attempt_at=format_time(now + dt.timedelta(seconds=delay)),
                previous_serial=state.renewal.previous_serial)
            self._save(state.evolve(renewal=renewal))
            log.error("%s; next renewal attempt not before %s", exc.message,
                      renewal.next_attempt_at)
            return False
        renewal = RenewalInfo(count=state.renewal.count + 1, last_renewed_at=format_time(now),
                              last_attempt_at=format_time(now), previous_serial=old_serial)
        self.store.install_identity(
            state, key=new_key, key_ref=None, device_id=renewed.device_id,
            certificate=renewed.certificate, chain=renewed.chain, root=renewed.root, now=now,
            renewal=renewal)
        self._identity = self.store.load(now=now)
        old_client, self._client = self._client, self._make_client()
        if old_client is not None:
            old_client.close()
        log.info("certificate renewed: serial %s -> %s, valid until %s", old_serial,
                 self.identity.state.certificate_serial,
                 self.identity.state.certificate_not_after)
        return True

    # -- the loop

    def run(self, *, once: bool = False, max_checkins: int | None = None) -> RunSummary:
        """Check in until stopped (``once``: one attempt; ``max_checkins``: N successes)."""
        if max_checkins is not None and max_checkins < 1:
            raise ValueError("max_checkins must be >= 1")
        summary = RunSummary()
        failures = 0
        while not self._waiter.stopped:
            outcome = self.checkin()
            if outcome.renewed:
                summary.renewals += 1
            if outcome.ok:
                assert outcome.response is not None
                failures = 0
                summary.checkins_ok += 1
                summary.last_outcome = "ok"
                interval, clamped = outcome.response.interval(
                    minimum_s=self.config.min_checkin_interval_s)
                if clamped:
                    log.warning("gateway's next_checkin_s %g is out of range; using %g s",
                                outcome.response.next_checkin_s, interval)
                delay = jittered_interval(interval, self._rng)
                log.info("check-in ok: device %s status %s (%.0f ms); next check-in in %.1f s",
                         outcome.response.device_id, outcome.response.status,
                         outcome.latency_s * 1000, delay)
                if once:
                    summary.stopped_by = "once"
                    break
                if max_checkins is not None and summary.checkins_ok >= max_checkins:
                    summary.stopped_by = "max_checkins"
                    break
            else:
                error = outcome.error
                assert error is not None
                summary.last_error_code = error.code
                if error.kind == "refused":
                    summary.refusals += 1
                    summary.last_outcome = "refused"
                    delay = jittered_interval(self.config.refusal_retry_s, self._rng)
                    note = " (permanent: an operator must act)" if error.permanent else ""
                    log.error("%s%s; next attempt in %.0f s", error.message, note, delay)
                else:
                    summary.failures += 1
                    summary.last_outcome = "error"
                    delay = self.config.backoff.delay(failures, self._rng,
                                                      retry_after_s=error.retry_after_s)
                    failures += 1
                    log.warning("%s; retry %d in %.2f s (back-off cap %g s)", error.message,
                                failures, delay, self.config.backoff.cap_s)
                if once:
                    summary.stopped_by = "once"
                    break
            if self._waiter.wait(delay):
                break
        if self._waiter.stopped and summary.stopped_by == "none":
            summary.stopped_by = "stop"
            log.info("agent stopping on request")
        return summary
