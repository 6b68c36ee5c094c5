//! TLS on the listener (`--tls-cert`, `--tls-key`): REST over https and chat over wss with
//! real rustls clients, certificate reload on SIGHUP, hostile TLS clients next to a
//! bystander, and a wss client that never reads. Certificates are made by the test with the
//! system's `openssl`: a test CA and leaves for 127.0.0.1 and localhost.
#![cfg(feature = "tls")]

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

use common::pki::Pki;
use common::{Resp, Server, TIMEOUT, wait_for};

// ---- certificates -----------------------------------------------------------------------

fn der(cert: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(cert)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

fn start_tls(cert: &Path, key: &Path, args: &[&str]) -> Server {
    let mut all = vec![
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let s = Server::start(&all);
    assert!(
        wait_for(TIMEOUT, || s.log().contains("listening on https://")).is_some(),
        "no https in the start line:\n{}",
        s.log()
    );
    s
}

// ---- clients ----------------------------------------------------------------------------

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A TLS connection to the server with its handshake done.
fn connect(addr: SocketAddr, cfg: &Arc<ClientConfig>) -> Tls {
    let tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
    let conn =
        ClientConnection::new(cfg.clone(), ServerName::try_from("localhost").unwrap()).unwrap();
    let mut s = StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn
            .complete_io(&mut s.sock)
            .expect("TLS handshake with the server");
    }
    s
}

/// One HTTP/1.1 request on a (keep-alive) TLS stream, and its response.
fn request(s: &mut Tls, method: &str, path: &str, sid: Option<&str>, body: Option<&str>) -> Resp {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    if let Some(sid) = sid {
        req.push_str(&format!("Authorization: Bearer {sid}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
    } else {
        req.push_str("\r\n");
    }
    s.write_all(req.as_bytes()).expect("send request");
    s.flush().unwrap();
    read_response(s).expect("a complete response")
}

fn read_response(s: &mut Tls) -> Option<Resp> {
    common::read_http_response(s, &mut Vec::new(), false)
}

fn https(s: &Server, cfg: &Arc<ClientConfig>, method: &str, path: &str, sid: Option<&str>) -> Resp {
    request(&mut connect(s.addr, cfg), method, path, sid, None)
}

fn metric(s: &Server, cfg: &Arc<ClientConfig>, name: &str) -> f64 {
    let text = https(s, cfg, "GET", "/metrics", None).text();
    common::metric_in(&text, name)
}

/// `POST /sessions` then `POST /rooms` over https: (session id, room id).
fn session(s: &Server, cfg: &Arc<ClientConfig>, name: &str) -> String {
    let body = json!({ "username": name }).to_string();
    let r = request(
        &mut connect(s.addr, cfg),
        "POST",
        "/sessions",
        None,
        Some(&body),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["session_id"].as_str().unwrap().to_string()
}

fn room(s: &Server, cfg: &Arc<ClientConfig>, sid: &str) -> String {
    let r = https(s, cfg, "POST", "/rooms", Some(sid));
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["room_id"].as_str().unwrap().to_string()
}

struct Wss {
    ws: WebSocket<Tls>,
}

impl Wss {
    fn join(s: &Server, cfg: &Arc<ClientConfig>, room: &str, sid: &str) -> (Wss, Value) {
        let stream = connect(s.addr, cfg);
        let url = format!(
            "wss://localhost:{}/ws/{room}?session_id={sid}",
            s.addr.port()
        );
        let (ws, resp) = tungstenite::client::client(url.as_str(), stream).expect("wss upgrade");
        assert_eq!(resp.status().as_u16(), 101);
        let mut w = Wss { ws };
        let welcome = w.recv();
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (w, welcome)
    }

    fn recv(&mut self) -> Value {
        loop {
            match self.ws.read().expect("a message over wss") {
                Message::Text(t) => return serde_json::from_str(&t).expect("JSON"),
                Message::Close(c) => panic!("closed: {c:?}"),
                _ => continue,
            }
        }
    }

    fn chat(&mut self, text: &str) {
        self.ws
            .send(Message::text(
                json!({"type": "chat", "message": text}).to_string(),
            ))
            .expect("send over wss");
    }

    fn recv_chat(&mut self, text: &str) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            let v = self.recv();
            if v["type"] == "chat" && v["message"] == text {
                return v;
            }
        }
        panic!("chat did not come back in time");
    }

    fn roundtrip(&mut self, text: &str) {
        self.chat(text);
        self.recv_chat(text);
    }
}

/// Reads and discards until the server ends the TCP connection; how long that took, if it
/// did within `limit`.
fn ends_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    let mut chunk = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(t.elapsed());
        if left.is_zero() {
            return None;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut chunk) {
            Ok(0) => return Some(t.elapsed()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(t.elapsed()),
            Err(_) => return None,
        }
    }
}

/// The bytes a real client sends first (its ClientHello record).
fn client_hello(cfg: &Arc<ClientConfig>) -> Vec<u8> {
    let mut c =
        ClientConnection::new(cfg.clone(), ServerName::try_from("localhost").unwrap()).unwrap();
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out).unwrap();
    }
    out
}

