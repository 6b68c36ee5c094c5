//! Private rooms and disappearing messages in cluster mode (issue 14): two nodes on one real
//! `redis-server`. A private room made on one node answers as if missing on the other (every
//! path) without its invite, admits with it, verifies membership from Redis on every call
//! (joins and leaves happen on any node), and a rotation on one node stops the old invite on
//! the other. A room's `message_ttl` holds on every node: each node's members get the
//! `expired` frame, Redis's history loses the message, and no path (welcome, `since`,
//! `GET .../messages` with or without members on the node) serves it after its deadline,
//! even while Redis still holds it.
mod common;
#[path = "common/redis.rs"]
mod redis;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use redis::{RedisCluster, RedisServer};
use serde_json::{Value, json};

/// A room id no node here has made (ids are random: one in 2^40 to collide).
const MISSING: &str = "0123456789";

/// Two nodes on one fresh Redis; prints their logs if the test fails.
struct Pair {
    a: Server,
    b: Server,
    redis: RedisServer,
}

impl Pair {
    #[track_caller]
    fn start(args: &[&str]) -> Pair {
        Pair::on(RedisServer::start(), args)
    }

    /// On a Redis Cluster of one master holding every slot: a script whose keys are in
    /// two slots fails there (CROSSSLOT) as on a sharded cluster.
    #[track_caller]
    fn on_a_one_shard_redis_cluster(args: &[&str]) -> Pair {
        let redis = RedisCluster::start(1, 0).nodes.pop().expect("its one node");
        Pair::on(redis, args)
    }

    #[track_caller]
    fn on(redis: RedisServer, args: &[&str]) -> Pair {
        let url = redis.url(0);
        let mut all = vec!["--redis", url.as_str(), "--create-rate", "0"];
        all.extend_from_slice(args);
        let (a, b) = (Server::start(&all), Server::start(&all));
        for s in [&a, &b] {
            let up = wait_for(Duration::from_secs(10), || {
                s.http()
                    .try_get("/health")
                    .is_some_and(|r| r.text().contains("\"redis\":\"up\""))
            });
            assert!(up.is_some(), "{} never reached Redis", s.addr);
        }
        Pair { a, b, redis }
    }

    /// `LRANGE chatloop:{r:ROOM}:h 0 -1`, one entry a line.
    fn redis_history(&self, room: &str) -> String {
        self.redis
            .command(
                0,
                &["LRANGE", &format!("chatloop:{{r:{room}}}:h"), "0", "-1"],
            )
            .expect("LRANGE")
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (name, n) in [("a", &self.a), ("b", &self.b)] {
                let log = n.log();
                let lines: Vec<&str> = log.lines().collect();
                eprintln!("----- node {name} log, last 40 lines -----");
                for l in &lines[lines.len().saturating_sub(40)..] {
                    eprintln!("{l}");
                }
            }
        }
    }
}

fn create_private(s: &Server, sid: &str) -> (String, String) {
    let r = s
        .http()
        .post_json("/rooms", &json!({"private": true}).to_string(), Some(sid));
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    (
        v["room_id"].as_str().unwrap().to_string(),
        v["invite"].as_str().expect("an invite").to_string(),
    )
}

fn join_with(s: &Server, room: &str, sid: &str, invite: &str) -> u16 {
    s.http()
        .post_json(
            &format!("/rooms/{room}/join"),
            &json!({ "invite": invite }).to_string(),
            Some(sid),
        )
        .status
}

/// Every answer an outsider gets about `room` on `s`, with the room id replaced: (what,
/// status, body).
fn outsider_view(s: &Server, room: &str, sid: &str, invite: &str) -> Vec<(String, u16, String)> {
    common::outsider_view(s, room, sid, invite)
        .into_iter()
        .map(|(what, status, body)| (what, status, body.replace(room, "ROOM")))
        .collect()
}

fn texts(messages: &Value) -> Vec<String> {
    messages
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {messages}"))
        .iter()
        .filter(|m| m["type"] == "chat")
        .map(|m| m["message"].as_str().unwrap().to_string())
        .collect()
}

fn history(s: &Server, room: &str, sid: &str) -> Value {
    let r = s
        .http()
        .get(&format!("/rooms/{room}/messages?limit=1000"), Some(sid));
    assert_eq!(r.status, 200, "messages on {}: {}", s.addr, r.text());
    r.json()["messages"].clone()
}

#[test]
fn a_private_room_made_on_one_node_is_private_on_the_other() {
    private_room_across_nodes(Pair::start(&["--room-list"]));
}

#[test]
fn on_a_one_shard_redis_cluster_a_private_room_is_private_on_every_node() {
    private_room_across_nodes(Pair::on_a_one_shard_redis_cluster(&["--room-list"]));
}

