//! External services known by DNS name, as Istio's blog "Configuring failover for
//! external services" writes them: a ServiceEntry with no addresses and endpoints by name.
//! The names are served by the test's own DNS server (in the node's namespace, given to
//! the agent with `--resolver`), and point at backend namespaces.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use lb::dataplane::AttachMode;
use lb_tests::{
    agent_process::{write_atomically, AgentProcess, TempDir},
    dns_server::TestDnsServer,
    names_from, require_root,
    topology::{backend_addr, TestBed},
    HttpNameServer, KeepAliveClient, DEFAULT_TIMEOUT,
};

const ADMIN: &str = "127.0.0.1:15000";
const EAST: &str = "dynamodb.us-east-1.amazonaws.com";
const WEST: &str = "dynamodb.us-west-1.amazonaws.com";
/// How long a change of answer may take to reach new connections here: the TTL (1 s)
/// plus a lookup; the bound only catches a broken refresh.
const FOLLOW: Duration = Duration::from_secs(10);

/// The blog's resources as written (its DestinationRule's outlier detection; locality
/// load balancing is on by default with it), and this node in us-east1: the example users
/// start from.
const CONFIG: &str = include_str!("../../examples/external-dns.yaml");

struct Scenario {
    bed: TestBed,
    dns: TestDnsServer,
    /// Each backend's server on port 80, named after the host it stands for.
    servers: Vec<HttpNameServer>,
    config: std::path::PathBuf,
    _dir: TempDir,
    agent: AgentProcess,
}

impl Scenario {
    fn start() -> Option<Self> {
        Self::start_with(&[])
    }

    /// Like `start`, the agent with `extra` arguments too.
    fn start_with(extra: &[&str]) -> Option<Self> {
        if !require_root() {
            return None;
        }
        let names = ["us-east-1", "us-west-1", "us-east-1-moved"].map(String::from);
        let bed = TestBed::with_backends(AttachMode::Tc, &names).unwrap();
        let servers = bed
            .backends
            .iter()
            .zip(1u8..)
            .zip(&names)
            .map(|((b, i), name)| {
                HttpNameServer::start(&b.ns, SocketAddr::from((backend_addr(i), 80)), name).unwrap()
            })
            .collect();
        let dns = TestDnsServer::start(&bed.node, "127.0.0.53:0".parse().unwrap()).unwrap();
        dns.set(EAST, &[backend_addr(1)], 1);
        dns.set(WEST, &[backend_addr(2)], 1);
        let dir = TempDir::new("lbext").unwrap();
        let config = dir.0.join("lb.yaml");
        write_atomically(&config, CONFIG).unwrap();
        let resolver = dns.addr().to_string();
        let mut args = vec![
            "--admin",
            ADMIN,
            "--resolver",
            &resolver,
            "--dns-min-ttl",
            "1",
        ];
        args.extend_from_slice(extra);
        let agent = AgentProcess::start_with(&bed, &config, &args).unwrap();
        Some(Self {
            bed,
            dns,
            servers,
            config,
            _dir: dir,
            agent,
        })
    }

    fn wait_ready(&self) {
        let admin: SocketAddr = ADMIN.parse().unwrap();
        lb_tests::agent_process::wait_until(&self.bed.node, Duration::from_secs(20), || {
            lb_tests::http_get(admin, "/ready", Duration::from_millis(500))
        })
        .expect("the agent gets ready");
    }

    fn admin_get(&self, path: &str) -> String {
        let admin: SocketAddr = ADMIN.parse().unwrap();
        self.bed
            .node
            .run(|| lb_tests::http_get(admin, path, DEFAULT_TIMEOUT))
            .unwrap_or_else(|e| panic!("GET {path}: {e:#}"))
    }

    /// `lb endpoints` (the table), run in the node as an operator would.
    fn lb_endpoints(&self) -> String {
        self.agent.lb(&self.bed.node, ADMIN, &["endpoints"])
    }

    fn config_dump(&self) -> serde_json::Value {
        serde_json::from_str(&self.admin_get("/config_dump")).unwrap()
    }

