//! Timer wheel: every deadline in the server in one place, with O(1) arming and O(levels) polling.
//!
//! A hierarchical hashed wheel after tokio's `runtime/time/wheel`, simplified: one tick is 1 ms,
//! and there are 6 levels of 64 slots, so a slot on level `n` spans `64^n` ticks and the whole
//! wheel spans `64^6` ms (about 2.2 years). An entry sits on the lowest level on which its
//! deadline and the current tick fall in the same slot of the level above. When a slot on a
//! higher level comes due, its entries cascade to lower levels. Level 0 slots are single ticks,
//! and their entries fire.
//!
//! - Deadlines are rounded *up* to whole milliseconds, so an item never fires early. An event
//!   loop that sleeps until [`Wheel::next_deadline`] gets each item less than 1 ms late.
//! - A deadline that has already passed fires on the next [`Wheel::advance`].
//! - A deadline more than `64^6 - 1` ms ahead is clamped to that and fires early. Owners must
//!   check their own deadline when an item fires, and re-arm if it's still in the future.
//! - There is no cancel. Cancelling is lazy and is the owners' job: put a generation number in
//!   `T`, bump it to cancel or re-arm, and ignore items whose generation is stale. Stale items
//!   still count in [`Wheel::len`] until they fire.
//!
//! ```
//! use chatloop::time::Micros;
//! use chatloop::timer::Wheel;
//!
//! let mut idle_gen = 0u32; // the connection's current idle-timer generation
//! let mut wheel = Wheel::new();
//! wheel.arm(Micros::from_secs(30), (7usize, idle_gen)); // (connection id, generation)
//! idle_gen += 1; // activity: the armed timer is now stale...
//! wheel.arm(Micros::from_secs(45), (7, idle_gen)); // ...and a new one replaces it
//!
//! let mut fired = Vec::new();
//! wheel.advance(Micros::from_secs(45), &mut fired);
//! assert_eq!(fired, [(7, 0), (7, 1)]);
//! fired.retain(|&(_, generation)| generation == idle_gen);
//! assert_eq!(fired, [(7, 1)]);
//! ```

use std::mem;

use crate::time::Micros;

/// A hierarchical timer wheel of `T`s, each armed for a deadline.
#[derive(Debug)]
pub struct Wheel<T> {
    /// The current tick (ms). Every stored deadline is at or after it.
    elapsed: u64,
    levels: [Level<T>; LEVELS],
    len: usize,
}

impl<T: Copy> Wheel<T> {
    /// An empty wheel whose clock starts at `Micros(0)`.
    pub fn new() -> Self {
        Wheel {
            elapsed: 0,
            levels: std::array::from_fn(|_| Level::new()),
            len: 0,
        }
    }

    /// Arms `item` to fire at `deadline`, rounded up to the next whole ms. O(1).
    pub fn arm(&mut self, deadline: Micros, item: T) {
        let tick = deadline.0.div_ceil(TICK_MICROS);
        let tick = tick.clamp(self.elapsed, self.elapsed + MAX_SPAN);
        self.insert(Entry { tick, item });
        self.len += 1;
    }

    /// Returns when `advance` next has work to do: either an item fires or a slot cascades.
    ///
    /// This is a good poll timeout. It's never later than the earliest (rounded) deadline, and
    /// it's in the past only when an item is already due. `None` means nothing is armed. O(levels).
    pub fn next_deadline(&self) -> Option<Micros> {
        self.next_expiration()
            .map(|exp| Micros(exp.tick.saturating_mul(TICK_MICROS)))
    }

    /// Moves the clock to `now` and appends to `out` every item whose rounded deadline is at or
    /// before `now`, in deadline order. A `now` earlier than the wheel's clock moves nothing
    /// but still yields the items that are due.
    pub fn advance(&mut self, now: Micros, out: &mut Vec<T>) {
        let now = (now.0 / TICK_MICROS).max(self.elapsed);
        while let Some(exp) = self.next_expiration().filter(|exp| exp.tick <= now) {
            self.elapsed = exp.tick;
            let level = &mut self.levels[exp.level];
            level.occupied &= !(1 << exp.slot);
            // Take the Vec, then put it back empty, so it keeps its capacity.
            let mut entries = mem::take(&mut level.slots[exp.slot]);
            if exp.level == 0 {
                // A level-0 slot holds exactly one tick, the one that just came due.
                self.len -= entries.len();
                out.extend(entries.drain(..).map(|entry| entry.item));
            } else {
                // The entries now share a higher-level slot with `elapsed`, so every one
                // re-lands on a lower level, never back in this slot.
                for entry in entries.drain(..) {
                    self.insert(entry);
                }
            }
            debug_assert!(self.levels[exp.level].slots[exp.slot].is_empty());
            self.levels[exp.level].slots[exp.slot] = entries;
        }
        self.elapsed = now;
    }

