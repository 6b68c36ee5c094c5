//! Timer wheel: deadlines with O(1) arming and cancelling and O(levels) polling. The loop
//! keeps one for its connections (request and idle timeouts, pings, linger) and the hub one
//! for sessions, rooms, typing and message TTLs.
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
//! - Entries live in a slab behind the wheel; each slot is a doubly linked list threaded through
//!   the slab (FIFO, so items due in the same tick fire in the order they were armed).
//!   [`Wheel::arm`] returns a [`TimerId`] (slab index and generation), and [`Wheel::cancel`]
//!   unlinks and frees the entry in O(1). Freed entries are reused before the slab grows, so
//!   the wheel's memory is its peak number of live timers, never the number ever armed; and
//!   once a peak has passed (a quarter of the entries armed), the free entries above the
//!   highest armed one are given back. Every
//!   free bumps the entry's generation: an id whose timer already fired or was cancelled is
//!   recognised as stale and cancelling it does nothing, even once its entry holds another
//!   timer. [`Wheel::len`] counts live timers only.
//! - Owners that keep an id must forget it (or let it go stale) when its item fires. Timers
//!   that no longer matter are cancelled, so an idle loop sleeps until its next real deadline.
//!
//! ```
//! use chatloop::time::Micros;
//! use chatloop::timer::Wheel;
//!
//! let mut wheel = Wheel::new();
//! let idle = wheel.arm(Micros::from_secs(30), 7usize); // connection 7's idle timeout
//! // Activity: cancel the armed timer and arm a new one.
//! assert_eq!(wheel.cancel(idle), Some(7));
//! let idle = wheel.arm(Micros::from_secs(45), 7);
//! assert_eq!(wheel.len(), 1);
//!
//! let mut fired = Vec::new();
//! wheel.advance(Micros::from_secs(45), &mut fired);
//! assert_eq!(fired, [7]);
//! assert_eq!(wheel.cancel(idle), None, "it fired: the id is stale");
//! assert!(wheel.is_empty());
//! ```

use crate::time::Micros;

/// Names one armed timer, for [`Wheel::cancel`]. Stale once the timer fired or was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TimerId {
    index: u32,
    generation: u32,
}

/// A hierarchical timer wheel of `T`s, each armed for a deadline.
#[derive(Debug)]
pub struct Wheel<T> {
    /// The current tick (ms). Every stored deadline is at or after it.
    elapsed: u64,
    levels: [Level; LEVELS],
    /// Every entry, armed or free. Free entries form a list through `next`.
    nodes: Vec<Node<T>>,
    free: u32,
    len: usize,
    /// The generation a newly pushed entry starts at: above that of every entry dropped by
    /// [`Wheel::compact`], so an id of a dropped entry can never name a new one.
    fresh_generation: u32,
    /// Compact once fewer timers than this are armed.
    compact_below: usize,
    /// Entries freed since the last compaction: once as many as the slab holds, a slab still
    /// mostly free is compacted again (a long-lived timer that kept the top of the slab
    /// armed at the last compaction has usually fired or been re-armed lower since).
    released: usize,
}

impl<T: Copy> Wheel<T> {
    /// An empty wheel whose clock starts at `Micros(0)`.
    pub fn new() -> Self {
        Wheel {
            elapsed: 0,
            levels: std::array::from_fn(|_| Level::new()),
            nodes: Vec::new(),
            free: NIL,
            len: 0,
            fresh_generation: 0,
            compact_below: 0,
            released: 0,
        }
    }

    /// Arms `item` to fire at `deadline`, rounded up to the next whole ms. O(1).
    pub fn arm(&mut self, deadline: Micros, item: T) -> TimerId {
        let tick = deadline.0.div_ceil(TICK_MICROS);
        let tick = tick.clamp(self.elapsed, self.elapsed + MAX_SPAN);
        let index = if self.free == NIL {
            let index = u32::try_from(self.nodes.len())
                .ok()
                .filter(|&i| i != NIL)
                .expect("fewer than 2^32 - 1 timers");
            self.nodes.push(Node {
                tick,
                item,
                prev: NIL,
                next: NIL,
                generation: self.fresh_generation,
                place: FREE,
            });
            self.compact_below = self.nodes.len() / 4;
            index
        } else {
            let index = self.free;
            let node = &mut self.nodes[index as usize];
            self.free = node.next;
            node.tick = tick;
            node.item = item;
            index
        };
        self.insert(index);
        self.len += 1;
        TimerId {
            index,
            generation: self.nodes[index as usize].generation,
        }
    }

