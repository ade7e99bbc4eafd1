//! The Kubernetes deployment in `deploy/`: every document of every manifest is read with
//! the API's own types (k8s-openapi, API level 1.33), and a field those types do not know
//! fails the test, naming the file, the document and the field: the API server would drop
//! it or refuse it, so it is a typo. Then the properties the deployment relies on are
//! checked: an unprivileged agent with exactly BPF, NET_ADMIN and PERFMON, the host's
//! network, a rollout that never runs two agents on a node, probes that reach the admin
//! endpoint on loopback, the BPF filesystem's mount propagation, read-only RBAC on exactly
//! what the agent watches, and a ConfigMap that lb's own parser accepts.
//!
//! No cluster and no root needed: these are plain file checks.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, Namespace, PodSpec, Probe, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
    Resource,
};
use lb::model::Locality;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// The namespace every namespaced object lives in.
const NAMESPACE: &str = "lb-system";
/// The agent's container in the DaemonSet.
const AGENT: &str = "lb";
/// Where the admin endpoint listens (`--admin`), and so where the probes go.
const ADMIN_HOST: &str = "127.0.0.1";
const ADMIN_PORT: i32 = 15000;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// One object of a manifest, by kind.
#[derive(Debug)]
enum Object {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    ClusterRole(ClusterRole),
    ClusterRoleBinding(ClusterRoleBinding),
    ConfigMap(ConfigMap),
    DaemonSet(Box<DaemonSet>),
}

/// A parsed document and where it came from: `deploy/rbac.yaml document 2 (ClusterRole lb)`.
#[derive(Debug)]
struct Document {
    at: String,
    object: Object,
}

/// Reads every document of one manifest file (`shown` names it in messages). Every error
/// of every document is returned, each naming the file, the document and the field.
fn parse_manifest(shown: &str, text: &str) -> Result<Vec<Document>, Vec<String>> {
    let values: Vec<Value> = match serde_saphyr::from_multiple(text) {
        Ok(values) => values,
        Err(e) => return Err(vec![format!("{shown}: not valid YAML: {e}")]),
    };
    let mut documents = Vec::new();
    let mut errors = Vec::new();
    // Numbered from 1, empty documents not counted, as lb's own configuration does.
    for (i, value) in values.into_iter().enumerate() {
        let at = format!("{shown} document {}{}", i + 1, describe(&value));
        match parse_object(value) {
            Ok(object) => documents.push(Document { at, object }),
            Err(problems) => errors.extend(problems.into_iter().map(|p| format!("{at}: {p}"))),
        }
    }
    if errors.is_empty() {
        Ok(documents)
    } else {
        Err(errors)
    }
}

/// ` (Kind namespace/name)`, from the raw document, for messages.
fn describe(value: &Value) -> String {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("?").to_string();
    let kind = text(value.get("kind"));
    let metadata = value.get("metadata");
    let name = text(metadata.and_then(|m| m.get("name")));
    match metadata
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
    {
        Some(namespace) => format!(" ({kind} {namespace}/{name})"),
        None => format!(" ({kind} {name})"),
    }
}

/// Dispatches on `apiVersion` and `kind`; only the kinds this deployment uses are known.
fn parse_object(value: Value) -> Result<Object, Vec<String>> {
    fn is<K: Resource>(api_version: &str, kind: &str) -> bool {
        api_version == K::API_VERSION && kind == K::KIND
    }
    let field = |name: &str| value.get(name).and_then(Value::as_str).unwrap_or_default();
    let (api_version, kind) = (field("apiVersion").to_string(), field("kind").to_string());
    let (a, k) = (api_version.as_str(), kind.as_str());
    Ok(if is::<Namespace>(a, k) {
        Object::Namespace(strict(value)?)
    } else if is::<ServiceAccount>(a, k) {
        Object::ServiceAccount(strict(value)?)
    } else if is::<ClusterRole>(a, k) {
        Object::ClusterRole(strict(value)?)
    } else if is::<ClusterRoleBinding>(a, k) {
        Object::ClusterRoleBinding(strict(value)?)
    } else if is::<ConfigMap>(a, k) {
        Object::ConfigMap(strict(value)?)
    } else if is::<DaemonSet>(a, k) {
        Object::DaemonSet(Box::new(strict(value)?))
    } else {
        return Err(vec![format!(
            "apiVersion {api_version:?}, kind {kind:?}: not a kind this deployment uses \
             (Namespace, ServiceAccount, ClusterRole, ClusterRoleBinding, ConfigMap, \
             DaemonSet)"
        )]);
    })
}

