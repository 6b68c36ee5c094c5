//! The event loop: one thread, one `mio::Poll`, every socket and every clock read.
//!
//! Each iteration: wait for readiness or the earliest timer deadline; accept; read every
//! readable connection into one loop-wide buffer and hand the bytes to its [`Conn`]; apply
//! the hub's actions (frames for members, closes); run due timers; then flush every
//! connection that got output with one gathered write each (`sendmsg`, `send` for one slice).
//!
//! The loop owns the listener and each socket's registration, the clock, the timers and the
//! slab of connections, and it makes the calls only it can (accept, `shutdown`, dropping a
//! socket); a connection reads and writes its own socket when the loop says it is ready
//! ([`Conn::read_in`], [`Conn::write_out`]). Nothing here decides protocol: what a
//! connection does with its bytes, what it
//! queues, when its output is over the cap (and how it is cut off: [`Conn::deliver`],
//! [`Conn::on_output_over_cap`]), when it has sent its last byte and lingers, and when a
//! paused connection may be read again ([`Conn::write_out`], [`Conn::may_read`]) is the
//! connection's own; the loop carries out the [`Next`] and [`Wrote`] it returns.
//! Cluster mode's Redis socket and the requests waiting on Redis are in `server/redis_link.rs`.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use crate::cluster::{Cluster, Facts, Query};
use crate::config::Config;
use crate::conn::{ClusterCtx, Conn, Ctx, Fanout, Got, Next, OverLimit, Wrote};
use crate::hub::{Action, Hub};
use crate::ids::{ConnHandle, ConnId};
use crate::metrics::{Gauges, Metrics};
use crate::outbox::{Outbox, Sock};
use crate::protocol::FrameBuf;
use crate::ratelimit::{Admit, ConnCounter, CreateLimiter};
use crate::throttle::{LogEvent, LogThrottle};
use crate::time::{Micros, Now, UnixMicros};
use crate::timer::Wheel;
use crate::tls;

mod redis_link;
use redis_link::{Held, Parked, RedisSocket};

const LISTENER: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);
/// Link `i` to Redis is `Token(REDIS_LAST - i)` (up to `cluster::MAX_LINKS` links).
const REDIS_LAST: usize = usize::MAX - 3;
const REDIS_FIRST: usize = REDIS_LAST + 1 - crate::cluster::MAX_LINKS;
/// Size of the one read buffer shared by all connections.
const READ_BUF: usize = 64 * 1024;
/// Reads per connection per iteration before others get their turn.
const READ_BUDGET: usize = 16;
/// Connections accepted beyond `--max-connections` only to be told 503.
const OVERFLOW: usize = 64;
/// How long accepting pauses after the process ran out of file descriptors.
const ACCEPT_BACKOFF: Micros = Micros(100_000);
/// Removed sessions, rooms and connections after which freed memory goes back to the OS,
/// at most this often while removals keep coming...
const RELEASE_AFTER: u64 = 1024;
const RELEASE_INTERVAL: Micros = Micros(1_000_000);
/// ...and this long after the last time when any removal has happened since.
const RELEASE_IDLE: Micros = Micros(10_000_000);
/// How long shutdown waits for close frames to be flushed.
const SHUTDOWN_GRACE: Micros = Micros(500_000);

/// How much later than its armed timer a connection's deadline may move before the timer is
/// moved too. Deadlines that follow activity (the idle timeout of a keep-alive connection, the
/// ping deadline of a WebSocket) move a little with every request or frame; their timer is
/// kept, fires at most this much early, finds nothing due and is armed again. Bigger moves
/// (a request finished, a socket upgraded) cancel the old timer, so nothing wakes for it.
const TIMER_SLACK: Micros = Micros(1_000_000);

