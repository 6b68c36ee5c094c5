//! WebSocket upgrade refusals: answered with an HTTP error before any 101, with a JSON
//! `detail`: no, unknown, ended or expired session → 403; unknown or malformed room → 404;
//! not an upgrade → 426; version other than 13 → 426; bad or missing key → 400.
//! After each refusal the server keeps serving everyone else.
mod common;

use std::time::Duration;

use common::*;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A hand-written upgrade request with the given handshake headers.
fn upgrade(s: &Server, path: &str, headers: &[(&str, &str)]) -> Resp {
    let r = s.http().request("GET", path, headers, None);
    assert_ne!(r.status, 101, "{path}: the upgrade must be refused");
    r
}

fn handshake<'a>(version: &'a str, key: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", version),
        ("Sec-WebSocket-Key", key),
    ]
}

#[test]
fn missing_unknown_or_malformed_session_is_403() {
    let s = Server::start(&[]);
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    for query in [
        String::new(),
        "?".into(),
        "?session_id=".into(),
        "?session_id=garbage".into(),
        "?session_id=0b7e3c52-9d1f-4a7e-8c3b-2f6a1d9e4b70".into(),
        format!("?session_id={sid}x"),
        format!("?session_id={}", &sid[1..]),
        format!("?session={sid}"),
    ] {
        let path = format!("/ws/{room}{query}");
        assert_eq!(s.ws(&path).err(), Some(403), "{path}");
        let r = upgrade(&s, &path, &handshake("13", KEY));
        assert_eq!(r.status, 403, "{path}: {}", r.text());
        assert!(r.json()["detail"].is_string(), "{path}: {}", r.text());
    }
    // The real session still gets in.
    let (_ws, welcome) = s.join(&room, &sid);
    assert_eq!(welcome["room_id"], room.as_str());
}

#[test]
fn an_ended_session_is_403() {
    let s = Server::start(&[]);
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    assert_eq!(
        s.http().call("DELETE", "/sessions/me", Some(&sid)).status,
        200
    );
    assert_eq!(
        s.ws(&format!("/ws/{room}?session_id={sid}")).err(),
        Some(403)
    );
}

#[test]
fn an_expired_session_is_403() {
    let s = Server::start(&["--session-ttl", "300ms"]);
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    std::thread::sleep(Duration::from_millis(700));
    let r = upgrade(
        &s,
        &format!("/ws/{room}?session_id={sid}"),
        &handshake("13", KEY),
    );
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.json()["detail"].is_string());
}

#[test]
fn unknown_or_malformed_room_is_404() {
    let s = Server::start(&[]);
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    let unknown = if room == "0123456789" {
        "9876543210"
    } else {
        "0123456789"
    };
    for id in [
        unknown.to_string(),
        format!("F{}", &room[1..]).to_uppercase(), // always has an upper-case letter
        room[..9].to_string(),
        format!("{room}a"),
        "..".into(),
        "%2e%2e".into(),
    ] {
        let path = format!("/ws/{id}?session_id={sid}");
        assert_eq!(s.ws(&path).err(), Some(404), "{path}");
        let r = upgrade(&s, &path, &handshake("13", KEY));
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        assert!(r.json()["detail"].is_string());
    }
}

#[test]
fn not_an_upgrade_is_426_and_version_8_is_426() {
    let s = Server::start(&[]);
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    let path = format!("/ws/{room}?session_id={sid}");
    // A plain GET, as a browser tab or curl would send.
    let r = upgrade(&s, &path, &[]);
    assert_eq!(r.status, 426, "{}", r.text());
    assert!(r.json()["detail"].is_string());
    // Upgrade to something else.
    let r = upgrade(
        &s,
        &path,
        &[
            ("Upgrade", "h2c"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", KEY),
        ],
    );
    assert_eq!(r.status, 426, "{}", r.text());
    // Missing Upgrade header but everything else present.
    let r = upgrade(
        &s,
        &path,
        &[
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", KEY),
        ],
    );
    assert_eq!(r.status, 426, "{}", r.text());
    // An old protocol version.
    for v in ["8", "12", "14", ""] {
        let r = upgrade(&s, &path, &handshake(v, KEY));
        assert_eq!(r.status, 426, "version {v:?}: {}", r.text());
        assert!(r.json()["detail"].is_string());
        if let Some(sv) = r.header("sec-websocket-version") {
            assert_eq!(sv.trim(), "13");
        }
    }
}

#[test]
fn a_bad_or_missing_key_is_400() {
    let s = Server::start(&[]);
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    let path = format!("/ws/{room}?session_id={sid}");
    // 16 bytes is the rule: shorter, longer, not base64, empty.
    for key in [
        "abc",
        "",
        "dGhlIHNhbXBsZSBub25jZQ",
        "dGhlIHNhbXBsZSBub25jZSE=",
        "!!!!!!!!!!!!!!!!!!!!!!==",
        "dGhlIHNhbXBsZSBub25jZQ==dGhl",
    ] {
        let r = upgrade(&s, &path, &handshake("13", key));
        assert_eq!(r.status, 400, "key {key:?}: {}", r.text());
        assert!(r.json()["detail"].is_string());
    }
    let r = upgrade(
        &s,
        &path,
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", "13"),
        ],
    );
    assert_eq!(r.status, 400, "no key: {}", r.text());
    // The server is fine and the session still connects.
    let (_ws, welcome) = s.join(&room, &sid);
    assert_eq!(welcome["type"], "welcome");
}

#[test]
fn a_refused_upgrade_keeps_the_connection_http() {
    // After a refusal on a keep-alive connection, the next request is plain HTTP again.
    let s = Server::start(&[]);
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    let mut h = s.http();
    let r = h.request(
        "GET",
        &format!("/ws/{room}?session_id=nope"),
        &handshake("13", KEY),
        None,
    );
    assert_eq!(r.status, 403);
    if !r
        .header("connection")
        .is_some_and(|c| c.eq_ignore_ascii_case("close"))
    {
        let r = h.get("/health", None);
        assert_eq!(r.status, 200, "{}", r.text());
    }
}
