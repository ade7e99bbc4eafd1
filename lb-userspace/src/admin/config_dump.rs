//! `GET /config_dump`: the configuration in force as the agent reads it (Istio's defaults
//! filled in, the node's locality override applied), with what the locality plan makes of
//! each endpoint, where it was read from and when it was applied.

use std::time::Duration;

use lb_common::BackendState;
use serde_json::{json, Value};

use super::{
    clusters::cluster_name,
    snapshot::{unix_seconds, ServiceSnapshot, Snapshot},
};
use crate::{
    dataplane::Protocol,
    model::{Locality, LocalityLbSetting, OutlierDetection},
};

fn duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn locality(l: &Locality) -> Value {
    json!({ "region": l.region, "zone": l.zone, "subzone": l.subzone })
}

fn outlier_detection(o: &OutlierDetection) -> Value {
    json!({
        "consecutive_5xx_errors": o.consecutive_5xx_errors,
        "consecutive_gateway_errors": o.consecutive_gateway_errors,
        "split_external_local_origin_errors": o.split_external_local_origin_errors,
        "consecutive_local_origin_failures": o.consecutive_local_origin_failures,
        "interval": duration(o.interval),
        "base_ejection_time": duration(o.base_ejection_time),
        "max_ejection_time": duration(o.max_ejection_time),
        "max_ejection_percent": o.max_ejection_percent,
        "min_health_percent": o.min_health_percent,
    })
}

fn locality_lb(l: &LocalityLbSetting) -> Value {
    json!({
        "enabled": l.enabled,
        "failover": l.failover.iter()
            .map(|f| json!({ "from": f.from, "to": f.to }))
            .collect::<Vec<_>>(),
        "failover_priority": l.failover_priority,
        "distribute": l.distribute.iter()
            .map(|d| json!({ "from": d.from, "to": d.to }))
            .collect::<Vec<_>>(),
    })
}

fn service(svc: &ServiceSnapshot) -> Value {
    let s = &svc.service;
    let endpoints: Vec<Value> = s
        .endpoints
        .iter()
        .zip(&svc.endpoints)
        .enumerate()
        .map(|(i, (e, snap))| {
            let mut v = json!({
                "address": snap.address.to_string(),
                "locality": locality(&e.locality),
                "labels": &*e.labels,
                "hostname": e.hostname.as_deref(),
                "weight": e.weight,
                "priority": svc.plan.priorities.get(i).copied().flatten(),
                "share": svc.plan.shares.get(i).copied().unwrap_or(0.0),
            });
            if let Some(state) = snap.configured {
                v["state"] = match state {
                    BackendState::Draining => "draining",
                    BackendState::Ejected => "ejected",
                    _ => "active",
                }
                .into();
            }
            v
        })
        .collect();
    json!({
        "name": s.name,
        "cluster": cluster_name(s.frontend.port, &s.name),
        "frontend": {
            "vip": s.frontend.vip.to_string(),
            "port": s.frontend.port,
            "protocol": match s.frontend.protocol {
                Protocol::Tcp => "TCP",
                Protocol::Udp => "UDP",
            },
        },
        "http": s.http,
        "source": { "kind": s.source.kind(), "name": s.source.to_string() },
        "session_affinity_seconds": s.session_affinity.map(|d| d.as_secs()),
        // `null`: the DestinationRule has none; only operator actions eject.
        "outlier_detection": s.policy.outlier_detection.as_ref().map(outlier_detection),
        "locality_lb": s.policy.locality_lb.as_ref().map(locality_lb),
        "priority_loads": svc.plan.loads.load,
        "priority_panic": svc.plan.loads.panic,
        "endpoints": endpoints,
    })
}

