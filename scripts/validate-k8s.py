"""Validates deploy/kubernetes offline: every manifest against a pinned Kubernetes
version's schemas, KEDA's ScaledObject against a schema of its own, and the pieces
against each other.

  python scripts/validate-k8s.py [DIR]          (make k8s-validate; K8S_VERSION=1.31)

1. Core kinds (Deployment, Service, HPA, ...) are checked by kubernetes-validate with its
   strict schemas (unknown fields rejected, so a misspelt key fails), for K8S_VERSION.
2. CRDs are not in those schemas. A ScaledObject (keda.sh/v1alpha1) is checked against
   SCALED_OBJECT below: the fields KEDA documents, unknown ones rejected, the metrics-api
   trigger's metadata too; its HPA `behavior` is checked by the core HPA schema. A
   TriggerAuthentication against TRIGGER_AUTHENTICATION (its secretTargetRef form). Any
   other kind without a schema fails: add a schema here before adding one.
3. Each top-level kustomization (the root one: KEDA; hpa/: the HPA; gpu/: KEDA, GPU
   workers) is resolved to its resources, with its JSON 6902 `patches` and `images`
   applied as kustomize does, and within each set: selectors match pod labels; the balancer's --target-dns names a
   headless Service of the workers with that port; the scaler scales the worker
   Deployment with the balancer's --min-workers/--max-workers and --target-load, reading
   a field /scaling has from the balancer's admin Service; probes and grace periods fit
   the flags. A worker that asks for a GPU (or runs `--device=cuda`) asks for exactly one
   `nvidia.com/gpu`, runs `--device=cuda` on an image other than the balancer's, and has a
   node selector and a toleration for the `nvidia.com/gpu` taint. The control plane: a
   balancer whose --admin is not loopback reads --admin-token-file from a mounted Secret of
   the set that has that key; every NetworkPolicy selects existing pods and names ports
   they have; the workers' --listen port is reachable from the balancer's pods only, and
   the admin port only from selected namespaces, never from everywhere. The admin API
   serves TLS (--admin-tls-cert/--admin-tls-key from a mounted Secret that has those keys),
   and everything that talks to it follows: the kubelet's httpGet probes on the admin port
   use `scheme: HTTPS`, the Prometheus annotations say `prometheus.io/scheme: https`, and
   KEDA's metrics-api trigger reads an https:// URL with a TriggerAuthentication giving it
   the CA (a `ca` from a Secret key of the set), never `unsafeSsl`.
   Balancers side by side: at least two balancer replicas, a RollingUpdate that keeps one
   serving (maxUnavailable at most 1, never all), a PodDisruptionBudget of minAvailable 1
   over the balancer pods, preferred pod anti-affinity by kubernetes.io/hostname, and no
   --autoscale on the balancer (KEDA/the HPA is the one actuator); the scaler never sums a
   per-balancer count of workers (`desired` aggregated with `sum` over the endpoints), and
   never aggregates over pod endpoints over https (the certificate cannot name pod IPs).
4. A self-test: a few broken copies (a misspelt field in each kind of check) must fail,
   so a check that silently stopped checking is caught too.

With kubectl on the PATH, `kubectl kustomize` also renders each kustomization, and the
result is validated the same way and compared with this script's own resolution, so that
the patches checked are the patches kustomize applies (without kubectl, that step is
skipped with a note).
"""

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonpatch
import jsonpointer
import jsonschema
import kubernetes_validate
import yaml

K8S_VERSION = os.environ.get("K8S_VERSION", "1.31")

# The fields of GET /scaling (balancer/src/autoscale/controller.rs, ScalingStatus and the
# Decision it flattens) that a scaler can read as a number.
SCALING_NUMBERS = {
    "current", "ready", "coming", "leaving", "total_load", "load_per_worker", "desired",
    "load_now", "target_load", "min_workers", "max_workers", "busy_total", "stable_demand",
    "panic_demand", "headroom_demand", "startup_s", "target_utilization",
}

# /scaling fields and gauges counted in workers: a scaler on them divides by 1.
IN_WORKERS = {"desired", "stable_demand", "panic_demand", "headroom_demand",
              "tidepool_desired_workers", "tidepool_demand_stable_workers"}

# Kinds without a namespace, which kustomize's `namespace:` leaves alone.
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253}

# keda.sh/v1alpha1 ScaledObject, as https://keda.sh/docs/latest/reference/scaledobject-spec/
# documents it; `behavior` is left to the core HPA schema (see check_scaled_object).
SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": _NAME,
                "namespace": _NAME,
                "labels": _STRING_MAP,
                "annotations": _STRING_MAP,
            },
        },
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "name": _NAME,
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "fallback": {
                    "type": "object",
                    "required": ["failureThreshold", "replicas"],
                    "additionalProperties": False,
                    "properties": {
                        "failureThreshold": {"type": "integer", "minimum": 1},
                        "replicas": {"type": "integer", "minimum": 0},
                        "behavior": {"type": "string"},
                    },
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": _NAME,
                                "behavior": {"type": "object"},
                            },
                        },
                        "scalingModifiers": {"type": "object"},
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string", "minLength": 1},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "metadata": _STRING_MAP,
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string"}, "kind": {"type": "string"}},
                            },
                        },
                        # The trigger this pool uses, checked field by field.
                        "if": {"properties": {"type": {"const": "metrics-api"}}},
                        "then": {"properties": {"metadata": {
                            "type": "object",
                            "required": ["url", "valueLocation", "targetValue"],
                            "additionalProperties": False,
                            "properties": {
                                "url": {"type": "string", "pattern": r"^https?://[^/\s]+(/\S*)?$"},
                                "format": {"enum": ["json", "xml", "yaml", "prometheus"]},
                                "valueLocation": {"type": "string", "minLength": 1},
                                "targetValue": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                                "activationTargetValue": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?$"},
                                "authMode": {"type": "string"},
                                "method": {"enum": ["GET", "POST"]},
                                "unsafeSsl": {"enum": ["true", "false"]},
                                "aggregateFromKubeServiceEndpoints": {"enum": ["true", "false"]},
                                "aggregationType": {"enum": ["average", "sum", "max", "min"]},
                            },
                        }}},
                    },
                },
            },
        },
    },
}


