//! Connection attempts that fail, and how lb hides the failure from the client.
//!
//! A backend that refuses a SYN (RST), cannot be reached (ICMP destination unreachable)
//! or never answers (the client retransmits its SYN) is reported to the agent, and the
//! connection attempt is moved ("re-steered") to the next backend of the service's
//! failover list, up to `connect_retries` times:
//! - refused: the RST itself is rewritten into the client's SYN, addressed to the new
//!   backend, so the client waits one more round trip, not a retransmission timeout. When
//!   the packet cannot be rewritten, the refusal is held back (dropped) and the client's
//!   retransmitted SYN goes to the new backend;
//! - unreachable: the ICMP error is held back, the retransmitted SYN goes to the new
//!   backend;
//! - timeout: the retransmitted SYN itself goes to the new backend.
//!
//! When no other eligible backend exists, or the budget is used up, the refusal reaches
//! the client, so clients fail fast in a total outage.
//!
//! Sending the SYN again needs what the client's SYN offered: its sequence number, window
//! and options (MSS, window scale, SACK, timestamp). They are read when the connection is
//! created and kept in its original-direction entry.

// Keys are passed by reference: by value, each lookup would copy the key on the stack.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "avoid a stack copy of each key"
)]

use aya_ebpf::{macros::map, maps::PerCpuArray};
use lb_common::{
    config::MAX_CONNECT_RETRIES,
    maps::{SYN_ECN, SYN_OPT_SACK, SYN_OPT_TIMESTAMPS, SYN_OPT_WSCALE},
    AddrBe, ConnDirection, ConnEntry, ConnState, FlowKey, ServiceKey,
};

use crate::{
    maps::{config, selection_slot_id, BACKENDS, CONNECTIONS, SERVICES},
    packet::Packet,
    parse::{header_at, ETH_LEN, L4_OFF, TCP_SYN},
    stats,
};

const TCP_ECE: u8 = 0x40;
const TCP_CWR: u8 = 0x80;
/// Option kinds (RFC 9293, 7323, 2018).
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_MSS: u8 = 2;
const OPT_WSCALE: u8 = 3;
const OPT_SACK_PERMITTED: u8 = 4;
const OPT_TIMESTAMP: u8 = 8;
/// Options of a TCP header fit in 40 bytes; a well-formed list has at most this many.
const MAX_OPTIONS: usize = 12;

/// What a SYN offers, as kept in `ConnEntry`.
#[derive(Clone, Copy, Default)]
pub struct SynOffer {
    pub isn: u32,
    pub tsval: u32,
    pub window: u16,
    pub mss: u16,
    pub wscale: u8,
    /// `SYN_OPT_*` and `SYN_ECN`.
    pub flags: u8,
}

impl SynOffer {
    #[inline(always)]
    pub fn keep_in(&self, entry: &mut ConnEntry) {
        entry.syn_isn = self.isn;
        entry.syn_tsval = self.tsval;
        entry.syn_window = self.window;
        entry.syn_mss = self.mss;
        entry.syn_wscale = self.wscale;
        entry.flags |= self.flags;
    }
}

#[inline(always)]
fn byte_at(data: usize, data_end: usize, off: usize) -> Option<u8> {
    // SAFETY: header_at checked the bounds.
    header_at::<u8>(data, data_end, off).map(|p| unsafe { *p })
}

#[inline(always)]
fn be16_at(data: usize, data_end: usize, off: usize) -> Option<u16> {
    // SAFETY: header_at checked the bounds; unaligned read of plain bytes.
    header_at::<[u8; 2]>(data, data_end, off).map(|p| u16::from_be_bytes(unsafe { *p }))
}

#[inline(always)]
pub fn be32_at(data: usize, data_end: usize, off: usize) -> Option<u32> {
    // SAFETY: header_at checked the bounds; unaligned read of plain bytes.
    header_at::<[u8; 4]>(data, data_end, off).map(|p| u32::from_be_bytes(unsafe { *p }))
}

