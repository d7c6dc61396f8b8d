//! The routing choice: a small pure function over a snapshot of the targets.
//!
//! [`choose`] sees each target as a [`Candidate`] (state, outstanding count, weight,
//! whether it can take one more request now) and returns an index, or why there is none.
//! The random source is a parameter, so the property tests below drive it with seeds.
//!
//! Eligibility comes first: healthy targets when any is registered; otherwise, with
//! fail-open, every target that is not draining; otherwise none. Among the eligible ones
//! that are connected and below `--max-outstanding`, the load of a target is
//! `(outstanding + 1) / weight`, so that an idle target of weight 2 is preferred to an
//! idle one of weight 1, and a target of weight 2 takes twice the requests at equal load.

use rand::Rng;

use crate::config::RoutingPolicy;
use crate::target::TargetState;

/// What routing knows about one target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Its health state.
    pub state: TargetState,
    /// Requests outstanding on it.
    pub outstanding: usize,
    /// Its weight, at least 1.
    pub weight: u32,
    /// Whether it has an open upstream connection.
    pub connected: bool,
    /// Whether it is at its `--max-outstanding` limit.
    pub full: bool,
    /// Whether outlier detection sets it aside (ejected, or cooling off after an
    /// `overloaded` answer): it is chosen only when every eligible target is set aside.
    pub set_aside: bool,
}

/// The outcome of one routing decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Send the request to the candidate at this index.
    Target(usize),
    /// Eligible targets exist but every one is at its limit: the request may wait.
    Full,
    /// No target can take requests: answer `unavailable`.
    NoTarget,
}

/// Chooses a target for one request.
///
/// `ticket` is a counter that advances once per request (used by round-robin only).
pub fn choose<R: Rng + ?Sized>(
    policy: RoutingPolicy,
    candidates: &[Candidate],
    fail_open: bool,
    ticket: usize,
    rng: &mut R,
) -> Choice {
    let rules = Eligibility::of(candidates, fail_open);
    let eligible = |c: &Candidate| rules.eligible(c);
    let mut eligible_count = 0usize;
    let mut open = 0usize;
    for c in candidates.iter().filter(|c| eligible(c)) {
        eligible_count += 1;
        open += usize::from(!c.full);
    }
    let choice = if eligible_count == 0 {
        Choice::NoTarget
    } else if open == 0 {
        Choice::Full
    } else {
        let is_open = |c: &Candidate| eligible(c) && !c.full;
        let nth_open = |n: usize| {
            candidates
                .iter()
                .enumerate()
                .filter(|(_, c)| is_open(c))
                .nth(n)
                .map(|(i, _)| i)
                .unwrap_or(0)
        };
        let index = match policy {
            RoutingPolicy::RoundRobin => nth_open(ticket % open),
            RoutingPolicy::FullScan => {
                let mut best: Option<usize> = None;
                let mut ties = 0u32;
                for (i, c) in candidates.iter().enumerate().filter(|(_, c)| is_open(c)) {
                    match best.map(|b| compare(c, &candidates[b])) {
                        None | Some(std::cmp::Ordering::Less) => {
                            best = Some(i);
                            ties = 1;
                        }
                        Some(std::cmp::Ordering::Equal) => {
                            // Reservoir sampling: each of the tied targets ends up chosen
                            // with the same probability, without collecting them.
                            ties += 1;
                            if rng.random_range(0..ties) == 0 {
                                best = Some(i);
                            }
                        }
                        Some(std::cmp::Ordering::Greater) => {}
                    }
                }
                best.unwrap_or(0)
            }
            RoutingPolicy::P2c => {
                if open == 1 {
                    nth_open(0)
                } else {
                    let a = rng.random_range(0..open);
                    let mut b = rng.random_range(0..open - 1);
                    if b >= a {
                        b += 1;
                    }
                    let (a, b) = (nth_open(a), nth_open(b));
                    match compare(&candidates[a], &candidates[b]) {
                        std::cmp::Ordering::Less => a,
                        std::cmp::Ordering::Greater => b,
                        std::cmp::Ordering::Equal => {
                            if rng.random_bool(0.5) {
                                a
                            } else {
                                b
                            }
                        }
                    }
                }
            }
        };
        Choice::Target(index)
    };
    tracing::trace!(
        ?policy,
        candidates = candidates.len(),
        eligible = eligible_count,
        open,
        ?choice,
        outstanding = match choice {
            Choice::Target(i) => candidates[i].outstanding,
            _ => 0,
        },
        "routing decision"
    );
    choice
}

