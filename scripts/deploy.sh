#!/usr/bin/env bash
# README's deploy command (`npm run deploy`): installs what the build needs, checks what only
# you can set up before a first deploy and the [vars] as the Worker will read them
# (src/bin/check-config.rs), applies the D1 migrations the database has not had yet, then
# runs `wrangler deploy` (which builds the Worker with scripts/build.sh). Other options go to
# wrangler, e.g. `npm run deploy -- --dry-run`.
#   bash scripts/deploy.sh [--config FILE] [--check-only] [wrangler deploy options]
# --config FILE (in this directory: wrangler resolves its paths from there) checks and
# deploys FILE instead of wrangler.toml; --check-only stops after the checks.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

config=wrangler.toml
check_only=0
pass=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) config="$2"; shift 2 ;;
    --check-only) check_only=1; shift ;;
    -h|--help) sed -n '2,9p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) pass+=("$1"); shift ;;
  esac
done
[[ -f "$config" ]] || die "$config not found"

# The [vars]: the Worker would answer calls with an invalid value set aside for its default
# (logged as config.ignored), a misspelt name would do nothing, and a secret there would be
# committed. wrangler does not inherit [vars] into an environment: check the one deployed
# (--env / -e, or CLOUDFLARE_ENV), with the values `--var KEY:VALUE` adds at deploy time.
check_args=()
env_args=()
dry_run=0
[[ -n "${CLOUDFLARE_ENV:-}" ]] && check_args=(--env "$CLOUDFLARE_ENV")
for ((i = 0; i < ${#pass[@]}; i++)); do
  case "${pass[$i]}" in
    --dry-run) dry_run=1 ;;
    --env|-e) check_args+=(--env "${pass[$((i + 1))]:-}"); env_args=(--env "${pass[$((i + 1))]:-}") ;;
    --env=*|-e=*) check_args+=(--env "${pass[$i]#*=}"); env_args=(--env "${pass[$i]#*=}") ;;
    --var=*) check_args+=(--var "${pass[$i]#*=}") ;;
    --var)
      # wrangler takes one or more KEY:VALUE after --var.
      for ((j = i + 1; j < ${#pass[@]}; j++)); do
        [[ "${pass[$j]}" == -* ]] && break
        check_args+=(--var "${pass[$j]}")
      done ;;
  esac
done
command -v cargo >/dev/null || die "cargo not found: install Rust from https://rustup.rs"
log "checking the [vars] of $config"
cargo run --quiet --bin check-config -- "$config" "${check_args[@]}" ||
  die "$config: fix the [vars] above (see the README's Configuration), then run this again"

# The D1 database: wrangler.toml ships with a placeholder id, which no account has.
id=$(sed -n 's/^[[:space:]]*database_id[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$config" | head -1)
if [[ -z "$id" || "$id" =~ ^[0-]+$ ]]; then
  die "$config has no D1 database yet (database_id is ${id:-missing}). Once per account:
    npx wrangler d1 create phone-agent-bridge                    # paste its database_id into $config
    npx wrangler d1 migrations apply DB --remote
    npx wrangler r2 bucket create phone-agent-bridge-recordings
    npx wrangler secret put OPENAI_API_KEY    (and TWILIO_AUTH_TOKEN, ADMIN_TOKEN)
  then run this again."
fi
[[ "$id" =~ ^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$ ]] ||
  die "database_id \"$id\" in $config is not the id 'npx wrangler d1 create' prints (a UUID)"
log "D1 database_id $id"

[[ "$check_only" == 0 ]] || exit 0

bash scripts/setup.sh
# The database's schema before the Worker that writes it: a new Worker writing a column a
# migration adds would have each call's records refused until the migration ran (kept in the
# call objects' storage and retried, but not in D1). Applies only what D1 has not had yet;
# a dry run deploys nothing and applies nothing.
if [[ "$dry_run" == 0 ]]; then
  log "applying D1 migrations not applied yet (migrations/)"
  npx wrangler d1 migrations apply DB --remote -c "$config" "${env_args[@]}"
fi
npx wrangler deploy -c "$config" "${pass[@]}"