# keda.sh/v1alpha1 TriggerAuthentication, as https://keda.sh/docs/latest/concepts/authentication/
# documents it: only the Secret-backed form is used here, the other sources rejected so
# that a misspelt key fails.
_SECRET_REF = {
    "type": "object",
    "required": ["parameter", "name", "key"],
    "additionalProperties": False,
    "properties": {"parameter": {"type": "string", "minLength": 1}, "name": _NAME,
                   "key": {"type": "string", "minLength": 1}},
}
TRIGGER_AUTHENTICATION = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": SCALED_OBJECT["properties"]["metadata"],
        "spec": {
            "type": "object",
            "required": ["secretTargetRef"],
            "additionalProperties": False,
            "properties": {"secretTargetRef": {"type": "array", "minItems": 1, "items": _SECRET_REF}},
        },
    },
}


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def where(doc):
    meta = doc.get("metadata") or {}
    return f"{doc.get('kind')}/{meta.get('name')}"


def check_schema(doc, schema, errors, origin):
    validator = jsonschema.Draft202012Validator(schema)
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
        path = ".".join(str(p) for p in e.path)
        errors.append(f"{origin}: {where(doc)}: {path}: {e.message}")


def check_scaled_object(doc, errors, origin):
    check_schema(doc, SCALED_OBJECT, errors, origin)
    behavior = (((doc.get("spec") or {}).get("advanced") or {})
                .get("horizontalPodAutoscalerConfig") or {}).get("behavior")
    if isinstance(behavior, dict):
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "behavior-check"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                "maxReplicas": 1,
                "behavior": behavior,
            },
        }
        check_core(hpa, errors, f"{origin}: {where(doc)}: advanced.horizontalPodAutoscalerConfig")


