//! Issue 12, finding 2: a room cannot be made unjoinable. Chat messages are limited by what
//! they cost stored (`--max-chat-bytes`, escapes included), a `welcome` and a history answer
//! carry at most `--max-welcome-bytes` of messages (the newest; `truncated: true` and
//! `GET /rooms/{id}/messages?before=` for the rest), the welcome never counts against
//! `--max-output-queue`, and a socket cut off as a slow consumer still gets its `101`.
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const WELCOME_BUDGET: usize = 256 * 1024;

/// Sends each chat at the default rate limit's pace (one refused for the rate is sent again
/// 100 ms later); returns the server's answer to each: its echo, or an error frame.
fn send_paced(ws: &mut Ws, texts: &[String]) -> Vec<Value> {
    let mut answers = Vec::new();
    for t in texts {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            assert!(Instant::now() < deadline, "the server never took a chat");
            ws.chat(t);
            let v = loop {
                let v = ws.recv();
                if (v["type"] == "chat" && v["message"] == t.as_str()) || v["type"] == "error" {
                    break v;
                }
            };
            if v["code"] == "rate_limited" {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            answers.push(v);
            break;
        }
    }
    answers
}

fn ids(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

/// `GET /rooms/{room}/messages?limit=1000[&before=id]` → (messages, truncated, body bytes).
fn page(h: &mut Http, room: &str, sid: &str, before: Option<&str>) -> (Vec<Value>, bool, usize) {
    let path = match before {
        Some(b) => format!("/rooms/{room}/messages?limit=1000&before={b}"),
        None => format!("/rooms/{room}/messages?limit=1000"),
    };
    let r = h.get(&path, Some(sid));
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    let v = r.json();
    let truncated = v.get("truncated").is_some_and(|t| t == true);
    (
        v["messages"].as_array().unwrap().clone(),
        truncated,
        r.body.len(),
    )
}

#[test]
fn a_room_flooded_with_escaped_messages_stays_joinable_and_pages_back() {
    let s = Server::start(&[]);
    let (mallory, _) = s.session("mallory");
    let room = s.room(&mallory);
    let (mut wm, _) = s.join(&room, &mallory);

    // The attack of the issue: 50 messages of 4096 x U+0001 (24.6 KB each once escaped).
    let escaped: Vec<String> = (0..50).map(|_| "\u{1}".repeat(4096)).collect();
    let answers = send_paced(&mut wm, &escaped);

    // A newcomer (another client address, its own session) still gets its 101 and welcome.
    let bob = s.session_from(BYSTANDER, "bob").0;
    let mut wb = s
        .ws_from(BYSTANDER, &format!("/ws/{room}?session_id={bob}"))
        .expect("the newcomer's upgrade is accepted");
    let welcome = wb.recv();
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    wb.chat_roundtrip("hello, I could join");

    // Each of those messages was refused for its size once encoded, not stored.
    for a in &answers {
        assert_eq!(a["code"], "message_too_long", "{a}");
        assert!(a["detail"].as_str().unwrap().contains("bytes"), "{a}");
    }

    // The largest messages allowed (2 700 x U+0001, 16.2 KB each): 60 of them are 970 KB,
    // more than a welcome may carry.
    let big: Vec<String> = (0..60)
        .map(|i| format!("{i:02}{}", "\u{1}".repeat(2700)))
        .collect();
    let sent = send_paced(&mut wm, &big);
    assert!(sent.iter().all(|m| m["type"] == "chat"), "stored and sent");

    let carol = s.session_from(BYSTANDER, "carol").0;
    let mut wc = s
        .ws_from(BYSTANDER, &format!("/ws/{room}?session_id={carol}"))
        .expect("the next newcomer's upgrade is accepted too");
    let welcome = wc.recv();
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["truncated"], true, "older messages left out");
    let got = welcome["messages"].as_array().unwrap().clone();
    assert!(
        welcome.to_string().len() < WELCOME_BUDGET + 20 * 1024,
        "welcome of {} bytes",
        welcome.to_string().len()
    );
    assert!(got.len() > 5 && got.len() < 30, "{} messages", got.len());
    assert_eq!(
        ids(&got),
        ids(&sent[60 - got.len()..]),
        "the newest, in order"
    );

    // The client pages the rest with `before`, each page within the same budget.
    let mut h = s.http_from(BYSTANDER);
    let mut all = got.clone();
    for _ in 0..20 {
        let oldest = all[0]["id"].as_str().unwrap().to_string();
        let (older, truncated, bytes) = page(&mut h, &room, &carol, Some(&oldest));
        assert!(bytes < WELCOME_BUDGET + 20 * 1024, "page of {bytes} bytes");
        if older.is_empty() {
            assert!(!truncated);
            break;
        }
        all.splice(0..0, older);
    }
    let chats: Vec<Value> = all
        .iter()
        .filter(|m| m["type"] == "chat" && m["user"] == "mallory")
        .cloned()
        .collect();
    assert_eq!(ids(&chats), ids(&sent), "every message, once, in order");
    // Without `before` the answer has the same bound and says what it left out.
    let (_, truncated, bytes) = page(&mut h, &room, &carol, None);
    assert!(truncated && bytes < WELCOME_BUDGET + 20 * 1024, "{bytes}");

    // A reconnect since the first of them: the newest after it, flagged, within the budget.
    let first = sent[0]["id"].as_str().unwrap();
    let mut wd = s
        .ws_from(
            BYSTANDER,
            &format!("/ws/{room}?session_id={carol}&since={first}"),
        )
        .expect("reconnect accepted");
    let w = wd.recv();
    assert_eq!(
        (&w["type"], &w["truncated"]),
        (&"welcome".into(), &true.into())
    );
    assert!(w.to_string().len() < WELCOME_BUDGET + 20 * 1024);
    wc.chat_roundtrip("carol is fine");
    wb.chat_roundtrip("bob is fine");
}

