//! The WebSocket messages: parsing client frames and writing server frames, in one place.
//!
//! Server messages are written straight into a reused byte buffer (no intermediate `Value`)
//! and wrapped into one unmasked WebSocket text frame, shared by every recipient as a
//! [`Frame`] (`Rc<[u8]>`: one allocation per broadcast, a reference-count bump per member).

use std::borrow::Cow;
use std::io::Write as _;
use std::rc::Rc;

use serde::Deserialize;
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::ids::{MsgId, RoomId, UserId};
use crate::time::{UnixMicros, write_iso8601};

/// A complete server WebSocket frame (header + payload), shared by all its recipients.
pub type Frame = Rc<[u8]>;

/// What a client may send on a chat socket.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientMsg<'a> {
    /// `{"type": "chat", "message": ...}`: the text, borrowed from the frame unless JSON escapes
    /// had to be decoded.
    Chat(Cow<'a, str>),
    /// `{"type": "typing"}`: the sender is typing.
    Typing,
}

/// Why a client frame was not understood; the connection stays open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// Not a JSON object, or a `chat` without a string `message`; the text is the `detail` sent
    /// back.
    InvalidJson(&'static str),
    /// A `type` other than `chat` or `typing` (at most its first 40 characters; empty when absent).
    UnknownType(String),
}

impl ClientError {
    /// The `code` of the `error` message sent back for this error.
    pub fn code(&self) -> &'static str {
        match self {
            ClientError::InvalidJson(_) => "invalid_json",
            ClientError::UnknownType(_) => "unknown_type",
        }
    }

    /// The human-readable `detail` of the `error` message sent back (never the client's whole
    /// text).
    pub fn detail(&self) -> Cow<'static, str> {
        match self {
            ClientError::InvalidJson(d) => Cow::Borrowed(d),
            ClientError::UnknownType(t) => Cow::Owned(format!(
                "Unknown message type {t:?}; expected \"chat\" or \"typing\""
            )),
        }
    }
}

#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    message: Option<Cow<'a, str>>,
}

/// Parses one client text message.
pub fn parse_client(text: &str) -> Result<ClientMsg<'_>, ClientError> {
    // serde would also read a struct from a JSON array (`["chat", "hi"]`): only objects count.
    if !text.trim_start().starts_with('{') {
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => ClientError::InvalidJson(
                "Expected a JSON object like {\"type\": \"chat\", \"message\": \"Hello!\"}",
            ),
            Err(_) => ClientError::InvalidJson("Message is not valid JSON"),
        });
    }
    let msg: Incoming<'_> = match serde_json::from_str(text) {
        Ok(m) => m,
        Err(e) if e.is_data() => {
            return Err(ClientError::InvalidJson(
                "Expected a JSON object like {\"type\": \"chat\", \"message\": \"Hello!\"}",
            ));
        }
        Err(_) => return Err(ClientError::InvalidJson("Message is not valid JSON")),
    };
    match msg.kind.as_deref() {
        Some("chat") => match msg.message {
            Some(m) => Ok(ClientMsg::Chat(m)),
            None => Err(ClientError::InvalidJson(
                "A chat message needs a string \"message\" field",
            )),
        },
        Some("typing") => Ok(ClientMsg::Typing),
        Some(other) => Err(ClientError::UnknownType(other.chars().take(40).collect())),
        None => Err(ClientError::UnknownType(String::new())),
    }
}

/// Reusable scratch space for building frames; frames are written after a gap big enough
/// for the largest header, so the header goes in front without moving the payload.
pub struct FrameBuf {
    buf: Vec<u8>,
}

const GAP: usize = 10;

impl std::fmt::Debug for FrameBuf {
    /// Never the bytes (the last frame built): its capacity.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameBuf")
            .field("capacity", &self.buf.capacity())
            .finish()
    }
}

impl Default for FrameBuf {
    fn default() -> Self {
        FrameBuf {
            buf: Vec::with_capacity(4096),
        }
    }
}

impl FrameBuf {
    /// Starts a new message; returns the buffer to write its JSON into.
    pub fn start(&mut self) -> &mut Vec<u8> {
        self.buf.clear();
        self.buf.extend_from_slice(&[0; GAP]);
        &mut self.buf
    }

    /// Wraps the JSON written since `start` into one text frame (one allocation).
    pub fn finish_text(&mut self) -> Frame {
        self.finish(OpCode::Data(Data::Text))
    }

    /// Wraps the payload written since `start` into one frame of `opcode` (one allocation).
    fn finish(&mut self, opcode: OpCode) -> Frame {
        let len = (self.buf.len() - GAP) as u64;
        let header = FrameHeader {
            opcode,
            ..FrameHeader::default()
        };
        let hlen = header.len(len);
        let mut head = [0u8; GAP];
        header
            .format(len, &mut &mut head[..])
            .expect("a frame header fits in 10 bytes");
        let at = GAP - hlen;
        self.buf[at..GAP].copy_from_slice(&head[..hlen]);
        Rc::from(&self.buf[at..])
    }

