//! `lb check`: what a configuration does, without an agent: each service's frontend (an
//! allocated VIP included), each endpoint's priority and share of new connections, each
//! priority level's load and whether it is in panic, with the endpoints given by
//! `--unhealthy` taken as unhealthy. The what-if tool: "what happens to my traffic if
//! these go down", and Envoy's load-split cases checked against lb from outside.

use std::net::Ipv4Addr;

use anyhow::{bail, Result};
use serde_json::{json, Value};

use crate::{
    config::Config,
    locality::{self, Plan},
    model::Service,
};

/// An endpoint taken as unhealthy: an address, and a port (every port when absent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unhealthy {
    pub address: Ipv4Addr,
    pub port: Option<u16>,
}

impl std::str::FromStr for Unhealthy {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (address, port) = match text.split_once(':') {
            Some((a, p)) => (
                a,
                Some(
                    p.parse::<u16>()
                        .map_err(|_| format!("{text:?}: {p:?} is not a port"))?,
                ),
            ),
            None => (text, None),
        };
        let address = address
            .parse()
            .map_err(|_| format!("{text:?} is not ADDR or ADDR:PORT (IPv4)"))?;
        Ok(Self { address, port })
    }
}

impl Unhealthy {
    fn matches(&self, address: Ipv4Addr, port: u16) -> bool {
        self.address == address && self.port.is_none_or(|p| p == port)
    }
}

/// Each service of `config` with its plan, the `unhealthy` endpoints taken as unhealthy.
/// Fails when an `--unhealthy` endpoint is in no service (most likely a typo).
pub fn plans(config: &Config, unhealthy: &[Unhealthy]) -> Result<Vec<(Service, Plan)>> {
    for u in unhealthy {
        let known = config
            .services
            .iter()
            .any(|s| s.endpoints.iter().any(|e| u.matches(e.address, e.port)));
        if !known {
            bail!(
                "--unhealthy {}{}: no service has this endpoint",
                u.address,
                u.port.map(|p| format!(":{p}")).unwrap_or_default()
            );
        }
    }
    Ok(config
        .services
        .iter()
        .map(|s| {
            let healthy: Vec<bool> = s
                .endpoints
                .iter()
                .map(|e| !unhealthy.iter().any(|u| u.matches(e.address, e.port)))
                .collect();
            (s.clone(), locality::plan(&config.node, s, &healthy))
        })
        .collect())
}

/// The text report.
pub fn text(config: &Config, plans: &[(Service, Plan)], unhealthy: &[Unhealthy]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "node locality: {}", config.node.locality);
    for (s, plan) in plans {
        let _ = writeln!(out, "\n{}  {}", s.name, s.frontend);
        let _ = writeln!(out, "  {:<9} {:>5} {:>6}", "PRIORITY", "LOAD", "PANIC");
        for (p, load) in plan.loads.load.iter().enumerate() {
            let panic = plan.loads.panic.get(p).copied().unwrap_or(false);
            let _ = writeln!(
                out,
                "  {:<9} {:>4}% {:>6}",
                p,
                load,
                if panic { "yes" } else { "no" }
            );
        }
        let _ = writeln!(
            out,
            "  {:<22} {:<24} {:<9} {:>8} {:>7}",
            "ENDPOINT", "LOCALITY", "HEALTH", "PRIORITY", "SHARE"
        );
        for (i, e) in s.endpoints.iter().enumerate() {
            let priority = plan.priorities[i].map_or("-".to_string(), |p| p.to_string());
            let health = if unhealthy.iter().any(|u| u.matches(e.address, e.port)) {
                "unhealthy"
            } else {
                "healthy"
            };
            let _ = writeln!(
                out,
                "  {:<22} {:<24} {:<9} {:>8} {:>6.1}%",
                format!("{}:{}", e.address, e.port),
                e.locality.to_string(),
                health,
                priority,
                plan.shares[i] * 100.0
            );
        }
        for n in s.named.iter() {
            let _ = writeln!(
                out,
                "  {:<22} {:<24} resolved by the agent (resolution: DNS)",
                format!("{}:{}", n.hostname, n.port),
                n.locality.to_string(),
            );
        }
    }
    out
}

/// The report as JSON (`-o json`).
pub fn json(config: &Config, plans: &[(Service, Plan)], unhealthy: &[Unhealthy]) -> Value {
    let services: Vec<Value> = plans
        .iter()
        .map(|(s, plan)| {
            json!({
                "name": s.name,
                "frontend": s.frontend.to_string(),
                "priorities": plan.loads.load.iter().enumerate().map(|(p, load)| json!({
                    "priority": p,
                    "load_percent": load,
                    "panic": plan.loads.panic.get(p).copied().unwrap_or(false),
                })).collect::<Vec<_>>(),
                "endpoints": s.endpoints.iter().enumerate().map(|(i, e)| json!({
                    "address": format!("{}:{}", e.address, e.port),
                    "locality": e.locality.to_string(),
                    "healthy": !unhealthy.iter().any(|u| u.matches(e.address, e.port)),
                    "priority": plan.priorities[i],
                    "share": plan.shares[i],
                })).collect::<Vec<_>>(),
                "named_endpoints": s.named.iter().map(|n| json!({
                    "hostname": &*n.hostname,
                    "port": n.port,
                    "locality": n.locality.to_string(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "node_locality": config.node.locality.to_string(),
        "services": services,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = "apiVersion: lb/v1alpha1
kind: Node
spec: { locality: region1/zone1 }
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: hw }
spec:
  hosts: [hw.sample.svc.cluster.local]
  addresses: [10.96.0.10]
  ports: [{ number: 5000, name: tcp, protocol: TCP }]
  resolution: STATIC
  endpoints:
  - { address: 10.200.1.2, locality: region1/zone1 }
  - { address: 10.200.2.2, locality: region1/zone2 }
  - { address: 10.200.3.2, locality: region2/zone3 }
  - { address: 10.200.4.2, locality: region3/zone4 }
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: hw }
spec:
  host: hw.sample.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        enabled: true
        failover: [{ from: region1, to: region2 }]
    outlierDetection: { consecutive5xxErrors: 1 }
";

    fn loads(unhealthy: &[&str]) -> (Vec<u32>, Vec<bool>) {
        let config = crate::config::parse(SEED).unwrap();
        let unhealthy: Vec<Unhealthy> = unhealthy.iter().map(|u| u.parse().unwrap()).collect();
        let plans = plans(&config, &unhealthy).unwrap();
        let l = &plans[0].1.loads;
        (l.load.clone(), l.panic.clone())
    }

    /// The seed's levels from region1/zone1: all healthy, the first takes everything;
    /// its one endpoint down, the next level does; three of four down, the last healthy
    /// level takes it all (Envoy's priority load with overprovisioning 1.4).
    #[test]
    fn unhealthy_endpoints_move_the_load_as_envoy_would() {
        assert_eq!(loads(&[]).0, [100, 0, 0, 0]);
        assert_eq!(loads(&["10.200.1.2"]).0, [0, 100, 0, 0]);
        assert_eq!(loads(&["10.200.1.2:5000", "10.200.2.2"]).0, [0, 0, 100, 0]);
        assert_eq!(
            loads(&["10.200.1.2", "10.200.2.2", "10.200.3.2"]).0,
            [0, 0, 0, 100]
        );
        let config = crate::config::parse(SEED).unwrap();
        let err = plans(&config, &["10.200.9.9".parse().unwrap()]).unwrap_err();
        assert!(
            err.to_string().contains("no service has this endpoint"),
            "{err}"
        );
        assert!("10.200.1.2:http".parse::<Unhealthy>().is_err());
    }
}
