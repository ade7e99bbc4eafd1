//! `cargo xtask bench`: nanoseconds per packet of lb's XDP and TC programs on each path,
//! measured with BPF_PROG_TEST_RUN.
//!
//! Each measurement is one single-iteration run on a freshly copied packet (with
//! `repeat`, the kernel would feed a rewriting program its own output). The kernel's own
//! timer reports each run; the same is done for a trivial program in the same process,
//! and its median is subtracted, leaving what lb itself costs. Rows are measured in
//! interleaved rounds and the median over rounds is reported with the rounds' range.

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
use lb_common::BackendState;
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
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const WEB: Frontend = Frontend {
    vip: VIP,
    port: 80,
    protocol: Protocol::Tcp,
};

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
    Programmer::default().apply(
        &mut dp,
        &[DesiredService {
            name: "web".into(),
            frontend: WEB,
            backends,
            http: false,
        }],
    )?;
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
        let syn = PacketSpec::tcp(est_client, (VIP, 80), SYN).build();
        let non_vip = PacketSpec::tcp(est_client, (Ipv4Addr::new(10, 200, 9, 9), 80), SYN).build();
        run_once(dp.program_mut(prog_name)?, hook, &syn, &mut out)?;
        let chosen = Ipv4Addr::new(out[30], out[31], out[32], out[33]);
        let reply = PacketSpec::tcp((chosen, 8080), est_client, ACK)
            .with_payload(&[0u8; 64])
            .build();
        // The established flow after DNAT, as another hook of the node sees it again
        // (e.g. TC egress towards the backend).
        let translated = PacketSpec::tcp(est_client, (chosen, 8080), ACK)
            .with_payload(&[0u8; 64])
            .build();

        const PATHS: [&str; 5] = [
            "new TCP flow",
            "established flow",
            "reply (reverse NAT)",
            "non-VIP traffic",
            "translated traffic seen again",
        ];
        // Per path: the round medians above the same round's trivial-program median.
        let mut above: [Vec<f64>; 5] = Default::default();
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
                        3 => &non_vip,
                        _ => &translated,
                    };
                    t.push(run_once(prog, hook, packet, &mut out)?);
                }
                row.push(median(t) - base);
            }
        }
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
