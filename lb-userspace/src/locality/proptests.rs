//! Properties that must hold for any service and any health: loads sum to 100, shares sum
//! to 1 whenever something can take traffic, and only panic sends traffic to an unhealthy
//! endpoint.

use proptest::prelude::*;

use super::{
    plan, priority_loads,
    tests::{labelled_endpoint, node, service},
};
use crate::model::{
    Distribute, Endpoint, Failover, LocalityLbSetting, OutlierDetection, TrafficPolicy,
};

/// Localities drawn from a small pool so that endpoints share localities and levels.
fn locality() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["r1", "r2", "r3"]),
        prop::sample::select(vec!["z1", "z2"]),
        prop::sample::select(vec!["", "s1"]),
    )
        .prop_map(|(region, zone, subzone)| format!("{region}/{zone}/{subzone}"))
}

fn endpoint() -> impl Strategy<Value = Endpoint> {
    (locality(), prop::sample::select(vec!["v1", "v2"]), 0u32..5).prop_map(
        |(locality, version, weight)| {
            let mut endpoint = labelled_endpoint(&locality, &[("version", version)]);
            endpoint.weight = weight;
            endpoint
        },
    )
}

fn pattern() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["*", "r1", "r1/z1", "r1/z2/*", "r2/*", "r3/z2/s1"])
        .prop_map(str::to_string)
}

fn setting() -> impl Strategy<Value = LocalityLbSetting> {
    let failover = prop::collection::vec(
        (
            prop::sample::select(vec!["r1", "r2", "r3"]),
            prop::sample::select(vec!["r1", "r2", "r3"]),
        )
            .prop_map(|(from, to)| Failover {
                from: from.into(),
                to: to.into(),
            }),
        0..3,
    );
    let failover_priority = prop::collection::vec(
        prop::sample::select(vec![
            "version",
            "version=v2",
            super::REGION_LABEL,
            super::ZONE_LABEL,
            super::SUBZONE_LABEL,
        ])
        .prop_map(str::to_string),
        0..3,
    );
    let distribute = prop::collection::vec(
        (
            pattern(),
            prop::collection::btree_map(pattern(), 0u32..100, 0..4),
        )
            .prop_map(|(from, to)| Distribute { from, to }),
        0..2,
    );
    (
        prop::option::of(any::<bool>()),
        failover,
        failover_priority,
        distribute,
    )
        .prop_map(
            |(enabled, failover, failover_priority, distribute)| LocalityLbSetting {
                enabled,
                failover,
                failover_priority,
                distribute,
                force: false,
            },
        )
}

fn traffic_policy() -> impl Strategy<Value = TrafficPolicy> {
    (prop::option::of(setting()), prop::option::of(0u32..=100)).prop_map(
        |(locality_lb, min_health_percent)| TrafficPolicy {
            locality_lb,
            outlier_detection: min_health_percent.map(|min_health_percent| OutlierDetection {
                min_health_percent,
                ..Default::default()
            }),
            health_check: None,
            tls: None,
        },
    )
}

proptest! {
    #[test]
    fn loads_sum_to_100_when_any_level_has_hosts(
        levels in prop::collection::vec(
            (0u32..50).prop_flat_map(|total| (0..=total, Just(total))),
            1..7,
        ),
        panic_threshold in 0u32..=120,
    ) {
        let loads = priority_loads(&levels, panic_threshold);
        prop_assert_eq!(loads.load.len(), levels.len());
        prop_assert_eq!(loads.panic.len(), levels.len());
        prop_assert_eq!(loads.load.iter().sum::<u32>(), 100);
        // A level with no healthy host takes load only when every level is in panic.
        let total_panic = loads.panic.iter().all(|&in_panic| in_panic);
        for (&(healthy, _), &load) in levels.iter().zip(&loads.load) {
            if healthy == 0 && load > 0 && !total_panic {
                // The one exception: nothing healthy anywhere with panic off parks the
                // load on P0.
                prop_assert!(levels.iter().all(|&(healthy, _)| healthy == 0));
            }
        }
    }

    #[test]
    fn shares_sum_to_one_and_follow_health(
        endpoints in prop::collection::vec(endpoint(), 0..12),
        client in (locality(), prop::sample::select(vec!["v1", "v2"])),
        policy in traffic_policy(),
        health in prop::collection::vec(any::<bool>(), 12),
    ) {
        let client = node(&client.0, &[("version", client.1)]);
        let service = service(endpoints, policy);
        let healthy = &health[..service.endpoints.len()];
        let plan = plan(&client, &service, healthy);

        prop_assert_eq!(plan.shares.len(), service.endpoints.len());
        prop_assert_eq!(plan.eligible.len(), service.endpoints.len());
        prop_assert_eq!(plan.priorities.len(), service.endpoints.len());
        let sum: f64 = plan.shares.iter().sum();
        if plan.eligible.iter().any(|&eligible| eligible) {
            prop_assert!((sum - 1.0).abs() < 1e-9, "shares sum to {sum}: {plan:?}");
        } else {
            prop_assert!(plan.shares.iter().all(|&share| share == 0.0), "{plan:?}");
        }
        for (index, &share) in plan.shares.iter().enumerate() {
            prop_assert!((0.0..=1.0 + 1e-12).contains(&share));
            if share > 0.0 {
                prop_assert!(plan.eligible[index], "endpoint {index} not eligible: {plan:?}");
            }
            let in_panic = plan.priorities[index]
                .is_some_and(|level| plan.loads.panic[level as usize]);
            if !healthy[index] && !in_panic {
                prop_assert_eq!(share, 0.0, "unhealthy endpoint {} has traffic: {:?}", index, plan);
            }
            if plan.priorities[index].is_none() {
                prop_assert!(!plan.eligible[index] && share == 0.0);
            }
        }
        // Levels are numbered without gaps.
        let levels = plan.priorities.iter().flatten().max().map_or(0, |&last| last + 1);
        for level in 0..levels {
            prop_assert!(plan.priorities.contains(&Some(level)), "level {level} empty: {plan:?}");
        }
    }
}
