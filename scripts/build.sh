#!/usr/bin/env bash
# Builds the Worker into build/ (index.js + index_bg.wasm). wrangler.toml's [build] command
# runs this, so `wrangler dev` and `wrangler deploy` build exactly like the scripts do.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# `wrangler dev` runs the build on every start. The integration tests start many dev servers
# (in parallel) right after test.sh built, so skip when nothing changed: that saves time and
# keeps concurrent builds from rewriting build/ under a running server. Deploys and direct
# calls always build.
if [[ "${WRANGLER_COMMAND:-}" == dev && -f build/index.js && -f build/index_bg.wasm ]]; then
  inputs=(src Cargo.toml Cargo.lock)
  [[ -d .cargo ]] && inputs+=(.cargo)
  if [[ -z "$(find "${inputs[@]}" -newer build/index_bg.wasm -print -quit)" ]]; then
    log "build/ is up to date"
    exit 0
  fi
fi

export_build_env
worker-build --release "$@"
