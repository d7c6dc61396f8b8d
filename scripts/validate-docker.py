"""Checks the Dockerfiles and the GPU compose override offline (`make docker-validate`, part
of `make test`). This machine has no registry, so the Dockerfiles cannot be built here; what
can go wrong in them without a build is checked instead.

  python scripts/validate-docker.py

Dockerfile and Dockerfile.gpu, parsed by the `dockerfile` package (BuildKit's own parser):
1. Every path a COPY takes from the repository exists and is not excluded by .dockerignore;
   no ADD (it fetches URLs and unpacks archives). The builder copies every workspace member
   (cargo reads them all) and every script its RUN lines call.
2. Every path a COPY takes from another stage is one that stage produces: the directory its
   RUN lays out with scripts/image-rootfs.sh.
3. Every package, binary and feature a `cargo build` names is one of the workspace's
   (`cargo metadata`), and the packages built hold every binary of the image.
4. The runtime stage needs no shell: no RUN or SHELL, ENTRYPOINT (and CMD, HEALTHCHECK)
   in exec form, naming only the image's binaries. A FROM-scratch runtime gets the shared
   libraries from image-rootfs.sh (ROOTFS_SYSTEM=1), any other base brings its own (0).
5. It runs as the list's user, not root, with the list's environment
   (deploy/image/contents.txt, the list scripts/docker-image.sh builds from too), and
   ORT_VERSION is the Makefile's (scripts/fetch-ort.sh's default too); Dockerfile.gpu fetches
   onnxruntime-gpu and builds the worker's `cuda` feature.

deploy/compose/gpu.yml, merged over docker-compose.yml by `docker-compose config` (skipped
with a note without docker-compose): every service that runs tidepool-worker reserves exactly
one NVIDIA GPU by ID, no two the same (a `count` would give every replica GPU 0), runs
`--device cuda` on the GPU image, and answers to the balancer's `--target-dns` name.

TLS and the token in compose: in that merged file and in deploy/compose/autoscale.yml, the
balancer serves TLS to clients (--tls-cert/--tls-key) and on its admin API
(--admin-tls-cert/--admin-tls-key), speaks mutual TLS to the workers
(--upstream-tls-ca/-cert/-key) and reads its admin token from a file; its `tidepool-probe
http` healthcheck asks for https:// with --tls-ca; every worker serves TLS and requires a
client certificate (--tls-client-ca); a worker's `tidepool-probe ping` healthcheck
presents one; a worker that registers (--register) does so at https:// with
--register-tls-ca; the load service trusts the CA (--tls-ca); and every /run/secrets/NAME
a command or healthcheck names is a secret mounted in that service.

Balancers side by side in docker-compose.yml: two services or more run tidepool-balancer
over the same --target-dns name, on distinct host ports, and none runs --autoscale (there
is no actuator in that file; where there is one, it is a single balancer).

Last, a self-test: broken copies (a root user, a RUN in the runtime stage, a missing path,
a misspelt package, another ORT version, two workers on one GPU, ...) must fail.
"""

import copy
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import dockerfile
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = ("Dockerfile", "Dockerfile.gpu")
COMPOSE_BASE = "docker-compose.yml"
COMPOSE_GPU = "deploy/compose/gpu.yml"
COMPOSE_AUTOSCALE = "deploy/compose/autoscale.yml"
CONTENTS = "deploy/image/contents.txt"
GPU_IMAGE = "tidepool-gpu"


class Repo:
    """What the checks compare the Dockerfiles against, read once."""

    def __init__(self, root):
        self.root = root
        self.contents = read_contents(root / CONTENTS)
        self.ort_version = makefile_var(root / "Makefile", "ORT_VERSION")
        self.dockerignore = read_dockerignore(root / ".dockerignore")
        meta = json.loads(subprocess.run(
            ["cargo", "metadata", "--no-deps", "--format-version", "1", "--offline",
             "--manifest-path", str(root / "Cargo.toml")],
            check=True, capture_output=True, text=True).stdout)
        self.packages = {}
        for p in meta["packages"]:
            self.packages[p["name"]] = {
                "dir": Path(p["manifest_path"]).parent.relative_to(root).as_posix(),
                "bins": {t["name"] for t in p["targets"] if "bin" in t["kind"]},
                "features": set(p["features"]),
                "rust_version": p.get("rust_version"),
            }

    def env(self):
        """The list's environment with the Makefile's ORT_VERSION in place."""
        return {k: v.replace("${ORT_VERSION}", self.ort_version)
                for k, v in self.contents["env"].items()}

    def all_bins(self):
        return set().union(*(p["bins"] for p in self.packages.values()))