    /// Returns the memory of any buffer bigger than a typical frame's (a welcome of a
    /// 1 000-member room) once the peak is over.
    pub fn shrink(&mut self) {
        self.shrink_above(4096);
    }

    /// Returns memory when a huge message made the buffer grow.
    pub fn trim(&mut self) {
        self.shrink_above(256 * 1024);
    }

    fn shrink_above(&mut self, limit: usize) {
        if self.buf.capacity() > limit {
            self.buf = Vec::with_capacity(4096);
        }
    }
}

/// The JSON payload of a server text frame built by [`FrameBuf`].
pub fn frame_payload(frame: &[u8]) -> &[u8] {
    let hlen = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => return &[],
    };
    frame.get(hlen..).unwrap_or(&[])
}

/// Writes a JSON string literal (with quotes and escapes).
pub fn json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

/// How many bytes [`json_str`] writes for `s` (quotes and escapes included), without
/// writing them: what a message costs stored and sent.
pub fn json_str_len(s: &str) -> usize {
    let escaped: usize = s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum();
    escaped + 2
}

/// Who a message is about.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    /// The display name as the session chose it (already validated).
    pub user: &'a str,
    /// The session's public id, shown as 8 hex characters.
    pub user_id: UserId,
}

/// The kinds of event stored in a room's history (their `type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A chat message from a member.
    Chat,
    /// A member joined the room (its first connection to it opened).
    UserJoined,
    /// A member left the room (its last connection to it closed, or its session ended).
    UserLeft,
}

impl EventKind {
    /// The `type` on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Chat => "chat",
            EventKind::UserJoined => "user_joined",
            EventKind::UserLeft => "user_left",
        }
    }

    /// A presence notice (kept in a ring of its own, see `history`).
    pub fn is_presence(self) -> bool {
        self != EventKind::Chat
    }

    /// The kind of an event written by [`write_event`], for events that come back through
    /// Redis (hostile bytes: anything else is `None`). The type follows the fixed-width id, so
    /// only the start of the JSON is looked at.
    pub fn of(json: &[u8]) -> Option<EventKind> {
        const AT: usize = "{\"id\":\"".len() + 36 + "\",\"type\":\"".len();
        let rest = json.get(AT..)?;
        [EventKind::Chat, EventKind::UserJoined, EventKind::UserLeft]
            .into_iter()
            .find(|k| {
                rest.strip_prefix(k.as_str().as_bytes())
                    .is_some_and(|t| t.first() == Some(&b'"'))
            })
    }
}

/// The two typing indicators (their `type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypingKind {
    /// `typing`: the member started typing.
    Typing,
    /// `typing_stopped`: the member sent a message or its typing indicator ran out.
    Stopped,
}

impl TypingKind {
    /// The `type` on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            TypingKind::Typing => "typing",
            TypingKind::Stopped => "typing_stopped",
        }
    }
}

/// `chat`, `user_joined` or `user_left`: the messages stored in history.
pub fn write_event(
    out: &mut Vec<u8>,
    kind: EventKind,
    id: MsgId,
    who: Who<'_>,
    message: &str,
    at: UnixMicros,
    room: RoomId,
) {
    let _ = write!(
        out,
        "{{\"id\":\"{id}\",\"type\":\"{}\",\"user\":",
        kind.as_str()
    );
    json_str(out, who.user);
    let _ = write!(out, ",\"user_id\":\"{}\",\"message\":", who.user_id);
    json_str(out, message);
    out.extend_from_slice(b",\"timestamp\":\"");
    write_iso8601(out, at);
    let _ = write!(out, "\",\"room_id\":\"{room}\"}}");
}

/// Whether an event that came back through Redis is a presence notice (`user_joined` or
/// `user_left`); see [`EventKind::of`].
pub fn is_presence(json: &[u8]) -> bool {
    EventKind::of(json).is_some_and(EventKind::is_presence)
}

/// The id of an event written by [`write_event`] (it comes first, fixed width); for events
/// that come back through Redis.
pub fn event_id(json: &[u8]) -> Option<MsgId> {
    const AT: usize = "{\"id\":\"".len();
    let id = json.get(AT..AT + 36)?;
    MsgId::parse(std::str::from_utf8(id).ok()?)
}

/// `typing` or `typing_stopped`.
pub fn write_typing(out: &mut Vec<u8>, kind: &str, who: Who<'_>, room: RoomId) {
    let _ = write!(out, "{{\"type\":\"{kind}\",\"user\":");
    json_str(out, who.user);
    let _ = write!(
        out,
        ",\"user_id\":\"{}\",\"room_id\":\"{room}\"}}",
        who.user_id
    );
}

