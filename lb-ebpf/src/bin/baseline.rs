//! Reference programs for the benchmark: trivial XDP and TC programs (the cost of running
//! any program at all, which the benchmark subtracts from lb's own figures), and programs
//! that only forward a packet as lb does after a rewrite (a route lookup, the next hop's
//! MAC addresses written, a redirect): the part of lb's figures that is forwarding.
// no_std/no_main only for the BPF target, so clippy can check this crate on the host.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use core::mem::size_of;

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action, BPF_FIB_LKUP_RET_SUCCESS},
    helpers::{bpf_fib_lookup, bpf_redirect},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
    EbpfContext,
};

#[xdp]
pub fn baseline_xdp(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[classifier]
pub fn baseline_tc(_ctx: TcContext) -> i32 {
    0 // TC_ACT_OK
}

#[xdp]
pub fn forward_xdp(ctx: XdpContext) -> u32 {
    // SAFETY: the xdp_md of a valid XDP context.
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    match forward(ctx.as_ptr(), ctx.data(), ctx.data_end(), ifindex, true) {
        Some(to) => {
            // SAFETY: a plain helper call; the kernel checks the ifindex.
            unsafe { bpf_redirect(to, 0) as u32 }
        }
        None => xdp_action::XDP_PASS,
    }
}

#[classifier]
pub fn forward_tc(ctx: TcContext) -> i32 {
    // SAFETY: the skb of a valid TC context.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    match forward(ctx.as_ptr(), ctx.data(), ctx.data_end(), ifindex, false) {
        // SAFETY: a plain helper call; the kernel checks the ifindex.
        Some(to) => unsafe { bpf_redirect(to, 0) as i32 },
        None => 0,
    }
}

/// The FIB lookup of an IPv4 packet's destination, and its MAC addresses written: the
/// egress ifindex, or `None` when the lookup did not find a next hop.
#[inline(always)]
fn forward(
    ctx: *mut core::ffi::c_void,
    data: usize,
    data_end: usize,
    ifindex: u32,
    xdp: bool,
) -> Option<u32> {
    const ETH_LEN: usize = 14;
    if data + ETH_LEN + 20 > data_end {
        return None;
    }
    let ip = (data + ETH_LEN) as *const u8;
    // SAFETY: bounds checked above.
    let (proto, tot_len, src, dst) = unsafe {
        (
            *ip.add(9),
            u16::from_be_bytes([*ip.add(2), *ip.add(3)]),
            (ip.add(12) as *const u32).read_unaligned(),
            (ip.add(16) as *const u32).read_unaligned(),
        )
    };
    // SAFETY: plain data; all-zero is a valid starting value.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = 2; // AF_INET
    fib.l4_protocol = proto;
    fib.__bindgen_anon_1.tot_len = if xdp { tot_len } else { 0 };
    fib.ifindex = ifindex;
    fib.__bindgen_anon_3.ipv4_src = src;
    fib.__bindgen_anon_4.ipv4_dst = dst;
    // SAFETY: a valid context and a parameter block of the size given.
    let rc = unsafe { bpf_fib_lookup(ctx, &mut fib, size_of::<FibParams>() as i32, 0) };
    if rc as u32 != BPF_FIB_LKUP_RET_SUCCESS {
        return None;
    }
    let eth = data as *mut [u8; 6];
    // SAFETY: the Ethernet header is within bounds (checked above).
    unsafe {
        eth.write_unaligned(fib.dmac);
        eth.add(1).write_unaligned(fib.smac);
    }
    Some(fib.ifindex)
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
