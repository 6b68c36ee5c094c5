//! Hostile clients, each next to a well-behaved client that must keep getting answers:
//! garbage bytes, a 1 MiB header line, 10 000 pipelined requests, a body that never ends,
//! a peer that resets while the server writes to it, and running out of file descriptors.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Http, Server};

/// The well-behaved client: a fresh request answered within the normal timeout.
#[track_caller]
fn still_serving(s: &Server) {
    let t = Instant::now();
    let r = s.http().get("/health", None);
    assert_eq!(r.status, 200);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "health took {:?}",
        t.elapsed()
    );
}

#[test]
fn garbage_bytes_get_400_and_a_close() {
    let s = Server::start(&[]);
    let mut bad = Http::connect(s.addr);
    bad.send_raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n");
    let r = bad.read_response(false);
    assert_eq!(r.status, 400);
    assert!(bad.is_closed());
    still_serving(&s);
}

#[test]
fn a_one_mebibyte_header_line_gets_431() {
    let s = Server::start(&[]);
    let mut bad = Http::connect(s.addr);
    let mut req = b"GET /health HTTP/1.1\r\nX-Big: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 1 << 20));
    // The server answers and closes before reading it all; the write may then fail.
    let writer = {
        let mut stream = bad.stream.try_clone().unwrap();
        std::thread::spawn(move || {
            let _ = stream.write_all(&req);
        })
    };
    let r = bad.read_response(false);
    assert_eq!(r.status, 431);
    still_serving(&s);
    let _ = writer.join();
}

#[test]
fn ten_thousand_pipelined_requests_are_all_answered_in_order() {
    let s = Server::start(&[]);
    let mut pipe = Http::connect(s.addr);
    let n = 10_000;
    let mut batch = Vec::new();
    for i in 0..n {
        let path = if i % 2 == 0 { "/ping" } else { "/health" };
        batch.extend_from_slice(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    }
    let writer = {
        let mut stream = pipe.stream.try_clone().unwrap();
        std::thread::spawn(move || stream.write_all(&batch).is_ok())
    };
    // The other client is answered promptly while the pipeline is being served.
    still_serving(&s);
    for i in 0..n {
        let r = pipe.read_response(false);
        assert_eq!(r.status, 200, "response {i}");
        let want = if i % 2 == 0 { "pong" } else { "ok" };
        assert!(
            r.text().contains(want),
            "response {i} out of order: {}",
            r.text()
        );
    }
    assert!(writer.join().unwrap());
    still_serving(&s);
}

#[test]
fn a_body_that_never_finishes_times_out_without_blocking_others() {
    let s = Server::start(&["--request-timeout", "500ms"]);
    let mut bad = Http::connect(s.addr);
    bad.send_raw(b"POST /sessions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"user");
    still_serving(&s);
    let r = bad.read_response(false);
    assert_eq!(r.status, 408);
    assert!(bad.is_closed());
    still_serving(&s);
}

#[test]
fn a_peer_that_resets_mid_write_does_not_hurt_the_room() {
    let s = Server::start(&[
        "--chat-rate",
        "100000",
        "--chat-burst",
        "100000",
        "--max-chat-chars",
        "60000",
        "--max-output-queue",
        "8MiB",
    ]);
    let (alice, _) = s.session("alice");
    let (bob, _) = s.session("bob");
    let (carol, _) = s.session("carol");
    let room = s.room(&alice);
    let (mut sender, _) = s.join(&room, &alice);
    let (mut reader, _) = s.join(&room, &carol);
    // Bob never reads: the server's writes to him back up; then he vanishes with unread
    // data in his receive buffer, so his kernel answers with a reset.
    let mut rude = s.raw_ws(&format!("/ws/{room}?session_id={bob}"));
    let big = "x".repeat(50_000);
    for _ in 0..40 {
        sender.chat(&big);
    }
    rude.stream
        .set_read_timeout(Some(Duration::from_millis(1)))
        .unwrap();
    let mut tiny = [0u8; 1];
    let _ = rude.stream.read(&mut tiny);
    drop(rude);
    sender.chat("after the reset");
    for _ in 0..41 {
        let v = reader.recv_type("chat");
        if v["message"] == "after the reset" {
            break;
        }
    }
    assert_eq!(reader.chat_roundtrip("still here")["message"], "still here");
    still_serving(&s);
}

#[test]
fn running_out_of_file_descriptors_backs_off_and_recovers() {
    let s = Server::start(&[]);
    // The probe is accepted before the limit bites, so it can read /metrics throughout.
    let mut probe = s.http();
    assert_eq!(probe.get("/health", None).status, 200);
    let wakeups = |probe: &mut Http| {
        common::metric_in(
            &probe.get("/metrics", None).text(),
            "chatloop_loop_wakeups_total",
        )
    };
    // Leave the server a handful of descriptors, then open more connections than that.
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &s.pid().to_string(), "--nofile=24:"])
        .status()
        .expect("prlimit runs");
    assert!(status.success());
    let held: Vec<TcpStream> = (0..40)
        .filter_map(|_| TcpStream::connect(s.addr).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let errors = common::metric_in(
        &probe.get("/metrics", None).text(),
        "chatloop_accept_errors_total",
    );
    assert!(errors >= 1.0, "accept never failed: the limit did not bite");
    // Backing off (100 ms) means about 10 wakeups a second; a spinning loop would be millions.
    let w0 = wakeups(&mut probe);
    std::thread::sleep(Duration::from_secs(1));
    let w1 = wakeups(&mut probe);
    assert!(
        w1 - w0 < 100.0,
        "the loop spun: {} wakeups in a second",
        w1 - w0
    );
    // Recovery: with descriptors available again, new clients are served.
    drop(held);
    let _ = std::process::Command::new("prlimit")
        .args(["--pid", &s.pid().to_string(), "--nofile=4096:"])
        .status();
    let t = Instant::now();
    loop {
        if let Some(r) = Http::connect(s.addr).try_get("/health") {
            assert_eq!(r.status, 200);
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "server did not recover"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
