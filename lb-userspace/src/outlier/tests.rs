use std::time::Duration;

use proptest::prelude::*;

use super::{Change, EjectReason, Event, OperatorAction, OutlierDetector, Totals, UnknownEndpoint};
use crate::model::OutlierDetection;

use EjectReason::{Consecutive5xx, ConsecutiveGatewayFailure, ConsecutiveLocalOriginFailure};
use Event::{ConnectFailure, HttpStatus, Reset, Success, Timeout};

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Istio's defaults with `edit` applied.
fn config(edit: impl FnOnce(&mut OutlierDetection)) -> OutlierDetection {
    let mut config = OutlierDetection::default();
    edit(&mut config);
    config
}

/// Feeds `events` to endpoint 0 of a one-endpoint detector at t = 0; returns the index of the
/// event that ejected it and the reason.
fn first_ejection(config: OutlierDetection, events: &[Event]) -> Option<(usize, EjectReason)> {
    let mut detector = OutlierDetector::new(config, 1, Duration::ZERO);
    events.iter().enumerate().find_map(|(i, &event)| {
        match detector.record(0, event, Duration::ZERO) {
            Some(Change::Ejected { reason, .. }) => Some((i, reason)),
            _ => None,
        }
    })
}

#[test]
fn consecutive_5xx() {
    let e500 = HttpStatus(500);
    let cases: &[(&str, u32, Vec<Event>, Option<usize>)] = &[
        ("ejects at exactly N", 5, vec![e500; 5], Some(4)),
        ("N-1 is not enough", 5, vec![e500; 4], None),
        (
            "success resets",
            3,
            vec![e500, e500, Success, e500, e500],
            None,
        ),
        (
            "4xx resets",
            3,
            vec![e500, e500, HttpStatus(404), e500, e500, e500],
            Some(5),
        ),
        ("2xx resets", 2, vec![e500, HttpStatus(200), e500], None),
        (
            "any 5xx counts",
            3,
            vec![HttpStatus(501), HttpStatus(599), e500],
            Some(2),
        ),
        (
            "600 is not a 5xx",
            2,
            vec![e500, HttpStatus(600), e500],
            None,
        ),
        ("0 disables", 0, vec![e500; 100], None),
        ("1 ejects at once", 1, vec![e500], Some(0)),
    ];
    for (name, threshold, events, expected) in cases {
        let config = config(|c| c.consecutive_5xx_errors = *threshold);
        let got = first_ejection(config, events).map(|(i, reason)| {
            assert_eq!(reason, Consecutive5xx, "{name}");
            i
        });
        assert_eq!(got, *expected, "{name}");
    }
}