// ---- tests ------------------------------------------------------------------------------

#[test]
fn rest_over_https_and_chat_over_wss() {
    let pki = Pki::new("basic");
    let (cert, key) = pki.leaf("server");
    let s = start_tls(&cert, &key, &[]);
    let cfg = pki.client_config();

    // Keep-alive: several requests on one TLS connection; ALPN says http/1.1.
    let mut c = connect(s.addr, &cfg);
    assert_eq!(c.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    for _ in 0..3 {
        let r = request(&mut c, "GET", "/health", None, None);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let a = session(&s, &cfg, "alice");
    let b = session(&s, &cfg, "bob");
    let room = room(&s, &cfg, &a);
    let r = https(&s, &cfg, "GET", &format!("/rooms/{room}"), Some(&b));
    assert_eq!(r.status, 200, "{}", r.text());

    let (mut wa, _) = Wss::join(&s, &cfg, &room, &a);
    let (mut wb, _) = Wss::join(&s, &cfg, &room, &b);
    wa.roundtrip("hello over wss");
    assert_eq!(wb.recv_chat("hello over wss")["user"], "alice");
    // Messages large enough to need several TLS records each, and a welcome with all of
    // them in its history (over 100 KiB: several encrypted batches in one flush).
    let long: Vec<String> = (0..30)
        .map(|i| format!("{i:04}{}", "x".repeat(3990)))
        .collect();
    for m in &long {
        wb.chat(m);
        wb.recv_chat(m);
        wa.recv_chat(m);
    }
    let (_wc, welcome) = Wss::join(&s, &cfg, &room, &a);
    let history: Vec<&str> = welcome["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["message"].as_str())
        .collect();
    for m in &long {
        assert!(history.contains(&m.as_str()), "history lost a long message");
    }
    assert_eq!(metric(&s, &cfg, "chatloop_websockets"), 3.0);
}

#[test]
fn sighup_reloads_the_certificate_without_dropping_connections() {
    let pki = Pki::new("reload");
    let (first, first_key) = pki.leaf("first");
    let (second, second_key) = pki.leaf("second");
    let live_cert = pki.path("live.pem");
    let live_key = pki.path("live.key");
    fs::copy(&first, &live_cert).unwrap();
    fs::copy(&first_key, &live_key).unwrap();
    let mut s = start_tls(&live_cert, &live_key, &[]);
    let cfg = pki.client_config();
    let seen = |s: &Server| connect(s.addr, &cfg).conn.peer_certificates().unwrap()[0].to_vec();
    assert_eq!(seen(&s), der(&first));

    let a = session(&s, &cfg, "alice");
    let room = room(&s, &cfg, &a);
    let (mut old, _) = Wss::join(&s, &cfg, &room, &a);
    let mut old_http = connect(s.addr, &cfg);
    assert_eq!(
        request(&mut old_http, "GET", "/health", None, None).status,
        200
    );

    // Renewed: the files change, SIGHUP, new handshakes see the new certificate.
    fs::copy(&second, &live_cert).unwrap();
    fs::copy(&second_key, &live_key).unwrap();
    Command::new("kill")
        .args(["-HUP", &s.pid().to_string()])
        .status()
        .unwrap();
    assert!(
        wait_for(TIMEOUT, || s
            .log()
            .contains("TLS certificate and key reloaded"))
        .is_some(),
        "no reload line:\n{}",
        s.log()
    );
    assert_eq!(
        seen(&s),
        der(&second),
        "a new handshake still gets the old certificate"
    );
    // The connections opened before the reload keep working.
    old.roundtrip("still here after the reload");
    assert_eq!(
        request(&mut old_http, "GET", "/health", None, None).status,
        200
    );

    // A bad pair (the first certificate with the second key) is refused; the second is kept.
    fs::copy(&first, &live_cert).unwrap();
    Command::new("kill")
        .args(["-HUP", &s.pid().to_string()])
        .status()
        .unwrap();
    assert!(
        wait_for(TIMEOUT, || s.log().contains("TLS reload refused")).is_some(),
        "no refusal line:\n{}",
        s.log()
    );
    assert_eq!(seen(&s), der(&second), "a bad pair replaced the good one");
    // A file that is no PEM at all: refused too.
    fs::write(&live_key, "not a key").unwrap();
    Command::new("kill")
        .args(["-HUP", &s.pid().to_string()])
        .status()
        .unwrap();
    assert!(
        wait_for(TIMEOUT, || s.log().matches("TLS reload refused").count()
            == 2)
        .is_some(),
        "no second refusal line:\n{}",
        s.log()
    );
    assert_eq!(seen(&s), der(&second));
    old.roundtrip("still here after the refusals");
    assert!(
        s.signal_and_wait("TERM", Duration::from_secs(5)).is_some(),
        "the server did not stop on SIGTERM after the reloads"
    );
}

#[test]
fn bad_certificate_files_stop_the_start_with_a_sentence() {
    let pki = Pki::new("badstart");
    let (cert, _) = pki.leaf("one");
    let (_, other_key) = pki.leaf("two");
    let out = Command::new(env!("CARGO_BIN_EXE_chatloop"))
        .args(["--port", "0", "--tls-cert", cert.to_str().unwrap()])
        .args(["--tls-key", other_key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("do not make a pair"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_chatloop"))
        .args(["--port", "0", "--tls-cert", cert.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-key"));
}

#[test]
fn hostile_tls_clients_are_closed_and_a_bystander_is_not_slowed() {
    let pki = Pki::new("hostile");
    let (cert, key) = pki.leaf("server");
    let s = start_tls(&cert, &key, &["--request-timeout", "2s"]);
    let cfg = pki.client_config();
    let a = session(&s, &cfg, "bystander");
    let room = room(&s, &cfg, &a);
    let (mut by, _) = Wss::join(&s, &cfg, &room, &a);
    let hello = client_hello(&cfg);
    let base = metric(&s, &cfg, "chatloop_connections");

    // Slow handshakes: half a ClientHello each, then nothing. Held open meanwhile.
    let mut slow: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut t = TcpStream::connect(s.addr).unwrap();
            t.write_all(&hello[..hello.len() / 2]).unwrap();
            t
        })
        .collect();
    // Silent connections: TCP only, no byte at all.
    let mut silent: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(s.addr).unwrap())
        .collect();
    by.roundtrip("fine while handshakes hang");

    // Garbage: a handshake record that decodes to nothing, and bytes that are no TLS at all.
    let mut bad_record = TcpStream::connect(s.addr).unwrap();
    bad_record.write_all(b"\x16\x03\x01\x00\x05hello").unwrap();
    let mut noise = TcpStream::connect(s.addr).unwrap();
    noise
        .write_all(&[0x00, 0xff, 0x13, 0x37, 0x42, 0x99, 0x01, 0x02])
        .unwrap();
    let mut oversized = TcpStream::connect(s.addr).unwrap();
    oversized.write_all(b"\x16\x03\x01\xff\xff").unwrap();
    for (name, t) in [
        ("bad handshake record", &mut bad_record),
        ("noise", &mut noise),
        ("oversized record", &mut oversized),
    ] {
        let took = ends_within(t, Duration::from_secs(5));
        assert!(
            took.is_some_and(|d| d < Duration::from_millis(1500)),
            "{name}: not closed promptly ({took:?})"
        );
    }
    // Plaintext HTTP on the TLS port: a plain 400 saying so, then close.
    let mut plain = TcpStream::connect(s.addr).unwrap();
    plain.set_read_timeout(Some(TIMEOUT)).unwrap();
    plain
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("https://"), "{answer}");

    // Reset mid-handshake: the ClientHello is sent, the server's answer arrives unread,
    // and the socket is closed (unread data: the kernel sends a RST).
    for _ in 0..10 {
        let mut t = TcpStream::connect(s.addr).unwrap();
        t.write_all(&hello).unwrap();
        thread::sleep(Duration::from_millis(20));
        drop(t);
    }
    by.roundtrip("fine after garbage and resets");
    let r = https(&s, &cfg, "GET", "/health", None);
    assert_eq!(r.status, 200);

    // The request timeout covers the handshake: hanging handshakes and silent sockets are
    // closed after --request-timeout (2 s), not before.
    let t = Instant::now();
    for h in slow.iter_mut().chain(silent.iter_mut()) {
        let left = Duration::from_secs(6).saturating_sub(t.elapsed());
        assert!(
            ends_within(h, left).is_some(),
            "a hanging handshake was not closed"
        );
    }
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "handshakes were cut before --request-timeout ({:?})",
        t.elapsed()
    );
    by.roundtrip("fine after the timeouts");
    // Everything the attackers opened is gone: only the bystander (and this request).
    assert!(
        wait_for(TIMEOUT, || metric(&s, &cfg, "chatloop_connections") <= base).is_some(),
        "hostile connections still open: {} (base {base})",
        metric(&s, &cfg, "chatloop_connections")
    );
}

/// Reads (plaintext, over TLS) until the server ends the connection; what came and how long
/// it took, if it ended within `limit`.
fn tls_ends_within(s: &mut Tls, limit: Duration) -> Option<(Vec<u8>, Duration)> {
    let t = Instant::now();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(t.elapsed());
        if left.is_zero() {
            return None;
        }
        s.sock.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut chunk) {
            Ok(0) => return Some((got, t.elapsed())),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None;
            }
            // A reset, or the end without close_notify: ended too.
            Err(_) => return Some((got, t.elapsed())),
        }
    }
}

