//! The REST API and the WebSocket upgrade decision: request in, `Reply` out. Pure.
//!
//! Routing is a `match` on the path segments (both slash forms), then on the method.
//! Handlers ask the [`Hub`] and build the exact JSON of the contract (`docs/API.md`).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;

use serde::Deserialize;

use crate::cluster::{Answer, Facts, Query};
use crate::http::{self, Method, Request, Response};
use crate::hub::{Hub, HubError, RoomOptions, RoomSettings, validate_username};
use crate::ids::{MsgId, RoomId, SessionId, UserId};
use crate::protocol::{self, json_str};
use crate::ratelimit::CreateLimiter;
use crate::time::{Micros, Now};

/// What the event loop must do with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Send this response (the connection may stay open for the next request).
    Response(Response),
    /// Accept the WebSocket: write 101, then `Hub::connect`.
    Upgrade {
        /// The room to join.
        room: RoomId,
        /// The authenticated session joining it.
        session: SessionId,
        /// `?since=`: the client's last message id; the welcome holds only newer history.
        since: Option<MsgId>,
        /// Cluster mode: who is in the room on other nodes.
        elsewhere: Vec<(String, UserId)>,
    },
    /// Accept the WebSocket on the conformance echo endpoint.
    Echo,
    /// Render `/metrics` (the loop owns the counters).
    Metrics,
    /// Cluster mode: fetch the queries pushed on `ClusterReq::wants`, then ask again.
    Fetch,
}

impl From<Response> for Reply {
    fn from(r: Response) -> Reply {
        Reply::Response(r)
    }
}

/// Cluster mode's view of one request: whether Redis is reachable, what has been fetched
/// for this request so far, and where to ask for more.
#[derive(Debug)]
pub struct ClusterReq<'a> {
    /// Redis is reachable now (else requests that need it get 503 [`REDIS_DOWN`]).
    pub up: bool,
    /// What Redis answered for this request so far (sessions, rooms, settings, presence).
    pub facts: &'a Facts,
    /// Where the handler asks for what it still lacks before it can answer ([`Reply::Fetch`]).
    pub wants: &'a mut Vec<Query>,
}

/// Settings, time and the client's address for one request.
#[derive(Debug)]
pub struct ApiCtx<'a> {
    /// The loop's clock reading for this request.
    pub now: Now,
    /// `GET /rooms/all` answers (`--room-list`); 404 otherwise.
    pub room_list: bool,
    /// `--echo-path`: the path of the conformance echo WebSocket, if on.
    pub echo_path: Option<&'a str>,
    /// The client's address: the peer, or the one a trusted proxy named.
    pub peer: IpAddr,
    /// The per-address budget for creating sessions and rooms (`--create-rate`).
    pub limiter: &'a mut CreateLimiter,
    /// `Some` in cluster mode.
    pub cluster: Option<ClusterReq<'a>>,
}

/// The answer to the request when Redis is away (cluster mode).
pub const REDIS_DOWN: &str = "The shared store (Redis) is unavailable; this server cannot do that right now. Try again shortly.";

fn redis_down() -> Response {
    Response {
        retry_after: Some(1),
        ..Response::error(503, REDIS_DOWN)
    }
}

/// Cluster mode: the fetched answer to `q`, or `None` after asking for it (answer
/// `Reply::Fetch` then); 503 when Redis is away.
fn ask<'f>(c: &mut ClusterReq<'f>, q: Query) -> Result<Option<&'f Answer>, Response> {
    let facts: &'f Facts = c.facts;
    if let Some(a) = facts.get(q) {
        return Ok(Some(a));
    }
    if facts.failed || !c.up {
        return Err(redis_down());
    }
    c.wants.push(q);
    Ok(None)
}

/// Cluster mode: writes need Redis.
fn need_redis(ctx: &ApiCtx<'_>) -> Result<(), Reply> {
    match &ctx.cluster {
        Some(c) if !c.up || c.facts.failed => Err(redis_down().into()),
        _ => Ok(()),
    }
}

/// Cluster mode: what Redis says of a room for one caller, fetched fresh for this request.
#[derive(Debug, Clone, Copy)]
struct RoomFacts {
    /// `None`: no such room.
    settings: Option<RoomSettings>,
    /// The session is among the room's members (`chatloop:sr:{session}`).
    member: bool,
}

impl RoomFacts {
    /// The room's settings if the caller may see it: any room, a private one only for its
    /// members. `None` answers exactly as a missing room does.
    fn visible(&self) -> Option<RoomSettings> {
        self.settings.filter(|s| !s.is_private() || self.member)
    }
}

