//! TLS origination, side by side: the client speaks plain HTTP to a VIP and the node opens
//! TLS to the backend (verifying its certificate for a name), done by lb (the `lb agent`
//! binary's forwarder, docs/tls-origination.md), by HAProxy and by nginx, each as its
//! users configure it; plain HTTP through lb's kernel path to the same backend is the
//! baseline, and the client calling the backend's HTTPS port itself (wrk's TLS,
//! keep-alive only) shows what the backend can serve.
//!
//! ```text
//!  client 10.200.0.2 ── node (lb / HAProxy / nginx: TLS) ── backend 10.200.1.2:443 (nginx, HTTPS)
//!                                                          └ 10.200.1.2:8080 (plain HTTP)
//! ```
//!
//! As in the end-to-end section: keep-alive requests (`wrk`) and one new TCP connection
//! per request (`loadgen`), interleaved rounds (target order rotated, mode order
//! alternated), medians over rounds with the range, lb's ratios to each peer taken per
//! round. Beside the rate and latency: each balancer's CPU time per request (its
//! processes' utime + stime), the backend's, and the connections the backend accepted per
//! request (how much each balancer reuses upstream). lb's agent runs only for its own
//! runs (its programs sit on every interface of the node); the proxies listen on their
//! own addresses and stay up.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use lb::dataplane::AttachMode;
use lb_tests::{
    agent_process::{wait_until, write_atomically, AgentProcess, TempDir},
    tls_server::TestCa,
    topology::{backend_addr, TestBed, BACKEND_HTTP_PORT},
};

use crate::{
    agent::tree_cpu_time,
    end_to_end::{
        backend_nginx_conf, load_average, machine_line, median, min_max, nginx_temp_paths,
        ratio_cell, ratios, BackendHttps, Daemon, Tools, CLIENT_CPU, LB_MAX_CONNECTIONS,
        READY_TIMEOUT, SERVER_CPU,
    },
    loadgen::{self, on_cpu},
    results::{LoadMode, RunFigures},
};

/// What to measure.
pub struct Options {
    /// Interleaved rounds; every target is measured once per round in each mode.
    pub rounds: usize,
    /// Seconds of each measured run (wrk takes whole seconds: rounded, at least 1).
    pub secs: f64,
    /// Connections (keep-alive) or generator threads (new connections) at once.
    pub concurrency: usize,
}

