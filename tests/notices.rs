//! Held presence notices (`--notice-delay`): `user_joined` / `user_left` wait up to the delay
//! so that a storm of joins shares writes, but chat is never held back behind them and every
//! member still sees the room's events in order.
mod common;

use std::time::{Duration, Instant};

use common::*;

fn kinds_and_users(frames: &[serde_json::Value]) -> Vec<(String, String)> {
    frames
        .iter()
        .map(|f| {
            (
                f["type"].as_str().unwrap_or("").to_string(),
                f["user"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn pair(kind: &str, user: &str) -> (String, String) {
    (kind.to_string(), user.to_string())
}

#[test]
fn chat_releases_held_notices_at_once_and_in_order() {
    // Far longer than the reads below wait: anything that waited for the delay fails them.
    let s = Server::start(&["--notice-delay", "30s"]);
    let (a, _) = s.session("alice");
    let (b, _) = s.session("bob");
    let room = s.room(&a);
    let (mut wa, _) = s.join(&room, &a);
    let (mut wb, welcome_b) = s.join(&room, &b);
    assert_eq!(
        welcome_b["messages"],
        serde_json::json!([]),
        "alice's join is still held, so bob's welcome has no history yet"
    );
    wa.expect_silence(Duration::from_millis(300));
    wb.chat("hello");
    let want = [
        pair("user_joined", "alice"),
        pair("user_joined", "bob"),
        pair("chat", "bob"),
    ];
    for ws in [&mut wa, &mut wb] {
        let got: Vec<_> = (0..3)
            .map(|_| ws.recv_within(Duration::from_secs(10)).expect("in time"))
            .collect();
        assert_eq!(kinds_and_users(&got), want);
    }
    // History (REST) has the same order.
    let h = s
        .http()
        .get(&format!("/rooms/{room}/messages"), Some(&a))
        .json();
    let h = h["messages"].as_array().cloned().unwrap_or_default();
    assert_eq!(kinds_and_users(&h), want, "{h:?}");
}

#[test]
fn notices_go_out_by_themselves_after_the_delay() {
    let s = Server::start(&["--notice-delay", "400ms"]);
    let (a, _) = s.session("alice");
    let (b, _) = s.session("bob");
    let room = s.room(&a);
    let (mut wa, _) = s.join(&room, &a);
    let joined = Instant::now();
    let (_wb, _) = s.join(&room, &b);
    let got: Vec<_> = (0..2).map(|_| wa.recv()).collect();
    assert!(
        joined.elapsed() >= Duration::from_millis(350),
        "the notices were held for the delay ({:?})",
        joined.elapsed()
    );
    assert_eq!(
        kinds_and_users(&got),
        [pair("user_joined", "alice"), pair("user_joined", "bob")]
    );
}

#[test]
fn zero_delay_sends_each_notice_at_once() {
    let s = Server::start(&["--notice-delay", "0"]);
    let (a, _) = s.session("alice");
    let (b, _) = s.session("bob");
    let room = s.room(&a);
    let (mut wa, _) = s.join(&room, &a);
    assert_eq!(wa.recv()["type"], "user_joined");
    let (_wb, welcome_b) = s.join(&room, &b);
    assert_eq!(welcome_b["messages"].as_array().map(Vec::len), Some(1));
    assert_eq!(wa.recv()["user"], "bob");
}
