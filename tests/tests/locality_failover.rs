//! Istio's locality failover task (../shared/seeds/), end to end with the `lb agent`
//! binary: a ServiceEntry for helloworld with one endpoint per locality, the seed's own
//! DestinationRule, and the node (where the client runs) at region1/zone1.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lb::dataplane::AttachMode;
use lb_tests::{
    agent_process::{wait_until, write_atomically, AgentProcess, TempDir},
    clients::http_post_with,
    http_get, names_from, require_root,
    seed::{self, service_entry, DESTINATION_RULE, HELLO_PORT, LOCALITIES, NODE},
    topology::{backend_addr, TestBed, BACKEND_HTTP_PORT, CLIENT_ADDR, VIP},
    DEFAULT_TIMEOUT,
};

const ADMIN: &str = "127.0.0.1:15000";

fn hello(region: &str, zone: &str) -> String {
    format!("Hello version: {region}.{zone}, instance: helloworld-{region}-{zone}")
}

fn vip() -> SocketAddr {
    (VIP, HELLO_PORT).into()
}

struct Scenario {
    bed: TestBed,
    _dir: TempDir,
    agent: AgentProcess,
}

impl Scenario {
    fn start(backends: &[String], config: &str) -> Self {
        Self::start_in(AttachMode::Tc, backends, config)
    }

    /// Like `start`, with lb attached in `mode` on the client side and on every
    /// backend-facing interface (where refusals arrive and are re-sent as SYNs).
    fn start_in(mode: AttachMode, backends: &[String], config: &str) -> Self {
        let mut bed = TestBed::with_backends(mode, backends).unwrap();
        for i in &mut bed.interfaces {
            if i.name.starts_with("nb") {
                i.mode = mode;
            }
        }
        let dir = TempDir::new("lbseed").unwrap();
        let path = dir.0.join("helloworld.yaml");
        write_atomically(&path, config).unwrap();
        let agent = AgentProcess::start_with(&bed, &path, &["--admin", ADMIN]).unwrap();
        wait_until(&bed.client, Duration::from_secs(20), || {
            http_get(vip(), "/", Duration::from_millis(500))
        })
        .expect("the agent programs the VIP");
        Self {
            bed,
            _dir: dir,
            agent,
        }
    }

    fn assert_all_named(&self, n: usize, name: &str) {
        let t = self.tally(n);
        assert_eq!(t.len(), 1, "expected only {name}: {t:?}");
        assert!(t.contains_key(name), "{t:?}");
    }

