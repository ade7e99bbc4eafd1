//! Istio's `ServiceEntry` and `DestinationRule`, read as users write them for Istio
//! (`networking.istio.io/v1`, `v1beta1` and `v1alpha3` share one schema).
//!
//! What lb does with them:
//! - a ServiceEntry becomes one [`Service`] per (address, port). Without `spec.addresses`
//!   it gets a VIP allocated from Istio's auto-allocation range (see [`auto_vip`]); with
//!   `resolution: DNS` (or `DNS_ROUND_ROBIN`) an endpoint address may be a name, which the
//!   agent resolves (`sources::dns`), and without endpoints the hosts themselves are;
//! - a DestinationRule gives its `trafficPolicy` (locality load balancing and outlier
//!   detection) to the ServiceEntry whose host it names, chosen as Istio chooses: the exact
//!   host first, then the most specific wildcard (`*.example.com`, `*`); a short name
//!   (`helloworld`) is read as `helloworld.<rule namespace>.svc.cluster.local`. Where Istio
//!   takes the oldest of several equal rules, lb takes the first in load order, and warns.
//!
//! Fields lb does not act on are warnings naming the field; values Istio itself would refuse
//! are errors. <https://istio.io/latest/docs/reference/config/networking/service-entry/>,
//! <https://istio.io/latest/docs/reference/config/networking/destination-rule/>

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use serde_json::{Map, Value};

use super::diagnostics::{describe, field, item, Doc, Report};
use crate::{
    dataplane::{Frontend, Protocol},
    model::{
        Distribute, Endpoint, Failover, Locality, LocalityLbSetting, NamedEndpoint,
        OutlierDetection, Service, Source, TlsOrigination, TrafficPolicy,
    },
};

pub(super) const API_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// The namespace Kubernetes puts a resource in when its metadata names none.
pub(super) const DEFAULT_NAMESPACE: &str = "default";

const EXPORT_TO: &str = "lb applies every resource it reads to this node";

/// Reads the parts every Istio resource has (apiVersion, kind, metadata) and returns its
/// namespace and `spec`.
pub(super) fn read_envelope<'v>(
    doc: &mut Doc,
    root: &'v Map<String, Value>,
) -> Option<(String, &'v Map<String, Value>)> {
    let mut namespace = DEFAULT_NAMESPACE.to_string();
    let mut name_given = false;
    let mut spec = None;
    for (key, value) in root {
        match key.as_str() {
            "apiVersion" | "kind" => {}
            // Written by the control plane, not configuration (`kubectl get -o yaml` has it).
            "status" => {}
            "metadata" => {
                let Some(meta) = doc.object("metadata", value) else {
                    continue;
                };
                for (k, v) in meta {
                    let path = field("metadata", k);
                    match k.as_str() {
                        "name" => name_given = doc.string(&path, v).is_some(),
                        "namespace" => {
                            if let Some(ns) = doc.string(&path, v) {
                                namespace = ns;
                            }
                        }
                        // The rest of Kubernetes' object metadata describes the object, not
                        // its traffic.
                        "labels"
                        | "annotations"
                        | "uid"
                        | "resourceVersion"
                        | "generation"
                        | "creationTimestamp"
                        | "managedFields"
                        | "ownerReferences"
                        | "finalizers"
                        | "selfLink"
                        | "generateName"
                        | "deletionTimestamp"
                        | "deletionGracePeriodSeconds" => {}
                        _ => doc.unknown_field(&path),
                    }
                }
            }
            "spec" => spec = doc.object("spec", value),
            _ => doc.unknown_field(&field("", key)),
        }
    }
    if !name_given {
        doc.missing("metadata.name", "Kubernetes names every resource");
    }
    if spec.is_none() && root.get("spec").is_none_or(Value::is_null) {
        doc.missing("spec", "the resource has no content");
    }
    Some((namespace, spec?))
}

/// What one ServiceEntry contributes.
pub(super) struct ServiceEntry {
    pub hosts: Vec<String>,
    /// Each service with the fields that made it (`spec.addresses[0], spec.ports[1]`).
    pub services: Vec<(String, Service)>,
    /// No `spec.addresses`: the services' VIP is [`auto_vip`]'s for the first host, given
    /// when every resource is read (two hosts may want the same one).
    pub auto_vip: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Resolution {
    Static,
    Dns,
    /// One of a name's addresses at a time.
    DnsRoundRobin,
}

/// The range Istio allocates ServiceEntry VIPs from (its DNS proxy's auto-allocation).
pub const AUTO_VIP_RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(240, 240, 0, 0), 16);

/// The VIP `host` gets when its ServiceEntry has no `spec.addresses`, the `attempt`-th
/// choice (0 first; the next is taken when an earlier host has it): a hash of the host
/// into [`AUTO_VIP_RANGE`], without its network and broadcast addresses. The same host
/// gets the same VIP across reloads and restarts, whatever other hosts exist, unless its
/// hash meets another's.
pub fn auto_vip(host: &str, attempt: u32) -> Ipv4Addr {
    // FNV-1a: small, stable across versions and platforms (unlike std's hasher).
    let mut hash: u32 = 0x811c_9dc5;
    for b in host.to_ascii_lowercase().bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let (base, prefix) = AUTO_VIP_RANGE;
    let size = 1u32 << (32 - prefix);
    let usable = size - 2;
    let offset = 1 + (hash.wrapping_add(attempt)) % usable;
    Ipv4Addr::from(u32::from(base) + offset)
}

