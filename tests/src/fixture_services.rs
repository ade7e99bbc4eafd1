//! The services the BPF_PROG_TEST_RUN tests program (the fixtures and the packet fuzzer):
//! web (TCP, three backends), dns (UDP), an empty service on another VIP, and api (TCP,
//! flagged HTTP).

use std::net::Ipv4Addr;

use lb::dataplane::{
    sync::{DesiredBackend, DesiredService},
    Frontend, Protocol,
};
use lb_common::BackendState;

use crate::Netns;

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const OTHER_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
pub const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 200, 1, 2),
    Ipv4Addr::new(10, 200, 2, 2),
    Ipv4Addr::new(10, 200, 3, 2),
];
pub const WEB: Frontend = Frontend {
    vip: VIP,
    port: 80,
    protocol: Protocol::Tcp,
};
pub const DNS: Frontend = Frontend {
    vip: VIP,
    port: 53,
    protocol: Protocol::Udp,
};
pub const EMPTY: Frontend = Frontend {
    vip: OTHER_VIP,
    port: 80,
    protocol: Protocol::Tcp,
};
/// Published with the HTTP flag: the data plane reads response statuses.
pub const API: Frontend = Frontend {
    vip: VIP,
    port: 8000,
    protocol: Protocol::Tcp,
};
/// The one backend of `API`.
pub const API_BACKEND: (Ipv4Addr, u16) = (BACKENDS[0], 8000);

/// The MAC address the programs' route lookup finds for the interface towards the
/// backends, in the namespace the tests of rewritten packets run in.
pub const ROUTE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

/// The MAC address the programs' route lookup finds for backend `addr` (a permanent
/// neighbour entry in [`routed_netns`]).
pub fn backend_mac(addr: Ipv4Addr) -> [u8; 6] {
    let o = addr.octets();
    [0x02, 0, 0, 0x0b, o[2], o[3]]
}

/// A namespace (named after `prefix`) where the programs' route lookup
/// (`bpf_fib_lookup`) finds the backends, so a re-sent SYN is redirected with known
/// addresses: `lbr0` (MAC [`ROUTE_MAC`], 10.200.0.1/16) with a permanent neighbour per
/// backend ([`backend_mac`]), GRO on `lbr0`'s peer (so XDP may redirect to `lbr0`), and
/// forwarding on, without which the lookup answers nothing. BPF_PROG_TEST_RUN runs a program in the caller's namespace (input lookup on
/// its loopback): the host's routes and settings would make results depend on the
/// machine.
pub fn routed_netns(prefix: &str) -> Netns {
    let ns = Netns::new(prefix).expect("a namespace for the TC programs");
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let setup = || -> anyhow::Result<()> {
        let route_mac = mac(ROUTE_MAC);
        ns.ip(&[
            "link", "add", "lbr0", "address", &route_mac, "type", "veth", "peer", "name", "lbr1",
        ])?;
        ns.ip(&["link", "set", "lbr0", "up"])?;
        ns.ip(&["link", "set", "lbr1", "up"])?;
        ns.ip(&["addr", "add", "10.200.0.1/16", "dev", "lbr0"])?;
        for b in BACKENDS {
            let lladdr = mac(backend_mac(b));
            ns.ip(&[
                "neigh",
                "add",
                &b.to_string(),
                "lladdr",
                &lladdr,
                "dev",
                "lbr0",
                "nud",
                "permanent",
            ])?;
        }
        // lbr0 takes XDP frames (XDP may redirect to it) while its peer has GRO on.
        crate::veth::set_gro(&ns, "lbr1", true)?;
        ns.set_sysctl("net.ipv4.conf.all.forwarding", "1")
    };
    setup().expect("routes and neighbours for the TC programs");
    ns
}

/// The services, web's backends in `states` (all at priority 0, weight 1).
pub fn desired(states: [BackendState; 3]) -> Vec<DesiredService> {
    let backend = |addr, port, state| DesiredBackend {
        addr,
        port,
        weight: 1,
        state,
        priority: Some(0),
    };
    vec![
        DesiredService {
            name: "web".into(),
            frontend: WEB,
            backends: BACKENDS
                .iter()
                .zip(states)
                .map(|(&a, state)| backend(a, 8080, state))
                .collect(),
            http: false,
            session_affinity: None,
            tls: false,
        },
        DesiredService {
            name: "dns".into(),
            frontend: DNS,
            backends: vec![backend(BACKENDS[0], 5353, BackendState::Active)],
            http: false,
            session_affinity: None,
            tls: false,
        },
        DesiredService {
            name: "empty".into(),
            frontend: EMPTY,
            backends: vec![],
            http: false,
            session_affinity: None,
            tls: false,
        },
        // Last, so the ids of the others do not change (ids are allocated in this order).
        DesiredService {
            name: "api".into(),
            frontend: API,
            backends: vec![backend(API_BACKEND.0, API_BACKEND.1, BackendState::Active)],
            http: true,
            session_affinity: None,
            tls: false,
        },
    ]
}
