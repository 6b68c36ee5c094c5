//! WebSocket: the upgrade handshake, client frame decoding, and small control frames.
//!
//! Frames are decoded straight from whatever buffer holds the bytes (usually the event
//! loop's shared read buffer): `tungstenite`'s `FrameHeader::parse` reads the header, the
//! payload is unmasked in place, and only a fragmented message's bytes are kept per
//! connection. Every RFC 6455 rule a server must check ends in a close code, never a panic.

use std::borrow::Cow;
use std::io::Cursor;

use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};

use crate::deflate::{InflateError, Inflater, Mode};

/// Per-connection decoder state: empty (no allocation) unless a fragmented message is open,
/// and the permessage-deflate mode agreed at the upgrade (one byte: no compression state).
#[derive(Debug, Default)]
pub struct WsState {
    frag: Option<Box<Frag>>,
    /// The permessage-deflate mode agreed at the upgrade (`Off` when not negotiated).
    pub deflate: Mode,
}

#[derive(Debug)]
struct Frag {
    text: bool,
    /// RSV1 was set on its first frame: `data` is compressed, inflated when it ends.
    compressed: bool,
    data: Vec<u8>,
    /// How much of `data` is known to be valid UTF-8 (text messages only).
    valid_up_to: usize,
}

/// One decoded message or control frame.
#[derive(Debug, PartialEq, Eq)]
pub enum WsEvent<'a> {
    /// A complete text message, valid UTF-8 (borrowed from the buffer unless it was reassembled or
    /// inflated).
    Text(Cow<'a, str>),
    /// A complete binary message.
    Binary(Cow<'a, [u8]>),
    /// A ping and its payload (at most 125 bytes), to be answered with a pong carrying it.
    Ping(&'a [u8]),
    /// A pong (its payload is ignored).
    Pong,
    /// The peer's close frame (its code, if any); answer it and close.
    Close(Option<u16>),
}

/// A protocol violation: close with this code and reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseWith {
    /// The close code to send (RFC 6455 §7.4, e.g. 1002 protocol error, 1009 too big).
    pub code: u16,
    /// The close reason to send (short, fixed text: never client bytes).
    pub reason: &'static str,
}

/// The result of looking at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// Not a whole frame yet: keep the bytes and wait for more.
    Need,
    /// A frame (a fragment) was absorbed; `usize` bytes consumed, no event yet.
    Consumed(usize),
    /// An event, and the bytes it consumed.
    Event(WsEvent<'a>, usize),
}

const fn close(code: u16, reason: &'static str) -> CloseWith {
    CloseWith { code, reason }
}

impl WsState {
    /// A decoder with nothing buffered and the agreed permessage-deflate `deflate` mode.
    pub fn new(deflate: Mode) -> WsState {
        WsState {
            frag: None,
            deflate,
        }
    }

    /// Decodes the first frame in `buf` (unmasking it in place). A compressed message is
    /// inflated into `inflater` (loop-wide), never past `max_message` bytes.
    pub fn decode<'a>(
        &mut self,
        buf: &'a mut [u8],
        max_message: usize,
        inflater: &'a mut Inflater,
    ) -> Result<Step<'a>, CloseWith> {
        let mut cur = Cursor::new(&*buf);
        let (header, len) = match FrameHeader::parse(&mut cur) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(Step::Need),
            Err(_) => return Err(close(1002, "reserved opcode")),
        };
        let start = cur.position() as usize;
        if header.rsv2 || header.rsv3 || (header.rsv1 && !self.deflate.inflates()) {
            return Err(close(1002, "reserved bits set without an extension"));
        }
        let Some(mask) = header.mask else {
            return Err(close(1002, "client frames must be masked"));
        };
        let is_control = matches!(header.opcode, OpCode::Control(_));
        if header.rsv1 && (is_control || header.opcode == OpCode::Data(Data::Continue)) {
            // RFC 7692 section 6: RSV1 marks a message's first frame; control frames are
            // never compressed.
            return Err(close(1002, "RSV1 set on a control or continuation frame"));
        }
        if is_control && (len > 125 || !header.is_final) {
            return Err(close(
                1002,
                "control frames must be final and at most 125 bytes",
            ));
        }
        let so_far = self.frag.as_ref().map_or(0, |f| f.data.len()) as u64;
        if !is_control && len.saturating_add(so_far) > max_message as u64 {
            return Err(close(1009, "message too big"));
        }
        let len = len as usize;
        if buf.len() - start < len {
            return Ok(Step::Need);
        }
        let used = start + len;
        let payload = &mut buf[start..used];
        unmask(payload, mask);
        let payload = &*payload;

        match header.opcode {
            OpCode::Control(Control::Ping) => Ok(Step::Event(WsEvent::Ping(payload), used)),
            OpCode::Control(Control::Pong) => Ok(Step::Event(WsEvent::Pong, used)),
            OpCode::Control(Control::Close) => {
                parse_close(payload).map(|c| Step::Event(WsEvent::Close(c), used))
            }
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                Err(close(1002, "reserved opcode"))
            }
            OpCode::Data(Data::Continue) => {
                let Some(frag) = self.frag.as_mut() else {
                    return Err(close(
                        1002,
                        "continuation frame without a message to continue",
                    ));
                };
                frag.data.extend_from_slice(payload);
                if frag.text && !frag.compressed {
                    frag.check_utf8(header.is_final)?;
                }
                if !header.is_final {
                    return Ok(Step::Consumed(used));
                }
                let frag = self.frag.take().expect("checked above");
                if frag.compressed {
                    let data = inflate(inflater, &[&frag.data], max_message)?;
                    return Ok(Step::Event(message(frag.text, data)?, used));
                }
                let event = if frag.text {
                    let text = String::from_utf8(frag.data)
                        .map_err(|_| close(1007, "invalid UTF-8 in text"))?;
                    WsEvent::Text(Cow::Owned(text))
                } else {
                    WsEvent::Binary(Cow::Owned(frag.data))
                };
                Ok(Step::Event(event, used))
            }
            OpCode::Data(kind) => {
                if self.frag.is_some() {
                    return Err(close(
                        1002,
                        "new message before the previous one was finished",
                    ));
                }
                let text = kind == Data::Text;
                if !header.is_final {
                    let mut frag = Box::new(Frag {
                        text,
                        compressed: header.rsv1,
                        data: payload.to_vec(),
                        valid_up_to: 0,
                    });
                    if text && !header.rsv1 {
                        frag.check_utf8(false)?;
                    }
                    self.frag = Some(frag);
                    return Ok(Step::Consumed(used));
                }
                if header.rsv1 {
                    let data = inflate(inflater, &[payload], max_message)?;
                    return Ok(Step::Event(message(text, data)?, used));
                }
                if text {
                    let s = std::str::from_utf8(payload)
                        .map_err(|_| close(1007, "invalid UTF-8 in text"))?;
                    Ok(Step::Event(WsEvent::Text(Cow::Borrowed(s)), used))
                } else {
                    Ok(Step::Event(WsEvent::Binary(Cow::Borrowed(payload)), used))
                }
            }
        }
    }

    /// Bytes held for an unfinished fragmented message.
    pub fn buffered(&self) -> usize {
        self.frag.as_ref().map_or(0, |f| f.data.capacity())
    }
}