/// Where an endpoint is: an address, or a name the agent resolves.
enum EntryAddress {
    Ip(Ipv4Addr),
    Name(String),
}

struct Port {
    path: String,
    name: String,
    number: u16,
    protocol: Protocol,
    /// HTTP or TLS: Istio can tell several hosts on this port apart (by Host header or SNI).
    names_the_host: bool,
    /// Cleartext HTTP/1.x: response statuses feed outlier detection.
    http: bool,
    target_port: Option<u16>,
}

struct EntryEndpoint {
    path: String,
    address: EntryAddress,
    ports: BTreeMap<String, u16>,
    locality: Locality,
    labels: BTreeMap<String, String>,
    weight: u32,
}

pub(super) fn read_service_entry(doc: &mut Doc, spec: &Map<String, Value>) -> Option<ServiceEntry> {
    let errors_before = doc.error_count();
    let mut hosts = Vec::new();
    let mut vips = Vec::new();
    let mut ports = Vec::new();
    let mut resolution_text = None;
    let mut endpoint_values: &[Value] = &[];
    let mut workload_selector = false;
    for (key, value) in spec {
        let path = field("spec", key);
        match key.as_str() {
            "hosts" => hosts = read_hosts(doc, &path, value),
            "addresses" => vips = read_addresses(doc, &path, value),
            "ports" => ports = read_ports(doc, &path, value),
            "resolution" => resolution_text = doc.string(&path, value),
            "location" => match doc.string(&path, value).as_deref() {
                None | Some("MESH_EXTERNAL" | "MESH_INTERNAL") => {}
                Some(other) => doc.error(
                    &path,
                    format!("{other:?} is not MESH_EXTERNAL or MESH_INTERNAL"),
                ),
            },
            "endpoints" => endpoint_values = doc.list(&path, value).unwrap_or_default(),
            "workloadSelector" => {
                workload_selector = true;
                doc.ignored(
                    &path,
                    "lb does not discover workloads: list them in spec.endpoints",
                );
            }
            "exportTo" => doc.ignored(&path, EXPORT_TO),
            "subjectAltNames" => doc.ignored(
                &path,
                "lb forwards connections and does not verify TLS identities",
            ),
            _ => doc.unknown_field(&path),
        }
    }

    if hosts.is_empty() {
        doc.missing("spec.hosts", "a ServiceEntry names at least one host");
    }
    let resolution = read_resolution(doc, resolution_text.as_deref());
    let auto_vip = vips.is_empty() && !spec.contains_key("addresses");
    if auto_vip {
        // A placeholder: `Reader::finish` gives the VIP, knowing every other one.
        vips.push(("an allocated VIP".to_string(), Ipv4Addr::UNSPECIFIED));
    } else if vips.is_empty() {
        doc.error(
            "spec.addresses",
            "no IPv4 address: lb balances connections to a VIP, so a ServiceEntry needs at \
             least one IPv4 address",
        );
    }
    let no_ports = |v: &Value| v.is_null() || v.as_array().is_some_and(Vec::is_empty);
    if spec.get("ports").is_none_or(no_ports) {
        doc.missing("spec.ports", "the ports clients connect to");
    }
    // Istio refuses this too: on a plain TCP port nothing tells the hosts apart.
    if hosts.len() > 1 && ports.iter().any(|p| !p.names_the_host) {
        doc.error(
            "spec.hosts",
            "several hosts on a port that is not HTTP or TLS: Istio refuses this, as nothing \
             tells the hosts apart",
        );
    }

    let port_names: BTreeSet<&str> = ports.iter().map(|p| p.name.as_str()).collect();
    let mut endpoints = Vec::new();
    for (i, value) in endpoint_values.iter().enumerate() {
        let path = item("spec.endpoints", i);
        if let Some(e) = read_endpoint(doc, &path, value, &port_names, resolution) {
            endpoints.push(e);
        }
    }
    if endpoint_values.is_empty() {
        match resolution {
            // Istio resolves the hosts themselves.
            Some(Resolution::Dns | Resolution::DnsRoundRobin) => {
                for (i, host) in hosts.iter().enumerate() {
                    if host.starts_with("*.") {
                        doc.error(
                            &item("spec.hosts", i),
                            format!(
                                "{host:?} is a wildcard: with resolution DNS and no endpoints \
                                 the hosts are resolved, and a wildcard cannot be"
                            ),
                        );
                        continue;
                    }
                    endpoints.push(EntryEndpoint {
                        path: item("spec.hosts", i),
                        address: EntryAddress::Name(host.clone()),
                        ports: BTreeMap::new(),
                        locality: Locality::default(),
                        labels: BTreeMap::new(),
                        weight: 1,
                    });
                }
            }
            Some(Resolution::Static) if !workload_selector => doc.warn(
                "spec.endpoints",
                "none listed: new connections to this service are dropped",
            ),
            _ => {}
        }
    }

    let one_at_a_time = resolution == Some(Resolution::DnsRoundRobin);
    let per_port = endpoints_per_port(doc, &ports, &endpoints, one_at_a_time);
    if doc.error_count() > errors_before {
        return None;
    }
    let name = hosts.first().cloned().unwrap_or_default();
    let mut services = Vec::with_capacity(vips.len() * ports.len());
    for (vip_path, vip) in &vips {
        for (port, (endpoints, named)) in ports.iter().zip(&per_port) {
            services.push((
                format!("{vip_path}, {}", port.path),
                Service {
                    name: name.clone(),
                    frontend: Frontend {
                        vip: *vip,
                        port: port.number,
                        protocol: port.protocol,
                    },
                    endpoints: endpoints.clone().into(),
                    named: named.clone().into(),
                    policy: TrafficPolicy::default(),
                    http: port.http,
                    session_affinity: None,
                    source: Source::Unknown,
                },
            ));
        }
    }
    Some(ServiceEntry {
        hosts,
        services,
        auto_vip,
    })
}

