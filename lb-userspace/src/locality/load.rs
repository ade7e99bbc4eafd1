//! How Envoy spreads new connections over priority levels ("priority load"), and which
//! levels are in panic.
//!
//! Mirrors `LoadBalancerBase::recalculatePerPriorityState`, `distributeLoad`,
//! `recalculatePerPriorityPanic` and `recalculateLoadInTotalPanic` in Envoy's
//! `source/common/upstream/load_balancer_impl.cc`, in the same integer arithmetic, so that
//! every percentage comes out as Envoy's does. Health is by host count (Envoy's default;
//! `weighted_priority_health` is off), and there are no degraded or excluded hosts in `lb`.

/// Envoy's default overprovisioning factor (1.4), in percent as Envoy stores it.
pub const OVERPROVISIONING_FACTOR: u64 = 140;

/// Load per priority level and panic flags, as Envoy computes them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PriorityLoad {
    /// Percent of new connections per level; sums to 100 whenever there is a level.
    pub load: Vec<u32>,
    /// Whether each level is in panic: it then balances over all its hosts, healthy or not.
    pub panic: Vec<bool>,
}

/// One priority level as the load computation sees it.
#[derive(Clone, Copy, Debug)]
struct Level {
    healthy: u64,
    total: u64,
}

impl Level {
    /// `health[P] = min(100, OPF × healthy / total)` in integer percent; 0 for an empty level.
    fn health(self) -> u64 {
        if self.total == 0 {
            return 0;
        }
        (OVERPROVISIONING_FACTOR * self.healthy / self.total).min(100)
    }

    /// Envoy's `isHostSetInPanic`: the healthy percentage is below the threshold. An empty
    /// level counts as 0% healthy. Compared as `100 × healthy < threshold × total` so no
    /// float rounding can move the boundary.
    fn below_panic_threshold(self, threshold: u64) -> bool {
        if self.total == 0 {
            return threshold > 0;
        }
        100 * self.healthy < threshold * self.total
    }
}

/// Envoy's load per priority level and panic flags.
///
/// `levels[i] = (healthy_hosts, total_hosts)` of level `i` (a `healthy` above `total` is
/// taken as `total`); `panic_threshold` is a percent (Envoy caps it at 100; 0 turns panic
/// off, which is Istio's default `minHealthPercent`).
pub fn priority_loads(levels: &[(u32, u32)], panic_threshold: u32) -> PriorityLoad {
    if levels.is_empty() {
        return PriorityLoad::default();
    }
    let levels: Vec<Level> = levels
        .iter()
        .map(|&(healthy, total)| Level {
            healthy: u64::from(healthy.min(total)),
            total: u64::from(total),
        })
        .collect();
    let health: Vec<u64> = levels.iter().map(|level| level.health()).collect();
    let normalized_total_availability = health.iter().sum::<u64>().min(100);
    let threshold = u64::from(panic_threshold.min(100));

    // "Never set panic mode if normalized total health is 100%, even when individual
    // priority level has very low # of healthy hosts."
    let panic: Vec<bool> = levels
        .iter()
        .map(|level| normalized_total_availability < 100 && level.below_panic_threshold(threshold))
        .collect();

    let load = if panic.iter().all(|&in_panic| in_panic) {
        // Total panic: every level balances over all its hosts, so load follows host counts.
        load_by_host_count(&levels)
    } else if normalized_total_availability == 0 {
        // Panic is off and nothing is healthy. Envoy still needs loads that sum to 100, and
        // puts it all on P=0; no host there is eligible, so no connection is balanced.
        let mut load = vec![0; levels.len()];
        load[0] = 100;
        load
    } else {
        load_by_health(&health, normalized_total_availability)
    };
    PriorityLoad { load, panic }
}

/// Envoy's `distributeLoad` followed by the rounding fix-up: in priority order each level
/// takes `min(remaining, health × 100 / NTA)`; what integer division leaves over goes to the
/// first level with non-zero health (Envoy: "Note the first healthy priority is receiving
/// 2% additional load due to rounding"). `normalized_total_availability` must be non-zero.
fn load_by_health(health: &[u64], normalized_total_availability: u64) -> Vec<u32> {
    let mut remaining = 100u64;
    let mut load: Vec<u32> = health
        .iter()
        .map(|&level_health| {
            let share = (level_health * 100 / normalized_total_availability).min(remaining);
            remaining -= share;
            share as u32
        })
        .collect();
    if let Some(first_healthy) = health.iter().position(|&level_health| level_health > 0) {
        load[first_healthy] += remaining as u32;
    }
    load
}

