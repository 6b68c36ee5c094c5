//! Issue 12, finding 6: presence churn does not wipe history. A client connecting and
//! closing in a loop adds `user_joined` / `user_left`, which have a ring of their own
//! (`--history-notices`), so the last `--history` chat messages stay retrievable and a
//! `since` catch-up still returns them; and WebSocket upgrades have a budget per session
//! (`--upgrade-rate` / `--upgrade-burst`, 429 with `Retry-After`), while a bystander session
//! from another address connects as usual.
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const FAST: [&str; 4] = ["--chat-rate", "100000", "--chat-burst", "100000"];

fn chats(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .filter(|m| m["type"] == "chat")
        .map(|m| m["message"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn presence_churn_leaves_chat_history_and_since_recovery_intact() {
    let mut args = vec!["--history", "100"];
    args.extend_from_slice(&FAST);
    let s = Server::start(&args);
    let alice = s.session_from(BYSTANDER, "alice").0;
    // 26 sessions, so that the churn is not just refused for the upgrade budget (20 each).
    let mallory: Vec<String> = (0..26).map(|i| s.session(&format!("m{i}")).0).collect();
    let room = s.room(&mallory[0]);

    // alice talks, then drops, having seen her first message.
    let mut wa = s
        .ws_from(BYSTANDER, &format!("/ws/{room}?session_id={alice}"))
        .unwrap();
    assert_eq!(wa.recv()["type"], "welcome");
    let texts: Vec<String> = (0..100).map(|i| format!("chat {i}")).collect();
    for t in &texts {
        wa.chat(t);
    }
    let first = wa.recv_chat(&texts[0]);
    wa.recv_chat(&texts[99]);
    drop(wa);

    // The attack of the issue: 520 connect/close cycles.
    let t = Instant::now();
    for i in 0..520 {
        let (ws, _) = s.join(&room, &mallory[i % 26]);
        drop(ws);
    }
    eprintln!("520 connect/close cycles took {:?}", t.elapsed());
    wait_for(TIMEOUT, || {
        s.http().get(&format!("/rooms/{room}"), None).json()["user_count"] == 0
    })
    .expect("every churn socket closed");

    // alice comes back with since: every chat after the one she saw.
    let since = first["id"].as_str().unwrap();
    let mut wa = s
        .ws_from(
            BYSTANDER,
            &format!("/ws/{room}?session_id={alice}&since={since}"),
        )
        .unwrap();
    let welcome = wa.recv();
    let got = chats(welcome["messages"].as_array().unwrap());
    assert_eq!(
        got,
        texts[1..],
        "the chats after `since` survived the churn"
    );
    assert!(
        welcome.get("truncated").is_none_or(|t| t == false),
        "{}",
        welcome["truncated"]
    );
    // REST has all 100, and at most --history-notices (100) notices besides.
    let r = s
        .http_from(BYSTANDER)
        .get(&format!("/rooms/{room}/messages?limit=1000"), Some(&alice));
    let all = r.json()["messages"].as_array().unwrap().clone();
    assert_eq!(chats(&all), texts);
    assert!(all.len() <= 200, "{} entries", all.len());
    wa.chat_roundtrip("alice is fine");
}

#[test]
fn an_upgrade_flood_gets_429_while_a_bystander_session_connects() {
    let s = Server::start(&[]);
    let (mallory, _) = s.session("mallory");
    let room = s.room(&mallory);
    let alice = s.session_from(BYSTANDER, "alice").0;

    let mut refused = None;
    let mut accepted = 0;
    for _ in 0..40 {
        match s.ws(&format!("/ws/{room}?session_id={mallory}")) {
            Ok(ws) => {
                accepted += 1;
                drop(ws);
            }
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    assert_eq!(
        refused,
        Some(429),
        "{accepted} upgrades in a row, none refused"
    );
    assert_eq!(accepted, 20, "--upgrade-burst 20 by default");
    // 429 with Retry-After and a detail, as for the other budgets.
    let mut h = s.http();
    let r = h.request(
        "GET",
        &format!("/ws/{room}?session_id={mallory}"),
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        None,
    );
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.header("Retry-After").is_some(), "{:?}", r.headers);
    assert!(r.json()["detail"].as_str().unwrap().contains("WebSocket"));

    // The bystander's session connects and chats at once.
    let mut wa = s
        .ws_from(BYSTANDER, &format!("/ws/{room}?session_id={alice}"))
        .expect("the bystander's upgrade is accepted");
    assert_eq!(wa.recv()["type"], "welcome");
    wa.chat_roundtrip("alice is fine");

    // The attacker's budget comes back at --upgrade-rate (2 per second).
    let back = wait_for(Duration::from_secs(3), || {
        s.ws(&format!("/ws/{room}?session_id={mallory}")).is_ok()
    });
    assert!(back.is_some(), "an upgrade is allowed again after a while");
}
