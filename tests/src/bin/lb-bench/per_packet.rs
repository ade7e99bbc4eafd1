//! Nanoseconds per packet of lb's XDP and TC programs on each path, measured with
//! BPF_PROG_TEST_RUN.
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
use lb::dataplane::{
    sync::{DesiredBackend, DesiredService, Programmer},
    Dataplane, DataplaneOptions, Frontend, Protocol, BASELINE_OBJECT, TC_INGRESS_PROGRAM,
    XDP_PROGRAM,
};
use lb_common::{BackendState, Counter};
use lb_tests::{
    fixture_services::routed_netns,
    packets::{PacketSpec, ACK, SYN},
};

use crate::stats::{median, median_f};

/// What to measure.
pub struct Options {
    /// Single-iteration runs per path and program, over all rounds.
    pub iterations: usize,
    /// Interleaved rounds.
    pub rounds: usize,
    /// Size of the connection table (default: room for every flow of the run).
    pub max_connections: Option<u32>,
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
    Ok(run_with_verdict(ebpf_prog, hook, packet, out)?.0)
}

/// Runs one packet once: the kernel-measured duration in ns, and whether the program
/// redirected it (XDP_REDIRECT, TC_ACT_REDIRECT).
fn run_with_verdict(
    ebpf_prog: &mut aya::programs::Program,
    hook: Hook,
    packet: &[u8],
    out: &mut [u8],
) -> Result<(u64, bool)> {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(packet);
    opts.data_out = Some(out);
    let (d, redirected) = match hook {
        Hook::Xdp => {
            let p: &mut Xdp = ebpf_prog.try_into()?;
            let r = p.test_run(opts)?;
            (r.duration, r.return_value == 4)
        }
        Hook::Tc => {
            let p: &mut SchedClassifier = ebpf_prog.try_into()?;
            let r = p.test_run(opts)?;
            (r.duration, r.return_value == 7)
        }
    };
    Ok((d.as_nanos() as u64, redirected))
}

/// A client of the session-affinity rows: `i`'s own address (a new client), or one of
/// `i / CLIENT_PORTS`'s ports (a client whose backend is remembered, but for its first).
fn affinity_client(i: usize, known: bool) -> (Ipv4Addr, u16) {
    const CLIENT_PORTS: usize = 1000;
    let i = i as u32;
    if known {
        (
            Ipv4Addr::from(0x0ab0_0000 | (i / CLIENT_PORTS as u32)),
            1024 + (i % CLIENT_PORTS as u32) as u16,
        )
    } else {
        (Ipv4Addr::from(0x0aa0_0000 | i), 1024)
    }
}

/// Distinct client addresses so every "new flow" packet misses the connection table.
fn client(i: usize) -> (Ipv4Addr, u16) {
    let i = i as u32;
    (
        Ipv4Addr::from(0x0a80_0000 | (i >> 8 & 0xffff)),
        1024 + (i & 0xff) as u16,
    )
}

/// Measures every path on both hooks; returns the markdown it printed.
///
/// lb forwards a rewritten packet itself (a route lookup, then a redirect), so the run
/// needs routes: it runs in a namespace of its own where the backends are permanent
/// neighbours on a link that takes XDP frames and the clients sit behind a router (also a
/// permanent neighbour), as on a node that talks to them. Every rewritten packet then takes
/// the redirect path on both hooks (checked after the run).
pub fn run(args: &Options) -> Result<String> {
    let ns = routed_netns("lbpp");
    ns.ip(&[
        "neigh",
        "add",
        CLIENT_ROUTER,
        "lladdr",
        "02:00:00:00:00:fd",
        "dev",
        "lbr0",
        "nud",
        "permanent",
    ])?;
    ns.ip(&["route", "add", "10.128.0.0/9", "via", CLIENT_ROUTER])?;
    ns.run(|| measure(args))
}

/// The next hop towards the clients (10.128.0.0/9) in the bench's namespace.
const CLIENT_ROUTER: &str = "10.200.0.254";