#[test]
fn local_origin_and_gateway_errors() {
    struct Case {
        name: &'static str,
        split: bool,
        five_xx: u32,
        gateway: u32,
        local_origin: u32,
        events: Vec<Event>,
        expected: Option<(usize, EjectReason)>,
    }
    let case = |name, split, (five_xx, gateway, local_origin), events, expected| Case {
        name,
        split,
        five_xx,
        gateway,
        local_origin,
        events,
        expected,
    };
    let cases = [
        // Without the split, local-origin failures are the 503/504 Envoy's router returns.
        case(
            "no split: connect failures are 5xx",
            false,
            (3, 0, 5),
            vec![ConnectFailure; 3],
            Some((2, Consecutive5xx)),
        ),
        case(
            "no split: timeouts and resets are 5xx",
            false,
            (3, 0, 5),
            vec![Timeout, Reset, Timeout],
            Some((2, Consecutive5xx)),
        ),
        case(
            "no split: local origin counter unused",
            false,
            (0, 0, 1),
            vec![ConnectFailure; 5],
            None,
        ),
        case(
            "no split: connect failure and timeout are gateway errors",
            false,
            (0, 2, 5),
            vec![ConnectFailure, Timeout],
            Some((1, ConsecutiveGatewayFailure)),
        ),
        case(
            "gateway: 502/503/504 count",
            false,
            (0, 3, 5),
            vec![HttpStatus(502), HttpStatus(503), HttpStatus(504)],
            Some((2, ConsecutiveGatewayFailure)),
        ),
        case(
            "gateway: a 500 resets the gateway counter",
            false,
            (0, 2, 5),
            vec![HttpStatus(502), HttpStatus(500), HttpStatus(503)],
            None,
        ),
        case(
            "gateway: a 500 still counts as 5xx",
            false,
            (3, 2, 5),
            vec![HttpStatus(502), HttpStatus(500), HttpStatus(503)],
            Some((2, Consecutive5xx)),
        ),
        case(
            "gateway is checked before 5xx",
            false,
            (2, 2, 5),
            vec![HttpStatus(503); 2],
            Some((1, ConsecutiveGatewayFailure)),
        ),
        case(
            "gateway: success resets",
            false,
            (0, 2, 5),
            vec![HttpStatus(502), Success, HttpStatus(502)],
            None,
        ),
        // With the split, local-origin failures only feed their own counter.
        case(
            "split: connect failures are local origin",
            true,
            (1, 1, 3),
            vec![ConnectFailure, Timeout, Reset],
            Some((2, ConsecutiveLocalOriginFailure)),
        ),
        case(
            "split: local origin 0 disables",
            true,
            (1, 1, 0),
            vec![ConnectFailure; 10],
            None,
        ),
        case(
            "split: success resets local origin",
            true,
            (5, 0, 2),
            vec![ConnectFailure, Success, ConnectFailure],
            None,
        ),
        case(
            "split: any response resets local origin",
            true,
            (5, 0, 2),
            vec![ConnectFailure, HttpStatus(500), ConnectFailure],
            None,
        ),
        case(
            "split: local failures do not reset 5xx",
            true,
            (2, 0, 5),
            vec![HttpStatus(500), ConnectFailure, HttpStatus(503)],
            Some((2, Consecutive5xx)),
        ),
        case(
            "split: statuses still feed gateway",
            true,
            (0, 2, 5),
            vec![Timeout, HttpStatus(502), Timeout, HttpStatus(504)],
            Some((3, ConsecutiveGatewayFailure)),
        ),
    ];
    for Case {
        name,
        split,
        five_xx,
        gateway,
        local_origin,
        events,
        expected,
    } in cases
    {
        let config = config(|c| {
            c.split_external_local_origin_errors = split;
            c.consecutive_5xx_errors = five_xx;
            c.consecutive_gateway_errors = gateway;
            c.consecutive_local_origin_failures = local_origin;
        });
        assert_eq!(first_ejection(config, &events), expected, "{name}");
    }
}

#[test]
fn totals_count_every_event() {
    let mut detector =
        OutlierDetector::new(config(|c| c.consecutive_5xx_errors = 0), 1, Duration::ZERO);
    for event in [
        ConnectFailure,
        Timeout,
        Reset,
        HttpStatus(503),
        HttpStatus(404),
        Success,
    ] {
        detector.record(0, event, Duration::ZERO);
    }
    let totals = detector.status(0).map(|s| s.totals);
    assert_eq!(
        totals,
        Some(Totals {
            cx_connect_fail: 1,
            rq_error: 4,
            rq_total: 6
        })
    );
}

/// Fails endpoint 0 once (threshold 1) at `now`; returns how long the ejection lasts.
fn eject_for(detector: &mut OutlierDetector, now: Duration) -> Option<Duration> {
    match detector.record(0, HttpStatus(500), now) {
        Some(Change::Ejected {
            endpoint: 0,
            until,
            reason: Consecutive5xx,
        }) => Some(until - now),
        _ => None,
    }
}

/// Sweeps every interval from the next due sweep until endpoint 0 returns; returns when.
fn sweep_until_unejected(detector: &mut OutlierDetector) -> Duration {
    for _ in 0..10_000 {
        let now = detector.next_sweep();
        if detector.sweep(now) == [Change::Unejected { endpoint: 0 }] {
            return now;
        }
    }
    panic!("endpoint 0 never returned");
}

