//! Packet-path fuzzing: random and mutated packets through `BPF_PROG_TEST_RUN` of the XDP
//! and the TC ingress program, on maps programmed with the fixtures' services.
//!
//! The packets are mutations of valid traffic (SYN, ACK, data, FIN, RST to the VIP; replies
//! and refusals from backends; UDP; ICMP errors quoting tracked flows; ARP, IPv6, unrelated
//! traffic) — truncated, with IPv4 options, fragmented, with a bad IHL or length, bits
//! flipped — and plain random bytes. The generator is a seeded xorshift: a run is
//! reproducible (`LB_FUZZ_SEED`, `LB_FUZZ_PACKETS` = packets per hook).
//!
//! For every packet: the program returns PASS or DROP (TC: or REDIRECT), and any change
//! to the packet is one lb makes — the destination of a packet to a service's VIP and port
//! rewritten to one of its backends, the source of a backend's packet rewritten to the
//! VIP, an ICMP error's addresses translated between VIP and backends, or a refusal turned
//! into the client's SYN to a backend — with checksums still valid when they were. For
//! every batch: the verdict counters went up by exactly the batch's size (one per packet),
//! `drop_*` by the packets dropped, `pass_*` by at most the packets passed unchanged. At the
//! end: every connection-table entry has its partner, and the service, selection and
//! backend maps are what the control plane wrote.
//!
//! `cargo test --release -p lb-tests --test fuzz_packets -- --nocapture` prints the totals.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::Instant,
};

use lb::dataplane::{
    sync::{DesiredService, Programmer},
    Dataplane, DataplaneOptions, Frontend, Protocol,
};
use lb_common::{
    family, flow_hash, AddrBe, BackendState, ConnDirection, ConnState, Counter, FlowKey,
};
use lb_tests::{
    fixture_services::{desired, routed_netns, API, BACKENDS, DNS, EMPTY, OTHER_VIP, VIP, WEB},
    packets::{
        arp_frame, checksums_valid, icmp_error, linux_syn_options, PacketSpec, ACK, CWR, ECE, FIN,
        ICMP, PSH, RST, SYN, TCP, UDP,
    },
    require_root,
    test_run::{self, Hook, Verdict},
};

const CLIENTS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 200, 0, 2),
    Ipv4Addr::new(10, 200, 0, 3),
    Ipv4Addr::new(192, 168, 7, 9),
];
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 200, 9, 1);
/// Client ports the generator uses: few enough that flows recur (replies, closes, reuse).
const CLIENT_PORTS: u16 = 2048;
const DEFAULT_PACKETS_PER_HOOK: u64 = 1_000_000;
const DEFAULT_SEED: u64 = 0x1b_f0_22_5e_ed;
const BATCH: u64 = 1000;

/// xorshift64*: small, deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // splitmix64 of the seed, so nearby seeds give unrelated streams (never 0).
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// `lo..hi` (hi exclusive).
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below((hi - lo) as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            let v = v.trim();
            match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            }
            .unwrap_or_else(|e| panic!("{name}={v}: {e}"))
        })
        .unwrap_or(default)
}

/// The services, as in the fixtures: `web` (3 backends), `dns` (UDP), `empty` (no
/// backend, another VIP), `api` (HTTP).
/// What the control plane wrote: compared before and after the traffic.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    services: Vec<String>,
    tables: Vec<Vec<u32>>,
    failover: Vec<Vec<u32>>,
    backends: Vec<String>,
}

fn snapshot(dp: &Dataplane) -> Snapshot {
    let frontends = [WEB, DNS, EMPTY, API];
    let ids: BTreeSet<u32> = frontends
        .iter()
        .flat_map(|f| dp.failover_list(f).unwrap())
        .chain(1..16)
        .collect();
    Snapshot {
        services: frontends
            .iter()
            .map(|f| format!("{:?}", dp.service(f).unwrap()))
            .collect(),
        tables: frontends
            .iter()
            .map(|f| dp.selection_table(f).unwrap())
            .collect(),
        failover: frontends
            .iter()
            .map(|f| dp.failover_list(f).unwrap())
            .collect(),
        backends: ids
            .iter()
            .map(|&id| format!("{id}: {:?}", dp.backend(id).unwrap()))
            .collect(),
    }
}

struct Fuzzer {
    dp: Dataplane,
    hook: Hook,
    rng: Rng,
    /// Selection table of each TCP/UDP frontend with backends, and the backends by id.
    tables: BTreeMap<Frontend, Vec<u32>>,
    backend_by_id: BTreeMap<u32, (Ipv4Addr, u16)>,
}

