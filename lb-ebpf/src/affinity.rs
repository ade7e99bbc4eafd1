//! Session affinity (Kubernetes `sessionAffinity: ClientIP`): a client's new connections
//! to a service keep going to the backend its last one got, while that backend is usable
//! (active, and still one of the service's), until the client opened no connection to the
//! service for the service's timeout. As Cilium's `cilium_lb4_affinity`: an LRU map keyed
//! by (service, client address) holds the backend and its last use; an entry that does not
//! stand any more is overwritten by the normal selection's choice.
//!
//! Only connections without a connection-table entry get here, and only for services
//! flagged `SERVICE_AFFINITY`: other services pay the flag's test and nothing else.

// Keys are passed by reference: by value, each lookup would copy the key on the stack.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "avoid a stack copy of each key"
)]

use aya_ebpf::{macros::map, maps::PerCpuArray};
use lb_common::{
    flow_hash,
    maps::{Affinity, AffinityKey},
    Backend, BackendState, Counter, FlowKey, Service,
};

use crate::{
    datapath,
    maps::{AFFINITY, AFFINITY_TIMEOUTS, BACKENDS, BACKEND_SERVICES},
    stats,
};

/// Room for the key and value built here. `lookup` is a function of its own in the
/// program (not inlined), so the verifier goes on after it from a few states rather than
/// from every path through it; it gets only what its caller leaves of the 512-byte stack
/// (under 64 bytes), so the key lives here, and stays here for `remember`.
#[repr(C)]
pub struct Scratch {
    key: AffinityKey,
    value: Affinity,
}

#[map(name = "lb_aff_tmp")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

const NS_PER_SEC: u64 = 1_000_000_000;

/// `lookup`'s answer when the client has no entry that stands: select, then `remember`
/// (the key is in the scratch value). Otherwise the answer is a backend id, or 0 when the
/// service has no timeout (the agent is switching affinity on or off: balance as without).
const REMEMBER: u64 = 1 << 32;

/// Whether backend `id` may take a new connection of service `service_id`: active, and
/// still the service's (not removed, its id not given to another service's backend).
#[inline(always)]
fn usable(id: u32, service_id: u32) -> bool {
    BACKENDS
        .get(id)
        .is_some_and(|b| b.state == BackendState::Active as u8)
        && BACKEND_SERVICES.get(id) == Some(&service_id)
}

/// The backend the client of `flow` keeps for `svc`, when its entry stands (refreshed:
/// this connection uses it), else `REMEMBER` (or 0, see there).
#[inline(never)]
fn lookup(svc: &Service, flow: &FlowKey, now: u64) -> u64 {
    let timeout_ns = AFFINITY_TIMEOUTS.get(svc.id).map_or(0, |s| *s as u64) * NS_PER_SEC;
    if timeout_ns == 0 {
        return 0;
    }
    let Some(tmp) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot, used only while this packet is processed.
    let tmp = unsafe { &mut *tmp };
    tmp.key = AffinityKey {
        client: flow.src,
        service_id: svc.id,
    };
    if let Some(entry) = AFFINITY.get_ptr_mut(&tmp.key) {
        // SAFETY: pointer to a live map value returned by the kernel.
        let entry = unsafe { &mut *entry };
        let id = entry.backend_id;
        // Cilium's rule: the entry stands while `last_used + timeout > now`.
        if now.saturating_sub(entry.last_used_ns) < timeout_ns && usable(id, svc.id) {
            entry.last_used_ns = now;
            stats::count(Counter::EventAffinityHit);
            return id as u64;
        }
    }
    stats::count(Counter::EventAffinityMiss);
    REMEMBER
}

/// Remembers backend `id` for the key `lookup` left in the scratch value (overwriting an
/// entry that no longer stands).
#[inline(always)]
fn remember(id: u32, now: u64) {
    if let Some(tmp) = SCRATCH.get_ptr_mut(0) {
        // SAFETY: this CPU's slot, used only while this packet is processed.
        let tmp = unsafe { &mut *tmp };
        tmp.value = Affinity {
            backend_id: id,
            _pad: 0,
            last_used_ns: now,
        };
        let _ = AFFINITY.insert(&tmp.key, &tmp.value, 0);
    }
}

/// The backend for a new connection `flow` of `svc`, a service with affinity: the one
/// the client's entry names when it stands; else the selection table's pick, remembered
/// for the client. As `datapath::select` answers.
#[inline(always)]
pub fn select(svc: &Service, flow: &FlowKey, now: u64) -> Result<(u32, Backend, bool), Counter> {
    let found = lookup(svc, flow, now);
    let id = found as u32;
    if id != 0 {
        if let Some(backend) = BACKENDS.get(id) {
            return Ok((id, *backend, false));
        }
    }
    let chosen = datapath::select(svc, flow_hash(flow));
    if found & REMEMBER != 0 {
        if let Ok((id, _, _)) = chosen {
            remember(id, now);
        }
    }
    chosen
}
