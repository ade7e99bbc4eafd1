//! Per-CPU counters. Plain adds: each CPU owns its slot, so no atomics are needed.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{Counter, Signal, SignalKind, TrafficStats};

use crate::maps::{BACKEND_STATS, COUNTERS, SERVICE_STATS, SIGNALS};

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(v) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot returned by the kernel for this CPU only.
        unsafe { *v += 1 };
    }
}

/// Accounts one translated packet to its service and backend.
#[inline(always)]
pub fn traffic(service_id: u32, backend_id: u32, bytes: u32, new_connection: bool) {
    let new = new_connection as u64;
    for (map, idx) in [(&SERVICE_STATS, service_id), (&BACKEND_STATS, backend_id)] {
        if let Some(s) = map.get_ptr_mut(idx) {
            // SAFETY: per-CPU slot returned by the kernel for this CPU only.
            let s: &mut TrafficStats = unsafe { &mut *s };
            s.packets += 1;
            s.bytes += bytes as u64;
            s.new_connections += new;
        }
    }
}

/// Counts a connection attempt moved to `backend_id` (the service's count is unchanged:
/// it is still one connection).
#[inline(always)]
pub fn backend_new_connection(backend_id: u32) {
    if let Some(s) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU slot returned by the kernel for this CPU only.
        unsafe { (*s).new_connections += 1 };
    }
}

/// Counts a completed handshake (a connect success) of `backend_id`.
#[inline(always)]
pub fn handshake(backend_id: u32) {
    if let Some(s) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU slot returned by the kernel for this CPU only.
        unsafe { (*s).handshakes += 1 };
    }
}

/// Counts an HTTP response of `backend_id`; a 5xx is also reported to the agent.
#[inline(always)]
pub fn http_response(service_id: u32, backend_id: u32, status: u16) {
    let error = status >= 500;
    if let Some(s) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU slot returned by the kernel for this CPU only.
        let s = unsafe { &mut *s };
        if error {
            s.http_5xx += 1;
        } else {
            s.http_ok += 1;
        }
    }
    if error {
        signal_status(SignalKind::HttpError, service_id, backend_id, status as u32);
    }
}

/// Reports a failure to the agent through the ring buffer (counted if it is full).
#[inline(always)]
pub fn signal(kind: SignalKind, service_id: u32, backend_id: u32) {
    signal_status(kind, service_id, backend_id, 0)
}

#[inline(always)]
fn signal_status(kind: SignalKind, service_id: u32, backend_id: u32, status: u32) {
    let s = Signal {
        kind: kind as u32,
        backend_id,
        service_id,
        status,
        // SAFETY: helper without preconditions.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
    };
    if SIGNALS.output::<Signal>(&s, 0).is_err() {
        count(Counter::EventSignalLost);
    }
}