#[test]
fn slow_requests_after_a_finished_tls_handshake_are_bounded_by_the_request_timeout() {
    let pki = Pki::new("slowreq");
    let (cert, key) = pki.leaf("server");
    let s = start_tls(&cert, &key, &["--request-timeout", "2s"]);
    let cfg = pki.client_config();
    let a = session(&s, &cfg, "bystander");
    let room = room(&s, &cfg, &a);
    let (mut by, _) = Wss::join(&s, &cfg, &room, &a);
    let base = metric(&s, &cfg, "chatloop_connections");

    // Handshake done, then: nothing at all; half a request head; a head dripped a byte at a
    // time (each byte its own TLS record) that never ends.
    let mut silent: Vec<Tls> = (0..5).map(|_| connect(s.addr, &cfg)).collect();
    let mut half: Vec<Tls> = (0..5)
        .map(|_| {
            let mut t = connect(s.addr, &cfg);
            t.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
            t.flush().unwrap();
            t
        })
        .collect();
    let start = Instant::now();
    let drippers: Vec<_> = (0..3)
        .map(|_| {
            let mut t = connect(s.addr, &cfg);
            thread::spawn(move || {
                let head = b"GET /health HTTP/1.1\r\nX-Filler: ".iter().copied();
                for b in head.chain(std::iter::repeat(b'a')) {
                    if start.elapsed() > Duration::from_secs(8) {
                        return (t, None);
                    }
                    if t.write_all(&[b]).and_then(|_| t.flush()).is_err() {
                        // The server has closed it (the write after its close is refused).
                        return (t, Some(start.elapsed()));
                    }
                    thread::sleep(Duration::from_millis(200));
                }
                unreachable!()
            })
        })
        .collect();
    by.roundtrip("fine while requests hang over TLS");

    let mut ended = Vec::new();
    for (name, t) in silent
        .iter_mut()
        .map(|t| ("silent after the handshake", t))
        .chain(half.iter_mut().map(|t| ("half a head", t)))
    {
        let left = Duration::from_secs(7).saturating_sub(start.elapsed());
        let r = tls_ends_within(t, left);
        assert!(
            r.is_some(),
            "{name}: still open after 7 s (--request-timeout 2s)"
        );
        ended.push((name, r.unwrap().0));
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "closed before --request-timeout ({took:?})"
    );
    for (name, got) in &ended {
        if *name == "half a head" {
            let text = String::from_utf8_lossy(got);
            assert!(text.starts_with("HTTP/1.1 408 "), "{name}: {text}");
        }
    }
    for d in drippers {
        let (mut t, cut) = d.join().unwrap();
        let r = tls_ends_within(&mut t, Duration::from_secs(2));
        assert!(
            cut.is_some() || r.is_some(),
            "a request head dripped a byte per 200 ms was not cut in 8 s"
        );
        // Its 408 may be lost to the reset our later bytes caused.
        if let Some((got, _)) = r {
            let text = String::from_utf8_lossy(&got);
            assert!(
                text.is_empty() || text.starts_with("HTTP/1.1 408 "),
                "{text}"
            );
        }
    }
    by.roundtrip("fine after the timeouts");
    assert!(
        wait_for(TIMEOUT, || metric(&s, &cfg, "chatloop_connections") <= base).is_some(),
        "slow TLS connections still open: {} (base {base})",
        metric(&s, &cfg, "chatloop_connections")
    );
}

