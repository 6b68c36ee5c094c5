//! Unit tests of the Redis side: URLs, commands, reply matching, subscribe-and-load.

use super::*;
use crate::time::UnixMicros;

fn now(ms: u64) -> Now {
    Now {
        mono: Micros::from_millis(ms),
        wall: UnixMicros(1_700_000_000_000_000 + ms * 1000),
    }
}

fn cfg() -> ClusterConfig {
    ClusterConfig {
        room_ttl: Micros::from_secs(120),
        session_ttl: Micros::from_secs(3600),
        history: 1000,
        history_notices: 100,
        presence_ttl: Micros::from_secs(15),
        db: 2,
        user: None,
        password: None,
        reply_limits: ClusterConfig::reply_limits(1100, 16 * 1024, 100_000),
        max_queue: 64 << 20,
        seeds: vec![slots::Addr {
            host: "127.0.0.1".into(),
            port: 6379,
        }],
        room_list: false,
    }
}

/// A cluster that has connected and finished its handshake.
fn up() -> Cluster {
    up_with(cfg())
}

fn up_with(cfg: ClusterConfig) -> Cluster {
    let mut c = Cluster::new(cfg, 0xabcdef01);
    assert!(c.should_connect(now(0)));
    c.on_connected(0);
    let hello = b"%1\r\n$6\r\nserver\r\n$5\r\nredis\r\n+OK\r\n";
    assert!(c.on_bytes(hello, now(1)));
    assert!(!c.is_up(), "not before CLUSTER SLOTS is answered");
    assert!(c.on_bytes(NOT_A_CLUSTER, now(1)));
    assert!(c.is_up());
    assert_eq!(c.drain_events().collect::<Vec<_>>(), vec![Event::Up]);
    ack_all(&mut c); // the first heartbeat's writes
    c.links[0].out.clear();
    c
}

/// Answers every pending command with `+OK` (a subscription with its push).
fn ack_all(c: &mut Cluster) {
    let n = c.links[0].pending.len();
    let oks = acks(c, n);
    assert!(c.on_bytes(&oks, now(2)));
}

/// What Redis answers to the first `n` pending commands when each succeeds: `+OK`, or the
/// `ssubscribe` / `sunsubscribe` push of a subscription.
fn acks(c: &Cluster, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for e in c.links[0].pending.iter().take(n) {
        match e.pending {
            Pending::Subscribe(r) => out.extend(confirm("ssubscribe", r)),
            Pending::Unsubscribe(r) => out.extend(confirm("sunsubscribe", r)),
            _ => out.extend_from_slice(b"+OK\r\n"),
        }
    }
    out
}

/// The `ssubscribe` confirmation of the room, then `reply`.
fn subscribed_then(reply: &[u8]) -> Vec<u8> {
    [confirm("ssubscribe", ROOM), reply.to_vec()].concat()
}

fn confirm(kind: &str, r: RoomId) -> Vec<u8> {
    let ch = format!("chatloop:{{r:{r}}}:m");
    format!(
        ">3\r\n${}\r\n{kind}\r\n${}\r\n{ch}\r\n:1\r\n",
        kind.len(),
        ch.len()
    )
    .into_bytes()
}

fn push(channel: &str, payload: &[u8]) -> Vec<u8> {
    let mut b = format!(
        ">3\r\n$7\r\nmessage\r\n${}\r\n{channel}\r\n${}\r\n",
        channel.len(),
        payload.len()
    )
    .into_bytes();
    b.extend_from_slice(payload);
    b.extend_from_slice(b"\r\n");
    b
}

fn bulk_array(items: &[Vec<u8>]) -> Vec<u8> {
    let mut b = format!("*{}\r\n", items.len()).into_bytes();
    for i in items {
        b.extend_from_slice(format!("${}\r\n", i.len()).as_bytes());
        b.extend_from_slice(i);
        b.extend_from_slice(b"\r\n");
    }
    b
}

const ROOM: RoomId = RoomId(0x0123456789);

fn entry(id: MsgId, text: &str) -> Vec<u8> {
    let mut e = id.to_string().into_bytes();
    e.extend_from_slice(format!("{{\"m\":\"{text}\"}}").as_bytes());
    e
}

#[test]
fn handshake_says_hello_3_and_selects_the_database() {
    let mut c = Cluster::new(cfg(), 1);
    assert!(c.should_connect(now(0)));
    c.on_connected(0);
    let text = String::from_utf8_lossy(&c.links[0].out).to_string();
    assert!(
        text.starts_with("*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n"),
        "{text}"
    );
    assert!(text.contains("$6\r\nSELECT\r\n$1\r\n2\r\n"), "{text}");
    assert!(text.ends_with("$7\r\nCLUSTER\r\n$5\r\nSLOTS\r\n"), "{text}");
    assert!(!c.is_up());
}

/// What one Redis (not a cluster) answers to `CLUSTER SLOTS`.
const NOT_A_CLUSTER: &[u8] = b"-ERR This instance has cluster support disabled\r\n";

#[test]
fn a_redis_cluster_of_one_master_is_served_one_of_several_is_refused() {
    let handshake = |slots: &[u8]| {
        let mut c = Cluster::new(cfg(), 1);
        c.should_connect(now(0));
        c.on_connected(0);
        assert!(c.on_bytes(b"%0\r\n+OK\r\n", now(1)));
        let ok = c.on_bytes(slots, now(1));
        (ok, c.is_up())
    };
    assert_eq!(handshake(NOT_A_CLUSTER), (true, true));
    let one = b"*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$9\r\n127.0.0.1\r\n:7000\r\n";
    assert_eq!(handshake(one), (true, true));
    let three = b"*3\r\n*3\r\n:0\r\n:5460\r\n*2\r\n$1\r\na\r\n:1\r\n\
*3\r\n:5461\r\n:10922\r\n*2\r\n$1\r\nb\r\n:1\r\n\
*3\r\n:10923\r\n:16383\r\n*2\r\n$1\r\nc\r\n:1\r\n";
    assert_eq!(
        handshake(three),
        (true, false),
        "sharded: up once every master's link is"
    );
    // A slot map that is not one is a broken link too, never a crash.
    assert_eq!(handshake(b"*1\r\n*3\r\n:9\r\n:1\r\n*0\r\n"), (false, false));
}

#[test]
fn a_refused_handshake_breaks_the_link() {
    let mut c = Cluster::new(cfg(), 1);
    c.should_connect(now(0));
    c.on_connected(0);
    assert!(!c.on_bytes(b"-WRONGPASS invalid password\r\n", now(1)));
}