/// Deserializes `value` as `T`, failing on every field `T` does not know (which plain
/// serde, and the API types, would silently drop).
fn strict<T: DeserializeOwned>(value: Value) -> Result<T, Vec<String>> {
    let mut unknown = Vec::new();
    let parsed: Result<T, serde_json::Error> =
        serde_ignored::deserialize(value, |path| unknown.push(dotted(&path)));
    match parsed {
        Err(e) => Err(vec![e.to_string()]),
        Ok(_) if !unknown.is_empty() => Err(unknown
            .into_iter()
            .map(|path| format!("{path}: unknown field"))
            .collect()),
        Ok(object) => Ok(object),
    }
}

/// A field's path as users write it: `spec.template.spec.containers[0].image`.
fn dotted(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", dotted(parent)),
        Path::Map { parent, key } => match dotted(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => dotted(parent),
    }
}

/// The kustomization's fields this deployment uses; any other is reported like a typo.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Kustomization {
    api_version: String,
    kind: String,
    resources: Vec<String>,
    /// `kustomize edit set image` writes these.
    #[serde(default)]
    images: Vec<KustomizeImage>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
#[expect(
    dead_code,
    reason = "only `name` is checked; the rest is kustomize's business"
)]
struct KustomizeImage {
    name: String,
    new_name: Option<String>,
    new_tag: Option<String>,
    digest: Option<String>,
}

const KUSTOMIZATION: &str = "kustomization.yaml";

/// The YAML files of `deploy/` (not the kustomization), by file name.
fn manifest_files() -> BTreeMap<String, PathBuf> {
    let entries = std::fs::read_dir(deploy_dir()).expect("deploy/ is readable");
    entries
        .map(|e| e.expect("deploy/ is readable").path())
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?.to_string();
            let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
            (yaml && name != KUSTOMIZATION).then_some((name, path))
        })
        .collect()
}

/// Every document of every manifest; fails listing every problem in every file.
fn load_all() -> Vec<Document> {
    let files = manifest_files();
    assert!(
        !files.is_empty(),
        "no manifests in {}",
        deploy_dir().display()
    );
    let mut documents = Vec::new();
    let mut errors = Vec::new();
    for (name, path) in &files {
        let text = std::fs::read_to_string(path).expect("manifest is readable");
        match parse_manifest(&format!("deploy/{name}"), &text) {
            Ok(docs) => documents.extend(docs),
            Err(e) => errors.extend(e),
        }
    }
    assert!(
        errors.is_empty(),
        "the manifests have problems:\n  {}",
        errors.join("\n  ")
    );
    documents
}

/// The one object of a kind, with where it came from.
fn only<'a, T>(
    documents: &'a [Document],
    what: &str,
    pick: impl Fn(&'a Object) -> Option<&'a T>,
) -> (&'a str, &'a T) {
    let found: Vec<_> = documents
        .iter()
        .filter_map(|d| pick(&d.object).map(|o| (d.at.as_str(), o)))
        .collect();
    let places: Vec<&str> = found.iter().map(|(at, _)| *at).collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {what}, found {places:?}"
    );
    found[0]
}

fn daemonset(documents: &[Document]) -> (&str, &DaemonSet) {
    only(documents, "DaemonSet", |o| match o {
        Object::DaemonSet(d) => Some(d.as_ref()),
        _ => None,
    })
}

fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("the DaemonSet has a pod template with a spec")
}

fn agent_container(ds: &DaemonSet) -> &Container {
    pod_spec(ds)
        .containers
        .iter()
        .find(|c| c.name == AGENT)
        .unwrap_or_else(|| panic!("no container named {AGENT:?} in the DaemonSet"))
}

/// Every value of `flag` in `args`, as `--flag VALUE` or `--flag=VALUE`.
fn flag_values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
    let mut values = Vec::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        if arg == flag {
            values.extend(iter.next().map(String::as_str));
        } else if let Some(value) = arg.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            values.push(value);
        }
    }
    values
}

fn agent_args(ds: &DaemonSet) -> &[String] {
    agent_container(ds).args.as_deref().unwrap_or_default()
}

