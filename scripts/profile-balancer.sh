#!/usr/bin/env bash
# Instructions and syscalls per frame of tidepool-balancer on a fixed workload, for one or more
# balancer binaries side by side (say, this tree's and one built from an earlier commit), and
# HAProxy's syscalls and CPU on the same workload for scale.
# Instruction and syscall counts hardly move with the load of a shared machine; frames/s do.
#
#   scripts/profile-balancer.sh [BALANCER_BIN...]     (default: target/release/tidepool-balancer)
#
# For each binary: three echo targets (bench-target), the balancer in front of them, and
# bench-drive sending FRAMES small frames on each of CONNS connections with WINDOW in flight:
#   1. natively, under `perf stat -e raw_syscalls:sys_enter,...` (tracepoints work where
#      hardware counters do not): syscalls per frame by kind, and CPU per 1000 frames (/proc),
#      split into user and kernel time;
#   2. under `valgrind --tool=callgrind` (skipped with CALLGRIND=0): instructions per frame,
#      counted from just before the drive to just after it (callgrind_control -z / -d), and
#      the top functions by their own instructions per frame into bench-out/profile/*.top.txt
#      (scripts/callgrind-self.py).
# The balancer under callgrind is ~50x slower, so it is the bottleneck there and reads larger
# bursts than natively: compare binaries within a column, not callgrind's syscalls with perf's.
# Then HAProxy (TCP mode, `balance leastconn`, as in bench-balancer; skipped with HAPROXY=0 or
# when `haproxy` is not installed) in front of the same targets, natively only: HAProxy
# forwards bytes per connection, so its user time per frame is near nothing and its CPU is
# almost all the kernel's, which the kernel column sets beside tidepool-balancer's.
# Needs the release build of tidepool-balancer, bench-target and bench-drive; valgrind and perf.
set -euo pipefail
cd "$(dirname "$0")/.."

FRAMES=${FRAMES:-50000}        # per connection, natively (user and kernel time come in 10 ms ticks)
CG_FRAMES=${CG_FRAMES:-2500}   # per connection, under callgrind
CONNS=${CONNS:-8}
WINDOW=${WINDOW:-32}
CALLGRIND=${CALLGRIND:-1}
HAPROXY=${HAPROXY:-1}
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

# User and kernel clock ticks of a process (all its threads).
cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }

# start_haproxy PREFIX...: sets BPID and LISTEN, like start_balancer.
start_haproxy() {
    LISTEN=127.0.0.1:$(free_port)
    {
        printf 'global\n    maxconn 4096\n\ndefaults\n    mode tcp\n    timeout connect 2s\n'
        printf '    timeout client 120s\n    timeout server 120s\n\n'
        printf 'frontend bench\n    bind %s\n    default_backend targets\n\n' "$LISTEN"
        printf 'backend targets\n    balance leastconn\n'
        local i=0
        while read -r _ addr; do
            printf '    server t%d %s\n' "$i" "$addr"
            i=$((i + 1))
        done < <(grep listening "$OUT/targets.txt")
    } >"$OUT/haproxy.cfg"
    "$@" haproxy -db -f "$OUT/haproxy.cfg" >"$OUT/haproxy.log" 2>&1 &
    BPID=$!
    PIDS+=("$BPID")
    for _ in $(seq 600); do
        (exec 3<>"/dev/tcp/${LISTEN%:*}/${LISTEN#*:}") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "profile: haproxy did not accept on $LISTEN" >&2
    return 1
}

