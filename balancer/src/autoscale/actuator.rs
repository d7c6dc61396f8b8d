//! Actuators: what turns a desired worker count into running workers.
//!
//! - [`ProcessPool`] (`--worker-cmd`): worker processes on this machine, the balancer
//!   their parent. It binds each one's listening socket and hands it over as the child's
//!   fd 3 (systemd's socket activation convention, `LISTEN_FDS=1`), so the port is never
//!   free between the pick and the worker's accept loop: a port only released and bound
//!   again by the child could be taken meanwhile by any local process, which the balancer
//!   would then route clients to. It counts a worker as coming until its health checks
//!   pass, replaces one that dies, and scales in by work: the worker with the fewest
//!   outstanding requests is deregistered, stopped with SIGTERM once its last request is
//!   answered (or the deregistration delay passes), and only counted gone once it exited.
//! - [`ScaleCommand`] (`--scale-cmd`): runs a command with the count, e.g.
//!   `docker-compose up -d --no-recreate --scale worker={count}`. The orchestrator picks
//!   which container goes on scale-in; the worker drains on the SIGTERM it gets and
//!   deregisters itself first, so no request is lost either way. `deploy/compose/autoscale.yml`
//!   is the tested setup (tests/tests/compose_autoscale.rs): this balancer on the host,
//!   workers on the host's network, each on a free port, registering themselves.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use super::pool::Pool;
use crate::auth::{AdminToken, ADMIN_TOKEN_ENV, WORKER_TOKEN_ENV};
use crate::target::TargetState;

/// The default of `--worker-start-timeout`: a started worker that is not healthy within
/// this time is stopped and replaced. Loading a large model can take minutes.
pub const WORKER_START_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest run of one `--scale-cmd` before it counts as failed: `docker-compose up` may
/// pull an image first, which can take minutes, but a command that hangs must not stop
/// the scaling loop for good.
pub const SCALE_CMD_TIMEOUT: Duration = Duration::from_secs(300);

/// The fd a started worker finds its listening socket on: the first of systemd's.
const INHERITED_LISTENER_FD: i32 = 3;

/// How many sockets a started worker inherits, in systemd's variable.
const LISTEN_FDS_ENV: &str = "LISTEN_FDS";

/// One of the two actuators.
#[derive(Debug)]
pub enum Actuator {
    /// Worker processes on this machine.
    Processes(ProcessPool),
    /// An external command that sets the replica count.
    Command(ScaleCommand),
}

impl Actuator {
    /// Keeps the pool in line between decisions: reaps, promotes, drains, replaces.
    pub async fn tick(&mut self, pool: &dyn Pool) {
        match self {
            Actuator::Processes(processes) => processes.tick(pool),
            Actuator::Command(cmd) => cmd.tick(pool),
        }
    }

    /// Makes the pool `n` workers.
    pub async fn scale_to(&mut self, n: usize, pool: &dyn Pool) {
        match self {
            Actuator::Processes(processes) => processes.scale_to(n, pool),
            Actuator::Command(cmd) => cmd.scale_to(n, pool).await,
        }
    }

    /// Workers started and not yet ready, given the registry's counts of `healthy` and
    /// `initial` (registered, not yet healthy) targets.
    pub fn coming(&self, healthy: usize, initial: usize) -> usize {
        match self {
            Actuator::Processes(pool) => pool.coming(),
            Actuator::Command(cmd) => cmd.coming(healthy, initial),
        }
    }

    /// Workers being scaled in and not yet gone.
    pub fn leaving(&self) -> usize {
        match self {
            Actuator::Processes(pool) => pool.leaving(),
            Actuator::Command(_) => 0,
        }
    }