/// The client's upgrade request and a chat frame in one write, before it has its 101.
fn upgrade_and_chat(s: &Server, room: &str, sid: &str, chat: &str) -> TcpStream {
    let mut stream = TcpStream::connect(s.addr).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut bytes = format!(
        "GET /ws/{room}?session_id={sid} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes();
    let payload = serde_json::json!({"type": "chat", "message": chat}).to_string();
    let key = [1u8, 2, 3, 4];
    bytes.push(0x81);
    bytes.push(0x80 | 126);
    bytes.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    bytes.extend_from_slice(&key);
    bytes.extend(payload.bytes().enumerate().map(|(i, b)| b ^ key[i % 4]));
    stream.write_all(&bytes).unwrap();
    stream
}

#[test]
fn a_socket_cut_off_before_its_101_went_out_still_gets_the_101_then_1013() {
    let s = Server::start(&["--max-output-queue", "4KiB"]);
    let (a, _) = s.session("alice");
    let room = s.room(&a);
    // Its own chat echo (4.3 KB) passes the 4 KiB limit in the same step as the upgrade.
    let mut stream = upgrade_and_chat(&s, &room, &a, &"a".repeat(4096));
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "the handshake must come first, got {:?}",
        &text[..text.len().min(80)]
    );
    let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let frames = &got[end..];
    assert_eq!(
        frames.first(),
        Some(&0x88),
        "then a close frame: {frames:?}"
    );
    assert_eq!(&frames[2..4], &1013u16.to_be_bytes(), "1013: {frames:?}");

    // The server is fine and the slot is free: a bystander from elsewhere chats.
    let bob = s.session_from(BYSTANDER, "bob").0;
    let mut wb = s
        .ws_from(BYSTANDER, &format!("/ws/{room}?session_id={bob}"))
        .unwrap();
    assert_eq!(wb.recv()["type"], "welcome");
    wb.chat_roundtrip("bob is fine");
    assert!(s.metric("chatloop_slow_consumers_total") >= 1.0);
}