/// The event loop and everything it owns: the listener, the connections (a slab indexed by
/// mio token), the hub, the connections' timer wheel, the loop-wide buffers and, in cluster
/// mode, the Redis side. [`Server::bind`], then [`Server::run`] until a signal ends it.
pub struct Server {
    cfg: Config,
    poll: Poll,
    listener: Option<TcpListener>,
    signals: Signals,
    local_addr: SocketAddr,
    conns: Slab<Conn>,
    /// Connections removed so far; with the hub's removals, when to give memory back.
    conns_removed: u64,
    release: Option<fn()>,
    freed_at_release: u64,
    released_at: Micros,
    hub: Hub,
    wheel: Wheel<ConnHandle>,
    fired: Vec<ConnHandle>,
    rbuf: Box<[u8]>,
    outbox: Outbox,
    dirty: Vec<usize>,
    again: Vec<usize>,
    doomed: Vec<(usize, Doom)>,
    frame: FrameBuf,
    /// permessage-deflate: the one inflater and the one compressor of the loop.
    inflate: crate::deflate::Inflater,
    deflate: crate::deflate::Deflater,
    limiter: CreateLimiter,
    /// Open connections per client address, for `--max-connections-per-ip`.
    per_ip: ConnCounter,
    throttle: LogThrottle,
    metrics: Metrics,
    websockets: usize,
    serial: u32,
    start: Instant,
    date: Vec<u8>,
    date_secs: u64,
    accept_paused_until: Option<Micros>,
    shutdown_at: Option<Micros>,
    /// Cluster mode only: the Redis side, its socket and the requests waiting on it.
    cluster: Option<Cluster>,
    redis: Vec<Option<RedisSocket>>,
    parked: HashMap<usize, Parked>,
    held: Vec<Held>,
    /// Facts fetched for the request being run again (empty otherwise).
    facts: Facts,
    /// Queries the request just run asked for.
    wants: Vec<Query>,
    /// TLS on the listener (`--tls-cert`): the certificate in use, and loop-wide buffers.
    tls: Option<tls::Acceptor>,
    tls_scratch: tls::Scratch,
    /// `rediss://`: the CAs Redis is verified with.
    redis_tls: Option<tls::RedisTlsConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Doom {
    /// Its output queue passed the limit: close 1013 and free it.
    SlowConsumer,
    /// The socket failed or the peer is gone.
    Gone,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .field("connections", &self.conns.len())
            .field("websockets", &self.websockets)
            .field("hub", &self.hub)
            .field("cluster", &self.cluster)
            .field("tls", &self.tls.is_some())
            .field("shutting_down", &self.shutdown_at.is_some())
            .finish_non_exhaustive()
    }
}

/// The listening socket: `SO_REUSEADDR` (as `mio` sets it), optionally `SO_REUSEPORT` so
/// several processes can listen on one port and the kernel spreads new connections over them.
fn listen(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(TcpListener::from_std(socket.into()))
}

