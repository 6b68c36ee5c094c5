//! A pool of idle WebSocket members on one mio loop: connects them (a bounded number at a time),
//! waits for each one's `welcome`, then keeps them open, reading and discarding what the room
//! sends and answering pings. Used by `idle` and as the pre-filled room of `join`.
//! Tokens below `OTHER_TOKENS` belong to the pool; callers may register their own sockets on
//! `poll.registry()` with tokens at or above it and get those events back from `poll_once`.

use crate::clock::now_ns;
use crate::members::{Target, reason};
use crate::sys::poll_wait;
use crate::wsclient::{WsClient, WsEvent};
use mio::event::Event;
use mio::{Events, Poll, Registry, Token};
use std::collections::BTreeMap;
use std::time::Duration;

pub const OTHER_TOKENS: usize = 1 << 40;

struct PoolConn {
    ws: Option<WsClient>,
    welcomed: bool,
    dead: bool,
}

pub struct Pool {
    pub poll: Poll,
    targets: Vec<Target>,
    conns: Vec<PoolConn>,
    next: usize,
    inflight: usize,
    scratch: Vec<u8>,
    pub established: u64,
    pub failures: BTreeMap<String, u64>,
    /// Members that were welcomed and later closed or failed.
    pub dropped: BTreeMap<String, u64>,
    /// Text frames received after the welcome, by `type`.
    pub frames: BTreeMap<String, u64>,
    pub first_not_welcome: u64,
}

impl Pool {
    pub fn new(targets: Vec<Target>) -> Result<Pool, String> {
        Ok(Pool {
            poll: Poll::new().map_err(|e| format!("epoll: {e}"))?,
            conns: Vec::with_capacity(targets.len()),
            targets,
            next: 0,
            inflight: 0,
            scratch: vec![0; 256 << 10],
            established: 0,
            failures: BTreeMap::new(),
            dropped: BTreeMap::new(),
            frames: BTreeMap::new(),
            first_not_welcome: 0,
        })
    }

    /// Connections neither welcomed nor failed yet (including not yet started).
    pub fn unresolved(&self) -> usize {
        self.targets.len() - self.conns.iter().filter(|c| c.welcomed || c.dead).count()
    }

    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    pub fn pings(&self) -> u64 {
        self.conns
            .iter()
            .filter_map(|c| c.ws.as_ref())
            .map(|w| w.pings)
            .sum()
    }

    pub fn open_now(&self) -> u64 {
        self.conns.iter().filter(|c| c.welcomed && !c.dead).count() as u64
    }

    /// Connects until all targets are welcomed or failed, or `deadline_ns` passes (the rest then
    /// count as failures). `parallel` bounds the handshakes in flight.
    pub fn connect_all(&mut self, parallel: usize, deadline_ns: u64) {
        let mut events = Events::with_capacity(1024);
        while self.unresolved() > 0 && now_ns() < deadline_ns {
            self.start_more(parallel);
            self.poll_once(&mut events, Duration::from_millis(20), &mut |_, _| {});
        }
        let timeout = now_ns() >= deadline_ns;
        for i in 0..self.targets.len() {
            if i >= self.conns.len() {
                *self
                    .failures
                    .entry("not started before the connect deadline".into())
                    .or_default() += 1;
            } else if !self.conns[i].welcomed && !self.conns[i].dead && timeout {
                self.fail(i, "no welcome before the connect deadline".into());
            }
        }
    }

    fn start_more(&mut self, parallel: usize) {
        while self.inflight < parallel && self.next < self.targets.len() {
            let i = self.next;
            self.next += 1;
            let t = &self.targets[i];
            let r = WsClient::connect(t.addr, t.src, &t.path, i as u64 + 7)
                .and_then(|mut ws| ws.register(self.poll.registry(), Token(i)).map(|_| ws));
            match r {
                Ok(ws) => {
                    self.inflight += 1;
                    self.conns.push(PoolConn {
                        ws: Some(ws),
                        welcomed: false,
                        dead: false,
                    });
                }
                Err(e) => {
                    self.conns.push(PoolConn {
                        ws: None,
                        welcomed: false,
                        dead: true,
                    });
                    *self.failures.entry(reason(&e)).or_default() += 1;
                }
            }
        }
    }

    fn fail(&mut self, i: usize, why: String) {
        let c = &mut self.conns[i];
        if c.dead {
            return;
        }
        c.dead = true;
        if c.welcomed {
            *self.dropped.entry(reason(&why)).or_default() += 1;
        } else {
            self.inflight -= 1;
            *self.failures.entry(reason(&why)).or_default() += 1;
        }
        if let Some(mut ws) = c.ws.take() {
            ws.deregister(self.poll.registry());
        }
    }