/// Cluster mode: the room's settings as Redis has them now (the invite may have been
/// rotated on another node) and whether `session` is a member (it may have joined or left
/// on another node), asked together, so that a private room refused takes as many round
/// trips as a missing one. `Ok(None)`: asked; answer [`Reply::Fetch`].
fn room_facts(
    c: &mut ClusterReq<'_>,
    session: Option<SessionId>,
    room: RoomId,
) -> Result<Option<RoomFacts>, Response> {
    let exists = ask(c, Query::RoomExists(room))?;
    let member = match session {
        Some(s) => ask(c, Query::Member(s, room))?.map(|a| matches!(a, Answer::Member(true))),
        None => Some(false),
    };
    Ok(match (exists, member) {
        (Some(Answer::Room(settings)), Some(member)) => Some(RoomFacts {
            settings: *settings,
            member,
        }),
        (Some(_), Some(member)) => Some(RoomFacts {
            settings: None,
            member,
        }),
        _ => None,
    })
}

pub use crate::web::{DOCS_HTML, INDEX_HTML, OPENAPI_JSON};

const ALLOW_GET: &str = "Allow: GET, HEAD, OPTIONS\r\n";
const ALLOW_POST: &str = "Allow: POST, OPTIONS\r\n";
const ALLOW_GET_POST: &str = "Allow: GET, HEAD, POST, OPTIONS\r\n";
const ALLOW_GET_DELETE: &str = "Allow: GET, HEAD, DELETE, OPTIONS\r\n";
const ALLOW_DELETE: &str = "Allow: DELETE, OPTIONS\r\n";
const HTML: &str = "text/html; charset=utf-8";

/// Answers one request.
pub fn handle(req: &Request<'_>, body: &[u8], hub: &mut Hub, ctx: &mut ApiCtx<'_>) -> Reply {
    let room_path = req.path.starts_with("/rooms/") || req.path.starts_with("/ws/");
    if room_path
        && req.method != Method::Options
        && let Err(wait) = ctx.limiter.check(ctx.peer, ctx.now.mono)
    {
        return Reply::Response(too_many(wait));
    }
    let reply = route(req, body, hub, ctx);
    if let Some(c) = &ctx.cluster
        && !matches!(reply, Reply::Fetch)
        && !c.facts.is_empty()
    {
        log::debug!(
            "{:?} {} answered after fetching from Redis",
            req.method,
            req.path
        );
    }
    if room_path && matches!(&reply, Reply::Response(r) if r.status == 404) {
        // Missing rooms spend the creation budget, so room ids cannot be guessed quickly.
        let _ = ctx.limiter.take(ctx.peer, ctx.now.mono);
    }
    reply
}

fn route(req: &Request<'_>, body: &[u8], hub: &mut Hub, ctx: &mut ApiCtx<'_>) -> Reply {
    let path = match req.path.strip_suffix('/') {
        Some(p) if !p.is_empty() => p,
        _ => req.path,
    };
    if req.method == Method::Options {
        let preflight = Response {
            status: 204,
            body: http::Body::Empty,
            ..Response::json(204, Vec::new())
        };
        return Reply::Response(preflight.with_extra(http::PREFLIGHT));
    }
    if ctx.echo_path == Some(path) {
        return match upgrade_problem(req) {
            Some(r) => Reply::Response(r),
            None => Reply::Echo,
        };
    }
    let m = if req.method == Method::Head {
        Method::Get
    } else {
        req.method
    };
    let mut parts = path.strip_prefix('/').unwrap_or(path).split('/');
    let seg = (parts.next(), parts.next(), parts.next(), parts.next());
    let r = match (seg, m) {
        ((Some(""), None, ..), Method::Get) => {
            Response::static_body(200, HTML, INDEX_HTML.as_bytes())
        }
        ((Some("docs"), None, ..), Method::Get) => {
            Response::static_body(200, HTML, DOCS_HTML.as_bytes())
        }
        ((Some("openapi.json"), None, ..), Method::Get) => {
            Response::static_body(200, http::JSON, OPENAPI_JSON.as_bytes())
        }
        ((Some("health"), None, ..), Method::Get) => match &ctx.cluster {
            Some(c) => cluster_health(c.up),
            None => health(),
        },
        ((Some("ping"), None, ..), Method::Get) => {
            Response::static_body(200, http::JSON, b"{\"message\":\"pong\"}")
        }
        ((Some("metrics"), None, ..), Method::Get) => return Reply::Metrics,
        ((Some("sessions"), None, ..), Method::Post) => return create_session(body, hub, ctx),
        ((Some("sessions"), Some("me"), None, _), Method::Get) => return me(req, hub, ctx),
        ((Some("sessions"), Some("me"), None, _), Method::Delete) => {
            return end_session(req, hub, ctx);
        }
        ((Some("rooms"), None, ..), Method::Post) => return create_room(req, body, hub, ctx),
        ((Some("rooms"), None, ..), Method::Get) => return my_rooms(req, hub, ctx),
        ((Some("rooms"), Some("all"), None, _), Method::Get) if ctx.room_list => {
            return all_rooms(hub, ctx);
        }
        ((Some("rooms"), Some("all"), None, _), _) if ctx.room_list => {
            method_not_allowed(ALLOW_GET)
        }
        ((Some("rooms"), Some(id), rest, None), m) => match (RoomId::parse(id), rest, m) {
            (None, ..) => not_found(),
            (Some(room), None, Method::Get) => return room_info(req, hub, room, ctx),
            (Some(room), Some("join"), Method::Post) => return join(req, body, hub, room, ctx),
            (Some(room), Some("invite"), Method::Post) => {
                return rotate_invite(req, hub, room, ctx);
            }
            (Some(room), Some("leave"), Method::Delete) => return leave(req, hub, room, ctx),
            (Some(room), Some("messages"), Method::Get) => return messages(req, hub, room, ctx),
            (Some(_), None, _) | (Some(_), Some("messages"), _) => method_not_allowed(ALLOW_GET),
            (Some(_), Some("join" | "invite"), _) => method_not_allowed(ALLOW_POST),
            (Some(_), Some("leave"), _) => method_not_allowed(ALLOW_DELETE),
            _ => not_found(),
        },
        ((Some("ws"), Some(id), None, _), Method::Get) => return upgrade(req, hub, id, ctx),
        ((Some("" | "docs" | "openapi.json" | "health" | "ping" | "metrics"), None, ..), _)
        | ((Some("ws"), Some(_), None, _), _) => method_not_allowed(ALLOW_GET),
        ((Some("sessions"), None, ..), _) => method_not_allowed(ALLOW_POST),
        ((Some("sessions"), Some("me"), None, _), _) => method_not_allowed(ALLOW_GET_DELETE),
        ((Some("rooms"), None, ..), _) => method_not_allowed(ALLOW_GET_POST),
        _ => not_found(),
    };
    Reply::Response(r)
}

