//! The long-running agent (the DaemonSet's process).
//!
//! It loads the data plane, attaches it, and keeps the kernel's tables equal to what
//! Istio's locality failover would do from this node: for each service, outlier detection
//! says which endpoints are healthy, the locality plan turns that into a share of new
//! connections per endpoint, and the share becomes slots of a Maglev table published in
//! one step. Outlier sweeps, operator actions (admin endpoint) and configuration reloads
//! all go through the same path. A configuration that fails to load or apply is reported
//! and the last good one keeps running.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    net::SocketAddrV4,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context as _, Result};
use lb_common::{BackendState, Signal, SignalKind as Failure};
use log::{error, info, warn};
use serde::Serialize;
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    config::{self, Config},
    dataplane::{
        sync::{DesiredBackend, DesiredService, Programmer},
        Dataplane,
    },
    locality::{self, Plan},
    model::{Locality, OutlierDetection, Service},
    outlier::{Change, Event, OperatorAction, OutlierDetector},
};
// Accumulated for the admin endpoint's `GET /metrics`.
use crate::admin::metrics::AgentMetrics;

/// An interface, or a glob pattern of interfaces, to attach to and how.
pub use crate::interfaces::InterfaceSpec;
use crate::sources::kubernetes::{Cluster, KubernetesOptions};

pub struct AgentOptions {
    /// Configuration files and directories.
    pub configs: Vec<PathBuf>,
    pub interfaces: Vec<InterfaceSpec>,
    /// Overrides the Node document's locality.
    pub node_locality: Option<Locality>,
    /// Address of the admin endpoint (None: no admin endpoint).
    pub admin: Option<std::net::SocketAddr>,
    /// How often the configuration is checked for changes.
    pub watch_interval: Duration,
    /// How often counters are logged (None: never).
    pub stats_interval: Option<Duration>,
    /// `GET /metrics` has per-endpoint series while there are at most this many endpoints.
    pub metrics_endpoint_limit: usize,
    /// Directory in the BPF filesystem where the maps are pinned, so `lb` commands (and a
    /// restarted agent) can read them.
    pub pin_dir: PathBuf,
    /// Root-only file holding the token mutating admin calls must carry.
    pub admin_token_file: PathBuf,
    /// Services, endpoints, localities and Istio resources from the cluster too.
    pub kubernetes: Option<KubernetesOptions>,
    /// How endpoints known by name are resolved (and where the DNS responder forwards).
    pub dns: crate::sources::dns::DnsOptions,
    /// Where the DNS responder listens (UDP and TCP), if it runs.
    pub dns_listen: Option<std::net::SocketAddr>,
    /// On SIGTERM, how long TLS-originated connections in progress are given to finish.
    pub drain_timeout: Duration,
    /// TLS-originated connections forwarded at once, at most.
    pub tls_max_connections: usize,
}

/// Where the agent pins its maps unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";
/// Where the agent writes the admin token unless told otherwise.
pub const DEFAULT_ADMIN_TOKEN_FILE: &str = "/run/lb/admin.token";

/// Outlier detection without thresholds: only operator actions eject. Used for services
/// whose DestinationRule has no `outlierDetection`.
fn operator_only() -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx_errors: 0,
        consecutive_gateway_errors: 0,
        consecutive_local_origin_failures: 0,
        ..OutlierDetection::default()
    }
}

/// A service's running state next to its configuration.
struct ServiceState {
    detector: OutlierDetector,
    plan: Plan,
}

/// A loaded, attached and programmed data plane with the state that drives it.
pub struct Agent {
    pub dataplane: Dataplane,
    pub programmer: Programmer,
    pub config: Config,
    node_locality: Option<Locality>,
    services: Vec<ServiceState>,
    /// Where each frontend is in `config.services` (and `services`).
    index: std::collections::HashMap<crate::dataplane::Frontend, usize>,
    /// An endpoint update of the cluster failed: the configuration in force may differ
    /// from the cluster's, and only a full apply brings them together.
    cluster_diverged: bool,
    /// Why the cluster's latest state is not in force, while it is not (for the views).
    pub cluster_apply_error: Option<String>,
    started: Instant,
    /// Time from the last health decision to its table being live.
    pub last_publish: Option<Duration>,
    /// Successes (handshakes, or HTTP responses below 500) per backend id when its last
    /// failure signal was handled.
    successes_seen: std::collections::HashMap<u32, u64>,
    /// Tables published since the start.
    publishes: u64,
    /// Failover reaction times: from the kernel seeing a failure to the table that avoids
    /// the backend being live (the most recent `REACTIONS_KEPT`).
    pub reactions: std::collections::VecDeque<Duration>,
    /// Histograms and event counts for the admin endpoint's `GET /metrics`.
    pub metrics: AgentMetrics,
    /// The configuration files and directories `reload_from_files` reads.
    pub config_paths: Vec<PathBuf>,
    /// Their documents as last read without error, merged with the cluster's objects at
    /// each change of either.
    pub files: config::FileDocuments,
    /// The cluster, when it is a source too.
    pub cluster: Option<Cluster>,
    /// The resolver of endpoints known by name (`resolution: DNS`).
    pub dns: Option<crate::sources::dns::Dns>,
    /// Active health checks of the services that have a `HealthCheck`.
    pub health: Option<crate::health::HealthChecker>,
    /// The TLS forwarder, when the agent runs one (`lb agent`).
    pub tls: Option<Arc<crate::tls_origination::Forwarder>>,
    /// The VIPs made local for TLS frontends.
    tls_vips: BTreeSet<Ipv4Addr>,
    /// Which address each `DNS_ROUND_ROBIN` name uses: it moves on when the one in use
    /// is ejected.
    round_robin: crate::sources::dns::RoundRobin,
    /// The names the DNS responder answers for, when it runs; follows the configuration.
    pub responder_names: Option<crate::dns_responder::SharedNames>,
    /// What the DNS responder did.
    pub responder_counts: Option<Arc<crate::dns_responder::ResponderCounts>>,
    /// Warnings about the sources in force, each logged once while it holds.
    logged_warnings: std::collections::BTreeSet<String>,
    warnings_in_order: Vec<String>,
    /// When the configuration in force was applied, and how reloads went.
    pub reloads: ReloadStatus,
    /// Backend states found in adopted maps, carried over by the first configuration.
    restored: std::collections::BTreeMap<crate::dataplane::sync::BackendKey, BackendState>,
}

/// When the configuration in force was applied, and how reloads from the files went.
#[derive(Clone, Debug)]
pub struct ReloadStatus {
    /// When the configuration in force was applied.
    pub loaded_at: SystemTime,
    /// Reloads from the files that were applied (since the start).
    pub succeeded: u64,
    /// Reloads from the files that were refused (the previous configuration stayed).
    pub failed: u64,
    /// Why the last reload was refused, while no later one succeeded.
    pub last_error: Option<String>,
}

/// How many failover reaction times the agent keeps.
const REACTIONS_KEPT: usize = 4096;

fn new_state(
    service: &Service,
    config: &Config,
    health: Option<&crate::health::HealthChecker>,
    now: Duration,
) -> ServiceState {
    let outlier = service
        .policy
        .outlier_detection
        .clone()
        .unwrap_or_else(operator_only);
    let detector = OutlierDetector::new(outlier, service.endpoints.len(), now);
    let plan = plan_of(config, service, &detector, health);
    ServiceState { detector, plan }
}

/// The locality plan of `service` from this node: outlier detection says which endpoints
/// are healthy; an endpoint the configuration (or the cluster) puts in `draining` or
/// `ejected` (a Kubernetes endpoint that is not ready, or terminating while others are
/// ready) counts as unhealthy too, so its level's load moves on as Envoy's would for an
/// endpoint Istio does not send.
/// An endpoint failing its active health checks counts as unhealthy too.
fn plan_of(
    config: &Config,
    service: &Service,
    detector: &OutlierDetector,
    health: Option<&crate::health::HealthChecker>,
) -> Plan {
    let mut healthy = detector.healthy();
    if let Some(health) = health.filter(|_| service.policy.health_check.is_some()) {
        for (h, e) in healthy.iter_mut().zip(service.endpoints.iter()) {
            if health.failing(&(service.frontend, e.address, e.port)) {
                *h = false;
            }
        }
    }
    if !config.initial_states.is_empty() {
        for (h, e) in healthy.iter_mut().zip(service.endpoints.iter()) {
            if config
                .initial_states
                .contains_key(&(service.frontend, e.address, e.port))
            {
                *h = false;
            }
        }
    }
    locality::plan(&config.node, service, &healthy)
}

