//! HTTP/1.1 as the contract needs it: keep-alive, pipelining (responses in order),
//! `Connection: close`, `Date` and `Content-Length` on every response, `HEAD`, `/health` and
//! `/ping`, 405 with `Allow`, JSON 404s, and the refusals of requests the server cannot serve:
//! 431 (head too large), 411 (chunked), 400 (garbage), plus `Expect: 100-continue`.
mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use serde_json::json;

/// Reads everything until the server closes the connection.
fn read_to_eof(h: &mut Http) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = h.stream.read_to_end(&mut out);
    out
}

/// Expected status, method, path, extra headers, body.
type Case<'a> = (
    u16,
    &'a str,
    String,
    Vec<(&'a str, &'a str)>,
    Option<&'a str>,
);

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let s = Server::start(&[]);
    let mut h = s.http();
    for i in 0..200 {
        let r = match i % 4 {
            0 => h.get("/health", None),
            1 => h.request("HEAD", "/ping", &[], None),
            2 => h.post_json(
                "/sessions",
                &json!({ "username": format!("user{i}") }).to_string(),
                None,
            ),
            _ => h.get("/nope", None),
        };
        let want = [200, 200, 201, 404][i % 4];
        assert_eq!(r.status, want, "request {i}: {}", r.text());
        assert!(
            !r.header("connection")
                .is_some_and(|c| c.eq_ignore_ascii_case("close")),
            "request {i}: {:?}",
            r.headers
        );
    }
}