/// `/health`'s answer on one node: the same bytes every time (`crate::VERSION` is this
/// crate's version).
const HEALTH: &str = concat!(
    "{\"status\":\"ok\",\"version\":\"",
    env!("CARGO_PKG_VERSION"),
    "\"}"
);

fn health() -> Response {
    Response::static_body(200, http::JSON, HEALTH.as_bytes())
}

/// Cluster mode's `/health`: also says whether Redis is reachable.
fn cluster_health(up: bool) -> Response {
    let (status, redis) = if up {
        ("ok", "up")
    } else {
        ("degraded", "down")
    };
    let b = format!(
        "{{\"status\":\"{status}\",\"version\":\"{}\",\"redis\":\"{redis}\"}}",
        crate::VERSION
    );
    Response::json(200, b.into_bytes())
}

#[derive(Deserialize)]
struct NewSession<'a> {
    #[serde(borrow, default)]
    username: Option<Cow<'a, str>>,
}

/// The body every client sends, `{"username":"NAME"}` byte for byte with NAME free of
/// quotes, backslashes and control characters: its NAME, read without serde. Any other body
/// gives `None` and goes to serde, which reads this shape to the same name, so the answer
/// is the same either way.
fn plain_username(body: &[u8]) -> Option<&str> {
    let name = body
        .strip_prefix(b"{\"username\":\"")?
        .strip_suffix(b"\"}")?;
    if name.iter().any(|&b| b == b'"' || b == b'\\' || b < 0x20) {
        return None;
    }
    std::str::from_utf8(name).ok()
}

fn create_session(body: &[u8], hub: &mut Hub, ctx: &mut ApiCtx<'_>) -> Reply {
    if let Err(r) = need_redis(ctx) {
        return r;
    }
    create_session_here(body, hub, ctx).into()
}

fn create_session_here(body: &[u8], hub: &mut Hub, ctx: &mut ApiCtx<'_>) -> Response {
    let now = ctx.now;
    if let Err(wait) = ctx.limiter.take(ctx.peer, now.mono) {
        return too_many(wait);
    }
    let missing = || {
        let mut b = b"{\"detail\":\"Field required: username (a string)\",\"errors\":[{\"loc\":[\"body\",\"username\"],".to_vec();
        b.extend_from_slice(b"\"msg\":\"Field required\",\"type\":\"missing\"}]}");
        Response::json(422, b)
    };
    if body.trim_ascii().is_empty() {
        return missing();
    }
    // serde would also read a struct from a JSON array (`["alice"]`): only objects count.
    if !body.trim_ascii_start().starts_with(b"{") {
        return match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            Ok(_) => missing(),
            Err(_) => Response::error(400, "Request body is not valid JSON"),
        };
    }
    let parsed = match plain_username(body) {
        Some(n) => Ok(NewSession {
            username: Some(Cow::Borrowed(n)),
        }),
        None => serde_json::from_slice::<NewSession<'_>>(body),
    };
    let name = match parsed {
        Ok(NewSession { username: Some(n) }) => n,
        Ok(_) => return missing(),
        Err(e) if e.is_data() => return missing(),
        Err(_) => return Response::error(400, "Request body is not valid JSON"),
    };
    let name = match validate_username(&name) {
        Ok(n) => n,
        Err(why) => return Response::error(400, why),
    };
    match hub.create_session(name, now) {
        Ok((id, user_id)) => {
            let mut b = Vec::with_capacity(128);
            b.extend_from_slice(b"{\"session_id\":\"");
            b.extend_from_slice(&id.text());
            b.extend_from_slice(b"\",\"username\":");
            json_str(&mut b, name);
            b.extend_from_slice(b",\"user_id\":\"");
            b.extend_from_slice(&user_id.hex());
            b.extend_from_slice(b"\"}");
            Response::json(201, b)
        }
        Err(e) => hub_error(e),
    }
}

