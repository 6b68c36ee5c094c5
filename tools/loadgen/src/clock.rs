//! One monotonic clock for every thread of the process: nanoseconds since a common origin.
//! Latency is `now_ns()` at the receiver minus the `now_ns()` the sender embedded in the message.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// Call once at start-up so the origin is fixed before threads exist (later calls are no-ops).
pub fn init() {
    ORIGIN.get_or_init(Instant::now);
}

pub fn now_ns() -> u64 {
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Time left until `deadline_ns` (zero if it has passed).
pub fn until(deadline_ns: u64) -> Duration {
    Duration::from_nanos(deadline_ns.saturating_sub(now_ns()))
}

pub fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}
