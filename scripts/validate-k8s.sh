#!/usr/bin/env bash
# Validates the Kubernetes manifests under deploy/kubernetes offline (`make k8s-validate`):
# core kinds against a pinned Kubernetes version's schemas (kubernetes-validate carries
# them, strict), KEDA's ScaledObject against a schema of its own, each kustomization's
# pieces against each other, and a self-test that broken copies fail. See
# scripts/validate-k8s.py.
#
#   scripts/validate-k8s.sh [DIR]        K8S_VERSION=1.31 (the pinned version), PY=python
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
export K8S_VERSION="${K8S_VERSION:-1.31}"
exec "$PY" "$ROOT/scripts/validate-k8s.py" "${1:-$ROOT/deploy/kubernetes}"