    /// The admin view's entry (JSON object) for `endpoint` (`IP:PORT`).
    fn endpoint_entry(&self, endpoint: &str) -> String {
        self.bed
            .node
            .run(|| endpoint_entry(endpoint))
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// lb's admin view shows `endpoint` as ejected.
    fn assert_ejected(&self, endpoint: &str) {
        let entry = self.endpoint_entry(endpoint);
        assert!(
            entry.contains("\"ejected\":true"),
            "{endpoint} not shown as ejected: {entry}"
        );
    }

    /// Waits until the agent has counted `n` errors for `endpoint` (its `rq_error` in
    /// Envoy's `/clusters` text): the data plane's signals reached outlier detection.
    fn wait_for_rq_error(&self, endpoint: &str, n: u64) {
        let admin: SocketAddr = ADMIN.parse().unwrap();
        let fact = format!("::{endpoint}::rq_error::");
        let counted = || -> anyhow::Result<u64> {
            let text = http_get(admin, "/clusters", DEFAULT_TIMEOUT)?;
            let line = text
                .lines()
                .find(|l| l.contains(&fact))
                .with_context(|| format!("no {fact} in /clusters:\n{text}"))?;
            let value = line.rsplit("::").next().unwrap_or_default();
            value
                .parse()
                .with_context(|| format!("rq_error of {endpoint}: {line}"))
        };
        wait_until(&self.bed.node, Duration::from_secs(10), || {
            match counted()? {
                c if c >= n => Ok(()),
                c => anyhow::bail!("the agent counted {c} errors for {endpoint}, waiting for {n}"),
            }
        })
        .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// A mutating admin call, with the token the agent wrote.
    fn admin(&self, path: &str) -> String {
        let admin: SocketAddr = ADMIN.parse().unwrap();
        let token = std::fs::read_to_string(&self.agent.admin_token_file)
            .unwrap_or_else(|e| panic!("reading the admin token: {e}"));
        let headers = [("x-lb-token", token.trim())];
        self.bed
            .node
            .run(|| http_post_with(admin, path, &headers, DEFAULT_TIMEOUT))
            .unwrap_or_else(|e| panic!("admin {path}: {e:#}"))
    }

    fn tally(&self, n: usize) -> BTreeMap<String, usize> {
        let mut t = BTreeMap::new();
        for name in names_from(&self.bed.client, vip(), n).unwrap() {
            *t.entry(name).or_default() += 1;
        }
        t
    }

    /// All of `n` new connections land in one locality.
    fn assert_all_in(&self, n: usize, region: &str, zone: &str) {
        let t = self.tally(n);
        assert_eq!(t.len(), 1, "expected only {region}.{zone}: {t:?}");
        assert_eq!(t.keys().next().unwrap(), &hello(region, zone), "{t:?}");
    }
}

/// From inside the node: the entry (JSON object) for `endpoint` (`IP:PORT`) in the admin
/// endpoint's `GET /services`, as the first service that has it shows it.
fn endpoint_entry(endpoint: &str) -> anyhow::Result<String> {
    let admin: SocketAddr = ADMIN.parse().unwrap();
    let view = http_get(admin, "/services", DEFAULT_TIMEOUT)?;
    let address = format!("\"address\":\"{endpoint}\"");
    let at = view
        .find(&address)
        .with_context(|| format!("{endpoint} not in {view}"))?;
    // Endpoint entries hold no nested objects: the entry ends at the next `}`.
    let end = view[at..].find('}').map_or(view.len(), |e| at + e);
    Ok(view[at..end].to_owned())
}

/// `GET path` on a new connection (`Connection: close`), like `http_get`, but any status is
/// an answer: `(status, body)`. The server closes the connection after its answer, which
/// ends the body.
fn get_with_status(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    let what = || format!("GET http://{addr}{path} (new connection)");
    let mut stream = TcpStream::connect_timeout(&addr, timeout).with_context(what)?;
    stream.set_read_timeout(Some(timeout)).with_context(what)?;
    stream.set_write_timeout(Some(timeout)).with_context(what)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .with_context(what)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).with_context(what)?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("{}: no complete response in {answer:?}", what()))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{}: bad status line in {head:?}", what()))?;
    Ok((status, body.to_owned()))
}

fn seed_backends() -> Vec<String> {
    LOCALITIES.iter().map(|(r, z)| hello(r, z)).collect()
}

fn endpoint(i: u8) -> String {
    format!("{}:{BACKEND_HTTP_PORT}", backend_addr(i))
}

/// Traffic stays in region1.zone1; ejecting the endpoints one after another moves it to
/// region1.zone2, then region2.zone3 (the failover region), then region3.zone4, and back
/// to region1.zone1 when that endpoint returns.
#[test]
fn seed_scenario_fails_over_in_priority_order() {
    if !require_root() {
        return;
    }
    let config = format!(
        "{NODE}---\n{}---\n{DESTINATION_RULE}",
        service_entry(&seed::endpoints())
    );
    let s = Scenario::start(&seed_backends(), &config);
    s.assert_all_in(30, "region1", "zone1");
    for (i, next) in [(1, LOCALITIES[1]), (2, LOCALITIES[2]), (3, LOCALITIES[3])] {
        s.admin(&format!("/endpoints/{}/eject", endpoint(i)));
        s.assert_all_in(30, next.0, next.1);
    }
    s.admin(&format!("/endpoints/{}/uneject", endpoint(1)));
    s.assert_all_in(30, "region1", "zone1");
}

