//! `lb stats`: the data plane's counters (summed over CPUs), traffic per service and per
//! backend.

use anyhow::Result;
use serde::Serialize;

use super::{
    print, print_json,
    table::{bytes, Table},
    view::{ask_agent, ip, snapshot, state_name, Traffic},
    Common, Output, Pins,
};

#[derive(Serialize)]
struct CounterRow {
    name: &'static str,
    /// verdict (exactly one per packet) or event (on top).
    kind: &'static str,
    value: u64,
}

#[derive(Serialize)]
struct ServiceRow {
    id: u32,
    frontend: String,
    name: Option<String>,
    #[serde(flatten)]
    traffic: Traffic,
}

#[derive(Serialize)]
struct BackendRow {
    id: u32,
    address: String,
    state: &'static str,
    service_id: Option<u32>,
    frontend: Option<String>,
    #[serde(flatten)]
    traffic: Traffic,
}

#[derive(Serialize)]
struct Stats {
    counters: Vec<CounterRow>,
    services: Vec<ServiceRow>,
    backends: Vec<BackendRow>,
}

fn traffic_cells(t: &Traffic) -> Vec<String> {
    vec![
        t.packets.to_string(),
        bytes(t.bytes),
        t.new_connections.to_string(),
        t.handshakes.to_string(),
        t.http_ok.to_string(),
        t.http_5xx.to_string(),
    ]
}

const TRAFFIC_HEADER: [&str; 6] = [
    "PACKETS",
    "BYTES",
    "NEW CONNECTIONS",
    "HANDSHAKES",
    "HTTP OK",
    "HTTP 5XX",
];

pub fn stats(common: &Common) -> Result<()> {
    let pins = Pins::open(&common.pin_dir)?;
    let agent = ask_agent(common.admin);
    let snapshot = snapshot(&pins, &agent)?;
    let counters: Vec<CounterRow> = pins
        .counters()?
        .into_iter()
        .map(|(c, value)| {
            let name = c.label();
            CounterRow {
                name,
                kind: if name.starts_with("event_") {
                    "event"
                } else {
                    "verdict"
                },
                value,
            }
        })
        .collect();
    let services: Vec<ServiceRow> = snapshot
        .services
        .iter()
        .map(|s| ServiceRow {
            id: s.id,
            frontend: s.frontend.clone(),
            name: s.name.clone(),
            traffic: s.traffic,
        })
        .collect();
    let mut backends: Vec<BackendRow> = snapshot
        .services
        .iter()
        .flat_map(|s| {
            s.backends.iter().map(|b| BackendRow {
                id: b.id,
                address: b.address.clone(),
                state: b.state,
                service_id: Some(s.id),
                frontend: Some(s.frontend.clone()),
                traffic: b.traffic,
            })
        })
        .chain(snapshot.other_backends.iter().map(|b| BackendRow {
            id: b.id,
            address: b.address.clone(),
            state: b.state,
            service_id: None,
            frontend: None,
            traffic: b.traffic,
        }))
        .collect();
    // Backends removed since (id cleared) whose traffic is still counted.
    let listed: std::collections::BTreeSet<u32> = backends.iter().map(|b| b.id).collect();
    let all_backends = pins.backends()?;
    for (id, t) in pins.backend_stats()?.into_iter().enumerate() {
        let id = id as u32;
        if id != 0 && !listed.contains(&id) && t.packets > 0 {
            let b = all_backends.get(id as usize).copied().unwrap_or_default();
            backends.push(BackendRow {
                id,
                address: format!("{}:{}", ip(&b.addr), u16::from_be(b.port_be)),
                state: state_name(b.state),
                service_id: None,
                frontend: None,
                traffic: t.into(),
            });
        }
    }
    backends.sort_by_key(|b| b.id);
    let stats = Stats {
        counters,
        services,
        backends,
    };
    if common.output == Output::Json {
        return print_json(&stats);
    }
    let mut out = String::new();
    for (title, kind) in [
        ("Verdicts (one per packet)", "verdict"),
        ("Events", "event"),
    ] {
        let mut t = Table::new(&["COUNTER", "VALUE"]);
        for c in stats.counters.iter().filter(|c| c.kind == kind) {
            t.row(vec![c.name.to_string(), c.value.to_string()]);
        }
        out.push_str(&format!("{title}\n{}\n", t.render("  ")));
    }
    let mut header = vec!["ID", "FRONTEND", "SERVICE"];
    header.extend(TRAFFIC_HEADER);
    let mut t = Table::new(&header);
    for s in &stats.services {
        let mut row = vec![
            s.id.to_string(),
            s.frontend.clone(),
            s.name.clone().unwrap_or_else(|| "-".into()),
        ];
        row.extend(traffic_cells(&s.traffic));
        t.row(row);
    }
    out.push_str(&format!("Services\n{}\n", t.render("  ")));
    let mut header = vec!["ID", "BACKEND", "STATE", "FRONTEND"];
    header.extend(TRAFFIC_HEADER);
    let mut t = Table::new(&header);
    for b in &stats.backends {
        let mut row = vec![
            b.id.to_string(),
            b.address.clone(),
            b.state.to_string(),
            b.frontend.clone().unwrap_or_else(|| "-".into()),
        ];
        row.extend(traffic_cells(&b.traffic));
        t.row(row);
    }
    out.push_str(&format!("Backends\n{}", t.render("  ")));
    print(&out)
}
