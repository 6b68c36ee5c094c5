//! A chat broadcast allocates the same small number of times whatever the room's size:
//! the message is encoded once and every member's queue gets the same shared frame.
//! Counted with a counting global allocator over the hub and the output queues (no sockets:
//! the kernel's work is not ours to count), after a warm-up that sizes the reused buffers.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use chatloop::hub::{Action, ConnId, Hub, HubConfig};
use chatloop::outbox::{Chunk, Outbox, Queue};
use chatloop::time::Now;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A writer that takes everything and keeps nothing.
struct Null;

impl Write for Null {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        Ok(bufs.iter().map(|b| b.len()).sum())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Allocations for one chat message delivered to every member of a room of `members`.
fn allocations_per_broadcast(members: usize) -> u64 {
    let cfg = HubConfig {
        chat_rate: 1_000_000,
        chat_burst: 1_000_000,
        ..HubConfig::default()
    };
    let mut hub = Hub::new(cfg);
    let mut t = 1_000_000u64;
    let (sid, _) = hub.create_session("alice", Now::fake(t)).unwrap();
    let room = hub.create_room(sid, Now::fake(t)).unwrap();
    for c in 0..members {
        hub.connect(ConnId(c), sid, room, None, &[], Now::fake(t))
            .unwrap();
    }
    let mut queues: Vec<Queue> = (0..members).map(|_| Queue::default()).collect();
    let mut outbox = Outbox::default();
    let mut dirty: Vec<usize> = Vec::with_capacity(members);
    let mut broadcast = |hub: &mut Hub, t: u64| {
        hub.on_text(
            ConnId(0),
            room,
            r#"{"type":"chat","message":"hello everyone"}"#,
            Now::fake(t),
        );
        for a in hub.drain_actions() {
            if let Action::Send(ConnId(c), frame) = a
                && queues[c].push(&mut outbox, Chunk::Shared(frame))
            {
                dirty.push(c);
            }
        }
        for c in dirty.drain(..) {
            queues[c].flush(&mut outbox, &mut Null).unwrap();
        }
        outbox.end_round();
    };
    // Warm-up: the join traffic, then enough messages to fill the history ring so that
    // steady state (pop one, push one) is what gets measured.
    broadcast(&mut hub, t);
    for _ in 0..1100 {
        t += 1000;
        broadcast(&mut hub, t);
    }
    let before = ALLOCS.load(Ordering::Relaxed);
    const ROUNDS: u64 = 20;
    for _ in 0..ROUNDS {
        t += 1000;
        broadcast(&mut hub, t);
    }
    (ALLOCS.load(Ordering::Relaxed) - before) / ROUNDS
}

#[test]
fn allocations_per_broadcast_do_not_depend_on_room_size() {
    let small = allocations_per_broadcast(10);
    let big = allocations_per_broadcast(1000);
    println!("allocations per broadcast: 10 members {small}, 1000 members {big}");
    assert_eq!(
        small, big,
        "a bigger room must not cost more allocations per message"
    );
    assert!(
        small <= 4,
        "one broadcast should cost a handful of allocations, got {small}"
    );
}
