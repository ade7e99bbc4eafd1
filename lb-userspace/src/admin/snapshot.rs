//! A copy of what the admin views show, taken from the agent so that formatting happens
//! without holding its lock.
//!
//! The agent's state is copied in one short hold of the lock. The data plane's per-CPU
//! traffic counters, one map lookup per service and per backend, are then read in chunks,
//! each under its own short hold, so a scrape of many thousands of backends never keeps a
//! failure signal waiting for more than one chunk's lookups.

use std::{
    net::SocketAddrV4,
    path::PathBuf,
    sync::Mutex,
    time::{Duration, SystemTime},
};

use lb_common::{BackendState, Counter, TrafficStats};

use super::metrics::AgentMetrics;
use crate::{
    agent::{lock, Agent, ReloadStatus},
    dataplane::DataplaneOptions,
    locality::Plan,
    model::{Node, OutlierDetection, Service},
    outlier::{DetectorStats, EndpointStatus},
};

/// Map lookups per hold of the agent's lock.
const LOOKUPS_PER_LOCK: usize = 256;

pub struct Snapshot {
    pub node: Node,
    pub dataplane: DataplaneOptions,
    pub config_paths: Vec<PathBuf>,
    pub reloads: ReloadStatus,
    pub last_publish: Option<Duration>,
    pub publishes: u64,
    pub metrics: AgentMetrics,
    pub services: Vec<ServiceSnapshot>,
    /// The data plane's verdict and event counters (empty without traffic stats).
    pub counters: Vec<(Counter, u64)>,
    /// The interfaces the data plane is attached to, and how.
    pub interfaces: Vec<(String, crate::dataplane::AttachMode)>,
    /// The interfaces XDP redirects rewritten packets to (the others: through the stack).
    pub xdp_targets: Vec<String>,
    /// Whether forwarded packets use the next-hop cache (`dataplane::routing`).
    pub nexthop_cache: bool,
    /// The cluster, when it is a source.
    pub cluster: Option<crate::sources::kubernetes::Cluster>,
    /// Why the cluster's latest state is not in force, while it is not.
    pub cluster_apply_error: Option<String>,
    /// What the DNS responder did, when it runs.
    pub dns_responder: Option<std::sync::Arc<crate::dns_responder::ResponderCounts>>,
    /// Every actively checked endpoint's status.
    pub health: std::collections::BTreeMap<crate::health::Target, crate::health::TargetStatus>,
    /// The answers for the endpoints known by name.
    pub dns: std::collections::BTreeMap<String, crate::sources::dns::Answer>,
    /// The TLS forwarder's counters, when it runs.
    pub tls: Option<std::sync::Arc<crate::tls_origination::Counts>>,
    /// The resolver's lookups and answer changes: (succeeded, failed, changed).
    pub dns_lookups: Option<(u64, u64, u64)>,
    /// The sources' warnings in force (fields not acted on, cluster objects left out).
    pub warnings: Vec<String>,
}

pub struct ServiceSnapshot {
    pub service: Service,
    /// The outlier detection in force: the DestinationRule's, or thresholds off (only
    /// operator actions eject) when it has none.
    pub outlier: OutlierDetection,
    pub detector: DetectorStats,
    pub plan: Plan,
    /// The data plane's traffic counters for the service.
    pub stats: TrafficStats,
    /// How many endpoints it has (also when `endpoints` was not copied).
    pub endpoint_count: usize,
    /// Its backends' traffic counters, summed (the data plane counts handshakes and
    /// HTTP responses per backend only).
    pub backend_totals: TrafficStats,
    /// Each endpoint (empty in a snapshot for `GET /metrics` above its limit).
    pub endpoints: Vec<EndpointSnapshot>,
}

pub struct EndpointSnapshot {
    pub address: SocketAddrV4,
    pub status: EndpointStatus,
    /// The state the configuration gives the backend (lb's own format), when not active.
    pub configured: Option<BackendState>,
    /// The data plane's traffic counters for this backend of this service.
    pub stats: TrafficStats,
}

impl EndpointSnapshot {
    /// Held out by outlier detection.
    pub fn outlier_ejected(&self) -> bool {
        self.status.outlier_ejection.is_some()
    }

