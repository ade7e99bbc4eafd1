//! The agent's configuration: YAML files of one or more documents (`---` between them),
//! merged in load order (files as given; a directory's `*.yaml` and `*.yml` files sorted by
//! name, not recursively). Documents are numbered from 1 in each file, empty ones not counted.
//!
//! Three kinds of document:
//!
//! - Istio's `ServiceEntry` and `DestinationRule` (`networking.istio.io/v1`, `v1beta1`,
//!   `v1alpha3`), as users already write them: `istio.rs` says what lb takes from them.
//! - lb's `Node` (where this node is, for locality load balancing):
//!   ```yaml
//!   apiVersion: lb/v1alpha1
//!   kind: Node
//!   spec:
//!     locality: region1/zone1          # or the topology labels in `labels`
//!     labels: { topology.kubernetes.io/region: region1 }
//!     dataplane: { max_connections: 262144 }   # as the `dataplane:` section below
//!   ```
//! - lb's original format, a document with no `kind`:
//!   ```yaml
//!   dataplane:                 # optional; sizes and timeouts fixed at load
//!     max_services: 256
//!     max_backends: 4096
//!     table_slots: 4096
//!     max_connections: 262144
//!     max_affinity: 65536
//!     timeouts: { tcp_syn: 60s, tcp_established: 6h, tcp_closing: 10s, udp: 60s }
//!   services:
//!     - name: web
//!       vip: 10.96.0.10
//!       port: 80
//!       protocol: TCP          # TCP (default) or UDP
//!       backends:
//!         - { address: 10.200.1.2, port: 8080, weight: 1, state: active }
//!   ```
//!
//! Every message names the document, the field and the reason:
//! `lb.yaml document 2 (DestinationRule default/helloworld): spec.trafficPolicy.outlierDetection.interval: "soon" is not a duration`.
//! A field of an Istio resource that lb does not act on is a warning (users' YAML carries
//! many); an unknown field in lb's own documents is an error (a typo). Every error in every
//! file is reported at once, in an [`InvalidConfig`].

mod diagnostics;
mod duration;
mod health_check;
pub mod host;
mod istio;
mod native;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::Result;
use lb_common::BackendState;
use serde_json::{Map, Value};

use self::diagnostics::{describe, Doc, Report, UnknownFields};
pub use self::{
    diagnostics::InvalidConfig,
    istio::{auto_vip, dns_name_problem},
};
use crate::{
    dataplane::{DataplaneOptions, Frontend},
    model::{LocalityLbSetting, Node, Service, Source},
};

/// A validated configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub dataplane: DataplaneOptions,
    /// This node (from the `Node` document; empty without one).
    pub node: Node,
    pub services: Vec<Service>,
    /// Backends that the original format configures `draining` or `ejected`, by service
    /// frontend, address and port; every other endpoint starts active.
    pub initial_states: BTreeMap<(Frontend, Ipv4Addr, u16), BackendState>,
    /// The VIPs of each host name (a ServiceEntry's hosts, a Kubernetes Service's name),
    /// for the DNS responder.
    pub hosts: BTreeMap<String, BTreeSet<Ipv4Addr>>,
}

/// A configuration and what was said about it.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub config: Config,
    /// Fields lb does not act on, and other things an operator should know; each names the
    /// document and the field.
    pub warnings: Vec<String>,
}

/// Reads files and directories (their `*.yaml` and `*.yml` files, sorted by name) and merges
/// every document. Fails with an [`InvalidConfig`] listing every error.
pub fn load_paths(paths: &[PathBuf]) -> Result<Loaded> {
    Ok(load_files(paths)?.1)
}

/// The documents of the configuration files, checked: what [`join`] merges with the
/// cluster's objects each time either changes, without reading the files again.
#[derive(Clone, Debug, Default)]
pub struct FileDocuments {
    documents: Vec<(String, Value)>,
}

/// Reads and checks the configuration files, as [`load_paths`], and keeps their documents.
pub fn load_files(paths: &[PathBuf]) -> Result<(FileDocuments, Loaded)> {
    let mut reader = Reader {
        keep_documents: true,
        ..Default::default()
    };
    for path in paths {
        reader.read_path(path);
    }
    let documents = std::mem::take(&mut reader.kept);
    let loaded = reader.finish()?;
    Ok((FileDocuments { documents }, loaded))
}

