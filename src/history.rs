//! A room's history: the last `--history` chat messages and, within a bound of their own
//! (`--history-notices`), the presence notices (`user_joined` / `user_left`) among them.
//!
//! Two rings, so that presence churn (a client connecting and closing in a loop) can only
//! push older notices out, never chat. A chat message that leaves its ring takes the notices
//! older than it along (cluster mode's Redis list does the same, see `cluster.rs`). Every
//! entry gets a sequence number when it is stored; reads merge both rings by it, and every
//! read is bounded in bytes as well as in count. Pure; each call costs O(log n) plus what it
//! returns.

use std::collections::VecDeque;

use crate::ids::MsgId;
use crate::protocol::{Frame, frame_payload};

/// One stored event: its id and its encoded frame (shared with every member it went to).
#[derive(Debug, Clone)]
pub struct Entry {
    seq: u64,
    /// The message id (UUID v7): reads with `before`/`after` find entries by it.
    pub id: MsgId,
    /// The complete server frame as it was broadcast; a history read sends its payload again.
    pub frame: Frame,
}

/// Whatever ends an entry (evicted by a newer one, expired by the room's `message_ttl`,
/// cleared, or dropped with its room), its frame's bytes are zeroed before the memory goes
/// back to the allocator, unless an output queue still holds the frame (then it is freed
/// when sent, as any frame).
impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(bytes) = std::rc::Rc::get_mut(&mut self.frame) {
            bytes.fill(0);
            // The stores must happen although the memory is freed right after.
            std::hint::black_box(&*bytes);
        }
    }
}

/// How much a room keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Chat messages kept (`--history`, or the room's own smaller cap).
    pub chats: usize,
    /// Presence notices kept beside them (`--history-notices`).
    pub notices: usize,
}

/// One room's history: the two rings (chat, notices) merged by sequence number on read. Its
/// memory is bounded by [`Caps`] times the frame size limit.
#[derive(Debug, Default)]
pub struct History {
    chats: VecDeque<Entry>,
    notices: VecDeque<Entry>,
    next_seq: u64,
    /// The newest chat message that left its ring: sequence number and id.
    dropped: Option<(u64, MsgId)>,
}

/// A place in the merged order: how many entries of each ring come before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    chats: usize,
    notices: usize,
}

impl Cursor {
    const START: Cursor = Cursor {
        chats: 0,
        notices: 0,
    };

    fn sum(self) -> usize {
        self.chats + self.notices
    }

    fn min(self, other: Cursor) -> Cursor {
        Cursor {
            chats: self.chats.min(other.chats),
            notices: self.notices.min(other.notices),
        }
    }
}

/// Where [`History::find`] found an entry: the places just before and just after it.
struct Found {
    before: Cursor,
    after: Cursor,
    seq: u64,
}

/// A run of consecutive entries, oldest first (an iterator), and whether messages the
/// caller asked for are missing from it: gone from the ring, or left out to stay within the
/// byte budget (the oldest ones go first).
#[derive(Debug)]
pub struct Window<'a> {
    history: &'a History,
    from: Cursor,
    to: Cursor,
    /// Messages the caller asked for are missing: gone from the rings or cut by the byte budget.
    pub truncated: bool,
}

impl<'a> Iterator for Window<'a> {
    type Item = &'a Entry;

    fn next(&mut self) -> Option<&'a Entry> {
        let h = self.history;
        let chat = (self.from.chats < self.to.chats)
            .then(|| h.chats.get(self.from.chats))
            .flatten();
        let notice = (self.from.notices < self.to.notices)
            .then(|| h.notices.get(self.from.notices))
            .flatten();
        match (chat, notice) {
            (Some(c), Some(n)) if c.seq < n.seq => {
                self.from.chats += 1;
                Some(c)
            }
            (Some(c), None) => {
                self.from.chats += 1;
                Some(c)
            }
            (_, Some(n)) => {
                self.from.notices += 1;
                Some(n)
            }
            (None, None) => None,
        }
    }
}

/// What a read may return: at most `count` entries and, beyond the first, at most `bytes`
/// of JSON (each entry's payload and a comma).
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Entries at the most.
    pub count: usize,
    /// Bytes of JSON at the most, beyond the first entry (one entry is always returned whole).
    pub bytes: usize,
}

impl History {
    /// Entries kept (both rings).
    pub fn len(&self) -> usize {
        self.chats.len() + self.notices.len()
    }

    /// No entries kept in either ring.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets everything (and gives the memory back).
    pub fn clear(&mut self) {
        *self = History {
            next_seq: self.next_seq,
            ..History::default()
        };
    }

