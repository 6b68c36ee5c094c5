//! WebSocket chat: the `welcome` frame, `user_joined` to every member (newcomer included),
//! chat echoed to the sender and delivered to all with one id, `typing` to the others only,
//! `user_left` on close or drop, `user_count` following, rooms isolated from each other,
//! ping answered with pong, and the message format (UUID v7 ids in increasing order,
//! microsecond UTC timestamps, `user_id` beside every `user`).
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tungstenite::Message;
use tungstenite::protocol::CloseFrame;
use tungstenite::protocol::frame::coding::CloseCode;

/// Checks the fields every stored message has.
#[track_caller]
fn assert_message_shape(m: &Value, kind: &str, room: &str, user: &str, user_id: &str) {
    assert_eq!(m["type"], kind, "{m}");
    assert_eq!(m["room_id"], room, "{m}");
    assert_eq!(m["user"], user, "{m}");
    assert_eq!(m["user_id"], user_id, "{m}");
    let id = m["id"].as_str().unwrap_or_else(|| panic!("no id: {m}"));
    assert_eq!(uuid_version(id), Some(7), "id is a UUID v7: {id}");
    let ts = m["timestamp"]
        .as_str()
        .unwrap_or_else(|| panic!("no timestamp: {m}"));
    assert!(is_timestamp(ts), "timestamp shape: {ts}");
}

#[test]
fn welcome_then_user_joined_for_the_first_member() {
    let s = Server::start(&[]);
    let (sid, uid) = s.session("alice");
    let room = s.room(&sid);
    let (mut ws, welcome) = s.join(&room, &sid);
    assert_eq!(welcome["room_id"], room.as_str());
    assert_eq!(welcome["user"], "alice");
    assert_eq!(welcome["user_id"], uid.as_str());
    assert_eq!(
        welcome["users"],
        json!([{ "user": "alice", "user_id": uid }])
    );
    assert_eq!(welcome["messages"], json!([]));
    assert!(
        welcome.get("truncated").is_none_or(|t| t == false),
        "{welcome}"
    );
    let joined = ws.recv();
    assert_message_shape(&joined, "user_joined", &room, "alice", &uid);
    assert_eq!(joined["message"], "alice has joined");
}

#[test]
fn a_newcomer_sees_everyone_and_everyone_sees_the_newcomer() {
    let s = Server::start(&[]);
    let (a, a_uid) = s.session("alice");
    let (b, b_uid) = s.session("bob");
    // Same name as alice: told apart by user_id.
    let (c, c_uid) = s.session("alice");
    let room = s.room(&a);
    let (mut wa, _) = s.join(&room, &a);
    wa.recv_type("user_joined");
    let (mut wb, welcome_b) = s.join(&room, &b);
    let mut users: Vec<Value> = welcome_b["users"].as_array().unwrap().clone();
    users.sort_by_key(|u| u["user_id"].as_str().unwrap().to_string());
    let mut want = vec![
        json!({ "user": "alice", "user_id": a_uid }),
        json!({ "user": "bob", "user_id": b_uid }),
    ];
    want.sort_by_key(|u| u["user_id"].as_str().unwrap().to_string());
    assert_eq!(users, want);
    // bob's welcome history holds alice's join.
    let hist = welcome_b["messages"].as_array().unwrap();
    assert_eq!(hist.len(), 1, "{welcome_b}");
    assert_message_shape(&hist[0], "user_joined", &room, "alice", &a_uid);

    let jb = wb.recv();
    assert_message_shape(&jb, "user_joined", &room, "bob", &b_uid);
    assert_eq!(wa.recv(), jb, "alice gets the same user_joined");

    let (mut wc, welcome_c) = s.join(&room, &c);
    assert_eq!(
        welcome_c["users"].as_array().unwrap().len(),
        3,
        "{welcome_c}"
    );
    assert!(
        welcome_c["users"]
            .as_array()
            .unwrap()
            .contains(&json!({ "user": "alice", "user_id": c_uid }))
    );
    let jc = wc.recv();
    assert_message_shape(&jc, "user_joined", &room, "alice", &c_uid);
    assert_eq!(wa.recv(), jc);
    assert_eq!(wb.recv(), jc);
}

