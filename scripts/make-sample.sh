#!/usr/bin/env bash
# Generates the Japanese caller sample for the call simulator, samples/caller-ja.wav, with the
# espeak-ng speech synthesizer (Debian package `espeak-ng`, installed here when missing).
#   bash scripts/make-sample.sh [--force] [TEXT]
# Without --force an existing sample is kept. espeak-ng's Japanese voice reads kana only
# (kanji come out as "Chinese letter"), so the text is written in hiragana:
# 「もしもし、予約をお願いしたいのですが。」
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

force=0
if [[ "${1:-}" == --force ]]; then force=1; shift; fi
text="${1:-もしもし、よやくをおねがいしたいのですが。}"
out=samples/caller-ja.wav

if [[ -f "$out" && "$force" == 0 ]]; then
  log "$out exists (use --force to regenerate)"
  exit 0
fi

command -v espeak-ng >/dev/null || apt_install espeak-ng

mkdir -p samples
# Japanese voice, 160 words per minute; espeak-ng writes 22050 Hz 16-bit mono, which the
# simulator resamples to 8 kHz like any other WAV.
espeak-ng -v ja -s 160 -w "$out.tmp" "$text"
mv "$out.tmp" "$out"
log "wrote $out ($(wc -c <"$out") bytes): $text"
