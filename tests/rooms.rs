//! Rooms: every room call in both slash forms (`POST /rooms`, `GET /rooms`, `GET /rooms/all`
//! with `--room-list`, `GET /rooms/{id}`, join, leave, messages), 404 for unknown and
//! malformed room ids, the `limit` rules of the history endpoint, `user_count` following open
//! sockets, and the old `--no-room-list` (the default now: see tests/room_list.rs).
mod common;

use common::*;
use serde_json::{Value, json};

fn rooms_of(v: &Value) -> Vec<String> {
    let mut r: Vec<String> = v["rooms"]
        .as_array()
        .unwrap_or_else(|| panic!("no rooms list: {v}"))
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    r.sort();
    r
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn create_room_in_both_slash_forms() {
    let s = Server::start(&[]);
    let (sid, _) = s.session("alice");
    let mut ids = Vec::new();
    for path in ["/rooms", "/rooms/"] {
        let r = s.http().call("POST", path, Some(&sid));
        assert_eq!(r.status, 201, "{path}: {}", r.text());
        let v = r.json();
        assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
        let id = v["room_id"].as_str().unwrap().to_string();
        assert!(is_lower_hex(&id, 10), "room_id is 10 lowercase hex: {id}");
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);
    // A body sent anyway is not a problem.
    let r = s.http().post_json("/rooms", "{}", Some(&sid));
    assert_eq!(r.status, 201, "{}", r.text());
}

#[test]
fn get_rooms_lists_this_sessions_rooms_only() {
    let s = Server::start(&[]);
    let (a, _) = s.session("alice");
    let (b, _) = s.session("bob");
    let a1 = s.room(&a);
    let a2 = s.room(&a);
    let b1 = s.room(&b);
    for path in ["/rooms", "/rooms/"] {
        let r = s.http().get(path, Some(&a));
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(rooms_of(&r.json()), sorted(vec![a1.clone(), a2.clone()]));
    }
    assert_eq!(
        rooms_of(&s.http().get("/rooms", Some(&b)).json()),
        vec![b1.clone()]
    );
    // Joining adds a room to the list; leaving removes it.
    assert_eq!(
        s.http()
            .call("POST", &format!("/rooms/{a1}/join"), Some(&b))
            .status,
        200
    );
    assert_eq!(
        rooms_of(&s.http().get("/rooms", Some(&b)).json()),
        sorted(vec![a1.clone(), b1.clone()])
    );
    assert_eq!(
        s.http()
            .call("DELETE", &format!("/rooms/{a1}/leave"), Some(&b))
            .status,
        200
    );
    assert_eq!(rooms_of(&s.http().get("/rooms", Some(&b)).json()), vec![b1]);
}

#[test]
fn all_rooms_needs_no_auth_and_ignores_any_authorization() {
    let s = Server::start(&["--room-list"]);
    let (a, _) = s.session("alice");
    let (b, _) = s.session("bob");
    let want = sorted(vec![s.room(&a), s.room(&b)]);
    // A stale token: the session has ended.
    assert_eq!(
        s.http().call("DELETE", "/sessions/me", Some(&a)).status,
        200
    );
    let unknown = "Bearer 0b7e3c52-9d1f-4a7e-8c3b-2f6a1d9e4b70".to_string();
    let stale = bearer(&a);
    let auths: [Option<&str>; 4] = [None, Some(&stale), Some(&unknown), Some("Bearer garbage")];
    let mut h = s.http();
    for path in ["/rooms/all", "/rooms/all/"] {
        for auth in auths {
            let mut headers = vec![("Content-Type", "application/json")];
            headers.extend(auth.map(|a| ("Authorization", a)));
            let r = h.request("GET", path, &headers, None);
            assert_eq!(r.status, 200, "{path} with {auth:?}: {}", r.text());
            assert_eq!(rooms_of(&r.json()), want);
        }
    }
}

#[test]
fn room_info_in_both_slash_forms_follows_open_sockets() {
    let s = Server::start(&[]);
    let (a, _) = s.session("alice");
    let (b, _) = s.session("bob");
    let room = s.room(&a);
    for path in [format!("/rooms/{room}"), format!("/rooms/{room}/")] {
        let r = s.http().get(&path, None);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(
            r.json(),
            json!({ "room_id": room, "exists": true, "user_count": 0 })
        );
    }
    // No auth needed, and a stale token does not matter.
    assert_eq!(
        s.http().call("DELETE", "/sessions/me", Some(&b)).status,
        200
    );
    assert_eq!(
        s.http().get(&format!("/rooms/{room}"), Some(&b)).status,
        200
    );

    let (c, _) = s.session("carol");
    let (mut w1, _) = s.join(&room, &a);
    s.wait_user_count(&room, 1);
    let (w2, _) = s.join(&room, &c);
    // The same session twice counts as two sockets.
    let (w3, _) = s.join(&room, &a);
    s.wait_user_count(&room, 3);
    drop(w2);
    s.wait_user_count(&room, 2);
    w1.socket.close(None).unwrap();
    let _ = w1.close_code();
    s.wait_user_count(&room, 1);
    drop(w3);
    s.wait_user_count(&room, 0);
}

#[test]
fn unknown_and_malformed_room_ids_are_404() {
    // Dozens of room-path 404s from one address: the default per-address budget would answer
    // 429 before the end (that budget has tests of its own in create_rate.rs).
    let s = Server::start(&["--create-rate", "0"]);
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    // An all-digit id has no upper case: force a letter so this stays a malformed id.
    let upper = if room.chars().any(|c| c.is_ascii_alphabetic()) {
        room.to_uppercase()
    } else {
        format!("F{}", &room[1..])
    };
    let mixed: String = room
        .chars()
        .enumerate()
        .map(|(i, c)| if i == 0 { 'A' } else { c })
        .collect();
    let nine = room[..9].to_string();
    let eleven = format!("{room}0");
    let unknown = if room == "0123456789" {
        "9876543210".to_string()
    } else {
        "0123456789".to_string()
    };
    let ids = [
        unknown,
        upper,
        mixed,
        nine,
        eleven,
        "zzzzzzzzzz".to_string(),
        "..".to_string(),
        "%2e%2e".to_string(),
        "%2E%2E%2Fsessions".to_string(),
        format!("{room}%00"),
        format!("%20{}", &room[1..]),
        "%ff%fe%fd%fc%fb".to_string(),
        "g123456789".to_string(),
        "-123456789".to_string(),
        "+123456789".to_string(),
        "１２３４５６７８９０".to_string(),
    ];
    let mut h = s.http();
    for id in &ids {
        for (method, path, auth) in [
            ("GET", format!("/rooms/{id}"), None),
            ("GET", format!("/rooms/{id}/"), None),
            ("POST", format!("/rooms/{id}/join"), Some(sid.as_str())),
            ("GET", format!("/rooms/{id}/messages"), Some(sid.as_str())),
        ] {
            let r = h.call(method, &path, auth);
            assert_eq!(r.status, 404, "{method} {path}: {}", r.text());
            assert!(
                r.json()["detail"].is_string(),
                "{method} {path}: {}",
                r.text()
            );
        }
    }
    // Path tricks around the room segment.
    for path in [
        "/rooms/../sessions",
        "/rooms/./all",
        &format!("/rooms/{room}/../../sessions/me"),
    ] {
        let r = h.call("GET", path, Some(&sid));
        assert_eq!(r.status, 404, "GET {path}: {}", r.text());
    }
    // The real room is still fine.
    assert_eq!(h.get(&format!("/rooms/{room}"), None).status, 200);
}

#[test]
fn join_and_leave_in_both_slash_forms() {
    let s = Server::start(&[]);
    let (a, _) = s.session("alice");
    let (b, _) = s.session("bob");
    let room = s.room(&a);
    for suffix in ["", "/"] {
        let r = s
            .http()
            .call("POST", &format!("/rooms/{room}/join{suffix}"), Some(&b));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.json(),
            json!({ "message": format!("Joined room {room}") })
        );
        let me = s.http().get("/sessions/me", Some(&b)).json();
        assert_eq!(me["joined_rooms"], json!([room]));

        let r = s
            .http()
            .call("DELETE", &format!("/rooms/{room}/leave{suffix}"), Some(&b));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json(), json!({ "message": format!("Left room {room}") }));
        let me = s.http().get("/sessions/me", Some(&b)).json();
        assert_eq!(me["joined_rooms"], json!([]));
    }
    // Joining twice is harmless.
    for _ in 0..2 {
        assert_eq!(
            s.http()
                .call("POST", &format!("/rooms/{room}/join"), Some(&b))
                .status,
            200
        );
    }
    assert_eq!(
        rooms_of(&s.http().get("/rooms", Some(&b)).json()),
        vec![room.clone()]
    );
    // Joining a room that does not exist is 404.
    let other = if room == "abcdefabcd" {
        "0000000000"
    } else {
        "abcdefabcd"
    };
    let r = s
        .http()
        .call("POST", &format!("/rooms/{other}/join"), Some(&b));
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(r.json()["detail"].is_string());
}