fn me(req: &Request<'_>, hub: &mut Hub, ctx: &mut ApiCtx<'_>) -> Reply {
    let id = match auth(req, hub, ctx) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let Some(view) = hub.session_view(id) else {
        return invalid_session().into();
    };
    let rooms = match session_rooms(hub, id, ctx) {
        Ok(rooms) => rooms,
        Err(r) => return r,
    };
    let mut b = Vec::with_capacity(128);
    let _ = write!(b, "{{\"session_id\":\"{id}\",\"username\":");
    json_str(&mut b, &view.username);
    let _ = write!(b, ",\"user_id\":\"{}\",\"joined_rooms\":", view.user_id);
    write_room_list(&mut b, rooms.into_iter());
    b.push(b'}');
    Response::json(200, b).into()
}

/// The session's rooms that still exist (cluster mode: as Redis has them).
fn session_rooms(hub: &Hub, id: SessionId, ctx: &mut ApiCtx<'_>) -> Result<Vec<RoomId>, Reply> {
    let Some(c) = ctx.cluster.as_mut() else {
        return Ok(hub.session_rooms(id));
    };
    match ask(c, Query::SessionRooms(id))? {
        None => Err(Reply::Fetch),
        Some(Answer::Rooms(r)) => Ok(r.clone()),
        Some(_) => Ok(Vec::new()),
    }
}

fn end_session(req: &Request<'_>, hub: &mut Hub, ctx: &mut ApiCtx<'_>) -> Reply {
    let id = match auth_write(req, hub, ctx) {
        Ok(id) => id,
        Err(r) => return r,
    };
    hub.end_session(id, ctx.now);
    Response::static_body(200, http::JSON, b"{\"message\":\"Session ended\"}").into()
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct NewRoomBody {
    private: bool,
    message_ttl: Option<u64>,
}

/// Reads `POST /rooms`'s optional body: nothing (the original client), or a JSON object
/// with `private` and `message_ttl` (seconds, within the configured bounds).
fn room_options(body: &[u8], hub: &Hub) -> Result<RoomOptions, Response> {
    let (min, max) = hub.message_ttl_bounds();
    let bad = || {
        let detail = format!(
            "The body may have private (true or false) and message_ttl (whole seconds from {} to {})",
            min.0.div_ceil(1_000_000),
            max.0 / 1_000_000
        );
        Response::error(422, &detail)
    };
    if body.trim_ascii().is_empty() {
        return Ok(RoomOptions::default());
    }
    if !body.trim_ascii_start().starts_with(b"{") {
        return match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            Ok(_) => Err(bad()),
            Err(_) => Err(Response::error(400, "Request body is not valid JSON")),
        };
    }
    let b = match serde_json::from_slice::<NewRoomBody>(body) {
        Ok(b) => b,
        Err(e) if e.is_data() => return Err(bad()),
        Err(_) => return Err(Response::error(400, "Request body is not valid JSON")),
    };
    let message_ttl = match b.message_ttl {
        None => None,
        Some(secs) => {
            let ttl = Micros(secs.saturating_mul(1_000_000));
            if ttl < min || ttl > max {
                let detail = format!(
                    "message_ttl must be from {} to {} seconds (--min-message-ttl, --max-message-ttl)",
                    min.0.div_ceil(1_000_000),
                    max.0 / 1_000_000
                );
                return Err(Response::error(422, &detail));
            }
            Some(ttl)
        }
    };
    Ok(RoomOptions {
        private: b.private,
        message_ttl,
    })
}

fn create_room(req: &Request<'_>, body: &[u8], hub: &mut Hub, ctx: &mut ApiCtx<'_>) -> Reply {
    let now = ctx.now;
    let id = match auth(req, hub, ctx) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let opts = match room_options(body, hub) {
        Ok(o) => o,
        Err(r) => return r.into(),
    };
    if let Err(r) = need_redis(ctx) {
        return r;
    }
    if let Err(wait) = ctx.limiter.check(ctx.peer, ctx.now.mono) {
        return too_many(wait).into();
    }
    match hub.create_room_with(id, opts, now) {
        Ok(room) => {
            // Only a room actually created spends the budget (check said there is a token).
            let _ = ctx.limiter.take(ctx.peer, now.mono);
            let mut b = format!("{{\"room_id\":\"{}\"", room.id);
            if let Some(invite) = room.invite {
                let _ = write!(b, ",\"invite\":\"{invite}\"");
            }
            if let Some(ttl) = opts.message_ttl {
                let _ = write!(b, ",\"message_ttl\":{}", ttl.0 / 1_000_000);
            }
            b.push('}');
            Response::json(201, b.into_bytes())
        }
        Err(HubError::TooManyRoomsForSession) => too_many_rooms(hub.max_rooms_per_session()),
        Err(e) => hub_error(e),
    }
    .into()
}

