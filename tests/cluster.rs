//! Cluster mode (`--redis`): several chatloop processes on one real `redis-server` behave as
//! one server. Sessions, rooms, joins, `user_count` and history work on any node; chat,
//! `user_joined`/`user_left` and `typing` reach the members of every node, chat exactly once
//! and in one order for everybody; a killed node's clients reconnect elsewhere with `since`
//! and lose nothing while its members leave presence within about `--presence-ttl`; a node
//! stopped with SIGTERM closes with 1001 and its members leave at once; while Redis is down
//! the nodes stay up, say so on `/health`, refuse what needs Redis with 503 and keep local chat
//! going, and they recover on their own when Redis is back (with its data, or empty); one
//! node cut off from Redis (closed or silent link, through a test proxy) recovers and, once
//! back, holds the same history as the others. While Redis hangs (frozen, silent or too slow)
//! no chat is lost silently: the sender of each message Redis did not confirm gets an
//! `unconfirmed` error frame, and afterwards every member saw what the history holds, in its
//! order. A hostile Redis (deep nesting, huge lengths, junk) costs a reconnect, never the
//! node; and no log line holds a bearer token, the Redis password, chat or a username.
//!
//! Each test starts its own `redis-server` (tests/common/redis.rs) on a free loopback port, so
//! the tests run in parallel. Every wait is bounded.
mod common;
#[path = "common/redis.rs"]
mod redis;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::*;
use redis::{Proxy, RedisCluster, RedisOptions, RedisServer};
use serde_json::{Value, json};

/// No chat rate limit in the way of the bursts these tests send.
const FAST: [&str; 4] = ["--chat-rate", "100000", "--chat-burst", "100000"];
/// How long a node may take to (re)connect to Redis and say so on `/health`.
const REDIS_UP_LIMIT: Duration = Duration::from_secs(10);
/// How long a node may take to report a lost Redis on `/health`.
const REDIS_DOWN_LIMIT: Duration = Duration::from_secs(10);
/// How long a node may take to reconnect after Redis restarted ("within a few seconds",
/// with a bounded backoff).
const RECOVERY_LIMIT: Duration = Duration::from_secs(20);

/// Some nodes on one Redis (or on a sharded Redis Cluster: `shards`). On a failing test,
/// prints the logs of every node and of Redis.
struct Cluster {
    nodes: Vec<Server>,
    redis: OneRedis,
    shards: Option<RedisCluster>,
}

/// The one Redis of a [`Cluster`]; there is none on a sharded Redis Cluster (a test that
/// stops "the" Redis has no meaning there).
struct OneRedis(Option<RedisServer>);

impl std::ops::Deref for OneRedis {
    type Target = RedisServer;
    fn deref(&self) -> &RedisServer {
        self.0.as_ref().expect("one Redis, not a sharded cluster")
    }
}

impl std::ops::DerefMut for OneRedis {
    fn deref_mut(&mut self) -> &mut RedisServer {
        self.0.as_mut().expect("one Redis, not a sharded cluster")
    }
}

impl Cluster {
    #[track_caller]
    fn start(n: usize, args: &[&str]) -> Cluster {
        Cluster::start_with(n, args, RedisOptions::default(), 0)
    }

    #[track_caller]
    fn start_with(n: usize, args: &[&str], opts: RedisOptions, db: u32) -> Cluster {
        let redis = RedisServer::start_with(opts);
        let urls = vec![redis.url(db); n];
        Cluster::start_nodes(redis, &urls, args)
    }

    /// One node per URL (the Redis URL, or a [`Proxy`] in front of it), all on `redis`.
    #[track_caller]
    fn start_nodes(redis: RedisServer, urls: &[String], args: &[&str]) -> Cluster {
        let mut c = Cluster {
            nodes: Vec::new(),
            redis: OneRedis(Some(redis)),
            shards: None,
        };
        c.start_each(urls, args);
        c
    }

    /// `n` nodes on a Redis Cluster of three masters (`replicas` each), every node given
    /// the seed list of all its nodes (`redis-cluster://`).
    #[track_caller]
    fn on_shards(n: usize, replicas: usize, args: &[&str]) -> Cluster {
        let rc = RedisCluster::start(3, replicas);
        let urls = vec![rc.url(); n];
        let mut c = Cluster {
            nodes: Vec::new(),
            redis: OneRedis(None),
            shards: Some(rc),
        };
        c.start_each(&urls, args);
        c
    }

    #[track_caller]
    fn start_each(&mut self, urls: &[String], args: &[&str]) {
        let c = self;
        for url in urls {
            let mut all = vec!["--redis", url.as_str()];
            all.extend_from_slice(&FAST);
            all.extend_from_slice(args);
            let s = Server::start(&all);
            c.nodes.push(s);
        }
        for i in 0..urls.len() {
            c.wait_health(i, "up", REDIS_UP_LIMIT);
        }
    }

    fn shards(&self) -> &RedisCluster {
        self.shards.as_ref().expect("a sharded Redis Cluster")
    }

    fn node(&self, i: usize) -> &Server {
        &self.nodes[i]
    }

    /// Polls `/health` on node `i` until it reports `"redis": want` (panics after `limit`).
    #[track_caller]
    fn wait_health(&self, i: usize, want: &str, limit: Duration) -> Value {
        let mut last = String::from("no answer");
        let mut found = None;
        wait_for(limit, || match health(&self.nodes[i]) {
            Some((code, v)) if v["redis"] == want => {
                found = Some((code, v));
                true
            }
            Some((code, v)) => {
                last = format!("{code} {v}");
                false
            }
            None => false,
        });
        let Some((code, v)) = found else {
            panic!(
                "node {i}: /health never said \"redis\":\"{want}\" within {limit:?}; last: {last}"
            );
        };
        if want != "up" {
            eprintln!("node {i} /health without Redis: {code} {v}");
        }
        let status = if want == "up" { "ok" } else { "degraded" };
        assert_eq!(v["status"], status, "node {i} /health: {code} {v}");
        assert!(v["version"].is_string(), "node {i} /health: {v}");
        if want == "up" {
            assert_eq!(code, 200, "node {i} /health: {v}");
        }
        v
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (i, n) in self.nodes.iter().enumerate() {
                let log = n.log();
                let lines: Vec<&str> = log.lines().collect();
                eprintln!("----- node {i} ({}) log, last 60 lines -----", n.addr);
                for l in &lines[lines.len().saturating_sub(60)..] {
                    eprintln!("{l}");
                }
            }
            if let Some(r) = &self.redis.0 {
                eprintln!("----- redis log -----\n{}", r.log_tail(30));
            }
            for n in self.shards.iter().flat_map(|rc| &rc.nodes) {
                eprintln!("----- redis :{} log -----\n{}", n.port, n.log_tail(15));
            }
        }
    }
}

/// `GET /health` → (status, JSON), `None` if the node did not answer.
fn health(s: &Server) -> Option<(u16, Value)> {
    // `Http::connect` panics when the node is gone; this asks first.
    std::net::TcpStream::connect(s.addr).ok()?;
    let r = s.http().try_get("/health")?;
    let v = serde_json::from_slice(&r.body).ok()?;
    Some((r.status, v))
}

/// The `id` of a stored message (chat, user_joined, user_left), `None` for other frames.
fn id_of(v: &Value) -> Option<&str> {
    v["id"].as_str()
}

fn ids(msgs: &[Value]) -> Vec<String> {
    msgs.iter().filter_map(id_of).map(str::to_string).collect()
}

