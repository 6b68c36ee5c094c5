//! Room members driven by one mio loop per thread: connect and wait for `welcome`, then receive
//! chat frames and measure their latency; a thread may also own sender members and send chat at
//! a fixed schedule. Shared by `fanout` (real server) and `floor` (already-open raw sockets).

use crate::clock::now_ns;
use crate::hist::Histogram;
use crate::sys::poll_wait;
use crate::wsclient::{WsClient, WsEvent};
use mio::{Events, Poll, Token};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::Sender;
use std::time::Duration;

/// Shared between the orchestrating thread and the workers.
pub struct Control {
    /// Origin-relative time at which sending starts; 0 until decided.
    pub go_ns: AtomicU64,
    pub warmup_ns: u64,
    pub duration_ns: u64,
    pub stop: AtomicBool,
    /// Unique chat deliveries so far (all threads).
    pub delivered: AtomicU64,
    /// Chat messages sent per room, and those sent inside the measured window.
    pub sent: Vec<AtomicU64>,
    pub sent_measured: Vec<AtomicU64>,
}

impl Control {
    pub fn new(rooms: usize, warmup: Duration, duration: Duration) -> Control {
        Control {
            go_ns: AtomicU64::new(0),
            warmup_ns: warmup.as_nanos() as u64,
            duration_ns: duration.as_nanos() as u64,
            stop: AtomicBool::new(false),
            delivered: AtomicU64::new(0),
            sent: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            sent_measured: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    pub fn measure_start(&self) -> u64 {
        self.go_ns.load(Relaxed) + self.warmup_ns
    }
    pub fn send_end(&self) -> u64 {
        self.measure_start() + self.duration_ns
    }
}

/// Where and how a member connects (unused for pre-opened floor members).
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddrV4,
    pub path: String,
    pub src: Option<Ipv4Addr>,
}

pub struct Member {
    pub room: usize,
    pub sender: bool,
    target: Option<Target>,
    ws: Option<WsClient>,
    welcomed: bool,
    dead: bool,
    seen: Vec<u64>,
}

impl Member {
    pub fn to_connect(room: usize, sender: bool, target: Target) -> Member {
        Member {
            room,
            sender,
            target: Some(target),
            ws: None,
            welcomed: false,
            dead: false,
            seen: Vec::new(),
        }
    }
    pub fn already_open(room: usize, sender: bool, ws: WsClient) -> Member {
        Member {
            room,
            sender,
            target: None,
            ws: Some(ws),
            welcomed: true,
            dead: false,
            seen: Vec::new(),
        }
    }
}

/// Sent by each worker once its connect phase is over.
pub struct Ready {
    pub per_room: Vec<u64>,
    pub failures: u64,
    pub failure_samples: Vec<String>,
}

#[derive(Default)]
pub struct Stats {
    pub latency: Histogram,
    pub send_lag: Histogram,
    pub delivered: u64,
    pub delivered_measured: u64,
    pub duplicates: u64,
    pub foreign_chat: u64,
    pub bad_frames: u64,
    pub chat_frame_bytes: u64,
    pub other_frames: BTreeMap<String, u64>,
    pub error_frames: BTreeMap<String, u64>,
    pub lost_members: BTreeMap<String, u64>,
    pub send_errors: u64,
    /// CPU time the loadgen's member threads used during the window (sum, and the busiest).
    pub window_cpu_us: u64,
    pub busiest_thread_cpu_us: u64,
}

impl Stats {
    pub fn merge(&mut self, o: Stats) {
        self.latency.merge(&o.latency);
        self.send_lag.merge(&o.send_lag);
        self.delivered += o.delivered;
        self.delivered_measured += o.delivered_measured;
        self.duplicates += o.duplicates;
        self.foreign_chat += o.foreign_chat;
        self.bad_frames += o.bad_frames;
        self.chat_frame_bytes = self.chat_frame_bytes.max(o.chat_frame_bytes);
        self.send_errors += o.send_errors;
        self.window_cpu_us += o.window_cpu_us;
        self.busiest_thread_cpu_us = self.busiest_thread_cpu_us.max(o.busiest_thread_cpu_us);
        for (dst, src) in [
            (&mut self.other_frames, o.other_frames),
            (&mut self.error_frames, o.error_frames),
            (&mut self.lost_members, o.lost_members),
        ] {
            for (k, v) in src {
                *dst.entry(k).or_default() += v;
            }
        }
    }
}

pub struct WorkerConfig {
    pub rooms: usize,
    pub rate_per_room: f64,
    pub connect_timeout: Duration,
    pub connect_parallel: usize,
    /// Pin this worker thread to a CPU.
    pub cpu: Option<usize>,
}

/// Extracts `(send_ts_ns, seq)` from a chat message text "<ts> <seq>".
pub fn parse_probe(msg: &str) -> Option<(u64, u64)> {
    let (a, b) = msg.split_once(' ')?;
    Some((a.parse().ok()?, b.trim().parse().ok()?))
}

/// Bucket name for an error string, so the report groups similar failures.
pub fn reason(e: &str) -> String {
    e.chars().take(70).collect()
}

fn bit_test_set(seen: &mut Vec<u64>, seq: u64) -> bool {
    let (w, b) = ((seq / 64) as usize, seq % 64);
    if w >= seen.len() {
        if w > 1 << 24 {
            return false; // absurd seq: do not allocate; treated as new
        }
        seen.resize(w + 1, 0);
    }
    let was = seen[w] & (1 << b) != 0;
    seen[w] |= 1 << b;
    was
}

/// When room `room`'s `k`-th message is due (ns): the rooms' schedules are spread evenly over
/// one interval, so messages of different rooms do not arrive together. `floor` uses the same.
pub fn send_time(go: u64, rate_per_room: f64, room: usize, rooms: usize, k: u64) -> u64 {
    let interval = 1e9 / rate_per_room;
    go + (interval * room as f64 / rooms as f64 + interval * k as f64) as u64
}

/// The send timer's token (members use their index).
const TIMER: Token = Token(usize::MAX - 1);

struct Worker {
    cfg: WorkerConfig,
    ctl: Arc<Control>,
    poll: Poll,
    members: Vec<Member>,
    stats: Stats,
    scratch: Vec<u8>,
    pending_delivered: u64,
    // sender state: per room, local member indices that send, and the next seq
    send_rooms: Vec<(usize, Vec<usize>, u64)>,
}

pub fn run_worker(
    cfg: WorkerConfig,
    ctl: Arc<Control>,
    members: Vec<Member>,
    ready: Sender<Ready>,
) -> Result<Stats, String> {
    if let Some(cpu) = cfg.cpu {
        crate::sys::pin_current_thread(cpu).map_err(|e| format!("pinning to CPU {cpu}: {e}"))?;
    }
    let mut by_room: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, m) in members.iter().enumerate() {
        if m.sender {
            by_room.entry(m.room).or_default().push(i);
        }
    }
    let mut w = Worker {
        poll: Poll::new().map_err(|e| format!("epoll: {e}"))?,
        cfg,
        ctl,
        members,
        stats: Stats::default(),
        scratch: vec![0; 256 << 10],
        pending_delivered: 0,
        send_rooms: by_room.into_iter().map(|(r, v)| (r, v, 0)).collect(),
    };
    let r = w.connect_phase();
    let _ = ready.send(r);
    w.run_phase()?;
    w.close_phase();
    Ok(w.stats)
}

