//! The data plane run through BPF_PROG_TEST_RUN against a table of fixtures, in the
//! style of Katran's and Cilium's BPF tests: each case gives an input packet, the
//! expected verdict, the expected output packet (built independently, with checksums
//! computed from scratch) and the expected counter and map changes. Cases run in order
//! on the same maps, so later cases see the connections earlier ones created.
//!
//! Every case runs against the XDP program and the TC ingress program: they share one
//! core, and this proves both return the same results.

use std::{collections::BTreeMap, net::Ipv4Addr};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use lb::dataplane::{
    sync::{DesiredBackend, DesiredService, Programmer},
    Dataplane, DataplaneOptions, Frontend, Protocol, TC_INGRESS_PROGRAM, XDP_PROGRAM,
};
use lb_common::{
    family, flow_hash, AddrBe, BackendState, ConnDirection, ConnState, Counter, FlowKey,
};
use lb_tests::{
    packets::{self, arp_frame, checksums_valid, icmp_error, PacketSpec, ACK, FIN, PSH, RST, SYN},
    require_root,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const OTHER_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 200, 1, 2),
    Ipv4Addr::new(10, 200, 2, 2),
    Ipv4Addr::new(10, 200, 3, 2),
];
const WEB: Frontend = Frontend {
    vip: VIP,
    port: 80,
    protocol: Protocol::Tcp,
};
const DNS: Frontend = Frontend {
    vip: VIP,
    port: 53,
    protocol: Protocol::Udp,
};
const EMPTY: Frontend = Frontend {
    vip: OTHER_VIP,
    port: 80,
    protocol: Protocol::Tcp,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    Xdp,
    TcIngress,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Pass,
    Drop,
}

struct Harness {
    dp: Dataplane,
    programmer: Programmer,
    hook: Hook,
}

fn desired(states: [BackendState; 3]) -> Vec<DesiredService> {
    let web = DesiredService {
        name: "web".into(),
        frontend: WEB,
        backends: BACKENDS
            .iter()
            .zip(states)
            .map(|(&addr, state)| DesiredBackend {
                addr,
                port: 8080,
                weight: 1,
                state,
                priority: Some(0),
            })
            .collect(),
        http: false,
    };
    let dns = DesiredService {
        name: "dns".into(),
        frontend: DNS,
        backends: vec![DesiredBackend {
            addr: BACKENDS[0],
            port: 5353,
            weight: 1,
            state: BackendState::Active,
            priority: Some(0),
        }],
        http: false,
    };
    let empty = DesiredService {
        name: "empty".into(),
        frontend: EMPTY,
        backends: vec![],
        http: false,
    };
    vec![web, dns, empty]
}

impl Harness {
    fn new(hook: Hook) -> Self {
        Self::with_options(
            hook,
            DataplaneOptions {
                max_connections: 1024,
                ..Default::default()
            },
        )
    }

    fn with_options(hook: Hook, options: DataplaneOptions) -> Self {
        let mut dp = Dataplane::load(&options).expect("load the data plane");
        let mut programmer = Programmer::default();
        programmer
            .apply(&mut dp, &desired([BackendState::Active; 3]))
            .expect("program services");
        Self {
            dp,
            programmer,
            hook,
        }
    }

    fn run(&mut self, input: &[u8]) -> (Verdict, Vec<u8>) {
        self.try_run(input).expect("BPF_PROG_TEST_RUN")
    }

    fn try_run(&mut self, input: &[u8]) -> anyhow::Result<(Verdict, Vec<u8>)> {
        let mut out = vec![0u8; input.len() + 512];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(input);
        opts.data_out = Some(&mut out);
        let (code, len) = match self.hook {
            Hook::Xdp => {
                let p: &mut Xdp = self
                    .dp
                    .program_mut(XDP_PROGRAM)
                    .unwrap()
                    .try_into()
                    .unwrap();
                let r = p.test_run(opts)?;
                (r.return_value, r.data_size_out)
            }
            Hook::TcIngress => {
                let p: &mut SchedClassifier = self
                    .dp
                    .program_mut(TC_INGRESS_PROGRAM)
                    .unwrap()
                    .try_into()
                    .unwrap();
                let r = p.test_run(opts)?;
                (r.return_value, r.data_size_out)
            }
        };
        out.truncate(len as usize);
        let verdict = match (self.hook, code) {
            (Hook::Xdp, 2) | (Hook::TcIngress, 0) => Verdict::Pass,
            (Hook::Xdp, 1) | (Hook::TcIngress, 2) => Verdict::Drop,
            (h, c) => anyhow::bail!("{h:?} returned unexpected code {c}"),
        };
        Ok((verdict, out))
    }

