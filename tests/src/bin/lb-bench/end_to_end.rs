//! End to end, side by side: HTTP requests from a client namespace through the node to four
//! backends, balanced by lb (the `lb agent` binary, TC and XDP) and by its peers on the
//! same node: kube-proxy's iptables and nftables rules, HAProxy and nginx. `direct` (the
//! client calling one backend, routed by the node) is the physical limit of the path.
//!
//! ```text
//!  client 10.200.0.2 ── node (routes; lb / NAT rules / proxies) ── backend i 10.200.i.2:8080
//! ```
//!
//! Each target is measured in two modes: keep-alive requests (`wrk`), and one new TCP
//! connection per request (the bench's own generator, `loadgen`), whose latency includes
//! the handshake. The backends are nginx (`return 200`): a thread per connection (the
//! harness's `HttpNameServer`) would be what the new-connection runs measure.
//!
//! Rounds are interleaved: each round measures every target once in each mode, in an order
//! rotated per round, so slow drift of the machine hits every target alike. A target's
//! figure is the median over rounds, with the rounds' range beside it; its ratio to
//! `direct` (and lb's to each peer) is taken within each round, then summarised the same
//! way.
//!
//! A target is set up only while it is measured where leaving it in place would change the
//! others: lb's agent (its programs sit on every interface of the node) is started for its
//! runs and removed after, and so are the NAT rules (see [`NatRules`]). The proxies only
//! listen on their own addresses and stay up for the whole measurement.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs::File,
    net::{Ipv4Addr, SocketAddr},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use lb::dataplane::AttachMode;
use lb_tests::{
    agent_process::{lb_binary, write_atomically, AgentProcess, TempDir},
    run_command,
    topology::{backend_addr, TestBed, BACKEND_HTTP_PORT},
    Netns,
};

use crate::{
    loadgen::{self, on_cpu},
    results::{LoadMode, RunFigures, TargetFigures},
};

/// What to measure.
pub struct Options {
    /// Interleaved rounds; every target is measured once per round in each mode.
    pub rounds: usize,
    /// Seconds of each measured run (wrk takes whole seconds: rounded, at least 1).
    pub secs: f64,
    /// Connections (keep-alive) or generator threads (new connections) at once.
    pub concurrency: usize,
    /// Also measure lb with the client-facing interface in XDP mode.
    pub xdp: bool,
}

impl Default for Options {
    /// 16 at once saturates the 2-core machine (every request crosses four namespaces,
    /// all on the same two CPUs) without queueing collapse; 5 rounds of 5 s give stable
    /// medians in about 6 minutes.
    fn default() -> Self {
        Self {
            rounds: 5,
            secs: 5.0,
            concurrency: 16,
            xdp: true,
        }
    }
}

/// Backends behind every target.
const BACKENDS: u8 = 4;
/// The load generator's CPU; everything else (servers, proxies, agent) runs on the other.
pub const CLIENT_CPU: usize = 0;
pub const SERVER_CPU: usize = 1;

/// lb's VIP (the agent's configuration below).
const LB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// kube-proxy's iptables mode, as rules in the node.
const IPTABLES_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// kube-proxy's nftables mode, as rules in the node.
const NFTABLES_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
/// HAProxy's listening address (on the node's loopback device, routed to by the client).
const HAPROXY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
/// nginx's (stream proxy) listening address.
const NGINX_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 14);
const VIP_PORT: u16 = 80;

/// How long a target may take to answer its first request after being set up.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Direct,
    /// The client's requests spread evenly over the four backends, directly: what the
    /// balancers do, without a balancer, on the same backends.
    DirectSpread,
    LbTc,
    LbXdp,
    Iptables,
    Nftables,
    Haproxy,
    Nginx,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::DirectSpread => "direct ×4",
            Target::LbTc => "lb TC",
            Target::LbXdp => "lb XDP",
            Target::Iptables => "iptables",
            Target::Nftables => "nftables",
            Target::Haproxy => "HAProxy",
            Target::Nginx => "nginx",
        }
    }

    /// Where the client sends its requests.
    fn addr(self) -> SocketAddr {
        match self {
            Target::Direct | Target::DirectSpread => (backend_addr(1), BACKEND_HTTP_PORT).into(),
            Target::LbTc | Target::LbXdp => (LB_VIP, VIP_PORT).into(),
            Target::Iptables => (IPTABLES_VIP, VIP_PORT).into(),
            Target::Nftables => (NFTABLES_VIP, VIP_PORT).into(),
            Target::Haproxy => (HAPROXY_VIP, VIP_PORT).into(),
            Target::Nginx => (NGINX_VIP, VIP_PORT).into(),
        }
    }

    /// `direct ×4` only with new connections: spreading keep-alive load over four
    /// addresses would take several wrk threads, and a second generator configuration
    /// would make its figures incomparable. With a new connection per request, the
    /// bench's own generator spreads its threads over the addresses as it is.
    fn measured_in(self, mode: LoadMode) -> bool {
        self != Target::DirectSpread || mode == LoadMode::NewConnection
    }

    /// Every address the client sends its requests to (spread evenly over them).
    fn addrs(self) -> Vec<SocketAddr> {
        match self {
            Target::DirectSpread => (1..=BACKENDS)
                .map(|i| (backend_addr(i), BACKEND_HTTP_PORT).into())
                .collect(),
            _ => vec![self.addr()],
        }
    }

    /// What the target is, for the layout line.
    fn describe(self) -> String {
        let a = self.addr();
        match self {
            Target::Direct => format!("{a}: backend 1 itself, routed by the node"),
            Target::DirectSpread => format!(
                "the four backends themselves ({}:{BACKEND_HTTP_PORT}), routed by the node: \
                 the load generator's connections or threads spread evenly over them",
                (1..=BACKENDS)
                    .map(|i| backend_addr(i).to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Target::LbTc => format!(
                "{a}: `lb agent`, client-facing interface in TC mode; connection table of \
                 {LB_MAX_CONNECTIONS} entries (lb's default: {}), so no run evicts",
                lb_common::maps::DEFAULT_MAX_CONNECTIONS
            ),
            Target::LbXdp => {
                format!("{a}: `lb agent`, client-facing interface in XDP mode (native, veth)")
            }
            Target::Iptables => format!(
                "{a}: kube-proxy iptables style (nat PREROUTING → KUBE-SERVICES → KUBE-SVC \
                 `-m statistic --mode random` → KUBE-SEP DNAT)"
            ),
            Target::Nftables => format!(
                "{a}: kube-proxy nftables style (`ip daddr . meta l4proto . th dport vmap` → \
                 `numgen random mod 4 vmap` → endpoint chain `dnat to`)"
            ),
            Target::Haproxy => {
                format!("{a}: HAProxy `mode tcp`, `balance roundrobin`, 1 thread, on the node's lo")
            }
            Target::Nginx => format!(
                "{a}: nginx `stream` proxy (round robin), 1 worker process, on the node's lo"
            ),
        }
    }
}

/// A program the bench needs, and the Debian package that has it.
fn tool(name: &str, package: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin", "/sbin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "the bench's peers need `{name}`: install Debian's {package} \
         (apt-get install {package}), or skip them"
    )
}

