//! Limits: message size (close 1009), chat length (`message_too_long`), chat rate
//! (`rate_limited`, then close 1008), room members, connections, sessions and rooms (503).
//! In every case a well-behaved client next to the offender keeps working.
mod common;

use std::thread::sleep;
use std::time::Duration;

use common::{Http, Server, Ws, wait_for};
use serde_json::{Value, json};

fn chat_frame(text: &str) -> String {
    json!({"type": "chat", "message": text}).to_string()
}

/// Two members of one room, alice (the offender) and bob, with the join notices read.
fn pair(s: &Server) -> (Ws, Ws, String, String) {
    let (a, a_uid) = s.session("alice");
    let (b, _) = s.session("bob");
    let room = s.room(&a);
    let (mut wa, _) = s.join(&room, &a);
    let (mut wb, _) = s.join(&room, &b);
    assert_eq!(wa.recv()["type"], "user_joined");
    assert_eq!(wa.recv()["type"], "user_joined");
    assert_eq!(wb.recv()["type"], "user_joined");
    (wa, wb, room, a_uid)
}

/// Reads bob's frames until alice's `user_left`; returns the chats seen before it.
#[track_caller]
fn until_left(wb: &mut Ws, uid: &str) -> Vec<Value> {
    let mut chats = Vec::new();
    loop {
        let v = wb.recv();
        if v["type"] == "user_left" && v["user_id"] == uid {
            return chats;
        }
        if v["type"] == "chat" {
            chats.push(v);
        }
    }
}

/// A masked client frame with the FIN bit as given.
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    common::client_frame(
        if fin { 0x80 } else { 0 } | opcode,
        payload,
        Some([1, 2, 3, 4]),
    )
}

#[test]
fn a_message_over_the_size_limit_closes_1009() {
    let s = Server::start(&["--max-ws-message", "1KiB"]);
    let (mut wa, mut wb, _, a_uid) = pair(&s);
    // Just under the limit is fine.
    let fits = "x".repeat(1024 - chat_frame("").len());
    assert_eq!(chat_frame(&fits).len(), 1024);
    wb.send_text(&chat_frame(&fits));
    assert_eq!(wb.recv_chat(&fits)["user"], "bob");
    assert_eq!(wa.recv_chat(&fits)["user"], "bob");

    let big = "y".repeat(2048);
    let _ = wa.socket.send(tungstenite::Message::text(chat_frame(&big)));
    assert_eq!(wa.close_code(), Some(1009));
    let chats = until_left(&mut wb, &a_uid);
    assert!(
        chats.is_empty(),
        "the oversized message was delivered: {} chats",
        chats.len()
    );
    wb.chat_roundtrip("bob is fine");
    assert_eq!(s.metric("chatloop_ws_closes_total{code=\"1009\"}"), 1.0);
}

#[test]
fn a_fragmented_message_over_the_size_limit_closes_1009() {
    let s = Server::start(&["--max-ws-message", "1KiB"]);
    let (a, a_uid) = s.session("alice");
    let (b, _) = s.session("bob");
    let room = s.room(&a);
    let (mut wb, _) = s.join(&room, &b);
    let mut raw = s.raw_ws(&format!("/ws/{room}?session_id={a}"));
    let text = chat_frame(&"z".repeat(1200));
    let (first, rest) = text.as_bytes().split_at(600);
    let mut bytes = frame(false, 0x1, first);
    bytes.extend(frame(true, 0x0, rest));
    use std::io::Write;
    let _ = raw.stream.write_all(&bytes);
    assert_eq!(
        raw.close_code(),
        Some(1009),
        "each fragment fits, the message does not"
    );
    until_left(&mut wb, &a_uid);
    wb.chat_roundtrip("bob is fine");
}

#[test]
fn a_chat_over_the_character_limit_gets_an_error_and_the_socket_stays_open() {
    let s = Server::start(&["--max-chat-chars", "10"]);
    let (mut wa, mut wb, _, _) = pair(&s);
    for long in ["0123456789a", "ééééééééééé", "日本語のテキストです!"] {
        wa.chat(long);
        let v = wa.recv();
        assert_eq!(v["type"], "error", "{long:?} → {v}");
        assert_eq!(v["code"], "message_too_long", "{v}");
        assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()), "{v}");
    }
    // Exactly 10 characters, however many bytes: accepted.
    for ok in [
        "0123456789",
        "日本語のテキストです",
        "😀😀😀😀😀😀😀😀😀😀",
        "éééééééééé",
        "  trimmed!  ",
    ] {
        let v = wa.chat_roundtrip(ok.trim());
        assert_eq!(v["user"], "alice");
        assert_eq!(wb.recv_chat(ok.trim())["type"], "chat");
    }
    // Bob saw none of the refused ones.
    assert!(wb.drain(Duration::from_millis(200)).is_empty());
    wb.chat_roundtrip("bob is ok"); // within the 10 characters
}

