//! Time as plain numbers: the clock is an input, never read by the pure modules.
//!
//! `Micros` is monotonic time in microseconds since the server started (the event loop
//! reads `std::time::Instant` once per iteration and passes it in). Wall-clock time, needed
//! only for message timestamps and UUID v7 ids, travels beside it as `UnixMicros`.

use std::io::Write as _;
use std::ops::{Add, Sub};
use std::time::Duration;

/// Monotonic microseconds since an arbitrary origin (the server's start).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Micros(pub u64);

impl Micros {
    /// The server's start (the origin).
    pub const ZERO: Micros = Micros(0);
    /// Later than any time the server reaches: "never" for deadlines.
    pub const MAX: Micros = Micros(u64::MAX);

    /// A `Duration` in whole microseconds (saturating at [`Micros::MAX`]).
    pub fn from_duration(d: Duration) -> Micros {
        Micros(u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }

    /// Milliseconds, saturating at [`Micros::MAX`].
    pub fn from_millis(ms: u64) -> Micros {
        Micros(ms.saturating_mul(1000))
    }

    /// Seconds, saturating at [`Micros::MAX`].
    pub fn from_secs(s: u64) -> Micros {
        Micros(s.saturating_mul(1_000_000))
    }

    /// `self - earlier`, or zero when `earlier` is later.
    pub fn since(self, earlier: Micros) -> Micros {
        Micros(self.0.saturating_sub(earlier.0))
    }
}

impl Add for Micros {
    type Output = Micros;
    fn add(self, rhs: Micros) -> Micros {
        Micros(self.0.saturating_add(rhs.0))
    }
}

impl Sub for Micros {
    type Output = Micros;
    fn sub(self, rhs: Micros) -> Micros {
        Micros(self.0.saturating_sub(rhs.0))
    }
}

/// Wall-clock microseconds since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct UnixMicros(pub u64);

/// The two clocks, read together once per loop iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Now {
    /// Monotonic time since the server started: deadlines and timers.
    pub mono: Micros,
    /// Wall-clock time: message timestamps and ids only.
    pub wall: UnixMicros,
}

impl Now {
    /// A fake clock for tests: wall time is a fixed epoch plus the monotonic time.
    pub fn fake(mono_us: u64) -> Now {
        Now {
            mono: Micros(mono_us),
            wall: UnixMicros(1_755_611_100_000_000 + mono_us),
        }
    }
}

/// Appends `t` as ISO 8601 UTC with microseconds and `Z`: `2025-08-19T13:45:00.123456Z`.
pub fn write_iso8601(out: &mut Vec<u8>, t: UnixMicros) {
    let secs = t.0 / 1_000_000;
    let micros = t.0 % 1_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    );
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's `civil_from_days`.
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

    fn iso(us: u64) -> String {
        let mut s = Vec::new();
        write_iso8601(&mut s, UnixMicros(us));
        String::from_utf8(s).unwrap()
    }

    #[test]
    fn formats_epoch_and_known_dates() {
        assert_eq!(iso(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(iso(1_755_611_100_123_456), "2025-08-19T13:45:00.123456Z");
        // Leap day and end of a leap year.
        assert_eq!(iso(951_782_400_000_000), "2000-02-29T00:00:00.000000Z");
        assert_eq!(iso(1_735_689_599_999_999), "2024-12-31T23:59:59.999999Z");
    }

    #[test]
    fn micros_arithmetic_saturates() {
        assert_eq!(Micros(5) - Micros(7), Micros(0));
        assert_eq!(Micros(u64::MAX) + Micros(1), Micros::MAX);
        assert_eq!(Micros(10).since(Micros(4)), Micros(6));
    }
}
