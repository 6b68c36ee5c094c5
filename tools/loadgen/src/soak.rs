//! `soak`: N clients, each its own session, spread over R rooms, behave at random for a long
//! time: join, chat, type, drop the connection and reconnect with `since`, leave for good and
//! get replaced by a new session. One observer per room never disconnects: the ids it receives
//! are the room's reference order (message ids are UUID v7, increasing, so the order is also
//! checked to be sorted).
//!
//! Checks, all against the observers' room orders:
//! - each session's stream of stored messages (welcome `messages` + live frames, across all its
//!   reconnects) is a gap-free, duplicate-free, in-order run of its room's messages: the live
//!   stream of a connection ends wherever the drop cut it, and the `since` backlog of the next
//!   connection must continue exactly after the last id the client saw;
//! - every chat the sender saw echoed is in the room exactly once, in the sender's `seq` order;
//!   a chat refused with `rate_limited` is not; one still unanswered when its connection was
//!   dropped (in doubt) is there at most once;
//! - `truncated` welcomes only happen when the ring really overflowed;
//! - after the run every client catches up with its room's last message.
//!
//! One mio loop drives every socket; blocking REST calls (session creation, join, delete, leave)
//! run on helper threads so they never stall it.

use crate::args::{Args, loopback_src};
use crate::clock::{self, now_ns};
use crate::http;
use crate::members::reason;
use crate::report::{self, Obj, ServerWatch};
use crate::sys::poll_wait;
use crate::ws::Rng;
use crate::wsclient::{WsClient, WsEvent};
use mio::{Events, Poll, Token, Waker};
use serde_json::{Value, json};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

/// Smallest gap between two chat messages of one client: at most 10/s, half of chatloop's
/// default `--chat-rate` (20/s), so its burst (40) is never needed.
const MIN_CHAT_GAP: f64 = 0.1;
const MIN_TYPING_GAP: f64 = 0.2;
/// A connection is dropped at most once a second, a session lasts at least 2 s.
const MIN_CONNECTED: f64 = 1.0;
const MIN_SESSION: f64 = 2.0;
const CLOSE_TIMEOUT_NS: u64 = 5_000_000_000;
const RETRY_NS: u64 = 1_000_000_000;
const OBSERVERS: usize = 1 << 32;
const WAKER: Token = Token(usize::MAX - 1);

// Fates of a chat message, from its sender's point of view.
const SENT: u8 = 0;
const ECHOED: u8 = 1;
const REFUSED: u8 = 2;
const IN_DOUBT: u8 = 3;

struct Opts {
    addr: SocketAddrV4,
    clients: usize,
    rooms: usize,
    duration: Duration,
    seed: u64,
    ramp: Duration,
    chat_every: f64,
    typing_every: f64,
    reconnect_every: f64,
    offline_min: f64,
    offline_max: f64,
    leave_every: f64,
    history: usize,
    drain: Duration,
    connect_timeout: Duration,
    src_ips: usize,
    http_threads: usize,
    progress: Duration,
    max_pad: usize,
}

/// REST calls done by the helper threads.
enum Job {
    /// POST /sessions, then POST /rooms/{room}/join.
    Start {
        slot: usize,
        name: String,
        room: String,
    },
    /// DELETE /sessions/me.
    Delete { slot: usize, session: String },
    /// DELETE /rooms/{room}/leave.
    Leave {
        slot: usize,
        session: String,
        room: String,
    },
}

struct Done {
    slot: usize,
    /// For `Start`: (session_id, user_id).
    result: Result<Option<(String, String)>, String>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Not connected; at `deadline` do `next`.
    Offline,
    /// A REST call is in flight.
    Http,
    /// Connecting; `deadline` is the time-out for the welcome.
    Connecting,
    Open,
    /// Our close frame went out; waiting for the server's (until `deadline`).
    Closing,
    /// DELETE /sessions/me is in flight on a still open socket: the server must close it (1000).
    Ending,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Next {
    Connect,
    NewSession,
}

/// What to do once the current connection is closed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum After {
    Reconnect,
    Replace,
    LeaveRoomThenReplace,
}

enum Item {
    Id(u128),
    /// A `truncated` welcome: the next id starts a new run.
    Reset,
}

/// One session's received stored messages, checked against its room's order once the observer
/// has seen them.
struct Tracker {
    room: usize,
    pending: VecDeque<Item>,
    /// Index in the room's order of the last checked message.
    cursor: Option<usize>,
    /// Indexes skipped over (missing so far).
    holes: BTreeSet<usize>,
}

impl Tracker {
    fn new(room: usize) -> Tracker {
        Tracker {
            room,
            pending: VecDeque::new(),
            cursor: None,
            holes: BTreeSet::new(),
        }
    }
}

struct Client {
    room: usize,
    rng: Rng,
    phase: Phase,
    next: Next,
    after: After,
    ws: Option<WsClient>,
    /// Index in `World::senders` of the current session (usize::MAX before the first).
    cid: usize,
    session: String,
    user_id: String,
    last_id: Option<u128>,
    welcomed: bool,
    with_since: bool,
    /// Chat seqs sent on this connection and not yet answered (echo or error), in order.
    outstanding: VecDeque<u64>,
    next_chat: u64,
    next_typing: u64,
    next_disconnect: u64,
    next_leave: u64,
    deadline: u64,
    ending_http_done: bool,
    ending_ws_done: bool,
    tracker: Tracker,
    conns: u64,
    /// Scheduled wake-up and its generation (stale heap entries are skipped).
    wake: Option<u64>,
    wake_gen: u64,
}

struct Observer {
    ws: Option<WsClient>,
    welcomed: bool,
    dead: bool,
}

struct RoomLog {
    id: String,
    ids: Vec<u128>,
    chats: u64,
    joins: u64,
    leaves: u64,
}

struct Sender {
    room: usize,
    user_id: String,
    fates: Vec<u8>,
    /// Times each seq appeared in the room (observer), saturating.
    seen: Vec<u8>,
    last_in_room: Option<u64>,
}

#[derive(Default)]
struct Counters {
    sessions_started: u64,
    sessions_deleted: u64,
    room_leaves: u64,
    replacements: u64,
    connects: u64,
    reconnects_since: u64,
    disconnects_clean: u64,
    disconnects_abrupt: u64,
    leave_modes: BTreeMap<String, u64>,
    chats_sent: u64,
    chats_echoed: u64,
    chats_refused: u64,
    late_echoes: u64,
    typing_sent: u64,
    typing_received: u64,
    typing_stopped_received: u64,
    live_deliveries: u64,
    welcome_history: u64,
    since_backlog: u64,
    max_since_backlog: u64,
    truncated: u64,
    truncated_unexpected: u64,
    checked: u64,
    lost: u64,
    duplicates: u64,
    reordered: u64,
    phantom: u64,
    room_order_violations: u64,
    room_duplicates: u64,
    sender_reordered: u64,
    foreign_chats: u64,
    bad_ids: u64,
    welcome_without_self: u64,
    observer_failures: u64,
    errors: BTreeMap<String, u64>,
    error_frames: BTreeMap<String, u64>,
    other_frames: BTreeMap<String, u64>,
}

struct World {
    o: Opts,
    poll: Poll,
    rooms: Vec<RoomLog>,
    senders: Vec<Sender>,
    retired: Vec<Tracker>,
    c: Counters,
    jobs: Option<mpsc::Sender<Job>>,
    stopping: bool,
}

impl World {
    fn err(&mut self, why: &str) {
        *self.c.errors.entry(reason(why)).or_default() += 1;
    }
}

