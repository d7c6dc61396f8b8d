//! The adversary's tools, shared by the worker's and the balancer's adversarial suites:
//! hand-made MessagePack bodies (including ones no encoder would write), a process's
//! resident memory, a metric's value, a real worker's arguments.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use tidepool_protocol::Client;

use tokio_util::sync::CancellationToken;

use crate::balancer::http;
use crate::drive::{Drive, Tally};
use crate::process::{eventually, Proc};
use crate::worker::ort_lib;

/// A MessagePack value for hand-made bodies, including the ones no encoder would write.
#[derive(Serialize)]
#[serde(untagged)]
pub enum V {
    /// An unsigned integer.
    U(u64),
    /// A signed integer.
    I(i64),
    /// A string.
    S(&'static str),
    /// Bytes (`bin`).
    B(#[serde(with = "serde_bytes")] Vec<u8>),
    /// An array.
    A(Vec<V>),
    /// A map.
    M(BTreeMap<&'static str, V>),
}

/// A map of `entries`.
pub fn map(entries: Vec<(&'static str, V)>) -> V {
    V::M(entries.into_iter().collect())
}

/// `value` as MessagePack.
pub fn body(value: &V) -> Vec<u8> {
    rmp_serde::to_vec(value).expect("every V encodes")
}

/// An `infer` of one tensor `x` built from its three fields, plus `extra` entries.
pub fn infer_body(id: V, dtype: V, shape: V, data: V, extra: Vec<(&'static str, V)>) -> Vec<u8> {
    let mut entries = vec![
        ("type", V::S("infer")),
        ("id", id),
        (
            "inputs",
            map(vec![(
                "input",
                map(vec![("dtype", dtype), ("shape", shape), ("data", data)]),
            )]),
        ),
    ];
    entries.extend(extra);
    body(&map(entries))
}

/// The data of `n` f32 zeros.
pub fn f32_data(n: usize) -> V {
    V::B(vec![0; 4 * n])
}

/// `body` (a map of fewer than 15 entries) with one more entry: `key` holding the MessagePack
/// bytes `value`, written by hand since a value nested thousands deep would overflow the
/// stack of any recursive encoder.
pub fn with_raw(mut body: Vec<u8>, key: &str, value: &[u8]) -> Vec<u8> {
    assert!(matches!(body[0], 0x80..=0x8e), "a small fixmap");
    body[0] += 1;
    body.push(0xa0 | key.len() as u8);
    body.extend_from_slice(key.as_bytes());
    body.extend_from_slice(value);
    body
}

/// `depth` levels of `level` around a 1.
pub fn nested(depth: usize, level: &[u8]) -> Vec<u8> {
    let mut out = level.repeat(depth);
    out.push(0x01);
    out
}

/// A process's resident memory (VmRSS), from /proc.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb * 1024
}

/// A metric's value from a `/metrics` endpoint.
pub async fn metric(metrics: SocketAddr, name: &str) -> f64 {
    let (_, text) = http(metrics, "GET", "/metrics", None).await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

/// `tidepool-worker serve` arguments: `model` on the CPU, one thread, a 5 s drain.
pub fn worker_args(model: &Path, listen: SocketAddr, metrics: SocketAddr) -> Vec<String> {
    [
        "serve",
        "--model",
        &model.display().to_string(),
        "--listen",
        &listen.to_string(),
        "--metrics",
        &metrics.to_string(),
        "--ort-lib",
        &ort_lib().display().to_string(),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--drain-timeout",
        "5s",
    ]
    .map(String::from)
    .to_vec()
}

/// Waits up to 60 s for a `pong` from `addr`.
pub async fn wait_ready(addr: SocketAddr, procs: &[&Proc]) {
    eventually(
        Duration::from_secs(60),
        "the worker ready",
        procs,
        || async {
            let client = Client::connect(addr).await.ok()?;
            client.ping(Duration::from_secs(1)).await.ok()
        },
    )
    .await;
}

/// `/proc/PID` is gone, or the process is a zombie waiting to be reaped.
pub fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// Kills a process by pid when dropped, so a failing test leaves no worker behind.
pub struct KillOnDrop(pub u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .status();
    }
}

/// A bystander: `rate` infers a second of `dim` features on its own connection to `addr`
/// until the returned token is cancelled.
pub fn bystander(
    addr: SocketAddr,
    rate: u32,
    dim: usize,
) -> (CancellationToken, tokio::task::JoinHandle<Tally>) {
    let stop = CancellationToken::new();
    let mut drive = Drive::new(addr, rate, dim, stop.clone());
    drive.settle = Duration::from_secs(10);
    (stop, drive.spawn())
}

/// Stops a [`bystander`] and asserts that every request it sent got exactly one answer, `ok`.
pub async fn assert_bystander_served(
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Tally>,
) {
    stop.cancel();
    let tally = task.await.expect("the bystander's task");
    assert!(tally.sent > 0, "the bystander sent nothing");
    tally.assert_exactly_once();
    tally.assert_all_ok();
}

/// A well-formed `infer` body: request `id`, one f32 tensor of `dim` zeros.
pub fn good_infer(id: u64, dim: usize) -> Vec<u8> {
    infer_body(
        V::U(id),
        V::S("f32"),
        V::A(vec![V::U(dim as u64)]),
        f32_data(dim),
        vec![],
    )
}
