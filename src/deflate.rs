//! permessage-deflate (RFC 7692): negotiation, inflating client messages, compressing ours.
//!
//! No compression state is held per connection. The server always answers with
//! `server_no_context_takeover` and `client_no_context_takeover`, so every message is a
//! self-contained deflate stream: one loop-wide [`Inflater`] and one loop-wide [`Deflater`]
//! serve every connection, and a connection only remembers which [`Mode`] it agreed to.
//!
//! Inflating writes into the inflater's reused buffer and stops as soon as the message would
//! pass `--max-ws-message`, so a small frame that inflates to gigabytes costs at most that
//! limit in memory and time. Compressing is done once per shared frame (see
//! [`Deflater::shared`]): every member that negotiated deflate gets the same bytes.

use std::rc::Rc;

use miniz_oxide::deflate::core::{
    CompressorOxide, TDEFLFlush, TDEFLStatus, create_comp_flags_from_zip_params,
};
use miniz_oxide::inflate::TINFLStatus;
use miniz_oxide::inflate::core::{DecompressorOxide, decompress, inflate_flags};

use crate::protocol::Frame;

/// What one connection agreed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// No extension: RSV1 is a protocol error.
    #[default]
    Off,
    /// Both ways: the client may compress, and the server compresses frames at or above
    /// `--deflate-min-bytes`.
    Both,
    /// The client may compress; the server sends every frame plain, because the client
    /// asked for a `server_max_window_bits` below 15 (sending uncompressed honours any
    /// window, and keeps one compressed copy of a broadcast for everyone else).
    InflateOnly,
}

impl Mode {
    /// RSV1 may be set on the first frame of a data message.
    pub fn inflates(self) -> bool {
        self != Mode::Off
    }

    /// Frames to this connection may be compressed.
    pub fn compresses(self) -> bool {
        self == Mode::Both
    }
}

