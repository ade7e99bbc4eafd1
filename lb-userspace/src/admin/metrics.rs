//! `GET /metrics`: Prometheus (OpenMetrics text) exposition, with the Prometheus project's
//! `prometheus-client` crate.
//!
//! Built at each scrape from a [`Snapshot`]: the agent's state and the data plane's per-CPU
//! counters, nothing kept twice. Only what the agent must accumulate itself lives here
//! between scrapes ([`AgentMetrics`]): latency histograms and failover event counts.
//!
//! Every name starts with `lb_`. Labels: `service` (the ServiceEntry host or configured
//! name), `frontend` (`VIP:PORT/PROTO`), `endpoint` (`IP:PORT`), `locality`
//! (`region/zone/subzone`), `priority` (from this node; `none` when `distribute` gives the
//! endpoint no traffic).

use std::{collections::BTreeMap, net::SocketAddrV4, sync::atomic::AtomicU64};

use lb_common::TrafficStats;
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use super::snapshot::{unix_seconds, EndpointSnapshot, ServiceSnapshot, Snapshot};
use crate::{
    config::Config,
    dataplane::{AttachMode, Frontend},
    interfaces::mode_name,
    model::Service,
    outlier::Change,
};

/// What the agent accumulates for `/metrics` between scrapes.
#[derive(Clone, Debug)]
pub struct AgentMetrics {
    /// From a health decision (outlier ejection or return, operator action) to its tables
    /// being live in the kernel.
    pub table_publish: Histogram,
    /// From the kernel seeing a failure to the table that avoids the backend being live.
    pub failover_reaction: Histogram,
    /// kube-proxy's `network_programming_duration_seconds`: from a change in the cluster
    /// (an EndpointSlice's `endpoints.kubernetes.io/last-change-trigger-time`) to the
    /// tables that carry it being live.
    pub network_programming: Histogram,
    /// From the agent receiving a change from the cluster (a watch event) to the tables
    /// that carry it being live: the agent's own part of `network_programming`.
    pub cluster_change_apply: Histogram,
    /// Per-endpoint series are rendered while there are at most this many endpoints.
    pub endpoint_series_limit: usize,
    /// Health changes per service frontend and endpoint.
    events: BTreeMap<(Frontend, SocketAddrV4), EventCounts>,
}

/// Health changes of one endpoint in one service.
#[derive(Clone, Copy, Debug, Default)]
struct EventCounts {
    outlier_ejected: u64,
    operator_ejected: u64,
    unejected: u64,
    drained: u64,
    undrained: u64,
}

impl EventCounts {
    fn by_name(&self) -> [(&'static str, u64); 5] {
        [
            ("outlier_ejected", self.outlier_ejected),
            ("operator_ejected", self.operator_ejected),
            ("unejected", self.unejected),
            ("drained", self.drained),
            ("undrained", self.undrained),
        ]
    }
}

/// Per-endpoint series of `GET /metrics` while the agent balances at most this many
/// endpoints: about 150,000 series, as much as one target should give a Prometheus.
pub const DEFAULT_ENDPOINT_SERIES_LIMIT: usize = 10_000;

/// 25 µs to about 0.8 s, doubling.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(25e-6, 2.0, 16)
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self {
            table_publish: Histogram::new(latency_buckets()),
            failover_reaction: Histogram::new(latency_buckets()),
            // 1 ms to about 65 s, doubling: the trigger time is set by a controller
            // elsewhere, so this includes the API server and the watch.
            network_programming: Histogram::new(exponential_buckets(1e-3, 2.0, 17)),
            cluster_change_apply: Histogram::new(latency_buckets()),
            endpoint_series_limit: DEFAULT_ENDPOINT_SERIES_LIMIT,
            events: BTreeMap::new(),
        }
    }
}

impl AgentMetrics {
    /// Counts a health change of `svc`'s endpoint.
    pub fn count_change(&mut self, svc: &Service, change: &Change) {
        let Some(e) = svc.endpoints.get(change.endpoint()) else {
            return;
        };
        let counts = self
            .events
            .entry((svc.frontend, SocketAddrV4::new(e.address, e.port)))
            .or_default();
        let count = match change {
            Change::Ejected { .. } => &mut counts.outlier_ejected,
            Change::OperatorEjected { .. } => &mut counts.operator_ejected,
            Change::Unejected { .. } => &mut counts.unejected,
            Change::Drained { .. } => &mut counts.drained,
            Change::Undrained { .. } => &mut counts.undrained,
        };
        *count += 1;
    }

