//! The consecutive-error counters of one endpoint, and how each event feeds them.
//!
//! Mirrors Envoy's `DetectorHostMonitorImpl` (`source/common/upstream/outlier_detection_impl.cc`):
//! `putResultNoLocalExternalSplit` maps local-origin results to the HTTP status Envoy's router
//! would have synthesized, `putResultWithLocalExternalSplit` keeps them apart, and
//! `putHttpResponseCode` runs the 5xx and gateway counters.

use super::{EjectReason, Event};

/// Thresholds that trip an ejection; 0 turns a detector off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Thresholds {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    /// Only consulted with `split_external_local_origin_errors`.
    pub consecutive_local_origin: u32,
    pub split_local_origin: bool,
}

/// Consecutive errors seen since the last success, the last ejection attempt of that kind, or
/// the last un-ejection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct ConsecutiveCounters {
    pub five_xx: u32,
    pub gateway: u32,
    pub local_origin: u32,
}

/// Ejection attempts one event asks for, in the order Envoy posts them: gateway before 5xx
/// (`putHttpResponseCode` checks the gateway counter first).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Tripped {
    pub gateway: bool,
    pub five_xx: bool,
    pub local_origin: bool,
}

impl Tripped {
    /// The tripped detectors, in the order their ejections are attempted.
    pub fn reasons(self) -> impl Iterator<Item = EjectReason> {
        [
            (self.gateway, EjectReason::ConsecutiveGatewayFailure),
            (self.five_xx, EjectReason::Consecutive5xx),
            (
                self.local_origin,
                EjectReason::ConsecutiveLocalOriginFailure,
            ),
        ]
        .into_iter()
        .filter_map(|(tripped, reason)| tripped.then_some(reason))
    }
}

/// The status Envoy's router reports for a locally originated failure when errors are not
/// split (`resultToHttpCode`): connect failure → 503, timeout → 504. A reset is reported like
/// a connect failure (503), as the router does for an upstream reset before a response.
pub(super) fn synthesized_status(event: Event) -> u16 {
    match event {
        Event::ConnectFailure | Event::Reset => 503,
        Event::Timeout => 504,
        Event::HttpStatus(code) => code,
        Event::Success => 200,
    }
}

pub(super) fn is_5xx(code: u16) -> bool {
    (500..600).contains(&code)
}

/// Envoy's `Http::CodeUtility::isGatewayError`.
fn is_gateway_error(code: u16) -> bool {
    (502..=504).contains(&code)
}

/// Increments `counter` and says whether it reached `threshold` (0: detector off).
///
/// Envoy compares with `==`; `>=` is the same while counters are reset after every ejection
/// attempt, and still trips after a config reload lowers the threshold below the count.
fn bump(counter: &mut u32, threshold: u32) -> bool {
    *counter = counter.saturating_add(1);
    threshold != 0 && *counter >= threshold
}

impl ConsecutiveCounters {
    /// Feeds one event; returns the detectors whose threshold it reached.
    pub fn observe(&mut self, event: Event, thresholds: Thresholds) -> Tripped {
        if !thresholds.split_local_origin {
            return self.put_http_status(synthesized_status(event), thresholds);
        }
        match event {
            Event::ConnectFailure | Event::Timeout | Event::Reset => Tripped {
                local_origin: bump(&mut self.local_origin, thresholds.consecutive_local_origin),
                ..Tripped::default()
            },
            // A response (any status) proves the connection was made: Envoy's router reports
            // `LocalOriginConnectSuccess` before the response code.
            Event::HttpStatus(code) => {
                self.local_origin = 0;
                self.put_http_status(code, thresholds)
            }
            // `ExtOriginRequestSuccess`: 200 plus `localOriginNoFailure`.
            Event::Success => {
                self.local_origin = 0;
                self.put_http_status(200, thresholds)
            }
        }
    }

    /// Envoy's `putHttpResponseCode`.
    fn put_http_status(&mut self, code: u16, thresholds: Thresholds) -> Tripped {
        if !is_5xx(code) {
            self.five_xx = 0;
            self.gateway = 0;
            return Tripped::default();
        }
        let gateway = if is_gateway_error(code) {
            bump(&mut self.gateway, thresholds.consecutive_gateway)
        } else {
            self.gateway = 0;
            false
        };
        let five_xx = bump(&mut self.five_xx, thresholds.consecutive_5xx);
        Tripped {
            gateway,
            five_xx,
            local_origin: false,
        }
    }

    /// Envoy resets the counter of a detector after each of its ejection attempts, whether
    /// or not `maxEjectionPercent` let the ejection happen (`onConsecutiveErrorWorker`).
    pub fn reset(&mut self, reason: EjectReason) {
        match reason {
            EjectReason::Consecutive5xx => self.five_xx = 0,
            EjectReason::ConsecutiveGatewayFailure => self.gateway = 0,
            EjectReason::ConsecutiveLocalOriginFailure => self.local_origin = 0,
        }
    }
}
