//! Child processes for the contenders (balancer, HAProxy, targets): each stops with its
//! handle, so a benchmark that fails half-way leaves nothing running.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A child process, killed and reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    /// Starts `command` with stdin closed; `name` is for error messages.
    pub fn spawn(name: &str, command: &mut Command) -> anyhow::Result<Proc> {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
        })
    }

    /// The process id (for `perf record -p`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails when the process has already exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early: {status}", self.name);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU seconds (user and system) a process has used so far, from /proc; zero when it cannot
/// be read.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    ticks / CLOCK_TICKS
}

/// The kernel's USER_HZ, 100 on every Linux this runs on.
const CLOCK_TICKS: f64 = 100.0;

/// A port on 127.0.0.1 that was free a moment ago (the kernel hands out ephemeral ports in
/// turn, so it is not given again soon).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until `addr` accepts a TCP connection, `timeout` at most.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!("{addr} did not accept connections within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A binary built next to the running one (the same cargo target directory and profile).
pub fn sibling_exe(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .context("the running binary has no directory")?
        .join(name);
    if !path.is_file() {
        bail!(
            "{} is missing; build it first (cargo build --release --workspace --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// Starts `bench-target` with one listener per service time (zero: an echo that answers at
/// once) and returns the process and the listeners' addresses, in order.
pub fn start_targets(services: &[Duration]) -> anyhow::Result<(Proc, Vec<SocketAddr>)> {
    start_targets_threads(services, 1)
}

/// As [`start_targets`], the targets' runtime on `threads` threads (so that they keep up
/// with a balancer that has several).
pub fn start_targets_threads(
    services: &[Duration],
    threads: usize,
) -> anyhow::Result<(Proc, Vec<SocketAddr>)> {
    let mut command = Command::new(sibling_exe("bench-target")?);
    command.arg("--threads").arg(threads.max(1).to_string());
    for s in services {
        command.arg("--service-us").arg(s.as_micros().to_string());
    }
    command.stdout(Stdio::piped());
    let mut proc = Proc::spawn("bench-target", &mut command)?;
    let stdout = proc.child.stdout.take().context("bench-target's stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut addrs = Vec::with_capacity(services.len());
    while addrs.len() < services.len() {
        let line = lines
            .next()
            .context("bench-target exited before listing its addresses")??;
        if let Some(addr) = line.strip_prefix("listening ") {
            addrs.push(addr.trim().parse()?);
        }
    }
    Ok((proc, addrs))
}

/// Starts HAProxy in TCP mode with `balance leastconn` over `targets`, listening on
/// `listen`, with its configuration written under `dir`. Returns once it accepts.
pub fn start_haproxy(
    dir: &Path,
    listen: SocketAddr,
    targets: &[SocketAddr],
) -> anyhow::Result<Proc> {
    let mut cfg = String::from(
        "# Written by bench-balancer: HAProxy as the peer, TCP mode, least connections.\n\
         global\n    maxconn 4096\n\n\
         defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 120s\n    timeout server 120s\n\n",
    );
    cfg.push_str(&format!(
        "frontend bench\n    bind {listen}\n    default_backend targets\n\n\
         backend targets\n    balance leastconn\n"
    ));
    for (i, t) in targets.iter().enumerate() {
        cfg.push_str(&format!("    server t{i} {t}\n"));
    }
    std::fs::create_dir_all(dir)?;
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg)?;
    // -db: stay in the foreground, so that dropping the handle stops it.
    let mut proc = Proc::spawn(
        "haproxy",
        Command::new("haproxy").arg("-db").arg("-f").arg(&path),
    )?;
    let started = Instant::now();
    while TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_err() {
        proc.check_running()?;
        if started.elapsed() > Duration::from_secs(10) {
            bail!("haproxy did not accept connections on {listen} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(proc)
}

/// `haproxy -v`'s first line, or why there is none.
pub fn haproxy_version() -> String {
    Command::new("haproxy")
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "haproxy not found".to_owned())
}

/// How to start tidepool-balancer for a benchmark.
#[derive(Clone, Debug)]
pub struct BalancerSpec {
    /// `--routing`: `p2c`, `full-scan` or `round-robin`.
    pub routing: &'static str,
    /// The targets, registered with `--target`.
    pub targets: Vec<SocketAddr>,
    /// Another build of tidepool-balancer to run instead of this one's (a baseline built
    /// from an earlier commit, for before/after figures from the same run).
    pub binary: Option<PathBuf>,
}

/// Starts the release tidepool-balancer binary with fast health checks, and returns once
/// every target is healthy, with its listen address.
pub fn start_balancer(spec: &BalancerSpec) -> anyhow::Result<(Proc, SocketAddr)> {
    start_balancer_with(spec, &[])
}

/// As [`start_balancer`], with `extra` flags (`--tls-cert ...`).
pub fn start_balancer_with(
    spec: &BalancerSpec,
    extra: &[String],
) -> anyhow::Result<(Proc, SocketAddr)> {
    start_balancer_admin(spec, extra).map(|(proc, listen, _)| (proc, listen))
}

/// As [`start_balancer_with`], also returning the admin API's address (for `/metrics`).
pub fn start_balancer_admin(
    spec: &BalancerSpec,
    extra: &[String],
) -> anyhow::Result<(Proc, SocketAddr, SocketAddr)> {
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let binary = match &spec.binary {
        Some(path) => path.clone(),
        None => sibling_exe("tidepool-balancer")?,
    };
    let mut command = Command::new(binary);
    command
        .env("RUST_LOG", "warn")
        .args(["--listen", &listen.to_string()])
        .args(["--admin", &admin.to_string()])
        .args(["--routing", spec.routing])
        .args(["--health-interval", "200ms", "--health-timeout", "150ms"])
        .args(["--healthy-threshold", "1"]);
    for t in &spec.targets {
        command.args(["--target", &t.to_string()]);
    }
    command.args(extra);
    let mut proc = Proc::spawn("tidepool-balancer", &mut command)?;
    wait_for_port(admin, Duration::from_secs(10))?;
    let started = Instant::now();
    loop {
        proc.check_running()?;
        let body = http_get(admin, "/targets").unwrap_or_default();
        if body.matches("\"healthy\"").count() >= spec.targets.len() {
            break;
        }
        if started.elapsed() > Duration::from_secs(10) {
            bail!("the balancer's targets did not all turn healthy within 10 s: {body}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_for_port(listen, Duration::from_secs(5))?;
    Ok((proc, listen, admin))
}

/// A plain HTTP/1.1 GET; the body as text.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_owned()))
}
