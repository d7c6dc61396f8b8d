//! The model thread's CPUs: completing ONNX Runtime's default pinning
//! (`--pin-model-thread`).
//!
//! With its default thread count ONNX Runtime makes one intra-op thread per physical core,
//! pins each pool thread to a core of its own and leaves the first core for the thread that
//! calls `run`, which it does not pin ("the main thread is a special member of the thread
//! pool, which onnxruntime has no control", its `thread_utils.cc`). In the worker that thread
//! is the model thread, and it is an intra-op thread like the others: it runs its share of
//! every operator, then spins at the operator's barrier until the pool's shares are done.
//! Left to the scheduler, it can land on a pool thread's core while the async runtime (or a
//! client on the same host) holds the core left free, and then it spins through its slice
//! while the thread it waits for waits for that very core. On 2 cores under open-loop
//! overload (bench-slo, 64 MiB model, 150% of capacity) ONNX Runtime's spin-wait took 15% of
//! the worker's samples and its pool thread waited for a core a quarter of the time. In six
//! alternating runs of that step the model computed 1,391-1,806 items/s unpinned and
//! 1,773-1,779 pinned: pinned, the rate under overload no longer depends on where the
//! scheduler puts the model thread. It does not bring the batch time under overload back to
//! the closed-loop one: whatever else runs on the two cores still delays one of the two
//! threads each operator waits for (bench/intro/slo.md has the runs).
//!
//! So the model thread takes the CPUs that no thread ONNX Runtime started while the model
//! loaded is pinned to. Where it pinned none (an explicit `--threads`, `--instances` above
//! 1, a single core) or left no CPU free, nothing is pinned and the scheduler decides, as
//! before.

use std::collections::BTreeSet;
use std::io;

use rustix::process::Pid;
use rustix::thread::{sched_getaffinity, sched_setaffinity, CpuSet};

/// The name of the thread that loads the model, which ONNX Runtime's intra-op threads
/// inherit (it is how they show in top, perf and /proc).
pub const POOL_THREAD_NAME: &str = "tidepool-ort";

/// The process's threads at one moment, by kernel thread id.
#[derive(Clone, Debug, Default)]
pub struct Threads(BTreeSet<i32>);

impl Threads {
    /// The threads of this process now (empty where `/proc` cannot be read).
    pub fn snapshot() -> Threads {
        let tids = std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
            .collect();
        Threads(tids)
    }
}

/// The CPUs for the model thread: those this thread may run on that no thread started since
/// `before` (ONNX Runtime's pool, when `before` was taken just ahead of loading the model)
/// is pinned to. `None` where no such thread is pinned, or none is left free.
///
/// Only threads that carry this thread's name count: ONNX Runtime starts its pool from the
/// thread that loads the model, and a new thread inherits its creator's name, while threads
/// that other work in the process starts meanwhile (another model loading on another
/// thread, a test running beside) carry theirs.
pub fn model_cpus(before: &Threads) -> io::Result<Option<Vec<usize>>> {
    let allowed = cpus(&sched_getaffinity(None)?);
    // Without its own name this thread cannot tell ONNX Runtime's pool from other threads.
    let Some(own) = comm(rustix::thread::gettid().as_raw_nonzero().get()) else {
        return Ok(None);
    };
    let pinned: Vec<Vec<usize>> = Threads::snapshot()
        .0
        .difference(&before.0)
        .filter(|&&tid| comm(tid).as_ref() == Some(&own))
        .filter_map(|&tid| {
            // A thread that has ended since the snapshot pins nothing.
            let pid = Pid::from_raw(tid)?;
            sched_getaffinity(Some(pid)).ok().map(|set| cpus(&set))
        })
        .collect();
    Ok(free_cpus(&allowed, &pinned))
}

/// The name of this process's thread `tid` (`None` once it has ended).
fn comm(tid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .ok()
        .map(|name| name.trim_end().to_owned())
}

/// Pins the calling thread to `cpus`.
pub fn pin_current_thread(cpus: &[usize]) -> io::Result<()> {
    let mut set = CpuSet::new();
    for &cpu in cpus.iter().filter(|&&cpu| cpu < CpuSet::MAX_CPU) {
        set.set(cpu);
    }
    sched_setaffinity(None, &set)?;
    Ok(())
}

/// The CPUs of a set, ascending.
fn cpus(set: &CpuSet) -> Vec<usize> {
    (0..CpuSet::MAX_CPU)
        .filter(|&cpu| set.is_set(cpu))
        .collect()
}

