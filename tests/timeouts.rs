//! HTTP timeouts: `--request-timeout` bounds the time to send a request head, a body or a
//! WebSocket handshake (408 or a closed connection after it), and `--idle-timeout` closes an
//! idle keep-alive connection. Slow clients never delay anyone else.
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{Http, Server};

const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);

/// What a deliberately slow client saw.
#[derive(Debug)]
struct Outcome {
    /// The status line's code, if a response came.
    status: Option<u16>,
    /// Whether the connection ended (EOF or reset) after it.
    closed: bool,
    /// When the response or the end came, from the first byte sent.
    after: Duration,
}

/// Sends `head` and then `drip` one byte every 100 ms (stopping when the server answers or
/// closes), and reads what the server does about it within `limit`.
fn slow_client(s: &Server, head: &[u8], drip: &[u8], limit: Duration) -> Outcome {
    let mut stream = TcpStream::connect(s.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let start = Instant::now();
    stream.write_all(head).unwrap();
    let mut got = Vec::new();
    let mut drip = drip.iter();
    let mut chunk = [0u8; 4096];
    let mut status = None;
    while start.elapsed() < limit {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&chunk[..n]);
                if status.is_none() && got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let line = String::from_utf8_lossy(&got)
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    status = line.split(' ').nth(1).and_then(|c| c.parse().ok());
                    let after = start.elapsed();
                    let closed = wait_eof(&mut stream, Duration::from_secs(3));
                    return Outcome {
                        status,
                        closed,
                        after,
                    };
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(b) = drip.next() {
                    let _ = stream.write_all(&[*b]);
                }
            }
            Err(_) => break,
        }
    }
    let after = start.elapsed();
    Outcome {
        status,
        closed: after < limit,
        after,
    }
}

fn wait_eof(stream: &mut TcpStream, limit: Duration) -> bool {
    let start = Instant::now();
    let mut chunk = [0u8; 4096];
    while start.elapsed() < limit {
        match stream.read(&mut chunk) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return true,
        }
    }
    false
}

/// A well-behaved keep-alive client asking `GET /health` every 50 ms on its own thread until
/// told to stop; returns the slowest answer.
fn prompt_client(s: &Server, stop: Arc<AtomicBool>) -> thread::JoinHandle<(usize, Duration)> {
    let addr = s.addr;
    thread::spawn(move || {
        let mut http = Http::connect(addr);
        let (mut n, mut worst) = (0, Duration::ZERO);
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let r = http.get("/health", None);
            assert_eq!(r.status, 200);
            worst = worst.max(t.elapsed());
            n += 1;
            thread::sleep(Duration::from_millis(50));
        }
        (n, worst)
    })
}

#[test]
fn slowloris_gets_408_while_others_are_answered_promptly() {
    let s = Server::start(&["--request-timeout", "500ms"]);
    let stop = Arc::new(AtomicBool::new(false));
    let good = prompt_client(&s, stop.clone());
    let o = slow_client(
        &s,
        b"GET /health HTTP/1.1\r\n",
        b"Host: example.test\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        Duration::from_secs(4),
    );
    stop.store(true, Ordering::Relaxed);
    let (n, worst) = good.join().expect("the well-behaved client");
    assert!(
        o.status == Some(408) || (o.status.is_none() && o.closed),
        "slowloris: {o:?}"
    );
    assert!(o.closed, "slowloris connection left open: {o:?}");
    assert!(
        o.after >= REQUEST_TIMEOUT - Duration::from_millis(20),
        "timed out too early: {o:?}"
    );
    assert!(
        o.after < REQUEST_TIMEOUT + Duration::from_millis(700),
        "timed out too late: {o:?}"
    );
    assert!(n >= 5, "the well-behaved client got only {n} answers");
    assert!(
        worst < Duration::from_millis(250),
        "a well-behaved request waited {worst:?}"
    );
    assert!(s.metric("chatloop_timeouts_total") >= 1.0);
}

#[test]
fn an_incomplete_body_times_out() {
    let s = Server::start(&["--request-timeout", "500ms"]);
    let stop = Arc::new(AtomicBool::new(false));
    let good = prompt_client(&s, stop.clone());
    let head = b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"user";
    let o = slow_client(&s, head, b"", Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);
    let (n, worst) = good.join().expect("the well-behaved client");
    assert!(
        o.status == Some(408) || (o.status.is_none() && o.closed),
        "incomplete body: {o:?}"
    );
    assert!(o.closed, "connection left open: {o:?}");
    assert!(
        o.after < REQUEST_TIMEOUT + Duration::from_millis(700),
        "timed out too late: {o:?}"
    );
    assert!(
        n >= 5 && worst < Duration::from_millis(250),
        "{n} answers, slowest {worst:?}"
    );
    // No session was created from the partial body.
    s.session("after");
}

