#!/usr/bin/env bash
# make bench: build in release mode, run the worker, balancer and autoscaling benchmarks, and
# assemble BENCHMARKS.md from their reports (bench-out/*.md) and the hand-written intros
# (bench/intro/*.md). BENCH_QUICK=1: a short smoke run on a small model; BENCHMARKS.md is then
# written to bench-out/BENCHMARKS.quick.md instead, so the committed figures stay real.
# BENCH_ONLY=worker|text|balancer|autoscale|resilience|failover|slo: rerun one benchmark and splice its report into
# BENCHMARKS.md, keeping the committed reports of the others; BENCH_ONLY=soak (`make soak`)
# runs the soak, which a full run leaves out, the same way; BENCH_ONLY=none only reassembles
# (after editing an intro). scripts/bench-assemble.sh does the assembly.
# BENCH_BASELINE=<commit>: the balancer benchmark also runs tidepool-balancer built from that
# commit (in a scratch worktree under build/), beside today's, for before/after figures.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO=${CARGO:-cargo}
OUT=bench-out
QUICK=${BENCH_QUICK:-0}
[[ "$QUICK" == 0 || "$QUICK" == false ]] && QUICK=0 || QUICK=1
export BENCH_QUICK=$QUICK
mkdir -p "$OUT" build/models

ONLY=${BENCH_ONLY:-all}
case $ONLY in all|worker|text|balancer|autoscale|resilience|failover|slo|soak|none) ;; *) echo "bench: BENCH_ONLY must be worker, text, balancer, autoscale, resilience, failover, slo, soak or none" >&2; exit 2 ;; esac
# Whether this run includes section $1 (the soak runs only when asked for: `make soak`).
runs() { [[ $ONLY == "$1" || ( $ONLY == all && $1 != soak ) ]]; }
# Nothing to build or run when only reassembling.
if [[ $ONLY != none ]]; then
    ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(scripts/fetch-ort.sh)}
    export ORT_DYLIB_PATH

    if runs balancer && ! command -v haproxy >/dev/null; then
        echo "bench: installing haproxy (Debian package) for the balancer comparison" >&2
        SUDO=""; [[ $(id -u) != 0 ]] && SUDO="sudo"
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq haproxy >/dev/null
    fi

    echo "bench: building (release)" >&2
    if [[ $ONLY == resilience || $ONLY == failover ]]; then
        # Alone, these benchmarks need the balancer and two of the bench binaries.
        $CARGO build --release -p tidepool-balancer -p tidepool-bench --bin tidepool-balancer \
            --bin bench-target --bin "bench-$ONLY"
    else
        $CARGO build --release -p tidepool-worker -p tidepool-balancer -p tidepool-bench --bins
    fi

    if [[ $QUICK == 1 ]]; then
        SIZE=64MiB; MODEL=build/models/synth-64mib.onnx
    else
        SIZE=1GiB; MODEL=build/models/synth-1gib.onnx
    fi
    if { runs worker || runs autoscale || runs slo; } && [[ ! -f $MODEL || ! -f $MODEL.data ]]; then
        echo "bench: writing the synthetic $SIZE model to $MODEL (about 20 s and 3.4 GB of memory for 1GiB)" >&2
        target/release/tidepool-worker synth --out "$MODEL" --size "$SIZE"
    fi

    # Serving to deadlines (issue 15) also runs the 64 MiB model (a quick run's only model).
    SLO_SMALL=build/models/synth-64mib.onnx
    if runs slo && [[ ! -f $SLO_SMALL || ! -f $SLO_SMALL.data ]]; then
        echo "bench: writing the synthetic 64MiB model to $SLO_SMALL" >&2
        target/release/tidepool-worker synth --out "$SLO_SMALL" --size 64MiB
    fi

    # The worker benchmark's fast model (issue 16): 8 MiB, fast enough that the worker's own
    # cost per item, not the model, sets the pace.
    FAST_MODEL=build/models/synth-8mib.onnx
    if runs worker && [[ ! -f $FAST_MODEL ]]; then
        echo "bench: writing the 8MiB fast model to $FAST_MODEL" >&2
        target/release/tidepool-worker synth --out "$FAST_MODEL" --size 8MiB --input-dim 1024 \
            --output-dim 10 --layers 3
    fi

    # The autoscaling benchmark serves the same 64 MiB model as `make demo` (input f32x256), small
    # enough that a worker starts in well under a second and the pool's size, not the model, is
    # what is measured.
    POOL_MODEL=build/models/demo-64MiB-256.onnx
    if runs autoscale && [[ ! -f $POOL_MODEL || ! -f $POOL_MODEL.data ]]; then
        echo "bench: writing the 64MiB pool model to $POOL_MODEL" >&2
        target/release/tidepool-worker synth --out "$POOL_MODEL" --size 64MiB --input-dim 256 \
            --output-dim 16 --layers 4 --seed 1
    fi
fi

if runs worker; then
    echo "bench: worker" >&2
    RUST_LOG=${RUST_LOG:-warn} target/release/bench-worker --model "$MODEL" --fast-model "$FAST_MODEL" \
        --out "$OUT" >/dev/null
