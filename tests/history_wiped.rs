//! When a room expires, its history is gone from memory too: every entry's frame is zeroed
//! before its memory goes back to the allocator, so the freed chunks the allocator keeps hold
//! no chat text (issue 14, "memory-only"). The test reads the server's own heap through
//! `/proc/PID/mem` after the room expired and counts the chats it can still find.
//!
//! Reading another process's memory needs ptrace rights over it; the server marks itself
//! non-dumpable, so only a root (CAP_SYS_PTRACE) test run can look. Elsewhere the test says
//! so and checks nothing.

mod common;

use common::*;
use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

const MARKER: &[u8] = b"wipe-marker-";

/// Occurrences of `MARKER` in the process's writable private mappings (heap and anonymous).
fn count_in_memory(pid: u32) -> Option<usize> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let mut mem = match std::fs::File::open(format!("/proc/{pid}/mem")) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("cannot read the server's memory ({e}): nothing checked");
            return None;
        }
    };
    let mut found = 0;
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
            continue;
        };
        let path = parts.nth(3).unwrap_or("");
        if !perms.starts_with("rw") || !(path.is_empty() || path == "[heap]") {
            continue;
        }
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (a, b) = (
            u64::from_str_radix(a, 16).ok()?,
            u64::from_str_radix(b, 16).ok()?,
        );
        let mut buf = vec![0u8; (b - a) as usize];
        if mem.seek(SeekFrom::Start(a)).is_err() || mem.read_exact(&mut buf).is_err() {
            if path == "[heap]" {
                eprintln!("cannot read the server's heap: nothing checked");
                return None;
            }
            continue;
        }
        found += buf.windows(MARKER.len()).filter(|w| *w == MARKER).count();
    }
    Some(found)
}

#[test]
fn an_expired_rooms_chat_text_is_not_left_in_freed_memory() {
    let s = Server::start(&["--room-ttl", "1s", "--notice-delay", "0ms"]);
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    let (mut ws, _) = s.join(&room, &sid);
    let pad = "q".repeat(150);
    for k in 0..40 {
        ws.chat(&format!("wipe-marker-{k:03}-{pad}"));
        ws.recv_type("chat");
    }
    drop(ws);
    let mut http = s.http();
    let gone = wait_for(Duration::from_secs(10), || {
        http.call("GET", &format!("/rooms/{room}"), Some(&sid))
            .status
            == 404
    });
    assert!(gone.is_some(), "the room expired");

    // Other chat goes through the same loop-wide buffers (read buffer, frame builder).
    let other = s.room(&sid);
    let (mut ws, _) = s.join(&other, &sid);
    let filler = "z".repeat(400);
    for k in 0..10 {
        ws.chat(&format!("filler-{k:03}-{filler}"));
        ws.recv_type("chat");
    }
    let Some(found) = count_in_memory(s.pid()) else {
        return;
    };
    eprintln!("chats of the expired room still in memory: {found}");
    assert_eq!(found, 0, "chat text of an expired room left in the heap");
}
