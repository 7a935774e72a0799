"""Bad input over HTTP: every refusal is a precise RFC 9457 problem document and leaves no row
behind (table counts and key-store files compared before and after); no input produces a 500
(seeded fuzzing of every POST route and of path parameters)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import random
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleettrust.api.routes import router
from fleettrust.services import hierarchy
from fleettrust.services.context import ServiceContext
from tests.api.test_api import (
    PROBLEM,
    TestClient,
    assert_problem,
    bearer,
    make_client,
    table_counts,
)
from tests.conftest import (
    Hierarchy,
    LiveServer,
    device_csr,
    make_principal,
    make_token,
    manifest,
)


@dataclass
class Env:
    ctx: ServiceContext
    api: TestClient
    admin: dict[str, str]
    factory: dict[str, str]
    factory_id: str
    batch_id: str
    device_id: str


@pytest.fixture
def env(ctx: ServiceContext, fleet: Hierarchy, factory: hierarchy.FactoryCreated,
        batch: hierarchy.BatchCreated) -> Iterator[Env]:
    admin = bearer(make_token(ctx, "admin", "alice"))
    fac = bearer(factory.token)
    with make_client(ctx) as api:
        r = api.post(f"/v1/batches/{batch.batch.id}/devices", headers=fac,
                     json={"csr": device_csr()[0], "manifest": manifest()})
        assert r.status_code == 201, r.text
        yield Env(ctx, api, admin, fac, factory.factory.id, batch.batch.id,
                  r.json()["devices"][0]["device_id"])


def key_files(ctx: ServiceContext) -> int:
    keys = ctx.settings.keys_dir
    return sum(1 for _ in keys.rglob("*")) if keys.exists() else 0


class NoRowBehind:
    """Context manager: the database (and key store) are unchanged across the block."""

    def __init__(self, ctx: ServiceContext, allow: dict[str, int] | None = None) -> None:
        self.ctx = ctx
        self.allow = allow or {}

    def __enter__(self) -> NoRowBehind:
        self.before = table_counts(self.ctx)
        self.keys = key_files(self.ctx)
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            return
        after = table_counts(self.ctx)
        expected = {t: n + self.allow.get(t, 0) for t, n in self.before.items()}
        assert after == expected, {t: (self.before[t], after[t]) for t in after
                                   if after[t] != expected[t]}
        assert key_files(self.ctx) == self.keys


def tampered(csr_pem: str) -> str:
    """The same CSR with one byte of the subject changed: parses, signature fails."""
    der = x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    i = der.index(b"device")
    bad = der[:i] + b"devicf" + der[i + 6:]
    b64 = base64.encodebytes(bad).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{b64}-----END CERTIFICATE REQUEST-----\n"


def csr_with_key(key: Any) -> str:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "device")]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


# --- body syntax, content type, size ----------------------------------------------------------


def check_malformed_json(env: Env) -> None:
    with NoRowBehind(env.ctx):
        r = env.api.post("/v1/factories", content=b'{"name": "x",', headers={
            **env.admin, "content-type": "application/json"})
        body = assert_problem(r, 400, "malformed_json")
        assert "not valid JSON" in body["detail"]
        for raw in (b"\xff\xfe", b"{'name': 'x'}", b"nul", b'{"name": "x"} trailing'):
            r = env.api.post("/v1/factories", content=raw,
                             headers={**env.admin, "content-type": "application/json"})
            assert_problem(r, 400, "malformed_json")


def check_json_that_cannot_be_read(env: Env) -> None:
    with NoRowBehind(env.ctx):
        for raw in (b"[" * 100_000, b'{"planned_size": ' + b"9" * 5000 + b"}"):
            r = env.api.post(f"/v1/factories/{env.factory_id}/batches", content=raw,
                             headers={**env.factory, "content-type": "application/json"})
            assert_problem(r, 400, "malformed_body")


def check_unknown_missing_and_wrongly_typed_fields(env: Env) -> None:
    with NoRowBehind(env.ctx):
        body = assert_problem(env.api.post("/v1/factories", headers=env.admin,
                                           json={"name": "F9", "colour": "red"}),
                              422, "unknown_field")
        assert "colour" in body["detail"]
        assert body["errors"][0]["location"] == "body.colour"
        body = assert_problem(env.api.post("/v1/tokens", headers=env.admin,
                                           json={"role": "auditor"}), 422, "missing_field")
        assert "body.subject" in body["detail"]
        assert_problem(env.api.post("/v1/tokens", headers={**env.admin,
                                                           "content-type": "application/json"}),
                       422, "missing_body")
        assert_problem(env.api.post("/v1/factories", headers=env.admin, json=["F9"]),
                       422, "invalid_request")
        body = assert_problem(env.api.post("/v1/factories", headers=env.admin,
                                           json={"name": "F9", "batch_cas": "perhaps"}),
                              422, "invalid_request")
        assert "body.batch_cas" in body["detail"]
        assert_problem(env.api.post("/v1/factories", headers=env.admin,
                                    json={"name": "F9", "key_location": "moon"}),
                       422, "invalid_request")
        assert_problem(env.api.post("/v1/factories", headers=env.admin, json={"name": "x" * 101}),
                       422, "value_too_long")
        assert_problem(env.api.post("/v1/factories", headers=env.admin, json={"name": "a\x00b"}),
                       422, "bad_name")


def check_wrong_content_type(env: Env) -> None:
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", "application/xml"):
        headers = dict(env.admin)
        if content_type:
            headers["content-type"] = content_type
        with NoRowBehind(env.ctx):
            body = assert_problem(env.api.post("/v1/tokens", headers=headers,
                                               content=b'{"role": "auditor", "subject": "x"}'),
                                  415, "unsupported_media_type")
            assert "application/json" in body["detail"]
            assert (content_type or "none") in body["detail"]
    # JSON with parameters or a +json subtype is fine
    r = env.api.post("/v1/tokens", content=b'{"role": "auditor", "subject": "x"}',
                     headers={**env.admin, "content-type": "application/json; charset=utf-8"})
    assert r.status_code == 201, r.text


def check_oversized_body(env: Env) -> None:
    limit = env.ctx.settings.max_body_bytes
    assert limit == 1 << 20
    big = json.dumps({"name": "F", "pad": "x" * limit}).encode()
    with NoRowBehind(env.ctx):
        body = assert_problem(env.api.post("/v1/factories", content=big, headers={
            **env.admin, "content-type": "application/json"}), 413, "request_too_large")
        assert str(limit) in body["detail"]
        # the limit applies whatever the route and before authentication
        assert_problem(env.api.post("/v1/claims", content=big,
                                    headers={"content-type": "application/json"}),
                       413, "request_too_large")
    # bulk routes have their own, larger limit
    r = env.api.post(f"/v1/batches/{env.batch_id}/devices/bulk", content=big, headers={
        **env.factory, "content-type": "application/json"})
    assert r.status_code == 422, r.text  # read and validated, not refused for its size


def _raw_post(port: int, path: str, headers: list[str], chunks: list[bytes]) -> bytes:
    """POST with Transfer-Encoding: chunked (no Content-Length); returns the raw response."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Transfer-Encoding: chunked",
                "Content-Type: application/json", *headers, "", ""]
        sock.sendall("\r\n".join(head).encode())
        try:
            for chunk in chunks:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading everything
        data = b""
        try:
            while True:
                part = sock.recv(65536)
                if not part:
                    break
                data += part
                if b"\r\n\r\n" in data:
                    head_end = data.index(b"\r\n\r\n")
                    length = [ln for ln in data[:head_end].split(b"\r\n")
                              if ln.lower().startswith(b"content-length:")]
                    if length and len(data) >= head_end + 4 + int(length[0].split(b":")[1]):
                        break
        except ConnectionResetError:
            pass
        return data