/// `allowed` less every CPU of the threads in `threads` that are pinned narrower than
/// `allowed` (threads that may run anywhere claim nothing). `None` when no thread is pinned
/// or nothing is left.
fn free_cpus(allowed: &[usize], threads: &[Vec<usize>]) -> Option<Vec<usize>> {
    let allowed: BTreeSet<usize> = allowed.iter().copied().collect();
    let claimed: BTreeSet<usize> = threads
        .iter()
        .map(|cpus| cpus.iter().copied().collect::<BTreeSet<usize>>())
        .filter(|cpus| !cpus.is_empty() && cpus.is_subset(&allowed) && *cpus != allowed)
        .flatten()
        .collect();
    if claimed.is_empty() {
        return None;
    }
    let free: Vec<usize> = allowed.difference(&claimed).copied().collect();
    (!free.is_empty()).then_some(free)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_thread_takes_the_cores_the_pool_left() {
        // ONNX Runtime's default on 2 cores: one pool thread, pinned to the second.
        assert_eq!(free_cpus(&[0, 1], &[vec![1]]), Some(vec![0]));
        // 4 cores with 2 hyperthreads each, pool threads on the last three cores.
        let pool = [vec![2, 3], vec![4, 5], vec![6, 7]];
        assert_eq!(
            free_cpus(&[0, 1, 2, 3, 4, 5, 6, 7], &pool),
            Some(vec![0, 1])
        );
    }

    #[test]
    fn nothing_is_pinned_where_the_pool_is_not_or_leaves_no_core() {
        // An explicit --threads: ONNX Runtime pins nothing, its threads may run anywhere.
        assert_eq!(free_cpus(&[0, 1], &[vec![0, 1], vec![0, 1]]), None);
        // No thread started while loading (one core: no pool).
        assert_eq!(free_cpus(&[0], &[]), None);
        // Every allowed core claimed.
        assert_eq!(free_cpus(&[0, 1], &[vec![0], vec![1]]), None);
        // A pool pinned outside what this thread may use claims none of it.
        assert_eq!(free_cpus(&[0, 1], &[vec![5]]), None);
    }

    /// Spawns a thread that pins itself to `cpu` (named `name`, or inheriting the
    /// caller's), runs `probe` while it lives, and returns what `probe` returned.
    fn with_pinned_thread<T>(cpu: usize, name: Option<&str>, probe: impl FnOnce() -> T) -> T {
        let (pinned_tx, pinned_rx) = std::sync::mpsc::channel();
        let (end_tx, end_rx) = std::sync::mpsc::channel::<()>();
        let builder = match name {
            Some(name) => std::thread::Builder::new().name(name.to_owned()),
            None => std::thread::Builder::new(),
        };
        let pool = builder
            .spawn(move || {
                pin_current_thread(&[cpu]).unwrap();
                pinned_tx.send(()).unwrap();
                let _ = end_rx.recv();
            })
            .unwrap();
        pinned_rx.recv().unwrap();
        let seen = probe();
        end_tx.send(()).unwrap();
        pool.join().unwrap();
        seen
    }

    /// Runs `f` on a thread of its own named `name` (the tests of other modules start
    /// threads, pinned ones among them, while these run).
    fn on_thread<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(f)
            .unwrap()
            .join()
            .unwrap()
    }

    #[test]
    fn a_thread_started_meanwhile_by_other_work_claims_nothing() {
        let free = on_thread("affinity-other", || {
            let &last = cpus(&sched_getaffinity(None).unwrap()).last()?;
            let before = Threads::snapshot();
            // Named otherwise, as a thread another model or test starts would be.
            with_pinned_thread(last, Some("someone-else"), || model_cpus(&before).unwrap())
        });
        assert_eq!(free, None);
    }

    #[test]
    fn a_thread_pinned_since_the_snapshot_leaves_the_model_the_rest() {
        let allowed = cpus(&sched_getaffinity(None).unwrap());
        let Some(&last) = allowed.last() else { return };
        let free = on_thread("affinity-probe", move || {
            let before = Threads::snapshot();
            // Unnamed: it inherits the loader's name, as ONNX Runtime's pool threads do.
            with_pinned_thread(last, None, || model_cpus(&before).unwrap())
        });
        let expected: Vec<usize> = allowed.iter().copied().filter(|&c| c != last).collect();
        if expected.is_empty() {
            assert_eq!(free, None, "one CPU: nothing left for the model thread");
        } else {
            assert_eq!(free, Some(expected));
        }
    }
}
