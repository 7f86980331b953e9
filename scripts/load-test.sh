#!/usr/bin/env bash
# The test command's load step: a small load run against the bridge alone that FAILS when a
# call fails, any frame is lost either way, or any call has no transcript rows in D1. It
# asserts nothing about time (latency and CPU are printed, never judged).
#   bash scripts/load-test.sh [--calls N] [--seconds S]      (defaults 10 calls × 10 s)
# (or LOAD_CALLS / LOAD_SECONDS in the environment). The full load run of the load issue is
#   bash scripts/load-test.sh --calls 100 --seconds 60
# The stand-in Realtime server (echo mode) and `wrangler dev` run on free ports of
# 127.0.0.1 with state in a temporary directory; everything stops by itself.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
exec </dev/null

calls="${LOAD_CALLS:-10}"
seconds="${LOAD_SECONDS:-10}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --calls) calls="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ "$calls" =~ ^[0-9]+$ && "$calls" -ge 1 && "$calls" -le 1000 ]] || die "--calls must be 1..1000"
[[ "$seconds" =~ ^[0-9]+$ && "$seconds" -ge 2 && "$seconds" -le 600 ]] || die "--seconds must be 2..600"

bash scripts/setup.sh

bg_begin load-test

log "building the Worker (release wasm)"
bash scripts/build.sh >"$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; die "build failed"; }

standin_port=$(free_port)
bridge_port=$(free_port)
token="load-twilio-token-$$"
admin="load-admin-token-$$"
log "stand-in (echo) on :$standin_port, bridge on :$bridge_port; state in $work"
start_bg standin node scripts/sim/standin.mjs --mode echo --port "$standin_port" --quiet
standin_pid=$started
start_bridge "$bridge_port" "$work/state" "ws://127.0.0.1:$standin_port/v1/realtime" "$token" "$admin"
bridge_pid=$started
wait_http "http://127.0.0.1:$standin_port/healthz" "$work/standin.log" 20 "$standin_pid"
wait_http "http://127.0.0.1:$bridge_port/healthz" "$work/bridge.log" 300 "$bridge_pid"

log "load: $calls calls × ${seconds}s against the bridge (fails on a lost frame or a call without transcript rows)"
status=0
# --foreground keeps node in this script's process group, so Ctrl-C reaches it at once (and
# then the INT trap, whose exit stops the servers); without it timeout puts node in a group
# of its own, which the terminal's SIGINT never reaches.
timeout --foreground $((2 * seconds + 300)) node bench/load.mjs \
  --standin "http://127.0.0.1:$standin_port" --standin-pid "$standin_pid" \
  --target "bridge=http://127.0.0.1:$bridge_port" --pid "bridge=$bridge_pid" --admin "bridge=$admin" \
  --calls "$calls" --seconds "$seconds" --rounds 1 --auth-token "$token" --clk-tck "$(getconf CLK_TCK)" \
  --json "$work/load.json" --check || status=$?
if [[ $status -ne 0 ]]; then
  tail -30 "$work/bridge.log" >&2
  die "load test failed (logs: $work)"
fi
log "load test passed (logs: $work)"