/// The programs the peers and the load generator need.
pub struct Tools {
    pub wrk: PathBuf,
    pub haproxy: PathBuf,
    pub nginx: PathBuf,
    /// `load_module` path of nginx's stream module; `None` when built in.
    stream_module: Option<PathBuf>,
    iptables: PathBuf,
    iptables_restore: PathBuf,
    nft: PathBuf,
    conntrack: PathBuf,
}

impl Tools {
    pub fn find() -> Result<Self> {
        let nginx = tool("nginx", "nginx")?;
        let built = Command::new(&nginx).arg("-V").output()?;
        let built = String::from_utf8_lossy(&built.stderr).into_owned();
        // `--with-stream` is built in; `--with-stream=dynamic` is a module to load.
        let stream_module = if built.split_whitespace().any(|a| a == "--with-stream") {
            None
        } else {
            let candidates = [
                "/usr/lib/nginx/modules/ngx_stream_module.so",
                "/usr/share/nginx/modules/ngx_stream_module.so",
                "/usr/lib64/nginx/modules/ngx_stream_module.so",
            ];
            let found = candidates.iter().map(PathBuf::from).find(|p| p.is_file());
            Some(found.context(
                "the nginx target needs nginx's stream module (ngx_stream_module.so): \
                 install Debian's libnginx-mod-stream",
            )?)
        };
        Ok(Self {
            wrk: tool("wrk", "wrk")?,
            haproxy: tool("haproxy", "haproxy")?,
            nginx,
            stream_module,
            iptables: tool("iptables", "iptables")?,
            iptables_restore: tool("iptables-restore", "iptables")?,
            nft: tool("nft", "nftables")?,
            conntrack: tool("conntrack", "conntrack")?,
        })
    }

    /// One line of versions for the markdown.
    pub fn versions(&self) -> String {
        let first_line = |program: &Path, arg: &str| -> String {
            let out = Command::new(program).arg(arg).output();
            let text = out
                .map(|o| {
                    let mut t = String::from_utf8_lossy(&o.stdout).into_owned();
                    t.push_str(&String::from_utf8_lossy(&o.stderr));
                    t
                })
                .unwrap_or_default();
            let line = text
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with("Usage"))
                .unwrap_or("?");
            // Without wrk's copyright and HAProxy's release date and address.
            let line = line.split(" Copyright").next().unwrap_or(line);
            let line = line.split(" - http").next().unwrap_or(line);
            line.to_string()
        };
        [
            first_line(&self.wrk, "-v"),
            first_line(&self.haproxy, "-v"),
            first_line(&self.nginx, "-v"),
            first_line(&self.iptables, "--version"),
            first_line(&self.nft, "--version"),
        ]
        .join("; ")
    }
}

