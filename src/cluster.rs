//! Cluster mode: the Redis side of chatloop as a pure state machine (no sockets, no clock).
//!
//! Several chatloop nodes that share one Redis behave as one server. What lives where:
//!
//! | key (prefix `chatloop:`) | type | what | expiry |
//! |---|---|---|---|
//! | `{s:SESSION}:s` | hash `u`, `i` | username, user id | `--session-ttl`, slid on every use |
//! | `{s:SESSION}:sr` | set | the session's rooms | as the session |
//! | `rooms` | sorted set | room id → expiry (Unix ms) | score pushed forward while a node has members |
//! | `{r:ROOM}:rm` | hash `i`, `t` | a private room's invite SHA-256 (hex), a `message_ttl` (ms); only for rooms that have either | as `{r:ROOM}:h`; written before `rooms` |
//! | `private{chatloop:rooms}` | set | private room ids (left out of `GET /rooms/all`); tagged into the slot of `rooms`, which scripts read with it | pruned with `rooms` |
//! | `{r:ROOM}:h` | list | the last `--history` chat messages and the presence notices among them (`id` + JSON) | room TTL after the last refresh |
//! | `{r:ROOM}:hn` | list | the notices in `{r:ROOM}:h`, oldest first, at most `--history-notices` | as `{r:ROOM}:h` |
//! | `{r:ROOM}:p` | sorted set | `node:conn:user_id:user` → expiry (Unix ms) | heartbeated every `--presence-ttl`/3 |
//! | channel `{r:ROOM}:m` | pub/sub | `H{id}{json}` history events, `T{node}{conn}{json}` typing | subscribed while the node has members there |
//! | channel `ctl` | pub/sub | `E{session}`: a session ended | always subscribed |
//!
//! The part in braces is a hash tag: in a Redis Cluster every key of one room (and of one
//! session) is in one hash slot, so each script touches one slot ([`slots`] has the
//! cluster's pure pieces).
//!
//! One RESP3 connection carries commands (pipelined, answered in order) and pub/sub pushes,
//! so a `SUBSCRIBE` followed by `LRANGE` on the same connection sees every message exactly
//! once: pushes that arrive before the `LRANGE` reply are buffered and de-duplicated by id.
//! A chat message is `RPUSH`ed and `PUBLISH`ed by one Lua script (atomic), so history order is
//! delivery order on every node, and each node frames a delivered message once for all its
//! members.
//!
//! Nothing is lost unseen: a history event whose script Redis does not confirm (the link goes
//! down first, or Redis refuses it) and whose push never came back returns as
//! [`Event::Unconfirmed`] (the hub tells a chat's sender, and delivers a notice locally).
//! Every byte from Redis is hostile: replies pass [`resp::Scanner`] (depth, size, element and
//! type limits) before the decoder sees them, and what is queued toward Redis is bounded
//! (`--max-redis-queue`, see [`Cluster::check_queue`]).
//!
//! The event loop feeds this module bytes from Redis ([`Cluster::on_bytes`]), connection
//! changes and time; the hub's [`Op`]s become commands in [`Cluster::out`]; what the loop must
//! do comes back as [`Event`]s. A request that needs facts from Redis (a session this node has
//! not seen, a room's presence, ...) asks with [`Cluster::fetch`] and is answered by
//! [`Event::Answer`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;

use redis_protocol::resp3::decode::complete::decode;
use redis_protocol::resp3::encode::complete::encode_borrowed;
use redis_protocol::resp3::types::{BorrowedFrame, OwnedFrame};

use crate::hub::{Op, RoomSettings};
use crate::ids::{ConnHandle, ConnId, MsgId, RoomId, SessionId, UserId};
use crate::redis_url::Secret;
use crate::time::{Micros, Now};

pub mod resp;
pub mod slots;

/// The cluster's share of the settings.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub room_ttl: Micros,
    pub session_ttl: Micros,
    /// Chat messages kept per room.
    pub history: usize,
    /// Presence notices kept per room besides them (`--history-notices`).
    pub history_notices: usize,
    pub presence_ttl: Micros,
    pub db: u32,
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// What one reply from Redis may be (see [`resp`]).
    pub reply_limits: resp::Limits,
    /// Bytes queued toward Redis ([`Cluster::queued`]) beyond which Redis counts as down
    /// (`--max-redis-queue`).
    pub max_queue: usize,
}

impl ClusterConfig {
    /// The reply limits for these settings. The largest legitimate reply is a room's whole
    /// history (`LRANGE`): at most `entries` (`--history` + `--history-notices`) messages,
    /// each at most `max_text` bytes of JSON-encoded text (`--max-chat-bytes`, or 6 bytes per
    /// character of `--max-chat-chars` if that is less) plus the envelope (id, name, time:
    /// well under 1 KiB); lists of rooms or members (`max_items`) are far smaller.
    pub fn reply_limits(entries: usize, max_text: usize, max_items: usize) -> resp::Limits {
        let entry = 1024usize.saturating_add(max_text);
        resp::Limits {
            depth: 16,
            bytes: entries
                .saturating_mul(entry)
                .saturating_add(1 << 20)
                .min(isize::MAX as usize),
            elements: entries
                .max(max_items)
                .saturating_mul(4)
                .saturating_add(1024),
        }
    }
}

/// A fact a request needs from Redis before it can be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Query {
    /// The session's name and user id (`HGETALL`); installed in the hub when found.
    Session(SessionId),
    /// Whether the room is registered and not expired (`ZSCORE`), and its settings
    /// (`HGETALL chatloop:{r:ROOM}:rm`); installed in the hub when it exists.
    RoomExists(RoomId),
    /// Whether the room is among the session's rooms (`SISMEMBER chatloop:{s:SESSION}:sr`):
    /// membership of a private room, asked on every call (joins elsewhere, leaves).
    Member(SessionId, RoomId),
    /// WebSocket members of the room on all nodes (`ZCOUNT` of live presence).
    UserCount(RoomId),
    /// Who is in the room on all nodes (`ZRANGEBYSCORE` of live presence).
    Presence(RoomId),
    /// The session's rooms that still exist (one Lua script).
    SessionRooms(SessionId),
    /// Every live room.
    AllRooms,
    /// The last `n` messages of a room.
    History(RoomId, usize),
    /// Subscribe to the room and load its history into the hub (`SUBSCRIBE` + `LRANGE`).
    Subscribe(RoomId),
}

/// Redis's answer to a [`Query`].
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Session(Option<(String, UserId)>),
    /// The room's settings if it exists.
    Room(Option<RoomSettings>),
    Member(bool),
    Count(usize),
    Users(Vec<(String, UserId)>),
    Rooms(Vec<RoomId>),
    /// Message JSON, oldest first.
    Messages(Vec<Vec<u8>>),
    Done,
}

/// What a waiting request has learnt so far.
#[derive(Debug, Default)]
pub struct Facts {
    items: Vec<(Query, Answer)>,
    /// Redis went away while the request waited: it must be answered 503.
    pub failed: bool,
}

impl Facts {
    pub fn get(&self, q: Query) -> Option<&Answer> {
        self.items.iter().find(|(k, _)| *k == q).map(|(_, a)| a)
    }

    pub fn add(&mut self, q: Query, a: Answer) {
        self.items.push((q, a));
    }

    pub fn clear(&mut self) {
        self.items.clear();
        self.failed = false;
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty() && !self.failed
    }
}

