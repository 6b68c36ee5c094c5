//! Identifiers: secret session ids, public user ids, room ids, time-ordered message ids, and
//! the event loop's connection ids.
//!
//! Secrets (session ids, room ids, user ids) come from the OS CSPRNG through a pool that is
//! refilled 4 KiB at a time, so creating a session costs no system call in the common case.
//! Message ids are UUID v7 built from the injected wall clock plus a counter, so they sort
//! in send order even within one millisecond; they need no secrecy and use a fast PRNG.

use std::fmt;

use crate::time::UnixMicros;

/// The secret bearer token of a session (a random UUID v4). Its `Debug` form shows a tag, not
/// the token (see the `Debug` impl); only `Display` writes the token itself.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u128);

/// The public, 8-hex-character twin of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UserId(pub u32);

/// A room: 40 random bits shown as 10 lowercase hex characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId(pub u64);

/// A message id: a UUID v7 as a number, so comparing ids compares send order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgId(pub u128);

/// Which connection (the event loop's slab index).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub usize);

/// One connection for its whole life: its slab index and the serial that tells it from the
/// connections before and after it in the same slot, so that something that outlives a
/// connection (a timer, a Redis answer) never reaches its successor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnHandle {
    /// The slab index (also the `mio` token) of the connection.
    pub token: usize,
    /// Counts up each time the slot is reused (wrapping), so an old handle no longer matches.
    pub serial: u32,
}

impl SessionId {
    /// Parses the hyphenated (or simple) UUID text form.
    pub fn parse(s: &str) -> Option<SessionId> {
        uuid::Uuid::try_parse(s)
            .ok()
            .map(|u| SessionId(u.as_u128()))
    }
}

impl SessionId {
    /// The hyphenated text form (what `Display` writes), without the formatting machinery.
    pub fn text(self) -> [u8; 36] {
        let mut out = [0u8; 36];
        uuid::Uuid::from_u128(self.0)
            .hyphenated()
            .encode_lower(&mut out);
        out
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        uuid::Uuid::from_u128(self.0).hyphenated().fmt(f)
    }
}

/// `SessionId(#1a2b3c4d)`: 32 bits of a keyed hash of the token, with a random key per
/// process. The same session shows the same tag throughout one process's log (so a log can
/// be followed), and the tag tells nothing about the token: a bearer token must never reach a
/// log line, and `{:?}` of anything holding a session is how it would get there.
impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId(#{:08x})", self.tag())
    }
}

impl SessionId {
    /// The tag shown by `Debug`.
    pub fn tag(self) -> u32 {
        use std::hash::BuildHasher;
        static KEY: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
        KEY.get_or_init(std::hash::RandomState::new)
            .hash_one(self.0) as u32
    }
}

impl UserId {
    /// The 8-character lowercase hex text form (what `Display` writes), without allocating.
    pub fn hex(self) -> [u8; 8] {
        let mut out = [0u8; 8];
        for (i, b) in out.iter_mut().enumerate() {
            *b = b"0123456789abcdef"[((self.0 >> (28 - 4 * i)) & 0xf) as usize];
        }
        out
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

impl RoomId {
    /// The 40 bits a room id uses: anything above them is not a room.
    pub const MASK: u64 = (1 << 40) - 1;

    /// Parses exactly 10 lowercase hex characters; anything else is not a room id.
    pub fn parse(s: &str) -> Option<RoomId> {
        if s.len() != 10 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        u64::from_str_radix(s, 16).ok().map(RoomId)
    }

    /// The 10-character text form, without allocating.
    pub fn hex(self) -> [u8; 10] {
        let mut out = [0u8; 10];
        for (i, b) in out.iter_mut().enumerate() {
            let nibble = (self.0 >> (36 - 4 * i)) & 0xf;
            *b = b"0123456789abcdef"[nibble as usize];
        }
        out
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:010x}", self.0)
    }
}

impl MsgId {
    /// The Unix milliseconds of a UUID v7 (its top 48 bits): when the message was sent.
    pub fn unix_ms(self) -> u64 {
        (self.0 >> 80) as u64
    }

