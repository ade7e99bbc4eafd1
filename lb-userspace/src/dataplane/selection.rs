//! Builds a service's selection table: the array of backend ids the kernel indexes with
//! a flow's hash.
//!
//! Each backend gets a share of slots proportional to its weight (largest remainder),
//! and the slots are interleaved with smooth weighted round robin, so the bounded
//! re-selection in the kernel (walking to the next slots when a pick is not active)
//! quickly meets other backends instead of more copies of the same one.

/// Builds a table for `(backend id, weight)` pairs with at most `max_len` slots.
///
/// Weights are reduced by their greatest common divisor, so equal weights give a table
/// of one slot per backend. When the reduced weights do not fit `max_len`, shares are
/// scaled down (each backend with a non-zero weight keeps at least one slot while
/// there is room). Backends with weight 0 get no slot. Returns an empty table when no
/// backend has weight.
pub fn build_table(backends: &[(u32, u32)], max_len: usize) -> Vec<u32> {
    let live: Vec<(u32, u64)> = backends
        .iter()
        .filter(|(_, w)| *w > 0)
        .map(|&(id, w)| (id, w as u64))
        .collect();
    if live.is_empty() || max_len == 0 {
        return Vec::new();
    }
    let g = live.iter().fold(0, |g, &(_, w)| gcd(g, w));
    let reduced: Vec<(u32, u64)> = live.iter().map(|&(id, w)| (id, w / g)).collect();
    let total: u64 = reduced.iter().map(|&(_, w)| w).sum();
    let counts = if total as usize <= max_len {
        reduced.clone()
    } else {
        scale(&reduced, max_len as u64)
    };
    interleave(&counts)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Largest-remainder apportionment of `len` slots by weight.
fn scale(weights: &[(u32, u64)], len: u64) -> Vec<(u32, u64)> {
    let total: u64 = weights.iter().map(|&(_, w)| w).sum();
    let mut out: Vec<(u32, u64, u64)> = weights
        .iter()
        .map(|&(id, w)| {
            let exact = w as u128 * len as u128;
            (
                id,
                (exact / total as u128) as u64,
                (exact % total as u128) as u64,
            )
        })
        .collect();
    let given: u64 = out.iter().map(|&(_, c, _)| c).sum();
    let mut order: Vec<usize> = (0..out.len()).collect();
    order.sort_by(|&a, &b| out[b].2.cmp(&out[a].2).then(a.cmp(&b)));
    for &i in order.iter().take((len - given) as usize) {
        out[i].1 += 1;
    }
    out.into_iter().map(|(id, c, _)| (id, c)).collect()
}

/// Smooth weighted round robin (as in nginx): emits each id `count` times, spread out.
fn interleave(counts: &[(u32, u64)]) -> Vec<u32> {
    let total: i64 = counts.iter().map(|&(_, c)| c as i64).sum();
    let mut current: Vec<i64> = vec![0; counts.len()];
    let mut table = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, &(_, c)) in counts.iter().enumerate() {
            current[i] += c as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        table.push(counts[best].0);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(table: &[u32], id: u32) -> usize {
        table.iter().filter(|&&x| x == id).count()
    }

    #[test]
    fn equal_weights_give_one_slot_each() {
        let t = build_table(&[(1, 5), (2, 5), (3, 5)], 4096);
        assert_eq!(t.len(), 3);
        for id in 1..=3 {
            assert_eq!(share(&t, id), 1);
        }
    }

    #[test]
    fn weights_are_proportional_and_interleaved() {
        let t = build_table(&[(1, 3), (2, 1)], 4096);
        assert_eq!(t.len(), 4);
        assert_eq!(share(&t, 1), 3);
        assert_eq!(share(&t, 2), 1);
        let t = build_table(&[(7, 1), (8, 1), (9, 2)], 4096);
        // id 9 never takes two adjacent slots in a table of four.
        assert_eq!(t.len(), 4);
        assert!(t.windows(2).all(|w| !(w[0] == 9 && w[1] == 9)), "{t:?}");
    }

    #[test]
    fn large_weights_are_scaled_to_the_maximum() {
        let t = build_table(&[(1, 1000), (2, 999), (3, 1)], 100);
        assert_eq!(t.len(), 100);
        assert_eq!(share(&t, 1), 50);
        assert_eq!(share(&t, 2), 50);
        // 1/2000 of the weight is below one slot in 100: it is rounded away.
        assert_eq!(share(&t, 3), 0);
    }

    #[test]
    fn zero_weights_and_empty_input_give_no_slots() {
        assert!(build_table(&[], 10).is_empty());
        assert!(build_table(&[(1, 0)], 10).is_empty());
        assert_eq!(build_table(&[(1, 0), (2, 4)], 10), vec![2]);
    }
}
