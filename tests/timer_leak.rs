//! Issue 12, finding 3: state a client creates and ends must not leave timers behind.
//! Each `POST /sessions` + `DELETE /sessions/me` used to leave a 24 h timer in the wheel (no
//! cancel): about 50 bytes per cycle, forever, whatever `--max-sessions` says.
mod common;

use std::io::Write;
use std::time::Instant;

use common::{Http, Server, metric_in};

const CYCLES: usize = 100_000;
/// Requests pipelined per write (and live sessions at the peak of a batch).
const BATCH: usize = 100;

/// Creates `BATCH` sessions with pipelined requests, then ends them the same way.
fn churn_batch(h: &mut Http) {
    let body = r#"{"username":"mallory"}"#;
    let create = format!(
        "POST /sessions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    h.stream
        .write_all(create.repeat(BATCH).as_bytes())
        .expect("send");
    let ids: Vec<String> = (0..BATCH)
        .map(|_| {
            let r = h.read_response(false);
            assert_eq!(r.status, 201, "{}", r.text());
            r.json()["session_id"].as_str().unwrap().to_string()
        })
        .collect();
    let mut end = String::new();
    for id in &ids {
        end.push_str(&format!(
            "DELETE /sessions/me HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {id}\r\n\r\n"
        ));
    }
    h.stream.write_all(end.as_bytes()).expect("send");
    for _ in 0..BATCH {
        let r = h.read_response(false);
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

#[test]
fn creating_and_ending_sessions_leaves_timers_and_memory_flat() {
    // The per-address budget is off (this is one client doing what a benchmark does) and the
    // session cap is exactly one batch: every cycle must free its place.
    let s = Server::start(&["--create-rate", "0", "--max-sessions", &BATCH.to_string()]);
    let mut h = s.http();
    let mut m = s.http();
    // Warm up the allocator and the tables, then measure.
    for _ in 0..10 {
        churn_batch(&mut h);
    }
    let before = m.get("/metrics", None).text();
    let rss_before = s.rss_kib();
    let t = Instant::now();
    for _ in 0..CYCLES / BATCH {
        churn_batch(&mut h);
    }
    let elapsed = t.elapsed();
    let after = m.get("/metrics", None).text();
    let rss_after = s.rss_kib();
    let timers = |t: &str| metric_in(t, "chatloop_timers_armed");
    eprintln!(
        "{CYCLES} create/end cycles in {elapsed:?}: timers {} -> {}, RSS {rss_before} KiB -> {rss_after} KiB ({:+} KiB)",
        timers(&before),
        timers(&after),
        rss_after as i64 - rss_before as i64
    );
    assert_eq!(metric_in(&after, "chatloop_sessions"), 0.0);
    assert!(
        timers(&after) <= timers(&before),
        "timers grew from {} to {} over {CYCLES} cycles",
        timers(&before),
        timers(&after)
    );
    assert!(
        rss_after <= rss_before + 2048,
        "RSS grew by {} KiB over {CYCLES} cycles",
        rss_after - rss_before
    );
    // The server still serves everyone.
    s.session("bystander");
}
