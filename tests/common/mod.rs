//! Test harness: starts the real `chatloop` binary on a free loopback port and talks to it
//! over real sockets: a small blocking HTTP/1.1 client and tungstenite WebSocket clients.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::protocol::WebSocket;
use tungstenite::{Message, stream::MaybeTlsStream};

mod frame;
pub use frame::client_frame;
#[cfg(feature = "tls")]
pub mod pki;

pub const TIMEOUT: Duration = Duration::from_secs(5);

/// A running server process, killed (by its own pid) when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

/// The server binary under test: this build's, or `CHATLOOP_TEST_BIN` (to show that a new
/// test fails on an older build).
fn server_bin() -> String {
    std::env::var("CHATLOOP_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_chatloop").into())
}

impl Server {
    /// Starts `chatloop --port 0 <args>` and waits for its "listening on" line.
    #[track_caller]
    pub fn start(args: &[&str]) -> Server {
        Server::start_wrapped(&[], args)
    }

    /// Like [`Server::start`], run under `wrapper` (e.g. `["strace", "-f", ...]`): the
    /// wrapper's command line, then the binary and its arguments.
    #[track_caller]
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Server {
        let bin = server_bin();
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let mut child = cmd
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .env_remove("PORT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chatloop");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                // `listening on http://addr` (or `https://addr` with --tls-cert)
                if let Some(rest) = line.split("listening on ").nth(1).and_then(|r| {
                    r.strip_prefix("http://")
                        .or_else(|| r.strip_prefix("https://"))
                }) && let Some(tx) = tx.take()
                {
                    let _ = tx.send(rest.trim().to_string());
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .ok()
            .and_then(|a| a.parse::<SocketAddr>().ok());
        let Some(addr) = addr else {
            // Never leave a server behind when start-up goes wrong.
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chatloop did not print a listen address:\n{}",
                log.lock().unwrap()
            );
        };
        Server { child, addr, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn http(&self) -> Http {
        Http::connect(self.addr)
    }

    /// `POST /sessions` → (session_id, user_id).
    #[track_caller]
    pub fn session(&self, name: &str) -> (String, String) {
        let r = self.http().post_json(
            "/sessions",
            &serde_json::json!({ "username": name }).to_string(),
            None,
        );
        assert_eq!(r.status, 201, "{}", r.text());
        let v = r.json();
        (
            v["session_id"].as_str().unwrap().to_string(),
            v["user_id"].as_str().unwrap().to_string(),
        )
    }

    /// `POST /rooms` → room_id.
    #[track_caller]
    pub fn room(&self, sid: &str) -> String {
        let r = self.http().request(
            "POST",
            "/rooms",
            &[("Authorization", &format!("Bearer {sid}"))],
            None,
        );
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["room_id"].as_str().unwrap().to_string()
    }

    /// Opens a chat WebSocket and returns it with its `welcome` frame.
    #[track_caller]
    pub fn join(&self, room: &str, sid: &str) -> (Ws, Value) {
        self.join_query(room, &format!("session_id={sid}"))
    }

    #[track_caller]
    pub fn join_query(&self, room: &str, query: &str) -> (Ws, Value) {
        let mut ws = self
            .ws(&format!("/ws/{room}?{query}"))
            .expect("WebSocket upgrade accepted");
        let welcome = ws.recv();
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (ws, welcome)
    }

    /// Opens a WebSocket at `path`; `Err(status)` when the upgrade is refused.
    pub fn ws(&self, path: &str) -> Result<Ws, u16> {
        let stream = TcpStream::connect(self.addr).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let url = format!("ws://{}{}", self.addr, path);
        match tungstenite::client::client(url.as_str(), MaybeTlsStream::Plain(stream)) {
            Ok((socket, _)) => Ok(Ws { socket }),
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
                Err(resp.status().as_u16())
            }
            Err(e) => panic!("WebSocket handshake failed: {e}"),
        }
    }

    /// One value from `/metrics` (first sample line starting with `name`).
    #[track_caller]
    pub fn metric(&self, name: &str) -> f64 {
        let text = self.http().request("GET", "/metrics", &[], None).text();
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
    }

    /// Sends a signal to the server process and waits (bounded) for it to exit.
    pub fn signal_and_wait(
        &mut self,
        sig: &str,
        limit: Duration,
    ) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status();
        let t = Instant::now();
        while t.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }
}

/// A blocking keep-alive HTTP/1.1 client on one connection.
pub struct Http {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Http {
    pub fn connect(addr: SocketAddr) -> Http {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        Http {
            stream,
            buf: Vec::new(),
        }
    }