/// What the event loop must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Connected and ready: local rooms go through Redis again.
    Up,
    /// Lost Redis: degraded mode until [`Event::Up`].
    Down,
    /// A fact for the request parked on `token`.
    Answer {
        token: usize,
        serial: u32,
        query: Query,
        answer: Answer,
    },
    /// Redis went away before answering the request parked on `token`.
    Failed { token: usize, serial: u32 },
    /// A history event for the room's local members.
    Deliver {
        room: RoomId,
        id: MsgId,
        json: Vec<u8>,
    },
    /// A typing event for the room's local members (but `except`).
    Typing {
        room: RoomId,
        except: Option<ConnId>,
        json: Vec<u8>,
    },
    /// The room's history as Redis has it, plus what arrived while it loaded. `catch_up`:
    /// after a reconnect, for a room with members here (send them what they missed).
    Loaded {
        room: RoomId,
        messages: Vec<(MsgId, Vec<u8>)>,
        catch_up: bool,
    },
    /// A member of another node whose presence expired (that node is gone): this node won
    /// the removal, so it announces `user_left` (exactly one node does).
    Departed {
        room: RoomId,
        user: String,
        user_id: UserId,
    },
    /// A session ended on some node: close its sockets here with 1000.
    SessionEnded(SessionId),
    /// A history event this node wrote that Redis did not confirm (the link went down
    /// first, Redis refused it, or it was written while Redis was unusable), and whose echo
    /// never came back: nobody here has seen it, and other nodes may or may not have.
    Unconfirmed {
        room: RoomId,
        id: MsgId,
        json: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Not connected; the loop should connect at `retry_at`.
    Down {
        retry_at: Micros,
    },
    /// A TCP connect is in progress (or the handshake is), since `since`.
    Connecting {
        since: Micros,
    },
    Up,
}

/// What the reply to one command means.
#[derive(Debug)]
enum Pending {
    Ignore,
    Hello,
    /// `CLUSTER SLOTS`, the last command of the handshake: a Redis Cluster of several
    /// masters is refused (not supported yet), one Redis or a cluster of one master is fine.
    Topology,
    /// The script that stores and publishes a history event: its reply (or its echo on the
    /// room's channel, whichever comes first) confirms the event.
    Publish {
        room: RoomId,
        id: MsgId,
        json: Vec<u8>,
    },
    Fetch {
        token: usize,
        serial: u32,
        query: Query,
    },
    /// `LRANGE` of a room's history after `SUBSCRIBE`: for a parked join (`for_request`), or
    /// to catch up after a reconnect.
    Load {
        for_request: Option<ConnHandle>,
        room: RoomId,
    },
    /// The presence entries this heartbeat found expired (and removed).
    Expired(RoomId),
    /// `SMEMBERS` of a session's rooms for [`Query::SessionRooms`]; their registry scores
    /// are asked next ([`Pending::RoomScores`]).
    SessionRooms {
        token: usize,
        serial: u32,
        session: SessionId,
        now_ms: u64,
    },
    /// `ZMSCORE` of `rooms` in the registry: those still live answer [`Query::SessionRooms`].
    RoomScores {
        token: usize,
        serial: u32,
        session: SessionId,
        now_ms: u64,
        rooms: Vec<RoomId>,
    },
    /// `ZSCORE` of a room in the registry, kept (see `Cluster::score`) for the
    /// `Pending::Fetch` of its settings, whose command follows at once.
    Score {
        now_ms: u64,
    },
}

#[derive(Debug)]
enum Sub {
    /// `SUBSCRIBE` sent, `LRANGE` not answered yet: history events are kept here (the
    /// newest `--history` of them: older ones would leave the history anyway).
    Loading(VecDeque<(MsgId, Vec<u8>)>),
    Live,
}

struct LocalMember {
    conn: ConnId,
    session: SessionId,
    presence: Vec<u8>,
}

struct LocalSession {
    sockets: u32,
    user: Rc<str>,
    user_id: UserId,
}

const PREFIX: &str = "chatloop:";
const CTL: &[u8] = b"chatloop:ctl";
const CONNECT_TIMEOUT: Micros = Micros(3_000_000);
/// A Redis that has had commands for this long without answering any is treated as gone.
const REPLY_TIMEOUT: Micros = Micros(5_000_000);
const BACKOFF_MIN: Micros = Micros(100_000);
const BACKOFF_MAX: Micros = Micros(5_000_000);
/// What a queued command costs besides its bytes (its [`Pending`] entry).
const PENDING_COST: usize = std::mem::size_of::<(Pending, usize)>();

/// Lua that drops the history entries (list `h`, its notices in `n`) sent at or before
/// `now - ttl` (both Unix ms; a ttl of 0 keeps everything), from the oldest end: an entry's
/// send time is in its UUID v7 id (the first 12 hex digits), which every node writes, so the
/// cost is O(1) per entry dropped. Entries out of order (nodes' clocks differ) wait for the
/// next trim behind a younger one; readers filter them anyway.
macro_rules! trim_lua {
    ($ttl:literal, $now:literal) => {
        concat!(
            "local ttl = tonumber(",
            $ttl,
            ") or 0 \
if ttl > 0 then \
local cutoff = (tonumber(",
            $now,
            ") or 0) - ttl \
while true do \
local first = redis.call('LINDEX', h, 0) \
if not first then break end \
local sent = tonumber(string.sub(first, 1, 8) .. string.sub(first, 10, 13), 16) or 0 \
if sent > cutoff then break end \
redis.call('LPOP', h) \
if first == redis.call('LINDEX', n, 0) then redis.call('LPOP', n) end \
end end "
        )
    };
}

/// Stores a history event and publishes it, atomically, so that history order is delivery
/// order. A script rather than `MULTI`: Redis 7.0 writes a subscriber's own pushes into the
/// middle of an `EXEC` reply, but before a script's reply.
///
/// Presence notices are bounded on their own (as in `history.rs`), so that churn never
/// pushes chat out: `KEYS[3]` lists the notices in `KEYS[1]`, oldest first; past
/// `ARGV[4]` the oldest notice leaves both (`LREM` from the newest end: under churn it is
/// among the newest entries). Past `ARGV[2]` chat messages the oldest entries leave until
/// a chat message has (notices older than it go with it). `ARGV[5]` is 1 for a notice.
/// First the entries past the room's `message_ttl` leave (`ARGV[6]` ms, 0 for none, as of
/// `ARGV[7]`, the node's Unix ms).
const PUBLISH: &str = concat!(
    "local h, n = KEYS[1], KEYS[3] ",
    trim_lua!("ARGV[6]", "ARGV[7]"),
    "redis.call('RPUSH', h, ARGV[1]) \
if ARGV[5] == '1' then \
redis.call('RPUSH', n, ARGV[1]) \
if redis.call('LLEN', n) > tonumber(ARGV[4]) then redis.call('LREM', h, -1, redis.call('LPOP', n)) end \
else \
local chats = redis.call('LLEN', h) - redis.call('LLEN', n) \
while chats > tonumber(ARGV[2]) do \
local first = redis.call('LPOP', h) \
if not first then break end \
if first == redis.call('LINDEX', n, 0) then redis.call('LPOP', n) else chats = chats - 1 end \
end \
end \
redis.call('EXPIRE', h, ARGV[3]) \
redis.call('EXPIRE', n, ARGV[3]) \
return redis.call('PUBLISH', KEYS[2], 'H' .. ARGV[1])"
);

/// [`Op::TrimHistory`]: `KEYS` history and notices, `ARGV` ttl and now (ms).
const TRIM: &str = concat!(
    "local h, n = KEYS[1], KEYS[2] ",
    trim_lua!("ARGV[1]", "ARGV[2]"),
    "return 0"
);

/// [`Op::InviteRotated`]: replaces the invite's hash of a room that still has one (never
/// makes a settings key without its expiry for a room that is gone).
const ROTATE: &str = "if redis.call('HEXISTS', KEYS[1], 'i') == 1 then \
redis.call('HSET', KEYS[1], 'i', ARGV[1]) return 1 end return 0";

/// Writes a room's settings unless Redis has them (after it came back empty: a rotation
/// made meanwhile on another node must not be undone), with their expiry.
const SETTINGS_IF_MISSING: &str = "if redis.call('EXISTS', KEYS[1]) == 0 then \
redis.call('HSET', KEYS[1], unpack(ARGV, 2)) end \
redis.call('EXPIRE', KEYS[1], ARGV[1]) return 0";

/// The registry's expired rooms leave it, and the set of private rooms.
const PRUNE_ROOMS: &str = "local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1]) \
if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1]) end \
for _, r in ipairs(gone) do redis.call('SREM', KEYS[2], r) end return #gone";

/// [`Query::AllRooms`]: live rooms that are not private.
const PUBLIC_ROOMS: &str = "local out = {} \
for _, r in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')) do \
if redis.call('SISMEMBER', KEYS[2], r) == 0 then out[#out + 1] = r end end \
return out";

