//! Durations as Istio reads them: Go's `time.ParseDuration` form (`1s`, `1.5s`, `500ms`,
//! `1h30m`), which is what `kubectl apply` accepts for DestinationRule durations.
//! <https://pkg.go.dev/time#ParseDuration>

use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DurationError {
    Invalid,
    Negative,
    TooLong,
}

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Parses a sequence of decimal numbers, each with an optional fraction and a unit
/// (`ns`, `us`/`µs`, `ms`, `s`, `m`, `h`). A bare `0` is the only number without a unit.
pub(super) fn parse_go_duration(text: &str) -> Result<Duration, DurationError> {
    if text.starts_with('-') {
        return Err(DurationError::Negative);
    }
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(DurationError::Invalid);
    }
    let mut total_ns: u128 = 0;
    while !rest.is_empty() {
        let (whole, after) = split_digits(rest);
        let (fraction, after) = match after.strip_prefix('.') {
            Some(after_dot) => split_digits(after_dot),
            None => ("", after),
        };
        if whole.is_empty() && fraction.is_empty() {
            return Err(DurationError::Invalid);
        }
        let unit_len = after
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_ns: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => NANOS_PER_SEC,
            "m" => 60 * NANOS_PER_SEC,
            "h" => 3600 * NANOS_PER_SEC,
            _ => return Err(DurationError::Invalid),
        };
        let whole_ns = decimal(whole)?
            .checked_mul(unit_ns)
            .ok_or(DurationError::TooLong)?;
        // Digits past the 18th cannot change the result by a nanosecond (units are ≤ 1h).
        let fraction = &fraction[..fraction.len().min(18)];
        let fraction_ns = decimal(fraction)? * unit_ns / 10u128.pow(fraction.len() as u32);
        total_ns = total_ns
            .checked_add(whole_ns + fraction_ns)
            .ok_or(DurationError::TooLong)?;
        rest = after;
    }
    let secs = u64::try_from(total_ns / NANOS_PER_SEC).map_err(|_| DurationError::TooLong)?;
    // The remainder is below 10⁹, so it fits.
    let nanos = (total_ns % NANOS_PER_SEC) as u32;
    Ok(Duration::new(secs, nanos))
}

fn split_digits(s: &str) -> (&str, &str) {
    s.split_at(s.bytes().take_while(u8::is_ascii_digit).count())
}

fn decimal(digits: &str) -> Result<u128, DurationError> {
    if digits.is_empty() {
        return Ok(0);
    }
    digits.parse().map_err(|_| DurationError::TooLong)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_go_reads() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("1s", ms(1000)),
            ("1.5s", ms(1500)),
            (".5s", ms(500)),
            ("1.s", ms(1000)),
            ("10m", ms(600_000)),
            ("1h30m", ms(5_400_000)),
            ("500ms", ms(500)),
            ("+2s", ms(2000)),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("1us", Duration::from_micros(1)),
            ("1µs", Duration::from_micros(1)),
            ("3ns", Duration::from_nanos(3)),
            ("0.000000001s", Duration::from_nanos(1)),
        ] {
            assert_eq!(parse_go_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn refuses_what_go_refuses() {
        for text in [
            "", "1", "1.5", "s", ".s", "1d", "1 s", "soon", "1s2", "1..5s",
        ] {
            assert_eq!(
                parse_go_duration(text),
                Err(DurationError::Invalid),
                "{text:?}"
            );
        }
        assert_eq!(parse_go_duration("-1s"), Err(DurationError::Negative));
        assert_eq!(
            parse_go_duration("99999999999999999999999999h"),
            Err(DurationError::TooLong)
        );
    }
}
