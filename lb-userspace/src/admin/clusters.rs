//! `GET /clusters`: what Envoy's admin endpoint prints for the same services under Istio,
//! so the commands and scripts operators already have read lb too.
//!
//! One cluster per service host and port, named as Istio names it
//! (`outbound|PORT||HOST`). Services that share a cluster name (a ServiceEntry with several
//! VIPs) are shown as one cluster, as Istio configures one: their endpoints' counters are
//! added up and a flag set in either shows. Endpoints that `distribute` gives no traffic
//! are left out, as Istio leaves them out of Envoy's cluster.
//!
//! Text (Envoy's `ClustersHandler::writeClustersAsText`): one fact per line,
//! `CLUSTER::outlier::...`, `CLUSTER::added_via_api::true`, then per endpoint
//! `CLUSTER::IP:PORT::NAME::VALUE` with its counters (by name), `hostname`, `health_flags`,
//! `weight`, `region`, `zone`, `sub_zone`, `canary`, `priority`, `success_rate`,
//! `local_origin_success_rate`. JSON (`?format=json`): Envoy's `admin.v3.Clusters`, with
//! proto3's JSON rules (zero values and empty strings left out, 64-bit counters as
//! strings).
//!
//! Counters, per endpoint:
//! - `cx_total`: new connections the data plane sent to it;
//! - `cx_connect_fail`: connect failures (refused, unreachable) reported to outlier detection;
//! - `rq_success`: HTTP responses below 500 (HTTP services) or completed handshakes (TCP);
//! - `rq_error`: failures that count as a 5xx for outlier detection (5xx responses, and
//!   refused, timed-out or reset connections, as Envoy's router charges them);
//! - `rq_total`: `rq_success + rq_error`.
//!
//! For a TLS-originating service (`trafficPolicy.tls`) the forwarder does this work:
//! `cx_total` counts its attempts (connects and handshakes, failed or not), `rq_success`
//! its successes, and each endpoint also shows the forwarder's own
//! counters, named as Envoy names a cluster's TLS and byte counters: `ssl.handshake`,
//! `ssl.connection_error`, `ssl.fail.KIND` (a failed handshake by kind:
//! `certificate_wrong_name`, `certificate_unknown_issuer`, ...), `cx_connect_timeout`,
//! `cx_rx_bytes_total`, `cx_tx_bytes_total`.
//!
//! `cx_active` (open connections) is not shown: counting it means walking the whole
//! connection table. Success-rate detection is not implemented, so `success_rate` and
//! `local_origin_success_rate` are `-1`, as Envoy prints them without enough data.
//!
//! Health flags: `/failed_outlier_check` while outlier detection holds the endpoint out;
//! `/failed_eds_health` while an operator (admin endpoint) or the configuration does (the
//! control plane saying "unhealthy", as Istio does through EDS); `/eds_status_draining`
//! while it is drained; `healthy` otherwise.

use std::{collections::BTreeMap, fmt::Write as _};

use serde_json::{json, Map, Value};

use super::snapshot::{EndpointSnapshot, ServiceSnapshot, Snapshot};

/// One endpoint of a cluster, merged over the services that share the cluster.
struct Host {
    address: std::net::SocketAddrV4,
    /// The name it was resolved from (empty for an endpoint given by address), and
    /// whether that name's last lookup failed (its address is from an earlier answer).
    hostname: String,
    stale: bool,
    region: String,
    zone: String,
    sub_zone: String,
    weight: u32,
    priority: u32,
    cx_connect_fail: u64,
    cx_total: u64,
    rq_error: u64,
    rq_success: u64,
    failed_active_hc: bool,
    failed_outlier_check: bool,
    failed_eds_health: bool,
    draining: bool,
    /// The TLS forwarder's counters, for a TLS-originating service's endpoint.
    tls: Option<crate::tls_origination::EndpointCounts>,
}

