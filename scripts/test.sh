#!/usr/bin/env bash
# Set up and run every check: ruff, mypy (strict, config in pyproject.toml), then the whole
# pytest suite against SQLite and PostgreSQL. `.ci/run` calls this script.
#
# Starts PostgreSQL and Mosquitto when they are installed but not running. Exits non-zero if any
# step fails, and also if pytest collects no tests at all (its exit code 5).
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh tests/cli -x    # extra arguments go to pytest
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

log() { printf '\n==> %s\n' "$*" >&2; }
VENV_BIN="$ROOT/.venv/bin"
export PATH="$VENV_BIN:$PATH"

listening() {  # listening HOST PORT
  timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

wait_for() {  # wait_for NAME HOST PORT
  for _ in $(seq 1 60); do
    listening "$2" "$3" && return 0
    sleep 0.5
  done
  printf 'test: %s did not start listening on %s:%s\n' "$1" "$2" "$3" >&2
  return 1
}

# --- services the tests talk to ------------------------------------------------------------------
if ! listening 127.0.0.1 5432; then
  if [[ -d /etc/postgresql ]] && command -v pg_ctlcluster >/dev/null; then
    version="$(ls /etc/postgresql | sort -V | tail -n 1)"
    log "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_for PostgreSQL 127.0.0.1 5432 || true
  else
    log "PostgreSQL is not installed here; its tests are skipped (and fail when CI=true)"
  fi
fi
if listening 127.0.0.1 5432 && command -v psql >/dev/null && [[ $(id -u) -eq 0 ]]; then
  # The suite uses database `test`; create it if this machine lacks it (best effort).
  if ! runuser -u postgres -- psql -qtAc "select 1 from pg_database where datname = 'test'" \
      2>/dev/null | grep -q 1; then
    runuser -u postgres -- createdb test 2>/dev/null || true
  fi
fi
if ! listening 127.0.0.1 1883 && command -v mosquitto >/dev/null; then
  log "starting Mosquitto"
  mosquitto -d -c /etc/mosquitto/mosquitto.conf || true
  wait_for Mosquitto 127.0.0.1 1883 || true
fi

# --- the checks ----------------------------------------------------------------------------------
failed=()

lint_paths=()
for p in src tests bench; do [[ -e "$p" ]] && lint_paths+=("$p"); done
log "ruff check ${lint_paths[*]}"
ruff check "${lint_paths[@]}" || failed+=("ruff")

log "mypy (strict, see [tool.mypy] in pyproject.toml)"
mypy || failed+=("mypy")

log "pytest"
rc=0
pytest -q "$@" || rc=$?
if [[ $rc -eq 5 ]]; then
  printf 'test: pytest collected no tests; that is a failure\n' >&2
  failed+=("pytest (no tests collected)")
elif [[ $rc -ne 0 ]]; then
  failed+=("pytest (exit $rc)")
fi

if [[ ${#failed[@]} -gt 0 ]]; then
  printf '\nFAILED: %s\n' "$(IFS=,; echo "${failed[*]}" | sed 's/,/, /g')" >&2
  exit 1
fi
printf '\nall checks passed\n' >&2
