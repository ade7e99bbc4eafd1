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
        Self::start_with(names.map(|n| CA.1.issue(&[n]).unwrap()), CONFIG, &[], None)
    }

    /// Like `start`, the backends presenting `identities` (and with `client_ca`, requiring
    /// a client certificate it signed), the agent given `config` and `extra` arguments.
    fn start_with(
        identities: [lb_tests::tls_server::Identity; 2],
        config_text: &str,
        extra: &[&str],
        client_ca: Option<&TestCa>,
    ) -> Option<Self> {
        if !require_root() {
            return None;
        }
        let answers = ["us-east-1", "us-west-1"].map(String::from);
        let bed = TestBed::with_backends(AttachMode::Tc, &answers).unwrap();
        let servers = (1u8..)
            .zip(&answers)
            .zip(identities)
            .map(|((i, answer), identity)| {
                HttpsNameServer::start_with_clients(
                    &bed.backends[i as usize - 1].ns,
                    SocketAddr::from((backend_addr(i), 443)),
                    answer,
                    identity,
                    client_ca,
                )
                .unwrap()
            })
            .collect();
        let dns = TestDnsServer::start(&bed.node, "127.0.0.53:0".parse().unwrap()).unwrap();
        dns.set(EAST, &[backend_addr(1)], 30);
        dns.set(WEST, &[backend_addr(2)], 30);
        let dir = TempDir::new("lbtls").unwrap();
        let config = dir.0.join("lb.yaml");
        write_atomically(&config, config_text).unwrap();
        let resolver = dns.addr().to_string();
        let mut args = vec!["--admin", ADMIN, "--resolver", &resolver];
        args.extend(extra);
        let agent = AgentProcess::start_with(&bed, &config, &args).unwrap();
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
    let east = east_tls(&dump);
    assert!(east["connections"].as_u64().unwrap() >= 10, "{dump:#}");
    let metrics = s.admin_get("/metrics");
    assert!(
        metrics.contains("lb_dataplane_packets_total{verdict=\"pass_tls_origination\"}"),
        "the kernel passed the TLS frontend's packets"
    );
    // The operator's views count the forwarder's connections as the kernel's.
    let series = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
    };
    let east = format!("{}:443", backend_addr(1));
    assert!(
        series(&format!(
            "lb_tls_endpoint_attempts_total{{endpoint=\"{east}\",result=\"forwarded\"}}"
        )) >= 10
    );
    assert!(
        series(&format!(
            "lb_tls_endpoint_bytes_total{{endpoint=\"{east}\",direction=\"received\"}}"
        )) > 0
    );
    let clusters = s.admin_get("/clusters");
    let fact = |name: &str| -> u64 {
        let prefix = format!("outbound|80||mydb.com::{east}::{name}::");
        clusters
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str())?.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in:\n{clusters}"))
    };
    assert!(
        fact("cx_total") >= 10 && fact("ssl.handshake") >= 10,
        "{clusters}"
    );
    assert!(fact("rq_success") >= 10, "HTTP responses read: {clusters}");
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
    let east = east_tls(&dump);
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
    let clusters = s.admin_get("/clusters");
    assert!(
        clusters.lines().any(|l| l.starts_with(&format!(
            "outbound|80||mydb.com::{east}::ssl.fail.certificate_wrong_name::"
        )) && !l.ends_with("::0")),
        "{clusters}"
    );
    let metrics = s.admin_get("/metrics");
    assert!(
        metrics.contains(&format!(
            "lb_tls_endpoint_handshake_failures_total{{endpoint=\"{east}\",kind=\"certificate_wrong_name\"}}"
        )),
        "{metrics}"
    );
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

/// A call's connect and reads may wait this long: a connection made while no agent
/// listens waits for the next one (its SYN is held back and sent again), as a client with
/// its usual connect timeout does.
const PATIENT: Duration = Duration::from_secs(15);

