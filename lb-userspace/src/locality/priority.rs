//! Which priority level each endpoint gets, and how localities are weighted, as Istio
//! programs Envoy for one client locality.
//!
//! Mirrors `ApplyLocalityLoadBalancer`, `applyLocalityFailover` and
//! `applyFailoverPriorityPerLocality` in Istio's
//! `pilot/pkg/networking/core/loadbalancer/loadbalancer.go`, and the gate on
//! `LocalityWeightedLbConfig` in `applyLocalityLoadBalancer`
//! (`pilot/pkg/networking/core/cluster_traffic_policy.go`).

use std::collections::{BTreeMap, BTreeSet};

use super::distribute;
use crate::model::{Endpoint, Failover, Locality, LocalityLbSetting, Node, TrafficPolicy};

/// Node and endpoint label keys whose value Istio derives from the locality
/// (`AugmentLabels`), so `failoverPriority` can name them without anyone setting them.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";
/// The network label, which `failoverPriority` treats apart when it comes first (Istio 1.31).
pub const NETWORK_LABEL: &str = "topology.istio.io/network";

/// Istio keeps locality priorities (0..=4) apart from `failoverPriority` levels by
/// combining them as `label_priority × 5 + locality_priority`.
const LOCALITY_PRIORITIES: u64 = 5;

/// How Envoy weighs the localities of one priority level before picking a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum LocalityWeighting {
    /// `LocalityWeightedLbConfig` is not set: a level's healthy hosts are balanced by
    /// endpoint weight, whatever their locality.
    Off,
    /// Each locality of a level weighs the sum of its endpoints' weights there (Istio's
    /// `LocalityLbEndpoints.load_balancing_weight`).
    EndpointSums,
    /// `distribute`: the weight given to each covered locality.
    Distributed(BTreeMap<Locality, u64>),
}

/// The locality settings applied to a service's endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Assignment {
    /// Priority level per endpoint (0..N-1 without gaps); `None` for no traffic.
    pub priorities: Vec<Option<u32>>,
    pub weighting: LocalityWeighting,
}

/// Per-endpoint priority (compacted to 0..N-1), or None when the endpoint gets no traffic
/// (distribute: a locality not covered by `to`).
pub fn endpoint_priorities(
    node: &Node,
    endpoints: &[Endpoint],
    policy: &TrafficPolicy,
) -> Vec<Option<u32>> {
    assign(node, endpoints, policy).priorities
}

/// Endpoint weight as Envoy sees it: Istio sends 1 for an unset (0) weight, and Envoy
/// requires `load_balancing_weight >= 1`.
pub(crate) fn endpoint_weight(endpoint: &Endpoint) -> u64 {
    u64::from(endpoint.weight.max(1))
}