#[test]
fn fetches_are_answered_in_command_order_across_pushes() {
    let mut c = up();
    let s = SessionId(7);
    c.fetch(5, 9, Query::Session(s), now(10));
    c.fetch(6, 1, Query::UserCount(ROOM), now(10));
    let mut replies = b"%2\r\n$1\r\nu\r\n$5\r\nalice\r\n$1\r\ni\r\n$8\r\n0000abcd\r\n".to_vec();
    replies.extend_from_slice(&push("chatloop:ctl", b"Enot-a-session"));
    replies.extend_from_slice(b":3\r\n");
    // Split anywhere: partial frames wait for the rest.
    assert!(c.on_bytes(&replies[..7], now(11)));
    assert!(c.on_bytes(&replies[7..], now(11)));
    let events: Vec<Event> = c.drain_events().collect();
    assert_eq!(
        events,
        vec![
            Event::Answer {
                token: 5,
                serial: 9,
                query: Query::Session(s),
                answer: Answer::Session(Some(("alice".into(), UserId(0xabcd)))),
            },
            Event::Answer {
                token: 6,
                serial: 1,
                query: Query::UserCount(ROOM),
                answer: Answer::Count(3),
            },
        ]
    );
}

#[test]
fn a_missing_session_is_none_and_an_expired_room_does_not_exist() {
    let mut c = up();
    c.fetch(1, 1, Query::Session(SessionId(1)), now(10));
    c.fetch(2, 1, Query::RoomExists(ROOM), now(10));
    c.fetch(3, 1, Query::RoomExists(ROOM), now(10));
    let past = (now(10).wall.0 / 1000 - 5).to_string();
    let future = (now(10).wall.0 / 1000 + 5).to_string();
    // Each room lookup is one script: whether its registry key exists (it expires with the
    // room), and its settings (a flat array: Lua speaks RESP2).
    let _ = (past, future);
    let hash = "ab".repeat(32);
    let replies = format!(
        "%0\r\n*2\r\n:0\r\n*0\r\n*2\r\n:1\r\n*4\r\n$1\r\ni\r\n$64\r\n{hash}\r\n$1\r\nt\r\n$4\r\n5000\r\n"
    );
    assert!(c.on_bytes(replies.as_bytes(), now(11)));
    let answers: Vec<Answer> = c
        .drain_events()
        .filter_map(|e| match e {
            Event::Answer { answer, .. } => Some(answer),
            _ => None,
        })
        .collect();
    assert_eq!(
        answers,
        vec![
            Answer::Session(None),
            Answer::Room(None),
            Answer::Room(Some(RoomSettings {
                invite: Some([0xab; 32]),
                message_ttl: Some(Micros(5_000_000)),
            }))
        ]
    );
}

#[test]
fn a_sessions_rooms_are_two_commands_each_on_one_slot() {
    // SMEMBERS of the session's set, then EXISTS of each room's registry key (each on its
    // room's shard): a script touching both would cross hash slots in a Redis Cluster.
    let mut c = up();
    let other = RoomId(0xabcdef0123);
    let gone = RoomId(0x1111111111);
    c.fetch(7, 3, Query::SessionRooms(SessionId(5)), now(10));
    let out = String::from_utf8_lossy(&c.links[0].out).into_owned();
    assert!(out.contains("SMEMBERS") && !out.contains("EVAL"), "{out}");
    c.links[0].out.clear();
    let members = [ROOM, other, gone].map(|r| r.hex().to_vec());
    let mut set = bulk_array(&members);
    set[0] = b'~'; // SMEMBERS answers a RESP3 set
    assert!(c.on_bytes(&set, now(11)));
    assert!(!c.has_events(), "each room is asked first");
    let out = String::from_utf8_lossy(&c.links[0].out).into_owned();
    assert_eq!(out.matches("EXISTS").count(), 3, "{out}");
    assert!(out.contains("chatloop:{r:abcdef0123}:e"), "{out}");
    // Answers in the order the commands name the rooms (a set has none of its own).
    let mut named = [(ROOM, 1), (other, 0), (gone, 0)]
        .map(|(r, s)| (out.find(std::str::from_utf8(&r.hex()).unwrap()).unwrap(), s));
    named.sort();
    let replies: String = named.iter().map(|(_, s)| format!(":{s}\r\n")).collect();
    assert!(c.on_bytes(replies.as_bytes(), now(12)));
    assert_eq!(
        c.drain_events().collect::<Vec<_>>(),
        vec![Event::Answer {
            token: 7,
            serial: 3,
            query: Query::SessionRooms(SessionId(5)),
            answer: Answer::Rooms(vec![ROOM]),
        }]
    );
    // No rooms: answered at once; the link lost between the two: the request fails.
    c.fetch(8, 1, Query::SessionRooms(SessionId(5)), now(13));
    assert!(c.on_bytes(b"*0\r\n", now(13)));
    assert!(matches!(
        c.drain_events().next(),
        Some(Event::Answer { answer: Answer::Rooms(r), .. }) if r.is_empty()
    ));
    c.fetch(9, 1, Query::SessionRooms(SessionId(5)), now(14));
    assert!(c.on_bytes(&bulk_array(&members[..1]), now(14)));
    c.on_disconnected(now(15));
    assert!(c.drain_events().any(|e| e
        == Event::Failed {
            token: 9,
            serial: 1
        }));
}

#[test]
fn losing_redis_fails_waiting_requests_and_backs_off() {
    let mut c = up();
    c.fetch(4, 2, Query::AllRooms, now(10));
    c.on_disconnected(now(20));
    let events: Vec<Event> = c.drain_events().collect();
    assert_eq!(
        events,
        vec![
            Event::Failed {
                token: 4,
                serial: 2
            },
            Event::Down
        ]
    );
    assert!(!c.is_up());
    assert!(!c.should_connect(now(50)), "retries only after the backoff");
    assert!(c.should_connect(now(20 + 100)));
    c.on_disconnected(now(200));
    assert!(!c.should_connect(now(350)), "the backoff doubles");
    assert!(c.should_connect(now(400)));
    // While down, a fetch fails at once instead of waiting.
    c.fetch(8, 1, Query::AllRooms, now(401));
    assert_eq!(
        c.drain_events().collect::<Vec<_>>(),
        vec![Event::Failed {
            token: 8,
            serial: 1
        }]
    );
}

