//! CORS: every answer, errors included, carries `Access-Control-Allow-Origin`; `OPTIONS` on
//! any path is a 204 preflight allowing GET, POST, DELETE, HEAD and the `Authorization` and
//! `Content-Type` headers; browser-style requests (`Content-Type: application/json` on GET,
//! an `Origin` header) work, WebSocket upgrades included.
mod common;

use std::net::TcpStream;

use common::*;
use tungstenite::client::IntoClientRequest;
use tungstenite::stream::MaybeTlsStream;

const ORIGIN: &str = "https://chat.example.org";

#[track_caller]
fn assert_cors(r: &Resp, what: &str) {
    let v = r
        .header("access-control-allow-origin")
        .unwrap_or_else(|| panic!("{what}: no Access-Control-Allow-Origin in {:?}", r.headers));
    assert!(
        v == "*" || v == ORIGIN,
        "{what}: Access-Control-Allow-Origin: {v}"
    );
}

fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(|x| x.trim().to_ascii_lowercase())
        .collect()
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
fn every_answer_carries_allow_origin_errors_included() {
    let s = Server::start(&["--max-request-body", "64", "--room-list"]);
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    let auth = bearer(&sid);
    let big = "x".repeat(100);
    let cases: Vec<Case> = vec![
        (200, "GET", "/health".into(), vec![], None),
        (200, "GET", "/rooms/all".into(), vec![], None),
        (
            200,
            "GET",
            "/sessions/me".into(),
            vec![("Authorization", &auth)],
            None,
        ),
        (
            201,
            "POST",
            "/sessions".into(),
            vec![],
            Some(r#"{"username":"bob"}"#),
        ),
        (
            201,
            "POST",
            "/rooms".into(),
            vec![("Authorization", &auth)],
            None,
        ),
        (400, "POST", "/sessions".into(), vec![], Some("{nope")),
        (401, "GET", "/sessions/me".into(), vec![], None),
        (
            401,
            "GET",
            "/rooms".into(),
            vec![(
                "Authorization",
                "Bearer 0b7e3c52-9d1f-4a7e-8c3b-2f6a1d9e4b70",
            )],
            None,
        ),
        (404, "GET", "/nope".into(), vec![], None),
        (404, "GET", "/rooms/0000000000".into(), vec![], None),
        (405, "PUT", "/rooms".into(), vec![], None),
        (413, "POST", "/sessions".into(), vec![], Some(&big)),
        (
            422,
            "GET",
            format!("/rooms/{room}/messages?limit=0"),
            vec![("Authorization", &auth)],
            None,
        ),
        (422, "POST", "/sessions".into(), vec![], Some("{}")),
        (
            403,
            "GET",
            format!("/ws/{room}?session_id=nope"),
            ws_headers(),
            None,
        ),
        (
            426,
            "GET",
            format!("/ws/{room}?session_id={sid}"),
            vec![],
            None,
        ),
    ];
    for (want, method, path, mut headers, body) in cases {
        headers.push(("Origin", ORIGIN));
        let r = s.http().request(method, &path, &headers, body);
        assert_eq!(r.status, want, "{method} {path}: {}", r.text());
        assert_cors(&r, &format!("{method} {path}"));
        // And without an Origin header too (curl, server-side clients).
        headers.pop();
        let r = s.http().request(method, &path, &headers, body);
        assert_cors(&r, &format!("{method} {path} (no Origin)"));
    }
}

fn ws_headers() -> Vec<(&'static str, &'static str)> {
    vec![
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ]
}

#[test]
fn options_preflight_on_every_path() {
    let s = Server::start(&[]);
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    let paths = [
        "/".to_string(),
        "/sessions".into(),
        "/sessions/".into(),
        "/sessions/me".into(),
        "/rooms".into(),
        "/rooms/all".into(),
        format!("/rooms/{room}"),
        format!("/rooms/{room}/join"),
        format!("/rooms/{room}/leave"),
        format!("/rooms/{room}/messages"),
        "/rooms/x/messages".into(),
        "/ws/abc".into(),
        format!("/ws/{room}"),
        "/health".into(),
        "/does/not/exist".into(),
    ];
    for path in &paths {
        for req_method in ["GET", "POST", "DELETE"] {
            let r = s.http().request(
                "OPTIONS",
                path,
                &[
                    ("Origin", ORIGIN),
                    ("Access-Control-Request-Method", req_method),
                    (
                        "Access-Control-Request-Headers",
                        "authorization,content-type",
                    ),
                ],
                None,
            );
            assert_eq!(r.status, 204, "OPTIONS {path}: {}", r.text());
            assert!(r.body.is_empty());
            assert_cors(&r, &format!("OPTIONS {path}"));
            let methods = list(
                r.header("access-control-allow-methods")
                    .unwrap_or_else(|| panic!("OPTIONS {path}: no Allow-Methods")),
            );
            for m in ["get", "post", "delete", "head"] {
                assert!(
                    methods.iter().any(|x| x == m),
                    "OPTIONS {path}: methods {methods:?} lack {m}"
                );
            }
            let headers = list(
                r.header("access-control-allow-headers")
                    .unwrap_or_else(|| panic!("OPTIONS {path}: no Allow-Headers")),
            );
            for want in ["authorization", "content-type"] {
                assert!(
                    headers.iter().any(|x| x == want || x == "*"),
                    "OPTIONS {path}: headers {headers:?} lack {want}"
                );
            }
        }
    }
}

#[test]
fn a_preflight_204_has_no_body_and_keeps_the_connection_usable() {
    let s = Server::start(&[]);
    let mut h = s.http();
    h.send_raw(b"OPTIONS /sessions HTTP/1.1\r\nHost: t\r\nOrigin: https://chat.example.org\r\nConnection: close\r\n\r\n");
    let mut all = Vec::new();
    let _ = std::io::Read::read_to_end(&mut h.stream, &mut all);
    let text = String::from_utf8_lossy(&all);
    assert!(text.starts_with("HTTP/1.1 204"), "{text:?}");
    assert!(
        text.ends_with("\r\n\r\n"),
        "a 204 must not carry a body: {text:?}"
    );
    // On a keep-alive connection, the answer after a preflight is intact.
    let mut h = s.http();
    for _ in 0..3 {
        let r = h.request("OPTIONS", "/sessions/me", &[("Origin", ORIGIN)], None);
        assert_eq!(r.status, 204);
        let r = h.get("/health", None);
        assert_eq!(r.status, 200, "{:?}", r);
    }
}

#[test]
fn browser_style_requests_with_json_content_type_on_get_work() {
    let s = Server::start(&["--room-list"]);
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    let auth = bearer(&sid);
    let h = [
        ("Content-Type", "application/json"),
        ("Origin", ORIGIN),
        ("Authorization", auth.as_str()),
    ];
    let mut c = s.http();
    for path in [
        "/health".to_string(),
        "/sessions/me".into(),
        "/rooms".into(),
        "/rooms/all".into(),
        format!("/rooms/{room}"),
        format!("/rooms/{room}/messages?limit=10"),
    ] {
        let r = c.request("GET", &path, &h, None);
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        assert_cors(&r, &path);
    }
    // A browser POST /rooms sends Content-Type but no body (Content-Length: 0).
    let r = c.request("POST", "/rooms", &h, Some(""));
    assert_eq!(r.status, 201, "{}", r.text());
    let r = c.request("DELETE", &format!("/rooms/{room}/leave"), &h, None);
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn websocket_upgrades_are_accepted_from_any_origin() {
    let s = Server::start(&[]);
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    for origin in [
        ORIGIN,
        "null",
        "http://localhost:3000",
        "https://evil.example",
    ] {
        let stream = TcpStream::connect(s.addr).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut req = format!("ws://{}/ws/{room}?session_id={sid}", s.addr)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("Origin", origin.parse().unwrap());
        let (mut socket, resp) = tungstenite::client::client(req, MaybeTlsStream::Plain(stream))
            .unwrap_or_else(|e| panic!("Origin {origin}: upgrade refused: {e}"));
        assert_eq!(resp.status().as_u16(), 101);
        let welcome = socket.read().unwrap();
        let v: serde_json::Value = serde_json::from_str(welcome.to_text().unwrap()).unwrap();
        assert_eq!(v["type"], "welcome", "{v}");
    }
}

#[test]
fn every_answer_says_nosniff_and_lets_browsers_read_retry_after_and_www_authenticate() {
    let s = Server::start(&["--create-rate", "2", "--create-burst", "2"]);
    let (sid, _) = s.session("alice");
    let room = s.room(&sid); // the budget of 2 is spent: the next create is a 429
    let auth = bearer(&sid);
    // The 429s first, while the budget is spent (it refills at 2 per second).
    let cases: Vec<Case> = vec![
        (
            429,
            "POST",
            "/rooms".into(),
            vec![("Authorization", &auth)],
            None,
        ),
        (429, "GET", format!("/rooms/{room}"), vec![], None),
        (200, "GET", "/health".into(), vec![], None),
        (200, "GET", "/".into(), vec![], None),
        (200, "GET", "/openapi.json".into(), vec![], None),
        (200, "HEAD", "/docs".into(), vec![], None),
        (204, "OPTIONS", "/sessions".into(), vec![], None),
        (401, "GET", "/sessions/me".into(), vec![], None),
        (404, "GET", "/nope".into(), vec![], None),
    ];
    for (want, method, path, headers, body) in cases {
        let r = s.http().request(method, &path, &headers, body);
        assert_eq!(r.status, want, "{method} {path}: {}", r.text());
        assert_eq!(
            r.header("x-content-type-options"),
            Some("nosniff"),
            "{method} {path}: {:?}",
            r.headers
        );
        let exposed = list(
            r.header("access-control-expose-headers")
                .unwrap_or_else(|| panic!("{method} {path}: no Expose-Headers")),
        );
        for h in ["retry-after", "www-authenticate"] {
            assert!(
                exposed.iter().any(|x| x == h),
                "{method} {path}: {exposed:?}"
            );
        }
        if want == 429 {
            assert!(r.header("retry-after").is_some(), "{method} {path}");
        }
        if want == 401 {
            assert!(r.header("www-authenticate").is_some(), "{method} {path}");
        }
    }
}

/// The text of the first inline `<tag>` element of a page.
fn inline(page: &str, tag: &str) -> String {
    let start = page.find(&format!("<{tag}>")).expect("an inline element") + tag.len() + 2;
    let end = start + page[start..].find(&format!("</{tag}>")).expect("its end");
    page[start..end].to_string()
}

#[test]
fn html_pages_get_a_strict_content_security_policy_and_cannot_be_framed() {
    use sha2::{Digest, Sha256};
    let s = Server::start(&[]);
    for path in ["/", "/docs"] {
        let r = s.http().get(path, None);
        assert_eq!(r.status, 200);
        assert!(r.header("content-type").unwrap().starts_with("text/html"));
        assert_eq!(r.header("x-frame-options"), Some("DENY"), "{path}");
        let csp = r
            .header("content-security-policy")
            .unwrap_or_else(|| panic!("{path}: no Content-Security-Policy in {:?}", r.headers));
        let directives: Vec<&str> = csp.split(';').map(str::trim).collect();
        for d in [
            "default-src 'none'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
            "form-action 'none'",
            "connect-src 'self'",
            "img-src data:",
        ] {
            assert!(directives.contains(&d), "{path}: {d:?} missing in {csp}");
        }
        assert!(!csp.contains("unsafe"), "{path}: {csp}");
        assert!(
            !csp.contains("http"),
            "{path}: no other origin is needed: {csp}"
        );
        // The page's own inline script and style are allowed by hash, and only by hash.
        let page = r.text();
        for (tag, directive) in [("script", "script-src"), ("style", "style-src")] {
            let hash = Sha256::digest(inline(&page, tag).as_bytes());
            let want = format!("'sha256-{}'", base64(&hash));
            let d = directives
                .iter()
                .find(|d| d.starts_with(directive))
                .unwrap_or_else(|| panic!("{path}: no {directive} in {csp}"));
            assert!(d.contains(&want), "{path}: {directive} lacks {want}: {csp}");
            assert!(
                d.split(' ').skip(1).all(|s| s.starts_with("'sha256-")),
                "{path}: {d}"
            );
        }
        // HEAD says the same.
        let h = s.http().request("HEAD", path, &[], None);
        assert_eq!(h.header("content-security-policy"), Some(csp));
    }
    // JSON answers are not pages: no policy needed there.
    let r = s.http().get("/health", None);
    assert!(r.header("content-security-policy").is_none());
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in bytes.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=c.len() {
            s.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
        s.extend(std::iter::repeat_n('=', 3 - c.len()));
    }
    s
}