impl Worker {
    fn connect_phase(&mut self) -> Ready {
        let mut failures = 0;
        let mut samples = Vec::new();
        let deadline = now_ns() + self.cfg.connect_timeout.as_nanos() as u64;
        let mut next = 0;
        let mut events = Events::with_capacity(1024);
        // Already-open members (floor) only need registering.
        for i in 0..self.members.len() {
            if let Some(ws) = self.members[i].ws.as_mut()
                && let Err(e) = ws.register(self.poll.registry(), Token(i))
            {
                self.members[i].dead = true;
                failures += 1;
                samples.push(e);
            }
        }
        loop {
            let inflight = self
                .members
                .iter()
                .filter(|m| m.ws.is_some() && !m.welcomed && !m.dead)
                .count();
            let mut budget = self.cfg.connect_parallel.saturating_sub(inflight);
            while budget > 0 && next < self.members.len() {
                let i = next;
                next += 1;
                let m = &mut self.members[i];
                let Some(t) = m.target.clone() else { continue };
                budget -= 1;
                let r = WsClient::connect(t.addr, t.src, &t.path, i as u64 + 1)
                    .and_then(|mut ws| ws.register(self.poll.registry(), Token(i)).map(|_| ws));
                match r {
                    Ok(ws) => m.ws = Some(ws),
                    Err(e) => {
                        m.dead = true;
                        failures += 1;
                        if samples.len() < 5 {
                            samples.push(e);
                        }
                    }
                }
            }
            let waiting = self
                .members
                .iter()
                .filter(|m| !m.welcomed && !m.dead)
                .count();
            if waiting == 0 || now_ns() >= deadline {
                break;
            }
            if let Err(e) = poll_wait(&mut self.poll, &mut events, Duration::from_millis(20)) {
                samples.push(e);
                break;
            }
            for ev in events.iter() {
                self.handle(
                    ev.token().0,
                    ev.is_readable() || ev.is_read_closed() || ev.is_error(),
                    ev.is_writable(),
                    &mut failures,
                    &mut samples,
                );
            }
            self.flush_delivered();
        }
        let mut per_room = vec![0; self.cfg.rooms];
        for m in self.members.iter_mut() {
            if m.welcomed && !m.dead {
                per_room[m.room] += 1;
            } else if !m.dead {
                m.dead = true;
                failures += 1;
                if samples.len() < 5 {
                    samples.push(format!("no welcome within {:?}", self.cfg.connect_timeout));
                }
                if let Some(mut ws) = m.ws.take() {
                    ws.deregister(self.poll.registry());
                }
            }
        }
        Ready {
            per_room,
            failures,
            failure_samples: samples,
        }
    }