    fn counters(&self) -> BTreeMap<&'static str, u64> {
        self.dp
            .counters()
            .unwrap()
            .into_iter()
            .map(|(c, v)| (c.label(), v))
            .collect()
    }

    /// Backend the data plane must pick for `flow` on `frontend` (first pick).
    fn predicted_backend(&self, frontend: &Frontend, flow: &FlowKey) -> (Ipv4Addr, u16, u32) {
        let table = self.dp.selection_table(frontend).unwrap();
        let id = table[(flow_hash(flow) % table.len() as u32) as usize];
        let b = self.dp.backend(id).unwrap();
        (
            Ipv4Addr::from(b.addr.v4_octets()),
            u16::from_be(b.port_be),
            id,
        )
    }

    fn entry(&self, flow: &FlowKey) -> Option<lb_common::ConnEntry> {
        self.dp
            .connections()
            .unwrap()
            .into_iter()
            .find(|(k, _)| k == flow)
            .map(|(_, e)| e)
    }
}

fn flow_of(p: &PacketSpec) -> FlowKey {
    FlowKey {
        src: AddrBe::v4(p.src.octets()),
        dst: AddrBe::v4(p.dst.octets()),
        src_port_be: p.sport.to_be(),
        dst_port_be: p.dport.to_be(),
        proto: p.proto,
        family: family::V4,
        _pad: [0; 2],
    }
}

/// One fixture: input, verdict, output (None: unchanged) and exact counter deltas.
struct Case {
    name: String,
    input: Vec<u8>,
    verdict: Verdict,
    output: Option<Vec<u8>>,
    counters: Vec<(Counter, u64)>,
}

fn check(h: &mut Harness, case: Case) {
    let before = h.counters();
    let ctx = format!("{:?} / {}", h.hook, case.name);
    // BPF_PROG_TEST_RUN refuses some inputs (EINVAL) before the program runs: any
    // frame shorter than an Ethernet header, and for skb (TC) programs an IPv4 frame
    // shorter than an IPv4 header. Such packets still reach the hooks on a live
    // interface; the program's bounds checks, which the verifier enforces, handle them.
    // Expect the refusal, so a kernel that starts accepting them shows up here.
    if refused_by_test_run(h.hook, &case.input) {
        let err = h
            .try_run(&case.input)
            .expect_err("BPF_PROG_TEST_RUN accepted a frame it used to refuse");
        assert!(
            format!("{err:?}").contains("os error 22"),
            "{ctx}: expected EINVAL, got {err:?}"
        );
        return;
    }
    let (verdict, out) = h
        .try_run(&case.input)
        .unwrap_or_else(|e| panic!("{ctx}: BPF_PROG_TEST_RUN failed: {e:?}"));
    let after = h.counters();
    assert_eq!(verdict, case.verdict, "{ctx}: verdict");
    let expected = case.output.as_ref().unwrap_or(&case.input);
    if verdict == Verdict::Pass {
        assert_eq!(&out, expected, "{ctx}: output packet");
        if case.output.is_some() {
            assert!(
                checksums_valid(&out),
                "{ctx}: checksums of the rewritten packet"
            );
        }
    }
    let mut want: BTreeMap<&str, u64> =
        case.counters.iter().map(|(c, n)| (c.label(), *n)).collect();
    for (name, v) in &after {
        let delta = v - before.get(name).copied().unwrap_or(0);
        let expected = want.remove(name).unwrap_or(0);
        assert_eq!(
            delta, expected,
            "{ctx}: counter {name} changed by {delta}, expected {expected}"
        );
    }
}

fn refused_by_test_run(hook: Hook, input: &[u8]) -> bool {
    let is_ipv4 = input.len() >= 14 && input[12..14] == [0x08, 0x00];
    input.len() < 14 || (hook == Hook::TcIngress && is_ipv4 && input.len() < 34)
}

fn client(port: u16) -> (Ipv4Addr, u16) {
    (CLIENT, port)
}

/// A client port whose flow to `frontend` first lands on backend `id`.
fn port_landing_on(
    h: &Harness,
    frontend: &Frontend,
    proto_spec: impl Fn(u16) -> PacketSpec,
    id: u32,
    from: u16,
) -> u16 {
    (from..from + 10000)
        .find(|&port| h.predicted_backend(frontend, &flow_of(&proto_spec(port))).2 == id)
        .expect("some port hashes to every backend")
}