/// What a cluster contributes to the configuration (see `sources::kubernetes`).
#[derive(Clone, Debug, Default)]
pub struct ClusterInput {
    /// This node as the cluster describes it (locality and labels); `None` while unknown.
    pub node: Option<Node>,
    /// Istio resources (`DestinationRule`, `ServiceEntry`) read from the cluster, each with
    /// its label for messages (`DestinationRule default/reviews`). Read as a file's
    /// documents are, except that a resource with an error is left out alone.
    pub documents: Vec<(String, Value)>,
    /// Services the cluster defines directly (Kubernetes Services).
    pub services: Vec<ClusterService>,
    /// Endpoints that take no new connections (not ready, or terminating while others
    /// are ready): `Draining`.
    pub states: Vec<((Frontend, Ipv4Addr, u16), BackendState)>,
}

/// What changed in a cluster since it was last read: everything, or only endpoints.
#[derive(Debug)]
pub enum ClusterChange {
    /// The whole contribution, to be joined with the files again: the node, an Istio
    /// resource, or the set, frontends or fields of a Service changed.
    Full(ClusterInput),
    /// Only the endpoints (and their states) of these services changed; every other field
    /// of theirs, and everything else, is as in the contribution last joined. Applied
    /// service by service, without joining again: what a cluster's endpoint churn costs
    /// does not grow with the number of services.
    Endpoints(Vec<EndpointsUpdate>),
}

/// The endpoints one service (frontend) has now.
#[derive(Clone, Debug)]
pub struct EndpointsUpdate {
    pub frontend: Frontend,
    /// The object that defines it: the update applies only where that object's service
    /// is the one in force (not where a file's service took the frontend).
    pub source: Source,
    pub endpoints: std::sync::Arc<[crate::model::Endpoint]>,
    /// Endpoints that take no new connections, by address and port.
    pub states: Vec<(Ipv4Addr, u16, BackendState)>,
}

/// The frontends of one cluster object, as one unit for DestinationRules to match.
#[derive(Clone, Debug)]
pub struct ClusterService {
    /// `Kubernetes Service default/web`, for messages.
    pub label: String,
    /// The hosts DestinationRules match (`web.default.svc.cluster.local`).
    pub hosts: Vec<String>,
    /// Each service with the fields that defined it (`spec.ports[0]`).
    pub services: Vec<(String, Service)>,
    /// The locality setting that applies when no DestinationRule sets one (a Service's
    /// `trafficDistribution`).
    pub default_locality_lb: Option<LocalityLbSetting>,
    /// No VIP of its own (an ExternalName Service): one is allocated for its first host,
    /// as for a ServiceEntry without addresses.
    pub auto_vip: bool,
}

impl ClusterService {
    /// Whether `other` differs from this one in its services' endpoints at most (the
    /// change [`ClusterChange::Endpoints`] carries).
    pub fn same_but_endpoints(&self, other: &ClusterService) -> bool {
        self.label == other.label
            && self.auto_vip == other.auto_vip
            && self.hosts == other.hosts
            && self.default_locality_lb == other.default_locality_lb
            && self.services.len() == other.services.len()
            && self
                .services
                .iter()
                .zip(&other.services)
                .all(|((path_a, a), (path_b, b))| path_a == path_b && a.same_but_endpoints(b))
    }
}

