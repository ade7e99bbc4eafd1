//! One Kubernetes Service and its EndpointSlices → lb's services (one per VIP and port),
//! seen from this node.
//!
//! Endpoints are merged across the Service's slices as kube-proxy merges them
//! (`pkg/proxy/endpointslicecache.go`): slice ports are matched to Service ports **by
//! name** (so a `targetPort` given by name resolves per endpoint: each slice carries the
//! number its pods use), an address:port listed twice keeps its non-terminating copy. Which
//! endpoints take new connections follows kube-proxy's `CategorizeEndpoints`
//! (`pkg/proxy/topology.go`): the ready ones; when none is ready anywhere, the serving and
//! terminating ones; with `internalTrafficPolicy: Local` only this node's, and never another
//! node's. Endpoints that take no new connections stay as `Draining` backends: their
//! established connections keep flowing (Cilium keeps them for the same reason).
//!
//! An endpoint's locality is Istio's: the pod's `topology.istio.io/locality` (or
//! `istio-locality`) label, else its node's topology labels, else the slice's `zone`.
//! `trafficDistribution` becomes the `failoverPriority` Istio gives it, with `Force`.

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
    sync::Arc,
};

use lb_common::BackendState;

use super::objects::{ObjectKey, ServiceKind, ServiceRecord, SliceEndpoint, SliceRecord};
use crate::{
    config::ClusterService,
    dataplane::Frontend,
    locality::{NETWORK_LABEL, REGION_LABEL, SUBZONE_LABEL, ZONE_LABEL},
    model::{Endpoint, Locality, LocalityLbSetting, Node, Service, Source},
};

/// The node's name, as a label (for `PreferSameNode`).
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// What translation needs besides the Service and its slices.
pub struct Context<'a> {
    /// This node's name (`internalTrafficPolicy: Local`).
    pub node_name: &'a str,
    /// Every node's labels.
    pub nodes: &'a HashMap<String, BTreeMap<String, String>>,
    /// Pods' locality overrides.
    pub pod_localities: &'a HashMap<ObjectKey, String>,
    /// Balance `externalIPs` and load-balancer ingress IPs too.
    pub external_ips: bool,
    /// The cluster's DNS domain (`cluster.local`).
    pub cluster_domain: &'a str,
    /// Endpoint label sets already in use, shared by the endpoints that have them.
    pub label_sets: &'a LabelSets,
}

/// Endpoint label sets, each held once: there are as many as nodes and localities, and
/// a hundred thousand endpoints carry them.
#[derive(Default)]
pub struct LabelSets(RefCell<HashSet<Arc<BTreeMap<String, String>>>>);

impl LabelSets {
    /// The shared copy of `labels`.
    pub fn get(&self, labels: BTreeMap<String, String>) -> Arc<BTreeMap<String, String>> {
        let mut sets = self.0.borrow_mut();
        if let Some(shared) = sets.get(&labels) {
            return shared.clone();
        }
        let shared = Arc::new(labels);
        sets.insert(shared.clone());
        shared
    }

    /// Forgets the sets no endpoint has any more.
    pub fn prune(&self) {
        self.0.borrow_mut().retain(|set| Arc::strong_count(set) > 1);
    }
}

/// A translated Service.
#[derive(Clone, Debug, Default)]
pub struct Translated {
    /// `None` for Services lb does not balance (headless, ExternalName, no VIP).
    pub service: Option<ClusterService>,
    /// Endpoints that take no new connections.
    pub states: Vec<((Frontend, Ipv4Addr, u16), BackendState)>,
    /// What was wrong, each naming the object and the field.
    pub problems: Vec<String>,
}

/// This node, as the agent's client side: its locality and labels.
pub fn this_node(name: &str, labels: &BTreeMap<String, String>) -> Node {
    let mut labels = labels.clone();
    labels
        .entry(HOSTNAME_LABEL.to_string())
        .or_insert_with(|| name.to_string());
    Node {
        locality: Locality::from_topology_labels(&labels),
        labels,
    }
}