#[test]
fn every_document_uses_only_fields_kubernetes_knows() {
    let documents = load_all();
    let kinds: BTreeSet<&str> = documents
        .iter()
        .map(|d| match &d.object {
            Object::Namespace(_) => "Namespace",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::ClusterRole(_) => "ClusterRole",
            Object::ClusterRoleBinding(_) => "ClusterRoleBinding",
            Object::ConfigMap(_) => "ConfigMap",
            Object::DaemonSet(_) => "DaemonSet",
        })
        .collect();
    assert_eq!(kinds.len(), 6, "every kind is deployed: {kinds:?}");
}

#[test]
fn a_misspelled_field_fails_the_check_naming_file_document_and_field() {
    let text = std::fs::read_to_string(deploy_dir().join("daemonset.yaml")).unwrap();
    let shown = "deploy/daemonset.yaml";
    assert!(parse_manifest(shown, &text).is_ok(), "the original parses");

    // One typo deep in a list, one at the pod's top level.
    let typo = text
        .replacen(
            "mountPropagation: HostToContainer",
            "mountPropogation: HostToContainer",
            1,
        )
        .replacen("hostNetwork: true", "hostNetwrok: true", 1);
    assert_ne!(typo, text, "the typos were made");
    let errors = parse_manifest(shown, &typo).expect_err("a misspelled field is refused");
    let at = "deploy/daemonset.yaml document 1 (DaemonSet lb-system/lb)";
    let documents = load_all();
    let ds = daemonset(&documents).1;
    let mount = agent_container(ds)
        .volume_mounts
        .as_deref()
        .unwrap_or_default()
        .iter()
        .position(|m| m.mount_propagation.as_deref() == Some("HostToContainer"))
        .expect("the agent has a HostToContainer mount");
    let agent = pod_spec(ds)
        .containers
        .iter()
        .position(|c| c.name == AGENT)
        .unwrap();
    let mut expected = vec![
        format!("{at}: spec.template.spec.hostNetwrok: unknown field"),
        format!(
            "{at}: spec.template.spec.containers[{agent}].volumeMounts[{mount}].mountPropogation: \
             unknown field"
        ),
    ];
    let mut errors = errors;
    expected.sort();
    errors.sort();
    assert_eq!(errors, expected);

    // A value of the wrong type and an unknown kind are refused too, with the document.
    let errors = parse_manifest(
        shown,
        &text.replacen(
            "terminationGracePeriodSeconds: 15",
            "terminationGracePeriodSeconds: soon",
            1,
        ),
    )
    .expect_err("a string is not a number of seconds");
    assert!(errors.len() == 1 && errors[0].starts_with(at), "{errors:?}");
    let errors = parse_manifest(
        shown,
        &text.replacen("kind: DaemonSet", "kind: Daemonset", 1),
    )
    .expect_err("an unknown kind is refused");
    assert!(
        errors.len() == 1 && errors[0].contains("\"Daemonset\": not a kind"),
        "{errors:?}"
    );
}

#[test]
fn the_kustomization_lists_every_manifest_and_only_files_that_exist() {
    let path = deploy_dir().join(KUSTOMIZATION);
    let text = std::fs::read_to_string(&path).expect("deploy/kustomization.yaml exists");
    let value: Value = serde_saphyr::from_str(&text).expect("valid YAML");
    let k: Kustomization =
        strict(value).unwrap_or_else(|e| panic!("deploy/{KUSTOMIZATION}: {}", e.join("; ")));
    assert_eq!(k.api_version, "kustomize.config.k8s.io/v1beta1");
    assert_eq!(k.kind, "Kustomization");
    let listed: BTreeSet<&str> = k.resources.iter().map(String::as_str).collect();
    assert_eq!(listed.len(), k.resources.len(), "a resource listed twice");
    for resource in &listed {
        assert!(
            deploy_dir().join(resource).is_file(),
            "deploy/{KUSTOMIZATION} lists {resource}, which does not exist"
        );
    }
    let manifests = manifest_files();
    let on_disk: BTreeSet<&str> = manifests.keys().map(String::as_str).collect();
    assert_eq!(
        listed, on_disk,
        "the kustomization lists exactly the manifests"
    );

    // An image override must name an image the DaemonSet uses, or it does nothing.
    let documents = load_all();
    let spec = pod_spec(daemonset(&documents).1);
    let used: BTreeSet<&str> = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter_map(|c| c.image.as_deref())
        .map(|image| image.split_once(':').map_or(image, |(name, _tag)| name))
        .collect();
    for image in &k.images {
        assert!(
            used.contains(image.name.as_str()),
            "deploy/{KUSTOMIZATION}: images names {:?}, not one of {used:?}",
            image.name
        );
    }
}