    /// Stops every worker this actuator started, letting each drain within `grace`.
    pub async fn shutdown(&mut self, grace: Duration) {
        if let Actuator::Processes(pool) = self {
            pool.shutdown(grace).await;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Started; not yet healthy in the registry.
    Starting,
    /// Healthy at least once; taking requests.
    Running,
    /// Deregistered by a scale-in; `terminated` once SIGTERM was sent.
    Leaving {
        since: Instant,
        terminated: Option<Instant>,
    },
}

#[derive(Debug)]
struct Managed {
    addr: SocketAddr,
    child: Child,
    /// The write end of the worker's stdin pipe, never written: when the balancer dies,
    /// SIGKILL included, the kernel closes it and the worker (`--exit-with-parent`, set
    /// through its environment) drains and exits. Held for the worker's whole life.
    _lifeline: Option<tokio::process::ChildStdin>,
    started: Instant,
    phase: Phase,
}

/// Worker processes started from `--worker-cmd`.
#[derive(Debug)]
pub struct ProcessPool {
    template: String,
    admin: SocketAddr,
    host: std::net::IpAddr,
    workers: Vec<Managed>,
    want: usize,
    next_index: usize,
    deregistration_delay: Duration,
    start_timeout: Duration,
    stop_timeout: Duration,
    /// The admin token, given to each worker in its environment so that it can register.
    register_token: Option<AdminToken>,
    /// `--max-workers`: past it, targets this pool did not start are deregistered.
    max_workers: usize,
}

impl ProcessPool {
    /// A pool that starts workers with `template` (`{port}`, `{admin}`, `{index}`
    /// replaced), listening on `host`.
    pub fn new(
        template: String,
        admin: SocketAddr,
        deregistration_delay: Duration,
        start_timeout: Duration,
        stop_timeout: Duration,
    ) -> ProcessPool {
        ProcessPool {
            template,
            admin,
            host: std::net::IpAddr::from([127, 0, 0, 1]),
            workers: Vec::new(),
            want: 0,
            next_index: 1,
            deregistration_delay,
            start_timeout,
            stop_timeout,
            register_token: None,
            max_workers: usize::MAX,
        }
    }

    /// Starts workers with `token` in their environment (`TIDEPOOL_WORKER_REGISTER_TOKEN`),
    /// never on their command line, which `ps` shows.
    pub fn with_register_token(mut self, token: Option<AdminToken>) -> ProcessPool {
        self.register_token = token;
        self
    }

    /// Caps the pool at `n` workers (`--max-workers`): targets registered beyond it that
    /// this pool did not start (a worker left running by an earlier balancer, registering
    /// itself) are deregistered.
    pub fn max_workers(mut self, n: usize) -> ProcessPool {
        self.max_workers = n;
        self
    }

    /// Registered targets, not draining, that this pool did not start, the least busy
    /// first.
    fn strangers(&self, pool: &dyn Pool) -> Vec<(usize, SocketAddr)> {
        let mut strangers: Vec<(usize, SocketAddr)> = pool
            .targets()
            .into_iter()
            .filter(|t| t.state != TargetState::Draining)
            .filter(|t| !self.workers.iter().any(|w| w.addr == t.addr))
            .map(|t| (t.outstanding, t.addr))
            .collect();
        strangers.sort();
        strangers
    }

    /// Workers started and not yet healthy.
    pub fn coming(&self) -> usize {
        self.workers
            .iter()
            .filter(|w| w.phase == Phase::Starting)
            .count()
    }

    /// Workers being scaled in.
    pub fn leaving(&self) -> usize {
        self.workers
            .iter()
            .filter(|w| matches!(w.phase, Phase::Leaving { .. }))
            .count()
    }

    /// The addresses of the workers that are not leaving.
    pub fn active(&self) -> Vec<SocketAddr> {
        self.workers
            .iter()
            .filter(|w| !matches!(w.phase, Phase::Leaving { .. }))
            .map(|w| w.addr)
            .collect()
    }

    fn tick(&mut self, pool: &dyn Pool) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.workers.len() {
            let w = &mut self.workers[i];
            if let Ok(Some(status)) = w.child.try_wait() {
                let w = self.workers.swap_remove(i);
                exited(&w, status, pool);
                continue;
            }
            match w.phase {
                Phase::Starting => {
                    if pool
                        .target(w.addr)
                        .is_some_and(|t| t.state == TargetState::Healthy)
                    {
                        tracing::info!(worker = %w.addr, after = ?w.started.elapsed(), "worker ready");
                        w.phase = Phase::Running;
                    } else if w.started.elapsed() > self.start_timeout {
                        tracing::warn!(worker = %w.addr, timeout = ?self.start_timeout,
                            "worker not healthy in time; stopping it, a new one replaces it");
                        let _ = w.child.start_kill();
                    }
                }
                Phase::Running => {}
                Phase::Leaving { since, terminated } => {
                    let outstanding = pool
                        .targets()
                        .iter()
                        .filter(|t| t.addr == w.addr)
                        .map(|t| t.outstanding)
                        .sum::<usize>();
                    match terminated {
                        None if outstanding == 0 || now - since > self.deregistration_delay => {
                            tracing::info!(worker = %w.addr, outstanding, "scale-in: stopping drained worker (SIGTERM)");
                            signal(&w.child, Signal::SIGTERM);
                            w.phase = Phase::Leaving {
                                since,
                                terminated: Some(now),
                            };
                        }
                        Some(at) if now - at > self.stop_timeout => {
                            tracing::warn!(worker = %w.addr, "worker did not exit after SIGTERM; killing it");
                            let _ = w.child.start_kill();
                        }
                        _ => {}
                    }
                }
            }
            i += 1;
        }
        // Workers it did not start count in the pool; above --max-workers they go.
        let strangers = self.strangers(pool);
        let active = self.active().len();
        let excess = (active + strangers.len())
            .saturating_sub(self.max_workers)
            .min(strangers.len());
        for (outstanding, addr) in strangers.iter().take(excess) {
            tracing::info!(worker = %addr, outstanding, max_workers = self.max_workers,
                "deregistering a worker this balancer did not start: the pool is above --max-workers");
            pool.deregister(*addr);
        }
        // A worker that died is replaced here: the pool goes back to what was asked.
        let total = active + strangers.len() - excess;
        for _ in total..self.want {
            self.start_one();
        }
    }

    fn scale_to(&mut self, n: usize, pool: &dyn Pool) {
        self.want = n;
        let active = self.active();
        // The pool is what it started plus what registered itself; only a pool below `n`
        // starts anything, so a scale-in never starts a process.
        let strangers = self.strangers(pool);
        let total = active.len() + strangers.len();
        if total < n {
            for _ in total..n {
                self.start_one();
            }
            return;
        }
        // Scale in: workers it did not start go first (deregistered; it cannot stop them),
        // then its own by work, the fewest outstanding requests first.
        let mut excess = total - n;
        for (outstanding, addr) in strangers.into_iter().take(excess) {
            tracing::info!(worker = %addr, outstanding, "scale-in: deregistering a worker this balancer did not start");
            pool.deregister(addr);
            excess -= 1;
        }
        let load = |addr: SocketAddr| pool.target(addr).map_or(0, |t| t.outstanding);
        let mut by_load: Vec<(usize, SocketAddr)> = active.iter().map(|&a| (load(a), a)).collect();
        by_load.sort();
        for (outstanding, addr) in by_load.into_iter().take(excess) {
            if let Some(w) = self.workers.iter_mut().find(|w| w.addr == addr) {
                tracing::info!(worker = %addr, outstanding, "scale-in: deregistering worker");
                pool.deregister(addr);
                w.phase = Phase::Leaving {
                    since: Instant::now(),
                    terminated: None,
                };
            }
        }
    }

    fn start_one(&mut self) {
        // Bound (and listening) here and kept until the child has it: connections that
        // arrive before the worker accepts wait in the backlog.
        let (listener, port) = match TcpListener::bind((self.host, 0))
            .and_then(|l| l.local_addr().map(|addr| (l, addr.port())))
        {
            Ok(bound) => bound,
            Err(error) => {
                tracing::error!(%error, "no free port for a new worker");
                return;
            }
        };
        let index = self.next_index;
        self.next_index += 1;
        let line = self
            .template
            .replace("{port}", &port.to_string())
            .replace("{admin}", &self.admin.to_string())
            .replace("{index}", &index.to_string());
        let Ok(words) = shell_words::split(&line) else {
            tracing::error!(%line, "--worker-cmd has unbalanced quotes");
            return;
        };
        let Some((program, args)) = words.split_first() else {
            return;
        };
        let mut command = Command::new(program);
        // Its stdin is a pipe whose write end only this process holds (opened
        // close-on-exec): the worker exits with the balancer, however the balancer ends.
        command
            .args(args)
            .stdin(Stdio::piped())
            .env("TIDEPOOL_WORKER_EXIT_WITH_PARENT", "true")
            .kill_on_drop(true)
            // A worker needs only the registration token, not the balancer's own variable.
            .env_remove(ADMIN_TOKEN_ENV);
        if let Some(token) = &self.register_token {
            command.env(WORKER_TOKEN_ENV, token.expose());
        }
        // The listening socket as fd 3, announced the way systemd does (without
        // `LISTEN_PID`, which only the child could know). The command owns the socket until
        // it is dropped at the end of this function, after the spawn: from then on only the
        // child holds the port.
        command
            .env(LISTEN_FDS_ENV, "1")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS_FIRST_FD")
            .env_remove("LISTEN_FDNAMES");
        if let Err(error) = command.fd_mappings(vec![FdMapping {
            parent_fd: OwnedFd::from(listener),
            child_fd: INHERITED_LISTENER_FD,
        }]) {
            tracing::error!(%error, "could not hand a worker its listening socket");
            return;
        }
        match command.spawn() {
            Ok(mut child) => {
                let addr = SocketAddr::new(self.host, port);
                tracing::info!(worker = %addr, pid = child.id(), "started worker");
                let lifeline = child.stdin.take();
                self.workers.push(Managed {
                    addr,
                    child,
                    _lifeline: lifeline,
                    started: Instant::now(),
                    phase: Phase::Starting,
                });
            }
            Err(error) => {
                tracing::error!(%error, program, "could not start worker; check --worker-cmd")
            }
        }
    }

    async fn shutdown(&mut self, grace: Duration) {
        for w in &self.workers {
            signal(&w.child, Signal::SIGTERM);
        }
        let deadline = tokio::time::Instant::now() + grace;
        for w in &mut self.workers {
            match tokio::time::timeout_at(deadline, w.child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!(worker = %w.addr, "worker did not stop in time; killing it");
                    let _ = w.child.kill().await;
                }
            }
        }
        self.workers.clear();
    }
}

