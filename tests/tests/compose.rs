//! docker-compose.yml for real, on this machine's docker engine: the image is built from
//! the debug binaries (scripts/docker-image.sh, no registry), a balancer and three workers
//! start, load goes through the balancer, one worker container is killed mid-load, and
//! every request must get exactly one answer while the balancer marks the dead worker
//! `unhealthy`. Everything is torn down (`down -v`) by a drop guard, failed or not.
//!
//! The load is the protocol [`Client`] on a few connections (each call ends exactly once:
//! a result, a typed error, or nothing in time, which fails the test), plus a raw-frame
//! [`drive`] on one more connection that counts the answers per id on the wire, so a
//! second answer to one request would be caught too.
//!
//! Without a docker engine the test says so on stderr and passes. It runs in its own
//! compose project (unique name) with ephemeral host ports, and in its own image tag
//! (`tidepool:test`), so it touches neither a `make compose-up` cluster nor its image.
//!
//! The DNS interval is set far beyond the test's length: a killed container vanishes from
//! compose's DNS, and a re-resolution would deregister it before the health checks
//! (1s apart, two failures) mark it unhealthy, which is what this test watches for.

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tidepool_protocol::{Client, Tensor, Tensors};
use tidepool_tests::drive::{drive, Drive};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Worker replicas started.
const WORKERS: usize = 3;
/// The image the test builds and runs; not `tidepool:local`, which is the user's.
const IMAGE: &str = "tidepool:test";
/// Features of the image's model (`synth --input-dim 64`).
const INPUT_DIM: usize = 64;
/// Requests per second sent through the balancer with the protocol client.
const RATE: u32 = 200;
/// Requests per second sent as raw frames, every answer counted per id.
const RAW_RATE: u32 = 50;
/// How long load is sent.
const LOAD_FOR: Duration = Duration::from_secs(12);
/// When, after the load started, one worker is killed.
const KILL_AFTER: Duration = Duration::from_secs(4);
/// Client connections to the balancer; requests take turns.
const CONNECTIONS: usize = 4;
/// A request not answered within this counts as unanswered (the test then fails).
const ANSWER_WITHIN: Duration = Duration::from_secs(20);
/// How long the cluster may take to report every worker healthy.
const READY_WITHIN: Duration = Duration::from_secs(90);
/// How long the balancer may take to mark the killed worker unhealthy (1s checks, 1s
/// timeout, two failures: about 3s).
const UNHEALTHY_WITHIN: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_cluster_survives_a_killed_worker() {
    let Some(program) = compose_program() else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let started = Instant::now();
    build_image(root);
    let built = started.elapsed();

    let compose = Compose::new(program, root);
    let cluster = Down(compose.clone());
    compose.run(&["up", "-d", "--scale", &format!("worker={WORKERS}")]);
    let front = compose.port("balancer", 7000);
    let admin = compose.port("balancer", 7001);

    let targets = wait_targets(admin, READY_WITHIN, "every worker healthy", |t| {
        t.len() == WORKERS && t.values().all(|s| s == "healthy")
    })
    .await;
    let up = started.elapsed();

    // Load on its own tasks; the test kills a worker and watches /targets meanwhile.
    let load = tokio::spawn(send_load(front));
    let raw = tokio::spawn(drive(Drive {
        addr: front,
        rate: RAW_RATE,
        stop: tokio_util::sync::CancellationToken::new(),
        max_requests: u64::from(RAW_RATE) * LOAD_FOR.as_secs(),
        input_dim: INPUT_DIM,
        deadline: ANSWER_WITHIN,
        settle: ANSWER_WITHIN,
    }));
    tokio::time::sleep(KILL_AFTER).await;
    let victim = {
        let compose = compose.clone();
        tokio::task::spawn_blocking(move || compose.kill_one_worker())
            .await
            .unwrap()
    };
    assert!(
        targets.contains_key(&victim),
        "killed worker {victim} is not among the targets {targets:?}"
    );
    let states = wait_targets(admin, UNHEALTHY_WITHIN, "killed worker unhealthy", |t| {
        t.get(&victim).map(String::as_str) == Some("unhealthy")
    })
    .await;
    let tally = load.await.unwrap();
    let raw = raw.await.unwrap();

    let ok = tally.get("ok").copied().unwrap_or(0);
    let sent: u64 = tally.values().sum();
    let expected = u64::from(RATE) * LOAD_FOR.as_secs();
    report(&format!(
        "compose test: image {built:.1?}, cluster up {:.1?}, client: {sent} requests \
         {tally:?}, raw: {} requests {:?}, killed {victim}, targets then {states:?}, \
         total {:.1?}",
        up - built,
        raw.sent,
        raw.outcomes(),
        started.elapsed()
    ));
    raw.assert_exactly_once();
    assert_eq!(raw.sent, u64::from(RAW_RATE) * LOAD_FOR.as_secs());
    assert_eq!(sent, expected, "one outcome per request sent");
    for failure in ["unanswered", "connection_lost", "other"] {
        assert_eq!(
            tally.get(failure),
            None,
            "requests that got no answer from the balancer: {tally:?}"
        );
    }
    assert!(
        ok * 10 >= sent * 9,
        "fewer than 90% of requests succeeded with two of three workers left: {tally:?}"
    );
    for (addr, state) in &states {
        if *addr != victim {
            assert_eq!(
                state, "healthy",
                "a surviving worker is not healthy: {states:?}"
            );
        }
    }
    drop(cluster);
}

