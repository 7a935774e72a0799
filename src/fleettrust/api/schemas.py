"""Request bodies and path/query parameter types of the operator/factory API.

Bodies are strict (unknown fields refused as ``unknown_field``) and size-bounded. Identifiers in
paths and queries are restricted to the characters our ids use, so no control character (a NUL
would make PostgreSQL fail) ever reaches a query. Business validation (names, manifests, CSR
contents, key policy) stays in the services, which report precise codes.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from fastapi import Path, Query
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from fleettrust.pki.csr import CSR_MAX_BYTES

#: Row ids (``fac_…``, ``bat_…``, ``tok_…``, ``ca_…``) and device ids share this alphabet.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
#: Printable ASCII (for free-text query filters such as an audit target id).
PRINTABLE_PATTERN = r"^[\x20-\x7e]+$"

IdPath = Annotated[str, Path(pattern=ID_PATTERN, max_length=64)]
IdQuery = Annotated[str | None, Query(pattern=ID_PATTERN, max_length=64)]


def _csr_size(value: str) -> str:
    if len(value) > CSR_MAX_BYTES:
        raise PydanticCustomError(
            "csr_too_large", "CSR is {size} characters (at most {limit})",
            {"size": len(value), "limit": CSR_MAX_BYTES},
        )
    return value


#: A PEM CSR; the size check has its own problem code (``csr_too_large``).
CsrText = Annotated[str, AfterValidator(_csr_size)]
DeviceId = Annotated[str, Field(max_length=64)]


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
    csr_pem: CsrText


class BatchIn(Strict):
    name: str = Field(max_length=100)
    product_model: str = Field(max_length=50)
    hardware_revision: str = Field(max_length=50)
    planned_size: int = Field(ge=1, le=10_000_000)
    manufactured_on: dt.date
    own_ca: bool = False
    auth_method: Literal["certificate", "shared_secret"] = "certificate"


class DeviceIn(Strict):
    csr: CsrText
    manifest: dict[str, Any]
    device_id: DeviceId | None = None
    station: str | None = Field(None, max_length=100)


class BulkIn(Strict):
    """Up to ``max_bulk_items`` devices (checked by the service: ``too_many_items``)."""

    items: list[DeviceIn] = Field(min_length=1)


class GenerateIn(Strict):
    manifest: dict[str, Any]
    passphrase: str = Field(min_length=12, max_length=1024)
    key_format: Literal["pkcs8", "pkcs12"] = "pkcs8"
    device_id: DeviceId | None = None
    station: str | None = Field(None, max_length=100)


class RegisterItem(Strict):
    manifest: dict[str, Any]
    device_id: DeviceId | None = None


class RegisterIn(Strict):
    items: list[RegisterItem] = Field(min_length=1)


class ClaimCodeIn(Strict):
    ttl_days: int | None = Field(None, ge=1, le=3650)


class ClaimIn(Strict):
    code: str = Field(max_length=100)


class ChallengeIn(Strict):
    device_id: DeviceId


class ResponseIn(Strict):
    device_id: DeviceId
    nonce: str = Field(max_length=64)
    mac: str = Field(max_length=64)


class TokenIn(Strict):
    role: str = Field(max_length=32)
    subject: str = Field(max_length=200)
    factory_id: str | None = Field(None, max_length=40, pattern=ID_PATTERN)
    ttl_days: int | None = Field(None, ge=1, le=3650)
