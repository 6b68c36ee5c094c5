//! A pre-scan of RESP3 bytes from Redis, before the decoder sees them.
//!
//! The `redis-protocol` decoder recurses once per nesting level and has no depth limit, so a
//! reply of 5 000 nested arrays (20 KB) overflows the stack and aborts the process; it also
//! parses a partial frame again from its start each time more bytes arrive. [`Scanner`] walks
//! the bytes once, without recursion, and finds where the next complete frame ends, so the
//! decoder only ever sees one complete frame that is known to be sane:
//!
//! - at most [`Limits::depth`] aggregates nested in one another (chatloop's deepest reply is
//!   2: the `HELLO` map with its `modules` array);
//! - at most [`Limits::bytes`] bytes per frame, checked from each length header before the
//!   payload is waited for, so a `$2000000000` header is refused at once, not buffered;
//! - at most [`Limits::elements`] elements per frame (each costs a decoded frame of about a
//!   hundred bytes, far more than its few bytes on the wire);
//! - only the types Redis sends to chatloop (no streamed aggregates, attributes or `HELLO`
//!   text), and every line ends with CRLF within [`LINE_MAX`] bytes.
//!
//! The scan resumes where it stopped when more bytes arrive, so receiving a frame in many
//! reads costs time proportional to its size, not to its size times the number of reads.

use std::fmt;

/// The longest header or simple-string line accepted (simple errors included).
pub const LINE_MAX: usize = 64 * 1024;

/// What one reply may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Aggregates nested in one another, at most.
    pub depth: usize,
    /// Bytes of one frame, at most.
    pub bytes: usize,
    /// Elements of one frame (all levels together), at most.
    pub elements: usize,
}

/// Why a reply was refused (for the log; never contains the reply's bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bad {
    /// Aggregates nested deeper than this limit.
    TooDeep(usize),
    /// A frame that would be longer than its limit.
    TooLong {
        /// Bytes the frame takes at least, as far as its headers tell.
        len: u64,
        /// [`Limits::bytes`].
        limit: usize,
    },
    /// A frame with more elements than its limit.
    TooManyElements {
        /// [`Limits::elements`].
        limit: usize,
    },
    /// A header or simple line longer than [`LINE_MAX`].
    LongLine,
    /// A length that is not a non-negative number.
    BadLength,
    /// A bulk string not followed by CRLF.
    NoCrlf,
    /// A type byte chatloop never expects from Redis.
    Type(u8),
}

impl fmt::Display for Bad {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bad::TooDeep(d) => write!(f, "aggregates nested deeper than {d}"),
            Bad::TooLong { len, limit } => {
                write!(f, "a reply of {len} bytes or more (limit {limit})")
            }
            Bad::TooManyElements { limit } => write!(f, "a reply of over {limit} elements"),
            Bad::LongLine => write!(f, "a line longer than {LINE_MAX} bytes"),
            Bad::BadLength => write!(f, "a length that is not a non-negative number"),
            Bad::NoCrlf => write!(f, "a bulk string not followed by CRLF"),
            Bad::Type(b) => write!(f, "an unexpected type byte 0x{b:02x}"),
        }
    }
}

/// The outcome of [`Scanner::scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scan {
    /// The first frame of the buffer is complete and this many bytes long.
    Complete(usize),
    /// More bytes are needed; call again with the same buffer extended.
    Incomplete,
    /// The bytes are not a reply chatloop accepts: the link is broken.
    Invalid(Bad),
}

/// Where the scan of the frame at the front of the buffer stands.
#[derive(Debug, Default)]
pub struct Scanner {
    /// Offset of the next element header, from the start of the frame.
    pos: usize,
    /// For each open aggregate, how many of its elements are still to come.
    open: Vec<u64>,
    elements: usize,
}

impl Scanner {
    /// Scans `buf`, which starts with the frame being scanned (the bytes already scanned
    /// must not have changed since the last call).
    pub fn scan(&mut self, buf: &[u8], lim: &Limits) -> Scan {
        loop {
            let Some(&kind) = buf.get(self.pos) else {
                return Scan::Incomplete;
            };
            let head = self.pos + 1;
            let window = &buf[head..buf.len().min(head + LINE_MAX + 2)];
            let Some(cr) = window.windows(2).position(|w| w == b"\r\n") else {
                if window.len() >= LINE_MAX + 2 {
                    return Scan::Invalid(Bad::LongLine);
                }
                return Scan::Incomplete;
            };
            let line = &window[..cr];
            let next = head + cr + 2;
            if next > lim.bytes {
                return self.fail(Bad::TooLong {
                    len: next as u64,
                    limit: lim.bytes,
                });
            }
            self.elements += 1;
            if self.elements > lim.elements {
                return self.fail(Bad::TooManyElements {
                    limit: lim.elements,
                });
            }
            match kind {
                b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => self.pos = next,
                b'$' | b'!' | b'=' => {
                    let Some(len) = length(line) else {
                        return self.fail(Bad::BadLength);
                    };
                    let end = (next as u64).saturating_add(len).saturating_add(2);
                    if end > lim.bytes as u64 {
                        return self.fail(Bad::TooLong {
                            len: end,
                            limit: lim.bytes,
                        });
                    }
                    let end = end as usize;
                    if buf.len() < end {
                        self.elements -= 1; // counted again when the rest is here
                        return Scan::Incomplete;
                    }
                    if &buf[end - 2..end] != b"\r\n" {
                        return self.fail(Bad::NoCrlf);
                    }
                    self.pos = end;
                }
                b'*' | b'~' | b'>' | b'%' => {
                    let Some(n) = length(line) else {
                        return self.fail(Bad::BadLength);
                    };
                    let n = if kind == b'%' { n.saturating_mul(2) } else { n };
                    if n > (lim.elements - self.elements) as u64 {
                        return self.fail(Bad::TooManyElements {
                            limit: lim.elements,
                        });
                    }
                    self.pos = next;
                    if n > 0 {
                        if self.open.len() >= lim.depth {
                            return self.fail(Bad::TooDeep(lim.depth));
                        }
                        self.open.push(n);
                        continue; // its elements follow
                    }
                }
                other => return self.fail(Bad::Type(other)),
            }
            // One element is complete: so may be the aggregates it closes.
            loop {
                match self.open.last_mut() {
                    None => {
                        let len = self.pos;
                        self.reset();
                        return Scan::Complete(len);
                    }
                    Some(left) => {
                        *left -= 1;
                        if *left > 0 {
                            break;
                        }
                        self.open.pop();
                    }
                }
            }
        }
    }

    /// Forgets the frame being scanned (after it was consumed, or the link was reset).
    pub fn reset(&mut self) {
        self.pos = 0;
        self.open.clear();
        self.elements = 0;
    }

    fn fail(&mut self, why: Bad) -> Scan {
        self.reset();
        Scan::Invalid(why)
    }
}

/// A length header: 1 to 19 ASCII digits (no sign, no `?` for streamed aggregates).
fn length(line: &[u8]) -> Option<u64> {
    if line.is_empty() || line.len() > 19 || !line.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(line).ok()?.parse().ok()
}
