//! One connection's state machine driven the way the loop drives it (`read_in`, the hub's
//! actions, `deliver`, `write_out`, `on_output_over_cap`, `on_eof`, `on_timer`), over an
//! in-memory duplex instead of a socket and with a fake clock: no thread, no port, no sleep.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::hub::Action;
use crate::time::UnixMicros;

/// An in-memory socket. Reads give what the client sent (`input`), then `WouldBlock`, or
/// end of input once `eof`. Writes take at most `room` more bytes (then `WouldBlock`), into
/// `output`; the calls are counted.
#[derive(Debug, Default)]
struct Duplex {
    input: VecDeque<u8>,
    eof: bool,
    output: Vec<u8>,
    room: usize,
    writes: usize,
    vectored_writes: usize,
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return match self.eof {
                true => Ok(0),
                false => Err(io::ErrorKind::WouldBlock.into()),
            };
        }
        self.input.read(buf)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writes += 1;
        self.take(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.vectored_writes += 1;
        self.take(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Duplex {
    fn take(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut n = 0;
        for b in bufs {
            let k = b.len().min(self.room - n);
            self.output.extend_from_slice(&b[..k]);
            n += k;
        }
        self.room -= n;
        Ok(n)
    }

    fn send(&mut self, bytes: &[u8]) {
        self.input.extend(bytes);
    }

    /// What was written since the last call.
    fn written(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }
}

const ID: ConnId = ConnId(0);
const ROOMY: usize = usize::MAX / 2;

/// The loop in miniature, for one connection: its loop-wide state, and what the loop does
/// with each call's result.
struct Loop {
    cfg: Config,
    hub: Hub,
    now: Micros,
    outbox: Outbox,
    dirty: Vec<usize>,
    metrics: Metrics,
    websockets: usize,
    frame: FrameBuf,
    inflate: Inflater,
    deflate: Deflater,
    limiter: CreateLimiter,
    per_ip: ConnCounter,
    throttle: LogThrottle,
    rbuf: Vec<u8>,
    plain: Vec<u8>,
    scratch: crate::tls::Scratch,
}

impl Loop {
    fn new(cfg: Config) -> Loop {
        Loop {
            hub: Hub::new(cfg.hub_config()),
            now: Micros(1_000_000),
            outbox: Outbox::default(),
            dirty: Vec::new(),
            metrics: Metrics::default(),
            websockets: 0,
            frame: FrameBuf::default(),
            inflate: Inflater::default(),
            deflate: Deflater::new(cfg.deflate_min_bytes),
            limiter: CreateLimiter::new(cfg.create_rate, cfg.create_burst),
            per_ip: ConnCounter::new(cfg.max_connections_per_ip),
            throttle: LogThrottle::default(),
            rbuf: vec![0; 64 * 1024],
            plain: Vec::new(),
            scratch: crate::tls::Scratch::default(),
            cfg,
        }
    }

    fn conn(&self) -> Conn<Duplex> {
        let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let stream = Duplex {
            room: ROOMY,
            ..Duplex::default()
        };
        Conn::new(stream, 1, peer, false, self.now, None)
    }

    /// Runs `f` with the context the loop gives a connection.
    fn with<R>(&mut self, f: impl FnOnce(&mut Ctx<'_>) -> R) -> R {
        let mut ctx = Ctx {
            hub: &mut self.hub,
            cfg: &self.cfg,
            now: Now {
                mono: self.now,
                wall: UnixMicros(1_800_000_000_000_000 + self.now.0),
            },
            date: b"Sat, 05 Dec 2026 00:00:00 GMT",
            outbox: &mut self.outbox,
            dirty: &mut self.dirty,
            metrics: &mut self.metrics,
            gauges: Gauges::default(),
            websockets: &mut self.websockets,
            frame: &mut self.frame,
            inflate: &mut self.inflate,
            deflate: &mut self.deflate,
            limiter: &mut self.limiter,
            per_ip: &mut self.per_ip,
            throttle: &mut self.throttle,
            cluster: None,
        };
        f(&mut ctx)
    }

    /// One read, then the hub's actions (as `Server::read` and `apply_actions` do).
    /// Returns the read's outcome and what the output cap decided, if it was passed.
    fn read(&mut self, c: &mut Conn<Duplex>) -> (Got, Option<Next>) {
        let mut rbuf = std::mem::take(&mut self.rbuf);
        let mut plain = std::mem::take(&mut self.plain);
        let got = self.with(|ctx| c.read_in(ID, &mut rbuf, &mut plain, ctx));
        self.rbuf = rbuf;
        self.plain = plain;
        let cut = self.actions(c);
        (got, cut)
    }

    /// Answers the requests a connection holds (as `Server::resume_input` does).
    fn resume(&mut self, c: &mut Conn<Duplex>) -> Option<Next> {
        let mut plain = std::mem::take(&mut self.plain);
        self.with(|ctx| c.input(ID, &mut [], &mut plain, ctx));
        self.plain = plain;
        self.actions(c)
    }

    /// The hub's frames delivered, its closes carried out; a connection over the output cap
    /// cut off.
    fn actions(&mut self, c: &mut Conn<Duplex>) -> Option<Next> {
        let mut over = false;
        let mut closes = Vec::new();
        let actions: Vec<Action> = self.hub.drain_actions().collect();
        for action in actions {
            match action {
                Action::Send(id, frame) => {
                    assert_eq!(id, ID);
                    over |= c.deliver(ID, frame, &mut self.fanout());
                }
                Action::Close(id, code, reason) => closes.push((id, code, reason)),
            }
        }
        for (id, code, reason) in closes {
            self.with(|ctx| c.closed_by_hub(id, code, reason, ctx));
        }
        over.then(|| self.cut(c))
    }

    /// What a fan-out delivers through (as `Server` builds it for each frame).
    fn fanout(&mut self) -> Fanout<'_> {
        Fanout {
            outbox: &mut self.outbox,
            dirty: &mut self.dirty,
            deflate: &mut self.deflate,
            metrics: &mut self.metrics,
            cap: self.cfg.max_output_queue,
        }
    }

    fn cut(&mut self, c: &mut Conn<Duplex>) -> Next {
        self.with(|ctx| c.on_output_over_cap(ID, ctx))
    }

    /// One flush (as `Server::flush` does), then the end of the loop's iteration.
    fn flush(&mut self, c: &mut Conn<Duplex>) -> Wrote {
        let wrote = c.write_out(
            &mut self.outbox,
            &mut self.scratch,
            &mut self.metrics,
            &self.cfg,
            self.now,
        );
        self.outbox.end_round();
        self.dirty.clear();
        wrote
    }

    /// Frames delivered straight to the connection, `size` bytes each, until it is over the
    /// cap (at most `max`); returns how many.
    fn flood(&mut self, c: &mut Conn<Duplex>, size: usize, max: usize) -> usize {
        let mut frame = vec![0x81, 126, ((size - 4) >> 8) as u8, (size - 4) as u8];
        frame.resize(size, b'x');
        let frame: protocol::Frame = frame.into();
        for i in 1..=max {
            if c.deliver(ID, frame.clone(), &mut self.fanout()) {
                return i;
            }
        }
        max
    }

    /// A chat socket: a session and a room created over HTTP on `c`, then the upgrade.
    /// Returns the bytes written up to and including the 101 (and the welcome).
    fn chat_socket(&mut self, c: &mut Conn<Duplex>) -> Vec<u8> {
        let body = br#"{"username":"alice"}"#;
        let req = format!(
            "POST /sessions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        );
        c.stream.send(req.as_bytes());
        c.stream.send(body);
        self.read(c);
        self.flush(c);
        let (status, body) = response(&c.stream.written());
        assert_eq!(status, 201, "{body}");
        let session = json_field(&body, "session_id");
        let req = format!(
            "POST /rooms HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {session}\r\n\
             Content-Length: 0\r\n\r\n"
        );
        c.stream.send(req.as_bytes());
        self.read(c);
        self.flush(c);
        let (status, body) = response(&c.stream.written());
        assert_eq!(status, 201, "{body}");
        let room = json_field(&body, "room_id");
        let req = format!(
            "GET /ws/{room}?session_id={session} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        c.stream.send(req.as_bytes());
        let (got, cut) = self.read(c);
        assert!(matches!(got, Got::Bytes(_)), "{got:?}");
        assert_eq!(cut, None);
        assert!(c.is_websocket() && c.accepts_frames());
        req.into_bytes()
    }
}

fn cfg() -> Config {
    Config {
        max_output_queue: 16 * 1024,
        ..Config::default()
    }
}

/// The status and body of the one response at the start of `out`.
fn response(out: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(out);
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_string())
}

fn json_field(body: &str, name: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v[name].as_str().unwrap().to_string()
}

/// A client's (masked) text frame.
fn client_text(text: &str) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    assert!(text.len() < 126);
    let mut f = vec![0x81, 0x80 | text.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// The server's frames in `out`: (first byte, payload).
fn frames(mut out: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut v = Vec::new();
    while out.len() >= 2 {
        let (len, at) = match out[1] & 0x7f {
            126 => (u16::from_be_bytes([out[2], out[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(out[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        v.push((out[0], out[at..at + len].to_vec()));
        out = &out[at + len..];
    }
    v
}

/// The code of a close frame's payload.
fn close_code(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

#[test]
fn http_request_gets_its_response() {
    let mut lp = Loop::new(cfg());
    let mut c = lp.conn();
    let req = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n";
    c.stream.send(req);
    let (got, _) = lp.read(&mut c);
    assert_eq!(got, Got::Bytes(req.len()));
    assert!(matches!(lp.read(&mut c).0, Got::Blocked));
    assert!(matches!(lp.flush(&mut c), Wrote::Done));
    let (status, body) = response(&c.stream.written());
    assert_eq!(status, 200);
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    assert!(matches!(c.state, State::Http { .. }));
    // Nothing left: the next flush writes nothing at all.
    let calls = c.stream.vectored_writes;
    assert!(matches!(lp.flush(&mut c), Wrote::Done));
    assert_eq!(c.stream.vectored_writes, calls);
}

#[test]
fn upgrade_answers_101_then_welcome() {
    let mut lp = Loop::new(cfg());
    let mut c = lp.conn();
    lp.chat_socket(&mut c);
    let calls = c.stream.vectored_writes;
    assert!(matches!(lp.flush(&mut c), Wrote::Done));
    // The 101 and the welcome frame go out in one vectored write.
    assert_eq!(c.stream.vectored_writes, calls + 1);
    assert_eq!(c.stream.writes, 0);
    let out = c.stream.written();
    assert!(out.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
    assert!(
        String::from_utf8_lossy(&out)
            .contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n")
    );
    let at = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let f = frames(&out[at..]);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].0, 0x81);
    assert!(String::from_utf8_lossy(&f[0].1).contains("\"type\":\"welcome\""));
    assert_eq!(lp.websockets, 1);
    assert_eq!(lp.hub.stats().members, 1);
}

#[test]
fn chat_frame_comes_back_as_the_echo() {
    let mut lp = Loop::new(cfg());
    let mut c = lp.conn();
    lp.chat_socket(&mut c);
    lp.flush(&mut c);
    c.stream.written();
    c.stream
        .send(&client_text(r#"{"type":"chat","message":"hi there"}"#));
    let (got, cut) = lp.read(&mut c);
    assert!(matches!(got, Got::Bytes(_)), "{got:?}");
    assert_eq!(cut, None);
    assert!(matches!(lp.flush(&mut c), Wrote::Done));
    let out = c.stream.written();
    let chat: Vec<String> = frames(&out)
        .into_iter()
        .map(|(_, p)| String::from_utf8(p).unwrap())
        .filter(|p| p.contains("\"type\":\"chat\""))
        .collect();
    assert_eq!(chat.len(), 1, "{out:?}");
    assert!(chat[0].contains("\"message\":\"hi there\""), "{}", chat[0]);
    assert!(chat[0].contains("\"user\":\"alice\""), "{}", chat[0]);
}

#[test]
fn a_frame_split_over_reads_waits_in_inbuf() {
    let mut lp = Loop::new(cfg());
    let mut c = lp.conn();
    lp.chat_socket(&mut c);
    lp.flush(&mut c);
    c.stream.written();
    let frame = client_text(r#"{"type":"chat","message":"split"}"#);
    c.stream.send(&frame[..5]);
    lp.read(&mut c);
    assert_eq!(c.inbuf.len(), 5);
    c.stream.send(&frame[5..]);
    lp.read(&mut c);
    assert!(c.inbuf.is_empty() && c.inbuf.capacity() == 0);
    lp.flush(&mut c);
    assert!(String::from_utf8_lossy(&c.stream.written()).contains("\"message\":\"split\""));
}

#[test]
fn slow_consumer_whose_101_is_unsent_gets_it_then_1013_and_lingers() {
    let mut lp = Loop::new(cfg());
    let mut c = lp.conn();
    lp.chat_socket(&mut c);
    // Before its 101 went out, frames for it pile up past the cap.
    let n = lp.flood(&mut c, 1000, 100);
    assert!(n < 100, "never over the cap");
    assert_eq!(lp.cut(&mut c), Next::Keep);
    assert!(matches!(c.state, State::Closing { .. }));
    assert_eq!(lp.metrics.slow_consumers, 1);
    assert_eq!(lp.hub.stats().members, 0);
    assert_eq!(lp.websockets, 0);
    // The 101 and the close frame, nothing of what was dropped.
    assert!(matches!(lp.flush(&mut c), Wrote::ShutWrite));
    assert!(matches!(c.state, State::Lingering { .. }));
    let out = c.stream.written();
    assert!(out.starts_with(b"HTTP/1.1 101 "));
    let at = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let f = frames(&out[at..]);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].0, 0x88);
    assert_eq!(close_code(&f[0].1), 1013);
    assert_eq!(&f[0].1[2..], b"slow consumer");
    // Lingering ends at its deadline, not before.
    lp.now = c.deadline(&lp.cfg);
    assert_eq!(lp.with(|ctx| c.on_timer(ID, ctx)), Next::Drop);
}

#[test]
fn slow_consumer_on_a_full_socket_gets_1013_best_effort_and_goes() {
    let mut lp = Loop::new(cfg());
    let mut c = lp.conn();
    lp.chat_socket(&mut c);
    lp.flush(&mut c);
    c.stream.written();
    // The client stops reading: the socket takes nothing more.
    c.stream.room = 0;
    lp.flood(&mut c, 1000, 4);
    assert!(matches!(lp.flush(&mut c), Wrote::Done));
    assert_eq!(c.out.bytes(), 4000);
    let n = lp.flood(&mut c, 1000, 100);
    assert!(n < 100, "never over the cap");
    assert!(matches!(lp.flush(&mut c), Wrote::OverCap));
    // Room for the close frame only, written on its own.
    c.stream.room = 64;
    assert_eq!(lp.cut(&mut c), Next::Drop);
    assert_eq!(c.out.bytes(), 0);
    let f = frames(&c.stream.written());
    assert_eq!(f.len(), 1);
    assert_eq!((f[0].0, close_code(&f[0].1)), (0x88, 1013));
    assert_eq!(lp.metrics.slow_consumers, 1);
    assert_eq!(lp.hub.stats().members, 0);
    assert_eq!(lp.websockets, 0);
    // Asked again (doomed once per frame over the limit): already dealt with.
    assert_eq!(lp.cut(&mut c), Next::Keep);
    assert_eq!(lp.metrics.slow_consumers, 1);
}

#[test]
fn one_vectored_write_per_flush_and_shared_frames_not_copied() {
    let mut lp = Loop::new(cfg());
    let mut c = lp.conn();
    lp.chat_socket(&mut c);
    lp.flush(&mut c);
    c.stream.written();
    let frame: protocol::Frame = vec![0x81, 3, b'a', b'b', b'c'].into();
    for _ in 0..10 {
        assert!(!c.deliver(ID, frame.clone(), &mut lp.fanout()));
    }
    // Ten references to the one frame, no copy.
    assert_eq!(std::rc::Rc::strong_count(&frame), 11);
    let (calls, writes) = (c.stream.vectored_writes, c.stream.writes);
    assert!(matches!(lp.flush(&mut c), Wrote::Done));
    assert_eq!(c.stream.vectored_writes, calls + 1);
    assert_eq!(c.stream.writes, writes);
    assert_eq!(c.stream.written(), b"\x81\x03abc".repeat(10));
    assert_eq!(std::rc::Rc::strong_count(&frame), 1);
    // A short write: the rest waits in the backlog for the next flush.
    c.stream.room = 0;
    lp.flood(&mut c, 200, 3);
    c.stream.room = 250;
    assert!(matches!(lp.flush(&mut c), Wrote::Done));
    assert_eq!(c.out.bytes(), 350);
    c.stream.room = ROOMY;
    assert!(matches!(lp.flush(&mut c), Wrote::Done));
    assert_eq!(c.stream.written().len(), 600);
}

#[test]
fn reading_pauses_at_the_mark_and_resumes_below_half() {
    let mut lp = Loop::new(Config {
        max_output_queue: 8 * 1024,
        ..Config::default()
    });
    let mark = pause_bytes(&lp.cfg);
    assert_eq!(mark, 4096);
    let mut c = lp.conn();
    c.stream.room = 0; // the client reads nothing
    let requests = 200;
    c.stream
        .send(&b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n".repeat(requests));
    let (got, _) = lp.read(&mut c);
    assert!(matches!(got, Got::Bytes(_)));
    assert!(!c.may_read() && c.holds_unanswered());
    // Answering stopped just past the mark; the rest waits in `inbuf`, unread.
    let queued = c.out.bytes();
    assert!(queued > mark && queued < mark + 256, "{queued}");
    assert!(!c.inbuf.is_empty());
    assert!(matches!(lp.flush(&mut c), Wrote::Done));
    // Drained to exactly half the mark: still paused.
    c.stream.room = queued - mark / 2;
    assert!(matches!(lp.flush(&mut c), Wrote::Done));
    assert_eq!(c.out.bytes(), mark / 2);
    assert!(!c.may_resume());
    // One byte more, below half: reading may resume, held requests first.
    c.stream.room = 1;
    assert!(matches!(lp.flush(&mut c), Wrote::ResumeReading));
    assert!(c.may_resume() && c.holds_unanswered() && !c.may_read());
    c.stream.room = ROOMY;
    for _ in 0..requests {
        if c.may_read() {
            break;
        }
        if c.may_resume() && c.holds_unanswered() {
            lp.resume(&mut c);
        }
        lp.flush(&mut c);
    }
    assert!(c.may_read());
    // Every request answered exactly once, and the input buffer freed.
    let out = c.stream.written();
    let answered = out.windows(15).filter(|w| w == b"HTTP/1.1 200 OK").count();
    assert_eq!(answered, requests);
    assert!(c.inbuf.is_empty() && c.inbuf.capacity() == 0);
    assert!(matches!(lp.read(&mut c).0, Got::Blocked));
}

#[test]
fn eof_after_a_request_answers_it_then_lingers() {
    let mut lp = Loop::new(cfg());
    let mut c = lp.conn();
    c.stream.send(b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n");
    c.stream.eof = true;
    assert!(matches!(lp.read(&mut c).0, Got::Bytes(_)));
    assert!(matches!(lp.read(&mut c).0, Got::Eof));
    assert_eq!(lp.with(|ctx| c.on_eof(ID, ctx)), Next::Keep);
    assert!(matches!(c.state, State::Closing { .. }));
    assert!(matches!(lp.flush(&mut c), Wrote::ShutWrite));
    assert!(matches!(c.state, State::Lingering { .. }));
    assert_eq!(response(&c.stream.written()).0, 200);
    lp.now = lp.now + LINGER;
    assert_eq!(lp.with(|ctx| c.on_timer(ID, ctx)), Next::Drop);
}

#[test]
fn eof_on_a_chat_socket_leaves_the_room_at_once() {
    let mut lp = Loop::new(cfg());
    let mut c = lp.conn();
    lp.chat_socket(&mut c);
    lp.flush(&mut c);
    c.stream.eof = true;
    assert!(matches!(lp.read(&mut c).0, Got::Eof));
    assert_eq!(lp.with(|ctx| c.on_eof(ID, ctx)), Next::Drop);
    assert_eq!(lp.hub.stats().members, 0);
    assert_eq!(lp.websockets, 0);
}

#[test]
fn quiet_socket_is_pinged_then_closed_1008_by_the_fake_clock() {
    let mut lp = Loop::new(cfg());
    let mut c = lp.conn();
    lp.chat_socket(&mut c);
    lp.flush(&mut c);
    c.stream.written();
    let start = lp.now;
    lp.now = start + lp.cfg.ping_interval;
    assert_eq!(c.deadline(&lp.cfg), lp.now);
    assert_eq!(lp.with(|ctx| c.on_timer(ID, ctx)), Next::Keep);
    lp.flush(&mut c);
    assert_eq!(c.stream.written(), ws::PING_FRAME);
    lp.now = start + lp.cfg.pong_timeout;
    assert_eq!(c.deadline(&lp.cfg), lp.now);
    assert_eq!(lp.with(|ctx| c.on_timer(ID, ctx)), Next::Keep);
    assert!(matches!(lp.flush(&mut c), Wrote::ShutWrite));
    let f = frames(&c.stream.written());
    assert_eq!((f[0].0, close_code(&f[0].1)), (0x88, 1008));
    assert_eq!(lp.hub.stats().members, 0);
}

#[test]
fn echo_socket_sends_each_message_back_and_is_no_chat_member() {
    let mut lp = Loop::new(Config {
        echo_path: Some("/echo".into()),
        ..cfg()
    });
    let mut c = lp.conn();
    c.stream.send(
        b"GET /echo HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    lp.read(&mut c);
    assert!(c.is_websocket() && !c.accepts_frames());
    assert_eq!(lp.websockets, 1);
    lp.flush(&mut c);
    let out = c.stream.written();
    assert!(out.starts_with(b"HTTP/1.1 101 "));
    c.stream.send(&client_text("not json, echoed as is"));
    lp.read(&mut c);
    lp.flush(&mut c);
    assert_eq!(
        frames(&c.stream.written()),
        vec![(0x81, b"not json, echoed as is".to_vec())]
    );
    // Its WebSocket state is the chat socket's: the same ping deadline.
    assert_eq!(c.deadline(&lp.cfg), lp.now + lp.cfg.ping_interval);
    assert_eq!(lp.with(|ctx| c.on_eof(ID, ctx)), Next::Drop);
    assert_eq!(lp.websockets, 0);
    assert_eq!(lp.hub.stats().members, 0);
}
