//! Registration with the balancer's admin API (`--register URL`).
//!
//! Once the worker is ready, [`Registrar::register`] POSTs `{"addr": ADVERTISE}` to
//! `URL/targets` until the balancer answers 2xx or shutdown begins. It then registers
//! again every `--register-interval` (registration is idempotent), so a balancer that
//! restarted and forgot its targets has this worker back within that time. On shutdown the
//! worker calls [`Registrar::deregister`] (DELETE `URL/targets/ADDR`) before it stops taking
//! requests, so the balancer stops routing to it first.
//!
//! A balancer with an admin token refuses registrations without it: the worker sends
//! `Authorization: Bearer TOKEN` with the token of `--register-token-file` or
//! `TIDEPOOL_WORKER_REGISTER_TOKEN` (never a flag's value, which `ps` shows).
//!
//! Retries back off exponentially with jitter (each wait drawn between half and all of
//! the current step), so that a fleet of workers restarted together does not retry in
//! step. A balancer that is not up yet is retried from 100 ms, doubling up to 5 s. A
//! refusal (401 wrong token, 403 address not allowed, 429 too many targets, any 4xx) will
//! not go away by itself, so it is logged at `warn` with the balancer's reason and retried
//! from 1 s, doubling up to 60 s: never a tight loop, and an operator who fixes the
//! balancer's side sees the worker register within a minute.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde::Serialize;
use tidepool_protocol::tls::{ClientConfig, TlsConnector};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::error::Error;

/// The environment variable holding the registration token itself.
pub const TOKEN_ENV: &str = "TIDEPOOL_WORKER_REGISTER_TOKEN";

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Retries while the balancer cannot be reached (or answers 5xx): it is likely starting.
const UNREACHABLE: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// Retries after a refusal (4xx): something must change on one side first.
const REFUSED: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

/// The balancer's admin token, as this worker presents it. Its `Debug` never shows it.
#[derive(Clone)]
pub struct RegisterToken(Arc<str>);

impl std::fmt::Debug for RegisterToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RegisterToken(<redacted>)")
    }
}

impl RegisterToken {
    /// A token from its text: one word of visible ASCII, as an HTTP header carries it.
    /// The balancer applies its own rules (length) and says so when it refuses.
    pub fn new(text: &str) -> Result<RegisterToken, String> {
        if text.is_empty() {
            return Err("is empty".to_owned());
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "has a space, a control character or a non-ASCII character: a token is one line of visible ASCII"
                    .to_owned(),
            );
        }
        Ok(RegisterToken(text.into()))
    }

    /// Reads a token file: one line, its one trailing newline dropped.
    pub fn from_file(path: &Path) -> Result<RegisterToken, Error> {
        let invalid = |reason: String| Error::InvalidConfig {
            flag: "register-token-file",
            reason: format!("{}: {reason}", path.display()),
        };
        let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
        let line = text.strip_suffix('\n').unwrap_or(&text);
        let line = line.strip_suffix('\r').unwrap_or(line);
        RegisterToken::new(line).map_err(invalid)
    }

    /// The token in `TIDEPOOL_WORKER_REGISTER_TOKEN`, if it is set.
    pub fn from_env() -> Result<Option<RegisterToken>, Error> {
        let Some(text) = std::env::var_os(TOKEN_ENV) else {
            return Ok(None);
        };
        let invalid = |reason: String| Error::InvalidConfig {
            flag: "register-token-file",
            reason: format!("{TOKEN_ENV} {reason}"),
        };
        let text = text
            .into_string()
            .map_err(|_| invalid("is not UTF-8".to_owned()))?;
        RegisterToken::new(&text).map(Some).map_err(invalid)
    }
}

/// Exponential backoff from `first` doubling up to `cap`, each wait jittered.
#[derive(Clone, Copy, Debug)]
struct Backoff {
    next: Duration,
    first: Duration,
    cap: Duration,
}

impl Backoff {
    const fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            next: first,
            first,
            cap,
        }
    }

    /// The next wait, between half and all of the current step; the step then doubles.
    fn wait(&mut self, rng: &mut impl Rng) -> Duration {
        let step = self.next;
        self.next = (step * 2).min(self.cap);
        step / 2 + step.mul_f64(rng.random_range(0.0..=0.5))
    }

    /// Back to the first step (after a success, or a different kind of failure).
    fn reset(&mut self) {
        self.next = self.first;
    }
}

