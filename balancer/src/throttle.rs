//! [`LogThrottle`]: at most one log line a second for an event that an attacker can repeat
//! at will (a refused connection, a frame timeout), with the count of those left out.

use std::time::Duration;

use tokio::time::Instant;

/// Allows one line a second and counts the events it left out in between. Shared by the
/// tasks that meet the event behind a plain mutex, held for a comparison only.
#[derive(Debug, Default)]
pub(crate) struct LogThrottle {
    state: std::sync::Mutex<ThrottleState>,
}

#[derive(Debug, Default)]
struct ThrottleState {
    last: Option<Instant>,
    suppressed: u64,
}

impl LogThrottle {
    /// `Some(events left out since the last line)` when a line may be logged now.
    pub(crate) fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match state.last {
            Some(last) if now.duration_since(last) < Duration::from_secs(1) => {
                state.suppressed += 1;
                None
            }
            _ => {
                state.last = Some(now);
                Some(std::mem::take(&mut state.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_line_a_second_with_the_count_left_out() {
        let throttle = LogThrottle::default();
        assert_eq!(throttle.allow(), Some(0));
        assert_eq!(throttle.allow(), None);
        assert_eq!(throttle.allow(), None);
        tokio::time::sleep(Duration::from_millis(999)).await;
        assert_eq!(throttle.allow(), None);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(throttle.allow(), Some(3));
        assert_eq!(throttle.allow(), None);
    }
}