#[test]
fn ejection_time_grows_by_base_and_is_capped() {
    let config = config(|c| {
        c.consecutive_5xx_errors = 1;
        c.interval = secs(10);
        c.base_ejection_time = secs(30);
        c.max_ejection_time = secs(100);
    });
    let mut detector = OutlierDetector::new(config, 1, Duration::ZERO);
    let mut now = secs(1);
    let mut lengths = Vec::new();
    for _ in 0..6 {
        lengths.push(eject_for(&mut detector, now).map(|d| d.as_secs()));
        // Fail again right after returning, before a sweep can decay the multiplier.
        now = sweep_until_unejected(&mut detector) + Duration::from_millis(1);
    }
    let expected = [30, 60, 90, 100, 100, 100].map(Some);
    assert_eq!(lengths, expected);
    // Envoy stops growing the multiplier once base × multiplier passes max + base.
    assert_eq!(detector.status(0).map(|s| s.ejection_multiplier), Some(5));
    assert_eq!(detector.status(0).map(|s| s.ejections_total), Some(6));
}

#[test]
fn unejection_only_at_a_sweep_at_or_after_expiry() {
    // interval 10 s, base 30 s, sweeps due at 10, 20, 30, ... while sweeps keep time.
    let cases: &[(&str, u64, &[u64], Option<u64>)] = &[
        ("expiry on a sweep", 0, &[10, 20, 30], Some(30)),
        (
            "expiry between sweeps waits for the next",
            5,
            &[10, 20, 30, 40],
            Some(40),
        ),
        (
            "calls between due sweeps do nothing",
            5,
            &[10, 20, 30, 35, 36, 39],
            None,
        ),
        (
            "a late sweep still un-ejects",
            5,
            &[10, 20, 30, 55],
            Some(55),
        ),
    ];
    for (name, ejected_at, sweeps, expected) in cases {
        let config = config(|c| {
            c.consecutive_5xx_errors = 1;
            c.interval = secs(10);
            c.base_ejection_time = secs(30);
        });
        let mut detector = OutlierDetector::new(config, 1, Duration::ZERO);
        assert_eq!(
            eject_for(&mut detector, secs(*ejected_at)),
            Some(secs(30)),
            "{name}"
        );
        let mut unejected_at = None;
        for &at in *sweeps {
            if detector.sweep(secs(at)) == [Change::Unejected { endpoint: 0 }] {
                unejected_at = Some(at);
                break;
            }
            assert!(
                detector.is_ejected(0),
                "{name}: still ejected after sweep at {at}"
            );
        }
        assert_eq!(unejected_at, *expected, "{name}");
    }
}

#[test]
fn multiplier_decays_one_per_sweep_in_service() {
    let config = config(|c| {
        c.consecutive_5xx_errors = 1;
        c.interval = secs(10);
        c.base_ejection_time = secs(30);
    });
    let multiplier = |d: &OutlierDetector| d.status(0).map(|s| s.ejection_multiplier);

    // Ejected twice in a row: the second time lasts 2 × base.
    let mut detector = OutlierDetector::new(config.clone(), 1, Duration::ZERO);
    assert_eq!(eject_for(&mut detector, secs(0)), Some(secs(30)));
    let back = sweep_until_unejected(&mut detector);
    assert_eq!(back, secs(30));
    // The un-ejecting sweep does not decay (Envoy checks "not ejected" before un-ejecting).
    assert_eq!(multiplier(&detector), Some(1));
    assert_eq!(eject_for(&mut detector, secs(35)), Some(secs(60)));
    assert_eq!(multiplier(&detector), Some(2));

    // Sweeps while ejected do not decay; each sweep in service takes one off.
    let back = sweep_until_unejected(&mut detector);
    assert_eq!(back, secs(100));
    assert_eq!(multiplier(&detector), Some(2));
    detector.sweep(secs(110));
    assert_eq!(multiplier(&detector), Some(1));
    // Failing now: multiplier 1 → 2, so 60 s.
    let mut soon = detector.clone();
    assert_eq!(eject_for(&mut soon, secs(111)), Some(secs(60)));
    detector.sweep(secs(120));
    assert_eq!(multiplier(&detector), Some(0));
    detector.sweep(secs(130));
    assert_eq!(multiplier(&detector), Some(0), "never below 0");
    // After a long healthy time, the next ejection is base again.
    assert_eq!(eject_for(&mut detector, secs(131)), Some(secs(30)));
}

