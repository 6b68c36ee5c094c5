//! Per-client-address budgets: the key every per-address table uses ([`ip_key`]), and the
//! budget for creating sessions and rooms (and for missing rooms, so room ids cannot be guessed
//! quickly). `--create-rate R --create-burst B` allows R per second per address, sustained, and
//! bursts of B; on by default (2 per second, bursts of 60), `--create-rate 0` turns it off.
//! Pure: the caller passes the time.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::time::Micros;

/// What identifies one client in every per-address table.
///
/// An IPv4 address counts as itself, also when it arrives IPv4-mapped (`::ffff:a.b.c.d`, as on
/// a dual-stack listener). An IPv6 address counts by its /64 prefix: one subscriber, home or
/// host usually gets a whole /64 and can pick any of its 2^64 addresses, so keying single
/// IPv6 addresses would give one client endless budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpKey {
    /// An IPv4 address, all of it.
    V4([u8; 4]),
    /// The first 64 bits of the address.
    V6Net(u64),
}

/// The one key function for client addresses (see [`IpKey`]).
pub fn ip_key(ip: IpAddr) -> IpKey {
    match ip {
        IpAddr::V4(v4) => IpKey::V4(v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpKey::V4(v4.octets()),
            None => IpKey::V6Net((v6.to_bits() >> 64) as u64),
        },
    }
}

/// Connections from one address beyond `--max-connections-per-ip` that are kept only to be
/// answered 503; more are closed at once, so one address never holds more than its limit plus
/// these.
pub const CONN_OVERFLOW: u32 = 4;

/// Open connections per client address, for `--max-connections-per-ip`.
///
/// An address has an entry only while it has connections: every connection counted by
/// [`ConnCounter::admit`] is released by [`ConnCounter::release`] when it is dropped.
#[derive(Debug, Default)]
pub struct ConnCounter {
    limit: u32,
    open: HashMap<IpKey, u32>,
}

/// What to do with a new connection from an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Serve it; counted under this key (`None`: the limit is off, nothing counted).
    Serve(Option<IpKey>),
    /// Over the limit: counted under this key, kept only to answer 503 and close.
    Refuse(IpKey),
    /// Far over the limit: close it at once (not counted).
    Drop,
}

impl ConnCounter {
    /// `limit` connections per address; 0 turns the limit off.
    pub fn new(limit: usize) -> ConnCounter {
        ConnCounter {
            limit: u32::try_from(limit).unwrap_or(u32::MAX),
            open: HashMap::new(),
        }
    }

    /// Counts a new connection from `ip` (unless it is to be dropped) and says what to do.
    pub fn admit(&mut self, ip: IpAddr) -> Admit {
        if self.limit == 0 {
            return Admit::Serve(None);
        }
        let key = ip_key(ip);
        let n = self.open.get(&key).copied().unwrap_or(0);
        if n >= self.limit.saturating_add(CONN_OVERFLOW) {
            return Admit::Drop;
        }
        self.open.insert(key, n + 1);
        if n >= self.limit {
            Admit::Refuse(key)
        } else {
            Admit::Serve(Some(key))
        }
    }

    /// A connection counted under `key` is gone.
    pub fn release(&mut self, key: IpKey) {
        if let Some(n) = self.open.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.open.remove(&key);
            }
        }
    }

    /// Addresses with open connections (for tests).
    pub fn addresses(&self) -> usize {
        self.open.len()
    }
}

/// Token buckets keyed by client address, pruned as they refill.
///
/// Only addresses that have spent something are tracked, and a bucket that has refilled is
/// dropped (it behaves exactly like a missing one). A bucket missing `k` tokens refills in
/// `k / rate` seconds, so each token taken keeps one entry for `1 / rate` seconds: however
/// many addresses an attacker spends from, the table holds about `tokens taken per second /
/// rate` entries, plus those that refilled since the last prune (which runs at most once a
/// second once more than 4096 are tracked). At the default rate of 2 that is at most 1.5
/// entries per request the server answered in the last second (a few MB at full speed; the
/// unit test `many_addresses_at_full_speed_stay_bounded` checks it).
#[derive(Debug, Default)]
pub struct CreateLimiter {
    rate: u32,
    burst: u32,
    buckets: HashMap<IpKey, TokenBucket>,
    next_prune: Micros,
}

/// A token bucket in micro-tokens: `rate` tokens come back per second, up to `burst`. The
/// owner keeps the rate and burst (one setting shared by many buckets); the bucket keeps only
/// its level and when it was last filled. The one token bucket of chatloop: per address here,
/// per session in the hub (chat, upgrades), per chat socket in `conn` (frames).
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    micro_tokens: u64,
    at: Micros,
}

const TOKEN: u64 = 1_000_000;
/// Above this many tracked addresses, refilled buckets are dropped (at most once a second).
const PRUNE_ABOVE: usize = 4096;

