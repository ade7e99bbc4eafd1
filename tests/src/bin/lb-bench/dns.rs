//! External services' DNS side: the agent's DNS responder (`lb agent --dns-listen`)
//! beside dnsmasq, and the agent resolving endpoint names whose answers keep changing.
//!
//! Everything runs in one node namespace, on its loopback:
//!
//! - an upstream DNS server of the bench's own (`lb_tests::dns_server`) holds the names
//!   neither server owns; lb and dnsmasq both forward to it and cache its answers;
//! - `lb agent --dns-listen` owns the hosts of N ServiceEntries; dnsmasq (`--addn-hosts`)
//!   owns the same names with the same addresses and the same TTL (30 s);
//! - the load: one thread, `concurrency` queries in flight (one UDP socket each, closed
//!   loop: the next query when the answer came), A queries over the N names in turn.
//!   Measured in interleaved rounds (every server and name set once per round, the order
//!   alternating), after a pass over every name so that forwarded answers are cached:
//!   answers/s, latency quantiles over all rounds, queries lost (no answer within 1 s),
//!   and each server's CPU time per 1,000 answers.
//!
//! Resolution churn: the agent with N ServiceEntries of `resolution: DNS`, each endpoint
//! a name the upstream answers with a 1 s TTL (`--dns-min-ttl 1`): a steady phase (the
//! answers stay; every name is still looked up every second), then a churn phase (every
//! answer changes every second). The agent's CPU and memory in each, and its own counts
//! of lookups and applied answer changes (`/metrics`).

use std::{
    ffi::OsString,
    net::{Ipv4Addr, SocketAddr},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use hickory_proto::{
    op::{Message, Query},
    rr::{Name, RecordType},
};
use lb_tests::{agent_process::TempDir, dns_server::TestDnsServer, Netns};

use crate::agent::{cpu_time, AgentGuard, ADMIN};

pub struct Options {
    /// Interleaved rounds of the responder comparison.
    pub rounds: usize,
    /// Seconds of each measured run.
    pub secs: f64,
    /// Queries in flight.
    pub concurrency: usize,
    /// Hosts owned, names forwarded, names resolved under churn (each).
    pub hosts: usize,
    /// Seconds of each churn phase.
    pub churn_secs: f64,
}

/// The agent's DNS responder, dnsmasq, the upstream: on loopback.
const LB_DNS: &str = "127.0.0.2:53";
const DNSMASQ: &str = "127.0.0.3:53";
const UPSTREAM: &str = "127.0.0.53:0";
/// The TTL both servers give the names they own.
const OWN_TTL: u32 = 30;
/// A query without an answer after this long is lost.
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);
const READY_TIMEOUT: Duration = Duration::from_secs(60);

fn owned_name(i: usize) -> String {
    format!("svc{i}.bench.internal")
}

fn forwarded_name(i: usize) -> String {
    format!("ext{i}.upstream.internal")
}

fn origin_name(i: usize) -> String {
    format!("origin{i}.churn.internal")
}