impl Host {
    fn new(svc: &ServiceSnapshot, i: usize, priority: u32) -> Self {
        let e = &svc.service.endpoints[i];
        Self {
            address: std::net::SocketAddrV4::new(e.address, e.port),
            hostname: e.hostname.as_deref().unwrap_or_default().to_string(),
            stale: false,
            region: e.locality.region.clone(),
            zone: e.locality.zone.clone(),
            sub_zone: e.locality.subzone.clone(),
            weight: e.weight,
            priority,
            cx_connect_fail: 0,
            cx_total: 0,
            rq_error: 0,
            rq_success: 0,
            failed_active_hc: false,
            failed_outlier_check: false,
            failed_eds_health: false,
            draining: false,
            tls: None,
        }
    }

    fn add(
        &mut self,
        svc: &ServiceSnapshot,
        e: &EndpointSnapshot,
        tls: Option<&crate::tls_origination::Counts>,
    ) {
        if let Some(counts) = tls.filter(|_| svc.service.policy.tls.is_some()) {
            // The forwarder's attempts, and its successes (it reports only the first
            // after a failure to outlier detection).
            let c = counts.of(e.address);
            self.cx_total += c.attempts();
            self.rq_success += c.successes;
            self.tls = Some(c);
        }
        self.cx_connect_fail += e.status.totals.cx_connect_fail;
        self.cx_total += e.stats.new_connections;
        self.rq_error += e.status.totals.rq_error;
        self.rq_success += if svc.service.http {
            e.stats.http_ok
        } else {
            e.stats.handshakes
        };
        self.failed_outlier_check |= e.outlier_ejected();
        self.failed_eds_health |= e.operator_ejected();
        self.draining |= e.draining();
    }

    /// Counters by name, as Envoy sorts them in the text output.
    fn stats(&self) -> Vec<(String, u64)> {
        let mut stats: Vec<(String, u64)> = [
            ("cx_connect_fail", self.cx_connect_fail),
            ("cx_total", self.cx_total),
            ("rq_error", self.rq_error),
            ("rq_success", self.rq_success),
            ("rq_total", self.rq_success + self.rq_error),
        ]
        .map(|(name, value)| (name.to_string(), value))
        .into();
        if let Some(tls) = &self.tls {
            stats.extend([
                ("cx_connect_timeout".to_string(), tls.timeouts),
                ("cx_rx_bytes_total".to_string(), tls.bytes_received),
                ("cx_tx_bytes_total".to_string(), tls.bytes_sent),
                ("ssl.handshake".to_string(), tls.connections),
                (
                    "ssl.connection_error".to_string(),
                    tls.tls_errors.values().sum(),
                ),
            ]);
            stats.extend(
                tls.tls_errors
                    .iter()
                    .map(|(kind, n)| (format!("ssl.fail.{kind}"), *n)),
            );
            stats.sort();
        }
        stats
    }

    /// Envoy's `HostUtility::healthFlagsToString`, flags in Envoy's order.
    fn health_flags(&self) -> String {
        let mut flags = String::new();
        if self.failed_active_hc {
            flags.push_str("/failed_active_hc");
        }
        if self.failed_outlier_check {
            flags.push_str("/failed_outlier_check");
        }
        if self.failed_eds_health {
            flags.push_str("/failed_eds_health");
        }
        if self.draining {
            flags.push_str("/eds_status_draining");
        }
        if flags.is_empty() {
            flags.push_str("healthy");
        }
        flags
    }
}

struct Cluster {
    name: String,
    /// Whether any of its services has outlier detection configured.
    outlier_detection: bool,
    hosts: Vec<Host>,
}

/// Istio's name for the outbound cluster of `host` on `port`.
pub fn cluster_name(port: u16, host: &str) -> String {
    format!("outbound|{port}||{host}")
}