/// Istio's `failoverPriority` for a `trafficDistribution` value; `None` for a value it
/// does not know (which Istio ignores too).
pub fn traffic_distribution_setting(value: &str) -> Option<LocalityLbSetting> {
    let zone = [NETWORK_LABEL, REGION_LABEL, ZONE_LABEL];
    let labels: Vec<&str> = match value {
        "PreferClose" | "PreferSameZone" => zone.to_vec(),
        "PreferSameNode" => zone
            .iter()
            .copied()
            .chain([SUBZONE_LABEL, HOSTNAME_LABEL])
            .collect(),
        _ => return None,
    };
    Some(LocalityLbSetting {
        failover_priority: labels.into_iter().map(str::to_string).collect(),
        force: true,
        ..Default::default()
    })
}

/// `outbound|PORT||HOST` hosts of a Service: `NAME.NAMESPACE.svc.DOMAIN`.
pub fn service_host(key: &ObjectKey, cluster_domain: &str) -> String {
    format!("{}.{}.svc.{cluster_domain}", key.name, key.namespace)
}

/// An ExternalName Service: one frontend per port on a VIP allocated for its host, whose
/// one endpoint is `external_name`, resolved by the agent (as Istio turns such a Service
/// into a DNS-resolved service). Without ports, nothing to balance.
fn external_name(
    service: &ServiceRecord,
    external_name: &str,
    label: &str,
    context: &Context<'_>,
) -> Option<ClusterService> {
    if external_name.is_empty() || crate::config::dns_name_problem(external_name).is_some() {
        return None;
    }
    let host = service_host(&service.key, context.cluster_domain);
    let services: Vec<(String, Service)> = service
        .ports
        .iter()
        .map(|port| {
            (
                format!("{} (port {}), an allocated VIP", port.path, port.port),
                Service {
                    name: host.clone(),
                    frontend: Frontend {
                        vip: Ipv4Addr::UNSPECIFIED,
                        port: port.port,
                        protocol: port.protocol,
                    },
                    endpoints: Default::default(),
                    named: vec![crate::model::NamedEndpoint {
                        hostname: external_name.into(),
                        port: port.port,
                        locality: Default::default(),
                        labels: Default::default(),
                        weight: 1,
                        one_at_a_time: false,
                    }]
                    .into(),
                    policy: Default::default(),
                    http: port.http,
                    session_affinity: service.session_affinity,
                    source: Source::Kubernetes {
                        namespace: service.key.namespace.clone(),
                        name: service.key.name.clone(),
                    },
                },
            )
        })
        .collect();
    (!services.is_empty()).then(|| ClusterService {
        label: label.to_string(),
        hosts: vec![host],
        services,
        default_locality_lb: None,
        auto_vip: true,
    })
}

/// Translates one Service with its slices (in any order).
pub fn translate(
    service: &ServiceRecord,
    slices: &[&SliceRecord],
    context: &Context<'_>,
) -> Translated {
    let label = format!("Kubernetes Service {}", service.key);
    let mut out = Translated {
        problems: service
            .problems
            .iter()
            .map(|p| format!("{label}: {p}"))
            .collect(),
        ..Default::default()
    };
    if let ServiceKind::ExternalName(name) = &service.kind {
        out.service = external_name(service, name, &label, context);
        return out;
    }
    if service.kind != ServiceKind::Virtual {
        return out;
    }
    for slice in slices {
        out.problems.extend(
            slice
                .problems
                .iter()
                .map(|p| format!("EndpointSlice {}: {p}", slice.key)),
        );
    }
    let mut vips = service.cluster_ips.clone();
    if context.external_ips {
        for ip in &service.external_ips {
            if !vips.contains(ip) {
                vips.push(*ip);
            }
        }
    }
    let default_locality_lb = match service.traffic_distribution.as_deref() {
        None | Some("") => None,
        Some(value) => {
            let setting = traffic_distribution_setting(value);
            if setting.is_none() {
                out.problems.push(format!(
                    "{label}: spec.trafficDistribution: {value:?} is not known (PreferClose, \
                     PreferSameZone, PreferSameNode): ignored"
                ));
            }
            setting
        }
    };

    let mut services = Vec::new();
    for port in &service.ports {
        let (endpoints, states) = port_endpoints(service, port, slices, context);
        // One copy, shared by the port's frontends (ClusterIP, external IPs).
        let endpoints: Arc<[Endpoint]> = endpoints.into();
        for vip in &vips {
            let frontend = Frontend {
                vip: *vip,
                port: port.port,
                protocol: port.protocol,
            };
            out.states.extend(
                states
                    .iter()
                    .map(|&(address, port, state)| ((frontend, address, port), state)),
            );
            services.push((
                format!("{} (port {}), VIP {vip}", port.path, port.port),
                Service {
                    name: service_host(&service.key, context.cluster_domain),
                    frontend,
                    endpoints: endpoints.clone(),
                    named: Default::default(),
                    policy: Default::default(),
                    http: port.http,
                    session_affinity: service.session_affinity,
                    source: Source::Kubernetes {
                        namespace: service.key.namespace.clone(),
                        name: service.key.name.clone(),
                    },
                },
            ));
        }
    }
    if !services.is_empty() {
        out.service = Some(ClusterService {
            label,
            hosts: vec![service_host(&service.key, context.cluster_domain)],
            services,
            default_locality_lb,
            auto_vip: false,
        });
    }
    out
}

