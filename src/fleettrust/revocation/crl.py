"""Pure RFC 5280 CRL building: complete CRLs (sharded and CA-level), delta CRLs, their entries.

No I/O, no database, no clock reads: the caller passes the issuer certificate, the entries,
numbers and times, and signs the returned builder with the CA's :class:`Signer`.

Profiles (ADR 0008):

- **Shard CRL** ``/crl/<ca>/<shard>.crl`` — the leaves of one issuing CA whose serial modulo the
  shard count is ``shard``. Issuing Distribution Point (critical): ``fullName`` = exactly the URL
  in those certificates' CRL Distribution Points, ``onlyContainsUserCerts``. OpenSSL uses a CRL
  with an IDP only for certificates whose CRL DP names the same URL (otherwise "different CRL
  scope", smallstep/certificates#2250), so both come from one function
  (``services.hierarchy.crl_url``).
- **CA-level CRL** ``/crl/<ca>.crl`` — every certificate the CA issued that is revoked or on
  hold: sub-CA certificates *and* every leaf. No IDP: a complete CRL for everything the issuer
  issued, so it is accepted for a leaf whatever that leaf's CRL DP says. This is the one to give
  clients that only check the leaf issuer's CRL file (Mosquitto 2.0 ``crlfile``,
  ``openssl verify -crl_check``), and the one sub-CA certificates point at.
- **Delta CRLs** (§5.2.4) ``/crl/<ca>/<shard>-delta.crl`` and ``/crl/<ca>/delta.crl`` — the
  changes since a base complete CRL of the same scope: same IDP as that base (OpenSSL requires
  it), Delta CRL Indicator (critical) = the base's CRL number, ``removeFromCRL`` entries for
  holds that were lifted. Each complete CRL names its delta in Freshest CRL (non-critical).
- Every CRL: v2, issuer = the CA's subject, Authority Key Identifier = the CA's subject key
  identifier, CRL Number; entries carry a reasonCode extension except for ``unspecified``
  (§5.3.1: SHOULD be absent).

Large CRLs: the entry list goes to the builder's constructor in one go (``add_revoked_certificate``
copies the list on every call: quadratic). :class:`EntryCache` keeps built entries between
regenerations.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from cryptography import x509

#: RFC 5280 CRLReason names -> cryptography's flags.
REASON_FLAGS: Final[Mapping[str, x509.ReasonFlags]] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "certificateHold": x509.ReasonFlags.certificate_hold,
    "removeFromCRL": x509.ReasonFlags.remove_from_crl,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
    "aACompromise": x509.ReasonFlags.aa_compromise,
}
REASON_NAMES: Final[Mapping[x509.ReasonFlags, str]] = {v: k for k, v in REASON_FLAGS.items()}


class CrlEntry(NamedTuple):
    """One revoked (or held) certificate: serial, revocation time (aware), RFC 5280 reason name
    (``None`` or ``"unspecified"``: no reasonCode extension). A tuple, because a publication
    handles 100,000 of them; :func:`revoked_certificate` checks the values."""

    serial: int
    revoked_at: dt.datetime
    reason: str | None


@dataclass(frozen=True, slots=True)
class Scope:
    """What a CRL covers: the IDP to write (``idp_url`` None: no IDP, complete scope)."""

    idp_url: str | None
    only_user_certs: bool = False

    def extension(self) -> x509.IssuingDistributionPoint | None:
        if self.idp_url is None:
            return None
        return x509.IssuingDistributionPoint(
            full_name=[x509.UniformResourceIdentifier(self.idp_url)],
            relative_name=None,
            only_contains_user_certs=self.only_user_certs,
            only_contains_ca_certs=False,
            only_some_reasons=None,
            indirect_crl=False,
            only_contains_attribute_certs=False,
        )


def shard_of(serial: int, shards: int) -> int:
    """The shard listing ``serial`` (the same rule as the certificate's CRL DP)."""
    if shards < 1:
        raise ValueError("shards must be >= 1")
    return serial % shards


class EntryCache:
    """Built ``RevokedCertificate`` objects by (serial, time, reason), reused between CRLs.

    Building an entry costs more than encoding it; a regeneration after one more revocation
    reuses every other entry. Not thread-safe: one per publisher.
    """

    def __init__(self) -> None:
        self._cache: dict[CrlEntry, x509.RevokedCertificate] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, entry: CrlEntry) -> x509.RevokedCertificate:
        built = self._cache.get(entry)
        if built is None:
            built = self._cache[entry] = revoked_certificate(entry)
        return built

    def retain(self, keep: Iterable[CrlEntry]) -> None:
        """Forget entries not in ``keep`` (call after a regeneration of everything)."""
        wanted = set(keep)
        self._cache = {k: v for k, v in self._cache.items() if k in wanted}


def revoked_certificate(entry: CrlEntry) -> x509.RevokedCertificate:
    if entry.serial <= 0:
        raise ValueError("serial numbers are positive (RFC 5280 §4.1.2.2)")
    if entry.revoked_at.tzinfo is None:
        raise ValueError("revoked_at must be timezone-aware")
    if entry.reason is not None and entry.reason not in REASON_FLAGS:
        raise ValueError(f"unknown CRL reason {entry.reason!r}")
    at = entry.revoked_at
    builder = (x509.RevokedCertificateBuilder()
               .serial_number(entry.serial)
               .revocation_date(at if at.microsecond == 0 else at.replace(microsecond=0)))
    if entry.reason is not None and entry.reason != "unspecified":
        builder = builder.add_extension(x509.CRLReason(REASON_FLAGS[entry.reason]),
                                        critical=False)
    return builder.build()


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer.public_key())  # type: ignore[arg-type]  # CA keys are issuer key types


