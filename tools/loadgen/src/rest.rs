//! `rest`: C keep-alive HTTP/1.1 clients on one mio loop, each doing `POST /sessions` back to
//! back for the duration. Reports requests/s, latency percentiles and errors by kind.
//! `--path P`: `GET P` (answer 200) instead. `--new-conn`: every request on a new connection
//! (`Connection: close`), so with `--tls` each request costs a full TLS handshake.

use crate::args::{Args, loopback_src};
use crate::clock::{self, now_ns};
use crate::hist::Histogram;
use crate::http::{parse_head, request_bytes};
use crate::report::{self, Obj, ServerWatch};
use crate::tls::Stream;
use mio::{Events, Interest, Poll, Token};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::time::Duration;

struct Client {
    /// Plain or TLS (`--tls`).
    stream: Option<Stream>,
    connected: bool,
    out: Vec<u8>,
    out_pos: usize,
    inbuf: Vec<u8>,
    sent_at: u64,
}

struct Rest {
    poll: Poll,
    addr: std::net::SocketAddrV4,
    src_ips: usize,
    request: Vec<u8>,
    clients: Vec<Client>,
    hist: Histogram,
    ok: u64,
    /// Size of the last `201` response, head and body (`httpfloor --response-bytes`).
    response_bytes: usize,
    statuses: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    reconnects: u64,
    timeout_ns: u64,
    scratch: Vec<u8>,
    /// The status that counts as success: 201 for POST /sessions, 200 for `--path`.
    want: u16,
    /// Connections opened (the first one per client included).
    connects: u64,
}

pub fn run(a: &Args) -> Result<Obj, String> {
    let addr = a.addr()?;
    let clients = a.u64_or("clients", 16)?.clamp(1, 10_000) as usize;
    let duration = a.dur_or("duration", Duration::from_secs(10))?;
    let timeout = a.dur_or("timeout", Duration::from_secs(5))?;
    let new_conn = a.flag("new-conn");
    let path = a.opt_str("path")?;
    // A new connection per request: the client may close first and keep TIME_WAIT on its
    // side, so spread over more source addresses (ports) by default.
    let src_ips = a
        .u64_or("src-ips", if new_conn { 32 } else { 4 })?
        .clamp(1, 250) as usize;
    let mut watch =
        ServerWatch::new(a.opt_u64("server-pid")?)?.with_extra(a.opt_str("extra-pids")?)?;
    a.finish()?;
    crate::sys::raise_nofile().map_err(|e| format!("raising RLIMIT_NOFILE: {e}"))?;

    let body = r#"{"username":"rest-bench"}"#;
    let mut request = match &path {
        None => request_bytes("POST", "/sessions", &addr.to_string(), None, Some(body)),
        Some(p) => request_bytes("GET", p, &addr.to_string(), None, None),
    };
    if new_conn {
        // request_bytes ends the head with an empty line (and GET has no body): insert the
        // header before it.
        let at = request
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("request without a head")?;
        request.splice(at + 2..at + 2, b"Connection: close\r\n".iter().copied());
    }
    let mut r = Rest {
        poll: Poll::new().map_err(|e| format!("epoll: {e}"))?,
        addr,
        src_ips,
        request,
        clients: Vec::new(),
        hist: Histogram::new(),
        ok: 0,
        response_bytes: 0,
        statuses: BTreeMap::new(),
        errors: BTreeMap::new(),
        reconnects: 0,
        timeout_ns: timeout.as_nanos() as u64,
        scratch: vec![0; 64 << 10],
        want: if path.is_some() { 200 } else { 201 },
        connects: 0,
    };
    for i in 0..clients {
        r.clients.push(Client {
            stream: None,
            connected: false,
            out: Vec::new(),
            out_pos: 0,
            inbuf: Vec::new(),
            sent_at: 0,
        });
        r.open(i);
    }
    let t0 = now_ns();
    watch.begin();
    let busy = report::SelfBusy::start();
    let end = t0 + duration.as_nanos() as u64;
    let mut events = Events::with_capacity(1024);
    let mut next_timeout_check = t0;
    while now_ns() < end {
        crate::sys::poll_wait(
            &mut r.poll,
            &mut events,
            clock::until(end).min(Duration::from_millis(50)),
        )?;
        for ev in events.iter() {
            let i = ev.token().0;
            let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
            if let Err(e) = r.handle(i, readable, ev.is_writable()) {
                *r.errors.entry(e).or_default() += 1;
                r.open(i);
            }
        }
        let now = now_ns();
        if now >= next_timeout_check {
            next_timeout_check = now + 100_000_000;
            for i in 0..r.clients.len() {
                let c = &r.clients[i];
                if c.sent_at != 0 && now - c.sent_at > r.timeout_ns {
                    *r.errors
                        .entry(format!("no answer within {timeout:?}"))
                        .or_default() += 1;
                    r.open(i);
                }
            }
        }
    }
    let elapsed = clock::secs(now_ns() - t0);
    let mut o = Obj::new();
    let cpu_line = watch.end(&mut o, r.ok, "request");
    let busy_warning = busy.end(&mut o);
    let rps = r.ok as f64 / elapsed;
    let errors: u64 = r.errors.values().sum::<u64>() + r.statuses.values().sum::<u64>();
    o.insert("scenario".into(), json!("rest"));
    o.insert("ok".into(), json!(true));
    o.insert("clients".into(), json!(clients));
    o.insert("tls".into(), json!(crate::tls::enabled()));
    o.insert("new_conn".into(), json!(new_conn));
    o.insert("connects".into(), json!(r.connects));
    o.insert("duration_s".into(), json!(report::round(elapsed, 3)));
    o.insert("requests".into(), json!(r.ok));
    o.insert("response_bytes".into(), json!(r.response_bytes));
    o.insert("requests_per_s".into(), json!(report::round(rps, 1)));
    o.insert("errors".into(), json!(errors));
    o.insert("unexpected_status".into(), json!(r.statuses));
    o.insert("error_kinds".into(), json!(r.errors));
    o.insert("reconnects".into(), json!(r.reconnects));
    report::add_latency(&mut o, "lat", &r.hist);
    report::add_distribution(&mut o, "lat", &r.hist);
    eprintln!(
        "rest: {clients} clients{}{}, {}: {} answered {} in {elapsed:.2}s = {rps:.0} req/s; {errors} errors {:?} {:?}\nlatency: {}",
        if crate::tls::enabled() { ", TLS" } else { "" },
        if new_conn {
            ", a new connection per request"
        } else {
            ""
        },
        path.as_deref()
            .map_or("POST /sessions".to_string(), |p| format!("GET {p}")),
        r.ok,
        r.want,
        r.statuses,
        r.errors,
        report::latency_line(&r.hist)
    );
    if !cpu_line.is_empty() {
        eprintln!("{cpu_line}");
    }
    if let Some(w) = busy_warning {
        eprintln!("{w}");
    }
    Ok(o)
}