#[test]
fn max_ejection_percent() {
    // (endpoints, maxEjectionPercent, how many end up ejected when all fail)
    let cases = [
        (4, 10, 1), // the first is always allowed; (1+1)/4 = 50% > 10%
        (4, 100, 4),
        (4, 50, 2), // 2/4 = 50% allowed, 3/4 not
        (3, 33, 1), // 2/3 = 66.7% > 33%
        (3, 66, 1), // exact: 66.7% > 66% (integer division would allow it)
        (3, 67, 2),
        (10, 10, 1),
        (10, 20, 2),
        (1, 10, 1),
        (1, 0, 1), // even 0% allows the first
        (5, 0, 1),
        (4, 250, 4), // capped at 100%
    ];
    for (endpoints, percent, expected) in cases {
        let config = config(|c| {
            c.consecutive_5xx_errors = 1;
            c.max_ejection_percent = percent;
        });
        let mut detector = OutlierDetector::new(config, endpoints, Duration::ZERO);
        for endpoint in 0..endpoints {
            detector.record(endpoint, HttpStatus(500), Duration::ZERO);
        }
        let name = format!("{endpoints} endpoints at {percent}%");
        assert_eq!(detector.ejected_count(), expected, "{name}");
        assert_eq!(
            detector.stats().ejections_enforced_total,
            expected as u64,
            "{name}"
        );
        assert_eq!(
            detector.stats().ejections_overflow,
            (endpoints - expected) as u64,
            "{name}"
        );
    }
}

#[test]
fn refused_ejection_needs_a_fresh_run_of_errors() {
    // Envoy resets a detector's counter after an attempt, even one the limit refused.
    let config = config(|c| c.consecutive_5xx_errors = 2);
    let mut detector = OutlierDetector::new(config, 4, Duration::ZERO);
    let t = Duration::ZERO;
    for _ in 0..2 {
        detector.record(0, HttpStatus(500), t);
        detector.record(1, HttpStatus(500), t);
    }
    assert!(detector.is_ejected(0));
    assert!(!detector.is_ejected(1), "refused at 10% of 4");
    assert_eq!(detector.status(1).map(|s| s.consecutive_5xx), Some(0));
}

#[test]
fn seed_scenario_one_failure_ejects_for_ten_minutes() {
    // consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 10m; maxEjectionTime left at
    // its 300 s default must not shorten it (Envoy's default is max(300 s, base)).
    let config = config(|c| {
        c.consecutive_5xx_errors = 1;
        c.interval = secs(1);
        c.base_ejection_time = secs(600);
    });
    let mut detector = OutlierDetector::new(config, 4, Duration::ZERO);
    let failed_at = Duration::from_millis(500);
    assert_eq!(
        detector.record(0, ConnectFailure, failed_at),
        Some(Change::Ejected {
            endpoint: 0,
            until: secs(600) + failed_at,
            reason: Consecutive5xx
        })
    );
    assert_eq!(detector.healthy(), [false, true, true, true]);
    for second in 1..=600 {
        assert_eq!(
            detector.sweep(secs(second)),
            [],
            "still ejected at {second} s"
        );
    }
    assert_eq!(
        detector.sweep(secs(601)),
        [Change::Unejected { endpoint: 0 }]
    );
    assert_eq!(detector.healthy(), [true; 4]);
    assert_eq!(detector.next_sweep(), secs(602));
}