/// Outlier ejections expire: with the seed's rule but a short `baseEjectionTime`, one
/// 503 ejects region1.zone1 (consecutive5xxErrors: 1) and traffic fails over; once the
/// ejection has run out, a sweep (every `interval`) puts it back and traffic returns.
#[test]
fn outlier_ejection_expires_and_traffic_returns() {
    if !require_root() {
        return;
    }
    let rule = DESTINATION_RULE.replace("baseEjectionTime: 10m", "baseEjectionTime: 4s");
    let config = format!(
        "{NODE}---\n{}---\n{rule}",
        service_entry(&seed::endpoints())
    );
    let s = Scenario::start(&seed_backends(), &config);
    s.assert_all_in(30, "region1", "zone1");
    let ejected_at = Instant::now();
    s.admin(&format!("/endpoints/{}/events/503", endpoint(1)));
    s.assert_all_in(30, "region1", "zone2");
    wait_until(&s.bed.client, Duration::from_secs(20), || {
        let names = names_from(&s.bed.client, vip(), 10)?;
        anyhow::ensure!(
            names.iter().all(|n| *n == hello("region1", "zone1")),
            "not back yet: {names:?}"
        );
        Ok(())
    })
    .expect("traffic returns to region1.zone1");
    let back_after = ejected_at.elapsed();
    assert!(
        back_after >= Duration::from_secs(4),
        "returned after {back_after:?}, before the ejection ran out"
    );
}

/// A partly healthy priority: region1.zone1 has two endpoints, one ejected, so its health
/// is min(100, 1.4 × 1/2) = 70% and Envoy splits new connections 70/30 between it and
/// region1.zone2. Over 400 connections the measured split must be 70/30 within ±8 points
/// (about 3.5 σ of a binomial at n = 400, p = 0.7).
#[test]
fn partly_healthy_priority_splits_like_envoy() {
    if !require_root() {
        return;
    }
    let backends = vec![
        "zone1-a".to_string(),
        "zone1-b".to_string(),
        "zone2".to_string(),
    ];
    let endpoints = vec![
        (1, "region1/zone1".to_string()),
        (2, "region1/zone1".to_string()),
        (3, "region1/zone2".to_string()),
    ];
    let config = format!(
        "{NODE}---\n{}---\n{DESTINATION_RULE}",
        service_entry(&endpoints)
    );
    let s = Scenario::start(&backends, &config);
    s.admin(&format!("/endpoints/{}/eject", endpoint(2)));
    let n = 400;
    let t = s.tally(n);
    assert_eq!(
        t.get("zone1-b"),
        None,
        "the ejected endpoint got traffic: {t:?}"
    );
    let p0 = *t.get("zone1-a").unwrap_or(&0) as f64 / n as f64;
    let p1 = *t.get("zone2").unwrap_or(&0) as f64 / n as f64;
    println!("partly healthy P0: {t:?} -> {p0:.3} / {p1:.3}");
    assert!(
        (p0 - 0.70).abs() <= 0.08,
        "P0 share {p0:.3}, expected 0.70: {t:?}"
    );
    assert!(
        (p1 - 0.30).abs() <= 0.08,
        "P1 share {p1:.3}, expected 0.30: {t:?}"
    );
}

