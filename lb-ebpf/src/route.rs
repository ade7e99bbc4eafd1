//! After a rewrite, lb forwards the packet itself instead of handing it back to the node's
//! IP stack to be routed a second time (as Cilium's BPF host routing and Katran's XDP_TX
//! do): a FIB lookup (`bpf_fib_lookup`, the node's own routing table and neighbours) gives
//! the egress interface and the next hop's MAC address; the TTL is decremented as a router
//! does, and the packet is redirected there.
//!
//! When the next hop's MAC is not known yet, TC's `bpf_redirect_neigh` resolves it in the
//! kernel; XDP leaves such a packet to the stack, which resolves it for the packets after.
//! XDP redirects only to interfaces the agent put in `XDP_TARGETS` (those whose driver
//! takes XDP frames: a veth only when its peer has an XDP program or GRO). Whenever the lookup says the stack must decide, the packet goes to the stack as
//! before, the reason counted (`event_stack_*`):
//! - `frag_needed`: larger than the egress MTU (the stack fragments or sends ICMP);
//! - `ttl`: TTL 1 or 0 (the stack sends ICMP time exceeded);
//! - `not_unicast`: delivered on this node (a reply to a connection the node itself made
//!   to a VIP), broadcast, multicast, or no route at all;
//! - `not_forwarded`: a route lb does not follow: blackhole, unreachable, prohibit, a
//!   lightweight tunnel, forwarding disabled on the interface;
//! - `xdp_target` (XDP): the egress interface cannot take XDP frames;
//! - `no_neigh` (XDP): the next hop's MAC is not known yet.
//!
//! Skipping the stack also skips what it does in between: netfilter's FORWARD and
//! POSTROUTING hooks (as with Cilium's host routing) and its forwarding counters.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NOT_FWDED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH,
    },
    helpers::bpf_fib_lookup,
};
use lb_common::{
    csum,
    maps::{nexthop_slot, NextHop},
    Counter,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    maps::{NEXTHOP_CACHE, ROUTING_GENERATION, XDP_TARGETS},
    packet::Packet,
    parse::{header_at, ETH_LEN},
    stats,
};

const AF_INET: u8 = 2;
/// Offset of the IPv4 header's TTL and protocol, one 16-bit word for the checksum.
const TTL_OFF: usize = ETH_LEN + 8;
const IP_CHECK_OFF: usize = ETH_LEN + 10;

/// Where a rewritten packet goes.
pub enum Next {
    /// To `ifindex`: the TTL was decremented and the next hop's MAC addresses written.
    Redirect { ifindex: u32 },
    /// TC: to `ifindex`, the next hop not yet resolved: `bpf_redirect_neigh` resolves it.
    ResolveNeighbour { ifindex: u32 },
    /// To the stack, for the counted reason; the packet is as the rewrite left it.
    Stack(Counter),
}

/// The hook a rewritten packet leaves from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// TC ingress: a packet arriving at the node, forwarded as a router does.
    TcIngress,
    /// TC egress: the node's own packet after DNAT; the route the node chose was the
    /// VIP's, and its TTL is not decremented (it has not crossed a router yet).
    TcEgress,
    /// XDP: as TC ingress, but only to the interfaces in `XDP_TARGETS`, and only with
    /// the next hop's MAC known (XDP cannot resolve neighbours).
    Xdp,
}