#[derive(Serialize)]
struct TargetBody<'a> {
    addr: &'a str,
}

/// An HTTP client; with `tls`, https:// URLs are checked against the CA it holds when the
/// registrar is made.
fn client(tls: Option<&TlsConnector>) -> reqwest::Client {
    let builder = reqwest::Client::builder().timeout(REQUEST_TIMEOUT);
    let builder = match tls {
        Some(tls) => builder.use_preconfigured_tls(ClientConfig::clone(&tls.config())),
        None => builder,
    };
    builder.build().unwrap_or_else(|error| {
        warn!(%error, "could not build the registration HTTP client; using the default one");
        reqwest::Client::new()
    })
}

/// What one registration attempt came to.
enum Attempt {
    /// 2xx: registered; true when the balancer did not have this worker (201).
    Registered { created: bool },
    /// 4xx: refused, with the status and the balancer's reason.
    Refused {
        status: reqwest::StatusCode,
        reason: String,
    },
    /// Not reached, or a 5xx.
    Unreachable(String),
}

/// Registers one worker address with one balancer, and deregisters it.
#[derive(Debug)]
pub struct Registrar {
    client: reqwest::Client,
    /// `URL/targets`.
    url: String,
    advertise: String,
    token: Option<RegisterToken>,
}

impl Registrar {
    /// A registrar of `advertise` with the admin API at `base` (`http://host:port`, or
    /// `https://` checked against `tls`'s CA), presenting `token` when given.
    pub fn new(
        base: &str,
        advertise: &str,
        token: Option<RegisterToken>,
        tls: Option<&TlsConnector>,
    ) -> Registrar {
        Registrar {
            client: client(tls),
            url: format!("{}/targets", base.trim_end_matches('/')),
            advertise: advertise.to_owned(),
            token,
        }
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(RegisterToken(token)) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn attempt(&self) -> Attempt {
        let request = self.authorized(self.client.post(&self.url).json(&TargetBody {
            addr: &self.advertise,
        }));
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => return Attempt::Unreachable(e.to_string()),
        };
        let status = response.status();
        if status.is_success() {
            return Attempt::Registered {
                created: status == reqwest::StatusCode::CREATED,
            };
        }
        let reason = reason(response.text().await.unwrap_or_default());
        if status.is_client_error() {
            Attempt::Refused { status, reason }
        } else {
            Attempt::Unreachable(format!("{status}: {reason}"))
        }
    }