fn run_fixtures(hook: Hook) {
    if !require_root() {
        return;
    }
    let mut h = Harness::new(hook);
    let vip80 = (VIP, 80);

    // --- TCP: handshake, data, replies, close.
    let syn = PacketSpec::tcp(client(40000), vip80, SYN);
    let flow = flow_of(&syn);
    let (b_addr, b_port, b_id) = h.predicted_backend(&WEB, &flow);
    let backend = (b_addr, b_port);
    check(
        &mut h,
        Case {
            name: "SYN to VIP is DNATed to the hashed backend".into(),
            input: syn.build(),
            verdict: Verdict::Pass,
            output: Some(syn.clone().with_dst(backend).build()),
            counters: vec![(Counter::ForwardNew, 1), (Counter::EventTracked, 1)],
        },
    );
    let fwd = h.entry(&flow).expect("original-direction entry created");
    assert_eq!(fwd.direction, ConnDirection::Original as u8);
    assert_eq!(fwd.state, ConnState::TcpSyn as u8);
    assert_eq!(fwd.backend_id, b_id);
    assert_eq!(fwd.nat_addr, AddrBe::v4(b_addr.octets()));
    let reply_syn = PacketSpec::tcp(backend, client(40000), SYN | ACK);
    let reply_flow = flow_of(&reply_syn);
    let rev = h.entry(&reply_flow).expect("reply-direction entry created");
    assert_eq!(rev.direction, ConnDirection::Reply as u8);
    assert_eq!(
        (rev.nat_addr, u16::from_be(rev.nat_port_be)),
        (AddrBe::v4(VIP.octets()), 80)
    );
    let svc_id = h.programmer.service_id(&WEB).unwrap();
    assert_eq!(h.dp.service_stats(svc_id).unwrap().new_connections, 1);
    assert_eq!(h.dp.backend_stats(b_id).unwrap().new_connections, 1);

    check(
        &mut h,
        Case {
            name: "reply SYN-ACK is reverse-NATed to the VIP".into(),
            input: reply_syn.build(),
            verdict: Verdict::Pass,
            output: Some(reply_syn.clone().with_src(vip80).build()),
            counters: vec![(Counter::ReplyTracked, 1)],
        },
    );
    let ack = PacketSpec::tcp(client(40000), vip80, ACK).with_payload(b"GET / HTTP/1.1\r\n\r\n");
    check(
        &mut h,
        Case {
            name: "next ACK with data goes to the same backend".into(),
            input: ack.build(),
            verdict: Verdict::Pass,
            output: Some(ack.clone().with_dst(backend).build()),
            counters: vec![(Counter::ForwardTracked, 1)],
        },
    );
    assert_eq!(
        h.entry(&flow).unwrap().state,
        ConnState::TcpEstablished as u8
    );
    let data_reply = PacketSpec::tcp(backend, client(40000), ACK | PSH)
        .with_payload(b"HTTP/1.1 200 OK\r\n\r\nhello");
    check(
        &mut h,
        Case {
            name: "reply with data is reverse-NATed".into(),
            input: data_reply.build(),
            verdict: Verdict::Pass,
            output: Some(data_reply.clone().with_src(vip80).build()),
            counters: vec![(Counter::ReplyTracked, 1)],
        },
    );
    let fin = PacketSpec::tcp(client(40000), vip80, FIN | ACK);
    check(
        &mut h,
        Case {
            name: "FIN from the client closes both directions".into(),
            input: fin.build(),
            verdict: Verdict::Pass,
            output: Some(fin.clone().with_dst(backend).build()),
            counters: vec![(Counter::ForwardTracked, 1)],
        },
    );
    assert_eq!(h.entry(&flow).unwrap().state, ConnState::TcpClosing as u8);
    assert_eq!(
        h.entry(&reply_flow).unwrap().state,
        ConnState::TcpClosing as u8
    );
    let reuse = PacketSpec::tcp(client(40000), vip80, SYN);
    check(
        &mut h,
        Case {
            name: "SYN reusing the ports of a closed connection is a new connection".into(),
            input: reuse.build(),
            verdict: Verdict::Pass,
            output: Some(reuse.clone().with_dst(backend).build()),
            counters: vec![(Counter::ForwardNew, 1), (Counter::EventTracked, 1)],
        },
    );
    assert_eq!(h.entry(&flow).unwrap().state, ConnState::TcpSyn as u8);

    let syn2 = PacketSpec::tcp(client(40001), vip80, SYN);
    let b2 = h.predicted_backend(&WEB, &flow_of(&syn2));
    check(
        &mut h,
        Case {
            name: "second connection".into(),
            input: syn2.build(),
            verdict: Verdict::Pass,
            output: Some(syn2.clone().with_dst((b2.0, b2.1)).build()),
            counters: vec![(Counter::ForwardNew, 1), (Counter::EventTracked, 1)],
        },
    );
    let rst = PacketSpec::tcp((b2.0, b2.1), client(40001), RST);
    check(
        &mut h,
        Case {
            name: "RST from the backend is reverse-NATed and closes the connection".into(),
            input: rst.build(),
            verdict: Verdict::Pass,
            output: Some(rst.clone().with_src(vip80).build()),
            counters: vec![(Counter::ReplyTracked, 1)],
        },
    );
    assert_eq!(
        h.entry(&flow_of(&syn2)).unwrap().state,
        ConnState::TcpClosing as u8
    );

    // --- Signals for the agent: a refused connect is reported through the ring buffer,
    // a completed handshake is counted per backend.
    let mut signals = h.dp.take_signals().expect("the signal ring buffer");
    // Earlier cases signalled already (the RST answering a SYN above); start clean.
    while signals.next().is_some() {}
    let refused = PacketSpec::tcp(client(40020), vip80, SYN);
    let (r_addr, r_port, r_id) = h.predicted_backend(&WEB, &flow_of(&refused));
    h.run(&refused.build());
    let rst = PacketSpec::tcp((r_addr, r_port), client(40020), RST | ACK);
    check(
        &mut h,
        Case {
            name: "RST answering the SYN (connect refused) is translated and signalled".into(),
            input: rst.build(),
            verdict: Verdict::Pass,
            output: Some(rst.clone().with_src(vip80).build()),
            counters: vec![(Counter::ReplyTracked, 1)],
        },
    );
    let item = signals.next().expect("a signal for the refused connect");
    let sig: lb_common::Signal = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
    drop(item);
    assert_eq!(sig.kind, lb_common::SignalKind::ConnectRefused as u32);
    assert_eq!(sig.backend_id, r_id);
    let accepted = PacketSpec::tcp(client(40021), vip80, SYN);
    let (a_addr, a_port, a_id) = h.predicted_backend(&WEB, &flow_of(&accepted));
    h.run(&accepted.build());
    let before = h.dp.backend_stats(a_id).unwrap().handshakes;
    h.run(&PacketSpec::tcp((a_addr, a_port), client(40021), SYN | ACK).build());
    assert_eq!(h.dp.backend_stats(a_id).unwrap().handshakes, before + 1);
    assert!(
        signals.next().is_none(),
        "a handshake is counted, not signalled"
    );
    h.run(&PacketSpec::tcp(client(40021), vip80, ACK).build());
    h.run(
        &PacketSpec::tcp((a_addr, a_port), client(40021), ACK | PSH)
            .with_payload(b"x")
            .build(),
    );
    h.run(&PacketSpec::tcp((a_addr, a_port), client(40021), RST).build());
    let item = signals.next().expect("a signal for the reset");
    let sig: lb_common::Signal = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
    drop(item);
    assert_eq!(sig.kind, lb_common::SignalKind::EstablishedReset as u32);
    assert_eq!(sig.backend_id, a_id);
    // Host unreachable about a connection in its handshake is a connect failure too.
    let unreachable = PacketSpec::tcp(client(40022), vip80, SYN);
    let (u_addr, u_port, u_id) = h.predicted_backend(&WEB, &flow_of(&unreachable));
    h.run(&unreachable.build());
    let seen = PacketSpec::tcp(client(40022), (u_addr, u_port), SYN);
    let router = Ipv4Addr::new(10, 200, 0, 1);
    h.run(&icmp_error(router, CLIENT, 3, 1, 0, &seen, 28));
    let item = signals
        .next()
        .expect("a signal for the unreachable backend");
    let sig: lb_common::Signal = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
    drop(item);
    assert_eq!(sig.kind, lb_common::SignalKind::ConnectRefused as u32);
    assert_eq!(sig.backend_id, u_id);

    // --- UDP both ways, with and without a checksum.
    let q = PacketSpec::udp(client(5000), (VIP, 53), b"query");
    check(
        &mut h,
        Case {
            name: "first UDP datagram of a flow is DNATed".into(),
            input: q.build(),
            verdict: Verdict::Pass,
            output: Some(q.clone().with_dst((BACKENDS[0], 5353)).build()),
            counters: vec![(Counter::ForwardNew, 1), (Counter::EventTracked, 1)],
        },
    );
    assert_eq!(h.entry(&flow_of(&q)).unwrap().state, ConnState::Udp as u8);
    let a = PacketSpec::udp((BACKENDS[0], 5353), client(5000), b"answer");
    check(
        &mut h,
        Case {
            name: "UDP answer is reverse-NATed".into(),
            input: a.build(),
            verdict: Verdict::Pass,
            output: Some(a.clone().with_src((VIP, 53)).build()),
            counters: vec![(Counter::ReplyTracked, 1)],
        },
    );
    let mut nock = PacketSpec::udp(client(5000), (VIP, 53), b"again");
    nock.udp_no_checksum = true;
    check(
        &mut h,
        Case {
            name: "UDP without checksum keeps a zero checksum".into(),
            input: nock.build(),
            verdict: Verdict::Pass,
            output: Some(nock.clone().with_dst((BACKENDS[0], 5353)).build()),
            counters: vec![(Counter::ForwardTracked, 1)],
        },
    );

    // --- ICMP errors about tracked connections are translated like their packets.
    let syn3 = PacketSpec::tcp(client(40010), vip80, SYN);
    let (b3_addr, b3_port, _) = h.predicted_backend(&WEB, &flow_of(&syn3));
    let b3 = (b3_addr, b3_port);
    h.run(&syn3.build());
    // What the backend received (after DNAT), and what the client sent.
    let seen_by_backend = PacketSpec::tcp(client(40010), b3, ACK).with_payload(&[7; 1400]);
    let sent_by_client = seen_by_backend.clone().with_dst(vip80);
    check(
        &mut h,
        Case {
            name: "fragmentation needed from the backend is translated for the client".into(),
            input: icmp_error(b3_addr, CLIENT, 3, 4, 1280, &seen_by_backend, 40),
            verdict: Verdict::Pass,
            output: Some(icmp_error(VIP, CLIENT, 3, 4, 1280, &sent_by_client, 40)),
            counters: vec![(Counter::ReplyIcmpError, 1)],
        },
    );
    let router = Ipv4Addr::new(10, 200, 3, 1);
    check(
        &mut h,
        Case {
            name: "a router's error keeps the router's address; only the quote changes".into(),
            input: icmp_error(router, CLIENT, 11, 0, 0, &seen_by_backend, 28),
            verdict: Verdict::Pass,
            output: Some(icmp_error(router, CLIENT, 11, 0, 0, &sent_by_client, 28)),
            counters: vec![(Counter::ReplyIcmpError, 1)],
        },
    );
    // A reply the client side could not take (after reverse NAT it came from the VIP).
    let reply_as_sent = PacketSpec::tcp(vip80, client(40010), ACK).with_payload(&[7; 1400]);
    let reply_from_backend = reply_as_sent.clone().with_src(b3);
    let client_router = Ipv4Addr::new(10, 200, 0, 1);
    check(
        &mut h,
        Case {
            name: "fragmentation needed towards the VIP is translated and sent to the backend"
                .into(),
            input: icmp_error(client_router, VIP, 3, 4, 1280, &reply_as_sent, 40),
            verdict: Verdict::Pass,
            output: Some(icmp_error(
                client_router,
                b3_addr,
                3,
                4,
                1280,
                &reply_from_backend,
                40,
            )),
            counters: vec![(Counter::ForwardIcmpError, 1)],
        },
    );
    let udp_seen = PacketSpec::udp(client(5000), (BACKENDS[0], 5353), b"query");
    let udp_sent = udp_seen.clone().with_dst((VIP, 53));
    check(
        &mut h,
        Case {
            name: "port unreachable about a UDP flow, with its quoted UDP checksum".into(),
            input: icmp_error(BACKENDS[0], CLIENT, 3, 3, 0, &udp_seen, 28),
            verdict: Verdict::Pass,
            output: Some(icmp_error(VIP, CLIENT, 3, 3, 0, &udp_sent, 28)),
            counters: vec![(Counter::ReplyIcmpError, 1)],
        },
    );
    let untracked = PacketSpec::tcp(client(40999), b3, ACK);
    check(
        &mut h,
        Case {
            name: "ICMP error about an untracked flow passes untouched".into(),
            input: icmp_error(b3_addr, CLIENT, 3, 4, 1280, &untracked, 40),
            verdict: Verdict::Pass,
            output: None,
            counters: vec![(Counter::PassOtherProtocol, 1)],
        },
    );

    // --- What lb does not own passes untouched.
    let already = PacketSpec::tcp(client(40000), backend, ACK);
    check(
        &mut h,
        Case {
            name: "traffic lb already translated (client → backend) passes untouched".into(),
            input: already.build(),
            verdict: Verdict::Pass,
            output: None,
            counters: vec![(Counter::PassNotService, 1)],
        },
    );
    check(
        &mut h,
        Case {
            name: "non-VIP TCP passes untouched".into(),
            input: PacketSpec::tcp(client(40002), (Ipv4Addr::new(10, 200, 9, 9), 80), SYN).build(),
            verdict: Verdict::Pass,
            output: None,
            counters: vec![(Counter::PassNotService, 1)],
        },
    );
    check(
        &mut h,
        Case {
            name: "VIP with an unknown port passes untouched".into(),
            input: PacketSpec::tcp(client(40003), (VIP, 81), SYN).build(),
            verdict: Verdict::Pass,
            output: None,
            counters: vec![(Counter::PassNotService, 1)],
        },
    );
    let mut icmp = PacketSpec::tcp(client(0), (VIP, 0), 0);
    icmp.proto = packets::ICMP;
    check(
        &mut h,
        Case {
            name: "ICMP to the VIP passes untouched".into(),
            input: icmp.build(),
            verdict: Verdict::Pass,
            output: None,
            counters: vec![(Counter::PassOtherProtocol, 1)],
        },
    );
    check(
        &mut h,
        Case {
            name: "ARP passes untouched".into(),
            input: arp_frame(),
            verdict: Verdict::Pass,
            output: None,
            counters: vec![(Counter::PassNotIpv4, 1)],
        },
    );

    // --- Malformed and unsupported packets.
    let full = PacketSpec::tcp(client(40004), vip80, SYN).build();
    check(
        &mut h,
        Case {
            name: "truncated Ethernet header passes".into(),
            input: full[..10].to_vec(),
            verdict: Verdict::Pass,
            output: None,
            counters: vec![(Counter::PassTruncatedEthernet, 1)],
        },
    );
    check(
        &mut h,
        Case {
            name: "truncated IPv4 header passes".into(),
            input: full[..14 + 12].to_vec(),
            verdict: Verdict::Pass,
            output: None,
            counters: vec![(Counter::PassTruncatedIpv4, 1)],
        },
    );
    let mut bad_ihl = full.clone();
    bad_ihl[14] = 0x44;
    check(
        &mut h,
        Case {
            name: "IHL below 5 passes".into(),
            input: bad_ihl,
            verdict: Verdict::Pass,
            output: None,
            counters: vec![(Counter::PassTruncatedIpv4, 1)],
        },
    );
    check(
        &mut h,
        Case {
            name: "truncated TCP header to a VIP is dropped".into(),
            input: full[..14 + 20 + 10].to_vec(),
            verdict: Verdict::Drop,
            output: None,
            counters: vec![(Counter::DropTruncatedL4, 1)],
        },
    );
    let other = PacketSpec::tcp(client(40004), (Ipv4Addr::new(10, 200, 9, 9), 80), SYN).build();
    check(
        &mut h,
        Case {
            name: "truncated TCP header to another address passes".into(),
            input: other[..14 + 20 + 10].to_vec(),
            verdict: Verdict::Pass,
            output: None,
            counters: vec![(Counter::PassTruncatedL4, 1)],
        },
    );
    let udp_full = PacketSpec::udp(client(5001), (VIP, 53), b"x").build();
    check(
        &mut h,
        Case {
            name: "truncated UDP header to a VIP is dropped".into(),
            input: udp_full[..14 + 20 + 4].to_vec(),
            verdict: Verdict::Drop,
            output: None,
            counters: vec![(Counter::DropTruncatedL4, 1)],
        },
    );
    let mut opts = PacketSpec::tcp(client(40005), vip80, SYN);
    opts.ip_options = vec![1, 1, 1, 0]; // NOP, NOP, NOP, EOL
    check(
        &mut h,
        Case {
            name: "IPv4 options to a VIP are dropped".into(),
            input: opts.build(),
            verdict: Verdict::Drop,
            output: None,
            counters: vec![(Counter::DropIpOptions, 1)],
        },
    );
    opts.dst = Ipv4Addr::new(10, 200, 9, 9);
    check(
        &mut h,
        Case {
            name: "IPv4 options to another address pass".into(),
            input: opts.build(),
            verdict: Verdict::Pass,
            output: None,
            counters: vec![(Counter::PassIpOptions, 1)],
        },
    );
    let mut frag = PacketSpec::udp(client(5002), (VIP, 53), b"first fragment");
    frag.frag_field = 0x2000; // more fragments
    check(
        &mut h,
        Case {
            name: "first fragment to a VIP is dropped".into(),
            input: frag.build(),
            verdict: Verdict::Drop,
            output: None,
            counters: vec![(Counter::DropFragment, 1)],
        },
    );
    frag.frag_field = 0x0010; // offset 128, last fragment
    check(
        &mut h,
        Case {
            name: "later fragment to a VIP is dropped".into(),
            input: frag.build(),
            verdict: Verdict::Drop,
            output: None,
            counters: vec![(Counter::DropFragment, 1)],
        },
    );
    frag.dst = Ipv4Addr::new(10, 200, 9, 9);
    check(
        &mut h,
        Case {
            name: "fragment to another address passes".into(),
            input: frag.build(),
            verdict: Verdict::Pass,
            output: None,
            counters: vec![(Counter::PassFragment, 1)],
        },
    );

    // --- Tracked connections with the table changing underneath.
    let midflow = PacketSpec::tcp(client(40006), vip80, ACK);
    let m = h.predicted_backend(&WEB, &flow_of(&midflow));
    check(
        &mut h,
        Case {
            name: "ACK without an entry (evicted) is re-selected by hash".into(),
            input: midflow.build(),
            verdict: Verdict::Pass,
            output: Some(midflow.clone().with_dst((m.0, m.1)).build()),
            counters: vec![
                (Counter::ForwardNew, 1),
                (Counter::EventTracked, 1),
                (Counter::EventMidflowMiss, 1),
            ],
        },
    );

    // Backend 2 is ejected in its map while the (stale) table still names it.
    let ejected_id = h.programmer.backend_id(&WEB, BACKENDS[1], 8080).unwrap();
    let tracked_port = port_landing_on(
        &h,
        &WEB,
        |p| PacketSpec::tcp(client(p), vip80, SYN),
        ejected_id,
        20000,
    );
    let tracked = PacketSpec::tcp(client(tracked_port), vip80, SYN);
    check(
        &mut h,
        Case {
            name: "connection to backend 2 before it is ejected".into(),
            input: tracked.build(),
            verdict: Verdict::Pass,
            output: Some(tracked.clone().with_dst((BACKENDS[1], 8080)).build()),
            counters: vec![(Counter::ForwardNew, 1), (Counter::EventTracked, 1)],
        },
    );
    let table_before = h.dp.selection_table(&WEB).unwrap();
    h.dp.set_backend(ejected_id, BACKENDS[1], 8080, BackendState::Ejected)
        .unwrap();
    assert_eq!(
        h.dp.selection_table(&WEB).unwrap(),
        table_before,
        "the table is stale on purpose"
    );
    let new_port = port_landing_on(
        &h,
        &WEB,
        |p| PacketSpec::tcp(client(p), vip80, SYN),
        ejected_id,
        tracked_port + 1,
    );
    let fresh = PacketSpec::tcp(client(new_port), vip80, SYN);
    // The kernel walks forward from the flow's slot to the first backend that is active.
    let len = table_before.len();
    let slot = flow_hash(&flow_of(&fresh)) as usize % len;
    let next_id = (1..len)
        .map(|k| table_before[(slot + k) % len])
        .find(|&id| id != ejected_id)
        .unwrap();
    let next = h.dp.backend(next_id).unwrap();
    check(
        &mut h,
        Case {
            name: "new connection never goes to an ejected backend named by a stale table".into(),
            input: fresh.build(),
            verdict: Verdict::Pass,
            output: Some(
                fresh
                    .clone()
                    .with_dst((Ipv4Addr::from(next.addr.v4_octets()), 8080))
                    .build(),
            ),
            counters: vec![
                (Counter::ForwardNew, 1),
                (Counter::EventTracked, 1),
                (Counter::EventReselected, 1),
            ],
        },
    );
    let est = PacketSpec::tcp(client(tracked_port), vip80, ACK);
    check(
        &mut h,
        Case {
            name: "established connection stays on its ejected backend".into(),
            input: est.build(),
            verdict: Verdict::Pass,
            output: Some(est.clone().with_dst((BACKENDS[1], 8080)).build()),
            counters: vec![(Counter::ForwardTracked, 1)],
        },
    );
    for id in 1..=3 {
        let (addr, state) = (BACKENDS[id - 1], BackendState::Ejected);
        let bid = h.programmer.backend_id(&WEB, addr, 8080).unwrap();
        h.dp.set_backend(bid, addr, 8080, state).unwrap();
    }
    check(
        &mut h,
        Case {
            name: "no active backend: the new connection is dropped".into(),
            input: PacketSpec::tcp(client(40007), vip80, SYN).build(),
            verdict: Verdict::Drop,
            output: None,
            counters: vec![(Counter::DropNoActiveBackend, 1)],
        },
    );
    check(
        &mut h,
        Case {
            name: "service without backends: the new connection is dropped".into(),
            input: PacketSpec::tcp(client(40008), (OTHER_VIP, 80), SYN).build(),
            verdict: Verdict::Drop,
            output: None,
            counters: vec![(Counter::DropNoBackend, 1)],
        },
    );

    // Draining backends take no new connections either; re-programming restores them.
    // The backends were changed in the map directly above, behind the programmer's back.
    h.programmer.forget_written();
    h.programmer
        .apply(
            &mut h.dp,
            &desired([
                BackendState::Draining,
                BackendState::Active,
                BackendState::Draining,
            ]),
        )
        .unwrap();
    for port in 41000..41020 {
        let s = PacketSpec::tcp(client(port), vip80, SYN);
        let (verdict, out) = h.run(&s.build());
        assert_eq!(verdict, Verdict::Pass);
        assert_eq!(
            out,
            s.clone().with_dst((BACKENDS[1], 8080)).build(),
            "{hook:?}: only the active backend"
        );
    }
}