    #[track_caller]
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Resp {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        req.push_str("\r\n");
        if let Some(b) = body {
            req.push_str(b);
        }
        self.send_raw(req.as_bytes());
        self.read_response(method == "HEAD")
    }

    #[track_caller]
    pub fn post_json(&mut self, path: &str, body: &str, bearer: Option<&str>) -> Resp {
        let auth = bearer.map(|b| format!("Bearer {b}"));
        let mut h = vec![("Content-Type", "application/json")];
        if let Some(a) = &auth {
            h.push(("Authorization", a));
        }
        self.request("POST", path, &h, Some(body))
    }

    #[track_caller]
    pub fn get(&mut self, path: &str, bearer: Option<&str>) -> Resp {
        let auth = bearer.map(|b| format!("Bearer {b}"));
        let mut h = vec![("Content-Type", "application/json")];
        if let Some(a) = &auth {
            h.push(("Authorization", a));
        }
        self.request("GET", path, &h, None)
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send request");
    }

    /// Reads one response (Content-Length framed).
    #[track_caller]
    pub fn read_response(&mut self, head_only: bool) -> Resp {
        self.try_read_response(head_only)
            .expect("a complete HTTP response")
    }

    pub fn try_read_response(&mut self, head_only: bool) -> Option<Resp> {
        read_http_response(&mut self.stream, &mut self.buf, head_only)
    }

    /// True when the server closed the connection (EOF within the timeout).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0))
            || matches!(self.stream.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
    }
}

/// A WebSocket client.
pub struct Ws {
    pub socket: WebSocket<MaybeTlsStream<TcpStream>>,
}

impl Ws {
    #[track_caller]
    pub fn send_json(&mut self, v: Value) {
        self.socket
            .send(Message::text(v.to_string()))
            .expect("send");
    }

    #[track_caller]
    pub fn send_text(&mut self, s: &str) {
        self.socket
            .send(Message::text(s.to_string()))
            .expect("send");
    }

    #[track_caller]
    pub fn chat(&mut self, text: &str) {
        self.send_json(serde_json::json!({"type": "chat", "message": text}));
    }

    /// The next JSON text message (pings are answered by tungstenite).
    #[track_caller]
    pub fn recv(&mut self) -> Value {
        match self.try_recv() {
            Ok(v) => v,
            Err(e) => panic!("expected a message: {e}"),
        }
    }

    pub fn try_recv(&mut self) -> Result<Value, String> {
        loop {
            match self.socket.read() {
                Ok(Message::Text(t)) => {
                    return serde_json::from_str(&t).map_err(|e| format!("bad JSON {t}: {e}"));
                }
                Ok(Message::Close(c)) => return Err(format!("closed: {c:?}")),
                Ok(_) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Reads until a message of this type arrives, returning it.
    #[track_caller]
    pub fn recv_type(&mut self, kind: &str) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            let v = self.recv();
            if v["type"] == kind {
                return v;
            }
        }
        panic!("no {kind} message in time");
    }

    /// Asserts nothing arrives for `wait`.
    #[track_caller]
    pub fn expect_silence(&mut self, wait: Duration) {
        self.set_timeout(wait);
        match self.socket.read() {
            Ok(Message::Text(t)) => panic!("expected silence, got {t}"),
            Ok(m) if !m.is_ping() && !m.is_pong() => panic!("expected silence, got {m:?}"),
            _ => {}
        }
        self.set_timeout(TIMEOUT);
    }

    /// Reads until the server closes; returns its close code.
    pub fn close_code(&mut self) -> Option<u16> {
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            match self.socket.read() {
                Ok(Message::Close(Some(c))) => return Some(c.code.into()),
                Ok(Message::Close(None)) => return Some(1005),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    }

    pub fn set_timeout(&mut self, t: Duration) {
        if let MaybeTlsStream::Plain(s) = self.socket.get_mut() {
            s.set_read_timeout(Some(t)).unwrap();
        }
    }
}

// ---- Helpers added for the contract tests -------------------------------------------------

/// `Bearer <sid>`, the value of an `Authorization` header.
pub fn bearer(sid: &str) -> String {
    format!("Bearer {sid}")
}

impl Http {
    /// `method path` with an optional bearer token and no body.
    #[track_caller]
    pub fn call(&mut self, method: &str, path: &str, sid: Option<&str>) -> Resp {
        let auth = sid.map(bearer);
        let h: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        self.request(method, path, &h, None)
    }
}

/// True for `len` lowercase hex characters.
pub fn is_lower_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The version nibble of a canonical lowercase UUID (`8-4-4-4-12`), or `None` if `s` is not one.
pub fn uuid_version(s: &str) -> Option<u8> {
    let parts: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    if parts.len() != 5 || parts.iter().zip(lens).any(|(p, n)| !is_lower_hex(p, n)) {
        return None;
    }
    u8::from_str_radix(&parts[2][..1], 16).ok()
}

/// True for a timestamp shaped `^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$`.
pub fn is_timestamp(s: &str) -> bool {
    let shape = "dddd-dd-ddTdd:dd:dd.ddddddZ";
    s.len() == shape.len()
        && s.bytes().zip(shape.bytes()).all(|(c, p)| {
            if p == b'd' {
                c.is_ascii_digit()
            } else {
                c == p
            }
        })
}

/// A WebSocket client on a raw `TcpStream`: a hand-made handshake and hand-made frames, for
/// sending what a well-behaved library refuses to send (unmasked frames, bad UTF-8, ...).
pub struct RawWs {
    pub stream: TcpStream,
    /// Bytes read and not yet parsed into frames.
    pub buf: Vec<u8>,
}

/// A frame read by [`RawWs`]: opcode and payload (unmasked).
#[derive(Debug)]
pub struct RawFrame {
    /// The whole first byte: FIN, RSV1-3 and the opcode.
    pub first: u8,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The close code of a close frame (1005 when it has none).
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8).then(|| match self.payload.get(..2) {
            Some(c) => u16::from_be_bytes([c[0], c[1]]),
            None => 1005,
        })
    }
}

impl Server {
    /// Polls `GET /rooms/{room}` until its `user_count` is `n` (panics after [`TIMEOUT`]).
    #[track_caller]
    pub fn wait_user_count(&self, room: &str, n: u64) {
        let deadline = Instant::now() + TIMEOUT;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            last = self.http().get(&format!("/rooms/{room}"), None).json();
            if last["user_count"] == n {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("user_count of {room} never became {n}: {last}");
    }

    /// Upgrades `path` by hand and asserts the 101 and its `Sec-WebSocket-Accept`; any bytes
    /// after the head are kept.
    #[track_caller]
    pub fn raw_ws(&self, path: &str) -> RawWs {
        let (ws, head) = self.raw_ws_with(path, "");
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "bad Sec-WebSocket-Accept: {head}"
        );
        ws
    }

