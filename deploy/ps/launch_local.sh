#!/usr/bin/env bash
# Local launch: N shard processes + K worker processes on loopback, with a bearer token.
#   deploy/ps/launch_local.sh [SHARDS=2] [WORKERS=2] [OUT=out/ps-local]
# Environment: PY (interpreter, .venv/bin/python), START_TIMEOUT (seconds a shard may take
# to start, 300). Exits 1 with the shard's log when a shard dies at start.
# Shards run in sync mode with a checkpoint directory and the write-ahead log; every process
# is stopped (SIGTERM, final checkpoint) when the workers finish or the script is interrupted.
set -euo pipefail
SHARDS=${1:-2}
WORKERS=${2:-2}
OUT=${3:-out/ps-local}
PY=${PY:-.venv/bin/python}
# the demo worker: examples/ps/demo.py of this checkout (examples are not in the wheel)
DEMO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/examples/ps/demo.py
mkdir -p "$OUT"
TOKEN_FILE="$OUT/token"
[ -s "$TOKEN_FILE" ] || (umask 077; $PY -c 'import secrets; print(secrets.token_urlsafe(32))' > "$TOKEN_FILE")
# The shards' own secret (signs sync-round decisions); the workers never read it.
SERVER_KEY_FILE="$OUT/server-key"
[ -s "$SERVER_KEY_FILE" ] || (umask 077; $PY -c 'import secrets; print(secrets.token_urlsafe(32))' > "$SERVER_KEY_FILE")

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait || true; }
trap cleanup EXIT INT TERM

ports=()
for ((i = 0; i < SHARDS; i++)); do
  rm -f "$OUT/shard$i.port"
  $PY -m radam_dist.ps.cli serve --port 0 --port-file "$OUT/shard$i.port" \
      --num-shards "$SHARDS" --shard-index "$i" --mode sync --num-workers "$WORKERS" \
      --checkpoint-dir "$OUT/ckpt$i" --wal --token-file "$TOKEN_FILE" \
      --server-key-file "$SERVER_KEY_FILE" >"$OUT/shard$i.log" 2>&1 &
  pids+=($!)
done
# A shard that dies at start (bad argument, placeholder token, a checkpoint of another
# shard, ...) never writes its port file: give up with its log instead of waiting forever.
START_TIMEOUT=${START_TIMEOUT:-300}
give_up() { echo "launch_local.sh: $1; last lines of $2:" >&2; tail -n 20 "$2" >&2 || true; exit 1; }
for ((i = 0; i < SHARDS; i++)); do
  waited=0
  until [ -s "$OUT/shard$i.port" ]; do
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      rc=0; wait "${pids[$i]}" || rc=$?
      give_up "shard $i exited with status $rc before serving" "$OUT/shard$i.log"
    fi
    if ((waited >= START_TIMEOUT * 5)); then
      give_up "shard $i did not serve within ${START_TIMEOUT}s (START_TIMEOUT)" "$OUT/shard$i.log"
    fi
    sleep 0.2; waited=$((waited + 1))
  done
  ports+=("127.0.0.1:$(cat "$OUT/shard$i.port")")
done
echo "shards: ${ports[*]}"
wpids=()
for ((w = 0; w < WORKERS; w++)); do
  $PY "$DEMO" worker --out "$OUT" --index "$w" --num-workers "$WORKERS" \
      --targets "${ports[@]}" --token-file "$TOKEN_FILE" >"$OUT/worker-$w.log" 2>&1 &
  wpids+=($!)
done
for p in "${wpids[@]}"; do wait "$p"; done
for ((w = 0; w < WORKERS; w++)); do cat "$OUT/worker-$w.json"; echo; done