fn clusters(snapshot: &Snapshot) -> Vec<Cluster> {
    let mut clusters: Vec<Cluster> = Vec::new();
    let mut by_name: BTreeMap<String, usize> = BTreeMap::new();
    for svc in &snapshot.services {
        let name = cluster_name(svc.service.frontend.port, &svc.service.name);
        let index = *by_name.entry(name.clone()).or_insert_with(|| {
            clusters.push(Cluster {
                name,
                outlier_detection: false,
                hosts: Vec::new(),
            });
            clusters.len() - 1
        });
        let cluster = &mut clusters[index];
        cluster.outlier_detection |= svc.service.policy.outlier_detection.is_some();
        for (i, e) in svc.endpoints.iter().enumerate() {
            let Some(priority) = svc.plan.priorities.get(i).copied().flatten() else {
                continue;
            };
            let host = match cluster.hosts.iter().position(|h| h.address == e.address) {
                Some(h) => &mut cluster.hosts[h],
                None => {
                    let mut host = Host::new(svc, i, priority);
                    host.stale = snapshot.dns.get(&host.hostname).is_some_and(|a| a.stale);
                    host.failed_active_hc = snapshot
                        .health
                        .get(&(svc.service.frontend, *e.address.ip(), e.address.port()))
                        .is_some_and(|s| !s.healthy);
                    cluster.hosts.push(host);
                    cluster.hosts.last_mut().expect("just pushed")
                }
            };
            host.add(svc, e, snapshot.tls.as_deref());
        }
    }
    // Envoy lists a cluster's hosts by priority.
    for c in &mut clusters {
        c.hosts.sort_by_key(|h| h.priority);
    }
    clusters
}

/// Envoy's text output.
pub fn text(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    for c in clusters(snapshot) {
        let n = &c.name;
        if c.outlier_detection {
            for fact in [
                "success_rate_average",
                "success_rate_ejection_threshold",
                "local_origin_success_rate_average",
                "local_origin_success_rate_ejection_threshold",
            ] {
                let _ = writeln!(out, "{n}::outlier::{fact}::-1");
            }
        }
        let _ = writeln!(out, "{n}::added_via_api::true");
        for h in &c.hosts {
            let a = h.address;
            for (stat, value) in &h.stats() {
                let _ = writeln!(out, "{n}::{a}::{stat}::{value}");
            }
            let _ = writeln!(out, "{n}::{a}::hostname::{}", h.hostname);
            if h.stale {
                let _ = writeln!(out, "{n}::{a}::dns_stale::true");
            }
            let _ = writeln!(out, "{n}::{a}::health_flags::{}", h.health_flags());
            let _ = writeln!(out, "{n}::{a}::weight::{}", h.weight);
            let _ = writeln!(out, "{n}::{a}::region::{}", h.region);
            let _ = writeln!(out, "{n}::{a}::zone::{}", h.zone);
            let _ = writeln!(out, "{n}::{a}::sub_zone::{}", h.sub_zone);
            let _ = writeln!(out, "{n}::{a}::canary::false");
            let _ = writeln!(out, "{n}::{a}::priority::{}", h.priority);
            let _ = writeln!(out, "{n}::{a}::success_rate::-1");
            let _ = writeln!(out, "{n}::{a}::local_origin_success_rate::-1");
        }
    }
    out
}

/// Envoy's `?format=json` output (`admin.v3.Clusters`).
pub fn json(snapshot: &Snapshot) -> Value {
    let statuses: Vec<Value> = clusters(snapshot)
        .iter()
        .map(|c| {
            let hosts: Vec<Value> = c.hosts.iter().map(host_json).collect();
            json!({
                "name": c.name,
                "added_via_api": true,
                "host_statuses": hosts,
                "observability_name": c.name,
            })
        })
        .collect();
    json!({ "cluster_statuses": statuses })
}