fn my_rooms(req: &Request<'_>, hub: &mut Hub, ctx: &mut ApiCtx<'_>) -> Reply {
    let id = match auth(req, hub, ctx) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match session_rooms(hub, id, ctx) {
        Ok(rooms) => rooms_body(rooms.into_iter()).into(),
        Err(r) => r,
    }
}

fn all_rooms(hub: &Hub, ctx: &mut ApiCtx<'_>) -> Reply {
    let Some(c) = ctx.cluster.as_mut() else {
        return rooms_body(hub.all_rooms()).into();
    };
    match ask(c, Query::AllRooms) {
        Err(r) => r.into(),
        Ok(None) => Reply::Fetch,
        Ok(Some(Answer::Rooms(r))) => rooms_body(r.iter().copied()).into(),
        Ok(Some(_)) => rooms_body(std::iter::empty()).into(),
    }
}

fn rooms_body(rooms: impl Iterator<Item = RoomId>) -> Response {
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(b"{\"rooms\":");
    write_room_list(&mut b, rooms);
    b.push(b'}');
    Response::json(200, b)
}

fn write_room_list(b: &mut Vec<u8>, rooms: impl Iterator<Item = RoomId>) {
    b.push(b'[');
    for (i, r) in rooms.enumerate() {
        if i > 0 {
            b.push(b',');
        }
        b.push(b'"');
        b.extend_from_slice(&r.hex());
        b.push(b'"');
    }
    b.push(b']');
}

/// The bearer token, if the request has a well-formed one for a session this node knows
/// (no refusal when it has not: `GET /rooms/{id}` needs no session for public rooms).
fn optional_session(req: &Request<'_>, hub: &Hub, now: Now) -> Option<SessionId> {
    bearer_token(req).filter(|id| hub.has_session(*id, now))
}

/// The well-formed bearer token of the request, if any (not checked).
fn bearer_token(req: &Request<'_>) -> Option<SessionId> {
    req.authorization
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .and_then(|(_, t)| SessionId::parse(t.trim()))
}

/// `GET /rooms/{id}`'s answer.
fn room_body(room: RoomId, user_count: usize, private: bool, ttl: Option<Micros>) -> Response {
    let mut b = Vec::with_capacity(96);
    b.extend_from_slice(b"{\"room_id\":\"");
    b.extend_from_slice(&room.hex());
    b.extend_from_slice(b"\",\"exists\":true,\"user_count\":");
    http::push_decimal(&mut b, user_count as u64);
    if private {
        b.extend_from_slice(b",\"private\":true");
    }
    if let Some(ttl) = ttl {
        b.extend_from_slice(b",\"message_ttl\":");
        http::push_decimal(&mut b, ttl.0 / 1_000_000);
    }
    b.push(b'}');
    Response::json(200, b)
}

fn room_info(req: &Request<'_>, hub: &Hub, room: RoomId, ctx: &mut ApiCtx<'_>) -> Reply {
    let Some(c) = ctx.cluster.as_mut() else {
        let session = optional_session(req, hub, ctx.now);
        return match hub.room_view(room, session) {
            None => room_not_found(),
            Some(v) => room_body(room, v.user_count, v.private, v.message_ttl),
        }
        .into();
    };
    // Membership is asked whenever there is a token (a private room is visible to its
    // members only), in the same round as the rest.
    let facts = match room_facts(c, bearer_token(req), room) {
        Err(r) => return r.into(),
        Ok(f) => f,
    };
    let count = match ask(c, Query::UserCount(room)) {
        Err(r) => return r.into(),
        Ok(a) => a,
    };
    let (Some(facts), Some(count)) = (facts, count) else {
        return Reply::Fetch;
    };
    match facts.visible() {
        None => room_not_found(),
        Some(s) => {
            let n = match count {
                Answer::Count(n) => *n,
                _ => 0,
            };
            room_body(room, n, s.is_private(), s.message_ttl)
        }
    }
    .into()
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct JoinBody<'a> {
    #[serde(borrow)]
    invite: Option<Cow<'a, str>>,
}

