"""fleettrust device agent: the device side of the device channel (docs/device-protocol.md).

Modules:

* :mod:`~fleettrust.agent.state` — ``state.json`` and identity files, written atomically;
* :mod:`~fleettrust.agent.identity` — device key (file or PKCS#11), CSR, signed messages;
* :mod:`~fleettrust.agent.manifest` — hardware manifest gathered from the system (+ override);
* :mod:`~fleettrust.agent.enroll` — factory enrollment: request, submission, installation;
* :mod:`~fleettrust.agent.protocol` — request/response bodies and error classification;
* :mod:`~fleettrust.agent.backoff` — full-jitter exponential back-off, jittered intervals;
* :mod:`~fleettrust.agent.tls` — pinned-root mTLS client contexts, TLS session resumption;
* :mod:`~fleettrust.agent.runner` — :class:`Agent`, the check-in / renewal loop;
* :mod:`~fleettrust.agent.simulator` — many virtual devices against a loopback gateway.

The agent never talks to the database and imports nothing from ``api``, ``services`` or
``storage``: it is what runs on the device. Submodules are imported lazily by their users (the
simulator pulls in asyncio machinery the agent does not need).
"""

from __future__ import annotations
