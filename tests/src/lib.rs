//! The harness every tidepool integration suite shares.
//!
//! - [`admin`]: a balancer's admin API over TLS on a published port: `GET`, `/targets`,
//!   what it routed.
//! - [`adversary`]: hand-made malformed bodies, VmRSS, metrics, a real worker's arguments.
//! - [`stand_in`]: an in-process target that speaks the protocol with a configurable
//!   delay and echoes its inputs, for testing clients and the balancer without a model.
//! - [`balancer`]: an in-process balancer with fast health checks, raw frames, admin calls.
//! - [`compose`]: docker compose projects on this machine's engine, torn down on drop.
//! - [`worker`]: tiny synthetic models, in-process workers, a stand-in admin API.
//! - [`process`]: the real binaries as child processes, killed on drop.
//! - [`tls`]: test certificates (made in-process) and https calls to a TLS admin API.
//! - [`drive`]: a load driver that counts the answers to each request id on the wire.
//! - [`pool_load`]: steady calls through a `Pool`, each call's outcome recorded once.
//! - [`init_tracing`]: logs for a failing test, once per process (`RUST_LOG`).
//!
//! Everything binds `127.0.0.1:0` and is stopped by the test that started it.

pub mod admin;
pub mod adversary;
pub mod balancer;
pub mod compose;
pub mod drive;
pub mod pool_load;
pub mod process;
pub mod stand_in;
pub mod tls;
pub mod worker;

use std::sync::Once;

/// Installs a test-friendly tracing subscriber once; honours `RUST_LOG`.
pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
    });
}
