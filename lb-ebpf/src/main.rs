//! lb's data plane: per-connection L4 load balancing with connection tracking and NAT.
//!
//! Three thin entry points share one core (`datapath::process`):
//! - `lb_xdp`: XDP on ingress, for NICs with XDP;
//! - `lb_tc_ingress`: TC (clsact) ingress, for everything else;
//! - `lb_tc_egress`: TC egress, for connections the node itself opens to a VIP;
//! - `lb_sk_lookup` (`tls_steer`): the connections of TLS-originating frontends, to the
//!   agent's TLS forwarder.
//!
//! The core parses, looks up the connection table, picks a backend for new connections
//! and rewrites addresses. The entries only translate its outcome into their verdicts.
// no_std/no_main only for the BPF target, so clippy can check this crate on the host.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod affinity;
mod datapath;
mod handshake;
mod http;
mod icmp;
mod maps;
mod migration;
mod packet;
mod parse;
mod route;
mod stats;
mod tls_steer;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use datapath::Outcome;
use packet::{TcPacket, XdpPacket, TC_ACT_OK, TC_ACT_SHOT};
use route::Hook;

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let mut pkt = XdpPacket::new(ctx);
    match datapath::process(&mut pkt) {
        Outcome::Pass => xdp_action::XDP_PASS,
        // Rewritten: lb redirects it to the backend's or client's interface itself
        // (`route`), or the stack routes it when lb cannot.
        Outcome::Forwarded | Outcome::Replied | Outcome::Resent => pkt.forward(),
        Outcome::Drop => xdp_action::XDP_DROP,
    }
}

#[classifier]
pub fn lb_tc_ingress(ctx: TcContext) -> i32 {
    let mut pkt = TcPacket::new(ctx);
    match datapath::process(&mut pkt) {
        Outcome::Pass => TC_ACT_OK,
        // Rewritten: lb sends it on to the backend or the client itself, without a second
        // routing by the stack (`route`). A refusal turned into a SYN to another backend
        // goes the same way (it came in from the refusing backend's side).
        Outcome::Forwarded | Outcome::Replied | Outcome::Resent => pkt.forward(Hook::TcIngress),
        Outcome::Drop => TC_ACT_SHOT,
    }
}

#[classifier]
pub fn lb_tc_egress(ctx: TcContext) -> i32 {
    let mut pkt = TcPacket::new(ctx);
    match datapath::process(&mut pkt) {
        // The route the node chose was the VIP's; after DNAT the packet must leave
        // towards the backend instead.
        Outcome::Forwarded | Outcome::Resent => pkt.forward(Hook::TcEgress),
        Outcome::Pass | Outcome::Replied => TC_ACT_OK,
        Outcome::Drop => TC_ACT_SHOT,
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    panic!("lb's eBPF programs are built for the BPF target only (see lb-userspace/build.rs)");
}
