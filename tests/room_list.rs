//! Issue 12, finding 5: rooms are not readable by anyone. `GET /rooms/all` is off unless the
//! operator turns it on with `--room-list` (the old `--no-room-list` still starts); a room id
//! is the capability to read and join a room, and guessing ids spends the per-address budget
//! that missing rooms cost (`--create-rate`, on by default), while a bystander elsewhere is
//! unaffected.
mod common;

use std::process::Command;

use common::*;

fn rooms_of(r: &Resp) -> Vec<String> {
    r.json()["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_room_list_is_off_by_default() {
    let s = Server::start(&[]);
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    for path in ["/rooms/all", "/rooms/all/"] {
        let r = s.http().get(path, None);
        assert_eq!(r.status, 404, "{path} lists rooms to anyone: {}", r.text());
        assert!(r.json()["detail"].is_string());
        let r = s.http().get(path, Some(&sid));
        assert_eq!(r.status, 404, "{path} with a session: {}", r.text());
        assert!(!r.text().contains(&room));
    }
    // The room itself works for whoever has its id, and the session still lists its own.
    assert_eq!(s.status(&format!("/rooms/{room}")), 200);
    let r = s.http().get("/rooms", Some(&sid));
    assert_eq!(rooms_of(&r), vec![room.clone()]);
    let (bob, _) = s.session("bob");
    let r = s.http().get(&format!("/rooms/{room}/messages"), Some(&bob));
    assert_eq!(r.status, 200, "the id is the capability");
}

#[test]
fn room_list_turns_it_on_and_no_room_list_still_starts() {
    let s = Server::start(&["--room-list"]);
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    let r = s.http().get("/rooms/all", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(rooms_of(&r), vec![room]);
    drop(s);

    let s = Server::start(&["--no-room-list"]);
    let (sid, _) = s.session("alice");
    s.room(&sid);
    assert_eq!(s.status("/rooms/all"), 404);
    drop(s);

    let help = Command::new(env!("CARGO_BIN_EXE_chatloop"))
        .arg("--help")
        .output()
        .expect("run --help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--room-list"), "{help}");
    assert!(
        help.contains("--no-room-list") && help.contains("older command lines"),
        "{help}"
    );
}

#[test]
fn guessing_room_ids_spends_the_per_ip_budget_while_a_bystander_is_unaffected() {
    let s = Server::start(&[]);
    let bob = s.session_from(BYSTANDER, "bob").0;
    let mut hb = s.http_from(BYSTANDER);
    let r = hb.request("POST", "/rooms", &[("Authorization", &bearer(&bob))], None);
    assert_eq!(r.status, 201, "{}", r.text());
    let room = r.json()["room_id"].as_str().unwrap().to_string();

    // The attacker walks through 40-bit ids: at most a burst's worth (--create-burst 60) of
    // 404s, then 429 with Retry-After.
    let mut h = s.http();
    let mut statuses = Vec::new();
    for i in 0..100u64 {
        let r = h.get(&format!("/rooms/{:010x}", 0xa1b2c3d400 + i), None);
        statuses.push(r.status);
        if r.status == 429 {
            assert!(r.header("Retry-After").is_some(), "{:?}", r.headers);
            break;
        }
    }
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    assert!(
        statuses.iter().filter(|&&c| c == 404).count() <= 60,
        "{statuses:?}"
    );

    // The bystander (another address) uses its room as before.
    assert_eq!(hb.get(&format!("/rooms/{room}"), None).status, 200);
    let mut ws = s
        .ws_from(BYSTANDER, &format!("/ws/{room}?session_id={bob}"))
        .unwrap();
    assert_eq!(ws.recv()["type"], "welcome");
    ws.chat_roundtrip("bob is fine");
}
