//! Choosing a new connection's backend, and the next one when it fails: one
//! implementation for the kernel's programs and the agent's TLS forwarder, each reading
//! the same published selection table and failover list through its own accessors
//! (`slot`: the backend id in a selection slot; `backend`: a backend id's entry).

use crate::{
    flow::selection_slot,
    maps::{BackendState, FALLBACK_LEN, MAX_RESELECT},
    Backend,
};

/// The backend a connection whose flow hash is `hash` gets from the table of `len`
/// slots at `offset`: its slot's, else that of up to `MAX_RESELECT - 1` following
/// slots, the first active one. Returns its id, its entry and whether another slot than
/// the first was used.
#[inline(always)]
pub fn select<S, B, R>(
    offset: u32,
    len: u32,
    hash: u32,
    slot: S,
    backend: B,
) -> Option<(u32, Backend, bool)>
where
    S: Fn(u32) -> Option<u32>,
    B: Fn(u32) -> Option<R>,
    R: core::borrow::Borrow<Backend>,
{
    if len == 0 {
        return None;
    }
    for attempt in 0..MAX_RESELECT {
        let Some(id) = slot(offset + selection_slot(hash, attempt, len)) else {
            break;
        };
        if id == 0 {
            continue;
        }
        // A reference where the accessor gives one (the kernel's map value): copied only
        // when chosen, which keeps the programs' stack small.
        if let Some(b) = backend(id) {
            let b = b.borrow();
            if b.state == BackendState::Active as u8 {
                return Some((id, *b, attempt > 0));
            }
        }
    }
    None
}

/// The next backend of the failover list of `len` slots at `offset` (a service's
/// priority order): the walk starts at position `cursor` and wraps, skips the ids in
/// `skip` (the backend that failed, the one the table gave first) and backends that are
/// not active. Returns its id and its position (the next walk starts after it); the
/// caller reads its entry (returning it too costs the kernel's programs more stack than
/// their call chain has).
#[inline(always)]
pub fn next_in_failover_list<S, B, R>(
    offset: u32,
    len: u32,
    cursor: u32,
    skip: [u32; 2],
    slot: S,
    backend: B,
) -> Option<(u32, u32)>
where
    S: Fn(u32) -> Option<u32>,
    B: Fn(u32) -> Option<R>,
    R: core::borrow::Borrow<Backend>,
{
    if len == 0 {
        return None;
    }
    // The list may have been republished shorter since the cursor was taken (ejections):
    // a position past its end must not hide a backend that is still eligible.
    let start = cursor.min(len) % len;
    for i in 0..FALLBACK_LEN {
        if i >= len {
            break;
        }
        let mut pos = start + i;
        if pos >= len {
            pos -= len;
        }
        let Some(id) = slot(offset + pos) else {
            break;
        };
        if id == 0 || id == skip[0] || id == skip[1] {
            continue;
        }
        if backend(id).is_some_and(|b| b.borrow().state == BackendState::Active as u8) {
            return Some((id, pos));
        }
    }
    None
}
