//! `GET /metrics`: Prometheus text with connections, rooms, sessions, frames and bytes in and
//! out, closes by code, armed timers and the loop-time histogram; the counters move with use.
mod common;

use std::time::Duration;

use common::{Server, metric_in, wait_for};

const NAMES: &[&str] = &[
    "chatloop_connections",
    "chatloop_websockets",
    "chatloop_rooms",
    "chatloop_sessions",
    "chatloop_room_members",
    "chatloop_timers_armed",
    "chatloop_connections_accepted_total",
    "chatloop_http_requests_total",
    "chatloop_ws_upgrades_total",
    "chatloop_frames_in_total",
    "chatloop_frames_out_total",
    "chatloop_bytes_in_total",
    "chatloop_bytes_out_total",
    "chatloop_messages_total",
    "chatloop_slow_consumers_total",
    "chatloop_loop_wakeups_total",
    "chatloop_ws_closes_total{code=\"1000\"}",
    "chatloop_ws_closes_total{code=\"1001\"}",
    "chatloop_ws_closes_total{code=\"1008\"}",
    "chatloop_ws_closes_total{code=\"1009\"}",
    "chatloop_ws_closes_total{code=\"1013\"}",
    "chatloop_loop_iteration_seconds_bucket{le=\"+Inf\"}",
    "chatloop_loop_iteration_seconds_sum",
    "chatloop_loop_iteration_seconds_count",
];

#[test]
fn metrics_is_prometheus_text_with_every_series() {
    let s = Server::start(&[]);
    let r = s.http().get("/metrics", None);
    assert_eq!(r.status, 200);
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("text/plain"), "Content-Type {ct:?}");
    let text = r.text();
    for name in NAMES {
        metric_in(&text, name);
    }
    // Every sample line is `name[{labels}] number`, and every family has HELP and TYPE.
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}");
        let family = name.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(family, |f, s| f.strip_suffix(s).unwrap_or(f));
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "no TYPE for {line:?}"
        );
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "no HELP for {line:?}"
        );
    }
    // The histogram's buckets are cumulative and end with +Inf = count.
    let buckets: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("chatloop_loop_iteration_seconds_bucket{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert!(buckets.len() >= 5, "{buckets:?}");
    assert!(
        buckets.windows(2).all(|w| w[0] <= w[1]),
        "not cumulative: {buckets:?}"
    );
    assert_eq!(
        metric_in(&text, "chatloop_loop_iteration_seconds_bucket{le=\"+Inf\"}"),
        metric_in(&text, "chatloop_loop_iteration_seconds_count")
    );
    assert!(metric_in(&text, "chatloop_loop_iteration_seconds_count") >= 1.0);
    // HEAD answers too.
    let r = s.http().request("HEAD", "/metrics", &[], None);
    assert_eq!(r.status, 200);
}

#[test]
fn the_counters_move_when_people_chat() {
    let s = Server::start(&[]);
    let (a, _) = s.session("alice");
    let (b, _) = s.session("bob");
    let room = s.room(&a);
    let (mut wa, _) = s.join(&room, &a);
    let (mut wb, _) = s.join(&room, &b);
    wb.recv_type("user_joined");
    let _ = wa.drain(Duration::from_millis(50));
    let _ = wb.drain(Duration::from_millis(50));

    let before = s.metrics_text();
    let m = |t: &str, n: &str| metric_in(t, n);
    assert_eq!(m(&before, "chatloop_sessions"), 2.0);
    assert_eq!(m(&before, "chatloop_rooms"), 1.0);
    assert_eq!(m(&before, "chatloop_websockets"), 2.0);
    assert_eq!(m(&before, "chatloop_room_members"), 2.0);
    assert!(
        m(&before, "chatloop_connections") >= 3.0,
        "two WebSockets and the /metrics request"
    );
    assert!(m(&before, "chatloop_timers_armed") >= 1.0);
    assert_eq!(m(&before, "chatloop_ws_upgrades_total"), 2.0);

    wa.chat_roundtrip("counted");
    wb.recv_chat("counted");
    let after = s.metrics_text();
    let delta = |n: &str| m(&after, n) - m(&before, n);
    assert_eq!(delta("chatloop_frames_in_total"), 1.0, "one chat frame in");
    assert_eq!(
        delta("chatloop_frames_out_total"),
        2.0,
        "the chat to both members"
    );
    assert_eq!(delta("chatloop_messages_total"), 1.0);
    // The chat frame in is over 30 bytes; each copy out (ids, timestamp) over 150.
    assert!(
        delta("chatloop_bytes_in_total") >= 30.0,
        "bytes in moved by {}",
        delta("chatloop_bytes_in_total")
    );
    assert!(
        delta("chatloop_bytes_out_total") >= 300.0,
        "bytes out moved by {}",
        delta("chatloop_bytes_out_total")
    );
    assert!(delta("chatloop_http_requests_total") >= 1.0);

    // Closes are counted by code.
    wa.socket
        .close(Some(tungstenite::protocol::CloseFrame {
            code: 1000.into(),
            reason: "bye".into(),
        }))
        .unwrap();
    let _ = wa.close_code();
    wb.recv_type("user_left");
    let closed = wait_for(Duration::from_secs(2), || {
        let t = s.metrics_text();
        m(&t, "chatloop_ws_closes_total{code=\"1000\"}") == 1.0
            && m(&t, "chatloop_websockets") == 1.0
    });
    assert!(
        closed.is_some(),
        "close 1000 not counted:\n{}",
        s.metrics_text()
    );
    let r = s.http().call("DELETE", "/sessions/me", Some(&b));
    assert_eq!(r.status, 200);
    assert_eq!(wb.close_code(), Some(1000));
    let t = s.metrics_text();
    assert_eq!(m(&t, "chatloop_ws_closes_total{code=\"1000\"}"), 2.0);
    assert_eq!(m(&t, "chatloop_sessions"), 1.0);
    assert_eq!(m(&t, "chatloop_websockets"), 0.0);
    assert_eq!(m(&t, "chatloop_room_members"), 0.0);
}
