//! [`Priority`]: an `infer`'s priority class, the `priority` key on the wire.
//!
//! Three classes, so that a client can say "this one first" and "this one may wait or be
//! refused" without tuning numbers; a worker orders its queue by class (ageing waiting items
//! so that none starves) and refuses the lowest first when it is overloaded. Absent means
//! [`Priority::Normal`]. An unknown value is refused (`bad_request`) rather than read as
//! normal: a client that asked for something this server does not know should hear so.

use std::fmt;

/// An `infer`'s priority class (wire key `priority`: `"low"`, `"normal"` or `"high"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    /// Served after the others and refused first under overload: batch jobs, prefetching.
    Low,
    /// The default.
    #[default]
    Normal,
    /// Served first: interactive requests.
    High,
}

impl Priority {
    /// Every class, lowest first.
    pub const ALL: [Priority; 3] = [Priority::Low, Priority::Normal, Priority::High];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }

    /// The class's rank: 0 for low, 1 for normal, 2 for high.
    pub fn rank(self) -> usize {
        self as usize
    }

    /// The class of a wire value, from its bytes (the raw scanner reads keys as bytes).
    pub fn from_wire(value: &[u8]) -> Option<Priority> {
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str().as_bytes() == value)
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_trip_and_order_low_to_high() {
        for p in Priority::ALL {
            assert_eq!(Priority::from_wire(p.as_str().as_bytes()), Some(p));
            assert_eq!(Priority::ALL[p.rank()], p);
        }
        assert!(Priority::Low < Priority::Normal && Priority::Normal < Priority::High);
        assert_eq!(Priority::default(), Priority::Normal);
    }

    #[test]
    fn unknown_values_are_not_classes() {
        assert_eq!(Priority::from_wire(b"urgent"), None);
        assert_eq!(
            Priority::from_wire(b"HIGH"),
            None,
            "the wire spelling is lowercase"
        );
    }
}
