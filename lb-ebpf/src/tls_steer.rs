//! `lb_sk_lookup`: hands the connections of TLS-originating frontends to the agent's TLS
//! forwarder.
//!
//! A `SERVICE_TLS` frontend's VIP is a local address (a `local` route), so its SYNs are
//! delivered to this host; TC and XDP pass them untouched. When the kernel looks for the
//! listening socket of such a SYN, this program, attached to the network namespace,
//! picks the forwarder's listener from `TLS_LISTENER` whatever address it is bound to.
//! The accepted socket keeps the SYN's addresses: its local address is the VIP and port
//! the client called, which is how the forwarder knows the frontend.
//!
//! Everything else is passed on to the kernel's own lookup, and so is a TLS frontend's
//! SYN while the slot is empty (this program's agent stopping): the next agent's program,
//! attached meanwhile, places it (an `SK_DROP` here would refuse it for every program).
//! With no listener anywhere the kernel answers with a reset; so TC and XDP drop such
//! SYNs first ([`listening`]), and the client sends them again after its retransmission
//! timeout, to the next agent: a restart does not refuse connections that enter the
//! node. (The node's own connections, over loopback, meet no TC or XDP program and are
//! refused.)

use aya_ebpf::{
    bindings::{bpf_sk_lookup, sk_action},
    helpers::{bpf_map_lookup_elem, bpf_sk_release},
    macros::{map, sk_lookup},
    maps::SockMap,
    programs::SkLookupContext,
};
use lb_common::{family, maps::SERVICE_TLS, proto, AddrBe, ServiceKey};

use crate::maps::SERVICES;

#[map(name = "lb_tls_lsn_v1")]
pub static TLS_LISTENER: SockMap = SockMap::with_max_entries(1, 0);

/// `bpf_sk_lookup.family` for IPv4.
const AF_INET: u32 = 2;

#[sk_lookup]
pub fn lb_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the context the kernel passes; its fields are plain reads.
    let lookup: &bpf_sk_lookup = unsafe { &*ctx.lookup };
    if lookup.family != AF_INET || lookup.protocol != proto::TCP as u32 {
        return sk_action::SK_PASS;
    }
    // `local_ip4` is in network order; `local_port` is in host order.
    let key = ServiceKey {
        addr: AddrBe([lookup.local_ip4, 0, 0, 0]),
        port_be: (lookup.local_port as u16).to_be(),
        proto: proto::TCP,
        family: family::V4,
    };
    // SAFETY: a map value the kernel returned, read at once.
    let Some(svc) = (unsafe { SERVICES.get(key) }) else {
        return sk_action::SK_PASS;
    };
    if svc.flags & SERVICE_TLS == 0 {
        return sk_action::SK_PASS;
    }
    // Placed or not, the lookup goes on (see above).
    let _ = TLS_LISTENER.redirect_sk_lookup(&ctx, 0, 0);
    sk_action::SK_PASS
}

/// Whether the forwarder's listener is in its slot (an agent runs).
#[inline(always)]
pub fn listening() -> bool {
    let slot: u32 = 0;
    // SAFETY: a lookup in a SOCKMAP returns a referenced socket (or null), released here
    // on the only path that has one, as the verifier requires.
    unsafe {
        let sk = bpf_map_lookup_elem(
            core::ptr::addr_of!(TLS_LISTENER) as *mut core::ffi::c_void,
            core::ptr::addr_of!(slot) as *const core::ffi::c_void,
        );
        if sk.is_null() {
            return false;
        }
        bpf_sk_release(sk);
    }
    true
}
