//! The `lb agent` binary's admin endpoint as operators use it: Envoy's `/clusters` view
//! (text and JSON), Prometheus `/metrics`, `/healthz`, `/ready`, `/config_dump`, the token
//! that mutating calls need, and `POST /reload`.
//!
//! Each test has its own node namespace, and so its own loopback: the admin port is the
//! same in every test without a clash.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4},
    os::unix::fs::PermissionsExt as _,
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use lb::dataplane::AttachMode;
use lb_tests::{
    agent_process::{wait_until, write_atomically, AgentProcess, TempDir},
    clients::http_request,
    http_get, names_from, require_root,
    topology::{self, backend_addr, backend_name, vip_http, TestBed, BACKEND_HTTP_PORT, VIP},
    Netns, DEFAULT_TIMEOUT,
};
use serde_json::Value;

const ADMIN_PORT: u16 = 15001;
const HELLO_PORT: u16 = 5000;
const HOST: &str = "helloworld.sample.svc.cluster.local";
const CLUSTER: &str = "outbound|5000||helloworld.sample.svc.cluster.local";

/// The seed's localities, one backend each (backend i at 10.200.i.2), and the priority
/// each gets seen from region1/zone1 with `failover: region1 → region2`.
const LOCALITIES: [(&str, &str, u32); 4] = [
    ("region1", "zone1", 0),
    ("region1", "zone2", 1),
    ("region2", "zone3", 2),
    ("region3", "zone4", 3),
];

fn loopback_admin() -> SocketAddr {
    (std::net::Ipv4Addr::LOCALHOST, ADMIN_PORT).into()
}

fn endpoint(i: u8) -> SocketAddrV4 {
    SocketAddrV4::new(backend_addr(i), BACKEND_HTTP_PORT)
}

fn hello_vip() -> SocketAddr {
    (VIP, HELLO_PORT).into()
}

/// The seed's ServiceEntry and DestinationRule, with every ejection allowed
/// (`maxEjectionPercent: 100`), and the node at region1/zone1.
fn seed_config() -> String {
    let endpoints: String = (1u8..)
        .zip(LOCALITIES)
        .map(|(i, (r, z, _))| format!("  - address: {}\n    locality: {r}/{z}\n", backend_addr(i)))
        .collect();
    format!(
        r#"apiVersion: lb/v1alpha1
kind: Node
spec:
  locality: region1/zone1
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: helloworld
  namespace: sample
spec:
  hosts:
  - {HOST}
  addresses:
  - {VIP}
  ports:
  - number: {HELLO_PORT}
    name: http
    protocol: HTTP
    targetPort: {BACKEND_HTTP_PORT}
  resolution: STATIC
  endpoints:
{endpoints}---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: helloworld
spec:
  host: {HOST}
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        enabled: true
        failover:
          - from: region1
            to: region2
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 10m
      maxEjectionPercent: 100
"#
    )
}

/// A test bed with the agent running, its admin endpoint on `admin_bind`.
struct Scenario {
    bed: TestBed,
    config: std::path::PathBuf,
    _dir: TempDir,
    agent: AgentProcess,
}

impl Scenario {
    fn start(backends: &[String], config: &str, admin_bind: &str, serves: SocketAddr) -> Self {
        Self::start_with(backends, config, admin_bind, serves, &[])
    }

    /// Like `start`, the agent with `args` too.
    fn start_with(
        backends: &[String],
        config: &str,
        admin_bind: &str,
        serves: SocketAddr,
        args: &[&str],
    ) -> Self {
        let bed = TestBed::with_backends(AttachMode::Tc, backends).unwrap();
        let dir = TempDir::new("lbadmin").unwrap();
        let path = dir.0.join("lb.yaml");
        write_atomically(&path, config).unwrap();
        let mut all_args = vec!["--admin", admin_bind];
        all_args.extend_from_slice(args);
        let agent = AgentProcess::start_with(&bed, &path, &all_args).unwrap();
        wait_until(&bed.client, Duration::from_secs(20), || {
            http_get(serves, "/", Duration::from_millis(500))
        })
        .expect("the agent programs the VIP");
        Self {
            bed,
            config: path,
            _dir: dir,
            agent,
        }
    }

    fn seed() -> Self {
        Self::seed_with(&[])
    }

