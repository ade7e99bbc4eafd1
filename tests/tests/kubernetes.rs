//! `lb agent --kubernetes` against a real API server (etcd and the apiserver library, see
//! tests/apiserver), with real traffic: the node's namespace runs the API server, the
//! agent and the admin endpoint on its loopback; "pods" are namespaces whose veths appear
//! after the agent started and are attached by the pattern `lbpod*`.
//!
//! ```text
//!  client 10.200.0.2 ── node (lb, apiserver, etcd) ── lbpod-* ── pod i 10.200.i.2:8080
//! ```
//!
//! The test API server does no defaulting or allocation: fixtures set `clusterIP`,
//! `protocol` and port names explicitly, and write the EndpointSlices themselves (no
//! controller does).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Result;
use lb::dataplane::AttachMode;
use lb_tests::{
    add_route,
    agent_process::{wait_until, AgentProcess, TempDir},
    apiserver::TestApiServer,
    http_get, names_from, report_skip, require_root,
    topology::TestBed,
    veth, HttpNameServer, Netns, DEFAULT_TIMEOUT,
};

const ADMIN: &str = "127.0.0.1:15000";
const THIS_NODE: &str = "node-a";
/// The seed's localities, one pod each (pod `i` at 10.200.i.2 on node `node-i`).
const LOCALITIES: [(&str, &str); 4] = [
    ("region1", "zone1"),
    ("region1", "zone2"),
    ("region2", "zone3"),
    ("region3", "zone4"),
];
const HELLO_VIP: &str = "10.96.0.10";
const HELLO_PORT: u16 = 5000;
/// How long a change in the cluster may take to reach the tables, in these tests (the
/// figure is measured in `cargo xtask bench`; this only bounds a broken watch).
const FOLLOW: Duration = Duration::from_secs(5);

fn hello(i: usize) -> String {
    let (region, zone) = LOCALITIES[i - 1];
    format!("Hello version: {region}.{zone}, instance: helloworld-{region}-{zone}")
}

fn vip(port: u16) -> SocketAddr {
    format!("{HELLO_VIP}:{port}").parse().unwrap()
}

/// One endpoint of a slice.
#[derive(Clone)]
struct Ep {
    pod: usize,
    ready: bool,
    serving: bool,
    terminating: bool,
    node: String,
}

impl Ep {
    fn ready(pod: usize) -> Self {
        Self {
            pod,
            ready: true,
            serving: true,
            terminating: false,
            node: format!("node-{pod}"),
        }
    }
}

fn node_yaml(name: &str, region: &str, zone: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    \
         topology.kubernetes.io/region: {region}\n    topology.kubernetes.io/zone: {zone}\n"
    )
}

/// A Service; `extra_spec` is indented spec YAML (`  sessionAffinity: ClientIP\n`).
fn service_yaml(name: &str, vip: &str, ports: &[(&str, u16, &str)], extra_spec: &str) -> String {
    let ports: String = ports
        .iter()
        .map(|(n, p, target)| {
            format!("  - {{name: \"{n}\", port: {p}, protocol: TCP, targetPort: {target}}}\n")
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: sample\nspec:\n  \
         type: ClusterIP\n  clusterIP: {vip}\n  clusterIPs: [{vip}]\n  ports:\n{ports}{extra_spec}"
    )
}

fn slice_yaml(name: &str, service: &str, ports: &[(&str, u16)], eps: &[Ep]) -> String {
    let ports: String = ports
        .iter()
        .map(|(n, p)| format!("- {{name: \"{n}\", port: {p}, protocol: TCP}}\n"))
        .collect();
    let eps: String = eps
        .iter()
        .map(|e| {
            format!(
                "- addresses: [10.200.{}.2]\n  conditions: {{ready: {}, serving: {}, terminating: {}}}\n  \
                 nodeName: {}\n  targetRef: {{kind: Pod, namespace: sample, name: pod-{}}}\n",
                e.pod, e.ready, e.serving, e.terminating, e.node, e.pod
            )
        })
        .collect();
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  \
         namespace: sample\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\n\
         ports:\n{ports}endpoints:\n{eps}"
    )
}

fn pod_yaml(i: usize, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: pod-{i}\n  namespace: sample\n  \
         labels: {{{labels}}}\nspec:\n  nodeName: node-{i}\n  containers: [{{name: hello, image: hello}}]\n"
    )
}

/// The seed's DestinationRule, as a cluster object.
const SEED_RULE: &str = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: helloworld, namespace: sample }
spec:
  host: helloworld
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        enabled: true
        failover: [{ from: region1, to: region2 }]
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 10m
";