/// Istio's locality failover task exactly: the seed's DestinationRule verbatim, the four
/// HelloWorld localities, the client calling `helloworld:5000/hello` on a new connection
/// each time. Draining a backend closes its listener, so its kernel answers new
/// connections with RST. Istio's task expects one failed call per drain ("the first call
/// will fail, which triggers the failover"); lb sees the refusal in the kernel, re-sends
/// the SYN to the next backend of the failover list and reports the failure to outlier
/// detection, so the client sees no failed call at all.
///
/// With the seed's default `maxEjectionPercent` (10%) and four hosts, outlier detection
/// ejects only the first drained backend (the first ejection in a service is always
/// allowed; see docs/locality.md). The later drained backends stay in the table, and each
/// of their refusals is re-steered in the kernel: calls are still all served by the next
/// locality, one extra round trip later.
fn seed_task_exactly(mode: AttachMode) {
    let config = format!(
        "{NODE}---\n{}---\n{DESTINATION_RULE}",
        service_entry(&seed::endpoints())
    );
    let mut s = Scenario::start_in(mode, &seed_backends(), &config);
    s.assert_all_in(30, "region1", "zone1");
    let mut total_failed = 0;
    for (drained, next) in [(0, LOCALITIES[1]), (1, LOCALITIES[2]), (2, LOCALITIES[3])] {
        s.bed.backends[drained].http.stop();
        let want = hello(next.0, next.1);
        let started = Instant::now();
        let mut failed = 0;
        loop {
            match s
                .bed
                .client
                .run(|| http_get(vip(), "/hello", DEFAULT_TIMEOUT))
            {
                Ok(name) if name == want => break,
                Ok(other) => panic!("a call reached {other} after it was drained"),
                Err(_) => failed += 1,
            }
            assert!(failed < 10, "traffic did not fail over to {want}");
        }
        let took = started.elapsed();
        let ejected = s
            .endpoint_entry(&endpoint(drained as u8 + 1))
            .contains("\"ejected\":true");
        println!(
            "{mode:?} drain {}: {failed} failed call(s), first call served by {}.{} {took:?} after the drain; drained backend ejected: {ejected}",
            drained + 1,
            next.0,
            next.1
        );
        total_failed += failed;
        s.assert_all_in(30, next.0, next.1);
    }
    println!("{mode:?} seed task: {total_failed} failed call(s) over three drains");
    assert_eq!(total_failed, 0, "the client saw failed calls");
    // The first drained backend is ejected by outlier detection (consecutive5xxErrors: 1,
    // a refused connect counting as a 503).
    s.assert_ejected(&endpoint(1));
}

#[test]
fn seed_task_exactly_tc() {
    if !require_root() {
        return;
    }
    seed_task_exactly(AttachMode::Tc);
}

#[test]
fn seed_task_exactly_xdp() {
    if !require_root() {
        return;
    }
    seed_task_exactly(AttachMode::Xdp);
}

/// A total outage is not hidden: when every backend refuses, the re-steers are spent
/// (`connect_retries`, default 2) and the last refusal reaches the client, which fails
/// fast with "connection refused" instead of waiting for a timeout.
#[test]
fn total_outage_fails_fast() {
    if !require_root() {
        return;
    }
    let config = format!(
        "{NODE}---\n{}---\n{DESTINATION_RULE}",
        service_entry(&seed::endpoints())
    );
    let mut s = Scenario::start(&seed_backends(), &config);
    for b in &mut s.bed.backends {
        b.http.stop();
    }
    for _ in 0..3 {
        let started = Instant::now();
        let err = s
            .bed
            .client
            .run(|| http_get(vip(), "/hello", Duration::from_secs(5)))
            .expect_err("a call succeeded with every backend down");
        let took = started.elapsed();
        println!("total outage: the call failed after {took:?}: {err:#}");
        assert!(
            format!("{err:#}").to_lowercase().contains("refused"),
            "expected a refused connection, got {err:#}"
        );
        assert!(
            took < Duration::from_millis(500),
            "the client waited {took:?} for a refusal"
        );
    }
}

/// Every drained backend is ejected when the rule allows it (`maxEjectionPercent: 100`):
/// the data plane's refusal signal reaches outlier detection and the tables move on, so
/// later calls go straight to the next locality with no refusal on the way.
#[test]
fn drained_backends_are_ejected_when_the_rule_allows() {
    if !require_root() {
        return;
    }
    let rule = DESTINATION_RULE.replace(
        "      baseEjectionTime: 10m\n",
        "      baseEjectionTime: 10m\n      maxEjectionPercent: 100\n",
    );
    assert_ne!(rule, DESTINATION_RULE);
    let config = format!(
        "{NODE}---\n{}---\n{rule}",
        service_entry(&seed::endpoints())
    );
    let mut s = Scenario::start(&seed_backends(), &config);
    for (drained, next) in [(0, LOCALITIES[1]), (1, LOCALITIES[2]), (2, LOCALITIES[3])] {
        s.bed.backends[drained].http.stop();
        s.assert_all_in(10, next.0, next.1);
        wait_until(&s.bed.node, Duration::from_secs(2), || {
            let entry = endpoint_entry(&endpoint(drained as u8 + 1))?;
            anyhow::ensure!(entry.contains("\"ejected\":true"), "not ejected: {entry}");
            Ok(())
        })
        .expect("the drained backend is ejected");
    }
}