    fn run_phase(&mut self) -> Result<(), String> {
        let mut events = Events::with_capacity(1024);
        let timer = crate::sys::TimerFd::new().map_err(|e| format!("timerfd: {e}"))?;
        self.poll
            .registry()
            .register(
                &mut mio::unix::SourceFd(&timer.raw()),
                TIMER,
                mio::Interest::READABLE,
            )
            .map_err(|e| format!("registering the timerfd: {e}"))?;
        let mut armed = u64::MAX;
        let (mut f, mut s) = (0, Vec::new());
        let (mut cpu_start, mut cpu_done) = (None, false);
        while !self.ctl.stop.load(Relaxed) {
            let go = self.ctl.go_ns.load(Relaxed);
            if go != 0 && !cpu_done {
                let now = now_ns();
                if cpu_start.is_none() && now >= self.ctl.measure_start() {
                    cpu_start = Some(crate::sys::thread_cpu_total_us());
                } else if let (Some(c0), true) = (cpu_start, now >= self.ctl.send_end()) {
                    let used = crate::sys::thread_cpu_total_us().saturating_sub(c0);
                    self.stats.window_cpu_us += used;
                    self.stats.busiest_thread_cpu_us = used;
                    cpu_done = true;
                }
            }
            let next = self.send_due();
            // epoll sleeps in whole milliseconds (rounded up), so the next send is timed by a
            // timerfd in the same epoll: this thread's own members (the senders receive every
            // message too) are read while it waits. (Sleeping in nanosleep instead left their
            // deliveries unread for up to the interval between sends.) Set only when the
            // deadline changes: reprogramming a timer can cost a VM exit, and this loop wakes
            // many times per message. Never spin: a spinning sender would steal the receivers'
            // CPU.
            if next != u64::MAX && next != armed {
                timer
                    .set(crate::clock::until(next))
                    .map_err(|e| format!("timerfd: {e}"))?;
                armed = next;
            }
            poll_wait(&mut self.poll, &mut events, Duration::from_millis(20))?;
            for ev in events.iter() {
                if ev.token() == TIMER {
                    timer.clear();
                    armed = u64::MAX; // fired: whatever is due next needs arming again
                    continue;
                }
                self.handle(
                    ev.token().0,
                    ev.is_readable() || ev.is_read_closed() || ev.is_error(),
                    ev.is_writable(),
                    &mut f,
                    &mut s,
                );
            }
            self.flush_delivered();
        }
        Ok(())
    }

    /// Politely closes every open member and reads for a moment (bounded) so the server sees
    /// clean closes; whatever is still open afterwards is dropped.
    fn close_phase(&mut self) {
        for m in self.members.iter_mut() {
            if let (Some(ws), false) = (m.ws.as_mut(), m.dead)
                && ws.send_close(1000).is_err()
            {
                m.dead = true;
            }
        }
        let deadline = now_ns() + 1_000_000_000;
        let mut events = Events::with_capacity(1024);
        while now_ns() < deadline && self.members.iter().any(|m| !m.dead && m.ws.is_some()) {
            if poll_wait(&mut self.poll, &mut events, Duration::from_millis(20)).is_err() {
                break;
            }
            for ev in events.iter() {
                if let Some(m) = self.members.get_mut(ev.token().0)
                    && let Some(ws) = m.ws.as_mut()
                    && !matches!(
                        ws.on_ready(true, ev.is_writable(), &mut self.scratch, &mut |_| {}),
                        Ok(true)
                    )
                {
                    m.dead = true;
                }
            }
        }
    }

