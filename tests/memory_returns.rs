//! Memory comes back after a storm: once the storm's sessions have ended and its rooms have
//! expired, the server's heap shrinks back near its idle size (issue 16). What used to stay:
//! the timer slab at its peak (never compacted once a single armed entry sat at its top),
//! hash tables never cut below 1 024 places, and the loop's reusable buffers (the outbox's
//! chunk list, the hub's action list) at the size of the largest broadcast.
//!
//! The server is given a 1 s room lifetime; it hands memory back 10 s after the last removal,
//! so the test waits up to 30 s for the figure to settle.

mod common;

use common::Server;
use std::time::{Duration, Instant};

const SESSIONS: usize = 10_000;
const ROOMS: usize = 4_000;
const HISTORY: usize = 10;
const MEMBERS: usize = 500;

fn rss_anon(pid: u32) -> u64 {
    status_bytes(pid, "RssAnon:")
}

/// A `/proc/PID/status` figure in bytes (`RssAnon:`, `VmRSS:`).
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("the field in /proc/PID/status")
        * 1024
}

/// Reads `field` every half second until it is at most `bound` or `deadline` has passed;
/// returns the last reading.
fn settle(pid: u32, field: &str, bound: u64, deadline: Instant) -> u64 {
    let mut now = status_bytes(pid, field);
    while now > bound && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        now = status_bytes(pid, field);
    }
    now
}

#[test]
fn the_heap_shrinks_back_after_a_storm() {
    let s = Server::start(&[
        "--room-ttl",
        "1s",
        "--create-rate",
        "0",
        "--chat-rate",
        "100000",
        "--chat-burst",
        "100000",
        "--max-connections-per-ip",
        "0",
        "--upgrade-rate",
        "0",
        "--max-rooms-per-session",
        "0",
    ]);
    std::thread::sleep(Duration::from_millis(300));
    let idle = rss_anon(s.pid());
    let idle_rss = status_bytes(s.pid(), "VmRSS:");

    // The storm: sessions, rooms with history, one big room whose broadcasts fan out widely.
    let mut http = s.http();
    let mut sids = Vec::with_capacity(SESSIONS);
    for i in 0..SESSIONS {
        let r = http.post_json("/sessions", &format!(r#"{{"username":"user{i}"}}"#), None);
        assert_eq!(r.status, 201, "{}", r.text());
        sids.push(r.json()["session_id"].as_str().unwrap().to_string());
    }
    for (i, sid) in sids.iter().take(ROOMS).enumerate() {
        let r = http.call("POST", "/rooms", Some(sid));
        assert_eq!(r.status, 201, "{}", r.text());
        let room = r.json()["room_id"].as_str().unwrap().to_string();
        let (mut ws, _) = s.join(&room, sid);
        for m in 0..HISTORY {
            ws.chat(&format!(
                "message {m} in room {i}, long enough to be worth keeping around"
            ));
            ws.recv_type("chat");
        }
    }
    let big = {
        let r = http.call("POST", "/rooms", Some(&sids[0]));
        r.json()["room_id"].as_str().unwrap().to_string()
    };
    let mut members = Vec::with_capacity(MEMBERS);
    for sid in sids.iter().take(MEMBERS) {
        members.push(s.join(&big, sid).0);
    }
    for ws in members.iter_mut().take(5) {
        ws.chat("hello everyone");
    }
    for ws in &mut members {
        for _ in 0..5 {
            ws.recv_type("chat");
        }
    }
    let peak = rss_anon(s.pid());

    // The storm ends: sockets close, sessions are ended, rooms expire.
    drop(members);
    for sid in &sids {
        assert_eq!(http.call("DELETE", "/sessions/me", Some(sid)).status, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    // A quarter of what the storm added may stay (allocator pages, partly used pages).
    let bound = idle + (peak - idle) / 4;
    let now = settle(s.pid(), "RssAnon:", bound, deadline);
    // And the whole resident set is back within 1.5x of the idle one (issue 16's bound).
    let rss_bound = idle_rss * 3 / 2;
    let rss = settle(s.pid(), "VmRSS:", rss_bound, deadline);
    eprintln!(
        "heap (RssAnon): idle {} KiB, peak {} KiB, after {} KiB; VmRSS idle {} KiB, after {} KiB",
        idle / 1024,
        peak / 1024,
        now / 1024,
        idle_rss / 1024,
        rss / 1024
    );
    assert!(
        now <= bound,
        "the heap stayed at {} KiB after the storm (idle {} KiB, peak {} KiB, bound {} KiB)",
        now / 1024,
        idle / 1024,
        peak / 1024,
        bound / 1024
    );
    assert!(
        rss <= rss_bound,
        "the resident set stayed at {} KiB after the storm, more than 1.5x its idle {} KiB",
        rss / 1024,
        idle_rss / 1024
    );
    // The server is still well.
    let (sid, _) = s.session("after");
    let room = s.room(&sid);
    let (mut ws, _) = s.join(&room, &sid);
    ws.chat("still here");
    assert_eq!(ws.recv_type("chat")["message"], "still here");
}
