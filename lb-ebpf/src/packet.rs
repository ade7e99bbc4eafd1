//! The two packet contexts (XDP and TC) behind one interface, so the core is written
//! once. They differ in how a rewrite keeps checksums right:
//! - XDP sees complete checksums (from the wire) and updates them in place (RFC 1624);
//! - TC uses the kernel's checksum helpers, which also handle `CHECKSUM_PARTIAL` skbs
//!   (locally generated or offloaded) and keep `skb->csum` right for `CHECKSUM_COMPLETE`.

use core::mem::offset_of;

use aya_ebpf::{
    bindings::{xdp_action, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::{
        bpf_redirect, bpf_redirect_neigh, bpf_skb_change_tail, bpf_skb_load_bytes,
        bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_load_bytes,
    },
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use lb_common::{csum, proto, Counter};
use network_types::{ip::Ipv4Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::{
    maps::XDP_TARGETS,
    parse::{header_at, ETH_LEN, L4_OFF, MAX_HEADERS},
    route::{self, Hook, Next},
    stats,
};

/// Which end of the packet a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Destination: DNAT, client → backend.
    Dst,
    /// Source: reverse NAT, backend → VIP.
    Src,
}

/// An address and port as they sit in the packet (network byte order).
#[derive(Clone, Copy)]
pub struct Endpoint {
    pub addr: u32,
    pub port: u16,
}

/// TC verdicts (`TC_ACT_OK`, `TC_ACT_SHOT` in linux/pkt_cls.h), as the `i32` a classifier
/// returns; aya's bindings type them differently per target.
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;

pub trait Packet {
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Bytes of the whole packet, for traffic counters.
    fn len(&self) -> u32;
    /// Rewrites one end's IPv4 address and L4 port, keeping the IPv4 and TCP/UDP
    /// checksums valid. `l4` is the IP protocol (TCP or UDP).
    fn rewrite(&mut self, end: End, l4: u8, old: Endpoint, new: Endpoint) -> Result<(), ()>;
    /// Writes raw bytes (network order as in memory) at `off`. The caller keeps every
    /// covering checksum right by writing its compensating change too, so the sum over
    /// the packet, and with it `skb->csum` of a `CHECKSUM_COMPLETE` skb, is unchanged.
    fn store_u16(&mut self, off: usize, v: u16) -> Result<(), ()>;
    fn store_u32(&mut self, off: usize, v: u32) -> Result<(), ()>;
    /// Writes `bytes` at `off`; the caller has made every checksum they cover right.
    fn store_bytes<const N: usize>(&mut self, off: usize, bytes: &[u8; N]) -> Result<(), ()>;
    /// Reads `N` bytes at `off`, wherever they lie in the packet (through the kernel's
    /// helper, so `off` may be any value the program computed).
    fn load_bytes<const N: usize>(&self, off: usize) -> Option<[u8; N]>;
    /// Reads `len` bytes (1..=63) at `off` into `buf`.
    fn load_into(&self, off: usize, buf: &mut [u8; 64], len: u32) -> Result<(), ()>;
    /// Grows or shrinks the packet to `len` bytes (new bytes are zero).
    fn set_len(&mut self, len: u32) -> Result<(), ()>;
}

const IP_CHECK_OFF: usize = ETH_LEN + offset_of!(Ipv4Hdr, check);
const IP_SRC_OFF: usize = ETH_LEN + offset_of!(Ipv4Hdr, src_addr);
const IP_DST_OFF: usize = ETH_LEN + offset_of!(Ipv4Hdr, dst_addr);
const TCP_CHECK_OFF: usize = L4_OFF + offset_of!(TcpHdr, check);
const UDP_CHECK_OFF: usize = L4_OFF + offset_of!(UdpHdr, check);

#[inline(always)]
const fn offsets(end: End) -> (usize, usize) {
    // (address offset, port offset); source port precedes destination port in TCP and UDP.
    match end {
        End::Dst => (IP_DST_OFF, L4_OFF + 2),
        End::Src => (IP_SRC_OFF, L4_OFF),
    }
}

pub struct XdpPacket {
    ctx: XdpContext,
}

impl XdpPacket {
    #[inline(always)]
    pub fn new(ctx: XdpContext) -> Self {
        Self { ctx }
    }
}

impl XdpPacket {
    /// Sends the rewritten packet on itself (XDP_REDIRECT to the interface and next hop
    /// the node's FIB gives, see `route`), or passes it to the stack, the reason counted.
    #[inline(always)]
    pub fn forward(&mut self) -> u32 {
        // SAFETY: the xdp_md of a valid XDP context.
        let ifindex = unsafe { (*self.ctx.ctx).ingress_ifindex };
        let ctx = self.ctx.as_ptr();
        match route::next(self, ctx, ifindex, Hook::Xdp) {
            Next::Redirect { ifindex } => {
                stats::count(Counter::EventRedirected);
                // The target was in the map a moment ago (`route::next`); should the agent
                // have just removed it, the frame is dropped (XDP_ABORTED), as it would be
                // by a device that cannot take it.
                XDP_TARGETS
                    .redirect(ifindex, 0)
                    .unwrap_or(xdp_action::XDP_ABORTED)
            }
            // Not produced for XDP: a next hop without a MAC goes to the stack.
            Next::ResolveNeighbour { .. } => xdp_action::XDP_PASS,
            Next::Stack(reason) => {
                stats::count(reason);
                xdp_action::XDP_PASS
            }
        }
    }
}

impl Packet for XdpPacket {
    #[inline(always)]
    fn data(&self) -> usize {
        self.ctx.data()
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        self.ctx.data_end()
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        (self.ctx.data_end() - self.ctx.data()) as u32
    }

    #[inline(always)]
    fn rewrite(&mut self, end: End, l4: u8, old: Endpoint, new: Endpoint) -> Result<(), ()> {
        let (data, data_end) = (self.data(), self.data_end());
        let (addr_off, port_off) = offsets(end);
        let ip: *mut Ipv4Hdr = header_at(data, data_end, ETH_LEN).ok_or(())?;
        let check_off = if l4 == proto::TCP {
            TCP_CHECK_OFF
        } else {
            UDP_CHECK_OFF
        };
        let l4_check: *mut u16 = header_at(data, data_end, check_off).ok_or(())?;
        let port: *mut u16 = header_at(data, data_end, port_off).ok_or(())?;
        let addr: *mut [u8; 4] = header_at(data, data_end, addr_off).ok_or(())?;
        // SAFETY: every pointer was bounds-checked by header_at; the XDP buffer is writable.
        unsafe {
            let ip = &mut *ip;
            ip.check =
                csum::replace4(u16::from_ne_bytes(ip.check), old.addr, new.addr).to_ne_bytes();
            let c = l4_check.read_unaligned();
            let c = if l4 == proto::TCP {
                csum::replace2(csum::replace4(c, old.addr, new.addr), old.port, new.port)
            } else {
                csum::udp_replace2(
                    csum::udp_replace4(c, old.addr, new.addr),
                    old.port,
                    new.port,
                )
            };
            l4_check.write_unaligned(c);
            port.write_unaligned(new.port);
            addr.write_unaligned(new.addr.to_ne_bytes());
        }
        Ok(())
    }

    #[inline(always)]
    fn store_u16(&mut self, off: usize, v: u16) -> Result<(), ()> {
        let p: *mut u16 = header_at(self.data(), self.data_end(), off).ok_or(())?;
        // SAFETY: bounds checked by header_at.
        unsafe { p.write_unaligned(v) };
        Ok(())
    }

    #[inline(always)]
    fn store_u32(&mut self, off: usize, v: u32) -> Result<(), ()> {
        let p: *mut u32 = header_at(self.data(), self.data_end(), off).ok_or(())?;
        // SAFETY: bounds checked by header_at.
        unsafe { p.write_unaligned(v) };
        Ok(())
    }

    #[inline(always)]
    fn store_bytes<const N: usize>(&mut self, off: usize, bytes: &[u8; N]) -> Result<(), ()> {
        let p: *mut [u8; N] = header_at(self.data(), self.data_end(), off).ok_or(())?;
        // SAFETY: bounds checked by header_at.
        unsafe { p.write_unaligned(*bytes) };
        Ok(())
    }

    #[inline(always)]
    fn load_bytes<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let mut out = [0u8; N];
        // SAFETY: valid context; the helper checks the range and writes N bytes to `out`.
        let rc = unsafe {
            bpf_xdp_load_bytes(
                self.ctx.ctx,
                off as u32,
                out.as_mut_ptr() as *mut _,
                N as u32,
            )
        };
        (rc == 0).then_some(out)
    }

    #[inline(always)]
    fn load_into(&self, off: usize, buf: &mut [u8; 64], len: u32) -> Result<(), ()> {
        // Masked after a volatile read, so the compiler keeps the mask and the verifier
        // sees the bound the helper's size argument needs.
        // SAFETY: reading a local.
        let len = unsafe { core::ptr::read_volatile(&len) } & 63;
        if len == 0 {
            return Err(());
        }
        // SAFETY: valid context; the helper checks the range; `buf` holds `len` bytes.
        match unsafe {
            bpf_xdp_load_bytes(self.ctx.ctx, off as u32, buf.as_mut_ptr() as *mut _, len)
        } {
            0 => Ok(()),
            _ => Err(()),
        }
    }

    /// Grows at the tail when the buffer has room there, else at the head (XDP buffers
    /// always have headroom; some drivers, veth among them, leave little tailroom), moving
    /// the Ethernet header to the new start. Bytes after the Ethernet header are the
    /// caller's to rewrite.
    #[inline(always)]
    fn set_len(&mut self, len: u32) -> Result<(), ()> {
        let delta = len as i32 - self.len() as i32;
        let ctx = self.ctx.as_ptr() as *mut _;
        // SAFETY: valid XDP context; the kernel checks the new size.
        if unsafe { bpf_xdp_adjust_tail(ctx, delta) } == 0 {
            return Ok(());
        }
        if delta <= 0 {
            return Err(());
        }
        let eth: [u8; ETH_LEN] = self.load_bytes(0).ok_or(())?;
        // SAFETY: valid XDP context; the kernel checks the headroom.
        if unsafe { bpf_xdp_adjust_head(ctx, -delta) } != 0 {
            return Err(());
        }
        self.store_bytes(0, &eth)
    }
}

pub struct TcPacket {
    ctx: TcContext,
}

impl TcPacket {
    #[inline(always)]
    pub fn new(ctx: TcContext) -> Self {
        // Headers may sit in a non-linear part of the skb; make them directly readable.
        let linear = ctx.data_end() - ctx.data();
        if linear < MAX_HEADERS && ctx.len() as usize > linear {
            let want = if (ctx.len() as usize) < MAX_HEADERS {
                ctx.len()
            } else {
                MAX_HEADERS as u32
            };
            let _ = ctx.pull_data(want);
        }
        Self { ctx }
    }

    /// Sends the rewritten packet on itself, to the interface and next hop the node's
    /// FIB gives (see `route`), or leaves it to the stack, the reason counted. `hook` is
    /// `TcIngress` or `TcEgress` (the node's own packet, after DNAT).
    #[inline(always)]
    pub fn forward(&mut self, hook: Hook) -> i32 {
        let local = hook == Hook::TcEgress;
        // SAFETY: the skb of a valid TC context.
        let ifindex = unsafe { (*self.ctx.skb.skb).ifindex };
        let ctx = self.ctx.as_ptr();
        match route::next(self, ctx, ifindex, hook) {
            Next::Redirect { ifindex } => {
                stats::count(Counter::EventRedirected);
                // TC_ACT_REDIRECT, or TC_ACT_SHOT for a bad ifindex.
                // SAFETY: a plain helper call; the kernel checks the ifindex.
                unsafe { bpf_redirect(ifindex, 0) as i32 }
            }
            Next::ResolveNeighbour { ifindex } => {
                stats::count(Counter::EventRedirected);
                // The kernel routes the packet again to find its next hop, resolves it and
                // fills in the L2 header.
                // SAFETY: a null parameter block asks the kernel to use the packet's route.
                unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
            }
            Next::Stack(reason) => {
                stats::count(reason);
                if local {
                    stats::count(Counter::EventEgressNoRoute);
                }
                TC_ACT_OK
            }
        }
    }
}

impl TcPacket {
    /// `N` bytes at `off` of the linear data (headers, made linear at `new`).
    #[inline(always)]
    fn load_direct<const N: usize>(&self, off: usize) -> Result<[u8; N], ()> {
        let p: *const [u8; N] = header_at(self.data(), self.data_end(), off).ok_or(())?;
        // SAFETY: bounds checked by header_at.
        Ok(unsafe { p.read_unaligned() })
    }
}

impl Packet for TcPacket {
    #[inline(always)]
    fn data(&self) -> usize {
        self.ctx.data()
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        self.ctx.data_end()
    }

    #[inline(always)]
    fn len(&self) -> u32 {
        self.ctx.len()
    }

    #[inline(always)]
    fn rewrite(&mut self, end: End, l4: u8, old: Endpoint, new: Endpoint) -> Result<(), ()> {
        let (addr_off, _) = offsets(end);
        let (check_off, mangled0) = if l4 == proto::TCP {
            (TCP_CHECK_OFF, 0)
        } else {
            // UDP: a zero checksum means "none" and must stay zero.
            (UDP_CHECK_OFF, BPF_F_MARK_MANGLED_0 as u64)
        };
        let c = &self.ctx;
        c.l4_csum_replace(
            check_off,
            old.addr as u64,
            new.addr as u64,
            BPF_F_PSEUDO_HDR as u64 | mangled0 | 4,
        )
        .map_err(|_| ())?;
        c.l4_csum_replace(check_off, old.port as u64, new.port as u64, mangled0 | 2)
            .map_err(|_| ())?;
        c.l3_csum_replace(IP_CHECK_OFF, old.addr as u64, new.addr as u64, 4)
            .map_err(|_| ())?;
        // The address and the port in one store: with the bytes between them as they
        // are (the other address, or the source port), one helper call instead of two.
        let (addr, port) = (new.addr.to_ne_bytes(), new.port.to_ne_bytes());
        match end {
            End::Dst => {
                // Destination address, source port, destination port.
                let sport: [u8; 2] = self.load_direct(L4_OFF)?;
                let span = [
                    addr[0], addr[1], addr[2], addr[3], sport[0], sport[1], port[0], port[1],
                ];
                c.store(addr_off, &span, 0).map_err(|_| ())
            }
            End::Src => {
                // Source address, destination address, source port.
                let dst: [u8; 4] = self.load_direct(IP_DST_OFF)?;
                let span = [
                    addr[0], addr[1], addr[2], addr[3], dst[0], dst[1], dst[2], dst[3], port[0],
                    port[1],
                ];
                c.store(addr_off, &span, 0).map_err(|_| ())
            }
        }
    }

    #[inline(always)]
    fn store_u16(&mut self, off: usize, v: u16) -> Result<(), ()> {
        self.ctx.store(off, &v, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn store_u32(&mut self, off: usize, v: u32) -> Result<(), ()> {
        self.ctx.store(off, &v, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn store_bytes<const N: usize>(&mut self, off: usize, bytes: &[u8; N]) -> Result<(), ()> {
        self.ctx.store(off, bytes, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn load_bytes<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        self.ctx.load::<[u8; N]>(off).ok()
    }

    #[inline(always)]
    fn load_into(&self, off: usize, buf: &mut [u8; 64], len: u32) -> Result<(), ()> {
        // Masked after a volatile read, so the compiler keeps the mask and the verifier
        // sees the bound the helper's size argument needs.
        // SAFETY: reading a local.
        let len = unsafe { core::ptr::read_volatile(&len) } & 63;
        if len == 0 {
            return Err(());
        }
        // SAFETY: valid context; the helper checks the range; `buf` holds `len` bytes.
        match unsafe {
            bpf_skb_load_bytes(
                self.ctx.skb.skb as *const _,
                off as u32,
                buf.as_mut_ptr() as *mut _,
                len,
            )
        } {
            0 => Ok(()),
            _ => Err(()),
        }
    }

    #[inline(always)]
    fn set_len(&mut self, len: u32) -> Result<(), ()> {
        // SAFETY: valid skb context; the kernel checks the new size.
        match unsafe { bpf_skb_change_tail(self.ctx.skb.skb, len, 0) } {
            0 => Ok(()),
            _ => Err(()),
        }
    }
}