def check_core(doc, errors, origin):
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        errors.append(f"{origin}: {where(doc)}: {path}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError:
        errors.append(f"{origin}: {where(doc)}: no schema for {doc.get('apiVersion')} "
                      f"{doc.get('kind')} in Kubernetes {K8S_VERSION} (a CRD? add a schema "
                      "to scripts/validate-k8s.py)")


def check_doc(doc, errors, origin):
    if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
        errors.append(f"{origin}: not a Kubernetes object (no kind or apiVersion)")
        return
    if doc["kind"] == "ScaledObject":
        check_scaled_object(doc, errors, origin)
    elif doc["kind"] == "TriggerAuthentication":
        check_schema(doc, TRIGGER_AUTHENTICATION, errors, origin)
    else:
        check_core(doc, errors, origin)


def resolve(kdir, errors, seen=None):
    """The resources of the kustomization in `kdir`, as (file, doc) pairs."""
    seen = set() if seen is None else seen
    kfile = kdir / "kustomization.yaml"
    if not kfile.exists():
        errors.append(f"{kdir}: no kustomization.yaml")
        return []
    [k] = load_docs(kfile)
    allowed = {"apiVersion", "kind", "namespace", "resources", "images", "labels",
               "commonLabels", "patches", "configMapGenerator"}
    for key in set(k) - allowed:
        errors.append(f"{kfile}: unexpected field {key!r}")
    if k.get("kind") != "Kustomization":
        errors.append(f"{kfile}: kind is not Kustomization")
    out = []
    for res in k.get("resources") or []:
        path = (kdir / res).resolve()
        if path.is_dir():
            out.extend(resolve(path, errors, seen))
        elif path.is_file():
            seen.add(path)
            out.extend((path, d) for d in load_docs(path))
        else:
            errors.append(f"{kfile}: resource {res} does not exist")
    if "namespace" in k:
        for _, d in out:
            if d.get("kind") not in CLUSTER_SCOPED:
                d.setdefault("metadata", {})["namespace"] = k["namespace"]
    for patch in k.get("patches") or []:
        out = apply_patch(kfile, patch, out, errors)
    for image in k.get("images") or []:
        for _, d in out:
            set_image(d, image)
    return out


def targets(target, doc):
    """Whether a patch's `target` (kind, name, namespace, group, version) selects `doc`."""
    group, _, version = doc.get("apiVersion", "").rpartition("/")
    meta = doc.get("metadata") or {}
    have = {"kind": doc.get("kind"), "name": meta.get("name"), "namespace": meta.get("namespace"),
            "group": group, "version": version}
    return all(have.get(key) == want for key, want in target.items())


def apply_patch(kfile, patch, docs, errors):
    """`docs` with one `patches:` entry applied: a JSON 6902 patch (inline or a file)."""
    if "patch" in patch:
        ops = yaml.safe_load(patch["patch"])
    else:
        path = kfile.parent / patch.get("path", "")
        if not path.is_file():
            errors.append(f"{kfile}: patch {patch.get('path')} does not exist")
            return docs
        ops = yaml.safe_load(path.read_text())
    if not isinstance(ops, list):
        errors.append(f"{kfile}: a strategic-merge patch: only JSON 6902 patches (a list of "
                      "ops) are applied by this check; write it as one")
        return docs
    target = patch.get("target") or {}
    if not any(targets(target, d) for _, d in docs):
        errors.append(f"{kfile}: patch target {target} matches no resource")
    out = []
    for f, d in docs:
        if targets(target, d):
            try:
                d = jsonpatch.apply_patch(d, ops)
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
                errors.append(f"{kfile}: patch on {where(d)} does not apply: {str(e).split(' in {')[0]}")
        out.append((f, d))
    return out


def set_image(doc, image):
    """kustomize's `images:` entry on a workload's containers: name matched without the tag."""
    pod = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    for c in (pod.get("containers") or []) + (pod.get("initContainers") or []):
        name, tag = split_image(c.get("image", ""))
        if name == image.get("name"):
            tag = image.get("newTag", tag)
            c["image"] = image.get("newName", name) + (f":{tag}" if tag else "")


def split_image(ref):
    """(name, tag) of an image reference; a registry's :port is part of the name."""
    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, None
    return name, tag


def flag(container, name):
    """The value of `--name=V` (or `--name V`) in a container's command and args."""
    words = (container.get("command") or []) + (container.get("args") or [])
    for i, w in enumerate(words):
        if w.startswith(f"--{name}="):
            return w.split("=", 1)[1]
        if w == f"--{name}" and i + 1 < len(words):
            return words[i + 1]
    return None


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def check_set(name, docs, errors):
    """Cross-checks one kustomization's resources."""
    def find(kind):
        return [d for d in docs if d.get("kind") == kind]

    def ns(d):
        return (d.get("metadata") or {}).get("namespace", "default")

    deployments = {d["metadata"]["name"]: d for d in find("Deployment")}
    services = {d["metadata"]["name"]: d for d in find("Service")}
    bad = lambda msg: errors.append(f"{name}: {msg}")  # noqa: E731

    for dname, d in deployments.items():
        labels = d["spec"]["template"]["metadata"].get("labels") or {}
        for k, v in (d["spec"]["selector"].get("matchLabels") or {}).items():
            if labels.get(k) != v:
                bad(f"Deployment/{dname}: selector {k}={v} does not match the pod labels {labels}")
    for sname, s in services.items():
        sel = s["spec"].get("selector") or {}
        if not any(all((d["spec"]["template"]["metadata"].get("labels") or {}).get(k) == v
                       for k, v in sel.items()) for d in deployments.values()):
            bad(f"Service/{sname}: selector {sel} matches no Deployment's pods")

    balancer = deployments.get("tidepool-balancer")
    worker = deployments.get("tidepool-worker")
    if not balancer or not worker:
        bad("needs Deployments tidepool-balancer and tidepool-worker")
        return
    bc = balancer["spec"]["template"]["spec"]["containers"][0]
    wc = worker["spec"]["template"]["spec"]["containers"][0]

    # The balancer finds the workers through a headless Service, on their --listen port.
    dns = flag(bc, "target-dns")
    m = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", dns or "")
    if not m:
        bad(f"balancer --target-dns {dns!r} is not SERVICE.NAMESPACE.svc.cluster.local:PORT")
    else:
        svc = services.get(m[1])
        if svc is None or ns(svc) != m[2]:
            bad(f"balancer --target-dns names Service {m[1]} in namespace {m[2]}: not here")
        else:
            if svc["spec"].get("clusterIP") != "None":
                bad(f"Service/{m[1]} must be headless (clusterIP: None) for --target-dns")
            if int(m[3]) not in [p["port"] for p in svc["spec"]["ports"]]:
                bad(f"Service/{m[1]} has no port {m[3]}")
            if int(m[3]) != port_of(flag(wc, "listen")):
                bad(f"--target-dns port {m[3]} is not the worker's --listen port")
    listen = port_of(flag(wc, "listen"))
    for probe in ("startupProbe", "readinessProbe"):
        cmd = ((wc.get(probe) or {}).get("exec") or {}).get("command") or []
        if cmd[:2] != ["tidepool-probe", "ping"] or port_of(cmd[2]) != listen:
            bad(f"worker {probe} must be `tidepool-probe ping 127.0.0.1:{listen}`, not {cmd}")
    grace = worker["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    pre_stop = (((wc.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
    drain = flag(wc, "drain-timeout") or "30s"
    drain_s = int(re.fullmatch(r"(\d+)s", drain)[1])
    if grace <= pre_stop + drain_s:
        bad(f"worker terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop}s "
            f"+ --drain-timeout {drain}")

    check_gpu(worker, bc, bad)
    check_admin_token(balancer, bc, docs, bad)
    check_admin_tls(balancer, bc, docs, bad)
    check_side_by_side(balancer, bc, docs, bad)
    check_network_policies(deployments, balancer, worker, bc, wc, find("NetworkPolicy"), bad)

    # The scaler: the worker Deployment, the balancer's bounds and target.
    target_load = float(flag(bc, "target-load") or 32)
    bounds = (int(flag(bc, "min-workers") or 1), int(flag(bc, "max-workers") or 8))
    scalers = find("ScaledObject") + find("HorizontalPodAutoscaler")
    if len(scalers) != 1:
        bad(f"exactly one scaler (ScaledObject or HPA) per set, found {len(scalers)}")
    for s in scalers:
        spec = s["spec"]
        ref = spec.get("scaleTargetRef") or {}
        if ref.get("name") != "tidepool-worker" or ns(s) != ns(worker):
            bad(f"{where(s)} scales {ref.get('name')!r}, not the worker Deployment")
        if s["kind"] == "ScaledObject":
            got = (spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100))
            for t in spec.get("triggers") or []:
                meta = t.get("metadata") or {}
                if t.get("type") != "metrics-api":
                    continue
                if t.get("metricType", "AverageValue") != "AverageValue":
                    bad(f"{where(s)}: metricType must be AverageValue (replicas = value / targetValue)")
                if meta.get("valueLocation") not in SCALING_NUMBERS:
                    bad(f"{where(s)}: valueLocation {meta.get('valueLocation')!r} is not a number "
                        f"field of /scaling {sorted(SCALING_NUMBERS)}")
                if meta.get("valueLocation") in ("total_load", "load_now") and \
                        float(meta.get("targetValue", "nan")) != target_load:
                    bad(f"{where(s)}: targetValue {meta.get('targetValue')} is not the balancer's "
                        f"--target-load {target_load:g}")
                if meta.get("valueLocation") in IN_WORKERS and float(meta.get("targetValue", "nan")) != 1:
                    bad(f"{where(s)}: {meta.get('valueLocation')} counts workers: targetValue must be 1")
                check_keda_tls(s, t, docs, bad)
                u = re.fullmatch(r"https?://([a-z0-9-]+)(?:\.([a-z0-9-]+)(?:\.svc\.cluster\.local)?)?:(\d+)/scaling",
                                 meta.get("url", ""))
                if not u:
                    bad(f"{where(s)}: url {meta.get('url')!r} is not https://SERVICE.NAMESPACE"
                        ".svc.cluster.local:PORT/scaling")
                    continue
                svc = services.get(u[1])
                admin = port_of(flag(bc, "admin"))
                if svc is None or (u[2] and ns(svc) != u[2]):
                    bad(f"{where(s)}: url names Service {u[1]}, which is not here")
                elif not any(p["port"] == int(u[3]) and p.get("targetPort") in (admin, "admin")
                             for p in svc["spec"]["ports"]):
                    bad(f"{where(s)}: Service/{u[1]} port {u[3]} does not lead to the admin port {admin}")
        else:
            got = (spec.get("minReplicas", 1), spec.get("maxReplicas"))
            for metric in spec.get("metrics") or []:
                ext = metric.get("external") or {}
                name_ = (ext.get("metric") or {}).get("name")
                if name_ not in ("tidepool_load_total", "tidepool_desired_workers",
                                 "tidepool_demand_stable_workers"):
                    bad(f"{where(s)}: metric {name_!r} is not a balancer gauge the adapter serves")
                if name_ in IN_WORKERS and \
                        float((ext.get("target") or {}).get("averageValue", "nan")) != 1:
                    bad(f"{where(s)}: {name_} counts workers: averageValue must be 1")
                if name_ == "tidepool_load_total" and \
                        float((ext.get("target") or {}).get("averageValue", "nan")) != target_load:
                    bad(f"{where(s)}: averageValue is not the balancer's --target-load {target_load:g}")
        if got != bounds:
            bad(f"{where(s)}: replicas {got} differ from the balancer's --min/--max-workers {bounds}")


def check_admin_token(balancer, bc, docs, bad):
    """Beyond loopback the balancer needs --admin-token-file, from a Secret of the set."""
    admin = flag(bc, "admin") or "127.0.0.1:7001"
    if admin.startswith("127.") or admin.startswith("[::1]"):
        return
    path = flag(bc, "admin-token-file")
    if not path:
        bad(f"balancer --admin={admin} is beyond loopback without --admin-token-file: it "
            "refuses to start (mount the token from a Secret)")
        return
    pod = balancer["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    mount = next((m for m in bc.get("volumeMounts") or []
                  if path.startswith(m["mountPath"].rstrip("/") + "/")), None)
    if mount is None:
        bad(f"balancer --admin-token-file={path} is on no volume mount")
        return
    secret = (volumes.get(mount["name"]) or {}).get("secret")
    if not secret:
        bad(f"balancer --admin-token-file={path}: volume {mount['name']} is not a Secret")
        return
    key = path[len(mount["mountPath"].rstrip("/")) + 1:]
    found = [d for d in docs if d.get("kind") == "Secret"
             and d["metadata"]["name"] == secret.get("secretName")]
    if not found:
        bad(f"balancer mounts Secret {secret.get('secretName')!r}, which is not in the set")
    elif key not in {**(found[0].get("stringData") or {}), **(found[0].get("data") or {})}:
        bad(f"Secret/{secret.get('secretName')} has no key {key!r} (--admin-token-file={path})")