/// Merges the checked file documents with the cluster's contribution. Precedence, where
/// both define the same frontend (VIP, port, protocol): the files win, and the cluster's
/// service is left out with a warning naming both. An Istio resource from the cluster with
/// an error is left out (its error is returned among the warnings, prefixed `rejected:`),
/// and everything else applies: a bad cluster object never stops the rest.
pub fn join(files: &FileDocuments, cluster: &ClusterInput) -> Result<Loaded> {
    let mut reader = Reader::default();
    for (at, document) in &files.documents {
        reader.read_document(at.clone(), document, true);
    }
    let file_origins = reader.origins.len();
    for (label, document) in &cluster.documents {
        let errors = reader.report.errors.len();
        let (origins, rules) = (reader.origins.len(), reader.rules.len());
        reader.read_document(label.clone(), document, true);
        if reader.report.errors.len() > errors {
            // Left out alone: its services and rules go, its errors become warnings.
            reader.origins.truncate(origins);
            reader.rules.truncate(rules);
            let rejected: Vec<String> = reader.report.errors.drain(errors..).collect();
            reader
                .report
                .warnings
                .extend(rejected.into_iter().map(|e| format!("rejected: {e}")));
        }
    }
    for service in &cluster.services {
        reader.origins.push(Origin {
            label: service.label.clone(),
            hosts: service.hosts.clone(),
            services: service.services.clone(),
            from_cluster: true,
            default_locality_lb: service.default_locality_lb.clone(),
            auto_vip: service.auto_vip,
        });
    }
    // Cluster ServiceEntries came after the files' origins too: every origin past the
    // files' is the cluster's.
    for origin in &mut reader.origins[file_origins..] {
        origin.from_cluster = true;
    }
    if let Some(node) = &cluster.node {
        let file_node = reader.node.take();
        let mut merged = node.clone();
        if let Some((_, file_node)) = &file_node {
            // The file's labels add to the cluster's (never replace them).
            for (k, v) in &file_node.labels {
                merged.labels.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        reader.node = Some(("the cluster's Node".to_string(), merged));
    }
    reader.initial_states.extend(cluster.states.iter().cloned());
    reader.finish()
}

/// Parses configuration text; `source` names it in messages (a file name).
pub fn parse_str(text: &str, source: &str) -> Result<Loaded> {
    let mut reader = Reader::default();
    reader.read_text(text, source);
    reader.finish()
}

/// Reads and validates a configuration file or directory; warnings are logged.
pub fn load(path: &Path) -> Result<Config> {
    Ok(logged(load_paths(&[path.to_path_buf()])?))
}

/// Parses and validates configuration text; warnings are logged.
pub fn parse(text: &str) -> Result<Config> {
    Ok(logged(parse_str(text, "configuration")?))
}

fn logged(loaded: Loaded) -> Config {
    for w in &loaded.warnings {
        log::warn!("{w}");
    }
    loaded.config
}

/// The services of one document, in load order.
struct Origin {
    label: String,
    /// A ServiceEntry's hosts, which DestinationRules match; empty for lb's own services.
    hosts: Vec<String>,
    /// Each service with the fields that defined it, for messages.
    services: Vec<(String, Service)>,
    /// From the cluster: a frontend a file defines too is left out with a warning instead
    /// of being an error.
    from_cluster: bool,
    /// The locality setting when no DestinationRule gives one (`trafficDistribution`).
    default_locality_lb: Option<LocalityLbSetting>,
    /// A ServiceEntry without addresses: its services' VIP is allocated in `finish`.
    auto_vip: bool,
}

/// Collects documents from every source, then joins and checks them in [`Reader::finish`].
#[derive(Default)]
struct Reader {
    report: Report,
    /// The data plane settings, with the document that set them.
    dataplane: Option<(String, DataplaneOptions)>,
    node: Option<(String, Node)>,
    origins: Vec<Origin>,
    rules: Vec<istio::DestinationRule>,
    /// HealthCheck documents, each with its label.
    health_checks: Vec<(String, health_check::HealthCheckDocument)>,
    initial_states: BTreeMap<(Frontend, Ipv4Addr, u16), BackendState>,
    /// Keep every top-level document read (`kept`), for [`load_files`].
    keep_documents: bool,
    kept: Vec<(String, Value)>,
}

impl Reader {
    fn read_path(&mut self, path: &Path) {
        let shown = path.display().to_string();
        if !path.is_dir() {
            self.read_file(path);
            return;
        }
        match yaml_files(path) {
            Ok(files) if files.is_empty() => {
                self.report
                    .warning(&shown, "", "no *.yaml or *.yml files in this directory")
            }
            Ok(files) => files.iter().for_each(|f| self.read_file(f)),
            Err(e) => self
                .report
                .error(&shown, "", format!("cannot list the directory: {e}")),
        }
    }

    fn read_file(&mut self, path: &Path) {
        let source = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => self.read_text(&text, &source),
            Err(e) => self.report.error(&source, "", format!("cannot read: {e}")),
        }
    }

    fn read_text(&mut self, text: &str, source: &str) {
        let options = serde_saphyr::options! {
            // One-line messages: the source and line say where.
            with_snippet: false,
            // `port: 080` stays the text it looks like instead of becoming a float.
            leading_zero_numbers_as_strings: true,
        };
        match serde_saphyr::from_multiple_with_options::<Value>(text, options) {
            Ok(documents) => {
                for (i, document) in documents.into_iter().enumerate() {
                    let at = format!("{source} document {}", i + 1);
                    self.read_document(at.clone(), &document, true);
                    if self.keep_documents {
                        self.kept.push((at, document));
                    }
                }
            }
            Err(e) => self
                .report
                .error(source, "", format!("not valid YAML: {e}")),
        }
    }

    /// `at` is `<source> document <n>`; `top_level` is false for the items of a `List`.
    fn read_document(&mut self, at: String, document: &Value, top_level: bool) {
        let Some(root) = document.as_object() else {
            self.report.error(
                &at,
                "",
                format!(
                    "a document is a mapping (apiVersion, kind, metadata, spec), not {}",
                    describe(document)
                ),
            );
            return;
        };
        let text = |key: &str| root.get(key).and_then(Value::as_str);
        let (api_version, kind) = (text("apiVersion"), text("kind"));
        if native::looks_native(root) {
            if top_level {
                self.read_native(at, root);
            } else {
                self.report.error(
                    &at,
                    "",
                    "the items of a List are resources, with apiVersion and kind",
                );
            }
            return;
        }
        let label = label(&at, kind, root);
        match (api_version, kind) {
            (Some(v), Some("ServiceEntry")) if istio::API_VERSIONS.contains(&v) => {
                self.read_service_entry(label, root)
            }
            (Some(v), Some("DestinationRule")) if istio::API_VERSIONS.contains(&v) => {
                self.read_destination_rule(label, root)
            }
            (Some(native::API_VERSION), Some("Node")) => self.read_node(label, root),
            (Some(native::API_VERSION), Some("HealthCheck")) => {
                let mut doc = Doc::new(label.clone(), UnknownFields::Reject, &mut self.report);
                if let Some(check) = health_check::read(&mut doc, root) {
                    self.health_checks.push((label, check));
                }
            }
            // What `kubectl get serviceentries,destinationrules -o yaml` prints.
            (Some("v1"), Some("List")) if top_level => {
                let mut doc = Doc::new(label.clone(), UnknownFields::Warn, &mut self.report);
                let items = root.get("items").map(|v| doc.list("items", v));
                match items {
                    Some(Some(items)) => {
                        for (i, item) in items.iter().enumerate() {
                            self.read_document(format!("{at} item {}", i + 1), item, false);
                        }
                    }
                    Some(None) => {}
                    None => doc.missing("items", "a List holds its documents in items"),
                }
            }
            (None, None) => self.report.error(
                &label,
                "",
                "apiVersion and kind are missing (e.g. networking.istio.io/v1 and ServiceEntry)",
            ),
            (None, Some(_)) => self.report.error(&label, "apiVersion", "missing"),
            (Some(_), None) => self.report.error(&label, "kind", "missing"),
            (Some(v), Some(k @ ("ServiceEntry" | "DestinationRule"))) => self.report.error(
                &label,
                "apiVersion",
                format!(
                    "{v:?} is not one lb reads {k} from: {}",
                    istio::API_VERSIONS.join(", ")
                ),
            ),
            (Some(v), Some(k)) => self.report.error(
                &label,
                "kind",
                format!(
                    "{k} ({v}) is not supported: lb reads ServiceEntry and DestinationRule \
                     ({}), and Node and HealthCheck ({})",
                    istio::API_VERSIONS.join(", "),
                    native::API_VERSION
                ),
            ),
        }
    }

    fn read_native(&mut self, label: String, root: &Map<String, Value>) {
        let mut doc = Doc::new(label.clone(), UnknownFields::Reject, &mut self.report);
        let native = native::read_native(&mut doc, root);
        if let Some(options) = native.dataplane {
            self.set_dataplane(&label, "dataplane", options);
        }
        self.initial_states.extend(native.initial_states);
        self.origins.push(Origin {
            label,
            hosts: Vec::new(),
            services: native.services,
            from_cluster: false,
            default_locality_lb: None,
            auto_vip: false,
        });
    }

    fn read_node(&mut self, label: String, root: &Map<String, Value>) {
        let mut doc = Doc::new(label.clone(), UnknownFields::Reject, &mut self.report);
        let node = native::read_node(&mut doc, root);
        if let Some(options) = node.dataplane {
            self.set_dataplane(&label, "spec.dataplane", options);
        }
        match &self.node {
            Some((first, _)) => self.report.error(
                &label,
                "kind",
                format!("a second Node document: {first} already describes this node"),
            ),
            None => self.node = Some((label, node.node)),
        }
    }

    fn read_service_entry(&mut self, label: String, root: &Map<String, Value>) {
        let mut doc = Doc::new(label.clone(), UnknownFields::Warn, &mut self.report);
        let Some((_, spec)) = istio::read_envelope(&mut doc, root) else {
            return;
        };
        if let Some(entry) = istio::read_service_entry(&mut doc, spec) {
            self.origins.push(Origin {
                label,
                hosts: entry.hosts,
                services: entry.services,
                from_cluster: false,
                default_locality_lb: None,
                auto_vip: entry.auto_vip,
            });
        }
    }

    fn read_destination_rule(&mut self, label: String, root: &Map<String, Value>) {
        let mut doc = Doc::new(label, UnknownFields::Warn, &mut self.report);
        let Some((namespace, spec)) = istio::read_envelope(&mut doc, root) else {
            return;
        };
        if let Some(rule) = istio::read_destination_rule(&mut doc, &namespace, spec) {
            self.rules.push(rule);
        }
    }

    fn set_dataplane(&mut self, label: &str, path: &str, options: DataplaneOptions) {
        match &self.dataplane {
            Some((first, _)) => self.report.error(
                label,
                path,
                format!("the data plane is already configured by {first}: configure it once"),
            ),
            None => self.dataplane = Some((label.to_string(), options)),
        }
    }

    /// Gives each ServiceEntry its DestinationRule, checks that no frontend is defined twice,
    /// and fails if anything was wrong.
    fn finish(mut self) -> Result<Loaded> {
        let mut matched = vec![false; self.rules.len()];
        let mut services = Vec::new();
        let mut hosts: BTreeMap<String, BTreeSet<Ipv4Addr>> = BTreeMap::new();
        // Two checks for one host and port: the second is an error.
        let mut checked: BTreeMap<(String, Option<u16>), &str> = BTreeMap::new();
        for (label, c) in &self.health_checks {
            if let Some(first) = checked.insert((c.host.clone(), c.port), label) {
                self.report.error(
                    label,
                    "spec.host",
                    format!(
                        "{} is already checked by {first}: one HealthCheck per host and port",
                        c.host
                    ),
                );
            }
        }
        let mut checks_used = vec![false; self.health_checks.len()];
        let mut defined_by: BTreeMap<Frontend, String> = BTreeMap::new();
        allocate_vips(&mut self.origins);
        // The files' services first, so that they win over the cluster's.
        self.origins.sort_by_key(|o| o.from_cluster);
        for origin in self.origins {
            let mut policy = if origin.hosts.is_empty() {
                Default::default()
            } else {
                istio::policy_for(
                    &origin.label,
                    &origin.hosts,
                    &self.rules,
                    &mut matched,
                    &mut self.report,
                )
            };
            if policy.locality_lb.is_none() {
                policy.locality_lb = origin.default_locality_lb.clone();
            }
            for (path, mut service) in origin.services {
                let here = format!("{} ({path})", origin.label);
                if let Some(first) = defined_by.get(&service.frontend) {
                    if origin.from_cluster {
                        self.report.warning(
                            &origin.label,
                            &path,
                            format!(
                                "frontend {} is already defined by {first}, which takes \
                                 precedence: this one is left out",
                                service.frontend
                            ),
                        );
                        continue;
                    }
                    self.report.error(
                        &origin.label,
                        &path,
                        format!(
                            "frontend {} is already defined by {first}: each VIP, port and \
                             protocol is defined once",
                            service.frontend
                        ),
                    );
                    continue;
                }
                defined_by.insert(service.frontend, here);
                service.policy = policy.clone();
                // The most specific check: for this port, else for every port.
                let check = self
                    .health_checks
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, c))| {
                        origin.hosts.iter().any(|h| h.eq_ignore_ascii_case(&c.host))
                            && c.port.is_none_or(|p| p == service.frontend.port)
                    })
                    .max_by_key(|(_, (_, c))| c.port.is_some());
                if let Some((i, (_, c))) = check {
                    checks_used[i] = true;
                    service.policy.health_check = Some(c.check.clone());
                }
                if !origin.from_cluster {
                    service.source = Source::File(origin.label.clone());
                } else if service.source == Source::Unknown {
                    service.source = Source::Cluster(origin.label.clone());
                }
                for host in &origin.hosts {
                    hosts
                        .entry(host.to_ascii_lowercase())
                        .or_default()
                        .insert(service.frontend.vip);
                }
                services.push(service);
            }
        }
        istio::report_unmatched(&self.rules, &matched, &mut self.report);
        for ((label, c), used) in self.health_checks.iter().zip(&checks_used) {
            if !used {
                self.report.warning(
                    label,
                    "spec.host",
                    format!(
                        "no service has host {}{}: nothing is checked",
                        c.host,
                        c.port.map(|p| format!(" and port {p}")).unwrap_or_default()
                    ),
                );
            }
        }
        let Report { warnings, errors } = self.report;
        if !errors.is_empty() {
            return Err(InvalidConfig { errors, warnings }.into());
        }
        Ok(Loaded {
            config: Config {
                dataplane: self.dataplane.map(|(_, d)| d).unwrap_or_default(),
                node: self.node.map(|(_, n)| n).unwrap_or_default(),
                services,
                initial_states: self.initial_states,
                hosts,
            },
            warnings,
        })
    }
}