impl CreateLimiter {
    /// `rate` per second per address, sustained, with bursts of `burst`; rate 0 turns the
    /// limiter off.
    pub fn new(rate: u32, burst: u32) -> CreateLimiter {
        CreateLimiter {
            rate,
            burst: burst.max(1),
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
        let key = ip_key(ip);
        let (rate, burst) = (self.rate, self.burst);
        let b = self
            .buckets
            .entry(key)
            .or_insert(TokenBucket::full(burst, now));
        if b.take(now, rate, burst) {
            Ok(())
        } else {
            Err(b.wait_secs(rate))
        }
    }

    /// Whether `take` would succeed now, without taking anything (or tracking the address).
    pub fn check(&mut self, ip: IpAddr, now: Micros) -> Result<(), u32> {
        if self.rate == 0 {
            return Ok(());
        }
        let (rate, burst) = (self.rate, self.burst);
        match self.buckets.get_mut(&ip_key(ip)) {
            None => Ok(()),
            Some(b) => {
                if b.has_token(now, rate, burst) {
                    Ok(())
                } else {
                    Err(b.wait_secs(rate))
                }
            }
        }
    }

    /// Addresses tracked (for tests and metrics).
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }

    /// Drops buckets that have refilled completely: they behave exactly like new ones.
    fn prune(&mut self, now: Micros) {
        if self.buckets.len() <= PRUNE_ABOVE || now < self.next_prune {
            return;
        }
        let (rate, burst) = (self.rate, self.burst);
        self.buckets.retain(|_, b| !b.is_full(now, rate, burst));
        if self.buckets.capacity() > 4 * self.buckets.len().max(PRUNE_ABOVE) {
            self.buckets
                .shrink_to(2 * self.buckets.len().max(PRUNE_ABOVE));
        }
        self.next_prune = now + Micros::from_secs(1);
    }
}

impl TokenBucket {
    /// A full bucket of `burst` tokens.
    pub fn full(burst: u32, now: Micros) -> TokenBucket {
        TokenBucket {
            micro_tokens: u64::from(burst) * TOKEN,
            at: now,
        }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, now: Micros, rate: u32, burst: u32) -> bool {
        let ok = self.has_token(now, rate, burst);
        if ok {
            self.micro_tokens -= TOKEN;
        }
        ok
    }

    /// Whether a token is there (after refilling up to `now`), without taking it.
    pub fn has_token(&mut self, now: Micros, rate: u32, burst: u32) -> bool {
        self.micro_tokens = self.level(now, rate).min(u64::from(burst) * TOKEN);
        self.at = now;
        self.micro_tokens >= TOKEN
    }

    /// Whether it has refilled completely by `now` (it then behaves like a new one).
    pub fn is_full(&self, now: Micros, rate: u32, burst: u32) -> bool {
        self.level(now, rate) >= u64::from(burst) * TOKEN
    }

    /// Whole seconds until the next token (at least 1), after a `take` that failed.
    pub fn wait_secs(&self, rate: u32) -> u32 {
        let missing = TOKEN.saturating_sub(self.micro_tokens);
        let us = missing.div_ceil(u64::from(rate.max(1)));
        u32::try_from(us.div_ceil(1_000_000).max(1)).unwrap_or(u32::MAX)
    }

