#!/usr/bin/env bash
# Builds the protocol's fuzz targets and runs each for its share of a few seconds:
# - decode: the frame decoder, fed arbitrary bytes in two reads;
# - raw: the raw scanner and splicer, against the full decoder as the reference.
# Usage: scripts/fuzz.sh [SECONDS] (20 by default, split evenly between the targets).
# cargo-fuzz needs nightly features: the nightly toolchain when installed, else the stable
# one with RUSTC_BOOTSTRAP (no sanitizer then: libFuzzer's coverage guidance still works).
set -euo pipefail
SECONDS_TO_RUN="${1:-20}"
TARGETS=(decode raw)
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT/fuzz"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz from crates.io" >&2
  cargo install cargo-fuzz --locked --quiet
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  FUZZ=(cargo +nightly fuzz)
  SAN=()
else
  export RUSTC_BOOTSTRAP=1
  FUZZ=(cargo fuzz)
  SAN=(--sanitizer none)
fi
for target in "${TARGETS[@]}"; do
  "${FUZZ[@]}" build "${SAN[@]}" "$target"
done

# Seed the corpora with the interop fixtures: real frames, so mutations start from valid ones.
# decode takes a cut byte, then the frame; raw takes its rewrite header (a new id, both
# rewrites on, a deadline, a 3-byte client), then the body without its length prefix.
RAW_HEADER='\x2a\x00\x00\x00\x00\x00\x00\x00\x03\x64\x00\x00\x00\x00\x00\x00\x00\x03a:1'
mkdir -p corpus/decode corpus/raw
for f in "$ROOT"/protocol/tests/interop/fixtures/*.bin; do
  { printf '\xff'; cat "$f"; } > "corpus/decode/$(basename "$f")"
  { printf "$RAW_HEADER"; tail -c +5 "$f"; } > "corpus/raw/$(basename "$f")"
done

# Split the time evenly, at least a second each.
EACH=$(( SECONDS_TO_RUN / ${#TARGETS[@]} ))
(( EACH >= 1 )) || EACH=1
for target in "${TARGETS[@]}"; do
  echo "fuzz: $target for ${EACH}s" >&2
  "${FUZZ[@]}" run "${SAN[@]}" "$target" "corpus/$target" -- -max_total_time="$EACH" -rss_limit_mb=2048
done
