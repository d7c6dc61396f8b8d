#!/usr/bin/env bash
# Builds the protocol decoder's fuzz target and runs it for a few seconds.
# cargo-fuzz needs nightly features: the nightly toolchain when installed, else the stable
# one with RUSTC_BOOTSTRAP (no sanitizer then: libFuzzer's coverage guidance still works).
set -euo pipefail
SECONDS_TO_RUN="${1:-20}"
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
"${FUZZ[@]}" build "${SAN[@]}" decode
mkdir -p corpus/decode
# Seed the corpus with the interop fixtures: real frames, so mutations start from valid ones.
for f in "$ROOT"/protocol/tests/interop/fixtures/*.bin; do
  { printf '\xff'; cat "$f"; } > "corpus/decode/$(basename "$f")"
done
"${FUZZ[@]}" run "${SAN[@]}" decode corpus/decode -- -max_total_time="$SECONDS_TO_RUN" -rss_limit_mb=2048
