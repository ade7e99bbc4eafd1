//! The agent's configuration file (YAML).
//!
//! ```yaml
//! dataplane:                 # optional; sizes and timeouts fixed at load
//!   max_services: 256
//!   max_backends: 4096
//!   table_slots: 4096
//!   max_connections: 262144
//!   timeouts: { tcp_syn: 60s, tcp_established: 6h, tcp_closing: 10s, udp: 60s }
//! services:
//!   - name: web
//!     vip: 10.96.0.10
//!     port: 80
//!     protocol: TCP          # TCP (default) or UDP
//!     backends:
//!       - { address: 10.200.1.2, port: 8080, weight: 1, state: active }
//! ```
//!
//! Unknown fields are errors, and every error names the field and what is wrong with it.

use std::{net::Ipv4Addr, path::Path, time::Duration};

use anyhow::{bail, Context as _, Result};
use lb_common::{BackendState, DataplaneConfig};
use serde::Deserialize;

use crate::dataplane::{
    sync::{DesiredBackend, DesiredService},
    DataplaneOptions, Frontend, Protocol,
};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    dataplane: RawDataplane,
    #[serde(default)]
    services: Vec<RawService>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataplane {
    max_services: Option<u32>,
    max_backends: Option<u32>,
    table_slots: Option<u32>,
    max_connections: Option<u32>,
    #[serde(default)]
    timeouts: RawTimeouts,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    tcp_syn: Option<String>,
    tcp_established: Option<String>,
    tcp_closing: Option<String>,
    udp: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    vip: String,
    port: u16,
    protocol: Option<String>,
    #[serde(default)]
    backends: Vec<RawBackend>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: String,
    port: u16,
    weight: Option<u32>,
    state: Option<String>,
}

/// A validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub dataplane: DataplaneOptions,
    pub services: Vec<DesiredService>,
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading configuration {}", path.display()))?;
    parse(&text).with_context(|| format!("configuration {}", path.display()))
}

/// Parses and validates configuration text.
pub fn parse(text: &str) -> Result<Config> {
    let raw: RawConfig = if text.trim().is_empty() {
        RawConfig::default()
    } else {
        serde_saphyr::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?
    };
    let defaults = DataplaneOptions::default();
    let d = raw.dataplane;
    let t = d.timeouts;
    let dataplane = DataplaneOptions {
        max_services: d.max_services.unwrap_or(defaults.max_services),
        max_backends: d.max_backends.unwrap_or(defaults.max_backends),
        table_slots: d.table_slots.unwrap_or(defaults.table_slots),
        max_connections: d.max_connections.unwrap_or(defaults.max_connections),
        timeouts: DataplaneConfig {
            tcp_syn_timeout_ns: duration(
                "dataplane.timeouts.tcp_syn",
                &t.tcp_syn,
                defaults.timeouts.tcp_syn_timeout_ns,
            )?,
            tcp_established_timeout_ns: duration(
                "dataplane.timeouts.tcp_established",
                &t.tcp_established,
                defaults.timeouts.tcp_established_timeout_ns,
            )?,
            tcp_closing_timeout_ns: duration(
                "dataplane.timeouts.tcp_closing",
                &t.tcp_closing,
                defaults.timeouts.tcp_closing_timeout_ns,
            )?,
            udp_timeout_ns: duration(
                "dataplane.timeouts.udp",
                &t.udp,
                defaults.timeouts.udp_timeout_ns,
            )?,
        },
    };
    let services = raw
        .services
        .into_iter()
        .enumerate()
        .map(|(i, s)| service(i, s))
        .collect::<Result<Vec<_>>>()?;
    Ok(Config {
        dataplane,
        services,
    })
}

fn duration(field: &str, value: &Option<String>, default_ns: u64) -> Result<u64> {
    let Some(v) = value else {
        return Ok(default_ns);
    };
    let d: Duration = humantime::parse_duration(v)
        .with_context(|| format!("{field}: {v:?} is not a duration (e.g. 30s, 5m, 6h)"))?;
    if d.is_zero() {
        bail!("{field}: must be greater than zero");
    }
    u64::try_from(d.as_nanos()).with_context(|| format!("{field}: {v:?} is too long"))
}