/// Envoy's `recalculateLoadInTotalPanic`: `100 × hosts / all hosts` per level, the rounding
/// remainder to the first non-empty level; all of it to P=0 when there are no hosts at all.
fn load_by_host_count(levels: &[Level]) -> Vec<u32> {
    let mut load = vec![0u32; levels.len()];
    let all_hosts: u64 = levels.iter().map(|level| level.total).sum();
    let Some(first_non_empty) = levels.iter().position(|level| level.total > 0) else {
        load[0] = 100;
        return load;
    };
    let mut remaining = 100u64;
    for (level_load, level) in load.iter_mut().zip(levels) {
        let share = 100 * level.total / all_hosts;
        remaining -= share;
        *level_load = share as u32;
    }
    load[first_non_empty] += remaining as u32;
    load
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Case {
        what: &'static str,
        levels: &'static [(u32, u32)],
        panic_threshold: u32,
        load: &'static [u32],
        panic: &'static [bool],
    }

    fn check(cases: &[Case]) {
        for case in cases {
            let got = priority_loads(case.levels, case.panic_threshold);
            assert_eq!(got.load, case.load, "load: {}", case.what);
            assert_eq!(got.panic, case.panic, "panic: {}", case.what);
        }
    }

    /// SEMANTICS §2 (Envoy's "Priority levels" page): two levels, P=1 fully healthy,
    /// P=0's healthy percentage varies. 100 hosts per level so the percent is exact.
    #[test]
    fn two_levels_with_a_healthy_failover_level() {
        check(&[
            Case {
                what: "P0 100%",
                levels: &[(100, 100), (100, 100)],
                panic_threshold: 0,
                load: &[100, 0],
                panic: &[false, false],
            },
            Case {
                what: "P0 72%: 72 × 1.4 = 100.8 still counts as fully healthy",
                levels: &[(72, 100), (100, 100)],
                panic_threshold: 0,
                load: &[100, 0],
                panic: &[false, false],
            },
            Case {
                what: "P0 71%: 71 × 1.4 = 99.4 → 99",
                levels: &[(71, 100), (100, 100)],
                panic_threshold: 0,
                load: &[99, 1],
                panic: &[false, false],
            },
            Case {
                what: "P0 50%",
                levels: &[(50, 100), (100, 100)],
                panic_threshold: 0,
                load: &[70, 30],
                panic: &[false, false],
            },
            Case {
                what: "P0 25%",
                levels: &[(25, 100), (100, 100)],
                panic_threshold: 0,
                load: &[35, 65],
                panic: &[false, false],
            },
            Case {
                what: "P0 0%",
                levels: &[(0, 100), (100, 100)],
                panic_threshold: 0,
                load: &[0, 100],
                panic: &[false, false],
            },
            Case {
                what: "small pools: 1 of 4 healthy is 25% too",
                levels: &[(1, 4), (2, 2)],
                panic_threshold: 0,
                load: &[35, 65],
                panic: &[false, false],
            },
        ]);
    }

    /// Envoy's docs tables for two and three levels, where the sum of health drops under 100
    /// and loads are scaled by the normalized total availability.
    #[test]
    fn scaled_when_total_health_is_under_100() {
        check(&[
            Case {
                what: "25% / 25%: health 35 + 35 = 70, each scaled to 50",
                levels: &[(1, 4), (1, 4)],
                panic_threshold: 0,
                load: &[50, 50],
                panic: &[false, false],
            },
            Case {
                what: "25% / 25% / 100%",
                levels: &[(1, 4), (1, 4), (2, 2)],
                panic_threshold: 0,
                load: &[35, 35, 30],
                panic: &[false, false, false],
            },
            Case {
                // SEMANTICS §2 lists 36/36/28, copied from Envoy's docs table, which rounds
                // real numbers (35/98 = 35.7%). Envoy's code, which SEMANTICS also states,
                // floors each level (35, 35, 28) and gives the 2 left over to the first
                // healthy level: 37/35/28. lb follows the code, since that is what Envoy
                // does on the wire.
                what: "25% / 25% / 20%: health 35, 35, 28; NTA 98",
                levels: &[(1, 4), (1, 4), (1, 5)],
                panic_threshold: 0,
                load: &[37, 35, 28],
                panic: &[false, false, false],
            },
            Case {
                what: "health {20, 30} normalized to {40, 60}",
                levels: &[(1, 7), (3, 14)],
                panic_threshold: 0,
                load: &[40, 60],
                panic: &[false, false],
            },
        ]);
    }

    /// Envoy's own unit tests (`LoadBalancerBaseTest.GentleFailover*`), default threshold 50.
    #[test]
    fn panic_thresholds() {
        check(&[
            Case {
                what: "P0 below the threshold is ignored while total health is 100",
                levels: &[(1, 4), (2, 2)],
                panic_threshold: 50,
                load: &[35, 65],
                panic: &[false, false],
            },
            Case {
                what: "both levels at 25% are in panic: total panic, split by host count",
                levels: &[(1, 4), (1, 4)],
                panic_threshold: 50,
                load: &[50, 50],
                panic: &[true, true],
            },
            Case {
                what: "three levels at 20%: total panic, P0 takes the rounding",
                levels: &[(1, 5), (1, 5), (1, 5)],
                panic_threshold: 50,
                load: &[34, 33, 33],
                panic: &[true, true, true],
            },
            Case {
                what: "P0, P1 down, P2 fully healthy: no panic",
                levels: &[(0, 5), (0, 5), (5, 5)],
                panic_threshold: 50,
                load: &[0, 0, 100],
                panic: &[false, false, false],
            },
            Case {
                what: "P0, P1 down, P2 80% (112 → 100): no panic",
                levels: &[(0, 5), (0, 5), (4, 5)],
                panic_threshold: 50,
                load: &[0, 0, 100],
                panic: &[false, false, false],
            },
            Case {
                what: "P0, P1 down, P2 40%: every level in panic",
                levels: &[(0, 5), (0, 5), (2, 5)],
                panic_threshold: 50,
                load: &[34, 33, 33],
                panic: &[true, true, true],
            },
            Case {
                what: "total panic by host count 5/3/2",
                levels: &[(0, 5), (0, 3), (0, 2)],
                panic_threshold: 50,
                load: &[50, 30, 20],
                panic: &[true, true, true],
            },
            Case {
                what: "total panic by host count 5/6/3 of 14: 35+42+21, +2 to P0",
                levels: &[(0, 5), (2, 6), (1, 3)],
                panic_threshold: 50,
                load: &[37, 42, 21],
                panic: &[true, true, true],
            },
            Case {
                what: "total panic, remainder to the first non-empty level",
                levels: &[(0, 0), (0, 6), (0, 3)],
                panic_threshold: 50,
                load: &[0, 67, 33],
                panic: &[true, true, true],
            },
            Case {
                what: "one level in panic, the other not",
                levels: &[(1, 4), (2, 5)],
                panic_threshold: 30,
                // health 35 and 56, NTA 91: 38 + 61 = 99, +1 to P0.
                load: &[39, 61],
                panic: &[true, false],
            },
            Case {
                what: "a level in panic with no healthy host gets no load",
                levels: &[(0, 4), (3, 5)],
                panic_threshold: 50,
                load: &[0, 100],
                panic: &[true, false],
            },
            Case {
                what: "threshold above 100 is capped at 100",
                levels: &[(4, 5), (5, 5)],
                panic_threshold: 250,
                load: &[100, 0],
                panic: &[false, false],
            },
        ]);
    }

    #[test]
    fn nothing_healthy() {
        check(&[
            Case {
                what: "panic off: all load parked on P0, no level in panic",
                levels: &[(0, 1), (0, 1), (0, 1)],
                panic_threshold: 0,
                load: &[100, 0, 0],
                panic: &[false, false, false],
            },
            Case {
                what: "panic on: total panic by host count",
                levels: &[(0, 1), (0, 3)],
                panic_threshold: 1,
                load: &[25, 75],
                panic: &[true, true],
            },
            Case {
                what: "no hosts at all, panic on",
                levels: &[(0, 0), (0, 0)],
                panic_threshold: 50,
                load: &[100, 0],
                panic: &[true, true],
            },
            Case {
                what: "healthy above total is clamped",
                levels: &[(9, 4)],
                panic_threshold: 0,
                load: &[100],
                panic: &[false],
            },
        ]);
        assert_eq!(priority_loads(&[], 50), PriorityLoad::default());
    }
}
