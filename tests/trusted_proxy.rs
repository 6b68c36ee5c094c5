//! `--trusted-proxy` (issue 12, finding 4): behind a reverse proxy every connection comes from
//! the proxy, so per-IP limits would lump all clients together. From a trusted proxy only, the
//! client's address is taken from the PROXY protocol header (v1 text, v2 binary) that starts a
//! connection, or else from each request's X-Forwarded-For, and it is what the per-IP
//! creation budget (sessions, rooms, 404s on room paths) and the logs use. A peer that is not
//! trusted (here 127.0.0.2) gets 400 for a PROXY header, and its X-Forwarded-For is ignored.
mod common;

use std::io::Write;
use std::net::TcpStream;

use common::*;
use tungstenite::stream::MaybeTlsStream;

/// One create per second per client address: a second create at once is a 429.
const ARGS: &[&str] = &[
    "--trusted-proxy",
    "127.0.0.1/32, ::1",
    "--create-rate",
    "1",
    "--create-burst",
    "1",
];

fn v1(src: &str) -> Vec<u8> {
    let family = if src.contains(':') { "TCP6" } else { "TCP4" };
    let dst = if src.contains(':') {
        "::1"
    } else {
        "127.0.0.1"
    };
    format!("PROXY {family} {src} {dst} 40000 8000\r\n").into_bytes()
}

fn v2(cmd: u8, src: [u8; 4], tlvs: &[u8]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x20 | cmd, 0x11]);
    h.extend_from_slice(&((12 + tlvs.len()) as u16).to_be_bytes());
    h.extend_from_slice(&src);
    h.extend_from_slice(&[127, 0, 0, 1, 0x9c, 0x40, 0x1f, 0x40]);
    h.extend_from_slice(tlvs);
    h
}

/// A connection from the proxy (127.0.0.1) that starts with `header`.
fn via_proxy(s: &Server, header: &[u8]) -> Http {
    let mut h = Http::connect(s.addr);
    h.send_raw(header);
    h
}

