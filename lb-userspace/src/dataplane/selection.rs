//! Builds a service's selection table: the array of backend ids the kernel indexes with
//! a flow's hash.
//!
//! Maglev hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load
//! Balancer", NSDI 2016, §3.4) with weights: every backend walks its own permutation of
//! the table's slots and claims the next free one when its turn comes; a backend gets
//! turns in proportion to its weight. Permutations depend only on the backend's identity
//! (address and port), so when one backend leaves or its weight changes, most slots keep
//! their backend and most new flows keep landing where they did.
//!
//! Precision: a table of M slots expresses shares in steps of 1/M. `table_size` picks the
//! smallest prime M ≥ 64 × (number of backends) (at least 257), so a backend with an even
//! share owns at least 64 slots and every share is rounded to within 1/M.

/// A backend as the table builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WeightedBackend {
    /// Id written into the table.
    pub id: u32,
    /// Stable identity (e.g. address and port) that seeds the backend's permutation.
    pub key: u64,
    /// Relative weight; 0 takes no slot.
    pub weight: u64,
}

/// Slots a table has per backend of its service (before rounding up to a prime).
pub const SLOTS_PER_BACKEND: usize = 64;

/// The smallest table: a prime, so that even one or two backends' permutations spread.
pub const MIN_TABLE_SLOTS: usize = 257;

/// Smallest table size for `backends` backends: a prime ≥ 64 per backend (≥ 257), but no
/// larger than `max_slots` (then the largest prime that fits). The size follows the
/// service's backends, whatever their states, so an ejection keeps it (and with it
/// Maglev's small disruption, which holds between tables of one size).
pub fn table_size(backends: usize, max_slots: usize) -> usize {
    let want = (backends.max(1) * SLOTS_PER_BACKEND).max(MIN_TABLE_SLOTS);
    if want <= max_slots {
        (want..).find(|&n| is_prime(n)).unwrap_or(want)
    } else {
        (2..=max_slots).rev().find(|&n| is_prime(n)).unwrap_or(1)
    }
}

fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Slots per backend: `size` split by weight, remainders to the largest fractions
/// (ties to the earlier backend), so every count is within one slot of its exact share.
fn apportion(backends: &[&WeightedBackend], size: usize) -> Vec<usize> {
    let total: u128 = backends.iter().map(|b| u128::from(b.weight)).sum();
    let mut quota: Vec<(usize, u128)> = backends
        .iter()
        .map(|b| {
            let exact = u128::from(b.weight) * size as u128;
            ((exact / total) as usize, exact % total)
        })
        .collect();
    let given: usize = quota.iter().map(|q| q.0).sum();
    let mut order: Vec<usize> = (0..quota.len()).collect();
    order.sort_by(|&a, &b| quota[b].1.cmp(&quota[a].1).then(a.cmp(&b)));
    for &i in order.iter().take(size - given) {
        quota[i].0 += 1;
    }
    quota.into_iter().map(|q| q.0).collect()
}

