"""The pure OCSP module: request parsing (strict DER, limits, GET decoding) and response encoding
checked against cryptography's parser, signature verification and pkilint."""

from __future__ import annotations

import base64
import datetime as dt
import secrets
import urllib.parse

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp as cocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleettrust.revocation import ocsp
from fleettrust.signing.filekeys import FileSigner
from tests.pkilint_helpers import assert_pkilint_clean_ocsp

NOW = dt.datetime(2026, 11, 24, 12, 0, 0, tzinfo=dt.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey, serial: int, *, ca: bool = False,
          ocsp_signer: bool = False) -> x509.Certificate:
    b = (x509.CertificateBuilder().subject_name(_name(subject))
         .issuer_name(issuer.subject if issuer else _name(subject))
         .public_key(key.public_key()).serial_number(serial)
         .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca, None), True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
             issuer_key.public_key()), False))
    if ocsp_signer:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), False)
        b = b.add_extension(x509.OCSPNoCheck(), False)
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                          False), True)
    else:
        b = b.add_extension(x509.KeyUsage(not ca, False, False, False, False, ca, ca, False,
                                          False), True)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki() -> dict[str, object]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("CA", ca_key, None, ca_key, 1, ca=True)
    r_key = ec.generate_private_key(ec.SECP256R1())
    responder = _cert("OCSP responder", r_key, ca, ca_key, 2, ocsp_signer=True)
    dev_key = ec.generate_private_key(ec.SECP256R1())
    dev = _cert("device", dev_key, ca, ca_key, 0x1234567890ABCDEF1234567890)
    return {"ca": ca, "ca_key": ca_key, "responder": responder, "r_key": r_key, "dev": dev,
            "signer": FileSigner("file:ocsp-test-0123456789abcdef", r_key)}


def _request(cert: x509.Certificate, issuer: x509.Certificate,
             algorithm: hashes.HashAlgorithm | None = None, nonce: bytes | None = None) -> bytes:
    # SHA-1 is what RFC 5019 clients put in CertIDs (an identifier, not a signature)
    alg = algorithm or hashes.SHA1()  # noqa: S303
    b = cocsp.OCSPRequestBuilder().add_certificate(cert, issuer, alg)
    if nonce is not None:
        b = b.add_extension(x509.OCSPNonce(nonce), False)
    return b.build().public_bytes(serialization.Encoding.DER)


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    length = bytes([n]) if n < 128 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + \
        n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag]) + length + content


def _cert_id_der(cid: ocsp.CertId) -> bytes:
    return ocsp.encode_cert_id(cid)


@pytest.mark.parametrize(
    "alg", [hashes.SHA1(), hashes.SHA256(), hashes.SHA384(), hashes.SHA512()])  # noqa: S303
def test_parse_request_matches_cryptography(pki: dict[str, object],
                                            alg: hashes.HashAlgorithm) -> None:
    ca, dev = pki["ca"], pki["dev"]
    assert isinstance(ca, x509.Certificate)
    assert isinstance(dev, x509.Certificate)
    der = _request(dev, ca, alg, nonce=b"\x01" * 16)
    req = ocsp.parse_request(der)
    ref = cocsp.load_der_ocsp_request(der)
    (cid,) = req.cert_ids
    assert cid.hash_algorithm == alg.name
    assert cid.issuer_name_hash == ref.issuer_name_hash
    assert cid.issuer_key_hash == ref.issuer_key_hash
    assert cid.serial == dev.serial_number == ref.serial_number
    assert (cid.issuer_name_hash, cid.issuer_key_hash) == ocsp.issuer_hashes(ca, alg.name)
    assert req.nonce is not None
    assert req.nonce.endswith(b"\x01" * 16)
    assert not req.signed
    assert ocsp.parse_request(_request(dev, ca, alg)).nonce is None


def test_parse_request_several_and_signed(pki: dict[str, object]) -> None:
    ca, dev = pki["ca"], pki["dev"]
    assert isinstance(ca, x509.Certificate)
    assert isinstance(dev, x509.Certificate)
    cids = [ocsp.CertId("sha1", *ocsp.issuer_hashes(ca, "sha1"), serial=s) for s in (5, 6, 7)]
    reqs = b"".join(_tlv(0x30, _cert_id_der(c)) for c in cids)
    tbs = _tlv(0x30, _tlv(0xA0, b"\x02\x01\x00") + _tlv(0x30, reqs))
    signature = _tlv(0xA0, _tlv(0x30, _tlv(0x30, b"\x06\x08\x2a\x86\x48\xce\x3d\x04\x03\x02")
                                + b"\x03\x02\x00\x00"))
    parsed = ocsp.parse_request(_tlv(0x30, tbs + signature))
    assert [c.serial for c in parsed.cert_ids] == [5, 6, 7]
    assert parsed.signed
    too_many = b"".join(_tlv(0x30, _cert_id_der(cids[0])) for _ in range(ocsp.MAX_CERT_IDS + 1))
    with pytest.raises(ocsp.MalformedRequestError):
        ocsp.parse_request(_tlv(0x30, _tlv(0x30, _tlv(0x30, too_many))))


