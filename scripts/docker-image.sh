#!/usr/bin/env bash
# Builds the image `tidepool:local` without pulling anything: this machine's docker engine
# has no registry to pull from. The image is `FROM scratch` in effect: the binaries, the
# shared libraries they and ONNX Runtime link (found with ldd), the ONNX Runtime library
# and a synthetic model, imported from a tarball with `docker import`. There is no shell:
# healthchecks use tidepool-probe.
#
#   scripts/docker-image.sh                 release binaries, 16MiB model
#   PROFILE=debug scripts/docker-image.sh   the debug binaries (what the compose test uses)
#   SIZE=1GiB scripts/docker-image.sh       the seed's 1 GB model
#   IMAGE=name:tag                          another image name
#   FORCE=1                                 rebuild even when nothing changed
#
# The image carries a label with a hash of everything that went into it; when the label
# matches, the import is skipped (the test suite calls this on every run).
#
# Name resolution: glibc 2.34+ has nss `files` and `dns` built into libc.so.6, so the
# nsswitch.conf below is all the compose service names (`worker`, `balancer`) need; docker
# mounts /etc/hosts and /etc/resolv.conf (its embedded DNS at 127.0.0.11) over the empty
# files made here. An older glibc would dlopen libnss_dns.so.2, which ldd does not list:
# it is copied too when present.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PROFILE="${PROFILE:-release}"
SIZE="${SIZE:-16MiB}"
IMAGE="${IMAGE:-tidepool:local}"
BINS=(tidepool-balancer tidepool-worker tidepool-load tidepool-probe)
cd "$ROOT"

ORT_LIB="$(scripts/fetch-ort.sh)"
if [ "$PROFILE" = release ]; then
  cargo build --release --quiet -p tidepool-balancer -p tidepool-worker -p tidepool-load --bins
else
  # Every target of the workspace: the feature set of `cargo test --workspace` and
  # `make build`, so that after either of them (the compose test runs in the former) this
  # builds nothing; `-p ... --bins` would resolve features differently and recompile.
  cargo build --quiet --workspace --all-targets
fi
BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE"

INPUTS="$( (sha256sum "${BINS[@]/#/$BIN_DIR/}" "$ORT_LIB" "$0"; echo "$SIZE") | sha256sum | cut -c1-32)"
if [ -z "${FORCE:-}" ] &&
   [ "$(docker image inspect -f '{{index .Config.Labels "tidepool.inputs"}}' "$IMAGE" 2>/dev/null)" = "$INPUTS" ]; then
  echo "$IMAGE is up to date ($PROFILE binaries, $SIZE model)" >&2
  exit 0
fi

# A fresh directory per build, so that two builds at once do not mix their files.
mkdir -p "$ROOT/build"
ROOTFS="$(mktemp -d "$ROOT/build/rootfs.XXXXXX")"
trap 'rm -rf "$ROOTFS"' EXIT
chmod 755 "$ROOTFS"
mkdir -p "$ROOTFS"/{usr/local/bin,opt/onnxruntime,models,tmp,etc}
chmod 1777 "$ROOTFS/tmp"
for bin in "${BINS[@]}"; do
  # Debug info is most of a debug binary's size; symbols stay for backtraces.
  strip --strip-debug -o "$ROOTFS/usr/local/bin/$bin" "$BIN_DIR/$bin"
done
cp "$ORT_LIB" "$ROOTFS/opt/onnxruntime/"
# Every shared library the binaries and ONNX Runtime need, at the same paths as here.
for file in "${BINS[@]/#/$BIN_DIR/}" "$ORT_LIB"; do
  ldd "$file" | grep -o '/[^ ]*' | while read -r lib; do
    cp --parents -L -n "$lib" "$ROOTFS/"
  done
done
for nss in /lib/*/libnss_dns.so.2 /lib/*/libnss_files.so.2; do
  if [ -e "$nss" ]; then cp --parents -L -n "$nss" "$ROOTFS/"; fi
done
printf 'hosts: files dns\n' > "$ROOTFS/etc/nsswitch.conf"
: > "$ROOTFS/etc/hosts"
: > "$ROOTFS/etc/resolv.conf"
printf 'root:x:0:0:root:/:/usr/local/bin/tidepool-worker\nnobody:x:65534:65534:nobody:/:/usr/local/bin/tidepool-worker\n' > "$ROOTFS/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$ROOTFS/etc/group"

# The model is made here, once, by the same binary the workers run.
RUST_LOG=warn ORT_DYLIB_PATH="$ORT_LIB" "$BIN_DIR/tidepool-worker" synth --out "$ROOTFS/models/model.onnx" \
  --size "$SIZE" --input-dim 64 --output-dim 16 --seed 7 >&2
chmod -R a+rX "$ROOTFS/models" "$ROOTFS/opt" "$ROOTFS/usr"

# The image this one replaces, removed after the import so that rebuilds (one per test
# run when the binaries changed) do not pile up dangling images.
OLD_ID="$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
tar -C "$ROOTFS" --numeric-owner --owner=0 --group=0 -c . | docker import \
  --change 'ENV ORT_DYLIB_PATH=/opt/onnxruntime/'"$(basename "$ORT_LIB")" \
  --change 'ENV PATH=/usr/local/bin' \
  --change 'ENV RUST_LOG=info,ort=warn' \
  --change 'ENV NO_COLOR=1' \
  --change 'ENV TIDEPOOL_WORKER_MODEL=/models/model.onnx' \
  --change "LABEL tidepool.inputs=$INPUTS" \
  --change 'USER 65534' \
  --change 'ENTRYPOINT []' \
  --message "tidepool $PROFILE build, model $SIZE" \
  - "$IMAGE" >/dev/null
if [ -n "$OLD_ID" ] && [ "$OLD_ID" != "$(docker image inspect -f '{{.Id}}' "$IMAGE")" ]; then
  docker image rm "$OLD_ID" >/dev/null 2>&1 || true   # still in use by a container: kept
fi
echo "built $IMAGE ($(du -sh "$ROOTFS" | cut -f1) rootfs, $PROFILE binaries, $SIZE model)" >&2