    /// Disarms a timer and returns its item; `None` (doing nothing) when the id is stale
    /// because the timer already fired or was cancelled. O(1).
    pub fn cancel(&mut self, id: TimerId) -> Option<T> {
        let node = self.nodes.get(id.index as usize)?;
        if node.generation != id.generation || node.place == FREE {
            return None;
        }
        let item = node.item;
        self.unlink(id.index);
        self.release(id.index);
        self.maybe_compact();
        Some(item)
    }

    /// The (rounded) deadline of an armed timer; `None` for a stale id.
    pub fn deadline(&self, id: TimerId) -> Option<Micros> {
        let node = self.nodes.get(id.index as usize)?;
        (node.generation == id.generation && node.place != FREE)
            .then(|| Micros(node.tick.saturating_mul(TICK_MICROS)))
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
    /// before `now`, in deadline order (items due in the same tick in the order they were
    /// armed). A `now` earlier than the wheel's clock moves nothing but still yields the items
    /// that are due. The ids of the items yielded are stale from now on.
    pub fn advance(&mut self, now: Micros, out: &mut Vec<T>) {
        let now = (now.0 / TICK_MICROS).max(self.elapsed);
        while let Some(exp) = self.next_expiration().filter(|exp| exp.tick <= now) {
            self.elapsed = exp.tick;
            let level = &mut self.levels[exp.level];
            level.occupied &= !(1 << exp.slot);
            // Detach the whole list; each entry then fires or re-lands on a lower level.
            let mut at = std::mem::replace(&mut level.heads[exp.slot], NIL);
            level.tails[exp.slot] = NIL;
            while at != NIL {
                let next = self.nodes[at as usize].next;
                if exp.level == 0 {
                    // A level-0 slot holds exactly one tick, the one that just came due.
                    out.push(self.nodes[at as usize].item);
                    self.release(at);
                    self.len -= 1;
                } else {
                    // The entries now share a higher-level slot with `elapsed`, so every one
                    // re-lands on a lower level, never back in this slot.
                    self.insert(at);
                }
                at = next;
            }
            debug_assert_eq!(self.levels[exp.level].heads[exp.slot], NIL);
        }
        self.elapsed = now;
        self.maybe_compact();
    }

    /// How many timers are armed (cancelled and fired ones are gone).
    pub fn len(&self) -> usize {
        self.len
    }

    /// No timer is armed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries the slab has room for. Tests use it to check that the steady state doesn't
    /// allocate and that cancelled entries are reused.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.nodes.capacity()
    }

    /// Links armed entry `index` (with `tick >= self.elapsed`) at the tail of its slot's list,
    /// on its level relative to `elapsed`.
    fn insert(&mut self, index: u32) {
        let tick = self.nodes[index as usize].tick;
        let level = level_for(self.elapsed, tick);
        let slot = ((tick >> (LEVEL_BITS * level)) & SLOT_MASK) as usize;
        let l = &mut self.levels[level];
        let tail = l.tails[slot];
        l.occupied |= 1 << slot;
        l.tails[slot] = index;
        if tail == NIL {
            l.heads[slot] = index;
        } else {
            self.nodes[tail as usize].next = index;
        }
        let node = &mut self.nodes[index as usize];
        node.prev = tail;
        node.next = NIL;
        node.place = (level * SLOTS + slot) as u16;
    }

    /// Takes armed entry `index` out of its slot's list.
    fn unlink(&mut self, index: u32) {
        let Node {
            prev, next, place, ..
        } = self.nodes[index as usize];
        let (level, slot) = (usize::from(place) / SLOTS, usize::from(place) % SLOTS);
        match prev {
            NIL => self.levels[level].heads[slot] = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.levels[level].tails[slot] = prev,
            n => self.nodes[n as usize].prev = prev,
        }
        if self.levels[level].heads[slot] == NIL {
            self.levels[level].occupied &= !(1 << slot);
        }
        self.len -= 1;
    }

