"""Object identifiers used by fleettrust certificates.

fleettrust owns the UUID-based arc (ITU-T X.667 / RFC 4122 §A, ``2.25.<uuid as integer>``)
``2.25.29070838818879774542183493496137085409``. Nobody else can allocate below it, so no
registration is needed. Sub-arcs:

``.1``  :data:`DEVICE_BINDING` — the non-critical certificate extension
        ``FleetTrustDeviceBinding`` (production batch + hardware-manifest hash), see
        :mod:`fleettrust.pki.extensions`.
``.2``  :data:`HW_TYPE` — the ``hwType`` placed in the RFC 4108 ``hardwareModuleName``
        otherName of device certificates' subjectAltName.

Standard OIDs that ``cryptography`` does not name are defined here too
(:data:`HARDWARE_MODULE_NAME`).

This module only defines constants; it does not encode or interpret anything.
"""

from __future__ import annotations

from typing import Final

from cryptography import x509

#: Root of the project's private arc (a UUID OID, X.667).
FLEETTRUST_ARC: Final = x509.ObjectIdentifier("2.25.29070838818879774542183493496137085409")

#: ``id-fleettrust-deviceBinding``: the device-binding certificate extension (non-critical).
DEVICE_BINDING: Final = x509.ObjectIdentifier(f"{FLEETTRUST_ARC.dotted_string}.1")

#: ``id-fleettrust-hwType``: hwType of fleettrust devices inside ``hardwareModuleName``.
HW_TYPE: Final = x509.ObjectIdentifier(f"{FLEETTRUST_ARC.dotted_string}.2")

#: ``id-on-hardwareModuleName`` (RFC 4108 §5): the otherName form carrying (hwType, serial).
HARDWARE_MODULE_NAME: Final = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.4")

__all__ = ["DEVICE_BINDING", "FLEETTRUST_ARC", "HARDWARE_MODULE_NAME", "HW_TYPE"]
