//! The cluster as a source of services: `lb agent --kubernetes`.
//!
//! One watch per kind (never polling; kube-rs's watcher with its default backoff): Nodes
//! (this node's locality and labels, and every endpoint's), Services, EndpointSlices, Pods
//! that carry Istio's locality labels (metadata only), and Istio's `DestinationRule` and
//! `ServiceEntry` while their CRDs are installed (a CRD installed later is picked up, one
//! removed takes its objects with it). Each watch turns objects into small records
//! (`objects`) in one [`ClusterState`]; a full list (the first, or after the watch
//! restarts) replaces what the kind held, so what vanished while the agent was away goes
//! too, and a relist that changes nothing changes nothing.
//!
//! The agent reads the cluster's contribution with [`Cluster::input`] (only the Services a
//! change touched are translated again, `translate`) and merges it with the files
//! (`config::join`). It does so only once every kind has had its first full list
//! ([`Cluster::wait_synced`]): before that nothing in the data plane is replaced or
//! removed.

pub mod objects;
mod state;
pub mod translate;

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use futures::StreamExt;
use k8s_openapi::{
    api::{
        core::v1::{Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    api::{Api, ApiResource, DynamicObject, GroupVersionKind},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{watcher, WatchStreamExt},
    Client, ResourceExt,
};
use serde_json::Value;
use tokio::sync::Notify;

pub use self::state::Kind;
use self::{
    objects::ObjectKey,
    state::{ClusterState, Settings, Update},
};
use crate::config::{ClusterChange, ClusterInput};

/// Label a Service carries to be balanced by one proxy only (kube-proxy ignores it).
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// `lb agent --kubernetes` options.
#[derive(Clone, Debug)]
pub struct KubernetesOptions {
    /// A kubeconfig file; otherwise the usual places (in a pod, its service account; else
    /// `KUBECONFIG`, then `~/.kube/config`).
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (`--node-name`, or `NODE_NAME` from the downward API).
    pub node_name: String,
    /// Take only the Services labelled `service.kubernetes.io/service-proxy-name: NAME`.
    pub service_proxy_name: Option<String>,
    /// Balance `externalIPs` and load-balancer ingress IPs too.
    pub external_ips: bool,
    /// The cluster's DNS domain, for Service host names.
    pub cluster_domain: String,
}

/// Counters of the watches, for `/metrics`.
#[derive(Default)]
pub struct WatchCounters {
    /// Watch errors after which the watch starts again (reconnects, relists), per kind.
    pub restarts: [AtomicU64; 7],
    /// Events received, per kind.
    pub events: [AtomicU64; 7],
}

fn kind_index(kind: Kind) -> usize {
    kind as usize
}

struct Shared {
    state: Mutex<ClusterState>,
    settings: Settings,
    changed: Notify,
    counters: WatchCounters,
}

/// A handle on the cluster source; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    shared: Arc<Shared>,
}

/// What the cluster source says of itself.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClusterStatus {
    pub node_name: String,
    pub synced: bool,
    /// Kinds still waiting for their first list.
    pub waiting_for: Vec<&'static str>,
    /// Objects held per kind.
    pub objects: Vec<(&'static str, usize)>,
    /// Watch restarts per kind.
    pub watch_restarts: Vec<(&'static str, u64)>,
    /// Problems of objects lb could not (wholly) use.
    pub problems: Vec<String>,
}

const ALL_KINDS: [Kind; 7] = [
    Kind::Node,
    Kind::Service,
    Kind::EndpointSlice,
    Kind::Pod,
    Kind::CustomResourceDefinition,
    Kind::DestinationRule,
    Kind::ServiceEntry,
];

impl Cluster {
    /// Connects to the API server and starts every watch. Returns at once; see
    /// [`Cluster::wait_synced`].
    pub async fn connect(options: KubernetesOptions) -> Result<Self> {
        let client = client(options.kubeconfig.as_deref()).await?;
        log::info!(
            "Kubernetes: watching the cluster as node {:?}{}",
            options.node_name,
            options
                .service_proxy_name
                .as_ref()
                .map(|n| format!(", Services labelled {SERVICE_PROXY_NAME_LABEL}={n} only"))
                .unwrap_or_default()
        );
        let expected = [
            Kind::Node,
            Kind::Service,
            Kind::EndpointSlice,
            Kind::Pod,
            Kind::CustomResourceDefinition,
        ];
        let cluster = Self {
            shared: Arc::new(Shared {
                state: Mutex::new(ClusterState::new(expected)),
                settings: Settings {
                    node_name: options.node_name.clone(),
                    external_ips: options.external_ips,
                    cluster_domain: options.cluster_domain.clone(),
                },
                changed: Notify::new(),
                counters: WatchCounters::default(),
            }),
        };
        cluster.spawn_watches(client, &options);
        Ok(cluster)
    }

    fn spawn_watches(&self, client: Client, options: &KubernetesOptions) {
        // Nodes: labels only matter; a change of anything else is dropped at the source.
        let nodes = Api::<Node>::all(client.clone());
        tokio::spawn(watch(
            self.clone(),
            Kind::Node,
            nodes,
            watcher::Config::default().any_semantic(),
            |n: &Node| (n.name_any(), objects::node_labels(n)),
            |state, update| state.update_nodes(update),
        ));

        // Services: headless ones are skipped by kube-proxy's own filter too.
        let mut selector = vec!["!service.kubernetes.io/headless".to_string()];
        if let Some(name) = &options.service_proxy_name {
            selector.push(format!("{SERVICE_PROXY_NAME_LABEL}={name}"));
        }
        let services = Api::<Service>::all(client.clone());
        tokio::spawn(watch(
            self.clone(),
            Kind::Service,
            services,
            watcher::Config::default()
                .any_semantic()
                .labels(&selector.join(",")),
            objects::service_record,
            |state, update| state.update_services(update),
        ));

        let slices = Api::<EndpointSlice>::all(client.clone());
        tokio::spawn(watch(
            self.clone(),
            Kind::EndpointSlice,
            slices,
            watcher::Config::default().any_semantic(),
            objects::slice_record,
            |state, update| state.update_slices(update),
        ));

        // Pods: only those that carry a locality label, metadata only. Two watches (a
        // selector cannot say "one label or the other"), one state: a pod's override is
        // what its labels say, whichever watch saw it last.
        for (which, label) in objects::POD_LOCALITY_LABELS.into_iter().enumerate() {
            let pods = Api::<kube::core::PartialObjectMeta<Pod>>::all(client.clone());
            let cluster = self.clone();
            tokio::spawn(async move {
                let stream = watcher(
                    pods,
                    watcher::Config::default().any_semantic().labels(label),
                );
                run_watch(
                    cluster,
                    Kind::Pod,
                    stream,
                    |p: &kube::core::PartialObjectMeta<Pod>| {
                        (ObjectKey::of(p), objects::pod_locality(p))
                    },
                    move |state, update| state.update_pods(which, update),
                )
                .await
            });
        }

        // Istio's CRDs: watched by name; while one is installed its objects are watched.
        for (kind, crd_name) in [
            (
                Kind::DestinationRule,
                "destinationrules.networking.istio.io",
            ),
            (Kind::ServiceEntry, "serviceentries.networking.istio.io"),
        ] {
            tokio::spawn(watch_istio_kind(
                self.clone(),
                client.clone(),
                kind,
                crd_name,
            ));
        }
    }

    /// Whether every watched kind has had its first full list.
    pub fn synced(&self) -> bool {
        self.lock().synced()
    }

    /// Waits until every watched kind has had its first full list, saying every 10 s
    /// which kinds it is still waiting for.
    pub async fn wait_synced(&self) {
        loop {
            let waiting = self.lock().unsynced();
            if waiting.is_empty() {
                return;
            }
            let notified = self.shared.changed.notified();
            if tokio::time::timeout(Duration::from_secs(10), notified)
                .await
                .is_err()
            {
                log::info!(
                    "Kubernetes: waiting for the first list of {}; the data plane keeps what \
                     it has meanwhile",
                    waiting.join(", ")
                );
            }
        }
    }

    /// Waits for the next change of anything watched.
    pub async fn changed(&self) {
        self.shared.changed.notified().await
    }

    /// The cluster's contribution to the configuration, and the trigger times of the
    /// slice changes it is the first to include (for the network programming latency).
    pub fn input(&self) -> (ClusterInput, Vec<SystemTime>) {
        let mut state = self.lock();
        let triggers = std::mem::take(&mut state.pending_triggers);
        state.pending_since = None;
        (state.input(&self.shared.settings), triggers)
    }

    /// What changed since the cluster was last read (by `input` or here): only some
    /// Services' endpoints, or more (then the whole contribution); with the trigger times
    /// of the slice changes it is the first to include.
    /// Also when the agent received the first of those changes.
    pub fn changes(&self) -> (ClusterChange, Vec<SystemTime>, Option<std::time::Instant>) {
        let mut state = self.lock();
        let triggers = std::mem::take(&mut state.pending_triggers);
        let seen = state.pending_since.take();
        (state.changes(&self.shared.settings), triggers, seen)
    }

    pub fn status(&self) -> ClusterStatus {
        let state = self.lock();
        ClusterStatus {
            node_name: self.shared.settings.node_name.clone(),
            synced: state.synced(),
            waiting_for: state.unsynced(),
            objects: state
                .counts()
                .into_iter()
                .map(|(k, n)| (k.name(), n))
                .collect(),
            watch_restarts: ALL_KINDS
                .iter()
                .map(|&k| {
                    (
                        k.name(),
                        self.shared.counters.restarts[kind_index(k)].load(Ordering::Relaxed),
                    )
                })
                .collect(),
            problems: state.problems(),
        }
    }

    /// Watch restarts per kind, and events per kind, for `/metrics`.
    pub fn counters(&self) -> Vec<(&'static str, u64, u64)> {
        ALL_KINDS
            .iter()
            .map(|&k| {
                let i = kind_index(k);
                (
                    k.name(),
                    self.shared.counters.restarts[i].load(Ordering::Relaxed),
                    self.shared.counters.events[i].load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClusterState> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies `f` to the state and wakes whoever waits for a change.
    fn update(&self, f: impl FnOnce(&mut ClusterState)) {
        let mut state = self.lock();
        let before = state.changes;
        f(&mut state);
        if state.changes != before && state.pending_since.is_none() {
            state.pending_since = Some(std::time::Instant::now());
        }
        drop(state);
        // Wakes the waiter, or (while nobody waits) leaves a permit, so a change that
        // lands while the last one is being applied is not lost. Only one: waking a waiter
        // and leaving a permit too would apply every change twice.
        self.shared.changed.notify_one();
    }
}

/// A client from `--kubeconfig`, else the usual places.
async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using the kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "finding the cluster: no service account (not in a pod), no KUBECONFIG and no \
             ~/.kube/config; give --kubeconfig",
        )?,
    };
    Client::try_from(config).context("creating the Kubernetes client")
}

/// Watches one kind of typed object.
async fn watch<K, T>(
    cluster: Cluster,
    kind: Kind,
    api: Api<K>,
    config: watcher::Config,
    record: impl Fn(&K) -> T + Send + 'static,
    apply: impl Fn(&mut ClusterState, Update<T>) + Send + 'static,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    T: Send + 'static,
{
    run_watch(cluster, kind, watcher(api, config), record, apply).await
}

/// Feeds a watcher's events to the state: a full list is collected (`Init` …
/// `InitDone`) and applied as one replacement; errors restart the watch after kube-rs's
/// default backoff (800 ms doubling to 30 s), counted.
async fn run_watch<K, T, S>(
    cluster: Cluster,
    kind: Kind,
    stream: S,
    record: impl Fn(&K) -> T + Send + 'static,
    apply: impl Fn(&mut ClusterState, Update<T>) + Send + 'static,
) where
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    K: Send + 'static,
    T: Send + 'static,
{
    let mut stream = std::pin::pin!(stream.default_backoff());
    let mut listing: Option<Vec<T>> = None;
    let i = kind_index(kind);
    loop {
        let event = match stream.next().await {
            Some(Ok(event)) => event,
            Some(Err(e)) => {
                cluster.shared.counters.restarts[i].fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "Kubernetes: watching {}s: {e}; retrying with backoff",
                    kind.name()
                );
                listing = None;
                continue;
            }
            None => return,
        };
        cluster.shared.counters.events[i].fetch_add(1, Ordering::Relaxed);
        match event {
            watcher::Event::Init => listing = Some(Vec::new()),
            watcher::Event::InitApply(object) => {
                listing.get_or_insert_with(Vec::new).push(record(&object))
            }
            watcher::Event::InitDone => {
                let all = listing.take().unwrap_or_default();
                cluster.update(|state| {
                    apply(state, Update::Replace(all));
                    state.mark_synced(kind);
                });
            }
            watcher::Event::Apply(object) => {
                let r = record(&object);
                cluster.update(|state| apply(state, Update::Upsert(r)));
            }
            watcher::Event::Delete(object) => {
                let r = record(&object);
                cluster.update(|state| apply(state, Update::Remove(r)));
            }
        }
    }
}

/// Watches the CRD `crd_name`; while it is installed, watches its objects (in the version
/// it stores, the one `kubectl get` shows) as JSON documents for `config::join`.
async fn watch_istio_kind(cluster: Cluster, client: Client, kind: Kind, crd_name: &str) {
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let config = watcher::Config::default().fields(&format!("metadata.name={crd_name}"));
    let mut stream = std::pin::pin!(watcher(crds, config).default_backoff());
    let mut objects_task: Option<(String, tokio::task::JoinHandle<()>)> = None;
    let mut crd_synced = false;
    let mut installed: Option<String> = None;
    loop {
        let event = match stream.next().await {
            Some(Ok(event)) => event,
            Some(Err(e)) => {
                cluster.shared.counters.restarts[kind_index(Kind::CustomResourceDefinition)]
                    .fetch_add(1, Ordering::Relaxed);
                log::warn!("Kubernetes: watching the CRD {crd_name}: {e}; retrying with backoff");
                continue;
            }
            None => return,
        };
        match event {
            watcher::Event::Init => {
                installed = None;
                continue;
            }
            // Acted on at `InitDone`, with the whole list seen.
            watcher::Event::InitApply(crd) => {
                installed = stored_version(&crd);
                continue;
            }
            watcher::Event::Apply(crd) => installed = stored_version(&crd),
            watcher::Event::Delete(_) => installed = None,
            watcher::Event::InitDone => {}
        }
        // Start, restart (another version) or stop the objects' watch.
        let running = objects_task.as_ref().map(|(v, _)| v.clone());
        if running != installed {
            if let Some((_, task)) = objects_task.take() {
                task.abort();
            }
            match &installed {
                Some(version) => {
                    log::info!(
                        "Kubernetes: {crd_name} is installed: watching {} objects ({version})",
                        kind.name()
                    );
                    cluster.update(|state| state.expect(kind, true));
                    let gvk = GroupVersionKind::gvk("networking.istio.io", version, kind.name());
                    let plural = crd_name.split('.').next().unwrap_or_default();
                    let resource = ApiResource::from_gvk_with_plural(&gvk, plural);
                    let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
                    let api_version = format!("networking.istio.io/{version}");
                    let task = tokio::spawn(watch(
                        cluster.clone(),
                        kind,
                        api,
                        watcher::Config::default().any_semantic(),
                        move |o: &DynamicObject| {
                            (ObjectKey::of(o), istio_document(o, &api_version, kind))
                        },
                        move |state, update| state.update_istio(kind, update),
                    ));
                    objects_task = Some((version.clone(), task));
                }
                None => {
                    if running.is_some() {
                        log::info!(
                            "Kubernetes: {crd_name} was removed: its {} objects no longer apply",
                            kind.name()
                        );
                    }
                    cluster.update(|state| {
                        state.expect(kind, false);
                        state.update_istio(kind, Update::Replace(Vec::new()));
                    });
                }
            }
        }
        if !crd_synced {
            crd_synced = true;
            cluster.update(|state| state.mark_crd_synced(kind));
        }
    }
}

/// The version a CRD stores (else the first served one).
fn stored_version(crd: &CustomResourceDefinition) -> Option<String> {
    let versions = &crd.spec.versions;
    versions
        .iter()
        .find(|v| v.storage)
        .or_else(|| versions.iter().find(|v| v.served))
        .map(|v| v.name.clone())
}

/// An Istio object as the document `config` reads: apiVersion, kind, metadata (without
/// what the server manages), spec.
fn istio_document(object: &DynamicObject, api_version: &str, kind: Kind) -> Value {
    let mut metadata = serde_json::Map::new();
    metadata.insert("name".into(), Value::from(object.name_any()));
    if let Some(ns) = &object.metadata.namespace {
        metadata.insert("namespace".into(), Value::from(ns.clone()));
    }
    let mut document = serde_json::Map::new();
    document.insert("apiVersion".into(), Value::from(api_version));
    document.insert("kind".into(), Value::from(kind.name()));
    document.insert("metadata".into(), Value::Object(metadata));
    if let Some(spec) = object.data.get("spec") {
        document.insert("spec".into(), spec.clone());
    }
    Value::Object(document)
}