impl Rest {
    /// (Re)connects client `i` and queues a request on it.
    fn open(&mut self, i: usize) {
        if let Some(mut s) = self.clients[i].stream.take() {
            let _ = self.poll.registry().deregister(&mut s.tcp);
            self.reconnects += 1;
        }
        let c = &mut self.clients[i];
        c.connected = false;
        c.inbuf.clear();
        c.sent_at = 0;
        match crate::sys::connect_nonblocking(self.addr, Some(loopback_src(i, self.src_ips, 0))) {
            Ok(tcp) => {
                let mut s = match Stream::new(tcp, *self.addr.ip()) {
                    Ok(s) => s,
                    Err(e) => {
                        *self.errors.entry(format!("TLS: {e}")).or_default() += 1;
                        return;
                    }
                };
                self.connects += 1;
                if let Err(e) = self.poll.registry().register(
                    &mut s.tcp,
                    Token(i),
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    *self
                        .errors
                        .entry(format!("epoll register: {e}"))
                        .or_default() += 1;
                    return;
                }
                c.stream = Some(s);
                self.queue(i);
            }
            Err(e) => {
                *self.errors.entry(format!("connect: {e}")).or_default() += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    fn queue(&mut self, i: usize) {
        let c = &mut self.clients[i];
        c.out.clear();
        c.out.extend_from_slice(&self.request);
        c.out_pos = 0;
        c.sent_at = now_ns();
    }

    fn flush(c: &mut Client) -> Result<(), String> {
        let Some(s) = c.stream.as_mut() else {
            return Ok(());
        };
        while c.out_pos < c.out.len() {
            match s.write(&c.out[c.out_pos..]) {
                Ok(0) => return Err("write returned 0".into()),
                Ok(n) => c.out_pos += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("write: {e}")),
            }
        }
        s.push().map_err(|e| format!("write: {e}"))
    }

    fn handle(&mut self, i: usize, readable: bool, writable: bool) -> Result<(), String> {
        let c = &mut self.clients[i];
        let Some(s) = c.stream.as_mut() else {
            return Ok(());
        };
        if !c.connected {
            if let Ok(Some(e)) | Err(e) = s.tcp.take_error() {
                return Err(format!("connect: {e}"));
            }
            match s.tcp.peer_addr() {
                Ok(_) => c.connected = true,
                Err(e) if e.kind() == ErrorKind::NotConnected => return Ok(()),
                Err(e) => return Err(format!("connect: {e}")),
            }
        }
        if writable || c.out_pos < c.out.len() || s.tls_pending() {
            Self::flush(c)?;
        }
        if !readable {
            return Ok(());
        }
        let mut eof = false;
        while !eof {
            let Some(s) = c.stream.as_mut() else {
                return Ok(());
            };
            match s.read(&mut self.scratch) {
                // The answer may come with the end (`Connection: close`): look at it first.
                Ok(0) => eof = true,
                Ok(n) => c.inbuf.extend_from_slice(&self.scratch[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        // One request in flight per client (no pipelining), so at most one answer to take.
        let h = match parse_head(&c.inbuf)? {
            Some(h) if c.inbuf.len() >= h.head_len + h.content_length => h,
            _ if eof => return Err("server closed the connection".into()),
            _ => return Ok(()),
        };
        c.inbuf.drain(..h.head_len + h.content_length);
        if c.sent_at == 0 {
            return Err("answer without a request".into());
        }
        let latency = now_ns() - c.sent_at;
        if h.status == self.want {
            self.ok += 1;
            self.response_bytes = h.head_len + h.content_length;
            self.hist.record(latency);
        } else {
            *self
                .statuses
                .entry(format!("HTTP {}", h.status))
                .or_default() += 1;
        }
        if h.close || eof {
            self.open(i);
        } else {
            self.queue(i);
            Self::flush(&mut self.clients[i])?;
        }
        Ok(())
    }
}