fn read_resolution(doc: &mut Doc, text: Option<&str>) -> Option<Resolution> {
    match text {
        None | Some("NONE") => {
            doc.error(
                "spec.resolution",
                format!(
                    "{} forwards each connection to the address the client asked for, \
                     with no balancing: lb balances over endpoints, use STATIC \
                     (or DNS with IP endpoints)",
                    if text.is_some() {
                        "NONE"
                    } else {
                        "not set: Istio's default, NONE,"
                    }
                ),
            );
            None
        }
        Some("STATIC") => Some(Resolution::Static),
        Some("DNS") => Some(Resolution::Dns),
        Some("DNS_ROUND_ROBIN") => Some(Resolution::DnsRoundRobin),
        Some(other) => {
            doc.error(
                "spec.resolution",
                format!("{other:?} is not one of NONE, STATIC, DNS, DNS_ROUND_ROBIN"),
            );
            None
        }
    }
}

/// The endpoints of each service port. An endpoint's port for service port P is its own
/// `ports[P.name]`, else P's `targetPort`, else P's number.
/// Of each port: the endpoints given by address, and those given by name.
type PortEndpoints = (Vec<Endpoint>, Vec<NamedEndpoint>);

fn endpoints_per_port(
    doc: &mut Doc,
    ports: &[Port],
    endpoints: &[EntryEndpoint],
    one_at_a_time: bool,
) -> Vec<PortEndpoints> {
    let mut per_port = Vec::with_capacity(ports.len());
    for port in ports {
        let mut seen: BTreeMap<(String, u16), &str> = BTreeMap::new();
        let (mut list, mut named) = (Vec::new(), Vec::new());
        for e in endpoints {
            let target = e
                .ports
                .get(&port.name)
                .copied()
                .or(port.target_port)
                .unwrap_or(port.number);
            let shown = match &e.address {
                EntryAddress::Ip(a) => a.to_string(),
                EntryAddress::Name(n) => n.clone(),
            };
            // Two entries for one backend would collapse into one in the data plane.
            if let Some(first) = seen.insert((shown.clone(), target), &e.path) {
                doc.error(
                    &e.path,
                    format!(
                        "{shown}:{target} (port {}) is already {first}: list each endpoint once",
                        port.name
                    ),
                );
            }
            let labels: std::sync::Arc<BTreeMap<String, String>> = if e.labels.is_empty() {
                crate::model::no_labels()
            } else {
                e.labels.clone().into()
            };
            match &e.address {
                EntryAddress::Ip(address) => list.push(Endpoint {
                    address: *address,
                    port: target,
                    locality: e.locality.clone(),
                    labels,
                    weight: e.weight,
                    hostname: None,
                }),
                EntryAddress::Name(name) => named.push(NamedEndpoint {
                    hostname: name.as_str().into(),
                    port: target,
                    locality: e.locality.clone(),
                    labels,
                    weight: e.weight,
                    one_at_a_time,
                }),
            }
        }
        per_port.push((list, named));
    }
    per_port
}

fn read_hosts(doc: &mut Doc, path: &str, value: &Value) -> Vec<String> {
    let hosts = doc.string_list(path, value).unwrap_or_default();
    for (i, h) in hosts.iter().enumerate() {
        if h == "*" || h.is_empty() {
            doc.error(
                &item(path, i),
                format!("{h:?} is not a host name (Istio refuses it in a ServiceEntry)"),
            );
        }
    }
    hosts
}

/// The VIPs: IPv4 addresses, or /32 prefixes (Istio accepts CIDR blocks here). IPv6 addresses
/// are skipped with a warning, so a dual-stack entry still works over IPv4.
fn read_addresses(doc: &mut Doc, path: &str, value: &Value) -> Vec<(String, Ipv4Addr)> {
    let mut vips = Vec::new();
    for (i, text) in doc
        .string_list(path, value)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let at = item(path, i);
        let (addr_text, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text.as_str(), None),
        };
        match (addr_text.parse::<IpAddr>(), prefix) {
            (Ok(IpAddr::V4(vip)), None | Some("32")) => vips.push((at, vip)),
            (Ok(IpAddr::V4(_)), Some(p)) if p.parse::<u8>().is_ok_and(|p| p < 32) => doc.error(
                &at,
                format!(
                    "{text:?} is a range of addresses: lb balances connections to one VIP, \
                     give a single address (or /32)"
                ),
            ),
            (Ok(IpAddr::V6(_)), _) => doc.warn(
                &at,
                format!("{text:?} is IPv6, which lb does not balance yet: skipped"),
            ),
            _ => doc.error(&at, format!("{text:?} is not an IP address")),
        }
    }
    vips
}

