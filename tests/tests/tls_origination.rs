//! The blog's HTTPS variant ("Configuring failover for external services"), its YAML as
//! written (`examples/external-dns-https.yaml`): the client calls `http://mydb.com` in
//! plain HTTP, and lb originates TLS to the DynamoDB names on 443, whose backends (in
//! namespaces) present certificates from a CA the test makes (trusted through
//! `SSL_CERT_FILE`, as the system's roots would be), their names served by the test's DNS
//! server.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::LazyLock,
    time::{Duration, Instant},
};

use lb::dataplane::AttachMode;
use lb_tests::{
    agent_process::{write_atomically, AgentProcess, TempDir},
    dns_server::TestDnsServer,
    names_from, require_root,
    tls_server::{HttpsNameServer, TestCa},
    topology::{backend_addr, TestBed},
    DEFAULT_TIMEOUT,
};

const ADMIN: &str = "127.0.0.1:15000";
const EAST: &str = "dynamodb.us-east-1.amazonaws.com";
const WEST: &str = "dynamodb.us-west-1.amazonaws.com";
const CONFIG: &str = include_str!("../../examples/external-dns-https.yaml");
const FOLLOW: Duration = Duration::from_secs(10);

/// One CA for the test binary: its file is the agents' `SSL_CERT_FILE`.
static CA: LazyLock<(TempDir, TestCa)> = LazyLock::new(|| {
    let dir = TempDir::new("lbca").unwrap();
    let ca = TestCa::new(&dir.0).unwrap();
    // SAFETY (of the environment): set once, before any agent is started.
    std::env::set_var("SSL_CERT_FILE", &ca.pem_path);
    (dir, ca)
});

struct Scenario {
    bed: TestBed,
    _dns: TestDnsServer,
    servers: Vec<HttpsNameServer>,
    config: std::path::PathBuf,
    agent: AgentProcess,
    _dir: TempDir,
}

impl Scenario {
    /// Backends 1 (us-east-1) and 2 (us-west-1) serve HTTPS on 443 with certificates for
    /// `names[i]`.
    fn start(names: [&str; 2]) -> Option<Self> {
        if !require_root() {
            return None;
        }
        let ca = &CA.1;
        let answers = ["us-east-1", "us-west-1"].map(String::from);
        let bed = TestBed::with_backends(AttachMode::Tc, &answers).unwrap();
        let servers = (1u8..)
            .zip(&answers)
            .zip(names)
            .map(|((i, answer), name)| {
                HttpsNameServer::start(
                    &bed.backends[i as usize - 1].ns,
                    SocketAddr::from((backend_addr(i), 443)),
                    answer,
                    ca.issue(&[name]).unwrap(),
                )
                .unwrap()
            })
            .collect();
        let dns = TestDnsServer::start(&bed.node, "127.0.0.53:0".parse().unwrap()).unwrap();
        dns.set(EAST, &[backend_addr(1)], 30);
        dns.set(WEST, &[backend_addr(2)], 30);
        let dir = TempDir::new("lbtls").unwrap();
        let config = dir.0.join("lb.yaml");
        write_atomically(&config, CONFIG).unwrap();
        let resolver = dns.addr().to_string();
        let agent =
            AgentProcess::start_with(&bed, &config, &["--admin", ADMIN, "--resolver", &resolver])
                .unwrap();
        let s = Self {
            bed,
            _dns: dns,
            servers,
            config,
            agent,
            _dir: dir,
        };
        let admin: SocketAddr = ADMIN.parse().unwrap();
        lb_tests::agent_process::wait_until(&s.bed.node, Duration::from_secs(20), || {
            lb_tests::http_get(admin, "/ready", Duration::from_millis(500))
        })
        .expect("the agent gets ready");
        Some(s)
    }

    fn admin_get(&self, path: &str) -> String {
        let admin: SocketAddr = ADMIN.parse().unwrap();
        self.bed
            .node
            .run(|| lb_tests::http_get(admin, path, DEFAULT_TIMEOUT))
            .unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
    }

    fn config_dump(&self) -> serde_json::Value {
        serde_json::from_str(&self.admin_get("/config_dump")).unwrap()
    }

    fn vip(&self) -> SocketAddr {
        let dump = self.config_dump();
        let f = &dump["services"][0]["frontend"];
        let vip: Ipv4Addr = f["vip"].as_str().unwrap().parse().unwrap();
        SocketAddr::from((vip, f["port"].as_u64().unwrap() as u16))
    }