    /// Held out by an operator (admin endpoint) or by the configuration.
    pub fn operator_ejected(&self) -> bool {
        self.status.operator_ejected_since.is_some()
            || self.configured == Some(BackendState::Ejected)
    }

    /// Drained by an operator or by the configuration.
    pub fn draining(&self) -> bool {
        self.status.draining || self.configured == Some(BackendState::Draining)
    }
}

/// Which data-plane ids a snapshot's counters are read from.
struct Ids {
    service: Option<u32>,
    /// Each endpoint's backend id, with the endpoint.
    backends: Vec<Option<(u32, SocketAddrV4)>>,
}

impl Snapshot {
    /// Copies the agent's state; with `traffic`, also reads the data plane's counters.
    pub fn take(agent: &Mutex<Agent>, traffic: bool) -> Self {
        Self::take_with(agent, traffic, |_| true)
    }

    /// For `GET /metrics`: with traffic counters, and with each endpoint only while the
    /// agent has at most `metrics.endpoint_series_limit` endpoints (above it only the
    /// per-service figures are rendered, and copying the endpoints would cost more
    /// memory than the rest).
    pub fn take_for_metrics(agent: &Mutex<Agent>) -> Self {
        Self::take_with(agent, true, |agent| {
            let endpoints: usize = agent
                .config
                .services
                .iter()
                .map(|s| s.endpoints.len())
                .sum();
            endpoints <= agent.metrics.endpoint_series_limit
        })
    }

    fn take_with(agent: &Mutex<Agent>, traffic: bool, endpoints: impl Fn(&Agent) -> bool) -> Self {
        let (mut snapshot, ids) = {
            let agent = lock(agent);
            let with_endpoints = endpoints(&agent);
            let mut ids = Vec::new();
            let services = agent
                .service_states()
                .map(|(svc, detector, plan)| {
                    ids.push(Ids {
                        service: agent.programmer.service_id(&svc.frontend),
                        backends: svc
                            .endpoints
                            .iter()
                            .map(|e| {
                                agent
                                    .programmer
                                    .backend_id(&svc.frontend, e.address, e.port)
                                    .map(|id| (id, SocketAddrV4::new(e.address, e.port)))
                            })
                            .collect(),
                    });
                    if !with_endpoints {
                        return ServiceSnapshot {
                            service: svc.clone_without_endpoints(),
                            outlier: detector.config().clone(),
                            detector: detector.stats(),
                            // The per-level loads only: the rest is per endpoint.
                            plan: Plan {
                                loads: plan.loads.clone(),
                                ..Default::default()
                            },
                            stats: TrafficStats::default(),
                            endpoint_count: svc.endpoints.len(),
                            backend_totals: TrafficStats::default(),
                            endpoints: Vec::new(),
                        };
                    }
                    ServiceSnapshot {
                        service: svc.clone(),
                        endpoint_count: svc.endpoints.len(),
                        backend_totals: TrafficStats::default(),
                        outlier: detector.config().clone(),
                        detector: detector.stats(),
                        plan: plan.clone(),
                        stats: TrafficStats::default(),
                        endpoints: svc
                            .endpoints
                            .iter()
                            .enumerate()
                            .map(|(i, e)| EndpointSnapshot {
                                address: SocketAddrV4::new(e.address, e.port),
                                status: detector.status(i).unwrap_or(EMPTY_STATUS),
                                configured: agent
                                    .config
                                    .initial_states
                                    .get(&(svc.frontend, e.address, e.port))
                                    .copied(),
                                stats: TrafficStats::default(),
                            })
                            .collect(),
                    }
                })
                .collect();
            let counters = if traffic {
                agent.dataplane.counters().unwrap_or_else(|e| {
                    log::warn!("reading the data plane's counters: {e:#}");
                    Vec::new()
                })
            } else {
                Vec::new()
            };
            let snapshot = Snapshot {
                node: agent.config.node.clone(),
                dataplane: agent.dataplane.options().clone(),
                config_paths: agent.config_paths.clone(),
                reloads: agent.reloads.clone(),
                last_publish: agent.last_publish,
                publishes: agent.publishes(),
                metrics: agent.metrics.clone(),
                services,
                counters,
                interfaces: agent
                    .dataplane
                    .attached_interfaces()
                    .iter()
                    .map(|(name, a)| (name.clone(), a.mode))
                    .collect(),
                nexthop_cache: agent.dataplane.nexthop_cache_on(),
                xdp_targets: agent
                    .dataplane
                    .xdp_targets()
                    .iter()
                    .map(|&i| crate::dataplane::xdp_targets::name_of(i))
                    .filter(|n| !n.is_empty())
                    .collect(),
                cluster: agent.cluster.clone(),
                cluster_apply_error: agent.cluster_apply_error.clone(),
                dns: agent.dns.as_ref().map(|d| d.answers()).unwrap_or_default(),
                tls: agent.tls.as_ref().map(|t| t.counts.clone()),
                dns_lookups: agent.dns.as_ref().map(|d| {
                    let c = d.counts();
                    let read = |n: &std::sync::atomic::AtomicU64| {
                        n.load(std::sync::atomic::Ordering::Relaxed)
                    };
                    (read(&c.succeeded), read(&c.failed), read(&c.changed))
                }),
                dns_responder: agent.responder_counts.clone(),
                health: agent
                    .health
                    .as_ref()
                    .map(|h| h.statuses())
                    .unwrap_or_default(),
                warnings: agent.warnings().to_vec(),
            };
            (snapshot, ids)
        };
        if traffic {
            snapshot.read_traffic(agent, &ids);
        }
        snapshot
    }

