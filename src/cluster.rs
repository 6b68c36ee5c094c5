//! Cluster mode: the Redis side of chatloop as a pure state machine (no sockets, no clock).
//!
//! Several chatloop nodes that share one Redis behave as one server. What lives where:
//!
//! | key (prefix `chatloop:`) | type | what | expiry |
//! |---|---|---|---|
//! | `{s:SESSION}:s` | hash `u`, `i` | username, user id | `--session-ttl`, slid on every use |
//! | `{s:SESSION}:sr` | set | the session's rooms | as the session |
//! | `{r:ROOM}:e` | string | the room exists (the registry) | `PXAT` the room's expiry, pushed forward while a node has members |
//! | `rooms` | sorted set | room id → expiry (Unix ms), only with `--room-list` (`GET /rooms/all`) | pruned by heartbeats |
//! | `{r:ROOM}:rm` | hash `i`, `t` | a private room's invite SHA-256 (hex), a `message_ttl` (ms); only for rooms that have either | as `{r:ROOM}:h`; written before `{r:ROOM}:e` |
//! | `private{chatloop:rooms}` | set | private room ids (left out of `GET /rooms/all`), only with `--room-list`; tagged into the slot of `rooms`, which scripts read with it | pruned with `rooms` |
//! | `{r:ROOM}:h` | list | the last `--history` chat messages and the presence notices among them (`id` + JSON) | room TTL after the last refresh |
//! | `{r:ROOM}:hn` | list | the notices in `{r:ROOM}:h`, oldest first, at most `--history-notices` | as `{r:ROOM}:h` |
//! | `{r:ROOM}:p` | sorted set | `node:conn:user_id:user` → expiry (Unix ms) | heartbeated every `--presence-ttl`/3 |
//! | channel `{r:ROOM}:m` | sharded pub/sub (`SSUBSCRIBE`, `SPUBLISH`) | `H{id}{json}` history events, `T{node}{conn}{json}` typing | subscribed while the node has members there |
//! | channel `ctl` | pub/sub | `E{session}`: a session ended | always subscribed |
//!
//! The part in braces is a hash tag: in a Redis Cluster every key of one room (and of one
//! session) is in one hash slot, so each script touches one slot ([`slots`] has the
//! cluster's pure pieces).
//!
//! One RESP3 connection per Redis master ([`RedisLink`]; one in all for one Redis) carries
//! commands (pipelined, answered in order) and pub/sub pushes, so a `SSUBSCRIBE` followed by
//! `LRANGE` on the connection of the room's shard sees every message exactly once: pushes that arrive before the `LRANGE` reply are buffered and de-duplicated by id.
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
//! The event loop feeds this module bytes from Redis ([`Cluster::on_bytes`]), connection changes
//! and time; the hub's [`Op`]s become commands in each link's [`RedisLink::out`]; what the loop
//! must do comes back as [`Event`]s. A request that needs facts from Redis (a session this node has
//! not seen, a room's presence, ...) asks with [`Cluster::fetch`] and is answered by
//! [`Event::Answer`].

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
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
    /// `--room-ttl`: how long a room without members stays registered.
    pub room_ttl: Micros,
    /// `--session-ttl`: sliding lifetime of a session's keys.
    pub session_ttl: Micros,
    /// Chat messages kept per room.
    pub history: usize,
    /// Presence notices kept per room besides them (`--history-notices`).
    pub history_notices: usize,
    /// `--presence-ttl`: a member whose node stops heartbeating leaves after this long.
    pub presence_ttl: Micros,
    /// The database selected after connecting (the URL's `/db`; a Redis Cluster has only 0).
    pub db: u32,
    /// The ACL user name (`None`: the default user).
    pub user: Option<String>,
    /// The password, sent only in `HELLO 3 AUTH`.
    pub password: Option<Secret>,
    /// What one reply from Redis may be (see [`resp`]).
    pub reply_limits: resp::Limits,
    /// Bytes queued toward Redis ([`Cluster::queued`]) beyond which Redis counts as down
    /// (`--max-redis-queue`).
    pub max_queue: usize,
    /// Where Redis is: one address (`redis://`), or a Redis Cluster's seeds
    /// (`redis-cluster://`); the first that answers says which masters serve which slots.
    pub seeds: Vec<slots::Addr>,
    /// `--room-list`: keep the index of rooms `GET /rooms/all` reads (`chatloop:rooms`).
    pub room_list: bool,
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
    /// [`Query::Session`]: the name and user id, or `None` for no such session.
    Session(Option<(String, UserId)>),
    /// The room's settings if it exists.
    Room(Option<RoomSettings>),
    /// [`Query::Member`]: the room is among the session's rooms.
    Member(bool),
    /// [`Query::UserCount`]: WebSocket members on all nodes.
    Count(usize),
    /// [`Query::Presence`]: display name and user id of each member on all nodes.
    Users(Vec<(String, UserId)>),
    /// [`Query::SessionRooms`], [`Query::AllRooms`]: room ids.
    Rooms(Vec<RoomId>),
    /// Message JSON, oldest first.
    Messages(Vec<Vec<u8>>),
    /// [`Query::Subscribe`]: subscribed, the history is in the hub.
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
    /// The answer to `q`, if it has come.
    pub fn get(&self, q: Query) -> Option<&Answer> {
        self.items.iter().find(|(k, _)| *k == q).map(|(_, a)| a)
    }

    /// Records Redis's answer to `q`.
    pub fn add(&mut self, q: Query, a: Answer) {
        self.items.push((q, a));
    }

    /// Forgets everything (the request was answered or starts over).
    pub fn clear(&mut self) {
        self.items.clear();
        self.failed = false;
    }

    /// Nothing learnt and nothing failed.
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
        /// The parked connection's slab index.
        token: usize,
        /// Its serial, so that a successor in the same slot is not answered.
        serial: u32,
        /// What was asked.
        query: Query,
        /// Redis's answer.
        answer: Answer,
    },
    /// Redis went away before answering the request parked on `token`.
    Failed {
        /// The parked connection's slab index.
        token: usize,
        /// Its serial, so that a successor in the same slot is not answered.
        serial: u32,
    },
    /// A history event for the room's local members.
    Deliver {
        /// The room.
        room: RoomId,
        /// The event's id.
        id: MsgId,
        /// The event's JSON (a frame's payload).
        json: Vec<u8>,
    },
    /// A typing event for the room's local members (but `except`).
    Typing {
        /// The room.
        room: RoomId,
        /// The sender's connection if it is on this node (it gets no copy); `None` otherwise.
        except: Option<ConnId>,
        /// The `typing` / `typing_stopped` JSON.
        json: Vec<u8>,
    },
    /// The room's history as Redis has it, plus what arrived while it loaded. `catch_up`:
    /// after a reconnect, for a room with members here (send them what they missed).
    Loaded {
        /// The room.
        room: RoomId,
        /// Id and JSON of each history entry, oldest first.
        messages: Vec<(MsgId, Vec<u8>)>,
        /// After a reconnect, for a room with members here: send them what they missed.
        catch_up: bool,
    },
    /// A member of another node whose presence expired (that node is gone): this node won
    /// the removal, so it announces `user_left` (exactly one node does).
    Departed {
        /// The room.
        room: RoomId,
        /// The departed member's display name.
        user: String,
        /// The departed member's user id.
        user_id: UserId,
    },
    /// A session ended on some node: close its sockets here with 1000.
    SessionEnded(SessionId),
    /// A history event this node wrote that Redis did not confirm (the link went down
    /// first, Redis refused it, or it was written while Redis was unusable), and whose echo
    /// never came back: nobody here has seen it, and other nodes may or may not have.
    Unconfirmed {
        /// The room.
        room: RoomId,
        /// The event's id.
        id: MsgId,
        /// The event's JSON.
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
    /// `HELLO` and `SELECT` on the first link.
    Hello,
    /// `HELLO` on the link to one master of a sharded cluster: the link is ready.
    Ready,
    /// `ASKING` before a command sent where an `ASK` redirection pointed.
    Asking,
    /// `CLUSTER SLOTS`, the last command of the first link's handshake: one Redis (an
    /// error), a cluster of one master (served on that link), or several masters (one link
    /// per master, made next).
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
    /// `LRANGE` of a room's history after `SSUBSCRIBE`: for a parked join (`for_request`),
    /// or to catch up after a reconnect or a moved slot.
    Load {
        for_request: Option<ConnHandle>,
        room: RoomId,
    },
    /// `SSUBSCRIBE` to a room's channel: answered by the `ssubscribe` push (or an error,
    /// such as `MOVED`, as a reply).
    Subscribe(RoomId),
    /// `SUNSUBSCRIBE`: answered by the `sunsubscribe` push.
    Unsubscribe(RoomId),
    /// The presence entries this heartbeat found expired (and removed).
    Expired(RoomId),
    /// `SMEMBERS` of a session's rooms for [`Query::SessionRooms`]; whether each still
    /// exists is asked next ([`Pending::Alive`]), each on its room's shard.
    SessionRooms {
        token: usize,
        serial: u32,
        session: SessionId,
    },
    /// `EXISTS` of the registry key of the room at `index` of the gathering `gather`.
    Alive {
        gather: u64,
        index: usize,
    },
}

