//! A non-blocking WebSocket client connection driven by mio readiness events.
//! Register it for READABLE | WRITABLE once (edge-triggered) and call `on_ready` on every event.

use crate::tls::Stream;
use crate::ws::{self, Rng};
use mio::net::TcpStream;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};

/// Largest server message accepted (frames and reassembled fragments).
const MAX_MESSAGE: usize = 16 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Connecting,
    Handshake,
    Open,
    /// We sent a close frame and wait for the server's.
    Closing,
    Closed,
}

pub enum WsEvent<'a> {
    /// The 101 answer was received and checked.
    Open,
    /// One complete text message.
    Text(&'a [u8]),
    /// The server sent a close frame (code if any); the connection is finished.
    Closed(Option<u16>),
}

pub struct WsClient {
    /// The socket, plain or TLS (`--tls`).
    pub stream: Stream,
    state: State,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    expected_accept: String,
    frag: Option<Vec<u8>>,
    rng: Rng,
    pub close_code: Option<u16>,
    pub bytes_in: u64,
    pub pings: u64,
}

impl WsClient {
    /// Starts connecting to `dst` (optionally from `src`) and queues the upgrade request for `path`.
    pub fn connect(
        dst: SocketAddrV4,
        src: Option<Ipv4Addr>,
        path: &str,
        seed: u64,
    ) -> Result<WsClient, String> {
        let tcp =
            crate::sys::connect_nonblocking(dst, src).map_err(|e| format!("connect {dst}: {e}"))?;
        let stream = Stream::new(tcp, *dst.ip()).map_err(|e| format!("TLS: {e}"))?;
        let mut rng = Rng::new(seed);
        let key = ws::new_key(&mut rng);
        let wbuf = ws::handshake_request(&dst.to_string(), path, &key);
        Ok(WsClient {
            stream,
            state: State::Connecting,
            rbuf: Vec::new(),
            wbuf,
            wpos: 0,
            expected_accept: ws::accept_key(&key),
            frag: None,
            rng,
            close_code: None,
            bytes_in: 0,
            pings: 0,
        })
    }

    /// Wraps a stream whose WebSocket handshake is already done (kernel-floor benchmark).
    pub fn from_open(stream: TcpStream, seed: u64) -> WsClient {
        WsClient {
            stream: Stream::plain(stream),
            state: State::Open,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            expected_accept: String::new(),
            frag: None,
            rng: Rng::new(seed),
            close_code: None,
            bytes_in: 0,
            pings: 0,
        }
    }

    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    pub fn register(&mut self, reg: &mio::Registry, token: mio::Token) -> Result<(), String> {
        reg.register(
            &mut self.stream.tcp,
            token,
            mio::Interest::READABLE | mio::Interest::WRITABLE,
        )
        .map_err(|e| format!("epoll register: {e}"))
    }

    pub fn deregister(&mut self, reg: &mio::Registry) {
        let _ = reg.deregister(&mut self.stream.tcp);
    }

    /// Bytes queued but not yet accepted by the kernel (TLS: at least 1 while rustls holds
    /// records the socket has not taken yet).
    pub fn pending_out(&self) -> usize {
        self.wbuf.len() - self.wpos + usize::from(self.stream.tls_pending())
    }

    pub fn send_text(&mut self, payload: &[u8]) -> Result<(), String> {
        self.send_frame(ws::OP_TEXT, payload)
    }

    /// Sends a close frame with `code`; the connection is `Closing` until the server answers.
    pub fn send_close(&mut self, code: u16) -> Result<(), String> {
        if self.state != State::Open {
            return Ok(());
        }
        self.state = State::Closing;
        self.send_frame(ws::OP_CLOSE, &code.to_be_bytes())
    }

