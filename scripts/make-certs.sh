#!/usr/bin/env bash
# Makes a private CA and the certificates tidepool's TLS needs, with openssl, into DIR
# (default deploy/certs, which git ignores). Never commit what it writes: the keys are
# secrets. Run it again to rotate: the processes re-read their files on SIGHUP or within
# --tls-reload-interval, and connections already open keep working.
#
#   scripts/make-certs.sh [DIR]        # or: make certs
#
# DIR/ca.pem               the CA: clients trust it (--upstream-tls-ca, --tls-client-ca,
#                          --register-tls-ca, Python's ssl.create_default_context(cafile=))
# DIR/balancer.{pem,key}   the balancer's listener and admin API (--tls-cert and
#                          --admin-tls-cert): names what clients, probes and KEDA dial:
#                          balancer and balancer-b (docker-compose.yml's two), localhost,
#                          127.0.0.1, the Kubernetes Service tidepool-balancer in namespace
#                          tidepool (short, .tidepool, .tidepool.svc, .svc.cluster.local),
#                          and $TIDEPOOL_CERT_NAMES (comma-separated, DNS or IP)
# DIR/worker.{pem,key}     every worker's listener: names `worker` (the balancer checks it
#                          with --upstream-tls-server-name worker)
# DIR/balancer-client.{pem,key}  the balancer's client certificate towards workers that
#                          require one (--upstream-tls-cert/--upstream-tls-key)
# DIR/scaler-client.{pem,key}  a client certificate for KEDA's metrics-api trigger, whose
#                          `authMode: tls` will not start without one although the admin API
#                          asks for none. Self-signed, NOT from the CA: a certificate of the
#                          CA would pass the workers' --tls-client-ca, and KEDA's operator
#                          needs no way into a worker.
#
# DIR is made private (0700: other users of this machine cannot enter it), and the leaf keys
# in it are 0644 because docker-compose.yml bind-mounts each file as it is (compose ignores a
# secret's uid and mode outside swarm) and the image runs as user 65534, which must read
# them inside the container; the CA's key, which no container needs, stays 0600. Outside
# compose, tighten them to your process's user (Kubernetes: the Secret's defaultMode and
# fsGroup set the mode instead, see deploy/kubernetes/base/tls-secret.yaml).
set -euo pipefail
DIR="${1:-deploy/certs}"
DAYS="${TIDEPOOL_CERT_DAYS:-365}"
command -v openssl >/dev/null || {
    echo "make-certs.sh needs openssl (apt-get install openssl)" >&2
    exit 1
}
mkdir -p "$DIR"
chmod 0700 "$DIR"
cd "$DIR"

san_list() { # name,name,... -> DNS:a,IP:1.2.3.4,...
    local out="" n
    IFS=, read -ra names <<<"$1"
    for n in "${names[@]}"; do
        [ -z "$n" ] && continue
        if [[ "$n" =~ ^[0-9.]+$ || "$n" == *:* ]]; then out+="IP:$n,"; else out+="DNS:$n,"; fi
    done
    echo "${out%,}"
}

if [ ! -f ca.pem ] || [ ! -f ca.key ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout ca.key -out ca.pem -days "$((DAYS * 3))" -subj "/CN=tidepool CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

leaf() { # name cn sans usage
    local name=$1 cn=$2 sans=$3 usage=$4
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$name.key" -out "$name.csr" -subj "/CN=$cn" 2>/dev/null
    {
        echo "basicConstraints=CA:FALSE"
        echo "keyUsage=critical,digitalSignature"
        echo "extendedKeyUsage=$usage"
        [ -n "$sans" ] && echo "subjectAltName=$sans"
    } >"$name.ext"
    openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
        -out "$name.pem" -days "$DAYS" -extfile "$name.ext" 2>/dev/null
    rm -f "$name.csr" "$name.ext"
    # Readable by the containers' user 65534; the folder keeps everyone else out (above).
    chmod 0644 "$name.key"
}

K8S_SERVICE=tidepool-balancer.tidepool
BALANCER_NAMES="balancer,balancer-b,localhost,127.0.0.1"
BALANCER_NAMES+=",tidepool-balancer,$K8S_SERVICE,$K8S_SERVICE.svc,$K8S_SERVICE.svc.cluster.local"
leaf balancer balancer "$(san_list "$BALANCER_NAMES,${TIDEPOOL_CERT_NAMES:-}")" serverAuth
leaf worker worker "$(san_list "worker,localhost,127.0.0.1")" serverAuth
leaf balancer-client balancer "" clientAuth
# KEDA's placeholder identity: self-signed (see the top), a new one on every run like the rest.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout scaler-client.key -out scaler-client.pem -days "$DAYS" -subj "/CN=tidepool scaler" \
    -addext "basicConstraints=critical,CA:FALSE" -addext "keyUsage=critical,digitalSignature" \
    -addext "extendedKeyUsage=clientAuth" 2>/dev/null
chmod 0644 scaler-client.key
chmod 0600 ca.key
echo "certificates in $DIR: ca.pem, balancer.pem/.key, worker.pem/.key, balancer-client.pem/.key, scaler-client.pem/.key"