    /// Upgrades `path` by hand with `extra` header lines (`Name: value\r\n` each) and asserts
    /// the 101; returns the socket (bytes after the head kept) and the 101's head.
    #[track_caller]
    pub fn raw_ws_with(&self, path: &str, extra: &str) -> (RawWs, String) {
        let mut stream = TcpStream::connect(self.addr).expect("connect");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        );
        stream.write_all(req.as_bytes()).expect("send handshake");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = stream.read(&mut chunk).expect("read handshake response");
            assert!(
                n > 0,
                "connection closed during the handshake: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        buf.drain(..end);
        (RawWs { stream, buf }, head)
    }
}

impl RawWs {
    /// Sends one frame with FIN set; `masked` chooses whether the client mask is applied.
    pub fn send_frame(&mut self, opcode: u8, payload: &[u8], masked: bool) {
        self.send_first_byte(0x80 | opcode, payload, masked);
    }

    /// Sends one frame whose first byte (FIN, RSV bits, opcode) is `first`, e.g. `0x01` for the
    /// first fragment of a text message, `0x80` for the last continuation.
    pub fn send_first_byte(&mut self, first: u8, payload: &[u8], masked: bool) {
        let f = client_frame(first, payload, masked.then_some([0x37, 0xfa, 0x21, 0x3d]));
        // The server may already have closed the socket; the caller checks what comes back.
        let _ = self.stream.write_all(&f);
    }

