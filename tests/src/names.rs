//! Unique, short names for namespaces and interfaces.

use std::sync::atomic::{AtomicU32, Ordering};

/// The kernel keeps interface names in `IFNAMSIZ` (16) bytes including the NUL.
pub const MAX_NAME_LEN: usize = 15;

/// Counts names handed out by this process, so two tests in one run never share a name.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Returns `<prefix>-<pid>-<n>` with pid and counter in base 36, cut to [`MAX_NAME_LEN`].
///
/// The pid keeps parallel test processes and leftovers of a crashed run apart; the counter
/// keeps the tests of one process apart. Base 36 keeps the suffix short (a pid is at most
/// 5 characters), leaving room for a readable prefix. Only the prefix is shortened, never the
/// unique part.
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let suffix = format!("-{}-{}", base36(std::process::id()), base36(n));
    let room = MAX_NAME_LEN.saturating_sub(suffix.len());
    let prefix: String = prefix.chars().take(room).collect();
    format!("{prefix}{suffix}")
}

/// `n` in base 36 (digits and lowercase letters), as names carry pids and counters.
pub fn base36(mut n: u32) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("base36 digits are ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_fit_ifnamsiz() {
        let a = unique_name("a-very-long-interface-prefix");
        let b = unique_name("a-very-long-interface-prefix");
        assert_ne!(a, b);
        assert!(a.len() <= MAX_NAME_LEN, "{a}");
        assert!(a.starts_with("a-very"), "{a}");
    }

    #[test]
    fn base36_digits() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        // The largest pid Linux hands out (pid_max limit 2^22) still fits in 5 digits.
        assert_eq!(base36(1 << 22).len(), 5);
    }
}
