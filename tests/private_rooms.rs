//! Invite-only rooms (issue 14): `POST /rooms {"private": true}` answers with an invite;
//! without it (or with a wrong or rotated-out one) every path answers exactly as for a room
//! that does not exist, and spends the per-address 404 budget; with it everything works;
//! any member rotates it; rooms created the old way are unchanged.
mod common;

use common::{BYSTANDER, Server};
use serde_json::{Value, json};

/// A room id no server here has made (ids are random: one in 2^40 to collide).
const MISSING: &str = "0123456789";

fn create_private(s: &Server, sid: &str) -> (String, String) {
    let r = s
        .http()
        .post_json("/rooms", &json!({"private": true}).to_string(), Some(sid));
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    let invite = v["invite"]
        .as_str()
        .expect("a private room's answer has an invite");
    assert_eq!(invite.len(), 22, "128 bits of URL-safe base64: {invite}");
    assert!(
        invite
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    );
    (
        v["room_id"].as_str().unwrap().to_string(),
        invite.to_string(),
    )
}

/// Every answer an outsider gets about `room`: (what, status, body). Without an invite, a
/// made-up one is tried.
fn outsider_view(
    s: &Server,
    room: &str,
    sid: &str,
    invite: Option<&str>,
) -> Vec<(String, u16, String)> {
    common::outsider_view(s, room, sid, invite.unwrap_or("AAAAAAAAAAAAAAAAAAAAAA"))
}

/// The same answers with the room id replaced, so a private room's can be compared with a
/// missing room's.
fn normalised(v: Vec<(String, u16, String)>, room: &str) -> Vec<(String, u16, String)> {
    v.into_iter()
        .map(|(w, st, b)| (w, st, b.replace(room, "ROOM")))
        .collect()
}

#[test]
fn without_the_invite_a_private_room_answers_as_if_missing_on_every_path() {
    let s = Server::start(&["--create-rate", "0"]);
    let (owner, _) = s.session("owner");
    let (outsider, _) = s.session("outsider");
    let (room, invite) = create_private(&s, &owner);
    let (mut ws_owner, _) = s.join(&room, &owner);
    ws_owner.chat("secret plans");
    ws_owner.recv_type("chat");

    let missing = normalised(outsider_view(&s, MISSING, &outsider, None), MISSING);
    assert!(missing.iter().all(|(_, st, _)| *st == 404), "{missing:?}");
    let private = normalised(outsider_view(&s, &room, &outsider, None), &room);
    assert_eq!(
        private, missing,
        "a private room must look missing without its invite"
    );
    // A wrong invite is no better (one character changed).
    let mut wrong = invite.clone().into_bytes();
    wrong[0] = if wrong[0] == b'A' { b'B' } else { b'A' };
    let wrong = String::from_utf8(wrong).unwrap();
    let with_wrong = normalised(outsider_view(&s, &room, &outsider, Some(&wrong)), &room);
    assert_eq!(with_wrong, missing);
    // Leaving (a no-op for a non-member) answers as for a missing room too.
    let leave = |r: &str| {
        let a = s
            .http()
            .call("DELETE", &format!("/rooms/{r}/leave"), Some(&outsider));
        (a.status, a.text().replace(r, "ROOM"))
    };
    assert_eq!(leave(&room), leave(MISSING));
    // Nothing the outsider did made it a member, and the owner heard nothing of it.
    ws_owner.expect_silence(std::time::Duration::from_millis(200));

    // With the invite: join, read, connect.
    let r = s.http().post_json(
        &format!("/rooms/{room}/join"),
        &json!({ "invite": invite }).to_string(),
        Some(&outsider),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let info = s
        .http()
        .get(&format!("/rooms/{room}"), Some(&outsider))
        .json();
    assert_eq!(info["private"], true);
    assert_eq!(info["user_count"], 1);
    let history = s
        .http()
        .get(&format!("/rooms/{room}/messages"), Some(&outsider))
        .json();
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["type"] == "chat")
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["secret plans"]);
    let (_ws, welcome) = s.join(&room, &outsider);
    assert_eq!(welcome["room_id"], room.as_str());
    let listed = s.http().get("/rooms", Some(&outsider)).json();
    assert!(
        listed["rooms"]
            .as_array()
            .unwrap()
            .contains(&Value::from(room.as_str()))
    );
}