/// A server or proxy started in a namespace (`ip netns exec NS PROGRAM ...`, which execs the
/// program: the child is the server itself), stopped when dropped. Servers run in the
/// foreground (nginx `daemon off`, HAProxy `-db`), most as one process (nginx
/// `master_process off`); an nginx master with workers is stopped with SIGTERM first, so
/// that it stops its workers (they do not die with it).
pub struct Daemon {
    what: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    pub fn start(
        what: &str,
        ns: &Netns,
        argv: &[&str],
        log: PathBuf,
        cpu: Option<usize>,
    ) -> Result<Self> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", ns.name()])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // Killed with the bench even when it cannot run its drops (a signal): the server
        // must not outlive its namespace's name. `ip netns exec` and the server keep it
        // (exec keeps the parent-death signal of a program that is not set-user-ID).
        // SAFETY: prctl is async-signal-safe, and the closure touches nothing else.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = on_cpu(cpu, || command.spawn())
            .with_context(|| format!("starting {what}: ip netns exec {} {argv:?}", ns.name()))?;
        Ok(Self {
            what: what.to_string(),
            child,
            log,
        })
    }

    /// An error when the process has exited, with what it wrote.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            bail!("{} exited ({status}): {}", self.what, log.trim());
        }
        Ok(())
    }

    /// The server's pid (the nginx master, when it has workers).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `addr` accepts connections in `ns` (the server listens).
    pub fn wait_listening(&mut self, ns: &Netns, addr: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.ensure_running()?;
            let connected =
                ns.run(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)));
            match connected {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                    bail!(
                        "{} does not listen on {addr}: {e} ({})",
                        self.what,
                        log.trim()
                    );
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // SAFETY: kill has no memory preconditions; the pid is our unreaped child's.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(3);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The HTTPS side of a backend (the TLS section's): a port serving the same answers with
/// this certificate, and worker processes under a master, as a TLS server is run: one
/// process's CPU would be the limit of every TLS target.
pub struct BackendHttps<'a> {
    pub port: u16,
    pub cert: &'a Path,
    pub key: &'a Path,
    pub workers: usize,
}

/// nginx's http temporary folders, under `dir` (its defaults may not exist or be writable).
pub fn nginx_temp_paths(dir: &Path, stem: &str) -> String {
    let d = dir.display();
    ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
        .map(|kind| {
            let folder = if kind == "client_body" { "body" } else { kind };
            format!("  {kind}_temp_path {d}/{stem}.{folder};\n")
        })
        .concat()
}

/// nginx as a backend: `GET /` answers 200 with the backend's name, keep-alive without a
/// request limit. One process, as the proxies, unless it also serves `https`; then
/// `GET /status` is its `stub_status` (connections accepted: how many a balancer opened).
pub fn backend_nginx_conf(dir: &Path, i: u8, https: Option<&BackendHttps>) -> String {
    let d = dir.display();
    let addr = backend_addr(i);
    let temp = nginx_temp_paths(dir, &format!("be{i}"));
    let (processes, tls) = match https {
        None => (
            "master_process off;\nworker_processes 1;".to_string(),
            String::new(),
        ),
        Some(h) => (
            format!("master_process on;\nworker_processes {};", h.workers),
            format!(
                "    listen {addr}:{} ssl backlog=4096;\n    ssl_certificate {};\n    \
                 ssl_certificate_key {};\n    ssl_protocols TLSv1.2 TLSv1.3;\n    \
                 location = /status {{ stub_status; }}\n",
                h.port,
                h.cert.display(),
                h.key.display()
            ),
        ),
    };
    format!(
        r#"daemon off;
{processes}
worker_rlimit_nofile 16384;
pid {d}/be{i}.pid;
error_log {d}/be{i}.error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
{temp}  keepalive_requests 100000000;
  server {{
    listen {addr}:{BACKEND_HTTP_PORT} backlog=4096;
{tls}    default_type text/plain;
    location / {{ return 200 "backend-{i}\n"; }}
  }}
}}
"#
    )
}

/// `item(i, address)` for each backend, joined with `sep`.
fn backend_list(sep: &str, item: impl Fn(u8, SocketAddr) -> String) -> String {
    (1..=BACKENDS)
        .map(|i| item(i, (backend_addr(i), BACKEND_HTTP_PORT).into()))
        .collect::<Vec<_>>()
        .join(sep)
}

/// nginx as an L4 proxy: the stream module, round robin (its default) over the backends.
fn proxy_nginx_conf(dir: &Path, module: Option<&Path>) -> String {
    let d = dir.display();
    let load = module.map_or(String::new(), |m| format!("load_module {};\n", m.display()));
    let servers = backend_list("\n", |_, a| format!("    server {a};"));
    format!(
        r#"{load}daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {d}/proxy.pid;
error_log {d}/proxy.error.log warn;
events {{ worker_connections 8192; }}
stream {{
  upstream backends {{
{servers}
  }}
  server {{
    listen {NGINX_VIP}:{VIP_PORT} backlog=4096;
    proxy_pass backends;
  }}
}}
"#
    )
}

/// HAProxy: `mode tcp`, round robin, no health checks, one thread.
fn haproxy_conf() -> String {
    let servers = backend_list("\n", |i, a| format!("  server backend-{i} {a}"));
    format!(
        r#"global
  nbthread 1
  maxconn 4096
defaults
  mode tcp
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend bench
  bind {HAPROXY_VIP}:{VIP_PORT}
  default_backend backends
backend backends
  balance roundrobin
{servers}
"#
    )
}

/// lb's connection table: both directions of each connection, room for all of a run's
/// connections (5 s at 30k connections/s).
pub const LB_MAX_CONNECTIONS: u32 = 1 << 20;

/// lb's configuration: one service, the VIP to the four backends.
fn lb_config() -> String {
    let backends = backend_list("", |_, a| {
        format!("      - {{ address: {}, port: {} }}\n", a.ip(), a.port())
    });
    format!(
        "dataplane:\n  max_connections: {LB_MAX_CONNECTIONS}\nservices:\n  - name: web\n    vip: {LB_VIP}\n    port: {VIP_PORT}\n    backends:\n{backends}"
    )
}

