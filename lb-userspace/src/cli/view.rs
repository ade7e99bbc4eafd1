//! The services as the pinned maps hold them, with what the agent adds.
//!
//! Which backends a frontend has comes from the maps: the backend → service map the agent
//! keeps (`lb_be_svc_v1`), and the ids in the service's active table and failover list.
//! The agent adds names, localities, priorities, shares and its outlier state, matched by
//! frontend (`VIP:PORT/PROTO`) and endpoint address.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::Result;
use lb_common::{proto, Backend, BackendState, Service, ServiceKey, TrafficStats};
use serde::Serialize;

use super::{
    client::{self, Agent, AgentEndpoint, AgentService, ClusterFacts},
    pins::Pins,
    warn,
};

/// Traffic counters of a service or backend.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
    pub new_connections: u64,
    pub handshakes: u64,
    pub http_ok: u64,
    pub http_5xx: u64,
}

impl From<TrafficStats> for Traffic {
    fn from(s: TrafficStats) -> Self {
        Self {
            packets: s.packets,
            bytes: s.bytes,
            new_connections: s.new_connections,
            handshakes: s.handshakes,
            http_ok: s.http_ok,
            http_5xx: s.http_5xx,
        }
    }
}

/// What the agent says about one endpoint.
#[derive(Clone, Debug, Serialize)]
pub struct AgentView {
    pub locality: String,
    pub priority: Option<u32>,
    /// Share of new connections the agent's plan gives it.
    pub share: f64,
    pub ejected: bool,
    pub draining: bool,
    /// Envoy's health flags from `GET /clusters` (`healthy`, `/failed_outlier_check`,
    /// `/failed_eds_health`, `/eds_status_draining`), when the agent has it.
    pub health_flags: Option<String>,
    /// Failures the agent counted for outlier detection (`rq_error` of `GET /clusters`:
    /// 5xx responses, refused, timed-out and reset connections), when it has it.
    pub errors: Option<u64>,
    /// The active health check's verdict (`passing`, `failing`), when the host has one.
    pub health_check: Option<String>,
}

