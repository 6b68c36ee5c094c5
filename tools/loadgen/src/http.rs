//! Blocking keep-alive HTTP/1.1 client for scenario set-up (sessions, rooms), with timeouts,
//! plus the response-head parsing shared with the `rest` scenario.

use crate::tls::Blocking;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(10);

pub struct Client {
    addr: SocketAddrV4,
    /// Plain or TLS (`--tls`).
    conn: Option<Blocking>,
    buf: Vec<u8>,
}

/// A parsed response head: status, body length, whether the server will close.
#[derive(Debug, PartialEq)]
pub struct Head {
    pub status: u16,
    pub head_len: usize,
    pub content_length: usize,
    pub close: bool,
}

/// Parses a response head at the front of `buf`. `Ok(None)`: incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > 64 << 10 => {
            return Err("response head over 64 KiB".into());
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("bad HTTP response: {e}")),
    };
    let mut content_length = None;
    let mut close = resp.version == Some(0);
    for h in resp.headers.iter() {
        let v = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                v.parse::<usize>()
                    .map_err(|_| format!("bad Content-Length {v:?}"))?,
            );
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = v.eq_ignore_ascii_case("close");
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(format!(
                "unexpected Transfer-Encoding {v:?} (the contract says Content-Length)"
            ));
        }
    }
    let status = resp.code.unwrap_or(0);
    let content_length = match content_length {
        Some(n) => n,
        None if status == 204 || status == 304 || status / 100 == 1 => 0,
        None => return Err(format!("HTTP {status} response without Content-Length")),
    };
    Ok(Some(Head {
        status,
        head_len,
        content_length,
        close,
    }))
}

pub fn request_bytes(
    method: &str,
    path: &str,
    host: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    if let Some(b) = bearer {
        r.push_str(&format!("Authorization: Bearer {b}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" {
        r.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    r.push_str("\r\n");
    r.push_str(body);
    r.into_bytes()
}

impl Client {
    pub fn new(addr: SocketAddrV4) -> Client {
        Client {
            addr,
            conn: None,
            buf: Vec::new(),
        }
    }

    fn connect(&mut self) -> Result<&mut Blocking, String> {
        if self.conn.is_none() {
            let s = TcpStream::connect_timeout(&self.addr.into(), TIMEOUT)
                .map_err(|e| format!("connect {}: {e}", self.addr))?;
            s.set_read_timeout(Some(TIMEOUT))
                .map_err(|e| e.to_string())?;
            s.set_write_timeout(Some(TIMEOUT))
                .map_err(|e| e.to_string())?;
            let _ = s.set_nodelay(true);
            self.buf.clear();
            self.conn = Some(Blocking::new(s, *self.addr.ip()).map_err(|e| format!("TLS: {e}"))?);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| "no connection".to_string())
    }

    /// Sends one request; retries once on a fresh connection if the kept-alive one was dropped.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<&str>,
    ) -> Result<(u16, Vec<u8>), String> {
        let req = request_bytes(method, path, &self.addr.to_string(), bearer, body);
        match self.try_request(&req) {
            Ok(r) => Ok(r),
            Err(_) => {
                self.conn = None;
                self.try_request(&req)
                    .map_err(|e| format!("{method} {path}: {e}"))
            }
        }
    }

    fn try_request(&mut self, req: &[u8]) -> Result<(u16, Vec<u8>), String> {
        self.connect()?
            .write_all(req)
            .map_err(|e| format!("write: {e}"))?;
        let mut chunk = [0u8; 16384];
        loop {
            if let Some(h) = parse_head(&self.buf)? {
                let end = h.head_len + h.content_length;
                if self.buf.len() >= end {
                    let body = self.buf[h.head_len..end].to_vec();
                    self.buf.drain(..end);
                    if h.close {
                        self.conn = None;
                    }
                    return Ok((h.status, body));
                }
            }
            let conn = self.conn.as_mut().ok_or("connection lost")?;
            let n = conn.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                self.conn = None;
                return Err("server closed the connection before answering".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends a request, requires status `want`, returns the body as JSON.
    pub fn json(
        &mut self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<&str>,
        want: u16,
    ) -> Result<Value, String> {
        let (status, body) = self.request(method, path, bearer, body)?;
        let text = String::from_utf8_lossy(&body);
        if status != want {
            return Err(format!(
                "{method} {path}: HTTP {status} (wanted {want}): {text}"
            ));
        }
        serde_json::from_slice(&body)
            .map_err(|e| format!("{method} {path}: body is not JSON ({e}): {text}"))
    }

    /// POST /sessions; returns the session id.
    pub fn create_session(&mut self, username: &str) -> Result<String, String> {
        let body = serde_json::json!({ "username": username }).to_string();
        let v = self.json("POST", "/sessions", None, Some(&body), 201)?;
        v.get("session_id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("POST /sessions: no session_id in {v}"))
    }

    /// POST /rooms as `session`; returns the room id.
    pub fn create_room(&mut self, session: &str) -> Result<String, String> {
        let v = self.json("POST", "/rooms", Some(session), None, 201)?;
        v.get("room_id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("POST /rooms: no room_id in {v}"))
    }
}

/// Creates `n` sessions over `parallel` keep-alive connections (threads), names `prefix-i`.
pub fn create_sessions(
    addr: SocketAddrV4,
    n: usize,
    prefix: &str,
    parallel: usize,
) -> Result<Vec<String>, String> {
    let parallel = parallel.clamp(1, 16).min(n.max(1));
    let handles: Vec<_> = (0..parallel)
        .map(|t| {
            let prefix = prefix.to_string();
            std::thread::spawn(move || -> Result<Vec<(usize, String)>, String> {
                let mut c = Client::new(addr);
                (t..n)
                    .step_by(parallel)
                    .map(|i| c.create_session(&format!("{prefix}-{i}")).map(|s| (i, s)))
                    .collect()
            })
        })
        .collect();
    let mut all = vec![String::new(); n];
    for h in handles {
        for (i, s) in h.join().map_err(|_| "session-creating thread panicked")?? {
            all[i] = s;
        }
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let r = b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello";
        let h = parse_head(r).unwrap().unwrap();
        assert_eq!(
            h,
            Head {
                status: 201,
                head_len: r.len() - 5,
                content_length: 5,
                close: false
            }
        );
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap(), None);
        let c = parse_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(c.close);
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert_eq!(
            parse_head(b"HTTP/1.1 204 No Content\r\n\r\n")
                .unwrap()
                .unwrap()
                .content_length,
            0
        );
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn request_text() {
        let r = request_bytes("POST", "/rooms", "h:1", Some("abc"), None);
        let s = String::from_utf8(r).unwrap();
        assert!(
            s.starts_with("POST /rooms HTTP/1.1\r\nHost: h:1\r\nAuthorization: Bearer abc\r\n")
        );
        assert!(s.ends_with("Content-Length: 0\r\n\r\n"));
    }

    #[test]
    fn against_a_fake_server() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = match l.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            for _ in 0..2 {
                let _ = s.read(&mut buf).unwrap();
                let body = r#"{"session_id":"s1","username":"x","user_id":"00000000"}"#;
                let resp = format!(
                    "HTTP/1.1 201 Created\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(resp.as_bytes()).unwrap();
            }
        });
        let mut c = Client::new(addr);
        assert_eq!(c.create_session("alice").unwrap(), "s1");
        assert_eq!(c.create_session("bob").unwrap(), "s1");
    }
}
