//! Locality-aware load balancing: for one service as seen from this node, the share of new
//! connections each endpoint gets, given which endpoints are healthy.
//!
//! Three steps, each the mirror of what Istio and Envoy do (the shared `SEMANTICS.md`,
//! §1–2, has the rules and checkpoints):
//! 1. `priority`/`distribute`: the priority level of each endpoint and the locality weights,
//!    as Istio's pilot computes them for the client's locality and labels
//!    (<https://github.com/istio/istio/blob/master/pilot/pkg/networking/core/loadbalancer/loadbalancer.go>);
//! 2. `load`: Envoy's share of traffic per level (overprovisioning factor 1.4, normalized
//!    total availability, panic)
//!    (<https://www.envoyproxy.io/docs/envoy/latest/intro/arch_overview/upstream/load_balancing/priority>);
//! 3. `plan`: inside a level, Envoy's locality-weighted pick, then endpoint weights
//!    (<https://www.envoyproxy.io/docs/envoy/latest/intro/arch_overview/upstream/load_balancing/locality_weight>).
//!
//! Pure computation: no kernel, no I/O.

mod distribute;
mod load;
mod priority;
#[cfg(test)]
mod proptests;

use std::collections::BTreeMap;

pub use distribute::locality_matches;
pub use load::{priority_loads, PriorityLoad, OVERPROVISIONING_FACTOR};
pub use priority::{endpoint_priorities, NETWORK_LABEL, REGION_LABEL, SUBZONE_LABEL, ZONE_LABEL};

use crate::model::{Endpoint, Locality, Node, Service};
use priority::{endpoint_weight, Assignment, LocalityWeighting};

/// How new connections to one service spread over its endpoints.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Share of new connections per endpoint (order of `service.endpoints`), in [0, 1];
    /// sums to 1 when any endpoint can take traffic, all zeros otherwise.
    pub shares: Vec<f64>,
    /// Whether an endpoint may take new connections: healthy, or in a level in panic.
    pub eligible: Vec<bool>,
    /// Priority level per endpoint; `None` when `distribute` gives it no traffic.
    pub priorities: Vec<Option<u32>>,
    /// Envoy's load per level and panic flags.
    pub loads: PriorityLoad,
}

/// The final plan for `service` seen from `node`. `healthy[i]` says whether endpoint `i` is
/// in the healthy set (not ejected); an endpoint without an entry counts as healthy, as a
/// new host does in Envoy until something marks it otherwise.
pub fn plan(node: &Node, service: &Service, healthy: &[bool]) -> Plan {
    let endpoints = &service.endpoints;
    let Assignment {
        priorities,
        weighting,
    } = priority::assign(node, endpoints, &service.policy);
    let healthy: Vec<bool> = (0..endpoints.len())
        .map(|index| healthy.get(index).copied().unwrap_or(true))
        .collect();

    let level_count = priorities
        .iter()
        .flatten()
        .max()
        .map_or(0, |&last| last as usize + 1);
    let mut levels = vec![(0u32, 0u32); level_count];
    for (priority, &is_healthy) in priorities.iter().zip(&healthy) {
        if let Some(level) = priority.and_then(|p| levels.get_mut(p as usize)) {
            level.1 += 1;
            level.0 += u32::from(is_healthy);
        }
    }
    let loads = priority_loads(&levels, panic_threshold(service));

    let level_in_panic = |priority: Option<u32>| {
        priority.is_some_and(|p| loads.panic.get(p as usize).copied().unwrap_or(false))
    };
    let eligible: Vec<bool> = priorities
        .iter()
        .zip(&healthy)
        .map(|(&priority, &is_healthy)| {
            priority.is_some() && (is_healthy || level_in_panic(priority))
        })
        .collect();

    let mut shares = vec![0.0; endpoints.len()];
    for (level, &load) in loads.load.iter().enumerate() {
        if load == 0 {
            continue;
        }
        let members: Vec<usize> = (0..endpoints.len())
            .filter(|&index| priorities[index] == Some(level as u32))
            .collect();
        let in_panic = loads.panic.get(level).copied().unwrap_or(false);
        let level_fraction = f64::from(load) / 100.0;
        for (index, share) in shares_within_level(
            endpoints, &members, &healthy, &eligible, in_panic, &weighting,
        ) {
            shares[index] = level_fraction * share;
        }
    }

    Plan {
        shares,
        eligible,
        priorities,
        loads,
    }
}

/// Istio sets Envoy's panic threshold from `minHealthPercent` when outlier detection is
/// configured. Without it Envoy keeps its default (50%), but there nothing is ever ejected
/// in Istio; in lb an operator may still drain endpoints, and panic would send them traffic,
/// so panic stays off.
fn panic_threshold(service: &Service) -> u32 {
    service
        .policy
        .outlier_detection
        .as_ref()
        .map_or(0, |outlier| outlier.min_health_percent)
}

