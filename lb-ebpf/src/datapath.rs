//! The core shared by every hook: classify a packet, track its connection, pick a backend
//! for a new one, and rewrite it.
//!
//! Per packet, in order:
//! 1. parse (what cannot be parsed follows the rule in `parse`);
//! 2. one connection-table lookup under the packet's own 5-tuple: a hit says which way
//!    the packet goes and what to write (backend for the original direction, VIP for
//!    replies), so tracked packets cost a single hash lookup;
//! 3. otherwise a service lookup: a hit is a new connection, a miss is not lb's traffic.

// Keys are passed by reference: by value, each lookup would copy the key on the stack.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "avoid a stack copy of each key on the per-packet path"
)]

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use lb_common::{
    config::SYN_RETRANSMIT_MIN_NS,
    flow::{addr_filter_slot, flow_hash},
    maps::{
        AddrRole, CONN_AWAIT_RETRANSMIT, CONN_HTTP, CONN_SYNACK_SEEN, SERVICE_AFFINITY,
        SERVICE_HTTP, SERVICE_TLS,
    },
    proto, AddrBe, ConnDirection, ConnEntry, ConnState, Counter, FlowKey, Service, ServiceKey,
    SignalKind,
};

use crate::{
    affinity,
    handshake::{self, be32_at},
    http, icmp,
    maps::{config, selection_slot_id, ADDR_FILTER, BACKENDS, CONNECTIONS, SERVICES},
    migration,
    packet::{End, Endpoint, Packet},
    parse::{parse, tcp_lengths, Classified, Parsed, L4_OFF, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    stats,
};

/// What happened to a packet; each hook maps it to its own return code.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not lb's packet (or not rewritable by rule): untouched.
    Pass,
    /// Original direction, destination rewritten to the backend.
    Forwarded,
    /// Reply, source rewritten to the VIP.
    Replied,
    /// A backend's refusal rewritten into the client's SYN to another backend: the packet
    /// now travels client → backend and must be routed there from where it arrived.
    Resent,
    Drop,
}

/// Entries are refreshed at most this often, so an established flow mostly reads.
const REFRESH_NS: u64 = 1_000_000_000;

#[inline(always)]
pub fn process<P: Packet>(pkt: &mut P) -> Outcome {
    let (outcome, counter) = match parse(pkt.data(), pkt.data_end()) {
        Ok(Classified::Flow(parsed)) => handle(pkt, &parsed),
        Ok(Classified::IcmpError(outer_src)) => {
            icmp::handle(pkt, outer_src, unsafe { bpf_ktime_get_coarse_ns() })
        }
        Err(u) => (
            if u.drop { Outcome::Drop } else { Outcome::Pass },
            u.counter,
        ),
    };
    stats::count(counter);
    outcome
}

/// May `addr` be a VIP (or a backend, by `role`)? A clear bit means certainly not.
#[inline(always)]
fn maybe(addr: &AddrBe, role: AddrRole) -> bool {
    let (word, bit) = addr_filter_slot(addr, role);
    match ADDR_FILTER.get(word) {
        Some(w) => w & (1u64 << bit) != 0,
        None => true,
    }
}

#[inline(always)]
fn handle<P: Packet>(pkt: &mut P, p: &Parsed) -> (Outcome, Counter) {
    // Original-direction packets go to a VIP, replies come from a backend.
    if !maybe(&p.flow.dst, AddrRole::Vip) && !maybe(&p.flow.src, AddrRole::Backend) {
        return (Outcome::Pass, Counter::PassNotService);
    }
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let mut entry = CONNECTIONS.get_ptr_mut(&p.flow);
    if entry.is_none() {
        let migrating = migration::flags();
        if migrating != 0 && migration::adopt(migrating, &p.flow) {
            entry = CONNECTIONS.get_ptr_mut(&p.flow);
        }
    }
    if let Some(entry) = entry {
        // SAFETY: pointer to a live map value returned by the kernel.
        let entry = unsafe { &mut *entry };
        if let Some(result) = tracked(pkt, p, entry, now) {
            return result;
        }
    }
    let key = ServiceKey {
        addr: p.flow.dst,
        port_be: p.flow.dst_port_be,
        proto: p.flow.proto,
        family: p.flow.family,
    };
    match SERVICES.get_ptr(&key) {
        // SAFETY: pointer to a live map value returned by the kernel.
        Some(svc) if unsafe { (*svc).flags } & SERVICE_TLS != 0 => {
            // Terminated on this host by the TLS forwarder: no rewrite, no tracking. A
            // new connection while no forwarder listens (the agent restarting) is held
            // back: the client's retransmitted SYN finds the next agent.
            let syn = p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            if syn && !crate::tls_steer::listening() {
                return (Outcome::Drop, Counter::DropTlsNoForwarder);
            }
            (Outcome::Pass, Counter::PassTlsOrigination)
        }
        // SAFETY: pointer to a live map value returned by the kernel.
        Some(svc) => new_connection(pkt, p, unsafe { &*svc }, now),
        None => (Outcome::Pass, Counter::PassNotService),
    }
}

