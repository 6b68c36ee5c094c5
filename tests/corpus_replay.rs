//! Replays the regression corpus in `tests/corpus/` against a live server: every HTTP input
//! ends in a response or a close, every WebSocket input in frames or a close, the server
//! stays up, and a well-behaved client in the same room keeps chatting. Add a file to the
//! corpus whenever a fuzzer or a bug report finds a new bad input.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::Server;

fn corpus(dir: &str) -> Vec<(String, Vec<u8>)> {
    let path = format!("{}/tests/corpus/{dir}", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

/// Sends `bytes` in three pieces and reads until the server answers and closes, or 3 s pass.
/// Returns what the server sent.
fn replay(stream: &mut TcpStream, bytes: &[u8]) -> Vec<u8> {
    let third = bytes.len() / 3;
    for piece in [
        &bytes[..third],
        &bytes[third..2 * third],
        &bytes[2 * third..],
    ] {
        if stream.write_all(piece).is_err() {
            break; // the server may have answered and closed already
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                if !got.is_empty() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    got
}

#[test]
fn every_http_input_gets_a_response_or_a_close() {
    let s = Server::start(&[]);
    for (name, bytes) in corpus("http") {
        let mut stream = TcpStream::connect(s.addr).unwrap();
        let got = replay(&mut stream, &bytes);
        assert!(
            got.starts_with(b"HTTP/1.1 "),
            "{name}: no HTTP response, got {:?}",
            String::from_utf8_lossy(&got)
        );
        assert_eq!(s.http().get("/health", None).status, 200, "after {name}");
    }
}

#[test]
fn every_websocket_input_gets_frames_or_a_close_and_the_room_carries_on() {
    let s = Server::start(&[]);
    let (alice, _) = s.session("alice");
    let (bob, _) = s.session("bob");
    let room = s.room(&alice);
    let (mut good, _) = s.join(&room, &alice);
    for (name, bytes) in corpus("ws") {
        let mut raw = s.raw_ws(&format!("/ws/{room}?session_id={bob}"));
        let got = replay(&mut raw.stream, &bytes);
        assert!(
            !got.is_empty(),
            "{name}: the server neither answered nor closed"
        );
        let reply = good.chat_roundtrip(&format!("still fine after {name}"));
        assert_eq!(reply["user"], "alice");
    }
}
