"""fleettrust: the trust backbone of an IoT fleet.

Offline-root certificate hierarchy, factories and production batches, manufacturing-time
device certificates, revocation, hardware identity and a signed update stream.

Layers (data flows one way): ``api``/``cli`` -> ``services`` -> ``pki``, ``signing``,
``storage``. Nothing below ``services`` imports ``api``.
"""

__version__ = "0.1.0"