/// Idle timeout of an entry in `state`.
///
/// All four settings are loaded and one is selected by value: selecting by address lets
/// the compiler compute `config + f(state)`, an offset the verifier cannot bound.
#[inline(always)]
fn timeout_ns(state: u8) -> u64 {
    let cfg = config();
    // SAFETY: plain reads of a valid static; volatile so each is a real load.
    let (syn, established, closing, udp) = unsafe {
        (
            core::ptr::read_volatile(&cfg.tcp_syn_timeout_ns),
            core::ptr::read_volatile(&cfg.tcp_established_timeout_ns),
            core::ptr::read_volatile(&cfg.tcp_closing_timeout_ns),
            core::ptr::read_volatile(&cfg.udp_timeout_ns),
        )
    };
    if state == ConnState::TcpEstablished as u8 {
        established
    } else if state == ConnState::TcpClosing as u8 {
        closing
    } else if state == ConnState::Udp as u8 {
        udp
    } else {
        syn
    }
}

/// Whether `entry` has been idle longer than its state allows (then it no longer stands).
#[inline(always)]
pub fn expired(entry: &ConnEntry, now: u64) -> bool {
    now.saturating_sub(entry.last_seen_ns) > timeout_ns(entry.state)
}

/// The state a TCP entry moves to when a packet with `flags` passes.
#[inline(always)]
fn next_tcp_state(current: u8, flags: u8) -> u8 {
    if flags & (TCP_FIN | TCP_RST) != 0 {
        ConnState::TcpClosing as u8
    } else if current == ConnState::TcpSyn as u8 && flags & TCP_ACK != 0 && flags & TCP_SYN == 0 {
        ConnState::TcpEstablished as u8
    } else {
        current
    }
}