/// The i-th VIP, in 10.96.0.0/16 (the churn's in 10.97.0.0/16).
fn vip(base: u8, i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, base, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// The address the upstream gives a forwarded name, or an origin name in phase `flip`.
fn upstream_address(i: usize, flip: usize) -> Ipv4Addr {
    Ipv4Addr::new(
        10,
        201 + (flip % 2) as u8,
        (i / 250) as u8,
        (i % 250 + 1) as u8,
    )
}

/// One ServiceEntry per owned host, with a VIP and one endpoint by address.
fn responder_config(hosts: usize) -> String {
    (0..hosts)
        .map(|i| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{ name: \
                 svc{i} }}\nspec:\n  hosts: [{}]\n  addresses: [{}]\n  ports: [{{ number: 80, \
                 name: http, protocol: HTTP }}]\n  resolution: STATIC\n  endpoints: [{{ \
                 address: {} }}]\n",
                owned_name(i),
                vip(96, i),
                upstream_address(i, 0)
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// One ServiceEntry per churned name: `resolution: DNS`, its endpoint known by name.
fn churn_config(hosts: usize) -> String {
    (0..hosts)
        .map(|i| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{ name: \
                 churn{i} }}\nspec:\n  hosts: [churn{i}.bench.internal]\n  addresses: [{}]\n  \
                 ports: [{{ number: 80, name: http, protocol: HTTP }}]\n  resolution: DNS\n  \
                 endpoints: [{{ address: {} }}]\n",
                vip(97, i),
                origin_name(i)
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The data plane's sizes: room for the hosts and the backends an answer change moves.
fn node_config(hosts: usize) -> String {
    format!(
        "apiVersion: lb/v1alpha1\nkind: Node\nspec:\n  dataplane:\n    max_services: {}\n    \
         max_backends: {}\n",
        (hosts + 64).next_power_of_two(),
        (4 * hosts + 64).next_power_of_two()
    )
}

/// An A query for each name, encoded (ID 0; each sent copy gets its own).
fn queries(names: impl Iterator<Item = String>) -> Result<Vec<Vec<u8>>> {
    names
        .map(|name| {
            let mut m = Message::new();
            m.set_recursion_desired(true);
            m.add_query(Query::query(Name::from_ascii(&name)?, RecordType::A));
            Ok(m.to_vec()?)
        })
        .collect()
}

/// What one load run saw.
#[derive(Default)]
struct Run {
    answered: u64,
    /// Answers without an address (a server error, or a name not found).
    failed: u64,
    /// Queries with no answer within [`QUERY_TIMEOUT`].
    lost: u64,
    /// Each answer's latency, µs.
    latencies: Vec<u32>,
    secs: f64,
}

/// Sends `queries` (round robin) to `target` from `concurrency` sockets, each with one
/// query in flight, for `secs`; run from a thread in the servers' namespace.
fn load(target: SocketAddr, queries: &[Vec<u8>], concurrency: usize, secs: f64) -> Result<Run> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let queries = Arc::new(queries.to_vec());
        let started = Instant::now();
        let deadline = started + Duration::from_secs_f64(secs);
        let mut tasks = Vec::new();
        for task in 0..concurrency {
            let queries = queries.clone();
            tasks.push(tokio::spawn(async move {
                let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
                socket.connect(target).await?;
                let mut run = Run::default();
                let mut buf = [0u8; 1500];
                let mut n = task;
                let mut id = (task as u16).wrapping_mul(4099);
                while Instant::now() < deadline {
                    let mut query = queries[n % queries.len()].clone();
                    n += concurrency;
                    id = id.wrapping_add(1);
                    query[..2].copy_from_slice(&id.to_be_bytes());
                    let sent = Instant::now();
                    socket.send(&query).await?;
                    // Skips a late answer to an earlier, lost query.
                    let answer = tokio::time::timeout(QUERY_TIMEOUT, async {
                        loop {
                            let len = socket.recv(&mut buf).await?;
                            if len >= 12 && buf[..2] == id.to_be_bytes() {
                                return Ok::<_, std::io::Error>(len);
                            }
                        }
                    })
                    .await;
                    match answer {
                        Ok(Ok(_)) => {
                            let rcode = buf[3] & 0x0f;
                            let answers = u16::from_be_bytes([buf[6], buf[7]]);
                            if rcode == 0 && answers > 0 {
                                run.answered += 1;
                                run.latencies.push(sent.elapsed().as_micros() as u32);
                            } else {
                                run.failed += 1;
                            }
                        }
                        Ok(Err(e)) => return Err(anyhow::Error::from(e)),
                        Err(_) => run.lost += 1,
                    }
                }
                Ok::<_, anyhow::Error>(run)
            }));
        }
        let mut all = Run::default();
        for t in tasks {
            let run = t.await??;
            all.answered += run.answered;
            all.failed += run.failed;
            all.lost += run.lost;
            all.latencies.extend(run.latencies);
        }
        all.secs = started.elapsed().as_secs_f64();
        Ok(all)
    })
}

/// dnsmasq in the node namespace, owning the hosts in `hosts_file` and forwarding the
/// rest to `upstream`, caching; killed when dropped.
struct Dnsmasq(Child);