#[test]
fn an_unfinished_websocket_handshake_is_dropped() {
    let s = Server::start(&["--request-timeout", "500ms"]);
    let (sid, _) = s.session("alice");
    let (bob, _) = s.session("bob");
    let room = s.room(&sid);
    let (mut wb, _) = s.join(&room, &bob);
    assert_eq!(wb.recv()["type"], "user_joined");
    let head = format!(
        "GET /ws/{room}?session_id={sid} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    );
    let o = slow_client(
        &s,
        head.as_bytes(),
        b"Sec-WebSocket-Version: 13\r\n",
        Duration::from_secs(4),
    );
    assert!(
        o.status.is_none_or(|c| c != 101),
        "handshake completed: {o:?}"
    );
    assert!(o.closed, "unfinished handshake left open: {o:?}");
    assert!(
        o.after < REQUEST_TIMEOUT + Duration::from_millis(700),
        "dropped too late: {o:?}"
    );
    // Nobody joined the room.
    assert_eq!(
        s.http().get(&format!("/rooms/{room}"), None).json()["user_count"],
        1
    );
    let v = wb.chat_roundtrip("bob is fine");
    assert_eq!(v["user"], "bob");
}

#[test]
fn an_idle_keep_alive_connection_is_closed() {
    let s = Server::start(&["--idle-timeout", "500ms"]);
    let mut idle = s.http();
    assert_eq!(idle.get("/health", None).status, 200);
    let answered = Instant::now();

    // A busy keep-alive connection and a WebSocket outlive the idle timeout.
    let mut busy = s.http();
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    let (mut ws, _) = s.join(&room, &sid);
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(1300) {
        assert_eq!(
            busy.get("/health", None).status,
            200,
            "a busy keep-alive connection was closed"
        );
        thread::sleep(Duration::from_millis(200));
    }

    assert!(idle.is_closed(), "the idle connection is still open");
    let after = answered.elapsed();
    assert!(
        after < Duration::from_secs(3),
        "closed only after {after:?}"
    );
    assert_eq!(busy.get("/health", None).status, 200);
    ws.chat_roundtrip("a WebSocket is not an idle HTTP connection");
}

#[test]
fn an_idle_connection_is_closed_after_the_idle_timeout_not_before() {
    let s = Server::start(&["--idle-timeout", "500ms"]);
    let mut idle = s.http();
    assert_eq!(idle.get("/health", None).status, 200);
    let answered = Instant::now();
    idle.stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut b = [0u8; 1];
    let r = idle.stream.read(&mut b);
    let after = answered.elapsed();
    let reset = matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset);
    assert!(
        matches!(r, Ok(0)) || reset,
        "the idle connection was not closed: {r:?}"
    );
    assert!(
        after >= Duration::from_millis(450),
        "closed after {after:?}, before the idle timeout"
    );
    assert!(
        after < Duration::from_millis(1500),
        "closed only after {after:?}"
    );
    // A new connection is served.
    assert_eq!(s.status("/health"), 200);
}

#[test]
fn a_connection_that_sends_nothing_is_closed_after_the_request_timeout() {
    let s = Server::start(&["--request-timeout", "500ms"]);
    let o = slow_client(&s, b"", b"", Duration::from_secs(4));
    assert!(o.closed, "a silent connection was left open: {o:?}");
    assert!(o.status.is_none_or(|c| c == 408), "{o:?}");
    assert!(
        o.after < REQUEST_TIMEOUT + Duration::from_millis(700),
        "closed too late: {o:?}"
    );
    assert_eq!(s.status("/health"), 200);
}

#[test]
fn a_slow_second_request_on_a_keep_alive_connection_gets_408() {
    let s = Server::start(&["--request-timeout", "500ms"]);
    let mut http = s.http();
    assert_eq!(http.get("/health", None).status, 200);
    // Idle between requests is not a request in progress: no timeout yet.
    thread::sleep(REQUEST_TIMEOUT + Duration::from_millis(200));
    assert_eq!(
        http.get("/health", None).status,
        200,
        "an idle keep-alive connection hit the request timeout"
    );
    let start = Instant::now();
    http.send_raw(b"GET /health HTTP/1.1\r\nHo");
    let r = http.try_read_response(false);
    let after = start.elapsed();
    match r {
        Some(r) => assert_eq!(r.status, 408, "{}", r.text()),
        None => assert!(after < Duration::from_secs(4), "neither 408 nor closed"),
    }
    assert!(
        after >= REQUEST_TIMEOUT - Duration::from_millis(20),
        "timed out after {after:?}"
    );
    assert!(
        after < REQUEST_TIMEOUT + Duration::from_millis(700),
        "timed out only after {after:?}"
    );
    assert!(http.is_closed(), "left open after the 408");
}
