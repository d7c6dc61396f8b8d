#!/usr/bin/env bash
# Instructions per item of tidepool-worker serving a fast model, split by thread: the async
# runtime (reading, checking, forming batches, splitting, answering), the model thread and
# ONNX Runtime's pool. Instruction counts hardly move with the load of a shared machine;
# items/s and CPU seconds do.
#
#   scripts/profile-worker.sh [WORKER_BIN...]     (default: target/release/tidepool-worker)
#
# For each binary: `tidepool-worker serve` under `valgrind --tool=callgrind
# --separate-threads=yes`, bench-drive sending 200 items per connection to warm it up, the
# counters zeroed (callgrind_control -z), FRAMES items per connection on CONNS connections
# with WINDOW in flight (so batches fill to MAX_BATCH), the counters dumped (callgrind_control
# -d). Each thread's dump is named by what it ran (the model thread calls `run_batch`, the
# runtime the connections of `tidepool_worker::server`, ONNX Runtime's pool the rest of
# onnxruntime) and its
# instructions divided by the items; the runtime's top functions by their own instructions
# per item go to bench-out/profile/worker.*.top.txt (scripts/callgrind-self.py).
# WORKER_ARGS (default empty) is appended to every worker's `serve` command line, to profile
# a configuration other than the defaults, e.g.
#   MAX_BATCH=64 WINDOW=48 WORKER_ARGS='--instances 2 --threads 2' scripts/profile-worker.sh
# (two model threads, each its own session with one intra-op thread: no pool; both model
# threads count as `model`). The model threads' top functions go to worker.*.model-top.txt.
# Needs the release build of tidepool-worker and bench-drive, valgrind, and the model
# (MODEL, default build/models/synth-8mib.onnx: synth --size 8MiB --input-dim 1024
# --output-dim 10 --layers 3); ORT_DYLIB_PATH set.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-build/models/synth-8mib.onnx}
ITEM_LEN=${ITEM_LEN:-1024}     # f32 elements per item: the model's input width
FRAMES=${FRAMES:-200}          # per connection, counted
CONNS=${CONNS:-4}
WINDOW=${WINDOW:-16}
MAX_BATCH=${MAX_BATCH:-16}
read -r -a EXTRA <<<"${WORKER_ARGS:-}"
OUT=${OUT:-bench-out/profile}   # where dumps and top lists go (one per concurrent run)
mkdir -p "$OUT"
BIN=target/release
WORKERS=("$@")
[[ ${#WORKERS[@]} == 0 ]] && WORKERS=("$BIN/tidepool-worker")
: "${ORT_DYLIB_PATH:?set ORT_DYLIB_PATH to libonnxruntime.so}"

WPID=
cleanup() { [[ -n $WPID ]] && kill "$WPID" 2>/dev/null || true; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

drive() {
    "$BIN/bench-drive" --addr "$LISTEN" --connections "$CONNS" --window "$WINDOW" \
        --item-len "$ITEM_LEN" --frames "$1" --limit 30m
}

# role FILE: what the thread of a per-thread dump ran.
role() {
    if grep -q 'run_batch' "$1"; then echo model
    elif grep -q 'tidepool_worker::server' "$1"; then echo runtime
    elif grep -q 'onnxruntime' "$1"; then echo pool
    else echo other
    fi
}

printf 'worker args: %s; --max-batch %s, %s connections x %s in flight, %s items counted\n\n' \
    "${WORKER_ARGS:-(defaults)}" "$MAX_BATCH" "$CONNS" "$WINDOW" "$((FRAMES * CONNS))"
printf '| worker | items | runtime instr/item | model thread instr/item | ONNX Runtime pool instr/item | other instr/item |\n'
printf '| --- | --- | --- | --- | --- | --- |\n'
for bin in "${WORKERS[@]}"; do
    label=$(echo "$bin" | tr / _)
    cgout="$OUT/worker.$label"
    rm -f "$cgout".*
    LISTEN=127.0.0.1:$(free_port)
    RUST_LOG=warn valgrind --tool=callgrind --separate-threads=yes \
        --callgrind-out-file="$cgout.%p" "$bin" serve --model "$MODEL" --listen "$LISTEN" \
        --max-batch "$MAX_BATCH" ${EXTRA[@]+"${EXTRA[@]}"} >"$OUT/worker.log" 2>&1 &
    WPID=$!
    # Loading and warming up under valgrind takes minutes, answered `unavailable` meanwhile:
    # a drive of one frame per connection with no error says the worker serves.
    for i in $(seq 600); do
        drive 1 2>/dev/null | grep -q ' errors 0 ' && break
        [[ $i == 600 ]] && { echo "profile: $bin never served" >&2; exit 1; }
        sleep 1
    done
    drive 200 >/dev/null
    callgrind_control -z "$WPID" >/dev/null
    drive "$FRAMES" >"$OUT/drive.txt"
    callgrind_control -d "$WPID" >/dev/null
    kill -TERM "$WPID"; wait "$WPID" 2>/dev/null || true
    WPID=
    items=$((FRAMES * CONNS))
    declare -A ir=([runtime]=0 [model]=0 [pool]=0 [other]=0)
    for dump in "$cgout".*.1-*; do
        [[ -e $dump ]] || continue
        r=$(role "$dump")
        n=$(awk '/^summary:/ {print $2}' "$dump")
        ir[$r]=$((ir[$r] + ${n:-0}))
        if [[ $r == runtime ]]; then
            scripts/callgrind-self.py "$dump" "$items" 60 >>"$cgout.top.txt"
        elif [[ $r == model ]]; then
            scripts/callgrind-self.py "$dump" "$items" 40 >>"$cgout.model-top.txt"
        fi
    done
    per() { python3 -c "print(round($1 / $items))"; }
    printf '| %s | %s | %s | %s | %s | %s |\n' "$bin" "$items" "$(per "${ir[runtime]}")" \
        "$(per "${ir[model]}")" "$(per "${ir[pool]}")" "$(per "${ir[other]}")"
    unset ir
done