fn service(i: usize, s: RawService) -> Result<DesiredService> {
    let at = format!("services[{i}] ({})", s.name);
    if s.name.is_empty() {
        bail!("services[{i}].name: must not be empty");
    }
    let vip: Ipv4Addr = s
        .vip
        .parse()
        .with_context(|| format!("{at}.vip: {:?} is not an IPv4 address", s.vip))?;
    if s.port == 0 {
        bail!("{at}.port: must be 1-65535");
    }
    let protocol = match s.protocol.as_deref().unwrap_or("TCP") {
        "TCP" | "tcp" => Protocol::Tcp,
        "UDP" | "udp" => Protocol::Udp,
        other => bail!("{at}.protocol: {other:?} is not supported (TCP or UDP)"),
    };
    let backends = s
        .backends
        .into_iter()
        .enumerate()
        .map(|(j, b)| backend(&format!("{at}.backends[{j}]"), b))
        .collect::<Result<Vec<_>>>()?;
    Ok(DesiredService {
        name: s.name,
        frontend: Frontend {
            vip,
            port: s.port,
            protocol,
        },
        backends,
    })
}

fn backend(at: &str, b: RawBackend) -> Result<DesiredBackend> {
    let addr: Ipv4Addr = b
        .address
        .parse()
        .with_context(|| format!("{at}.address: {:?} is not an IPv4 address", b.address))?;
    if b.port == 0 {
        bail!("{at}.port: must be 1-65535");
    }
    let state = match b.state.as_deref().unwrap_or("active") {
        "active" => BackendState::Active,
        "draining" => BackendState::Draining,
        "ejected" => BackendState::Ejected,
        other => bail!("{at}.state: {other:?} is not one of active, draining, ejected"),
    };
    Ok(DesiredBackend {
        addr,
        port: b.port,
        weight: b.weight.unwrap_or(1),
        state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
dataplane:
  max_connections: 1024
  timeouts: { udp: 5s }
services:
  - name: web
    vip: 10.96.0.10
    port: 80
    backends:
      - { address: 10.200.1.2, port: 8080 }
      - { address: 10.200.2.2, port: 8080, weight: 3, state: draining }
  - name: dns
    vip: 10.96.0.10
    port: 53
    protocol: UDP
    backends: []
"#;

    #[test]
    fn parses_services_and_dataplane_settings() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.dataplane.max_connections, 1024);
        assert_eq!(c.dataplane.timeouts.udp_timeout_ns, 5_000_000_000);
        assert_eq!(
            c.dataplane.max_services,
            DataplaneOptions::default().max_services
        );
        assert_eq!(c.services.len(), 2);
        let web = &c.services[0];
        assert_eq!(web.frontend.to_string(), "10.96.0.10:80/TCP");
        assert_eq!(web.backends[0].weight, 1);
        assert_eq!(web.backends[0].state, BackendState::Active);
        assert_eq!(web.backends[1].weight, 3);
        assert_eq!(web.backends[1].state, BackendState::Draining);
        assert_eq!(c.services[1].frontend.protocol, Protocol::Udp);
    }

    #[test]
    fn errors_name_the_field_and_the_problem() {
        let cases = [
            (
                GOOD.replace(
                    "vip: 10.96.0.10\n    port: 80",
                    "vip: 10.96.0.300\n    port: 80",
                ),
                "services[0] (web).vip",
            ),
            (
                GOOD.replace("protocol: UDP", "protocol: SCTP"),
                "services[1] (dns).protocol",
            ),
            (
                GOOD.replace("state: draining", "state: sleepy"),
                "services[0] (web).backends[1].state",
            ),
            (
                GOOD.replace("udp: 5s", "udp: soon"),
                "dataplane.timeouts.udp",
            ),
            (GOOD.replace("udp: 5s", "udp: 0s"), "dataplane.timeouts.udp"),
            (
                GOOD.replace("port: 8080 }", "port: 0 }"),
                "services[0] (web).backends[0].port",
            ),
            (
                GOOD.replace("max_connections", "max_conections"),
                "max_conections",
            ),
        ];
        for (text, field) in cases {
            let err = format!("{:#}", parse(&text).unwrap_err());
            assert!(err.contains(field), "error {err:?} does not name {field}");
        }
    }

    #[test]
    fn empty_file_is_an_empty_configuration() {
        let c = parse("").unwrap();
        assert!(c.services.is_empty());
    }
}
