#!/usr/bin/env bash
# README's benchmark command: prints figures, asserts nothing about time.
#   bash scripts/bench.sh [--calls N] [--seconds S] [--rounds R] [--one-at-a-time]
#                         [--skip-native] [--skip-load] [--skip-greeting] [--profile]
#                         [--greeting-calls N] [--handshake-ms MS] [--rtt-ms MS] [--gap-ms MS]
#   npm run bench -- --calls 100 --one-at-a-time
# (or BENCH_CALLS / BENCH_SECONDS / BENCH_ROUNDS in the environment; defaults 20 calls × 30 s,
# 3 rounds, each round running N calls against every target at once, so a change in the
# shared machine's load moves them all alike; --one-at-a-time runs the targets one after
# the other in A B C D D C B A order instead, for N large enough that four targets at once
# would be more than the machine can carry; about 8 minutes in all)
#
# 1. native: the call core's cost per relayed frame each way and per barge-in, with heap
#    allocation counts (cargo bench --bench core, benches/core.rs); then the same harness
#    built for wasm32-wasip1 (benches/wasm) and run in Node's V8, the engine workerd embeds
#    (bench/wasi.mjs): what the core costs per frame as wasm;
# 2. the wasm build's size, raw and gzipped (build/index_bg.wasm, freshly built);
# 3. load in wrangler dev: N simultaneous simulated calls with real-time audio both ways,
#    against the pass-through floor Worker (bench/floor), the same floor written in Rust
#    and built to wasm like the bridge (floor-rs, bench/floor-rs: what being a Rust/wasm
#    Worker costs by itself), the bridge (default agent, call recording on) and the bridge
#    with an agent that does not record (bridge-norec), all behind the stand-in Realtime
#    server in echo mode; call set-up, latency p50/p99 each way, frames lost, and workerd CPU
#    seconds per call-minute, as ratios to the floor and to floor-rs (bench/load.mjs); for
#    the bridge, how many calls left transcript rows in D1;
# 4. the greeting: how long a caller waits for the agent's first audio, from the voice
#    webhook's POST, one call at a time, with the Realtime socket opened at the webhook (the
#    default) and at the stream (OPENAI_PREOPEN_SECONDS=0), behind a stand-in that answers
#    each upgrade --handshake-ms after it came (OpenAI's connect as a Worker sees it; 400 by
#    default) and each event a round trip after it came (--rtt-ms, 100), while the caller's
#    stream opens --gap-ms after the webhook's answer (Twilio's own time to connect it; 300),
#    --greeting-calls calls each (10) (bench/greeting.mjs);
# 5. with --profile, a V8 CPU profile of each Worker while every call of the first round
#    streams: where its time goes, by kind (JavaScript, wasm, workerd built-ins such as
#    WebSocket.send, GC) and by function (bench/profile.mjs; the .cpuprofile files are kept
#    for Chrome's DevTools).
# Everything runs on 127.0.0.1, is bounded in calls and time, and stops by itself.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
exec </dev/null

calls="${BENCH_CALLS:-20}"
seconds="${BENCH_SECONDS:-30}"
rounds="${BENCH_ROUNDS:-3}"
together=1
native=1
load=1
profile=0
greeting=1
greeting_calls=10
handshake_ms=400
rtt_ms=100
gap_ms=300
while [[ $# -gt 0 ]]; do
  case "$1" in
    --calls) calls="$2"; shift 2 ;;
    --seconds) seconds="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --one-at-a-time) together=0; shift ;;
    --skip-native) native=0; shift ;;
    --skip-load) load=0; shift ;;
    --profile) profile=1; shift ;;
    --skip-greeting) greeting=0; shift ;;
    --greeting-calls) greeting_calls="$2"; shift 2 ;;
    --handshake-ms) handshake_ms="$2"; shift 2 ;;
    --rtt-ms) rtt_ms="$2"; shift 2 ;;
    --gap-ms) gap_ms="$2"; shift 2 ;;
    -h|--help) sed -n '2,37p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ "$calls" =~ ^[0-9]+$ && "$calls" -ge 1 && "$calls" -le 1000 ]] || die "--calls must be 1..1000"
