//! What the agent knows of the cluster: the records of every watched object, each
//! Service's translation (redone only for the Services a change touched), and which kinds
//! have had their first full list.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    time::SystemTime,
};

use serde_json::Value;

use super::{
    objects::{ObjectKey, ServiceRecord, SliceRecord},
    translate::{self, Context, Translated},
};
use crate::config::{ClusterChange, ClusterInput, EndpointsUpdate};

/// A kind the agent watches, for readiness and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Node,
    Service,
    EndpointSlice,
    Pod,
    CustomResourceDefinition,
    DestinationRule,
    ServiceEntry,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::CustomResourceDefinition => "CustomResourceDefinition",
            Kind::DestinationRule => "DestinationRule",
            Kind::ServiceEntry => "ServiceEntry",
        }
    }
}

/// One change of a watched kind.
pub enum Update<T> {
    /// Added or changed.
    Upsert(T),
    /// Deleted.
    Remove(T),
    /// A full list (the watch started or restarted): whatever is not in it is gone.
    Replace(Vec<T>),
}

/// Options that shape the translation.
#[derive(Clone, Debug)]
pub struct Settings {
    pub node_name: String,
    pub external_ips: bool,
    pub cluster_domain: String,
}

#[derive(Default)]
pub struct ClusterState {
    pub nodes: HashMap<String, BTreeMap<String, String>>,
    pub services: HashMap<ObjectKey, ServiceRecord>,
    pub slices: HashMap<ObjectKey, SliceRecord>,
    /// Slice names by the Service they name.
    slices_by_service: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// Pods' locality overrides (the newer label wins when both are set).
    pub pod_localities: HashMap<ObjectKey, String>,
    /// What each label's watch saw.
    pods_by_label: [HashMap<ObjectKey, String>; 2],
    /// Whether each label's watch had its first full list.
    pods_listed: [bool; 2],
    /// Istio resources by kind and key, as JSON documents.
    pub istio: BTreeMap<(Kind, ObjectKey), Value>,
    /// Kinds whose first full list arrived (every kind counted in `expected`).
    synced: HashSet<Kind>,
    expected: HashSet<Kind>,
    /// Istio kinds whose CRD watch had its first list.
    crd_watches_synced: HashSet<Kind>,
    /// Services whose translation is stale; `all_dirty` marks every one.
    dirty: HashSet<ObjectKey>,
    all_dirty: bool,
    /// Something every Service's configuration may depend on changed (a node's labels,
    /// an Istio resource): the next change is a full one.
    global_changed: bool,
    translated: BTreeMap<ObjectKey, Translated>,
    /// The endpoints' label sets, shared.
    label_sets: translate::LabelSets,
    /// Problems reported last time, by object, so each is logged when it appears.
    reported: HashMap<ObjectKey, Vec<String>>,
    /// Trigger times of the slices changed since the last build.
    pub pending_triggers: Vec<SystemTime>,
    /// When the first change not applied yet arrived.
    pub pending_since: Option<std::time::Instant>,
    /// Changes seen since the start (any kind).
    pub changes: u64,
}

impl ClusterState {
    pub fn new(expected: impl IntoIterator<Item = Kind>) -> Self {
        Self {
            expected: expected.into_iter().collect(),
            all_dirty: true,
            ..Default::default()
        }
    }

    /// Whether every expected kind has had its first full list.
    pub fn synced(&self) -> bool {
        self.expected.iter().all(|k| self.synced.contains(k))
    }

