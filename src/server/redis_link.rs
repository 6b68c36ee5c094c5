//! Cluster mode's side of the event loop: the Redis socket (connect, read, pipelined write,
//! `rediss://`), and the requests that wait on Redis: parked ones (they asked for facts, see
//! [`Query`]) and held ones (their answer goes out once Redis has acknowledged what they
//! changed). The Redis protocol itself is the pure [`Cluster`](crate::cluster::Cluster) state machine; this file only
//! moves its bytes and carries out its [`ClusterEvent`]s. Part of [`Server`]: the same
//! `impl`, split off so `server.rs` reads as the loop alone.

use std::io::{self, Read, Write};
use std::net::ToSocketAddrs;

use mio::Interest;
use mio::net::TcpStream;

use mio::Token;

use super::{REDIS_LAST, Server};
use crate::cluster::slots::Addr;
use crate::cluster::{Answer, Event as ClusterEvent, Facts, MAX_LINKS, Query};
use crate::ids::{ConnHandle, ConnId};
use crate::throttle::LogEvent;
use crate::time::Now;
use crate::tls;

/// A connection to Redis (`--redis`; one per master of a sharded cluster), registered with
/// the loop's poll as `Token(REDIS_LAST - i)` for link `i`.
pub(super) struct RedisSocket {
    pub(super) stream: TcpStream,
    pub(super) connected: bool,
    /// `rediss://` only.
    pub(super) tls: Option<tls::RedisTls>,
    /// The epoch of the link it serves (see [`RedisLink`](crate::cluster::RedisLink)).
    pub(super) epoch: u64,
}

/// A request waiting for facts from Redis.
pub(super) struct Parked {
    pub(super) serial: u32,
    pub(super) waiting: usize,
    pub(super) facts: Facts,
}

/// A response held until Redis has answered every command up to `seq`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Held {
    pub(super) conn: ConnHandle,
    pub(super) seq: u64,
}

impl Server {
    /// After a connection's input was handled: park it if its request asked Redis for
    /// facts, or hold its response until Redis has acknowledged what the request changed.
    pub(super) fn after_input(&mut self, id: usize, now: Now) {
        // What was fetched for this request so far stays with it if it asks for more (a
        // WebSocket join asks in rounds, and a later round must not ask again).
        let facts = std::mem::take(&mut self.facts);
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        let Some(conn) = self.conns.get(id) else {
            self.wants.clear();
            return;
        };
        if !conn.waiting {
            self.wants.clear();
            return;
        }
        let serial = conn.serial;
        if self.wants.is_empty() {
            self.held.push(Held {
                conn: ConnHandle { token: id, serial },
                seq: cluster.sent(),
            });
            return;
        }
        let waiting = self.wants.len();
        self.parked.insert(
            id,
            Parked {
                serial,
                waiting,
                facts,
            },
        );
        for q in self.wants.drain(..) {
            cluster.fetch(id, serial, q, now);
        }
        self.pump_cluster(now);
    }

    /// Runs a parked request again with what Redis said.
    pub(super) fn resume(&mut self, id: usize, facts: Facts, now: Now) {
        let Some(conn) = self.conns.get_mut(id) else {
            return;
        };
        conn.waiting = false;
        self.mark_dirty(id);
        // Bytes that arrived meanwhile raised no new edge: read them next iteration.
        self.again.push(id);
        self.facts = facts;
        self.input(id, 0, now);
        self.apply_actions(now);
        self.after_input(id, now);
        self.arm(id);
    }

    /// Carries out what the Redis side asks for until it has nothing more.
    pub(super) fn pump_cluster(&mut self, now: Now) {
        loop {
            self.sync_links(now);
            let Some(cluster) = &mut self.cluster else {
                return;
            };
            let answered = cluster.answered();
            let events: Vec<ClusterEvent> = cluster.drain_events().collect();
            let released = self.release_held(answered, now);
            if events.is_empty() && !released {
                return;
            }
            for e in events {
                self.cluster_event(e, now);
            }
            self.apply_actions(now);
        }
    }

    /// Lets out responses whose writes Redis has acknowledged; `true` if any.
    pub(super) fn release_held(&mut self, answered: u64, now: Now) -> bool {
        if self.held.iter().all(|h| h.seq > answered) {
            return false;
        }
        let (ready, rest): (Vec<Held>, Vec<Held>) =
            self.held.drain(..).partition(|h| h.seq <= answered);
        self.held = rest;
        for h in ready {
            if self.live_mut(h.conn).is_some() {
                self.resume(h.conn.token, Facts::default(), now);
            }
        }
        true
    }