def secret_file(pod, container, path, docs):
    """Where a file `path` of `container` comes from: (None, why not) when it is on no Secret
    volume of the set with that key, else (secret name, None)."""
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    mount = next((m for m in container.get("volumeMounts") or []
                  if path.startswith(m["mountPath"].rstrip("/") + "/")), None)
    if mount is None:
        return None, f"{path} is on no volume mount"
    secret = (volumes.get(mount["name"]) or {}).get("secret")
    if not secret:
        return None, f"{path}: volume {mount['name']} is not a Secret"
    rel = path[len(mount["mountPath"].rstrip("/")) + 1:]
    items = secret.get("items")
    key = next((i["key"] for i in items if i["path"] == rel), None) if items else rel
    if key is None:
        return None, f"{path}: Secret {secret.get('secretName')!r}'s items give no file {rel!r}"
    found = [d for d in docs if d.get("kind") == "Secret"
             and d["metadata"]["name"] == secret.get("secretName")]
    if not found:
        return None, f"{path}: Secret {secret.get('secretName')!r} is not in the set"
    if key not in {**(found[0].get("stringData") or {}), **(found[0].get("data") or {})}:
        return None, f"{path}: Secret {secret.get('secretName')!r} has no key {key!r}"
    return secret.get("secretName"), None