fn inflate<'a>(
    inflater: &'a mut Inflater,
    parts: &[&[u8]],
    max: usize,
) -> Result<&'a [u8], CloseWith> {
    inflater.inflate(parts, max).map_err(|e| match e {
        InflateError::TooBig => close(1009, "message too big"),
        InflateError::Invalid => close(1007, "invalid compressed data"),
    })
}

/// A whole inflated message as an event (text must be valid UTF-8).
fn message(text: bool, data: &[u8]) -> Result<WsEvent<'_>, CloseWith> {
    if text {
        let s = std::str::from_utf8(data).map_err(|_| close(1007, "invalid UTF-8 in text"))?;
        Ok(WsEvent::Text(Cow::Borrowed(s)))
    } else {
        Ok(WsEvent::Binary(Cow::Borrowed(data)))
    }
}

impl Frag {
    fn check_utf8(&mut self, fin: bool) -> Result<(), CloseWith> {
        match std::str::from_utf8(&self.data[self.valid_up_to..]) {
            Ok(_) => self.valid_up_to = self.data.len(),
            Err(e) if e.error_len().is_none() && !fin => self.valid_up_to += e.valid_up_to(),
            Err(_) => return Err(close(1007, "invalid UTF-8 in text")),
        }
        Ok(())
    }
}

fn parse_close(payload: &[u8]) -> Result<Option<u16>, CloseWith> {
    match payload {
        [] => Ok(None),
        [_] => Err(close(1002, "close frame with a one-byte payload")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !CloseCode::from(code).is_allowed() {
                return Err(close(1002, "invalid close code"));
            }
            std::str::from_utf8(reason)
                .map_err(|_| close(1007, "invalid UTF-8 in close reason"))?;
            Ok(Some(code))
        }
    }
}

/// XORs the client's mask out of a payload, eight bytes at a time.
pub fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let m8 = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = payload.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes(c.try_into().expect("chunk of 8")) ^ m8;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// A close frame with a code and reason (reason cut to fit 125 bytes).
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut r = reason.as_bytes();
    if r.len() > 123 {
        r = &r[..123];
    }
    let mut f = Vec::with_capacity(4 + r.len());
    f.push(0x88);
    f.push((2 + r.len()) as u8);
    f.extend_from_slice(&code.to_be_bytes());
    f.extend_from_slice(r);
    f
}

