//! The real binaries as separate processes, for end-to-end tests.
//!
//! A [`Proc`] is killed when dropped, so a failing test leaves nothing running; its
//! standard error goes to a log file that a failing assertion can print.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The path of one of the workspace's binaries, built next to the test executable.
///
/// Panics with the command to run when it is missing: `cargo test --workspace` builds
/// every binary of the workspace, `cargo test -p tidepool-tests` alone does not.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable sits in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// A loopback address with a port that was free a moment ago.
///
/// Processes are told their port on the command line, so the port is reserved by binding
/// it and released just before the process starts; in-process servers bind
/// `127.0.0.1:0` instead. See [`free_addrs`] for why the port cannot be taken meanwhile.
pub fn free_addr() -> SocketAddr {
    let [addr] = free_addrs();
    addr
}

/// `N` distinct loopback addresses whose ports were free a moment ago.
///
/// Between the pick and the child process's own bind the port is unheld, so it must come
/// from where nobody else in the test process draws: not from the kernel's ephemeral range,
/// which every `bind(0)` of an in-process server and every outgoing connection's source
/// port draw from (a port taken there once sent a test's clients to another test's listener),
/// and never twice from this process. Ports are handed out from one counter, below the
/// ephemeral range, starting at an offset drawn from the process id so that two test
/// processes at once start far apart; each is checked free by binding it.
pub fn free_addrs<const N: usize>() -> [SocketAddr; N] {
    std::array::from_fn(|_| next_free_port())
}

/// The ports [`free_addrs`] draws from: `[1024, the ephemeral range's start)`.
fn unshared_ports() -> std::ops::Range<u16> {
    // Linux's default when the file is unreadable (another OS, a locked-down sandbox).
    const EPHEMERAL_START: u16 = 32768;
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|start| *start > 2048)
        .unwrap_or(EPHEMERAL_START);
    1024..start
}

/// The next port from this process's counter that binds, as a loopback address.
fn next_free_port() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let ports = unshared_ports();
    let span = u32::from(ports.end - ports.start);
    let next = NEXT.get_or_init(|| AtomicU32::new(std::process::id().wrapping_mul(7919) % span));
    for _ in 0..span {
        let offset = next.fetch_add(1, Ordering::Relaxed) % span;
        let port = ports.start + u16::try_from(offset).expect("offset within a u16 range");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
    panic!("no free loopback port in {ports:?}: is something holding them all?");
}

/// `tidepool-balancer` arguments for tests: `listen` and `admin` addresses, health checks
/// every 200 ms with thresholds of 2, a 10 s deregistration delay and drain timeout.
pub fn balancer_args(listen: SocketAddr, admin: SocketAddr) -> Vec<String> {
    [
        "--listen",
        &listen.to_string(),
        "--admin",
        &admin.to_string(),
        "--health-interval",
        "200ms",
        "--health-timeout",
        "200ms",
        "--healthy-threshold",
        "2",
        "--unhealthy-threshold",
        "2",
        "--deregistration-delay",
        "10s",
        "--drain-timeout",
        "10s",
    ]
    .map(String::from)
    .to_vec()
}

/// `tidepool-balancer` autoscaling arguments for tests: `--autoscale` between `min` and
/// `max` workers at `target_load`, with 1 s stable and panic windows, 1 s out and 3 s in, so a test sees a
/// pool grow and shrink within seconds. The actuator flag (`--worker-cmd` or `--scale-cmd`)
/// is the caller's. The signal is requests in flight (`--scaling-signal in-flight`): these
/// tests exercise the actuators, and the tests' tiny model keeps its workers' busy shares
/// near zero at any load a test can drive, so the busy policy would rightly never grow the
/// pool (its own rules are tested on simulated time in the balancer's `autoscale` module).
pub fn fast_scaling_args(min: usize, max: usize, target_load: f64) -> Vec<String> {
    [
        "--autoscale".to_owned(),
        "--scaling-signal".to_owned(),
        "in-flight".to_owned(),
        "--min-workers".to_owned(),
        min.to_string(),
        "--max-workers".to_owned(),
        max.to_string(),
        "--target-load".to_owned(),
        target_load.to_string(),
        "--scaling-window".to_owned(),
        "1s".to_owned(),
        "--panic-window".to_owned(),
        "1s".to_owned(),
        "--scale-out-delay".to_owned(),
        "1s".to_owned(),
        "--scale-in-delay".to_owned(),
        "3s".to_owned(),
    ]
    .to_vec()
}

/// A child process that is killed on drop.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `binary(bin)` with `args`, standard error to `<dir>/<name>.log`.
    pub fn start(name: &str, bin: &str, args: &[String], dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("create log file");
        let child = Command::new(binary(bin))
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info,ort=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {bin}: {e}"));
        Proc {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`TERM`, `KILL`, `INT`) with the system's `kill`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// Waits up to `within` for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        format!(
            "---- {} ({}) ----\n{}",
            self.name,
            self.log.display(),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `within` with
/// `what` and the logs of `procs`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, procs: &[&Proc], mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = procs.iter().map(|p| p.log()).collect();
            panic!(
                "timed out after {within:?} waiting for {what}\n{}",
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until something accepts connections on `addr` (a process's port is bound).
pub async fn wait_listening(addr: SocketAddr, proc: &Proc) {
    eventually(
        Duration::from_secs(30),
        &format!("{addr} listening"),
        &[proc],
        || async { tokio::net::TcpStream::connect(addr).await.ok().map(drop) },
    )
    .await;
}