/// kube-proxy's iptables mode for one ClusterIP service (its rule shapes, without the
/// masquerade marks: like lb, no SNAT, the backends route back through the node).
fn iptables_rules() -> String {
    let n = BACKENDS as usize;
    let mut r = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-BENCHWEB - [0:0]\n");
    for i in 1..=BACKENDS {
        let _ = writeln!(r, ":KUBE-SEP-BENCHWEB{i} - [0:0]");
    }
    let _ = writeln!(
        r,
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
    );
    let _ = writeln!(
        r,
        "-A KUBE-SERVICES -d {IPTABLES_VIP}/32 -p tcp -m comment --comment \"bench/web cluster IP\" -m tcp --dport {VIP_PORT} -j KUBE-SVC-BENCHWEB"
    );
    for (k, i) in (1..=BACKENDS).enumerate() {
        let a = backend_addr(i);
        let comment = format!("-m comment --comment \"bench/web -> {a}:{BACKEND_HTTP_PORT}\"");
        if k + 1 < n {
            let p = 1.0 / (n - k) as f64;
            let _ = writeln!(
                r,
                "-A KUBE-SVC-BENCHWEB {comment} -m statistic --mode random --probability {p:.11} -j KUBE-SEP-BENCHWEB{i}"
            );
        } else {
            let _ = writeln!(r, "-A KUBE-SVC-BENCHWEB {comment} -j KUBE-SEP-BENCHWEB{i}");
        }
    }
    for i in 1..=BACKENDS {
        let a = backend_addr(i);
        let _ = writeln!(
            r,
            "-A KUBE-SEP-BENCHWEB{i} -p tcp -m comment --comment bench/web -m tcp -j DNAT --to-destination {a}:{BACKEND_HTTP_PORT}"
        );
    }
    r.push_str("COMMIT\n");
    r
}

/// The table of kube-proxy's nftables mode (its name there too).
const NFT_TABLE: &str = "kube-proxy";

/// kube-proxy's nftables mode for one ClusterIP service: the service map, the service's
/// chain choosing an endpoint at random, the endpoints' DNAT chains (without the
/// masquerade marks, as for iptables).
fn nftables_rules() -> String {
    let vmap = (1..=BACKENDS)
        .map(|i| format!("{} : goto endpoint-{i}", i - 1))
        .collect::<Vec<_>>()
        .join(", ");
    let endpoints = backend_list("\n", |i, a| {
        format!("  chain endpoint-{i} {{\n    meta l4proto tcp dnat to {a}\n  }}")
    });
    format!(
        r#"table ip {NFT_TABLE} {{
  map service-ips {{
    type ipv4_addr . inet_proto . inet_service : verdict
    elements = {{ {NFTABLES_VIP} . tcp . {VIP_PORT} : goto service-bench-web }}
  }}
  chain nat-prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    jump services
  }}
  chain services {{
    ip daddr . meta l4proto . th dport vmap @service-ips
  }}
  chain service-bench-web {{
    numgen random mod {BACKENDS} vmap {{ {vmap} }}
  }}
{endpoints}
}}
"#
    )
}

/// NAT rules loaded in the node only while their target is measured.
///
/// Why not leave them in place: a NAT table in the node's namespace turns on connection
/// tracking there for every packet, also for the other targets' (they would pay for it),
/// and the new-connection runs fill the conntrack table with tens of thousands of
/// TIME_WAIT entries (kept 120 s): a full table drops new connections and a large one
/// slows every later run. So on drop the rules go, the whole NAT table with them (an empty
/// NAT table would still keep conntrack on), and the node's conntrack table is flushed
/// (`conntrack -F`), so each run starts from an empty one.
struct NatRules {
    node: String,
    kind: Target,
    tools_iptables: PathBuf,
    tools_nft: PathBuf,
    conntrack: PathBuf,
}

impl NatRules {
    fn load(node: &Netns, kind: Target, tools: &Tools, dir: &Path) -> Result<Self> {
        // The guard first: a half-loaded rule set is removed too.
        let rules = Self {
            node: node.name().to_string(),
            kind,
            tools_iptables: tools.iptables.clone(),
            tools_nft: tools.nft.clone(),
            conntrack: tools.conntrack.clone(),
        };
        let file = dir.join(format!("{}.rules", kind.name()));
        match kind {
            Target::Iptables => {
                write_atomically(&file, &iptables_rules())?;
                node.exec(&[
                    &tools.iptables_restore.display().to_string(),
                    &file.display().to_string(),
                ])
                .context("loading kube-proxy's iptables rules in the node")?;
            }
            Target::Nftables => {
                write_atomically(&file, &nftables_rules())?;
                node.exec(&[
                    &tools.nft.display().to_string(),
                    "-f",
                    &file.display().to_string(),
                ])
                .context("loading kube-proxy's nftables rules in the node")?;
            }
            _ => bail!("{} has no NAT rules", kind.name()),
        }
        Ok(rules)
    }

    fn exec(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", self.node.as_str()];
        full.extend_from_slice(args);
        run_command("ip", &full)
    }

