//! One connection's state machine: HTTP requests, the upgrade, WebSocket frames, closing.
//!
//! A `Conn` is fed bytes (`on_bytes`), timer expiries (`on_timer`) and end of input (`on_eof`); it
//! answers by queueing chunks on its own [`Queue`] and by calling the [`Hub`]. It owns every
//! transition of its [`State`] and every rule about its output: frames delivered to it (`deliver`),
//! the output cap and the 1013 that ends a slow consumer (`on_output_over_cap`), the pause mark and
//! when reading resumes (`may_read`, `write_out`), lingering after its last byte. When the loop
//! asks, it reads its socket into the loop-wide buffer (`read_in`, decrypting TLS on the way) and
//! writes its queue with one gathered write (`write_out`); the socket is any `Read + Write`, so the
//! tests in `conn/tests.rs` drive a `Conn` over an in-memory duplex with a fake clock. The loop
//! does the socket's registration and `shutdown`, the clock and the timers, and carries out the
//! [`Got`], [`Next`] or [`Wrote`] it gets.

use std::io::{self, Read, Write};
use std::net::IpAddr;

use crate::api::{self, ApiCtx, ClusterReq, Reply};
use crate::cluster::{Facts, Query};
use crate::config::Config;
use crate::deflate::{Deflater, Inflater, Mode};
use crate::http::{self, Response};
use crate::hub::Hub;
use crate::ids::{ConnId, RoomId, SessionId};
use crate::metrics::{Gauges, Metrics};
use crate::outbox::{Chunk, Outbox, Queue, Sock};
use crate::protocol::{self, FrameBuf};
use crate::proxy;
use crate::ratelimit::{Admit, ConnCounter, CreateLimiter, IpKey, TokenBucket};
use crate::throttle::{LogEvent, LogThrottle};
use crate::time::{Micros, Now};
use crate::timer::TimerId;
use crate::ws::{self, CloseWith, Step, WsEvent, WsState};

/// How long a closing connection may take to flush and hear the peer's FIN.
pub const LINGER: Micros = Micros(2_000_000);

/// Unsent output above which an HTTP connection's requests stop being answered (and its
/// socket read) until its client catches up; see [`pause_bytes`].
pub const HTTP_PAUSE_BYTES: usize = 256 * 1024;

/// The pause mark: [`HTTP_PAUSE_BYTES`], or half of `--max-output-queue` if that is smaller,
/// so that answering stops well before the output cap. Answering resumes below half of it.
pub fn pause_bytes(cfg: &Config) -> usize {
    HTTP_PAUSE_BYTES.min(cfg.max_output_queue / 2)
}

/// Frames per second a chat socket may send besides chat (typing, of which the hub passes
/// on at most 50 a second, pings, and some slack).
const OTHER_FRAMES_PER_SEC: u32 = 60;

/// The frame budget of a chat socket (token bucket rate and size): every frame counts,
/// whatever its kind. Above chat's own limit (which refuses, then closes after twice its
/// burst), so that only a flood of something else (typing, invalid JSON, unknown types,
/// binary, pings, fragments) runs it out; then the socket is closed with 1008.
pub fn frame_budget(cfg: &Config) -> (u32, u32) {
    (
        cfg.chat_rate.saturating_add(OTHER_FRAMES_PER_SEC),
        cfg.chat_burst
            .saturating_mul(2)
            .saturating_add(OTHER_FRAMES_PER_SEC),
    )
}

/// One client connection: its socket, what it is (HTTP, chat WebSocket, closing: [`State`]),
/// its unparsed input and its output queue. Driven by the loop (`read_in`, `on_timer`,
/// `on_eof`, `deliver`, `write_out`), it answers by queueing output and calling the hub,
/// and tells the loop what to do next. The socket is any `Read + Write` (a [`Sock`] in the
/// loop, an in-memory duplex in the tests); the loop alone registers it and shuts it.
pub struct Conn<S = Sock> {
    /// The socket (non-blocking; the loop registers it with its poll under the slab index).
    pub stream: S,
    /// Tells this connection from an earlier one in the same slab slot (for stale timers).
    pub serial: u32,
    /// The socket's remote address.
    pub peer: IpAddr,
    /// The client's address, for per-IP limits and logs: the peer's, unless the peer is a
    /// trusted proxy (`--trusted-proxy`) that named another (PROXY header, X-Forwarded-For).
    pub client: IpAddr,
    /// The peer is in `--trusted-proxy`.
    pub trusted: bool,
    /// The connection may still begin with a PROXY protocol header (nothing read yet).
    pub proxy_expected: bool,
    /// It began with one: that header, not `X-Forwarded-For`, names the client.
    pub proxied: bool,
    /// What the connection is doing now.
    pub state: State,
    /// Bytes of an incomplete request or frame; empty (unallocated) otherwise.
    pub inbuf: Vec<u8>,
    /// Output not yet taken by the socket (shared frames, responses).
    pub out: Queue,
    /// Already in this iteration's flush list.
    pub dirty: bool,
    /// The connection's timer in the loop's wheel, and the deadline it is armed for
    /// (`Micros::MAX` if none).
    pub timer: Option<TimerId>,
    /// The deadline `timer` is armed for.
    pub timer_at: Micros,
    /// Close (shutdown, then linger) once the queue is empty.
    pub close_after_flush: bool,
    /// Accepted above `--max-connections` or `--max-connections-per-ip`: its first request
    /// is answered 503 and it closes.
    pub over_limit: Option<OverLimit>,
    /// The address key this connection counts under for `--max-connections-per-ip` (`None`
    /// when that limit is off); released when the connection is dropped.
    pub counted_as: Option<IpKey>,
    /// Not read while its output is backed up.
    pub read_paused: bool,
    /// `inbuf` holds requests not answered yet because the output passed the pause mark:
    /// they are answered from `inbuf` when it drains, before the socket is read again.
    pub unanswered: bool,
    /// Length of the newest HTTP response queued (the output cap does not count it).
    pub last_response: usize,
    /// Cluster mode: its request waits for Redis (facts to fetch, or writes to be
    /// acknowledged before the response may go out). Neither read nor flushed meanwhile.
    pub waiting: bool,
    /// Bytes at the front of `out` that are not counted against `--max-output-queue`: the
    /// `101` and the `welcome` of a new chat socket (bounded by `--max-welcome-bytes`), so
    /// that a room's history can never make a newcomer a slow consumer.
    pub exempt: usize,
    /// Bytes at the front of `out` up to the end of the `101`: never dropped, even for a
    /// slow consumer (the client gets its handshake, then the close frame).
    pub unsent_101: usize,
    /// The next frame from the hub is this socket's `welcome`.
    pub welcome_due: bool,
    /// TLS connections only: the session that encrypts and decrypts (see `tls.rs`).
    pub tls: Option<Box<crate::tls::TlsSession>>,
}