#[test]
fn a_wss_member_that_never_reads_is_closed_as_a_slow_consumer() {
    let pki = Pki::new("slow");
    let (cert, key) = pki.leaf("server");
    let s = start_tls(
        &cert,
        &key,
        &[
            "--max-output-queue",
            "64KiB",
            "--chat-rate",
            "100000",
            "--chat-burst",
            "100000",
            "--max-chat-chars",
            "20000",
        ],
    );
    let cfg = pki.client_config();
    let a = session(&s, &cfg, "sender");
    let r = session(&s, &cfg, "sleeper");
    let room = room(&s, &cfg, &a);
    let (mut wa, _) = Wss::join(&s, &cfg, &room, &a);
    // The sleeper: TLS and WebSocket handshakes done, then it never reads again.
    let (sleeper, _) = Wss::join(&s, &cfg, &room, &r);

    let body = "x".repeat(16 * 1024 - 8);
    let start = Instant::now();
    let mut sent = 0;
    loop {
        let text = format!("{sent:08}{body}");
        wa.chat(&text);
        wa.recv_chat(&text);
        sent += 1;
        if sent % 25 == 0 && metric(&s, &cfg, "chatloop_slow_consumers_total") >= 1.0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30) && sent < 4000,
            "the sleeper was not closed after {sent} messages of 16 KiB"
        );
    }
    eprintln!("wss sleeper closed after about {sent} messages of 16 KiB");
    let mut tcp = sleeper.ws.into_inner().sock;
    assert!(
        ends_within(&mut tcp, Duration::from_secs(10)).is_some(),
        "the slow consumer's TCP connection is still open"
    );
    wa.roundtrip("the sender is fine");
    assert_eq!(
        metric(&s, &cfg, "chatloop_ws_closes_total{code=\"1013\"}"),
        1.0
    );
}

