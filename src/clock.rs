//! Time as the gateway speaks it: Unix milliseconds, Zeqonds, and RFC 3339 strings.
//!
//! A Zeqond is `floor(unix_ms / 777)`; it is the log's clock and the agent ticker's cadence.
//! Wall clocks on gateways jump (no RTC, late NTP), so nothing orders by these values: the
//! log orders by its per-machine sequence. They are recorded, never trusted for ordering.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds in one Zeqond.
pub const ZEQOND_MS: i64 = 777;

/// Wall-clock Unix time in milliseconds (0 if the clock is before 1970, as on a board without RTC).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The Zeqond containing `unix_ms`.
pub fn zeqond(unix_ms: i64) -> u64 {
    unix_ms.max(0) as u64 / ZEQOND_MS as u64
}

/// `2026-04-28T01:49:00Z`: seconds precision, UTC, as spec 000 prints timestamps.
pub fn rfc3339(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        // 2026-04-28T01:49:00Z, the instant of spec 000's example.
        assert_eq!(rfc3339(1_777_340_940_000), "2026-04-28T01:49:00Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(-1000), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn zeqond_is_floor_of_ms_over_777() {
        assert_eq!(zeqond(0), 0);
        assert_eq!(zeqond(776), 0);
        assert_eq!(zeqond(777), 1);
        assert_eq!(zeqond(1_777_340_940_000), 1_777_340_940_000 / 777);
        assert_eq!(zeqond(-5), 0);
    }
}