fn private_room_across_nodes(p: Pair) {
    let (a, b) = (&p.a, &p.b);
    let (owner, _) = a.session("owner");
    let (member, _) = b.session("member");
    let (outsider, _) = b.session("outsider");
    let (late, _) = a.session("latecomer");
    let (room, invite) = create_private(a, &owner);
    let (mut ws_owner, _) = a.join(&room, &owner);
    ws_owner.chat("secret plans");
    ws_owner.recv_type("chat");

    // Without the invite, or with a wrong one, every path on either node answers as for a
    // room that does not exist (node b has never seen the room; node a made it).
    let mut wrong = invite.clone().into_bytes();
    wrong[0] = if wrong[0] == b'A' { b'B' } else { b'A' };
    let wrong = String::from_utf8(wrong).unwrap();
    for s in [b, a] {
        let missing = outsider_view(s, MISSING, &outsider, &wrong);
        assert!(missing.iter().all(|(_, st, _)| *st == 404), "{missing:?}");
        let private = outsider_view(s, &room, &outsider, &wrong);
        assert_eq!(
            private, missing,
            "on {}: a private room must look missing without its invite",
            s.addr
        );
    }
    for s in [a, b] {
        let all = s.http().get("/rooms/all", None).json();
        assert!(
            !all["rooms"]
                .as_array()
                .unwrap()
                .contains(&Value::from(room.as_str())),
            "a private room is never listed: {all}"
        );
    }

    // With the invite, on the node that has never seen the room: join, read, connect.
    assert_eq!(join_with(b, &room, &member, &invite), 200);
    let info = b.http().get(&format!("/rooms/{room}"), Some(&member));
    assert_eq!(info.status, 200, "{}", info.text());
    assert_eq!(info.json()["private"], true, "{}", info.text());
    assert_eq!(texts(&history(b, &room, &member)), ["secret plans"]);
    // Membership made on b counts on a, which never saw the join.
    assert_eq!(texts(&history(a, &room, &member)), ["secret plans"]);
    let (mut ws_member, welcome) = b.join(&room, &member);
    assert_eq!(texts(&welcome["messages"]), ["secret plans"]);
    ws_owner.recv_type("user_joined");
    // Members on both nodes chat.
    ws_member.chat("from b");
    assert_eq!(ws_owner.recv_type("chat")["message"], "from b");
    ws_owner.chat("from a");
    ws_member.recv_chat("from a");

    // Rotation on b (by a member who did not create the room) stops the old invite on a,
    // which had the old hash cached since it made the room.
    let r = b
        .http()
        .call("POST", &format!("/rooms/{room}/invite"), Some(&member));
    assert_eq!(r.status, 200, "{}", r.text());
    let new = r.json()["invite"].as_str().unwrap().to_string();
    assert_ne!(new, invite);
    assert_eq!(join_with(a, &room, &late, &invite), 404, "old invite on a");
    assert_eq!(join_with(b, &room, &late, &invite), 404, "old invite on b");
    assert_eq!(join_with(a, &room, &late, &new), 200, "new invite on a");
    let (_ws_late, _) = b.join(&room, &late);
    ws_owner.recv_type("user_joined");

    // Leaving on a ends membership on b too, which had it cached from the join there.
    let r = a
        .http()
        .call("DELETE", &format!("/rooms/{room}/leave"), Some(&member));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        b.http()
            .get(&format!("/rooms/{room}"), Some(&member))
            .status,
        404
    );
    assert_eq!(
        b.http()
            .get(&format!("/rooms/{room}/messages"), Some(&member))
            .status,
        404
    );
    assert_eq!(
        b.ws(&format!("/ws/{room}?session_id={member}")).err(),
        Some(404)
    );
    // Its open socket stays (current members stay, as on one node); the owner still reads.
    assert_eq!(texts(&history(b, &room, &owner)).len(), 3);
}