fn exited(w: &Managed, status: ExitStatus, pool: &dyn Pool) {
    match w.phase {
        Phase::Leaving { .. } => {
            tracing::info!(worker = %w.addr, %status, "scale-in: worker gone");
        }
        _ => {
            tracing::warn!(worker = %w.addr, %status, "worker exited unexpectedly; replacing it");
            pool.deregister(w.addr);
        }
    }
}

fn signal(child: &Child, signal: Signal) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
}

/// `--scale-cmd`: sets the replica count of an external orchestrator.
#[derive(Debug)]
pub struct ScaleCommand {
    template: String,
    timeout: Duration,
    /// The last count asked for and when: until the new workers show up in the registry
    /// (through DNS), the difference counts as coming.
    requested: Option<(usize, Instant)>,
    start_timeout: Duration,
}

impl ScaleCommand {
    /// Runs `template` with `{count}` replaced, at most `timeout` per run.
    pub fn new(template: String, timeout: Duration, start_timeout: Duration) -> ScaleCommand {
        ScaleCommand {
            template,
            timeout,
            requested: None,
            start_timeout,
        }
    }

    fn tick(&mut self, _pool: &dyn Pool) {
        if let Some((_, at)) = self.requested {
            if at.elapsed() > self.start_timeout {
                self.requested = None;
            }
        }
    }