impl Dnsmasq {
    fn start(node: &Netns, hosts_file: &std::path::Path, upstream: SocketAddr) -> Result<Self> {
        let listen: SocketAddr = DNSMASQ.parse()?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", node.name()))
            .arg("--")
            .arg("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--pid-file=",
                "--user=root",
                "--group=root",
                "--bind-interfaces",
                &format!("--listen-address={}", listen.ip()),
                &format!("--port={}", listen.port()),
                &format!("--server={}#{}", upstream.ip(), upstream.port()),
                "--cache-size=10000",
                // As many forwarded queries in flight as lb's responder takes.
                &format!("--dns-forward-max={}", lb::dns_responder::IN_FLIGHT),
                &format!("--local-ttl={OWN_TTL}"),
            ])
            .arg(format!("--addn-hosts={}", hosts_file.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting dnsmasq (cargo xtask bench installs it; or pass --no-dns)")?;
        Ok(Self(child))
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `server` answers `name`.
fn wait_answering(server: SocketAddr, name: &str) -> Result<()> {
    let query = queries(std::iter::once(name.to_string()))?;
    let started = Instant::now();
    loop {
        if load(server, &query, 1, 0.001).is_ok_and(|r| r.answered > 0) {
            return Ok(());
        }
        ensure!(
            started.elapsed() < READY_TIMEOUT,
            "{server} does not answer {name} after {READY_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One server's figures over the rounds, for one name set.
#[derive(Default)]
struct Figures {
    rates: Vec<f64>,
    latencies: Vec<u32>,
    answered: u64,
    failed: u64,
    lost: u64,
    /// The server's CPU time over the measured runs.
    cpu: Duration,
}

impl Figures {
    fn add(&mut self, run: Run, cpu: Duration) {
        self.rates.push(run.answered as f64 / run.secs);
        self.latencies.extend(run.latencies);
        self.answered += run.answered;
        self.failed += run.failed;
        self.lost += run.lost;
        self.cpu += cpu;
    }

    fn quantile(&mut self, q: f64) -> Duration {
        self.latencies.sort_unstable();
        let Some(last) = self.latencies.len().checked_sub(1) else {
            return Duration::ZERO;
        };
        Duration::from_micros(self.latencies[(last as f64 * q).round() as usize] as u64)
    }

    fn median_rate(&self) -> f64 {
        crate::stats::median_f(self.rates.clone())
    }

    fn range(&self) -> (f64, f64) {
        let min = self.rates.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.rates.iter().copied().fold(0.0, f64::max);
        (min, max)
    }

    /// Server CPU per answer, µs.
    fn cpu_per_answer(&self) -> f64 {
        if self.answered == 0 {
            return 0.0;
        }
        self.cpu.as_secs_f64() * 1e6 / self.answered as f64
    }
}

fn us(d: Duration) -> String {
    format!("{} µs", d.as_micros())
}

/// The responder beside dnsmasq; returns its markdown.
fn responder(node: &Netns, iface: &str, upstream: &TestDnsServer, o: &Options) -> Result<String> {
    let mut md = String::new();
    let state = TempDir::new("lbdnsb")?;
    let config = state.0.join("config");
    std::fs::create_dir_all(&config)?;
    std::fs::write(config.join("node.yaml"), node_config(o.hosts))?;
    std::fs::write(config.join("hosts.yaml"), responder_config(o.hosts))?;
    let hosts_file = state.0.join("dnsmasq.hosts");
    std::fs::write(
        &hosts_file,
        (0..o.hosts)
            .map(|i| format!("{} {}\n", vip(96, i), owned_name(i)))
            .collect::<String>(),
    )?;
    let extra: Vec<OsString> = vec![
        "--dns-listen".into(),
        LB_DNS.into(),
        "--resolver".into(),
        upstream.addr().to_string().into(),
    ];
    let mut agent = AgentGuard::start(node, state, &config, iface, &extra, "warn")?;
    node.run(|| agent.wait_ready(READY_TIMEOUT))?;
    let dnsmasq = Dnsmasq::start(node, &hosts_file, upstream.addr())?;
    let servers: [(&str, SocketAddr, u32); 2] = [
        ("lb", LB_DNS.parse()?, agent.pid()),
        ("dnsmasq", DNSMASQ.parse()?, dnsmasq.pid()),
    ];
    let sets = [
        ("own", queries((0..o.hosts).map(owned_name))?),
        ("forwarded", queries((0..o.hosts).map(forwarded_name))?),
    ];
    for (name, addr, _) in servers {
        node.run(|| wait_answering(addr, &owned_name(0)))
            .with_context(|| format!("{name} on {addr}"))?;
        // Every forwarded name (at least) once: the measured runs read the servers'
        // caches.
        let warm = node.run(|| load(addr, &sets[1].1, 16, o.hosts as f64 / 1000.0 + 0.5))?;
        ensure!(
            warm.answered >= o.hosts as u64,
            "dns: {name} answered {} of the forwarded names while warming",
            warm.answered
        );
    }

    let mut figures: Vec<Vec<Figures>> = (0..sets.len())
        .map(|_| (0..servers.len()).map(|_| Figures::default()).collect())
        .collect();
    for round in 0..o.rounds {
        for (s, (set, queries)) in sets.iter().enumerate() {
            let mut order: Vec<usize> = (0..servers.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for t in order {
                let (name, addr, pid) = servers[t];
                let cpu_before = cpu_time(pid)?;
                let run = node.run(|| load(addr, queries, o.concurrency, o.secs))?;
                let cpu = cpu_time(pid)?.saturating_sub(cpu_before);
                println!(
                    "dns: round {} {set:<9} {name:<7} {:>8.0} answers/s, {} lost, {} failed",
                    round + 1,
                    run.answered as f64 / run.secs,
                    run.lost,
                    run.failed
                );
                figures[s][t].add(run, cpu);
            }
        }
        agent.check_running()?;
    }
    drop(dnsmasq);
    drop(agent);

    emit!(md, "");
    emit!(
        md,
        "DNS responder beside dnsmasq ({} hosts owned, {} names forwarded to an upstream of \
         the bench's own and cached; A queries over UDP from one thread, {} in flight; {} \
         rounds of {} s per server and name set, interleaved; latency over all rounds):",
        o.hosts,
        o.hosts,
        o.concurrency,
        o.rounds,
        o.secs
    );
    emit!(md, "");
    emit!(
        md,
        "| names | server | answers/s (median) | range over rounds | p50 | p99 | p99.9 | lost | \
         not answered | server CPU per answer |"
    );
    emit!(
        md,
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for (s, (set, _)) in sets.iter().enumerate() {
        for (t, (name, _, _)) in servers.iter().enumerate() {
            let f = &mut figures[s][t];
            let (min, max) = f.range();
            let (p50, p99, p999) = (f.quantile(0.5), f.quantile(0.99), f.quantile(0.999));
            emit!(
                md,
                "| {set} | {name} | {:.0} | {min:.0}–{max:.0} | {} | {} | {} | {} | {} | {:.1} µs |",
                f.median_rate(),
                us(p50),
                us(p99),
                us(p999),
                f.lost,
                f.failed,
                f.cpu_per_answer()
            );
        }
    }
    emit!(md, "");
    for (s, (set, _)) in sets.iter().enumerate() {
        let [lb, dnsmasq] = &mut figures[s][..] else {
            bail!("two servers");
        };
        emit!(
            md,
            "- {set} names: lb answers {:.2}× dnsmasq's rate, p99 {:.2}× dnsmasq's, CPU per \
             answer {:.2}× dnsmasq's",
            lb.median_rate() / dnsmasq.median_rate(),
            lb.quantile(0.99).as_secs_f64() / dnsmasq.quantile(0.99).as_secs_f64().max(1e-9),
            lb.cpu_per_answer() / dnsmasq.cpu_per_answer().max(1e-9)
        );
    }
    Ok(md)
}

/// A counter's value from `/metrics` text (the sum of its series when labelled).
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// What the agent did in one churn phase.
struct Phase {
    secs: f64,
    cpu: Duration,
    lookups: u64,
    failed_lookups: u64,
    changes: u64,
    rss_kb: u64,
}

fn phase(agent: &mut AgentGuard, node: &Netns, secs: f64) -> Result<Phase> {
    let admin: SocketAddr = ADMIN.parse()?;
    let metrics = || {
        node.run(|| lb_tests::http_get(admin, "/metrics", Duration::from_secs(10)))
            .context("GET /metrics")
    };
    let before = metrics()?;
    let cpu_before = agent.cpu_time()?;
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let cpu = agent.cpu_time()?.saturating_sub(cpu_before);
    let secs = started.elapsed().as_secs_f64();
    let after = metrics()?;
    agent.check_running()?;
    let delta = |name: &str| counter(&after, name).saturating_sub(counter(&before, name));
    let failed = |m: &str| {
        m.lines()
            .find_map(|l| {
                l.strip_prefix("lb_dns_lookups_total{result=\"failure\"} ")?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    Ok(Phase {
        secs,
        cpu,
        lookups: delta("lb_dns_lookups_total"),
        failed_lookups: failed(&after).saturating_sub(failed(&before)),
        changes: delta("lb_dns_answer_changes_total"),
        rss_kb: agent.status()?.rss,
    })
}

/// The agent resolving names whose answers change every second; returns its markdown.
fn churn(node: &Netns, iface: &str, upstream: &TestDnsServer, o: &Options) -> Result<String> {
    let mut md = String::new();
    for i in 0..o.hosts {
        upstream.set(&origin_name(i), &[upstream_address(i, 0)], 1);
    }
    let state = TempDir::new("lbdnsc")?;
    let config = state.0.join("config");
    std::fs::create_dir_all(&config)?;
    std::fs::write(config.join("node.yaml"), node_config(o.hosts))?;
    std::fs::write(config.join("churn.yaml"), churn_config(o.hosts))?;
    let extra: Vec<OsString> = vec![
        "--resolver".into(),
        upstream.addr().to_string().into(),
        "--dns-min-ttl".into(),
        "1".into(),
    ];
    let mut agent = AgentGuard::start(node, state, &config, iface, &extra, "warn")?;
    let ready = node.run(|| agent.wait_ready(READY_TIMEOUT))?;
    println!(
        "dns churn: agent ready in {:.2} s with {} names resolved",
        ready.as_secs_f64(),
        o.hosts
    );
    // Every name looked up at least once more before measuring.
    std::thread::sleep(Duration::from_secs(2));
    let steady = phase(&mut agent, node, o.churn_secs)?;

    // Every answer changes every second.
    let stop = AtomicBool::new(false);
    let churned = std::thread::scope(|scope| {
        let flipper = scope.spawn(|| {
            let mut flip = 1;
            while !stop.load(Ordering::Relaxed) {
                for i in 0..o.hosts {
                    upstream.set(&origin_name(i), &[upstream_address(i, flip)], 1);
                }
                flip += 1;
                let tick = Instant::now();
                while tick.elapsed() < Duration::from_secs(1) && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        let churned = phase(&mut agent, node, o.churn_secs);
        stop.store(true, Ordering::Relaxed);
        let _ = flipper.join();
        churned
    })?;
    drop(agent);

    emit!(md, "");
    emit!(
        md,
        "Resolution churn ({} ServiceEntries of `resolution: DNS`, one endpoint name each, \
         answered by the upstream with a 1 s TTL; `lb agent --dns-min-ttl 1`; {} s per phase):",
        o.hosts,
        o.churn_secs
    );
    emit!(md, "");
    emit!(
        md,
        "| phase | lookups/s | failed lookups | answer changes applied/s | agent CPU | agent RSS |"
    );
    emit!(md, "| --- | --- | --- | --- | --- | --- |");
    for (name, p) in [
        ("steady: answers unchanged", &steady),
        ("churn: every answer changes every second", &churned),
    ] {
        emit!(
            md,
            "| {name} | {:.0} | {} | {:.0} | {:.1}% of a core | {:.1} MiB |",
            p.lookups as f64 / p.secs,
            p.failed_lookups,
            p.changes as f64 / p.secs,
            100.0 * p.cpu.as_secs_f64() / p.secs,
            p.rss_kb as f64 / 1024.0
        );
    }
    let extra_cpu =
        churned.cpu.as_secs_f64() / churned.secs - steady.cpu.as_secs_f64() / steady.secs;
    // Within noise (a short run) the difference can come out below zero.
    let per_change = if churned.changes > 0 {
        (extra_cpu * churned.secs / churned.changes as f64).max(0.0)
    } else {
        0.0
    };
    emit!(md, "");
    emit!(
        md,
        "- an applied answer change costs the agent {:.0} µs of CPU beyond the lookup \
         itself (the churn phase's CPU over the steady one's, per change)",
        per_change * 1e6
    );
    Ok(md)
}

pub fn run(o: &Options) -> Result<String> {
    ensure!(
        o.hosts > 0 && o.hosts <= 250 * 250 && o.rounds > 0 && o.concurrency > 0,
        "dns: {} hosts, {} rounds, {} in flight",
        o.hosts,
        o.rounds,
        o.concurrency
    );
    let node = Netns::new("dnsb")?;
    let iface = lb_tests::add_dummy(&node, "lbd")?;
    let upstream = TestDnsServer::start(&node, UPSTREAM.parse()?)?;
    for i in 0..o.hosts {
        upstream.set(&forwarded_name(i), &[upstream_address(i, 0)], 3600);
    }
    let mut md = responder(&node, &iface, &upstream, o)?;
    println!();
    md.push_str(&churn(&node, &iface, &upstream, o)?);
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_counters_from_metrics() {
        let text = "# HELP lb_dns_lookups Lookups.\n\
                    lb_dns_lookups_total{result=\"failure\"} 2\n\
                    lb_dns_lookups_total{result=\"success\"} 8\n\
                    lb_dns_lookups_totally 5\n\
                    lb_dns_answer_changes_total 3\n";
        assert_eq!(counter(text, "lb_dns_lookups_total"), 10);
        assert_eq!(counter(text, "lb_dns_answer_changes_total"), 3);
        assert_eq!(counter(text, "lb_missing_total"), 0);
    }

    #[test]
    fn the_configurations_parse() {
        for text in [responder_config(3), churn_config(3), node_config(3)] {
            lb::config::parse(&text).unwrap_or_else(|e| panic!("{e:#}\n{text}"));
        }
    }
}
