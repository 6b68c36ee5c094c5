//! The chat domain: sessions, rooms, members, history, typing, rate limits and expiry.
//!
//! Pure and synchronous: no sockets, no clock. Every call takes `now`; what must be sent or
//! closed comes out as [`Action`]s that the event loop drains after each call, and
//! [`Hub::poll_timeout`] / [`Hub::handle_timeout`] are how time moves the hub forward.
//! Each broadcast is encoded once into a shared [`Frame`] and handed to every member.

use std::collections::HashMap;
use std::rc::Rc;

use crate::history::{self, Budget, History};
use crate::ids::{MsgId, MsgIdGen, RoomId, SecureRandom, SessionId, UserId};
use crate::protocol::{self, ClientMsg, EventKind, Frame, FrameBuf, TypingKind, Who};
use crate::ratelimit::TokenBucket;
use crate::time::{Micros, Now};
use crate::timer::{TimerId, Wheel};

/// The connections the hub's calls and [`Action`]s name (defined with the other ids).
pub use crate::ids::ConnId;

/// What the event loop must do after a hub call.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Queue this frame on that connection.
    Send(ConnId, Frame),
    /// Close that WebSocket with this code; the hub has already forgotten it.
    Close(ConnId, u16, &'static str),
}

/// A change of shared state made by the hub, to be written to Redis (cluster mode: the
/// `cluster` module turns each into commands). Collected only after
/// [`Hub::enable_cluster`]; the event loop takes them with [`Hub::drain_ops`].
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// A session was created here: write it (name, user id) with the session TTL.
    SessionCreated {
        /// The new session's token.
        id: SessionId,
        /// Its display name.
        user: Rc<str>,
        /// Its public id.
        user_id: UserId,
    },
    /// An authenticated call: slide the session's TTL.
    SessionUsed(SessionId),
    /// `DELETE /sessions/me` here: delete it and tell every node.
    SessionEnded(SessionId),
    /// A room was created here: register it (with its settings, if any) and add it to the
    /// creator's list.
    RoomCreated {
        /// The room's id.
        room: RoomId,
        /// The session that created it.
        session: SessionId,
        /// What it was created with (written before the registry entry, so that no node sees
        /// the room without them).
        settings: RoomSettings,
    },
    /// A member of a private room replaced its invite (the new one's SHA-256).
    InviteRotated {
        /// The private room.
        room: RoomId,
        /// SHA-256 of the new invite.
        invite: [u8; 32],
    },
    /// The room's oldest messages passed their `message_ttl`: drop them from Redis's
    /// history too (every node with the room's history does; idempotent).
    TrimHistory {
        /// The room whose history to trim.
        room: RoomId,
        /// The room's `message_ttl`: entries older than this go.
        ttl: Micros,
    },
    /// Add the room to the session's list in Redis (it created or joined it).
    Remember {
        /// The session.
        session: SessionId,
        /// The room to add.
        room: RoomId,
    },
    /// Remove the room from the session's list in Redis (`DELETE /rooms/{id}/leave`).
    Forget {
        /// The session.
        session: SessionId,
        /// The room to remove.
        room: RoomId,
    },
    /// A history event (chat, joined, left) to store and deliver on every node; the store
    /// also drops entries past the room's `message_ttl`.
    Publish {
        /// The room it belongs to.
        room: RoomId,
        /// Its message id (UUID v7), stored in front of the JSON.
        id: MsgId,
        /// The event's JSON (the frame's payload), as delivered.
        json: Vec<u8>,
        /// The room's `message_ttl`, if it has one.
        message_ttl: Option<Micros>,
    },
    /// `typing` / `typing_stopped` for every member but `except` (a member of this node).
    Typing {
        /// The room.
        room: RoomId,
        /// The sender's connection on this node, which gets no copy (`None`: everybody does).
        except: Option<ConnId>,
        /// The `typing` / `typing_stopped` JSON.
        json: Vec<u8>,
    },
    /// A WebSocket joined a room here: add it to the room's presence in Redis (and this node's
    /// heartbeat set).
    Joined {
        /// The room.
        room: RoomId,
        /// The member's connection on this node.
        conn: ConnId,
        /// The member's session.
        session: SessionId,
        /// The member's display name.
        user: Rc<str>,
        /// The member's public id.
        user_id: UserId,
        /// Rewritten (if missing) after Redis came back empty, before the room's registry.
        settings: RoomSettings,
    },
    /// A WebSocket of this node left a room: remove it from the room's presence; the room's last
    /// local member leaving unsubscribes this node and starts the room's expiry in Redis.
    Left {
        /// The room.
        room: RoomId,
        /// The member's connection on this node.
        conn: ConnId,
        /// The member's session.
        session: SessionId,
    },
    /// The hub dropped its record of the room (no local members for the room TTL).
    Forgotten(RoomId),
}

/// Why the hub refused a call. Each maps to one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubError {
    /// No live session has this token (401, or 403 on the WebSocket upgrade).
    InvalidSession,
    /// No such room, or a private room the session may not see (404).
    RoomNotFound,
    /// The room has `--max-room-members` WebSockets open (503).
    RoomFull,
    /// `--max-sessions` are live (503).
    TooManySessions,
    /// `--max-rooms` are live (503).
    TooManyRooms,
    /// The session already has `--max-rooms-per-session` live rooms of its own.
    TooManyRoomsForSession,
}

/// The hub's share of the settings. Built from the command line by
/// `Config::hub_config` (in `config`, above the hub); its `Default` is the command line's
/// defaults, from the same place.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// `--room-ttl`: delete a room after this long without an open connection.
    pub room_ttl: Micros,
    /// `--session-ttl`: end a session this long after its last use (sliding).
    pub session_ttl: Micros,
    /// Chat messages kept per room.
    pub history: usize,
    /// Presence notices kept per room, besides the chat messages.
    pub history_notices: usize,
    /// History entries at most in the `welcome` frame of a new socket (`Config::hub_config` sets
    /// 50; no flag).
    pub welcome_messages: usize,
    /// Messages in one `welcome` or history answer, in bytes of JSON (the newest always).
    pub max_welcome_bytes: usize,
    /// `--max-chat-chars`: longest chat message in characters (error message_too_long).
    pub max_chat_chars: usize,
    /// A chat message's size once JSON-encoded (escapes included).
    pub max_chat_bytes: usize,
    /// `--max-room-members`: open WebSocket connections per room (503 beyond).
    pub max_room_members: usize,
    /// `--chat-rate`: chat messages per second per session (token bucket rate).
    pub chat_rate: u32,
    /// `--chat-burst`: chat messages a session may send at once (token bucket size).
    pub chat_burst: u32,
    /// WebSocket upgrades per session: token bucket rate (0 = no limit) and size.
    pub upgrade_rate: u32,
    /// `--upgrade-burst`: WebSocket upgrades a session may make at once (token bucket size).
    pub upgrade_burst: u32,
    /// `--typing-debounce`: at most one typing notice per member per this window.
    pub typing_debounce: Micros,
    /// `--typing-quiet`: send typing_stopped after this long without typing.
    pub typing_quiet: Micros,
    /// `typing` messages one member may send per second; more are dropped silently
    /// (`Config::hub_config` sets 50; no flag).
    pub typing_max_per_sec: u32,
    /// `--max-sessions`: live sessions in total (503 beyond).
    pub max_sessions: usize,
    /// `--max-rooms`: live rooms in total (503 beyond).
    pub max_rooms: usize,
    /// Live rooms one session may have created (0: no limit).
    pub max_rooms_per_session: usize,
    /// How long `user_joined` / `user_left` may wait to share one write with the notices
    /// that follow; zero sends each at once. Why: the comment on `Hub::release`.
    pub notice_delay: Micros,
    /// Bounds of a room's `message_ttl`.
    pub min_message_ttl: Micros,
    /// `--max-message-ttl`: longest message lifetime a room may ask for (POST /rooms
    /// {"message_ttl": seconds}; 422 beyond).
    pub max_message_ttl: Micros,
}

/// How a room is created (`POST /rooms` with a body).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoomOptions {
    /// Invite-only: joining needs the secret handed to the creator.
    pub private: bool,
    /// Disappearing messages: each history entry is dropped this long after it was sent.
    pub message_ttl: Option<Micros>,
}

