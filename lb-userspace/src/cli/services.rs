//! `lb services` (as `cilium service list`) and `lb endpoints` (as `istioctl proxy-config
//! endpoints`).

use anyhow::Result;
use serde::Serialize;

use super::{
    fail, print, print_json,
    table::{percent, Table},
    view::{ask_agent, snapshot, BackendView, ServiceView, Snapshot},
    Common, Output, Pins, EXIT_ERROR,
};

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// A locality, `-` when it has no part (`//`).
fn locality(l: Option<&str>) -> String {
    match l {
        Some(l) if !l.trim_matches('/').is_empty() => l.trim_end_matches('/').to_string(),
        _ => "-".to_string(),
    }
}

/// Notes and disagreements under a table.
fn notes(snapshot: &Snapshot, services: &[&ServiceView]) -> String {
    let mut out = String::new();
    for s in services {
        for n in &s.notes {
            out.push_str(&format!("note: {}: {n}\n", s.frontend));
        }
        for b in &s.backends {
            if let Some(d) = &b.disagreement {
                out.push_str(&format!(
                    "note: {} backend {}: {d}\n",
                    s.frontend, b.address
                ));
            }
        }
    }
    for n in &snapshot.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out
}

fn mark(b: &BackendView) -> &'static str {
    if b.disagreement.is_some() {
        " (!)"
    } else {
        ""
    }
}

pub fn services(common: &Common) -> Result<()> {
    let pins = Pins::open(&common.pin_dir)?;
    let agent = ask_agent(common.admin);
    let snapshot = snapshot(&pins, &agent)?;
    if common.output == Output::Json {
        return print_json(&snapshot);
    }
    let mut out = String::new();
    if snapshot.services.is_empty() {
        out.push_str("no services in the data plane\n");
    }
    for s in &snapshot.services {
        let mut head = format!("{:<4}{}", s.id, s.frontend);
        if let Some(name) = &s.name {
            head.push_str(&format!("  {name}"));
        }
        if let Some(source) = &s.source {
            head.push_str(&format!("  [{source}]"));
        }
        head.push_str(&format!(
            "  table {} slots, failover list {}",
            s.table_slots,
            s.failover_list.len()
        ));
        if let Some(loads) = &s.priority_loads {
            let loads: Vec<String> = loads.iter().map(|l| format!("{l}%")).collect();
            head.push_str(&format!(", priority loads [{}]", loads.join(" ")));
        }
        if s.http {
            head.push_str(", HTTP");
        }
        if let Some(secs) = s.session_affinity_seconds {
            head.push_str(&format!(", session affinity {secs}s"));
        }
        out.push_str(&head);
        out.push('\n');
        let mut t = Table::new(&[
            "BACKEND",
            "STATE",
            "SLOTS",
            "PRIORITY",
            "LOCALITY",
            "SHARE",
            "CONNECTIONS",
        ]);
        for b in &s.backends {
            let share = b.agent.as_ref().map(|a| percent(a.share));
            t.row(vec![
                format!("{} => {}", b.id, b.address),
                format!("({}){}", b.state, mark(b)),
                format!("{} ({})", b.slots, percent(b.table_share)),
                opt(b.agent.as_ref().and_then(|a| a.priority)),
                locality(b.agent.as_ref().map(|a| a.locality.as_str())),
                opt(share),
                b.traffic.new_connections.to_string(),
            ]);
        }
        if t.len() == 0 {
            out.push_str("    no backends\n");
        } else {
            out.push_str(&t.render("    "));
        }
    }
    if !snapshot.other_backends.is_empty() {
        out.push_str("backends of no service in the maps\n");
        let mut t = Table::new(&["BACKEND", "STATE", "CONNECTIONS"]);
        for b in &snapshot.other_backends {
            t.row(vec![
                format!("{} => {}", b.id, b.address),
                format!("({})", b.state),
                b.traffic.new_connections.to_string(),
            ]);
        }
        out.push_str(&t.render("    "));
    }
    let all: Vec<&ServiceView> = snapshot.services.iter().collect();
    out.push_str(&notes(&snapshot, &all));
    print(&out)
}

