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

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    sync::{atomic::AtomicU64, Arc},
};

use lb_common::TrafficStats;
use prometheus_client::{
    collector::Collector,
    encoding::{text::encode, DescriptorEncoder, EncodeLabelSet, NoLabelSet},
    metrics::MetricType,
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

/// Reads one counter of a `TrafficStats`.
type TrafficField = fn(&TrafficStats) -> u64;

/// The traffic counters of `TrafficStats`: name, what it counts (`{of}`: service or
/// endpoint), and its value.
const TRAFFIC: [(&str, &str, TrafficField); 6] = [
    (
        "packets",
        "Packets of the {of}'s connections, both directions, seen by the data plane",
        |s| s.packets,
    ),
    (
        "bytes",
        "Bytes (IP packets) of the {of}'s connections, both directions",
        |s| s.bytes,
    ),
    (
        "new_connections",
        "New connections (TCP SYN, first UDP datagram of a flow) sent to the {of}",
        |s| s.new_connections,
    ),
    (
        "handshakes",
        "Completed TCP handshakes (SYN-ACK from the backend): connect successes of the {of}{summed}",
        |s| s.handshakes,
    ),
    (
        "http_ok",
        "HTTP/1.x responses below 500 from the {of} (HTTP services){summed}",
        |s| s.http_ok,
    ),
    (
        "http_5xx",
        "HTTP/1.x 5xx responses from the {of} (HTTP services){summed}",
        |s| s.http_5xx,
    ),
];

fn service_labels<'a>(svc: &'a ServiceSnapshot, frontend: &'a str) -> [(&'static str, &'a str); 2] {
    [
        ("service", svc.service.name.as_str()),
        ("frontend", frontend),
    ]
}

fn endpoint_labels(svc: &ServiceSnapshot, i: usize, e: &EndpointSnapshot) -> Labels {
    let mut labels = vec![
        ("service", svc.service.name.clone()),
        ("frontend", svc.service.frontend.to_string()),
    ];
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

/// One value of a series.
enum Value {
    Counter(u64),
    Gauge(i64),
    Ratio(f64),
}

/// Writes one family: its descriptor, then each series as `series` yields it.
fn family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    series: impl Iterator<Item = (L, Value)>,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in series {
        let mut encoder = metric.encode_family(&labels)?;
        match value {
            Value::Counter(v) => encoder.encode_counter::<NoLabelSet, _, u64>(&v, None)?,
            Value::Gauge(v) => encoder.encode_gauge(&v)?,
            Value::Ratio(v) => encoder.encode_gauge(&v)?,
        }
    }
    Ok(())
}

/// The per-service and per-endpoint families, written straight from the snapshot while
/// the exposition is encoded: a registry of families would first hold every series'
/// labels and value at once (tens of MiB at 10,000 services) only to print them.
struct ServiceSeries(Arc<Snapshot>);

impl std::fmt::Debug for ServiceSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServiceSeries({} services)", self.0.services.len())
    }
}