/// Istio's protocol names (case-insensitive, as Istio reads them). lb balances connections,
/// so UDP stays UDP and every other protocol is carried over TCP.
/// Also says whether the port carries cleartext HTTP/1.x, whose status lines lb reads
/// (HTTP2 and gRPC frame their status in binary headers; HTTPS and TLS are encrypted).
fn protocol(name: &str) -> Option<(Protocol, bool, bool)> {
    match name.to_ascii_uppercase().as_str() {
        "UDP" => Some((Protocol::Udp, false, false)),
        "TCP" | "MONGO" | "MYSQL" | "REDIS" => Some((Protocol::Tcp, false, false)),
        "HTTP" | "HTTP_PROXY" => Some((Protocol::Tcp, true, true)),
        "HTTP2" | "GRPC" | "GRPC-WEB" | "HTTPS" | "TLS" => Some((Protocol::Tcp, true, false)),
        _ => None,
    }
}

fn read_ports(doc: &mut Doc, path: &str, value: &Value) -> Vec<Port> {
    let mut ports: Vec<Port> = Vec::new();
    for (i, value) in doc.list(path, value).unwrap_or_default().iter().enumerate() {
        let at = item(path, i);
        let Some(map) = doc.object(&at, value) else {
            continue;
        };
        let mut name = None;
        let mut number = None;
        // No protocol: Istio sniffs it; for lb that is a TCP connection.
        let mut proto = Some((Protocol::Tcp, false, false));
        let mut target_port = None;
        for (key, value) in map {
            let path = field(&at, key);
            match key.as_str() {
                "name" => name = doc.string(&path, value),
                "number" => number = doc.port(&path, value),
                "protocol" => {
                    if let Some(p) = doc.string(&path, value) {
                        proto = protocol(&p);
                        if proto.is_none() {
                            doc.error(
                                &path,
                                format!(
                                    "{p:?} is not one of Istio's protocols (HTTP, HTTPS, HTTP2, \
                                     GRPC, GRPC-WEB, HTTP_PROXY, TLS, TCP, UDP, MONGO, MYSQL, REDIS)"
                                ),
                            );
                        }
                    }
                }
                "targetPort" => target_port = doc.port(&path, value),
                _ => doc.unknown_field(&path),
            }
        }
        if !map.contains_key("number") {
            doc.missing(&field(&at, "number"), "the port clients connect to");
        }
        match &name {
            None => doc.missing(&field(&at, "name"), "Istio names every port"),
            Some(n) if ports.iter().any(|p| &p.name == n) => {
                doc.error(&field(&at, "name"), format!("{n:?} names two ports"))
            }
            Some(_) => {}
        }
        if let Some(n) = number {
            if ports.iter().any(|p| p.number == n) {
                doc.error(&field(&at, "number"), format!("port {n} is listed twice"));
            }
        }
        if let (Some(name), Some(number), Some((protocol, names_the_host, http))) =
            (name, number, proto)
        {
            ports.push(Port {
                path: at,
                name,
                number,
                protocol,
                names_the_host,
                http,
                target_port,
            });
        }
    }
    ports
}

fn read_endpoint(
    doc: &mut Doc,
    at: &str,
    value: &Value,
    port_names: &BTreeSet<&str>,
    resolution: Option<Resolution>,
) -> Option<EntryEndpoint> {
    let map = doc.object(at, value)?;
    let mut address = None;
    let mut ports = BTreeMap::new();
    let mut locality = Locality::default();
    let mut labels = BTreeMap::new();
    let mut weight = 1;
    for (key, value) in map {
        let path = field(at, key);
        match key.as_str() {
            "address" => address = endpoint_address(doc, &path, value, resolution),
            "ports" => {
                let Some(map) = doc.object(&path, value) else {
                    continue;
                };
                for (name, port) in map {
                    let port_path = field(&path, name);
                    if !port_names.contains(name.as_str()) {
                        doc.error(&port_path, format!("no port named {name:?} in spec.ports"));
                    } else if let Some(p) = doc.port(&port_path, port) {
                        ports.insert(name.clone(), p);
                    }
                }
            }
            "locality" => {
                if let Some(l) = doc.string(&path, value) {
                    locality = Locality::parse(&l);
                }
            }
            "labels" => labels = doc.string_map(&path, value).unwrap_or_default(),
            // Envoy needs a weight of at least 1, so Istio sends an unset or zero weight as 1.
            "weight" => weight = doc.u32(&path, value).unwrap_or(1).max(1),
            "network" => doc.ignored(
                &path,
                "lb reaches every endpoint directly (no multi-network gateways)",
            ),
            "serviceAccount" => doc.ignored(&path, "lb does not check workload identities"),
            _ => doc.unknown_field(&path),
        }
    }
    if !map.contains_key("address") {
        doc.missing(&field(at, "address"), "the endpoint's IP address");
    }
    Some(EntryEndpoint {
        path: at.to_string(),
        address: address?,
        ports,
        locality,
        labels,
        weight,
    })
}

