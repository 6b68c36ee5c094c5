//! An idle server sleeps: with 1000 open, quiet WebSockets and no timer due, the event loop
//! does not wake up at all (no busy polling, no periodic tick) and uses no CPU.
mod common;

use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{Server, Ws, metric_in};

const SOCKETS: usize = 1000;
const ROOMS: usize = 50;
const SESSIONS: usize = 10;

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // Fields after the command name (which is in parentheses): state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn a_thousand_idle_websockets_cause_no_wakeups() {
    // All from 127.0.0.1, many sockets per session opened at once: this test is about the
    // loop, not about per-address limits or the per-session upgrade budget.
    let s = Server::start(&[
        "--create-rate",
        "0",
        "--max-connections-per-ip",
        "0",
        "--upgrade-rate",
        "0",
    ]);
    let sessions: Vec<String> = (0..SESSIONS)
        .map(|i| s.session(&format!("user{i}")).0)
        .collect();
    let rooms: Vec<String> = (0..ROOMS)
        .map(|i| s.room(&sessions[i % SESSIONS]))
        .collect();
    let t = Instant::now();
    let sockets: Vec<Ws> = (0..SOCKETS)
        .map(|i| s.join(&rooms[i % ROOMS], &sessions[i % SESSIONS]).0)
        .collect();
    eprintln!("opened {SOCKETS} WebSockets in {:?}", t.elapsed());

    let mut h = s.http();
    let metrics = |h: &mut common::Http| {
        let r = h.get("/metrics", None);
        assert_eq!(r.status, 200);
        r.text()
    };
    let before = metrics(&mut h);
    assert_eq!(metric_in(&before, "chatloop_websockets"), SOCKETS as f64);
    // Let the last joins settle.
    sleep(Duration::from_millis(200));

    let before = metrics(&mut h);
    let ticks_before = cpu_ticks(s.pid());
    sleep(Duration::from_millis(1500));
    let ticks_after = cpu_ticks(s.pid());
    let after = metrics(&mut h);
    let wakeups = metric_in(&after, "chatloop_loop_wakeups_total")
        - metric_in(&before, "chatloop_loop_wakeups_total");
    eprintln!(
        "{wakeups} wakeups and {} CPU ticks in 1.5 s",
        ticks_after - ticks_before
    );
    // Only the second /metrics request itself may have woken the loop.
    assert!(
        wakeups <= 6.0,
        "{wakeups} loop wakeups in 1.5 s with {SOCKETS} idle WebSockets"
    );
    assert!(
        ticks_after - ticks_before <= 5,
        "{} CPU ticks used while idle",
        ticks_after - ticks_before
    );
    assert_eq!(metric_in(&after, "chatloop_websockets"), SOCKETS as f64);
    drop(sockets);
}

/// Issue 12, finding 3: each WebSocket's finished request timeout (armed at accept, 10 s)
/// stayed in the wheel after the upgrade, so 10 s after 1000 sockets connected the loop woke
/// about once per socket (1 ms poll timeouts) for timers that no longer mattered.
#[test]
fn a_thousand_websockets_sleep_through_their_old_request_timeouts() {
    // 100 sockets per session, opened at once: past the per-session upgrade budget.
    let s = Server::start(&["--create-rate", "0", "--upgrade-rate", "0"]);
    let sessions: Vec<String> = (0..SESSIONS)
        .map(|i| s.session(&format!("user{i}")).0)
        .collect();
    let rooms: Vec<String> = (0..ROOMS)
        .map(|i| s.room(&sessions[i % SESSIONS]))
        .collect();
    let t = Instant::now();
    // From four loopback addresses, 250 each, so no per-address limit is near.
    let sockets: Vec<Ws> = (0..SOCKETS)
        .map(|i| {
            let from = std::net::IpAddr::from([127, 0, 0, 2 + (i % 4) as u8]);
            s.join_from(from, &rooms[i % ROOMS], &sessions[i % SESSIONS])
                .0
        })
        .collect();
    let connect_time = t.elapsed();
    let mut h = s.http();
    sleep(Duration::from_millis(200)); // the last joins' notices go out
    let before = h.get("/metrics", None).text();
    // Every socket's request timeout (10 s after its connect) falls inside this window.
    sleep(Duration::from_millis(10_500));
    let after = h.get("/metrics", None).text();
    let wakeups = metric_in(&after, "chatloop_loop_wakeups_total")
        - metric_in(&before, "chatloop_loop_wakeups_total");
    eprintln!(
        "{SOCKETS} WebSockets connected in {connect_time:?}; {wakeups} loop wakeups in the 10.5 s after; timers armed {}",
        metric_in(&after, "chatloop_timers_armed")
    );
    assert_eq!(metric_in(&after, "chatloop_websockets"), SOCKETS as f64);
    assert!(
        wakeups <= 10.0,
        "{wakeups} loop wakeups in 10.5 s with {SOCKETS} idle WebSockets"
    );
    // One timer per connection (each socket's ping deadline, the metrics connection's idle
    // timeout) and one per session; occupied rooms have none.
    let timers = metric_in(&after, "chatloop_timers_armed");
    assert!(
        timers <= (SOCKETS + 1 + SESSIONS) as f64,
        "{timers} timers armed"
    );
    drop(sockets);
}