fn measure(args: &Options) -> Result<String> {
    let mut md = String::new();
    let n = args.iterations.max(1000);
    let options = DataplaneOptions {
        // Room for every new flow of both programs without eviction.
        max_connections: args
            .max_connections
            .unwrap_or((4 * n as u32).next_power_of_two()),
        ..Default::default()
    };
    let mut dp = Dataplane::load(&options)?;
    // The session-affinity rows: another load, so their flows do not fill the first one's
    // connection table (which would change the other rows' figures).
    let mut dp_affinity = Dataplane::load(&options)?;
    // As the agent runs them where a destination decides the route.
    dp.set_nexthop_cache(true)?;
    dp_affinity.set_nexthop_cache(true)?;
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
                session_affinity: None,
                tls: false,
            },
            DesiredService {
                name: "web-http".into(),
                frontend: WEB_HTTP,
                backends: backends.clone(),
                http: true,
                session_affinity: None,
                tls: false,
            },
        ],
    )?;
    Programmer::default().apply(
        &mut dp_affinity,
        &[DesiredService {
            name: "web-affinity".into(),
            frontend: WEB,
            backends: backends.clone(),
            http: false,
            session_affinity: Some(std::time::Duration::from_secs(10800)),
            tls: false,
        }],
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
    for name in ["baseline_xdp", "baseline_tc", "forward_xdp", "forward_tc"] {
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
    emit!(
        md,
        "lb data plane: ns/packet above a trivial program; {rounds} rounds of {per_round} \
         single runs per row, median of the round medians (min-max of rounds)"
    );
    emit!(
        md,
        "kernel {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim()
    );
    emit!(md, "");
    emit!(
        md,
        "| program | path | ns above trivial | rounds min-max | trivial program ns |"
    );
    emit!(md, "| --- | --- | ---: | ---: | ---: |");
    let started = Instant::now();
    let mut out = vec![0u8; 2048];
    for (hook, prog_name, base_name, forward_name, label) in [
        (Hook::Xdp, XDP_PROGRAM, "baseline_xdp", "forward_xdp", "XDP"),
        (
            Hook::Tc,
            TC_INGRESS_PROGRAM,
            "baseline_tc",
            "forward_tc",
            "TC",
        ),
    ] {
        // Offsets keep the two programs' flows apart.
        let off = if hook == Hook::Xdp { 0 } else { 2 * n };
        let new_flows: Vec<Vec<u8>> = (0..n)
            .map(|i| PacketSpec::tcp(client(off + i), (VIP, 80), SYN).build())
            .collect();
        let affinity_flows = |known: bool| -> Vec<Vec<u8>> {
            (0..n)
                .map(|i| PacketSpec::tcp(affinity_client(off + i, known), (VIP, 80), SYN).build())
                .collect()
        };
        let (kept_flows, new_client_flows) = (affinity_flows(true), affinity_flows(false));
        let affinity_counts = |dp: &Dataplane| -> Result<(u64, u64)> {
            Ok((
                dp.counter(Counter::EventAffinityHit)?,
                dp.counter(Counter::EventAffinityMiss)?,
            ))
        };
        let affinity_before = affinity_counts(&dp_affinity)?;
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
        // Each response of a round a new one (its own sequence number): lb counts a
        // segment that starts the same response again (a retransmission) only once.
        let response_http: Vec<Vec<u8>> = (0..per_round as u32)
            .map(|i| {
                PacketSpec::tcp((http_backend, 8080), http_client, ACK)
                    .with_seq(1 + i * HTTP_200.len() as u32)
                    .with_payload(HTTP_200)
                    .build()
            })
            .collect();
        let body_http = PacketSpec::tcp((http_backend, 8080), http_client, ACK)
            .with_payload(BODY)
            .build();
        let (ok_plain, ok_http) = (http_ok(&dp, &WEB)?, http_ok(&dp, &WEB_HTTP)?);
        let unparsed = dp.counter(Counter::EventHttpUnparsed)?;

        const PATHS: [&str; 13] = [
            "new TCP flow",
            "established flow",
            "reply (reverse NAT)",
            "reply, HTTP 200 response, status parsing off",
            "reply, HTTP 200 response, status parsing on",
            "reply, body segment on an HTTP service",
            "non-VIP traffic",
            "translated traffic seen again",
            "new TCP flow, session affinity, client's backend kept",
            "new TCP flow, session affinity, new client",
            "forwarding alone (a program doing only the route lookup, MACs and redirect lb does after a rewrite)",
            "established flow, next-hop cache off (a route lookup per packet)",
            "established flow, next-hop cache miss (the lookup, the route's MTU, the slot written)",
        ];
        let forward_prog = baseline.program_mut(forward_name).context("forward")?;
        anyhow::ensure!(
            run_with_verdict(forward_prog, hook, &translated, &mut out)?.1,
            "{label}: the forwarding program did not redirect a packet to a backend"
        );
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
            for (path, row) in above.iter_mut().enumerate() {
                if path == 11 {
                    dp.set_nexthop_cache(false)?;
                }
                let mut t = Vec::with_capacity(per_round);
                for i in 0..per_round {
                    if path == 12 {
                        // Every cached next hop stale: this run misses and refills.
                        dp.routing_changed()?;
                    }
                    let prog = match path {
                        0..8 | 11 | 12 => dp.program_mut(prog_name)?,
                        8 | 9 => dp_affinity.program_mut(prog_name)?,
                        _ => baseline.program_mut(forward_name).context("forward")?,
                    };
                    let packet = match path {
                        0 => &new_flows[round * per_round + i],
                        1 => &est,
                        2 => &reply,
                        3 => &response_plain,
                        4 => &response_http[i],
                        5 => &body_http,
                        6 => &non_vip,
                        7 => &translated,
                        8 => &kept_flows[round * per_round + i],
                        9 => &new_client_flows[round * per_round + i],
                        10 => &translated,
                        _ => &est,
                    };
                    t.push(run_once(prog, hook, packet, &mut out)?);
                }
                row.push(median(t) - base);
                if path == 11 {
                    dp.set_nexthop_cache(true)?;
                }
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
        // The affinity rows measured what they say: a new client is balanced and
        // remembered, a known one (but for its first connection) keeps its backend.
        let (hits, misses) = affinity_counts(&dp_affinity)?;
        let first_connections = {
            let (first, last) = (
                affinity_client(off, true).0,
                affinity_client(off + runs as usize - 1, true).0,
            );
            u64::from(u32::from(last) - u32::from(first) + 1)
        };
        anyhow::ensure!(
            (hits - affinity_before.0, misses - affinity_before.1)
                == (runs - first_connections, runs + first_connections),
            "{label}: session-affinity hits and misses ({}, {}), expected ({}, {})",
            hits - affinity_before.0,
            misses - affinity_before.1,
            runs - first_connections,
            runs + first_connections
        );
        // Every rewritten packet was sent on by lb, none left to the stack.
        for d in [&dp, &dp_affinity] {
            for &c in Counter::ALL {
                if c.label().starts_with("event_stack_") {
                    let n = d.counter(c)?;
                    anyhow::ensure!(n == 0, "{label}: {n} packets left to the stack ({c:?})");
                }
            }
        }
        let base = median_f(base_medians.clone());
        for (path, row) in PATHS.iter().zip(above) {
            let (lo, hi) = (
                row.iter().cloned().fold(f64::MAX, f64::min),
                row.iter().cloned().fold(f64::MIN, f64::max),
            );
            emit!(
                md,
                "| {label} | {path} | {:.0} | {lo:.0}-{hi:.0} | {base:.0} |",
                median_f(row)
            );
        }
    }
    emit!(md, "");
    emit!(
        md,
        "data plane measured in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(md)
}