def read_contents(path):
    out = {"bin": [], "env": {}, "user": []}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kind, _, value = line.partition(" ")
        if kind == "env" and "=" in value:
            key, _, val = value.partition("=")
            out["env"][key] = val
        elif kind in ("bin", "user") and value:
            out[kind].append(value)
        else:
            raise SystemExit(f"{path}:{n}: not `bin NAME`, `env NAME=VALUE` or `user UID`: {line}")
    if len(out["user"]) != 1:
        raise SystemExit(f"{path}: needs exactly one `user` line")
    return out


def makefile_var(path, name):
    m = re.search(rf"^{name}\s*\??=\s*(\S+)", path.read_text(), re.M)
    if not m:
        raise SystemExit(f"{path}: no {name}")
    return m[1]


def read_dockerignore(path):
    if not path.exists():
        return []
    return [line.strip().rstrip("/") for line in path.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def ignored(rel, patterns):
    """Whether .dockerignore excludes `rel` (or a directory above it); `!` is not used here."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pat in patterns:
        pat = pat.lstrip("/")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pat) or \
                    (pat.startswith("**/") and fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1], pat[3:])):
                return True
    return False


def expand(text, scope):
    """${NAME} and $NAME from the ARGs in scope; an unknown name expands to nothing, as in a build."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: scope.get(m[1] or m[2], ""), text)


def arg_pairs(cmd):
    for v in cmd.value:
        name, eq, default = v.partition("=")
        yield name, (default if eq else None)


def env_pairs(cmd):
    """ENV K=V K2=V2 (or the old ENV K V), quotes removed."""
    vals = list(cmd.value)
    pairs = []
    if len(vals) == 2 and "=" not in cmd.original.split(None, 2)[1]:
        pairs.append((vals[0], vals[1]))
    else:
        pairs.extend(zip(vals[0::2], vals[1::2]))
    return [(k, v.strip('"')) for k, v in pairs]


def flag_value(cmd, name):
    for f in cmd.flags:
        if f.startswith(f"--{name}="):
            return f.split("=", 1)[1]
    return None


class Stage:
    def __init__(self, index, base, name, line):
        self.index, self.base, self.name, self.line = index, base, name, line
        self.cmds = []
        self.scope = {}          # ARGs visible in this stage
        self.workdir = "/"
        self.copied = []         # absolute in-image paths that COPY put here from the repo
        self.produced = []       # absolute directories image-rootfs.sh laid out here
        self.rootfs_system = None  # ROOTFS_SYSTEM of its image-rootfs.sh run
        self.ort_flavor = None     # ORT_FLAVOR of its fetch-ort.sh run


def check_dockerfile(label, text, repo, errors):
    """Checks one Dockerfile's text; appends `label:LINE: message` lines to errors."""
    def bad(cmd, msg):
        errors.append(f"{label}:{cmd.start_line}: {msg}" if cmd else f"{label}: {msg}")

    try:
        cmds = dockerfile.parse_string(text)
    except dockerfile.GoParseError as e:
        errors.append(f"{label}: does not parse: {e}")
        return
    global_args, stages = {}, []
    for cmd in cmds:
        if cmd.cmd == "FROM":
            words = cmd.value or ("",)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(len(stages), expand(words[0], global_args), name, cmd.start_line))
            continue
        if not stages:
            if cmd.cmd == "ARG":
                global_args.update((k, v or "") for k, v in arg_pairs(cmd))
            else:
                bad(cmd, f"{cmd.cmd} before the first FROM")
            continue
        stages[-1].cmds.append(cmd)
    if not stages:
        errors.append(f"{label}: no FROM")
        return

    if global_args.get("ORT_VERSION") != repo.ort_version:
        bad(None, f"ARG ORT_VERSION={global_args.get('ORT_VERSION')} is not the Makefile's "
                  f"ORT_VERSION {repo.ort_version}")
    want_rust = max((p["rust_version"] for p in repo.packages.values() if p["rust_version"]),
                    default=None, key=lambda v: tuple(map(int, v.split("."))))
    have_rust = global_args.get("RUST_VERSION")
    if want_rust and have_rust and \
            tuple(map(int, have_rust.split("."))) < tuple(map(int, want_rust.split("."))):
        bad(None, f"RUST_VERSION {have_rust} is older than the workspace's rust-version {want_rust}")

    names = {}
    for stage in stages:
        check_stage(stage, names, global_args, repo, bad)
        if stage.name:
            names[stage.name] = stage
    check_runtime(stages[-1], repo, bad)
    builders = [s for s in stages[:-1] if s.produced]
    if not builders:
        bad(None, "no builder stage runs scripts/image-rootfs.sh: the image's files come from it")
    for b in builders:
        runtime_scratch = stages[-1].base == "scratch"
        if b.rootfs_system != ("1" if runtime_scratch else "0"):
            bad(None, f"stage {b.name}: ROOTFS_SYSTEM={b.rootfs_system} for a runtime FROM "
                      f"{stages[-1].base}: want {'1 (scratch has no libraries of its own)' if runtime_scratch else '0 (the base brings its own libraries)'}")


