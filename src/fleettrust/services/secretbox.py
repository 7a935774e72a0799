"""Authenticated encryption of small server-side secrets (batch group secrets) at rest.

AES-256-GCM with a key derived by scrypt from the key-store passphrase and a per-installation salt
stored in the data directory. The associated data binds each ciphertext to its row, so a secret
copied to another batch row does not decrypt. This module does not choose what to encrypt.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from fleettrust.errors import KeyStoreError

_VERSION = b"\x01"


class SecretBox:
    def __init__(self, passphrase: bytes, salt: bytes) -> None:
        if not passphrase:
            raise ValueError("an empty passphrase cannot protect secrets")
        key = Scrypt(salt=salt, length=32, n=2**15, r=8, p=1).derive(passphrase)
        self._aead = AESGCM(key)

    @classmethod
    def for_data_dir(cls, data_dir: Path, passphrase: bytes) -> SecretBox:
        salt_file = data_dir / "secretbox.salt"
        if not salt_file.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            tmp = salt_file.with_suffix(".tmp")
            tmp.write_bytes(secrets.token_bytes(16))
            os.replace(tmp, salt_file)
        return cls(passphrase, salt_file.read_bytes())

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(12)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes) -> bytes:
        if len(sealed) < 29 or sealed[:1] != _VERSION:
            raise KeyStoreError("sealed secret is malformed")
        try:
            return self._aead.decrypt(sealed[1:13], sealed[13:], aad)
        except InvalidTag as exc:
            raise KeyStoreError(
                "sealed secret does not decrypt: wrong key-store passphrase or tampered row"
            ) from exc
