//! Outlier detection for the endpoints of one service: Envoy's consecutive-error detectors as
//! Istio configures them (`trafficPolicy.outlierDetection`), plus operator actions.
//!
//! Mirrors Envoy's `source/common/upstream/outlier_detection_impl.cc`
//! (<https://www.envoyproxy.io/docs/envoy/latest/intro/arch_overview/upstream/outlier>):
//!
//! - Events ([`Event`]) feed per-endpoint consecutive counters (5xx, gateway, local origin;
//!   see `consecutive.rs`). A counter reaching its threshold asks for an ejection, which
//!   happens at once, subject to [`maxEjectionPercent`](OutlierDetector#ejection-limit).
//! - An ejection lasts `baseEjectionTime × multiplier`, capped at `maxEjectionTime`; the
//!   multiplier grows by one per ejection and shrinks by one per sweep the endpoint spends
//!   in service.
//! - Un-ejection, and the multiplier's decay, happen only in [`OutlierDetector::sweep`], run
//!   every `interval`.
//!
//! Pure logic: no clock, no I/O. Time is a [`Duration`] since any fixed start the caller
//! picks (the agent's start), passed into every call.
//!
//! Success-rate and failure-percentage ejection are not implemented: Istio does not enable them.

mod consecutive;

#[cfg(test)]
mod tests;

use std::{fmt, time::Duration};

use crate::model::OutlierDetection;

use consecutive::{ConsecutiveCounters, Thresholds};

/// What happened on one request or connection to an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The connection could not be established (refused, unreachable, connect timeout).
    ConnectFailure,
    /// The upstream did not answer in time.
    Timeout,
    /// The upstream reset the connection before answering.
    Reset,
    /// An HTTP response with this status.
    HttpStatus(u16),
    /// A request or connection completed without error (for TCP: the connect completed).
    Success,
}

/// What an operator can do to one endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperatorAction {
    /// Take the endpoint out of service until [`OperatorAction::Uneject`], whatever the time.
    /// Counts as ejected for `maxEjectionPercent`, but is never refused by it.
    Eject,
    /// Put the endpoint back now: clears an operator ejection and any outlier ejection.
    Uneject,
    /// Stop sending new connections; established ones stay. The endpoint still counts as
    /// healthy for load computation (like Cilium's `terminating` backends).
    Drain,
    /// Take new connections again.
    Undrain,
}

/// The detector that asked for an ejection (Envoy's `OutlierEjectionType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EjectReason {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    ConsecutiveLocalOriginFailure,
}

impl fmt::Display for EjectReason {
    /// Envoy's names, as its outlier event log prints them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Consecutive5xx => "CONSECUTIVE_5XX",
            Self::ConsecutiveGatewayFailure => "CONSECUTIVE_GATEWAY_FAILURE",
            Self::ConsecutiveLocalOriginFailure => "CONSECUTIVE_LOCAL_ORIGIN_FAILURE",
        })
    }
}

/// A change in which endpoints take new connections: the caller reprograms the data plane.
///
/// Only transitions are reported: ejecting an endpoint that an operator already ejected, or
/// an outlier ejection expiring while an operator ejection holds, reports nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Outlier detection ejected the endpoint; it returns at the first sweep at or after
    /// `until`.
    Ejected {
        endpoint: usize,
        until: Duration,
        reason: EjectReason,
    },
    /// An operator ejected the endpoint, until an operator un-ejects it.
    OperatorEjected { endpoint: usize },
    /// The endpoint is back in the healthy set.
    Unejected { endpoint: usize },
    /// The endpoint takes no new connections, but stays healthy.
    Drained { endpoint: usize },
    /// The endpoint takes new connections again.
    Undrained { endpoint: usize },
}

impl Change {
    pub fn endpoint(&self) -> usize {
        match *self {
            Self::Ejected { endpoint, .. }
            | Self::OperatorEjected { endpoint }
            | Self::Unejected { endpoint }
            | Self::Drained { endpoint }
            | Self::Undrained { endpoint } => endpoint,
        }
    }
}

/// An operator named an endpoint the service does not have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "endpoint {endpoint} does not exist: the service has {endpoints} endpoints (0..{endpoints})"
)]
pub struct UnknownEndpoint {
    pub endpoint: usize,
    pub endpoints: usize,
}