/// An agent upgrade under steady TLS-originated load loses no request: the stopping agent
/// (SIGTERM) takes no new connection and finishes the ones it has (a keep-alive connection
/// is still answered by it after the next agent serves the new ones), then exits by itself.
#[test]
fn an_upgrade_under_load_loses_no_request() {
    let Some(mut s) = Scenario::start([EAST, WEST]) else {
        return;
    };
    let to = s.vip();
    s.wait_all_from(to, "us-east-1");
    let mut kept = s
        .bed
        .client
        .run(|| lb_tests::KeepAliveClient::connect(to, PATIENT))
        .unwrap();
    assert_eq!(kept.get("/").unwrap(), "us-east-1");
    // `lb conntrack` lists it, as the forwarder carries it.
    let conntrack = s.agent.lb(&s.bed.node, ADMIN, &["conntrack"]);
    assert!(
        conntrack.lines().any(|l| l.contains("TLS FORWARDED")
            && l.contains(&format!("{}:443", backend_addr(1)))
            && l.contains("mydb.com")),
        "{conntrack}"
    );
    let running = std::sync::atomic::AtomicBool::new(true);
    let client = &s.bed.client;
    let (answered, failed, slowest) = std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            let (mut answered, mut failed, mut slowest) = (0u32, Vec::new(), Duration::ZERO);
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                match client.run(|| lb_tests::http_get(to, "/", PATIENT)) {
                    Ok(_) => answered += 1,
                    Err(e) => failed.push(format!("{e:#}")),
                }
                slowest = slowest.max(started.elapsed());
            }
            (answered, failed, slowest)
        });
        let upgraded = (|| {
            std::thread::sleep(Duration::from_millis(300));
            s.agent.upgrade()?;
            // The stopping agent lets the admin port go as it stops; then the next one's
            // `/ready` answers, and it serves new connections.
            std::thread::sleep(Duration::from_millis(1500));
            let admin: SocketAddr = ADMIN.parse().unwrap();
            lb_tests::agent_process::wait_until(&s.bed.node, Duration::from_secs(20), || {
                lb_tests::http_get(admin, "/ready", Duration::from_millis(500))
            })?;
            let node = &s.bed.node;
            let served_by_next = || -> u64 {
                let dump: serde_json::Value = node
                    .run(|| lb_tests::http_get(admin, "/config_dump", DEFAULT_TIMEOUT))
                    .ok()
                    .and_then(|d| serde_json::from_str(&d).ok())
                    .unwrap_or_default();
                east_tls(&dump)["connections"].as_u64().unwrap_or(0)
            };
            let started = Instant::now();
            while served_by_next() < 3 {
                anyhow::ensure!(started.elapsed() < FOLLOW, "the next agent serves no call");
                std::thread::sleep(Duration::from_millis(100));
            }
            anyhow::ensure!(
                !s.agent.wait_previous(Duration::ZERO),
                "the stopping agent exited with a connection in progress"
            );
            // The stopping agent still forwards the connection it has.
            let during = kept.get("/")?;
            drop(kept);
            anyhow::Ok(during)
        })();
        std::thread::sleep(Duration::from_millis(500));
        running.store(false, std::sync::atomic::Ordering::Relaxed);
        let load = load.join().unwrap();
        assert_eq!(
            upgraded.expect("the upgrade"),
            "us-east-1",
            "the kept connection, answered by the stopping agent"
        );
        load
    });
    println!(
        "upgrade under load: {answered} calls answered, {} failed, slowest {slowest:?}",
        failed.len()
    );
    assert!(failed.is_empty(), "failed calls: {failed:?}");
    assert!(answered >= 5, "{answered}");
    assert!(
        s.agent.wait_previous(Duration::from_secs(5)),
        "the stopping agent exits once its connections are done, not at the end of the \
         grace period"
    );
    s.wait_all_from(to, "us-east-1");
}

/// A connection made while no agent runs is not refused: its SYN is held back by the
/// data plane until the next agent listens, which then serves it.
#[test]
fn a_connection_made_between_agents_waits_for_the_next() {
    let Some(mut s) = Scenario::start([EAST, WEST]) else {
        return;
    };
    let to = s.vip();
    s.wait_all_from(to, "us-east-1");
    assert!(
        s.agent.stop(),
        "the agent stops at once when it has no connection"
    );
    let client = &s.bed.client;
    let answer = std::thread::scope(|scope| {
        let call = scope.spawn(|| client.run(|| lb_tests::http_get(to, "/", PATIENT)));
        std::thread::sleep(Duration::from_millis(1500));
        assert!(!call.is_finished(), "the call waits while no agent runs");
        s.agent.restart().unwrap();
        call.join().unwrap()
    });
    assert_eq!(answer.expect("the call made between agents"), "us-east-1");
}

/// us-east-1's endpoint in a `/config_dump`'s `tls_origination`: the forwarder's counters.
fn east_tls(dump: &serde_json::Value) -> &serde_json::Value {
    &dump["tls_origination"]["endpoints"][format!("{}:443", backend_addr(1))]
}

/// The forwarder's counter `field` for us-east-1's endpoint, now.
fn east_count(s: &Scenario, field: &str) -> u64 {
    east_tls(&s.config_dump())[field].as_u64().unwrap_or(0)
}

