//! `--reuse-port`: two nodes (each one thread, both on the same real `redis-server`) listen on
//! the same address; the kernel spreads connections over them, REST calls land on either node,
//! and chat crosses between members connected to different nodes.
mod common;
#[path = "common/redis.rs"]
mod redis;

use std::time::Duration;

use common::{Server, Ws, wait_for};
use redis::RedisServer;

const FAST: [&str; 4] = ["--chat-rate", "100000", "--chat-burst", "100000"];
const CLIENTS: usize = 24;

/// Sockets the process holds (listener, Redis link and connections).
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// `GET /health` said Redis is up (on whichever node answered).
fn redis_up(s: &Server) -> bool {
    let r = s.http().get("/health", None);
    r.status == 200 && r.json()["redis"] == "up"
}

#[test]
fn two_nodes_share_one_port_and_chat_crosses() {
    let redis = RedisServer::start();
    let url = redis.url(0);
    let mut args = vec!["--redis", url.as_str(), "--reuse-port"];
    args.extend_from_slice(&FAST);
    let a = Server::start(&args);
    let port = a.addr.port().to_string();
    let mut args_b = args.clone();
    args_b.extend_from_slice(&["--port", port.as_str()]);
    let b = Server::start(&args_b);
    assert_eq!(a.addr, b.addr, "both nodes listen on one address");
    // Twenty answers in a row that say "up" come from both nodes (each has 1/2 per connection).
    let mut streak = 0;
    let up = wait_for(Duration::from_secs(10), || {
        streak = if redis_up(&a) { streak + 1 } else { 0 };
        streak >= 20
    });
    assert!(up.is_some(), "the nodes never both reported Redis up");

    let before = (sockets(a.pid()), sockets(b.pid()));
    // Every client makes its own REST calls (each on a new connection, so on either node)
    // and then opens its WebSocket (again on either node).
    let (owner, _) = a.session("owner");
    let room = a.room(&owner);
    let mut members: Vec<Ws> = Vec::new();
    for i in 0..CLIENTS {
        let (sid, _) = a.session(&format!("user{i}"));
        let join = a
            .http()
            .post_json(&format!("/rooms/{room}/join"), "{}", Some(&sid));
        assert_eq!(join.status, 200, "{}", join.text());
        let (ws, _) = a.join(&room, &sid);
        members.push(ws);
    }
    let after = (sockets(a.pid()), sockets(b.pid()));
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "connections did not spread over both nodes: sockets before {before:?}, after {after:?}"
    );

    // Every member sends one chat; every member gets all of them, from both nodes.
    for (i, ws) in members.iter_mut().enumerate() {
        ws.chat(&format!("hello from {i}"));
    }
    for (j, ws) in members.iter_mut().enumerate() {
        let mut seen = vec![false; CLIENTS];
        let got = wait_for(Duration::from_secs(10), || {
            if let Some(v) = ws.recv_within(Duration::from_millis(200))
                && v["type"] == "chat"
                && let Some(i) = v["message"]
                    .as_str()
                    .and_then(|m| m.strip_prefix("hello from "))
                    .and_then(|n| n.parse::<usize>().ok())
                && i < CLIENTS
            {
                assert!(!seen[i], "member {j} got chat {i} twice");
                seen[i] = true;
            }
            seen.iter().all(|s| *s)
        });
        assert!(got.is_some(), "member {j} missed chats: {seen:?}");
    }
}
