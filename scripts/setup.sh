#!/usr/bin/env bash
# Installs everything the build, dev server and tests need. Idempotent: each step checks first,
# so a second run takes a second or two.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

command -v cargo >/dev/null || die "cargo not found: install Rust from https://rustup.rs"
command -v npm >/dev/null || die "npm not found: install Node.js 20 or newer"

# A C toolchain (every native build links with it) and OpenSSL's headers found through
# pkg-config (worker-build's TLS): Debian packages, installed when missing.
sys=()
command -v cc >/dev/null || sys+=(build-essential)
command -v pkg-config >/dev/null || sys+=(pkg-config)
pkg-config --exists openssl 2>/dev/null || sys+=(libssl-dev)
[[ ${#sys[@]} -eq 0 ]] || apt_install "${sys[@]}"

if ! rustup target list --installed | grep -qx "$WASM_TARGET"; then
  log "adding rust target $WASM_TARGET"
  rustup target add "$WASM_TARGET"
fi

# `worker-build --version` prints the bare version ("0.8.7").
if [[ "$(worker-build --version 2>/dev/null | awk '{print $NF}')" != "$WORKER_BUILD_VERSION" ]]; then
  log "installing worker-build $WORKER_BUILD_VERSION (a few minutes, once)"
  cargo_install_pinned worker-build "$WORKER_BUILD_VERSION"
fi

if ! wasm_bindgen_ok; then
  v="$(wasm_bindgen_version)"
  log "installing wasm-bindgen-cli $v to match Cargo.lock (a few minutes, once)"
  cargo_install_pinned wasm-bindgen-cli "$v"
fi

# npm ci rewrites node_modules/.package-lock.json, so an older one means the lockfile changed
# since the last install.
if [[ ! -f node_modules/.package-lock.json || package-lock.json -nt node_modules/.package-lock.json ]]; then
  log "installing node packages (npm ci)"
  npm ci --no-audit --no-fund
fi

if [[ ! -f .dev.vars ]]; then
  log "creating .dev.vars from .dev.vars.example (local secrets; edit it, never commit it)"
  cp .dev.vars.example .dev.vars
else
  # A checkout made before a variable joined the example gets it too (its values are kept).
  while IFS= read -r line; do
    name="${line%%=*}"
    if ! grep -q "^${name}=" .dev.vars; then
      log "adding $name to .dev.vars (from .dev.vars.example; edit it)"
      printf '\n%s\n' "$line" >> .dev.vars
    fi
  done < <(grep -E '^[A-Z][A-Z0-9_]*=' .dev.vars.example)
fi

log "setup ok"
