//! ICMP errors about tracked connections (destination unreachable, including
//! "fragmentation needed" for path MTU discovery, and time exceeded).
//!
//! An ICMP error quotes the IPv4 header and the first bytes of the packet it is about.
//! When that packet belongs to a connection lb translates, the quote shows the translated
//! addresses, which the receiver does not know; the error is translated the same way as
//! the connection's packets, quote included, so the receiver can match it to its socket:
//! - from the backend side (the quote is client → backend): the quote becomes
//!   client → VIP, and the outer source becomes the VIP when the backend itself sent it;
//! - towards the VIP (the quote is VIP → client, a reply): the quote becomes
//!   backend → client and the error is sent on to the backend.
//!
//! Any other ICMP passes untouched.

// Keys are passed by reference: by value, each lookup would copy the key on the stack.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "avoid a stack copy of each key"
)]

use lb_common::{
    csum, family, maps::CONN_AWAIT_RETRANSMIT, proto, AddrBe, ConnDirection, ConnEntry, ConnState,
    Counter, FlowKey, SignalKind,
};
use network_types::ip::Ipv4Hdr;

use crate::{
    datapath::{expired, Outcome},
    handshake,
    maps::CONNECTIONS,
    packet::{Endpoint, Packet},
    parse::{header_at, ETH_LEN, L4_OFF},
    stats,
};

pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
/// Destination unreachable, "fragmentation needed": path MTU discovery, not a failure.
const ICMP_FRAG_NEEDED: u8 = 4;

const ICMP_CHECK_OFF: usize = L4_OFF + 2;
const INNER_IP_OFF: usize = L4_OFF + 8;
const INNER_L4_OFF: usize = INNER_IP_OFF + 20;
const IP_CHECK: usize = 10;
const IP_SRC: usize = 12;
const IP_DST: usize = 16;

/// Longest prefix read: up to the checksum of a quoted TCP header.
pub const MAX_ICMP_HEADERS: usize = INNER_L4_OFF + 18;

/// An ICMP error header and the start of its quote (all byte arrays: no alignment).
#[repr(C)]
#[derive(Clone, Copy)]
struct IcmpError {
    kind: u8,
    code: u8,
    check: [u8; 2],
    rest: [u8; 4],
    inner: Ipv4Hdr,
    sport: [u8; 2],
    dport: [u8; 2],
}

const UNRELATED: (Outcome, Counter) = (Outcome::Pass, Counter::PassOtherProtocol);

#[inline(always)]
pub fn handle<P: Packet>(pkt: &mut P, outer_src: AddrBe, now: u64) -> (Outcome, Counter) {
    let Some(h) = header_at::<IcmpError>(pkt.data(), pkt.data_end(), L4_OFF) else {
        return UNRELATED;
    };
    // SAFETY: bounds checked by header_at; copied because rewrites move the packet.
    let h = unsafe { *h };
    // What is rewritten must be inside the ICMP message (the outer IPv4 length), not in
    // bytes after it (a trailer): the ICMP checksum covers only the message.
    let Some(total) = header_at::<[u8; 2]>(pkt.data(), pkt.data_end(), ETH_LEN + 2) else {
        return UNRELATED;
    };
    // SAFETY: bounds checked by header_at.
    let total = u16::from_be_bytes(unsafe { *total }) as usize;
    if ETH_LEN + total < L4_OFF + core::mem::size_of::<IcmpError>() {
        return UNRELATED;
    }
    let inner = &h.inner;
    if inner.vihl != 0x45 || (inner.proto != proto::TCP && inner.proto != proto::UDP) {
        return UNRELATED;
    }
    let (q_src, q_dst) = (AddrBe::v4(inner.src_addr), AddrBe::v4(inner.dst_addr));
    let (q_sport, q_dport) = (u16::from_ne_bytes(h.sport), u16::from_ne_bytes(h.dport));
    // The quoted packet went q_src → q_dst; the connection's entry for the other
    // direction is keyed by the reversed tuple, and holds what the quote must show.
    let key = FlowKey {
        src: q_dst,
        dst: q_src,
        src_port_be: q_dport,
        dst_port_be: q_sport,
        proto: inner.proto,
        family: family::V4,
        _pad: [0; 2],
    };
    let Some(entry) = CONNECTIONS.get_ptr(key) else {
        return UNRELATED;
    };
    // SAFETY: pointer to a live map value returned by the kernel.
    let entry = unsafe { *entry };
    if expired(&entry, now) {
        return UNRELATED;
    }
    let nat = Endpoint {
        addr: entry.nat_addr.0[0],
        port: entry.nat_port_be,
    };
    let result = if entry.direction == ConnDirection::Reply as u8 {
        // Destination unreachable about a TCP connection still in its handshake: the
        // backend cannot be reached, a connect failure for outlier detection. When
        // another backend is eligible, the error is held back and the client's
        // retransmitted SYN goes there (see `handshake`).
        if h.kind == ICMP_DEST_UNREACH
            && h.code != ICMP_FRAG_NEEDED
            && inner.proto == proto::TCP
            && entry.state == ConnState::TcpSyn as u8
        {
            stats::signal(SignalKind::Unreachable, entry.service_id, entry.backend_id);
            if hold_for_retransmit(&key, &entry, now) {
                return (Outcome::Drop, Counter::DropRefusalHeld);
            }
            stats::count(Counter::EventRefusalPassed);
        }
        // Quote: client → backend. Make it client → VIP.
        let old = Endpoint {
            addr: q_dst.0[0],
            port: q_dport,
        };
        rewrite_quote(pkt, &h, IP_DST, 2, old, nat)
            .and_then(|()| {
                if outer_src == q_dst {
                    rewrite_outer(pkt, IP_SRC, q_dst.0[0], nat.addr)
                } else {
                    // Sent by a router on the way: its own address stays.
                    Ok(())
                }
            })
            .map(|()| (Outcome::Replied, Counter::ReplyIcmpError))
    } else {
        // Quote: VIP → client (a reply). Make it backend → client, and deliver it there;
        // only an error addressed to the VIP the quote came from (another destination is
        // not lb's to redirect).
        let outer_dst = header_at::<[u8; 4]>(pkt.data(), pkt.data_end(), ETH_LEN + IP_DST)
            // SAFETY: bounds checked by header_at.
            .map(|p| unsafe { *p });
        if outer_dst != Some(inner.src_addr) {
            return UNRELATED;
        }
        let old = Endpoint {
            addr: q_src.0[0],
            port: q_sport,
        };
        rewrite_quote(pkt, &h, IP_SRC, 0, old, nat)
            .and_then(|()| rewrite_outer(pkt, IP_DST, q_src.0[0], nat.addr))
            .map(|()| (Outcome::Forwarded, Counter::ForwardIcmpError))
    };
    result.unwrap_or((Outcome::Drop, Counter::DropRewriteFailed))
}