/// One command waiting for its reply on a link.
#[derive(Debug)]
struct Waiting {
    pending: Pending,
    /// What it costs until answered (see `Cluster::queued`).
    cost: usize,
    /// Its place in the order commands were queued (0: not counted, `ASKING`).
    seq: u64,
    /// The hash slot of its first key; `None` for commands without keys.
    slot: Option<u16>,
    /// Its encoding, kept (on a sharded cluster only) to send it again where a redirection
    /// points.
    cmd: Option<Vec<u8>>,
    /// Redirections followed so far (bounded: [`MAX_REDIRECTS`]).
    redirects: u8,
}

/// One connection to a Redis node (one Redis, or a master of a Redis Cluster).
#[derive(Debug)]
pub struct RedisLink {
    /// Where it goes.
    pub addr: slots::Addr,
    /// A link made anew gets a new epoch: a socket of an older epoch is stale.
    pub epoch: u64,
    /// Encoded commands not yet written to the socket.
    pub out: Vec<u8>,
    inbuf: Vec<u8>,
    /// Where the scan of the reply at the front of `inbuf` stands.
    scanner: resp::Scanner,
    /// The commands sent and not answered yet, in order.
    pending: VecDeque<Waiting>,
    /// Its handshake is done.
    ready: bool,
    /// When it last answered, or when it was last asked with nothing outstanding.
    last_progress: Micros,
}

impl RedisLink {
    fn new(addr: slots::Addr, epoch: u64) -> RedisLink {
        RedisLink {
            addr,
            epoch,
            out: Vec::new(),
            inbuf: Vec::new(),
            scanner: resp::Scanner::default(),
            pending: VecDeque::new(),
            ready: false,
            last_progress: Micros::ZERO,
        }
    }
}

/// The commands of a slot held back after a redirection: they go out again, in the order
/// they were first queued, once no command of that slot is in flight on any link (and the
/// `TRYAGAIN` delay has passed), so that a room's writes keep their order across a move.
#[derive(Debug, Default)]
struct Blocked {
    /// Commands of the slot still in flight (each answers or is redirected in turn).
    inflight: usize,
    /// Held commands, each with the link an `ASK` named.
    waiting: Vec<(Waiting, Option<usize>)>,
    retry_at: Micros,
}

