//! The data plane run through BPF_PROG_TEST_RUN against a table of fixtures, in the
//! style of Katran's and Cilium's BPF tests: each case gives an input packet, the
//! expected verdict, the expected output packet (built independently, with checksums
//! computed from scratch) and the expected counter and map changes. Cases run in order
//! on the same maps, so later cases see the connections earlier ones created.
//!
//! Every case runs against the XDP program and the TC ingress program: they share one
//! core, and this proves both return the same results. Every case also states the failure
//! signals it sends to the agent (none, unless it says so).

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use aya::maps::{MapData, RingBuf};
use lb::dataplane::{
    sync::{DesiredService, Programmer},
    Dataplane, DataplaneOptions, Frontend,
};
use lb_common::{
    config::SYN_RETRANSMIT_MIN_NS,
    family, flow_hash,
    maps::{
        CONN_AWAIT_RETRANSMIT, CONN_HTTP, SYN_ECN, SYN_OPT_SACK, SYN_OPT_TIMESTAMPS, SYN_OPT_WSCALE,
    },
    AddrBe, BackendState, ConnDirection, ConnEntry, ConnState, Counter, FlowKey, Signal,
    SignalKind,
};
use lb_tests::{
    fixture_services::{
        backend_mac, desired, routed_netns, API, API_BACKEND, BACKENDS, DNS, OTHER_VIP, ROUTE_MAC,
        VIP, WEB,
    },
    packets::{
        self, arp_frame, checksums_valid, icmp_error, linux_syn_options, PacketSpec, ACK, CWR, ECE,
        FIN, PSH, RST, SYN,
    },
    require_root,
    test_run::{self, Hook, Verdict},
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);

/// A rewritten `frame` (given as the stack would get it) as XDP and TC send it on
/// themselves in the routed namespace (`routed_netns`), instead of handing it to the
/// stack: TTL one less; to a backend (a permanent neighbour, on a link that takes XDP
/// frames) with the neighbour's and the route's MAC addresses, redirected. To anyone else
/// on the link (the client, no neighbour entry yet), TC redirects it through the kernel's
/// neighbour resolution, which writes the addresses after the program (unchanged here),
/// and XDP leaves it to the stack as it is (which resolves the neighbour).
fn sent_on(hook: Hook, frame: &[u8]) -> (Verdict, Vec<u8>, Counter) {
    let dst = Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]);
    let macs = BACKENDS
        .contains(&dst)
        .then(|| (backend_mac(dst), ROUTE_MAC));
    match (hook, macs) {
        (Hook::Xdp, None) => (Verdict::Pass, frame.to_vec(), Counter::EventStackNoNeigh),
        _ => (
            Verdict::Redirect,
            packets::routed(frame, macs),
            Counter::EventRedirected,
        ),
    }
}

/// A rewritten `frame` to a backend, as both hooks send it on (see [`sent_on`]).
fn to_backend(frame: &[u8]) -> Vec<u8> {
    let (verdict, out, _) = sent_on(Hook::Xdp, frame);
    assert_eq!(verdict, Verdict::Redirect, "a frame to a backend");
    out
}

/// A failure signal as a case expects it (the kernel's timestamp is checked apart).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sig {
    kind: SignalKind,
    service_id: u32,
    backend_id: u32,
    status: u32,
}

fn sig(kind: SignalKind, service_id: u32, backend_id: u32) -> Sig {
    Sig {
        kind,
        service_id,
        backend_id,
        status: 0,
    }
}

