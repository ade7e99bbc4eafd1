//! Where each service's window (its selection table, then its failover list) lies in the
//! selection array: ranges of slots handed out by size, so the array holds what the
//! services' tables need rather than the largest table for every service.
//!
//! A service's new table goes into a new window; the service entry is then replaced in
//! one map update that names it (the kernel sees the whole old table or the whole new
//! one), and the old window is retired. A retired window is handed out again only after
//! [`GRACE`]: a program that read the old service entry just before the update reads
//! the old window for the rest of its run, which lasts microseconds, so a window is never
//! rewritten for another service under a reader that still uses it.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    time::{Duration, Instant},
};

/// How long a retired window stays untouched before it is handed out again: far longer
/// than a program runs with the service entry it read (the kernel runs each one to
/// completion, in microseconds).
pub const GRACE: Duration = Duration::from_millis(20);

/// Free and retired ranges of an array of `len` slots.
#[derive(Debug)]
pub struct SlotRanges {
    len: u32,
    /// Free ranges: start → length, never adjacent (freed neighbours are merged).
    free: BTreeMap<u32, u32>,
    /// The same ranges by (length, start), for the best fit.
    by_size: BTreeSet<(u32, u32)>,
    /// Retired windows, oldest first: when, start, length.
    retired: VecDeque<(Instant, u32, u32)>,
}

/// Why a range could not be handed out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error(
        "no free range of {wanted} slots ({free} free in all, {retired} retired, array of {len})"
    )]
    Full {
        wanted: u32,
        free: u64,
        retired: u64,
        len: u32,
    },
    #[error("range {start}+{len} is outside the array of {array} slots or overlaps another")]
    Taken { start: u32, len: u32, array: u32 },
}