/// [`Query::SessionRooms`] asked of several shards: whether each room still exists.
struct Gather {
    token: usize,
    serial: u32,
    session: SessionId,
    rooms: Vec<RoomId>,
    alive: Vec<bool>,
    left: usize,
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
const PENDING_COST: usize = std::mem::size_of::<Waiting>();
/// Redirections (`MOVED`, `ASK`, `TRYAGAIN`) one command may follow before it counts as
/// failed: a broken or hostile cluster cannot keep a command (or the loop) going round.
const MAX_REDIRECTS: u8 = 16;
/// How long a command answered `TRYAGAIN` (its slot is half migrated) waits before it goes
/// out again.
const TRYAGAIN_DELAY: Micros = Micros(50_000);
/// Links a node keeps: the first, plus one per master of a sharded cluster.
pub const MAX_LINKS: usize = slots::MAX_NODES + 1;
/// The registry of live rooms `GET /rooms/all` lists (only with `--room-list`); a room's
/// existence is its own key, `chatloop:{r:ROOM}:e`.
const ROOMS: &[u8] = b"chatloop:rooms";

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
/// `ARGV[7]`, the node's Unix ms). The room's channel, `ARGV[8]`, is not among `KEYS`: a
/// channel is never a key, and a declared key that does not exist makes Redis Cluster answer
/// `TRYAGAIN` while the room's slot migrates; the channel is in the room's slot all the same.
const PUBLISH: &str = concat!(
    "local h, n = KEYS[1], KEYS[2] ",
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
return redis.call('SPUBLISH', ARGV[8], 'H' .. ARGV[1])"
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

/// [`Query::RoomExists`]: whether the room's registry key is there (it expires with the
/// room), and its settings.
const ROOM_LOOKUP: &str = "return {redis.call('EXISTS', KEYS[1]), redis.call('HGETALL', KEYS[2])}";

/// [`Query::AllRooms`]: live rooms that are not private.
const PUBLIC_ROOMS: &str = "local out = {} \
for _, r in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf')) do \
if redis.call('SISMEMBER', KEYS[2], r) == 0 then out[#out + 1] = r end end \
return out";

/// The set of private room ids, with `--room-list` only. Its hash tag puts it in the slot of
/// `chatloop:rooms` (a key without braces hashes whole), since the scripts that list and
/// prune rooms read both.
const PRIVATE: &[u8] = b"chatloop:private{chatloop:rooms}";

/// Removes a room's expired presence entries and returns them: the one node whose script
/// removed an entry announces that member's `user_left`.
const EXPIRE_PRESENCE: &str = "local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1]) \
if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1]) end \
return gone";

/// Cluster mode's Redis side as a pure state machine: the link's state, the commands queued
/// for Redis (each [`RedisLink::out`]) and what each reply will mean, the rooms subscribed,
/// this node's members and sessions as Redis must know them. Bytes and time in, [`Event`]s out.
pub struct Cluster {
    cfg: ClusterConfig,
    node: [u8; 8],
    link: Link,
    backoff: Micros,
    /// The connections: the first to a seed (handshake, `CLUSTER SLOTS`, the `ctl`
    /// channel, commands without keys, and every command when Redis is not sharded), then
    /// one per master of a sharded cluster (`map.nodes[i]` is `links[i + 1]`).
    pub links: Vec<RedisLink>,
    /// Which master serves each slot, for a sharded cluster (several masters).
    map: Option<slots::SlotMap>,
    /// The seed the next connection tries (each failure moves on to the next).
    seed: usize,
    epochs: u64,
    /// Sequence numbers of the commands not answered yet.
    outstanding: BTreeSet<u64>,
    /// Slots whose commands are held back after a redirection.
    blocked: HashMap<u16, Blocked>,
    gathers: HashMap<u64, Gather>,
    next_gather: u64,
    scratch: Vec<u8>,
    /// Bytes of the commands pending (their encoding, and a history event's copy).
    queued: usize,
    /// Ids of `Pending::Publish` events neither answered nor echoed yet.
    awaiting: HashSet<MsgId>,
    /// A write was not queued because the queue was full: the link must be dropped even if
    /// replies shrink the queue meanwhile (a response held for that write must not go out).
    overflowed: bool,
    sent: u64,
    subs: HashMap<RoomId, Sub>,
    members: HashMap<RoomId, Vec<LocalMember>>,
    /// Settings of the rooms with members here that have any (rewritten after Redis came
    /// back empty, so that a private room never comes back public).
    settings: HashMap<RoomId, RoomSettings>,
    sessions: HashMap<SessionId, LocalSession>,
    next_heartbeat: Micros,
    /// The latest time this module was told (for commands, which take no time argument).
    clock: Micros,
    events: Vec<Event>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("link", &self.link)
            .field("sent", &self.sent)
            .field("answered", &self.answered())
            .field("links", &self.links.len())
            .field("queued", &self.queued)
            .field("rooms", &self.subs.len())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// A cluster side, not connected yet (due to connect at once); `node_id` tells this node's
    /// messages and presence from other nodes' (8 hex characters on the wire).
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
            links: Vec::new(),
            map: None,
            seed: 0,
            epochs: 0,
            outstanding: BTreeSet::new(),
            blocked: HashMap::new(),
            gathers: HashMap::new(),
            next_gather: 0,
            scratch: Vec::new(),
            queued: 0,
            awaiting: HashSet::new(),
            overflowed: false,
            sent: 0,
            subs: HashMap::new(),
            members: HashMap::new(),
            settings: HashMap::new(),
            sessions: HashMap::new(),
            next_heartbeat: Micros::MAX,
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

    /// Redis is usable: the handshake is done on every master's link and commands flow.
    pub fn is_up(&self) -> bool {
        self.link == Link::Up
    }

    /// Bytes queued toward Redis: those of the commands not yet answered, from when they are
    /// queued (their encoding and bookkeeping), or the bytes not yet written if that is more
    /// (subscriptions are written but never answered).
    pub fn queued(&self) -> usize {
        let unwritten: usize = self.links.iter().map(|l| l.out.len()).sum();
        self.queued.max(unwritten)
    }

    /// The link `i`'s address and epoch, if the loop should keep a socket for it.
    pub fn link(&self, i: usize) -> Option<(&slots::Addr, u64)> {
        self.links.get(i).map(|l| (&l.addr, l.epoch))
    }

    /// Links the loop should keep (connecting or connected).
    pub fn link_count(&self) -> usize {
        self.links.len()
    }

    /// Masters served, 0 before the first handshake (1 for one Redis).
    pub fn shards(&self) -> usize {
        match &self.map {
            Some(m) => m.nodes.len(),
            None => usize::from(!self.links.is_empty()),
        }
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
            self.outstanding.len(),
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

    /// The number of the last command up to which every command has been answered (all that
    /// were sent when none is outstanding; links to several masters answer out of order).
    pub fn answered(&self) -> u64 {
        self.outstanding
            .first()
            .map_or(self.sent, |first| first.saturating_sub(1))
    }

    /// Takes the events produced so far, in order.
    pub fn drain_events(&mut self) -> std::vec::Drain<'_, Event> {
        self.events.drain(..)
    }

    /// Events are waiting for [`Cluster::drain_events`].
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// When [`Cluster::on_timer`] has work.
    pub fn poll_timeout(&self) -> Option<Micros> {
        match self.link {
            Link::Down { retry_at } => Some(retry_at),
            Link::Connecting { since } => Some(since + CONNECT_TIMEOUT),
            Link::Up => {
                let silent = self
                    .links
                    .iter()
                    .filter(|l| !l.pending.is_empty())
                    .map(|l| l.last_progress + REPLY_TIMEOUT);
                let retry = self
                    .blocked
                    .values()
                    .filter(|b| b.inflight == 0)
                    .map(|b| b.retry_at);
                silent.chain(retry).chain([self.next_heartbeat]).min()
            }
        }
    }

    /// The link whose reply has been awaited longest without progress, if over the limit.
    fn silent_link(&self, now: Micros) -> bool {
        self.links
            .iter()
            .any(|l| !l.pending.is_empty() && now >= l.last_progress + REPLY_TIMEOUT)
    }

    /// Whether the loop should start connecting now; if so the link is `Connecting`.
    pub fn should_connect(&mut self, now: Now) -> bool {
        self.clock = now.mono;
        match self.link {
            Link::Down { retry_at } if now.mono >= retry_at => {
                self.link = Link::Connecting { since: now.mono };
                let seeds = &self.cfg.seeds;
                let Some(addr) = seeds.get(self.seed % seeds.len().max(1)).cloned() else {
                    return false;
                };
                self.seed = self.seed.wrapping_add(1);
                self.map = None;
                self.epochs += 1;
                self.links = vec![RedisLink::new(addr, self.epochs)];
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
            Link::Up if self.silent_link(now.mono) => {
                log::warn!(
                    "Redis has not answered for {} s: reconnecting",
                    REPLY_TIMEOUT.0 / 1_000_000
                );
                self.on_disconnected(now);
            }
            Link::Up => {
                self.release_due();
                if now.mono >= self.next_heartbeat {
                    self.heartbeat(now, false);
                }
            }
            _ => {}
        }
    }

    /// Link `i`'s TCP connection is open: say hello (RESP3, auth); on the first link also
    /// pick the database and ask for the slot map.
    pub fn on_connected(&mut self, i: usize) {
        let Some(l) = self.links.get_mut(i) else {
            return;
        };
        l.out.clear();
        l.inbuf.clear();
        l.scanner.reset();
        let mut hello: Vec<&[u8]> = vec![b"HELLO", b"3"];
        if let Some(p) = &self.cfg.password {
            hello.push(b"AUTH");
            hello.push(self.cfg.user.as_deref().unwrap_or("default").as_bytes());
            hello.push(p.expose().as_bytes());
        }
        let hello: Vec<Vec<u8>> = hello.into_iter().map(<[u8]>::to_vec).collect();
        let hello: Vec<&[u8]> = hello.iter().map(Vec::as_slice).collect();
        if i > 0 {
            self.command_on(i, &hello, Pending::Ready);
            return;
        }
        self.command_on(0, &hello, Pending::Hello);
        let db = self.cfg.db.to_string();
        self.command_on(0, &[b"SELECT", db.as_bytes()], Pending::Hello);
        self.command_on(0, &[b"CLUSTER", b"SLOTS"], Pending::Topology);
    }

    /// The connection failed or closed: fail what waits, go degraded, retry with backoff.
    pub fn on_disconnected(&mut self, now: Now) {
        let was_up = self.link == Link::Up;
        self.queued = 0;
        self.overflowed = false;
        let mut entries: Vec<Waiting> = Vec::new();
        for l in std::mem::take(&mut self.links) {
            entries.extend(l.pending);
        }
        for (_, b) in std::mem::take(&mut self.blocked) {
            entries.extend(b.waiting.into_iter().map(|(e, _)| e));
        }
        // In the order they were queued: unconfirmed events come back in that order.
        entries.sort_by_key(|e| e.seq);
        for g in std::mem::take(&mut self.gathers).into_values() {
            self.events.push(Event::Failed {
                token: g.token,
                serial: g.serial,
            });
        }
        for e in entries {
            match e.pending {
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
                Pending::SessionRooms { token, serial, .. } => {
                    self.events.push(Event::Failed { token, serial })
                }
                Pending::Load { .. }
                | Pending::Ignore
                | Pending::Hello
                | Pending::Ready
                | Pending::Asking
                | Pending::Topology
                | Pending::Subscribe(_)
                | Pending::Unsubscribe(_)
                | Pending::Alive { .. }
                | Pending::Expired(_) => {}
            }
        }
        self.awaiting.clear();
        self.outstanding.clear();
        self.map = None;
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
        self.on_link_bytes(0, data, now)
    }

    /// [`Cluster::on_bytes`] for link `i`.
    pub fn on_link_bytes(&mut self, i: usize, data: &[u8], now: Now) -> bool {
        self.clock = now.mono;
        let Some(l) = self.links.get_mut(i) else {
            return true;
        };
        l.last_progress = now.mono;
        let mut inbuf = std::mem::take(&mut l.inbuf);
        let mut scanner = std::mem::take(&mut l.scanner);
        inbuf.extend_from_slice(data);
        let mut pos = 0;
        let ok = loop {
            let len = match scanner.scan(&inbuf[pos..], &self.cfg.reply_limits) {
                resp::Scan::Incomplete => break true,
                resp::Scan::Invalid(why) => {
                    log::warn!("Redis sent a reply chatloop does not accept ({why}): reconnecting");
                    break false;
                }
                resp::Scan::Complete(len) => len,
            };
            match decode(&inbuf[pos..pos + len]) {
                Ok(Some((frame, used))) if used == len => {
                    pos += len;
                    if !self.on_frame(i, frame, now) {
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
            return false;
        }
        inbuf.drain(..pos);
        if inbuf.is_empty() && inbuf.capacity() > 1024 * 1024 {
            inbuf = Vec::new();
        }
        if let Some(l) = self.links.get_mut(i) {
            l.inbuf = inbuf;
            l.scanner = scanner;
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
                // The room's registry key and its settings: one slot, one script.
                let (e, rm) = (key("e:", r), key("rm:", r));
                let args: [&[u8]; 5] = [
                    b"EVAL",
                    ROOM_LOOKUP.as_bytes(),
                    b"2",
                    e.as_bytes(),
                    rm.as_bytes(),
                ];
                self.command(&args, fetch)
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
                };
                self.command(&[b"SMEMBERS", key.as_bytes()], members)
            }
            Query::AllRooms => {
                let args: [&[u8]; 6] = [
                    b"EVAL",
                    PUBLIC_ROOMS.as_bytes(),
                    b"2",
                    ROOMS,
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
                    self.command(&[b"SSUBSCRIBE", channel.as_bytes()], Pending::Subscribe(r));
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
                    if settings.is_private() && self.cfg.room_list {
                        self.command(&[b"SADD", PRIVATE, &room.hex()], Pending::Ignore);
                    }
                }
                self.register(room, now_ms, true);
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
                let (h, n, m) = (key("h:", room), key("hn:", room), key("m:", room));
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
                    b"2",
                    h.as_bytes(),
                    n.as_bytes(),
                    &entry,
                    keep.as_bytes(),
                    ttl.as_bytes(),
                    keep_notices.as_bytes(),
                    notice,
                    message_ttl.as_bytes(),
                    now.as_bytes(),
                    m.as_bytes(),
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
                self.command(&[b"SPUBLISH", m.as_bytes(), &msg], Pending::Ignore);
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
                    self.register(room, now_ms, false);
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
        self.register(room, now_ms, false);
    }

    /// The room's registry entry lives until now + the room TTL: its own key
    /// (`chatloop:{r:ROOM}:e`, expiring then; `create`: only if there is none), and with
    /// `--room-list` the index `GET /rooms/all` reads.
    fn register(&mut self, room: RoomId, now_ms: u64, create: bool) {
        let exp = (now_ms + ms(self.cfg.room_ttl)).to_string();
        let e = key("e:", room);
        let mut args: Vec<&[u8]> = vec![b"SET", e.as_bytes(), b"1", b"PXAT", exp.as_bytes()];
        if create {
            args.push(b"NX");
        }
        self.command(&args, Pending::Ignore);
        if self.cfg.room_list {
            let hex = room.hex();
            let how: &[u8] = if create { b"NX" } else { b"GT" };
            let args: [&[u8]; 5] = [b"ZADD", ROOMS, how, exp.as_bytes(), &hex];
            self.command(&args, Pending::Ignore);
        }
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
                if s.is_private() && self.cfg.room_list {
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
        if self.cfg.room_list {
            let args: [&[u8]; 6] = [
                b"EVAL",
                PRUNE_ROOMS.as_bytes(),
                b"2",
                ROOMS,
                PRIVATE,
                now_ms.as_bytes(),
            ];
            self.command(&args, Pending::Ignore);
        }
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
            self.command(
                &[b"SUNSUBSCRIBE", channel.as_bytes()],
                Pending::Unsubscribe(room),
            );
        }
    }

    fn on_frame(&mut self, i: usize, frame: OwnedFrame, now: Now) -> bool {
        if let OwnedFrame::Push { data, .. } = frame {
            self.on_push(i, data);
            return true;
        }
        let Some(entry) = self.links.get_mut(i).and_then(|l| l.pending.pop_front()) else {
            log::warn!("Redis sent a reply nobody asked for: reconnecting");
            return false;
        };
        if let Some(r) = error_text(&frame).and_then(|e| Redirection::parse(&e)) {
            return self.redirect(i, entry, r);
        }
        self.settle(&entry);
        match entry.pending {
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
            Pending::Ready => {
                if let Some(e) = error_text(&frame) {
                    log::error!(
                        "a Redis Cluster master refused the connection handshake: {}",
                        redis_error(&e)
                    );
                    return false;
                }
                if let Some(l) = self.links.get_mut(i) {
                    l.ready = true;
                }
                if self.link != Link::Up && self.links.iter().all(|l| l.ready) {
                    self.became_up(now);
                }
            }
            Pending::Asking => {}
            Pending::Topology => {
                // One Redis answers an error (cluster support disabled): nothing to check.
                if error_text(&frame).is_none() {
                    let Some(asked) = self.links.first().map(|l| l.addr.clone()) else {
                        return false;
                    };
                    match slots::SlotMap::from_cluster_slots(&frame, &asked) {
                        Ok(map) if map.nodes.len() > 1 => {
                            if map.unserved() > 0 {
                                log::warn!(
                                    "Redis Cluster: {} slots have no master (a failover under \
                                     way?): trying again",
                                    map.unserved()
                                );
                                return false;
                            }
                            log::info!(
                                "Redis is a Redis Cluster of {} masters: one link to each",
                                map.nodes.len()
                            );
                            for addr in &map.nodes {
                                self.epochs += 1;
                                self.links.push(RedisLink::new(addr.clone(), self.epochs));
                            }
                            self.map = Some(map);
                            if let Some(l) = self.links.first_mut() {
                                l.ready = true;
                            }
                            return true;
                        }
                        Ok(_) => {}
                        Err(why) => {
                            log::warn!("Redis answered CLUSTER SLOTS with {why}: reconnecting");
                            return false;
                        }
                    }
                }
                if let Some(l) = self.links.first_mut() {
                    l.ready = true;
                }
                self.became_up(now);
            }
            Pending::Subscribe(_) => {
                // Answered by a push; a reply is an error (a redirection was followed above).
                if let Some(e) = error_text(&frame) {
                    log::warn!(
                        "Redis refused a subscription: {}: reconnecting",
                        redis_error(&e)
                    );
                }
                return false;
            }
            Pending::Unsubscribe(_) => {}
            Pending::Alive { gather, index } => {
                let alive = matches!(frame, OwnedFrame::Number { data: 1, .. });
                let failed = error_text(&frame).is_some();
                self.gathered(gather, index, alive, failed);
            }
            Pending::Fetch {
                token,
                serial,
                query,
            } => match decode_answer(query, frame) {
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
            } => {
                if let Some(e) = error_text(&frame) {
                    log::warn!("Redis answered a session's rooms with {}", redis_error(&e));
                    self.events.push(Event::Failed { token, serial });
                    return true;
                }
                let mut rooms: Vec<RoomId> = list_items(frame)
                    .iter()
                    .filter_map(|r| std::str::from_utf8(r).ok().and_then(RoomId::parse))
                    .collect();
                rooms.sort_unstable();
                rooms.dedup();
                if rooms.is_empty() {
                    self.events.push(Event::Answer {
                        token,
                        serial,
                        query: Query::SessionRooms(session),
                        answer: Answer::Rooms(Vec::new()),
                    });
                    return true;
                }
                // Each room's registry key, on the room's shard; answered once all are in.
                self.next_gather += 1;
                let gather = self.next_gather;
                for (index, room) in rooms.iter().enumerate() {
                    let e = key("e:", *room);
                    self.command(&[b"EXISTS", e.as_bytes()], Pending::Alive { gather, index });
                }
                self.gathers.insert(
                    gather,
                    Gather {
                        token,
                        serial,
                        session,
                        alive: vec![false; rooms.len()],
                        left: rooms.len(),
                        rooms,
                    },
                );
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
        self.release_due();
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
            self.load_room(room);
        }
        self.heartbeat(now, true);
        self.events.push(Event::Up);
    }

    /// Subscribes to the room's channel and loads its history, to catch up
    /// ([`Event::Loaded`] with `catch_up`).
    fn load_room(&mut self, room: RoomId) {
        self.subs.insert(room, Sub::Loading(VecDeque::new()));
        let channel = key("m:", room);
        self.command(
            &[b"SSUBSCRIBE", channel.as_bytes()],
            Pending::Subscribe(room),
        );
        let key = key("h:", room);
        let load = Pending::Load {
            for_request: None,
            room,
        };
        self.command(&[b"LRANGE", key.as_bytes(), b"0", b"-1"], load);
    }

    fn on_push(&mut self, i: usize, data: Vec<OwnedFrame>) {
        let mut it = data.into_iter();
        let (Some(kind), Some(channel)) = (it.next(), it.next()) else {
            return;
        };
        let (Some(kind), Some(channel)) = (blob(&kind), blob(&channel)) else {
            return;
        };
        let room = room_of_channel(channel);
        match kind {
            b"message" | b"smessage" => {}
            b"ssubscribe" | b"sunsubscribe" => {
                let Some(room) = room else {
                    return;
                };
                let subscribe = kind == b"ssubscribe";
                let answers = self
                    .links
                    .get(i)
                    .and_then(|l| l.pending.front())
                    .is_some_and(|e| match e.pending {
                        Pending::Subscribe(r) => subscribe && r == room,
                        Pending::Unsubscribe(r) => !subscribe && r == room,
                        _ => false,
                    });
                if answers {
                    if let Some(e) = self.links.get_mut(i).and_then(|l| l.pending.pop_front()) {
                        self.settle(&e);
                    }
                } else if !subscribe && self.subs.contains_key(&room) && self.link == Link::Up {
                    // Redis dropped the subscription itself: the room's slot moved to another
                    // master. Subscribe there and load the history again: what was published
                    // meanwhile arrives once (merged by id, as after a reconnect).
                    log::info!("a room's slot moved to another Redis master: following it");
                    self.load_room(room);
                }
                return;
            }
            _ => return, // subscribe / unsubscribe confirmations of the control channel
        }
        let Some(payload) = it.next().and_then(into_blob) else {
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
        let Some(room) = room else {
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

    /// Queues a command whose reply is `pending`, on the link of its first key's slot.
    fn command(&mut self, args: &[&[u8]], pending: Pending) {
        let slot = self.map.as_ref().and_then(|_| command_slot(args));
        self.queue(slot, None, args, pending);
    }

    fn command_owned(&mut self, args: &[Vec<u8>], pending: Pending) {
        let args: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        self.command(&args, pending);
    }

    /// Queues a command on link `i` (the handshake).
    fn command_on(&mut self, i: usize, args: &[&[u8]], pending: Pending) {
        self.queue(None, Some(i), args, pending);
    }

    fn queue(&mut self, slot: Option<u16>, on: Option<usize>, args: &[&[u8]], pending: Pending) {
        let blocked = slot.is_some_and(|s| self.blocked.contains_key(&s));
        let link = on.unwrap_or_else(|| self.link_for(slot));
        if !blocked && link >= self.links.len() {
            return;
        }
        self.scratch.clear();
        encode_into(&mut self.scratch, args);
        let copy = match &pending {
            Pending::Publish { json, .. } => json.len(),
            _ => 0,
        };
        let cost = self.scratch.len() + copy + PENDING_COST;
        self.queued += cost;
        self.sent += 1;
        self.outstanding.insert(self.sent);
        let mut entry = Waiting {
            pending,
            cost,
            seq: self.sent,
            slot,
            cmd: None,
            redirects: 0,
        };
        if self.map.is_some() {
            entry.cmd = Some(self.scratch.clone());
        }
        if blocked && let Some(b) = slot.and_then(|s| self.blocked.get_mut(&s)) {
            b.waiting.push((entry, None));
            return;
        }
        if let Some(l) = self.links.get_mut(link) {
            if l.pending.is_empty() {
                l.last_progress = self.clock;
            }
            l.out.extend_from_slice(&self.scratch);
            l.pending.push_back(entry);
        }
    }

    /// Sends a command again (after a redirection) on link `i`.
    fn send_again(&mut self, i: usize, entry: Waiting) {
        let Some(l) = self.links.get_mut(i) else {
            return;
        };
        if let Some(cmd) = &entry.cmd {
            if l.pending.is_empty() {
                l.last_progress = self.clock;
            }
            l.out.extend_from_slice(cmd);
            l.pending.push_back(entry);
        }
    }

    /// The link serving `slot` (the first link for commands without keys, and for every
    /// command when Redis is not sharded).
    fn link_for(&self, slot: Option<u16>) -> usize {
        match (&self.map, slot) {
            (Some(m), Some(s)) => m.owner(s).map_or(0, |j| j + 1),
            _ => 0,
        }
    }

    /// The link to the master a redirection names (answered on link `from`).
    fn link_to(&self, from: usize, to: &slots::Target) -> Option<usize> {
        let addr = match to {
            slots::Target::Node(a) => a.clone(),
            slots::Target::SameHost(port) => slots::Addr {
                host: self.links.get(from)?.addr.host.clone(),
                port: *port,
            },
        };
        (1..self.links.len()).find(|&j| self.links[j].addr == addr)
    }

    /// A command is answered (or given up): it no longer counts as queued or outstanding,
    /// and a slot held back for redirections may go on once nothing of it is in flight.
    fn settle(&mut self, e: &Waiting) {
        self.queued = self.queued.saturating_sub(e.cost);
        self.outstanding.remove(&e.seq);
        if let Some(slot) = e.slot
            && let Some(b) = self.blocked.get_mut(&slot)
        {
            b.inflight = b.inflight.saturating_sub(1);
            self.release(slot);
        }
    }

    /// Follows a redirection of the command `entry`, answered on link `i`: the command
    /// waits, with every later command of its slot, until the slot's earlier commands are
    /// answered, then goes out again (to the new master for `MOVED`, after `ASKING` to the
    /// named one for `ASK`, after a short delay for `TRYAGAIN`). Returns `false` when the
    /// link must be dropped (a master this node has no link to: the map is read again).
    fn redirect(&mut self, i: usize, mut entry: Waiting, r: Redirection) -> bool {
        let Some(slot) = entry.slot.filter(|_| entry.cmd.is_some()) else {
            // Not sharded as far as this node knows: the topology changed under it.
            log::warn!("Redis redirected a command: reading the slot map again");
            if let Some(l) = self.links.get_mut(i) {
                l.pending.push_front(entry);
            }
            return false;
        };
        entry.redirects += 1;
        if entry.redirects > MAX_REDIRECTS {
            log::warn!("Redis redirected a command {MAX_REDIRECTS} times: giving it up");
            self.settle(&entry);
            return self.give_up(entry);
        }
        let ask = match &r {
            Redirection::Moved(to) | Redirection::Ask(to) => {
                let Some(j) = self.link_to(i, to) else {
                    log::warn!(
                        "Redis redirected a command to a master this node has no link to: \
                         reading the slot map again"
                    );
                    if let Some(l) = self.links.get_mut(i) {
                        l.pending.push_front(entry);
                    }
                    return false;
                };
                if let Redirection::Moved(..) = r {
                    let addr = self.links[j].addr.clone();
                    if let Some(map) = &mut self.map {
                        let _ = map.set(slot, addr);
                    }
                    None
                } else {
                    Some(j)
                }
            }
            Redirection::TryAgain => None,
        };
        let inflight = if self.blocked.contains_key(&slot) {
            0
        } else {
            self.links
                .iter()
                .flat_map(|l| l.pending.iter())
                .filter(|e| e.slot == Some(slot))
                .count()
        };
        let b = self.blocked.entry(slot).or_insert_with(|| Blocked {
            inflight: inflight + 1,
            ..Blocked::default()
        });
        b.inflight = b.inflight.saturating_sub(1);
        if let Redirection::TryAgain = r {
            b.retry_at = b.retry_at.max(self.clock + TRYAGAIN_DELAY);
        }
        b.waiting.push((entry, ask));
        self.release(slot);
        true
    }

    /// Sends a held-back slot's commands again, in their first order, once nothing of the
    /// slot is in flight and its `TRYAGAIN` delay is over.
    fn release(&mut self, slot: u16) {
        if self
            .blocked
            .get(&slot)
            .is_none_or(|b| b.inflight > 0 || b.retry_at > self.clock)
        {
            return;
        }
        let Some(mut b) = self.blocked.remove(&slot) else {
            return;
        };
        b.waiting.sort_by_key(|(e, _)| e.seq);
        for (e, ask) in b.waiting {
            match ask.filter(|&j| j < self.links.len()) {
                Some(j) => {
                    self.scratch.clear();
                    encode_into(&mut self.scratch, &[b"ASKING"]);
                    let asking = Waiting {
                        pending: Pending::Asking,
                        cost: 0,
                        seq: 0,
                        slot: None,
                        cmd: Some(self.scratch.clone()),
                        redirects: 0,
                    };
                    self.send_again(j, asking);
                    self.send_again(j, e);
                }
                None => {
                    let j = self.link_for(Some(slot));
                    self.send_again(j, e);
                }
            }
        }
    }

    /// Held-back slots whose `TRYAGAIN` delay is over.
    fn release_due(&mut self) {
        let due: Vec<u16> = self
            .blocked
            .iter()
            .filter(|(_, b)| b.inflight == 0 && b.retry_at <= self.clock)
            .map(|(s, _)| *s)
            .collect();
        for slot in due {
            self.release(slot);
        }
    }

    /// A command redirected too often fails as if Redis had refused it; `false` when that
    /// leaves a room half subscribed (the link is then made again).
    fn give_up(&mut self, e: Waiting) -> bool {
        match e.pending {
            Pending::Fetch { token, serial, .. } | Pending::SessionRooms { token, serial, .. } => {
                self.events.push(Event::Failed { token, serial })
            }
            Pending::Publish { room, id, json } => {
                if self.awaiting.remove(&id) {
                    self.events.push(Event::Unconfirmed { room, id, json });
                }
            }
            Pending::Alive { gather, index } => self.gathered(gather, index, false, true),
            Pending::Load { .. } | Pending::Subscribe(_) | Pending::Hello | Pending::Ready => {
                return false;
            }
            Pending::Ignore
            | Pending::Asking
            | Pending::Topology
            | Pending::Unsubscribe(_)
            | Pending::Expired(_) => {}
        }
        true
    }

    /// One room's answer for a [`Query::SessionRooms`] asked of several shards.
    fn gathered(&mut self, gather: u64, index: usize, alive: bool, failed: bool) {
        if failed {
            if let Some(g) = self.gathers.remove(&gather) {
                self.events.push(Event::Failed {
                    token: g.token,
                    serial: g.serial,
                });
            }
            return;
        }
        let Some(g) = self.gathers.get_mut(&gather) else {
            return;
        };
        if let Some(a) = g.alive.get_mut(index) {
            *a = alive;
        }
        g.left = g.left.saturating_sub(1);
        if g.left > 0 {
            return;
        }
        let Some(g) = self.gathers.remove(&gather) else {
            return;
        };
        let live = g
            .rooms
            .into_iter()
            .zip(g.alive)
            .filter(|(_, a)| *a)
            .map(|(r, _)| r)
            .collect();
        self.events.push(Event::Answer {
            token: g.token,
            serial: g.serial,
            query: Query::SessionRooms(g.session),
            answer: Answer::Rooms(live),
        });
    }

    /// Encodes a (un)subscribe of the control channel, which RESP3 answers with a push, not
    /// a reply, on the first link.
    fn command_push(&mut self, args: &[&[u8]]) {
        if let Some(l) = self.links.first_mut() {
            encode_into(&mut l.out, args);
        }
    }
}

/// A redirection in an error reply of a Redis Cluster.
enum Redirection {
    Moved(slots::Target),
    Ask(slots::Target),
    /// `TRYAGAIN`: the keys of a multi-key command are split by a migration under way.
    TryAgain,
}

impl Redirection {
    fn parse(e: &str) -> Option<Redirection> {
        if e.starts_with("TRYAGAIN") {
            return Some(Redirection::TryAgain);
        }
        match slots::Redirect::parse(e)? {
            slots::Redirect::Moved { to, .. } => Some(Redirection::Moved(to)),
            slots::Redirect::Ask { to, .. } => Some(Redirection::Ask(to)),
        }
    }
}

/// The slot of a command's first key: `EVAL`'s first key, else the first argument; `None`
/// for commands without keys (they go to the first link).
fn command_slot(args: &[&[u8]]) -> Option<u16> {
    let name = *args.first()?;
    let key = match name {
        b"EVAL" => {
            if args.get(2).is_none_or(|n| *n == b"0") {
                return None;
            }
            args.get(3)?
        }
        b"HELLO" | b"SELECT" | b"CLUSTER" | b"PUBLISH" | b"SUBSCRIBE" | b"ASKING" | b"PING" => {
            return None;
        }
        _ => args.get(1)?,
    };
    Some(slots::key_slot(key))
}

/// The room of a channel `chatloop:{r:ROOM}:m`.
fn room_of_channel(channel: &[u8]) -> Option<RoomId> {
    channel
        .strip_prefix(b"chatloop:{r:")
        .and_then(|r| r.strip_suffix(b"}:m"))
        .and_then(|r| std::str::from_utf8(r).ok())
        .and_then(RoomId::parse)
}

fn encode_into(out: &mut Vec<u8>, args: &[&[u8]]) {
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
    let at = out.len();
    out.resize(at + frame.encode_len(false), 0);
    match encode_borrowed(&mut out[at..], &frame, false) {
        Ok(n) => out.truncate(at + n),
        Err(e) => {
            // Cannot happen with a buffer of encode_len bytes; never send half a command.
            log::error!("could not encode a Redis command: {e:?}");
            out.truncate(at);
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

fn decode_answer(query: Query, frame: OwnedFrame) -> Result<Answer, String> {
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
            // `[EXISTS of the registry key, HGETALL of the settings]`.
            let mut it = match frame {
                OwnedFrame::Array { data, .. } => data.into_iter(),
                _ => Vec::new().into_iter(),
            };
            let exists = matches!(it.next(), Some(OwnedFrame::Number { data: 1, .. }));
            let settings = read_settings(it.next().map(map_pairs).unwrap_or_default());
            Answer::Room(exists.then_some(settings))
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