    fn coming(&self, healthy: usize, initial: usize) -> usize {
        match self.requested {
            // Asked for and not yet healthy, whether or not DNS has shown them yet.
            Some((n, _)) => initial.max(n.saturating_sub(healthy)),
            None => initial,
        }
    }

    async fn scale_to(&mut self, n: usize, _pool: &dyn Pool) {
        let line = self.template.replace("{count}", &n.to_string());
        let Ok(words) = shell_words::split(&line) else {
            tracing::error!(%line, "--scale-cmd has unbalanced quotes");
            return;
        };
        let Some((program, args)) = words.split_first() else {
            return;
        };
        tracing::info!(%line, "scaling: running --scale-cmd");
        let run = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(out)) if out.status.success() => {
                self.requested = Some((n, Instant::now()));
            }
            Ok(Ok(out)) => tracing::error!(
                status = %out.status,
                stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                "--scale-cmd failed"
            ),
            Ok(Err(error)) => tracing::error!(%error, program, "could not run --scale-cmd"),
            Err(_) => {
                tracing::error!(timeout = ?self.timeout, "--scale-cmd did not finish in time")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::pool::fake::FakePool;

    /// A worker command that starts a real process and serves nothing: it sleeps until it
    /// is signalled. `{port}` lands in `$0`.
    const SLEEPER: &str = "sh -c 'exec sleep 60' {port}";

    fn process_pool() -> ProcessPool {
        process_pool_running(SLEEPER)
    }

    /// A pool whose workers run `template`.
    fn process_pool_running(template: &str) -> ProcessPool {
        ProcessPool::new(
            template.to_owned(),
            "127.0.0.1:7001".parse().unwrap(),
            Duration::from_secs(60),
            Duration::from_secs(60),
            Duration::from_secs(5),
        )
    }

    /// Waits for the process behind `addr` to exit (it was signalled or killed).
    async fn exit_of(pool: &mut ProcessPool, addr: SocketAddr) {
        let worker = pool.workers.iter_mut().find(|w| w.addr == addr).unwrap();
        tokio::time::timeout(Duration::from_secs(10), worker.child.wait())
            .await
            .expect("the worker exits within 10 s")
            .unwrap();
    }

    #[tokio::test]
    async fn processes_start_become_ready_and_leave_by_least_work() {
        let fake = FakePool::default();
        let mut actuator = Actuator::Processes(process_pool());
        actuator.scale_to(2, &fake).await;
        let Actuator::Processes(pool) = &mut actuator else {
            unreachable!()
        };
        let started = pool.active();
        assert_eq!(started.len(), 2);
        assert_ne!(started[0], started[1], "each on its own port");
        assert_eq!(actuator.coming(0, 0), 2, "started, not yet healthy");

        // Healthy in the registry: ready. The second is busier.
        fake.set(started[0], TargetState::Healthy, 0);
        fake.set(started[1], TargetState::Healthy, 3);
        actuator.tick(&fake).await;
        assert_eq!(actuator.coming(2, 0), 0);

        // Scale in by work: the idle one is deregistered and leaves.
        actuator.scale_to(1, &fake).await;
        assert_eq!(fake.deregistered(), vec![started[0]]);
        assert_eq!(actuator.leaving(), 1);
        // Nothing outstanding on it: SIGTERM at the next tick; gone once it exited.
        actuator.tick(&fake).await;
        let Actuator::Processes(pool) = &mut actuator else {
            unreachable!()
        };
        exit_of(pool, started[0]).await;
        actuator.tick(&fake).await;
        assert_eq!(actuator.leaving(), 0);
        let Actuator::Processes(pool) = &mut actuator else {
            unreachable!()
        };
        assert_eq!(pool.active(), vec![started[1]]);
        assert_eq!(
            fake.deregistered(),
            vec![started[0]],
            "no replacement asked"
        );

        actuator.shutdown(Duration::from_secs(5)).await;
        let Actuator::Processes(pool) = &actuator else {
            unreachable!()
        };
        assert!(pool.active().is_empty());
    }

    #[tokio::test]
    async fn a_worker_that_dies_is_deregistered_and_replaced() {
        let fake = FakePool::default();
        let mut pool = process_pool();
        pool.scale_to(1, &fake);
        let first = pool.active()[0];
        fake.set(first, TargetState::Healthy, 0);
        pool.tick(&fake);
        pool.workers[0].child.start_kill().unwrap();
        exit_of(&mut pool, first).await;

        pool.tick(&fake);
        assert_eq!(fake.deregistered(), vec![first]);
        let active = pool.active();
        assert_eq!(active.len(), 1, "back to what was asked");
        assert_ne!(active[0], first);
        assert_eq!(pool.coming(), 1);
        pool.shutdown(Duration::from_secs(5)).await;
    }

    /// `n` self-registered workers this pool did not start, healthy and idle.
    fn strangers(fake: &FakePool, n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| {
                let addr = SocketAddr::from(([127, 0, 0, 1], 9000 + i));
                fake.set(addr, TargetState::Healthy, usize::from(i));
                addr
            })
            .collect()
    }