/// A pod: its namespace, its veth on the node (named `lbpod-…`) and its servers.
struct Pod {
    /// Kept for the pod's lifetime: dropping it removes the namespace and its veth.
    _ns: Netns,
    servers: Vec<HttpNameServer>,
}

/// The node, the client, the API server (in the node), the agent, and pods made later.
/// Fields drop in this order: the agent before the API server it watches.
struct Cluster {
    agent: Option<AgentProcess>,
    pods: BTreeMap<usize, Pod>,
    api: TestApiServer,
    bed: TestBed,
    _dir: TempDir,
}

impl Cluster {
    /// `None` (reported as skipped) when the API server cannot run here.
    fn start(objects: &str) -> Option<Self> {
        Self::start_with(objects, true)
    }

    /// Like `start`; `istio` says whether Istio's CRDs are installed first.
    fn start_with(objects: &str, istio: bool) -> Option<Self> {
        Self::start_with_files(objects, istio, &[])
    }

    /// Like `start_with`, the agent also reading configuration `files` (name, text).
    fn start_with_files(objects: &str, istio: bool, files: &[(&str, &str)]) -> Option<Self> {
        Self::start_full(objects, istio, files, &[])
    }

    /// Like `start_with_files`, the agent with `extra` arguments too.
    fn start_full(
        objects: &str,
        istio: bool,
        files: &[(&str, &str)],
        extra: &[&str],
    ) -> Option<Self> {
        if !require_root() {
            return None;
        }
        if let Some(why) = lb_tests::apiserver::skip_reason() {
            report_skip(&why);
            return None;
        }
        // Only the client side: the pods come after the agent.
        let bed = TestBed::with_backends(AttachMode::Tc, &[]).unwrap();
        let api = TestApiServer::start_in(&bed.node).unwrap();
        if istio {
            api.install_istio_crds().unwrap();
        }
        api.kubectl(&["create", "namespace", "sample"]).unwrap();
        let mut all = node_yaml(THIS_NODE, "region1", "zone1");
        for (i, (region, zone)) in LOCALITIES.iter().enumerate() {
            all.push_str("---\n");
            all.push_str(&node_yaml(&format!("node-{}", i + 1), region, zone));
        }
        api.apply_yaml(&all).unwrap();
        api.apply_yaml(objects).unwrap();
        let dir = TempDir::new("lbk8s").unwrap();
        for (name, text) in files {
            std::fs::write(dir.0.join(name), text).unwrap();
        }
        let kubeconfig = api.kubeconfig_path().to_string_lossy().into_owned();
        let mut args = vec![
            "--admin",
            ADMIN,
            "--kubernetes",
            "--kubeconfig",
            &kubeconfig,
            "--node-name",
            THIS_NODE,
            "--interface",
            "lbpod*:tc",
        ];
        args.extend_from_slice(extra);
        let agent = AgentProcess::start_with(&bed, &dir.0, &args).unwrap();
        let cluster = Self {
            api,
            bed,
            agent: Some(agent),
            pods: BTreeMap::new(),
            _dir: dir,
        };
        cluster.wait_ready();
        Some(cluster)
    }

    fn wait_ready(&self) {
        let admin: SocketAddr = ADMIN.parse().unwrap();
        wait_until(&self.bed.node, Duration::from_secs(30), || {
            http_get(admin, "/ready", Duration::from_millis(500))
        })
        .unwrap_or_else(|e| panic!("the agent did not get ready: {e:#}"));
    }

    /// Makes pod `i`: a namespace at 10.200.i.2 whose veth appears on the node now, with
    /// a server answering `hello(i)` on each of `ports`.
    fn add_pod(&mut self, i: usize, ports: &[u16]) {
        let ns = Netns::new(&format!("pod{i}")).unwrap();
        let (node_if, pod_if) = veth::link(
            &self.bed.node,
            "lbpod",
            &format!("10.200.{i}.1/24"),
            &ns,
            "eth",
            &format!("10.200.{i}.2/24"),
        )
        .unwrap();
        add_route(&ns, &format!("default via 10.200.{i}.1")).unwrap();
        veth::disable_tx_checksum_offload(&ns, &pod_if).unwrap();
        veth::disable_tx_checksum_offload(&self.bed.node, &node_if).unwrap();
        let servers = ports
            .iter()
            .map(|&p| {
                HttpNameServer::start(&ns, format!("10.200.{i}.2:{p}").parse().unwrap(), &hello(i))
                    .unwrap()
            })
            .collect();
        self.pods.insert(i, Pod { _ns: ns, servers });
    }