/// The second seed (Istio blog, "Configuring failover for external services"): two
/// endpoints in `us-east1` and `us-west`, the node in `us-east1`, the blog's
/// DestinationRule. The primary endpoint's port is made wrong (connection refused), as in
/// the blog: traffic fails over to `us-west`, and lb's admin view shows the endpoint as
/// ejected by outlier detection.
#[test]
fn external_service_with_a_wrong_port_fails_over() {
    if !require_root() {
        return;
    }
    let config = format!(
        r#"apiVersion: lb/v1alpha1
kind: Node
spec:
  locality: us-east1
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata:
  name: external-svc
spec:
  hosts:
  - mydb.com
  addresses:
  - {VIP}
  location: MESH_EXTERNAL
  ports:
  - number: {HELLO_PORT}
    name: http
    protocol: HTTP
  resolution: STATIC
  endpoints:
  - address: {east}
    locality: us-east1
    ports:
      http: 8081 # wrong on purpose: nothing listens there
  - address: {west}
    locality: us-west
    ports:
      http: {BACKEND_HTTP_PORT}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: mydynamodb
spec:
  host: mydb.com
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 15s
      baseEjectionTime: 1m
"#,
        east = backend_addr(1),
        west = backend_addr(2),
    );
    let backends = vec![
        "healthy: us-east".to_string(),
        "healthy: us-west".to_string(),
    ];
    // Starting waits for the VIP to serve: the first calls meet the refusal, as in the
    // blog, until the data plane's signal has ejected us-east.
    let s = Scenario::start(&backends, &config);
    s.assert_all_named(20, "healthy: us-west");
    s.assert_ejected(&format!("{}:8081", backend_addr(1)));
}

/// A backend that fails requests while it still accepts connections: region1.zone1 keeps
/// its listener up but answers every request `503 Service Unavailable`. Connect-level
/// signals see nothing wrong; lb's data plane reads the status line of the backend's
/// response segments, and a 5xx counts toward `consecutive5xxErrors` as in Envoy. With
/// the seed's rule at `consecutive5xxErrors: 3` (the first ejection in a service is
/// always allowed, so the default `maxEjectionPercent` is enough), the third 503 in a row
/// ejects region1.zone1 and the following calls go to region1.zone2.
///
/// lb balances connections and does not retry requests, so the client sees the three
/// 503s that eject the endpoint. The client waits after each 503 until the agent has
/// counted it (`rq_error` in `/clusters`), so the count checks the rule, not how quickly
/// the agent ran on a loaded machine: exactly three, then region1.zone2. How long the
/// ejection takes to be live is measured by `cargo xtask bench` (failover reaction).
#[test]
fn backend_answering_503_is_ejected() {
    if !require_root() {
        return;
    }
    let rule = DESTINATION_RULE.replace(
        "      consecutive5xxErrors: 1\n",
        "      consecutive5xxErrors: 3\n",
    );
    assert_ne!(rule, DESTINATION_RULE);
    let config = format!(
        "{NODE}---\n{}---\n{rule}",
        service_entry(&seed::endpoints())
    );
    let s = Scenario::start(&seed_backends(), &config);
    s.assert_all_in(30, "region1", "zone1");

    s.bed.backends[0].http.set_status(503);
    let (zone1, zone2) = (hello("region1", "zone1"), hello("region1", "zone2"));
    let started = Instant::now();
    let mut answered_503 = 0;
    loop {
        let call = answered_503 + 1;
        let answer = s
            .bed
            .client
            .run(|| get_with_status(vip(), "/", DEFAULT_TIMEOUT))
            .unwrap_or_else(|e| panic!("call {call} failed: {e:#}"));
        match answer {
            (200, body) if body == zone2 => break,
            (503, body) if body == zone1 => answered_503 += 1,
            other => panic!("call {call}: unexpected answer {other:?}"),
        }
        assert!(
            answered_503 <= 3,
            "{answered_503} calls answered 503 (each counted by the agent before the next \
             call), with consecutive5xxErrors: 3: region1.zone1 was not ejected"
        );
        s.wait_for_rq_error(&endpoint(1), answered_503 as u64);
    }
    println!(
        "503 backend: the client saw {answered_503} 503(s), then region1.zone2 served, \
         {:?} after the backend started failing (waiting for the agent between calls)",
        started.elapsed()
    );
    assert_eq!(
        answered_503, 3,
        "ejected after {answered_503} 503(s), with consecutive5xxErrors: 3"
    );
    s.assert_ejected(&endpoint(1));
    s.assert_all_in(30, "region1", "zone2");
}