#[test]
fn subscribe_then_load_sees_each_message_exactly_once() {
    let mut c = up();
    c.fetch(1, 1, Query::Subscribe(ROOM), now(10));
    let out = String::from_utf8_lossy(&c.links[0].out).to_string();
    let sub = out.find("SUBSCRIBE").unwrap();
    let lrange = out.find("LRANGE").unwrap();
    assert!(sub < lrange, "subscribe goes first on the same connection");
    let (a, b, d) = (MsgId(1 << 80), MsgId(2 << 80), MsgId(3 << 80));
    // b was published after SUBSCRIBE ran and before LRANGE ran: it is in both.
    let mut bytes = confirm("ssubscribe", ROOM);
    bytes.extend(push(
        "chatloop:{r:0123456789}:m",
        &[b"H".as_slice(), &entry(b, "b")].concat(),
    ));
    bytes.extend_from_slice(&bulk_array(&[entry(a, "a"), entry(b, "b")]));
    // d came after LRANGE: only as a push.
    bytes.extend_from_slice(&push(
        "chatloop:{r:0123456789}:m",
        &[b"H".as_slice(), &entry(d, "d")].concat(),
    ));
    assert!(c.on_bytes(&bytes, now(11)));
    let events: Vec<Event> = c.drain_events().collect();
    assert_eq!(
        events,
        vec![
            Event::Loaded {
                room: ROOM,
                messages: vec![
                    (a, b"{\"m\":\"a\"}".to_vec()),
                    (b, b"{\"m\":\"b\"}".to_vec())
                ],
                catch_up: false,
            },
            Event::Answer {
                token: 1,
                serial: 1,
                query: Query::Subscribe(ROOM),
                answer: Answer::Done,
            },
            Event::Deliver {
                room: ROOM,
                id: d,
                json: b"{\"m\":\"d\"}".to_vec(),
            },
        ]
    );
}

#[test]
fn a_chat_is_stored_and_published_by_one_script() {
    let mut c = up();
    let id = MsgId(5 << 80);
    c.apply(
        Op::Publish {
            room: ROOM,
            id,
            json: b"{}".to_vec(),
            message_ttl: None,
        },
        now(10),
    );
    let out = String::from_utf8_lossy(&c.links[0].out).to_string();
    assert!(out.starts_with("*13\r\n$4\r\nEVAL\r\n"), "{out}");
    for part in [
        "RPUSH",
        "LREM",
        "PUBLISH",
        "chatloop:{r:0123456789}:h",
        "chatloop:{r:0123456789}:m",
        "chatloop:{r:0123456789}:hn",
    ] {
        assert!(out.contains(part), "{part} missing in {out}");
    }
    assert!(
        out.contains("$4\r\n1000\r\n") && out.contains("$3\r\n100\r\n$1\r\n0\r\n"),
        "capped at --history and --history-notices, and not a notice: {out}"
    );
    assert!(out.contains(&format!("{id}{{}}")), "{out}");
    // The script's reply comes after the push of its own message (a subscriber's own push).
    let mut bytes = push("chatloop:{r:0123456789}:m", format!("H{id}{{}}").as_bytes());
    bytes.extend_from_slice(b":1\r\n");
    let sent = c.sent();
    assert!(c.on_bytes(&bytes, now(11)));
    assert_eq!(c.answered(), sent);
}

#[test]
fn typing_is_not_delivered_back_to_its_sender() {
    let mut c = up();
    c.fetch(1, 1, Query::Subscribe(ROOM), now(10));
    assert!(c.on_bytes(&subscribed_then(&bulk_array(&[])), now(11)));
    c.drain_events().for_each(drop);
    c.apply(
        Op::Typing {
            room: ROOM,
            except: Some(ConnId(42)),
            json: b"{\"type\":\"typing\"}".to_vec(),
        },
        now(12),
    );
    let out = c.links[0].out.clone();
    let at = out.windows(9).position(|w| w == b"Tabcdef01").unwrap();
    let payload = &out[at..at + 17 + 17];
    assert!(c.on_bytes(&push("chatloop:{r:0123456789}:m", payload), now(13)));
    // The same payload from another node excludes nobody here.
    let mut other = payload.to_vec();
    other[1..9].copy_from_slice(b"99999999");
    assert!(c.on_bytes(&push("chatloop:{r:0123456789}:m", &other), now(13)));
    let excepts: Vec<Option<ConnId>> = c
        .drain_events()
        .filter_map(|e| match e {
            Event::Typing { except, .. } => Some(except),
            _ => None,
        })
        .collect();
    assert_eq!(excepts, vec![Some(ConnId(42)), None]);
}

#[test]
fn presence_follows_members_and_the_last_leave_unsubscribes() {
    let mut c = up();
    c.fetch(1, 1, Query::Subscribe(ROOM), now(10));
    assert!(c.on_bytes(&subscribed_then(&bulk_array(&[])), now(11)));
    c.links[0].out.clear();
    let joined = |conn| Op::Joined {
        room: ROOM,
        conn: ConnId(conn),
        session: SessionId(conn as u128),
        user: Rc::from("bo:b"),
        user_id: UserId(0x1234),
        settings: RoomSettings::default(),
    };
    c.apply(joined(3), now(12));
    let out = String::from_utf8_lossy(&c.links[0].out).to_string();
    assert!(out.contains("abcdef01:3:00001234:bo:b"), "{out}");
    c.apply(joined(4), now(12));
    c.links[0].out.clear();
    let left = |conn| Op::Left {
        room: ROOM,
        conn: ConnId(conn),
        session: SessionId(conn as u128),
    };
    c.apply(left(3), now(13));
    let out = String::from_utf8_lossy(&c.links[0].out).to_string();
    assert!(
        out.contains("ZREM") && !out.contains("UNSUBSCRIBE"),
        "{out}"
    );
    c.apply(left(4), now(13));
    let out = String::from_utf8_lossy(&c.links[0].out).to_string();
    assert!(out.contains("UNSUBSCRIBE"), "{out}");
    // Presence entries parse back into users.
    assert_eq!(
        presence_user(b"abcdef01:3:00001234:bo:b"),
        Some(("bo:b".to_string(), UserId(0x1234)))
    );
}

#[test]
fn heartbeats_refresh_presence_every_third_of_its_ttl() {
    let mut c = up();
    c.apply(
        Op::Joined {
            room: ROOM,
            conn: ConnId(1),
            session: SessionId(1),
            user: Rc::from("al"),
            user_id: UserId(1),
            settings: RoomSettings::default(),
        },
        now(10),
    );
    c.links[0].out.clear();
    let due = c.poll_timeout().unwrap();
    assert!(due <= Micros::from_secs(6), "{due:?}");
    c.on_timer(now(due.0 / 1000));
    let out = String::from_utf8_lossy(&c.links[0].out).to_string();
    assert!(
        out.contains("ZADD") && out.contains("chatloop:{r:0123456789}:p"),
        "{out}"
    );
    assert!(
        out.contains("chatloop:{s:"),
        "sessions with sockets slide: {out}"
    );
}