fn join(
    req: &Request<'_>,
    body: &[u8],
    hub: &mut Hub,
    room: RoomId,
    ctx: &mut ApiCtx<'_>,
) -> Reply {
    let id = match auth_write(req, hub, ctx) {
        Ok(id) => id,
        Err(r) => return r,
    };
    // Cluster mode: a room this node has not seen, or a private one (its invite as Redis
    // has it now, and whether the session is a member already), is asked of Redis; the
    // answers are installed in the hub, which then decides as on one node.
    if let Some(c) = ctx.cluster.as_mut()
        && (!hub.room_exists(room) || hub.room_private(room))
    {
        match room_facts(c, Some(id), room) {
            Err(r) => return r.into(),
            Ok(None) => return Reply::Fetch,
            Ok(Some(f)) if f.settings.is_none() || !hub.room_exists(room) => {
                return room_not_found().into();
            }
            Ok(Some(_)) => {}
        }
    }
    // No body (the original client) or one without an invite: fine for public rooms. A body
    // that is not a JSON object with a string invite counts as no invite, so that a private
    // room cannot be told from a missing one by how its join answers a malformed body.
    let parsed = if body.trim_ascii_start().starts_with(b"{") {
        serde_json::from_slice::<JoinBody<'_>>(body).unwrap_or_default()
    } else {
        JoinBody::default()
    };
    match hub.join_with_invite(id, room, parsed.invite.as_deref()) {
        Ok(()) => Response::json(
            200,
            format!("{{\"message\":\"Joined room {room}\"}}").into_bytes(),
        ),
        Err(e) => hub_error(e),
    }
    .into()
}

fn rotate_invite(req: &Request<'_>, hub: &mut Hub, room: RoomId, ctx: &mut ApiCtx<'_>) -> Reply {
    let id = match auth_write(req, hub, ctx) {
        Ok(id) => id,
        Err(r) => return r,
    };
    if let Some(c) = ctx.cluster.as_mut() {
        // Membership as Redis has it (the session may have joined on another node); the
        // hub checks it and that the room is private. Redis replaces the hash only while
        // the room's settings exist.
        match room_facts(c, Some(id), room) {
            Err(r) => return r.into(),
            Ok(None) => return Reply::Fetch,
            Ok(Some(f)) if f.visible().is_none() || !hub.room_exists(room) => {
                return room_not_found().into();
            }
            Ok(Some(_)) => {}
        }
    }
    match hub.rotate_invite(id, room) {
        Ok(invite) => Response::json(200, format!("{{\"invite\":\"{invite}\"}}").into_bytes()),
        Err(e) => hub_error(e),
    }
    .into()
}

fn leave(req: &Request<'_>, hub: &mut Hub, room: RoomId, ctx: &mut ApiCtx<'_>) -> Reply {
    let id = match auth_write(req, hub, ctx) {
        Ok(id) => id,
        Err(r) => return r,
    };
    hub.leave_room(id, room);
    Response::json(
        200,
        format!("{{\"message\":\"Left room {room}\"}}").into_bytes(),
    )
    .into()
}

fn messages(req: &Request<'_>, hub: &mut Hub, room: RoomId, ctx: &mut ApiCtx<'_>) -> Reply {
    let session = match auth(req, hub, ctx) {
        Ok(id) => id,
        Err(r) => return r,
    };
    if ctx.cluster.is_none() && !hub.room_visible(room, Some(session)) {
        return room_not_found().into();
    }
    let limit = match http::query_param(req.query, "limit") {
        None => 50,
        Some(v) => match v.parse::<usize>() {
            Ok(n @ 1..=1000) => n,
            _ => {
                return Response::json(
                    422,
                    b"{\"detail\":\"limit must be a whole number from 1 to 1000\",\"errors\":[{\"loc\":[\"query\",\"limit\"],\"msg\":\"Input should be between 1 and 1000\",\"type\":\"range\"}]}".to_vec(),
                )
                .into();
            }
        },
    };
    let before = match http::query_param(req.query, "before") {
        None | Some("") => None,
        Some(v) => match MsgId::parse(v) {
            Some(id) => Some(id),
            None => {
                return Response::json(
                    422,
                    b"{\"detail\":\"before must be a message id\",\"errors\":[{\"loc\":[\"query\",\"before\"],\"msg\":\"Input should be a message id (a UUID)\",\"type\":\"uuid_parsing\"}]}".to_vec(),
                )
                .into();
            }
        },
    };
    let mut b = Vec::with_capacity(256);
    b.extend_from_slice(b"{\"messages\":[");
    let now = ctx.now;
    let truncated = match ctx.cluster.as_mut() {
        Some(c) if !hub.room_live(room) || hub.room_private(room) => {
            // Not subscribed here (Redis has the history, all of it when paging back), or
            // private (membership as Redis has it): asked in one round.
            let facts = match room_facts(c, Some(session), room) {
                Err(r) => return r.into(),
                Ok(f) => f,
            };
            let history = if hub.room_live(room) {
                None
            } else {
                let n = if before.is_some() { HISTORY_ALL } else { limit };
                match ask(c, Query::History(room, n)) {
                    Err(r) => return r.into(),
                    Ok(None) => return Reply::Fetch,
                    Ok(Some(a)) => Some(a),
                }
            };
            let Some(facts) = facts else {
                return Reply::Fetch;
            };
            let Some(settings) = facts.visible() else {
                return room_not_found().into();
            };
            match history {
                None => {
                    hub.expire_due(room, now);
                    match hub.write_history(room, limit, before, &mut b) {
                        Some(truncated) => truncated,
                        None => return room_not_found().into(),
                    }
                }
                Some(Answer::Messages(m)) => {
                    // Redis may still hold messages past the room's message_ttl (it drops
                    // them when a node trims): they are never served.
                    let kept: Cow<'_, [Vec<u8>]> = match settings.message_ttl {
                        None => Cow::Borrowed(m),
                        Some(ttl) => {
                            let cutoff = now.wall.0.saturating_sub(ttl.0) / 1000;
                            Cow::Owned(
                                m.iter()
                                    .filter(|e| {
                                        protocol::event_id(e)
                                            .is_some_and(|id| id.unix_ms() > cutoff)
                                    })
                                    .cloned()
                                    .collect(),
                            )
                        }
                    };
                    let (page, truncated) =
                        page_back(&kept, before, limit, hub.max_welcome_bytes());
                    protocol::write_joined(&mut b, page.iter().map(Vec::as_slice));
                    truncated
                }
                Some(_) => false,
            }
        }
        _ => {
            hub.expire_due(room, now);
            match hub.write_history(room, limit, before, &mut b) {
                Some(truncated) => truncated,
                None => return room_not_found().into(),
            }
        }
    };
    b.push(b']');
    if truncated {
        b.extend_from_slice(b",\"truncated\":true");
    }
    b.push(b'}');
    Response::json(200, b).into()
}

