//! What the agent balances, independent of where it was configured (Istio resources or
//! lb's own documents): services with their endpoints and traffic policy, and the node.
//!
//! Config parsing produces these; the locality and outlier logic consume them.

use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc, time::Duration};

use crate::dataplane::Frontend;

/// A locality `region/zone/subzone`; any part may be empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    /// Parses `region/zone/subzone` (Istio's form; trailing parts may be left out).
    pub fn parse(s: &str) -> Self {
        let mut parts = s.splitn(3, '/').map(str::to_string);
        Self {
            region: parts.next().unwrap_or_default(),
            zone: parts.next().unwrap_or_default(),
            subzone: parts.next().unwrap_or_default(),
        }
    }
}

/// The deprecated topology labels Kubernetes and Istio still read.
const LEGACY_REGION_LABEL: &str = "failure-domain.beta.kubernetes.io/region";
const LEGACY_ZONE_LABEL: &str = "failure-domain.beta.kubernetes.io/zone";

impl Locality {
    /// A node's locality from its labels: Kubernetes' topology labels (the deprecated
    /// `failure-domain.beta` ones when those are missing) and Istio's subzone label. An
    /// empty value counts as missing.
    pub fn from_topology_labels(labels: &BTreeMap<String, String>) -> Self {
        use crate::locality::{REGION_LABEL, SUBZONE_LABEL, ZONE_LABEL};
        let get = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| labels.get(*k).filter(|v| !v.is_empty()))
                .cloned()
                .unwrap_or_default()
        };
        Self {
            region: get(&[REGION_LABEL, LEGACY_REGION_LABEL]),
            zone: get(&[ZONE_LABEL, LEGACY_ZONE_LABEL]),
            subzone: get(&[SUBZONE_LABEL]),
        }
    }

    /// The value of Istio's locality label (`topology.istio.io/locality`,
    /// `istio-locality`), as Istio's `SanitizeLocalityLabel` reads it: `.` separates the
    /// parts unless the value already has a `/`.
    pub fn from_istio_label(value: &str) -> Self {
        if value.contains('/') {
            Self::parse(value)
        } else {
            Self::parse(&value.replace('.', "/"))
        }
    }
}

impl std::fmt::Display for Locality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.region, self.zone, self.subzone)
    }
}

/// The node the agent runs on (the client side of every connection it balances).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    pub locality: Locality,
    pub labels: BTreeMap<String, String>,
}

/// The labels of an endpoint that has none, shared: a configuration of a million endpoints
/// holds one empty map, not a million.
pub fn no_labels() -> Arc<BTreeMap<String, String>> {
    static EMPTY: std::sync::LazyLock<Arc<BTreeMap<String, String>>> =
        std::sync::LazyLock::new(Default::default);
    EMPTY.clone()
}

/// One endpoint of a service, with its service port already mapped to the endpoint port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub address: Ipv4Addr,
    pub port: u16,
    pub locality: Locality,
    /// Shared: the endpoints on one node in one locality have the same ones, and a
    /// cluster has many endpoints and few nodes.
    pub labels: Arc<BTreeMap<String, String>>,
    /// Istio's endpoint `weight` (default 1).
    pub weight: u32,
    /// The name it was resolved from (a ServiceEntry endpoint with `resolution: DNS`):
    /// Envoy's `hostname`.
    pub hostname: Option<Arc<str>>,
}

/// An endpoint known by name (`resolution: DNS`): the agent resolves it, and each
/// address the name has becomes an [`Endpoint`] with these fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedEndpoint {
    pub hostname: Arc<str>,
    pub port: u16,
    pub locality: Locality,
    pub labels: Arc<BTreeMap<String, String>>,
    pub weight: u32,
    /// `DNS_ROUND_ROBIN`: one of the name's addresses at a time, not all of them.
    pub one_at_a_time: bool,
}

/// `localityLbSetting.failover[]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failover {
    pub from: String,
    pub to: String,
}

/// `localityLbSetting.distribute[]`: `from` pattern → weight per `to` pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Distribute {
    pub from: String,
    pub to: BTreeMap<String, u32>,
}

/// `trafficPolicy.loadBalancer.localityLbSetting`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalityLbSetting {
    /// `enabled`; `None` means not set (Istio's default: on).
    pub enabled: Option<bool>,
    pub failover: Vec<Failover>,
    pub failover_priority: Vec<String>,
    pub distribute: Vec<Distribute>,
    /// Istio's `Force`: fail over even without outlier detection. Set for the settings a
    /// Kubernetes Service's `trafficDistribution` stands for (istio/istio#54715); no field
    /// of a DestinationRule sets it.
    pub force: bool,
}

/// `trafficPolicy.outlierDetection`, with Istio's defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierDetection {
    /// 0 disables.
    pub consecutive_5xx_errors: u32,
    /// 0 disables (Istio's default: off).
    pub consecutive_gateway_errors: u32,
    pub split_external_local_origin_errors: bool,
    pub consecutive_local_origin_failures: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    /// Envoy's default: max(300 s, base_ejection_time).
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
    /// Istio's `minHealthPercent`: the panic threshold (0 = panic mode off).
    pub min_health_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_5xx_errors: 5,
            consecutive_gateway_errors: 0,
            split_external_local_origin_errors: false,
            consecutive_local_origin_failures: 5,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            min_health_percent: 0,
        }
    }
}