impl Fuzzer {
    fn run(&mut self, input: &[u8]) -> anyhow::Result<(Verdict, Vec<u8>)> {
        test_run::run(&mut self.dp, self.hook, input)
    }

    fn client(&mut self) -> (Ipv4Addr, u16) {
        let addr = self.rng.pick(&CLIENTS);
        (addr, 20000 + self.rng.below(CLIENT_PORTS as u64) as u16)
    }

    /// The backend the data plane picks first for `client` → `frontend`.
    fn predicted(&self, frontend: &Frontend, client: (Ipv4Addr, u16)) -> (Ipv4Addr, u16) {
        let table = &self.tables[frontend];
        let key = FlowKey {
            src: AddrBe::v4(client.0.octets()),
            dst: AddrBe::v4(frontend.vip.octets()),
            src_port_be: client.1.to_be(),
            dst_port_be: frontend.port.to_be(),
            proto: frontend.protocol.number(),
            family: family::V4,
            _pad: [0; 2],
        };
        self.backend_by_id[&table[(flow_hash(&key) % table.len() as u32) as usize]]
    }

    /// A backend of `frontend`: mostly the one its flow from `client` went to.
    fn backend_for(&mut self, frontend: &Frontend, client: (Ipv4Addr, u16)) -> (Ipv4Addr, u16) {
        let port = match *frontend {
            f if f == DNS => 5353,
            f if f == API => 8000,
            _ => 8080,
        };
        if self.rng.chance(70) {
            self.predicted(frontend, client)
        } else if self.rng.chance(80) {
            (self.rng.pick(&BACKENDS), port)
        } else {
            (self.rng.pick(&BACKENDS), self.rng.next() as u16)
        }
    }

    fn tcp_flags(&mut self) -> u8 {
        match self.rng.below(10) {
            0..=2 => SYN,
            3 => ACK,
            4 => ACK | PSH,
            5 => FIN | ACK,
            6 => RST,
            7 => RST | ACK,
            8 => SYN | ECE | CWR,
            _ => self.rng.next() as u8,
        }
    }

    /// A client's TCP segment to a VIP.
    fn client_tcp(&mut self) -> PacketSpec {
        let to = match self.rng.below(10) {
            0..=5 => (VIP, 80),
            6 | 7 => (VIP, 8000),
            8 => (OTHER_VIP, 80),
            _ => (VIP, self.rng.next() as u16),
        };
        let client = self.client();
        let flags = self.tcp_flags();
        let mut p = PacketSpec::tcp(client, to, flags);
        if flags & SYN != 0 && self.rng.chance(50) {
            p = p
                .with_ack(0)
                .with_tcp_options(&linux_syn_options(1460, self.rng.next() as u32, 7));
        }
        if flags & SYN == 0 && self.rng.chance(50) {
            let len = self.rng.range(1, 200);
            p = p.with_payload(&self.rng.bytes(len));
        }
        if self.rng.chance(10) {
            p = p.with_seq(self.rng.next() as u32);
        }
        p
    }

