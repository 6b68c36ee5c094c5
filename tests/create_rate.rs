//! `--create-rate`: sessions and rooms created per client IP are budgeted (429 with
//! `Retry-After`) and 404s on room paths spend the same budget. Off by default.
//! (Separate budgets per address are unit-tested in `src/ratelimit.rs`.)

mod common;

use std::time::Duration;

use common::Server;

#[test]
fn a_burst_then_429_with_retry_after_then_refill() {
    let s = Server::start(&["--create-rate", "3"]);
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
    assert_eq!(created, 3, "a burst of --create-rate creations is allowed");
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
    let s = Server::start(&["--create-rate", "2"]);
    let mut c = s.http();
    assert_eq!(c.get("/rooms/0123456789", None).status, 404);
    assert_eq!(c.get("/rooms/0123456780", None).status, 404);
    let r = c.get("/rooms/0123456781", None);
    assert_eq!(r.status, 429);
    assert!(r.header("Retry-After").is_some());
    let r = c.post_json("/sessions", r#"{"username":"bob"}"#, None);
    assert_eq!(r.status, 429, "creation shares the budget");
}

#[test]
fn off_by_default() {
    let s = Server::start(&[]);
    let mut c = s.http();
    for i in 0..50 {
        let r = c.post_json("/sessions", r#"{"username":"carol"}"#, None);
        assert_eq!(r.status, 201, "request {i}");
    }
    for _ in 0..50 {
        assert_eq!(c.get("/rooms/0123456789", None).status, 404);
    }
}