def check_stage(stage, names, global_args, repo, bad):
    members = {p["dir"] for p in repo.packages.values()}
    copied_sources = set()
    for cmd in stage.cmds:
        if cmd.cmd == "ARG":
            for k, v in arg_pairs(cmd):
                stage.scope[k] = v if v is not None else global_args.get(k, "")
        elif cmd.cmd == "WORKDIR":
            stage.workdir = os.path.normpath(os.path.join(stage.workdir, expand(cmd.value[0], stage.scope)))
        elif cmd.cmd == "ADD":
            bad(cmd, "ADD: use COPY (ADD fetches URLs and unpacks archives)")
        elif cmd.cmd == "COPY":
            *srcs, dest = [expand(v, stage.scope) for v in cmd.value]
            dest_abs = os.path.normpath(os.path.join(stage.workdir, dest))
            many = len(srcs) > 1 or dest.endswith("/")
            source_stage = flag_value(cmd, "from")
            for src in srcs:
                if source_stage is None:
                    rel = os.path.normpath(src).lstrip("/")
                    if not (repo.root / rel).exists():
                        bad(cmd, f"COPY {src}: no such path in the repository")
                    elif ignored(rel, repo.dockerignore):
                        bad(cmd, f"COPY {src}: excluded from the build context by .dockerignore")
                    copied_sources.add(rel)
                    stage.copied.append(os.path.join(dest_abs, os.path.basename(rel)) if many else dest_abs)
                elif source_stage not in names:
                    bad(cmd, f"COPY --from={source_stage}: no earlier stage of that name")
                else:
                    made = names[source_stage].produced
                    path = os.path.normpath(src)
                    if not any(path == d or path.startswith(d + "/") for d in made):
                        bad(cmd, f"COPY --from={source_stage} {src}: that stage produces "
                                 f"{made or 'nothing'} (scripts/image-rootfs.sh DEST), not this")
        elif cmd.cmd == "RUN":
            run = expand(" ".join(cmd.value), stage.scope)
            check_run(cmd, run, stage, repo, bad)
    if any(c.cmd == "RUN" and "cargo build" in " ".join(c.value) for c in stage.cmds):
        for need in sorted(members | {"Cargo.toml", "Cargo.lock"}):
            if need not in copied_sources:
                bad(None, f"stage {stage.name}: builds with cargo but does not COPY {need} "
                          "(cargo reads every workspace member)")


def check_run(cmd, run, stage, repo, bad):
    for script in re.findall(r"(?:^|[\s;&|])(scripts/[\w.-]+)", run):
        inside = os.path.normpath(os.path.join(stage.workdir, script))
        if not (repo.root / script).exists():
            bad(cmd, f"RUN calls {script}, which is not in the repository")
        elif not any(inside == c or inside.startswith(c + "/") for c in stage.copied):
            bad(cmd, f"RUN calls {script} before any COPY put it at {inside}")
    for part in re.split(r"&&|;|\|\|", run):
        words = shlex.split(part)
        env = {}
        while words and re.fullmatch(r"\w+=.*", words[0]):
            k, _, v = words.pop(0).partition("=")
            env[k] = v
        if words[:2] == ["cargo", "build"]:
            check_cargo(cmd, words[2:], repo, bad)
        elif words and words[0] == "scripts/fetch-ort.sh":
            if env.get("ORT_VERSION", repo.ort_version) != repo.ort_version:
                bad(cmd, f"fetch-ort.sh ORT_VERSION={env.get('ORT_VERSION')} is not the "
                         f"Makefile's {repo.ort_version}")
            stage.ort_flavor = env.get("ORT_FLAVOR", "cpu")
        elif words and words[0] == "scripts/image-rootfs.sh":
            if len(words) != 2:
                bad(cmd, "image-rootfs.sh takes one argument, the directory to lay out")
                continue
            stage.produced.append(os.path.normpath(os.path.join(stage.workdir, words[1])))
            stage.rootfs_system = env.get("ROOTFS_SYSTEM", "1")
            want_dir = ".ort-gpu" if stage.ort_flavor == "gpu" else ".ort"
            want_lib = f"{want_dir}/libonnxruntime.so.{repo.ort_version}"
            if env.get("ORT_LIB") != want_lib:
                bad(cmd, f"image-rootfs.sh ORT_LIB={env.get('ORT_LIB')}: fetch-ort.sh put the "
                         f"library at {want_lib}")
            bin_dir = env.get("BIN_DIR", "")
            if not re.fullmatch(r"(\S+/)?target/release", bin_dir):
                bad(cmd, f"image-rootfs.sh BIN_DIR={bin_dir!r} is not cargo's release directory")