#[test]
fn operator_eject_and_uneject() {
    let config = config(|c| {
        c.consecutive_5xx_errors = 1;
        c.interval = secs(10);
    });
    let mut detector = OutlierDetector::new(config, 4, Duration::ZERO);
    let t = secs(1);
    assert_eq!(
        detector.operator(0, OperatorAction::Eject, t),
        Ok(Some(Change::OperatorEjected { endpoint: 0 }))
    );
    assert_eq!(
        detector.operator(0, OperatorAction::Eject, t),
        Ok(None),
        "repeat"
    );
    assert_eq!(detector.healthy(), [false, true, true, true]);
    // Not limited by maxEjectionPercent (10% of 4)...
    assert_eq!(
        detector.operator(1, OperatorAction::Eject, t),
        Ok(Some(Change::OperatorEjected { endpoint: 1 }))
    );
    // ...but counts toward it: with endpoints ejected, an outlier ejection is refused.
    assert_eq!(detector.record(2, HttpStatus(500), t), None);
    assert!(!detector.is_ejected(2));
    // Independent of time.
    assert_eq!(detector.sweep(secs(100_000)), []);
    assert!(detector.is_ejected(0));
    // Events on an ejected endpoint count in totals only.
    assert_eq!(detector.record(0, HttpStatus(500), t), None);
    let status = detector.status(0).expect("endpoint 0 exists");
    assert_eq!((status.consecutive_5xx, status.totals.rq_error), (0, 1));
    assert_eq!(status.operator_ejected_since, Some(t));
    assert!(status.is_ejected() && status.outlier_ejection.is_none());

    assert_eq!(
        detector.operator(0, OperatorAction::Uneject, t),
        Ok(Some(Change::Unejected { endpoint: 0 }))
    );
    assert_eq!(
        detector.operator(0, OperatorAction::Uneject, t),
        Ok(None),
        "repeat"
    );
    assert!(!detector.is_ejected(0));
    assert_eq!(
        detector.operator(9, OperatorAction::Eject, t),
        Err(UnknownEndpoint {
            endpoint: 9,
            endpoints: 4
        })
    );
}

#[test]
fn operator_uneject_clears_an_outlier_ejection() {
    let config = config(|c| c.consecutive_5xx_errors = 1);
    let mut detector = OutlierDetector::new(config, 2, Duration::ZERO);
    assert!(eject_for(&mut detector, secs(1)).is_some());
    assert_eq!(
        detector.operator(0, OperatorAction::Uneject, secs(2)),
        Ok(Some(Change::Unejected { endpoint: 0 }))
    );
    assert!(!detector.is_ejected(0));
    // The multiplier stays: failing again soon ejects for longer.
    assert_eq!(eject_for(&mut detector, secs(3)), Some(secs(60)));
}

#[test]
fn outlier_expiry_under_an_operator_ejection_changes_nothing() {
    let config = config(|c| {
        c.consecutive_5xx_errors = 1;
        c.interval = secs(10);
    });
    let mut detector = OutlierDetector::new(config, 2, Duration::ZERO);
    assert!(eject_for(&mut detector, secs(0)).is_some());
    assert_eq!(
        detector.operator(0, OperatorAction::Eject, secs(1)),
        Ok(None),
        "already out"
    );
    assert_eq!(
        detector.sweep(secs(30)),
        [],
        "outlier ejection over, operator's holds"
    );
    let status = detector.status(0).expect("endpoint 0 exists");
    assert!(status.outlier_ejection.is_none() && status.is_ejected());
    assert_eq!(
        detector.operator(0, OperatorAction::Uneject, secs(31)),
        Ok(Some(Change::Unejected { endpoint: 0 }))
    );
}

