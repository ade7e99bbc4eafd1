//! The kernel side of TLS origination: a `SERVICE_TLS` frontend's VIP is a local address,
//! TC and XDP pass its packets, and `lb_sk_lookup` hands its connections to one listener
//! bound elsewhere (`Dataplane::steer_tls`), with the VIP and port the client called as
//! the accepted socket's local address; from the client's namespace (through TC or XDP
//! ingress) and from the node itself.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use lb::dataplane::{AttachMode, Dataplane, DataplaneOptions, Frontend, Protocol};
use lb_common::{maps::SERVICE_TLS, Counter};
use lb_tests::{require_root, topology::TestBed, DEFAULT_TIMEOUT};

/// A VIP of its own (TLS frontends own their VIP: a local VIP takes every port of it).
const TLS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 7);

fn frontend() -> Frontend {
    Frontend {
        vip: TLS_VIP,
        port: 80,
        protocol: Protocol::Tcp,
    }
}

/// Loads and attaches the data plane in the node, publishes the TLS frontend, makes its
/// VIP local, and returns the data plane with a listener on the node's loopback that
/// `lb_sk_lookup` steers to.
fn steered(bed: &TestBed) -> (Dataplane, TcpListener) {
    bed.node
        .ip(&[
            "route",
            "add",
            "local",
            &format!("{TLS_VIP}/32"),
            "dev",
            "lo",
        ])
        .unwrap();
    bed.node.run(|| {
        let mut dp = Dataplane::load(&DataplaneOptions::default()).unwrap();
        for iface in &bed.interfaces {
            dp.attach(&iface.name, iface.mode).unwrap();
        }
        dp.publish_service(1, &frontend(), &[], &[], SERVICE_TLS, 0)
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        dp.steer_tls(&listener).unwrap();
        (dp, listener)
    })
}

/// Connects from `ns` to the TLS VIP, and on the node accepts it: the accepted socket's
/// local and peer addresses, and a byte each way.
fn connect_and_accept(ns: &lb_tests::Netns, listener: &TcpListener) -> (SocketAddr, SocketAddr) {
    let to = SocketAddr::from((TLS_VIP, 80));
    let mut client = ns
        .run(|| TcpStream::connect_timeout(&to, DEFAULT_TIMEOUT))
        .expect("the VIP accepts");
    listener.set_nonblocking(false).unwrap();
    let (mut accepted, peer) = listener.accept().unwrap();
    let local = accepted.local_addr().unwrap();
    client.write_all(b"?").unwrap();
    let mut byte = [0u8; 1];
    accepted.read_exact(&mut byte).unwrap();
    accepted.write_all(b"!").unwrap();
    client.read_exact(&mut byte).unwrap();
    assert_eq!(&byte, b"!");
    (local, peer)
}

fn steers(mode: AttachMode) {
    if !require_root() {
        return;
    }
    let bed = TestBed::new(mode).unwrap();
    let (mut dp, listener) = steered(&bed);
    let passed_before = dp.counter(Counter::PassTlsOrigination).unwrap();

    let (local, peer) = connect_and_accept(&bed.client, &listener);
    assert_eq!(
        local,
        SocketAddr::from((TLS_VIP, 80)),
        "the frontend called"
    );
    assert_eq!(peer.ip(), lb_tests::topology::CLIENT_ADDR);
    let passed = dp.counter(Counter::PassTlsOrigination).unwrap() - passed_before;
    assert!(passed >= 3, "the connection's packets passed: {passed}");
    assert_eq!(dp.counter(Counter::ForwardNew).unwrap(), 0);

    // The node's own connection: over loopback, the same hook.
    let (local, _) = connect_and_accept(&bed.node, &listener);
    assert_eq!(local, SocketAddr::from((TLS_VIP, 80)));

    // Another port of the VIP is not a frontend: refused by the kernel as usual.
    let other = SocketAddr::from((TLS_VIP, 81));
    let refused = bed
        .client
        .run(|| TcpStream::connect_timeout(&other, DEFAULT_TIMEOUT));
    assert_eq!(
        refused.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );

    // No listener in the slot (the forwarder gone, an agent restarting): the SYN is
    // dropped, and the client's retransmission reaches the listener put there meanwhile.
    drop(listener);
    let dropped_before = dp.counter(Counter::DropTlsNoForwarder).unwrap();
    let to = SocketAddr::from((TLS_VIP, 80));
    let next = bed.node.run(|| TcpListener::bind("127.0.0.1:0").unwrap());
    std::thread::scope(|scope| {
        let connecting = scope.spawn(|| {
            let started = Instant::now();
            let connected = bed
                .client
                .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)));
            (connected.map(|_| ()), started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(300));
        let dropped = dp.counter(Counter::DropTlsNoForwarder).unwrap() - dropped_before;
        assert!(dropped >= 1, "the SYN is held back");
        bed.node.run(|| dp.steer_tls(&next)).unwrap();
        let (connected, took) = connecting.join().unwrap();
        connected.expect("the retransmitted SYN reaches the next listener");
        assert!(
            took >= Duration::from_millis(900),
            "a retransmission: {took:?}"
        );
        next.accept().unwrap();
    });
}

#[test]
fn tc_steers_tls_frontends_to_the_listener() {
    steers(AttachMode::Tc);
}

#[test]
fn xdp_steers_tls_frontends_to_the_listener() {
    steers(AttachMode::Xdp);
}