/// `expired`: these history entries of the room just reached its `message_ttl`.
pub fn write_expired(out: &mut Vec<u8>, room: RoomId, ids: &[crate::ids::MsgId]) {
    let _ = write!(
        out,
        "{{\"type\":\"expired\",\"room_id\":\"{room}\",\"ids\":["
    );
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = write!(out, "\"{id}\"");
    }
    out.extend_from_slice(b"]}");
}

/// An `error` frame that keeps the connection open.
pub fn write_error(out: &mut Vec<u8>, code: &str, detail: &str) {
    let _ = write!(out, "{{\"type\":\"error\",\"code\":\"{code}\",\"detail\":");
    json_str(out, detail);
    out.push(b'}');
}

/// The sender's user id and the text of a `chat` event written by [`write_event`]; `None`
/// for any other event. (For the rare event Redis did not confirm: a full parse is fine.)
pub fn chat_sender(json: &[u8]) -> Option<(UserId, String)> {
    #[derive(Deserialize)]
    struct ChatEvent {
        #[serde(rename = "type")]
        kind: String,
        user_id: String,
        message: String,
    }
    let e: ChatEvent = serde_json::from_slice(json).ok()?;
    if e.kind != "chat" || e.user_id.len() != 8 {
        return None;
    }
    let uid = u32::from_str_radix(&e.user_id, 16).ok()?;
    Some((UserId(uid), e.message))
}

/// The `unconfirmed` error frame: the shared store (Redis) did not confirm the chat message
/// `id`, so the members of this node never got it (those of other nodes may have). Its id and
/// text come back so that a client can tell which message it was and offer to send it again.
pub fn write_unconfirmed(out: &mut Vec<u8>, id: MsgId, message: &str) {
    write_error(
        out,
        "unconfirmed",
        "Your message was not delivered here: the shared store (Redis) did not confirm it in \
         time. It may have reached members on other servers; send it again if it does not \
         appear.",
    );
    out.pop();
    let _ = write!(out, ",\"id\":\"{id}\",\"message\":");
    json_str(out, message);
    out.push(b'}');
}

/// The `welcome` frame: who is here and the recent messages (already-encoded JSON).
pub fn write_welcome<'a>(
    out: &mut Vec<u8>,
    room: RoomId,
    me: Who<'_>,
    users: impl Iterator<Item = Who<'a>>,
    messages: impl Iterator<Item = &'a [u8]>,
    truncated: bool,
) {
    let _ = write!(
        out,
        "{{\"type\":\"welcome\",\"room_id\":\"{room}\",\"user\":"
    );
    json_str(out, me.user);
    let _ = write!(out, ",\"user_id\":\"{}\",\"users\":[", me.user_id);
    for (i, u) in users.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"user\":");
        json_str(out, u.user);
        let _ = write!(out, ",\"user_id\":\"{}\"}}", u.user_id);
    }
    out.extend_from_slice(b"],\"messages\":[");
    write_joined(out, messages);
    out.push(b']');
    if truncated {
        out.extend_from_slice(b",\"truncated\":true");
    }
    out.push(b'}');
}

