//! The admin API's authentication: one bearer token, compared in constant time.
//!
//! The admin API changes routing: one `POST /targets` naming a listener of an attacker's,
//! and two `DELETE`s, send every client's requests there. So:
//!
//! - **Where the token comes from.** A file (`--admin-token-file`, the form Kubernetes
//!   Secrets and compose secrets mount) or the environment variable
//!   `TIDEPOOL_ADMIN_TOKEN`; never a flag's value, which any user of the machine sees in
//!   `ps`. One trailing newline of the file is dropped (`echo`, editors); anything else
//!   that is not visible ASCII, and tokens under [`MIN_TOKEN_LEN`] characters, are refused
//!   at start, since they would be guessable or could not travel in an HTTP header.
//! - **Which endpoints need it.** Every mutating one (`POST /targets`,
//!   `DELETE /targets/{addr}`) and `GET /targets`, which maps the pool's topology for an
//!   attacker. `GET /healthz` never needs it (kubelet and compose probes carry no
//!   credentials). `GET /metrics` and `GET /scaling` stay open by default for Prometheus
//!   and KEDA, which read counts only (the per-target series do name the targets' addresses:
//!   put the admin port behind a NetworkPolicy, as deploy/kubernetes does), and need it too
//!   with `--admin-auth-reads` (Prometheus: `authorization.credentials_file`; KEDA: a
//!   TriggerAuthentication of `bearer`).
//! - **Without a token** everything is open, which the configuration allows only on a
//!   loopback address, unless the operator opts out with `--admin-insecure-no-auth`
//!   (a warning at start and `tidepool_admin_insecure_no_auth 1` in the metrics).
//! - **A refused request** gets `401` with `WWW-Authenticate: Bearer` (RFC 6750), before its
//!   body is read or anything changes; it is counted by reason in
//!   `tidepool_admin_auth_failures_total` and logged with the peer, method and path, never
//!   with what it presented.
//! - **The comparison** takes the same time whatever the presented token is, its length
//!   included (both sides are padded to [`MAX_TOKEN_LEN`] bytes and compared with `subtle`).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use subtle::ConstantTimeEq;

use crate::error::Error;

/// The environment variable that holds the admin token itself.
pub const ADMIN_TOKEN_ENV: &str = "TIDEPOOL_ADMIN_TOKEN";

/// The environment variable a worker reads its registration token from: the balancer sets
/// it for the workers it starts (`--worker-cmd`), so that they can register.
pub const WORKER_TOKEN_ENV: &str = "TIDEPOOL_WORKER_REGISTER_TOKEN";

/// Fewest characters of a token: 32 random base64 characters are 192 bits.
pub(crate) const MIN_TOKEN_LEN: usize = 32;

/// Most characters of a token (it travels in one HTTP header).
pub(crate) const MAX_TOKEN_LEN: usize = 1024;

/// How to make a token, for error messages.
pub(crate) const MAKE_TOKEN: &str = "head -c 32 /dev/urandom | base64 > admin.token";

