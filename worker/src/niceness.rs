//! The async runtime's scheduling priority (`--runtime-nice`).
//!
//! Where ONNX Runtime's intra-op threads (one per core by default) and the runtime's threads
//! share the cores, an overloaded worker spends a core's worth of time reading requests and
//! refusing most of them, and every slice the scheduler gives that work is taken from the
//! batch running beside it: on 2 cores, at 150% of capacity, the 64 MiB model's full batches
//! took 13% longer than at 100% (bench/intro/slo.md), which is the goodput the refusals were
//! meant to protect. Running the runtime's threads a few nice steps below the model's makes
//! the scheduler give the model the cores first when both want them, and the runtime all of
//! them while the model waits between batches. The price: requests and answers then wait
//! in socket buffers while the model runs, a delay the worker's deadline clock (from receipt)
//! does not see, so the flag is off by default (bench/intro/slo.md has the measurements).
//!
//! Linux keeps a nice value per thread, and a new thread starts with its creator's; raising
//! a thread's nice value needs no privilege, lowering it back does. The model's threads (the
//! model thread, ONNX Runtime's pool) are spawned from the runtime while the model loads, so
//! the runtime's threads are only registered as they start ([`RuntimeNice::on_thread_start`])
//! and lowered once the worker is ready ([`RuntimeNice::lower`]): the model's threads keep the
//! process's priority. Threads the runtime starts after that (its blocking pool) start
//! lowered, as their creator is.

use std::sync::{Arc, Mutex, PoisonError};

use rustix::process::{getpid, getpriority_process, setpriority_process, Pid};

use crate::Error;

/// The highest nice value Linux gives a thread (its lowest priority).
pub const MAX_NICE: i32 = 19;

/// The runtime threads' registry and how far to lower them. Cheap to clone: the runtime's
/// thread hooks and the code that lowers them share one.
#[derive(Clone, Debug)]
pub struct RuntimeNice {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Nice steps added to each runtime thread's own value (0: leave them as they are).
    steps: i32,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The nice value lowered threads run at, set by [`RuntimeNice::lower`]: threads that
    /// start later lower themselves to it.
    lowered: Option<i32>,
    /// The runtime's live threads, by kernel thread id.
    threads: Vec<Pid>,
}

