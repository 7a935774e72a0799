"""Request bodies of the operator/factory API: strict (unknown fields refused), size-bounded."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FleetCsrIn(Strict):
    common_name: str = Field("Fleet CA", max_length=100)


class FleetImportIn(Strict):
    certificate_pem: str = Field(max_length=16384)
    root_pem: str = Field(max_length=16384)


class FactoryIn(Strict):
    name: str = Field(max_length=100)
    batch_cas: bool = False
    key_location: Literal["platform", "external"] = "platform"


class CsrIn(Strict):
    csr_pem: str = Field(max_length=16384)


class BatchIn(Strict):
    name: str = Field(max_length=100)
    product_model: str = Field(max_length=50)
    hardware_revision: str = Field(max_length=50)
    planned_size: int = Field(ge=1, le=10_000_000)
    manufactured_on: dt.date
    own_ca: bool = False
    auth_method: Literal["certificate", "shared_secret"] = "certificate"


class DeviceIn(Strict):
    csr: str = Field(max_length=16384)
    manifest: dict[str, Any]
    device_id: str | None = Field(None, max_length=64)
    station: str | None = Field(None, max_length=100)


class BulkIn(Strict):
    items: list[DeviceIn] = Field(min_length=1)


class GenerateIn(Strict):
    manifest: dict[str, Any]
    passphrase: str = Field(min_length=12, max_length=1024)
    key_format: Literal["pkcs8", "pkcs12"] = "pkcs8"
    device_id: str | None = Field(None, max_length=64)
    station: str | None = Field(None, max_length=100)


class RegisterItem(Strict):
    manifest: dict[str, Any]
    device_id: str | None = Field(None, max_length=64)


class RegisterIn(Strict):
    items: list[RegisterItem] = Field(min_length=1)


class ClaimCodeIn(Strict):
    ttl_days: int | None = Field(None, ge=1, le=3650)


class ClaimIn(Strict):
    code: str = Field(max_length=100)


class ChallengeIn(Strict):
    device_id: str = Field(max_length=64)


class ResponseIn(Strict):
    device_id: str = Field(max_length=64)
    nonce: str = Field(max_length=64)
    mac: str = Field(max_length=64)


class TokenIn(Strict):
    role: str = Field(max_length=32)
    subject: str = Field(max_length=200)
    factory_id: str | None = Field(None, max_length=40)
    ttl_days: int | None = Field(None, ge=1, le=3650)
