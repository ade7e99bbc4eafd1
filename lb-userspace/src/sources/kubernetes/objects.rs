//! The parts of the cluster's objects lb uses, read from the Kubernetes types once, when
//! an object arrives: the store keeps these small records, not the objects (a cluster's
//! Services and EndpointSlices carry much lb has no use for, `managedFields` first).
//!
//! Reading never fails: what lb cannot use in an object is recorded as a problem naming
//! the field, and the rest of the object is used.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::{Duration, SystemTime},
};

use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::ResourceExt;

use crate::dataplane::Protocol;

/// Label of an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Annotation of an EndpointSlice: when the change it carries was triggered (RFC 3339).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";
/// Service annotation Istio reads as `trafficDistribution`.
pub const TRAFFIC_DISTRIBUTION_ANNOTATION: &str = "networking.istio.io/traffic-distribution";
/// Pod labels that override the locality of the pod's node (Istio), newest first.
pub const POD_LOCALITY_LABELS: [&str; 2] = ["topology.istio.io/locality", "istio-locality"];
/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10_800);

/// `namespace/name` of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    pub fn of<K: kube::Resource>(object: &K) -> Self {
        Self::new(
            object.meta().namespace.as_deref().unwrap_or("default"),
            object.meta().name.as_deref().unwrap_or(""),
        )
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// How a Service is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceKind {
    /// A virtual IP (ClusterIP, NodePort and LoadBalancer Services all have one).
    Virtual,
    /// `clusterIP: None`: clients resolve the pods themselves; nothing to balance.
    Headless,
    /// `type: ExternalName`: a DNS alias of `spec.externalName`, balanced as a
    /// ServiceEntry with `resolution: DNS` is (a VIP allocated, the name resolved).
    ExternalName(String),
}

/// A port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// `spec.ports[i]`, for messages.
    pub path: String,
    /// The name EndpointSlice ports are matched by ("" for a Service's only port).
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    /// Cleartext HTTP/1.x, as Istio selects it: the port's `appProtocol` is `http`, or
    /// its name is `http` or starts with `http-`.
    pub http: bool,
}

/// What lb uses of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    pub key: ObjectKey,
    pub kind: ServiceKind,
    /// `spec.clusterIPs` (IPv4).
    pub cluster_ips: Vec<Ipv4Addr>,
    /// `spec.externalIPs` and `status.loadBalancer.ingress[].ip` (IPv4): balanced only
    /// with `--external-ips`.
    pub external_ips: Vec<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    /// `sessionAffinity: ClientIP` with its timeout.
    pub session_affinity: Option<Duration>,
    /// `internalTrafficPolicy: Local`.
    pub local_only: bool,
    /// `spec.trafficDistribution`, else the Istio annotation.
    pub traffic_distribution: Option<String>,
    /// Fields lb cannot use, each `path: reason`.
    pub problems: Vec<String>,
}

/// One endpoint of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// `addresses[0]`, as kube-proxy reads it.
    pub address: Ipv4Addr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    pub zone: Option<String>,
    /// The pod behind it (`targetRef` of kind Pod), for Istio's locality label.
    pub pod: Option<ObjectKey>,
}

/// A port of an EndpointSlice: the Service port it serves (by name) and the port number
/// on the endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// What lb uses of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceRecord {
    pub key: ObjectKey,
    /// The Service it belongs to (label `kubernetes.io/service-name`); `None` is a problem.
    pub service: Option<ObjectKey>,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
    /// When the change it carries was triggered, for the network programming latency.
    pub trigger_time: Option<SystemTime>,
    pub problems: Vec<String>,
}

/// What lb uses of a Node: its labels (locality, and `failoverPriority` for this node).
pub fn node_labels(node: &Node) -> BTreeMap<String, String> {
    node.labels().clone()
}

/// A pod's locality override: the value of `topology.istio.io/locality`, else of
/// `istio-locality` (read with `Locality::from_istio_label`).
pub fn pod_locality(pod: &kube::core::PartialObjectMeta<Pod>) -> Option<String> {
    let labels = pod.labels();
    POD_LOCALITY_LABELS
        .iter()
        .find_map(|l| labels.get(*l).filter(|v| !v.is_empty()))
        .cloned()
}

fn protocol(path: &str, value: Option<&str>, problems: &mut Vec<String>) -> Option<Protocol> {
    // The API server defaults it to TCP; an unset one reads the same.
    match value.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        other => {
            problems.push(format!(
                "{path}: {other} is not supported (lb balances TCP and UDP): the port is left out"
            ));
            None
        }
    }
}

fn ipv4s<'a>(
    path: &str,
    values: impl IntoIterator<Item = &'a String>,
    problems: &mut Vec<String>,
) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for (i, v) in values.into_iter().enumerate() {
        match v.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => out.push(a),
            // The other family of a dual-stack Service: not balanced by lb yet.
            Ok(IpAddr::V6(_)) => {}
            Err(_) => problems.push(format!("{path}[{i}]: {v:?} is not an IP address")),
        }
    }
    out
}