    pub(super) fn cluster_event(&mut self, e: ClusterEvent, now: Now) {
        match e {
            ClusterEvent::Up => self.hub.set_cluster_up(true),
            ClusterEvent::Down => {
                self.hub.set_cluster_up(false);
                for h in std::mem::take(&mut self.held) {
                    if self.live_mut(h.conn).is_some() {
                        let id = h.conn.token;
                        self.with_conn(id, now, |conn, ctx| conn.redis_lost(ConnId(id), ctx));
                        self.arm(id);
                    }
                }
            }
            ClusterEvent::Answer {
                token,
                serial,
                query,
                answer,
            } => {
                match (&query, &answer) {
                    (Query::Session(id), Answer::Session(Some((user, user_id)))) => {
                        self.hub.install_session(*id, user, *user_id, now)
                    }
                    (Query::RoomExists(room), Answer::Room(Some(settings))) => {
                        self.hub.install_room(*room, *settings, now)
                    }
                    (Query::Member(session, room), Answer::Member(member)) => {
                        self.hub.install_member(*session, *room, *member)
                    }
                    _ => {}
                }
                self.answered(token, serial, Some((query, answer)), now);
            }
            ClusterEvent::Failed { token, serial } => self.answered(token, serial, None, now),
            ClusterEvent::Deliver { room, id, json } => {
                self.hub.deliver_event(room, id, &json, now)
            }
            ClusterEvent::Typing { room, except, json } => {
                self.hub.deliver_typing(room, except, &json)
            }
            ClusterEvent::Loaded {
                room,
                messages,
                catch_up: false,
            } => self.hub.load_history(room, messages, now),
            ClusterEvent::Loaded {
                room,
                messages,
                catch_up: true,
            } => self.hub.catch_up(room, messages, now),
            ClusterEvent::Departed {
                room,
                user,
                user_id,
            } => self.hub.departed_elsewhere(room, &user, user_id, now),
            ClusterEvent::SessionEnded(id) => self.hub.session_ended_elsewhere(id, now),
            ClusterEvent::Unconfirmed { room, id, json } => {
                self.hub.unconfirmed(room, id, &json, now)
            }
        }
    }

    /// One answer (or failure) for a parked request; runs it again once all are in.
    pub(super) fn answered(
        &mut self,
        token: usize,
        serial: u32,
        fact: Option<(Query, Answer)>,
        now: Now,
    ) {
        let Some(p) = self.parked.get_mut(&token) else {
            return;
        };
        if p.serial != serial {
            return;
        }
        match fact {
            Some((q, a)) => p.facts.add(q, a),
            None => p.facts.failed = true,
        }
        p.waiting -= 1;
        if p.waiting > 0 {
            return;
        }
        if let Some(p) = self.parked.remove(&token)
            && self.live_mut(ConnHandle { token, serial }).is_some()
        {
            self.resume(token, p.facts, now);
        }
    }

    /// Connects to Redis when it is time, and runs heartbeats and the connect timeout.
    pub(super) fn cluster_timers(&mut self, now: Now) {
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        if self.shutdown_at.is_none() {
            cluster.should_connect(now);
        }
        if let Some(cluster) = &mut self.cluster {
            cluster.on_timer(now);
        }
        self.pump_cluster(now);
    }

    /// Makes the sockets match the links the Redis side wants: a socket per link (each
    /// registered with its own token), none for a link that is gone or was made anew.
    pub(super) fn sync_links(&mut self, now: Now) {
        loop {
            let Some(cluster) = &self.cluster else {
                return;
            };
            let want = cluster.link_count().min(MAX_LINKS);
            for i in 0..self.redis.len() {
                let current = cluster.link(i).map(|(_, epoch)| epoch);
                if let Some(sock) = &self.redis[i]
                    && (i >= want || current != Some(sock.epoch))
                    && let Some(mut sock) = self.redis[i].take()
                {
                    let _ = self.poll.registry().deregister(&mut sock.stream);
                }
            }
            self.redis.truncate(want);
            self.redis.resize_with(want, || None);
            let Some(i) = self.redis.iter().position(Option::is_none) else {
                return;
            };
            // One at a time: a failed connect changes what the Redis side wants.
            self.redis_connect(i, now);
        }
    }