fn host_json(h: &Host) -> Value {
    // proto3 JSON: a zero uint64 is left out, others are strings.
    let stats: Vec<Value> = h
        .stats()
        .iter()
        .map(|(name, value)| {
            let value = *value;
            if value == 0 {
                json!({ "name": name })
            } else {
                json!({ "name": name, "value": value.to_string() })
            }
        })
        .collect();
    let mut health = Map::new();
    if h.failed_outlier_check {
        health.insert("failed_outlier_check".into(), true.into());
    }
    let eds = if h.draining {
        "DRAINING"
    } else if h.failed_eds_health {
        "UNHEALTHY"
    } else {
        "HEALTHY"
    };
    health.insert("eds_health_status".into(), eds.into());
    let mut locality = Map::new();
    for (key, value) in [
        ("region", &h.region),
        ("zone", &h.zone),
        ("sub_zone", &h.sub_zone),
    ] {
        if !value.is_empty() {
            locality.insert(key.into(), value.as_str().into());
        }
    }
    let mut host = Map::new();
    host.insert(
        "address".into(),
        json!({ "socket_address": {
            "address": h.address.ip().to_string(),
            "port_value": h.address.port(),
        }}),
    );
    if !h.hostname.is_empty() {
        host.insert("hostname".into(), h.hostname.as_str().into());
    }
    host.insert("stats".into(), stats.into());
    host.insert("health_status".into(), health.into());
    if h.weight != 0 {
        host.insert("weight".into(), h.weight.into());
    }
    host.insert("locality".into(), locality.into());
    if h.priority != 0 {
        host.insert("priority".into(), h.priority.into());
    }
    host.into()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::{
        admin::{metrics::AgentMetrics, snapshot::ServiceSnapshot},
        agent::ReloadStatus,
        config,
        outlier::{Event, OutlierDetector},
    };

    /// A ServiceEntry with two VIPs (two lb services, one Istio cluster) and a rule whose
    /// `distribute` leaves one locality out.
    const CONFIG: &str = r#"apiVersion: lb/v1alpha1
kind: Node
spec:
  locality: r1/z1
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: db, namespace: ns }
spec:
  hosts: [db.example.com]
  addresses: [10.96.0.1, 10.96.0.2]
  ports: [{ number: 5432, name: tcp, protocol: TCP }]
  resolution: STATIC
  endpoints:
  - { address: 10.0.0.1, locality: r1/z1 }
  - { address: 10.0.0.2, locality: r1/z2, weight: 3 }
  - { address: 10.0.0.3, locality: r2/z3 }
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: db, namespace: ns }
spec:
  host: db.example.com
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        distribute:
        - from: r1/*
          to: { "r1/z1/*": 60, "r1/z2/*": 40 }
    outlierDetection: { consecutive5xxErrors: 1, maxEjectionPercent: 100 }
"#;

    /// The views of `CONFIG` after one 503 from 10.0.0.2 in the first VIP's service only,
    /// with `cx` new connections to each backend of each service.
    fn snapshot(cx: u64) -> Snapshot {
        let config = config::parse(CONFIG).unwrap();
        assert_eq!(config.services.len(), 2);
        let services = config
            .services
            .iter()
            .enumerate()
            .map(|(si, svc)| {
                let outlier = svc.policy.outlier_detection.clone().unwrap();
                let mut detector =
                    OutlierDetector::new(outlier.clone(), svc.endpoints.len(), Duration::ZERO);
                if si == 0 {
                    detector.record(1, Event::HttpStatus(503), Duration::ZERO);
                }
                let plan = crate::locality::plan(&config.node, svc, &detector.healthy());
                ServiceSnapshot {
                    service: svc.clone(),
                    outlier,
                    detector: detector.stats(),
                    plan,
                    stats: Default::default(),
                    endpoint_count: svc.endpoints.len(),
                    backend_totals: lb_common::TrafficStats {
                        new_connections: cx * svc.endpoints.len() as u64,
                        handshakes: cx * svc.endpoints.len() as u64,
                        ..Default::default()
                    },
                    endpoints: svc
                        .endpoints
                        .iter()
                        .enumerate()
                        .map(|(i, e)| super::super::snapshot::EndpointSnapshot {
                            address: std::net::SocketAddrV4::new(e.address, e.port),
                            status: detector.status(i).unwrap(),
                            configured: None,
                            stats: lb_common::TrafficStats {
                                new_connections: cx,
                                handshakes: cx,
                                ..Default::default()
                            },
                        })
                        .collect(),
                }
            })
            .collect();
        Snapshot {
            node: config.node.clone(),
            dataplane: config.dataplane.clone(),
            config_paths: Vec::new(),
            reloads: ReloadStatus {
                loaded_at: SystemTime::now(),
                succeeded: 0,
                failed: 0,
                last_error: None,
            },
            last_publish: None,
            publishes: 0,
            metrics: AgentMetrics::default(),
            services,
            counters: Vec::new(),
            interfaces: Vec::new(),
            xdp_targets: Vec::new(),
            nexthop_cache: false,
            cluster: None,
            cluster_apply_error: None,
            dns: Default::default(),
            dns_lookups: None,
            tls: None,
            dns_responder: None,
            health: Default::default(),
            warnings: Vec::new(),
        }
    }

    #[test]
    fn services_of_one_host_and_port_are_one_cluster() {
        let text = text(&snapshot(5));
        let cluster = "outbound|5432||db.example.com";
        let lines: Vec<&str> = text.lines().collect();
        // Every line is a fact of the one cluster.
        assert!(lines.iter().all(|l| l.starts_with(&format!("{cluster}::"))));
        assert!(lines.contains(&"outbound|5432||db.example.com::added_via_api::true"));
        let fact = |host: &str, fact: &str| -> Option<String> {
            let prefix = format!("{cluster}::{host}::{fact}::");
            lines
                .iter()
                .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
        };
        // Counters add up over both VIPs; the ejection in one shows.
        assert_eq!(fact("10.0.0.1:5432", "cx_total").as_deref(), Some("10"));
        assert_eq!(fact("10.0.0.1:5432", "rq_success").as_deref(), Some("10"));
        assert_eq!(fact("10.0.0.2:5432", "rq_error").as_deref(), Some("1"));
        assert_eq!(fact("10.0.0.2:5432", "rq_total").as_deref(), Some("11"));
        assert_eq!(
            fact("10.0.0.2:5432", "health_flags").as_deref(),
            Some("/failed_outlier_check")
        );
        assert_eq!(
            fact("10.0.0.1:5432", "health_flags").as_deref(),
            Some("healthy")
        );
        assert_eq!(fact("10.0.0.2:5432", "weight").as_deref(), Some("3"));
        assert_eq!(fact("10.0.0.2:5432", "zone").as_deref(), Some("z2"));
        // `distribute` gives r2/z3 no traffic: Istio leaves it out of the cluster.
        assert_eq!(fact("10.0.0.3:5432", "priority"), None);
        assert_eq!(
            lines.iter().filter(|l| l.ends_with("::hostname::")).count(),
            2
        );

        let j = json(&snapshot(0));
        let statuses = j["cluster_statuses"].as_array().unwrap();
        assert_eq!(statuses.len(), 1);
        let hosts = statuses[0]["host_statuses"].as_array().unwrap();
        assert_eq!(hosts.len(), 2);
        let h2 = &hosts[1];
        assert_eq!(h2["address"]["socket_address"]["address"], "10.0.0.2");
        assert_eq!(h2["health_status"]["failed_outlier_check"], true);
        // proto3 JSON: zero counters and priority 0 are left out.
        assert_eq!(h2["stats"][1], json!({ "name": "cx_total" }));
        assert_eq!(h2["stats"][2], json!({ "name": "rq_error", "value": "1" }));
        assert_eq!(h2.get("priority"), None);
    }

    #[test]
    fn metrics_exposition_is_well_formed() {
        let text = crate::admin::metrics::render(snapshot(7));
        assert!(text.ends_with("# EOF\n"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(series.starts_with("lb_"), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
        assert!(text.contains(
            "lb_endpoint_new_connections_total{service=\"db.example.com\",frontend=\"10.96.0.1:5432/TCP\",\
             endpoint=\"10.0.0.1:5432\",locality=\"r1/z1\",priority=\"0\"} 7"
        ));
        assert!(text.contains("lb_service_handshakes_total{service=\"db.example.com\",frontend=\"10.96.0.2:5432/TCP\"} 21"));
    }
}