/// What a room was created with, as cluster mode keeps it in Redis: all a node needs to
/// serve a room it has not seen. Rooms made the old way have none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoomSettings {
    /// Invite-only: SHA-256 of the current invite.
    pub invite: Option<[u8; 32]>,
    /// Disappearing messages: how long each history entry lives.
    pub message_ttl: Option<Micros>,
}

impl RoomSettings {
    /// Whether the room is private (it then has an invite).
    pub fn is_private(&self) -> bool {
        self.invite.is_some()
    }
}

/// A room just created: its id and, for a private room, its invite (the only copy: the hub
/// keeps its SHA-256 only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRoom {
    /// The room's id.
    pub id: RoomId,
    /// The invite, for a private room: handed out once, never stored in clear.
    pub invite: Option<String>,
}

/// What `GET /rooms/{id}` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomView {
    /// Open WebSocket connections in the room on this node.
    pub user_count: usize,
    /// The room is private (joining needs its invite).
    pub private: bool,
    /// The room's `message_ttl`, if any.
    pub message_ttl: Option<Micros>,
}

/// What `GET /sessions/me` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    /// The session's display name.
    pub username: Rc<str>,
    /// The session's public id.
    pub user_id: UserId,
    /// The session's rooms that still exist, in the order they were added.
    pub rooms: Vec<RoomId>,
}

/// Counts for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubStats {
    /// Live sessions.
    pub sessions: usize,
    /// Rooms this hub holds (with members, or waiting for their expiry).
    pub rooms: usize,
    /// WebSocket connections in all rooms.
    pub members: usize,
    /// Armed timers in the hub's wheel.
    pub timers: usize,
    /// History entries stored since start (chat and presence notices).
    pub messages: u64,
    /// Chat messages refused by the rate limit since start.
    pub rate_limited: u64,
    /// Rooms expired after `--room-ttl` without members since start.
    pub rooms_expired: u64,
    /// Sessions ended by `--session-ttl` since start.
    pub sessions_expired: u64,
    /// History entries dropped for their room's `message_ttl`.
    pub messages_expired: u64,
}

/// The chat domain: sessions, rooms and their members and history, typing, limits and
/// expiry. Pure: every call takes `now`; what must be sent or closed comes out as
/// [`Action`]s, and in cluster mode what Redis must learn as [`Op`]s.
pub struct Hub {
    cfg: HubConfig,
    /// Boxed: the table's entries stay small (24 bytes, not the session's ~180), so that
    /// creating a session touches fewer cache lines and growing the table moves less.
    sessions: HashMap<SessionId, Box<Session>>,
    rooms: HashMap<RoomId, Room>,
    /// Where each connected socket is in its room's `members` (so that a frame, a close or
    /// a typing timer finds its member in O(1) however big the room).
    member_at: HashMap<ConnId, usize>,
    /// Orders each session's rooms (`GET /rooms` lists them in the order they were added).
    room_stamp: u64,
    wheel: Wheel<Timer>,
    actions: Vec<Action>,
    fired: Vec<Timer>,
    frame: FrameBuf,
    random: SecureRandom,
    ids: MsgIdGen,
    members: usize,
    messages: u64,
    rate_limited: u64,
    rooms_expired: u64,
    sessions_expired: u64,
    messages_expired: u64,
    /// Ids of the entries that just expired in one room (reused).
    expired_ids: Vec<MsgId>,
    /// Sessions and rooms removed so far, for [`Hub::freed`].
    freed: u64,
    /// Rooms with held notices, and when they are due (one deadline for all of them).
    held_rooms: Vec<RoomId>,
    held_due: Option<Micros>,
    /// Where a batch of held notices is put together.
    batch: Vec<u8>,
    /// Cluster mode: changes to write to Redis, and whether Redis is reachable.
    cluster: Option<ClusterLink>,
}

struct ClusterLink {
    up: bool,
    ops: Vec<Op>,
}

struct Session {
    username: Rc<str>,
    user_id: UserId,
    /// The session's rooms (some may have expired since), each with when it was added.
    rooms: HashMap<RoomId, u64>,
    /// Expired rooms are dropped from `rooms` when it grows to this size, which then
    /// doubles: amortised O(1) per room added, however many a session adds.
    rooms_prune_at: usize,
    /// Open WebSockets of this session, with their room.
    conns: Vec<(ConnId, RoomId)>,
    last_used: Micros,
    /// The expiry timer: always armed, for the creation time (or a later last use) plus the
    /// TTL. Use does not move it (that would touch the wheel on every request): when it fires
    /// early it is armed again for the session's real deadline.
    expiry: TimerId,
    /// Live rooms this session created (for `--max-rooms-per-session`).
    rooms_created: usize,
    bucket: TokenBucket,
    /// Chat messages refused in a row for the rate limit.
    strikes: u32,
    /// WebSocket upgrades (`--upgrade-rate`).
    upgrades: TokenBucket,
}

struct Room {
    members: Vec<Member>,
    history: History,
    empty_since: Micros,
    /// The expiry timer, armed while the room has no member (cancelled when one connects).
    expiry: Option<TimerId>,
    /// The session that created the room here, whose `rooms_created` it counts in.
    owner: Option<SessionId>,
    /// `history` is complete and current. Always in single-node mode; in cluster mode while
    /// this node is subscribed to the room (it has members here).
    live: bool,
    /// Presence notices already in `history` (its newest entries) but not yet sent to the
    /// members; see [`Hub::release`].
    held: Vec<Frame>,
    /// Invite-only rooms: SHA-256 of the current invite.
    invite: Option<[u8; 32]>,
    /// Disappearing messages: how long each history entry lives.
    message_ttl: Option<Micros>,
    /// Armed at the oldest entry's deadline while the room has history and a `message_ttl`.
    ttl_timer: Option<TimerId>,
}

impl Room {
    /// [`Hub::release`] for this room; `batch` is where several notices are put together.
    fn release(&mut self, batch: &mut Vec<u8>, actions: &mut Vec<Action>) {
        let frame = match self.held.as_slice() {
            [] => return,
            [one] => one.clone(),
            many => {
                batch.clear();
                for f in many {
                    batch.extend_from_slice(f);
                }
                Frame::from(&batch[..])
            }
        };
        if self.held.capacity() > 64 {
            self.held = Vec::new(); // after a storm: do not keep its peak per room
        } else {
            self.held.clear();
        }
        for m in &self.members {
            actions.push(Action::Send(m.conn, frame.clone()));
        }
    }
}

struct Member {
    conn: ConnId,
    session: SessionId,
    user: Rc<str>,
    user_id: UserId,
    /// When the member stops counting as typing; `None` when not typing.
    typing_until: Option<Micros>,
    typing_sent: Micros,
    /// The `typing_stopped` timer, armed while typing.
    typing_timer: Option<TimerId>,
    typing_window: Micros,
    typing_count: u32,
}

#[derive(Debug, Clone, Copy)]
enum Timer {
    Room(RoomId),
    Session(SessionId),
    Typing(RoomId, ConnId),
    /// The oldest history entry of a room with a `message_ttl` is due.
    Messages(RoomId),
}

/// A session's list of rooms is first pruned of expired rooms at this size.
const ROOMS_PRUNE_MIN: usize = 32;

impl Hub {
    /// An empty hub with these settings; single-node until [`Hub::enable_cluster`].
    pub fn new(cfg: HubConfig) -> Hub {
        let mut random = SecureRandom::default();
        let seed = random.u64();
        Hub {
            cfg,
            sessions: HashMap::new(),
            rooms: HashMap::new(),
            member_at: HashMap::new(),
            room_stamp: 0,
            wheel: Wheel::new(),
            actions: Vec::new(),
            fired: Vec::new(),
            frame: FrameBuf::default(),
            random,
            ids: MsgIdGen::new(seed),
            members: 0,
            messages: 0,
            rate_limited: 0,
            rooms_expired: 0,
            sessions_expired: 0,
            messages_expired: 0,
            expired_ids: Vec::new(),
            freed: 0,
            held_rooms: Vec::new(),
            held_due: None,
            batch: Vec::new(),
            cluster: None,
        }
    }

    // ---- cluster mode ---------------------------------------------------------------

    /// Turns on cluster mode: shared changes come out of [`Hub::drain_ops`], and while
    /// Redis is reachable events travel through it instead of straight to local members.
    pub fn enable_cluster(&mut self) {
        self.cluster = Some(ClusterLink {
            up: false,
            ops: Vec::new(),
        });
    }

