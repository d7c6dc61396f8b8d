#!/usr/bin/env bash
# Runs the README's Python clients (examples/client.py and examples/failover.py, quoted
# verbatim in README.md) against real balancers and workers on loopback, with Python's
# msgpack from .venv.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PY="$ROOT/.venv/bin/python"
BIN="$ROOT/target/debug"
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(scripts/fetch-ort.sh)}"
export RUST_LOG=warn

# The README must show exactly the code tested here.
"$PY" - <<'PY'
import pathlib, sys
readme = pathlib.Path("README.md").read_text()
for name in ("examples/client.py", "examples/failover.py"):
    if pathlib.Path(name).read_text() not in readme:
        sys.exit(f"README.md does not quote {name} verbatim; paste the file into its Python block")
PY

cargo build --quiet -p tidepool-balancer -p tidepool-worker
WORK="$(mktemp -d)"
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
LISTEN=$(free_port); ADMIN=$(free_port); WORKER=$(free_port); TEXT=$(free_port)

"$BIN/tidepool-worker" synth --out "$WORK/model.onnx" --size 64KiB --input-dim 8 --output-dim 4 >/dev/null
"$BIN/tidepool-worker" synth --kind transformer --out "$WORK/text.onnx" --width 32 --layers 2 --vocab 50 >/dev/null
"$BIN/tidepool-balancer" --listen "127.0.0.1:$LISTEN" --admin "127.0.0.1:$ADMIN" \
  --health-interval 200ms --health-timeout 200ms --healthy-threshold 2 2>"$WORK/balancer.log" &
PIDS+=($!)
"$BIN/tidepool-worker" serve --model "$WORK/model.onnx" --listen "127.0.0.1:$WORKER" --name py-worker \
  --register "http://127.0.0.1:$ADMIN" --threads 1 2>"$WORK/worker.log" &
PIDS+=($!)
# A text model with inputs of free length, served directly.
"$BIN/tidepool-worker" serve --model "$WORK/text.onnx" --listen "127.0.0.1:$TEXT" --name text-worker \
  --threads 1 2>"$WORK/text.log" &
PIDS+=($!)

# Waits until the balancer with admin port $1 has a healthy target.
wait_healthy() {
  for _ in $(seq 1 100); do
    if "$PY" -c "import json,sys,urllib.request; sys.exit(0 if any(t['state']=='healthy' for t in json.load(urllib.request.urlopen('http://127.0.0.1:$1/targets'))) else 1)" 2>/dev/null; then
      return
    fi
    sleep 0.1
  done
}
wait_healthy "$ADMIN"