/// us-east-1 presents an expired certificate: its handshakes fail, counted as
/// `certificate_expired`, and calls go to us-west-1 with no failed call.
#[test]
fn an_expired_certificate_fails_over() {
    let identities = [
        CA.1.issue_expired(&[EAST]).unwrap(),
        CA.1.issue(&[WEST]).unwrap(),
    ];
    let Some(s) = Scenario::start_with(identities, CONFIG, &[], None) else {
        return;
    };
    let to = s.vip();
    let names = names_from(&s.bed.client, to, 10).expect("no failed call");
    assert!(names.iter().all(|n| n == "us-west-1"), "{names:?}");
    let dump = s.config_dump();
    let east = east_tls(&dump);
    assert!(
        east["tls_errors"]["certificate_expired"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{dump:#}"
    );
    assert_eq!(s.servers[0].handshakes(), 0);
}

/// us-east-1 accepts TCP and never answers the ClientHello: the attempt ends at its
/// deadline (counted as a timeout, its socket closed), the call is served by us-west-1,
/// and us-east-1 is ejected, so the next calls do not wait.
#[test]
fn a_backend_stalling_mid_handshake_times_out_and_fails_over() {
    let Some(mut s) = Scenario::start([EAST, WEST]) else {
        return;
    };
    let to = s.vip();
    s.wait_all_from(to, "us-east-1");
    // us-east-1's server replaced by one that reads and never answers.
    drop(s.servers.remove(0));
    let stalling = s.bed.backends[0]
        .ns
        .run(|| std::net::TcpListener::bind(SocketAddr::from((backend_addr(1), 443))))
        .unwrap();
    let held = std::thread::spawn(move || {
        let (mut stream, _) = stalling.accept().unwrap();
        stream.set_read_timeout(Some(PATIENT)).unwrap();
        let mut sink = Vec::new();
        // Returns once lb closes its side: the stalled attempt is not left open.
        let _ = std::io::Read::read_to_end(&mut stream, &mut sink);
        !sink.is_empty()
    });
    let started = Instant::now();
    let answer = s.bed.client.run(|| lb_tests::http_get(to, "/", PATIENT));
    assert_eq!(answer.expect("the call is served"), "us-west-1");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the first attempt waited for its deadline: {:?}",
        started.elapsed()
    );
    assert!(
        held.join().unwrap(),
        "a ClientHello was sent and the socket closed"
    );
    assert!(east_count(&s, "timeouts") >= 1);
    // Ejected (consecutive local-origin failures): the next calls go straight to us-west-1.
    let started = Instant::now();
    let names = names_from(&s.bed.client, to, 5).expect("no failed call");
    assert!(names.iter().all(|n| n == "us-west-1"), "{names:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

/// A client that connects and never sends holds its connection (and the backend's) only
/// for the idle timeout (the Node's `tcp_established` timeout, 2 s here): then it is
/// closed and counted, and the other calls were served meanwhile.
#[test]
fn a_client_that_never_sends_is_closed_when_idle() {
    let config = CONFIG.replacen(
        "  locality: us-east1\n",
        "  locality: us-east1\n  dataplane: { timeouts: { tcp_established: 2s } }\n",
        1,
    );
    assert_ne!(config, CONFIG);
    let Some(s) = Scenario::start_with(
        [CA.1.issue(&[EAST]).unwrap(), CA.1.issue(&[WEST]).unwrap()],
        &config,
        &[],
        None,
    ) else {
        return;
    };
    let to = s.vip();
    s.wait_all_from(to, "us-east-1");
    let mut silent = s
        .bed
        .client
        .run(|| lb_tests::clients::connect(to, PATIENT))
        .unwrap();
    silent.set_read_timeout(Some(PATIENT)).unwrap();
    let opened = Instant::now();
    names_from(&s.bed.client, to, 5).expect("other calls are served meanwhile");
    let mut buf = [0u8; 16];
    let read = std::io::Read::read(&mut silent, &mut buf);
    let waited = opened.elapsed();
    assert!(
        matches!(read, Ok(0) | Err(_)) && waited >= Duration::from_millis(1500),
        "closed by lb after the idle timeout: {read:?} after {waited:?}"
    );
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    let dump = s.config_dump();
    assert_eq!(dump["tls_origination"]["idle_closed"], 1, "{dump:#}");
    assert_eq!(dump["tls_origination"]["active"], 0, "{dump:#}");
}

/// With `--tls-max-connections 4`, a fifth connection while four are open is reset and
/// counted; once some close, calls are served again.
#[test]
fn the_number_of_forwarded_connections_is_bounded() {
    let Some(s) = Scenario::start_with(
        [CA.1.issue(&[EAST]).unwrap(), CA.1.issue(&[WEST]).unwrap()],
        CONFIG,
        &["--tls-max-connections", "4"],
        None,
    ) else {
        return;
    };
    let to = s.vip();
    s.wait_all_from(to, "us-east-1");
    let mut open: Vec<lb_tests::KeepAliveClient> = (0..4)
        .map(|_| {
            let mut c = s
                .bed
                .client
                .run(|| lb_tests::KeepAliveClient::connect(to, DEFAULT_TIMEOUT))
                .unwrap();
            assert_eq!(c.get("/").unwrap(), "us-east-1");
            c
        })
        .collect();
    let refused = names_from(&s.bed.client, to, 1);
    assert!(
        refused.is_err(),
        "a fifth connection is not served: {refused:?}"
    );
    let dump = s.config_dump();
    assert_eq!(dump["tls_origination"]["over_limit"], 1, "{dump:#}");
    assert_eq!(dump["tls_origination"]["active"], 4, "{dump:#}");
    assert!(
        s.admin_get("/metrics")
            .contains("lb_tls_connections_closed_total{reason=\"over_limit\"} 1"),
        "counted in /metrics"
    );
    // Two slots free: a call's connection may still be finishing as the next one comes.
    open.truncate(2);
    s.wait_all_from(to, "us-east-1");
    assert_eq!(
        open[0].get("/").unwrap(),
        "us-east-1",
        "the open ones go on"
    );
}

/// The blog's configuration with `trafficPolicy.tls` replaced by `tls` (YAML flow form).
fn with_tls(tls: &str) -> String {
    let config = CONFIG.replacen(
        "    tls:\n      mode: SIMPLE\n",
        &format!("    tls: {tls}\n"),
        1,
    );
    assert_ne!(config, CONFIG);
    config
}

/// `sni`: sent, and checked on every endpoint's certificate instead of its own DNS name
/// (the backends' certificates are for `db.internal` only).
#[test]
fn the_rules_sni_is_checked_instead_of_the_endpoints_name() {
    let Some(s) = Scenario::start_with(
        [
            CA.1.issue(&["db.internal"]).unwrap(),
            CA.1.issue(&["db.internal"]).unwrap(),
        ],
        &with_tls("{ mode: SIMPLE, sni: db.internal }"),
        &[],
        None,
    ) else {
        return;
    };
    s.wait_all_from(s.vip(), "us-east-1");
    assert!(s.servers[0].handshakes() >= 10);
}

/// `subjectAltNames`: a certificate must carry one of them; us-east-1's, valid for its own
/// name only, is refused, and calls go to us-west-1, whose certificate carries it.
#[test]
fn subject_alt_names_are_required_of_the_certificate() {
    let Some(s) = Scenario::start_with(
        [
            CA.1.issue(&[EAST]).unwrap(),
            CA.1.issue(&[WEST, "approved.example"]).unwrap(),
        ],
        &with_tls("{ mode: SIMPLE, subjectAltNames: [approved.example] }"),
        &[],
        None,
    ) else {
        return;
    };
    let names = names_from(&s.bed.client, s.vip(), 10).expect("no failed call");
    assert!(names.iter().all(|n| n == "us-west-1"), "{names:?}");
    let dump = s.config_dump();
    let east = east_tls(&dump);
    assert!(
        east["tls_errors"]["certificate_wrong_name"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "{dump:#}"
    );
}

/// `insecureSkipVerify: true`: certificates from a CA nobody trusts, for other names,
/// are accepted.
#[test]
fn insecure_skip_verify_accepts_any_certificate() {
    let dir = TempDir::new("lbca-untrusted").unwrap();
    let untrusted = TestCa::new(&dir.0).unwrap();
    let Some(s) = Scenario::start_with(
        [
            untrusted.issue(&["anything.example"]).unwrap(),
            untrusted.issue(&["anything.example"]).unwrap(),
        ],
        &with_tls("{ mode: SIMPLE, insecureSkipVerify: true }"),
        &[],
        None,
    ) else {
        return;
    };
    s.wait_all_from(s.vip(), "us-east-1");
}

/// `mode: MUTUAL`: the backends require a client certificate from the test's CA; lb
/// presents the one in `clientCertificate` / `privateKey`, and calls are served.
#[test]
fn mutual_tls_presents_the_client_certificate() {
    let dir = TempDir::new("lbclient").unwrap();
    let (cert, key) =
        CA.1.issue(&["client.lb.example"])
            .unwrap()
            .write_pem(&dir.0, "client")
            .unwrap();
    let Some(s) = Scenario::start_with(
        [CA.1.issue(&[EAST]).unwrap(), CA.1.issue(&[WEST]).unwrap()],
        &with_tls(&format!(
            "{{ mode: MUTUAL, clientCertificate: {}, privateKey: {} }}",
            cert.display(),
            key.display()
        )),
        &[],
        Some(&CA.1),
    ) else {
        return;
    };
    s.wait_all_from(s.vip(), "us-east-1");
    // Counted by the server only once it verified lb's certificate.
    assert!(s.servers[0].handshakes() >= 10);
}