/// Which limit a connection was accepted over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    /// `--max-connections`.
    Server,
    /// `--max-connections-per-ip`.
    Address,
}

/// What a connection is doing now: serving HTTP requests, carrying a WebSocket (a chat
/// room's or the echo endpoint's), closing (its last output queued) or lingering (its side
/// shut, waiting for the peer's FIN). docs/lifecycle.md follows the moves between them.
#[derive(Debug)]
pub enum State {
    /// Serving HTTP/1.1 requests, one after another (keep-alive, pipelining).
    Http {
        /// When the request being read started (`None` between requests): `--request-timeout` runs
        /// from here.
        busy_since: Option<Micros>,
        /// When the connection last became idle (open since, or its last response):
        /// `--idle-timeout` runs from here.
        idle_since: Micros,
        /// `100 Continue` was sent for the current request.
        continue_sent: bool,
    },
    /// A WebSocket: a chat room's, or the echo endpoint's (`--echo-path`).
    Ws(Box<Socket>),
    /// A close frame or final response is queued; input is ignored.
    Closing {
        /// When the closing began: it may last [`LINGER`].
        since: Micros,
    },
    /// Our side is shut down; waiting for the peer's FIN.
    Lingering {
        /// When to stop waiting for the FIN and drop it.
        until: Micros,
    },
}

/// A WebSocket's state: its framing, when it was last heard from, and what it is for.
#[derive(Debug)]
pub struct Socket {
    /// The decoder's state.
    pub ws: WsState,
    /// When the last frame arrived: the ping and pong timeouts run from here.
    pub last_rx: Micros,
    /// A ping was sent and no frame has come since.
    pub pinged: bool,
    /// What it is for: a chat room, or the echo.
    pub kind: SocketKind,
}

/// What a WebSocket is for.
#[derive(Debug)]
pub enum SocketKind {
    /// A member of a chat room.
    Chat {
        /// The room it joined.
        room: RoomId,
        /// The session it carries.
        session: SessionId,
        /// Every frame it sends spends one ([`frame_budget`]).
        frames: TokenBucket,
    },
    /// The conformance echo endpoint (`--echo-path`), or a socket refused after its `101`.
    Echo,
}

impl Socket {
    fn new(mode: Mode, now: Micros, kind: SocketKind) -> Box<Socket> {
        Box::new(Socket {
            ws: WsState::new(mode),
            last_rx: now,
            pinged: false,
            kind,
        })
    }

    fn chat_room(&self) -> Option<RoomId> {
        match self.kind {
            SocketKind::Chat { room, .. } => Some(room),
            SocketKind::Echo => None,
        }
    }
}

/// Everything outside the connection that handling its input may touch.
pub struct Ctx<'a> {
    /// The chat domain.
    pub hub: &'a mut Hub,
    /// The settings.
    pub cfg: &'a Config,
    /// The loop's clock reading for this event.
    pub now: Now,
    /// The cached `Date` header value (one formatting per second).
    pub date: &'a [u8],
    /// The loop-wide output list of this iteration.
    pub outbox: &'a mut Outbox,
    /// Connections with output queued this iteration (flushed at its end).
    pub dirty: &'a mut Vec<usize>,
    /// The loop's counters.
    pub metrics: &'a mut Metrics,
    /// Gauges as of this iteration (for `/metrics`).
    pub gauges: Gauges,
    /// Open WebSockets (a gauge the connection keeps up to date).
    pub websockets: &'a mut usize,
    /// Loop-wide scratch space for frames built here.
    pub frame: &'a mut FrameBuf,
    /// Loop-wide permessage-deflate state: no connection holds any of its own.
    pub inflate: &'a mut Inflater,
    /// Loop-wide compressor (one compressed copy of a broadcast).
    pub deflate: &'a mut Deflater,
    /// Per-address budget for creating sessions and rooms (`--create-rate`).
    pub limiter: &'a mut CreateLimiter,
    /// Open connections per client address (`--max-connections-per-ip`).
    pub per_ip: &'a mut ConnCounter,
    /// Rate limits for log lines an attacker can repeat.
    pub throttle: &'a mut LogThrottle,
    /// Cluster mode: Redis reachable, facts fetched for the current request, queries to ask.
    pub cluster: Option<ClusterCtx<'a>>,
}

/// The cluster state a request may use (see [`ClusterReq`]).
#[derive(Debug)]
pub struct ClusterCtx<'a> {
    /// Redis is reachable now.
    pub up: bool,
    /// What Redis answered for the current request so far.
    pub facts: &'a mut Facts,
    /// What the current request still needs from Redis.
    pub wants: &'a mut Vec<Query>,
}

/// What the loop should do after a timer, end of input or an output overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing to do: the connection lives on.
    Keep,
    /// Drop the connection now (its socket closes with it).
    Drop,
}

/// What one read of its socket ([`Conn::read_in`]) brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Got {
    /// `n` bytes, handed to the state machine.
    Bytes(usize),
    /// Nothing to read now.
    Blocked,
    /// The peer closed its side: the loop calls [`Conn::on_eof`].
    Eof,
    /// The read failed, or its TLS session did: the loop drops it.
    Failed,
}

