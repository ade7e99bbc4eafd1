//! Builds test packets byte by byte, with checksums computed from scratch here, so tests
//! check the data plane's incremental updates against an independent computation.

use std::net::Ipv4Addr;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;
/// ECN-Echo and Congestion Window Reduced: both set in a SYN that asks for ECN.
pub const ECE: u8 = 0x40;
pub const CWR: u8 = 0x80;

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// One's complement sum of `data` as big-endian 16-bit words.
fn sum(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|w| u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

fn finish(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// A TCP, UDP or other IPv4 packet in an Ethernet frame.
#[derive(Clone, Debug)]
pub struct PacketSpec {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    /// IPv4 options (length a multiple of 4).
    pub ip_options: Vec<u8>,
    /// Raw flags+fragment offset field of the IPv4 header.
    pub frag_field: u16,
    /// UDP only: send without a checksum (0).
    pub udp_no_checksum: bool,
    /// Raw L4 bytes to send instead of a generated header (e.g. an ICMP error).
    pub raw_l4: Option<Vec<u8>>,
    /// Identification field of the IPv4 header.
    pub ip_id: u16,
    /// TCP only: sequence and acknowledgement numbers, window.
    pub seq: u32,
    pub ack: u32,
    pub window: u16,
    /// TCP only: options (length a multiple of 4, at most 40), e.g. `linux_syn_options`.
    pub tcp_options: Vec<u8>,
}

impl PacketSpec {
    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Self {
        Self {
            src: src.0,
            dst: dst.0,
            sport: src.1,
            dport: dst.1,
            proto: TCP,
            tcp_flags: flags,
            payload: Vec::new(),
            ip_options: Vec::new(),
            frag_field: 0x4000, // don't fragment
            udp_no_checksum: false,
            raw_l4: None,
            ip_id: 0x1234,
            seq: 1000,
            ack: 2000,
            window: 64240,
            tcp_options: Vec::new(),
        }
    }

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Self {
        Self {
            proto: UDP,
            payload: payload.to_vec(),
            frag_field: 0,
            ..Self::tcp(src, dst, 0)
        }
    }

    pub fn with_payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    pub fn with_seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }

    pub fn with_ack(mut self, ack: u32) -> Self {
        self.ack = ack;
        self
    }

    pub fn with_window(mut self, window: u16) -> Self {
        self.window = window;
        self
    }

    pub fn with_tcp_options(mut self, options: &[u8]) -> Self {
        self.tcp_options = options.to_vec();
        self
    }

    pub fn with_ip_id(mut self, id: u16) -> Self {
        self.ip_id = id;
        self
    }

    /// The same packet with destination rewritten (what DNAT must produce).
    pub fn with_dst(mut self, dst: (Ipv4Addr, u16)) -> Self {
        (self.dst, self.dport) = dst;
        self
    }

    /// The same packet with source rewritten (what reverse NAT must produce).
    pub fn with_src(mut self, src: (Ipv4Addr, u16)) -> Self {
        (self.src, self.sport) = src;
        self
    }

    /// Ethernet + IPv4 + L4 bytes with valid checksums.
    pub fn build(&self) -> Vec<u8> {
        let l4 = self.l4();
        let ihl = 20 + self.ip_options.len();
        let total = ihl + l4.len();
        let mut ip = Vec::with_capacity(ihl);
        ip.push(0x40 | (ihl / 4) as u8);
        ip.push(0);
        ip.extend_from_slice(&(total as u16).to_be_bytes());
        ip.extend_from_slice(&self.ip_id.to_be_bytes());
        ip.extend_from_slice(&self.frag_field.to_be_bytes());
        ip.push(64);
        ip.push(self.proto);
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.ip_options);
        let c = finish(sum(&ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());

        let mut frame = Vec::with_capacity(14 + total);
        frame.extend_from_slice(&NODE_MAC);
        frame.extend_from_slice(&CLIENT_MAC);
        frame.extend_from_slice(&0x0800u16.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&l4);
        frame
    }

    fn pseudo_sum(&self, l4_len: usize) -> u32 {
        let mut p = Vec::with_capacity(12);
        p.extend_from_slice(&self.src.octets());
        p.extend_from_slice(&self.dst.octets());
        p.push(0);
        p.push(self.proto);
        p.extend_from_slice(&(l4_len as u16).to_be_bytes());
        sum(&p)
    }

    fn l4(&self) -> Vec<u8> {
        if let Some(raw) = &self.raw_l4 {
            return raw.clone();
        }
        let mut l4 = Vec::new();
        match self.proto {
            TCP => {
                let opts = &self.tcp_options;
                assert!(
                    opts.len().is_multiple_of(4) && opts.len() <= 40,
                    "TCP options must fill whole words, at most 40 bytes"
                );
                l4.extend_from_slice(&self.sport.to_be_bytes());
                l4.extend_from_slice(&self.dport.to_be_bytes());
                l4.extend_from_slice(&self.seq.to_be_bytes());
                l4.extend_from_slice(&self.ack.to_be_bytes());
                l4.push((((20 + opts.len()) / 4) as u8) << 4);
                l4.push(self.tcp_flags);
                l4.extend_from_slice(&self.window.to_be_bytes());
                l4.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
                l4.extend_from_slice(opts);
                l4.extend_from_slice(&self.payload);
                let c = finish(self.pseudo_sum(l4.len()) + sum(&l4));
                l4[16..18].copy_from_slice(&c.to_be_bytes());
            }
            UDP => {
                l4.extend_from_slice(&self.sport.to_be_bytes());
                l4.extend_from_slice(&self.dport.to_be_bytes());
                l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
                l4.extend_from_slice(&self.payload);
                if !self.udp_no_checksum {
                    let c = match finish(self.pseudo_sum(l4.len()) + sum(&l4)) {
                        0 => 0xffff,
                        c => c,
                    };
                    l4[6..8].copy_from_slice(&c.to_be_bytes());
                }
            }
            _ => {
                // ICMP echo request.
                l4.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
                l4.extend_from_slice(&self.payload);
                let c = finish(sum(&l4));
                l4[2..4].copy_from_slice(&c.to_be_bytes());
            }
        }
        l4
    }
}

/// The options of a SYN as Linux sends them (`tcp_options_write`): MSS, SACK permitted,
/// timestamp (`tsval`, echo 0), NOP, window scale.
pub fn linux_syn_options(mss: u16, tsval: u32, wscale: u8) -> Vec<u8> {
    let mut o = vec![2, 4];
    o.extend_from_slice(&mss.to_be_bytes());
    o.extend_from_slice(&[4, 2, 8, 10]);
    o.extend_from_slice(&tsval.to_be_bytes());
    o.extend_from_slice(&[0, 0, 0, 0]);
    o.extend_from_slice(&[1, 3, 3, wscale]);
    o
}

/// An ICMP error (`kind`, `code`; for "fragmentation needed" `mtu` is the next-hop MTU)
/// from `src` to `dst`, quoting the first `quote_len` bytes of `quoted`'s IPv4 packet.
pub fn icmp_error(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    kind: u8,
    code: u8,
    mtu: u16,
    quoted: &PacketSpec,
    quote_len: usize,
) -> Vec<u8> {
    let q = quoted.build();
    let mut icmp = vec![kind, code, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(&q[14..14 + quote_len]);
    let c = finish(sum(&icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut outer = PacketSpec::tcp((src, 0), (dst, 0), 0);
    outer.proto = ICMP;
    outer.frag_field = 0;
    outer.raw_l4 = Some(icmp);
    outer.build()
}

/// `frame` as a router sends it on: TTL one less, the IPv4 checksum computed from
/// scratch, and with `macs` (destination, source) its new Ethernet addresses.
pub fn routed(frame: &[u8], macs: Option<([u8; 6], [u8; 6])>) -> Vec<u8> {
    let mut f = frame.to_vec();
    if let Some((dst, src)) = macs {
        f[..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&src);
    }
    let ihl = ((f[14] & 0x0f) as usize) * 4;
    f[22] -= 1;
    f[24..26].copy_from_slice(&[0, 0]);
    let c = finish(sum(&f[14..14 + ihl]));
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

/// `frame` with IPv4 TTL `ttl` (its header checksum computed from scratch).
pub fn with_ttl(frame: &[u8], ttl: u8) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[22] = ttl + 1;
    routed(&f, None)
}

/// Checks every checksum of an Ethernet/IPv4/TCP-or-UDP frame from scratch.
pub fn checksums_valid(frame: &[u8]) -> bool {
    if frame.len() < 34 {
        return false;
    }
    let ip = &frame[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if finish(sum(&ip[..ihl])) != 0 {
        return false;
    }
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if total > ip.len() || total < ihl {
        // The IPv4 length claims bytes the frame does not hold: nothing to sum.
        return false;
    }
    let l4 = &ip[ihl..total];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.push(0);
    pseudo.push(ip[9]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    match ip[9] {
        UDP if l4[6] == 0 && l4[7] == 0 => true,
        TCP | UDP => finish(sum(&pseudo) + sum(l4)) == 0,
        // ICMP: its own checksum, and the quoted IPv4 header's (errors quote one).
        ICMP => {
            let quoted_ip_ok = match l4[0] {
                3 | 11 if l4.len() >= 28 => finish(sum(&l4[8..28])) == 0,
                _ => true,
            };
            finish(sum(l4)) == 0 && quoted_ip_ok
        }
        _ => true,
    }
}

/// An ARP request frame (not IPv4).
pub fn arp_frame() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[0; 20]);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_packets_have_valid_checksums() {
        let a = (Ipv4Addr::new(10, 0, 0, 1), 40000);
        let b = (Ipv4Addr::new(10, 96, 0, 10), 80);
        assert!(checksums_valid(&PacketSpec::tcp(a, b, SYN).build()));
        assert!(checksums_valid(&PacketSpec::udp(a, b, b"hello").build()));
        let mut bad = PacketSpec::tcp(a, b, SYN).build();
        bad[40] ^= 1;
        assert!(!checksums_valid(&bad));
        let cut = PacketSpec::tcp(a, b, ACK)
            .with_payload(b"HTTP/1.1 200 OK")
            .build();
        assert!(!checksums_valid(&cut[..cut.len() - 4]));
    }

    #[test]
    fn tcp_header_with_options() {
        let a = (Ipv4Addr::new(10, 0, 0, 1), 40000);
        let b = (Ipv4Addr::new(10, 96, 0, 10), 80);
        let syn = PacketSpec::tcp(a, b, SYN)
            .with_seq(0x0102_0304)
            .with_ack(0)
            .with_window(42340)
            .with_tcp_options(&linux_syn_options(1460, 7, 7))
            .build();
        assert!(checksums_valid(&syn));
        let tcp = &syn[34..];
        assert_eq!(tcp.len(), 40);
        assert_eq!(tcp[4..8], [1, 2, 3, 4]);
        assert_eq!(tcp[8..12], [0, 0, 0, 0]);
        assert_eq!(tcp[12], 10 << 4);
        assert_eq!(tcp[14..16], 42340u16.to_be_bytes());
        assert_eq!(
            tcp[20..],
            [2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 7, 0, 0, 0, 0, 1, 3, 3, 7]
        );
        // Defaults are what existing callers always got.
        let plain = PacketSpec::tcp(a, b, ACK).build();
        assert_eq!(plain[18..20], [0x12, 0x34]);
        assert_eq!(plain[38..42], 1000u32.to_be_bytes());
        assert_eq!(plain[42..46], 2000u32.to_be_bytes());
        assert_eq!(plain[46], 5 << 4);
    }
}