def check_cargo(cmd, args, repo, bad):
    pkgs, bins, features, all_bins = [], [], [], False
    it = iter(args)
    for a in it:
        if a in ("-p", "--package"):
            pkgs.append(next(it, ""))
        elif a == "--bin":
            bins.append(next(it, ""))
        elif a in ("-F", "--features"):
            features.extend(re.split(r"[\s,]+", next(it, "")))
        elif a == "--bins":
            all_bins = True
    for p in pkgs:
        if p not in repo.packages:
            bad(cmd, f"cargo build -p {p}: not a workspace package ({sorted(repo.packages)})")
    for b in bins:
        if b not in repo.all_bins():
            bad(cmd, f"cargo build --bin {b}: not a binary of the workspace")
    for f in filter(None, features):
        pkg, _, feat = f.rpartition("/")
        owners = [pkg] if pkg else pkgs
        if not any(feat in repo.packages.get(o, {}).get("features", ()) for o in owners):
            bad(cmd, f"cargo build --features {f}: no such feature in {owners}")
    built = set(bins)
    if all_bins:
        built |= set().union(*(repo.packages.get(p, {}).get("bins", set()) for p in pkgs))
    for b in repo.contents["bin"]:
        if b not in repo.all_bins():
            bad(cmd, f"{CONTENTS}: `bin {b}` is not a binary of the workspace")
        elif b not in built:
            bad(cmd, f"the image's binary {b} is not built here")


def check_runtime(stage, repo, bad):
    """The stage the image is: no shell needed, the list's user and environment."""
    bins = set(repo.contents["bin"])
    env, user, entry = {}, None, None
    for cmd in stage.cmds:
        if cmd.cmd in ("RUN", "SHELL"):
            bad(cmd, f"{cmd.cmd} in the runtime stage: it needs a shell, which the image has "
                     "not (do it in the builder)")
        elif cmd.cmd in ("ENTRYPOINT", "CMD", "HEALTHCHECK"):
            words = list(cmd.value)
            if cmd.cmd == "HEALTHCHECK":
                if words and words[0].upper() == "NONE":
                    continue
                words = words[1:]
            if not cmd.json:
                bad(cmd, f"{cmd.cmd} in shell form runs /bin/sh -c: use the exec form [\"...\"]")
            elif words and words[0] not in bins:
                bad(cmd, f"{cmd.cmd} runs {words[0]!r}, not one of the image's binaries {sorted(bins)}")
            if cmd.cmd == "ENTRYPOINT":
                entry = cmd
        elif cmd.cmd == "ENV":
            env.update((k, expand(v, stage.scope)) for k, v in env_pairs(cmd))
        elif cmd.cmd == "USER":
            user = cmd
        elif cmd.cmd == "ARG":
            for k, v in arg_pairs(cmd):
                stage.scope.setdefault(k, v or "")
    if entry is None:
        bad(None, "the runtime stage sets no ENTRYPOINT: a base image's (a shell script in "
                  "NVIDIA's) would run; set `ENTRYPOINT []`")
    if user is None:
        bad(None, "the runtime stage sets no USER: it would run as root")
    else:
        uid = user.value[0]
        if uid in ("0", "root") or uid.startswith(("0:", "root:")):
            bad(user, f"USER {uid}: the image must not run as root")
        if uid != repo.contents["user"][0]:
            bad(user, f"USER {uid} is not {CONTENTS}'s user {repo.contents['user'][0]}")
    want = repo.env()
    for k in sorted(set(want) | set(env)):
        if env.get(k) != want.get(k):
            bad(None, f"runtime ENV {k}={env.get(k)!r}, {CONTENTS} says {want.get(k)!r}")


def check_gpu_flavour(label, text, errors):
    """What makes Dockerfile.gpu the GPU image."""
    if "--features tidepool-worker/cuda" not in text and not re.search(r"-p tidepool-worker\b.*--features cuda", text):
        errors.append(f"{label}: the worker is not built with its `cuda` feature")
    if not re.search(r"ORT_FLAVOR=gpu\s", text):
        errors.append(f"{label}: fetches the CPU ONNX Runtime (want ORT_FLAVOR=gpu: onnxruntime-gpu)")
    if not re.search(r"nvidia/cuda:\S*cudnn\S*runtime", text):
        errors.append(f"{label}: the runtime base is not NVIDIA's CUDA + cuDNN runtime image")