/// What a flush ([`Conn::write_out`]) asks of the loop, which owns the socket's
/// registration, the timers and the slab.
#[derive(Debug)]
pub enum Wrote {
    /// Nothing more to do (including: nothing was written).
    Done,
    /// Its last byte went out: shut the socket's write side, then wait (the connection is
    /// now [`State::Lingering`]; its timer must move).
    ShutWrite,
    /// Its unsent output is over `--max-output-queue`: [`Conn::on_output_over_cap`] next.
    OverCap,
    /// Its output drained below half the pause mark: it may be read again (and the requests
    /// it holds answered).
    ResumeReading,
    /// The write failed: the peer is gone.
    Failed(io::Error),
}

/// The loop-wide state a frame from the hub passes through on its way to a member.
#[derive(Debug)]
pub struct Fanout<'a> {
    /// The loop-wide output list of this iteration.
    pub outbox: &'a mut Outbox,
    /// Connections with output queued this iteration (flushed at its end).
    pub dirty: &'a mut Vec<usize>,
    /// Loop-wide compressor (one compressed copy of a broadcast).
    pub deflate: &'a mut Deflater,
    /// The loop's counters.
    pub metrics: &'a mut Metrics,
    /// `--max-output-queue`.
    pub cap: usize,
}

impl<S> std::fmt::Debug for Conn<S> {
    /// Never the bytes (they are what users wrote): their size.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("serial", &self.serial)
            .field("client", &self.client)
            .field("state", &self.state)
            .field("inbuf_bytes", &self.inbuf.len())
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("now", &self.now)
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl<S: Read + Write> Conn<S> {
    /// A new connection just accepted, in the HTTP state, its request timeout running from `now`;
    /// `over_limit` if it was accepted above a connection limit (its first request gets a 503).
    pub fn new(
        stream: S,
        serial: u32,
        peer: IpAddr,
        trusted: bool,
        now: Micros,
        over_limit: Option<OverLimit>,
    ) -> Conn<S> {
        Conn {
            stream,
            serial,
            peer,
            client: peer,
            trusted,
            proxy_expected: true,
            proxied: false,
            state: State::Http {
                busy_since: Some(now),
                idle_since: now,
                continue_sent: false,
            },
            inbuf: Vec::new(),
            out: Queue::default(),
            dirty: false,
            timer: None,
            timer_at: Micros::MAX,
            close_after_flush: false,
            over_limit,
            counted_as: None,
            read_paused: false,
            unanswered: false,
            last_response: 0,
            waiting: false,
            tls: None,
            exempt: 0,
            unsent_101: 0,
            welcome_due: false,
        }
    }

    /// Unsent bytes that count against `--max-output-queue` (all but the exempt front;
    /// over TLS, ciphertext the socket has not taken counts too).
    pub fn backlog(&self) -> usize {
        self.out.bytes().saturating_sub(self.exempt) + self.tls.as_ref().map_or(0, |t| t.queued())
    }

    /// `n` bytes of the queue went out (its front first).
    pub fn wrote(&mut self, n: usize) {
        self.exempt = self.exempt.saturating_sub(n);
        self.unsent_101 = self.unsent_101.saturating_sub(n);
    }

    /// Unsent output: queued bytes plus, over TLS, ciphertext the socket has not taken yet.
    pub fn queued(&self) -> usize {
        self.out.bytes() + self.tls.as_ref().map_or(0, |t| t.queued())
    }

    /// Queues bytes for this connection.
    pub fn send(&mut self, id: ConnId, chunk: Chunk, outbox: &mut Outbox, dirty: &mut Vec<usize>) {
        self.out.push(outbox, chunk);
        if !self.dirty {
            self.dirty = true;
            dirty.push(id.0);
        }
    }

    /// Whether frames from the hub should still be queued.
    pub fn accepts_frames(&self) -> bool {
        matches!(&self.state, State::Ws(s) if s.chat_room().is_some())
    }

    /// Frames to it may be sent compressed (it negotiated permessage-deflate).
    pub fn compresses(&self) -> bool {
        match &self.state {
            State::Ws(s) => s.ws.deflate.compresses(),
            _ => false,
        }
    }

    /// It completed a WebSocket upgrade (chat or echo).
    pub fn is_websocket(&self) -> bool {
        matches!(self.state, State::Ws(_))
    }

    /// Whether its unsent output is over `cap` (`--max-output-queue`): it is then closed and
    /// its memory freed. For HTTP the newest response does not count (one answer, however
    /// large, is allowed; answering stops at the pause mark, far below the cap).
    pub fn over_output_cap(&self, cap: usize) -> bool {
        match self.state {
            // The 101 and the welcome at the front do not count (see `exempt`).
            State::Ws(_) => self.backlog() > cap,
            State::Http { .. } => self.queued().saturating_sub(self.last_response) > cap,
            State::Closing { .. } | State::Lingering { .. } => false,
        }
    }

    /// Queues a frame from the hub, if it is still a chat member: compressed (one shared
    /// copy per frame) if it negotiated permessage-deflate. Its `welcome` (the first frame
    /// after the upgrade) joins the exempt front of its queue. Returns `true` when its output
    /// is now over the cap (the loop then calls [`Conn::on_output_over_cap`]).
    pub fn deliver(&mut self, id: ConnId, frame: protocol::Frame, f: &mut Fanout<'_>) -> bool {
        if !self.accepts_frames() {
            return false;
        }
        f.metrics.frames_out += 1;
        let frame = if self.compresses() {
            // One compressed copy per frame, shared by all who take it.
            let c = f.deflate.shared(&frame);
            if c.first().is_some_and(|b| b & 0x40 != 0) {
                f.metrics.frames_out_compressed += 1;
            }
            c
        } else {
            frame
        };
        self.send(id, Chunk::Shared(frame), f.outbox, f.dirty);
        if self.welcome_due {
            // Its welcome: not counted as backlog (bounded by --max-welcome-bytes),
            // however big a room's history.
            self.welcome_due = false;
            self.exempt = self.out.bytes();
        }
        self.over_output_cap(f.cap)
    }

    /// Its output passed `--max-output-queue` (the loop noticed after a delivery or a
    /// flush): cut it off. A socket whose `101` has not gone out yet keeps the `101`, gets
    /// the 1013 close frame after it and lingers (`Next::Keep`); any other is closed
    /// (`Next::Drop`), a WebSocket with a best-effort 1013 close frame. `Next::Keep` too if
    /// it is no longer over the cap (it was dealt with already).
    pub fn on_output_over_cap(&mut self, id: ConnId, ctx: &mut Ctx<'_>) -> Next {
        if self.backlog() <= ctx.cfg.max_output_queue {
            return Next::Keep; // already dealt with (flagged once per frame over the limit)
        }
        ctx.metrics.slow_consumers += 1;
        let ws = self.is_websocket();
        crate::limit_log!(
            ctx.throttle,
            LogEvent::SlowConsumer,
            ctx.now.mono,
            info,
            "closing slow consumer {} (conn {}){}: {} bytes unsent",
            self.client,
            id.0,
            if ws { " with 1013" } else { "" },
            self.queued()
        );
        if self.unsent_101 > 0 {
            // Its handshake has not gone out yet (the socket is new, not full): keep the
            // 101, drop the rest, send the close frame after it and linger.
            let keep = self.unsent_101;
            self.out.truncate(ctx.outbox, keep);
            self.exempt = keep;
            self.close_ws(id, 1013, "slow consumer", ctx);
            return Next::Keep;
        }
        self.out.clear();
        self.inbuf = Vec::new();
        if ws {
            // Best effort: the socket is likely full, so this close frame may be lost (over
            // TLS it would have to follow unsent ciphertext: not sent at all).
            if self.tls.is_none() {
                let frame = ws::close_frame(1013, "slow consumer");
                let _ = self.stream.write(&frame);
            }
            self.leave(id, ctx, 1013);
        }
        Next::Drop
    }

    /// Writes its output: one vectored write of its queue (over TLS, encrypted batch by
    /// batch), then says what follows: shutting its write side once its last output went
    /// out, the output cap, or reading again once the output drained below half the pause
    /// mark. A response held for Redis stays queued.
    pub fn write_out(
        &mut self,
        outbox: &mut Outbox,
        scratch: &mut crate::tls::Scratch,
        metrics: &mut Metrics,
        cfg: &Config,
        now: Micros,
    ) -> Wrote {
        self.dirty = false;
        if self.waiting {
            // A held response goes out once Redis has acknowledged its writes.
            self.out.keep(outbox);
            return Wrote::Done;
        }
        let tls_idle = self.tls.as_ref().is_none_or(|t| !t.wants_write());
        if self.out.is_empty() && !self.close_after_flush && tls_idle {
            return Wrote::Done;
        }
        let result = match self.tls.as_deref_mut() {
            None => self.out.flush(outbox, &mut self.stream),
            Some(t) => crate::tls::flush(
                t,
                &mut self.out,
                outbox,
                &mut self.stream,
                scratch,
                self.close_after_flush,
            ),
        };
        metrics.writes += 1;
        let f = match result {
            Ok(f) => f,
            Err(e) => return Wrote::Failed(e),
        };
        metrics.bytes_out += f.written as u64;
        self.wrote(f.written);
        if f.done && self.close_after_flush {
            self.close_after_flush = false;
            self.state = State::Lingering {
                until: now + LINGER,
            };
            Wrote::ShutWrite
        } else if self.over_output_cap(cfg.max_output_queue) {
            Wrote::OverCap
        } else if self.read_paused && self.out.bytes() < pause_bytes(cfg) / 2 {
            self.read_paused = false;
            Wrote::ResumeReading
        } else {
            Wrote::Done
        }
    }

    /// Whether its socket may be read now: not while its output is backed up, while its
    /// request waits for Redis, or while it holds requests not answered yet (those go
    /// first, see [`Conn::may_resume`]).
    pub fn may_read(&self) -> bool {
        !(self.read_paused || self.waiting || self.unanswered)
    }

    /// Whether a connection that stopped may continue: first with the requests it holds
    /// ([`Conn::holds_unanswered`]), then by reading.
    pub fn may_resume(&self) -> bool {
        !(self.read_paused || self.waiting)
    }

    /// Its input buffer holds requests that were not answered when its output passed the
    /// pause mark; no readable edge will come for them.
    pub fn holds_unanswered(&self) -> bool {
        self.unanswered
    }

    /// The server is shutting down: a WebSocket is closed with 1001 (and flushed before it
    /// goes); an HTTP connection with nothing left to send is dropped now.
    pub fn on_shutdown(&mut self, id: ConnId, ctx: &mut Ctx<'_>) -> Next {
        if self.is_websocket() {
            self.close_ws(id, 1001, "server shutting down", ctx);
            Next::Keep
        } else if self.out.is_empty() {
            Next::Drop
        } else {
            Next::Keep
        }
    }

    /// Reads its socket once into `rbuf` (the loop-wide read buffer) and hands what came
    /// to [`Conn::input`]; `plain` is the loop-wide plaintext buffer (TLS).
    pub fn read_in(
        &mut self,
        id: ConnId,
        rbuf: &mut [u8],
        plain: &mut Vec<u8>,
        ctx: &mut Ctx<'_>,
    ) -> Got {
        let n = loop {
            match self.stream.read(rbuf) {
                Ok(0) => return Got::Eof,
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Got::Blocked,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("conn {} read error: {e}", id.0);
                    return Got::Failed;
                }
            }
        };
        ctx.metrics.bytes_in += n as u64;
        match self.input(id, &mut rbuf[..n], plain, ctx) {
            Next::Keep => Got::Bytes(n),
            Next::Drop => Got::Failed,
        }
    }

