//! Session affinity (Kubernetes `sessionAffinity: ClientIP`) end to end: real connections
//! from a client namespace through the node running lb's agent to three backends (see
//! `lb_tests::topology`). With affinity, every new connection of one client address
//! reaches one backend; a second address of the client namespace is a second client,
//! with a backend of its own (possibly the same). Switched off by a reload, the same
//! client's connections spread again.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use lb::{
    config::Config,
    dataplane::{AttachMode, Frontend, Protocol},
};
use lb_common::Counter;
use lb_tests::{
    add_address, http_get_from, names_from, require_root,
    topology::{self, vip_http, TestBed, CLIENT_ADDR, HTTP_PORT, VIP},
    DEFAULT_TIMEOUT,
};

/// New connections per client.
const CONNECTIONS: usize = 30;
/// The client namespace's second address.
const SECOND_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);

const WEB: Frontend = Frontend {
    vip: VIP,
    port: HTTP_PORT,
    protocol: Protocol::Tcp,
};

fn tally(names: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for n in names {
        *t.entry(n).or_default() += 1;
    }
    t
}

/// The test bed's configuration, web with `affinity`.
fn config(affinity: Option<Duration>) -> Config {
    let mut config = topology::config(&[1, 2, 3]);
    let web = config
        .services
        .iter_mut()
        .find(|s| s.frontend == WEB)
        .expect("the test bed has web");
    web.session_affinity = affinity;
    config
}

/// The client namespace's interface that holds `CLIENT_ADDR`.
fn client_interface(bed: &TestBed) -> String {
    let out = bed.client.ip(&["-o", "-4", "addr", "show"]).unwrap();
    out.lines()
        .find(|l| l.contains(&format!("{CLIENT_ADDR}/")))
        .and_then(|l| l.split_whitespace().nth(1))
        .expect("the client's interface")
        .to_string()
}

fn affinity_end_to_end(mode: AttachMode) {
    if !require_root() {
        return;
    }
    let bed = TestBed::new(mode).unwrap();
    add_address(
        &bed.client,
        &client_interface(&bed),
        &format!("{SECOND_CLIENT}/24"),
    )
    .unwrap();
    let mut agent = bed
        .start_agent(config(Some(Duration::from_secs(10800))))
        .unwrap();
    let svc = agent.programmer.service_id(&WEB).unwrap();
    assert_eq!(agent.dataplane.affinity_timeout(svc).unwrap(), 10800);

    let first = tally(names_from(&bed.client, vip_http(), CONNECTIONS).unwrap());
    let second = tally(
        bed.client
            .run(|| {
                (0..CONNECTIONS)
                    .map(|_| http_get_from(SECOND_CLIENT, vip_http(), "/", DEFAULT_TIMEOUT))
                    .collect::<anyhow::Result<Vec<_>>>()
            })
            .unwrap(),
    );
    println!("{mode:?}: {CLIENT_ADDR}: {first:?}, {SECOND_CLIENT}: {second:?}");
    assert_eq!(
        first.len(),
        1,
        "{CLIENT_ADDR} reached several backends: {first:?}"
    );
    assert_eq!(
        second.len(),
        1,
        "{SECOND_CLIENT} reached several backends: {second:?}"
    );
    // Every request was a new connection, accepted by the backend that answered.
    let accepted: u64 = bed.backends.iter().map(|b| b.http.accepted()).sum();
    assert_eq!(accepted, 2 * CONNECTIONS as u64);
    // One balanced connection per client, the others followed its entry.
    let dp = &agent.dataplane;
    assert_eq!(dp.counter(Counter::EventAffinityMiss).unwrap(), 2);
    assert_eq!(
        dp.counter(Counter::EventAffinityHit).unwrap(),
        2 * CONNECTIONS as u64 - 2
    );
    let clients: Vec<Ipv4Addr> = dp
        .affinity_entries()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.service_id == svc)
        .map(|(k, _)| Ipv4Addr::from(k.client.v4_octets()))
        .collect();
    assert_eq!(clients.len(), 2, "one entry per client: {clients:?}");

    // Switched off: the timeout is cleared and the same client's connections spread.
    agent.reload(config(None)).unwrap();
    assert_eq!(agent.dataplane.affinity_timeout(svc).unwrap(), 0);
    let spread = tally(names_from(&bed.client, vip_http(), CONNECTIONS).unwrap());
    println!("{mode:?}: without affinity, {CLIENT_ADDR}: {spread:?}");
    assert!(spread.len() > 1, "without affinity: {spread:?}");
}

#[test]
fn tc_session_affinity_keeps_each_client_on_one_backend() {
    affinity_end_to_end(AttachMode::Tc);
}

#[test]
fn xdp_session_affinity_keeps_each_client_on_one_backend() {
    affinity_end_to_end(AttachMode::Xdp);
}