/// Reads the SYN at L4: sequence number, window, ECN request and the options lb can send
/// again. Options it cannot read (cut short, malformed) are left out.
///
/// The options are copied into a per-CPU buffer by the kernel's helper and parsed there
/// with masked indices: every read is in bounds whatever the option lengths say.
#[inline(always)]
pub fn read_syn<P: Packet>(pkt: &P, tcp_flags: u8) -> Option<SynOffer> {
    let (data, data_end) = (pkt.data(), pkt.data_end());
    let mut offer = SynOffer {
        isn: be32_at(data, data_end, L4_OFF + 4)?,
        window: be16_at(data, data_end, L4_OFF + 14)?,
        ..SynOffer::default()
    };
    if tcp_flags & (TCP_ECE | TCP_CWR) == TCP_ECE | TCP_CWR {
        offer.flags |= SYN_ECN;
    }
    let doff = (byte_at(data, data_end, L4_OFF + 12)? >> 4) as u32;
    if doff <= 5 {
        return Some(offer);
    }
    let opt_len = (doff * 4 - 20) as usize;
    // SAFETY: this CPU's slot, used only while this packet is processed.
    let buf = unsafe { &mut *SCRATCH.get_ptr_mut(0)? };
    if pkt.load_into(L4_OFF + 20, buf, opt_len as u32).is_err() {
        return Some(offer);
    }
    // The mask is applied after a volatile read, so the compiler cannot drop it as
    // redundant: the verifier needs it to bound the index.
    // SAFETY: reading a local.
    let at = |i: usize| buf[unsafe { core::ptr::read_volatile(&i) } & 63];
    let mut i = 0usize;
    for _ in 0..MAX_OPTIONS {
        if i >= opt_len {
            break;
        }
        let kind = at(i);
        if kind == OPT_END {
            break;
        }
        if kind == OPT_NOP {
            i += 1;
            continue;
        }
        let len = at(i + 1) as usize;
        if len < 2 || i + len > opt_len {
            break;
        }
        if kind == OPT_MSS && len == 4 {
            offer.mss = u16::from_be_bytes([at(i + 2), at(i + 3)]);
        } else if kind == OPT_WSCALE && len == 3 {
            offer.wscale = at(i + 2);
            offer.flags |= SYN_OPT_WSCALE;
        } else if kind == OPT_SACK_PERMITTED && len == 2 {
            offer.flags |= SYN_OPT_SACK;
        } else if kind == OPT_TIMESTAMP && len == 10 {
            offer.tsval = u32::from_be_bytes([at(i + 2), at(i + 3), at(i + 4), at(i + 5)]);
            offer.flags |= SYN_OPT_TIMESTAMPS;
        }
        i += len;
    }
    Some(offer)
}

/// The key of the original direction (client → VIP) of a reply entry `reply` tracked
/// under `reply_key` (backend → client).
#[inline(always)]
pub fn original_key(reply_key: &FlowKey, reply: &ConnEntry) -> FlowKey {
    FlowKey {
        src: reply_key.dst,
        dst: reply.nat_addr,
        src_port_be: reply_key.dst_port_be,
        dst_port_be: reply.nat_port_be,
        ..*reply_key
    }
}

/// A backend a connection attempt was moved to.
pub struct Resteered {
    pub addr: AddrBe,
    pub port_be: u16,
}

/// Moves the connection attempt `orig` (tracked under `orig_key`, client → VIP) to the
/// next eligible backend of its service's failover list: not the one that failed, not
/// the one the table first gave, active now. Updates both entries; `None` when there is
/// no such backend or the retry budget is used up (nothing changes then).
#[inline(always)]
pub fn resteer(orig_key: &FlowKey, orig: &mut ConnEntry, now: u64) -> Option<Resteered> {
    // SAFETY: plain read of a valid static; volatile so it is a real load.
    let budget = unsafe { core::ptr::read_volatile(&config().connect_retries) };
    if orig.retries as u32 >= budget || orig.retries as u32 >= MAX_CONNECT_RETRIES {
        return None;
    }
    let key = ServiceKey {
        addr: orig_key.dst,
        port_be: orig_key.dst_port_be,
        proto: orig_key.proto,
        family: orig_key.family,
    };
    // SAFETY: pointer to a live map value returned by the kernel; copied at once.
    let svc = unsafe { *SERVICES.get_ptr(&key)? };
    let list = svc.table_offset + svc.table_len;
    let len = svc.fallback_len as u32;
    if len == 0 {
        return None;
    }
    let (id, pos) = lb_common::selection::next_in_failover_list(
        list,
        len,
        orig.fallback_cursor as u32,
        [orig.backend_id, orig.first_backend_id],
        selection_slot_id,
        |id| BACKENDS.get(id),
    )?;
    let backend = *BACKENDS.get(id)?;

    // The new backend's side first: if it cannot be tracked, nothing changes.
    let reply = ConnEntry {
        nat_addr: orig_key.dst,
        nat_port_be: orig_key.dst_port_be,
        direction: ConnDirection::Reply as u8,
        state: ConnState::TcpSyn as u8,
        backend_id: id,
        service_id: orig.service_id,
        first_backend_id: orig.first_backend_id,
        last_seen_ns: now,
        flags: orig.flags,
        created_ns: orig.created_ns,
        ..ConnEntry::default()
    };
    let mut key = FlowKey {
        src: backend.addr,
        dst: orig_key.src,
        src_port_be: backend.port_be,
        dst_port_be: orig_key.src_port_be,
        ..*orig_key
    };
    CONNECTIONS.insert(&key, &reply, 0).ok()?;
    // The failed backend's side: a late packet from it must not reach the client.
    key.src = orig.nat_addr;
    key.src_port_be = orig.nat_port_be;
    let _ = CONNECTIONS.remove(&key);
    orig.nat_addr = backend.addr;
    orig.nat_port_be = backend.port_be;
    orig.backend_id = id;
    orig.retries += 1;
    orig.fallback_cursor = (pos + 1) as u8;
    orig.state = ConnState::TcpSyn as u8;
    orig.last_seen_ns = now;
    stats::backend_new_connection(id);
    Some(Resteered {
        addr: backend.addr,
        port_be: backend.port_be,
    })
}

