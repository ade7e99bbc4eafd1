//! `cargo xtask bench`: lb measured on its own and beside the alternatives, in one run.
//!
//! Sections, in order (each can be skipped):
//! 1. per packet (`per_packet`): ns of lb's XDP and TC programs on each path, with
//!    BPF_PROG_TEST_RUN, a trivial program's cost subtracted;
//! 2. end to end (`end_to_end`): requests through the node balanced by lb and by its peers
//!    (kube-proxy's iptables and nftables rules, HAProxy, nginx), beside `direct`,
//!    keep-alive and one new connection per request, in interleaved rounds;
//! 3. control plane (`control_plane`): the agent publishing 1k and 10k services from
//!    scratch, an ejection to its table being live, memory;
//! 4. failover (`failover`): a refused connection re-steered to the next backend (the
//!    client's call and the agent's reaction over many trials), and the seed's task
//!    recorded call by call as a timeline;
//! 5. kubernetes (`kubernetes`): the `lb agent --kubernetes` binary against the test API
//!    server loaded with 10,000 Services of 10 endpoints: start to ready, memory, one
//!    endpoint change to the table being live;
//! 6. dns (`dns`): the agent's DNS responder beside dnsmasq (hosts lb owns, names it
//!    forwards), and the agent resolving endpoint names whose answers change every second;
//! 7. TLS origination (`tls`): plain HTTP from the client, TLS to the backend opened by
//!    lb's forwarder, by HAProxy and by nginx, beside plain HTTP through lb's kernel path;
//!    keep-alive and one new connection per request, in interleaved rounds, with each
//!    balancer's CPU per request.
//!
//! Every section prints markdown tables; the plots are SVG files (`plots`) in `--out`.
//! `--write-docs` puts the tables into `docs/benchmarks.md` between the section's markers
//! and the plots into `docs/` (`report`).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use clap::Parser;

/// Prints a line and keeps it for `--write-docs`.
macro_rules! emit {
    ($md:expr, $($arg:tt)*) => {{
        let line = format!($($arg)*);
        println!("{line}");
        $md.push_str(&line);
        $md.push('\n');
    }};
}

mod agent;
mod control_plane;
mod dns;
mod end_to_end;
mod failover;
mod kubernetes;
mod loadgen;
mod per_packet;
mod plots;
mod report;
mod results;
mod stats;
mod tls;

