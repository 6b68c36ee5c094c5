use super::*;

use serde_json::{Value, json};

// ---- helpers ------------------------------------------------------------------------

const MS: u64 = 1_000;
const SEC: u64 = 1_000_000;

/// The fake clock at `us` microseconds.
fn at(us: u64) -> Now {
    Now::fake(us)
}

/// The contract's defaults, with caps small enough not to matter.
fn cfg() -> HubConfig {
    HubConfig {
        room_ttl: Micros::from_secs(120),
        session_ttl: Micros::from_secs(86_400),
        history: 1000,
        history_notices: 100,
        welcome_messages: 50,
        max_welcome_bytes: 256 * 1024,
        max_chat_chars: 4096,
        max_chat_bytes: 16 * 1024,
        max_room_members: 10_000,
        chat_rate: 20,
        chat_burst: 40,
        upgrade_rate: 2,
        upgrade_burst: 20,
        typing_debounce: Micros::from_secs(1),
        typing_quiet: Micros::from_secs(3),
        typing_max_per_sec: 50,
        max_sessions: 1000,
        max_rooms: 1000,
        max_rooms_per_session: 0,
        notice_delay: Micros::ZERO,
        min_message_ttl: Micros::from_secs(5),
        max_message_ttl: Micros::from_secs(7 * 86_400),
    }
}

/// Presence notices held for 10 ms (the server's default).
fn held() -> HubConfig {
    HubConfig {
        notice_delay: Micros::from_millis(10),
        ..cfg()
    }
}

/// Every WebSocket frame in a buffer of one or more server text frames, decoded.
#[track_caller]
fn decode_all(mut buf: &[u8]) -> Vec<Value> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let (hlen, len) = match buf[1] & 0x7f {
            126 => (4, usize::from(u16::from_be_bytes([buf[2], buf[3]]))),
            127 => (
                10,
                u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
            ),
            n => (2, usize::from(n)),
        };
        assert_eq!(buf[0], 0x81, "a final text frame");
        out.push(serde_json::from_slice(&buf[hlen..hlen + len]).expect("JSON payload"));
        buf = &buf[hlen + len..];
    }
    out
}

/// Every frame `conn` got, each send's buffer split into its frames: (send, frame).
fn batches_for(actions: &[Action], conn: ConnId) -> Vec<Vec<Value>> {
    raw_for(actions, conn)
        .iter()
        .map(|f| decode_all(f))
        .collect()
}

/// `type` and `user` of each frame, to compare sequences of events at a glance.
fn events(frames: &[Value]) -> Vec<(String, String)> {
    frames
        .iter()
        .map(|f| {
            let user = f["user"].as_str().unwrap_or("").to_string();
            (f["type"].as_str().unwrap().to_string(), user)
        })
        .collect()
}

fn ev(kind: &str, user: &str) -> (String, String) {
    (kind.to_string(), user.to_string())
}

/// No practical chat rate limit, for tests that send many messages at once.
fn fast() -> HubConfig {
    HubConfig {
        chat_rate: 1_000_000,
        chat_burst: 1_000_000,
        ..cfg()
    }
}

fn c(n: usize) -> ConnId {
    ConnId(n)
}

#[track_caller]
fn decode(frame: &Frame) -> Value {
    let payload = protocol::frame_payload(frame);
    serde_json::from_slice(payload).unwrap_or_else(|e| {
        panic!(
            "frame is not JSON ({e}): {:?}",
            String::from_utf8_lossy(payload)
        )
    })
}

#[track_caller]
fn drain(hub: &mut Hub) -> Vec<Action> {
    hub.drain_actions().collect()
}

/// The decoded frames sent to `conn`, in order.
#[track_caller]
fn frames_for(actions: &[Action], conn: ConnId) -> Vec<Value> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(to, f) if *to == conn => Some(decode(f)),
            _ => None,
        })
        .collect()
}

/// The raw frames sent to `conn`, in order.
fn raw_for(actions: &[Action], conn: ConnId) -> Vec<Frame> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(to, f) if *to == conn => Some(f.clone()),
            _ => None,
        })
        .collect()
}

/// The `type` of each frame.
fn kinds(frames: &[Value]) -> Vec<&str> {
    frames
        .iter()
        .map(|f| f["type"].as_str().expect("every frame has a string type"))
        .collect()
}

/// Every `Close` action as (conn, code).
fn closes(actions: &[Action]) -> Vec<(ConnId, u16)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Close(conn, code, _) => Some((*conn, *code)),
            _ => None,
        })
        .collect()
}