    /// Gives the slab's free entries above the highest armed one back now if most of it is
    /// free, whatever the counters of `Wheel::maybe_compact` say: after a storm the last
    /// removals can leave a mostly free slab that no later arm or cancel will ever look at
    /// again on an idle server. O(entries): the loop calls it only when it hands memory back
    /// to the OS (after removals, at most once a second).
    pub fn shrink(&mut self) {
        if self.nodes.len() >= COMPACT_MIN && self.mostly_free() {
            self.compact();
        }
    }

    /// Fewer than a quarter of the slab's entries are armed.
    fn mostly_free(&self) -> bool {
        self.len < self.nodes.len() / 4
    }

    /// After a peak has passed (fewer than a quarter of the entries armed), gives the free
    /// entries above the highest armed one back to the allocator. A slab that stays mostly
    /// free is looked at again after as many releases as it has entries, so the scan costs
    /// O(1) per timer however long the tail of a peak lasts.
    fn maybe_compact(&mut self) {
        if self.nodes.len() < COMPACT_MIN {
            return;
        }
        if self.len < self.compact_below
            || (self.mostly_free() && self.released >= self.nodes.len())
        {
            self.compact();
        }
    }

    /// Drops the free entries above the highest armed one and rebuilds the free list in
    /// ascending order, so the lowest places are reused first and the top stays free for the
    /// next compaction. O(entries); it runs again only once the armed count has halved, so
    /// over a peak's decline it costs O(log n) per timer.
    fn compact(&mut self) {
        let keep = self
            .nodes
            .iter()
            .rposition(|n| n.place != FREE)
            .map_or(0, |i| i + 1);
        for n in &self.nodes[keep..] {
            self.fresh_generation = self.fresh_generation.max(n.generation);
        }
        self.nodes.truncate(keep);
        self.nodes.shrink_to_fit();
        self.free = NIL;
        for i in (0..keep).rev() {
            if self.nodes[i].place == FREE {
                self.nodes[i].next = self.free;
                self.free = i as u32;
            }
        }
        self.compact_below = self.len / 2;
        self.released = 0;
    }

