//! Sessions: `POST /sessions` (both slash forms, trimming, validation: 400 / 422 / 413),
//! `GET /sessions/me`, `DELETE /sessions/me`, independent sessions of the same name, and the
//! two kinds of 401 (missing/malformed `Authorization` vs. unknown or expired session).
mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

fn post_session(s: &Server, path: &str, body: &str) -> Resp {
    s.http().post_json(path, body, None)
}

#[test]
fn create_session_in_both_slash_forms_with_the_contract_shape() {
    let s = Server::start(&[]);
    for path in ["/sessions", "/sessions/"] {
        let r = post_session(&s, path, r#"{"username": "  alice \t"}"#);
        assert_eq!(r.status, 201, "{path}: {}", r.text());
        assert!(
            r.header("content-type")
                .unwrap_or("")
                .starts_with("application/json")
        );
        let v = r.json();
        let obj = v.as_object().expect("an object");
        assert_eq!(obj.len(), 3, "exactly session_id, username, user_id: {v}");
        assert_eq!(v["username"], "alice", "username is trimmed");
        let sid = v["session_id"].as_str().unwrap();
        assert!(uuid_version(sid).is_some(), "session_id is a UUID: {sid}");
        let uid = v["user_id"].as_str().unwrap();
        assert!(is_lower_hex(uid, 8), "user_id is 8 lowercase hex: {uid}");
    }
}

#[test]
fn usernames_at_the_length_limits_count_unicode_scalars() {
    let s = Server::start(&[]);
    let ok = [
        "ab".to_string(),
        "x".repeat(50),
        "é".repeat(50),
        "日本".to_string(),
        " 😀😀 ".to_string(),
    ];
    for name in ok {
        let r = post_session(&s, "/sessions", &json!({ "username": name }).to_string());
        assert_eq!(r.status, 201, "{name:?}: {}", r.text());
        assert_eq!(r.json()["username"], name.trim());
    }
}

#[test]
fn invalid_bodies_and_usernames_are_400() {
    let s = Server::start(&[]);
    let bodies = [
        r#"{"username": "alice""#.to_string(),
        "not json".to_string(),
        r#"{"username": "alice"} trailing"#.to_string(),
        json!({ "username": "a" }).to_string(),
        json!({ "username": "   a   " }).to_string(),
        json!({ "username": "" }).to_string(),
        json!({ "username": "     " }).to_string(),
        json!({ "username": "x".repeat(51) }).to_string(),
        json!({ "username": "é".repeat(51) }).to_string(),
        json!({ "username": "al\u{1}ice" }).to_string(),
        json!({ "username": "al\nice" }).to_string(),
        json!({ "username": "ali\u{7f}ce" }).to_string(),
    ];
    for body in bodies {
        let r = post_session(&s, "/sessions", &body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert!(r.json()["detail"].is_string(), "{body}: {}", r.text());
    }
}

#[test]
fn valid_json_without_a_string_username_is_422() {
    let s = Server::start(&[]);
    let bodies = [
        "{}",
        r#"{"name": "alice"}"#,
        r#"{"username": 5}"#,
        r#"{"username": null}"#,
        r#"{"username": ["alice"]}"#,
        r#"{"username": {"first": "alice"}}"#,
        "[]",
        r#"["alice"]"#,
        r#""alice""#,
        "42",
        "null",
    ];
    for body in bodies {
        let r = post_session(&s, "/sessions", body);
        assert_eq!(r.status, 422, "{body}: {}", r.text());
        assert!(r.json()["detail"].is_string(), "{body}: {}", r.text());
    }
}

#[test]
fn a_body_over_max_request_body_is_413() {
    let s = Server::start(&["--max-request-body", "64"]);
    let small = json!({ "username": "alice" }).to_string();
    assert_eq!(post_session(&s, "/sessions", &small).status, 201);
    let big = json!({ "username": "alice", "pad": "p".repeat(200) }).to_string();
    let r = post_session(&s, "/sessions", &big);
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.json()["detail"].is_string());
    // The server stays healthy for everyone else.
    assert_eq!(post_session(&s, "/sessions", &small).status, 201);
}

#[test]
fn me_reports_the_session_and_its_joined_rooms() {
    let s = Server::start(&[]);
    let (sid, uid) = s.session("carol");
    for path in ["/sessions/me", "/sessions/me/"] {
        let r = s.http().get(path, Some(&sid));
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let v = r.json();
        assert_eq!(v["session_id"], sid.as_str());
        assert_eq!(v["username"], "carol");
        assert_eq!(v["joined_rooms"], json!([]));
        if let Some(u) = v.get("user_id") {
            assert_eq!(u, uid.as_str());
        }
    }
    let mine = s.room(&sid);
    let (other_sid, _) = s.session("dave");
    let theirs = s.room(&other_sid);
    let r = s
        .http()
        .call("POST", &format!("/rooms/{theirs}/join"), Some(&sid));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = s.http().get("/sessions/me", Some(&sid)).json();
    let mut rooms: Vec<&str> = v["joined_rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    rooms.sort();
    let mut want = vec![mine.as_str(), theirs.as_str()];
    want.sort();
    assert_eq!(rooms, want);
}

#[test]
fn delete_me_ends_the_session_and_the_token_stops_working() {
    let s = Server::start(&[]);
    for path in ["/sessions/me", "/sessions/me/"] {
        let (sid, _) = s.session("erin");
        let mut h = s.http();
        let r = h.call("DELETE", path, Some(&sid));
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.json(), json!({ "message": "Session ended" }));
        for (method, p) in [
            ("GET", "/sessions/me"),
            ("DELETE", "/sessions/me"),
            ("POST", "/rooms"),
            ("GET", "/rooms"),
        ] {
            let r = h.call(method, p, Some(&sid));
            assert_eq!(r.status, 401, "{method} {p} after the end: {}", r.text());
            assert_eq!(r.json()["detail"], "Invalid or expired session");
        }
    }
}

#[test]
fn two_sessions_with_the_same_name_are_independent() {
    let s = Server::start(&[]);
    let (a, a_uid) = s.session("frank");
    let (b, b_uid) = s.session("frank");
    assert_ne!(a, b);
    assert_ne!(a_uid, b_uid);
    for sid in [&a, &b] {
        let r = s.http().get("/sessions/me", Some(sid));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["username"], "frank");
    }
    // Ending one leaves the other alone.
    assert_eq!(
        s.http().call("DELETE", "/sessions/me", Some(&a)).status,
        200
    );
    assert_eq!(s.http().get("/sessions/me", Some(&a)).status, 401);
    assert_eq!(s.http().get("/sessions/me", Some(&b)).status, 200);
}