pub(crate) fn assign(node: &Node, endpoints: &[Endpoint], policy: &TrafficPolicy) -> Assignment {
    let all_in_one_level = |weighting| Assignment {
        priorities: vec![Some(0); endpoints.len()],
        weighting,
    };
    // Without a DestinationRule setting Istio uses the mesh's `localityLbSetting`, which is
    // enabled with no rules by default.
    let mesh_default = LocalityLbSetting::default();
    let setting = match &policy.locality_lb {
        Some(setting) if setting.enabled == Some(false) => {
            return all_in_one_level(LocalityWeighting::Off)
        }
        Some(setting) => setting,
        None => &mesh_default,
    };

    // Istio applies `distribute` whether or not outlier detection is configured: it only
    // sets weights, and no failover is involved.
    if !setting.distribute.is_empty() {
        return distribute::assign(node, endpoints, &setting.distribute);
    }

    // "Failover should only be applied with outlier detection, or traffic will never
    // failover": without it every endpoint stays in one level, unless the setting stands
    // for a Service's `trafficDistribution` (Istio's `Force`).
    if policy.outlier_detection.is_none() && !setting.force {
        return all_in_one_level(LocalityWeighting::Off);
    }

    // Istio sets `LocalityWeightedLbConfig` only when failover rules are given
    // (ENABLE_LOCALITY_WEIGHTED_LB_CONFIG is off by default), so the default locality LB
    // sets priorities but balances each level's hosts without locality weights.
    let weighting = if setting.failover.is_empty() && setting.failover_priority.is_empty() {
        LocalityWeighting::Off
    } else {
        LocalityWeighting::EndpointSums
    };

    let raw: Vec<u64> = if setting.failover_priority.is_empty() {
        endpoints
            .iter()
            .map(|endpoint| {
                locality_priority(&node.locality, &endpoint.locality, &setting.failover)
            })
            .collect()
    } else {
        let by_labels = compact(
            &endpoints
                .iter()
                .map(|endpoint| label_priority(node, endpoint, &setting.failover_priority))
                .collect::<Vec<_>>(),
        );
        if setting.failover.is_empty() {
            by_labels.into_iter().map(u64::from).collect()
        } else {
            by_labels
                .into_iter()
                .zip(endpoints)
                .map(|(by_label, endpoint)| {
                    u64::from(by_label) * LOCALITY_PRIORITIES
                        + locality_priority(&node.locality, &endpoint.locality, &setting.failover)
                })
                .collect()
        }
    };
    Assignment {
        priorities: compact(&raw).into_iter().map(Some).collect(),
        weighting,
    }
}

/// Istio's `LbPriority` plus the `failover` rule (SEMANTICS §1 table): 0 same subzone,
/// 1 same zone, 2 same region, 3 other region (or the rule's `to`), 4 other region when the
/// first rule `from` the client's region points elsewhere.
pub(crate) fn locality_priority(
    client: &Locality,
    endpoint: &Locality,
    failover: &[Failover],
) -> u64 {
    if client.region == endpoint.region {
        return match (
            client.zone == endpoint.zone,
            client.subzone == endpoint.subzone,
        ) {
            (true, true) => 0,
            (true, false) => 1,
            (false, _) => 2,
        };
    }
    match failover.iter().find(|rule| rule.from == client.region) {
        Some(rule) if rule.to != endpoint.region => 4,
        _ => 3,
    }
}

/// `failoverPriority`: with N labels, `N - j` where `j` counts the leading labels that
/// match. A `key` label matches when client and endpoint carry the same value (both
/// missing counts as the same, as in Istio); `key=value` matches when the endpoint has
/// that value.
///
/// Istio skips `failoverPriority` for a proxy with no labels at all; its proxies always
/// carry the topology labels, so lb does not copy that corner and reads absent labels as
/// empty values instead.
pub(crate) fn label_priority(
    node: &Node,
    endpoint: &Endpoint,
    failover_priority: &[String],
) -> u64 {
    let label_count = failover_priority.len() as u64;
    let matches = |label: &String| {
        let (key, client_override) = split_priority_label(label);
        let client_value =
            client_override.unwrap_or_else(|| label_value(&node.labels, &node.locality, key));
        client_value == label_value(&endpoint.labels, &endpoint.locality, key)
    };
    // Istio 1.31 (istio/istio#60829): "network locality is preferred but not required". When
    // the first label is the network and it differs, the comparison goes on with the later
    // labels (the network counted as passed) and the endpoint lands `N` levels further back,
    // behind every endpoint of the client's network.
    if let Some((first, rest)) = failover_priority.split_first() {
        if split_priority_label(first).0 == NETWORK_LABEL && !matches(first) {
            let leading_matches = 1 + rest.iter().take_while(|l| matches(l)).count() as u64;
            return label_count + (label_count - leading_matches);
        }
    }
    let leading_matches = failover_priority.iter().take_while(|l| matches(l)).count() as u64;
    label_count - leading_matches
}

/// `key` or `key=value`. Like Istio (`strings.Split` on `=`, override only for exactly two
/// parts), `a=b=c` is the key `a` with no override.
fn split_priority_label(label: &str) -> (&str, Option<&str>) {
    match label.split_once('=') {
        Some((key, value)) if !value.contains('=') => (key, Some(value)),
        Some((key, _)) => (key, None),
        None => (label, None),
    }
}