/// The set of private room ids. Its hash tag puts it in the slot of `chatloop:rooms` (a key
/// without braces hashes whole), since the scripts that list and prune rooms read both.
const PRIVATE: &[u8] = b"chatloop:private{chatloop:rooms}";

/// Removes a room's expired presence entries and returns them: the one node whose script
/// removed an entry announces that member's `user_left`.
const EXPIRE_PRESENCE: &str = "local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1]) \
if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1]) end \
return gone";

/// Cluster mode's Redis side as a pure state machine: the link's state, the commands queued
/// for Redis ([`Cluster::out`]) and what each reply will mean, the rooms subscribed, this
/// node's members and sessions as Redis must know them. Bytes and time in, [`Event`]s out.
pub struct Cluster {
    cfg: ClusterConfig,
    node: [u8; 8],
    link: Link,
    backoff: Micros,
    /// Encoded commands not yet written to the socket.
    pub out: Vec<u8>,
    inbuf: Vec<u8>,
    /// Where the scan of the reply at the front of `inbuf` stands.
    scanner: resp::Scanner,
    /// Each command's reply meaning and what it costs until answered (see `queued`).
    pending: VecDeque<(Pending, usize)>,
    /// Bytes of the commands in `pending` (their encoding, and a history event's copy).
    queued: usize,
    /// Ids of `Pending::Publish` events neither answered nor echoed yet.
    awaiting: HashSet<MsgId>,
    /// A write was not queued because the queue was full: the link must be dropped even if
    /// replies shrink the queue meanwhile (a response held for that write must not go out).
    overflowed: bool,
    sent: u64,
    answered: u64,
    subs: HashMap<RoomId, Sub>,
    members: HashMap<RoomId, Vec<LocalMember>>,
    /// Settings of the rooms with members here that have any (rewritten after Redis came
    /// back empty, so that a private room never comes back public).
    settings: HashMap<RoomId, RoomSettings>,
    sessions: HashMap<SessionId, LocalSession>,
    /// A room's registry score just read (`Pending::Score`): whether it is in the future.
    score: Option<bool>,
    next_heartbeat: Micros,
    /// When Redis last answered, or when it was last asked with nothing outstanding.
    last_progress: Micros,
    /// The latest time this module was told (for commands, which take no time argument).
    clock: Micros,
    events: Vec<Event>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("link", &self.link)
            .field("sent", &self.sent)
            .field("answered", &self.answered)
            .field("queued", &self.queued)
            .field("rooms", &self.subs.len())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    pub fn new(cfg: ClusterConfig, node_id: u32) -> Cluster {
        let mut node = [0u8; 8];
        node.copy_from_slice(format!("{node_id:08x}").as_bytes());
        Cluster {
            cfg,
            node,
            link: Link::Down {
                retry_at: Micros::ZERO,
            },
            backoff: BACKOFF_MIN,
            out: Vec::new(),
            inbuf: Vec::new(),
            scanner: resp::Scanner::default(),
            pending: VecDeque::new(),
            queued: 0,
            awaiting: HashSet::new(),
            overflowed: false,
            sent: 0,
            answered: 0,
            subs: HashMap::new(),
            members: HashMap::new(),
            settings: HashMap::new(),
            sessions: HashMap::new(),
            score: None,
            next_heartbeat: Micros::MAX,
            last_progress: Micros::ZERO,
            clock: Micros::ZERO,
            events: Vec::new(),
        }
    }

    /// This node's id in presence entries and typing events.
    pub fn node(&self) -> &str {
        std::str::from_utf8(&self.node).unwrap_or("????????")
    }

    /// Whether the loop should keep a socket (connecting or connected).
    pub fn wants_socket(&self) -> bool {
        !matches!(self.link, Link::Down { .. })
    }

    pub fn is_up(&self) -> bool {
        self.link == Link::Up
    }

    /// Bytes queued toward Redis: those of the commands not yet answered, from when they are
    /// queued (their encoding and bookkeeping), or the bytes not yet written if that is more
    /// (subscriptions are written but never answered).
    pub fn queued(&self) -> usize {
        self.queued.max(self.out.len())
    }

    /// Up, with room in the queue for more. When not, because the queue is full, the link
    /// is marked for [`Cluster::check_queue`] to drop.
    fn usable(&mut self) -> bool {
        if !self.is_up() {
            return false;
        }
        if self.queued() > self.cfg.max_queue {
            self.overflowed = true;
        }
        !self.overflowed
    }

    /// When the queue toward Redis is over `--max-redis-queue`: Redis is not keeping up (or
    /// not answering while a trickle of bytes keeps the reply timeout away), so it is treated
    /// as down: the link is dropped and the node goes degraded until it reconnects. Returns
    /// whether that happened (the loop must then close the socket).
    pub fn check_queue(&mut self, now: Now) -> bool {
        if !self.is_up() || (!self.overflowed && self.queued() <= self.cfg.max_queue) {
            return false;
        }
        log::warn!(
            "Redis is not keeping up: {} commands ({} bytes) queued, over --max-redis-queue \
             ({} bytes): reconnecting",
            self.pending.len(),
            self.queued(),
            self.cfg.max_queue
        );
        self.on_disconnected(now);
        true
    }

    /// Commands written so far (a held response waits until [`Cluster::answered`] reaches it).
    pub fn sent(&self) -> u64 {
        self.sent
    }

    pub fn answered(&self) -> u64 {
        self.answered
    }

