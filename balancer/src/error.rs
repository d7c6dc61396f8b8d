//! The crate's error type: what can stop the balancer from starting or running.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::validation::TargetRefusal;

/// Everything that can go wrong in tidepool-balancer outside of one request.
///
/// Problems with one request are never errors of this type: they are answered to the
/// client as protocol `error` frames and the balancer goes on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A flag's value is out of range or contradicts another flag.
    #[error("invalid --{flag}: {problem}")]
    Config {
        /// The flag, without its dashes.
        flag: &'static str,
        /// What is wrong and what would be right.
        problem: String,
    },
    /// A listening socket could not be bound.
    #[error("could not bind the {what} address {addr}: {source}")]
    Bind {
        /// Which listener (`listen`, `admin`).
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// A client listener shard's thread or runtime could not be started (`--shards`).
    #[error("could not start client listener shard {shard} of {shards}: {source}; start with fewer --shards")]
    Shard {
        /// Which shard (from 0).
        shard: usize,
        /// How many were asked for.
        shards: usize,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// A target address could not be resolved.
    #[error("could not resolve target {addr:?}: {source}")]
    Resolve {
        /// The address as written (`host:port`).
        addr: String,
        /// The resolver's reason.
        #[source]
        source: std::io::Error,
    },
    /// A target address resolved to nothing.
    #[error("target {addr:?} resolved to no address")]
    NoAddress {
        /// The address as written.
        addr: String,
    },
    /// TLS could not be set up from its files.
    #[error("could not set up TLS for the {side}: {source}")]
    Tls {
        /// Which side (`client listener`, `admin API`, `upstream`).
        side: &'static str,
        /// What is wrong, naming the file (boxed: the enum stays small).
        #[source]
        source: Box<tidepool_protocol::Error>,
    },
    /// The admin HTTP server failed.
    #[error("admin server failed: {0}")]
    Admin(#[source] std::io::Error),
    /// The admin token file could not be read.
    #[error("could not read the admin token file {path}: {source}")]
    TokenFile {
        /// The file named by `--admin-token-file`.
        path: PathBuf,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// The admin token breaks a rule (too short, not one line of visible ASCII).
    #[error("the admin token from {from} {problem}")]
    Token {
        /// Where it came from: the flag and file, or the environment variable.
        from: String,
        /// Which rule it breaks; never the token itself.
        problem: String,
    },
    /// An address may not be registered as a target.
    #[error("target {addr} refused: {reason}")]
    TargetRefused {
        /// The address.
        addr: SocketAddr,
        /// Which rule refused it.
        reason: TargetRefusal,
    },
    /// jemalloc refused a setting (`--features jemalloc` builds only).
    #[cfg(feature = "jemalloc")]
    #[error("the allocator refused to start its background purge thread: {source}")]
    Allocator {
        /// jemalloc's reason.
        #[source]
        source: tikv_jemalloc_ctl::Error,
    },
}