    /// Reads one frame; `None` on EOF, error or timeout.
    pub fn read_frame(&mut self) -> Option<RawFrame> {
        loop {
            if let Some((frame, used)) = Self::parse(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let mut chunk = [0u8; 16384];
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn parse(b: &[u8]) -> Option<(RawFrame, usize)> {
        if b.len() < 2 {
            return None;
        }
        let (mut len, mut at) = ((b[1] & 0x7f) as usize, 2);
        if len == 126 {
            len = u16::from_be_bytes(b.get(2..4)?.try_into().ok()?) as usize;
            at = 4;
        } else if len == 127 {
            len = u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize;
            at = 10;
        }
        let mask = if b[1] & 0x80 != 0 {
            at += 4;
            Some(<[u8; 4]>::try_from(b.get(at - 4..at)?).ok()?)
        } else {
            None
        };
        let mut payload = b.get(at..at + len)?.to_vec();
        if let Some(k) = mask {
            payload
                .iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x ^= k[i % 4]);
        }
        Some((
            RawFrame {
                first: b[0],
                opcode: b[0] & 0x0f,
                payload,
            },
            at + len,
        ))
    }

    /// The next text frame, parsed as JSON (other frames are skipped; panics on close/EOF).
    #[track_caller]
    pub fn recv(&mut self) -> Value {
        loop {
            let f = self.read_frame().expect("a frame from the server");
            match f.opcode {
                1 => return serde_json::from_slice(&f.payload).expect("a JSON text frame"),
                8 => panic!("expected a text frame, got close {:?}", f.close_code()),
                _ => continue,
            }
        }
    }

    /// Reads until a close frame and returns its code; `None` if the socket ended without one.
    pub fn close_code(&mut self) -> Option<u16> {
        while let Some(f) = self.read_frame() {
            if f.opcode == 8 {
                return f.close_code();
            }
        }
        None
    }
}

// ---- Helpers added for the lifetime and limit tests ---------------------------------------

/// Polls `cond` every 10 ms for up to `limit`; returns how long it took, `None` if it never held.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let t = Instant::now();
    loop {
        if cond() {
            return Some(t.elapsed());
        }
        if t.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Server {
    /// The status of `GET path` on a fresh connection (no auth).
    #[track_caller]
    pub fn status(&self, path: &str) -> u16 {
        self.http().get(path, None).status
    }

    /// The whole `/metrics` text.
    #[track_caller]
    pub fn metrics_text(&self) -> String {
        let r = self.http().request("GET", "/metrics", &[], None);
        assert_eq!(r.status, 200, "{}", r.text());
        r.text()
    }
}

/// One sample from Prometheus text: the line `name value` (name may carry labels).
#[track_caller]
pub fn metric_in(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
}

impl Ws {
    /// The next JSON text message within `wait`, or `None` (timeout, close or error).
    pub fn recv_within(&mut self, wait: Duration) -> Option<Value> {
        self.set_timeout(wait);
        let r = self.try_recv().ok();
        self.set_timeout(TIMEOUT);
        r
    }

    /// Every JSON text message until nothing arrives for `quiet`.
    pub fn drain(&mut self, quiet: Duration) -> Vec<Value> {
        let mut all = Vec::new();
        while let Some(v) = self.recv_within(quiet) {
            all.push(v);
        }
        all
    }

    /// Reads until the `chat` frame carrying exactly `text` arrives (within [`TIMEOUT`]).
    #[track_caller]
    pub fn recv_chat(&mut self, text: &str) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            match self.try_recv() {
                Ok(v) if v["type"] == "chat" && v["message"] == text => return v,
                Ok(_) => {}
                Err(e) => panic!("waiting for chat {text:?}: {e}"),
            }
        }
        panic!("chat {text:?} did not come back in time");
    }

    /// Sends a chat and asserts it comes back to this (well-behaved) client promptly.
    #[track_caller]
    pub fn chat_roundtrip(&mut self, text: &str) -> Value {
        let t = Instant::now();
        self.chat(text);
        let v = self.recv_chat(text);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "chat took {:?} to come back",
            t.elapsed()
        );
        v
    }
}

impl RawWs {
    /// Reads (and discards) until the server ends the TCP connection; true if it did within `limit`.
    pub fn ends_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut chunk = [0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

impl Http {
    /// `GET path`, or `None` when the connection fails or closes before a response.
    pub fn try_get(&mut self, path: &str) -> Option<Resp> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
        self.stream.write_all(req.as_bytes()).ok()?;
        self.try_read_response(false)
    }
}

// ---- Helpers for per-address and memory tests ----------------------------------------------

/// A TCP connection to `addr` whose client side is bound to the loopback address `src`
/// (e.g. "127.0.0.2": all of 127.0.0.0/8 is loopback), so the server sees another client IP.
#[track_caller]
pub fn connect_from(addr: SocketAddr, src: &str) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let src: std::net::IpAddr = src.parse().expect("a source address");
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::new(src, 0).into())
        .expect("bind the client side");
    socket.connect(&addr.into()).expect("connect");
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
}

impl Http {
    /// A keep-alive client whose connection comes from the loopback address `src`.
    pub fn connect_from(addr: SocketAddr, src: &str) -> Http {
        Http {
            stream: connect_from(addr, src),
            buf: Vec::new(),
        }
    }
}

/// The resident memory of process `pid` in KiB (`VmRSS` in /proc/PID/status).
#[track_caller]
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line")
}

// ---- Bystanders and attackers on other loopback addresses --------------------------------

/// The address of a well-behaved bystander: the server sees it as another client.
pub const BYSTANDER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