/// The name the backend's certificate is for, sent as SNI and checked by every balancer.
const SERVER_NAME: &str = "db.bench.internal";
const BACKEND_TLS_PORT: u16 = 443;
/// lb's TLS frontend (a TLS frontend owns its VIP: nothing else is on it).
const LB_TLS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 10);
/// lb's plain frontend to the backend's HTTP port (the kernel path).
const LB_PLAIN_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 11);
/// HAProxy's and nginx's listening addresses, on the node's loopback device.
const HAPROXY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 13);
const NGINX_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 14);
const NGINX_POOL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 15);
const VIP_PORT: u16 = 80;
/// The agent's admin endpoint, on the node's loopback.
const ADMIN: &str = "127.0.0.1:15000";
/// nginx's `upstream { keepalive N; }`: idle upstream connections kept per worker, as
/// many as the client's connections.
const NGINX_POOL: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    /// The client calling the backend's HTTPS port itself: the backend's capacity.
    DirectHttps,
    LbTls,
    Haproxy,
    Nginx,
    /// nginx with a pool of idle upstream connections (`upstream { keepalive N; }`).
    NginxPool,
    /// Plain HTTP through lb's kernel path, to the backend's HTTP port.
    LbPlain,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::DirectHttps => "direct HTTPS",
            Target::LbTls => "lb TLS",
            Target::Haproxy => "HAProxy",
            Target::Nginx => "nginx",
            Target::NginxPool => "nginx keepalive",
            Target::LbPlain => "lb plain",
        }
    }

    fn addr(self) -> SocketAddr {
        match self {
            Target::DirectHttps => (backend_addr(1), BACKEND_TLS_PORT).into(),
            Target::LbTls => (LB_TLS_VIP, VIP_PORT).into(),
            Target::Haproxy => (HAPROXY_VIP, VIP_PORT).into(),
            Target::Nginx => (NGINX_VIP, VIP_PORT).into(),
            Target::NginxPool => (NGINX_POOL_VIP, VIP_PORT).into(),
            Target::LbPlain => (LB_PLAIN_VIP, VIP_PORT).into(),
        }
    }

    /// `direct HTTPS` with keep-alive only: the bench's new-connection generator speaks
    /// plain HTTP, and wrk's TLS with a new connection per request would be another
    /// generator, its figures incomparable.
    fn measured_in(self, mode: LoadMode) -> bool {
        self != Target::DirectHttps || mode == LoadMode::KeepAlive
    }

    fn is_lb(self) -> bool {
        matches!(self, Target::LbTls | Target::LbPlain)
    }

    fn describe(self) -> String {
        let a = self.addr();
        let verify = format!("verifying the certificate against the CA for `{SERVER_NAME}`");
        match self {
            Target::DirectHttps => format!(
                "{a}: the backend's HTTPS port called by the client itself (`wrk` \
                 `https://`, which checks no certificate), keep-alive only: what the backend \
                 serves over TLS on this path"
            ),
            Target::LbTls => format!(
                "{a}: `lb agent` (TC), a ServiceEntry to {}:{BACKEND_TLS_PORT} with a \
                 DestinationRule `tls: {{ mode: SIMPLE, sni: {SERVER_NAME}, caCertificates }}`: \
                 the kernel hands each connection to the agent's forwarder (rustls, its \
                 default session resumption), which opens one TLS connection to the backend \
                 per client connection",
                backend_addr(1)
            ),
            Target::Haproxy => format!(
                "{a}: HAProxy `mode http`, 1 thread, `server b1 {}:{BACKEND_TLS_PORT} ssl \
                 verify required ca-file CA sni str({SERVER_NAME}) verifyhost {SERVER_NAME}`; \
                 its defaults: `http-reuse safe` (idle upstream connections shared between \
                 client connections) and TLS session reuse",
                backend_addr(1)
            ),
            Target::Nginx => format!(
                "{a}: nginx `proxy_pass https://{}:{BACKEND_TLS_PORT}`, \
                 `proxy_ssl_verify on`, `proxy_ssl_name {SERVER_NAME}`, \
                 `proxy_ssl_server_name on`, `proxy_ssl_protocols TLSv1.2 TLSv1.3`, 1 worker \
                 process; its defaults: a new upstream connection per request (HTTP/1.0 \
                 upstream, no `keepalive`), TLS session reuse ({verify})",
                backend_addr(1)
            ),
            Target::NginxPool => format!(
                "{a}: the same nginx with `upstream {{ keepalive {NGINX_POOL}; }}`, \
                 `proxy_http_version 1.1` and `proxy_set_header Connection \"\"`: idle \
                 upstream connections kept and shared between client connections"
            ),
            Target::LbPlain => format!(
                "{a}: `lb agent` (TC), a ServiceEntry without TLS to the backend's plain HTTP \
                 port {}:{BACKEND_HTTP_PORT}: the kernel path (no process sees the bytes)",
                backend_addr(1)
            ),
        }
    }
}

/// lb's configuration, as users write it: the TLS frontend and the plain one.
fn lb_config(ca: &Path) -> String {
    let be = backend_addr(1);
    format!(
        r#"apiVersion: lb/v1alpha1
kind: Node
spec:
  locality: region1/zone1
  dataplane: {{ max_connections: {LB_MAX_CONNECTIONS} }}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: db }}
spec:
  hosts: [{SERVER_NAME}]
  addresses: [{LB_TLS_VIP}]
  ports: [{{ number: {VIP_PORT}, name: http, protocol: HTTP, targetPort: {BACKEND_TLS_PORT} }}]
  resolution: STATIC
  endpoints: [{{ address: {be} }}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: db }}
spec:
  host: {SERVER_NAME}
  trafficPolicy:
    tls: {{ mode: SIMPLE, sni: {SERVER_NAME}, caCertificates: {ca} }}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: db-plain }}
spec:
  hosts: [plain.{SERVER_NAME}]
  addresses: [{LB_PLAIN_VIP}]
  ports: [{{ number: {VIP_PORT}, name: http, protocol: HTTP, targetPort: {BACKEND_HTTP_PORT} }}]
  resolution: STATIC
  endpoints: [{{ address: {be} }}]
"#,
        ca = ca.display()
    )
}