/// The connections that got at least one frame.
fn recipients(actions: &[Action]) -> Vec<ConnId> {
    let mut v: Vec<ConnId> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(to, _) => Some(*to),
            _ => None,
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

#[track_caller]
fn session(hub: &mut Hub, name: &str, now: Now) -> SessionId {
    hub.create_session(name, now).expect("create_session").0
}

#[track_caller]
fn room(hub: &mut Hub, s: SessionId, now: Now) -> RoomId {
    hub.create_room(s, now).expect("create_room")
}

/// Connects `conn` and returns the actions it caused.
#[track_caller]
fn join(hub: &mut Hub, conn: ConnId, s: SessionId, r: RoomId, now: Now) -> Vec<Action> {
    hub.connect(conn, s, r, None, &[], now).expect("connect");
    drain(hub)
}

#[track_caller]
fn join_since(
    hub: &mut Hub,
    conn: ConnId,
    s: SessionId,
    r: RoomId,
    since: MsgId,
    now: Now,
) -> Vec<Action> {
    hub.connect(conn, s, r, Some(since), &[], now)
        .expect("connect");
    drain(hub)
}

#[track_caller]
fn leave(hub: &mut Hub, conn: ConnId, r: RoomId, now: Now) -> Vec<Action> {
    hub.disconnect(conn, r, now);
    drain(hub)
}

#[track_caller]
fn send_text(hub: &mut Hub, conn: ConnId, r: RoomId, text: &str, now: Now) -> Vec<Action> {
    hub.on_text(conn, r, text, now);
    drain(hub)
}

#[track_caller]
fn say(hub: &mut Hub, conn: ConnId, r: RoomId, msg: &str, now: Now) -> Vec<Action> {
    let text = json!({"type": "chat", "message": msg}).to_string();
    send_text(hub, conn, r, &text, now)
}

#[track_caller]
fn type_key(hub: &mut Hub, conn: ConnId, r: RoomId, now: Now) -> Vec<Action> {
    send_text(hub, conn, r, r#"{"type":"typing"}"#, now)
}

/// Plays the event loop: fires every deadline `poll_timeout` reports up to `until_us`, in
/// order, then `handle_timeout(until_us)` itself; returns the actions.
#[track_caller]
fn run_until(hub: &mut Hub, until_us: u64) -> Vec<Action> {
    let mut out = Vec::new();
    let mut steps = 0;
    while let Some(d) = hub.poll_timeout() {
        if d.0 > until_us {
            break;
        }
        steps += 1;
        assert!(
            steps < 100_000,
            "poll_timeout keeps returning {d:?} though it was handled"
        );
        hub.handle_timeout(at(d.0));
        out.extend(hub.drain_actions());
    }
    hub.handle_timeout(at(until_us));
    out.extend(hub.drain_actions());
    out
}

/// The messages `write_history` returns for a room.
#[track_caller]
fn history(hub: &Hub, r: RoomId, limit: usize) -> Vec<Value> {
    let mut out = b"[".to_vec();
    assert!(
        hub.write_history(r, limit, None, &mut out).is_some(),
        "room exists"
    );
    out.push(b']');
    serde_json::from_slice::<Vec<Value>>(&out).expect("history is a JSON array")
}

fn messages_of(welcome: &Value) -> Vec<String> {
    welcome["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["message"].as_str().unwrap().to_string())
        .collect()
}

#[track_caller]
fn msg_id(v: &Value) -> MsgId {
    MsgId::parse(v["id"].as_str().expect("id")).expect("id is a UUID")
}

/// A hub with one room and `names.len()` members on connections 1, 2, ...; actions drained.
fn room_with(cfg: HubConfig, names: &[&str], now: Now) -> (Hub, RoomId, Vec<SessionId>) {
    let mut hub = Hub::new(cfg);
    let sessions: Vec<SessionId> = names.iter().map(|n| session(&mut hub, n, now)).collect();
    let r = room(&mut hub, sessions[0], now);
    for (i, s) in sessions.iter().enumerate() {
        join(&mut hub, c(i + 1), *s, r, now);
    }
    (hub, r, sessions)
}

// ---- configuration --------------------------------------------------------------------

#[test]
fn default_config_follows_the_contract() {
    let d = HubConfig::default();
    assert_eq!(d.room_ttl, Micros::from_secs(120));
    assert_eq!(d.session_ttl, Micros::from_secs(24 * 3600));
    assert_eq!(d.history, 1000);
    assert_eq!(d.welcome_messages, 50);
    assert_eq!(d.max_chat_chars, 4096);
    assert_eq!(d.max_room_members, 10_000);
    assert_eq!(d.notice_delay, Micros::from_millis(10));
    assert_eq!((d.chat_rate, d.chat_burst), (20, 40));
    assert_eq!(
        (d.typing_debounce, d.typing_quiet),
        (Micros::from_secs(1), Micros::from_secs(3))
    );
    assert_eq!(d.typing_max_per_sec, 50);
    assert_eq!((d.max_sessions, d.max_rooms), (2_000_000, 100_000));
}

// ---- sessions -------------------------------------------------------------------------

#[test]
fn create_session_authenticate_and_view() {
    let mut hub = Hub::new(cfg());
    let (a, uid) = hub.create_session("alice", at(0)).unwrap();
    let (a2, uid2) = hub.create_session("alice", at(0)).unwrap();
    assert_ne!(a, a2, "same name, independent sessions");
    assert_ne!(uid, uid2);
    assert_eq!(hub.authenticate(a, at(SEC)), Ok(()));
    assert_eq!(
        hub.authenticate(a2, at(SEC)),
        Ok(()),
        "a second session does not end the first"
    );
    assert_eq!(
        hub.authenticate(SessionId(12345), at(SEC)),
        Err(HubError::InvalidSession)
    );
    assert_eq!(hub.session_view(SessionId(12345)), None);

    let v = hub.session_view(a).unwrap();
    assert_eq!(&*v.username, "alice");
    assert_eq!(v.user_id, uid);
    assert!(v.rooms.is_empty());
    assert_eq!(hub.stats().sessions, 2);

    let r1 = room(&mut hub, a, at(SEC));
    let r2 = room(&mut hub, a2, at(SEC));
    assert_eq!(hub.session_view(a).unwrap().rooms, vec![r1]);
    assert_eq!(hub.join_room(a, r2), Ok(()));
    assert_eq!(
        hub.join_room(a, r2),
        Ok(()),
        "joining twice lists the room once"
    );
    assert_eq!(hub.session_rooms(a), vec![r1, r2]);
    assert_eq!(hub.join_room(a, RoomId(0x123)), Err(HubError::RoomNotFound));
    hub.leave_room(a, r1);
    assert_eq!(hub.session_rooms(a), vec![r2]);
    assert_eq!(hub.session_rooms(SessionId(1)), Vec::<RoomId>::new());
    assert_eq!(
        hub.create_room(SessionId(1), at(SEC)),
        Err(HubError::InvalidSession)
    );
    assert!(!hub.has_actions());
}

#[test]
fn session_expiry_is_sliding() {
    let mut hub = Hub::new(HubConfig {
        session_ttl: Micros::from_secs(10),
        ..cfg()
    });
    let s = session(&mut hub, "alice", at(0));
    let other = session(&mut hub, "bob", at(0));
    assert!(
        hub.poll_timeout()
            .is_some_and(|d| d <= Micros::from_secs(10))
    );

    // Used at 6 s: lives until 16 s, though its first deadline (10 s) passes.
    assert_eq!(hub.authenticate(s, at(6 * SEC)), Ok(()));
    run_until(&mut hub, 15 * SEC);
    assert_eq!(hub.stats().sessions, 1, "bob, unused, expired at 10 s");
    assert_eq!(
        hub.authenticate(other, at(15 * SEC)),
        Err(HubError::InvalidSession)
    );
    assert_eq!(hub.session_view(other), None);

    // Used again just before the deadline.
    assert_eq!(hub.authenticate(s, at(16 * SEC - 1)), Ok(()));
    run_until(&mut hub, 26 * SEC - 2);
    assert!(hub.session_view(s).is_some());
    assert_eq!(hub.authenticate(s, at(26 * SEC - 2)), Ok(()));

    // Unused for exactly the TTL: refused at once, even before the timer runs, and
    // collected within one tick of the wheel (deadlines are rounded up to whole ms).
    assert_eq!(
        hub.authenticate(s, at(36 * SEC - 2)),
        Err(HubError::InvalidSession)
    );
    run_until(&mut hub, 36 * SEC - 2 + MS);
    assert_eq!(hub.session_view(s), None);
    let st = hub.stats();
    assert_eq!((st.sessions, st.sessions_expired), (0, 2));
    assert_eq!(
        hub.authenticate(s, at(36 * SEC)),
        Err(HubError::InvalidSession)
    );
    assert_eq!(
        hub.create_room(s, at(36 * SEC)),
        Err(HubError::InvalidSession)
    );
    assert!(!hub.has_actions());
}

#[test]
fn session_expiry_with_a_single_late_timeout_call() {
    // The loop may wake late: one handle_timeout long after the deadline still expires it.
    let mut hub = Hub::new(HubConfig {
        session_ttl: Micros::from_secs(10),
        ..cfg()
    });
    let s = session(&mut hub, "alice", at(0));
    hub.handle_timeout(at(9 * SEC));
    assert!(hub.session_view(s).is_some());
    hub.handle_timeout(at(1000 * SEC));
    assert_eq!(hub.session_view(s), None);
    assert_eq!(hub.stats().timers, 0, "no timer left behind");
    assert_eq!(hub.poll_timeout(), None);
}

#[test]
fn an_open_socket_keeps_the_session_alive() {
    let ttl = 10 * SEC;
    let mut hub = Hub::new(HubConfig {
        session_ttl: Micros(ttl),
        room_ttl: Micros::from_secs(1000),
        ..cfg()
    });
    let s = session(&mut hub, "alice", at(0));
    let r = room(&mut hub, s, at(0));
    join(&mut hub, c(1), s, r, at(SEC));
    run_until(&mut hub, 100 * SEC);
    assert_eq!(
        hub.authenticate(s, at(100 * SEC)),
        Ok(()),
        "connected for 99 s with a 10 s TTL"
    );
    assert_eq!(hub.check_connect(s, r, at(100 * SEC)), Ok(()));
    run_until(&mut hub, 200 * SEC);

    // The socket closes at 200 s: the session lives until 210 s.
    leave(&mut hub, c(1), r, at(200 * SEC));
    run_until(&mut hub, 210 * SEC - 1);
    assert!(hub.session_view(s).is_some());
    assert_eq!(hub.check_connect(s, r, at(210 * SEC - 1)), Ok(()));
    assert_eq!(
        hub.check_connect(s, r, at(210 * SEC)),
        Err(HubError::InvalidSession)
    );
    run_until(&mut hub, 210 * SEC);
    assert_eq!(hub.session_view(s), None);
    assert_eq!(hub.stats().sessions, 0);
    assert_eq!(
        hub.authenticate(s, at(210 * SEC)),
        Err(HubError::InvalidSession)
    );
}

#[test]
fn max_sessions_is_a_global_cap() {
    let mut hub = Hub::new(HubConfig {
        max_sessions: 2,
        ..cfg()
    });
    let a = session(&mut hub, "alice", at(0));
    session(&mut hub, "bob", at(0));
    assert_eq!(
        hub.create_session("carol", at(0)),
        Err(HubError::TooManySessions)
    );
    hub.end_session(a, at(0));
    assert!(
        hub.create_session("carol", at(0)).is_ok(),
        "ending one frees a place"
    );
    assert_eq!(hub.stats().sessions, 2);
}

#[test]
fn ending_a_session_cancels_its_timer() {
    // The attack of issue 12: create and end sessions in a loop. Each cycle used to leave a
    // 24 h timer behind in the wheel; now the wheel holds only what is live.
    let mut hub = Hub::new(HubConfig {
        max_sessions: 10,
        ..cfg()
    });
    let keep = session(&mut hub, "resident", at(0));
    assert_eq!(hub.stats().timers, 1);
    for i in 0..100_000u64 {
        let s = session(&mut hub, "mallory", at(i));
        assert_eq!(hub.stats().timers, 2);
        hub.end_session(s, at(i));
    }
    let st = hub.stats();
    assert_eq!(
        (st.sessions, st.timers),
        (1, 1),
        "only the resident's timer is left"
    );
    assert!(hub.session_view(keep).is_some());
    // The one left is the resident's expiry, a day away: nothing wakes for hours (the wheel
    // may wake once before it to move it to a finer level).
    assert!(
        hub.poll_timeout()
            .is_some_and(|t| t > Micros::from_secs(20 * 3600)),
        "{:?}",
        hub.poll_timeout()
    );
}

#[test]
fn timers_follow_what_is_live_in_rooms() {
    let mut hub = Hub::new(cfg());
    let a = session(&mut hub, "alice", at(0));
    let b = session(&mut hub, "bob", at(0));
    let r = room(&mut hub, a, at(0));
    assert_eq!(hub.stats().timers, 3, "two sessions and the empty room");
    join(&mut hub, c(1), a, r, at(SEC));
    assert_eq!(
        hub.stats().timers,
        2,
        "an occupied room has no expiry timer"
    );
    join(&mut hub, c(2), b, r, at(SEC));
    type_key(&mut hub, c(1), r, at(2 * SEC));
    type_key(&mut hub, c(1), r, at(2 * SEC + 100 * MS));
    assert_eq!(hub.stats().timers, 3, "one typing timer per bout of typing");
    say(&mut hub, c(1), r, "hi", at(2 * SEC + 200 * MS));
    assert_eq!(hub.stats().timers, 2, "chat ends typing and its timer");
    type_key(&mut hub, c(2), r, at(3 * SEC));
    assert_eq!(hub.stats().timers, 3);
    leave(&mut hub, c(2), r, at(3 * SEC));
    assert_eq!(hub.stats().timers, 2, "leaving cancels the typing timer");
    leave(&mut hub, c(1), r, at(4 * SEC));
    assert_eq!(
        hub.stats().timers,
        3,
        "the empty room's expiry is armed again"
    );
    // Rejoin and leave many times: still one expiry timer for the room.
    for i in 0..1000 {
        join(&mut hub, c(3), a, r, at(5 * SEC + i));
        leave(&mut hub, c(3), r, at(5 * SEC + i));
    }
    assert_eq!(hub.stats().timers, 3);
    // The room expires 120 s after the last leave, not at any earlier one.
    run_until(&mut hub, 125 * SEC + 998);
    assert!(hub.room_exists(r));
    run_until(&mut hub, 125 * SEC + 1000);
    assert!(!hub.room_exists(r));
    assert_eq!(hub.stats().timers, 2, "just the two sessions' timers");
}

#[test]
fn rooms_per_session_are_capped_and_freed_when_they_expire() {
    let mut hub = Hub::new(HubConfig {
        max_rooms_per_session: 2,
        ..cfg()
    });
    let a = session(&mut hub, "alice", at(0));
    let b = session(&mut hub, "bob", at(0));
    let r1 = room(&mut hub, a, at(0));
    let r2 = room(&mut hub, a, at(SEC));
    assert_eq!(
        hub.create_room(a, at(SEC)),
        Err(HubError::TooManyRoomsForSession)
    );
    // Others are not affected, and joining others' rooms does not count.
    let rb = room(&mut hub, b, at(SEC));
    assert_eq!(hub.join_room(a, rb), Ok(()));
    join(&mut hub, c(1), a, rb, at(SEC));
    assert_eq!(
        hub.create_room(a, at(SEC)),
        Err(HubError::TooManyRoomsForSession)
    );
    // r1 expires (nobody connected); r2 is kept alive by a socket.
    join(&mut hub, c(2), a, r2, at(2 * SEC));
    run_until(&mut hub, 120 * SEC);
    assert!(!hub.room_exists(r1) && hub.room_exists(r2));
    let r3 = room(&mut hub, a, at(120 * SEC));
    assert_eq!(
        hub.create_room(a, at(120 * SEC)),
        Err(HubError::TooManyRoomsForSession)
    );
    // Ending the session forgets its count; the rooms it made live on by their own rules.
    hub.end_session(a, at(121 * SEC));
    drain(&mut hub);
    run_until(&mut hub, 400 * SEC);
    assert!(!hub.room_exists(r2) && !hub.room_exists(r3));
    let c2 = session(&mut hub, "carol", at(400 * SEC));
    room(&mut hub, c2, at(400 * SEC));
    room(&mut hub, c2, at(400 * SEC));
}

// ---- rooms ----------------------------------------------------------------------------

#[test]
fn room_nobody_connected_to_expires_after_room_ttl() {
    let mut hub = Hub::new(cfg());
    let s = session(&mut hub, "alice", at(0));
    let r = room(&mut hub, s, at(5 * SEC));
    assert!(r.0 <= RoomId::MASK);
    assert_eq!(hub.user_count(r), Some(0));
    assert_eq!(hub.all_rooms().collect::<Vec<_>>(), vec![r]);
    run_until(&mut hub, 125 * SEC - 1);
    assert!(hub.room_exists(r));
    run_until(&mut hub, 125 * SEC);
    assert!(!hub.room_exists(r));
    assert_eq!(hub.user_count(r), None);
    assert_eq!(hub.all_rooms().count(), 0);
    assert!(
        hub.session_rooms(s).is_empty(),
        "a session only lists rooms that still exist"
    );
    assert_eq!(hub.join_room(s, r), Err(HubError::RoomNotFound));
    assert_eq!(
        hub.connect(c(1), s, r, None, &[], at(126 * SEC)),
        Err(HubError::RoomNotFound)
    );
    let st = hub.stats();
    assert_eq!((st.rooms, st.rooms_expired), (0, 1));
    assert!(!hub.has_actions());
}

#[test]
fn connect_cancels_room_expiry_and_the_last_disconnect_rearms_it() {
    let mut hub = Hub::new(HubConfig {
        session_ttl: Micros::from_secs(100_000),
        ..cfg()
    });
    let s = session(&mut hub, "alice", at(0));
    let b = session(&mut hub, "bob", at(0));
    let r = room(&mut hub, s, at(0));
    join(&mut hub, c(1), s, r, at(60 * SEC));
    join(&mut hub, c(2), b, r, at(61 * SEC));
    run_until(&mut hub, 1000 * SEC);
    assert!(hub.room_exists(r), "occupied rooms never expire");

    // One member leaves: still occupied.
    leave(&mut hub, c(2), r, at(1000 * SEC));
    run_until(&mut hub, 1200 * SEC);
    assert!(hub.room_exists(r));

    // The last member leaves at 1200 s; rejoin at 1300 s keeps it; leave again at 1330 s.
    leave(&mut hub, c(1), r, at(1200 * SEC));
    run_until(&mut hub, 1300 * SEC);
    assert!(hub.room_exists(r));
    join(&mut hub, c(3), b, r, at(1300 * SEC));
    run_until(&mut hub, 1330 * SEC);
    assert!(
        hub.room_exists(r),
        "the expiry armed at 1200 s was cancelled by the rejoin"
    );
    leave(&mut hub, c(3), r, at(1330 * SEC));
    run_until(&mut hub, 1450 * SEC - 1);
    assert!(hub.room_exists(r));
    run_until(&mut hub, 1450 * SEC);
    assert!(!hub.room_exists(r));
    assert_eq!(hub.stats().rooms_expired, 1);
}

#[test]
fn room_expiry_with_a_single_late_timeout_call() {
    let mut hub = Hub::new(cfg());
    let s = session(&mut hub, "alice", at(0));
    let r = room(&mut hub, s, at(0));
    join(&mut hub, c(1), s, r, at(SEC));
    leave(&mut hub, c(1), r, at(2 * SEC));
    join(&mut hub, c(1), s, r, at(3 * SEC));
    leave(&mut hub, c(1), r, at(100 * SEC));
    hub.handle_timeout(at(219 * SEC));
    assert!(
        hub.room_exists(r),
        "emptied at 100 s: due at 220 s, not at 122 s"
    );
    hub.handle_timeout(at(220 * SEC));
    assert!(!hub.room_exists(r));
}

#[test]
fn deleting_a_room_drops_its_history() {
    let mut hub = Hub::new(cfg());
    let s = session(&mut hub, "alice", at(0));
    let r = room(&mut hub, s, at(0));
    join(&mut hub, c(1), s, r, at(0));
    say(&mut hub, c(1), r, "hello", at(1));
    leave(&mut hub, c(1), r, at(2));
    assert_eq!(history(&hub, r, 50).len(), 3);
    run_until(&mut hub, 200 * SEC);
    let mut out = Vec::new();
    assert!(hub.write_history(r, 50, None, &mut out).is_none());
    assert!(out.is_empty());
    assert_eq!(
        hub.connect(c(1), s, r, None, &[], at(200 * SEC)),
        Err(HubError::RoomNotFound)
    );
}

#[test]
fn max_rooms_is_a_global_cap() {
    let mut hub = Hub::new(HubConfig {
        max_rooms: 2,
        room_ttl: Micros::from_secs(10),
        ..cfg()
    });
    let s = session(&mut hub, "alice", at(0));
    let r1 = room(&mut hub, s, at(0));
    let r2 = room(&mut hub, s, at(0));
    assert_ne!(r1, r2);
    assert_eq!(hub.create_room(s, at(0)), Err(HubError::TooManyRooms));
    run_until(&mut hub, 10 * SEC);
    assert!(
        hub.create_room(s, at(10 * SEC)).is_ok(),
        "expired rooms free their place"
    );
}

// ---- connect and welcome --------------------------------------------------------------

#[test]
fn connect_sends_welcome_first_then_user_joined_to_everyone() {
    let mut hub = Hub::new(cfg());
    let (a, ua) = hub.create_session("alice", at(0)).unwrap();
    let (b, ub) = hub.create_session("bob", at(0)).unwrap();
    let r = room(&mut hub, a, at(0));
    assert_eq!(hub.check_connect(a, r, at(0)), Ok(()));

    let acts = join(&mut hub, c(1), a, r, at(SEC));
    assert_eq!(recipients(&acts), vec![c(1)]);
    let f = frames_for(&acts, c(1));
    assert_eq!(kinds(&f), ["welcome", "user_joined"]);
    let w = &f[0];
    assert_eq!(w["room_id"], r.to_string());
    assert_eq!(w["user"], "alice");
    assert_eq!(w["user_id"], ua.to_string());
    assert_eq!(
        w["users"],
        json!([{"user": "alice", "user_id": ua.to_string()}])
    );
    assert_eq!(w["messages"], json!([]));
    assert!(w.get("truncated").is_none());
    assert_eq!(f[1]["user"], "alice");
    assert_eq!(f[1]["user_id"], ua.to_string());
    assert_eq!(f[1]["message"], "alice has joined");
    assert_eq!(f[1]["room_id"], r.to_string());
    assert_eq!(hub.user_count(r), Some(1));

    let acts = join(&mut hub, c(2), b, r, at(2 * SEC));
    assert!(
        matches!(&acts[0], Action::Send(to, _) if *to == c(2)),
        "welcome is the first action"
    );
    let f2 = frames_for(&acts, c(2));
    assert_eq!(kinds(&f2), ["welcome", "user_joined"]);
    assert_eq!(
        f2[0]["users"],
        json!([{"user": "alice", "user_id": ua.to_string()}, {"user": "bob", "user_id": ub.to_string()}])
    );
    assert_eq!(messages_of(&f2[0]), ["alice has joined"]);
    assert_eq!(f2[1]["message"], "bob has joined");
    assert_eq!(
        frames_for(&acts, c(1)),
        vec![f2[1].clone()],
        "the old member gets only user_joined"
    );
    let joined = raw_for(&acts, c(1));
    assert!(Rc::ptr_eq(&joined[0], &raw_for(&acts, c(2))[1]));

    // A second socket of alice: users lists alice once.
    let acts = join(&mut hub, c(3), a, r, at(3 * SEC));
    let f3 = frames_for(&acts, c(3));
    assert_eq!(f3[0]["users"].as_array().unwrap().len(), 2);
    assert_eq!(f3[0]["users"][0]["user_id"], ua.to_string());
    assert_eq!(recipients(&acts), vec![c(1), c(2), c(3)]);
    assert_eq!(hub.user_count(r), Some(3));
    assert_eq!(hub.stats().members, 3);
    assert_eq!(
        hub.session_rooms(b),
        vec![r],
        "connecting adds the room to the session's rooms"
    );

    // user_joined is stored in history.
    let h = history(&hub, r, 50);
    assert_eq!(
        h.iter()
            .map(|m| m["message"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["alice has joined", "bob has joined", "alice has joined"]
    );
    assert_eq!(h[1], f2[1]);
}

#[test]
fn welcome_has_the_last_50_messages_oldest_first() {
    let (mut hub, r, _) = room_with(fast(), &["alice"], at(0));
    for i in 0..70 {
        say(&mut hub, c(1), r, &format!("m{i}"), at(SEC + i * MS));
    }
    let b = session(&mut hub, "bob", at(2 * SEC));
    let acts = join(&mut hub, c(2), b, r, at(2 * SEC));
    let w = &frames_for(&acts, c(2))[0];
    let expected: Vec<String> = (20..70).map(|i| format!("m{i}")).collect();
    assert_eq!(messages_of(w), expected);

    let h = history(&hub, r, 1000);
    assert_eq!(h.len(), 72, "alice joined + 70 chats + bob joined");
    assert_eq!(
        history(&hub, r, 3)
            .iter()
            .map(|m| m["message"].clone())
            .collect::<Vec<_>>(),
        [json!("m68"), json!("m69"), json!("bob has joined")]
    );

    // welcome_messages is configurable.
    let (mut hub, r, _) = room_with(
        HubConfig {
            welcome_messages: 2,
            ..cfg()
        },
        &["alice"],
        at(0),
    );
    say(&mut hub, c(1), r, "x", at(1));
    say(&mut hub, c(1), r, "y", at(2));
    let b = session(&mut hub, "bob", at(3));
    let w = &frames_for(&join(&mut hub, c(2), b, r, at(3)), c(2))[0];
    assert_eq!(messages_of(w), ["x", "y"]);
}

#[test]
fn connect_refusals() {
    let mut hub = Hub::new(HubConfig {
        max_room_members: 2,
        ..cfg()
    });
    let a = session(&mut hub, "alice", at(0));
    let b = session(&mut hub, "bob", at(0));
    let r = room(&mut hub, a, at(0));
    assert_eq!(
        hub.connect(c(1), SessionId(99), r, None, &[], at(0)),
        Err(HubError::InvalidSession)
    );
    assert_eq!(
        hub.connect(c(1), a, RoomId(0x42), None, &[], at(0)),
        Err(HubError::RoomNotFound)
    );
    assert_eq!(
        hub.check_connect(SessionId(99), r, at(0)),
        Err(HubError::InvalidSession)
    );
    assert_eq!(
        hub.check_connect(a, RoomId(0x42), at(0)),
        Err(HubError::RoomNotFound)
    );
    assert!(!hub.has_actions());
    assert_eq!(hub.user_count(r), Some(0));

    join(&mut hub, c(1), a, r, at(0));
    join(&mut hub, c(2), b, r, at(0));
    assert_eq!(hub.check_connect(b, r, at(0)), Err(HubError::RoomFull));
    assert_eq!(
        hub.connect(c(3), b, r, None, &[], at(0)),
        Err(HubError::RoomFull)
    );
    assert!(!hub.has_actions(), "a refused connect sends nothing");
    assert_eq!(hub.user_count(r), Some(2));
    assert_eq!(hub.stats().members, 2);

    // A place frees up when someone leaves.
    leave(&mut hub, c(2), r, at(0));
    assert_eq!(hub.check_connect(b, r, at(0)), Ok(()));
}

#[test]
fn disconnect_of_an_unknown_connection_does_nothing() {
    let (mut hub, r, _) = room_with(cfg(), &["alice"], at(0));
    assert!(leave(&mut hub, c(9), r, at(1)).is_empty());
    assert!(leave(&mut hub, c(1), RoomId(0x42), at(1)).is_empty());
    assert!(send_text(&mut hub, c(9), r, r#"{"type":"chat","message":"x"}"#, at(1)).is_empty());
    let acts = leave(&mut hub, c(1), r, at(1));
    assert!(acts.is_empty(), "nobody left to tell");
    assert!(
        leave(&mut hub, c(1), r, at(2)).is_empty(),
        "a second disconnect is a no-op"
    );
    assert_eq!(hub.user_count(r), Some(0));
    assert_eq!(hub.stats().members, 0);
    assert_eq!(
        history(&hub, r, 10).last().unwrap()["message"],
        "alice has left"
    );
}

// ---- since ----------------------------------------------------------------------------

#[test]
fn reconnect_since_the_last_seen_message_gets_exactly_the_later_ones() {
    let (mut hub, r, s) = room_with(cfg(), &["alice", "bob"], at(0));
    let mut seen = Vec::new();
    for i in 0..5 {
        let acts = say(&mut hub, c(1), r, &format!("m{i}"), at(SEC + i));
        seen.push(frames_for(&acts, c(2))[0].clone());
    }
    // Bob drops after m2, misses m3 and m4, comes back.
    leave(&mut hub, c(2), r, at(2 * SEC));
    let acts = join_since(&mut hub, c(3), s[1], r, msg_id(&seen[2]), at(3 * SEC));
    let w = &frames_for(&acts, c(3))[0];
    assert_eq!(messages_of(w), ["m3", "m4", "bob has left"]);
    assert!(w.get("truncated").is_none());
    assert_eq!(
        w["messages"][0], seen[3],
        "the stored message is the one that was sent"
    );

    // Since the newest message: nothing.
    let last = history(&hub, r, 1).pop().unwrap();
    let acts = join_since(&mut hub, c(4), s[1], r, msg_id(&last), at(4 * SEC));
    let w = &frames_for(&acts, c(4))[0];
    assert_eq!(w["messages"], json!([]));
    assert!(w.get("truncated").is_none());

    // An id from before anything in the room: everything kept (ids are in time order, so
    // its place is known), not flagged, as no chat after it has left the ring.
    let acts = join_since(&mut hub, c(5), s[1], r, MsgId(12345), at(5 * SEC));
    let w = &frames_for(&acts, c(5))[0];
    assert!(w.get("truncated").is_none(), "{w}");
    assert_eq!(
        w["messages"].as_array().unwrap().len(),
        history(&hub, r, 1000).len() - 1
    );
}

#[test]
fn since_is_not_capped_at_the_welcome_default() {
    let (mut hub, r, s) = room_with(fast(), &["alice"], at(0));
    let first = frames_for(&say(&mut hub, c(1), r, "first", at(1)), c(1))[0].clone();
    for i in 0..99 {
        say(&mut hub, c(1), r, &format!("m{i}"), at(2 + i));
    }
    let acts = join_since(&mut hub, c(2), s[0], r, msg_id(&first), at(SEC));
    let w = &frames_for(&acts, c(2))[0];
    assert_eq!(w["messages"].as_array().unwrap().len(), 99);
}

#[test]
fn history_is_a_ring_and_an_evicted_since_gives_all_kept_messages_truncated() {
    let (mut hub, r, s) = room_with(
        HubConfig {
            history: 5,
            ..cfg()
        },
        &["alice"],
        at(0),
    );
    let mut ids = Vec::new();
    for i in 0..10 {
        let acts = say(&mut hub, c(1), r, &format!("m{i}"), at(SEC + i));
        ids.push(msg_id(&frames_for(&acts, c(1))[0]));
    }
    let h = history(&hub, r, 1000);
    assert_eq!(
        h.iter()
            .map(|m| m["message"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["m5", "m6", "m7", "m8", "m9"]
    );

    let acts = join_since(&mut hub, c(2), s[0], r, ids[2], at(2 * SEC));
    let w = &frames_for(&acts, c(2))[0];
    assert_eq!(w["truncated"], true);
    assert_eq!(messages_of(w), ["m5", "m6", "m7", "m8", "m9"]);

    // The oldest kept id is still known.
    let acts = join_since(&mut hub, c(3), s[0], r, ids[6], at(3 * SEC));
    let w = &frames_for(&acts, c(3))[0];
    assert!(w.get("truncated").is_none());
    assert_eq!(messages_of(w), ["m7", "m8", "m9", "alice has joined"]);
    // Notices have a ring of their own: c(2)'s and c(3)'s joins pushed no chat out.
    assert_eq!(
        history(&hub, r, 1000)
            .iter()
            .map(|m| m["message"].as_str().unwrap())
            .collect::<Vec<_>>(),
        [
            "m5",
            "m6",
            "m7",
            "m8",
            "m9",
            "alice has joined",
            "alice has joined"
        ]
    );
}

// ---- chat -----------------------------------------------------------------------------

#[test]
fn chat_is_trimmed_broadcast_to_everyone_with_one_shared_frame_and_stored() {
    let (mut hub, r, s) = room_with(cfg(), &["alice", "bob", "carol"], at(0));
    let ua = hub.session_view(s[0]).unwrap().user_id;
    let before = hub.stats().messages;
    let acts = say(&mut hub, c(1), r, "  Hello!\n ", at(SEC));
    assert_eq!(acts.len(), 3);
    assert_eq!(recipients(&acts), vec![c(1), c(2), c(3)], "sender included");
    let frames: Vec<Frame> = [1, 2, 3]
        .iter()
        .flat_map(|&n| raw_for(&acts, c(n)))
        .collect();
    assert!(
        Rc::ptr_eq(&frames[0], &frames[1]) && Rc::ptr_eq(&frames[1], &frames[2]),
        "one encoding per broadcast"
    );
    let m = decode(&frames[0]);
    assert_eq!(m["type"], "chat");
    assert_eq!(m["message"], "Hello!");
    assert_eq!(m["user"], "alice");
    assert_eq!(m["user_id"], ua.to_string());
    assert_eq!(m["room_id"], r.to_string());
    let keys: Vec<&str> = m.as_object().unwrap().keys().map(String::as_str).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "id",
            "message",
            "room_id",
            "timestamp",
            "type",
            "user",
            "user_id"
        ]
    );
    assert_eq!(history(&hub, r, 1)[0], m);
    assert_eq!(hub.stats().messages, before + 1);

    // Empty and whitespace-only messages are ignored.
    for empty in ["", "   ", "\n\t "] {
        assert!(
            say(&mut hub, c(1), r, empty, at(2 * SEC)).is_empty(),
            "{empty:?}"
        );
    }
    assert_eq!(hub.stats().messages, before + 1);
    assert_eq!(history(&hub, r, 1)[0], m);

    // Escaping round-trips.
    let tricky = "quote \" backslash \\ <b>é</b> \u{1F600} \u{0007}";
    let acts = say(&mut hub, c(2), r, tricky, at(3 * SEC));
    assert_eq!(frames_for(&acts, c(3))[0]["message"], tricky);
    assert_eq!(frames_for(&acts, c(3))[0]["user"], "bob");
}

#[test]
fn message_too_long_counts_characters_not_bytes() {
    let (mut hub, r, _) = room_with(
        HubConfig {
            max_chat_chars: 10,
            ..cfg()
        },
        &["alice", "bob"],
        at(0),
    );
    // 10 characters, 40 bytes: accepted.
    let ten = "\u{1F600}".repeat(10);
    let acts = say(&mut hub, c(1), r, &ten, at(1));
    assert_eq!(frames_for(&acts, c(2))[0]["message"], ten.as_str());
    // 10 two-byte characters plus surrounding spaces (trimmed first): accepted.
    let acts = say(&mut hub, c(1), r, &format!("  {}  ", "é".repeat(10)), at(2));
    assert_eq!(frames_for(&acts, c(2))[0]["message"], "é".repeat(10));
    // 11 characters: refused, only to the sender, not stored.
    let before = history(&hub, r, 1000).len();
    for long in ["é".repeat(11), "a".repeat(11), "\u{1F600}".repeat(11)] {
        let acts = say(&mut hub, c(1), r, &long, at(3));
        assert_eq!(recipients(&acts), vec![c(1)]);
        let e = &frames_for(&acts, c(1))[0];
        assert_eq!(e["type"], "error");
        assert_eq!(e["code"], "message_too_long");
        assert!(e["detail"].as_str().unwrap().contains("10"));
        assert!(closes(&acts).is_empty());
    }
    assert_eq!(history(&hub, r, 1000).len(), before);
    // The connection still works.
    assert_eq!(
        recipients(&say(&mut hub, c(1), r, "ok", at(4))),
        vec![c(1), c(2)]
    );
}

#[test]
fn bad_frames_get_an_error_only_for_the_sender_and_the_connection_stays() {
    let (mut hub, r, _) = room_with(cfg(), &["alice", "bob"], at(0));
    let cases = [
        ("not json", "invalid_json"),
        ("", "invalid_json"),
        ("[1,2]", "invalid_json"),
        ("42", "invalid_json"),
        ("null", "invalid_json"),
        (r#"{"type":"chat"}"#, "invalid_json"),
        (r#"{"type":"chat","message":5}"#, "invalid_json"),
        (r#"{"type":"dance"}"#, "unknown_type"),
        (r#"{"message":"hi"}"#, "unknown_type"),
    ];
    let before = history(&hub, r, 1000).len();
    for (text, code) in cases {
        let acts = send_text(&mut hub, c(1), r, text, at(SEC));
        assert_eq!(acts.len(), 1, "{text:?}");
        assert!(closes(&acts).is_empty(), "{text:?}");
        let f = frames_for(&acts, c(1));
        assert_eq!(f[0]["type"], "error", "{text:?}");
        assert_eq!(f[0]["code"], code, "{text:?}");
        assert!(f[0]["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    assert_eq!(history(&hub, r, 1000).len(), before);
    assert_eq!(hub.user_count(r), Some(2));
    assert_eq!(
        recipients(&say(&mut hub, c(1), r, "still here", at(2 * SEC))),
        vec![c(1), c(2)]
    );
}

#[test]
fn two_rooms_never_see_each_others_messages() {
    let mut hub = Hub::new(cfg());
    let a = session(&mut hub, "alice", at(0));
    let b = session(&mut hub, "bob", at(0));
    let r1 = room(&mut hub, a, at(0));
    let r2 = room(&mut hub, b, at(0));
    join(&mut hub, c(1), a, r1, at(0));
    let acts = join(&mut hub, c(2), b, r2, at(0));
    assert_eq!(
        recipients(&acts),
        vec![c(2)],
        "joining r2 is not announced in r1"
    );
    assert_eq!(
        frames_for(&acts, c(2))[0]["users"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Alice is in both rooms with two sockets.
    join(&mut hub, c(3), a, r2, at(0));
    let acts = say(&mut hub, c(1), r1, "for r1", at(1));
    assert_eq!(recipients(&acts), vec![c(1)]);
    let acts = say(&mut hub, c(2), r2, "for r2", at(2));
    assert_eq!(recipients(&acts), vec![c(2), c(3)]);
    assert!(
        frames_for(&acts, c(2))
            .iter()
            .all(|f| f["room_id"] == r2.to_string())
    );
    // A connection cannot post in a room it is not a member of.
    assert!(say(&mut hub, c(1), r2, "sneaky", at(3)).is_empty());
    assert!(type_key(&mut hub, c(1), r2, at(3)).is_empty());
    assert!(
        history(&hub, r1, 100)
            .iter()
            .all(|m| m["room_id"] == r1.to_string() && m["message"] != "for r2")
    );
    assert!(
        history(&hub, r2, 100)
            .iter()
            .all(|m| m["message"] != "for r1" && m["message"] != "sneaky")
    );
    let acts = leave(&mut hub, c(1), r1, at(4));
    assert!(acts.is_empty());
}

// ---- rate limit -----------------------------------------------------------------------

#[test]
fn chat_rate_limit_burst_refill_and_close() {
    let cfg = HubConfig {
        chat_rate: 2,
        chat_burst: 3,
        ..cfg()
    };
    let (mut hub, r, s) = room_with(cfg, &["alice", "bob"], at(0));
    let t0 = 10 * SEC;
    for i in 0..3 {
        let acts = say(&mut hub, c(1), r, &format!("m{i}"), at(t0));
        assert_eq!(recipients(&acts), vec![c(1), c(2)], "burst message {i}");
    }
    let refused = say(&mut hub, c(1), r, "m3", at(t0));
    assert_eq!(recipients(&refused), vec![c(1)]);
    assert_eq!(frames_for(&refused, c(1))[0]["code"], "rate_limited");
    assert_eq!(hub.stats().rate_limited, 1);

    // 2 per second: one token after 0.5 s, not before.
    assert_eq!(
        frames_for(&say(&mut hub, c(1), r, "x", at(t0 + 499_999)), c(1))[0]["code"],
        "rate_limited"
    );
    assert_eq!(
        recipients(&say(&mut hub, c(1), r, "m4", at(t0 + 500_000))),
        vec![c(1), c(2)]
    );
    assert_eq!(
        frames_for(&say(&mut hub, c(1), r, "x", at(t0 + 500_000)), c(1))[0]["code"],
        "rate_limited"
    );
    // Idle for a long time: the bucket refills to the burst, not beyond.
    let t1 = t0 + 100 * SEC;
    for i in 0..3 {
        assert_eq!(
            recipients(&say(&mut hub, c(1), r, &format!("n{i}"), at(t1))),
            vec![c(1), c(2)]
        );
    }
    let acts = say(&mut hub, c(1), r, "x", at(t1));
    assert_eq!(frames_for(&acts, c(1))[0]["code"], "rate_limited");
    // The limit is per session: bob is not affected.
    assert_eq!(
        recipients(&say(&mut hub, c(2), r, "bob", at(t1))),
        vec![c(1), c(2)]
    );

    // Refusals in a row: 1 so far; 2 more are answered with errors ...
    for _ in 0..2 {
        let acts = say(&mut hub, c(1), r, "x", at(t1));
        assert_eq!(kinds(&frames_for(&acts, c(1))), ["error"]);
        assert!(closes(&acts).is_empty());
    }
    // ... the next one (more than chat_burst in a row) closes the socket with 1008.
    let acts = say(&mut hub, c(1), r, "x", at(t1));
    assert_eq!(closes(&acts), vec![(c(1), 1008)]);
    assert!(frames_for(&acts, c(1)).is_empty());
    let left = frames_for(&acts, c(2));
    assert_eq!(kinds(&left), ["user_left"]);
    assert_eq!(left[0]["message"], "alice has left");
    assert!(matches!(acts.last(), Some(Action::Close(..))));
    assert_eq!(hub.user_count(r), Some(1));
    assert!(
        say(&mut hub, c(1), r, "gone", at(t1)).is_empty(),
        "the hub forgot the connection"
    );
    assert_eq!(
        hub.authenticate(s[0], at(t1)),
        Ok(()),
        "the session itself lives on"
    );
    assert_eq!(hub.stats().rate_limited, 7);
}

#[test]
fn an_accepted_message_resets_the_refusal_count() {
    let cfg = HubConfig {
        chat_rate: 1,
        chat_burst: 2,
        ..cfg()
    };
    let (mut hub, r, _) = room_with(cfg, &["alice"], at(0));
    say(&mut hub, c(1), r, "a", at(0));
    say(&mut hub, c(1), r, "b", at(0));
    let mut t = 0;
    for _ in 0..5 {
        // Two refusals (= chat_burst), then a token arrives.
        for _ in 0..2 {
            let acts = say(&mut hub, c(1), r, "x", at(t));
            assert_eq!(frames_for(&acts, c(1))[0]["code"], "rate_limited");
            assert!(closes(&acts).is_empty());
        }
        t += SEC;
        assert_eq!(
            frames_for(&say(&mut hub, c(1), r, "ok", at(t)), c(1))[0]["type"],
            "chat"
        );
    }
    assert_eq!(hub.user_count(r), Some(1));
}

#[test]
fn the_chat_rate_is_per_session_across_its_sockets() {
    let cfg = HubConfig {
        chat_rate: 1,
        chat_burst: 2,
        ..cfg()
    };
    let (mut hub, r, s) = room_with(cfg, &["alice", "bob"], at(0));
    join(&mut hub, c(3), s[0], r, at(0));
    assert_eq!(
        kinds(&frames_for(&say(&mut hub, c(1), r, "a", at(0)), c(2))),
        ["chat"]
    );
    assert_eq!(
        kinds(&frames_for(&say(&mut hub, c(3), r, "b", at(0)), c(2))),
        ["chat"]
    );
    let acts = say(&mut hub, c(3), r, "c", at(0));
    assert_eq!(recipients(&acts), vec![c(3)]);
    assert_eq!(frames_for(&acts, c(3))[0]["code"], "rate_limited");
    assert_eq!(
        kinds(&frames_for(&say(&mut hub, c(2), r, "bob", at(0)), c(1))),
        ["chat"]
    );
}

#[test]
fn rejected_and_ignored_messages_do_not_use_tokens() {
    let cfg = HubConfig {
        chat_rate: 1,
        chat_burst: 1,
        max_chat_chars: 3,
        ..cfg()
    };
    let (mut hub, r, _) = room_with(cfg, &["alice"], at(0));
    for _ in 0..10 {
        say(&mut hub, c(1), r, "   ", at(0));
        say(&mut hub, c(1), r, "toolong", at(0));
        send_text(&mut hub, c(1), r, "junk", at(0));
        type_key(&mut hub, c(1), r, at(0));
    }
    assert_eq!(
        frames_for(&say(&mut hub, c(1), r, "ok", at(0)), c(1))[0]["type"],
        "chat"
    );
}

// ---- typing ---------------------------------------------------------------------------

#[test]
fn typing_goes_to_the_others_debounced_and_stops_after_the_quiet_time() {
    let (mut hub, r, s) = room_with(cfg(), &["alice", "bob", "carol"], at(0));
    let ua = hub.session_view(s[0]).unwrap().user_id;
    let t0 = 10 * SEC;

    let acts = type_key(&mut hub, c(1), r, at(t0));
    assert_eq!(recipients(&acts), vec![c(2), c(3)], "not to the sender");
    let f = frames_for(&acts, c(2));
    assert_eq!(
        f,
        vec![
            json!({"type": "typing", "user": "alice", "user_id": ua.to_string(), "room_id": r.to_string()})
        ]
    );
    assert!(Rc::ptr_eq(
        &raw_for(&acts, c(2))[0],
        &raw_for(&acts, c(3))[0]
    ));
    let history_len = history(&hub, r, 1000).len();

    // Within the debounce: nothing.
    assert!(type_key(&mut hub, c(1), r, at(t0 + 500 * MS)).is_empty());
    assert!(type_key(&mut hub, c(1), r, at(t0 + SEC - 1)).is_empty());
    // After it: forwarded again.
    let acts = type_key(&mut hub, c(1), r, at(t0 + SEC));
    assert_eq!(kinds(&frames_for(&acts, c(3))), ["typing"]);
    assert_eq!(recipients(&acts), vec![c(2), c(3)]);
    let last = t0 + 1500 * MS;
    assert!(type_key(&mut hub, c(1), r, at(last)).is_empty());

    // typing_stopped 3 s after the last typing, and the loop is told to wake by then.
    let due = last + 3 * SEC;
    assert!(
        hub.poll_timeout().is_some_and(|d| d.0 <= due),
        "{:?} > {due}",
        hub.poll_timeout()
    );
    assert!(run_until(&mut hub, due - 1).is_empty());
    assert!(
        hub.poll_timeout().is_some_and(|d| d.0 <= due),
        "{:?} > {due}",
        hub.poll_timeout()
    );
    let acts = run_until(&mut hub, due);
    assert_eq!(recipients(&acts), vec![c(2), c(3)]);
    let f = frames_for(&acts, c(3));
    assert_eq!(
        f,
        vec![
            json!({"type": "typing_stopped", "user": "alice", "user_id": ua.to_string(), "room_id": r.to_string()})
        ]
    );
    assert!(
        run_until(&mut hub, due + 60 * SEC).is_empty(),
        "no second typing_stopped"
    );
    assert_eq!(
        history(&hub, r, 1000).len(),
        history_len,
        "typing is not stored"
    );

    // Typing again starts a new round.
    let acts = type_key(&mut hub, c(1), r, at(due + 61 * SEC));
    assert_eq!(kinds(&frames_for(&acts, c(2))), ["typing"]);
    let acts = run_until(&mut hub, due + 64 * SEC);
    assert_eq!(kinds(&frames_for(&acts, c(2))), ["typing_stopped"]);
}

#[test]
fn typing_stopped_with_a_single_late_timeout_call() {
    let (mut hub, r, _) = room_with(cfg(), &["alice", "bob"], at(0));
    type_key(&mut hub, c(1), r, at(0));
    type_key(&mut hub, c(1), r, at(2 * SEC));
    // The first deadline (3 s) passes but alice typed at 2 s: not yet.
    assert!(run_until(&mut hub, 3 * SEC).is_empty());
    hub.handle_timeout(at(4 * SEC));
    assert!(drain(&mut hub).is_empty());
    hub.handle_timeout(at(7 * SEC));
    assert_eq!(
        kinds(&frames_for(&drain(&mut hub), c(2))),
        ["typing_stopped"]
    );
}

#[test]
fn chat_while_typing_sends_typing_stopped_first_and_only_once() {
    let (mut hub, r, _) = room_with(cfg(), &["alice", "bob"], at(0));
    type_key(&mut hub, c(1), r, at(SEC));
    let acts = say(&mut hub, c(1), r, "done typing", at(2 * SEC));
    assert_eq!(kinds(&frames_for(&acts, c(2))), ["typing_stopped", "chat"]);
    assert_eq!(
        kinds(&frames_for(&acts, c(1))),
        ["chat"],
        "the sender never saw its own typing"
    );
    assert!(
        run_until(&mut hub, 60 * SEC).is_empty(),
        "no late duplicate typing_stopped"
    );

    // Typing right after the chat is a new round: forwarded at once, stopped 3 s later.
    let acts = type_key(&mut hub, c(1), r, at(60 * SEC));
    assert_eq!(kinds(&frames_for(&acts, c(2))), ["typing"]);
    say(&mut hub, c(1), r, "again", at(60 * SEC + 100 * MS));
    let acts = type_key(&mut hub, c(1), r, at(60 * SEC + 200 * MS));
    assert_eq!(kinds(&frames_for(&acts, c(2))), ["typing"]);
    assert!(
        run_until(&mut hub, 63 * SEC + 200 * MS - 1).is_empty(),
        "an older round's timer does not stop the new one"
    );
    assert_eq!(
        kinds(&frames_for(&run_until(&mut hub, 63 * SEC + 200 * MS), c(2))),
        ["typing_stopped"]
    );
    assert!(run_until(&mut hub, 100 * SEC).is_empty());

    // A chat that is not typing-related sends no typing_stopped.
    assert_eq!(
        kinds(&frames_for(
            &say(&mut hub, c(1), r, "plain", at(101 * SEC)),
            c(2)
        )),
        ["chat"]
    );
}

#[test]
fn leaving_while_typing_sends_typing_stopped_then_user_left() {
    let (mut hub, r, _) = room_with(cfg(), &["alice", "bob"], at(0));
    type_key(&mut hub, c(1), r, at(SEC));
    let acts = leave(&mut hub, c(1), r, at(2 * SEC));
    let f = frames_for(&acts, c(2));
    assert_eq!(kinds(&f), ["typing_stopped", "user_left"]);
    assert_eq!(f[1]["message"], "alice has left");
    assert!(frames_for(&acts, c(1)).is_empty());
    assert!(run_until(&mut hub, 60 * SEC).is_empty());

    // Leaving when not typing: only user_left.
    let b2 = session(&mut hub, "dave", at(61 * SEC));
    join(&mut hub, c(3), b2, r, at(61 * SEC));
    assert_eq!(
        kinds(&frames_for(&leave(&mut hub, c(3), r, at(62 * SEC)), c(2))),
        ["user_left"]
    );
}

#[test]
fn a_typing_flood_is_dropped_silently() {
    let cfg = HubConfig {
        typing_debounce: Micros::from_millis(10),
        ..cfg()
    };
    let (mut hub, r, _) = room_with(cfg, &["alice", "bob"], at(0));
    let t0 = 5 * SEC;
    let mut forwarded = 0;
    for i in 0..60 {
        let acts = type_key(&mut hub, c(1), r, at(t0 + i * 10 * MS));
        assert!(
            frames_for(&acts, c(1)).is_empty(),
            "no error for the sender"
        );
        assert!(closes(&acts).is_empty());
        forwarded += frames_for(&acts, c(2)).len();
        if i >= 50 {
            assert!(
                acts.is_empty(),
                "typing #{} within one second is dropped",
                i + 1
            );
        }
    }
    assert_eq!(forwarded, 50);
    // The dropped ones did not extend the typing: it stops 3 s after the 50th.
    let acts = run_until(&mut hub, t0 + 490 * MS + 3 * SEC);
    assert_eq!(kinds(&frames_for(&acts, c(2))), ["typing_stopped"]);
    // A new second: typing is accepted again.
    let acts = type_key(&mut hub, c(1), r, at(t0 + 4 * SEC));
    assert_eq!(kinds(&frames_for(&acts, c(2))), ["typing"]);
}

// ---- end_session ----------------------------------------------------------------------

#[test]
fn end_session_closes_every_socket_with_1000_and_tells_the_rooms() {
    let mut hub = Hub::new(cfg());
    let a = session(&mut hub, "alice", at(0));
    let b = session(&mut hub, "bob", at(0));
    let d = session(&mut hub, "dave", at(0));
    let r1 = room(&mut hub, a, at(0));
    let r2 = room(&mut hub, a, at(0));
    join(&mut hub, c(1), a, r1, at(0));
    join(&mut hub, c(2), b, r1, at(0));
    join(&mut hub, c(3), a, r2, at(0));
    join(&mut hub, c(4), d, r2, at(0));
    join(&mut hub, c(5), a, r2, at(0));
    type_key(&mut hub, c(3), r2, at(SEC));
    drain(&mut hub);

    hub.end_session(a, at(2 * SEC));
    let acts = drain(&mut hub);
    let mut cl = closes(&acts);
    cl.sort();
    assert_eq!(cl, vec![(c(1), 1000), (c(3), 1000), (c(5), 1000)]);
    for n in [1, 3] {
        assert!(
            frames_for(&acts, c(n)).is_empty(),
            "nothing more is sent to conn {n}"
        );
    }
    // Each socket's Close comes after the frames sent to it.
    let last_send_to_5 = acts
        .iter()
        .rposition(|a| matches!(a, Action::Send(to, _) if *to == c(5)));
    let close_5 = acts
        .iter()
        .position(|a| matches!(a, Action::Close(to, ..) if *to == c(5)))
        .unwrap();
    assert!(last_send_to_5.is_none_or(|i| i < close_5));
    let f2 = frames_for(&acts, c(2));
    assert_eq!(kinds(&f2), ["user_left"]);
    assert_eq!(f2[0]["message"], "alice has left");
    let f4 = frames_for(&acts, c(4));
    assert_eq!(
        kinds(&f4),
        ["typing_stopped", "user_left", "user_left"],
        "one user_left per socket"
    );

    assert_eq!(
        hub.authenticate(a, at(2 * SEC)),
        Err(HubError::InvalidSession)
    );
    assert_eq!(hub.session_view(a), None);
    assert_eq!(hub.stats().sessions, 2);
    assert_eq!(hub.stats().members, 2);
    assert_eq!((hub.user_count(r1), hub.user_count(r2)), (Some(1), Some(1)));
    assert_eq!(
        hub.connect(c(6), a, r1, None, &[], at(2 * SEC)),
        Err(HubError::InvalidSession)
    );

    // The loop reports the sockets closed afterwards: nothing happens.
    for n in [1, 3, 5] {
        assert!(leave(&mut hub, c(n), if n == 1 { r1 } else { r2 }, at(3 * SEC)).is_empty());
    }
    hub.end_session(a, at(3 * SEC));
    assert!(!hub.has_actions(), "ending twice is harmless");
    assert!(
        run_until(&mut hub, 10 * SEC).is_empty(),
        "no typing_stopped from a dead socket"
    );
}

// ---- ids and timestamps -----------------------------------------------------------------

#[test]
fn timestamps_are_utc_with_microseconds_and_z() {
    let (mut hub, r, _) = room_with(cfg(), &["alice"], at(0));
    let acts = say(&mut hub, c(1), r, "hi", at(1_234_567));
    let ts = frames_for(&acts, c(1))[0]["timestamp"]
        .as_str()
        .unwrap()
        .to_string();
    // Now::fake's wall clock is 2025-08-19T13:45:00Z plus the monotonic time.
    assert_eq!(ts, "2025-08-19T13:45:01.234567Z");
    for m in history(&hub, r, 100) {
        let ts = m["timestamp"].as_str().unwrap();
        assert!(ts.ends_with('Z'), "{ts}");
        let frac = ts
            .trim_end_matches('Z')
            .rsplit_once('.')
            .expect("fraction")
            .1;
        assert_eq!(frac.len(), 6, "{ts}");
        assert!(frac.bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(ts.len(), "2025-08-19T13:45:00.000000Z".len());
    }
    let acts = say(&mut hub, c(1), r, "on the second", at(3 * SEC));
    assert_eq!(
        frames_for(&acts, c(1))[0]["timestamp"],
        "2025-08-19T13:45:03.000000Z"
    );
}

#[test]
fn message_ids_are_uuid_v7_and_increase() {
    let (mut hub, r, _) = room_with(fast(), &["alice", "bob"], at(0));
    // Many messages in the same microsecond, then later ones.
    for i in 0..200u64 {
        let b = if i % 2 == 0 { 1 } else { 2 };
        say(
            &mut hub,
            c(b),
            r,
            &format!("m{i}"),
            at(SEC + (i / 100) * 7 * MS),
        );
    }
    let h = history(&hub, r, 1000);
    assert_eq!(h.len(), 202);
    let mut last: Option<uuid::Uuid> = None;
    for m in &h {
        let s = m["id"].as_str().unwrap();
        let u = uuid::Uuid::parse_str(s).unwrap();
        assert_eq!(u.get_version_num(), 7, "{s}");
        assert_eq!(s, u.hyphenated().to_string(), "lowercase hyphenated form");
        if let Some(prev) = last {
            assert!(u > prev, "{u} after {prev}");
        }
        last = Some(u);
    }
    // The millisecond part is the wall clock.
    let u = uuid::Uuid::parse_str(h[2]["id"].as_str().unwrap()).unwrap();
    let (secs, nanos) = u.get_timestamp().unwrap().to_unix();
    assert_eq!(
        secs * 1000 + u64::from(nanos) / 1_000_000,
        (at(SEC).wall.0) / 1000
    );
}

// ---- usernames --------------------------------------------------------------------------

#[test]
fn validate_username_rules() {
    assert_eq!(validate_username("alice"), Ok("alice"));
    assert_eq!(validate_username("  alice \n"), Ok("alice"));
    assert_eq!(validate_username("ab"), Ok("ab"));
    assert_eq!(validate_username(" a b "), Ok("a b"));
    assert!(validate_username("a").is_err());
    assert!(validate_username("").is_err());
    assert!(validate_username("   ").is_err());
    assert!(
        validate_username("  a  ").is_err(),
        "one character after trimming"
    );
    // Characters, not bytes.
    assert_eq!(validate_username("éé"), Ok("éé"));
    assert!(validate_username("é").is_err(), "two bytes, one character");
    let fifty = "\u{1F600}".repeat(50);
    assert_eq!(validate_username(&fifty), Ok(fifty.as_str()));
    assert!(validate_username(&"\u{1F600}".repeat(51)).is_err());
    assert!(validate_username(&"a".repeat(51)).is_err());
    assert_eq!(
        validate_username(&format!("  {}  ", "a".repeat(50))).map(str::len),
        Ok(50)
    );
    // Control characters inside the name.
    for bad in [
        "a\u{0}b",
        "a\nb",
        "al\tice",
        "bob\u{7f}",
        "x\u{1b}[31m",
        "a\u{85}b",
    ] {
        assert!(validate_username(bad).is_err(), "{bad:?}");
    }
    let err = validate_username("a").unwrap_err();
    assert!(err.contains('2'), "{err}");
}

#[test]
fn usernames_with_invisible_formatting_characters_are_refused() {
    // Bidi overrides and isolates, zero-width characters, the BOM, and the rest of Cf.
    for bad in [
        "alice\u{202E}gnp.exe",
        "\u{202A}bob",
        "bo\u{202B}b",
        "bo\u{202C}b",
        "bo\u{202D}b",
        "\u{2066}eve\u{2069}",
        "e\u{2067}ve",
        "e\u{2068}ve",
        "ad\u{200B}min",
        "ad\u{200C}min",
        "ad\u{200D}min",
        "ad\u{200E}min",
        "ad\u{200F}min",
        "ad\u{2060}min",
        "ad\u{2064}min",
        "\u{FEFF}root",
        "ro\u{061C}ot",
        "ro\u{180E}ot",
        "soft\u{AD}hyphen",
        "tag\u{E0041}s",
        "line\u{2028}break",
        "x\u{2029}y",
        "\u{1D173}mu",
        "\u{13439}eg",
    ] {
        let err = validate_username(bad).expect_err(bad);
        assert!(err.contains("formatting"), "{bad:?}: {err}");
    }
    // Ordinary letters of every script, symbols and emoji stay welcome.
    for good in [
        "José",
        "李雷",
        "علي",
        "שרה",
        "Ωmega",
        "🙂 bob",
        "d'Artagnan",
        "ÅsaÖ",
        "नमस्ते",
        "\u{2010}dash\u{2011}",
        "z\u{2030}",
    ] {
        assert_eq!(validate_username(good), Ok(good), "{good:?}");
    }
    // Every Cf code point (Unicode 15.1) and only those near the ranges' edges.
    for (lo, hi) in [
        (0x200B, 0x200F),
        (0x2028, 0x202E),
        (0x2060, 0x2064),
        (0xE0020, 0xE007F),
    ] {
        for cp in lo..=hi {
            assert!(is_format_char(char::from_u32(cp).unwrap()), "{cp:X}");
        }
        assert!(
            !is_format_char(char::from_u32(lo - 1).unwrap()),
            "{:X}",
            lo - 1
        );
        assert!(
            !is_format_char(char::from_u32(hi + 1).unwrap()),
            "{:X}",
            hi + 1
        );
    }
    assert!(!is_format_char('\u{0}') && !is_format_char('\u{10FFFF}'));
}

// ---- stats ------------------------------------------------------------------------------

#[test]
fn stats_count_what_is_live() {
    let (mut hub, r, _) = room_with(cfg(), &["alice", "bob"], at(0));
    let st = hub.stats();
    assert_eq!(
        (st.sessions, st.rooms, st.members, st.messages),
        (2, 1, 2, 2)
    );
    assert!(st.timers >= 2, "two session timers at least");
    say(&mut hub, c(1), r, "x", at(1));
    leave(&mut hub, c(2), r, at(2));
    let st = hub.stats();
    assert_eq!((st.members, st.messages), (1, 4));
}

// ---- cluster mode ---------------------------------------------------------------------

/// A cluster-mode hub whose Redis is up, with `alice` in a loaded room on conn 1.
fn cluster_room() -> (Hub, RoomId) {
    let mut hub = Hub::new(fast());
    hub.enable_cluster();
    hub.set_cluster_up(true);
    let s = session(&mut hub, "alice", at(0));
    let r = room(&mut hub, s, at(0));
    assert!(
        !hub.room_live(r),
        "a new room is loaded when its first member comes"
    );
    hub.load_history(r, Vec::new(), at(0));
    join(&mut hub, c(1), s, r, at(0));
    hub.drain_ops();
    (hub, r)
}

fn event_json(id: MsgId, text: &str) -> Vec<u8> {
    format!("{{\"id\":\"{id}\",\"type\":\"chat\",\"message\":\"{text}\"}}").into_bytes()
}

#[test]
fn in_cluster_mode_chat_goes_to_redis_and_is_delivered_when_it_comes_back() {
    let (mut hub, r) = cluster_room();
    hub.on_text(c(1), r, r#"{"type":"chat","message":"hi"}"#, at(SEC));
    assert!(
        drain(&mut hub).is_empty(),
        "nothing is sent before Redis has it"
    );
    let ops = hub.drain_ops();
    let Some(Op::Publish { id, json, .. }) = ops.iter().find(|o| matches!(o, Op::Publish { .. }))
    else {
        panic!("no publish in {ops:?}");
    };
    hub.deliver_event(r, *id, json, at(SEC));
    let sent = drain(&mut hub);
    assert_eq!(sent.len(), 1);
    let mut out = Vec::new();
    assert!(hub.write_history(r, 50, None, &mut out).is_some());
    assert!(String::from_utf8_lossy(&out).contains("\"hi\""));
}

#[test]
fn while_redis_is_away_chat_stays_local() {
    let (mut hub, r) = cluster_room();
    hub.set_cluster_up(false);
    hub.on_text(c(1), r, r#"{"type":"chat","message":"local"}"#, at(SEC));
    let sent = drain(&mut hub);
    assert_eq!(sent.len(), 1, "delivered here at once");
    assert!(
        !hub.drain_ops()
            .iter()
            .any(|o| matches!(o, Op::Publish { .. }))
    );
}

#[test]
fn catching_up_sends_only_what_the_members_missed_and_adopts_redis_history() {
    let (mut hub, r) = cluster_room();
    let (a, b, local, missed1, missed2) = (
        MsgId(1 << 80),
        MsgId(2 << 80),
        MsgId(3 << 80),
        MsgId(4 << 80),
        MsgId(5 << 80),
    );
    hub.deliver_event(r, a, &event_json(a, "a"), at(SEC));
    hub.deliver_event(r, b, &event_json(b, "b"), at(SEC));
    hub.set_cluster_up(false);
    hub.deliver_event(r, local, &event_json(local, "local"), at(SEC)); // as if sent here meanwhile
    drain(&mut hub);
    hub.set_cluster_up(true);
    hub.catch_up(
        r,
        vec![
            (a, event_json(a, "a")),
            (b, event_json(b, "b")),
            (missed1, event_json(missed1, "m1")),
            (missed2, event_json(missed2, "m2")),
        ],
        at(SEC),
    );
    let texts: Vec<String> = drain(&mut hub)
        .iter()
        .map(|act| match act {
            Action::Send(_, f) => decode(f)["message"].as_str().unwrap().to_string(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(texts, ["m1", "m2"]);
    let mut out = Vec::new();
    hub.write_history(r, 50, None, &mut out);
    let hist: Value = serde_json::from_slice(&[b"[", out.as_slice(), b"]"].concat()).unwrap();
    let hist: Vec<&str> = hist
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        hist,
        ["a", "b", "m1", "m2"],
        "Redis's history, as on every node"
    );
}

#[test]
fn the_last_member_leaving_a_cluster_room_drops_its_copy_of_the_history() {
    let (mut hub, r) = cluster_room();
    let a = MsgId(1 << 80);
    hub.deliver_event(r, a, &event_json(a, "a"), at(SEC));
    hub.disconnect(c(1), r, at(SEC));
    assert!(!hub.room_live(r));
    let ops = hub.drain_ops();
    assert!(ops.iter().any(|o| matches!(o, Op::Left { .. })), "{ops:?}");
}

/// The one `Publish` among `ops`: (id, json).
#[track_caller]
fn published(ops: &[Op]) -> (MsgId, Vec<u8>) {
    let p: Vec<(MsgId, Vec<u8>)> = ops
        .iter()
        .filter_map(|o| match o {
            Op::Publish { id, json, .. } => Some((*id, json.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(p.len(), 1, "{ops:?}");
    p[0].clone()
}

#[test]
fn a_chat_redis_did_not_confirm_comes_back_to_its_sender_as_an_error_frame() {
    let (mut hub, r) = cluster_room();
    let bob = session(&mut hub, "bob", at(0));
    join(&mut hub, c(2), bob, r, at(0));
    let alice2 = hub.sessions.keys().copied().find(|s| *s != bob).unwrap();
    join(&mut hub, c(3), alice2, r, at(0)); // alice's second tab
    hub.drain_ops();
    drain(&mut hub);
    hub.on_text(
        c(1),
        r,
        r#"{"type":"chat","message":"lost \"one\""}"#,
        at(SEC),
    );
    let (id, json) = published(&hub.drain_ops());
    assert!(drain(&mut hub).is_empty());
    hub.unconfirmed(r, id, &json, at(6 * SEC));
    let sent = drain(&mut hub);
    for conn in [c(1), c(3)] {
        let got = frames_for(&sent, conn);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["type"], "error");
        assert_eq!(got[0]["code"], "unconfirmed");
        assert_eq!(got[0]["id"], id.to_string());
        assert_eq!(got[0]["message"], "lost \"one\"");
        assert!(got[0]["detail"].as_str().unwrap().contains("Redis"));
    }
    assert!(frames_for(&sent, c(2)).is_empty(), "bob never hears of it");
    let mut out = Vec::new();
    hub.write_history(r, 50, None, &mut out);
    assert!(
        !String::from_utf8_lossy(&out).contains("lost"),
        "not stored"
    );
}

#[test]
fn an_unconfirmed_notice_is_delivered_here_and_catching_up_still_sends_what_preceded_it() {
    let (mut hub, r) = cluster_room();
    let bob = session(&mut hub, "bob", at(0));
    join(&mut hub, c(2), bob, r, at(0));
    hub.drain_ops();
    drain(&mut hub);
    let a = MsgId(1 << 80);
    hub.deliver_event(r, a, &event_json(a, "a"), at(SEC));
    drain(&mut hub);
    // bob leaves just as the link stalls: his user_left is never confirmed...
    hub.disconnect(c(2), r, at(2 * SEC));
    let (left, json) = published(&hub.drain_ops());
    assert!(drain(&mut hub).is_empty());
    hub.unconfirmed(r, left, &json, at(7 * SEC));
    let sent = drain(&mut hub);
    let got = frames_for(&sent, c(1));
    assert_eq!(
        kinds(&got),
        ["user_left"],
        "alice still learns that bob left"
    );
    // ...but it did reach Redis, after a message b this node never got. Catching up sends b
    // and not the notice again.
    let b = MsgId(2 << 80);
    hub.catch_up(
        r,
        vec![
            (a, event_json(a, "a")),
            (b, event_json(b, "b")),
            (left, json.clone()),
        ],
        at(SEC),
    );
    let got = frames_for(&drain(&mut hub), c(1));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["message"], "b");
}

// ---- held presence notices --------------------------------------------------------------

#[test]
fn presence_notices_wait_for_the_delay_then_go_out_together() {
    let (mut hub, r, _) = room_with(held(), &["alice"], at(0));
    let first = run_until(&mut hub, 10 * MS);
    assert_eq!(
        batches_for(&first, c(1))
            .iter()
            .map(|b| events(b))
            .collect::<Vec<_>>(),
        [vec![ev("user_joined", "alice")]],
        "one notice alone goes out as it is when the delay is over"
    );

    let bob = session(&mut hub, "bob", at(SEC));
    let carol = session(&mut hub, "carol", at(SEC));
    let acts = join(&mut hub, c(2), bob, r, at(SEC));
    assert_eq!(
        recipients(&acts),
        [c(2)],
        "bob gets his welcome, nobody a notice yet"
    );
    let w = &frames_for(&acts, c(2))[0];
    assert_eq!(w["type"], "welcome");
    assert_eq!(
        events(w["messages"].as_array().unwrap()),
        [ev("user_joined", "alice")]
    );
    let acts = join(&mut hub, c(3), carol, r, at(SEC + 2 * MS));
    let w = &frames_for(&acts, c(3))[0];
    assert_eq!(
        events(w["messages"].as_array().unwrap()),
        [ev("user_joined", "alice")],
        "the welcome leaves out notices the members have not been sent yet"
    );
    assert_eq!(recipients(&acts), [c(3)]);
    let acts = leave(&mut hub, c(2), r, at(SEC + 4 * MS));
    assert!(acts.is_empty(), "bob's leaving is held too: {acts:?}");
    assert!(run_until(&mut hub, SEC + 9 * MS).is_empty(), "not due yet");
    assert_eq!(
        events(&history(&hub, r, 50)),
        [ev("user_joined", "alice")],
        "REST history, like the welcome, has only what the members were sent"
    );

    let acts = run_until(&mut hub, SEC + 10 * MS);
    let want = [
        ev("user_joined", "bob"),
        ev("user_joined", "carol"),
        ev("user_left", "bob"),
    ];
    for member in [c(1), c(3)] {
        let batches = batches_for(&acts, member);
        assert_eq!(batches.len(), 1, "one buffer (one write) per member");
        assert_eq!(events(&batches[0]), want);
    }
    assert_eq!(recipients(&acts), [c(1), c(3)]);
    assert!(
        Rc::ptr_eq(&raw_for(&acts, c(1))[0], &raw_for(&acts, c(3))[0]),
        "the batch is put together once and shared"
    );
    assert!(
        hub.poll_timeout().is_some_and(|d| d.0 > 100 * SEC),
        "no notice timer left once everything is out, only the far room and session timers"
    );
    let h = history(&hub, r, 50);
    assert_eq!(
        events(&h)[1..],
        want,
        "history has every notice once sent, in order"
    );
}

#[test]
fn anything_else_for_the_room_releases_held_notices_first() {
    let (mut hub, r, _) = room_with(
        HubConfig {
            notice_delay: Micros::from_secs(5),
            ..fast()
        },
        &["alice", "bob"],
        at(0),
    );
    // Chat: the notices, then the message, to everyone at once; no delay for chat.
    let acts = say(&mut hub, c(2), r, "hi", at(SEC));
    for member in [c(1), c(2)] {
        let all: Vec<Value> = batches_for(&acts, member).concat();
        assert_eq!(
            events(&all),
            [
                ev("user_joined", "alice"),
                ev("user_joined", "bob"),
                ev("chat", "bob")
            ]
        );
    }
    // Typing: the held leave of carol first, then `typing` to the others.
    let carol = session(&mut hub, "carol", at(SEC));
    join(&mut hub, c(3), carol, r, at(SEC));
    leave(&mut hub, c(3), r, at(SEC));
    let acts = type_key(&mut hub, c(1), r, at(2 * SEC));
    assert_eq!(
        events(&batches_for(&acts, c(2)).concat()),
        [
            ev("user_joined", "carol"),
            ev("user_left", "carol"),
            ev("typing", "alice")
        ]
    );
    assert_eq!(
        events(&batches_for(&acts, c(1)).concat()),
        [ev("user_joined", "carol"), ev("user_left", "carol")]
    );
    assert!(
        batches_for(&run_until(&mut hub, 10 * SEC), c(1)).is_empty(),
        "nothing was left held"
    );
}

#[test]
fn release_all_sends_what_is_held_at_once() {
    let (mut hub, r, _) = room_with(
        HubConfig {
            notice_delay: Micros::from_secs(5),
            ..cfg()
        },
        &["alice", "bob"],
        at(0),
    );
    assert!(drain(&mut hub).is_empty());
    hub.release_all();
    let acts = drain(&mut hub);
    assert_eq!(recipients(&acts), [c(1), c(2)]);
    assert_eq!(
        events(&decode_all(&raw_for(&acts, c(1))[0])),
        [ev("user_joined", "alice"), ev("user_joined", "bob")]
    );
    assert!(hub.poll_timeout().is_some_and(|d| d.0 > 100 * SEC));
    assert!(hub.room_exists(r));
}

#[test]
fn a_reconnect_since_a_held_notice_gets_each_event_once() {
    let (mut hub, r, s) = room_with(held(), &["alice"], at(0));
    run_until(&mut hub, 10 * MS);
    let bob = session(&mut hub, "bob", at(SEC));
    join(&mut hub, c(2), bob, r, at(SEC));
    // The id of bob's held `user_joined` (in cluster mode another node may have sent it).
    assert_eq!(
        history(&hub, r, 50).len(),
        1,
        "REST history leaves out held notices"
    );
    let seen = hub.rooms[&r].history.iter().last().unwrap().id;
    let acts = join_since(&mut hub, c(3), s[0], r, seen, at(SEC + MS));
    assert_eq!(
        events(&batches_for(&acts, c(1)).concat()),
        [ev("user_joined", "bob")],
        "the held notice went out before the new socket joined"
    );
    let w = &frames_for(&acts, c(3))[0];
    assert!(w["messages"].as_array().unwrap().is_empty());
    assert_ne!(w["truncated"], true);
    let later = run_until(&mut hub, SEC + 20 * MS);
    assert_eq!(
        events(&batches_for(&later, c(3)).concat()),
        [ev("user_joined", "alice")],
        "the new socket gets only its own notice afterwards"
    );
}

#[test]
fn with_no_delay_each_notice_goes_out_at_once() {
    let (mut hub, r, _) = room_with(cfg(), &["alice"], at(0));
    let bob = session(&mut hub, "bob", at(SEC));
    let acts = join(&mut hub, c(2), bob, r, at(SEC));
    assert_eq!(kinds(&frames_for(&acts, c(1))), ["user_joined"]);
    assert!(hub.poll_timeout().is_some_and(|d| d.0 > 100 * SEC));
}

#[test]
fn in_cluster_mode_delivered_presence_is_held_and_chat_is_not() {
    let mut hub = Hub::new(held());
    hub.enable_cluster();
    hub.set_cluster_up(true);
    let s = session(&mut hub, "alice", at(0));
    let r = room(&mut hub, s, at(0));
    hub.load_history(r, Vec::new(), at(0));
    join(&mut hub, c(1), s, r, at(0));
    let ops = hub.drain_ops();
    let Some(Op::Publish { id, json, .. }) = ops.iter().find(|o| matches!(o, Op::Publish { .. }))
    else {
        panic!("no publish in {ops:?}");
    };
    hub.deliver_event(r, *id, json, at(SEC));
    assert!(drain(&mut hub).is_empty(), "user_joined from Redis is held");
    let chat_id = MsgId(u128::MAX);
    hub.deliver_event(r, chat_id, &event_json(chat_id, "hi"), at(SEC + MS));
    let acts = drain(&mut hub);
    assert_eq!(
        events(&batches_for(&acts, c(1)).concat()),
        [ev("user_joined", "alice"), ev("chat", "")]
    );
}

// ---- issue 12: rooms, history and frames --------------------------------------------------

/// A chat message of `n` times U+0001: 6 bytes each once stored (`\u0001`).
fn controls(n: usize) -> String {
    "\u{1}".repeat(n)
}

#[test]
fn a_message_is_limited_by_its_encoded_size_too() {
    let (mut hub, r, _) = room_with(fast(), &["alice", "bob"], at(0));
    // 4096 characters are allowed, but 4096 control characters are 24 KiB stored.
    let acts = say(&mut hub, c(1), r, &controls(4096), at(SEC));
    let f = frames_for(&acts, c(1));
    assert_eq!(f.len(), 1, "only an error, to the sender: {f:?}");
    assert_eq!(
        (&f[0]["type"], &f[0]["code"]),
        (&json!("error"), &json!("message_too_long"))
    );
    assert!(
        f[0]["detail"].as_str().unwrap().contains("16384 bytes"),
        "{}",
        f[0]
    );
    assert!(frames_for(&acts, c(2)).is_empty());
    // Just under the limit once escaped: 2 730 x 6 = 16 380 bytes.
    let acts = say(&mut hub, c(1), r, &controls(2730), at(SEC + 1));
    assert_eq!(frames_for(&acts, c(2))[0]["type"], "chat");
    let acts = say(&mut hub, c(1), r, &controls(2731), at(SEC + 2));
    assert_eq!(frames_for(&acts, c(1))[0]["code"], "message_too_long");
    // Plain text of 4096 four-byte characters (16 KiB) still fits.
    let acts = say(&mut hub, c(1), r, &"\u{1F600}".repeat(4096), at(SEC + 3));
    assert_eq!(frames_for(&acts, c(2))[0]["type"], "chat");
}

#[test]
fn welcome_and_history_are_bounded_in_bytes_and_page_back_with_before() {
    let budget = 64 * 1024;
    let (mut hub, r, s) = room_with(
        HubConfig {
            max_welcome_bytes: budget,
            ..fast()
        },
        &["alice", "bob"],
        at(0),
    );
    let mut sent = Vec::new();
    for i in 0..50 {
        let text = format!("{i:02}{}", controls(2700));
        let acts = say(&mut hub, c(1), r, &text, at(SEC + i));
        sent.push(msg_id(&frames_for(&acts, c(1))[0]));
    }
    // A newcomer's welcome: the newest messages that fit, flagged.
    let acts = join(&mut hub, c(3), s[1], r, at(2 * SEC));
    let raw = raw_for(&acts, c(3));
    let w = decode(&raw[0]);
    assert_eq!(w["type"], "welcome");
    assert_eq!(w["truncated"], true, "older messages were left out");
    let got: Vec<MsgId> = w["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(msg_id)
        .collect();
    assert!(got.len() >= 3 && got.len() < 50, "{}", got.len());
    assert_eq!(got[..], sent[50 - got.len()..], "the newest, oldest first");
    assert!(
        raw[0].len() < budget + 1024,
        "welcome of {} bytes",
        raw[0].len()
    );

    // With since: the same bound; the newest messages after it.
    let acts = join_since(&mut hub, c(4), s[1], r, sent[0], at(3 * SEC));
    let w = &frames_for(&acts, c(4))[0];
    assert_eq!(w["truncated"], true);
    let got_since: Vec<MsgId> = w["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(msg_id)
        .collect();
    assert!(got_since.len() < 49);
    // The newcomers' joins came after the chat (and are kept); the last chat is in.
    assert!(got_since.contains(&sent[49]));

    // REST pages back with `before` from the oldest the welcome had, down to the first.
    let mut all: Vec<MsgId> = got.clone();
    let mut before = got[0];
    let mut pages = 0;
    loop {
        let mut out = b"[".to_vec();
        let truncated = hub
            .write_history(r, 1000, Some(before), &mut out)
            .expect("room exists");
        out.push(b']');
        assert!(out.len() < budget + 1024, "page of {} bytes", out.len());
        let page: Vec<Value> = serde_json::from_slice(&out).unwrap();
        pages += 1;
        if page.is_empty() {
            assert!(!truncated);
            break;
        }
        let ids: Vec<MsgId> = page.iter().map(msg_id).collect();
        before = ids[0];
        all.splice(0..0, ids);
        assert!(pages < 50, "paging makes progress");
    }
    let chats: Vec<MsgId> = all.iter().copied().filter(|id| sent.contains(id)).collect();
    assert_eq!(chats, sent, "every message, in order, exactly once");
    // Without `before`, REST has the same byte bound.
    let mut out = Vec::new();
    assert_eq!(hub.write_history(r, 1000, None, &mut out), Some(true));
    assert!(out.len() < budget + 1024);
}

#[test]
fn presence_churn_never_pushes_chat_out_of_history() {
    let (mut hub, r, s) = room_with(
        HubConfig {
            history: 100,
            history_notices: 10,
            ..fast()
        },
        &["alice"],
        at(0),
    );
    let mut chats = Vec::new();
    for i in 0..100 {
        let acts = say(&mut hub, c(1), r, &format!("m{i}"), at(SEC + i));
        chats.push(msg_id(&frames_for(&acts, c(1))[0]));
    }
    // A client connects and closes in a loop: 1 040 notices.
    let mut last_notice = None;
    for i in 0..520 {
        let acts = join(&mut hub, c(2), s[0], r, at(2 * SEC + i * 10));
        last_notice.get_or_insert(msg_id(&frames_for(&acts, c(1))[0]));
        leave(&mut hub, c(2), r, at(2 * SEC + i * 10 + 5));
    }
    let h = history(&hub, r, 1000);
    assert_eq!(h.len(), 110, "100 chats and 10 notices");
    let kept: Vec<MsgId> = h
        .iter()
        .filter(|m| m["type"] == "chat")
        .map(msg_id)
        .collect();
    assert_eq!(kept, chats, "every chat survived the churn");
    // `since` an early chat: every later chat, nothing flagged missing.
    let acts = join_since(&mut hub, c(3), s[0], r, chats[10], at(10 * SEC));
    let w = &frames_for(&acts, c(3))[0];
    let got: Vec<MsgId> = w["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["type"] == "chat")
        .map(msg_id)
        .collect();
    assert_eq!(got, chats[11..]);
    assert!(w.get("truncated").is_none(), "{}", w["truncated"]);
    // `since` a notice long gone from its ring: its place is still known by id.
    let acts = join_since(&mut hub, c(4), s[0], r, last_notice.unwrap(), at(11 * SEC));
    let w = &frames_for(&acts, c(4))[0];
    assert!(w.get("truncated").is_none());
    assert!(
        w["messages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["type"] != "chat")
    );
}

#[test]
fn members_are_found_in_constant_time_through_joins_and_leaves() {
    let (mut hub, r, s) = room_with(cfg(), &["a", "b", "c", "d", "e"], at(0));
    // Leave from the middle and the front: the moved members are still found.
    leave(&mut hub, c(2), r, at(1));
    leave(&mut hub, c(1), r, at(2));
    join(&mut hub, c(6), s[0], r, at(3));
    for conn in [3, 4, 5, 6] {
        let acts = say(
            &mut hub,
            c(conn),
            r,
            &format!("from {conn}"),
            at(SEC * conn as u64),
        );
        assert_eq!(
            frames_for(&acts, c(conn))[0]["message"],
            format!("from {conn}")
        );
        let acts = type_key(&mut hub, c(conn), r, at(SEC * conn as u64 + 1));
        assert_eq!(recipients(&acts).len(), 3, "typing to the three others");
    }
    // Gone members are not found: their frames do nothing.
    assert!(say(&mut hub, c(2), r, "ghost", at(10 * SEC)).is_empty());
    assert_eq!(hub.member_at.len(), 4);
    for (i, m) in hub.rooms[&r].members.iter().enumerate() {
        assert_eq!(hub.member_at[&m.conn], i);
    }
    // Their typing timers still find them after the moves.
    let acts = run_until(&mut hub, 20 * SEC);
    assert_eq!(
        acts.iter()
            .filter_map(|a| match a {
                Action::Send(_, f) => Some(decode(f)),
                _ => None,
            })
            .filter(|f| f["type"] == "typing_stopped")
            .count(),
        4 * 3,
        "one typing_stopped per typist to each of the three others"
    );
    // A frame claiming another room finds nothing.
    let other = room(&mut hub, s[0], at(21 * SEC));
    assert!(say(&mut hub, c(3), other, "wrong room", at(21 * SEC)).is_empty());
}

#[test]
fn a_sessions_rooms_are_a_set_pruned_as_they_grow() {
    let mut hub = Hub::new(HubConfig {
        max_rooms: 100_000,
        room_ttl: Micros::from_secs(10),
        ..cfg()
    });
    let s = session(&mut hub, "alice", at(0));
    let first: Vec<RoomId> = (0..100).map(|_| room(&mut hub, s, at(0))).collect();
    assert_eq!(hub.session_rooms(s), first, "in the order they were added");
    // Joining one again does not add it twice; leaving removes it.
    hub.join_room(s, first[5]).unwrap();
    hub.leave_room(s, first[7]);
    let mut want = first.clone();
    want.remove(7);
    assert_eq!(hub.session_rooms(s), want);
    // They expire; the session's set is pruned as new ones come, not kept forever.
    run_until(&mut hub, 20 * SEC);
    assert!(hub.session_rooms(s).is_empty());
    let later: Vec<RoomId> = (0..300).map(|_| room(&mut hub, s, at(20 * SEC))).collect();
    assert_eq!(hub.session_rooms(s), later);
    let kept = hub.sessions[&s].rooms.len();
    assert!(kept < 300 + 64, "{kept} rooms remembered for 300 live ones");
}

#[test]
fn websocket_upgrades_have_a_budget_per_session() {
    let mut hub = Hub::new(HubConfig {
        upgrade_rate: 2,
        upgrade_burst: 3,
        ..cfg()
    });
    let a = session(&mut hub, "alice", at(0));
    let b = session(&mut hub, "bob", at(0));
    for _ in 0..3 {
        assert_eq!(hub.take_upgrade(a, at(0)), Ok(()));
    }
    assert_eq!(hub.take_upgrade(a, at(0)), Err(1), "retry in a second");
    assert_eq!(hub.take_upgrade(b, at(0)), Ok(()), "bob has his own");
    assert_eq!(hub.take_upgrade(a, at(500 * MS)), Ok(()), "2 per second");
    assert!(hub.take_upgrade(a, at(500 * MS)).is_err());
    // Unknown sessions are for connect to refuse; off means off.
    assert_eq!(hub.take_upgrade(SessionId(7), at(0)), Ok(()));
    let mut off = Hub::new(HubConfig {
        upgrade_rate: 0,
        ..cfg()
    });
    let a = session(&mut off, "alice", at(0));
    for _ in 0..1000 {
        assert_eq!(off.take_upgrade(a, at(0)), Ok(()));
    }
}

// ---- invite-only rooms ------------------------------------------------------------------

fn private_room(hub: &mut Hub, s: SessionId, now: Now) -> (RoomId, String) {
    let opts = RoomOptions {
        private: true,
        message_ttl: None,
    };
    let r = hub
        .create_room_with(s, opts, now)
        .expect("create_room_with");
    (r.id, r.invite.expect("a private room has an invite"))
}

#[test]
fn a_private_room_is_invisible_without_its_invite_and_open_with_it() {
    let mut hub = Hub::new(cfg());
    let now = at(0);
    let (owner, guest, other) = (
        session(&mut hub, "owner", now),
        session(&mut hub, "guest", now),
        session(&mut hub, "other", now),
    );
    let (r, invite) = private_room(&mut hub, owner, now);
    assert_eq!(invite.len(), 22);
    assert!(hub.room_visible(r, Some(owner)));
    assert!(!hub.room_visible(r, Some(guest)));
    assert!(!hub.room_visible(r, None));
    assert_eq!(hub.room_view(r, None), None);
    assert_eq!(hub.all_rooms().count(), 0, "never listed");
    assert_eq!(
        hub.check_connect(guest, r, now),
        Err(HubError::RoomNotFound)
    );
    assert_eq!(
        hub.connect(c(9), guest, r, None, &[], now),
        Err(HubError::RoomNotFound)
    );
    assert_eq!(
        hub.join_with_invite(guest, r, None),
        Err(HubError::RoomNotFound)
    );
    let mut wrong = invite.clone().into_bytes();
    wrong[21] = if wrong[21] == b'A' { b'B' } else { b'A' };
    let wrong = String::from_utf8(wrong).unwrap();
    assert_eq!(
        hub.join_with_invite(guest, r, Some(&wrong)),
        Err(HubError::RoomNotFound)
    );
    assert_eq!(hub.rotate_invite(guest, r), Err(HubError::RoomNotFound));
    hub.join_with_invite(guest, r, Some(&invite)).expect("join");
    assert!(hub.room_visible(r, Some(guest)));
    join(&mut hub, c(1), guest, r, now);
    // Rotation: the old invite admits nobody new; members stay.
    let new = hub.rotate_invite(guest, r).expect("members rotate");
    assert_ne!(new, invite);
    assert_eq!(
        hub.join_with_invite(other, r, Some(&invite)),
        Err(HubError::RoomNotFound)
    );
    assert!(hub.room_visible(r, Some(owner)) && hub.room_visible(r, Some(guest)));
    hub.join_with_invite(other, r, Some(&new))
        .expect("new invite");
    // A public room is unchanged: no invite needed, nothing to rotate.
    let public = room(&mut hub, owner, now);
    assert!(hub.room_visible(public, None));
    hub.join_with_invite(other, public, None)
        .expect("public join");
    assert_eq!(
        hub.rotate_invite(owner, public),
        Err(HubError::RoomNotFound)
    );
}

// ---- disappearing messages --------------------------------------------------------------

#[test]
fn messages_expire_after_the_room_ttl_with_one_batched_frame_and_one_timer() {
    let mut hub = Hub::new(fast());
    let now = at(0);
    let a = session(&mut hub, "alice", now);
    let opts = RoomOptions {
        private: false,
        message_ttl: Some(Micros::from_secs(5)),
    };
    let r = hub.create_room_with(a, opts, now).unwrap().id;
    assert_eq!(
        hub.room_view(r, None).unwrap().message_ttl,
        Some(Micros::from_secs(5))
    );
    join(&mut hub, c(1), a, r, now);
    // The session's expiry and the room's message timer (armed for the join notice).
    let timers = hub.stats().timers;
    assert_eq!(timers, 2);
    for i in 0..100 {
        say(&mut hub, c(1), r, &format!("m{i}"), at(SEC + i * MS));
    }
    assert_eq!(
        hub.stats().timers,
        timers,
        "one timer for the room, not one per message"
    );
    say(&mut hub, c(1), r, "late", at(3 * SEC));
    let before = history(&hub, r, 1000).len();
    assert_eq!(before, 102, "the join notice and 101 messages");
    // Deadlines are rounded up to the next quarter second: at 6.3 s the join notice (sent
    // at 0) and m0..m99 (sent at 1.000..1.099 s) are gone, in a few frames; late (3 s) is not.
    let acts = run_until(&mut hub, 6 * SEC + 300 * MS);
    let frames = frames_for(&acts, c(1));
    let expired: Vec<&Value> = frames.iter().filter(|f| f["type"] == "expired").collect();
    let ids: usize = expired
        .iter()
        .map(|f| f["ids"].as_array().unwrap().len())
        .sum();
    assert_eq!(ids, 101);
    assert!(expired.len() <= 3, "batched: {} frames", expired.len());
    assert_eq!(expired[0]["room_id"], r.to_string());
    let left = history(&hub, r, 1000);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["message"], "late");
    // Everything is gone after the last deadline; the welcome says so too.
    let acts = run_until(&mut hub, 8 * SEC + 100 * MS);
    assert!(kinds(&frames_for(&acts, c(1))).contains(&"expired"));
    assert!(history(&hub, r, 1000).is_empty());
    assert_eq!(hub.stats().messages_expired, 102);
    assert_eq!(
        hub.freed(),
        102,
        "expired history tells the loop to give memory back"
    );
    assert_eq!(
        hub.stats().timers,
        1,
        "no message timer left for an empty history"
    );
    let b = session(&mut hub, "bob", at(9 * SEC));
    let w = join(&mut hub, c(2), b, r, at(9 * SEC));
    let welcome = &frames_for(&w, c(2))[0];
    assert!(messages_of(welcome).is_empty());
}

#[test]
fn rooms_without_message_ttl_keep_history_and_arm_no_message_timer() {
    let (mut hub, r, _) = room_with(fast(), &["alice"], at(0));
    let timers = hub.stats().timers;
    say(&mut hub, c(1), r, "stays", at(SEC));
    assert_eq!(hub.stats().timers, timers);
    run_until(&mut hub, 60 * SEC);
    assert_eq!(history(&hub, r, 10).len(), 2);
    assert_eq!(hub.room_view(r, None).unwrap().message_ttl, None);
}

// ---- private rooms and disappearing messages in cluster mode ----------------------------

/// A cluster-mode hub (Redis up) with `alice` in a loaded room made with `opts` on conn 1.
fn cluster_room_with(opts: RoomOptions) -> (Hub, RoomId, SessionId) {
    let mut hub = Hub::new(fast());
    hub.enable_cluster();
    hub.set_cluster_up(true);
    let s = session(&mut hub, "alice", at(0));
    let r = hub.create_room_with(s, opts, at(0)).unwrap().id;
    hub.load_history(r, Vec::new(), at(0));
    join(&mut hub, c(1), s, r, at(0));
    (hub, r, s)
}

/// Publishes what the hub asked Redis to store, as if it came back through Redis.
fn echo_publishes(hub: &mut Hub, now: Now) -> Vec<Op> {
    let ops = hub.drain_ops();
    for op in &ops {
        if let Op::Publish { room, id, json, .. } = op {
            hub.deliver_event(*room, *id, json, now);
        }
    }
    ops
}

#[test]
fn in_cluster_mode_a_room_is_created_and_joined_with_its_settings() {
    let opts = RoomOptions {
        private: true,
        message_ttl: Some(Micros::from_secs(5)),
    };
    let mut hub = Hub::new(fast());
    hub.enable_cluster();
    hub.set_cluster_up(true);
    let s = session(&mut hub, "alice", at(0));
    hub.drain_ops();
    let new = hub.create_room_with(s, opts, at(0)).unwrap();
    let ops = hub.drain_ops();
    let Some(Op::RoomCreated { settings, .. }) =
        ops.iter().find(|o| matches!(o, Op::RoomCreated { .. }))
    else {
        panic!("{ops:?}");
    };
    let invite = new.invite.unwrap();
    assert_eq!(settings.invite, Some(invite_hash(&invite)));
    assert_eq!(settings.message_ttl, Some(Micros::from_secs(5)));
    hub.load_history(new.id, Vec::new(), at(0));
    join(&mut hub, c(1), s, new.id, at(0));
    let ops = hub.drain_ops();
    assert!(
        ops.iter()
            .any(|o| matches!(o, Op::Joined { settings: j, .. } if j == settings)),
        "{ops:?}"
    );
    let publish = ops.iter().find_map(|o| match o {
        Op::Publish { message_ttl, .. } => Some(*message_ttl),
        _ => None,
    });
    assert_eq!(publish, Some(Some(Micros::from_secs(5))), "the store trims");
    // A rotation is written to Redis.
    hub.rotate_invite(s, new.id).unwrap();
    assert!(
        hub.drain_ops()
            .iter()
            .any(|o| matches!(o, Op::InviteRotated { .. }))
    );
}

#[test]
fn settings_from_redis_follow_rotations_but_never_open_a_private_room() {
    let mut hub = Hub::new(fast());
    hub.enable_cluster();
    hub.set_cluster_up(true);
    let s = session(&mut hub, "bob", at(0));
    let r = RoomId(0x12345);
    let first = RoomSettings {
        invite: Some(invite_hash("first")),
        message_ttl: Some(Micros::from_secs(60)),
    };
    hub.install_room(r, first, at(0));
    assert!(hub.room_private(r));
    assert_eq!(hub.room_message_ttl(r), Some(Micros::from_secs(60)));
    assert_eq!(
        hub.join_with_invite(s, r, Some("second")),
        Err(HubError::RoomNotFound)
    );
    // Rotated on another node: the next lookup brings the new hash.
    let second = RoomSettings {
        invite: Some(invite_hash("second")),
        ..first
    };
    hub.install_room(r, second, at(1));
    assert_eq!(
        hub.join_with_invite(s, r, Some("first")),
        Err(HubError::RoomNotFound)
    );
    // A lookup that shows no settings (a Redis that lost them) does not make it public.
    hub.install_room(r, RoomSettings::default(), at(2));
    assert!(hub.room_private(r));
    assert_eq!(hub.room_message_ttl(r), Some(Micros::from_secs(60)));
    assert_eq!(
        hub.join_with_invite(s, r, None),
        Err(HubError::RoomNotFound)
    );
    assert_eq!(hub.join_with_invite(s, r, Some("second")), Ok(()));
    // Membership follows Redis: left on another node, not a member here any more.
    hub.install_member(s, r, false);
    assert_eq!(hub.room_view(r, Some(s)), None);
    hub.install_member(s, r, true);
    assert!(hub.room_view(r, Some(s)).is_some());
}

#[test]
fn a_history_loaded_from_redis_leaves_out_what_is_past_its_ttl() {
    let opts = RoomOptions {
        private: false,
        message_ttl: Some(Micros::from_secs(5)),
    };
    let (mut hub, r, _) = cluster_room_with(opts);
    let mut ids = MsgIdGen::new(1);
    let old = ids.next(at(0).wall);
    let fresh = ids.next(at(4 * SEC).wall);
    let msgs = vec![
        (old, event_json(old, "old")),
        (fresh, event_json(fresh, "fresh")),
    ];
    hub.load_history(r, msgs.clone(), at(5 * SEC + MS));
    let texts: Vec<Value> = history(&hub, r, 10)
        .into_iter()
        .map(|m| m["message"].clone())
        .collect();
    assert_eq!(texts, [json!("fresh")]);
    hub.catch_up(r, msgs, at(5 * SEC + MS));
    assert_eq!(history(&hub, r, 10).len(), 1);
}

#[test]
fn a_read_drops_what_is_due_before_the_timer_fires() {
    let mut hub = Hub::new(fast());
    let a = session(&mut hub, "alice", at(0));
    let opts = RoomOptions {
        private: false,
        message_ttl: Some(Micros::from_secs(5)),
    };
    let r = hub.create_room_with(a, opts, at(0)).unwrap().id;
    join(&mut hub, c(1), a, r, at(0));
    say(&mut hub, c(1), r, "soon gone", at(SEC));
    // Due at 6.000 s; the timer fires at the next quarter second boundary or later. A read
    // at 6.001 s must not serve it.
    let now = at(6 * SEC + MS);
    assert_eq!(hub.expire_due(r, now), 2, "the join notice and the chat");
    let sent = frames_for(&drain(&mut hub), c(1));
    assert_eq!(kinds(&sent), ["expired"]);
    assert!(history(&hub, r, 10).is_empty());
    // And a welcome at that moment (connect drops what is due first).
    let mut hub = Hub::new(fast());
    let a = session(&mut hub, "alice", at(0));
    let r = hub.create_room_with(a, opts, at(0)).unwrap().id;
    join(&mut hub, c(1), a, r, at(0));
    say(&mut hub, c(1), r, "soon gone", at(SEC));
    let w = join(&mut hub, c(2), a, r, at(6 * SEC + MS));
    let welcome = &frames_for(&w, c(2))[0];
    assert!(messages_of(welcome).is_empty(), "{welcome}");
}

#[test]
fn in_cluster_mode_a_ttl_room_trims_redis_even_after_its_last_member_here_left() {
    let opts = RoomOptions {
        private: false,
        message_ttl: Some(Micros::from_secs(5)),
    };
    let (mut hub, r, _) = cluster_room_with(opts);
    echo_publishes(&mut hub, at(0));
    say(&mut hub, c(1), r, "x", at(SEC));
    echo_publishes(&mut hub, at(SEC));
    leave(&mut hub, c(1), r, at(2 * SEC));
    echo_publishes(&mut hub, at(2 * SEC));
    assert!(!hub.room_live(r), "not served from here any more");
    let mut trims = 0;
    for t in (3..=8).map(|s| s * SEC) {
        run_until(&mut hub, t);
        trims += hub
            .drain_ops()
            .iter()
            .filter(|o| matches!(o, Op::TrimHistory { room, ttl } if *room == r && *ttl == Micros::from_secs(5)))
            .count();
    }
    assert!(trims >= 1, "Redis is told to drop the expired messages");
    assert_eq!(hub.stats().messages_expired, 3, "joined, x, left");
    // Nothing left to expire: no message timer (only the session's and the room's).
    assert_eq!(hub.stats().timers, 2);
}

#[test]
fn shrink_buffers_gives_the_timer_slab_of_a_session_storm_back() {
    // One session lives on; a storm of 20 000 sessions ends, its newest session last. The
    // wheel's own counters leave its slab at the peak (see timer.rs); the loop's
    // shrink_buffers, called when it hands memory back, gives it back.
    let mut hub = Hub::new(HubConfig {
        max_sessions: 30_000,
        ..cfg()
    });
    let stays = session(&mut hub, "stays", at(0));
    let storm: Vec<SessionId> = (0..20_000)
        .map(|i| session(&mut hub, &format!("u{i}"), at(0)))
        .collect();
    for s in &storm {
        hub.end_session(*s, at(SEC));
    }
    assert!(
        hub.wheel.capacity() >= 20_000,
        "compacted without being asked"
    );
    hub.shrink_buffers();
    assert!(
        hub.wheel.capacity() < 4_096,
        "the hub's timer slab kept {} entries",
        hub.wheel.capacity()
    );
    assert!(hub.authenticate(stays, at(2 * SEC)).is_ok());
}
