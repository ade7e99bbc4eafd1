//! lb's own documents: the original configuration format (top-level `dataplane:` and
//! `services:`, no `kind`) and the `lb/v1alpha1` `Node` document. Unlike Istio resources,
//! every field here is lb's, so a field lb does not know is an error (a typo), not a warning.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use lb_common::{BackendState, DataplaneConfig};
use serde_json::{Map, Value};

use super::diagnostics::{describe, field, item, Doc};
use crate::{
    dataplane::{DataplaneOptions, Frontend, Protocol},
    model::{Endpoint, Locality, Node, Service, Source, TrafficPolicy},
};

pub(super) const API_VERSION: &str = "lb/v1alpha1";

/// What one document in the original format contributes.
#[derive(Default)]
pub(super) struct NativeDocument {
    pub dataplane: Option<DataplaneOptions>,
    /// Each service with the path that defined it (`services[0] (web)`), for messages.
    pub services: Vec<(String, Service)>,
    /// Backends configured `draining` or `ejected` (active ones are not listed).
    pub initial_states: BTreeMap<(Frontend, Ipv4Addr, u16), BackendState>,
}

pub(super) fn read_native(doc: &mut Doc, root: &Map<String, Value>) -> NativeDocument {
    let mut out = NativeDocument::default();
    for (key, value) in root {
        match key.as_str() {
            "dataplane" => out.dataplane = Some(read_dataplane(doc, "dataplane", value)),
            "services" => {
                let Some(items) = doc.list("services", value) else {
                    continue;
                };
                for (i, s) in items.iter().enumerate() {
                    if let Some((path, service, states)) = read_service(doc, i, s) {
                        out.initial_states.extend(states);
                        out.services.push((path, service));
                    }
                }
            }
            _ => doc.unknown_field(&field("", key)),
        }
    }
    out
}

/// The `dataplane` section (native `dataplane:` or Node `spec.dataplane`): map sizes and
/// timeouts fixed when the programs load. Fields left out keep their defaults.
pub(super) fn read_dataplane(doc: &mut Doc, path: &str, value: &Value) -> DataplaneOptions {
    let mut options = DataplaneOptions::default();
    let Some(map) = doc.object(path, value) else {
        return options;
    };
    for (key, value) in map {
        let at = field(path, key);
        let slot = match key.as_str() {
            "max_services" => &mut options.max_services,
            "max_backends" => &mut options.max_backends,
            "table_slots" => &mut options.table_slots,
            "max_connections" => &mut options.max_connections,
            "max_affinity" => &mut options.max_affinity,
            "connect_retries" => &mut options.timeouts.connect_retries,
            "timeouts" => {
                read_timeouts(doc, &at, value, &mut options.timeouts);
                continue;
            }
            _ => {
                doc.unknown_field(&at);
                continue;
            }
        };
        if let Some(n) = doc.u32(&at, value) {
            *slot = n;
        }
    }
    let retries = options.timeouts.connect_retries;
    if retries > lb_common::config::MAX_CONNECT_RETRIES {
        doc.error(
            &field(path, "connect_retries"),
            format!(
                "{retries} is more than {} re-steers per connection attempt",
                lb_common::config::MAX_CONNECT_RETRIES
            ),
        );
    }
    options
}

fn read_timeouts(doc: &mut Doc, path: &str, value: &Value, timeouts: &mut DataplaneConfig) {
    let Some(map) = doc.object(path, value) else {
        return;
    };
    for (key, value) in map {
        let at = field(path, key);
        let slot = match key.as_str() {
            "tcp_syn" => &mut timeouts.tcp_syn_timeout_ns,
            "tcp_established" => &mut timeouts.tcp_established_timeout_ns,
            "tcp_closing" => &mut timeouts.tcp_closing_timeout_ns,
            "udp" => &mut timeouts.udp_timeout_ns,
            _ => {
                doc.unknown_field(&at);
                continue;
            }
        };
        if let Some(ns) = timeout_ns(doc, &at, value) {
            *slot = ns;
        }
    }
}

/// lb's own durations are read by humantime (`30s`, `5m`, `6h`, `1h 30m`) as they always
/// were (its documents' durations all are: `dataplane.timeouts`, `HealthCheck`).
pub(super) fn lb_duration(doc: &mut Doc, path: &str, value: &Value) -> Option<Duration> {
    let text = doc.string(path, value)?;
    match humantime::parse_duration(&text) {
        Ok(d) => Some(d),
        Err(_) => {
            doc.error(
                path,
                format!("{text:?} is not a duration (e.g. 30s, 5m, 6h)"),
            );
            None
        }
    }
}

