//! lb end to end: real connections from a client namespace through the node running lb
//! to three backend namespaces (see `lb_tests::topology`). Each test builds its own
//! test bed with unique names and removes it when done, also on failure.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use lb::dataplane::{AttachMode, Frontend, Protocol};
use lb_common::{ConnDirection, Counter};
use lb_tests::{
    body_pattern, http_get, names_from, require_root,
    topology::{self, backend_name, vip_http, vip_udp, TestBed, BACKEND_COUNT, VIP},
    udp_request, KeepAliveClient, DEFAULT_TIMEOUT,
};

const REQUESTS: usize = 300;
/// A fair share of 300 connections over 3 backends is 100. The hash of random ephemeral
/// ports gives a binomial spread (σ ≈ 8.2), so 60..=140 (about ±5σ) never fails by chance
/// while a broken spread (a backend starved or favoured) does.
const FAIR_SHARE: std::ops::RangeInclusive<usize> = 60..=140;

const WEB: Frontend = Frontend {
    vip: VIP,
    port: 80,
    protocol: Protocol::Tcp,
};

fn tally(names: impl IntoIterator<Item = String>) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for n in names {
        *t.entry(n).or_default() += 1;
    }
    t
}

fn assert_fair(t: &BTreeMap<String, usize>, total: usize) {
    assert_eq!(t.values().sum::<usize>(), total, "{t:?}");
    for i in 1..=BACKEND_COUNT {
        let n = t.get(&backend_name(i)).copied().unwrap_or(0);
        assert!(
            FAIR_SHARE.contains(&n),
            "{} got {n} of {total}: {t:?}",
            backend_name(i)
        );
    }
}

/// New connections are spread fairly, each one stays on its backend, and replies come
/// from the VIP (the client connects to the VIP and would reset anything else).
fn spread_and_stickiness(mode: AttachMode) {
    if !require_root() {
        return;
    }
    let bed = TestBed::new(mode).unwrap();
    let agent = bed.start_agent(topology::config(&[1, 2, 3])).unwrap();

    let names = names_from(&bed.client, vip_http(), REQUESTS).unwrap();
    let t = tally(names);
    println!("{mode:?}: {REQUESTS} new connections: {t:?}");
    assert_fair(&t, REQUESTS);
    // Each request was its own connection, accepted by the backend that answered.
    let accepted: u64 = bed.backends.iter().map(|b| b.http.accepted()).sum();
    assert_eq!(accepted, REQUESTS as u64);
    let dp = &agent.dataplane;
    assert!(dp.counter(Counter::ForwardNew).unwrap() >= REQUESTS as u64);
    assert!(dp.counter(Counter::ReplyTracked).unwrap() >= REQUESTS as u64);
    assert_eq!(dp.counter(Counter::DropRewriteFailed).unwrap(), 0);
    let svc = agent.programmer.service_id(&WEB).unwrap();
    assert_eq!(
        dp.service_stats(svc).unwrap().new_connections,
        REQUESTS as u64
    );

    // A keep-alive connection stays on one backend for all its requests.
    let before: Vec<u64> = bed.backends.iter().map(|b| b.http.accepted()).collect();
    let bodies: Vec<String> = bed.client.run(|| {
        let mut c = KeepAliveClient::connect(vip_http(), DEFAULT_TIMEOUT).unwrap();
        (0..20).map(|_| c.get("/").unwrap()).collect()
    });
    let t = tally(bodies);
    assert_eq!(
        t.len(),
        1,
        "keep-alive requests went to several backends: {t:?}"
    );
    let after: Vec<u64> = bed.backends.iter().map(|b| b.http.accepted()).collect();
    let new_conns: u64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
    assert_eq!(new_conns, 1, "the keep-alive client opened one connection");
}

#[test]
fn tc_spreads_new_connections_and_keeps_each_on_its_backend() {
    spread_and_stickiness(AttachMode::Tc);
}

#[test]
fn xdp_spreads_new_connections_and_keeps_each_on_its_backend() {
    spread_and_stickiness(AttachMode::Xdp);
}

