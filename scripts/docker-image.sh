#!/usr/bin/env bash
# Builds the image `tidepool:local` without pulling anything: this machine's docker engine
# has no registry to pull from. The image is `FROM scratch` in effect: the three binaries,
# the shared libraries they and ONNX Runtime link (found with ldd), the ONNX Runtime
# library and a synthetic model, imported from a tarball with `docker import`.
#
#   scripts/docker-image.sh                 release binaries, 16MiB model
#   PROFILE=debug scripts/docker-image.sh   the debug binaries the test suite just built
#   SIZE=1GiB scripts/docker-image.sh       the seed's 1 GB model
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PROFILE="${PROFILE:-release}"
SIZE="${SIZE:-16MiB}"
IMAGE="${IMAGE:-tidepool:local}"
BINS=(tidepool-balancer tidepool-worker tidepool-load)
cd "$ROOT"

ORT_LIB="$(scripts/fetch-ort.sh)"
if [ "$PROFILE" = release ]; then
  cargo build --release --quiet -p tidepool-balancer -p tidepool-worker -p tidepool-load
else
  cargo build --quiet -p tidepool-balancer -p tidepool-worker -p tidepool-load
fi
BIN_DIR="$ROOT/target/$PROFILE"

ROOTFS="$ROOT/build/rootfs"
rm -rf "$ROOTFS"
mkdir -p "$ROOTFS"/{usr/local/bin,opt/onnxruntime,models,tmp,etc}
chmod 1777 "$ROOTFS/tmp"
for bin in "${BINS[@]}"; do
  cp "$BIN_DIR/$bin" "$ROOTFS/usr/local/bin/"
done
cp "$ORT_LIB" "$ROOTFS/opt/onnxruntime/"
# Every shared library the binaries and ONNX Runtime need, at the same paths as here.
for file in "${BINS[@]/#/$BIN_DIR/}" "$ORT_LIB"; do
  ldd "$file" | grep -o '/[^ ]*' | while read -r lib; do
    cp --parents -L -n "$lib" "$ROOTFS/"
  done
done
printf 'hosts: files dns\n' > "$ROOTFS/etc/nsswitch.conf"
printf 'root:x:0:0:root:/:/usr/local/bin/tidepool-worker\nnobody:x:65534:65534:nobody:/:/usr/local/bin/tidepool-worker\n' > "$ROOTFS/etc/passwd"

# The model is made here, once, by the same binary the workers run.
ORT_DYLIB_PATH="$ORT_LIB" "$BIN_DIR/tidepool-worker" synth --out "$ROOTFS/models/model.onnx" --size "$SIZE" --input-dim 64 --output-dim 16 --seed 7 >&2

tar -C "$ROOTFS" -c . | docker import \
  --change 'ENV ORT_DYLIB_PATH=/opt/onnxruntime/'"$(basename "$ORT_LIB")" \
  --change 'ENV PATH=/usr/local/bin' \
  --change 'ENV RUST_LOG=info' \
  --change 'USER 65534' \
  --change 'ENTRYPOINT []' \
  --message "tidepool $PROFILE build, model $SIZE" \
  - "$IMAGE" >/dev/null
echo "built $IMAGE ($(du -sh "$ROOTFS" | cut -f1) rootfs, $PROFILE binaries, $SIZE model)" >&2
