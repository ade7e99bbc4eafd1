//! Header parsing. All packet access goes through `header_at`, the one bounds check the
//! verifier needs to see.

use core::mem::size_of;

use lb_common::{family, proto, AddrBe, Counter, FlowKey, ServiceKey};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{
    icmp::{ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED, MAX_ICMP_HEADERS},
    maps::SERVICES,
};

pub const ETH_LEN: usize = size_of::<EthHdr>();
pub const IPV4_LEN: usize = size_of::<Ipv4Hdr>();
/// Offset of the L4 header: lb handles IPv4 without options only.
pub const L4_OFF: usize = ETH_LEN + IPV4_LEN;
/// Longest TCP header: 20 bytes and 40 of options.
pub const MAX_TCP_HEADER: usize = 60;
/// Longest header stack the core reads directly: Ethernet + IPv4 + TCP with options (a
/// SYN's options are read), or an ICMP error quoting an IPv4 and a TCP header.
pub const MAX_HEADERS: usize = if MAX_ICMP_HEADERS > L4_OFF + MAX_TCP_HEADER {
    MAX_ICMP_HEADERS
} else {
    L4_OFF + MAX_TCP_HEADER
};

const ETH_P_IPV4_BE: u16 = 0x0800u16.to_be();
const TCP_FLAGS_OFF: usize = 13;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Pointer to a `T` at `off`, if the whole `T` lies inside the packet.
#[inline(always)]
pub fn header_at<T>(data: usize, data_end: usize, off: usize) -> Option<*mut T> {
    let start = data + off;
    if start + size_of::<T>() > data_end {
        return None;
    }
    Some(start as *mut T)
}

/// A TCP segment's header length and payload length (bytes), from its data offset and
/// the IPv4 total length (IPv4 without options: packets with options are not tracked).
#[inline(always)]
pub fn tcp_lengths(data: usize, data_end: usize) -> Option<(usize, usize)> {
    let total_len = (crate::handshake::be32_at(data, data_end, ETH_LEN)? & 0xffff) as usize;
    let doff = header_at::<u8>(data, data_end, L4_OFF + 12)?;
    // SAFETY: header_at checked the bounds.
    let tcp_len = ((unsafe { *doff } >> 4) as usize) * 4;
    Some((tcp_len, total_len.saturating_sub(IPV4_LEN + tcp_len)))
}

/// What a packet is, for the core.
pub enum Classified {
    /// IPv4 TCP or UDP.
    Flow(Parsed),
    /// An ICMP error (maybe about a tracked connection); carries the outer source.
    IcmpError(AddrBe),
}

/// A parsed IPv4 TCP/UDP packet.
pub struct Parsed {
    pub flow: FlowKey,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
}

/// Why a packet is not a parsed TCP/UDP packet: the counter to bump and whether to drop.
pub struct Unparsed {
    pub counter: Counter,
    pub drop: bool,
}

impl Unparsed {
    const fn pass(counter: Counter) -> Self {
        Self {
            counter,
            drop: false,
        }
    }
}

/// Is `dst` a VIP address (any port)? Used only on the rare malformed paths.
#[inline(always)]
fn to_vip_address(dst: AddrBe) -> bool {
    SERVICES
        .get_ptr(ServiceKey::address_marker(dst, family::V4))
        .is_some()
}

/// The documented rule for what lb cannot handle: dropped when addressed to a VIP
/// address (it would otherwise reach the node's stack unbalanced), passed otherwise.
#[inline(always)]
fn unsupported(dst: AddrBe, to_vip: Counter, other: Counter) -> Unparsed {
    if to_vip_address(dst) {
        Unparsed {
            counter: to_vip,
            drop: true,
        }
    } else {
        Unparsed::pass(other)
    }
}

#[inline(always)]
pub fn parse(data: usize, data_end: usize) -> Result<Classified, Unparsed> {
    let eth: *mut EthHdr =
        header_at(data, data_end, 0).ok_or(Unparsed::pass(Counter::PassTruncatedEthernet))?;
    // SAFETY: header_at checked the bounds.
    if unsafe { (*eth).ether_type } != ETH_P_IPV4_BE {
        return Err(Unparsed::pass(Counter::PassNotIpv4));
    }
    let ip: *mut Ipv4Hdr =
        header_at(data, data_end, ETH_LEN).ok_or(Unparsed::pass(Counter::PassTruncatedIpv4))?;
    // SAFETY: header_at checked the bounds.
    let ip = unsafe { &*ip };
    if ip.vihl >> 4 != 4 || ip.vihl & 0x0f < 5 {
        return Err(Unparsed::pass(Counter::PassTruncatedIpv4));
    }
    let l4_proto = ip.proto;
    let unfragmented = ip.frags[0] & 0x3f == 0 && ip.frags[1] == 0;
    if l4_proto == proto::ICMP && ip.vihl & 0x0f == 5 && unfragmented {
        if let Some(kind) = header_at::<u8>(data, data_end, L4_OFF) {
            // SAFETY: header_at checked the bounds.
            let kind = unsafe { *kind };
            if kind == ICMP_DEST_UNREACH || kind == ICMP_TIME_EXCEEDED {
                return Ok(Classified::IcmpError(AddrBe::v4(ip.src_addr)));
            }
        }
    }
    if l4_proto != proto::TCP && l4_proto != proto::UDP {
        return Err(Unparsed::pass(Counter::PassOtherProtocol));
    }
    let src = AddrBe::v4(ip.src_addr);
    let dst = AddrBe::v4(ip.dst_addr);
    if ip.vihl & 0x0f != 5 {
        return Err(unsupported(
            dst,
            Counter::DropIpOptions,
            Counter::PassIpOptions,
        ));
    }
    // More-fragments flag or a non-zero offset: this packet is part of a fragment train.
    if !unfragmented {
        return Err(unsupported(
            dst,
            Counter::DropFragment,
            Counter::PassFragment,
        ));
    }

    let (ports, tcp_flags) = if l4_proto == proto::TCP {
        let Some(tcp) = header_at::<TcpHdr>(data, data_end, L4_OFF) else {
            return Err(unsupported(
                dst,
                Counter::DropTruncatedL4,
                Counter::PassTruncatedL4,
            ));
        };
        // SAFETY: header_at checked the bounds of the whole TCP header.
        let flags = unsafe { *((tcp as *const u8).add(TCP_FLAGS_OFF)) };
        let tcp = unsafe { &*tcp };
        ((tcp.source, tcp.dest), flags)
    } else {
        let Some(udp) = header_at::<UdpHdr>(data, data_end, L4_OFF) else {
            return Err(unsupported(
                dst,
                Counter::DropTruncatedL4,
                Counter::PassTruncatedL4,
            ));
        };
        // SAFETY: header_at checked the bounds.
        let udp = unsafe { &*udp };
        ((udp.src, udp.dst), 0)
    };
    Ok(Classified::Flow(Parsed {
        flow: FlowKey {
            src,
            dst,
            src_port_be: u16::from_ne_bytes(ports.0),
            dst_port_be: u16::from_ne_bytes(ports.1),
            proto: l4_proto,
            family: family::V4,
            _pad: [0; 2],
        },
        tcp_flags,
    }))
}
