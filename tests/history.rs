//! Room history over the WebSocket: `welcome` carries the last 50 messages (oldest first, the
//! same as `GET /rooms/{id}/messages`); `since=<id>` gives exactly the messages after that id,
//! so a reconnecting client misses nothing; an id that has left the ring (or never existed)
//! gives every kept message and `"truncated": true`.
mod common;

use common::*;
use serde_json::Value;

const FAST: [&str; 4] = ["--chat-rate", "100000", "--chat-burst", "100000"];

/// Sends `n` chats `{prefix}{i}` and waits for the echo of the last; returns the echoes.
fn chat_n(ws: &mut Ws, prefix: &str, n: usize) -> Vec<Value> {
    for i in 0..n {
        ws.chat(&format!("{prefix}{i}"));
    }
    let mut out = Vec::new();
    while out.len() < n {
        let m = ws.recv();
        if m["type"] == "chat" && m["message"].as_str().unwrap().starts_with(prefix) {
            out.push(m);
        }
    }
    out
}

fn history(s: &Server, room: &str, sid: &str, limit: usize) -> Vec<Value> {
    let r = s
        .http()
        .get(&format!("/rooms/{room}/messages?limit={limit}"), Some(sid));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["messages"].as_array().unwrap().clone()
}

fn ids(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

fn texts(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .map(|m| m["message"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn welcome_carries_the_last_50_messages_oldest_first() {
    let s = Server::start(&FAST);
    let (a, _) = s.session("alice");
    let (b, _) = s.session("bob");
    let room = s.room(&a);
    let (mut wa, _) = s.join(&room, &a);
    let sent = chat_n(&mut wa, "m", 70);
    let before = history(&s, &room, &a, 1000);
    assert_eq!(before.len(), 71, "user_joined and 70 chats");

    let (_wb, welcome) = s.join(&room, &b);
    let got = welcome["messages"].as_array().unwrap();
    assert_eq!(got.len(), 50);
    assert_eq!(
        ids(got),
        ids(&before[21..]),
        "the last 50: {:?}",
        texts(got)
    );
    assert_eq!(got[..], before[21..], "as stored");
    assert_eq!(got.last().unwrap(), sent.last().unwrap());
    assert!(
        welcome.get("truncated").is_none_or(|t| t == false),
        "{}",
        welcome["truncated"]
    );
}

#[test]
fn reconnecting_with_since_misses_nothing() {
    let s = Server::start(&FAST);
    let (a, _) = s.session("alice");
    let (b, _) = s.session("bob");
    let room = s.room(&a);
    let (mut wa, _) = s.join(&room, &a);
    let (mut wb, _) = s.join(&room, &b);
    wb.recv_type("user_joined");
    let last_seen = chat_n(&mut wa, "before", 3).pop().unwrap();
    // alice drops; bob keeps talking (more than 50 messages while she is away).
    drop(wa);
    wb.recv_type("user_left");
    let missed = chat_n(&mut wb, "while-away", 60);
    let since = last_seen["id"].as_str().unwrap();
    let (_wa, welcome) = s.join_query(&room, &format!("session_id={a}&since={since}"));
    let got = welcome["messages"].as_array().unwrap();
    assert!(
        welcome.get("truncated").is_none_or(|t| t == false),
        "{welcome}"
    );
    assert_eq!(
        got.len(),
        61,
        "alice's user_left and 60 chats: {:?}",
        texts(got)
    );
    assert_eq!(got[0]["type"], "user_left");
    assert_eq!(got[0]["user"], "alice");
    assert_eq!(got[1..], missed[..]);
}

#[test]
fn since_gives_exactly_the_later_messages() {
    let s = Server::start(&FAST);
    let (a, _) = s.session("alice");
    let (b, _) = s.session("bob");
    let room = s.room(&a);
    let (mut wa, _) = s.join(&room, &a);
    let sent = chat_n(&mut wa, "c", 30);
    for k in [0, 9, 28] {
        // Each earlier round added bob's join and leave to the history: expect them too.
        let all = history(&s, &room, &a, 1000);
        let since = sent[k]["id"].as_str().unwrap();
        let at = all
            .iter()
            .position(|m| m["id"] == since)
            .expect("the id is in the history");
        let (ws, welcome) = s.join_query(&room, &format!("session_id={b}&since={since}"));
        let got = welcome["messages"].as_array().unwrap();
        assert_eq!(
            ids(got),
            ids(&all[at + 1..]),
            "since message {k}: {:?}",
            texts(got)
        );
        assert_eq!(
            got[..sent.len() - k - 1],
            sent[k + 1..],
            "since message {k}"
        );
        assert!(
            welcome.get("truncated").is_none_or(|t| t == false),
            "{welcome}"
        );
        drop(ws);
        s.wait_user_count(&room, 1);
        // bob's user_left may be held for --notice-delay after the count drops: the next
        // round's history read must already hold it.
        let left = wait_for(std::time::Duration::from_secs(3), || {
            history(&s, &room, &a, 1)
                .last()
                .is_some_and(|m| m["type"] == "user_left")
        });
        assert!(left.is_some(), "bob's user_left reached the history");
    }
    // Since the newest message: nothing to catch up on.
    let newest = history(&s, &room, &a, 1).pop().unwrap();
    let (_ws, welcome) = s.join_query(
        &room,
        &format!("session_id={b}&since={}", newest["id"].as_str().unwrap()),
    );
    assert_eq!(
        welcome["messages"].as_array().unwrap().len(),
        0,
        "{welcome}"
    );
    assert!(
        welcome.get("truncated").is_none_or(|t| t == false),
        "{welcome}"
    );
}

#[test]
fn since_an_id_gone_from_the_ring_or_unknown_is_truncated() {
    let s = Server::start(&["--history", "20", FAST[0], FAST[1], FAST[2], FAST[3]]);
    let (a, _) = s.session("alice");
    let (b, _) = s.session("bob");
    let room = s.room(&a);
    let (mut wa, _) = s.join(&room, &a);
    let sent = chat_n(&mut wa, "r", 30);
    let kept = history(&s, &room, &a, 1000);
    assert_eq!(ids(&kept), ids(&sent[10..]), "the ring keeps the last 20");
    let gone = sent[0]["id"].as_str().unwrap().to_string();
    // A well-formed v7 id from long ago that this room never had.
    let never = "01890a5d-ac96-774b-bcce-b302099a8057".to_string();
    for (round, since) in [gone, never].into_iter().enumerate() {
        // bob's join and leave of the earlier round are in history once they were sent
        // (`--notice-delay`); notices have a ring of their own, besides the 20 chats.
        wait_for(TIMEOUT, || {
            history(&s, &room, &a, 1000).len() == 20 + 2 * round
        })
        .expect("history settled");
        let kept = history(&s, &room, &a, 1000);
        let (ws, welcome) = s.join_query(&room, &format!("session_id={b}&since={since}"));
        assert_eq!(welcome["truncated"], true, "since {since}: {welcome}");
        let got = welcome["messages"].as_array().unwrap();
        assert_eq!(
            ids(got),
            ids(&kept),
            "since {since}: every kept message: {:?}",
            texts(got)
        );
        drop(ws);
        s.wait_user_count(&room, 1);
    }
}