#[derive(Parser)]
#[command(
    about = "lb's data plane, end to end beside its peers, control plane and failover, measured"
)]
struct Args {
    /// Every section at a small size (under two minutes once the peers are installed):
    /// what CI runs so the bench never rots. Its figures are not for the record.
    #[arg(long)]
    quick: bool,
    /// Write the tables into docs/benchmarks.md (between its markers) and the plots into
    /// docs/. Refused with --quick or a skipped section.
    #[arg(long)]
    write_docs: bool,
    /// Where the plots go without --write-docs.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Per packet: single-iteration runs per path and program, over all rounds.
    #[arg(long, default_value_t = 100_000)]
    iterations: usize,
    /// Per packet: rounds; each measures the trivial program and every path once, in turn,
    /// so slow drift of the machine affects all rows alike.
    #[arg(long, default_value_t = 9)]
    rounds: usize,
    /// Per packet: size of the connection table (default: room for every flow of the run,
    /// so no eviction). A smaller table is faster (it stays in cache) until it evicts.
    #[arg(long)]
    max_connections: Option<u32>,
    /// Skip the per-packet measurements.
    #[arg(long)]
    no_per_packet: bool,
    /// Skip the end-to-end comparison with the peers.
    #[arg(long)]
    no_end_to_end: bool,
    /// End to end: interleaved rounds (every target once per round in each mode).
    #[arg(long, default_value_t = 5)]
    e2e_rounds: usize,
    /// End to end: seconds of each measured run.
    #[arg(long, default_value_t = 5.0)]
    e2e_secs: f64,
    /// End to end: connections (keep-alive) or generator threads (new connections).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// End to end: leave out lb in XDP mode.
    #[arg(long)]
    no_xdp: bool,
    /// Skip the control-plane measurements.
    #[arg(long)]
    no_control_plane: bool,
    /// Control plane: numbers of services (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    services: Vec<usize>,
    /// Control plane: endpoints per service.
    #[arg(long, default_value_t = 100)]
    endpoints: usize,
    /// Skip the failover measurements (network namespaces and the `lb agent` binary,
    /// built by `cargo xtask build`).
    #[arg(long)]
    no_failover: bool,
    /// Failover: trials (re-steered calls, and as many baseline calls).
    #[arg(long, default_value_t = 200)]
    failover_trials: usize,
    /// Failover timeline: milliseconds between two drains.
    #[arg(long, default_value_t = 400)]
    timeline_interval_ms: u64,
    /// Skip the Kubernetes measurements. They need the `lb agent` binary and the test API
    /// server built by `cargo xtask test`; when the API server is missing the section is
    /// skipped with a note, unless it is the only section run or --write-docs is given.
    #[arg(long)]
    no_kubernetes: bool,
    /// Kubernetes: Services, each with one EndpointSlice.
    #[arg(long, default_value_t = 10_000)]
    kubernetes_services: usize,
    /// Kubernetes: endpoints per slice.
    #[arg(long, default_value_t = 10)]
    kubernetes_endpoints: usize,
    /// Kubernetes: endpoint changes timed to the table being live (one at a time).
    #[arg(long, default_value_t = 200)]
    kubernetes_changes: usize,
    /// Skip the DNS measurements (the responder beside dnsmasq, resolution churn).
    #[arg(long)]
    no_dns: bool,
    /// DNS: hosts owned by the servers, names forwarded, names resolved under churn.
    #[arg(long, default_value_t = 1000)]
    dns_hosts: usize,
    /// DNS: interleaved rounds of the responder comparison.
    #[arg(long, default_value_t = 5)]
    dns_rounds: usize,
    /// DNS: seconds of each measured responder run.
    #[arg(long, default_value_t = 3.0)]
    dns_secs: f64,
    /// DNS: queries in flight.
    #[arg(long, default_value_t = 32)]
    dns_concurrency: usize,
    /// DNS: seconds of each resolution-churn phase (steady, churn).
    #[arg(long, default_value_t = 15.0)]
    dns_churn_secs: f64,
    /// Skip the TLS-origination comparison (lb's forwarder, HAProxy, nginx).
    #[arg(long)]
    no_tls: bool,
    /// TLS origination: interleaved rounds (every target once per round in each mode).
    #[arg(long, default_value_t = 5)]
    tls_rounds: usize,
    /// TLS origination: seconds of each measured run.
    #[arg(long, default_value_t = 5.0)]
    tls_secs: f64,
    /// TLS origination: connections (keep-alive) or generator threads (new connections).
    #[arg(long, default_value_t = 16)]
    tls_concurrency: usize,
}

impl Args {
    /// The sizes of `--quick`.
    fn quick(mut self) -> Self {
        self.iterations = 20_000;
        self.rounds = 5;
        self.e2e_rounds = 2;
        self.e2e_secs = 1.0;
        self.services = vec![1000];
        self.failover_trials = 50;
        self.kubernetes_services = 200;
        self.kubernetes_changes = 20;
        self.dns_hosts = 100;
        self.dns_rounds = 1;
        self.dns_secs = 0.5;
        self.dns_churn_secs = 2.0;
        self.tls_rounds = 2;
        self.tls_secs = 1.0;
        self
    }
}