pub fn run(a: &Args) -> Result<Obj, String> {
    let duration = a.dur_or("duration", Duration::from_secs(60))?;
    let clients = a.u64_or("clients", 200)?.clamp(1, 100_000) as usize;
    let o = Opts {
        addr: a.addr()?,
        clients,
        rooms: a.u64_or("rooms", 10)?.clamp(1, 10_000) as usize,
        duration,
        seed: a.u64_or("seed", 1)?,
        ramp: a.dur_or(
            "ramp",
            Duration::from_secs(10)
                .min(duration / 4)
                .max(Duration::from_millis(1)),
        )?,
        chat_every: a
            .dur_or("chat-every", Duration::from_secs(4))?
            .as_secs_f64(),
        typing_every: a
            .dur_or("typing-every", Duration::from_secs(8))?
            .as_secs_f64(),
        reconnect_every: a
            .dur_or("reconnect-every", Duration::from_secs(30))?
            .as_secs_f64(),
        offline_min: a
            .dur_or("offline-min", Duration::from_millis(50))?
            .as_secs_f64(),
        offline_max: a
            .dur_or("offline-max", Duration::from_secs(3))?
            .as_secs_f64(),
        leave_every: a
            .dur_or("leave-every", Duration::from_secs(120))?
            .as_secs_f64(),
        history: a.u64_or("history", 1000)?.max(1) as usize,
        drain: a.dur_or("drain", Duration::from_secs(20))?,
        connect_timeout: a.dur_or("connect-timeout", Duration::from_secs(10))?,
        src_ips: a.u64_or("src-ips", 8)?.clamp(1, 250) as usize,
        http_threads: a.u64_or("http-threads", 2)?.clamp(1, 16) as usize,
        progress: a.dur_or("progress", Duration::from_secs(30))?,
        max_pad: a.u64_or("max-pad", 64)?.min(4000) as usize,
    };
    let mut watch =
        ServerWatch::new(a.opt_u64("server-pid")?)?.with_extra(a.opt_str("extra-pids")?)?;
    a.finish()?;
    if o.offline_max < o.offline_min {
        return Err("--offline-max must be at least --offline-min".into());
    }
    let limit = crate::sys::raise_nofile().map_err(|e| format!("raising RLIMIT_NOFILE: {e}"))?;
    if (o.clients + o.rooms) as u64 + 256 > limit {
        return Err(format!(
            "{} sockets need more than the open-file limit {limit}",
            o.clients + o.rooms
        ));
    }
    // Stored messages per room per second (chat, and a user_left + user_joined per reconnect and
    // per replacement); during the longest offline spell (plus a margin for the reconnect
    // itself) the ring must keep the client's last id, or `since` cannot work.
    let per_room = o.clients.div_ceil(o.rooms) as f64;
    let room_rate = per_room
        * (1.0 / o.chat_every.max(MIN_CHAT_GAP)
            + 2.0 / o.reconnect_every.max(MIN_CONNECTED)
            + 2.0 / o.leave_every.max(MIN_SESSION));
    let offline_msgs = room_rate * (o.offline_max + 2.0);
    if offline_msgs * 2.0 > o.history as f64 {
        return Err(format!(
            "about {room_rate:.1} stored messages/s per room would put ~{offline_msgs:.0} messages \
             through the {}-message ring during one offline spell (>{}): use more rooms, \
             longer --chat-every or a shorter --offline-max",
            o.history,
            o.history / 2
        ));
    }

    eprintln!(
        "soak: {} clients in {} rooms for {:.0}s (seed {}), chat every ~{}s, typing ~{}s, \
         reconnect ~{}s (offline {}-{}s), leave ~{}s; ~{room_rate:.1} stored msgs/s per room",
        o.clients,
        o.rooms,
        o.duration.as_secs_f64(),
        o.seed,
        o.chat_every,
        o.typing_every,
        o.reconnect_every,
        o.offline_min,
        o.offline_max,
        o.leave_every
    );
    let addr = o.addr;
    let observer_sessions = http::create_sessions(addr, o.rooms, "soak-observer", 4)?;
    let mut hc = http::Client::new(addr);
    let room_ids = observer_sessions
        .iter()
        .map(|s| hc.create_room(s))
        .collect::<Result<Vec<_>, _>>()?;
    drop(hc);

    let poll = Poll::new().map_err(|e| format!("epoll: {e}"))?;
    let waker =
        Arc::new(Waker::new(poll.registry(), WAKER).map_err(|e| format!("mio waker: {e}"))?);
    let (job_tx, job_rx) = mpsc::channel::<Job>();
    let (done_tx, done_rx) = mpsc::channel::<Done>();
    let job_rx = Arc::new(Mutex::new(job_rx));
    let helpers: Vec<_> = (0..o.http_threads)
        .map(|_| {
            let (rx, tx, waker) = (job_rx.clone(), done_tx.clone(), waker.clone());
            std::thread::spawn(move || http_helper(addr, rx, tx, waker))
        })
        .collect();
    drop(done_tx);

    let mut w = World {
        rooms: room_ids
            .iter()
            .map(|id| RoomLog {
                id: id.clone(),
                ids: Vec::new(),
                chats: 0,
                joins: 0,
                leaves: 0,
            })
            .collect(),
        o,
        poll,
        senders: Vec::new(),
        retired: Vec::new(),
        c: Counters::default(),
        jobs: Some(job_tx),
        stopping: false,
    };
    let mut scratch = vec![0u8; 256 << 10];
    let mut events = Events::with_capacity(1024);

    // Observers first: each room's reference stream starts with the observer's own user_joined.
    let mut observers: Vec<Observer> = Vec::new();
    for (r, s) in observer_sessions.iter().enumerate() {
        let path = format!("/ws/{}?session_id={s}", room_ids[r]);
        let mut ws = WsClient::connect(addr, Some(loopback_src(r, 1, 0)), &path, r as u64)?;
        ws.register(w.poll.registry(), Token(OBSERVERS + r))?;
        observers.push(Observer {
            ws: Some(ws),
            welcomed: false,
            dead: false,
        });
    }
    let obs_deadline = now_ns() + 30_000_000_000;
    while observers.iter().any(|ob| !ob.welcomed && !ob.dead) && now_ns() < obs_deadline {
        poll_wait(&mut w.poll, &mut events, Duration::from_millis(20))?;
        for ev in events.iter() {
            let i = ev.token().0;
            if i >= OBSERVERS {
                observer_event(
                    &mut observers[i - OBSERVERS],
                    i - OBSERVERS,
                    &mut w,
                    ev,
                    &mut scratch,
                );
            }
        }
    }
    if let Some(r) = observers.iter().position(|ob| !ob.welcomed) {
        return Err(format!("observer of room {} was not welcomed", room_ids[r]));
    }

    let t0 = now_ns();
    let ramp_ns = w.o.ramp.as_nanos() as u64;
    let end = t0 + w.o.duration.as_nanos() as u64;
    let mut clients: Vec<Client> = (0..w.o.clients)
        .map(|i| {
            let room = i % w.o.rooms;
            Client {
                room,
                rng: Rng::new(w.o.seed ^ (i as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D)),
                phase: Phase::Offline,
                next: Next::NewSession,
                after: After::Reconnect,
                ws: None,
                cid: usize::MAX,
                session: String::new(),
                user_id: String::new(),
                last_id: None,
                welcomed: false,
                with_since: false,
                outstanding: VecDeque::new(),
                next_chat: u64::MAX,
                next_typing: u64::MAX,
                next_disconnect: u64::MAX,
                next_leave: u64::MAX,
                deadline: t0 + ramp_ns * i as u64 / w.o.clients as u64,
                ending_http_done: false,
                ending_ws_done: false,
                tracker: Tracker::new(room),
                conns: 0,
                wake: None,
                wake_gen: 0,
            }
        })
        .collect();
    let mut heap: BinaryHeap<Reverse<(u64, usize, u64)>> = BinaryHeap::new();
    for (i, c) in clients.iter_mut().enumerate() {
        resched(c, i, &mut heap, &w);
    }
    eprintln!(
        "soak: {} rooms ready, observers connected; clients arrive over {:.1}s",
        w.rooms.len(),
        w.o.ramp.as_secs_f64()
    );
    watch.begin();
    let busy = report::SelfBusy::start();
    let progress_ns = w.o.progress.as_nanos().max(1_000_000_000) as u64;
    let mut next_progress = t0 + progress_ns;
    let mut next_verify = t0;
    let mut rss_series: Vec<(f64, u64)> = Vec::new();
    if let Some(s) = watch.sample() {
        rss_series.push((0.0, s.rss_bytes / 1024));
    }
    let mut drain_end = u64::MAX;
    let mut caught_up = false;
    let drained_at;

    loop {
        let now = now_ns();
        if !w.stopping && now >= end {
            w.stopping = true;
            drain_end = now + w.o.drain.as_nanos() as u64;
            eprintln!(
                "soak: {:.0}s elapsed: no more activity; offline clients reconnect, then all must catch up",
                clock::secs(now - t0)
            );
            for (i, c) in clients.iter_mut().enumerate() {
                if c.phase == Phase::Offline {
                    c.deadline = now;
                }
                resched(c, i, &mut heap, &w);
            }
        }
        if w.stopping {
            if now >= next_verify {
                verify_all(&mut clients, &mut w);
                next_verify = now + 100_000_000;
                if all_caught_up(&clients, &w, &observers) {
                    caught_up = true;
                    drained_at = now;
                    break;
                }
            }
            if now >= drain_end {
                drained_at = now;
                break;
            }
        } else if now >= next_verify {
            verify_all(&mut clients, &mut w);
            next_verify = now + 250_000_000;
        }
        if now >= next_progress {
            next_progress = now + progress_ns;
            let rss = watch.sample().map(|s| s.rss_bytes / 1024);
            if let Some(k) = rss {
                rss_series.push((report::round(clock::secs(now - t0), 1), k));
            }
            progress(&clients, &w, clock::secs(now - t0), rss);
        }

        // Due timers (bounded per round so I/O is not starved).
        let mut n = 0;
        while let Some(&Reverse((at, i, g))) = heap.peek() {
            if at > now || n >= 4000 {
                break;
            }
            heap.pop();
            n += 1;
            if clients[i].wake_gen != g {
                continue;
            }
            clients[i].wake = None;
            tick(&mut clients[i], i, &mut w, now);
            resched(&mut clients[i], i, &mut heap, &w);
        }
        while let Ok(d) = done_rx.try_recv() {
            let i = d.slot;
            http_done(&mut clients[i], i, &mut w, d.result, now_ns());
            resched(&mut clients[i], i, &mut heap, &w);
        }

        let next_timer = heap.peek().map_or(u64::MAX, |r| r.0.0);
        let timeout = Duration::from_nanos(next_timer.saturating_sub(now_ns()))
            .min(Duration::from_millis(10));
        poll_wait(&mut w.poll, &mut events, timeout)?;
        for ev in events.iter() {
            let i = ev.token().0;
            if ev.token() == WAKER {
                continue;
            } else if i >= OBSERVERS {
                observer_event(
                    &mut observers[i - OBSERVERS],
                    i - OBSERVERS,
                    &mut w,
                    ev,
                    &mut scratch,
                );
            } else if i < clients.len() {
                client_event(&mut clients[i], i, &mut w, ev, &mut scratch);
                resched(&mut clients[i], i, &mut heap, &w);
            }
        }
    }
    let t_end = now_ns();
    let elapsed = clock::secs(end.min(t_end) - t0);
    let drain_s = clock::secs(drained_at.saturating_sub(end));
    let mut o = Obj::new();
    let cpu_line = watch.end(&mut o, w.c.live_deliveries, "delivery");
    let busy_warning = busy.end(&mut o);

    // Final checks.
    verify_all(&mut clients, &mut w);
    let mut tail_missing = 0u64;
    let mut not_connected_at_end = 0u64;
    let mut unverified = 0u64;
    for c in clients.iter() {
        if c.phase != Phase::Open {
            not_connected_at_end += 1;
        } else if let Some(cur) = c.tracker.cursor {
            let last = w.rooms[c.room].ids.len().saturating_sub(1);
            tail_missing += last.saturating_sub(cur) as u64;
        }
    }
    for t in clients.iter().map(|c| &c.tracker).chain(w.retired.iter()) {
        w.c.lost += t.holes.len() as u64;
        unverified += t.pending.len() as u64;
    }
    let (mut confirmed_missing, mut refused_published) = (0u64, 0u64);
    let (mut in_doubt, mut in_doubt_published, mut unanswered) = (0u64, 0u64, 0u64);
    for s in &w.senders {
        for (seq, &fate) in s.fates.iter().enumerate() {
            let seen = s.seen.get(seq).copied().unwrap_or(0);
            match fate {
                ECHOED if seen == 0 => confirmed_missing += 1,
                REFUSED if seen > 0 => refused_published += 1,
                IN_DOUBT => {
                    in_doubt += 1;
                    in_doubt_published += u64::from(seen > 0);
                }
                SENT => unanswered += 1,
                _ => {}
            }
        }
    }
    let observers_open = observers.iter().filter(|ob| !ob.dead).count();

    // Close politely: clients first, then the observers.
    close_all(&mut clients, &mut observers, &mut w, &mut scratch);
    w.jobs = None;
    for h in helpers {
        let _ = h.join();
    }

    let c = &w.c;
    let room_msgs: u64 = w.rooms.iter().map(|r| r.ids.len() as u64).sum();
    let room_chats: u64 = w.rooms.iter().map(|r| r.chats).sum();
    let room_joins: u64 = w.rooms.iter().map(|r| r.joins).sum();
    let room_leaves: u64 = w.rooms.iter().map(|r| r.leaves).sum();
    let max_room = w.rooms.iter().map(|r| r.ids.len()).max().unwrap_or(0);
    let errors: u64 = c.errors.values().sum();
    let lost = c.lost + tail_missing;
    let mut failed: Vec<String> = Vec::new();
    for (name, v) in [
        ("lost", lost),
        ("duplicates", c.duplicates),
        ("reordered", c.reordered),
        ("phantom", c.phantom),
        ("confirmed_missing", confirmed_missing),
        ("refused_published", refused_published),
        ("room_duplicates", c.room_duplicates),
        ("room_order_violations", c.room_order_violations),
        ("sender_reordered", c.sender_reordered),
        ("truncated_unexpected", c.truncated_unexpected),
        ("unanswered", unanswered),
        ("unverified", unverified),
        ("observer_failures", c.observer_failures),
        ("errors", errors),
        ("not_connected_at_end", not_connected_at_end),
    ] {
        if v > 0 {
            failed.push(format!("{name}={v}"));
        }
    }
    if !caught_up {
        failed.push("not_caught_up_after_drain".into());
    }
    let ok = failed.is_empty();
    let ins = |o: &mut Obj, k: &str, v: Value| {
        o.insert(k.into(), v);
    };
    ins(&mut o, "scenario", json!("soak"));
    ins(&mut o, "ok", json!(ok));
    ins(&mut o, "failed_checks", json!(failed));
    ins(&mut o, "clients", json!(w.o.clients));
    ins(&mut o, "rooms", json!(w.o.rooms));
    ins(&mut o, "seed", json!(w.o.seed));
    ins(&mut o, "duration_s", json!(report::round(elapsed, 3)));
    ins(&mut o, "drain_s", json!(report::round(drain_s, 3)));
    ins(&mut o, "caught_up", json!(caught_up));
    ins(&mut o, "chat_every_s", json!(w.o.chat_every));
    ins(&mut o, "reconnect_every_s", json!(w.o.reconnect_every));
    ins(&mut o, "leave_every_s", json!(w.o.leave_every));
    ins(&mut o, "offline_max_s", json!(w.o.offline_max));
    ins(&mut o, "sessions_started", json!(c.sessions_started));
    ins(&mut o, "sessions_deleted", json!(c.sessions_deleted));
    ins(&mut o, "rest_room_leaves", json!(c.room_leaves));
    ins(&mut o, "replacements", json!(c.replacements));
    ins(&mut o, "leave_modes", json!(c.leave_modes));
    ins(&mut o, "connects", json!(c.connects));
    ins(&mut o, "reconnects_since", json!(c.reconnects_since));
    ins(&mut o, "disconnects_clean", json!(c.disconnects_clean));
    ins(&mut o, "disconnects_abrupt", json!(c.disconnects_abrupt));
    ins(&mut o, "chats_sent", json!(c.chats_sent));
    ins(&mut o, "chats_echoed", json!(c.chats_echoed));
    ins(&mut o, "chats_refused", json!(c.chats_refused));
    ins(&mut o, "chats_in_doubt", json!(in_doubt));
    ins(&mut o, "late_echoes", json!(c.late_echoes));
    ins(
        &mut o,
        "chats_in_doubt_published",
        json!(in_doubt_published),
    );
    ins(&mut o, "chats_unanswered", json!(unanswered));
    ins(&mut o, "confirmed_missing", json!(confirmed_missing));
    ins(&mut o, "refused_published", json!(refused_published));
    ins(&mut o, "typing_sent", json!(c.typing_sent));
    ins(&mut o, "typing_received", json!(c.typing_received));
    ins(
        &mut o,
        "typing_stopped_received",
        json!(c.typing_stopped_received),
    );
    ins(&mut o, "room_messages", json!(room_msgs));
    ins(&mut o, "room_chats", json!(room_chats));
    ins(&mut o, "room_user_joined", json!(room_joins));
    ins(&mut o, "room_user_left", json!(room_leaves));
    ins(&mut o, "max_room_messages", json!(max_room));
    ins(&mut o, "live_deliveries", json!(c.live_deliveries));
    ins(&mut o, "welcome_history", json!(c.welcome_history));
    ins(&mut o, "since_backlog", json!(c.since_backlog));
    ins(&mut o, "max_since_backlog", json!(c.max_since_backlog));
    ins(&mut o, "checked", json!(c.checked));
    ins(&mut o, "lost", json!(lost));
    ins(&mut o, "tail_missing", json!(tail_missing));
    ins(&mut o, "duplicates", json!(c.duplicates));
    ins(&mut o, "reordered", json!(c.reordered));
    ins(&mut o, "phantom", json!(c.phantom));
    ins(&mut o, "unverified", json!(unverified));
    ins(&mut o, "truncated", json!(c.truncated));
    ins(
        &mut o,
        "truncated_unexpected",
        json!(c.truncated_unexpected),
    );
    ins(&mut o, "room_duplicates", json!(c.room_duplicates));
    ins(
        &mut o,
        "room_order_violations",
        json!(c.room_order_violations),
    );
    ins(&mut o, "sender_reordered", json!(c.sender_reordered));
    ins(&mut o, "foreign_chats", json!(c.foreign_chats));
    ins(&mut o, "bad_ids", json!(c.bad_ids));
    ins(
        &mut o,
        "welcome_without_self",
        json!(c.welcome_without_self),
    );
    ins(&mut o, "observer_failures", json!(c.observer_failures));
    ins(&mut o, "observers_open_at_end", json!(observers_open));
    ins(&mut o, "not_connected_at_end", json!(not_connected_at_end));
    ins(&mut o, "errors", json!(errors));
    ins(&mut o, "error_reasons", json!(c.errors));
    ins(&mut o, "error_frames", json!(c.error_frames));
    ins(&mut o, "other_frames", json!(c.other_frames));
    ins(&mut o, "server_rss_kib_series", json!(rss_series));

    eprintln!(
        "soak {} clients / {} rooms, {elapsed:.0}s + drain {drain_s:.1}s (seed {}): {}",
        w.o.clients,
        w.o.rooms,
        w.o.seed,
        if ok {
            "OK".to_string()
        } else {
            format!("FAILED: {}", failed.join(" "))
        }
    );
    eprintln!(
        "  sessions: {} started ({} replacements; {} deleted, {} room leaves; modes {:?})",
        c.sessions_started, c.replacements, c.sessions_deleted, c.room_leaves, c.leave_modes
    );
    eprintln!(
        "  connections: {} welcomed, {} with since; drops: {} clean, {} abrupt",
        c.connects, c.reconnects_since, c.disconnects_clean, c.disconnects_abrupt
    );
    eprintln!(
        "  chat: {} sent, {} echoed, {} refused, {} in doubt ({} of them published), {} unanswered; typing {} sent / {} received",
        c.chats_sent,
        c.chats_echoed,
        c.chats_refused,
        in_doubt,
        in_doubt_published,
        unanswered,
        c.typing_sent,
        c.typing_received
    );
    eprintln!(
        "  rooms: {room_msgs} stored messages ({room_chats} chat, {room_joins} joined, {room_leaves} left), largest room {max_room}"
    );
    eprintln!(
        "  deliveries: {} live + {} via since backlog (max {}) + {} initial history; {} checked",
        c.live_deliveries, c.since_backlog, c.max_since_backlog, c.welcome_history, c.checked
    );
    eprintln!(
        "  integrity: lost {lost} (tail {tail_missing}), duplicates {}, reordered {}, phantom {}, unverified {unverified}; \
         truncated welcomes {} ({} unexpected); echoed-but-missing {confirmed_missing}, refused-but-published {refused_published}; \
         room dups {}, room order {}, sender order {}",
        c.duplicates,
        c.reordered,
        c.phantom,
        c.truncated,
        c.truncated_unexpected,
        c.room_duplicates,
        c.room_order_violations,
        c.sender_reordered
    );
    eprintln!(
        "  errors: {errors} {:?}; error frames {:?}; observer failures {}",
        c.errors, c.error_frames, c.observer_failures
    );
    if !cpu_line.is_empty() {
        eprintln!("  {cpu_line}");
    }
    if let Some(wn) = busy_warning {
        eprintln!("  {wn}");
    }
    Ok(o)
}