/// Reads a Service.
pub fn service_record(service: &Service) -> ServiceRecord {
    let key = ObjectKey::of(service);
    let mut problems = Vec::new();
    let no_spec = Default::default();
    let spec: &k8s_openapi::api::core::v1::ServiceSpec = service.spec.as_ref().unwrap_or(&no_spec);
    let cluster_ips: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) => vec![ip.clone()],
        _ => Vec::new(),
    };
    let kind = if spec.type_.as_deref() == Some("ExternalName") {
        let name = spec.external_name.clone().unwrap_or_default();
        match crate::config::dns_name_problem(&name) {
            None => {}
            Some(why) => problems.push(format!(
                "spec.externalName: {name:?} is not a DNS name: {why}"
            )),
        }
        ServiceKind::ExternalName(name.trim_end_matches('.').to_string())
    } else if cluster_ips.iter().any(|ip| ip == "None") {
        ServiceKind::Headless
    } else {
        ServiceKind::Virtual
    };
    let cluster_ips = if kind == ServiceKind::Virtual {
        ipv4s("spec.clusterIPs", &cluster_ips, &mut problems)
    } else {
        Vec::new()
    };
    let mut external_ips = ipv4s(
        "spec.externalIPs",
        spec.external_ips.iter().flatten(),
        &mut problems,
    );
    let ingress_ips: Vec<String> = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone())
        .collect();
    external_ips.extend(ipv4s(
        "status.loadBalancer.ingress[].ip",
        &ingress_ips,
        &mut problems,
    ));
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let path = format!("spec.ports[{i}]");
        let Some(protocol) = protocol(
            &format!("{path}.protocol"),
            p.protocol.as_deref(),
            &mut problems,
        ) else {
            continue;
        };
        let port = match u16::try_from(p.port) {
            Ok(port) if port > 0 => port,
            _ => {
                problems.push(format!(
                    "{path}.port: {} is not a port (1-65535): the port is left out",
                    p.port
                ));
                continue;
            }
        };
        let name = p.name.clone().unwrap_or_default();
        let http = protocol == Protocol::Tcp
            && (p.app_protocol.as_deref() == Some("http")
                || name == "http"
                || name.starts_with("http-"));
        ports.push(ServicePort {
            path,
            name,
            port,
            protocol,
            http,
        });
    }
    let session_affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .filter(|&s| s > 0)
            .map_or(DEFAULT_AFFINITY_TIMEOUT, |s| Duration::from_secs(s as u64))
    });
    let traffic_distribution = spec.traffic_distribution.clone().or_else(|| {
        service
            .annotations()
            .get(TRAFFIC_DISTRIBUTION_ANNOTATION)
            .cloned()
    });
    ServiceRecord {
        key,
        kind,
        cluster_ips,
        external_ips,
        ports,
        session_affinity,
        local_only: spec.internal_traffic_policy.as_deref() == Some("Local"),
        traffic_distribution,
        problems,
    }
}

/// Reads an EndpointSlice as kube-proxy's `EndpointSliceCache` does: `addresses[0]` only;
/// an unset `ready` or `serving` is true and an unset `terminating` false; a port without
/// a name or number is ignored (a Service's only port has the name "").
pub fn slice_record(slice: &EndpointSlice) -> SliceRecord {
    let key = ObjectKey::of(slice);
    let mut problems = Vec::new();
    let service = match slice.labels().get(SERVICE_NAME_LABEL) {
        Some(name) if !name.is_empty() => Some(ObjectKey::new(&key.namespace, name)),
        _ => {
            problems.push(format!(
                "metadata.labels: no {SERVICE_NAME_LABEL:?}: the slice belongs to no Service \
                 and is ignored"
            ));
            None
        }
    };
    let trigger_time = slice
        .annotations()
        .get(TRIGGER_TIME_ANNOTATION)
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok());
    if slice.address_type != "IPv4" {
        // Another family's slice: a Service has one per family (kube-proxy tracks them
        // apart); lb balances IPv4.
        return SliceRecord {
            key,
            service,
            ports: Vec::new(),
            endpoints: Vec::new(),
            trigger_time,
            problems,
        };
    }
    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let path = format!("ports[{i}]");
        let (Some(name), Some(port)) = (&p.name, p.port) else {
            continue;
        };
        let Some(protocol) = protocol(
            &format!("{path}.protocol"),
            p.protocol.as_deref(),
            &mut problems,
        ) else {
            continue;
        };
        match u16::try_from(port) {
            Ok(port) if port > 0 => ports.push(SlicePort {
                name: name.clone(),
                port,
                protocol,
            }),
            _ => problems.push(format!("{path}.port: {port} is not a port (1-65535)")),
        }
    }
    let mut endpoints = Vec::new();
    for (i, e) in slice.endpoints.iter().enumerate() {
        let Some(first) = e.addresses.first() else {
            problems.push(format!("endpoints[{i}].addresses: empty"));
            continue;
        };
        let address = match first.parse::<Ipv4Addr>() {
            Ok(a) => a,
            Err(_) => {
                problems.push(format!(
                    "endpoints[{i}].addresses[0]: {first:?} is not an IPv4 address (the \
                     slice's addressType is IPv4): the endpoint is left out"
                ));
                continue;
            }
        };
        let conditions = e.conditions.clone().unwrap_or_default();
        let pod = e
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| {
                Some(ObjectKey::new(
                    r.namespace.as_deref().unwrap_or(&key.namespace),
                    r.name.as_deref()?,
                ))
            });
        endpoints.push(SliceEndpoint {
            address,
            ready: conditions.ready.unwrap_or(true),
            serving: conditions.serving.unwrap_or(true),
            terminating: conditions.terminating.unwrap_or(false),
            node_name: e.node_name.clone(),
            zone: e.zone.clone(),
            pod,
        });
    }
    SliceRecord {
        key,
        service,
        ports,
        endpoints,
        trigger_time,
        problems,
    }
}