    /// Cluster mode is on ([`Hub::enable_cluster`] was called).
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// Redis came or went; while it is away rooms work for local members only.
    pub fn set_cluster_up(&mut self, up: bool) {
        if let Some(c) = &mut self.cluster {
            c.up = up;
        }
    }

    /// Ops are waiting for [`Hub::drain_ops`].
    pub fn has_ops(&self) -> bool {
        self.cluster.as_ref().is_some_and(|c| !c.ops.is_empty())
    }

    /// Takes the ops produced so far (none outside cluster mode), in the order they happened.
    pub fn drain_ops(&mut self) -> Vec<Op> {
        self.cluster
            .as_mut()
            .map(|c| std::mem::take(&mut c.ops))
            .unwrap_or_default()
    }

    fn op(&mut self, op: Op) {
        if let Some(c) = &mut self.cluster {
            c.ops.push(op);
        }
    }

    fn via_redis(&self) -> bool {
        self.cluster.as_ref().is_some_and(|c| c.up)
    }

    /// Whether this node knows the session and it has not expired here.
    pub fn has_session(&self, id: SessionId, now: Now) -> bool {
        self.sessions
            .get(&id)
            .is_some_and(|s| !s.conns.is_empty() || now.mono < s.last_used + self.cfg.session_ttl)
    }

    /// A session Redis knows: remember it here (or count it as used if already known).
    pub fn install_session(&mut self, id: SessionId, username: &str, user_id: UserId, now: Now) {
        if let Some(s) = self.sessions.get_mut(&id) {
            s.last_used = now.mono;
            return;
        }
        self.insert_session(id, username, user_id, now);
    }

    /// A room Redis knows: keep a record of it here (without history until loaded), with
    /// its settings as Redis has them. A private room's invite follows Redis (a member may
    /// have rotated it on another node); a private room never turns public, and a room's
    /// `message_ttl` never goes away.
    pub fn install_room(&mut self, id: RoomId, settings: RoomSettings, now: Now) {
        if !self.rooms.contains_key(&id) {
            self.insert_room(id, false, now);
        }
        let Some(r) = self.rooms.get_mut(&id) else {
            return;
        };
        if settings.invite.is_some() {
            r.invite = settings.invite;
        }
        if r.message_ttl.is_none() && settings.message_ttl.is_some() {
            r.message_ttl = settings.message_ttl;
            arm_ttl(r, &mut self.wheel, id, now);
        }
    }

    /// Whether Redis counts the room among the session's rooms (cluster mode: membership of
    /// a private room is asked of Redis on every call, since joins and leaves happen on any
    /// node): this node's copy follows.
    pub fn install_member(&mut self, session: SessionId, room: RoomId, member: bool) {
        if member {
            self.remember_local(session, room);
        } else if let Some(s) = self.sessions.get_mut(&session) {
            s.rooms.remove(&room);
        }
    }

    /// Whether the room is known here and invite-only (a setting that never changes).
    pub fn room_private(&self, id: RoomId) -> bool {
        self.rooms.get(&id).is_some_and(|r| r.invite.is_some())
    }

    /// The room's `message_ttl`, if it is known here and has one.
    pub fn room_message_ttl(&self, id: RoomId) -> Option<Micros> {
        self.rooms.get(&id).and_then(|r| r.message_ttl)
    }

    /// Whether the room's history here is complete (no need to load it from Redis).
    pub fn room_live(&self, id: RoomId) -> bool {
        self.rooms.get(&id).is_some_and(|r| r.live)
    }

    /// The room's history as Redis has it: this node now mirrors it.
    pub fn load_history(&mut self, id: RoomId, messages: Vec<(MsgId, Vec<u8>)>, now: Now) {
        self.release(id);
        let caps = self.history_caps();
        let Some(room) = self.rooms.get_mut(&id) else {
            return;
        };
        room.history.clear();
        let cutoff = expiry_cutoff(room.message_ttl, now);
        for (mid, json) in messages {
            if cutoff.is_some_and(|c| mid.unix_ms() <= c) {
                continue; // past its message_ttl: never served again, whatever Redis holds
            }
            self.frame.start().extend_from_slice(&json);
            let frame = self.frame.finish_text();
            room.history
                .push(mid, frame, protocol::is_presence(&json), caps);
        }
        self.frame.trim();
        room.live = true;
        arm_ttl(room, &mut self.wheel, id, now);
    }

    /// After Redis came back: its history of the room becomes this node's copy, and what
    /// this node's members missed meanwhile (stored by other nodes) is sent to them, once.
    /// Messages sent here while Redis was away reached the members here live but are not in
    /// Redis, so they leave this copy too: every node then answers `since` the same way.
    pub fn catch_up(&mut self, id: RoomId, messages: Vec<(MsgId, Vec<u8>)>, now: Now) {
        self.release(id);
        let caps = self.history_caps();
        let Some(room) = self.rooms.get_mut(&id) else {
            return;
        };
        let known: std::collections::HashSet<MsgId> = room.history.iter().map(|m| m.id).collect();
        // What precedes the oldest message the members here saw is older than their copy;
        // everything after it that they did not see is news to them. (From the oldest, not
        // the newest: a notice delivered here unconfirmed may sit in Redis after messages
        // that never reached this node.)
        let start = messages
            .iter()
            .position(|(m, _)| known.contains(m))
            .unwrap_or(0);
        let mut history = History::default();
        let cutoff = expiry_cutoff(room.message_ttl, now);
        for (i, (mid, json)) in messages.into_iter().enumerate() {
            if cutoff.is_some_and(|c| mid.unix_ms() <= c) {
                continue;
            }
            let missed = i >= start && !known.contains(&mid);
            self.frame.start().extend_from_slice(&json);
            let frame = self.frame.finish_text();
            if missed {
                for m in &room.members {
                    self.actions.push(Action::Send(m.conn, frame.clone()));
                }
            }
            history.push(mid, frame, protocol::is_presence(&json), caps);
        }
        self.frame.trim();
        room.history = history;
        room.live = true;
        arm_ttl(room, &mut self.wheel, id, now);
    }

    /// A member of a node that is gone (its presence expired): announce that it left.
    pub fn departed_elsewhere(&mut self, id: RoomId, user: &str, user_id: UserId, now: Now) {
        if !self.rooms.contains_key(&id) {
            return;
        }
        let text = format!("{user} has left");
        self.publish(id, EventKind::UserLeft, Who { user, user_id }, &text, now);
    }

    /// A history event that came through Redis: framed once, sent to the members here.
    pub fn deliver_event(&mut self, id: RoomId, mid: MsgId, json: &[u8], now: Now) {
        if !self.rooms.get(&id).is_some_and(|r| r.live) {
            return;
        }
        self.frame.start().extend_from_slice(json);
        let frame = self.frame.finish_text();
        self.frame.trim();
        self.store_and_send(id, mid, frame, protocol::is_presence(json), now);
    }

    /// A history event this node published that Redis did not confirm (the link went down
    /// or Redis refused it before its echo came back). A chat reached nobody here, and maybe
    /// nobody anywhere: its sender's sockets in the room get an `unconfirmed` error frame with
    /// its id and text, never silence. A presence notice is delivered here as in degraded mode,
    /// so that the members here still see who joined or left.
    pub fn unconfirmed(&mut self, id: RoomId, mid: MsgId, json: &[u8], now: Now) {
        if let Some((user_id, text)) = protocol::chat_sender(json) {
            let Some(room) = self.rooms.get(&id) else {
                return;
            };
            protocol::write_unconfirmed(self.frame.start(), mid, &text);
            let frame = self.frame.finish_text();
            for m in room.members.iter().filter(|m| m.user_id == user_id) {
                self.actions.push(Action::Send(m.conn, frame.clone()));
            }
            self.frame.trim();
        } else if protocol::is_presence(json) {
            self.deliver_event(id, mid, json, now);
        }
    }

    /// A typing event that came through Redis, for every member here but `except`.
    pub fn deliver_typing(&mut self, id: RoomId, except: Option<ConnId>, json: &[u8]) {
        self.frame.start().extend_from_slice(json);
        let frame = self.frame.finish_text();
        self.send_typing(id, frame, except);
    }