#[test]
fn xdp_fixtures() {
    run_fixtures(Hook::Xdp);
}

#[test]
fn tc_fixtures() {
    run_fixtures(Hook::TcIngress);
}

/// A full connection table evicts the least recently used entries and counts what that
/// costs: a later packet of an evicted flow is re-selected by hash (counted as a midflow
/// miss) and lands on the same backend, because the selection table has not changed.
#[test]
fn full_connection_table_evicts_counts_and_keeps_routing() {
    if !require_root() {
        return;
    }
    let mut h = Harness::with_options(
        Hook::Xdp,
        DataplaneOptions {
            max_connections: 64,
            ..Default::default()
        },
    );
    let vip80 = (VIP, 80);
    let first = PacketSpec::tcp(client(30000), vip80, SYN);
    let (addr, port, _) = h.predicted_backend(&WEB, &flow_of(&first));
    let (verdict, out) = h.run(&first.build());
    assert_eq!(verdict, Verdict::Pass);
    assert_eq!(out, first.clone().with_dst((addr, port)).build());
    for p in 30001..30501 {
        let (verdict, _) = h.run(&PacketSpec::tcp(client(p), vip80, SYN).build());
        assert_eq!(verdict, Verdict::Pass);
    }
    let entries = h.dp.connections().unwrap().len();
    assert!(entries <= 64, "{entries} entries in a table of 64");
    assert!(
        h.entry(&flow_of(&first)).is_none(),
        "the oldest flow was evicted"
    );

    let ack = PacketSpec::tcp(client(30000), vip80, ACK);
    check(
        &mut h,
        Case {
            name: "ACK of an evicted flow".into(),
            input: ack.build(),
            verdict: Verdict::Pass,
            output: Some(ack.clone().with_dst((addr, port)).build()),
            counters: vec![
                (Counter::ForwardNew, 1),
                (Counter::EventTracked, 1),
                (Counter::EventMidflowMiss, 1),
            ],
        },
    );
}