    /// A backend's TCP segment to a client: handshake, data, HTTP responses, refusals.
    fn backend_tcp(&mut self) -> PacketSpec {
        let frontend = if self.rng.chance(75) { WEB } else { API };
        let client = self.client();
        let from = self.backend_for(&frontend, client);
        let (flags, payload): (u8, &[u8]) = match self.rng.below(10) {
            0 | 1 => (SYN | ACK, b""),
            2 => (ACK, b""),
            3 => (ACK | PSH, b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
            4 => (ACK | PSH, b"HTTP/1.1 503 Service Unavailable\r\n\r\n"),
            5 => (ACK | PSH, b"HTTP/1.0 5"),
            6 => (FIN | ACK, b""),
            7 => (RST, b""),
            8 => (RST | ACK, b""),
            _ => (self.rng.next() as u8, b"HTTP/1.1 xyz"),
        };
        let mut p = PacketSpec::tcp(from, client, flags).with_payload(payload);
        if flags & RST != 0 && self.rng.chance(70) {
            // Acknowledges the client's ISN (1000): a refusal of lb's SYN.
            p = p.with_ack(1001);
        }
        p
    }

    fn udp(&mut self) -> PacketSpec {
        let client = self.client();
        let len = self.rng.range(0, 64);
        let payload = self.rng.bytes(len);
        let mut p = if self.rng.chance(60) {
            let to = if self.rng.chance(85) {
                (VIP, 53)
            } else {
                (self.rng.pick(&[VIP, OTHER_VIP]), self.rng.next() as u16)
            };
            PacketSpec::udp(client, to, &payload)
        } else {
            let from = self.backend_for(&DNS, client);
            PacketSpec::udp(from, client, &payload)
        };
        p.udp_no_checksum = self.rng.chance(10);
        p
    }

    /// ICMP errors quoting tracked (and untracked) flows, and other ICMP.
    fn icmp(&mut self) -> Vec<u8> {
        let client = self.client();
        let (kind, code) = match self.rng.below(6) {
            0..=2 => (3, self.rng.pick(&[0, 1, 2, 3, 4, 9, 10, 13])),
            3 => (11, 0),
            4 => (3, self.rng.below(16) as u8),
            _ => (self.rng.next() as u8, self.rng.next() as u8),
        };
        let mtu = self.rng.pick(&[0, 576, 1400, 1500]);
        let (src, dst, quoted) = if self.rng.chance(60) {
            // From the backend side, about client → backend.
            let frontend = self.rng.pick(&[WEB, WEB, API, DNS]);
            let backend = self.backend_for(&frontend, client);
            let quoted = if frontend == DNS {
                PacketSpec::udp(client, backend, b"query")
            } else {
                PacketSpec::tcp(client, backend, self.rng.pick(&[SYN, ACK, ACK | PSH]))
            };
            let src = if self.rng.chance(70) {
                backend.0
            } else {
                ROUTER
            };
            (src, client.0, quoted)
        } else {
            // Towards the VIP, about a reply VIP → client.
            let frontend = self.rng.pick(&[WEB, API, DNS, EMPTY]);
            let from = (frontend.vip, frontend.port);
            let quoted = if frontend == DNS {
                PacketSpec::udp(from, client, b"answer")
            } else {
                PacketSpec::tcp(from, client, SYN | ACK)
            };
            let src = if self.rng.chance(70) {
                client.0
            } else {
                ROUTER
            };
            (src, frontend.vip, quoted)
        };
        let full = quoted.build().len() - 14;
        let quote_len = match self.rng.below(4) {
            0 => 28.min(full),
            1 => full,
            2 => self.rng.range(0, full + 1),
            _ => 40.min(full),
        };
        icmp_error(src, dst, kind, code, mtu, &quoted, quote_len)
    }

    fn other(&mut self) -> Vec<u8> {
        match self.rng.below(5) {
            0 => arp_frame(),
            1 => {
                // IPv6 (not parsed: passed).
                let mut f = PacketSpec::tcp(self.client(), (VIP, 80), SYN).build();
                f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
                f[14] = 0x60;
                f
            }
            2 => {
                // Unrelated TCP or UDP.
                let a = (
                    Ipv4Addr::from(self.rng.next() as u32),
                    self.rng.next() as u16,
                );
                let b = (
                    Ipv4Addr::from(self.rng.next() as u32),
                    self.rng.next() as u16,
                );
                if self.rng.chance(50) {
                    PacketSpec::tcp(a, b, self.rng.next() as u8).build()
                } else {
                    PacketSpec::udp(a, b, b"x").build()
                }
            }
            3 => {
                // ICMP echo to a VIP.
                let mut p = PacketSpec::tcp(self.client(), (VIP, 0), 0).with_payload(b"ping");
                p.proto = ICMP;
                p.build()
            }
            _ => {
                // Another protocol (GRE) to the VIP.
                let mut p = PacketSpec::tcp(self.client(), (VIP, 0), 0);
                p.proto = 47;
                p.raw_l4 = Some(self.rng.bytes(24));
                p.build()
            }
        }
    }

    fn random_frame(&mut self) -> Vec<u8> {
        let len = self.rng.range(14, 300);
        let mut f = self.rng.bytes(len);
        if self.rng.chance(70) {
            f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            if f.len() >= 34 {
                if self.rng.chance(50) {
                    f[14] = 0x45;
                }
                if self.rng.chance(40) {
                    f[30..34].copy_from_slice(&VIP.octets());
                }
                if self.rng.chance(50) {
                    f[23] = self.rng.pick(&[TCP, UDP, ICMP]);
                }
            }
        }
        f
    }

    fn mutate(&mut self, f: &mut Vec<u8>) {
        let ihl_at = |f: &Vec<u8>| 14 + ((f.get(14).copied().unwrap_or(0x45) & 0x0f) as usize) * 4;
        match self.rng.below(12) {
            0 => {
                let len = self.rng.range(14, f.len().max(15));
                f.truncate(len);
            }
            1 if f.len() >= 34 => {
                // IPv4 options (a multiple of 4 bytes), lengths and checksum made right.
                let n = 4 * self.rng.range(1, 11);
                let opts = if self.rng.chance(50) {
                    vec![1; n] // NOPs
                } else {
                    self.rng.bytes(n)
                };
                f.splice(34..34, opts);
                f[14] = 0x40 | (5 + n / 4) as u8;
                let total = u16::from_be_bytes([f[16], f[17]]).wrapping_add(n as u16);
                f[16..18].copy_from_slice(&total.to_be_bytes());
                fix_ip_checksum(f);
            }
            2 if f.len() >= 34 => {
                let field = match self.rng.below(3) {
                    0 => 0x2000,                                    // MF
                    1 => self.rng.range(1, 0x2000) as u16,          // offset
                    _ => 0x2000 | self.rng.range(0, 0x2000) as u16, // both
                };
                f[20..22].copy_from_slice(&field.to_be_bytes());
                if self.rng.chance(50) {
                    fix_ip_checksum(f);
                }
            }
            3 if f.len() >= 15 => f[14] = 0x40 | self.rng.below(16) as u8,
            4 if f.len() >= 18 => {
                let total = match self.rng.below(3) {
                    0 => self.rng.next() as u16,
                    1 => (f.len() - 14 + self.rng.range(1, 40)) as u16,
                    _ => self.rng.range(0, 28) as u16,
                };
                f[16..18].copy_from_slice(&total.to_be_bytes());
            }
            5 if f.len() >= 15 => f[14] = (self.rng.below(16) as u8) << 4 | (f[14] & 0x0f),
            6 => {
                for _ in 0..self.rng.range(1, 9) {
                    let at = self.rng.range(0, f.len().min(80));
                    f[at] ^= 1 << self.rng.below(8);
                }
            }
            7 => {
                let at = self.rng.range(0, f.len());
                let n = self.rng.range(1, 9).min(f.len() - at);
                let b = self.rng.bytes(n);
                f[at..at + n].copy_from_slice(&b);
            }
            8 => {
                let n = self.rng.range(1, 100);
                let b = self.rng.bytes(n);
                f.extend_from_slice(&b);
            }
            9 => {
                let at = ihl_at(f) + 12;
                if at < f.len() {
                    f[at] = (self.rng.below(16) as u8) << 4;
                }
            }
            10 if f.len() >= 24 => f[23] = self.rng.pick(&[TCP, UDP, ICMP, 0, 255]),
            _ => {
                if f.len() >= 34 {
                    fix_ip_checksum(f);
                }
            }
        }
    }

    fn generate(&mut self) -> Vec<u8> {
        let mut f = match self.rng.below(100) {
            0..=29 => self.client_tcp().build(),
            30..=49 => self.backend_tcp().build(),
            50..=59 => self.udp().build(),
            60..=71 => self.icmp(),
            72..=79 => self.other(),
            _ => self.random_frame(),
        };
        if self.rng.chance(45) {
            for _ in 0..self.rng.range(1, 4) {
                self.mutate(&mut f);
            }
        }
        // What BPF_PROG_TEST_RUN refuses before the program runs (EINVAL): shorter than
        // an Ethernet header, and for TC an IPv4 frame shorter than an IPv4 header.
        // (And for IPv6, shorter than an IPv6 header.)
        let ethertype = f.get(12..14).map(|t| u16::from_be_bytes([t[0], t[1]]));
        let min = match (self.hook, ethertype) {
            (Hook::TcIngress, Some(0x0800)) => 34,
            (Hook::TcIngress, Some(0x86dd)) => 54,
            _ => 14,
        };
        if f.len() < min {
            let pad = self.rng.bytes(min - f.len());
            f.extend_from_slice(&pad);
        }
        f.truncate(1514);
        f
    }
}

fn fix_ip_checksum(f: &mut [u8]) {
    let ihl = ((f[14] & 0x0f) as usize) * 4;
    if ihl < 20 || 14 + ihl > f.len() {
        return;
    }
    f[24] = 0;
    f[25] = 0;
    let mut s: u32 = f[14..14 + ihl]
        .chunks(2)
        .map(|w| u16::from_be_bytes([w[0], w[1]]) as u32)
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    f[24..26].copy_from_slice(&(!(s as u16)).to_be_bytes());
}

/// Whether `checksums_valid` can judge `f`: Ethernet + IPv4 whose header and L4 header
/// the frame holds whole.
fn well_formed(f: &[u8]) -> bool {
    if f.len() < 34 || f[12..14] != [0x08, 0x00] || f[14] >> 4 != 4 {
        return false;
    }
    let ihl = ((f[14] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([f[16], f[17]]) as usize;
    let min_l4 = match f[23] {
        TCP => 20,
        UDP | ICMP => 8,
        _ => 0,
    };
    ihl >= 20 && total >= ihl + min_l4 && 14 + total <= f.len()
}

fn addr(f: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(f[at], f[at + 1], f[at + 2], f[at + 3])
}

fn port(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

/// What a change to a packet may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Change {
    Dnat,
    Snat,
    Icmp,
    ResentSyn,
}

/// Says which of lb's rewrites turned `input` into `output`, or why none explains it.
fn explain(services: &[DesiredService], input: &[u8], output: &[u8]) -> Result<Change, String> {
    let is_backend = |a: Ipv4Addr| BACKENDS.contains(&a);
    let is_vip = |a: Ipv4Addr| a == VIP || a == OTHER_VIP;
    // A refusal turned into the client's SYN: a fresh packet, built whole.
    if output.len() >= 54
        && output[12..14] == [0x08, 0x00]
        && output[14] == 0x45
        && output[23] == TCP
        && output[47] & (SYN | ACK | RST | FIN) == SYN
    {
        let (dst, dport) = (addr(output, 30), port(output, 36));
        let to_backend = services.iter().any(|s| {
            s.frontend.protocol == Protocol::Tcp
                && s.backends.iter().any(|b| (b.addr, b.port) == (dst, dport))
        });
        // A backend's RST (whatever other flags it has: RST is handled first, as the
        // client's stack would), its bare ACK not acknowledging the SYN (an older
        // connection on the same ports), or an ICMP error about the SYN.
        let backend_answer = |flags: u8| flags & RST != 0 || flags & (SYN | RST | ACK) == ACK;
        let from_backend_side = input.len() >= 48
            && ((input[23] == TCP && is_backend(addr(input, 26)) && backend_answer(input[47]))
                || input[23] == ICMP);
        if to_backend && from_backend_side {
            if !checksums_valid(output) {
                return Err("re-sent SYN with invalid checksums".into());
            }
            if is_vip(addr(output, 26)) {
                return Err("re-sent SYN from the VIP".into());
            }
            return Ok(Change::ResentSyn);
        }
    }
    if input.len() != output.len() {
        return Err(format!(
            "length changed from {} to {}",
            input.len(),
            output.len()
        ));
    }
    if !(input.len() >= 34 && input[12..14] == [0x08, 0x00] && input[14] == 0x45) {
        return Err("a packet lb cannot rewrite (not IPv4 without options) changed".into());
    }
    let diff: Vec<usize> = (0..input.len())
        .filter(|&i| input[i] != output[i])
        .collect();
    let l4 = 34;
    let proto = input[23];
    let allowed = |i: usize, set: &[std::ops::Range<usize>]| set.iter().any(|r| r.contains(&i));
    match proto {
        TCP | UDP => {
            let csum = if proto == TCP { l4 + 16 } else { l4 + 6 };
            let set = [24..34, l4..l4 + 4, csum..csum + 2];
            if let Some(&i) = diff.iter().find(|&&i| !allowed(i, &set)) {
                return Err(format!("byte {i} changed"));
            }
            let (src, dst) = (addr(input, 26), addr(input, 30));
            let (sport, dport) = (port(input, l4), port(input, l4 + 2));
            let (osrc, odst) = (addr(output, 26), addr(output, 30));
            let (osport, odport) = (port(output, l4), port(output, l4 + 2));
            let dst_changed = (dst, dport) != (odst, odport);
            let src_changed = (src, sport) != (osrc, osport);
            let proto_ok = |s: &DesiredService| s.frontend.protocol.number() == proto;
            if dst_changed && !src_changed {
                let svc = services
                    .iter()
                    .find(|s| proto_ok(s) && (s.frontend.vip, s.frontend.port) == (dst, dport))
                    .ok_or("destination rewritten of a packet not to a service's VIP:port")?;
                if !svc
                    .backends
                    .iter()
                    .any(|b| (b.addr, b.port) == (odst, odport))
                {
                    return Err(format!(
                        "destination rewritten to {odst}:{odport}, not a backend of {}",
                        svc.name
                    ));
                }
                Ok(Change::Dnat)
            } else if src_changed && !dst_changed {
                let svc = services
                    .iter()
                    .find(|s| {
                        proto_ok(s) && s.backends.iter().any(|b| (b.addr, b.port) == (src, sport))
                    })
                    .ok_or("source rewritten of a packet not from a backend")?;
                if (osrc, osport) != (svc.frontend.vip, svc.frontend.port) {
                    return Err(format!(
                        "source rewritten to {osrc}:{osport}, not the VIP of {}",
                        svc.name
                    ));
                }
                Ok(Change::Snat)
            } else {
                Err("both or neither of source and destination changed".into())
            }
        }
        ICMP => {
            let kind = input[l4];
            if kind != 3 && kind != 11 {
                return Err(format!("ICMP type {kind} (not an error) changed"));
            }
            let q = l4 + 8;
            if input.len() < q + 20 {
                return Err("ICMP error without a whole quoted header changed".into());
            }
            let qi = q + ((input[q] & 0x0f) as usize) * 4;
            let qcsum = match input[q + 9] {
                TCP => qi + 16,
                _ => qi + 6,
            };
            let set = [
                24..34,
                l4 + 2..l4 + 4,
                q + 10..q + 20,
                qi..qi + 4,
                qcsum..qcsum + 2,
            ];
            if let Some(&i) = diff.iter().find(|&&i| !allowed(i, &set)) {
                return Err(format!("byte {i} of an ICMP error changed"));
            }
            for at in [26, 30, q + 12, q + 16] {
                let (a, b) = (addr(input, at), addr(output, at));
                if a != b && !((is_backend(a) && is_vip(b)) || (is_vip(a) && is_backend(b))) {
                    return Err(format!(
                        "address at {at} translated {a} → {b}, not between VIP and backend"
                    ));
                }
            }
            let ports: BTreeSet<u16> = services
                .iter()
                .flat_map(|s| {
                    std::iter::once(s.frontend.port).chain(s.backends.iter().map(|b| b.port))
                })
                .collect();
            for at in [qi, qi + 2] {
                if at + 2 > input.len() {
                    continue;
                }
                let (a, b) = (port(input, at), port(output, at));
                if a != b && !(ports.contains(&a) && ports.contains(&b)) {
                    return Err(format!("quoted port at {at} translated {a} → {b}"));
                }
            }
            Ok(Change::Icmp)
        }
        _ => Err(format!("protocol {proto} packet changed")),
    }
}

/// `out`, a packet lb redirected, without what routing changed: its MAC addresses and
/// its TTL, which must be one less than `input`'s (a re-sent SYN, built whole, is left as
/// it is).
fn unrouted(input: &[u8], out: &[u8]) -> Result<Vec<u8>, String> {
    if out.len() < 34 || input.len() < 34 {
        return Err("too short to be routed".into());
    }
    let mut unrouted = out.to_vec();
    unrouted[..12].copy_from_slice(&input[..12]);
    let syn = |p: &[u8]| p[23] == TCP && p.len() >= 48 && p[47] & (SYN | ACK | RST) == SYN;
    // A SYN made from a backend's answer (a refusal, an ICMP error), not the client's.
    let resent_syn = syn(out) && !syn(input);
    if input.len() == out.len() && !resent_syn {
        if out[22] != input[22].wrapping_sub(1) || input[22] <= 1 {
            return Err(format!("TTL {} became {}", input[22], out[22]));
        }
        unrouted[22] = input[22];
    }
    Ok(unrouted)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn is_verdict_counter(c: Counter) -> bool {
    let l = c.label();
    ["pass_", "forward_", "reply_", "drop_"]
        .iter()
        .any(|p| l.starts_with(p))
}

/// What one hook's run saw, for the report.
#[derive(Default)]
struct Totals {
    packets: u64,
    verdicts: BTreeMap<Verdict, u64>,
    changes: BTreeMap<Change, u64>,
    counters: BTreeMap<&'static str, u64>,
    signals: u64,
    entries: usize,
    stale_replies: usize,
}

fn fuzz(hook: Hook) -> Totals {
    let packets = env_u64("LB_FUZZ_PACKETS", DEFAULT_PACKETS_PER_HOOK);
    let seed = env_u64("LB_FUZZ_SEED", DEFAULT_SEED) ^ (hook as u64 + 1);
    let options = DataplaneOptions {
        // Room for every flow the generator makes: no eviction, so every entry must
        // have its partner at the end.
        max_connections: 1 << 20,
        ..Default::default()
    };
    let mut dp = Dataplane::load(&options).expect("load the data plane");
    let services = desired([BackendState::Active; 3]);
    let mut programmer = Programmer::default();
    programmer
        .apply(&mut dp, &services)
        .expect("program services");
    let mut signals = dp.take_signals().expect("the signal ring buffer");
    let before_maps = snapshot(&dp);
    let mut tables = BTreeMap::new();
    let mut backend_by_id = BTreeMap::new();
    for s in &services {
        if s.backends.is_empty() {
            continue;
        }
        tables.insert(s.frontend, dp.selection_table(&s.frontend).unwrap());
        for b in &s.backends {
            let id = programmer.backend_id(&s.frontend, b.addr, b.port).unwrap();
            backend_by_id.insert(id, (b.addr, b.port));
        }
    }
    let mut f = Fuzzer {
        dp,
        hook,
        rng: Rng::new(seed),
        tables,
        backend_by_id,
    };
    let read_counters = |dp: &Dataplane| -> Vec<(Counter, u64)> { dp.counters().unwrap() };
    let mut totals = Totals::default();
    let start_counters = read_counters(&f.dp);
    let mut last = start_counters.clone();
    let started = Instant::now();
    let mut done = 0;
    while done < packets {
        let n = BATCH.min(packets - done);
        let (mut dropped, mut passed_unchanged, mut changed) = (0u64, 0u64, 0u64);
        for i in 0..n {
            let input = f.generate();
            let ctx = || {
                format!(
                    "{hook:?} packet {} (LB_FUZZ_SEED={:#x}): {}",
                    done + i,
                    seed ^ (hook as u64 + 1),
                    hex(&input)
                )
            };
            let (verdict, out) = f
                .run(&input)
                .unwrap_or_else(|e| panic!("{}: BPF_PROG_TEST_RUN: {e:#}", ctx()));
            *totals.verdicts.entry(verdict).or_default() += 1;
            match verdict {
                Verdict::Drop => dropped += 1,
                _ if out == input => {
                    assert_ne!(
                        verdict,
                        Verdict::Redirect,
                        "{}: redirected unchanged",
                        ctx()
                    );
                    passed_unchanged += 1;
                }
                _ => {
                    // lb sends a rewritten packet on itself, as a router: new MAC
                    // addresses and TTL - 1 (the IPv4 checksum is checked below); what is
                    // left to explain is lb's rewrite.
                    let rewrite = match verdict {
                        Verdict::Redirect => unrouted(&input, &out)
                            .unwrap_or_else(|why| panic!("{}: redirected: {why}", ctx())),
                        _ => out.clone(),
                    };
                    let change = explain(&services, &input, &rewrite).unwrap_or_else(|why| {
                        panic!(
                            "{}: unexplained change: {why}\n   out: {}",
                            ctx(),
                            hex(&out)
                        )
                    });
                    if change != Change::ResentSyn && well_formed(&input) && checksums_valid(&input)
                    {
                        assert!(
                            checksums_valid(&out),
                            "{}: valid checksums broken by a {change:?}\n   out: {}",
                            ctx(),
                            hex(&out)
                        );
                    }
                    *totals.changes.entry(change).or_default() += 1;
                    changed += 1;
                }
            }
        }
        while let Some(item) = signals.next() {
            let _ = item;
            totals.signals += 1;
        }
        let now = read_counters(&f.dp);
        let delta = |pred: &dyn Fn(&str) -> bool| -> u64 {
            now.iter()
                .zip(&last)
                .filter(|((c, _), _)| is_verdict_counter(*c) && pred(c.label()))
                .map(|((_, v), (_, was))| v - was)
                .sum()
        };
        let at = format!("{hook:?} packets {done}..{}", done + n);
        assert_eq!(
            delta(&|_| true),
            n,
            "{at}: verdict counters must go up by one per packet"
        );
        assert_eq!(delta(&|l| l.starts_with("drop_")), dropped, "{at}: drop_*");
        assert!(
            delta(&|l| l.starts_with("pass_")) <= passed_unchanged,
            "{at}: pass_* counted more packets than passed unchanged"
        );
        assert!(
            delta(&|l| l.starts_with("forward_") || l.starts_with("reply_")) >= changed,
            "{at}: more packets rewritten than forward_*/reply_* counted"
        );
        last = now;
        done += n;
    }
    let elapsed = started.elapsed();
    totals.packets = done;
    for ((c, v), (_, was)) in last.iter().zip(&start_counters) {
        let d = v - was;
        if d > 0 {
            totals.counters.insert(c.label(), d);
        }
    }

    // The control plane's maps are untouched by traffic.
    assert_eq!(
        snapshot(&f.dp),
        before_maps,
        "{hook:?}: maps changed by traffic"
    );
    // Every entry has its partner: an original entry (client → VIP, to backend B) the
    // reply entry (B → client, to the VIP); a reply entry an original entry of its
    // connection, which points back to it, or, for an older connection on the same ports
    // (re-steered away, then the ports reused), is closing.
    let entries: std::collections::HashMap<FlowKey, lb_common::ConnEntry> =
        f.dp.connections().unwrap().into_iter().collect();
    assert!(
        (entries.len() as u32) < options.max_connections,
        "{hook:?}: the table filled up ({} entries): partners may be evicted",
        entries.len()
    );
    for (k, e) in &entries {
        // Original (client → VIP, to B): the reply entry is B → client. Reply (B → client,
        // to the VIP): the original entry is client → VIP.
        let partner = if e.direction == ConnDirection::Original as u8 {
            FlowKey {
                src: e.nat_addr,
                dst: k.src,
                src_port_be: e.nat_port_be,
                dst_port_be: k.src_port_be,
                ..*k
            }
        } else {
            FlowKey {
                src: k.dst,
                dst: e.nat_addr,
                src_port_be: k.dst_port_be,
                dst_port_be: e.nat_port_be,
                ..*k
            }
        };
        let p = entries.get(&partner);
        if e.direction == ConnDirection::Original as u8 {
            let p = p.unwrap_or_else(|| panic!("{hook:?}: {k:?} → {e:?} has no reply entry"));
            assert_eq!(p.direction, ConnDirection::Reply as u8, "{hook:?}: {k:?}");
            assert_eq!(
                (p.nat_addr, p.nat_port_be),
                (k.dst, k.dst_port_be),
                "{hook:?}: reply entry of {k:?} points elsewhere"
            );
            assert_eq!(p.backend_id, e.backend_id, "{hook:?}: {k:?} backend");
            assert_eq!(p.service_id, e.service_id, "{hook:?}: {k:?} service");
        } else {
            assert_eq!(e.direction, ConnDirection::Reply as u8, "{hook:?}: {k:?}");
            let p = p.unwrap_or_else(|| panic!("{hook:?}: {k:?} → {e:?} has no original"));
            assert_eq!(
                p.direction,
                ConnDirection::Original as u8,
                "{hook:?}: {k:?}"
            );
            if (p.nat_addr, p.nat_port_be) != (k.src, k.src_port_be) {
                // An older connection's, whose ports a new connection took (after it was
                // re-steered away from the backend the table gives): closing, and it
                // expires after `tcp_closing`. Open ones were left when such an entry's
                // late packet moved the new connection's entries (fixed; fixture
                // `an_older_connections_late_packet_leaves_the_new_connection_alone`).
                assert_eq!(
                    e.state,
                    ConnState::TcpClosing as u8,
                    "{hook:?}: reply entry {k:?} → {e:?} of an older connection is open \
                     (the original now goes to {p:?})"
                );
                totals.stale_replies += 1;
            }
        }
    }
    totals.entries = entries.len();

    println!(
        "fuzz {hook:?}: {} packets in {:.1} s ({:.1} µs each), seed {seed:#x}",
        totals.packets,
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / totals.packets as f64
    );
    println!("  verdicts: {:?}", totals.verdicts);
    println!("  rewrites: {:?}", totals.changes);
    println!("  counters: {:?}", totals.counters);
    println!(
        "  signals: {}; connection entries at the end: {} (replies of older connections, \
         closing: {})",
        totals.signals, totals.entries, totals.stale_replies
    );
    totals
}

#[test]
fn fuzz_xdp() {
    if !require_root() {
        return;
    }
    // XDP forwards rewritten packets by the routes of the namespace it runs in.
    let ns = routed_netns("fzx");
    let t = ns.run(|| fuzz(Hook::Xdp));
    assert!(
        t.verdicts.contains_key(&Verdict::Redirect),
        "{:?}",
        t.verdicts
    );
    // The generator reaches every kind of rewrite and the malformed-packet paths.
    for c in [Change::Dnat, Change::Snat, Change::Icmp, Change::ResentSyn] {
        assert!(t.changes.contains_key(&c), "no {c:?} in {:?}", t.changes);
    }
    for c in [
        "pass_truncated_ipv4",
        "pass_not_ipv4",
        "drop_ip_options",
        "drop_fragment",
        "drop_truncated_l4",
        "forward_new",
        "reply_tracked",
        "forward_icmp_error",
        "reply_icmp_error",
    ] {
        assert!(
            t.counters.contains_key(c),
            "{c} never counted: {:?}",
            t.counters
        );
    }
}

#[test]
fn fuzz_tc_ingress() {
    if !require_root() {
        return;
    }
    let ns = routed_netns("fzp");
    let t = ns.run(|| fuzz(Hook::TcIngress));
    for c in [Change::Dnat, Change::Snat, Change::Icmp, Change::ResentSyn] {
        assert!(t.changes.contains_key(&c), "no {c:?} in {:?}", t.changes);
    }
}