/// IPv4 and TCP headers of a SYN as lb sends it again: 20 + 20 + 20 bytes of options
/// (MSS, SACK permitted, timestamp, window scale; NOPs for what the client did not offer).
const SYN_HEADERS: usize = 60;
const SYN_PACKET_LEN: u32 = (ETH_LEN + SYN_HEADERS) as u32;

/// Per-CPU scratch space: a SYN's options while they are parsed, a re-sent SYN's headers
/// while they are built (the programs' stack is too small for them).
#[map(name = "lb_scratch_v1")]
static SCRATCH: PerCpuArray<[u8; 64]> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn put16(b: &mut [u8; SYN_HEADERS], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline(always)]
fn put32(b: &mut [u8; SYN_HEADERS], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Internet checksum (RFC 1071) of `bytes` plus the partial sum `sum`.
#[inline(always)]
fn checksum(bytes: &[u8], mut sum: u64) -> u16 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u64;
        i += 2;
    }
    // Two folds suffice for sums below 2^32 (headers of at most 64 bytes); a loop until
    // no carry is left would be unbounded for the verifier.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Turns the packet (a refusal on its way to the client) into the client's SYN, sent by
/// the client (`client`, `client_port_be`) to `to`, with what the client's SYN offered
/// (`orig`). The Ethernet header is kept: the packet arrived on this node, and the hook
/// either passes it to the stack or redirects it after a route lookup.
#[inline(always)]
pub fn rewrite_as_syn<P: Packet>(
    pkt: &mut P,
    client: u32,
    client_port_be: u16,
    to: &Resteered,
    orig: &ConnEntry,
) -> Result<(), ()> {
    let h = SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's slot, used only while this packet is processed.
    let h: &mut [u8; SYN_HEADERS] = unsafe { &mut *(h as *mut [u8; SYN_HEADERS]) };
    h.fill(0);
    // IPv4: no options, DF, TTL 64; checksum filled in below.
    h[0] = 0x45;
    put16(h, 2, SYN_HEADERS as u16);
    put16(h, 6, 0x4000);
    h[8] = 64;
    h[9] = lb_common::proto::TCP;
    h[12..16].copy_from_slice(&client.to_ne_bytes());
    h[16..20].copy_from_slice(&to.addr.0[0].to_ne_bytes());
    // TCP.
    h[20..22].copy_from_slice(&client_port_be.to_ne_bytes());
    h[22..24].copy_from_slice(&to.port_be.to_ne_bytes());
    put32(h, 24, orig.syn_isn);
    h[32] = 10 << 4; // 40-byte header
    h[33] = TCP_SYN
        | if orig.flags & SYN_ECN != 0 {
            TCP_ECE | TCP_CWR
        } else {
            0
        };
    put16(h, 34, orig.syn_window);
    // Options: MSS (4) | SACK permitted (2) | timestamp (10) | NOP, window scale (4).
    let o = 40;
    h[o..o + 20].fill(OPT_NOP);
    if orig.syn_mss != 0 {
        h[o] = OPT_MSS;
        h[o + 1] = 4;
        put16(h, o + 2, orig.syn_mss);
    }
    if orig.flags & SYN_OPT_SACK != 0 {
        h[o + 4] = OPT_SACK_PERMITTED;
        h[o + 5] = 2;
    }
    if orig.flags & SYN_OPT_TIMESTAMPS != 0 {
        h[o + 6] = OPT_TIMESTAMP;
        h[o + 7] = 10;
        put32(h, o + 8, orig.syn_tsval);
        put32(h, o + 12, 0);
    }
    if orig.flags & SYN_OPT_WSCALE != 0 {
        h[o + 17] = OPT_WSCALE;
        h[o + 18] = 3;
        h[o + 19] = orig.syn_wscale;
    }
    let ip_check = checksum(&h[..20], 0);
    put16(h, 10, ip_check);
    // Pseudo header: addresses, protocol, TCP length.
    let mut pseudo: u64 = lb_common::proto::TCP as u64 + (SYN_HEADERS - 20) as u64;
    let mut i = 12;
    while i < 20 {
        pseudo += u16::from_be_bytes([h[i], h[i + 1]]) as u64;
        i += 2;
    }
    let tcp_check = checksum(&h[20..], pseudo);
    put16(h, 36, tcp_check);

    pkt.set_len(SYN_PACKET_LEN)?;
    pkt.store_bytes(ETH_LEN, h)
}
