//! lb at cluster scale: the real `lb agent --kubernetes` against the test API server
//! (etcd and the apiserver library, `lb_tests::apiserver`), loaded with thousands of
//! Services and their EndpointSlices.
//!
//! Everything runs in one node namespace, on its loopback: etcd, the API server, the
//! agent (attached to a dummy interface; no traffic flows) and its admin endpoint, and the
//! bench's own Kubernetes client, whose runtime is built on a thread that joined the
//! namespace (its sockets are created there). Measured:
//!
//! - loading: every object created through the API (kube-rs, 64 requests in flight);
//! - the agent's start: from spawning `lb agent` to `/ready` answering 200 (every kind
//!   listed, the first publish done), its memory (`/proc/PID/status`) and the data
//!   plane's maps (the kernel's memlock figure of each pinned map);
//! - one endpoint change under that load: from just before the API write (a merge patch
//!   of one slice: an endpoint's readiness flipped, the trigger-time annotation set) to
//!   the backend's state in the pinned backends map showing it, polled from the bench;
//!   beside it the agent's own `lb_network_programming_duration_seconds`.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, ensure, Context as _, Result};
use aya::maps::{Array, MapData};
use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::api::{Api, Patch, PatchParams, PostParams};
use lb_common::maps::{Backend, BackendState};
use lb_tests::{agent_process::TempDir, apiserver::TestApiServer, Netns};

use crate::{
    agent::{AgentGuard, ADMIN},
    control_plane::Status,
};
use serde_json::{json, Value};

/// The namespace every Service and slice is created in.
const NAMESPACE: &str = "scale";
/// The agent's Node.
const NODE_NAME: &str = "bench-node";
/// Other Nodes, whose names the endpoints carry (`nodeName`), in four localities.
const NODES: usize = 100;
const LOCALITIES: [(&str, &str); 4] = [
    ("region1", "zone1"),
    ("region1", "zone2"),
    ("region2", "zone3"),
    ("region3", "zone4"),
];
/// Requests in flight while loading.
const CONCURRENCY: usize = 64;
/// The endpoints' port (the Service's is 80).
const TARGET_PORT: u16 = 8080;
/// Longest wait for `/ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for one change to reach the backends map.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Between two polls of the backends map (one `bpf(MAP_LOOKUP_ELEM)` each): the poll
/// gives up the CPU the agent, the API server and etcd share with it. The figure's
/// resolution is this plus the timer's slack (~0.1 ms in all).
const POLL_INTERVAL: Duration = Duration::from_micros(50);
/// The data plane's sizes: room for 10,000 Services × 10 endpoints and more.
const MAX_SERVICES: u32 = 16_384;
const MAX_BACKENDS: u32 = 131_072;
const TABLE_SLOTS: u32 = 1024;
const MAX_CONNECTIONS: u32 = 65_536;

/// Longest wait for `GET /metrics`.
const METRICS_TIMEOUT: Duration = Duration::from_secs(60);

/// Goals the figures are held to.
const READY_GOAL: Duration = Duration::from_secs(10);
const CHANGE_P99_GOAL: Duration = Duration::from_millis(10);
const MEMORY_GOAL_KB: u64 = 300 * 1024;

pub struct Options {
    pub services: usize,
    pub endpoints: usize,
    pub changes: usize,
    /// Missing API server binaries are an error (the section was asked for), not a skip.
    pub required: bool,
}

/// Service `i`'s ClusterIP: 10.96.0.0/16, host parts .1 to .254.
fn cluster_ip(i: usize) -> Ipv4Addr {
    let third = (i / 254) as u8;
    let fourth = (i % 254 + 1) as u8;
    Ipv4Addr::new(10, 96, third, fourth)
}

/// Endpoint `j` of Service `i`: 10.200.0.1 up, unique.
fn endpoint_ip(endpoints: usize, i: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0ac8_0000 + (i * endpoints + j) as u32 + 1)
}

fn node_name(n: usize) -> String {
    format!("node-{n:03}")
}

fn node_object(name: &str, (region, zone): (&str, &str)) -> Result<Node> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "topology.kubernetes.io/region": region,
                "topology.kubernetes.io/zone": zone,
            },
        },
    }))?)
}