#[test]
fn a_redis_that_stops_answering_is_treated_as_gone() {
    let mut c = up();
    c.fetch(1, 1, Query::AllRooms, now(1000));
    let due = c.poll_timeout().unwrap();
    assert!(due <= Micros::from_millis(1000) + REPLY_TIMEOUT, "{due:?}");
    c.on_timer(now(1000 + 4_000));
    assert!(c.is_up(), "not yet");
    c.on_timer(now(1000 + 5_000));
    assert!(!c.is_up());
    let events: Vec<Event> = c.drain_events().collect();
    assert_eq!(
        events,
        vec![
            Event::Failed {
                token: 1,
                serial: 1
            },
            Event::Down
        ]
    );
}

#[test]
fn after_a_reconnect_rooms_with_members_load_again_to_catch_up() {
    let mut c = up();
    c.apply(
        Op::Joined {
            room: ROOM,
            conn: ConnId(1),
            session: SessionId(1),
            user: Rc::from("al"),
            user_id: UserId(1),
            settings: RoomSettings::default(),
        },
        now(10),
    );
    c.on_disconnected(now(20));
    c.drain_events().for_each(drop);
    assert!(c.should_connect(now(200)));
    c.on_connected(0);
    assert!(c.on_bytes(b"%0\r\n+OK\r\n", now(201)));
    assert!(c.on_bytes(NOT_A_CLUSTER, now(201)));
    let out = String::from_utf8_lossy(&c.links[0].out).to_string();
    assert!(out.contains("SUBSCRIBE") && out.contains("LRANGE"), "{out}");
    c.links[0].out.clear();
    let id = MsgId(9 << 80);
    // Replies in order: everything before the LRANGE is an ignored write, then the LRANGE.
    let before = c.links[0]
        .pending
        .iter()
        .position(|e| matches!(e.pending, Pending::Load { .. }))
        .unwrap();
    let mut bytes = acks(&c, before);
    bytes.extend_from_slice(&bulk_array(&[entry(id, "missed")]));
    assert!(c.on_bytes(&bytes, now(202)));
    let loaded: Vec<Event> = c
        .drain_events()
        .filter(|e| matches!(e, Event::Loaded { .. }))
        .collect();
    assert_eq!(
        loaded,
        vec![Event::Loaded {
            room: ROOM,
            messages: vec![(id, b"{\"m\":\"missed\"}".to_vec())],
            catch_up: true,
        }]
    );
}

#[test]
fn expired_presence_of_another_node_is_announced_by_the_node_that_removed_it() {
    let mut c = up();
    c.apply(
        Op::Joined {
            room: ROOM,
            conn: ConnId(1),
            session: SessionId(1),
            user: Rc::from("al"),
            user_id: UserId(1),
            settings: RoomSettings::default(),
        },
        now(10),
    );
    ack_all(&mut c);
    c.links[0].out.clear();
    let due = c.poll_timeout().unwrap();
    c.on_timer(now(due.0 / 1000));
    let out = String::from_utf8_lossy(&c.links[0].out).to_string();
    assert!(out.contains("ZREMRANGEBYSCORE"), "{out}");
    let mut bytes = bulk_array(&[
        b"0badcafe:7:00000042:zed".to_vec(),
        b"abcdef01:2:00000001:al".to_vec(), // our own: still here, not announced
    ]);
    bytes.extend_from_slice("+OK\r\n".repeat(c.links[0].pending.len() - 1).as_bytes());
    assert!(c.on_bytes(&bytes, now(due.0 / 1000 + 1)));
    let departed: Vec<Event> = c.drain_events().collect();
    assert_eq!(
        departed,
        vec![Event::Departed {
            room: ROOM,
            user: "zed".into(),
            user_id: UserId(0x42),
        }]
    );
}

#[test]
fn a_room_loaded_for_a_join_that_never_happened_is_reloaded_after_a_reconnect_too() {
    let mut c = up();
    c.fetch(1, 1, Query::Subscribe(ROOM), now(10));
    assert!(c.on_bytes(&subscribed_then(&bulk_array(&[])), now(11)));
    c.on_disconnected(now(20));
    assert!(c.should_connect(now(200)));
    c.on_connected(0);
    c.links[0].out.clear();
    assert!(c.on_bytes(b"%0\r\n+OK\r\n", now(201)));
    assert!(c.on_bytes(NOT_A_CLUSTER, now(201)));
    let out = String::from_utf8_lossy(&c.links[0].out).to_string();
    assert!(
        out.contains("SUBSCRIBE\r\n$25\r\nchatloop:{r:0123456789}:m") && out.contains("LRANGE"),
        "{out}"
    );
}

// ---- hostile replies: the pre-scan ---------------------------------------------------------

const LIM: resp::Limits = resp::Limits {
    depth: 16,
    bytes: 1 << 20,
    elements: 10_000,
};

/// Scans `bytes` fed in pieces of `step` bytes, as reads would deliver them.
fn scan_in_steps(bytes: &[u8], step: usize, lim: &resp::Limits) -> resp::Scan {
    let mut s = resp::Scanner::default();
    let mut have = 0;
    loop {
        have = (have + step).min(bytes.len());
        match s.scan(&bytes[..have], lim) {
            resp::Scan::Incomplete if have < bytes.len() => continue,
            r => return r,
        }
    }
}

fn nested(depth: usize) -> Vec<u8> {
    let mut b = b"*1\r\n".repeat(depth);
    b.extend_from_slice(b":1\r\n");
    b
}

#[test]
fn the_prescan_finds_where_each_reply_ends_whatever_the_reads() {
    let hello = b"%2\r\n$6\r\nserver\r\n$5\r\nredis\r\n$7\r\nmodules\r\n*1\r\n%1\r\n$4\r\nname\r\n$2\r\nfs\r\n"
        .to_vec();
    let mut replies: Vec<Vec<u8>> = vec![
        b"+OK\r\n".to_vec(),
        b"-ERR no\r\n".to_vec(),
        b":42\r\n".to_vec(),
        b"_\r\n".to_vec(),
        b",1.5\r\n".to_vec(),
        b"#t\r\n".to_vec(),
        b"(12345678901234567890\r\n".to_vec(),
        b"$0\r\n\r\n".to_vec(),
        b"$5\r\na\r\nbc\r\n".to_vec(), // CRLF inside a bulk string is data
        b"!3\r\nerr\r\n".to_vec(),
        b"=7\r\ntxt:abc\r\n".to_vec(),
        b"*0\r\n".to_vec(),
        b"~2\r\n:1\r\n:2\r\n".to_vec(),
        hello,
        push("chatloop:{r:0123456789}:m", b"Hxyz"),
        bulk_array(&[b"a".to_vec(), Vec::new(), b"ccc".to_vec()]),
        nested(16),
    ];
    replies.push(replies.concat()); // a frame is only the first one of a buffer
    for r in &replies {
        let first = replies.iter().find(|x| r.starts_with(x)).unwrap().len();
        for step in [1, 2, 3, 7, r.len()] {
            assert_eq!(
                scan_in_steps(r, step, &LIM),
                resp::Scan::Complete(first),
                "{:?} in steps of {step}",
                String::from_utf8_lossy(r)
            );
        }
        // The decoder agrees on where the frame ends.
        let (_, used) = decode(r).unwrap().unwrap();
        assert_eq!(used, first);
    }
}