/// A short readable form of messages for failure output.
fn brief(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .map(|m| {
            format!(
                "{}:{}:{}",
                m["type"].as_str().unwrap_or("?"),
                m["user"].as_str().unwrap_or(""),
                m["message"].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// `GET /rooms/{room}/messages?limit=1000` on `s`.
#[track_caller]
fn history(s: &Server, room: &str, sid: &str) -> Vec<Value> {
    let r = s
        .http()
        .get(&format!("/rooms/{room}/messages?limit=1000"), Some(sid));
    assert_eq!(r.status, 200, "history of {room}: {}", r.text());
    r.json()["messages"].as_array().unwrap().clone()
}

/// The messages after the one with id `since`.
#[track_caller]
fn after(msgs: &[Value], since: &str) -> Vec<Value> {
    let at = msgs
        .iter()
        .position(|m| m["id"] == since)
        .unwrap_or_else(|| panic!("{since} is not in the history {:?}", brief(msgs)));
    msgs[at + 1..].to_vec()
}

/// The sorted `user_id`s of a welcome's `users`.
fn user_ids(welcome: &Value) -> Vec<String> {
    let mut v: Vec<String> = welcome["users"]
        .as_array()
        .unwrap_or_else(|| panic!("no users: {welcome}"))
        .iter()
        .map(|u| u["user_id"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

fn sorted(ids: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// The JSON array at `key` of `GET path` (bearer `sid`) as strings; asserts 200.
#[track_caller]
fn list(s: &Server, path: &str, sid: Option<&str>, key: &str) -> Vec<String> {
    let r = s.http().get(path, sid);
    assert_eq!(r.status, 200, "GET {path} on {}: {}", s.addr, r.text());
    r.json()[key]
        .as_array()
        .unwrap_or_else(|| panic!("GET {path}: no {key}: {}", r.text()))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// `GET /rooms/{room}` → its user_count.
#[track_caller]
fn user_count(s: &Server, room: &str) -> Value {
    let r = s.http().get(&format!("/rooms/{room}"), None);
    assert_eq!(r.status, 200, "GET /rooms/{room}: {}", r.text());
    r.json()["user_count"].clone()
}

/// Polls `user_count` of `room` on `s` until it is `n`; panics after `limit`.
#[track_caller]
fn wait_count(s: &Server, room: &str, n: u64, limit: Duration) -> Duration {
    let mut last = Value::Null;
    match wait_for(limit, || {
        last = user_count(s, room);
        last == n
    }) {
        Some(t) => t,
        None => panic!(
            "user_count of {room} on {} never became {n} within {limit:?}: {last}",
            s.addr
        ),
    }
}

/// A WebSocket upgrade by hand, for its refusal: (status, body).
fn ws_refusal(s: &Server, path: &str) -> (u16, String) {
    let r = s.http().request(
        "GET",
        path,
        &[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
        None,
    );
    (r.status, r.text())
}

/// Asserts a 503 whose JSON `detail` mentions Redis.
#[track_caller]
fn assert_503_redis(what: &str, status: u16, body: &str) {
    assert_eq!(status, 503, "{what}: {status} {body}");
    let v: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {body}"));
    let detail = v["detail"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: no detail: {body}"));
    assert!(
        detail.to_ascii_lowercase().contains("redis"),
        "{what}: the detail does not mention Redis: {body}"
    );
}

/// Reads the next frame and asserts it is the `kind` notice of `uid`.
#[track_caller]
fn expect_notice(ws: &mut Ws, kind: &str, uid: &str, who: &str) -> Value {
    let v = ws
        .try_recv()
        .unwrap_or_else(|e| panic!("{who}: waiting for {kind} of {uid}: {e}"));
    assert_eq!(v["type"], kind, "{who}: {v}");
    assert_eq!(v["user_id"], uid, "{who}: {v}");
    v
}

/// Reads until the chat `text`; returns the stored frames (those with an id) read, it included.
#[track_caller]
fn stored_until(ws: &mut Ws, text: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        let v = ws
            .try_recv()
            .unwrap_or_else(|e| panic!("waiting for chat {text:?}: {e}"));
        let done = v["type"] == "chat" && v["message"] == text;
        if id_of(&v).is_some() {
            out.push(v);
        }
        if done {
            return out;
        }
    }
    panic!("chat {text:?} did not come in time");
}

/// A member of a room: name, user id and WebSocket.
struct Member {
    name: String,
    uid: String,
    ws: Ws,
}

/// Joins `member` (session already made) to `room` on node `on`, checks its welcome lists
/// every member already in (`others`, on any node) and syncs the `user_joined`: the newcomer
/// and every member in `others` get it next. Returns the welcome.
#[track_caller]
fn join_synced(
    node: &Server,
    room: &str,
    name: &str,
    sid: &str,
    uid: &str,
    others: &mut [Member],
) -> (Member, Value) {
    let (mut ws, welcome) = node.join(room, sid);
    let mut want: Vec<&str> = others.iter().map(|m| m.uid.as_str()).collect();
    want.push(uid);
    let mut want = sorted(&want);
    want.dedup();
    assert_eq!(
        user_ids(&welcome),
        want,
        "{name}'s welcome on {} lists the members of every node: {welcome}",
        node.addr
    );
    expect_notice(&mut ws, "user_joined", uid, name);
    for m in others.iter_mut() {
        expect_notice(&mut m.ws, "user_joined", uid, &m.name);
    }
    (
        Member {
            name: name.to_string(),
            uid: uid.to_string(),
            ws,
        },
        welcome,
    )
}

// ---- (1) chat across three nodes: every message once, one order for everybody -------------

#[test]
fn chat_across_three_nodes_arrives_once_and_in_one_order_for_everybody() {
    chat_across_three_nodes(Cluster::start(3, &[]));
}

/// Three nodes on a Redis Cluster of one master (all 16 384 slots), with the plain
/// `redis://` URL: every script's keys must hash to one slot (`CROSSSLOT` otherwise, even on
/// one node), as on a managed Redis with cluster mode on and one shard.
#[track_caller]
fn on_a_one_shard_redis_cluster(args: &[&str]) -> Cluster {
    let redis = RedisCluster::start(1, 0).nodes.pop().expect("its one node");
    let urls = vec![redis.url(0); 3];
    Cluster::start_nodes(redis, &urls, args)
}

#[test]
fn on_a_one_shard_redis_cluster_chat_arrives_once_and_in_one_order_for_everybody() {
    chat_across_three_nodes(on_a_one_shard_redis_cluster(&[]));
}

fn chat_across_three_nodes(c: Cluster) {
    const CLIENTS: usize = 6;
    const PER: usize = 20;
    const TOTAL: usize = CLIENTS * PER;
    let (owner, _) = c.node(0).session("owner");
    let room = c.node(0).room(&owner);

    // Client i: session made on node (i+1)%3, WebSocket on node i%3; welcome lists everyone
    // already in, on every node.
    let mut members: Vec<Member> = Vec::new();
    let mut node_of = Vec::new();
    for i in 0..CLIENTS {
        let name = format!("user{i}");
        let (sid, uid) = c.node((i + 1) % 3).session(&name);
        let (m, _) = join_synced(c.node(i % 3), &room, &name, &sid, &uid, &mut members);
        members.push(m);
        node_of.push(i % 3);
    }
    for n in &c.nodes {
        wait_count(n, &room, CLIENTS as u64, TIMEOUT);
    }
    let names: HashMap<String, String> = members
        .iter()
        .map(|m| (m.uid.clone(), m.name.clone()))
        .collect();

    // Everybody sends at once, from its own thread; then reads until it has every chat.
    let handles: Vec<_> = members
        .into_iter()
        .enumerate()
        .map(|(i, mut m)| {
            std::thread::spawn(move || {
                for k in 0..PER {
                    m.ws.chat(&format!("m{i}-{k}"));
                    std::thread::sleep(Duration::from_millis(1));
                }
                let mut got = Vec::new();
                let mut err = None;
                let deadline = Instant::now() + Duration::from_secs(30);
                while got.len() < TOTAL && Instant::now() < deadline {
                    match m.ws.try_recv() {
                        Ok(v) => got.push(v),
                        Err(e) => {
                            err = Some(e);
                            break;
                        }
                    }
                }
                // Anything more (a duplicate) would arrive now.
                let extra = m.ws.drain(Duration::from_millis(500));
                (m, got, extra, err)
            })
        })
        .collect();
    let mut results = Vec::new();
    for h in handles {
        results.push(h.join().expect("client thread"));
    }

    let mut reference: Option<Vec<String>> = None;
    for (i, (m, got, extra, err)) in results.iter().enumerate() {
        let who = format!("{} (node {})", m.name, node_of[i]);
        assert!(
            got.len() == TOTAL,
            "{who} got {} of {TOTAL} frames ({err:?}); last: {:?}",
            got.len(),
            brief(&got[got.len().saturating_sub(5)..])
        );
        assert!(extra.is_empty(), "{who} got more: {:?}", brief(extra));
        for v in got {
            assert_eq!(v["type"], "chat", "{who}: only chat expected: {v}");
            assert_eq!(v["room_id"], room.as_str(), "{who}: {v}");
            let uid = v["user_id"].as_str().unwrap();
            assert_eq!(
                Some(&v["user"].as_str().unwrap().to_string()),
                names.get(uid),
                "{who}: user matches user_id: {v}"
            );
            assert!(uuid_version(id_of(v).unwrap()).is_some(), "{who}: {v}");
        }
        // Exactly once: 120 distinct ids, 120 distinct (sender, text), each sender in order.
        let idset: BTreeSet<&str> = got.iter().filter_map(id_of).collect();
        assert_eq!(idset.len(), TOTAL, "{who}: duplicate ids");
        let mut per_sender: HashMap<String, Vec<String>> = HashMap::new();
        for v in got {
            per_sender
                .entry(v["user"].as_str().unwrap().to_string())
                .or_default()
                .push(v["message"].as_str().unwrap().to_string());
        }
        for s in 0..CLIENTS {
            let want: Vec<String> = (0..PER).map(|k| format!("m{s}-{k}")).collect();
            assert_eq!(
                per_sender.get(&format!("user{s}")),
                Some(&want),
                "{who}: user{s}'s chats, each once and in the order sent"
            );
        }
        // One order for everybody.
        let seq = ids(got);
        match &reference {
            None => reference = Some(seq),
            Some(r) => {
                if let Some(at) = (0..TOTAL).find(|&k| r[k] != seq[k]) {
                    panic!(
                        "{who} sees another order than user0 from position {at}: {:?} vs {:?}",
                        brief(&got[at..(at + 5).min(TOTAL)]),
                        brief(&results[0].1[at..(at + 5).min(TOTAL)])
                    );
                }
            }
        }
    }
    let order = reference.unwrap();
    let chats = &results[0].1;

    // History (in Redis) holds the same 120 chats in the same order, on every node.
    for (n, node) in c.nodes.iter().enumerate() {
        let all = history(node, &room, &owner);
        let hist_chats: Vec<Value> = all
            .iter()
            .filter(|m| m["type"] == "chat")
            .cloned()
            .collect();
        assert_eq!(
            ids(&hist_chats),
            order,
            "node {n}: history order differs from the delivered order"
        );
        assert_eq!(
            ids(&all[all.len() - TOTAL..]),
            order,
            "node {n}: the chats are the newest messages"
        );
    }

    // Reconnecting with since=<the 60th chat> on any node gives exactly what followed.
    let since = chats[TOTAL / 2 - 1]["id"].as_str().unwrap().to_string();
    let mut probes = Vec::new();
    for (n, node) in c.nodes.iter().enumerate() {
        let want = after(&history(node, &room, &owner), &since);
        let (sid, _) = node.session(&format!("late{n}"));
        let (mut ws, welcome) = node.join_query(&room, &format!("session_id={sid}&since={since}"));
        let got = welcome["messages"].as_array().unwrap();
        // The previous probe's `user_joined` may reach this node between the two reads, so
        // compare the chats (all 60 must follow, nothing else but notices).
        let chats_of = |v: &[Value]| -> Vec<Value> {
            v.iter().filter(|m| m["type"] == "chat").cloned().collect()
        };
        assert_eq!(
            ids(&chats_of(got)),
            ids(&chats_of(&want)),
            "node {n}: since gives exactly the later messages: {:?}",
            brief(got)
        );
        assert_eq!(got[..TOTAL / 2], chats[TOTAL / 2..], "node {n}");
        assert!(
            welcome.get("truncated").is_none_or(|t| t == false),
            "{welcome}"
        );
        ws.recv_type("user_joined");
        probes.push(ws);
    }
}

// ---- (2) REST on any node ----------------------------------------------------------------

#[test]
fn sessions_rooms_and_history_work_on_every_node() {
    sessions_rooms_and_history(Cluster::start(3, &["--room-list"]));
}

#[test]
fn on_a_one_shard_redis_cluster_sessions_rooms_and_history_work_on_every_node() {
    sessions_rooms_and_history(on_a_one_shard_redis_cluster(&["--room-list"]));
}

/// Three nodes on a Redis Cluster of three masters (`redis-cluster://` seeds): the same
/// scenarios as on one Redis, with rooms and sessions spread over the shards.
#[test]
fn on_a_sharded_redis_cluster_chat_arrives_once_and_in_one_order_for_everybody() {
    chat_across_three_nodes(Cluster::on_shards(3, 0, &[]));
}

#[test]
fn on_a_sharded_redis_cluster_sessions_rooms_and_history_work_on_every_node() {
    let c = Cluster::on_shards(3, 0, &["--room-list"]);
    // Rooms land on every shard (a room's keys all in its own slot).
    let (sid, _) = c.node(0).session("spreader");
    for _ in 0..12 {
        c.node(1).room(&sid);
    }
    for n in &c.shards().nodes {
        let keys = n.command(0, &["DBSIZE"]).expect("DBSIZE");
        assert_ne!(keys, "0", "master :{} holds no key", n.port);
    }
    sessions_rooms_and_history(c);
}

fn sessions_rooms_and_history(c: Cluster) {
    let (a, b, cc) = (c.node(0), c.node(1), c.node(2));

    // A session made on A works on every node.
    let (alice, alice_uid) = a.session("alice");
    for n in &c.nodes {
        let r = n.http().get("/sessions/me", Some(&alice));
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["session_id"], alice.as_str(), "{v}");
        assert_eq!(v["username"], "alice", "{v}");
        assert_eq!(v["joined_rooms"], json!([]), "{v}");
    }

    // A room made on B (with A's session) is listed everywhere and is alice's everywhere.
    let room = b.room(&alice);
    for (i, n) in c.nodes.iter().enumerate() {
        assert!(
            list(n, "/rooms/all", None, "rooms").contains(&room),
            "node {i}: /rooms/all lists {room}"
        );
        let r = n.http().get(&format!("/rooms/{room}"), None);
        assert_eq!(r.status, 200, "node {i}: {}", r.text());
        assert_eq!(
            r.json(),
            json!({"room_id": room, "exists": true, "user_count": 0}),
            "node {i}"
        );
        assert_eq!(
            list(n, "/sessions/me", Some(&alice), "joined_rooms"),
            vec![room.clone()],
            "node {i}"
        );
        assert_eq!(
            list(n, "/rooms", Some(&alice), "rooms"),
            vec![room.clone()],
            "node {i}"
        );
    }

    // bob (session on C) joins over REST on A; every node knows.
    let (bob, bob_uid) = cc.session("bob");
    let r = a
        .http()
        .call("POST", &format!("/rooms/{room}/join"), Some(&bob));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["message"], format!("Joined room {room}"));
    for (i, n) in c.nodes.iter().enumerate() {
        assert_eq!(
            list(n, "/sessions/me", Some(&bob), "joined_rooms"),
            vec![room.clone()],
            "node {i}"
        );
        assert_eq!(
            list(n, "/rooms", Some(&bob), "rooms"),
            vec![room.clone()],
            "node {i}"
        );
        // An unknown room is unknown everywhere.
        let r = n.http().call("POST", "/rooms/0123456789/join", Some(&bob));
        assert_eq!(r.status, 404, "node {i}: {}", r.text());
        assert_eq!(n.status("/rooms/0123456789"), 404, "node {i}");
        assert_eq!(
            n.ws(&format!("/ws/0123456789?session_id={bob}")).err(),
            Some(404),
            "node {i}"
        );
    }

    // WebSockets: alice on A, bob on C; user_count counts both on every node.
    let mut members = Vec::new();
    let (m, _) = join_synced(a, &room, "alice", &alice, &alice_uid, &mut members);
    members.push(m);
    let (m, welcome_b) = join_synced(cc, &room, "bob", &bob, &bob_uid, &mut members);
    members.push(m);
    let hist = welcome_b["messages"].as_array().unwrap();
    assert_eq!(brief(hist), ["user_joined:alice:alice has joined"]);
    for n in &c.nodes {
        wait_count(n, &room, 2, TIMEOUT);
    }

    // Chat both ways.
    let (ma, mb) = members.split_at_mut(1);
    let (wa, wb) = (&mut ma[0].ws, &mut mb[0].ws);
    wa.chat("hello from A");
    let c1 = wa.recv_chat("hello from A");
    assert_eq!(wb.recv(), c1);
    wb.chat("hello from C");
    let c2 = wb.recv_chat("hello from C");
    assert_eq!(wa.recv(), c2);

    // History from B, which has no member in the room, with a session made on C.
    let all = history(b, &room, &bob);
    assert_eq!(
        brief(&all),
        [
            "user_joined:alice:alice has joined",
            "user_joined:bob:bob has joined",
            "chat:alice:hello from A",
            "chat:bob:hello from C",
        ]
    );
    assert_eq!(all[2], c1);
    assert_eq!(all[3], c2);
    let r = b
        .http()
        .get(&format!("/rooms/{room}/messages?limit=2"), Some(&alice));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["messages"], json!([c1, c2]));

    // alice's session ended on B: her socket on A closes with 1000, bob (on C) sees her leave,
    // and the session is 401 on every node.
    let r = b.http().call("DELETE", "/sessions/me", Some(&alice));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"message": "Session ended"}));
    assert_eq!(
        wa.close_code(),
        Some(1000),
        "alice's WebSocket on A closes with 1000"
    );
    let left = wb.recv_type("user_left");
    assert_eq!(left["user_id"], alice_uid.as_str(), "{left}");
    for (i, n) in c.nodes.iter().enumerate() {
        let r = n.http().get("/sessions/me", Some(&alice));
        assert_eq!(r.status, 401, "node {i}: {}", r.text());
        assert_eq!(n.http().get("/rooms", Some(&alice)).status, 401, "node {i}");
        assert_eq!(
            n.ws(&format!("/ws/{room}?session_id={alice}")).err(),
            Some(403),
            "node {i}"
        );
        wait_count(n, &room, 1, TIMEOUT);
        assert_eq!(n.http().get("/sessions/me", Some(&bob)).status, 200);
    }
}

#[test]
fn the_database_in_the_url_is_the_one_used() {
    let c = Cluster::start_with(2, &[], RedisOptions::default(), 5);
    let (sid, _) = c.node(0).session("alice");
    let room = c.node(1).room(&sid);
    let (_ws, _) = c.node(0).join(&room, &sid);
    let in_db = |db| {
        c.redis
            .command(db, &["DBSIZE"])
            .unwrap_or_else(|e| panic!("DBSIZE in {db}: {e}"))
            .parse::<u64>()
            .unwrap()
    };
    assert!(in_db(5) > 0, "nothing stored in database 5");
    assert_eq!(in_db(0), 0, "keys stored in database 0 instead of 5");
}

// ---- (3) a node dies ---------------------------------------------------------------------

#[test]
fn clients_of_a_killed_node_reconnect_elsewhere_lose_nothing_and_its_members_leave_presence() {
    let mut c = Cluster::start(3, &["--presence-ttl", "2s"]);
    let (sb, bob_uid) = c.node(1).session("bob");
    let room = c.node(1).room(&sb);
    let (sc, carol_uid) = c.node(2).session("carol");
    let (sa, alice_uid) = c.node(0).session("alice");
    let (sd, dave_uid) = c.node(0).session("dave");
    let (sf, frank_uid) = c.node(0).session("frank");

    let mut m: Vec<Member> = Vec::new();
    for (node, name, sid, uid) in [
        (1, "bob", &sb, &bob_uid),
        (2, "carol", &sc, &carol_uid),
        (0, "alice", &sa, &alice_uid),
        (0, "dave", &sd, &dave_uid),
        (0, "frank", &sf, &frank_uid),
    ] {
        let (member, _) = join_synced(c.node(node), &room, name, sid, uid, &mut m);
        m.push(member);
    }
    for n in &c.nodes {
        wait_count(n, &room, 5, TIMEOUT);
    }
    // Some chat from every node; everybody reads all of it.
    let mut seen: Vec<Vec<Value>> = vec![Vec::new(); m.len()];
    for (i, text) in [(2, "before-alice"), (0, "before-bob"), (1, "before-carol")] {
        m[i].ws.chat(text);
        for (j, mj) in m.iter_mut().enumerate() {
            let v = mj.ws.recv();
            assert_eq!(v["message"], text, "{}: {v}", mj.name);
            seen[j].push(v);
        }
    }
    let last_alice = seen[2].last().unwrap()["id"].as_str().unwrap().to_string();
    let last_dave = seen[3].last().unwrap()["id"].as_str().unwrap().to_string();

    // Node A (alice, dave, frank) dies.
    let killed_at = Instant::now();
    assert!(
        c.nodes[0]
            .signal_and_wait("KILL", Duration::from_secs(5))
            .is_some(),
        "node A did not die"
    );
    let mut frank = m.pop().unwrap();
    let mut dave = m.pop().unwrap();
    let mut alice = m.pop().unwrap();
    assert!(alice.ws.try_recv().is_err(), "alice's socket is gone");
    assert!(dave.ws.try_recv().is_err());
    assert!(frank.ws.try_recv().is_err());

    // bob and carol keep chatting meanwhile.
    m[0].ws.chat("during-bob");
    m[1].ws.chat("during-carol");
    let during_b = m[0].ws.recv_chat("during-bob");
    let during_c = m[1].ws.recv_chat("during-carol");

    // alice comes back on B, dave on C, each with since=<last id seen>.
    let (b, cc) = (c.node(1), c.node(2));
    let (wa, welcome_a) = b.join_query(&room, &format!("session_id={sa}&since={last_alice}"));
    let (wd, welcome_d) = cc.join_query(&room, &format!("session_id={sd}&since={last_dave}"));
    alice.ws = wa;
    dave.ws = wd;
    for (who, welcome) in [("alice", &welcome_a), ("dave", &welcome_d)] {
        let got = welcome["messages"].as_array().unwrap();
        let texts: Vec<&str> = got
            .iter()
            .filter(|v| v["type"] == "chat")
            .map(|v| v["message"].as_str().unwrap())
            .collect();
        assert!(
            texts.contains(&"during-bob") && texts.contains(&"during-carol"),
            "{who}'s welcome has the chats sent while it was away: {:?}",
            brief(got)
        );
        assert!(
            got.contains(&during_b) && got.contains(&during_c),
            "{who}: {:?}",
            brief(got)
        );
        assert!(
            welcome.get("truncated").is_none_or(|t| t == false),
            "{welcome}"
        );
    }

    // frank's (and the dead connections') presence expires: alice, dave, bob, carol remain.
    for n in [b, cc] {
        wait_count(n, &room, 4, Duration::from_secs(10));
    }
    eprintln!(
        "presence of the killed node's members gone {:?} after the kill",
        killed_at.elapsed()
    );

    // Nothing lost, nothing twice: for alice and dave, welcome + live frames up to a marker
    // chat = the history after their last id up to that marker.
    alice.ws.chat("marker");
    let mut live: Vec<Vec<Value>> = Vec::new();
    for mj in [&mut alice, &mut dave] {
        live.push(stored_until(&mut mj.ws, "marker"));
    }
    for mj in m.iter_mut() {
        mj.ws.recv_chat("marker");
    }
    let all = history(cc, &room, &sc);
    for (k, (who, welcome, since)) in [
        ("alice", &welcome_a, &last_alice),
        ("dave", &welcome_d, &last_dave),
    ]
    .into_iter()
    .enumerate()
    {
        let mut want = after(&all, since);
        let end = want
            .iter()
            .position(|v| v["message"] == "marker")
            .expect("the marker is in the history");
        want.truncate(end + 1);
        let mut got = welcome["messages"].as_array().unwrap().clone();
        got.extend(live[k].iter().cloned());
        assert_eq!(
            ids(&got),
            ids(&want),
            "{who}: welcome + live frames vs the history after its last id:\n got  {:?}\n want {:?}",
            brief(&got),
            brief(&want)
        );
    }
    // And since=<alice's last id> on either live node gives exactly the history after it.
    // (Each probe stays open until the end, and its own user_joined is read, so that the
    // history is settled before the next probe reads it.)
    let mut probes = Vec::new();
    for n in [b, cc] {
        let want = after(&history(n, &room, &sb), &last_alice);
        let (mut ws, w) = n.join_query(&room, &format!("session_id={sa}&since={last_alice}"));
        let got = w["messages"].as_array().unwrap();
        assert_eq!(
            ids(got),
            ids(&want),
            "since on {}:\n got  {:?}\n want {:?}",
            n.addr,
            brief(got),
            brief(&want)
        );
        ws.recv_type("user_joined");
        probes.push(ws);
    }

    // A newcomer's welcome lists the live members only: frank is gone.
    let (se, eve_uid) = cc.session("eve");
    let (_we, welcome_e) = b.join(&room, &se);
    assert_eq!(
        user_ids(&welcome_e),
        sorted(&[&alice_uid, &bob_uid, &carol_uid, &dave_uid, &eve_uid]),
        "{welcome_e}"
    );
}

#[test]
fn a_client_that_reconnects_to_another_node_sees_every_stored_message_exactly_once() {
    let mut c = Cluster::start(2, &["--presence-ttl", "2s"]);
    let (sa, alice_uid) = c.node(0).session("alice");
    let (sb, bob_uid) = c.node(1).session("bob");
    let room = c.node(0).room(&sa);
    let mut m: Vec<Member> = Vec::new();
    let (mb, _) = join_synced(c.node(1), &room, "bob", &sb, &bob_uid, &mut m);
    m.push(mb);
    let (ma, _) = join_synced(c.node(0), &room, "alice", &sa, &alice_uid, &mut m);
    m.push(ma);
    let mut alice = m.pop().unwrap();
    let mut bob = m.pop().unwrap();
    // bob records every stored frame from here on.
    let mut bob_seen: Vec<Value> = Vec::new();
    alice.ws.chat("a1");
    let last = alice.ws.recv_chat("a1");
    bob_seen.push(bob.ws.recv());
    assert!(
        c.nodes[0]
            .signal_and_wait("KILL", Duration::from_secs(5))
            .is_some()
    );
    for k in 0..10 {
        bob.ws.chat(&format!("b{k}"));
    }
    // bob reads his ten chats (and whatever notices come meanwhile).
    while bob_seen.iter().filter(|v| v["type"] == "chat").count() < 11 {
        bob_seen.push(bob.ws.recv());
    }
    let since = last["id"].as_str().unwrap();
    let (mut ws, welcome) = c
        .node(1)
        .join_query(&room, &format!("session_id={sa}&since={since}"));
    // alice's stream = welcome messages, then live frames; bob's = what he saw after a1.
    let mut alice_stream: Vec<Value> = welcome["messages"].as_array().unwrap().clone();
    // Wait for alice's old connection to leave presence, so any user_left for it is in.
    wait_count(c.node(1), &room, 2, Duration::from_secs(10));
    bob.ws.chat("done");
    loop {
        let v = ws.recv();
        let done = v["message"] == "done";
        if id_of(&v).is_some() {
            alice_stream.push(v);
        }
        if done {
            break;
        }
    }
    loop {
        let v = bob.ws.recv();
        let done = v["message"] == "done";
        if id_of(&v).is_some() {
            bob_seen.push(v);
        }
        if done {
            break;
        }
    }
    // bob saw a1 first, then everything after it; alice must have the same after a1.
    let bob_after: Vec<Value> = bob_seen[1..].to_vec();
    assert_eq!(
        ids(&alice_stream),
        ids(&bob_after),
        "alice (welcome + live) vs bob:\n alice {:?}\n bob   {:?}",
        brief(&alice_stream),
        brief(&bob_after)
    );
    let all = history(c.node(1), &room, &sb);
    assert_eq!(ids(&after(&all, since)), ids(&bob_after), "history agrees");
}

// ---- (4) Redis goes away and comes back --------------------------------------------------

#[test]
fn without_redis_nodes_stay_up_refuse_with_503_chat_locally_then_recover() {
    let mut c = Cluster::start_with(
        2,
        &["--presence-ttl", "2s"],
        RedisOptions {
            appendonly: true,
            ..Default::default()
        },
        0,
    );
    let (sa, alice_uid) = c.node(0).session("alice");
    let (sb, bob_uid) = c.node(0).session("bob");
    let (sc, carol_uid) = c.node(1).session("carol");
    let room = c.node(0).room(&sa);
    let mut m: Vec<Member> = Vec::new();
    for (node, name, sid, uid) in [
        (0, "alice", &sa, &alice_uid),
        (0, "bob", &sb, &bob_uid),
        (1, "carol", &sc, &carol_uid),
    ] {
        let (member, _) = join_synced(c.node(node), &room, name, sid, uid, &mut m);
        m.push(member);
    }
    // Chat crosses nodes before the outage.
    m[0].ws.chat("before");
    for mj in m.iter_mut() {
        mj.ws.recv_chat("before");
    }

    c.redis.stop();
    for i in 0..2 {
        c.wait_health(i, "down", REDIS_DOWN_LIMIT);
    }
    for (i, n) in c.nodes.iter().enumerate() {
        assert_eq!(n.status("/ping"), 200, "node {i} is up");
        let r = n
            .http()
            .post_json("/sessions", r#"{"username":"zed"}"#, None);
        assert_503_redis(&format!("node {i}: POST /sessions"), r.status, &r.text());
        let (status, body) = ws_refusal(n, &format!("/ws/{room}?session_id={sa}"));
        assert_503_redis(&format!("node {i}: WebSocket join"), status, &body);
    }

    // Local chat on node A goes on: alice → alice and bob, each once.
    m[0].ws.chat("local-1");
    let l1 = m[0].ws.recv_chat("local-1");
    let got = m[1].ws.recv_chat("local-1");
    assert_eq!(got["user_id"], alice_uid.as_str(), "{got}");
    assert_eq!(got["id"], l1["id"], "the same message for both");
    m[1].ws.chat("local-2");
    m[0].ws.recv_chat("local-2");
    m[1].ws.recv_chat("local-2");
    for mj in m[..2].iter_mut() {
        let more = mj.ws.drain(Duration::from_millis(300));
        assert!(
            more.iter()
                .all(|v| v["message"] != "local-1" && v["message"] != "local-2"),
            "{}: local chat delivered twice: {:?}",
            mj.name,
            brief(&more)
        );
    }
    for (i, n) in c.nodes.iter().enumerate() {
        assert_eq!(n.status("/ping"), 200, "node {i} is still up");
    }

    // Redis is back on the same port: both nodes reconnect on their own.
    c.redis.restart();
    for i in 0..2 {
        c.wait_health(i, "up", RECOVERY_LIMIT);
    }
    // New sessions work again, on both nodes.
    let (sd, dave_uid) = c.node(1).session("dave");
    let (_se, _) = c.node(0).session("eve");

    // Chat crosses nodes again. A node may still be re-subscribing right after /health
    // turned up: probe (bounded) until one chat from A reaches carol on B.
    let crossed = wait_for(Duration::from_secs(10), || {
        m[0].ws.chat("probe");
        m[2].ws.recv_within(Duration::from_millis(300)).is_some()
    });
    assert!(
        crossed.is_some(),
        "after Redis came back, chat from node A never reached node B"
    );
    for mj in m.iter_mut() {
        mj.ws.drain(Duration::from_millis(300));
    }
    m[0].ws.chat("after-A");
    for mj in m.iter_mut() {
        mj.ws.recv_chat("after-A");
    }
    m[2].ws.chat("after-B");
    for mj in m.iter_mut() {
        mj.ws.recv_chat("after-B");
    }
    for mj in m.iter_mut() {
        let more = mj.ws.drain(Duration::from_millis(300));
        assert!(
            more.iter()
                .all(|v| v["message"] != "after-A" && v["message"] != "after-B"),
            "{}: delivered twice after recovery: {:?}",
            mj.name,
            brief(&more)
        );
    }
    // A new member joins on B (the room survived in Redis) and chats with A.
    let (mut wd, _) = c.node(1).join(&room, &sd);
    let joined = wd.recv_type("user_joined");
    assert_eq!(joined["user_id"], dave_uid.as_str(), "{joined}");
    wd.chat("hello from dave");
    wd.recv_chat("hello from dave");
    for mj in m.iter_mut() {
        mj.ws.recv_chat("hello from dave");
    }
    for (i, n) in c.nodes.iter().enumerate() {
        wait_count(n, &room, 4, Duration::from_secs(10));
        assert_eq!(
            n.http().get("/sessions/me", Some(&sa)).status,
            200,
            "node {i}"
        );
    }
}

/// Sends `probe` chats from `from` (bounded) until one reaches `to`; returns every frame `to`
/// read meanwhile. For right after a recovery, while a node may still be resubscribing.
#[track_caller]
fn probe_until_crossed(from: &mut Member, to: &mut Member, probe: &str) -> Vec<Value> {
    let mut seen = Vec::new();
    let crossed = wait_for(Duration::from_secs(10), || {
        from.ws.chat(probe);
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(300) {
            match to.ws.recv_within(Duration::from_millis(300)) {
                Some(v) => {
                    let hit = v["message"] == probe;
                    seen.push(v);
                    if hit {
                        return true;
                    }
                }
                None => break,
            }
        }
        false
    });
    assert!(
        crossed.is_some(),
        "{probe}: no chat from {} reached {} within 10 s; {} got {:?}",
        from.name,
        to.name,
        to.name,
        brief(&seen)
    );
    seen.extend(to.ws.drain(Duration::from_millis(300)));
    from.ws.drain(Duration::from_millis(300));
    seen
}

/// Node A reaches Redis through a [`Proxy`], node B directly; alice is on A, carol on B, and
/// a chat "before" from alice reached both.
struct Pair {
    c: Cluster,
    proxy: Proxy,
    room: String,
    alice: Member,
    carol: Member,
    before: Value,
}

#[track_caller]
fn proxied_pair(args: &[&str]) -> Pair {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr());
    let urls = [proxy.url(0), redis.url(0)];
    let c = Cluster::start_nodes(redis, &urls, args);
    let (sa, alice_uid) = c.node(0).session("alice");
    let (sc, carol_uid) = c.node(1).session("carol");
    let room = c.node(1).room(&sc);
    let mut m = Vec::new();
    let (ma, _) = join_synced(c.node(0), &room, "alice", &sa, &alice_uid, &mut m);
    m.push(ma);
    let (mc, _) = join_synced(c.node(1), &room, "carol", &sc, &carol_uid, &mut m);
    m.push(mc);
    let mut carol = m.pop().unwrap();
    let mut alice = m.pop().unwrap();
    alice.ws.chat("before");
    let before = alice.ws.recv_chat("before");
    assert_eq!(carol.ws.recv(), before);
    Pair {
        c,
        proxy,
        room,
        alice,
        carol,
        before,
    }
}

/// A is cut off from Redis while carol (on B) sends two chats; then A's link heals and chat
/// crosses again. Returns the pair and every frame alice read after "before".
#[track_caller]
fn cut_off_while_the_other_node_chats() -> (Pair, Vec<Value>) {
    let mut p = proxied_pair(&[]);
    p.proxy.cut();
    p.c.wait_health(0, "down", REDIS_DOWN_LIMIT);
    p.c.wait_health(1, "up", REDIS_UP_LIMIT);
    p.carol.ws.chat("while-cut-1");
    p.carol.ws.recv_chat("while-cut-1");
    p.carol.ws.chat("while-cut-2");
    p.carol.ws.recv_chat("while-cut-2");
    let mut seen = p.alice.ws.drain(Duration::from_millis(300));
    p.proxy.restore();
    p.c.wait_health(0, "up", RECOVERY_LIMIT);
    seen.extend(probe_until_crossed(
        &mut p.carol,
        &mut p.alice,
        "probe-to-A",
    ));
    probe_until_crossed(&mut p.alice, &mut p.carol, "probe-to-B");
    (p, seen)
}

#[test]
fn after_a_node_was_cut_off_from_redis_since_gives_the_same_messages_on_every_node() {
    let (p, _) = cut_off_while_the_other_node_chats();
    let since = p.before["id"].as_str().unwrap();
    let (pa, _) = p.c.node(0).session("probe-a");
    let (pb, _) = p.c.node(1).session("probe-b");
    let (mut wa, welcome_a) =
        p.c.node(0)
            .join_query(&p.room, &format!("session_id={pa}&since={since}"));
    let joined_a = wa.recv_type("user_joined");
    let (_wb, welcome_b) =
        p.c.node(1)
            .join_query(&p.room, &format!("session_id={pb}&since={since}"));
    let got_a = welcome_a["messages"].as_array().unwrap().clone();
    let got_b = welcome_b["messages"].as_array().unwrap().clone();
    let mut want_b = got_a.clone();
    want_b.push(joined_a);
    assert_eq!(
        ids(&got_b),
        ids(&want_b),
        "since=<before> on A and on B differ:\n A {:?}\n B {:?}",
        brief(&got_a),
        brief(&got_b)
    );
    for text in ["while-cut-1", "while-cut-2"] {
        assert_eq!(
            got_a.iter().filter(|v| v["message"] == text).count(),
            1,
            "since on A: {text} once: {:?}",
            brief(&got_a)
        );
    }
}

#[test]
fn a_member_of_a_node_that_was_cut_off_from_redis_gets_what_it_missed_once() {
    let (_p, seen) = cut_off_while_the_other_node_chats();
    for text in ["while-cut-1", "while-cut-2"] {
        assert_eq!(
            seen.iter().filter(|v| v["message"] == text).count(),
            1,
            "alice (on A) gets carol's {text} once after A is back: {:?}",
            brief(&seen)
        );
    }
}

#[test]
fn a_node_whose_redis_link_goes_silent_turns_degraded_then_recovers() {
    let mut p = proxied_pair(&["--presence-ttl", "3s"]);
    p.proxy.stall();
    // No RST, no FIN: only the missing replies tell.
    p.c.wait_health(0, "down", Duration::from_secs(30));
    p.c.wait_health(1, "up", REDIS_UP_LIMIT);
    let r =
        p.c.node(0)
            .http()
            .post_json("/sessions", r#"{"username":"zed"}"#, None);
    assert_503_redis("A: POST /sessions", r.status, &r.text());
    assert_eq!(p.c.node(1).session("zed").0.len(), 36);
    p.proxy.restore();
    p.c.wait_health(0, "up", RECOVERY_LIMIT);
    p.c.node(0).session("after");
    probe_until_crossed(&mut p.carol, &mut p.alice, "probe-to-A");
    probe_until_crossed(&mut p.alice, &mut p.carol, "probe-to-B");
}

#[test]
fn redis_restarted_empty_gets_back_the_sessions_rooms_and_presence_the_nodes_hold() {
    let mut c = Cluster::start(2, &["--presence-ttl", "2s"]);
    let (sa, alice_uid) = c.node(0).session("alice");
    let (sb, bob_uid) = c.node(1).session("bob");
    let room = c.node(0).room(&sa);
    let mut m = Vec::new();
    let (ma, _) = join_synced(c.node(0), &room, "alice", &sa, &alice_uid, &mut m);
    m.push(ma);
    let (mb, _) = join_synced(c.node(1), &room, "bob", &sb, &bob_uid, &mut m);
    m.push(mb);
    c.redis.stop();
    for i in 0..2 {
        c.wait_health(i, "down", REDIS_DOWN_LIMIT);
    }
    c.redis.restart(); // without --appendonly: empty
    assert_eq!(c.redis.command(0, &["DBSIZE"]).as_deref(), Ok("0"));
    for i in 0..2 {
        c.wait_health(i, "up", RECOVERY_LIMIT);
    }
    // Sessions with an open socket, rooms with members and presence are written back.
    for (i, n) in c.nodes.iter().enumerate() {
        for sid in [&sa, &sb] {
            assert!(
                wait_for(TIMEOUT, || n.http().get("/sessions/me", Some(sid)).status
                    == 200)
                .is_some(),
                "node {i}: a session with an open socket works again"
            );
        }
        assert!(
            wait_for(TIMEOUT, || n.status(&format!("/rooms/{room}")) == 200).is_some(),
            "node {i}: the room exists again"
        );
        wait_count(n, &room, 2, Duration::from_secs(10));
    }
    let (mut bob, mut alice) = (m.pop().unwrap(), m.pop().unwrap());
    probe_until_crossed(&mut alice, &mut bob, "probe-to-B");
    probe_until_crossed(&mut bob, &mut alice, "probe-to-A");
    // A newcomer on B sees both.
    let (sd, dave_uid) = c.node(1).session("dave");
    let (_wd, welcome) = c.node(1).join(&room, &sd);
    assert_eq!(
        user_ids(&welcome),
        sorted(&[&alice_uid, &bob_uid, &dave_uid]),
        "{welcome}"
    );
}

// ---- a node stops ------------------------------------------------------------------------

#[test]
fn a_node_stopped_with_sigterm_closes_with_1001_and_its_members_leave_at_once() {
    // Default --presence-ttl (15 s): leaving must not wait for it.
    let mut c = Cluster::start(2, &[]);
    let (sa, alice_uid) = c.node(0).session("alice");
    let (sb, bob_uid) = c.node(1).session("bob");
    let room = c.node(1).room(&sb);
    let mut m = Vec::new();
    let (ma, _) = join_synced(c.node(0), &room, "alice", &sa, &alice_uid, &mut m);
    m.push(ma);
    let (mb, _) = join_synced(c.node(1), &room, "bob", &sb, &bob_uid, &mut m);
    m.push(mb);
    let (mut bob, mut alice) = (m.pop().unwrap(), m.pop().unwrap());
    let status = c.nodes[0].signal_and_wait("TERM", Duration::from_secs(5));
    assert!(
        status.is_some_and(|s| s.success()),
        "node A exits 0: {status:?}"
    );
    assert_eq!(alice.ws.close_code(), Some(1001));
    let left = bob.ws.recv_type("user_left");
    assert_eq!(left["user_id"], alice_uid.as_str(), "{left}");
    wait_count(c.node(1), &room, 1, Duration::from_secs(5));
    let (sd, dave_uid) = c.node(1).session("dave");
    let (_wd, welcome) = c.node(1).join(&room, &sd);
    assert_eq!(user_ids(&welcome), sorted(&[&bob_uid, &dave_uid]));
}

// ---- (5) typing --------------------------------------------------------------------------

/// Three nodes, alice on A, bob on B, carol on C, all joined and synced.
fn three_typists(extra: &[&str]) -> (Cluster, Vec<Member>) {
    let mut args = vec!["--typing-quiet", "30s"];
    args.extend_from_slice(extra);
    let c = Cluster::start(3, &args);
    let sessions = [
        c.node(0).session("alice"),
        c.node(1).session("bob"),
        c.node(2).session("carol"),
    ];
    let room = c.node(1).room(&sessions[0].0);
    let mut m: Vec<Member> = Vec::new();
    for (i, name) in ["alice", "bob", "carol"].into_iter().enumerate() {
        let (sid, uid) = &sessions[i];
        let (member, _) = join_synced(c.node(i), &room, name, sid, uid, &mut m);
        m.push(member);
    }
    (c, m)
}

#[test]
fn typing_reaches_the_other_members_on_every_node_but_not_the_sender() {
    let (_c, mut m) = three_typists(&[]);
    for typist in 0..3 {
        m[typist].ws.send_json(json!({"type": "typing"}));
        let (name, uid) = (m[typist].name.clone(), m[typist].uid.clone());
        for (j, mj) in m.iter_mut().enumerate() {
            if j == typist {
                continue;
            }
            let v = mj
                .ws
                .recv_within(TIMEOUT)
                .unwrap_or_else(|| panic!("{}: no typing from {name}", mj.name));
            assert_eq!(v["type"], "typing", "{}: {v}", mj.name);
            assert_eq!(v["user"], name.as_str(), "{v}");
            assert_eq!(v["user_id"], uid.as_str(), "{v}");
        }
        // Once each, and never to the sender.
        for mj in m.iter_mut() {
            mj.ws.expect_silence(Duration::from_millis(500));
        }
    }
}

#[test]
fn typing_stopped_crosses_nodes_before_the_chat_that_ends_the_typing() {
    let (_c, mut m) = three_typists(&[]);
    m[0].ws.send_json(json!({"type": "typing"}));
    for mj in m[1..].iter_mut() {
        let v = mj.ws.recv();
        assert_eq!(v["type"], "typing", "{}: {v}", mj.name);
    }
    m[0].ws.chat("done typing");
    let alice_uid = m[0].uid.clone();
    for mj in m[1..].iter_mut() {
        let v = mj.ws.recv();
        assert_eq!(v["type"], "typing_stopped", "{}: {v}", mj.name);
        assert_eq!(v["user_id"], alice_uid.as_str(), "{v}");
        let v = mj.ws.recv();
        assert_eq!(v["message"], "done typing", "{}: {v}", mj.name);
    }
    // The sender gets its chat, not its own typing_stopped.
    let v = m[0].ws.recv();
    assert_eq!(v["message"], "done typing", "alice: {v}");
}

// ---- issue 12: presence churn in cluster mode -------------------------------------------

/// Churn (a client connecting and closing in a loop, on one node) leaves the chat in Redis's
/// history: the script bounds notices on their own, so a `since` catch-up on another node
/// (which loads the history from Redis) still returns every chat.
#[test]
fn presence_churn_leaves_chat_in_the_shared_history() {
    let c = Cluster::start(2, &["--history", "50"]);
    let (a, b) = (c.node(0), c.node(1));
    let (alice, _) = a.session("alice");
    // Ten sessions, so that the churn is not just refused for the upgrade budget.
    let mallory: Vec<String> = (0..10).map(|i| a.session(&format!("m{i}")).0).collect();
    let room = a.room(&alice);
    let (mut wa, _) = a.join(&room, &alice);
    let texts: Vec<String> = (0..50).map(|i| format!("chat {i}")).collect();
    for t in &texts {
        wa.chat(t);
    }
    let first = wa.recv_chat(&texts[0]);
    wa.recv_chat(&texts[49]);
    drop(wa);

    for i in 0..200 {
        let (ws, _) = a.join(&room, &mallory[i % 10]);
        drop(ws);
    }
    wait_for(TIMEOUT, || user_count(a, &room) == 0).expect("the churn sockets closed");

    // Redis keeps the 50 chats and at most --history-notices (100) notices.
    let len: usize = c
        .redis
        .command(0, &["LLEN", &format!("chatloop:{{r:{room}}}:h")])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        (50..=150).contains(&len),
        "the history of {room} has {len} entries"
    );

    // alice catches up on node B (not subscribed there: it loads the history from Redis).
    let since = first["id"].as_str().unwrap();
    let (mut wb, welcome) = b.join_query(&room, &format!("session_id={alice}&since={since}"));
    let got: Vec<&str> = welcome["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["type"] == "chat")
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(got, texts[1..], "{welcome}");
    let all = history(b, &room, &alice);
    assert_eq!(
        all.iter().filter(|m| m["type"] == "chat").count(),
        50,
        "REST on node B"
    );
    wb.chat_roundtrip("alice is fine");
}

// ---- (6) Redis hangs: no chat is lost silently ---------------------------------------------

/// What a member read: every frame, in order.
struct Seen {
    name: String,
    frames: Vec<Value>,
}

impl Seen {
    /// The ids of the chats among `texts` it got as chat frames, in the order they came.
    fn chats(&self, texts: &[String]) -> Vec<String> {
        self.frames
            .iter()
            .filter(|v| v["type"] == "chat" && texts.iter().any(|t| v["message"] == *t))
            .map(|v| id_of(v).unwrap().to_string())
            .collect()
    }

    /// The texts of the `unconfirmed` error frames it got, in order.
    fn unconfirmed(&self) -> Vec<String> {
        self.frames
            .iter()
            .filter(|v| v["type"] == "error" && v["code"] == "unconfirmed")
            .map(|v| v["message"].as_str().unwrap_or("?").to_string())
            .collect()
    }
}

/// Reads `ws` until `done(frames so far)` holds or `limit` passes; returns what it read.
fn read_until(ws: &mut Ws, limit: Duration, mut done: impl FnMut(&[Value]) -> bool) -> Vec<Value> {
    let mut got = Vec::new();
    let deadline = Instant::now() + limit;
    while !done(&got) && Instant::now() < deadline {
        if let Some(v) = ws.recv_within(Duration::from_millis(200)) {
            got.push(v);
        }
    }
    got
}

/// `texts` were sent by `sender` (on `sender_node`) while Redis hung. `seen_before`: what
/// each member read until the node recovered; `seen_after`: what it read after. `history`:
/// the room's history on each node at the end. Checks that nothing was lost silently:
///
/// - before recovery, the sender got each text exactly once, as its chat or as an
///   `unconfirmed` error, and the members of its node got exactly the ones it got as chat;
/// - every node holds the same history;
/// - a text in the history reached every member exactly once as a chat, and each member's
///   chats appear in history order;
/// - a text not in the history reached no member of another node, and the sender either
///   heard it was unconfirmed or (sent while the node was degraded) saw it delivered locally,
///   as docs/cluster.md says.
#[track_caller]
fn assert_nothing_lost_silently(
    texts: &[String],
    sender: &str,
    local: &[&str],
    seen: &[(Seen, Seen)],
    history: &[Vec<Value>],
) {
    for (n, h) in history.iter().enumerate() {
        assert_eq!(
            ids(h),
            ids(&history[0]),
            "node {n}'s history differs from node 0's:\n{:?}\n{:?}",
            brief(h),
            brief(&history[0])
        );
    }
    let hist: Vec<&Value> = history[0]
        .iter()
        .filter(|v| v["type"] == "chat" && texts.iter().any(|t| v["message"] == *t))
        .collect();
    let hist_ids: Vec<String> = hist.iter().map(|v| id_of(v).unwrap().to_string()).collect();
    let (sb, _) = seen
        .iter()
        .find(|(b, _)| b.name == sender)
        .expect("the sender's frames");
    let sender_chats: Vec<String> = sb
        .frames
        .iter()
        .filter(|v| v["type"] == "chat" && texts.iter().any(|t| v["message"] == *t))
        .map(|v| v["message"].as_str().unwrap().to_string())
        .collect();
    let sender_errors = sb.unconfirmed();
    for t in texts {
        let as_chat = sender_chats.iter().filter(|c| *c == t).count();
        let as_error = sender_errors.iter().filter(|c| *c == t).count();
        assert_eq!(
            as_chat + as_error,
            1,
            "{sender} got {t:?} {as_chat} times as chat and {as_error} times as unconfirmed \
             (once in all expected) before recovery; got {:?}",
            brief(&sb.frames)
        );
    }
    for (before, after) in seen {
        let chats_before = before.chats(texts);
        if local.contains(&before.name.as_str()) && before.name != sender {
            assert_eq!(
                chats_before,
                sb.chats(texts),
                "{} (on the sender's node) got exactly the chats {sender} got, in order",
                before.name
            );
            assert!(
                before.unconfirmed().is_empty(),
                "{}: not its errors",
                before.name
            );
        }
        let mut all = chats_before.clone();
        all.extend(after.chats(texts));
        for (t, id) in hist
            .iter()
            .map(|v| (v["message"].as_str().unwrap(), id_of(v).unwrap()))
        {
            assert_eq!(
                all.iter().filter(|x| *x == id).count(),
                1,
                "{} got {t:?} (in the history) exactly once: {:?} then {:?}",
                before.name,
                brief(&before.frames),
                brief(&after.frames)
            );
        }
        let stored: Vec<&String> = all.iter().filter(|id| hist_ids.contains(id)).collect();
        let want: Vec<&String> = hist_ids.iter().collect();
        assert_eq!(
            stored, want,
            "{}: the chats it got, in history order",
            before.name
        );
        if !local.contains(&before.name.as_str()) {
            assert!(
                all.iter().all(|id| hist_ids.contains(id)),
                "{} (another node) got a chat that is in no history",
                before.name
            );
        }
    }
}

/// Every frame read until (and with) the chat `text`.
#[track_caller]
fn frames_until_chat(ws: &mut Ws, text: &str) -> Vec<Value> {
    let got = read_until(ws, TIMEOUT, |got| {
        got.last()
            .is_some_and(|v| v["type"] == "chat" && v["message"] == text)
    });
    assert!(
        got.last().is_some_and(|v| v["message"] == text),
        "chat {text:?} never came: {:?}",
        brief(&got)
    );
    got
}

/// The frames each member reads until its client has been quiet for a moment.
fn drain_all(members: &mut [Member]) -> Vec<Seen> {
    members
        .iter_mut()
        .map(|m| Seen {
            name: m.name.clone(),
            frames: m.ws.drain(Duration::from_millis(500)),
        })
        .collect()
}

/// alice and bob on node 0, carol on node 1, all joined and synced, and a chat "before" that
/// every one of them got.
#[track_caller]
fn trio(c: &Cluster) -> (String, Vec<Member>, Value) {
    let (sa, alice_uid) = c.node(0).session("alice");
    let (sb, bob_uid) = c.node(0).session("bob");
    let (sc, carol_uid) = c.node(1).session("carol");
    let room = c.node(1).room(&sc);
    let mut m: Vec<Member> = Vec::new();
    for (node, name, sid, uid) in [
        (0, "alice", &sa, &alice_uid),
        (0, "bob", &sb, &bob_uid),
        (1, "carol", &sc, &carol_uid),
    ] {
        let (member, _) = join_synced(c.node(node), &room, name, sid, uid, &mut m);
        m.push(member);
    }
    m[0].ws.chat("before");
    let before = m[0].ws.recv_chat("before");
    for mj in m[1..].iter_mut() {
        assert_eq!(mj.ws.recv_chat("before")["id"], before["id"]);
    }
    (sa, m, before)
}

/// After a recovery: until a probe from alice reaches carol and one from carol reaches alice,
/// reads every member; returns what each read.
#[track_caller]
fn after_recovery(m: &mut [Member]) -> Vec<Seen> {
    let mut seen: Vec<Vec<Value>> = vec![Vec::new(); m.len()];
    for (from, to, probe) in [(0, 2, "probe-to-B"), (2, 0, "probe-to-A")] {
        let crossed = wait_for(Duration::from_secs(15), || {
            m[from].ws.chat(probe);
            let t = Instant::now();
            let mut hit = false;
            while t.elapsed() < Duration::from_millis(300) {
                for (j, mj) in m.iter_mut().enumerate() {
                    while let Some(v) = mj.ws.recv_within(Duration::from_millis(20)) {
                        hit |= j == to && v["message"] == probe;
                        seen[j].push(v);
                    }
                }
            }
            hit
        });
        assert!(
            crossed.is_some(),
            "{probe}: chat never crossed after recovery"
        );
    }
    for (j, s) in drain_all(m).into_iter().enumerate() {
        seen[j].extend(s.frames);
    }
    m.iter()
        .zip(seen)
        .map(|(mj, frames)| Seen {
            name: mj.name.clone(),
            frames,
        })
        .collect()
}

#[test]
fn chat_sent_while_redis_is_frozen_is_never_lost_silently_and_every_member_ends_with_the_history() {
    let c = Cluster::start(2, &["--presence-ttl", "3s"]);
    let (sa, mut m, _) = trio(&c);
    c.redis.pause(); // SIGSTOP: every socket stays open, nothing is answered
    let texts: Vec<String> = (1..=3).map(|k| format!("frozen-{k}")).collect();
    for t in &texts {
        m[0].ws.chat(t);
    }
    // Nobody on alice's node got them, and she hears about each one (after the 5 s reply
    // timeout at most), never silence.
    let alice = read_until(&mut m[0].ws, Duration::from_secs(20), |got| {
        got.iter().filter(|v| v["code"] == "unconfirmed").count() >= texts.len()
    });
    let errors: Vec<&Value> = alice
        .iter()
        .filter(|v| v["code"] == "unconfirmed")
        .collect();
    assert_eq!(
        errors
            .iter()
            .map(|v| v["message"].as_str().unwrap())
            .collect::<Vec<_>>(),
        texts,
        "alice gets an unconfirmed error for each chat, in order: {:?}",
        brief(&alice)
    );
    for e in &errors {
        assert_eq!(e["type"], "error");
        assert!(uuid_version(e["id"].as_str().unwrap()) == Some(7), "{e}");
        assert!(e["detail"].as_str().unwrap().contains("Redis"), "{e}");
    }
    c.wait_health(0, "down", REDIS_DOWN_LIMIT);
    // Degraded: chat on node A is local, and at once.
    m[0].ws.chat("local-while-frozen");
    let mut alice = alice;
    alice.extend(frames_until_chat(&mut m[0].ws, "local-while-frozen"));
    let bob = frames_until_chat(&mut m[1].ws, "local-while-frozen");
    let mut before = drain_all(&mut m);
    before[0].frames.splice(0..0, alice);
    before[1].frames.splice(0..0, bob);
    c.redis.resume();
    for i in 0..2 {
        c.wait_health(i, "up", RECOVERY_LIMIT);
    }
    let after = after_recovery(&mut m);
    let room = list(c.node(0), "/rooms", Some(&sa), "rooms")[0].clone();
    let history: Vec<Vec<Value>> = (0..2).map(|i| history(c.node(i), &room, &sa)).collect();
    let mut all_texts = texts.clone();
    all_texts.push("local-while-frozen".into());
    assert!(
        !history[0]
            .iter()
            .any(|v| v["message"] == "local-while-frozen"),
        "degraded-mode chat stays local, as documented"
    );
    eprintln!("history after the freeze: {:?}", brief(&history[0]));
    for (b, a) in before.iter().zip(&after) {
        eprintln!(
            "{} read {:?} then {:?}",
            b.name,
            brief(&b.frames),
            brief(&a.frames)
        );
    }
    let seen: Vec<(Seen, Seen)> = before.into_iter().zip(after).collect();
    assert_nothing_lost_silently(&all_texts, "alice", &["alice", "bob"], &seen, &history);
}

#[test]
fn chat_sent_into_a_stalled_link_is_never_lost_silently_and_histories_agree() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr());
    let urls = [proxy.url(0), redis.url(0)];
    let c = Cluster::start_nodes(redis, &urls, &["--presence-ttl", "3s"]);
    let (sa, mut m, _) = trio(&c);
    proxy.stall(); // node A's link only: B and Redis carry on
    let texts: Vec<String> = (1..=3).map(|k| format!("stalled-{k}")).collect();
    for t in &texts {
        m[0].ws.chat(t);
    }
    let alice = read_until(&mut m[0].ws, Duration::from_secs(20), |got| {
        got.iter().filter(|v| v["code"] == "unconfirmed").count() >= texts.len()
    });
    c.wait_health(0, "down", REDIS_DOWN_LIMIT);
    let mut before = drain_all(&mut m);
    before[0].frames.splice(0..0, alice);
    assert_eq!(
        before[0].unconfirmed(),
        texts,
        "{:?}",
        brief(&before[0].frames)
    );
    proxy.restore();
    c.wait_health(0, "up", RECOVERY_LIMIT);
    let after = after_recovery(&mut m);
    let room = list(c.node(0), "/rooms", Some(&sa), "rooms")[0].clone();
    let history: Vec<Vec<Value>> = (0..2).map(|i| history(c.node(i), &room, &sa)).collect();
    // The stalled commands never reached Redis: in no history, and nobody but alice (told)
    // ever heard of them.
    for t in &texts {
        assert!(!history[0].iter().any(|v| v["message"] == *t), "{t} stored");
    }
    let seen: Vec<(Seen, Seen)> = before.into_iter().zip(after).collect();
    assert_nothing_lost_silently(&texts, "alice", &["alice", "bob"], &seen, &history);
}

#[test]
fn a_redis_too_slow_to_answer_fills_the_bounded_queue_and_counts_as_down() {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr());
    let urls = [proxy.url(0), redis.url(0)];
    let c = Cluster::start_nodes(redis, &urls, &["--max-redis-queue", "64KiB"]);
    let (sa, mut m, _) = trio(&c);
    // Commands reach Redis at full speed, its answers come back a few bytes at a time: the
    // link never goes silent, so only the queue bound can tell.
    proxy.trickle();
    let body = "x".repeat(1500);
    let texts: Vec<String> = (0..100).map(|k| format!("flood-{k:03}-{body}")).collect();
    for t in &texts {
        m[0].ws.chat(t);
    }
    c.wait_health(0, "down", REDIS_DOWN_LIMIT);
    // The harness reads the log on a thread of its own: the line may arrive a moment later.
    let logged = common::wait_for(Duration::from_secs(3), || {
        c.node(0).log().contains("--max-redis-queue")
    });
    assert!(logged.is_some(), "the log says why: {}", c.node(0).log());
    let alice = read_until(&mut m[0].ws, Duration::from_secs(20), |got| {
        let n = got
            .iter()
            .filter(|v| texts.iter().any(|t| v["message"] == *t))
            .count();
        n >= texts.len()
    });
    let mut before = drain_all(&mut m);
    before[0].frames.splice(0..0, alice);
    assert!(
        !before[0].unconfirmed().is_empty(),
        "some chats were unconfirmed when the queue filled"
    );
    proxy.restore();
    c.wait_health(0, "up", RECOVERY_LIMIT);
    let after = after_recovery(&mut m);
    let room = list(c.node(0), "/rooms", Some(&sa), "rooms")[0].clone();
    let history: Vec<Vec<Value>> = (0..2).map(|i| history(c.node(i), &room, &sa)).collect();
    let seen: Vec<(Seen, Seen)> = before.into_iter().zip(after).collect();
    assert_nothing_lost_silently(&texts, "alice", &["alice", "bob"], &seen, &history);
}

// ---- (7) a hostile Redis costs a reconnect, never the node ----------------------------------

/// The resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Injects `bytes` into node A's link as if Redis had sent them, then checks that A logged
/// `logged`, stayed alive, reconnected (a new connection through the proxy), and that alice
/// (on A) and carol (on B) still chat across, and an HTTP bystander on A is served.
#[track_caller]
fn survives_injection(p: &mut Pair, what: &str, bytes: &[u8], logged: &str) {
    let links = p.proxy.accepted();
    p.proxy.inject(bytes);
    survived(p, what, links, logged);
}

/// The checks of [`survives_injection`] once the bytes are in; `links` is the proxy's count
/// of connections before.
#[track_caller]
fn survived(p: &mut Pair, what: &str, links: u32, logged: &str) {
    let reconnected = wait_for(Duration::from_secs(15), || p.proxy.accepted() > links);
    assert!(
        health(p.c.node(0)).is_some(),
        "{what}: node A died; its log:\n{}",
        p.c.node(0).log()
    );
    assert!(reconnected.is_some(), "{what}: node A never reconnected");
    assert!(
        p.c.node(0).log().contains(logged),
        "{what}: the log says {logged:?}:\n{}",
        p.c.node(0).log()
    );
    p.c.wait_health(0, "up", RECOVERY_LIMIT);
    probe_until_crossed(
        &mut p.alice,
        &mut p.carol,
        &format!("probe-to-B after {what}"),
    );
    probe_until_crossed(
        &mut p.carol,
        &mut p.alice,
        &format!("probe-to-A after {what}"),
    );
    let (sid, _) = p.c.node(0).session("bystander");
    assert_eq!(sid.len(), 36, "{what}: REST on node A works");
}

#[test]
fn a_deeply_nested_redis_reply_costs_a_reconnect_not_the_node() {
    let mut p = proxied_pair(&[]);
    let mut nested = b"*1\r\n".repeat(5000); // 20 KB: overflowed the decoder's stack
    nested.extend_from_slice(b":1\r\n");
    survives_injection(
        &mut p,
        "5 000 nested arrays",
        &nested,
        "nested deeper than 16",
    );
    let mut push = b">1\r\n%1\r\n+k\r\n".repeat(2000);
    push.extend_from_slice(b"_\r\n");
    survives_injection(
        &mut p,
        "a push of nested maps",
        &push,
        "nested deeper than 16",
    );
}

#[test]
fn huge_lengths_and_junk_from_redis_are_refused_without_buffering() {
    let mut p = proxied_pair(&[]);
    let pid = p.c.node(0).pid();
    // A 2 GB bulk string announced, then 32 MiB of it: refused from the header; the node
    // must not hold the payload.
    let before = rss_kib(pid);
    let mut huge = b"*1\r\n$2000000000\r\n".to_vec();
    huge.extend(std::iter::repeat_n(b'x', 32 << 20));
    let links = p.proxy.accepted();
    // (The write ends early once the node drops the link.)
    p.proxy.inject(&huge);
    wait_for(Duration::from_secs(3), || p.proxy.accepted() > links);
    let grown = rss_kib(pid).saturating_sub(before);
    eprintln!("node A RSS: {before} KiB before, +{grown} KiB after 32 MiB of a 2 GB bulk");
    assert!(grown < 16 * 1024, "node A grew by {grown} KiB");
    survived(&mut p, "a 2 GB bulk length", links, "bytes or more");
    let mut many = b"*2000000000\r\n".to_vec();
    many.extend(b":1\r\n".repeat(1 << 16));
    survives_injection(&mut p, "a 2-billion-element array", &many, "elements");
    survives_injection(
        &mut p,
        "an attribute",
        b"|1\r\n+a\r\n+b\r\n",
        "type byte 0x7c",
    );
    survives_injection(&mut p, "inline text", b"hello there\r\n", "type byte 0x68");
    survives_injection(
        &mut p,
        "a reply nobody asked for",
        b"+OK\r\n",
        "nobody asked for",
    );
}

// ---- (8) secrets and what users write stay out of the logs ----------------------------------

const REDIS_PW: &str = "redis-pw-7f3a9c51";

/// Every form a session id could take in a log line: the token, its 32 hex digits, the
/// number `Debug` used to print.
fn token_forms(sid: &str) -> Vec<String> {
    let hex = sid.replace('-', "");
    let n = u128::from_str_radix(&hex, 16).expect("a UUID");
    vec![sid.to_string(), hex, n.to_string()]
}

/// Runs the binary with `args` and `env`; it must refuse to start (exit 2, within a bound:
/// one that starts after all is killed by its pid). Returns stderr and stdout.
fn refused_start(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_chatloop"))
        .args(["--host", "127.0.0.1", "--port", "0"])
        .args(args)
        .env_remove("CHATLOOP_REDIS")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run chatloop");
    let exited = wait_for(Duration::from_secs(10), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if exited.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("collect output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {text}");
    assert!(text.contains("redis"), "{text}");
    text
}

#[test]
fn no_log_line_holds_a_token_the_redis_password_chat_or_a_username() {
    const NAME: &str = "Zelda-name-31c7";
    const VICTIM: &str = "Victim-name-8d02";
    const CHAT: &str = "chat-text-e4b9a6";
    const WRONG_PW: &str = "wrong-pw-0a9e7d";
    let redis = RedisServer::start_with(RedisOptions {
        password: Some(REDIS_PW),
        ..Default::default()
    });
    let url = format!("redis://:{REDIS_PW}@127.0.0.1:{}/0", redis.port);
    let c = Cluster::start_nodes(redis, &[url.clone(), url], &["--log-level", "debug"]);
    let (sa, _) = c.node(0).session(NAME);
    let room = c.node(0).room(&sa);
    let (mut ws, _) = c.node(0).join(&room, &sa);
    ws.chat(CHAT);
    ws.recv_chat(CHAT);
    let (sb, _) = c.node(1).session("other");
    let (wb, welcome) = c.node(1).join(&room, &sb);
    assert!(welcome.to_string().contains(CHAT), "{welcome}");
    // A session lookup that fails in Redis: node B has not seen the session, and its key
    // holds a string, so HGETALL answers WRONGTYPE (logged, with the query).
    let (sx, _) = c.node(0).session(VICTIM);
    c.redis
        .command(0, &["SET", &format!("chatloop:{{s:{sx}}}:s"), "x"])
        .expect("overwrite the session key");
    let r = c.node(1).http().get("/sessions/me", Some(&sx));
    assert_eq!(r.status, 503, "{}", r.text());
    let (status, body) = ws_refusal(c.node(1), &format!("/ws/{room}?session_id={sx}"));
    assert_503_redis("WebSocket with a session Redis cannot read", status, &body);
    assert!(
        wait_for(TIMEOUT, || c.node(1).log().contains("WRONGTYPE")).is_some(),
        "node B logs the failed lookup:\n{}",
        c.node(1).log()
    );
    // A node with the wrong password: its handshake is refused, and logged.
    let port = c.redis.port;
    let wrong = Server::start(&[
        "--redis",
        &format!("redis://:{WRONG_PW}@127.0.0.1:{port}/0"),
        "--log-level",
        "debug",
    ]);
    assert!(
        wait_for(TIMEOUT, || wrong
            .log()
            .contains("refused the connection handshake"))
        .is_some(),
        "{}",
        wrong.log()
    );
    // URLs that do not parse: the settings are refused, and the error does not repeat them.
    let mut refusals = Vec::new();
    for bad in [
        format!("redis://:{REDIS_PW}@127.0.0.1:notaport/0"),
        format!("redis://:{REDIS_PW}"),
        format!("redis://127.0.0.1/{REDIS_PW}"),
    ] {
        refusals.push(refused_start(&["--redis", &bad], &[]));
        refusals.push(refused_start(&[&format!("--redis={bad}")], &[]));
        refusals.push(refused_start(&[], &[("CHATLOOP_REDIS", &bad)]));
    }
    drop(ws);
    drop(wb);
    std::thread::sleep(Duration::from_millis(300)); // the leaves are logged too, if at all

    let mut needles: Vec<(String, &str)> = vec![
        (REDIS_PW.to_string(), "the Redis password"),
        (WRONG_PW.to_string(), "a wrong Redis password"),
        (NAME.to_string(), "a username"),
        (VICTIM.to_string(), "a username"),
        (CHAT.to_string(), "chat text"),
    ];
    for sid in [&sa, &sb, &sx] {
        for f in token_forms(sid) {
            needles.push((f, "a bearer token"));
        }
    }
    let mut logs: Vec<(String, String)> = vec![
        ("node A".into(), c.node(0).log()),
        ("node B".into(), c.node(1).log()),
        ("the wrong-password node".into(), wrong.log()),
    ];
    for (i, r) in refusals.into_iter().enumerate() {
        logs.push((format!("refused start {i}"), r));
    }
    assert!(
        logs[0].1.contains("DEBUG"),
        "debug lines are in: {}",
        logs[0].1
    );
    assert!(logs[0].1.contains("settings:"), "{}", logs[0].1);
    for (whose, log) in &logs {
        for (needle, what) in &needles {
            assert!(
                !log.contains(needle.as_str()),
                "{whose}'s log holds {what} ({needle}):\n{log}"
            );
        }
    }
}

/// Node A through a proxy (with `args`), node B direct; alice and bob on A, carol on B.
#[track_caller]
fn proxied_trio(args: &[&str]) -> (Cluster, Proxy, String, Vec<Member>) {
    let redis = RedisServer::start();
    let proxy = Proxy::start(redis.addr());
    let urls = [proxy.url(0), redis.url(0)];
    let c = Cluster::start_nodes(redis, &urls, args);
    let (sa, m, _) = trio(&c);
    (c, proxy, sa, m)
}

#[test]
fn a_chat_flood_into_a_stalled_link_holds_no_more_than_the_queue_bound() {
    const CHATS: usize = 8000;
    let (c, proxy, _sa, m) = proxied_trio(&["--max-redis-queue", "2MiB"]);
    let pid = c.node(0).pid();
    let mut m = m.into_iter();
    let (mut alice, mut bob) = (m.next().unwrap(), m.next().unwrap());
    proxy.stall();
    let before = rss_kib(pid);
    // bob reads whatever comes (local delivery once A is degraded) so as not to be cut as a
    // slow consumer; alice sends 8 000 chats of 4 000 characters (32 MB) and reads between
    // batches.
    let reader = std::thread::spawn(move || {
        let mut n = 0usize;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match bob.ws.recv_within(Duration::from_secs(3)) {
                Some(_) => n += 1,
                None => break,
            }
        }
        (bob, n)
    });
    let body = "y".repeat(4000);
    let mut alice_got = 0usize;
    for k in 0..CHATS {
        alice.ws.chat(&format!("{k:05}{body}"));
        if k % 50 == 49 {
            while alice.ws.recv_within(Duration::from_millis(1)).is_some() {
                alice_got += 1;
            }
        }
    }
    alice_got += alice.ws.drain(Duration::from_secs(2)).len();
    let (_bob, bob_got) = reader.join().expect("bob's reader");
    let grown = rss_kib(pid).saturating_sub(before);
    eprintln!(
        "node A RSS {before} KiB, +{grown} KiB after {CHATS} chats of 4000 characters into a \
         stalled link; alice read {alice_got} frames, bob {bob_got}"
    );
    c.wait_health(0, "down", REDIS_DOWN_LIMIT);
    // The queue toward Redis held at most 2 MiB (counted twice while unwritten); the room's
    // local history (1000 messages of 4 KB) and frames in flight make up the rest.
    assert!(grown < 16 * 1024, "node A grew by {grown} KiB");
    assert!(alice_got >= CHATS, "alice heard of every chat: {alice_got}");
    proxy.restore();
    c.wait_health(0, "up", RECOVERY_LIMIT);
}
/// A node given the plain `redis://` URL of one master of a sharded Redis Cluster finds the
/// other masters itself (`CLUSTER SLOTS`) and serves every room, wherever its slot is.
#[test]
fn a_node_given_one_master_of_a_sharded_cluster_serves_rooms_on_every_shard() {
    let rc = RedisCluster::start(3, 0);
    let url = rc.nodes[0].url(0);
    let s = Server::start(&["--redis", &url]);
    let said = wait_for(REDIS_UP_LIMIT, || {
        s.log().contains("Redis is a Redis Cluster of 3 masters")
    });
    assert!(said.is_some(), "no log line names the sharded cluster");
    wait_for(REDIS_UP_LIMIT, || {
        health(&s).is_some_and(|(_, v)| v["redis"] == "up")
    })
    .expect("up on a sharded cluster");
    let (sid, _) = s.session("al");
    let mut masters = BTreeSet::new();
    for i in 0..12 {
        let room = s.room(&sid);
        let (mut ws, _) = s.join(&room, &sid);
        let text = format!("hello-{i}");
        ws.chat(&text);
        ws.recv_chat(&text);
        masters.insert(rc.master_of(rc.slot_of(&format!("chatloop:{{r:{room}}}:h"))));
    }
    assert_eq!(
        masters.len(),
        3,
        "twelve rooms on every master: {masters:?}"
    );
}

/// Moves the slot of a busy room to another master (as `redis-cli --cluster reshard`
/// does: `IMPORTING`/`MIGRATING`, `MIGRATE` of its keys, `SETSLOT ... NODE`) while members
/// on two nodes chat: every chat reaches every member exactly once, in the history's order,
/// each sender's in the order sent, and the histories agree.
#[test]
fn on_a_sharded_redis_cluster_a_busy_rooms_slot_moves_while_members_chat_nothing_lost_or_duplicated()
 {
    let c = Cluster::on_shards(2, 0, &["--presence-ttl", "3s"]);
    let (sa, mut m, _) = trio(&c);
    let room = list(c.node(0), "/rooms", Some(&sa), "rooms")[0].clone();
    let rc = c.shards();
    let slot = rc.slot_of(&format!("chatloop:{{r:{room}}}:h"));
    let from = rc.master_of(slot);
    let to = (from + 1) % 3;
    let mut texts: Vec<(usize, String)> = Vec::new();
    let mut burst = |m: &mut [Member], phase: &str| {
        for k in 0..10 {
            let who = if k % 2 == 0 { 0 } else { 2 };
            let text = format!("{phase}-{k}");
            m[who].ws.chat(&text);
            texts.push((who, text));
        }
    };
    burst(&mut m, "before");
    let mig = rc.begin_migration(slot, to);
    burst(&mut m, "migrating");
    assert!(rc.migrate_keys(&mig, 100) > 0, "the room's keys move");
    burst(&mut m, "moved-keys");
    rc.finish_migration(mig);
    assert_eq!(rc.master_of(slot), to);
    burst(&mut m, "after");
    for i in 0..2 {
        wait_for(Duration::from_secs(10), || {
            c.node(i)
                .log()
                .contains("a room's slot moved to another Redis master")
        })
        .unwrap_or_else(|| panic!("node {i} never followed the moved slot"));
    }
    let last_a = texts.iter().rev().find(|(w, _)| *w == 0).unwrap().1.clone();
    let last_c = texts.iter().rev().find(|(w, _)| *w == 2).unwrap().1.clone();
    let seen: Vec<Vec<Value>> = m
        .iter_mut()
        .map(|mj| {
            let mut got = read_until(&mut mj.ws, Duration::from_secs(20), |got| {
                [&last_a, &last_c]
                    .iter()
                    .all(|t| got.iter().any(|v| v["message"] == **t))
            });
            got.extend(mj.ws.drain(Duration::from_millis(300)));
            got
        })
        .collect();
    let history: Vec<Vec<Value>> = (0..2).map(|i| history(c.node(i), &room, &sa)).collect();
    assert_eq!(
        ids(&history[0]),
        ids(&history[1]),
        "the nodes' histories agree"
    );
    let stored: Vec<&str> = history[0]
        .iter()
        .filter(|v| v["type"] == "chat")
        .filter_map(|v| v["message"].as_str())
        .filter(|t| *t != "before")
        .collect();
    let mut sent: Vec<&str> = texts.iter().map(|(_, t)| t.as_str()).collect();
    let mut sorted_stored = stored.clone();
    sorted_stored.sort_unstable();
    sent.sort_unstable();
    assert_eq!(sorted_stored, sent, "every chat stored once: {stored:?}");
    for who in [0, 2] {
        let order: Vec<&str> = stored
            .iter()
            .copied()
            .filter(|t| texts.iter().any(|(w, x)| *w == who && x == t))
            .collect();
        let mine: Vec<&str> = texts
            .iter()
            .filter(|(w, _)| *w == who)
            .map(|(_, t)| t.as_str())
            .collect();
        assert_eq!(
            order, mine,
            "{}'s chats stored in the order sent",
            m[who].name
        );
    }
    for (mj, got) in m.iter().zip(&seen) {
        assert!(
            !got.iter().any(|v| v["type"] == "error"),
            "{}: {:?}",
            mj.name,
            brief(got)
        );
        let chats: Vec<&str> = got
            .iter()
            .filter(|v| v["type"] == "chat")
            .filter_map(|v| v["message"].as_str())
            .collect();
        assert_eq!(
            chats, stored,
            "{} got every chat once, in the history's order",
            mj.name
        );
    }
}

/// A master is killed (by pid) and its replica takes over: the nodes go degraded, come
/// back on the new master, chat resumes, and every chat sent meanwhile is either stored and
/// delivered to every member once, or its sender got an `unconfirmed` error (or, sent while
/// degraded, saw it delivered locally): nothing is lost silently.
#[test]
fn on_a_sharded_redis_cluster_a_killed_master_is_replaced_by_its_replica_and_chat_resumes() {
    let mut c = Cluster::on_shards(2, 1, &["--presence-ttl", "3s"]);
    let (sa, mut m, _) = trio(&c);
    let room = list(c.node(0), "/rooms", Some(&sa), "rooms")[0].clone();
    let key = format!("chatloop:{{r:{room}}}:h");
    let slot = c.shards().slot_of(&key);
    let master = c.shards().master_of(slot);
    let port = c.shards().nodes[master].port;
    c.shards().wait_until("the room's replica caught up", |rc| {
        rc.nodes.iter().any(|n| {
            n.port != port
                && n.command(0, &["ROLE"])
                    .is_ok_and(|r| r.starts_with("slave"))
                && n.command(0, &["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()])
                    .is_ok_and(|k| k != "0")
        })
    });
    c.shards.as_mut().unwrap().nodes[master].kill();
    let texts: Vec<String> = (1..=3).map(|k| format!("failover-{k}")).collect();
    for t in &texts {
        m[0].ws.chat(t);
    }
    let alice = read_until(&mut m[0].ws, Duration::from_secs(20), |got| {
        texts.iter().all(|t| {
            got.iter()
                .any(|v| v["message"] == *t && (v["type"] == "chat" || v["code"] == "unconfirmed"))
        })
    });
    let bob = m[1].ws.drain(Duration::from_millis(300));
    let mut before = drain_all(&mut m);
    before[0].frames.splice(0..0, alice);
    before[1].frames.splice(0..0, bob);
    c.shards().wait_until("failed over to the replica", |rc| {
        let Some(n) = rc.nodes.iter().find(|n| n.port != port && n.ping()) else {
            return false;
        };
        n.command(0, &["CLUSTER", "INFO"])
            .is_ok_and(|i| i.contains("cluster_state:ok"))
            && rc.master_of(slot) != master
    });
    for i in 0..2 {
        c.wait_health(i, "up", RECOVERY_LIMIT);
    }
    let after = after_recovery(&mut m);
    let history: Vec<Vec<Value>> = (0..2).map(|i| history(c.node(i), &room, &sa)).collect();
    eprintln!("history after the failover: {:?}", brief(&history[0]));
    let seen: Vec<(Seen, Seen)> = before.into_iter().zip(after).collect();
    assert_nothing_lost_silently(&texts, "alice", &["alice", "bob"], &seen, &history);
}