# native: drives the process BPID listening on LISTEN under perf stat and sets the
# per-frame columns: ALL WRITES READS WAITS FUTEX, and USER_MS KERNEL_MS CPU_MS per 1000 frames.
native() {
    # A warm-up, so that buffers and connections are in place before counting.
    "$BIN/bench-drive" --addr "$LISTEN" --connections "$CONNS" --window "$WINDOW" --frames 1000 >/dev/null
    perf stat -x, -e "$SYSCALLS" -p "$BPID" -o "$OUT/perf.csv" &
    local perf_pid=$!
    sleep 0.5
    local before after
    before=$(cpu_ticks "$BPID")
    "$BIN/bench-drive" --addr "$LISTEN" --connections "$CONNS" --window "$WINDOW" --frames "$FRAMES" >"$OUT/drive.txt"
    after=$(cpu_ticks "$BPID")
    kill -INT "$perf_pid"; wait "$perf_pid" || true
    total=$((FRAMES * CONNS))
    count() { awk -F, -v e="$1" '$3 == e {s += $1} END {print s + 0}' "$OUT/perf.csv"; }
    ALL=$(count raw_syscalls:sys_enter)
    WRITES=$(( $(count syscalls:sys_enter_write) + $(count syscalls:sys_enter_sendto) + $(count syscalls:sys_enter_writev) ))
    READS=$(( $(count syscalls:sys_enter_read) + $(count syscalls:sys_enter_recvfrom) ))
    WAITS=$(( $(count syscalls:sys_enter_epoll_wait) + $(count syscalls:sys_enter_epoll_pwait) ))
    FUTEX=$(count syscalls:sys_enter_futex)
    read -r USER_MS KERNEL_MS CPU_MS < <(python3 -c "
b, a, hz, n = '$before'.split(), '$after'.split(), $(getconf CLK_TCK), $total
u, k = (int(a[0]) - int(b[0])) / hz, (int(a[1]) - int(b[1])) / hz
print(f'{u * 1e6 / n:.2f} {k * 1e6 / n:.2f} {(u + k) * 1e6 / n:.2f}')")
}

# instructions LABEL: counts the instructions per frame of the process BPID (started under
# callgrind with --callgrind-out-file=$OUT/callgrind.%p) over a drive into ipf, its top
# functions into $OUT/callgrind.LABEL.top.txt, and stops it.
instructions() {
    local cgout dump ir
    cgout="$OUT/callgrind.$(printf '%s' "$1" | tr -c 'A-Za-z0-9._-' _)"
    "$BIN/bench-drive" --addr "$LISTEN" --connections "$CONNS" --window "$WINDOW" --frames 200 >/dev/null
    callgrind_control -z "$BPID" >/dev/null
    "$BIN/bench-drive" --addr "$LISTEN" --connections "$CONNS" --window "$WINDOW" --frames "$CG_FRAMES" >/dev/null
    callgrind_control -d "$BPID" >/dev/null
    stop_balancer
    # The dump of `-d` (callgrind writes all of a process's threads into one).
    dump=$(ls "$OUT"/callgrind.[0-9]*.1 2>/dev/null | head -1)
    if [[ -n $dump ]]; then
        ir=$(awk '/^summary:/ {print $2}' "$dump")
        ipf=$(python3 -c "print(round($ir / ($CG_FRAMES * $CONNS)))")
        scripts/callgrind-self.py "$dump" $((CG_FRAMES * CONNS)) 60 >"$cgout.top.txt"
    fi
    rm -f "$OUT"/callgrind.[0-9]*
}

per() { python3 -c "print(f'{$1 / $total:.3f}')"; }

row() {
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$1" "$total" "$(per "$ALL")" \
        "$(per "$WRITES")" "$(per "$READS")" "$(per "$WAITS")" "$(per "$FUTEX")" "$USER_MS" \
        "$KERNEL_MS" "$CPU_MS" "$2"
}

printf '| balancer | frames | syscalls/frame | write+sendto+writev/frame | read+recvfrom/frame | epoll_wait/frame | futex/frame | user ms/1000 frames | kernel ms/1000 frames | CPU ms/1000 frames | instructions/frame |\n'
printf '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n'
for bin in "${BALANCERS[@]}"; do
    label=$bin
    # 1. Natively: syscalls and CPU.
    start_balancer -- "$bin"
    native
    stop_balancer
    # 2. Under callgrind: instructions.
    ipf="—"
    if [[ $CALLGRIND != 0 ]]; then
        start_balancer valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.%p" -- "$bin"
        instructions "$label"
    fi
    row "$label" "$ipf"
done
if [[ $HAPROXY != 0 ]] && command -v haproxy >/dev/null; then
    start_haproxy
    native
    stop_balancer
    ipf="—"
    if [[ $CALLGRIND != 0 ]]; then
        start_haproxy valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.%p"
        instructions haproxy
    fi
    row "HAProxy ($(haproxy -v | head -1 | awk '{print $3}'), leastconn)" "$ipf"
fi
