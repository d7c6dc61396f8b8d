#!/usr/bin/env bash
# Assembles BENCHMARKS.md: the hand-written intros (bench/intro/*.md) around one report per
# section (worker, text, balancer, autoscale, resilience, failover, soak). Sections run now take their report from the
# benchmark's output ($OUT/NAME.md); every other section keeps the report already in $SOURCE,
# found between its markers:
#   <!-- bench:NAME:start ... -->
#   ...report...
#   <!-- bench:NAME:end -->
# so that rerunning one section (BENCH_ONLY=balancer make bench) keeps the committed figures
# of the others. A section with no report in either place is left out, with a warning.
#
# scripts/bench.sh calls it; scripts/test-bench-assemble.sh runs it on fake sections.
# Settings (environment):
#   SECTIONS the sections in document order ("worker text balancer autoscale slo resilience failover soak"); the tests
#           set their own
#   SEPARATE the sections that `make bench` does not run ("soak": `make soak` runs it and
#           splices its report alone); a full run is one where all the others are fresh
#   FRESH   the sections run now, space-separated (all of SECTIONS for a full run,
#           "" to only reassemble after editing an intro)
#   OUT     where fresh reports are (bench-out)
#   INTRO   the intros (bench/intro)
#   SOURCE  the document whose reports are kept (BENCHMARKS.md)
#   DEST    the document to write (BENCHMARKS.md); may be SOURCE
#   STAMP   when and where this run happened ("2026-11-29 at commit abc1234")
#   NOTES   1: include $INTRO/last-run.md (the hand-written notes on the committed run)
set -euo pipefail

read -r -a SECTIONS <<< "${SECTIONS:-worker text balancer autoscale slo resilience failover soak}"
SEPARATE=${SEPARATE-soak}
FRESH=${FRESH-}
OUT=${OUT:-bench-out}
INTRO=${INTRO:-bench/intro}
SOURCE=${SOURCE:-BENCHMARKS.md}
DEST=${DEST:-BENCHMARKS.md}
STAMP=${STAMP:?STAMP must say when and at which commit the benchmarks ran}
NOTES=${NOTES:-1}

is_fresh() { [[ " $FRESH " == *" $1 "* ]]; }
is_separate() { [[ " $SEPARATE " == *" $1 "* ]]; }

for name in $FRESH; do
    [[ " ${SECTIONS[*]} " == *" $name "* ]] || { echo "bench-assemble: unknown section $name in FRESH (known: ${SECTIONS[*]})" >&2; exit 2; }
    [[ -f $OUT/$name.md ]] || { echo "bench-assemble: $OUT/$name.md is missing: the $name benchmark did not write its report" >&2; exit 1; }
done

# The report between a section's markers in $SOURCE (nothing when there is none).
kept_report() {
    [[ -f $SOURCE ]] || return 0
    awk -v start="<!-- bench:$1:start" -v end="<!-- bench:$1:end -->" '
        index($0, start) == 1 { inside = 1; next }
        $0 == end { inside = 0; next }
        inside { print }
    ' "$SOURCE"
}

full=1
for name in "${SECTIONS[@]}"; do is_separate "$name" || is_fresh "$name" || full=0; done

# The "Last run" line: this run's for a full run, else the one already there (which says when
# the kept sections ran); a section rerun alone says so at its top.
last_run="Last run: $STAMP."
if [[ $full == 0 && -f $SOURCE ]]; then
    kept=$(grep -m1 '^Last run' "$SOURCE" || true)
    [[ -n $kept ]] && last_run=$kept
fi

tmp=$(mktemp "${DEST}.XXXXXX")
trap 'rm -f "$tmp"' EXIT
{
    cat "$INTRO/header.md"
    echo
    echo "$last_run"
    echo
    if [[ $NOTES == 1 && -f $INTRO/last-run.md ]]; then cat "$INTRO/last-run.md"; echo; fi
    sep=""
    for name in "${SECTIONS[@]}"; do
        if is_fresh "$name"; then
            report=$(cat "$OUT/$name.md")
            if [[ $full == 0 ]]; then
                report="_This section was rerun alone on $STAMP; the others are from the runs named above._

$report"
            fi
        else
            report=$(kept_report "$name")
        fi
        if [[ -z $report ]]; then
            echo "bench-assemble: no $name report (not run now, none in $SOURCE): section left out; run BENCH_ONLY=$name make bench" >&2
            continue
        fi
        printf '%s' "$sep"
        sep=$'\n'
        cat "$INTRO/$name.md"
        echo
        echo "<!-- bench:$name:start (scripts/bench.sh replaces this report when the $name benchmark runs; edit $INTRO/$name.md for the text above) -->"
        printf '%s\n' "$report"
        echo "<!-- bench:$name:end -->"
    done
} > "$tmp"
mv "$tmp" "$DEST"
trap - EXIT