fn create_session(h: &mut Http, xff: Option<&str>) -> u16 {
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(x) = xff {
        headers.push(("X-Forwarded-For", x));
    }
    h.request("POST", "/sessions", &headers, Some(r#"{"username":"via"}"#))
        .status
}

#[test]
fn proxy_protocol_v1_and_v2_give_each_forwarded_client_its_own_budget() {
    let s = Server::start(ARGS);
    // Client 203.0.113.1 through a v1 header: one create, then 429 on the same connection.
    let mut a = via_proxy(&s, &v1("203.0.113.1"));
    assert_eq!(create_session(&mut a, None), 201);
    assert_eq!(create_session(&mut a, None), 429);
    // Its next connection (same address, v2 this time) shares that spent budget.
    let mut a2 = via_proxy(&s, &v2(1, [203, 0, 113, 1], &[]));
    assert_eq!(create_session(&mut a2, None), 429);
    // Other clients of the same proxy have their own, v1 and v2 (with TLVs), IPv6 too.
    let mut b = via_proxy(
        &s,
        &v2(1, [203, 0, 113, 2], &[0xea, 0, 4, b'v', b'p', b'c', b'e']),
    );
    assert_eq!(create_session(&mut b, None), 201);
    assert_eq!(create_session(&mut b, None), 429);
    let mut c = via_proxy(&s, &v1("2001:db8:1::7"));
    assert_eq!(create_session(&mut c, None), 201);
    let mut d = via_proxy(&s, &v1("198.51.100.4"));
    assert_eq!(create_session(&mut d, None), 201);
    // A PROXY header names the client: a client-supplied X-Forwarded-For behind it is ignored.
    let mut e = via_proxy(&s, &v1("198.51.100.5"));
    assert_eq!(create_session(&mut e, Some("192.0.2.50")), 201);
    assert_eq!(create_session(&mut e, Some("192.0.2.51")), 429);
    // LOCAL (a health check) and UNKNOWN: the proxy's own address, with its own budget.
    let mut local = via_proxy(&s, &v2(0, [0; 4], &[]));
    assert_eq!(create_session(&mut local, None), 201);
    let mut unknown = via_proxy(&s, b"PROXY UNKNOWN\r\n");
    assert_eq!(create_session(&mut unknown, None), 429);
    // The limit is logged with the forwarded client's address (the test reads the log on a
    // thread of its own, so the line may arrive a moment after the answer).
    let logged = common::wait_for(std::time::Duration::from_secs(3), || {
        s.log().contains("429 Too Many Requests for 203.0.113.1")
    });
    assert!(logged.is_some(), "{}", s.log());
}

#[test]
fn x_forwarded_for_from_a_trusted_proxy_names_the_client_per_request() {
    let s = Server::start(ARGS);
    // One keep-alive connection from the proxy carries requests of several clients.
    let mut p = s.http();
    assert_eq!(create_session(&mut p, Some("198.51.100.1")), 201);
    assert_eq!(create_session(&mut p, Some("198.51.100.1")), 429);
    assert_eq!(create_session(&mut p, Some("198.51.100.2")), 201);
    // The rightmost address that is not a trusted proxy is the client; what the client
    // itself claimed (further left) changes nothing.
    assert_eq!(create_session(&mut p, Some("6.6.6.6, 198.51.100.3")), 201);
    assert_eq!(create_session(&mut p, Some("7.7.7.7, 198.51.100.3")), 429);
    assert_eq!(create_session(&mut p, Some("198.51.100.4, 127.0.0.1")), 201);
    assert_eq!(create_session(&mut p, Some("198.51.100.4")), 429);
    // Requests without one are the proxy's own.
    assert_eq!(create_session(&mut p, None), 201);
    assert_eq!(create_session(&mut p, None), 429);
    // 404s on room paths spend the forwarded client's budget, not the others'.
    let get = |p: &mut Http, xff: &str| {
        p.request(
            "GET",
            "/rooms/0000000000",
            &[("X-Forwarded-For", xff)],
            None,
        )
        .status
    };
    assert_eq!(get(&mut p, "198.51.100.6"), 404);
    assert_eq!(get(&mut p, "198.51.100.6"), 429);
    assert_eq!(get(&mut p, "198.51.100.7"), 404);
}

#[test]
fn a_websocket_through_the_proxy_works_after_a_proxy_header() {
    let s = Server::start(ARGS);
    let (sid, _) = s.session("alice");
    let mut p = via_proxy(&s, &v1("203.0.113.9"));
    let r = p.request("POST", "/rooms", &[("Authorization", &bearer(&sid))], None);
    assert_eq!(r.status, 201, "{}", r.text());
    let room = r.json()["room_id"].as_str().unwrap().to_string();
    // 203.0.113.9 has spent its budget (room paths check it); 203.0.113.10 has not.
    let mut stream = TcpStream::connect(s.addr).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(&v2(1, [203, 0, 113, 10], &[])).unwrap();
    let url = format!("ws://{}/ws/{room}?session_id={sid}", s.addr);
    let (socket, _) = tungstenite::client::client(url.as_str(), MaybeTlsStream::Plain(stream))
        .expect("upgrade after a PROXY header");
    let mut ws = Ws { socket };
    assert_eq!(ws.recv()["type"], "welcome");
    assert_eq!(
        ws.chat_roundtrip("through the proxy")["message"],
        "through the proxy"
    );
}

#[test]
fn an_untrusted_peer_gets_400_for_a_proxy_header_and_its_forwarded_for_is_ignored() {
    let s = Server::start(ARGS);
    for header in [v1("203.0.113.1"), v2(1, [203, 0, 113, 1], &[])] {
        let mut h = Http::connect_from(s.addr, "127.0.0.2");
        h.send_raw(&header);
        h.send_raw(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
        let r = h.read_response(false);
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.text().contains("not a trusted proxy"), "{}", r.text());
        assert!(h.is_closed());
    }
    // X-Forwarded-For from 127.0.0.2 is ignored: every request spends 127.0.0.2's budget.
    let mut h = Http::connect_from(s.addr, "127.0.0.2");
    assert_eq!(create_session(&mut h, Some("198.51.100.10")), 201);
    assert_eq!(create_session(&mut h, Some("198.51.100.11")), 429);
    // Meanwhile the trusted proxy's clients are unaffected.
    let mut p = s.http();
    assert_eq!(create_session(&mut p, Some("198.51.100.12")), 201);
}

#[test]
fn without_the_flag_nobody_is_trusted() {
    let s = Server::start(&["--create-rate", "1", "--create-burst", "1"]);
    let mut h = via_proxy(&s, &v1("203.0.113.1"));
    h.send_raw(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(h.read_response(false).status, 400);
    let mut h = s.http();
    assert_eq!(create_session(&mut h, Some("198.51.100.1")), 201);
    assert_eq!(create_session(&mut h, Some("198.51.100.2")), 429);
}

#[test]
fn malformed_oversized_or_unfinished_proxy_headers_from_the_proxy_are_refused() {
    let s = Server::start(&["--trusted-proxy", "127.0.0.1", "--request-timeout", "500ms"]);
    let mut too_long = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff".to_vec();
    too_long.extend_from_slice(&[0; 64]);
    for bad in [
        b"PROXY TCP4 203.0.113.1 127.0.0.1 40000\r\n".to_vec(),
        b"PROXY TCP4 203.0.113.300 127.0.0.1 1 2\r\n".to_vec(),
        [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 200]].concat(),
        too_long,
        v2(2, [203, 0, 113, 1], &[]),
    ] {
        let mut h = via_proxy(&s, &bad);
        let r = h.read_response(false);
        assert_eq!(
            r.status,
            400,
            "{:?}: {}",
            String::from_utf8_lossy(&bad),
            r.text()
        );
        assert!(h.is_closed());
    }
    // A header that never finishes runs into the request timeout.
    let mut slow = via_proxy(&s, b"PROXY TCP4 203.0.113.1 12");
    let r = slow.read_response(false);
    assert_eq!(r.status, 408);
    // The proxy's next connection is served.
    let mut ok = via_proxy(&s, &v1("203.0.113.1"));
    assert_eq!(ok.get("/health", None).status, 200);
}