/// An acceptable offer: the mode, and the `server_max_window_bits` to echo (RFC 7692
/// 7.1.2.1: a server that accepts an offer with it must answer with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// What this connection does with compression.
    pub mode: Mode,
    /// The client offered `server_max_window_bits=N`: `Some(N)`, echoed in the answer.
    pub server_max_window_bits: Option<u8>,
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` response header line, CRLF included.
    pub fn response_header(&self) -> String {
        let mut h = String::from(
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        );
        if let Some(b) = self.server_max_window_bits {
            h.push_str("; server_max_window_bits=");
            h.push_str(&b.to_string());
        }
        h.push_str("\r\n");
        h
    }
}

/// Reads one `Sec-WebSocket-Extensions` header value: the first `permessage-deflate` offer
/// in it that can be honoured, if any. Offers with unknown, repeated or invalid parameters
/// are declined (RFC 7692 section 7.1); other extensions are ignored.
pub fn negotiate(value: &[u8]) -> Option<Agreed> {
    split_quoted(value, b',').find_map(offer)
}

fn offer(text: &[u8]) -> Option<Agreed> {
    let mut parts = split_quoted(text, b';');
    let name = parts.next()?.trim_ascii();
    if !name.eq_ignore_ascii_case(b"permessage-deflate") {
        return None;
    }
    let (mut snct, mut cnct, mut smwb, mut cmwb) = (false, false, None, false);
    for p in parts {
        let (k, v) = match p.iter().position(|b| *b == b'=') {
            Some(i) => (p[..i].trim_ascii(), Some(unquote(p[i + 1..].trim_ascii())?)),
            None => (p.trim_ascii(), None),
        };
        let seen = match k.to_ascii_lowercase().as_slice() {
            b"server_no_context_takeover" if v.is_none() => std::mem::replace(&mut snct, true),
            b"client_no_context_takeover" if v.is_none() => std::mem::replace(&mut cnct, true),
            b"server_max_window_bits" => {
                let bits = window_bits(v?)?;
                smwb.replace(bits).is_some()
            }
            b"client_max_window_bits" => {
                if let Some(v) = v {
                    window_bits(v)?;
                }
                std::mem::replace(&mut cmwb, true)
            }
            _ => return None, // unknown parameter, or a value where none belongs
        };
        if seen {
            return None; // a parameter given twice
        }
    }
    let mode = match smwb {
        Some(b) if b < 15 => Mode::InflateOnly,
        _ => Mode::Both,
    };
    Some(Agreed {
        mode,
        server_max_window_bits: smwb,
    })
}

/// `8` to `15`, digits only, no leading zero.
fn window_bits(v: &[u8]) -> Option<u8> {
    match v {
        [d @ b'8'..=b'9'] => Some(d - b'0'),
        [b'1', d @ b'0'..=b'5'] => Some(10 + d - b'0'),
        _ => None,
    }
}

/// A token, or a quoted string holding a token (no escapes: a backslash declines the offer).
fn unquote(v: &[u8]) -> Option<&[u8]> {
    match v {
        [b'"', inner @ .., b'"'] if !inner.contains(&b'\\') && !inner.contains(&b'"') => {
            Some(inner)
        }
        _ if v.contains(&b'"') || v.contains(&b'\\') => None,
        _ => Some(v),
    }
}

/// Splits on `sep` outside double quotes.
fn split_quoted(s: &[u8], sep: u8) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        let s = rest?;
        let mut quoted = false;
        for (i, b) in s.iter().enumerate() {
            match *b {
                b'"' => quoted = !quoted,
                b if b == sep && !quoted => {
                    rest = Some(&s[i + 1..]);
                    return Some(&s[..i]);
                }
                _ => {}
            }
        }
        rest = None;
        Some(s)
    })
}

/// The four bytes a sync flush ends with; the sender removes them, the receiver adds them.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Why a compressed message could not be inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates past the limit (close 1009).
    TooBig,
    /// Not valid deflate data (close 1007).
    Invalid,
}

/// The loop-wide inflater: one decompressor and one output buffer for every connection.
/// Empty until the first compressed message (`Default` allocates nothing).
#[derive(Default)]
pub struct Inflater {
    state: Option<Box<DecompressorOxide>>,
    out: Vec<u8>,
    /// Messages inflated so far (a metric).
    pub messages: u64,
}

/// Output buffer the inflater keeps between messages; a larger one is given back.
const KEEP_OUT: usize = 256 * 1024;

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater")
            .field("held", &self.out.capacity())
            .field("messages", &self.messages)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Deflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deflater")
            .field("min_bytes", &self.min_bytes)
            .field("compressions", &self.compressions)
            .finish_non_exhaustive()
    }
}

impl Inflater {
    /// Inflates one message whose compressed bytes are `parts` in order, into the shared
    /// buffer; at most `max` bytes are ever written (or allocated): past that, `TooBig`.
    pub fn inflate(&mut self, parts: &[&[u8]], max: usize) -> Result<&[u8], InflateError> {
        let st = self
            .state
            .get_or_insert_with(|| Box::new(DecompressorOxide::new()));
        st.init();
        let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF
            | inflate_flags::TINFL_FLAG_HAS_MORE_INPUT;
        let cap = max.saturating_add(1); // one byte more than allowed tells "too big"
        let mut pos = 0;
        let tail: &[u8] = &TAIL;
        'parts: for mut input in parts.iter().copied().chain([tail]) {
            loop {
                if pos == self.out.len() {
                    if self.out.len() >= cap {
                        return Err(InflateError::TooBig);
                    }
                    let grow = self.out.len().max(4096).min(cap - self.out.len());
                    self.out.reserve_exact(grow); // never more than `cap` in all
                    self.out.resize(self.out.len() + grow, 0);
                }
                let (status, used, wrote) = decompress(st, input, &mut self.out, pos, flags);
                pos += wrote;
                input = input.get(used..).unwrap_or_default();
                match status {
                    TINFLStatus::Done => break 'parts,
                    TINFLStatus::NeedsMoreInput if input.is_empty() => continue 'parts,
                    TINFLStatus::HasMoreOutput | TINFLStatus::NeedsMoreInput => {
                        if pos < self.out.len() && wrote == 0 && used == 0 {
                            return Err(InflateError::Invalid); // no progress: never loop
                        }
                    }
                    _ => return Err(InflateError::Invalid),
                }
            }
        }
        if pos > max {
            return Err(InflateError::TooBig);
        }
        self.messages += 1;
        Ok(&self.out[..pos])
    }

    /// Gives back a buffer a large message made grow.
    pub fn trim(&mut self) {
        if self.out.capacity() > KEEP_OUT {
            self.out = Vec::new();
        }
    }

    /// Bytes held (for tests and gauges).
    pub fn held(&self) -> usize {
        self.out.capacity()
    }
}

/// The loop-wide compressor, and the compressed twin of the last shared frame asked for.
pub struct Deflater {
    comp: Option<Box<CompressorOxide>>,
    out: Vec<u8>,
    /// Frames whose payload is smaller than this are never compressed.
    pub min_bytes: usize,
    /// The plain frame last compressed (held so that its address cannot be reused while
    /// cached) and what to send instead to a connection that compresses.
    last: Option<(Frame, Frame)>,
    /// Messages compressed so far (a metric: once per broadcast, whatever the audience).
    pub compressions: u64,
}

/// miniz level 1: its fastest mode. Chat JSON compresses about as well at level 6 (see the
/// commit that chose it), while costing several times the CPU.
const LEVEL: i32 = 1;

impl Deflater {
    /// A compressor (allocated on first use) for frames of at least `min_bytes` payload bytes.
    pub fn new(min_bytes: usize) -> Deflater {
        Deflater {
            comp: None,
            out: Vec::new(),
            min_bytes,
            last: None,
            compressions: 0,
        }
    }

    /// Compresses one whole message (raw deflate, sync flush, its 4-byte tail removed).
    /// `None` if the result would not be smaller.
    pub fn compress(&mut self, payload: &[u8]) -> Option<&[u8]> {
        let comp = self.comp.get_or_insert_with(|| {
            Box::new(CompressorOxide::new(create_comp_flags_from_zip_params(
                LEVEL, -15, 0,
            )))
        });
        // No reset per message (it re-initialises some 300 KB of tables): each message ends
        // with a full flush instead, which byte-aligns, ends in 00 00 ff ff like a sync flush
        // and forgets the window, so the next message starts from nothing.
        self.compressions += 1;
        self.out.clear();
        self.out.resize(payload.len() + payload.len() / 8 + 64, 0);
        let (mut input, mut pos) = (payload, 0);
        loop {
            let (status, used, wrote) = miniz_oxide::deflate::core::compress(
                comp,
                input,
                &mut self.out[pos..],
                TDEFLFlush::Full,
            );
            pos += wrote;
            input = input.get(used..).unwrap_or_default();
            if status != TDEFLStatus::Okay {
                comp.reset(); // never seen: start the next message from a clean state
                return None;
            }
            if input.is_empty() && pos < self.out.len() {
                break;
            }
            let more = self.out.len();
            self.out.resize(more * 2, 0);
        }
        let body = self.out[..pos].strip_suffix(&TAIL)?;
        if body.len() >= payload.len() {
            return None;
        }
        Some(&self.out[..body.len()])
    }

    /// A whole frame with this opcode byte's data frame, compressed (RSV1 set) if the payload
    /// is at or above `min_bytes` and gets smaller; else `None`.
    pub fn frame(&mut self, first_byte: u8, payload: &[u8]) -> Option<Vec<u8>> {
        if payload.len() < self.min_bytes {
            return None;
        }
        let body = self.compress(payload)?;
        let mut f = Vec::with_capacity(body.len() + 10);
        f.push(first_byte | 0x40);
        push_len(&mut f, body.len());
        f.extend_from_slice(body);
        Some(f)
    }

    /// What to send a connection that compresses instead of this shared frame: the same
    /// compressed frame for every such recipient of it (made the first time one needs it),
    /// or the plain frame itself when it is small or does not shrink.
    pub fn shared(&mut self, plain: &Frame) -> Frame {
        if let Some((p, c)) = &self.last
            && Rc::ptr_eq(p, plain)
        {
            return c.clone();
        }
        let payload = crate::protocol::frame_payload(plain);
        let first = plain.first().copied().unwrap_or(0x81);
        let made: Frame = match self.frame(first, payload) {
            Some(f) => Rc::from(f),
            None => plain.clone(),
        };
        self.last = Some((plain.clone(), made.clone()));
        made
    }

    /// Forgets the cached frame (end of a round of deliveries) and returns memory a large
    /// message made the buffer grow by.
    pub fn end_round(&mut self) {
        self.last = None;
        if self.out.capacity() > KEEP_OUT {
            self.out = Vec::new();
        }
    }
}

/// A server frame's payload length field (after the first byte; no mask).
fn push_len(f: &mut Vec<u8>, n: usize) {
    if n < 126 {
        f.push(n as u8);
    } else if n < 65_536 {
        f.push(126);
        f.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        f.push(127);
        f.extend_from_slice(&(n as u64).to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agreed(mode: Mode, bits: Option<u8>) -> Option<Agreed> {
        Some(Agreed {
            mode,
            server_max_window_bits: bits,
        })
    }

    #[test]
    fn offers_are_read_per_rfc_7692() {
        let both = agreed(Mode::Both, None);
        assert_eq!(negotiate(b"permessage-deflate"), both);
        assert_eq!(
            negotiate(b"permessage-deflate; client_max_window_bits"),
            both
        ); // Chromium
        assert_eq!(
            negotiate(b"Permessage-Deflate ; client_max_window_bits=10"),
            both
        );
        assert_eq!(
            negotiate(
                b"permessage-deflate; server_no_context_takeover; client_no_context_takeover"
            ),
            both
        );
        assert_eq!(
            negotiate(b"permessage-deflate; server_max_window_bits=15"),
            agreed(Mode::Both, Some(15))
        );
        assert_eq!(
            negotiate(b"permessage-deflate; server_max_window_bits=\"8\""),
            agreed(Mode::InflateOnly, Some(8))
        );
        // Declined: unknown or repeated parameters, bad values; other extensions ignored.
        for bad in [
            &b""[..],
            b"x-webkit-deflate-frame",
            b"permessage-deflate; foo",
            b"permessage-deflate; server_max_window_bits",
            b"permessage-deflate; server_max_window_bits=16",
            b"permessage-deflate; server_max_window_bits=7",
            b"permessage-deflate; server_max_window_bits=08",
            b"permessage-deflate; client_max_window_bits=1",
            b"permessage-deflate; server_no_context_takeover=1",
            b"permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            b"permessage-deflate; client_max_window_bits=\"1\\0\"",
            b"permessage-deflate; client_max_window_bits=\"10",
        ] {
            assert_eq!(negotiate(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        // The first acceptable offer wins; a comma inside quotes does not split.
        assert_eq!(
            negotiate(b"permessage-deflate; foo, permessage-deflate; server_max_window_bits=9, permessage-deflate"),
            agreed(Mode::InflateOnly, Some(9))
        );
        assert_eq!(
            negotiate(b"permessage-deflate; client_max_window_bits=\"8,permessage-deflate\""),
            None
        );
        assert_eq!(
            agreed(Mode::InflateOnly, Some(9))
                .unwrap()
                .response_header(),
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=9\r\n"
        );
    }

    #[test]
    fn round_trip_and_encode_once() {
        let mut d = Deflater::new(0);
        let mut inf = Inflater::default();
        for len in [0usize, 1, 100, 5_000, 200_000] {
            let text: Vec<u8> = (0..len)
                .map(|i| b"chat loop "[i % 10] ^ (i / 997) as u8)
                .collect();
            match d.compress(&text) {
                Some(c) => {
                    let c = c.to_vec();
                    assert_eq!(inf.inflate(&[&c], 1 << 20).unwrap(), &text[..]);
                    // Split anywhere, as fragments are.
                    let mid = c.len() / 3;
                    assert_eq!(
                        inf.inflate(&[&c[..mid], &c[mid..]], 1 << 20).unwrap(),
                        &text[..]
                    );
                }
                None => assert!(len < 10, "{len} bytes did not shrink"),
            }
        }
        let mut fb = crate::protocol::FrameBuf::default();
        fb.start().extend_from_slice(&[b'a'; 300]);
        let plain = fb.finish_text();
        let before = d.compressions;
        let c1 = d.shared(&plain);
        let c2 = d.shared(&plain);
        assert!(Rc::ptr_eq(&c1, &c2));
        assert_eq!(d.compressions, before + 1, "compressed once");
        assert_eq!(c1[0], 0xc1);
        assert!(c1.len() < 40, "{}", c1.len());
        d.end_round();
        d.min_bytes = 1000;
        assert!(
            Rc::ptr_eq(&d.shared(&plain), &plain),
            "below the cut-off: plain"
        );
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let mut d = Deflater::new(0);
        let zeros = vec![0u8; 10 << 20];
        let c = d.compress(&zeros).unwrap().to_vec();
        assert!(c.len() < 60_000, "{}", c.len());
        let mut inf = Inflater::default();
        assert_eq!(inf.inflate(&[&c], 65_536), Err(InflateError::TooBig));
        assert!(inf.held() <= 65_537 + 4096, "{}", inf.held());
        assert_eq!(inf.inflate(&[&c], 10 << 20).map(|o| o.len()), Ok(10 << 20));
        inf.trim();
        assert_eq!(inf.held(), 0);
        assert_eq!(
            inf.inflate(&[b"\xff\xff\xff"], 100),
            Err(InflateError::Invalid)
        );
        // Uncompressed ("stored") blocks and an empty message.
        assert_eq!(
            inf.inflate(&[&[0x00, 0x03, 0x00, 0xfc, 0xff, b'a', b'b', b'c']], 3)
                .unwrap(),
            b"abc"
        );
        assert_eq!(inf.inflate(&[&[0x00]], 3).unwrap(), b"");
    }
}