#[test]
fn the_prescan_refuses_deep_huge_and_unknown_replies_before_decoding() {
    use resp::{Bad, Scan};
    let invalid = |b: &[u8]| match scan_in_steps(b, b.len(), &LIM) {
        Scan::Invalid(why) => why,
        other => panic!(
            "{:?}: {other:?}",
            String::from_utf8_lossy(&b[..b.len().min(40)])
        ),
    };
    // 17 levels is one too many; the 5 000 levels that overflowed the decoder's stack are
    // refused at level 17, in steps as well.
    assert_eq!(invalid(&nested(17)), Bad::TooDeep(16));
    assert_eq!(invalid(&nested(5000)), Bad::TooDeep(16));
    for step in [1, 5, 4096] {
        assert_eq!(
            scan_in_steps(&nested(5000), step, &LIM),
            Scan::Invalid(Bad::TooDeep(16))
        );
    }
    let mut deep_map = b"%1\r\n+k\r\n".repeat(20);
    deep_map.extend_from_slice(b":1\r\n");
    assert_eq!(invalid(&deep_map), Bad::TooDeep(16));
    // A bulk length over the limit is refused from its header, before any payload.
    for h in [
        &b"$2000000000\r\n"[..],
        b"!2000000000\r\n",
        b"=99999999999999999\r\n",
        b"*1\r\n$1048577\r\n",
    ] {
        assert!(matches!(invalid(h), Bad::TooLong { .. }), "{h:?}");
    }
    // Counts over the element limit, from the header too.
    assert!(matches!(
        invalid(b"*2000000000\r\n"),
        Bad::TooManyElements { .. }
    ));
    assert!(matches!(invalid(b"%6000\r\n"), Bad::TooManyElements { .. }));
    let many = bulk_array(&vec![Vec::new(); 10_001]);
    assert!(matches!(invalid(&many), Bad::TooManyElements { .. }));
    // Lengths that are not plain numbers: negative, streamed, empty, junk.
    for h in [
        &b"$-1\r\n"[..],
        b"*-1\r\n",
        b"*?\r\n",
        b"$?\r\n",
        b"$\r\n",
        b"*1x\r\n",
    ] {
        assert_eq!(invalid(h), Bad::BadLength, "{h:?}");
    }
    // Types Redis does not send chatloop: attributes, stream ends, inline text, HELLO.
    for h in [
        &b"|1\r\n+a\r\n+b\r\n:1\r\n"[..],
        b".\r\n",
        b"HELLO 3\r\n",
        b"x\r\n",
    ] {
        assert!(matches!(invalid(h), Bad::Type(_)), "{h:?}");
    }
    assert_eq!(invalid(b"$3\r\nabcde\r\n"), Bad::NoCrlf);
    let mut long = b"+".to_vec();
    long.extend(std::iter::repeat_n(b'a', resp::LINE_MAX + 2));
    assert_eq!(invalid(&long), Bad::LongLine);
    // Incomplete is not invalid: a header or payload still on its way.
    for partial in [
        &b"$5\r\nab"[..],
        b"*3\r\n:1\r\n",
        b"+O",
        b"",
        b"*1\r\n*1\r\n",
    ] {
        assert_eq!(
            resp::Scanner::default().scan(partial, &LIM),
            Scan::Incomplete,
            "{partial:?}"
        );
    }
}

#[test]
fn a_hostile_reply_breaks_the_link_without_buffering_or_crashing() {
    // The 20 KB of nesting that aborted the node, as a reply and as a push.
    for bytes in [nested(5000), [b">1\r\n".as_slice(), &nested(5000)].concat()] {
        let mut c = up();
        c.fetch(1, 1, Query::AllRooms, now(10));
        assert!(!c.on_bytes(&bytes, now(11)));
        assert!(c.links.iter().all(|l| l.inbuf.is_empty()), "nothing kept");
    }
    // A huge bulk header: refused at once, even before its payload starts.
    let mut c = up();
    c.fetch(1, 1, Query::AllRooms, now(10));
    assert!(!c.on_bytes(b"*1\r\n$2000000000\r\n", now(11)));
    // Limits follow the settings: a room's whole history of the longest messages fits
    // (1000 chats and 100 notices, 16 KiB of text each, names of 50 escaped characters).
    let lim = ClusterConfig::reply_limits(1100, 16 * 1024, 100_000);
    let longest = vec![b'x'; 36 + 200 + 50 * 6 + 16 * 1024];
    let history = bulk_array(&vec![longest; 1100]);
    assert_eq!(
        resp::Scanner::default().scan(&history, &lim),
        resp::Scan::Complete(history.len())
    );
    assert!(lim.bytes < 32 << 20, "{lim:?}");
}

#[test]
fn errors_and_odd_types_where_data_is_expected_fail_the_request_or_the_link() {
    let mut c = up();
    // An error for a fetch: that request fails (503), the link stays.
    c.fetch(1, 1, Query::Presence(ROOM), now(10));
    assert!(c.on_bytes(b"-WRONGTYPE Operation against a key\r\n", now(11)));
    assert_eq!(
        c.drain_events().collect::<Vec<_>>(),
        vec![Event::Failed {
            token: 1,
            serial: 1
        }]
    );
    // Another type where an array is expected: an empty answer, never a panic.
    c.fetch(2, 1, Query::Presence(ROOM), now(12));
    c.fetch(3, 1, Query::UserCount(ROOM), now(12));
    c.fetch(4, 1, Query::Session(SessionId(9)), now(12));
    assert!(c.on_bytes(b"%1\r\n:1\r\n:2\r\n$3\r\nabc\r\n*1\r\n:5\r\n", now(13)));
    let answers: Vec<Answer> = c
        .drain_events()
        .filter_map(|e| match e {
            Event::Answer { answer, .. } => Some(answer),
            _ => None,
        })
        .collect();
    assert_eq!(
        answers,
        vec![
            Answer::Users(vec![]),
            Answer::Count(0),
            Answer::Session(None)
        ]
    );
    // An error for a history load (LOADING after a restart): not an empty history, which
    // would wipe this node's copy; the link is tried again.
    c.fetch(5, 1, Query::Subscribe(ROOM), now(14));
    assert!(!c.on_bytes(b"-LOADING Redis is loading the dataset\r\n", now(15)));
}