/// A transfer in flight keeps its backend while the selection table changes under it
/// (here: its backend is taken out of the service), and new connections follow the new
/// table at once.
#[test]
fn long_transfer_survives_a_selection_table_change() {
    if !require_root() {
        return;
    }
    let bed = TestBed::new(AttachMode::Tc).unwrap();
    let mut agent = bed.start_agent(topology::config(&[1, 2, 3])).unwrap();
    let len = 200_000;
    let path = format!("/slow/{len}");

    std::thread::scope(|s| {
        let transfer = s.spawn(|| {
            bed.client
                .run(|| http_get(vip_http(), &path, Duration::from_secs(10)))
        });
        // Find the transfer's backend in the connection table once it has started.
        let deadline = Instant::now() + Duration::from_secs(5);
        let serving = loop {
            let entries = agent.dataplane.connections().unwrap();
            let fwd = entries.iter().find(|(k, e)| {
                e.direction == ConnDirection::Original as u8 && k.dst_port_be == 80u16.to_be()
            });
            if let Some((_, e)) = fwd {
                break Ipv4Addr::from(e.nat_addr.v4_octets());
            }
            assert!(
                Instant::now() < deadline,
                "the transfer never showed up in the table"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let serving_no = serving.octets()[2];
        let table_before = agent.dataplane.selection_table(&WEB).unwrap();
        let serving_id = agent
            .programmer
            .backend_id(&WEB, serving, topology::BACKEND_HTTP_PORT)
            .unwrap();
        let rest: Vec<u8> = (1..=BACKEND_COUNT).filter(|&i| i != serving_no).collect();
        agent.reload(topology::config(&rest)).unwrap();
        let table_after = agent.dataplane.selection_table(&WEB).unwrap();
        assert_ne!(table_before, table_after, "the selection table changed");
        assert!(
            !table_after.contains(&serving_id),
            "the new table no longer names the transfer's backend"
        );

        // New connections no longer reach the removed backend.
        let names = names_from(&bed.client, vip_http(), 30).unwrap();
        assert!(!names.contains(&backend_name(serving_no)), "{names:?}");

        let body = transfer
            .join()
            .unwrap()
            .expect("the long transfer completed");
        assert_eq!(body.len(), len);
        assert_eq!(
            body,
            body_pattern(&backend_name(serving_no), len),
            "the whole body came from one backend"
        );
    });
}

/// Connections the node itself opens to a VIP are balanced by the TC egress program.
#[test]
fn connections_from_the_node_itself_are_balanced() {
    if !require_root() {
        return;
    }
    let bed = TestBed::new(AttachMode::Tc).unwrap();
    let _agent = bed.start_agent(topology::config(&[1, 2, 3])).unwrap();
    let names = names_from(&bed.node, vip_http(), REQUESTS).unwrap();
    let t = tally(names);
    println!("node-originated: {t:?}");
    assert_fair(&t, REQUESTS);
}

/// UDP requests reach a backend through the VIP and the answers come back from the VIP
/// (`udp_request` refuses an answer from any other source).
#[test]
fn udp_round_trips_through_the_vip() {
    if !require_root() {
        return;
    }
    let bed = TestBed::new(AttachMode::Tc).unwrap();
    let agent = bed.start_agent(topology::config(&[1, 2, 3])).unwrap();
    let names: Vec<String> = bed.client.run(|| {
        (0..REQUESTS)
            .map(|i| {
                udp_request(vip_udp(), b"who", DEFAULT_TIMEOUT)
                    .unwrap_or_else(|e| panic!("request {i}: {e:#}"))
            })
            .collect()
    });
    let t = tally(names);
    println!("UDP: {t:?}");
    assert_fair(&t, REQUESTS);
    let received: u64 = bed.backends.iter().map(|b| b.udp.received()).sum();
    assert_eq!(received, REQUESTS as u64);
    assert!(agent.dataplane.counter(Counter::ReplyTracked).unwrap() >= REQUESTS as u64);
}

/// Path MTU discovery works through the VIP. The node's link towards the client carries
/// at most 1280 bytes while the client advertises an MSS for 1500, so the backend's
/// full-size segments cannot be forwarded: the node answers "fragmentation needed" to
/// their source, which after reverse NAT is the VIP. lb translates that error (TC egress
/// on the VIP's device) and delivers it to the backend, which lowers its path MTU and
/// resends; without it the transfer would stall.
#[test]
fn path_mtu_discovery_works_through_the_vip() {
    if !require_root() {
        return;
    }
    let bed = TestBed::new(AttachMode::Tc).unwrap();
    let agent = bed.start_agent(topology::config(&[1, 2, 3])).unwrap();
    let towards_client = &bed.interfaces[0].name;
    bed.node
        .ip(&["link", "set", towards_client, "mtu", "1280"])
        .unwrap();
    let len = 300_000;
    let body = bed
        .client
        .run(|| {
            http_get(
                vip_http(),
                &format!("/bytes/{len}"),
                Duration::from_secs(10),
            )
        })
        .expect("the transfer completes");
    assert_eq!(body.len(), len);
    let translated = agent.dataplane.counter(Counter::ForwardIcmpError).unwrap();
    assert!(translated >= 1, "no ICMP error was translated");
}
