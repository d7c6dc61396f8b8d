#!/usr/bin/env bash
# Lays out the files of a tidepool image under DEST, from the one list of what goes into an
# image (deploy/image/contents.txt): the binaries (stripped of debug info), the ONNX Runtime
# libraries and a synthetic model. scripts/docker-image.sh runs it here before `docker import`;
# the Dockerfiles' builder stage runs it too, so every image has the same layout.
#
#   BIN_DIR=target/release ORT_LIB=.ort/libonnxruntime.so.1.31.1 scripts/image-rootfs.sh DEST
#
#   BIN_DIR        where the built binaries are                              (required)
#   ORT_LIB        the libonnxruntime.so.VERSION to ship; every libonnxruntime* beside it
#                  goes too (the GPU build's CUDA provider libraries)        (required)
#   SIZE           the synthetic model's size                                [16MiB]
#   ROOTFS_SYSTEM  1: DEST is the whole system (an image made FROM scratch): the shared
#                  libraries the binaries and ONNX Runtime link (found with ldd, copied at
#                  the same paths), and /etc's passwd, group and nsswitch.conf. 0: the
#                  image's base brings those (the GPU image's CUDA base)       [1]
#
# Name resolution in a FROM-scratch image: glibc 2.34+ has nss `files` and `dns` built into
# libc.so.6, so the nsswitch.conf below is all the compose service names (`worker`,
# `balancer`) need; docker mounts /etc/hosts and /etc/resolv.conf (its embedded DNS at
# 127.0.0.11) over the empty files made here. An older glibc would dlopen libnss_dns.so.2,
# which ldd does not list: it is copied too when present.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:?usage: BIN_DIR=... ORT_LIB=... scripts/image-rootfs.sh DEST}"
BIN_DIR="${BIN_DIR:?BIN_DIR: the directory of the built binaries}"
ORT_LIB="${ORT_LIB:?ORT_LIB: the libonnxruntime.so.VERSION to ship (scripts/fetch-ort.sh prints it)}"
SIZE="${SIZE:-16MiB}"
SYSTEM="${ROOTFS_SYSTEM:-1}"
# The version is the library's own, so that ORT_DYLIB_PATH names the file actually shipped.
ORT_VERSION="${ORT_LIB##*/libonnxruntime.so.}"

BINS=()
declare -A ENV
while read -r kind value; do
  case "$kind" in
    bin) BINS+=("$value") ;;
    env) ENV["${value%%=*}"]="${value#*=}" ;;
  esac
done < <(grep -Ev '^[[:space:]]*(#|$)' "$ROOT/deploy/image/contents.txt")
ORT_PATH="${ENV[ORT_DYLIB_PATH]//'${ORT_VERSION}'/$ORT_VERSION}"
MODEL="${ENV[TIDEPOOL_WORKER_MODEL]}"
if [ "${ORT_PATH##*/}" != "${ORT_LIB##*/}" ]; then
  echo "image-rootfs: $ORT_LIB is not the ${ORT_PATH##*/} that deploy/image/contents.txt names" >&2
  exit 1
fi

mkdir -p "$DEST"
chmod 755 "$DEST"
mkdir -p "$DEST/usr/local/bin" "$DEST${ORT_PATH%/*}" "$DEST${MODEL%/*}" "$DEST/tmp"
chmod 1777 "$DEST/tmp"
for bin in "${BINS[@]}"; do
  # Debug info is most of a debug binary's size; symbols stay for backtraces.
  strip --strip-debug -o "$DEST/usr/local/bin/$bin" "$BIN_DIR/$bin"
done
cp "${ORT_LIB%/*}"/libonnxruntime* "$DEST${ORT_PATH%/*}/"

if [ "$SYSTEM" = 1 ]; then
  # Every shared library the binaries and ONNX Runtime need, at the same paths as here.
  for file in "${BINS[@]/#/$BIN_DIR/}" "${ORT_LIB%/*}"/libonnxruntime*; do
    ldd "$file" | grep -o '/[^ ]*' | while read -r lib; do
      cp --parents -L -n "$lib" "$DEST/"
    done
  done
  for nss in /lib/*/libnss_dns.so.2 /lib/*/libnss_files.so.2; do
    if [ -e "$nss" ]; then cp --parents -L -n "$nss" "$DEST/"; fi
  done
  mkdir -p "$DEST/etc"
  printf 'hosts: files dns\n' > "$DEST/etc/nsswitch.conf"
  : > "$DEST/etc/hosts"
  : > "$DEST/etc/resolv.conf"
  printf 'root:x:0:0:root:/:/usr/local/bin/tidepool-worker\nnobody:x:65534:65534:nobody:/:/usr/local/bin/tidepool-worker\n' > "$DEST/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$DEST/etc/group"
fi

# The model is made here, once, by the same binary the workers run.
RUST_LOG=warn ORT_DYLIB_PATH="$ORT_LIB" "$BIN_DIR/tidepool-worker" synth --out "$DEST$MODEL" \
  --size "$SIZE" --input-dim 64 --output-dim 16 --seed 7 >&2
chmod -R a+rX "$DEST${MODEL%/*}" "$DEST${ORT_PATH%/*}" "$DEST/usr"