    /// Returns entry `index` (no longer in any list) to the free list; its ids go stale.
    fn release(&mut self, index: u32) {
        let node = &mut self.nodes[index as usize];
        node.place = FREE;
        node.generation = node.generation.wrapping_add(1);
        node.prev = NIL;
        node.next = self.free;
        self.free = index;
        self.released += 1;
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
/// Below this many entries (about 160 KiB) the slab is never compacted: its memory is too
/// small to matter, and a steady state of peaks below it never allocates.
const COMPACT_MIN: usize = 4_096;
/// No entry: the end of a list.
const NIL: u32 = u32::MAX;
/// `Node::place` of an entry on the free list.
const FREE: u16 = u16::MAX;

#[derive(Debug)]
struct Level {
    /// Bit `i` is set when slot `i`'s list is non-empty.
    occupied: u64,
    heads: [u32; SLOTS],
    tails: [u32; SLOTS],
}

impl Level {
    fn new() -> Self {
        Level {
            occupied: 0,
            heads: [NIL; SLOTS],
            tails: [NIL; SLOTS],
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Node<T> {
    /// The deadline in ticks, already rounded and clamped.
    tick: u64,
    item: T,
    /// Neighbours in the slot's list; `next` links the free list for a free entry.
    prev: u32,
    next: u32,
    /// Bumped each time the entry is freed, so old ids go stale.
    generation: u32,
    /// `level * SLOTS + slot` of an armed entry; `FREE` otherwise.
    place: u16,
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
    fn cancel_frees_the_entry_and_the_deadline_at_once() {
        let mut wheel = Wheel::new();
        let a = wheel.arm(ms(5), 'a');
        let b = wheel.arm(ms(5), 'b');
        let c = wheel.arm(ms(5), 'c');
        let far = wheel.arm(ms(DAY), 'f');
        assert_eq!(wheel.len(), 4);
        assert_eq!(wheel.deadline(b), Some(ms(5)));
        // The middle, the head and the tail of one slot's list.
        assert_eq!(wheel.cancel(b), Some('b'));
        assert_eq!(wheel.cancel(a), Some('a'));
        assert_eq!(wheel.len(), 2);
        assert_eq!(wheel.deadline(b), None);
        assert_eq!(wheel.cancel(b), None, "cancelling twice does nothing");
        let mut out = Vec::new();
        wheel.advance(ms(5), &mut out);
        assert_eq!(out, ['c']);
        assert_eq!(wheel.cancel(c), None, "a fired timer's id is stale");
        // Only the far timer is left; cancelling it leaves nothing to wake up for.
        assert!(wheel.next_deadline().is_some_and(|d| d > ms(HOUR)));
        assert_eq!(wheel.cancel(far), Some('f'));
        assert_eq!((wheel.len(), wheel.next_deadline()), (0, None));
        wheel.advance(ms(2 * DAY), &mut out);
        assert_eq!(out, ['c'], "cancelled timers never fire");
    }

    #[test]
    fn cancelling_on_every_level_leaves_no_wakeup_behind() {
        for span in [1, 63, 64, 4095, 4096, HOUR, DAY, 30 * DAY, MAX_SPAN - 1] {
            let origin = Micros(37_250);
            let mut wheel = wheel_at(origin);
            let keep = wheel.arm(origin + ms(span), 1);
            let drop = wheel.arm(origin + ms(span), 2);
            let other = wheel.arm(origin + ms(span / 2 + 1), 3);
            assert_eq!(wheel.cancel(drop), Some(2));
            assert_eq!(wheel.cancel(other), Some(3));
            let (fired, _) = drive(&mut wheel);
            assert_eq!(fired, [(1, ceil_ms(origin + ms(span)))], "span {span}");
            assert_eq!(wheel.cancel(keep), None);
            let id = wheel.arm(origin + ms(span), 4);
            assert_eq!(wheel.cancel(id), Some(4));
            assert_eq!(wheel.next_deadline(), None, "span {span}");
        }
    }

    #[test]
    fn rearming_moves_a_deadline_either_way() {
        let mut wheel = Wheel::new();
        let mut out = Vec::new();
        // A request timeout at 10 s replaced by a ping deadline at 30 s: nothing wakes at 10 s.
        let t = wheel.arm(ms(10 * SEC), "request");
        wheel.cancel(t);
        let t = wheel.arm(ms(30 * SEC), "ping");
        assert_eq!(wheel.deadline(t), Some(ms(30 * SEC)));
        let mut wakeups = 0;
        while let Some(now) = wheel.next_deadline().filter(|&d| d < ms(30 * SEC)) {
            wheel.advance(now, &mut out);
            wakeups += 1;
        }
        assert!(out.is_empty() && wakeups <= LEVELS, "{wakeups} cascades");
        // And earlier again.
        wheel.cancel(t);
        let t = wheel.arm(ms(29 * SEC), "close");
        wheel.advance(ms(29 * SEC), &mut out);
        assert_eq!(out, ["close"]);
        assert_eq!(wheel.deadline(t), None);
        assert!(wheel.is_empty());
    }

    #[test]
    fn a_freed_entry_is_reused_and_its_old_id_stays_stale() {
        let mut wheel = Wheel::new();
        let old = wheel.arm(ms(100), "old");
        assert_eq!(wheel.cancel(old), Some("old"));
        let new = wheel.arm(ms(200), "new");
        assert_eq!(new.index, old.index, "the freed entry is reused");
        assert_ne!(new.generation, old.generation);
        assert_eq!(
            wheel.cancel(old),
            None,
            "the old id cannot cancel the new timer"
        );
        assert_eq!(wheel.deadline(old), None);
        assert_eq!(wheel.len(), 1);
        // The same after firing.
        let mut out = Vec::new();
        wheel.advance(ms(200), &mut out);
        assert_eq!(out, ["new"]);
        let newer = wheel.arm(ms(300), "newer");
        assert_eq!(newer.index, new.index);
        assert_eq!(wheel.cancel(new), None);
        assert_eq!(wheel.cancel(old), None);
        assert_eq!(wheel.cancel(newer), Some("newer"));
        // An id from another wheel's bigger slab is simply unknown here.
        let foreign = TimerId {
            index: 1000,
            generation: 0,
        };
        assert_eq!(wheel.cancel(foreign), None);
    }

    #[test]
    fn the_slab_empties_when_its_top_entry_goes_last() {
        // A storm whose newest timer outlives all the others: every compaction on the way
        // down finds the top entry armed, and the last removal must still give it all back.
        let mut wheel = Wheel::new();
        let storm: Vec<TimerId> = (0..20_000).map(|i| wheel.arm(ms(DAY), i)).collect();
        let (last, rest) = storm.split_last().unwrap();
        for id in rest {
            assert!(wheel.cancel(*id).is_some());
        }
        assert!(wheel.capacity() >= 20_000, "the top entry is still armed");
        assert_eq!(wheel.cancel(*last), Some(19_999));
        assert!(wheel.is_empty());
        assert!(
            wheel.capacity() < COMPACT_MIN,
            "an empty wheel kept {} entries",
            wheel.capacity()
        );
    }

    /// A peak of 20 000 timers whose top entry stays armed through the decline and ends
    /// last, while a low one lives on: the slab is left mostly free, and the counters of
    /// `maybe_compact` do not fire. Returns the low timer.
    fn peak_that_ends_with_its_top(wheel: &mut Wheel<u32>) -> TimerId {
        let low = wheel.arm(ms(DAY), u32::MAX);
        let storm: Vec<TimerId> = (0..20_000).map(|i| wheel.arm(ms(DAY), i)).collect();
        let (top, rest) = storm.split_last().unwrap();
        for id in rest {
            wheel.cancel(*id);
        }
        wheel.cancel(*top);
        assert_eq!(wheel.len(), 1);
        assert!(wheel.capacity() >= 20_000, "compacted already");
        low
    }

    #[test]
    fn a_mostly_free_slab_is_compacted_again_after_enough_releases() {
        // The slab is compacted again once as many timers came and went as it holds.
        let mut wheel = Wheel::new();
        let low = peak_that_ends_with_its_top(&mut wheel);
        let peak = wheel.capacity();
        for i in 0..2 * peak as u32 {
            let id = wheel.arm(ms(DAY), i);
            wheel.cancel(id);
        }
        assert!(
            wheel.capacity() < COMPACT_MIN,
            "the slab kept {} of its {peak} entries",
            wheel.capacity()
        );
        assert_eq!(wheel.cancel(low), Some(u32::MAX));
    }

    #[test]
    fn shrink_gives_a_mostly_free_slab_back_at_once() {
        // Nothing comes and goes after the peak (an idle server): the loop's shrink, not
        // more traffic, gives the slab back.
        let mut wheel = Wheel::new();
        let low = peak_that_ends_with_its_top(&mut wheel);
        let peak = wheel.capacity();
        wheel.shrink();
        assert!(
            wheel.capacity() < COMPACT_MIN,
            "the slab kept {} of its {peak} entries",
            wheel.capacity()
        );
        // A slab that is mostly armed is left as it is.
        let busy: Vec<TimerId> = (0..8_000).map(|i| wheel.arm(ms(DAY), i)).collect();
        let before = wheel.capacity();
        wheel.shrink();
        assert_eq!(wheel.capacity(), before);
        for id in busy {
            assert!(wheel.cancel(id).is_some());
        }
        assert_eq!(wheel.cancel(low), Some(u32::MAX));
    }

    #[test]
    fn arm_and_cancel_cycles_keep_memory_flat() {
        // A session created and ended 100 000 times: one entry, reused each time.
        let mut wheel = Wheel::new();
        let resident = wheel.arm(ms(DAY), u32::MAX);
        let mut out = Vec::new();
        for i in 0..100_000u32 {
            let now = ms(u64::from(i));
            wheel.advance(now, &mut out);
            let id = wheel.arm(now + ms(DAY), i);
            assert_eq!(wheel.len(), 2);
            assert_eq!(wheel.cancel(id), Some(i));
        }
        assert!(out.is_empty());
        assert_eq!(wheel.len(), 1);
        assert!(wheel.capacity() <= 4, "capacity {}", wheel.capacity());
        assert_eq!(wheel.cancel(resident), Some(u32::MAX));
    }

    #[test]
    fn memory_comes_back_after_a_peak_and_old_ids_stay_stale() {
        // A storm: 100 000 sessions, each with its 24 h timer, then all of them end but one.
        let mut wheel = Wheel::new();
        let early = wheel.arm(ms(DAY), u32::MAX); // the lowest entry stays armed throughout
        let storm: Vec<TimerId> = (0..100_000).map(|i| wheel.arm(ms(DAY), i)).collect();
        let peak = wheel.capacity();
        assert!(peak >= 100_001);
        for (i, id) in storm.iter().enumerate() {
            assert_eq!(wheel.cancel(*id), Some(i as u32));
        }
        assert_eq!(wheel.len(), 1);
        assert!(
            wheel.capacity() < COMPACT_MIN,
            "the slab kept {} entries of its peak {peak}",
            wheel.capacity()
        );
        // The next storm reuses the same places; no id of the first can touch it.
        let again: Vec<TimerId> = (0..100_000).map(|i| wheel.arm(ms(DAY), i + 7)).collect();
        assert!(again.iter().zip(&storm).any(|(a, s)| a.index == s.index));
        for id in &storm {
            assert_eq!(wheel.cancel(*id), None, "a stale id cancelled a new timer");
            assert_eq!(wheel.deadline(*id), None);
        }
        assert_eq!(wheel.len(), 100_001);
        let mut out = Vec::new();
        wheel.advance(ms(DAY), &mut out);
        assert_eq!(
            out.len(),
            100_001,
            "every timer fires once, after compaction too"
        );
        assert_eq!(out[0], u32::MAX);
        assert_eq!(wheel.cancel(early), None);
        assert!(wheel.is_empty() && wheel.capacity() < COMPACT_MIN);
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

    #[test]
    fn randomized_arm_cancel_and_fire_agree_with_a_model() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut wheel = Wheel::new();
        let mut live: Vec<(TimerId, usize)> = Vec::new();
        let mut pending = BTreeSet::new(); // (rounded deadline, id)
        let mut deadlines: Vec<Micros> = Vec::new();
        let mut stale: Vec<TimerId> = Vec::new();
        let mut out = Vec::new();
        let mut now = Micros(rng.below(1 << 40));
        let mut peak = 0;
        wheel.advance(now, &mut out);
        for _ in 0..40_000 {
            match rng.below(4) {
                0 | 1 => {
                    let deadline = now + Micros(rng.span(DAY));
                    let id = deadlines.len();
                    deadlines.push(deadline);
                    pending.insert((ceil_ms(deadline), id));
                    live.push((wheel.arm(deadline, id), id));
                }
                2 if !live.is_empty() => {
                    let (tid, id) = live.swap_remove(rng.below(live.len() as u64) as usize);
                    assert_eq!(wheel.cancel(tid), Some(id));
                    assert!(pending.remove(&(ceil_ms(deadlines[id]), id)));
                    stale.push(tid);
                }
                _ => {
                    now = now + Micros(rng.span(4096));
                    wheel.advance(now, &mut out);
                    for id in out.drain(..) {
                        assert!(deadlines[id] <= now, "item {id} fired early");
                        assert!(pending.remove(&(ceil_ms(deadlines[id]), id)), "{id} twice");
                        let i = live.iter().position(|&(_, l)| l == id).unwrap();
                        stale.push(live.swap_remove(i).0);
                    }
                    assert!(pending.first().is_none_or(|&(d, _)| d > now), "item late");
                }
            }
            // A stale id never cancels anything, whatever now lives in its entry.
            if let Some(&old) = stale.get(rng.below(stale.len() as u64 + 1) as usize) {
                assert_eq!(wheel.cancel(old), None);
            }
            assert_eq!(wheel.len(), pending.len());
            peak = peak.max(wheel.len());
        }
        assert!(
            wheel.nodes.len() <= peak,
            "{} entries for a peak of {peak} live timers",
            wheel.nodes.len()
        );
        for (tid, id) in live.drain(..) {
            assert_eq!(wheel.cancel(tid), Some(id));
        }
        assert_eq!((wheel.len(), wheel.next_deadline()), (0, None));
    }
}
