//! Disappearing messages (issue 14): `POST /rooms {"message_ttl": s}`; each message leaves
//! history that long after it was sent, members get one `expired` frame naming the ids, and
//! the message is never again in a welcome, a `since` catch-up or `GET .../messages`.
mod common;

use std::time::{Duration, Instant};

use common::Server;
use serde_json::{Value, json};

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .filter(|m| m["type"] == "chat")
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn messages_disappear_after_the_room_ttl_everywhere() {
    // --min-message-ttl lowers the 5 s floor for this test only.
    let s = Server::start(&["--create-rate", "0", "--min-message-ttl", "1s"]);
    let (a, _) = s.session("alice");
    let (b, _) = s.session("bob");
    let r = s
        .http()
        .post_json("/rooms", &json!({"message_ttl": 1}).to_string(), Some(&a));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["message_ttl"], 1);
    let room = r.json()["room_id"].as_str().unwrap().to_string();
    let info = s.http().get(&format!("/rooms/{room}"), None).json();
    assert_eq!(info["message_ttl"], 1);

    let (mut wa, _) = s.join(&room, &a);
    let (mut wb, _) = s.join(&room, &b);
    wa.recv_type("user_joined");
    let sent = Instant::now();
    wa.chat("one");
    wa.chat("two");
    let first = wa.recv_type("chat");
    wa.recv_type("chat");
    let id1 = first["id"].as_str().unwrap().to_string();
    let before = s
        .http()
        .get(&format!("/rooms/{room}/messages"), Some(&b))
        .json();
    assert_eq!(ids(&before["messages"]).len(), 2);

    // Bob gets one frame naming both (they were sent within the same quarter second).
    let expired = wb.recv_type("expired");
    let waited = sent.elapsed();
    assert_eq!(expired["room_id"], room.as_str());
    let gone: Vec<&str> = expired["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(gone.contains(&id1.as_str()), "{expired}");
    assert!(
        waited >= Duration::from_millis(900),
        "expired {waited:?} after sending, before the 1 s TTL"
    );
    // Gone from REST, a new welcome and a since catch-up.
    let after = s
        .http()
        .get(&format!("/rooms/{room}/messages"), Some(&b))
        .json();
    assert!(ids(&after["messages"]).is_empty(), "{after}");
    let (_wc, welcome) = s.join(&room, &b);
    assert!(ids(&welcome["messages"]).is_empty(), "{welcome}");
    let (_wd, caught_up) = s.join_query(&room, &format!("session_id={b}&since={id1}"));
    assert!(ids(&caught_up["messages"]).is_empty(), "{caught_up}");
    assert!(s.metric("chatloop_messages_expired_total") >= 2.0);
}

#[test]
fn message_ttl_is_bounded_and_plain_rooms_keep_their_history() {
    let s = Server::start(&["--create-rate", "0", "--max-message-ttl", "1h"]);
    let (a, _) = s.session("alice");
    for bad in [json!(4), json!(3601), json!(-1), json!(1.5), json!("60")] {
        let r = s.http().post_json(
            "/rooms",
            &json!({ "message_ttl": bad }).to_string(),
            Some(&a),
        );
        assert_eq!(r.status, 422, "{bad}: {}", r.text());
        let detail = r.json()["detail"].as_str().unwrap().to_string();
        assert!(
            detail.contains("message_ttl") && detail.contains("3600"),
            "{detail}"
        );
    }
    for ok in [5, 3600] {
        let r = s.http().post_json(
            "/rooms",
            &json!({ "message_ttl": ok }).to_string(),
            Some(&a),
        );
        assert_eq!(r.status, 201, "{ok}: {}", r.text());
    }
    // A room without a TTL keeps its messages, and shows no message_ttl.
    let plain = s.room(&a);
    let (mut w, _) = s.join(&plain, &a);
    w.chat("stays");
    w.recv_type("chat");
    w.expect_silence(Duration::from_millis(1500));
    let info = s.http().get(&format!("/rooms/{plain}"), None).json();
    assert!(info.get("message_ttl").is_none(), "{info}");
    let h = s
        .http()
        .get(&format!("/rooms/{plain}/messages"), Some(&a))
        .json();
    assert_eq!(ids(&h["messages"]).len(), 1);
}
