//! Graceful shutdown: on SIGTERM or SIGINT the server stops accepting, closes every WebSocket
//! with 1001 and exits with status 0 within a second.
mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::{Server, Ws};

/// Reads on its own thread until the server closes; returns the close code (and keeps reading
/// so tungstenite answers the close handshake).
fn await_close(mut ws: Ws) -> thread::JoinHandle<Option<u16>> {
    thread::spawn(move || {
        let code = ws.close_code();
        while ws.socket.read().is_ok() {}
        code
    })
}

fn shutdown_on(sig: &str) {
    let mut s = Server::start(&[]);
    let (a, _) = s.session("alice");
    let (b, _) = s.session("bob");
    let room = s.room(&a);
    let (mut wa, _) = s.join(&room, &a);
    let (mut wb, _) = s.join(&room, &b);
    wa.chat_roundtrip("before");
    wb.recv_chat("before");
    let mut idle_http = s.http();
    assert_eq!(idle_http.get("/health", None).status, 200);
    let addr = s.addr;

    let (ta, tb) = (await_close(wa), await_close(wb));
    let t = Instant::now();
    let status = s.signal_and_wait(sig, Duration::from_secs(1));
    let took = t.elapsed();
    let status =
        status.unwrap_or_else(|| panic!("still running 1 s after SIG{sig}; log:\n{}", s.log()));
    assert!(
        status.success(),
        "exit status {status:?} after SIG{sig}; log:\n{}",
        s.log()
    );
    assert_eq!(ta.join().unwrap(), Some(1001), "alice's close code");
    assert_eq!(tb.join().unwrap(), Some(1001), "bob's close code");
    assert!(
        idle_http.is_closed(),
        "an idle HTTP connection outlived the shutdown"
    );
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still accepting after the shutdown"
    );
    eprintln!("SIG{sig}: exited after {took:?}");
}

#[test]
fn sigterm_closes_websockets_with_1001_and_exits_0() {
    shutdown_on("TERM");
}

#[test]
fn sigint_closes_websockets_with_1001_and_exits_0() {
    shutdown_on("INT");
}

#[test]
fn shutdown_does_not_wait_for_clients_that_never_answer() {
    let mut s = Server::start(&[]);
    let (a, _) = s.session("alice");
    let room = s.room(&a);
    // Neither reads nor answers the close handshake until the process is gone.
    let mut mute = s.raw_ws(&format!("/ws/{room}?session_id={a}"));
    let (mut ws, _) = s.join(&room, &a);
    ws.chat_roundtrip("before");
    let t = Instant::now();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &s.pid().to_string()])
        .status();
    // While the mute client holds the shutdown open, new connections are refused.
    thread::sleep(Duration::from_millis(100));
    assert!(
        std::net::TcpStream::connect(s.addr).is_err(),
        "accepting during the shutdown"
    );
    let status = s.signal_and_wait("TERM", Duration::from_secs(1).saturating_sub(t.elapsed()));
    let status =
        status.unwrap_or_else(|| panic!("still running 1 s after SIGTERM; log:\n{}", s.log()));
    assert!(status.success(), "{status:?}");
    assert_eq!(ws.close_code(), Some(1001));
    assert_eq!(mute.close_code(), Some(1001));
}