def _check_times(this_update: dt.datetime, next_update: dt.datetime) -> None:
    if this_update.tzinfo is None or next_update.tzinfo is None:
        raise ValueError("this_update and next_update must be timezone-aware")
    if next_update <= this_update:
        raise ValueError("next_update must be after this_update (RFC 5280 §5.1.2.5)")


def _builder(
    issuer: x509.Certificate,
    revoked: list[x509.RevokedCertificate],
    *,
    crl_number: int,
    this_update: dt.datetime,
    next_update: dt.datetime,
    scope: Scope,
) -> x509.CertificateRevocationListBuilder:
    _check_times(this_update, next_update)
    if not 0 < crl_number < 2**159:
        raise ValueError("CRL numbers are positive and at most 20 octets (§5.2.3)")
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=issuer.subject,
        last_update=this_update.replace(microsecond=0),
        next_update=next_update.replace(microsecond=0),
        revoked_certificates=revoked,
    )
    builder = builder.add_extension(_aki(issuer), critical=False)
    builder = builder.add_extension(x509.CRLNumber(crl_number), critical=False)
    idp = scope.extension()
    if idp is not None:
        builder = builder.add_extension(idp, critical=True)  # §5.2.5: critical
    return builder


def _entries(entries: Sequence[CrlEntry], cache: EntryCache | None,
             *, delta: bool) -> list[x509.RevokedCertificate]:
    if not delta and any(e.reason == "removeFromCRL" for e in entries):
        raise ValueError("removeFromCRL appears only in delta CRLs (§5.3.1)")
    get = cache.get if cache is not None else revoked_certificate
    return [get(e) for e in sorted(entries)]


def build_complete_crl(
    issuer: x509.Certificate,
    entries: Sequence[CrlEntry],
    *,
    crl_number: int,
    this_update: dt.datetime,
    next_update: dt.datetime,
    scope: Scope,
    freshest_url: str | None = None,
    cache: EntryCache | None = None,
) -> x509.CertificateRevocationListBuilder:
    """A complete CRL (shard or CA-level) ready to sign; ``freshest_url`` names its delta."""
    builder = _builder(issuer, _entries(entries, cache, delta=False), crl_number=crl_number,
                       this_update=this_update, next_update=next_update, scope=scope)
    if freshest_url is not None:
        builder = builder.add_extension(x509.FreshestCRL([x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(freshest_url)], relative_name=None,
            reasons=None, crl_issuer=None)]), critical=False)
    return builder


def build_delta_crl(
    issuer: x509.Certificate,
    entries: Sequence[CrlEntry],
    *,
    crl_number: int,
    base_crl_number: int,
    this_update: dt.datetime,
    next_update: dt.datetime,
    scope: Scope,
    cache: EntryCache | None = None,
) -> x509.CertificateRevocationListBuilder:
    """A delta CRL relative to the complete CRL numbered ``base_crl_number`` (same scope)."""
    if not 0 < base_crl_number < crl_number:
        raise ValueError("a delta CRL's number must exceed its base's (§5.2.4)")
    builder = _builder(issuer, _entries(entries, cache, delta=True), crl_number=crl_number,
                       this_update=this_update, next_update=next_update, scope=scope)
    return builder.add_extension(x509.DeltaCRLIndicator(base_crl_number), critical=True)


def delta_entries(
    base: Mapping[int, CrlEntry], current: Mapping[int, CrlEntry], now: dt.datetime
) -> list[CrlEntry]:
    """What a delta CRL must list so that ``base`` + delta == ``current`` (§5.2.4):
    entries new or changed since the base (a hold that became a revocation), and
    ``removeFromCRL`` for base entries no longer listed (a lifted hold), dated ``now``."""
    out = [e for s, e in current.items()
           if (b := base.get(s)) is None or b.reason != e.reason or b.revoked_at != e.revoked_at]
    out.extend(CrlEntry(s, now, "removeFromCRL") for s in base if s not in current)
    return out


def entries_of(crl: x509.CertificateRevocationList) -> dict[int, CrlEntry]:
    """Parse the entries of a (complete) CRL back into :class:`CrlEntry` values."""
    out: dict[int, CrlEntry] = {}
    for rc in crl:
        try:
            reason: str | None = REASON_NAMES[
                rc.extensions.get_extension_for_class(x509.CRLReason).value.reason]
        except x509.ExtensionNotFound:
            reason = None
        out[rc.serial_number] = CrlEntry(rc.serial_number, rc.revocation_date_utc, reason)
    return out


def normalise(entry: CrlEntry) -> CrlEntry:
    """The entry as it reads back from a CRL (whole seconds; no reason for unspecified)."""
    reason = None if entry.reason == "unspecified" else entry.reason
    return CrlEntry(entry.serial, entry.revoked_at.replace(microsecond=0), reason)


__all__ = [
    "REASON_FLAGS",
    "REASON_NAMES",
    "CrlEntry",
    "EntryCache",
    "Scope",
    "build_complete_crl",
    "build_delta_crl",
    "delta_entries",
    "entries_of",
    "normalise",
    "revoked_certificate",
    "shard_of",
]