fn endpoint_address(
    doc: &mut Doc,
    path: &str,
    value: &Value,
    resolution: Option<Resolution>,
) -> Option<EntryAddress> {
    let text = doc.string(path, value)?;
    match text.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Some(EntryAddress::Ip(a)),
        Ok(IpAddr::V6(_)) => {
            doc.error(
                path,
                format!("{text:?} is IPv6, which lb does not balance yet"),
            );
            None
        }
        Err(_) if text.starts_with("unix://") => {
            doc.error(
                path,
                format!(
                    "{text:?} is a Unix socket: lb forwards IP packets, it needs an IP address"
                ),
            );
            None
        }
        Err(_)
            if matches!(
                resolution,
                Some(Resolution::Dns | Resolution::DnsRoundRobin)
            ) =>
        {
            match dns_name_problem(&text) {
                None => Some(EntryAddress::Name(text.trim_end_matches('.').to_string())),
                Some(why) => {
                    doc.error(path, format!("{text:?} is not a DNS name: {why}"));
                    None
                }
            }
        }
        Err(_) => {
            doc.error(
                path,
                format!("{text:?} is not an IP address (resolution STATIC takes IP addresses)"),
            );
            None
        }
    }
}

/// Why `name` cannot be looked up, if it cannot (RFC 1035 lengths, letters, digits,
/// hyphens and underscores in labels).
pub fn dns_name_problem(name: &str) -> Option<&'static str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return Some("a name has 1 to 253 characters");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Some("each dot-separated label has 1 to 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Some("labels hold letters, digits, hyphens and underscores");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some("a label neither starts nor ends with a hyphen");
        }
    }
    None
}

/// What one DestinationRule contributes.
pub(super) struct DestinationRule {
    pub label: String,
    /// As written.
    pub host: String,
    /// As Istio reads it: a short name is qualified with the rule's namespace.
    pub qualified_host: String,
    pub policy: TrafficPolicy,
}

pub(super) fn read_destination_rule(
    doc: &mut Doc,
    namespace: &str,
    spec: &Map<String, Value>,
) -> Option<DestinationRule> {
    let errors_before = doc.error_count();
    let mut host = None;
    let mut policy = TrafficPolicy::default();
    for (key, value) in spec {
        let path = field("spec", key);
        match key.as_str() {
            "host" => host = doc.string(&path, value),
            "trafficPolicy" => policy = read_traffic_policy(doc, &path, value),
            "subsets" => doc.ignored(
                &path,
                "lb balances over every endpoint of the host (subsets are picked by \
                 VirtualService routes, which lb does not read)",
            ),
            "exportTo" => doc.ignored(&path, EXPORT_TO),
            "workloadSelector" => doc.ignored(
                &path,
                "the rule applies to every connection this node balances",
            ),
            _ => doc.unknown_field(&path),
        }
    }
    if host.is_none() {
        doc.missing("spec.host", "the service host the rule applies to");
    }
    if doc.error_count() > errors_before {
        return None;
    }
    let host = host?;
    Some(DestinationRule {
        label: doc.label.clone(),
        qualified_host: qualify(&host, namespace),
        host,
        policy,
    })
}

/// Istio reads a host without a dot as a Kubernetes service in the rule's namespace.
fn qualify(host: &str, namespace: &str) -> String {
    if host == "*" || host.contains('.') || host.parse::<IpAddr>().is_ok() {
        host.to_string()
    } else {
        format!("{host}.{namespace}.svc.cluster.local")
    }
}

fn read_traffic_policy(doc: &mut Doc, path: &str, value: &Value) -> TrafficPolicy {
    let mut policy = TrafficPolicy::default();
    let Some(map) = doc.object(path, value) else {
        return policy;
    };
    for (key, value) in map {
        let at = field(path, key);
        match key.as_str() {
            "loadBalancer" => policy.locality_lb = read_load_balancer(doc, &at, value),
            "outlierDetection" => {
                policy.outlier_detection = read_outlier_detection(doc, &at, value)
            }
            "connectionPool" => doc.ignored(&at, "lb does not limit connections or requests yet"),
            "tls" => policy.tls = read_tls(doc, &at, value),
            "portLevelSettings" => doc.ignored(
                &at,
                "not supported yet: the rule's top-level trafficPolicy applies to every port",
            ),
            "tunnel" => doc.ignored(&at, "lb does not tunnel connections"),
            "proxyProtocol" => doc.ignored(&at, "lb does not send PROXY protocol headers"),
            "retryBudget" => doc.ignored(&at, "lb does not retry requests"),
            _ => doc.unknown_field(&at),
        }
    }
    if let Some(setting) = &policy.locality_lb {
        let fails_over = !setting.failover.is_empty() || !setting.failover_priority.is_empty();
        if fails_over && policy.outlier_detection.is_none() && setting.enabled != Some(false) {
            // Istio says the same (as a warning): nothing ever marks an endpoint unhealthy.
            doc.warn(
                &field(&field(path, "loadBalancer"), "localityLbSetting"),
                format!(
                    "failover needs {}: without it traffic never fails over",
                    field(path, "outlierDetection")
                ),
            );
        }
    }
    policy
}