/// The parts of a DestinationRule's `trafficPolicy` lb acts on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrafficPolicy {
    pub locality_lb: Option<LocalityLbSetting>,
    pub outlier_detection: Option<OutlierDetection>,
    /// Active health checks of the endpoints (lb's `HealthCheck` document).
    pub health_check: Option<HealthCheck>,
    /// TLS the node originates to the endpoints (`trafficPolicy.tls`, mode `SIMPLE` or
    /// `MUTUAL`): the frontend is served by the TLS forwarder instead of the kernel path.
    pub tls: Option<TlsOrigination>,
}

/// A DestinationRule's `trafficPolicy.tls` (ClientTLSSettings) that lb acts on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsOrigination {
    /// `MUTUAL`: the client certificate and its key (PEM files) presented to endpoints.
    pub client_certificate: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// The name sent as SNI and checked on the endpoint's certificate (unless
    /// `subject_alt_names` are given); without it, each endpoint's DNS name, else its
    /// address.
    pub sni: Option<String>,
    /// PEM file of the CAs that endpoint certificates must chain to; without it, the
    /// system's roots.
    pub ca_certificates: Option<std::path::PathBuf>,
    /// One of these names must be on the endpoint's certificate (instead of the SNI).
    pub subject_alt_names: Vec<String>,
    /// No verification of the endpoint's certificate at all.
    pub insecure_skip_verify: bool,
}

/// How an endpoint is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthCheckKind {
    /// A TCP connection is opened (and closed): the endpoint accepts connections.
    Tcp,
    /// `GET path` (with `Host: host`, else the endpoint's address) answers one of the
    /// expected statuses (ranges, both ends included).
    Http {
        path: String,
        host: Option<String>,
        expected_statuses: Vec<(u16, u16)>,
    },
}

/// Envoy's active health checking, for one host's endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: HealthCheckKind,
    pub interval: Duration,
    /// Up to this much is added to each interval, at random, so checks spread out.
    pub interval_jitter: Duration,
    pub timeout: Duration,
    /// Failed checks in a row that make a healthy endpoint unhealthy.
    pub unhealthy_threshold: u32,
    /// Passed checks in a row that make an unhealthy endpoint healthy.
    pub healthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            kind: HealthCheckKind::Tcp,
            interval: Duration::from_secs(5),
            interval_jitter: Duration::ZERO,
            timeout: Duration::from_secs(1),
            unhealthy_threshold: 2,
            healthy_threshold: 1,
        }
    }
}

/// A balanced service: one frontend (VIP, port, protocol) and its endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Host name (Istio) or configured name, for messages and views.
    pub name: String,
    pub frontend: Frontend,
    pub endpoints: Arc<[Endpoint]>,
    /// Its endpoints known by name; `endpoints` holds what they resolved to (after the
    /// endpoints given by address).
    pub named: Arc<[NamedEndpoint]>,
    pub policy: TrafficPolicy,
    /// Cleartext HTTP/1.x (Istio protocol `HTTP` or `HTTP_PROXY`): the data plane reads
    /// response statuses, and a completed connect alone is not a success (as for Envoy's
    /// HTTP router, where the response decides).
    pub http: bool,
    /// Kubernetes `sessionAffinity: ClientIP`: a client's new connections keep going to the
    /// backend it last used, while that backend takes new connections, until the client has
    /// been silent this long (`sessionAffinityConfig.clientIP.timeoutSeconds`).
    pub session_affinity: Option<Duration>,
    /// Where the service was defined.
    pub source: Source,
}

impl Service {
    /// A copy of everything but the endpoints (which are what changes most, and most).
    pub fn clone_without_endpoints(&self) -> Service {
        Service {
            name: self.name.clone(),
            frontend: self.frontend,
            endpoints: Default::default(),
            named: self.named.clone(),
            policy: self.policy.clone(),
            http: self.http,
            session_affinity: self.session_affinity,
            source: self.source.clone(),
        }
    }

    /// Whether `other` is this service with other endpoints at most.
    pub fn same_but_endpoints(&self, other: &Service) -> bool {
        let Service {
            name,
            frontend,
            endpoints: _,
            named,
            policy,
            http,
            session_affinity,
            source,
        } = self;
        *name == other.name
            && *frontend == other.frontend
            && *named == other.named
            && *policy == other.policy
            && *http == other.http
            && *session_affinity == other.session_affinity
            && *source == other.source
    }
}

/// Where a service was defined: for views and messages.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    /// A configuration file; the document that defined it (`lb.yaml document 2
    /// (ServiceEntry default/mydb)`).
    File(String),
    /// A Kubernetes Service, by namespace and name.
    Kubernetes { namespace: String, name: String },
    /// An Istio resource read from the cluster (`ServiceEntry default/mydb`).
    Cluster(String),
    /// Made in code (tests, benchmarks).
    #[default]
    Unknown,
}

impl Source {
    /// `file`, `kubernetes` or `-`: the SOURCE column of the views.
    pub fn kind(&self) -> &'static str {
        match self {
            Source::File(_) => "file",
            Source::Kubernetes { .. } | Source::Cluster(_) => "kubernetes",
            Source::Unknown => "-",
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(document) | Source::Cluster(document) => write!(f, "{document}"),
            Source::Kubernetes { namespace, name } => {
                write!(f, "Kubernetes Service {namespace}/{name}")
            }
            Source::Unknown => write!(f, "-"),
        }
    }
}
