#!/usr/bin/env bash
# Instructions and syscalls per frame of tidepool-balancer on a fixed workload, for one or more
# balancer binaries side by side (say, this tree's and one built from an earlier commit).
# Instruction and syscall counts hardly move with the load of a shared machine; frames/s do.
#
#   scripts/profile-balancer.sh [BALANCER_BIN...]     (default: target/release/tidepool-balancer)
#
# For each binary: three echo targets (bench-target), the balancer in front of them, and
# bench-drive sending FRAMES small frames on each of CONNS connections with WINDOW in flight:
#   1. natively, under `perf stat -e raw_syscalls:sys_enter,...` (tracepoints work where
#      hardware counters do not): syscalls per frame by kind, and CPU per 1000 frames (/proc);
#   2. under `valgrind --tool=callgrind` (skipped with CALLGRIND=0): instructions per frame,
#      counted from just before the drive to just after it (callgrind_control -z / -d), and
#      the top functions by their own instructions per frame into bench-out/profile/*.top.txt
#      (scripts/callgrind-self.py).
# The balancer under callgrind is ~50x slower, so it is the bottleneck there and reads larger
# bursts than natively: compare binaries within a column, not callgrind's syscalls with perf's.
# Needs the release build of tidepool-balancer, bench-target and bench-drive; valgrind and perf.
set -euo pipefail
cd "$(dirname "$0")/.."

FRAMES=${FRAMES:-20000}        # per connection, natively
CG_FRAMES=${CG_FRAMES:-2500}   # per connection, under callgrind
CONNS=${CONNS:-8}
WINDOW=${WINDOW:-32}
CALLGRIND=${CALLGRIND:-1}
OUT=bench-out/profile
mkdir -p "$OUT"
BIN=target/release
BALANCERS=("$@")
[[ ${#BALANCERS[@]} == 0 ]] && BALANCERS=("$BIN/tidepool-balancer")
SYSCALLS=raw_syscalls:sys_enter,syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_sendto,syscalls:sys_enter_read,syscalls:sys_enter_recvfrom,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_futex

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# Three echo targets; their addresses into TARGETS.
"$BIN/bench-target" --service-us 0 --service-us 0 --service-us 0 >"$OUT/targets.txt" &
PIDS+=($!)
for _ in $(seq 100); do [[ $(grep -c listening "$OUT/targets.txt" || true) == 3 ]] && break; sleep 0.1; done
TARGETS=()
while read -r _ addr; do TARGETS+=(--target "$addr"); done < <(grep listening "$OUT/targets.txt")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_balancer PREFIX... -- BINARY: sets BPID (the balancer's, or valgrind's, pid) and LISTEN.
start_balancer() {
    local prefix=() bin
    while [[ $1 != -- ]]; do prefix+=("$1"); shift; done
    bin=$2
    LISTEN=127.0.0.1:$(free_port)
    local admin=127.0.0.1:$(free_port)
    RUST_LOG=warn "${prefix[@]}" "$bin" --listen "$LISTEN" --admin "$admin" --routing p2c \
        --health-interval 1s --health-timeout 500ms --healthy-threshold 1 "${TARGETS[@]}" \
        >"$OUT/balancer.log" 2>&1 &
    BPID=$!
    PIDS+=("$BPID")
    for _ in $(seq 600); do
        [[ $(curl -s "http://$admin/targets" | grep -o '"healthy"' | wc -l) -ge 3 ]] && return 0
        sleep 0.1
    done
    echo "profile: $bin did not report 3 healthy targets" >&2
    return 1
}

stop_balancer() {
    kill -TERM "$BPID" 2>/dev/null || true
    wait "$BPID" 2>/dev/null || true
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

printf '| balancer | frames | syscalls/frame | write+sendto+writev/frame | read+recvfrom/frame | epoll_wait/frame | futex/frame | CPU ms/1000 frames | instructions/frame |\n'
printf '| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n'
for bin in "${BALANCERS[@]}"; do
    label=$bin
    # 1. Natively: syscalls and CPU.
    start_balancer -- "$bin"
    # A warm-up, so that buffers and connections are in place before counting.
    "$BIN/bench-drive" --addr "$LISTEN" --connections "$CONNS" --window "$WINDOW" --frames 1000 >/dev/null
    perf stat -x, -e "$SYSCALLS" -p "$BPID" -o "$OUT/perf.csv" &
    perf_pid=$!
    sleep 0.5
    before=$(cpu_ticks "$BPID")
    "$BIN/bench-drive" --addr "$LISTEN" --connections "$CONNS" --window "$WINDOW" --frames "$FRAMES" >"$OUT/drive.txt"
    after=$(cpu_ticks "$BPID")
    kill -INT "$perf_pid"; wait "$perf_pid" || true
    stop_balancer
    total=$((FRAMES * CONNS))
    count() { awk -F, -v e="$1" '$3 == e {s += $1} END {print s + 0}' "$OUT/perf.csv"; }
    per() { python3 -c "print(f'{$1 / $total:.3f}')"; }
    all=$(count raw_syscalls:sys_enter)
    writes=$(( $(count syscalls:sys_enter_write) + $(count syscalls:sys_enter_sendto) + $(count syscalls:sys_enter_writev) ))
    reads=$(( $(count syscalls:sys_enter_read) + $(count syscalls:sys_enter_recvfrom) ))
    waits=$(( $(count syscalls:sys_enter_epoll_wait) + $(count syscalls:sys_enter_epoll_pwait) ))
    futex=$(count syscalls:sys_enter_futex)
    ticks=$(getconf CLK_TCK)
    cpu=$(python3 -c "print(f'{($after - $before) / $ticks * 1e6 / $total:.2f}')")
    # 2. Under callgrind: instructions.
    ipf="—"
    if [[ $CALLGRIND != 0 ]]; then
        cgout="$OUT/callgrind.$(echo "$label" | tr / _)"
        rm -f "$cgout".*
        start_balancer valgrind --tool=callgrind --callgrind-out-file="$cgout.%p" -- "$bin"
        "$BIN/bench-drive" --addr "$LISTEN" --connections "$CONNS" --window "$WINDOW" --frames 200 >/dev/null
        callgrind_control -z "$BPID" >/dev/null
        "$BIN/bench-drive" --addr "$LISTEN" --connections "$CONNS" --window "$WINDOW" --frames "$CG_FRAMES" >/dev/null
        callgrind_control -d "$BPID" >/dev/null
        stop_balancer
        dump=$(ls "$cgout".*.1 2>/dev/null | head -1)
        if [[ -n $dump ]]; then
            ir=$(awk '/^summary:/ {print $2}' "$dump")
            ipf=$(python3 -c "print(round($ir / ($CG_FRAMES * $CONNS)))")
            scripts/callgrind-self.py "$dump" $((CG_FRAMES * CONNS)) 60 >"$cgout.top.txt"
        fi
    fi
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$label" "$total" "$(per "$all")" \
        "$(per "$writes")" "$(per "$reads")" "$(per "$waits")" "$(per "$futex")" "$cpu" "$ipf"
done