    /// Stores an event as the newest; the oldest of its kind leaves when its ring is full.
    pub fn push(&mut self, id: MsgId, frame: Frame, notice: bool, caps: Caps) {
        let e = Entry {
            seq: self.next_seq,
            id,
            frame,
        };
        self.next_seq += 1;
        if notice {
            self.notices.push_back(e);
            while self.notices.len() > caps.notices {
                self.notices.pop_front();
            }
            return;
        }
        self.chats.push_back(e);
        while self.chats.len() > caps.chats {
            let Some(old) = self.chats.pop_front() else {
                break;
            };
            while self.notices.front().is_some_and(|n| n.seq < old.seq) {
                self.notices.pop_front();
            }
            self.dropped = Some((old.seq, old.id));
        }
    }

    /// The send time (Unix ms, from its UUID v7 id) of the oldest entry kept.
    pub fn oldest_ms(&self) -> Option<u64> {
        let c = self.chats.front().map(|e| e.id.unix_ms());
        let n = self.notices.front().map(|e| e.id.unix_ms());
        match (c, n) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Drops the entries sent at or before `cutoff_ms` (Unix ms, from their ids) and adds
    /// their ids to `gone`. Each ring is in storage order, which is send order on one node
    /// (and Redis's delivery order in cluster mode): only fronts are looked at, so the cost
    /// is O(1) per entry dropped. A frame no one else holds any more (an output queue may
    /// still) is zeroed before its memory goes back to the allocator.
    pub fn expire(&mut self, cutoff_ms: u64, gone: &mut Vec<MsgId>) {
        for ring in [&mut self.chats, &mut self.notices] {
            while ring.front().is_some_and(|e| e.id.unix_ms() <= cutoff_ms) {
                if let Some(e) = ring.pop_front() {
                    gone.push(e.id); // dropping `e` zeroes its frame (see `Drop for Entry`)
                }
            }
            if ring.is_empty() && ring.capacity() > 64 {
                *ring = VecDeque::new();
            }
        }
    }

    /// Every entry in order (both rings merged).
    pub fn iter(&self) -> Window<'_> {
        self.window(Cursor::START, self.end(0), false)
    }

    /// Whether `id` is one of the `held` newest notices (stored, not yet sent).
    pub fn is_held(&self, id: MsgId, held: usize) -> bool {
        self.notices.iter().rev().take(held).any(|e| e.id == id)
    }

