//! `localityLbSetting.distribute`: explicit locality weights for clients in a locality.
//!
//! Mirrors `applyLocalityWeights` in Istio's
//! `pilot/pkg/networking/core/loadbalancer/loadbalancer.go` and `LocalityMatch` in
//! `pilot/pkg/networking/util/util.go`.

use std::collections::BTreeMap;

use super::priority::{endpoint_weight, Assignment, LocalityWeighting};
use crate::model::{Distribute, Endpoint, Locality, Node};

/// Istio's `LocalityMatch`: a pattern `region/zone/subzone` where `*` matches any value and
/// a missing (or empty) zone or subzone matches any too, so `region1`, `region1/*` and
/// `region1/*/*` are the same pattern.
pub fn locality_matches(locality: &Locality, pattern: &str) -> bool {
    let rule = Locality::parse(pattern);
    let part_matches = |rule: &str, actual: &str, empty_is_wildcard: bool| {
        rule == "*" || (empty_is_wildcard && rule.is_empty()) || rule == actual
    };
    part_matches(&rule.region, &locality.region, false)
        && part_matches(&rule.zone, &locality.zone, true)
        && part_matches(&rule.subzone, &locality.subzone, true)
}

/// How many parts of a pattern name a value rather than a wildcard.
fn specificity(pattern: &str) -> usize {
    let rule = Locality::parse(pattern);
    [rule.region, rule.zone, rule.subzone]
        .iter()
        .filter(|part| !part.is_empty() && part.as_str() != "*")
        .count()
}