    pub fn drain_events(&mut self) -> std::vec::Drain<'_, Event> {
        self.events.drain(..)
    }

    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// When [`Cluster::on_timer`] has work.
    pub fn poll_timeout(&self) -> Option<Micros> {
        match self.link {
            Link::Down { retry_at } => Some(retry_at),
            Link::Connecting { since } => Some(since + CONNECT_TIMEOUT),
            Link::Up if !self.pending.is_empty() => {
                Some(self.next_heartbeat.min(self.last_progress + REPLY_TIMEOUT))
            }
            Link::Up => Some(self.next_heartbeat),
        }
    }

    /// Whether the loop should start connecting now; if so the link is `Connecting`.
    pub fn should_connect(&mut self, now: Now) -> bool {
        self.clock = now.mono;
        match self.link {
            Link::Down { retry_at } if now.mono >= retry_at => {
                self.link = Link::Connecting { since: now.mono };
                true
            }
            _ => false,
        }
    }

    /// Heartbeats, and the connect timeout.
    pub fn on_timer(&mut self, now: Now) {
        self.clock = now.mono;
        match self.link {
            Link::Connecting { since } if now.mono >= since + CONNECT_TIMEOUT => {
                log::warn!(
                    "Redis did not answer within {} s",
                    CONNECT_TIMEOUT.0 / 1_000_000
                );
                self.on_disconnected(now);
            }
            Link::Up
                if !self.pending.is_empty() && now.mono >= self.last_progress + REPLY_TIMEOUT =>
            {
                log::warn!(
                    "Redis has not answered for {} s: reconnecting",
                    REPLY_TIMEOUT.0 / 1_000_000
                );
                self.on_disconnected(now);
            }
            Link::Up if now.mono >= self.next_heartbeat => self.heartbeat(now, false),
            _ => {}
        }
    }

    /// The TCP connection is open: say hello (RESP3, auth) and pick the database.
    pub fn on_connected(&mut self) {
        self.out.clear();
        self.inbuf.clear();
        self.scanner.reset();
        let mut hello: Vec<&[u8]> = vec![b"HELLO", b"3"];
        if let Some(p) = &self.cfg.password {
            hello.push(b"AUTH");
            hello.push(self.cfg.user.as_deref().unwrap_or("default").as_bytes());
            hello.push(p.expose().as_bytes());
        }
        let hello: Vec<Vec<u8>> = hello.into_iter().map(<[u8]>::to_vec).collect();
        self.command_owned(&hello, Pending::Hello);
        let db = self.cfg.db.to_string();
        self.command(&[b"SELECT", db.as_bytes()], Pending::Hello);
        self.command(&[b"CLUSTER", b"SLOTS"], Pending::Topology);
    }

    /// The connection failed or closed: fail what waits, go degraded, retry with backoff.
    pub fn on_disconnected(&mut self, now: Now) {
        let was_up = self.link == Link::Up;
        self.out = Vec::new();
        self.inbuf = Vec::new();
        self.scanner.reset();
        self.queued = 0;
        self.overflowed = false;
        for (p, _) in std::mem::take(&mut self.pending) {
            match p {
                Pending::Fetch { token, serial, .. }
                | Pending::Load {
                    for_request: Some(ConnHandle { token, serial }),
                    ..
                } => self.events.push(Event::Failed { token, serial }),
                Pending::Publish { room, id, json } => {
                    if self.awaiting.remove(&id) {
                        self.events.push(Event::Unconfirmed { room, id, json });
                    }
                }
                Pending::SessionRooms { token, serial, .. }
                | Pending::RoomScores { token, serial, .. } => {
                    self.events.push(Event::Failed { token, serial })
                }
                Pending::Load { .. }
                | Pending::Ignore
                | Pending::Hello
                | Pending::Topology
                | Pending::Expired(_)
                | Pending::Score { .. } => {}
            }
        }
        self.awaiting.clear();
        self.score = None;
        self.answered = self.sent;
        // Rooms still loading have no members yet; rooms with members resubscribe on Up.
        self.subs.retain(|_, s| matches!(s, Sub::Live));
        self.link = Link::Down {
            retry_at: now.mono + self.backoff,
        };
        self.backoff = (self.backoff + self.backoff).min(BACKOFF_MAX);
        if was_up {
            log::warn!("lost Redis: degraded mode (local rooms only) until it is back");
            self.events.push(Event::Down);
        }
    }

    /// Bytes from Redis; replies are matched to commands in order, pushes are routed.
    /// Returns `false` if the stream is broken (the loop should close and reconnect).
    /// Every reply is first scanned ([`resp::Scanner`]: depth, size and type limits) and only
    /// then decoded, one complete frame at a time; a reply outside the limits breaks the link.
    /// Log lines name what was wrong, never the bytes (they may hold chat or session ids).
    pub fn on_bytes(&mut self, data: &[u8], now: Now) -> bool {
        self.clock = now.mono;
        self.inbuf.extend_from_slice(data);
        self.last_progress = now.mono;
        let mut pos = 0;
        let ok = loop {
            let len = match self
                .scanner
                .scan(&self.inbuf[pos..], &self.cfg.reply_limits)
            {
                resp::Scan::Incomplete => break true,
                resp::Scan::Invalid(why) => {
                    log::warn!("Redis sent a reply chatloop does not accept ({why}): reconnecting");
                    break false;
                }
                resp::Scan::Complete(len) => len,
            };
            match decode(&self.inbuf[pos..pos + len]) {
                Ok(Some((frame, used))) if used == len => {
                    pos += len;
                    if !self.on_frame(frame, now) {
                        break false;
                    }
                }
                Ok(_) => {
                    log::warn!("Redis sent a reply the decoder reads differently: reconnecting");
                    break false;
                }
                Err(e) => {
                    // The error's text quotes the bytes: only its kind is logged.
                    log::warn!("unreadable reply from Redis ({:?}): reconnecting", e.kind());
                    break false;
                }
            }
        };
        if !ok {
            self.scanner.reset();
            self.inbuf = Vec::new();
            return false;
        }
        self.inbuf.drain(..pos);
        if self.inbuf.is_empty() && self.inbuf.capacity() > 1024 * 1024 {
            self.inbuf = Vec::new();
        }
        ok
    }

    /// Asks Redis for a fact on behalf of the request parked on `token`.
    pub fn fetch(&mut self, token: usize, serial: u32, query: Query, now: Now) {
        self.clock = now.mono;
        if !self.usable() {
            self.events.push(Event::Failed { token, serial });
            return;
        }
        let now_ms = now.wall.0 / 1000;
        let fetch = Pending::Fetch {
            token,
            serial,
            query,
        };
        let after = format!("({now_ms}");
        match query {
            Query::Session(s) => {
                let key = key("s:", s);
                self.command(&[b"HGETALL", key.as_bytes()], fetch)
            }
            Query::RoomExists(r) => {
                // Two commands (the registry and the room's own key may live apart), answered
                // in order: the score waits in `self.score` for the settings.
                let room = r.hex();
                let score = Pending::Score { now_ms };
                self.command(&[b"ZSCORE", b"chatloop:rooms", &room], score);
                let key = key("rm:", r);
                self.command(&[b"HGETALL", key.as_bytes()], fetch)
            }
            Query::Member(s, r) => {
                let key = key("sr:", s);
                self.command(&[b"SISMEMBER", key.as_bytes(), &r.hex()], fetch)
            }
            Query::UserCount(r) => {
                let key = key("p:", r);
                self.command(
                    &[b"ZCOUNT", key.as_bytes(), after.as_bytes(), b"+inf"],
                    fetch,
                )
            }
            Query::Presence(r) => {
                let key = key("p:", r);
                let args: [&[u8]; 4] =
                    [b"ZRANGEBYSCORE", key.as_bytes(), after.as_bytes(), b"+inf"];
                self.command(&args, fetch)
            }
            Query::SessionRooms(session) => {
                // The session's rooms, then (when they come) their registry scores: two
                // commands, since a session's keys and the registry live in different slots
                // of a Redis Cluster (a script may touch only one).
                let key = key("sr:", session);
                let members = Pending::SessionRooms {
                    token,
                    serial,
                    session,
                    now_ms,
                };
                self.command(&[b"SMEMBERS", key.as_bytes()], members)
            }
            Query::AllRooms => {
                let args: [&[u8]; 6] = [
                    b"EVAL",
                    PUBLIC_ROOMS.as_bytes(),
                    b"2",
                    b"chatloop:rooms",
                    PRIVATE,
                    after.as_bytes(),
                ];
                self.command(&args, fetch)
            }
            Query::History(r, n) => {
                let key = key("h:", r);
                let from = format!("-{n}");
                self.command(&[b"LRANGE", key.as_bytes(), from.as_bytes(), b"-1"], fetch)
            }
            Query::Subscribe(r) => {
                if matches!(self.subs.get(&r), Some(Sub::Live)) {
                    self.events.push(Event::Answer {
                        token,
                        serial,
                        query,
                        answer: Answer::Done,
                    });
                    return;
                }
                if let std::collections::hash_map::Entry::Vacant(e) = self.subs.entry(r) {
                    e.insert(Sub::Loading(VecDeque::new()));
                    let channel = key("m:", r);
                    self.command_push(&[b"SUBSCRIBE", channel.as_bytes()]);
                }
                let key = key("h:", r);
                let load = Pending::Load {
                    for_request: Some(ConnHandle { token, serial }),
                    room: r,
                };
                self.command(&[b"LRANGE", key.as_bytes(), b"0", b"-1"], load)
            }
        }
    }

    /// Writes one change of shared state. While Redis is down (or its queue is full) only
    /// local bookkeeping is kept (what a heartbeat re-asserts once it is back), and a history
    /// event comes back as [`Event::Unconfirmed`]: it is never dropped unseen.
    pub fn apply(&mut self, op: Op, now: Now) {
        self.clock = now.mono;
        let left = self.track(&op);
        if !self.usable() {
            if let Op::Publish { room, id, json, .. } = op {
                self.events.push(Event::Unconfirmed { room, id, json });
            }
            return;
        }
        let now_ms = now.wall.0 / 1000;
        let session_ttl = secs(self.cfg.session_ttl).to_string();
        match op {
            Op::SessionCreated { id, user, user_id } => {
                let key = self.write_session(id, &user, user_id);
                self.command(
                    &[b"EXPIRE", key.as_bytes(), session_ttl.as_bytes()],
                    Pending::Ignore,
                );
            }
            Op::SessionUsed(id) => {
                for kind in ["s:", "sr:"] {
                    let key = key(kind, id);
                    self.command(
                        &[b"EXPIRE", key.as_bytes(), session_ttl.as_bytes()],
                        Pending::Ignore,
                    );
                }
            }
            Op::SessionEnded(id) => {
                let (s, sr) = (key("s:", id), key("sr:", id));
                self.command(&[b"DEL", s.as_bytes(), sr.as_bytes()], Pending::Ignore);
                let msg = format!("E{id}");
                self.command(&[b"PUBLISH", CTL, msg.as_bytes()], Pending::Ignore);
            }
            Op::RoomCreated {
                room,
                session,
                settings,
            } => {
                // Settings first: whoever sees the room in the registry sees them too.
                if settings != RoomSettings::default() {
                    let key = key("rm:", room);
                    let mut args: Vec<Vec<u8>> = vec![b"HSET".to_vec(), key.clone().into_bytes()];
                    args.extend(settings_fields(&settings));
                    self.command_owned(&args, Pending::Ignore);
                    let ttl = secs(self.cfg.room_ttl + self.cfg.presence_ttl).to_string();
                    self.command(
                        &[b"EXPIRE", key.as_bytes(), ttl.as_bytes()],
                        Pending::Ignore,
                    );
                    if settings.is_private() {
                        self.command(&[b"SADD", PRIVATE, &room.hex()], Pending::Ignore);
                    }
                }
                let exp = (now_ms + ms(self.cfg.room_ttl)).to_string();
                let hex = room.hex();
                let args: [&[u8]; 5] = [b"ZADD", b"chatloop:rooms", b"NX", exp.as_bytes(), &hex];
                self.command(&args, Pending::Ignore);
                self.remember(session, room, &session_ttl);
            }
            Op::Remember { session, room } => self.remember(session, room, &session_ttl),
            Op::InviteRotated { room, invite } => {
                let key = key("rm:", room);
                let hash = hex32(&invite);
                let args: [&[u8]; 5] = [b"EVAL", ROTATE.as_bytes(), b"1", key.as_bytes(), &hash];
                self.command(&args, Pending::Ignore);
            }
            Op::TrimHistory { room, ttl } => {
                let (h, n) = (key("h:", room), key("hn:", room));
                let (ttl, now) = (ms(ttl).to_string(), now_ms.to_string());
                let args: [&[u8]; 7] = [
                    b"EVAL",
                    TRIM.as_bytes(),
                    b"2",
                    h.as_bytes(),
                    n.as_bytes(),
                    ttl.as_bytes(),
                    now.as_bytes(),
                ];
                self.command(&args, Pending::Ignore);
            }
            Op::Forget { session, room } => {
                let key = key("sr:", session);
                self.command(&[b"SREM", key.as_bytes(), &room.hex()], Pending::Ignore);
            }
            Op::Publish {
                room,
                id,
                json,
                message_ttl,
            } => {
                let mut entry = Vec::with_capacity(36 + json.len());
                let _ = std::io::Write::write_fmt(&mut entry, format_args!("{id}"));
                entry.extend_from_slice(&json);
                let (h, m, n) = (key("h:", room), key("m:", room), key("hn:", room));
                let keep = self.cfg.history.to_string();
                let keep_notices = self.cfg.history_notices.to_string();
                let notice: &[u8] = if crate::protocol::is_presence(&json) {
                    b"1"
                } else {
                    b"0"
                };
                let ttl = secs(self.cfg.room_ttl + self.cfg.presence_ttl).to_string();
                let message_ttl = message_ttl.map_or(0, ms).to_string();
                let now = now_ms.to_string();
                let args: [&[u8]; 13] = [
                    b"EVAL",
                    PUBLISH.as_bytes(),
                    b"3",
                    h.as_bytes(),
                    m.as_bytes(),
                    n.as_bytes(),
                    &entry,
                    keep.as_bytes(),
                    ttl.as_bytes(),
                    keep_notices.as_bytes(),
                    notice,
                    message_ttl.as_bytes(),
                    now.as_bytes(),
                ];
                self.awaiting.insert(id);
                self.command(&args, Pending::Publish { room, id, json });
            }
            Op::Typing { room, except, json } => {
                let mut msg = Vec::with_capacity(17 + json.len());
                msg.push(b'T');
                msg.extend_from_slice(&self.node);
                let c = except.map_or(u32::MAX, |c| c.0 as u32);
                let _ = std::io::Write::write_fmt(&mut msg, format_args!("{c:08x}"));
                msg.extend_from_slice(&json);
                let m = key("m:", room);
                self.command(&[b"PUBLISH", m.as_bytes(), &msg], Pending::Ignore);
            }
            Op::Joined { room, conn, .. } => {
                let presence = self
                    .members
                    .get(&room)
                    .and_then(|ms| ms.iter().find(|m| m.conn == conn))
                    .map(|m| m.presence.clone())
                    .unwrap_or_default();
                self.refresh_room(room, &[presence], now);
            }
            Op::Left { room, .. } => {
                if let Some(member) = left {
                    let key = key("p:", room);
                    self.command(&[b"ZREM", key.as_bytes(), &member], Pending::Ignore);
                }
                if !self.members.contains_key(&room) {
                    self.unsubscribe(room);
                    // The settings outlive the registry entry, as at creation.
                    if self.settings.remove(&room).is_some() {
                        let key = key("rm:", room);
                        let ttl = secs(self.cfg.room_ttl + self.cfg.presence_ttl).to_string();
                        self.command(
                            &[b"EXPIRE", key.as_bytes(), ttl.as_bytes()],
                            Pending::Ignore,
                        );
                    }
                    let exp = (now_ms + ms(self.cfg.room_ttl)).to_string();
                    let hex = room.hex();
                    let args: [&[u8]; 5] =
                        [b"ZADD", b"chatloop:rooms", b"GT", exp.as_bytes(), &hex];
                    self.command(&args, Pending::Ignore);
                }
            }
            Op::Forgotten(room) => {
                if !self.members.contains_key(&room) {
                    self.unsubscribe(room);
                }
            }
        }
    }

    // ---- internals ------------------------------------------------------------------

    /// Keeps the node's own view of its members and sessions (for heartbeats); returns the
    /// presence entry of a member that left.
    fn track(&mut self, op: &Op) -> Option<Vec<u8>> {
        let mut left = None;
        match op {
            Op::Joined {
                room,
                conn,
                session,
                user,
                user_id,
                settings,
            } => {
                if *settings != RoomSettings::default() {
                    self.settings.insert(*room, *settings);
                }
                let presence =
                    format!("{}:{:x}:{user_id}:{user}", self.node(), conn.0).into_bytes();
                self.members.entry(*room).or_default().push(LocalMember {
                    conn: *conn,
                    session: *session,
                    presence,
                });
                let s = self.sessions.entry(*session).or_insert(LocalSession {
                    sockets: 0,
                    user: user.clone(),
                    user_id: *user_id,
                });
                s.sockets += 1;
            }
            Op::Left {
                room,
                conn,
                session,
            } => {
                if let Some(ms) = self.members.get_mut(room)
                    && let Some(i) = ms.iter().position(|m| m.conn == *conn)
                {
                    left = Some(ms.swap_remove(i).presence);
                    if ms.is_empty() {
                        self.members.remove(room);
                    }
                }
                if let Some(s) = self.sessions.get_mut(session) {
                    s.sockets = s.sockets.saturating_sub(1);
                    if s.sockets == 0 {
                        self.sessions.remove(session);
                    }
                }
            }
            Op::SessionEnded(id) => {
                self.sessions.remove(id);
            }
            Op::InviteRotated { room, invite } => {
                if let Some(s) = self.settings.get_mut(room) {
                    s.invite = Some(*invite);
                }
            }
            _ => {}
        }
        left
    }

    /// `HSET`s a session's name and user id; returns its key.
    fn write_session(&mut self, id: SessionId, user: &str, user_id: UserId) -> String {
        let key = key("s:", id);
        let uid = user_id.to_string();
        let args: [&[u8]; 6] = [
            b"HSET",
            key.as_bytes(),
            b"u",
            user.as_bytes(),
            b"i",
            uid.as_bytes(),
        ];
        self.command(&args, Pending::Ignore);
        key
    }

    fn remember(&mut self, session: SessionId, room: RoomId, ttl: &str) {
        let key = key("sr:", session);
        self.command(&[b"SADD", key.as_bytes(), &room.hex()], Pending::Ignore);
        self.command(
            &[b"EXPIRE", key.as_bytes(), ttl.as_bytes()],
            Pending::Ignore,
        );
    }

    /// Presence entries of this node in `room`, the room's registry score and its keys' TTLs.
    fn refresh_room(&mut self, room: RoomId, presence: &[Vec<u8>], now: Now) {
        let now_ms = now.wall.0 / 1000;
        let p = key("p:", room);
        let until = (now_ms + ms(self.cfg.presence_ttl)).to_string();
        let mut args: Vec<&[u8]> = Vec::with_capacity(2 + 2 * presence.len());
        args.push(b"ZADD");
        args.push(p.as_bytes());
        for m in presence {
            args.push(until.as_bytes());
            args.push(m);
        }
        if presence.is_empty() {
            return;
        }
        self.command(&args, Pending::Ignore);
        let ttl = secs(self.cfg.room_ttl + self.cfg.presence_ttl).to_string();
        self.command(&[b"EXPIRE", p.as_bytes(), ttl.as_bytes()], Pending::Ignore);
        let with_settings = self.settings.contains_key(&room);
        for list in ["h:", "hn:", "rm:"] {
            if list == "rm:" && !with_settings {
                continue;
            }
            let k = key(list, room);
            self.command(&[b"EXPIRE", k.as_bytes(), ttl.as_bytes()], Pending::Ignore);
        }
        let exp = (now_ms + ms(self.cfg.room_ttl)).to_string();
        let hex = room.hex();
        let args: [&[u8]; 5] = [b"ZADD", b"chatloop:rooms", b"GT", exp.as_bytes(), &hex];
        self.command(&args, Pending::Ignore);
    }

    /// Every `--presence-ttl`/3: refresh what this node holds. Right after (re)connecting,
    /// `reassert` also rewrites sessions and rooms in use, in case Redis lost them.
    fn heartbeat(&mut self, now: Now, reassert: bool) {
        self.next_heartbeat = now.mono + Micros(self.cfg.presence_ttl.0 / 3).max(Micros(100_000));
        let now_ms = (now.wall.0 / 1000).to_string();
        let rooms: Vec<(RoomId, Vec<Vec<u8>>)> = self
            .members
            .iter()
            .map(|(r, ms)| (*r, ms.iter().map(|m| m.presence.clone()).collect()))
            .collect();
        if reassert {
            // Before the registry entries below: a room Redis lost comes back with its
            // settings (never public), unless Redis kept them (a newer invite stays).
            let ttl = secs(self.cfg.room_ttl + self.cfg.presence_ttl).to_string();
            let settings: Vec<(RoomId, RoomSettings)> =
                self.settings.iter().map(|(r, s)| (*r, *s)).collect();
            for (room, s) in settings {
                let key = key("rm:", room);
                let mut args: Vec<Vec<u8>> = vec![
                    b"EVAL".to_vec(),
                    SETTINGS_IF_MISSING.as_bytes().to_vec(),
                    b"1".to_vec(),
                    key.into_bytes(),
                    ttl.clone().into_bytes(),
                ];
                args.extend(settings_fields(&s));
                self.command_owned(&args, Pending::Ignore);
                if s.is_private() {
                    self.command(&[b"SADD", PRIVATE, &room.hex()], Pending::Ignore);
                }
            }
        }
        for (room, presence) in rooms {
            let p = key("p:", room);
            let args: [&[u8]; 5] = [
                b"EVAL",
                EXPIRE_PRESENCE.as_bytes(),
                b"1",
                p.as_bytes(),
                now_ms.as_bytes(),
            ];
            self.command(&args, Pending::Expired(room));
            self.refresh_room(room, &presence, now);
        }
        let args: [&[u8]; 6] = [
            b"EVAL",
            PRUNE_ROOMS.as_bytes(),
            b"2",
            b"chatloop:rooms",
            PRIVATE,
            now_ms.as_bytes(),
        ];
        self.command(&args, Pending::Ignore);
        let ttl = secs(self.cfg.session_ttl).to_string();
        let sessions: Vec<(SessionId, Rc<str>, UserId)> = self
            .sessions
            .iter()
            .map(|(id, s)| (*id, s.user.clone(), s.user_id))
            .collect();
        for (id, user, user_id) in sessions {
            let s = if reassert {
                self.write_session(id, &user, user_id)
            } else {
                key("s:", id)
            };
            let sr = key("sr:", id);
            for k in [s, sr] {
                self.command(&[b"EXPIRE", k.as_bytes(), ttl.as_bytes()], Pending::Ignore);
            }
        }
        if reassert {
            // Rooms with members here exist, whatever Redis remembers.
            let rooms: Vec<RoomId> = self.members.keys().copied().collect();
            for room in rooms {
                let sessions: Vec<SessionId> =
                    self.members[&room].iter().map(|m| m.session).collect();
                for s in sessions {
                    self.remember(s, room, &ttl);
                }
            }
        }
    }

    fn unsubscribe(&mut self, room: RoomId) {
        if self.subs.remove(&room).is_some() {
            let channel = key("m:", room);
            self.command_push(&[b"UNSUBSCRIBE", channel.as_bytes()]);
        }
    }

    fn on_frame(&mut self, frame: OwnedFrame, now: Now) -> bool {
        if let OwnedFrame::Push { data, .. } = frame {
            self.on_push(data);
            return true;
        }
        let Some((p, cost)) = self.pending.pop_front() else {
            log::warn!("Redis sent a reply nobody asked for: reconnecting");
            return false;
        };
        self.queued -= cost;
        self.answered += 1;
        match p {
            Pending::Ignore => {
                if let Some(e) = error_text(&frame) {
                    log::warn!("Redis refused a write: {}", redis_error(&e));
                }
            }
            Pending::Publish { room, id, json } => {
                let echoed = !self.awaiting.remove(&id);
                if let Some(e) = error_text(&frame) {
                    log::warn!("Redis refused a message: {}", redis_error(&e));
                    if !echoed {
                        self.events.push(Event::Unconfirmed { room, id, json });
                    }
                }
            }
            Pending::Hello => {
                if let Some(e) = error_text(&frame) {
                    log::error!(
                        "Redis refused the connection handshake: {}",
                        redis_error(&e)
                    );
                    return false;
                }
            }
            Pending::Topology => {
                // One Redis answers an error (cluster support disabled): nothing to check.
                if error_text(&frame).is_none() {
                    let asked = slots::Addr {
                        host: String::new(),
                        port: 1,
                    };
                    match slots::SlotMap::from_cluster_slots(&frame, &asked) {
                        Ok(map) if map.nodes.len() > 1 => {
                            log::error!(
                                "Redis is a Redis Cluster of {} masters: chatloop supports one \
                                 Redis or a Redis Cluster of one master, not a sharded one yet \
                                 (docs/cluster.md); staying degraded",
                                map.nodes.len()
                            );
                            return false;
                        }
                        Ok(_) => {}
                        Err(why) => {
                            log::warn!("Redis answered CLUSTER SLOTS with {why}: reconnecting");
                            return false;
                        }
                    }
                }
                self.became_up(now);
            }
            Pending::Score { now_ms } => {
                if let Some(e) = error_text(&frame) {
                    log::warn!("Redis answered a room lookup with {}", redis_error(&e));
                }
                self.score = Some(live_score(&frame, now_ms));
            }
            Pending::Fetch {
                token,
                serial,
                query,
            } => match decode_answer(query, frame, self.score.take().unwrap_or(false)) {
                Ok(answer) => self.events.push(Event::Answer {
                    token,
                    serial,
                    query,
                    answer,
                }),
                Err(e) => {
                    log::warn!("Redis answered {query:?} with {}", redis_error(&e));
                    self.events.push(Event::Failed { token, serial });
                }
            },
            Pending::SessionRooms {
                token,
                serial,
                session,
                now_ms,
            } => {
                if let Some(e) = error_text(&frame) {
                    log::warn!("Redis answered a session's rooms with {}", redis_error(&e));
                    self.events.push(Event::Failed { token, serial });
                    return true;
                }
                let rooms: Vec<RoomId> = list_items(frame)
                    .iter()
                    .filter_map(|r| std::str::from_utf8(r).ok().and_then(RoomId::parse))
                    .collect();
                if rooms.is_empty() {
                    self.events.push(Event::Answer {
                        token,
                        serial,
                        query: Query::SessionRooms(session),
                        answer: Answer::Rooms(Vec::new()),
                    });
                    return true;
                }
                let mut args: Vec<Vec<u8>> = Vec::with_capacity(2 + rooms.len());
                args.push(b"ZMSCORE".to_vec());
                args.push(b"chatloop:rooms".to_vec());
                args.extend(rooms.iter().map(|r| r.hex().to_vec()));
                let scores = Pending::RoomScores {
                    token,
                    serial,
                    session,
                    now_ms,
                    rooms,
                };
                self.command_owned(&args, scores);
            }
            Pending::RoomScores {
                token,
                serial,
                session,
                now_ms,
                rooms,
            } => {
                if let Some(e) = error_text(&frame) {
                    log::warn!("Redis answered room scores with {}", redis_error(&e));
                    self.events.push(Event::Failed { token, serial });
                    return true;
                }
                let scores = match frame {
                    OwnedFrame::Array { data, .. } => data,
                    _ => Vec::new(),
                };
                let live = rooms
                    .into_iter()
                    .zip(scores)
                    .filter(|(_, s)| live_score(s, now_ms))
                    .map(|(r, _)| r)
                    .collect();
                self.events.push(Event::Answer {
                    token,
                    serial,
                    query: Query::SessionRooms(session),
                    answer: Answer::Rooms(live),
                });
            }
            Pending::Expired(room) => {
                for e in list_items(frame) {
                    if let Some((user, user_id)) = presence_user(&e)
                        && !e.starts_with(&self.node)
                    {
                        self.events.push(Event::Departed {
                            room,
                            user,
                            user_id,
                        });
                    }
                }
            }
            Pending::Load { for_request, room } => {
                if let Some(e) = error_text(&frame) {
                    // Not a history (LOADING after a restart, WRONGTYPE, ...): taking it for
                    // an empty one would wipe this node's copy. Try again on a new link.
                    log::warn!(
                        "Redis answered a history load with {}: reconnecting",
                        redis_error(&e)
                    );
                    return false;
                }
                if let Some(Sub::Loading(buffered)) = self.subs.get_mut(&room) {
                    let buffered = std::mem::take(buffered);
                    let mut messages: Vec<(MsgId, Vec<u8>)> = list_items(frame)
                        .into_iter()
                        .filter_map(|e| split_entry(&e))
                        .collect();
                    let loaded: HashSet<MsgId> = messages.iter().map(|(m, _)| *m).collect();
                    for (id, json) in buffered {
                        if !loaded.contains(&id) {
                            messages.push((id, json));
                        }
                    }
                    self.subs.insert(room, Sub::Live);
                    self.events.push(Event::Loaded {
                        room,
                        messages,
                        catch_up: for_request.is_none(),
                    });
                }
                if let Some(ConnHandle { token, serial }) = for_request {
                    self.events.push(Event::Answer {
                        token,
                        serial,
                        query: Query::Subscribe(room),
                        answer: Answer::Done,
                    });
                }
            }
        }
        true
    }

    fn became_up(&mut self, now: Now) {
        log::info!("connected to Redis as node {}", self.node());
        self.link = Link::Up;
        self.backoff = BACKOFF_MIN;
        self.command_push(&[b"SUBSCRIBE", CTL]);
        // Rooms with members here, and rooms loaded for a join that did not happen (their
        // copy in the hub counts as current, so it must be current again).
        let mut rooms: Vec<RoomId> = self
            .members
            .keys()
            .chain(self.subs.keys())
            .copied()
            .collect();
        rooms.sort_unstable();
        rooms.dedup();
        for room in rooms {
            // Members here missed what other nodes stored meanwhile: load the room again
            // (pushes that arrive in between are merged by id, as on a first join).
            self.subs.insert(room, Sub::Loading(VecDeque::new()));
            let channel = key("m:", room);
            self.command_push(&[b"SUBSCRIBE", channel.as_bytes()]);
            let key = key("h:", room);
            let load = Pending::Load {
                for_request: None,
                room,
            };
            self.command(&[b"LRANGE", key.as_bytes(), b"0", b"-1"], load);
        }
        self.heartbeat(now, true);
        self.events.push(Event::Up);
    }

    fn on_push(&mut self, data: Vec<OwnedFrame>) {
        let mut it = data.into_iter();
        let (Some(kind), Some(channel), Some(payload)) = (it.next(), it.next(), it.next()) else {
            return;
        };
        if blob(&kind) != Some(b"message") {
            return; // subscribe / unsubscribe confirmations
        }
        let (Some(channel), Some(payload)) = (blob(&channel), into_blob(payload)) else {
            return;
        };
        if channel == CTL {
            if let Some(id) = payload
                .strip_prefix(b"E")
                .and_then(|s| std::str::from_utf8(s).ok())
                .and_then(SessionId::parse)
            {
                self.events.push(Event::SessionEnded(id));
            }
            return;
        }
        let Some(room) = channel
            .strip_prefix(b"chatloop:{r:")
            .and_then(|r| r.strip_suffix(b"}:m"))
            .and_then(|r| std::str::from_utf8(r).ok())
            .and_then(RoomId::parse)
        else {
            return;
        };
        match payload.first() {
            Some(b'H') => {
                let Some((id, json)) = split_entry(&payload[1..]) else {
                    return;
                };
                // Its echo confirms an event this node published.
                self.awaiting.remove(&id);
                match self.subs.get_mut(&room) {
                    Some(Sub::Loading(buf)) => {
                        if buf.len() >= self.cfg.history {
                            buf.pop_front();
                        }
                        buf.push_back((id, json));
                    }
                    Some(Sub::Live) => self.events.push(Event::Deliver { room, id, json }),
                    None => {}
                }
            }
            Some(b'T')
                if payload.len() >= 17 && matches!(self.subs.get(&room), Some(Sub::Live)) =>
            {
                let (node, conn, json) = (&payload[1..9], &payload[9..17], &payload[17..]);
                let except = (node == self.node)
                    .then(|| std::str::from_utf8(conn).ok())
                    .flatten()
                    .and_then(|c| u32::from_str_radix(c, 16).ok())
                    .filter(|c| *c != u32::MAX)
                    .map(|c| ConnId(c as usize));
                self.events.push(Event::Typing {
                    room,
                    except,
                    json: json.to_vec(),
                });
            }
            _ => {}
        }
    }

    /// Encodes a command whose reply is `pending`.
    fn command(&mut self, args: &[&[u8]], pending: Pending) {
        if self.pending.is_empty() {
            self.last_progress = self.clock;
        }
        let before = self.out.len();
        self.encode(args);
        let copy = match &pending {
            Pending::Publish { json, .. } => json.len(),
            _ => 0,
        };
        let cost = self.out.len() - before + copy + PENDING_COST;
        self.queued += cost;
        self.pending.push_back((pending, cost));
        self.sent += 1;
    }

    fn command_owned(&mut self, args: &[Vec<u8>], pending: Pending) {
        let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        self.command(&args, pending);
    }

    /// Encodes a (un)subscribe, which RESP3 answers with a push, not a reply.
    fn command_push(&mut self, args: &[&[u8]]) {
        self.encode(args);
    }

    fn encode(&mut self, args: &[&[u8]]) {
        let parts: Vec<BorrowedFrame<'_>> = args
            .iter()
            .map(|a| BorrowedFrame::BlobString {
                data: a,
                attributes: None,
            })
            .collect();
        let frame = BorrowedFrame::Array {
            data: &parts,
            attributes: None,
        };
        let at = self.out.len();
        self.out.resize(at + frame.encode_len(false), 0);
        match encode_borrowed(&mut self.out[at..], &frame, false) {
            Ok(n) => self.out.truncate(at + n),
            Err(e) => {
                // Cannot happen with a buffer of encode_len bytes; never send half a command.
                log::error!("could not encode a Redis command: {e:?}");
                self.out.truncate(at);
            }
        }
    }
}