#[test]
fn the_agent_runs_unprivileged_with_bpf_net_admin_and_perfmon_only() {
    let documents = load_all();
    let (at, ds) = daemonset(&documents);
    let agent = agent_container(ds);
    let sc = agent
        .security_context
        .as_ref()
        .unwrap_or_else(|| panic!("{at}: the agent has no securityContext"));
    assert_eq!(sc.privileged, Some(false), "{at}: agent privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false), "{at}");
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]), "{at}");
    let mut add = caps.add.clone().unwrap_or_default();
    add.sort();
    assert_eq!(
        add,
        ["BPF", "NET_ADMIN", "PERFMON"],
        "{at}: added capabilities"
    );
    assert_eq!(sc.read_only_root_filesystem, Some(true), "{at}");
    let seccomp = sc.seccomp_profile.as_ref().expect("a seccomp profile");
    assert_eq!(seccomp.type_, "RuntimeDefault", "{at}");
    // Pinning in bpffs is a write the runtimes' default AppArmor profile denies.
    let apparmor = sc.app_armor_profile.as_ref().expect("an AppArmor profile");
    assert_eq!(apparmor.type_, "Unconfined", "{at}");

    // With a read-only root, the agent writes only to its volumes.
    let mounts: BTreeSet<&str> = agent
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    for dir in ["/tmp", "/run/lb", "/sys/fs/bpf", "/etc/lb"] {
        assert!(
            mounts.contains(dir),
            "{at}: the agent has no volume at {dir}"
        );
    }

    // Only the init container that mounts bpffs is privileged, and it does only that.
    let spec = pod_spec(ds);
    for c in spec.init_containers.iter().flatten() {
        let privileged = c.security_context.as_ref().and_then(|s| s.privileged);
        if privileged == Some(true) {
            let script = c.command.as_deref().unwrap_or_default().join(" ");
            assert!(
                script.contains("mount -t bpf bpf /sys/fs/bpf")
                    && script.contains(r#"grep -q "/sys/fs/bpf type bpf""#),
                "{at}: privileged init container {:?} does more than mount bpffs: {script}",
                c.name
            );
        }
        assert_eq!(c.image, agent.image, "{at}: one image for every container");
    }
}

#[test]
fn the_pod_is_a_critical_host_network_pod_on_every_linux_node() {
    let documents = load_all();
    let (at, ds) = daemonset(&documents);
    let spec = pod_spec(ds);
    assert_eq!(spec.host_network, Some(true), "{at}");
    assert_eq!(
        spec.dns_policy.as_deref(),
        Some("ClusterFirstWithHostNet"),
        "{at}"
    );
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical"),
        "{at}"
    );
    let tolerates_all =
        spec.tolerations.iter().flatten().any(|t| {
            t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
        });
    assert!(tolerates_all, "{at}: no `operator: Exists` toleration");
    assert_eq!(
        spec.node_selector
            .as_ref()
            .and_then(|s| s.get("kubernetes.io/os"))
            .map(String::as_str),
        Some("linux"),
        "{at}"
    );

    let agent = agent_container(ds);
    let node_name = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .unwrap_or_else(|| panic!("{at}: no NODE_NAME"));
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(field, Some("spec.nodeName"), "{at}: NODE_NAME");

    let resources = agent.resources.as_ref().expect("resources");
    let requests = resources.requests.as_ref().expect("requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
    let limits = resources.limits.as_ref().expect("limits");
    assert!(limits.contains_key("memory"), "{at}: a memory limit");
}

#[test]
fn upgrades_never_run_two_agents_on_a_node() {
    let documents = load_all();
    let (at, ds) = daemonset(&documents);
    let strategy = ds
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .expect("an update strategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"), "{at}");
    let rolling = strategy.rolling_update.as_ref().expect("rollingUpdate");
    let zero = |v: &IntOrString| {
        matches!(v, IntOrString::Int(0))
            || matches!(v, IntOrString::String(s) if s == "0%" || s == "0")
    };
    let surge = rolling.max_surge.as_ref().expect("maxSurge is explicit");
    assert!(zero(surge), "{at}: maxSurge {surge:?}");
    let unavailable = rolling.max_unavailable.as_ref().expect("maxUnavailable");
    assert!(
        !zero(unavailable),
        "{at}: maxUnavailable 0 with no surge never rolls"
    );

    // The data plane lives in the pinned maps; only the TLS-originated connections are
    // finished at SIGTERM, and new ones wait meanwhile: a short drain, within the grace
    // period (else the kubelet's SIGKILL cuts them first).
    let grace = pod_spec(ds).termination_grace_period_seconds;
    let args = agent_container(ds).args.as_deref().unwrap_or_default();
    let drain: i64 = args
        .iter()
        .position(|a| a == "--drain-timeout")
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .expect("--drain-timeout is explicit");
    assert!(
        grace.is_some_and(|g| g > drain && g <= 30) && drain <= 15,
        "{at}: grace {grace:?}, --drain-timeout {drain}"
    );
}

