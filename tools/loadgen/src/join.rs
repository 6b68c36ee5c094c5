//! `join`: a room pre-filled with idle members, then a storm of J WebSocket joins by a few
//! concurrent connectors: connect, upgrade, wait for `welcome`, close. Reports joins/s and the
//! latency from connect() to the welcome frame.

use crate::args::{Args, loopback_src};
use crate::clock::{self, now_ns};
use crate::hist::Histogram;
use crate::http;
use crate::members::{Target, reason};
use crate::pool::{OTHER_TOKENS, OtherCtx, Pool, is_welcome};
use crate::report::{self, Obj, ServerWatch};
use crate::wsclient::{WsClient, WsEvent};
use mio::Events;
use mio::Token;
use serde_json::json;
use slab::Slab;
use std::collections::BTreeMap;
use std::time::Duration;

struct Joiner {
    ws: WsClient,
    started: u64,
    upgraded: Option<u64>,
    /// Some once the welcome arrived and our close frame went out.
    closing_since: Option<u64>,
}

#[derive(Default)]
struct Tally {
    joins: u64,
    latency: Histogram,
    upgrade: Histogram,
    failures: BTreeMap<String, u64>,
    clean_closes: u64,
    unclean_closes: BTreeMap<String, u64>,
    not_welcome_first: u64,
}

pub fn run(a: &Args) -> Result<Obj, String> {
    let addr = a.addr()?;
    let members = a.u64_or("room-members", 100)? as usize;
    let joins = a.u64_or("joins", 1000)?.max(1);
    let duration = a.dur_or("duration", Duration::from_secs(10))?;
    let concurrency = a.u64_or("concurrency", 4)?.clamp(1, 1000) as usize;
    let join_timeout = a.dur_or("join-timeout", Duration::from_secs(5))?;
    let src_ips = a.u64_or("src-ips", 8)?.clamp(1, 250) as usize;
    let mut watch =
        ServerWatch::new(a.opt_u64("server-pid")?)?.with_extra(a.opt_str("extra-pids")?)?;
    a.finish()?;
    crate::sys::raise_nofile().map_err(|e| format!("raising RLIMIT_NOFILE: {e}"))?;

    eprintln!("join: creating a room with {members} members and {concurrency} joiner sessions");
    let sessions = http::create_sessions(addr, members + concurrency, "join", 4)?;
    let room = http::Client::new(addr).create_room(&sessions[0])?;
    let targets = (0..members)
        .map(|i| Target {
            addr,
            path: format!("/ws/{room}?session_id={}", sessions[i]),
            src: Some(loopback_src(i, src_ips, 0)),
        })
        .collect();
    let mut pool = Pool::new(targets)?;
    pool.connect_all(64, now_ns() + 30_000_000_000);
    if pool.established < members as u64 {
        return Err(format!(
            "pre-fill: only {}/{members} members connected: {:?}",
            pool.established, pool.failures
        ));
    }
    // Let the pre-fill's own user_joined traffic settle before measuring.
    let mut events = Events::with_capacity(1024);
    let settle = now_ns() + 300_000_000;
    while now_ns() < settle {
        pool.poll_once(&mut events, Duration::from_millis(20), &mut |_, _| {});
    }
    let frames_before = pool.frames.clone();

    let mut slab: Slab<Joiner> = Slab::new();
    let mut t = Tally::default();
    let mut started = 0u64;
    let t0 = now_ns();
    watch.begin();
    let busy = report::SelfBusy::start();
    let end = t0 + duration.as_nanos() as u64;
    let hard_end = end + join_timeout.as_nanos() as u64 + 3_000_000_000;
    let jt = join_timeout.as_nanos() as u64;
    let mut last_join_at = t0;
    loop {
        let now = now_ns();
        let joining = slab
            .iter()
            .filter(|(_, j)| j.closing_since.is_none())
            .count();
        let may_start = started < joins && now < end;
        if !may_start && slab.is_empty() || now >= hard_end {
            break;
        }
        for _ in joining..concurrency {
            if started >= joins || now_ns() >= end {
                break;
            }
            let i = started as usize;
            started += 1;
            let path = format!(
                "/ws/{room}?session_id={}",
                sessions[members + i % concurrency]
            );
            let entry = slab.vacant_entry();
            let token = Token(OTHER_TOKENS + entry.key());
            let r = WsClient::connect(
                addr,
                Some(loopback_src(i, src_ips, 0)),
                &path,
                i as u64 + 99,
            )
            .and_then(|mut ws| ws.register(pool.poll.registry(), token).map(|_| ws));
            match r {
                Ok(ws) => {
                    entry.insert(Joiner {
                        ws,
                        started: now_ns(),
                        upgraded: None,
                        closing_since: None,
                    });
                }
                Err(e) => *t.failures.entry(reason(&e)).or_default() += 1,
            }
        }
        // Joiner events are handled before the members' (see Pool::poll_once), so a welcome is
        // not timed late because the loop was busy reading the room's broadcasts. (A separate
        // members thread was tried: on one pinned CPU it made the latency tails worse.)
        pool.poll_once(&mut events, Duration::from_millis(10), &mut |ev, ctx| {
            let key = ev.token().0 - OTHER_TOKENS;
            let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
            if on_joiner_event(&mut slab, key, readable, ev.is_writable(), ctx, &mut t) {
                last_join_at = now_ns();
            }
        });
        // Time-outs: joins that take too long, closes the server does not complete.
        let now = now_ns();
        let expired: Vec<usize> = slab
            .iter()
            .filter(|(_, j)| match j.closing_since {
                None => now - j.started > jt,
                Some(c) => now - c > 2_000_000_000,
            })
            .map(|(k, _)| k)
            .collect();
        for k in expired {
            let mut j = slab.remove(k);
            j.ws.deregister(pool.poll.registry());
            if j.closing_since.is_none() {
                *t.failures
                    .entry(format!("no welcome within {join_timeout:?}"))
                    .or_default() += 1;
            } else {
                *t.unclean_closes
                    .entry("server did not close within 2s after our close frame".into())
                    .or_default() += 1;
            }
        }
    }
    let elapsed = clock::secs(last_join_at.max(t0 + 1) - t0);
    let mut o = Obj::new();
    let cpu_line = watch.end(&mut o, t.joins, "join");
    let busy_warning = busy.end(&mut o);
    // Member-side view: each join should bring every member one user_joined and one user_left.
    let mut member_frames = BTreeMap::new();
    for (k, v) in &pool.frames {
        let d = v - frames_before.get(k).copied().unwrap_or(0);
        if d > 0 {
            member_frames.insert(k.clone(), d);
        }
    }
    let dropped = pool.dropped.clone();
    pool.close_all(Duration::from_secs(2));
    let jps = t.joins as f64 / elapsed;
    let failures: u64 = t.failures.values().sum();
    o.insert("scenario".into(), json!("join"));
    o.insert("ok".into(), json!(true));
    o.insert("room_members".into(), json!(members));
    o.insert("concurrency".into(), json!(concurrency));
    o.insert("joins_attempted".into(), json!(started));
    o.insert("joins".into(), json!(t.joins));
    o.insert("joins_per_s".into(), json!(report::round(jps, 1)));
    o.insert("elapsed_s".into(), json!(report::round(elapsed, 3)));
    o.insert("failures".into(), json!(failures));
    o.insert("failure_reasons".into(), json!(t.failures));
    o.insert("clean_closes".into(), json!(t.clean_closes));
    o.insert("unclean_closes".into(), json!(t.unclean_closes));
    o.insert("first_frame_not_welcome".into(), json!(t.not_welcome_first));
    o.insert("member_frames".into(), json!(member_frames));
    o.insert("members_dropped".into(), json!(dropped));
    report::add_latency(&mut o, "lat", &t.latency);
    report::add_latency(&mut o, "upgrade", &t.upgrade);
    eprintln!(
        "join: {} joins into a {members}-member room in {elapsed:.2}s = {jps:.0} joins/s ({concurrency} concurrent); \
         {failures} failures {:?}\nconnect->welcome: {}\nconnect->101:     {}\nmember-side frames during the storm: {member_frames:?}",
        t.joins,
        t.failures,
        report::latency_line(&t.latency),
        report::latency_line(&t.upgrade),
    );
    if !t.unclean_closes.is_empty() || t.not_welcome_first > 0 {
        eprintln!(
            "unclean closes {:?}; first frame not welcome: {}",
            t.unclean_closes, t.not_welcome_first
        );
    }
    if !cpu_line.is_empty() {
        eprintln!("{cpu_line}");
    }
    if let Some(w) = busy_warning {
        eprintln!("{w}");
    }
    Ok(o)
}