/// The candidates [`choose`] may pick now (eligible, and below their limit), by index:
/// where a request goes when the one chosen will not do (predicted-finish admission looks
/// for a target that can answer in time).
pub fn open(candidates: &[Candidate], fail_open: bool) -> impl Iterator<Item = usize> + '_ {
    let rules = Eligibility::of(candidates, fail_open);
    candidates
        .iter()
        .enumerate()
        .filter(move |(_, c)| rules.eligible(c) && !c.full)
        .map(|(i, _)| i)
}

/// How far above the least-loaded open target a burst's target may be and still take the
/// burst's next frame: a quarter of the least load. Relative, so that it costs nothing where
/// least outstanding matters most: with a few requests outstanding (a slow target's backlog
/// is then what the p99 waits behind) the slack is zero and only a target tied with the
/// least loaded keeps a burst; with a deep pipeline (dozens outstanding everywhere) a burst
/// stays together for a few frames more, and those share one `send`. A half or a whole of
/// the least load saved more `send`s but let a slow target's backlog grow with the others'
/// on a loaded machine (the skewed pool's p99 at 1.45 s once with a whole, against 13 ms).
const STICKY_SHARE: usize = 4;

/// Whether the next frame of a read burst may go where the burst's previous frame went,
/// the candidate at `index`, instead of a fresh [`choose`]: when it is still open (eligible,
/// connected, below its limit) and its load is within [`STICKY_SHARE`] of the least-loaded
/// open candidate's. A slow target accumulates outstanding requests and so falls outside
/// the slack and is left, as [`choose`] would leave it.
///
/// Frames of one burst that go to one target go to one upstream connection and leave in
/// one `send`; scattered over every target's connections they took one `send` each.
pub fn keeps(candidates: &[Candidate], fail_open: bool, index: usize) -> bool {
    let Some(kept) = candidates.get(index) else {
        return false;
    };
    let rules = Eligibility::of(candidates, fail_open);
    let is_open = |c: &Candidate| rules.eligible(c) && !c.full;
    if !is_open(kept) {
        return false;
    }
    let Some(least) = candidates
        .iter()
        .filter(|c| is_open(c))
        .min_by(|a, b| compare(a, b))
    else {
        return false;
    };
    // (kept + 1) / kept.weight <= (least + 1 + slack) / least.weight, without division.
    let slack = least.outstanding / STICKY_SHARE;
    let kept_load = (kept.outstanding as u128 + 1) * u128::from(least.weight.max(1));
    let allowed = (least.outstanding as u128 + 1 + slack as u128) * u128::from(kept.weight.max(1));
    kept_load <= allowed
}

/// Which candidates are eligible, as one decision's snapshot sees them.
#[derive(Clone, Copy)]
struct Eligibility {
    fail_open: bool,
    /// Some candidate is healthy: only healthy ones are eligible.
    any_healthy: bool,
    /// Some candidate in an eligible state is not set aside: set-aside ones are passed over.
    any_in: bool,
}

impl Eligibility {
    fn of(candidates: &[Candidate], fail_open: bool) -> Eligibility {
        let mut rules = Eligibility {
            fail_open,
            any_healthy: candidates.iter().any(|c| c.state == TargetState::Healthy),
            any_in: false,
        };
        // Outlier detection steers load, it never refuses it: when every eligible target
        // is set aside, they are all eligible again.
        rules.any_in = candidates.iter().any(|c| rules.in_state(c) && !c.set_aside);
        rules
    }

    fn in_state(&self, c: &Candidate) -> bool {
        c.connected
            && if self.any_healthy {
                c.state == TargetState::Healthy
            } else {
                self.fail_open && c.state != TargetState::Draining
            }
    }

    fn eligible(&self, c: &Candidate) -> bool {
        self.in_state(c) && !(self.any_in && c.set_aside)
    }
}