/// A pong answering a ping's payload (at most 125 bytes, checked by `decode`).
pub fn pong_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(2 + payload.len());
    f.push(0x8a);
    f.push(payload.len() as u8);
    f.extend_from_slice(payload);
    f
}

/// An empty server ping.
pub const PING_FRAME: &[u8] = &[0x89, 0x00];

/// A data frame with the same payload (for the conformance echo endpoint).
pub fn data_frame(text: bool, payload: &[u8]) -> Vec<u8> {
    let opcode = OpCode::Data(if text { Data::Text } else { Data::Binary });
    let header = FrameHeader {
        opcode,
        ..FrameHeader::default()
    };
    let mut f = Vec::with_capacity(header.len(payload.len() as u64) + payload.len());
    header
        .format(payload.len() as u64, &mut f)
        .expect("writing to a Vec cannot fail");
    f.extend_from_slice(payload);
    f
}

/// `Sec-WebSocket-Accept` for a client's key.
pub fn accept_key(key: &[u8]) -> String {
    tungstenite::handshake::derive_accept_key(key)
}

/// A key is the base64 of 16 bytes: 22 characters and `==`.
pub fn valid_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
}

/// The integration tests' client-side framing (`client_frame`), shared with them.
#[cfg(test)]
#[path = "../tests/common/frame.rs"]
mod client_frame;