    /// Parses the UUID text form (hyphenated or simple), as sent back in `before=`/`after=`
    /// cursors.
    pub fn parse(s: &str) -> Option<MsgId> {
        uuid::Uuid::try_parse(s).ok().map(|u| MsgId(u.as_u128()))
    }
}

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        uuid::Uuid::from_u128(self.0).hyphenated().fmt(f)
    }
}

/// Cryptographically random bytes, fetched from the OS in 4 KiB batches.
pub struct SecureRandom {
    pool: Box<[u8; 4096]>,
    used: usize,
}

impl fmt::Debug for SecureRandom {
    /// Never the pool: it holds the next secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecureRandom(..)")
    }
}

impl Default for SecureRandom {
    fn default() -> Self {
        SecureRandom {
            pool: Box::new([0; 4096]),
            used: 4096,
        }
    }
}

impl SecureRandom {
    /// Fills `out` with random bytes from the pool, refilling it from the OS when it runs dry;
    /// bytes handed out are wiped from the pool. Panics only if the OS generator fails.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut done = 0;
        while done < out.len() {
            if self.used == self.pool.len() {
                // The OS generator failing is not something a chat server can work around:
                // handing out predictable session ids would be worse than stopping.
                getrandom::fill(&mut self.pool[..]).expect("the OS random number generator failed");
                self.used = 0;
            }
            let n = (out.len() - done).min(self.pool.len() - self.used);
            out[done..done + n].copy_from_slice(&self.pool[self.used..self.used + n]);
            // Never hand out the same bytes twice.
            self.pool[self.used..self.used + n].fill(0);
            self.used += n;
            done += n;
        }
    }

    /// A new random session token (UUID v4).
    pub fn session_id(&mut self) -> SessionId {
        let mut b = [0u8; 16];
        self.fill(&mut b);
        SessionId(uuid::Builder::from_random_bytes(b).into_uuid().as_u128())
    }

    /// A new random public user id (32 bits).
    pub fn user_id(&mut self) -> UserId {
        let mut b = [0u8; 4];
        self.fill(&mut b);
        UserId(u32::from_le_bytes(b))
    }

    /// A new random room id (40 bits, see [`RoomId::MASK`]).
    pub fn room_id(&mut self) -> RoomId {
        let mut b = [0u8; 8];
        self.fill(&mut b);
        RoomId(u64::from_le_bytes(b) & RoomId::MASK)
    }

    /// A room invite: 128 random bits as URL-safe base64 without padding (22 characters).
    pub fn invite(&mut self) -> String {
        let mut b = [0u8; 16];
        self.fill(&mut b);
        base64url(&b)
    }

    /// 64 random bits (the message id generator's seed, a cluster node's id).
    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill(&mut b);
        u64::from_le_bytes(b)
    }
}