/// Applies the first rule whose `from` matches the client: every endpoint in one level,
/// localities weighted as the rule says, uncovered localities without traffic.
pub(crate) fn assign(node: &Node, endpoints: &[Endpoint], rules: &[Distribute]) -> Assignment {
    let Some(rule) = rules
        .iter()
        .find(|rule| locality_matches(&node.locality, &rule.from))
    else {
        // Istio leaves the endpoints as they are when no `from` matches the client, but
        // still turns on locality-weighted LB because `distribute` is set.
        return Assignment {
            priorities: vec![Some(0); endpoints.len()],
            weighting: LocalityWeighting::EndpointSums,
        };
    };

    // A locality's own weight: the sum of its endpoints' weights.
    let mut own_weight: BTreeMap<&Locality, u64> = BTreeMap::new();
    for endpoint in endpoints {
        *own_weight.entry(&endpoint.locality).or_default() += endpoint_weight(endpoint);
    }

    // Istio walks `to` in Go map order, which is random, so a locality matched by two
    // patterns lands under either. lb is deterministic: the most specific pattern claims a
    // locality first (ties in pattern order).
    let mut patterns: Vec<(&String, u32)> = rule
        .to
        .iter()
        .map(|(pattern, &weight)| (pattern, weight))
        .collect();
    patterns.sort_by_key(|(pattern, _)| std::cmp::Reverse(specificity(pattern)));

    let mut unclaimed: Vec<&Locality> = own_weight.keys().copied().collect();
    let mut weights: BTreeMap<Locality, u64> = BTreeMap::new();
    for (pattern, pattern_weight) in patterns {
        let (claimed, rest): (Vec<&Locality>, Vec<&Locality>) = unclaimed
            .into_iter()
            .partition(|locality| locality_matches(locality, pattern));
        unclaimed = rest;
        // Deliberate difference: Istio keeps a locality's own weight when its pattern's
        // weight is 0; lb reads 0 as "no traffic", which is what such a rule asks for.
        if pattern_weight == 0 {
            continue;
        }
        // A wildcard covering several localities shares its weight among them in proportion
        // to their own weights, rounded up as Istio does (`math.Ceil`).
        let claimed_total: u64 = claimed
            .iter()
            .map(|locality| own_weight.get(locality).copied().unwrap_or(0))
            .sum();
        for locality in claimed {
            let own = own_weight.get(locality).copied().unwrap_or(0);
            // In u128 so large endpoint weights cannot overflow; the quotient is at most
            // `pattern_weight`, so it fits back in u64.
            let weight = (u128::from(own) * u128::from(pattern_weight))
                .div_ceil(u128::from(claimed_total.max(1)));
            weights.insert(locality.clone(), weight as u64);
        }
    }

    let priorities = endpoints
        .iter()
        .map(|endpoint| weights.contains_key(&endpoint.locality).then_some(0))
        .collect();
    Assignment {
        priorities,
        weighting: LocalityWeighting::Distributed(weights),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::locality::tests::{endpoint, node};

    fn rule(from: &str, to: &[(&str, u32)]) -> Distribute {
        Distribute {
            from: from.into(),
            to: to
                .iter()
                .map(|(pattern, weight)| (pattern.to_string(), *weight))
                .collect(),
        }
    }

    #[test]
    fn pattern_matching() {
        let cases = [
            ("r1/z1/s1", "r1/z1/s1", true),
            ("r1/z1/s1", "r1/z1/*", true),
            ("r1/z1/s1", "r1/*", true),
            ("r1/z1/s1", "r1", true),
            ("r1/z1/s1", "*", true),
            ("r1/z1/s1", "r1/*/s1", true),
            ("r1/z1/s1", "r1/z2/*", false),
            ("r1/z1/s1", "r2/*", false),
            ("r1/z1/s1", "r1/z1/s2", false),
            // An empty region in the pattern matches only an empty region.
            ("r1/z1/s1", "", false),
            ("//", "", true),
        ];
        for (locality, pattern, expected) in cases {
            assert_eq!(
                locality_matches(&Locality::parse(locality), pattern),
                expected,
                "{locality} ~ {pattern}"
            );
        }
    }

    #[test]
    fn first_matching_from_wins_and_uncovered_localities_get_nothing() {
        let client = node("region1/zone1", &[]);
        let endpoints = [
            endpoint("region1/zone1"),
            endpoint("region1/zone2"),
            endpoint("region2/zone3"),
            endpoint("region2/zone4"),
            endpoint("region3/zone5"),
        ];
        let rules = [
            rule("region2/*", &[("region2/*", 100)]),
            rule(
                "region1/zone1/*",
                &[("region1/zone1/*", 70), ("region2/*", 30)],
            ),
            rule("region1/*", &[("region1/*", 100)]),
        ];
        let assignment = assign(&client, &endpoints, &rules);
        assert_eq!(
            assignment.priorities,
            [Some(0), None, Some(0), Some(0), None]
        );
        // region2/* covers two localities of weight 1: 30 × 1 / 2 = 15 each.
        let expected: BTreeMap<Locality, u64> = [
            (Locality::parse("region1/zone1"), 70),
            (Locality::parse("region2/zone3"), 15),
            (Locality::parse("region2/zone4"), 15),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            assignment.weighting,
            LocalityWeighting::Distributed(expected)
        );
    }

    #[test]
    fn wildcard_share_follows_own_weights_rounded_up() {
        let client = node("r1/z1", &[]);
        let mut heavy = endpoint("r2/z1");
        heavy.weight = 2;
        let endpoints = [endpoint("r1/z1"), heavy, endpoint("r2/z2")];
        let assignment = assign(
            &client,
            &endpoints,
            &[rule("r1", &[("r1/z1", 90), ("r2", 10)])],
        );
        // r2/z1: ceil(2 × 10 / 3) = 7; r2/z2: ceil(1 × 10 / 3) = 4.
        let expected: BTreeMap<Locality, u64> = [
            (Locality::parse("r1/z1"), 90),
            (Locality::parse("r2/z1"), 7),
            (Locality::parse("r2/z2"), 4),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            assignment.weighting,
            LocalityWeighting::Distributed(expected)
        );
    }

    #[test]
    fn the_most_specific_pattern_claims_a_locality() {
        let client = node("r1/z1", &[]);
        let endpoints = [endpoint("r1/z1"), endpoint("r1/z2")];
        // r1/z1 is excluded by its own zero-weight pattern even though r1/* covers it.
        let assignment = assign(
            &client,
            &endpoints,
            &[rule("*", &[("r1/*", 100), ("r1/z1", 0)])],
        );
        assert_eq!(assignment.priorities, [None, Some(0)]);
    }

    #[test]
    fn no_matching_from_leaves_endpoints_alone() {
        let client = node("r9/z9", &[]);
        let endpoints = [endpoint("r1/z1"), endpoint("r2/z2")];
        let assignment = assign(&client, &endpoints, &[rule("r1/*", &[("r1/*", 100)])]);
        assert_eq!(assignment.priorities, [Some(0), Some(0)]);
        assert_eq!(assignment.weighting, LocalityWeighting::EndpointSums);
    }
}