/// SplitMix64: a fast, well-mixed 64-bit hash for permutation seeds.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Builds a Maglev table of `size` slots (a prime) for `backends`. Returns an empty table
/// when no backend has weight.
pub fn maglev_table(backends: &[WeightedBackend], size: usize) -> Vec<u32> {
    let live: Vec<&WeightedBackend> = backends.iter().filter(|b| b.weight > 0).collect();
    if live.is_empty() || size == 0 {
        return Vec::new();
    }
    let m = size as u64;
    // Each backend's permutation is `(offset + k × skip) mod m` for k = 0, 1, ...: kept
    // as the current slot and advanced by an addition (skip < m), not a division per
    // probe, which filling a table takes about m × ln m of.
    let (mut slot_of, skip): (Vec<usize>, Vec<usize>) = live
        .iter()
        .map(|b| {
            let h = mix(b.key);
            let skip = if m > 1 { mix(h) % (m - 1) + 1 } else { 1 };
            ((h % m) as usize, skip as usize)
        })
        .unzip();
    let quota = apportion(&live, size);
    let max_weight = live.iter().map(|b| b.weight).max().unwrap_or(1);
    let mut credit = vec![0u64; live.len()];
    let mut owned = vec![0usize; live.len()];
    let mut table = vec![u32::MAX; size];
    let mut filled = 0;
    while filled < size {
        for (i, b) in live.iter().enumerate() {
            // Weighted turns: a backend takes a slot each time its credit reaches the
            // largest weight, until it owns its quota of slots.
            credit[i] += b.weight;
            while credit[i] >= max_weight && owned[i] < quota[i] {
                credit[i] -= max_weight;
                loop {
                    let slot = slot_of[i];
                    slot_of[i] += skip[i];
                    if slot_of[i] >= size {
                        slot_of[i] -= size;
                    }
                    if table[slot] == u32::MAX {
                        table[slot] = b.id;
                        owned[i] += 1;
                        filled += 1;
                        break;
                    }
                }
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(weights: &[u64]) -> Vec<WeightedBackend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| WeightedBackend {
                id: i as u32 + 1,
                key: 0x0a00_0000 + i as u64,
                weight,
            })
            .collect()
    }

    fn share(table: &[u32], id: u32) -> f64 {
        table.iter().filter(|&&x| x == id).count() as f64 / table.len() as f64
    }

    #[test]
    fn sizes_are_prime_and_scale_with_backends() {
        assert_eq!(table_size(1, 65536), 257);
        assert_eq!(table_size(3, 65536), 257);
        assert_eq!(table_size(100, 65536), 6421);
        assert!(is_prime(table_size(1000, 1 << 20)));
        // Capped: the largest prime that fits.
        assert_eq!(table_size(100, 4096), 4093);
    }

    #[test]
    fn equal_weights_share_equally() {
        let size = table_size(3, 65536);
        let t = maglev_table(&backends(&[1, 1, 1]), size);
        assert_eq!(t.len(), size);
        for id in 1..=3 {
            assert!((share(&t, id) - 1.0 / 3.0).abs() <= 1.0 / size as f64 + 1e-9);
        }
    }

    #[test]
    fn shares_follow_weights_to_within_a_slot_per_backend() {
        // The split of the seed's partly healthy case and an uneven one.
        for weights in [&[70u64, 30][..], &[36, 36, 28], &[99, 1], &[5, 3, 2, 1, 1]] {
            let size = table_size(weights.len(), 65536);
            let t = maglev_table(&backends(weights), size);
            let total: u64 = weights.iter().sum();
            for (i, &w) in weights.iter().enumerate() {
                let want = w as f64 / total as f64;
                let got = share(&t, i as u32 + 1);
                assert!(
                    (got - want).abs() <= 1.0 / size as f64 + 1e-9,
                    "{weights:?}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn removing_a_backend_moves_few_other_slots() {
        let size = table_size(10, 65536);
        let all = backends(&[1; 10]);
        let before = maglev_table(&all, size);
        let after = maglev_table(&all[1..], size);
        // Slots that did not belong to the removed backend but changed owner.
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != 1 && b != a)
            .count();
        // Maglev's disruption is small, not zero; a fully rehashed table would move ~90%.
        assert!(moved * 100 <= size * 10, "{moved} of {size} slots moved");
    }

    /// Maglev's permutations, `(offset + k × skip) mod m`, as the paper writes them: the
    /// table built by stepping through them must be that one, slot for slot, so a table
    /// an earlier agent published is recognised and every agent builds the same one.
    fn reference_table(backends: &[WeightedBackend], size: usize) -> Vec<u32> {
        let live: Vec<&WeightedBackend> = backends.iter().filter(|b| b.weight > 0).collect();
        let m = size as u64;
        let (offset, skip): (Vec<u64>, Vec<u64>) = live
            .iter()
            .map(|b| {
                let h = mix(b.key);
                (h % m, mix(h) % (m - 1) + 1)
            })
            .unzip();
        let quota = apportion(&live, size);
        let max_weight = live.iter().map(|b| b.weight).max().unwrap();
        let (mut next, mut credit, mut owned) = (
            vec![0u64; live.len()],
            vec![0u64; live.len()],
            vec![0; live.len()],
        );
        let mut table = vec![u32::MAX; size];
        let mut filled = 0;
        while filled < size {
            for (i, b) in live.iter().enumerate() {
                credit[i] += b.weight;
                while credit[i] >= max_weight && owned[i] < quota[i] {
                    credit[i] -= max_weight;
                    loop {
                        let slot = ((offset[i] + next[i] * skip[i]) % m) as usize;
                        next[i] += 1;
                        if table[slot] == u32::MAX {
                            table[slot] = b.id;
                            owned[i] += 1;
                            filled += 1;
                            break;
                        }
                    }
                }
            }
        }
        table
    }

    #[test]
    fn tables_follow_the_permutations_slot_for_slot() {
        for weights in [&[1u64; 100][..], &[70, 30], &[5, 3, 2, 1, 1, 0, 4]] {
            let b = backends(weights);
            let size = table_size(weights.len(), 8176);
            assert_eq!(
                maglev_table(&b, size),
                reference_table(&b, size),
                "{weights:?}"
            );
        }
    }

    #[test]
    fn no_weight_no_table() {
        assert!(maglev_table(&[], 257).is_empty());
        assert!(maglev_table(&backends(&[0, 0]), 257).is_empty());
        let t = maglev_table(&backends(&[0, 1]), 257);
        assert!(t.iter().all(|&id| id == 2));
    }
}
