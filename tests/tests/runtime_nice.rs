//! `--runtime-nice`: the worker binary lowers its async runtime's threads below the model's
//! once the model is loaded, leaves the model's threads (the model thread, ONNX Runtime's)
//! at the process's priority, and a bystander's every request is still answered once, `ok`.

// A failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tidepool_tests::adversary::{assert_bystander_served, bystander, wait_ready, worker_args};
use tidepool_tests::init_tracing;
use tidepool_tests::process::{eventually, free_addrs, Proc};
use tidepool_tests::worker::{scratch_dir, TinyModel};

/// The nice steps asked for.
const STEPS: i32 = 7;

/// Each thread of `pid` as (name, nice value), from /proc.
fn threads(pid: u32) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("stat")),
        ) else {
            // The thread ended between the listing and the read.
            continue;
        };
        // The fields after the name (which may hold spaces) in parentheses: nice is the
        // 19th field of the line, the 17th after the name.
        let (_, rest) = stat.rsplit_once(')').unwrap();
        let nice = rest.split_whitespace().nth(16).unwrap().parse().unwrap();
        out.push((comm.trim().to_owned(), nice));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_threads_run_below_the_model_and_every_request_is_answered() {
    init_tracing();
    let dir = scratch_dir("runtime-nice");
    let [listen, metrics] = free_addrs();
    let mut args = worker_args(&TinyModel::default().write(), listen, metrics);
    args.extend(
        [
            "--runtime-nice",
            &STEPS.to_string(),
            "--runtime-threads",
            "2",
        ]
        .map(String::from),
    );
    let worker = Proc::start("worker", "tidepool-worker", &args, &dir);
    wait_ready(listen, &[&worker]).await;
    let (stop, served) = bystander(listen, 200, 16);

    let pid = worker.pid();
    let base = threads(pid)
        .into_iter()
        .find(|(name, _)| name == "tidepool-worker")
        .map(|(_, nice)| nice)
        .unwrap_or_else(|| panic!("no main thread in {:?}", threads(pid)));
    let lowered = (base + STEPS).min(19);
    // The runtime is lowered just after the worker answers its first ping.
    let seen = eventually(
        Duration::from_secs(10),
        "the runtime's threads lowered",
        &[&worker],
        || async {
            let seen = threads(pid);
            let io: Vec<_> = seen.iter().filter(|(n, _)| n == "tidepool-io").collect();
            (io.len() >= 2 && io.iter().all(|(_, nice)| *nice == lowered)).then_some(seen)
        },
    )
    .await;
    for (name, nice) in &seen {
        if name != "tidepool-io" {
            assert_eq!(*nice, base, "{name} keeps the process's priority: {seen:?}");
        }
    }
    assert!(
        seen.iter().any(|(name, _)| name == "tidepool-model"),
        "the model thread: {seen:?}"
    );
    // Requests still flow through the lowered runtime.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_bystander_served(stop, served).await;
    assert!(
        worker.log().contains("run below the model's"),
        "{}",
        worker.log()
    );
}
