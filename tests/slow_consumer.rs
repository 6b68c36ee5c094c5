//! Slow consumers (`--max-output-queue`): a member that stops reading while the room is busy is
//! closed once its unsent output passes the limit (its TCP connection ends; a 1013 close frame
//! is best effort), and the sender and the members who read miss nothing.
mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::Server;

#[test]
fn a_member_that_never_reads_is_closed_and_the_others_get_everything() {
    let s = Server::start(&[
        "--max-output-queue",
        "64KiB",
        "--chat-rate",
        "100000",
        "--chat-burst",
        "100000",
        "--max-chat-chars",
        "20000",
    ]);
    let (a, _) = s.session("sender");
    let (b, _) = s.session("reader");
    let (r, r_uid) = s.session("sleeper");
    let room = s.room(&a);
    let (mut wb, _) = s.join(&room, &b);
    let (mut wa, _) = s.join(&room, &a);
    // The sleeper: handshake done, then it never reads again.
    let mut raw = s.raw_ws(&format!("/ws/{room}?session_id={r}"));

    // The well-behaved reader, on its own thread: every chat until "done", and the leave.
    let reader = thread::spawn(move || {
        let mut chats = Vec::new();
        let mut sleeper_left = false;
        loop {
            let v = wb.recv();
            if v["type"] == "user_left" && v["user_id"] == r_uid.as_str() {
                sleeper_left = true;
            }
            if v["type"] == "chat" {
                if v["message"] == "done" {
                    return (chats, sleeper_left, wb);
                }
                chats.push(v["message"].as_str().unwrap()[..8].to_string());
            }
        }
    });

    let body = "x".repeat(16 * 1024 - 8);
    let start = Instant::now();
    let mut sent = Vec::new();
    let mut extra_after_close = None;
    for i in 0..4000 {
        // Lockstep: the sender reads its own copy back before sending the next one.
        let text = format!("{i:08}{body}");
        wa.chat(&text);
        let back = wa.recv_chat(&text);
        assert_eq!(back["user"], "sender");
        sent.push(format!("{i:08}"));
        if extra_after_close.is_none()
            && i % 25 == 24
            && s.metric("chatloop_slow_consumers_total") >= 1.0
        {
            extra_after_close = Some(i + 20); // keep going a little after the close
        }
        if extra_after_close == Some(i) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the sleeper was not closed after {} messages",
            sent.len()
        );
    }
    assert!(
        extra_after_close.is_some(),
        "{} messages of 16 KiB did not overflow a 64 KiB output queue",
        sent.len()
    );
    eprintln!(
        "sleeper closed after about {} messages of 16 KiB",
        sent.len() - 20
    );
    wa.chat_roundtrip("done");
    let (got, sleeper_left, mut wb) = reader.join().expect("the reader's thread");
    assert_eq!(got.len(), sent.len(), "the reader missed messages");
    assert_eq!(got, sent, "the reader got the messages out of order");
    assert!(sleeper_left, "the reader did not see the sleeper leave");

    assert!(
        raw.ends_within(Duration::from_secs(5)),
        "the slow consumer's TCP connection is still open"
    );
    assert_eq!(s.metric("chatloop_slow_consumers_total"), 1.0);
    assert_eq!(s.metric("chatloop_ws_closes_total{code=\"1013\"}"), 1.0);
    let r = s.http().get(&format!("/rooms/{room}"), None).json();
    assert_eq!(r["user_count"], 2, "{r}");
    wb.chat_roundtrip("the reader is fine");
}
