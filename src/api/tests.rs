use super::*;
use crate::hub::HubConfig;
use crate::ratelimit::CreateLimiter;
use crate::time::Now;

fn call(hub: &mut Hub, raw: &str) -> Reply {
    let raw = raw.replace('\n', "\r\n");
    let (req, n) = http::parse(raw.as_bytes(), 16 * 1024, 64 * 1024)
        .unwrap()
        .unwrap();
    let body = &raw.as_bytes()[n..n + req.content_length];
    let mut limiter = CreateLimiter::new(0, 1);
    let mut ctx = ApiCtx {
        now: Now::fake(0),
        room_list: true,
        echo_path: None,
        peer: std::net::IpAddr::from([127, 0, 0, 1]),
        limiter: &mut limiter,
        cluster: None,
    };
    handle(&req, body, hub, &mut ctx)
}

#[track_caller]
fn resp(r: Reply) -> Response {
    match r {
        Reply::Response(r) => r,
        other => panic!("expected a response, got {other:?}"),
    }
}

#[track_caller]
fn json(r: &Response) -> serde_json::Value {
    match &r.body {
        http::Body::Owned(b) => serde_json::from_slice(b).unwrap(),
        http::Body::Static(b) => serde_json::from_slice(b).unwrap(),
        http::Body::Empty => serde_json::Value::Null,
    }
}

fn post_session(hub: &mut Hub, body: &str) -> Response {
    resp(call(
        hub,
        &format!(
            "POST /sessions HTTP/1.1\nContent-Length: {}\n\n{body}",
            body.len()
        ),
    ))
}