fn service_object(i: usize) -> Result<Service> {
    let ip = cluster_ip(i).to_string();
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": format!("svc-{i}"), "namespace": NAMESPACE },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip,
            "clusterIPs": [ip],
            "ports": [{ "name": "", "port": 80, "protocol": "TCP", "targetPort": TARGET_PORT }],
        },
    }))?)
}

fn slice_name(i: usize) -> String {
    format!("svc-{i}-0")
}

/// Service `i`'s endpoints, all ready but `not_ready`.
fn slice_endpoints(endpoints: usize, i: usize, not_ready: Option<usize>) -> Value {
    let list: Vec<Value> = (0..endpoints)
        .map(|j| {
            let ready = not_ready != Some(j);
            json!({
                "addresses": [endpoint_ip(endpoints, i, j).to_string()],
                "conditions": { "ready": ready, "serving": ready, "terminating": false },
                "nodeName": node_name((i * endpoints + j) % NODES),
            })
        })
        .collect();
    Value::Array(list)
}

fn slice_object(endpoints: usize, i: usize) -> Result<EndpointSlice> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": slice_name(i),
            "namespace": NAMESPACE,
            "labels": { "kubernetes.io/service-name": format!("svc-{i}") },
        },
        "addressType": "IPv4",
        "ports": [{ "name": "", "port": TARGET_PORT, "protocol": "TCP" }],
        "endpoints": slice_endpoints(endpoints, i, None),
    }))?)
}

/// A kube-rs client of the test API server. Call inside the runtime that will use it.
async fn client(kubeconfig: &Path) -> Result<kube::Client> {
    let file = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
            .await?;
    Ok(kube::Client::try_from(config)?)
}