    /// Feeds bytes read from its socket (after any kept from before) to the state machine:
    /// over TLS it decrypts them first, into `plain`; a PROXY header before the TLS bytes
    /// is read in clear. What is left over (an incomplete request or frame, or requests not
    /// answered because the output passed the pause mark) is kept in `inbuf`, freed once
    /// empty. Called with no bytes, it answers what `inbuf` holds. `Next::Drop` when its
    /// TLS session failed (its last words are sent).
    pub fn input(
        &mut self,
        id: ConnId,
        bytes: &mut [u8],
        plain: &mut Vec<u8>,
        ctx: &mut Ctx<'_>,
    ) -> Next {
        let mut held: Vec<u8>;
        let mut raw: &mut [u8] = bytes;
        if self.tls.is_some() && self.proxy_expected {
            // A trusted TCP proxy's PROXY header comes in clear, before the TLS bytes.
            if !self.inbuf.is_empty() {
                held = std::mem::take(&mut self.inbuf);
                held.extend_from_slice(raw);
                raw = &mut held[..];
            }
            match self.proxy_header(id, raw, ctx) {
                None => {
                    self.inbuf = raw.to_vec(); // incomplete (at most a few KiB)
                    return Next::Keep;
                }
                Some(k) => raw = &mut std::mem::take(&mut raw)[k..],
            }
        }
        let data = match self.tls.as_deref_mut() {
            None => raw,
            Some(tls) => {
                plain.clear();
                if let Err(f) = tls.read(raw, plain) {
                    self.tls_failed(&f, ctx);
                    return Next::Drop;
                }
                if tls.wants_write() && !self.dirty {
                    self.dirty = true; // handshake output
                    ctx.dirty.push(id.0);
                }
                &mut plain[..]
            }
        };
        if self.inbuf.is_empty() {
            let used = self.on_bytes(id, data, ctx);
            if used < data.len() {
                self.inbuf.extend_from_slice(&data[used..]);
            }
        } else {
            let mut buf = std::mem::take(&mut self.inbuf);
            buf.extend_from_slice(data);
            let used = self.on_bytes(id, &mut buf, ctx);
            buf.drain(..used);
            if !buf.is_empty() {
                self.inbuf = buf; // else dropped: an idle connection holds no buffer
            }
        }
        Next::Keep
    }