/// The compose command (`docker-compose`, else `docker compose`), or `None` after saying
/// why when there is no docker engine here at all.
fn compose_program() -> Option<Vec<String>> {
    let engine = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdin(Stdio::null())
        .output();
    match engine {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            report(&format!(
                "compose test SKIPPED: no docker engine reachable (`docker info`: {})",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            return None;
        }
        Err(error) => {
            report(&format!(
                "compose test SKIPPED: no docker engine (`docker`: {error})"
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
fn report(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// `PROFILE=debug scripts/docker-image.sh`: a no-op cargo build after `cargo test`, then
/// an import unless the image already holds these binaries.
fn build_image(root: &Path) {
    let out = Command::new(root.join("scripts/docker-image.sh"))
        .env("PROFILE", "debug")
        .env("SIZE", "4MiB")
        .env("IMAGE", IMAGE)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/docker-image.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One compose project: its command line and environment.
#[derive(Clone, Debug)]
struct Compose {
    program: Vec<String>,
    file: PathBuf,
    project: String,
}

impl Compose {
    fn new(program: Vec<String>, root: &Path) -> Compose {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        Compose {
            program,
            file: root.join("docker-compose.yml"),
            project: format!("tidepool-test-{}-{nanos}", std::process::id()),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.program[0]);
        command
            .args(&self.program[1..])
            .arg("--file")
            .arg(&self.file)
            .args(["--project-name", &self.project])
            .args(args)
            .env("TIDEPOOL_IMAGE", IMAGE)
            .env("TIDEPOOL_HOST_PORT", "127.0.0.1:")
            .env("TIDEPOOL_HOST_ADMIN", "127.0.0.1:")
            .env("TIDEPOOL_DNS_INTERVAL", "1h")
            .stdin(Stdio::null());
        command
    }

    /// Runs a compose command that must succeed; returns its stdout.
    fn run(&self, args: &[&str]) -> String {
        let out = self.command(args).output().unwrap();
        must_succeed(
            &format!("{} {}", self.program.join(" "), args.join(" ")),
            &out,
        )
    }

    /// The host address published for a service's container port.
    fn port(&self, service: &str, port: u16) -> SocketAddr {
        let out = self.run(&["port", service, &port.to_string()]);
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("`port {service} {port}` printed {out:?}"))
    }

    /// `docker kill`s the first worker container; returns its `ip:7100`, the target
    /// address the balancer knows it by.
    fn kill_one_worker(&self) -> String {
        let ids = self.run(&["ps", "-q", "worker"]);
        let id = ids.lines().next().expect("a worker container").trim();
        let ip = docker(&[
            "inspect",
            "--format",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            id,
        ]);
        docker(&["kill", id]);
        format!("{}:7100", ip.trim())
    }
}

/// Tears the project down when dropped: after a pass, and after a failure too, with the
/// containers' last log lines first.
struct Down(Compose);

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

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    must_succeed(&format!("docker {}", args.join(" ")), &out)
}

fn must_succeed(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "`{what}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Sends `RATE` requests a second for `LOAD_FOR` over `CONNECTIONS` client connections,
/// each on its own task; returns how many ended each way: `ok`, a protocol error code,
/// `connection_lost`, `unanswered` (nothing within `ANSWER_WITHIN`) or `other`.
async fn send_load(front: SocketAddr) -> BTreeMap<String, u64> {
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(Client::connect(front).await.unwrap());
    }
    let inputs: Tensors = [(
        "input".to_owned(),
        Tensor::from_vec(vec![INPUT_DIM], vec![0.5f32; INPUT_DIM]).unwrap(),
    )]
    .into();
    let total = RATE * u32::try_from(LOAD_FOR.as_secs()).unwrap();
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / RATE);
    let mut calls = Vec::new();
    for n in 0..total {
        ticks.tick().await;
        let client = clients[n as usize % CONNECTIONS].clone();
        let inputs = inputs.clone();
        calls.push(tokio::spawn(async move {
            match tokio::time::timeout(ANSWER_WITHIN, client.infer(inputs)).await {
                Err(_) => "unanswered".to_owned(),
                Ok(Ok(_)) => "ok".to_owned(),
                Ok(Err(tidepool_protocol::Error::ConnectionLost { .. })) => {
                    "connection_lost".to_owned()
                }
                Ok(Err(error)) => match error.reply_code() {
                    Some(code) => code,
                    None => "other".to_owned(),
                },
            }
        }));
    }
    let mut tally = BTreeMap::new();
    for call in calls {
        *tally.entry(call.await.unwrap()).or_insert(0) += 1;
    }
    tally
}

/// The protocol error code of an answer from the server, as a string.
trait ReplyCode {
    fn reply_code(&self) -> Option<String>;
}

impl ReplyCode for tidepool_protocol::Error {
    fn reply_code(&self) -> Option<String> {
        use tidepool_protocol::Error as E;
        match self {
            E::BadRequest { .. }
            | E::TooLarge { .. }
            | E::Overloaded { .. }
            | E::DeadlineExceeded { .. }
            | E::Unavailable { .. }
            | E::Cancelled { .. }
            | E::ShuttingDown { .. }
            | E::Internal { .. } => Some(self.code().to_string()),
            _ => None,
        }
    }
}

/// Polls `GET /targets` until `done` holds for the map address → state; returns that map.
async fn wait_targets(
    admin: SocketAddr,
    within: Duration,
    what: &str,
    done: impl Fn(&BTreeMap<String, String>) -> bool,
) -> BTreeMap<String, String> {
    let deadline = Instant::now() + within;
    let mut last = None;
    loop {
        if let Some(targets) = get_targets(admin).await {
            if done(&targets) {
                return targets;
            }
            last = Some(targets);
        }
        assert!(
            Instant::now() < deadline,
            "waited {within:?} for {what}; last /targets: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `GET /targets` as address → state, or `None` while the admin API is not answering
/// (docker's port proxy accepts before the balancer does).
async fn get_targets(admin: SocketAddr) -> Option<BTreeMap<String, String>> {
    let mut stream = TcpStream::connect(admin).await.ok()?;
    let request = format!("GET /targets HTTP/1.0\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .ok()?
        .ok()?;
    let response = String::from_utf8(response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return None;
    }
    let targets: Vec<serde_json::Value> = serde_json::from_str(body).ok()?;
    Some(
        targets
            .iter()
            .filter_map(|t| {
                Some((
                    t["addr"].as_str()?.to_owned(),
                    t["state"].as_str()?.to_owned(),
                ))
            })
            .collect(),
    )
}