#[test]
fn any_member_rotates_the_invite_and_the_old_one_stops_admitting() {
    let s = Server::start(&["--create-rate", "0"]);
    let (owner, _) = s.session("owner");
    let (member, _) = s.session("member");
    let (late, _) = s.session("latecomer");
    let (room, old) = create_private(&s, &owner);
    let join = |sid: &str, invite: &str| {
        s.http()
            .post_json(
                &format!("/rooms/{room}/join"),
                &json!({ "invite": invite }).to_string(),
                Some(sid),
            )
            .status
    };
    assert_eq!(join(&member, &old), 200);
    // A member who is not the creator rotates.
    let r = s
        .http()
        .call("POST", &format!("/rooms/{room}/invite"), Some(&member));
    assert_eq!(r.status, 200, "{}", r.text());
    let new = r.json()["invite"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(new.len(), 22);
    assert_eq!(join(&late, &old), 404, "the old invite admits nobody new");
    assert_eq!(s.status(&format!("/rooms/{room}")), 404);
    // Current members stay.
    let (_a, _) = s.join(&room, &owner);
    let (_b, _) = s.join(&room, &member);
    assert_eq!(join(&late, &new), 200);
    let (_c, welcome) = s.join(&room, &late);
    assert_eq!(welcome["users"].as_array().unwrap().len(), 3, "{welcome}");
    // Public rooms have no invite to rotate.
    let public = s.room(&owner);
    assert_eq!(
        s.http()
            .call("POST", &format!("/rooms/{public}/invite"), Some(&owner))
            .status,
        404
    );
}

#[test]
fn rooms_created_the_old_way_are_unchanged() {
    let s = Server::start(&["--create-rate", "0", "--room-list"]);
    let (a, _) = s.session("alice");
    let (b, _) = s.session("bob");
    // The original client: POST /rooms without a body.
    let r = s.http().call("POST", "/rooms", Some(&a));
    assert_eq!(r.status, 201);
    let v = r.json();
    assert_eq!(v.as_object().unwrap().len(), 1, "only room_id: {v}");
    let room = v["room_id"].as_str().unwrap();
    let info = s.http().get(&format!("/rooms/{room}"), None).json();
    assert_eq!(
        info,
        json!({"room_id": room, "exists": true, "user_count": 0})
    );
    assert_eq!(
        s.http()
            .call("POST", &format!("/rooms/{room}/join"), Some(&b))
            .status,
        200
    );
    assert_eq!(
        s.http()
            .get(&format!("/rooms/{room}/messages"), Some(&b))
            .status,
        200
    );
    let (_ws, _) = s.join(room, &b);
    // `{}` is a public room too; a private room is never in the room list.
    let r = s.http().post_json("/rooms", "{}", Some(&a));
    assert_eq!(r.status, 201);
    assert!(r.json().get("invite").is_none());
    let (private, _) = create_private(&s, &a);
    let all = s.http().get("/rooms/all", None).json();
    let all = all["rooms"].as_array().unwrap();
    assert!(all.contains(&Value::from(room)));
    assert!(!all.contains(&Value::from(private.as_str())));
    // Bodies that are not what POST /rooms takes are refused, not half-read.
    for (body, status) in [
        ("[1]", 422),
        ("{\"private\": \"yes\"}", 422),
        ("{\"private\":", 400),
    ] {
        let r = s.http().post_json("/rooms", body, Some(&a));
        assert_eq!(r.status, status, "{body}: {}", r.text());
        assert!(r.json()["detail"].is_string());
    }
}

#[test]
fn probing_a_private_room_spends_the_404_budget_and_a_bystander_is_unaffected() {
    let s = Server::start(&["--create-rate", "1", "--create-burst", "6"]);
    // The owner (a bystander on another address) creates the room and chats.
    let (owner, _) = s.session_from(BYSTANDER, "owner");
    let r = s.http_from(BYSTANDER).post_json(
        "/rooms",
        &json!({"private": true}).to_string(),
        Some(&owner),
    );
    assert_eq!(r.status, 201);
    let room = r.json()["room_id"].as_str().unwrap().to_string();
    // The prober has a session (one token of six) and guesses at the room's paths.
    let (prober, _) = s.session("prober");
    let mut h = s.http();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(h.get(&format!("/rooms/{room}"), Some(&prober)).status);
        statuses.push(
            h.get(&format!("/rooms/{room}/messages"), Some(&prober))
                .status,
        );
    }
    let first_429 = statuses.iter().position(|&st| st == 429);
    assert_eq!(
        first_429,
        Some(5),
        "five 404s spend the five tokens left, then 429: {statuses:?}"
    );
    assert!(statuses[..5].iter().all(|&st| st == 404), "{statuses:?}");
    // The owner, from its own address, still reads and connects.
    let mine = s
        .http_from(BYSTANDER)
        .get(&format!("/rooms/{room}/messages"), Some(&owner));
    assert_eq!(mine.status, 200, "{}", mine.text());
    let (_ws, welcome) = s.join_from(BYSTANDER, &room, &owner);
    assert_eq!(welcome["type"], "welcome");
}
