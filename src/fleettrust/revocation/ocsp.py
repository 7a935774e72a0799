"""OCSP messages (RFC 6960, RFC 5019 profile): parse requests, encode signed responses.

Pure: no I/O, no clock, no database. The responder (:mod:`fleettrust.revocation.ocsp_responder`)
decides *what* to answer; this module only turns bytes into a :class:`OcspRequest` and a list
of :class:`SingleResponse` into a signed ``OCSPResponse``.

Requests are parsed by a small strict DER reader (definite lengths, minimal length octets,
single-octet tags, no trailing data, at most :data:`MAX_REQUEST_BYTES`). Anything it cannot read
raises :class:`MalformedRequestError`, which the responder answers with ``malformedRequest``.
Unlike ``cryptography``'s parser it accepts several ``Request`` entries (up to
:data:`MAX_CERT_IDS`), reports a nonce without failing, and tells a hash algorithm it does not
support apart from garbage (``CertId.hash_algorithm == "unsupported"``: the issuer cannot be
identified, so the responder answers ``unauthorized``).

Responses are encoded by hand (a ``BasicOCSPResponse`` is a small fixed structure) and signed
through the :class:`~fleettrust.signing.base.Signer` protocol (``sign_bytes``), so any ECDSA
signer works and several ``SingleResponse`` entries fit in one response, which
``cryptography``'s ``OCSPResponseBuilder`` does not allow. Profile of every response:

* ``responderID`` is ``byKey`` (SHA-1 of the responder's subjectPublicKey, RFC 6960 §4.2.1);
* ``certs`` carries the delegated responder certificate (RFC 6960 §4.2.2.2);
* each ``CertID`` is re-encoded canonically (hash ``AlgorithmIdentifier`` with NULL parameters)
  with the hash algorithm of the request; clients compare the OID and the hashes;
* ``revocationReason`` is present for every reason except ``unspecified`` (RFC 5280 §5.3.1:
  the reason code unspecified SHOULD be absent); certificateHold is ``revoked`` with reason
  certificateHold (RFC 6960 §2.2);
* no response extensions (the nonce is not echoed: responses are pre-signed, RFC 5019 §4).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import enum
import hashlib
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleettrust.pki import _der
from fleettrust.signing.base import Signer, SignerAlgorithm

__all__ = [
    "MAX_CERT_IDS",
    "MAX_REQUEST_BYTES",
    "CertId",
    "CertStatusName",
    "MalformedRequestError",
    "OcspRequest",
    "ResponseStatus",
    "SingleResponse",
    "build_response",
    "decode_get_path",
    "encode_cert_id",
    "error_response",
    "issuer_hashes",
    "parse_request",
    "reason_flag",
    "responder_key_hash",
]

#: Requests larger than this are refused (``malformedRequest``); a one-certificate request is
#: about 80 bytes, a signed one with a certificate chain a few hundred.
MAX_REQUEST_BYTES: Final = 4096
#: At most this many ``Request`` entries in one ``OCSPRequest`` (RFC 5019 clients send one).
MAX_CERT_IDS: Final = 16

CertStatusName = Literal["good", "revoked", "unknown"]


class ResponseStatus(enum.IntEnum):
    """``OCSPResponseStatus`` (RFC 6960 §4.2.1)."""

    SUCCESSFUL = 0
    MALFORMED_REQUEST = 1
    INTERNAL_ERROR = 2
    TRY_LATER = 3
    SIG_REQUIRED = 5
    UNAUTHORIZED = 6


class MalformedRequestError(ValueError):
    """The bytes are not a DER ``OCSPRequest`` this responder accepts."""


def error_response(status: ResponseStatus) -> bytes:
    """An ``OCSPResponse`` with only a non-successful status (no ``responseBytes``)."""
    if status is ResponseStatus.SUCCESSFUL:
        raise ValueError("a successful response needs responseBytes")
    return bytes((0x30, 0x03, 0x0A, 0x01, int(status)))


# --- object identifiers (DER content octets) ----------------------------------------------------

_OID_SHA1 = bytes.fromhex("2b0e03021a")  # 1.3.14.3.2.26
_OID_SHA256 = bytes.fromhex("608648016503040201")  # 2.16.840.1.101.3.4.2.1
_OID_SHA384 = bytes.fromhex("608648016503040202")
_OID_SHA512 = bytes.fromhex("608648016503040203")
_OID_NONCE = bytes.fromhex("2b0601050507300102")  # 1.3.6.1.5.5.7.48.1.2 id-pkix-ocsp-nonce

#: CertID hash algorithms: name -> (OID content octets, digest size).
_HASHES: Final[dict[str, tuple[bytes, int]]] = {
    "sha1": (_OID_SHA1, 20),
    "sha256": (_OID_SHA256, 32),
    "sha384": (_OID_SHA384, 48),
    "sha512": (_OID_SHA512, 64),
}
_HASH_BY_OID: Final = {oid: name for name, (oid, _) in _HASHES.items()}
#: Every CertID hash algorithm this module understands.
HASH_ALGORITHMS: Final = tuple(_HASHES)

_OCSP_BASIC = _der.oid("1.3.6.1.5.5.7.48.1.1")  # id-pkix-ocsp-basic
_SIG_ALGS: Final = {
    # ecdsa-with-SHA256 / SHA384, parameters absent (RFC 5758 §3.2)
    SignerAlgorithm.EC_P256: _der.tlv(0x30, _der.oid("1.2.840.10045.4.3.2")),
    SignerAlgorithm.EC_P384: _der.tlv(0x30, _der.oid("1.2.840.10045.4.3.3")),
}

_REASON_CODES: Final = {
    x509.ReasonFlags.unspecified: 0,
    x509.ReasonFlags.key_compromise: 1,
    x509.ReasonFlags.ca_compromise: 2,
    x509.ReasonFlags.affiliation_changed: 3,
    x509.ReasonFlags.superseded: 4,
    x509.ReasonFlags.cessation_of_operation: 5,
    x509.ReasonFlags.certificate_hold: 6,
    x509.ReasonFlags.remove_from_crl: 8,
    x509.ReasonFlags.privilege_withdrawn: 9,
    x509.ReasonFlags.aa_compromise: 10,
}
_REASON_NAMES: Final = {
    **{flag.value.lower(): flag for flag in x509.ReasonFlags},
    **{flag.name.lower().replace("_", ""): flag for flag in x509.ReasonFlags},
}


def reason_flag(name: str | None) -> x509.ReasonFlags | None:
    """The CRL reason for a stored name (``keyCompromise``, ``key_compromise``, …); None if none.

    Unknown names map to ``unspecified`` (the certificate *is* revoked; only the reason is
    unreadable).
    """
    if not name:
        return None
    key = name.strip().lower().replace("_", "").replace("-", "")
    return _REASON_NAMES.get(key, x509.ReasonFlags.unspecified)


# --- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertId:
    """One ``CertID`` of a request (RFC 6960 §4.1.1).

    ``hash_algorithm`` is ``sha1``/``sha256``/``sha384``/``sha512``, or ``unsupported`` when the
    request names another algorithm (the issuer then cannot be identified).
    """

    hash_algorithm: str
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    serial: int

    @property
    def serial_hex(self) -> str:
        """Serial as fleettrust stores it (lower-case hex); ``-…`` for a negative one."""
        return format(self.serial, "x")


@dataclass(frozen=True, slots=True)
class OcspRequest:
    cert_ids: tuple[CertId, ...]
    nonce: bytes | None  # value of the id-pkix-ocsp-nonce extension, if any
    signed: bool  # carried an optionalSignature (accepted, not verified: RFC 5019 §2.1.2)


def _fail(message: str) -> MalformedRequestError:
    return MalformedRequestError(message)


def _read(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER TLV at ``pos``, inside ``[pos, end)``."""
    if pos + 2 > end:
        raise _fail("truncated DER value")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise _fail("multi-octet tags are not used by OCSP requests")
    first = buf[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise _fail("indefinite length is not DER")
    else:
        n = first & 0x7F
        if n > 3 or pos + n > end:
            raise _fail("length octets too long or truncated")
        length = int.from_bytes(buf[pos : pos + n], "big")
        if length < 0x80 or buf[pos] == 0:
            raise _fail("non-minimal length is not DER")
        pos += n
    if pos + length > end:
        raise _fail("truncated DER value")
    return tag, pos, pos + length


def _expect(buf: bytes, pos: int, end: int, tag: int, what: str) -> tuple[int, int]:
    got, start, stop = _read(buf, pos, end)
    if got != tag:
        raise _fail(f"{what}: expected tag 0x{tag:02x}, got 0x{got:02x}")
    return start, stop


def _parse_extensions(buf: bytes, start: int, end: int) -> bytes | None:
    """Walk ``Extensions``; return the nonce value. Critical extensions other than the nonce
    are not understood and make the request malformed (RFC 6960 §4.4)."""
    nonce: bytes | None = None
    pos = start
    if pos == end:
        raise _fail("empty Extensions")
    while pos < end:
        s, e = _expect(buf, pos, end, 0x30, "Extension")
        pos = e
        o_s, o_e = _expect(buf, s, e, 0x06, "extnID")
        oid = buf[o_s:o_e]
        p = o_e
        critical = False
        tag, c_s, c_e = _read(buf, p, e)
        if tag == 0x01:
            if c_e - c_s != 1 or buf[c_s] not in (0x00, 0xFF):
                raise _fail("bad BOOLEAN")
            critical = buf[c_s] == 0xFF
            p = c_e
            tag, c_s, c_e = _read(buf, p, e)
        if tag != 0x04 or c_e != e:
            raise _fail("extnValue must be the last element, an OCTET STRING")
        if oid == _OID_NONCE:
            nonce = bytes(buf[c_s:c_e])
        elif critical:
            raise _fail("unsupported critical extension")
    return nonce


def _parse_cert_id(buf: bytes, start: int, end: int) -> CertId:
    a_s, a_e = _expect(buf, start, end, 0x30, "hashAlgorithm")
    o_s, o_e = _expect(buf, a_s, a_e, 0x06, "hashAlgorithm OID")
    if o_e != a_e:  # parameters: absent or NULL
        tag, p_s, p_e = _read(buf, o_e, a_e)
        if tag != 0x05 or p_s != p_e or p_e != a_e:
            raise _fail("hash AlgorithmIdentifier parameters must be NULL or absent")
    n_s, n_e = _expect(buf, a_e, end, 0x04, "issuerNameHash")
    k_s, k_e = _expect(buf, n_e, end, 0x04, "issuerKeyHash")
    i_s, i_e = _expect(buf, k_e, end, 0x02, "serialNumber")
    if i_e != end:
        raise _fail("trailing data in CertID")
    if i_s == i_e or i_e - i_s > 64:
        raise _fail("serialNumber length")
    return CertId(
        hash_algorithm=_HASH_BY_OID.get(bytes(buf[o_s:o_e]), "unsupported"),
        issuer_name_hash=bytes(buf[n_s:n_e]),
        issuer_key_hash=bytes(buf[k_s:k_e]),
        serial=int.from_bytes(buf[i_s:i_e], "big", signed=True),
    )


def parse_request(der: bytes) -> OcspRequest:
    """Parse a DER ``OCSPRequest``; :class:`MalformedRequestError` for anything else."""
    if not isinstance(der, bytes | bytearray | memoryview):
        raise TypeError("der must be bytes")
    buf = bytes(der)
    if not buf:
        raise _fail("empty request")
    if len(buf) > MAX_REQUEST_BYTES:
        raise _fail(f"request larger than {MAX_REQUEST_BYTES} bytes")
    o_s, o_e = _expect(buf, 0, len(buf), 0x30, "OCSPRequest")
    if o_e != len(buf):
        raise _fail("trailing data after OCSPRequest")
    t_s, t_e = _expect(buf, o_s, o_e, 0x30, "TBSRequest")
    signed = False
    if t_e != o_e:
        tag, _s, s_e = _read(buf, t_e, o_e)
        if tag != 0xA0 or s_e != o_e:
            raise _fail("unexpected data after TBSRequest")
        signed = True
    pos = t_s
    tag, c_s, c_e = _read(buf, pos, t_e)
    if tag == 0xA0:  # version [0] EXPLICIT DEFAULT v1: tolerated when it says v1
        v_s, v_e = _expect(buf, c_s, c_e, 0x02, "version")
        if v_e != c_e or buf[v_s:v_e] != b"\x00":
            raise _fail("unsupported OCSP request version")
        pos = c_e
        tag, c_s, c_e = _read(buf, pos, t_e)
    if tag == 0xA1:  # requestorName: ignored
        pos = c_e
        tag, c_s, c_e = _read(buf, pos, t_e)
    if tag != 0x30:
        raise _fail("requestList missing")
    list_end = c_e
    cert_ids: list[CertId] = []
    p = c_s
    while p < list_end:
        r_s, r_e = _expect(buf, p, list_end, 0x30, "Request")
        p = r_e
        c_s2, c_e2 = _expect(buf, r_s, r_e, 0x30, "CertID")
        if c_e2 != r_e:
            tag2, x_s, x_e = _read(buf, c_e2, r_e)
            if tag2 != 0xA0 or x_e != r_e:
                raise _fail("unexpected data in Request")
            e_s, e_e = _expect(buf, x_s, x_e, 0x30, "singleRequestExtensions")
            if e_e != x_e:
                raise _fail("trailing data in singleRequestExtensions")
            _parse_extensions(buf, e_s, e_e)
        cert_ids.append(_parse_cert_id(buf, c_s2, c_e2))
        if len(cert_ids) > MAX_CERT_IDS:
            raise _fail(f"more than {MAX_CERT_IDS} certificates in one request")
    if not cert_ids:
        raise _fail("empty requestList")
    nonce: bytes | None = None
    if list_end != t_e:
        tag, x_s, x_e = _read(buf, list_end, t_e)
        if tag != 0xA2 or x_e != t_e:
            raise _fail("unexpected data after requestList")
        e_s, e_e = _expect(buf, x_s, x_e, 0x30, "requestExtensions")
        if e_e != x_e:
            raise _fail("trailing data in requestExtensions")
        nonce = _parse_extensions(buf, e_s, e_e)
    return OcspRequest(cert_ids=tuple(cert_ids), nonce=nonce, signed=signed)


#: Longest base64 text of a request of at most MAX_REQUEST_BYTES (with URL-encoding slack).
_MAX_GET_CHARS: Final = (MAX_REQUEST_BYTES + 2) // 3 * 4 * 3


def decode_get_path(encoded: str) -> bytes:
    """DER request from the path segment of a GET (RFC 5019 §5; RFC 6960 appendix A.1).

    The segment is ``url-encoding(base64(DER))``: ``%2F``, ``%2B``, ``%3D`` are decoded (also
    when the server already decoded them), and the URL-safe alphabet and missing padding are
    tolerated. Raises :class:`MalformedRequestError`.
    """
    if len(encoded) > _MAX_GET_CHARS:
        raise _fail("GET request too long")
    text = urllib.parse.unquote(encoded).strip().lstrip("/")
    if not text:
        raise _fail("empty GET request")
    text = text.replace("-", "+").replace("_", "/").rstrip("=")
    text += "=" * (-len(text) % 4)
    try:
        der = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _fail("GET request is not base64") from exc
    if len(der) > MAX_REQUEST_BYTES:
        raise _fail(f"request larger than {MAX_REQUEST_BYTES} bytes")
    return der


# --- issuer and responder identifiers ----------------------------------------------------------


def _subject_public_key_bits(cert: x509.Certificate) -> bytes:
    """Contents of the subjectPublicKey BIT STRING (without the unused-bits octet)."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    s, e = _expect(spki, 0, len(spki), 0x30, "SubjectPublicKeyInfo")
    _a_s, a_e = _expect(spki, s, e, 0x30, "algorithm")
    b_s, b_e = _expect(spki, a_e, e, 0x03, "subjectPublicKey")
    return spki[b_s + 1 : b_e]


def issuer_hashes(cert: x509.Certificate, hash_algorithm: str) -> tuple[bytes, bytes]:
    """(issuerNameHash, issuerKeyHash) that identify ``cert`` as issuer in a CertID."""
    if hash_algorithm not in _HASHES:
        raise ValueError(f"unsupported CertID hash algorithm {hash_algorithm!r}")
    name_hash = hashlib.new(hash_algorithm, cert.subject.public_bytes()).digest()
    key_hash = hashlib.new(hash_algorithm, _subject_public_key_bits(cert)).digest()
    return name_hash, key_hash


def responder_key_hash(cert: x509.Certificate) -> bytes:
    """``ResponderID.byKey``: SHA-1 of the responder's subjectPublicKey (RFC 6960 §4.2.1)."""
    return hashlib.sha1(_subject_public_key_bits(cert), usedforsecurity=False).digest()


# --- responses ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SingleResponse:
    """Status of one certificate, as it goes into a ``SingleResponse``."""

    cert_id: CertId
    status: CertStatusName
    this_update: dt.datetime
    next_update: dt.datetime | None
    revoked_at: dt.datetime | None = None
    reason: x509.ReasonFlags | None = None


def _integer(value: int) -> bytes:
    size = value.bit_length() // 8 + 1  # room for the sign bit
    return _der.tlv(0x02, value.to_bytes(size, "big", signed=True))


def _time(value: dt.datetime) -> bytes:
    if value.tzinfo is None:
        raise ValueError("naive datetime in an OCSP response")
    utc = value.astimezone(dt.UTC)
    return _der.tlv(0x18, utc.strftime("%Y%m%d%H%M%SZ").encode())


def encode_cert_id(cert_id: CertId) -> bytes:
    """Canonical DER ``CertID`` (hash AlgorithmIdentifier with NULL parameters)."""
    try:
        oid, _size = _HASHES[cert_id.hash_algorithm]
    except KeyError:
        raise ValueError(f"cannot encode CertID hash {cert_id.hash_algorithm!r}") from None
    alg = _der.tlv(0x30, _der.tlv(0x06, oid) + b"\x05\x00")
    return _der.tlv(
        0x30,
        alg
        + _der.tlv(0x04, cert_id.issuer_name_hash)
        + _der.tlv(0x04, cert_id.issuer_key_hash)
        + _integer(cert_id.serial),
    )


def _single(resp: SingleResponse) -> bytes:
    if resp.status == "good":
        status = b"\x80\x00"  # good [0] IMPLICIT NULL
    elif resp.status == "unknown":
        status = b"\x82\x00"  # unknown [2] IMPLICIT UnknownInfo (NULL)
    elif resp.status == "revoked":
        if resp.revoked_at is None:
            raise ValueError("a revoked SingleResponse needs revoked_at")
        info = _time(resp.revoked_at)
        if resp.reason is not None and resp.reason is not x509.ReasonFlags.unspecified:
            info += _der.tlv(0xA0, bytes((0x0A, 0x01, _REASON_CODES[resp.reason])))
        status = _der.tlv(0xA1, info)  # revoked [1] IMPLICIT RevokedInfo
    else:
        raise ValueError(f"unknown certificate status {resp.status!r}")
    body = encode_cert_id(resp.cert_id) + status + _time(resp.this_update)
    if resp.next_update is not None:
        body += _der.tlv(0xA0, _time(resp.next_update))
    return _der.tlv(0x30, body)


def build_response(
    responses: Sequence[SingleResponse],
    *,
    signer: Signer,
    responder_cert_der: bytes,
    responder_key_id: bytes,
    produced_at: dt.datetime,
) -> bytes:
    """A successful, signed ``OCSPResponse`` (DER) holding ``responses`` in order.

    ``signer`` holds the key of ``responder_cert_der`` (the delegated responder certificate,
    sent in ``certs``); ``responder_key_id`` is :func:`responder_key_hash` of that certificate.
    """
    if not responses:
        raise ValueError("an OCSP response needs at least one SingleResponse")
    sig_alg = _SIG_ALGS.get(signer.algorithm)
    if sig_alg is None:
        raise ValueError(f"unsupported responder key algorithm {signer.algorithm!r}")
    tbs = _der.tlv(
        0x30,
        _der.tlv(0xA2, _der.tlv(0x04, responder_key_id))  # responderID byKey [2] EXPLICIT
        + _time(produced_at)
        + _der.tlv(0x30, b"".join(_single(r) for r in responses)),
    )
    signature = signer.sign_bytes(tbs)
    basic = _der.tlv(
        0x30,
        tbs
        + sig_alg
        + _der.tlv(0x03, b"\x00" + signature)
        + _der.tlv(0xA0, _der.tlv(0x30, responder_cert_der)),
    )
    response_bytes = _der.tlv(0x30, _OCSP_BASIC + _der.tlv(0x04, basic))
    return _der.tlv(0x30, b"\x0a\x01\x00" + _der.tlv(0xA0, response_bytes))
