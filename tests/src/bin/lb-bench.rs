//! `cargo xtask bench`: nanoseconds per packet of lb's XDP and TC programs on each path,
//! measured with BPF_PROG_TEST_RUN.
//!
//! Each measurement is one single-iteration run on a freshly copied packet (with
//! `repeat`, the kernel would feed a rewriting program its own output). The kernel's own
//! timer reports each run; the same is done for a trivial program in the same process,
//! and its median is subtracted, leaving what lb itself costs. Rows are measured in
//! interleaved rounds and the median over rounds is reported with the rounds' range.
//!
//! Then the control plane (the agent in process: publishing a large configuration,
//! ejection to live table) and failover end to end (network namespaces and the `lb agent`
//! binary: a refused connection re-steered to the next backend, what the client sees and
//! how soon the agent's table avoids the refusing backend).

use std::{net::Ipv4Addr, time::Instant};

use anyhow::{Context as _, Result};
use aya::{
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf,
};
use clap::Parser;
use lb::dataplane::{
    sync::{DesiredBackend, DesiredService, Programmer},
    Dataplane, DataplaneOptions, Frontend, Protocol, BASELINE_OBJECT, TC_INGRESS_PROGRAM,
    XDP_PROGRAM,
};
use lb_common::{BackendState, Counter};
use lb_tests::packets::{PacketSpec, ACK, SYN};

#[derive(Parser)]
#[command(about = "ns/packet of lb's data plane (BPF_PROG_TEST_RUN)")]
struct Args {
    /// Single-iteration runs per path and program, over all rounds.
    #[arg(long, default_value_t = 100_000)]
    iterations: usize,
    /// Rounds: each measures the trivial program and every path once, in turn, so slow
    /// drift of the machine affects all rows alike.
    #[arg(long, default_value_t = 9)]
    rounds: usize,
    /// Skip the control-plane measurements (publish from scratch, ejection to live table).
    #[arg(long)]
    no_control_plane: bool,
    /// Services for the control-plane measurements.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Endpoints per service for the control-plane measurements.
    #[arg(long, default_value_t = 100)]
    endpoints: usize,
    /// Size of the connection table (default: room for every flow of the run, so no
    /// eviction). A smaller table is faster (it stays in cache) until it evicts.
    #[arg(long)]
    max_connections: Option<u32>,
    /// Skip the failover measurements (network namespaces and the `lb agent` binary,
    /// built by `cargo xtask build`).
    #[arg(long)]
    no_failover: bool,
    /// Failover trials: re-steered calls, and as many baseline calls.
    #[arg(long, default_value_t = 200)]
    failover_trials: usize,
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const WEB: Frontend = Frontend {
    vip: VIP,
    port: 80,
    protocol: Protocol::Tcp,
};
/// A second frontend flagged HTTP: lb reads the status line of its backends' responses.
const WEB_HTTP: Frontend = Frontend {
    vip: VIP,
    port: 8080,
    protocol: Protocol::Tcp,
};

/// A backend's response head and body in one segment: a 200, counted per CPU when the
/// service is flagged HTTP (a 5xx would also be sent to the agent through the ring buffer).
const HTTP_200: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
/// A later segment of a response body: its first 8 bytes are not `HTTP/1.`.
const BODY: &[u8; 64] = b"<p>a later segment of a response body, not its status line</p>\r\n";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    Xdp,
    Tc,
}

/// Runs one packet once and returns the kernel-measured duration in ns.
fn run_once(
    ebpf_prog: &mut aya::programs::Program,
    hook: Hook,
    packet: &[u8],
    out: &mut [u8],
) -> Result<u64> {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    opts.data_out = Some(out);
    let d = match hook {
        Hook::Xdp => {
            let p: &mut Xdp = ebpf_prog.try_into()?;
            p.test_run(opts)?.duration
        }
        Hook::Tc => {
            let p: &mut SchedClassifier = ebpf_prog.try_into()?;
            p.test_run(opts)?.duration
        }
    };
    Ok(d.as_nanos() as u64)
}

