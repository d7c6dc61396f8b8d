#!/usr/bin/env bash
# Builds the image `tidepool:local` without pulling anything: this machine's docker engine
# has no registry to pull from. The image is `FROM scratch` in effect: the binaries, the
# shared libraries they and ONNX Runtime link (found with ldd), the ONNX Runtime library
# and a synthetic model, imported from a tarball with `docker import`. There is no shell:
# healthchecks use tidepool-probe.
#
# What goes in is deploy/image/contents.txt, laid out by scripts/image-rootfs.sh: the same
# list and script the Dockerfile's builder stage uses, so this image and the Dockerfile's
# have the same files, environment and user (scripts/validate-docker.py checks the latter).
#
#   scripts/docker-image.sh                 release binaries, 16MiB model
#   PROFILE=debug scripts/docker-image.sh   the debug binaries (what the compose test uses)
#   SIZE=1GiB scripts/docker-image.sh       the seed's 1 GB model
#   IMAGE=name:tag                          another image name
#   FORCE=1                                 rebuild even when nothing changed
#
# The image carries a label with a hash of everything that went into it; when the label
# matches, the import is skipped (the test suite calls this on every run).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PROFILE="${PROFILE:-release}"
SIZE="${SIZE:-16MiB}"
IMAGE="${IMAGE:-tidepool:local}"
cd "$ROOT"
CONTENTS=deploy/image/contents.txt
BINS=()
CHANGES=()
while read -r kind value; do
  case "$kind" in
    bin) BINS+=("$value") ;;
    env) CHANGES+=(--change "ENV $value") ;;
    user) CHANGES+=(--change "USER $value") ;;
  esac
done < <(grep -Ev '^[[:space:]]*(#|$)' "$CONTENTS")

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

INPUTS="$( (sha256sum "${BINS[@]/#/$BIN_DIR/}" "$ORT_LIB" "$0" scripts/image-rootfs.sh "$CONTENTS"; echo "$SIZE") | sha256sum | cut -c1-32)"
if [ -z "${FORCE:-}" ] &&
   [ "$(docker image inspect -f '{{index .Config.Labels "tidepool.inputs"}}' "$IMAGE" 2>/dev/null)" = "$INPUTS" ]; then
  echo "$IMAGE is up to date ($PROFILE binaries, $SIZE model)" >&2
  exit 0
fi

# A fresh directory per build, so that two builds at once do not mix their files.
mkdir -p "$ROOT/build"
ROOTFS="$(mktemp -d "$ROOT/build/rootfs.XXXXXX")"
trap 'rm -rf "$ROOTFS"' EXIT
BIN_DIR="$BIN_DIR" ORT_LIB="$ORT_LIB" SIZE="$SIZE" ROOTFS_SYSTEM=1 scripts/image-rootfs.sh "$ROOTFS"

# The image this one replaces, removed after the import so that rebuilds (one per test
# run when the binaries changed) do not pile up dangling images.
OLD_ID="$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
tar -C "$ROOTFS" --numeric-owner --owner=0 --group=0 -c . | docker import \
  "${CHANGES[@]//'${ORT_VERSION}'/${ORT_LIB##*/libonnxruntime.so.}}" \
  --change "LABEL tidepool.inputs=$INPUTS" \
  --change 'ENTRYPOINT []' \
  --message "tidepool $PROFILE build, model $SIZE" \
  - "$IMAGE" >/dev/null
if [ -n "$OLD_ID" ] && [ "$OLD_ID" != "$(docker image inspect -f '{{.Id}}' "$IMAGE")" ]; then
  docker image rm "$OLD_ID" >/dev/null 2>&1 || true   # still in use by a container: kept
fi
echo "built $IMAGE ($(du -sh "$ROOTFS" | cut -f1) rootfs, $PROFILE binaries, $SIZE model)" >&2