    /// Its TLS session failed (bad handshake, garbage, plaintext HTTP): logs it and sends
    /// its last words (an alert, or a plain 400) best effort; the loop then drops it.
    fn tls_failed(&mut self, f: &crate::tls::Failed, ctx: &mut Ctx<'_>) {
        crate::limit_log!(
            ctx.throttle,
            LogEvent::Tls,
            ctx.now.mono,
            info,
            "TLS failed for {}: {}",
            self.peer,
            f.reason
        );
        if !f.last_words.is_empty() {
            let _ = self.stream.write(&f.last_words);
        }
    }

    /// Handles input; returns how many bytes were used (the rest is an incomplete unit).
    pub fn on_bytes(&mut self, id: ConnId, data: &mut [u8], ctx: &mut Ctx<'_>) -> usize {
        let mut pos = 0;
        self.unanswered = false;
        if self.proxy_expected {
            match self.proxy_header(id, data, ctx) {
                Some(n) => pos = n,
                None => return 0, // incomplete: wait for the rest (the request timeout runs)
            }
        }
        while pos < data.len() {
            let used = match self.state {
                State::Http { .. } if self.out.bytes() > pause_bytes(ctx.cfg) => {
                    // The client is not reading its answers: the rest waits, unread.
                    self.read_paused = true;
                    self.unanswered = true;
                    break;
                }
                State::Http { .. } => self.http_step(id, &data[pos..], ctx),
                State::Ws(_) => self.ws_step(id, &mut data[pos..], ctx),
                State::Closing { .. } | State::Lingering { .. } => Some(data.len() - pos),
            };
            match used {
                Some(0) | None => break,
                Some(n) => pos += n,
            }
            if self.waiting {
                break;
            }
        }
        if let State::Http { busy_since, .. } = &mut self.state
            && pos < data.len()
            && busy_since.is_none()
        {
            *busy_since = Some(ctx.now.mono); // a request has started: the request timeout runs
        }
        pos
    }

    /// The peer closed its side. Returns whether to drop the connection now.
    pub fn on_eof(&mut self, id: ConnId, ctx: &mut Ctx<'_>) -> Next {
        self.leave(id, ctx, 1006);
        match self.state {
            State::Http { .. } if !self.out.is_empty() => {
                // Answer what was asked before the FIN, then close.
                self.close_after_flush = true;
                self.state = State::Closing {
                    since: ctx.now.mono,
                };
                Next::Keep
            }
            _ => Next::Drop,
        }
    }

    /// The time at which `on_timer` has something to do.
    pub fn deadline(&self, cfg: &Config) -> Micros {
        match &self.state {
            State::Http {
                busy_since: Some(t),
                ..
            } => *t + cfg.request_timeout,
            State::Http { idle_since, .. } => *idle_since + cfg.idle_timeout,
            State::Ws(s) => ws_deadline(s.last_rx, s.pinged, cfg),
            State::Closing { since } => *since + LINGER,
            State::Lingering { until } => *until,
        }
    }

    /// A timer fired: time out requests, ping or drop quiet sockets, finish closing.
    pub fn on_timer(&mut self, id: ConnId, ctx: &mut Ctx<'_>) -> Next {
        let now = ctx.now.mono;
        let cfg = ctx.cfg;
        match &mut self.state {
            State::Http {
                busy_since: Some(t),
                ..
            } if now >= *t + cfg.request_timeout => {
                ctx.metrics.timeouts += 1;
                crate::limit_log!(
                    ctx.throttle,
                    LogEvent::Timeout,
                    now,
                    info,
                    "request timeout: {} did not finish its request in time (408)",
                    self.client
                );
                let r = Response::error(
                    408,
                    "Request timeout: the request was not completed in time",
                )
                .closing();
                self.respond(id, &r, false, false, ctx);
                Next::Keep
            }
            State::Http {
                busy_since: None,
                idle_since,
                ..
            } if now >= *idle_since + cfg.idle_timeout => Next::Drop,
            State::Ws(_) => {
                self.ws_timer(id, ctx);
                Next::Keep
            }
            State::Closing { since } if now >= *since + LINGER => Next::Drop,
            State::Lingering { until } if now >= *until => Next::Drop,
            _ => Next::Keep,
        }
    }