    fn seed_with(args: &[&str]) -> Self {
        let backends: Vec<String> = LOCALITIES
            .iter()
            .map(|(r, z, _)| format!("{r}.{z}"))
            .collect();
        Self::start_with(
            &backends,
            &seed_config(),
            &loopback_admin().to_string(),
            hello_vip(),
            args,
        )
    }

    fn token(&self) -> String {
        std::fs::read_to_string(&self.agent.admin_token_file)
            .expect("the agent wrote its admin token")
            .trim()
            .to_string()
    }

    /// `METHOD path` on the admin endpoint from the node (loopback): status and body.
    fn call(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        self.bed
            .node
            .run(|| http_request(loopback_admin(), method, path, headers, DEFAULT_TIMEOUT))
            .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"))
    }

    /// `GET path`, which must answer 200.
    fn get(&self, path: &str) -> String {
        match self.call("GET", path, &[]) {
            (200, body) => body,
            other => panic!("GET {path}: {other:?}"),
        }
    }

    /// A mutating call with the agent's token, which must answer 200.
    fn post(&self, path: &str) -> String {
        let token = self.token();
        match self.call("POST", path, &[("x-lb-token", &token)]) {
            (200, body) => body,
            other => panic!("POST {path}: {other:?}"),
        }
    }

    fn clusters(&self) -> Clusters {
        parse_clusters(&self.get("/clusters")).unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn metrics(&self) -> Metrics {
        parse_metrics(&self.get("/metrics")).unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn json(&self, path: &str) -> Value {
        let body = self.get(path);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }
}

/// `/clusters` text: cluster-wide facts, and per (cluster, host) the host's facts.
#[derive(Debug, Default)]
struct Clusters {
    cluster_facts: BTreeMap<(String, String), String>,
    hosts: BTreeMap<(String, SocketAddrV4), BTreeMap<String, String>>,
}

impl Clusters {
    fn host(&self, cluster: &str, host: SocketAddrV4) -> &BTreeMap<String, String> {
        self.hosts
            .get(&(cluster.to_string(), host))
            .unwrap_or_else(|| panic!("{cluster}::{host} not in /clusters: {self:?}"))
    }

    fn fact(&self, host: SocketAddrV4, fact: &str) -> &str {
        self.host(CLUSTER, host)
            .get(fact)
            .unwrap_or_else(|| panic!("{host} has no {fact}"))
    }

    fn count(&self, host: SocketAddrV4, fact: &str) -> u64 {
        let v = self.fact(host, fact);
        v.parse()
            .unwrap_or_else(|_| panic!("{host}::{fact} is {v:?}, not a count"))
    }
}

/// Parses Envoy's text format, checking every line's shape:
/// `CLUSTER::added_via_api::BOOL`, `CLUSTER::outlier::FACT::VALUE` or
/// `CLUSTER::IP:PORT::FACT::VALUE`.
fn parse_clusters(text: &str) -> Result<Clusters> {
    let mut c = Clusters::default();
    for line in text.lines() {
        let parts: Vec<&str> = line.split("::").collect();
        match parts.as_slice() {
            [cluster, fact, value] => {
                c.cluster_facts
                    .insert((cluster.to_string(), fact.to_string()), value.to_string());
            }
            [cluster, "outlier", fact, value] => {
                c.cluster_facts.insert(
                    (cluster.to_string(), format!("outlier::{fact}")),
                    value.to_string(),
                );
            }
            [cluster, host, fact, value] => {
                let host: SocketAddrV4 = host
                    .parse()
                    .with_context(|| format!("line {line:?}: {host:?} is not IP:PORT"))?;
                let facts = c.hosts.entry((cluster.to_string(), host)).or_default();
                ensure!(
                    facts.insert(fact.to_string(), value.to_string()).is_none(),
                    "line {line:?}: {fact} twice"
                );
            }
            _ => bail!("line {line:?} is not CLUSTER::...::VALUE"),
        }
    }
    Ok(c)
}

/// One sample of the exposition: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug)]
struct Metrics(Vec<Sample>);

impl Metrics {
    /// Samples of `name` whose labels include every `(key, value)` of `labels`.
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.0
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The one sample of `name` with `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found = self.find(name, labels);
        assert_eq!(
            found.len(),
            1,
            "{name} {labels:?}: expected one sample, found {found:?}"
        );
        found[0].value
    }
}

/// Parses the text exposition: every line is a comment (`# ...`) or
/// `name{key="value",...} value` (labels optional); it ends with `# EOF`.
fn parse_metrics(text: &str) -> Result<Metrics> {
    ensure!(
        text.trim_end().ends_with("# EOF"),
        "the exposition does not end with # EOF"
    );
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let what = || format!("line {line:?}");
        let name_end = line
            .find(['{', ' '])
            .with_context(|| format!("{}: no value", what()))?;
        let name = &line[..name_end];
        ensure!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(|c: char| c.is_ascii_digit()),
            "{}: bad metric name",
            what()
        );
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(inner) = rest.strip_prefix('{') {
            let close = inner
                .find("} ")
                .with_context(|| format!("{}: labels not closed", what()))?;
            let mut list = &inner[..close];
            while !list.is_empty() {
                let (key, after) = list
                    .split_once("=\"")
                    .with_context(|| format!("{}: bad label", what()))?;
                let end = after
                    .find('"')
                    .with_context(|| format!("{}: label value not closed", what()))?;
                labels.insert(key.to_string(), after[..end].to_string());
                list = after[end + 1..].trim_start_matches(',');
            }
            rest = &inner[close + 1..];
        }
        let value = rest.trim();
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .with_context(|| format!("{}: value {v:?}", what()))?,
        };
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    ensure!(!samples.is_empty(), "no samples");
    Ok(Metrics(samples))
}

fn json_host(clusters: &Value, host: SocketAddrV4) -> &Value {
    let cluster = clusters["cluster_statuses"]
        .as_array()
        .expect("cluster_statuses")
        .iter()
        .find(|c| c["name"] == CLUSTER)
        .unwrap_or_else(|| panic!("{CLUSTER} not in {clusters}"));
    cluster["host_statuses"]
        .as_array()
        .expect("host_statuses")
        .iter()
        .find(|h| {
            h["address"]["socket_address"]["address"] == host.ip().to_string()
                && h["address"]["socket_address"]["port_value"] == host.port()
        })
        .unwrap_or_else(|| panic!("{host} not in {cluster}"))
}

/// A counter of a JSON host status: proto3 JSON leaves a zero out and writes others as
/// strings.
fn json_stat(host: &Value, name: &str) -> u64 {
    let stat = host["stats"]
        .as_array()
        .expect("stats")
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {host}"));
    match &stat["value"] {
        Value::Null => 0,
        Value::String(s) => s.parse().expect("a count"),
        other => panic!("{name} value {other}"),
    }
}

fn config_dump_endpoint(dump: &Value, host: SocketAddrV4) -> &Value {
    dump["services"][0]["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|e| e["address"] == host.to_string())
        .unwrap_or_else(|| panic!("{host} not in the config dump"))
}

/// Every view, on the seed's service: the facts Envoy shows per endpoint, how they move
/// with traffic, ejections (a 503 event, a refused connection, an operator), a drain; the
/// JSON form; Prometheus counters and states; health, readiness and the config dump.
#[test]
fn views_show_what_envoy_and_prometheus_users_read() {
    if !require_root() {
        return;
    }
    let mut s = Scenario::seed();
    assert_eq!(s.get("/healthz").trim(), "ok");
    assert_eq!(s.call("GET", "/ready", &[]).0, 200);

    // Every endpoint, with Envoy's facts, healthy, in its locality and priority.
    let c = s.clusters();
    assert_eq!(
        c.cluster_facts
            .get(&(CLUSTER.to_string(), "added_via_api".into())),
        Some(&"true".to_string())
    );
    assert_eq!(
        c.cluster_facts.get(&(
            CLUSTER.to_string(),
            "outlier::success_rate_ejection_threshold".into()
        )),
        Some(&"-1".to_string())
    );
    assert_eq!(c.hosts.len(), LOCALITIES.len(), "{c:?}");
    for (i, (region, zone, priority)) in (1u8..).zip(LOCALITIES) {
        let e = endpoint(i);
        let facts = c.host(CLUSTER, e);
        let names: Vec<&str> = facts.keys().map(String::as_str).collect();
        let mut expected = vec![
            "canary",
            "cx_connect_fail",
            "cx_total",
            "health_flags",
            "hostname",
            "local_origin_success_rate",
            "priority",
            "region",
            "rq_error",
            "rq_success",
            "rq_total",
            "sub_zone",
            "success_rate",
            "weight",
            "zone",
        ];
        expected.sort_unstable();
        assert_eq!(names, expected, "{e}");
        assert_eq!(c.fact(e, "health_flags"), "healthy", "{e}");
        assert_eq!(c.fact(e, "region"), region, "{e}");
        assert_eq!(c.fact(e, "zone"), zone, "{e}");
        assert_eq!(c.fact(e, "sub_zone"), "", "{e}");
        assert_eq!(c.fact(e, "priority"), priority.to_string(), "{e}");
        assert_eq!(c.fact(e, "weight"), "1", "{e}");
        assert_eq!(c.fact(e, "canary"), "false", "{e}");
        assert_eq!(c.fact(e, "success_rate"), "-1", "{e}");
        assert_eq!(c.fact(e, "local_origin_success_rate"), "-1", "{e}");
        assert_eq!(
            c.count(e, "rq_total"),
            c.count(e, "rq_success") + c.count(e, "rq_error"),
            "{e}"
        );
    }

    // Traffic: 20 new connections, all to region1.zone1, show in both views.
    let service = [("service", HOST)];
    let before = s.metrics();
    let new_before = before.value("lb_service_new_connections_total", &service);
    let e1 = endpoint(1).to_string();
    let e1_labels = [
        ("service", HOST),
        ("endpoint", e1.as_str()),
        ("locality", "region1/zone1"),
        ("priority", "0"),
    ];
    let e1_before = before.value("lb_endpoint_new_connections_total", &e1_labels);
    let names = names_from(&s.bed.client, hello_vip(), 20).unwrap();
    assert!(names.iter().all(|n| n == "region1.zone1"), "{names:?}");
    let after = s.metrics();
    assert!(
        after.value("lb_service_new_connections_total", &service) >= new_before + 20.0,
        "service new connections did not grow by 20"
    );
    assert!(after.value("lb_endpoint_new_connections_total", &e1_labels) >= e1_before + 20.0);
    assert!(after.value("lb_endpoint_http_ok_total", &e1_labels) >= 20.0);
    assert!(after.value("lb_service_http_ok_total", &service) >= 20.0);
    assert!(after.value("lb_dataplane_packets_total", &[("verdict", "forward_new")]) >= 20.0);
    let c = s.clusters();
    assert!(c.count(endpoint(1), "cx_total") >= 20);
    assert!(c.count(endpoint(1), "rq_success") >= 20);
    assert_eq!(c.count(endpoint(2), "cx_total"), 0);

    // An injected 503 ejects region1.zone1 (consecutive5xxErrors: 1).
    s.post(&format!("/endpoints/{}/events/503", endpoint(1)));
    let c = s.clusters();
    assert_eq!(c.fact(endpoint(1), "health_flags"), "/failed_outlier_check");
    assert_eq!(c.count(endpoint(1), "rq_error"), 1);
    assert_eq!(c.fact(endpoint(2), "health_flags"), "healthy");

    // region1.zone2 now takes the traffic; its listener closes, so its kernel refuses
    // connections: the data plane's signal ejects it too.
    s.bed.backends[1].http.stop();
    let names = names_from(&s.bed.client, hello_vip(), 5).unwrap();
    assert!(names.iter().all(|n| n == "region2.zone3"), "{names:?}");
    wait_until(&s.bed.node, Duration::from_secs(3), || {
        let c = parse_clusters(&http_get(loopback_admin(), "/clusters", DEFAULT_TIMEOUT)?)?;
        let flags = c.fact(endpoint(2), "health_flags");
        ensure!(flags == "/failed_outlier_check", "region1.zone2 is {flags}");
        Ok(())
    })
    .expect("the refusing endpoint shows as ejected by outlier detection");
    let c = s.clusters();
    assert!(c.count(endpoint(2), "cx_connect_fail") >= 1);
    assert!(c.count(endpoint(2), "rq_error") >= 1);

    // Operator actions: an ejection shows as the control plane's "unhealthy", a drain as
    // EDS draining.
    s.post(&format!("/endpoints/{}/eject", endpoint(3)));
    s.post(&format!("/endpoints/{}/drain", endpoint(4)));
    let c = s.clusters();
    assert_eq!(c.fact(endpoint(3), "health_flags"), "/failed_eds_health");
    assert_eq!(c.fact(endpoint(4), "health_flags"), "/eds_status_draining");

    // The same in Envoy's JSON shape.
    let j = s.json("/clusters?format=json");
    for (i, (region, zone, priority)) in (1u8..).zip(LOCALITIES) {
        let h = json_host(&j, endpoint(i));
        assert_eq!(h["locality"]["region"], region, "{h}");
        assert_eq!(h["locality"]["zone"], zone, "{h}");
        assert_eq!(
            h["priority"].as_u64().unwrap_or(0),
            u64::from(priority),
            "{h}"
        );
        assert_eq!(h["weight"], 1, "{h}");
    }
    let h1 = json_host(&j, endpoint(1));
    assert_eq!(h1["health_status"]["failed_outlier_check"], true, "{h1}");
    assert_eq!(h1["health_status"]["eds_health_status"], "HEALTHY", "{h1}");
    assert!(json_stat(h1, "cx_total") >= 20, "{h1}");
    assert_eq!(json_stat(h1, "rq_error"), 1, "{h1}");
    let h2 = json_host(&j, endpoint(2));
    assert_eq!(h2["health_status"]["failed_outlier_check"], true, "{h2}");
    assert!(json_stat(h2, "cx_connect_fail") >= 1, "{h2}");
    let h3 = json_host(&j, endpoint(3));
    assert_eq!(
        h3["health_status"]["eds_health_status"], "UNHEALTHY",
        "{h3}"
    );
    assert_eq!(
        h3["health_status"].get("failed_outlier_check"),
        None,
        "{h3}"
    );
    let h4 = json_host(&j, endpoint(4));
    assert_eq!(h4["health_status"]["eds_health_status"], "DRAINING", "{h4}");

    // Prometheus: endpoint states, failover events, reaction and publish histograms.
    let m = s.metrics();
    let state = |i: u8, state: &str| {
        let e = endpoint(i).to_string();
        m.value(
            "lb_endpoint_state",
            &[("endpoint", e.as_str()), ("state", state)],
        )
    };
    assert_eq!(state(1, "outlier_ejected"), 1.0);
    assert_eq!(state(1, "active"), 0.0);
    assert_eq!(state(2, "outlier_ejected"), 1.0);
    assert_eq!(state(3, "operator_ejected"), 1.0);
    assert_eq!(state(4, "draining"), 1.0);
    assert_eq!(state(4, "outlier_ejected"), 0.0);
    let event = |i: u8, event: &str| {
        let e = endpoint(i).to_string();
        m.value(
            "lb_endpoint_failover_events_total",
            &[("endpoint", e.as_str()), ("event", event)],
        )
    };
    assert_eq!(event(1, "outlier_ejected"), 1.0);
    assert_eq!(event(2, "outlier_ejected"), 1.0);
    assert_eq!(event(3, "operator_ejected"), 1.0);
    assert_eq!(event(4, "drained"), 1.0);
    assert_eq!(event(1, "unejected"), 0.0);
    assert!(
        m.value(
            "lb_endpoint_connect_failures_total",
            &[("endpoint", &endpoint(2).to_string())]
        ) >= 1.0
    );
    assert_eq!(
        m.value("lb_service_outlier_ejections_enforced_total", &service),
        2.0
    );
    assert!(m.value("lb_failover_reaction_seconds_count", &[]) >= 1.0);
    assert!(m.value("lb_table_publish_seconds_count", &[]) >= 4.0);
    assert_eq!(
        m.value("lb_tables_published_total", &[]),
        m.value("lb_table_publish_seconds_count", &[])
    );
    assert_eq!(
        m.value(
            "lb_service_priority_load_percent",
            &[("service", HOST), ("priority", "0")]
        ),
        0.0
    );
    for counter in lb_common::Counter::ALL {
        let label = counter.label();
        let found = m
            .find("lb_dataplane_packets_total", &[("verdict", label)])
            .len()
            + m.find("lb_dataplane_events_total", &[("event", label)])
                .len();
        assert_eq!(found, 1, "data-plane counter {label}");
    }

    // The configuration in force, with each endpoint's priority.
    let dump = s.json("/config_dump");
    assert_eq!(dump["node"]["locality"]["region"], "region1", "{dump}");
    assert_eq!(dump["node"]["locality"]["zone"], "zone1", "{dump}");
    assert_eq!(
        dump["config_paths"][0],
        s.config.display().to_string(),
        "{dump}"
    );
    assert!(dump["loaded_at"].is_string(), "{dump}");
    assert_eq!(dump["dataplane"]["connect_retries"], 2, "{dump}");
    let svc = &dump["services"][0];
    assert_eq!(svc["name"], HOST);
    assert_eq!(svc["cluster"], CLUSTER);
    assert_eq!(svc["frontend"]["vip"], VIP.to_string());
    assert_eq!(svc["frontend"]["port"], HELLO_PORT);
    assert_eq!(svc["http"], true);
    assert_eq!(svc["outlier_detection"]["consecutive_5xx_errors"], 1);
    assert_eq!(svc["outlier_detection"]["max_ejection_percent"], 100);
    assert_eq!(svc["outlier_detection"]["base_ejection_time"], "10m");
    assert_eq!(svc["locality_lb"]["failover"][0]["from"], "region1");
    assert_eq!(svc["locality_lb"]["failover"][0]["to"], "region2");
    for (i, (region, zone, priority)) in (1u8..).zip(LOCALITIES) {
        let e = config_dump_endpoint(&dump, endpoint(i));
        assert_eq!(e["priority"], priority, "{e}");
        assert_eq!(e["locality"]["region"], region, "{e}");
        assert_eq!(e["locality"]["zone"], zone, "{e}");
        assert_eq!(e["weight"], 1, "{e}");
    }
    assert_eq!(config_dump_endpoint(&dump, endpoint(1))["share"], 0.0);
}

/// Above `--metrics-endpoint-limit` endpoints, `/metrics` keeps the per-service series,
/// leaves out the per-endpoint ones and says how many endpoints it left out; at or under
/// it, it has them all.
#[test]
fn metrics_leave_out_endpoint_series_above_the_limit() {
    if !require_root() {
        return;
    }
    for (limit, per_endpoint) in [("3", false), ("4", true)] {
        let s = Scenario::seed_with(&["--metrics-endpoint-limit", limit]);
        let m = s.metrics();
        let endpoint_series =
            m.0.iter()
                .filter(|x| x.name.starts_with("lb_endpoint_"))
                .count();
        let omitted = m.value("lb_metrics_endpoints_omitted", &[]);
        if per_endpoint {
            assert_eq!(omitted, 0.0);
            assert!(
                endpoint_series >= 4 * 10,
                "{endpoint_series} endpoint series"
            );
        } else {
            assert_eq!(omitted, 4.0, "the seed's four endpoints are left out");
            assert_eq!(endpoint_series, 0);
        }
        assert_eq!(
            m.find("lb_service_new_connections_total", &[]).len(),
            1,
            "the service's series stay"
        );
    }
}

/// POST from `ns` to `admin` with optional headers: status and body.
fn post_from(ns: &Netns, admin: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    ns.run(|| http_request(admin, "POST", path, headers, DEFAULT_TIMEOUT))
        .unwrap_or_else(|e| panic!("POST {path}: {e:#}"))
}

/// Mutating calls need a loopback peer and the token; views stay open. The admin
/// endpoint is bound to every address here so the non-loopback case can be tried.
#[test]
fn mutating_calls_need_loopback_and_the_token() {
    if !require_root() {
        return;
    }
    let backends: Vec<String> = LOCALITIES
        .iter()
        .map(|(r, z, _)| format!("{r}.{z}"))
        .collect();
    let mut s = Scenario::start(
        &backends,
        &seed_config(),
        &format!("0.0.0.0:{ADMIN_PORT}"),
        hello_vip(),
    );
    let token_file = s.agent.admin_token_file.clone();
    let token = s.token();
    assert_eq!(token.len(), 64, "{token:?}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token:?}");
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "token file mode {mode:o}");

    let eject = format!("/endpoints/{}/eject", endpoint(1));
    let node = &s.bed.node;
    let (status, body) = post_from(node, loopback_admin(), &eject, &[]);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("x-lb-token"), "{body}");
    let wrong = "0".repeat(64);
    let (status, body) = post_from(node, loopback_admin(), &eject, &[("x-lb-token", &wrong)]);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("wrong"), "{body}");
    let (status, body) = post_from(node, loopback_admin(), "/reload", &[]);
    assert_eq!(status, 403, "{body}");

    // From the client, through the node's address: the token is not enough.
    let node_addr: SocketAddr = (std::net::Ipv4Addr::new(10, 200, 0, 1), ADMIN_PORT).into();
    let (status, body) = post_from(&s.bed.client, node_addr, &eject, &[("x-lb-token", &token)]);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("loopback"), "{body}");
    assert!(body.contains(&topology::CLIENT_ADDR.to_string()), "{body}");
    // Views stay open there.
    let view = s
        .bed
        .client
        .run(|| http_get(node_addr, "/clusters", DEFAULT_TIMEOUT))
        .unwrap();
    assert!(
        view.contains(&format!(
            "{CLUSTER}::{}::health_flags::healthy",
            endpoint(1)
        )),
        "nothing refused was applied: {view}"
    );
    // A view's method does not mutate: GET on a mutating route is refused by method.
    assert_eq!(s.call("GET", &eject, &[("x-lb-token", &token)]).0, 405);

    // From loopback with the token: applied.
    let (status, body) = post_from(node, loopback_admin(), &eject, &[("x-lb-token", &token)]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        s.clusters().fact(endpoint(1), "health_flags"),
        "/failed_eds_health"
    );

    // A clean stop removes the token.
    assert!(s.agent.stop(), "the agent stops on SIGTERM");
    assert!(!token_file.exists(), "the token file outlives the agent");
}

