#!/usr/bin/env bash
# `make demo`: a balancer on loopback that autoscales self-registering workers (1 to 3),
# a compressed day of uneven load through it, live progress, the report, a timeline plot
# whose workers strip follows the day. Every process started here is stopped on exit,
# Ctrl-C included (the balancer stops the workers it started, each draining first).
#
#   SIZE=64MiB (default) or SIZE=1GiB for the seed's 1 GB model
#   RATE=peak items/s (default: 1.6 times one worker's capacity, measured at start, so the
#   peak needs about three workers at 70% busy), DURATION=2m, MAX_WORKERS=3,
#   TARGET_LOAD=32 (the in-flight guard: outstanding requests per worker)
# Workers run one thread each, so on a 2-core machine a second worker really adds capacity.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
SIZE="${SIZE:-64MiB}"
DURATION="${DURATION:-2m}"
MAX_WORKERS="${MAX_WORKERS:-3}"
TARGET_LOAD="${TARGET_LOAD:-32}"
LISTEN_PORT="${LISTEN_PORT:-7000}"
ADMIN_PORT="${ADMIN_PORT:-9000}"
OUT="$ROOT/demo-out"
BIN="$ROOT/target/release"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(scripts/fetch-ort.sh)}"
export RUST_LOG="${RUST_LOG:-warn}"
mkdir -p "$OUT" "$ROOT/build/models"

case "$SIZE" in
  1GiB|1024MiB) INPUT_DIM=8192; OUTPUT_DIM=8192; LAYERS=4 ;;
  *)            INPUT_DIM=256; OUTPUT_DIM=16; LAYERS=4 ;;
esac

echo "== building release binaries"
cargo build --release --quiet -p tidepool-balancer -p tidepool-worker -p tidepool-load

MODEL="$ROOT/build/models/demo-$SIZE-$INPUT_DIM.onnx"
if [ ! -f "$MODEL" ]; then
  echo "== synthesising a $SIZE model into $MODEL"
  "$BIN/tidepool-worker" synth --out "$MODEL" --size "$SIZE" --input-dim "$INPUT_DIM" \
    --output-dim "$OUTPUT_DIM" --layers "$LAYERS" --seed 1
fi

PIDS=()
cleanup() {
  trap - EXIT INT TERM
  if [ "${#PIDS[@]}" -gt 0 ]; then
    echo "== stopping ${#PIDS[@]} processes (SIGTERM: they drain, then exit)"
    kill -TERM "${PIDS[@]}" 2>/dev/null || true
    wait "${PIDS[@]}" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

admin() { python3 -c "import sys,urllib.request;print(urllib.request.urlopen(sys.argv[1],timeout=2).read().decode())" "http://127.0.0.1:$ADMIN_PORT$1"; }
# One number field of GET /scaling (0 while the balancer does not answer).
scaling() { admin /scaling 2>/dev/null | python3 -c "import json,sys;print(json.load(sys.stdin)[sys.argv[1]])" "$1" 2>/dev/null || echo 0; }

echo "== starting the balancer on 127.0.0.1:$LISTEN_PORT (admin http://127.0.0.1:$ADMIN_PORT), autoscaling 1..$MAX_WORKERS workers"
# The balancer starts the workers itself (--worker-cmd), each on a port it picks, and each
# worker registers itself with the balancer once its model is loaded and warmed up.
WORKER_CMD="$BIN/tidepool-worker serve --model $MODEL --listen 127.0.0.1:{port} --name worker-{index} \
  --register http://{admin} --threads 1 --max-batch 32 --max-delay 5ms --drain-timeout 10s"
RUST_LOG=info "$BIN/tidepool-balancer" --listen "127.0.0.1:$LISTEN_PORT" --admin "127.0.0.1:$ADMIN_PORT" \
  --health-interval 1s --health-timeout 1s --healthy-threshold 2 --unhealthy-threshold 2 \
  --deregistration-delay 10s \
  --autoscale --worker-cmd "$WORKER_CMD" --min-workers 1 --max-workers "$MAX_WORKERS" \
  --target-load "$TARGET_LOAD" --scaling-window 10s --panic-window 2s --scale-in-delay 10s \
  --worker-startup 3s \
  2> "$OUT/balancer.log" &
PIDS+=($!)

echo "== waiting for the first worker"
for _ in $(seq 1 240); do
  [ "$(scaling ready)" -ge 1 ] && break
  sleep 0.5
done
admin /targets

if [ -z "${RATE:-}" ]; then
  # One worker's capacity on this machine: a constant overload for 8 s, its answers per
  # second. The day's peak is 1.6 times that: ceil(1.6 / 0.7) = 3 workers at the top.
  # Straight at the worker, not through the balancer: the autoscaler will start others
  # meanwhile (that overload is a surge), and they must not count.
  echo "== measuring one worker's capacity"
  FIRST=$(admin /targets | python3 -c "import json,sys;print(json.load(sys.stdin)[0]['addr'])")
  "$BIN/tidepool-load" --target "$FIRST" --profile constant --rate 20000 \
    --duration 8s --model "$MODEL" --deadline 5s --quiet --json "$OUT/capacity.json" >/dev/null 2>&1 || true
  CAPACITY=$(python3 -c "import json,sys;print(int(json.load(open(sys.argv[1]))['throughput']))" "$OUT/capacity.json" 2>/dev/null || echo 0)
  [ "$CAPACITY" -gt 0 ] || CAPACITY=500
  RATE=$(( CAPACITY * 16 / 10 ))
  echo "   one worker: about $CAPACITY items/s; the day's peak: $RATE items/s"
  echo "   waiting for the pool to settle back to one worker"
  for _ in $(seq 1 120); do
    [ "$(scaling current)" -le 1 ] && break
    sleep 1
  done
fi

echo "== driving a day-shaped load: peak $RATE items/s over $DURATION"
"$BIN/tidepool-load" --target "127.0.0.1:$LISTEN_PORT" --profile day --rate "$RATE" \
  --duration "$DURATION" --model "$MODEL" --deadline 5s \
  --json "$OUT/report.json" --timeline "$OUT/timeline.csv"

echo "== the balancer's view at the end"
admin /targets
admin /scaling
grep -E 'autoscaling|worker ready|scale-in' "$OUT/balancer.log" | sed 's/\x1b\[[0-9;]*m//g' | cut -c12-200 || true
admin /metrics | grep -E '^tidepool_(routed|rejected)|healthy_host_count|new_flow_count' || true
echo "== report: $OUT/report.json, timeline: $OUT/timeline.csv and $OUT/timeline.svg, logs: $OUT/*.log"