    /// Registers (retrying until it succeeds) and keeps the registration until
    /// `shutdown`; returns whether the balancer may hold it (registered, or an attempt was
    /// on its way when shutdown came), so that shutdown deregisters.
    pub async fn register(&self, refresh: Duration, shutdown: &CancellationToken) -> bool {
        if !self.register_once(shutdown).await {
            return false;
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return true,
                _ = tokio::time::sleep(refresh) => {}
            }
            let url = &self.url;
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return true,
                outcome = self.attempt() => outcome,
            };
            match outcome {
                Attempt::Registered { created: true } => {
                    warn!(%url, addr = %self.advertise, "registered again: the balancer had lost this worker (restarted, or deregistered it)");
                }
                Attempt::Registered { created: false } => debug!(%url, "registration refreshed"),
                Attempt::Refused { status, reason } => {
                    warn!(%url, %status, %reason, "the balancer refused to refresh this worker's registration; trying again in --register-interval");
                }
                Attempt::Unreachable(error) => {
                    debug!(%url, %error, "registration refresh failed; the balancer may be restarting")
                }
            }
        }
    }

    /// Registers once, retrying with backoff until the balancer accepts (true) or
    /// `shutdown` fires: true then if an attempt was on its way (the balancer may have taken
    /// it without this worker reading the answer; deregistering is then the safe side, and a
    /// balancer that never took it answers 404), false between attempts.
    async fn register_once(&self, shutdown: &CancellationToken) -> bool {
        let (mut unreachable, mut refused) = (UNREACHABLE, REFUSED);
        let url = &self.url;
        for attempt in 1u32.. {
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => return true,
                outcome = self.attempt() => outcome,
            };
            let wait = match outcome {
                Attempt::Registered { .. } => {
                    info!(%url, addr = %self.advertise, attempt, "registered with the balancer");
                    return true;
                }
                Attempt::Refused { status, reason } => {
                    unreachable.reset();
                    let wait = refused.wait(&mut rand::rng());
                    let hint = match status.as_u16() {
                        401 => " (check --register-token-file / TIDEPOOL_WORKER_REGISTER_TOKEN against the balancer's admin token)",
                        403 => " (the balancer's --register-allow does not include --advertise)",
                        429 => " (the balancer's --max-targets is reached)",
                        _ => "",
                    };
                    warn!(%url, %status, %reason, attempt, retry_in = ?wait, "the balancer refused this worker's registration{hint}");
                    wait
                }
                Attempt::Unreachable(error) => {
                    refused.reset();
                    let wait = unreachable.wait(&mut rand::rng());
                    // The balancer is not up yet, most likely; keep the logs quiet at first.
                    if attempt <= 3 {
                        debug!(%url, %error, attempt, retry_in = ?wait, "balancer unreachable");
                    } else {
                        warn!(%url, %error, attempt, retry_in = ?wait, "balancer unreachable");
                    }
                    wait
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        false
    }

    /// Deregisters: one attempt, bounded by a timeout, since shutdown must go on. True
    /// when the balancer took it (it no longer routes here).
    pub async fn deregister(&self) -> bool {
        let url = format!("{}/{}", self.url, self.advertise);
        match self.authorized(self.client.delete(&url)).send().await {
            Ok(resp) if resp.status().is_success() => {
                info!(%url, "deregistered from the balancer");
                true
            }
            Ok(resp) if resp.status() == reqwest::StatusCode::NOT_FOUND => {
                info!(%url, "the balancer no longer lists this worker");
                false
            }
            Ok(resp) => {
                let status = resp.status();
                let reason = reason(resp.text().await.unwrap_or_default());
                warn!(%url, %status, %reason, "balancer refused deregistration");
                false
            }
            Err(e) => {
                warn!(%url, error = %e, "could not deregister from the balancer");
                false
            }
        }
    }
}

/// The reason in an error body: the admin API's `{"error": "..."}`, else the text itself,
/// cut to a log line's length.
fn reason(body: String) -> String {
    let text = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
        .unwrap_or(body);
    let text = text.trim();
    match text.char_indices().nth(300) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None if text.is_empty() => "(no reason given)".to_owned(),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut b = REFUSED;
        let mut steps = Vec::new();
        for _ in 0..10 {
            steps.push(b.wait(&mut rng));
        }
        let mut step = Duration::from_secs(1);
        for wait in &steps {
            assert!(
                *wait >= step / 2 && *wait <= step,
                "{wait:?} for a step of {step:?}"
            );
            step = (step * 2).min(Duration::from_secs(60));
        }
        assert!(
            steps[9] >= Duration::from_secs(30),
            "capped at 60 s: {steps:?}"
        );
        // Jitter: two workers do not wait the same.
        let mut other = REFUSED;
        let mut rng2 = rand::rngs::StdRng::seed_from_u64(8);
        assert_ne!(other.wait(&mut rng2), steps[0]);
        b.reset();
        assert!(b.wait(&mut rng) <= Duration::from_secs(1));
    }

    #[test]
    fn reasons_come_from_the_error_body() {
        assert_eq!(
            reason(r#"{"error": "the admin token is wrong"}"#.to_owned()),
            "the admin token is wrong"
        );
        assert_eq!(reason("plain text\n".to_owned()), "plain text");
        assert_eq!(reason(String::new()), "(no reason given)");
        assert_eq!(reason("x".repeat(400)).chars().count(), 301);
    }

    #[test]
    fn tokens_are_one_word_and_never_shown() {
        assert!(RegisterToken::new("").is_err());
        assert!(RegisterToken::new("two words").is_err());
        let token = RegisterToken::new("abc").unwrap();
        assert_eq!(format!("{token:?}"), "RegisterToken(<redacted>)");

        let dir = std::env::temp_dir().join(format!("tidepool-regtoken-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "s3cret-token\n").unwrap();
        assert!(RegisterToken::from_file(&path).is_ok());
        std::fs::write(&path, "s3cret token\n").unwrap();
        let err = RegisterToken::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("register-token-file") && !err.contains("s3cret"),
            "{err}"
        );
        let err = RegisterToken::from_file(&dir.join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