/// A Redis key or channel of a room or a session: `chatloop:{r:ROOM}:h`,
/// `chatloop:{s:SESSION}:sr`. The part in braces is the hash tag, so every key of one room
/// (and of one session) lives in one hash slot of a Redis Cluster, as a script's keys must,
/// while rooms and sessions spread over the shards; one Redis ignores the braces.
fn key(kind: &str, id: impl std::fmt::Display) -> String {
    let name = kind.trim_end_matches(':');
    let tag = if matches!(name, "s" | "sr") { "s" } else { "r" };
    format!("{PREFIX}{{{tag}:{id}}}:{name}")
}

/// The fields of a room's settings hash: `i` the invite's SHA-256 in hex, `t` the
/// `message_ttl` in ms.
fn settings_fields(s: &RoomSettings) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(4);
    if let Some(h) = &s.invite {
        out.push(b"i".to_vec());
        out.push(hex32(h).to_vec());
    }
    if let Some(t) = s.message_ttl {
        out.push(b"t".to_vec());
        out.push(ms(t).to_string().into_bytes());
    }
    out
}

fn hex32(h: &[u8; 32]) -> [u8; 64] {
    let mut out = [0u8; 64];
    for (i, b) in h.iter().enumerate() {
        out[2 * i] = b"0123456789abcdef"[usize::from(b >> 4)];
        out[2 * i + 1] = b"0123456789abcdef"[usize::from(b & 0xf)];
    }
    out
}