    #[tokio::test]
    async fn a_scale_in_never_starts_a_process_and_strangers_go_first() {
        let fake = FakePool::default();
        let others = strangers(&fake, 5);
        let mut pool = process_pool();
        pool.scale_to(3, &fake);
        assert!(pool.active().is_empty(), "nothing started on a scale-in");
        assert_eq!(pool.coming(), 0, "only what it started counts as coming");
        assert_eq!(
            fake.deregistered(),
            others[..2].to_vec(),
            "the least busy first"
        );
    }

    #[tokio::test]
    async fn workers_it_did_not_start_are_deregistered_above_max_workers() {
        let fake = FakePool::default();
        let others = strangers(&fake, 5);
        let mut pool = process_pool().max_workers(3);
        pool.tick(&fake);
        assert_eq!(fake.deregistered(), others[..2].to_vec());
        assert!(pool.active().is_empty());
        pool.tick(&fake);
        assert_eq!(
            fake.deregistered().len(),
            2,
            "at --max-workers now: no more"
        );
    }

    #[tokio::test]
    async fn a_worker_inherits_its_listening_socket_and_the_port_is_never_free() {
        // The child checks what it inherited (systemd's variable, a socket on fd 3) and then
        // lives until its lifeline closes; its exit status says whether the checks passed.
        let fake = FakePool::default();
        let mut pool = process_pool_running(
            r#"sh -c 'test "$LISTEN_FDS" = 1 && test -z "$LISTEN_PID" && test -S /proc/self/fd/3 && exec cat >/dev/null' {port}"#,
        );
        pool.scale_to(1, &fake);
        let addr = pool.active()[0];
        // This process let its copy go with the spawn: the child alone holds the port, and
        // it listens (a connection waits in the backlog for the worker's accept loop).
        let err = TcpListener::bind(addr).expect_err("the port is taken from the pick on");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
        std::net::TcpStream::connect(addr).expect("the inherited socket listens");
        let worker = &mut pool.workers[0];
        worker._lifeline = None;
        let status = tokio::time::timeout(Duration::from_secs(10), worker.child.wait())
            .await
            .expect("the worker exits within 10 s of its lifeline closing")
            .unwrap();
        assert!(
            status.success(),
            "the child found LISTEN_FDS=1 and a socket on fd 3: {status}"
        );
    }