impl Server {
    /// Binds the listening socket (port 0 picks a free one).
    pub fn bind(cfg: Config) -> io::Result<Server> {
        let addr = (cfg.host.as_str(), cfg.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("cannot resolve host {:?}", cfg.host),
                )
            })?;
        let mut listener = listen(addr, cfg.reuse_port)?;
        let local_addr = listener.local_addr()?;
        if cfg.reuse_port && cfg.redis.is_none() {
            log::warn!(
                "--reuse-port without --redis: nodes sharing this port share no sessions or rooms"
            );
        }
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let tls = match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(cert), Some(key)) => Some(
                tls::Acceptor::load(cert, key)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            ),
            _ => None,
        };
        let redis_tls = match &cfg.redis {
            Some(url) if url.tls => Some(
                tls::RedisTlsConfig::load(cfg.redis_ca.as_deref())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            ),
            _ => None,
        };
        // SIGHUP reloads the certificate; without TLS it keeps its default meaning.
        let mut signals = if tls.is_some() {
            Signals::new([SIGTERM, SIGINT, SIGHUP])?
        } else {
            Signals::new([SIGTERM, SIGINT])?
        };
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let mut hub = Hub::new(cfg.hub_config());
        let limiter = CreateLimiter::new(cfg.create_rate, cfg.create_burst);
        let per_ip = ConnCounter::new(cfg.max_connections_per_ip);
        let cluster = cfg.redis.as_ref().map(|url| {
            hub.enable_cluster();
            let node = crate::ids::SecureRandom::default().u64() as u32;
            log::info!("cluster mode: sharing rooms through {url}");
            Cluster::new(cfg.cluster_config(url), node)
        });
        let deflate = crate::deflate::Deflater::new(cfg.deflate_min_bytes);
        Ok(Server {
            cfg,
            poll,
            listener: Some(listener),
            conns_removed: 0,
            release: None,
            freed_at_release: 0,
            released_at: Micros::ZERO,
            signals,
            local_addr,
            conns: Slab::new(),
            hub,
            wheel: Wheel::new(),
            fired: Vec::new(),
            rbuf: vec![0; READ_BUF].into_boxed_slice(),
            outbox: Outbox::default(),
            dirty: Vec::new(),
            again: Vec::new(),
            doomed: Vec::new(),
            frame: FrameBuf::default(),
            inflate: crate::deflate::Inflater::default(),
            deflate,
            limiter,
            per_ip,
            throttle: LogThrottle::default(),
            metrics: Metrics::default(),
            websockets: 0,
            serial: 0,
            start: Instant::now(),
            date: Vec::new(),
            date_secs: u64::MAX,
            accept_paused_until: None,
            shutdown_at: None,
            cluster,
            redis: Vec::new(),
            parked: HashMap::new(),
            held: Vec::new(),
            facts: Facts::default(),
            wants: Vec::new(),
            tls,
            tls_scratch: tls::Scratch::default(),
            redis_tls,
        })
    }

    /// The address the listener is bound to (with the port the OS chose for `--port 0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `https` with `--tls-cert`, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// Runs until SIGTERM/SIGINT, then closes every WebSocket with 1001 and returns.
    pub fn run(&mut self) -> io::Result<()> {
        // A bounded batch keeps one wakeup short even when a thousand sockets close at once.
        let mut events = Events::with_capacity(256);
        loop {
            let timeout = self.poll_timeout();
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            let began = Instant::now();
            self.metrics.wakeups += 1;
            let now = self.clock();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(now),
                    Token(t) if (REDIS_FIRST..=REDIS_LAST).contains(&t) => {
                        self.redis_ready(REDIS_LAST - t, now)
                    }
                    SIGNALS => {
                        let signals: Vec<i32> = self.signals.pending().collect();
                        for sig in signals {
                            if sig == SIGHUP {
                                self.reload_tls();
                            } else {
                                self.begin_shutdown(now);
                            }
                        }
                    }
                    Token(id) => {
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            // Only a peer still open may be read "until a short read".
                            let drain = event.is_read_closed() || event.is_error();
                            self.read(id, now, drain);
                        }
                        if event.is_writable() {
                            self.mark_dirty(id);
                        }
                    }
                }
            }
            self.after_events(now);
            self.metrics.loop_time(began.elapsed().as_micros() as u64);
            if let Some(at) = self.shutdown_at
                && (self.conns.is_empty() || now.mono >= at)
            {
                log::info!("shutdown complete");
                return Ok(());
            }
        }
    }

    /// Work that follows the events of one wakeup: re-reads, timers, accept retry, flush.
    fn after_events(&mut self, now: Now) {
        if !self.again.is_empty() {
            let again = std::mem::take(&mut self.again);
            for &id in &again {
                self.resume_input(id, now);
            }
            let mut again = again;
            again.clear();
            if self.again.is_empty() {
                self.again = again;
            }
        }
        if self.accept_paused_until.is_some_and(|t| now.mono >= t) {
            self.accept_paused_until = None;
            self.accept(now);
        }
        self.run_timers(now);
        self.cluster_timers(now);
        self.flush_all(now);
        self.redis_write(now);
        if !self.dirty.is_empty() {
            // Writing to Redis dropped the link (its queue was full): what that sent to
            // members (error frames, notices) goes out now, not at the next wakeup.
            self.flush_all(now);
            self.redis_write(now);
        }
        self.release_memory(now);
    }

    /// Sets what hands freed memory back to the operating system (the binary passes glibc's
    /// `malloc_trim`); the loop calls it after sessions, rooms or connections have gone.
    pub fn set_release_memory(&mut self, release: fn()) {
        self.release = Some(release);
    }

    /// Removals (sessions, rooms, connections) since memory was last given back.
    fn unreleased(&self) -> u64 {
        self.hub.freed() + self.conns_removed - self.freed_at_release
    }

    /// When the loop must wake to give memory back even if nothing else happens.
    fn release_deadline(&self) -> Option<Micros> {
        (self.release.is_some() && self.unreleased() > 0).then(|| self.released_at + RELEASE_IDLE)
    }

    /// After a storm its memory is free, but the allocator keeps it unless told. Give it back
    /// during a storm at most once a second (every `RELEASE_AFTER` removals), and otherwise
    /// `RELEASE_IDLE` after the last time, so whatever the last removals freed comes back too.
    fn release_memory(&mut self, now: Now) {
        let Some(release) = self.release else {
            return;
        };
        let pending = self.unreleased();
        let due = (pending >= RELEASE_AFTER && now.mono >= self.released_at + RELEASE_INTERVAL)
            || self.release_deadline().is_some_and(|at| now.mono >= at);
        if !due {
            return;
        }
        let began = Instant::now();
        // The loop's own reusable tables and buffers first, so what they held after the peak
        // is free when the allocator is asked to give memory back.
        self.hub.shrink_buffers();
        self.wheel.shrink();
        self.outbox.shrink();
        if self.conns.capacity() > 64 && self.conns.len() < self.conns.capacity() / 4 {
            self.conns.shrink_to_fit();
        }
        release();
        log::debug!(
            "gave free memory back to the OS after {pending} removals ({} us)",
            began.elapsed().as_micros()
        );
        self.freed_at_release += pending;
        self.released_at = now.mono;
    }

    /// How long poll may sleep: until the earliest timer, or not at all if work is waiting.
    fn poll_timeout(&self) -> Option<Duration> {
        if !self.again.is_empty() {
            return Some(Duration::ZERO);
        }
        let next = [
            self.wheel.next_deadline(),
            self.hub.poll_timeout(),
            self.accept_paused_until,
            self.shutdown_at,
            self.cluster.as_ref().and_then(Cluster::poll_timeout),
            self.release_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()?;
        let now = Micros::from_duration(self.start.elapsed());
        // Round up so that a deadline is never woken for early (no busy loop before it).
        Some(Duration::from_micros(
            next.since(now).0.div_ceil(1000) * 1000,
        ))
    }

    fn clock(&mut self) -> Now {
        let mono = Micros::from_duration(self.start.elapsed());
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        if wall.as_secs() != self.date_secs {
            self.date_secs = wall.as_secs();
            self.date = httpdate::fmt_http_date(SystemTime::now()).into_bytes();
        }
        Now {
            mono,
            wall: UnixMicros(wall.as_micros() as u64),
        }
    }

    // ---- accept ---------------------------------------------------------------------

    fn accept(&mut self, now: Now) {
        if self.accept_paused_until.is_some() {
            return;
        }
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    self.metrics.accepted += 1;
                    let open = self.conns.len();
                    if open >= self.cfg.max_connections + OVERFLOW {
                        self.metrics.refused_full += 1;
                        continue; // dropped: closes at once
                    }
                    let session = match self.tls.as_ref().map(tls::Acceptor::session) {
                        None => None,
                        Some(Ok(s)) => Some(s),
                        Some(Err(e)) => {
                            log::warn!("{e}");
                            continue;
                        }
                    };
                    // A trusted proxy carries many clients: its connections count under the
                    // client a PROXY header names (Conn::proxy_header), if any.
                    let trusted = self.cfg.trusted_proxy.contains(peer.ip());
                    let admit = match trusted {
                        true => Admit::Serve(None),
                        false => self.per_ip.admit(peer.ip()),
                    };
                    let (counted, over_ip) = match admit {
                        Admit::Serve(key) => (key, false),
                        Admit::Refuse(key) => (Some(key), true),
                        Admit::Drop => {
                            self.metrics.refused_per_ip += 1;
                            continue; // dropped: closes at once
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let entry = self.conns.vacant_entry();
                    let id = entry.key();
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        Token(id),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        log::warn!("cannot register a new connection: {e}");
                        if let Some(key) = counted {
                            self.per_ip.release(key);
                        }
                        continue;
                    }
                    self.serial = self.serial.wrapping_add(1);
                    let over = if open >= self.cfg.max_connections {
                        crate::limit_log!(
                            self.throttle,
                            LogEvent::ConnectionLimit,
                            now.mono,
                            warn,
                            "connection limit ({}) reached: refusing {peer} with 503",
                            self.cfg.max_connections
                        );
                        Some(OverLimit::Server)
                    } else if over_ip {
                        crate::limit_log!(
                            self.throttle,
                            LogEvent::ConnectionLimit,
                            now.mono,
                            info,
                            "per-address connection limit ({}) reached: refusing {} with 503",
                            self.cfg.max_connections_per_ip,
                            peer.ip()
                        );
                        Some(OverLimit::Address)
                    } else {
                        None
                    };
                    let mut conn = Conn::new(
                        Sock(stream),
                        self.serial,
                        peer.ip(),
                        trusted,
                        now.mono,
                        over,
                    );
                    conn.counted_as = counted;
                    conn.tls = session;
                    entry.insert(conn);
                    self.arm(id);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: the pending connection stays in the backlog and
                    // the listener stays readable; back off instead of spinning on it.
                    self.metrics.accept_errors += 1;
                    crate::limit_log!(
                        self.throttle,
                        LogEvent::AcceptError,
                        now.mono,
                        warn,
                        "accept failed ({e}); pausing accepts for {} ms",
                        ACCEPT_BACKOFF.0 / 1000
                    );
                    self.accept_paused_until = Some(now.mono + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    // ---- read -----------------------------------------------------------------------

    /// Reads what the socket has. `drain`: read until `WouldBlock` or EOF even after a short
    /// read (the event said the peer closed, so no further edge will come for its FIN).
    fn read(&mut self, id: usize, now: Now, drain: bool) {
        for _ in 0..READ_BUDGET {
            // Requests it already holds go first (`resume_input`): the input buffer never
            // holds more than one incomplete request and one read.
            if !self.conns.get(id).is_some_and(Conn::may_read) {
                return;
            }
            let mut rbuf = std::mem::take(&mut self.rbuf); // an empty Box: no allocation
            let mut plain = std::mem::take(&mut self.tls_scratch.plain);
            let got = self.with_conn(id, now, |conn, ctx| {
                conn.read_in(ConnId(id), &mut rbuf, &mut plain, ctx)
            });
            self.rbuf = rbuf;
            self.tls_scratch.plain = plain;
            let n = match got {
                Some(Got::Bytes(n)) => n,
                None | Some(Got::Blocked) => return,
                Some(Got::Eof) => {
                    self.eof(id, now);
                    return;
                }
                Some(Got::Failed) => {
                    self.doom(id, Doom::Gone);
                    self.apply_actions(now);
                    return;
                }
            };
            self.apply_actions(now);
            self.after_input(id, now);
            self.arm(id);
            if n < READ_BUF && !drain {
                // A short read drained the socket (epoll(7): for stream sockets this is as
                // good as EAGAIN, and new data raises a new edge), so skip the read that would
                // only say WouldBlock: one system call less per request or message.
                return;
            }
        }
        // Budget spent with data perhaps still waiting: continue next iteration.
        self.again.push(id);
    }

    /// Continues a connection that stopped: first the requests it already holds (answering
    /// stopped at the pause mark; no new readable edge will come for them), then the socket.
    fn resume_input(&mut self, id: usize, now: Now) {
        let Some(conn) = self.conns.get(id) else {
            return;
        };
        if !conn.may_resume() {
            return;
        }
        if conn.holds_unanswered() {
            self.input(id, 0, now);
            self.apply_actions(now);
            self.after_input(id, now);
            self.arm(id);
        }
        if self.conns.get(id).is_some_and(Conn::may_resume) {
            self.read(id, now, true);
        }
    }

    /// Feeds `rbuf[..n]` (after any bytes kept from before) to the connection: with `n`
    /// 0, it answers the requests it holds (see [`Conn::input`]).
    fn input(&mut self, id: usize, n: usize, now: Now) {
        let mut rbuf = std::mem::take(&mut self.rbuf); // an empty Box: no allocation
        let mut plain = std::mem::take(&mut self.tls_scratch.plain);
        let next = self.with_conn(id, now, |conn, ctx| {
            conn.input(ConnId(id), &mut rbuf[..n], &mut plain, ctx)
        });
        self.rbuf = rbuf;
        self.tls_scratch.plain = plain;
        if next == Some(Next::Drop) {
            self.doom(id, Doom::Gone);
        }
    }

    /// SIGHUP: reads the certificate and key again; a bad pair is refused and the old kept.
    fn reload_tls(&mut self) {
        let Some(acceptor) = &mut self.tls else {
            return;
        };
        match acceptor.reload() {
            Ok(()) => log::info!("SIGHUP: TLS certificate and key reloaded"),
            Err(e) => {
                log::warn!("SIGHUP: TLS reload refused ({e}); keeping the current certificate")
            }
        }
    }

    fn eof(&mut self, id: usize, now: Now) {
        let next = self.with_conn(id, now, |conn, ctx| conn.on_eof(ConnId(id), ctx));
        if next == Some(Next::Drop) {
            self.remove(id, now);
        }
        self.apply_actions(now);
    }

    // ---- hub actions ------------------------------------------------------------------

    /// Moves the hub's frames onto members' queues and carries out its closes; in cluster
    /// mode also hands its shared-state changes to the Redis side.
    fn apply_actions(&mut self, now: Now) {
        while self.hub.has_actions() {
            let mut closes = Vec::new();
            for action in self.hub.drain_actions() {
                match action {
                    Action::Send(ConnId(id), frame) => {
                        if let Some(conn) = self.conns.get_mut(id) {
                            let mut fanout = Fanout {
                                outbox: &mut self.outbox,
                                dirty: &mut self.dirty,
                                deflate: &mut self.deflate,
                                metrics: &mut self.metrics,
                                cap: self.cfg.max_output_queue,
                            };
                            if conn.deliver(ConnId(id), frame, &mut fanout) {
                                self.doomed.push((id, Doom::SlowConsumer));
                            }
                        }
                    }
                    Action::Close(ConnId(id), code, reason) => closes.push((id, code, reason)),
                }
            }
            self.deflate.end_round();
            self.metrics.compressed = self.deflate.compressions;
            for (id, code, reason) in closes {
                self.with_conn(id, now, |conn, ctx| {
                    conn.closed_by_hub(ConnId(id), code, reason, ctx)
                });
            }
            self.bury(now);
        }
        self.bury(now);
        // After the closes above, whose leaving adds changes too (one ordered list of ops).
        if let Some(cluster) = &mut self.cluster
            && self.hub.has_ops()
        {
            for op in self.hub.drain_ops() {
                cluster.apply(op, now);
            }
        }
    }

    /// Marks a connection to be closed once the current step is over.
    fn doom(&mut self, id: usize, why: Doom) {
        self.doomed.push((id, why));
    }

    /// Closes doomed connections; their leaving may produce more actions.
    fn bury(&mut self, now: Now) {
        while let Some((id, why)) = self.doomed.pop() {
            if !self.conns.contains(id) {
                continue;
            }
            if why == Doom::SlowConsumer {
                let next = self.with_conn(id, now, |conn, ctx| {
                    conn.on_output_over_cap(ConnId(id), ctx)
                });
                if next == Some(Next::Keep) {
                    self.arm(id);
                    continue;
                }
            }
            self.remove(id, now);
        }
    }

    /// Drops a connection, leaving its room first if it was a member.
    fn remove(&mut self, id: usize, now: Now) {
        self.with_conn(id, now, |conn, ctx| conn.leave(ConnId(id), ctx, 1006));
        if self.conns.contains(id) {
            let conn = self.conns.remove(id); // closes the socket
            self.conns_removed += 1;
            if let Some(t) = conn.timer {
                self.wheel.cancel(t);
            }
            if let Some(key) = conn.counted_as {
                self.per_ip.release(key);
            }
        }
    }

    // ---- timers -----------------------------------------------------------------------

    /// Moves the connection's timer to its deadline: at once if the deadline moved earlier
    /// or more than [`TIMER_SLACK`] later (cancelling the old timer), otherwise when the
    /// timer fires.
    fn arm(&mut self, id: usize) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        let at = conn.deadline(&self.cfg);
        if conn.timer.is_some() && at >= conn.timer_at && at.since(conn.timer_at) <= TIMER_SLACK {
            return;
        }
        if let Some(t) = conn.timer.take() {
            self.wheel.cancel(t);
        }
        conn.timer_at = at;
        let item = ConnHandle {
            token: id,
            serial: conn.serial,
        };
        conn.timer = Some(self.wheel.arm(at, item));
    }

    fn run_timers(&mut self, now: Now) {
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.advance(now.mono, &mut fired);
        for t in fired.drain(..) {
            // (A stale timer never happens: a connection's timer is cancelled when it goes.)
            let Some(conn) = self.live_mut(t) else {
                continue;
            };
            conn.timer = None; // it just fired
            conn.timer_at = Micros::MAX;
            let next = self.with_conn(t.token, now, |conn, ctx| {
                conn.on_timer(ConnId(t.token), ctx)
            });
            if next == Some(Next::Drop) {
                self.remove(t.token, now);
            } else {
                self.arm(t.token);
            }
            self.apply_actions(now);
        }
        self.fired = fired;
        self.hub.handle_timeout(now);
        self.apply_actions(now);
    }

    // ---- write ----------------------------------------------------------------------

    fn mark_dirty(&mut self, id: usize) {
        if let Some(conn) = self.conns.get_mut(id)
            && !conn.dirty
        {
            conn.dirty = true;
            self.dirty.push(id);
        }
    }

    /// One vectored write per connection with output; then this iteration's chunks are done.
    fn flush_all(&mut self, now: Now) {
        while !self.dirty.is_empty() {
            let dirty = std::mem::take(&mut self.dirty);
            for &id in &dirty {
                self.flush(id, now);
            }
            self.bury(now);
            let mut dirty = dirty;
            dirty.clear();
            if self.dirty.is_empty() {
                self.dirty = dirty;
            }
        }
        self.outbox.end_round();
    }

    fn flush(&mut self, id: usize, now: Now) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        let wrote = conn.write_out(
            &mut self.outbox,
            &mut self.tls_scratch,
            &mut self.metrics,
            &self.cfg,
            now.mono,
        );
        match wrote {
            Wrote::Done => {}
            Wrote::ShutWrite => {
                let _ = conn.stream.shutdown(Shutdown::Write);
                self.arm(id);
            }
            Wrote::OverCap => self.doom(id, Doom::SlowConsumer),
            Wrote::ResumeReading => self.again.push(id),
            Wrote::Failed(e) => {
                log::debug!("conn {id} write error: {e}");
                self.doom(id, Doom::Gone);
            }
        }
    }

    // ---- shutdown -------------------------------------------------------------------

    fn begin_shutdown(&mut self, now: Now) {
        if self.shutdown_at.is_some() {
            return;
        }
        log::info!(
            "shutting down: closing {} connections ({} WebSockets) with 1001",
            self.conns.len(),
            self.websockets
        );
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        self.shutdown_at = Some(now.mono + SHUTDOWN_GRACE);
        self.hub.release_all();
        self.apply_actions(now);
        let ids: Vec<usize> = self.conns.iter().map(|(id, _)| id).collect();
        for id in ids {
            let next = self.with_conn(id, now, |conn, ctx| conn.on_shutdown(ConnId(id), ctx));
            if next == Some(Next::Drop) {
                self.remove(id, now);
            }
        }
        self.apply_actions(now);
    }

    // ---- helpers --------------------------------------------------------------------

    fn gauges(&self) -> Gauges {
        Gauges {
            connections: self.conns.len(),
            websockets: self.websockets,
            conn_timers: self.wheel.len(),
            hub: self.hub.stats(),
            cluster: self
                .cluster
                .as_ref()
                .map(|c| (c.is_up(), self.parked.len() + self.held.len())),
        }
    }

    /// The connection `h` names, if it is still there (not a later one in its slot).
    fn live_mut(&mut self, h: ConnHandle) -> Option<&mut Conn> {
        self.conns.get_mut(h.token).filter(|c| c.serial == h.serial)
    }

    /// Runs `f` with one connection and the context it may touch.
    fn with_conn<R>(
        &mut self,
        id: usize,
        now: Now,
        f: impl FnOnce(&mut Conn, &mut Ctx<'_>) -> R,
    ) -> Option<R> {
        let gauges = self.gauges();
        let Server {
            conns,
            hub,
            cfg,
            outbox,
            dirty,
            metrics,
            websockets,
            frame,
            inflate,
            deflate,
            date,
            limiter,
            per_ip,
            throttle,
            cluster,
            facts,
            wants,
            ..
        } = self;
        let cluster = cluster.as_ref().map(|c| ClusterCtx {
            up: c.is_up(),
            facts,
            wants,
        });
        let conn = conns.get_mut(id)?;
        let mut ctx = Ctx {
            hub,
            cfg,
            now,
            date,
            outbox,
            dirty,
            metrics,
            gauges,
            websockets,
            frame,
            inflate,
            deflate,
            limiter,
            per_ip,
            throttle,
            cluster,
        };
        Some(f(conn, &mut ctx))
    }
}
