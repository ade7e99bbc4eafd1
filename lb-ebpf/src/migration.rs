//! Connections carried over from an older connection table while the agent migrates it
//! (a restart that replaced the table: another size, or the previous layout).
//!
//! The agent copies the older table's entries before it switches the programs and again
//! after, but the programs it replaces keep tracking connections until their hooks are
//! switched, one after the other. So while the agent's `MIGRATION` flags are set:
//! - a packet whose 5-tuple misses the connection table is looked up in the older table,
//!   and its connection (both directions) is copied over: a reply of a connection opened
//!   by the old programs is still translated;
//! - a new connection is written to the older table too: the old programs, still attached
//!   to a hook not yet switched, translate its replies.
//!
//! Outside a migration this costs one array read per connection-table miss.

// Values are passed by reference: by value, each insert would copy its 64 bytes onto a
// stack these functions have little of.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "avoid a stack copy of each value"
)]

use aya_ebpf::{bindings::BPF_NOEXIST, macros::map, maps::PerCpuArray};
use lb_common::{
    maps::{ConnEntryV1, MIGRATING_PREV, MIGRATING_V1},
    ConnEntry, Counter, FlowKey,
};

use crate::{
    datapath::partner_key,
    maps::{CONNECTIONS, CONNECTIONS_PREV, CONNECTIONS_V1, MIGRATION},
    stats,
};

/// Room for the values these functions build. They are functions of their own in the
/// program (not inlined): the verifier then goes on after a call from one or two states,
/// not from every path through both tables, and a called function gets what is left of
/// the 512-byte stack after its caller's, under 72 bytes. So values live here.
#[repr(C)]
pub struct Scratch {
    /// The other direction's key, found by the first copy.
    partner: FlowKey,
    /// Written by the second copy, not read.
    partners_partner: FlowKey,
    /// A previous-layout entry converted.
    entry: ConnEntry,
}

#[map(name = "lb_migr_tmp")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// The `MIGRATING_*` flags: 0 outside a migration, and then callers skip the calls
/// below (a call costs more than this read).
#[inline(always)]
pub fn flags() -> u32 {
    MIGRATION.get(0).copied().unwrap_or(0)
}

/// Copies the entry of `key` from the older table into the connection table (unless a
/// newer one is there already), and puts the key of the connection's other direction in
/// `partner`. `false`: the older table does not have it.
#[inline(always)]
fn copy_over(flags: u32, key: &FlowKey, converted: &mut ConnEntry, partner: &mut FlowKey) -> bool {
    if flags & MIGRATING_PREV != 0 {
        if let Some(entry) = CONNECTIONS_PREV.get_ptr(key) {
            // SAFETY: pointer to a live map value returned by the kernel.
            let entry = unsafe { &*entry };
            let _ = CONNECTIONS.insert(key, entry, BPF_NOEXIST as u64);
            *partner = partner_key(key, entry);
            return true;
        }
    }
    if flags & MIGRATING_V1 != 0 {
        if let Some(entry) = CONNECTIONS_V1.get_ptr(key) {
            // SAFETY: a live map value of `ConnEntryV1`, the prefix of `ConnEntry`'s
            // layout (lb_common::maps): its bytes are the first ones of the converted
            // entry, and the rest is `created_ns`, unknown.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    entry.cast::<u8>(),
                    (converted as *mut ConnEntry).cast::<u8>(),
                    core::mem::size_of::<ConnEntryV1>(),
                )
            };
            converted.created_ns = 0;
            let _ = CONNECTIONS.insert(key, &*converted, BPF_NOEXIST as u64);
            *partner = partner_key(key, converted);
            return true;
        }
    }
    false
}

/// `key` missed the connection table during a migration (`flags`, not 0). When the
/// older table tracks it, its connection (both directions) is copied over: `true`, look
/// again.
#[inline(never)]
pub fn adopt(flags: u32, key: &FlowKey) -> bool {
    // SAFETY: pointer to this CPU's live map value returned by the kernel.
    let Some(tmp) = SCRATCH.get_ptr_mut(0).map(|t| unsafe { &mut *t }) else {
        return false;
    };
    if !copy_over(flags, key, &mut tmp.entry, &mut tmp.partner) {
        return false;
    }
    copy_over(
        flags,
        &tmp.partner,
        &mut tmp.entry,
        &mut tmp.partners_partner,
    );
    stats::count(Counter::EventMigrated);
    true
}

/// During a migration (`flags`, not 0), writes a new connection's entry to the older
/// table too.
#[inline(never)]
pub fn mirror(flags: u32, key: &FlowKey, entry: &ConnEntry) {
    if flags & MIGRATING_PREV != 0 {
        let _ = CONNECTIONS_PREV.insert(key, entry, 0);
    }
    if flags & MIGRATING_V1 != 0 {
        // SAFETY: `ConnEntryV1` is the prefix of `ConnEntry`'s layout: the map copies
        // that many bytes from `entry`, and drops `created_ns`.
        let v1 = unsafe { &*(entry as *const ConnEntry).cast::<ConnEntryV1>() };
        let _ = CONNECTIONS_V1.insert(key, v1, 0);
    }
}
