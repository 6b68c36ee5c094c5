//! Typing notices (`--typing-debounce`, `--typing-quiet`): the others get one `typing` at
//! once, repeats within the debounce are dropped, and `typing_stopped` follows after the quiet
//! time, before a chat from the typist, or before the typist's `user_left`.
mod common;

use std::time::{Duration, Instant};

use common::{Server, Ws};
use serde_json::json;

const DEBOUNCE: Duration = Duration::from_millis(300);
const QUIET: Duration = Duration::from_millis(600);

/// A server, a room, and alice and bob in it with the join notices read.
fn setup() -> (Server, Ws, Ws, String) {
    let (s, wa, wb, a_uid, _) = setup_with_sid();
    (s, wa, wb, a_uid)
}

/// Like [`setup`], also returning alice's session id.
fn setup_with_sid() -> (Server, Ws, Ws, String, String) {
    let s = Server::start(&["--typing-debounce", "300ms", "--typing-quiet", "600ms"]);
    let (a, a_uid) = s.session("alice");
    let (b, _) = s.session("bob");
    let room = s.room(&a);
    let (mut wa, _) = s.join(&room, &a);
    let (mut wb, _) = s.join(&room, &b);
    // alice: her own user_joined, then bob's; bob: his own, after alice's if it was still
    // held (`--notice-delay`) when he joined.
    assert_eq!(wa.recv()["type"], "user_joined");
    assert_eq!(wa.recv()["user"], "bob");
    let mut v = wb.recv();
    if v["user"] == "alice" {
        v = wb.recv();
    }
    assert_eq!(
        (&v["type"], &v["user"]),
        (&json!("user_joined"), &json!("bob"))
    );
    (s, wa, wb, a_uid, a)
}

fn typing(ws: &mut Ws) {
    ws.send_json(json!({"type": "typing"}));
}

#[test]
fn others_get_one_typing_then_typing_stopped_after_the_quiet_time() {
    let (_s, mut wa, mut wb, a_uid) = setup();
    let t0 = Instant::now();
    typing(&mut wa);
    let v = wb
        .recv_within(Duration::from_millis(250))
        .expect("typing at once");
    assert_eq!(v["type"], "typing", "{v}");
    assert_eq!(v["user"], "alice", "{v}");
    assert_eq!(v["user_id"], a_uid.as_str(), "{v}");
    // Repeats within the debounce window are dropped.
    let mut last = Instant::now();
    for _ in 0..4 {
        typing(&mut wa);
        last = Instant::now();
        std::thread::sleep(Duration::from_millis(30));
    }
    assert!(
        t0.elapsed() < DEBOUNCE,
        "the repeats took too long to send: {:?}",
        t0.elapsed()
    );
    let v = wb
        .recv_within(Duration::from_secs(2))
        .expect("typing_stopped after the quiet time");
    let after_last = last.elapsed();
    assert_eq!(
        v["type"], "typing_stopped",
        "repeat within the debounce was not dropped: {v}"
    );
    assert_eq!(v["user"], "alice", "{v}");
    assert_eq!(v["user_id"], a_uid.as_str(), "{v}");
    assert!(
        after_last >= QUIET - Duration::from_millis(50),
        "typing_stopped {after_last:?} after the last typing: the quiet time counts from the last typing"
    );
    assert!(
        after_last < QUIET + Duration::from_millis(500),
        "typing_stopped only after {after_last:?}"
    );
    // Once.
    wb.expect_silence(Duration::from_millis(300));
    // The typist hears none of its own typing notices.
    wa.chat_roundtrip("alice is fine");
    wb.chat_roundtrip("bob is fine");
}

#[test]
fn typing_after_the_debounce_window_is_forwarded_again() {
    let (_s, mut wa, mut wb, _) = setup();
    typing(&mut wa);
    assert_eq!(wb.recv()["type"], "typing");
    std::thread::sleep(DEBOUNCE + Duration::from_millis(100));
    typing(&mut wa);
    let v = wb
        .recv_within(Duration::from_millis(250))
        .expect("a second typing after the debounce");
    assert_eq!(v["type"], "typing", "{v}");
    // Still one typing_stopped at the end.
    assert_eq!(
        wb.recv_within(Duration::from_secs(2))
            .expect("typing_stopped")["type"],
        "typing_stopped"
    );
    wb.expect_silence(Duration::from_millis(200));
    wb.chat_roundtrip("bob is fine");
}