/// Handles a packet whose 5-tuple has an entry. `None` means the entry no longer stands
/// (expired, or a closed TCP connection whose ports are reused by a new SYN), and the
/// packet is treated as untracked.
#[inline(always)]
fn tracked<P: Packet>(
    pkt: &mut P,
    p: &Parsed,
    entry: &mut ConnEntry,
    now: u64,
) -> Option<(Outcome, Counter)> {
    if expired(entry, now) {
        return None;
    }
    let is_tcp = p.flow.proto == proto::TCP;
    let original = entry.direction == ConnDirection::Original as u8;
    if is_tcp && original && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        if entry.state == ConnState::TcpClosing as u8 {
            return None;
        }
        // A SYN with another initial sequence number while the entry's handshake is
        // pending: a new attempt on the same ports. The client gave up on the one this
        // entry tracks (a socket closed while connecting sends nothing), so it starts
        // over as a new connection, and the old attempt's backend side goes.
        if entry.state == ConnState::TcpSyn as u8
            && be32_at(pkt.data(), pkt.data_end(), L4_OFF + 4) != Some(entry.syn_isn)
        {
            let _ = CONNECTIONS.remove(&partner_key(&p.flow, entry));
            return None;
        }
    }
    let state = if is_tcp {
        next_tcp_state(entry.state, p.tcp_flags)
    } else {
        entry.state
    };
    if is_tcp && !original {
        backend_signals(entry, p.tcp_flags);
        if p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
            entry.flags |= CONN_SYNACK_SEEN;
        }
        if entry.state == ConnState::TcpSyn as u8 && p.tcp_flags & TCP_RST != 0 {
            if let Some(result) = refused(pkt, p, entry, now) {
                // `entry` left the table: the connection now waits on another backend.
                return Some(result);
            }
        } else {
            if entry.state == ConnState::TcpSyn as u8
                && entry.flags & CONN_SYNACK_SEEN == 0
                && p.tcp_flags & (TCP_SYN | TCP_RST | TCP_ACK) == TCP_ACK
            {
                if let Some(result) = resteer_syn_answer(pkt, p, entry, now, SynAnswer::Stale) {
                    // `entry` left the table: the connection now waits on another backend.
                    return Some(result);
                }
            }
            if entry.flags & CONN_HTTP != 0
                // Established, or closing with this segment: a response sent with FIN.
                && (state == ConnState::TcpEstablished as u8
                    || entry.state == ConnState::TcpEstablished as u8)
                && p.tcp_flags & (TCP_SYN | TCP_RST) == 0
            {
                http::response_status(pkt, entry);
            }
        }
    } else if is_tcp
        && entry.state == ConnState::TcpSyn as u8
        && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    {
        syn_again(pkt, p, entry, now);
    }
    if state != entry.state || now.saturating_sub(entry.last_seen_ns) > REFRESH_NS {
        entry.state = state;
        entry.last_seen_ns = now;
        // Keep the other direction's entry alive and in step, so a connection that is
        // busy one way does not lose its translation the other way.
        if let Some(partner) = CONNECTIONS.get_ptr_mut(partner_key(&p.flow, entry)) {
            // SAFETY: pointer to a live map value returned by the kernel.
            let partner = unsafe { &mut *partner };
            // Under the partner's key may be another connection's entry: a reply entry of
            // an older connection on the same client ports, left under the backend it was
            // re-steered to, finds the original entry of the connection that now uses
            // the ports. Both entries of one connection always name the same backend.
            if partner.backend_id == entry.backend_id {
                // TCP states only move forward (handshake, established, closing): once the
                // client completes the handshake, the backend's side is established too,
                // so a later RST or ICMP error from the backend is not taken for a refused
                // connect.
                if state != ConnState::Udp as u8 && partner.state < state {
                    partner.state = state;
                }
                partner.last_seen_ns = now;
            }
        }
    }

    let nat = Endpoint {
        addr: entry.nat_addr.0[0],
        port: entry.nat_port_be,
    };
    let (end, old, outcome, counter) = if original {
        let old = Endpoint {
            addr: p.flow.dst.0[0],
            port: p.flow.dst_port_be,
        };
        (End::Dst, old, Outcome::Forwarded, Counter::ForwardTracked)
    } else {
        let old = Endpoint {
            addr: p.flow.src.0[0],
            port: p.flow.src_port_be,
        };
        (End::Src, old, Outcome::Replied, Counter::ReplyTracked)
    };
    let (service_id, backend_id) = (entry.service_id, entry.backend_id);
    if pkt.rewrite(end, p.flow.proto, old, nat).is_err() {
        return Some((Outcome::Drop, Counter::DropRewriteFailed));
    }
    stats::traffic(service_id, backend_id, pkt.len(), false);
    Some((outcome, counter))
}

/// What a packet from the backend says about it: a SYN-ACK is a connect success, an RST
/// answering the SYN a refused connect, an RST later a reset of an established connection.
#[inline(always)]
fn backend_signals(entry: &ConnEntry, flags: u8) {
    let handshaking = entry.state == ConnState::TcpSyn as u8;
    if flags & TCP_RST != 0 {
        let kind = if handshaking {
            SignalKind::ConnectRefused
        } else if entry.state == ConnState::TcpEstablished as u8 {
            SignalKind::EstablishedReset
        } else {
            return;
        };
        stats::signal(kind, entry.service_id, entry.backend_id);
    } else if handshaking && flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
        stats::handshake(entry.backend_id);
    }
}

/// A backend refused the connection's SYN (RST). When the client has not completed the
/// handshake, the RST answers the SYN lb sent, and another backend is eligible, the RST is
/// rewritten into the client's SYN to that backend (or, failing that, held back so the
/// client's retransmission goes there). `None`: the refusal goes on to the client.
#[inline(always)]
fn refused<P: Packet>(
    pkt: &mut P,
    p: &Parsed,
    entry: &ConnEntry,
    now: u64,
) -> Option<(Outcome, Counter)> {
    let result = resteer_syn_answer(pkt, p, entry, now, SynAnswer::Refusal);
    if result.is_none() {
        stats::count(Counter::EventRefusalPassed);
    }
    result
}