    fn flush_delivered(&mut self) {
        if self.pending_delivered > 0 {
            self.ctl
                .delivered
                .fetch_add(self.pending_delivered, Relaxed);
            self.pending_delivered = 0;
        }
    }

    /// Sends every chat message whose scheduled time has come; returns when the next one is
    /// due (`u64::MAX`: none).
    fn send_due(&mut self) -> u64 {
        let go = self.ctl.go_ns.load(Relaxed);
        if go == 0 || self.send_rooms.is_empty() || self.cfg.rate_per_room <= 0.0 {
            return u64::MAX;
        }
        let (start, end) = (self.ctl.measure_start(), self.ctl.send_end());
        let mut next_due = u64::MAX;
        for ri in 0..self.send_rooms.len() {
            let room = self.send_rooms[ri].0;
            loop {
                let k = self.send_rooms[ri].2;
                let t = send_time(go, self.cfg.rate_per_room, room, self.cfg.rooms, k);
                if t >= end {
                    break;
                }
                let now = now_ns();
                if t > now {
                    next_due = next_due.min(t);
                    break;
                }
                self.send_one(ri, k, t, start);
                self.send_rooms[ri].2 += 1;
            }
        }
        next_due
    }

    fn send_one(&mut self, ri: usize, k: u64, scheduled: u64, measure_start: u64) {
        let (room, ref senders, _) = self.send_rooms[ri];
        // Round-robin over this room's senders, skipping dead ones.
        let n = senders.len();
        let pick = (0..n).map(|j| senders[(k as usize + j) % n]).find(|&i| {
            !self.members[i].dead && self.members[i].ws.as_ref().is_some_and(|w| w.is_open())
        });
        let Some(i) = pick else {
            self.stats.send_errors += 1;
            return;
        };
        let ts = now_ns();
        let frame = format!("{{\"type\":\"chat\",\"message\":\"{ts} {k}\"}}");
        let r = match self.members[i].ws.as_mut() {
            Some(ws) => ws.send_text(frame.as_bytes()),
            None => Err("no socket".into()),
        };
        match r {
            Ok(()) => {
                self.ctl.sent[room].fetch_add(1, Relaxed);
                // "In the window" is decided by the embedded timestamp, exactly as receivers do.
                if ts >= measure_start && ts < self.ctl.send_end() {
                    self.ctl.sent_measured[room].fetch_add(1, Relaxed);
                }
                if scheduled >= measure_start {
                    self.stats.send_lag.record(ts.saturating_sub(scheduled));
                }
            }
            Err(e) => {
                self.stats.send_errors += 1;
                self.kill(i, format!("send failed: {e}"));
            }
        }
    }

    fn kill(&mut self, i: usize, why: String) {
        let m = &mut self.members[i];
        if !m.dead {
            m.dead = true;
            *self.stats.lost_members.entry(reason(&why)).or_default() += 1;
        }
        if let Some(mut ws) = m.ws.take() {
            ws.deregister(self.poll.registry());
        }
    }

    fn handle(
        &mut self,
        i: usize,
        readable: bool,
        writable: bool,
        failures: &mut u64,
        samples: &mut Vec<String>,
    ) {
        let Worker {
            members,
            stats,
            ctl,
            scratch,
            pending_delivered,
            ..
        } = self;
        let Some(m) = members.get_mut(i) else { return };
        if m.dead {
            return;
        }
        let Member {
            ws, welcomed, seen, ..
        } = m;
        let Some(ws) = ws.as_mut() else { return };
        let was_welcomed = *welcomed;
        let mut closed = None;
        let r = ws.on_ready(readable, writable, scratch, &mut |ev| match ev {
            WsEvent::Text(t) => on_text(stats, ctl, welcomed, seen, pending_delivered, now_ns(), t),
            WsEvent::Closed(c) => closed = Some(c),
            WsEvent::Open => {}
        });
        let outcome = match (r, closed) {
            (Ok(true), _) => return,
            (_, Some(Some(c))) => format!("closed by server with {c}"),
            (Ok(false), _) => "closed by server".to_string(),
            (Err(e), _) => e,
        };
        if was_welcomed || self.members[i].welcomed {
            self.kill(i, outcome);
        } else {
            *failures += 1;
            if samples.len() < 5 {
                samples.push(outcome);
            }
            self.members[i].dead = true;
            if let Some(mut ws) = self.members[i].ws.take() {
                ws.deregister(self.poll.registry());
            }
        }
    }
}