def check_admin_tls(balancer, bc, docs, bad):
    """The admin API serves TLS, and its callers (kubelet probes, Prometheus) speak it."""
    pod = balancer["spec"]["template"]["spec"]
    admin = port_of(flag(bc, "admin") or "127.0.0.1:7001")
    for name in ("admin-tls-cert", "admin-tls-key"):
        path = flag(bc, name)
        if not path:
            bad(f"balancer runs the admin API without --{name}: the token and /targets would "
                "cross the network in clear (serve it over TLS)")
            continue
        _, why = secret_file(pod, bc, path, docs)
        if why:
            bad(f"balancer --{name}: {why}")
    admin_names = {admin} | {p.get("name") for p in bc.get("ports") or [] if p["containerPort"] == admin}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = (bc.get(probe) or {}).get("httpGet")
        if get and get.get("port") in admin_names and get.get("scheme", "HTTP") != "HTTPS":
            bad(f"balancer {probe} probes the TLS admin port with scheme "
                f"{get.get('scheme', 'HTTP')}: want `scheme: HTTPS`")
    notes = balancer["spec"]["template"]["metadata"].get("annotations") or {}
    if notes.get("prometheus.io/scrape") == "true" and \
            str(notes.get("prometheus.io/port")) in {str(admin)} | {str(n) for n in admin_names}:
        if notes.get("prometheus.io/scheme") != "https":
            bad("balancer pods are scraped on the TLS admin port: want the annotation "
                "prometheus.io/scheme: https")


def check_keda_tls(scaled, trigger, docs, bad):
    """A metrics-api trigger reads https:// with the CA from a TriggerAuthentication."""
    meta = trigger.get("metadata") or {}
    url = meta.get("url", "")
    if not url.startswith("https://"):
        bad(f"{where(scaled)}: url {url!r}: the admin API serves only TLS, read https://")
    if meta.get("unsafeSsl") == "true":
        bad(f"{where(scaled)}: unsafeSsl skips the balancer's certificate check: give the CA instead")
    if meta.get("aggregateFromKubeServiceEndpoints") == "true":
        if meta.get("valueLocation") in IN_WORKERS and meta.get("aggregationType", "average") == "sum":
            bad(f"{where(scaled)}: `sum` over balancers of {meta.get('valueLocation')!r}, which each "
                "balancer already gives for the whole pool: it would count the pool once per "
                "balancer (use max, or read one)")
        if url.startswith("https://"):
            bad(f"{where(scaled)}: aggregateFromKubeServiceEndpoints dials pod IPs, which the "
                "balancer's certificate cannot name: read the Service")
    ref = (trigger.get("authenticationRef") or {}).get("name")
    if meta.get("authMode") != "tls" or not ref:
        bad(f"{where(scaled)}: an https trigger needs `authMode: tls` and an authenticationRef "
            "whose TriggerAuthentication gives the CA (`ca`)")
        return
    auths = [d for d in docs if d.get("kind") == "TriggerAuthentication"
             and d["metadata"]["name"] == ref]
    if not auths:
        bad(f"{where(scaled)}: authenticationRef {ref!r} is no TriggerAuthentication of the set")
        return
    refs = {r.get("parameter"): r for r in (auths[0].get("spec") or {}).get("secretTargetRef") or []}
    for param in ("ca", "cert", "key"):  # KEDA's tls mode refuses to start without all three
        r = refs.get(param)
        if r is None:
            bad(f"{where(auths[0])}: no `{param}` parameter (KEDA's authMode tls needs ca, cert and key)")
            continue
        found = [d for d in docs if d.get("kind") == "Secret" and d["metadata"]["name"] == r.get("name")]
        if not found or r.get("key") not in {**(found[0].get("stringData") or {}),
                                              **(found[0].get("data") or {})}:
            bad(f"{where(auths[0])}: `{param}` names Secret {r.get('name')!r} key {r.get('key')!r}, "
                "which the set does not have")


def check_side_by_side(balancer, bc, docs, bad):
    """Two balancers or more, rolled one at a time, kept through drains, spread over nodes."""
    spec = balancer["spec"]
    pod_labels = spec["template"]["metadata"].get("labels") or {}
    if spec.get("replicas", 1) < 2:
        bad(f"balancer replicas {spec.get('replicas', 1)}: run two or more side by side (one is "
            "a single point of failure)")
    strategy = spec.get("strategy") or {}
    if strategy.get("type", "RollingUpdate") != "RollingUpdate":
        bad(f"balancer strategy {strategy.get('type')}: want RollingUpdate (Recreate stops every "
            "balancer at once)")
    else:
        rolling = strategy.get("rollingUpdate") or {}
        unavailable = str(rolling.get("maxUnavailable", "25%"))
        surge = str(rolling.get("maxSurge", "25%"))
        if unavailable not in ("0", "1"):
            bad(f"balancer rollingUpdate.maxUnavailable {unavailable}: want 0 or 1")
        if unavailable == "0" and surge in ("0", "0%"):
            bad("balancer rollingUpdate: maxUnavailable 0 needs a maxSurge above 0")
    pdbs = [d for d in docs if d.get("kind") == "PodDisruptionBudget"
            and selects(d["spec"].get("selector") or {}, pod_labels)]
    if not pdbs:
        bad("no PodDisruptionBudget selects the balancer pods: a node drain may evict both")
    for pdb in pdbs:
        if str(pdb["spec"].get("minAvailable")) != "1" and str(pdb["spec"].get("maxUnavailable")) != "1":
            bad(f"{where(pdb)}: want minAvailable 1 (or maxUnavailable 1) over the balancers")
    anti = ((spec["template"]["spec"].get("affinity") or {}).get("podAntiAffinity") or {})
    terms = [t.get("podAffinityTerm") or {} for t in
             anti.get("preferredDuringSchedulingIgnoredDuringExecution") or []]
    if not any(t.get("topologyKey") == "kubernetes.io/hostname"
               and selects(t.get("labelSelector") or {}, pod_labels) for t in terms):
        bad("balancer pods have no preferred pod anti-affinity by kubernetes.io/hostname over "
            "their own labels: both may land on one node")
    if any(w == "--autoscale" or w.startswith("--autoscale=") for w in
           (bc.get("command") or []) + (bc.get("args") or [])):
        bad("balancer runs --autoscale: with several replicas each would act; KEDA or the HPA "
            "is the one actuator here")