/// HAProxy in HTTP mode originating TLS, its defaults otherwise (connection and session
/// reuse included), one thread as in the end-to-end section.
fn haproxy_conf(ca: &Path) -> String {
    format!(
        r#"global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend tls
  bind {HAPROXY_VIP}:{VIP_PORT}
  default_backend db
backend db
  server b1 {}:{BACKEND_TLS_PORT} ssl verify required ca-file {} sni str({SERVER_NAME}) verifyhost {SERVER_NAME}
"#,
        backend_addr(1),
        ca.display()
    )
}

/// nginx as an HTTP proxy originating TLS: one server with its defaults (a new upstream
/// connection per request), one with a pool of idle upstream connections.
fn nginx_conf(dir: &Path, ca: &Path) -> String {
    let d = dir.display();
    let temp = nginx_temp_paths(dir, "proxy");
    let upstream = format!("{}:{BACKEND_TLS_PORT}", backend_addr(1));
    let tls = format!(
        "      proxy_ssl_verify on;\n      proxy_ssl_trusted_certificate {};\n      \
         proxy_ssl_name {SERVER_NAME};\n      proxy_ssl_server_name on;\n      \
         proxy_ssl_protocols TLSv1.2 TLSv1.3;\n",
        ca.display()
    );
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {d}/proxy.pid;
error_log {d}/proxy.error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
{temp}  upstream db_pool {{
    server {upstream};
    keepalive {NGINX_POOL};
  }}
  server {{
    listen {NGINX_VIP}:{VIP_PORT} backlog=4096;
    location / {{
      proxy_pass https://{upstream};
{tls}    }}
  }}
  server {{
    listen {NGINX_POOL_VIP}:{VIP_PORT} backlog=4096;
    location / {{
      proxy_pass https://db_pool;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
{tls}    }}
  }}
}}
"#
    )
}

/// One measured run with what the processes used meanwhile.
#[derive(Clone, Debug, Default)]
struct Run {
    figures: RunFigures,
    /// CPU time of the balancer's processes (`None`: no process balances).
    balancer_cpu: Option<Duration>,
    backend_cpu: Duration,
    /// Connections the backend accepted (TLS or plain).
    backend_connections: u64,
}

impl Run {
    fn cpu_per_request_us(&self) -> Option<f64> {
        let cpu = self.balancer_cpu?;
        (self.figures.requests > 0).then(|| cpu.as_secs_f64() * 1e6 / self.figures.requests as f64)
    }
}

/// Connections the backend's nginx has accepted (`stub_status`), read from its namespace.
fn backend_accepts(bed: &TestBed) -> Result<u64> {
    let addr: SocketAddr = (backend_addr(1), BACKEND_HTTP_PORT).into();
    let text = bed.backends[0]
        .ns
        .run(|| lb_tests::http_get(addr, "/status", Duration::from_secs(3)))?;
    parse_accepts(&text).with_context(|| format!("reading stub_status: {text:?}"))
}

/// `accepts` of nginx's `stub_status`: the first number of the line after
/// `server accepts handled requests`.
fn parse_accepts(text: &str) -> Option<u64> {
    let mut lines = text.lines();
    lines.find(|l| l.trim_start().starts_with("server accepts"))?;
    lines.next()?.split_whitespace().next()?.parse().ok()
}

/// The test bed, the backend and the proxies; dropped in field order: processes first,
/// the namespaces last.
struct Bench {
    haproxy: Daemon,
    nginx: Daemon,
    backend: Daemon,
    dir: TempDir,
    ca: std::path::PathBuf,
    bed: TestBed,
    tools: Tools,
    pin: bool,
}