    fn apply(&self, yaml: &str) {
        self.api
            .apply_yaml(yaml)
            .unwrap_or_else(|e| panic!("applying:\n{yaml}\n{e:#}"));
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.api.kubectl(args).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Who answers `n` new connections to `to`.
    fn tally(&self, to: SocketAddr, n: usize) -> Result<BTreeMap<String, usize>> {
        let mut t = BTreeMap::new();
        for name in names_from(&self.bed.client, to, n)? {
            *t.entry(name).or_default() += 1;
        }
        Ok(t)
    }

    /// Waits until every one of 20 new connections to `to` is answered by pod `i`;
    /// returns how long it took.
    fn wait_all_from(&self, to: SocketAddr, i: usize) -> Duration {
        let started = Instant::now();
        let want = hello(i);
        loop {
            let got = self.tally(to, 20);
            match &got {
                Ok(t) if t.len() == 1 && t.contains_key(&want) => return started.elapsed(),
                _ if started.elapsed() > FOLLOW => {
                    panic!(
                        "after {FOLLOW:?}, calls to {to} are not all answered by pod {i}: {got:?}"
                    )
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn admin_get(&self, path: &str) -> String {
        let admin: SocketAddr = ADMIN.parse().unwrap();
        self.bed
            .node
            .run(|| http_get(admin, path, DEFAULT_TIMEOUT))
            .unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
    }

    fn config_dump(&self) -> serde_json::Value {
        serde_json::from_str(&self.admin_get("/config_dump")).unwrap()
    }
}

/// The seed's objects: HelloWorld in four localities, one slice per two pods (merged
/// across slices), the seed's DestinationRule as a cluster object.
fn seed_objects() -> String {
    [
        service_yaml("helloworld", HELLO_VIP, &[("http", HELLO_PORT, "8080")], ""),
        slice_yaml(
            "helloworld-a",
            "helloworld",
            &[("http", 8080)],
            &[Ep::ready(1), Ep::ready(2)],
        ),
        slice_yaml(
            "helloworld-b",
            "helloworld",
            &[("http", 8080)],
            &[Ep::ready(3), Ep::ready(4)],
        ),
        SEED_RULE.to_string(),
    ]
    .join("---\n")
}

/// The seed through Kubernetes: the node's labels give its locality, the DestinationRule
/// comes from the cluster, the pods' veths appear after the agent; then the seed's drains
/// fail over region1/zone1 → region1/zone2 → region2/zone3 → region3/zone4 with no failed
/// call.
#[test]
fn seed_through_kubernetes_fails_over_without_a_failed_call() {
    let Some(mut c) = Cluster::start(&seed_objects()) else {
        return;
    };
    for i in 1..=4 {
        c.add_pod(i, &[8080]);
    }
    let to = vip(HELLO_PORT);
    let took = c.wait_all_from(to, 1);
    println!("pods attached and served {took:?} after their veths appeared");
    // The seed's table from this node: one priority per locality.
    let dump = c.config_dump();
    let svc = &dump["services"][0];
    assert_eq!(svc["name"], "helloworld.sample.svc.cluster.local");
    assert_eq!(svc["source"]["kind"], "kubernetes");
    assert_eq!(
        svc["source"]["name"],
        "Kubernetes Service sample/helloworld"
    );
    let priorities: Vec<u64> = svc["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["priority"].as_u64().unwrap())
        .collect();
    assert_eq!(priorities, [0, 1, 2, 3], "{svc}");

    let mut failed = 0;
    for drained in 1..=3 {
        c.pods.get_mut(&drained).unwrap().servers[0].stop();
        let want = hello(drained + 1);
        loop {
            match c.bed.client.run(|| http_get(to, "/", DEFAULT_TIMEOUT)) {
                Ok(name) if name == want => break,
                Ok(other) => panic!("a call reached {other} after pod {drained} was drained"),
                Err(_) => failed += 1,
            }
            assert!(failed < 10, "traffic did not fail over to {want}");
        }
        let t = c.tally(to, 20).unwrap();
        assert_eq!(t.len(), 1, "after draining pod {drained}: {t:?}");
    }
    assert_eq!(failed, 0, "the client saw failed calls");
}

/// The tables follow the cluster: an endpoint turning not ready, back to ready, the node
/// relabelled, a pod's locality label, a slice deleted, the Service deleted.
#[test]
fn tables_follow_the_cluster() {
    let mut objects = seed_objects();
    for i in 1..=4 {
        objects.push_str("---\n");
        objects.push_str(&pod_yaml(i, ""));
    }
    let Some(mut c) = Cluster::start(&objects) else {
        return;
    };
    for i in 1..=4 {
        c.add_pod(i, &[8080]);
    }
    let to = vip(HELLO_PORT);
    c.wait_all_from(to, 1);

    // Pod 1 not ready: its level's load moves to region1/zone2.
    let mut not_ready = Ep::ready(1);
    not_ready.ready = false;
    not_ready.serving = false;
    c.apply(&slice_yaml(
        "helloworld-a",
        "helloworld",
        &[("http", 8080)],
        &[not_ready, Ep::ready(2)],
    ));
    println!("not ready → followed in {:?}", c.wait_all_from(to, 2));
    c.apply(&slice_yaml(
        "helloworld-a",
        "helloworld",
        &[("http", 8080)],
        &[Ep::ready(1), Ep::ready(2)],
    ));
    println!("ready again → followed in {:?}", c.wait_all_from(to, 1));

    // The node moves to region2/zone3: pod 3 is now its own locality.
    c.apply(&node_yaml(THIS_NODE, "region2", "zone3"));
    println!("node relabelled → followed in {:?}", c.wait_all_from(to, 3));
    c.apply(&node_yaml(THIS_NODE, "region1", "zone1"));
    c.wait_all_from(to, 1);

    // Pod 4's Istio locality label puts it beside pod 1: both share the first level.
    c.kubectl(&[
        "label",
        "pod",
        "-n",
        "sample",
        "pod-4",
        "topology.istio.io/locality=region1.zone1",
    ]);
    let started = Instant::now();
    loop {
        let t = c.tally(to, 40).unwrap();
        if t.len() == 2 && t.contains_key(&hello(1)) && t.contains_key(&hello(4)) {
            println!("pod label → followed in {:?}: {t:?}", started.elapsed());
            break;
        }
        assert!(
            started.elapsed() < FOLLOW,
            "pod 4 did not join pod 1's level: {t:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The slice of pods 1 and 2 deleted: pod 4 (labelled region1/zone1) alone is nearest.
    c.kubectl(&["delete", "endpointslice", "-n", "sample", "helloworld-a"]);
    println!("slice deleted → followed in {:?}", c.wait_all_from(to, 4));

    // The Service deleted: its VIP goes from the data plane.
    c.kubectl(&["delete", "service", "-n", "sample", "helloworld"]);
    let started = Instant::now();
    loop {
        let gone = c.config_dump()["services"]
            .as_array()
            .is_some_and(|s| s.is_empty());
        if gone {
            break;
        }
        assert!(
            started.elapsed() < FOLLOW,
            "the deleted Service is still balanced"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        c.bed
            .client
            .run(|| http_get(to, "/", Duration::from_millis(500)))
            .is_err(),
        "a deleted Service's VIP still answers"
    );
}

/// Kubernetes' own traffic settings, each with traffic: `internalTrafficPolicy: Local`,
/// the terminating fallback, `trafficDistribution: PreferSameZone` (failover without
/// outlier detection), a named `targetPort` resolved per slice, `sessionAffinity:
/// ClientIP`.
#[test]
fn kubernetes_traffic_settings() {
    let mut local = Ep::ready(2);
    local.node = THIS_NODE.into();
    let mut draining = Ep::ready(2);
    (draining.ready, draining.serving, draining.terminating) = (false, true, true);
    let mut gone = Ep::ready(1);
    (gone.ready, gone.serving, gone.terminating) = (false, false, false);
    let objects = [
        // Local: pod 2 runs on this node, pod 1 elsewhere.
        service_yaml(
            "local",
            "10.96.0.21",
            &[("", 80, "8080")],
            "  internalTrafficPolicy: Local\n",
        ),
        slice_yaml("local-1", "local", &[("", 8080)], &[Ep::ready(1), local]),
        // No ready endpoint: the serving, terminating one takes the calls.
        service_yaml("terminating", "10.96.0.22", &[("", 80, "8080")], ""),
        slice_yaml("terminating-1", "terminating", &[("", 8080)], &[gone, draining]),
        // PreferSameZone: pod 1 (region1/zone1, as this node) first; pod 2 when it fails.
        service_yaml(
            "zonal",
            "10.96.0.23",
            &[("", 80, "8081")],
            "  trafficDistribution: PreferSameZone\n",
        ),
        slice_yaml("zonal-1", "zonal", &[("", 8081)], &[Ep::ready(1), Ep::ready(2)]),
        // targetPort by name: each slice carries its pods' number for the port "web".
        service_yaml("named", "10.96.0.24", &[("web", 80, "web")], ""),
        slice_yaml("named-1", "named", &[("web", 8080)], &[Ep::ready(3)]),
        slice_yaml("named-2", "named", &[("web", 9090)], &[Ep::ready(4)]),
        // ClientIP affinity over three pods.
        service_yaml(
            "sticky",
            "10.96.0.25",
            &[("", 80, "8080")],
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}\n",
        ),
        slice_yaml(
            "sticky-1",
            "sticky",
            &[("", 8080)],
            &[Ep::ready(1), Ep::ready(3), Ep::ready(4)],
        ),
    ]
    .join("---\n");
    let Some(mut c) = Cluster::start(&objects) else {
        return;
    };
    c.add_pod(1, &[8080, 8081]);
    c.add_pod(2, &[8080, 8081]);
    c.add_pod(3, &[8080]);
    c.add_pod(4, &[9090]);
    let at = |last: u8| -> SocketAddr { format!("10.96.0.{last}:80").parse().unwrap() };

    c.wait_all_from(at(21), 2);
    c.wait_all_from(at(22), 2);
    c.wait_all_from(at(23), 1);
    c.pods.get_mut(&1).unwrap().servers[1].stop();
    let mut failed = 0;
    for _ in 0..20 {
        match c.bed.client.run(|| http_get(at(23), "/", DEFAULT_TIMEOUT)) {
            Ok(name) => assert_eq!(name, hello(2), "PreferSameZone after pod 1 failed"),
            Err(_) => failed += 1,
        }
    }
    assert_eq!(failed, 0, "PreferSameZone failed over with failed calls");

    let t = c.tally(at(24), 40).unwrap();
    assert_eq!(t.len(), 2, "both named-port slices serve: {t:?}");

    let t = c.tally(at(25), 30).unwrap();
    assert_eq!(
        t.len(),
        1,
        "ClientIP affinity: one pod for one client: {t:?}"
    );
}

/// Faults: the API server killed and restarted under traffic (no failed call, the data
/// plane never empties, the agent reconnects and follows again); the agent restarted while
/// the API server is down (it keeps forwarding on the pinned state, and reconciles when
/// the server returns: a Service deleted meanwhile goes).
#[test]
fn api_server_and_agent_restarts_lose_nothing() {
    let objects = format!(
        "{}---\n{}---\n{}---\n{}",
        service_yaml("web", "10.96.0.31", &[("", 80, "8080")], ""),
        slice_yaml("web-1", "web", &[("", 8080)], &[Ep::ready(1)]),
        service_yaml("doomed", "10.96.0.32", &[("", 80, "8080")], ""),
        slice_yaml("doomed-1", "doomed", &[("", 8080)], &[Ep::ready(2)]),
    );
    let Some(mut c) = Cluster::start(&objects) else {
        return;
    };
    c.add_pod(1, &[8080]);
    c.add_pod(2, &[8080]);
    let web: SocketAddr = "10.96.0.31:80".parse().unwrap();
    let doomed: SocketAddr = "10.96.0.32:80".parse().unwrap();
    c.wait_all_from(web, 1);
    c.wait_all_from(doomed, 2);

    // The API server dies under traffic.
    c.api.stop_apiserver().unwrap();
    let t = c.tally(web, 30).unwrap();
    assert_eq!(
        t.get(&hello(1)),
        Some(&30),
        "while the API server is down: {t:?}"
    );
    c.api.start_apiserver().unwrap();
    let t = c.tally(web, 30).unwrap();
    assert_eq!(t.get(&hello(1)), Some(&30), "after it returned: {t:?}");
    // Reconnected: a change after the restart is followed.
    c.apply(&slice_yaml("web-1", "web", &[("", 8080)], &[Ep::ready(2)]));
    c.wait_all_from(web, 2);
    let restarts = c.config_dump()["kubernetes"]["watch_restarts"].clone();
    println!("watch restarts after the API server restart: {restarts}");

    // A deletion the watch never saw (cilium#48050): with the API server down, the
    // Service `gone` and its slice are removed from etcd itself; when the server returns,
    // the agent's relist must drop them, not only add what is new.
    c.apply(&format!(
        "{}---\n{}",
        service_yaml("gone", "10.96.0.33", &[("", 80, "8080")], ""),
        slice_yaml("gone-1", "gone", &[("", 8080)], &[Ep::ready(1)]),
    ));
    let gone: SocketAddr = "10.96.0.33:80".parse().unwrap();
    c.wait_all_from(gone, 1);
    c.api.stop_apiserver().unwrap();
    let deleted = delete_from_etcd(&c, "/sample/gone") + delete_from_etcd(&c, "/sample/gone-1");
    assert_eq!(deleted, 2, "the Service and its slice in etcd");
    c.api.start_apiserver().unwrap();
    let started = Instant::now();
    loop {
        let dump = c.config_dump();
        let listed = dump["services"].as_array().is_some_and(|s| {
            s.iter()
                .any(|s| s["name"] == "gone.sample.svc.cluster.local")
        });
        let answers = c
            .bed
            .client
            .run(|| http_get(gone, "/", Duration::from_millis(300)))
            .is_ok();
        if !listed && !answers {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "a Service deleted while the watch was down is still there (listed: {listed}, \
             answers: {answers})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "deleted while the watch was down → gone {:?} after the API server returned",
        started.elapsed()
    );

    // The agent stops; the Service `doomed` is deleted; the API server goes down; the
    // agent starts again and waits, while the pinned data plane keeps forwarding.
    let mut agent = c.agent.take().unwrap();
    agent.kill();
    c.kubectl(&["delete", "service", "-n", "sample", "doomed"]);
    c.api.stop_apiserver().unwrap();
    agent.restart().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let admin: SocketAddr = ADMIN.parse().unwrap();
    let ready = c
        .bed
        .node
        .run(|| http_get(admin, "/ready", DEFAULT_TIMEOUT));
    assert!(
        ready.is_err(),
        "ready before the first list of the cluster: {ready:?}"
    );
    let t = c.tally(web, 20).unwrap();
    assert_eq!(
        t.get(&hello(2)),
        Some(&20),
        "with the agent waiting for the API server: {t:?}"
    );
    c.api.start_apiserver().unwrap();
    c.agent = Some(agent);
    c.wait_ready();
    let started = Instant::now();
    while c
        .bed
        .client
        .run(|| http_get(doomed, "/", Duration::from_millis(300)))
        .is_ok()
    {
        assert!(
            started.elapsed() < FOLLOW,
            "the Service deleted meanwhile is still served"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let t = c.tally(web, 20).unwrap();
    assert_eq!(t.get(&hello(2)), Some(&20), "after reconciling: {t:?}");
}

/// Bad objects are reported with the object's name and field, and everything else keeps
/// working: a Service port lb cannot serve, a slice with a malformed address, an invalid
/// DestinationRule.
#[test]
fn bad_objects_are_reported_and_the_rest_works() {
    let bad_rule = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: broken, namespace: sample }
spec:
  host: web
  trafficPolicy:
    outlierDetection: { interval: soon }
";
    let bad_slice = "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-bad
  namespace: sample
  labels: { kubernetes.io/service-name: web }
addressType: IPv4
ports: [{name: \"\", port: 8080, protocol: TCP}]
endpoints:
- addresses: [not-an-address]
";
    let objects = [
        service_yaml("web", "10.96.0.41", &[("", 80, "8080")], ""),
        slice_yaml("web-1", "web", &[("", 8080)], &[Ep::ready(1)]),
        bad_slice.to_string(),
        "apiVersion: v1\nkind: Service\nmetadata: {name: sctp, namespace: sample}\nspec:\n  \
         clusterIP: 10.96.0.42\n  ports: [{name: \"\", port: 80, protocol: SCTP}]\n"
            .to_string(),
        bad_rule.to_string(),
    ]
    .join("---\n");
    let Some(mut c) = Cluster::start(&objects) else {
        return;
    };
    c.add_pod(1, &[8080]);
    c.wait_all_from("10.96.0.41:80".parse().unwrap(), 1);
    let dump = c.config_dump();
    let problems = dump["kubernetes"]["problems"].to_string();
    assert!(
        problems.contains("Kubernetes Service sample/sctp: spec.ports[0].protocol: SCTP"),
        "{problems}"
    );
    assert!(
        problems.contains("EndpointSlice sample/web-bad: endpoints[0].addresses[0]"),
        "{problems}"
    );
    let warnings = dump["warnings"].to_string();
    assert!(
        warnings.contains("rejected: DestinationRule sample/broken")
            && warnings.contains("outlierDetection.interval"),
        "{warnings}"
    );
}

/// The endpoints of one Service in /config_dump, by address.
fn dumped_endpoints(dump: &serde_json::Value, vip: &str) -> Vec<String> {
    let services = dump["services"].as_array().cloned().unwrap_or_default();
    let Some(service) = services.iter().find(|s| s["frontend"]["vip"] == vip) else {
        return Vec::new();
    };
    let mut addresses: Vec<String> = service["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["address"].as_str().map(str::to_string))
        .collect();
    addresses.sort();
    addresses
}

/// An endpoint change that does not fit the data plane is refused (the view says why,
/// the service keeps what it had); once it fits, because another Service shrank, the
/// cluster's state is applied whole, the refused change included.
#[test]
fn a_change_that_does_not_fit_waits_until_it_does() {
    // Backend ids 1 to 7.
    let node = "apiVersion: lb/v1alpha1\nkind: Node\nspec:\n  dataplane: { max_backends: 8 }\n";
    let a = |pods: &[usize]| {
        let eps: Vec<Ep> = pods.iter().map(|&p| Ep::ready(p)).collect();
        slice_yaml("a-1", "a", &[("", 8080)], &eps)
    };
    let b = |pods: &[usize]| {
        let eps: Vec<Ep> = pods.iter().map(|&p| Ep::ready(p)).collect();
        slice_yaml("b-1", "b", &[("", 8080)], &eps)
    };
    let objects = [
        service_yaml("a", "10.96.0.51", &[("", 80, "8080")], ""),
        a(&[1, 2]),
        service_yaml("b", "10.96.0.52", &[("", 80, "8080")], ""),
        b(&[3, 4, 5, 6]),
    ]
    .join("---\n");
    let Some(c) = Cluster::start_with_files(&objects, false, &[("node.yaml", node)]) else {
        return;
    };
    let endpoints = |vip: &str| dumped_endpoints(&c.config_dump(), vip);
    let addresses = |pods: &[usize]| -> Vec<String> {
        let mut v: Vec<String> = pods.iter().map(|p| format!("10.200.{p}.2:8080")).collect();
        v.sort();
        v
    };
    assert_eq!(endpoints("10.96.0.51"), addresses(&[1, 2]));

    // Four for `a` and four for `b` are eight backends: one too many.
    c.apply(&a(&[1, 2, 7, 8]));
    let started = Instant::now();
    let error = loop {
        let dump = c.config_dump();
        if let Some(e) = dump["kubernetes"]["apply_error"].as_str() {
            break e.to_string();
        }
        assert!(started.elapsed() < FOLLOW, "no apply error in /config_dump");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(error.contains("max_backends"), "{error}");
    assert_eq!(
        endpoints("10.96.0.51"),
        addresses(&[1, 2]),
        "a keeps what it had"
    );
    assert_eq!(endpoints("10.96.0.52"), addresses(&[3, 4, 5, 6]));

    // `b` shrinks: the whole cluster fits, `a`'s refused change comes with it.
    c.apply(&b(&[3]));
    let started = Instant::now();
    while endpoints("10.96.0.51") != addresses(&[1, 2, 7, 8]) {
        assert!(
            started.elapsed() < FOLLOW,
            "a's endpoints are {:?}",
            endpoints("10.96.0.51")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(endpoints("10.96.0.52"), addresses(&[3]));
    assert_eq!(
        c.config_dump()["kubernetes"]["apply_error"],
        serde_json::Value::Null
    );
}

/// An ExternalName Service is balanced by name: a VIP allocated for its host, the
/// external name resolved (by the node's resolver, here the test's DNS server) to a pod,
/// which answers calls to the VIP.
#[test]
fn an_external_name_service_is_balanced_by_name() {
    let objects = "apiVersion: v1
kind: Service
metadata: { name: db, namespace: sample }
spec:
  type: ExternalName
  externalName: db.example.org
  ports: [{ name: http, port: 80, protocol: TCP }]
";
    // The agent asks 127.0.0.53:5353, where the server comes up after it started: it
    // retries within a second (--dns-min-ttl 1).
    let Some(mut c) = Cluster::start_full(
        objects,
        false,
        &[],
        &["--resolver", "127.0.0.53:5353", "--dns-min-ttl", "1"],
    ) else {
        return;
    };
    c.add_pod(1, &[80]);
    let dns =
        lb_tests::dns_server::TestDnsServer::start(&c.bed.node, "127.0.0.53:5353".parse().unwrap())
            .unwrap();
    dns.set("db.example.org", &["10.200.1.2".parse().unwrap()], 1);
    let dump = c.config_dump();
    let service = &dump["services"][0];
    assert_eq!(service["name"], "db.sample.svc.cluster.local", "{dump}");
    let vip: std::net::Ipv4Addr = service["frontend"]["vip"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(vip.octets()[..2], [240, 240]);
    let to = SocketAddr::from((vip, 80));
    println!("resolved and balanced in {:?}", c.wait_all_from(to, 1));
}

/// Istio's CRDs absent at the start are not an error (the Service is balanced without
/// them); installed later, they are picked up: a DestinationRule then applies to the
/// Service, and a ServiceEntry adds its own frontend.
#[test]
fn istio_crds_installed_later_are_picked_up() {
    let objects = format!(
        "{}---\n{}",
        service_yaml("web", "10.96.0.51", &[("http", 80, "8080")], ""),
        slice_yaml("web-1", "web", &[("http", 8080)], &[Ep::ready(1)]),
    );
    let Some(mut c) = Cluster::start_with(&objects, false) else {
        return;
    };
    c.add_pod(1, &[8080]);
    c.wait_all_from("10.96.0.51:80".parse().unwrap(), 1);
    let dump = c.config_dump();
    assert!(dump["services"][0]["outlier_detection"].is_null());

    c.api.install_istio_crds().unwrap();
    c.apply(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: web, namespace: sample }
spec:
  host: web.sample.svc.cluster.local
  trafficPolicy:
    outlierDetection: { consecutive5xxErrors: 3, interval: 2s }
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: external, namespace: sample }
spec:
  hosts: [external.example]
  addresses: [10.96.0.52]
  ports: [{ number: 80, name: http, protocol: HTTP, targetPort: 8080 }]
  resolution: STATIC
  endpoints: [{ address: 10.200.1.2 }]
",
    );
    let started = Instant::now();
    loop {
        let dump = c.config_dump();
        let services = dump["services"].as_array().cloned().unwrap_or_default();
        let web = services
            .iter()
            .find(|s| s["name"] == "web.sample.svc.cluster.local");
        let applied = web.is_some_and(|w| w["outlier_detection"]["consecutive_5xx_errors"] == 3);
        let entry = services.iter().find(|s| s["name"] == "external.example");
        if let (true, Some(entry)) = (applied, entry) {
            assert_eq!(entry["source"]["kind"], "kubernetes");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the CRDs' objects were not picked up: {services:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    c.wait_all_from("10.96.0.52:80".parse().unwrap(), 1);
}

/// Deletes, in etcd itself (its JSON gateway, from the node where it listens), every key
/// under `/registry/` that ends with `suffix`, and compacts etcd's history; returns how
/// many keys were deleted.
fn delete_from_etcd(c: &Cluster, suffix: &str) -> usize {
    use base64::{engine::general_purpose::STANDARD, Engine as _};
    let b64 = |bytes: &[u8]| STANDARD.encode(bytes);
    let url = c.api.etcd_url().to_string();
    let post = |path: &str, body: String| -> serde_json::Value {
        let out = c
            .bed
            .node
            .exec(&[
                "curl",
                "-s",
                "--max-time",
                "5",
                "-X",
                "POST",
                &format!("{url}{path}"),
                "-d",
                &body,
            ])
            .unwrap_or_else(|e| panic!("etcd {path}: {e:#}"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("etcd {path}: {e}: {out}"))
    };
    let listed = post(
        "/v3/kv/range",
        format!(
            "{{\"key\":\"{}\",\"range_end\":\"{}\",\"keys_only\":true}}",
            b64(b"/registry/"),
            b64(b"/registry0")
        ),
    );
    let mut deleted = 0;
    for kv in listed["kvs"].as_array().cloned().unwrap_or_default() {
        let key = STANDARD
            .decode(kv["key"].as_str().unwrap_or_default())
            .unwrap_or_default();
        if key.ends_with(suffix.as_bytes()) {
            let answer = post(
                "/v3/kv/deleterange",
                format!("{{\"key\":\"{}\"}}", b64(&key)),
            );
            deleted += answer["deleted"]
                .as_str()
                .and_then(|d| d.parse::<usize>().ok())
                .unwrap_or(0);
        }
    }
    // Compacted: no watch can resume from before the deletions and replay them; the
    // agent's watches must list again.
    let revision = post("/v3/kv/range", format!("{{\"key\":\"{}\"}}", b64(b"/")))["header"]
        ["revision"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    post(
        "/v3/kv/compaction",
        format!("{{\"revision\":\"{revision}\",\"physical\":true}}"),
    );
    deleted
}