    /// Forgets the counts of endpoints `config` no longer has.
    pub fn forget_removed(&mut self, config: &Config) {
        if self.events.is_empty() {
            return;
        }
        let live: std::collections::HashSet<(Frontend, SocketAddrV4)> = config
            .services
            .iter()
            .flat_map(|s| {
                s.endpoints
                    .iter()
                    .map(|e| (s.frontend, SocketAddrV4::new(e.address, e.port)))
            })
            .collect();
        self.events.retain(|key, _| live.contains(key));
    }

    /// Forgets the counts of `frontend`'s endpoints that `live` says are gone.
    pub fn forget_endpoints_of(
        &mut self,
        frontend: Frontend,
        live: impl Fn(&SocketAddrV4) -> bool,
    ) {
        self.events
            .retain(|(f, endpoint), _| *f != frontend || live(endpoint));
    }

    fn events(&self, frontend: Frontend, endpoint: SocketAddrV4) -> EventCounts {
        self.events
            .get(&(frontend, endpoint))
            .copied()
            .unwrap_or_default()
    }
}

type Labels = Vec<(&'static str, String)>;
type Counters = Family<Labels, Counter>;
type Gauges = Family<Labels, Gauge>;
type FloatGauges = Family<Labels, Gauge<f64, AtomicU64>>;

/// The families of one kind of traffic counter (`TrafficStats`), for services or backends.
struct Traffic {
    packets: Counters,
    bytes: Counters,
    new_connections: Counters,
    handshakes: Counters,
    http_ok: Counters,
    http_5xx: Counters,
}

impl Traffic {
    fn new() -> Self {
        Self {
            packets: Counters::default(),
            bytes: Counters::default(),
            new_connections: Counters::default(),
            handshakes: Counters::default(),
            http_ok: Counters::default(),
            http_5xx: Counters::default(),
        }
    }

    fn add(&self, labels: &Labels, s: &TrafficStats) {
        for (family, value) in [
            (&self.packets, s.packets),
            (&self.bytes, s.bytes),
            (&self.new_connections, s.new_connections),
            (&self.handshakes, s.handshakes),
            (&self.http_ok, s.http_ok),
            (&self.http_5xx, s.http_5xx),
        ] {
            family.get_or_create(labels).inc_by(value);
        }
    }

    /// `summed`: what the help says of handshakes and HTTP responses (the data plane
    /// counts them per backend only).
    fn register(self, registry: &mut Registry, prefix: &str, of: &str, summed: &str) {
        registry.register(
            format!("{prefix}_packets"),
            format!("Packets of the {of}'s connections, both directions, seen by the data plane"),
            self.packets,
        );
        registry.register(
            format!("{prefix}_bytes"),
            format!("Bytes (IP packets) of the {of}'s connections, both directions"),
            self.bytes,
        );
        registry.register(
            format!("{prefix}_new_connections"),
            format!("New connections (TCP SYN, first UDP datagram of a flow) sent to the {of}"),
            self.new_connections,
        );
        registry.register(
            format!("{prefix}_handshakes"),
            format!(
                "Completed TCP handshakes (SYN-ACK from the backend): connect successes of the {of}{summed}"
            ),
            self.handshakes,
        );
        registry.register(
            format!("{prefix}_http_ok"),
            format!("HTTP/1.x responses below 500 from the {of} (HTTP services){summed}"),
            self.http_ok,
        );
        registry.register(
            format!("{prefix}_http_5xx"),
            format!("HTTP/1.x 5xx responses from the {of} (HTTP services){summed}"),
            self.http_5xx,
        );
    }
}

fn service_labels(svc: &ServiceSnapshot) -> Labels {
    vec![
        ("service", svc.service.name.clone()),
        ("frontend", svc.service.frontend.to_string()),
    ]
}

fn endpoint_labels(svc: &ServiceSnapshot, i: usize, e: &EndpointSnapshot) -> Labels {
    let mut labels = service_labels(svc);
    labels.push(("endpoint", e.address.to_string()));
    // As written in a ServiceEntry: `region1/zone1`, no empty trailing parts.
    let locality = svc.service.endpoints[i].locality.to_string();
    labels.push(("locality", locality.trim_end_matches('/').to_string()));
    labels.push((
        "priority",
        svc.plan
            .priorities
            .get(i)
            .copied()
            .flatten()
            .map_or_else(|| "none".to_string(), |p| p.to_string()),
    ));
    labels
}

fn with(mut labels: Labels, key: &'static str, value: impl Into<String>) -> Labels {
    labels.push((key, value.into()));
    labels
}

/// The exposition of `snapshot` (taken with traffic counters).
pub fn render(snapshot: &Snapshot) -> String {
    let mut registry = Registry::with_prefix("lb");

    // Per service and per endpoint.
    let service_traffic = Traffic::new();
    let endpoint_traffic = Traffic::new();
    let priority_load = Gauges::default();
    let priority_panic = Gauges::default();
    let ejections_enforced = Counters::default();
    let ejections_overflow = Counters::default();
    let endpoint_state = Gauges::default();
    let endpoint_share = FloatGauges::default();
    let endpoint_connect_failures = Counters::default();
    let endpoint_events = Counters::default();
    let endpoints: usize = snapshot.services.iter().map(|s| s.endpoint_count).sum();
    let per_endpoint = endpoints <= snapshot.metrics.endpoint_series_limit;
    for svc in &snapshot.services {
        let labels = service_labels(svc);
        // The data plane counts handshakes and HTTP responses per backend only.
        let mut stats = svc.stats;
        (stats.handshakes, stats.http_ok, stats.http_5xx) = (
            svc.backend_totals.handshakes,
            svc.backend_totals.http_ok,
            svc.backend_totals.http_5xx,
        );
        service_traffic.add(&labels, &stats);
        for (p, load) in svc.plan.loads.load.iter().enumerate() {
            let l = with(labels.clone(), "priority", p.to_string());
            priority_load.get_or_create(&l).set(i64::from(*load));
            let panic = svc.plan.loads.panic.get(p).copied().unwrap_or(false);
            priority_panic.get_or_create(&l).set(i64::from(panic));
        }
        ejections_enforced
            .get_or_create(&labels)
            .inc_by(svc.detector.ejections_enforced_total);
        ejections_overflow
            .get_or_create(&labels)
            .inc_by(svc.detector.ejections_overflow);
        if !per_endpoint {
            continue;
        }
        for (i, e) in svc.endpoints.iter().enumerate() {
            let labels = endpoint_labels(svc, i, e);
            endpoint_traffic.add(&labels, &e.stats);
            let (outlier, operator, draining) =
                (e.outlier_ejected(), e.operator_ejected(), e.draining());
            for (state, on) in [
                ("active", !outlier && !operator && !draining),
                ("outlier_ejected", outlier),
                ("operator_ejected", operator),
                ("draining", draining),
            ] {
                endpoint_state
                    .get_or_create(&with(labels.clone(), "state", state))
                    .set(i64::from(on));
            }
            endpoint_share
                .get_or_create(&labels)
                .set(svc.plan.shares.get(i).copied().unwrap_or(0.0));
            endpoint_connect_failures
                .get_or_create(&labels)
                .inc_by(e.status.totals.cx_connect_fail);
            let events = snapshot.metrics.events(svc.service.frontend, e.address);
            for (event, n) in events.by_name() {
                endpoint_events
                    .get_or_create(&with(labels.clone(), "event", event))
                    .inc_by(n);
            }
        }
    }
    service_traffic.register(
        &mut registry,
        "service",
        "service",
        ", summed over its current endpoints",
    );
    registry.register(
        "service_priority_load_percent",
        "Percent of the service's new connections each priority level gets (Envoy's priority load)",
        priority_load,
    );
    registry.register(
        "service_priority_panic",
        "1 while a priority level is in panic (balances over all its endpoints, healthy or not)",
        priority_panic,
    );
    registry.register(
        "service_outlier_ejections_enforced",
        "Outlier ejections that happened (Envoy's outlier_detection.ejections_enforced_total)",
        ejections_enforced,
    );
    registry.register(
        "service_outlier_ejections_overflow",
        "Outlier ejections refused by maxEjectionPercent (Envoy's outlier_detection.ejections_overflow)",
        ejections_overflow,
    );
    let omitted = Gauge::<i64>::default();
    omitted.set(if per_endpoint { 0 } else { endpoints as i64 });
    registry.register(
        "metrics_endpoints_omitted",
        "Endpoints without per-endpoint series here: all of them while there are more than \
         `lb agent --metrics-endpoint-limit` (their figures are in /clusters)",
        omitted,
    );
    endpoint_traffic.register(&mut registry, "endpoint", "endpoint", "");
    registry.register(
        "endpoint_state",
        "1 for each state the endpoint is in: active (takes new connections), outlier_ejected, \
         operator_ejected, draining",
        endpoint_state,
    );
    registry.register(
        "endpoint_share_ratio",
        "Share of the service's new connections the endpoint gets now (0 to 1)",
        endpoint_share,
    );
    registry.register(
        "endpoint_connect_failures",
        "Connect failures of the endpoint (refused, unreachable) reported to outlier detection",
        endpoint_connect_failures,
    );
    registry.register(
        "endpoint_failover_events",
        "Health changes of the endpoint: outlier_ejected, operator_ejected, unejected, drained, undrained",
        endpoint_events,
    );

    // The data plane's verdicts (one per packet) and events (on top).
    let verdicts = Counters::default();
    let events = Counters::default();
    for (counter, value) in &snapshot.counters {
        let label = counter.label();
        if label.starts_with("event_") {
            events.get_or_create(&vec![("event", label.to_string())])
        } else {
            verdicts.get_or_create(&vec![("verdict", label.to_string())])
        }
        .inc_by(*value);
    }
    registry.register(
        "dataplane_packets",
        "Packets seen by the data plane, by verdict (every packet gets exactly one)",
        verdicts,
    );
    registry.register(
        "dataplane_events",
        "Data-plane events counted on top of verdicts",
        events,
    );

    // The agent.
    registry.register(
        "table_publish_seconds",
        "From a health decision to its selection tables being live in the kernel",
        snapshot.metrics.table_publish.clone(),
    );
    registry.register(
        "failover_reaction_seconds",
        "From the kernel seeing a backend failure to the table that avoids the backend being live",
        snapshot.metrics.failover_reaction.clone(),
    );
    registry.register(
        "network_programming_duration_seconds",
        "From a change in the cluster (an EndpointSlice's last-change-trigger-time) to the \
         tables that carry it being live (kube-proxy's metric of the same name)",
        snapshot.metrics.network_programming.clone(),
    );
    registry.register(
        "kubernetes_change_apply_seconds",
        "From the agent receiving a change from the cluster (a watch event) to the tables \
         that carry it being live: the agent's own part of network programming",
        snapshot.metrics.cluster_change_apply.clone(),
    );
    if let Some(cluster) = &snapshot.cluster {
        let objects = Gauges::default();
        for (kind, n) in cluster.status().objects {
            objects
                .get_or_create(&vec![("kind", kind.to_string())])
                .set(n as i64);
        }
        registry.register(
            "kubernetes_objects",
            "Objects of each kind the agent holds from the cluster",
            objects,
        );
        let restarts = Counters::default();
        let events = Counters::default();
        for (kind, r, e) in cluster.counters() {
            restarts
                .get_or_create(&vec![("kind", kind.to_string())])
                .inc_by(r);
            events
                .get_or_create(&vec![("kind", kind.to_string())])
                .inc_by(e);
        }
        registry.register(
            "kubernetes_watch_restarts",
            "Watch errors after which a watch of the cluster started again (with backoff)",
            restarts,
        );
        registry.register(
            "kubernetes_watch_events",
            "Events received from the cluster's watches",
            events,
        );
    }
    let last_publish = Gauge::<f64, AtomicU64>::default();
    last_publish.set(snapshot.last_publish.map_or(0.0, |d| d.as_secs_f64()));
    registry.register(
        "table_last_publish_seconds",
        "Time the last health decision took to be live in the kernel (0 before the first)",
        last_publish,
    );
    let publishes = Counter::<u64>::default();
    publishes.inc_by(snapshot.publishes);
    registry.register(
        "tables_published",
        "Health decisions whose tables were published",
        publishes,
    );
    let reloads = Counters::default();
    reloads
        .get_or_create(&vec![("result", "success".to_string())])
        .inc_by(snapshot.reloads.succeeded);
    reloads
        .get_or_create(&vec![("result", "failure".to_string())])
        .inc_by(snapshot.reloads.failed);
    registry.register(
        "config_reloads",
        "Reloads of the configuration files (watcher, SIGHUP, POST /reload) by result",
        reloads,
    );
    let interfaces = Gauges::default();
    for mode in [AttachMode::Tc, AttachMode::Xdp] {
        let n = snapshot
            .interfaces
            .iter()
            .filter(|(_, m)| *m == mode)
            .count();
        interfaces
            .get_or_create(&vec![("mode", mode_name(mode).to_string())])
            .set(n as i64);
    }
    registry.register(
        "interfaces_attached",
        "Interfaces the data plane is attached to (--interface names and pattern matches), by mode",
        interfaces,
    );
    let loaded_at = Gauge::<f64, AtomicU64>::default();
    loaded_at.set(unix_seconds(snapshot.reloads.loaded_at));
    registry.register(
        "config_loaded_timestamp_seconds",
        "When the configuration in force was applied (Unix time)",
        loaded_at,
    );

    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}
