"""Pure X.509 logic for fleettrust: profiles, extensions, CSRs, manifests, chains.

No I/O, no database, no clock (every function that needs the time takes ``now``), and no
policy about *who* may do what — that lives in ``services``. Signing goes through the
:class:`fleettrust.signing.Signer` protocol; this package never sees a private key.
"""

from __future__ import annotations

from fleettrust.pki.chain import fingerprint_sha256, verify_chain
from fleettrust.pki.csr import check_key_allowed, load_csr, public_key_fingerprint
from fleettrust.pki.extensions import (
    DeviceBinding,
    decode_device_binding,
    device_binding_extension,
    device_binding_from_certificate,
    encode_device_binding,
)
from fleettrust.pki.manifest import (
    Manifest,
    canonical_json,
    identifiers,
    load_manifest_json,
    manifest_hash,
    normalize_manifest,
)
from fleettrust.pki.oids import DEVICE_BINDING, FLEETTRUST_ARC, HARDWARE_MODULE_NAME, HW_TYPE
from fleettrust.pki.profiles import (
    CLOCK_SKEW,
    DEVICE_ID_RE,
    DeviceProfile,
    build_ca_csr,
    build_root_certificate,
    check_device_id,
    issue_ca_certificate,
    issue_ocsp_responder_certificate,
    issue_server_certificate,
)
from fleettrust.pki.serials import new_serial

__all__ = [
    "CLOCK_SKEW",
    "DEVICE_BINDING",
    "DEVICE_ID_RE",
    "FLEETTRUST_ARC",
    "HARDWARE_MODULE_NAME",
    "HW_TYPE",
    "DeviceBinding",
    "DeviceProfile",
    "Manifest",
    "build_ca_csr",
    "build_root_certificate",
    "canonical_json",
    "check_device_id",
    "check_key_allowed",
    "decode_device_binding",
    "device_binding_extension",
    "device_binding_from_certificate",
    "encode_device_binding",
    "fingerprint_sha256",
    "identifiers",
    "issue_ca_certificate",
    "issue_ocsp_responder_certificate",
    "issue_server_certificate",
    "load_csr",
    "load_manifest_json",
    "manifest_hash",
    "new_serial",
    "normalize_manifest",
    "public_key_fingerprint",
    "verify_chain",
]