def test_chunked_body_over_the_limit(ctx: ServiceContext) -> None:
    token = make_token(ctx, "admin", "alice")
    limit = ctx.settings.max_body_bytes
    before = table_counts(ctx)
    with LiveServer(ctx) as srv:
        # a small chunked body is fine
        ok = _raw_post(srv.port, "/v1/tokens", [f"Authorization: Bearer {token}"],
                       [b'{"role": "auditor",', b' "subject": "chunky"}'])
        assert ok.startswith(b"HTTP/1.1 201"), ok[:300]
        # more than the limit, in 64 KiB chunks, with no Content-Length
        piece = b"x" * 65536
        chunks = [b'{"role": "auditor", "subject": "big", "pad": "'] + [piece] * (
            limit // len(piece) + 2) + [b'"}']
        raw = _raw_post(srv.port, "/v1/tokens", [f"Authorization: Bearer {token}"], chunks)
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert PROBLEM.encode() in head.lower()
    problem = json.loads(payload)
    assert problem["code"] == "request_too_large"
    assert str(limit) in problem["detail"]
    after = table_counts(ctx)
    assert after["api_tokens"] == before["api_tokens"] + 1  # only the small request's token
    assert after["audit_events"] == before["audit_events"] + 1


def check_bulk_over_max_items(env: Env) -> None:
    n = env.ctx.settings.max_bulk_items + 1
    items = [{"csr": "x", "manifest": {}}] * n
    with NoRowBehind(env.ctx):
        body = assert_problem(env.api.post(f"/v1/batches/{env.batch_id}/devices/bulk",
                                           headers=env.factory, json={"items": items}),
                              422, "too_many_items")
        assert str(n - 1) in body["detail"]
        assert_problem(env.api.post(f"/v1/batches/{env.batch_id}/devices/bulk",
                                    headers=env.factory, json={"items": []}),
                       422, "invalid_request")


def check_bulk_reports_every_bad_line_and_writes_nothing(env: Env) -> None:
    good = [{"csr": device_csr()[0], "manifest": manifest()} for _ in range(3)]
    bad_mac = {"csr": device_csr()[0], "manifest": {"mac_addresses": ["zz:zz"]}}
    dup = {**good[0], "csr": device_csr()[0]}  # same manifest is allowed; same id is not
    dup["device_id"] = good[1]["device_id"] = "dup-1"
    items = [good[0], bad_mac, good[1], {"csr": "garbage", "manifest": manifest()}, dup, good[2]]
    with NoRowBehind(env.ctx):
        body = assert_problem(env.api.post(f"/v1/batches/{env.batch_id}/devices/bulk",
                                           headers=env.factory, json={"items": items}),
                              422, "bulk_rejected")
    by_line = {e["line"]: e["code"] for e in body["errors"]}
    assert by_line == {2: "manifest_invalid", 4: "csr_malformed", 5: "duplicate_device_id"}


# --- CSRs, device ids, manifests ----------------------------------------------------------------


def check_bad_csrs(env: Env) -> None:
    url = f"/v1/batches/{env.batch_id}/devices"
    good, _ = device_csr()
    cases = [
        ("garbage", "csr_malformed"),
        ("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
         "csr_malformed"),
        (tampered(good), "csr_bad_signature"),
        ("A" * 16385, "csr_too_large"),
        (csr_with_key(ec.generate_private_key(ec.SECP521R1())), "key_not_allowed"),
        (csr_with_key(ec.generate_private_key(ec.SECP256K1())), "key_not_allowed"),
    ]
    with NoRowBehind(env.ctx):
        for csr, code in cases:
            r = env.api.post(url, headers=env.factory, json={"csr": csr, "manifest": manifest()})
            assert_problem(r, 422, code)
        # the factory CA CSR route checks the same way
        assert_problem(env.api.post(f"/v1/factories/{env.factory_id}/ca-csr", headers=env.admin,
                                    json={"csr_pem": tampered(good)}), 422, "csr_bad_signature")


def check_reused_key_and_existing_device(env: Env) -> None:
    url = f"/v1/batches/{env.batch_id}/devices"
    key = ec.generate_private_key(ec.SECP256R1())
    r = env.api.post(url, headers=env.factory,
                     json={"csr": csr_with_key(key), "manifest": manifest(), "device_id": "k-1"})
    assert r.status_code == 201, r.text
    with NoRowBehind(env.ctx):
        assert_problem(env.api.post(url, headers=env.factory, json={
            "csr": csr_with_key(key), "manifest": manifest()}), 422, "key_reused")
        assert_problem(env.api.post(url, headers=env.factory, json={
            "csr": device_csr()[0], "manifest": manifest(), "device_id": "k-1"}),
            409, "device_exists")


def check_bad_device_id(env: Env) -> None:
    csr = device_csr()[0]
    with NoRowBehind(env.ctx):
        for device_id in ("", "-lead", "has space", "x" * 65, "ünï", "a/b", "a\x00"):
            r = env.api.post(f"/v1/batches/{env.batch_id}/devices", headers=env.factory,
                             json={"csr": csr, "manifest": manifest(), "device_id": device_id})
            assert_problem(r, 422,
                           "value_too_long" if len(device_id) > 64 else "invalid_device_id")


BAD_MANIFESTS: list[tuple[dict[str, Any], str, str]] = [
    ({"mac_addresses": ["02:00:00:00:00:zz"]}, "mac_addresses", "not a MAC address"),
    ({"mac_addresses": ["ff:ff:ff:ff:ff:ff"]}, "mac_addresses", "multicast"),
    ({"imei": "490154203237519"}, "imei", "Luhn"),
    ({"imei": "49015420323751"}, "imei", "15 decimal digits"),
    ({"serial_no": "x"}, "serial_no", "unknown manifest key"),
    ({"cpu_serial": " padded"}, "cpu_serial", "whitespace"),
    ({}, "", "at least one hardware identifier"),
]


def check_bad_manifest(env: Env) -> None:
    csr = device_csr()[0]
    ss = hierarchy.create_batch(
        env.ctx, make_principal(env.ctx, "admin", "root"), env.factory_id, name="SS",
        product_model="M", hardware_revision="r", planned_size=5,
        manufactured_on=dt.date(2026, 1, 1), auth_method="shared_secret")
    with NoRowBehind(env.ctx):
        for bad, field, words in BAD_MANIFESTS:
            r = env.api.post(f"/v1/batches/{env.batch_id}/devices", headers=env.factory,
                             json={"csr": csr, "manifest": bad})
            body = assert_problem(r, 422, "manifest_invalid")
            assert words in body["detail"]
            assert body["field"] == field
            # shared-secret registration validates manifests the same way
            r = env.api.post(f"/v1/batches/{ss.batch.id}/devices/register", headers=env.factory,
                             json={"items": [{"manifest": bad}]})
            assert assert_problem(r, 422, "manifest_invalid")["detail"] == body["detail"]


# --- authentication, paths, queries, dates ------------------------------------------------------


def check_missing_or_bad_authorization(env: Env) -> None:
    cases = [
        ({}, "no_token"),
        ({"Authorization": "Basic YWxpY2U6c2VjcmV0"}, "token_malformed"),
        ({"Authorization": "Bearer"}, "token_malformed"),
        ({"Authorization": "Bearer not-a-token"}, "token_malformed"),
        ({"Authorization": "Bearer ft1.tok_0000000000000000." + "A" * 43}, "token_invalid"),
    ]
    with NoRowBehind(env.ctx):
        for headers, code in cases:
            r = env.api.post("/v1/factories", headers=headers, json={"name": "F9"})
            assert_problem(r, 401, code)
            assert r.headers["www-authenticate"].startswith("Bearer")


def check_ids_that_do_not_exist(env: Env) -> None:
    a = env.admin
    device = {"csr": device_csr()[0], "manifest": manifest()}
    batch = {"name": "B", "product_model": "M", "hardware_revision": "r", "planned_size": 1,
             "manufactured_on": "2026-01-01"}
    with NoRowBehind(env.ctx):
        assert_problem(env.api.get("/v1/factories/fac_nope", headers=a), 404, "factory_not_found")
        assert_problem(env.api.get("/v1/batches/bat_nope", headers=a), 404, "batch_not_found")
        assert_problem(env.api.get("/v1/devices/d-nope", headers=a), 404, "device_not_found")
        assert_problem(env.api.post("/v1/batches/bat_nope/devices", headers=a, json=device),
                       404, "batch_not_found")
        assert_problem(env.api.post("/v1/batches/bat_nope/devices/register", headers=a,
                                    json={"items": [{"manifest": manifest()}]}),
                       404, "batch_not_found")
        assert_problem(env.api.post("/v1/devices/d-nope/claim-code", headers=a, json={}),
                       404, "device_not_found")
        assert_problem(env.api.delete("/v1/devices/d-nope/claim-code", headers=a),
                       404, "device_not_found")
        assert_problem(env.api.delete("/v1/tokens/tok_nope", headers=a), 404, "token_not_found")
        assert_problem(env.api.post("/v1/tokens", headers=a, json={
            "role": "factory", "subject": "s", "factory_id": "fac_nope"}),
            404, "factory_not_found")
        assert_problem(env.api.get("/ca/ca_nope.der"), 404, "ca_not_found")
        # hierarchy routes: 404 with a not-found code naming the factory
        for resp in (env.api.post("/v1/factories/fac_nope/batches", headers=a, json=batch),
                     env.api.post("/v1/factories/fac_nope/ca-csr", headers=a,
                                  json={"csr_pem": device_csr()[0]})):
            assert resp.status_code == 404, resp.text
            assert resp.json()["code"] in ("factory_not_found", "not_found")
            assert "fac_nope" in resp.json()["detail"]


def check_malformed_path_ids(env: Env) -> None:
    with NoRowBehind(env.ctx):
        for path in ("/v1/devices/a%00b", "/v1/devices/has%20space", "/v1/batches/" + "x" * 65,
                     "/v1/factories/%C3%BC", "/v1/tokens/.x", "/ca/%00.der"):
            r = env.api.request("DELETE" if path.startswith("/v1/tokens") else "GET", path,
                                headers=env.admin)
            body = assert_problem(r, 422, "invalid_path_parameter")
            assert body["detail"].startswith("path.")


def check_bad_query_parameters_and_methods(env: Env) -> None:
    a = env.admin
    with NoRowBehind(env.ctx):
        for params in ({"limit": 0}, {"limit": "many"}, {"batch_id": "a\x00"}, {"after": "é"}):
            assert_problem(env.api.get("/v1/devices", params=params, headers=a),
                           422, "invalid_query_parameter")
        assert_problem(env.api.get("/v1/findings", params={"status": "all"}, headers=a),
                       422, "invalid_query_parameter")
        assert_problem(env.api.get("/v1/audit", params={"target_id": "\x00"}, headers=a),
                       422, "invalid_query_parameter")
        r = env.api.put("/v1/factories", headers=a, json={"name": "x"})
        body = assert_problem(r, 405, "method_not_allowed")
        assert "POST" in r.headers["allow"]
        assert "PUT" in body["detail"]


def check_malformed_dates(env: Env) -> None:
    with NoRowBehind(env.ctx):
        for date in ("2026-02-30", "2026-13-01", "yesterday", "20261120x", "", "2026-11-20T25:00",
                     None, 3.5, [2026, 1, 1]):
            r = env.api.post(f"/v1/factories/{env.factory_id}/batches", headers=env.factory,
                             json={"name": "B9", "product_model": "M", "hardware_revision": "r",
                                   "planned_size": 1, "manufactured_on": date})
            body = assert_problem(r, 422, "invalid_date")
            assert "body.manufactured_on" in body["detail"]


def check_other_service_refusals_are_precise(env: Env) -> None:
    with NoRowBehind(env.ctx):
        assert_problem(env.api.post("/v1/factories", headers=env.admin,
                                    json={"name": "Shenzhen Line 1"}), 409, "factory_exists")
        assert_problem(env.api.post(f"/v1/factories/{env.factory_id}/batches",
                                    headers=env.factory, json={
                                        "name": "B-2026-11", "product_model": "M",
                                        "hardware_revision": "r", "planned_size": 1,
                                        "manufactured_on": "2026-01-01"}), 409, "batch_exists")
        assert_problem(env.api.post(f"/v1/batches/{env.batch_id}/devices/generate",
                                    headers=env.factory, json={
                                        "manifest": manifest(), "passphrase": "short"}),
                       422, "invalid_request")
        assert_problem(env.api.post("/v1/tokens", headers=env.admin,
                                    json={"role": "root", "subject": "x"}), 422, "invalid_input")
        assert_problem(env.api.post("/v1/device-auth/response", json={
            "device_id": env.device_id, "nonce": "n" * 32, "mac": "zz"}),
            401, "response_malformed")
        assert_problem(env.api.post("/v1/hierarchy/fleet-ca/certificate", headers=env.admin,
                                    json={"certificate_pem": "x", "root_pem": "y"}),
                       422, "cert_malformed")
    # a malformed claim code is refused precisely and counts as a failed attempt
    owner = bearer(make_token(env.ctx, "device-owner", "bob"))
    with NoRowBehind(env.ctx, allow={"claim_attempts": 1}):
        assert_problem(env.api.post("/v1/claims", headers=owner, json={"code": "1234"}),
                       422, "claim_code_malformed")


# --- fuzzing: no input produces a 500 -----------------------------------------------------------

_STRINGS = ["", " ", "x", "x" * 300, "\x00", "a\x00b", "\u202e", "é", "😀", "../../etc/passwd",
            "' OR 1=1 --", "%s%n", "FT1-" + "A" * 32, "2026-02-30", "2026-11-20", "true",
            "-----BEGIN CERTIFICATE REQUEST-----\n\n-----END CERTIFICATE REQUEST-----",
            "ft1.tok_0000000000000000." + "A" * 43, "d-1", "bat_x", "0" * 64]


def _value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 12, 2**31, -(2**63), 2**64 + 1, 10**30])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e308, float("inf")])
    if kind in (4, 5, 6, 7):
        return rng.choice(_STRINGS)
    if kind in (8, 9):
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["cpu_serial", "mac_addresses", "imei", "other", "name", "x", "", "\x00"]
    return {rng.choice(keys): _value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _mutate(rng: random.Random, template: dict[str, Any]) -> bytes:
    body = json.loads(json.dumps(template))
    choice = rng.randrange(7)
    if choice == 0 and body:  # one field gets a random value
        body[rng.choice(list(body))] = _value(rng)
    elif choice == 1:  # an extra field
        body[rng.choice(["extra", "id", "owner", "__proto__"])] = _value(rng)
    elif choice == 2 and body:  # a field goes missing
        body.pop(rng.choice(list(body)))
    elif choice == 3:  # every field random
        body = {k: _value(rng) for k in body}
    elif choice == 4:  # any JSON at all
        body = _value(rng)
    elif choice == 5:  # nested fields get random values
        for v in body.values():
            if isinstance(v, dict) and v:
                v[rng.choice(list(v))] = _value(rng)
            if isinstance(v, list) and v and isinstance(v[0], dict):
                v[0][rng.choice(list(v[0]))] = _value(rng)
    else:  # broken text
        raw = json.dumps(template).encode()
        cut = rng.randrange(len(raw) + 1)
        return raw[:cut] + bytes(rng.randrange(256) for _ in range(rng.randrange(4)))
    return json.dumps(body, allow_nan=True).encode()


def _templates(env: Env) -> dict[str, tuple[dict[str, str], dict[str, Any]]]:
    dev = {"csr": device_csr()[0], "manifest": {"cpu_serial": "C1", "imei": "490154203237518",
                                                "mac_addresses": ["02:00:00:00:00:01"]},
           "device_id": "fz-1", "station": "s"}
    owner = bearer(make_token(env.ctx, "device-owner", "fuzzy"))
    b = env.batch_id
    return {
        "/v1/hierarchy/fleet-ca/csr": (env.admin, {"common_name": "Fleet CA"}),
        "/v1/hierarchy/fleet-ca/certificate": (env.admin, {"certificate_pem": "x",
                                                           "root_pem": "y"}),
        "/v1/factories": (env.admin, {"name": "Fz", "batch_cas": False,
                                      "key_location": "platform"}),
        f"/v1/factories/{env.factory_id}/ca-csr": (env.admin, {"csr_pem": dev["csr"]}),
        f"/v1/factories/{env.factory_id}/batches": (env.factory, {
            "name": "Bz", "product_model": "M", "hardware_revision": "r", "planned_size": 5,
            "manufactured_on": "2026-01-01", "own_ca": False, "auth_method": "certificate"}),
        f"/v1/batches/{b}/devices": (env.factory, dev),
        f"/v1/batches/{b}/devices/bulk": (env.factory, {"items": [dev]}),
        f"/v1/batches/{b}/devices/generate": (env.factory, {
            "manifest": dev["manifest"], "passphrase": "p" * 12, "key_format": "pkcs8",
            "device_id": "fz-2", "station": "s"}),
        f"/v1/batches/{b}/devices/register": (env.factory, {"items": [{
            "manifest": dev["manifest"], "device_id": "fz-3"}]}),
        f"/v1/devices/{env.device_id}/claim-code": (env.admin, {"ttl_days": 3}),
        "/v1/claims": (owner, {"code": "FT1-" + "A" * 32}),
        "/v1/device-auth/challenge": ({}, {"device_id": env.device_id}),
        "/v1/device-auth/response": ({}, {"device_id": env.device_id, "nonce": "n" * 32,
                                          "mac": "0" * 64}),
        "/v1/tokens": (env.admin, {"role": "auditor", "subject": "fz", "factory_id": None,
                                   "ttl_days": 1}),
    }


#: Bodies per POST route. Request handling is the same on both backends, so PostgreSQL (which
#: adds failure modes such as NUL characters reaching a query) runs half as many, other seeds.
FUZZ_PER_ROUTE = {"sqlite": 200, "postgresql": 100}


def check_fuzz_post_routes(env: Env) -> None:
    templates = _templates(env)
    post_routes = {r.path for r in router.routes if "POST" in getattr(r, "methods", set())}

    def route_of(path: str) -> str:
        return (path.replace(env.factory_id, "{factory_id}").replace(env.batch_id, "{batch_id}")
                .replace(env.device_id, "{device_id}"))

    assert {route_of(p) for p in templates} == post_routes
    backend = env.ctx.engine.dialect.name
    for path, (headers, template) in templates.items():
        rng = random.Random(f"{backend} {route_of(path)}")  # seeded per backend and route
        for i in range(FUZZ_PER_ROUTE[backend]):
            body = _mutate(rng, template)
            r = env.api.post(path, content=body,
                             headers={**headers, "content-type": "application/json"})
            assert r.status_code < 500, (path, i, body[:300], r.text)
            if r.status_code >= 400:
                assert r.headers["content-type"].startswith(PROBLEM), (path, body[:300])
                assert r.json()["code"], (path, body[:300])


def check_fuzz_path_parameters(env: Env) -> None:
    rng = random.Random(404)
    templates = [("GET", "/v1/factories/{}"), ("GET", "/v1/factories/{}/batches"),
                 ("GET", "/v1/batches/{}"), ("GET", "/v1/devices/{}"), ("GET", "/ca/{}.der"),
                 ("DELETE", "/v1/tokens/{}"), ("DELETE", "/v1/devices/{}/claim-code")]
    alphabet = "aZ09._-~ %\x00\x01\x7f/\\?#é😀"
    for method, template in templates:
        for _ in range(40):
            raw = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 80)))
            r = env.api.request(method, template.format(quote(raw, safe="")), headers=env.admin)
            assert r.status_code < 500, (method, template, raw, r.text)
            assert r.headers["content-type"].startswith((PROBLEM, "application/json")), raw