/// Compares `(outstanding + 1) / weight` without division.
fn compare(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    let load_a = (a.outstanding as u128 + 1) * u128::from(b.weight.max(1));
    let load_b = (b.outstanding as u128 + 1) * u128::from(a.weight.max(1));
    load_a.cmp(&load_b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    const POLICIES: [RoutingPolicy; 3] = [
        RoutingPolicy::P2c,
        RoutingPolicy::FullScan,
        RoutingPolicy::RoundRobin,
    ];

    fn state() -> impl Strategy<Value = TargetState> {
        prop_oneof![
            Just(TargetState::Initial),
            Just(TargetState::Healthy),
            Just(TargetState::Unhealthy),
            Just(TargetState::Draining),
        ]
    }

    fn candidate() -> impl Strategy<Value = Candidate> {
        (
            state(),
            0usize..50,
            1u32..4,
            prop::bool::weighted(0.9),
            prop::bool::weighted(0.2),
            prop::bool::weighted(0.2),
        )
            .prop_map(|(state, outstanding, weight, connected, full, set_aside)| {
                Candidate {
                    state,
                    outstanding,
                    weight,
                    connected,
                    full,
                    set_aside,
                }
            })
    }

    fn healthy(outstanding: usize, weight: u32) -> Candidate {
        Candidate {
            state: TargetState::Healthy,
            outstanding,
            weight,
            connected: true,
            full: false,
            set_aside: false,
        }
    }

    proptest! {
        #[test]
        fn a_set_aside_target_is_chosen_only_when_every_eligible_one_is(
            candidates in prop::collection::vec(candidate(), 0..12),
            fail_open: bool,
            ticket: usize,
            seed: u64,
        ) {
            let any_healthy = candidates.iter().any(|c| c.state == TargetState::Healthy);
            let in_state = |c: &Candidate| c.connected && if any_healthy {
                c.state == TargetState::Healthy
            } else {
                fail_open && c.state != TargetState::Draining
            };
            for policy in POLICIES {
                let mut rng = SmallRng::seed_from_u64(seed);
                if let Choice::Target(i) = choose(policy, &candidates, fail_open, ticket, &mut rng) {
                    if candidates[i].set_aside {
                        prop_assert!(candidates.iter().all(|c| !in_state(c) || c.set_aside));
                    }
                }
            }
        }

        #[test]
        fn never_a_worse_state_while_a_healthy_target_exists(
            candidates in prop::collection::vec(candidate(), 0..12),
            fail_open: bool,
            ticket: usize,
            seed: u64,
        ) {
            for policy in POLICIES {
                let mut rng = SmallRng::seed_from_u64(seed);
                let choice = choose(policy, &candidates, fail_open, ticket, &mut rng);
                let any_healthy = candidates.iter().any(|c| c.state == TargetState::Healthy);
                let usable = |c: &Candidate| c.connected && !c.full;
                match choice {
                    Choice::Target(i) => {
                        let c = candidates[i];
                        prop_assert!(usable(&c));
                        prop_assert_ne!(c.state, TargetState::Draining);
                        if any_healthy {
                            prop_assert_eq!(c.state, TargetState::Healthy);
                        } else {
                            prop_assert!(fail_open);
                        }
                    }
                    Choice::Full => {
                        // Something eligible exists, and all of it is full.
                        prop_assert!(candidates.iter().any(|c| c.connected && c.full));
                    }
                    Choice::NoTarget => {
                        if any_healthy {
                            prop_assert!(!candidates.iter().any(|c| c.state == TargetState::Healthy && c.connected));
                        } else if fail_open {
                            prop_assert!(!candidates.iter().any(|c| c.state != TargetState::Draining && c.connected));
                        }
                    }
                }
            }
        }

        #[test]
        fn open_lists_exactly_what_choose_may_pick(
            candidates in prop::collection::vec(candidate(), 0..12),
            fail_open: bool,
            ticket: usize,
            seed: u64,
        ) {
            let open: Vec<usize> = open(&candidates, fail_open).collect();
            for policy in POLICIES {
                let mut rng = SmallRng::seed_from_u64(seed);
                match choose(policy, &candidates, fail_open, ticket, &mut rng) {
                    Choice::Target(i) => prop_assert!(open.contains(&i)),
                    Choice::Full | Choice::NoTarget => prop_assert!(open.is_empty()),
                }
            }
            // Full scan picks one of the least loaded of them.
            if let Some(&least) = open.iter().min_by(|&&a, &&b| compare(&candidates[a], &candidates[b])) {
                let mut rng = SmallRng::seed_from_u64(seed);
                let Choice::Target(i) = choose(RoutingPolicy::FullScan, &candidates, fail_open, 0, &mut rng) else {
                    return Err(TestCaseError::fail("open candidates, yet no choice"));
                };
                prop_assert_eq!(compare(&candidates[i], &candidates[least]), std::cmp::Ordering::Equal);
            }
        }

        #[test]
        fn full_scan_picks_a_least_loaded_target(
            loads in prop::collection::vec((0usize..20, 1u32..4), 1..10),
            seed: u64,
        ) {
            let candidates: Vec<_> = loads.iter().map(|&(o, w)| healthy(o, w)).collect();
            let mut rng = SmallRng::seed_from_u64(seed);
            let Choice::Target(i) = choose(RoutingPolicy::FullScan, &candidates, true, 0, &mut rng) else {
                return Err(TestCaseError::fail("no choice"));
            };
            for c in &candidates {
                prop_assert_ne!(compare(c, &candidates[i]), std::cmp::Ordering::Less);
            }
        }

        #[test]
        fn p2c_never_picks_the_single_most_loaded(
            loads in prop::collection::vec(0usize..20, 2..10),
            seed: u64,
        ) {
            let candidates: Vec<_> = loads.iter().map(|&o| healthy(o, 1)).collect();
            let max = *loads.iter().max().unwrap();
            let unique_max = loads.iter().filter(|&&o| o == max).count() == 1;
            let mut rng = SmallRng::seed_from_u64(seed);
            let Choice::Target(i) = choose(RoutingPolicy::P2c, &candidates, true, 0, &mut rng) else {
                return Err(TestCaseError::fail("no choice"));
            };
            if unique_max {
                prop_assert_ne!(candidates[i].outstanding, max);
            }
        }

        #[test]
        fn load_spreads_evenly_when_requests_stay(
            n in 1usize..8,
            per_target in 1usize..30,
            seed: u64,
        ) {
            // Requests that never finish: least-outstanding must fill targets level by
            // level; p2c within a small band; round-robin exactly.
            for policy in POLICIES {
                let mut candidates = vec![healthy(0, 1); n];
                let mut rng = SmallRng::seed_from_u64(seed);
                for ticket in 0..n * per_target {
                    let Choice::Target(i) = choose(policy, &candidates, true, ticket, &mut rng) else {
                        return Err(TestCaseError::fail("no choice"));
                    };
                    candidates[i].outstanding += 1;
                }
                let max = candidates.iter().map(|c| c.outstanding).max().unwrap();
                let min = candidates.iter().map(|c| c.outstanding).min().unwrap();
                match policy {
                    RoutingPolicy::FullScan | RoutingPolicy::RoundRobin => prop_assert_eq!(max, min),
                    // Two choices keep the most loaded within O(log log n) of the mean:
                    // 120k seeded runs of these sizes never went past mean + 3.
                    RoutingPolicy::P2c => prop_assert!(max <= per_target + 4, "{max} vs mean {per_target}, min {min}"),
                }
            }
        }

        #[test]
        fn weights_share_load_in_proportion(
            seed: u64,
        ) {
            let mut candidates = vec![healthy(0, 1), healthy(0, 3)];
            let mut rng = SmallRng::seed_from_u64(seed);
            for _ in 0..400 {
                let Choice::Target(i) = choose(RoutingPolicy::FullScan, &candidates, true, 0, &mut rng) else {
                    return Err(TestCaseError::fail("no choice"));
                };
                candidates[i].outstanding += 1;
            }
            prop_assert!((99..=101).contains(&candidates[0].outstanding), "{:?}", candidates);
        }
    }

    #[test]
    fn fail_open_routes_to_registered_targets_when_none_is_healthy() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut c = vec![healthy(0, 1); 2];
        c[0].state = TargetState::Unhealthy;
        c[1].state = TargetState::Draining;
        assert_eq!(
            choose(RoutingPolicy::P2c, &c, true, 0, &mut rng),
            Choice::Target(0)
        );
        assert_eq!(
            choose(RoutingPolicy::P2c, &c, false, 0, &mut rng),
            Choice::NoTarget
        );
    }

    #[test]
    fn full_targets_mean_wait_not_unavailable() {
        let mut rng = SmallRng::seed_from_u64(1);
        let mut c = vec![healthy(3, 1); 2];
        c[0].full = true;
        c[1].full = true;
        assert_eq!(
            choose(RoutingPolicy::FullScan, &c, true, 0, &mut rng),
            Choice::Full
        );
        assert_eq!(
            choose(RoutingPolicy::FullScan, &[], true, 0, &mut rng),
            Choice::NoTarget
        );
    }

    #[test]
    fn ties_are_broken_at_random() {
        let mut rng = SmallRng::seed_from_u64(7);
        let c = vec![healthy(0, 1); 4];
        let mut seen = [0; 4];
        for _ in 0..400 {
            if let Choice::Target(i) = choose(RoutingPolicy::FullScan, &c, true, 0, &mut rng) {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    proptest! {
        #[test]
        fn a_burst_is_kept_only_where_choose_may_go_and_within_the_slack(
            candidates in prop::collection::vec(candidate(), 0..12),
            fail_open: bool,
            index in 0usize..14,
        ) {
            let open: Vec<usize> = open(&candidates, fail_open).collect();
            if keeps(&candidates, fail_open, index) {
                prop_assert!(open.contains(&index), "kept where choose may not go");
                let kept = &candidates[index];
                for &i in &open {
                    let other = &candidates[i];
                    // No open target is lighter than the kept one by more than the slack.
                    let kept_load = (kept.outstanding + 1) as f64 / f64::from(kept.weight);
                    let slack = (other.outstanding / STICKY_SHARE) as f64;
                    let bound = (other.outstanding as f64 + 1.0 + slack) / f64::from(other.weight);
                    let least = open.iter().map(|&j| {
                        (candidates[j].outstanding + 1) as f64 / f64::from(candidates[j].weight)
                    }).fold(f64::INFINITY, f64::min);
                    if (other.outstanding + 1) as f64 / f64::from(other.weight) == least {
                        prop_assert!(kept_load <= bound + 1e-9, "{kept:?} kept beside {other:?}");
                    }
                }
            } else if let Some(&least) = open.iter().min_by(|&&a, &&b| compare(&candidates[a], &candidates[b])) {
                // A least-loaded open target is always kept.
                if index < candidates.len() && open.contains(&index) {
                    prop_assert!(compare(&candidates[index], &candidates[least]) != std::cmp::Ordering::Equal);
                }
            }
        }
    }

    #[test]
    fn a_burst_stays_on_its_target_within_a_quarter_of_the_least_load() {
        // A deep pipeline: 40 outstanding on the least loaded, so up to 10 more is kept.
        let mut c = vec![healthy(40, 1), healthy(50, 1), healthy(51, 1)];
        assert!(keeps(&c, true, 1), "50 is within 40 + 10");
        assert!(!keeps(&c, true, 2), "51 is not");
        assert!(keeps(&c, true, 0), "the least loaded is always kept");
        // Weights: a target of weight 2 carries twice the outstanding at equal load.
        c[2].weight = 2;
        assert!(keeps(&c, true, 2));
        // Full, disconnected or out of the eligible set: never kept, however light.
        for spoil in [
            |c: &mut Candidate| c.full = true,
            |c: &mut Candidate| c.connected = false,
            |c: &mut Candidate| c.state = TargetState::Unhealthy,
            |c: &mut Candidate| c.set_aside = true,
        ] {
            let mut c = vec![healthy(0, 1), healthy(40, 1)];
            spoil(&mut c[0]);
            assert!(!keeps(&c, true, 0), "{:?}", c[0]);
            assert!(keeps(&c, true, 1), "the other is now the least loaded");
        }
        assert!(!keeps(&c, true, 3), "no such candidate");
    }

    #[test]
    fn a_slow_target_with_a_backlog_is_left_as_soon_as_it_leads() {
        // A few outstanding (a skewed pool at half load): no slack at all, so a burst stays
        // only on a target tied with the least loaded.
        let mut c = vec![healthy(0, 1), healthy(0, 1), healthy(0, 1), healthy(0, 1)];
        assert!(keeps(&c, true, 3));
        c[3].outstanding = 1;
        assert!(!keeps(&c, true, 3), "one more than the others: left");
        // Frames of a burst stuck to the slow target pile up only until it leads by the
        // slack: at most a quarter above the others however long the burst.
        let mut c = vec![
            healthy(20, 1),
            healthy(20, 1),
            healthy(20, 1),
            healthy(20, 1),
        ];
        let mut kept = 0;
        while keeps(&c, true, 3) {
            c[3].outstanding += 1;
            kept += 1;
        }
        assert_eq!(kept, 6, "20 + 20 / 4 = 25, then left");
    }
}