/// The admin API's bearer token. Its `Debug` never shows it, and it is compared in constant
/// time; cheap to clone.
#[derive(Clone)]
pub struct AdminToken(Arc<str>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

impl PartialEq for AdminToken {
    fn eq(&self, other: &Self) -> bool {
        self.matches(other.0.as_bytes())
    }
}

impl AdminToken {
    /// A token from its text, if it follows the rules; the error says which rule it broke
    /// and never contains the text.
    pub fn new(text: &str) -> Result<AdminToken, String> {
        let len = text.chars().count();
        if let Some(at) = text.find(|c: char| !c.is_ascii_graphic()) {
            return Err(format!(
                "has a space, a control character or a non-ASCII character at byte {at}: \
                 a token is one line of visible ASCII (make one with `{MAKE_TOKEN}`)"
            ));
        }
        if len < MIN_TOKEN_LEN {
            return Err(format!(
                "is {len} characters; at least {MIN_TOKEN_LEN} are needed (make one with `{MAKE_TOKEN}`)"
            ));
        }
        if len > MAX_TOKEN_LEN {
            return Err(format!(
                "is {len} characters; at most {MAX_TOKEN_LEN} fit in a header"
            ));
        }
        Ok(AdminToken(text.into()))
    }

    /// Reads a token file: one line, its one trailing newline dropped.
    pub fn from_file(path: &Path) -> Result<AdminToken, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::TokenFile {
            path: path.to_owned(),
            source,
        })?;
        let line = text.strip_suffix('\n').unwrap_or(&text);
        let line = line.strip_suffix('\r').unwrap_or(line);
        AdminToken::new(line).map_err(|problem| Error::Token {
            from: format!("--admin-token-file {}", path.display()),
            problem,
        })
    }

    /// The token in `TIDEPOOL_ADMIN_TOKEN`, if it is set.
    pub fn from_env() -> Result<Option<AdminToken>, Error> {
        match std::env::var(ADMIN_TOKEN_ENV) {
            Ok(text) => AdminToken::new(&text)
                .map(Some)
                .map_err(|problem| Error::Token {
                    from: ADMIN_TOKEN_ENV.to_owned(),
                    problem,
                }),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(Error::Token {
                from: ADMIN_TOKEN_ENV.to_owned(),
                problem: "is not UTF-8".to_owned(),
            }),
        }
    }

    /// The token's text, to hand to a worker this balancer starts (in its environment).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when `presented` is the token, in time independent of `presented`'s contents
    /// and length (up to [`MAX_TOKEN_LEN`]; a longer one cannot be a token).
    pub fn matches(&self, presented: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        if presented.len() > MAX_TOKEN_LEN {
            return false;
        }
        let mut a = [0u8; MAX_TOKEN_LEN];
        let mut b = [0u8; MAX_TOKEN_LEN];
        a[..expected.len()].copy_from_slice(expected);
        b[..presented.len()].copy_from_slice(presented);
        let same_len = (expected.len() as u64).ct_eq(&(presented.len() as u64));
        (a.ct_eq(&b) & same_len).into()
    }
}

/// Why a request was refused: the `reason` label of `tidepool_admin_auth_failures_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No `Authorization` header.
    Missing,
    /// An `Authorization` header that is not one `Bearer <token>`.
    Malformed,
    /// A bearer token that is not the token.
    Wrong,
}

impl Failure {
    const ALL: [Failure; 3] = [Failure::Missing, Failure::Malformed, Failure::Wrong];

    fn as_str(self) -> &'static str {
        match self {
            Failure::Missing => "missing",
            Failure::Malformed => "malformed",
            Failure::Wrong => "wrong",
        }
    }

    /// The `WWW-Authenticate` challenge (RFC 6750 section 3).
    fn challenge(self) -> &'static str {
        match self {
            Failure::Missing => r#"Bearer realm="tidepool-admin""#,
            Failure::Malformed => r#"Bearer realm="tidepool-admin", error="invalid_request""#,
            Failure::Wrong => r#"Bearer realm="tidepool-admin", error="invalid_token""#,
        }
    }

    /// What went wrong and what to do, for the response body.
    fn message(self) -> &'static str {
        match self {
            Failure::Missing => {
                "this endpoint needs the admin token: send `Authorization: Bearer <token>` with \
                 the token of the balancer's --admin-token-file (or TIDEPOOL_ADMIN_TOKEN)"
            }
            Failure::Malformed => {
                "the Authorization header is not one `Bearer <token>`: send exactly one, with \
                 the admin token of the balancer's --admin-token-file (or TIDEPOOL_ADMIN_TOKEN)"
            }
            Failure::Wrong => {
                "the admin token is wrong: use the one in the balancer's --admin-token-file \
                 (or TIDEPOOL_ADMIN_TOKEN)"
            }
        }
    }
}

/// The bearer token of a request's headers: exactly one `Authorization` header of the
/// scheme `Bearer` (any case), then spaces, then one visible-ASCII word.
pub(crate) fn bearer(headers: &HeaderMap) -> Result<&[u8], Failure> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or(Failure::Missing)?;
    if values.next().is_some() {
        return Err(Failure::Malformed);
    }
    let bytes = value.as_bytes();
    let space = bytes
        .iter()
        .position(|&b| b == b' ')
        .ok_or(Failure::Malformed)?;
    let (scheme, rest) = bytes.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(Failure::Malformed);
    }
    let start = rest
        .iter()
        .position(|&b| b != b' ')
        .ok_or(Failure::Malformed)?;
    let token = &rest[start..];
    if !token.iter().all(u8::is_ascii_graphic) {
        return Err(Failure::Malformed);
    }
    Ok(token)
}

/// The admin API's authentication: the token (if any), which reads it guards, and the
/// refusals counted so far. Cheap to clone; the admin routes share one.
#[derive(Clone, Debug)]
pub(crate) struct AdminAuth {
    shared: Arc<AuthShared>,
}

