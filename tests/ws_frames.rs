//! WebSocket framing (RFC 6455) on the chat socket: fragmented text messages are reassembled,
//! control frames may come between fragments, ping gets pong with the same payload, a close
//! is echoed with its code, and framing errors (reserved bits, unknown opcodes, a
//! continuation with nothing to continue, fragmented control frames) close with 1002.
mod common;

use common::*;
use serde_json::json;

/// bob on a raw socket in alice's room, past his welcome and `user_joined`.
fn raw_member(s: &Server) -> (Ws, RawWs) {
    let (a, _) = s.session("alice");
    let (b, _) = s.session("bob");
    let room = s.room(&a);
    let (mut wa, _) = s.join(&room, &a);
    wa.recv_type("user_joined");
    let mut raw = s.raw_ws(&format!("/ws/{room}?session_id={b}"));
    assert_eq!(raw.recv()["type"], "welcome");
    assert_eq!(raw.recv()["type"], "user_joined");
    assert_eq!(wa.recv_type("user_joined")["user"], "bob");
    (wa, raw)
}

#[test]
fn a_fragmented_text_message_is_reassembled() {
    let s = Server::start(&[]);
    let (mut wa, mut raw) = raw_member(&s);
    let msg = json!({ "type": "chat", "message": "in three parts, é included" }).to_string();
    let bytes = msg.as_bytes();
    // Split inside the two-byte 'é' too: UTF-8 is checked on the whole message.
    let cut = msg.find('é').unwrap() + 1;
    raw.send_first_byte(0x01, &bytes[..10], true);
    raw.send_first_byte(0x00, &bytes[10..cut], true);
    // A ping between fragments is allowed and answered.
    raw.send_frame(0x9, b"mid", true);
    raw.send_first_byte(0x80, &bytes[cut..], true);
    let mut got_pong = false;
    loop {
        let f = raw.read_frame().expect("a frame");
        match f.opcode {
            0xA => {
                assert_eq!(f.payload, b"mid");
                got_pong = true;
            }
            0x1 => {
                let v: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
                assert_eq!(v["message"], "in three parts, é included", "{v}");
                break;
            }
            op => panic!("unexpected opcode {op}: {:?}", f.close_code()),
        }
    }
    assert!(
        got_pong || raw.read_frame().is_some_and(|f| f.opcode == 0xA),
        "the ping got a pong"
    );
    assert_eq!(wa.recv()["message"], "in three parts, é included");
}

#[test]
fn a_ping_gets_a_pong_with_its_payload_and_a_close_is_echoed() {
    let s = Server::start(&[]);
    let (mut wa, mut raw) = raw_member(&s);
    raw.send_frame(0x9, b"hello?", true);
    let f = raw.read_frame().expect("a pong");
    assert_eq!((f.opcode, f.payload.as_slice()), (0xA, &b"hello?"[..]));
    // An unsolicited pong is ignored.
    raw.send_frame(0xA, b"", true);
    raw.send_frame(0x8, &[0x03, 0xE9, b'b', b'y', b'e'], true); // 1001 "bye"
    assert_eq!(raw.close_code(), Some(1001));
    assert_eq!(wa.recv_type("user_left")["user"], "bob");
}

/// Raw frames to send: first byte (FIN, RSV, opcode) and payload.
type Frames<'a> = &'a [(u8, &'a [u8])];

#[test]
fn framing_errors_close_with_1002() {
    let s = Server::start(&[]);
    let cases: [(&str, Frames); 5] = [
        ("RSV1 set without an extension", &[(0xC1, b"{}")]),
        ("reserved opcode 3", &[(0x83, b"x")]),
        ("continuation with nothing to continue", &[(0x80, b"x")]),
        ("fragmented ping", &[(0x09, b"x")]),
        (
            "new text message inside a fragmented one",
            &[(0x01, b"{\"ty"), (0x81, b"pe\":\"typing\"}")],
        ),
    ];
    for (what, frames) in cases {
        let (mut wa, mut raw) = raw_member(&s);
        for (first, payload) in frames {
            raw.send_first_byte(*first, payload, true);
        }
        assert_eq!(raw.close_code(), Some(1002), "{what}");
        assert_eq!(wa.recv_type("user_left")["user"], "bob", "{what}");
    }
    assert_eq!(s.http().get("/health", None).status, 200);
}