def selects(selector, labels):
    """Whether a label selector (matchLabels, matchExpressions In/NotIn/Exists) selects."""
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        have = labels.get(e["key"])
        op = e["operator"]
        if (op == "In" and have not in e.get("values", [])) or \
                (op == "NotIn" and have in e.get("values", [])) or \
                (op == "Exists" and have is None) or (op == "DoesNotExist" and have is not None):
            return False
    return True


def check_network_policies(deployments, balancer, worker, bc, wc, policies, bad):
    """Policies select real pods and ports; workers and the admin API are fenced in."""
    def pod_labels(d):
        return d["spec"]["template"]["metadata"].get("labels") or {}

    def ports_of(d):
        out = set()
        for c in d["spec"]["template"]["spec"]["containers"]:
            for p in c.get("ports") or []:
                out |= {p["containerPort"], p.get("name")}
        return out - {None}

    if not policies:
        bad("no NetworkPolicy: every pod of the cluster could reach the workers and the admin API")
        return
    for pol in policies:
        spec = pol["spec"]
        selected = [d for d in deployments.values() if selects(spec.get("podSelector") or {}, pod_labels(d))]
        if not selected:
            bad(f"{where(pol)}: podSelector {spec.get('podSelector')} selects no pods here")
        for rule in spec.get("ingress") or []:
            for port in rule.get("ports") or []:
                for d in selected:
                    if port.get("port") is not None and port["port"] not in ports_of(d):
                        bad(f"{where(pol)}: port {port['port']!r} is not a port of "
                            f"Deployment/{d['metadata']['name']}'s pods")
            for peer in rule.get("from") or []:
                if "podSelector" in peer and "namespaceSelector" not in peer and not any(
                        selects(peer["podSelector"], pod_labels(d)) for d in deployments.values()):
                    bad(f"{where(pol)}: from podSelector {peer['podSelector']} selects no pods here")

    def fenced(d, port_names, allowed, what):
        """Every rule of a policy selecting `d` that opens one of `port_names` admits only
        peers `allowed` accepts; and some policy selects `d` at all."""
        mine = [p for p in policies if selects(p["spec"].get("podSelector") or {}, pod_labels(d))
                and "Ingress" in (p["spec"].get("policyTypes") or ["Ingress"])]
        if not mine:
            bad(f"no NetworkPolicy selects Deployment/{d['metadata']['name']}: {what}")
            return
        for pol in mine:
            for rule in pol["spec"].get("ingress") or []:
                ports = {p.get("port") for p in rule.get("ports") or []}
                if ports and not ports & port_names:
                    continue
                peers = rule.get("from") or []
                if not peers or not all(allowed(peer) for peer in peers):
                    bad(f"{where(pol)}: a rule opens {sorted(map(str, port_names))} to "
                        f"{peers or 'everyone'}: {what}")

    listen = port_of(flag(wc, "listen") or ":7100")
    worker_ports = {listen} | {p.get("name") for c in worker["spec"]["template"]["spec"]["containers"]
                               for p in c.get("ports") or [] if p["containerPort"] == listen}
    fenced(worker, worker_ports,
           lambda peer: set(peer) == {"podSelector"} and selects(peer["podSelector"], pod_labels(balancer)),
           "only the balancer may reach the workers' port")
    admin = port_of(flag(bc, "admin") or ":7001")
    admin_ports = {admin} | {p.get("name") for p in bc.get("ports") or [] if p["containerPort"] == admin}
    fenced(balancer, admin_ports,
           lambda peer: "namespaceSelector" in peer and (peer["namespaceSelector"] or {}) != {},
           "only the monitoring/KEDA namespaces may reach the admin port")


def check_gpu(worker, bc, bad):
    """A worker on a GPU: one GPU, `--device=cuda`, the GPU image, a way onto GPU nodes."""
    pod = worker["spec"]["template"]["spec"]
    wc = pod["containers"][0]
    res = wc.get("resources") or {}
    limit = (res.get("limits") or {}).get("nvidia.com/gpu")
    request = (res.get("requests") or {}).get("nvidia.com/gpu")
    device = flag(wc, "device") or next((e.get("value") for e in wc.get("env") or []
                                         if e.get("name") == "TIDEPOOL_WORKER_DEVICE"), None)
    if limit is None and request is None and device != "cuda":
        return  # a CPU worker
    if str(limit) != "1" or request not in (None, limit):
        bad(f"worker: nvidia.com/gpu limit {limit!r} (request {request!r}): want a limit of 1, "
            "one GPU per pod (a worker runs one session on one device)")
    if device != "cuda":
        bad(f"worker asks for a GPU but runs --device={device or 'auto'}: want --device=cuda, "
            "so that a pod whose GPU does not work fails instead of running on CPU")
    if split_image(wc.get("image", ""))[0] == split_image(bc.get("image", ""))[0]:
        bad(f"GPU worker runs {wc.get('image')!r}, the balancer's CPU image: want the GPU "
            "image (Dockerfile.gpu)")
    if not pod.get("nodeSelector") and not pod.get("affinity"):
        bad("GPU worker has no nodeSelector (or affinity) for GPU nodes")
    if not any(t.get("key") == "nvidia.com/gpu" and t.get("effect") in (None, "", "NoSchedule")
               and (t.get("operator") == "Exists" or "value" in t)
               for t in pod.get("tolerations") or []):
        bad("GPU worker tolerates no `nvidia.com/gpu:NoSchedule` taint, which GPU nodes carry")


