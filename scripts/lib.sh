# shellcheck shell=bash
# Shared helpers, sourced by the other scripts (never run directly).

# Pinned tool versions. wasm-bindgen-cli is deliberately NOT pinned here: it must match the
# wasm-bindgen library in Cargo.lock exactly, or the generated JS glue will not fit the wasm.
# shellcheck disable=SC2034  # used by setup.sh
WORKER_BUILD_VERSION=0.8.7
# shellcheck disable=SC2034
WASM_TARGET=wasm32-unknown-unknown

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1

# `cargo install` puts binaries here; a fresh shell (CI, wrangler's build subprocess) may not
# have it on PATH yet.
CARGO_BIN="${CARGO_HOME:-$HOME/.cargo}/bin"
case ":$PATH:" in *":$CARGO_BIN:"*) ;; *) PATH="$CARGO_BIN:$PATH" ;; esac
export PATH

# Wrangler must never stop to ask about telemetry; there may be nobody to answer.
export WRANGLER_SEND_METRICS=false

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Installs the Debian packages given (apt-get, so Debian or Ubuntu) that are not installed
# yet: as root, or through sudo otherwise. Callers check first for what they need (a command,
# a file) and name only the packages to provide it.
apt_install() { # package...
  local missing=() p
  for p in "$@"; do
    [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" == "install ok installed" ]] || missing+=("$p")
  done
  [[ ${#missing[@]} -gt 0 ]] || return 0
  command -v apt-get >/dev/null ||
    die "${missing[*]} missing, and no apt-get to install it (these scripts expect Debian or Ubuntu): install it by hand"
  local sudo=() how="apt-get"
  if [[ "$(id -u)" != 0 ]]; then
    command -v sudo >/dev/null || die "installing ${missing[*]} needs root: run as root, or install sudo"
    sudo=(sudo)
    how="sudo apt-get"
  fi
  log "installing ${missing[*]} (Debian packages, $how)"
  "${sudo[@]}" apt-get update -qq
  # env, not a prefix assignment: sudo does not pass the caller's environment on.
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# The wasm-bindgen version the crate graph resolved to.
wasm_bindgen_version() {
  [[ -f Cargo.lock ]] || cargo generate-lockfile >&2
  local v
  v="$(awk '$0 == "name = \"wasm-bindgen\"" { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)"
  [[ -n "$v" ]] || die "no wasm-bindgen entry in Cargo.lock"
  printf '%s\n' "$v"
}

wasm_bindgen_ok() {
  [[ "$(wasm-bindgen --version 2>/dev/null)" == "wasm-bindgen $(wasm_bindgen_version)" ]]
}

# worker-build would otherwise download esbuild, wasm-bindgen and wasm-opt from hosts that may
# be unreachable (they are on the offline CI machines); point it at the local copies instead.
export_build_env() {
  # The esbuild binary package is per platform (@esbuild/linux-x64 here and on CI).
  local candidates=("$ROOT"/node_modules/@esbuild/*/bin/esbuild)
  ESBUILD_BIN="${candidates[0]}"
  WASM_OPT_BIN="$ROOT/node_modules/.bin/wasm-opt"
  WASM_BINDGEN_BIN="$(command -v wasm-bindgen || true)"
  [[ -x "$ESBUILD_BIN" && -x "$WASM_OPT_BIN" ]] || die "node packages missing: run bash scripts/setup.sh"
  wasm_bindgen_ok || die "wasm-bindgen $(wasm_bindgen_version) not installed: run bash scripts/setup.sh"
  export ESBUILD_BIN WASM_OPT_BIN WASM_BINDGEN_BIN
}

# cargo install with the crate's own lockfile, for reproducible tools. The registry mirror
# can lag crates.io (wasm-bindgen-cli 0.2.130 locks webpki-roots 1.0.11, which the mirror used
# here lacks), so if the locked set cannot be resolved, retry with the newest compatible deps.
cargo_install_pinned() {
  local crate="$1" version="$2"
  cargo install "$crate" --version "$version" --locked --force && return 0
  log "locked install of $crate $version failed; retrying without --locked"
  cargo install "$crate" --version "$version" --force
}

# Applies D1 migrations to the local database (.wrangler/state, the one `wrangler dev` uses).
# CI=true keeps wrangler from asking for confirmation.
apply_local_migrations() {
  if compgen -G "migrations/*.sql" >/dev/null; then
    log "applying local D1 migrations"
    CI=true npx wrangler d1 migrations apply DB --local
  else
    log "no D1 migrations to apply"
  fi
}

# ---- background servers for the load and benchmark scripts ----
# `bg_begin PREFIX` makes the scratch directory $work and ends, on exit, every process group
# started with `start_bg` (each server and its children).
bg_begin() {
  work="$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")"
  pgids=()
  trap bg_cleanup EXIT
  # Ctrl-C or a TERM: exit (128 + the signal), which runs bg_cleanup.
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

bg_cleanup() {
  local g
  for g in "${pgids[@]}"; do kill -TERM -- "-$g" 2>/dev/null || true; done
  sleep 1
  for g in "${pgids[@]}"; do kill -KILL -- "-$g" 2>/dev/null || true; done
}

# Starts "$@" in a process group of its own, with output to $work/NAME.log; sets $started
# to its pid.
start_bg() { # name, command...
  local name="$1"
  shift
  setsid "$@" >"$work/$name.log" 2>&1 &
  started=$!
  pgids+=("$started")
}

# Migrates the local D1 in STATE, then starts the bridge in `wrangler dev` on PORT against
# the Realtime server at REALTIME (the stand-in), as the load check and the benchmark both
# run it, logging to $work/NAME.log (default bridge); sets $started to its pid and $inspector
# to its inspector's port. The OpenAI key is a placeholder the stand-in accepts. Any further
# arguments are NAME:VALUE variables of its own (`OPENAI_PREOPEN_SECONDS:0`).
start_bridge() { # port, state dir, realtime url, Twilio token, admin token[, name of its log[, NAME:VALUE…]]
  local port="$1" state="$2" realtime="$3" token="$4" admin="$5" name="${6:-bridge}"
  shift $(($# < 6 ? $# : 6))
  local extra=() v
  for v in "$@"; do extra+=(--var "$v"); done
  mkdir -p "$state"
  CI=true npx wrangler d1 migrations apply DB --local --persist-to "$state" >"$work/migrations.log" 2>&1 \
    || { tail -20 "$work/migrations.log" >&2; die "migrations failed"; }
  inspector=$(free_port)
  start_bg "$name" env CI=true NO_COLOR=1 npx wrangler dev --ip 127.0.0.1 --show-interactive-dev-session=false \
    --port "$port" --inspector-port "$inspector" --persist-to "$state" \
    --var "OPENAI_REALTIME_URL:$realtime" --var "TWILIO_AUTH_TOKEN:$token" \
    --var "OPENAI_API_KEY:sk-stand-in-not-a-key" --var "IDLE_TIMEOUT_SECONDS:600" --var "ADMIN_TOKEN:$admin" \
    "${extra[@]}"
}

free_port() {
  node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
}

# Waits until URL answers 2xx, for at most SECONDS; fails at once, with the tail of LOG,
# when PID (the server, as start_bg set $started) is given and has exited.
wait_http() { # url, log, seconds[, pid]
  local url="$1" logf="$2" limit="$3" pid="${4:-}" t=0
  until curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; do
    if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
      tail -40 "$logf" >&2
      die "the server for $url exited before it answered (log: $logf)"
    fi
    sleep 1
    t=$((t + 1))
    if [[ $t -ge $limit ]]; then
      tail -40 "$logf" >&2
      die "$url did not answer within ${limit}s"
    fi
  done
}
