//! Sharded accept (`--shards N`): N client listeners bound to one port with `SO_REUSEPORT`,
//! each owned by a thread that runs its own single-threaded runtime.
//!
//! The kernel spreads new client connections over the listeners; a connection then lives
//! on its shard's thread, and so do the shard's own connections to each target
//! (`--connections-per-target` per shard, spawned on the shard's runtime by the target
//! group; [`current`] lets routing prefer them). A request read on a shard is written to a
//! target, answered and written back to its client without waking another thread, which
//! the multi-threaded runtime (`--runtime-threads 0`) cannot promise: there a reader on one
//! core hands each frame to a writer on another.
//!
//! What stays shared, because it must be exact or bounded across shards: the target group
//! (one outstanding count per target, an atomic, so least-outstanding and
//! `--max-outstanding` hold across shards), the wait queue and its task, retries, outlier
//! detection, hedging, the frame budget, the `--max-connections` slots, the request
//! lifecycle that draining waits on, and the admin API. Those tasks (admin, health checks,
//! the queue, hedging, autoscaling) run on the `--runtime-threads` runtime; a request routed
//! from the queue (or a hedge) takes any shard's connection.
//!
//! `SO_REUSEPORT` lets any process of the same user join the port's group and take a share
//! of the connections. Before binding the group, the port is therefore bound once without
//! it: if another group (an older balancer still running) holds the port, that fails and
//! the balancer refuses to start, rather than splitting clients with it.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::error::Error;

/// Connections a listener may hold unaccepted.
const BACKLOG: i32 = 1024;

thread_local! {
    /// The shard whose thread this is; `None` on every other thread.
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The shard whose thread is running now, if this is a shard's thread.
pub(crate) fn current() -> Option<usize> {
    CURRENT.with(Cell::get)
}

/// The shards `--shards` asks for: 0 is one per CPU core.
pub(crate) fn count(requested: usize) -> usize {
    match requested {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// The shards' runtimes, by shard, for spawning each shard's connections to a target;
/// empty when the balancer is not sharded. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub(crate) struct ShardRuntimes(Arc<[Handle]>);

impl ShardRuntimes {
    /// How many shards there are (0: not sharded).
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The runtime of `shard`.
    pub(crate) fn get(&self, shard: usize) -> Option<&Handle> {
        self.0.get(shard)
    }
}

/// The running shards: a thread and a listener each. Dropping it ends their threads (and
/// drops whatever still runs there).
pub(crate) struct Shards {
    /// One per shard, registered with its shard's runtime; taken by [`Shards::serve`].
    listeners: Vec<TcpListener>,
    runtimes: ShardRuntimes,
    addr: SocketAddr,
    /// Ends every shard's runtime.
    stop: CancellationToken,
    /// Resolved by each shard's thread once its runtime is gone.
    stopped: Vec<oneshot::Receiver<()>>,
}

impl std::fmt::Debug for Shards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shards")
            .field("shards", &self.runtimes.len())
            .field("addr", &self.addr)
            .finish()
    }
}

impl Shards {
    /// Starts `count` shard threads, each with a runtime and a listener on `addr` (with
    /// port 0, the port picked for the first).
    pub(crate) async fn start(count: usize, addr: SocketAddr) -> Result<Shards, Error> {
        let bind_fail = |source| Error::Bind {
            what: "listen",
            addr,
            source,
        };
        let addr = exclusive_port(addr).map_err(bind_fail)?;
        let stop = CancellationToken::new();
        let mut shards = Shards {
            listeners: Vec::with_capacity(count),
            runtimes: ShardRuntimes::default(),
            addr,
            stop,
            stopped: Vec::with_capacity(count),
        };
        let mut runtimes = Vec::with_capacity(count);
        for shard in 0..count {
            let fail = |source| Error::Shard {
                shard,
                shards: count,
                source,
            };
            // On failure `shards` drops, which ends the threads already started.
            let (runtime, stopped) = shards.spawn_thread(shard).await.map_err(fail)?;
            let listener = {
                // Registered with the shard's own I/O driver, whose thread will poll it.
                let _entered = runtime.enter();
                reuseport_listener(addr).and_then(TcpListener::from_std)
            }
            .map_err(bind_fail)?;
            shards.listeners.push(listener);
            shards.stopped.push(stopped);
            runtimes.push(runtime);
        }
        shards.runtimes = ShardRuntimes(runtimes.into());
        Ok(shards)
    }

    /// Starts shard `shard`'s thread; returns its runtime's handle and what resolves when
    /// the thread has dropped its runtime.
    async fn spawn_thread(&self, shard: usize) -> io::Result<(Handle, oneshot::Receiver<()>)> {
        let (ready, started) = oneshot::channel();
        let (done, stopped) = oneshot::channel();
        let stop = self.stop.clone();
        std::thread::Builder::new()
            .name(format!("tidepool-shard-{shard}"))
            .spawn(move || {
                // Built on its own thread: a runtime may not be dropped inside another's
                // async context, which a failed start would otherwise do.
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = ready.send(Err(error));
                        return;
                    }
                };
                CURRENT.with(|current| current.set(Some(shard)));
                let _ = ready.send(Ok(runtime.handle().clone()));
                // The runtime runs its tasks only while something blocks on it.
                runtime.block_on(stop.cancelled());
                drop(runtime);
                let _ = done.send(());
            })?;
        let handle = started.await.map_err(|_| {
            io::Error::other("the shard's thread ended before its runtime started")
        })??;
        Ok((handle, stopped))
    }

    /// The address every shard listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shards' runtimes, for the target group.
    pub(crate) fn runtimes(&self) -> ShardRuntimes {
        self.runtimes.clone()
    }

    /// Runs `serve` over each shard's listener on that shard's runtime, and returns once
    /// every one has returned (each stops accepting at the shutdown `serve` is given).
    pub(crate) async fn serve<F, Fut>(&mut self, serve: F)
    where
        F: Fn(TcpListener) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let running: Vec<_> = std::mem::take(&mut self.listeners)
            .into_iter()
            .enumerate()
            .filter_map(|(shard, listener)| {
                let runtime = self.runtimes.get(shard)?;
                Some(runtime.spawn(serve(listener)))
            })
            .collect();
        for task in running {
            if let Err(join) = task.await {
                tracing::warn!(%join, "a shard's accept loop failed");
            }
        }
    }

    /// Ends every shard's runtime, dropping what still runs there, and waits until each
    /// thread has let go of it. Call it last: the shards carry client connections and
    /// connections to the targets.
    pub(crate) async fn stop(mut self) {
        self.stop.cancel();
        for stopped in std::mem::take(&mut self.stopped) {
            let _ = stopped.await;
        }
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Binds `addr` once without `SO_REUSEPORT` and lets it go: fails when another listener
/// holds the port (with `SO_REUSEPORT` or without), and picks the port when it is 0.
fn exclusive_port(addr: SocketAddr) -> io::Result<SocketAddr> {
    let probe = socket(addr)?;
    probe.bind(&addr.into())?;
    probe
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("the bound address is not an IP address"))
}

