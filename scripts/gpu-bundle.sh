#!/usr/bin/env bash
# Packs what the GPU check (scripts/gpu-check.sh) needs on a lent device machine into parts
# small enough to travel one per call.
#
# That machine has CUDA 13 and cuDNN 9 (its image's nvidia-* Python packages) but no package
# registry and no Rust toolchain, and a call carries at most 64 MiB of working tree. What the
# check needs is larger: onnxruntime-gpu's libraries (the CUDA provider alone is 284 MB) and
# tidepool-worker and bench-worker built with `--features tidepool-worker/cuda`. So they are
# built and fetched here, stripped, put in one xz tarball and cut into parts of PART_MIB
# (default 56) MiB, each named with its SHA-256 in .gpu/manifest:
#
#   scripts/gpu-bundle.sh        → .gpu/part-00, .gpu/part-01, ... and .gpu/manifest
#
# Then one device call per part, each carrying the manifest and that part, each running
# scripts/gpu-check.sh (README.md, "The GPU check"): the script keeps the parts it is given
# on the device machine while it stays warm, and runs the check once it holds them all.
# The cuda build goes to target/cuda, so the CPU build in target/ is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

PART_MIB=${PART_MIB:-56}
if ! [[ $PART_MIB =~ ^[0-9]+$ ]] || ((PART_MIB < 1 || PART_MIB > 60)); then
    echo "gpu-bundle: PART_MIB must be a whole number of MiB from 1 to 60 (a call carries at most 64 MiB, the working tree included), not '$PART_MIB'" >&2
    exit 2
fi

ORT_LIB=$(ORT_FLAVOR=gpu scripts/fetch-ort.sh)
echo "gpu-bundle: building tidepool-worker and bench-worker with --features tidepool-worker/cuda into target/cuda" >&2
CARGO_TARGET_DIR=target/cuda cargo build --release --quiet -p tidepool-worker -p tidepool-bench \
    --bin tidepool-worker --bin bench-worker --features tidepool-worker/cuda

STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/bundle/bin" "$STAGE/bundle/ort"
# The runtime, the shared provider bridge and the CUDA provider; TensorRT's is not used.
cp "$ORT_LIB" "$(dirname "$ORT_LIB")"/libonnxruntime_providers_{shared,cuda}.so "$STAGE/bundle/ort/"
for bin in tidepool-worker bench-worker; do
    strip -o "$STAGE/bundle/bin/$bin" "target/cuda/release/$bin"
done
basename "$ORT_LIB" >"$STAGE/bundle/ort/LIB"

rm -rf .gpu
mkdir .gpu
tar -C "$STAGE" -cf - bundle | xz -T0 -6 >"$STAGE/bundle.tar.xz"
split -b "${PART_MIB}M" -d -a 2 "$STAGE/bundle.tar.xz" .gpu/part-
(cd .gpu && sha256sum part-* >manifest)

parts=$(wc -l <.gpu/manifest)
echo "gpu-bundle: $(du -h "$STAGE/bundle.tar.xz" | cut -f1) in $parts parts under .gpu/; one device call per part:" >&2
while read -r _ part; do
    echo "  run  carry [\".gpu/manifest\", \".gpu/$part\"]  command \"scripts/gpu-check.sh\"" >&2
done <.gpu/manifest
