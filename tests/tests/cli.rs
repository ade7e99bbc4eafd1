//! The `lb` operator commands against a running `lb agent` in a test bed: run as an
//! operator runs them on the node (its network namespace, the machine's BPF filesystem),
//! with the agent's pin directory and admin endpoint, and after the agent is gone.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::Result;
use lb::dataplane::AttachMode;
use lb_tests::{
    agent_process::{lb_binary, wait_until, write_atomically, AgentProcess, TempDir},
    http_get, names_from, require_root,
    topology::{self, backend_addr, backend_name, vip_http, TestBed, BACKEND_HTTP_PORT},
    KeepAliveClient, Netns, DEFAULT_TIMEOUT,
};
use serde_json::Value;

const ADMIN: &str = "127.0.0.1:15000";

/// What an `lb` command printed and how it exited.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }

    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "{self:?}");
        self
    }
}

/// `lb ARGS...` in `ns`'s network namespace only (as the agent runs: see
/// `AgentProcess::start_with`), so it reaches the admin endpoint on the node's loopback
/// and reads the pins in the machine's BPF filesystem.
fn lb_in(ns: &Netns, args: &[&str]) -> Run {
    let output = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name()))
        .arg("--")
        .arg(lb_binary().unwrap())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running lb");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A test bed with a running agent (admin endpoint on) serving the VIP.
struct Setup {
    agent: AgentProcess,
    bed: TestBed,
    _dir: TempDir,
}

impl Setup {
    fn new() -> Self {
        let bed = TestBed::new(AttachMode::Tc).unwrap();
        let dir = TempDir::new("lbcfg").unwrap();
        let config = dir.0.join("lb.yaml");
        write_atomically(&config, &topology::config_yaml(&[1, 2, 3], "")).unwrap();
        let agent = AgentProcess::start_with(&bed, &config, &["--admin", ADMIN]).unwrap();
        wait_until(&bed.client, Duration::from_secs(20), || {
            http_get(vip_http(), "/", Duration::from_millis(500))
        })
        .expect("the agent programs the VIP");
        let setup = Self {
            agent,
            bed,
            _dir: dir,
        };
        // The admin endpoint answers (it starts right after the maps are programmed).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let r = setup.lb(&["services"]);
            if r.code == 0 && r.stdout.contains("web") && r.stderr.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the admin endpoint never answered: {r:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        setup
    }

    /// `lb ARGS... --pin-dir PIN_DIR --admin ADMIN` on the node.
    fn lb(&self, args: &[&str]) -> Run {
        let pin_dir = self.agent.pin_dir.to_str().unwrap();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--pin-dir", pin_dir, "--admin", ADMIN]);
        lb_in(&self.bed.node, &all)
    }
}

fn web_endpoint(i: u8) -> String {
    format!("{}:{BACKEND_HTTP_PORT}", backend_addr(i))
}

/// The line of `text` that contains `needle`.
fn line_with<'a>(text: &'a str, needle: &str) -> &'a str {
    text.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{text}"))
}

/// `lb services` lists each frontend with its backends and their states; `lb eject` (with
/// the agent's token) ejects an endpoint, which `lb endpoints` then shows as failing its
/// outlier check, in tables and in JSON.
#[test]
fn services_endpoints_and_eject() {
    if !require_root() {
        return;
    }
    let s = Setup::new();
    let services = s.lb(&["services"]).ok().stdout;
    let web = line_with(&services, "10.96.0.10:80/TCP");
    assert!(web.contains("web"), "{services}");
    assert!(
        line_with(&services, "10.96.0.10:53/UDP").contains("dns"),
        "{services}"
    );
    for i in 1..=3 {
        let line = line_with(&services, &format!("=> {}", web_endpoint(i)));
        assert!(line.contains("(active)"), "{services}");
    }

    // Without the token the agent refuses; with it the endpoint is ejected.
    let token_file = s.agent.admin_token_file.to_str().unwrap();
    let refused = s.lb(&[
        "eject",
        &web_endpoint(2),
        "--admin-token-file",
        "/nonexistent/admin.token",
    ]);
    assert_eq!(refused.code, 1, "{refused:?}");
    s.lb(&[
        "eject",
        &web_endpoint(2),
        "--service",
        "web",
        "--admin-token-file",
        token_file,
    ])
    .ok();

    let endpoints = s.lb(&["endpoints"]).ok().stdout;
    let header = endpoints.lines().next().unwrap();
    for column in [
        "ENDPOINT",
        "STATUS",
        "OUTLIER CHECK",
        "CLUSTER",
        "PRIORITY",
        "LOCALITY",
        "CONNECTIONS",
        "ERRORS",
    ] {
        assert!(header.contains(column), "{endpoints}");
    }
    let ejected = line_with(&endpoints, &web_endpoint(2));
    assert!(ejected.contains("UNHEALTHY"), "{endpoints}");
    assert!(ejected.contains("FAILED"), "{endpoints}");
    assert!(ejected.contains("outbound|80||web"), "{endpoints}");
    let healthy = line_with(&endpoints, &web_endpoint(1));
    assert!(
        healthy.contains("HEALTHY") && healthy.contains(" OK "),
        "{endpoints}"
    );

    let rows = s.lb(&["endpoints", "web", "-o", "json"]).ok().json();
    let rows = rows.as_array().expect("an array of endpoints");
    assert_eq!(rows.len(), 3, "only the web service's endpoints: {rows:?}");
    let row = rows
        .iter()
        .find(|r| r["endpoint"] == web_endpoint(2).as_str())
        .expect("the ejected endpoint");
    assert_eq!(row["outlier_check"], "FAILED");
    assert_eq!(row["status"], "UNHEALTHY");

    // The backends map says so too, and no new connection goes there.
    let services = s.lb(&["services"]).ok().stdout;
    assert!(
        line_with(&services, &format!("=> {}", web_endpoint(2))).contains("(ejected)"),
        "{services}"
    );
    let names = names_from(&s.bed.client, vip_http(), 30).unwrap();
    assert!(!names.contains(&backend_name(2)), "{names:?}");
    let json = s.lb(&["services", "-o", "json"]).ok().json();
    assert_eq!(json["agent_reachable"], true, "{json}");
}