#[cfg(test)]
mod tests {
    use super::client_frame::client_frame;
    use super::*;

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        client_frame(first, payload, Some([1, 2, 3, 4]))
    }

    fn one(st: &mut WsState, bytes: &[u8]) -> Result<Step<'static>, CloseWith> {
        let buf: &'static mut [u8] = Box::leak(bytes.to_vec().into_boxed_slice());
        let inf: &'static mut Inflater = Box::leak(Box::default());
        st.decode(buf, 1 << 16, inf)
    }

    #[test]
    fn decodes_masked_text_and_reports_length() {
        let mut st = WsState::default();
        let f = masked(0x81, b"hello world, longer than eight");
        assert_eq!(
            one(&mut st, &f),
            Ok(Step::Event(
                WsEvent::Text("hello world, longer than eight".into()),
                f.len()
            ))
        );
        for cut in 0..f.len() {
            assert_eq!(one(&mut st, &f[..cut]), Ok(Step::Need), "cut at {cut}");
        }
    }

    #[test]
    fn reassembles_fragments_with_control_frames_between() {
        let mut st = WsState::default();
        assert!(matches!(
            one(&mut st, &masked(0x01, "hé".as_bytes()[..2].as_ref())),
            Ok(Step::Consumed(_))
        ));
        assert!(matches!(
            one(&mut st, &masked(0x89, b"p")),
            Ok(Step::Event(WsEvent::Ping(b"p"), _))
        ));
        let tail = &"hé".as_bytes()[2..];
        assert_eq!(
            one(&mut st, &masked(0x80, tail))
                .map(|s| matches!(s, Step::Event(WsEvent::Text(ref t), _) if t == "hé")),
            Ok(true)
        );
        assert_eq!(st.buffered(), 0);
    }

    #[test]
    fn protocol_violations_close_with_the_right_code() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (vec![0x81, 0x02, b'h', b'i'], 1002),      // unmasked
            (masked(0xc1, b"x"), 1002),                // rsv1
            (masked(0x83, b"x"), 1002),                // reserved data opcode
            (masked(0x8b, b"x"), 1002),                // reserved control opcode
            (masked(0x09, b"x"), 1002),                // fragmented ping
            (masked(0x89, &[0u8; 126]), 1002),         // long ping
            (masked(0x80, b"x"), 1002),                // continuation without start
            (masked(0x81, &[0xff, 0xfe]), 1007),       // bad UTF-8
            (masked(0x88, &[0x03]), 1002),             // one-byte close
            (masked(0x88, &[0x03, 0xe7]), 1002),       // close code 999
            (masked(0x88, &[0x03, 0xe8, 0xff]), 1007), // bad reason
            (masked(0x81, &vec![b'a'; 70_000]), 1009), // too big
        ];
        for (f, code) in cases {
            let mut st = WsState::default();
            assert_eq!(
                one(&mut st, &f).map_err(|c| c.code),
                Err(code),
                "{:02x?}",
                &f[..2]
            );
        }
        // Too big is known from the header alone, before the payload arrives.
        let mut st = WsState::default();
        let f = masked(0x82, &vec![0u8; 70_000]);
        assert_eq!(one(&mut st, &f[..14]).map_err(|c| c.code), Err(1009));
        // A new message inside a fragmented one.
        let mut st = WsState::default();
        assert!(one(&mut st, &masked(0x01, b"a")).is_ok());
        assert_eq!(
            one(&mut st, &masked(0x81, b"b")).map_err(|c| c.code),
            Err(1002)
        );
        // Invalid UTF-8 in a fragment fails fast, before the final frame.
        let mut st = WsState::default();
        assert_eq!(
            one(&mut st, &masked(0x01, &[0xce, 0xba, 0xff])).map_err(|c| c.code),
            Err(1007)
        );
    }

    #[test]
    fn compressed_messages_per_rfc_7692() {
        let mut d = crate::deflate::Deflater::new(0);
        let text = "hello hello hello hello hello";
        let c = d.compress(text.as_bytes()).unwrap().to_vec();
        let mut st = WsState::new(Mode::Both);
        assert_eq!(
            one(&mut st, &masked(0xc1, &c))
                .map(|s| matches!(s, Step::Event(WsEvent::Text(ref t), _) if t == text)),
            Ok(true)
        );
        // Fragmented: RSV1 on the first frame only, control frames between.
        let (a, b) = c.split_at(5);
        assert!(matches!(
            one(&mut st, &masked(0x41, a)),
            Ok(Step::Consumed(_))
        ));
        assert!(matches!(
            one(&mut st, &masked(0x89, b"p")),
            Ok(Step::Event(WsEvent::Ping(_), _))
        ));
        assert_eq!(
            one(&mut st, &masked(0x80, b))
                .map(|s| matches!(s, Step::Event(WsEvent::Text(ref t), _) if t == text)),
            Ok(true)
        );
        // A message of plain frames still works.
        assert!(matches!(
            one(&mut st, &masked(0x81, b"x")),
            Ok(Step::Event(WsEvent::Text(_), _))
        ));
        let code = |mode, frames: &[Vec<u8>]| {
            let mut st = WsState::new(mode);
            frames
                .iter()
                .map(|f| one(&mut st, f).map(|_| ()).map_err(|c| c.code))
                .last()
                .unwrap()
        };
        assert_eq!(
            code(Mode::Off, &[masked(0xc1, &c)]),
            Err(1002),
            "not negotiated"
        );
        assert_eq!(
            code(Mode::Both, &[masked(0xc9, b"")]),
            Err(1002),
            "compressed ping"
        );
        assert_eq!(
            code(Mode::Both, &[masked(0x41, a), masked(0xc0, b)]),
            Err(1002),
            "RSV1 on a continuation"
        );
        assert_eq!(code(Mode::Both, &[masked(0xa1, &c)]), Err(1002), "RSV2");
        assert_eq!(
            code(Mode::Both, &[masked(0xc1, b"\xff\xff")]),
            Err(1007),
            "not deflate"
        );
        let zeros = d.compress(&[0u8; 200_000]).unwrap().to_vec();
        assert_eq!(
            code(Mode::Both, &[masked(0xc2, &zeros)]),
            Err(1009),
            "inflates too big"
        );
        let bad = d.compress(&[0xff; 100]).unwrap().to_vec();
        assert_eq!(
            code(Mode::InflateOnly, &[masked(0xc1, &bad)]),
            Err(1007),
            "bad UTF-8"
        );
    }

    #[test]
    fn close_and_control_frames() {
        let mut st = WsState::default();
        assert!(matches!(
            one(&mut st, &masked(0x88, &[0x03, 0xe8, b'o', b'k'])),
            Ok(Step::Event(WsEvent::Close(Some(1000)), _))
        ));
        assert!(matches!(
            one(&mut st, &masked(0x88, &[])),
            Ok(Step::Event(WsEvent::Close(None), _))
        ));
        assert_eq!(
            close_frame(1013, "slow"),
            vec![0x88, 6, 0x03, 0xf5, b's', b'l', b'o', b'w']
        );
        assert_eq!(close_frame(1000, &"x".repeat(300)).len(), 127);
        assert_eq!(pong_frame(b"ab"), vec![0x8a, 2, b'a', b'b']);
        assert_eq!(&data_frame(false, &[1, 2])[..], &[0x82, 2, 1, 2]);
    }

    #[test]
    fn unmask_matches_bytewise_xor_for_every_length() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len as u8).collect();
            let mut fast = data.clone();
            unmask(&mut fast, [9, 8, 7, 6]);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ [9, 8, 7, 6][i % 4])
                .collect();
            assert_eq!(fast, slow);
        }
    }

    #[test]
    fn handshake_key() {
        // RFC 6455 section 1.3.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert!(valid_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!valid_key(b"short"));
        assert!(!valid_key(b"dGhlIHNhbXBsZSBub25jZQ!="));
    }
}
