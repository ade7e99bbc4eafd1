//! `cargo xtask run`: lb on a throwaway test bed, end to end.
//!
//! Builds a client, a node and three backends as network namespaces, starts the real
//! `lb agent` binary in the node, sends traffic through the VIP, then edits the agent's
//! configuration to take a backend out and shows traffic moving. Everything is removed
//! when it ends (also on error).

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use clap::Parser;
use lb::dataplane::AttachMode;
use lb_tests::{
    agent_process::{write_atomically, AgentProcess, TempDir},
    http_get, names_from,
    topology::{self, vip_http, vip_udp, TestBed, VIP},
    udp_request, DEFAULT_TIMEOUT,
};

#[derive(Parser)]
#[command(about = "Run lb on a test bed of network namespaces and show it balancing")]
struct Args {
    /// Attach to the client-facing interface with XDP instead of TC.
    #[arg(long)]
    xdp: bool,
    /// Requests per round.
    #[arg(long, default_value_t = 300)]
    requests: usize,
    /// Keep the test bed and agent up this many seconds at the end, to look around
    /// (e.g. `ip netns exec <client> curl http://10.96.0.10/`).
    #[arg(long, default_value_t = 0)]
    hold_secs: u64,
}

fn tally(bed: &TestBed, n: usize) -> Result<BTreeMap<String, usize>> {
    let mut t = BTreeMap::new();
    for name in names_from(&bed.client, vip_http(), n)? {
        *t.entry(name).or_default() += 1;
    }
    Ok(t)
}

fn print_tally(title: &str, t: &BTreeMap<String, usize>) {
    println!("{title}");
    for (name, n) in t {
        println!("  {name:<10} {n:>4}  {}", "#".repeat(n / 5));
    }
}

fn write_config(path: &Path, backends: &[u8]) -> Result<()> {
    write_atomically(path, &topology::config_yaml(backends, ""))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !lb_tests::require_root() {
        bail!("the demo creates network namespaces and loads eBPF programs: run it as root");
    }
    let mode = if args.xdp {
        AttachMode::Xdp
    } else {
        AttachMode::Tc
    };
    println!("building the test bed: client, node (lb), backend-1..3 ...");
    let bed = TestBed::new(mode)?;
    let dir = TempDir::new("lb-demo")?;
    let config = dir.0.join("lb.yaml");
    write_config(&config, &[1, 2, 3])?;
    let _agent = AgentProcess::start(&bed, &config)?;

    // Wait for the agent to program the VIP.
    let deadline = Instant::now() + Duration::from_secs(20);
    while bed
        .client
        .run(|| http_get(vip_http(), "/", Duration::from_millis(500)))
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("the VIP {VIP} did not answer within 20 s; see the agent's log above");
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    let n = args.requests;
    print_tally(
        &format!(
            "\n{n} HTTP requests to {}, each on a new connection:",
            vip_http()
        ),
        &tally(&bed, n)?,
    );

    println!("\nediting the configuration: backend-1 leaves the service ...");
    write_config(&config, &[2, 3])?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = tally(&bed, 30)?;
        if !t.contains_key("backend-1") {
            break;
        }
        if Instant::now() > deadline {
            bail!("the agent did not apply the new configuration within 20 s");
        }
    }
    print_tally(
        &format!("{n} more requests after the reload:"),
        &tally(&bed, n)?,
    );

    let mut udp = BTreeMap::new();
    bed.client.run(|| -> Result<()> {
        for _ in 0..30 {
            *udp.entry(udp_request(vip_udp(), b"who", DEFAULT_TIMEOUT)?)
                .or_default() += 1;
        }
        Ok(())
    })?;
    print_tally(&format!("\n30 UDP requests to {}:", vip_udp()), &udp);

    if args.hold_secs > 0 {
        println!(
            "\nholding for {} s: try `ip netns exec {} curl -s http://{VIP}/`",
            args.hold_secs,
            bed.client.name()
        );
        std::thread::sleep(Duration::from_secs(args.hold_secs));
    }
    println!("\ndone; removing the test bed");
    Ok(())
}
