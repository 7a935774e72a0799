"""Everything a service call needs, built once per process: settings, database, key store.

Opening the key store reads its passphrase (``FLEETTRUST_KEYSTORE_PASSPHRASE``, the file named by
``FLEETTRUST_KEYSTORE_PASSPHRASE_FILE``, or ``<data-dir>/keystore.passphrase`` created by
``fleettrust init``) and, for PKCS#11, the PIN. Signers and per-CA issuance profiles are cached
here; caches hold only immutable things (a CA's certificate and key never change once active),
so two server processes on one database stay correct without cache invalidation.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from fleettrust.clock import Clock, SystemClock
from fleettrust.config import Settings
from fleettrust.errors import KeyStoreError
from fleettrust.services.secretbox import SecretBox
from fleettrust.signing.base import KeyStore, Signer
from fleettrust.storage.db import make_engine, make_sessionmaker

PASSPHRASE_FILE = "keystore.passphrase"  # noqa: S105 - a file name, not a secret


def ensure_passphrase_file(data_dir: Path) -> Path:
    """Create the embedded default key-store passphrase file (0600) if none exists."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = data_dir / PASSPHRASE_FILE
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32) + "\n")
    return path


def read_keystore_passphrase(settings: Settings) -> bytes:
    env = os.environ.get("FLEETTRUST_KEYSTORE_PASSPHRASE")
    if env:
        return env.encode()
    file_name = os.environ.get("FLEETTRUST_KEYSTORE_PASSPHRASE_FILE")
    path = Path(file_name) if file_name else settings.data_dir / PASSPHRASE_FILE
    try:
        value = path.read_text().strip()
    except FileNotFoundError as exc:
        raise KeyStoreError(
            f"no key-store passphrase: set FLEETTRUST_KEYSTORE_PASSPHRASE or create {path}"
            " (fleettrust init does)"
        ) from exc
    if not value:
        raise KeyStoreError(f"key-store passphrase file {path} is empty")
    return value.encode()


def open_key_store(settings: Settings, passphrase: bytes) -> KeyStore:
    if settings.key_store == "pkcs11":
        from fleettrust.signing.pkcs11 import Pkcs11Config, Pkcs11KeyStore

        assert settings.pkcs11 is not None  # checked by Settings
        pin = os.environ.get(settings.pkcs11.pin_env)
        if settings.pkcs11.pin_file:
            pin = Path(settings.pkcs11.pin_file).read_text().strip()
        if not pin:
            raise KeyStoreError(
                f"PKCS#11 key store needs a PIN in ${settings.pkcs11.pin_env} or a PIN file"
            )
        return Pkcs11KeyStore(
            Pkcs11Config(
                module=settings.pkcs11.module,
                token_label=settings.pkcs11.token_label,
                user_pin=pin,
            )
        )
    from fleettrust.signing.filekeys import FileKeyStore

    return FileKeyStore(settings.keys_dir, passphrase)


@dataclass
class ServiceContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    key_store: KeyStore
    secret_box: SecretBox
    clock: Clock = field(default_factory=SystemClock)
    _cache: dict[tuple[str, str], Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, settings: Settings, *, clock: Clock | None = None) -> ServiceContext:
        passphrase = read_keystore_passphrase(settings)
        engine = make_engine(settings.database_url)
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_sessionmaker(engine),
            key_store=open_key_store(settings, passphrase),
            secret_box=SecretBox.for_data_dir(settings.data_dir, passphrase),
            clock=clock or SystemClock(),
        )

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: commit on success, roll back on any exception."""
        with self.sessions() as session, session.begin():
            yield session

    def signer(self, key_id: str) -> Signer:
        signer: Signer = self.cached("signer", key_id, lambda: self.key_store.load(key_id))
        return signer

    def cached(self, kind: str, key: str, build: Callable[[], Any]) -> Any:
        """Cache an immutable per-process object (signer, issuance profile)."""
        k = (kind, key)
        with self._lock:
            if k in self._cache:
                return self._cache[k]
        value = build()
        with self._lock:
            return self._cache.setdefault(k, value)

    def forget(self, kind: str, key: str) -> None:
        with self._lock:
            self._cache.pop((kind, key), None)

    def close(self) -> None:
        self.engine.dispose()