/// Handles an event of joiner `key`; returns true when it completed a join (got its welcome).
fn on_joiner_event(
    slab: &mut Slab<Joiner>,
    key: usize,
    readable: bool,
    writable: bool,
    ctx: &mut OtherCtx,
    t: &mut Tally,
) -> bool {
    let Some(j) = slab.get_mut(key) else {
        return false;
    };
    let (mut welcome, mut first_bad, mut opened) = (false, false, false);
    let closing = j.closing_since.is_some();
    let r =
        j.ws.on_ready(readable, writable, ctx.scratch, &mut |ev| match ev {
            WsEvent::Open => opened = true,
            WsEvent::Text(x) if !closing && !welcome => {
                if is_welcome(x) {
                    welcome = true;
                } else {
                    first_bad = true;
                }
            }
            _ => {}
        });
    let now = now_ns();
    if opened && j.upgraded.is_none() {
        j.upgraded = Some(now);
        t.upgrade.record(now - j.started);
    }
    if first_bad {
        t.not_welcome_first += 1;
    }
    let mut completed = false;
    if welcome && j.closing_since.is_none() {
        t.joins += 1;
        t.latency.record(now - j.started);
        j.closing_since = Some(now);
        completed = true;
        if let Err(e) = j.ws.send_close(1000) {
            *t.unclean_closes.entry(reason(&e)).or_default() += 1;
            let mut j = slab.remove(key);
            j.ws.deregister(ctx.registry);
            return completed;
        }
    }
    match r {
        Ok(true) => {}
        Ok(false) => {
            let mut j = slab.remove(key);
            j.ws.deregister(ctx.registry);
            if j.closing_since.is_some() {
                t.clean_closes += 1;
            } else {
                *t.failures
                    .entry("closed by server before welcome".into())
                    .or_default() += 1;
            }
        }
        Err(e) => {
            let mut j = slab.remove(key);
            j.ws.deregister(ctx.registry);
            if j.closing_since.is_some() {
                *t.unclean_closes.entry(reason(&e)).or_default() += 1;
            } else {
                *t.failures.entry(reason(&e)).or_default() += 1;
            }
        }
    }
    completed
}
