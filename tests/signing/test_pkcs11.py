"""Pkcs11KeyStore / Pkcs11Signer against a real SoftHSM2 token (no mocks).

Signatures are checked with cryptography and with openssl; key attributes are read back from
the token both in-process and by ``pkcs11-tool`` in a separate process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pkcs11
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, KeyType, ObjectClass
from pyasn1.codec.der import encoder
from pyasn1.type import univ

from fleettrust.errors import KeyStoreError
from fleettrust.signing.base import KeyStore, Signer, SignerAlgorithm
from fleettrust.signing.pkcs11 import (
    Pkcs11Config,
    Pkcs11KeyStore,
    Pkcs11Signer,
    _der_children,
    _der_tlv,
)
from tests.softhsm import TEST_USER_PIN, make_softhsm_token, softhsm_available

from .test_filekeys import (
    ALGORITHMS,
    build_ca,
    check_sign_bytes,
    check_x509_signatures,
    needs_openssl,
)

pytestmark = [
    pytest.mark.pkcs11,
    pytest.mark.skipif(
        not softhsm_available(),
        reason="SoftHSM2 not installed (needs softhsm2-util and libsofthsm2.so)",
    ),
]

KEY_ID_PATTERN = r"^pkcs11:[a-z0-9-]{1,40}-[0-9a-f]{16}$"


@pytest.fixture
def config(tmp_path: Path) -> Pkcs11Config:
    return make_softhsm_token(tmp_path)


@pytest.fixture
def store(config: Pkcs11Config) -> Iterator[Pkcs11KeyStore]:
    with Pkcs11KeyStore(config) as opened:
        yield opened


@contextlib.contextmanager
def _raw_private_key(config: Pkcs11Config, signer: Pkcs11Signer) -> Iterator[pkcs11.Key]:
    """Find the private key with plain python-pkcs11, independently of the store.

    Login state is per application, so this unauthenticated session sees private objects
    while the store's session is logged in (and closing it does not log the store out).
    """
    token = pkcs11.lib(config.module).get_token(token_label=config.token_label)
    label = signer.key_id.removeprefix("pkcs11:")
    with token.open() as session:
        yield session.get_key(
            object_class=ObjectClass.PRIVATE_KEY,
            key_type=KeyType.EC,
            label=label,
            id=bytes.fromhex(label[-16:]),
        )


# --- round trip -------------------------------------------------------------------------------


def test_store_satisfies_protocols(store: Pkcs11KeyStore) -> None:
    keystore: KeyStore = store
    signer = keystore.generate("proto")
    assert isinstance(signer, Signer)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_generate_load_delete_round_trip(
    store: Pkcs11KeyStore, config: Pkcs11Config, algorithm: SignerAlgorithm
) -> None:
    signer = store.generate("Factory CA / Shenzhen #1", algorithm)
    assert re.fullmatch(KEY_ID_PATTERN, signer.key_id)
    assert signer.key_id.startswith("pkcs11:factory-ca-shenzhen-1-")
    assert signer.algorithm is algorithm
    check_sign_bytes(signer)

    loaded = store.load(signer.key_id)
    assert loaded.public_key() == signer.public_key()
    assert loaded.algorithm is algorithm
    check_sign_bytes(loaded)

    with Pkcs11KeyStore(config) as second:  # another store on the same token shares the session
        assert second.load(signer.key_id).public_key() == signer.public_key()

    store.delete(signer.key_id)
    for call in (store.load, store.delete):
        with pytest.raises(KeyStoreError) as err:
            call(signer.key_id)
        assert err.value.code == "key_not_found"
    with pytest.raises(KeyStoreError) as err:  # a signer of a deleted key no longer signs
        signer.sign_bytes(b"x")
    assert err.value.code == "key_not_found"


def test_unknown_and_invalid_key_ids(store: Pkcs11KeyStore) -> None:
    with pytest.raises(KeyStoreError) as err:
        store.load("pkcs11:never-0123456789abcdef")
    assert err.value.code == "key_not_found"
    for bad in ("file:x-0123456789abcdef", "pkcs11:x", "pkcs11:UP-0123456789abcdef", ""):
        with pytest.raises(KeyStoreError) as err:
            store.load(bad)
        assert err.value.code == "invalid_key_id"


# --- signing ----------------------------------------------------------------------------------


@needs_openssl
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_sign_x509_objects(
    store: Pkcs11KeyStore, tmp_path: Path, algorithm: SignerAlgorithm
) -> None:
    signer = store.generate("x509", algorithm)
    check_x509_signatures(signer, tmp_path)


def test_concurrent_signing_from_8_threads(store: Pkcs11KeyStore) -> None:
    signers = [store.generate(f"conc-{alg.value}", alg) for alg in ALGORITHMS]
    barrier = threading.Barrier(8)

    def work(index: int) -> int:
        signer = signers[index % 2]
        barrier.wait()
        for _ in range(10):
            check_sign_bytes(signer)
        ca = build_ca(signer, cn=f"thread {index}")
        ca.verify_directly_issued_by(ca)
        return index

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert sorted(pool.map(work, range(8))) == list(range(8))


# --- key protection ---------------------------------------------------------------------------


def test_private_key_is_sensitive_and_non_extractable(
    store: Pkcs11KeyStore, config: Pkcs11Config
) -> None:
    signer = store.generate("protected", SignerAlgorithm.EC_P384)
    names = [
        Attribute.TOKEN,
        Attribute.PRIVATE,
        Attribute.SENSITIVE,
        Attribute.EXTRACTABLE,
        Attribute.ALWAYS_SENSITIVE,
        Attribute.NEVER_EXTRACTABLE,
        Attribute.SIGN,
        Attribute.DERIVE,
        Attribute.DECRYPT,
    ]
    with _raw_private_key(config, signer) as key:
        attrs = key.get_attributes(names)
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            key[Attribute.VALUE]
    assert attrs == {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.ALWAYS_SENSITIVE: True,
        Attribute.NEVER_EXTRACTABLE: True,
        Attribute.SIGN: True,
        Attribute.DERIVE: False,
        Attribute.DECRYPT: False,
    }
    check_sign_bytes(signer)  # the store's login survived the raw session closing


@pytest.mark.skipif(shutil.which("pkcs11-tool") is None, reason="pkcs11-tool (opensc) missing")
def test_key_attributes_seen_from_another_process(
    store: Pkcs11KeyStore, config: Pkcs11Config
) -> None:
    signer = store.generate("other-process")
    label = signer.key_id.removeprefix("pkcs11:")
    result = subprocess.run(
        [
            "pkcs11-tool",
            "--module",
            config.module,
            "--token-label",
            config.token_label,
            "--login",
            "--pin",
            TEST_USER_PIN,
            "--list-objects",
            "--type",
            "privkey",
            "--label",
            label,
        ],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ),
    )
    assert result.returncode == 0, result.stderr
    block = result.stdout
    assert label in block
    access = next(line for line in block.splitlines() if "Access:" in line)
    for flag in ("sensitive", "always sensitive", "never extract"):
        assert flag in access
    assert "extractable" not in access.replace("never extract", "")


def test_repr_contains_no_secrets(store: Pkcs11KeyStore, config: Pkcs11Config) -> None:
    signer = store.generate("repr")
    text = repr(signer) + str(signer) + repr(store) + repr(config) + str(config)
    assert repr(signer) == (
        f"Pkcs11Signer(key_id={signer.key_id!r}, algorithm='ec-p256', token={config.token_label!r})"
    )
    assert config.user_pin not in text
    assert "user_pin=<hidden>" in repr(config)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(signer)


# --- precise errors ---------------------------------------------------------------------------


def test_wrong_pin_fresh_login(tmp_path: Path) -> None:
    good = make_softhsm_token(tmp_path, "fleettrust-pin-test")
    bad = dataclasses.replace(good, user_pin="0000-not-the-pin")
    with pytest.raises(KeyStoreError) as err:
        Pkcs11KeyStore(bad)  # no store open on this token: the token itself checks the PIN
    assert err.value.code == "wrong_pin"
    assert err.value.message.startswith("wrong PIN for PKCS#11 token 'fleettrust-pin-test'")
    with Pkcs11KeyStore(good) as opened:  # the failed attempt did not poison anything
        check_sign_bytes(opened.generate("after-bad-pin"))


def test_wrong_pin_while_token_is_open(store: Pkcs11KeyStore, config: Pkcs11Config) -> None:
    with pytest.raises(KeyStoreError) as err:
        Pkcs11KeyStore(dataclasses.replace(config, user_pin="0000-not-the-pin"))
    assert err.value.code == "wrong_pin"
    assert config.token_label in err.value.message


def test_token_not_found_lists_present_tokens(config: Pkcs11Config) -> None:
    with pytest.raises(KeyStoreError) as err:
        Pkcs11KeyStore(dataclasses.replace(config, token_label="no-such-token"))
    assert err.value.code == "token_not_found"
    assert "'no-such-token' not found" in err.value.message
    assert f"'{config.token_label}'" in err.value.message  # the labels that ARE there


def test_library_not_loadable(tmp_path: Path) -> None:
    missing = str(tmp_path / "libnope.so")
    with pytest.raises(KeyStoreError) as err:
        Pkcs11KeyStore(Pkcs11Config(module=missing, token_label="x", user_pin="1234"))
    assert err.value.code == "pkcs11_library_error"
    assert missing in err.value.message
    not_pkcs11 = tmp_path / "garbage.so"
    not_pkcs11.write_bytes(b"\x7fELF but not really")
    with pytest.raises(KeyStoreError) as err:
        Pkcs11KeyStore(Pkcs11Config(module=str(not_pkcs11), token_label="x", user_pin="1234"))
    assert err.value.code == "pkcs11_library_error"


def test_closed_store_refuses_to_sign(config: Pkcs11Config) -> None:
    opened = Pkcs11KeyStore(config)
    signer = opened.generate("closing")
    opened.close()
    opened.close()  # idempotent
    with pytest.raises(KeyStoreError) as err:
        signer.sign_bytes(b"x")
    assert err.value.code == "key_store_closed"
    with Pkcs11KeyStore(config) as reopened:  # logging in again after a full logout works
        check_sign_bytes(reopened.load(signer.key_id))


def test_new_token_after_module_loaded_is_visible(store: Pkcs11KeyStore, tmp_path: Path) -> None:
    """SoftHSM2 enumerates tokens only at C_Initialize; the helper rescans, stores recover."""
    signer = store.generate("before-rescan")
    other_config = make_softhsm_token(tmp_path, "fleettrust-second")
    check_sign_bytes(signer)  # the store logged in again transparently after the rescan
    with Pkcs11KeyStore(other_config) as other:
        with pytest.raises(KeyStoreError) as err:  # keys do not leak between tokens
            other.load(signer.key_id)
        assert err.value.code == "key_not_found"
        check_sign_bytes(other.generate("on-second-token"))


# --- the tiny DER codec -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 127, 128, 255, 256, 4095, 65535, 65536, 70000])
def test_der_tlv_matches_pyasn1(size: int) -> None:
    content = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    assert _der_tlv(0x04, content) == encoder.encode(univ.OctetString(content))
    sequence = _der_tlv(0x30, _der_tlv(0x04, content) + _der_tlv(0x05, b""))
    expected = univ.Sequence()
    expected.setComponentByPosition(0, univ.OctetString(content))
    expected.setComponentByPosition(1, univ.Null(""))
    assert sequence == encoder.encode(expected)
    assert _der_children(sequence) == [_der_tlv(0x04, content), b"\x05\x00"]


@pytest.mark.parametrize(
    "der",
    [b"", b"\x04\x00", b"\x30\x03\x02\x01", b"\x30\x80\x00\x00", b"\x30\x02\x02\x05", b"\x30"],
)
def test_der_children_rejects_malformed(der: bytes) -> None:
    with pytest.raises(ValueError, match=r"DER|SEQUENCE"):
        _der_children(der)


def test_public_key_is_token_key(store: Pkcs11KeyStore) -> None:
    signer = store.generate("pub", SignerAlgorithm.EC_P384)
    public = signer.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP384R1)


def test_signature_that_does_not_verify_is_never_returned(store: Pkcs11KeyStore) -> None:
    """A signer whose recorded public key is not the token key's must refuse its output."""
    real = store.generate("real")
    label = real.key_id.removeprefix("pkcs11:")
    impostor_public = ec.generate_private_key(ec.SECP256R1()).public_key()
    confused = Pkcs11Signer(store, real.key_id, bytes.fromhex(label[-16:]), label, impostor_public)
    for sign in (confused.sign_bytes, lambda _: build_ca(confused)):
        with pytest.raises(KeyStoreError) as err:
            sign(b"data")
        assert err.value.code == "signature_invalid"
        assert "refusing to return it" in err.value.message