#[test]
fn three_clients_chat_typing_leave_and_user_count() {
    let s = Server::start(&[]);
    let (a, a_uid) = s.session("alice");
    let (b, _) = s.session("bob");
    let (c, c_uid) = s.session("carol");
    let room = s.room(&a);
    let (mut wa, _) = s.join(&room, &a);
    wa.recv_type("user_joined");
    let (mut wb, _) = s.join(&room, &b);
    wb.recv_type("user_joined");
    wa.recv_type("user_joined");
    let (mut wc, _) = s.join(&room, &c);
    for w in [&mut wa, &mut wb, &mut wc] {
        assert_eq!(w.recv_type("user_joined")["user"], "carol");
    }
    s.wait_user_count(&room, 3);

    // Chat: trimmed, echoed to the sender, same message (same id) for all.
    wa.chat("  Hello, room!\n");
    let mine = wa.recv();
    assert_message_shape(&mine, "chat", &room, "alice", &a_uid);
    assert_eq!(mine["message"], "Hello, room!");
    assert_eq!(wb.recv(), mine);
    assert_eq!(wc.recv(), mine);

    // Empty and blank chats are ignored: the next chat anyone sees is the real one.
    wb.chat("");
    wb.chat("   \t ");
    wb.chat("real");
    for w in [&mut wa, &mut wb, &mut wc] {
        let m = w.recv();
        assert_eq!(
            (m["type"].as_str(), m["message"].as_str()),
            (Some("chat"), Some("real")),
            "{m}"
        );
    }

    // Typing: the others get it, the typist does not.
    wc.send_json(json!({ "type": "typing" }));
    for w in [&mut wa, &mut wb] {
        let t = w.recv();
        assert_eq!(t["type"], "typing", "{t}");
        assert_eq!(t["user"], "carol");
        assert_eq!(t["user_id"], c_uid.as_str());
    }
    wc.chat("done typing");
    // Up to the echo of its own chat, carol sees no `typing` about herself.
    loop {
        let m = wc.recv();
        assert_ne!(
            m["type"], "typing",
            "the typist got its own typing notice: {m}"
        );
        if m["type"] == "chat" {
            assert_eq!(m["message"], "done typing");
            break;
        }
    }
    for w in [&mut wa, &mut wb] {
        assert_eq!(w.recv_type("chat")["message"], "done typing");
    }

    // carol closes cleanly: the others get user_left, the count drops.
    wc.socket
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }))
        .unwrap();
    assert_eq!(
        wc.close_code(),
        Some(1000),
        "the server echoes the close code"
    );
    for w in [&mut wa, &mut wb] {
        let left = w.recv_type("user_left");
        assert_message_shape(&left, "user_left", &room, "carol", &c_uid);
        assert_eq!(left["message"], "carol has left");
    }
    s.wait_user_count(&room, 2);

    // bob drops the TCP connection without a close frame: same result.
    drop(wb);
    assert_eq!(wa.recv_type("user_left")["user"], "bob");
    s.wait_user_count(&room, 1);

    // alice is still connected and served.
    wa.chat("anyone?");
    assert_eq!(wa.recv_type("chat")["message"], "anyone?");
}