/// Fast path for the compact chat frames chatloop sends: finds `"type":"chat"` and the probe in
/// `"message":"<ts> <seq>"` without building a JSON tree. `None`: use the full parser.
fn quick_probe(t: &[u8]) -> Option<(u64, u64)> {
    fn find(h: &[u8], n: &[u8]) -> Option<usize> {
        h.windows(n.len()).position(|w| w == n)
    }
    find(t, br#""type":"chat""#)?;
    let at = find(t, br#""message":""#)? + 11;
    let end = at + t[at..].iter().position(|&b| b == b'"')?;
    parse_probe(std::str::from_utf8(&t[at..end]).ok()?)
}

/// Handles one text message of a member.
fn on_text(
    stats: &mut Stats,
    ctl: &Control,
    welcomed: &mut bool,
    seen: &mut Vec<u64>,
    pending: &mut u64,
    now: u64,
    t: &[u8],
) {
    if *welcomed && let Some((ts, seq)) = quick_probe(t) {
        count_chat(stats, ctl, seen, pending, now, t.len(), (ts, seq));
        return;
    }
    let v: Value = match serde_json::from_slice(t) {
        Ok(v) => v,
        Err(_) => {
            stats.bad_frames += 1;
            return;
        }
    };
    let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
    if !*welcomed {
        if kind == "welcome" {
            *welcomed = true;
        } else {
            *stats
                .other_frames
                .entry(format!("{kind} before welcome"))
                .or_default() += 1;
        }
        return;
    }
    match kind {
        "chat" => {
            let Some(probe) = v
                .get("message")
                .and_then(Value::as_str)
                .and_then(parse_probe)
            else {
                stats.foreign_chat += 1;
                return;
            };
            count_chat(stats, ctl, seen, pending, now, t.len(), probe);
        }
        "error" => {
            let code = v
                .get("code")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string();
            *stats.error_frames.entry(code).or_default() += 1;
        }
        _ => *stats.other_frames.entry(kind.to_string()).or_default() += 1,
    }
}

/// Counts one probe `(send_ts, seq)` received at `now`: duplicate check, latency if in window.
fn count_chat(
    stats: &mut Stats,
    ctl: &Control,
    seen: &mut Vec<u64>,
    pending: &mut u64,
    now: u64,
    len: usize,
    probe: (u64, u64),
) {
    let (ts, seq) = probe;
    stats.chat_frame_bytes = stats.chat_frame_bytes.max(len as u64);
    if bit_test_set(seen, seq) {
        stats.duplicates += 1;
        return;
    }
    stats.delivered += 1;
    *pending += 1;
    let start = ctl.measure_start();
    if ts >= start && ts < start + ctl.duration_ns {
        stats.delivered_measured += 1;
        stats.latency.record(now.saturating_sub(ts));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms_are_spread_over_one_interval() {
        // 100 msg/s per room: 10 ms apart; 10 rooms: 1 ms apart from each other.
        assert_eq!(send_time(7, 100.0, 0, 10, 0), 7);
        assert_eq!(send_time(7, 100.0, 5, 10, 0), 7 + 5_000_000);
        assert_eq!(send_time(7, 100.0, 5, 10, 3), 7 + 35_000_000);
    }

    #[test]
    fn probes() {
        assert_eq!(parse_probe("123 45"), Some((123, 45)));
        assert_eq!(parse_probe("hello"), None);
        assert_eq!(parse_probe("1 x"), None);
    }

    #[test]
    fn quick_probe_matches_the_full_parse() {
        let f = br#"{"id":"x","type":"chat","user":"a","user_id":"b","message":"123 45","timestamp":"t","room_id":"r"}"#;
        assert_eq!(quick_probe(f), Some((123, 45)));
        assert_eq!(quick_probe(br#"{"type":"chat","message":"hello"}"#), None);
        assert_eq!(
            quick_probe(br#"{"type":"user_joined","message":"1 2"}"#),
            None
        );
        assert_eq!(quick_probe(br#"{"type": "chat", "message": "1 2"}"#), None); // spaced: full parse
    }

    #[test]
    fn bitset() {
        let mut s = Vec::new();
        assert!(!bit_test_set(&mut s, 5));
        assert!(bit_test_set(&mut s, 5));
        assert!(!bit_test_set(&mut s, 1000));
        assert!(bit_test_set(&mut s, 1000));
        assert!(!bit_test_set(&mut s, 6));
    }
}