/// Gives the ServiceEntries without addresses their VIPs: each its first host's
/// [`istio::auto_vip`], the next choice where a VIP is taken (by a configured address, or
/// by a host that sorts first), so that a host keeps its VIP across reloads and restarts.
fn allocate_vips(origins: &mut [Origin]) {
    let mut taken: BTreeSet<Ipv4Addr> = origins
        .iter()
        .filter(|o| !o.auto_vip)
        .flat_map(|o| o.services.iter().map(|(_, s)| s.frontend.vip))
        .collect();
    let mut auto: Vec<&mut Origin> = origins.iter_mut().filter(|o| o.auto_vip).collect();
    auto.sort_by(|a, b| a.hosts.first().cmp(&b.hosts.first()));
    for origin in auto {
        let host = origin.hosts.first().cloned().unwrap_or_default();
        // Terminates: the range has 65,534 addresses, more than any configuration's VIPs.
        let vip = (0..)
            .map(|attempt| istio::auto_vip(&host, attempt))
            .find(|vip| !taken.contains(vip))
            .expect("a free address in the range");
        taken.insert(vip);
        for (path, service) in &mut origin.services {
            service.frontend.vip = vip;
            *path = path.replacen("an allocated VIP", &format!("allocated VIP {vip}"), 1);
        }
    }
}

/// `<at> (<Kind> <namespace>/<name>)`, or as much of it as the document has.
fn label(at: &str, kind: Option<&str>, root: &Map<String, Value>) -> String {
    let Some(kind) = kind else {
        return at.to_string();
    };
    let meta = root.get("metadata");
    let meta_text = |key: &str| meta.and_then(|m| m.get(key)).and_then(Value::as_str);
    match (meta_text("name"), kind) {
        (None, _) => format!("{at} ({kind})"),
        // Cluster-scoped: no namespace.
        (Some(name), "Node" | "List") => format!("{at} ({kind} {name})"),
        (Some(name), _) => {
            let namespace = meta_text("namespace").unwrap_or(istio::DEFAULT_NAMESPACE);
            format!("{at} ({kind} {namespace}/{name})")
        }
    }
}

/// A directory's YAML files, sorted by name. Hidden files are skipped: editors leave lock and
/// backup files such as `.#lb.yaml` beside the ones being edited.
fn yaml_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        if yaml && !name.starts_with('.') && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
