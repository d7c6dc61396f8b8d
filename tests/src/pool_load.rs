//! Steady load through a [`Pool`]: one call every tick, each on its own task with its own
//! index, and every call's outcome recorded under that index when it returns.
//!
//! A [`Pool`] hides the wire (it sends a call again on another balancer when a connection
//! drops, and a client drops a second answer to a call that already has one), so what a
//! test can count here is what the caller sees: each call returned exactly once, and how.
//! [`drive`](crate::drive) counts answers per id on the wire instead.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidepool_protocol::{CallOptions, InferResult, Pool, Tensors};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What one call returned: the result, or the error as text.
pub type Outcome = Result<InferResult, String>;

/// Per call, its index (from 1) and what it returned, in the order calls returned.
type Returned = Arc<Mutex<Vec<(u32, Outcome)>>>;

/// What to send.
pub struct PoolLoad {
    /// Where.
    pub pool: Pool,
    /// One call every this long (a call that has not returned does not hold the next back).
    pub every: Duration,
    /// Every call's deadline (the pool's budget for it, failover included).
    pub deadline: Duration,
    /// Sending stops when this is cancelled; the calls already sent are awaited.
    pub stop: CancellationToken,
}

/// Load under way: see what has returned so far, then [`Running::finish`].
pub struct Running {
    returned: Returned,
    sender: JoinHandle<u32>,
}

/// Every call sent and what each returned.
#[derive(Debug)]
pub struct Calls {
    /// Calls sent, numbered `1..=sent`.
    pub sent: u32,
    /// Per call index, what it returned (once per return).
    pub returned: Vec<(u32, Outcome)>,
}

impl PoolLoad {
    /// Starts sending on its own task; `inputs(k)` is call `k`'s input.
    pub fn start(self, inputs: impl Fn(u32) -> Tensors + Send + 'static) -> Running {
        let returned: Returned = Arc::default();
        let recorded = Arc::clone(&returned);
        let sender = tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.every);
            let mut calls = tokio::task::JoinSet::new();
            let mut sent = 0u32;
            loop {
                tokio::select! {
                    () = self.stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                sent += 1;
                let (pool, recorded, k) = (self.pool.clone(), Arc::clone(&recorded), sent);
                let options = CallOptions {
                    deadline: Some(self.deadline),
                    ..Default::default()
                };
                let inputs = inputs(k);
                calls.spawn(async move {
                    let outcome = pool
                        .infer_with(inputs, options)
                        .await
                        .map_err(|e| e.to_string());
                    recorded
                        .lock()
                        .unwrap_or_else(|poison| poison.into_inner())
                        .push((k, outcome));
                });
            }
            while calls.join_next().await.is_some() {}
            sent
        });
        Running { returned, sender }
    }
}

impl Running {
    /// How many calls have returned so far.
    pub fn returned(&self) -> usize {
        self.returned
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .len()
    }

    /// Waits until sending stopped (the [`PoolLoad::stop`] token) and every call sent has
    /// returned.
    pub async fn finish(self) -> Calls {
        let sent = self.sender.await.expect("the pool load's sender task");
        let returned = std::mem::take(
            &mut *self
                .returned
                .lock()
                .unwrap_or_else(|poison| poison.into_inner()),
        );
        Calls { sent, returned }
    }
}

impl Calls {
    /// Asserts that every call sent returned exactly once.
    pub fn assert_each_once(&self) {
        let mut seen = vec![0u32; self.sent as usize + 1];
        for (k, _) in &self.returned {
            let n = seen
                .get_mut(*k as usize)
                .unwrap_or_else(|| panic!("call {k} returned, but only {} were sent", self.sent));
            *n += 1;
        }
        let never: Vec<usize> = (1..seen.len()).filter(|&k| seen[k] == 0).take(5).collect();
        let twice: Vec<usize> = (1..seen.len()).filter(|&k| seen[k] > 1).take(5).collect();
        assert!(
            never.is_empty() && twice.is_empty(),
            "of {} calls, some never returned (first: {never:?}) or returned twice (first: {twice:?})",
            self.sent
        );
    }

    /// The calls that failed, with their errors.
    pub fn errors(&self) -> Vec<(u32, &str)> {
        self.returned
            .iter()
            .filter_map(|(k, o)| o.as_ref().err().map(|e| (*k, e.as_str())))
            .collect()
    }

    /// How many calls ended each way: `"ok"`, or the error's text.
    pub fn outcomes(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (_, outcome) in &self.returned {
            let key = match outcome {
                Ok(_) => "ok".to_owned(),
                Err(error) => error.clone(),
            };
            *out.entry(key).or_default() += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calls(sent: u32, returned: &[(u32, Result<(), &str>)]) -> Calls {
        Calls {
            sent,
            returned: returned
                .iter()
                .map(|(k, o)| {
                    (
                        *k,
                        o.map(|()| InferResult::default()).map_err(str::to_owned),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn each_once_accepts_every_call_once_in_any_order() {
        let c = calls(3, &[(2, Ok(())), (1, Err("overloaded")), (3, Ok(()))]);
        c.assert_each_once();
        assert_eq!(c.errors(), vec![(1, "overloaded")]);
        assert_eq!(c.outcomes()["ok"], 2);
    }

    #[test]
    #[should_panic(expected = "never returned (first: [2])")]
    fn each_once_catches_a_call_that_never_returned() {
        calls(3, &[(1, Ok(())), (3, Ok(()))]).assert_each_once();
    }

    #[test]
    #[should_panic(expected = "returned twice (first: [1])")]
    fn each_once_catches_a_call_that_returned_twice() {
        calls(2, &[(1, Ok(())), (2, Ok(())), (1, Ok(()))]).assert_each_once();
    }

    #[test]
    #[should_panic(expected = "only 2 were sent")]
    fn each_once_catches_a_call_never_sent() {
        calls(2, &[(1, Ok(())), (2, Ok(())), (3, Ok(()))]).assert_each_once();
    }
}