    /// The kinds still waiting for their first list.
    pub fn unsynced(&self) -> Vec<&'static str> {
        let mut kinds: Vec<Kind> = self.expected.difference(&self.synced).copied().collect();
        kinds.sort();
        kinds.into_iter().map(Kind::name).collect()
    }

    /// A kind the agent now also waits for (an Istio CRD appeared), or no longer (it went).
    pub fn expect(&mut self, kind: Kind, expected: bool) {
        if expected {
            self.expected.insert(kind);
        } else {
            self.expected.remove(&kind);
            self.synced.remove(&kind);
        }
    }

    pub fn mark_synced(&mut self, kind: Kind) {
        // Pods come from two watches (one per locality label): listed once both are.
        if kind == Kind::Pod && !self.pods_listed.iter().all(|&listed| listed) {
            return;
        }
        self.synced.insert(kind);
    }

    /// The CRD watch of an Istio kind had its first list; the CRDs count as synced once
    /// both have.
    pub fn mark_crd_synced(&mut self, kind: Kind) {
        self.crd_watches_synced.insert(kind);
        if self.crd_watches_synced.len() == 2 {
            self.synced.insert(Kind::CustomResourceDefinition);
        }
    }

    /// Objects held per kind, for metrics.
    pub fn counts(&self) -> Vec<(Kind, usize)> {
        let istio = |kind| self.istio.keys().filter(|(k, _)| *k == kind).count();
        vec![
            (Kind::Node, self.nodes.len()),
            (Kind::Service, self.services.len()),
            (Kind::EndpointSlice, self.slices.len()),
            (Kind::Pod, self.pod_localities.len()),
            (Kind::DestinationRule, istio(Kind::DestinationRule)),
            (Kind::ServiceEntry, istio(Kind::ServiceEntry)),
        ]
    }

    pub fn update_nodes(&mut self, update: Update<(String, BTreeMap<String, String>)>) {
        // Endpoint localities come from their nodes' labels: every Service may change.
        let changed = match update {
            Update::Upsert((name, labels)) => {
                self.nodes.insert(name, labels.clone()).as_ref() != Some(&labels)
            }
            Update::Remove((name, _)) => self.nodes.remove(&name).is_some(),
            Update::Replace(all) => {
                let new: HashMap<_, _> = all.into_iter().collect();
                let changed = new != self.nodes;
                self.nodes = new;
                changed
            }
        };
        if changed {
            self.all_dirty = true;
            self.global_changed = true;
            self.changes += 1;
        }
    }

    pub fn update_services(&mut self, update: Update<ServiceRecord>) {
        match update {
            Update::Upsert(record) => {
                let key = record.key.clone();
                if self.services.get(&key) != Some(&record) {
                    self.services.insert(key.clone(), record);
                    self.touch(key);
                }
            }
            Update::Remove(record) => {
                if self.services.remove(&record.key).is_some() {
                    self.touch(record.key);
                }
            }
            Update::Replace(all) => {
                let new: HashMap<ObjectKey, ServiceRecord> =
                    all.into_iter().map(|r| (r.key.clone(), r)).collect();
                let touched: Vec<ObjectKey> = self
                    .services
                    .keys()
                    .filter(|k| !new.contains_key(*k))
                    .chain(
                        new.iter()
                            .filter(|(k, r)| self.services.get(*k) != Some(*r))
                            .map(|(k, _)| k),
                    )
                    .cloned()
                    .collect();
                self.services = new;
                for key in touched {
                    self.touch(key);
                }
            }
        }
    }

    pub fn update_slices(&mut self, update: Update<SliceRecord>) {
        match update {
            Update::Upsert(record) => self.put_slice(record),
            Update::Remove(record) => self.drop_slice(&record.key),
            Update::Replace(all) => {
                let listed: HashSet<ObjectKey> = all.iter().map(|r| r.key.clone()).collect();
                let gone: Vec<ObjectKey> = self
                    .slices
                    .keys()
                    .filter(|k| !listed.contains(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    self.drop_slice(&key);
                }
                for record in all {
                    self.put_slice(record);
                }
            }
        }
    }

    fn put_slice(&mut self, record: SliceRecord) {
        let key = record.key.clone();
        if self.slices.get(&key) == Some(&record) {
            return;
        }
        if let Some(t) = record.trigger_time {
            self.pending_triggers.push(t);
        }
        // A slice may move to another Service (its label changed): both are touched.
        self.drop_slice(&key);
        if let Some(service) = &record.service {
            self.slices_by_service
                .entry(service.clone())
                .or_default()
                .insert(key.clone());
            self.touch(service.clone());
        } else {
            self.report(&key, record.problems.clone(), "EndpointSlice");
        }
        self.slices.insert(key, record);
    }

    fn drop_slice(&mut self, key: &ObjectKey) {
        let Some(old) = self.slices.remove(key) else {
            return;
        };
        if let Some(service) = old.service {
            if let Some(set) = self.slices_by_service.get_mut(&service) {
                set.remove(key);
                if set.is_empty() {
                    self.slices_by_service.remove(&service);
                }
            }
            self.touch(service);
        }
    }

    /// Pods seen by the watch of locality label `which` (an index of
    /// `POD_LOCALITY_LABELS`), with the override their labels give.
    pub fn update_pods(&mut self, which: usize, update: Update<(ObjectKey, Option<String>)>) {
        let seen = &mut self.pods_by_label[which.min(1)];
        let mut touched: HashSet<ObjectKey> = HashSet::new();
        match update {
            Update::Upsert((key, locality)) => {
                let old = match &locality {
                    Some(l) => seen.insert(key.clone(), l.clone()),
                    None => seen.remove(&key),
                };
                if old != locality {
                    touched.insert(key);
                }
            }
            Update::Remove((key, _)) => {
                if seen.remove(&key).is_some() {
                    touched.insert(key);
                }
            }
            Update::Replace(all) => {
                self.pods_listed[which.min(1)] = true;
                let new: HashMap<ObjectKey, String> =
                    all.into_iter().filter_map(|(k, l)| Some((k, l?))).collect();
                touched.extend(
                    new.iter()
                        .filter(|(k, v)| seen.get(*k) != Some(*v))
                        .map(|(k, _)| k.clone()),
                );
                touched.extend(seen.keys().filter(|k| !new.contains_key(*k)).cloned());
                *seen = new;
            }
        }
        // The newer label wins where a pod has both (both watches see such a pod, and
        // read the same value from it).
        let mut namespaces = HashSet::new();
        for key in touched {
            let effective = self.pods_by_label[0]
                .get(&key)
                .or_else(|| self.pods_by_label[1].get(&key))
                .cloned();
            let old = match effective {
                Some(l) => self.pod_localities.insert(key.clone(), l.clone()) != Some(l),
                None => self.pod_localities.remove(&key).is_some(),
            };
            if old {
                namespaces.insert(key.namespace);
            }
        }
        // Endpoints name their pods: the Services of those namespaces may change.
        if !namespaces.is_empty() {
            self.changes += 1;
            let touched: Vec<ObjectKey> = self
                .slices_by_service
                .keys()
                .filter(|k| namespaces.contains(&k.namespace))
                .cloned()
                .collect();
            self.dirty.extend(touched);
        }
    }

    pub fn update_istio(&mut self, kind: Kind, update: Update<(ObjectKey, Value)>) {
        match update {
            Update::Upsert((key, value)) => {
                if self.istio.get(&(kind, key.clone())) != Some(&value) {
                    self.istio.insert((kind, key), value);
                    self.changes += 1;
                    self.global_changed = true;
                }
            }
            Update::Remove((key, _)) => {
                if self.istio.remove(&(kind, key)).is_some() {
                    self.changes += 1;
                    self.global_changed = true;
                }
            }
            Update::Replace(all) => {
                let new: BTreeMap<(Kind, ObjectKey), Value> =
                    all.into_iter().map(|(k, v)| ((kind, k), v)).collect();
                let old: BTreeMap<(Kind, ObjectKey), Value> = self
                    .istio
                    .iter()
                    .filter(|((k, _), _)| *k == kind)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                if old != new {
                    self.istio.retain(|(k, _), _| *k != kind);
                    self.istio.extend(new);
                    self.changes += 1;
                    self.global_changed = true;
                }
            }
        }
    }

    fn touch(&mut self, service: ObjectKey) {
        self.changes += 1;
        self.dirty.insert(service);
    }

    /// Logs an object's problems when they differ from those last logged for it.
    fn report(&mut self, key: &ObjectKey, problems: Vec<String>, kind: &str) {
        let previous = self.reported.get(key);
        if previous.map(Vec::as_slice).unwrap_or_default() == problems.as_slice() {
            return;
        }
        for p in &problems {
            if previous.is_none_or(|old| !old.contains(p)) {
                log::warn!("{p}");
            }
        }
        if problems.is_empty() {
            if previous.is_some() {
                log::info!("{kind} {key}: no problem any more");
            }
            self.reported.remove(key);
        } else {
            self.reported.insert(key.clone(), problems);
        }
    }

    /// Every problem currently known, for the admin views.
    pub fn problems(&self) -> Vec<String> {
        let mut all: Vec<String> = self.reported.values().flatten().cloned().collect();
        all.sort();
        all
    }

    /// Translates what changed and returns the cluster's whole contribution.
    pub fn input(&mut self, settings: &Settings) -> ClusterInput {
        let dirty: Vec<ObjectKey> = if self.all_dirty {
            self.translated
                .keys()
                .chain(self.services.keys())
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        } else {
            self.dirty.drain().collect()
        };
        self.dirty.clear();
        self.all_dirty = false;
        self.global_changed = false;
        self.retranslate(&dirty, settings);
        self.label_sets.prune();
        self.assemble(settings)
    }

    /// What changed since the last [`ClusterState::input`] or `changes`: only endpoints
    /// of some Services (the common case: pods come and go, turn ready or not), or more,
    /// and then the whole contribution.
    pub fn changes(&mut self, settings: &Settings) -> ClusterChange {
        if self.all_dirty || self.global_changed {
            return ClusterChange::Full(self.input(settings));
        }
        let dirty: Vec<ObjectKey> = self.dirty.drain().collect();
        if !self.retranslate(&dirty, settings) {
            return ClusterChange::Full(self.assemble(settings));
        }
        let mut updates = Vec::new();
        for key in &dirty {
            let Some(translated) = self.translated.get(key) else {
                continue;
            };
            let Some(service) = &translated.service else {
                continue;
            };
            for (_, s) in &service.services {
                updates.push(EndpointsUpdate {
                    frontend: s.frontend,
                    source: s.source.clone(),
                    endpoints: s.endpoints.clone(),
                    states: translated
                        .states
                        .iter()
                        .filter(|((frontend, _, _), _)| *frontend == s.frontend)
                        .map(|((_, addr, port), state)| (*addr, *port, *state))
                        .collect(),
                });
            }
        }
        ClusterChange::Endpoints(updates)
    }

    /// Translates the Services `keys` again. Returns whether at most their endpoints
    /// changed (no Service came or went, none changed otherwise).
    fn retranslate(&mut self, keys: &[ObjectKey], settings: &Settings) -> bool {
        let mut endpoints_only = true;
        for key in keys {
            let translated = match self.services.get(key) {
                Some(service) => {
                    let slices: Vec<&SliceRecord> = self
                        .slices_by_service
                        .get(key)
                        .into_iter()
                        .flatten()
                        .filter_map(|k| self.slices.get(k))
                        .collect();
                    let context = Context {
                        node_name: &settings.node_name,
                        nodes: &self.nodes,
                        pod_localities: &self.pod_localities,
                        external_ips: settings.external_ips,
                        cluster_domain: &settings.cluster_domain,
                        label_sets: &self.label_sets,
                    };
                    Some(translate::translate(service, &slices, &context))
                }
                None => None,
            };
            let problems = translated
                .as_ref()
                .map(|t| t.problems.clone())
                .unwrap_or_default();
            self.report(key, problems, "Service");
            let old = self.translated.get(key).map(|t| t.service.as_ref());
            let new = translated.as_ref().map(|t| t.service.as_ref());
            endpoints_only &= match (old, new) {
                (Some(Some(old)), Some(Some(new))) => old.same_but_endpoints(new),
                // Balanced neither before nor now.
                (None | Some(None), None | Some(None)) => true,
                _ => false,
            };
            match translated {
                Some(t) => {
                    self.translated.insert(key.clone(), t);
                }
                None => {
                    self.translated.remove(key);
                }
            }
        }
        endpoints_only
    }

    /// The cluster's whole contribution, from the translations as they are.
    fn assemble(&self, settings: &Settings) -> ClusterInput {
        let node = self
            .nodes
            .get(&settings.node_name)
            .map(|labels| translate::this_node(&settings.node_name, labels));
        let documents = self
            .istio
            .iter()
            .map(|((kind, key), value)| (format!("{} {key}", kind.name()), value.clone()))
            .collect();
        ClusterInput {
            node,
            documents,
            services: self
                .translated
                .values()
                .filter_map(|t| t.service.clone())
                .collect(),
            states: self
                .translated
                .values()
                .flat_map(|t| t.states.iter().cloned())
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use lb_common::BackendState;

    use super::*;
    use crate::{
        dataplane::Protocol,
        sources::kubernetes::objects::{ServiceKind, ServicePort},
    };

    fn service(name: &str, last: u8) -> ServiceRecord {
        ServiceRecord {
            key: ObjectKey::new("default", name),
            kind: ServiceKind::Virtual,
            cluster_ips: vec![Ipv4Addr::new(10, 96, 0, last)],
            external_ips: Vec::new(),
            ports: vec![ServicePort {
                path: "spec.ports[0]".into(),
                name: String::new(),
                port: 80,
                protocol: Protocol::Tcp,
                http: false,
            }],
            session_affinity: None,
            local_only: false,
            traffic_distribution: None,
            problems: Vec::new(),
        }
    }

    fn settings() -> Settings {
        Settings {
            node_name: "node-a".into(),
            external_ips: false,
            cluster_domain: "cluster.local".into(),
        }
    }

    fn names(input: &ClusterInput) -> Vec<String> {
        input.services.iter().map(|s| s.label.clone()).collect()
    }

    /// A full list replaces the kind: what it lacks is gone (a deletion the watch missed);
    /// the same list again changes nothing at all.
    #[test]
    fn a_relist_removes_what_vanished_and_an_identical_one_changes_nothing() {
        let mut state = ClusterState::new([Kind::Service]);
        assert!(!state.synced());
        state.update_services(Update::Replace(vec![service("a", 1), service("b", 2)]));
        state.mark_synced(Kind::Service);
        assert!(state.synced());
        assert_eq!(
            names(&state.input(&settings())),
            [
                "Kubernetes Service default/a",
                "Kubernetes Service default/b"
            ]
        );
        let changes = state.changes;
        state.update_services(Update::Replace(vec![service("b", 2), service("a", 1)]));
        assert_eq!(state.changes, changes, "an identical relist is no change");
        assert!(state.dirty.is_empty());
        state.update_services(Update::Replace(vec![service("a", 1)]));
        assert_eq!(
            names(&state.input(&settings())),
            ["Kubernetes Service default/a"]
        );
    }

    fn slice(service: &str, ready: bool) -> SliceRecord {
        use crate::sources::kubernetes::objects::{SliceEndpoint, SlicePort};
        SliceRecord {
            key: ObjectKey::new("default", &format!("{service}-x")),
            service: Some(ObjectKey::new("default", service)),
            ports: vec![SlicePort {
                name: String::new(),
                port: 8080,
                protocol: Protocol::Tcp,
            }],
            endpoints: vec![SliceEndpoint {
                address: Ipv4Addr::new(10, 200, 0, 1),
                ready,
                serving: ready,
                terminating: false,
                node_name: None,
                zone: None,
                pod: None,
            }],
            trigger_time: None,
            problems: Vec::new(),
        }
    }

    /// An endpoint turning not ready is an endpoint change of its Service alone; a
    /// Service's port, a Service gone, or a node's labels make a full change.
    #[test]
    fn endpoint_changes_are_told_apart_from_the_rest() {
        let mut state = ClusterState::new([Kind::Service]);
        state.update_services(Update::Replace(vec![service("a", 1), service("b", 2)]));
        state.update_slices(Update::Replace(vec![slice("a", true), slice("b", true)]));
        assert!(matches!(state.changes(&settings()), ClusterChange::Full(_)));

        state.update_slices(Update::Upsert(slice("a", false)));
        let ClusterChange::Endpoints(updates) = state.changes(&settings()) else {
            panic!("an endpoint's readiness is an endpoint change");
        };
        assert_eq!(updates.len(), 1);
        assert_eq!(updates[0].frontend.vip, Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(updates[0].endpoints.len(), 1);
        assert_eq!(
            updates[0].states,
            [(Ipv4Addr::new(10, 200, 0, 1), 8080, BackendState::Draining)]
        );
        assert!(
            matches!(state.changes(&settings()), ClusterChange::Endpoints(u) if u.is_empty()),
            "nothing changed since"
        );

        let mut other_port = service("a", 1);
        other_port.ports[0].port = 81;
        state.update_services(Update::Upsert(other_port));
        assert!(matches!(state.changes(&settings()), ClusterChange::Full(_)));

        state.update_services(Update::Remove(service("b", 2)));
        let ClusterChange::Full(input) = state.changes(&settings()) else {
            panic!("a Service gone is a full change");
        };
        assert_eq!(names(&input), ["Kubernetes Service default/a"]);

        state.update_nodes(Update::Upsert(("node-a".into(), BTreeMap::new())));
        assert!(matches!(state.changes(&settings()), ClusterChange::Full(_)));
    }

    /// Pods come from two watches: the kind is listed once both have listed.
    #[test]
    fn pods_are_listed_once_both_label_watches_are() {
        let mut state = ClusterState::new([Kind::Pod]);
        state.update_pods(0, Update::Replace(Vec::new()));
        state.mark_synced(Kind::Pod);
        assert!(!state.synced());
        state.update_pods(1, Update::Replace(Vec::new()));
        state.mark_synced(Kind::Pod);
        assert!(state.synced());
    }
}