/// Creates the namespace, the Nodes, and every Service with its slice, `CONCURRENCY`
/// requests in flight.
async fn load(client: &kube::Client, services: usize, endpoints: usize) -> Result<()> {
    let pp = PostParams::default();
    Api::<Namespace>::all(client.clone())
        .create(
            &pp,
            &serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": NAMESPACE },
            }))?,
        )
        .await
        .context("creating the namespace")?;
    let nodes = Api::<Node>::all(client.clone());
    let mut all = vec![node_object(NODE_NAME, LOCALITIES[0])?];
    for n in 0..NODES {
        all.push(node_object(
            &node_name(n),
            LOCALITIES[n % LOCALITIES.len()],
        )?);
    }
    let mut created = futures::stream::iter(all.into_iter().map(|node| {
        let nodes = nodes.clone();
        let pp = pp.clone();
        async move { nodes.create(&pp, &node).await }
    }))
    .buffer_unordered(CONCURRENCY);
    while let Some(r) = created.next().await {
        r.context("creating a Node")?;
    }
    let svcs = Api::<Service>::namespaced(client.clone(), NAMESPACE);
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), NAMESPACE);
    let mut created = futures::stream::iter((0..services).map(|i| {
        let (svcs, slices, pp) = (svcs.clone(), slices.clone(), pp.clone());
        async move {
            svcs.create(&pp, &service_object(i)?)
                .await
                .with_context(|| format!("creating Service svc-{i}"))?;
            slices
                .create(&pp, &slice_object(endpoints, i)?)
                .await
                .with_context(|| format!("creating EndpointSlice {}", slice_name(i)))?;
            anyhow::Ok(())
        }
    }))
    .buffer_unordered(CONCURRENCY);
    let started = Instant::now();
    let mut done = 0;
    while let Some(r) = created.next().await {
        r?;
        done += 1;
        if done % 2000 == 0 && done < services {
            println!(
                "kubernetes: {done} of {services} Services and their slices created ({:.0} s)",
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

/// The maps pinned in `pin_dir`, largest first: (name, bytes, estimated), as `lb maps`
/// reads them (the kernel's memlock figure, else an estimate from the sizes).
fn pinned_maps(pin_dir: &Path) -> Result<Vec<(String, u64, bool)>> {
    use std::os::fd::AsFd as _;
    let mut out = Vec::new();
    // Links are pinned there too: only the maps' names.
    for name in lb_common::maps::PINNED {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let fd = info
            .fd()
            .with_context(|| format!("a descriptor of {}", path.display()))?;
        let (bytes, estimated) =
            lb::dataplane::memory::map_bytes(&lb::dataplane::memory::fdinfo(fd.as_fd()));
        out.push((name.to_string(), bytes, estimated));
    }
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(out)
}

/// A histogram's `_count` and `_sum` from the agent's `/metrics` text.
fn histogram(metrics: &str, name: &str) -> Option<(u64, f64)> {
    let value = |suffix: &str| {
        metrics.lines().find_map(|l| {
            let rest = l.strip_prefix(&format!("{name}{suffix}"))?;
            rest.strip_prefix(' ')?.trim().parse::<f64>().ok()
        })
    };
    Some((value("_count")? as u64, value("_sum")?))
}

/// The upper bound of the bucket a histogram's `q` quantile falls in (what
/// `histogram_quantile` would interpolate within), from the `/metrics` text.
fn histogram_bound(metrics: &str, name: &str, q: f64) -> Option<f64> {
    let (count, _) = histogram(metrics, name)?;
    let prefix = format!("{name}_bucket{{le=\"");
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix(&prefix)?;
        let (le, value) = rest.split_once("\"}")?;
        let cumulative: f64 = value.trim().parse().ok()?;
        (cumulative >= q * count as f64).then(|| le.parse::<f64>().ok())?
    })
}

/// What the section measured.
struct Figures {
    services: usize,
    endpoints: usize,
    load: Duration,
    ready: Duration,
    /// Backends with a state in the map at `/ready`.
    backends_at_ready: usize,
    at_ready: Status,
    /// After the changes, before `GET /metrics`.
    after_changes: Status,
    /// After `GET /metrics`.
    at_end: Status,
    /// The agent's CPU time from its start to `/ready`.
    cpu_to_ready: Duration,
    /// The agent's CPU time over the changes, per change.
    cpu_per_change: Duration,
    maps: Vec<(String, u64, bool)>,
    /// Change to live, sorted.
    changes: Vec<Duration>,
    /// The API server's answer to each change's write, sorted.
    writes: Vec<Duration>,
    /// The agent's own part (`lb_kubernetes_change_apply_seconds`): count, sum and the
    /// bucket bound of its 99th percentile.
    agent_part: Option<(u64, f64, Option<f64>)>,
    /// The agent's `lb_network_programming_duration_seconds` (count, sum), or why not.
    programming: Result<Option<(u64, f64)>, String>,
    /// How long `GET /metrics` took.
    metrics_took: Duration,
    /// How long its text was (bytes).
    metrics_len: usize,
}

/// Nearest-rank percentile of sorted `v`.
fn rank(v: &[Duration], p: usize) -> Duration {
    v[(v.len() * p).div_ceil(100).max(1) - 1]
}

/// Inside the node namespace: load the API server, start the agent, measure.
fn measure(node: &Netns, iface: &str, kubeconfig: &Path, o: &Options) -> Result<Figures> {
    // Workers are spawned from this thread, so they are in the namespace too.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let client = rt.block_on(client(kubeconfig))?;
    println!(
        "kubernetes: creating {} Services with one EndpointSlice of {} endpoints each, {} \
         Nodes...",
        o.services,
        o.endpoints,
        NODES + 1
    );
    let t = Instant::now();
    rt.block_on(load(&client, o.services, o.endpoints))?;
    let load_took = t.elapsed();
    println!(
        "kubernetes: loaded {} objects in {:.1} s",
        2 * o.services + NODES + 2,
        load_took.as_secs_f64()
    );

    let state = TempDir::new("lbk8sb")?;
    let config = state.0.join("config");
    std::fs::create_dir_all(&config)?;
    std::fs::write(
        config.join("node.yaml"),
        format!(
            "apiVersion: lb/v1alpha1\nkind: Node\nspec:\n  dataplane:\n    \
             max_services: {MAX_SERVICES}\n    max_backends: {MAX_BACKENDS}\n    \
             table_slots: {TABLE_SLOTS}\n    max_connections: {MAX_CONNECTIONS}\n"
        ),
    )?;
    let extra: Vec<std::ffi::OsString> = vec![
        "--kubernetes".into(),
        "--kubeconfig".into(),
        kubeconfig.into(),
        "--node-name".into(),
        NODE_NAME.into(),
    ];
    let mut agent = AgentGuard::start(
        node,
        state,
        &config,
        iface,
        &extra,
        // Its log (with timestamps) says where the start's time goes; kube-rs warns of
        // the test server's self-signed certificate at every connection.
        "info,kube_client::client::tls=error",
    )?;
    let ready = agent.wait_ready(READY_TIMEOUT)?;
    let at_ready = agent.status()?;
    let cpu_to_ready = agent.cpu_time()?;
    println!(
        "kubernetes: agent ready {:.2} s after its start; VmRSS {:.1} MiB; its log to ready:",
        ready.as_secs_f64(),
        at_ready.rss as f64 / 1024.0
    );
    for line in agent.log_tail(20).lines() {
        println!("  {line}");
    }
    let maps = pinned_maps(&agent.pin_dir)?;

    // The changes: pairs on Services spread over the range, endpoint 0 made not ready
    // (its backend drains), then ready again (active).
    let pairs = o.changes.div_ceil(2);
    let targets: Vec<usize> = (0..pairs).map(|p| p * o.services / pairs).collect();
    let backends = Array::<MapData, Backend>::try_from(aya::maps::Map::from_map_data(
        MapData::from_pin(agent.pin_dir.join(lb_common::maps::BACKENDS))
            .context("opening the pinned backends map")?,
    )?)?;
    let wanted: HashMap<Ipv4Addr, usize> = targets
        .iter()
        .map(|&i| (endpoint_ip(o.endpoints, i, 0), i))
        .collect();
    let mut ids: HashMap<usize, u32> = HashMap::new();
    let mut backends_at_ready = 0;
    for (id, b) in backends.iter().enumerate() {
        let b = b?;
        if BackendState::from_u8(b.state) == BackendState::Unset {
            continue;
        }
        backends_at_ready += 1;
        let addr = Ipv4Addr::from(b.addr.v4_octets());
        if u16::from_be(b.port_be) == TARGET_PORT {
            if let Some(&i) = wanted.get(&addr) {
                ids.insert(i, id as u32);
            }
        }
    }
    ensure!(
        backends_at_ready == o.services * o.endpoints,
        "{backends_at_ready} backends in the map at /ready, not {}",
        o.services * o.endpoints
    );

    let slices = Api::<EndpointSlice>::namespaced(client.clone(), NAMESPACE);
    let mut changes = Vec::with_capacity(o.changes);
    let mut writes = Vec::with_capacity(o.changes);
    let cpu_before = agent.cpu_time()?;
    for k in 0..o.changes {
        let i = targets[k / 2];
        let id = *ids
            .get(&i)
            .with_context(|| format!("no backend for endpoint 0 of svc-{i}"))?;
        let ready = k % 2 == 1;
        let want = if ready {
            BackendState::Active
        } else {
            BackendState::Draining
        };
        let now = k8s_openapi::jiff::Timestamp::try_from(SystemTime::now())?;
        let patch = json!({
            "metadata": { "annotations": {
                "endpoints.kubernetes.io/last-change-trigger-time": format!("{now:.9}"),
            } },
            "endpoints": slice_endpoints(o.endpoints, i, (!ready).then_some(0)),
        });
        let slices = slices.clone();
        let name = slice_name(i);
        let t = Instant::now();
        let write = rt.spawn(async move {
            let result = slices
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await;
            (result, t.elapsed())
        });
        let took = loop {
            let b = backends.get(&id, 0)?;
            if BackendState::from_u8(b.state) == want {
                break t.elapsed();
            }
            if t.elapsed() > CHANGE_TIMEOUT {
                bail!(
                    "endpoint 0 of svc-{i} (backend {id}) was not {want:?} {} s after the \
                     write (it is {:?})",
                    CHANGE_TIMEOUT.as_secs(),
                    BackendState::from_u8(b.state)
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        };
        let (written, write_took) = rt.block_on(write)?;
        written.with_context(|| format!("patching {}", slice_name(i)))?;
        changes.push(took);
        writes.push(write_took);
        if (k + 1) % 20 == 0 && k + 1 < o.changes {
            println!(
                "kubernetes: {} of {} changes live, the last in {}",
                k + 1,
                o.changes,
                ms(took)
            );
        }
    }
    let cpu_per_change = agent.cpu_time()?.saturating_sub(cpu_before) / o.changes as u32;
    let after_changes = agent.status()?;
    changes.sort_unstable();
    writes.sort_unstable();
    println!(
        "kubernetes: {} changes live: p50 {}, p99 {}, max {}",
        changes.len(),
        ms(rank(&changes, 50)),
        ms(rank(&changes, 99)),
        ms(changes[changes.len() - 1])
    );
    // /metrics carries every service's and backend's series: long at this size.
    let t = Instant::now();
    let admin: SocketAddr = ADMIN.parse()?;
    let metrics = lb_tests::http_get(admin, "/metrics", METRICS_TIMEOUT);
    let programming = metrics
        .as_ref()
        .map(|m| histogram(m, "lb_network_programming_duration_seconds"))
        .map_err(|e| format!("{e:#}"));
    let agent_part = metrics.as_ref().ok().and_then(|m| {
        let name = "lb_kubernetes_change_apply_seconds";
        let (count, sum) = histogram(m, name)?;
        Some((count, sum, histogram_bound(m, name, 0.99)))
    });
    let metrics_took = t.elapsed();
    let metrics_len = metrics.as_ref().map_or(0, String::len);
    agent.check_running()?;
    let at_end = agent.status()?;
    Ok(Figures {
        services: o.services,
        endpoints: o.endpoints,
        load: load_took,
        ready,
        backends_at_ready,
        at_ready,
        after_changes,
        at_end,
        cpu_to_ready,
        cpu_per_change,
        maps,
        changes,
        writes,
        agent_part,
        programming,
        metrics_took,
        metrics_len,
    })
}

fn mib_kb(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn goal(met: bool, text: &str) -> String {
    format!("{text}: {}", if met { "met" } else { "**missed**" })
}

/// The section: its markdown (also printed).
pub fn run(o: &Options) -> Result<String> {
    let mut md = String::new();
    if let Some(why) = lb_tests::apiserver::skip_reason() {
        ensure!(
            !o.required,
            "the kubernetes section needs the test API server: {why}"
        );
        emit!(md, "");
        emit!(
            md,
            "kubernetes: skipped: {why} (`cargo xtask test` builds it; --no-kubernetes \
             silences this)"
        );
        return Ok(md);
    }
    ensure!(
        o.services > 0 && o.endpoints > 0 && o.changes > 0,
        "kubernetes: {} services x {} endpoints, {} changes",
        o.services,
        o.endpoints,
        o.changes
    );
    ensure!(
        o.services <= 254 * 256 && o.services * o.endpoints < 0x0037_0000,
        "kubernetes: {} services x {} endpoints do not fit 10.96.0.0/16 and 10.200.0.0 up",
        o.services,
        o.endpoints
    );
    let started = Instant::now();
    let node = Netns::new("k8sb")?;
    let iface = lb_tests::add_dummy(&node, "lbk")?;
    let api = TestApiServer::start_in(&node)?;
    let kubeconfig = api.kubeconfig_path().to_path_buf();
    let f = node.run(|| measure(&node, &iface, &kubeconfig, o))?;
    drop(api);
    drop(node);

    let total_maps: u64 = f.maps.iter().map(|m| m.1).sum();
    let estimated = f.maps.iter().any(|m| m.2);
    let p99 = rank(&f.changes, 99);
    let peak = f.at_ready.hwm.max(f.at_end.hwm);
    emit!(md, "");
    emit!(
        md,
        "kubernetes scale ({} Services x {} endpoints = {} backends, one EndpointSlice each, \
         {NODES} Nodes in 4 localities; `lb agent --kubernetes` against the test API server \
         in the node's namespace; dataplane max_services {MAX_SERVICES}, max_backends \
         {MAX_BACKENDS}, table_slots {TABLE_SLOTS}, max_connections {MAX_CONNECTIONS})",
        f.services,
        f.endpoints,
        f.services * f.endpoints
    );
    emit!(md, "");
    emit!(md, "| figure | value | goal |");
    emit!(md, "| --- | ---: | --- |");
    emit!(
        md,
        "| loading the API server: every Service and slice created ({CONCURRENCY} requests in \
         flight) | {} | |",
        secs(f.load)
    );
    emit!(
        md,
        "| agent start to `/ready` (every kind listed, first publish; {} backends in the map) \
         | {} | {} |",
        f.backends_at_ready,
        secs(f.ready),
        goal(f.ready < READY_GOAL, "< 10 s")
    );
    emit!(
        md,
        "| the agent's CPU time (user + system) from its start to `/ready` | {} | |",
        secs(f.cpu_to_ready)
    );
    emit!(
        md,
        "| agent memory at `/ready`: VmRSS | {} | {} |",
        mib_kb(f.at_ready.rss),
        goal(f.at_ready.rss < MEMORY_GOAL_KB, "< 300 MiB")
    );
    emit!(
        md,
        "| of which anonymous (RssAnon: the agent's heap) | {} | |",
        mib_kb(f.at_ready.anon)
    );
    emit!(
        md,
        "| of which mapped (RssFile + RssShmem: the binary, the selection map mmapped) | {} | |",
        mib_kb(f.at_ready.mapped)
    );
    emit!(
        md,
        "| agent memory after the changes: VmRSS (RssAnon) | {} ({}) | |",
        mib_kb(f.after_changes.rss),
        mib_kb(f.after_changes.anon)
    );
    emit!(
        md,
        "| agent memory: VmHWM (peak) after the changes, before `GET /metrics` | {} | |",
        mib_kb(f.after_changes.hwm)
    );
    emit!(
        md,
        "| agent memory after `GET /metrics`: VmRSS (RssAnon) | {} ({}) | |",
        mib_kb(f.at_end.rss),
        mib_kb(f.at_end.anon)
    );
    emit!(
        md,
        "| agent memory: VmHWM (peak) at the end | {} | {} |",
        mib_kb(peak),
        goal(peak < MEMORY_GOAL_KB, "< 300 MiB")
    );
    emit!(
        md,
        "| map memory: sum over the pinned maps (kernel's memlock per map) | {}{} ({} maps) | |",
        if estimated { "~" } else { "" },
        mib(total_maps),
        f.maps.len()
    );
    for (name, bytes, est) in &f.maps {
        if bytes * 100 >= total_maps.max(1) {
            emit!(
                md,
                "| of which {name} | {}{} | |",
                if *est { "~" } else { "" },
                mib(*bytes)
            );
        }
    }
    let n = f.changes.len();
    emit!(
        md,
        "| one endpoint's readiness changed, API write to backends map live, p50 of {n} | {} \
         | |",
        ms(rank(&f.changes, 50))
    );
    emit!(
        md,
        "| the same, p99 of {n} | {} | {} |",
        ms(p99),
        goal(p99 < CHANGE_P99_GOAL, "< 10 ms")
    );
    emit!(md, "| the same, max of {n} | {} | |", ms(f.changes[n - 1]));
    emit!(
        md,
        "| of which the API server: the write answered, p50 / p99 | {} / {} | |",
        ms(rank(&f.writes, 50)),
        ms(rank(&f.writes, 99))
    );
    emit!(
        md,
        "| of which the agent: watch event received to tables live \
         (`lb_kubernetes_change_apply_seconds`), mean / p99 bucket | {} | |",
        match f.agent_part {
            Some((count, sum, bound)) if count > 0 => format!(
                "{} / ≤ {} (count {count})",
                ms(Duration::from_secs_f64(sum / count as f64)),
                bound.map_or("?".into(), |b| ms(Duration::from_secs_f64(b)))
            ),
            _ => "not in /metrics".into(),
        }
    );
    emit!(
        md,
        "| the agent's `lb_network_programming_duration_seconds`: mean (sum / count) | {} | |",
        match &f.programming {
            Ok(Some((count, sum))) if *count > 0 => format!(
                "{} (count {count})",
                ms(Duration::from_secs_f64(sum / *count as f64))
            ),
            Ok(Some(_)) => "count 0".into(),
            Ok(None) => "not in /metrics".into(),
            Err(e) => format!("`GET /metrics` failed: {e}"),
        }
    );
    emit!(
        md,
        "| `GET /metrics` answered in (per-service series; per-endpoint ones are left out \
         above `--metrics-endpoint-limit`, 10,000 endpoints by default) | {} ({} of text) | |",
        secs(f.metrics_took),
        mib(f.metrics_len as u64)
    );
    emit!(
        md,
        "| the agent's CPU time per change (user + system, over all {n}) | {} | |",
        ms(f.cpu_per_change)
    );
    emit!(md, "");
    emit!(
        md,
        "Measured with the real `lb` binary and API server (etcd and Kubernetes' apiserver \
         library), all in one network namespace. Start to `/ready`: from spawning the agent \
         to the first 200, polled every 5 ms. Memory: the agent's `/proc/PID/status`. Map \
         memory: each pinned map's memlock in its fdinfo, as `lb maps` reads it. A change: a \
         merge patch of one slice (endpoint 0's `ready` and `serving` flipped, \
         `endpoints.kubernetes.io/last-change-trigger-time` set to now), timed from just \
         before the write to the bench seeing the backend's state (`draining`, then \
         `active` again) in the pinned `{}` map, polled every ~0.1 ms; one change at a \
         time, in {} Services spread over the range. The agent's metric runs from the \
         trigger time to its tables being live.",
        lb_common::maps::BACKENDS,
        n.div_ceil(2)
    );
    emit!(
        md,
        "kubernetes measured in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_unique_and_in_their_ranges() {
        let ips: std::collections::BTreeSet<Ipv4Addr> = (0..20_000).map(cluster_ip).collect();
        assert_eq!(ips.len(), 20_000);
        assert!(ips.iter().all(|ip| {
            let o = ip.octets();
            o[0] == 10 && o[1] == 96 && o[3] != 0 && o[3] != 255
        }));
        assert_eq!(endpoint_ip(10, 0, 0), Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(endpoint_ip(10, 9_999, 9), Ipv4Addr::new(10, 201, 134, 160));
        assert_ne!(endpoint_ip(10, 1, 0), endpoint_ip(10, 0, 9));
    }

    #[test]
    fn reads_a_histogram_from_metrics() {
        let text = "# TYPE lb_network_programming_duration_seconds histogram\n\
                    lb_network_programming_duration_seconds_sum 1.5\n\
                    lb_network_programming_duration_seconds_count 3\n\
                    lb_network_programming_duration_seconds_bucket{le=\"0.001\"} 0\n\
                    lb_table_publish_seconds_count 9\n";
        assert_eq!(
            histogram(text, "lb_network_programming_duration_seconds"),
            Some((3, 1.5))
        );
        assert_eq!(histogram(text, "lb_missing_seconds"), None);
    }

    #[test]
    fn reads_a_quantile_bucket_from_metrics() {
        let text = "lb_x_seconds_sum 1.5\n\
                    lb_x_seconds_count 100\n\
                    lb_x_seconds_bucket{le=\"0.001\"} 50\n\
                    lb_x_seconds_bucket{le=\"0.002\"} 98\n\
                    lb_x_seconds_bucket{le=\"0.004\"} 99\n\
                    lb_x_seconds_bucket{le=\"+Inf\"} 100\n";
        assert_eq!(histogram_bound(text, "lb_x_seconds", 0.5), Some(0.001));
        assert_eq!(histogram_bound(text, "lb_x_seconds", 0.99), Some(0.004));
        assert_eq!(
            histogram_bound(text, "lb_x_seconds", 1.0),
            Some(f64::INFINITY)
        );
    }
}