    /// Waits until each of 10 new connections is answered by `name`.
    fn wait_all_from(&self, to: SocketAddr, name: &str) {
        let started = Instant::now();
        loop {
            let got = names_from(&self.bed.client, to, 10);
            if got.as_ref().is_ok_and(|n| n.iter().all(|n| n == name)) {
                return;
            }
            assert!(
                started.elapsed() < FOLLOW,
                "calls to {to} are not all answered by {name}: {got:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `lb endpoints` (the table), run in the node as an operator would.
    fn lb_endpoints(&self) -> String {
        self.agent.lb(&self.bed.node, ADMIN, &["endpoints"])
    }
}

/// Plain HTTP to mydb.com's VIP reaches us-east-1 over TLS; the data plane passes the
/// connections to the forwarder, which verified us-east-1's certificate for its name.
#[test]
fn plain_http_calls_reach_the_local_region_over_tls() {
    let Some(s) = Scenario::start([EAST, WEST]) else {
        return;
    };
    let to = s.vip();
    assert_eq!(to.port(), 80);
    s.wait_all_from(to, "us-east-1");
    assert!(s.servers[0].handshakes() >= 10);
    assert_eq!(s.servers[1].handshakes(), 0);
    let dump = s.config_dump();
    let east = &dump["tls_origination"]["endpoints"][format!("{}:443", backend_addr(1))];
    assert!(east["connections"].as_u64().unwrap() >= 10, "{dump:#}");
    let metrics = s.admin_get("/metrics");
    assert!(
        metrics.contains("lb_dataplane_packets_total{verdict=\"pass_tls_origination\"}"),
        "the kernel passed the TLS frontend's packets"
    );
}

/// A frontend without TLS beside the TLS one keeps the kernel path: its connections are
/// DNAT-ed by the data plane (`forward_new`), not passed to the forwarder.
#[test]
fn other_frontends_keep_the_kernel_path() {
    let Some(s) = Scenario::start([EAST, WEST]) else {
        return;
    };
    let plain = "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: web }
spec:
  hosts: [web.internal]
  addresses: [10.96.0.10]
  ports: [{ number: 80, name: http, protocol: HTTP, targetPort: 8080 }]
  resolution: STATIC
  endpoints: [{ address: 10.200.1.2 }, { address: 10.200.2.2 }]
";
    write_atomically(&s.config, &format!("{CONFIG}{plain}")).unwrap();
    let web = SocketAddr::from((Ipv4Addr::new(10, 96, 0, 10), 80));
    let started = Instant::now();
    while names_from(&s.bed.client, web, 1).is_err() {
        assert!(
            started.elapsed() < FOLLOW,
            "the plain frontend is not served"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let counter = |verdict: &str| -> u64 {
        let metrics = s.admin_get("/metrics");
        let series = format!("lb_dataplane_packets_total{{verdict=\"{verdict}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str())?.parse().ok())
            .unwrap_or(0)
    };
    let (forwarded, passed) = (counter("forward_new"), counter("pass_tls_origination"));
    names_from(&s.bed.client, web, 10).expect("plain calls");
    s.wait_all_from(s.vip(), "us-east-1");
    assert!(
        counter("forward_new") >= forwarded + 10,
        "plain calls DNAT-ed in the kernel"
    );
    assert!(
        counter("pass_tls_origination") > passed,
        "TLS calls passed to the forwarder"
    );
    let dump = s.config_dump();
    let tls = &dump["tls_origination"]["endpoints"];
    assert!(
        tls.get(format!("{}:8080", backend_addr(1))).is_none(),
        "the forwarder never saw the plain frontend: {tls}"
    );
}

/// The blog's failure with the us-east port made wrong: calls go to us-west-1 with no
/// failed call, and us-east's endpoint fails its outlier check.
#[test]
fn a_wrong_port_fails_over_with_no_failed_call() {
    let Some(s) = Scenario::start([EAST, WEST]) else {
        return;
    };
    let to = s.vip();
    s.wait_all_from(to, "us-east-1");
    let wrong = CONFIG.replacen(
        "    locality: us-east1\n",
        "    locality: us-east1\n    ports:\n      http-port: 444\n",
        1,
    );
    assert_ne!(wrong, CONFIG);
    write_atomically(&s.config, &wrong).unwrap();
    let east_444 = format!("{}:444", backend_addr(1));
    let started = Instant::now();
    while !s.config_dump()["services"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["address"] == east_444.as_str())
    {
        assert!(
            started.elapsed() < FOLLOW,
            "the changed port is not applied"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let names = names_from(&s.bed.client, to, 20).expect("no failed call");
    assert!(names.iter().all(|n| n == "us-west-1"), "{names:?}");
    let table = s.lb_endpoints();
    let east = table
        .lines()
        .find(|l| l.starts_with(&east_444))
        .unwrap_or_else(|| panic!("no {east_444} in:\n{table}"));
    assert_eq!(
        east.split_whitespace().collect::<Vec<_>>()[1..3],
        ["UNHEALTHY", "FAILED"],
        "{table}"
    );
}

/// us-east-1 presents a certificate for another name: its handshakes fail, calls go to
/// us-west-1 with no failed call, and the failure is counted as a TLS error.
#[test]
fn a_certificate_for_the_wrong_name_fails_over() {
    let Some(s) = Scenario::start(["wrong.example", WEST]) else {
        return;
    };
    let to = s.vip();
    let names = names_from(&s.bed.client, to, 10).expect("no failed call");
    assert!(names.iter().all(|n| n == "us-west-1"), "{names:?}");
    let dump = s.config_dump();
    let east = &dump["tls_origination"]["endpoints"][format!("{}:443", backend_addr(1))];
    assert!(
        east["tls_errors"]["certificate_wrong_name"]
            .as_u64()
            .unwrap()
            >= 1,
        "{dump:#}"
    );
    let table = s.lb_endpoints();
    let east = format!("{}:443", backend_addr(1));
    let row = table.lines().find(|l| l.starts_with(&east)).unwrap();
    assert!(row.contains("FAILED"), "{table}");
}

/// us-east-1 answers 503 over TLS: the forwarder reads the status from the decrypted
/// stream, `consecutive5xxErrors: 1` ejects the endpoint, and calls go to us-west-1.
#[test]
fn a_503_over_tls_ejects_the_endpoint() {
    let Some(s) = Scenario::start([EAST, WEST]) else {
        return;
    };
    let to = s.vip();
    s.wait_all_from(to, "us-east-1");
    s.servers[0].set_status(503);
    s.wait_all_from(to, "us-west-1");
    let clusters = s.admin_get("/clusters");
    let flags = format!(
        "outbound|80||mydb.com::{}:443::health_flags::/failed_outlier_check",
        backend_addr(1)
    );
    assert!(clusters.contains(&flags), "{clusters}");
}
