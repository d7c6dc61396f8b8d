#!/usr/bin/env bash
# Fetches the ONNX Runtime shared library that the worker loads at run time (ort's load-dynamic).
# It comes from the PyPI wheel, the one source this project can reach; idempotent.
#   scripts/fetch-ort.sh            CPU build (onnxruntime)
#   ORT_FLAVOR=gpu scripts/fetch-ort.sh   CUDA build (onnxruntime-gpu) into .ort-gpu/
set -euo pipefail
ORT_VERSION="${ORT_VERSION:-1.31.1}"
FLAVOR="${ORT_FLAVOR:-cpu}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ "$FLAVOR" = gpu ]; then PKG=onnxruntime-gpu; DEST="$ROOT/.ort-gpu"; else PKG=onnxruntime; DEST="$ROOT/.ort"; fi
LIB="$DEST/libonnxruntime.so.$ORT_VERSION"
if [ -f "$LIB" ]; then
  echo "$LIB"
  exit 0
fi
mkdir -p "$DEST"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "fetching $PKG==$ORT_VERSION from PyPI into $DEST" >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$TMP" "$PKG==$ORT_VERSION" >&2
python3 - "$TMP" "$DEST" <<'PY'
import glob, os, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        base = os.path.basename(name)
        # the runtime itself plus, in the GPU wheel, the CUDA/TensorRT provider libraries
        if "/capi/" in name and base.startswith(("libonnxruntime", )) and ".so" in base:
            with zf.open(name) as src, open(os.path.join(dest, base), "wb") as out:
                out.write(src.read())
PY
ls "$DEST" >&2
echo "$LIB"