impl Collector for ServiceSeries {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let snapshot = &*self.0;
        let services = &snapshot.services;
        let frontends: Vec<String> = services
            .iter()
            .map(|s| s.service.frontend.to_string())
            .collect();
        let by_service = || services.iter().zip(&frontends);
        for (name, help, value) in TRAFFIC {
            let help = help
                .replace("{of}", "service")
                .replace("{summed}", ", summed over its current endpoints");
            family(
                &mut encoder,
                &format!("service_{name}"),
                &help,
                MetricType::Counter,
                by_service().map(|(svc, f)| {
                    // The data plane counts handshakes and HTTP responses per backend only.
                    let mut stats = svc.stats;
                    (stats.handshakes, stats.http_ok, stats.http_5xx) = (
                        svc.backend_totals.handshakes,
                        svc.backend_totals.http_ok,
                        svc.backend_totals.http_5xx,
                    );
                    (service_labels(svc, f), Value::Counter(value(&stats)))
                }),
            )?;
        }
        let per_priority = |of: fn(&ServiceSnapshot, usize) -> i64| {
            by_service().flat_map(move |(svc, f)| {
                (0..svc.plan.loads.load.len()).map(move |p| {
                    let [service, frontend] = service_labels(svc, f);
                    (
                        [
                            service,
                            frontend,
                            (
                                "priority",
                                &*PRIORITY_NAMES[p.min(PRIORITY_NAMES.len() - 1)],
                            ),
                        ],
                        Value::Gauge(of(svc, p)),
                    )
                })
            })
        };
        family(
            &mut encoder,
            "service_priority_load_percent",
            "Percent of the service's new connections each priority level gets (Envoy's priority load)",
            MetricType::Gauge,
            per_priority(|svc, p| i64::from(svc.plan.loads.load[p])),
        )?;
        family(
            &mut encoder,
            "service_priority_panic",
            "1 while a priority level is in panic (balances over all its endpoints, healthy or not)",
            MetricType::Gauge,
            per_priority(|svc, p| i64::from(svc.plan.loads.panic.get(p).copied().unwrap_or(false))),
        )?;
        family(
            &mut encoder,
            "service_outlier_ejections_enforced",
            "Outlier ejections that happened (Envoy's outlier_detection.ejections_enforced_total)",
            MetricType::Counter,
            by_service().map(|(svc, f)| {
                (
                    service_labels(svc, f),
                    Value::Counter(svc.detector.ejections_enforced_total),
                )
            }),
        )?;
        family(
            &mut encoder,
            "service_outlier_ejections_overflow",
            "Outlier ejections refused by maxEjectionPercent (Envoy's outlier_detection.ejections_overflow)",
            MetricType::Counter,
            by_service().map(|(svc, f)| {
                (
                    service_labels(svc, f),
                    Value::Counter(svc.detector.ejections_overflow),
                )
            }),
        )?;

        let endpoints: usize = services.iter().map(|s| s.endpoint_count).sum();
        let per_endpoint = endpoints <= snapshot.metrics.endpoint_series_limit;
        if !per_endpoint {
            return Ok(());
        }
        // Every endpoint with its labels, once per scrape (at most the limit of them).
        let all: Vec<(&ServiceSnapshot, usize, &EndpointSnapshot, Labels)> = services
            .iter()
            .flat_map(|svc| {
                svc.endpoints
                    .iter()
                    .enumerate()
                    .map(move |(i, e)| (svc, i, e, endpoint_labels(svc, i, e)))
            })
            .collect();
        for (name, help, value) in TRAFFIC {
            let help = help.replace("{of}", "endpoint").replace("{summed}", "");
            family(
                &mut encoder,
                &format!("endpoint_{name}"),
                &help,
                MetricType::Counter,
                all.iter()
                    .map(|(_, _, e, l)| (l.as_slice(), Value::Counter(value(&e.stats)))),
            )?;
        }
        family(
            &mut encoder,
            "endpoint_state",
            "1 for each state the endpoint is in: active (takes new connections), outlier_ejected, \
             operator_ejected, draining",
            MetricType::Gauge,
            all.iter().flat_map(|(_, _, e, l)| {
                let (outlier, operator, draining) =
                    (e.outlier_ejected(), e.operator_ejected(), e.draining());
                [
                    ("active", !outlier && !operator && !draining),
                    ("outlier_ejected", outlier),
                    ("operator_ejected", operator),
                    ("draining", draining),
                ]
                .map(|(state, on)| (with(l.clone(), "state", state), Value::Gauge(i64::from(on))))
            }),
        )?;
        family(
            &mut encoder,
            "endpoint_share_ratio",
            "Share of the service's new connections the endpoint gets now (0 to 1)",
            MetricType::Gauge,
            all.iter().map(|(svc, i, _, l)| {
                (
                    l.as_slice(),
                    Value::Ratio(svc.plan.shares.get(*i).copied().unwrap_or(0.0)),
                )
            }),
        )?;
        family(
            &mut encoder,
            "endpoint_connect_failures",
            "Connect failures of the endpoint (refused, unreachable) reported to outlier detection",
            MetricType::Counter,
            all.iter().map(|(_, _, e, l)| {
                (
                    l.as_slice(),
                    Value::Counter(e.status.totals.cx_connect_fail),
                )
            }),
        )?;
        family(
            &mut encoder,
            "endpoint_failover_events",
            "Health changes of the endpoint: outlier_ejected, operator_ejected, unejected, drained, undrained",
            MetricType::Counter,
            all.iter().flat_map(|(svc, _, e, l)| {
                let events = snapshot.metrics.events(svc.service.frontend, e.address);
                events
                    .by_name()
                    .map(|(event, n)| (with(l.clone(), "event", event), Value::Counter(n)))
            }),
        )?;
        Ok(())
    }
}