#[test]
fn drain_keeps_the_endpoint_healthy_but_closed_to_new_connections() {
    let mut detector = OutlierDetector::new(OutlierDetection::default(), 2, Duration::ZERO);
    let t = secs(1);
    assert_eq!(
        detector.operator(1, OperatorAction::Drain, t),
        Ok(Some(Change::Drained { endpoint: 1 }))
    );
    assert_eq!(
        detector.operator(1, OperatorAction::Drain, t),
        Ok(None),
        "repeat"
    );
    assert!(detector.is_draining(1));
    assert_eq!(detector.healthy(), [true, true]);
    assert_eq!(detector.draining(), [false, true]);
    assert!(!detector.accepts_new_connections(1));
    assert!(detector.accepts_new_connections(0));
    assert_eq!(
        detector.operator(1, OperatorAction::Undrain, t),
        Ok(Some(Change::Undrained { endpoint: 1 }))
    );
    assert_eq!(
        detector.operator(1, OperatorAction::Undrain, t),
        Ok(None),
        "repeat"
    );
    assert!(detector.accepts_new_connections(1));
}

#[test]
fn reconfigure_keeps_state_resize_resets_remap_moves() {
    let config = config(|c| c.consecutive_5xx_errors = 3);
    let mut detector = OutlierDetector::new(config.clone(), 3, Duration::ZERO);
    let t = secs(1);
    detector.record(1, HttpStatus(500), t);
    detector.record(1, HttpStatus(500), t);
    detector.record(2, HttpStatus(500), t);

    // A lower threshold applies to the counts already there.
    let lower = OutlierDetection {
        consecutive_5xx_errors: 2,
        interval: secs(5),
        ..config
    };
    detector.reconfigure(lower, t);
    assert_eq!(
        detector.next_sweep(),
        secs(6),
        "shorter interval brings the sweep forward"
    );
    assert!(matches!(
        detector.record(1, HttpStatus(500), t),
        Some(Change::Ejected { endpoint: 1, .. })
    ));

    // New endpoint 0 is old 2, new 1 is new, new 2 is old 1.
    detector.remap(&[Some(2), None, Some(1)]);
    assert_eq!(detector.healthy(), [true, true, false]);
    assert_eq!(detector.status(0).map(|s| s.consecutive_5xx), Some(1));

    detector.resize(3);
    assert_eq!(
        detector.healthy(),
        [true, true, false],
        "same count keeps state"
    );
    detector.resize(4);
    assert_eq!(detector.healthy(), [true; 4]);
    assert_eq!(
        detector.record(7, HttpStatus(500), t),
        None,
        "unknown endpoint ignored"
    );
    assert!(detector.status(7).is_none());
}

#[derive(Clone, Copy, Debug)]
enum Step {
    Record(usize, Event),
    Sweep,
}

fn step() -> impl Strategy<Value = Step> {
    let event = prop_oneof![
        Just(ConnectFailure),
        Just(Timeout),
        Just(Reset),
        Just(Success),
        (200u16..600).prop_map(HttpStatus),
    ];
    prop_oneof![
        4 => (0usize..8, event).prop_map(|(endpoint, event)| Step::Record(endpoint, event)),
        1 => Just(Step::Sweep),
    ]
}

proptest! {
    /// Outlier ejections never exceed maxEjectionPercent, except the first one.
    #[test]
    fn ejections_stay_within_the_limit(
        endpoints in 1usize..8,
        percent in 0u32..=100,
        threshold in 1u32..3,
        split in any::<bool>(),
        steps in proptest::collection::vec((step(), 0u64..20), 0..200),
    ) {
        let config = config(|c| {
            c.consecutive_5xx_errors = threshold;
            c.consecutive_gateway_errors = threshold;
            c.consecutive_local_origin_failures = threshold;
            c.split_external_local_origin_errors = split;
            c.max_ejection_percent = percent;
        });
        let limit = (percent as usize * endpoints / 100).max(1);
        let mut detector = OutlierDetector::new(config, endpoints, Duration::ZERO);
        let mut now = Duration::ZERO;
        for (step, seconds) in steps {
            now += secs(seconds);
            match step {
                Step::Record(endpoint, event) => {
                    detector.record(endpoint % endpoints, event, now);
                }
                Step::Sweep => {
                    detector.sweep(now);
                }
            }
            prop_assert!(detector.ejected_count() <= limit);
            prop_assert_eq!(detector.healthy().iter().filter(|h| !**h).count(), detector.ejected_count());
        }
    }
}
