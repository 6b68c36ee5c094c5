//! A bounded measurement, not a criterion benchmark: the CPU one request or frame costs as
//! the state other clients (or the same attacker) created grows. It asserts nothing; it
//! prints one line per case. Run: `cargo bench --bench scaling [rooms|typing]` (add
//! `--profile fast` to reuse the test build). Figures go to BENCHMARKS.md.
//!
//! - `POST /rooms` (the hub's part) from one session that already owns N rooms, and from a
//!   session of its own while N rooms exist (owned by 100-room sessions);
//! - a `typing` frame (past its debounce, so only the lookup and the drop) from the first
//!   and from the last member of a 3 000-member room.

use std::hint::black_box;
use std::time::Instant;

use chatloop::hub::{ConnId, Hub, HubConfig};
use chatloop::time::Now;

/// Requests timed per case: few enough that the state grows by little while it is timed.
const TIMED: u32 = 1_000;

fn big_hub() -> Hub {
    Hub::new(HubConfig {
        max_rooms: 10_000_000,
        max_sessions: 10_000_000,
        // The per-session cap (--max-rooms-per-session) would stop the attack measured here.
        max_rooms_per_session: 0,
        upgrade_rate: 0,
        ..HubConfig::default()
    })
}

fn per_op(label: &str, n: usize, ops: u32, f: impl FnMut()) {
    let mut f = f;
    let t = Instant::now();
    for _ in 0..ops {
        f();
    }
    let ns = t.elapsed().as_nanos() as f64 / f64::from(ops);
    println!("{label:<58} {n:>7}  {:>9.2} us", ns / 1000.0);
}

fn create_rooms() {
    let now = Now::fake(1_000_000);
    for n in [2_000usize, 8_000, 100_000] {
        // One session owns all N rooms (the attack in issue 12, finding 9).
        let mut hub = big_hub();
        let (sid, _) = hub.create_session("alice", now).unwrap();
        let t = Instant::now();
        for _ in 0..n {
            hub.create_room(sid, now).unwrap();
        }
        let fill = t.elapsed();
        per_op(
            "POST /rooms, the session already owns N rooms",
            n,
            TIMED,
            || {
                black_box(hub.create_room(sid, now).unwrap());
            },
        );
        println!("    (creating the N rooms took {fill:.2?})");

        // N rooms owned by others; a fresh session creates.
        let mut hub = big_hub();
        for _ in 0..n / 100 {
            let (s, _) = hub.create_session("bob", now).unwrap();
            for _ in 0..100 {
                hub.create_room(s, now).unwrap();
            }
        }
        let (sid, _) = hub.create_session("carol", now).unwrap();
        per_op(
            "POST /rooms, N rooms exist (100 per session)",
            n,
            TIMED,
            || {
                black_box(hub.create_room(sid, now).unwrap());
            },
        );
    }
}

fn typing_frames() {
    let members = 3_000usize;
    let mut hub = big_hub();
    let mut t = 1_000_000u64;
    let (sid, _) = hub.create_session("alice", Now::fake(t)).unwrap();
    let room = hub.create_room(sid, Now::fake(t)).unwrap();
    for i in 0..members {
        hub.connect(ConnId(i), sid, room, None, &[], Now::fake(t))
            .unwrap();
        hub.drain_actions().for_each(drop);
    }
    hub.handle_timeout(Now::fake(t + 1_000_000));
    hub.drain_actions().for_each(drop);
    t += 2_000_000;
    for (label, conn) in [
        ("typing frame from the first member, M members", 0),
        ("typing frame from the last member, M members", members - 1),
    ] {
        // Past the 50/s cap within this second: each frame is looked up and dropped.
        for _ in 0..60 {
            hub.on_text(ConnId(conn), room, r#"{"type":"typing"}"#, Now::fake(t));
        }
        hub.drain_actions().for_each(drop);
        per_op(label, members, 100_000, || {
            hub.on_text(
                ConnId(conn),
                black_box(room),
                r#"{"type":"typing"}"#,
                Now::fake(t),
            );
        });
        hub.drain_actions().for_each(drop);
        t += 10_000_000;
        hub.handle_timeout(Now::fake(t));
        hub.drain_actions().for_each(drop);
    }
}

fn main() {
    // `cargo bench --bench scaling [rooms|typing]`: a filter picks one part.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wants = |part: &str| filter.is_empty() || filter.iter().any(|f| part.contains(f.as_str()));
    if wants("scaling typing") {
        typing_frames();
    }
    if wants("scaling rooms") {
        create_rooms();
    }
}