    /// Reads every service's and backend's counters, a chunk of lookups per hold of the
    /// lock. An id is read only while it still stands for the same frontend (and backend):
    /// a reload between two chunks may have given it to another.
    fn read_traffic(&mut self, agent: &Mutex<Agent>, ids: &[Ids]) {
        enum Slot {
            Service(usize),
            Backend(usize, usize),
        }
        // Every lookup in order, without listing them first (a list of every backend is
        // megabytes at 100,000 backends).
        let mut lookups = ids.iter().enumerate().flat_map(|(si, ids)| {
            let service = ids.service.map(|id| (Slot::Service(si), id));
            let backends = ids
                .backends
                .iter()
                .enumerate()
                .filter_map(move |(ei, id)| id.map(|(id, _)| (Slot::Backend(si, ei), id)));
            service.into_iter().chain(backends)
        });
        loop {
            let chunk: Vec<(Slot, u32)> = lookups.by_ref().take(LOOKUPS_PER_LOCK).collect();
            if chunk.is_empty() {
                break;
            }
            let agent = lock(agent);
            for (slot, id) in &chunk {
                match *slot {
                    Slot::Service(si) => {
                        let svc = &mut self.services[si];
                        if agent.programmer.service_id(&svc.service.frontend) == Some(*id) {
                            if let Ok(stats) = agent.dataplane.service_stats(*id) {
                                svc.stats = stats;
                            }
                        }
                    }
                    Slot::Backend(si, ei) => {
                        let svc = &mut self.services[si];
                        let frontend = svc.service.frontend;
                        let Some((_, address)) = ids[si].backends[ei] else {
                            continue;
                        };
                        let same = agent.programmer.backend_key(*id)
                            == Some((frontend, *address.ip(), address.port()));
                        if !same {
                            continue;
                        }
                        if let Ok(stats) = agent.dataplane.backend_stats(*id) {
                            svc.backend_totals.add(&stats);
                            if let Some(e) = svc.endpoints.get_mut(ei) {
                                e.stats = stats;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// For an endpoint the detector does not know (cannot happen: they are built together).
const EMPTY_STATUS: EndpointStatus = EndpointStatus {
    outlier_ejection: None,
    operator_ejected_since: None,
    draining: false,
    ejection_multiplier: 0,
    ejections_total: 0,
    consecutive_5xx: 0,
    consecutive_gateway_errors: 0,
    consecutive_local_origin_failures: 0,
    totals: crate::outlier::Totals {
        cx_connect_fail: 0,
        rq_error: 0,
        rq_total: 0,
    },
};

/// Seconds since the Unix epoch.
pub fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