fi
if runs text; then
    # The transformer-shaped encoder (issue 13): sentences of mixed lengths against one fixed
    # length, and batching against none. bench-text writes the model when it is missing.
    echo "bench: text" >&2
    # Quick runs take bench-text's small default shape; full runs BERT-small's (4 layers x 512,
    # BERT's vocabulary). BERT-base (12 x 768) runs one batch of 32 at 68 tokens in about 15 s
    # on this 2-core machine: too few batches in a run to measure batching.
    if [[ $QUICK == 1 ]]; then
        TEXT_ARGS=(--model build/models/transformer-4x256.onnx)
    else
        TEXT_ARGS=(--model build/models/transformer-4x512.onnx --width 512 --layers 4 --vocab 30522 --max-batch 16)
    fi
    RUST_LOG=${RUST_LOG:-warn} target/release/bench-text "${TEXT_ARGS[@]}" --out "$OUT" >/dev/null
fi
if runs balancer; then
    echo "bench: balancer" >&2
    if [[ -n ${BENCH_BASELINE:-} ]]; then
        BASE_DIR=build/baseline
        BASE_REV=$(git rev-parse --short "$BENCH_BASELINE")
        echo "bench: building the baseline balancer at $BASE_REV" >&2
        # A baseline worktree already at that commit is kept with its build (a release
        # build of the dependencies takes long on a small machine); any other is replaced.
        if [[ $(git -C "$BASE_DIR" rev-parse --short HEAD 2>/dev/null) != "$BASE_REV" ]] \
            || [[ -n $(git -C "$BASE_DIR" status --porcelain 2>/dev/null) ]]; then
            git worktree remove --force "$BASE_DIR" 2>/dev/null || rm -rf "$BASE_DIR"
            git worktree add --detach --quiet "$BASE_DIR" "$BASE_REV"
        fi
        # The baseline's own target dir: sharing ours would rebuild both every time.
        (cd "$BASE_DIR" && $CARGO build --release --quiet -p tidepool-balancer --bins)
        export BENCH_BASELINE_BIN=$PWD/$BASE_DIR/target/release/tidepool-balancer
        export BENCH_BASELINE_LABEL="commit $BASE_REV"
    fi
    RUST_LOG=${RUST_LOG:-warn} target/release/bench-balancer --out "$OUT" >/dev/null
fi
if runs autoscale; then
    # About 8 minutes: a step up, then a 3-minute day against each pool, then single starts
    # (the 1 GiB one reuses the worker benchmark's model).
    echo "bench: autoscale" >&2
    target/release/bench-autoscale --model "$POOL_MODEL" --big-model build/models/synth-1gib.onnx \
        --out "$OUT" >/dev/null
fi

if runs slo; then
    # About 7 minutes a model: capacity, then fixed and adaptive batching at 50% to 150% of it
    # with deadlines (a third tight, the rest loose), and adaptive again with two model
    # instances, single-thread ONNX Runtime sessions side by side (--compare-instances 2;
    # issue 15; --compare-nice N is there too). A quick run: the 64 MiB model, short steps.
    echo "bench: slo" >&2
    SLO_MODELS=(--model "$SLO_SMALL")
    [[ $QUICK == 1 ]] || SLO_MODELS=(--model "$MODEL" --model "$SLO_SMALL")
    RUST_LOG=${RUST_LOG:-warn} target/release/bench-slo "${SLO_MODELS[@]}" --compare-instances 2 \
        --out "$OUT" >/dev/null
fi

if runs resilience; then
    # About 3 minutes: a target SIGKILLed with retries on and off, then hedging on the skewed pool.
    echo "bench: resilience" >&2
    RUST_LOG=${RUST_LOG:-warn} target/release/bench-resilience --out "$OUT" >/dev/null
fi
if runs failover; then
    # About 2 minutes: the skewed pool through one balancer and through two, alternating.
    echo "bench: failover" >&2
    RUST_LOG=${RUST_LOG:-warn} target/release/bench-failover --out "$OUT" >/dev/null
fi
if runs soak; then
    # Not part of a full run: SOAK_MINUTES (30) at 70% of capacity with a fault every
    # SOAK_FAULT_EVERY, on a small model so that the faults, not the model, are what is tested.
    SOAK_MODEL=build/models/soak-4MiB-64.onnx
    [[ -f $SOAK_MODEL ]] || target/release/tidepool-worker synth --out "$SOAK_MODEL" \
        --size 4MiB --input-dim 64 --output-dim 16 --layers 2 --seed 1
    echo "bench: soak, ${SOAK_MINUTES:-30} minutes" >&2
    target/release/bench-soak --model "$SOAK_MODEL" --minutes "${SOAK_MINUTES:-30}" --out "$OUT"
fi

# Assemble: the sections run now from $OUT, the others' reports kept from the committed
# BENCHMARKS.md (scripts/bench-assemble.sh says how).
case $ONLY in all) FRESH="worker text balancer autoscale slo resilience failover" ;; none) FRESH="" ;; *) FRESH=$ONLY ;; esac
DEST=BENCHMARKS.md
[[ $QUICK == 1 ]] && DEST=$OUT/BENCHMARKS.quick.md
DIRTY=""
[[ -n $(git status --porcelain -- balancer worker protocol 2>/dev/null) ]] && DIRTY=" (with uncommitted changes in balancer/, worker/ or protocol/)"
FRESH=$FRESH OUT=$OUT INTRO=bench/intro SOURCE=BENCHMARKS.md DEST=$DEST NOTES=$((1 - QUICK)) \
    STAMP="$(date -u +%Y-%m-%d) at commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$DIRTY" \
    scripts/bench-assemble.sh
echo "bench: wrote $DEST (reports and JSON in $OUT/)" >&2