def check_no_500_for_dates_in_the_past_or_far_future(env: Env) -> None:
    for day in ("0001-01-01", "9999-12-31"):
        r = env.api.post(f"/v1/factories/{env.factory_id}/batches", headers=env.factory, json={
            "name": f"B{day[:4]}", "product_model": "M", "hardware_revision": "r",
            "planned_size": 1, "manufactured_on": day})
        assert r.status_code == 201, r.text
        assert r.json()["manufactured_on"] == dt.date.fromisoformat(day).isoformat()


def check_problem_bodies_for_every_status(env: Env) -> None:
    """Sanity: the 4xx statuses used above are all problem documents with the same shape."""
    statuses = set()
    for r in (env.api.get("/v1/factories"),
              env.api.post("/v1/factories", headers=env.factory, json={"name": "x"}),
              env.api.get("/v1/batches/bat_nope", headers=env.admin),
              env.api.post("/v1/factories", headers=env.admin, json={"name": "Shenzhen Line 1"}),
              env.api.post("/v1/tokens", headers={**env.admin, "content-type": "text/plain"},
                           content=b"x")):
        assert r.headers["content-type"].startswith(PROBLEM)
        assert set(r.json()) >= {"type", "title", "status", "detail", "code"}
        statuses.add(r.status_code)
    assert statuses == {401, 403, 404, 409, 415}


# --- the tests: one environment per group of checks (the fixtures are the expensive part) -------


def test_body_syntax_content_type_and_size(env: Env) -> None:
    check_malformed_json(env)
    check_json_that_cannot_be_read(env)
    check_unknown_missing_and_wrongly_typed_fields(env)
    check_wrong_content_type(env)
    check_oversized_body(env)
    check_bulk_over_max_items(env)


def test_issuance_input(env: Env) -> None:
    check_bulk_reports_every_bad_line_and_writes_nothing(env)
    check_bad_csrs(env)
    check_reused_key_and_existing_device(env)
    check_bad_device_id(env)
    check_bad_manifest(env)


def test_credentials_paths_queries_and_dates(env: Env) -> None:
    check_missing_or_bad_authorization(env)
    check_ids_that_do_not_exist(env)
    check_malformed_path_ids(env)
    check_bad_query_parameters_and_methods(env)
    check_malformed_dates(env)
    check_no_500_for_dates_in_the_past_or_far_future(env)
    check_other_service_refusals_are_precise(env)
    check_problem_bodies_for_every_status(env)


def test_fuzz_never_500(env: Env) -> None:
    check_fuzz_post_routes(env)
    check_fuzz_path_parameters(env)
