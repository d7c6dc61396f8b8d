//! CPU time per thread of a process, from `/proc/PID/task/*/schedstat` (nanoseconds on the
//! CPU, not the 10 ms ticks of `stat`), grouped by what each thread does. What `bench-worker`
//! uses to split a worker's CPU into the driver's, the worker's own and ONNX Runtime's.

use std::collections::BTreeMap;

/// One sample: CPU nanoseconds per thread id, with the thread's name.
#[derive(Clone, Debug, Default)]
pub struct ThreadSample {
    threads: BTreeMap<u32, (String, u64)>,
}

impl ThreadSample {
    /// Reads every thread of `pid` (`None`: this process). Threads that end between listing
    /// and reading are left out.
    pub fn take(pid: Option<u32>) -> ThreadSample {
        let dir = match pid {
            Some(pid) => format!("/proc/{pid}/task"),
            None => "/proc/self/task".to_owned(),
        };
        let mut threads = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let path = entry.path();
            let ns = std::fs::read_to_string(path.join("schedstat"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok());
            let name = std::fs::read_to_string(path.join("comm"))
                .map(|s| s.trim_end().to_owned())
                .unwrap_or_default();
            if let Some(ns) = ns {
                threads.insert(tid, (name, ns));
            }
        }
        ThreadSample { threads }
    }

    /// CPU seconds each thread used since `before`, with its name (threads started since
    /// count from zero).
    pub fn since(&self, before: &ThreadSample) -> Vec<(u32, String, f64)> {
        self.threads
            .iter()
            .map(|(tid, (name, ns))| {
                let was = before.threads.get(tid).map_or(0, |(_, ns)| *ns);
                (*tid, name.clone(), ns.saturating_sub(was) as f64 / 1e9)
            })
            .collect()
    }

    /// The thread ids present.
    pub fn tids(&self) -> impl Iterator<Item = u32> + '_ {
        self.threads.keys().copied()
    }
}

/// CPU seconds of a process over a window, split by thread groups.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CpuSplit {
    /// Every thread together.
    pub total: f64,
    /// Seconds per group, by group name.
    pub groups: BTreeMap<String, f64>,
}

impl CpuSplit {
    /// Groups the threads of `after.since(before)` with `group` (thread id and name to a
    /// group name).
    pub fn of(
        before: &ThreadSample,
        after: &ThreadSample,
        mut group: impl FnMut(u32, &str) -> String,
    ) -> CpuSplit {
        let mut split = CpuSplit::default();
        for (tid, name, secs) in after.since(before) {
            split.total += secs;
            *split.groups.entry(group(tid, &name)).or_default() += secs;
        }
        split
    }

    /// Seconds in `group` (zero when absent).
    pub fn get(&self, group: &str) -> f64 {
        self.groups.get(group).copied().unwrap_or(0.0)
    }
}