#[test]
fn probes_reach_the_admin_endpoint_on_the_nodes_loopback() {
    let documents = load_all();
    let (at, ds) = daemonset(&documents);
    let agent = agent_container(ds);
    assert_eq!(
        flag_values(agent_args(ds), "--admin"),
        [format!("{ADMIN_HOST}:{ADMIN_PORT}")],
        "{at}: --admin"
    );
    // With hostNetwork a probe without `host` goes to the node's address, where the
    // admin endpoint does not listen.
    let check = |what: &str, probe: Option<&Probe>, path: &str| {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{at}: no httpGet {what}"));
        assert_eq!(get.host.as_deref(), Some(ADMIN_HOST), "{at}: {what} host");
        assert_eq!(get.port, IntOrString::Int(ADMIN_PORT), "{at}: {what} port");
        assert_eq!(get.path.as_deref(), Some(path), "{at}: {what} path");
    };
    check("readinessProbe", agent.readiness_probe.as_ref(), "/ready");
    check("livenessProbe", agent.liveness_probe.as_ref(), "/healthz");
    let startup = agent.startup_probe.as_ref();
    check("startupProbe", startup, "/ready");
    // Generous: the first list of a large cluster.
    let startup = startup.unwrap();
    let window = startup.period_seconds.unwrap_or(10) * startup.failure_threshold.unwrap_or(3);
    assert!(window >= 300, "{at}: startupProbe allows only {window} s");
}

#[test]
fn bpffs_is_mounted_by_the_init_container_and_seen_by_the_agent() {
    let documents = load_all();
    let (at, ds) = daemonset(&documents);
    let spec = pod_spec(ds);
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| {
            v.host_path
                .as_ref()
                .is_some_and(|h| h.path == "/sys/fs/bpf")
        })
        .unwrap_or_else(|| panic!("{at}: no hostPath /sys/fs/bpf volume"));
    let host_path = volume.host_path.as_ref().unwrap();
    assert_eq!(
        host_path.type_.as_deref(),
        Some("DirectoryOrCreate"),
        "{at}"
    );

    let propagation = |c: &Container| {
        c.volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == volume.name)
            .map(|m| (m.mount_path.clone(), m.mount_propagation.clone()))
    };
    assert_eq!(
        propagation(agent_container(ds)),
        Some(("/sys/fs/bpf".into(), Some("HostToContainer".into()))),
        "{at}: the agent's bpffs mount"
    );
    let mounter = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| propagation(c).is_some())
        .unwrap_or_else(|| panic!("{at}: no init container mounts bpffs"));
    assert_eq!(
        propagation(mounter),
        Some(("/sys/fs/bpf".into(), Some("Bidirectional".into()))),
        "{at}: the init container's bpffs mount"
    );
    assert_eq!(
        mounter.security_context.as_ref().and_then(|s| s.privileged),
        Some(true),
        "{at}: Bidirectional propagation needs a privileged container"
    );
    // The agent pins under the default directory, on that volume.
    let pin_dirs = flag_values(agent_args(ds), "--pin-dir");
    assert!(
        pin_dirs.iter().all(|d| d.starts_with("/sys/fs/bpf/")),
        "{at}: --pin-dir {pin_dirs:?}"
    );
}