    /// The newest entries the members have been sent (all but the `held` newest notices).
    pub fn last(&self, held: usize, budget: Budget) -> Window<'_> {
        let end = self.end(held);
        let (from, cut) = self.back(end, Cursor::START, budget);
        self.window(from, end, cut)
    }

    /// What was sent after the event `since`, newest first within the budget (no count limit).
    /// `ordered`: ids grow with storage order (one node made them all), so `since` is found
    /// by binary search, and an id no longer kept still marks its place.
    pub fn after(&self, since: MsgId, ordered: bool, held: usize, bytes: usize) -> Window<'_> {
        let end = self.end(held);
        let budget = Budget {
            count: usize::MAX,
            bytes,
        };
        let (stop, gone) = if ordered {
            let at = Cursor {
                chats: self.chats.partition_point(|e| e.id <= since),
                notices: self.notices.partition_point(|e| e.id <= since),
            };
            (at, self.dropped.is_some_and(|(_, id)| id > since))
        } else {
            match self.find(since, end) {
                Some(f) => (f.after, self.dropped.is_some_and(|(s, _)| s > f.seq)),
                None => (Cursor::START, true),
            }
        };
        let stop = stop.min(end);
        let (from, cut) = self.back(end, stop, budget);
        self.window(from, end, gone || cut)
    }

    /// `GET /rooms/{id}/messages`: the newest sent entries older than `before` (all sent
    /// entries without it). An id this history does not know gives nothing, truncated.
    pub fn before(
        &self,
        before: Option<MsgId>,
        ordered: bool,
        held: usize,
        budget: Budget,
    ) -> Window<'_> {
        let sent = self.end(held);
        let end = match before {
            None => sent,
            Some(id) if ordered => Cursor {
                chats: self.chats.partition_point(|e| e.id < id),
                notices: self.notices.partition_point(|e| e.id < id),
            }
            .min(sent),
            Some(id) => match self.find(id, sent) {
                Some(found) => found.before,
                None => return self.window(Cursor::START, Cursor::START, true),
            },
        };
        let (from, cut) = self.back(end, Cursor::START, budget);
        self.window(from, end, cut)
    }

    /// Where the sent entries end: before the `held` newest notices.
    fn end(&self, held: usize) -> Cursor {
        Cursor {
            chats: self.chats.len(),
            notices: self.notices.len().saturating_sub(held),
        }
    }

    fn window(&self, from: Cursor, to: Cursor, truncated: bool) -> Window<'_> {
        Window {
            history: self,
            from,
            to,
            truncated,
        }
    }

    /// The entry just before `c` in the merged order, and the place before it.
    fn step_back(&self, c: Cursor) -> Option<(Cursor, &Entry)> {
        let chat = c.chats.checked_sub(1).and_then(|i| self.chats.get(i));
        let notice = c.notices.checked_sub(1).and_then(|i| self.notices.get(i));
        match (chat, notice) {
            (Some(a), Some(b)) if a.seq > b.seq => Some((
                Cursor {
                    chats: c.chats - 1,
                    ..c
                },
                a,
            )),
            (Some(a), None) => Some((
                Cursor {
                    chats: c.chats - 1,
                    ..c
                },
                a,
            )),
            (_, Some(b)) => Some((
                Cursor {
                    notices: c.notices - 1,
                    ..c
                },
                b,
            )),
            (None, None) => None,
        }
    }

    /// Walks back from `end` towards `stop` while the budget lasts (always at least one
    /// entry); returns where it stopped and whether the byte budget stopped it early.
    fn back(&self, end: Cursor, stop: Cursor, budget: Budget) -> (Cursor, bool) {
        let (mut c, mut n, mut bytes) = (end, 0usize, 0usize);
        while n < budget.count && c.sum() > stop.sum() {
            let Some((prev, e)) = self.step_back(c) else {
                break;
            };
            let size = frame_payload(&e.frame).len() + 1;
            if n > 0 && bytes + size > budget.bytes {
                return (c, true);
            }
            bytes += size;
            n += 1;
            c = prev;
        }
        (c, false)
    }

    /// Looks for `id` among the entries before `end`, newest first (ids from several nodes
    /// need not be in storage order).
    fn find(&self, id: MsgId, end: Cursor) -> Option<Found> {
        let mut c = end;
        while let Some((prev, e)) = self.step_back(c) {
            if e.id == id {
                return Some(Found {
                    before: prev,
                    after: c,
                    seq: e.seq,
                });
            }
            c = prev;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    const CAPS: Caps = Caps {
        chats: 5,
        notices: 2,
    };
    const ALL: Budget = Budget {
        count: usize::MAX,
        bytes: usize::MAX,
    };

    /// A frame whose payload is `name` (a two-byte header in front, as `FrameBuf` writes).
    fn frame(name: &str) -> Frame {
        let mut f = vec![0x81, name.len() as u8];
        f.extend_from_slice(name.as_bytes());
        Rc::from(f)
    }

    /// Pushes events named like `c3` (chat) or `n4` (notice); id = the number.
    fn history(events: &[&str], caps: Caps) -> History {
        let mut h = History::default();
        for e in events {
            let id = MsgId(e[1..].parse().unwrap());
            h.push(id, frame(e), e.starts_with('n'), caps);
        }
        h
    }

    fn names(w: Window<'_>) -> (Vec<String>, bool) {
        let truncated = w.truncated;
        let v = w
            .map(|e| String::from_utf8(frame_payload(&e.frame).to_vec()).unwrap())
            .collect();
        (v, truncated)
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn notices_have_their_own_ring_and_never_push_chat_out() {
        let mut h = history(&["c1", "n2", "c3"], CAPS);
        for i in 4..1000 {
            h.push(MsgId(i), frame(&format!("n{i}")), true, CAPS);
        }
        assert_eq!(
            names(h.iter()).0,
            strs(&["c1", "c3", "n998", "n999"]),
            "every chat survives the churn; the notices keep their own bound"
        );
        assert_eq!(h.len(), 4);
    }

    #[test]
    fn a_chat_leaving_takes_older_notices_along() {
        let h = history(
            &["n1", "c2", "n3", "c4", "c5", "c6", "c7", "c8", "c9"],
            CAPS,
        );
        // c2 took n1 along, then c4 took n3.
        assert_eq!(names(h.iter()).0, strs(&["c5", "c6", "c7", "c8", "c9"]));
        let h = history(&["n1", "c2", "n3", "c4", "c5", "c6", "c7", "c8"], CAPS);
        assert_eq!(
            names(h.iter()).0,
            strs(&["n3", "c4", "c5", "c6", "c7", "c8"])
        );
    }

    #[test]
    fn last_is_bounded_by_count_and_bytes_and_leaves_held_notices_out() {
        let h = history(&["c1", "n2", "c3", "n4", "n5"], CAPS);
        assert_eq!(
            names(h.last(0, ALL)),
            (strs(&["c1", "c3", "n4", "n5"]), false)
        );
        assert_eq!(names(h.last(1, ALL)), (strs(&["c1", "c3", "n4"]), false));
        let two = Budget {
            count: 2,
            bytes: usize::MAX,
        };
        assert_eq!(names(h.last(1, two)), (strs(&["c3", "n4"]), false));
        // Three bytes per entry ("c1" and a comma): room for two, so the oldest go.
        let six = Budget {
            count: 50,
            bytes: 6,
        };
        assert_eq!(names(h.last(0, six)), (strs(&["n4", "n5"]), true));
        // The newest always comes, even when it alone is over the budget.
        let tiny = Budget {
            count: 50,
            bytes: 1,
        };
        assert_eq!(names(h.last(0, tiny)), (strs(&["n5"]), true));
    }

    #[test]
    fn after_finds_its_place_by_id_even_when_that_notice_is_gone() {
        let mut h = history(&["c1", "n2", "c3"], CAPS);
        for i in 4..10 {
            h.push(MsgId(i), frame(&format!("n{i}")), true, CAPS);
        }
        h.push(MsgId(10), frame("c10"), false, CAPS);
        // n2 has left the notice ring; by id order its place is still known.
        assert_eq!(
            names(h.after(MsgId(2), true, 0, usize::MAX)),
            (strs(&["c3", "n8", "n9", "c10"]), false)
        );
        assert_eq!(
            names(h.after(MsgId(9), true, 0, usize::MAX)),
            (strs(&["c10"]), false)
        );
        assert_eq!(names(h.after(MsgId(10), true, 0, usize::MAX)).0.len(), 0);
        // Without order (cluster mode) an unknown id means everything kept, truncated.
        assert_eq!(
            names(h.after(MsgId(2), false, 0, usize::MAX)),
            (strs(&["c1", "c3", "n8", "n9", "c10"]), true)
        );
        assert_eq!(
            names(h.after(MsgId(3), false, 0, usize::MAX)),
            (strs(&["n8", "n9", "c10"]), false)
        );
    }

    #[test]
    fn after_says_truncated_when_a_later_chat_left_or_bytes_ran_out() {
        let h = history(&["c1", "c2", "c3", "c4", "c5", "c6", "c7"], CAPS);
        // c1 and c2 are gone: since c1 misses c2.
        for ordered in [true, false] {
            let (v, t) = names(h.after(MsgId(1), ordered, 0, usize::MAX));
            assert_eq!(v, strs(&["c3", "c4", "c5", "c6", "c7"]), "{ordered}");
            assert!(t, "{ordered}");
        }
        let (v, t) = names(h.after(MsgId(2), true, 0, usize::MAX));
        assert_eq!((v.len(), t), (5, false), "nothing after c2 is missing");
        let (v, t) = names(h.after(MsgId(3), true, 0, 6));
        assert_eq!((v, t), (strs(&["c6", "c7"]), true));
        // An id from the future: nothing after it.
        assert_eq!(names(h.after(MsgId(99), true, 0, 100)).0.len(), 0);
    }

    #[test]
    fn before_pages_back_through_everything() {
        let h = history(&["c1", "n2", "c3", "n4", "c5", "c6"], CAPS);
        for ordered in [true, false] {
            let page = Budget { count: 2, bytes: 6 };
            let mut got = Vec::new();
            let mut before = None;
            loop {
                let w = h.before(before, ordered, 0, page);
                let v: Vec<MsgId> = w.map(|e| e.id).collect();
                if v.is_empty() {
                    break;
                }
                before = Some(v[0]);
                got.splice(0..0, v);
            }
            assert_eq!(got, [1u128, 2, 3, 4, 5, 6].map(MsgId).to_vec(), "{ordered}");
        }
        let (v, t) = names(h.before(Some(MsgId(77)), false, 0, ALL));
        assert_eq!((v.len(), t), (0, true));
        let (v, t) = names(h.before(Some(MsgId(5)), true, 0, ALL));
        assert_eq!((v, t), (strs(&["c1", "n2", "c3", "n4"]), false));
    }

    #[test]
    fn held_notices_are_recognised_and_clear_keeps_the_order_going() {
        let mut h = history(&["c1", "n2", "n3"], CAPS);
        assert!(h.is_held(MsgId(3), 1) && !h.is_held(MsgId(2), 1));
        assert!(h.is_held(MsgId(2), 2));
        h.clear();
        assert!(h.is_empty());
        h.push(MsgId(4), frame("c4"), false, CAPS);
        h.push(MsgId(5), frame("n5"), true, CAPS);
        assert_eq!(names(h.iter()).0, strs(&["c4", "n5"]));
    }
}
