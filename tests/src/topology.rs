//! The end-to-end test bed: a client, a node running lb, and three backends, each its
//! own network namespace.
//!
//! ```text
//!  client 10.200.0.2 ── veth ── 10.200.0.1  node  10.200.i.1 ── veth ── 10.200.i.2 backend-i
//!                                            │ lbvip (NOARP): route 10.96.0.0/16, src 10.200.0.1
//! ```
//!
//! The node routes between client and backends. lb is attached to the client-facing
//! interface (TC or XDP, the mode under test), to every backend-facing interface (TC,
//! for the replies) and to `lbvip`, the device the node's own connections to a VIP are
//! routed to, so TC egress balances them. Transmit checksum offload is off on every
//! veth so each receiving kernel verifies the checksums lb rewrote. GRO is on at the
//! client's and the backends' ends, as on a pod's veth that XDP may redirect to.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{Context as _, Result};
use lb::{
    agent::{Agent, InterfaceSpec},
    config::{self, Config},
    dataplane::AttachMode,
};

use crate::{add_dummy, add_route, veth, HttpNameServer, Netns, UdpNameServer};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const HTTP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 53;
pub const BACKEND_HTTP_PORT: u16 = 8080;
pub const BACKEND_UDP_PORT: u16 = 5353;
pub const BACKEND_COUNT: u8 = 3;
/// The client's address: connections through lb reach a backend from it (lb rewrites only
/// the destination), so a backend's replies are routed back to it.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);

pub fn backend_addr(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, i, 2)
}

pub fn backend_name(i: u8) -> String {
    format!("backend-{i}")
}

pub fn vip_http() -> SocketAddr {
    (VIP, HTTP_PORT).into()
}

pub fn vip_udp() -> SocketAddr {
    (VIP, UDP_PORT).into()
}

/// The agent configuration for the test bed, with `backends` (by number) in each service.
pub fn config_yaml(backends: &[u8], extra_dataplane: &str) -> String {
    let list = |port: u16| -> String {
        backends
            .iter()
            .map(|&i| format!("      - {{ address: {}, port: {port} }}\n", backend_addr(i)))
            .collect()
    };
    format!(
        "dataplane:\n  max_connections: 65536\n{extra_dataplane}services:\n  - name: web\n    vip: {VIP}\n    port: {HTTP_PORT}\n    backends:\n{}  - name: dns\n    vip: {VIP}\n    port: {UDP_PORT}\n    protocol: UDP\n    backends:\n{}",
        list(BACKEND_HTTP_PORT),
        list(BACKEND_UDP_PORT)
    )
}

pub fn config(backends: &[u8]) -> Config {
    config::parse(&config_yaml(backends, "")).expect("test configuration is valid")
}

pub struct Backend {
    pub ns: Netns,
    /// Its end of the link to the node.
    pub ifname: String,
    pub http: HttpNameServer,
    pub udp: UdpNameServer,
}

impl Backend {
    /// Makes the backend's kernel discard everything it sends to `to`
    /// (`ip route add blackhole TO/32` in its namespace): a backend that receives but never
    /// answers. To the client ([`CLIENT_ADDR`]), its SYN-ACKs vanish and a connection attempt
    /// only times out. Replies to other addresses (the node) still go out. Lasts until
    /// [`Backend::restore_replies_to`] or the end of the test bed.
    pub fn black_hole_replies_to(&self, to: Ipv4Addr) -> Result<()> {
        add_route(&self.ns, &format!("blackhole {to}/32"))
            .with_context(|| format!("black-holing {to} in netns {}", self.ns.name()))
    }

    /// Undoes [`Backend::black_hole_replies_to`].
    pub fn restore_replies_to(&self, to: Ipv4Addr) -> Result<()> {
        self.ns
            .ip(&["route", "del", "blackhole", &format!("{to}/32")])
            .with_context(|| {
                format!(
                    "removing the black hole for {to} in netns {}",
                    self.ns.name()
                )
            })?;
        Ok(())
    }
}

/// The namespaces, links and servers, without the agent.
pub struct TestBed {
    pub client: Netns,
    /// The client's end of its link to the node.
    pub client_if: String,
    pub node: Netns,
    pub backends: Vec<Backend>,
    /// Interfaces lb attaches to, in the node.
    pub interfaces: Vec<InterfaceSpec>,
}

impl TestBed {
    /// Builds the test bed with three backends named `backend-1..3`; `client_mode` is how
    /// lb attaches to the client-facing side.
    pub fn new(client_mode: AttachMode) -> Result<Self> {
        let names: Vec<String> = (1..=BACKEND_COUNT).map(backend_name).collect();
        Self::with_backends(client_mode, &names)
    }