#[test]
fn a_hundred_pipelined_requests_get_a_hundred_responses_in_order() {
    // 90 sessions from one address: more than the default per-address budget allows at once.
    let s = Server::start(&["--create-rate", "0"]);
    let mut h = s.http();
    let mut batch = Vec::new();
    for i in 0..100 {
        let body = json!({ "username": format!("pipe{i}") }).to_string();
        if i % 10 == 9 {
            batch.extend_from_slice(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
        } else {
            batch.extend_from_slice(
                format!("POST /sessions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
                    .as_bytes(),
            );
        }
    }
    h.send_raw(&batch);
    for i in 0..100 {
        let r = h.read_response(false);
        if i % 10 == 9 {
            assert_eq!(r.status, 200, "response {i}: {}", r.text());
            assert_eq!(r.json()["status"], "ok");
        } else {
            assert_eq!(r.status, 201, "response {i}: {}", r.text());
            assert_eq!(
                r.json()["username"],
                format!("pipe{i}"),
                "response {i} out of order"
            );
        }
    }
    // And the connection is still usable.
    assert_eq!(h.get("/health", None).status, 200);
}

#[test]
fn a_request_split_into_tiny_pieces_is_served() {
    let s = Server::start(&[]);
    let mut h = s.http();
    let body = r#"{"username":"slowpoke"}"#;
    let req = format!(
        "POST /sessions/ HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    h.stream.set_nodelay(true).unwrap();
    for chunk in req.as_bytes().chunks(7) {
        h.send_raw(chunk);
        std::thread::sleep(Duration::from_millis(1));
    }
    let r = h.read_response(false);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["username"], "slowpoke");
}

#[test]
fn connection_close_is_honoured() {
    let s = Server::start(&[]);
    let mut h = s.http();
    assert_eq!(h.get("/health", None).status, 200);
    let r = h.request("GET", "/health", &[("Connection", "close")], None);
    assert_eq!(r.status, 200);
    assert!(
        r.header("connection")
            .is_some_and(|c| c.eq_ignore_ascii_case("close")),
        "{:?}",
        r.headers
    );
    assert!(
        h.is_closed(),
        "the server closes after a Connection: close response"
    );

    // An error response to a Connection: close request closes too.
    let mut h = s.http();
    let r = h.request("GET", "/nope", &[("Connection", "close")], None);
    assert_eq!(r.status, 404);
    assert!(h.is_closed());

    // Pipelined requests after a Connection: close request are not answered.
    let mut h = s.http();
    h.send_raw(b"GET /ping HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\nGET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    let all = read_to_eof(&mut h);
    let text = String::from_utf8_lossy(&all);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");

    // HTTP/1.0 without keep-alive closes as well.
    let mut h = s.http();
    h.send_raw(b"GET /health HTTP/1.0\r\n\r\n");
    let all = read_to_eof(&mut h);
    let text = String::from_utf8_lossy(&all);
    assert!(
        text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200"),
        "{text}"
    );
}

#[test]
fn every_response_has_date_and_content_length() {
    let s = Server::start(&["--max-request-body", "100", "--max-request-head", "1024"]);
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    let big_body = "x".repeat(200);
    let big_header = "h".repeat(2000);
    let cases: Vec<Case> = vec![
        (200, "GET", "/health".into(), vec![], None),
        (200, "GET", "/".into(), vec![], None),
        (200, "GET", format!("/rooms/{room}"), vec![], None),
        (
            201,
            "POST",
            "/sessions".into(),
            vec![],
            Some(r#"{"username":"bob"}"#),
        ),
        (400, "POST", "/sessions".into(), vec![], Some("{")),
        (401, "GET", "/sessions/me".into(), vec![], None),
        (404, "GET", "/nope".into(), vec![], None),
        (405, "PUT", "/health".into(), vec![], None),
        (422, "POST", "/sessions".into(), vec![], Some("{}")),
        (413, "POST", "/sessions".into(), vec![], Some(&big_body)),
        (
            431,
            "GET",
            "/health".into(),
            vec![("X-Big", &big_header)],
            None,
        ),
        (
            411,
            "POST",
            "/sessions".into(),
            vec![("Transfer-Encoding", "chunked")],
            None,
        ),
    ];
    for (want, method, path, headers, body) in cases {
        let r = s.http().request(method, &path, &headers, body);
        assert_eq!(r.status, want, "{method} {path}: {}", r.text());
        let date = r
            .header("date")
            .unwrap_or_else(|| panic!("{method} {path}: no Date in {:?}", r.headers));
        assert!(
            httpdate::parse_http_date(date).is_ok(),
            "{method} {path}: bad Date {date:?}"
        );
        let len = r
            .header("content-length")
            .unwrap_or_else(|| panic!("{method} {path}: no Content-Length in {:?}", r.headers));
        assert_eq!(
            len.parse::<usize>().ok(),
            Some(r.body.len()),
            "{method} {path}"
        );
    }
}

#[test]
fn head_ping_has_no_body_and_get_ping_works() {
    let s = Server::start(&[]);
    let mut h = s.http();
    let r = h.get("/ping", None);
    assert_eq!(r.status, 200);
    // HEAD on a keep-alive connection: if a body were sent, the next response would not parse.
    let r = h.request("HEAD", "/ping", &[], None);
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    let r = h.get("/health", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "ok");
    // And byte for byte: the HEAD answer ends right after its head.
    h.send_raw(b"HEAD /ping HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let all = read_to_eof(&mut h);
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "HEAD has no body: {text:?}");
    assert_eq!(text.matches("HTTP/1.1").count(), 1, "{text:?}");
}

#[test]
fn health_reports_ok_and_the_crate_version() {
    let s = Server::start(&[]);
    for path in ["/health", "/health/"] {
        let r = s.http().get(path, None);
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            r.header("content-type")
                .unwrap_or("")
                .starts_with("application/json")
        );
        assert_eq!(
            r.json(),
            json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") })
        );
    }
}

#[test]
fn a_wrong_method_is_405_with_allow() {
    let s = Server::start(&[]);
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    let cases = [
        ("PUT", "/health".to_string(), "GET"),
        ("DELETE", "/sessions".to_string(), "POST"),
        ("GET", "/sessions/".to_string(), "POST"),
        ("POST", "/sessions/me".to_string(), "DELETE"),
        ("PATCH", "/rooms".to_string(), "POST"),
        ("DELETE", format!("/rooms/{room}"), "GET"),
        ("GET", format!("/rooms/{room}/join"), "POST"),
        ("POST", format!("/rooms/{room}/leave"), "DELETE"),
        ("POST", format!("/rooms/{room}/messages"), "GET"),
        ("POST", format!("/ws/{room}"), "GET"),
    ];
    for (method, path, allowed) in cases {
        let r = s.http().call(method, &path, Some(&sid));
        assert_eq!(r.status, 405, "{method} {path}: {}", r.text());
        let allow = r
            .header("allow")
            .unwrap_or_else(|| panic!("{method} {path}: no Allow"));
        assert!(
            allow.split(',').any(|m| m.trim() == allowed),
            "{method} {path}: Allow: {allow}"
        );
        assert!(
            !allow.split(',').any(|m| m.trim() == method),
            "{method} {path}: Allow: {allow}"
        );
        assert!(r.json()["detail"].is_string());
    }
}

#[test]
fn unknown_paths_are_json_404s() {
    let s = Server::start(&[]);
    for path in [
        "/nope",
        "/sessions/you",
        "/sessions/me/rooms",
        "/rooms/abc/def/ghi",
        "/ws",
        "/health/x",
        "/%00",
        "/rooms/all/x",
    ] {
        let r = s.http().get(path, None);
        assert_eq!(r.status, 404, "{path}: {}", r.text());
        assert!(
            r.header("content-type")
                .unwrap_or("")
                .starts_with("application/json"),
            "{path}"
        );
        assert!(r.json()["detail"].is_string(), "{path}: {}", r.text());
    }
}

#[test]
fn a_head_over_max_request_head_is_431() {
    let s = Server::start(&["--max-request-head", "1024"]);
    let ok = "v".repeat(500);
    assert_eq!(
        s.http()
            .request("GET", "/health", &[("X-Pad", &ok)], None)
            .status,
        200
    );
    let big = "v".repeat(2000);
    let r = s.http().request("GET", "/health", &[("X-Pad", &big)], None);
    assert_eq!(r.status, 431, "{}", r.text());
    assert!(r.json()["detail"].is_string());
    // A head that never ends also gets 431 once it passes the limit (no blank line sent).
    let mut h = s.http();
    h.send_raw(b"GET /health HTTP/1.1\r\nHost: t\r\n");
    h.send_raw(format!("X-Pad: {big}\r\n").as_bytes());
    let r = h.read_response(false);
    assert_eq!(r.status, 431, "{}", r.text());
}

#[test]
fn transfer_encoding_chunked_is_411() {
    let s = Server::start(&[]);
    let mut h = s.http();
    h.send_raw(b"POST /sessions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n14\r\n{\"username\":\"alice\"}\r\n0\r\n\r\n");
    let r = h.read_response(false);
    assert_eq!(r.status, 411, "{}", r.text());
    assert!(r.json()["detail"].is_string());
}

#[test]
fn garbage_bytes_are_400_and_the_server_carries_on() {
    let s = Server::start(&[]);
    let garbage: [&[u8]; 4] = [
        b"\x00\x01\x02\x03garbage\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad header line\r\n\r\n",
    ];
    for g in garbage {
        let mut h = s.http();
        h.send_raw(g);
        let r = h.read_response(false);
        assert_eq!(
            r.status,
            400,
            "{:?}: {}",
            String::from_utf8_lossy(g),
            r.text()
        );
        assert!(r.json()["detail"].is_string());
        assert!(
            h.is_closed(),
            "closed after a 400 for {:?}",
            String::from_utf8_lossy(g)
        );
    }
    assert_eq!(s.http().get("/health", None).status, 200);
}

#[test]
fn expect_100_continue_gets_100_then_the_response() {
    let s = Server::start(&[]);
    let mut h = s.http();
    let body = r#"{"username":"patient"}"#;
    h.send_raw(
        format!(
            "POST /sessions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let r = h.read_response(false);
    assert_eq!(r.status, 100, "{:?}", r);
    h.send_raw(body.as_bytes());
    let r = h.read_response(false);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["username"], "patient");
    // Keep-alive continues after it.
    assert_eq!(h.get("/health", None).status, 200);
    // A request refused on its head alone (413) gets the refusal, not a 100.
    let s = Server::start(&["--max-request-body", "10"]);
    let mut h = s.http();
    h.send_raw(b"POST /sessions HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n");
    let r = h.read_response(false);
    assert_eq!(r.status, 413, "{:?}", r);
    let _ = h.stream.write_all(&[b'x'; 10]);
}