[[ "$seconds" =~ ^[0-9]+$ && "$seconds" -ge 2 && "$seconds" -le 600 ]] || die "--seconds must be 2..600"
[[ "$rounds" =~ ^[0-9]+$ && "$rounds" -ge 1 && "$rounds" -le 10 ]] || die "--rounds must be 1..10"
[[ "$greeting_calls" =~ ^[0-9]+$ && "$greeting_calls" -ge 1 && "$greeting_calls" -le 100 ]] || die "--greeting-calls must be 1..100"
[[ "$handshake_ms" =~ ^[0-9]+$ && "$handshake_ms" -le 10000 ]] || die "--handshake-ms must be 0..10000"
[[ "$gap_ms" =~ ^[0-9]+$ && "$gap_ms" -le 10000 ]] || die "--gap-ms must be 0..10000"
[[ "$rtt_ms" =~ ^[0-9]+$ && "$rtt_ms" -le 10000 ]] || die "--rtt-ms must be 0..10000"

bash scripts/setup.sh

bg_begin bench

machine="$(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
native_out="$work/native.txt"
wasm_core_out="$work/wasm-core.txt"
load_out="$work/load.txt"
greeting_out="$work/greeting.txt"

log "building the Worker (release wasm)"
bash scripts/build.sh >"$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; die "build failed"; }
wasm=build/index_bg.wasm
raw=$(wc -c <"$wasm")
gz=$(gzip -9 -c "$wasm" | wc -c)

if [[ "$native" == 1 ]]; then
  log "native: cargo bench --bench core"
  cargo bench --bench core 2>"$work/cargo-bench.log" | tee "$native_out" || { tail -40 "$work/cargo-bench.log" >&2; die "cargo bench failed"; }
  if ! rustup target list --installed | grep -qx wasm32-wasip1; then
    log "adding rust target wasm32-wasip1 (the core's benchmark as wasm, run in Node)"
    rustup target add wasm32-wasip1
  fi
  log "wasm in V8: benches/wasm (the same harness for wasm32-wasip1), run by bench/wasi.mjs"
  cargo build --release --target wasm32-wasip1 --manifest-path benches/wasm/Cargo.toml \
    --target-dir target/core-wasm >"$work/core-wasm-build.log" 2>&1 ||
    { tail -40 "$work/core-wasm-build.log" >&2; die "building benches/wasm failed"; }
  node --no-warnings bench/wasi.mjs target/core-wasm/wasm32-wasip1/release/core.wasm --bench | tee "$wasm_core_out" ||
    die "the core's benchmark in Node failed"
fi

