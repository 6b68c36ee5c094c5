//! The REST API and the WebSocket upgrade decision: request in, `Reply` out. Pure.
//!
//! Routing is a `match` on the path segments (both slash forms), then on the method.
//! Handlers ask the [`Hub`] and build the exact JSON of the contract (`shared/API.md`).

use std::borrow::Cow;
use std::io::Write as _;
use std::net::IpAddr;

use serde::Deserialize;

use crate::http::{self, Method, Request, Response};
use crate::hub::{Hub, HubError, validate_username};
use crate::ids::{MsgId, RoomId, SessionId};
use crate::protocol::json_str;
use crate::ratelimit::CreateLimiter;
use crate::time::Now;

/// What the event loop must do with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Response(Response),
    /// Accept the WebSocket: write 101, then `Hub::connect`.
    Upgrade {
        room: RoomId,
        session: SessionId,
        since: Option<MsgId>,
    },
    /// Accept the WebSocket on the conformance echo endpoint.
    Echo,
    /// Render `/metrics` (the loop owns the counters).
    Metrics,
}

/// Settings, time and the client's address for one request.
#[derive(Debug)]
pub struct ApiCtx<'a> {
    pub now: Now,
    pub no_room_list: bool,
    pub echo_path: Option<&'a str>,
    pub peer: IpAddr,
    pub limiter: &'a mut CreateLimiter,
}

pub const INDEX_HTML: &str = include_str!("web/index.html");
pub const DOCS_HTML: &str = include_str!("web/docs.html");
pub const OPENAPI_JSON: &str = include_str!("web/openapi.json");

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
        ((Some("health"), None, ..), Method::Get) => health(),
        ((Some("ping"), None, ..), Method::Get) => {
            Response::static_body(200, http::JSON, b"{\"message\":\"pong\"}")
        }
        ((Some("metrics"), None, ..), Method::Get) => return Reply::Metrics,
        ((Some("sessions"), None, ..), Method::Post) => create_session(body, hub, ctx),
        ((Some("sessions"), Some("me"), None, _), Method::Get) => me(req, hub, ctx.now),
        ((Some("sessions"), Some("me"), None, _), Method::Delete) => end_session(req, hub, ctx.now),
        ((Some("rooms"), None, ..), Method::Post) => create_room(req, hub, ctx),
        ((Some("rooms"), None, ..), Method::Get) => my_rooms(req, hub, ctx.now),
        ((Some("rooms"), Some("all"), None, _), Method::Get) if !ctx.no_room_list => all_rooms(hub),
        ((Some("rooms"), Some("all"), None, _), _) if !ctx.no_room_list => {
            method_not_allowed(ALLOW_GET)
        }
        ((Some("rooms"), Some(id), rest, None), m) => match (RoomId::parse(id), rest, m) {
            (None, ..) => not_found(),
            (Some(room), None, Method::Get) => room_info(hub, room),
            (Some(room), Some("join"), Method::Post) => join(req, hub, room, ctx.now),
            (Some(room), Some("leave"), Method::Delete) => leave(req, hub, room, ctx.now),
            (Some(room), Some("messages"), Method::Get) => messages(req, hub, room, ctx.now),
            (Some(_), None, _) | (Some(_), Some("messages"), _) => method_not_allowed(ALLOW_GET),
            (Some(_), Some("join"), _) => method_not_allowed(ALLOW_POST),
            (Some(_), Some("leave"), _) => method_not_allowed(ALLOW_DELETE),
            _ => not_found(),
        },
        ((Some("ws"), Some(id), None, _), Method::Get) => return upgrade(req, hub, id, ctx.now),
        ((Some("" | "docs" | "openapi.json" | "health" | "ping" | "metrics"), None, ..), _)
        | ((Some("ws"), Some(_), None, _), _) => method_not_allowed(ALLOW_GET),
        ((Some("sessions"), None, ..), _) => method_not_allowed(ALLOW_POST),
        ((Some("sessions"), Some("me"), None, _), _) => method_not_allowed(ALLOW_GET_DELETE),
        ((Some("rooms"), None, ..), _) => method_not_allowed(ALLOW_GET_POST),
        _ => not_found(),
    };
    Reply::Response(r)
}

fn health() -> Response {
    let mut b = Vec::with_capacity(48);
    let _ = write!(
        b,
        "{{\"status\":\"ok\",\"version\":\"{}\"}}",
        crate::VERSION
    );
    Response::json(200, b)
}

#[derive(Deserialize)]
struct NewSession<'a> {
    #[serde(borrow, default)]
    username: Option<Cow<'a, str>>,
}

fn create_session(body: &[u8], hub: &mut Hub, ctx: &mut ApiCtx<'_>) -> Response {
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
    let name = match serde_json::from_slice::<NewSession<'_>>(body) {
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
            let _ = write!(b, "{{\"session_id\":\"{id}\",\"username\":");
            json_str(&mut b, name);
            let _ = write!(b, ",\"user_id\":\"{user_id}\"}}");
            Response::json(201, b)
        }
        Err(e) => hub_error(e),
    }
}