    #[tokio::test]
    async fn a_worker_exits_when_its_lifeline_closes() {
        // Serves until its stdin reaches end of file, as `--exit-with-parent` does, and
        // fails at once without the variable that asks for it.
        let fake = FakePool::default();
        let mut pool = process_pool_running(
            r#"sh -c 'test "$TIDEPOOL_WORKER_EXIT_WITH_PARENT" = true && exec cat >/dev/null' {port}"#,
        );
        pool.scale_to(1, &fake);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let worker = &mut pool.workers[0];
        assert!(
            worker.child.try_wait().unwrap().is_none(),
            "running while the balancer is"
        );
        // What the kernel does when the balancer dies, SIGKILL included.
        worker._lifeline = None;
        let status = tokio::time::timeout(Duration::from_secs(10), worker.child.wait())
            .await
            .expect("the worker exits within 10 s of its parent")
            .unwrap();
        assert!(status.success(), "{status}");
    }

    #[tokio::test]
    async fn a_scale_command_counts_what_it_asked_for_as_coming() {
        let fake = FakePool::default();
        let mut ok = Actuator::Command(ScaleCommand::new(
            "true {count}".to_owned(),
            Duration::from_secs(10),
            WORKER_START_TIMEOUT,
        ));
        assert_eq!(ok.coming(1, 0), 0);
        ok.scale_to(3, &fake).await;
        assert_eq!(ok.coming(1, 0), 2, "asked for 3, 1 healthy");
        assert_eq!(ok.coming(1, 2), 2, "registered ones count once");
        assert_eq!(ok.leaving(), 0, "the orchestrator drains its own");

        // A failed run asks for nothing: only registered targets count.
        let mut failing = Actuator::Command(ScaleCommand::new(
            "false {count}".to_owned(),
            Duration::from_secs(10),
            WORKER_START_TIMEOUT,
        ));
        failing.scale_to(3, &fake).await;
        assert_eq!(failing.coming(1, 1), 1);

        // So does a run that does not finish in time.
        let mut hanging = Actuator::Command(ScaleCommand::new(
            "sleep 30 {count}".to_owned(),
            Duration::from_millis(50),
            WORKER_START_TIMEOUT,
        ));
        hanging.scale_to(3, &fake).await;
        assert_eq!(hanging.coming(1, 0), 0);
    }
}