pub fn json(snapshot: &Snapshot) -> Value {
    let d = &snapshot.dataplane;
    let t = &d.timeouts;
    json!({
        "config_paths": snapshot.config_paths,
        "loaded_at": humantime::format_rfc3339_seconds(snapshot.reloads.loaded_at).to_string(),
        "loaded_at_unix": unix_seconds(snapshot.reloads.loaded_at),
        "reloads": {
            "succeeded": snapshot.reloads.succeeded,
            "failed": snapshot.reloads.failed,
            "last_error": snapshot.reloads.last_error,
        },
        "node": {
            "locality": locality(&snapshot.node.locality),
            "labels": snapshot.node.labels,
        },
        "dataplane": {
            "max_services": d.max_services,
            "max_backends": d.max_backends,
            "table_slots": d.table_slots,
            "max_connections": d.max_connections,
            "max_affinity": d.max_affinity,
            "connect_retries": t.connect_retries,
            "timeouts": {
                "tcp_syn": duration(Duration::from_nanos(t.tcp_syn_timeout_ns)),
                "tcp_established": duration(Duration::from_nanos(t.tcp_established_timeout_ns)),
                "tcp_closing": duration(Duration::from_nanos(t.tcp_closing_timeout_ns)),
                "udp": duration(Duration::from_nanos(t.udp_timeout_ns)),
            },
        },
        // Where the data plane is attached, and whether the node forwards IPv4 arriving
        // there (without it, balanced packets cannot be forwarded).
        "interfaces": snapshot.interfaces.iter().map(|(name, mode)| json!({
            "name": name,
            "mode": crate::interfaces::mode_name(*mode),
            "ipv4_forwarding": crate::interfaces::ipv4_forwarding(name),
            // Whether XDP can redirect packets out of it (else the stack forwards them).
            "xdp_redirect_target": snapshot.xdp_targets.contains(name),
        })).collect::<Vec<_>>(),
        // Every interface XDP redirects rewritten packets to.
        "xdp_redirect_targets": snapshot.xdp_targets,
        // Whether forwarded packets reuse the next hop found for their destination (off
        // with policy rules or multipath routes, or while routing changes are not followed).
        "nexthop_cache": snapshot.nexthop_cache,
        "services": snapshot.services.iter().map(service).collect::<Vec<_>>(),
        // What the sources said: objects left out, fields not acted on (each once).
        "warnings": snapshot.warnings,
        // The cluster source: sync, objects per kind, watch restarts, objects' problems.
        // Each name endpoints are known by: its addresses, when it was last resolved, and
        // whether its last lookup failed (the addresses are then an earlier answer's).
        "dns": snapshot.dns,
        // Actively checked endpoints: healthy or not, checks and failures, the last error.
        "health_checks": snapshot.health.iter().map(|((frontend, addr, port), status)| {
            let mut v = serde_json::to_value(status).unwrap_or_default();
            v["frontend"] = json!(frontend.to_string());
            v["endpoint"] = json!(format!("{addr}:{port}"));
            v
        }).collect::<Vec<_>>(),
        // TLS origination: per endpoint, connections forwarded, failed attempts (connect,
        // timeout, TLS errors by kind) and bytes; connections no backend could take.
        "tls_origination": snapshot.tls.as_ref().map(|t| {
            let endpoints = t.endpoints.lock().unwrap_or_else(|p| p.into_inner()).iter()
                .map(|(e, c)| (e.to_string(), serde_json::to_value(c).unwrap_or_default()))
                .collect::<serde_json::Map<_, _>>();
            json!({
                "endpoints": endpoints,
                "active": t.active.load(std::sync::atomic::Ordering::Relaxed),
                "unserved": t.unserved.load(std::sync::atomic::Ordering::Relaxed),
                "over_limit": t.over_limit.load(std::sync::atomic::Ordering::Relaxed),
                "idle_closed": t.idle_closed.load(std::sync::atomic::Ordering::Relaxed),
            })
        }),
        // `--dns-listen`: queries answered from lb's names, forwarded, malformed, dropped.
        "dns_responder": snapshot.dns_responder.as_deref(),
        "kubernetes": snapshot.cluster.as_ref().map(|c| {
            let mut status = serde_json::to_value(c.status()).unwrap_or_default();
            status["apply_error"] = json!(snapshot.cluster_apply_error);
            status
        }),
    })
}
