//! Rate-limited log lines for events an attacker can repeat (limits hit, refused
//! connections, slow consumers): at most one line per kind per interval, and the next line
//! says how many were left out, so logs stay useful at `info` under abuse.

use crate::time::Micros;

/// The kinds of repeatable events that are logged at `info` or `warn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogEvent {
    /// Connections refused for the server or an address being full.
    ConnectionLimit,
    /// `accept()` failed (e.g. out of file descriptors).
    AcceptError,
    /// A connection closed because its output queue overflowed.
    SlowConsumer,
    /// An HTTP request refused for a limit (size, count, rate).
    HttpLimit,
    /// A WebSocket closed or a message refused for a limit (size, rate, protocol).
    WsLimit,
    /// A connection closed by a timeout.
    Timeout,
    /// The Redis link failed or was refused.
    Redis,
    /// A TLS handshake or record failed.
    Tls,
}

const KINDS: usize = 8;
const INTERVAL: Micros = Micros(10_000_000);

/// Remembers, per [`LogEvent`] kind, when the next line may be written (one per 10 s) and how
/// many were held back since the last; used through [`limit_log!`](crate::limit_log).
#[derive(Debug, Default)]
pub struct LogThrottle {
    next: [Micros; KINDS],
    suppressed: [u64; KINDS],
}

impl LogThrottle {
    /// `Some(n)` when a line may be written now (`n` lines were left out before it).
    pub fn allow(&mut self, event: LogEvent, now: Micros) -> Option<u64> {
        let i = event as usize;
        if now < self.next[i] {
            self.suppressed[i] += 1;
            return None;
        }
        self.next[i] = now + INTERVAL;
        Some(std::mem::take(&mut self.suppressed[i]))
    }
}

/// Logs through a throttle: `limit_log!(throttle, LogEvent::X, now, level, "fmt", args)`.
#[macro_export]
macro_rules! limit_log {
    ($throttle:expr, $event:expr, $now:expr, $level:ident, $($arg:tt)+) => {
        if let Some(left_out) = $throttle.allow($event, $now) {
            if left_out > 0 {
                log::$level!("{} (and {} more like it)", format_args!($($arg)+), left_out);
            } else {
                log::$level!($($arg)+);
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_per_kind_with_a_count_of_the_rest() {
        let mut t = LogThrottle::default();
        assert_eq!(t.allow(LogEvent::SlowConsumer, Micros(0)), Some(0));
        assert_eq!(t.allow(LogEvent::SlowConsumer, Micros(1)), None);
        assert_eq!(t.allow(LogEvent::SlowConsumer, Micros(2)), None);
        assert_eq!(
            t.allow(LogEvent::HttpLimit, Micros(2)),
            Some(0),
            "kinds are independent"
        );
        assert_eq!(t.allow(LogEvent::SlowConsumer, INTERVAL), Some(2));
        assert_eq!(t.allow(LogEvent::SlowConsumer, INTERVAL + Micros(1)), None);
    }
}