    fn redis_connect(&mut self, i: usize, now: Now) {
        let Some((addr, epoch)) = self
            .cluster
            .as_ref()
            .and_then(|c| c.link(i))
            .map(|(a, e)| (a.clone(), e))
        else {
            return;
        };
        let resolved = (addr.host.as_str(), addr.port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next());
        let result = match resolved {
            Some(a) => TcpStream::connect(a),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("cannot resolve {}", addr.host),
            )),
        };
        let tls = match self.redis_tls.as_ref().map(|t| t.connect(&addr.host)) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(e)) => {
                return self.redis_connect_failed(&addr, &io::Error::other(e), now);
            }
        };
        match result.and_then(|mut stream| {
            self.poll.registry().register(
                &mut stream,
                Token(REDIS_LAST - i),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok(stream)
        }) {
            Ok(stream) => {
                self.redis[i] = Some(RedisSocket {
                    stream,
                    connected: false,
                    tls,
                    epoch,
                })
            }
            Err(e) => self.redis_connect_failed(&addr, &e, now),
        }
    }

    fn redis_connect_failed(&mut self, addr: &Addr, e: &io::Error, now: Now) {
        crate::limit_log!(
            self.throttle,
            LogEvent::Redis,
            now.mono,
            warn,
            "cannot connect to Redis at {addr}: {e}"
        );
        self.redis_lost(now);
    }

    /// Link `i`'s socket is ready (connected, readable or writable).
    pub(super) fn redis_ready(&mut self, i: usize, now: Now) {
        let Some(Some(sock)) = self.redis.get_mut(i) else {
            return;
        };
        if !sock.connected {
            match sock.stream.take_error() {
                Ok(None) if sock.stream.peer_addr().is_ok() => {
                    sock.connected = true;
                    let _ = sock.stream.set_nodelay(true);
                    if let Some(c) = &mut self.cluster {
                        c.on_connected(i);
                    }
                }
                Ok(None) => return, // still connecting
                Ok(Some(e)) | Err(e) => {
                    let addr = self.link_addr(i);
                    self.redis_connect_failed(&addr, &e, now);
                    return;
                }
            }
        }
        loop {
            let Some(Some(sock)) = self.redis.get_mut(i) else {
                return;
            };
            match sock.stream.read(&mut self.rbuf) {
                Ok(0) => {
                    log::warn!("Redis closed the connection");
                    self.redis_lost(now);
                    return;
                }
                Ok(n) => {
                    let plain = &mut self.tls_scratch.plain;
                    let data = match &mut sock.tls {
                        None => &self.rbuf[..n],
                        Some(t) => {
                            plain.clear();
                            if let Err(e) = t.read(&self.rbuf[..n], plain) {
                                log::warn!("TLS with Redis failed: {e}");
                                self.redis_lost(now);
                                return;
                            }
                            &plain[..]
                        }
                    };
                    let ok = self
                        .cluster
                        .as_mut()
                        .is_some_and(|c| c.on_link_bytes(i, data, now));
                    if !ok {
                        self.redis_lost(now);
                        return;
                    }
                    self.pump_cluster(now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("Redis connection failed: {e}");
                    self.redis_lost(now);
                    return;
                }
            }
        }
        self.redis_write(now);
    }

    fn link_addr(&self, i: usize) -> Addr {
        self.cluster
            .as_ref()
            .and_then(|c| c.link(i))
            .map(|(a, _)| a.clone())
            .unwrap_or(Addr {
                host: String::new(),
                port: 0,
            })
    }

    /// Writes the Redis side's pending commands (pipelined: all of them at once, on each
    /// link). A queue over `--max-redis-queue` drops the links instead (Redis counts as
    /// down).
    pub(super) fn redis_write(&mut self, now: Now) {
        if self.cluster.as_mut().is_some_and(|c| c.check_queue(now)) {
            self.pump_cluster(now);
            return;
        }
        for i in 0..self.redis.len() {
            if !self.redis_write_link(i) {
                self.redis_lost(now);
                return;
            }
        }
    }

    /// Writes link `i`'s commands; `false` if the link failed.
    fn redis_write_link(&mut self, i: usize) -> bool {
        let (Some(Some(sock)), Some(cluster)) = (self.redis.get_mut(i), &mut self.cluster) else {
            return true;
        };
        let Some(link) = cluster.links.get_mut(i) else {
            return true;
        };
        if !sock.connected {
            return true;
        }
        if link.out.is_empty() {
            // rediss://: handshake output, or records the socket did not take before.
            if let Some(t) = &mut sock.tls
                && let Err(e) = t.flush(&mut sock.stream)
            {
                log::warn!("writing to Redis failed: {e}");
                return false;
            }
            return true;
        }
        let mut done = 0;
        let failed = loop {
            if done == link.out.len() {
                break false;
            }
            let written = match &mut sock.tls {
                None => sock.stream.write(&link.out[done..]),
                Some(t) => t.send(&link.out[done..], &mut sock.stream),
            };
            match written {
                Ok(0) => break true,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("writing to Redis failed: {e}");
                    break true;
                }
            }
        };
        link.out.drain(..done);
        if link.out.is_empty() && link.out.capacity() > 1024 * 1024 {
            link.out = Vec::new();
        }
        !failed
    }

    /// A link failed: every link goes, the node is degraded until they are all back.
    pub(super) fn redis_lost(&mut self, now: Now) {
        if let Some(c) = &mut self.cluster {
            c.on_disconnected(now);
        }
        self.pump_cluster(now);
    }
}
