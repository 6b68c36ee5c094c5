//! WebSocket keepalive (`--ping-interval`, `--pong-timeout`): a socket that sends nothing is
//! pinged after the interval and closed with 1008 after the pong timeout; a client that answers
//! pings stays open indefinitely.
mod common;

use std::time::{Duration, Instant};

use common::Server;
use tungstenite::Message;

const PING: Duration = Duration::from_millis(300);
const PONG: Duration = Duration::from_millis(900);

fn server() -> Server {
    Server::start(&["--ping-interval", "300ms", "--pong-timeout", "900ms"])
}

/// Runs a well-behaved member on its own thread for `dur` (reading, so tungstenite answers
/// pings), then checks that a chat still makes the round trip. Returns what it received.
fn bystander(
    s: &Server,
    room: &str,
    dur: Duration,
) -> std::thread::JoinHandle<Vec<serde_json::Value>> {
    let (sid, _) = s.session("bob");
    let (mut ws, _) = s.join(room, &sid);
    std::thread::spawn(move || {
        let mut got = Vec::new();
        let end = Instant::now() + dur;
        while Instant::now() < end {
            if let Some(v) = ws.recv_within(Duration::from_millis(50)) {
                got.push(v);
            }
        }
        ws.chat_roundtrip("bob is still here");
        got
    })
}

#[test]
fn a_silent_client_is_pinged_then_closed_with_1008() {
    let s = server();
    let (sid, uid) = s.session("mute");
    let room = s.room(&sid);
    let bob = bystander(&s, &room, PONG + Duration::from_millis(800));

    let mut raw = s.raw_ws(&format!("/ws/{room}?session_id={sid}"));
    let opened = Instant::now();
    let mut ping_at = None;
    let close = loop {
        let f = raw
            .read_frame()
            .expect("a frame (ping, then close) before the connection ends");
        match f.opcode {
            0x1 => {}
            0x9 => {
                assert!(ping_at.is_none(), "a second ping before the close");
                ping_at = Some(opened.elapsed());
            }
            0x8 => break f,
            op => panic!("unexpected opcode {op:#x}"),
        }
    };
    let closed_at = opened.elapsed();
    let ping_at = ping_at.expect("a ping frame (opcode 0x9) before the close");
    assert!(
        ping_at >= PING - Duration::from_millis(20),
        "pinged after {ping_at:?}, before the interval"
    );
    assert!(
        ping_at < PING + Duration::from_millis(400),
        "pinged only after {ping_at:?}"
    );
    assert_eq!(
        close.close_code(),
        Some(1008),
        "close frame {:?}",
        close.payload
    );
    assert!(
        closed_at >= PONG - Duration::from_millis(20),
        "closed after {closed_at:?}, before the pong timeout"
    );
    assert!(
        closed_at < PONG + Duration::from_millis(600),
        "closed only after {closed_at:?}"
    );
    assert!(
        raw.ends_within(Duration::from_secs(3)),
        "TCP connection still open after the 1008 close"
    );

    let got = bob.join().expect("bob's thread");
    assert!(
        got.iter()
            .any(|v| v["type"] == "user_left" && v["user_id"] == uid.as_str()),
        "bob did not see the silent client leave: {got:?}"
    );
    assert!(s.metric("chatloop_timeouts_total") >= 1.0);
    assert_eq!(s.metric("chatloop_ws_closes_total{code=\"1008\"}"), 1.0);
}

#[test]
fn a_raw_client_that_answers_pings_stays_open() {
    let s = server();
    let (sid, _) = s.session("ponger");
    let room = s.room(&sid);
    let mut raw = s.raw_ws(&format!("/ws/{room}?session_id={sid}"));
    let opened = Instant::now();
    let mut pings = 0;
    while opened.elapsed() < PONG * 2 + PING {
        let f = raw.read_frame().expect("the connection stays open");
        match f.opcode {
            0x9 => {
                pings += 1;
                raw.send_frame(0xA, &f.payload, true);
            }
            0x8 => panic!(
                "closed with {:?} although every ping was answered",
                f.close_code()
            ),
            _ => {}
        }
    }
    assert!(pings >= 3, "only {pings} pings in {:?}", opened.elapsed());
    raw.send_frame(0x1, br#"{"type":"chat","message":"pong pong"}"#, true);
    loop {
        let v = raw.recv();
        if v["type"] == "chat" {
            assert_eq!(v["message"], "pong pong");
            break;
        }
    }
}

#[test]
fn a_tungstenite_client_stays_open_past_several_intervals() {
    let s = server();
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    let (mut ws, _) = s.join(&room, &sid);
    let start = Instant::now();
    let mut pings = 0;
    ws.set_timeout(Duration::from_millis(50));
    while start.elapsed() < Duration::from_millis(2400) {
        match ws.socket.read() {
            Ok(Message::Ping(_)) => pings += 1,
            Ok(Message::Close(c)) => panic!("closed after {:?}: {c:?}", start.elapsed()),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("socket failed after {:?}: {e}", start.elapsed()),
        }
    }
    ws.set_timeout(common::TIMEOUT);
    assert!(
        pings >= 3,
        "expected pings every {PING:?}, got {pings} in {:?}",
        start.elapsed()
    );
    ws.chat_roundtrip("still open");
}