if [[ "$load" == 1 ]]; then
  standin_port=$(free_port)
  floor_port=$(free_port)
  bridge_port=$(free_port)
  log "load: stand-in (echo) on :$standin_port, floor Worker on :$floor_port, bridge on :$bridge_port"
  start_bg standin node scripts/sim/standin.mjs --mode echo --port "$standin_port" --quiet
  standin_pid=$started
  realtime="ws://127.0.0.1:$standin_port/v1/realtime"
  token="bench-twilio-token-$$"
  admin="bench-admin-token-$$"

  mkdir -p "$work/floor-state"
  floor_inspector=$(free_port)
  start_bg floor env CI=true NO_COLOR=1 npx wrangler dev -c bench/floor/wrangler.toml --ip 127.0.0.1 \
    --show-interactive-dev-session=false \
    --port "$floor_port" --inspector-port "$floor_inspector" --persist-to "$work/floor-state" \
    --var "OPENAI_REALTIME_URL:$realtime"
  floor_pid=$started

  log "building the Rust floor (bench/floor-rs)"
  (cd bench/floor-rs && export_build_env && worker-build --release) >"$work/floor-rs-build.log" 2>&1 ||
    { tail -40 "$work/floor-rs-build.log" >&2; die "building bench/floor-rs failed"; }
  floor_rs_port=$(free_port)
  floor_rs_inspector=$(free_port)
  mkdir -p "$work/floor-rs-state"
  start_bg floor-rs bash -c 'cd bench/floor-rs && exec env CI=true NO_COLOR=1 npx wrangler dev --ip 127.0.0.1 \
    --show-interactive-dev-session=false --port "$1" --inspector-port "$2" --persist-to "$3" \
    --var "OPENAI_REALTIME_URL:$4"' floor-rs "$floor_rs_port" "$floor_rs_inspector" "$work/floor-rs-state" "$realtime"
  floor_rs_pid=$started

  log "applying D1 migrations to the bridge's bench state, starting the bridge"
  start_bridge "$bridge_port" "$work/bridge-state" "$realtime" "$token" "$admin"
  bridge_pid=$started
  profiles=(--profile "floor=$floor_inspector" --profile "floor-rs=$floor_rs_inspector" --profile "bridge=$inspector"
    --profile-out "$work/profiles")
  [[ "$profile" == 1 ]] || profiles=()

  wait_http "http://127.0.0.1:$standin_port/healthz" "$work/standin.log" 20 "$standin_pid"
  wait_http "http://127.0.0.1:$floor_port/healthz" "$work/floor.log" 120 "$floor_pid"
  wait_http "http://127.0.0.1:$floor_rs_port/healthz" "$work/floor-rs.log" 120 "$floor_rs_pid"
  wait_http "http://127.0.0.1:$bridge_port/healthz" "$work/bridge.log" 300 "$bridge_pid"
  sleep 2

  # A second agent on another number, with call recording off: the bridge's cost without
  # the recording (bridge-norec), beside the default agent's (bridge, recording on). Run
  # together, it needs a Worker process of its own, so that each one's CPU is its own.
  bridge="http://127.0.0.1:$bridge_port"
  norec_bridge="$bridge"
  norec_pid="$bridge_pid"
  if [[ "$together" == 1 ]]; then
    norec_port=$(free_port)
    log "starting a second bridge for bridge-norec on :$norec_port"
    start_bridge "$norec_port" "$work/norec-state" "$realtime" "$token" "$admin" bridge-norec
    norec_pid=$started
    [[ "$profile" == 1 ]] && profiles+=(--profile "bridge-norec=$inspector")
    norec_bridge="http://127.0.0.1:$norec_port"
    wait_http "$norec_bridge/healthz" "$work/bridge-norec.log" 300 "$norec_pid"
  fi
  norec=()
  norec_number="+815099990000"
  if curl -fsS -o /dev/null -X POST "$norec_bridge/api/admin/agents" -H "Authorization: Bearer $admin" \
       -H 'Content-Type: application/json' \
       -d '{"id":"bench-norec","name":"bench, no recording","instructions":"bench","record_calls":false}' \
     && curl -fsS -o /dev/null -X PUT "$norec_bridge/api/admin/numbers/%2B815099990000" -H "Authorization: Bearer $admin" \
       -H 'Content-Type: application/json' -d '{"agent_id":"bench-norec"}'; then
    norec=(--target "bridge-norec=$norec_bridge" --pid "bridge-norec=$norec_pid" --to "bridge-norec=$norec_number" --admin "bridge-norec=$admin")
  else
    log "could not set up the no-recording agent through the admin API; skipping bridge-norec"
  fi
  how=(--together)
  [[ "$together" == 1 ]] || how=()

  if [[ "$together" == 1 ]]; then
    log "load: $calls calls × ${seconds}s against every Worker at once, $rounds round(s)"
  else
    log "load: $calls calls × ${seconds}s, $rounds round(s) per Worker, one Worker at a time"
  fi
  # --foreground: node stays in this script's process group, so Ctrl-C reaches it at once
  # (see scripts/load-test.sh).
  timeout --foreground $((4 * rounds * (seconds + 60) + 180)) node bench/load.mjs \
    --standin "http://127.0.0.1:$standin_port" --standin-pid "$standin_pid" \
    --target "floor=http://127.0.0.1:$floor_port" --pid "floor=$floor_pid" \
    --target "floor-rs=http://127.0.0.1:$floor_rs_port" --pid "floor-rs=$floor_rs_pid" --also-against floor-rs \
    --target "bridge=$bridge" --pid "bridge=$bridge_pid" --admin "bridge=$admin" "${norec[@]}" \
    --calls "$calls" --seconds "$seconds" --rounds "$rounds" --auth-token "$token" --clk-tck "$(getconf CLK_TCK)" \
    "${how[@]}" "${profiles[@]}" --json "$work/load.json" | tee "$load_out"