#[test]
fn redis_errors_are_logged_without_the_arguments_they_quote() {
    assert_eq!(
        redis_error("ERR unknown command 'EVAL', with args beginning with: 'secret'"),
        "ERR unknown command"
    );
    assert_eq!(
        redis_error("WRONGTYPE Operation against a key holding the wrong kind of value"),
        "WRONGTYPE Operation against a key holding the wrong kind of value"
    );
    assert_eq!(redis_error("'x'"), "an error");
    assert!(redis_error(&"é".repeat(500)).len() <= 240);
}

// ---- history events Redis did not confirm ---------------------------------------------------

fn publish(c: &mut Cluster, id: MsgId, at: u64) {
    c.apply(
        Op::Publish {
            room: ROOM,
            id,
            json: format!("{{\"n\":{}}}", id.0 >> 80).into_bytes(),
            message_ttl: None,
        },
        now(at),
    );
}

fn unconfirmed(events: &[Event]) -> Vec<MsgId> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Unconfirmed { room, id, json } => {
                assert_eq!(*room, ROOM);
                assert_eq!(json, &format!("{{\"n\":{}}}", id.0 >> 80).into_bytes());
                Some(*id)
            }
            _ => None,
        })
        .collect()
}

#[test]
fn events_unconfirmed_when_the_link_drops_come_back_in_order_unless_echoed() {
    let mut c = up();
    c.fetch(1, 1, Query::Subscribe(ROOM), now(1));
    assert!(c.on_bytes(&subscribed_then(&bulk_array(&[])), now(2)));
    c.drain_events().for_each(drop);
    let ids: Vec<MsgId> = (1..=4).map(|i| MsgId(i << 80)).collect();
    for &id in &ids {
        publish(&mut c, id, 10);
    }
    // 1 is answered, 2 only echoed (the reply got stuck), 3 and 4 nothing at all.
    let mut bytes = push(
        "chatloop:{r:0123456789}:m",
        format!("H{}{{}}", ids[0]).as_bytes(),
    );
    bytes.extend_from_slice(b":1\r\n");
    bytes.extend_from_slice(&push(
        "chatloop:{r:0123456789}:m",
        format!("H{}{{}}", ids[1]).as_bytes(),
    ));
    assert!(c.on_bytes(&bytes, now(11)));
    assert_eq!(c.drain_events().count(), 2, "two deliveries");
    c.on_timer(now(11 + 5_000)); // silent for 5 s: gone
    let events: Vec<Event> = c.drain_events().collect();
    assert_eq!(unconfirmed(&events), vec![ids[2], ids[3]]);
    assert_eq!(events.last(), Some(&Event::Down), "before Down: {events:?}");
    assert!(c.awaiting.is_empty() && c.queued() == 0);
    // While down, an event is handed back at once.
    publish(&mut c, MsgId(9 << 80), 6000);
    assert_eq!(
        unconfirmed(&c.drain_events().collect::<Vec<_>>()),
        vec![MsgId(9 << 80)]
    );
}

#[test]
fn an_event_redis_refuses_comes_back_unconfirmed() {
    let mut c = up();
    publish(&mut c, MsgId(1 << 80), 10);
    publish(&mut c, MsgId(2 << 80), 10);
    assert!(c.on_bytes(
        b"-OOM command not allowed when used memory > 'maxmemory'.\r\n:0\r\n",
        now(11)
    ));
    assert!(c.is_up());
    assert_eq!(
        unconfirmed(&c.drain_events().collect::<Vec<_>>()),
        vec![MsgId(1 << 80)]
    );
}

#[test]
fn a_full_queue_toward_redis_counts_as_down_and_hands_events_back() {
    let mut cfg = cfg();
    cfg.max_queue = 64 * 1024;
    let mut c = Cluster::new(cfg, 7);
    c.should_connect(now(0));
    c.on_connected(0);
    assert!(c.on_bytes(b"%0\r\n+OK\r\n", now(1)));
    assert!(c.on_bytes(NOT_A_CLUSTER, now(1)));
    ack_all(&mut c);
    c.drain_events().for_each(drop);
    assert!(!c.check_queue(now(2)));
    let json = vec![b'x'; 1000];
    let mut n = 0u128;
    while c.queued() <= 64 * 1024 {
        n += 1;
        c.apply(
            Op::Publish {
                room: ROOM,
                id: MsgId(n << 80),
                json: json.clone(),
                message_ttl: None,
            },
            now(3),
        );
        // A trickle of unrelated replies keeps the 5 s reply timeout away.
        assert!(c.on_bytes(b"", now(3)));
    }
    let queued = c.queued();
    assert!(
        queued < 64 * 1024 + 4000,
        "overshoots by one command at most: {queued}"
    );
    assert!(c.drain_events().next().is_none());
    // Over the limit: further events are not queued but handed back at once...
    c.apply(
        Op::Publish {
            room: ROOM,
            id: MsgId(1000 << 80),
            json: json.clone(),
            message_ttl: None,
        },
        now(4),
    );
    assert_eq!(c.queued(), queued);
    let back: Vec<Event> = c.drain_events().collect();
    assert!(
        matches!(&back[..], [Event::Unconfirmed { id, .. }] if *id == MsgId(1000 << 80)),
        "{back:?}"
    );
    c.fetch(1, 1, Query::AllRooms, now(4));
    assert_eq!(
        c.drain_events().collect::<Vec<_>>(),
        vec![Event::Failed {
            token: 1,
            serial: 1
        }]
    );
    // ...and the loop's check drops the link, even if a reply shrank the queue meanwhile
    // (the writes refused above must not pass for acknowledged): every queued event comes
    // back, then Down.
    assert!(c.on_bytes(b"+OK\r\n", now(5)));
    assert!(c.queued() <= 64 * 1024);
    assert!(c.check_queue(now(5)));
    assert!(!c.is_up());
    let events: Vec<Event> = c.drain_events().collect();
    assert_eq!(events.len(), n as usize);
    assert_eq!(events.last(), Some(&Event::Down));
    assert_eq!(c.queued(), 0);
}