#[test]
fn session_validation_statuses() {
    let mut hub = Hub::new(HubConfig::default());
    let r = post_session(&mut hub, r#"{"username":"  alice  "}"#);
    assert_eq!(r.status, 201);
    let v = json(&r);
    assert_eq!(v["username"], "alice");
    assert_eq!(v["user_id"].as_str().unwrap().len(), 8);
    assert_eq!(post_session(&mut hub, "{nope").status, 400);
    assert_eq!(post_session(&mut hub, r#"{"username":5}"#).status, 422);
    assert_eq!(post_session(&mut hub, r#"{}"#).status, 422);
    assert_eq!(post_session(&mut hub, r#"[1]"#).status, 422);
    assert_eq!(post_session(&mut hub, r#"["alice"]"#).status, 422);
    assert_eq!(post_session(&mut hub, r#"  ["alice""#).status, 400);
    assert_eq!(post_session(&mut hub, "").status, 422);
    assert_eq!(post_session(&mut hub, r#"{"username":"a"}"#).status, 400);
    assert_eq!(
        post_session(&mut hub, r#"{"username":"a\u0007b"}"#).status,
        400
    );
    let long = format!(r#"{{"username":"{}"}}"#, "é".repeat(51));
    assert_eq!(post_session(&mut hub, &long).status, 400);
    let ok = format!(r#"{{"username":"{}"}}"#, "é".repeat(50));
    assert_eq!(post_session(&mut hub, &ok).status, 201);
}

#[test]
fn the_plain_username_shortcut_reads_what_serde_reads_or_leaves_it_to_serde() {
    let serde_name = |b: &[u8]| {
        serde_json::from_slice::<NewSession<'_>>(b)
            .ok()
            .and_then(|n| n.username.map(Cow::into_owned))
    };
    let bodies: [&[u8]; 16] = [
        br#"{"username":"alice"}"#,
        br#"{"username":"  a b  "}"#,
        "{\"username\":\"\u{e9}\u{1F600}\"}".as_bytes(),
        br#"{"username":""}"#,
        b"{\"username\":\"a\x7fb\"}",
        br#"{"username":"a\"b"}"#,
        br#"{"username":"a\u0041"}"#,
        br#"{"username":"a"b"}"#,
        br#"{"username":"a"}}"#,
        br#"{"username":"a","x":1}"#,
        br#"{"username":"a"} "#,
        br#" {"username":"a"}"#,
        br#"{"username":"x","username":"y"}"#,
        b"{\"username\":\"a\tb\"}",
        b"{\"username\":\"a\xffb\"}",
        b"{\"username\":\"a\xc3\"}",
    ];
    let mut taken = 0;
    for b in bodies {
        if let Some(n) = plain_username(b) {
            taken += 1;
            assert_eq!(
                Some(n.to_owned()),
                serde_name(b),
                "{:?}",
                String::from_utf8_lossy(b)
            );
        }
    }
    assert_eq!(
        taken, 5,
        "alice, spaces, non-ASCII, empty, DEL take the shortcut"
    );
    // The answers are those of serde's reading, shortcut or not.
    let mut hub = Hub::new(HubConfig::default());
    let r = post_session(&mut hub, r#"{"username":"alice"}"#);
    assert_eq!(
        (r.status, json(&r)["username"].as_str()),
        (201, Some("alice"))
    );
    let r = post_session(&mut hub, r#"{"username":"a\"b"}"#);
    assert_eq!(
        (r.status, json(&r)["username"].as_str()),
        (201, Some("a\"b"))
    );
    assert_eq!(
        post_session(&mut hub, "{\"username\":\"a\u{7f}b\"}").status,
        400
    );
    assert_eq!(post_session(&mut hub, r#"{"username":""}"#).status, 400);
    assert_eq!(post_session(&mut hub, r#"{"username":"a"}}"#).status, 400);
}

#[test]
fn routing_slashes_methods_and_auth() {
    let mut hub = Hub::new(HubConfig::default());
    let sid = json(&post_session(&mut hub, r#"{"username":"bob"}"#))["session_id"]
        .as_str()
        .unwrap()
        .to_string();
    for path in ["/rooms", "/rooms/"] {
        let r = resp(call(
            &mut hub,
            &format!("POST {path} HTTP/1.1\nAuthorization: Bearer {sid}\n\n"),
        ));
        assert_eq!(r.status, 201, "{path}");
    }
    let r = resp(call(&mut hub, "GET /rooms HTTP/1.1\n\n"));
    assert_eq!(r.status, 401);
    assert_eq!(r.extra, "WWW-Authenticate: Bearer\r\n");
    let r = resp(call(
        &mut hub,
        "GET /rooms HTTP/1.1\nAuthorization: Bearer 00000000-0000-4000-8000-000000000000\n\n",
    ));
    assert_eq!(
        (r.status, json(&r)["detail"].as_str()),
        (401, Some("Invalid or expired session"))
    );
    // Endpoints without auth ignore a stale token.
    let r = resp(call(
        &mut hub,
        "GET /rooms/all HTTP/1.1\nAuthorization: Bearer 00000000-0000-4000-8000-000000000000\n\n",
    ));
    assert_eq!(r.status, 200);
    assert_eq!(json(&r)["rooms"].as_array().unwrap().len(), 2);
    assert_eq!(resp(call(&mut hub, "PUT /rooms HTTP/1.1\n\n")).status, 405);
    assert_eq!(
        resp(call(&mut hub, "GET /rooms/ZZZ HTTP/1.1\n\n")).status,
        404
    );
    assert_eq!(
        resp(call(&mut hub, "GET /rooms/0123456789 HTTP/1.1\n\n")).status,
        404
    );
    assert_eq!(resp(call(&mut hub, "GET /nope HTTP/1.1\n\n")).status, 404);
    assert_eq!(
        resp(call(&mut hub, "OPTIONS /sessions/me HTTP/1.1\n\n")).status,
        204
    );
    assert_eq!(resp(call(&mut hub, "HEAD /ping HTTP/1.1\n\n")).status, 200);
    assert!(matches!(
        call(&mut hub, "GET /metrics HTTP/1.1\n\n"),
        Reply::Metrics
    ));
}

#[test]
fn upgrade_refusals() {
    let mut hub = Hub::new(HubConfig::default());
    let sid = json(&post_session(&mut hub, r#"{"username":"bob"}"#))["session_id"]
        .as_str()
        .unwrap()
        .to_string();
    let room = json(&resp(call(
        &mut hub,
        &format!("POST /rooms HTTP/1.1\nAuthorization: Bearer {sid}\n\n"),
    )))["room_id"]
        .as_str()
        .unwrap()
        .to_string();
    let up = "Upgrade: websocket\nConnection: Upgrade\nSec-WebSocket-Version: 13\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\n";
    let ok = call(
        &mut hub,
        &format!("GET /ws/{room}?session_id={sid} HTTP/1.1\n{up}\n"),
    );
    assert!(matches!(ok, Reply::Upgrade { .. }), "{ok:?}");
    let status = |hub: &mut Hub, req: String| resp(call(hub, &req)).status;
    assert_eq!(
        status(
            &mut hub,
            format!("GET /ws/{room}?session_id=x HTTP/1.1\n{up}\n")
        ),
        403
    );
    assert_eq!(
        status(&mut hub, format!("GET /ws/{room} HTTP/1.1\n{up}\n")),
        403
    );
    assert_eq!(
        status(
            &mut hub,
            format!("GET /ws/0000000000?session_id={sid} HTTP/1.1\n{up}\n")
        ),
        404
    );
    assert_eq!(
        status(
            &mut hub,
            format!("GET /ws/{room}?session_id={sid} HTTP/1.1\n\n")
        ),
        426
    );
    let no_conn = up.replace("Connection: Upgrade\n", "Connection: keep-alive\n");
    assert_eq!(
        status(
            &mut hub,
            format!("GET /ws/{room}?session_id={sid} HTTP/1.1\n{no_conn}\n")
        ),
        400
    );
    assert_eq!(
        status(&mut hub, "PUT /rooms/all HTTP/1.1\n\n".to_string()),
        405
    );
    let v8 = up.replace("Version: 13", "Version: 8");
    assert_eq!(
        status(
            &mut hub,
            format!("GET /ws/{room}?session_id={sid} HTTP/1.1\n{v8}\n")
        ),
        426
    );
    let badkey = up.replace("dGhlIHNhbXBsZSBub25jZQ==", "x");
    assert_eq!(
        status(
            &mut hub,
            format!("GET /ws/{room}?session_id={sid} HTTP/1.1\n{badkey}\n")
        ),
        400
    );
}

#[test]
fn create_rate_limits_creation_and_room_guessing_per_address() {
    let mut hub = Hub::new(HubConfig::default());
    let mut limiter = CreateLimiter::new(2, 2);
    let mut send = |hub: &mut Hub, raw: &str| {
        let raw = raw.replace('\n', "\r\n");
        let (req, n) = http::parse(raw.as_bytes(), 16 * 1024, 64 * 1024)
            .unwrap()
            .unwrap();
        let body = &raw.as_bytes()[n..n + req.content_length];
        let mut ctx = ApiCtx {
            now: Now::fake(0),
            room_list: true,
            echo_path: None,
            peer: std::net::IpAddr::from([10, 0, 0, 1]),
            limiter: &mut limiter,
            cluster: None,
        };
        resp(handle(&req, body, hub, &mut ctx))
    };
    let body = r#"{"username":"bob"}"#;
    let new = format!(
        "POST /sessions HTTP/1.1\nContent-Length: {}\n\n{body}",
        body.len()
    );
    assert_eq!(send(&mut hub, &new).status, 201);
    assert_eq!(
        send(&mut hub, "GET /rooms/0123456789 HTTP/1.1\n\n").status,
        404
    );
    let r = send(&mut hub, &new);
    assert_eq!((r.status, r.retry_after), (429, Some(1)));
    assert_eq!(
        send(&mut hub, "GET /rooms/0123456789 HTTP/1.1\n\n").status,
        429
    );
    assert_eq!(send(&mut hub, "GET /health HTTP/1.1\n\n").status, 200);
}