    /// How many items are armed, including stale ones that their owners will ignore.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Total capacity of all slot Vecs. Tests use it to check that the steady state doesn't allocate.
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.levels
            .iter()
            .flat_map(|level| &level.slots)
            .map(Vec::capacity)
            .sum()
    }

    /// Stores `entry` (with `entry.tick >= self.elapsed`) on its level relative to `elapsed`.
    fn insert(&mut self, entry: Entry<T>) {
        let level = level_for(self.elapsed, entry.tick);
        let slot = ((entry.tick >> (LEVEL_BITS * level)) & SLOT_MASK) as usize;
        let level = &mut self.levels[level];
        level.occupied |= 1 << slot;
        level.slots[slot].push(entry);
    }

    /// The earliest slot that is due or must cascade, and the tick at which that happens.
    ///
    /// Every entry on level `n` shares its slot on level `n + 1` with `elapsed`. So a lower
    /// level always comes due first, and within a level the next occupied slot at or after
    /// the current one is the earliest. The exception is the top level, which has no level
    /// above it. There, entries that wrapped into the next revolution sit in slots at or
    /// before the current one. Searching around the ring from just after the current slot
    /// counts them as a full revolution later, which is correct.
    fn next_expiration(&self) -> Option<Expiration> {
        self.levels.iter().enumerate().find_map(|(index, level)| {
            if level.occupied == 0 {
                return None;
            }
            let shift = LEVEL_BITS * index;
            // Level 0's current slot holds due items. A higher level's current slot holds only
            // entries that wrapped (top level), so the search starts after it.
            let first = (self.elapsed >> shift) + u64::from(index > 0);
            let skip = level
                .occupied
                .rotate_right((first & SLOT_MASK) as u32)
                .trailing_zeros();
            // The slot's number counted from tick 0, so the wheel's revolutions are included.
            let slot_number = first + u64::from(skip);
            Some(Expiration {
                level: index,
                slot: (slot_number & SLOT_MASK) as usize,
                tick: slot_number << shift,
            })
        })
    }
}

impl<T: Copy> Default for Wheel<T> {
    fn default() -> Self {
        Self::new()
    }
}

const TICK_MICROS: u64 = 1000;
const LEVEL_BITS: usize = 6;
const SLOTS: usize = 1 << LEVEL_BITS;
const SLOT_MASK: u64 = SLOTS as u64 - 1;
const LEVELS: usize = 6;
/// The furthest ahead a deadline can be, in ticks: just under one turn of the top level.
const MAX_SPAN: u64 = (1 << (LEVEL_BITS * LEVELS)) - 1;

#[derive(Debug)]
struct Level<T> {
    /// Bit `i` is set when `slots[i]` is non-empty.
    occupied: u64,
    slots: [Vec<Entry<T>>; SLOTS],
}