/// A backend that never answers: region1.zone1's replies to the client are black-holed
/// (`ip route add blackhole 10.200.0.2/32` in its namespace), so its SYN-ACKs vanish and
/// the client's SYN goes unanswered, as with a hung host or a path that drops. The client
/// retransmits its SYN after its initial retransmission timeout (1 s); lb sees the
/// retransmission of a connection still in its handshake, counts a connect timeout for
/// region1.zone1 and sends the SYN to the next backend instead, so the call succeeds,
/// served by region1.zone2, about one second late. A timeout counts as a 504 toward
/// `consecutive5xxErrors` (1 in the seed's rule, verbatim here): region1.zone1 is ejected,
/// and the following calls go to region1.zone2 without meeting the black hole.
#[test]
fn backend_black_holing_syns_is_avoided() {
    if !require_root() {
        return;
    }
    let config = format!(
        "{NODE}---\n{}---\n{DESTINATION_RULE}",
        service_entry(&seed::endpoints())
    );
    let s = Scenario::start(&seed_backends(), &config);
    s.assert_all_in(30, "region1", "zone1");

    s.bed.backends[0]
        .black_hole_replies_to(CLIENT_ADDR)
        .unwrap();
    // Long enough for the SYN, its first retransmission (1 s) and the second (3 s), so a
    // call that is not re-steered fails here rather than by a short connect timeout.
    let first_call_timeout = Duration::from_secs(5);
    let started = Instant::now();
    let name = s
        .bed
        .client
        .run(|| http_get(vip(), "/", first_call_timeout))
        .unwrap_or_else(|e| {
            panic!(
                "the first call after the black hole failed after {:?}: {e:#}",
                started.elapsed()
            )
        });
    let took = started.elapsed();
    println!("black-holed backend: the first call was served by {name:?} after {took:?}");
    assert_eq!(
        name,
        hello("region1", "zone2"),
        "the first call was not moved to region1.zone2"
    );
    // At least the initial retransmission timeout: the SYN to region1.zone1 was lost. Well
    // before the second retransmission (3 s): the first one was re-steered.
    assert!(
        took >= Duration::from_millis(900),
        "served after {took:?}: the SYN was not lost, is region1.zone1 black-holed?"
    );
    assert!(
        took < Duration::from_millis(2500),
        "served after {took:?}: the first SYN retransmission was not re-steered"
    );

    // The decision follows the timeout signal within milliseconds; wait for it rather
    // than race it, then check that no call meets the black hole any more.
    wait_until(&s.bed.node, Duration::from_secs(2), || {
        let entry = endpoint_entry(&endpoint(1))?;
        anyhow::ensure!(entry.contains("\"ejected\":true"), "not ejected: {entry}");
        Ok(())
    })
    .expect("region1.zone1 is ejected after its connect timeout");
    for call in 1..=30 {
        let started = Instant::now();
        let name = s
            .bed
            .client
            .run(|| http_get(vip(), "/", DEFAULT_TIMEOUT))
            .unwrap_or_else(|e| panic!("call {call} after the ejection: {e:#}"));
        let took = started.elapsed();
        assert_eq!(
            name,
            hello("region1", "zone2"),
            "call {call} after the ejection"
        );
        // A call that met the black hole would wait for a retransmission (1 s).
        assert!(
            took < Duration::from_millis(500),
            "call {call} after the ejection took {took:?}"
        );
    }
}