/// How a backend answered the SYN lb sent it, when the answer is not a SYN-ACK.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SynAnswer {
    /// RST|ACK acknowledging the SYN (ack = ISN + 1): nothing listens.
    Refusal,
    /// A bare ACK that does not acknowledge the SYN: the backend's kernel still holds an
    /// older connection on the same addresses and ports (typically in TIME_WAIT, when the
    /// client reuses a port and the SYN fails the timestamp check) and answers with that
    /// connection's ACK. The client would reset it and send its SYN again about 10 ms
    /// later; lb sends the SYN to the next backend at once instead. Not a failure of the
    /// backend: no signal.
    Stale,
}

/// The SYN of a connection still in its handshake was answered by `answer`: re-sends the
/// client's SYN to the next backend of the failover list, rewriting this packet into it
/// (or, failing that, holds the answer back so the client's retransmission goes there).
/// `None`: no re-send (budget used up, no other eligible backend, not an answer to lb's
/// SYN); the packet goes on to the client.
#[inline(always)]
fn resteer_syn_answer<P: Packet>(
    pkt: &mut P,
    p: &Parsed,
    entry: &ConnEntry,
    now: u64,
    answer: SynAnswer,
) -> Option<(Outcome, Counter)> {
    let orig_key = handshake::original_key(&p.flow, entry);
    // SAFETY: pointer to a live map value returned by the kernel.
    let orig = unsafe { &mut *CONNECTIONS.get_ptr_mut(&orig_key)? };
    let ack = be32_at(pkt.data(), pkt.data_end(), L4_OFF + 8)?;
    let acknowledges_syn = ack == orig.syn_isn.wrapping_add(1);
    let answers = match answer {
        SynAnswer::Refusal => p.tcp_flags & TCP_ACK != 0 && acknowledges_syn,
        // An older connection's ACK carries no data; a segment with data before the
        // backend's SYN-ACK is not something lb should guess about.
        SynAnswer::Stale => !acknowledges_syn && tcp_lengths(pkt.data(), pkt.data_end())?.1 == 0,
    };
    if orig.state != ConnState::TcpSyn as u8 || !answers {
        return None;
    }
    let (client, client_port_be) = (p.flow.dst.0[0], p.flow.dst_port_be);
    let to = handshake::resteer(&orig_key, orig, now)?;
    if handshake::rewrite_as_syn(pkt, client, client_port_be, &to, orig).is_ok() {
        stats::traffic(orig.service_id, orig.backend_id, pkt.len(), false);
        Some((Outcome::Resent, Counter::ForwardResteered))
    } else {
        orig.flags |= CONN_AWAIT_RETRANSMIT;
        Some((Outcome::Drop, Counter::DropRefusalHeld))
    }
}

/// The client sent its SYN again while the handshake is pending. After a held-back
/// refusal this is the retransmission lb waited for; otherwise, when the backend had time
/// to answer, it is a connect timeout: reported, and the SYN goes to another backend.
#[inline(always)]
fn syn_again<P: Packet>(pkt: &P, p: &Parsed, entry: &mut ConnEntry, now: u64) {
    if be32_at(pkt.data(), pkt.data_end(), L4_OFF + 4) != Some(entry.syn_isn) {
        return;
    }
    if entry.flags & CONN_AWAIT_RETRANSMIT != 0 {
        entry.flags &= !CONN_AWAIT_RETRANSMIT;
        entry.last_seen_ns = now;
        return;
    }
    if now.saturating_sub(entry.last_seen_ns) < SYN_RETRANSMIT_MIN_NS {
        return;
    }
    stats::signal(
        SignalKind::ConnectTimeout,
        entry.service_id,
        entry.backend_id,
    );
    if handshake::resteer(&p.flow, entry, now).is_some() {
        stats::count(Counter::EventTimeoutResteered);
    } else {
        // Same backend again; its next silence is another timeout.
        entry.last_seen_ns = now;
    }
}