impl<T> Level<T> {
    fn new() -> Self {
        Level {
            occupied: 0,
            slots: std::array::from_fn(|_| Vec::new()),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry<T> {
    /// The deadline in ticks, already rounded and clamped.
    tick: u64,
    item: T,
}

#[derive(Debug, Clone, Copy)]
struct Expiration {
    level: usize,
    slot: usize,
    tick: u64,
}

/// The level for a deadline `tick`: the level of the highest 6-bit group in which it differs
/// from `elapsed`. Level 0 if it differs in none. A deadline in the next revolution of the top
/// level differs above all groups and goes to the top level.
fn level_for(elapsed: u64, tick: u64) -> usize {
    let masked = (elapsed ^ tick) | SLOT_MASK;
    let significant = (63 - masked.leading_zeros()) as usize;
    (significant / LEVEL_BITS).min(LEVELS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const SEC: u64 = 1000;
    const HOUR: u64 = 3600 * SEC;
    const DAY: u64 = 24 * HOUR;

    fn ms(n: u64) -> Micros {
        Micros::from_millis(n)
    }

    /// `t` rounded up to a whole millisecond: the earliest `now` at which it can fire.
    fn ceil_ms(t: Micros) -> Micros {
        Micros(t.0.div_ceil(1000) * 1000)
    }

    /// A wheel whose clock has been advanced to `origin`.
    fn wheel_at<T: Copy>(origin: Micros) -> Wheel<T> {
        let mut wheel = Wheel::new();
        wheel.advance(origin, &mut Vec::new());
        wheel
    }

    /// Runs the wheel the way the event loop does: sleep until `next_deadline`, advance, repeat,
    /// until it's empty. Returns each item with the time it fired, and the number of wakeups.
    fn drive<T: Copy>(wheel: &mut Wheel<T>) -> (Vec<(T, Micros)>, usize) {
        let (mut fired, mut out, mut wakeups) = (Vec::new(), Vec::new(), 0);
        let mut previous: Option<Micros> = None;
        while let Some(now) = wheel.next_deadline() {
            // Nothing is due after an advance, so the next wakeup must be strictly later.
            assert!(
                previous.is_none_or(|p| now > p),
                "wakeup at {now:?} after {previous:?}"
            );
            wheel.advance(now, &mut out);
            fired.extend(out.drain(..).map(|item| (item, now)));
            previous = Some(now);
            wakeups += 1;
        }
        assert!(wheel.is_empty());
        (fired, wakeups)
    }

    /// xorshift64*: a small fixed-seed PRNG, so the randomized tests are reproducible.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        /// A span in microseconds whose scale is chosen uniformly from 1 ms up to `max_ms`.
        fn span(&mut self, max_ms: u64) -> u64 {
            let scales = [1, 64, 4096, 64 * 4096, 4096 * 4096, max_ms];
            let scale = scales[self.below(scales.len() as u64) as usize].min(max_ms);
            self.below(scale * 1000)
        }
    }

    #[test]
    fn key_deadlines_fire_exactly_on_time_from_any_origin() {
        let spans = [0, 1, 63, 64, 65, 4095, 4096, 4097, HOUR, DAY, 30 * DAY];
        // Include origins that aren't aligned to a millisecond or a slot, and one just before
        // the top level turns over.
        let origins = [
            Micros(0),
            ms(1),
            Micros(37_250),
            ms(4095) + Micros(999),
            ms(MAX_SPAN - 2),
        ];
        for origin in origins {
            for span in spans {
                let mut wheel = wheel_at(origin);
                let deadline = origin + ms(span);
                wheel.arm(deadline, span);
                assert_eq!(wheel.len(), 1);
                let (fired, wakeups) = drive(&mut wheel);
                assert_eq!(fired, [(span, ceil_ms(deadline))], "origin {origin:?}");
                assert!(wakeups <= LEVELS, "{wakeups} wakeups for {span} ms");
            }
        }
    }

    #[test]
    fn fires_in_deadline_order_across_levels() {
        let spans = [30 * DAY, 4097, 0, 64, DAY, 1, 4096, 65, HOUR, 63, 4095];
        let mut wheel = Wheel::new();
        for span in spans {
            wheel.arm(ms(span), span);
        }
        let (fired, _) = drive(&mut wheel);
        let mut expected: Vec<_> = spans.iter().map(|&span| (span, ms(span))).collect();
        expected.sort();
        assert_eq!(fired, expected);
    }

    #[test]
    fn rounds_sub_millisecond_deadlines_up() {
        let mut wheel = Wheel::new();
        let mut out = Vec::new();
        wheel.arm(Micros(1), 'a');
        wheel.arm(Micros(1500), 'b');
        wheel.arm(Micros(2000), 'c');
        assert_eq!(wheel.next_deadline(), Some(ms(1)));
        wheel.advance(Micros(999), &mut out);
        assert!(out.is_empty());
        wheel.advance(Micros(1000), &mut out);
        assert_eq!(out, ['a']);
        wheel.advance(Micros(1999), &mut out);
        assert_eq!(out, ['a']);
        wheel.advance(Micros(2000), &mut out);
        assert_eq!(out, ['a', 'b', 'c']);
    }

    #[test]
    fn past_and_present_deadlines_fire_on_next_advance() {
        let now = ms(10_000) + Micros(400);
        let mut wheel = wheel_at(now);
        let mut out = Vec::new();
        wheel.arm(Micros(0), 'a');
        wheel.arm(ms(10_000), 'b');
        wheel.arm(now, 'c'); // rounds up to 10_001 ms
        // Due items: the poll timeout is the current tick, already in the past.
        assert_eq!(wheel.next_deadline(), Some(ms(10_000)));
        wheel.advance(now, &mut out);
        assert_eq!(out, ['a', 'b']);
        assert_eq!(wheel.next_deadline(), Some(ms(10_001)));
        // Time going backwards moves nothing but still yields items that are due.
        wheel.arm(Micros(0), 'd');
        wheel.advance(Micros(0), &mut out);
        assert_eq!(out, ['a', 'b', 'd']);
        wheel.advance(ms(10_001), &mut out);
        assert_eq!(out, ['a', 'b', 'd', 'c']);
        assert!(wheel.is_empty());
    }

    #[test]
    fn long_deadlines_cascade_at_slot_boundaries() {
        // From 37.25 ms: 100 ms ahead is past a turn of level 0, and 5 s is past a turn of level 1.
        let origin = Micros(37_250);
        let mut wheel = wheel_at(origin);
        wheel.arm(origin + ms(100), "100ms");
        let wakeups: Vec<_> = std::iter::from_fn(|| {
            let now = wheel.next_deadline()?;
            wheel.advance(now, &mut Vec::new());
            Some(now)
        })
        .collect();
        // Level 1 slot 2 cascades at 128 ms, then level 0 fires tick 138.
        assert_eq!(wakeups, [ms(128), ms(138)]);

        let mut wheel = wheel_at(origin);
        wheel.arm(origin + ms(5000), "5s");
        let mut wakeups = Vec::new();
        let mut out = Vec::new();
        while let Some(now) = wheel.next_deadline() {
            wheel.advance(now, &mut out);
            wakeups.push((now, out.len()));
        }
        // Level 2 slot 1 at 4096 ms, level 1 slot 14 at 4992 ms, then tick 5038 fires.
        assert_eq!(wakeups, [(ms(4096), 0), (ms(4992), 0), (ms(5038), 1)]);
    }

    #[test]
    fn one_big_jump_fires_everything_in_order() {
        let mut wheel = Wheel::new();
        let spans = [DAY, 65, 30 * DAY, 4097, 0, HOUR];
        for span in spans {
            wheel.arm(ms(span), span);
        }
        let mut out = Vec::new();
        wheel.advance(ms(DAY), &mut out);
        assert_eq!(out, [0, 65, 4097, HOUR, DAY]);
        assert_eq!(wheel.len(), 1);
        assert_eq!(wheel.next_deadline().map(|t| t <= ms(30 * DAY)), Some(true));
        wheel.advance(ms(365 * DAY), &mut out);
        assert_eq!(out.last(), Some(&(30 * DAY)));
        assert!(wheel.is_empty());
    }

    #[test]
    fn top_level_wraps_into_the_next_revolution() {
        const TOP_SLOT: u64 = 1 << 30; // ms per slot on the top level
        // The clock is 123 ms into top-level slot 50. The deadlines land in slot 60 of this turn
        // and in slots 6, 49 and 50 of the next turn. Slot 50 is the clock's own slot.
        let origin = ms(50 * TOP_SLOT + 123);
        let mut wheel = wheel_at(origin);
        let spans = [MAX_SPAN, 20 * TOP_SLOT, MAX_SPAN - 1000, 10 * TOP_SLOT];
        for span in spans {
            wheel.arm(origin + ms(span), span);
        }
        let (fired, _) = drive(&mut wheel);
        let expected = [10 * TOP_SLOT, 20 * TOP_SLOT, MAX_SPAN - 1000, MAX_SPAN];
        assert_eq!(fired, expected.map(|span| (span, origin + ms(span))));
    }

    #[test]
    fn deadlines_beyond_the_span_are_clamped() {
        assert_eq!(MAX_SPAN, 64u64.pow(6) - 1); // about 2.2 years of ms
        let origin = ms(5) + Micros(1);
        let mut wheel = wheel_at(origin);
        wheel.arm(Micros::MAX, 'a');
        wheel.arm(ms(5 + MAX_SPAN), 'b'); // exactly the span: not clamped
        wheel.arm(ms(6 + MAX_SPAN), 'c');
        let (fired, _) = drive(&mut wheel);
        assert_eq!(
            fired,
            [
                ('a', ms(5 + MAX_SPAN)),
                ('b', ms(5 + MAX_SPAN)),
                ('c', ms(5 + MAX_SPAN))
            ]
        );
    }

    #[test]
    fn idle_wheel_has_no_deadline_and_len_tracks_items() {
        let mut wheel = Wheel::<u32>::default();
        assert_eq!(wheel.next_deadline(), None);
        assert!(wheel.is_empty());
        for i in 0..100 {
            wheel.arm(ms(7), i);
        }
        wheel.arm(ms(8), 100);
        assert_eq!((wheel.len(), wheel.next_deadline()), (101, Some(ms(7))));
        let mut out = Vec::new();
        wheel.advance(ms(7), &mut out);
        assert_eq!(out, (0..100).collect::<Vec<_>>());
        assert_eq!((wheel.len(), wheel.next_deadline()), (1, Some(ms(8))));
        wheel.advance(ms(8), &mut out);
        assert_eq!((wheel.len(), wheel.next_deadline()), (0, None));
    }

    #[test]
    fn advancing_an_empty_wheel_is_cheap_and_allocation_free() {
        let mut wheel = Wheel::<u32>::new();
        let mut out = Vec::new();
        for step in 0..200_000 {
            wheel.advance(Micros(step * 500), &mut out);
        }
        for t in [ms(30 * DAY), ms(MAX_SPAN * 3), Micros::MAX, Micros::MAX] {
            wheel.advance(t, &mut out);
        }
        assert!(out.is_empty());
        assert_eq!(out.capacity(), 0);
        assert_eq!(wheel.capacity(), 0);
        assert_eq!(wheel.next_deadline(), None);
    }

    #[test]
    fn steady_state_does_not_grow_slot_capacity() {
        // Each round arms the same timers (within 60 s) at a start time that's a multiple of
        // 64^3 ms, so every round uses the same slots. After the first round warms them up,
        // no push may allocate.
        const ROUND: u64 = 64 * 64 * 64;
        let mut wheel = Wheel::new();
        let mut out = Vec::new();
        let mut warm = None;
        for round in 0..4 {
            let start = ms(round * ROUND);
            wheel.advance(start, &mut out);
            let mut rng = Rng(0x5eed);
            let mut peak = wheel.capacity();
            for id in 0..2000 {
                wheel.arm(start + Micros(rng.below(60_000_000)), id);
                peak = peak.max(wheel.capacity());
            }
            let mut now = start;
            while !wheel.is_empty() {
                now = now + Micros(rng.below(50_000));
                out.clear();
                wheel.advance(now, &mut out);
                peak = peak.max(wheel.capacity());
            }
            let after = wheel.capacity();
            assert!(
                after > 0 && after == peak,
                "emptied slots must keep their capacity"
            );
            match warm {
                None => warm = Some(after),
                Some(warm) => assert_eq!(peak, warm, "round {round} allocated"),
            }
        }
    }

    #[test]
    fn randomized_timers_fire_once_never_early_and_on_the_first_advance_after() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut wheel = Wheel::new();
        let mut deadlines: Vec<Micros> = Vec::new(); // by item id
        let mut fired: Vec<bool> = Vec::new();
        let mut pending = BTreeSet::new(); // (rounded deadline, id)
        let mut out = Vec::new();
        let mut now = Micros(rng.below(1 << 40));
        wheel.advance(now, &mut out);
        for _ in 0..30_000 {
            if rng.below(3) == 0 {
                for _ in 0..rng.below(8) {
                    // Mostly ahead at every scale up to the wheel's span, sometimes in the past.
                    let deadline = if rng.below(10) == 0 {
                        now - Micros(rng.span(HOUR))
                    } else {
                        now + Micros(rng.span(MAX_SPAN - 1))
                    };
                    let id = deadlines.len();
                    deadlines.push(deadline);
                    fired.push(false);
                    pending.insert((ceil_ms(deadline), id));
                    wheel.arm(deadline, id);
                }
            }
            assert_eq!(wheel.len(), pending.len());
            let next = wheel.next_deadline();
            match (next, pending.first()) {
                (None, None) => {}
                (Some(next), Some(&(earliest, _))) => {
                    // An item armed in the past is due now, not at its deadline.
                    let due = earliest.max(now);
                    assert!(next <= due, "poll timeout {next:?} after {due:?}");
                    assert!(
                        next > now || earliest <= now,
                        "poll timeout {next:?} in the past"
                    );
                }
                (next, earliest) => panic!("next_deadline {next:?} with earliest {earliest:?}"),
            }
            now = match rng.below(20) {
                0 => now + Micros(rng.span(2 * MAX_SPAN)),
                1..=6 => next.unwrap_or(now).max(now),
                _ => now + Micros(rng.span(64)),
            };
            wheel.advance(now, &mut out);
            for id in out.drain(..) {
                assert!(!fired[id], "item {id} fired twice");
                assert!(deadlines[id] <= now, "item {id} fired early");
                fired[id] = true;
                assert!(pending.remove(&(ceil_ms(deadlines[id]), id)));
            }
            assert!(
                pending.first().is_none_or(|&(earliest, _)| earliest > now),
                "item late"
            );
        }
        wheel.advance(now + ms(2 * MAX_SPAN), &mut out);
        for id in out.drain(..) {
            assert!(!fired[id], "item {id} fired twice");
            fired[id] = true;
        }
        assert!(fired.iter().all(|&f| f) && wheel.is_empty());
        assert!(deadlines.len() > 10_000, "only {} timers", deadlines.len());
    }
}
