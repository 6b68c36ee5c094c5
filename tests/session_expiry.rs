//! Session lifetime (`--session-ttl`): a session expires a TTL after its last use (sliding),
//! an open socket keeps it alive, and `DELETE /sessions/me` closes its sockets with 1000.
mod common;

use std::thread::sleep;
use std::time::Duration;

use common::{Server, wait_for};

const TTL: Duration = Duration::from_secs(1);

fn server() -> Server {
    Server::start(&["--session-ttl", "1s"])
}

fn me_status(s: &Server, sid: &str) -> u16 {
    s.http().get("/sessions/me", Some(sid)).status
}

#[test]
fn an_unused_session_answers_401_after_the_ttl() {
    let s = server();
    let (sid, _) = s.session("alice");
    // A session that is kept in use all along, as the well-behaved client.
    let (other, _) = s.session("bob");
    let room = s.room(&other);
    let (mut ws, _) = s.join(&room, &other);

    sleep(TTL + Duration::from_millis(300));
    let r = s.http().get("/sessions/me", Some(&sid));
    assert_eq!(
        r.status,
        401,
        "expired session still accepted: {}",
        r.text()
    );
    assert_eq!(r.json()["detail"], "Invalid or expired session");
    assert_eq!(
        s.http()
            .request(
                "POST",
                "/rooms",
                &[("Authorization", &format!("Bearer {sid}"))],
                None
            )
            .status,
        401
    );
    assert_eq!(
        s.ws(&format!("/ws/{room}?session_id={sid}")).err(),
        Some(403)
    );

    assert_eq!(me_status(&s, &other), 200);
    ws.chat_roundtrip("bob is fine");
    assert!(
        wait_for(Duration::from_secs(2), || s
            .metric("chatloop_sessions_expired_total")
            >= 1.0)
        .is_some(),
        "chatloop_sessions_expired_total stayed 0"
    );
}

#[test]
fn using_a_session_extends_it() {
    let s = server();
    let (sid, _) = s.session("alice");
    // Use it every 400 ms for 2.4 s: more than twice the TTL in total.
    for i in 0..6 {
        sleep(Duration::from_millis(400));
        assert_eq!(
            me_status(&s, &sid),
            200,
            "session expired although used (call {i})"
        );
    }
    // Then leave it alone: it expires a TTL after the last use.
    sleep(TTL + Duration::from_millis(300));
    assert_eq!(me_status(&s, &sid), 401);
}

#[test]
fn an_open_socket_keeps_its_session_alive() {
    let s = server();
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    let (mut ws, _) = s.join(&room, &sid);
    sleep(TTL * 2);
    ws.chat_roundtrip("still logged in");
    assert_eq!(
        me_status(&s, &sid),
        200,
        "session with an open socket expired"
    );
    // A second socket of the same session can still connect.
    let (mut ws2, _) = s.join(&room, &sid);
    ws2.chat_roundtrip("second socket");

    // Once its sockets are closed, the TTL runs from then.
    drop(ws);
    drop(ws2);
    sleep(TTL / 2);
    assert_eq!(
        me_status(&s, &sid),
        200,
        "expired too early after the sockets closed"
    );
    sleep(TTL + Duration::from_millis(300));
    assert_eq!(me_status(&s, &sid), 401);
}

#[test]
fn ending_a_session_closes_its_sockets_with_1000() {
    let s = server();
    let (a, a_uid) = s.session("alice");
    let (b, _) = s.session("bob");
    let room = s.room(&a);
    let room2 = s.room(&a);
    let (mut wb, _) = s.join(&room, &b);
    let (mut wa, _) = s.join(&room, &a);
    let (mut wa2, _) = s.join(&room2, &a);
    wb.recv_type("user_joined"); // alice
    let _ = wb.drain(Duration::from_millis(100));

    let r = s.http().request(
        "DELETE",
        "/sessions/me",
        &[("Authorization", &format!("Bearer {a}"))],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["message"], "Session ended");

    assert_eq!(wa.close_code(), Some(1000), "alice's first socket");
    assert_eq!(wa2.close_code(), Some(1000), "alice's second socket");
    let left = wb.recv_type("user_left");
    assert_eq!(left["user"], "alice", "{left}");
    assert_eq!(left["user_id"], a_uid.as_str(), "{left}");

    assert_eq!(me_status(&s, &a), 401);
    assert_eq!(s.ws(&format!("/ws/{room}?session_id={a}")).err(), Some(403));
    let r = s.http().get(&format!("/rooms/{room}"), None);
    assert_eq!(r.json()["user_count"], 1, "{}", r.text());
    wb.chat_roundtrip("bob carries on");
    assert_eq!(me_status(&s, &b), 200);
}