    /// Another node ended this session: close its sockets here with 1000 and forget it.
    pub fn session_ended_elsewhere(&mut self, id: SessionId, now: Now) {
        if self.sessions.contains_key(&id) {
            self.end_local(id, now);
        }
    }

    /// Takes the actions produced by the calls so far.
    pub fn drain_actions(&mut self) -> std::vec::Drain<'_, Action> {
        self.actions.drain(..)
    }

    /// Actions are waiting for [`Hub::drain_actions`].
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    /// Gives back the memory of the hub's reusable buffers after a peak (a 1 000-member
    /// room's broadcast grows `actions` to thousands of entries) and its timer slab's free
    /// entries (a storm of sessions leaves one per session). Called by the loop between
    /// iterations, at most once a second, when it hands memory back to the OS.
    pub fn shrink_buffers(&mut self) {
        fn reset<T>(v: &mut Vec<T>, keep: usize) {
            if v.is_empty() && v.capacity() > keep {
                *v = Vec::new();
            }
        }
        reset(&mut self.actions, 256);
        reset(&mut self.fired, 256);
        reset(&mut self.expired_ids, 256);
        reset(&mut self.held_rooms, 256);
        reset(&mut self.batch, 4096);
        self.frame.shrink();
        self.wheel.shrink();
        if let Some(link) = &mut self.cluster {
            reset(&mut link.ops, 256);
        }
    }

    /// How many sessions and rooms have been removed since start: the loop hands memory back
    /// to the operating system after many were (see `Server::set_release_memory`).
    pub fn freed(&self) -> u64 {
        self.freed
    }

    /// Live counts and counters for `/metrics`.
    pub fn stats(&self) -> HubStats {
        HubStats {
            sessions: self.sessions.len(),
            rooms: self.rooms.len(),
            members: self.members,
            timers: self.wheel.len(),
            messages: self.messages,
            rate_limited: self.rate_limited,
            rooms_expired: self.rooms_expired,
            sessions_expired: self.sessions_expired,
            messages_expired: self.messages_expired,
        }
    }

    // ---- sessions -------------------------------------------------------------------

    /// Starts a session for an already validated username.
    pub fn create_session(
        &mut self,
        username: &str,
        now: Now,
    ) -> Result<(SessionId, UserId), HubError> {
        if self.sessions.len() >= self.cfg.max_sessions {
            return Err(HubError::TooManySessions);
        }
        let id = self.random.session_id();
        let user_id = self.random.user_id();
        self.insert_session(id, username, user_id, now);
        if self.cluster.is_some() {
            // Only cluster mode reads ops: no copy of the name to drop otherwise.
            self.op(Op::SessionCreated {
                id,
                user: Rc::from(username),
                user_id,
            });
        }
        Ok((id, user_id))
    }

    /// Checks a bearer token and counts the call as use of the session.
    pub fn authenticate(&mut self, id: SessionId, now: Now) -> Result<(), HubError> {
        let ttl = self.cfg.session_ttl;
        match self.sessions.get_mut(&id) {
            Some(s) if s.conns.is_empty() && now.mono >= s.last_used + ttl => {
                Err(HubError::InvalidSession)
            }
            Some(s) => {
                s.last_used = now.mono;
                self.op(Op::SessionUsed(id));
                Ok(())
            }
            None => Err(HubError::InvalidSession),
        }
    }

    /// What `GET /sessions/me` shows, or `None` for no live session.
    pub fn session_view(&self, id: SessionId) -> Option<SessionView> {
        let s = self.sessions.get(&id)?;
        Some(SessionView {
            username: s.username.clone(),
            user_id: s.user_id,
            rooms: self.live_rooms_of(s),
        })
    }

    /// This session's rooms that still exist.
    pub fn session_rooms(&self, id: SessionId) -> Vec<RoomId> {
        self.sessions
            .get(&id)
            .map(|s| self.live_rooms_of(s))
            .unwrap_or_default()
    }

    /// Ends a session: its sockets leave their rooms and are closed with 1000.
    pub fn end_session(&mut self, id: SessionId, now: Now) {
        self.op(Op::SessionEnded(id));
        self.end_local(id, now);
    }

    fn end_local(&mut self, id: SessionId, now: Now) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        let conns = std::mem::take(&mut s.conns);
        for (conn, room) in conns {
            self.disconnect(conn, room, now);
            self.actions
                .push(Action::Close(conn, 1000, "session ended"));
        }
        if let Some(s) = self.sessions.remove(&id) {
            self.wheel.cancel(s.expiry);
            self.freed += 1;
            shrink(&mut self.sessions);
        }
    }

    // ---- rooms ----------------------------------------------------------------------

    /// `POST /rooms` without a body: a public room with no `message_ttl`.
    pub fn create_room(&mut self, session: SessionId, now: Now) -> Result<RoomId, HubError> {
        self.create_room_with(session, RoomOptions::default(), now)
            .map(|r| r.id)
    }

    /// `POST /rooms` with options: a private room's answer carries its invite.
    /// `message_ttl` must be within the configured bounds (see [`Hub::message_ttl_bounds`]).
    pub fn create_room_with(
        &mut self,
        session: SessionId,
        opts: RoomOptions,
        now: Now,
    ) -> Result<NewRoom, HubError> {
        let Some(s) = self.sessions.get(&session) else {
            return Err(HubError::InvalidSession);
        };
        let per_session = self.cfg.max_rooms_per_session;
        if per_session > 0 && s.rooms_created >= per_session {
            return Err(HubError::TooManyRoomsForSession);
        }
        if self.rooms.len() >= self.cfg.max_rooms {
            return Err(HubError::TooManyRooms);
        }
        let id = loop {
            let id = self.random.room_id();
            if !self.rooms.contains_key(&id) {
                break id;
            }
        };
        // In cluster mode the node subscribes when the first member connects.
        self.insert_room(id, self.cluster.is_none(), now);
        let invite = opts.private.then(|| self.random.invite());
        let settings = RoomSettings {
            invite: invite.as_deref().map(invite_hash),
            message_ttl: opts.message_ttl,
        };
        if let (Some(r), Some(s)) = (self.rooms.get_mut(&id), self.sessions.get_mut(&session)) {
            r.owner = Some(session);
            r.invite = settings.invite;
            r.message_ttl = settings.message_ttl;
            s.rooms_created += 1;
        }
        self.op(Op::RoomCreated {
            room: id,
            session,
            settings,
        });
        self.remember_room(session, id);
        Ok(NewRoom { id, invite })
    }

    /// The shortest and longest `message_ttl` a room may have.
    pub fn message_ttl_bounds(&self) -> (Micros, Micros) {
        (self.cfg.min_message_ttl, self.cfg.max_message_ttl)
    }

    /// Whether the session is a member of the room: it created it, joined it, or connected.
    fn is_member(&self, session: SessionId, room: RoomId) -> bool {
        self.sessions
            .get(&session)
            .is_some_and(|s| s.rooms.contains_key(&room))
    }

    /// Whether the room exists for this caller: any room for anyone, a private room only for
    /// its members. Everything else about a private room answers as if it did not exist.
    pub fn room_visible(&self, room: RoomId, session: Option<SessionId>) -> bool {
        match self.rooms.get(&room) {
            None => false,
            Some(r) if r.invite.is_none() => true,
            Some(_) => session.is_some_and(|s| self.is_member(s, room)),
        }
    }

    /// `GET /rooms/{id}`: `None` when the room is not visible to `session`.
    pub fn room_view(&self, room: RoomId, session: Option<SessionId>) -> Option<RoomView> {
        if !self.room_visible(room, session) {
            return None;
        }
        let r = self.rooms.get(&room)?;
        Some(RoomView {
            user_count: r.members.len(),
            private: r.invite.is_some(),
            message_ttl: r.message_ttl,
        })
    }

    /// `POST /rooms/{id}/join` with the body's invite: a private room admits a session that
    /// is a member already or brings the current invite (compared in constant time); else it
    /// answers [`HubError::RoomNotFound`], as for a room that does not exist.
    pub fn join_with_invite(
        &mut self,
        session: SessionId,
        room: RoomId,
        invite: Option<&str>,
    ) -> Result<(), HubError> {
        let Some(r) = self.rooms.get(&room) else {
            return Err(HubError::RoomNotFound);
        };
        if let Some(want) = &r.invite
            && !self.is_member(session, room)
        {
            let ok = invite.is_some_and(|i| ct_eq(&invite_hash(i), want));
            if !ok {
                return Err(HubError::RoomNotFound);
            }
        }
        self.remember_room(session, room);
        Ok(())
    }

    /// `POST /rooms/{id}/invite`: a member of a private room replaces its invite; the old
    /// one admits nobody from now on, members stay. Not a member, or not a private room:
    /// [`HubError::RoomNotFound`].
    pub fn rotate_invite(&mut self, session: SessionId, room: RoomId) -> Result<String, HubError> {
        let member = self.is_member(session, room);
        let invite = self.random.invite();
        match self.rooms.get_mut(&room) {
            Some(r) if r.invite.is_some() && member => {
                let hash = invite_hash(&invite);
                r.invite = Some(hash);
                self.op(Op::InviteRotated { room, invite: hash });
                Ok(invite)
            }
            _ => Err(HubError::RoomNotFound),
        }
    }

    /// `POST /rooms/{id}/join`: adds the room to the session's rooms.
    pub fn join_room(&mut self, session: SessionId, room: RoomId) -> Result<(), HubError> {
        if !self.rooms.contains_key(&room) {
            return Err(HubError::RoomNotFound);
        }
        self.remember_room(session, room);
        Ok(())
    }

    /// `DELETE /rooms/{id}/leave`: forgets the room in the session's list.
    pub fn leave_room(&mut self, session: SessionId, room: RoomId) {
        if let Some(s) = self.sessions.get_mut(&session) {
            s.rooms.remove(&room);
        }
        self.op(Op::Forget { session, room });
    }

    /// `--max-rooms-per-session` (for the refusal's wording).
    pub fn max_rooms_per_session(&self) -> usize {
        self.cfg.max_rooms_per_session
    }

    /// The hub knows this room (including a private one: callers decide what to show).
    pub fn room_exists(&self, room: RoomId) -> bool {
        self.rooms.contains_key(&room)
    }

    /// Open WebSocket connections in a room.
    pub fn user_count(&self, room: RoomId) -> Option<usize> {
        self.rooms.get(&room).map(|r| r.members.len())
    }

    /// Every public room (`--room-list`): private rooms are never listed.
    pub fn all_rooms(&self) -> impl Iterator<Item = RoomId> + '_ {
        self.rooms
            .iter()
            .filter(|(_, r)| r.invite.is_none())
            .map(|(id, _)| *id)
    }

    /// Writes the last `limit` messages of a room (those older than `before`, if given) as
    /// JSON values separated by commas, oldest first: what its members have been sent (not
    /// held notices, as in `welcome`), within `--max-welcome-bytes`. `None` when the room
    /// does not exist; else whether older messages were left out for the byte budget.
    pub fn write_history(
        &self,
        room: RoomId,
        limit: usize,
        before: Option<MsgId>,
        out: &mut Vec<u8>,
    ) -> Option<bool> {
        let r = self.rooms.get(&room)?;
        let budget = Budget {
            count: limit,
            bytes: self.cfg.max_welcome_bytes,
        };
        let window = r
            .history
            .before(before, self.ids_ordered(), r.held.len(), budget);
        let truncated = window.truncated;
        protocol::write_joined(out, window.map(|m| protocol::frame_payload(&m.frame)));
        Some(truncated)
    }

    /// `--max-welcome-bytes`: what one history answer may carry.
    pub fn max_welcome_bytes(&self) -> usize {
        self.cfg.max_welcome_bytes
    }

    /// Ids grow with storage order: one node made them all (not so in cluster mode).
    fn ids_ordered(&self) -> bool {
        self.cluster.is_none()
    }

    fn history_caps(&self) -> history::Caps {
        history::Caps {
            chats: self.cfg.history,
            notices: self.cfg.history_notices,
        }
    }

    // ---- WebSocket members ----------------------------------------------------------

    /// Whether `session` may open a socket in `room` now (checked before the upgrade).
    pub fn check_connect(
        &self,
        session: SessionId,
        room: RoomId,
        now: Now,
    ) -> Result<(), HubError> {
        match self.sessions.get(&session) {
            Some(s) if !s.conns.is_empty() || now.mono < s.last_used + self.cfg.session_ttl => {}
            _ => return Err(HubError::InvalidSession),
        }
        let r = self.rooms.get(&room).ok_or(HubError::RoomNotFound)?;
        if r.invite.is_some() && !self.is_member(session, room) {
            return Err(HubError::RoomNotFound);
        }
        if r.members.len() >= self.cfg.max_room_members {
            return Err(HubError::RoomFull);
        }
        Ok(())
    }

    /// Spends one of the session's WebSocket upgrades (`--upgrade-rate`), checked after
    /// everything else about the upgrade. `Err(seconds)` (for `Retry-After`) when none is
    /// left; an unknown session is left for `connect` to refuse.
    pub fn take_upgrade(&mut self, session: SessionId, now: Now) -> Result<(), u32> {
        let (rate, burst) = (self.cfg.upgrade_rate, self.cfg.upgrade_burst);
        match self.sessions.get_mut(&session) {
            Some(s) if rate > 0 => {
                if s.upgrades.take(now.mono, rate, burst) {
                    Ok(())
                } else {
                    Err(s.upgrades.wait_secs(rate))
                }
            }
            _ => Ok(()),
        }
    }

    /// A socket opened: sends it `welcome`, then `user_joined` to everyone.
    pub fn connect(
        &mut self,
        conn: ConnId,
        session: SessionId,
        room_id: RoomId,
        since: Option<MsgId>,
        elsewhere: &[(String, UserId)],
        now: Now,
    ) -> Result<(), HubError> {
        self.check_connect(session, room_id, now)?;
        // The welcome leaves out held notices (the new member gets them with everyone else),
        // unless the client already saw some of them on another node: then they go out now.
        if let Some(id) = since
            && self
                .rooms
                .get(&room_id)
                .is_some_and(|r| r.history.is_held(id, r.held.len()))
        {
            self.release(room_id);
        }
        self.remember_room(session, room_id);
        let s = self
            .sessions
            .get_mut(&session)
            .ok_or(HubError::InvalidSession)?;
        s.conns.push((conn, room_id));
        s.last_used = now.mono;
        let (user, user_id) = (s.username.clone(), s.user_id);
        // Nothing past its message_ttl goes into the welcome, even before its timer fires.
        self.expire_due(room_id, now);
        let room = self.rooms.get_mut(&room_id).ok_or(HubError::RoomNotFound)?;
        let settings = RoomSettings {
            invite: room.invite,
            message_ttl: room.message_ttl,
        };
        if let Some(t) = room.expiry.take() {
            self.wheel.cancel(t); // occupied rooms do not expire
        }
        self.member_at.insert(conn, room.members.len());
        room.members.push(Member {
            conn,
            session,
            user: user.clone(),
            user_id,
            typing_until: None,
            typing_sent: Micros::ZERO,
            typing_timer: None,
            typing_window: Micros::ZERO,
            typing_count: 0,
        });
        self.members += 1;

        let me = Who {
            user: &user,
            user_id,
        };
        // Within `--max-welcome-bytes` (the newest messages first), so that no history can
        // make a welcome too big to send; `truncated` tells the client to page the rest
        // (`GET /rooms/{id}/messages?before=`).
        let (held, bytes) = (room.held.len(), self.cfg.max_welcome_bytes);
        let window = match since {
            None => room.history.last(
                held,
                Budget {
                    count: self.cfg.welcome_messages,
                    bytes,
                },
            ),
            Some(id) => room.history.after(id, self.cluster.is_none(), held, bytes),
        };
        let truncated = window.truncated;
        let out = self.frame.start();
        // One entry per user, even with several sockets (O(n) with a set; rooms can be big).
        let mut seen =
            std::collections::HashSet::with_capacity(room.members.len() + elsewhere.len());
        let here = room.members.iter().map(|m| Who {
            user: &m.user,
            user_id: m.user_id,
        });
        let there = elsewhere.iter().map(|(user, user_id)| Who {
            user,
            user_id: *user_id,
        });
        let users = here.chain(there).filter(|w| seen.insert(w.user_id));
        protocol::write_welcome(
            out,
            room_id,
            me,
            users,
            window.map(|m| protocol::frame_payload(&m.frame)),
            truncated,
        );
        let welcome = self.frame.finish_text();
        self.actions.push(Action::Send(conn, welcome));
        self.op(Op::Joined {
            room: room_id,
            conn,
            session,
            user: user.clone(),
            user_id,
            settings,
        });
        let text = format!("{user} has joined");
        self.publish(room_id, EventKind::UserJoined, me, &text, now);
        Ok(())
    }

    /// A socket closed or was closed: it leaves its room (`typing_stopped` if it was typing,
    /// then `user_left`). Does nothing for a connection the hub no longer knows.
    pub fn disconnect(&mut self, conn: ConnId, room_id: RoomId, now: Now) {
        let Some(i) = self.member_index(conn, room_id) else {
            return;
        };
        let Some(room) = self.rooms.get_mut(&room_id) else {
            return;
        };
        let m = room.members.swap_remove(i);
        self.member_at.remove(&conn);
        shrink(&mut self.member_at);
        if let Some(moved) = room.members.get(i) {
            self.member_at.insert(moved.conn, i);
        }
        self.members -= 1;
        let cluster = self.cluster.is_some();
        if room.members.is_empty() {
            if cluster {
                // Unsubscribed from now on: the copy here stops being current (it is served
                // no more). A room with a message_ttl keeps it as the schedule of its
                // expiry timer, which drops the same messages from Redis when they are due
                // (see `expire_messages`); the copy is gone with its last message.
                room.live = false;
                if room.message_ttl.is_none() {
                    room.history.clear();
                }
            }
            room.empty_since = now.mono;
            let due = now.mono + self.cfg.room_ttl;
            if let Some(t) = room
                .expiry
                .replace(self.wheel.arm(due, Timer::Room(room_id)))
            {
                self.wheel.cancel(t);
            }
        }
        if let Some(t) = m.typing_timer {
            self.wheel.cancel(t);
        }
        if let Some(s) = self.sessions.get_mut(&m.session) {
            s.conns.retain(|(c, _)| *c != conn);
            s.last_used = now.mono;
        }
        self.op(Op::Left {
            room: room_id,
            conn,
            session: m.session,
        });
        let who = Who {
            user: &m.user,
            user_id: m.user_id,
        };
        if m.typing_until.is_some() {
            self.typing_frame(room_id, TypingKind::Stopped, who, None);
        }
        let text = format!("{} has left", m.user);
        self.publish(room_id, EventKind::UserLeft, who, &text, now);
    }

    /// A text message from a member's socket.
    pub fn on_text(&mut self, conn: ConnId, room_id: RoomId, text: &str, now: Now) {
        let Some(i) = self.member_index(conn, room_id) else {
            return;
        };
        match protocol::parse_client(text) {
            Ok(ClientMsg::Chat(msg)) => self.chat(conn, room_id, i, msg.trim(), now),
            Ok(ClientMsg::Typing) => self.typing(room_id, i, now),
            Err(e) => self.send_error(conn, e.code(), &e.detail()),
        }
    }

    // ---- time -----------------------------------------------------------------------

    /// When `handle_timeout` next has work; `None` when nothing is pending.
    pub fn poll_timeout(&self) -> Option<Micros> {
        match (self.wheel.next_deadline(), self.held_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs every timer that is due: held notices, room and session expiry, `typing_stopped`.
    pub fn handle_timeout(&mut self, now: Now) {
        if self.held_due.is_some_and(|due| due <= now.mono) {
            self.release_all();
        }
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.advance(now.mono, &mut fired);
        for t in fired.drain(..) {
            match t {
                Timer::Room(id) => self.expire_room(id, now),
                Timer::Session(id) => self.expire_session(id, now),
                Timer::Typing(room, conn) => self.typing_timeout(room, conn, now),
                Timer::Messages(room) => self.expire_messages(room, now),
            }
        }
        self.fired = fired;
    }

    // ---- internals ------------------------------------------------------------------

    fn chat(&mut self, conn: ConnId, room_id: RoomId, i: usize, msg: &str, now: Now) {
        if msg.is_empty() {
            return;
        }
        let max = self.cfg.max_chat_chars;
        if msg.len() > max && msg.chars().count() > max {
            let detail = format!("Message is longer than {max} characters");
            self.send_error(conn, "message_too_long", &detail);
            return;
        }
        // What it costs stored and sent (its JSON string, quotes aside): 4096 control
        // characters are 24 KiB once escaped, 4096 emoji 16 KiB.
        let max = self.cfg.max_chat_bytes;
        if protocol::json_str_len(msg) - 2 > max {
            let detail = format!(
                "Message is too large: at most {max} bytes once encoded as JSON (control characters take 6)"
            );
            self.send_error(conn, "message_too_long", &detail);
            return;
        }
        let Some(m) = self.rooms.get(&room_id).and_then(|r| r.members.get(i)) else {
            return;
        };
        let (session, who_user, user_id, was_typing) =
            (m.session, m.user.clone(), m.user_id, m.typing_until);
        let (rate, burst) = (self.cfg.chat_rate, self.cfg.chat_burst);
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        s.last_used = now.mono;
        if !s.bucket.take(now.mono, rate, burst) {
            s.strikes += 1;
            self.rate_limited += 1;
            if s.strikes > burst {
                s.strikes = 0;
                self.disconnect(conn, room_id, now);
                self.actions
                    .push(Action::Close(conn, 1008, "rate limit exceeded"));
            } else {
                let detail =
                    format!("Too many messages: at most {rate} per second (bursts of {burst})");
                self.send_error(conn, "rate_limited", &detail);
            }
            return;
        }
        s.strikes = 0;
        let who = Who {
            user: &who_user,
            user_id,
        };
        if was_typing.is_some() {
            if let Some(m) = member_mut(&mut self.rooms, room_id, i) {
                m.typing_until = None;
                if let Some(t) = m.typing_timer.take() {
                    self.wheel.cancel(t);
                }
            }
            self.typing_frame(room_id, TypingKind::Stopped, who, Some(conn));
        }
        self.publish(room_id, EventKind::Chat, who, msg, now);
    }

    fn typing(&mut self, room_id: RoomId, i: usize, now: Now) {
        let (debounce, quiet, max) = (
            self.cfg.typing_debounce,
            self.cfg.typing_quiet,
            self.cfg.typing_max_per_sec,
        );
        let Some(m) = member_mut(&mut self.rooms, room_id, i) else {
            return;
        };
        if now.mono.since(m.typing_window) >= Micros::from_secs(1) {
            m.typing_window = now.mono;
            m.typing_count = 0;
        }
        m.typing_count += 1;
        if m.typing_count > max {
            return; // a flood of keystrokes: dropped silently
        }
        let was_typing = m.typing_until.is_some();
        m.typing_until = Some(now.mono + quiet);
        if m.typing_timer.is_none() {
            // Armed once per bout of typing; keystrokes move `typing_until` only, and the
            // timer, when it fires early, is armed again for it.
            m.typing_timer = Some(
                self.wheel
                    .arm(now.mono + quiet, Timer::Typing(room_id, m.conn)),
            );
        }
        if was_typing && now.mono.since(m.typing_sent) < debounce {
            return;
        }
        m.typing_sent = now.mono;
        let (conn, user, user_id) = (m.conn, m.user.clone(), m.user_id);
        self.typing_frame(
            room_id,
            TypingKind::Typing,
            Who {
                user: &user,
                user_id,
            },
            Some(conn),
        );
    }

    fn typing_timeout(&mut self, room_id: RoomId, conn: ConnId, now: Now) {
        let Some(i) = self.member_index(conn, room_id) else {
            return;
        };
        let Some(m) = member_mut(&mut self.rooms, room_id, i) else {
            return;
        };
        m.typing_timer = None; // it just fired
        let Some(until) = m.typing_until else {
            return;
        };
        if until > now.mono {
            // Typed again since the timer was armed: it fired early, so arm it for the end.
            m.typing_timer = Some(self.wheel.arm(until, Timer::Typing(room_id, conn)));
            return;
        }
        m.typing_until = None;
        let user = m.user.clone();
        let who = Who {
            user: &user,
            user_id: m.user_id,
        };
        self.typing_frame(room_id, TypingKind::Stopped, who, Some(conn));
    }

    fn expire_room(&mut self, id: RoomId, now: Now) {
        let ttl = self.cfg.room_ttl;
        let Some(room) = self.rooms.get_mut(&id) else {
            return;
        };
        room.expiry = None; // it just fired
        if !room.members.is_empty() {
            return;
        }
        let due = room.empty_since + ttl;
        if due > now.mono {
            room.expiry = Some(self.wheel.arm(due, Timer::Room(id)));
            return;
        }
        let Some(gone) = self.rooms.remove(&id) else {
            return;
        };
        if let Some(t) = gone.ttl_timer {
            self.wheel.cancel(t);
        }
        if let Some(owner) = gone.owner
            && let Some(s) = self.sessions.get_mut(&owner)
        {
            s.rooms_created = s.rooms_created.saturating_sub(1);
        }
        shrink(&mut self.rooms);
        self.freed += 1;
        self.rooms_expired += 1;
        self.op(Op::Forgotten(id));
        log::debug!("room {id} expired");
    }

    /// The room's oldest history entry is due: drops every entry whose `message_ttl` is
    /// over, tells the members in one `expired` frame, and arms the timer for the next one.
    fn expire_messages(&mut self, id: RoomId, now: Now) {
        let Some(room) = self.rooms.get_mut(&id) else {
            return;
        };
        room.ttl_timer = None; // it just fired
        let gone = self.expire_due(id, now);
        if gone > 0
            && self.cluster.is_some()
            && let Some(ttl) = self.room_message_ttl(id)
        {
            // Redis's copy too (every node with this history sends it; idempotent).
            self.op(Op::TrimHistory { room: id, ttl });
        }
        if let Some(room) = self.rooms.get_mut(&id) {
            arm_ttl(room, &mut self.wheel, id, now);
        }
    }

    /// Drops the room's history entries whose `message_ttl` is over and tells the members
    /// in one `expired` frame; returns how many went. The timer does this at the deadline
    /// (rounded up to batch neighbours); every read of history does it first too, so that
    /// no path serves a message after its deadline. Leaves the timer alone.
    pub fn expire_due(&mut self, id: RoomId, now: Now) -> usize {
        let Some(cutoff_ms) = self
            .rooms
            .get(&id)
            .and_then(|r| expiry_cutoff(r.message_ttl, now))
        else {
            return 0;
        };
        let due = self
            .rooms
            .get(&id)
            .and_then(|r| r.history.oldest_ms())
            .is_some_and(|t| t <= cutoff_ms);
        if !due {
            return 0;
        }
        // Held notices go out first, so that what is held stays the newest entries.
        self.release(id);
        let Some(room) = self.rooms.get_mut(&id) else {
            return 0;
        };
        let mut gone = std::mem::take(&mut self.expired_ids);
        room.history.expire(cutoff_ms, &mut gone);
        let n = gone.len();
        if n > 0 {
            self.messages_expired += n as u64;
            // Expired history counts as removals: the loop hands freed memory back to the OS.
            self.freed += n as u64;
            protocol::write_expired(self.frame.start(), id, &gone);
            let frame = self.frame.finish_text();
            self.frame.trim();
            for m in &room.members {
                self.actions.push(Action::Send(m.conn, frame.clone()));
            }
        }
        gone.clear();
        if gone.capacity() > 1024 {
            gone = Vec::new();
        }
        self.expired_ids = gone;
        n
    }

    fn expire_session(&mut self, id: SessionId, now: Now) {
        let ttl = self.cfg.session_ttl;
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        let due = if s.conns.is_empty() {
            s.last_used + ttl
        } else {
            now.mono + ttl
        };
        if due > now.mono {
            s.expiry = self.wheel.arm(due, Timer::Session(id));
            return;
        }
        self.sessions.remove(&id);
        shrink(&mut self.sessions);
        self.freed += 1;
        self.sessions_expired += 1;
    }

    /// Stores a history message and sends it to every member, the sender included.
    fn publish(&mut self, room_id: RoomId, kind: EventKind, who: Who<'_>, text: &str, now: Now) {
        let id = self.ids.next(now.wall);
        if self.via_redis() {
            let mut json = Vec::with_capacity(192 + text.len());
            protocol::write_event(&mut json, kind, id, who, text, now.wall, room_id);
            let message_ttl = self.room_message_ttl(room_id);
            // The user_left of the last member here: the room's copy, kept as the schedule
            // of its expiry timer (see `disconnect`), takes it too, so that it also leaves
            // Redis on time.
            let caps = self.history_caps();
            if let Some(room) = self.rooms.get_mut(&room_id)
                && !room.live
                && room.message_ttl.is_some()
            {
                self.frame.start().extend_from_slice(&json);
                let frame = self.frame.finish_text();
                self.frame.trim();
                room.history.push(id, frame, true, caps);
                arm_ttl(room, &mut self.wheel, room_id, now);
            }
            self.op(Op::Publish {
                room: room_id,
                id,
                json,
                message_ttl,
            });
            self.messages += 1;
            return;
        }
        protocol::write_event(self.frame.start(), kind, id, who, text, now.wall, room_id);
        let frame = self.frame.finish_text();
        self.frame.trim();
        self.store_and_send(room_id, id, frame, kind.is_presence(), now);
        self.messages += 1;
    }

    /// Appends a history event to the room and sends it to every member: at once, or, for a
    /// presence notice, held back to share a write with the notices that follow.
    fn store_and_send(&mut self, room_id: RoomId, id: MsgId, frame: Frame, notice: bool, now: Now) {
        let hold = notice && self.cfg.notice_delay > Micros::ZERO;
        let caps = self.history_caps();
        let Some(room) = self.rooms.get_mut(&room_id) else {
            return;
        };
        if hold {
            if room.held.is_empty() {
                self.held_rooms.push(room_id);
                if self.held_due.is_none() {
                    self.held_due = Some(now.mono + self.cfg.notice_delay);
                }
            }
            room.held.push(frame.clone());
        } else {
            room.release(&mut self.batch, &mut self.actions);
            for m in &room.members {
                self.actions.push(Action::Send(m.conn, frame.clone()));
            }
        }
        room.history.push(id, frame, notice, caps);
        arm_ttl(room, &mut self.wheel, room_id, now);
    }

    /// Sends the room's held presence notices to its members, all of them in one frame
    /// buffer (one write per member however many there are).
    ///
    /// Why notices wait: a join or leave is one write to every member, and the kernel's cost
    /// of a small loopback write (about 3 µs) dwarfs the user-space work, so a storm of
    /// joins into a big room (everyone reconnecting after a restart) would cost
    /// joins × members writes. Held for `notice_delay`, the notices of a storm share the
    /// writes. Anything else sent to the room releases them first, so every member still
    /// sees the room's events in history order, and chat is never delayed.
    fn release(&mut self, room_id: RoomId) {
        if let Some(room) = self.rooms.get_mut(&room_id) {
            room.release(&mut self.batch, &mut self.actions);
        }
    }

    /// Sends every held notice now (their delay is over, or the server is stopping).
    pub fn release_all(&mut self) {
        let rooms = std::mem::take(&mut self.held_rooms);
        for &id in &rooms {
            self.release(id);
        }
        self.held_rooms = rooms;
        self.held_rooms.clear();
        self.held_due = None;
        if self.batch.capacity() > 64 * 1024 {
            self.batch = Vec::new();
        }
    }

    /// `typing` / `typing_stopped` to every member but `except`.
    fn typing_frame(
        &mut self,
        room_id: RoomId,
        kind: TypingKind,
        who: Who<'_>,
        except: Option<ConnId>,
    ) {
        if self.via_redis() {
            let mut json = Vec::with_capacity(128);
            protocol::write_typing(&mut json, kind.as_str(), who, room_id);
            self.op(Op::Typing {
                room: room_id,
                except,
                json,
            });
            return;
        }
        protocol::write_typing(self.frame.start(), kind.as_str(), who, room_id);
        let frame = self.frame.finish_text();
        self.send_typing(room_id, frame, except);
    }

    /// A typing frame to every member but `except`, after the room's held notices.
    fn send_typing(&mut self, room_id: RoomId, frame: Frame, except: Option<ConnId>) {
        let Some(room) = self.rooms.get_mut(&room_id) else {
            return;
        };
        room.release(&mut self.batch, &mut self.actions);
        for m in room.members.iter().filter(|m| Some(m.conn) != except) {
            self.actions.push(Action::Send(m.conn, frame.clone()));
        }
    }

    fn send_error(&mut self, conn: ConnId, code: &str, detail: &str) {
        protocol::write_error(self.frame.start(), code, detail);
        let frame = self.frame.finish_text();
        self.actions.push(Action::Send(conn, frame));
    }

    /// A new, empty room record whose expiry timer runs from `now`.
    fn insert_room(&mut self, id: RoomId, live: bool, now: Now) {
        let expiry = self
            .wheel
            .arm(now.mono + self.cfg.room_ttl, Timer::Room(id));
        let old = self.rooms.insert(
            id,
            Room {
                members: Vec::new(),
                history: History::default(),
                empty_since: now.mono,
                expiry: Some(expiry),
                owner: None,
                live,
                held: Vec::new(),
                invite: None,
                message_ttl: None,
                ttl_timer: None,
            },
        );
        // Callers check first; should a record be replaced all the same, its timers go too.
        if let Some(old) = old {
            for t in [old.expiry, old.ttl_timer].into_iter().flatten() {
                self.wheel.cancel(t);
            }
        }
    }

    fn insert_session(&mut self, id: SessionId, username: &str, user_id: UserId, now: Now) {
        let bucket = TokenBucket::full(self.cfg.chat_burst, now.mono);
        let upgrades = TokenBucket::full(self.cfg.upgrade_burst, now.mono);
        let expiry = self
            .wheel
            .arm(now.mono + self.cfg.session_ttl, Timer::Session(id));
        let old = self.sessions.insert(
            id,
            Box::new(Session {
                username: Rc::from(username),
                user_id,
                rooms: HashMap::new(),
                rooms_prune_at: ROOMS_PRUNE_MIN,
                conns: Vec::new(),
                last_used: now.mono,
                expiry,
                rooms_created: 0,
                bucket,
                strikes: 0,
                upgrades,
            }),
        );
        if let Some(old) = old {
            self.wheel.cancel(old.expiry);
        }
    }

    fn remember_room(&mut self, session: SessionId, room: RoomId) {
        self.op(Op::Remember { session, room });
        self.remember_local(session, room);
    }

    /// Adds the room to this node's list of the session's rooms.
    fn remember_local(&mut self, session: SessionId, room: RoomId) {
        let rooms = &self.rooms;
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        if s.rooms.contains_key(&room) {
            return;
        }
        if s.rooms.len() >= s.rooms_prune_at {
            s.rooms.retain(|r, _| rooms.contains_key(r));
            s.rooms_prune_at = (2 * s.rooms.len()).max(ROOMS_PRUNE_MIN);
        }
        self.room_stamp += 1;
        s.rooms.insert(room, self.room_stamp);
    }

    /// The session's rooms that still exist, in the order they were added.
    fn live_rooms_of(&self, s: &Session) -> Vec<RoomId> {
        let mut live: Vec<(u64, RoomId)> = s
            .rooms
            .iter()
            .filter(|(r, _)| self.rooms.contains_key(r))
            .map(|(r, stamp)| (*stamp, *r))
            .collect();
        live.sort_unstable();
        live.into_iter().map(|(_, r)| r).collect()
    }

    /// Where `conn` is in the room's members, if it is one (O(1)).
    fn member_index(&self, conn: ConnId, room_id: RoomId) -> Option<usize> {
        let i = *self.member_at.get(&conn)?;
        let room = self.rooms.get(&room_id)?;
        room.members.get(i).filter(|m| m.conn == conn).map(|_| i)
    }
}

/// The member at index `i` of the room's members (as [`Hub::member_index`] found it). A function
/// of the map alone, so that the caller may still use the hub's other fields (the wheel) while
/// it holds the member.
fn member_mut(rooms: &mut HashMap<RoomId, Room>, room: RoomId, i: usize) -> Option<&mut Member> {
    rooms.get_mut(&room).and_then(|r| r.members.get_mut(i))
}

/// Arms the room's message-expiry timer for its oldest entry's deadline, unless it is armed
/// already (it then fires at or before that deadline and arms itself again) or there is
/// nothing to expire. One timer per room, however many messages: O(1) per message.
fn arm_ttl(room: &mut Room, wheel: &mut Wheel<Timer>, id: RoomId, now: Now) {
    let (Some(ttl), None) = (room.message_ttl, room.ttl_timer) else {
        return;
    };
    let Some(sent_ms) = room.history.oldest_ms() else {
        return;
    };
    // Deadlines are wall-clock (ids carry the send time, the same on every node); the
    // wheel runs on the monotonic clock, so the wait is converted. A timer that fires early
    // (the wall clock moved) finds nothing due and arms itself again.
    // Rounded up to a multiple of EXPIRY_BATCH, so that messages sent close together expire
    // in one `expired` frame (each at most that much late).
    let due_wall = sent_ms
        .saturating_mul(1000)
        .saturating_add(ttl.0)
        .div_ceil(EXPIRY_BATCH.0)
        .saturating_mul(EXPIRY_BATCH.0);
    let wait = Micros(due_wall.saturating_sub(now.wall.0));
    room.ttl_timer = Some(wheel.arm(now.mono + wait, Timer::Messages(id)));
}

/// Entries sent at or before this Unix ms are past the room's `message_ttl` (if it has one).
fn expiry_cutoff(ttl: Option<Micros>, now: Now) -> Option<u64> {
    ttl.map(|t| now.wall.0.saturating_sub(t.0) / 1000)
}

/// How late a message may disappear so that its neighbours go in the same `expired` frame.
const EXPIRY_BATCH: Micros = Micros(250_000);

/// SHA-256 of an invite: all a room keeps of it.
fn invite_hash(invite: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(invite.as_bytes()).into()
}

/// Compares two hashes in time that does not depend on where they differ.
fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Gives a table's memory back after it emptied out: once fewer than a quarter of its places
/// are used, it is cut to twice what it holds. Amortised O(1): a cut follows at least as many
/// removals as the table then holds.
fn shrink<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

impl std::fmt::Debug for Hub {
    /// Counts only: never names, ids or messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("stats", &self.stats())
            .field("cluster", &self.cluster.as_ref().map(|c| c.up))
            .finish_non_exhaustive()
    }
}

