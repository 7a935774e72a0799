"""Routes of the operator / factory / owner API. Routes hold no queries: route -> service."""

from __future__ import annotations

import base64
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from fleettrust.api.deps import CtxDep, PrincipalDep, remote_addr
from fleettrust.api.schemas import (
    PRINTABLE_PATTERN,
    BatchIn,
    BulkIn,
    ChallengeIn,
    ClaimCodeIn,
    ClaimIn,
    CsrIn,
    DeviceIn,
    FactoryIn,
    FleetCsrIn,
    FleetImportIn,
    GenerateIn,
    IdPath,
    IdQuery,
    RegisterIn,
    ResponseIn,
    TokenIn,
)
from fleettrust.services import claims, hierarchy, issuance, registry, shared_secret
from fleettrust.services.hierarchy import pem

router = APIRouter(prefix="/v1")
public = APIRouter()


def _issue_view(result: issuance.IssueResult) -> dict[str, Any]:
    return {
        "batch_id": result.batch_id,
        "devices": [
            {"device_id": d.device_id, "serial": d.serial_hex, "certificate_pem": d.certificate_pem,
             "findings": d.findings}
            for d in result.devices
        ],
        "chain_pem": result.chain_pem,
        "root_pem": result.root_pem,
    }


@public.get("/healthz", tags=["meta"])
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@public.get("/ca/{ca_id}.der", tags=["pki"], response_class=Response)
def ca_der(ca_id: IdPath, ctx: CtxDep) -> Response:
    return Response(registry.ca_certificate(ctx, ca_id), media_type="application/pkix-cert",
                    headers={"Cache-Control": "public, max-age=3600"})


# --- hierarchy ---------------------------------------------------------------------------------


@router.get("/hierarchy", tags=["hierarchy"])
def get_hierarchy(ctx: CtxDep, who: PrincipalDep) -> list[dict[str, Any]]:
    return registry.hierarchy(ctx, who)


@router.post("/hierarchy/fleet-ca/csr", tags=["hierarchy"])
def fleet_csr(body: FleetCsrIn, ctx: CtxDep, who: PrincipalDep) -> dict[str, str]:
    return {"csr_pem": hierarchy.create_fleet_csr(ctx, who, body.common_name)}


@router.post("/hierarchy/fleet-ca/certificate", tags=["hierarchy"])
def fleet_import(body: FleetImportIn, ctx: CtxDep, who: PrincipalDep) -> dict[str, Any]:
    return hierarchy.import_fleet_certificate(ctx, who, body.certificate_pem, body.root_pem)


# --- factories and batches ---------------------------------------------------------------------


@router.post("/factories", tags=["factories"], status_code=201)
def create_factory(body: FactoryIn, ctx: CtxDep, who: PrincipalDep) -> dict[str, Any]:
    created = hierarchy.create_factory(ctx, who, name=body.name, batch_cas=body.batch_cas,
                                       key_location=body.key_location)
    view = registry.factory_view(created.factory)
    view["token"] = created.token
    view["ca_certificate_pem"] = (
        pem(hierarchy.load_ca_cert(created.ca)) if created.ca.certificate_der else None
    )
    return view


@router.get("/factories", tags=["factories"])
def list_factories(ctx: CtxDep, who: PrincipalDep) -> list[dict[str, Any]]:
    return registry.list_factories(ctx, who)


@router.get("/factories/{factory_id}", tags=["factories"])
def get_factory(factory_id: IdPath, ctx: CtxDep, who: PrincipalDep) -> dict[str, Any]:
    return registry.get_factory(ctx, who, factory_id)


@router.post("/factories/{factory_id}/ca-csr", tags=["factories"])
def factory_ca_csr(factory_id: IdPath, body: CsrIn, ctx: CtxDep,
                   who: PrincipalDep) -> dict[str, Any]:
    return {"chain_pem": hierarchy.sign_factory_csr(ctx, who, factory_id, body.csr_pem)}


@router.post("/factories/{factory_id}/batches", tags=["batches"], status_code=201)
def create_batch(factory_id: IdPath, body: BatchIn, ctx: CtxDep,
                 who: PrincipalDep) -> dict[str, Any]:
    created = hierarchy.create_batch(
        ctx, who, factory_id, name=body.name, product_model=body.product_model,
        hardware_revision=body.hardware_revision, planned_size=body.planned_size,
        manufactured_on=body.manufactured_on, own_ca=body.own_ca, auth_method=body.auth_method,
    )
    view = registry.batch_view(created.batch)
    if created.group_secret is not None:
        view["group_secret"] = created.group_secret
    return view


@router.get("/factories/{factory_id}/batches", tags=["batches"])
def list_batches(factory_id: IdPath, ctx: CtxDep, who: PrincipalDep) -> list[dict[str, Any]]:
    return registry.list_batches(ctx, who, factory_id)


@router.get("/batches/{batch_id}", tags=["batches"])
def get_batch(batch_id: IdPath, ctx: CtxDep, who: PrincipalDep) -> dict[str, Any]:
    return registry.get_batch(ctx, who, batch_id)


# --- issuance ----------------------------------------------------------------------------------


def _req(d: DeviceIn) -> issuance.IssueRequest:
    return issuance.IssueRequest(csr=d.csr, manifest=d.manifest, device_id=d.device_id,
                                 station=d.station)


@router.post("/batches/{batch_id}/devices", tags=["issuance"], status_code=201)
def issue_device(batch_id: IdPath, body: DeviceIn, ctx: CtxDep,
                 who: PrincipalDep) -> dict[str, Any]:
    return _issue_view(issuance.issue_devices(ctx, who, batch_id, [_req(body)]))


