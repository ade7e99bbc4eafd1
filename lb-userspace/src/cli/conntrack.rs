//! `lb conntrack`: the connection table, one line per connection.
//!
//! The table holds two entries per connection, each under the 5-tuple its packets carry:
//! client → VIP (original direction, rewritten to the backend) and backend → client
//! (replies, rewritten from the VIP). They are paired back into client → VIP → backend.
//!
//! Age is `CLOCK_MONOTONIC_COARSE` now minus the connection's `created_ns` (unknown for
//! connections carried over from a table of the previous layout). Idle time is
//! `CLOCK_MONOTONIC_COARSE` now minus the newest `last_seen_ns` of the two
//! entries. The kernel stamps entries with `bpf_ktime_get_coarse_ns`, the same clock at
//! tick resolution (1–10 ms), and refreshes an entry at most once a second, so idle times
//! are accurate to about a second. Entries past their state's idle timeout are treated as
//! absent by the data plane; they are left out unless `--all`.
//!
//! Connections of TLS-originating frontends are not in the table (the kernel passes them
//! to the agent's TLS forwarder, which opens its own connection to the backend): they are
//! asked of the agent (`GET /tls_connections`) and shown with the state `TLS FORWARDED`
//! (its age, no idle time or expiry: they last as long as both sides keep them).

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    time::Duration,
};

use anyhow::Result;
use lb_common::{ConnDirection, ConnEntry, ConnState, DataplaneConfig, FlowKey};
use serde::Serialize;

use super::{
    client::Agent,
    fail, print, print_json,
    table::{duration, Table},
    view::{ask_agent, frontend_of, ip, protocol_name},
    Common, Output, Pins, EXIT_ERROR,
};

fn state_name(state: u8) -> &'static str {
    match state {
        s if s == ConnState::TcpSyn as u8 => "SYN",
        s if s == ConnState::TcpEstablished as u8 => "ESTABLISHED",
        s if s == ConnState::TcpClosing as u8 => "CLOSING",
        s if s == ConnState::Udp as u8 => "UDP",
        _ => "UNKNOWN",
    }
}

fn timeout_ns(config: &DataplaneConfig, state: u8) -> Option<u64> {
    match state {
        s if s == ConnState::TcpSyn as u8 => Some(config.tcp_syn_timeout_ns),
        s if s == ConnState::TcpEstablished as u8 => Some(config.tcp_established_timeout_ns),
        s if s == ConnState::TcpClosing as u8 => Some(config.tcp_closing_timeout_ns),
        s if s == ConnState::Udp as u8 => Some(config.udp_timeout_ns),
        _ => None,
    }
}

fn endpoint(addr: &lb_common::AddrBe, port_be: u16) -> String {
    format!("{}:{}", ip(addr), u16::from_be(port_be))
}

#[derive(Serialize)]
struct Connection {
    protocol: String,
    client: String,
    frontend: String,
    backend: String,
    state: &'static str,
    /// Seconds since lb saw the connection's first packet (±10 ms); unknown (null) for
    /// connections carried over from a connection table of the previous layout.
    age_seconds: Option<f64>,
    /// Seconds since the newest entry of the connection was refreshed (±1 s); null for a
    /// TLS-forwarded connection.
    idle_seconds: Option<f64>,
    /// Seconds until the data plane treats it as gone, when the timeouts are pinned.
    expires_in_seconds: Option<f64>,
    expired: bool,
    service_id: u32,
    service: String,
    backend_id: u32,
    /// Times the connection attempt was moved to another backend.
    retries: u8,
    /// Which entries exist: both, or only one direction.
    entries: &'static str,
}

/// Parses `--backend`: IP:PORT, IP or a backend id.
enum BackendFilter {
    Endpoint(String),
    Address(Ipv4Addr),
    Id(u32),
}

impl BackendFilter {
    fn parse(s: &str) -> Result<Self> {
        if let Ok(id) = s.parse::<u32>() {
            return Ok(Self::Id(id));
        }
        if let Ok(a) = s.parse::<Ipv4Addr>() {
            return Ok(Self::Address(a));
        }
        if s.parse::<std::net::SocketAddrV4>().is_ok() {
            return Ok(Self::Endpoint(s.to_string()));
        }
        Err(fail(
            EXIT_ERROR,
            format!("--backend {s:?} is not IP:PORT, IP or a backend id"),
        ))
    }