/// `detector` of a service whose endpoints go from `old` to `new`: each endpoint keeps its
/// outlier state by address and port, as Envoy keeps a host's state across an endpoint
/// update; a new endpoint starts in service.
fn carried_over(
    detector: &OutlierDetector,
    old: &[crate::model::Endpoint],
    new: &[crate::model::Endpoint],
) -> OutlierDetector {
    let mut detector = detector.clone();
    if old != new {
        let index: std::collections::HashMap<(std::net::Ipv4Addr, u16), usize> = old
            .iter()
            .enumerate()
            .map(|(j, e)| ((e.address, e.port), j))
            .collect();
        let old_index_of: Vec<Option<usize>> = new
            .iter()
            .map(|e| index.get(&(e.address, e.port)).copied())
            .collect();
        detector.remap(&old_index_of);
    }
    detector
}

impl Agent {
    /// Loads the programs, attaches them and programs `config`. Pins nothing.
    pub fn start(
        config: Config,
        interfaces: &[InterfaceSpec],
        node_locality: Option<Locality>,
    ) -> Result<Self> {
        Self::start_pinned(config, interfaces, node_locality, None)
    }

    /// Like [`Agent::start`], and pins every map and link under `pin_dir` when given
    /// (see `dataplane::pin`); the pins stay after the agent exits, and the programs stay
    /// attached. What an earlier agent pinned there is adopted: its maps (when of the same
    /// layout and sizes), the ids it gave services and backends, its ejections and drains,
    /// and its links, switched to the new programs in one step each. The maps are
    /// programmed before the programs are attached or switched.
    pub fn start_pinned(
        config: Config,
        interfaces: &[InterfaceSpec],
        node_locality: Option<Locality>,
        pin_dir: Option<&std::path::Path>,
    ) -> Result<Self> {
        let mut dataplane = Dataplane::load_pinned(&config.dataplane, pin_dir)?;
        let (programmer, restored) = if dataplane.adopted().contains(&lb_common::maps::SERVICES) {
            let (programmer, restored) = Programmer::adopt(&mut dataplane)?;
            let services: std::collections::BTreeSet<_> =
                restored.keys().map(|(frontend, _, _)| *frontend).collect();
            info!(
                "adopted the pinned data plane: {} backends of {} services keep their ids",
                restored.len(),
                services.len()
            );
            (programmer, restored)
        } else {
            Default::default()
        };
        let mut agent = Self {
            dataplane,
            programmer,
            restored,
            config: Config::default(),
            node_locality,
            services: Vec::new(),
            index: Default::default(),
            cluster_diverged: false,
            cluster_apply_error: None,
            started: Instant::now(),
            last_publish: None,
            successes_seen: Default::default(),
            publishes: 0,
            reactions: Default::default(),
            metrics: AgentMetrics::default(),
            config_paths: Vec::new(),
            files: Default::default(),
            cluster: None,
            dns: None,
            health: None,
            tls: None,
            tls_vips: BTreeSet::new(),
            round_robin: Default::default(),
            responder_names: None,
            responder_counts: None,
            logged_warnings: Default::default(),
            warnings_in_order: Vec::new(),
            reloads: ReloadStatus {
                loaded_at: SystemTime::now(),
                succeeded: 0,
                failed: 0,
                last_error: None,
            },
        };
        // Adopting: the maps are brought to the configuration before the programs that
        // read them are switched. Fresh: nothing is balanced before the configuration is
        // applied either way, and the VIP answers only once everything is in place.
        let mut config = Some(config);
        if agent
            .dataplane
            .adopted()
            .contains(&lb_common::maps::SERVICES)
        {
            agent.reload(config.take().expect("not applied yet"))?;
        }
        crate::interfaces::attach_present(&mut agent.dataplane, interfaces)?;
        agent.dataplane.finish_attach()?;
        if let Some(config) = config {
            agent.reload(config)?;
        }
        Ok(agent)
    }

