//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! Values are taken exactly as they sit in the packet (network byte order read as native
//! integers): the one's complement sum does not depend on byte order (RFC 1071 §2(B)),
//! so no swapping is needed on the per-packet path.

#[inline(always)]
const fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Checksum after a 16-bit field changed from `from` to `to`.
#[inline(always)]
pub const fn replace2(check: u16, from: u16, to: u16) -> u16 {
    let sum = (!check) as u64 + (!from) as u64 + to as u64;
    !fold(sum)
}

/// Checksum after a 32-bit field changed from `from` to `to`.
#[inline(always)]
pub const fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let nf = !from;
    let sum = (!check) as u64
        + (nf & 0xffff) as u64
        + (nf >> 16) as u64
        + (to & 0xffff) as u64
        + (to >> 16) as u64;
    !fold(sum)
}

/// UDP over IPv4 marks "no checksum" with 0, and a computed 0 is sent as 0xffff
/// (RFC 768). A packet without a checksum keeps having none.
#[inline(always)]
pub const fn udp_replace4(check: u16, from: u32, to: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    let c = replace4(check, from, to);
    if c == 0 {
        0xffff
    } else {
        c
    }
}

#[inline(always)]
pub const fn udp_replace2(check: u16, from: u16, to: u16) -> u16 {
    if check == 0 {
        return 0;
    }
    let c = replace2(check, from, to);
    if c == 0 {
        0xffff
    } else {
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full checksum of `data` (even length), as the words sit in memory.
    fn full(data: &[u8]) -> u16 {
        let mut sum = 0u64;
        for w in data.chunks(2) {
            sum += u16::from_ne_bytes([w[0], w[1]]) as u64;
        }
        !fold(sum)
    }

    #[test]
    fn incremental_update_matches_full_recomputation() {
        let mut seed = 0x1234_5678u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for _ in 0..10_000 {
            let mut buf = [0u8; 20];
            for b in buf.iter_mut() {
                *b = next() as u8;
            }
            buf[10] = 0;
            buf[11] = 0;
            let c = full(&buf).to_ne_bytes();
            buf[10..12].copy_from_slice(&c);
            let at = 12 + (next() % 2) as usize * 4;
            let from = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap());
            let to = next();
            buf[at..at + 4].copy_from_slice(&to.to_ne_bytes());
            let updated = replace4(u16::from_ne_bytes(c), from, to);
            buf[10] = 0;
            buf[11] = 0;
            let want = full(&buf);
            // 0x0000 and 0xffff are the same value in one's complement.
            assert!(
                updated == want
                    || (updated == 0xffff && want == 0)
                    || (updated == 0 && want == 0xffff),
                "{updated:#x} != {want:#x}"
            );
        }
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(udp_replace4(0, 1, 2), 0);
        assert_eq!(udp_replace2(0, 1, 2), 0);
    }
}