    /// Waits for events up to `timeout` and handles them; events for tokens at or above
    /// `OTHER_TOKENS` go to `other` together with the registry and a scratch buffer.
    pub fn poll_once(
        &mut self,
        events: &mut Events,
        timeout: Duration,
        other: &mut dyn FnMut(&Event, &mut OtherCtx),
    ) {
        if let Err(e) = poll_wait(&mut self.poll, events, timeout) {
            *self.failures.entry(e).or_default() += 1;
            std::thread::sleep(timeout);
            return;
        }
        // The caller's sockets first: their timing is what is measured (e.g. join latency),
        // and they should not wait behind a batch of member reads.
        for ev in events.iter().filter(|e| e.token().0 >= OTHER_TOKENS) {
            let mut ctx = OtherCtx {
                registry: self.poll.registry(),
                scratch: &mut self.scratch,
            };
            other(ev, &mut ctx);
        }
        for ev in events.iter().filter(|e| e.token().0 < OTHER_TOKENS) {
            let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
            self.handle(ev.token().0, readable, ev.is_writable());
        }
    }

    fn handle(&mut self, i: usize, readable: bool, writable: bool) {
        let Some(c) = self.conns.get_mut(i) else {
            return;
        };
        let Some(ws) = c.ws.as_mut() else { return };
        if c.dead {
            return;
        }
        let (mut became_welcome, mut closed) = (false, None);
        let welcomed = c.welcomed;
        let frames = &mut self.frames;
        let first_not_welcome = &mut self.first_not_welcome;
        let r = ws.on_ready(readable, writable, &mut self.scratch, &mut |ev| match ev {
            WsEvent::Text(t) => {
                if !welcomed && !became_welcome {
                    if is_welcome(t) {
                        became_welcome = true;
                    } else {
                        *first_not_welcome += 1;
                    }
                } else {
                    *frames.entry(frame_type(t)).or_default() += 1;
                }
            }
            WsEvent::Closed(code) => closed = Some(code),
            WsEvent::Open => {}
        });
        if became_welcome {
            c.welcomed = true;
            self.inflight -= 1;
            self.established += 1;
        }
        let why = match (r, closed) {
            (Ok(true), _) => return,
            (_, Some(Some(code))) => format!("closed by server with {code}"),
            (Ok(false), _) => "closed by server".into(),
            (Err(e), _) => e,
        };
        self.fail(i, why);
    }

    /// Sends a close frame on every open member and reads (bounded by `wait`) until the server
    /// closes them; the rest are dropped.
    pub fn close_all(&mut self, wait: Duration) {
        for c in self.conns.iter_mut() {
            if let (Some(ws), false) = (c.ws.as_mut(), c.dead) {
                let _ = ws.send_close(1000);
            }
        }
        let deadline = now_ns() + wait.as_nanos() as u64;
        let mut events = Events::with_capacity(1024);
        while now_ns() < deadline && self.conns.iter().any(|c| c.ws.is_some() && !c.dead) {
            if poll_wait(&mut self.poll, &mut events, Duration::from_millis(20)).is_err() {
                break;
            }
            for ev in events.iter() {
                let Some(c) = self.conns.get_mut(ev.token().0) else {
                    continue;
                };
                let Some(ws) = c.ws.as_mut() else { continue };
                if !matches!(
                    ws.on_ready(true, ev.is_writable(), &mut self.scratch, &mut |_| {}),
                    Ok(true)
                ) {
                    c.dead = true;
                    c.ws = None;
                }
            }
        }
        self.conns.clear();
    }
}

pub struct OtherCtx<'a> {
    pub registry: &'a Registry,
    pub scratch: &'a mut [u8],
}

/// Whether a (whole) server message is a `welcome` (full parse: it nests other messages).
pub fn is_welcome(t: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(t)
        .ok()
        .and_then(|v| v.get("type")?.as_str().map(|k| k == "welcome"))
        .unwrap_or(false)
}

/// The `type` of a flat server message (not `welcome`), without parsing the whole JSON (rooms can be chatty).
pub fn frame_type(t: &[u8]) -> String {
    let s = std::str::from_utf8(t).unwrap_or("");
    let Some(p) = s.find("\"type\"") else {
        return "?".into();
    };
    let rest = s[p + 6..].trim_start().trim_start_matches(':').trim_start();
    let Some(rest) = rest.strip_prefix('"') else {
        return "?".into();
    };
    rest.split('"')
        .next()
        .unwrap_or("?")
        .chars()
        .take(32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_types() {
        assert_eq!(frame_type(br#"{"type":"welcome","users":[]}"#), "welcome");
        assert_eq!(
            frame_type(br#"{"id":"x", "type" : "user_joined"}"#),
            "user_joined"
        );
        assert_eq!(frame_type(b"{}"), "?");
        assert_eq!(frame_type(br#"{"type":3}"#), "?");
        assert!(is_welcome(
            br#"{"messages":[{"type":"chat"}],"type":"welcome"}"#
        ));
        assert!(!is_welcome(br#"{"type":"chat"}"#));
        assert!(!is_welcome(b"not json"));
    }
}
