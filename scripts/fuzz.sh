#!/usr/bin/env bash
# Fuzzes the core (fuzz/, cargo-fuzz layout): replays the committed corpora, then runs each
# fuzz target for its share of SECONDS (default 60) from its committed corpus.
#
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]     targets: call_machine frames webhook
#
# call_machine gets half the time, the others share the rest. New inputs a run finds go to
# a scratch directory, never into fuzz/corpus/ (to grow the committed corpus, merge by hand:
# see fuzz/README.md). A crash or a broken invariant fails the script and leaves the input
# in fuzz/artifacts/TARGET/.
#
# Installs what it needs when missing: cargo-fuzz (pinned) and a C++ compiler for libFuzzer.
# The toolchain is stable; cargo-fuzz's nightly-only flags are allowed by RUSTC_BOOTSTRAP=1.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CARGO_FUZZ_VERSION=0.13.2
seconds="${1:-60}"
[[ "$seconds" =~ ^[0-9]+$ && "$seconds" -ge 3 ]] || die "usage: scripts/fuzz.sh [SECONDS>=3] [TARGET...]"
shift $(($# > 0 ? 1 : 0))
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(call_machine frames webhook)

# libFuzzer (built by libfuzzer-sys) is C++.
if ! command -v c++ >/dev/null && ! command -v g++ >/dev/null && ! command -v clang++ >/dev/null; then
  log "no C++ compiler: installing g++ for libFuzzer"
  apt_install g++
fi

# `cargo fuzz --version` prints "cargo-fuzz 0.13.2".
if [[ "$(cargo fuzz --version 2>/dev/null | awk '{print $NF}')" != "$CARGO_FUZZ_VERSION" ]]; then
  log "installing cargo-fuzz $CARGO_FUZZ_VERSION (a minute, once)"
  cargo_install_pinned cargo-fuzz "$CARGO_FUZZ_VERSION"
fi

export RUSTC_BOOTSTRAP=1
# Release code with debug assertions and overflow checks (cargo-fuzz's default), no
# sanitizer (safe Rust: ASan would only slow it down) and no compare tracing (the inputs
# are structured, and it triples the cost of an execution).
build_flags=(--sanitizer none --no-trace-compares)

cd fuzz

log "fuzz: replaying the committed corpora and seeds (cargo test in fuzz/)"
cargo test --release --quiet --test corpus --test scenario

log "fuzz: building ${targets[*]}"
for t in "${targets[@]}"; do
  cargo fuzz build "${build_flags[@]}" "$t"
done

share() {
  local t="$1" n=${#targets[@]}
  if [[ $n -eq 1 ]]; then echo "$seconds"
  elif [[ "$t" == call_machine && " ${targets[*]} " == *" call_machine "* ]]; then echo $((seconds / 2))
  elif [[ " ${targets[*]} " == *" call_machine "* ]]; then echo $(((seconds - seconds / 2) / (n - 1)))
  else echo $((seconds / n))
  fi
}

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
  s="$(share "$t")"
  mkdir -p "corpus/$t" "artifacts/$t" "$scratch/$t"
  log "fuzz: $t for ${s}s from fuzz/corpus/$t"
  # -timeout: any one input taking over 10 s is a hang; -rss_limit_mb: a leak or a runaway
  # buffer. libFuzzer writes new inputs to the first directory only (the scratch one).
  cargo fuzz run "${build_flags[@]}" "$t" "$scratch/$t" "corpus/$t" -- \
    -max_total_time="$s" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="artifacts/$t/" 2>"$scratch/$t.log" ||
    {
      grep -E "panicked|invariant violated|ERROR|SUMMARY" -A3 "$scratch/$t.log" | cut -c1-2000 | head -40 >&2
      die "fuzz target $t failed: the input is in fuzz/artifacts/$t/ (cargo fuzz fmt $t FILE shows it)"
    }
  grep -E "^Done|stat::number_of_executed_units|exec/s" "$scratch/$t.log" | tail -2 >&2
done
log "fuzz: no failures"