impl AgentView {
    fn new(e: &AgentEndpoint, facts: Option<&std::collections::BTreeMap<String, String>>) -> Self {
        let number = |name: &str| facts?.get(name)?.parse::<u64>().ok();
        Self {
            locality: e.locality.clone(),
            priority: e.priority,
            share: e.share,
            ejected: e.ejected,
            draining: e.draining,
            health_flags: facts.and_then(|f| f.get("health_flags").cloned()),
            errors: number("rq_error").or_else(|| number("cx_connect_fail")),
            health_check: e.health_check.clone(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendView {
    pub id: u32,
    pub address: String,
    /// The data plane's state: active, draining, ejected (unset: an id no longer written).
    pub state: &'static str,
    /// Slots in the service's active selection table.
    pub slots: u32,
    /// Slots over the table's length: the share of new connections the kernel gives it.
    pub table_share: f64,
    /// Position in the failover list (0 first), if in it.
    pub failover_position: Option<usize>,
    /// The agent's view, when it answered and knows this endpoint.
    pub agent: Option<AgentView>,
    pub traffic: Traffic,
    /// Where the maps and the agent disagree (the maps' view is shown).
    pub disagreement: Option<String>,
}

/// A service; its handshakes and HTTP responses are its backends' (the kernel counts
/// them per backend only).
#[derive(Clone, Debug, Serialize)]
pub struct ServiceView {
    pub id: u32,
    /// `VIP:PORT/PROTO`.
    pub frontend: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: String,
    /// The service's name (from the agent).
    pub name: Option<String>,
    /// What defined it (from the agent): `lb.yaml document 1 (ServiceEntry …)`,
    /// `Kubernetes Service default/web`.
    pub source: Option<String>,
    /// Responses are parsed as HTTP/1.x.
    pub http: bool,
    /// Session affinity (ClientIP): its timeout in seconds.
    pub session_affinity_seconds: Option<u32>,
    /// Slots of the active selection table.
    pub table_slots: u32,
    /// Backend ids of the failover list, in order.
    pub failover_list: Vec<u32>,
    /// The agent's load per priority level (percent).
    pub priority_loads: Option<Vec<u32>>,
    pub backends: Vec<BackendView>,
    pub traffic: Traffic,
    pub notes: Vec<String>,
}

impl ServiceView {
    /// `outbound|PORT||HOST`, as Istio names the cluster (the VIP when the name is unknown).
    pub fn cluster(&self) -> String {
        let host = self.name.clone().unwrap_or_else(|| self.vip.to_string());
        format!("outbound|{}||{host}", self.port)
    }

    /// Whether `s` names this service: its name, `VIP:PORT`, `VIP:PORT/PROTO` or id.
    pub fn matches(&self, s: &str) -> bool {
        self.name.as_deref() == Some(s)
            || self.frontend.eq_ignore_ascii_case(s)
            || format!("{}:{}", self.vip, self.port) == s
            || self.id.to_string() == s
    }
}

/// Everything the read commands show.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    /// Whether the agent answered at `--admin`.
    pub agent_reachable: bool,
    /// Why not, when it did not.
    pub agent_error: Option<String>,
    pub node_locality: Option<String>,
    pub services: Vec<ServiceView>,
    /// Backends in the backends map that belong to no service in the maps.
    pub other_backends: Vec<BackendView>,
    /// Services the agent has that are not in the maps.
    pub notes: Vec<String>,
}

pub fn state_name(state: u8) -> &'static str {
    match BackendState::from_u8(state) {
        BackendState::Active => "active",
        BackendState::Draining => "draining",
        BackendState::Ejected => "ejected",
        BackendState::Unset => "unset",
    }
}

pub fn protocol_name(p: u8) -> String {
    match p {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        other => format!("proto-{other}"),
    }
}

pub fn ip(addr: &lb_common::AddrBe) -> Ipv4Addr {
    Ipv4Addr::from(addr.v4_octets())
}

pub fn frontend_of(key: &ServiceKey) -> String {
    format!(
        "{}:{}/{}",
        ip(&key.addr),
        u16::from_be(key.port_be),
        protocol_name(key.proto)
    )
}

/// The state the agent's view implies for the data plane, when it implies one: draining
/// endpoints are draining; held-out ones without a share are ejected. An endpoint the agent
/// has as healthy with a share is active, when `GET /clusters` gives its health flags
/// (which include states set in the configuration; `GET /services` does not). Others
/// (ejected but in a level in panic, `distribute`-excluded) are not judged.
fn expected_state(a: &AgentView) -> Option<&'static str> {
    let flags = a.health_flags.as_deref();
    let draining = a.draining || flags.is_some_and(|f| f.contains("draining"));
    let held_out = a.ejected || flags.is_some_and(|f| f.contains("failed_"));
    if draining {
        Some("draining")
    } else if held_out && a.share == 0.0 {
        Some("ejected")
    } else if flags == Some("healthy") && a.priority.is_some() && a.share > 0.0 {
        Some("active")
    } else {
        None
    }
}

/// Asks the agent, saying on stderr when it cannot be reached.
pub fn ask_agent(admin: std::net::SocketAddr) -> Agent {
    let agent = client::services(admin);
    if let Agent::Unreachable(why) = &agent {
        warn(&format!(
            "the agent is not reachable at {admin} ({why}): is it running, with --admin \
             {admin}? Showing what the pinned maps hold (no service names, localities, \
             priorities, shares or outlier state)"
        ));
    }
    agent
}

/// Reads the maps and merges what `agent` said.
pub fn snapshot(pins: &Pins, agent: &Agent) -> Result<Snapshot> {
    let services = pins.services()?;
    let backends: Vec<Backend> = pins.backends()?;
    let owners = pins.backend_services()?;
    let affinity = pins.affinity_timeouts()?;
    let selection = pins.selection()?;
    let service_stats = pins.service_stats()?;
    let backend_stats = pins.backend_stats()?;

    let backend_view = |id: u32, b: &Backend| BackendView {
        id,
        address: format!("{}:{}", ip(&b.addr), u16::from_be(b.port_be)),
        state: state_name(b.state),
        slots: 0,
        table_share: 0.0,
        failover_position: None,
        agent: None,
        traffic: backend_stats
            .get(id as usize)
            .copied()
            .unwrap_or_default()
            .into(),
        disagreement: None,
    };

    let mut claimed = vec![false; backends.len()];
    let mut views = Vec::new();
    for (key, svc) in &services {
        let Service {
            id,
            table_offset,
            table_len,
            fallback_len,
            flags,
        } = *svc;
        let table = selection.read(table_offset, table_len)?;
        let failover = selection.read(table_offset + table_len, u32::from(fallback_len))?;
        let mut slots: BTreeMap<u32, u32> = BTreeMap::new();
        for &b in &table {
            *slots.entry(b).or_default() += 1;
        }
        // Backends of this service: by the agent's backend → service map, and every id
        // its table or failover list names (also with pins of an agent without that map).
        let mut ids: Vec<u32> = owners
            .iter()
            .flatten()
            .enumerate()
            .filter(|&(bid, &sid)| bid != 0 && sid == id)
            .map(|(bid, _)| bid as u32)
            .collect();
        for &b in slots.keys().chain(&failover) {
            if b != 0 && !ids.contains(&b) {
                ids.push(b);
            }
        }
        ids.sort_unstable();
        let mut notes = Vec::new();
        let mut bviews = Vec::new();
        for bid in ids {
            let Some(b) = backends.get(bid as usize) else {
                notes.push(format!(
                    "the table names backend id {bid}, beyond the backends map"
                ));
                continue;
            };
            claimed[bid as usize] = true;
            let mut v = backend_view(bid, b);
            v.slots = slots.get(&bid).copied().unwrap_or(0);
            v.table_share = if table_len == 0 {
                0.0
            } else {
                f64::from(v.slots) / f64::from(table_len)
            };
            v.failover_position = failover.iter().position(|&f| f == bid);
            if v.slots > 0 && v.state != "active" {
                v.disagreement = Some(format!(
                    "{} in the backends map but {} slots in the table (new connections \
                     skip it): a table not republished yet",
                    v.state, v.slots
                ));
            }
            bviews.push(v);
        }
        // The kernel counts handshakes and HTTP responses per backend only.
        let mut traffic: Traffic = service_stats
            .get(id as usize)
            .copied()
            .unwrap_or_default()
            .into();
        traffic.handshakes = bviews.iter().map(|b| b.traffic.handshakes).sum();
        traffic.http_ok = bviews.iter().map(|b| b.traffic.http_ok).sum();
        traffic.http_5xx = bviews.iter().map(|b| b.traffic.http_5xx).sum();
        views.push(ServiceView {
            id,
            frontend: frontend_of(key),
            vip: ip(&key.addr),
            port: u16::from_be(key.port_be),
            protocol: protocol_name(key.proto),
            name: None,
            source: None,
            http: flags & lb_common::maps::SERVICE_HTTP != 0,
            session_affinity_seconds: affinity
                .as_ref()
                .and_then(|secs| secs.get(id as usize).copied())
                .filter(|&secs| secs != 0 && flags & lb_common::maps::SERVICE_AFFINITY != 0),
            table_slots: table_len,
            failover_list: failover,
            priority_loads: None,
            backends: bviews,
            traffic,
            notes,
        });
    }
    let other_backends: Vec<BackendView> = backends
        .iter()
        .enumerate()
        .filter(|&(id, b)| id != 0 && !claimed[id] && b.state != BackendState::Unset as u8)
        .map(|(id, b)| backend_view(id as u32, b))
        .collect();

    let mut snapshot = Snapshot {
        agent_reachable: false,
        agent_error: None,
        node_locality: None,
        services: views,
        other_backends,
        notes: Vec::new(),
    };
    match agent {
        Agent::Unreachable(why) => snapshot.agent_error = Some(why.clone()),
        Agent::Answered(a, clusters) => {
            snapshot.agent_reachable = true;
            snapshot.node_locality = a.node_locality.clone();
            for s in &a.services {
                merge(&mut snapshot, s, clusters.as_ref());
            }
            for v in &snapshot.services {
                if v.name.is_none() {
                    snapshot.notes.push(format!(
                        "service {} (id {}) is in the maps but the agent does not have it \
                         (pinned by an earlier agent?)",
                        v.frontend, v.id
                    ));
                }
            }
        }
    }
    Ok(snapshot)
}

fn merge(snapshot: &mut Snapshot, s: &AgentService, clusters: Option<&ClusterFacts>) {
    let Some(view) = snapshot
        .services
        .iter_mut()
        .find(|v| v.frontend.eq_ignore_ascii_case(&s.frontend))
    else {
        snapshot.notes.push(format!(
            "the agent has service {} ({}) but the maps do not",
            s.name, s.frontend
        ));
        return;
    };
    view.name = Some(s.name.clone());
    view.source = (!s.source.is_empty()).then(|| s.source.clone());
    view.priority_loads = Some(s.priority_loads.clone());
    let cluster = view.cluster();
    for e in &s.endpoints {
        let Some(b) = view.backends.iter_mut().find(|b| b.address == e.address) else {
            view.notes.push(format!(
                "the agent has endpoint {} but the maps have no backend for it",
                e.address
            ));
            continue;
        };
        let facts = clusters.and_then(|c| c.get(&(cluster.clone(), e.address.clone())));
        let a = AgentView::new(e, facts);
        if let Some(expected) = expected_state(&a) {
            if expected != b.state {
                let note = format!("the agent has it {expected}, the backends map {}", b.state);
                b.disagreement = Some(match b.disagreement.take() {
                    Some(other) => format!("{note}; {other}"),
                    None => note,
                });
            }
        }
        b.agent = Some(a);
    }
}