    /// Micro-tokens at `now`, before the cap.
    fn level(&self, now: Micros, rate: u32) -> u64 {
        self.micro_tokens
            .saturating_add(now.since(self.at).0.saturating_mul(u64::from(rate)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    fn v6(s: &str) -> IpAddr {
        s.parse::<Ipv6Addr>().unwrap().into()
    }

    #[test]
    fn off_allows_everything() {
        let mut l = CreateLimiter::new(0, 1);
        for _ in 0..10_000 {
            assert!(l.take(ip(1), Micros::ZERO).is_ok());
        }
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn burst_then_refill_per_ip() {
        let mut l = CreateLimiter::new(3, 3);
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
    fn the_burst_and_the_sustained_rate_are_separate() {
        // The defaults: bursts of 60, then 2 per second.
        let mut l = CreateLimiter::new(2, 60);
        for i in 0..60 {
            assert!(l.take(ip(1), Micros::ZERO).is_ok(), "burst {i}");
        }
        assert_eq!(l.take(ip(1), Micros::ZERO), Err(1));
        // 10 s later: 20 more, not 60.
        let t = Micros::from_secs(10);
        let ok = (0..60).filter(|_| l.take(ip(1), t).is_ok()).count();
        assert_eq!(ok, 20);
        // A slow rate gives a longer Retry-After.
        let mut slow = CreateLimiter::new(1, 1);
        assert!(slow.take(ip(1), Micros::ZERO).is_ok());
        assert_eq!(slow.take(ip(1), Micros(1)), Err(1));
        let mut slower = CreateLimiter::new(1, 1);
        let _ = slower.take(ip(1), Micros::ZERO);
        assert_eq!(slower.check(ip(1), Micros(100_000)), Err(1));
    }

    #[test]
    fn check_does_not_track_new_addresses() {
        let mut l = CreateLimiter::new(2, 60);
        for i in 0..=255 {
            assert!(l.check(ip(i), Micros::ZERO).is_ok());
        }
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let a = v6("2001:db8:1:2::1");
        let b = v6("2001:db8:1:2:ffff:ffff:ffff:ffff");
        let other = v6("2001:db8:1:3::1");
        assert_eq!(ip_key(a), ip_key(b), "one /64, one key");
        assert_ne!(ip_key(a), ip_key(other), "the next /64 is another client");
        assert_eq!(ip_key(a), IpKey::V6Net(0x2001_0db8_0001_0002));
        assert_eq!(ip_key(v6("::ffff:127.0.0.2")), ip_key(ip(2)));
        assert_ne!(ip_key(v6("::1")), ip_key(ip(1)));
        assert_ne!(ip_key(ip(1)), ip_key(ip(2)), "IPv4 counts per address");

        // Spending from many addresses of one /64 spends one budget.
        let mut l = CreateLimiter::new(1, 3);
        for i in 0..3u16 {
            let addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 2, i, i, i, i);
            assert!(l.take(addr.into(), Micros::ZERO).is_ok());
        }
        let fresh = Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 9, 9, 9, 9);
        assert_eq!(l.take(fresh.into(), Micros::ZERO), Err(1));
        assert!(l.take(other, Micros::ZERO).is_ok());
        assert_eq!(l.tracked(), 2);
    }

    #[test]
    fn connections_are_counted_per_address_while_open() {
        let mut c = ConnCounter::new(2);
        let a = ip(1);
        assert_eq!(c.admit(a), Admit::Serve(Some(ip_key(a))));
        assert_eq!(c.admit(a), Admit::Serve(Some(ip_key(a))));
        for _ in 0..CONN_OVERFLOW {
            assert_eq!(c.admit(a), Admit::Refuse(ip_key(a)));
        }
        assert_eq!(c.admit(a), Admit::Drop, "limit + overflow: not even kept");
        assert_eq!(c.admit(a), Admit::Drop);
        // Another address, and another address of the same /64, as IPv6.
        assert_eq!(c.admit(ip(2)), Admit::Serve(Some(ip_key(ip(2)))));
        let v6a = v6("2001:db8::1");
        let v6b = v6("2001:db8::2");
        assert!(matches!(c.admit(v6a), Admit::Serve(Some(_))));
        assert!(matches!(c.admit(v6b), Admit::Serve(Some(_))));
        assert!(matches!(c.admit(v6("2001:db8::3")), Admit::Refuse(_)));
        assert_eq!(c.addresses(), 3);
        // Closing one makes room for one; closing all forgets the address.
        for _ in 0..CONN_OVERFLOW {
            c.release(ip_key(a));
        }
        c.release(ip_key(a));
        assert_eq!(c.admit(a), Admit::Serve(Some(ip_key(a))));
        c.release(ip_key(a));
        c.release(ip_key(a));
        c.release(ip_key(a)); // one too many: harmless
        c.release(ip_key(ip(2)));
        for _ in 0..3 {
            c.release(ip_key(v6a));
        }
        assert_eq!(c.addresses(), 0, "no entry without connections");
        // Off: nothing counted.
        let mut off = ConnCounter::new(0);
        for _ in 0..10_000 {
            assert_eq!(off.admit(a), Admit::Serve(None));
        }
        assert_eq!(off.addresses(), 0);
    }

    #[test]
    fn idle_buckets_are_pruned() {
        let mut l = CreateLimiter::new(1, 1);
        for i in 0..5000u32 {
            let a = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            let _ = l.take(a, Micros::ZERO);
        }
        assert!(l.tracked() > PRUNE_ABOVE);
        let _ = l.take(ip(1), Micros::from_secs(10));
        assert!(l.tracked() <= 2, "{}", l.tracked());
    }

    #[test]
    fn many_addresses_at_full_speed_stay_bounded() {
        // The worst case: every request from a new /64 (an attacker with a /32 has 2^32 of
        // them), 100 000 requests a second for 20 s, each spending a whole burst.
        let (rate, burst) = (2, 60);
        let mut l = CreateLimiter::new(rate, burst);
        let per_sec = 100_000u64;
        let mut peak = 0;
        let mut n = 0u64;
        for us in (0..20_000_000u64).step_by((1_000_000 / per_sec) as usize) {
            n += 1;
            let net = 0x2001_0db8_0000_0000u64 + n / u64::from(burst);
            let addr = Ipv6Addr::from_bits(u128::from(net) << 64 | 1);
            let _ = l.take(addr.into(), Micros(us));
            peak = peak.max(l.tracked());
        }
        // Each token keeps an entry for 1/rate s; pruning runs once a second.
        let bound = per_sec as usize * (1 + 1) / rate as usize + per_sec as usize + PRUNE_ABOVE;
        assert!(peak <= bound, "peak {peak} over {bound}");
        // Each entry here spends a whole burst, so it is tracked for burst/rate s; the
        // table still holds what about one prune interval and one refill time brought.
        let expected = (per_sec / u64::from(burst)) as usize * (burst / rate + 1) as usize;
        assert!(peak <= expected + PRUNE_ABOVE, "peak {peak} vs {expected}");
        // Once the attack stops, the table empties at the next prune.
        let _ = l.take(ip(1), Micros::from_secs(60));
        assert!(l.tracked() <= 1, "{}", l.tracked());
    }
}