/// `Query::History` for a whole room's history (paging back needs all of it).
const HISTORY_ALL: usize = 1_000_000;

/// Cluster mode's history from Redis, cut as [`Hub::write_history`] cuts a node's own copy:
/// the last `limit` messages older than `before` (none when `before` is not among them),
/// the newest first within `bytes`. Also says whether anything was left out.
fn page_back(
    messages: &[Vec<u8>],
    before: Option<MsgId>,
    limit: usize,
    bytes: usize,
) -> (&[Vec<u8>], bool) {
    let end = match before {
        None => messages.len(),
        Some(id) => match messages
            .iter()
            .rposition(|m| protocol::event_id(m) == Some(id))
        {
            Some(i) => i,
            None => return (&[], true),
        },
    };
    let mut start = end;
    let mut used = 0;
    while start > 0 && end - start < limit {
        let size = messages[start - 1].len() + 1;
        if start < end && used + size > bytes {
            return (&messages[start..end], true);
        }
        used += size;
        start -= 1;
    }
    (&messages[start..end], false)
}

fn upgrade(req: &Request<'_>, hub: &mut Hub, room: &str, ctx: &mut ApiCtx<'_>) -> Reply {
    let now = ctx.now;
    if let Some(r) = upgrade_problem(req) {
        return Reply::Response(r);
    }
    let session = http::query_param(req.query, "session_id").and_then(SessionId::parse);
    let Some(session) = session else {
        return Reply::Response(Response::error(403, "Invalid or expired session"));
    };
    let since = match http::query_param(req.query, "since") {
        None | Some("") => None,
        Some(v) => match MsgId::parse(v) {
            Some(id) => Some(id),
            None => return Reply::Response(Response::error(400, "since must be a message id")),
        },
    };
    let Some(room) = RoomId::parse(room) else {
        return Reply::Response(room_not_found());
    };
    let mut elsewhere = Vec::new();
    if let Some(c) = ctx.cluster.as_mut() {
        match cluster_join(hub, c, session, room, now) {
            Ok(users) => elsewhere = users,
            Err(r) => return r,
        }
    }
    match hub.check_connect(session, room, now) {
        Ok(()) => match hub.take_upgrade(session, now) {
            Ok(()) => Reply::Upgrade {
                room,
                session,
                since,
                elsewhere,
            },
            Err(wait) => Reply::Response(too_many_upgrades(wait)),
        },
        Err(HubError::InvalidSession) => {
            Reply::Response(Response::error(403, "Invalid or expired session"))
        }
        Err(e) => Reply::Response(hub_error(e)),
    }
}

/// Cluster mode: what a WebSocket join needs from Redis, in two rounds: the session and
/// the room (this node may not know them), then the room's presence and, unless this node
/// is already subscribed, its history. Returns who is in the room (all nodes).
fn cluster_join(
    hub: &Hub,
    c: &mut ClusterReq<'_>,
    session: SessionId,
    room: RoomId,
    now: Now,
) -> Result<Vec<(String, UserId)>, Reply> {
    if !c.up || c.facts.failed {
        return Err(redis_down().into());
    }
    let mut waiting = false;
    if !hub.has_session(session, now) {
        match ask(c, Query::Session(session))? {
            None => waiting = true,
            Some(Answer::Session(Some(_))) if hub.has_session(session, now) => {}
            Some(_) => return Err(Response::error(403, "Invalid or expired session").into()),
        }
    }
    if !hub.room_exists(room) || hub.room_private(room) {
        // With membership (a private room's, as Redis has it now), in the same round, so
        // that a private room refused takes as many round trips as a missing one; nothing
        // of a private room is loaded for a session that is not a member.
        match room_facts(c, Some(session), room)? {
            None => waiting = true,
            Some(f) if f.visible().is_some() && hub.room_exists(room) => {}
            Some(_) => return Err(room_not_found().into()),
        }
    }
    if waiting {
        return Err(Reply::Fetch);
    }
    let users = ask(c, Query::Presence(room))?;
    let loaded = hub.room_live(room) || ask(c, Query::Subscribe(room))?.is_some();
    match users {
        Some(Answer::Users(u)) if loaded => Ok(u.clone()),
        Some(_) if loaded => Ok(Vec::new()),
        _ => Err(Reply::Fetch),
    }
}