    fn remove(&self) -> Result<()> {
        let nft = self.tools_nft.display().to_string();
        match self.kind {
            Target::Iptables => {
                let iptables = self.tools_iptables.display().to_string();
                self.exec(&[&iptables, "-t", "nat", "-F"])?;
                self.exec(&[&iptables, "-t", "nat", "-X"])?;
                // iptables-nft leaves the (now empty) table with its base chains, which
                // keep conntrack on: delete it. Legacy iptables cannot remove its table.
                let tables = self.exec(&[&nft, "list", "tables"]).unwrap_or_default();
                if tables.lines().any(|l| l.trim() == "table ip nat") {
                    self.exec(&[&nft, "delete", "table", "ip", "nat"])?;
                }
            }
            _ => {
                self.exec(&[&nft, "delete", "table", "ip", NFT_TABLE])?;
            }
        }
        self.exec(&[&self.conntrack.display().to_string(), "-F"])?;
        Ok(())
    }
}

impl Drop for NatRules {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!(
                "lb-bench: removing the {} rules from netns {}: {e:#}",
                self.kind.name(),
                self.node
            );
        }
    }
}

/// Whatever a target needs while it is measured; dropped after its runs.
enum Active {
    Nothing,
    Agent(Box<AgentProcess>),
    /// Removed on drop.
    Rules {
        _rules: NatRules,
    },
}

/// The test bed, its servers and the proxies; dropped in field order: processes first,
/// the namespaces last.
struct Bench {
    proxies: Vec<Daemon>,
    backends: Vec<Daemon>,
    dir: TempDir,
    bed: TestBed,
    tools: Tools,
    pin: bool,
}

impl Bench {
    fn client_cpu(&self) -> Option<usize> {
        self.pin.then_some(CLIENT_CPU)
    }

    fn server_cpu(&self) -> Option<usize> {
        self.pin.then_some(SERVER_CPU)
    }

    fn setup(tools: Tools, pin: bool) -> Result<Self> {
        let server_cpu = pin.then_some(SERVER_CPU);
        let names: Vec<String> = (1..=BACKENDS).map(|i| format!("backend-{i}")).collect();
        // The harness's own servers start on the server CPU too. Their HTTP servers (a
        // thread per connection) give way to nginx on the same port.
        let mut bed = on_cpu(server_cpu, || {
            TestBed::with_backends(AttachMode::Tc, &names)
        })?;
        for b in &mut bed.backends {
            b.http.stop();
        }
        let mut bench = Bench {
            proxies: Vec::new(),
            backends: Vec::new(),
            dir: TempDir::new("lbe2e")?,
            bed,
            tools,
            pin,
        };
        // Many short connections: every port the client may use, and a port in TIME_WAIT
        // (the server closes first, so rarely) may be reused.
        for ns in [&bench.bed.client, &bench.bed.node] {
            ns.set_sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
            ns.set_sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        }
        let d = bench.dir.0.clone();
        let nginx = bench.tools.nginx.display().to_string();
        for i in 1..=BACKENDS {
            let conf = d.join(format!("be{i}.conf"));
            write_atomically(&conf, &backend_nginx_conf(&d, i, None))?;
            let ns = &bench.bed.backends[usize::from(i) - 1].ns;
            // No TIME_WAIT in the backends. The server closes first, so each connection
            // leaves one there, keyed by the client's address and port; a later connection
            // from the same port (64k ports, tens of thousands of connections a run) meets
            // it. The client's TCP timestamps are offset per destination address, and
            // every target has its own: against a TIME_WAIT left by another target the
            // new SYN's timestamp is older half of the time, the backend refuses it (PAWS)
            // and the client waits 1 s to send it again. Which targets that hits depends
            // on their addresses' hashes, not on the balancer.
            ns.set_sysctl("net.ipv4.tcp_max_tw_buckets", "0")?;
            let prefix = d.display().to_string();
            let conf = conf.display().to_string();
            let early_log = d.join(format!("be{i}.early.log")).display().to_string();
            let mut daemon = Daemon::start(
                &format!("nginx (backend {i})"),
                ns,
                &[&nginx, "-p", &prefix, "-e", &early_log, "-c", &conf],
                d.join(format!("be{i}.out")),
                server_cpu,
            )?;
            daemon.wait_listening(ns, (backend_addr(i), BACKEND_HTTP_PORT).into())?;
            bench.backends.push(daemon);
        }

        let node = &bench.bed.node;
        for vip in [HAPROXY_VIP, NGINX_VIP] {
            node.ip(&["addr", "add", &format!("{vip}/32"), "dev", "lo"])?;
        }
        let haproxy_cfg = d.join("haproxy.cfg");
        write_atomically(&haproxy_cfg, &haproxy_conf())?;
        let mut haproxy = Daemon::start(
            "HAProxy",
            node,
            &[
                &bench.tools.haproxy.display().to_string(),
                "-db",
                "-f",
                &haproxy_cfg.display().to_string(),
            ],
            d.join("haproxy.out"),
            server_cpu,
        )?;
        haproxy.wait_listening(node, Target::Haproxy.addr())?;
        bench.proxies.push(haproxy);

        let proxy_conf = d.join("proxy.conf");
        write_atomically(
            &proxy_conf,
            &proxy_nginx_conf(&d, bench.tools.stream_module.as_deref()),
        )?;
        let mut proxy = Daemon::start(
            "nginx (stream proxy)",
            node,
            &[
                &nginx,
                "-p",
                &d.display().to_string(),
                "-e",
                &d.join("proxy.early.log").display().to_string(),
                "-c",
                &proxy_conf.display().to_string(),
            ],
            d.join("proxy.out"),
            server_cpu,
        )?;
        proxy.wait_listening(node, Target::Nginx.addr())?;
        bench.proxies.push(proxy);
        Ok(bench)
    }