#[test]
fn going_over_the_chat_rate_gives_rate_limited_and_the_socket_stays_open() {
    let s = Server::start(&["--chat-rate", "5", "--chat-burst", "5"]);
    let (mut wa, mut wb, _, _) = pair(&s);
    for i in 0..6 {
        wa.chat(&format!("m{i}"));
    }
    let mut chats = 0;
    let mut limited = 0;
    for v in wa.drain(Duration::from_millis(150)) {
        match v["type"].as_str() {
            Some("chat") => chats += 1,
            Some("error") if v["code"] == "rate_limited" => limited += 1,
            _ => panic!("unexpected {v}"),
        }
    }
    assert_eq!((chats, limited), (5, 1), "a burst of 5, then one refused");
    // Typing is not counted by the chat rate.
    for _ in 0..10 {
        wa.send_json(json!({"type": "typing"}));
    }
    assert!(
        wa.drain(Duration::from_millis(100)).is_empty(),
        "typing was rate limited"
    );
    // Tokens come back at 5 per second.
    sleep(Duration::from_millis(450));
    wa.chat_roundtrip("allowed again");
    let bob_chats: Vec<Value> = wb
        .drain(Duration::from_millis(150))
        .into_iter()
        .filter(|v| v["type"] == "chat")
        .collect();
    assert_eq!(bob_chats.len(), 6, "{bob_chats:?}");
    wb.chat_roundtrip("bob has his own bucket");
    assert!(s.metric("chatloop_rate_limited_total") >= 1.0);
}

#[test]
fn flooding_chat_is_closed_with_1008() {
    let s = Server::start(&["--chat-rate", "5", "--chat-burst", "5"]);
    let (mut wa, mut wb, _, a_uid) = pair(&s);
    for i in 0..40 {
        if wa
            .socket
            .send(tungstenite::Message::text(chat_frame(&format!(
                "flood {i}"
            ))))
            .is_err()
        {
            break;
        }
    }
    let mut limited = 0;
    let code = loop {
        match wa.socket.read() {
            Ok(tungstenite::Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "error" {
                    assert_eq!(v["code"], "rate_limited", "{v}");
                    limited += 1;
                }
            }
            Ok(tungstenite::Message::Close(c)) => break c.map(|c| u16::from(c.code)),
            Ok(_) => {}
            Err(e) => panic!("the flooder's socket ended without a close frame: {e}"),
        }
    };
    assert!(limited >= 1, "no rate_limited error before the close");
    assert_eq!(code, Some(1008));
    let chats = until_left(&mut wb, &a_uid);
    assert!(chats.len() <= 6, "bob got {} of the flood", chats.len());
    wb.chat_roundtrip("bob is fine");
    assert_eq!(s.metric("chatloop_ws_closes_total{code=\"1008\"}"), 1.0);
}

#[test]
fn the_member_over_the_room_limit_is_refused_503_before_the_upgrade() {
    let s = Server::start(&["--max-room-members", "2"]);
    let (mut wa, mut wb, room, _) = pair(&s);
    let (c, _) = s.session("carol");
    assert_eq!(
        s.ws(&format!("/ws/{room}?session_id={c}")).err(),
        Some(503),
        "third member"
    );
    assert_eq!(
        s.http().get(&format!("/rooms/{room}"), None).json()["user_count"],
        2
    );
    wb.chat_roundtrip("bob is fine");
    assert_eq!(wa.recv_chat("bob is fine")["user"], "bob");
    // Other rooms are not affected.
    let other = s.room(&c);
    let (mut wc, _) = s.join(&other, &c);
    wc.chat_roundtrip("carol elsewhere");
    // A place frees up when someone leaves.
    wa.socket.close(None).unwrap();
    let _ = wa.close_code();
    wait_for(Duration::from_secs(2), || {
        s.http().get(&format!("/rooms/{room}"), None).json()["user_count"] == 1
    })
    .expect("alice left");
    let (mut wc2, _) = s.join(&room, &c);
    wc2.chat_roundtrip("carol got in");
}