    fn send_frame(&mut self, op: u8, payload: &[u8]) -> Result<(), String> {
        let mask = (self.rng.next() as u32).to_ne_bytes();
        ws::encode_client_frame(&mut self.wbuf, op, payload, mask);
        if self.state == State::Open || self.state == State::Closing || self.state == State::Closed
        {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        while self.wpos < self.wbuf.len() {
            match self.stream.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err("write returned 0".into()),
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("write: {e}")),
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        if self.wbuf.capacity() > 64 << 10 {
            self.wbuf.shrink_to(4096);
        }
        self.stream.push().map_err(|e| format!("write: {e}"))
    }

    /// Handles a readiness event. Returns `Ok(true)` while the connection lives, `Ok(false)` once
    /// it is finished cleanly (close frame exchanged or EOF after our close), `Err` on any failure
    /// (refused upgrade, protocol error, reset, EOF without a close frame).
    pub fn on_ready(
        &mut self,
        readable: bool,
        writable: bool,
        scratch: &mut [u8],
        sink: &mut dyn FnMut(WsEvent),
    ) -> Result<bool, String> {
        if self.state == State::Connecting {
            if let Ok(Some(e)) | Err(e) = self.stream.tcp.take_error() {
                return Err(format!("connect: {e}"));
            }
            match self.stream.tcp.peer_addr() {
                Ok(_) => self.state = State::Handshake,
                Err(e) if e.kind() == ErrorKind::NotConnected => return Ok(true),
                Err(e) => return Err(format!("connect: {e}")),
            }
        }
        if writable || self.pending_out() > 0 {
            self.flush()?;
        }
        if readable {
            return self.read_all(scratch, sink);
        }
        Ok(true)
    }

    fn read_all(
        &mut self,
        scratch: &mut [u8],
        sink: &mut dyn FnMut(WsEvent),
    ) -> Result<bool, String> {
        loop {
            match self.stream.read(scratch) {
                Ok(0) => {
                    return match self.state {
                        State::Closing | State::Closed => {
                            self.state = State::Closed;
                            Ok(false)
                        }
                        State::Handshake => {
                            Err("server closed the connection during the upgrade".into())
                        }
                        _ => Err("server closed the TCP connection without a close frame".into()),
                    };
                }
                Ok(n) => {
                    self.bytes_in += n as u64;
                    self.rbuf.extend_from_slice(&scratch[..n]);
                    self.process(sink)?;
                    if self.state == State::Closed {
                        return Ok(false);
                    }
                    if n < scratch.len() && !self.stream.is_tls() {
                        // A short read drained the TCP receive queue; data that arrives later
                        // raises a new edge, so the extra read that would return WouldBlock is
                        // skipped (as tokio does): it halves the syscalls per message.
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    fn process(&mut self, sink: &mut dyn FnMut(WsEvent)) -> Result<(), String> {
        let mut pos = 0;
        if self.state == State::Handshake {
            match self.parse_handshake()? {
                None => return Ok(()),
                Some(n) => {
                    pos = n;
                    self.state = State::Open;
                    sink(WsEvent::Open);
                }
            }
        }
        let mut control: Vec<(u8, Vec<u8>)> = Vec::new();
        while self.state == State::Open || self.state == State::Closing {
            let Some((f, used)) = ws::decode_server_frame(&self.rbuf[pos..], MAX_MESSAGE)? else {
                break;
            };
            pos += used;
            match f.opcode {
                ws::OP_TEXT | ws::OP_BINARY if self.frag.is_some() => {
                    return Err("new data frame inside a fragmented message".into());
                }
                ws::OP_TEXT if f.fin => {
                    if std::str::from_utf8(f.payload).is_err() {
                        return Err("server sent a text frame that is not UTF-8".into());
                    }
                    sink(WsEvent::Text(f.payload));
                }
                ws::OP_TEXT => self.frag = Some(f.payload.to_vec()),
                ws::OP_BINARY => {}
                ws::OP_CONT => {
                    let Some(buf) = self.frag.as_mut() else {
                        return Err("continuation frame without a message start".into());
                    };
                    buf.extend_from_slice(f.payload);
                    if buf.len() > MAX_MESSAGE {
                        return Err("fragmented message too large".into());
                    }
                    if f.fin {
                        let msg = self.frag.take().unwrap_or_default();
                        if std::str::from_utf8(&msg).is_err() {
                            return Err("server sent a text message that is not UTF-8".into());
                        }
                        sink(WsEvent::Text(&msg));
                    }
                }
                ws::OP_PING => {
                    self.pings += 1;
                    control.push((ws::OP_PONG, f.payload.to_vec()));
                }
                ws::OP_PONG => {}
                ws::OP_CLOSE => {
                    let code = (f.payload.len() >= 2)
                        .then(|| u16::from_be_bytes([f.payload[0], f.payload[1]]));
                    self.close_code = code;
                    if self.state == State::Open {
                        // Echo the close as RFC 6455 5.5.1 asks.
                        control.push((ws::OP_CLOSE, f.payload.get(..2).unwrap_or(&[]).to_vec()));
                    }
                    self.state = State::Closed;
                    sink(WsEvent::Closed(code));
                }
                _ => {}
            }
        }
        self.rbuf.drain(..pos);
        if self.rbuf.is_empty() && self.rbuf.capacity() > 256 << 10 {
            self.rbuf = Vec::new();
        }
        for (op, payload) in control {
            let mask = (self.rng.next() as u32).to_ne_bytes();
            ws::encode_client_frame(&mut self.wbuf, op, &payload, mask);
        }
        if self.pending_out() > 0 {
            // A reset after the server closed first is harmless; do not turn it into an error.
            let r = self.flush();
            if self.state != State::Closed {
                r?;
            }
        }
        Ok(())
    }

    /// Parses the 101 answer; returns the header length once complete.
    fn parse_handshake(&mut self) -> Result<Option<usize>, String> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let n = match resp.parse(&self.rbuf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                if self.rbuf.len() > 64 << 10 {
                    return Err("upgrade answer head over 64 KiB".into());
                }
                return Ok(None);
            }
            Err(e) => return Err(format!("bad upgrade answer: {e}")),
        };
        let code = resp.code.unwrap_or(0);
        if code != 101 {
            let body = String::from_utf8_lossy(&self.rbuf[n..]);
            let body: String = body.chars().take(200).collect();
            return Err(format!("upgrade refused: HTTP {code} {body}"));
        }
        let header = |name: &str| {
            resp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
        };
        if !header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")) {
            return Err("101 answer without Upgrade: websocket".into());
        }
        match header("sec-websocket-accept") {
            Some(a) if a == self.expected_accept => {}
            other => {
                return Err(format!(
                    "bad Sec-WebSocket-Accept {other:?}, expected {}",
                    self.expected_accept
                ));
            }
        }
        Ok(Some(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::TcpListener;

    /// Reads one masked client frame from a blocking stream: (opcode, unmasked payload).
    fn read_client_frame(s: &mut std::net::TcpStream) -> (u8, Vec<u8>) {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).unwrap();
        assert_eq!(h[1] & 0x80, 0x80, "client frames must be masked");
        let len = (h[1] & 0x7F) as usize;
        assert!(len < 126);
        let mut mask = [0u8; 4];
        s.read_exact(&mut mask).unwrap();
        let mut p = vec![0u8; len];
        s.read_exact(&mut p).unwrap();
        for (i, b) in p.iter_mut().enumerate() {
            *b ^= mask[i & 3];
        }
        (h[0] & 0x0F, p)
    }

    #[test]
    fn handshake_fragments_ping_and_close() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = match l.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                s.read_exact(&mut b).unwrap();
                head.push(b[0]);
            }
            let text = String::from_utf8(head).unwrap();
            assert!(text.starts_with("GET /ws/abc?session_id=s HTTP/1.1\r\n"));
            let key = text
                .lines()
                .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                .unwrap()
                .trim()
                .to_string();
            let mut out = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {}\r\n\r\n",
                ws::accept_key(&key)
            )
            .into_bytes();
            ws::encode_server_frame(&mut out, ws::OP_TEXT, br#"{"type":"welcome"}"#);
            out.extend_from_slice(&[0x01, 3, b'a', b'b', b'c']); // text, not final
            out.extend_from_slice(&[0x89, 2, b'h', b'i']); // ping between fragments
            out.extend_from_slice(&[0x80, 2, b'd', b'e']); // final continuation
            s.write_all(&out).unwrap();
            assert_eq!(read_client_frame(&mut s), (ws::OP_PONG, b"hi".to_vec()));
            assert_eq!(
                read_client_frame(&mut s),
                (ws::OP_TEXT, b"ping-me".to_vec())
            );
            s.write_all(&[0x88, 2, 0x03, 0xF5]).unwrap(); // close 1013
            assert_eq!(read_client_frame(&mut s), (ws::OP_CLOSE, vec![0x03, 0xF5]));
        });

        let mut c = WsClient::connect(addr, None, "/ws/abc?session_id=s", 1).unwrap();
        let mut poll = mio::Poll::new().unwrap();
        let mut events = mio::Events::with_capacity(16);
        c.register(poll.registry(), mio::Token(0)).unwrap();
        let mut scratch = vec![0u8; 4096];
        let mut got: Vec<String> = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut alive = true;
        let mut sent = false;
        while alive && std::time::Instant::now() < deadline {
            poll.poll(&mut events, Some(std::time::Duration::from_millis(50)))
                .unwrap();
            for ev in events.iter() {
                alive = c
                    .on_ready(
                        ev.is_readable(),
                        ev.is_writable(),
                        &mut scratch,
                        &mut |e| match e {
                            WsEvent::Open => got.push("open".into()),
                            WsEvent::Text(t) => got.push(String::from_utf8(t.to_vec()).unwrap()),
                            WsEvent::Closed(code) => got.push(format!("closed {code:?}")),
                        },
                    )
                    .unwrap();
            }
            if !sent && got.len() >= 3 {
                c.send_text(b"ping-me").unwrap();
                sent = true;
            }
        }
        server.join().unwrap();
        assert_eq!(
            got,
            [
                "open",
                r#"{"type":"welcome"}"#,
                "abcde",
                "closed Some(1013)"
            ]
        );
        assert_eq!(c.pings, 1);
        assert_eq!(c.close_code, Some(1013));
    }

    #[test]
    fn refused_upgrade_is_an_error_with_the_status() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = match l.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).unwrap();
            let body = r#"{"detail":"Invalid or expired session"}"#;
            let r = format!(
                "HTTP/1.1 403 Forbidden\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(r.as_bytes()).unwrap();
        });
        let mut c = WsClient::connect(addr, None, "/ws/x", 1).unwrap();
        let mut poll = mio::Poll::new().unwrap();
        let mut events = mio::Events::with_capacity(16);
        c.register(poll.registry(), mio::Token(0)).unwrap();
        let mut scratch = vec![0u8; 4096];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut err = None;
        while err.is_none() && std::time::Instant::now() < deadline {
            poll.poll(&mut events, Some(std::time::Duration::from_millis(50)))
                .unwrap();
            for ev in events.iter() {
                if let Err(e) = c.on_ready(
                    ev.is_readable(),
                    ev.is_writable(),
                    &mut scratch,
                    &mut |_| {},
                ) {
                    err = Some(e);
                }
            }
        }
        let e = err.expect("a refused upgrade must be reported");
        assert!(
            e.contains("HTTP 403") && e.contains("Invalid or expired session"),
            "{e}"
        );
    }
}
