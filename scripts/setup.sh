#!/usr/bin/env bash
# Set up fleettrust on a Debian machine: system packages, .venv, editable install with test extras.
#
# Idempotent and quiet: packages already installed are not touched (no apt-get at all when every
# package is present), and the pip step is skipped while pyproject.toml and the interpreter are
# unchanged since the last successful run. Output of a failing step is shown in full.
#
#   bash scripts/setup.sh            # as root, or as a user with sudo for the apt step
#   FLEETTRUST_SETUP_FORCE=1 ...     # re-run pip even if nothing changed
set -euo pipefail

# The Debian packages fleettrust and its tests need. Add new ones here (one list for everyone).
APT_PACKAGES=(
  python3-venv        # `python3 -m venv` on Debian's python3
  softhsm2            # PKCS#11 token for the HSM key-store tests
  opensc              # pkcs11-tool, for inspecting tokens
  openssl             # `openssl verify` / `ocsp` interoperability checks
  curl                # health checks in scripts, `curl --cert` tests
  mosquitto           # MQTT broker for the revocation push tests
  mosquitto-clients   # mosquitto_pub / mosquitto_sub
)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
STAMP="$VENV/.fleettrust-setup"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# Run a command with its output captured; print the output only if it fails.
quiet() {
  local out rc=0
  out="$(mktemp)"
  "$@" >"$out" 2>&1 || rc=$?
  if [[ $rc -ne 0 ]]; then
    printf 'setup: command failed (exit %d): %s\n' "$rc" "$*" >&2
    cat "$out" >&2
    rm -f "$out"
    exit "$rc"
  fi
  rm -f "$out"
}

# --- 1. Debian packages --------------------------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
  [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  command -v apt-get >/dev/null || die "apt-get not found; install by hand: ${missing[*]}"
  SUDO=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "not root and no sudo; as root run: apt-get install ${missing[*]}"
    SUDO=(sudo -n)
  fi
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  quiet "${SUDO[@]}" apt-get update -q
  quiet "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- 2. the virtual environment ------------------------------------------------------------------
PYTHON="$(command -v python3.11 || command -v python3 || true)"
[[ -n "$PYTHON" ]] || die "no python3.11 or python3 on PATH"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "$PYTHON is $("$PYTHON" -V 2>&1); fleettrust needs Python 3.11 or newer"

if [[ -x "$VENV/bin/python" ]] && ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  log "existing .venv is broken or too old; recreating it"
  rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating .venv with $("$PYTHON" -V 2>&1)"
  quiet "$PYTHON" -m venv "$VENV"
  rm -f "$STAMP"
fi

# --- 3. fleettrust itself, editable, with test tools ---------------------------------------------
# The stamp records what the last successful install was made from; the import check catches a
# moved checkout (an editable install points at the old path).
want="$(cat pyproject.toml <("$VENV/bin/python" -VV) | sha256sum | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"
installed_here="$("$VENV/bin/python" -c 'import fleettrust, os; print(os.path.realpath(fleettrust.__file__))' 2>/dev/null || true)"
if [[ -n "${FLEETTRUST_SETUP_FORCE:-}" || "$want" != "$have" || ! -x "$VENV/bin/fleettrust" \
      || "$installed_here" != "$(realpath "$ROOT")/src/fleettrust/__init__.py" ]]; then
  log "installing fleettrust into .venv (pip install -e '.[test]')"
  quiet "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  quiet "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]'
  printf '%s\n' "$want" >"$STAMP"
fi
log "setup done: $("$VENV/bin/fleettrust" --version) in $VENV"