/// The TLS forwarder's families: per endpoint (attempts by outcome, failed handshakes by
/// kind, bytes each way) and in all (connections open now, connections no backend took).
fn register_tls(registry: &mut Registry, tls: &crate::tls_origination::Counts) {
    use std::sync::atomic::Ordering::Relaxed;
    let active = Gauge::<i64>::default();
    active.set(tls.active.load(Relaxed) as i64);
    registry.register(
        "tls_connections_active",
        "TLS-originated connections open now (they live in the agent: a SIGKILL cuts them)",
        active,
    );
    let unserved = Counter::<u64>::default();
    unserved.inc_by(tls.unserved.load(Relaxed));
    registry.register(
        "tls_connections_unserved",
        "Client connections to TLS frontends closed because no backend could be reached \
         (every attempt failed, none was eligible, or the forwarder was full)",
        unserved,
    );
    let closed = Counters::default();
    for (reason, n) in [("over_limit", &tls.over_limit), ("idle", &tls.idle_closed)] {
        closed
            .get_or_create(&vec![("reason", reason.to_string())])
            .inc_by(n.load(Relaxed));
    }
    registry.register(
        "tls_connections_closed",
        "TLS-originated connections lb closed: over_limit (--tls-max-connections in \
         progress; also unserved), idle (no byte either way for the tcp_established timeout)",
        closed,
    );
    let attempts = Counters::default();
    let failures = Counters::default();
    let bytes = Counters::default();
    let endpoints = tls.endpoints.lock().unwrap_or_else(|p| p.into_inner());
    for (endpoint, c) in endpoints.iter() {
        let endpoint = endpoint.to_string();
        for (result, n) in [
            ("forwarded", c.connections),
            ("connect_failure", c.connect_failures),
            ("timeout", c.timeouts),
            ("tls_error", c.tls_errors.values().sum()),
        ] {
            attempts
                .get_or_create(&vec![
                    ("endpoint", endpoint.clone()),
                    ("result", result.to_string()),
                ])
                .inc_by(n);
        }
        for (kind, n) in &c.tls_errors {
            failures
                .get_or_create(&vec![
                    ("endpoint", endpoint.clone()),
                    ("kind", kind.clone()),
                ])
                .inc_by(*n);
        }
        for (direction, n) in [("sent", c.bytes_sent), ("received", c.bytes_received)] {
            bytes
                .get_or_create(&vec![
                    ("endpoint", endpoint.clone()),
                    ("direction", direction.to_string()),
                ])
                .inc_by(n);
        }
    }
    registry.register(
        "tls_endpoint_attempts",
        "The TLS forwarder's attempts per endpoint (a TCP connect and a TLS handshake under \
         one deadline), by result",
        attempts,
    );
    registry.register(
        "tls_endpoint_handshake_failures",
        "Failed TLS handshakes per endpoint, by kind (certificate_wrong_name, \
         certificate_unknown_issuer, certificate_expired, certificate_invalid, \
         alert_received, protocol, closed_during_handshake, io)",
        failures,
    );
    registry.register(
        "tls_endpoint_bytes",
        "Bytes the TLS forwarder carried per endpoint: sent (from clients) and received",
        bytes,
    );
}

/// Priority levels as label values (`0`, `1`, ...), made once.
static PRIORITY_NAMES: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(|| (0..64).map(|p| p.to_string()).collect());

/// The exposition of `snapshot` (taken with traffic counters).
pub fn render(snapshot: Snapshot) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = render_into(snapshot, &mut out);
    out
}

