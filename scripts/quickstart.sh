#!/usr/bin/env bash
# fleettrust quickstart: set up, start the API on 127.0.0.1:8080 with the embedded defaults
# (SQLite + encrypted key files under ./data), run the demo ceremony, create a demo factory and
# batch, print where it listens and the admin token, then keep the server in the foreground
# (Ctrl-C stops it). Safe to re-run: an existing ./data keeps its admin token and fleet CA.
#
# Files it creates (all ignored by git):
#   ./data/                     the server's data directory (database, key store, logs)
#   ./data/admin.token          copy of the first admin token (0600), for this script's own use
#   ./data/demo-factory.token   the demo factory's API token (0600)
#   ./data/server.log           server log while this script sets things up
#   ./ceremony/passphrase       random passphrase of the demo root key (0600)
#   ./ceremony/root/            the demo offline root CA. OUTSIDE ./data: the server never reads
#                               it. In production it lives on an offline machine.
#
# Environment: FLEETTRUST_PORT (default 8080); QUICKSTART_NO_WAIT=1 stops the server and exits 0
# after printing (used by the tests); QUICKSTART_SKIP_SETUP=1 skips scripts/setup.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ "${QUICKSTART_SKIP_SETUP:-}" != 1 ]]; then
  bash scripts/setup.sh
fi

FT="$ROOT/.venv/bin/fleettrust"
PY="$ROOT/.venv/bin/python"
DATA_DIR="./data"
CEREMONY_DIR="./ceremony"
ROOT_DIR="$CEREMONY_DIR/root"
PASSPHRASE_FILE="$CEREMONY_DIR/passphrase"
TOKEN_FILE="$DATA_DIR/admin.token"
HOST="127.0.0.1"
PORT="${FLEETTRUST_PORT:-8080}"
SERVER="http://$HOST:$PORT"
SERVER_PID=""

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'quickstart: error: %s\n' "$*" >&2; exit 1; }
json() { "$PY" -c "import json, sys; d = json.load(sys.stdin); print($1)"; }

stop_server() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
trap stop_server EXIT
trap 'exit 130' INT TERM

# 1. The data directory, database and first admin token.
say "initialising $DATA_DIR"
"$FT" init --data-dir "$DATA_DIR" --token-file "$TOKEN_FILE"
if [[ -s "$TOKEN_FILE" ]]; then
  ADMIN_TOKEN="$(tr -d '[:space:]' <"$TOKEN_FILE")"
elif [[ -n "${FLEETTRUST_TOKEN:-}" ]]; then
  ADMIN_TOKEN="$FLEETTRUST_TOKEN"
else
  die "$DATA_DIR already has an admin token but $TOKEN_FILE is gone; set FLEETTRUST_TOKEN to an admin token and re-run"
fi
export FLEETTRUST_SERVER="$SERVER" FLEETTRUST_TOKEN="$ADMIN_TOKEN"

# 2. The API server, in the background while we set up.
if curl -fsS -o /dev/null --max-time 2 "$SERVER/healthz" 2>/dev/null; then
  die "something already answers on $SERVER (an earlier quickstart?); stop it or set FLEETTRUST_PORT"
fi
say "starting the API server on $SERVER (log: $DATA_DIR/server.log)"
"$FT" serve --data-dir "$DATA_DIR" --host "$HOST" --port "$PORT" >"$DATA_DIR/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 120); do
  curl -fsS -o /dev/null --max-time 2 "$SERVER/healthz" 2>/dev/null && break
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    cat "$DATA_DIR/server.log" >&2
    die "the server exited during start-up (log above)"
  fi
  sleep 0.25
done
curl -fsS -o /dev/null --max-time 2 "$SERVER/healthz" || die "the server did not become healthy"

# 3. The demo ceremony: root CA in ./ceremony/root (outside the data directory), fleet CA key in
#    the server's key store, CSR signed by the root in this shell's CLI process, certificate
#    imported. Skipped when the server already has an active fleet CA.
say "certificate hierarchy"
mkdir -p "$CEREMONY_DIR"
chmod 700 "$CEREMONY_DIR"
if [[ ! -s "$PASSPHRASE_FILE" ]]; then
  (umask 077 && "$PY" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$PASSPHRASE_FILE")
fi
"$FT" ca bootstrap --dir "$ROOT_DIR" --passphrase-file "$PASSPHRASE_FILE"

# 4. A demo factory and batch, unless there is one already.
say "demo factory and batch"
FACTORY_ID="$("$FT" factory list --json | json 'd[0]["id"] if d else ""')"
if [[ -z "$FACTORY_ID" ]]; then
  created="$("$FT" factory create "Demo Factory" --json)"
  FACTORY_ID="$(json 'd["id"]' <<<"$created")"
  (umask 077 && json 'd["token"]' <<<"$created" >"$DATA_DIR/demo-factory.token")
  echo "factory $FACTORY_ID created; its token is in $DATA_DIR/demo-factory.token"
else
  echo "factory $FACTORY_ID exists"
fi
BATCH_ID="$("$FT" batch list "$FACTORY_ID" --json | json 'd[0]["id"] if d else ""')"
if [[ -z "$BATCH_ID" ]]; then
  BATCH_ID="$("$FT" batch create "$FACTORY_ID" --name demo-batch-1 --model DEMO-1 --hw-rev r1 \
    --size 1000 --json | json 'd["id"]')"
  echo "batch $BATCH_ID created"
else
  echo "batch $BATCH_ID exists"
fi

# 5. Where it is and how to use it.
cat <<EOF

================================================================================
fleettrust is listening on $SERVER   (OpenAPI: $SERVER/docs)
device gateway (mutual TLS): https://$HOST:${FLEETTRUST_GATEWAY_PORT:-8443}
admin token:   $ADMIN_TOKEN
               (a copy is in $DATA_DIR/admin.token, mode 0600)
data dir:      $DATA_DIR
demo factory:  $FACTORY_ID    demo batch: $BATCH_ID

Try:
  export FLEETTRUST_SERVER=$SERVER
  export FLEETTRUST_TOKEN=\$(cat $DATA_DIR/admin.token)
  .venv/bin/fleettrust ca show
  .venv/bin/fleettrust batch show $BATCH_ID
  .venv/bin/fleettrust simulate --devices 20 --duration 10 --batch $BATCH_ID \\
      --gateway https://$HOST:${FLEETTRUST_GATEWAY_PORT:-8443}

!! The demo root CA key is in $ROOT_DIR on THIS machine (outside the data
!! directory; the server never reads it). In production the root lives on an
!! offline machine: see "The offline ceremony" in README.md.
================================================================================
EOF

if [[ "${QUICKSTART_NO_WAIT:-}" == 1 ]]; then
  stop_server
  echo "QUICKSTART_NO_WAIT=1: server stopped"
  exit 0
fi

# 6. Hand over to a foreground server: its log on this terminal, Ctrl-C stops it.
stop_server
trap - EXIT INT TERM
say "running the server in the foreground (Ctrl-C stops it)"
exec "$FT" serve --data-dir "$DATA_DIR" --host "$HOST" --port "$PORT"