/// `lb conntrack` shows a connection held open, paired client → VIP → backend, and its
/// filters select it.
#[test]
fn conntrack_shows_a_kept_connection() {
    if !require_root() {
        return;
    }
    let s = Setup::new();
    let opened = std::time::Instant::now();
    let (mut conn, local) = s
        .bed
        .client
        .run(|| -> Result<(KeepAliveClient, SocketAddr)> {
            let c = KeepAliveClient::connect(vip_http(), DEFAULT_TIMEOUT)?;
            let local = c.local_addr()?;
            Ok((c, local))
        })
        .unwrap();
    let served_by = conn.get("/").unwrap();
    let i: u8 = served_by
        .strip_prefix("backend-")
        .and_then(|n| n.parse().ok())
        .expect("a backend name");
    let backend = web_endpoint(i);

    let out = s.lb(&["conntrack"]).ok().stdout;
    let line = line_with(&out, &local.to_string());
    for part in [
        "TCP",
        "10.96.0.10:80",
        backend.as_str(),
        "ESTABLISHED",
        "web",
    ] {
        assert!(
            line.contains(part),
            "{part} missing from {line:?} in:\n{out}"
        );
    }

    let filtered = s.lb(&["conntrack", "--backend", &backend, "--service", "web"]);
    assert!(filtered.ok().stdout.contains(&local.to_string()));
    let other = web_endpoint(i % 3 + 1);
    let none = s.lb(&["conntrack", "--backend", &other]).ok();
    assert!(!none.stdout.contains(&local.to_string()), "{none:?}");

    // Old enough that its age cannot be mistaken for its idle time.
    std::thread::sleep(Duration::from_millis(1200).saturating_sub(opened.elapsed()));
    let rows = s.lb(&["conntrack", "-o", "json"]).ok().json();
    let upper = opened.elapsed().as_secs_f64();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["client"] == local.to_string().as_str())
        .expect("the kept connection in JSON");
    assert_eq!(row["backend"], backend.as_str());
    assert_eq!(row["entries"], "both");
    assert!(row["idle_seconds"].as_f64().unwrap() < 60.0, "{row}");
    // Stamped with the kernel's coarse clock (one tick, at most 10 ms, either way).
    let age = row["age_seconds"].as_f64().unwrap();
    assert!(
        (1.19..=upper + 0.01).contains(&age),
        "age {age} s, opened {upper} s ago: {row}"
    );
    // The connection is still usable.
    assert_eq!(conn.get("/").unwrap(), served_by);
}

fn counter(stats: &Value, name: &str) -> u64 {
    stats["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no counter {name}: {stats}"))["value"]
        .as_u64()
        .unwrap()
}

fn web_new_connections(stats: &Value) -> u64 {
    stats["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["frontend"] == "10.96.0.10:80/TCP")
        .expect("the web service")["new_connections"]
        .as_u64()
        .unwrap()
}

/// `lb stats` counters move with traffic; `lb maps` lists every pinned map.
#[test]
fn stats_move_and_maps_are_listed() {
    if !require_root() {
        return;
    }
    let s = Setup::new();
    let before = s.lb(&["stats", "-o", "json"]).ok().json();
    names_from(&s.bed.client, vip_http(), 20).unwrap();
    let after = s.lb(&["stats", "-o", "json"]).ok().json();
    assert!(
        counter(&after, "forward_new") >= counter(&before, "forward_new") + 20,
        "before {before}\nafter {after}"
    );
    assert!(web_new_connections(&after) >= web_new_connections(&before) + 20);
    let backends_total: u64 = after["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["new_connections"].as_u64().unwrap())
        .sum();
    assert!(backends_total >= 20, "{after}");
    let table = s.lb(&["stats"]).ok().stdout;
    assert!(line_with(&table, "forward_new").split_whitespace().last() != Some("0"));

    let maps = s.lb(&["maps"]).ok().stdout;
    for name in lb_common::maps::PINNED {
        assert!(
            maps.lines().any(|l| l.starts_with(&format!("{name} "))),
            "{name} missing:\n{maps}"
        );
    }
    let rows = s.lb(&["maps", "-o", "json"]).ok().json();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), lb_common::maps::PINNED.len(), "{rows:?}");
    let ct = rows.iter().find(|r| r["name"] == "lb_ct_v2").unwrap();
    assert_eq!(ct["type"], "lru_hash");
    assert_eq!(
        ct["max_entries"], 65536,
        "the test configuration's max_connections"
    );
    assert!(ct["memory_bytes"].as_u64().unwrap() > 0);
    let svc = rows.iter().find(|r| r["name"] == "lb_svc_v1").unwrap();
    assert_eq!(svc["entries"], 3, "two frontends and one VIP marker: {svc}");
}