    /// Closes a WebSocket from our side with a close frame (it leaves its room first).
    pub fn close_ws(&mut self, id: ConnId, code: u16, reason: &str, ctx: &mut Ctx<'_>) {
        if !self.is_websocket() {
            return;
        }
        self.leave(id, ctx, code);
        self.queue_close(id, code, reason, ctx);
    }

    /// The hub closed this member (session ended, rate limit): it has already left the room.
    pub fn closed_by_hub(&mut self, id: ConnId, code: u16, reason: &str, ctx: &mut Ctx<'_>) {
        if self.accepts_frames() {
            if code == 1008 {
                crate::limit_log!(
                    ctx.throttle,
                    LogEvent::WsLimit,
                    ctx.now.mono,
                    info,
                    "limit hit: {} closed with 1008 ({reason})",
                    self.client
                );
            }
            *ctx.websockets -= 1;
            ctx.metrics.close(code);
            self.queue_close(id, code, reason, ctx);
        }
    }

    /// Queues a close frame and closes once it is flushed; input is ignored from now on.
    fn queue_close(&mut self, id: ConnId, code: u16, reason: &str, ctx: &mut Ctx<'_>) {
        let frame = Chunk::Owned(ws::close_frame(code, reason));
        self.send(id, frame, ctx.outbox, ctx.dirty);
        self.close_after_flush = true;
        self.state = State::Closing {
            since: ctx.now.mono,
        };
    }

    /// Leaves the room (if a member) and stops being a WebSocket; `code` is counted.
    pub fn leave(&mut self, id: ConnId, ctx: &mut Ctx<'_>, code: u16) {
        let State::Ws(s) = &self.state else {
            return;
        };
        if let Some(room) = s.chat_room() {
            ctx.hub.disconnect(id, room, ctx.now);
        }
        *ctx.websockets -= 1;
        ctx.metrics.close(code);
        self.state = State::Closing {
            since: ctx.now.mono,
        };
    }

    // ---- HTTP -----------------------------------------------------------------------

    /// A PROXY protocol header at the start of the connection: from a trusted proxy it names
    /// the client; from anyone else, or malformed, it is a bad request. Returns the bytes it
    /// used, `None` while it is incomplete.
    /// (Over TLS the loop calls it on the bytes before the handshake: a TCP proxy sends the
    /// header in clear.)
    pub fn proxy_header(&mut self, id: ConnId, data: &[u8], ctx: &mut Ctx<'_>) -> Option<usize> {
        let why = match proxy::parse_header(data) {
            Ok(proxy::Header::Partial) => return None,
            Ok(proxy::Header::Absent) => {
                self.proxy_expected = false;
                return Some(0);
            }
            Ok(proxy::Header::Complete { len, client }) if self.trusted => {
                self.proxy_expected = false;
                self.proxied = true;
                if let Some(c) = client {
                    self.client = c;
                    self.count_client(ctx);
                }
                return Some(len);
            }
            Ok(proxy::Header::Complete { .. }) => {
                "PROXY protocol header from an address that is not a trusted proxy"
            }
            Err(proxy::Invalid(why)) => why,
        };
        self.proxy_expected = false;
        log::debug!("conn {} from {}: {why}", id.0, self.peer);
        let r = Response::error(400, why).closing();
        self.respond(id, &r, false, false, ctx);
        Some(data.len())
    }

    /// A trusted proxy's connection named its client: from now on it counts under that
    /// client for `--max-connections-per-ip` (over the limit: its requests get 503).
    fn count_client(&mut self, ctx: &mut Ctx<'_>) {
        if self.counted_as.is_some() {
            return;
        }
        match ctx.per_ip.admit(self.client) {
            Admit::Serve(key) => self.counted_as = key,
            Admit::Refuse(key) => {
                self.counted_as = Some(key);
                self.over_limit.get_or_insert(OverLimit::Address);
            }
            Admit::Drop => {
                self.over_limit.get_or_insert(OverLimit::Address);
            }
        }
    }