def fetch_ort_default(root):
    m = re.search(r'ORT_VERSION="\$\{ORT_VERSION:-([^}]+)\}"', (root / "scripts/fetch-ort.sh").read_text())
    return m[1] if m else None


# --- compose -------------------------------------------------------------------------------

def compose_config(root, *files):
    """The compose `files` merged in order (default: docker-compose.yml with the GPU
    override), as `docker-compose config` sees them."""
    program = shutil.which("docker-compose")
    if not program:
        return None
    files = files or (COMPOSE_BASE, COMPOSE_GPU)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIDEPOOL_", "COMPOSE_"))}
    out = subprocess.run([program, *(a for f in files for a in ("-f", f)), "config"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return out.stderr.strip() or "docker-compose config failed"
    return yaml.safe_load(out.stdout)


def dns_name(services):
    for s in services.values():
        words = s.get("command") or []
        for w in words:
            if w.startswith("--target-dns="):
                return w.split("=", 1)[1].rsplit(":", 1)[0]
    return None


def check_compose_gpu(cfg, errors):
    services = cfg.get("services") or {}
    name = dns_name(services)
    workers = {n: s for n, s in services.items() if (s.get("command") or [None])[0] == "tidepool-worker"}
    if not workers:
        errors.append(f"{COMPOSE_GPU}: no service runs tidepool-worker")
    owners = {}
    for n, s in sorted(workers.items()):
        bad = lambda msg: errors.append(f"{COMPOSE_GPU}: {n}: {msg}")  # noqa: E731
        devices = ((((s.get("deploy") or {}).get("resources") or {}).get("reservations") or {})
                   .get("devices") or [])
        gpus = [d for d in devices if d.get("driver") == "nvidia" or "gpu" in (d.get("capabilities") or [])]
        if len(gpus) != 1:
            bad(f"reserves {len(gpus)} GPU device entries; want one (driver nvidia, one device_id)")
        for d in gpus[:1]:
            if d.get("driver") != "nvidia" or "gpu" not in (d.get("capabilities") or []):
                bad("the GPU reservation needs `driver: nvidia` and `capabilities: [gpu]`")
            if "count" in d:
                bad("a `count` gives every replica the first GPUs (IDs 0..count-1); name one with device_ids")
            ids = [str(i) for i in d.get("device_ids") or []]
            if len(ids) != 1:
                bad(f"device_ids {ids}: want exactly one GPU per worker")
            for i in ids:
                if i in owners:
                    bad(f"GPU {i} is reserved by {owners[i]} too")
                owners.setdefault(i, n)
        replicas = (s.get("deploy") or {}).get("replicas", 1)
        if s.get("scale", 1) != 1 or replicas != 1:
            bad("more than one replica would share its GPU")
        env = s.get("environment") or {}
        if isinstance(env, list):
            env = dict(e.split("=", 1) for e in env if "=" in e)
        device = next((w.split("=", 1)[1] for w in s.get("command") or [] if w.startswith("--device=")),
                      env.get("TIDEPOOL_WORKER_DEVICE"))
        if device != "cuda":
            bad(f"runs with device {device or 'auto (the default)'}; want cuda (--device=cuda or "
                "TIDEPOOL_WORKER_DEVICE=cuda), so a missing GPU fails loudly")
        if not str(s.get("image", "")).startswith(GPU_IMAGE):
            bad(f"image {s.get('image')!r} is not the GPU image ({GPU_IMAGE}:*, Dockerfile.gpu)")
        aliases = {n} | {a for net in (s.get("networks") or {}).values() for a in ((net or {}).get("aliases") or [])}
        if name and name not in aliases:
            bad(f"the balancer resolves {name!r} (--target-dns), and this service does not answer to it "
                "(add it as a network alias)")


def has_flag(words, name):
    return any(w == name or w.startswith(name + "=") for w in words)


# The flags each program must run with in compose, and why.
TLS_FLAGS = {
    "tidepool-balancer": {
        "--tls-cert": "clients reach the balancer over TLS",
        "--tls-key": "clients reach the balancer over TLS",
        "--upstream-tls-ca": "the balancer checks the workers' certificates",
        "--upstream-tls-cert": "the workers require the balancer's client certificate",
        "--upstream-tls-key": "the workers require the balancer's client certificate",
        "--admin-token-file": "the admin API listens beyond loopback",
        "--admin-tls-cert": "the admin API listens beyond loopback: the token must not cross in clear",
        "--admin-tls-key": "the admin API listens beyond loopback: the token must not cross in clear",
    },
    "tidepool-worker": {
        "--tls-cert": "the balancer reaches workers over TLS",
        "--tls-key": "the balancer reaches workers over TLS",
        "--tls-client-ca": "only the balancer (a client certificate of the CA) may reach a worker",
    },
    "tidepool-load": {
        "--tls-ca": "the balancer's client port speaks TLS",
    },
}
# A worker's healthcheck pings a port that requires a client certificate.
PROBE_FLAGS = ("--tls-ca", "--tls-cert", "--tls-key")


def check_compose_tls(label, cfg, errors):
    services = cfg.get("services") or {}
    if not any((s.get("command") or [None])[0] == "tidepool-worker" for s in services.values()):
        errors.append(f"{label}: no service runs tidepool-worker")
    for n, s in sorted(services.items()):
        bad = lambda msg: errors.append(f"{label}: {n}: {msg}")  # noqa: E731
        command = [str(w) for w in s.get("command") or []]
        program = command[0] if command else None
        for flag, why in TLS_FLAGS.get(program, {}).items():
            if not has_flag(command, flag):
                bad(f"{program} runs without {flag}: {why}")
        test = [str(w) for w in (s.get("healthcheck") or {}).get("test") or []]
        if program == "tidepool-worker" and "tidepool-probe" in test:
            for flag in PROBE_FLAGS:
                if not has_flag(test, flag):
                    bad(f"the healthcheck's tidepool-probe has no {flag}; the worker requires TLS "
                        "with a client certificate")
        if program == "tidepool-balancer" and "tidepool-probe" in test:
            urls = [w for w in test if "://" in w]
            if not urls or not all(u.startswith("https://") for u in urls) or not has_flag(test, "--tls-ca"):
                bad(f"the healthcheck {test[test.index('tidepool-probe'):]} probes the TLS admin API: "
                    "want `tidepool-probe http https://... --tls-ca=...`")
        register = next((w.split("=", 1)[1] for w in command if w.startswith("--register=")), None)
        if program == "tidepool-worker" and register is not None:
            if not register.startswith("https://"):
                bad(f"registers at {register!r}: the admin API serves TLS, register at https://")
            if not has_flag(command, "--register-tls-ca"):
                bad("registers without --register-tls-ca: the balancer's certificate goes unchecked")
        mounted = {x["source"] if isinstance(x, dict) else str(x) for x in s.get("secrets") or []}
        for w in command + test:
            for path in re.findall(r"/run/secrets/([^\s=,]+)", w):
                if path not in mounted:
                    bad(f"{w!r} names /run/secrets/{path}, which is not among its secrets {sorted(mounted)}")


def check_compose_balancers(label, cfg, errors):
    """docker-compose.yml runs balancers side by side: two or more, one DNS name, no actuator."""
    services = cfg.get("services") or {}
    balancers = {n: s for n, s in services.items() if (s.get("command") or [None])[0] == "tidepool-balancer"}
    bad = lambda msg: errors.append(f"{label}: {msg}")  # noqa: E731
    if len(balancers) < 2:
        bad(f"{len(balancers)} balancer service(s) ({sorted(balancers)}): run two side by side, so "
            "that one's loss leaves the other")
    names = {next((w for w in s.get("command") or [] if w.startswith("--target-dns=")), None)
             for s in balancers.values()}
    if len(names) > 1 or None in names:
        bad(f"the balancers resolve different workers {sorted(map(str, names))}: give all of them "
            "the same --target-dns")
    published = {}
    for n, s in sorted(balancers.items()):
        if any(has_flag([str(w)], "--autoscale") for w in s.get("command") or []):
            bad(f"{n}: runs --autoscale: the pool here is set by `--scale`, and two balancers "
                "would each act (one actuator at most, outside this file)")
        for p in s.get("ports") or []:
            key = (p.get("host_ip"), p.get("published")) if isinstance(p, dict) else str(p)
            if key in published:
                bad(f"{n} publishes {key} as {published[key]} does")
            published.setdefault(key, n)


# --- the run -------------------------------------------------------------------------------

def validate(repo, texts, cfg, auto=None):
    errors = []
    for label, text in texts.items():
        check_dockerfile(label, text, repo, errors)
        if label.endswith(".gpu"):
            check_gpu_flavour(label, text, errors)
    if isinstance(cfg, dict):
        check_compose_gpu(cfg, errors)
        check_compose_tls(f"{COMPOSE_BASE} + {COMPOSE_GPU}", cfg, errors)
        check_compose_balancers(f"{COMPOSE_BASE} + {COMPOSE_GPU}", cfg, errors)
    if isinstance(auto, dict):
        check_compose_tls(COMPOSE_AUTOSCALE, auto, errors)
    return errors


def broken_copies(label, base, cases, check):
    """The names of `cases` (name -> a change to a copy of the compose config `base`) that
    `check(copy, errors)` lets pass, or that no longer apply to `label`'s shape."""
    missed = []
    for what, change in cases.items():
        broken = copy.deepcopy(base)
        try:
            change(broken)
        except (KeyError, TypeError, AttributeError) as e:
            missed.append(f"{what}: {label} no longer has that shape ({e!r}; update the self-test)")
            continue
        errors = []
        check(broken, errors)
        if not errors:
            missed.append(what)
    return missed


def self_test(repo, texts, cfg, auto=None):
    """Broken copies that must fail; returns what passed anyway or no longer applies."""
    user = repo.contents["user"][0]
    df_cases = {
        "runs as root": ("Dockerfile", f"USER {user}", "USER root"),
        "a RUN in the runtime stage": ("Dockerfile", f"USER {user}", f'RUN ["true"]\nUSER {user}'),
        "a shell-form ENTRYPOINT": ("Dockerfile", "ENTRYPOINT []", "ENTRYPOINT tidepool-worker serve"),
        "no ENTRYPOINT over NVIDIA's script": ("Dockerfile.gpu", "ENTRYPOINT []", ""),
        "a COPY of a missing path": ("Dockerfile", "COPY worker worker", "COPY wroker worker"),
        "a workspace member not copied": ("Dockerfile", "COPY tests tests\n", ""),
        "a COPY --from of what the builder does not make":
            ("Dockerfile", "COPY --from=builder /rootfs/ /", "COPY --from=builder /src/target/release/ /usr/local/bin/"),
        "a misspelt package": ("Dockerfile", "-p tidepool-load", "-p tidepool-lod"),
        "a binary of the image not built": ("Dockerfile", "-p tidepool-load ", ""),
        "a misspelt feature": ("Dockerfile.gpu", "tidepool-worker/cuda", "tidepool-worker/cdua"),
        "another ORT version": ("Dockerfile", f"ARG ORT_VERSION={repo.ort_version}", "ARG ORT_VERSION=1.0.0"),
        "ORT_VERSION not declared in the runtime stage":
            ("Dockerfile", "FROM scratch\nARG ORT_VERSION\n", "FROM scratch\n"),
        "the model somewhere else": ("Dockerfile", "TIDEPOOL_WORKER_MODEL=/models/model.onnx",
                                     "TIDEPOOL_WORKER_MODEL=/model.onnx"),
        "the CPU library in the GPU image": ("Dockerfile.gpu", "ORT_FLAVOR=gpu ", ""),
        "no system libraries in a scratch image": ("Dockerfile", "ROOTFS_SYSTEM=1 scripts", "ROOTFS_SYSTEM=0 scripts"),
        "a script not copied before it runs":
            ("Dockerfile", "COPY scripts/fetch-ort.sh scripts/image-rootfs.sh scripts/",
             "COPY scripts/image-rootfs.sh scripts/"),
    }
    missed = []
    for what, (label, old, new) in df_cases.items():
        if old not in texts.get(label, ""):
            missed.append(f"{what}: {old!r} is no longer in {label} (update the self-test)")
            continue
        broken = dict(texts)
        broken[label] = broken[label].replace(old, new, 1)
        if not validate(repo, broken, None):
            missed.append(what)

    if isinstance(cfg, dict):
        def devices(c, n):
            return c["services"][n]["deploy"]["resources"]["reservations"]["devices"][0]

        extra = next((n for n in sorted(cfg["services"]) if n.startswith("worker-")), None)
        compose_cases = {
            "two workers on one GPU": lambda c: devices(c, extra).update(device_ids=["0"]),
            "a count instead of an ID": lambda c: devices(c, "worker").update(count=1, device_ids=None),
            "no --device cuda": lambda c: c["services"]["worker"]["environment"].pop("TIDEPOOL_WORKER_DEVICE"),
            "the CPU image": lambda c: c["services"]["worker"].update(image="tidepool:local"),
            "a worker the balancer cannot find": lambda c: c["services"][extra].pop("networks"),
        }
        missed += broken_copies("the override", cfg, compose_cases, check_compose_gpu)

        # The services' command lists may be one shared (aliased) list: replace, never edit.
        def without(c, service, flag, key="command"):
            if key == "command":
                words = c["services"][service]["command"]
                c["services"][service]["command"] = [w for w in words if not has_flag([w], flag)]
            else:
                hc = c["services"][service]["healthcheck"]
                hc["test"] = [w for w in hc["test"] if not has_flag([w], flag)]

        tls_cases = {
            "a plaintext balancer": lambda c: without(c, "balancer", "--tls-cert"),
            "no client certificate towards the workers": lambda c: without(c, "balancer", "--upstream-tls-cert"),
            "no admin token": lambda c: without(c, "balancer", "--admin-token-file"),
            "a worker anyone can reach": lambda c: without(c, "worker", "--tls-client-ca"),
            "a GPU worker without TLS": lambda c: without(c, extra, "--tls-cert"),
            "a plaintext healthcheck": lambda c: without(c, "worker", "--tls-cert", key="healthcheck"),
            "a plaintext load service": lambda c: without(c, "load", "--tls-ca"),
            "a secret named but not mounted":
                lambda c: c["services"]["balancer"].update(secrets=[{"source": "admin_token"}]),
            "a plaintext admin API": lambda c: without(c, "balancer", "--admin-tls-cert"),
            "a second balancer with a plaintext admin API": lambda c: without(c, "balancer-b", "--admin-tls-key"),
            "a plaintext balancer healthcheck": lambda c: c["services"]["balancer"]["healthcheck"].update(
                test=[w.replace("https://", "http://") for w in c["services"]["balancer"]["healthcheck"]["test"]]),
            "a balancer healthcheck without the CA": lambda c: without(c, "balancer", "--tls-ca", key="healthcheck"),
        }
        missed += broken_copies(COMPOSE_BASE, cfg, tls_cases,
                                lambda c, errors: check_compose_tls("broken", c, errors))

        side_cases = {
            "one balancer": lambda c: c["services"].pop("balancer-b"),
            "two actuators": lambda c: c["services"]["balancer-b"].update(
                command=c["services"]["balancer-b"]["command"] + ["--autoscale"]),
            "balancers over different workers": lambda c: c["services"]["balancer-b"].update(
                command=[w.replace("--target-dns=worker:", "--target-dns=workers:")
                         for w in c["services"]["balancer-b"]["command"]]),
            "two balancers on one host port": lambda c: c["services"]["balancer-b"].update(
                ports=c["services"]["balancer"]["ports"]),
        }
        missed += broken_copies(COMPOSE_BASE, cfg, side_cases,
                                lambda c, errors: check_compose_balancers("broken", c, errors))

    if isinstance(auto, dict):
        def register_words(c, change):
            w = c["services"]["worker"]
            w["command"] = [change(x) for x in w["command"] if change(x) is not None]

        auto_cases = {
            "a worker registering in plaintext": lambda c: register_words(
                c, lambda x: x.replace("--register=https://", "--register=http://")),
            "a worker registering without the CA": lambda c: register_words(
                c, lambda x: None if x.startswith("--register-tls-ca") else x),
        }
        missed += broken_copies(COMPOSE_AUTOSCALE, auto, auto_cases,
                                lambda c, errors: check_compose_tls("broken", c, errors))
    return missed


def main():
    repo = Repo(ROOT)
    texts = {name: (ROOT / name).read_text() for name in DOCKERFILES}
    cfg = compose_config(ROOT)
    auto = compose_config(ROOT, COMPOSE_AUTOSCALE)
    errors = validate(repo, texts, cfg, auto)
    if fetch_ort_default(ROOT) != repo.ort_version:
        errors.append(f"scripts/fetch-ort.sh defaults to ORT_VERSION {fetch_ort_default(ROOT)}, "
                      f"the Makefile says {repo.ort_version}")
    if isinstance(cfg, str):
        errors.append(f"docker-compose -f {COMPOSE_BASE} -f {COMPOSE_GPU} config: {cfg}")
    if isinstance(auto, str):
        errors.append(f"docker-compose -f {COMPOSE_AUTOSCALE} config: {auto}")
    errors += [f"self-test: a broken copy passed: {what}" for what in self_test(repo, texts, cfg, auto)]
    print(f"{', '.join(DOCKERFILES)} against {CONTENTS}, the workspace's binaries and "
          f"ORT_VERSION {repo.ort_version}")
    print(f"docker-compose not found: {COMPOSE_GPU} not checked" if cfg is None else
          f"{COMPOSE_GPU} merged over {COMPOSE_BASE}, and {COMPOSE_AUTOSCALE}, by docker-compose "
          "config (GPUs, TLS on every listener and the admin API, the token, two balancers)")
    print("".join(f"ERROR {e}\n" for e in errors), end="")
    if not errors:
        print("docker-validate: all checked files valid")
    return 1 if errors else 0

if __name__ == "__main__":
    sys.exit(main())
