# tidepool: the two commands are `make demo` and `make test`; everything they need is set
# up here, idempotently, from crates.io and PyPI.
SHELL := /bin/bash
.DEFAULT_GOAL := help

ORT_VERSION ?= 1.31.1
ORT_LIB     := $(CURDIR)/.ort/libonnxruntime.so.$(ORT_VERSION)
VENV        := $(CURDIR)/.venv
PY          := $(VENV)/bin/python
CARGO       ?= cargo
SIZE        ?= 64MiB
export ORT_DYLIB_PATH ?= $(ORT_LIB)
# docker-compose v1 where installed, else the compose plugin.
COMPOSE     ?= $(shell command -v docker-compose >/dev/null 2>&1 && echo docker-compose || echo docker compose)

.PHONY: help setup ort venv build release test lint unit interop fuzz python-client demo bench soak \
        compose-up compose-down secrets certs k8s-validate docker-validate clean-local

help: ## this list
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

setup: ort venv ## fetch ONNX Runtime and the Python tools (idempotent)

ort: $(ORT_LIB) ## fetch the ONNX Runtime library from the onnxruntime wheel into .ort/
$(ORT_LIB):
	ORT_VERSION=$(ORT_VERSION) scripts/fetch-ort.sh

venv: $(VENV)/.ready ## Python tools: the interop fixtures, the README client, kubernetes-validate, the Dockerfile parser
$(VENV)/.ready: scripts/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements.txt
	touch $@

build: ## debug build of every crate
	$(CARGO) build --workspace --all-targets

release: ## release build of the binaries
	$(CARGO) build --release --workspace --bins

test: setup lint unit interop fuzz python-client k8s-validate docker-validate ## the whole suite: what CI runs
	@echo "make test: all checks passed"

lint: ## rustfmt and clippy, warnings are errors; tidepool-load builds as a protocol-only client
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	# Without its default `onnx` feature, tidepool-load (and tidepool-probe) must build with no
	# ONNX Runtime, axum or reqwest in its dependencies, and still pass clippy.
	$(CARGO) clippy -p tidepool-load --no-default-features --all-targets -- -D warnings
	$(CARGO) build -p tidepool-load --no-default-features
	@heavy=$$($(CARGO) tree -p tidepool-load --no-default-features -e normal,build --prefix none \
	    | grep -E '^(ort|ort-sys|axum|reqwest|tidepool-worker) ' | sort -u); \
	if [[ -n $$heavy ]]; then \
	    echo "tidepool-load --no-default-features depends on: $$heavy (keep them behind the onnx feature)" >&2; exit 1; \
	fi

unit: setup ## every cargo test in the workspace
	# The end-to-end suites run the real binaries, which cargo test does not build by itself.
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace
	# tidepool-load without the onnx feature: --model is refused, saying why.
	$(CARGO) test -p tidepool-load --no-default-features --lib
	# BENCHMARKS.md's assembly, on fake reports (no benchmark runs).
	scripts/test-bench-assemble.sh

interop: venv ## the Rust-encoded fixtures decoded by Python's msgpack
	$(CARGO) test -p tidepool-protocol --test interop
	$(PY) protocol/tests/interop/interop.py check

fuzz: ## build the protocol fuzz targets (decoder, raw scanner) and run them briefly (FUZZ_SECONDS, split between them)
	scripts/fuzz.sh $${FUZZ_SECONDS:-20}

bench: ort ## benchmarks (worker, text encoder, balancer vs HAProxy, autoscaling, resilience, two balancers) into BENCHMARKS.md, ~30 min; BENCH_QUICK=1 for a smoke run, BENCH_ONLY=worker|text|balancer|autoscale|resilience|failover for one (the others' committed figures kept), BENCH_ONLY=none to reassemble
	scripts/bench.sh

soak: ort ## not in make test: SOAK_MINUTES (30) at 70% of measured capacity (SOAK_RATE to fix it) with a worker SIGKILLed or frozen every 3 min; RSS slope per process and answers per request into bench-out/soak.md and BENCHMARKS.md's soak section
	BENCH_ONLY=soak scripts/bench.sh

python-client: venv ## the README's Python client against a live cluster
	scripts/test-python-client.sh

certs: ## a private CA and TLS certificates for the balancer and workers into deploy/certs (CERTS_DIR), with openssl
	scripts/make-certs.sh $(or $(CERTS_DIR),deploy/certs)

k8s-validate: venv ## deploy/kubernetes against Kubernetes 1.31's schemas (K8S_VERSION), offline; KEDA's ScaledObject too
	PY=$(PY) scripts/validate-k8s.sh

docker-validate: venv ## Dockerfile, Dockerfile.gpu, deploy/compose/gpu.yml against the workspace and deploy/image/contents.txt, offline
	$(PY) scripts/validate-docker.py

secrets: ## the admin token docker-compose mounts, deploy/secrets/admin.token (kept if it exists; FORCE=1 for a new one)
	scripts/make-secrets.sh

compose-up: secrets certs ## the token, TLS certificates, image tidepool:local (PROFILE, SIZE) and two balancers with WORKERS workers (3) under docker-compose
	scripts/docker-image.sh
	$(COMPOSE) up -d --scale worker=$${WORKERS:-3}
	@for b in balancer balancer-b; do \
	    echo "$$b (TLS, --tls-ca deploy/certs/ca.pem): $$($(COMPOSE) port $$b 7000)  admin: https://$$($(COMPOSE) port $$b 7001)/targets (curl --cacert deploy/certs/ca.pem -H \"Authorization: Bearer \$$(cat deploy/secrets/admin.token)\")"; \
	done
	@echo "load: $(COMPOSE) --profile load run --rm load   stop: make compose-down"

compose-down: ## stop the docker-compose cluster (workers drain first) and remove it
	$(COMPOSE) down -v --remove-orphans

demo: ort ## build, start an autoscaled local cluster, drive a compressed day, report (SIZE=1GiB for the 1 GB model)
	SIZE=$(SIZE) scripts/demo.sh

clean-local: ## remove fetched libraries and the virtualenv
	rm -rf .ort .ort-gpu $(VENV)
