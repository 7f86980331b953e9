#!/usr/bin/env bash
# README command 1: install what is missing, migrate the local D1 database, serve the Worker
# locally (http://localhost:8787). Extra args go to `wrangler dev`.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bash scripts/setup.sh
apply_local_migrations
exec npx wrangler dev "$@"