/// Why a request is not a WebSocket upgrade we accept, if it is not.
fn upgrade_problem(req: &Request<'_>) -> Option<Response> {
    if req.method != Method::Get {
        return Some(method_not_allowed(ALLOW_GET));
    }
    if !req.upgrade {
        return Some(
            Response::error(
                426,
                "This endpoint needs a WebSocket upgrade (Upgrade: websocket)",
            )
            .with_extra("Upgrade: websocket\r\n"),
        );
    }
    if !req.connection_upgrade {
        return Some(Response::error(
            400,
            "A WebSocket upgrade needs Connection: Upgrade",
        ));
    }
    if req.ws_version != Some(b"13") {
        return Some(
            Response::error(426, "Only WebSocket version 13 is supported")
                .with_extra("Sec-WebSocket-Version: 13\r\n"),
        );
    }
    match req.ws_key {
        Some(k) if crate::ws::valid_key(k) => None,
        _ => Some(Response::error(400, "Missing or invalid Sec-WebSocket-Key")),
    }
}

/// The caller's session for a call that changes shared state: [`auth`], then in cluster
/// mode only while Redis is up ([`need_redis`]). `Err` is the reply.
fn auth_write(req: &Request<'_>, hub: &mut Hub, ctx: &mut ApiCtx<'_>) -> Result<SessionId, Reply> {
    let id = auth(req, hub, ctx)?;
    need_redis(ctx)?;
    Ok(id)
}

/// Reads `Authorization: Bearer <session_id>` and checks the session (cluster mode: asks
/// Redis about a session this node does not know).
fn auth(req: &Request<'_>, hub: &mut Hub, ctx: &mut ApiCtx<'_>) -> Result<SessionId, Reply> {
    let now = ctx.now;
    let token = req
        .authorization
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .and_then(|(_, t)| SessionId::parse(t.trim()));
    let Some(id) = token else {
        return Err(Response::error(
            401,
            "Not authenticated: send Authorization: Bearer <session_id>",
        )
        .with_extra("WWW-Authenticate: Bearer\r\n")
        .into());
    };
    if let Some(c) = ctx.cluster.as_mut()
        && !hub.has_session(id, now)
    {
        match ask(c, Query::Session(id))? {
            None => return Err(Reply::Fetch),
            Some(Answer::Session(Some(_))) if hub.has_session(id, now) => {}
            Some(_) => return Err(invalid_session().into()),
        }
    }
    hub.authenticate(id, now)
        .map(|()| id)
        .map_err(|_| invalid_session().into())
}

fn invalid_session() -> Response {
    Response::error(401, "Invalid or expired session")
        .with_extra("WWW-Authenticate: Bearer error=\"invalid_token\"\r\n")
}

fn hub_error(e: HubError) -> Response {
    match e {
        HubError::InvalidSession => invalid_session(),
        HubError::RoomNotFound => room_not_found(),
        HubError::RoomFull => Response::error(503, "Room is full"),
        HubError::TooManySessions => {
            Response::error(503, "Too many sessions on this server; try again later")
        }
        HubError::TooManyRooms => {
            Response::error(503, "Too many rooms on this server; try again later")
        }
        HubError::TooManyRoomsForSession => too_many_rooms(0),
    }
}

/// 429 for `--max-rooms-per-session`. No `Retry-After`: a place frees up only when one of
/// the session's rooms expires (`--room-ttl` after its last connection closes).
fn too_many_rooms(max: usize) -> Response {
    let detail = format!(
        "This session already has {max} live rooms, the most it may create; \
         use one of them, or create another once one of them has expired"
    );
    Response::error(429, &detail)
}

fn too_many(wait: u32) -> Response {
    let detail =
        format!("Too many sessions, rooms or unknown rooms from your address; retry in {wait} s");
    Response {
        retry_after: Some(wait),
        ..Response::error(429, &detail)
    }
}

fn too_many_upgrades(wait: u32) -> Response {
    let detail =
        format!("Too many WebSocket connections opened by this session; retry in {wait} s");
    Response {
        retry_after: Some(wait),
        ..Response::error(429, &detail)
    }
}

fn room_not_found() -> Response {
    Response::error(404, "Room not found")
}

fn not_found() -> Response {
    Response::error(404, "Not Found")
}

fn method_not_allowed(allow: &'static str) -> Response {
    Response::error(405, "Method Not Allowed").with_extra(allow)
}

#[cfg(test)]
mod tests;