/// `POST /reload` applies a changed file at once, and refuses a broken one with its
/// error, keeping the configuration in force.
#[test]
fn reload_applies_a_change_and_refuses_a_broken_file() {
    if !require_root() {
        return;
    }
    let backends: Vec<String> = (1..=3).map(backend_name).collect();
    let s = Scenario::start(
        &backends,
        &topology::config_yaml(&[1, 2, 3], ""),
        &loopback_admin().to_string(),
        vip_http(),
    );
    let endpoints_in_force = |s: &Scenario| -> Vec<String> {
        let dump = s.json("/config_dump");
        let web = dump["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|svc| svc["name"] == "web")
            .cloned()
            .unwrap_or_else(|| panic!("no web service in {dump}"));
        web["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["address"].as_str().unwrap().to_string())
            .collect()
    };
    let address = |i: u8| endpoint(i).to_string();
    assert_eq!(endpoints_in_force(&s), [address(1), address(2), address(3)]);

    write_atomically(&s.config, &topology::config_yaml(&[2, 3], "")).unwrap();
    let answer = s.post("/reload");
    assert!(answer.contains("reloaded: 2 services"), "{answer}");
    assert_eq!(endpoints_in_force(&s), [address(2), address(3)]);
    let c = s.clusters();
    assert!(
        !c.hosts
            .contains_key(&("outbound|80||web".to_string(), endpoint(1))),
        "{c:?}"
    );

    write_atomically(&s.config, "services: [ {").unwrap();
    let token = s.token();
    let (status, body) = s.call("POST", "/reload", &[("x-lb-token", &token)]);
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("not applied"), "{body}");
    assert!(body.contains("lb.yaml"), "the error names the file: {body}");
    assert_eq!(endpoints_in_force(&s), [address(2), address(3)]);
    let dump = s.json("/config_dump");
    assert!(dump["reloads"]["failed"].as_u64().unwrap() >= 1, "{dump}");
    assert!(dump["reloads"]["last_error"].is_string(), "{dump}");
    let seen: std::collections::BTreeSet<String> = names_from(&s.bed.client, vip_http(), 20)
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(
        seen,
        [backend_name(2), backend_name(3)].into_iter().collect(),
        "the configuration in force still serves"
    );
    assert!(
        s.metrics()
            .value("lb_config_reloads_total", &[("result", "failure")])
            >= 1.0
    );
}
