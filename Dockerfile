# tidepool's image, for anyone with a registry to pull base images from: a Rust builder stage,
# then an image FROM scratch holding only what deploy/image/contents.txt lists (the four
# binaries, ONNX Runtime from its PyPI wheel, a synthetic model, the shared libraries they
# link). No shell: healthchecks run `tidepool-probe`. It runs as `nobody`.
#
#   docker build -t tidepool:0.1.0 .                            16MiB synthetic model
#   docker build --build-arg MODEL_SIZE=1GiB -t tidepool:1g .   the seed's 1 GB model
#   docker build -f Dockerfile.gpu -t tidepool-gpu:0.1.0 .      the CUDA flavour
#
# The files are laid out by scripts/image-rootfs.sh, the script scripts/docker-image.sh runs
# to make `tidepool:local` on a machine without a registry (`docker import`), so both images
# hold the same files. `make test` checks this file offline (scripts/validate-docker.py): the
# paths it copies, the binaries it names, the environment and user against the list, and
# ORT_VERSION against the Makefile's.

ARG RUST_VERSION=1.95
ARG ORT_VERSION=1.31.1

FROM rust:${RUST_VERSION}-slim-bookworm AS builder
ARG ORT_VERSION
ARG MODEL_SIZE=16MiB
# python3-pip: scripts/fetch-ort.sh downloads ONNX Runtime's wheel; binutils: strip.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip binutils \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Every workspace member, since cargo reads them all.
COPY Cargo.toml Cargo.lock ./
COPY protocol protocol
COPY balancer balancer
COPY worker worker
COPY load load
COPY bench bench
COPY tests tests
RUN cargo build --release --locked -p tidepool-balancer -p tidepool-worker -p tidepool-load --bins
COPY scripts/fetch-ort.sh scripts/image-rootfs.sh scripts/
COPY deploy/image/contents.txt deploy/image/
# ROOTFS_SYSTEM=1: the image is FROM scratch, so /rootfs carries the shared libraries too.
RUN ORT_VERSION=${ORT_VERSION} scripts/fetch-ort.sh \
 && BIN_DIR=target/release ORT_LIB=.ort/libonnxruntime.so.${ORT_VERSION} SIZE=${MODEL_SIZE} \
    ROOTFS_SYSTEM=1 scripts/image-rootfs.sh /rootfs

FROM scratch
ARG ORT_VERSION
COPY --from=builder /rootfs/ /
ENV PATH=/usr/local/bin \
    ORT_DYLIB_PATH=/opt/onnxruntime/libonnxruntime.so.${ORT_VERSION} \
    RUST_LOG=info,ort=warn \
    NO_COLOR=1 \
    TIDEPOOL_WORKER_MODEL=/models/model.onnx
USER 65534
# The command is the service's: `tidepool-worker serve ...`, `tidepool-balancer ...`.
ENTRYPOINT []
