//! Per-client-IP budget for creating sessions and rooms (and for missing rooms, so room ids
//! cannot be guessed quickly). Off by default; `--create-rate N` allows N per second per IP
//! with bursts of N. Pure: the caller passes the time.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::time::Micros;

/// Token buckets keyed by client address, pruned as they go idle.
#[derive(Debug, Default)]
pub struct CreateLimiter {
    rate: u32,
    buckets: HashMap<IpAddr, Bucket>,
    next_prune: Micros,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    micro_tokens: u64,
    at: Micros,
}

const TOKEN: u64 = 1_000_000;
/// Above this many tracked addresses, idle (full) buckets are dropped.
const PRUNE_ABOVE: usize = 4096;

impl CreateLimiter {
    /// `rate` per second per IP; 0 turns the limiter off.
    pub fn new(rate: u32) -> CreateLimiter {
        CreateLimiter {
            rate,
            buckets: HashMap::new(),
            next_prune: Micros::ZERO,
        }
    }

    /// Takes one token; `Err(seconds)` (for `Retry-After`) when the budget is spent.
    pub fn take(&mut self, ip: IpAddr, now: Micros) -> Result<(), u32> {
        if self.rate == 0 {
            return Ok(());
        }
        self.prune(now);
        self.check(ip, now)?;
        self.refilled(ip, now).micro_tokens -= TOKEN;
        Ok(())
    }

    /// Whether `take` would succeed now, without taking anything.
    pub fn check(&mut self, ip: IpAddr, now: Micros) -> Result<(), u32> {
        if self.rate == 0 {
            return Ok(());
        }
        let rate = u64::from(self.rate);
        let b = self.refilled(ip, now);
        if b.micro_tokens >= TOKEN {
            Ok(())
        } else {
            let wait_us = (TOKEN - b.micro_tokens).div_ceil(rate);
            Err(wait_us.div_ceil(1_000_000).max(1) as u32)
        }
    }

    /// Addresses tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }

    fn refilled(&mut self, ip: IpAddr, now: Micros) -> &mut Bucket {
        let cap = u64::from(self.rate) * TOKEN;
        let rate = u64::from(self.rate);
        let b = self.buckets.entry(ip).or_insert(Bucket {
            micro_tokens: cap,
            at: now,
        });
        b.micro_tokens = (b.micro_tokens + now.since(b.at).0.saturating_mul(rate)).min(cap);
        b.at = now;
        b
    }

    /// Drops buckets that have refilled completely: they behave exactly like new ones.
    fn prune(&mut self, now: Micros) {
        if self.buckets.len() <= PRUNE_ABOVE || now < self.next_prune {
            return;
        }
        let rate = u64::from(self.rate);
        let cap = rate * TOKEN;
        self.buckets
            .retain(|_, b| b.micro_tokens + now.since(b.at).0.saturating_mul(rate) < cap);
        self.next_prune = now + Micros::from_secs(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    #[test]
    fn off_allows_everything() {
        let mut l = CreateLimiter::new(0);
        for _ in 0..10_000 {
            assert!(l.take(ip(1), Micros::ZERO).is_ok());
        }
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn burst_then_refill_per_ip() {
        let mut l = CreateLimiter::new(3);
        for _ in 0..3 {
            assert!(l.take(ip(1), Micros::ZERO).is_ok());
        }
        assert_eq!(l.take(ip(1), Micros::ZERO), Err(1));
        assert_eq!(l.check(ip(1), Micros::ZERO), Err(1));
        assert!(
            l.take(ip(2), Micros::ZERO).is_ok(),
            "other addresses have their own budget"
        );
        assert!(
            l.take(ip(1), Micros(333_334)).is_ok(),
            "one token after 1/3 s"
        );
        assert!(l.take(ip(1), Micros(333_334)).is_err());
    }

    #[test]
    fn idle_buckets_are_pruned() {
        let mut l = CreateLimiter::new(1);
        for i in 0..5000u32 {
            let a = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            let _ = l.take(a, Micros::ZERO);
        }
        assert!(l.tracked() > PRUNE_ABOVE);
        let _ = l.take(ip(1), Micros::from_secs(10));
        assert!(l.tracked() <= 2, "{}", l.tracked());
    }
}
