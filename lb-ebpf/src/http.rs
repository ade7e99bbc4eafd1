//! HTTP/1.x response status, read from the first bytes of a backend's TCP segment.
//!
//! A segment whose payload starts `HTTP/1.` begins a response: its status is the three
//! digits after the version (`HTTP/1.1 503 ...`). 5xx is an error for outlier detection,
//! reported to the agent at once; anything else is a success, counted per CPU. Body
//! segments (any other first bytes) cost one 8-byte read and compare.
//!
//! A retransmitted segment is recognised by its sequence number (kept in the reply entry)
//! and not counted again.
//!
//! Bounded by construction: at most 12 bytes are read, at an offset the TCP header gives
//! (at most 60 bytes past it), and only when the IPv4 length says they are payload. A
//! status line split across segments, cut short or without three digits is counted as
//! unparsed and not used either way.

use lb_common::{maps::CONN_RESPONSE_SEQ, ConnEntry, Counter};

use crate::{
    handshake::be32_at,
    packet::Packet,
    parse::{tcp_lengths, L4_OFF},
    stats,
};

/// The first bytes of a response, 8 bytes read as one value.
const HTTP_1: [u8; 8] = *b"HTTP/1.\0";
const VERSION_MASK: u64 = 0x00ff_ffff_ffff_ffff;

/// Looks for a response status at the start of the payload of a backend's segment and
/// accounts it to the backend of `entry` (the reply-direction entry).
#[inline(always)]
pub fn response_status<P: Packet>(pkt: &P, entry: &mut ConnEntry) {
    let (data, data_end) = (pkt.data(), pkt.data_end());
    let Some((tcp_len, payload)) = tcp_lengths(data, data_end) else {
        return;
    };
    if payload < 8 {
        return;
    }
    let off = L4_OFF + tcp_len;
    let Some(start) = pkt.load_bytes::<8>(off) else {
        return;
    };
    if u64::from_le_bytes(start) & VERSION_MASK != u64::from_le_bytes(HTTP_1) {
        return;
    }
    // A retransmitted segment starts the same response again: count each response once.
    let Some(seq) = be32_at(data, data_end, L4_OFF + 4) else {
        return;
    };
    if entry.flags & CONN_RESPONSE_SEQ != 0 && seq == entry.syn_isn {
        return;
    }
    entry.syn_isn = seq;
    entry.flags |= CONN_RESPONSE_SEQ;
    let (service_id, backend_id) = (entry.service_id, entry.backend_id);
    let status = if payload >= 12 {
        pkt.load_bytes::<4>(off + 8).and_then(parse_status)
    } else {
        None
    };
    match status {
        Some(code) => stats::http_response(service_id, backend_id, code),
        None => stats::count(Counter::EventHttpUnparsed),
    }
}

/// ` NNN` → NNN, for a status in 100..=599.
#[inline(always)]
fn parse_status(b: [u8; 4]) -> Option<u16> {
    if b[0] != b' ' {
        return None;
    }
    let d = [
        b[1].wrapping_sub(b'0'),
        b[2].wrapping_sub(b'0'),
        b[3].wrapping_sub(b'0'),
    ];
    if d[0] < 1 || d[0] > 5 || d[1] > 9 || d[2] > 9 {
        return None;
    }
    Some(d[0] as u16 * 100 + d[1] as u16 * 10 + d[2] as u16)
}
