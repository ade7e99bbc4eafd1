//! `cargo xtask bench`: lb measured on its own and beside the alternatives, in one run.
//!
//! Sections, in order (each can be skipped):
//! 1. per packet (`per_packet`): ns of lb's XDP and TC programs on each path, with
//!    BPF_PROG_TEST_RUN, a trivial program's cost subtracted;
//! 2. control plane (`control_plane`): the agent publishing a large configuration, and an
//!    ejection to its table being live;
//! 3. failover (`failover`): a refused connection re-steered to the next backend, end to
//!    end with the `lb agent` binary in network namespaces.
//!
//! Every section prints markdown tables; `--write-docs` puts them into
//! `docs/benchmarks.md` between the section's markers.

use anyhow::Result;
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

mod control_plane;
mod failover;
mod per_packet;
mod stats;

#[derive(Parser)]
#[command(about = "lb's data plane, control plane and failover, measured")]
struct Args {
    /// Single-iteration runs per path and program, over all rounds.
    #[arg(long, default_value_t = 100_000)]
    iterations: usize,
    /// Rounds: each measures the trivial program and every path once, in turn, so slow
    /// drift of the machine affects all rows alike.
    #[arg(long, default_value_t = 9)]
    rounds: usize,
    /// Skip the per-packet measurements.
    #[arg(long)]
    no_per_packet: bool,
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
    if !args.no_per_packet {
        per_packet::run(&per_packet::Options {
            iterations: args.iterations,
            rounds: args.rounds,
            max_connections: args.max_connections,
        })?;
    }
    if !args.no_control_plane {
        control_plane::run(args.services, args.endpoints)?;
    }
    if !args.no_failover {
        failover::run(args.failover_trials)?;
    }
    Ok(())
}