/// One merged endpoint of a Service port.
struct Merged<'s> {
    endpoint: &'s SliceEndpoint,
    port: u16,
}

/// The endpoints of one Service port, merged across slices, and the states of those that
/// take no new connections.
fn port_endpoints(
    service: &ServiceRecord,
    port: &super::objects::ServicePort,
    slices: &[&SliceRecord],
    context: &Context<'_>,
) -> (Vec<Endpoint>, Vec<(Ipv4Addr, u16, BackendState)>) {
    // Keyed by address and port, in a stable order whatever the slices' order.
    let mut merged: BTreeMap<(Ipv4Addr, u16), Merged<'_>> = BTreeMap::new();
    let mut sorted: Vec<&&SliceRecord> = slices.iter().collect();
    sorted.sort_by(|a, b| a.key.cmp(&b.key));
    for slice in sorted {
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
        else {
            continue;
        };
        for e in &slice.endpoints {
            let key = (e.address, slice_port.port);
            // kube-proxy: the non-terminating copy wins.
            let keep = merged
                .get(&key)
                .is_none_or(|existing| !e.terminating && existing.endpoint.terminating);
            if keep {
                merged.insert(
                    key,
                    Merged {
                        endpoint: e,
                        port: slice_port.port,
                    },
                );
            }
        }
    }
    let candidates: Vec<&Merged<'_>> = merged
        .values()
        .filter(|m| {
            !service.local_only || m.endpoint.node_name.as_deref() == Some(context.node_name)
        })
        .collect();
    let any_ready = candidates.iter().any(|m| m.endpoint.ready);
    let takes_new = |e: &SliceEndpoint| {
        if any_ready {
            e.ready
        } else {
            e.serving && e.terminating
        }
    };
    let mut endpoints = Vec::with_capacity(candidates.len());
    let mut states = Vec::new();
    for m in candidates {
        let e = m.endpoint;
        if !takes_new(e) {
            states.push((e.address, m.port, BackendState::Draining));
        }
        endpoints.push(endpoint(e, m.port, context));
    }
    (endpoints, states)
}