/// A label's value, falling back to the locality for the topology labels Istio adds to
/// every proxy and endpoint; a missing label reads as empty.
fn label_value<'a>(
    labels: &'a BTreeMap<String, String>,
    locality: &'a Locality,
    key: &str,
) -> &'a str {
    if let Some(value) = labels.get(key) {
        return value;
    }
    match key {
        REGION_LABEL => &locality.region,
        ZONE_LABEL => &locality.zone,
        SUBZONE_LABEL => &locality.subzone,
        _ => "",
    }
}

/// Renumbers the distinct raw priorities to 0..N-1 in order, so no level is empty
/// ("Priorities should range from 0 (highest) to N (lowest) without skipping").
fn compact(raw: &[u64]) -> Vec<u32> {
    let distinct: BTreeSet<u64> = raw.iter().copied().collect();
    let rank: BTreeMap<u64, u32> = distinct.into_iter().zip(0u32..).collect();
    raw.iter()
        .map(|priority| rank.get(priority).copied().unwrap_or(0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::locality::tests::{
        endpoint, labelled_endpoint, node, policy, with_outlier_detection,
    };

    fn failover(from: &str, to: &str) -> Failover {
        Failover {
            from: from.into(),
            to: to.into(),
        }
    }

    fn strings(labels: &[&str]) -> Vec<String> {
        labels.iter().map(|label| label.to_string()).collect()
    }

    /// The seed: client in region1/zone1; failover region1 → region2.
    #[test]
    fn seed_priority_table() {
        let client = node("region1/zone1", &[]);
        let endpoints = [
            endpoint("region1/zone1"),
            endpoint("region1/zone2"),
            endpoint("region2/zone3"),
            endpoint("region3/zone4"),
        ];
        let rules = [failover("region1", "region2")];
        let raw: Vec<u64> = endpoints
            .iter()
            .map(|e| locality_priority(&client.locality, &e.locality, &rules))
            .collect();
        assert_eq!(raw, [0, 2, 3, 4]);

        let policy = with_outlier_detection(LocalityLbSetting {
            failover: rules.to_vec(),
            ..Default::default()
        });
        assert_eq!(
            endpoint_priorities(&client, &endpoints, &policy),
            [Some(0), Some(1), Some(2), Some(3)]
        );
    }

    #[test]
    fn locality_priority_table() {
        struct Case {
            client: &'static str,
            endpoint: &'static str,
            rules: &'static [(&'static str, &'static str)],
            priority: u64,
        }
        let cases = [
            Case {
                client: "r1/z1/s1",
                endpoint: "r1/z1/s1",
                rules: &[],
                priority: 0,
            },
            Case {
                client: "r1/z1/s1",
                endpoint: "r1/z1/s2",
                rules: &[],
                priority: 1,
            },
            Case {
                client: "r1/z1/s1",
                endpoint: "r1/z2/s1",
                rules: &[],
                priority: 2,
            },
            Case {
                client: "r1/z1/s1",
                endpoint: "r2/z1/s1",
                rules: &[],
                priority: 3,
            },
            Case {
                client: "r1/z1",
                endpoint: "r2/z1",
                rules: &[("r1", "r2")],
                priority: 3,
            },
            Case {
                client: "r1/z1",
                endpoint: "r3/z1",
                rules: &[("r1", "r2")],
                priority: 4,
            },
            // A rule from another region does not apply to this client.
            Case {
                client: "r1/z1",
                endpoint: "r3/z1",
                rules: &[("r2", "r1")],
                priority: 3,
            },
            // Only the first rule from the client's region counts.
            Case {
                client: "r1/z1",
                endpoint: "r3/z1",
                rules: &[("r1", "r2"), ("r1", "r3")],
                priority: 4,
            },
        ];
        for case in &cases {
            let rules: Vec<Failover> = case
                .rules
                .iter()
                .map(|(from, to)| failover(from, to))
                .collect();
            let got = locality_priority(
                &Locality::parse(case.client),
                &Locality::parse(case.endpoint),
                &rules,
            );
            assert_eq!(got, case.priority, "{} → {}", case.client, case.endpoint);
        }
    }

    #[test]
    fn failover_priority_key_form_is_n_minus_leading_matches() {
        let client = node("r1/z1", &[("network", "n1"), ("version", "v1")]);
        let endpoints = [
            labelled_endpoint("r1/z1", &[("network", "n1"), ("version", "v1")]),
            labelled_endpoint("r1/z1", &[("network", "n1"), ("version", "v2")]),
            // The first label decides: no leading match, whatever follows.
            labelled_endpoint("r1/z1", &[("network", "n2"), ("version", "v1")]),
            labelled_endpoint("r1/z1", &[("version", "v1")]),
        ];
        let labels = strings(&["network", "version"]);
        let raw: Vec<u64> = endpoints
            .iter()
            .map(|e| label_priority(&client, e, &labels))
            .collect();
        assert_eq!(raw, [0, 1, 2, 2]);

        let policy = with_outlier_detection(LocalityLbSetting {
            failover_priority: labels,
            ..Default::default()
        });
        assert_eq!(
            endpoint_priorities(&client, &endpoints, &policy),
            [Some(0), Some(1), Some(2), Some(2)]
        );
    }

    /// Istio 1.31's network rule (`TestApplyLocalitySetting`, "FailoverPriority/not match
    /// the first n label"): another network is preferred less, not cut off at the first
    /// label; within it, the later labels still order the endpoints.
    #[test]
    fn failover_priority_network_first_is_preferred_not_required() {
        let network = NETWORK_LABEL;
        let client = node("r1/z1", &[(network, "n1")]);
        let endpoints = [
            labelled_endpoint("r1/z1", &[(network, "n1")]),
            labelled_endpoint("r1/z2", &[(network, "n1")]),
            labelled_endpoint("r2/z3", &[(network, "n1")]),
            labelled_endpoint("r1/z1", &[(network, "n2")]),
            labelled_endpoint("r1/z2", &[(network, "n2")]),
            labelled_endpoint("r2/z3", &[(network, "n2")]),
        ];
        let labels = strings(&[network, REGION_LABEL, ZONE_LABEL]);
        let raw: Vec<u64> = endpoints
            .iter()
            .map(|e| label_priority(&client, e, &labels))
            .collect();
        assert_eq!(raw, [0, 1, 2, 3, 4, 5]);
        // Without the network first, the plain rule: the first mismatch ends the match.
        let labels = strings(&[REGION_LABEL, network, ZONE_LABEL]);
        let raw: Vec<u64> = endpoints
            .iter()
            .map(|e| label_priority(&client, e, &labels))
            .collect();
        assert_eq!(raw, [0, 1, 3, 2, 2, 3]);
    }

    #[test]
    fn failover_priority_key_value_form_ignores_the_client() {
        // The client runs v1 but prefers v2 endpoints.
        let client = node("r1/z1", &[("version", "v1")]);
        let endpoints = [
            labelled_endpoint("r1/z1", &[("version", "v1")]),
            labelled_endpoint("r1/z1", &[("version", "v2")]),
            labelled_endpoint("r1/z1", &[]),
        ];
        let labels = strings(&["version=v2"]);
        let raw: Vec<u64> = endpoints
            .iter()
            .map(|e| label_priority(&client, e, &labels))
            .collect();
        assert_eq!(raw, [1, 0, 1]);
        // Mixed forms, and `key=` (matches endpoints without the label).
        let labels = strings(&["version=", "network"]);
        let raw: Vec<u64> = endpoints
            .iter()
            .map(|e| label_priority(&client, e, &labels))
            .collect();
        assert_eq!(raw, [2, 2, 0]);
    }

    #[test]
    fn failover_priority_reads_topology_labels_from_localities() {
        let client = node("r1/z1/s1", &[]);
        let endpoints = [
            endpoint("r1/z1/s1"),
            endpoint("r1/z1/s2"),
            endpoint("r1/z2/s1"),
            // Zone name reused in another region: the region label already differs.
            endpoint("r2/z1/s1"),
            // An explicit label wins over the locality.
            labelled_endpoint("r9/z9/s9", &[(REGION_LABEL, "r1"), (ZONE_LABEL, "z1")]),
        ];
        let labels = strings(&[REGION_LABEL, ZONE_LABEL, SUBZONE_LABEL]);
        let raw: Vec<u64> = endpoints
            .iter()
            .map(|e| label_priority(&client, e, &labels))
            .collect();
        assert_eq!(raw, [0, 1, 2, 3, 1]);
    }

    #[test]
    fn failover_and_failover_priority_combine() {
        let client = node("region1/zone1", &[("version", "v1")]);
        let endpoints = [
            labelled_endpoint("region1/zone1", &[("version", "v1")]),
            labelled_endpoint("region2/zone3", &[("version", "v1")]),
            labelled_endpoint("region3/zone4", &[("version", "v1")]),
            labelled_endpoint("region1/zone1", &[("version", "v2")]),
            labelled_endpoint("region2/zone3", &[("version", "v2")]),
        ];
        let policy = with_outlier_detection(LocalityLbSetting {
            failover: vec![failover("region1", "region2")],
            failover_priority: strings(&["version"]),
            ..Default::default()
        });
        // Raw: 0×5+0, 0×5+3, 0×5+4, 1×5+0, 1×5+3 = 0, 3, 4, 5, 8.
        assert_eq!(
            endpoint_priorities(&client, &endpoints, &policy),
            [Some(0), Some(1), Some(2), Some(3), Some(4)]
        );
    }

    #[test]
    fn gates() {
        let client = node("region1/zone1", &[]);
        let endpoints = [
            endpoint("region1/zone1"),
            endpoint("region1/zone2"),
            endpoint("region2/zone3"),
        ];
        let rules = LocalityLbSetting {
            failover: vec![failover("region1", "region2")],
            ..Default::default()
        };
        let one_level = vec![Some(0); 3];

        // No outlier detection: Istio never fails over.
        assert_eq!(
            endpoint_priorities(&client, &endpoints, &policy(Some(rules.clone()), false)),
            one_level
        );
        assert_eq!(
            endpoint_priorities(&client, &endpoints, &policy(None, false)),
            one_level
        );

        // enabled: false turns everything off, outlier detection or not.
        let disabled = LocalityLbSetting {
            enabled: Some(false),
            ..rules.clone()
        };
        let assignment = assign(&client, &endpoints, &policy(Some(disabled), true));
        assert_eq!(assignment.priorities, one_level);
        assert_eq!(assignment.weighting, LocalityWeighting::Off);

        // No setting but outlier detection: the mesh default locality LB, no locality weights.
        let assignment = assign(&client, &endpoints, &policy(None, true));
        assert_eq!(assignment.priorities, [Some(0), Some(1), Some(2)]);
        assert_eq!(assignment.weighting, LocalityWeighting::Off);

        // enabled: true with no rules is the same as the default.
        let enabled = LocalityLbSetting {
            enabled: Some(true),
            ..Default::default()
        };
        assert_eq!(
            assign(&client, &endpoints, &policy(Some(enabled), true)).priorities,
            [Some(0), Some(1), Some(2)]
        );

        // Failover rules turn on Envoy's locality-weighted LB.
        let assignment = assign(&client, &endpoints, &policy(Some(rules), true));
        assert_eq!(assignment.priorities, [Some(0), Some(1), Some(2)]);
        assert_eq!(assignment.weighting, LocalityWeighting::EndpointSums);
    }

    #[test]
    fn compaction_keeps_order_and_removes_gaps() {
        assert_eq!(compact(&[9, 3, 3, 0, 27]), [2, 1, 1, 0, 3]);
        assert_eq!(compact(&[]), Vec::<u32>::new());
    }
}
