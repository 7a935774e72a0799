"""Server configuration: where data lives, which database and key store to use, public URLs.

Values come from keyword arguments (the CLI) or ``FLEETTRUST_*`` environment variables; the
defaults are the embedded ones (SQLite and encrypted key files under the data directory, HTTP on
127.0.0.1). This module validates configuration up front and reads no key material: the key-store
passphrase is read only when a key store is opened (``fleettrust.services.context``).

It never reads the offline root's directory: the server has no setting that could point at it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from fleettrust.errors import ValidationError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_GATEWAY_PORT = 8443


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"FLEETTRUST_{name}", default)


@dataclass(frozen=True)
class Pkcs11Settings:
    module: str
    token_label: str
    pin_file: str | None = None
    pin_env: str = "FLEETTRUST_PKCS11_PIN"

    def __repr__(self) -> str:  # never show where the PIN is beyond its source name
        return f"Pkcs11Settings(module={self.module!r}, token_label={self.token_label!r})"


@dataclass(frozen=True)
class Settings:
    """Validated settings of one server (or local command) process."""

    data_dir: Path
    database_url: str
    key_store: str = "file"  # "file" | "pkcs11"
    pkcs11: Pkcs11Settings | None = None
    public_base_url: str = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"
    organization: str = "fleettrust fleet"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    gateway_host: str = DEFAULT_HOST
    gateway_port: int = DEFAULT_GATEWAY_PORT
    gateway_dns_names: tuple[str, ...] = ()
    gateway_ips: tuple[str, ...] = ("127.0.0.1",)
    max_body_bytes: int = 1 << 20
    max_bulk_body_bytes: int = 64 << 20
    max_bulk_items: int = 10_000
    device_validity_days: int = 3650
    ca_validity_days: int = 3650
    crl_shards: int = 16
    claim_code_ttl_days: int = 365
    claim_failures_per_window: int = 10
    claim_failure_window_seconds: int = 900
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.key_store not in ("file", "pkcs11"):
            raise ValidationError(f"key_store must be 'file' or 'pkcs11', not {self.key_store!r}")
        if self.key_store == "pkcs11" and self.pkcs11 is None:
            raise ValidationError("key_store 'pkcs11' needs FLEETTRUST_PKCS11_MODULE and _TOKEN")
        parsed = urlparse(self.public_base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.query:
            raise ValidationError(
                f"public_base_url must be an http(s) URL without query: {self.public_base_url!r}"
            )
        if not 0 < self.port < 65536:
            raise ValidationError(f"port out of range: {self.port}")
        if self.crl_shards < 1 or self.crl_shards > 1024:
            raise ValidationError("crl_shards must be between 1 and 1024")

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def base_url(self) -> str:
        return self.public_base_url.rstrip("/")

    @classmethod
    def load(
        cls,
        *,
        data_dir: str | Path | None = None,
        database_url: str | None = None,
        host: str | None = None,
        port: int | None = None,
        public_base_url: str | None = None,
        gateway_port: int | None = None,
    ) -> Settings:
        """Build settings from arguments, then ``FLEETTRUST_*`` variables, then defaults."""
        ddir = Path(data_dir or _env("DATA_DIR") or "./data").expanduser().resolve()
        db = database_url or _env("DATABASE_URL") or f"sqlite:///{ddir / 'fleettrust.db'}"
        h = host or _env("HOST") or DEFAULT_HOST
        p = port or int(_env("PORT") or DEFAULT_PORT)
        base = public_base_url or _env("PUBLIC_BASE_URL") or f"http://{h}:{p}"
        gw_port = gateway_port or int(_env("GATEWAY_PORT") or DEFAULT_GATEWAY_PORT)
        gw_dns = tuple(n for n in (_env("GATEWAY_DNS_NAMES") or "").split(",") if n)
        gw_ips = tuple(n for n in (_env("GATEWAY_IPS") or "127.0.0.1").split(",") if n)
        ks = _env("KEY_STORE") or "file"
        pk: Pkcs11Settings | None = None
        module = _env("PKCS11_MODULE")
        if module:
            pk = Pkcs11Settings(
                module=module,
                token_label=_env("PKCS11_TOKEN") or "fleettrust",
                pin_file=_env("PKCS11_PIN_FILE"),
            )
        return cls(
            data_dir=ddir,
            database_url=db,
            key_store=ks,
            pkcs11=pk,
            public_base_url=base,
            organization=_env("ORGANIZATION") or "fleettrust fleet",
            host=h,
            port=p,
            crl_shards=int(_env("CRL_SHARDS") or 16),
            gateway_host=_env("GATEWAY_HOST") or h,
            gateway_port=gw_port,
            gateway_dns_names=gw_dns,
            gateway_ips=gw_ips,
        )