/// The key under which the other direction of `entry`'s connection is tracked.
#[inline(always)]
pub fn partner_key(flow: &FlowKey, entry: &ConnEntry) -> FlowKey {
    if entry.direction == ConnDirection::Original as u8 {
        // client → VIP; the reply travels backend → client.
        FlowKey {
            src: entry.nat_addr,
            dst: flow.src,
            src_port_be: entry.nat_port_be,
            dst_port_be: flow.src_port_be,
            ..*flow
        }
    } else {
        // backend → client; the original travelled client → VIP.
        FlowKey {
            src: flow.dst,
            dst: entry.nat_addr,
            src_port_be: flow.dst_port_be,
            dst_port_be: entry.nat_port_be,
            ..*flow
        }
    }
}

/// Picks an active backend from the service's selection table: the flow's slot, then up
/// to `MAX_RESELECT - 1` following slots when that backend is not active.
#[inline(always)]
pub fn select(svc: &Service, hash: u32) -> Result<(u32, lb_common::Backend, bool), Counter> {
    if svc.table_len == 0 {
        return Err(Counter::DropNoBackend);
    }
    lb_common::selection::select(
        svc.table_offset,
        svc.table_len,
        hash,
        selection_slot_id,
        |id| BACKENDS.get(id),
    )
    .ok_or(Counter::DropNoActiveBackend)
}

#[inline(always)]
fn new_connection<P: Packet>(
    pkt: &mut P,
    p: &Parsed,
    svc: &Service,
    now: u64,
) -> (Outcome, Counter) {
    let is_tcp = p.flow.proto == proto::TCP;
    let starts_connection = !is_tcp || p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if !starts_connection {
        // The table lost this flow (evicted or expired). The flow hash gives the same
        // backend as long as the selection table has not changed since.
        stats::count(Counter::EventMidflowMiss);
    }
    // Session affinity: the client's backend, when it has one that stands.
    let chosen = if svc.flags & SERVICE_AFFINITY != 0 {
        affinity::select(svc, &p.flow, now)
    } else {
        select(svc, flow_hash(&p.flow))
    };
    let (backend_id, backend, reselected) = match chosen {
        Ok(chosen) => chosen,
        Err(counter) => return (Outcome::Drop, counter),
    };
    if reselected {
        stats::count(Counter::EventReselected);
    }

    let state = if !is_tcp {
        ConnState::Udp as u8
    } else if starts_connection {
        ConnState::TcpSyn as u8
    } else {
        next_tcp_state(ConnState::TcpEstablished as u8, p.tcp_flags)
    };
    let mut original = ConnEntry {
        nat_addr: backend.addr,
        nat_port_be: backend.port_be,
        direction: ConnDirection::Original as u8,
        state,
        backend_id,
        service_id: svc.id,
        first_backend_id: backend_id,
        last_seen_ns: now,
        created_ns: now,
        flags: if svc.flags & SERVICE_HTTP != 0 {
            CONN_HTTP
        } else {
            0
        },
        ..ConnEntry::default()
    };
    if is_tcp && starts_connection {
        // Kept so a refused or unanswered SYN can be sent to another backend.
        if let Some(offer) = handshake::read_syn(pkt, p.tcp_flags) {
            offer.keep_in(&mut original);
        }
    }
    let reply = ConnEntry {
        nat_addr: p.flow.dst,
        nat_port_be: p.flow.dst_port_be,
        direction: ConnDirection::Reply as u8,
        ..original
    };
    let reply_key = partner_key(&p.flow, &original);
    if CONNECTIONS.insert(&reply_key, &reply, 0).is_ok()
        && CONNECTIONS.insert(&p.flow, &original, 0).is_ok()
    {
        stats::count(Counter::EventTracked);
        let migrating = migration::flags();
        if migrating != 0 {
            migration::mirror(migrating, &reply_key, &reply);
            migration::mirror(migrating, &p.flow, &original);
        }
    } else {
        // Still balanced: later packets re-select by hash to the same backend.
        stats::count(Counter::EventTrackFailed);
    }

    let old = Endpoint {
        addr: p.flow.dst.0[0],
        port: p.flow.dst_port_be,
    };
    let new = Endpoint {
        addr: backend.addr.0[0],
        port: backend.port_be,
    };
    if pkt.rewrite(End::Dst, p.flow.proto, old, new).is_err() {
        return (Outcome::Drop, Counter::DropRewriteFailed);
    }
    stats::traffic(svc.id, backend_id, pkt.len(), true);
    (Outcome::Forwarded, Counter::ForwardNew)
}