/// A non-blocking listener on `addr` that other sockets with `SO_REUSEPORT` may share.
fn reuseport_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = socket(addr)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// A non-blocking TCP socket for `addr`'s family with `SO_REUSEADDR` (a restart does not
/// wait out the old connections' TIME_WAIT) and `TCP_NODELAY`.
fn socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_shard_listens_on_one_port_and_runs_on_its_own_thread() {
        let mut shards = Shards::start(3, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = shards.addr();
        assert_ne!(addr.port(), 0);
        assert_eq!(shards.runtimes().len(), 3);
        let (seen, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        let serving = tokio::spawn(async move {
            shards
                .serve(move |listener| {
                    let seen = seen.clone();
                    async move {
                        assert_eq!(listener.local_addr().unwrap(), addr);
                        let _ = seen.send((current(), std::thread::current().id()));
                    }
                })
                .await;
            shards
        });
        let shards = serving.await.unwrap();
        let mut ran = Vec::new();
        while let Ok(one) = seen_rx.try_recv() {
            ran.push(one);
        }
        ran.sort_by_key(|(shard, _)| *shard);
        assert_eq!(
            ran.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![Some(0), Some(1), Some(2)]
        );
        assert_ne!(ran[0].1, ran[1].1);
        assert_ne!(ran[1].1, std::thread::current().id());
        assert_eq!(current(), None, "the caller's thread is no shard");
        shards.stop().await;
    }

    #[tokio::test]
    async fn a_port_another_listener_holds_is_refused() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let error = Shards::start(2, taken.local_addr().unwrap())
            .await
            .unwrap_err();
        assert!(
            matches!(error, Error::Bind { what: "listen", .. }),
            "{error}"
        );

        // Nor may a second sharded balancer join the first one's port.
        let first = Shards::start(2, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let error = Shards::start(2, first.addr()).await.unwrap_err();
        assert!(matches!(error, Error::Bind { .. }), "{error}");
        first.stop().await;
    }

    #[test]
    fn zero_means_one_shard_per_core() {
        assert!(count(0) >= 1);
        assert_eq!(count(3), 3);
    }
}