/// Writes already-encoded JSON values separated by commas.
pub fn write_joined<'a>(out: &mut Vec<u8>, items: impl Iterator<Item = &'a [u8]>) {
    for (i, m) in items.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn parses_client_messages() {
        assert_eq!(
            parse_client(r#"{"type":"chat","message":"hi"}"#),
            Ok(ClientMsg::Chat("hi".into()))
        );
        assert_eq!(
            parse_client(r#"{"message":"a\"b","type":"chat","extra":[1]}"#),
            Ok(ClientMsg::Chat("a\"b".into()))
        );
        assert_eq!(parse_client(r#"{"type":"typing"}"#), Ok(ClientMsg::Typing));
        assert_eq!(parse_client("nope").unwrap_err().code(), "invalid_json");
        assert_eq!(parse_client("").unwrap_err().code(), "invalid_json");
        assert_eq!(parse_client("[1,2]").unwrap_err().code(), "invalid_json");
        assert_eq!(parse_client("42").unwrap_err().code(), "invalid_json");
        assert_eq!(
            parse_client(r#"["chat","hello"]"#).unwrap_err().code(),
            "invalid_json"
        );
        assert_eq!(parse_client("[]").unwrap_err().code(), "invalid_json");
        assert_eq!(
            parse_client(r#"{"type":"chat","message":5}"#)
                .unwrap_err()
                .code(),
            "invalid_json"
        );
        assert_eq!(
            parse_client(r#"{"type":"chat"}"#).unwrap_err().code(),
            "invalid_json"
        );
        assert_eq!(
            parse_client(r#"{"type":"dance"}"#).unwrap_err().code(),
            "unknown_type"
        );
        assert_eq!(
            parse_client(r#"{"message":"x"}"#).unwrap_err().code(),
            "unknown_type"
        );
        let long = format!(r#"{{"type":"{}"}}"#, "x".repeat(1000));
        assert!(parse_client(&long).unwrap_err().detail().len() < 200);
    }

    #[test]
    fn json_str_len_is_what_json_str_writes() {
        let mut every_ascii: String = (0u8..128).map(char::from).collect();
        every_ascii.push_str("é\u{1F600}\u{202E}");
        for s in [
            "",
            "hello",
            "a\"b\\c",
            "\u{1}\u{1f}\n\r\t\u{8}\u{c}\u{7f}",
            &every_ascii,
        ] {
            let mut out = Vec::new();
            json_str(&mut out, s);
            assert_eq!(json_str_len(s), out.len(), "{s:?}");
        }
        assert_eq!(json_str_len(&"\u{1}".repeat(4096)), 4096 * 6 + 2);
    }

    #[test]
    fn frames_have_correct_headers_for_every_length_class() {
        let mut fb = FrameBuf::default();
        for len in [0usize, 1, 125, 126, 65_535, 65_536, 200_000] {
            fb.start().extend(std::iter::repeat_n(b'a', len));
            let f = fb.finish_text();
            assert_eq!(f[0], 0x81);
            assert_eq!(frame_payload(&f).len(), len);
            let mut cur = std::io::Cursor::new(&f[..]);
            let (h, plen) = FrameHeader::parse(&mut cur).unwrap().unwrap();
            assert!(h.is_final && h.mask.is_none());
            assert_eq!(plen as usize, len);
        }
    }

    #[test]
    fn presence_is_recognised_from_the_written_event() {
        let who = Who {
            user: "user_joined",
            user_id: UserId(7),
        };
        for (kind, presence) in [
            (EventKind::UserJoined, true),
            (EventKind::UserLeft, true),
            (EventKind::Chat, false),
        ] {
            let mut out = Vec::new();
            let id = MsgId(u128::MAX - 3);
            write_event(
                &mut out,
                kind,
                id,
                who,
                "user_left",
                UnixMicros(0),
                RoomId(1),
            );
            assert_eq!(EventKind::of(&out), Some(kind));
            assert_eq!(is_presence(&out), presence, "{kind:?}");
            // A type that only starts like a known one is no kind at all.
            let at = out.iter().position(|&b| b == b't').unwrap() + 7 + kind.as_str().len();
            out.insert(at, b'x');
            assert_eq!(EventKind::of(&out), None);
            assert!(!is_presence(&out));
        }
        assert!(!is_presence(b""));
        assert_eq!(EventKind::of(b""), None);
        let mut out = Vec::new();
        let id = MsgId(0x0199_0000_0000_7000_8000_0000_0000_0001);
        write_event(
            &mut out,
            EventKind::Chat,
            id,
            who,
            "x",
            UnixMicros(0),
            RoomId(1),
        );
        assert_eq!(event_id(&out), Some(id));
        assert_eq!(event_id(b"{\"id\":\"nope\"}"), None);
        assert_eq!(event_id(b""), None);
        assert!(!is_presence(br#"{"type":"user_joined"}"#));
    }

    #[test]
    fn events_are_valid_json_with_escaping() {
        let mut out = Vec::new();
        let who = Who {
            user: "al\"ice<b>",
            user_id: UserId(0x3f9a1c2b),
        };
        write_event(
            &mut out,
            EventKind::Chat,
            MsgId(1),
            who,
            "line\nbreak \u{1F600}",
            UnixMicros(1_755_611_100_123_456),
            RoomId(0xa1b2c3d4e5),
        );
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["type"], "chat");
        assert_eq!(v["user"], "al\"ice<b>");
        assert_eq!(v["user_id"], "3f9a1c2b");
        assert_eq!(v["message"], "line\nbreak \u{1F600}");
        assert_eq!(v["timestamp"], "2025-08-19T13:45:00.123456Z");
        assert_eq!(v["room_id"], "a1b2c3d4e5");
        assert_eq!(v["id"], "00000000-0000-0000-0000-000000000001");

        out.clear();
        let users = [
            who,
            Who {
                user: "bob",
                user_id: UserId(1),
            },
        ];
        let msgs: [&[u8]; 2] = [br#"{"a":1}"#, br#"{"b":2}"#];
        write_welcome(
            &mut out,
            RoomId(1),
            who,
            users.iter().copied(),
            msgs.iter().copied(),
            true,
        );
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["type"], "welcome");
        assert_eq!(v["users"][1]["user_id"], "00000001");
        assert_eq!(v["messages"][1]["b"], 2);
        assert_eq!(v["truncated"], true);

        out.clear();
        write_error(&mut out, "rate_limited", "Slow \"down\"");
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["detail"], "Slow \"down\"");
    }
}