#[test]
fn two_rooms_never_see_each_others_messages() {
    let s = Server::start(&[]);
    let (a, _) = s.session("alice");
    let (b, _) = s.session("bob");
    let r1 = s.room(&a);
    let r2 = s.room(&b);
    let (mut wa, _) = s.join(&r1, &a);
    let (mut wb, _) = s.join(&r2, &b);
    assert_eq!(wa.recv()["type"], "user_joined");
    assert_eq!(wb.recv()["type"], "user_joined");
    wa.chat("a1");
    wb.chat("b1");
    wa.send_json(json!({ "type": "typing" }));
    wa.chat("a2");
    // Each client sees exactly its own room's traffic, in order.
    let mut seen_a = Vec::new();
    while seen_a.last().map(String::as_str) != Some("a2") {
        let m = wa.recv();
        assert_eq!(m["room_id"], r1.as_str(), "{m}");
        if m["type"] == "chat" {
            seen_a.push(m["message"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(seen_a, ["a1", "a2"]);
    wb.chat("b2");
    let mut seen_b = Vec::new();
    while seen_b.last().map(String::as_str) != Some("b2") {
        let m = wb.recv();
        assert_ne!(m["type"], "typing", "typing leaked across rooms: {m}");
        assert_ne!(
            m["type"], "typing_stopped",
            "typing leaked across rooms: {m}"
        );
        assert_eq!(m["room_id"], r2.as_str(), "{m}");
        seen_b.push(m["message"].as_str().unwrap().to_string());
    }
    assert_eq!(seen_b, ["b1", "b2"]);
    // Each room's history holds only its own messages.
    let h1 = s
        .http()
        .get(&format!("/rooms/{r1}/messages"), Some(&a))
        .json();
    assert!(
        h1["messages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["room_id"] == r1.as_str()),
        "{h1}"
    );
}

#[test]
fn ids_are_increasing_uuid_v7_and_timestamps_are_utc_microseconds() {
    let s = Server::start(&["--chat-rate", "10000", "--chat-burst", "10000"]);
    let (a, _) = s.session("alice");
    let room = s.room(&a);
    let (mut ws, _) = s.join(&room, &a);
    let mut msgs = vec![ws.recv()];
    for i in 0..200 {
        ws.chat(&format!("n{i}"));
    }
    while msgs.len() < 201 {
        msgs.push(ws.recv());
    }
    let ids: Vec<&str> = msgs.iter().map(|m| m["id"].as_str().unwrap()).collect();
    for id in &ids {
        assert_eq!(uuid_version(id), Some(7), "{id}");
        // RFC 9562 variant bits: 10xx.
        let variant = u8::from_str_radix(&id[19..20], 16).unwrap();
        assert_eq!(variant & 0b1100, 0b1000, "{id}");
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    let stamps: Vec<&str> = msgs
        .iter()
        .map(|m| m["timestamp"].as_str().unwrap())
        .collect();
    assert!(stamps.iter().all(|t| is_timestamp(t)), "{stamps:?}");
    assert!(
        stamps.windows(2).all(|w| w[0] <= w[1]),
        "timestamps do not go back: {stamps:?}"
    );
    // The timestamp is now, in UTC (within a minute of the test's clock).
    let now = std::time::SystemTime::now();
    let first = &stamps[0][..19];
    let got = httpdate::parse_http_date(&to_http_date(first)).unwrap();
    let skew = now.duration_since(got).unwrap_or_else(|e| e.duration());
    assert!(
        skew < Duration::from_secs(60),
        "timestamp {first} is {skew:?} from now"
    );
    // The UUID v7 time prefix agrees with the timestamp (same millisecond, give or take).
    let ms = u64::from_str_radix(&ids[1].replace('-', "")[..12], 16).unwrap();
    let ts_ms = got
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + stamps[1][20..23].parse::<u64>().unwrap();
    assert!(
        ms.abs_diff(ts_ms) < 2000,
        "uuid time {ms} vs timestamp {}",
        stamps[1]
    );
}

/// `2025-08-19T13:45:00` → the IMF-fixdate `httpdate` parses (with the right weekday).
fn to_http_date(iso: &str) -> String {
    let (y, mo, d): (i64, i64, i64) = (
        iso[0..4].parse().unwrap(),
        iso[5..7].parse().unwrap(),
        iso[8..10].parse().unwrap(),
    );
    // Days since 1970-01-01 (civil from days, Howard Hinnant).
    let (yy, mm) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(mo - 1) as usize];
    format!("{wd}, {d:02} {mon} {y} {} GMT", &iso[11..19])
}

#[test]
fn connecting_adds_the_room_to_the_sessions_rooms() {
    let s = Server::start(&[]);
    let (a, _) = s.session("alice");
    let (b, _) = s.session("bob");
    let room = s.room(&a);
    assert_eq!(s.http().get("/rooms", Some(&b)).json()["rooms"], json!([]));
    let (_wb, _) = s.join(&room, &b);
    assert_eq!(
        s.http().get("/rooms", Some(&b)).json()["rooms"],
        json!([room])
    );
    assert_eq!(
        s.http().get("/sessions/me", Some(&b)).json()["joined_rooms"],
        json!([room])
    );
}

#[test]
fn a_websocket_ping_is_answered_with_a_pong() {
    let s = Server::start(&[]);
    let (a, _) = s.session("alice");
    let room = s.room(&a);
    let (mut ws, _) = s.join(&room, &a);
    ws.recv_type("user_joined");
    ws.socket
        .send(Message::Ping(b"are you there"[..].into()))
        .unwrap();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        assert!(Instant::now() < deadline, "no pong");
        match ws.socket.read().expect("a frame") {
            Message::Pong(p) => {
                assert_eq!(&p[..], b"are you there");
                break;
            }
            Message::Text(t) => panic!("unexpected {t}"),
            _ => {}
        }
    }
    ws.chat("still here");
    assert_eq!(ws.recv_type("chat")["message"], "still here");
}
