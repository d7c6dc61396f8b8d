#!/usr/bin/env bash
# Tests scripts/bench-assemble.sh on fake intros and reports, without running a benchmark:
# a full run, one section rerun alone (the others' reports kept byte for byte, exit 0 without
# their bench-out files), a reassembly after an intro edit, and the refusals.
set -euo pipefail
ASSEMBLE="$(cd "$(dirname "$0")" && pwd)/bench-assemble.sh"
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
cd "$DIR"

fail() { echo "test-bench-assemble: FAIL: $*" >&2; exit 1; }
has() { grep -qF -- "$2" "$1" || fail "$1 lacks: $2"; }
lacks() { ! grep -qF -- "$2" "$1" || fail "$1 still has: $2"; }
# The report between a section's markers.
report() { awk -v s="<!-- bench:$2:start" -v e="<!-- bench:$2:end -->" 'index($0,s)==1{i=1;next} $0==e{i=0;next} i' "$1"; }

mkdir intro out
for name in header last-run worker balancer autoscale resilience; do
    printf '## intro of %s\n\ntext\n' "$name" > "intro/$name.md"
done
write_reports() { # TAG SECTION...
    local tag=$1; shift
    for name in "$@"; do printf 'figures of %s, %s\n\n| a | b |\n' "$name" "$tag" > "out/$name.md"; done
}
# The fake document's sections, whatever the real list is.
export SECTIONS="worker balancer autoscale resilience"
assemble() { INTRO=intro OUT=out SOURCE=BENCHMARKS.md DEST=BENCHMARKS.md "$ASSEMBLE"; }

# 1. A full run writes every section between its markers, and a fresh "Last run" line.
write_reports run1 worker balancer autoscale resilience
FRESH="worker balancer autoscale resilience" STAMP="day1 at commit aaa" assemble
has BENCHMARKS.md "Last run: day1 at commit aaa."
has BENCHMARKS.md "## intro of last-run"
for name in worker balancer autoscale resilience; do
    has BENCHMARKS.md "## intro of $name"
    [[ $(report BENCHMARKS.md "$name") == $(cat "out/$name.md") ]] || fail "$name report after a full run"
done
lacks BENCHMARKS.md "rerun alone"
cp BENCHMARKS.md full.md

# 2. One section alone, the others' reports gone from bench-out: they are kept, exit 0.
rm out/worker.md out/autoscale.md out/resilience.md
write_reports run2 balancer
FRESH="balancer" STAMP="day2 at commit bbb" assemble || fail "a balancer-only run failed"
[[ $(report BENCHMARKS.md worker) == $(report full.md worker) ]] || fail "worker report not kept"
[[ $(report BENCHMARKS.md autoscale) == $(report full.md autoscale) ]] || fail "autoscale report not kept"
[[ $(report BENCHMARKS.md resilience) == $(report full.md resilience) ]] || fail "resilience report not kept"
report BENCHMARKS.md balancer | grep -qF "figures of balancer, run2" || fail "balancer report not replaced"
has BENCHMARKS.md "_This section was rerun alone on day2 at commit bbb"
has BENCHMARKS.md "Last run: day1 at commit aaa."
lacks BENCHMARKS.md "figures of balancer, run1"
[[ $(grep -c '^<!-- bench:.*:start' BENCHMARKS.md) == 4 ]] || fail "not four sections"
# 2b. The resilience section rerun alone (BENCH_ONLY=resilience): the others kept.
write_reports run2 resilience
cp BENCHMARKS.md before-resilience.md
FRESH="resilience" STAMP="day2 at commit bbb" assemble || fail "a resilience-only run failed"
for name in worker balancer autoscale; do
    [[ $(report BENCHMARKS.md "$name") == $(report before-resilience.md "$name") ]] || fail "$name report not kept by a resilience-only run"
done
report BENCHMARKS.md resilience | grep -qF "figures of resilience, run2" || fail "resilience report not replaced"
cp BENCHMARKS.md partial.md

# 3. Reassembling only (an intro edited): every report kept, the new intro in; twice is a no-op.
printf '## intro of worker, edited\n' > intro/worker.md
FRESH="" STAMP="day3 at commit ccc" assemble
has BENCHMARKS.md "## intro of worker, edited"
for name in worker balancer autoscale resilience; do
    [[ $(report BENCHMARKS.md "$name") == $(report partial.md "$name") ]] || fail "$name report changed by a reassembly"
done
cp BENCHMARKS.md once.md
FRESH="" STAMP="day4 at commit ddd" assemble
cmp -s once.md BENCHMARKS.md || fail "reassembling twice changed the document"

# 4. No report anywhere for a section: left out with a warning, still exit 0. The quick mode's
#    layout (another DEST, no notes) keeps the committed reports too.
INTRO=intro OUT=out SOURCE=BENCHMARKS.md DEST=quick.md NOTES=0 FRESH="balancer" STAMP=q "$ASSEMBLE"
lacks quick.md "## intro of last-run"
[[ $(report quick.md worker) == $(report BENCHMARKS.md worker) ]] || fail "quick run lost the worker report"
INTRO=intro OUT=out SOURCE=none.md DEST=lone.md FRESH="balancer" STAMP=l "$ASSEMBLE" 2> warn.txt
has warn.txt "no worker report"
lacks lone.md "## intro of worker"
has lone.md "figures of balancer, run2"

# 5. Refusals leave the document as it was: a fresh section without its report, an unknown one.
cp BENCHMARKS.md before.md
if FRESH="worker" STAMP=x assemble 2> err.txt; then fail "a missing fresh report was accepted"; fi
has err.txt "out/worker.md is missing"
if FRESH="gpu" STAMP=x assemble 2> err.txt; then fail "an unknown section was accepted"; fi
has err.txt "unknown section gpu"
cmp -s before.md BENCHMARKS.md || fail "a refused run changed the document"
[[ -z $(find . -name 'BENCHMARKS.md.*') ]] || fail "a temporary file was left behind"

# 6. A separate section (the soak, which `make bench` does not run): spliced alone, then kept by
#    a full run of the others, which still counts as full (a fresh "Last run" line).
printf '## intro of soak\n\ntext\n' > intro/soak.md
write_reports soak1 soak
SECTIONS="worker balancer autoscale resilience soak" FRESH="soak" STAMP="day5 at commit eee" assemble
report BENCHMARKS.md soak | grep -qF "figures of soak, soak1" || fail "soak report not spliced"
has BENCHMARKS.md "Last run: day1 at commit aaa."
rm out/soak.md
write_reports run6 worker balancer autoscale resilience
SECTIONS="worker balancer autoscale resilience soak" FRESH="worker balancer autoscale resilience" STAMP="day6 at commit fff" assemble
has BENCHMARKS.md "Last run: day6 at commit fff."
report BENCHMARKS.md soak | grep -qF "figures of soak, soak1" || fail "soak report lost by a full run"
lacks BENCHMARKS.md "_This section was rerun alone on day6"

echo "test-bench-assemble: all passed"
