//! The harness every tidepool integration suite shares.
//!
//! - [`stand_in`]: an in-process target that speaks the protocol with a configurable
//!   delay and echoes its inputs, for testing clients and the balancer without a model.
//! - [`init_tracing`]: logs for a failing test, once per process (`RUST_LOG`).
//!
//! Everything binds `127.0.0.1:0` and is stopped by the test that started it.

pub mod balancer;
pub mod stand_in;
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
