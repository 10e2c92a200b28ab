#!/usr/bin/env bash
# Container entrypoint.
#
#   (no arguments)   the worker (`musetalk-flow serve`) and, on SaladCloud, the Salad HTTP job-queue worker
#                    beside it. The container exits as soon as either dies, so the platform restarts it
#                    whole instead of leaving a worker that takes jobs nobody renders (or the reverse).
#   healthcheck      exit 0 when GET /hc answers 200 (Docker HEALTHCHECK; stdlib Python, no curl needed).
#   anything else    run it instead, e.g. `python -m benchmarks --profile full-random --out /app/results/b.json`.
#
# The Salad worker runs when MUSETALK_SALAD_WORKER is `on`, or `auto` (the default) with its binary installed
# and no BUFFER_WORKER_ID (buffer machines take work from the orchestrator, not from a Salad queue).
# Set MUSETALK_SALAD_WORKER=off to run the image outside SaladCloud, where that worker cannot start.
#
# SIGTERM/SIGINT: the app is stopped first (it drains and finishes its job within
# MUSETALK_SHUTDOWN_GRACE_SEC, while the Salad worker can still hand the answer back), then the Salad worker.
set -euo pipefail

PORT="${PORT:-8000}"
HOST="${HOST:-0.0.0.0}"
SALAD_WORKER_BIN="${SALAD_WORKER_BIN:-/usr/local/bin/salad-http-job-queue-worker}"
SALAD_MODE="${MUSETALK_SALAD_WORKER:-auto}"

log() { echo "entrypoint: $*" >&2; }

healthcheck() {
  python3 - "$PORT" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/hc", timeout=4) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception as exc:
    print(f"unhealthy: {exc}", file=sys.stderr)
    sys.exit(1)
PY
}

want_salad_worker() {
  case "$SALAD_MODE" in
    on) [ -x "$SALAD_WORKER_BIN" ] || { log "MUSETALK_SALAD_WORKER=on but $SALAD_WORKER_BIN is missing"; exit 2; }
        return 0 ;;
    off) return 1 ;;
    auto) [ -x "$SALAD_WORKER_BIN" ] && [ -z "${BUFFER_WORKER_ID:-}" ] ;;
    *) log "MUSETALK_SALAD_WORKER must be auto, on or off (got '$SALAD_MODE')"; exit 2 ;;
  esac
}

if [ "$#" -gt 0 ]; then
  if [ "$1" = "healthcheck" ]; then
    healthcheck
    exit $?
  fi
  exec "$@"
fi

app_pid=""
salad_pid=""
stopping=""

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

stop() {  # TERM one child and wait for it (a second signal interrupts the wait: wait again)
  local pid="$1"
  alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  while alive "$pid"; do wait "$pid" 2>/dev/null || true; done
}

# shellcheck disable=SC2329  # invoked by the traps below
on_signal() {
  [ -n "$stopping" ] && return 0
  stopping="$1"
  log "$1 received: stopping the app (it finishes or abandons its job), then the Salad worker"
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

musetalk-flow serve --host "$HOST" --port "$PORT" &
app_pid=$!
pids=("$app_pid")
if want_salad_worker; then
  "$SALAD_WORKER_BIN" &
  salad_pid=$!
  pids+=("$salad_pid")
  log "started the app (pid $app_pid) and the Salad job-queue worker (pid $salad_pid)"
else
  log "started the app (pid $app_pid); Salad job-queue worker not started (MUSETALK_SALAD_WORKER=$SALAD_MODE)"
fi

status=0
died=""
set +e
while [ -z "$stopping" ] && [ -z "${died:-}" ]; do
  wait -n -p died "${pids[@]}"  # returns when a child exits, or at once when a trapped signal arrives
  status=$?
done
set -e

if [ -n "${died:-}" ] && [ -z "$stopping" ]; then
  if [ "$died" = "$app_pid" ]; then what="the app"; else what="the Salad job-queue worker"; fi
  log "$what exited with status $status: stopping the container"
else
  status=0
fi
stop "$app_pid"
stop "$salad_pid"
exit "$status"
