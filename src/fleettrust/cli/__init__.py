"""The ``fleettrust`` command line: a thin HTTP client of the server (like ``step`` or ``vault``).

Only ``init``, ``serve``, ``db upgrade``, ``ca init-root`` and ``ca sign`` (the offline ceremony)
work locally; everything else calls the API with ``--server``/``--token`` (or the environment
variables ``FLEETTRUST_SERVER`` and ``FLEETTRUST_TOKEN``).
"""