/// Share of one level's traffic per member endpoint, as Envoy picks inside a level
/// (`ZoneAwareLoadBalancerBase::hostSourceToUse`):
/// - in panic, all hosts of the level, by endpoint weight, without locality weights;
/// - with locality-weighted LB, a locality by its effective weight
///   `weight × min(1, 1.4 × healthy / total)` (`HostSetImpl::effectiveLocalityWeight`),
///   then its healthy hosts by endpoint weight;
/// - otherwise the level's healthy hosts by endpoint weight.
fn shares_within_level(
    endpoints: &[Endpoint],
    members: &[usize],
    healthy: &[bool],
    eligible: &[bool],
    in_panic: bool,
    weighting: &LocalityWeighting,
) -> Vec<(usize, f64)> {
    let eligible_members: Vec<usize> = members
        .iter()
        .copied()
        .filter(|&index| eligible[index])
        .collect();
    if in_panic || *weighting == LocalityWeighting::Off {
        return by_endpoint_weight(endpoints, &eligible_members);
    }

    let mut localities: BTreeMap<&Locality, Vec<usize>> = BTreeMap::new();
    for &index in members {
        localities
            .entry(&endpoints[index].locality)
            .or_default()
            .push(index);
    }
    let opf = load::OVERPROVISIONING_FACTOR as f64 / 100.0;
    let effective: Vec<(&Vec<usize>, f64)> = localities
        .iter()
        .map(|(locality, hosts)| {
            let weight = match weighting {
                LocalityWeighting::Distributed(weights) => {
                    weights.get(*locality).copied().unwrap_or(0)
                }
                _ => hosts
                    .iter()
                    .map(|&index| endpoint_weight(&endpoints[index]))
                    .sum(),
            };
            let healthy_hosts = hosts.iter().filter(|&&index| healthy[index]).count();
            let availability = (opf * healthy_hosts as f64 / hosts.len() as f64).min(1.0);
            (hosts, weight as f64 * availability)
        })
        .collect();
    let total_effective: f64 = effective.iter().map(|(_, weight)| weight).sum();
    if total_effective <= 0.0 {
        // Envoy's locality scheduler has nothing to pick; it falls back to the level's
        // healthy hosts.
        return by_endpoint_weight(endpoints, &eligible_members);
    }

    let mut shares = Vec::with_capacity(members.len());
    for (hosts, locality_weight) in effective {
        if locality_weight <= 0.0 {
            continue;
        }
        let healthy_hosts: Vec<usize> = hosts
            .iter()
            .copied()
            .filter(|&index| healthy[index])
            .collect();
        let locality_share = locality_weight / total_effective;
        shares.extend(
            by_endpoint_weight(endpoints, &healthy_hosts)
                .into_iter()
                .map(|(index, share)| (index, locality_share * share)),
        );
    }
    shares
}