#[test]
fn missing_or_malformed_authorization_is_401_with_www_authenticate() {
    let s = Server::start(&[]);
    let (sid, _) = s.session("gina");
    let room = s.room(&sid);
    let basic = format!("Basic {sid}");
    let token = format!("Token {sid}");
    let bad: [Option<&str>; 6] = [
        None,
        Some(""),
        Some("Bearer"),
        Some("Bearer not-a-session-id"),
        Some(&basic),
        Some(&token),
    ];
    let calls = [
        ("GET", "/sessions/me".to_string()),
        ("DELETE", "/sessions/me".to_string()),
        ("POST", "/rooms".to_string()),
        ("GET", "/rooms".to_string()),
        ("POST", format!("/rooms/{room}/join")),
        ("DELETE", format!("/rooms/{room}/leave")),
        ("GET", format!("/rooms/{room}/messages")),
    ];
    let mut h = s.http();
    for auth in bad {
        for (method, path) in &calls {
            let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", *a)).collect();
            let r = h.request(method, path, &headers, None);
            assert_eq!(r.status, 401, "{method} {path} with {auth:?}: {}", r.text());
            let www = r
                .header("www-authenticate")
                .unwrap_or_else(|| panic!("{method} {path} {auth:?}: no WWW-Authenticate"));
            assert!(www.starts_with("Bearer"), "{www}");
            assert!(r.json()["detail"].is_string());
        }
    }
    // The real token still works afterwards.
    assert_eq!(h.get("/sessions/me", Some(&sid)).status, 200);
}

#[test]
fn an_unknown_token_is_401_invalid_or_expired() {
    let s = Server::start(&[]);
    let _ = s.session("hank");
    let unknown = "0b7e3c52-9d1f-4a7e-8c3b-2f6a1d9e4b70";
    let r = s.http().get("/sessions/me", Some(unknown));
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json(), json!({ "detail": "Invalid or expired session" }));
}

#[test]
fn an_expired_session_is_401_invalid_or_expired() {
    let s = Server::start(&["--session-ttl", "300ms"]);
    let (sid, _) = s.session("ivan");
    assert_eq!(s.http().get("/sessions/me", Some(&sid)).status, 200);
    std::thread::sleep(Duration::from_millis(700));
    let r = s.http().get("/sessions/me", Some(&sid));
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json()["detail"], "Invalid or expired session");
}
