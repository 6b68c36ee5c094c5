//! Per-address creation budget: sessions and rooms created per client address are budgeted
//! (`--create-rate` per second sustained, `--create-burst` at once; 429 with `Retry-After`),
//! and 404s on room paths spend the same budget. On by default (2 per second, bursts of 60);
//! `--create-rate 0` turns it off. Live rooms per session are capped too
//! (`--max-rooms-per-session`, 50). (IPv6 /64 keying and separate budgets per address are
//! unit-tested in `src/ratelimit.rs`.)

mod common;

use std::time::Duration;

use common::{BYSTANDER, Server};

#[test]
fn a_burst_then_429_with_retry_after_then_refill() {
    let s = Server::start(&["--create-rate", "3", "--create-burst", "3"]);
    let mut c = s.http();
    let body = r#"{"username":"alice"}"#;
    let mut created = 0;
    let mut limited = None;
    for _ in 0..10 {
        let r = c.post_json("/sessions", body, None);
        match r.status {
            201 => created += 1,
            429 => {
                limited = Some(r);
                break;
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    assert_eq!(created, 3, "a burst of --create-burst creations is allowed");
    let r = limited.expect("the fourth creation in the same second is refused");
    let retry: u32 = r
        .header("Retry-After")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    assert!(r.json()["detail"].as_str().unwrap().contains("retry"));
    // Guessing rooms spends the same budget: once spent, room paths answer 429 too.
    assert_eq!(c.get("/rooms/0123456789", None).status, 429);
    // Requests that create nothing are not limited.
    assert_eq!(c.get("/health", None).status, 200);
    // The budget refills.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(c.post_json("/sessions", body, None).status, 201);
}

#[test]
fn room_404s_spend_the_budget() {
    let s = Server::start(&["--create-rate", "2", "--create-burst", "2"]);
    let mut c = s.http();
    assert_eq!(c.get("/rooms/0123456789", None).status, 404);
    assert_eq!(c.get("/rooms/0123456780", None).status, 404);
    let r = c.get("/rooms/0123456781", None);
    assert_eq!(r.status, 429);
    assert!(r.header("Retry-After").is_some());
    let r = c.post_json("/sessions", r#"{"username":"bob"}"#, None);
    assert_eq!(r.status, 429, "creation shares the budget");
}

/// Issue 12, finding 4: with no budget by default, one connection created 136 000 sessions a
/// second and filled the 2 M cap in 15 s, locking everyone out for a day.
#[test]
fn by_default_one_address_cannot_lock_out_the_others() {
    let s = Server::start(&[]);
    let mut attacker = s.http();
    let body = r#"{"username":"mallory"}"#;
    let mut created = 0;
    let mut refused = None;
    for _ in 0..1000 {
        let r = attacker.post_json("/sessions", body, None);
        match r.status {
            201 => created += 1,
            429 => {
                refused = Some(r);
                break;
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    let r = refused.unwrap_or_else(|| panic!("{created} sessions from one address, no 429"));
    // The default burst (60), plus what refilled meanwhile at 2 per second.
    assert!(
        (60..=70).contains(&created),
        "{created} created before the 429"
    );
    assert!(r.header("Retry-After").is_some_and(|v| v == "1"), "{r:?}");
    assert!(r.json()["detail"].as_str().unwrap().contains("retry"));
    // Still refused on another connection from the same address...
    let r = s.http().post_json("/sessions", body, None);
    assert_eq!(r.status, 429);
    // ...while a bystander on another address creates a session and a room, and chats.
    let (sid, _) = s.session_from(BYSTANDER, "bob");
    let r = s.http_from(BYSTANDER).call("POST", "/rooms", Some(&sid));
    assert_eq!(r.status, 201, "{}", r.text());
    let room = r.json()["room_id"].as_str().unwrap().to_string();
    let (mut ws, _) = s.join_from(BYSTANDER, &room, &sid);
    ws.chat_roundtrip("the bystander is fine");
}

/// Issue 12, finding 4: one session could create rooms until `--max-rooms` was full.
#[test]
fn one_session_cannot_fill_the_room_cap() {
    let s = Server::start(&["--room-ttl", "1s"]);
    let (sid, _) = s.session("mallory");
    let mut h = s.http();
    let mut rooms = Vec::new();
    let refused = loop {
        let r = h.call("POST", "/rooms", Some(&sid));
        if r.status != 201 {
            break r;
        }
        rooms.push(r.json()["room_id"].as_str().unwrap().to_string());
        assert!(rooms.len() <= 1000, "no limit on rooms per session");
    };
    assert_eq!(rooms.len(), 50, "the default --max-rooms-per-session");
    assert_eq!(refused.status, 429, "{}", refused.text());
    let detail = refused.json()["detail"].as_str().unwrap().to_string();
    assert!(detail.contains("50 live rooms"), "{detail}");
    // The session still works: it can join and use its rooms.
    let (mut ws, _) = s.join(&rooms[0], &sid);
    ws.chat_roundtrip("still fine");
    // Another session (here from the same address) has its own allowance.
    let (other, _) = s.session("bob");
    s.room(&other);
    // Once its unused rooms expire (--room-ttl 1s), the session may create rooms again.
    let mut last = None;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(300));
        let r = s.http().call("POST", "/rooms", Some(&sid));
        if r.status == 201 {
            return;
        }
        last = Some(r);
    }
    panic!("still refused after the rooms expired: {last:?}");
}

#[test]
fn off_with_create_rate_0() {
    let s = Server::start(&["--create-rate", "0"]);
    let mut c = s.http();
    for i in 0..200 {
        let r = c.post_json("/sessions", r#"{"username":"carol"}"#, None);
        assert_eq!(r.status, 201, "request {i}");
    }
    for _ in 0..200 {
        assert_eq!(c.get("/rooms/0123456789", None).status, 404);
    }
}