fn endpoint(e: &SliceEndpoint, port: u16, context: &Context<'_>) -> Endpoint {
    let node_labels = e.node_name.as_ref().and_then(|n| context.nodes.get(n));
    let locality = match e.pod.as_ref().and_then(|p| context.pod_localities.get(p)) {
        Some(label) => Locality::from_istio_label(label),
        None => match node_labels {
            Some(labels) => Locality::from_topology_labels(labels),
            None => Locality {
                zone: e.zone.clone().unwrap_or_default(),
                ..Default::default()
            },
        },
    };
    // Istio's `AugmentLabels`: what `failoverPriority` can name on an endpoint.
    let mut labels = BTreeMap::new();
    for (key, value) in [
        (REGION_LABEL, &locality.region),
        (ZONE_LABEL, &locality.zone),
        (SUBZONE_LABEL, &locality.subzone),
    ] {
        if !value.is_empty() {
            labels.insert(key.to_string(), value.clone());
        }
    }
    if let Some(node) = &e.node_name {
        labels.insert(HOSTNAME_LABEL.to_string(), node.clone());
    }
    if let Some(network) = node_labels.and_then(|l| l.get(NETWORK_LABEL)) {
        labels.insert(NETWORK_LABEL.to_string(), network.clone());
    }
    Endpoint {
        address: e.address,
        port,
        locality,
        labels: context.label_sets.get(labels),
        weight: 1,
        hostname: None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        dataplane::Protocol,
        sources::kubernetes::objects::{ServicePort, SlicePort},
    };

    fn ctx<'a>(
        nodes: &'a HashMap<String, BTreeMap<String, String>>,
        pods: &'a HashMap<ObjectKey, String>,
    ) -> Context<'a> {
        Context {
            node_name: "node-a",
            nodes,
            pod_localities: pods,
            external_ips: false,
            cluster_domain: "cluster.local",
            label_sets: Box::leak(Box::default()),
        }
    }

    fn service(ports: &[(&str, u16)]) -> ServiceRecord {
        ServiceRecord {
            key: ObjectKey::new("default", "web"),
            kind: ServiceKind::Virtual,
            cluster_ips: vec![Ipv4Addr::new(10, 96, 0, 10)],
            external_ips: vec![Ipv4Addr::new(192, 0, 2, 1)],
            ports: ports
                .iter()
                .enumerate()
                .map(|(i, (name, port))| ServicePort {
                    path: format!("spec.ports[{i}]"),
                    name: name.to_string(),
                    port: *port,
                    protocol: Protocol::Tcp,
                    http: false,
                })
                .collect(),
            session_affinity: None,
            local_only: false,
            traffic_distribution: None,
            problems: Vec::new(),
        }
    }

    fn ep(last: u8, ready: bool, serving: bool, terminating: bool, node: &str) -> SliceEndpoint {
        SliceEndpoint {
            address: Ipv4Addr::new(10, 200, 0, last),
            ready,
            serving,
            terminating,
            node_name: Some(node.to_string()),
            zone: None,
            pod: None,
        }
    }

    fn slice(name: &str, ports: &[(&str, u16)], endpoints: Vec<SliceEndpoint>) -> SliceRecord {
        SliceRecord {
            key: ObjectKey::new("default", name),
            service: Some(ObjectKey::new("default", "web")),
            ports: ports
                .iter()
                .map(|(n, p)| SlicePort {
                    name: n.to_string(),
                    port: *p,
                    protocol: Protocol::Tcp,
                })
                .collect(),
            endpoints,
            trigger_time: None,
            problems: Vec::new(),
        }
    }

    fn addresses(t: &Translated, i: usize) -> Vec<String> {
        t.service.as_ref().unwrap().services[i]
            .1
            .endpoints
            .iter()
            .map(|e| format!("{}:{}", e.address, e.port))
            .collect()
    }

    fn draining(t: &Translated) -> Vec<String> {
        t.states
            .iter()
            .map(|((_, a, p), s)| {
                assert_eq!(*s, BackendState::Draining);
                format!("{a}:{p}")
            })
            .collect()
    }

    /// Ports are matched by name: a named `targetPort` resolves per slice (each slice
    /// carries the number its pods use), and a slice port of another name serves another
    /// Service port.
    /// An ExternalName Service becomes a frontend per port on an allocated VIP, its one
    /// endpoint the external name (resolved by the agent); through the join, the VIP is
    /// the one its host gets (stable), and the Service is found by its name.
    #[test]
    fn an_external_name_service_is_balanced_by_name() {
        let nodes = HashMap::new();
        let pods = HashMap::new();
        let mut record = service(&[("http", 80)]);
        record.kind = ServiceKind::ExternalName("db.example.org".into());
        record.cluster_ips.clear();
        let t = translate(&record, &[], &ctx(&nodes, &pods));
        let cs = t.service.expect("balanced");
        assert!(cs.auto_vip);
        let (_, s) = &cs.services[0];
        assert_eq!(&*s.named[0].hostname, "db.example.org");
        assert_eq!(s.named[0].port, 80);
        let input = crate::config::ClusterInput {
            services: vec![cs],
            ..Default::default()
        };
        let joined = crate::config::join(&Default::default(), &input).unwrap();
        let vip = joined.config.services[0].frontend.vip;
        assert_eq!(
            vip,
            crate::config::auto_vip("web.default.svc.cluster.local", 0)
        );
        assert!(joined.config.hosts["web.default.svc.cluster.local"].contains(&vip));
        // No ports: nothing to balance.
        let mut no_ports = record.clone();
        no_ports.ports.clear();
        assert!(translate(&no_ports, &[], &ctx(&nodes, &pods))
            .service
            .is_none());
    }

    #[test]
    fn ports_match_by_name_per_slice() {
        let (nodes, pods) = (HashMap::new(), HashMap::new());
        let svc = service(&[("web", 80), ("admin", 9000)]);
        let a = slice(
            "web-a",
            &[("web", 8080), ("admin", 9901)],
            vec![ep(1, true, true, false, "node-a")],
        );
        let b = slice(
            "web-b",
            &[("web", 8081)],
            vec![ep(2, true, true, false, "n2")],
        );
        let t = translate(&svc, &[&b, &a], &ctx(&nodes, &pods));
        assert_eq!(addresses(&t, 0), ["10.200.0.1:8080", "10.200.0.2:8081"]);
        assert_eq!(addresses(&t, 1), ["10.200.0.1:9901"]);
        let s = &t.service.as_ref().unwrap().services[0].1;
        assert_eq!(s.name, "web.default.svc.cluster.local");
        assert_eq!(s.frontend.port, 80);
    }

    /// Not-ready endpoints drain; serving-and-terminating ones take new connections only
    /// when no endpoint is ready anywhere; terminating-not-serving never do.
    #[test]
    fn conditions_follow_kube_proxy() {
        let (nodes, pods) = (HashMap::new(), HashMap::new());
        let svc = service(&[("", 80)]);
        let s = slice(
            "s",
            &[("", 8080)],
            vec![
                ep(1, true, true, false, "n1"),
                ep(2, false, false, false, "n1"),
                ep(3, false, true, true, "n1"),
            ],
        );
        let t = translate(&svc, &[&s], &ctx(&nodes, &pods));
        assert_eq!(addresses(&t, 0).len(), 3);
        assert_eq!(draining(&t), ["10.200.0.2:8080", "10.200.0.3:8080"]);
        // No ready endpoint: the serving terminating one takes new connections.
        let s = slice(
            "s",
            &[("", 8080)],
            vec![
                ep(2, false, false, false, "n1"),
                ep(3, false, true, true, "n1"),
                ep(4, false, false, true, "n1"),
            ],
        );
        let t = translate(&svc, &[&s], &ctx(&nodes, &pods));
        assert_eq!(draining(&t), ["10.200.0.2:8080", "10.200.0.4:8080"]);
    }

    /// The same address and port in two slices (a pod moving between slices): one
    /// endpoint, the non-terminating copy.
    #[test]
    fn duplicates_keep_the_non_terminating_copy() {
        let (nodes, pods) = (HashMap::new(), HashMap::new());
        let svc = service(&[("", 80)]);
        let a = slice("a", &[("", 8080)], vec![ep(1, false, true, true, "n1")]);
        let b = slice("b", &[("", 8080)], vec![ep(1, true, true, false, "n1")]);
        for order in [[&a, &b], [&b, &a]] {
            let t = translate(&svc, &order, &ctx(&nodes, &pods));
            assert_eq!(addresses(&t, 0), ["10.200.0.1:8080"]);
            assert!(t.states.is_empty(), "{:?}", t.states);
        }
    }

    /// `internalTrafficPolicy: Local`: only this node's endpoints, never another's, even
    /// when none is local.
    #[test]
    fn local_traffic_policy_never_leaves_the_node() {
        let (nodes, pods) = (HashMap::new(), HashMap::new());
        let mut svc = service(&[("", 80)]);
        svc.local_only = true;
        let s = slice(
            "s",
            &[("", 8080)],
            vec![
                ep(1, true, true, false, "node-a"),
                ep(2, true, true, false, "node-b"),
            ],
        );
        let t = translate(&svc, &[&s], &ctx(&nodes, &pods));
        assert_eq!(addresses(&t, 0), ["10.200.0.1:8080"]);
        let s = slice("s", &[("", 8080)], vec![ep(2, true, true, false, "node-b")]);
        let t = translate(&svc, &[&s], &ctx(&nodes, &pods));
        assert!(addresses(&t, 0).is_empty());
    }

    /// Istio's locality: the pod's label first, then its node's labels, then the slice's
    /// zone; the endpoint carries the labels failoverPriority reads.
    #[test]
    fn endpoint_locality_pod_label_then_node_then_slice_zone() {
        let mut nodes = HashMap::new();
        nodes.insert(
            "n1".to_string(),
            BTreeMap::from([
                (REGION_LABEL.to_string(), "r1".to_string()),
                (
                    "failure-domain.beta.kubernetes.io/zone".to_string(),
                    "z1".to_string(),
                ),
            ]),
        );
        let mut pods = HashMap::new();
        pods.insert(ObjectKey::new("default", "p2"), "r9/z9/s9".to_string());
        let svc = service(&[("", 80)]);
        let mut e1 = ep(1, true, true, false, "n1");
        let mut e2 = ep(2, true, true, false, "n1");
        e2.pod = Some(ObjectKey::new("default", "p2"));
        let mut e3 = ep(3, true, true, false, "unknown-node");
        e3.zone = Some("z3".into());
        e1.pod = Some(ObjectKey::new("default", "p1"));
        let s = slice("s", &[("", 8080)], vec![e1, e2, e3]);
        let t = translate(&svc, &[&s], &ctx(&nodes, &pods));
        let eps = &t.service.as_ref().unwrap().services[0].1.endpoints;
        let localities: Vec<String> = eps.iter().map(|e| e.locality.to_string()).collect();
        assert_eq!(localities, ["r1/z1/", "r9/z9/s9", "/z3/"]);
        assert_eq!(eps[0].labels[HOSTNAME_LABEL], "n1");
        assert_eq!(eps[0].labels[ZONE_LABEL], "z1");
    }

    #[test]
    fn traffic_distribution_maps_to_forced_failover_priority() {
        let zone = traffic_distribution_setting("PreferSameZone").unwrap();
        assert_eq!(
            zone.failover_priority,
            [NETWORK_LABEL, REGION_LABEL, ZONE_LABEL]
        );
        assert!(zone.force);
        assert_eq!(traffic_distribution_setting("PreferClose"), Some(zone));
        let node = traffic_distribution_setting("PreferSameNode").unwrap();
        assert_eq!(node.failover_priority.len(), 5);
        assert_eq!(node.failover_priority[4], HOSTNAME_LABEL);
        assert_eq!(traffic_distribution_setting("Nearby"), None);
    }

    /// External IPs only when turned on; session affinity and HTTP carried to each service.
    #[test]
    fn external_ips_and_affinity() {
        let (nodes, pods) = (HashMap::new(), HashMap::new());
        let mut svc = service(&[("", 80)]);
        svc.session_affinity = Some(Duration::from_secs(30));
        let s = slice("s", &[("", 8080)], vec![ep(1, true, true, false, "n1")]);
        let t = translate(&svc, &[&s], &ctx(&nodes, &pods));
        assert_eq!(t.service.as_ref().unwrap().services.len(), 1);
        let mut c = ctx(&nodes, &pods);
        c.external_ips = true;
        let t = translate(&svc, &[&s], &c);
        let services = &t.service.as_ref().unwrap().services;
        assert_eq!(services.len(), 2);
        assert_eq!(services[1].1.frontend.vip, Ipv4Addr::new(192, 0, 2, 1));
        assert_eq!(
            services[1].1.session_affinity,
            Some(Duration::from_secs(30))
        );
    }
}