fn me(req: &Request<'_>, hub: &mut Hub, now: Now) -> Response {
    let id = match auth(req, hub, now) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let Some(view) = hub.session_view(id) else {
        return invalid_session();
    };
    let mut b = Vec::with_capacity(128);
    let _ = write!(b, "{{\"session_id\":\"{id}\",\"username\":");
    json_str(&mut b, &view.username);
    let _ = write!(b, ",\"user_id\":\"{}\",\"joined_rooms\":", view.user_id);
    write_room_list(&mut b, view.rooms.into_iter());
    b.push(b'}');
    Response::json(200, b)
}

fn end_session(req: &Request<'_>, hub: &mut Hub, now: Now) -> Response {
    match auth(req, hub, now) {
        Ok(id) => {
            hub.end_session(id, now);
            Response::static_body(200, http::JSON, b"{\"message\":\"Session ended\"}")
        }
        Err(r) => r,
    }
}

fn create_room(req: &Request<'_>, hub: &mut Hub, ctx: &mut ApiCtx<'_>) -> Response {
    let now = ctx.now;
    let id = match auth(req, hub, now) {
        Ok(id) => id,
        Err(r) => return r,
    };
    if let Err(wait) = ctx.limiter.take(ctx.peer, now.mono) {
        return too_many(wait);
    }
    match hub.create_room(id, now) {
        Ok(room) => Response::json(201, format!("{{\"room_id\":\"{room}\"}}").into_bytes()),
        Err(e) => hub_error(e),
    }
}

fn my_rooms(req: &Request<'_>, hub: &mut Hub, now: Now) -> Response {
    match auth(req, hub, now) {
        Ok(id) => rooms_body(hub.session_rooms(id).into_iter()),
        Err(r) => r,
    }
}

fn all_rooms(hub: &Hub) -> Response {
    rooms_body(hub.all_rooms())
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

fn room_info(hub: &Hub, room: RoomId) -> Response {
    match hub.user_count(room) {
        Some(n) => Response::json(
            200,
            format!("{{\"room_id\":\"{room}\",\"exists\":true,\"user_count\":{n}}}").into_bytes(),
        ),
        None => room_not_found(),
    }
}

fn join(req: &Request<'_>, hub: &mut Hub, room: RoomId, now: Now) -> Response {
    let id = match auth(req, hub, now) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match hub.join_room(id, room) {
        Ok(()) => Response::json(
            200,
            format!("{{\"message\":\"Joined room {room}\"}}").into_bytes(),
        ),
        Err(e) => hub_error(e),
    }
}

fn leave(req: &Request<'_>, hub: &mut Hub, room: RoomId, now: Now) -> Response {
    match auth(req, hub, now) {
        Ok(id) => {
            hub.leave_room(id, room);
            Response::json(
                200,
                format!("{{\"message\":\"Left room {room}\"}}").into_bytes(),
            )
        }
        Err(r) => r,
    }
}

fn messages(req: &Request<'_>, hub: &mut Hub, room: RoomId, now: Now) -> Response {
    if let Err(r) = auth(req, hub, now) {
        return r;
    }
    let limit = match http::query_param(req.query, "limit") {
        None => 50,
        Some(v) => match v.parse::<usize>() {
            Ok(n @ 1..=1000) => n,
            _ => {
                return Response::json(
                    422,
                    b"{\"detail\":\"limit must be a whole number from 1 to 1000\",\"errors\":[{\"loc\":[\"query\",\"limit\"],\"msg\":\"Input should be between 1 and 1000\",\"type\":\"range\"}]}".to_vec(),
                );
            }
        },
    };
    let mut b = Vec::with_capacity(256);
    b.extend_from_slice(b"{\"messages\":[");
    if !hub.write_history(room, limit, &mut b) {
        return room_not_found();
    }
    b.extend_from_slice(b"]}");
    Response::json(200, b)
}

fn upgrade(req: &Request<'_>, hub: &mut Hub, room: &str, now: Now) -> Reply {
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
    match hub.check_connect(session, room, now) {
        Ok(()) => Reply::Upgrade {
            room,
            session,
            since,
        },
        Err(HubError::InvalidSession) => {
            Reply::Response(Response::error(403, "Invalid or expired session"))
        }
        Err(e) => Reply::Response(hub_error(e)),
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

/// Reads `Authorization: Bearer <session_id>` and checks the session.
fn auth(req: &Request<'_>, hub: &mut Hub, now: Now) -> Result<SessionId, Response> {
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
        .with_extra("WWW-Authenticate: Bearer\r\n"));
    };
    hub.authenticate(id, now)
        .map(|()| id)
        .map_err(|_| invalid_session())
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
    }
}

fn too_many(wait: u32) -> Response {
    let detail =
        format!("Too many sessions, rooms or unknown rooms from your address; retry in {wait} s");
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