    /// Time since the agent started: the clock of outlier detection.
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Applies a new configuration; on error the running state is kept. Services whose
    /// frontend and endpoints are unchanged keep their outlier state.
    pub fn reload(&mut self, mut new: Config) -> Result<()> {
        // Sizes and timeouts are those the programs were loaded with.
        let loaded = self.dataplane.options();
        if new.dataplane != *loaded {
            warn!(
                "dataplane sizes and timeouts are fixed at start; restart the agent to change them"
            );
            new.dataplane = loaded.clone();
        }
        if let Some(l) = &self.node_locality {
            new.node.locality = l.clone();
        }
        crate::config::host::check(&new, self.dataplane.options())?;
        let now = self.now();
        let states: Vec<ServiceState> = new
            .services
            .iter()
            .map(|s| {
                // The same frontend and policy: outlier state carries over, endpoint by
                // endpoint (address and port), as Envoy keeps a host's state across an
                // endpoint update; a new endpoint starts in service.
                let kept = self
                    .index
                    .get(&s.frontend)
                    .filter(|&&i| self.config.services[i].policy == s.policy)
                    .map(|&i| (&self.config.services[i], &self.services[i]));
                match kept {
                    Some((old, k)) => {
                        let detector = carried_over(&k.detector, &old.endpoints, &s.endpoints);
                        let plan = plan_of(&new, s, &detector, self.health.as_ref());
                        ServiceState { detector, plan }
                    }
                    None => {
                        let mut state = new_state(s, &new, self.health.as_ref(), now);
                        restore(&mut state, s, &new, &self.restored, now);
                        state
                    }
                }
            })
            .collect();
        let desired = desired_services(&new, &states);
        self.programmer.apply(&mut self.dataplane, &desired)?;
        self.restored.clear();
        self.index = new
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.frontend, i))
            .collect();
        self.config = new;
        self.services = states;
        self.reloads.loaded_at = SystemTime::now();
        self.sync_health_checks();
        self.sync_tls_frontends();
        if let Some(names) = &self.responder_names {
            let table = Arc::new(crate::dns_responder::NameTable::from_config(&self.config));
            *names.write().unwrap_or_else(|p| p.into_inner()) = table;
        }
        Ok(())
    }

    /// Each service with its outlier detector and current plan (for the admin views).
    pub fn service_states(&self) -> impl Iterator<Item = (&Service, &OutlierDetector, &Plan)> {
        self.config
            .services
            .iter()
            .zip(&self.services)
            .map(|(svc, st)| (svc, &st.detector, &st.plan))
    }

    /// Tables published for health decisions since the start.
    pub fn publishes(&self) -> u64 {
        self.publishes
    }

    /// Recomputes the plans of the services in `changed` (indices) and publishes them.
    /// `decided` is when the health decision that led here was taken, for the
    /// decision-to-live measurement.
    fn republish(&mut self, changed: &[usize], decided: Instant) -> Result<()> {
        for &i in changed {
            let svc = &self.config.services[i];
            let state = &mut self.services[i];
            state.plan = plan_of(&self.config, svc, &state.detector, self.health.as_ref());
            let desired = desired_service(&self.config, svc, state);
            self.programmer
                .update_service(&mut self.dataplane, &desired)?;
        }
        let took = decided.elapsed();
        self.last_publish = Some(took);
        self.publishes += 1;
        self.metrics.table_publish.observe(took.as_secs_f64());
        info!(
            "tables published {} µs after the decision",
            took.as_micros()
        );
        Ok(())
    }

    /// Runs outlier sweeps that are due; republishes when an endpoint returns.
    pub fn sweep(&mut self) -> Result<()> {
        let now = self.now();
        let decided = Instant::now();
        let mut changed = Vec::new();
        for (i, (svc, state)) in self
            .config
            .services
            .iter()
            .zip(&mut self.services)
            .enumerate()
        {
            if state.detector.next_sweep() <= now {
                for change in state.detector.sweep(now) {
                    log_change(svc, &change);
                    self.metrics.count_change(svc, &change);
                    if changed.last() != Some(&i) {
                        changed.push(i);
                    }
                }
            }
        }
        if !changed.is_empty() {
            self.republish(&changed, decided)?;
        }
        Ok(())
    }

    /// Applies an operator action to `endpoint` in every service that has it (or only in
    /// `service`, matched by name or `vip:port`). Returns how many endpoints it touched.
    pub fn operator(
        &mut self,
        endpoint: SocketAddrV4,
        service: Option<&str>,
        action: OperatorAction,
    ) -> Result<usize> {
        self.for_endpoint(endpoint, service, |detector, i, now| {
            detector.operator(i, action, now).ok().flatten()
        })
    }

    /// Feeds an outlier-detection event for `endpoint` (as the data plane reports them),
    /// in every service that has it or only in `service`.
    pub fn record(
        &mut self,
        endpoint: SocketAddrV4,
        service: Option<&str>,
        event: Event,
    ) -> Result<usize> {
        self.for_endpoint(endpoint, service, |detector, i, now| {
            detector.record(i, event, now)
        })
    }

    fn for_endpoint(
        &mut self,
        endpoint: SocketAddrV4,
        service: Option<&str>,
        mut act: impl FnMut(&mut OutlierDetector, usize, Duration) -> Option<Change>,
    ) -> Result<usize> {
        let now = self.now();
        let decided = Instant::now();
        // A `VIP:PORT` filter, parsed once rather than formatted for every service.
        let frontend: Option<SocketAddrV4> = service.and_then(|s| s.parse().ok());
        let mut touched = 0;
        let mut changed = Vec::new();
        // `DNS_ROUND_ROBIN` names whose address in use was just ejected.
        let mut move_on = Vec::new();
        for (si, (svc, state)) in self
            .config
            .services
            .iter()
            .zip(&mut self.services)
            .enumerate()
        {
            let wanted = match (service, frontend) {
                (None, _) => true,
                (Some(_), Some(f)) => svc.frontend.vip == *f.ip() && svc.frontend.port == f.port(),
                (Some(name), None) => svc.name == name,
            };
            if !wanted {
                continue;
            }
            for (i, e) in svc.endpoints.iter().enumerate() {
                if e.address == *endpoint.ip() && e.port == endpoint.port() {
                    touched += 1;
                    if let Some(change) = act(&mut state.detector, i, now) {
                        log_change(svc, &change);
                        self.metrics.count_change(svc, &change);
                        let ejected = matches!(
                            change,
                            Change::Ejected { .. } | Change::OperatorEjected { .. }
                        );
                        if let Some(name) = e.hostname.as_ref().filter(|_| ejected) {
                            let one_at_a_time = svc
                                .named
                                .iter()
                                .any(|n| n.hostname == *name && n.one_at_a_time);
                            if one_at_a_time {
                                move_on.push((svc.frontend, name.clone()));
                            }
                        }
                        if changed.last() != Some(&si) {
                            changed.push(si);
                        }
                    }
                }
            }
        }
        if touched == 0 {
            bail!("no service has endpoint {endpoint}");
        }
        if !changed.is_empty() {
            self.republish(&changed, decided)?;
        }
        if !move_on.is_empty() {
            for key in move_on {
                *self.round_robin.entry(key).or_default() += 1;
            }
            self.apply_dns_answers()?;
        }
        Ok(touched)
    }

    /// Acts on a failure the data plane saw (see `docs/locality.md` for the mapping to
    /// outlier counters). Successes are counted in the kernel per backend, not signalled:
    /// completed connects for TCP services, responses below 500 for HTTP ones (where, as
    /// in Envoy's HTTP router, the response decides, not the connect). When some happened
    /// since this backend's last failure, they reset its consecutive counters first, as
    /// each would have in Envoy.
    pub fn on_signal(&mut self, signal: Signal) -> Result<()> {
        let Some(kind) = Failure::from_u32(signal.kind) else {
            bail!("unknown signal kind {}", signal.kind);
        };
        // A backend removed since the kernel saw the failure: nothing to act on.
        let Some((frontend, addr, port)) = self.programmer.backend_key(signal.backend_id) else {
            return Ok(());
        };
        let http = self
            .config
            .services
            .iter()
            .any(|s| s.frontend == frontend && s.http);
        let stats = self.dataplane.backend_stats(signal.backend_id)?;
        let successes = if http {
            stats.http_ok
        } else {
            stats.handshakes
        };
        let seen = self.successes_seen.insert(signal.backend_id, successes);
        let succeeded = seen.is_some_and(|s| successes > s) || (seen.is_none() && successes > 0);
        let event = match kind {
            Failure::ConnectRefused | Failure::Unreachable => Event::ConnectFailure,
            Failure::ConnectTimeout => Event::Timeout,
            Failure::EstablishedReset => Event::Reset,
            Failure::HttpError => Event::HttpStatus(signal.status as u16),
        };
        let endpoint = SocketAddrV4::new(addr, port);
        let service = format!("{}:{}", frontend.vip, frontend.port);
        if succeeded {
            self.record(endpoint, Some(&service), Event::Success)?;
        }
        let publishes = self.publishes;
        self.record(endpoint, Some(&service), event)?;
        if self.publishes != publishes {
            let took =
                Duration::from_nanos(crate::clock::monotonic_ns().saturating_sub(signal.ktime_ns));
            if self.reactions.len() == REACTIONS_KEPT {
                self.reactions.pop_front();
            }
            self.reactions.push_back(took);
            self.metrics.failover_reaction.observe(took.as_secs_f64());
            info!(
                "failover live {} µs after the kernel saw the failure",
                took.as_micros()
            );
        }
        Ok(())
    }

    /// What the agent is doing, for the admin endpoint.
    pub fn status(&self) -> AgentStatus {
        AgentStatus {
            node_locality: self.config.node.locality.to_string(),
            last_publish_us: self.last_publish.map(|d| d.as_micros() as u64),
            failover_reaction: ReactionSummary::of(&self.reactions),
            services: self
                .config
                .services
                .iter()
                .zip(&self.services)
                .map(|(svc, st)| ServiceStatus {
                    name: svc.name.clone(),
                    frontend: svc.frontend.to_string(),
                    source_kind: svc.source.kind(),
                    source: svc.source.to_string(),
                    priority_loads: st.plan.loads.load.clone(),
                    endpoints: svc
                        .endpoints
                        .iter()
                        .enumerate()
                        .map(|(i, e)| EndpointStatus {
                            address: format!("{}:{}", e.address, e.port),
                            locality: e.locality.to_string(),
                            priority: st.plan.priorities.get(i).copied().flatten(),
                            share: st.plan.shares.get(i).copied().unwrap_or(0.0),
                            ejected: st.detector.is_ejected(i),
                            draining: st.detector.is_draining(i),
                            health_check: svc.policy.health_check.as_ref().map(|_| {
                                let target = (svc.frontend, e.address, e.port);
                                match &self.health {
                                    Some(h) if h.failing(&target) => "failing",
                                    _ => "passing",
                                }
                            }),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// Resolution of Envoy's integer shares in the selection table's weights.
const SHARE_SCALE: f64 = 1_000_000.0;

/// The data plane's view of the plans: per endpoint, its weight (share) and whether it
/// may take new connections.
fn desired_services(config: &Config, states: &[ServiceState]) -> Vec<DesiredService> {
    config
        .services
        .iter()
        .zip(states)
        .map(|(svc, st)| desired_service(config, svc, st))
        .collect()
}

fn desired_service(config: &Config, svc: &Service, st: &ServiceState) -> DesiredService {
    DesiredService {
        name: svc.name.clone(),
        frontend: svc.frontend,
        backends: svc
            .endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let configured = config
                    .initial_states
                    .get(&(svc.frontend, e.address, e.port))
                    .copied();
                let state =
                    if st.detector.is_draining(i) || configured == Some(BackendState::Draining) {
                        BackendState::Draining
                    } else if !st.plan.eligible.get(i).copied().unwrap_or(false)
                        || configured == Some(BackendState::Ejected)
                    {
                        BackendState::Ejected
                    } else {
                        BackendState::Active
                    };
                let share = st.plan.shares.get(i).copied().unwrap_or(0.0);
                DesiredBackend {
                    addr: e.address,
                    port: e.port,
                    weight: (share * SHARE_SCALE).round() as u32,
                    state,
                    priority: st.plan.priorities.get(i).copied().flatten(),
                }
            })
            .collect(),
        http: svc.http,
        session_affinity: svc.session_affinity,
        tls: svc.policy.tls.is_some(),
    }
}

/// Carries over what an earlier agent left in the data plane for `svc`'s endpoints
/// (`restored`), as far as the maps tell: an endpoint the configuration leaves active
/// but the maps show ejected stays ejected (an outlier ejection from now, which the sweep
/// ends after `baseEjectionTime`; an operator ejection where the service has no outlier
/// detection), and one the maps show draining stays drained by the operator.
fn restore(
    state: &mut ServiceState,
    svc: &Service,
    config: &Config,
    restored: &std::collections::BTreeMap<crate::dataplane::sync::BackendKey, BackendState>,
    now: Duration,
) {
    if restored.is_empty() {
        return;
    }
    let mut changed = false;
    for (i, e) in svc.endpoints.iter().enumerate() {
        let key = (svc.frontend, e.address, e.port);
        let configured = config.initial_states.get(&key).copied();
        let eligible = state.plan.eligible.get(i).copied().unwrap_or(false);
        match restored.get(&key) {
            Some(BackendState::Ejected) if configured.is_none() && eligible => {
                if svc.policy.outlier_detection.is_some() {
                    state.detector.restore_ejection(i, now);
                } else {
                    let _ = state.detector.operator(i, OperatorAction::Eject, now);
                }
                info!(
                    "{} ({}): {}:{} stays ejected, as the data plane had it",
                    svc.name, svc.frontend, e.address, e.port
                );
                changed = true;
            }
            Some(BackendState::Draining) if configured.is_none() => {
                let _ = state.detector.operator(i, OperatorAction::Drain, now);
                info!(
                    "{} ({}): {}:{} stays drained, as the data plane had it",
                    svc.name, svc.frontend, e.address, e.port
                );
                changed = true;
            }
            _ => {}
        }
    }
    if changed {
        // Before any health check ran: none fails yet.
        state.plan = plan_of(config, svc, &state.detector, None);
    }
}

fn log_change(svc: &Service, change: &Change) {
    info!("{} ({}): {change:?}", svc.name, svc.frontend);
}

/// Failover reaction times over the most recent failovers (nearest-rank percentiles).
#[derive(Serialize, Clone, Copy, Debug, Default)]
pub struct ReactionSummary {
    pub count: usize,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub max_us: Option<u64>,
}

impl ReactionSummary {
    fn of(reactions: &std::collections::VecDeque<Duration>) -> Self {
        let mut us: Vec<u64> = reactions.iter().map(|d| d.as_micros() as u64).collect();
        us.sort_unstable();
        let rank = |p: usize| (!us.is_empty()).then(|| us[(us.len() * p).div_ceil(100).max(1) - 1]);
        Self {
            count: us.len(),
            p50_us: rank(50),
            p99_us: rank(99),
            max_us: us.last().copied(),
        }
    }
}

#[derive(Serialize)]
pub struct AgentStatus {
    pub node_locality: String,
    pub last_publish_us: Option<u64>,
    /// From the kernel seeing a failure to the table that avoids the backend being live.
    pub failover_reaction: ReactionSummary,
    pub services: Vec<ServiceStatus>,
}

#[derive(Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub frontend: String,
    /// Where the service was defined: `file` or `kubernetes`.
    pub source_kind: &'static str,
    /// The document or object that defined it (`Kubernetes Service default/web`).
    pub source: String,
    pub priority_loads: Vec<u32>,
    pub endpoints: Vec<EndpointStatus>,
}

#[derive(Serialize)]
pub struct EndpointStatus {
    pub address: String,
    pub locality: String,
    pub priority: Option<u32>,
    pub share: f64,
    pub ejected: bool,
    pub draining: bool,
    /// `passing` or `failing` when the endpoint's host has an active health check
    /// (a HealthCheck document); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<&'static str>,
}

/// The newest modification time among the configuration paths and the files in them,
/// and their number (a file added or removed changes it too).
fn config_stamp(paths: &[PathBuf]) -> (Option<SystemTime>, usize) {
    let mut newest = None;
    let mut count = 0;
    let mut see = |p: &std::path::Path| {
        if let Ok(m) = std::fs::metadata(p).and_then(|m| m.modified()) {
            count += 1;
            newest = newest.max(Some(m));
        }
    };
    for p in paths {
        see(p);
        if let Ok(dir) = std::fs::read_dir(p) {
            for e in dir.flatten() {
                see(&e.path());
            }
        }
    }
    (newest, count)
}

/// Reads the configuration files (`Agent::config_paths`) again and applies them with the
/// cluster's objects: for the watcher, SIGHUP and the admin endpoint's `POST /reload`. On
/// error the configuration in force stays, and the error is returned. Returns the number
/// of services.
pub fn reload_from_files(agent: &Mutex<Agent>) -> Result<usize> {
    let paths = lock(agent).config_paths.clone();
    // Read and validated without holding the lock.
    let loaded = config::load_files(&paths);
    let mut agent = lock(agent);
    let applied = loaded.and_then(|(files, _)| {
        agent.files = files;
        agent.apply_sources()
    });
    let agent = &mut *agent;
    match &applied {
        Ok(services) => {
            agent.reloads.succeeded += 1;
            agent.reloads.last_error = None;
            info!("configuration reloaded: {services} services");
        }
        Err(e) => {
            agent.reloads.failed += 1;
            agent.reloads.last_error = Some(format!("{e:#}"));
            error!("configuration not applied, the previous one stays in force: {e:#}");
        }
    }
    applied
}

impl Agent {
    /// Merges the files' documents with the cluster's objects (`config::join`) and applies
    /// the result: the one path from every source to the data plane. Warnings are logged
    /// once while they hold. Returns the number of services.
    /// The sources' warnings in force.
    pub fn warnings(&self) -> &[String] {
        &self.warnings_in_order
    }

    /// Logs the warnings not logged yet, and keeps them all for the views.
    fn set_warnings(&mut self, warnings: Vec<String>) {
        let set: std::collections::BTreeSet<String> = warnings.iter().cloned().collect();
        for w in set.difference(&self.logged_warnings) {
            warn!("{w}");
        }
        self.logged_warnings = set;
        self.warnings_in_order = warnings;
    }

    pub fn apply_sources(&mut self) -> Result<usize> {
        let (input, triggers) = match &self.cluster {
            Some(cluster) => cluster.input(),
            None => Default::default(),
        };
        self.apply_input(&input)?;
        self.observe_programming(triggers);
        Ok(self.config.services.len())
    }

    /// Applies what changed in the cluster: endpoint changes service by service (each
    /// costs the same however many services there are), anything else through
    /// [`Agent::apply_sources`]'s full path. Returns the number of services.
    pub fn apply_cluster_changes(&mut self) -> Result<usize> {
        let Some(cluster) = &self.cluster else {
            return Ok(self.config.services.len());
        };
        let (change, triggers, seen) = cluster.changes();
        match change {
            config::ClusterChange::Endpoints(updates) if !self.cluster_diverged => {
                for update in &updates {
                    if let Err(e) = self.update_endpoints(update) {
                        // What is in force no longer follows the cluster's translation:
                        // the full path, until it succeeds, brings them together again
                        // (and reports why it cannot, with the running state kept).
                        warn!("{e:#}; applying the whole cluster instead");
                        self.cluster_diverged = true;
                        break;
                    }
                }
                if self.cluster_diverged {
                    self.apply_sources()?;
                }
            }
            // After an update that failed, everything goes through the full path.
            config::ClusterChange::Endpoints(_) => self.apply_sources().map(drop)?,
            config::ClusterChange::Full(input) => self.apply_input(&input)?,
        }
        self.observe_programming(triggers);
        if let Some(seen) = seen {
            self.metrics
                .cluster_change_apply
                .observe(seen.elapsed().as_secs_f64());
        }
        Ok(self.config.services.len())
    }

    fn apply_input(&mut self, input: &config::ClusterInput) -> Result<()> {
        let mut loaded = config::join(&self.files, input)?;
        if let Some(dns) = &self.dns {
            resolve_names(dns, &mut loaded.config, &self.round_robin);
        }
        self.set_warnings(loaded.warnings);
        self.reload(loaded.config)?;
        self.cluster_diverged = false;
        self.metrics.forget_removed(&self.config);
        Ok(())
    }

    /// Applies the answers of names that changed: each service with endpoints known by
    /// name gets what they resolve to now, as an endpoint update (new connections follow,
    /// established ones keep their backend). Returns how many services changed.
    pub fn apply_dns_answers(&mut self) -> Result<usize> {
        let Some(dns) = &self.dns else {
            return Ok(0);
        };
        let answers = dns.answers();
        let updates: Vec<config::EndpointsUpdate> = self
            .config
            .services
            .iter()
            .filter(|s| !s.named.is_empty())
            .filter_map(|s| {
                let endpoints = crate::sources::dns::resolved(s, &answers, &self.round_robin);
                (endpoints != s.endpoints).then(|| config::EndpointsUpdate {
                    frontend: s.frontend,
                    source: s.source.clone(),
                    endpoints,
                    states: self
                        .config
                        .initial_states
                        .range(crate::dataplane::sync::backends_of(s.frontend))
                        .map(|((_, addr, port), state)| (*addr, *port, *state))
                        .collect(),
                })
            })
            .collect();
        for update in &updates {
            self.update_endpoints(update)?;
        }
        Ok(updates.len())
    }

    /// Gives the TLS forwarder the frontends that originate TLS (their client
    /// configurations, endpoint names) and makes their VIPs local addresses (routes are
    /// changed in the background). A frontend whose TLS settings cannot be used (an
    /// unreadable certificate file) is left out, with an error logged: its connections are
    /// reset, the others are served.
    pub fn sync_tls_frontends(&mut self) {
        let Some(forwarder) = &self.tls else {
            return;
        };
        let earlier = forwarder
            .frontends
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut frontends = std::collections::HashMap::new();
        for svc in &self.config.services {
            let reused = earlier.get(&svc.frontend).map(Arc::as_ref);
            match crate::tls_origination::TlsFrontend::reusing(svc, reused) {
                Ok(Some(frontend)) => {
                    frontends.insert(svc.frontend, Arc::new(frontend));
                }
                Ok(None) => {}
                Err(e) => error!("{e:#}; its connections are reset until this is fixed"),
            }
        }
        let vips: BTreeSet<Ipv4Addr> = self
            .config
            .services
            .iter()
            .filter(|s| s.policy.tls.is_some())
            .map(|s| s.frontend.vip)
            .collect();
        *forwarder
            .frontends
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(frontends);
        let add: Vec<Ipv4Addr> = vips.difference(&self.tls_vips).copied().collect();
        let remove: Vec<Ipv4Addr> = self.tls_vips.difference(&vips).copied().collect();
        self.tls_vips = vips;
        if !add.is_empty() || !remove.is_empty() {
            tokio::spawn(async move {
                if let Err(e) = crate::tls_origination::routes::update(&add, &remove).await {
                    error!("TLS frontends: {e:#}");
                }
            });
        }
    }

    /// Gives the health checker every endpoint of the services that have a check.
    fn sync_health_checks(&self) {
        let Some(health) = &self.health else {
            return;
        };
        health.sync(self.config.services.iter().flat_map(|s| {
            s.policy.health_check.iter().flat_map(move |check| {
                s.endpoints
                    .iter()
                    .map(move |e| ((s.frontend, e.address, e.port), check.clone()))
            })
        }));
    }

    /// Applies what the health checks found: the plans of the checked services again
    /// (an endpoint failing its checks is unhealthy), and a passing check ends an outlier
    /// ejection. Returns how many services were published.
    pub fn apply_health_checks(&mut self) -> Result<usize> {
        let Some(health) = self.health.clone() else {
            return Ok(0);
        };
        let decided = Instant::now();
        let mut changed = Vec::new();
        for (i, svc) in self.config.services.iter().enumerate() {
            if svc.policy.health_check.is_none() {
                continue;
            }
            let state = &mut self.services[i];
            for (j, e) in svc.endpoints.iter().enumerate() {
                let target = (svc.frontend, e.address, e.port);
                if !health.failing(&target) && state.detector.is_ejected(j) {
                    if let Some(change) = state.detector.health_check_passed(j) {
                        log_change(svc, &change);
                        self.metrics.count_change(svc, &change);
                    }
                }
            }
            let plan = plan_of(&self.config, svc, &self.services[i].detector, Some(&health));
            if plan != self.services[i].plan {
                changed.push(i);
            }
        }
        if !changed.is_empty() {
            self.republish(&changed, decided)?;
        }
        Ok(changed.len())
    }

    /// kube-proxy's network programming latency: from the change in the cluster (the
    /// slice's trigger time) to the tables that carry it being live.
    fn observe_programming(&mut self, triggers: Vec<SystemTime>) {
        let now = SystemTime::now();
        for t in triggers {
            if let Ok(took) = now.duration_since(t) {
                self.metrics.network_programming.observe(took.as_secs_f64());
            }
        }
    }

    /// Gives one service the endpoints `update` carries (and their configured states),
    /// as a full reload would: outlier state carried over by address and port, plan and
    /// table recomputed, new backends added and gone ones removed, and no other service
    /// looked at. Does nothing where the frontend is another source's (a file's service
    /// took it). On error nothing changes.
    pub fn update_endpoints(&mut self, update: &config::EndpointsUpdate) -> Result<()> {
        let Some(&i) = self.index.get(&update.frontend) else {
            return Ok(());
        };
        if self.config.services[i].source != update.source {
            return Ok(());
        }
        let frontend = update.frontend;
        let range = crate::dataplane::sync::backends_of(frontend);
        let old_states: Vec<_> = self
            .config
            .initial_states
            .range(range.clone())
            .map(|(k, v)| (*k, *v))
            .collect();
        for (key, _) in &old_states {
            self.config.initial_states.remove(key);
        }
        self.config.initial_states.extend(
            update
                .states
                .iter()
                .map(|&(addr, port, state)| ((frontend, addr, port), state)),
        );
        let old = &self.config.services[i];
        let mut service = Service {
            endpoints: update.endpoints.clone(),
            ..old.clone_without_endpoints()
        };
        let detector = carried_over(
            &self.services[i].detector,
            &old.endpoints,
            &service.endpoints,
        );
        let plan = plan_of(&self.config, &service, &detector, self.health.as_ref());
        let state = ServiceState { detector, plan };
        let desired = desired_service(&self.config, &service, &state);
        if let Err(e) = self.programmer.apply_service(&mut self.dataplane, &desired) {
            // Back to what is in force.
            let new_keys: Vec<_> = self
                .config
                .initial_states
                .range(range)
                .map(|(k, _)| *k)
                .collect();
            for key in new_keys {
                self.config.initial_states.remove(&key);
            }
            self.config.initial_states.extend(old_states);
            return Err(e.context(format!("updating the endpoints of {}", service.name)));
        }
        std::mem::swap(&mut self.config.services[i], &mut service);
        self.services[i] = state;
        if self.config.services[i].policy.health_check.is_some() {
            self.sync_health_checks();
        }
        if self.config.services[i].policy.tls.is_some() {
            // Endpoint names (SNI) may have changed.
            self.sync_tls_frontends();
        }
        let live = &self.config.services[i].endpoints;
        self.metrics.forget_endpoints_of(frontend, |addr| {
            live.iter()
                .any(|e| e.address == *addr.ip() && e.port == addr.port())
        });
        Ok(())
    }
}

/// What a stopped agent leaves to finish once its runtime is gone: the TLS-originated
/// connections in progress.
pub struct Stopped {
    tls: Option<crate::tls_origination::Running>,
    drain_timeout: Duration,
}

impl Stopped {
    /// Finishes the TLS-originated connections in progress (for `--drain-timeout` at most);
    /// call it once the agent's runtime has shut down, so the next agent can take over.
    pub fn finish(self) {
        if let Some(tls) = self.tls {
            tls.finish(self.drain_timeout);
        }
    }
}

/// Runs the agent until SIGTERM (or Ctrl-C); then everything a next agent takes over is
/// released (the forwarder's listener, the DNS responder's port, the admin token; the
/// admin port with the runtime), and the TLS-originated connections in progress are left
/// to [`Stopped::finish`].
pub async fn run(opts: AgentOptions) -> Result<Stopped> {
    // The admin endpoint comes up first: `/healthz` answers and `/ready` says 503 while
    // the programs load. The token file is removed when `token_file` drops (clean
    // shutdown, or a start that fails).
    let mut admin = None;
    let mut token_file = None;
    if let Some(addr) = opts.admin {
        let token = crate::admin::token::TokenFile::create(&opts.admin_token_file)?;
        let listener = bind_retrying(|| std::net::TcpListener::bind(addr))
            .and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            })
            .with_context(|| format!("binding the admin endpoint to {addr}"))?;
        if !addr.ip().is_loopback() {
            warn!(
                "the admin endpoint listens on {addr}, not a loopback address: its views \
                 (configuration, endpoints, counters) are open to whoever reaches it; bind it \
                 to 127.0.0.1 (mutating calls are refused from other addresses anyway)"
            );
        }
        info!(
            "admin endpoint on http://{addr}/ (mutating calls need the token in {})",
            opts.admin_token_file.display()
        );
        let state =
            crate::admin::AdminState::new(token.token().to_string(), opts.admin_token_file.clone());
        tokio::spawn(crate::admin::serve(listener, state.clone()));
        admin = Some(state);
        token_file = Some(token);
    }

    let (files, loaded) = config::load_files(&opts.configs)?;
    // With the cluster as a source, nothing is applied before every kind's first full
    // list: until then the pinned data plane keeps forwarding as it was (a partial view
    // would remove Services the cluster still has).
    let cluster = match &opts.kubernetes {
        Some(k) => {
            let cluster = Cluster::connect(k.clone()).await?;
            cluster.wait_synced().await;
            info!("Kubernetes: every watched kind is listed");
            Some(cluster)
        }
        None => None,
    };
    let (mut config, warnings) = match &cluster {
        Some(cluster) => {
            let joined = config::join(&files, &cluster.input().0)?;
            (joined.config, joined.warnings)
        }
        None => (loaded.config, loaded.warnings),
    };
    // Endpoints known by name: looked up before the first publish (for a few seconds at
    // most; a name that does not answer by then gets its endpoints when it does).
    let dns = match crate::sources::dns::Dns::start(opts.dns.clone()) {
        Ok(dns) => {
            dns.want(crate::sources::dns::names_of(&config.services));
            dns.resolve_unanswered(Duration::from_secs(3)).await;
            resolve_names(&dns, &mut config, &Default::default());
            Some(dns)
        }
        Err(e) => {
            warn!("endpoints known by name will not be resolved: {e:#}");
            None
        }
    };
    for w in &warnings {
        warn!("{w}");
    }
    let mut agent = Agent::start_pinned(
        config,
        &opts.interfaces,
        opts.node_locality.clone(),
        Some(&opts.pin_dir),
    )?;
    agent.config_paths = opts.configs.clone();
    agent.files = files;
    agent.logged_warnings = warnings.iter().cloned().collect();
    agent.warnings_in_order = warnings;
    agent.cluster = cluster.clone();
    agent.dns = dns.clone();
    let health = crate::health::HealthChecker::default();
    agent.health = Some(health.clone());
    agent.sync_health_checks();
    let mut dns_responder = None;
    if let Some(addr) = opts.dns_listen {
        let names: crate::dns_responder::SharedNames = Arc::new(std::sync::RwLock::new(Arc::new(
            crate::dns_responder::NameTable::from_config(&agent.config),
        )));
        let counts = Arc::new(crate::dns_responder::ResponderCounts::default());
        dns_responder = Some(crate::dns_responder::serve(
            addr,
            names.clone(),
            opts.dns.resolver,
            counts.clone(),
        )?);
        agent.responder_names = Some(names);
        agent.responder_counts = Some(counts);
    }
    agent.metrics.endpoint_series_limit = opts.metrics_endpoint_limit;
    info!(
        "lb agent running: {} services, node at {}, on {}",
        agent.config.services.len(),
        agent.config.node.locality,
        opts.interfaces
            .iter()
            .map(|i| format!("{}:{:?}", i.name, i.mode))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let agent = Arc::new(Mutex::new(agent));
    if let Some(admin) = &admin {
        admin.set_agent(agent.clone());
    }

    if let Some(signals) = lock(&agent).dataplane.take_signals() {
        tokio::spawn(consume_signals(signals, agent.clone()));
    }
    // The TLS forwarder: one listener, which lb_sk_lookup gives the connections of TLS
    // frontends; the outcomes of its attempts come back as outlier events. Without it
    // (a kernel without sk_lookup), TLS frontends are not served and the rest is.
    let (tls_events, mut tls_outcomes) = tokio::sync::mpsc::unbounded_channel();
    let tls = start_tls_forwarder(&agent, opts.tls_max_connections, tls_events)
        .inspect_err(|e| error!("TLS origination is not available: {e:#}"))
        .ok();
    tokio::spawn(crate::interfaces::watch(
        agent.clone(),
        opts.interfaces.clone(),
    ));
    follow_xdp_targets(Arc::downgrade(&agent));
    tokio::spawn(crate::dataplane::routing::follow(Arc::downgrade(&agent)));

    let mut last_stamp = config_stamp(&opts.configs);
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut watch = tokio::time::interval(opts.watch_interval);
    // Sweeps run at each service's own `interval`; this only sets how late one can be.
    let mut sweeps = tokio::time::interval(Duration::from_millis(100));
    let mut stats = tokio::time::interval(opts.stats_interval.unwrap_or(Duration::from_secs(3600)));
    let cluster_changed = next_cluster_change(cluster.clone());
    tokio::pin!(cluster_changed);
    let dns_changed = next_dns_change(dns.clone());
    tokio::pin!(dns_changed);
    let health_changed = health.clone();
    loop {
        let reload = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = hup.recv() => true,
            _ = &mut cluster_changed => {
                // A burst of changes is applied at once: whatever arrived while the last
                // one was being applied is in this one.
                let mut agent = lock(&agent);
                match agent.apply_cluster_changes() {
                    Ok(_) => agent.cluster_apply_error = None,
                    Err(e) => {
                        error!(
                            "the cluster's change is not applied, the tables in force stay: \
                             {e:#}"
                        );
                        agent.cluster_apply_error = Some(format!("{e:#}"));
                    }
                }
                drop(agent);
                cluster_changed.set(next_cluster_change(cluster.clone()));
                false
            }
            _ = health_changed.changed() => {
                if let Err(e) = lock(&agent).apply_health_checks() {
                    error!("health checks: the tables are not published: {e:#}");
                }
                false
            }
            Some(outcome) = tls_outcomes.recv() => {
                let crate::tls_origination::ForwarderEvent { service, endpoint, event } = outcome;
                if let Err(e) = lock(&agent).record(endpoint, Some(&service), event) {
                    warn!("TLS forwarder outcome for {endpoint}: {e:#}");
                }
                false
            }
            _ = &mut dns_changed => {
                if let Err(e) = lock(&agent).apply_dns_answers() {
                    error!("a name's new answer is not applied, the tables in force stay: {e:#}");
                }
                dns_changed.set(next_dns_change(dns.clone()));
                false
            }
            _ = watch.tick() => {
                let stamp = config_stamp(&opts.configs);
                let changed = stamp != last_stamp;
                last_stamp = stamp;
                changed
            }
            _ = sweeps.tick() => {
                if let Err(e) = lock(&agent).sweep() {
                    error!("outlier sweep: {e:#}");
                }
                false
            }
            _ = stats.tick(), if opts.stats_interval.is_some() => {
                log_counters(&lock(&agent).dataplane);
                false
            }
        };
        if reload {
            // Logged, counted and kept for the admin views by `reload_from_files`.
            let _ = reload_from_files(&agent);
        }
    }
    info!(
        "lb agent stopping; the programs stay attached and the maps pinned under {}, so \
         traffic keeps flowing and the next agent adopts them (`lb agent --cleanup` removes \
         them)",
        opts.pin_dir.display()
    );
    // New TLS-originated connections wait for the next agent from here (TC and XDP hold
    // their SYNs back); the ones in progress are finished by `Stopped::finish`.
    if let Some(tls) = &tls {
        lock(&agent).dataplane.stop_tls_steering();
        tls.forwarder.stop_accepting();
    }
    drop(dns_responder);
    drop(token_file);
    Ok(Stopped {
        tls,
        drain_timeout: opts.drain_timeout,
    })
}

/// How long a starting agent waits for the ports a stopping one still holds.
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// `bind`, tried again for up to [`TAKEOVER_WAIT`] while the address is in use: a previous
/// agent stopping (an upgrade) lets its ports go as it stops. Called at start only, so the
/// thread may wait.
pub fn bind_retrying<T>(bind: impl Fn() -> std::io::Result<T>) -> std::io::Result<T> {
    let deadline = std::time::Instant::now() + TAKEOVER_WAIT;
    loop {
        match bind() {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            bound => return bound,
        }
    }
}

/// Gives `config`'s services the endpoints their names resolve to now, and tells `dns`
/// which names the configuration has.
fn resolve_names(
    dns: &crate::sources::dns::Dns,
    config: &mut Config,
    round_robin: &crate::sources::dns::RoundRobin,
) {
    dns.want(crate::sources::dns::names_of(&config.services));
    let answers = dns.answers();
    for service in &mut config.services {
        if !service.named.is_empty() {
            service.endpoints = crate::sources::dns::resolved(service, &answers, round_robin);
        }
    }
}

/// Resolves at the next change of a name's answer; never without a resolver.
async fn next_dns_change(dns: Option<crate::sources::dns::Dns>) {
    match dns {
        Some(d) => d.changed().await,
        None => std::future::pending().await,
    }
}

/// Resolves at the cluster's next change; never without a cluster.
async fn next_cluster_change(cluster: Option<Cluster>) {
    match cluster {
        Some(c) => c.changed().await,
        None => std::future::pending().await,
    }
}

/// `lb agent --cleanup`: detaches every program this agent's links attached, removes every
/// pin under `pin_dir` (then the directory) and the admin token file.
pub fn cleanup(pin_dir: &std::path::Path, admin_token_file: &std::path::Path) -> Result<()> {
    let done = crate::dataplane::pin::cleanup(pin_dir)?;
    for (iface, hook) in &done.links {
        info!("detached lb's {hook} program from {iface}");
    }
    info!(
        "removed {} map pins{}",
        done.maps.len(),
        if done.left.is_empty() {
            format!(" and {}", pin_dir.display())
        } else {
            format!(
                "; left in {}, not lb's: {}",
                pin_dir.display(),
                done.left.join(" ")
            )
        }
    );
    match std::fs::remove_file(admin_token_file) {
        Ok(()) => info!("removed {}", admin_token_file.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!("removing {}: {e}", admin_token_file.display()),
    }
    Ok(())
}

/// Locks the agent; a panic while holding the lock is a bug, so it propagates.
/// Keeps the data plane's XDP redirect targets what the kernel says they are, as devices
/// come, go, and gain or lose what XDP frames need (a veth's peer turning GRO on or off),
/// on a thread of its own (the kernel's notifications are read blocking), for as long as
/// the agent lives.
fn follow_xdp_targets(agent: std::sync::Weak<Mutex<Agent>>) {
    let refresh = move || {
        let Some(agent) = agent.upgrade() else {
            return false;
        };
        let mut agent = lock(&agent);
        match agent.dataplane.refresh_xdp_targets() {
            Ok(true) => info!(
                "XDP redirect targets now: {} interface(s)",
                agent.dataplane.xdp_targets().len()
            ),
            Ok(false) => {}
            Err(e) => warn!("updating the XDP redirect targets: {e:#}"),
        }
        true
    };
    let spawned = std::thread::Builder::new()
        .name("lb-xdp-targets".into())
        .spawn(move || loop {
            match crate::dataplane::xdp_targets::on_changes(&refresh) {
                Ok(()) => return,
                Err(e) => warn!("following device changes for XDP redirects: {e:#}; again in 1 s"),
            }
            std::thread::sleep(Duration::from_secs(1));
            // Changes missed meanwhile.
            if !refresh() {
                return;
            }
        });
    if let Err(e) = spawned {
        warn!("not following device changes for XDP redirects: {e}");
    }
}

pub fn lock(agent: &Mutex<Agent>) -> std::sync::MutexGuard<'_, Agent> {
    agent
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn log_counters(dp: &Dataplane) {
    match dp.counters() {
        Ok(counters) => {
            let nonzero: Vec<String> = counters
                .iter()
                .filter(|(_, v)| *v > 0)
                .map(|(c, v)| format!("{}={v}", c.label()))
                .collect();
            info!("counters: {}", nonzero.join(" "));
        }
        Err(e) => warn!("reading counters: {e:#}"),
    }
}

/// Starts the TLS forwarder: its listener handed to `lb_sk_lookup`, its reader of the
/// published tables, its frontends.
fn start_tls_forwarder(
    agent: &Arc<Mutex<Agent>>,
    max_connections: usize,
    events: tokio::sync::mpsc::UnboundedSender<crate::tls_origination::ForwarderEvent>,
) -> Result<crate::tls_origination::Running> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("the TLS forwarder's listener")?;
    let mut a = lock(agent);
    a.dataplane
        .steer_tls(&listener)
        .context("handing TLS frontends' connections to the forwarder")?;
    let timeouts = a.dataplane.options().timeouts;
    let forwarder = Arc::new(crate::tls_origination::Forwarder::new(
        a.dataplane.selection_reader()?,
        timeouts.connect_retries,
        crate::tls_origination::Limits {
            max_connections,
            idle_timeout: Duration::from_nanos(timeouts.tcp_established_timeout_ns),
        },
        events,
    ));
    a.tls = Some(forwarder.clone());
    a.sync_tls_frontends();
    crate::tls_origination::Running::start(forwarder, listener)
}

/// Feeds the data plane's failure signals to outlier detection as they arrive: the ring
/// buffer's fd wakes this task, so failover does not wait for a polling interval.
async fn consume_signals(
    signals: aya::maps::RingBuf<aya::maps::MapData>,
    agent: Arc<Mutex<Agent>>,
) {
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as long
    // as the AsyncFd owns the ring buffer.
    let mut fd = match unsafe { tokio::io::unix::AsyncFd::register(signals) } {
        Ok(fd) => fd,
        Err(e) => {
            error!("watching the signal ring buffer: {e}");
            return;
        }
    };
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                error!("waiting for signals: {e}");
                return;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<Signal>() {
                continue;
            }
            // SAFETY: the kernel wrote a whole `Signal` (checked length); read unaligned.
            let signal: Signal = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            drop(item);
            if let Err(e) = lock(&agent).on_signal(signal) {
                warn!("signal {signal:?}: {e:#}");
            }
        }
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nearest-rank percentiles of the failover reaction times.
    #[test]
    fn reaction_summary_percentiles() {
        let none = ReactionSummary::of(&Default::default());
        assert_eq!((none.count, none.p50_us, none.max_us), (0, None, None));
        let times: std::collections::VecDeque<Duration> =
            (1..=100).rev().map(Duration::from_micros).collect();
        let s = ReactionSummary::of(&times);
        assert_eq!(s.count, 100);
        assert_eq!(s.p50_us, Some(50));
        assert_eq!(s.p99_us, Some(99));
        assert_eq!(s.max_us, Some(100));
        let one: std::collections::VecDeque<Duration> = [Duration::from_micros(7)].into();
        assert_eq!(ReactionSummary::of(&one).p99_us, Some(7));
    }

    /// The seed's service from a node in region1/zone1, with `endpoints` (address,
    /// locality), and outlier detection.
    fn seed(endpoints: &[(&str, &str)]) -> Config {
        let endpoints: String = endpoints
            .iter()
            .map(|(a, l)| format!("  - {{ address: {a}, locality: {l} }}\n"))
            .collect();
        config::parse(&format!(
            "apiVersion: lb/v1alpha1\nkind: Node\nspec:\n  locality: region1/zone1\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{ name: hw }}\n\
             spec:\n  hosts: [hw.sample.svc.cluster.local]\n  addresses: [10.96.0.10]\n  \
             ports: [{{ number: 5000, name: tcp, protocol: TCP, targetPort: 8080 }}]\n  \
             resolution: STATIC\n  endpoints:\n{endpoints}---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{ name: hw }}\n\
             spec:\n  host: hw.sample.svc.cluster.local\n  trafficPolicy:\n    \
             loadBalancer:\n      localityLbSetting:\n        enabled: true\n        \
             failover: [{{ from: region1, to: region2 }}]\n    outlierDetection:\n      \
             consecutive5xxErrors: 1\n      interval: 1s\n      baseEjectionTime: 10m\n"
        ))
        .unwrap()
    }

    /// What the kernel holds for `frontend`: its table and failover list as backend
    /// addresses, and every backend the service owns with its state.
    fn programmed(
        agent: &Agent,
        frontend: &crate::dataplane::Frontend,
    ) -> (Vec<String>, Vec<String>, Vec<String>) {
        let name = |id: &u32| {
            let (_, addr, port) = agent.programmer.backend_key(*id).expect("a known id");
            let state = BackendState::from_u8(agent.dataplane.backend(*id).unwrap().state);
            format!("{addr}:{port} {state:?}")
        };
        let table = agent.dataplane.selection_table(frontend).unwrap();
        let failover = agent.dataplane.failover_list(frontend).unwrap();
        let service_id = agent.programmer.service_id(frontend).unwrap();
        let mut owned: Vec<String> = (1..agent.dataplane.options().max_backends)
            .filter(|&id| agent.dataplane.backend_service(id).unwrap() == service_id)
            .map(|id| name(&id))
            .collect();
        owned.sort();
        (
            table.iter().map(name).collect(),
            failover.iter().map(name).collect(),
            owned,
        )
    }

    /// An endpoint change applied to one service (the cluster's endpoint path) leaves
    /// the data plane and the agent's state exactly as a full reload of the same
    /// configuration does: endpoints gone, new, moved to another locality, drained by the
    /// source, and an outlier ejection carried over. Needs root (it loads the programs).
    #[test]
    fn an_endpoint_update_programs_what_a_full_reload_does() {
        let before = seed(&[
            ("10.200.1.2", "region1/zone1"),
            ("10.200.2.2", "region1/zone2"),
            ("10.200.3.2", "region2/zone3"),
            ("10.200.4.2", "region3/zone4"),
        ]);
        let mut after = seed(&[
            ("10.200.1.2", "region1/zone1"),
            ("10.200.5.2", "region1/zone1"),
            ("10.200.3.2", "region2/zone3"),
            ("10.200.4.2", "region2/zone3"),
        ]);
        let frontend = after.services[0].frontend;
        let drained = std::net::Ipv4Addr::new(10, 200, 1, 2);
        after
            .initial_states
            .insert((frontend, drained, 8080), BackendState::Draining);
        let ejected: SocketAddrV4 = "10.200.3.2:8080".parse().unwrap();

        let start = |config: &Config| {
            let mut agent = Agent::start(config.clone(), &[], None).unwrap();
            agent
                .operator(ejected, None, OperatorAction::Eject)
                .unwrap();
            agent
        };
        let mut full = start(&before);
        full.reload(after.clone()).unwrap();
        let mut patched = start(&before);
        patched
            .update_endpoints(&config::EndpointsUpdate {
                frontend,
                source: after.services[0].source.clone(),
                endpoints: after.services[0].endpoints.clone(),
                states: vec![(drained, 8080, BackendState::Draining)],
            })
            .unwrap();

        assert_eq!(patched.config, full.config);
        let plans = |a: &Agent| {
            a.services
                .iter()
                .map(|s| s.plan.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(plans(&patched), plans(&full));
        let (table, failover, owned) = programmed(&patched, &frontend);
        assert_eq!(
            (table.clone(), failover, owned.clone()),
            programmed(&full, &frontend)
        );
        // And it is the change asked for: 10.200.2.2 gone, 10.200.5.2 in, the drained
        // and the ejected endpoints out of the table, which region2 (now with 10.200.4.2)
        // shares with the half-healthy zone.
        assert_eq!(
            owned,
            [
                "10.200.1.2:8080 Draining",
                "10.200.3.2:8080 Ejected",
                "10.200.4.2:8080 Active",
                "10.200.5.2:8080 Active",
            ]
        );
        let in_table: std::collections::BTreeSet<&str> = table.iter().map(String::as_str).collect();
        assert_eq!(
            in_table,
            ["10.200.4.2:8080 Active", "10.200.5.2:8080 Active"].into()
        );
    }

    /// At the data plane's capacity, a configuration in which one service grows while
    /// another shrinks is applied (the one that gives ids back first), and one that does
    /// not fit is refused before anything changes. Needs root (it loads the programs).
    #[test]
    fn a_reload_that_fits_also_fits_on_the_way() {
        let native = |a: &[u8], b: &[u8]| {
            let backends = |last: &[u8]| -> String {
                last.iter()
                    .map(|l| format!("{{ address: 10.200.0.{l}, port: 8080 }}, "))
                    .collect()
            };
            config::parse(&format!(
                "dataplane: {{ max_backends: 8 }}\nservices:\n  \
                 - {{ name: a, vip: 10.96.0.51, port: 80, backends: [{}] }}\n  \
                 - {{ name: b, vip: 10.96.0.52, port: 80, backends: [{}] }}\n",
                backends(a),
                backends(b)
            ))
            .unwrap()
        };
        let mut agent = Agent::start(native(&[1, 2], &[3, 4, 5, 6]), &[], None).unwrap();
        agent.reload(native(&[1, 2, 7, 8], &[3])).unwrap();
        let a = agent.config.services[0].frontend;
        for last in [1, 2, 7, 8] {
            let addr = std::net::Ipv4Addr::new(10, 200, 0, last);
            assert!(
                agent.programmer.backend_id(&a, addr, 8080).is_some(),
                "{addr}"
            );
        }
        let err = agent
            .reload(native(&[1, 2, 7, 8, 9, 10], &[3, 4]))
            .unwrap_err();
        assert!(format!("{err:#}").contains("max_backends"), "{err:#}");
        assert_eq!(
            agent.config.services[0].endpoints.len(),
            4,
            "the running state stays"
        );
    }

    /// A backend configured `draining` (native format) stays draining in what the data
    /// plane is given, with its weight, next to an active one.
    #[test]
    fn configured_states_reach_the_data_plane() {
        let config = config::parse(
            "services:\n  - name: web\n    vip: 10.96.0.10\n    port: 80\n    backends:\n      \
             - { address: 10.200.1.2, port: 8080 }\n      \
             - { address: 10.200.2.2, port: 8080, weight: 3, state: draining }\n",
        )
        .unwrap();
        let states: Vec<ServiceState> = config
            .services
            .iter()
            .map(|s| new_state(s, &config, None, Duration::ZERO))
            .collect();
        let desired = desired_services(&config, &states);
        let backends = &desired[0].backends;
        assert_eq!(backends[0].state, BackendState::Active);
        assert_eq!(backends[1].state, BackendState::Draining);
        assert_eq!(config.services[0].endpoints[1].weight, 3);
    }
}