/// URL-safe base64 (RFC 4648 §5) without padding.
pub fn base64url(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ABC[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// Makes UUID v7 message ids: 48-bit Unix milliseconds, a 12-bit counter for order within
/// one millisecond (it borrows the next millisecond if it overflows), 62 random bits.
#[derive(Debug)]
pub struct MsgIdGen {
    last_ms: u64,
    seq: u16,
    state: u64,
}

impl MsgIdGen {
    /// A generator whose random part starts from `seed` (any value; not a secret).
    pub fn new(seed: u64) -> MsgIdGen {
        MsgIdGen {
            last_ms: 0,
            seq: 0,
            state: seed | 1,
        }
    }

    /// The next message id at wall-clock time `now`: greater than every id this generator made
    /// before, even if the clock stands still or goes back.
    pub fn next(&mut self, now: UnixMicros) -> MsgId {
        let ms = now.0 / 1000;
        if ms > self.last_ms {
            self.last_ms = ms;
            self.seq = 0;
        } else if self.seq == 0x0fff {
            self.last_ms += 1;
            self.seq = 0;
        } else {
            self.seq += 1;
        }
        let rand = self.splitmix();
        let hi = (self.last_ms & 0xffff_ffff_ffff) << 16 | 0x7000 | u64::from(self.seq);
        let lo = (rand & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
        MsgId(u128::from(hi) << 64 | u128::from(lo))
    }

    fn splitmix(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_matches_rfc4648_and_invites_are_22_url_safe_chars() {
        assert_eq!(base64url(b""), "");
        assert_eq!(base64url(b"f"), "Zg");
        assert_eq!(base64url(b"fo"), "Zm8");
        assert_eq!(base64url(b"foo"), "Zm9v");
        assert_eq!(base64url(b"foob"), "Zm9vYg");
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
        let mut r = SecureRandom::default();
        let (a, b) = (r.invite(), r.invite());
        assert_eq!(a.len(), 22);
        assert_ne!(a, b);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
    }

    #[test]
    fn session_and_user_text_forms_match_display() {
        let mut r = SecureRandom::default();
        for _ in 0..50 {
            let (s, u) = (r.session_id(), r.user_id());
            assert_eq!(&s.text()[..], s.to_string().as_bytes());
            assert_eq!(&u.hex()[..], u.to_string().as_bytes());
        }
        assert_eq!(&UserId(0xa).hex(), b"0000000a");
        assert_eq!(&UserId(u32::MAX).hex(), b"ffffffff");
    }

    #[test]
    fn msg_id_carries_its_unix_millis() {
        let mut g = MsgIdGen::new(7);
        assert_eq!(
            g.next(UnixMicros(1_755_611_100_123_456)).unix_ms(),
            1_755_611_100_123
        );
    }

    #[test]
    fn room_id_round_trips_and_rejects_everything_else() {
        let r = RoomId(0xa1b2c3d4e5);
        assert_eq!(r.to_string(), "a1b2c3d4e5");
        assert_eq!(&r.hex(), b"a1b2c3d4e5");
        assert_eq!(RoomId::parse("a1b2c3d4e5"), Some(r));
        assert_eq!(RoomId(0).to_string(), "0000000000");
        for bad in [
            "",
            "a1b2c3d4e",
            "a1b2c3d4e5f",
            "A1B2C3D4E5",
            "a1b2c3d4eg",
            "+1b2c3d4e5",
            "é1b2c3d4e",
        ] {
            assert_eq!(RoomId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn random_ids_have_the_right_shape() {
        let mut r = SecureRandom::default();
        let s = r.session_id();
        let text = s.to_string();
        assert_eq!(SessionId::parse(&text), Some(s));
        assert_eq!(uuid::Uuid::from_u128(s.0).get_version_num(), 4);
        assert_eq!(r.user_id().to_string().len(), 8);
        assert!(r.room_id().0 <= RoomId::MASK);
        assert_ne!(r.session_id(), r.session_id());
    }

    #[test]
    fn a_session_id_debug_form_shows_a_stable_tag_and_not_the_token() {
        let mut r = SecureRandom::default();
        let s = r.session_id();
        let text = format!("{s:?}");
        assert_eq!(text, format!("{:?}", s), "stable within the process");
        assert!(
            text.starts_with("SessionId(#") && text.len() == 20,
            "{text}"
        );
        let hex = format!("{:032x}", s.0);
        for form in [s.to_string(), hex.clone(), s.0.to_string()] {
            assert!(!text.contains(&form), "{text} shows {form}");
        }
        // Nor any 8 hex digits of the token (the tag is not a prefix or piece of it).
        for i in 0..=hex.len() - 8 {
            assert!(!text.contains(&hex[i..i + 8]), "{text}");
        }
        let other = r.session_id();
        assert_ne!(format!("{other:?}"), text);
        // Anything that derives Debug around a session is covered too.
        let wrapped = format!("{:?}", Some((s, 1)));
        assert!(!wrapped.contains(&s.to_string()) && !wrapped.contains(&s.0.to_string()));
    }

    #[test]
    fn message_ids_are_v7_and_strictly_increasing() {
        let mut g = MsgIdGen::new(7);
        let mut last = MsgId(0);
        for i in 0..10_000u64 {
            // Many ids inside the same millisecond, and a clock that steps back once.
            let t = if i == 5000 {
                1_000_000
            } else {
                1_755_611_100_000_000 + i * 10
            };
            let id = g.next(UnixMicros(t));
            assert!(id > last, "id {i} not increasing");
            let u = uuid::Uuid::from_u128(id.0);
            assert_eq!(u.get_version_num(), 7);
            assert_eq!(MsgId::parse(&id.to_string()), Some(id));
            last = id;
        }
    }
}