fn median(mut v: Vec<u64>) -> f64 {
    v.sort_unstable();
    v[v.len() / 2] as f64
}

fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Distinct client addresses so every "new flow" packet misses the connection table.
fn client(i: usize) -> (Ipv4Addr, u16) {
    let i = i as u32;
    (
        Ipv4Addr::from(0x0a80_0000 | (i >> 8 & 0xffff)),
        1024 + (i & 0xff) as u16,
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    // The agent started for the failover measurements inherits this: one info line per
    // failover would bury the results. Set before any thread exists.
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    let reproduce: Vec<String> = std::env::args().skip(1).collect();
    println!(
        "reproduce: cargo xtask bench{}{}",
        if reproduce.is_empty() { "" } else { " -- " },
        reproduce.join(" ")
    );
    println!();
    let n = args.iterations.max(1000);
    let mut dp = Dataplane::load(&DataplaneOptions {
        // Room for every new flow of both programs without eviction.
        max_connections: args
            .max_connections
            .unwrap_or((4 * n as u32).next_power_of_two()),
        ..Default::default()
    })?;
    let backends: Vec<DesiredBackend> = (0..3)
        .map(|i| DesiredBackend {
            addr: Ipv4Addr::new(10, 200, i + 1, 2),
            port: 8080,
            weight: 1,
            state: BackendState::Active,
            priority: Some(0),
        })
        .collect();
    let mut programmer = Programmer::default();
    programmer.apply(
        &mut dp,
        &[
            DesiredService {
                name: "web".into(),
                frontend: WEB,
                backends: backends.clone(),
                http: false,
            },
            DesiredService {
                name: "web-http".into(),
                frontend: WEB_HTTP,
                backends: backends.clone(),
                http: true,
            },
        ],
    )?;
    // The 200s counted for each service's backends (summed over CPUs), to check that the
    // HTTP rows measured what they say.
    let http_ok = |dp: &Dataplane, frontend: &Frontend| -> Result<u64> {
        let mut n = 0;
        for b in &backends {
            let id = programmer
                .backend_id(frontend, b.addr, b.port)
                .context("backend not programmed")?;
            n += dp.backend_stats(id)?.http_ok;
        }
        Ok(n)
    };
    let mut baseline = Ebpf::load(BASELINE_OBJECT).context("loading the baseline programs")?;
    for name in ["baseline_xdp", "baseline_tc"] {
        match baseline
            .program_mut(name)
            .context("baseline program missing")?
        {
            aya::programs::Program::Xdp(p) => p.load()?,
            aya::programs::Program::SchedClassifier(p) => p.load()?,
            _ => unreachable!(),
        }
    }

    let rounds = args.rounds.max(1);
    let per_round = n / rounds;
    println!(
        "lb data plane: ns/packet above a trivial program; {rounds} rounds of {per_round} \
         single runs per row, median of the round medians (min-max of rounds)"
    );
    println!(
        "kernel {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim()
    );
    println!();
    println!("| program | path | ns above trivial | rounds min-max | trivial program ns |");
    println!("| --- | --- | ---: | ---: | ---: |");
    let started = Instant::now();
    let mut out = vec![0u8; 2048];
    for (hook, prog_name, base_name, label) in [
        (Hook::Xdp, XDP_PROGRAM, "baseline_xdp", "XDP"),
        (Hook::Tc, TC_INGRESS_PROGRAM, "baseline_tc", "TC"),
    ] {
        // Offsets keep the two programs' flows apart.
        let off = if hook == Hook::Xdp { 0 } else { 2 * n };
        let new_flows: Vec<Vec<u8>> = (0..n)
            .map(|i| PacketSpec::tcp(client(off + i), (VIP, 80), SYN).build())
            .collect();
        // One established connection, and its replies.
        let est_client = client(off + n);
        let est = PacketSpec::tcp(est_client, (VIP, 80), ACK)
            .with_payload(&[0u8; 64])
            .build();
        let non_vip = PacketSpec::tcp(est_client, (Ipv4Addr::new(10, 200, 9, 9), 80), SYN).build();
        let prog = dp.program_mut(prog_name)?;
        // Opens a connection from `from` to `frontend` with a SYN: the backend lb chose.
        let mut connect = |from: (Ipv4Addr, u16), frontend: &Frontend| -> Result<Ipv4Addr> {
            let syn = PacketSpec::tcp(from, (frontend.vip, frontend.port), SYN).build();
            run_once(prog, hook, &syn, &mut out)?;
            Ok(Ipv4Addr::new(out[30], out[31], out[32], out[33]))
        };
        let chosen = connect(est_client, &WEB)?;
        let reply = PacketSpec::tcp((chosen, 8080), est_client, ACK)
            .with_payload(&[0u8; 64])
            .build();
        // The established flow after DNAT, as another hook of the node sees it again
        // (e.g. TC egress towards the backend).
        let translated = PacketSpec::tcp(est_client, (chosen, 8080), ACK)
            .with_payload(&[0u8; 64])
            .build();
        // The same response (head and body in one segment) on a connection of a service
        // without the HTTP flag and on one of a service with it; a body segment on the
        // latter.
        let plain_client = client(off + n + 1);
        let plain_backend = connect(plain_client, &WEB)?;
        let response_plain = PacketSpec::tcp((plain_backend, 8080), plain_client, ACK)
            .with_payload(HTTP_200)
            .build();
        let http_client = client(off + n + 2);
        let http_backend = connect(http_client, &WEB_HTTP)?;
        let response_http = PacketSpec::tcp((http_backend, 8080), http_client, ACK)
            .with_payload(HTTP_200)
            .build();
        let body_http = PacketSpec::tcp((http_backend, 8080), http_client, ACK)
            .with_payload(BODY)
            .build();
        let (ok_plain, ok_http) = (http_ok(&dp, &WEB)?, http_ok(&dp, &WEB_HTTP)?);
        let unparsed = dp.counter(Counter::EventHttpUnparsed)?;

        const PATHS: [&str; 8] = [
            "new TCP flow",
            "established flow",
            "reply (reverse NAT)",
            "reply, HTTP 200 response, status parsing off",
            "reply, HTTP 200 response, status parsing on",
            "reply, body segment on an HTTP service",
            "non-VIP traffic",
            "translated traffic seen again",
        ];
        // Per path: the round medians above the same round's trivial-program median.
        let mut above: [Vec<f64>; PATHS.len()] = Default::default();
        let mut base_medians = Vec::new();
        for round in 0..rounds {
            let base_prog = baseline.program_mut(base_name).context("baseline")?;
            let mut t = Vec::with_capacity(per_round);
            for _ in 0..per_round {
                t.push(run_once(base_prog, hook, &est, &mut out)?);
            }
            let base = median(t);
            base_medians.push(base);
            let prog = dp.program_mut(prog_name)?;
            for (path, row) in above.iter_mut().enumerate() {
                let mut t = Vec::with_capacity(per_round);
                for i in 0..per_round {
                    let packet = match path {
                        0 => &new_flows[round * per_round + i],
                        1 => &est,
                        2 => &reply,
                        3 => &response_plain,
                        4 => &response_http,
                        5 => &body_http,
                        6 => &non_vip,
                        _ => &translated,
                    };
                    t.push(run_once(prog, hook, packet, &mut out)?);
                }
                row.push(median(t) - base);
            }
        }
        // Every run of the "parsing on" row counted one 200, none of the others did, and
        // no segment was taken for a status line it could not read.
        let runs = (rounds * per_round) as u64;
        let counted = (
            http_ok(&dp, &WEB)? - ok_plain,
            http_ok(&dp, &WEB_HTTP)? - ok_http,
            dp.counter(Counter::EventHttpUnparsed)? - unparsed,
        );
        anyhow::ensure!(
            counted == (0, runs, 0),
            "{label}: 200s counted (service without the HTTP flag, with it, unparsed) = \
             {counted:?}, expected (0, {runs}, 0)"
        );
        let base = median_f(base_medians.clone());
        for (path, row) in PATHS.iter().zip(above) {
            let (lo, hi) = (
                row.iter().cloned().fold(f64::MAX, f64::min),
                row.iter().cloned().fold(f64::MIN, f64::max),
            );
            println!(
                "| {label} | {path} | {:.0} | {lo:.0}-{hi:.0} | {base:.0} |",
                median_f(row)
            );
        }
    }
    println!();
    println!(
        "data plane measured in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    drop(dp);
    if !args.no_control_plane {
        control_plane(args.services, args.endpoints)?;
    }
    if !args.no_failover {
        failover(args.failover_trials)?;
    }
    Ok(())
}

/// The agent's side: how long publishing a large configuration from scratch takes, and
/// how long from an ejection decision to the new table being live in the kernel.
fn control_plane(services: usize, endpoints: usize) -> Result<()> {
    use lb::{
        agent::Agent,
        config::Config,
        model::{
            Endpoint, Failover, Locality, LocalityLbSetting, Node, OutlierDetection, Service,
            TrafficPolicy,
        },
        outlier::Event,
    };
    let localities = [
        "region1/zone1",
        "region1/zone2",
        "region2/zone3",
        "region3/zone4",
    ];
    let policy = TrafficPolicy {
        locality_lb: Some(LocalityLbSetting {
            failover: vec![Failover {
                from: "region1".into(),
                to: "region2".into(),
            }],
            ..Default::default()
        }),
        outlier_detection: Some(OutlierDetection {
            consecutive_5xx_errors: 1,
            max_ejection_percent: 100,
            ..Default::default()
        }),
    };
    let svcs: Vec<Service> = (0..services)
        .map(|i| Service {
            name: format!("svc-{i}"),
            frontend: Frontend {
                vip: Ipv4Addr::from(0x0a60_0000 + i as u32),
                port: 80,
                protocol: Protocol::Tcp,
            },
            endpoints: (0..endpoints)
                .map(|j| Endpoint {
                    address: Ipv4Addr::from(0x0ac8_0000 + (i * endpoints + j) as u32),
                    port: 8080,
                    locality: Locality::parse(localities[j % localities.len()]),
                    labels: Default::default(),
                    weight: 1,
                })
                .collect(),
            policy: policy.clone(),
            http: false,
        })
        .collect();
    let dataplane = DataplaneOptions {
        max_services: services as u32 + 1,
        max_backends: (services * endpoints) as u32 + 1,
        max_connections: 1024,
        ..Default::default()
    };
    let node = Node {
        locality: Locality::parse("region1/zone1"),
        ..Default::default()
    };
    let empty = Config {
        dataplane: dataplane.clone(),
        node: node.clone(),
        ..Default::default()
    };
    let full = Config {
        dataplane,
        node,
        services: svcs.clone(),
        ..Default::default()
    };
    let mut agent = Agent::start(empty, &[], None)?;
    let t = Instant::now();
    agent.reload(full)?;
    let from_scratch = t.elapsed();

    // Eject the first endpoint (region1/zone1, priority 0) of services in turn.
    let mut latencies = Vec::new();
    for svc in svcs.iter().take(100) {
        let e = &svc.endpoints[0];
        let frontend = format!("{}:80", svc.frontend.vip);
        agent.record(
            std::net::SocketAddrV4::new(e.address, e.port),
            Some(&frontend),
            Event::HttpStatus(503),
        )?;
        latencies.push(agent.last_publish.context("no publish")?.as_micros() as u64);
    }
    latencies.sort_unstable();
    println!();
    println!("control plane ({services} services x {endpoints} endpoints, 4 localities, failover, outlier detection)");
    println!();
    println!("| measurement | figure |");
    println!("| --- | ---: |");
    println!(
        "| publish every service from scratch (plans, Maglev tables, map writes) | {:.0} ms |",
        from_scratch.as_secs_f64() * 1000.0
    );
    println!(
        "| ejection decision to new table live, median of 100 | {} µs |",
        latencies[latencies.len() / 2]
    );
    println!(
        "| ejection decision to new table live, max of 100 | {} µs |",
        latencies[latencies.len() - 1]
    );
    Ok(())
}

/// The admin endpoint of the agent in the failover measurements (in the node namespace).
const ADMIN: &str = "127.0.0.1:15000";
/// The service's port in the failover measurements (backends listen on 8080).
const FAILOVER_PORT: u16 = 5000;

/// The test bed's two backends: (name they answer with, locality).
const FAILOVER_BACKENDS: [(&str, &str); 2] = [
    ("region1.zone1", "region1/zone1"),
    ("region1.zone2", "region1/zone2"),
];

/// The agent's configuration: the node at region1/zone1, a ServiceEntry with one endpoint
/// per locality, and a DestinationRule whose outlier detection ejects at the first
/// failure and may eject every endpoint.
fn failover_config() -> String {
    use lb_tests::topology::{backend_addr, BACKEND_HTTP_PORT, VIP};
    let endpoints: String = (1u8..)
        .zip(FAILOVER_BACKENDS)
        .map(|(i, (_, locality))| {
            format!(
                "  - address: {}\n    locality: {locality}\n",
                backend_addr(i)
            )
        })
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
  name: failover-bench
spec:
  hosts:
  - failover-bench.bench.svc.cluster.local
  addresses:
  - {VIP}
  ports:
  - number: {FAILOVER_PORT}
    name: http
    protocol: HTTP
    targetPort: {BACKEND_HTTP_PORT}
  resolution: STATIC
  endpoints:
{endpoints}---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: failover-bench
spec:
  host: failover-bench.bench.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        enabled: true
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 10m
      maxEjectionPercent: 100
"#
    )
}

/// From the node: the agent's `GET /services`.
fn admin_view() -> Result<String> {
    lb_tests::http_get(ADMIN.parse()?, "/services", lb_tests::DEFAULT_TIMEOUT)
}

/// Whether the admin view shows `endpoint` (`IP:PORT`) as ejected. Endpoint entries hold
/// no nested objects: an entry ends at the next `}`.
fn shown_ejected(view: &str, endpoint: &str) -> Result<bool> {
    let at = view
        .find(&format!("\"address\":\"{endpoint}\""))
        .with_context(|| format!("{endpoint} not in the admin view {view}"))?;
    let end = view[at..].find('}').map_or(view.len(), |e| at + e);
    Ok(view[at..end].contains("\"ejected\":true"))
}

/// The agent's `failover_reaction` summary (`count`, `p50_us`, `p99_us`, `max_us`; the
/// percentiles are `null` before the first failover).
#[derive(Debug, Clone, Copy)]
struct Reaction {
    count: u64,
    p50_us: Option<u64>,
    p99_us: Option<u64>,
    max_us: Option<u64>,
}

fn reaction(view: &str) -> Result<Reaction> {
    let at = view
        .find("\"failover_reaction\":{")
        .with_context(|| format!("no failover_reaction in the admin view {view}"))?;
    let obj = &view[at..];
    let obj = &obj[..obj.find('}').map_or(obj.len(), |e| e + 1)];
    let number = |key: &str| -> Option<u64> {
        let rest = &obj[obj.find(&format!("\"{key}\":"))? + key.len() + 3..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        rest[..end].parse().ok()
    };
    Ok(Reaction {
        count: number("count").with_context(|| format!("no count in {obj}"))?,
        p50_us: number("p50_us"),
        p99_us: number("p99_us"),
        max_us: number("max_us"),
    })
}

/// Nearest-rank percentile of sorted `v` (as the agent computes its own).
fn rank(v: &[u64], p: usize) -> u64 {
    v[(v.len() * p).div_ceil(100).max(1) - 1]
}

/// Failover end to end, as a client sees it and as the agent measures it. A test bed (client,
/// node running the `lb agent` binary, two backends at region1/zone1 and region1/zone2,
/// the node at region1/zone1) where backend 1's listener is closed, so its kernel refuses
/// connections with RST. Each trial un-ejects backend 1 (admin API; the answer comes back
/// when the tables are live), so the next new connection is sent to it; lb sees the refusal,
/// re-sends the client's SYN to backend 2 and reports the failure, and outlier detection
/// ejects backend 1 again. A trial counts as re-steered when backend 2 answered the call
/// and the agent recorded exactly one more failover (backend 1 refused that call's SYN).
/// Each trial then makes a baseline call with backend 1 ejected, which goes straight to
/// backend 2: interleaved, so both kinds of calls see the same machine.
fn failover(trials: usize) -> Result<()> {
    use std::time::Duration;

    use lb::dataplane::AttachMode;
    use lb_tests::{
        agent_process::{lb_binary, write_atomically, AgentProcess, TempDir},
        clients::http_post_with,
        http_get,
        topology::{backend_addr, TestBed, BACKEND_HTTP_PORT, VIP},
        DEFAULT_TIMEOUT,
    };

    let trials = trials.max(1);
    let started = Instant::now();
    let lb =
        lb_binary().context("the failover measurements run the agent (or pass --no-failover)")?;
    let names: Vec<String> = FAILOVER_BACKENDS
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    let mut bed = TestBed::with_backends(AttachMode::Tc, &names)?;
    let dir = TempDir::new("lbbench")?;
    let config = dir.0.join("failover.yaml");
    write_atomically(&config, &failover_config())?;
    let mut agent = AgentProcess::start_with(&bed, &config, &["--admin", ADMIN])?;
    let vip = std::net::SocketAddr::from((VIP, FAILOVER_PORT));
    let (zone1, zone2) = (FAILOVER_BACKENDS[0].0, FAILOVER_BACKENDS[1].0);
    let endpoint1 = format!("{}:{BACKEND_HTTP_PORT}", backend_addr(1));

    // The VIP answers from backend 1 (priority 0) and the admin endpoint is up.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = bed.client.run(|| http_get(vip, "/", DEFAULT_TIMEOUT));
        let admin = bed.node.run(admin_view);
        match (ready, admin) {
            (Ok(name), Ok(_)) if name == zone1 => break,
            (ready, admin) if Instant::now() > deadline => {
                anyhow::bail!(
                    "the agent did not program the VIP or serve its admin endpoint: \
                     call {ready:?}, admin {:?}",
                    admin.map(|_| ())
                )
            }
            _ => {}
        }
        anyhow::ensure!(agent.running(), "the agent exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    bed.backends[0].http.stop();

    let uneject = format!("/endpoints/{endpoint1}/uneject");
    let admin: std::net::SocketAddr = ADMIN.parse()?;
    // One call from the client namespace: its duration (connect to the last byte of the
    // response, timed in the namespace's thread) and who answered.
    let call = || {
        bed.client.run(|| {
            let t = Instant::now();
            let answer = http_get(vip, "/", DEFAULT_TIMEOUT);
            (answer, t.elapsed())
        })
    };
    let mut resteered_us = Vec::with_capacity(trials);
    let mut baseline_us = Vec::with_capacity(trials);
    let (mut failed, mut baseline_failed) = (0, 0);
    // No failover yet (backend 1 served until now): the agent's summary will cover the
    // trials' failovers only.
    let mut reactions = bed.node.run(admin_view).and_then(|v| reaction(&v))?.count;
    anyhow::ensure!(
        reactions == 0,
        "{reactions} failover(s) before the first trial"
    );
    // Mutating admin calls carry the token the agent wrote.
    let token = std::fs::read_to_string(&agent.admin_token_file)
        .context("reading the agent's admin token")?;
    let token = token.trim();
    for trial in 1..=trials {
        let answer = bed
            .node
            .run(|| http_post_with(admin, &uneject, &[("x-lb-token", token)], DEFAULT_TIMEOUT))
            .with_context(|| format!("trial {trial}: un-ejecting backend 1"))?;
        anyhow::ensure!(
            answer.contains("1 endpoint(s)"),
            "trial {trial}: un-eject answered {answer:?}"
        );
        let (answer, took) = call();
        // Backend 1 ejected again, by a failover the agent measured: the kernel saw the
        // refusal. Waits for it, so the baseline call and the next trial start from there.
        let seen = bed.node.run(|| -> Result<Option<u64>> {
            let deadline = Instant::now() + Duration::from_secs(2);
            loop {
                let view = admin_view()?;
                let count = reaction(&view)?.count;
                if shown_ejected(&view, &endpoint1)? && count > reactions {
                    return Ok(Some(count));
                }
                if Instant::now() > deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        })?;
        let resteered = seen == Some(reactions + 1);
        match &answer {
            Ok(name) if name == zone2 && resteered => resteered_us.push(took.as_micros() as u64),
            // Served, but more than one failover: not counted as a confirmed re-steer.
            Ok(name) if name == zone2 => {}
            Ok(name) => anyhow::bail!("trial {trial}: answered by {name:?}, its listener closed"),
            Err(_) => failed += 1,
        }
        match seen {
            Some(count) => reactions = count,
            None => anyhow::bail!(
                "trial {trial}: backend 1 not ejected again within 2 s (call: {answer:?})"
            ),
        }
        let (answer, took) = call();
        match answer {
            Ok(name) if name == zone2 => baseline_us.push(took.as_micros() as u64),
            Ok(name) => anyhow::bail!("trial {trial}: baseline call answered by {name:?}"),
            Err(_) => baseline_failed += 1,
        }
    }
    let view = bed.node.run(admin_view)?;
    let summary = reaction(&view)?;
    anyhow::ensure!(
        summary.count == reactions,
        "the baseline calls caused failovers: {} recorded, {reactions} after the last trial",
        summary.count
    );
    anyhow::ensure!(agent.running(), "the agent exited during the measurements");
    drop(agent);
    drop(bed);
    anyhow::ensure!(
        !resteered_us.is_empty() && !baseline_us.is_empty(),
        "no successful call to measure: {failed} re-steered and {baseline_failed} baseline \
         calls failed"
    );
    resteered_us.sort_unstable();
    baseline_us.sort_unstable();
    let us = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} µs"));

    println!();
    println!(
        "failover (2 backends: region1/zone1, region1/zone2; node at region1/zone1; TC; \
         backend 1's listener closed, so its kernel refuses with RST; {trials} trials: \
         un-eject backend 1, one call on a new connection; agent {})",
        lb.display()
    );
    println!();
    println!("| measurement | figure |");
    println!("| --- | ---: |");
    println!("| failed client calls (re-steered) | {failed} of {trials} |");
    println!(
        "| re-steers confirmed (backend 2 answered, backend 1's refusal ejected it) | {} of {trials} |",
        resteered_us.len()
    );
    println!(
        "| agent failover reaction (kernel's signal to table live), count | {} |",
        summary.count
    );
    println!("| agent failover reaction, p50 | {} |", us(summary.p50_us));
    println!("| agent failover reaction, p99 | {} |", us(summary.p99_us));
    println!("| agent failover reaction, max | {} |", us(summary.max_us));
    for (p, label) in [(50, "p50"), (99, "p99")] {
        let (r, b) = (rank(&resteered_us, p), rank(&baseline_us, p));
        println!("| client call re-steered (refused by backend 1, served by backend 2), {label} | {r} µs |");
        println!("| client call straight to backend 2 (backend 1 ejected), {label} | {b} µs |");
        println!(
            "| re-steered / straight, {label} | {:.2} |",
            r as f64 / b as f64
        );
    }
    if baseline_failed > 0 {
        println!("| failed client calls (straight) | {baseline_failed} of {trials} |");
    }
    println!();
    println!(
        "failover measured in {:.1} s (test bed and agent start included)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
