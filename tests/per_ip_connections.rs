//! Issue 12, finding 10: one client could hold every one of `--max-connections`.
//! `--max-connections-per-ip N` (default 1000; IPv6 counted per /64): the next connection from
//! that address gets 503 and is closed; a few more beyond that are closed at once; the count
//! is released as connections close, and other addresses are not affected.
mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{BYSTANDER, Http, Server, metric_in, wait_for};

const ATTACKER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
const LIMIT: usize = 5;

fn metrics(s: &Server) -> String {
    let r = s.http_from(BYSTANDER).get("/metrics", None);
    assert_eq!(r.status, 200);
    r.text()
}

#[test]
fn one_address_cannot_take_every_connection() {
    let s = Server::start(&["--max-connections-per-ip", &LIMIT.to_string()]);
    // The attacker's first LIMIT keep-alive connections are served.
    let mut held: Vec<Http> = (0..LIMIT)
        .map(|_| {
            let mut h = s.http_from(ATTACKER);
            assert_eq!(h.get("/health", None).status, 200);
            h
        })
        .collect();
    // The next one gets 503 and is closed.
    let mut extra = s.http_from(ATTACKER);
    let r = extra.get("/health", None);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        r.json()["detail"]
            .as_str()
            .unwrap()
            .contains("your address"),
        "{}",
        r.text()
    );
    assert!(extra.is_closed(), "the refused connection is closed");
    // A WebSocket from that address is refused the same way.
    let (sid, _) = s.session_from(BYSTANDER, "bob");
    let room = {
        let r = s.http_from(BYSTANDER).call("POST", "/rooms", Some(&sid));
        assert_eq!(r.status, 201);
        r.json()["room_id"].as_str().unwrap().to_string()
    };
    assert_eq!(
        s.ws(&format!("/ws/{room}?session_id={sid}")).err(),
        Some(503)
    );

    // A bystander on another address is served and chats.
    let (mut ws, _) = s.join_from(BYSTANDER, &room, &sid);
    ws.chat_roundtrip("bob is fine");
    assert_eq!(s.http_from(BYSTANDER).get("/health", None).status, 200);

    // Connections far over the limit are not even kept to be told: one address never holds
    // more than its limit plus a few.
    let idle: Vec<_> = (0..50)
        .map(|_| common::connect_from(s.addr, "127.0.0.1"))
        .collect();
    let open = wait_for(Duration::from_secs(3), || {
        metric_in(&metrics(&s), "chatloop_connections") <= (LIMIT + 4 + 2) as f64
    });
    assert!(
        open.is_some(),
        "{} connections open",
        metric_in(&metrics(&s), "chatloop_connections")
    );
    drop(idle);
    let m = metrics(&s);
    assert!(metric_in(&m, "chatloop_connections_refused_per_ip_total") >= 2.0);

    // The held ones keep working, and once two close the attacker may connect again.
    assert_eq!(held[0].get("/health", None).status, 200);
    held.truncate(LIMIT - 2);
    let back = wait_for(Duration::from_secs(5), || {
        s.http_from(ATTACKER)
            .try_get("/health")
            .is_some_and(|r| r.status == 200)
    });
    assert!(back.is_some(), "a freed place is usable again");
    // The count follows closes exactly: with all closed the full allowance is back.
    held.clear();
    wait_for(Duration::from_secs(5), || {
        metric_in(&metrics(&s), "chatloop_connections") <= 2.0
    })
    .expect("the attacker's connections are gone");
    let again: Vec<Http> = (0..LIMIT)
        .map(|_| {
            let mut h = s.http_from(ATTACKER);
            assert_eq!(h.get("/health", None).status, 200);
            h
        })
        .collect();
    drop(again);
}

#[test]
fn by_default_an_address_may_hold_a_thousand_and_0_turns_the_limit_off() {
    let s = Server::start(&[]);
    let many: Vec<_> = (0..1000)
        .map(|_| common::connect_from(s.addr, "127.0.0.1"))
        .collect();
    let r = s.http_from(ATTACKER).get("/health", None);
    assert_eq!(r.status, 503, "the 1001st connection: {}", r.text());
    assert_eq!(s.http_from(BYSTANDER).get("/health", None).status, 200);
    drop(many);

    let s = Server::start(&["--max-connections-per-ip", "0"]);
    let many: Vec<_> = (0..1100)
        .map(|_| common::connect_from(s.addr, "127.0.0.1"))
        .collect();
    let mut h = s.http_from(ATTACKER);
    assert_eq!(h.get("/health", None).status, 200, "no per-address limit");
    drop(many);
}

/// Behind a trusted proxy every connection comes from the proxy: a connection counts under
/// the client its PROXY header names, and the proxy's own connections are not limited (its
/// HTTP clients, named per request by X-Forwarded-For, are left to the proxy's own limits).
#[test]
fn behind_a_trusted_proxy_connections_count_per_forwarded_client() {
    let s = Server::start(&[
        "--trusted-proxy",
        "127.0.0.1/32",
        "--max-connections-per-ip",
        "2",
    ]);
    let via = |client: &str| {
        let mut h = Http::connect(s.addr);
        h.send_raw(format!("PROXY TCP4 {client} 127.0.0.1 40000 8000\r\n").as_bytes());
        h
    };
    let mut held: Vec<Http> = (0..2)
        .map(|_| {
            let mut h = via("203.0.113.7");
            assert_eq!(h.get("/health", None).status, 200);
            h
        })
        .collect();
    let mut third = via("203.0.113.7");
    let r = third.get("/health", None);
    assert_eq!(
        r.status,
        503,
        "a third connection for one client: {}",
        r.text()
    );
    // Another client through the same proxy, and the proxy's own (HTTP-proxy) connections.
    let mut other = via("203.0.113.8");
    assert_eq!(other.get("/health", None).status, 200);
    let plain: Vec<Http> = (0..5)
        .map(|_| {
            let mut h = Http::connect(s.addr);
            let r = h.request(
                "GET",
                "/health",
                &[("X-Forwarded-For", "203.0.113.7")],
                None,
            );
            assert_eq!(r.status, 200, "{}", r.text());
            h
        })
        .collect();
    // The client's count drops as its connections close.
    held.pop();
    wait_for(Duration::from_secs(5), || {
        via("203.0.113.7")
            .try_get("/health")
            .is_some_and(|r| r.status == 200)
    })
    .expect("a place freed up for the forwarded client");
    drop((plain, other, third));
}
