"""The ``fleettrust`` console script end to end: real subprocesses, a real server, real files.

Every command runs as ``.venv/bin/fleettrust`` (the installed console script) against a
``fleettrust serve`` subprocess on a free loopback port, once on SQLite and once on PostgreSQL
(a throw-away schema in database ``test``). The offline ceremony runs as separate commands and
the test checks that the root key never reaches the server's data directory, its database, its
environment or its open files. Interoperability is checked with ``openssl verify``. The
quickstart script runs in a temporary copy of the project with ``QUICKSTART_NO_WAIT=1``.

Not here: the service logic itself (tests/services), profiles and lint (tests/pki).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import secrets
import shutil
import socket
import stat
import struct
import subprocess
import sys
import time
import urllib.request
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from sqlalchemy import MetaData, create_engine, select, text

REPO = Path(__file__).resolve().parents[2]
FT = Path(sys.executable).parent / "fleettrust"
PG_URL = os.environ.get("FLEETTRUST_TEST_PG_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test")
ROOT_PASSPHRASE = "offline root passphrase " + secrets.token_hex(8)
TOKEN_RE = re.compile(r"ft1\.tok_[0-9a-z]{16}\.[A-Za-z0-9_-]{43}")
BULK_SIZE = 2000

_serial = itertools.count(1)


# --- helpers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any FLEETTRUST_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETTRUST_")}
    # Every server a test starts gets its own device-gateway port (8443 may be taken).
    env["FLEETTRUST_GATEWAY_PORT"] = str(free_port())
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str], *, check: bool = True,
        cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc


def ft(*args: str | Path, env: dict[str, str] | None = None, check: bool = True,
       cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run([str(FT), *map(str, args)], env if env is not None else clean_env(), check=check,
               cwd=cwd)


def make_csr(key: ec.EllipticCurvePrivateKey | None = None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "device")]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def tampered_csr() -> str:
    der = bytearray(x509.load_pem_x509_csr(make_csr().encode()).public_bytes(
        serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature value
    b64 = base64.b64encode(bytes(der)).decode()
    body = "\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n"


def manifest(tag: str) -> dict[str, Any]:
    n = next(_serial)
    return {"cpu_serial": f"{tag}-CPU{n:08d}",
            "mac_addresses": [f"02:{(n >> 24) & 255:02x}:{(n >> 16) & 255:02x}:"
                              f"{(n >> 8) & 255:02x}:{n & 255:02x}:{len(tag) & 255:02x}"],
            "wlan_module_id": f"{tag}-WL{n}"}


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as resp:  # noqa: S310
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server not healthy after {timeout}s:\n{log.read_text()}")


# --- the stack: one server per database backend --------------------------------------------------


@dataclass
class Stack:
    backend: str
    base: Path
    data_dir: Path
    database_url: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    admin_token: str
    serve_output: str
    info: dict[str, Any] = field(default_factory=dict)

    def env(self, token: str | None = None) -> dict[str, str]:
        return clean_env(FLEETTRUST_SERVER=self.url,
                         FLEETTRUST_TOKEN=token if token is not None else self.admin_token)

    def ft(self, *args: str | Path, token: str | None = None, check: bool = True,
           ) -> subprocess.CompletedProcess[str]:
        return ft(*args, env=self.env(token), check=check, cwd=self.base)

    def json(self, *args: str | Path, token: str | None = None) -> Any:
        return json.loads(self.ft(*args, "--json", token=token).stdout)


def _pg_available() -> bool:
    try:
        eng = create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with eng.connect() as c:
            c.execute(text("select 1"))
        eng.dispose()
    except Exception:
        return False
    return True


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp(f"cli-{request.param}")
    data_dir = base / "server-data"
    schema = None
    if request.param == "sqlite":
        db_url = f"sqlite:///{data_dir / 'fleettrust.db'}"
    else:
        if not _pg_available():
            if os.environ.get("CI"):
                pytest.fail(f"PostgreSQL is not reachable at {PG_URL} on CI")
            pytest.skip("PostgreSQL not reachable")
        schema = "cli_" + secrets.token_hex(6)
        admin = create_engine(PG_URL)
        with admin.begin() as c:
            c.execute(text(f'CREATE SCHEMA "{schema}"'))
        admin.dispose()
        db_url = f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{schema}"
    port = free_port()
    log = base / "server.log"
    env = clean_env(FLEETTRUST_DATABASE_URL=db_url)
    with log.open("wb") as fh:
        proc = subprocess.Popen([str(FT), "serve", "--data-dir", str(data_dir), "--port",
                                 str(port)], stdout=fh, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, cwd=base)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
        output = log.read_text()
        tokens = TOKEN_RE.findall(output)
        assert tokens, f"serve printed no admin token:\n{output}"
        yield Stack(request.param, base, data_dir, db_url, url, proc, log, tokens[0], output)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if schema is not None:
            admin = create_engine(PG_URL)
            with admin.begin() as c:
                c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()


@pytest.fixture(scope="module")
def fleet(stack: Stack) -> Stack:
    """The offline ceremony as four separate commands; the root stays in ``offline/``."""
    offline = stack.base / "offline"
    offline.mkdir(mode=0o700)
    passphrase = offline / "passphrase"
    passphrase.write_text(ROOT_PASSPHRASE + "\n")
    passphrase.chmod(0o600)
    root_dir = offline / "root"
    # Step 1 (offline machine): the root; no server, no token needed.
    init = ft("ca", "init-root", "--dir", root_dir, "--passphrase-file", passphrase,
              env=clean_env(), cwd=stack.base)
    # Step 2 (online): the server makes the fleet CA key and hands out its CSR.
    csr = stack.base / "transfer" / "fleet.csr"
    csr.parent.mkdir()
    stack.ft("ca", "fleet-csr", "--out", csr)
    # Step 3 (offline machine): the root signs it.
    cert = stack.base / "transfer" / "fleet.pem"
    sign = ft("ca", "sign", "--dir", root_dir, "--csr", csr, "--out", cert,
              "--passphrase-file", passphrase, env=clean_env(), cwd=stack.base)
    # Step 4 (online): import the signed certificate with the public root certificate.
    imported = stack.ft("ca", "import-fleet", cert, "--root", root_dir / "root.pem")
    stack.info.update(root_dir=root_dir, passphrase=passphrase, init_out=init.stdout,
                      sign_out=sign.stdout, import_out=imported.stdout)
    return stack


@pytest.fixture(scope="module")
def batch(fleet: Stack) -> Stack:
    factory = fleet.json("factory", "create", "Shenzhen Line 1")
    assert TOKEN_RE.fullmatch(factory["token"])
    made = fleet.json("batch", "create", factory["id"], "--name", "B-2026-11", "--model",
                      "TH-100", "--hw-rev", "r2", "--size", "5000",
                      token=factory["token"])
    fleet.info.update(factory_id=factory["id"], factory_token=factory["token"],
                      batch_id=made["id"])
    return fleet


def issued_count(stack: Stack) -> int:
    return int(json.loads(stack.ft("batch", "show", stack.info["batch_id"]).stdout)
               ["issued_count"])


# --- tests ---------------------------------------------------------------------------------------


def test_help_is_fast_and_lists_commands() -> None:
    start = time.monotonic()
    proc = ft("--help")
    elapsed = time.monotonic() - start
    for cmd in ("init", "serve", "ca", "factory", "batch", "device", "token"):
        assert cmd in proc.stdout
    assert elapsed < 3, f"fleettrust --help took {elapsed:.2f}s"
    assert "issue-bulk" in ft("device", "--help").stdout


def test_init_prints_admin_token_once(tmp_path: Path) -> None:
    token_file = tmp_path / "admin.token"
    first = ft("init", "--data-dir", tmp_path / "data", "--token-file", token_file)
    tokens = TOKEN_RE.findall(first.stdout)
    assert len(tokens) == 1, first.stdout
    assert "first admin token" in first.stdout
    assert token_file.read_text().strip() == tokens[0]
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    again = ft("init", "--data-dir", tmp_path / "data")
    assert "already exists" in again.stdout
    assert not TOKEN_RE.search(again.stdout)


def test_serve_prints_listening_and_first_admin_token(stack: Stack) -> None:
    assert "listening on" in stack.serve_output
    assert stack.url in stack.serve_output
    assert f"first admin token (shown once): {stack.admin_token}" in stack.serve_output


def test_ceremony_outputs(fleet: Stack) -> None:
    root_pem = (fleet.info["root_dir"] / "root.pem").read_bytes()
    root = x509.load_pem_x509_certificate(root_pem)
    fp = root.fingerprint(hashes.SHA256()).hex().upper()
    fp_colons = ":".join(fp[i:i + 2] for i in range(0, len(fp), 2))
    assert f"SHA-256 fingerprint: {fp_colons}" in fleet.info["init_out"]
    assert "signed CN=Fleet CA" in fleet.info["sign_out"]
    assert f"root fingerprint {fp_colons}" in fleet.info["import_out"]
    hierarchy = fleet.json("ca", "show")
    kinds = {(ca["kind"], ca["status"]) for ca in hierarchy}
    assert ("root", "active") in kinds
    assert ("fleet", "active") in kinds


def _root_key_needles(root_dir: Path) -> list[bytes]:
    """Byte strings any copy of the root key (or its passphrase) would contain."""
    encrypted = (root_dir / "root.key.pem").read_bytes()
    key = serialization.load_pem_private_key(encrypted, ROOT_PASSPHRASE.encode())
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    size = (key.curve.key_size + 7) // 8
    scalar = key.private_numbers().private_value.to_bytes(size, "big")
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    body_lines = [ln for ln in encrypted.splitlines() if ln and not ln.startswith(b"-----")]
    return [scalar, scalar.hex().encode(), scalar.hex().upper().encode(), der,
            base64.b64encode(der)[:60], base64.b64encode(scalar), ROOT_PASSPHRASE.encode(),
            *body_lines[:3]]


def _database_dump(url: str) -> bytes:
    engine = create_engine(url)
    chunks: list[bytes] = []
    try:
        meta = MetaData()
        meta.reflect(bind=engine)
        assert meta.tables, "reflected no tables"
        with engine.connect() as conn:
            for table in meta.sorted_tables:
                for row in conn.execute(select(table)):
                    for value in row:
                        if isinstance(value, bytes | bytearray | memoryview):
                            chunks.append(bytes(value))
                        else:
                            chunks.append(str(value).encode())
    finally:
        engine.dispose()
    return b"\n".join(chunks)


def test_root_key_never_reaches_the_server(fleet: Stack) -> None:
    root_dir: Path = fleet.info["root_dir"]
    needles = _root_key_needles(root_dir)
    # The data directory (database file, WAL, key store, logs): no copy of the root key.
    files = [p for p in fleet.data_dir.rglob("*") if p.is_file()]
    assert any(p.name.startswith("fleettrust.db") for p in files) or fleet.backend != "sqlite"
    for path in files:
        blob = path.read_bytes()
        for needle in needles:
            assert needle not in blob, f"root key material found in {path}"
    assert not any(p.name == "root.key.pem" for p in files)
    # The database, row by row (SQLite or the PostgreSQL schema).
    dump = _database_dump(fleet.database_url)
    assert b"BEGIN CERTIFICATE" in dump or b"fleet" in dump
    for needle in needles:
        assert needle not in dump, "root key material found in the database"
    # The server's environment, command line and open files.
    pid = fleet.proc.pid
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    for needle in [*needles, str(root_dir).encode(), b"ROOT_PASSPHRASE"]:
        assert needle not in environ, "the server's environment names the root"
        assert needle not in cmdline
    open_files = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            open_files.append(os.readlink(fd))
        except OSError:  # closed while we looked
            continue
    assert not [f for f in open_files if f.startswith(str(root_dir))]
    # And the server's configuration cannot even point at a root directory.
    assert not any(k.startswith("FLEETTRUST_ROOT") for k in
                   (e.split(b"=", 1)[0].decode() for e in environ.split(b"\0") if e))


def test_device_issue_verifies_with_openssl(batch: Stack, tmp_path: Path) -> None:
    csr = tmp_path / "device.csr"
    csr.write_text(make_csr())
    man = tmp_path / "manifest.json"
    man.write_text(json.dumps(manifest("single")))
    out_dir = tmp_path / "out"
    res = batch.ft("device", "issue", batch.info["batch_id"], "--csr", csr, "--manifest", man,
                   "--out-dir", out_dir, "--station", "line-1",
                   token=batch.info["factory_token"])
    m = re.search(r"device (\S+) serial ([0-9a-f]+)", res.stdout)
    assert m, res.stdout
    device_pem = out_dir / f"{m.group(1)}.pem"
    (out_dir / "device.pem").write_bytes(device_pem.read_bytes())
    verify = run(["openssl", "verify", "-CAfile", str(out_dir / "root.pem"), "-untrusted",
                  str(out_dir / "chain.pem"), str(out_dir / "device.pem")], clean_env())
    assert verify.stdout.strip().endswith("OK"), verify.stdout
    cert = x509.load_pem_x509_certificate(device_pem.read_bytes())
    assert format(cert.serial_number, "x") == m.group(2).lstrip("0")
    # The same CSR again: refused, with the API's error text, and exit 1.
    again = batch.ft("device", "issue", batch.info["batch_id"], "--csr", csr, "--manifest", man,
                     "--out-dir", tmp_path / "again", token=batch.info["factory_token"],
                     check=False)
    assert again.returncode == 1
    assert re.search(r"error: .+ \(\w+, HTTP 4\d\d\)", again.stderr), again.stderr


def _bulk_line(tag: str, csr: str | None = None) -> str:
    return json.dumps({"csr": csr or make_csr(), "manifest": manifest(tag)})


def test_issue_bulk_two_thousand_with_progress(batch: Stack, tmp_path: Path) -> None:
    src = tmp_path / "devices.jsonl"
    src.write_text("".join(_bulk_line("bulk") + "\n" for _ in range(BULK_SIZE)))
    out = tmp_path / "issued.jsonl"
    before = issued_count(batch)
    res = batch.ft("device", "issue-bulk", batch.info["batch_id"], src, "--out", out,
                   "--chain-out", tmp_path / "chain.pem", token=batch.info["factory_token"])
    assert f"issued {BULK_SIZE}, rejected 0, not sent 0" in res.stdout
    assert f"{BULK_SIZE}/{BULK_SIZE}" in res.stderr, res.stderr  # the Rich progress bar
    assert "issuing" in res.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == BULK_SIZE
    records = [json.loads(ln) for ln in lines]
    assert [r["line"] for r in records] == list(range(1, BULK_SIZE + 1))
    assert len({r["device_id"] for r in records}) == BULK_SIZE
    assert len({r["serial"] for r in records}) == BULK_SIZE
    x509.load_pem_x509_certificate(records[-1]["certificate_pem"].encode())
    assert issued_count(batch) == before + BULK_SIZE


def test_issue_bulk_reports_bad_lines_by_file_line(batch: Stack, tmp_path: Path) -> None:
    # File lines: 1 ok, 2 tampered CSR, 3 ok, 4 blank, 5-7 ok, 8 garbage CSR.
    # With --chunk 3 the requests are lines [1,2,3], [5,6,7], [8]: the first and last are
    # rejected as a whole, the middle one is issued.
    rows = [_bulk_line("bad"), _bulk_line("bad", tampered_csr()), _bulk_line("bad"), "",
            _bulk_line("bad"), _bulk_line("bad"), _bulk_line("bad"),
            _bulk_line("bad", "not a certificate request")]
    src = tmp_path / "mixed.jsonl"
    src.write_text("\n".join(rows) + "\n")
    out = tmp_path / "issued.jsonl"
    before = issued_count(batch)
    res = batch.ft("device", "issue-bulk", batch.info["batch_id"], src, "--out", out,
                   "--chunk", "3", token=batch.info["factory_token"], check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "issued 3, rejected 4, not sent 0" in res.stdout
    assert re.search(r"line 2: csr_\w+", res.stderr), res.stderr
    assert re.search(r"line 8: csr_\w+", res.stderr), res.stderr
    assert "file lines 1-3 rejected" in res.stderr
    for ok_line in ("line 1:", "line 3:", "line 5:", "line 6:", "line 7:"):
        assert ok_line not in res.stderr
    assert [json.loads(ln)["line"] for ln in out.read_text().splitlines()] == [5, 6, 7]
    assert issued_count(batch) == before + 3
    # Malformed JSON is caught before anything is sent.
    broken = tmp_path / "broken.jsonl"
    broken.write_text(_bulk_line("bad") + "\n{not json\n")
    res = batch.ft("device", "issue-bulk", batch.info["batch_id"], broken, "--out", out,
                   token=batch.info["factory_token"], check=False)
    assert res.returncode == 1
    assert "line 2: not JSON" in res.stderr
    assert "nothing was sent" in res.stderr
    assert issued_count(batch) == before + 3


def test_device_generate_pkcs12(batch: Stack, tmp_path: Path) -> None:
    man = tmp_path / "manifest.json"
    man.write_text(json.dumps(manifest("gen")))
    pw = tmp_path / "key-passphrase"
    pw.write_text("device key passphrase 42\n")
    out_dir = tmp_path / "gen"
    res = batch.ft("device", "generate", batch.info["batch_id"], "--manifest", man,
                   "--out-dir", out_dir, "--passphrase-file", pw, "--format", "pkcs12",
                   token=batch.info["factory_token"])
    p12 = next(out_dir.glob("*.p12"))
    assert str(p12.name) in res.stdout
    assert stat.S_IMODE(p12.stat().st_mode) == 0o600
    key, cert, _extra = pkcs12.load_key_and_certificates(p12.read_bytes(),
                                                         b"device key passphrase 42")
    assert key is not None
    assert cert is not None
    assert cert.public_key() == key.public_key()
    device_id = p12.name.removesuffix(".p12")
    device = json.loads(batch.ft("device", "show", device_id).stdout)
    assert device["key_origin"] == "server"
    assert device["weak_identity"] is True


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR"
    assert length == 13
    width, height = struct.unpack(">II", data[16:24])
    assert width == height
    assert width > 100
    (crc,) = struct.unpack(">I", data[16 + length:20 + length])
    assert crc == zlib.crc32(data[12:16 + length])
    assert data.endswith(b"IEND\xaeB`\x82")


def _check_svg(path: Path) -> None:
    root = ET.fromstring(path.read_bytes())  # noqa: S314 — our own output
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert root.find("{http://www.w3.org/2000/svg}path") is not None


def test_claim_code_qr_and_claim(batch: Stack, tmp_path: Path) -> None:
    csr = tmp_path / "d.csr"
    csr.write_text(make_csr())
    man = tmp_path / "m.json"
    man.write_text(json.dumps(manifest("claim")))
    res = batch.ft("device", "issue", batch.info["batch_id"], "--csr", csr, "--manifest", man,
                   "--out-dir", tmp_path / "o", token=batch.info["factory_token"])
    m = re.search(r"device (\S+) serial", res.stdout)
    assert m
    device_id = m.group(1)
    png, svg = tmp_path / "claim.png", tmp_path / "claim.svg"
    batch.ft("device", "claim-code", device_id, "--qr", png)
    res = batch.ft("device", "claim-code", device_id, "--qr", svg)
    _check_png(png)
    _check_svg(svg)
    code = re.search(r"claim code \(shown once\): (\S+)", res.stdout)
    assert code, res.stdout
    bad_ext = batch.ft("device", "claim-code", device_id, "--qr", tmp_path / "x.gif",
                       check=False)
    assert bad_ext.returncode == 1
    assert ".png or .svg" in bad_ext.stderr
    # An end user's account claims it; a second claim of the same code fails.
    owner = batch.json("token", "create", "--role", "device-owner", "--subject",
                       "carol@example.com")
    claimed = batch.ft("device", "claim", code.group(1), token=owner["token"])
    assert f"device {device_id} now belongs to carol@example.com" in claimed.stdout
    again = batch.ft("device", "claim", code.group(1), token=owner["token"], check=False)
    assert again.returncode == 1
    assert re.search(r"error: .+ \(\w+, HTTP 4\d\d\)", again.stderr), again.stderr


def test_token_create_and_roles(fleet: Stack) -> None:
    res = fleet.ft("token", "create", "--role", "auditor", "--subject", "audit-bot")
    m = re.search(r"token (tok_\w+) \(auditor\) — shown once: (\S+)", res.stdout)
    assert m, res.stdout
    assert TOKEN_RE.fullmatch(m.group(2))
    assert fleet.json("ca", "show", token=m.group(2))
    denied = fleet.ft("factory", "create", "Nope", token=m.group(2), check=False)
    assert denied.returncode == 1
    assert "HTTP 403" in denied.stderr
    listed = fleet.json("token", "list")
    assert m.group(1) in {t["id"] for t in listed}
    assert m.group(2) not in json.dumps(listed)


def test_bad_token_is_a_clean_error(stack: Stack) -> None:
    fake = "ft1.tok_0000000000000000." + "A" * 43
    res = stack.ft("ca", "show", token=fake, check=False)
    assert res.returncode == 1
    assert re.fullmatch(r"error: .+ \(\w+, HTTP 401\)\n", res.stderr), res.stderr
    assert "Traceback" not in res.stderr
    res = stack.ft("ca", "show", token="nonsense", check=False)
    assert res.returncode == 1
    assert "HTTP 401" in res.stderr
    res = ft("ca", "show", "--server", stack.url, env=clean_env(), check=False)
    assert res.returncode == 2
    assert "no API token" in res.stderr


def test_unreachable_server_message() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    res = ft("ca", "show", "--server", url, "--token", "x", check=False)
    assert res.returncode == 1
    assert f"cannot reach the fleettrust server at {url}" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.skipif(shutil.which("curl") is None, reason="quickstart needs curl")
def test_quickstart_runs_and_reruns(tmp_path: Path) -> None:
    """scripts/quickstart.sh in a copy of the project, twice, with QUICKSTART_NO_WAIT=1."""
    work = tmp_path / "project"
    work.mkdir()
    shutil.copytree(REPO / "scripts", work / "scripts")
    (work / ".venv").symlink_to(Path(sys.prefix))
    port = free_port()
    env = clean_env(FLEETTRUST_PORT=str(port), QUICKSTART_NO_WAIT="1",
                    QUICKSTART_SKIP_SETUP="1")
    first = run(["bash", "scripts/quickstart.sh"], env, cwd=work, timeout=120)
    token = (work / "data" / "admin.token").read_text().strip()
    assert TOKEN_RE.fullmatch(token)
    assert stat.S_IMODE((work / "data" / "admin.token").stat().st_mode) == 0o600
    assert stat.S_IMODE((work / "ceremony" / "passphrase").stat().st_mode) == 0o600
    assert (work / "ceremony" / "root" / "root.key.pem").exists()
    assert not list((work / "data").rglob("root.key.pem"))
    assert f"listening on http://127.0.0.1:{port}" in first.stdout
    assert f"admin token:   {token}" in first.stdout
    assert "first admin token (shown once)" in first.stdout
    assert "offline machine" in first.stdout
    assert "created" in first.stdout
    second = run(["bash", "scripts/quickstart.sh"], env, cwd=work, timeout=120)
    assert "an admin token already exists" in second.stdout
    assert "ceremony skipped" in second.stdout
    assert re.search(r"factory fac_\w+ exists", second.stdout)
    assert re.search(r"batch bat_\w+ exists", second.stdout)
    assert f"admin token:   {token}" in second.stdout
    assert "first admin token (shown once)" not in second.stdout