/// Idle timeouts are set when the programs are loaded: a UDP flow idle for longer than
/// `dataplane.timeouts.udp` is a new flow (and is balanced afresh).
#[test]
fn idle_flows_expire_after_the_configured_timeout() {
    if !require_root() {
        return;
    }
    let mut options = DataplaneOptions::default();
    options.timeouts.udp_timeout_ns = 1_000_000_000;
    let mut h = Harness::with_options(Hook::TcIngress, options);
    let q = PacketSpec::udp(client(6000), (VIP, 53), b"query");
    let dnat = q.clone().with_dst((BACKENDS[0], 5353)).build();
    let case = |name: &str, counters: Vec<(Counter, u64)>| Case {
        name: name.into(),
        input: q.build(),
        verdict: Verdict::Pass,
        output: Some(dnat.clone()),
        counters,
    };
    check(
        &mut h,
        case(
            "first datagram",
            vec![(Counter::ForwardNew, 1), (Counter::EventTracked, 1)],
        ),
    );
    check(
        &mut h,
        case("within the timeout", vec![(Counter::ForwardTracked, 1)]),
    );
    std::thread::sleep(std::time::Duration::from_millis(2200));
    check(
        &mut h,
        case(
            "after the timeout",
            vec![(Counter::ForwardNew, 1), (Counter::EventTracked, 1)],
        ),
    );
}