    /// Sets `target` up and waits until it answers a request with 200.
    fn activate(&mut self, target: Target) -> Result<Active> {
        for d in self.backends.iter_mut().chain(&mut self.proxies) {
            d.ensure_running()?;
        }
        let active = match target {
            Target::Direct | Target::DirectSpread | Target::Haproxy | Target::Nginx => {
                Active::Nothing
            }
            Target::LbTc | Target::LbXdp => {
                let config = self.dir.0.join("lb.yaml");
                write_atomically(&config, &lb_config())?;
                let mode = if target == Target::LbXdp {
                    AttachMode::Xdp
                } else {
                    AttachMode::Tc
                };
                // The client-facing interface is the bed's first.
                self.bed.interfaces[0].mode = mode;
                let started = on_cpu(self.server_cpu(), || {
                    AgentProcess::start(&self.bed, &config)
                });
                self.bed.interfaces[0].mode = AttachMode::Tc;
                Active::Agent(Box::new(started?))
            }
            Target::Iptables | Target::Nftables => Active::Rules {
                _rules: NatRules::load(&self.bed.node, target, &self.tools, &self.dir.0)?,
            },
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut active = active;
        loop {
            let answer = self.bed.client.run(|| {
                target
                    .addrs()
                    .into_iter()
                    .try_for_each(|a| loadgen::check(a, Duration::from_millis(200)))
            });
            match answer {
                Ok(()) => return Ok(active),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!(
                        "{} does not answer the client within {} s",
                        target.name(),
                        READY_TIMEOUT.as_secs()
                    )))
                }
                Err(_) => {}
            }
            if let Active::Agent(agent) = &mut active {
                anyhow::ensure!(agent.running(), "{}: the lb agent exited", target.name());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One measured run of `target` (set up) in `mode`.
    fn measure(&self, target: Target, mode: LoadMode, opts: &Options) -> Result<RunFigures> {
        let duration = Duration::from_secs_f64(opts.secs.max(0.1));
        match mode {
            LoadMode::KeepAlive => loadgen::wrk(
                &self.tools.wrk,
                &self.bed.client,
                "http",
                &target.addrs(),
                opts.concurrency,
                duration,
                self.client_cpu(),
            ),
            LoadMode::NewConnection => loadgen::new_connections(
                &self.bed.client,
                &target.addrs(),
                opts.concurrency,
                duration,
                self.client_cpu(),
            ),
        }
    }
}

/// Whether IPVS (kube-proxy's ipvs mode) can be measured here, in words.
fn ipvs_status() -> String {
    if Path::new("/proc/net/ip_vs").exists() {
        return "IPVS is present in this kernel but not measured (no target for it yet)".into();
    }
    let modprobe = match run_command("modprobe", &["ip_vs"]) {
        Ok(_) if Path::new("/proc/net/ip_vs").exists() => {
            return "IPVS was loaded (`modprobe ip_vs`) but is not measured (no target for it yet)"
                .into()
        }
        Ok(_) => "`modprobe ip_vs` succeeded but /proc/net/ip_vs is still absent".to_string(),
        Err(e) => format!("{e:#}"),
    };
    let config = run_command("zcat", &["/proc/config.gz"])
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("CONFIG_IP_VS=") || l.starts_with("# CONFIG_IP_VS is"))
                .map(|l| format!("; /proc/config.gz: `{l}`"))
        })
        .unwrap_or_default();
    format!("IPVS not measured: not in this kernel (/proc/net/ip_vs absent; {modprobe}{config})")
}

/// Median (mean of the two middle values for an even count). `v` must not be empty.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        })
}

/// Per-round ratios of `a`'s requests/s to `b`'s (same round, same mode).
pub fn ratios(a: &[RunFigures], b: &[RunFigures]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(a, b)| {
            if b.requests_per_s > 0.0 {
                a.requests_per_s / b.requests_per_s
            } else {
                f64::NAN
            }
        })
        .collect()
}

/// `0.93 (0.90–0.95)`, with ` within noise` when the range straddles 1.
pub fn ratio_cell(r: &[f64], flag_noise: bool) -> String {
    let (lo, hi) = min_max(r);
    let noise = if flag_noise && lo <= 1.0 && hi >= 1.0 {
        ", within noise"
    } else {
        ""
    };
    format!("{:.2} ({lo:.2}–{hi:.2}){noise}", median(r))
}

/// The 1-minute load average (`/proc/loadavg`).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

pub fn machine_line(tools: &Tools, pin: bool) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    format!(
        "machine: {cores} cores ({cpu}), kernel {}{}; {}",
        kernel.trim(),
        if pin {
            ""
        } else {
            ", load generator and servers not pinned (fewer than 2 CPUs)"
        },
        tools.versions()
    )
}