/// Reads a settings hash (`HGETALL`). Hostile bytes never make a room more open: an `i`
/// that is not 64 hex digits still makes the room private (with an invite nobody has), a
/// `t` that is not a number of ms within a year is taken as the shortest lifetime, 1 s.
fn read_settings(pairs: Vec<(OwnedFrame, OwnedFrame)>) -> RoomSettings {
    let mut s = RoomSettings::default();
    for (k, v) in pairs {
        let v = into_blob(v).unwrap_or_default();
        match blob(&k) {
            Some(b"i") => {
                let mut h = [0u8; 32];
                let ok = v.len() == 64
                    && v.chunks(2).zip(h.iter_mut()).all(|(pair, out)| {
                        std::str::from_utf8(pair)
                            .ok()
                            .and_then(|t| u8::from_str_radix(t, 16).ok())
                            .map(|b| *out = b)
                            .is_some()
                    });
                // An invite's hash is never all zeros (SHA-256): a garbled one matches none.
                s.invite = Some(if ok { h } else { [0u8; 32] });
            }
            Some(b"t") => {
                const YEAR_MS: u64 = 366 * 24 * 3600 * 1000;
                let t = std::str::from_utf8(&v)
                    .ok()
                    .and_then(|t| t.parse::<u64>().ok())
                    .filter(|t| (1..=YEAR_MS).contains(t))
                    .unwrap_or(1000);
                s.message_ttl = Some(Micros(t * 1000));
            }
            _ => {}
        }
    }
    s
}