fn http_helper(
    addr: SocketAddrV4,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    tx: mpsc::Sender<Done>,
    waker: Arc<Waker>,
) {
    let mut c = http::Client::new(addr);
    loop {
        let job = match rx.lock() {
            Ok(r) => r.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let (slot, result) = match job {
            Job::Start { slot, name, room } => {
                let r = (|| {
                    let body = json!({ "username": name }).to_string();
                    let v = c.json("POST", "/sessions", None, Some(&body), 201)?;
                    let field = |k: &str| {
                        v.get(k)
                            .and_then(Value::as_str)
                            .map(str::to_string)
                            .ok_or_else(|| format!("POST /sessions: no {k} in {v}"))
                    };
                    let (s, u) = (field("session_id")?, field("user_id")?);
                    c.json("POST", &format!("/rooms/{room}/join"), Some(&s), None, 200)?;
                    Ok(Some((s, u)))
                })();
                (slot, r)
            }
            Job::Delete { slot, session } => (
                slot,
                c.json("DELETE", "/sessions/me", Some(&session), None, 200)
                    .map(|_| None),
            ),
            Job::Leave {
                slot,
                session,
                room,
            } => (
                slot,
                c.json(
                    "DELETE",
                    &format!("/rooms/{room}/leave"),
                    Some(&session),
                    None,
                    200,
                )
                .map(|_| None),
            ),
        };
        if tx.send(Done { slot, result }).is_err() {
            return;
        }
        let _ = waker.wake();
    }
}

fn uniform(rng: &mut Rng) -> f64 {
    (rng.next() >> 11) as f64 / (1u64 << 53) as f64
}

/// Exponentially distributed delay with mean `mean` seconds, at least `min`, in ns.
fn exp_delay(rng: &mut Rng, mean: f64, min: f64) -> u64 {
    let d = -mean * (1.0 - uniform(rng)).ln();
    (d.max(min) * 1e9) as u64
}

fn parse_uuid(s: &str) -> Option<u128> {
    if s.len() != 36 {
        return None;
    }
    let mut v: u128 = 0;
    for (i, b) in s.bytes().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if b != b'-' {
                return None;
            }
            continue;
        }
        v = v << 4 | (b as char).to_digit(16)? as u128;
    }
    Some(v)
}