fn timeout_ns(doc: &mut Doc, path: &str, value: &Value) -> Option<u64> {
    let d = lb_duration(doc, path, value)?;
    if d.is_zero() {
        doc.error(path, "must be greater than zero");
        return None;
    }
    match u64::try_from(d.as_nanos()) {
        Ok(ns) => Some(ns),
        Err(_) => {
            doc.error(
                path,
                // A string: `lb_duration` read it.
                format!("{:?} is too long", value.as_str().unwrap_or_default()),
            );
            None
        }
    }
}

type BackendStates = Vec<((Frontend, Ipv4Addr, u16), BackendState)>;

fn read_service(
    doc: &mut Doc,
    index: usize,
    value: &Value,
) -> Option<(String, Service, BackendStates)> {
    let bare = item("services", index);
    let map = doc.object(&bare, value)?;
    // The name goes into every path below, so it is read first.
    let name = map.get("name").and_then(Value::as_str).unwrap_or_default();
    let at = if name.is_empty() {
        bare.clone()
    } else {
        format!("{bare} ({name})")
    };
    let errors_before = doc.error_count();
    let mut vip = None;
    let mut port = None;
    let mut protocol = Protocol::Tcp;
    let mut http = false;
    let mut backends: &[Value] = &[];
    for (key, value) in map {
        let path = field(&at, key);
        match key.as_str() {
            "name" => match value {
                Value::String(s) if !s.is_empty() => {}
                Value::String(_) | Value::Null => doc.error(&path, "must not be empty"),
                other => doc.error(&path, format!("must be a string, not {}", describe(other))),
            },
            "vip" => vip = ipv4(doc, &path, value),
            "port" => port = doc.port(&path, value),
            "protocol" => match doc.string(&path, value).as_deref() {
                None => {}
                Some("TCP" | "tcp") => protocol = Protocol::Tcp,
                Some("UDP" | "udp") => protocol = Protocol::Udp,
                // Cleartext HTTP/1.x over TCP: response statuses feed outlier detection.
                Some("HTTP" | "http") => http = true,
                Some(other) => doc.error(
                    &path,
                    format!("{other:?} is not supported (TCP, UDP or HTTP)"),
                ),
            },
            "backends" => backends = doc.list(&path, value).unwrap_or_default(),
            _ => doc.unknown_field(&path),
        }
    }
    for (key, why) in [
        ("name", "every service is named"),
        ("vip", "the address clients connect to"),
        ("port", "the port clients connect to"),
    ] {
        if !map.contains_key(key) {
            doc.missing(&field(&at, key), why);
        }
    }
    let mut endpoints = Vec::with_capacity(backends.len());
    for (j, b) in backends.iter().enumerate() {
        if let Some((endpoint, state)) = read_backend(doc, &item(&field(&at, "backends"), j), b) {
            endpoints.push((endpoint, state));
        }
    }
    if doc.error_count() > errors_before {
        return None;
    }
    let frontend = Frontend {
        vip: vip?,
        port: port?,
        protocol,
    };
    let mut states = Vec::new();
    let endpoints = endpoints
        .into_iter()
        .map(|(endpoint, state)| {
            if state != BackendState::Active {
                states.push(((frontend, endpoint.address, endpoint.port), state));
            }
            endpoint
        })
        .collect();
    Some((
        at,
        Service {
            name: name.to_string(),
            frontend,
            endpoints,
            named: Default::default(),
            policy: TrafficPolicy::default(),
            http,
            session_affinity: None,
            source: Source::Unknown,
        },
        states,
    ))
}

fn read_backend(doc: &mut Doc, at: &str, value: &Value) -> Option<(Endpoint, BackendState)> {
    let map = doc.object(at, value)?;
    let mut address = None;
    let mut port = None;
    let mut weight = 1;
    let mut state = BackendState::Active;
    for (key, value) in map {
        let path = field(at, key);
        match key.as_str() {
            "address" => address = ipv4(doc, &path, value),
            "port" => port = doc.port(&path, value),
            "weight" => weight = doc.u32(&path, value).unwrap_or(weight),
            "state" => match doc.string(&path, value).as_deref() {
                None | Some("active") => {}
                Some("draining") => state = BackendState::Draining,
                Some("ejected") => state = BackendState::Ejected,
                Some(other) => doc.error(
                    &path,
                    format!("{other:?} is not one of active, draining, ejected"),
                ),
            },
            _ => doc.unknown_field(&path),
        }
    }
    for (key, why) in [
        ("address", "the backend's IPv4 address"),
        ("port", "the backend's port"),
    ] {
        if !map.contains_key(key) {
            doc.missing(&field(at, key), why);
        }
    }
    Some((
        Endpoint {
            address: address?,
            port: port?,
            locality: Locality::default(),
            labels: crate::model::no_labels(),
            weight,
            hostname: None,
        },
        state,
    ))
}