/// Writes the exposition of `snapshot` to `out` as it is encoded (for a response sent in
/// chunks: at 10,000 services the text is about 10 MiB, which need not be held at once).
/// Stops at `out`'s first error.
pub fn render_into(snapshot: Snapshot, out: &mut impl std::fmt::Write) -> std::fmt::Result {
    let snapshot = Arc::new(snapshot);
    let mut registry = Registry::with_prefix("lb");
    registry.register_collector(Box::new(ServiceSeries(snapshot.clone())));
    let endpoints: usize = snapshot.services.iter().map(|s| s.endpoint_count).sum();
    let omitted = Gauge::<i64>::default();
    if endpoints > snapshot.metrics.endpoint_series_limit {
        omitted.set(endpoints as i64);
    }
    registry.register(
        "metrics_endpoints_omitted",
        "Endpoints without per-endpoint series here: all of them while there are more than \
         `lb agent --metrics-endpoint-limit` (their figures are in /clusters)",
        omitted,
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
    let forwarding_off = Gauge::<i64>::default();
    forwarding_off.set(
        snapshot
            .interfaces
            .iter()
            .filter(|(name, _)| crate::interfaces::ipv4_forwarding(name) == Some(false))
            .count() as i64,
    );
    registry.register(
        "interfaces_forwarding_off",
        "Attached interfaces with IPv4 forwarding off (net.ipv4.conf.IFACE.forwarding = 0): \
         balanced packets arriving on them cannot be forwarded (0 on a working node)",
        forwarding_off,
    );
    let xdp_targets = Gauge::<i64>::default();
    xdp_targets.set(snapshot.xdp_targets.len() as i64);
    registry.register(
        "xdp_redirect_targets",
        "Interfaces XDP redirects rewritten packets to (drivers that take XDP frames; a veth \
         whose peer has GRO or an XDP program); packets to others go through the stack",
        xdp_targets,
    );
    // Active health checks, summed over the checked endpoints (per endpoint: /config_dump).
    if !snapshot.health.is_empty() {
        let endpoints = Gauges::default();
        let checks = Counters::default();
        for status in snapshot.health.values() {
            let state = if status.healthy {
                "healthy"
            } else {
                "unhealthy"
            };
            endpoints
                .get_or_create(&vec![("state", state.to_string())])
                .inc();
            checks
                .get_or_create(&vec![("result", "passed".to_string())])
                .inc_by(status.checks - status.failures);
            checks
                .get_or_create(&vec![("result", "failed".to_string())])
                .inc_by(status.failures);
        }
        registry.register(
            "health_checked_endpoints",
            "Endpoints under active health checks (HealthCheck documents), by state",
            endpoints,
        );
        registry.register(
            "health_checks",
            "Active health checks made, by result (summed over the checked endpoints)",
            checks,
        );
    }
    // Endpoints known by name: the resolver's work, and the names' state.
    if let Some((succeeded, failed, changed)) = snapshot.dns_lookups {
        let names = Gauges::default();
        for state in ["resolved", "stale", "unresolved"] {
            let _ = names.get_or_create(&vec![("state", state.to_string())]);
        }
        for answer in snapshot.dns.values() {
            let state = if answer.resolved_at.is_none() {
                "unresolved"
            } else if answer.stale {
                "stale"
            } else {
                "resolved"
            };
            names
                .get_or_create(&vec![("state", state.to_string())])
                .inc();
        }
        registry.register(
            "dns_names",
            "Endpoint names the agent resolves, by state (stale: the last lookup failed and an \
             earlier answer is in force; unresolved: never answered, no endpoints)",
            names,
        );
        let lookups = Counters::default();
        lookups
            .get_or_create(&vec![("result", "success".to_string())])
            .inc_by(succeeded);
        lookups
            .get_or_create(&vec![("result", "failure".to_string())])
            .inc_by(failed);
        registry.register(
            "dns_lookups",
            "Lookups of endpoint names by result",
            lookups,
        );
        let changes = Counter::<u64>::default();
        changes.inc_by(changed);
        registry.register(
            "dns_answer_changes",
            "Lookups whose addresses differed from the name's previous answer (each applied \
             as an endpoint change)",
            changes,
        );
    }
    if let Some(counts) = &snapshot.dns_responder {
        let queries = Counters::default();
        for (answer, n) in [
            ("own", &counts.own),
            ("forwarded", &counts.forwarded),
            ("malformed", &counts.malformed),
            ("dropped", &counts.dropped),
        ] {
            queries
                .get_or_create(&vec![("answer", answer.to_string())])
                .inc_by(n.load(std::sync::atomic::Ordering::Relaxed));
        }
        registry.register(
            "dns_responder_queries",
            "Queries to --dns-listen: answered from lb's names (own), forwarded upstream, \
             malformed (FORMERR or unreadable), dropped (too many in flight)",
            queries,
        );
    }
    if let Some(tls) = &snapshot.tls {
        register_tls(&mut registry, tls);
    }
    let loaded_at = Gauge::<f64, AtomicU64>::default();
    loaded_at.set(unix_seconds(snapshot.reloads.loaded_at));
    registry.register(
        "config_loaded_timestamp_seconds",
        "When the configuration in force was applied (Unix time)",
        loaded_at,
    );

    encode(out, &registry)
}
