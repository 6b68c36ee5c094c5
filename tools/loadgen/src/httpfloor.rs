//! `httpfloor`: the floor for REST, a minimal keep-alive HTTP/1.1 server to run `rest` against
//! in place of chatloop. One thread, one edge-triggered mio loop, read interest only; every
//! readable socket is read into one shared buffer until a short read, each complete request
//! (head parsed with `httparse`, body skipped by `Content-Length`) gets the same canned
//! response, and all responses for a socket go out with one write. No routing, no JSON, no
//! state: what remains is the kernel's cost of a request and a response, plus `epoll_wait`.
//!
//! Prints `listening on http://ADDR` on stderr once bound, serves for `--duration`, then exits with
//! the usual JSON line (requests served, responses written).

use crate::args::Args;
use crate::report::Obj;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use serde_json::json;
use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

const LISTENER: Token = Token(usize::MAX);

struct Conn {
    stream: TcpStream,
    /// An incomplete request carried over to the next read.
    partial: Vec<u8>,
}

/// A `201 Created` JSON response of exactly `total` bytes (at least its headers' length).
fn canned_response(total: usize) -> Vec<u8> {
    let head_for = |len: usize| {
        format!(
            "HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
        )
    };
    let mut body_len = total.saturating_sub(head_for(0).len() + 1);
    // The length's digits change the head's size; settle on a consistent pair.
    while head_for(body_len).len() + body_len > total && body_len > 0 {
        body_len -= 1;
    }
    let mut out = head_for(body_len).into_bytes();
    let fill = body_len.saturating_sub(r#"{"pad":""}"#.len());
    out.extend_from_slice(format!(r#"{{"pad":"{}"}}"#, "x".repeat(fill)).as_bytes());
    out
}

/// Length of the first complete request in `buf` (head and body), if there is one.
fn request_len(buf: &[u8]) -> Result<Option<usize>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(head)) => {
            let body = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| {
                    std::str::from_utf8(h.value)
                        .ok()?
                        .trim()
                        .parse::<usize>()
                        .ok()
                })
                .unwrap_or(0);
            Ok((buf.len() >= head + body).then_some(head + body))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

pub fn run(a: &Args) -> Result<Obj, String> {
    let port = a.u64_or("port", 0)?;
    let host = a.opt_str("host")?.unwrap_or_else(|| "127.0.0.1".into());
    let duration = a.dur_or("duration", Duration::from_secs(30))?;
    let response = canned_response(a.u64_or("response-bytes", 243)?.clamp(120, 60_000) as usize);
    a.finish()?;
    crate::sys::raise_nofile().map_err(|e| format!("raising RLIMIT_NOFILE: {e}"))?;

    let mut poll = Poll::new().map_err(|e| format!("epoll: {e}"))?;
    let addr = format!("{host}:{port}")
        .parse()
        .map_err(|e| format!("address: {e}"))?;
    let mut listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .map_err(|e| e.to_string())?;
    // The same line as chatloop's, so that tools/lib/server.sh can start either.
    eprintln!("httpfloor listening on http://{local}");

    let mut conns: slab::Slab<Conn> = slab::Slab::new();
    let mut events = Events::with_capacity(256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(64 * 1024);
    let (mut requests, mut writes, mut bad) = (0u64, 0u64, 0u64);
    let end = Instant::now() + duration;
    while Instant::now() < end {
        match poll.poll(&mut events, Some(Duration::from_millis(100))) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("epoll_wait: {e}")),
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            let _ = stream.set_nodelay(true);
                            let entry = conns.vacant_entry();
                            poll.registry()
                                .register(&mut stream, Token(entry.key()), Interest::READABLE)
                                .map_err(|e| e.to_string())?;
                            entry.insert(Conn {
                                stream,
                                partial: Vec::new(),
                            });
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => break,
                    }
                }
                continue;
            }
            let id = ev.token().0;
            let Some(c) = conns.get_mut(id) else { continue };
            let mut close = false;
            out.clear();
            loop {
                let n = match c.stream.read(&mut buf) {
                    Ok(0) => {
                        close = true;
                        break;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => {
                        close = true;
                        break;
                    }
                };
                let data: &[u8] = if c.partial.is_empty() {
                    &buf[..n]
                } else {
                    c.partial.extend_from_slice(&buf[..n]);
                    &c.partial
                };
                let mut at = 0;
                loop {
                    match request_len(&data[at..]) {
                        Ok(Some(len)) => {
                            at += len;
                            requests += 1;
                            out.extend_from_slice(&response);
                        }
                        Ok(None) => break,
                        Err(_) => {
                            bad += 1;
                            close = true;
                            break;
                        }
                    }
                }
                let rest = data[at..].to_vec();
                c.partial = rest;
                if close || n < buf.len() {
                    break;
                }
            }
            if !out.is_empty() && !close {
                writes += 1;
                if c.stream.write_all(&out).is_err() {
                    close = true;
                }
            }
            if close {
                let mut c = conns.remove(id);
                let _ = poll.registry().deregister(&mut c.stream);
            }
        }
    }
    let mut o = Obj::new();
    o.insert("scenario".into(), json!("httpfloor"));
    o.insert("requests".into(), json!(requests));
    o.insert("writes".into(), json!(writes));
    o.insert("bad_requests".into(), json!(bad));
    o.insert("response_bytes".into(), json!(response.len()));
    eprintln!(
        "httpfloor: {requests} requests answered with {writes} writes of {}-byte responses",
        response.len()
    );
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canned_response_has_the_asked_size_and_a_matching_length() {
        for total in [120, 330, 1000] {
            let r = canned_response(total);
            assert_eq!(r.len(), total);
            let text = String::from_utf8(r).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(head.contains(&format!("Content-Length: {}", body.len())));
        }
    }

    #[test]
    fn request_len_counts_the_body() {
        let req = b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET";
        assert_eq!(request_len(req), Ok(Some(req.len() - 3)));
        assert_eq!(request_len(&req[..20]), Ok(None));
        assert_eq!(request_len(&req[..req.len() - 5]), Ok(None));
    }
}