/// `trafficPolicy.tls` (Istio's ClientTLSSettings): `SIMPLE` and `MUTUAL` with files;
/// `DISABLE` is no TLS; `ISTIO_MUTUAL` and `credentialName` need a mesh lb is not part of.
fn read_tls(doc: &mut Doc, path: &str, value: &Value) -> Option<TlsOrigination> {
    let map = doc.object(path, value)?;
    let errors_before = doc.error_count();
    let mut mode = None;
    let mut tls = TlsOrigination::default();
    let (mut certificate, mut key) = (None, None);
    for (key_name, value) in map {
        let at = field(path, key_name);
        match key_name.as_str() {
            "mode" => mode = doc.string(&at, value),
            "sni" => tls.sni = doc.string(&at, value).filter(|s| !s.is_empty()),
            "caCertificates" => tls.ca_certificates = doc.string(&at, value).map(Into::into),
            "clientCertificate" => certificate = doc.string(&at, value),
            "privateKey" => key = doc.string(&at, value),
            "subjectAltNames" => tls.subject_alt_names = doc.string_list(&at, value)?,
            "insecureSkipVerify" => {
                tls.insecure_skip_verify = doc.bool(&at, value).unwrap_or(false);
                if tls.insecure_skip_verify {
                    doc.warn(
                        &at,
                        "endpoint certificates are not verified at all: anyone on the path \
                         can read and change this traffic",
                    );
                }
            }
            "credentialName" => doc.error(
                &at,
                "lb reads certificates from files (clientCertificate, privateKey, \
                 caCertificates), not from Kubernetes secrets",
            ),
            "caCrl" => doc.ignored(&at, "certificate revocation lists are not checked"),
            _ => doc.unknown_field(&at),
        }
    }
    let mode_path = field(path, "mode");
    match mode.as_deref() {
        None | Some("DISABLE") => return None,
        Some("SIMPLE") => {}
        Some("MUTUAL") => match (certificate, key) {
            (Some(c), Some(k)) => tls.client_certificate = Some((c.into(), k.into())),
            _ => doc.error(
                &mode_path,
                format!(
                    "MUTUAL needs {} and {} (PEM files)",
                    field(path, "clientCertificate"),
                    field(path, "privateKey")
                ),
            ),
        },
        Some("ISTIO_MUTUAL") => doc.error(
            &mode_path,
            "ISTIO_MUTUAL needs the mesh's workload certificates, which lb does not have: \
             use SIMPLE, or MUTUAL with certificate files",
        ),
        Some(other) => doc.error(
            &mode_path,
            format!("{other:?} is not one of DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL"),
        ),
    }
    (doc.error_count() == errors_before).then_some(tls)
}

fn read_load_balancer(doc: &mut Doc, path: &str, value: &Value) -> Option<LocalityLbSetting> {
    let map = doc.object(path, value)?;
    let mut setting = None;
    for (key, value) in map {
        let at = field(path, key);
        match key.as_str() {
            "simple" => match doc.string(&at, value).as_deref() {
                None | Some("UNSPECIFIED") => {}
                Some(s @ ("ROUND_ROBIN" | "RANDOM" | "LEAST_REQUEST" | "LEAST_CONN")) => doc.warn(
                    &at,
                    format!(
                        "{s} is approximated: lb picks the endpoint of each new connection by \
                         a weighted consistent hash (Maglev) of its addresses and ports"
                    ),
                ),
                Some("PASSTHROUGH") => doc.ignored(&at, "lb always balances over the endpoints"),
                Some(other) => doc.error(
                    &at,
                    format!(
                        "{other:?} is not one of UNSPECIFIED, RANDOM, PASSTHROUGH, ROUND_ROBIN, \
                         LEAST_REQUEST, LEAST_CONN"
                    ),
                ),
            },
            "consistentHash" => doc.ignored(
                &at,
                "lb always hashes a new connection's addresses and ports; other hash keys \
                 are not supported yet",
            ),
            "localityLbSetting" => setting = read_locality_lb(doc, &at, value),
            "warmupDurationSecs" | "warmup" => {
                doc.ignored(&at, "lb gives a new endpoint its full share at once")
            }
            _ => doc.unknown_field(&at),
        }
    }
    setting
}

/// Topology labels, which Istio refuses in `failoverPriority` together with `failover`.
const TOPOLOGY_LABELS: [&str; 3] = [
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
    "topology.istio.io/subzone",
];

fn read_locality_lb(doc: &mut Doc, path: &str, value: &Value) -> Option<LocalityLbSetting> {
    let map = doc.object(path, value)?;
    let mut setting = LocalityLbSetting::default();
    // Source patterns of `distribute`, checked together for overlaps as Istio does.
    let mut distribute_from = Vec::new();
    for (key, value) in map {
        let at = field(path, key);
        match key.as_str() {
            "enabled" => setting.enabled = doc.bool(&at, value),
            "failover" => {
                for (i, v) in doc.list(&at, value).unwrap_or_default().iter().enumerate() {
                    if let Some(f) = read_failover(doc, &item(&at, i), v) {
                        setting.failover.push(f);
                    }
                }
            }
            "failoverPriority" => {
                let labels = doc.string_list(&at, value).unwrap_or_default();
                for (i, l) in labels.iter().enumerate() {
                    if l.is_empty() || l.starts_with('=') {
                        doc.error(
                            &item(&at, i),
                            format!("{l:?} is not a label (key or key=value)"),
                        );
                    }
                }
                setting.failover_priority = labels;
            }
            "distribute" => {
                for (i, v) in doc.list(&at, value).unwrap_or_default().iter().enumerate() {
                    let item_path = item(&at, i);
                    if let Some(d) = read_distribute(doc, &item_path, v) {
                        distribute_from.push((field(&item_path, "from"), d.from.clone()));
                        setting.distribute.push(d);
                    }
                }
            }
            _ => doc.unknown_field(&at),
        }
    }
    check_locality_patterns(doc, &distribute_from);
    if !setting.distribute.is_empty() && !setting.failover.is_empty() {
        doc.error(
            path,
            "distribute and failover cannot both be set (Istio refuses it): pick one",
        );
    }
    if !setting.failover.is_empty() {
        if let Some(l) = setting
            .failover_priority
            .iter()
            .find(|l| TOPOLOGY_LABELS.contains(&l.as_str()))
        {
            doc.error(
                &field(path, "failoverPriority"),
                format!("{l:?} cannot be used together with failover (Istio refuses it)"),
            );
        }
    }
    Some(setting)
}