    fn http_step(&mut self, id: ConnId, data: &[u8], ctx: &mut Ctx<'_>) -> Option<usize> {
        let cfg = ctx.cfg;
        let (req, head_len) = match http::parse(data, cfg.max_request_head, cfg.max_request_body) {
            Ok(Some(r)) => r,
            Ok(None) => return None,
            Err(e) => {
                log::debug!("conn {} bad request: {e:?}", id.0);
                self.respond(id, &e.response().closing(), false, false, ctx);
                return Some(data.len());
            }
        };
        let total = head_len + req.content_length;
        if data.len() < total {
            if req.expect_continue
                && let State::Http {
                    continue_sent: sent @ false,
                    ..
                } = &mut self.state
            {
                *sent = true;
                self.send(
                    id,
                    Chunk::Static(b"HTTP/1.1 100 Continue\r\n\r\n"),
                    ctx.outbox,
                    ctx.dirty,
                );
            }
            return None;
        }
        let body = &data[head_len..total];
        let head = req.method == http::Method::Head;
        if self.trusted && !self.proxied {
            // Behind an HTTP proxy: each request says whom it is from.
            self.client = proxy::forwarded_client(req.forwarded_for.values(), &cfg.trusted_proxy)
                .unwrap_or(self.peer);
        }
        if let Some(over) = self.over_limit {
            let r = match over {
                OverLimit::Server => {
                    ctx.metrics.refused_full += 1;
                    Response::error(503, "Server is at its connection limit; try again later")
                }
                OverLimit::Address => {
                    ctx.metrics.refused_per_ip += 1;
                    Response::error(
                        503,
                        "Too many connections from your address; close some and try again",
                    )
                }
            };
            self.respond(id, &r.closing(), req.keep_alive, head, ctx);
            return Some(data.len());
        }
        let mut actx = ApiCtx {
            now: ctx.now,
            room_list: cfg.room_list,
            echo_path: cfg.echo_path.as_deref(),
            peer: self.client,
            limiter: ctx.limiter,
            cluster: ctx.cluster.as_mut().map(|c| ClusterReq {
                up: c.up,
                facts: c.facts,
                wants: c.wants,
            }),
        };
        let reply = api::handle(&req, body, ctx.hub, &mut actx);
        if let Some(c) = &mut ctx.cluster {
            if matches!(reply, Reply::Fetch) {
                // Parked: the request stays in the input buffer and runs again once
                // the loop has the answers.
                self.waiting = true;
                return Some(0);
            }
            c.facts.clear();
            if matches!(reply, Reply::Response(_)) && ctx.hub.has_ops() {
                // It changed shared state: answer once Redis has acknowledged the change.
                self.waiting = true;
            }
        }
        match reply {
            Reply::Fetch => return Some(0),
            Reply::Response(r) => self.respond(id, &r, req.keep_alive, head, ctx),
            Reply::Metrics => {
                let text = ctx.metrics.render(&ctx.gauges).into_bytes();
                let r = Response {
                    content_type: "text/plain; version=0.0.4",
                    ..Response::json(200, text)
                };
                self.respond(id, &r, req.keep_alive, head, ctx);
            }
            Reply::Upgrade {
                room,
                session,
                since,
                elsewhere,
            } => {
                let mode = self.accept_upgrade(id, &req, ctx);
                match ctx
                    .hub
                    .connect(id, session, room, since, &elsewhere, ctx.now)
                {
                    Ok(()) => {
                        let frames = TokenBucket::full(frame_budget(cfg).1, ctx.now.mono);
                        let kind = SocketKind::Chat {
                            room,
                            session,
                            frames,
                        };
                        self.state = State::Ws(Socket::new(mode, ctx.now.mono, kind));
                        self.welcome_due = true;
                    }
                    Err(e) => {
                        // check_connect passed a moment ago; refuse cleanly all the same.
                        log::warn!("conn {} upgrade refused after check: {e:?}", id.0);
                        *ctx.websockets += 1;
                        let echo = Socket::new(Mode::Off, ctx.now.mono, SocketKind::Echo);
                        self.state = State::Ws(echo);
                        self.close_ws(id, 1011, "could not join the room", ctx);
                        return Some(data.len());
                    }
                }
            }
            Reply::Echo => {
                let mode = self.accept_upgrade(id, &req, ctx);
                self.state = State::Ws(Socket::new(mode, ctx.now.mono, SocketKind::Echo));
            }
        }
        Some(total)
    }

    /// Redis went away before acknowledging what this request changed: its response is
    /// replaced by a 503 and the connection closes.
    pub fn redis_lost(&mut self, id: ConnId, ctx: &mut Ctx<'_>) {
        self.waiting = false;
        if !matches!(self.state, State::Http { .. } | State::Closing { .. }) {
            return;
        }
        self.out.clear();
        self.inbuf = Vec::new();
        let r = Response {
            retry_after: Some(1),
            ..Response::error(503, api::REDIS_DOWN)
        };
        self.respond(id, &r.closing(), false, false, ctx);
    }

