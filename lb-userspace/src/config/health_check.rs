//! lb's `HealthCheck` document: active health checks of a host's endpoints, in Envoy's
//! model (Istio has no resource for them). Endpoints outside a cluster have no readiness
//! probe; a check is how lb learns that one is down before a client's connection fails.
//!
//! ```yaml
//! apiVersion: lb/v1alpha1
//! kind: HealthCheck
//! metadata: { name: mydb }
//! spec:
//!   host: mydb.com              # a ServiceEntry host, or NAME.NAMESPACE.svc.DOMAIN
//!   port: 80                    # only this service port (default: every port)
//!   http: { path: /healthz, host: mydb.com, expectedStatuses: [200, "300-399"] }
//!   # or tcp: {} (the connection is opened, nothing sent)
//!   interval: 5s
//!   intervalJitter: 1s
//!   timeout: 1s
//!   unhealthyThreshold: 2       # failures in a row that make an endpoint unhealthy
//!   healthyThreshold: 1         # successes in a row that make it healthy again
//! ```

use std::time::Duration;

use serde_json::{Map, Value};

use super::diagnostics::{field, item, Doc};
use crate::model::{HealthCheck, HealthCheckKind};

/// What one HealthCheck document contributes: the host it applies to, the port (all when
/// absent) and the check.
pub(super) struct HealthCheckDocument {
    pub host: String,
    pub port: Option<u16>,
    pub check: HealthCheck,
}

pub(super) fn read(doc: &mut Doc, root: &Map<String, Value>) -> Option<HealthCheckDocument> {
    let errors_before = doc.error_count();
    for (key, value) in root {
        match key.as_str() {
            "apiVersion" | "kind" => {}
            "metadata" => {
                let _ = doc.object("metadata", value);
            }
            "spec" => {}
            _ => doc.unknown_field(key),
        }
    }
    let Some(spec) = root.get("spec") else {
        doc.missing("spec", "the host and the check");
        return None;
    };
    let spec = doc.object("spec", spec)?;
    let mut host = None;
    let mut port = None;
    let mut kind = None;
    let mut check = HealthCheck::default();
    for (key, value) in spec {
        let path = field("spec", key);
        match key.as_str() {
            "host" => host = doc.string(&path, value),
            "port" => port = doc.port(&path, value),
            "tcp" => {
                if doc.object(&path, value).is_some() {
                    set_kind(doc, &path, &mut kind, HealthCheckKind::Tcp);
                }
            }
            "http" => {
                if let Some(http) = read_http(doc, &path, value) {
                    set_kind(doc, &path, &mut kind, http);
                }
            }
            "interval" => {
                if let Some(d) = duration(doc, &path, value) {
                    check.interval = d;
                }
            }
            "intervalJitter" => {
                if let Some(d) = super::native::lb_duration(doc, &path, value) {
                    check.interval_jitter = d;
                }
            }
            "timeout" => {
                if let Some(d) = duration(doc, &path, value) {
                    check.timeout = d;
                }
            }
            "unhealthyThreshold" => {
                if let Some(n) = doc.integer_in(&path, value, 1, 1000) {
                    check.unhealthy_threshold = n as u32;
                }
            }
            "healthyThreshold" => {
                if let Some(n) = doc.integer_in(&path, value, 1, 1000) {
                    check.healthy_threshold = n as u32;
                }
            }
            _ => doc.unknown_field(&path),
        }
    }
    if host.is_none() && !spec.contains_key("host") {
        doc.missing("spec.host", "the host whose endpoints are checked");
    }
    match kind {
        Some(k) => check.kind = k,
        None if !spec.contains_key("tcp") && !spec.contains_key("http") => {
            doc.missing("spec.tcp", "a check: tcp: {} or http: { path: ... }")
        }
        None => {}
    }
    if check.timeout >= check.interval {
        doc.error(
            "spec.timeout",
            format!(
                "{:?} is not shorter than the interval ({:?}): checks would overlap",
                check.timeout, check.interval
            ),
        );
    }
    if doc.error_count() > errors_before {
        return None;
    }
    Some(HealthCheckDocument {
        host: host?.to_ascii_lowercase(),
        port,
        check,
    })
}

fn set_kind(doc: &mut Doc, path: &str, kind: &mut Option<HealthCheckKind>, new: HealthCheckKind) {
    if kind.is_some() {
        doc.error(path, "one check per document: tcp or http, not both");
    } else {
        *kind = Some(new);
    }
}

fn read_http(doc: &mut Doc, at: &str, value: &Value) -> Option<HealthCheckKind> {
    let map = doc.object(at, value)?;
    let mut path = None;
    let mut host = None;
    let mut statuses = Vec::new();
    for (key, value) in map {
        let p = field(at, key);
        match key.as_str() {
            "path" => {
                path = doc.string(&p, value);
                if path.as_deref().is_some_and(|s| !s.starts_with('/')) {
                    doc.error(&p, "a path starts with /");
                }
            }
            "host" => host = doc.string(&p, value),
            "expectedStatuses" => {
                for (i, v) in doc.list(&p, value).unwrap_or_default().iter().enumerate() {
                    if let Some(range) = status_range(doc, &item(&p, i), v) {
                        statuses.push(range);
                    }
                }
            }
            _ => doc.unknown_field(&p),
        }
    }
    if !map.contains_key("path") {
        doc.missing(&field(at, "path"), "the path the check GETs");
    }
    if statuses.is_empty() {
        // Envoy's default: 200 only.
        statuses.push((200, 200));
    }
    Some(HealthCheckKind::Http {
        path: path?,
        host,
        expected_statuses: statuses,
    })
}

/// `200`, or `"200-399"` (both ends included).
fn status_range(doc: &mut Doc, path: &str, value: &Value) -> Option<(u16, u16)> {
    let range = match value {
        Value::Number(n) => n.as_u64().map(|n| (n, n)),
        Value::String(s) => s.split_once('-').and_then(|(a, b)| {
            Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?))
        }),
        _ => None,
    };
    match range {
        Some((a, b)) if (100..=599).contains(&a) && (a..=599).contains(&b) => {
            Some((a as u16, b as u16))
        }
        _ => {
            doc.error(
                path,
                format!(
                    "{} is not a status (100-599) or a range of them (\"200-399\")",
                    super::diagnostics::describe(value)
                ),
            );
            None
        }
    }
}

/// A duration greater than zero.
fn duration(doc: &mut Doc, path: &str, value: &Value) -> Option<Duration> {
    let d = super::native::lb_duration(doc, path, value)?;
    if d.is_zero() {
        doc.error(path, "must be greater than zero");
        return None;
    }
    Some(d)
}