fn read_failover(doc: &mut Doc, at: &str, value: &Value) -> Option<Failover> {
    let map = doc.object(at, value)?;
    let mut from = None;
    let mut to = None;
    for (key, value) in map {
        let path = field(at, key);
        let slot = match key.as_str() {
            "from" => &mut from,
            "to" => &mut to,
            _ => {
                doc.unknown_field(&path);
                continue;
            }
        };
        *slot = doc.string(&path, value);
        if let Some(region) = slot.as_deref() {
            if region.contains('/') {
                doc.error(&path, format!("{region:?}: failover names regions only"));
            } else if region.contains('*') {
                doc.error(&path, format!("{region:?}: failover takes no wildcard"));
            }
        }
    }
    for (key, value) in [("from", &from), ("to", &to)] {
        if value.as_deref().is_none_or(str::is_empty) {
            doc.missing(&field(at, key), "a region");
        }
    }
    let (from, to) = (from?, to?);
    if from == to {
        doc.error(
            at,
            format!("from and to are both {from:?}: name two regions"),
        );
    }
    Some(Failover { from, to })
}

fn read_distribute(doc: &mut Doc, at: &str, value: &Value) -> Option<Distribute> {
    let map = doc.object(at, value)?;
    let mut from = None;
    let mut to = BTreeMap::new();
    let mut to_patterns = Vec::new();
    for (key, value) in map {
        let path = field(at, key);
        match key.as_str() {
            "from" => from = doc.string(&path, value),
            "to" => {
                let Some(weights) = doc.object(&path, value) else {
                    continue;
                };
                for (locality, weight) in weights {
                    let weight_path = field(&path, locality);
                    if let Some(w) = doc.integer_in(&weight_path, weight, 1, 100) {
                        to.insert(locality.clone(), w as u32);
                        to_patterns.push((weight_path, locality.clone()));
                    }
                }
                let total: u32 = to.values().sum();
                if total != 100 && to.len() == weights.len() {
                    doc.error(&path, format!("weights add up to {total}, not 100"));
                }
            }
            _ => doc.unknown_field(&path),
        }
    }
    check_locality_patterns(doc, &to_patterns);
    if !map.contains_key("from") {
        doc.missing(&field(at, "from"), "the client locality pattern");
    }
    if !map.contains_key("to") {
        doc.missing(&field(at, "to"), "the weight of each endpoint locality");
    }
    Some(Distribute { from: from?, to })
}

/// Istio's rules for locality patterns (`region/zone/subzone`, a `*` only at the end): no
/// empty part, and no pattern that overlaps another of the same list.
fn check_locality_patterns(doc: &mut Doc, patterns: &[(String, String)]) {
    let mut accepted: Vec<(&str, Vec<&str>)> = Vec::new();
    for (path, pattern) in patterns {
        let stars = pattern.matches('*').count();
        if stars > 1 || (stars == 1 && !pattern.ends_with('*')) {
            doc.error(
                path,
                format!("{pattern:?}: a wildcard `*` may only end the pattern"),
            );
            continue;
        }
        let mut parts: Vec<&str> = pattern.splitn(3, '/').collect();
        // `region1/*` covers what `region1` covers; `*` covers everything.
        if parts.last() == Some(&"*") {
            parts.pop();
        }
        if parts.iter().any(|p| p.is_empty()) {
            doc.error(
                path,
                format!("{pattern:?} has an empty region, zone or subzone"),
            );
            continue;
        }
        let overlap = accepted.iter().find(|(_, other)| {
            let n = other.len().min(parts.len());
            other[..n] == parts[..n]
        });
        if let Some((other, _)) = overlap {
            doc.error(path, format!("{pattern:?} overlaps {other:?}"));
            continue;
        }
        accepted.push((pattern, parts));
    }
}

