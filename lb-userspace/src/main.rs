//! `lb`: the node agent and its command line.

use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand};
use lb::{
    agent::{self, AgentOptions, InterfaceSpec},
    model::Locality,
};

#[derive(Parser)]
#[command(name = "lb", version, about = "eBPF node-level L4 load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: load the data plane, attach it and program it from the configuration.
    Agent {
        /// Configuration file or directory (YAML: Istio ServiceEntry and DestinationRule,
        /// lb's Node document). Repeatable; reloaded when it changes or on SIGHUP.
        #[arg(long = "config", required_unless_present = "cleanup")]
        configs: Vec<PathBuf>,
        /// Interface to attach to, as IFACE (TC), IFACE:tc or IFACE:xdp. Repeatable.
        #[arg(long = "interface", required_unless_present = "cleanup")]
        interfaces: Vec<InterfaceSpec>,
        /// This node's locality, REGION/ZONE/SUBZONE (overrides the Node document).
        #[arg(long)]
        node_locality: Option<String>,
        /// Address of the admin endpoint, e.g. 127.0.0.1:15000.
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        /// Seconds between checks of the configuration for changes.
        #[arg(long, default_value_t = 2)]
        watch_interval: u64,
        /// Log the data-plane counters every this many seconds (0: never).
        #[arg(long, default_value_t = 0)]
        stats_interval: u64,
        /// Directory in the BPF filesystem where the maps and links are pinned (a BPF
        /// filesystem is mounted at /sys/fs/bpf if none is); they stay after the agent
        /// exits, so the programs keep forwarding and `lb` commands keep reading, and the
        /// next agent adopts them.
        #[arg(long, default_value = agent::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// File (created root-only) holding the token mutating admin calls must carry.
        #[arg(long, default_value = agent::DEFAULT_ADMIN_TOKEN_FILE)]
        admin_token_file: PathBuf,
        /// Do not run: detach the programs the agent left attached (its pinned links), remove
        /// every pin in --pin-dir and the directory, and the admin token file. Stop the
        /// agent first.
        #[arg(long)]
        cleanup: bool,
    },
    /// Check a configuration file and print what it defines.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Operator commands: read the pinned maps and the admin endpoint, act on endpoints.
    #[command(flatten)]
    Operate(lb::cli::Command),
}

#[tokio::main]
async fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match Cli::parse().command {
        Command::Agent {
            configs,
            interfaces,
            node_locality,
            admin,
            watch_interval,
            stats_interval,
            pin_dir,
            admin_token_file,
            cleanup,
        } => {
            if cleanup {
                return agent::cleanup(&pin_dir, &admin_token_file);
            }
            agent::run(AgentOptions {
                configs,
                interfaces,
                node_locality: node_locality.as_deref().map(Locality::parse),
                admin,
                watch_interval: Duration::from_secs(watch_interval.max(1)),
                stats_interval: (stats_interval > 0).then(|| Duration::from_secs(stats_interval)),
                pin_dir,
                admin_token_file,
            })
            .await
        }
        Command::Operate(command) => std::process::exit(lb::cli::run(command)),
        Command::Check { config } => {
            let c = lb::config::load(&config)?;
            println!("node locality: {}", c.node.locality);
            for s in &c.services {
                // What lb would do with every endpoint healthy.
                let plan = lb::locality::plan(&c.node, s, &vec![true; s.endpoints.len()]);
                println!("\n{}  {}", s.name, s.frontend);
                println!(
                    "  {:<22} {:<24} {:>8} {:>7}",
                    "ENDPOINT", "LOCALITY", "PRIORITY", "SHARE"
                );
                for (i, e) in s.endpoints.iter().enumerate() {
                    let priority = plan.priorities[i].map_or("-".to_string(), |p| p.to_string());
                    println!(
                        "  {:<22} {:<24} {:>8} {:>6.1}%",
                        format!("{}:{}", e.address, e.port),
                        e.locality.to_string(),
                        priority,
                        plan.shares[i] * 100.0
                    );
                }
            }
            Ok(())
        }
    }
}