// ---- figures for the report (not a check) -----------------------------------------------

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The server's RSS in bytes and its CPU time (user + system) in microseconds.
fn sample(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024;
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<u64> = stat
        .rsplit(") ")
        .next()
        .unwrap()
        .split(' ')
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // Fields 14 and 15 (utime, stime) in clock ticks; the slice starts at field 3.
    let ticks = f[11] + f[12];
    (rss, ticks * 1_000_000 / 100)
}

fn new_session(s: &Server, cfg: Option<&Arc<ClientConfig>>, name: &str) -> String {
    match cfg {
        Some(cfg) => session(s, cfg, name),
        None => s.session(name).0,
    }
}

fn new_room(s: &Server, cfg: Option<&Arc<ClientConfig>>, sid: &str) -> String {
    match cfg {
        Some(cfg) => room(s, cfg, sid),
        None => s.room(sid),
    }
}

/// A member socket of either kind, for the same measurement over ws and wss.
enum Member {
    Plain(Box<WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>>),
    Tls(Box<WebSocket<Tls>>),
}

impl Member {
    fn join(s: &Server, cfg: Option<&Arc<ClientConfig>>, room: &str, sid: &str) -> Member {
        match cfg {
            Some(cfg) => Member::Tls(Box::new(Wss::join(s, cfg, room, sid).0.ws)),
            None => Member::Plain(Box::new(s.join(room, sid).0.socket)),
        }
    }

