#!/usr/bin/env bash
# The GPU check (issue 16): bench-worker with `--device cuda` on the 1 GiB model, the worker
# against the same ONNX Runtime session driven directly, on a lent device machine.
#
# Run it in every device call, each carrying .gpu/manifest and one part that
# scripts/gpu-bundle.sh made here. Each call's part is checked against the manifest's SHA-256
# and kept in GPU_STASH (default /tmp/tidepool-gpu), which lasts while the machine stays
# warm; a call that still lacks parts says which and exits 0. The call that completes the
# set unpacks it and runs the check:
#   - CUDA 13 and cuDNN 9 from the image's nvidia-* Python packages (LD_LIBRARY_PATH);
#   - the 1 GiB model written there by `tidepool-worker synth` (nothing that large travels);
#   - `bench-worker --device $DEVICE` (default cuda: CUDA or fail) at BATCHES (default
#     1,8,32,64,128,256: a GPU's best batch is larger than a CPU's), the report to $OUT
#     (the device tool's folder that comes back; bench-out/gpu elsewhere) and to stdout.
# DEVICE=auto QUICK=1 runs the same path on a machine without a GPU (CPU, with a warning):
# that is how it is tested here.
set -euo pipefail
cd "$(dirname "$0")/.."

STASH=${GPU_STASH:-/tmp/tidepool-gpu}
OUT=${OUT:-bench-out/gpu}
DEVICE=${DEVICE:-cuda}
BATCHES=${BATCHES:-1,8,32,64,128,256}
MODEL=${MODEL:-build/models/synth-1gib.onnx}

if [[ ! -f .gpu/manifest ]]; then
    echo "gpu-check: no .gpu/manifest here: run scripts/gpu-bundle.sh on the build machine and carry .gpu/manifest with one .gpu/part-NN in each call" >&2
    exit 2
fi
mkdir -p "$STASH" "$OUT"
# A manifest unlike the one kept is a new bundle: its parts replace the old ones.
if ! cmp -s .gpu/manifest "$STASH/manifest"; then
    rm -rf "${STASH:?}"/*
    cp .gpu/manifest "$STASH/manifest"
fi

missing=()
while read -r sum part; do
    if [[ ! $part =~ ^part-[0-9]{2}$ ]]; then
        echo "gpu-check: the manifest names '$part', not a part: make it again with scripts/gpu-bundle.sh" >&2
        exit 2
    fi
    if [[ ! -f $STASH/$part && -f .gpu/$part ]]; then
        if [[ $(sha256sum <".gpu/$part" | cut -d' ' -f1) != "$sum" ]]; then
            echo "gpu-check: .gpu/$part does not match its SHA-256 in the manifest (a broken transfer?): carry it again" >&2
            exit 1
        fi
        cp ".gpu/$part" "$STASH/$part"
        echo "gpu-check: kept $part" >&2
    fi
    [[ -f $STASH/$part ]] || missing+=("$part")
done <"$STASH/manifest"
if ((${#missing[@]} > 0)); then
    echo "gpu-check: still missing ${missing[*]}: carry .gpu/manifest and the next part in the next call, while this machine is warm" >&2
    exit 0
fi

if [[ ! -f $STASH/bundle/ort/LIB ]]; then
    echo "gpu-check: every part is here; unpacking" >&2
    (cd "$STASH" && while read -r _ part; do cat "$part"; done <manifest | xz -d | tar -xf -)
fi
BIN=$STASH/bundle/bin
export ORT_DYLIB_PATH=$STASH/bundle/ort/$(cat "$STASH/bundle/ort/LIB")

# ONNX Runtime's CUDA provider links libcudart.so.13, libcublas(Lt).so.13, libcufft, libcurand
# and cuDNN 9: on the device image they come with its nvidia-* Python packages.
libs=$(python3 - <<'PY' 2>/dev/null || true
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
print(":".join(sorted({d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib"))})))
PY
)
if [[ -n $libs ]]; then
    export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
elif [[ $DEVICE == cuda ]]; then
    echo "gpu-check: no nvidia-* Python packages found (python3 -c 'import nvidia'); relying on the system's CUDA libraries" >&2
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

if [[ ! -f $MODEL || ! -f $MODEL.data ]]; then
    mkdir -p "$(dirname "$MODEL")"
    "$BIN/tidepool-worker" synth --out "$MODEL" --size 1GiB
fi
quick=()
[[ -n ${QUICK:-} ]] && quick=(--quick)
RUST_LOG=${RUST_LOG:-warn} "$BIN/bench-worker" --model "$MODEL" --device "$DEVICE" \
    --batches "$BATCHES" --out "$OUT" "${quick[@]}" >/dev/null
cat "$OUT/worker.md"
