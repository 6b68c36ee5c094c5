//! Room lifetime (`--room-ttl`): a room is deleted once it has had no open WebSocket for the
//! TTL, whether or not anyone ever connected; an open socket keeps it alive; deleting it drops
//! its history; reconnecting before the TTL keeps it.
mod common;

use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{Server, wait_for};

const TTL: Duration = Duration::from_secs(1);

fn server() -> Server {
    Server::start(&["--room-ttl", "1s", "--room-list"])
}

/// Waits for `GET /rooms/{room}` to answer 404 and returns how long that took from `since`.
#[track_caller]
fn wait_gone(s: &Server, room: &str, since: Instant) -> Duration {
    wait_for(Duration::from_secs(4), || {
        s.status(&format!("/rooms/{room}")) == 404
    })
    .unwrap_or_else(|| {
        panic!(
            "room {room} still exists {:?} after it emptied",
            since.elapsed()
        )
    });
    since.elapsed()
}

#[test]
fn room_nobody_connected_to_expires_after_the_ttl() {
    let s = server();
    let (sid, _) = s.session("alice");
    let created = Instant::now();
    let room = s.room(&sid);
    // A second room that is in use must not be affected.
    let busy = s.room(&sid);
    let (mut ws, _) = s.join(&busy, &sid);

    let r = s.http().get(&format!("/rooms/{room}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["user_count"], 0);
    sleep(TTL / 2);
    assert_eq!(
        s.status(&format!("/rooms/{room}")),
        200,
        "room expired before its TTL"
    );
    // REST calls about the room are not open connections: they do not keep it.
    let (other, _) = s.session("bob");
    let join = s
        .http()
        .post_json(&format!("/rooms/{room}/join"), "", Some(&other));
    assert_eq!(join.status, 200);
    let history = s
        .http()
        .get(&format!("/rooms/{room}/messages"), Some(&other));
    assert_eq!(history.status, 200);

    let took = wait_gone(&s, &room, created);
    assert!(
        took >= TTL - Duration::from_millis(50),
        "expired after {took:?}, before the TTL"
    );
    assert!(
        took < TTL + Duration::from_millis(1500),
        "expired only after {took:?}"
    );
    let all = s.http().get("/rooms/all", None).json();
    assert!(
        !all["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == room.as_str()),
        "{all}"
    );
    let mine = s.http().get("/rooms", Some(&sid)).json();
    assert_eq!(mine["rooms"], serde_json::json!([busy]), "{mine}");
    assert_eq!(
        s.http()
            .post_json(&format!("/rooms/{room}/join"), "", Some(&sid))
            .status,
        404
    );
    assert_eq!(
        s.ws(&format!("/ws/{room}?session_id={sid}")).err(),
        Some(404)
    );

    // The room in use is still there and works.
    assert_eq!(s.status(&format!("/rooms/{busy}")), 200);
    ws.chat_roundtrip("still here");
    assert!(s.metric("chatloop_rooms_expired_total") >= 1.0);
}

#[test]
fn a_connected_member_keeps_the_room_alive_past_the_ttl() {
    let s = server();
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    let (mut ws, _) = s.join(&room, &sid);
    sleep(TTL * 2);
    let r = s.http().get(&format!("/rooms/{room}"), None);
    assert_eq!(
        r.status,
        200,
        "room with an open socket expired: {}",
        r.text()
    );
    assert_eq!(r.json()["user_count"], 1);
    ws.chat_roundtrip("alive");
}

#[test]
fn room_expires_a_ttl_after_the_last_socket_closes_and_its_history_goes() {
    let s = server();
    let (a, _) = s.session("alice");
    let (b, _) = s.session("bob");
    let room = s.room(&a);
    let (mut wa, _) = s.join(&room, &a);
    let (mut wb, _) = s.join(&room, &b);
    wa.chat_roundtrip("remember me");
    sleep(TTL + Duration::from_millis(200)); // older than the TTL, but in use
    drop(wa);
    wb.recv_type("user_left");
    // One socket still open: the room stays.
    sleep(TTL + Duration::from_millis(200));
    assert_eq!(s.status(&format!("/rooms/{room}")), 200);
    wb.chat_roundtrip("bob is still here");

    wb.socket.close(None).unwrap();
    let _ = wb.close_code();
    let emptied = Instant::now();
    let msgs = s.http().get(&format!("/rooms/{room}/messages"), Some(&b));
    assert_eq!(msgs.status, 200);
    let texts: Vec<String> = msgs.json()["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message"].as_str().unwrap().to_string())
        .collect();
    assert!(texts.contains(&"remember me".to_string()), "{texts:?}");

    sleep(TTL / 2);
    assert_eq!(
        s.status(&format!("/rooms/{room}")),
        200,
        "expired before the TTL"
    );
    let took = wait_gone(&s, &room, emptied);
    assert!(
        took < TTL + Duration::from_millis(1500),
        "expired only after {took:?}"
    );
    let msgs = s.http().get(&format!("/rooms/{room}/messages"), Some(&b));
    assert_eq!(
        msgs.status,
        404,
        "history of a deleted room: {}",
        msgs.text()
    );
}

#[test]
fn reconnecting_before_the_ttl_keeps_the_room_and_its_history() {
    let s = server();
    let (a, _) = s.session("alice");
    let room = s.room(&a);
    let (mut ws, _) = s.join(&room, &a);
    ws.chat_roundtrip("before");
    drop(ws);
    sleep(TTL * 6 / 10);
    let (mut ws, welcome) = s.join(&room, &a);
    let texts: Vec<&str> = welcome["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["message"].as_str())
        .collect();
    assert!(texts.contains(&"before"), "{welcome}");
    // Past the first TTL counted from the first close: still there.
    sleep(TTL * 6 / 10);
    assert_eq!(
        s.status(&format!("/rooms/{room}")),
        200,
        "room expired although a socket reconnected"
    );
    ws.chat_roundtrip("after");

    // The expiry starts again from the second close.
    drop(ws);
    let emptied = Instant::now();
    sleep(TTL * 6 / 10);
    assert_eq!(
        s.status(&format!("/rooms/{room}")),
        200,
        "old expiry fired after reconnecting"
    );
    let took = wait_gone(&s, &room, emptied);
    assert!(took >= TTL - Duration::from_millis(50), "{took:?}");
}