#[derive(Debug)]
struct AuthShared {
    token: Option<AdminToken>,
    guard_reads: bool,
    insecure: bool,
    /// Refusals by [`Failure`], in the order of [`Failure::ALL`].
    failures: [AtomicU64; 3],
}

impl AdminAuth {
    /// Authentication with `token` (none: everything is open). With `guard_reads`, the
    /// monitoring reads need the token too; `insecure` says the operator opted out of a
    /// token on a non-loopback address (only reported).
    pub(crate) fn new(token: Option<AdminToken>, guard_reads: bool, insecure: bool) -> AdminAuth {
        AdminAuth {
            shared: Arc::new(AuthShared {
                token,
                guard_reads,
                insecure,
                failures: Default::default(),
            }),
        }
    }

    /// True when `/metrics` and `/scaling` need the token too.
    pub(crate) fn guards_reads(&self) -> bool {
        self.shared.guard_reads && self.shared.token.is_some()
    }

    /// Checks a request's credentials; `Ok` when no token is configured.
    fn check(&self, headers: &HeaderMap) -> Result<(), Failure> {
        let Some(token) = &self.shared.token else {
            return Ok(());
        };
        if token.matches(bearer(headers)?) {
            Ok(())
        } else {
            Err(Failure::Wrong)
        }
    }

