//! docker compose projects on this machine's docker engine, for the compose suites.
//!
//! - [`compose_program`]: `docker-compose` (else `docker compose`), or `None` after saying
//!   on stderr that there is no docker engine, so that a suite can pass without one.
//! - [`build_image`]: the image [`IMAGE`] from the debug binaries (a no-op when unchanged).
//! - [`Compose`]: one project (a unique name) of one compose file, with its environment
//!   written to an env file, so that a command the balancer runs (`--scale-cmd`) sees the
//!   same project as the test's own commands.
//! - [`Down`]: tears the project down (`down -v`) when dropped, failed test or not.
//! - [`stack`]: docker-compose.yml's own project, with its secrets, certificates and
//!   published ports ([`HostPorts`]).
//! - [`make_secrets`]: the admin token the compose files mount, made by
//!   scripts/make-secrets.sh in a test's own folder.
//! - [`docker`], [`docker_async`]: one `docker` command that must succeed.
//! - [`make_certs`]: the CA, certificates and keys the compose files mount, made by
//!   scripts/make-certs.sh in a test's own folder.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Features of the image's model (`synth --input-dim 64`, scripts/docker-image.sh).
pub const INPUT_DIM: usize = 64;

/// The image the compose suites build and run; not `tidepool:local`, which is the user's.
pub const IMAGE: &str = "tidepool:test";

/// How many times [`Compose::containers`] asks again after `ps` raced a removal.
const PS_RETRIES: u32 = 5;
/// How long it waits before asking again.
const PS_RETRY_AFTER: Duration = Duration::from_millis(200);

/// The workspace root (compose files and scripts are found from it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