#[test]
fn room_settings_from_redis_never_make_a_room_more_open() {
    let read = |fields: &[(&str, &str)]| {
        read_settings(
            fields
                .iter()
                .map(|(k, v)| {
                    (
                        OwnedFrame::BlobString {
                            data: k.as_bytes().to_vec(),
                            attributes: None,
                        },
                        OwnedFrame::BlobString {
                            data: v.as_bytes().to_vec(),
                            attributes: None,
                        },
                    )
                })
                .collect(),
        )
    };
    assert_eq!(read(&[]), RoomSettings::default());
    // A garbled invite hash still makes the room private, with an invite nobody has.
    for bad in ["xyz", &"g".repeat(64), &"a".repeat(63)] {
        assert_eq!(read(&[("i", bad)]).invite, Some([0u8; 32]), "{bad}");
    }
    // A garbled lifetime is the shortest one, never none.
    for bad in ["", "-5", "abc", "99999999999999999999", "0"] {
        assert_eq!(
            read(&[("t", bad)]).message_ttl,
            Some(Micros(1_000_000)),
            "{bad}"
        );
    }
    let h = hex32(&[0x5a; 32]);
    let s = read(&[("i", std::str::from_utf8(&h).unwrap()), ("t", "60000")]);
    assert_eq!(s.invite, Some([0x5a; 32]));
    assert_eq!(s.message_ttl, Some(Micros(60_000_000)));
}

#[test]
fn a_private_room_is_written_with_its_settings_before_the_registry() {
    let mut c = up_with(ClusterConfig {
        room_list: true,
        ..cfg()
    });
    c.links[0].out.clear();
    let settings = RoomSettings {
        invite: Some([7; 32]),
        message_ttl: Some(Micros(5_000_000)),
    };
    c.apply(
        Op::RoomCreated {
            room: ROOM,
            session: SessionId(9),
            settings,
        },
        now(10),
    );
    let out = String::from_utf8_lossy(&c.links[0].out).to_string();
    let hset = out.find("HSET").expect("settings written");
    let sadd = out.find("chatloop:private").expect("listed as private");
    let zadd = out.find("ZADD").expect("in the index of GET /rooms/all");
    let set = out
        .find(&format!("chatloop:{{r:{ROOM}}}:e"))
        .expect("registered");
    assert!(hset < zadd && sadd < zadd && hset < set, "{out}");
    assert!(out.contains(&format!("chatloop:{{r:{ROOM}}}:rm")), "{out}");
    assert!(out.contains(&"07".repeat(32)), "{out}");
    assert!(out.contains("\r\n5000\r\n"), "{out}");
    // A room made the old way writes no settings.
    c.links[0].out.clear();
    c.apply(
        Op::RoomCreated {
            room: ROOM,
            session: SessionId(9),
            settings: RoomSettings::default(),
        },
        now(10),
    );
    let out = String::from_utf8_lossy(&c.links[0].out).to_string();
    assert!(!out.contains("rm:") && !out.contains("private"), "{out}");
    // Without --room-list no command touches a key shared by all rooms.
    let mut c = up();
    c.links[0].out.clear();
    c.apply(
        Op::RoomCreated {
            room: ROOM,
            session: SessionId(9),
            settings,
        },
        now(10),
    );
    let out = String::from_utf8_lossy(&c.links[0].out).to_string();
    assert!(out.contains(&format!("chatloop:{{r:{ROOM}}}:e")), "{out}");
    assert!(!out.contains("chatloop:rooms"), "{out}");
}

// ---- a sharded Redis Cluster (three masters) -------------------------------------------

/// `CLUSTER SLOTS` of three masters `a:1`, `b:1`, `c:1` (links 1, 2, 3).
const THREE: &[u8] = b"*3\r\n*3\r\n:0\r\n:5460\r\n*2\r\n$1\r\na\r\n:1\r\n\
*3\r\n:5461\r\n:10922\r\n*2\r\n$1\r\nb\r\n:1\r\n\
*3\r\n:10923\r\n:16383\r\n*2\r\n$1\r\nc\r\n:1\r\n";

/// Answers every command pending on link `i` with success.
fn ack_link(c: &mut Cluster, i: usize) {
    let mut out = Vec::new();
    for e in &c.links[i].pending {
        match e.pending {
            Pending::Subscribe(r) => out.extend(confirm("ssubscribe", r)),
            Pending::Unsubscribe(r) => out.extend(confirm("sunsubscribe", r)),
            _ => out.extend_from_slice(b"+OK\r\n"),
        }
    }
    assert!(c.on_link_bytes(i, &out, now(2)));
}

/// Up on three masters: a link to the seed, then one to each master.
fn up_sharded() -> Cluster {
    let mut c = Cluster::new(cfg(), 0xabcdef01);
    assert!(c.should_connect(now(0)));
    c.on_connected(0);
    assert!(c.on_bytes(b"%0\r\n+OK\r\n", now(1)));
    assert!(c.on_bytes(THREE, now(1)));
    assert!(!c.is_up(), "not before every master's link is ready");
    assert_eq!(c.link_count(), 4);
    assert_eq!(c.shards(), 3);
    for i in 1..4 {
        c.on_connected(i);
        let text = String::from_utf8_lossy(&c.links[i].out).to_string();
        assert!(text.contains("HELLO") && !text.contains("SELECT"), "{text}");
        c.links[i].out.clear();
        assert!(c.on_link_bytes(i, b"%0\r\n", now(1)));
    }
    assert!(c.is_up());
    assert_eq!(c.drain_events().collect::<Vec<_>>(), vec![Event::Up]);
    for i in 0..4 {
        ack_link(&mut c, i);
        c.links[i].out.clear();
    }
    c
}

/// The link of the master serving `slot` in [`THREE`].
fn link_of_slot(slot: u16) -> usize {
    match slot {
        0..=5460 => 1,
        5461..=10922 => 2,
        _ => 3,
    }
}

/// The link of the room's master, and another one.
fn room_links() -> (usize, usize) {
    let owner = link_of_slot(slots::key_slot(b"chatloop:{r:0123456789}:h"));
    (owner, owner % 3 + 1)
}

fn addr_of(link: usize) -> &'static str {
    ["", "a:1", "b:1", "c:1"][link]
}

fn out_text(c: &Cluster, i: usize) -> String {
    String::from_utf8_lossy(&c.links[i].out).into_owned()
}

#[test]
fn on_a_sharded_cluster_a_rooms_commands_go_to_its_master_and_session_keys_to_theirs() {
    let mut c = up_sharded();
    let (owner, _) = room_links();
    publish(&mut c, MsgId(1 << 80), 10);
    assert!(out_text(&c, owner).contains("SPUBLISH"));
    for i in (0..4).filter(|&i| i != owner) {
        assert!(c.links[i].out.is_empty(), "link {i}: {}", out_text(&c, i));
    }
    // A session's keys go where their own slot is; the ctl channel to the seed's link.
    c.apply(Op::SessionEnded(SessionId(77)), now(11));
    let slot = slots::key_slot(format!("chatloop:{{s:{}}}:s", SessionId(77)).as_bytes());
    let session_link = link_of_slot(slot);
    assert!(out_text(&c, session_link).contains("DEL"));
    assert!(out_text(&c, 0).contains("PUBLISH\r\n$12\r\nchatloop:ctl"));
}

