//! [`BatchClock`]: which clock times a batch for the load share and the cost model.
//!
//! A batch's wall time carries whatever else the machine runs: where three single-thread
//! workers, the balancer and the load generator share two cores (the autoscaling benchmark,
//! `make demo`), every batch at the peak ran about twice as long as alone, and a load share
//! weighed by those times read the load's need two times over once the pool had grown. The
//! model thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`) stops while the thread waits for a
//! core, so it reads the batch's own work: the load, not the neighbours.
//!
//! That holds only when the whole batch runs on the model thread: ONNX Runtime with **one
//! intra-op thread** on the CPU execution provider (`--threads 1`, what the demo and the
//! benchmark run). With several intra-op threads the work is spread over ONNX Runtime's
//! pool, and the calling thread's CPU clock misses the parts it waits for (or counts its
//! spinning); on CUDA the work is on the GPU. There the busy share means what share of the
//! time the model occupied the worker's cores (or device), which is wall time, and a worker
//! with several threads is meant to own its cores, where wall time is the work. So
//! [`BatchClock::for_session`] picks the thread's CPU time for one CPU thread and wall time
//! otherwise.
//!
//! A consequence to know when deploying: CPU time reads against a whole core. A worker
//! throttled below one core (a Kubernetes CPU limit under 1 with `--threads 1`) never reads
//! a load share above its quota; its saturation then shows in the balancer's in-flight guard
//! and the reported queue delay, not in the share. Give each thread a full core.

use std::time::{Duration, Instant};

use crate::model::Device;

/// Which clock times a batch's run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BatchClock {
    /// Wall time: the span from the batch's start to its end.
    #[default]
    Wall,
    /// The CPU time of the thread that runs the batch (it must call both ends).
    ThreadCpu,
}

impl BatchClock {
    /// The clock for a session on `device` with `threads` intra-op threads (`None`: ONNX
    /// Runtime's default, one per core): the thread's CPU time for one CPU thread, else wall.
    pub fn for_session(device: Device, threads: Option<usize>) -> Self {
        match (device, threads) {
            (Device::Cpu, Some(1)) if thread_cpu().is_some() => BatchClock::ThreadCpu,
            _ => BatchClock::Wall,
        }
    }

    /// The calling thread's CPU time for [`BatchClock::ThreadCpu`]; `None` for wall time
    /// (and where the platform has no thread clock).
    pub fn cpu_now(self) -> Option<Duration> {
        match self {
            BatchClock::Wall => None,
            BatchClock::ThreadCpu => thread_cpu(),
        }
    }

    /// Times `f` on the calling thread: its result and its run time by this clock.
    pub fn time<T>(self, f: impl FnOnce() -> T) -> (T, Duration) {
        let (wall, cpu) = (Instant::now(), self.cpu_now());
        let out = f();
        let elapsed = wall.elapsed();
        (out, run_time(elapsed, cpu, self.cpu_now()))
    }
}

/// A batch's run time from its wall time and the thread's CPU clock at both ends: the CPU
/// time when both were read (never more than the wall time: the two clocks tick apart),
/// else the wall time.
pub fn run_time(
    wall: Duration,
    cpu_start: Option<Duration>,
    cpu_end: Option<Duration>,
) -> Duration {
    match (cpu_start, cpu_end) {
        (Some(start), Some(end)) => end.saturating_sub(start).min(wall),
        _ => wall,
    }
}

/// The calling thread's CPU time, `None` where it cannot be read.
fn thread_cpu() -> Option<Duration> {
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "macos"))]
    {
        use nix::time::{clock_gettime, ClockId};
        let t = clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).ok()?;
        let secs = u64::try_from(t.tv_sec()).ok()?;
        let nanos = u32::try_from(t.tv_nsec()).ok()?;
        Some(Duration::new(secs, nanos))
    }
    #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "macos")))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cpu_thread_is_timed_by_its_cpu_clock_everything_else_by_the_wall() {
        assert_eq!(
            BatchClock::for_session(Device::Cpu, Some(1)),
            BatchClock::ThreadCpu
        );
        for (device, threads) in [
            (Device::Cpu, None),
            (Device::Cpu, Some(2)),
            (Device::Cuda, Some(1)),
        ] {
            assert_eq!(
                BatchClock::for_session(device, threads),
                BatchClock::Wall,
                "{device:?} {threads:?}"
            );
        }
        assert_eq!(BatchClock::Wall.cpu_now(), None);
    }

    #[test]
    fn the_run_time_is_the_cpu_time_capped_by_the_wall() {
        let ms = Duration::from_millis;
        assert_eq!(run_time(ms(10), Some(ms(100)), Some(ms(104))), ms(4));
        assert_eq!(run_time(ms(3), Some(ms(100)), Some(ms(104))), ms(3));
        assert_eq!(run_time(ms(10), None, Some(ms(104))), ms(10));
        assert_eq!(run_time(ms(10), Some(ms(104)), Some(ms(100))), ms(0));
    }

    #[test]
    fn a_thread_waiting_for_nothing_burns_no_cpu_time() {
        // Sleeping is wall time without work: the thread's clock barely moves.
        let ((), sleeping) =
            BatchClock::ThreadCpu.time(|| std::thread::sleep(Duration::from_millis(30)));
        assert!(sleeping < Duration::from_millis(15), "{sleeping:?}");
        let ((), wall) = BatchClock::Wall.time(|| std::thread::sleep(Duration::from_millis(30)));
        assert!(wall >= Duration::from_millis(30), "{wall:?}");
        // Spinning is work: the clock moves.
        let (spun, busy) = BatchClock::ThreadCpu.time(|| {
            let until = Instant::now() + Duration::from_millis(20);
            let mut n = 0u64;
            while Instant::now() < until {
                n = n.wrapping_add(1);
            }
            n
        });
        assert!(spun > 0 && busy > Duration::ZERO, "{busy:?}");
    }
}