fn secs(d: Micros) -> u64 {
    d.0.div_ceil(1_000_000).max(1)
}

fn ms(d: Micros) -> u64 {
    d.0 / 1000
}

fn blob(f: &OwnedFrame) -> Option<&[u8]> {
    match f {
        OwnedFrame::BlobString { data, .. } | OwnedFrame::SimpleString { data, .. } => Some(data),
        _ => None,
    }
}

fn into_blob(f: OwnedFrame) -> Option<Vec<u8>> {
    match f {
        OwnedFrame::BlobString { data, .. } | OwnedFrame::SimpleString { data, .. } => Some(data),
        _ => None,
    }
}

/// A Redis error for the log: its text up to the first quote. Redis quotes arguments in some
/// errors (`ERR unknown command 'EVAL', with args beginning with: ...`), and arguments hold
/// chat, names and session ids; what comes before the quote says what went wrong.
fn redis_error(e: &str) -> &str {
    let end = e
        .char_indices()
        .find(|&(i, c)| c == '\'' || c == '"' || c == '`' || i >= 120)
        .map_or(e.len(), |(i, _)| i);
    let cut = e[..end].trim_end();
    if cut.is_empty() { "an error" } else { cut }
}

fn error_text(f: &OwnedFrame) -> Option<String> {
    match f {
        OwnedFrame::SimpleError { data, .. } => Some(data.clone()),
        OwnedFrame::BlobError { data, .. } => Some(String::from_utf8_lossy(data).into_owned()),
        _ => None,
    }
}