#[test]
fn connections_over_the_limit_get_503_and_the_others_keep_working() {
    let s = Server::start(&["--max-connections", "3"]);
    // Exactly three connections: one HTTP keep-alive and two WebSockets.
    let mut h = s.http();
    let session = |h: &mut Http, name: &str| {
        let r = h.post_json("/sessions", &json!({"username": name}).to_string(), None);
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["session_id"].as_str().unwrap().to_string()
    };
    let a = session(&mut h, "alice");
    let b = session(&mut h, "bob");
    let r = h.call("POST", "/rooms", Some(&a));
    assert_eq!(r.status, 201);
    let room = r.json()["room_id"].as_str().unwrap().to_string();
    let (mut wa, _) = s.join(&room, &a);
    let (mut wb, _) = s.join(&room, &b);

    let mut extra = s.http();
    let r = extra.get("/health", None);
    assert_eq!(r.status, 503, "the fourth connection: {}", r.text());
    assert!(extra.is_closed(), "the refused connection stays open");
    assert_eq!(
        s.ws(&format!("/ws/{room}?session_id={a}")).err(),
        Some(503),
        "a WebSocket over the limit"
    );

    assert_eq!(h.get("/health", None).status, 200);
    wa.chat_roundtrip("alice is fine");
    assert_eq!(wb.recv_chat("alice is fine")["user"], "alice");
    wb.chat_roundtrip("bob is fine");

    // Once one closes, a new connection is served again.
    drop(extra);
    wb.socket.close(None).unwrap();
    let _ = wb.close_code();
    drop(wb);
    wait_for(Duration::from_secs(3), || {
        s.http().get("/health", None).status == 200
    })
    .expect("a connection is served after one closed");
    assert!(s.metric("chatloop_connections_refused_total") >= 1.0);
}

#[test]
fn sessions_and_rooms_over_their_caps_get_503() {
    let s = Server::start(&["--max-sessions", "2", "--max-rooms", "1"]);
    let (a, _) = s.session("alice");
    let (b, _) = s.session("bob");
    let r = s
        .http()
        .post_json("/sessions", r#"{"username": "carol"}"#, None);
    assert_eq!(r.status, 503, "third session: {}", r.text());
    assert!(r.json()["detail"].is_string());
    let room = s.room(&a);
    let r = s.http().call("POST", "/rooms", Some(&b));
    assert_eq!(r.status, 503, "second room: {}", r.text());
    assert!(r.json()["detail"].is_string());

    // The existing ones keep working.
    let (mut wa, _) = s.join(&room, &a);
    let (mut wb, _) = s.join(&room, &b);
    wa.chat_roundtrip("alice is fine");
    wb.chat_roundtrip("bob is fine");

    // The caps count live sessions: ending one makes room for another.
    let r = s.http().call("DELETE", "/sessions/me", Some(&b));
    assert_eq!(r.status, 200);
    assert_eq!(wb.close_code(), Some(1000));
    s.session("carol");
    wa.chat_roundtrip("alice is still fine");
}

#[test]
fn expired_sessions_and_rooms_free_their_places_under_the_caps() {
    let s = Server::start(&[
        "--max-sessions",
        "1",
        "--max-rooms",
        "1",
        "--session-ttl",
        "500ms",
        "--room-ttl",
        "500ms",
    ]);
    let (a, _) = s.session("alice");
    s.room(&a);
    let new_session = || {
        s.http()
            .post_json("/sessions", r#"{"username": "bob"}"#, None)
    };
    assert_eq!(new_session().status, 503);
    assert_eq!(s.http().call("POST", "/rooms", Some(&a)).status, 503);

    // Alice's session and room expire unused; their places are free again.
    let mut bob = None;
    wait_for(Duration::from_secs(3), || {
        let r = new_session();
        if r.status == 201 {
            bob = Some(r.json()["session_id"].as_str().unwrap().to_string());
        }
        bob.is_some()
    })
    .expect("an expired session still counts against --max-sessions");
    let bob = bob.unwrap();
    assert_eq!(
        new_session().status,
        503,
        "bob's session fills the only place"
    );
    let mut room = None;
    wait_for(Duration::from_secs(3), || {
        let r = s.http().call("POST", "/rooms", Some(&bob));
        if r.status == 201 {
            room = Some(r.json()["room_id"].as_str().unwrap().to_string());
        }
        room.is_some()
    })
    .expect("an expired room still counts against --max-rooms");
    let (mut ws, _) = s.join(&room.unwrap(), &bob);
    ws.chat_roundtrip("bob got a session and a room");
}