/// Per-endpoint traffic totals, named after Envoy's host stats in `GET /clusters`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Connections that could not be established.
    pub cx_connect_fail: u64,
    /// Events that count as a 5xx: 5xx responses, and connect failures, timeouts and resets
    /// (the 503/504 Envoy's router charges for them), whatever `splitExternalLocalOriginErrors`.
    pub rq_error: u64,
    /// Every event.
    pub rq_total: u64,
}

impl Totals {
    fn count(&mut self, event: Event) {
        self.rq_total += 1;
        if event == Event::ConnectFailure {
            self.cx_connect_fail += 1;
        }
        if consecutive::is_5xx(consecutive::synthesized_status(event)) {
            self.rq_error += 1;
        }
    }
}

/// An outlier ejection in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierEjection {
    pub since: Duration,
    /// The first sweep at or after this time un-ejects.
    pub until: Duration,
    pub reason: EjectReason,
}

/// One endpoint's state, for admin views.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointStatus {
    /// Set while outlier detection holds the endpoint out (Envoy's `/failed_outlier_check`).
    pub outlier_ejection: Option<OutlierEjection>,
    /// Set (to the time of the action) while an operator holds the endpoint out.
    pub operator_ejected_since: Option<Duration>,
    pub draining: bool,
    /// The current ejection-time multiplier (Envoy's `ejectTimeBackoff`).
    pub ejection_multiplier: u32,
    /// Outlier ejections since the detector started (Envoy's `numEjections`).
    pub ejections_total: u64,
    pub consecutive_5xx: u32,
    pub consecutive_gateway_errors: u32,
    pub consecutive_local_origin_failures: u32,
    pub totals: Totals,
}

impl EndpointStatus {
    pub fn is_ejected(&self) -> bool {
        self.outlier_ejection.is_some() || self.operator_ejected_since.is_some()
    }
}