def validate_dir(root):
    errors = []
    files = sorted(p for p in root.rglob("*.y*ml") if p.name != "kustomization.yaml")
    for path in files:
        for doc in load_docs(path):
            check_doc(doc, errors, path.relative_to(root))
    sets = {}
    reached = set()
    kdirs = [k.parent for k in sorted(root.rglob("kustomization.yaml"))]
    # The top-level sets: kustomizations no other one includes (`base` and `keda` are
    # parts of several), with a scaler.
    parts = {(kdir / res).resolve() for kdir in kdirs
             for res in (load_docs(kdir / "kustomization.yaml")[0].get("resources") or [])}
    for kdir in kdirs:
        if kdir.resolve() in parts:
            continue  # resolved, and its errors shown, as part of the sets that include it
        resources = resolve(kdir, errors, reached)
        if any(d.get("kind") in ("ScaledObject", "HorizontalPodAutoscaler") for _, d in resources):
            sets[str(kdir.relative_to(root)) or "."] = [d for _, d in resources]
    for path in files:
        if path.resolve() not in reached:
            errors.append(f"{path.relative_to(root)}: in no kustomization")
    if not sets:
        errors.append("no kustomization with a scaler")
    for name, docs in sets.items():
        check_set(name, docs, errors)
    return errors, files, sets