impl Bench {
    fn setup(tools: Tools, pin: bool) -> Result<Self> {
        let server_cpu = pin.then_some(SERVER_CPU);
        let names = vec!["backend-1".to_string()];
        let mut bed = on_cpu(server_cpu, || {
            TestBed::with_backends(AttachMode::Tc, &names)
        })?;
        // nginx takes the harness's HTTP port.
        bed.backends[0].http.stop();
        for ns in [&bed.client, &bed.node] {
            ns.set_sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
            ns.set_sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        }
        // No TIME_WAIT in the backend, as in the end-to-end section (a port reused by
        // the next target would meet it).
        bed.backends[0]
            .ns
            .set_sysctl("net.ipv4.tcp_max_tw_buckets", "0")?;
        let dir = TempDir::new("lbtlsb")?;
        let d = dir.0.clone();
        let ca = TestCa::new(&d)?;
        let (cert, key) = ca.issue(&[SERVER_NAME])?.write_pem(&d, "backend")?;
        let nginx = tools.nginx.display().to_string();
        let prefix = d.display().to_string();

        // As many workers as CPUs, not pinned: the backend's TLS is as costly as a
        // balancer's, and one process would cap every TLS target.
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        let conf = d.join("be1.conf");
        let https = BackendHttps {
            port: BACKEND_TLS_PORT,
            cert: &cert,
            key: &key,
            workers,
        };
        write_atomically(&conf, &backend_nginx_conf(&d, 1, Some(&https)))?;
        let ns = &bed.backends[0].ns;
        let mut backend = Daemon::start(
            "nginx (HTTPS backend)",
            ns,
            &[
                &nginx,
                "-p",
                &prefix,
                "-e",
                &d.join("be1.early.log").display().to_string(),
                "-c",
                &conf.display().to_string(),
            ],
            d.join("be1.out"),
            None,
        )?;
        backend.wait_listening(ns, Target::DirectHttps.addr())?;
        backend.wait_listening(ns, (backend_addr(1), BACKEND_HTTP_PORT).into())?;

        let node = &bed.node;
        for vip in [HAPROXY_VIP, NGINX_VIP, NGINX_POOL_VIP] {
            node.ip(&["addr", "add", &format!("{vip}/32"), "dev", "lo"])?;
        }
        let haproxy_cfg = d.join("haproxy.cfg");
        write_atomically(&haproxy_cfg, &haproxy_conf(&ca.pem_path))?;
        let mut haproxy = Daemon::start(
            "HAProxy (TLS origination)",
            node,
            &[
                &tools.haproxy.display().to_string(),
                "-db",
                "-f",
                &haproxy_cfg.display().to_string(),
            ],
            d.join("haproxy.out"),
            server_cpu,
        )?;
        haproxy.wait_listening(node, Target::Haproxy.addr())?;

        let proxy_conf = d.join("proxy.conf");
        write_atomically(&proxy_conf, &nginx_conf(&d, &ca.pem_path))?;
        let mut proxy = Daemon::start(
            "nginx (TLS origination)",
            node,
            &[
                &nginx,
                "-p",
                &prefix,
                "-e",
                &d.join("proxy.early.log").display().to_string(),
                "-c",
                &proxy_conf.display().to_string(),
            ],
            d.join("proxy.out"),
            server_cpu,
        )?;
        proxy.wait_listening(node, Target::Nginx.addr())?;
        proxy.wait_listening(node, Target::NginxPool.addr())?;
        Ok(Self {
            haproxy,
            nginx: proxy,
            backend,
            dir,
            ca: ca.pem_path,
            bed,
            tools,
            pin,
        })
    }

