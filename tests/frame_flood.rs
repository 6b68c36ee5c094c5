//! Issue 12, finding 9: a flood of frames of any kind ends in a close (1008), as a chat
//! flood does: every frame a chat socket sends spends a budget of `--chat-rate` + 60 per
//! second (bursts of 2 x `--chat-burst` + 60), above what chat, typing (at most 50 a second
//! reach the room) and pings need. A bystander in the same room (another address) keeps
//! chatting; a fast but honest typist is not closed.
mod common;

use std::time::{Duration, Instant};

use common::*;

/// A room with the bystander alice (from 127.0.0.2) in it; returns (server, room, alice's socket).
fn room_with_bystander() -> (Server, String, Ws) {
    let s = Server::start(&[]);
    let alice = s.session_from(BYSTANDER, "alice").0;
    let (owner, _) = s.session("owner");
    let room = s.room(&owner);
    let mut wa = s
        .ws_from(BYSTANDER, &format!("/ws/{room}?session_id={alice}"))
        .unwrap();
    assert_eq!(wa.recv()["type"], "welcome");
    (s, room, wa)
}

/// Sends `n` frames of one kind as fast as the socket takes them; returns the close code the
/// server ends with (`None` if it never closes within the timeout).
fn flood(s: &Server, room: &str, opcode: u8, payload: &[u8], n: usize) -> Option<u16> {
    let (sid, _) = s.session("mallory");
    let mut ws = s.raw_ws(&format!("/ws/{room}?session_id={sid}"));
    for _ in 0..n {
        ws.send_frame(opcode, payload, true);
    }
    ws.stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    ws.close_code()
}

#[test]
fn a_typing_flood_is_closed_while_a_bystander_keeps_chatting() {
    let (s, room, mut wa) = room_with_bystander();
    let code = flood(&s, &room, 1, br#"{"type":"typing"}"#, 2000);
    assert_eq!(code, Some(1008), "2000 typing frames at once");
    wa.chat_roundtrip("alice is fine");
    // alice saw at most the flood's one `typing` (and its stop), join and leave: no flood.
    let seen = wa.drain(Duration::from_millis(200));
    assert!(seen.len() <= 4, "{seen:?}");
    assert!(s.log().contains("1008"), "the close is logged");
}

#[test]
fn floods_of_every_other_frame_kind_are_closed_too() {
    let (s, room, mut wa) = room_with_bystander();
    for (what, opcode, payload) in [
        ("invalid JSON", 1u8, &b"{not json"[..]),
        ("unknown types", 1, br#"{"type":"dance"}"#),
        ("binary frames", 2, b"\x00\x01\x02"),
        ("pings", 9, b"ping"),
        ("empty chat", 1, br#"{"type":"chat","message":"  "}"#),
    ] {
        let code = flood(&s, &room, opcode, payload, 2000);
        assert_eq!(code, Some(1008), "a flood of {what}");
        wa.chat_roundtrip(&format!("alice is fine after {what}"));
    }
}

#[test]
fn a_fast_typist_is_not_closed() {
    let (s, room, _wa) = room_with_bystander();
    let (sid, _) = s.session("bob");
    let (mut wb, _) = s.join(&room, &sid);
    // 60 frames a second for 3 s: typing at 50/s (the most the room gets) and 10 chats/s.
    let start = Instant::now();
    for i in 0..180u32 {
        if i % 6 == 5 {
            wb.chat(&format!("line {i}"));
        } else {
            wb.send_text(r#"{"type":"typing"}"#);
        }
        let due = start + Duration::from_micros(16_667 * u64::from(i + 1));
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
    wb.chat_roundtrip("still here");
}