def rendered(root, sets):
    """`kubectl kustomize` of each set, validated like the files; None without kubectl."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        return None
    errors = []
    for name in sets:
        out = subprocess.run([kubectl, "kustomize", str(root / name)], capture_output=True,
                             text=True, timeout=60)
        if out.returncode != 0:
            errors.append(f"kubectl kustomize {name}: {out.stderr.strip()}")
            continue
        docs = [d for d in yaml.safe_load_all(out.stdout) if d]
        for doc in docs:
            check_doc(doc, errors, f"kustomize {name}")
        check_set(f"kustomize {name}", docs, errors)
        # This script's resolution (patches, images, namespace) must be kustomize's, or the
        # checks above looked at something else than what a cluster gets.
        ours = {key(d): d for d in sets[name]}
        for doc in docs:
            if ours.get(key(doc)) != doc:
                errors.append(f"kustomize {name}: {where(doc)} differs from this script's "
                              "resolution of the same kustomization (fix resolve())")
        if len(docs) != len(ours):
            errors.append(f"kustomize {name}: {len(docs)} objects, this script resolved {len(ours)}")
    return errors


def key(doc):
    meta = doc.get("metadata") or {}
    return (doc.get("kind"), meta.get("namespace"), meta.get("name"))


def self_test(sets):
    """Broken copies that must fail; returns the mutations that passed anyway."""
    def mutate(kind, change, pick=None):
        for name, docs in sets.items():
            for i, d in enumerate(docs):
                if d.get("kind") == kind and (pick is None or pick(d)):
                    broken = copy.deepcopy(docs)
                    change(broken[i])
                    errors = []
                    for doc in broken:
                        check_doc(doc, errors, "self-test")
                    check_set("self-test", broken, errors)
                    return bool(errors)
        # That kind is not here: nothing to break. A picked one (the GPU worker) must be.
        return pick is None

    def rename(obj, old, new):
        obj[new] = obj.pop(old)

    wc = lambda d: d["spec"]["template"]["spec"]["containers"][0]  # noqa: E731
    gpu = lambda d: "nvidia.com/gpu" in (wc(d).get("resources") or {}).get("limits", {})  # noqa: E731
    balancer = lambda d: d["metadata"]["name"] == "tidepool-balancer"  # noqa: E731
    cases = {
        "Deployment field misspelt (image -> imagee)":
            ("Deployment", lambda d: rename(wc(d), "image", "imagee")),
        "Service port as a string":
            ("Service", lambda d: d["spec"]["ports"][0].update(port="7000")),
        "ScaledObject trigger key misspelt (valueLocation -> valueLocaton)":
            ("ScaledObject", lambda d: rename(d["spec"]["triggers"][0]["metadata"],
                                              "valueLocation", "valueLocaton")),
        "ScaledObject spec key misspelt (maxReplicaCount -> maxReplicas)":
            ("ScaledObject", lambda d: rename(d["spec"], "maxReplicaCount", "maxReplicas")),
        "ScaledObject behavior misspelt (scaleDown -> scaledown)":
            ("ScaledObject", lambda d: rename(
                d["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
                "scaleDown", "scaledown")),
        "ScaledObject scales another Deployment":
            ("ScaledObject", lambda d: d["spec"]["scaleTargetRef"].update(name="tidepool-workers")),
        "ScaledObject reads a field /scaling lacks":
            ("ScaledObject", lambda d: d["spec"]["triggers"][0]["metadata"].update(
                valueLocation="total")),
        "HPA target misspelt (averageValue -> averagevalue)":
            ("HorizontalPodAutoscaler", lambda d: rename(
                d["spec"]["metrics"][0]["external"]["target"], "averageValue", "averagevalue")),
        "GPU worker without its GPU limit":
            ("Deployment", lambda d: wc(d)["resources"]["limits"].pop("nvidia.com/gpu"), gpu),
        "GPU worker with two GPUs":
            ("Deployment", lambda d: wc(d)["resources"]["limits"].update({"nvidia.com/gpu": 2}), gpu),
        "GPU worker on --device=auto":
            ("Deployment", lambda d: wc(d).update(command=[
                "--device=auto" if w == "--device=cuda" else w for w in wc(d)["command"]]), gpu),
        "GPU worker on the CPU image":
            ("Deployment", lambda d: wc(d).update(image="tidepool:local"), gpu),
        "GPU worker without a node selector":
            ("Deployment", lambda d: d["spec"]["template"]["spec"].pop("nodeSelector"), gpu),
        "GPU worker without its toleration":
            ("Deployment", lambda d: d["spec"]["template"]["spec"].pop("tolerations"), gpu),
        "balancer beyond loopback without its token file":
            ("Deployment", lambda d: wc(d).update(command=[
                w for w in wc(d)["command"] if not w.startswith("--admin-token-file")]),
             lambda d: d["metadata"]["name"] == "tidepool-balancer"),
        "token Secret without the key the balancer reads":
            ("Secret", lambda d: rename(d["stringData"], "admin.token", "token"),
             lambda d: d["metadata"]["name"] == "tidepool-admin-token"),
        "NetworkPolicy selecting no pods":
            ("NetworkPolicy", lambda d: d["spec"]["podSelector"]["matchLabels"].update(
                {"app.kubernetes.io/name": "tidepool-workers"}),
             lambda d: d["metadata"]["name"] == "tidepool-worker"),
        "NetworkPolicy naming a port the pods lack":
            ("NetworkPolicy", lambda d: d["spec"]["ingress"][0]["ports"][0].update(port="proto"),
             lambda d: d["metadata"]["name"] == "tidepool-worker"),
        "workers' port open to everyone":
            ("NetworkPolicy", lambda d: d["spec"]["ingress"][0].pop("from"),
             lambda d: d["metadata"]["name"] == "tidepool-worker"),
        "admin port open to everyone":
            ("NetworkPolicy", lambda d: d["spec"]["ingress"][1].pop("from"),
             lambda d: d["metadata"]["name"] == "tidepool-balancer"),
        "admin API without TLS":
            ("Deployment", lambda d: wc(d).update(command=[
                w for w in wc(d)["command"] if not w.startswith("--admin-tls-")]), balancer),
        "admin TLS key on no Secret":
            ("Deployment", lambda d: wc(d).update(command=[
                "--admin-tls-key=/tmp/balancer.key" if w.startswith("--admin-tls-key") else w
                for w in wc(d)["command"]]), balancer),
        "readiness probe in plain HTTP on the TLS admin port":
            ("Deployment", lambda d: wc(d)["readinessProbe"]["httpGet"].pop("scheme"), balancer),
        "liveness probe in plain HTTP on the TLS admin port":
            ("Deployment", lambda d: wc(d)["livenessProbe"]["httpGet"].update(scheme="HTTP"), balancer),
        "Prometheus scraping the TLS admin port in plain HTTP":
            ("Deployment", lambda d: d["spec"]["template"]["metadata"]["annotations"].pop(
                "prometheus.io/scheme"), balancer),
        "KEDA reading the admin API in plain HTTP":
            ("ScaledObject", lambda d: d["spec"]["triggers"][0]["metadata"].update(
                url=d["spec"]["triggers"][0]["metadata"]["url"].replace("https://", "http://"))),
        "KEDA skipping the certificate check":
            ("ScaledObject", lambda d: d["spec"]["triggers"][0]["metadata"].update(unsafeSsl="true")),
        "KEDA without the CA's TriggerAuthentication":
            ("ScaledObject", lambda d: d["spec"]["triggers"][0].pop("authenticationRef")),
        "TriggerAuthentication without the CA":
            ("TriggerAuthentication", lambda d: d["spec"].update(secretTargetRef=[
                r for r in d["spec"]["secretTargetRef"] if r["parameter"] != "ca"])),
        "TriggerAuthentication key misspelt (secretTargetRef -> secretTargetRefs)":
            ("TriggerAuthentication", lambda d: rename(d["spec"], "secretTargetRef", "secretTargetRefs")),
        "KEDA summing `desired` over the balancers":
            ("ScaledObject", lambda d: d["spec"]["triggers"][0]["metadata"].update(
                aggregateFromKubeServiceEndpoints="true", aggregationType="sum")),
        "one balancer replica":
            ("Deployment", lambda d: d["spec"].update(replicas=1), balancer),
        "balancers recreated all at once":
            ("Deployment", lambda d: d["spec"].update(strategy={"type": "Recreate"}), balancer),
        "balancers rolled two at a time":
            ("Deployment", lambda d: d["spec"]["strategy"]["rollingUpdate"].update(maxUnavailable=2),
             balancer),
        "no disruption budget for the balancers":
            ("PodDisruptionBudget", lambda d: d["spec"]["selector"]["matchLabels"].update(
                {"app.kubernetes.io/name": "tidepool-balancers"})),
        "balancers without anti-affinity":
            ("Deployment", lambda d: d["spec"]["template"]["spec"].pop("affinity"), balancer),
        "a balancer replica acting as the actuator":
            ("Deployment", lambda d: wc(d).update(command=wc(d)["command"] + ["--autoscale"]), balancer),
        "an unknown kind":
            ("Namespace", lambda d: d.update(apiVersion="example.com/v1", kind="Thing")),
    }
    return [what for what, case in cases.items() if not mutate(*case)]


def main():
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "deploy/kubernetes")
    errors, files, sets = validate_dir(root)
    for e in errors:
        print(f"ERROR {e}")
    print(f"{len(files)} manifest files against Kubernetes {K8S_VERSION} "
          f"(kubernetes-validate {kubernetes_validate.__version__}, strict); "
          f"sets: {', '.join(sorted(sets))}")
    kustomized = rendered(root, sets)
    if kustomized is None:
        print("kubectl not found: `kubectl kustomize` rendering not checked")
    else:
        for e in kustomized:
            print(f"ERROR {e}")
        print(f"kubectl kustomize: {len(sets)} sets rendered and validated")
        errors += kustomized
    missed = self_test(sets)
    for what in missed:
        print(f"ERROR self-test: a broken copy passed: {what}")
    if errors or missed:
        return 1
    print("k8s-validate: all manifests valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