#[test]
fn a_chat_while_typing_sends_typing_stopped_first() {
    let (_s, mut wa, mut wb, _) = setup();
    typing(&mut wa);
    assert_eq!(wb.recv()["type"], "typing");
    let t = Instant::now();
    wa.chat("done typing");
    let v = wb
        .recv_within(Duration::from_millis(300))
        .expect("typing_stopped at once");
    assert_eq!(v["type"], "typing_stopped", "{v}");
    assert_eq!(v["user"], "alice");
    let v = wb
        .recv_within(Duration::from_millis(300))
        .expect("the chat");
    assert_eq!(v["type"], "chat", "{v}");
    assert_eq!(v["message"], "done typing");
    assert!(
        t.elapsed() < QUIET / 2,
        "typing_stopped waited for the quiet time: {:?}",
        t.elapsed()
    );
    // The sender gets its chat but not its own typing_stopped.
    let v = wa.recv();
    assert_eq!(v["type"], "chat", "{v}");
    // And no second typing_stopped after the quiet time.
    wb.expect_silence(QUIET + Duration::from_millis(200));
    wa.expect_silence(Duration::from_millis(10));
    wb.chat_roundtrip("bob is fine");
}

#[test]
fn closing_while_typing_sends_typing_stopped_then_user_left() {
    let (_s, mut wa, mut wb, a_uid) = setup();
    typing(&mut wa);
    assert_eq!(wb.recv()["type"], "typing");
    wa.socket.close(None).unwrap();
    let v = wb
        .recv_within(Duration::from_millis(300))
        .expect("typing_stopped at once");
    assert_eq!(v["type"], "typing_stopped", "{v}");
    assert_eq!(v["user_id"], a_uid.as_str());
    let v = wb
        .recv_within(Duration::from_millis(300))
        .expect("user_left");
    assert_eq!(v["type"], "user_left", "{v}");
    assert_eq!(v["user_id"], a_uid.as_str());
    wb.expect_silence(QUIET + Duration::from_millis(200));
    wb.chat_roundtrip("bob is fine");
}

#[test]
fn dropping_the_connection_while_typing_also_sends_typing_stopped() {
    let (_s, mut wa, mut wb, _) = setup();
    typing(&mut wa);
    assert_eq!(wb.recv()["type"], "typing");
    drop(wa); // no close frame: the TCP connection just ends
    assert_eq!(
        wb.recv_within(Duration::from_millis(300))
            .expect("typing_stopped")["type"],
        "typing_stopped"
    );
    assert_eq!(
        wb.recv_within(Duration::from_millis(300))
            .expect("user_left")["type"],
        "user_left"
    );
    wb.chat_roundtrip("bob is fine");
}

#[test]
fn typing_right_after_a_chat_is_forwarded_at_once() {
    let (_s, mut wa, mut wb, _) = setup();
    typing(&mut wa);
    assert_eq!(wb.recv()["type"], "typing");
    wa.chat("first line");
    typing(&mut wa); // within the debounce window of the first typing, but a new burst
    let kinds: Vec<String> = (0..3)
        .map(|_| {
            wb.recv_within(Duration::from_millis(250)).expect("a frame")["type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(kinds, ["typing_stopped", "chat", "typing"]);
    assert_eq!(
        wb.recv_within(Duration::from_secs(2))
            .expect("typing_stopped")["type"],
        "typing_stopped"
    );
    wb.chat_roundtrip("bob is fine");
}

#[test]
fn ending_the_session_while_typing_sends_typing_stopped_then_user_left() {
    let (s, mut wa, mut wb, a_uid, a_sid) = setup_with_sid();
    typing(&mut wa);
    assert_eq!(wb.recv()["type"], "typing");
    let r = s.http().call("DELETE", "/sessions/me", Some(&a_sid));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(wa.close_code(), Some(1000));
    let v = wb
        .recv_within(Duration::from_millis(300))
        .expect("typing_stopped at once");
    assert_eq!(v["type"], "typing_stopped", "{v}");
    let v = wb
        .recv_within(Duration::from_millis(300))
        .expect("user_left");
    assert_eq!(v["type"], "user_left", "{v}");
    assert_eq!(v["user_id"], a_uid.as_str());
    wb.expect_silence(QUIET + Duration::from_millis(200));
    wb.chat_roundtrip("bob is fine");
}