fn fmt_uuid(v: u128) -> String {
    let h = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// `(cid, seq)` from a soak chat text `c<cid> s<seq> <padding>`.
fn parse_chat_text(t: &str) -> Option<(usize, u64)> {
    let mut it = t.split(' ');
    let cid = it.next()?.strip_prefix('c')?.parse().ok()?;
    let seq = it.next()?.strip_prefix('s')?.parse().ok()?;
    Some((cid, seq))
}

/// When the client next needs `tick`; `None` while it only waits for I/O or a REST answer.
fn wake_time(c: &Client, w: &World) -> Option<u64> {
    match c.phase {
        Phase::Offline | Phase::Connecting | Phase::Closing | Phase::Ending => Some(c.deadline),
        Phase::Http => None,
        Phase::Open if w.stopping => None,
        Phase::Open => Some(
            c.next_chat
                .min(c.next_typing)
                .min(c.next_disconnect)
                .min(c.next_leave),
        ),
    }
}

fn resched(c: &mut Client, i: usize, heap: &mut BinaryHeap<Reverse<(u64, usize, u64)>>, w: &World) {
    let t = wake_time(c, w);
    if t != c.wake {
        c.wake = t;
        c.wake_gen += 1;
        if let Some(t) = t {
            heap.push(Reverse((t, i, c.wake_gen)));
        }
    }
}

fn submit(w: &mut World, job: Job) {
    if let Some(tx) = &w.jobs {
        let _ = tx.send(job);
    }
}

/// Timers of one client.
fn tick(c: &mut Client, slot: usize, w: &mut World, now: u64) {
    match c.phase {
        Phase::Offline if now >= c.deadline => match c.next {
            Next::NewSession => start_session(c, slot, w),
            Next::Connect => connect(c, slot, w, now),
        },
        Phase::Connecting if now >= c.deadline => {
            w.err("no welcome within --connect-timeout");
            drop_conn(c, w);
            retry_later(c, now);
        }
        Phase::Closing if now >= c.deadline => {
            w.err("server did not complete the close within 5s");
            drop_conn(c, w);
            after_close(c, slot, w, now);
        }
        Phase::Ending if now >= c.deadline => {
            w.err("DELETE /sessions/me: no answer or no close 1000 within 5s");
            drop_conn(c, w);
            replace(c, w, now);
        }
        Phase::Open if !w.stopping => {
            if now >= c.next_chat {
                send_chat(c, w, now);
                c.next_chat = now + exp_delay(&mut c.rng, w.o.chat_every, MIN_CHAT_GAP);
            }
            if c.phase == Phase::Open && now >= c.next_typing {
                let r =
                    c.ws.as_mut()
                        .map_or(Ok(()), |ws| ws.send_text(br#"{"type":"typing"}"#));
                match r {
                    Ok(()) => w.c.typing_sent += 1,
                    Err(e) => lose_conn(c, w, &format!("send typing: {e}"), now),
                }
                c.next_typing = now + exp_delay(&mut c.rng, w.o.typing_every, MIN_TYPING_GAP);
            }
            if c.phase != Phase::Open {
                return;
            }
            if now >= c.next_leave {
                leave(c, slot, w, now);
            } else if now >= c.next_disconnect {
                c.after = After::Reconnect;
                if c.rng.next().is_multiple_of(2) {
                    close_clean(c, slot, w, now);
                } else {
                    w.c.disconnects_abrupt += 1;
                    drop_conn(c, w);
                    after_close(c, slot, w, now);
                }
            }
        }
        _ => {}
    }
}

fn start_session(c: &mut Client, slot: usize, w: &mut World) {
    c.cid = w.senders.len();
    w.senders.push(Sender {
        room: c.room,
        user_id: String::new(),
        fates: Vec::new(),
        seen: Vec::new(),
        last_in_room: None,
    });
    c.phase = Phase::Http;
    let job = Job::Start {
        slot,
        name: format!("soak-{}", c.cid),
        room: w.rooms[c.room].id.clone(),
    };
    submit(w, job);
}

fn connect(c: &mut Client, slot: usize, w: &mut World, now: u64) {
    let mut path = format!("/ws/{}?session_id={}", w.rooms[c.room].id, c.session);
    c.with_since = c.last_id.is_some();
    if let Some(id) = c.last_id {
        path.push_str("&since=");
        path.push_str(&fmt_uuid(id));
    }
    c.conns += 1;
    let src = loopback_src(
        slot.wrapping_mul(7).wrapping_add(c.conns as usize),
        w.o.src_ips,
        0,
    );
    let seed = (slot as u64) << 20 ^ c.conns ^ w.o.seed;
    let r = WsClient::connect(w.o.addr, Some(src), &path, seed)
        .and_then(|mut ws| ws.register(w.poll.registry(), Token(slot)).map(|_| ws));
    match r {
        Ok(ws) => {
            c.ws = Some(ws);
            c.welcomed = false;
            c.phase = Phase::Connecting;
            c.deadline = now + w.o.connect_timeout.as_nanos() as u64;
        }
        Err(e) => {
            w.err(&e);
            retry_later(c, now);
        }
    }
}

fn retry_later(c: &mut Client, now: u64) {
    c.phase = Phase::Offline;
    c.next = Next::Connect;
    c.deadline = now + RETRY_NS;
}

fn send_chat(c: &mut Client, w: &mut World, now: u64) {
    let s = &mut w.senders[c.cid];
    let seq = s.fates.len() as u64;
    let pad_len = (c.rng.next() % (w.o.max_pad as u64 + 1)) as usize;
    let pad: String = (0..pad_len)
        .map(|_| (b'a' + (c.rng.next() % 26) as u8) as char)
        .collect();
    let frame = format!(
        "{{\"type\":\"chat\",\"message\":\"c{} s{seq} {pad}\"}}",
        c.cid
    );
    let r = c.ws.as_mut().map_or(Err("no socket".to_string()), |ws| {
        ws.send_text(frame.as_bytes())
    });
    s.fates.push(SENT);
    c.outstanding.push_back(seq);
    w.c.chats_sent += 1;
    if let Err(e) = r {
        lose_conn(c, w, &format!("send chat: {e}"), now);
    }
}

/// Leaves for good, one of four ways; a new session takes the slot afterwards.
fn leave(c: &mut Client, slot: usize, w: &mut World, now: u64) {
    let mode = c.rng.next() % 4;
    let name = [
        "delete-session-while-open",
        "close-then-leave-room",
        "close-and-abandon",
        "drop-and-abandon",
    ][mode as usize];
    *w.c.leave_modes.entry(name.into()).or_default() += 1;
    match mode {
        0 => {
            c.phase = Phase::Ending;
            c.ending_http_done = false;
            c.ending_ws_done = false;
            c.deadline = now + CLOSE_TIMEOUT_NS;
            let job = Job::Delete {
                slot,
                session: c.session.clone(),
            };
            submit(w, job);
        }
        1 => {
            c.after = After::LeaveRoomThenReplace;
            close_clean(c, slot, w, now);
        }
        2 => {
            c.after = After::Replace;
            close_clean(c, slot, w, now);
        }
        _ => {
            c.after = After::Replace;
            w.c.disconnects_abrupt += 1;
            drop_conn(c, w);
            after_close(c, slot, w, now);
        }
    }
}

fn close_clean(c: &mut Client, slot: usize, w: &mut World, now: u64) {
    w.c.disconnects_clean += 1;
    let r = c.ws.as_mut().map_or(Ok(()), |ws| ws.send_close(1000));
    c.phase = Phase::Closing;
    c.deadline = now + CLOSE_TIMEOUT_NS;
    if let Err(e) = r {
        w.err(&format!("send close: {e}"));
        drop_conn(c, w);
        after_close(c, slot, w, now);
    }
}

/// Forgets the socket (closing it); unanswered chats become "in doubt".
fn drop_conn(c: &mut Client, w: &mut World) {
    if let Some(mut ws) = c.ws.take() {
        ws.deregister(w.poll.registry());
    }
    let s = &mut w.senders[c.cid];
    for seq in c.outstanding.drain(..) {
        s.fates[seq as usize] = IN_DOUBT;
    }
}

/// An unexpected end of a connection: counted as an error; the client reconnects.
fn lose_conn(c: &mut Client, w: &mut World, why: &str, now: u64) {
    w.err(why);
    drop_conn(c, w);
    retry_later(c, now);
    c.deadline = now + RETRY_NS / 2;
}

fn after_close(c: &mut Client, slot: usize, w: &mut World, now: u64) {
    match c.after {
        After::Reconnect => {
            c.phase = Phase::Offline;
            c.next = Next::Connect;
            let d = w.o.offline_min + uniform(&mut c.rng) * (w.o.offline_max - w.o.offline_min);
            c.deadline = if w.stopping {
                now
            } else {
                now + (d * 1e9) as u64
            };
        }
        After::Replace => replace(c, w, now),
        After::LeaveRoomThenReplace => {
            c.phase = Phase::Http;
            let job = Job::Leave {
                slot,
                session: c.session.clone(),
                room: w.rooms[c.room].id.clone(),
            };
            submit(w, job);
        }
    }
}

/// The session is over: its tracker is retired (checked until its pending ids are resolved)
/// and the slot starts a new session.
fn replace(c: &mut Client, w: &mut World, now: u64) {
    let t = std::mem::replace(&mut c.tracker, Tracker::new(c.room));
    w.retired.push(t);
    w.c.replacements += 1;
    c.last_id = None;
    c.session.clear();
    c.phase = Phase::Offline;
    c.next = Next::NewSession;
    c.deadline = now;
    c.after = After::Reconnect;
}

fn http_done(
    c: &mut Client,
    slot: usize,
    w: &mut World,
    result: Result<Option<(String, String)>, String>,
    now: u64,
) {
    match (c.phase, result) {
        (Phase::Http, Ok(Some((session, user_id)))) => {
            w.c.sessions_started += 1;
            w.senders[c.cid].user_id = user_id.clone();
            c.session = session;
            c.user_id = user_id;
            c.last_id = None;
            c.next_leave = now + exp_delay(&mut c.rng, w.o.leave_every, MIN_SESSION);
            connect(c, slot, w, now);
        }
        (Phase::Http, Ok(None)) => {
            // DELETE /rooms/{id}/leave answered.
            w.c.room_leaves += 1;
            replace(c, w, now);
        }
        (Phase::Http, Err(e)) => {
            w.err(&e);
            if c.session.is_empty() {
                c.phase = Phase::Offline;
                c.next = Next::NewSession;
                c.deadline = now + RETRY_NS;
            } else {
                replace(c, w, now);
            }
        }
        (Phase::Ending, r) => {
            match r {
                Ok(_) => w.c.sessions_deleted += 1,
                Err(e) => w.err(&e),
            }
            c.ending_http_done = true;
            if c.ending_ws_done {
                replace(c, w, now);
            }
        }
        (p, _) => w.err(&format!("REST answer in unexpected phase {p:?}")),
    }
}

fn client_event(
    c: &mut Client,
    slot: usize,
    w: &mut World,
    ev: &mio::event::Event,
    scratch: &mut [u8],
) {
    let Some(mut ws) = c.ws.take() else { return };
    let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
    let mut closed = None;
    let r = ws.on_ready(readable, ev.is_writable(), scratch, &mut |e| match e {
        WsEvent::Text(t) => client_text(c, w, t),
        WsEvent::Closed(code) => closed = Some(code),
        WsEvent::Open => {}
    });
    c.ws = Some(ws);
    let now = now_ns();
    if c.welcomed && c.phase == Phase::Connecting {
        c.phase = Phase::Open;
        w.c.connects += 1;
        if c.with_since {
            w.c.reconnects_since += 1;
        }
        c.next_chat = now + exp_delay(&mut c.rng, w.o.chat_every, MIN_CHAT_GAP);
        c.next_typing = now + exp_delay(&mut c.rng, w.o.typing_every, MIN_TYPING_GAP);
        c.next_disconnect = now + exp_delay(&mut c.rng, w.o.reconnect_every, MIN_CONNECTED);
    }
    let finished = match &r {
        Ok(true) => return,
        Ok(false) => None,
        Err(e) => Some(e.clone()),
    };
    match c.phase {
        Phase::Closing => {
            match (finished, closed) {
                (None, Some(Some(1000))) => {}
                (Some(e), _) => w.err(&format!("unclean end after our close: {e}")),
                (None, code) => w.err(&format!("our close 1000 answered with {code:?}")),
            }
            drop_conn(c, w);
            after_close(c, slot, w, now);
        }
        Phase::Ending => {
            match (finished, closed) {
                (None, Some(Some(1000))) => {}
                (e, code) => w.err(&format!(
                    "session deleted: expected close 1000, got {code:?} {}",
                    e.unwrap_or_default()
                )),
            }
            drop_conn(c, w);
            c.ending_ws_done = true;
            if c.ending_http_done {
                replace(c, w, now);
            } else {
                c.deadline = now + CLOSE_TIMEOUT_NS;
            }
        }
        _ => {
            let why = match (finished, closed) {
                (_, Some(Some(code))) => format!("closed by server with {code}"),
                (Some(e), _) => e,
                (None, _) => "closed by server".into(),
            };
            lose_conn(c, w, &why, now);
        }
    }
}

/// A stored message (chat, user_joined, user_left) of `room`: its id, after checks.
fn stored_id(v: &Value, room: &str, c: &mut Counters) -> Option<u128> {
    let id = v.get("id").and_then(Value::as_str).and_then(parse_uuid);
    let Some(id) = id else {
        c.bad_ids += 1;
        return None;
    };
    if (id >> 76) & 0xF != 7 {
        c.bad_ids += 1;
    }
    if v.get("room_id").and_then(Value::as_str) != Some(room) {
        *c.errors
            .entry("stored message with another room_id".into())
            .or_default() += 1;
    }
    Some(id)
}

fn client_text(c: &mut Client, w: &mut World, t: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(t) else {
        w.err("frame is not JSON");
        return;
    };
    let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
    let room = w.rooms[c.room].id.clone();
    let room = room.as_str();
    if !c.welcomed {
        if kind != "welcome" {
            w.err("first frame is not welcome");
            return;
        }
        c.welcomed = true;
        if v.get("user_id").and_then(Value::as_str) != Some(c.user_id.as_str()) {
            w.err("welcome names another user_id");
        }
        let me_listed = v.get("users").and_then(Value::as_array).is_some_and(|u| {
            u.iter()
                .any(|x| x.get("user_id").and_then(Value::as_str) == Some(c.user_id.as_str()))
        });
        if !me_listed {
            w.c.welcome_without_self += 1;
        }
        let empty = Vec::new();
        let msgs = v
            .get("messages")
            .and_then(Value::as_array)
            .unwrap_or(&empty);
        if v.get("truncated").and_then(Value::as_bool) == Some(true) {
            w.c.truncated += 1;
            if !c.with_since || msgs.len() < w.o.history {
                w.c.truncated_unexpected += 1;
            }
            c.tracker.pending.push_back(Item::Reset);
        }
        for m in msgs {
            if let Some(id) = stored_id(m, room, &mut w.c) {
                c.tracker.pending.push_back(Item::Id(id));
                c.last_id = Some(id);
            }
        }
        let n = msgs.len() as u64;
        if c.with_since {
            w.c.since_backlog += n;
            w.c.max_since_backlog = w.c.max_since_backlog.max(n);
        } else {
            w.c.welcome_history += n;
        }
        return;
    }
    match kind {
        "chat" | "user_joined" | "user_left" => {
            let Some(id) = stored_id(&v, room, &mut w.c) else {
                return;
            };
            c.tracker.pending.push_back(Item::Id(id));
            c.last_id = Some(id);
            w.c.live_deliveries += 1;
            if kind != "chat" {
                return;
            }
            let text = v.get("message").and_then(Value::as_str).unwrap_or("");
            if let Some((cid, seq)) = parse_chat_text(text)
                && cid == c.cid
            {
                if c.outstanding.front() == Some(&seq) {
                    c.outstanding.pop_front();
                    w.senders[cid].fates[seq as usize] = ECHOED;
                    w.c.chats_echoed += 1;
                } else if w.senders[cid].fates.get(seq as usize) == Some(&IN_DOUBT) {
                    // Sent on a connection dropped before its answer; the server read it after
                    // this connection's join. Legal: the two sockets are not ordered.
                    w.c.late_echoes += 1;
                } else {
                    w.err("own chat echoed out of order or twice");
                }
            }
        }
        "typing" => w.c.typing_received += 1,
        "typing_stopped" => w.c.typing_stopped_received += 1,
        "error" => {
            let code = v.get("code").and_then(Value::as_str).unwrap_or("?");
            *w.c.error_frames.entry(code.to_string()).or_default() += 1;
            if code == "rate_limited" {
                if let Some(seq) = c.outstanding.pop_front() {
                    w.senders[c.cid].fates[seq as usize] = REFUSED;
                    w.c.chats_refused += 1;
                }
            } else {
                w.err(&format!("error frame {code}"));
            }
        }
        other => *w.c.other_frames.entry(other.to_string()).or_default() += 1,
    }
}

fn observer_event(
    ob: &mut Observer,
    r: usize,
    w: &mut World,
    ev: &mio::event::Event,
    scratch: &mut [u8],
) {
    if ob.dead {
        return;
    }
    let Some(ws) = ob.ws.as_mut() else { return };
    let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
    let mut closed = None;
    let welcomed = &mut ob.welcomed;
    let res = ws.on_ready(readable, ev.is_writable(), scratch, &mut |e| match e {
        WsEvent::Text(t) => observer_text(welcomed, r, w, t),
        WsEvent::Closed(code) => closed = Some(code),
        WsEvent::Open => {}
    });
    let why = match (res, closed) {
        (Ok(true), _) => return,
        (_, Some(Some(code))) => format!("observer closed by server with {code}"),
        (Ok(false), _) => "observer closed by server".into(),
        (Err(e), _) => format!("observer: {e}"),
    };
    w.err(&why);
    w.c.observer_failures += 1;
    ob.dead = true;
    if let Some(mut ws) = ob.ws.take() {
        ws.deregister(w.poll.registry());
    }
}

fn observer_text(welcomed: &mut bool, r: usize, w: &mut World, t: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(t) else {
        w.err("observer: frame is not JSON");
        return;
    };
    let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
    if !*welcomed {
        if kind != "welcome" {
            w.err("observer: first frame is not welcome");
        }
        *welcomed = true;
        return; // a fresh room: nothing before the observer's own user_joined
    }
    if !matches!(kind, "chat" | "user_joined" | "user_left") {
        if kind == "error" {
            w.err("observer got an error frame");
        }
        return;
    }
    let room = &mut w.rooms[r];
    let Some(id) = stored_id(&v, &room.id, &mut w.c) else {
        return;
    };
    if room.ids.last().is_some_and(|&last| id <= last) {
        w.c.room_order_violations += 1;
        return;
    }
    room.ids.push(id);
    match kind {
        "user_joined" => room.joins += 1,
        "user_left" => room.leaves += 1,
        _ => {
            room.chats += 1;
            let text = v.get("message").and_then(Value::as_str).unwrap_or("");
            let Some((cid, seq)) = parse_chat_text(text) else {
                w.c.foreign_chats += 1;
                return;
            };
            let Some(s) = w.senders.get_mut(cid) else {
                w.c.foreign_chats += 1;
                return;
            };
            if s.room != r || seq as usize >= s.fates.len() {
                w.c.foreign_chats += 1;
                return;
            }
            if v.get("user_id").and_then(Value::as_str) != Some(s.user_id.as_str()) {
                *w.c.errors
                    .entry("chat attributed to another user_id".into())
                    .or_default() += 1;
            }
            if s.seen.len() <= seq as usize {
                s.seen.resize(seq as usize + 1, 0);
            }
            s.seen[seq as usize] = s.seen[seq as usize].saturating_add(1);
            if s.seen[seq as usize] > 1 {
                w.c.room_duplicates += 1;
            }
            if s.last_in_room.is_some_and(|l| seq <= l) {
                w.c.sender_reordered += 1;
            }
            s.last_in_room = Some(s.last_in_room.map_or(seq, |l| l.max(seq)));
        }
    }
}

/// Checks a tracker's pending ids that its room's observer has already seen.
fn verify(t: &mut Tracker, room: &RoomLog, c: &mut Counters) {
    let last = room.ids.last().copied().unwrap_or(0);
    while let Some(item) = t.pending.front() {
        match *item {
            Item::Reset => {
                t.cursor = None;
                t.pending.pop_front();
            }
            Item::Id(id) => {
                if id > last {
                    break;
                }
                t.pending.pop_front();
                let Ok(idx) = room.ids.binary_search(&id) else {
                    c.phantom += 1;
                    continue;
                };
                c.checked += 1;
                match t.cursor {
                    None => t.cursor = Some(idx),
                    Some(cur) if idx == cur + 1 => t.cursor = Some(idx),
                    Some(cur) if idx > cur + 1 => {
                        t.holes.extend(cur + 1..idx);
                        t.cursor = Some(idx);
                    }
                    Some(_) => {
                        if t.holes.remove(&idx) {
                            c.reordered += 1;
                        } else {
                            c.duplicates += 1;
                        }
                    }
                }
            }
        }
    }
}

fn verify_all(clients: &mut [Client], w: &mut World) {
    for c in clients.iter_mut() {
        verify(&mut c.tracker, &w.rooms[c.room], &mut w.c);
    }
    let World {
        retired, rooms, c, ..
    } = w;
    retired.retain_mut(|t| {
        verify(t, &rooms[t.room], c);
        if t.pending.is_empty() {
            c.lost += t.holes.len() as u64;
            false
        } else {
            true
        }
    });
}

/// After the run: every client connected, all its chats answered, and up to date with its room.
fn all_caught_up(clients: &[Client], w: &World, observers: &[Observer]) -> bool {
    if observers.iter().any(|o| o.dead) {
        return false;
    }
    clients.iter().all(|c| {
        c.phase == Phase::Open
            && c.outstanding.is_empty()
            && c.tracker.pending.is_empty()
            && c.tracker
                .cursor
                .is_some_and(|cur| cur + 1 == w.rooms[c.room].ids.len())
    }) && w.retired.is_empty()
}

fn progress(clients: &[Client], w: &World, t: f64, rss_kib: Option<u64>) {
    let open = clients.iter().filter(|c| c.phase == Phase::Open).count();
    let msgs: usize = w.rooms.iter().map(|r| r.ids.len()).sum();
    let c = &w.c;
    let errors: u64 = c.errors.values().sum();
    let lost_so_far: u64 = c.lost
        + clients
            .iter()
            .map(|c| c.tracker.holes.len() as u64)
            .sum::<u64>();
    eprintln!(
        "soak t={t:.0}s: {open}/{} open, {} sessions, {} chats sent, {msgs} room msgs, {} checked; \
         lost(so far) {lost_so_far} dup {} reord {} phantom {} truncated {}; errors {errors}{}",
        clients.len(),
        c.sessions_started,
        c.chats_sent,
        c.checked,
        c.duplicates,
        c.reordered,
        c.phantom,
        c.truncated,
        rss_kib.map_or(String::new(), |k| format!("; server RSS {k} KiB"))
    );
}

/// Sends close 1000 on every socket (clients, then observers) and waits (bounded) for the
/// server's close frames.
fn close_all(
    clients: &mut [Client],
    observers: &mut [Observer],
    w: &mut World,
    scratch: &mut [u8],
) {
    let mut events = Events::with_capacity(1024);
    let mut wait = |socks: &mut Vec<(usize, WsClient)>, w: &mut World| {
        let deadline = now_ns() + 3_000_000_000;
        for (_, ws) in socks.iter_mut() {
            let _ = ws.send_close(1000);
        }
        while !socks.is_empty() && now_ns() < deadline {
            if poll_wait(&mut w.poll, &mut events, Duration::from_millis(20)).is_err() {
                break;
            }
            for ev in events.iter() {
                if let Some(p) = socks.iter().position(|(t, _)| *t == ev.token().0)
                    && !matches!(
                        socks[p]
                            .1
                            .on_ready(true, ev.is_writable(), scratch, &mut |_| {}),
                        Ok(true)
                    )
                {
                    let (_, mut ws) = socks.swap_remove(p);
                    ws.deregister(w.poll.registry());
                }
            }
        }
    };
    let mut socks: Vec<(usize, WsClient)> = clients
        .iter_mut()
        .enumerate()
        .filter_map(|(i, c)| c.ws.take().map(|ws| (i, ws)))
        .collect();
    wait(&mut socks, w);
    let mut socks: Vec<(usize, WsClient)> = observers
        .iter_mut()
        .enumerate()
        .filter_map(|(r, o)| o.ws.take().map(|ws| (OBSERVERS + r, ws)))
        .collect();
    wait(&mut socks, w);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(ids: &[u128]) -> RoomLog {
        RoomLog {
            id: "r".into(),
            ids: ids.to_vec(),
            chats: 0,
            joins: 0,
            leaves: 0,
        }
    }

    #[test]
    fn uuids_round_trip() {
        let s = "01920b1c-5f3a-7abc-8def-0123456789ab";
        let v = parse_uuid(s).unwrap();
        assert_eq!(fmt_uuid(v), s);
        assert_eq!((v >> 76) & 0xF, 7);
        assert!(parse_uuid("01920b1c5f3a7abc8def0123456789ab").is_none());
        assert!(parse_uuid("01920b1c-5f3a-7abc-8def-0123456789ag").is_none());
    }

    #[test]
    fn chat_texts() {
        assert_eq!(parse_chat_text("c12 s34 abc"), Some((12, 34)));
        assert_eq!(parse_chat_text("c12 s34 "), Some((12, 34)));
        assert_eq!(parse_chat_text("hello"), None);
    }

    #[test]
    fn verify_classifies_gaps_dups_and_reorders() {
        let r = room(&[10, 20, 30, 40, 50, 60]);
        let mut c = Counters::default();
        let mut t = Tracker::new(0);
        for id in [20, 30, 50, 40, 40, 60, 70] {
            t.pending.push_back(Item::Id(id));
        }
        verify(&mut t, &r, &mut c);
        // 70 is newer than anything the observer saw: it waits.
        assert_eq!(t.pending.len(), 1);
        assert_eq!((c.reordered, c.duplicates, c.phantom), (1, 1, 0));
        assert!(t.holes.is_empty());
        assert_eq!(t.cursor, Some(5));

        let mut t = Tracker::new(0);
        for id in [10, 30, 35, 60] {
            t.pending.push_back(Item::Id(id));
        }
        let mut c = Counters::default();
        verify(&mut t, &r, &mut c);
        assert_eq!(c.phantom, 1);
        assert_eq!(t.holes.iter().copied().collect::<Vec<_>>(), [1, 3, 4]);

        // A truncated welcome restarts the run without counting the skip as loss.
        let mut t = Tracker::new(0);
        for it in [Item::Id(10), Item::Reset, Item::Id(40), Item::Id(50)] {
            t.pending.push_back(it);
        }
        let mut c = Counters::default();
        verify(&mut t, &r, &mut c);
        assert!(t.holes.is_empty());
        assert_eq!(c.checked, 3);
    }

    #[test]
    fn delays_respect_their_floor() {
        let mut rng = Rng::new(3);
        for _ in 0..1000 {
            assert!(exp_delay(&mut rng, 0.01, MIN_CHAT_GAP) >= 100_000_000);
        }
        let mean: f64 = (0..20_000)
            .map(|_| exp_delay(&mut rng, 4.0, 0.0) as f64 / 1e9)
            .sum::<f64>()
            / 20_000.0;
        assert!((3.8..4.2).contains(&mean), "{mean}");
    }
}