fi

if [[ "$greeting" == 1 ]]; then
  g_standin_port=$(free_port)
  log "greeting: stand-in (conversation, upgrades answered after ${handshake_ms} ms, events after ${rtt_ms} ms) on :$g_standin_port"
  start_bg greeting-standin node scripts/sim/standin.mjs --port "$g_standin_port" --handshake-ms "$handshake_ms" \
    --rtt-ms "$rtt_ms" --quiet
  g_standin_pid=$started
  g_realtime="ws://127.0.0.1:$g_standin_port/v1/realtime"
  g_token="bench-greeting-token-$$"
  g_admin="bench-greeting-admin-$$"
  g_at_webhook=$(free_port)
  start_bridge "$g_at_webhook" "$work/greeting-at-webhook-state" "$g_realtime" "$g_token" "$g_admin" greeting-at-webhook
  g_at_webhook_pid=$started
  g_at_stream=$(free_port)
  start_bridge "$g_at_stream" "$work/greeting-at-stream-state" "$g_realtime" "$g_token" "$g_admin" greeting-at-stream \
    OPENAI_PREOPEN_SECONDS:0
  g_at_stream_pid=$started
  wait_http "http://127.0.0.1:$g_standin_port/healthz" "$work/greeting-standin.log" 20 "$g_standin_pid"
  wait_http "http://127.0.0.1:$g_at_webhook/healthz" "$work/greeting-at-webhook.log" 300 "$g_at_webhook_pid"
  wait_http "http://127.0.0.1:$g_at_stream/healthz" "$work/greeting-at-stream.log" 300 "$g_at_stream_pid"
  log "greeting: $greeting_calls calls per bridge, one at a time, the stream ${gap_ms} ms after the webhook's answer"
  timeout --foreground $((greeting_calls * 2 * 20 + 120)) node bench/greeting.mjs \
    --target "socket-at-stream=http://127.0.0.1:$g_at_stream" \
    --target "socket-at-webhook=http://127.0.0.1:$g_at_webhook" \
    --auth-token "$g_token" --calls "$greeting_calls" --gap-ms "$gap_ms" --json "$work/greeting.json" | tee "$greeting_out"
fi

echo
echo "================================================================================"
echo "benchmark summary — $(date -u +%Y-%m-%dT%H:%MZ), $machine"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
echo "--------------------------------------------------------------------------------"
printf 'wasm build (build/index_bg.wasm): %s bytes raw, %s bytes gzipped (-9)\n' "$raw" "$gz"
if [[ "$native" == 1 ]]; then
  echo
  cat "$native_out"
  echo
  cat "$wasm_core_out"
fi
if [[ "$load" == 1 ]]; then
  echo
  cat "$load_out"
  echo "(set-up: stream start → first audio back; latency: one way through the Worker on loopback,"
  echo " every frame once the call's audio path was up both ways; CPU: utime+stime of the Worker's"
  echo " workerd processes / call-minutes of audio; \"all calls streaming\": the same while every"
  echo " call is up, and \"set-up + teardown\": the rest of the run's CPU, per call)"
fi
if [[ "$greeting" == 1 ]]; then
  echo
  cat "$greeting_out"
  echo "(greeting: the voice webhook's POST → the first agent audio on the stream; the stand-in"
  echo " answered each Realtime upgrade ${handshake_ms} ms and each event ${rtt_ms} ms after it came, and the"
  echo " stream opened ${gap_ms} ms after the webhook's answer; socket-at-stream runs with OPENAI_PREOPEN_SECONDS=0)"
fi
echo "logs and raw figures: $work"
