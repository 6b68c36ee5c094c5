//! WebSocket errors: frames the server does not understand get an `error` frame and the socket
//! keeps working (invalid JSON, JSON that is not an object, unknown type, binary frames);
//! protocol violations close only the offending socket: bad UTF-8 in a text frame → 1007, an
//! unmasked client frame → 1002. The other members of the room carry on.
mod common;

use common::*;
use serde_json::{Value, json};
use tungstenite::Message;

/// alice (tungstenite) alone in a fresh room, past her `user_joined`.
fn alone(s: &Server) -> (String, String, Ws) {
    let (sid, _) = s.session("alice");
    let room = s.room(&sid);
    let (mut ws, _) = s.join(&room, &sid);
    ws.recv_type("user_joined");
    (sid, room, ws)
}

#[track_caller]
fn assert_error(v: &Value, code: &str) {
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["code"], code, "{v}");
    assert!(v["detail"].as_str().is_some_and(|d| !d.is_empty()), "{v}");
}

/// The socket still chats: a message goes out and its echo comes back next.
#[track_caller]
fn assert_still_chats(ws: &mut Ws, text: &str) {
    ws.chat(text);
    let m = ws.recv();
    assert_eq!(
        (m["type"].as_str(), m["message"].as_str()),
        (Some("chat"), Some(text)),
        "{m}"
    );
}

#[test]
fn invalid_json_gets_an_error_frame_and_the_socket_keeps_working() {
    let s = Server::start(&[]);
    let (_, room, mut wa) = alone(&s);
    let (b, _) = s.session("bob");
    let (mut wb, _) = s.join(&room, &b);
    wb.recv_type("user_joined");
    wa.recv_type("user_joined");
    for bad in [
        "{not json",
        "",
        "{\"type\": \"chat\", \"message\": \"hi\"",
        "chat",
        "{\"type\":\"chat\"}}",
    ] {
        wa.send_text(bad);
        assert_error(&wa.recv(), "invalid_json");
    }
    assert_still_chats(&mut wa, "after the errors");
    // The errors went to alice only: bob's next message is her chat.
    assert_eq!(wb.recv()["message"], "after the errors");
}

#[test]
fn json_that_is_not_an_object_is_invalid_json_not_a_crash() {
    let s = Server::start(&[]);
    let (_, _, mut ws) = alone(&s);
    let mut wrong = Vec::new();
    for bad in [
        "[]",
        "[1, 2, 3]",
        r#"["chat", "hello"]"#,
        r#"[{"type":"chat","message":"x"}]"#,
        "\"chat\"",
        "42",
        "null",
        "true",
    ] {
        ws.send_text(bad);
        let v = ws.recv();
        if v["type"] != "error" || v["code"] != "invalid_json" {
            wrong.push(format!("{bad} -> {v}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "expected invalid_json errors:\n{}",
        wrong.join("\n")
    );
    assert_still_chats(&mut ws, "still alive");
    assert_eq!(s.http().get("/health", None).status, 200);
}

#[test]
fn an_unknown_type_is_unknown_type() {
    let s = Server::start(&[]);
    let (_, _, mut ws) = alone(&s);
    for bad in [
        json!({ "type": "dance" }),
        json!({ "type": "CHAT", "message": "x" }),
        json!({ "type": "welcome" }),
        json!({ "type": "x".repeat(5000) }),
    ] {
        ws.send_json(bad);
        assert_error(&ws.recv(), "unknown_type");
    }
    assert_still_chats(&mut ws, "ok");
}

#[test]
fn a_binary_frame_gets_an_error_frame() {
    let s = Server::start(&[]);
    let (_, _, mut ws) = alone(&s);
    ws.socket
        .send(Message::Binary(
            br#"{"type":"chat","message":"bin"}"#[..].into(),
        ))
        .unwrap();
    let v = ws.recv();
    assert_eq!(v["type"], "error", "{v}");
    assert!(v["code"].is_string() && v["detail"].is_string(), "{v}");
    // The binary frame was not taken as a chat.
    assert_still_chats(&mut ws, "text works");
}

#[test]
fn bad_utf8_closes_with_1007_and_the_room_carries_on() {
    let s = Server::start(&[]);
    let (_, room, mut wa) = alone(&s);
    let (b, _) = s.session("bob");
    let mut raw = s.raw_ws(&format!("/ws/{room}?session_id={b}"));
    assert_eq!(raw.recv()["type"], "welcome");
    assert_eq!(raw.recv()["type"], "user_joined");
    assert_eq!(wa.recv_type("user_joined")["user"], "bob");

    raw.send_frame(
        1,
        b"{\"type\":\"chat\",\"message\":\"\xff\xfe\xc3\x28\"}",
        true,
    );
    assert_eq!(raw.close_code(), Some(1007));
    assert_eq!(wa.recv_type("user_left")["user"], "bob");
    assert_still_chats(&mut wa, "carry on");
    // Nothing of the bad frame was stored.
    let hist = s
        .http()
        .get(&format!("/rooms/{room}/messages"), Some(&b))
        .json();
    assert!(
        hist["messages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["type"] != "chat" || m["message"] == "carry on"),
        "{hist}"
    );
}

#[test]
fn an_unmasked_client_frame_closes_with_1002_and_the_room_carries_on() {
    let s = Server::start(&[]);
    let (_, room, mut wa) = alone(&s);
    let (b, _) = s.session("bob");
    let mut raw = s.raw_ws(&format!("/ws/{room}?session_id={b}"));
    assert_eq!(raw.recv()["type"], "welcome");
    assert_eq!(raw.recv()["type"], "user_joined");
    assert_eq!(wa.recv_type("user_joined")["user"], "bob");
    // A masked frame works (the raw client is a valid client)...
    raw.send_frame(
        1,
        json!({ "type": "chat", "message": "masked" })
            .to_string()
            .as_bytes(),
        true,
    );
    assert_eq!(raw.recv()["message"], "masked");
    assert_eq!(wa.recv()["message"], "masked");
    // ... an unmasked one is a protocol error.
    raw.send_frame(
        1,
        json!({ "type": "chat", "message": "unmasked" })
            .to_string()
            .as_bytes(),
        false,
    );
    assert_eq!(raw.close_code(), Some(1002));
    assert_eq!(
        raw.read_frame().map(|f| f.opcode),
        None,
        "the server closes the TCP connection after the close frame"
    );
    let left = wa.recv();
    assert_eq!(
        (left["type"].as_str(), left["user"].as_str()),
        (Some("user_left"), Some("bob")),
        "the unmasked chat was not delivered: {left}"
    );
    assert_still_chats(&mut wa, "carry on");
}