fn ipv4(doc: &mut Doc, path: &str, value: &Value) -> Option<Ipv4Addr> {
    let text = doc.string(path, value)?;
    match text.parse() {
        Ok(addr) => Some(addr),
        Err(_) => {
            doc.error(path, format!("{text:?} is not an IPv4 address"));
            None
        }
    }
}

/// What the `Node` document contributes.
pub(super) struct NodeDocument {
    pub node: Node,
    pub dataplane: Option<DataplaneOptions>,
}

/// Istio's per-workload override, `region.zone.subzone`.
const ISTIO_LOCALITY_LABEL: &str = "istio-locality";

/// `apiVersion: lb/v1alpha1`, `kind: Node`: where this node is (`spec.locality`, or the
/// topology labels in `spec.labels`), its labels (for `failoverPriority`), and optionally
/// `spec.dataplane`.
pub(super) fn read_node(doc: &mut Doc, root: &Map<String, Value>) -> NodeDocument {
    let mut out = NodeDocument {
        node: Node::default(),
        dataplane: None,
    };
    let mut locality = None;
    for (key, value) in root {
        match key.as_str() {
            "apiVersion" | "kind" => {}
            "metadata" => {
                let Some(meta) = doc.object("metadata", value) else {
                    continue;
                };
                for (k, v) in meta {
                    let path = field("metadata", k);
                    match k.as_str() {
                        "name" => {
                            doc.string(&path, v);
                        }
                        _ => doc.unknown_field(&path),
                    }
                }
            }
            "spec" => {
                let Some(spec) = doc.object("spec", value) else {
                    continue;
                };
                for (k, v) in spec {
                    let path = field("spec", k);
                    match k.as_str() {
                        "locality" => locality = doc.string(&path, v),
                        "labels" => out.node.labels = doc.string_map(&path, v).unwrap_or_default(),
                        "dataplane" => out.dataplane = Some(read_dataplane(doc, &path, v)),
                        _ => doc.unknown_field(&path),
                    }
                }
            }
            _ => doc.unknown_field(&field("", key)),
        }
    }
    out.node.locality = match locality {
        Some(text) => Locality::parse(&text),
        None => locality_from_labels(&out.node.labels),
    };
    out
}

fn locality_from_labels(labels: &BTreeMap<String, String>) -> Locality {
    match labels.get(ISTIO_LOCALITY_LABEL) {
        Some(l) => Locality::from_istio_label(l),
        None => Locality::from_topology_labels(labels),
    }
}

/// A document in the original format has no `kind` or `apiVersion`; one that has a `spec` or
/// `metadata` is a resource that lost them, and is reported as such.
pub(super) fn looks_native(root: &Map<String, Value>) -> bool {
    ["kind", "apiVersion", "spec", "metadata"]
        .iter()
        .all(|key| !root.contains_key(*key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{diagnostics::Report, diagnostics::UnknownFields};

    fn node(spec: &str) -> (Node, Report) {
        let text = format!("apiVersion: lb/v1alpha1\nkind: Node\nspec:\n{spec}");
        let value: Value = serde_saphyr::from_str(&text).expect("valid YAML");
        let mut report = Report::default();
        let mut doc = Doc::new("n".into(), UnknownFields::Reject, &mut report);
        let out = read_node(&mut doc, value.as_object().expect("a mapping"));
        (out.node, report)
    }

    #[test]
    fn node_locality_comes_from_spec_or_from_topology_labels() {
        let (n, r) = node("  locality: region1/zone1/sub1\n");
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(n.locality.to_string(), "region1/zone1/sub1");

        let (n, _) = node(
            "  labels:\n    topology.kubernetes.io/region: us-east1\n    failure-domain.beta.kubernetes.io/zone: us-east1-b\n",
        );
        assert_eq!(n.locality.to_string(), "us-east1/us-east1-b/");
        assert_eq!(n.labels.len(), 2);

        let (n, _) = node("  labels:\n    istio-locality: region1.zone2\n");
        assert_eq!(n.locality.to_string(), "region1/zone2/");
    }

    #[test]
    fn unknown_node_fields_are_errors() {
        let (_, r) = node("  localty: region1\n");
        assert_eq!(r.errors, ["n: spec.localty: unknown field"]);
    }
}
