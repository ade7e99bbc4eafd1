//! The services the BPF_PROG_TEST_RUN tests program (the fixtures and the packet fuzzer):
//! web (TCP, three backends), dns (UDP), an empty service on another VIP, and api (TCP,
//! flagged HTTP).

use std::net::Ipv4Addr;

use lb::dataplane::{
    sync::{DesiredBackend, DesiredService},
    Frontend, Protocol,
};
use lb_common::BackendState;

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

/// The MAC address the TC program's route lookup finds for the interface towards the
/// backends, in the namespace the TC tests run in.
pub const ROUTE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

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
        },
        DesiredService {
            name: "dns".into(),
            frontend: DNS,
            backends: vec![backend(BACKENDS[0], 5353, BackendState::Active)],
            http: false,
        },
        DesiredService {
            name: "empty".into(),
            frontend: EMPTY,
            backends: vec![],
            http: false,
        },
        // Last, so the ids of the others do not change (ids are allocated in this order).
        DesiredService {
            name: "api".into(),
            frontend: API,
            backends: vec![backend(API_BACKEND.0, API_BACKEND.1, BackendState::Active)],
            http: true,
        },
    ]
}