/// The strings of an array reply, or of a set (`SMEMBERS` answers a RESP3 set).
fn list_items(f: OwnedFrame) -> Vec<Vec<u8>> {
    match f {
        OwnedFrame::Array { data, .. } => data.into_iter().filter_map(into_blob).collect(),
        OwnedFrame::Set { data, .. } => data.into_iter().filter_map(into_blob).collect(),
        _ => Vec::new(),
    }
}

/// `{36-character id}{json}` as stored in history and published.
fn split_entry(e: &[u8]) -> Option<(MsgId, Vec<u8>)> {
    let id = std::str::from_utf8(e.get(..36)?)
        .ok()
        .and_then(MsgId::parse)?;
    Some((id, e[36..].to_vec()))
}

/// Reads a presence entry `node:conn:user_id:user`.
fn presence_user(e: &[u8]) -> Option<(String, UserId)> {
    let s = std::str::from_utf8(e).ok()?;
    let mut parts = s.splitn(4, ':');
    let (_node, _conn) = (parts.next()?, parts.next()?);
    let uid = u32::from_str_radix(parts.next()?, 16).ok()?;
    Some((parts.next()?.to_string(), UserId(uid)))
}

/// The field-value pairs of a map reply (RESP3), or of a flat array (RESP2 form).
fn map_pairs(frame: OwnedFrame) -> Vec<(OwnedFrame, OwnedFrame)> {
    match frame {
        OwnedFrame::Map { data, .. } => data.into_iter().collect(),
        OwnedFrame::Array { data, .. } => {
            let mut it = data.into_iter();
            let mut v = Vec::new();
            while let (Some(k), Some(val)) = (it.next(), it.next()) {
                v.push((k, val));
            }
            v
        }
        _ => Vec::new(),
    }
}

/// Whether a registry score (RESP3 double, or its text) is after `now_ms`.
fn live_score(f: &OwnedFrame, now_ms: u64) -> bool {
    match f {
        OwnedFrame::Double { data, .. } => *data > now_ms as f64,
        OwnedFrame::BlobString { data, .. } => std::str::from_utf8(data)
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .is_some_and(|s| s > now_ms as f64),
        _ => false,
    }
}

/// `score`: for [`Query::RoomExists`], whether the registry's score (read just before) is
/// in the future.
fn decode_answer(query: Query, frame: OwnedFrame, score: bool) -> Result<Answer, String> {
    if let Some(e) = error_text(&frame) {
        return Err(e);
    }
    Ok(match query {
        Query::Session(_) => {
            let mut user = None;
            let mut uid = None;
            for (k, v) in map_pairs(frame) {
                match blob(&k) {
                    Some(b"u") => user = into_blob(v).and_then(|b| String::from_utf8(b).ok()),
                    Some(b"i") => {
                        uid = into_blob(v)
                            .and_then(|b| String::from_utf8(b).ok())
                            .and_then(|s| u32::from_str_radix(&s, 16).ok())
                    }
                    _ => {}
                }
            }
            Answer::Session(user.zip(uid.map(UserId)))
        }
        Query::RoomExists(_) => {
            let settings = read_settings(map_pairs(frame));
            Answer::Room(score.then_some(settings))
        }
        Query::Member(..) => Answer::Member(matches!(frame, OwnedFrame::Number { data: 1, .. })),
        Query::UserCount(_) => Answer::Count(match frame {
            OwnedFrame::Number { data, .. } => usize::try_from(data).unwrap_or(0),
            _ => 0,
        }),
        Query::Presence(_) => Answer::Users(
            list_items(frame)
                .iter()
                .filter_map(|e| presence_user(e))
                .collect(),
        ),
        Query::AllRooms | Query::SessionRooms(_) => Answer::Rooms(
            list_items(frame)
                .iter()
                .filter_map(|r| std::str::from_utf8(r).ok().and_then(RoomId::parse))
                .collect(),
        ),
        Query::History(..) => Answer::Messages(
            list_items(frame)
                .into_iter()
                .filter_map(|e| split_entry(&e).map(|(_, j)| j))
                .collect(),
        ),
        Query::Subscribe(_) => Answer::Done,
    })
}

#[cfg(test)]
mod tests;