    fn read(&mut self) -> Message {
        match self {
            Member::Plain(w) => w.read().expect("read ws"),
            Member::Tls(w) => w.read().expect("read wss"),
        }
    }

    fn send(&mut self, m: Message) {
        match self {
            Member::Plain(w) => w.send(m).expect("send ws"),
            Member::Tls(w) => w.send(m).expect("send wss"),
        }
    }
}

/// Figures for the report, not a check: RSS per idle wss (and ws) connection, server CPU
/// per TLS handshake, server CPU per delivery over wss and ws in one run.
/// `cargo test --profile fast --test tls -- --ignored --nocapture figures`
/// (IDLE=5000 HANDSHAKES=2000 ROOMS=10 MEMBERS=50 MESSAGES=400 to change the sizes).
#[test]
#[ignore]
fn figures() {
    let pki = Pki::new("figures");
    let (cert, key) = pki.leaf("server");
    // SUITE=aes128|aes256|chacha: the one cipher suite the client offers (default: all, in
    // rustls's order, as browsers offer several).
    let mut provider = rustls::crypto::ring::default_provider();
    let pick = std::env::var("SUITE").unwrap_or_default();
    provider.cipher_suites.retain(|s| {
        let name = format!("{:?}", s.suite());
        match pick.as_str() {
            "aes128" => name.contains("AES_128_GCM"),
            "aes256" => name.contains("AES_256_GCM"),
            "chacha" => name.contains("CHACHA20"),
            _ => true,
        }
    });
    let cfg = pki.client_config_with(provider);
    // Many sockets and sessions from one address: the per-address limits are off here.
    let fast = [
        "--max-connections-per-ip",
        "0",
        "--create-rate",
        "0",
        "--max-rooms-per-session",
        "0",
        "--upgrade-rate",
        "0",
        "--chat-rate",
        "1000000",
        "--chat-burst",
        "1000000",
        "--notice-delay",
        "10ms",
    ];
    let start = |tls: bool| {
        if tls {
            start_tls(&cert, &key, &fast)
        } else {
            Server::start(&fast)
        }
    };

    // Idle memory: rooms of 100 members, 50 sockets per session.
    let idle = env_or("IDLE", 5000);
    for tls in [false, true] {
        let s = start(tls);
        let c = tls.then_some(&cfg);
        let sids: Vec<String> = (0..idle.div_ceil(50))
            .map(|i| new_session(&s, c, &format!("idle{i}")))
            .collect();
        let rooms: Vec<String> = (0..idle.div_ceil(100))
            .map(|i| new_room(&s, c, &sids[i % sids.len()]))
            .collect();
        thread::sleep(Duration::from_millis(300));
        let (before, _) = sample(s.pid());
        let held: Vec<Member> = (0..idle)
            .map(|i| Member::join(&s, c, &rooms[i % rooms.len()], &sids[i % sids.len()]))
            .collect();
        thread::sleep(Duration::from_millis(1000));
        let (after, _) = sample(s.pid());
        println!(
            "idle {}: {idle} sockets, RSS {} KiB -> {} KiB: {} bytes per connection",
            if tls { "wss" } else { "ws" },
            before / 1024,
            after / 1024,
            (after.saturating_sub(before)) / idle as u64
        );
        drop(held);
    }

    // Handshakes: sequential TLS handshakes from two threads; server CPU per handshake.
    let n = env_or("HANDSHAKES", 2000);
    let s = start(true);
    let (_, cpu0) = sample(s.pid());
    let t = Instant::now();
    thread::scope(|sc| {
        for _ in 0..2 {
            sc.spawn(|| {
                for _ in 0..n / 2 {
                    drop(connect(s.addr, &cfg));
                }
            });
        }
    });
    let wall = t.elapsed();
    let (_, cpu1) = sample(s.pid());
    println!(
        "handshakes: {n} in {:.2} s ({:.0}/s with the clients on the same 2 cores), server CPU {:.0} us per handshake",
        wall.as_secs_f64(),
        n as f64 / wall.as_secs_f64(),
        (cpu1 - cpu0) as f64 / n as f64
    );
    drop(s);

    // Fan-out: ROOMS rooms of MEMBERS, each room's first member sends MESSAGES chats
    // (lockstep on its own echo); every member reads on its own thread.
    let (rooms_n, members, messages) = (
        env_or("ROOMS", 10),
        env_or("MEMBERS", 50),
        env_or("MESSAGES", 400),
    );
    for tls in [false, true] {
        let s = start(tls);
        let c = tls.then_some(&cfg);
        let mut senders = Vec::new();
        let mut readers = Vec::new();
        for r in 0..rooms_n {
            let sid = new_session(&s, c, &format!("room{r}"));
            let room = new_room(&s, c, &sid);
            for m in 0..members {
                let w = Member::join(&s, c, &room, &sid);
                if m == 0 {
                    senders.push(w);
                } else {
                    readers.push(w);
                }
            }
        }
        thread::sleep(Duration::from_millis(500));
        let (_, cpu0) = sample(s.pid());
        let t = Instant::now();
        thread::scope(|sc| {
            for mut w in readers.drain(..) {
                sc.spawn(move || {
                    let mut got = 0;
                    while got < messages {
                        if let Message::Text(t) = w.read()
                            && t.contains("\"type\":\"chat\"")
                        {
                            got += 1;
                        }
                    }
                });
            }
            for mut w in senders.drain(..) {
                sc.spawn(move || {
                    for i in 0..messages {
                        let text = format!("message {i:06} {}", "x".repeat(100));
                        w.send(Message::text(
                            json!({"type": "chat", "message": text}).to_string(),
                        ));
                        loop {
                            if let Message::Text(t) = w.read()
                                && t.contains(&text)
                            {
                                break;
                            }
                        }
                    }
                });
            }
        });
        let wall = t.elapsed();
        let (_, cpu1) = sample(s.pid());
        let deliveries = (rooms_n * members * messages) as f64;
        println!(
            "fan-out {}: {rooms_n}x{members}, {messages} messages per room, {deliveries} deliveries in {:.2} s: server CPU {:.3} us per delivery",
            if tls { "wss" } else { "ws" },
            wall.as_secs_f64(),
            (cpu1 - cpu0) as f64 / deliveries
        );
    }
}