    /// Sets `target` up (lb's agent for lb's targets) and waits until it answers a
    /// request with 200.
    fn activate(&mut self, target: Target) -> Result<Option<AgentProcess>> {
        for d in [&mut self.backend, &mut self.haproxy, &mut self.nginx] {
            d.ensure_running()?;
        }
        let mut agent = None;
        if target.is_lb() {
            let config = self.dir.0.join("lb.yaml");
            write_atomically(&config, &lb_config(&self.ca))?;
            let started = on_cpu(self.pin.then_some(SERVER_CPU), || {
                AgentProcess::start_with(&self.bed, &config, &["--admin", ADMIN])
            })?;
            let admin: SocketAddr = ADMIN.parse()?;
            wait_until(&self.bed.node, READY_TIMEOUT, || {
                lb_tests::http_get(admin, "/ready", Duration::from_millis(500))
            })
            .context("the agent is not ready")?;
            agent = Some(started);
        }
        if target == Target::DirectHttps {
            // The generator's check speaks plain HTTP; wrk's first run checks the rest.
            return Ok(agent);
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let answer = self
                .bed
                .client
                .run(|| loadgen::check(target.addr(), Duration::from_millis(500)));
            match answer {
                Ok(()) => return Ok(agent),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!(
                        "{} does not answer the client within {} s",
                        target.name(),
                        READY_TIMEOUT.as_secs()
                    )))
                }
                Err(_) => {}
            }
            if let Some(agent) = &mut agent {
                anyhow::ensure!(agent.running(), "{}: the lb agent exited", target.name());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The processes that do `target`'s balancing (and their descendants).
    fn balancer_pid(&self, target: Target, agent: Option<&AgentProcess>) -> Option<u32> {
        match target {
            Target::DirectHttps => None,
            Target::LbTls | Target::LbPlain => agent.map(AgentProcess::pid),
            Target::Haproxy => Some(self.haproxy.pid()),
            Target::Nginx | Target::NginxPool => Some(self.nginx.pid()),
        }
    }

    /// One measured run of `target` (set up) in `mode`.
    fn measure(
        &self,
        target: Target,
        agent: Option<&AgentProcess>,
        mode: LoadMode,
        opts: &Options,
    ) -> Result<Run> {
        let duration = Duration::from_secs_f64(opts.secs.max(0.1));
        let balancer = self.balancer_pid(target, agent);
        let balancer_before = balancer.map(tree_cpu_time).transpose()?;
        let backend_before = tree_cpu_time(self.backend.pid())?;
        let accepts_before = backend_accepts(&self.bed)?;
        let client_cpu = self.pin.then_some(CLIENT_CPU);
        let addrs = [target.addr()];
        let figures = match mode {
            LoadMode::KeepAlive => loadgen::wrk(
                &self.tools.wrk,
                &self.bed.client,
                if target == Target::DirectHttps {
                    "https"
                } else {
                    "http"
                },
                &addrs,
                opts.concurrency,
                duration,
                client_cpu,
            )?,
            LoadMode::NewConnection => loadgen::new_connections(
                &self.bed.client,
                &addrs,
                opts.concurrency,
                duration,
                client_cpu,
            )?,
        };
        let balancer_cpu = match (balancer, balancer_before) {
            (Some(pid), Some(before)) => Some(tree_cpu_time(pid)?.saturating_sub(before)),
            _ => None,
        };
        let backend_cpu = tree_cpu_time(self.backend.pid())?.saturating_sub(backend_before);
        // The reading's own connection is counted in the second reading.
        let backend_connections = backend_accepts(&self.bed)?
            .saturating_sub(accepts_before)
            .saturating_sub(1);
        Ok(Run {
            figures,
            balancer_cpu,
            backend_cpu,
            backend_connections,
        })
    }
}

/// What lb's forwarder counted (`/config_dump`'s `tls_origination`), as a line: its
/// failures and unserved connections explain a failed request through lb if anything.
fn forwarder_counters(bed: &TestBed) -> String {
    let admin: SocketAddr = match ADMIN.parse() {
        Ok(a) => a,
        Err(e) => return format!("{e}"),
    };
    let dump = bed
        .node
        .run(|| lb_tests::http_get(admin, "/config_dump", Duration::from_secs(5)));
    let dump: serde_json::Value = match dump.map(|d| serde_json::from_str(&d)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return format!("reading /config_dump: {e}"),
        Err(e) => return format!("GET /config_dump: {e:#}"),
    };
    let tls = &dump["tls_origination"];
    let mut out = Vec::new();
    if let Some(endpoints) = tls["endpoints"].as_object() {
        for (endpoint, counters) in endpoints {
            out.push(format!("{endpoint} {counters}"));
        }
    }
    for (key, value) in tls.as_object().into_iter().flatten() {
        if key != "endpoints" {
            out.push(format!("{key}={value}"));
        }
    }
    out.join("; ")
}

/// `a`'s CPU per request over `b`'s, per round.
fn cpu_ratios(a: &[Run], b: &[Run]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(
            |(a, b)| match (a.cpu_per_request_us(), b.cpu_per_request_us()) {
                (Some(a), Some(b)) if b > 0.0 => a / b,
                _ => f64::NAN,
            },
        )
        .collect()
}

/// µs of CPU per request over all rounds' runs.
fn per_request_us(runs: &[Run], cpu: impl Fn(&Run) -> Option<Duration>) -> Option<f64> {
    let requests: u64 = runs.iter().map(|r| r.figures.requests).sum();
    let total: Option<Duration> = runs.iter().map(cpu).sum();
    (requests > 0).then(|| total.map(|t| t.as_secs_f64() * 1e6 / requests as f64))?
}