fn read_outlier_detection(doc: &mut Doc, path: &str, value: &Value) -> Option<OutlierDetection> {
    let map = doc.object(path, value)?;
    let mut od = OutlierDetection::default();
    let mut local_origin_failures_given = false;
    for (key, value) in map {
        let at = field(path, key);
        match key.as_str() {
            "consecutive5xxErrors" => {
                if let Some(n) = doc.u32(&at, value) {
                    od.consecutive_5xx_errors = n;
                }
            }
            "consecutiveGatewayErrors" => {
                if let Some(n) = doc.u32(&at, value) {
                    od.consecutive_gateway_errors = n;
                }
            }
            "consecutiveLocalOriginFailures" => {
                // Istio passes it on only when above zero; Envoy's default (5) stays otherwise.
                if let Some(n) = doc.u32(&at, value).filter(|&n| n > 0) {
                    od.consecutive_local_origin_failures = n;
                    local_origin_failures_given = true;
                }
            }
            "splitExternalLocalOriginErrors" => {
                if let Some(b) = doc.bool(&at, value) {
                    od.split_external_local_origin_errors = b;
                }
            }
            "interval" => {
                if let Some(d) = doc.istio_duration(&at, value) {
                    od.interval = d;
                }
            }
            "baseEjectionTime" => {
                if let Some(d) = doc.istio_duration(&at, value) {
                    od.base_ejection_time = d;
                }
            }
            "maxEjectionPercent" => {
                // Istio passes it on only when above zero; Envoy's default (10%) stays otherwise.
                if let Some(p) = doc.percent(&at, value).filter(|&p| p > 0) {
                    od.max_ejection_percent = p;
                }
            }
            "minHealthPercent" => {
                if let Some(p) = doc.percent(&at, value) {
                    od.min_health_percent = p;
                }
            }
            "consecutiveErrors" => doc.warn(
                &at,
                format!(
                    "deprecated, and ignored as current Istio ignores it: use \
                     consecutiveGatewayErrors or consecutive5xxErrors (it is {})",
                    describe(value)
                ),
            ),
            _ => doc.unknown_field(&at),
        }
    }
    if local_origin_failures_given && !od.split_external_local_origin_errors {
        doc.error(
            &field(path, "consecutiveLocalOriginFailures"),
            "set without splitExternalLocalOriginErrors: true, which Istio refuses: \
             local-origin failures are only counted apart when they are split",
        );
    }
    // Istio has no field for it; Envoy's default is max(300s, baseEjectionTime).
    od.max_ejection_time = od.base_ejection_time.max(Duration::from_secs(300));
    Some(od)
}

/// How specifically a rule host matches a service host: `None` when it does not; an exact
/// match outranks every wildcard, and a longer wildcard suffix outranks a shorter one.
fn match_rank(rule_host: &str, service_host: &str) -> Option<usize> {
    if rule_host == service_host {
        return Some(usize::MAX);
    }
    let suffix = rule_host.strip_prefix('*')?;
    (service_host.len() > suffix.len() && service_host.ends_with(suffix)).then_some(suffix.len())
}

/// The traffic policy of a ServiceEntry: that of the rule matching one of its hosts most
/// specifically. `matched` records which rules matched some entry, for the rules that match
/// nothing to be reported.
pub(super) fn policy_for(
    entry_label: &str,
    hosts: &[String],
    rules: &[DestinationRule],
    matched: &mut [bool],
    report: &mut Report,
) -> TrafficPolicy {
    let ranked: Vec<(usize, usize)> = rules
        .iter()
        .enumerate()
        .filter_map(|(i, rule)| {
            let rank = hosts
                .iter()
                .filter_map(|h| match_rank(&rule.qualified_host, h))
                .max()?;
            Some((i, rank))
        })
        .collect();
    let Some(best) = ranked.iter().map(|&(_, rank)| rank).max() else {
        return TrafficPolicy::default();
    };
    for &(i, _) in &ranked {
        matched[i] = true;
    }
    let mut equals = ranked
        .iter()
        .filter(|&&(_, rank)| rank == best)
        .map(|&(i, _)| i);
    let Some(chosen) = equals.next() else {
        return TrafficPolicy::default();
    };
    for other in equals {
        report.warning(
            &rules[other].label,
            "spec.host",
            format!(
                "{:?} also matches {entry_label}, which takes {} instead (the first in load \
                 order; Istio would take the oldest)",
                rules[other].host, rules[chosen].label
            ),
        );
    }
    rules[chosen].policy.clone()
}

/// Rules that matched no ServiceEntry do nothing, which is worth saying.
pub(super) fn report_unmatched(rules: &[DestinationRule], matched: &[bool], report: &mut Report) {
    for (rule, _) in rules.iter().zip(matched).filter(|(_, &m)| !m) {
        let read_as = if rule.qualified_host == rule.host {
            String::new()
        } else {
            format!(" (read as {:?})", rule.qualified_host)
        };
        report.warning(
            &rule.label,
            "spec.host",
            format!(
                "{:?}{read_as} matches no ServiceEntry host: the rule has no effect",
                rule.host
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_hosts_match_exactly_or_by_wildcard_suffix() {
        assert_eq!(match_rank("mydb.com", "mydb.com"), Some(usize::MAX));
        assert_eq!(match_rank("*.example.com", "a.example.com"), Some(12));
        assert_eq!(match_rank("*.example.com", "example.com"), None);
        assert_eq!(match_rank("*", "mydb.com"), Some(0));
        assert_eq!(match_rank("mydb.com", "other.com"), None);
        assert_eq!(
            qualify("helloworld", "sample"),
            "helloworld.sample.svc.cluster.local"
        );
        assert_eq!(qualify("mydb.com", "sample"), "mydb.com");
        assert_eq!(qualify("*", "sample"), "*");
    }
}