@router.post("/batches/{batch_id}/devices/bulk", tags=["issuance"], status_code=201)
def issue_bulk(batch_id: IdPath, body: BulkIn, ctx: CtxDep, who: PrincipalDep) -> dict[str, Any]:
    return _issue_view(issuance.issue_devices(ctx, who, batch_id, [_req(d) for d in body.items]))


@router.post("/batches/{batch_id}/devices/generate", tags=["issuance"], status_code=201)
def issue_generated(batch_id: IdPath, body: GenerateIn, ctx: CtxDep,
                    who: PrincipalDep) -> dict[str, Any]:
    gen = issuance.issue_with_server_key(
        ctx, who, batch_id, manifest=body.manifest, passphrase=body.passphrase,
        key_format=body.key_format, device_id=body.device_id, station=body.station,
    )
    view = _issue_view(gen.issued)
    view["key_format"] = gen.key_format
    if gen.key_format == "pkcs8":
        view["private_key_pem"] = gen.key_bytes.decode()
    else:
        view["pkcs12_b64"] = base64.b64encode(gen.key_bytes).decode()
    return view


@router.post("/batches/{batch_id}/devices/register", tags=["issuance"], status_code=201)
def register_shared_secret(batch_id: IdPath, body: RegisterIn, ctx: CtxDep,
                           who: PrincipalDep) -> dict[str, Any]:
    ids = shared_secret.register_devices(
        ctx, who, batch_id, [i.model_dump(exclude_none=True) for i in body.items])
    return {"batch_id": batch_id, "device_ids": ids}


# --- devices, claiming -------------------------------------------------------------------------


@router.get("/devices", tags=["devices"])
def list_devices(
    ctx: CtxDep, who: PrincipalDep,
    batch_id: IdQuery = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: IdQuery = None,
) -> list[dict[str, Any]]:
    return registry.list_devices(ctx, who, batch_id=batch_id, limit=limit, after=after)


@router.get("/devices/{device_id}", tags=["devices"])
def get_device(device_id: IdPath, ctx: CtxDep, who: PrincipalDep) -> dict[str, Any]:
    return registry.get_device(ctx, who, device_id)


@router.post("/devices/{device_id}/claim-code", tags=["claims"], status_code=201)
def create_claim_code(device_id: IdPath, body: ClaimCodeIn, ctx: CtxDep,
                      who: PrincipalDep) -> dict[str, Any]:
    issued = claims.create_claim_code(ctx, who, device_id, body.ttl_days)
    return {"device_id": issued.device_id, "code": issued.code, "claim_uri": issued.claim_uri,
            "expires_at": issued.expires_at.isoformat()}


@router.delete("/devices/{device_id}/claim-code", tags=["claims"])
def revoke_claim_code(device_id: IdPath, ctx: CtxDep, who: PrincipalDep) -> dict[str, int]:
    return {"revoked": claims.revoke_claim_codes(ctx, who, device_id)}


@router.post("/claims", tags=["claims"])
def claim(body: ClaimIn, ctx: CtxDep, who: PrincipalDep) -> dict[str, str]:
    return {"device_id": claims.claim_device(ctx, who, body.code), "owner": who.subject}


# --- shared-secret device authentication -------------------------------------------------------


@router.post("/device-auth/challenge", tags=["device-auth"])
def challenge(body: ChallengeIn, ctx: CtxDep) -> dict[str, str]:
    return {"device_id": body.device_id,
            "nonce": shared_secret.issue_challenge(ctx, body.device_id)}


@router.post("/device-auth/response", tags=["device-auth"])
def response(body: ResponseIn, request: Request, ctx: CtxDep) -> dict[str, str]:
    tok = shared_secret.answer_challenge(ctx, body.device_id, body.nonce, body.mac,
                                         remote_addr(request))
    return {"device_id": tok.device_id, "token": tok.token,
            "expires_at": tok.expires_at.isoformat()}


# --- findings, audit, tokens -------------------------------------------------------------------


@router.get("/findings", tags=["findings"])
def findings(ctx: CtxDep, who: PrincipalDep,
             status: Annotated[str, Query(pattern="^(open|suppressed|resolved)$")] = "open",
             limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
    return registry.list_findings(ctx, who, status, limit)


@router.get("/audit", tags=["audit"])
def audit_events(ctx: CtxDep, who: PrincipalDep,
                 target_id: Annotated[
                     str | None, Query(max_length=200, pattern=PRINTABLE_PATTERN)] = None,
                 after_id: Annotated[int, Query(ge=0)] = 0,
                 limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
    return registry.list_audit(ctx, who, target_id=target_id, after_id=after_id, limit=limit)


@router.post("/tokens", tags=["tokens"], status_code=201)
def create_token(body: TokenIn, ctx: CtxDep, who: PrincipalDep) -> dict[str, Any]:
    return registry.issue_token(ctx, who, role=body.role, subject=body.subject,
                                factory_id=body.factory_id, ttl_days=body.ttl_days)


@router.get("/tokens", tags=["tokens"])
def tokens(ctx: CtxDep, who: PrincipalDep) -> list[dict[str, Any]]:
    return registry.list_tokens(ctx, who)


@router.delete("/tokens/{token_id}", tags=["tokens"])
def revoke_token(token_id: IdPath, ctx: CtxDep, who: PrincipalDep) -> dict[str, str]:
    newly = registry.revoke_token(ctx, who, token_id)
    return {"id": token_id, "status": "revoked" if newly else "already_revoked"}