/// Trims and checks a username: 2 to 50 characters, no control characters, no invisible
/// formatting characters (bidi overrides, zero-width characters, ...), which would let one
/// name pass for another or reorder the text shown around it.
pub fn validate_username(raw: &str) -> Result<&str, &'static str> {
    let name = raw.trim();
    // ASCII (almost every name): characters are bytes, and no format character is ASCII.
    let ascii = name.is_ascii();
    let n = if ascii {
        name.len()
    } else {
        name.chars().count()
    };
    if n < 2 {
        return Err("Username must be at least 2 characters long");
    }
    if n > 50 {
        return Err("Username must be at most 50 characters long");
    }
    if name.chars().any(char::is_control) {
        return Err("Username must not contain control characters");
    }
    if !ascii && name.chars().any(is_format_char) {
        return Err(
            "Username must not contain invisible formatting characters (bidi controls such as U+202E, zero-width characters such as U+200B, or line separators)",
        );
    }
    Ok(name)
}

/// Unicode General Category Cf (format) as of Unicode 15.1, plus the line and paragraph
/// separators (Zl, Zp): invisible characters that change how the text around them shows.
fn is_format_char(c: char) -> bool {
    const RANGES: &[(u32, u32)] = &[
        (0x00AD, 0x00AD),
        (0x0600, 0x0605),
        (0x061C, 0x061C),
        (0x06DD, 0x06DD),
        (0x070F, 0x070F),
        (0x0890, 0x0891),
        (0x08E2, 0x08E2),
        (0x180E, 0x180E),
        (0x200B, 0x200F),
        (0x2028, 0x202E),
        (0x2060, 0x2064),
        (0x2066, 0x206F),
        (0xFEFF, 0xFEFF),
        (0xFFF9, 0xFFFB),
        (0x110BD, 0x110BD),
        (0x110CD, 0x110CD),
        (0x13430, 0x1343F),
        (0x1BCA0, 0x1BCA3),
        (0x1D173, 0x1D17A),
        (0xE0001, 0xE0001),
        (0xE0020, 0xE007F),
    ];
    let c = u32::from(c);
    // Sorted and disjoint: the last range starting at or before `c` is the only candidate.
    let i = RANGES.partition_point(|&(lo, _)| lo <= c);
    i > 0 && c <= RANGES[i - 1].1
}

#[cfg(test)]
mod tests;