/// The workspace's docs/ folder.
fn docs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.quick {
        anyhow::ensure!(
            !args.write_docs,
            "--write-docs records a full run's figures; run it without --quick"
        );
        args = args.quick();
    }
    if args.write_docs {
        anyhow::ensure!(
            !(args.no_per_packet
                || args.no_end_to_end
                || args.no_control_plane
                || args.no_failover
                || args.no_kubernetes
                || args.no_dns
                || args.no_tls),
            "--write-docs rewrites every section of docs/benchmarks.md: run every section"
        );
    }
    // The agents started for the end-to-end and failover measurements inherit this: one
    // info line per failover would bury the results. Set before any thread exists.
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    let started = std::time::Instant::now();
    let reproduce: Vec<String> = std::env::args().skip(1).collect();
    let command = format!(
        "cargo xtask bench{}{}",
        if reproduce.is_empty() { "" } else { " " },
        reproduce.join(" ")
    );
    println!("reproduce: {command}");
    println!();
    let out = if args.write_docs {
        docs_dir()
    } else {
        args.out.clone()
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut sections: Vec<(&str, String)> = Vec::new();

    if !args.no_per_packet {
        let md = per_packet::run(&per_packet::Options {
            iterations: args.iterations,
            rounds: args.rounds,
            max_connections: args.max_connections,
        })?;
        sections.push(("per-packet", md));
    }
    if !args.no_end_to_end {
        println!();
        let (md, figures) = end_to_end::run(&end_to_end::Options {
            rounds: args.e2e_rounds,
            secs: args.e2e_secs,
            concurrency: args.concurrency,
            xdp: !args.no_xdp,
        })?;
        plots::throughput(&figures, &out.join("bench-throughput.svg"))?;
        plots::latency(&figures, &out.join("bench-latency.svg"))?;
        println!(
            "plots: {0}/bench-throughput.svg, {0}/bench-latency.svg",
            out.display()
        );
        sections.push(("end-to-end", md));
    }
    if !args.no_control_plane {
        println!();
        let md = control_plane::run(&args.services, args.endpoints)?;
        sections.push(("control-plane", md));
    }
    if !args.no_failover {
        println!();
        let md = failover::run(args.failover_trials)?;
        sections.push(("failover", md));
        println!();
        let (md, timeline) = failover::timeline(
            std::time::Duration::from_millis(300),
            std::time::Duration::from_millis(args.timeline_interval_ms),
        )?;
        plots::failover_timeline(&timeline, &out.join("bench-failover-timeline.svg"))?;
        println!("plot: {}/bench-failover-timeline.svg", out.display());
        sections.push(("failover-timeline", md));
    }
    if !args.no_kubernetes {
        println!();
        let only =
            args.no_per_packet && args.no_end_to_end && args.no_control_plane && args.no_failover;
        let md = kubernetes::run(&kubernetes::Options {
            services: args.kubernetes_services,
            endpoints: args.kubernetes_endpoints,
            changes: args.kubernetes_changes,
            required: args.write_docs || only,
        })?;
        sections.push(("kubernetes", md));
    }
    if !args.no_dns {
        println!();
        let md = dns::run(&dns::Options {
            rounds: args.dns_rounds,
            secs: args.dns_secs,
            concurrency: args.dns_concurrency,
            hosts: args.dns_hosts,
            churn_secs: args.dns_churn_secs,
        })?;
        sections.push(("dns", md));
    }
    if !args.no_tls {
        println!();
        let md = tls::run(&tls::Options {
            rounds: args.tls_rounds,
            secs: args.tls_secs,
            concurrency: args.tls_concurrency,
        })?;
        sections.push(("tls", md));
    }
    println!();
    println!("bench finished in {:.0} s", started.elapsed().as_secs_f64());
    if args.write_docs {
        let machine = format!(
            "{}\n\nCommand: `{command}` (took {:.0} s).",
            report::machine_facts(),
            started.elapsed().as_secs_f64()
        );
        sections.insert(0, ("machine", machine));
        let path = docs_dir().join("benchmarks.md");
        report::write_docs(&path, &sections)?;
        println!(
            "wrote {} and the plots in {}",
            path.display(),
            out.display()
        );
    }
    Ok(())
}