/// Looks up the route of `pkt` (an IPv4 packet after its rewrite) as the node would
/// forward it from `ingress_ifindex`, and decrements its TTL when lb forwards it. `ctx` is
/// the hook's context (skb or xdp_md), which the helper needs. On TC the kernel checks
/// the egress MTU against the skb itself, which knows GSO (a GRO-merged skb is larger than
/// the MTU and still forwardable); for XDP the IPv4 length is checked. Nothing in the
/// packet changes unless lb forwards it (a packet for the stack keeps its TTL and MACs).
#[inline(always)]
pub fn next<P: Packet>(
    pkt: &mut P,
    ctx: *mut core::ffi::c_void,
    ingress_ifindex: u32,
    hook: Hook,
) -> Next {
    let Some(ip) = header_at::<Ipv4Hdr>(pkt.data(), pkt.data_end(), ETH_LEN) else {
        return Next::Stack(Counter::EventStackNotForwarded);
    };
    // SAFETY: bounds checked by header_at.
    let (ttl, protocol, check, tot_len, src, dst) = unsafe {
        let ip = &*ip;
        (
            ip.ttl,
            ip.proto,
            u16::from_ne_bytes(ip.check),
            u16::from_be_bytes(ip.tot_len),
            u32::from_ne_bytes(ip.src_addr),
            u32::from_ne_bytes(ip.dst_addr),
        )
    };
    let routed = hook != Hook::TcEgress;
    if routed && ttl <= 1 {
        return Next::Stack(Counter::EventStackTtl);
    }
    // The next-hop cache: where this destination was routed from this interface under
    // the current routing generation. A packet longer than the route's MTU takes the full
    // lookup, which decides (GSO, fragmentation needed).
    let generation = ROUTING_GENERATION.get(0).copied().unwrap_or(0);
    let slot = nexthop_slot(dst, ingress_ifindex);
    let cached = if generation != 0 {
        NEXTHOP_CACHE.get_ptr_mut(slot)
    } else {
        None
    };
    // Whether the slot already holds this destination's current next hop: a packet
    // longer than its MTU (a GRO-merged skb, say) is looked up without rewriting it.
    let mut current = false;
    if let Some(nh) = cached {
        // SAFETY: pointer to this CPU's live map value returned by the kernel.
        let nh = unsafe { &*nh };
        current =
            nh.generation == generation && nh.dst == dst && nh.ingress_ifindex == ingress_ifindex;
        if current && u32::from(tot_len) <= nh.mtu {
            // The XDP targets change apart from routing: checked for every packet.
            if hook == Hook::Xdp && XDP_TARGETS.get(nh.ifindex).is_none() {
                return Next::Stack(Counter::EventStackXdpTarget);
            }
            let (ifindex, smac, dmac) = (nh.ifindex, nh.smac, nh.dmac);
            let next = send_to(pkt, routed, (ttl, protocol, check), ifindex, smac, dmac);
            if matches!(next, Next::Redirect { .. }) {
                stats::count(Counter::EventNexthopCached);
            }
            return next;
        }
    }
    // SAFETY: plain data; all-zero is a valid starting value.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = protocol;
    fib.__bindgen_anon_1.tot_len = if hook == Hook::Xdp { tot_len } else { 0 };
    fib.ifindex = ingress_ifindex;
    fib.__bindgen_anon_3.ipv4_src = src;
    fib.__bindgen_anon_4.ipv4_dst = dst;
    // SAFETY: a valid context and a parameter block of the size given.
    let rc = unsafe { bpf_fib_lookup(ctx, &mut fib, size_of::<FibParams>() as i32, 0) } as u32;
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {
            // An XDP frame redirected to a device that cannot take it is dropped after
            // the program (by the driver): only the agent's known targets, checked before
            // anything in the packet changes.
            if hook == Hook::Xdp && XDP_TARGETS.get(fib.ifindex).is_none() {
                return Next::Stack(Counter::EventStackXdpTarget);
            }
            if let Some(nh) = cached.filter(|_| !current) {
                let mtu = route_mtu(ctx, &fib, ingress_ifindex);
                // SAFETY: pointer to this CPU's live map value returned by the kernel.
                unsafe {
                    *nh = NextHop {
                        dst,
                        ingress_ifindex,
                        generation,
                        ifindex: fib.ifindex,
                        mtu,
                        smac: fib.smac,
                        dmac: fib.dmac,
                    }
                };
            }
            send_to(
                pkt,
                routed,
                (ttl, protocol, check),
                fib.ifindex,
                fib.smac,
                fib.dmac,
            )
        }
        BPF_FIB_LKUP_RET_NO_NEIGH if hook == Hook::Xdp => Next::Stack(Counter::EventStackNoNeigh),
        BPF_FIB_LKUP_RET_NO_NEIGH => {
            if routed && decrement_ttl(pkt, ttl, protocol, check).is_err() {
                return Next::Stack(Counter::EventStackNotForwarded);
            }
            Next::ResolveNeighbour {
                ifindex: fib.ifindex,
            }
        }
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Next::Stack(Counter::EventStackFragNeeded),
        // Local delivery (a reply to the node's own connection), broadcast, multicast,
        // or no route.
        BPF_FIB_LKUP_RET_NOT_FWDED => Next::Stack(Counter::EventStackNotUnicast),
        _ => Next::Stack(Counter::EventStackNotForwarded),
    }
}

/// The packet made ready for the next hop `ifindex`: TTL − 1 when `routed` (`ip`: its
/// TTL, protocol and header checksum as read), the next hop's MAC addresses written.
#[inline(always)]
fn send_to<P: Packet>(
    pkt: &mut P,
    routed: bool,
    ip: (u8, u8, u16),
    ifindex: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
) -> Next {
    let (ttl, protocol, check) = ip;
    if routed && decrement_ttl(pkt, ttl, protocol, check).is_err() {
        return Next::Stack(Counter::EventStackNotForwarded);
    }
    let Some(eth) = header_at::<EthHdr>(pkt.data(), pkt.data_end(), 0) else {
        return Next::Stack(Counter::EventStackNotForwarded);
    };
    // SAFETY: bounds checked by header_at; the Ethernet header is linear in both contexts.
    unsafe {
        (*eth).dst_addr = dmac;
        (*eth).src_addr = smac;
    }
    Next::Redirect { ifindex }
}

/// The MTU of the route `found` holds (the parameters as the lookup left them): asked of a
/// second lookup with the largest IPv4 length, which answers "fragmentation needed" with
/// the MTU. 0 (never a cache hit) when it does not.
#[inline(always)]
fn route_mtu(ctx: *mut core::ffi::c_void, found: &FibParams, ingress_ifindex: u32) -> u32 {
    let mut fib = *found;
    fib.__bindgen_anon_1.tot_len = u16::MAX;
    // The lookup wrote the egress interface over the ingress one.
    fib.ifindex = ingress_ifindex;
    // SAFETY: a valid context and a parameter block of the size given.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx,
            &mut fib,
            size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    } as u32;
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED {
        // SAFETY: reading the union's output member, which the kernel wrote.
        u32::from(unsafe { fib.__bindgen_anon_1.mtu_result })
    } else {
        0
    }
}

/// TTL - 1, and the IPv4 checksum changed to match (so the header's sum, and a
/// `CHECKSUM_COMPLETE` skb's `csum`, are unchanged).
#[inline(always)]
fn decrement_ttl<P: Packet>(pkt: &mut P, ttl: u8, protocol: u8, check: u16) -> Result<(), ()> {
    let old = u16::from_ne_bytes([ttl, protocol]);
    let new = u16::from_ne_bytes([ttl - 1, protocol]);
    let check = csum::replace2(check, old, new);
    pkt.store_u16(TTL_OFF, new)?;
    pkt.store_u16(IP_CHECK_OFF, check)
}