/// Service-wide counters, named after Envoy's `outlier_detection.*` cluster stats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DetectorStats {
    /// Outlier ejections that happened.
    pub ejections_enforced_total: u64,
    /// Ejections refused by `maxEjectionPercent`.
    pub ejections_overflow: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ActiveEjection {
    since: Duration,
    reason: EjectReason,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct EndpointState {
    counters: ConsecutiveCounters,
    outlier: Option<ActiveEjection>,
    operator_ejected_since: Option<Duration>,
    draining: bool,
    multiplier: u32,
    ejections_total: u64,
    totals: Totals,
}

impl EndpointState {
    fn is_ejected(&self) -> bool {
        self.outlier.is_some() || self.operator_ejected_since.is_some()
    }
}

/// Outlier detection state for the endpoints of one service, addressed by index.
///
/// # Ejection limit
///
/// `maxEjectionPercent` bounds how many of the service's endpoints are ejected at once
/// (outlier and operator ejections both count). An outlier ejection is allowed when
///
/// - no endpoint of the service is ejected, or
/// - `(ejected + 1) × 100 ≤ maxEjectionPercent × endpoints` (percent capped at 100).
///
/// The second rule is Envoy's since 1.28 (computed there in floating point; here exactly, in
/// integers). The first differs from it on purpose: with one endpoint per locality and the
/// default 10%, Envoy ≥ 1.28 never ejects (unless `always_eject_one_host`), so locality
/// failover would never happen; older Envoy always allowed the first ejection, and so does
/// `lb`. The limit applies to the whole service, not per priority, as in Envoy.
///
/// # Events while ejected
///
/// Events on an ejected endpoint count in its [`Totals`] but not in its consecutive
/// counters. Envoy keeps counting, but resets every counter at un-ejection, so what it
/// counted while the endpoint was out never matters; not counting gives the same result.
#[derive(Clone, Debug)]
pub struct OutlierDetector {
    config: OutlierDetection,
    endpoints: Vec<EndpointState>,
    next_sweep: Duration,
    stats: DetectorStats,
}

impl OutlierDetector {
    /// A detector for `endpoints` endpoints, all in service; the first sweep is due one
    /// `interval` after `now`.
    pub fn new(config: OutlierDetection, endpoints: usize, now: Duration) -> Self {
        let next_sweep = now.saturating_add(config.interval);
        Self {
            config,
            endpoints: vec![EndpointState::default(); endpoints],
            next_sweep,
            stats: DetectorStats::default(),
        }
    }

    pub fn config(&self) -> &OutlierDetection {
        &self.config
    }

    /// Number of endpoints tracked.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    pub fn stats(&self) -> DetectorStats {
        self.stats
    }

    /// Applies a new configuration, keeping every endpoint's state (counters, ejections,
    /// multipliers). Ejections in force take their length from the new configuration at the
    /// next sweep, as Envoy reads its runtime values there. A shorter `interval` brings the
    /// next sweep forward.
    pub fn reconfigure(&mut self, config: OutlierDetection, now: Duration) {
        self.next_sweep = self.next_sweep.min(now.saturating_add(config.interval));
        self.config = config;
    }

    /// Sets the number of endpoints. Unchanged: every state is kept. Changed: indices may now
    /// name other endpoints, so every endpoint starts afresh, in service; use
    /// [`OutlierDetector::remap`] to carry state over when the caller knows which is which.
    pub fn resize(&mut self, endpoints: usize) {
        if endpoints != self.endpoints.len() {
            self.endpoints = vec![EndpointState::default(); endpoints];
        }
    }

    /// Replaces the endpoint list: new endpoint `i` takes the state of old endpoint
    /// `old_index_of[i]`, or starts afresh when that is `None` (or out of range). Each old
    /// index should appear at most once.
    pub fn remap(&mut self, old_index_of: &[Option<usize>]) {
        let old = std::mem::take(&mut self.endpoints);
        self.endpoints = old_index_of
            .iter()
            .map(|old_index| {
                old_index
                    .and_then(|i| old.get(i))
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
    }

    /// Feeds one event. Returns the ejection it caused, if any. Events for an index the
    /// detector does not have (stale, from before a resize) are ignored.
    pub fn record(&mut self, endpoint: usize, event: Event, now: Duration) -> Option<Change> {
        let thresholds = Thresholds::from_config(&self.config);
        let state = self.endpoints.get_mut(endpoint)?;
        state.totals.count(event);
        if state.is_ejected() {
            return None;
        }
        let tripped = state.counters.observe(event, thresholds);
        for reason in tripped.reasons() {
            // Envoy's `onConsecutiveErrorWorker`: attempt the ejection, then reset that
            // detector's counter whether or not the ejection limit allowed it, so the next
            // attempt needs a fresh run of errors.
            let change = self.try_eject(endpoint, reason, now);
            self.endpoints[endpoint].counters.reset(reason);
            if change.is_some() {
                // Envoy skips the other detectors' attempts on an ejected host.
                return change;
            }
        }
        None
    }

    /// Applies an operator action. Returns the change it made, if any (repeating an action
    /// changes nothing).
    pub fn operator(
        &mut self,
        endpoint: usize,
        action: OperatorAction,
        now: Duration,
    ) -> Result<Option<Change>, UnknownEndpoint> {
        let endpoints = self.endpoints.len();
        let state = self.endpoints.get_mut(endpoint).ok_or(UnknownEndpoint {
            endpoint,
            endpoints,
        })?;
        let was_ejected = state.is_ejected();
        let change = match action {
            OperatorAction::Eject => {
                state.operator_ejected_since.get_or_insert(now);
                (!was_ejected).then_some(Change::OperatorEjected { endpoint })
            }
            OperatorAction::Uneject => {
                state.operator_ejected_since = None;
                if state.outlier.take().is_some() {
                    // As an un-ejection at a sweep does; the multiplier stays, so an endpoint
                    // that fails again soon is ejected for longer.
                    state.counters = ConsecutiveCounters::default();
                }
                was_ejected.then_some(Change::Unejected { endpoint })
            }
            OperatorAction::Drain => {
                let was_draining = std::mem::replace(&mut state.draining, true);
                (!was_draining).then_some(Change::Drained { endpoint })
            }
            OperatorAction::Undrain => {
                let was_draining = std::mem::replace(&mut state.draining, false);
                was_draining.then_some(Change::Undrained { endpoint })
            }
        };
        Ok(change)
    }

    /// Ends an outlier ejection of `endpoint` because an active health check passed (Envoy's
    /// `successful_active_health_check_uneject_host`, on by default); an operator's
    /// ejection stays. Returns the change, if it made one.
    pub fn health_check_passed(&mut self, endpoint: usize) -> Option<Change> {
        let state = self.endpoints.get_mut(endpoint)?;
        state.outlier.take()?;
        state.counters = ConsecutiveCounters::default();
        (!state.is_ejected()).then_some(Change::Unejected { endpoint })
    }

    /// Restores an ejection found in the data plane after a restart, whose cause (outlier
    /// detection or an operator) the data plane does not record: an outlier ejection
    /// from `now` (counting as the endpoint's first), which the sweep ends after
    /// `baseEjectionTime` like any other. Returns whether the endpoint exists.
    pub fn restore_ejection(&mut self, endpoint: usize, now: Duration) -> bool {
        let Some(state) = self.endpoints.get_mut(endpoint) else {
            return false;
        };
        state.outlier = Some(ActiveEjection {
            since: now,
            reason: EjectReason::ConsecutiveLocalOriginFailure,
        });
        state.multiplier = state.multiplier.max(1);
        true
    }

    /// The periodic sweep (Envoy's `onIntervalTimer` / `checkHostForUneject`): un-ejects
    /// endpoints whose ejection has run its length, and decrements by one the multiplier of
    /// every endpoint that was in service since the previous sweep. The next sweep is due one
    /// `interval` after `now`.
    ///
    /// Does nothing before [`OutlierDetector::next_sweep`], so a caller may call it more often
    /// than needed.
    pub fn sweep(&mut self, now: Duration) -> Vec<Change> {
        if now < self.next_sweep {
            return Vec::new();
        }
        self.next_sweep = now.saturating_add(self.config.interval);
        let mut changes = Vec::new();
        for endpoint in 0..self.endpoints.len() {
            let state = &self.endpoints[endpoint];
            match state.outlier {
                // Envoy decrements only for a host not ejected at the start of the sweep, so
                // the sweep that un-ejects leaves the multiplier as it is. An operator-ejected
                // endpoint is not in service either: its multiplier stays.
                None if state.operator_ejected_since.is_none() => {
                    let state = &mut self.endpoints[endpoint];
                    state.multiplier = state.multiplier.saturating_sub(1);
                }
                None => {}
                Some(ejection) => {
                    if now
                        < ejection
                            .since
                            .saturating_add(self.ejection_time(state.multiplier))
                    {
                        continue;
                    }
                    let state = &mut self.endpoints[endpoint];
                    state.outlier = None;
                    // Envoy resets the counters at un-ejection so that a counter left close to
                    // its threshold does not re-eject on very few new errors.
                    state.counters = ConsecutiveCounters::default();
                    if state.operator_ejected_since.is_none() {
                        changes.push(Change::Unejected { endpoint });
                    }
                }
            }
        }
        changes
    }

    /// When the next sweep is due.
    pub fn next_sweep(&self) -> Duration {
        self.next_sweep
    }

    /// Ejected by outlier detection or by an operator. False for an unknown endpoint.
    pub fn is_ejected(&self, endpoint: usize) -> bool {
        self.endpoints
            .get(endpoint)
            .is_some_and(EndpointState::is_ejected)
    }

    /// Drained by an operator. False for an unknown endpoint.
    pub fn is_draining(&self, endpoint: usize) -> bool {
        self.endpoints
            .get(endpoint)
            .is_some_and(|state| state.draining)
    }

    /// Whether new connections may go to the endpoint: neither ejected nor draining.
    pub fn accepts_new_connections(&self, endpoint: usize) -> bool {
        self.endpoints
            .get(endpoint)
            .is_some_and(|state| !state.is_ejected() && !state.draining)
    }

    /// Per endpoint: not ejected. This is the healthy set that the priority load split counts;
    /// draining endpoints are in it (see [`OutlierDetector::draining`]).
    pub fn healthy(&self) -> Vec<bool> {
        self.endpoints
            .iter()
            .map(|state| !state.is_ejected())
            .collect()
    }

    /// Per endpoint: draining (takes no new connections, but counts as healthy).
    pub fn draining(&self) -> Vec<bool> {
        self.endpoints.iter().map(|state| state.draining).collect()
    }

    /// Endpoints currently ejected, by outlier detection or by an operator.
    pub fn ejected_count(&self) -> usize {
        self.endpoints
            .iter()
            .filter(|state| state.is_ejected())
            .count()
    }

    /// One endpoint's state for admin views; `None` for an unknown endpoint.
    pub fn status(&self, endpoint: usize) -> Option<EndpointStatus> {
        let state = self.endpoints.get(endpoint)?;
        Some(EndpointStatus {
            outlier_ejection: state.outlier.map(|ejection| OutlierEjection {
                since: ejection.since,
                until: ejection
                    .since
                    .saturating_add(self.ejection_time(state.multiplier)),
                reason: ejection.reason,
            }),
            operator_ejected_since: state.operator_ejected_since,
            draining: state.draining,
            ejection_multiplier: state.multiplier,
            ejections_total: state.ejections_total,
            consecutive_5xx: state.counters.five_xx,
            consecutive_gateway_errors: state.counters.gateway,
            consecutive_local_origin_failures: state.counters.local_origin,
            totals: state.totals,
        })
    }

    /// `maxEjectionTime`, but never below `baseEjectionTime`: Envoy refuses a smaller one, and
    /// its default is max(300 s, base). This keeps a long `baseEjectionTime` (the seed's 10
    /// minutes) whole when the configuration left the maximum at 300 s.
    fn max_ejection_time(&self) -> Duration {
        self.config
            .max_ejection_time
            .max(self.config.base_ejection_time)
    }

    /// How long an ejection with this multiplier lasts: base × multiplier, capped.
    fn ejection_time(&self, multiplier: u32) -> Duration {
        self.config
            .base_ejection_time
            .saturating_mul(multiplier)
            .min(self.max_ejection_time())
    }

    /// See the [ejection limit](OutlierDetector#ejection-limit).
    fn ejection_allowed(&self) -> bool {
        let ejected = self.ejected_count() as u64;
        let endpoints = self.endpoints.len() as u64;
        let max_percent = u64::from(self.config.max_ejection_percent.min(100));
        ejected == 0 || (ejected + 1) * 100 <= max_percent * endpoints
    }

    /// Envoy's `ejectHost`.
    fn try_eject(&mut self, endpoint: usize, reason: EjectReason, now: Duration) -> Option<Change> {
        if !self.ejection_allowed() {
            self.stats.ejections_overflow += 1;
            return None;
        }
        let base = self.config.base_ejection_time;
        let max = self.max_ejection_time();
        let state = &mut self.endpoints[endpoint];
        state.outlier = Some(ActiveEjection { since: now, reason });
        state.ejections_total += 1;
        // Envoy stops growing the multiplier once base × multiplier passes the cap, so that
        // decay after a long failure streak takes a bounded number of sweeps.
        if base.saturating_mul(state.multiplier) < max.saturating_add(base) {
            state.multiplier += 1;
        }
        let multiplier = state.multiplier;
        self.stats.ejections_enforced_total += 1;
        Some(Change::Ejected {
            endpoint,
            until: now.saturating_add(self.ejection_time(multiplier)),
            reason,
        })
    }
}

impl Thresholds {
    fn from_config(config: &OutlierDetection) -> Self {
        // Exhaustive, so a new configuration field has to be considered here.
        let OutlierDetection {
            consecutive_5xx_errors,
            consecutive_gateway_errors,
            split_external_local_origin_errors,
            consecutive_local_origin_failures,
            interval: _,
            base_ejection_time: _,
            max_ejection_time: _,
            max_ejection_percent: _,
            min_health_percent: _,
        } = *config;
        Self {
            consecutive_5xx: consecutive_5xx_errors,
            consecutive_gateway: consecutive_gateway_errors,
            consecutive_local_origin: consecutive_local_origin_failures,
            split_local_origin: split_external_local_origin_errors,
        }
    }
}