// ---- rediss:// ----------------------------------------------------------------------------

/// A `redis-server` with TLS only (`--port 0 --tls-port P`), certificate from `pki`; killed
/// (by its own pid) when dropped.
struct TlsRedis {
    child: std::process::Child,
    port: u16,
}

impl TlsRedis {
    fn start(pki: &Pki) -> TlsRedis {
        let (cert, key) = pki.leaf("redis");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--tls-cert-file", cert.to_str().unwrap()])
            .args(["--tls-key-file", key.to_str().unwrap()])
            .args(["--tls-ca-cert-file", pki.path("ca.pem").to_str().unwrap()])
            .args([
                "--tls-auth-clients",
                "no",
                "--dir",
                pki.dir.to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (Debian's is built with TLS)");
        let mut r = TlsRedis { child, port };
        let up = wait_for(Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if up.is_none() {
            let _ = r.child.kill();
            panic!("redis-server did not listen on its TLS port {port}");
        }
        r
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_up(s: &Server) -> bool {
    s.http().get("/health", None).json()["redis"] == "up"
}

#[test]
fn cluster_nodes_share_rooms_through_redis_over_tls() {
    let pki = Pki::new("rediss");
    let redis = TlsRedis::start(&pki);
    let ca = pki.path("ca.pem");
    let node = || Server::start(&["--redis", &redis.url(), "--redis-ca", ca.to_str().unwrap()]);
    let (a, b) = (node(), node());
    for s in [&a, &b] {
        assert!(
            wait_for(TIMEOUT, || redis_up(s)).is_some(),
            "a node did not reach Redis over TLS:\n{}",
            s.log()
        );
    }
    // A session and a room made on one node are known on the other: they live in Redis.
    let (alice, _) = a.session("alice");
    let (bob, _) = b.session("bob");
    let room = a.room(&alice);
    let (mut wa, _) = a.join(&room, &alice);
    let (mut wb, _) = b.join(&room, &bob);
    wa.chat("across nodes, through rediss");
    assert_eq!(
        wb.recv_chat("across nodes, through rediss")["user"],
        "alice"
    );
    wb.chat("and back");
    wa.recv_chat("and back");

    // A node that does not trust Redis's certificate never gets to use it.
    let other = Pki::new("rediss-other");
    let wrong = Server::start(&[
        "--redis",
        &redis.url(),
        "--redis-ca",
        other.path("ca.pem").to_str().unwrap(),
    ]);
    assert!(
        wait_for(TIMEOUT, || wrong.log().contains("TLS with Redis failed")).is_some(),
        "no TLS failure logged:\n{}",
        wrong.log()
    );
    assert!(!redis_up(&wrong));
    assert_eq!(
        wrong
            .http()
            .post_json("/sessions", r#"{"username":"carol"}"#, None)
            .status,
        503
    );
    // A rediss:// URL without a usable CA file stops the start with a sentence.
    let out = Command::new(env!("CARGO_BIN_EXE_chatloop"))
        .args(["--port", "0", "--redis", &redis.url(), "--redis-ca"])
        .arg(pki.path("missing.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing.pem"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- PROXY protocol before TLS ------------------------------------------------------------

/// TLS over a TCP stream that already carried `before` in clear (a PROXY header).
fn connect_after(addr: SocketAddr, cfg: &Arc<ClientConfig>, before: &[&[u8]]) -> Tls {
    let mut tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(TIMEOUT)).unwrap();
    for part in before {
        tcp.write_all(part).unwrap();
        thread::sleep(Duration::from_millis(50)); // arrives in separate reads
    }
    let conn =
        ClientConnection::new(cfg.clone(), ServerName::try_from("localhost").unwrap()).unwrap();
    let mut s = StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn
            .complete_io(&mut s.sock)
            .expect("TLS handshake after the PROXY header");
    }
    s
}

#[test]
fn a_trusted_tcp_proxy_names_the_client_in_clear_before_the_tls_handshake() {
    let pki = Pki::new("proxy");
    let (cert, key) = pki.leaf("server");
    let s = start_tls(
        &cert,
        &key,
        &[
            "--trusted-proxy",
            "127.0.0.1/32",
            "--create-rate",
            "1",
            "--create-burst",
            "1",
        ],
    );
    let cfg = pki.client_config();
    let body = json!({ "username": "proxied" }).to_string();
    // 203.0.113.1: the header in one piece; one create, then its budget is spent.
    let mut a = connect_after(
        s.addr,
        &cfg,
        &[b"PROXY TCP4 203.0.113.1 127.0.0.1 40000 443\r\n"],
    );
    assert_eq!(
        request(&mut a, "POST", "/sessions", None, Some(&body)).status,
        201
    );
    assert_eq!(
        request(&mut a, "POST", "/sessions", None, Some(&body)).status,
        429
    );
    assert!(
        wait_for(TIMEOUT, || s.log().contains("for 203.0.113.1")).is_some(),
        "the 429 was not logged for the proxied client:\n{}",
        s.log()
    );
    // 203.0.113.2: the header split over two reads; a budget of its own.
    let mut b = connect_after(
        s.addr,
        &cfg,
        &[b"PROXY TCP4 203.0.", b"113.2 127.0.0.1 40001 443\r\n"],
    );
    assert_eq!(
        request(&mut b, "POST", "/sessions", None, Some(&body)).status,
        201
    );
    // A malformed header: closed before any TLS.
    let mut bad = TcpStream::connect(s.addr).unwrap();
    bad.write_all(b"PROXY TCP4 not-an-address\r\n").unwrap();
    assert!(ends_within(&mut bad, Duration::from_secs(3)).is_some());
}
