#!/usr/bin/env bash
# Makes the secrets docker-compose.yml and deploy/compose/autoscale.yml mount (`make secrets`,
# run by `make compose-up`): the balancer's admin token, 64 random base64 characters.
#
#   scripts/make-secrets.sh [DIR]       DIR defaults to deploy/secrets (git ignores it)
#   FORCE=1 scripts/make-secrets.sh     a new token even when one exists (rotation: restart
#                                       the balancer and every worker that registers)
#
# An existing token is kept, so that running this again changes nothing. The directory is
# private (0700), so other users of this machine cannot read the token; the file itself is
# 0644 because compose bind-mounts it as it is, and the image runs as user 65534, which must
# be able to read it inside the container (compose ignores a secret's uid/mode outside
# swarm). For Kubernetes, see deploy/kubernetes/base/secret.yaml instead.
#
# Use the token from the host:
#   curl -H "Authorization: Bearer $(cat deploy/secrets/admin.token)" localhost:7001/targets
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${1:-$ROOT/deploy/secrets}"
TOKEN="$DIR/admin.token"
umask 077
mkdir -p "$DIR"
chmod 0700 "$DIR"
if [ -s "$TOKEN" ] && [ -z "${FORCE:-}" ]; then
  echo "$TOKEN exists; kept (FORCE=1 for a new one)" >&2
else
  # Written next to it and renamed: a reader never sees half a token.
  head -c 48 /dev/urandom | base64 -w0 > "$TOKEN.new"
  echo >> "$TOKEN.new"
  mv "$TOKEN.new" "$TOKEN"
  echo "wrote $TOKEN" >&2
fi
chmod 0644 "$TOKEN"
