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

// Parsed once at start: the agent's many options make one variant large, which costs
// nothing here.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the agent: load the data plane, attach it and program it from the configuration.
    Agent {
        /// Configuration file or directory (YAML: Istio ServiceEntry and DestinationRule,
        /// lb's Node document). Repeatable; reloaded when it changes or on SIGHUP. Needed
        /// unless the cluster is the source (--kubernetes).
        #[arg(long = "config", required_unless_present_any = ["cleanup", "kubernetes"])]
        configs: Vec<PathBuf>,
        #[command(flatten)]
        kubernetes: KubernetesArgs,
        /// Interface to attach to, as IFACE (TC), IFACE:tc or IFACE:xdp. Repeatable. A glob
        /// pattern ('veth*', 'lxc*:tc', 'cali?*'; `*`, `?`, `[...]`: quote it in the shell)
        /// selects every matching interface, also those that appear while the agent runs
        /// (pods' veths); a name must exist at start. A name wins over patterns, the first
        /// matching pattern over later ones; patterns never select `lo`.
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
        #[arg(long, default_value_t = 25)]
        stats_interval: u64,
        /// `GET /metrics` has per-endpoint series (about a dozen per endpoint) while the
        /// agent balances at most this many endpoints; above it only the per-service ones,
        /// and `lb_metrics_endpoints_omitted` says how many endpoints went unreported (per
        /// endpoint figures stay in `/clusters` and `lb endpoints`). 0: never.
        #[arg(long, default_value_t = lb::admin::metrics::DEFAULT_ENDPOINT_SERIES_LIMIT)]
        metrics_endpoint_limit: usize,
        /// The DNS server that resolves endpoints known by name (ServiceEntry `resolution:
        /// DNS`), as IP or IP:PORT; without it, the system's resolver configuration
        /// (/etc/resolv.conf).
        #[arg(long, value_name = "ADDR", value_parser = parse_resolver)]
        resolver: Option<std::net::SocketAddr>,
        /// An answer for an endpoint's name holds at least this many seconds, whatever its TTL.
        #[arg(long, default_value_t = 5)]
        dns_min_ttl: u64,
        /// And at most this many.
        #[arg(long, default_value_t = 300)]
        dns_max_ttl: u64,
        /// Answer DNS queries on ADDR:PORT (UDP and TCP): the configuration's hosts
        /// (ServiceEntry hosts, Kubernetes Service names) with their VIPs, every other name
        /// forwarded to the upstream resolvers (--resolver, else /etc/resolv.conf). Give
        /// it to the node's pods as their nameserver.
        #[arg(long, value_name = "ADDR:PORT")]
        dns_listen: Option<std::net::SocketAddr>,
        /// Directory in the BPF filesystem where the maps and links are pinned (a BPF
        /// filesystem is mounted at /sys/fs/bpf if none is); they stay after the agent
        /// exits, so the programs keep forwarding and `lb` commands keep reading, and the
        /// next agent adopts them.
        #[arg(long, default_value = agent::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// File (created root-only) holding the token mutating admin calls must carry.
        #[arg(long, default_value = agent::DEFAULT_ADMIN_TOKEN_FILE)]
        admin_token_file: PathBuf,
        /// On SIGTERM (an upgrade), how long TLS-originated connections in progress are
        /// given to finish (seconds) while the next agent takes the new ones; those still
        /// open then are cut. The agent exits as soon as none is left.
        #[arg(long, default_value_t = 25)]
        drain_timeout: u64,
        /// TLS-originated connections forwarded at once, at most; beyond, new ones are
        /// reset and counted (lb_tls_connections_unserved_total).
        #[arg(long, default_value_t = lb::tls_origination::MAX_CONNECTIONS)]
        tls_max_connections: usize,
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
        /// Take this endpoint as unhealthy (ADDR, every port, or ADDR:PORT); repeatable:
        /// what happens to the traffic if these go down.
        #[arg(long, value_name = "ADDR[:PORT]")]
        unhealthy: Vec<lb::check::Unhealthy>,
        /// Output: text (default) or json.
        #[arg(short = 'o', long = "output", default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
    /// Operator commands: read the pinned maps and the admin endpoint, act on endpoints.
    #[command(flatten)]
    Operate(lb::cli::Command),
}