#[test]
fn moved_updates_the_map_and_resends_the_slots_commands_in_their_first_order() {
    let mut c = up_sharded();
    let (owner, other) = room_links();
    let slot = slots::key_slot(b"chatloop:{r:0123456789}:h");
    let ids: Vec<MsgId> = (1..=4).map(|i| MsgId(i << 80)).collect();
    publish(&mut c, ids[0], 10);
    publish(&mut c, ids[1], 10);
    c.links[owner].out.clear();
    let moved = format!("-MOVED {slot} {}\r\n", addr_of(other));
    // The first is moved while the second is still in flight on the old master: nothing
    // goes out yet, and a third waits behind them.
    assert!(c.on_link_bytes(owner, moved.as_bytes(), now(11)));
    assert!(c.links[other].out.is_empty(), "{}", out_text(&c, other));
    publish(&mut c, ids[2], 11);
    assert!(c.links[other].out.is_empty() && c.links[owner].out.is_empty());
    assert!(c.answered() < c.sent(), "held responses keep waiting");
    assert!(c.on_link_bytes(owner, moved.as_bytes(), now(12)));
    let text = out_text(&c, other);
    let at: Vec<usize> = ids[..3]
        .iter()
        .map(|id| text.find(&id.to_string()).expect("resent"))
        .collect();
    assert!(
        at[0] < at[1] && at[1] < at[2],
        "in their first order: {text}"
    );
    // The map now says the new master: the next one goes there at once.
    c.links[other].out.clear();
    publish(&mut c, ids[3], 13);
    assert!(out_text(&c, other).contains(&ids[3].to_string()));
    assert!(c.links[owner].out.is_empty());
    ack_link(&mut c, other);
    assert_eq!(c.answered(), c.sent());
    assert!(unconfirmed(&c.drain_events().collect::<Vec<_>>()).is_empty());
}

#[test]
fn ask_sends_asking_and_the_command_once_to_the_named_master_without_changing_the_map() {
    let mut c = up_sharded();
    let (owner, other) = room_links();
    let slot = slots::key_slot(b"chatloop:{r:0123456789}:h");
    publish(&mut c, MsgId(1 << 80), 10);
    c.links[owner].out.clear();
    let ask = format!("-ASK {slot} {}\r\n", addr_of(other));
    assert!(c.on_link_bytes(owner, ask.as_bytes(), now(11)));
    let text = out_text(&c, other);
    let asking = text.find("ASKING").expect("ASKING first");
    assert!(
        asking < text.find("EVAL").expect("then the command"),
        "{text}"
    );
    publish(&mut c, MsgId(2 << 80), 12);
    assert!(
        out_text(&c, owner).contains(&MsgId(2 << 80).to_string()),
        "the slot's master is unchanged"
    );
    ack_link(&mut c, other);
    ack_link(&mut c, owner);
    assert_eq!(c.answered(), c.sent());
}

#[test]
fn tryagain_waits_a_moment_and_redirections_are_bounded() {
    let mut c = up_sharded();
    let (owner, other) = room_links();
    let slot = slots::key_slot(b"chatloop:{r:0123456789}:h");
    let id = MsgId(1 << 80);
    publish(&mut c, id, 10);
    c.links[owner].out.clear();
    assert!(c.on_link_bytes(
        owner,
        b"-TRYAGAIN Multiple keys request during rehashing of slot\r\n",
        now(11)
    ));
    assert!(c.links[owner].out.is_empty(), "not at once");
    assert!(
        c.poll_timeout()
            .is_some_and(|t| t <= now(11).mono + TRYAGAIN_DELAY)
    );
    c.on_timer(now(30));
    assert!(c.links[owner].out.is_empty(), "not before the delay");
    c.on_timer(now(61));
    assert!(out_text(&c, owner).contains(&id.to_string()), "sent again");
    // A cluster that keeps redirecting gets the command back as refused, never a loop:
    // the TRYAGAIN above was its first redirection, these are the rest.
    let mut at = owner;
    for k in 0..MAX_REDIRECTS as usize {
        assert!(!c.has_events(), "not given up after {} redirections", k + 1);
        let to = if at == owner { other } else { owner };
        let moved = format!("-MOVED {slot} {}\r\n", addr_of(to));
        assert!(c.on_link_bytes(at, moved.as_bytes(), now(70 + k as u64)));
        at = to;
    }
    let events: Vec<Event> = c.drain_events().collect();
    assert_eq!(unconfirmed(&events), vec![id], "{events:?}");
    assert!(c.links.iter().all(|l| l.pending.is_empty()));
    assert_eq!(c.answered(), c.sent());
}

#[test]
fn a_subscription_redis_drops_for_a_moved_slot_is_made_again_and_the_room_reloaded() {
    let mut c = up_sharded();
    let (owner, other) = room_links();
    let slot = slots::key_slot(b"chatloop:{r:0123456789}:h");
    c.fetch(1, 1, Query::Subscribe(ROOM), now(10));
    let text = out_text(&c, owner);
    assert!(
        text.contains("SSUBSCRIBE") && text.contains("LRANGE"),
        "{text}"
    );
    let a = MsgId(1 << 80);
    let mut bytes = confirm("ssubscribe", ROOM);
    bytes.extend(bulk_array(&[entry(a, "a")]));
    assert!(c.on_link_bytes(owner, &bytes, now(11)));
    c.drain_events().for_each(drop);
    c.links[owner].out.clear();
    // The slot moved away: Redis ends the subscription itself.
    assert!(c.on_link_bytes(owner, &confirm("sunsubscribe", ROOM), now(12)));
    let text = out_text(&c, owner);
    assert!(
        text.contains("SSUBSCRIBE") && text.contains("LRANGE"),
        "{text}"
    );
    // The old master says where the slot went; both follow, in order.
    let moved = format!("-MOVED {slot} {}\r\n", addr_of(other));
    assert!(c.on_link_bytes(owner, format!("{moved}{moved}").as_bytes(), now(13)));
    let text = out_text(&c, other);
    assert!(
        text.find("SSUBSCRIBE").unwrap() < text.find("LRANGE").unwrap(),
        "{text}"
    );
    let b = MsgId(2 << 80);
    let mut bytes = confirm("ssubscribe", ROOM);
    bytes.extend(bulk_array(&[entry(a, "a"), entry(b, "b")]));
    assert!(c.on_link_bytes(other, &bytes, now(14)));
    assert_eq!(
        c.drain_events().collect::<Vec<_>>(),
        vec![Event::Loaded {
            room: ROOM,
            messages: vec![
                (a, b"{\"m\":\"a\"}".to_vec()),
                (b, b"{\"m\":\"b\"}".to_vec())
            ],
            catch_up: true,
        }]
    );
    assert_eq!(c.answered(), c.sent());
}