    /// Counts a refusal.
    fn refused(&self, failure: Failure) {
        let i = Failure::ALL
            .iter()
            .position(|f| *f == failure)
            .unwrap_or_default();
        self.shared.failures[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text of the refusals and of how the API is protected.
    pub(crate) fn prometheus(&self) -> String {
        let mut out = String::from(
            "# HELP tidepool_admin_auth_failures_total Admin API requests refused with 401, by reason.\n\
             # TYPE tidepool_admin_auth_failures_total counter\n",
        );
        for (failure, count) in Failure::ALL.iter().zip(&self.shared.failures) {
            out += &format!(
                "tidepool_admin_auth_failures_total{{reason=\"{}\"}} {}\n",
                failure.as_str(),
                count.load(Ordering::Relaxed)
            );
        }
        out += &format!(
            "# HELP tidepool_admin_auth_enabled 1 when the admin API's mutating endpoints need a token.\n\
             # TYPE tidepool_admin_auth_enabled gauge\n\
             tidepool_admin_auth_enabled {}\n\
             # HELP tidepool_admin_insecure_no_auth 1 when the admin API listens beyond loopback without a token (--admin-insecure-no-auth).\n\
             # TYPE tidepool_admin_insecure_no_auth gauge\n\
             tidepool_admin_insecure_no_auth {}\n",
            u8::from(self.shared.token.is_some()),
            u8::from(self.shared.insecure),
        );
        out
    }
}

/// Middleware of the guarded routes: `401` unless the request carries the token. It runs
/// before the route's extractors, so a refused request's body is never read.
pub(crate) async fn require(
    State(auth): State<AdminAuth>,
    request: Request,
    next: Next,
) -> Response {
    let Err(failure) = auth.check(request.headers()) else {
        return next.run(request).await;
    };
    auth.refused(failure);
    let peer = request
        .extensions()
        .get::<ConnectInfo<crate::admin::Peer>>()
        .map(|ConnectInfo(crate::admin::Peer(peer))| peer.to_string());
    tracing::warn!(
        peer = peer.as_deref().unwrap_or("unknown"),
        method = %request.method(),
        path = request.uri().path(),
        reason = failure.as_str(),
        "admin request refused: no valid token"
    );
    let mut response = (
        StatusCode::UNAUTHORIZED,
        Json(serde_json::json!({ "error": failure.message() })),
    )
        .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(failure.challenge()),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA==";

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn comparison_accepts_only_the_token() {
        let token = AdminToken::new(TOKEN).unwrap();
        assert!(token.matches(TOKEN.as_bytes()));
        // One byte off anywhere, a prefix, an extension, nothing, too long: all refused.
        let mut off = TOKEN.as_bytes().to_vec();
        off[10] ^= 1;
        assert!(!token.matches(&off));
        assert!(!token.matches(&TOKEN.as_bytes()[..TOKEN.len() - 1]));
        assert!(!token.matches(format!("{TOKEN}A").as_bytes()));
        assert!(!token.matches(b""));
        assert!(!token.matches(&[b'A'; MAX_TOKEN_LEN + 1]));
        // Zero padding must not make a shorter token equal to one with trailing zeros.
        let mut padded = TOKEN.as_bytes().to_vec();
        padded.push(0);
        assert!(!token.matches(&padded));
        // The longest token still compares.
        let long = "x".repeat(MAX_TOKEN_LEN);
        assert!(AdminToken::new(&long).unwrap().matches(long.as_bytes()));
    }

    #[test]
    fn token_rules_say_what_is_wrong_and_never_show_the_token() {
        let short = "abc123";
        let err = AdminToken::new(short).unwrap_err();
        assert!(
            err.contains("at least 32") && err.contains("/dev/urandom"),
            "{err}"
        );
        assert!(!err.contains(short));
        for bad in [
            format!("{TOKEN} tail"),
            format!("{TOKEN}\n"),
            format!("{TOKEN}\t"),
            format!("{TOKEN}é"),
        ] {
            let err = AdminToken::new(&bad).unwrap_err();
            assert!(err.contains("visible ASCII"), "{err}");
            assert!(!err.contains(TOKEN));
        }
        assert!(AdminToken::new(&"y".repeat(MAX_TOKEN_LEN + 1)).is_err());
        assert_eq!(
            format!("{:?}", AdminToken::new(TOKEN).unwrap()),
            "AdminToken(<redacted>)"
        );
    }

    #[test]
    fn token_files_lose_one_trailing_newline_only() {
        let dir = std::env::temp_dir().join(format!("tidepool-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin.token");
        for (content, ok) in [
            (format!("{TOKEN}\n"), true),
            (format!("{TOKEN}\r\n"), true),
            (TOKEN.to_owned(), true),
            (format!("{TOKEN}\n\n"), false),
            (format!(" {TOKEN}\n"), false),
            (String::new(), false),
        ] {
            std::fs::write(&path, &content).unwrap();
            let read = AdminToken::from_file(&path);
            assert_eq!(read.is_ok(), ok, "{content:?}: {read:?}");
            if let Err(e) = read {
                let e = e.to_string();
                assert!(
                    e.contains("--admin-token-file") && !e.contains(TOKEN),
                    "{e}"
                );
            }
        }
        let missing = AdminToken::from_file(&dir.join("nope")).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bearer_headers_parse() {
        let token = TOKEN.as_bytes();
        assert_eq!(bearer(&headers(&[])), Err(Failure::Missing));
        assert_eq!(bearer(&headers(&[&format!("Bearer {TOKEN}")])), Ok(token));
        assert_eq!(bearer(&headers(&[&format!("bearer  {TOKEN}")])), Ok(token));
        assert_eq!(bearer(&headers(&[&format!("BEARER {TOKEN}")])), Ok(token));
        for malformed in [
            TOKEN.to_owned(),
            format!("Basic {TOKEN}"),
            format!("Bearer{TOKEN}"),
            "Bearer ".to_owned(),
            "Bearer    ".to_owned(),
            format!("Bearer {TOKEN} extra"),
            format!("Token {TOKEN}"),
        ] {
            assert_eq!(
                bearer(&headers(&[&malformed])),
                Err(Failure::Malformed),
                "{malformed:?}"
            );
        }
        let two = format!("Bearer {TOKEN}");
        assert_eq!(bearer(&headers(&[&two, &two])), Err(Failure::Malformed));
    }

    #[test]
    fn checks_count_by_reason_and_no_token_means_open() {
        let open = AdminAuth::new(None, true, false);
        assert_eq!(open.check(&headers(&[])), Ok(()));
        assert!(!open.guards_reads(), "nothing to guard reads with");

        let auth = AdminAuth::new(Some(AdminToken::new(TOKEN).unwrap()), false, false);
        assert_eq!(auth.check(&headers(&[&format!("Bearer {TOKEN}")])), Ok(()));
        let wrong = format!("Bearer {}", TOKEN.replace('c', "d"));
        assert_eq!(auth.check(&headers(&[&wrong])), Err(Failure::Wrong));
        for failure in [Failure::Wrong, Failure::Missing, Failure::Wrong] {
            auth.refused(failure);
        }
        let text = auth.prometheus();
        assert!(text.contains("tidepool_admin_auth_failures_total{reason=\"wrong\"} 2\n"));
        assert!(text.contains("tidepool_admin_auth_failures_total{reason=\"missing\"} 1\n"));
        assert!(text.contains("tidepool_admin_auth_failures_total{reason=\"malformed\"} 0\n"));
        assert!(text.contains("tidepool_admin_auth_enabled 1\n"));
        assert!(text.contains("tidepool_admin_insecure_no_auth 0\n"));
        assert!(!text.contains(TOKEN));
    }
}