#[test]
fn rbac_reads_exactly_what_the_agent_watches_and_writes_nothing() {
    let documents = load_all();
    let (at, role) = only(&documents, "ClusterRole", |o| match o {
        Object::ClusterRole(r) => Some(r),
        _ => None,
    });
    assert!(role.aggregation_rule.is_none(), "{at}: aggregated");
    let mut granted = BTreeSet::new();
    for (i, rule) in role.rules.iter().flatten().enumerate() {
        let mut verbs = rule.verbs.clone();
        verbs.sort();
        assert_eq!(verbs, ["get", "list", "watch"], "{at}: rules[{i}] verbs");
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "{at}: rules[{i}] names resources or URLs"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                assert!(granted.insert((group.as_str(), resource.as_str())));
            }
        }
    }
    let expected: BTreeSet<(&str, &str)> = [
        ("", "nodes"),
        ("", "services"),
        // Istio's per-workload locality override labels.
        ("", "pods"),
        ("discovery.k8s.io", "endpointslices"),
        // Whether Istio's CRDs are installed.
        ("apiextensions.k8s.io", "customresourcedefinitions"),
        ("networking.istio.io", "destinationrules"),
        ("networking.istio.io", "serviceentries"),
    ]
    .into_iter()
    .collect();
    assert_eq!(granted, expected, "{at}: resources granted");

    // The binding gives that role to the DaemonSet's service account.
    let (binding_at, binding) = only(&documents, "ClusterRoleBinding", |o| match o {
        Object::ClusterRoleBinding(b) => Some(b),
        _ => None,
    });
    let (_, account) = only(&documents, "ServiceAccount", |o| match o {
        Object::ServiceAccount(s) => Some(s),
        _ => None,
    });
    let account_name = account.metadata.name.as_deref().expect("named");
    assert_eq!(binding.role_ref.kind, "ClusterRole", "{binding_at}");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert!(
        subjects.len() == 1
            && subjects[0].kind == "ServiceAccount"
            && subjects[0].name == account_name
            && subjects[0].namespace.as_deref() == Some(NAMESPACE),
        "{binding_at}: subjects {subjects:?}"
    );
    let (ds_at, ds) = daemonset(&documents);
    assert_eq!(
        pod_spec(ds).service_account_name.as_deref(),
        Some(account_name),
        "{ds_at}"
    );
}

#[test]
fn namespaced_objects_are_in_the_namespace_the_manifests_create() {
    let documents = load_all();
    let (_, namespace) = only(&documents, "Namespace", |o| match o {
        Object::Namespace(n) => Some(n),
        _ => None,
    });
    assert_eq!(namespace.metadata.name.as_deref(), Some(NAMESPACE));
    for d in &documents {
        let namespace = match &d.object {
            Object::ServiceAccount(o) => &o.metadata.namespace,
            Object::ConfigMap(o) => &o.metadata.namespace,
            Object::DaemonSet(o) => &o.metadata.namespace,
            Object::Namespace(_) | Object::ClusterRole(_) | Object::ClusterRoleBinding(_) => {
                continue
            }
        };
        assert_eq!(namespace.as_deref(), Some(NAMESPACE), "{}", d.at);
    }
}

#[test]
fn the_configmap_is_the_agents_config_and_lb_accepts_it() {
    let documents = load_all();
    let (at, config_map) = only(&documents, "ConfigMap", |o| match o {
        Object::ConfigMap(c) => Some(c),
        _ => None,
    });
    let data = config_map.data.as_ref().expect("data");
    assert!(!data.is_empty(), "{at}: no data");
    for (key, text) in data {
        assert!(key.ends_with(".yaml"), "{at}: lb reads only *.yaml: {key}");
        let source = format!("{at} data.{key}");
        let loaded = lb::config::parse_str(text, &source)
            .unwrap_or_else(|e| panic!("{source}: lb refuses it: {e:#}"));
        assert!(
            loaded.warnings.is_empty(),
            "{source}: {:?}",
            loaded.warnings
        );
        // The services come from Kubernetes; the locality from the Node's labels.
        assert!(loaded.config.services.is_empty(), "{source}: services");
        assert_eq!(loaded.config.node.locality, Locality::default(), "{source}");
    }

    // The DaemonSet mounts this ConfigMap where `--config` points.
    let (ds_at, ds) = daemonset(&documents);
    let args = agent_args(ds);
    assert!(args.iter().any(|a| a == "--kubernetes"), "{ds_at}");
    let configs = flag_values(args, "--config");
    assert_eq!(configs, ["/etc/lb"], "{ds_at}: --config");
    let mount = agent_container(ds)
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == configs[0])
        .unwrap_or_else(|| panic!("{ds_at}: nothing mounted at {}", configs[0]));
    let volume = pod_spec(ds)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("the mount's volume");
    assert_eq!(
        volume.config_map.as_ref().map(|c| &c.name),
        config_map.metadata.name.as_ref(),
        "{ds_at}: /etc/lb is not the ConfigMap"
    );
}