/// One row of `lb endpoints`.
#[derive(Serialize)]
struct EndpointRow {
    endpoint: String,
    /// HEALTHY, UNHEALTHY (ejected) or DRAINING, from the backends map.
    status: &'static str,
    /// OK or FAILED (ejected by outlier detection or an operator).
    outlier_check: &'static str,
    /// OK or FAILED under an active health check (a HealthCheck document), else absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    health_check: Option<&'static str>,
    cluster: String,
    service_id: u32,
    frontend: String,
    backend_id: u32,
    priority: Option<u32>,
    locality: Option<String>,
    share: Option<f64>,
    /// New connections the data plane gave it.
    connections: u64,
    /// Errors: the agent's `rq_error` when it has `GET /clusters` (5xx responses, refused,
    /// timed-out and reset connections), else the HTTP 5xx responses the data plane
    /// counted.
    errors: u64,
    errors_source: &'static str,
    disagreement: Option<String>,
}

pub fn endpoints(common: &Common, service: Option<&str>) -> Result<()> {
    let pins = Pins::open(&common.pin_dir)?;
    let agent = ask_agent(common.admin);
    let snapshot = snapshot(&pins, &agent)?;
    let chosen: Vec<&ServiceView> = snapshot
        .services
        .iter()
        .filter(|s| service.is_none_or(|name| s.matches(name)))
        .collect();
    if let Some(name) = service {
        if chosen.is_empty() {
            let hint = if snapshot.agent_reachable {
                ""
            } else {
                " (names need the agent; VIP:PORT works without it)"
            };
            return Err(fail(
                EXIT_ERROR,
                format!("no service {name:?} in the data plane{hint}"),
            ));
        }
    }
    let mut rows = Vec::new();
    for s in &chosen {
        let cluster = s.cluster();
        for b in &s.backends {
            let ejected_by_agent = b.agent.as_ref().map(|a| a.ejected);
            let status = match b.state {
                "active" => "HEALTHY",
                "draining" => "DRAINING",
                _ => "UNHEALTHY",
            };
            let outlier_failed = ejected_by_agent.unwrap_or(b.state == "ejected");
            let agent_errors = b.agent.as_ref().and_then(|a| a.errors);
            let (errors, errors_source) = match agent_errors {
                Some(e) => (e, "agent"),
                None => (b.traffic.http_5xx, "http_5xx"),
            };
            rows.push(EndpointRow {
                endpoint: b.address.clone(),
                status,
                outlier_check: if outlier_failed { "FAILED" } else { "OK" },
                health_check: b
                    .agent
                    .as_ref()
                    .and_then(|a| a.health_check.as_deref())
                    .map(|v| if v == "failing" { "FAILED" } else { "OK" }),
                cluster: cluster.clone(),
                service_id: s.id,
                frontend: s.frontend.clone(),
                backend_id: b.id,
                priority: b.agent.as_ref().and_then(|a| a.priority),
                locality: b
                    .agent
                    .as_ref()
                    .map(|a| locality(Some(&a.locality)))
                    .filter(|l| l != "-"),
                share: b.agent.as_ref().map(|a| a.share),
                connections: b.traffic.new_connections,
                errors,
                errors_source,
                disagreement: b.disagreement.clone(),
            });
        }
    }
    if common.output == Output::Json {
        return print_json(&rows);
    }
    // The HEALTH CHECK column only when some endpoint is under an active health check.
    let checked = rows.iter().any(|r| r.health_check.is_some());
    let mut header = vec!["ENDPOINT", "STATUS", "OUTLIER CHECK"];
    if checked {
        header.push("HEALTH CHECK");
    }
    header.extend(["CLUSTER", "PRIORITY", "LOCALITY", "CONNECTIONS", "ERRORS"]);
    let mut t = Table::new(&header);
    for r in &rows {
        let mut cells = vec![
            r.endpoint.clone(),
            format!(
                "{}{}",
                r.status,
                if r.disagreement.is_some() { " (!)" } else { "" }
            ),
            r.outlier_check.to_string(),
        ];
        if checked {
            cells.push(r.health_check.unwrap_or("-").to_string());
        }
        cells.extend([
            r.cluster.clone(),
            opt(r.priority),
            locality(r.locality.as_deref()),
            r.connections.to_string(),
            r.errors.to_string(),
        ]);
        t.row(cells);
    }
    let mut out = t.render("");
    out.push_str(&notes(&snapshot, &chosen));
    print(&out)
}