def test_unsupported_hash_is_not_malformed(pki: dict[str, object]) -> None:
    ca, dev = pki["ca"], pki["dev"]
    assert isinstance(ca, x509.Certificate)
    assert isinstance(dev, x509.Certificate)
    der = _request(dev, ca, hashes.SHA224())
    (cid,) = ocsp.parse_request(der).cert_ids
    assert cid.hash_algorithm == "unsupported"


def _malformed_cases(good: bytes) -> dict[str, bytes]:
    return {
        "empty": b"",
        "garbage": b"this is not an OCSP request at all",
        "one byte": b"\x30",
        "truncated": good[:-1],
        "truncated half": good[: len(good) // 2],
        "trailing": good + b"\x00",
        "indefinite length": b"\x30\x80" + good[2:] + b"\x00\x00",
        "empty sequence": b"\x30\x00",
        "empty request list": _tlv(0x30, _tlv(0x30, _tlv(0x30, b""))),
        "oversized": _tlv(0x30, b"\x00" * (ocsp.MAX_REQUEST_BYTES + 10)),
        "non-minimal length": b"\x30\x81" + bytes([len(good) - 2]) + good[2:],
        "wrong outer tag": b"\x31" + good[1:],
        "version 2": _tlv(0x30, _tlv(0x30, _tlv(0xA0, b"\x02\x01\x01") + good[4:])),
        "bad params": good.replace(b"\x05\x00", b"\x04\x00", 1),
        "critical unknown extension": _tlv(0x30, _tlv(0x30, good[4:] + _tlv(0xA2, _tlv(0x30, _tlv(
            0x30, b"\x06\x03\x2a\x03\x04" + b"\x01\x01\xff" + b"\x04\x00"))))),
        "random": bytes(range(256)) * 3,
    }


def test_malformed_requests_raise(pki: dict[str, object]) -> None:
    ca, dev = pki["ca"], pki["dev"]
    assert isinstance(ca, x509.Certificate)
    assert isinstance(dev, x509.Certificate)
    good = _request(dev, ca)
    assert good[1] < 0x80  # the cases below assume a short-form outer length
    ocsp.parse_request(good)
    for name, der in _malformed_cases(good).items():
        with pytest.raises(ocsp.MalformedRequestError):  # noqa: PT012
            ocsp.parse_request(der)
            pytest.fail(f"{name} parsed")  # only reached if the case was accepted
    # every truncation of a valid request is refused, never an IndexError
    for n in range(len(good)):
        with pytest.raises(ocsp.MalformedRequestError):
            ocsp.parse_request(good[:n])


def test_decode_get_path(pki: dict[str, object]) -> None:
    ca, dev = pki["ca"], pki["dev"]
    assert isinstance(ca, x509.Certificate)
    assert isinstance(dev, x509.Certificate)
    # find a request whose base64 has '/', '+' and '=' so every escape is exercised
    der = b""
    for i in range(2000):
        der = _request(dev, ca, nonce=secrets.token_bytes(12 + i % 3))
        text = base64.b64encode(der).decode()
        if "/" in text and "+" in text and text.endswith("="):
            break
    text = base64.b64encode(der).decode()
    assert ocsp.decode_get_path(text) == der
    assert ocsp.decode_get_path(urllib.parse.quote(text, safe="")) == der
    assert ocsp.decode_get_path(text.rstrip("=")) == der
    assert ocsp.decode_get_path(base64.urlsafe_b64encode(der).decode()) == der
    for bad in ["", "/", "!!!!", "%zz", "A" * 20000]:
        with pytest.raises(ocsp.MalformedRequestError):
            ocsp.decode_get_path(bad)


def test_reason_flag_names() -> None:
    assert ocsp.reason_flag("keyCompromise") is x509.ReasonFlags.key_compromise
    assert ocsp.reason_flag("key_compromise") is x509.ReasonFlags.key_compromise
    assert ocsp.reason_flag("cACompromise") is x509.ReasonFlags.ca_compromise
    assert ocsp.reason_flag("certificateHold") is x509.ReasonFlags.certificate_hold
    assert ocsp.reason_flag("nonsense") is x509.ReasonFlags.unspecified
    assert ocsp.reason_flag(None) is None


def test_error_responses() -> None:
    for status in ocsp.ResponseStatus:
        if status is ocsp.ResponseStatus.SUCCESSFUL:
            continue
        resp = cocsp.load_der_ocsp_response(ocsp.error_response(status))
        assert resp.response_status.value == int(status)
    with pytest.raises(ValueError, match="responseBytes"):
        ocsp.error_response(ocsp.ResponseStatus.SUCCESSFUL)


@pytest.mark.parametrize("alg", ["sha1", "sha256"])
def test_build_response_good_revoked_unknown(pki: dict[str, object], alg: str) -> None:
    ca, dev, responder, r_key, signer = (pki["ca"], pki["dev"], pki["responder"], pki["r_key"],
                                         pki["signer"])
    assert isinstance(ca, x509.Certificate)
    assert isinstance(dev, x509.Certificate)
    assert isinstance(responder, x509.Certificate)
    assert isinstance(signer, FileSigner)
    assert isinstance(r_key, ec.EllipticCurvePrivateKey)
    cid = ocsp.CertId(alg, *ocsp.issuer_hashes(ca, alg), serial=dev.serial_number)
    rder = responder.public_bytes(serialization.Encoding.DER)
    key_id = ocsp.responder_key_hash(responder)
    assert key_id == x509.SubjectKeyIdentifier.from_public_key(r_key.public_key()).digest
    cases: list[tuple[ocsp.CertStatusName, dt.datetime | None, x509.ReasonFlags | None,
                      cocsp.OCSPCertStatus]] = [
        ("good", None, None, cocsp.OCSPCertStatus.GOOD),
        ("revoked", NOW - dt.timedelta(hours=2), x509.ReasonFlags.key_compromise,
         cocsp.OCSPCertStatus.REVOKED),
        ("revoked", NOW - dt.timedelta(hours=1), x509.ReasonFlags.certificate_hold,
         cocsp.OCSPCertStatus.REVOKED),
        ("revoked", NOW - dt.timedelta(hours=1), x509.ReasonFlags.unspecified,
         cocsp.OCSPCertStatus.REVOKED),
        ("unknown", None, None, cocsp.OCSPCertStatus.UNKNOWN),
    ]
    for status, revoked_at, reason, expected in cases:
        der = ocsp.build_response(
            [ocsp.SingleResponse(cid, status, NOW, NOW + dt.timedelta(hours=1),
                                 revoked_at, reason)],
            signer=signer, responder_cert_der=rder, responder_key_id=key_id, produced_at=NOW)
        resp = cocsp.load_der_ocsp_response(der)
        assert resp.response_status is cocsp.OCSPResponseStatus.SUCCESSFUL
        assert resp.certificate_status is expected
        assert resp.serial_number == dev.serial_number
        assert resp.hash_algorithm.name == alg
        assert resp.issuer_key_hash == cid.issuer_key_hash
        assert resp.responder_key_hash == key_id
        assert resp.responder_name is None
        assert resp.produced_at_utc == NOW == resp.this_update_utc
        assert resp.next_update_utc == NOW + dt.timedelta(hours=1)
        assert [c.serial_number for c in resp.certificates] == [responder.serial_number]
        assert len(resp.extensions) == 0  # no nonce echoed
        r_key.public_key().verify(resp.signature, resp.tbs_response_bytes,
                                  ec.ECDSA(hashes.SHA256()))
        if status == "revoked":
            assert resp.revocation_time_utc == revoked_at
            # unspecified is left out (RFC 5280 §5.3.1)
            assert resp.revocation_reason == (None if reason is x509.ReasonFlags.unspecified
                                               else reason)
        assert_pkilint_clean_ocsp(der)


def test_build_response_several(pki: dict[str, object]) -> None:
    ca, responder, signer = pki["ca"], pki["responder"], pki["signer"]
    assert isinstance(ca, x509.Certificate)
    assert isinstance(responder, x509.Certificate)
    assert isinstance(signer, FileSigner)
    wanted: list[tuple[int, ocsp.CertStatusName]] = [(10, "good"), (11, "revoked"),
                                                     (12, "unknown")]
    singles = [
        ocsp.SingleResponse(ocsp.CertId("sha256", *ocsp.issuer_hashes(ca, "sha256"), serial=s),
                            st, NOW, NOW + dt.timedelta(hours=1), NOW if st == "revoked" else None)
        for s, st in wanted
    ]
    der = ocsp.build_response(singles, signer=signer,
                              responder_cert_der=responder.public_bytes(serialization.Encoding.DER),
                              responder_key_id=ocsp.responder_key_hash(responder), produced_at=NOW)
    resp = cocsp.load_der_ocsp_response(der)
    got = [(r.serial_number, r.certificate_status) for r in resp.responses]
    assert got == [(10, cocsp.OCSPCertStatus.GOOD), (11, cocsp.OCSPCertStatus.REVOKED),
                   (12, cocsp.OCSPCertStatus.UNKNOWN)]
    assert_pkilint_clean_ocsp(der)
    with pytest.raises(ValueError, match="at least one"):
        ocsp.build_response([], signer=signer, responder_cert_der=b"", responder_key_id=b"",
                            produced_at=NOW)