/// lb's counters that a clean run leaves at zero (drops, and events other than tracking
/// new connections), from `lb stats -o json` on the agent's pins, as `name=value`.
fn unusual_counters(node: &str, pin_dir: &Path) -> Result<String> {
    let output = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{node}"))
        .arg("--")
        .arg(lb_binary()?)
        .args(["stats", "-o", "json", "--pin-dir"])
        .arg(pin_dir)
        .output()
        .context("running lb stats")?;
    anyhow::ensure!(
        output.status.success(),
        "lb stats: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stats: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("reading lb stats -o json")?;
    let counters = stats["counters"]
        .as_array()
        .context("lb stats -o json has no counters")?;
    let mut unusual = Vec::new();
    for c in counters {
        let (Some(name), Some(value)) = (c["name"].as_str(), c["value"].as_u64()) else {
            continue;
        };
        let usual =
            !(name.starts_with("drop_") || name.starts_with("event_")) || name == "event_tracked";
        if !usual && value > 0 {
            unusual.push(format!("{name}={value}"));
        }
    }
    Ok(unusual.join(" "))
}

/// Measures every target in both modes; returns the markdown and the figures.
pub fn run(opts: &Options) -> Result<(String, Vec<TargetFigures>)> {
    let started = Instant::now();
    let rounds = opts.rounds.max(1);
    let tools = Tools::find()?;
    let lb = lb_binary().context("the end-to-end measurements run the agent")?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pin = cores >= 2;
    let load_before = load_average();
    let mut bench = Bench::setup(tools, pin)?;

    let mut targets = vec![Target::Direct, Target::DirectSpread, Target::LbTc];
    if opts.xdp {
        targets.push(Target::LbXdp);
    }
    targets.extend([
        Target::Iptables,
        Target::Nftables,
        Target::Haproxy,
        Target::Nginx,
    ]);

    // Every target answers before anything is measured; doubles as a warm-up of the
    // neighbour tables and the servers.
    for &target in &targets {
        let active = bench
            .activate(target)
            .with_context(|| format!("checking target {} ({})", target.name(), target.addr()))?;
        drop(active);
    }
    // With the NAT rules gone, the node tracks no connections (the other targets run
    // without conntrack, as they would on a node without kube-proxy).
    bench
        .bed
        .client
        .run(|| loadgen::check(Target::Direct.addr(), Duration::from_secs(3)))?;
    let tracked = bench
        .bed
        .node
        .sysctl("net.netfilter.nf_conntrack_count")
        .unwrap_or_else(|_| "?".into());
    let setup_secs = started.elapsed().as_secs_f64();

    let modes = [LoadMode::KeepAlive, LoadMode::NewConnection];
    let mut figures: BTreeMap<(Target, LoadMode), Vec<RunFigures>> = BTreeMap::new();
    // Time spent setting targets up and removing them in the rounds (agent starts and
    // stops, rules loaded and removed, readiness checks).
    let mut switching = Duration::ZERO;
    for round in 0..rounds {
        let mut order = targets.clone();
        order.rotate_left(round % targets.len());
        let mut mode_order = modes;
        if round % 2 == 1 {
            mode_order.reverse();
        }
        for &target in &order {
            let t = Instant::now();
            let active = bench
                .activate(target)
                .with_context(|| format!("round {}: setting up {}", round + 1, target.name()))?;
            switching += t.elapsed();
            for &mode in &mode_order {
                if !target.measured_in(mode) {
                    continue;
                }
                let f = bench.measure(target, mode, opts).with_context(|| {
                    format!(
                        "round {}: measuring {} ({})",
                        round + 1,
                        target.name(),
                        mode.label()
                    )
                })?;
                println!(
                    "  round {}/{rounds}: {:<8} {:<26} {:>9.0} requests/s, p50 {:>7.0} µs, p99 {:>7.0} µs, {} errors",
                    round + 1,
                    target.name(),
                    mode.label(),
                    f.requests_per_s,
                    f.p50_us,
                    f.p99_us,
                    f.errors
                );
                figures.entry((target, mode)).or_default().push(f);
            }
            if let Active::Agent(agent) = &active {
                // What lb's data plane saw, beyond the usual verdicts: a failed request
                // through lb is explained there if anywhere.
                match unusual_counters(bench.bed.node.name(), &agent.pin_dir) {
                    Ok(c) if c.is_empty() => {}
                    Ok(c) => println!("    {} data-plane counters: {c}", target.name()),
                    Err(e) => println!("    {}: reading lb stats: {e:#}", target.name()),
                }
            }
            let t = Instant::now();
            drop(active);
            switching += t.elapsed();
        }
    }
    let machine = machine_line(&bench.tools, pin);
    drop(bench);

    let mut md = String::new();
    emit!(md, "");
    emit!(md, "{machine}");
    emit!(
        md,
        "load average (1 min) before: {load_before}, after: {} (anything else running on the \
         machine shares its two CPUs with the measurement)",
        load_average()
    );
    emit!(md, "");
    emit!(
        md,
        "layout: client namespace → node namespace (routes; the target) → {BACKENDS} backend \
         namespaces, each nginx (1 process, `return 200`, keep-alive unlimited, no TIME_WAIT \
         kept: `tcp_max_tw_buckets` 0) on 10.200.i.2:{BACKEND_HTTP_PORT}; veth pairs with \
         transmit checksum offload off (as the test bed makes them). {}. Keep-alive: \
         `wrk -t1 -c{c} -d{s}s`; new connection per request: the bench's generator, {c} \
         threads (spread evenly over the addresses of `direct ×4`), each connect, `GET /` with `Connection: close`, read to EOF (handshake \
         included in the latency). Rounds: {rounds}, of {secs} s per target and mode, the \
         target order rotated each round. Agent: {}.",
        if pin {
            "The load generator is pinned to CPU 0; backends, proxies and the lb agent to \
             CPU 1 (the kernel's packet processing runs on the CPU that sends: it is shared)"
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
    emit!(md, "");
    emit!(md, "{}", ipvs_status());

    for mode in modes {
        let direct = &figures[&(Target::Direct, mode)];
        let spread = figures.get(&(Target::DirectSpread, mode));
        emit!(md, "");
        emit!(md, "end to end, {} (rounds: {rounds})", mode.label());
        emit!(md, "");
        emit!(
            md,
            "| target | requests/s (median) | min–max over rounds | vs direct | vs direct ×4 | p50 µs | p99 µs | errors |"
        );
        emit!(
            md,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for &target in &targets {
            let Some(runs) = figures.get(&(target, mode)) else {
                continue;
            };
            let rps: Vec<f64> = runs.iter().map(|f| f.requests_per_s).collect();
            let (lo, hi) = min_max(&rps);
            let vs = if target == Target::Direct {
                "1".to_string()
            } else {
                ratio_cell(&ratios(runs, direct), false)
            };
            let vs_spread = match spread {
                _ if target == Target::DirectSpread => "1".to_string(),
                Some(spread) => ratio_cell(&ratios(runs, spread), false),
                None => "—".to_string(),
            };
            let p50 = median(&runs.iter().map(|f| f.p50_us).collect::<Vec<_>>());
            let p99 = median(&runs.iter().map(|f| f.p99_us).collect::<Vec<_>>());
            let errors: u64 = runs.iter().map(|f| f.errors).sum();
            let requests: u64 = runs.iter().map(|f| f.requests).sum();
            emit!(
                md,
                "| {} | {:.0} | {lo:.0}–{hi:.0} | {vs} | {vs_spread} | {p50:.0} | {p99:.0} | {} |",
                target.name(),
                median(&rps),
                if errors == 0 {
                    "0".to_string()
                } else {
                    format!("{errors} of {}", errors + requests)
                }
            );
        }
    }

    let lbs: Vec<Target> = targets
        .iter()
        .copied()
        .filter(|t| matches!(t, Target::LbTc | Target::LbXdp))
        .collect();
    let peers = [
        Target::Iptables,
        Target::Nftables,
        Target::Haproxy,
        Target::Nginx,
    ];
    emit!(md, "");
    emit!(
        md,
        "lb's requests/s over each peer's, per round (median, min–max):"
    );
    emit!(md, "");
    emit!(
        md,
        "| ratio | {} | {} |",
        modes[0].label(),
        modes[1].label()
    );
    emit!(md, "| --- | ---: | ---: |");
    let mut pairs: Vec<(Target, Target)> = lbs
        .iter()
        .flat_map(|&l| peers.iter().map(move |&p| (l, p)))
        .collect();
    if lbs.len() == 2 {
        pairs.push((Target::LbXdp, Target::LbTc));
    }
    for (a, b) in pairs {
        let cells: Vec<String> = modes
            .iter()
            .map(|&m| ratio_cell(&ratios(&figures[&(a, m)], &figures[&(b, m)]), true))
            .collect();
        emit!(
            md,
            "| {} / {} | {} | {} |",
            a.name(),
            b.name(),
            cells[0],
            cells[1]
        );
    }
    emit!(md, "");
    emit!(
        md,
        "requests/s: completed requests (200) per second of one run, median over the rounds \
         (mean of the middle two for an even count), and the slowest and fastest round. \
         vs direct: the target's requests/s over `direct`'s in the same round and mode, \
         median (min–max) over rounds (`direct` is one backend: the path's limit); vs \
         direct ×4: the same over `direct ×4` (the four backends called directly, spread \
         evenly: the same backends' work as behind a balancer; new connections only), \
         where 1 would be a balancer that costs nothing. p50/p99: \
         the run's latency percentiles (wrk's for keep-alive; connect to the last byte for \
         new connections), median over rounds. errors: failed requests (connect error, \
         reset, timeout, non-200) over all rounds. The ratio table is lb's requests/s over \
         the peer's, per round; \"within noise\" when the rounds' range includes 1 (the \
         order changes from round to round). Each round sets lb (agent start) and the NAT \
         rules up for its own runs and removes them after (conntrack flushed), so every \
         target but its own runs without them; the node tracked {tracked} connections \
         between targets.{}",
        if rounds < 5 {
            format!(
                " Only {rounds} round(s): a range of so few runs understates the noise, so \
                 read the ratios as a hint (5 rounds may call the same difference noise)."
            )
        } else {
            String::new()
        }
    );
    emit!(md, "");
    emit!(
        md,
        "end to end measured in {:.1} s ({setup_secs:.1} s of setup and checks, {:.1} s \
         setting targets up and down in the rounds)",
        started.elapsed().as_secs_f64(),
        switching.as_secs_f64()
    );

    let results = targets
        .iter()
        .flat_map(|&t| modes.map(|m| (t, m)))
        .map(|(t, m)| TargetFigures {
            target: t.name().to_string(),
            mode: m,
            rounds: figures.remove(&(t, m)).unwrap_or_default(),
        })
        .collect();
    Ok((md, results))
}