struct Harness {
    dp: Dataplane,
    programmer: Programmer,
    hook: Hook,
    /// The signal ring buffer (one consumer per data plane: taken when the harness is made).
    signals: RingBuf<MapData>,
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
        let signals = dp.take_signals().expect("the signal ring buffer");
        Self {
            dp,
            programmer,
            hook,
            signals,
        }
    }

    /// Every signal sent since the last call, oldest first.
    fn signals(&mut self) -> Vec<Signal> {
        let mut out = Vec::new();
        while let Some(item) = self.signals.next() {
            assert_eq!(item.len(), std::mem::size_of::<Signal>(), "signal size");
            // SAFETY: the item holds one `Signal` (size checked), written by the kernel.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Signal>()) });
        }
        out
    }

    fn run(&mut self, input: &[u8]) -> (Verdict, Vec<u8>) {
        self.try_run(input).expect("BPF_PROG_TEST_RUN")
    }

    fn try_run(&mut self, input: &[u8]) -> anyhow::Result<(Verdict, Vec<u8>)> {
        test_run::run(&mut self.dp, self.hook, input)
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

    /// Where the data plane must move the connection attempt `orig` of `frontend`: the
    /// first backend of the service's failover list, as published in the maps, from the
    /// entry's cursor on, that is neither the one it is on nor the one the table first
    /// gave, and is active in the backends map. Also the position in the list.
    fn next_backend(
        &self,
        frontend: &Frontend,
        orig: &ConnEntry,
    ) -> Option<((Ipv4Addr, u16), u32, usize)> {
        let list = self.dp.failover_list(frontend).unwrap();
        if list.is_empty() {
            return None;
        }
        // From the cursor on, wrapping: the list may have been republished shorter.
        let start = (orig.fallback_cursor as usize).min(list.len()) % list.len();
        (0..list.len())
            .map(|i| (start + i) % list.len())
            .map(|pos| (pos, list[pos]))
            .filter(|&(_, id)| id != orig.backend_id && id != orig.first_backend_id)
            .find(|&(_, id)| self.dp.backend(id).unwrap().state == BackendState::Active as u8)
            .map(|(pos, id)| (self.backend_addr(id), id, pos))
    }

    fn backend_addr(&self, id: u32) -> (Ipv4Addr, u16) {
        let b = self.dp.backend(id).unwrap();
        (Ipv4Addr::from(b.addr.v4_octets()), u16::from_be(b.port_be))
    }

    fn entry(&self, flow: &FlowKey) -> Option<ConnEntry> {
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

/// Runs `case`, which must send no failure signal.
fn check(h: &mut Harness, case: Case) {
    check_signalled(h, case, &[]);
}

/// Runs `case`, which must send exactly `signals`, in this order, each stamped with the
/// kernel's clock while the case ran.
fn check_signalled(h: &mut Harness, case: Case, signals: &[Sig]) {
    // Signals of packets sent outside a case (setup) are not this case's.
    h.signals();
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
    let started = lb::clock::monotonic_ns();
    let (verdict, out) = h
        .try_run(&case.input)
        .unwrap_or_else(|e| panic!("{ctx}: BPF_PROG_TEST_RUN failed: {e:?}"));
    let ended = lb::clock::monotonic_ns();
    let after = h.counters();
    // Both hooks send every packet they rewrote on themselves (a case's expectation is
    // written for the stack); a re-sent SYN's case already says so.
    let mut case = case;
    let to_stack = case
        .counters
        .iter()
        .any(|(c, _)| c.label().starts_with("event_stack_"));
    if case.verdict == Verdict::Pass && !to_stack {
        if let Some(out) = case.output.take() {
            let (verdict, out, counter) = sent_on(h.hook, &out);
            case.output = Some(out);
            case.verdict = verdict;
            if verdict == Verdict::Pass {
                case.counters.push((counter, 1));
            }
        }
    }
    if case.verdict == Verdict::Redirect {
        case.counters.push((Counter::EventRedirected, 1));
    }
    assert_eq!(verdict, case.verdict, "{ctx}: verdict");
    let expected = case.output.as_ref().unwrap_or(&case.input);
    if verdict != Verdict::Drop {
        assert_eq!(&out, expected, "{ctx}: output packet");
        // A frame cut shorter than its IPv4 length has no checksum to verify; its bytes
        // were compared with the expectation (built whole, then cut) above.
        if case.output.is_some() && !cut_short(&out) {
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
    let sent = h.signals();
    for s in &sent {
        assert!(
            (started..=ended).contains(&s.ktime_ns),
            "{ctx}: signal {s:?} not stamped while the case ran ({started}..={ended})"
        );
    }
    let sent: Vec<Sig> = sent
        .iter()
        .map(|s| Sig {
            kind: SignalKind::from_u32(s.kind).expect("a known signal kind"),
            service_id: s.service_id,
            backend_id: s.backend_id,
            status: s.status,
        })
        .collect();
    assert_eq!(sent, signals, "{ctx}: signals");
}

/// `frame` as received from the wire: padded with zeros to the Ethernet minimum (60
/// bytes without the frame check sequence).
fn padded(mut frame: Vec<u8>) -> Vec<u8> {
    assert!(frame.len() < 60);
    frame.resize(60, 0);
    frame
}

/// Whether the IPv4 length of `frame` claims more bytes than the frame holds.
fn cut_short(frame: &[u8]) -> bool {
    frame.len() >= 18 && 14 + u16::from_be_bytes([frame[16], frame[17]]) as usize > frame.len()
}

fn refused_by_test_run(hook: Hook, input: &[u8]) -> bool {
    let is_ipv4 = input.len() >= 14 && input[12..14] == [0x08, 0x00];
    input.len() < 14 || (hook == Hook::TcIngress && is_ipv4 && input.len() < 34)
}

/// Runs `case` (a backend's segment) and checks what it added to backend `backend_id`'s
/// HTTP statistics: `(ok, errors)`.
fn check_response(h: &mut Harness, case: Case, signals: &[Sig], backend_id: u32, http: (u64, u64)) {
    let name = case.name.clone();
    let before = h.dp.backend_stats(backend_id).unwrap();
    check_signalled(h, case, signals);
    let after = h.dp.backend_stats(backend_id).unwrap();
    assert_eq!(
        (
            after.http_ok - before.http_ok,
            after.http_5xx - before.http_5xx
        ),
        http,
        "{:?} / {name}: HTTP responses (ok, 5xx) of backend {backend_id}",
        h.hook
    );
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
    // The builder's RST carries no ACK, so it cannot answer the SYN lb sent (a refusal
    // acknowledges ISN + 1): it is not re-sent elsewhere but passed on, as a refusal that
    // reached the client. The backend did refuse during the handshake: signalled.
    let rst = PacketSpec::tcp((b2.0, b2.1), client(40001), RST);
    check_signalled(
        &mut h,
        Case {
            name: "RST without ACK from the backend is reverse-NATed and closes the connection"
                .into(),
            input: rst.build(),
            verdict: Verdict::Pass,
            output: Some(rst.clone().with_src(vip80).build()),
            counters: vec![(Counter::ReplyTracked, 1), (Counter::EventRefusalPassed, 1)],
        },
        &[sig(SignalKind::ConnectRefused, svc_id, b2.2)],
    );
    assert_eq!(
        h.entry(&flow_of(&syn2)).unwrap().state,
        ConnState::TcpClosing as u8
    );

    // --- Signals for the agent: a refused connect is reported through the ring buffer,
    // a completed handshake is counted per backend.
    let refused = PacketSpec::tcp(client(40020), vip80, SYN);
    let (r_addr, r_port, r_id) = h.predicted_backend(&WEB, &flow_of(&refused));
    h.run(&refused.build());
    // The builder's RST|ACK acknowledges 2000, the SYN's ISN is 1000: not an answer to the
    // SYN lb sent (stale or forged), so no reason to resend the SYN. It goes on to the
    // client (whose stack discards it) and counts as a refusal that reached the client.
    let rst = PacketSpec::tcp((r_addr, r_port), client(40020), RST | ACK);
    assert_ne!(rst.ack, refused.seq.wrapping_add(1));
    check_signalled(
        &mut h,
        Case {
            name: "RST|ACK not acknowledging the SYN (ack ≠ ISN + 1) is translated and signalled"
                .into(),
            input: rst.build(),
            verdict: Verdict::Pass,
            output: Some(rst.clone().with_src(vip80).build()),
            counters: vec![(Counter::ReplyTracked, 1), (Counter::EventRefusalPassed, 1)],
        },
        &[sig(SignalKind::ConnectRefused, svc_id, r_id)],
    );
    let accepted = PacketSpec::tcp(client(40021), vip80, SYN);
    let (a_addr, a_port, a_id) = h.predicted_backend(&WEB, &flow_of(&accepted));
    h.run(&accepted.build());
    let before = h.dp.backend_stats(a_id).unwrap().handshakes;
    let synack = PacketSpec::tcp((a_addr, a_port), client(40021), SYN | ACK);
    check(
        &mut h,
        Case {
            name: "SYN-ACK (connect success) is counted per backend, not signalled".into(),
            input: synack.build(),
            verdict: Verdict::Pass,
            output: Some(synack.clone().with_src(vip80).build()),
            counters: vec![(Counter::ReplyTracked, 1)],
        },
    );
    assert_eq!(h.dp.backend_stats(a_id).unwrap().handshakes, before + 1);
    h.run(&PacketSpec::tcp(client(40021), vip80, ACK).build());
    h.run(
        &PacketSpec::tcp((a_addr, a_port), client(40021), ACK | PSH)
            .with_payload(b"x")
            .build(),
    );
    let reset = PacketSpec::tcp((a_addr, a_port), client(40021), RST);
    check_signalled(
        &mut h,
        Case {
            name: "RST of an established connection is passed on and signalled as a reset".into(),
            input: reset.build(),
            verdict: Verdict::Pass,
            output: Some(reset.clone().with_src(vip80).build()),
            counters: vec![(Counter::ReplyTracked, 1)],
        },
        &[sig(SignalKind::EstablishedReset, svc_id, a_id)],
    );

    // --- Connection attempts that fail move to another backend ("re-steer"), hidden
    // from the client. Where to is the service's failover list, published by the control
    // plane after the selection table: every active backend by priority, then weight;
    // here all at priority 0 with equal weights, so by id.
    let mut web_ids: Vec<u32> = BACKENDS
        .iter()
        .map(|&a| h.programmer.backend_id(&WEB, a, 8080).unwrap())
        .collect();
    web_ids.sort();
    assert_eq!(h.dp.failover_list(&WEB).unwrap(), web_ids);
    let budget = h.dp.options().timeouts.connect_retries;
    assert_eq!(budget, 2, "the default budget (these cases count on it)");

    // A SYN as Linux sends it: MSS 1460, SACK permitted, timestamp, window scale 7.
    const ISN: u32 = 0x5eed_0001;
    const TSVAL: u32 = 0x00c0_ffee;
    let linux_opts = linux_syn_options(1460, TSVAL, 7);
    let linux_syn = |port: u16| {
        PacketSpec::tcp(client(port), vip80, SYN)
            .with_seq(ISN)
            .with_ack(0)
            .with_window(64240)
            .with_tcp_options(&linux_opts)
    };
    // What a backend's stack answers a SYN for a closed port with.
    let refusal = |from: (Ipv4Addr, u16), port: u16, isn: u32| {
        PacketSpec::tcp(from, client(port), RST | ACK)
            .with_seq(0)
            .with_ack(isn.wrapping_add(1))
            .with_window(0)
    };
    // The client's SYN as lb sends it again: IPv4 identification 0, all else as offered.
    // lb writes the options in Linux's order, so a Linux SYN comes out as it went in.
    let resent = |syn: &PacketSpec, to: (Ipv4Addr, u16)| {
        to_backend(&syn.clone().with_dst(to).with_ip_id(0).build())
    };

    let r_syn = linux_syn(40030);
    let r_flow = flow_of(&r_syn);
    let (r1_addr, r1_port, r1) = h.predicted_backend(&WEB, &r_flow);
    let r1_at = (r1_addr, r1_port);
    check(
        &mut h,
        Case {
            name: "SYN with Linux's options is DNATed, its offer kept for a re-send".into(),
            input: r_syn.build(),
            verdict: Verdict::Pass,
            output: Some(r_syn.clone().with_dst(r1_at).build()),
            counters: vec![(Counter::ForwardNew, 1), (Counter::EventTracked, 1)],
        },
    );
    let orig = h.entry(&r_flow).unwrap();
    assert_eq!(
        (
            orig.syn_isn,
            orig.syn_tsval,
            orig.syn_window,
            orig.syn_mss,
            orig.syn_wscale
        ),
        (ISN, TSVAL, 64240, 1460, 7)
    );
    assert_eq!(
        orig.flags,
        SYN_OPT_SACK | SYN_OPT_TIMESTAMPS | SYN_OPT_WSCALE,
        "no ECN asked, not an HTTP service"
    );
    assert_eq!(
        (orig.first_backend_id, orig.retries, orig.fallback_cursor),
        (r1, 0, 0)
    );
    let (r2_at, r2, r2_pos) = h.next_backend(&WEB, &orig).expect("another active backend");
    assert_ne!(r2, r1);
    let new_conns = |h: &Harness, id: u32| h.dp.backend_stats(id).unwrap().new_connections;
    let (r1_conns, r2_conns) = (new_conns(&h, r1), new_conns(&h, r2));
    check_signalled(
        &mut h,
        Case {
            name: "refusal of the SYN (RST|ACK, ack = ISN + 1) becomes the client's SYN to the \
                   next backend of the failover list"
                .into(),
            // As it comes off the wire: 54 bytes padded to the Ethernet minimum of 60.
            input: padded(refusal(r1_at, 40030, ISN).build()),
            verdict: Verdict::Redirect,
            output: Some(resent(&r_syn, r2_at)),
            counters: vec![(Counter::ForwardResteered, 1)],
        },
        &[sig(SignalKind::ConnectRefused, svc_id, r1)],
    );
    let moved = h.entry(&r_flow).unwrap();
    assert!(moved.last_seen_ns >= orig.last_seen_ns);
    assert_eq!(
        moved,
        ConnEntry {
            nat_addr: AddrBe::v4(r2_at.0.octets()),
            nat_port_be: r2_at.1.to_be(),
            backend_id: r2,
            retries: 1,
            fallback_cursor: (r2_pos + 1) as u8,
            last_seen_ns: moved.last_seen_ns,
            ..orig
        },
        "{hook:?}: the client's entry names the new backend, the rest is kept"
    );
    assert!(
        h.entry(&flow_of(&refusal(r1_at, 40030, ISN))).is_none(),
        "{hook:?}: the refusing backend's entry is gone"
    );
    let r2_synack = PacketSpec::tcp(r2_at, client(40030), SYN | ACK)
        .with_seq(0x7a11_0000)
        .with_ack(ISN.wrapping_add(1));
    let rev = h
        .entry(&flow_of(&r2_synack))
        .expect("the new backend's entry");
    assert_eq!(
        (
            rev.direction,
            rev.state,
            rev.backend_id,
            rev.service_id,
            rev.first_backend_id
        ),
        (
            ConnDirection::Reply as u8,
            ConnState::TcpSyn as u8,
            r2,
            svc_id,
            r1
        )
    );
    assert_eq!(
        (rev.nat_addr, u16::from_be(rev.nat_port_be)),
        (AddrBe::v4(VIP.octets()), 80)
    );
    assert_eq!(
        (new_conns(&h, r1), new_conns(&h, r2)),
        (r1_conns, r2_conns + 1),
        "{hook:?}: the attempt is the new backend's connection now"
    );
    check(
        &mut h,
        Case {
            name: "a late segment from the refusing backend is no longer translated".into(),
            input: refusal(r1_at, 40030, ISN).build(),
            verdict: Verdict::Pass,
            output: None,
            counters: vec![(Counter::PassNotService, 1)],
        },
    );
    let handshakes = h.dp.backend_stats(r2).unwrap().handshakes;
    check(
        &mut h,
        Case {
            name: "the new backend's SYN-ACK is reverse-NATed to the VIP".into(),
            input: r2_synack.build(),
            verdict: Verdict::Pass,
            output: Some(r2_synack.clone().with_src(vip80).build()),
            counters: vec![(Counter::ReplyTracked, 1)],
        },
    );
    assert_eq!(h.dp.backend_stats(r2).unwrap().handshakes, handshakes + 1);
    let r_ack = PacketSpec::tcp(client(40030), vip80, ACK)
        .with_seq(ISN.wrapping_add(1))
        .with_ack(0x7a11_0001)
        .with_payload(b"GET / HTTP/1.1\r\n\r\n");
    check(
        &mut h,
        Case {
            name: "the client's ACK completes the handshake with the new backend".into(),
            input: r_ack.build(),
            verdict: Verdict::Pass,
            output: Some(r_ack.clone().with_dst(r2_at).build()),
            counters: vec![(Counter::ForwardTracked, 1)],
        },
    );
    assert_eq!(
        h.entry(&r_flow).unwrap().state,
        ConnState::TcpEstablished as u8
    );

    // A backend that still holds an older connection on the same addresses and ports
    // (TIME_WAIT, the client having reused its port) answers the SYN with that
    // connection's ACK, not acknowledging the SYN. The client would reset it and send its
    // SYN again about 10 ms later; lb sends the SYN to the next backend at once, and
    // signals nothing: the backend did not fail.
    let t_syn = linux_syn(40035);
    let t_flow = flow_of(&t_syn);
    let (t1_addr, t1_port, _) = h.predicted_backend(&WEB, &t_flow);
    let t1_at = (t1_addr, t1_port);
    h.run(&t_syn.build());
    let t_orig = h.entry(&t_flow).unwrap();
    let (t2_at, t2, _) = h
        .next_backend(&WEB, &t_orig)
        .expect("another active backend");
    let mut ts = vec![1u8, 1, 8, 10];
    ts.extend_from_slice(&0x0bad_0001u32.to_be_bytes());
    ts.extend_from_slice(&TSVAL.wrapping_sub(17_000).to_be_bytes());
    let stale = PacketSpec::tcp(t1_at, client(40035), ACK)
        .with_seq(0x0bad_cafe)
        .with_ack(ISN.wrapping_sub(4_000))
        .with_window(502)
        .with_tcp_options(&ts);
    check_signalled(
        &mut h,
        Case {
            name: "a bare ACK answering the SYN (an older connection on the backend) becomes \
                   the client's SYN to the next backend, with no signal"
                .into(),
            input: stale.build(),
            verdict: Verdict::Redirect,
            output: Some(resent(&t_syn, t2_at)),
            counters: vec![(Counter::ForwardResteered, 1)],
        },
        &[],
    );
    assert_eq!(h.entry(&t_flow).unwrap().backend_id, t2);
    assert!(
        h.entry(&flow_of(&stale)).is_none(),
        "{hook:?}: the stale backend's entry is gone"
    );
    // An ACK that does acknowledge the SYN (no SYN flag: not a handshake answer lb
    // knows) is left alone: it goes on to the client.
    let a_syn = linux_syn(40036);
    let a_flow = flow_of(&a_syn);
    let (a1_addr, a1_port, _) = h.predicted_backend(&WEB, &a_flow);
    h.run(&a_syn.build());
    let odd = PacketSpec::tcp((a1_addr, a1_port), client(40036), ACK)
        .with_seq(0x0bad_cafe)
        .with_ack(ISN.wrapping_add(1));
    check(
        &mut h,
        Case {
            name: "a bare ACK that acknowledges the SYN is reverse-NATed, not re-sent".into(),
            input: odd.build(),
            verdict: Verdict::Pass,
            output: Some(odd.clone().with_src(vip80).build()),
            counters: vec![(Counter::ReplyTracked, 1)],
        },
    );
    // Once the backend has answered with a SYN-ACK, its segments are this connection's,
    // whatever they acknowledge (with TCP Fast Open, data sent with the SYN): a bare ACK
    // (a window update) that acknowledges more than the SYN goes on to the client.
    let f_syn = linux_syn(40037);
    let f_flow = flow_of(&f_syn);
    let (f_addr, f_port, _) = h.predicted_backend(&WEB, &f_flow);
    h.run(&f_syn.build());
    let f_synack = PacketSpec::tcp((f_addr, f_port), client(40037), SYN | ACK)
        .with_seq(0x0fa5_0000)
        .with_ack(ISN.wrapping_add(6));
    h.run(&f_synack.build());
    let f_data = PacketSpec::tcp((f_addr, f_port), client(40037), ACK)
        .with_seq(0x0fa5_0001)
        .with_ack(ISN.wrapping_add(6))
        .with_window(1024);
    check(
        &mut h,
        Case {
            name: "after its SYN-ACK, a backend's bare ACK acknowledging more than the SYN \
                   is reverse-NATed, not re-sent"
                .into(),
            input: f_data.build(),
            verdict: Verdict::Pass,
            output: Some(f_data.clone().with_src(vip80).build()),
            counters: vec![(Counter::ReplyTracked, 1)],
        },
    );

    // The budget: `dataplane.connect_retries` re-sends per connection attempt. A SYN that
    // asks for ECN and offers only an MSS: the re-sent SYN keeps ECN and has NOPs where
    // the client offered nothing. Its ISN is the largest, so the refusal acknowledges 0.
    let ecn_syn = PacketSpec::tcp(client(40031), vip80, SYN | ECE | CWR)
        .with_seq(u32::MAX)
        .with_ack(0)
        .with_window(29200)
        .with_tcp_options(&[2, 4, 0x05, 0x78]);
    let mut mss_and_nops = vec![2, 4, 0x05, 0x78];
    mss_and_nops.extend([1; 16]);
    let ecn_resent = ecn_syn.clone().with_tcp_options(&mss_and_nops);
    let e_flow = flow_of(&ecn_syn);
    let (e_addr, e_port, mut e_id) = h.predicted_backend(&WEB, &e_flow);
    let mut e_at = (e_addr, e_port);
    check(
        &mut h,
        Case {
            name: "SYN asking for ECN with only an MSS option".into(),
            input: ecn_syn.build(),
            verdict: Verdict::Pass,
            output: Some(ecn_syn.clone().with_dst(e_at).build()),
            counters: vec![(Counter::ForwardNew, 1), (Counter::EventTracked, 1)],
        },
    );
    let orig = h.entry(&e_flow).unwrap();
    assert_eq!(
        (orig.flags, orig.syn_mss, orig.syn_window, orig.syn_isn),
        (SYN_ECN, 1400, 29200, u32::MAX)
    );
    for n in 1..=budget {
        let orig = h.entry(&e_flow).unwrap();
        let (next_at, next, _) = h.next_backend(&WEB, &orig).expect("another backend");
        check_signalled(
            &mut h,
            Case {
                name: format!(
                    "refusal {n} of a budget of {budget}: re-sent to the next backend with \
                     ECN, the MSS and NOPs"
                ),
                input: refusal(e_at, 40031, u32::MAX).build(),
                verdict: Verdict::Redirect,
                output: Some(resent(&ecn_resent, next_at)),
                counters: vec![(Counter::ForwardResteered, 1)],
            },
            &[sig(SignalKind::ConnectRefused, svc_id, e_id)],
        );
        let entry = h.entry(&e_flow).unwrap();
        assert_eq!(
            (entry.backend_id, entry.retries, entry.state),
            (next, n as u8, ConnState::TcpSyn as u8)
        );
        (e_at, e_id) = (next_at, next);
    }
    // Here the budget and the failover list end together (three backends);
    // `the_retry_budget_bounds_resteers` and the last case below separate them.
    let last = refusal(e_at, 40031, u32::MAX);
    check_signalled(
        &mut h,
        Case {
            name: "refusal after the budget is used up reaches the client, from the VIP".into(),
            input: last.build(),
            verdict: Verdict::Pass,
            output: Some(last.clone().with_src(vip80).build()),
            counters: vec![(Counter::ReplyTracked, 1), (Counter::EventRefusalPassed, 1)],
        },
        &[sig(SignalKind::ConnectRefused, svc_id, e_id)],
    );
    let entry = h.entry(&e_flow).unwrap();
    assert_eq!(
        (entry.backend_id, entry.retries, entry.state),
        (e_id, budget as u8, ConnState::TcpClosing as u8)
    );

    // --- Connect timeouts: a client retransmits its SYN when no answer came.
    let t_syn = linux_syn(40032);
    let t_flow = flow_of(&t_syn);
    let (t1_addr, t1_port, t1) = h.predicted_backend(&WEB, &t_flow);
    let t1_at = (t1_addr, t1_port);
    check(
        &mut h,
        Case {
            name: "SYN of a connection whose backend will not answer".into(),
            input: t_syn.build(),
            verdict: Verdict::Pass,
            output: Some(t_syn.clone().with_dst(t1_at).build()),
            counters: vec![(Counter::ForwardNew, 1), (Counter::EventTracked, 1)],
        },
    );
    check(
        &mut h,
        Case {
            name: "the same SYN again at once is a duplicate, not a timeout: same backend".into(),
            input: t_syn.build(),
            verdict: Verdict::Pass,
            output: Some(t_syn.clone().with_dst(t1_at).build()),
            counters: vec![(Counter::ForwardTracked, 1)],
        },
    );
    let t_orig = h.entry(&t_flow).unwrap();
    assert_eq!((t_orig.backend_id, t_orig.retries), (t1, 0));

    // --- ICMP destination unreachable about the SYN: the backend cannot be reached.
    let u_syn = linux_syn(40033);
    let u_flow = flow_of(&u_syn);
    let (u1_addr, u1_port, u1) = h.predicted_backend(&WEB, &u_flow);
    let u1_at = (u1_addr, u1_port);
    check(
        &mut h,
        Case {
            name: "SYN of a connection whose backend cannot be reached".into(),
            input: u_syn.build(),
            verdict: Verdict::Pass,
            output: Some(u_syn.clone().with_dst(u1_at).build()),
            counters: vec![(Counter::ForwardNew, 1), (Counter::EventTracked, 1)],
        },
    );
    let orig = h.entry(&u_flow).unwrap();
    let (u2_at, u2, _) = h.next_backend(&WEB, &orig).expect("another backend");
    // A router on the way quotes the whole SYN as the backend side saw it.
    let router = Ipv4Addr::new(10, 200, 0, 1);
    let unreachable = icmp_error(router, CLIENT, 3, 1, 0, &u_syn.clone().with_dst(u1_at), 60);
    check_signalled(
        &mut h,
        Case {
            name: "host unreachable about the SYN is held back; the attempt moves on".into(),
            input: unreachable,
            verdict: Verdict::Drop,
            output: None,
            counters: vec![(Counter::DropRefusalHeld, 1)],
        },
        &[sig(SignalKind::Unreachable, svc_id, u1)],
    );
    let held = h.entry(&u_flow).unwrap();
    assert_eq!(
        (held.backend_id, held.retries, held.flags),
        (
            u2,
            1,
            SYN_OPT_SACK | SYN_OPT_TIMESTAMPS | SYN_OPT_WSCALE | CONN_AWAIT_RETRANSMIT
        )
    );
    assert!(h
        .entry(&flow_of(&PacketSpec::tcp(u1_at, client(40033), ACK)))
        .is_none());
    assert!(h
        .entry(&flow_of(&PacketSpec::tcp(u2_at, client(40033), ACK)))
        .is_some());

    // Both clients retransmit after the backend had time to answer (Linux waits 1 s);
    // one sleep past SYN_RETRANSMIT_MIN_NS serves both.
    std::thread::sleep(Duration::from_nanos(SYN_RETRANSMIT_MIN_NS) + Duration::from_millis(50));
    let (t2_at, t2, t2_pos) = h.next_backend(&WEB, &t_orig).expect("another backend");
    check_signalled(
        &mut h,
        Case {
            name: "SYN retransmitted after 200 ms is a connect timeout: signalled, and sent \
                   to the next backend"
                .into(),
            input: t_syn.build(),
            verdict: Verdict::Pass,
            output: Some(t_syn.clone().with_dst(t2_at).build()),
            counters: vec![
                (Counter::ForwardTracked, 1),
                (Counter::EventTimeoutResteered, 1),
            ],
        },
        &[sig(SignalKind::ConnectTimeout, svc_id, t1)],
    );
    let moved = h.entry(&t_flow).unwrap();
    assert_eq!(
        moved,
        ConnEntry {
            nat_addr: AddrBe::v4(t2_at.0.octets()),
            nat_port_be: t2_at.1.to_be(),
            backend_id: t2,
            retries: 1,
            fallback_cursor: (t2_pos + 1) as u8,
            last_seen_ns: moved.last_seen_ns,
            ..t_orig
        }
    );
    assert!(moved.last_seen_ns > t_orig.last_seen_ns + SYN_RETRANSMIT_MIN_NS);
    assert!(h
        .entry(&flow_of(&PacketSpec::tcp(t1_at, client(40032), ACK)))
        .is_none());
    assert!(h
        .entry(&flow_of(&PacketSpec::tcp(t2_at, client(40032), ACK)))
        .is_some());
    check(
        &mut h,
        Case {
            name: "the SYN retransmitted after a held-back unreachable goes to the new backend \
                   and is no timeout"
                .into(),
            input: u_syn.build(),
            verdict: Verdict::Pass,
            output: Some(u_syn.clone().with_dst(u2_at).build()),
            counters: vec![(Counter::ForwardTracked, 1)],
        },
    );
    let entry = h.entry(&u_flow).unwrap();
    assert_eq!(
        (
            entry.backend_id,
            entry.retries,
            entry.flags & CONN_AWAIT_RETRANSMIT
        ),
        (u2, 1, 0)
    );
    // The second backend rejects it itself (iptables' REJECT: port unreachable).
    let (u3_at, u3, _) = h.next_backend(&WEB, &entry).expect("a third backend");
    let rejected = icmp_error(u2_at.0, CLIENT, 3, 3, 0, &u_syn.clone().with_dst(u2_at), 60);
    check_signalled(
        &mut h,
        Case {
            name: "port unreachable from the second backend is held back as well".into(),
            input: rejected,
            verdict: Verdict::Drop,
            output: None,
            counters: vec![(Counter::DropRefusalHeld, 1)],
        },
        &[sig(SignalKind::Unreachable, svc_id, u2)],
    );
    check(
        &mut h,
        Case {
            name: "the next retransmission goes to the third backend".into(),
            input: u_syn.build(),
            verdict: Verdict::Pass,
            output: Some(u_syn.clone().with_dst(u3_at).build()),
            counters: vec![(Counter::ForwardTracked, 1)],
        },
    );
    check_signalled(
        &mut h,
        Case {
            name: "unreachable after the budget is used up is translated for the client".into(),
            input: icmp_error(u3_at.0, CLIENT, 3, 3, 0, &u_syn.clone().with_dst(u3_at), 60),
            verdict: Verdict::Pass,
            output: Some(icmp_error(VIP, CLIENT, 3, 3, 0, &u_syn, 60)),
            counters: vec![
                (Counter::ReplyIcmpError, 1),
                (Counter::EventRefusalPassed, 1),
            ],
        },
        &[sig(SignalKind::Unreachable, svc_id, u3)],
    );
    assert_eq!(h.entry(&u_flow).unwrap().retries, budget as u8);

    // --- HTTP/1.x response status, read for services published with the HTTP flag.
    let api_id = h.programmer.service_id(&API).unwrap();
    let api_vip = (VIP, 8000);
    let h_syn = PacketSpec::tcp(client(40040), api_vip, SYN);
    let (h_addr, h_port, h_id) = h.predicted_backend(&API, &flow_of(&h_syn));
    assert_eq!((h_addr, h_port), API_BACKEND);
    h.run(&h_syn.build());
    assert_eq!(
        h.entry(&flow_of(&h_syn)).unwrap().flags & CONN_HTTP,
        CONN_HTTP
    );
    h.run(&PacketSpec::tcp(API_BACKEND, client(40040), SYN | ACK).build());
    h.run(
        &PacketSpec::tcp(client(40040), api_vip, ACK)
            .with_payload(b"GET /a HTTP/1.1\r\nHost: api\r\n\r\n")
            .build(),
    );
    // Each segment its own sequence number, as on a real connection: a segment that
    // starts the same response again (a retransmission) is not counted twice.
    let next_seq = std::cell::Cell::new(5000u32);
    let response = |payload: &[u8]| {
        next_seq.set(next_seq.get() + 1000);
        PacketSpec::tcp(API_BACKEND, client(40040), ACK | PSH)
            .with_seq(next_seq.get())
            .with_payload(payload)
    };
    let http_case = |name: &str, seg: &PacketSpec, extra: Option<Counter>| Case {
        name: name.into(),
        input: seg.build(),
        verdict: Verdict::Pass,
        output: Some(seg.clone().with_src(api_vip).build()),
        counters: std::iter::once((Counter::ReplyTracked, 1))
            .chain(extra.map(|c| (c, 1)))
            .collect(),
    };
    let ok = response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello");
    check_response(
        &mut h,
        http_case("200 response counts a success", &ok, None),
        &[],
        h_id,
        (1, 0),
    );
    check_response(
        &mut h,
        http_case("the same response retransmitted is counted once", &ok, None),
        &[],
        h_id,
        (0, 0),
    );
    let body = response(b"hello, and a quoted HTTP/1.1 503 in the body");
    check_response(
        &mut h,
        http_case("a body segment is not read as a response", &body, None),
        &[],
        h_id,
        (0, 0),
    );
    let error = response(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
    check_response(
        &mut h,
        http_case(
            "503 response counts an error and is signalled",
            &error,
            None,
        ),
        &[Sig {
            status: 503,
            ..sig(SignalKind::HttpError, api_id, h_id)
        }],
        h_id,
        (0, 1),
    );
    let shortest = response(b"HTTP/1.1 502");
    check_response(
        &mut h,
        http_case("a status line of exactly 12 bytes is read", &shortest, None),
        &[Sig {
            status: 502,
            ..sig(SignalKind::HttpError, api_id, h_id)
        }],
        h_id,
        (0, 1),
    );
    let old = response(b"HTTP/1.0 404 Not Found\r\n\r\n");
    check_response(
        &mut h,
        http_case("HTTP/1.0 404 is a success (below 500)", &old, None),
        &[],
        h_id,
        (1, 0),
    );
    let split_head = response(b"HTTP/1.1 50");
    check_response(
        &mut h,
        http_case(
            "status line split across segments: the first is unparsed",
            &split_head,
            Some(Counter::EventHttpUnparsed),
        ),
        &[],
        h_id,
        (0, 0),
    );
    let split_tail = response(b"3 Service Unavailable\r\n\r\n");
    check_response(
        &mut h,
        http_case("... and its rest is not a response", &split_tail, None),
        &[],
        h_id,
        (0, 0),
    );
    for bad in [
        &b"HTTP/1.1 5x3 Odd\r\n\r\n"[..],
        b"HTTP/1.1 600 Huh\r\n",
        b"HTTP/1.1503 \r\n",
    ] {
        let seg = response(bad);
        check_response(
            &mut h,
            http_case(
                &format!(
                    "malformed status {:?} is unparsed",
                    String::from_utf8_lossy(bad)
                ),
                &seg,
                Some(Counter::EventHttpUnparsed),
            ),
            &[],
            h_id,
            (0, 0),
        );
    }
    // Frames whose IPv4 length claims more payload than they hold: nothing is read past
    // the end. Cut inside `HTTP/1.`, the segment is not a response; cut inside the
    // status, it is one whose status cannot be read (unparsed, as when it is too short).
    for (keep, unparsed) in [(6, None), (10, Some(Counter::EventHttpUnparsed))] {
        let seg = response(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
        let whole = seg.build();
        let cut = 14 + 20 + 20 + keep;
        let mut case = http_case(
            &format!("frame cut after {keep} payload bytes: no read past its end"),
            &seg,
            unparsed,
        );
        case.input = whole[..cut].to_vec();
        case.output = Some(seg.clone().with_src(api_vip).build()[..cut].to_vec());
        check_response(&mut h, case, &[], h_id, (0, 0));
    }
    // The same 503 from a backend of a service without the HTTP flag (the connection that
    // was re-sent to its second backend above).
    let plain = PacketSpec::tcp(r2_at, client(40030), ACK | PSH)
        .with_payload(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
    check_response(
        &mut h,
        Case {
            name: "503 on a service without the HTTP flag is not read".into(),
            input: plain.build(),
            verdict: Verdict::Pass,
            output: Some(plain.clone().with_src(vip80).build()),
            counters: vec![(Counter::ReplyTracked, 1)],
        },
        &[],
        r2,
        (0, 0),
    );

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
    // Established both ways (the backend's side once it sent a segment without SYN): an
    // unreachable during the handshake is a connect failure, handled above.
    h.run(&PacketSpec::tcp(b3, client(40010), SYN | ACK).build());
    h.run(&PacketSpec::tcp(client(40010), vip80, ACK).build());
    h.run(&PacketSpec::tcp(b3, client(40010), ACK).build());
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
    // The failover list, like the table, still names the ejected backend: a re-steer
    // skips it by its state in the backends map. A connection on the backend listed just
    // before it must go to the one listed just after it.
    let list = h.dp.failover_list(&WEB).unwrap();
    let pos = list.iter().position(|&id| id == ejected_id).unwrap();
    assert!(
        pos >= 1 && pos + 1 < list.len(),
        "the ejected backend is mid-list"
    );
    let (before_id, after_id) = (list[pos - 1], list[pos + 1]);
    let (before_at, after_at) = (h.backend_addr(before_id), h.backend_addr(after_id));
    let s_port = port_landing_on(&h, &WEB, linux_syn, before_id, new_port + 1);
    let s_syn = linux_syn(s_port);
    check(
        &mut h,
        Case {
            name: "SYN to the backend listed before the ejected one".into(),
            input: s_syn.build(),
            verdict: Verdict::Pass,
            output: Some(s_syn.clone().with_dst(before_at).build()),
            counters: vec![(Counter::ForwardNew, 1), (Counter::EventTracked, 1)],
        },
    );
    check_signalled(
        &mut h,
        Case {
            name: "re-steer skips a backend the failover list names but the map has ejected".into(),
            // With a payload (RFC 1122 allows diagnostic text in an RST): the packet
            // shrinks to the SYN.
            input: refusal(before_at, s_port, ISN)
                .with_payload(&[b'x'; 100])
                .build(),
            verdict: Verdict::Redirect,
            output: Some(resent(&s_syn, after_at)),
            counters: vec![(Counter::ForwardResteered, 1)],
        },
        &[sig(SignalKind::ConnectRefused, svc_id, before_id)],
    );
    let entry = h.entry(&flow_of(&s_syn)).unwrap();
    assert_eq!(
        (entry.backend_id, entry.fallback_cursor),
        (after_id, (pos + 2) as u8)
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
        assert_eq!(verdict, Verdict::Redirect);
        assert_eq!(
            out,
            to_backend(&s.clone().with_dst((BACKENDS[1], 8080)).build()),
            "{hook:?}: only the active backend"
        );
    }
    // A refusal with budget left but no other active backend (the list holds only the
    // active ones) reaches the client.
    let lone_id = h.programmer.backend_id(&WEB, BACKENDS[1], 8080).unwrap();
    assert_eq!(h.dp.failover_list(&WEB).unwrap(), vec![lone_id]);
    let lone = linux_syn(41100);
    check(
        &mut h,
        Case {
            name: "SYN to the only active backend".into(),
            input: lone.build(),
            verdict: Verdict::Pass,
            output: Some(lone.clone().with_dst((BACKENDS[1], 8080)).build()),
            counters: vec![(Counter::ForwardNew, 1), (Counter::EventTracked, 1)],
        },
    );
    let refused = refusal((BACKENDS[1], 8080), 41100, ISN);
    check_signalled(
        &mut h,
        Case {
            name: "refusal with no other active backend reaches the client, from the VIP".into(),
            input: refused.build(),
            verdict: Verdict::Pass,
            output: Some(refused.clone().with_src(vip80).build()),
            counters: vec![(Counter::ReplyTracked, 1), (Counter::EventRefusalPassed, 1)],
        },
        &[sig(SignalKind::ConnectRefused, svc_id, lone_id)],
    );
    let entry = h.entry(&flow_of(&lone)).unwrap();
    assert_eq!(
        (entry.backend_id, entry.retries, entry.state),
        (lone_id, 0, ConnState::TcpClosing as u8)
    );
}

#[test]
fn xdp_fixtures() {
    if !require_root() {
        return;
    }
    // XDP forwards rewritten packets by the routes of the namespace it runs in.
    routed_netns("dpxf").run(|| {
        run_fixtures(Hook::Xdp);
    });
}

/// A rewritten packet the stack must decide about goes to it, the reason counted: a TTL
/// that expires here (the stack sends ICMP time exceeded), a packet larger than the
/// egress MTU (the stack fragments it or sends ICMP), a destination with no route.
fn run_stack_fallbacks(hook: Hook) {
    let mut h = Harness::new(hook);
    let counted = |reason: Counter| {
        vec![
            (Counter::ForwardNew, 1),
            (Counter::EventTracked, 1),
            (reason, 1),
        ]
    };
    let syn = PacketSpec::tcp(client(42000), (VIP, 80), SYN);
    let (addr, port, _) = h.predicted_backend(&WEB, &flow_of(&syn));
    let last_hop = packets::with_ttl(&syn.build(), 1);
    check(
        &mut h,
        Case {
            name: "TTL 1: DNATed, left to the stack".into(),
            input: last_hop,
            verdict: Verdict::Pass,
            output: Some(packets::with_ttl(
                &syn.clone().with_dst((addr, port)).build(),
                1,
            )),
            counters: counted(Counter::EventStackTtl),
        },
    );
    let big = PacketSpec::udp(client(42001), (VIP, 53), &[7u8; 1600]);
    let (addr, port, _) = h.predicted_backend(&DNS, &flow_of(&big));
    check(
        &mut h,
        Case {
            name: "larger than the egress MTU: DNATed, left to the stack".into(),
            input: big.build(),
            verdict: Verdict::Pass,
            output: Some(big.clone().with_dst((addr, port)).build()),
            counters: counted(Counter::EventStackFragNeeded),
        },
    );
}

#[test]
fn stack_fallbacks_tc() {
    if !require_root() {
        return;
    }
    routed_netns("dps").run(|| run_stack_fallbacks(Hook::TcIngress));
}

#[test]
fn stack_fallbacks_xdp() {
    if !require_root() {
        return;
    }
    routed_netns("dpx").run(|| run_stack_fallbacks(Hook::Xdp));
}

#[test]
fn tc_fixtures() {
    if !require_root() {
        return;
    }
    let ns = routed_netns("dpf");
    ns.run(|| run_fixtures(Hook::TcIngress));
}

/// A full connection table evicts the least recently used entries and counts what that
/// costs: a later packet of an evicted flow is re-selected by hash (counted as a midflow
/// miss) and lands on the same backend, because the selection table has not changed.
#[test]
fn full_connection_table_evicts_counts_and_keeps_routing() {
    if !require_root() {
        return;
    }
    // XDP forwards rewritten packets by the routes of the namespace it runs in.
    routed_netns("dpev").run(|| {
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
        assert_eq!(verdict, Verdict::Redirect);
        assert_eq!(
            out,
            to_backend(&first.clone().with_dst((addr, port)).build())
        );
        for p in 30001..30501 {
            let (verdict, _) = h.run(&PacketSpec::tcp(client(p), vip80, SYN).build());
            assert_eq!(verdict, Verdict::Redirect);
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
    });
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
    routed_netns("dpi").run(|| idle_flows_expire(options));
}

fn idle_flows_expire(options: DataplaneOptions) {
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

/// `dataplane.connect_retries` bounds the re-steers of one connection attempt even when
/// another backend is eligible; 0 turns re-steering off.
#[test]
fn the_retry_budget_bounds_resteers() {
    if !require_root() {
        return;
    }
    // XDP forwards rewritten packets by the routes of the namespace it runs in.
    routed_netns("dprb").run(|| {
        for budget in [0u32, 1] {
            let mut options = DataplaneOptions {
                max_connections: 1024,
                ..Default::default()
            };
            options.timeouts.connect_retries = budget;
            let mut h = Harness::with_options(Hook::Xdp, options);
            let svc_id = h.programmer.service_id(&WEB).unwrap();
            let vip80 = (VIP, 80);
            let syn = PacketSpec::tcp(client(45000), vip80, SYN)
                .with_seq(7)
                .with_ack(0);
            let flow = flow_of(&syn);
            let (addr, port, mut id) = h.predicted_backend(&WEB, &flow);
            let mut at = (addr, port);
            h.run(&syn.build());
            let refusal = |from: (Ipv4Addr, u16)| {
                PacketSpec::tcp(from, client(45000), RST | ACK)
                    .with_seq(0)
                    .with_ack(8)
            };
            for n in 1..=budget {
                let orig = h.entry(&flow).unwrap();
                let (next_at, next, _) = h.next_backend(&WEB, &orig).expect("another backend");
                // The builder's SYN has no options: the re-sent one has NOPs only.
                let resent = syn
                    .clone()
                    .with_dst(next_at)
                    .with_ip_id(0)
                    .with_tcp_options(&[1; 20]);
                check_signalled(
                    &mut h,
                    Case {
                        name: format!("budget {budget}: refusal {n} is re-sent"),
                        input: refusal(at).build(),
                        verdict: Verdict::Pass,
                        output: Some(resent.build()),
                        counters: vec![(Counter::ForwardResteered, 1)],
                    },
                    &[sig(SignalKind::ConnectRefused, svc_id, id)],
                );
                (at, id) = (next_at, next);
            }
            let orig = h.entry(&flow).unwrap();
            assert_eq!(orig.retries as u32, budget);
            assert!(
                h.next_backend(&WEB, &orig).is_some(),
                "another backend would be eligible"
            );
            let last = refusal(at);
            check_signalled(
                &mut h,
                Case {
                    name: format!("budget {budget}: the next refusal reaches the client"),
                    input: last.build(),
                    verdict: Verdict::Pass,
                    output: Some(last.clone().with_src(vip80).build()),
                    counters: vec![(Counter::ReplyTracked, 1), (Counter::EventRefusalPassed, 1)],
                },
                &[sig(SignalKind::ConnectRefused, svc_id, id)],
            );
        }
    });
}

/// A connection the client has completed (SYN, SYN-ACK, ACK with a request) whose backend
/// has not sent anything yet: the usual state of a request/response protocol while the
/// request is on its way. Returns the harness, the backend and the request as sent.
fn established_before_the_backend_speaks(port: u16) -> (Harness, (Ipv4Addr, u16), u32) {
    let mut h = Harness::new(Hook::Xdp);
    let vip80 = (VIP, 80);
    let syn = PacketSpec::tcp(client(port), vip80, SYN);
    let (addr, bport, id) = h.predicted_backend(&WEB, &flow_of(&syn));
    h.run(&syn.build());
    h.run(&PacketSpec::tcp((addr, bport), client(port), SYN | ACK).build());
    h.run(
        &PacketSpec::tcp(client(port), vip80, ACK)
            .with_payload(&[7; 1400])
            .build(),
    );
    assert_eq!(
        h.entry(&flow_of(&syn)).unwrap().state,
        ConnState::TcpEstablished as u8,
        "the client completed the handshake"
    );
    h.signals();
    (h, (addr, bport), id)
}

/// Path MTU discovery on a connection whose handshake is complete is not a connect
/// failure: the error is translated for the client, and nothing is signalled.
#[test]
fn fragmentation_needed_after_the_handshake_is_no_connect_failure() {
    if !require_root() {
        return;
    }
    // XDP forwards rewritten packets by the routes of the namespace it runs in.
    routed_netns("dpfn").run(|| {
        let (mut h, backend, _) = established_before_the_backend_speaks(46000);
        let seen = PacketSpec::tcp(client(46000), backend, ACK).with_payload(&[7; 1400]);
        let sent = seen.clone().with_dst((VIP, 80));
        let router = Ipv4Addr::new(10, 200, 3, 1);
        check(
            &mut h,
            Case {
                name: "fragmentation needed about the client's request".into(),
                input: icmp_error(router, CLIENT, 3, 4, 1280, &seen, 48),
                verdict: Verdict::Pass,
                output: Some(icmp_error(router, CLIENT, 3, 4, 1280, &sent, 48)),
                counters: vec![(Counter::ReplyIcmpError, 1)],
            },
        );
    });
}

/// A backend that resets a connection after the client completed the handshake did not
/// refuse the connection: a reset, not a refusal passed to the client.
#[test]
fn reset_after_the_handshake_is_no_refusal() {
    if !require_root() {
        return;
    }
    // XDP forwards rewritten packets by the routes of the namespace it runs in.
    routed_netns("dprs").run(|| {
        let (mut h, backend, id) = established_before_the_backend_speaks(46001);
        let svc_id = h.programmer.service_id(&WEB).unwrap();
        let rst = PacketSpec::tcp(backend, client(46001), RST | ACK);
        check_signalled(
            &mut h,
            Case {
                name: "RST from the backend before it sent anything".into(),
                input: rst.build(),
                verdict: Verdict::Pass,
                output: Some(rst.clone().with_src((VIP, 80)).build()),
                counters: vec![(Counter::ReplyTracked, 1)],
            },
            &[sig(SignalKind::EstablishedReset, svc_id, id)],
        );
    });
}

/// A late packet of an older connection on the same client ports, from the backend it
/// had been re-steered to (its reply entry is still there, closing), is translated as
/// before but does not touch the entries of the connection that now uses the ports: it
/// used to move the new connection's entry to closing (10 s instead of hours), leaving its
/// reply entry open. Found by the packet fuzzer (reply entries of older connections left
/// open).
#[test]
fn an_older_connections_late_packet_leaves_the_new_connection_alone() {
    if !require_root() {
        return;
    }
    // XDP forwards rewritten packets by the routes of the namespace it runs in.
    routed_netns("dplp").run(|| {
        let mut h = Harness::new(Hook::Xdp);
        let list = h.dp.failover_list(&WEB).unwrap();
        let vip80 = (VIP, 80);
        let spec = |port| {
            PacketSpec::tcp(client(port), vip80, SYN)
                .with_seq(7)
                .with_ack(0)
        };
        let port = port_landing_on(&h, &WEB, spec, list[0], 48000);
        let flow = flow_of(&spec(port));
        let first = h.backend_addr(list[0]);
        // The older connection: refused by the backend the table gives, re-sent to another,
        // then closed by the client.
        h.run(&spec(port).build());
        let (verdict, _) = h.run(
            &PacketSpec::tcp(first, client(port), RST | ACK)
                .with_seq(0)
                .with_ack(8)
                .build(),
        );
        assert_ne!(verdict, Verdict::Drop);
        let old = h.entry(&flow).unwrap();
        assert_ne!(old.backend_id, list[0], "re-steered");
        let older_backend = h.backend_addr(old.backend_id);
        h.run(
            &PacketSpec::tcp(client(port), vip80, FIN | ACK)
                .with_seq(8)
                .build(),
        );
        assert_eq!(h.entry(&flow).unwrap().state, ConnState::TcpClosing as u8);
        // The new connection on the same ports: the table's backend again, established.
        let syn = PacketSpec::tcp(client(port), vip80, SYN)
            .with_seq(1000)
            .with_ack(0);
        h.run(&syn.build());
        h.run(
            &PacketSpec::tcp(first, client(port), SYN | ACK)
                .with_seq(5000)
                .with_ack(1001)
                .build(),
        );
        h.run(
            &PacketSpec::tcp(client(port), vip80, ACK)
                .with_seq(1001)
                .with_ack(5001)
                .build(),
        );
        let new = h.entry(&flow).unwrap();
        assert_eq!(
            (new.backend_id, new.state),
            (list[0], ConnState::TcpEstablished as u8)
        );
        // Entries are refreshed (and their partner with them) at most once a second.
        std::thread::sleep(Duration::from_millis(1100));
        let late = PacketSpec::tcp(older_backend, client(port), FIN | ACK).with_seq(9000);
        let (verdict, out) = h.run(&late.build());
        assert_eq!(verdict, Verdict::Pass);
        assert_eq!(
            out,
            late.clone().with_src(vip80).build(),
            "the older connection's packet is translated as before"
        );
        let after = h.entry(&flow).unwrap();
        assert_eq!(
            (after.backend_id, after.state),
            (list[0], ConnState::TcpEstablished as u8),
            "the new connection's entry is left alone"
        );
        let reply = h
            .entry(&flow_of(&PacketSpec::tcp(first, client(port), ACK)))
            .unwrap();
        assert_eq!(reply.state, ConnState::TcpEstablished as u8);
    });
}

/// A SYN with another initial sequence number while a handshake is pending on the same
/// ports is a new attempt (the client closed the socket of the first while it was
/// connecting, which sends nothing): a new connection, to the backend the table gives,
/// and the first attempt's backend side is gone. (It used to be forwarded on the old
/// entry, to the backend the first attempt had been re-steered to, and its own
/// retransmissions never counted as timeouts: found by the soak, one connection attempt
/// without `forward_new`.)
#[test]
fn a_new_attempt_on_the_same_ports_is_a_new_connection() {
    if !require_root() {
        return;
    }
    // XDP forwards rewritten packets by the routes of the namespace it runs in.
    routed_netns("dpna").run(|| {
        let mut h = Harness::new(Hook::Xdp);
        let list = h.dp.failover_list(&WEB).unwrap();
        let vip80 = (VIP, 80);
        let syn = |port, isn| {
            PacketSpec::tcp(client(port), vip80, SYN)
                .with_seq(isn)
                .with_ack(0)
        };
        let port = port_landing_on(&h, &WEB, |p| syn(p, 7), list[0], 49000);
        let flow = flow_of(&syn(port, 7));
        let first = h.backend_addr(list[0]);
        h.run(&syn(port, 7).build());
        h.run(
            &PacketSpec::tcp(first, client(port), RST | ACK)
                .with_seq(0)
                .with_ack(8)
                .build(),
        );
        let moved = h.entry(&flow).unwrap();
        assert_ne!(moved.backend_id, list[0], "re-steered");
        let moved_reply = flow_of(&PacketSpec::tcp(
            h.backend_addr(moved.backend_id),
            client(port),
            ACK,
        ));
        assert!(h.entry(&moved_reply).is_some());

        let before = h.counters();
        let (verdict, out) = h.run(&syn(port, 9000).build());
        assert_eq!(verdict, Verdict::Redirect);
        assert_eq!(
            out,
            to_backend(&syn(port, 9000).with_dst(first).build()),
            "to the table's backend"
        );
        let after = h.counters();
        assert_eq!(after["forward_new"] - before["forward_new"], 1);
        let entry = h.entry(&flow).unwrap();
        assert_eq!(
            (entry.backend_id, entry.syn_isn, entry.retries),
            (list[0], 9000, 0)
        );
        assert!(
            h.entry(&moved_reply).is_none(),
            "the first attempt's backend side is gone"
        );
        // Its retransmission is the same attempt: tracked, not another new connection.
        let before = h.counters();
        h.run(&syn(port, 9000).build());
        assert_eq!(h.counters()["forward_new"], before["forward_new"]);
    });
}

/// A retransmitted SYN moved to another backend (connect timeout) is one packet: the
/// service and the new backend count it once.
#[test]
fn a_syn_resent_after_a_timeout_counts_as_one_packet() {
    if !require_root() {
        return;
    }
    // XDP forwards rewritten packets by the routes of the namespace it runs in.
    routed_netns("dpsr").run(|| {
        let mut h = Harness::new(Hook::Xdp);
        let svc_id = h.programmer.service_id(&WEB).unwrap();
        let syn = PacketSpec::tcp(client(47000), (VIP, 80), SYN).with_ack(0);
        h.run(&syn.build());
        let orig = h.entry(&flow_of(&syn)).unwrap();
        let (_, next, _) = h.next_backend(&WEB, &orig).expect("another backend");
        let packets = |h: &Harness| {
            (
                h.dp.service_stats(svc_id).unwrap().packets,
                h.dp.backend_stats(next).unwrap().packets,
            )
        };
        let before = packets(&h);
        std::thread::sleep(Duration::from_nanos(SYN_RETRANSMIT_MIN_NS) + Duration::from_millis(50));
        h.run(&syn.build());
        assert_eq!(h.entry(&flow_of(&syn)).unwrap().backend_id, next);
        let after = packets(&h);
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            (1, 1),
            "packets of the service and of the new backend"
        );
    });
}

/// The failover list can be republished shorter between two re-steers of one connection
/// attempt (an ejection). The walk wraps, so a cursor past the new end does not hide a
/// backend that is still eligible (found by the soak test: the refusal used to reach the
/// client, or a retransmitted SYN stayed on a black-holed backend).
#[test]
fn a_shorter_failover_list_does_not_hide_an_eligible_backend() {
    if !require_root() {
        return;
    }
    // XDP forwards rewritten packets by the routes of the namespace it runs in.
    routed_netns("dpsl").run(|| {
        let mut h = Harness::new(Hook::Xdp);
        let svc_id = h.programmer.service_id(&WEB).unwrap();
        let list = h.dp.failover_list(&WEB).unwrap();
        assert_eq!(list.len(), 3);
        let vip80 = (VIP, 80);
        let spec = |port| {
            PacketSpec::tcp(client(port), vip80, SYN)
                .with_seq(7)
                .with_ack(0)
        };
        let port = port_landing_on(&h, &WEB, spec, list[0], 46000);
        let syn = spec(port);
        let flow = flow_of(&syn);
        h.run(&syn.build());
        let refusal = |from: (Ipv4Addr, u16)| {
            PacketSpec::tcp(from, client(port), RST | ACK)
                .with_seq(0)
                .with_ack(8)
        };
        // First refusal: re-sent to list[1]; the cursor now points past it (2).
        let (verdict, _) = h.run(&refusal(h.backend_addr(list[0])).build());
        assert_eq!(verdict, Verdict::Redirect);
        let orig = h.entry(&flow).unwrap();
        assert_eq!((orig.backend_id, orig.fallback_cursor), (list[1], 2));
        // The first backend is ejected: the list becomes [list[1], list[2]], shorter than the
        // cursor.
        h.programmer
            .apply(
                &mut h.dp,
                &desired([
                    BackendState::Ejected,
                    BackendState::Active,
                    BackendState::Active,
                ]),
            )
            .unwrap();
        assert_eq!(h.dp.failover_list(&WEB).unwrap(), vec![list[1], list[2]]);
        h.signals();
        let next = h.backend_addr(list[2]);
        let refusing = h.backend_addr(list[1]);
        let resent = syn
            .clone()
            .with_dst(next)
            .with_ip_id(0)
            .with_tcp_options(&[1; 20]);
        check_signalled(
            &mut h,
            Case {
                name: "second refusal after the list shrank goes to the last eligible backend"
                    .into(),
                input: refusal(refusing).build(),
                verdict: Verdict::Pass,
                output: Some(resent.build()),
                counters: vec![(Counter::ForwardResteered, 1)],
            },
            &[sig(SignalKind::ConnectRefused, svc_id, list[1])],
        );
        assert_eq!(h.entry(&flow).unwrap().backend_id, list[2]);
    });
}

/// `desired` with web's session affinity (Kubernetes `sessionAffinity: ClientIP`) set to
/// `timeout`.
fn with_affinity(states: [BackendState; 3], timeout: Option<Duration>) -> Vec<DesiredService> {
    let mut services = desired(states);
    services[0].session_affinity = timeout;
    services
}

/// A new connection from `port` of the fixtures' client to web, expected at `to`: its
/// verdict, rewritten packet and exact counters (`affinity`: the affinity counter it
/// moves, if any).
fn new_web_connection(
    h: &mut Harness,
    name: &str,
    port: u16,
    to: (Ipv4Addr, u16),
    affinity: Option<Counter>,
) {
    let syn = PacketSpec::tcp(client(port), (VIP, 80), SYN);
    let mut counters = vec![(Counter::ForwardNew, 1), (Counter::EventTracked, 1)];
    counters.extend(affinity.map(|c| (c, 1)));
    check(
        h,
        Case {
            name: format!("{name} (client port {port})"),
            input: syn.build(),
            verdict: Verdict::Pass,
            output: Some(syn.clone().with_dst(to).build()),
            counters,
        },
    );
}

/// The backend id web's affinity entry for the fixtures' client names, if any.
fn remembered(h: &Harness) -> Option<u32> {
    let svc = h.programmer.service_id(&WEB).unwrap();
    h.dp.affinity_entries()
        .unwrap()
        .into_iter()
        .find(|(k, _)| k.service_id == svc && k.client == AddrBe::v4(CLIENT.octets()))
        .map(|(_, v)| v.backend_id)
}

/// Session affinity: with it, new connections of one client address go to one backend
/// whatever their source ports (which the hash would spread); the entry follows the
/// client to another backend when its backend is drained, ejected or removed, and sticks
/// there; once the client was silent for the timeout, it is balanced afresh. Without it
/// (before, and after it is switched off), the same ports spread.
fn run_session_affinity(hook: Hook) {
    let mut h = Harness::new(hook);
    let svc_id = h.programmer.service_id(&WEB).unwrap();
    let active = [BackendState::Active; 3];
    let first_pick = |h: &Harness, port: u16| {
        let flow = flow_of(&PacketSpec::tcp(client(port), (VIP, 80), SYN));
        let (addr, port, id) = h.predicted_backend(&WEB, &flow);
        ((addr, port), id)
    };

    // Without affinity: each port lands where the hash puts it, on every backend.
    let mut spread = BTreeMap::new();
    for port in 21000..21030 {
        let (to, id) = first_pick(&h, port);
        new_web_connection(&mut h, "no affinity: hashed", port, to, None);
        *spread.entry(id).or_insert(0) += 1;
    }
    assert_eq!(spread.len(), 3, "{hook:?}: 30 ports spread: {spread:?}");
    assert_eq!(remembered(&h), None);

    // With affinity: the first connection is balanced and remembered, the next ones
    // follow it, also from ports the hash would send elsewhere.
    h.programmer
        .apply(
            &mut h.dp,
            &with_affinity(active, Some(Duration::from_secs(3600))),
        )
        .unwrap();
    assert_eq!(h.dp.affinity_timeout(svc_id).unwrap(), 3600);
    assert_ne!(
        h.dp.service(&WEB).unwrap().flags & lb_common::maps::SERVICE_AFFINITY,
        0
    );
    let (to, first) = first_pick(&h, 22000);
    new_web_connection(
        &mut h,
        "affinity: first connection balanced",
        22000,
        to,
        Some(Counter::EventAffinityMiss),
    );
    assert_eq!(remembered(&h), Some(first));
    let mut elsewhere = 0;
    for port in 22001..22031 {
        elsewhere += usize::from(first_pick(&h, port).1 != first);
        new_web_connection(
            &mut h,
            "affinity: same backend",
            port,
            to,
            Some(Counter::EventAffinityHit),
        );
    }
    assert!(
        elsewhere >= 10,
        "{hook:?}: only {elsewhere} ports hash elsewhere"
    );

    // Its backend drained: the next connection is balanced among the others and sticks.
    let mut states = active;
    let first_index = h.backend_addr(first).0.octets()[2] as usize - 1;
    states[first_index] = BackendState::Draining;
    h.programmer
        .apply(
            &mut h.dp,
            &with_affinity(states, Some(Duration::from_secs(3600))),
        )
        .unwrap();
    let (to, second) = first_pick(&h, 23000);
    assert_ne!(second, first);
    new_web_connection(
        &mut h,
        "affinity: backend draining, balanced again",
        23000,
        to,
        Some(Counter::EventAffinityMiss),
    );
    assert_eq!(remembered(&h), Some(second));
    for port in 23001..23011 {
        new_web_connection(
            &mut h,
            "affinity: sticks to the new backend",
            port,
            to,
            Some(Counter::EventAffinityHit),
        );
    }

    // That one ejected (the first one back): moves again, and sticks.
    let mut states = active;
    states[h.backend_addr(second).0.octets()[2] as usize - 1] = BackendState::Ejected;
    h.programmer
        .apply(
            &mut h.dp,
            &with_affinity(states, Some(Duration::from_secs(3600))),
        )
        .unwrap();
    let (to, third) = first_pick(&h, 24000);
    assert_ne!(third, second);
    new_web_connection(
        &mut h,
        "affinity: backend ejected, balanced again",
        24000,
        to,
        Some(Counter::EventAffinityMiss),
    );
    for port in 24001..24011 {
        new_web_connection(
            &mut h,
            "affinity: sticks after the ejection",
            port,
            to,
            Some(Counter::EventAffinityHit),
        );
    }

    // That one removed from the service (its id cleared): moves again.
    let mut services = with_affinity(active, Some(Duration::from_secs(3600)));
    let gone = h.backend_addr(third).0;
    services[0].backends.retain(|b| b.addr != gone);
    h.programmer.apply(&mut h.dp, &services).unwrap();
    let (to, fourth) = first_pick(&h, 25000);
    assert_ne!(fourth, third);
    new_web_connection(
        &mut h,
        "affinity: backend removed, balanced again",
        25000,
        to,
        Some(Counter::EventAffinityMiss),
    );
    assert_eq!(remembered(&h), Some(fourth));
    new_web_connection(
        &mut h,
        "affinity: sticks after the removal",
        25001,
        to,
        Some(Counter::EventAffinityHit),
    );

    // A timeout of 1 s: within it the client keeps its backend; after 1 s of silence the
    // entry no longer stands and a port the hash sends elsewhere goes elsewhere.
    h.programmer
        .apply(
            &mut h.dp,
            &with_affinity(active, Some(Duration::from_secs(1))),
        )
        .unwrap();
    assert_eq!(h.dp.affinity_timeout(svc_id).unwrap(), 1);
    let kept = h.backend_addr(fourth);
    new_web_connection(
        &mut h,
        "affinity 1 s: within the timeout",
        26000,
        kept,
        Some(Counter::EventAffinityHit),
    );
    std::thread::sleep(Duration::from_millis(1200));
    let port = (26001..27000)
        .find(|&p| first_pick(&h, p).1 != fourth)
        .unwrap();
    let (to, fifth) = first_pick(&h, port);
    new_web_connection(
        &mut h,
        "affinity 1 s: after the timeout, balanced afresh",
        port,
        to,
        Some(Counter::EventAffinityMiss),
    );
    assert_eq!(remembered(&h), Some(fifth));

    // Switched off: the flag and the timeout are cleared, ports spread again.
    h.programmer.apply(&mut h.dp, &desired(active)).unwrap();
    assert_eq!(h.dp.affinity_timeout(svc_id).unwrap(), 0);
    assert_eq!(
        h.dp.service(&WEB).unwrap().flags & lb_common::maps::SERVICE_AFFINITY,
        0
    );
    let mut spread = BTreeMap::new();
    for port in 27000..27030 {
        let (to, id) = first_pick(&h, port);
        new_web_connection(&mut h, "affinity off: hashed again", port, to, None);
        *spread.entry(id).or_insert(0) += 1;
    }
    assert_eq!(spread.len(), 3, "{hook:?}: 30 ports spread: {spread:?}");
}

#[test]
fn session_affinity_keeps_a_client_on_its_backend_xdp() {
    if !require_root() {
        return;
    }
    // XDP forwards rewritten packets by the routes of the namespace it runs in.
    routed_netns("dpax").run(|| {
        run_session_affinity(Hook::Xdp);
    });
}

#[test]
fn session_affinity_keeps_a_client_on_its_backend_tc() {
    if !require_root() {
        return;
    }
    let ns = routed_netns("dpa");
    ns.run(|| run_session_affinity(Hook::TcIngress));
}

/// A pin directory on the BPF filesystem, removed (every pin) when dropped.
struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = lb::dataplane::pin::cleanup(&self.0);
    }
}

/// An agent restart keeps session affinity: the next agent adopts the affinity map and the
/// timeouts with the other id maps, and a client keeps its backend.
#[test]
fn session_affinity_is_adopted_across_a_restart() {
    if !require_root() {
        return;
    }
    // XDP forwards rewritten packets by the routes of the namespace it runs in.
    routed_netns("dpar").run(|| {
        let dir =
            PinDir(std::path::PathBuf::from("/sys/fs/bpf").join(lb_tests::unique_name("lbaff")));
        let options = DataplaneOptions {
            max_connections: 1024,
            ..Default::default()
        };
        let services = with_affinity([BackendState::Active; 3], Some(Duration::from_secs(3600)));
        let start = |adopt: bool| {
            let mut dp = Dataplane::load_pinned(&options, Some(&dir.0)).unwrap();
            let mut programmer = if adopt {
                Programmer::adopt(&mut dp).unwrap().0
            } else {
                Programmer::default()
            };
            programmer.apply(&mut dp, &services).unwrap();
            let signals = dp.take_signals().unwrap();
            Harness {
                dp,
                programmer,
                hook: Hook::Xdp,
                signals,
            }
        };
        let kept = {
            let mut h = start(false);
            let flow = flow_of(&PacketSpec::tcp(client(28000), (VIP, 80), SYN));
            let (addr, port, id) = h.predicted_backend(&WEB, &flow);
            new_web_connection(
                &mut h,
                "before the restart: balanced",
                28000,
                (addr, port),
                Some(Counter::EventAffinityMiss),
            );
            id
        };
        let mut h = start(true);
        for name in [
            lb_common::maps::AFFINITY,
            lb_common::maps::AFFINITY_TIMEOUTS,
        ] {
            assert!(h.dp.adopted().contains(&name), "{name} adopted");
        }
        let svc_id = h.programmer.service_id(&WEB).unwrap();
        assert_eq!(h.dp.affinity_timeout(svc_id).unwrap(), 3600);
        assert_eq!(remembered(&h), Some(kept));
        // A port the hash sends elsewhere.
        let port = (28001..29000)
            .find(|&p| {
                let flow = flow_of(&PacketSpec::tcp(client(p), (VIP, 80), SYN));
                h.predicted_backend(&WEB, &flow).2 != kept
            })
            .unwrap();
        let to = h.backend_addr(kept);
        new_web_connection(
            &mut h,
            "after the restart: the client's backend",
            port,
            to,
            Some(Counter::EventAffinityHit),
        );
    });
}

/// With the next-hop cache on, a destination's route is looked up once and reused (counted
/// `event_nexthop_cached`) until the routing generation moves on: a changed neighbour is
/// used from the next packet after `routing_changed`, which the agent calls at every change
/// the kernel announces. With the cache off, every packet is looked up.
fn run_nexthop_cache(hook: Hook, ns: &lb_tests::Netns) {
    let mut h = Harness::new(hook);
    h.dp.set_nexthop_cache(true).unwrap();
    let syn = PacketSpec::tcp(client(48000), (VIP, 80), SYN);
    let (addr, port, _) = h.predicted_backend(&WEB, &flow_of(&syn));
    let ack = PacketSpec::tcp(client(48000), (VIP, 80), ACK);
    let cached = |h: &Harness| h.counters()["event_nexthop_cached"];
    let send = |h: &mut Harness, p: &PacketSpec| {
        let before = cached(h);
        let (verdict, out) = h.run(&p.build());
        assert_eq!(verdict, Verdict::Redirect, "{hook:?}");
        (out, cached(h) - before)
    };
    let expected = |p: &PacketSpec, mac: [u8; 6]| {
        packets::routed(
            &p.clone().with_dst((addr, port)).build(),
            Some((mac, ROUTE_MAC)),
        )
    };
    assert_eq!(
        send(&mut h, &syn),
        (expected(&syn, backend_mac(addr)), 0),
        "{hook:?}: first packet looked up"
    );
    assert_eq!(
        send(&mut h, &ack),
        (expected(&ack, backend_mac(addr)), 1),
        "{hook:?}: then cached"
    );

    // The backend's neighbour entry changes (a new MAC address).
    let new_mac = [0x02, 0, 0, 0x0c, 0, 1];
    ns.ip(&[
        "neigh",
        "replace",
        &addr.to_string(),
        "lladdr",
        "02:00:00:0c:00:01",
        "dev",
        "lbr0",
        "nud",
        "permanent",
    ])
    .unwrap();
    // Until the change is announced, the cached next hop stands.
    assert_eq!(
        send(&mut h, &ack).1,
        1,
        "{hook:?}: cached until the generation moves"
    );
    h.dp.routing_changed().unwrap();
    assert_eq!(
        send(&mut h, &ack),
        (expected(&ack, new_mac), 0),
        "{hook:?}: looked up again"
    );
    assert_eq!(
        send(&mut h, &ack),
        (expected(&ack, new_mac), 1),
        "{hook:?}: cached again"
    );

    h.dp.set_nexthop_cache(false).unwrap();
    assert_eq!(
        send(&mut h, &ack),
        (expected(&ack, new_mac), 0),
        "{hook:?}: cache off"
    );
}

#[test]
fn the_nexthop_cache_serves_until_routing_changes() {
    if !require_root() {
        return;
    }
    for hook in [Hook::Xdp, Hook::TcIngress] {
        let ns = routed_netns("dpnh");
        ns.run(|| run_nexthop_cache(hook, &ns));
    }
}
