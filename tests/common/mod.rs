//! Test harness: starts the real `chatloop` binary on a free loopback port and talks to it
//! over real sockets: a small blocking HTTP/1.1 client and tungstenite WebSocket clients.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::protocol::WebSocket;
use tungstenite::{Message, stream::MaybeTlsStream};

pub const TIMEOUT: Duration = Duration::from_secs(5);

/// A running server process, killed (by its own pid) when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `chatloop --port 0 <args>` and waits for its "listening on" line.
    #[track_caller]
    pub fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chatloop"))
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
                if let Some(rest) = line.split("listening on http://").nth(1)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(rest.trim().to_string());
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(20)).expect("chatloop printed its listen address");
        Server { child, addr: addr.parse().expect("a socket address"), log }
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
        let r = self.http().post_json("/sessions", &serde_json::json!({ "username": name }).to_string(), None);
        assert_eq!(r.status, 201, "{}", r.text());
        let v = r.json();
        (v["session_id"].as_str().unwrap().to_string(), v["user_id"].as_str().unwrap().to_string())
    }

    /// `POST /rooms` → room_id.
    #[track_caller]
    pub fn room(&self, sid: &str) -> String {
        let r = self.http().request("POST", "/rooms", &[("Authorization", &format!("Bearer {sid}"))], None);
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
        let mut ws = self.ws(&format!("/ws/{room}?{query}")).expect("WebSocket upgrade accepted");
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
            Err(tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
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
    pub fn signal_and_wait(&mut self, sig: &str, limit: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status();
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
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    #[track_caller]
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
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
        Http { stream, buf: Vec::new() }
    }

    #[track_caller]
    pub fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: Option<&str>) -> Resp {
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
        self.try_read_response(head_only).expect("a complete HTTP response")
    }

    pub fn try_read_response(&mut self, head_only: bool) -> Option<Resp> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = resp.parse(&self.buf) {
                let status = resp.code?;
                let headers: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect();
                let len = headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .map_or(0, |(_, v)| v.parse().unwrap_or(0));
                let len = if head_only || status == 204 || status == 101 || status == 100 { 0 } else { len };
                while self.buf.len() < n + len {
                    self.fill()?;
                }
                let body = self.buf[n..n + len].to_vec();
                self.buf.drain(..n + len);
                return Some(Resp { status, headers, body });
            }
            self.fill()?;
        }
    }

    fn fill(&mut self) -> Option<()> {
        let mut chunk = [0u8; 16384];
        match self.stream.read(&mut chunk) {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Some(())
            }
        }
    }

    /// True when the server closed the connection (EOF within the timeout).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0)) || matches!(self.stream.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
    }
}

/// A WebSocket client.
pub struct Ws {
    pub socket: WebSocket<MaybeTlsStream<TcpStream>>,
}

impl Ws {
    #[track_caller]
    pub fn send_json(&mut self, v: Value) {
        self.socket.send(Message::text(v.to_string())).expect("send");
    }

    #[track_caller]
    pub fn send_text(&mut self, s: &str) {
        self.socket.send(Message::text(s.to_string())).expect("send");
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
                Ok(Message::Text(t)) => return serde_json::from_str(&t).map_err(|e| format!("bad JSON {t}: {e}")),
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
