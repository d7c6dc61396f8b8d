//! `tidepool-probe`: one readiness check for a container healthcheck, exit 0 when it passes.
//!
//! ```text
//! tidepool-probe ping 127.0.0.1:7100                 # a worker: pong once the model is loaded
//! tidepool-probe http http://127.0.0.1:7001/healthz  # the balancer's admin API: 2xx
//! tidepool-probe http https://127.0.0.1:7001/healthz --tls-ca ca.pem   # the same over TLS
//! ```
//!
//! Exit status 0 on success, 1 with one line on stderr otherwise (docker keeps it in
//! `docker inspect`'s health log). The tidepool image has no shell or curl; this is its
//! healthcheck tool.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tidepool_load::probe;
use tidepool_protocol::tls::{ClientFiles, TlsConnector};

/// tidepool-probe: a one-shot readiness check for container healthchecks.
#[derive(Debug, Parser)]
#[command(name = "tidepool-probe", version)]
struct Args {
    #[command(subcommand)]
    check: Check,

    /// How long the check may take before it fails.
    #[arg(long, global = true, value_parser = humantime::parse_duration, default_value = "2s")]
    timeout: Duration,

    /// `ping` over TLS, and `http` to an https:// URL, trusting this CA bundle (PEM).
    #[arg(long, global = true)]
    tls_ca: Option<PathBuf>,

    /// The client certificate (PEM) for a server that requires one (a worker with
    /// --tls-client-ca), with --tls-key.
    #[arg(long, global = true, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert.
    #[arg(long, global = true, requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// The name the server's certificate must carry [default: the host of ADDR].
    #[arg(long, global = true, requires = "tls_ca")]
    tls_server_name: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Check {
    /// Send a protocol `ping` to ADDR (host:port); pass on `pong`.
    Ping {
        /// The worker or balancer, like 127.0.0.1:7100.
        addr: String,
    },
    /// Send an HTTP GET to URL (http://host:port/path, or https:// with --tls-ca); pass on
    /// a 2xx status.
    Http {
        /// Like http://127.0.0.1:7001/healthz, or https://127.0.0.1:7001/healthz.
        url: String,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tidepool-probe: could not start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let tls = match &args.tls_ca {
        None => None,
        Some(ca) => {
            let files = ClientFiles {
                ca: ca.clone(),
                cert: args.tls_cert.clone(),
                key: args.tls_key.clone(),
            };
            let timeout = args.timeout;
            match TlsConnector::new(
                "probe",
                &files,
                args.tls_server_name.as_deref(),
                timeout,
                Default::default(),
            ) {
                Ok(tls) => Some(tls),
                Err(error) => {
                    eprintln!("tidepool-probe: {error}");
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let outcome = runtime.block_on(async {
        match &args.check {
            Check::Ping { addr } => probe::ping(addr, args.timeout, tls.as_ref())
                .await
                .map(|()| "pong".to_owned()),
            Check::Http { url } => probe::http_get(url, args.timeout, tls.as_ref())
                .await
                .map(|status| format!("status {status}")),
        }
    });
    match outcome {
        Ok(what) => {
            println!("{what}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("tidepool-probe: {error}");
            ExitCode::FAILURE
        }
    }
}