impl SlotRanges {
    /// An array of `len` slots, all free.
    pub fn new(len: u32) -> Self {
        let mut r = Self {
            len,
            free: BTreeMap::new(),
            by_size: BTreeSet::new(),
            retired: VecDeque::new(),
        };
        if len > 0 {
            r.insert_free(0, len);
        }
        r
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots free now (retired ones not counted).
    pub fn free_slots(&self) -> u64 {
        self.free.values().map(|&l| u64::from(l)).sum()
    }

    /// Slots of retired windows not yet handed out again.
    pub fn retired_slots(&self) -> u64 {
        self.retired.iter().map(|r| u64::from(r.2)).sum()
    }

    fn insert_free(&mut self, start: u32, len: u32) {
        self.free.insert(start, len);
        self.by_size.insert((len, start));
    }

    fn remove_free(&mut self, start: u32, len: u32) {
        self.free.remove(&start);
        self.by_size.remove(&(len, start));
    }

    /// Marks `start..start + len` as in use (a window found in an adopted array).
    pub fn reserve(&mut self, start: u32, len: u32) -> Result<(), RangeError> {
        if len == 0 {
            return Ok(());
        }
        let taken = RangeError::Taken {
            start,
            len,
            array: self.len,
        };
        let end = start.checked_add(len).ok_or(taken.clone())?;
        let Some((&fs, &fl)) = self.free.range(..=start).next_back() else {
            return Err(taken);
        };
        if fs + fl < end {
            return Err(taken);
        }
        self.remove_free(fs, fl);
        if fs < start {
            self.insert_free(fs, start - fs);
        }
        if end < fs + fl {
            self.insert_free(end, fs + fl - end);
        }
        Ok(())
    }

    /// A range of `len` slots: the smallest free range that holds it (best fit keeps the
    /// large ranges whole for large tables). `None` when none does.
    fn take(&mut self, len: u32) -> Option<u32> {
        let &(fl, fs) = self.by_size.range((len, 0)..).next()?;
        self.remove_free(fs, fl);
        if fl > len {
            self.insert_free(fs + len, fl - len);
        }
        Some(fs)
    }

    /// A range of `len` slots (`len` > 0). Retired windows past their grace are freed
    /// first; when nothing fits and retired windows are still in their grace, it waits
    /// for them (at most [`GRACE`]).
    pub fn allocate(&mut self, len: u32) -> Result<u32, RangeError> {
        self.reclaim(Instant::now());
        if let Some(start) = self.take(len) {
            return Ok(start);
        }
        while let Some(&(at, _, _)) = self.retired.front() {
            let due = at + GRACE;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            self.reclaim(Instant::now());
            if let Some(start) = self.take(len) {
                return Ok(start);
            }
        }
        Err(RangeError::Full {
            wanted: len,
            free: self.free_slots(),
            retired: self.retired_slots(),
            len: self.len,
        })
    }

    /// Retires `start..start + len`: free again after [`GRACE`].
    pub fn retire(&mut self, start: u32, len: u32) {
        if len > 0 {
            self.retired.push_back((Instant::now(), start, len));
        }
    }

    /// Frees the retired windows whose grace has passed at `now`.
    pub fn reclaim(&mut self, now: Instant) {
        while let Some(&(at, start, len)) = self.retired.front() {
            if now.duration_since(at) < GRACE {
                break;
            }
            self.retired.pop_front();
            self.release(start, len);
        }
    }

    /// Returns `start..start + len` to the free ranges, merged with free neighbours.
    fn release(&mut self, mut start: u32, mut len: u32) {
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            if ps + pl == start {
                self.remove_free(ps, pl);
                start = ps;
                len += pl;
            }
        }
        if let Some(&nl) = self.free.get(&(start + len)) {
            self.remove_free(start + len, nl);
            len += nl;
        }
        self.insert_free(start, len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_handed_out_without_overlap_and_fill_the_array() {
        let mut r = SlotRanges::new(1000);
        let a = r.allocate(300).unwrap();
        let b = r.allocate(300).unwrap();
        let c = r.allocate(400).unwrap();
        let mut starts = [a, b, c];
        starts.sort();
        assert_eq!(starts, [0, 300, 600]);
        assert_eq!(r.free_slots(), 0);
        assert!(matches!(r.allocate(1), Err(RangeError::Full { .. })));
    }

    #[test]
    fn a_retired_window_is_reused_only_after_its_grace() {
        let mut r = SlotRanges::new(100);
        let a = r.allocate(100).unwrap();
        r.retire(a, 100);
        // Not free at once: a reader may still be in it.
        assert_eq!(r.free_slots(), 0);
        r.reclaim(Instant::now());
        assert_eq!(r.free_slots(), 0);
        // Allocating waits out the grace rather than failing.
        let started = Instant::now();
        assert_eq!(r.allocate(60), Ok(0));
        assert!(started.elapsed() >= GRACE / 2);
        assert_eq!(r.free_slots(), 40);
    }

    #[test]
    fn freed_neighbours_merge_so_a_large_table_fits_again() {
        let mut r = SlotRanges::new(90);
        let ids: Vec<u32> = (0..3).map(|_| r.allocate(30).unwrap()).collect();
        for &s in &ids {
            r.retire(s, 30);
        }
        r.reclaim(Instant::now() + GRACE);
        assert_eq!(r.free.len(), 1, "{:?}", r.free);
        assert_eq!(r.allocate(90), Ok(0));
    }

    #[test]
    fn best_fit_keeps_large_ranges_whole() {
        let mut r = SlotRanges::new(200);
        let small = r.allocate(10).unwrap();
        let _big = r.allocate(100).unwrap();
        r.retire(small, 10);
        r.reclaim(Instant::now() + GRACE);
        // 10 free at the start, 90 at the end: a table of 8 takes the small hole.
        assert_eq!(r.allocate(8), Ok(small));
        assert_eq!(r.allocate(90), Ok(110));
    }

    #[test]
    fn reserving_adopted_windows_and_refusing_overlaps() {
        let mut r = SlotRanges::new(100);
        r.reserve(10, 20).unwrap();
        r.reserve(50, 10).unwrap();
        assert!(r.reserve(25, 10).is_err(), "overlaps 10..30");
        assert!(r.reserve(95, 10).is_err(), "beyond the array");
        assert_eq!(r.free_slots(), 70);
        assert_eq!(r.allocate(20), Ok(30));
    }
}