impl RuntimeNice {
    /// A registry that lowers the runtime's threads by `steps` nice steps (clamped to
    /// 0..=[`MAX_NICE`]) when asked to.
    pub fn new(steps: i32) -> RuntimeNice {
        RuntimeNice {
            shared: Arc::new(Shared {
                steps: steps.clamp(0, MAX_NICE),
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// The nice steps this registry applies.
    pub fn steps(&self) -> i32 {
        self.shared.steps
    }

    /// For the runtime's `on_thread_start`: registers the calling thread, and lowers it at
    /// once where the runtime has been lowered already.
    pub fn on_thread_start(&self) -> Result<(), Error> {
        let tid = rustix::thread::gettid();
        let lowered = {
            let mut state = self.state();
            state.threads.push(tid);
            state.lowered
        };
        match lowered {
            // A thread started by a lowered one is lowered already: the target is absolute,
            // so the steps are never added twice.
            Some(target) => lower_to(tid, target),
            None => Ok(()),
        }
    }

    /// For the runtime's `on_thread_stop`: forgets the calling thread, so that its id (which
    /// the kernel may give to another thread later) is never lowered.
    pub fn on_thread_stop(&self) {
        let tid = rustix::thread::gettid();
        self.state().threads.retain(|t| *t != tid);
    }

    /// Lowers every registered runtime thread by the registry's steps (from the process's
    /// own nice value, so that a worker started under `nice` keeps the same distance to its
    /// model), and every one that starts later. Returns how many were lowered. Called once,
    /// after the model's threads exist; a second call changes nothing.
    pub fn lower(&self) -> Result<usize, Error> {
        if self.shared.steps == 0 {
            return Ok(0);
        }
        // The main thread's value is the process's (Linux reads pid 0 as the calling
        // thread, which may be a lowered one).
        let own = getpriority_process(Some(getpid())).map_err(|e| Error::Nice {
            what: "read the process's nice value",
            source: e.into(),
        })?;
        let target = own.saturating_add(self.shared.steps).min(MAX_NICE);
        let threads = {
            let mut state = self.state();
            if state.lowered.is_some() {
                return Ok(0);
            }
            state.lowered = Some(target);
            state.threads.clone()
        };
        // Outside the lock: a thread starting now finds the target set and lowers itself.
        for &tid in &threads {
            lower_to(tid, target)?;
        }
        Ok(threads.len())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent at every step, so a panic elsewhere leaves it usable.
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Sets `tid`'s nice value to `target` unless it runs at that or lower already.
fn lower_to(tid: Pid, target: i32) -> Result<(), Error> {
    let current = getpriority_process(Some(tid)).map_err(|e| Error::Nice {
        what: "read a runtime thread's nice value",
        source: e.into(),
    })?;
    if current >= target {
        return Ok(());
    }
    setpriority_process(Some(tid), target).map_err(|e| Error::Nice {
        what: "lower a runtime thread's priority",
        source: e.into(),
    })
}

/// The calling thread's nice value.
pub fn current_thread_nice() -> Result<i32, Error> {
    getpriority_process(Some(rustix::thread::gettid())).map_err(|e| Error::Nice {
        what: "read the thread's nice value",
        source: e.into(),
    })
}

#[cfg(test)]
mod tests {
    // A failed unwrap is a failed test, with its message.
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Runs `f` on a fresh thread, so that the nice values the test raises (which cannot be
    /// lowered back without privilege) die with it and never reach the other tests' threads.
    fn on_own_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().unwrap()
    }

    /// Registered threads keep their priority until `lower`, then run the steps below the
    /// process; a thread started after that lowers itself on start; a second `lower` adds
    /// nothing; a thread never registered (the model's) is left alone.
    #[test]
    fn registered_threads_are_lowered_once_and_later_ones_on_start() {
        on_own_thread(|| {
            let base = current_thread_nice().unwrap();
            // The process's value is what `lower` counts from; this thread starts with it.
            assert_eq!(base, getpriority_process(Some(getpid())).unwrap());
            let nice = RuntimeNice::new(3);
            let (registered_tx, registered_rx) = std::sync::mpsc::channel();
            let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
            let early = {
                let nice = nice.clone();
                std::thread::spawn(move || {
                    nice.on_thread_start().unwrap();
                    let before = current_thread_nice().unwrap();
                    registered_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                    (before, current_thread_nice().unwrap())
                })
            };
            registered_rx.recv().unwrap();
            let bystander = std::thread::spawn(move || current_thread_nice().unwrap());
            assert_eq!(nice.lower().unwrap(), 1, "the one registered thread");
            assert_eq!(nice.lower().unwrap(), 0, "lowered once");
            go_tx.send(()).unwrap();
            let (before, after) = early.join().unwrap();
            assert_eq!(before, base, "not lowered before `lower`");
            assert_eq!(after, (base + 3).min(MAX_NICE));
            let late = {
                let nice = nice.clone();
                std::thread::spawn(move || {
                    nice.on_thread_start().unwrap();
                    let n = current_thread_nice().unwrap();
                    nice.on_thread_stop();
                    n
                })
            };
            assert_eq!(late.join().unwrap(), (base + 3).min(MAX_NICE));
            assert_eq!(bystander.join().unwrap(), base, "unregistered: untouched");
            assert_eq!(
                current_thread_nice().unwrap(),
                base,
                "the caller: untouched"
            );
        });
    }

    /// A thread started by a lowered one (the runtime's blocking pool) inherits its value;
    /// registering it must not lower it a second time.
    #[test]
    fn an_inherited_value_is_not_lowered_twice() {
        on_own_thread(|| {
            let base = current_thread_nice().unwrap();
            let nice = RuntimeNice::new(2);
            nice.on_thread_start().unwrap();
            nice.lower().unwrap();
            let lowered = current_thread_nice().unwrap();
            assert_eq!(lowered, (base + 2).min(MAX_NICE));
            let child = {
                let nice = nice.clone();
                std::thread::spawn(move || {
                    nice.on_thread_start().unwrap();
                    current_thread_nice().unwrap()
                })
            };
            assert_eq!(child.join().unwrap(), lowered);
            nice.on_thread_stop();
            assert!(
                nice.state().threads.len() == 1,
                "the child is still registered"
            );
        });
    }

    /// Zero steps: `lower` touches nothing.
    #[test]
    fn zero_steps_lower_nothing() {
        on_own_thread(|| {
            let base = current_thread_nice().unwrap();
            let nice = RuntimeNice::new(0);
            nice.on_thread_start().unwrap();
            assert_eq!(nice.lower().unwrap(), 0);
            assert_eq!(current_thread_nice().unwrap(), base);
            assert_eq!(RuntimeNice::new(-5).steps(), 0, "never raised");
            assert_eq!(RuntimeNice::new(40).steps(), MAX_NICE);
        });
    }
}