/// `lb agent`'s Kubernetes options.
#[derive(clap::Args)]
struct KubernetesArgs {
    /// Learn Services, EndpointSlices, this node's and the endpoints' localities, and Istio
    /// DestinationRules and ServiceEntries (when their CRDs are installed) from the cluster,
    /// besides the files. Where a file and the cluster define the same frontend (VIP, port,
    /// protocol), the file's wins and the cluster's is left out with a warning.
    #[arg(long)]
    kubernetes: bool,
    /// kubeconfig file; otherwise the pod's service account, then KUBECONFIG, then
    /// ~/.kube/config.
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
    /// This node's name in the cluster (default: the NODE_NAME environment variable, set
    /// from the downward API in the DaemonSet).
    #[arg(long, requires = "kubernetes")]
    node_name: Option<String>,
    /// Take only the Services labelled service.kubernetes.io/service-proxy-name=NAME (which
    /// kube-proxy then leaves alone); without it lb takes every Service.
    #[arg(long, requires = "kubernetes", value_name = "NAME")]
    service_proxy_name: Option<String>,
    /// Balance Services' externalIPs and LoadBalancer ingress IPs too (only ClusterIPs
    /// otherwise).
    #[arg(long, requires = "kubernetes")]
    external_ips: bool,
    /// The cluster's DNS domain, in Service host names (NAME.NAMESPACE.svc.DOMAIN).
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
}

impl KubernetesArgs {
    fn options(self) -> Result<Option<lb::sources::kubernetes::KubernetesOptions>> {
        if !self.kubernetes {
            return Ok(None);
        }
        let node_name = match self.node_name.or_else(|| std::env::var("NODE_NAME").ok()) {
            Some(n) if !n.is_empty() => n,
            _ => anyhow::bail!(
                "--kubernetes needs this node's name: give --node-name or set NODE_NAME (the \
                 DaemonSet sets it from spec.nodeName)"
            ),
        };
        Ok(Some(lb::sources::kubernetes::KubernetesOptions {
            kubeconfig: self.kubeconfig,
            node_name,
            service_proxy_name: self.service_proxy_name,
            external_ips: self.external_ips,
            cluster_domain: self.cluster_domain,
        }))
    }
}

/// `--resolver`: IP:PORT, or an IP (port 53).
fn parse_resolver(text: &str) -> Result<std::net::SocketAddr, String> {
    text.parse::<std::net::SocketAddr>()
        .or_else(|_| {
            text.parse::<std::net::IpAddr>()
                .map(|ip| std::net::SocketAddr::new(ip, 53))
        })
        .map_err(|_| format!("{text:?} is not an IP address or IP:PORT"))
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match Cli::parse().command {
        Command::Agent {
            configs,
            kubernetes,
            interfaces,
            node_locality,
            admin,
            watch_interval,
            stats_interval,
            metrics_endpoint_limit,
            resolver,
            dns_min_ttl,
            dns_max_ttl,
            dns_listen,
            pin_dir,
            admin_token_file,
            drain_timeout,
            tls_max_connections,
            cleanup,
        } => {
            if cleanup {
                return agent::cleanup(&pin_dir, &admin_token_file);
            }
            let runtime = tokio::runtime::Runtime::new()?;
            let stopped = runtime.block_on(agent::run(AgentOptions {
                configs,
                interfaces,
                node_locality: node_locality.as_deref().map(Locality::parse),
                admin,
                watch_interval: Duration::from_secs(watch_interval.max(1)),
                stats_interval: (stats_interval > 0).then(|| Duration::from_secs(stats_interval)),
                metrics_endpoint_limit,
                pin_dir,
                admin_token_file,
                kubernetes: kubernetes.options()?,
                dns: lb::sources::dns::DnsOptions {
                    resolver,
                    min_ttl: Duration::from_secs(dns_min_ttl),
                    max_ttl: Duration::from_secs(dns_max_ttl.max(dns_min_ttl)),
                },
                dns_listen,
                drain_timeout: Duration::from_secs(drain_timeout),
                tls_max_connections,
            }))?;
            // Everything of this agent but its TLS-originated connections stops here (the
            // admin endpoint, the watchers, the data plane's handles), so that the next
            // agent can take over while they finish.
            runtime.shutdown_timeout(Duration::from_secs(1));
            stopped.finish();
            Ok(())
        }
        Command::Operate(command) => std::process::exit(lb::cli::run(command)),
        Command::Check {
            config,
            unhealthy,
            output,
        } => {
            let c = lb::config::load(&config)?;
            let plans = lb::check::plans(&c, &unhealthy)?;
            if output == "json" {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&lb::check::json(&c, &plans, &unhealthy))?
                );
            } else {
                print!("{}", lb::check::text(&c, &plans, &unhealthy));
            }
            Ok(())
        }
    }
}