OUT="$("$PY" examples/client.py "127.0.0.1:$LISTEN")" || { cat "$WORK"/*.log; exit 1; }
echo "$OUT"
grep -q '^model model: input f32 \[8\]' <<<"$OUT" || { echo "unexpected metadata"; cat "$WORK"/*.log; exit 1; }
[ "$(grep -c 'output f32 \[4\] from py-worker' <<<"$OUT")" = 3 ] || { echo "unexpected output"; cat "$WORK"/*.log; exit 1; }

# The text worker answers ping once it has loaded and warmed up; the client's metadata
# call is answered `unavailable` before that, so wait for it.
for _ in $(seq 1 100); do
  if "$PY" -c "
import socket,struct,sys,msgpack
s=socket.create_connection(('127.0.0.1',$TEXT)); b=msgpack.packb({'type':'ping','id':1})
s.sendall(struct.pack('>I',len(b))+b); n=struct.unpack('>I',s.recv(4))[0]
sys.exit(0 if msgpack.unpackb(s.recv(n))['type']=='pong' else 1)" 2>/dev/null; then
    break
  fi
  sleep 0.1
done
OUT="$("$PY" examples/client.py "127.0.0.1:$TEXT")" || { cat "$WORK"/*.log; exit 1; }
echo "$OUT"
grep -q "^model text: input_ids i64 \[-1\], attention_mask i64 \[-1\]" <<<"$OUT" || { echo "unexpected metadata"; cat "$WORK"/*.log; exit 1; }
[ "$(grep -c 'embedding f32 \[32\] from text-worker' <<<"$OUT")" = 3 ] || { echo "unexpected output"; cat "$WORK"/*.log; exit 1; }
echo "python client: ok"

# The same client over TLS, with certificates from scripts/make-certs.sh: a balancer with TLS
# on its client listener, in front of a worker that requires the balancer's client certificate.
scripts/make-certs.sh "$WORK/certs" >/dev/null
C="$WORK/certs"
TLS_LISTEN=$(free_port); TLS_ADMIN=$(free_port); TLS_WORKER=$(free_port)
"$BIN/tidepool-worker" serve --model "$WORK/model.onnx" --listen "127.0.0.1:$TLS_WORKER" --name py-tls-worker \
  --tls-cert "$C/worker.pem" --tls-key "$C/worker.key" --tls-client-ca "$C/ca.pem" --threads 1 2>"$WORK/tls-worker.log" &
PIDS+=($!)
"$BIN/tidepool-balancer" --listen "127.0.0.1:$TLS_LISTEN" --admin "127.0.0.1:$TLS_ADMIN" \
  --health-interval 200ms --health-timeout 200ms --healthy-threshold 2 --target "127.0.0.1:$TLS_WORKER" \
  --tls-cert "$C/balancer.pem" --tls-key "$C/balancer.key" \
  --upstream-tls-ca "$C/ca.pem" --upstream-tls-server-name worker \
  --upstream-tls-cert "$C/balancer-client.pem" --upstream-tls-key "$C/balancer-client.key" 2>"$WORK/tls-balancer.log" &
PIDS+=($!)
wait_healthy "$TLS_ADMIN"
OUT="$("$PY" examples/client.py "127.0.0.1:$TLS_LISTEN" "$C/ca.pem")" || { cat "$WORK"/tls-*.log; exit 1; }
echo "$OUT"
[ "$(grep -c 'output f32 \[4\] from py-tls-worker' <<<"$OUT")" = 3 ] || { echo "unexpected output over TLS"; cat "$WORK"/tls-*.log; exit 1; }
echo "python client over TLS: ok"

# Failover between two balancers side by side over the same worker (examples/failover.py):
# balancer A is SIGKILLed mid-run; the client sends A's unanswered requests again to B, and
# every request is answered exactly once, none with an error.
FA=$(free_port); FA_ADMIN=$(free_port); FB=$(free_port); FB_ADMIN=$(free_port)
"$BIN/tidepool-balancer" --listen "127.0.0.1:$FA" --admin "127.0.0.1:$FA_ADMIN" --target "127.0.0.1:$WORKER" \
  --health-interval 200ms --health-timeout 200ms --healthy-threshold 2 2>"$WORK/failover-a.log" &
A_PID=$!
PIDS+=("$A_PID")
"$BIN/tidepool-balancer" --listen "127.0.0.1:$FB" --admin "127.0.0.1:$FB_ADMIN" --target "127.0.0.1:$WORKER" \
  --health-interval 200ms --health-timeout 200ms --healthy-threshold 2 2>"$WORK/failover-b.log" &
PIDS+=($!)
wait_healthy "$FA_ADMIN"
wait_healthy "$FB_ADMIN"
"$PY" examples/failover.py "127.0.0.1:$FA,127.0.0.1:$FB" 10000 8 >"$WORK/failover.out" 2>&1 &
CLIENT=$!
for _ in $(seq 1 400); do
  grep -q '^answered 1000$' "$WORK/failover.out" && break
  sleep 0.05
done
kill -KILL "$A_PID"
wait "$A_PID" 2>/dev/null || true
wait "$CLIENT" || { cat "$WORK/failover.out" "$WORK"/failover-*.log; exit 1; }
tail -1 "$WORK/failover.out"
grep -q '^10000 of 10000 answered, 0 more than once, 0 errors, [1-9][0-9]* re-sent$' "$WORK/failover.out" \
  || { echo "unexpected failover result"; cat "$WORK/failover.out" "$WORK"/failover-*.log; exit 1; }
echo "python client failover: ok"
