"""The ``fleettrust`` command line: a thin HTTP client of the server (like ``step`` or ``vault``).

Only ``init``, ``serve``, ``db upgrade``, ``ca init-root`` and ``ca sign`` (the offline ceremony)
work locally; the operator commands call the API with ``--server``/``--token`` (or the environment
variables ``FLEETTRUST_SERVER`` and ``FLEETTRUST_TOKEN``). ``agent`` and ``simulate``
(``cli/agent.py``) are the device side: they talk to the device gateway.
"""
