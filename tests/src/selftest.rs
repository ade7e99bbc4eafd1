//! The harness exercised for real, with no load balancer: two hosts on one veth pair.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use crate::{
    body_pattern, http_get, require_root,
    servers::{SLOW_CHUNKS, SLOW_CHUNK_DELAY},
    udp_request, veth, HttpNameServer, KeepAliveClient, Netns, UdpNameServer, DEFAULT_TIMEOUT,
};

/// A client and a server host joined by a veth pair (dual stack), checksum offload off.
struct TwoHosts {
    client: Netns,
    server: Netns,
}

fn two_hosts() -> TwoHosts {
    let client = Netns::new("cli").unwrap();
    let server = Netns::new("srv").unwrap();
    let (client_if, server_if) = veth::link(
        &client,
        "eth",
        "10.200.1.1/24, fd00:200:1::1/64",
        &server,
        "eth",
        "10.200.1.2/24, fd00:200:1::2/64",
    )
    .unwrap();
    veth::disable_tx_checksum_offload(&client, &client_if).unwrap();
    veth::disable_tx_checksum_offload(&server, &server_if).unwrap();
    TwoHosts { client, server }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn http_get_across_veth() {
    if !require_root() {
        return;
    }
    let hosts = two_hosts();
    let server = HttpNameServer::start(&hosts.server, addr("10.200.1.2:8080"), "be1").unwrap();
    for _ in 0..3 {
        let body = hosts
            .client
            .run(|| http_get(server.addr(), "/", DEFAULT_TIMEOUT))
            .unwrap();
        assert_eq!(body, "be1");
    }
    assert_eq!(server.accepted(), 3, "one connection per http_get");
    let err = hosts
        .client
        .run(|| http_get(server.addr(), "/nope", DEFAULT_TIMEOUT))
        .unwrap_err();
    assert!(format!("{err:#}").contains("404"), "{err:#}");
}

#[test]
fn http_get_over_ipv6() {
    if !require_root() {
        return;
    }
    let hosts = two_hosts();
    let server = HttpNameServer::start(&hosts.server, addr("[::]:0"), "be6").unwrap();
    let target = addr(&format!("[fd00:200:1::2]:{}", server.addr().port()));
    let body = hosts
        .client
        .run(|| http_get(target, "/", DEFAULT_TIMEOUT))
        .unwrap();
    assert_eq!(body, "be6");
}

#[test]
fn keep_alive_uses_one_connection() {
    if !require_root() {
        return;
    }
    let hosts = two_hosts();
    let server = HttpNameServer::start(&hosts.server, addr("10.200.1.2:8080"), "be1").unwrap();
    // Created in the client namespace, used from the test thread.
    let mut client = hosts
        .client
        .run(|| KeepAliveClient::connect(server.addr(), DEFAULT_TIMEOUT))
        .unwrap();
    for _ in 0..5 {
        assert_eq!(client.get("/").unwrap(), "be1");
    }
    assert_eq!(
        client.get("/bytes/100000").unwrap(),
        body_pattern("be1", 100000)
    );
    assert_eq!(client.get("/").unwrap(), "be1");
    assert_eq!(server.accepted(), 1);
}

#[test]
fn long_and_slow_transfers() {
    if !require_root() {
        return;
    }
    let hosts = two_hosts();
    let server = HttpNameServer::start(&hosts.server, addr("10.200.1.2:8080"), "be1").unwrap();
    let big = 4 << 20;
    let body = hosts
        .client
        .run(|| http_get(server.addr(), &format!("/bytes/{big}"), DEFAULT_TIMEOUT))
        .unwrap();
    assert!(body == body_pattern("be1", big), "4 MiB body differs");

    let started = Instant::now();
    let body = hosts
        .client
        .run(|| http_get(server.addr(), "/slow/10000", DEFAULT_TIMEOUT))
        .unwrap();
    let took = started.elapsed();
    assert_eq!(body, body_pattern("be1", 10000));
    let expected = SLOW_CHUNK_DELAY * (SLOW_CHUNKS as u32 - 1);
    assert!(
        took >= expected && took < expected + Duration::from_secs(2),
        "slow transfer took {took:?}"
    );
}

#[test]
fn udp_round_trip() {
    if !require_root() {
        return;
    }
    let hosts = two_hosts();
    let server = UdpNameServer::start(&hosts.server, addr("10.200.1.2:5353"), "udp1").unwrap();
    for _ in 0..3 {
        let reply = hosts
            .client
            .run(|| udp_request(server.addr(), b"who?", DEFAULT_TIMEOUT))
            .unwrap();
        assert_eq!(reply, "udp1");
    }
    assert_eq!(server.received(), 3);

    let server6 = UdpNameServer::start(&hosts.server, addr("[fd00:200:1::2]:0"), "udp6").unwrap();
    let reply = hosts
        .client
        .run(|| udp_request(server6.addr(), b"who?", DEFAULT_TIMEOUT))
        .unwrap();
    assert_eq!(reply, "udp6");
}

#[test]
fn udp_timeout_is_an_error() {
    if !require_root() {
        return;
    }
    let hosts = two_hosts();
    let started = Instant::now();
    let err = hosts
        .client
        .run(|| udp_request(addr("10.200.1.2:9"), b"x", Duration::from_millis(300)))
        .unwrap_err();
    assert!(format!("{err:#}").contains("no reply"), "{err:#}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn servers_stop_quickly_even_with_open_connections() {
    if !require_root() {
        return;
    }
    let hosts = two_hosts();
    let http = HttpNameServer::start(&hosts.server, addr("10.200.1.2:8080"), "be1").unwrap();
    let udp = UdpNameServer::start(&hosts.server, addr("10.200.1.2:5353"), "udp1").unwrap();
    // An idle kept connection and a slow transfer in flight: both block server threads.
    let mut idle = hosts
        .client
        .run(|| KeepAliveClient::connect(http.addr(), DEFAULT_TIMEOUT))
        .unwrap();
    assert_eq!(idle.get("/").unwrap(), "be1");
    let slow_target = http.addr();
    let slow = hosts
        .client
        .spawn(move || http_get(slow_target, "/slow/100000", DEFAULT_TIMEOUT))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let started = Instant::now();
    drop(http);
    drop(udp);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "servers took {:?} to stop",
        started.elapsed()
    );
    assert!(slow.join().unwrap().is_err(), "the slow transfer was cut");
    assert!(idle.get("/").is_err(), "the kept connection was closed");
}

#[test]
fn unreachable_server_fails_fast() {
    if !require_root() {
        return;
    }
    let hosts = two_hosts();
    let started = Instant::now();
    // Nothing listens: the server host answers with a reset.
    let err = hosts
        .client
        .run(|| http_get(addr("10.200.1.2:8081"), "/", DEFAULT_TIMEOUT))
        .unwrap_err();
    assert!(format!("{err:#}").contains("10.200.1.2:8081"), "{err:#}");
    // No host at all: the connect timeout ends it.
    let err = hosts
        .client
        .run(|| http_get(addr("10.200.1.3:8080"), "/", Duration::from_millis(500)))
        .unwrap_err();
    assert!(format!("{err:#}").contains("10.200.1.3:8080"), "{err:#}");
    assert!(started.elapsed() < Duration::from_secs(5));
}