/// With the agent gone the maps stay pinned: `lb services` and `lb stats` say the agent
/// is not reachable and show what the maps hold; actions that need the agent exit 4.
#[test]
fn reads_the_maps_after_the_agent_is_gone() {
    if !require_root() {
        return;
    }
    let mut s = Setup::new();
    names_from(&s.bed.client, vip_http(), 10).unwrap();
    s.agent.stop();
    assert!(
        s.agent.pin_dir.join("lb_svc_v1").exists(),
        "pins outlive the agent"
    );

    let services = s.lb(&["services"]).ok();
    assert!(services.stderr.contains("not reachable"), "{services:?}");
    assert!(
        services.stdout.contains("10.96.0.10:80/TCP"),
        "{services:?}"
    );
    for i in 1..=3 {
        let line = line_with(&services.stdout, &format!("=> {}", web_endpoint(i)));
        assert!(line.contains("(active)"), "{services:?}");
    }
    let stats = s.lb(&["stats", "-o", "json"]).ok();
    assert!(stats.stderr.contains("not reachable"), "{stats:?}");
    assert!(counter(&stats.json(), "forward_new") >= 10, "{stats:?}");
    let endpoints = s.lb(&["endpoints"]).ok();
    assert!(
        line_with(&endpoints.stdout, &web_endpoint(1)).contains("outbound|80||10.96.0.10"),
        "without the agent the cluster is named by the VIP: {endpoints:?}"
    );

    let eject = s.lb(&["eject", &web_endpoint(1)]);
    assert_eq!(eject.code, 4, "{eject:?}");
    assert!(eject.stderr.contains("not reachable"), "{eject:?}");
}

/// A pin directory that does not exist: exit 3 and a message that says what to check.
#[test]
fn missing_pin_dir_exits_3() {
    if !require_root() {
        return;
    }
    let node = Netns::new("node").unwrap();
    let missing = format!("/sys/fs/bpf/{}", lb_tests::unique_name("nopins"));
    for command in ["services", "endpoints", "conntrack", "stats", "maps"] {
        let r = lb_in(&node, &[command, "--pin-dir", &missing]);
        assert_eq!(r.code, 3, "{command}: {r:?}");
        assert!(r.stderr.contains("is the agent running?"), "{r:?}");
        assert!(r.stderr.contains(&missing), "{r:?}");
        assert!(r.stdout.is_empty(), "{r:?}");
    }
    let usage = lb_in(&node, &["services", "-o", "yaml"]);
    assert_eq!(usage.code, 2, "{usage:?}");
    assert!(
        !std::path::Path::new(&missing).exists(),
        "lb commands only read: {missing} was created"
    );
}

/// Without root, `lb` says which privileges it needs (exit 3), and the state it would read
/// is root-only: the pin directory 0700, every pin and the admin token file 0600.
#[test]
fn privileges_are_explained_and_pins_are_root_only() {
    use std::os::unix::fs::PermissionsExt as _;
    if !require_root() {
        return;
    }
    let s = Setup::new();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&s.agent.pin_dir), 0o700, "pin directory");
    let mut pins = 0;
    for entry in std::fs::read_dir(&s.agent.pin_dir).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
        pins += 1;
    }
    assert!(pins >= 10, "{pins} pins");
    assert_eq!(mode(&s.agent.admin_token_file), 0o600, "admin token file");

    let pin_dir = s.agent.pin_dir.to_str().unwrap();
    let have_setpriv = Command::new("setpriv").arg("--version").output().is_ok();
    if !have_setpriv {
        eprintln!("setpriv not found: the unprivileged run is skipped");
        return;
    }
    for command in ["services", "endpoints", "conntrack", "stats", "maps"] {
        let output = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(lb_binary().unwrap())
            .args([command, "--pin-dir", pin_dir])
            .stdin(Stdio::null())
            .output()
            .expect("running lb as nobody");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(3), "{command}: {stderr}");
        for cap in ["CAP_BPF", "CAP_SYS_ADMIN", "CAP_NET_ADMIN", "sudo"] {
            assert!(stderr.contains(cap), "{command}: {cap} not named: {stderr}");
        }
        assert!(output.stdout.is_empty(), "{command}");
    }
}