    /// Builds the test bed with one backend per name; backend `i` (from 1) has address
    /// `10.200.i.2` and its servers answer with its name.
    pub fn with_backends(client_mode: AttachMode, names: &[String]) -> Result<Self> {
        let client = Netns::new("cli")?;
        let node = Netns::new("node")?;
        node.set_sysctl("net/ipv4/ip_forward", "1")?;
        for conf in ["all", "default"] {
            node.set_sysctl(&format!("net/ipv4/conf/{conf}/rp_filter"), "0")?;
        }
        let (cli_if, node_cli_if) =
            veth::link(&client, "c", "10.200.0.2/24", &node, "nc", "10.200.0.1/24")?;
        add_route(&client, "default via 10.200.0.1")?;
        veth::disable_tx_checksum_offload(&client, &cli_if)?;
        veth::disable_tx_checksum_offload(&node, &node_cli_if)?;
        veth::set_gro(&client, &cli_if, true)?;
        let mut interfaces = vec![InterfaceSpec {
            name: node_cli_if,
            mode: client_mode,
        }];

        let mut backends = Vec::new();
        for (i, name) in (1u8..).zip(names) {
            let ns = Netns::new(&format!("be{i}"))?;
            let (node_if, be_if) = veth::link(
                &node,
                &format!("nb{i}"),
                &format!("10.200.{i}.1/24"),
                &ns,
                "b",
                &format!("10.200.{i}.2/24"),
            )?;
            add_route(&ns, &format!("default via 10.200.{i}.1"))?;
            veth::disable_tx_checksum_offload(&ns, &be_if)?;
            veth::disable_tx_checksum_offload(&node, &node_if)?;
            veth::set_gro(&ns, &be_if, true)?;
            interfaces.push(InterfaceSpec {
                name: node_if,
                mode: AttachMode::Tc,
            });
            let http =
                HttpNameServer::start(&ns, (backend_addr(i), BACKEND_HTTP_PORT).into(), name)?;
            let udp = UdpNameServer::start(&ns, (backend_addr(i), BACKEND_UDP_PORT).into(), name)?;
            backends.push(Backend {
                ns,
                ifname: be_if,
                http,
                udp,
            });
        }

        // The node's own connections to a VIP: routed to a NOARP device, so no neighbour
        // lookup for the VIP is attempted, and seen by lb's TC egress program there.
        let vip_dev = add_dummy(&node, "lbvip")?;
        add_route(&node, &format!("10.96.0.0/16 dev {vip_dev} src 10.200.0.1"))?;
        interfaces.push(InterfaceSpec {
            name: vip_dev,
            mode: AttachMode::Tc,
        });
        Ok(Self {
            client,
            client_if: cli_if,
            node,
            backends,
            interfaces,
        })
    }

    /// Starts lb's agent (in-process, the same code as `lb agent`) in the node.
    pub fn start_agent(&self, config: Config) -> Result<Agent> {
        let interfaces = self.interfaces.clone();
        self.node
            .run(move || Agent::start(config, &interfaces, None))
            .context("starting the agent in the node namespace")
    }
}

#[cfg(test)]
mod tests {
    use std::{io, net::TcpStream, time::Duration};

    use super::*;
    use crate::{http_get, require_root, DEFAULT_TIMEOUT};

    /// Without lb (routed by the node): a black-holed backend's SYN-ACKs never reach the
    /// client, so its connects time out while the other backend still answers; restoring
    /// the route brings it back.
    #[test]
    fn black_holed_backend_never_answers_the_client() {
        if !require_root() {
            return;
        }
        let names = vec!["be1".to_string(), "be2".to_string()];
        let bed = TestBed::with_backends(AttachMode::Tc, &names).unwrap();
        let direct = |i: u8| SocketAddr::from((backend_addr(i), BACKEND_HTTP_PORT));
        let get = |i: u8| bed.client.run(|| http_get(direct(i), "/", DEFAULT_TIMEOUT));
        assert_eq!(get(1).unwrap(), "be1");

        bed.backends[0].black_hole_replies_to(CLIENT_ADDR).unwrap();
        let err = bed
            .client
            .run(|| TcpStream::connect_timeout(&direct(1), Duration::from_millis(1500)))
            .expect_err("a black-holed backend completed a handshake");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert_eq!(get(2).unwrap(), "be2", "only backend 1 is black-holed");

        bed.backends[0].restore_replies_to(CLIENT_ADDR).unwrap();
        assert_eq!(get(1).unwrap(), "be1");
    }
}