    fn matches(&self, c: &Connection) -> bool {
        match self {
            Self::Endpoint(e) => c.backend == *e,
            Self::Address(a) => c.backend.split(':').next() == Some(&a.to_string()),
            Self::Id(id) => c.backend_id == *id,
        }
    }
}

/// A connection the agent's TLS forwarder carries (`GET /tls_connections`).
#[derive(serde::Deserialize)]
struct Forwarded {
    client: String,
    frontend: String,
    backend: String,
    service: String,
    age_seconds: f64,
}

/// The agent's TLS-forwarded connections; none when it does not answer.
fn tls_forwarded(admin: std::net::SocketAddr) -> Vec<Forwarded> {
    super::client::request(admin, "GET", "/tls_connections", &[])
        .ok()
        .filter(|r| r.status == 200)
        .and_then(|r| serde_json::from_str(&r.body).ok())
        .unwrap_or_default()
}

pub fn conntrack(
    common: &Common,
    service: Option<&str>,
    backend: Option<&str>,
    all: bool,
) -> Result<()> {
    let pins = Pins::open(&common.pin_dir)?;
    let backend_filter: Option<BackendFilter> = backend.map(BackendFilter::parse).transpose()?;
    let config = pins.config()?;
    // Service ids → frontend and name.
    let mut services: BTreeMap<u32, (String, Option<String>)> = pins
        .services()?
        .iter()
        .map(|(k, s)| (s.id, (frontend_of(k), None)))
        .collect();
    let agent = ask_agent(common.admin);
    let agent_reachable = matches!(agent, Agent::Answered(..));
    if let Agent::Answered(a, _) = agent {
        for s in a.services {
            for (frontend, name) in services.values_mut() {
                if frontend.eq_ignore_ascii_case(&s.frontend) {
                    *name = Some(s.name.clone());
                }
            }
        }
    }
    let service_id = match service {
        None => None,
        Some(wanted) => {
            let found = services.iter().find(|(id, (frontend, name))| {
                name.as_deref() == Some(wanted)
                    || frontend.eq_ignore_ascii_case(wanted)
                    || frontend.rsplit_once('/').map(|(f, _)| f) == Some(wanted)
                    || id.to_string() == wanted
            });
            match found {
                Some((id, _)) => Some(*id),
                None => {
                    let hint = if agent_reachable {
                        ""
                    } else {
                        " (names need the agent; VIP:PORT works without it)"
                    };
                    return Err(fail(
                        EXIT_ERROR,
                        format!("no service {wanted:?} in the data plane{hint}"),
                    ));
                }
            }
        }
    };

    let entries: HashMap<FlowKey, ConnEntry> = pins.connections()?.into_iter().collect();
    let now = crate::clock::monotonic_coarse_ns();
    let mut paired_replies = std::collections::HashSet::new();
    let mut rows = Vec::new();
    let mut hidden = 0usize;
    let mut add = |original: Option<(&FlowKey, &ConnEntry)>,
                   reply: Option<(&FlowKey, &ConnEntry)>| {
        let (client, frontend, backend, proto, main) = match (original, reply) {
            (Some((k, e)), _) => (
                endpoint(&k.src, k.src_port_be),
                endpoint(&k.dst, k.dst_port_be),
                endpoint(&e.nat_addr, e.nat_port_be),
                k.proto,
                e,
            ),
            (None, Some((k, e))) => (
                endpoint(&k.dst, k.dst_port_be),
                endpoint(&e.nat_addr, e.nat_port_be),
                endpoint(&k.src, k.src_port_be),
                k.proto,
                e,
            ),
            (None, None) => return,
        };
        let last_seen = original
            .iter()
            .chain(reply.iter())
            .map(|(_, e)| e.last_seen_ns)
            .max()
            .unwrap_or(0);
        let idle = Duration::from_nanos(now.saturating_sub(last_seen));
        let created = original
            .iter()
            .chain(reply.iter())
            .map(|(_, e)| e.created_ns)
            .find(|&c| c != 0);
        let age = created.map(|c| Duration::from_nanos(now.saturating_sub(c)));
        let left = config
            .as_ref()
            .and_then(|c| timeout_ns(c, main.state))
            .map(|t| t as i128 - idle.as_nanos() as i128);
        let expired = left.is_some_and(|l| l <= 0);
        let (name, sid) = (
            services
                .get(&main.service_id)
                .map(|(f, n)| n.clone().unwrap_or_else(|| f.clone()))
                .unwrap_or_else(|| format!("id {}", main.service_id)),
            main.service_id,
        );
        let c = Connection {
            protocol: protocol_name(proto),
            client,
            frontend,
            backend,
            state: state_name(main.state),
            age_seconds: age.map(|a| a.as_secs_f64()),
            idle_seconds: Some(idle.as_secs_f64()),
            expires_in_seconds: left.map(|l| l.max(0) as f64 / 1e9),
            expired,
            service_id: sid,
            service: name,
            backend_id: main.backend_id,
            retries: original.map_or(0, |(_, e)| e.retries),
            entries: match (original, reply) {
                (Some(_), Some(_)) => "both",
                (Some(_), None) => "original only",
                _ => "reply only",
            },
        };
        if service_id.is_some_and(|id| id != c.service_id)
            || backend_filter.as_ref().is_some_and(|b| !b.matches(&c))
        {
            return;
        }
        if expired && !all {
            hidden += 1;
            return;
        }
        rows.push(c);
    };
    for (k, e) in &entries {
        if e.direction != ConnDirection::Original as u8 {
            continue;
        }
        let reply_key = FlowKey {
            src: e.nat_addr,
            dst: k.src,
            src_port_be: e.nat_port_be,
            dst_port_be: k.src_port_be,
            proto: k.proto,
            family: k.family,
            _pad: [0; 2],
        };
        let reply = entries
            .get_key_value(&reply_key)
            .filter(|(_, r)| r.direction == ConnDirection::Reply as u8);
        if let Some((rk, _)) = reply {
            paired_replies.insert(*rk);
        }
        add(Some((k, e)), reply);
    }
    for (k, e) in &entries {
        if e.direction == ConnDirection::Reply as u8 && !paired_replies.contains(k) {
            add(None, Some((k, e)));
        }
    }
    if agent_reachable {
        for c in tls_forwarded(common.admin) {
            let sid = services
                .iter()
                .find(|(_, (f, _))| f.split('/').next() == Some(c.frontend.as_str()))
                .map_or(0, |(id, _)| *id);
            let row = Connection {
                protocol: "TCP".into(),
                client: c.client,
                frontend: c.frontend,
                backend: c.backend,
                state: "TLS FORWARDED",
                age_seconds: Some(c.age_seconds),
                idle_seconds: None,
                expires_in_seconds: None,
                expired: false,
                service_id: sid,
                service: c.service,
                backend_id: 0,
                retries: 0,
                entries: "forwarder",
            };
            let wanted = service_id.is_none_or(|id| id == row.service_id)
                && backend_filter.as_ref().is_none_or(|b| b.matches(&row));
            if wanted {
                rows.push(row);
            }
        }
    }
    rows.sort_by(|a, b| {
        (a.service_id, &a.backend, &a.client).cmp(&(b.service_id, &b.backend, &b.client))
    });
    if common.output == Output::Json {
        return print_json(&rows);
    }
    let mut t = Table::new(&[
        "PROTO",
        "CLIENT",
        "FRONTEND",
        "BACKEND",
        "STATE",
        "AGE",
        "IDLE",
        "EXPIRES IN",
        "SERVICE",
    ]);
    for c in &rows {
        let mut state = c.state.to_string();
        if c.expired {
            state.push_str(" (expired)");
        }
        if c.retries > 0 {
            state.push_str(&format!(" (re-steered {}x)", c.retries));
        }
        if c.entries != "both" && c.entries != "forwarder" {
            state.push_str(&format!(" ({})", c.entries));
        }
        t.row(vec![
            c.protocol.clone(),
            c.client.clone(),
            c.frontend.clone(),
            c.backend.clone(),
            state,
            c.age_seconds
                .map_or("-".into(), |s| duration(Duration::from_secs_f64(s))),
            c.idle_seconds
                .map_or("-".into(), |s| duration(Duration::from_secs_f64(s))),
            c.expires_in_seconds
                .map_or("-".into(), |s| duration(Duration::from_secs_f64(s))),
            c.service.clone(),
        ]);
    }
    let mut out = if rows.is_empty() {
        "no tracked connections\n".to_string()
    } else {
        t.render("")
    };
    if hidden > 0 {
        out.push_str(&format!(
            "{hidden} connections past their idle timeout not shown (--all shows them)\n"
        ));
    }
    print(&out)
}