/// Moves the connection attempt answered by `reply` (tracked under `reply_key`) to another
/// backend, so the client's retransmitted SYN goes there. False when the client already
/// completed the handshake or no other backend is eligible.
#[inline(always)]
fn hold_for_retransmit(reply_key: &FlowKey, reply: &ConnEntry, now: u64) -> bool {
    let orig_key = handshake::original_key(reply_key, reply);
    let Some(orig) = CONNECTIONS.get_ptr_mut(&orig_key) else {
        return false;
    };
    // SAFETY: pointer to a live map value returned by the kernel.
    let orig = unsafe { &mut *orig };
    if orig.state != ConnState::TcpSyn as u8 || handshake::resteer(&orig_key, orig, now).is_none() {
        return false;
    }
    orig.flags |= CONN_AWAIT_RETRANSMIT;
    true
}

/// Rewrites an address of the outer IPv4 header and its checksum. ICMP has no pseudo
/// header, so the ICMP checksum does not change.
#[inline(always)]
fn rewrite_outer<P: Packet>(pkt: &mut P, field: usize, old: u32, new: u32) -> Result<(), ()> {
    let check: *mut [u8; 2] = header_at(pkt.data(), pkt.data_end(), ETH_LEN + IP_CHECK).ok_or(())?;
    // SAFETY: bounds checked by header_at.
    let old_check = u16::from_ne_bytes(unsafe { *check });
    pkt.store_u32(ETH_LEN + field, new)?;
    pkt.store_u16(ETH_LEN + IP_CHECK, csum::replace4(old_check, old, new))
}

/// Rewrites one end (address at `ip_field`, port at `port_field` of the quoted L4 header)
/// of the quoted packet, with the quote's IPv4 checksum, its L4 checksum when quoted, and
/// the ICMP checksum, which covers all of them.
#[inline(always)]
fn rewrite_quote<P: Packet>(
    pkt: &mut P,
    h: &IcmpError,
    ip_field: usize,
    port_field: usize,
    old: Endpoint,
    new: Endpoint,
) -> Result<(), ()> {
    let mut icmp_check = u16::from_ne_bytes(h.check);
    let old_ip_check = u16::from_ne_bytes(h.inner.check);
    let new_ip_check = csum::replace4(old_ip_check, old.addr, new.addr);
    pkt.store_u32(INNER_IP_OFF + ip_field, new.addr)?;
    pkt.store_u16(INNER_IP_OFF + IP_CHECK, new_ip_check)?;
    pkt.store_u16(INNER_L4_OFF + port_field, new.port)?;
    icmp_check = csum::replace4(icmp_check, old.addr, new.addr);
    icmp_check = csum::replace2(icmp_check, old_ip_check, new_ip_check);
    icmp_check = csum::replace2(icmp_check, old.port, new.port);

    let is_udp = h.inner.proto == proto::UDP;
    let l4_check_off = INNER_L4_OFF + if is_udp { 6 } else { 16 };
    // The L4 checksum is in the quote for UDP (first 8 bytes), and for TCP only when the
    // sender quoted more than 8 bytes (Linux quotes as much as fits in 576 bytes). Quoted
    // means within the outer IPv4 length: bytes after it (a trailer, padding) are not part
    // of the ICMP message, and the ICMP checksum does not cover them.
    let outer_end = match header_at::<[u8; 2]>(pkt.data(), pkt.data_end(), ETH_LEN + 2) {
        // SAFETY: bounds checked by header_at.
        Some(p) => ETH_LEN + u16::from_be_bytes(unsafe { *p }) as usize,
        None => 0,
    };
    let quoted = l4_check_off + 2 <= outer_end;
    if let Some(p) =
        header_at::<[u8; 2]>(pkt.data(), pkt.data_end(), l4_check_off).filter(|_| quoted)
    {
        // SAFETY: bounds checked by header_at.
        let old_l4 = u16::from_ne_bytes(unsafe { *p });
        let new_l4 = if is_udp {
            csum::udp_replace2(
                csum::udp_replace4(old_l4, old.addr, new.addr),
                old.port,
                new.port,
            )
        } else {
            csum::replace2(
                csum::replace4(old_l4, old.addr, new.addr),
                old.port,
                new.port,
            )
        };
        pkt.store_u16(l4_check_off, new_l4)?;
        icmp_check = csum::replace2(icmp_check, old_l4, new_l4);
    }
    pkt.store_u16(ICMP_CHECK_OFF, icmp_check)
}