    /// Queues the `101`; returns the permessage-deflate mode agreed (answering the client's
    /// first acceptable offer, unless `--deflate false`).
    fn accept_upgrade(&mut self, id: ConnId, req: &http::Request<'_>, ctx: &mut Ctx<'_>) -> Mode {
        ctx.metrics.http_requests += 1;
        ctx.metrics.ws_upgrades += 1;
        *ctx.websockets += 1;
        let key = req.ws_key.unwrap_or_default();
        let agreed = req.ws_deflate.filter(|_| ctx.cfg.deflate);
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
        out.extend_from_slice(ws::accept_key(key).as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(a) = &agreed {
            ctx.metrics.ws_deflate += 1;
            out.extend_from_slice(a.response_header().as_bytes());
        }
        out.extend_from_slice(b"Date: ");
        out.extend_from_slice(ctx.date);
        out.extend_from_slice(b"\r\n\r\n");
        self.send(id, Chunk::Owned(out), ctx.outbox, ctx.dirty);
        // Everything queued so far (earlier pipelined responses, then the 101) goes first.
        self.unsent_101 = self.out.bytes();
        self.exempt = self.out.bytes();
        agreed.map_or(Mode::Off, |a| a.mode)
    }

    fn respond(
        &mut self,
        id: ConnId,
        r: &Response,
        keep_alive: bool,
        head: bool,
        ctx: &mut Ctx<'_>,
    ) {
        ctx.metrics.http_requests += 1;
        if r.status >= 400 {
            ctx.metrics.http_errors += 1;
        }
        if matches!(r.status, 411 | 413 | 429 | 431 | 503) {
            crate::limit_log!(
                ctx.throttle,
                LogEvent::HttpLimit,
                ctx.now.mono,
                info,
                "limit hit: {} {} for {}",
                r.status,
                http::reason(r.status),
                self.client
            );
        }
        let mut out = Vec::with_capacity(r.size_hint());
        let body = http::write_response_parts(&mut out, r, ctx.date, keep_alive, head);
        self.last_response = out.len() + body.map_or(0, <[u8]>::len);
        self.send(id, Chunk::Owned(out), ctx.outbox, ctx.dirty);
        if let Some(body) = body {
            // The pages are sent from the binary's own copy, never copied per response.
            self.send(id, Chunk::Static(body), ctx.outbox, ctx.dirty);
        }
        let now = ctx.now.mono;
        if !keep_alive || r.close {
            self.close_after_flush = true;
            self.state = State::Closing { since: now };
        } else {
            self.state = State::Http {
                busy_since: None,
                idle_since: now,
                continue_sent: false,
            };
            if self.out.bytes() > pause_bytes(ctx.cfg) {
                self.read_paused = true;
            }
        }
    }

    // ---- WebSocket ------------------------------------------------------------------

    fn ws_step(&mut self, id: ConnId, data: &mut [u8], ctx: &mut Ctx<'_>) -> Option<usize> {
        let max = ctx.cfg.max_ws_message;
        let now = ctx.now.mono;
        // The loop-wide inflater, lent to this step (a compressed message's event borrows it).
        let mut inflater = std::mem::take(ctx.inflate);
        let used = self.ws_decoded(id, data, max, now, &mut inflater, ctx);
        inflater.trim();
        ctx.metrics.inflated = inflater.messages;
        *ctx.inflate = inflater;
        used
    }

    fn ws_decoded(
        &mut self,
        id: ConnId,
        data: &mut [u8],
        max: usize,
        now: Micros,
        inflater: &mut Inflater,
        ctx: &mut Ctx<'_>,
    ) -> Option<usize> {
        let State::Ws(s) = &mut self.state else {
            return Some(data.len());
        };
        let step = s.ws.decode(data, max, inflater);
        if !matches!(step, Ok(Step::Need)) {
            s.last_rx = now;
            s.pinged = false;
        }
        match step {
            Ok(Step::Need) => None,
            Ok(Step::Consumed(n)) => {
                ctx.metrics.frames_in += 1;
                if !self.frame_allowed(id, ctx) {
                    return Some(data.len());
                }
                Some(n)
            }
            Ok(Step::Event(ev, n)) => {
                ctx.metrics.frames_in += 1;
                if !self.frame_allowed(id, ctx) {
                    return Some(data.len());
                }
                self.ws_event(id, ev, ctx);
                Some(n)
            }
            Err(CloseWith { code, reason }) => {
                if code == 1009 {
                    crate::limit_log!(
                        ctx.throttle,
                        LogEvent::WsLimit,
                        ctx.now.mono,
                        info,
                        "limit hit: {} sent a message over --max-ws-message (1009)",
                        self.client
                    );
                } else {
                    log::debug!("conn {} WebSocket protocol error {code}: {reason}", id.0);
                }
                self.close_ws(id, code, reason, ctx);
                Some(data.len())
            }
        }
    }

    /// Spends a chat socket's frame budget; a flood of frames of any kind ends in 1008.
    fn frame_allowed(&mut self, id: ConnId, ctx: &mut Ctx<'_>) -> bool {
        let State::Ws(s) = &mut self.state else {
            return true;
        };
        let SocketKind::Chat { frames, .. } = &mut s.kind else {
            return true;
        };
        let (rate, burst) = frame_budget(ctx.cfg);
        if frames.take(ctx.now.mono, rate, burst) {
            return true;
        }
        crate::limit_log!(
            ctx.throttle,
            LogEvent::WsLimit,
            ctx.now.mono,
            info,
            "limit hit: {} sent frames faster than {rate}/s (bursts of {burst}): closed with 1008",
            self.client
        );
        self.close_ws(id, 1008, "too many frames", ctx);
        false
    }

    fn ws_event(&mut self, id: ConnId, ev: WsEvent<'_>, ctx: &mut Ctx<'_>) {
        let (echo, room) = match &self.state {
            State::Ws(s) => (s.chat_room().is_none(), s.chat_room()),
            _ => (false, None),
        };
        match ev {
            WsEvent::Text(t) if echo => self.echo(id, true, t.as_bytes(), ctx),
            WsEvent::Binary(b) if echo => self.echo(id, false, &b, ctx),
            WsEvent::Text(t) => {
                if let Some(room) = room {
                    ctx.hub.on_text(id, room, &t, ctx.now);
                }
            }
            WsEvent::Binary(_) => {
                protocol::write_error(
                    ctx.frame.start(),
                    "invalid_json",
                    "Binary frames are not supported: send JSON in text frames",
                );
                let frame = ctx.frame.finish_text();
                self.send(id, Chunk::Shared(frame), ctx.outbox, ctx.dirty);
            }
            WsEvent::Ping(p) => {
                self.send(id, Chunk::Owned(ws::pong_frame(p)), ctx.outbox, ctx.dirty)
            }
            WsEvent::Pong => {}
            WsEvent::Close(code) => {
                self.leave(id, ctx, code.unwrap_or(1005));
                let reply = match code {
                    Some(c) => ws::close_frame(c, ""),
                    None => vec![0x88, 0x00],
                };
                self.send(id, Chunk::Owned(reply), ctx.outbox, ctx.dirty);
                self.close_after_flush = true;
            }
        }
    }

    /// The conformance echo: the same message back, compressed if it negotiated that.
    fn echo(&mut self, id: ConnId, text: bool, payload: &[u8], ctx: &mut Ctx<'_>) {
        let compressed = if self.compresses() {
            let first = if text { 0x81 } else { 0x82 };
            let f = ctx.deflate.frame(first, payload);
            ctx.metrics.compressed = ctx.deflate.compressions;
            f
        } else {
            None
        };
        let frame = match compressed {
            Some(f) => {
                ctx.metrics.frames_out_compressed += 1;
                f
            }
            None => ws::data_frame(text, payload),
        };
        self.send(id, Chunk::Owned(frame), ctx.outbox, ctx.dirty);
    }

    fn ws_timer(&mut self, id: ConnId, ctx: &mut Ctx<'_>) {
        let now = ctx.now.mono;
        let State::Ws(s) = &mut self.state else {
            return;
        };
        let (last_rx, pinged) = (s.last_rx, &mut s.pinged);
        if now >= last_rx + ctx.cfg.pong_timeout {
            ctx.metrics.timeouts += 1;
            self.close_ws(id, 1008, "no frame received in time (pong timeout)", ctx);
        } else if !*pinged && now >= last_rx + ctx.cfg.ping_interval {
            *pinged = true;
            self.send(id, Chunk::Static(ws::PING_FRAME), ctx.outbox, ctx.dirty);
        }
    }
}

fn ws_deadline(last_rx: Micros, pinged: bool, cfg: &Config) -> Micros {
    let pong = last_rx + cfg.pong_timeout;
    if pinged {
        pong
    } else {
        pong.min(last_rx + cfg.ping_interval)
    }
}

#[cfg(test)]
mod tests;