/// Measures every target in both modes; returns the markdown.
pub fn run(opts: &Options) -> Result<String> {
    let started = Instant::now();
    let rounds = opts.rounds.max(1);
    let tools = Tools::find()?;
    let lb = lb_tests::agent_process::lb_binary().context("the TLS section runs the agent")?;
    let pin = std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2;
    let load_before = load_average();
    let mut bench = Bench::setup(tools, pin)?;
    let targets = [
        Target::LbTls,
        Target::Haproxy,
        Target::Nginx,
        Target::NginxPool,
        Target::LbPlain,
        Target::DirectHttps,
    ];
    // Every target answers before anything is measured (a warm-up too).
    for &target in &targets {
        let agent = bench
            .activate(target)
            .with_context(|| format!("checking target {} ({})", target.name(), target.addr()))?;
        drop(agent);
    }
    let setup_secs = started.elapsed().as_secs_f64();

    let modes = [LoadMode::KeepAlive, LoadMode::NewConnection];
    let mut figures: BTreeMap<(Target, LoadMode), Vec<Run>> = BTreeMap::new();
    for round in 0..rounds {
        let mut order = targets.to_vec();
        order.rotate_left(round % targets.len());
        let mut mode_order = modes;
        if round % 2 == 1 {
            mode_order.reverse();
        }
        for &target in &order {
            let agent = bench
                .activate(target)
                .with_context(|| format!("round {}: setting up {}", round + 1, target.name()))?;
            for &mode in &mode_order {
                if !target.measured_in(mode) {
                    continue;
                }
                let run = bench
                    .measure(target, agent.as_ref(), mode, opts)
                    .with_context(|| {
                        format!(
                            "round {}: measuring {} ({})",
                            round + 1,
                            target.name(),
                            mode.label()
                        )
                    })?;
                let f = &run.figures;
                println!(
                    "  tls round {}/{rounds}: {:<15} {:<26} {:>8.0} requests/s, p50 {:>6.0} µs, p99 {:>6.0} µs, CPU/request {}, backend connections {}, {} errors",
                    round + 1,
                    target.name(),
                    mode.label(),
                    f.requests_per_s,
                    f.p50_us,
                    f.p99_us,
                    run.cpu_per_request_us()
                        .map_or("—".into(), |c| format!("{c:.1} µs")),
                    run.backend_connections,
                    f.errors
                );
                figures.entry((target, mode)).or_default().push(run);
            }
            if target == Target::LbTls {
                println!("    lb forwarder: {}", forwarder_counters(&bench.bed));
            }
            drop(agent);
        }
    }
    let machine = machine_line(&bench.tools, pin);
    let backend_workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    drop(bench);

    let mut md = String::new();
    emit!(md, "");
    emit!(md, "{machine}");
    emit!(
        md,
        "load average (1 min) before: {load_before}, after: {} (anything else running on the \
         machine shares its CPUs with the measurement)",
        load_average()
    );
    emit!(md, "");
    emit!(
        md,
        "layout: client namespace → node namespace (the balancer) → backend namespace: nginx \
         ({backend_workers} worker processes, not pinned; `return 200` with a 10-byte body, \
         keep-alive unlimited, no TIME_WAIT kept) serving HTTPS on {}:{BACKEND_TLS_PORT} \
         (a certificate for `{SERVER_NAME}` from a CA the bench makes, ECDSA P-256, TLS 1.2 \
         and 1.3) and plain HTTP on {}:{BACKEND_HTTP_PORT}. {}. Keep-alive: `wrk -t1 -c{c} \
         -d{s}s`; new connection per request: the bench's generator, {c} threads, each \
         connect, `GET /` with `Connection: close`, read to EOF. Rounds: {rounds}, of {secs} \
         s per target and mode, the target order rotated each round. Agent: {}.",
        backend_addr(1),
        backend_addr(1),
        if pin {
            "The load generator is pinned to CPU 0; HAProxy, nginx and the lb agent to CPU 1"
        } else {
            "Nothing is pinned (one CPU)"
        },
        lb.display(),
        c = opts.concurrency,
        s = opts.secs.round().max(1.0),
        secs = opts.secs,
    );
    emit!(md, "");
    for &target in &targets {
        emit!(md, "- `{}`: {}", target.name(), target.describe());
    }

    for mode in modes {
        emit!(md, "");
        emit!(md, "TLS origination, {} (rounds: {rounds})", mode.label());
        emit!(md, "");
        emit!(
            md,
            "| target | requests/s (median) | min–max over rounds | p50 µs | p99 µs | balancer CPU per request | backend CPU per request | backend connections per request | errors |"
        );
        emit!(
            md,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for &target in &targets {
            let Some(runs) = figures.get(&(target, mode)) else {
                continue;
            };
            let rps: Vec<f64> = runs.iter().map(|r| r.figures.requests_per_s).collect();
            let (lo, hi) = min_max(&rps);
            let p50 = median(&runs.iter().map(|r| r.figures.p50_us).collect::<Vec<_>>());
            let p99 = median(&runs.iter().map(|r| r.figures.p99_us).collect::<Vec<_>>());
            let errors: u64 = runs.iter().map(|r| r.figures.errors).sum();
            let requests: u64 = runs.iter().map(|r| r.figures.requests).sum();
            let connections: u64 = runs.iter().map(|r| r.backend_connections).sum();
            let us = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.1} µs"));
            emit!(
                md,
                "| {} | {:.0} | {lo:.0}–{hi:.0} | {p50:.0} | {p99:.0} | {} | {} | {} | {} |",
                target.name(),
                median(&rps),
                us(per_request_us(runs, |r| r.balancer_cpu)),
                us(per_request_us(runs, |r| Some(r.backend_cpu))),
                if requests > 0 {
                    format!("{:.3}", connections as f64 / requests as f64)
                } else {
                    "—".to_string()
                },
                if errors == 0 {
                    "0".to_string()
                } else {
                    format!("{errors} of {}", errors + requests)
                }
            );
        }
    }

    emit!(md, "");
    emit!(
        md,
        "lb TLS over each peer, per round (median, min–max): requests/s, and the balancer's \
         CPU per request (below 1: lb uses less):"
    );
    emit!(md, "");
    emit!(
        md,
        "| ratio | requests/s, {0} | requests/s, {1} | CPU per request, {0} | CPU per request, {1} |",
        modes[0].label(),
        modes[1].label()
    );
    emit!(md, "| --- | ---: | ---: | ---: | ---: |");
    for peer in [
        Target::Haproxy,
        Target::Nginx,
        Target::NginxPool,
        Target::LbPlain,
    ] {
        let rate = |m: LoadMode| {
            let rates = |t: Target| -> Vec<RunFigures> {
                figures[&(t, m)].iter().map(|r| r.figures.clone()).collect()
            };
            ratio_cell(&ratios(&rates(Target::LbTls), &rates(peer)), true)
        };
        // lb's kernel path runs in no process: a ratio to it would divide by nothing.
        let cpu = |m: LoadMode| {
            if peer == Target::LbPlain {
                "—".to_string()
            } else {
                ratio_cell(
                    &cpu_ratios(&figures[&(Target::LbTls, m)], &figures[&(peer, m)]),
                    true,
                )
            }
        };
        emit!(
            md,
            "| lb TLS / {} | {} | {} | {} | {} |",
            peer.name(),
            rate(modes[0]),
            rate(modes[1]),
            cpu(modes[0]),
            cpu(modes[1])
        );
    }
    emit!(md, "");
    emit!(
        md,
        "requests/s, p50/p99 and errors as in the end-to-end section. Balancer CPU per \
         request: the CPU time (utime + stime in /proc/PID/stat) of the balancer's processes \
         over the run (lb: the agent process, all its threads; HAProxy: its process; nginx: \
         its process and any descendants), over the requests completed, all rounds together; \
         backend CPU the same for the backend's nginx (master and workers). Kernel work in \
         softirq (TCP/IP, lb's own programs) is not attributed to the process it serves \
         (a tick in softirq is charged to whichever process was running), so `lb plain` \
         shows about 0. Backend connections per \
         request: connections the backend accepted during the run (its `stub_status`) over \
         requests completed: 1 is a new upstream connection (and TLS handshake, resumed or \
         not) per request. Ratios are taken within each round; \"within noise\" when the \
         rounds' range includes 1.{}",
        if rounds < 5 {
            format!(
                " Only {rounds} round(s): a range of so few runs understates the noise, so \
                 read the ratios as a hint."
            )
        } else {
            String::new()
        }
    );
    emit!(md, "");
    emit!(
        md,
        "TLS origination measured in {:.1} s ({setup_secs:.1} s of setup and checks)",
        started.elapsed().as_secs_f64()
    );
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stub_status() {
        let text = "Active connections: 2 \nserver accepts handled requests\n 17 17 40 \n\
                    Reading: 0 Writing: 1 Waiting: 1 \n";
        assert_eq!(parse_accepts(text), Some(17));
        assert_eq!(parse_accepts("nothing"), None);
    }

    #[test]
    fn the_configuration_parses() {
        let text = lb_config(Path::new("/etc/lb/ca.pem"));
        lb::config::parse(&text).unwrap_or_else(|e| panic!("{e:#}\n{text}"));
    }
}