/// Split by endpoint weight among `hosts` (empty when there are none).
fn by_endpoint_weight(endpoints: &[Endpoint], hosts: &[usize]) -> Vec<(usize, f64)> {
    let total: u64 = hosts
        .iter()
        .map(|&index| endpoint_weight(&endpoints[index]))
        .sum();
    if total == 0 {
        return Vec::new();
    }
    hosts
        .iter()
        .map(|&index| {
            (
                index,
                endpoint_weight(&endpoints[index]) as f64 / total as f64,
            )
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        dataplane::{Frontend, Protocol},
        model::{Failover, LocalityLbSetting, OutlierDetection, TrafficPolicy},
    };

    pub(crate) fn node(locality: &str, labels: &[(&str, &str)]) -> Node {
        Node {
            locality: Locality::parse(locality),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    pub(crate) fn labelled_endpoint(locality: &str, labels: &[(&str, &str)]) -> Endpoint {
        Endpoint {
            address: Ipv4Addr::new(10, 0, 0, 1),
            port: 8080,
            locality: Locality::parse(locality),
            labels: std::sync::Arc::new(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            weight: 1,
            hostname: None,
        }
    }

    pub(crate) fn endpoint(locality: &str) -> Endpoint {
        labelled_endpoint(locality, &[])
    }

    pub(crate) fn policy(
        locality_lb: Option<LocalityLbSetting>,
        outlier_detection: bool,
    ) -> TrafficPolicy {
        TrafficPolicy {
            locality_lb,
            outlier_detection: outlier_detection.then(OutlierDetection::default),
            health_check: None,
            tls: None,
        }
    }

    pub(crate) fn with_outlier_detection(setting: LocalityLbSetting) -> TrafficPolicy {
        policy(Some(setting), true)
    }

    pub(crate) fn service(endpoints: Vec<Endpoint>, policy: TrafficPolicy) -> Service {
        Service {
            name: "svc".into(),
            frontend: Frontend {
                vip: Ipv4Addr::new(10, 96, 0, 10),
                port: 80,
                protocol: Protocol::Tcp,
            },
            endpoints: endpoints.into(),
            named: Default::default(),
            policy,
            http: false,
            session_affinity: None,
            source: Default::default(),
        }
    }

    fn assert_shares(got: &[f64], expected: &[f64], what: &str) {
        assert_eq!(got.len(), expected.len(), "{what}");
        for (index, (got, expected)) in got.iter().zip(expected).enumerate() {
            assert!(
                (got - expected).abs() < 1e-9,
                "{what}: endpoint {index}: got {got}, want {expected} (all: {got:?})"
            );
        }
    }

    fn seed_service() -> Service {
        service(
            vec![
                endpoint("region1/zone1"),
                endpoint("region1/zone2"),
                endpoint("region2/zone3"),
                endpoint("region3/zone4"),
            ],
            with_outlier_detection(LocalityLbSetting {
                failover: vec![Failover {
                    from: "region1".into(),
                    to: "region2".into(),
                }],
                ..Default::default()
            }),
        )
    }

    /// The seed: one endpoint per locality, ejected one after another; each ejection takes
    /// its level's health to 0 and moves all traffic one level down.
    #[test]
    fn seed_traffic_moves_locality_by_locality() {
        struct Step {
            healthy: [bool; 4],
            load: [u32; 4],
            shares: [f64; 4],
        }
        let steps = [
            Step {
                healthy: [true, true, true, true],
                load: [100, 0, 0, 0],
                shares: [1.0, 0.0, 0.0, 0.0],
            },
            Step {
                healthy: [false, true, true, true],
                load: [0, 100, 0, 0],
                shares: [0.0, 1.0, 0.0, 0.0],
            },
            Step {
                healthy: [false, false, true, true],
                load: [0, 0, 100, 0],
                shares: [0.0, 0.0, 1.0, 0.0],
            },
            Step {
                healthy: [false, false, false, true],
                load: [0, 0, 0, 100],
                shares: [0.0, 0.0, 0.0, 1.0],
            },
            // Everything ejected, panic off (minHealthPercent 0): nothing may take traffic.
            Step {
                healthy: [false; 4],
                load: [100, 0, 0, 0],
                shares: [0.0; 4],
            },
            // The local endpoint returns: traffic goes straight back.
            Step {
                healthy: [true, false, false, false],
                load: [100, 0, 0, 0],
                shares: [1.0, 0.0, 0.0, 0.0],
            },
        ];
        let client = node("region1/zone1", &[]);
        let service = seed_service();
        for step in &steps {
            let plan = plan(&client, &service, &step.healthy);
            let what = format!("healthy {:?}", step.healthy);
            assert_eq!(
                plan.priorities,
                [Some(0), Some(1), Some(2), Some(3)],
                "{what}"
            );
            assert_eq!(plan.loads.load, step.load, "{what}");
            assert_eq!(plan.loads.panic, [false; 4], "{what}");
            assert_eq!(plan.eligible, step.healthy, "{what}");
            assert_shares(&plan.shares, &step.shares, &what);
        }
    }

    #[test]
    fn locality_weights_inside_a_level() {
        // Client in r1/z1; two zones of r1 share level 0, two endpoints each.
        let client = node("r1/z1", &[]);
        let endpoints = vec![
            endpoint("r1/z2"),
            endpoint("r1/z2"),
            endpoint("r1/z3"),
            endpoint("r1/z3"),
        ];
        let healthy = [false, true, true, true];
        let rules = LocalityLbSetting {
            failover: vec![Failover {
                from: "r1".into(),
                to: "r2".into(),
            }],
            ..Default::default()
        };

        // Failover rules set: locality-weighted LB. r1/z2 weighs 2 × min(1, 1.4 × 1/2) = 1.4,
        // r1/z3 weighs 2.
        let weighted = plan(
            &client,
            &service(endpoints.clone(), with_outlier_detection(rules)),
            &healthy,
        );
        assert_shares(
            &weighted.shares,
            &[0.0, 1.4 / 3.4, 1.0 / 3.4, 1.0 / 3.4],
            "locality weighted",
        );

        // Default locality LB (no rules): Istio leaves locality weighting off, so the three
        // healthy hosts share evenly.
        let default = plan(&client, &service(endpoints, policy(None, true)), &healthy);
        assert_shares(
            &default.shares,
            &[0.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0],
            "default",
        );
    }

    #[test]
    fn endpoint_weights_inside_a_locality() {
        let client = node("r1/z1", &[]);
        let mut heavy = endpoint("r1/z1");
        heavy.weight = 3;
        let mut unset = endpoint("r1/z1");
        unset.weight = 0;
        let service = service(vec![heavy, endpoint("r1/z1"), unset], policy(None, true));
        let plan = plan(&client, &service, &[true, true, true]);
        // An unset (0) weight counts as 1, as Istio sends it.
        assert_shares(&plan.shares, &[0.6, 0.2, 0.2], "weights 3, 1, 0→1");
    }

    #[test]
    fn distribute_plan() {
        let client = node("region1/zone1", &[]);
        let endpoints = vec![
            endpoint("region1/zone1"),
            endpoint("region1/zone2"),
            endpoint("region2/zone3"),
            endpoint("region2/zone4"),
        ];
        let setting = LocalityLbSetting {
            distribute: vec![crate::model::Distribute {
                from: "region1/zone1/*".into(),
                to: [
                    ("region1/zone1/*".to_string(), 70),
                    ("region2/*".to_string(), 30),
                ]
                .into_iter()
                .collect(),
            }],
            ..Default::default()
        };
        // Applied with or without outlier detection.
        for outlier_detection in [false, true] {
            let service = service(
                endpoints.clone(),
                policy(Some(setting.clone()), outlier_detection),
            );
            let all_up = plan(&client, &service, &[true; 4]);
            assert_eq!(all_up.priorities, [Some(0), None, Some(0), Some(0)]);
            assert_eq!(all_up.eligible, [true, false, true, true]);
            assert_shares(&all_up.shares, &[0.7, 0.0, 0.15, 0.15], "distribute");

            // An unhealthy covered locality loses its effective weight; the uncovered one
            // still gets nothing.
            let one_down = plan(&client, &service, &[true, true, false, true]);
            assert_shares(
                &one_down.shares,
                &[70.0 / 85.0, 0.0, 0.0, 15.0 / 85.0],
                "distribute, one down",
            );
        }
    }

    #[test]
    fn without_outlier_detection_there_is_one_level() {
        let client = node("region1/zone1", &[]);
        let mut service = seed_service();
        service.policy.outlier_detection = None;
        let plan = plan(&client, &service, &[false, true, true, true]);
        assert_eq!(plan.priorities, [Some(0); 4]);
        assert_eq!(plan.loads.load, [100]);
        assert_shares(
            &plan.shares,
            &[0.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0],
            "no outlier detection",
        );
    }

    #[test]
    fn disabled_locality_lb_has_one_level() {
        let client = node("region1/zone1", &[]);
        let mut service = seed_service();
        if let Some(setting) = service.policy.locality_lb.as_mut() {
            setting.enabled = Some(false);
        }
        let plan = plan(&client, &service, &[true; 4]);
        assert_eq!(plan.priorities, [Some(0); 4]);
        assert_shares(&plan.shares, &[0.25; 4], "enabled: false");
    }

    #[test]
    fn panic_sends_traffic_to_unhealthy_endpoints() {
        let client = node("r1/z1", &[]);
        let endpoints = vec![
            endpoint("r1/z1"),
            endpoint("r1/z1"),
            endpoint("r1/z2"),
            endpoint("r1/z2"),
        ];
        let mut policy = policy(None, true);
        if let Some(outlier) = policy.outlier_detection.as_mut() {
            outlier.min_health_percent = 60;
        }
        let service = service(endpoints, policy);

        // P0 0% and P1 50% healthy, both under 60%: total panic, split by host count,
        // every host eligible.
        let plan_all = plan(&client, &service, &[false, false, true, false]);
        assert_eq!(plan_all.loads.load, [50, 50]);
        assert_eq!(plan_all.loads.panic, [true, true]);
        assert_eq!(plan_all.eligible, [true; 4]);
        assert_shares(&plan_all.shares, &[0.25; 4], "total panic");

        // P0 fully healthy: total health 100, never panic.
        let plan_healthy = plan(&client, &service, &[true, true, false, false]);
        assert_eq!(plan_healthy.loads.panic, [false, false]);
        assert_eq!(plan_healthy.eligible, [true, true, false, false]);
        assert_shares(&plan_healthy.shares, &[0.5, 0.5, 0.0, 0.0], "healthy P0");
    }

    #[test]
    fn missing_health_entries_count_as_healthy() {
        let client = node("region1/zone1", &[]);
        let plan = plan(&client, &seed_service(), &[]);
        assert_shares(&plan.shares, &[1.0, 0.0, 0.0, 0.0], "no health entries");
        let empty = plan_for_no_endpoints(&client);
        assert_eq!(empty, Plan::default());
    }

    fn plan_for_no_endpoints(client: &Node) -> Plan {
        plan(client, &service(Vec::new(), policy(None, true)), &[])
    }
}