impl Server {
    /// A keep-alive HTTP client connecting from `from`.
    pub fn http_from(&self, from: IpAddr) -> Http {
        Http::connect_from(self.addr, &from.to_string())
    }

    /// `POST /sessions` from `from` → (session_id, user_id).
    #[track_caller]
    pub fn session_from(&self, from: IpAddr, name: &str) -> (String, String) {
        let r = self.http_from(from).post_json(
            "/sessions",
            &serde_json::json!({ "username": name }).to_string(),
            None,
        );
        assert_eq!(r.status, 201, "{}", r.text());
        let v = r.json();
        (
            v["session_id"].as_str().unwrap().to_string(),
            v["user_id"].as_str().unwrap().to_string(),
        )
    }

    /// Opens a chat WebSocket from `from` and returns it with its `welcome` frame.
    #[track_caller]
    pub fn join_from(&self, from: IpAddr, room: &str, sid: &str) -> (Ws, Value) {
        let stream = connect_from(self.addr, &from.to_string());
        let url = format!("ws://{}/ws/{room}?session_id={sid}", self.addr);
        let (socket, _) = tungstenite::client::client(url.as_str(), MaybeTlsStream::Plain(stream))
            .expect("WebSocket upgrade accepted");
        let mut ws = Ws { socket };
        let welcome = ws.recv();
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (ws, welcome)
    }

    /// Opens a WebSocket at `path` (any query) from `from`; `Err(status)` when the upgrade
    /// is refused with an HTTP status.
    pub fn ws_from(&self, from: IpAddr, path: &str) -> Result<Ws, u16> {
        let stream = connect_from(self.addr, &from.to_string());
        let url = format!("ws://{}{path}", self.addr);
        match tungstenite::client::client(url.as_str(), MaybeTlsStream::Plain(stream)) {
            Ok((socket, _)) => Ok(Ws { socket }),
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
                Err(resp.status().as_u16())
            }
            Err(e) => panic!("WebSocket handshake from {from} failed: {e}"),
        }
    }

    /// Resident memory of the server process (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }
}

/// Reads one HTTP response (Content-Length framed; no body for HEAD, 100, 101 and 204) from
/// `r`, with `buf` holding what was read before and keeping what follows the response.
/// `None` on EOF, error or timeout before the response is complete.
pub fn read_http_response(r: &mut impl Read, buf: &mut Vec<u8>, head_only: bool) -> Option<Resp> {
    let fill = |r: &mut dyn Read, buf: &mut Vec<u8>| -> Option<()> {
        let mut chunk = [0u8; 16384];
        match r.read(&mut chunk) {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                Some(())
            }
        }
    };
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(n)) = resp.parse(buf) {
            let status = resp.code?;
            let headers: Vec<(String, String)> = resp
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_string(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            let len = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .map_or(0, |(_, v)| v.parse().unwrap_or(0));
            let len = if head_only || status == 204 || status == 101 || status == 100 {
                0
            } else {
                len
            };
            while buf.len() < n + len {
                fill(r, buf)?;
            }
            let body = buf[n..n + len].to_vec();
            buf.drain(..n + len);
            return Some(Resp {
                status,
                headers,
                body,
            });
        }
        fill(r, buf)?;
    }
}

/// Every answer a session that is not a member (`sid`) gets about a private `room`, trying
/// `invite` to join: (what, status, body). A private room must look the same as a room that
/// does not exist.
pub fn outsider_view(
    s: &Server,
    room: &str,
    sid: &str,
    invite: &str,
) -> Vec<(String, u16, String)> {
    let mut out = Vec::new();
    let mut h = s.http();
    let mut push = |what: &str, r: Resp| out.push((what.to_string(), r.status, r.text()));
    push("GET room, no token", h.get(&format!("/rooms/{room}"), None));
    push("GET room", h.get(&format!("/rooms/{room}"), Some(sid)));
    push(
        "GET messages",
        h.get(&format!("/rooms/{room}/messages"), Some(sid)),
    );
    push(
        "join, no body",
        h.call("POST", &format!("/rooms/{room}/join"), Some(sid)),
    );
    let body = serde_json::json!({ "invite": invite }).to_string();
    push(
        "join, invite",
        h.post_json(&format!("/rooms/{room}/join"), &body, Some(sid)),
    );
    push(
        "rotate",
        h.call("POST", &format!("/rooms/{room}/invite"), Some(sid)),
    );
    let ws = match s.ws(&format!("/ws/{room}?session_id={sid}")) {
        Ok(_) => 101,
        Err(code) => code,
    };
    out.push(("WebSocket".into(), ws, String::new()));
    out
}
