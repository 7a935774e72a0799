"""Test helper: throw-away SoftHSM2 tokens for PKCS#11 tests (import it; it is not a conftest).

What it does: on first use in a process it creates ONE private directory holding a
``softhsm2.conf`` and a token directory, points ``SOFTHSM2_CONF`` at it, and initialises tokens
in it with ``softhsm2-util --init-token --free`` (fixed test SO PIN and user PIN). Asking for the
same label again returns the same token, so the helper is idempotent per process.

Why one directory per process: a PKCS#11 library reads its configuration once, in
``C_Initialize``, when it is first loaded into a process; SoftHSM2 (2.6) also enumerates tokens
only then. A second conf would therefore be ignored, and a token initialised by
``softhsm2-util`` after the library was loaded stays invisible until the library is
re-initialised. The helper calls :func:`fleettrust.signing.pkcs11.rescan_tokens` after creating
a token, which re-initialises the module if fleettrust already loaded it (open key stores log in
again transparently). Do not load ``libsofthsm2.so`` yourself before calling this helper.

What it does NOT do: it never touches the developer's real SoftHSM tokens (``SOFTHSM2_CONF`` is
always overridden), does not delete keys between tests (key ids are random, so tests do not
collide), and is not meant for anything but tests.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from fleettrust.signing.pkcs11 import Pkcs11Config, rescan_tokens

__all__ = [
    "SOFTHSM_MODULE",
    "TEST_SO_PIN",
    "TEST_USER_PIN",
    "make_softhsm_token",
    "softhsm_available",
]

TEST_SO_PIN = "fleettrust-so-pin"
TEST_USER_PIN = "fleettrust-user-pin"

_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/*/softhsm/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)


def _find_module() -> str | None:
    override = os.environ.get("FLEETTRUST_SOFTHSM_MODULE")
    if override:
        return override if os.path.isfile(override) else None
    for pattern in _CANDIDATES:
        for candidate in sorted(glob.glob(pattern)):
            if os.path.isfile(candidate):
                return candidate
    return None


SOFTHSM_MODULE: str | None = _find_module()
"""Path of ``libsofthsm2.so`` (``$FLEETTRUST_SOFTHSM_MODULE`` wins), or None if not installed."""

_LOCK = threading.Lock()
_ROOT: Path | None = None
_TOKENS: dict[str, Pkcs11Config] = {}


def softhsm_available() -> bool:
    """True if both ``softhsm2-util`` and the SoftHSM2 PKCS#11 module are installed."""
    return shutil.which("softhsm2-util") is not None and SOFTHSM_MODULE is not None


def _process_root() -> Path:
    """Create (once per process) the conf + token directory and export ``SOFTHSM2_CONF``."""
    global _ROOT
    if _ROOT is None:
        root = Path(tempfile.mkdtemp(prefix="fleettrust-softhsm-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        (root / "tokens").mkdir(mode=0o700)
        (root / "softhsm2.conf").write_text(
            f"directories.tokendir = {root / 'tokens'}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n"
            "slots.removable = false\n"
        )
        os.environ["SOFTHSM2_CONF"] = str(root / "softhsm2.conf")
        _ROOT = root
    return _ROOT


def make_softhsm_token(tmp_path: Path, label: str = "fleettrust-test") -> Pkcs11Config:
    """Return a config for an initialised SoftHSM2 token called ``label`` (created on demand).

    ``tmp_path`` is accepted so callers can pass pytest's fixture, but the token lives in the
    per-process directory described in the module docstring: it must outlive any single test
    because the library keeps using the configuration it read first.
    """
    del tmp_path  # see docstring: one token directory per process, not per test
    if not softhsm_available() or SOFTHSM_MODULE is None:
        raise RuntimeError("SoftHSM2 is not installed (softhsm2-util / libsofthsm2.so missing)")
    with _LOCK:
        existing = _TOKENS.get(label)
        if existing is not None:
            return existing
        root = _process_root()
        result = subprocess.run(
            [
                "softhsm2-util",
                "--init-token",
                "--free",
                "--label",
                label,
                "--so-pin",
                TEST_SO_PIN,
                "--pin",
                TEST_USER_PIN,
            ],
            env={**os.environ, "SOFTHSM2_CONF": str(root / "softhsm2.conf")},
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"softhsm2-util --init-token failed ({result.returncode}): "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        rescan_tokens(SOFTHSM_MODULE)
        config = Pkcs11Config(module=SOFTHSM_MODULE, token_label=label, user_pin=TEST_USER_PIN)
        _TOKENS[label] = config
        return config