/// A UUID v7 text for Unix ms `ms` (the rest arbitrary).
fn uuid_v7_at(ms: u64) -> String {
    format!(
        "{:08x}-{:04x}-7000-8000-00000000abcd",
        ms >> 16,
        ms & 0xffff
    )
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

// --min-message-ttl lowers the 5 s floor for these tests only.
#[test]
fn disappearing_messages_expire_on_every_node_and_from_redis() {
    disappearing_messages(Pair::start(&["--min-message-ttl", "1s"]));
}

#[test]
fn on_a_one_shard_redis_cluster_disappearing_messages_expire_everywhere() {
    disappearing_messages(Pair::on_a_one_shard_redis_cluster(&[
        "--min-message-ttl",
        "1s",
    ]));
}

fn disappearing_messages(p: Pair) {
    let (a, b) = (&p.a, &p.b);
    let (alice, _) = a.session("alice");
    let (bob, _) = b.session("bob");
    let r = a.http().post_json(
        "/rooms",
        &json!({"message_ttl": 2}).to_string(),
        Some(&alice),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let room = r.json()["room_id"].as_str().unwrap().to_string();
    // Node b learns the setting from Redis.
    let info = b.http().get(&format!("/rooms/{room}"), None).json();
    assert_eq!(info["message_ttl"], 2, "{info}");

    let (mut wa, _) = a.join(&room, &alice);
    let (mut wb, _) = b.join(&room, &bob);
    wa.recv_type("user_joined");
    let sent = Instant::now();
    wa.chat("one");
    let id1 = wa.recv_type("chat")["id"].as_str().unwrap().to_string();
    assert_eq!(wb.recv_type("chat")["id"], id1.as_str());
    assert!(p.redis_history(&room).contains(&id1), "stored in Redis");

    // Both nodes' members are told, with the same id.
    for (who, ws) in [("a", &mut wa), ("b", &mut wb)] {
        let expired = ws.recv_type("expired");
        let ids: Vec<&str> = expired["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(ids.contains(&id1.as_str()), "member on {who}: {expired}");
    }
    assert!(
        sent.elapsed() >= Duration::from_millis(1900),
        "not before the TTL"
    );
    // Gone from Redis (the nodes' timers trim it).
    let gone = wait_for(Duration::from_secs(3), || {
        !p.redis_history(&room).contains(&id1)
    });
    assert!(
        gone.is_some(),
        "Redis still holds the message: {}",
        p.redis_history(&room)
    );
    for s in [a, b] {
        assert!(texts(&history(s, &room, &bob)).is_empty(), "on {}", s.addr);
    }
    let (_w, caught_up) = b.join_query(&room, &format!("session_id={bob}&since={id1}"));
    assert!(texts(&caught_up["messages"]).is_empty(), "{caught_up}");

    // An expired message Redis still holds (written at the oldest end, as if no trim had
    // run yet) is served by no path: not by GET messages on a node with no member (it reads
    // Redis), not in the welcome of that node's next member (it loads Redis).
    drop(wb);
    drop(_w);
    wa.recv_type("user_left");
    wa.recv_type("user_left");
    wa.chat("template");
    let fresh = wa.recv_type("chat")["id"].as_str().unwrap().to_string();
    let entry = p
        .redis_history(&room)
        .lines()
        .find(|l| l.starts_with(&fresh))
        .expect("the fresh entry in Redis")
        .to_string();
    let old = uuid_v7_at(unix_ms() - 60_000);
    let stale = entry.replace(&fresh, &old).replace("template", "stale");
    p.redis
        .command(0, &["LPUSH", &format!("chatloop:{{r:{room}}}:h"), &stale])
        .expect("LPUSH");
    assert!(p.redis_history(&room).contains("stale"));
    assert_eq!(texts(&history(b, &room, &bob)), ["template"]);
    let (_wb2, welcome) = b.join(&room, &bob);
    assert_eq!(texts(&welcome["messages"]), ["template"], "{welcome}");
    assert_eq!(texts(&history(b, &room, &bob)), ["template"]);
    // The next store drops it from Redis.
    wa.chat("next");
    wa.recv_type("chat");
    assert!(
        !p.redis_history(&room).contains("stale"),
        "{}",
        p.redis_history(&room)
    );
}

#[test]
fn a_private_room_comes_back_private_after_redis_restarted_empty() {
    // With the room list on, so that the set of private rooms it reads is kept too.
    let mut p = Pair::start(&["--room-list"]);
    let (owner, _) = p.a.session("owner");
    let (room, invite) = create_private(&p.a, &owner);
    let (mut ws, _) = p.a.join(&room, &owner);
    ws.chat("before");
    ws.recv_type("chat");
    // Redis without persistence: stopped and started again, it is empty.
    p.redis.stop();
    p.redis.restart();
    // (The nodes may already have rewritten what they hold; the history is not among it.)
    assert_eq!(
        p.redis
            .command(0, &["LLEN", &format!("chatloop:{{r:{room}}}:h")])
            .as_deref(),
        Ok("0"),
        "restarted empty"
    );
    // Node a rewrites what it holds (the room has a member there), settings first: its
    // registry key, and its entry in the room list.
    let back = wait_for(Duration::from_secs(20), || {
        p.redis
            .command(0, &["EXISTS", &format!("chatloop:{{r:{room}}}:e")])
            .is_ok_and(|s| s == "1")
            && p.redis
                .command(0, &["ZSCORE", "chatloop:rooms", &room])
                .is_ok_and(|s| !s.is_empty())
    });
    assert!(back.is_some(), "the room was never registered again");
    let b = &p.b;
    // Node b may notice the restart only now: it answers 503 until it has reconnected.
    let mut outsider = String::new();
    let made = wait_for(Duration::from_secs(20), || {
        let r = b.http().post_json(
            "/sessions",
            &json!({"username": "outsider"}).to_string(),
            None,
        );
        if r.status == 201 {
            outsider = r.json()["session_id"].as_str().unwrap().to_string();
        }
        r.status == 201
    });
    assert!(made.is_some(), "node b never got back to Redis");
    assert_eq!(
        b.http()
            .get(&format!("/rooms/{room}"), Some(&outsider))
            .status,
        404,
        "still private for a node that has not seen it"
    );
    assert_eq!(
        b.ws(&format!("/ws/{room}?session_id={outsider}")).err(),
        Some(404)
    );
    let all = p
        .redis
        .command(0, &["SISMEMBER", "chatloop:private{chatloop:rooms}", &room])
        .unwrap();
    assert_eq!(all, "1", "kept out of the room list");
    assert_eq!(
        join_with(b, &room, &outsider, &invite),
        200,
        "the invite holds"
    );
    let (_w, _) = b.join(&room, &outsider);
    ws.recv_type("user_joined");
}