#[test]
fn messages_endpoint_default_limit_order_and_bounds() {
    let s = Server::start(&["--chat-rate", "10000", "--chat-burst", "10000"]);
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    for suffix in ["", "/"] {
        let r = s
            .http()
            .get(&format!("/rooms/{room}/messages{suffix}"), Some(&sid));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json(), json!({ "messages": [] }));
    }
    let (mut ws, _) = s.join(&room, &sid);
    ws.recv_type("user_joined");
    for i in 0..70 {
        ws.chat(&format!("m{i}"));
    }
    loop {
        if ws.recv_type("chat")["message"] == "m69" {
            break;
        }
    }
    let chats = |v: &Value| -> Vec<String> {
        v["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["type"] == "chat")
            .map(|m| m["message"].as_str().unwrap().to_string())
            .collect()
    };
    let expect =
        |from: usize, to: usize| -> Vec<String> { (from..to).map(|i| format!("m{i}")).collect() };

    // Default: the last 50, oldest first.
    let v = s
        .http()
        .get(&format!("/rooms/{room}/messages"), Some(&sid))
        .json();
    assert_eq!(v["messages"].as_array().unwrap().len(), 50);
    assert_eq!(chats(&v), expect(20, 70));
    let v = s
        .http()
        .get(&format!("/rooms/{room}/messages?limit=5"), Some(&sid))
        .json();
    assert_eq!(chats(&v), expect(65, 70));
    let v = s
        .http()
        .get(&format!("/rooms/{room}/messages/?limit=1"), Some(&sid))
        .json();
    assert_eq!(chats(&v), expect(69, 70));
    // 1000 returns everything kept: the join notice and 70 chats.
    let v = s
        .http()
        .get(&format!("/rooms/{room}/messages?limit=1000"), Some(&sid))
        .json();
    let all = v["messages"].as_array().unwrap();
    assert_eq!(all.len(), 71);
    assert_eq!(all[0]["type"], "user_joined");
    assert_eq!(chats(&v), expect(0, 70));
    let ids: Vec<&str> = all.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "oldest first: {ids:?}");

    for bad in [
        "0",
        "1001",
        "-1",
        "abc",
        "",
        "1.5",
        "99999999999999999999999",
    ] {
        let r = s
            .http()
            .get(&format!("/rooms/{room}/messages?limit={bad}"), Some(&sid));
        assert_eq!(r.status, 422, "limit={bad}: {}", r.text());
        assert!(r.json()["detail"].is_string());
    }
    let unknown = if room == "0123456789" {
        "9876543210"
    } else {
        "0123456789"
    };
    let r = s
        .http()
        .get(&format!("/rooms/{unknown}/messages"), Some(&sid));
    assert_eq!(r.status, 404, "{}", r.text());
    let r = s.http().get(&format!("/rooms/{room}/messages"), None);
    assert_eq!(r.status, 401, "{}", r.text());
}

#[test]
fn no_room_list_turns_off_all_rooms_only() {
    let s = Server::start(&["--no-room-list"]);
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    for path in ["/rooms/all", "/rooms/all/"] {
        let r = s.http().get(path, None);
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        assert!(r.json()["detail"].is_string());
        let r = s.http().get(path, Some(&sid));
        assert_eq!(r.status, 404, "{path} with a session: {}", r.text());
    }
    assert_eq!(s.http().get(&format!("/rooms/{room}"), None).status, 200);
    assert_eq!(
        rooms_of(&s.http().get("/rooms", Some(&sid)).json()),
        vec![room]
    );
}