    /// mydb.com's VIP and port, as `/config_dump` shows them (allocated by lb).
    fn vip(&self) -> SocketAddr {
        let dump = self.config_dump();
        let f = &dump["services"][0]["frontend"];
        let vip: Ipv4Addr = f["vip"].as_str().unwrap().parse().unwrap();
        SocketAddr::from((vip, f["port"].as_u64().unwrap() as u16))
    }

    /// Waits until every one of 10 new connections to `to` is answered by `name`.
    fn wait_all_from(&self, to: SocketAddr, name: &str) -> Duration {
        let started = Instant::now();
        loop {
            let got = names_from(&self.bed.client, to, 10);
            match &got {
                Ok(names) if names.iter().all(|n| n == name) => return started.elapsed(),
                _ if started.elapsed() > FOLLOW => {
                    panic!(
                        "after {FOLLOW:?}, calls to {to} are not all answered by {name}: {got:?}"
                    )
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

/// The blog's YAML as written: mydb.com gets a VIP in Istio's auto-allocation range, its
/// endpoint names resolve, and calls go to the endpoint in this node's region; when the
/// us-east name moves to another address, new connections follow and an established one
/// stays; when the resolver stops answering, the last answer keeps the traffic flowing
/// (marked stale in the views).
#[test]
fn names_resolve_and_traffic_follows_their_answers() {
    let Some(s) = Scenario::start() else {
        return;
    };
    s.wait_ready();
    let to = s.vip();
    assert_eq!(to.ip().to_string()[..8], *"240.240.", "{to}");
    assert_eq!(to.port(), 80);
    s.wait_all_from(to, "us-east-1");

    // Envoy's hostname, per endpoint.
    let clusters = s.admin_get("/clusters");
    let host = format!(
        "outbound|80||mydb.com::{}:80::hostname::{EAST}",
        backend_addr(1)
    );
    assert!(clusters.contains(&host), "{clusters}");
    let host = format!(
        "outbound|80||mydb.com::{}:80::hostname::{WEST}",
        backend_addr(2)
    );
    assert!(clusters.contains(&host), "{clusters}");

    // An established connection, then the us-east name moves.
    let mut kept = s
        .bed
        .client
        .run(|| KeepAliveClient::connect(to, DEFAULT_TIMEOUT))
        .unwrap();
    assert_eq!(kept.get("/").unwrap(), "us-east-1");
    s.dns.set(EAST, &[backend_addr(3)], 1);
    println!(
        "moved answer → followed in {:?}",
        s.wait_all_from(to, "us-east-1-moved")
    );
    assert_eq!(
        kept.get("/").unwrap(),
        "us-east-1",
        "an established connection keeps its backend"
    );

    // The resolver goes silent: the last answer stays, marked stale.
    s.dns.set_silent(true);
    let started = Instant::now();
    loop {
        let dump = s.config_dump();
        // Both names are looked up at the silent server (TTL 1 s).
        if dump["dns"][EAST]["stale"] == true && dump["dns"][WEST]["stale"] == true {
            assert_eq!(
                dump["dns"][EAST]["addresses"][0],
                backend_addr(3).to_string()
            );
            break;
        }
        assert!(
            started.elapsed() < FOLLOW,
            "no lookup failed: {}",
            dump["dns"]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    s.wait_all_from(to, "us-east-1-moved");
    let clusters = s.admin_get("/clusters");
    assert!(clusters.contains("::dns_stale::true"), "{clusters}");
    let metrics = s.admin_get("/metrics");
    for series in [
        "lb_dns_names{state=\"stale\"} 2", // the resolver is silent for both names
        "lb_dns_names{state=\"resolved\"} 0",
        "lb_dns_answer_changes_total 3", // two first answers, one move
    ] {
        assert!(metrics.contains(series), "{series} in:\n{metrics}");
    }
    assert!(
        !metrics.contains("lb_dns_lookups_total{result=\"failure\"} 0"),
        "{metrics}"
    );
    s.dns.set_silent(false);
}

/// The client namespace's resolver configuration (`ip netns exec` binds
/// `/etc/netns/NAME/resolv.conf` over `/etc/resolv.conf`), removed when dropped.
struct ResolvConf(std::path::PathBuf);

impl ResolvConf {
    fn point(ns: &lb_tests::Netns, nameserver: Ipv4Addr) -> Self {
        let dir = std::path::Path::new("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {nameserver}\noptions timeout:2 attempts:2\n"),
        )
        .unwrap();
        Self(dir)
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `ip netns exec NS ARGS...`: its standard output, or the failure.
fn exec_in(ns: &lb_tests::Netns, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `--dns-listen` on the node: a client whose resolver is the node finds mydb.com's VIP
/// (`getent hosts`) and calls `http://mydb.com/` with curl; other names still resolve
/// through it (forwarded upstream); a malformed query gets FORMERR and leaves the agent
/// answering; TCP answers too, several queries on one connection.
#[test]
fn the_node_answers_for_the_hosts_and_forwards_the_rest() {
    let Some(s) = Scenario::start_with(&["--dns-listen", "10.200.0.1:53"]) else {
        return;
    };
    s.wait_ready();
    let vip = s.vip();
    s.dns
        .set("elsewhere.example", &[Ipv4Addr::new(192, 0, 2, 7)], 60);
    let _conf = ResolvConf::point(&s.bed.client, Ipv4Addr::new(10, 200, 0, 1));

    let hosts = exec_in(&s.bed.client, &["getent", "hosts", "mydb.com"]).unwrap();
    assert_eq!(
        hosts.split_whitespace().next(),
        Some(vip.ip().to_string().as_str()),
        "{hosts}"
    );
    let body = exec_in(
        &s.bed.client,
        &["curl", "-sS", "--max-time", "5", "http://mydb.com/"],
    )
    .unwrap();
    assert_eq!(body, "us-east-1");
    let other = exec_in(&s.bed.client, &["getent", "hosts", "elsewhere.example"]).unwrap();
    assert!(other.starts_with("192.0.2.7"), "{other}");
    assert!(
        exec_in(&s.bed.client, &["getent", "hosts", "nowhere.example"]).is_err(),
        "an unknown name does not resolve"
    );

    // A malformed query: an ID and garbage.
    let reply = s
        .bed
        .client
        .run(|| {
            let socket = std::net::UdpSocket::bind("10.200.0.2:0")?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            socket.send_to(&[0x12, 0x34, 0xff, 0xff, 0x00, 0x07, 0x01], "10.200.0.1:53")?;
            let mut buf = [0u8; 512];
            let (len, _) = socket.recv_from(&mut buf)?;
            Ok::<_, std::io::Error>(buf[..len].to_vec())
        })
        .unwrap();
    assert_eq!(
        &reply[..2],
        &[0x12, 0x34],
        "the reply carries the query's ID"
    );
    assert_eq!(reply[3] & 0x0f, 1, "FORMERR");
    let hosts = exec_in(&s.bed.client, &["getent", "hosts", "mydb.com"]).unwrap();
    assert!(hosts.starts_with(&vip.ip().to_string()), "{hosts}");

    // Over TCP (a length before each message), two queries on one connection.
    let answers = s
        .bed
        .client
        .run(|| {
            tcp_queries(
                "10.200.0.1:53".parse().unwrap(),
                &["mydb.com.", "elsewhere.example."],
            )
        })
        .unwrap();
    assert_eq!(
        answers,
        [vec![vip.ip()], vec![Ipv4Addr::new(192, 0, 2, 7).into()]]
    );
    let counts = &s.config_dump()["dns_responder"];
    assert!(counts["own"].as_u64().unwrap() >= 3, "{counts}");
    assert!(counts["forwarded"].as_u64().unwrap() >= 2, "{counts}");
    assert_eq!(counts["malformed"], 1, "{counts}");
    let metrics = s.admin_get("/metrics");
    assert!(
        metrics.contains("lb_dns_responder_queries_total{answer=\"malformed\"} 1"),
        "{metrics}"
    );
}

/// The blog's failure: the us-east endpoint's port made wrong (81, where nothing listens).
/// Calls fail over to us-west with no failed call (the blog shows one), and the us-east
/// endpoint shows as failed by outlier detection, as `istioctl pc endpoints` shows it.
#[test]
fn a_wrong_port_fails_over_with_no_failed_call() {
    let Some(s) = Scenario::start() else {
        return;
    };
    s.wait_ready();
    let to = s.vip();
    s.wait_all_from(to, "us-east-1");

    let wrong = CONFIG.replacen(
        "    locality: us-east1\n    ports:\n      http: 80",
        "    locality: us-east1\n    ports:\n      http: 81 # INVALID - This is purposefully wrong to trigger failover",
        1,
    );
    assert_ne!(wrong, CONFIG);
    write_atomically(&s.config, &wrong).unwrap();
    let east_81 = format!("{}:81", backend_addr(1));
    let started = Instant::now();
    while !s.config_dump()["services"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["address"] == east_81.as_str())
    {
        assert!(
            started.elapsed() < FOLLOW,
            "the changed port is not applied"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every call answered, by us-west.
    let names = names_from(&s.bed.client, to, 20).expect("no failed call");
    assert!(names.iter().all(|n| n == "us-west-1"), "{names:?}");
    let clusters = s.admin_get("/clusters");
    let flags = format!("outbound|80||mydb.com::{east_81}::health_flags::/failed_outlier_check");
    assert!(clusters.contains(&flags), "{clusters}");
    // The operator's view: the us-east endpoint failed its outlier check.
    let table = s.lb_endpoints();
    let east = table
        .lines()
        .find(|l| l.starts_with(&east_81))
        .unwrap_or_else(|| panic!("no {east_81} in:\n{table}"));
    let columns: Vec<&str> = east.split_whitespace().collect();
    assert_eq!(columns[1..3], ["UNHEALTHY", "FAILED"], "{table}");
}

/// An HTTP health check (lb's HealthCheck document) takes the us-east endpoint, whose
/// health path answers 500 while it still serves, out: calls go to us-west, `/clusters`
/// flags it `/failed_active_hc`; when its health path answers 200 again, it is back.
#[test]
fn a_failing_health_check_takes_an_endpoint_out_and_back() {
    let Some(s) = Scenario::start() else {
        return;
    };
    let check = "apiVersion: lb/v1alpha1
kind: HealthCheck
metadata: { name: mydb }
spec:
  host: mydb.com
  http: { path: /healthz, expectedStatuses: [\"200-299\"] }
  interval: 300ms
  timeout: 200ms
  unhealthyThreshold: 2
  healthyThreshold: 1
";
    write_atomically(&s.config, &format!("{CONFIG}---\n{check}")).unwrap();
    s.wait_ready();
    let started = Instant::now();
    while s.config_dump()["health_checks"]
        .as_array()
        .is_none_or(Vec::is_empty)
    {
        assert!(started.elapsed() < FOLLOW, "the HealthCheck is not applied");
        std::thread::sleep(Duration::from_millis(100));
    }
    let to = s.vip();
    s.wait_all_from(to, "us-east-1");

    s.servers[0].set_health_status(500);
    println!(
        "health path 500 → out in {:?}",
        s.wait_all_from(to, "us-west-1")
    );
    let east = format!(
        "outbound|80||mydb.com::{}:80::health_flags::/failed_active_hc",
        backend_addr(1)
    );
    let clusters = s.admin_get("/clusters");
    assert!(clusters.contains(&east), "{clusters}");
    let metrics = s.admin_get("/metrics");
    assert!(
        metrics.contains("lb_health_checked_endpoints{state=\"unhealthy\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lb_health_checks_total{result=\"failed\"}"),
        "{metrics}"
    );
    // `lb endpoints`: the check's verdict in its own column, the outlier check untouched.
    let table = s.lb_endpoints();
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap()
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        header[..4],
        ["ENDPOINT", "STATUS", "OUTLIER CHECK", "HEALTH CHECK"],
        "{table}"
    );
    let row = |table: &str, endpoint: &str| -> Vec<String> {
        let line = table
            .lines()
            .find(|l| l.starts_with(endpoint))
            .unwrap_or_else(|| panic!("no {endpoint} in:\n{table}"));
        line.split_whitespace().take(4).map(String::from).collect()
    };
    let east_endpoint = format!("{}:80", backend_addr(1));
    let west_endpoint = format!("{}:80", backend_addr(2));
    assert_eq!(
        row(&table, &east_endpoint)[2..],
        ["OK", "FAILED"],
        "{table}"
    );
    assert_eq!(row(&table, &west_endpoint)[2..], ["OK", "OK"], "{table}");

    s.servers[0].set_health_status(200);
    println!(
        "health path 200 → back in {:?}",
        s.wait_all_from(to, "us-east-1")
    );
    let table = s.lb_endpoints();
    assert_eq!(row(&table, &east_endpoint)[2..], ["OK", "OK"], "{table}");
}

/// `DNS_ROUND_ROBIN`: one of a name's addresses at a time, the next when the one in use
/// fails. The us-east name has two addresses; the first one's server goes away, calls
/// go on with no failed call, and the name moves on to its other address.
#[test]
fn dns_round_robin_moves_on_when_the_address_in_use_fails() {
    let Some(mut s) = Scenario::start() else {
        return;
    };
    s.dns.set(EAST, &[backend_addr(1), backend_addr(3)], 1);
    let round_robin = CONFIG.replacen("resolution: DNS", "resolution: DNS_ROUND_ROBIN", 1);
    write_atomically(&s.config, &round_robin).unwrap();
    s.wait_ready();
    let to = s.vip();
    // One address of the two: the lower one.
    let started = Instant::now();
    loop {
        let dump = s.config_dump();
        let east: Vec<String> = dump["services"][0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["hostname"] == EAST)
            .map(|e| e["address"].as_str().unwrap().to_string())
            .collect();
        if east == [format!("{}:80", backend_addr(1))] {
            break;
        }
        assert!(started.elapsed() < FOLLOW, "us-east endpoints: {east:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    s.wait_all_from(to, "us-east-1");

    s.servers[0].stop();
    let names = names_from(&s.bed.client, to, 10).expect("no failed call");
    println!("while the first address fails: {names:?}");
    println!(
        "moved on to the name's next address in {:?}",
        s.wait_all_from(to, "us-east-1-moved")
    );
}

/// Sends an A query for each of `names` over one TCP connection to `server` and returns
/// each answer's addresses.
fn tcp_queries(server: SocketAddr, names: &[&str]) -> std::io::Result<Vec<Vec<std::net::IpAddr>>> {
    use std::io::{Read, Write};

    use hickory_proto::{
        op::{Message, Query},
        rr::{Name, RData, RecordType},
    };
    let mut stream = std::net::TcpStream::connect_timeout(&server, DEFAULT_TIMEOUT)?;
    stream.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
    let mut out = Vec::new();
    for (id, name) in (1u16..).zip(names) {
        let mut query = Message::new();
        query
            .set_id(id)
            .set_recursion_desired(true)
            .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        let bytes = query.to_vec().unwrap();
        stream.write_all(&(bytes.len() as u16).to_be_bytes())?;
        stream.write_all(&bytes)?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len)?;
        let mut answer = vec![0u8; u16::from_be_bytes(len) as usize];
        stream.read_exact(&mut answer)?;
        let answer = Message::from_vec(&answer).unwrap();
        assert_eq!(answer.id(), id);
        out.push(
            answer
                .answers()
                .iter()
                .filter_map(|r| match r.data() {
                    RData::A(a) => Some(a.0.into()),
                    _ => None,
                })
                .collect(),
        );
    }
    Ok(out)
}

/// One A query over UDP: the answer's addresses, or an error after `timeout`.
fn udp_query(server: SocketAddr, name: &str, timeout: Duration) -> std::io::Result<Vec<Ipv4Addr>> {
    use hickory_proto::{
        op::{Message, Query},
        rr::{Name, RData, RecordType},
    };
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(timeout))?;
    let mut query = Message::new();
    query
        .set_id(0x5151)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    socket.send_to(&query.to_vec().unwrap(), server)?;
    let mut buf = [0u8; 1500];
    loop {
        let (len, _) = socket.recv_from(&mut buf)?;
        let Ok(answer) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        if answer.id() == 0x5151 {
            return Ok(answer
                .answers()
                .iter()
                .filter_map(|r| match r.data() {
                    RData::A(a) => Some(a.0),
                    _ => None,
                })
                .collect());
        }
    }
}

/// A flood of queries for names the upstream never answers (it has gone silent): the
/// responder holds at most its bound of forwarded queries and drops the rest, while lb's
/// own names are still answered, calls through the VIP go on, and the agent stays ready.
/// When the upstream answers again, forwarded names resolve again.
#[test]
fn a_query_flood_is_bounded_and_the_rest_keeps_working() {
    let Some(s) = Scenario::start_with(&["--dns-listen", "10.200.0.1:53"]) else {
        return;
    };
    s.wait_ready();
    let vip = s.vip();
    let responder: SocketAddr = "10.200.0.1:53".parse().unwrap();
    s.dns
        .set("elsewhere.example", &[Ipv4Addr::new(192, 0, 2, 7)], 1);
    s.dns.set_silent(true);

    let flooding = std::sync::atomic::AtomicBool::new(true);
    let sent = std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            s.bed.client.run(|| {
                use hickory_proto::{
                    op::{Message, Query},
                    rr::{Name, RecordType},
                };
                let socket = std::net::UdpSocket::bind("10.200.0.2:0").unwrap();
                socket.set_nonblocking(true).unwrap();
                let mut sent = 0u64;
                while flooding.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut query = Message::new();
                    query
                        .set_id(sent as u16)
                        .set_recursion_desired(true)
                        .add_query(Query::query(
                            Name::from_ascii(format!("flood{sent}.example.")).unwrap(),
                            RecordType::A,
                        ));
                    if socket.send_to(&query.to_vec().unwrap(), responder).is_ok() {
                        sent += 1;
                    }
                    // Replies are not read; the socket's buffer drops them.
                    if sent.is_multiple_of(64) {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                sent
            })
        });
        std::thread::sleep(Duration::from_millis(500));
        // lb's own name, answered (a resolver retries a lost UDP query; so does this).
        let own = s.bed.client.run(|| {
            (0..3).find_map(|_| udp_query(responder, "mydb.com.", Duration::from_secs(1)).ok())
        });
        assert_eq!(
            own,
            Some(vec![*match &vip {
                SocketAddr::V4(v4) => v4.ip(),
                SocketAddr::V6(_) => unreachable!(),
            }])
        );
        // Calls through the VIP, and the agent's admin endpoint.
        let names = names_from(&s.bed.client, vip, 10).expect("calls during the flood");
        assert!(names.iter().all(|n| n == "us-east-1"), "{names:?}");
        s.wait_ready();
        flooding.store(false, std::sync::atomic::Ordering::Relaxed);
        flood.join().unwrap()
    });
    let counts = s.config_dump()["dns_responder"].clone();
    println!("flood: {sent} queries sent; the responder's counts: {counts}");
    assert!(sent > 2_000, "the flood sent {sent} queries");
    assert!(
        counts["dropped"].as_u64().unwrap() > 0,
        "no query dropped beyond the bound: {counts}"
    );

    // The upstream back: forwarded names resolve again once the flood's lookups end.
    s.dns.set_silent(false);
    let started = Instant::now();
    loop {
        let answer = s
            .bed
            .client
            .run(|| udp_query(responder, "elsewhere.example.", Duration::from_secs(1)));
        if answer
            .as_deref()
            .is_ok_and(|a| a == [Ipv4Addr::new(192, 0, 2, 7)])
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "forwarding does not recover: {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