/// The compose command (`docker-compose`, else `docker compose`), or `None` after saying
/// why, as `<suite> SKIPPED: ...`, when there is no docker engine here at all.
pub fn compose_program(suite: &str) -> Option<Vec<String>> {
    let engine = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdin(Stdio::null())
        .output();
    match engine {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            report(&format!(
                "{suite} SKIPPED: no docker engine reachable (`docker info`: {})",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            return None;
        }
        Err(error) => {
            report(&format!(
                "{suite} SKIPPED: no docker engine (`docker`: {error})"
            ));
            return None;
        }
    }
    for program in [vec!["docker-compose"], vec!["docker", "compose"]] {
        let works = Command::new(program[0])
            .args(&program[1..])
            .arg("version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if works {
            return Some(program.into_iter().map(str::to_owned).collect());
        }
    }
    panic!("a docker engine is here but neither `docker-compose` nor `docker compose` runs");
}

/// Writes a line straight to stderr, past the test harness's capture, so that a skip or
/// the timings show in a plain `cargo test` run.
pub fn report(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// `PROFILE=debug scripts/docker-image.sh`: a no-op cargo build after `cargo test`, then
/// an import of [`IMAGE`] unless it already holds these binaries.
pub fn build_image() {
    let out = Command::new(workspace_root().join("scripts/docker-image.sh"))
        .env("PROFILE", "debug")
        .env("SIZE", "4MiB")
        .env("IMAGE", IMAGE)
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/docker-image.sh");
    assert!(
        out.status.success(),
        "scripts/docker-image.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One compose project: its command line and environment.
#[derive(Clone, Debug)]
pub struct Compose {
    program: Vec<String>,
    file: PathBuf,
    project: String,
    env: Vec<(String, String)>,
    env_file: PathBuf,
}

impl Compose {
    /// A project of `file` with a unique name starting `tidepool-<tag>-`, whose variables
    /// are `env` (plus `TIDEPOOL_IMAGE` = [`IMAGE`]), written to an env file in `dir`.
    pub fn new(
        program: Vec<String>,
        file: &Path,
        tag: &str,
        env: &[(&str, &str)],
        dir: &Path,
    ) -> Compose {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .subsec_nanos();
        let mut vars = vec![("TIDEPOOL_IMAGE".to_owned(), IMAGE.to_owned())];
        vars.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let env_file = dir.join("compose.env");
        let lines: String = vars.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        std::fs::write(&env_file, lines).expect("write the compose env file");
        Compose {
            program,
            file: file.to_path_buf(),
            project: format!("tidepool-{tag}-{}-{nanos}", std::process::id()),
            env: vars,
            env_file,
        }
    }

    /// The project name.
    pub fn project(&self) -> &str {
        &self.project
    }

    /// The compose program and the options that select this project, as words.
    fn base(&self) -> Vec<String> {
        let mut words = self.program.clone();
        words.extend([
            "--file".to_owned(),
            self.file.display().to_string(),
            "--project-name".to_owned(),
            self.project.clone(),
            "--env-file".to_owned(),
            self.env_file.display().to_string(),
        ]);
        words
    }

    /// A command line for this project followed by `args`, single-quoted for a
    /// shell-words split (what the balancer's `--scale-cmd` gets).
    pub fn command_line(&self, args: &str) -> String {
        let quoted: Vec<String> = self
            .base()
            .iter()
            .map(|w| {
                assert!(!w.contains('\''), "a quote in {w:?}");
                format!("'{w}'")
            })
            .collect();
        format!("{} {args}", quoted.join(" "))
    }

    /// A compose command for this project. The variables are also set in its
    /// environment, where they win over any of the same name the test inherited.
    pub fn command(&self, args: &[&str]) -> Command {
        let base = self.base();
        let mut command = Command::new(&base[0]);
        command
            .args(&base[1..])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        command
    }

    /// Runs a compose command that must succeed; returns its stdout.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.command(args).output().expect("run compose");
        self.succeeded(args, &out)
    }

    /// The stdout of the compose command `args` that printed `out`, which must have
    /// succeeded.
    fn succeeded(&self, args: &[&str], out: &Output) -> String {
        must_succeed(
            &format!("{} {}", self.program.join(" "), args.join(" ")),
            out,
        )
    }

    /// The host address published for a service's container port.
    pub fn port(&self, service: &str, port: u16) -> SocketAddr {
        let out = self.run(&["port", service, &port.to_string()]);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("`port {service} {port}` printed {out:?}"))
    }

    /// The ids of a service's containers (running or not).
    ///
    /// docker-compose v1 lists a service's containers and then inspects each one, so a
    /// container removed in between (the actuator scaling in while a test polls) fails the
    /// whole `ps` with "No such container"; that answer is asked again, a few times.
    pub fn containers(&self, service: &str) -> Vec<String> {
        let args = ["ps", "-q", service];
        let mut vanished = 0;
        let out = loop {
            let out = self.command(&args).output().expect("run compose");
            let raced = !out.status.success()
                && String::from_utf8_lossy(&out.stderr).contains("No such container");
            if !raced || vanished == PS_RETRIES {
                break out;
            }
            vanished += 1;
            std::thread::sleep(PS_RETRY_AFTER);
        };
        self.succeeded(&args, &out)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

/// Tears the project down when dropped: after a pass, and after a failure too, with the
/// containers' last log lines first.
pub struct Down(pub Compose);

impl Drop for Down {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(out) = self
                .0
                .command(&["logs", "--no-color", "--tail", "40"])
                .output()
            {
                report(&String::from_utf8_lossy(&out.stdout));
            }
        }
        let down = self
            .0
            .command(&["down", "-v", "--remove-orphans", "--timeout", "10"])
            .output();
        match down {
            Ok(out) if out.status.success() => {}
            Ok(out) => report(&format!(
                "compose down of {} failed: {}",
                self.0.project,
                String::from_utf8_lossy(&out.stderr)
            )),
            Err(error) => report(&format!("compose down of {}: {error}", self.0.project)),
        }
    }
}

/// The secrets the compose files mount (`TIDEPOOL_SECRETS`), made in `dir/secrets` by
/// scripts/make-secrets.sh, as `make compose-up` makes them: returns that folder and the
/// admin token.
pub fn make_secrets(dir: &Path) -> (PathBuf, String) {
    let secrets = dir.join("secrets");
    let out = Command::new(workspace_root().join("scripts/make-secrets.sh"))
        .arg(&secrets)
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/make-secrets.sh");
    must_succeed("scripts/make-secrets.sh", &out);
    let token = std::fs::read_to_string(secrets.join("admin.token")).expect("read admin.token");
    (secrets, token.trim_end().to_owned())
}

/// The certificates the compose files mount (`TIDEPOOL_CERTS`), made in `dir/certs` by
/// scripts/make-certs.sh (openssl), as `make compose-up` makes them: returns that folder,
/// which holds `ca.pem` (what a client trusts), `balancer.{pem,key}`, `worker.{pem,key}`
/// and `balancer-client.{pem,key}`.
pub fn make_certs(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    let out = Command::new(workspace_root().join("scripts/make-certs.sh"))
        .arg(&certs)
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/make-certs.sh");
    must_succeed("scripts/make-certs.sh", &out);
    certs
}

/// Where docker-compose.yml's two balancers publish their client and admin ports on the
/// host (`TIDEPOOL_HOST_PORT`, `_ADMIN`, `_PORT_B`, `_ADMIN_B`).
#[derive(Clone, Debug)]
pub struct HostPorts(pub [String; 4]);

impl HostPorts {
    /// Ephemeral loopback ports (`127.0.0.1:`), found with [`Compose::port`]. A container
    /// started again gets new ones.
    pub fn ephemeral() -> HostPorts {
        HostPorts(std::array::from_fn(|_| "127.0.0.1:".to_owned()))
    }

    /// These addresses, kept across a container's restart: `balancer`'s client and admin
    /// ports, then `balancer-b`'s.
    pub fn fixed(addrs: [SocketAddr; 4]) -> HostPorts {
        HostPorts(addrs.map(|a| a.to_string()))
    }
}

/// docker-compose.yml as a project of its own, run as `make compose-up` runs it.
#[derive(Debug)]
pub struct Stack {
    /// The project (not started yet).
    pub compose: Compose,
    /// The admin token its balancers require.
    pub token: String,
    /// The folder of certificates it mounts; its `ca.pem` is what a client trusts.
    pub certs: PathBuf,
}

/// docker-compose.yml (two balancers, TLS and the admin token on) as a project named
/// `tidepool-<tag>-…`, with its secrets and certificates made in `dir`, its ports published
/// as `ports` says and the DNS interval set beyond a test's length: the workers are found
/// when a balancer starts, and a faulted one stays registered.
pub fn stack(program: Vec<String>, tag: &str, dir: &Path, ports: &HostPorts) -> Stack {
    let (secrets, token) = make_secrets(dir);
    let certs = make_certs(dir);
    let [port, admin, port_b, admin_b] = &ports.0;
    let compose = Compose::new(
        program,
        &workspace_root().join("docker-compose.yml"),
        tag,
        &[
            ("TIDEPOOL_HOST_PORT", port),
            ("TIDEPOOL_HOST_ADMIN", admin),
            ("TIDEPOOL_HOST_PORT_B", port_b),
            ("TIDEPOOL_HOST_ADMIN_B", admin_b),
            ("TIDEPOOL_DNS_INTERVAL", "1h"),
            ("TIDEPOOL_SECRETS", &secrets.display().to_string()),
            ("TIDEPOOL_CERTS", &certs.display().to_string()),
        ],
        dir,
    );
    Stack {
        compose,
        token,
        certs,
    }
}

/// Runs `docker` with `args`; it must succeed; returns its stdout.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run docker");
    must_succeed(&format!("docker {}", args.join(" ")), &out)
}

/// [`docker`] on a blocking thread, off the runtime's threads (a test's load uses them).
pub async fn docker_async(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&args)
    })
    .await
    .expect("the docker command's thread")
}

/// Panics with `what` and the standard error unless `out` is a success; returns stdout.
pub fn must_succeed(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "`{what}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).expect("utf-8 output")
}
