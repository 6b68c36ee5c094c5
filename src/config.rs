//! Server settings: defaults, command-line flags, environment twins, `--help`, validation.
//!
//! Every setting is one row of [`OPTIONS`]: its flag, its environment variable, its default
//! (as text, parsed by the same code as user input, so `--help` can never lie) and a setter.
//! The flag wins over the environment, the environment over the default.

use std::fmt;
use std::time::Duration;

use log::LevelFilter;

use crate::cluster::ClusterConfig;
use crate::hub::HubConfig;
use crate::redis_url::RedisUrl;
use crate::time::Micros;

/// All settings of a chatloop server.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// `--host`: address to listen on (0.0.0.0 or :: for all).
    pub host: String,
    /// `--port`: TCP port (0 picks a free one).
    pub port: u16,
    /// `--trusted-proxy`: comma-separated CIDRs of reverse proxies (10.0.0.0/8,2001:db8::/32):
    /// their PROXY protocol header (v1/v2) or X-Forwarded-For names the client address used for
    /// per-IP limits and logs; off when empty.
    pub trusted_proxy: crate::proxy::Trusted,
    /// `--room-ttl`: delete a room after this long without an open connection.
    pub room_ttl: Micros,
    /// `--session-ttl`: end a session this long after its last use (sliding).
    pub session_ttl: Micros,
    /// Bounds of a room's `message_ttl` (disappearing messages).
    pub min_message_ttl: Micros,
    /// `--max-message-ttl`: longest message lifetime a room may ask for (POST /rooms
    /// {"message_ttl": seconds}; 422 beyond).
    pub max_message_ttl: Micros,
    /// `--history`: chat messages kept per room.
    pub history: usize,
    /// `--history-notices`: user_joined/user_left kept per room besides the chat messages (churn
    /// never pushes chat out).
    pub history_notices: usize,
    /// `--max-request-head`: largest HTTP request head (431 beyond).
    pub max_request_head: usize,
    /// `--max-request-body`: largest HTTP request body (413 beyond).
    pub max_request_body: usize,
    /// `--max-ws-message`: largest WebSocket message (close 1009 beyond).
    pub max_ws_message: usize,
    /// permessage-deflate (RFC 7692) is negotiated with clients that offer it.
    pub deflate: bool,
    /// Frames with a smaller payload are sent plain even to a client that negotiated deflate.
    pub deflate_min_bytes: usize,
    /// `--max-chat-chars`: longest chat message in characters (error message_too_long).
    pub max_chat_chars: usize,
    /// `--max-chat-bytes`: largest chat message as stored: JSON-encoded, escapes included (a
    /// control character costs 6 bytes) (error message_too_long).
    pub max_chat_bytes: usize,
    /// `--max-welcome-bytes`: messages in one welcome frame or GET /rooms/{id}/messages answer, in
    /// bytes; the oldest are left out (truncated: true) beyond, but the newest always comes.
    pub max_welcome_bytes: usize,
    /// `--max-connections`: open connections in total (503 beyond).
    pub max_connections: usize,
    /// `--max-connections-per-ip`: open connections per client address (IPv6: per /64); the next
    /// gets 503 and is closed; 0 = off.
    pub max_connections_per_ip: usize,
    /// `--max-room-members`: open WebSocket connections per room (503 beyond).
    pub max_room_members: usize,
    /// `--chat-rate`: chat messages per second per session (token bucket rate).
    pub chat_rate: u32,
    /// `--chat-burst`: chat messages a session may send at once (token bucket size).
    pub chat_burst: u32,
    /// `--upgrade-rate`: WebSocket upgrades per second per session (token bucket rate; 429 with
    /// Retry-After beyond; 0 = off).
    pub upgrade_rate: u32,
    /// `--upgrade-burst`: WebSocket upgrades a session may make at once (token bucket size).
    pub upgrade_burst: u32,
    /// `--max-output-queue`: unsent bytes per connection before it is closed as a slow consumer
    /// (1013).
    pub max_output_queue: usize,
    /// `--request-timeout`: time allowed to send a request head and body, or a WebSocket handshake
    /// (a new connection's TLS handshake included).
    pub request_timeout: Micros,
    /// `--idle-timeout`: close an idle keep-alive HTTP connection after this long.
    pub idle_timeout: Micros,
    /// `--ping-interval`: ping a WebSocket after this long without a frame from it.
    pub ping_interval: Micros,
    /// `--pong-timeout`: close a WebSocket (1008) after this long without any frame from it.
    pub pong_timeout: Micros,
    /// `--typing-debounce`: at most one typing notice per member per this window.
    pub typing_debounce: Micros,
    /// `--typing-quiet`: send typing_stopped after this long without typing.
    pub typing_quiet: Micros,
    /// `--notice-delay`: user_joined/user_left may wait this long to share writes (0: send at
    /// once).
    pub notice_delay: Micros,
    /// `--max-sessions`: live sessions in total (503 beyond).
    pub max_sessions: usize,
    /// `--max-rooms`: live rooms in total (503 beyond).
    pub max_rooms: usize,
    /// `--max-rooms-per-session`: live rooms one session may have created (429 beyond); 0 = no
    /// limit.
    pub max_rooms_per_session: usize,
    /// `--create-rate`: sessions+rooms created (and room 404s) per client address (IPv6: per /64)
    /// per second, sustained (429 beyond); 0 = off (benchmarks).
    pub create_rate: u32,
    /// `--create-burst`: how many of those one address may spend at once before --create-rate
    /// applies.
    pub create_burst: u32,
    /// `--room-list`: turn on GET /rooms/all, which lists every live room to anyone (off: 404; a
    /// room id is the capability to read and join it).
    pub room_list: bool,
    /// `--echo-path`: serve a WebSocket echo endpoint at this path (conformance tests only; off
    /// when empty).
    pub echo_path: Option<String>,
    /// `--redis`: cluster mode: keep sessions, rooms and history in this Redis
    /// (`redis://[:password@]host:port/db`, `rediss://` for TLS) and share rooms with every
    /// node using it; off when empty.
    pub redis: Option<RedisUrl>,
    /// `--presence-ttl`: cluster mode: a crashed node's members leave presence this long after its
    /// last heartbeat.
    pub presence_ttl: Micros,
    /// `--max-redis-queue`: cluster mode: bytes of commands queued toward Redis and not yet
    /// answered; beyond this Redis counts as down (503s, local chat) and the node reconnects. A
    /// heartbeat needs about 0.5 KiB per open WebSocket (1 KiB right after a reconnect).
    pub max_redis_queue: usize,
    /// `--log-level`: off, error, warn, info, debug or trace.
    pub log_level: LevelFilter,
    /// `--log-format`: text or json (one JSON object per line).
    pub log_format: LogFormat,
    /// `--lock-memory`: lock all memory (mlockall) so chat never reaches swap; needs CAP_IPC_LOCK
    /// or RLIMIT_MEMLOCK.
    pub lock_memory: bool,
    /// `--reuse-port`: listen with SO_REUSEPORT: several nodes (one per core, same --redis) share
    /// the port and the kernel spreads connections over them.
    pub reuse_port: bool,
    /// TLS on the listener: PEM certificate chain and private key (both or neither).
    pub tls_cert: Option<String>,
    /// `--tls-key`: PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    pub tls_key: Option<String>,
    /// `rediss://`: PEM CA certificates to verify Redis with (else the system's bundle).
    pub redis_ca: Option<String>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (simplelog's format).
    Text,
    /// One JSON object per line.
    Json,
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// Start the server with these settings.
    Run(Box<Config>),
    /// Print this `--help` text and exit.
    Help(String),
    /// Print this version line and exit.
    Version(String),
}

/// A flag or variable that could not be used, with the sentence to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

type Setter = fn(&mut Config, &str) -> Result<(), String>;

/// One setting: flag name (without `--`), environment variables, default, help, setter.
pub struct Opt {
    /// The flag without its leading `--`.
    pub flag: &'static str,
    /// Environment variables that set it too, in order of precedence (the flag beats them all).
    pub env: &'static [&'static str],
    /// The value when neither flag nor variable is given, parsed like user input.
    pub default: &'static str,
    /// One line for `--help`.
    pub help: &'static str,
    /// A switch takes no value on the command line (`--no-room-list`).
    pub switch: bool,
    set: Setter,
}

macro_rules! opt {
    ($flag:literal, [$($env:literal),*], $default:literal, $help:literal, $set:expr) => {
        Opt { flag: $flag, env: &[$($env),*], default: $default, help: $help, switch: false, set: $set }
    };
}

/// Every setting, in `--help` order.
pub const OPTIONS: &[Opt] = &[
    opt!(
        "host",
        ["CHATLOOP_HOST"],
        "127.0.0.1",
        "address to listen on (0.0.0.0 or :: for all)",
        |c, v| {
            c.host = v.to_string();
            Ok(())
        }
    ),
    opt!(
        "port",
        ["CHATLOOP_PORT", "PORT"],
        "8000",
        "TCP port (0 picks a free one)",
        |c, v| {
            c.port = v
                .parse()
                .map_err(|_| "expected a port number 0..65535".to_string())?;
            Ok(())
        }
    ),
    opt!(
        "trusted-proxy",
        ["CHATLOOP_TRUSTED_PROXY"],
        "",
        "comma-separated CIDRs of reverse proxies (10.0.0.0/8,2001:db8::/32): their PROXY protocol header (v1/v2) or X-Forwarded-For names the client address used for per-IP limits and logs; off when empty",
        |c, v| {
            c.trusted_proxy = crate::proxy::Trusted::parse(v)?;
            Ok(())
        }
    ),
    opt!(
        "tls-cert",
        ["CHATLOOP_TLS_CERT"],
        "",
        "serve https/wss: PEM certificate chain (with --tls-key; SIGHUP reloads both); off when empty",
        |c, v| {
            c.tls_cert = (!v.is_empty()).then(|| v.to_string());
            Ok(())
        }
    ),
    opt!(
        "tls-key",
        ["CHATLOOP_TLS_KEY"],
        "",
        "PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1)",
        |c, v| {
            c.tls_key = (!v.is_empty()).then(|| v.to_string());
            Ok(())
        }
    ),
    opt!(
        "room-ttl",
        ["CHATLOOP_ROOM_TTL"],
        "120s",
        "delete a room after this long without an open connection",
        |c, v| {
            c.room_ttl = duration(v)?;
            Ok(())
        }
    ),
    opt!(
        "max-message-ttl",
        ["CHATLOOP_MAX_MESSAGE_TTL"],
        "7d",
        "longest message lifetime a room may ask for (POST /rooms {\"message_ttl\": seconds}; 422 beyond)",
        |c, v| {
            c.max_message_ttl = duration(v)?;
            Ok(())
        }
    ),
    opt!(
        "min-message-ttl",
        ["CHATLOOP_MIN_MESSAGE_TTL"],
        "5s",
        "shortest message lifetime a room may ask for (422 below); lower it only for tests",
        |c, v| {
            c.min_message_ttl = duration(v)?;
            Ok(())
        }
    ),
    opt!(
        "session-ttl",
        ["CHATLOOP_SESSION_TTL"],
        "24h",
        "end a session this long after its last use (sliding)",
        |c, v| {
            c.session_ttl = duration(v)?;
            Ok(())
        }
    ),
    opt!(
        "history",
        ["CHATLOOP_HISTORY"],
        "1000",
        "chat messages kept per room",
        |c, v| {
            c.history = count(v)?;
            Ok(())
        }
    ),
    opt!(
        "history-notices",
        ["CHATLOOP_HISTORY_NOTICES"],
        "100",
        "user_joined/user_left kept per room besides the chat messages (churn never pushes chat out)",
        |c, v| {
            c.history_notices = count(v)?;
            Ok(())
        }
    ),
    opt!(
        "max-request-head",
        ["CHATLOOP_MAX_REQUEST_HEAD"],
        "16KiB",
        "largest HTTP request head (431 beyond)",
        |c, v| {
            c.max_request_head = size(v)?;
            Ok(())
        }
    ),
    opt!(
        "max-request-body",
        ["CHATLOOP_MAX_REQUEST_BODY"],
        "64KiB",
        "largest HTTP request body (413 beyond)",
        |c, v| {
            c.max_request_body = size(v)?;
            Ok(())
        }
    ),
    opt!(
        "max-ws-message",
        ["CHATLOOP_MAX_WS_MESSAGE"],
        "64KiB",
        "largest WebSocket message (close 1009 beyond)",
        |c, v| {
            c.max_ws_message = size(v)?;
            Ok(())
        }
    ),
    opt!(
        "deflate",
        ["CHATLOOP_DEFLATE"],
        "true",
        "negotiate permessage-deflate (RFC 7692) with clients that offer it; false: never",
        |c, v| {
            c.deflate = boolean(v)?;
            Ok(())
        }
    ),
    opt!(
        "deflate-min-bytes",
        ["CHATLOOP_DEFLATE_MIN_BYTES"],
        "1KiB",
        "smallest frame payload compressed for such clients (smaller ones go plain)",
        |c, v| {
            c.deflate_min_bytes = size(v)?;
            Ok(())
        }
    ),
    opt!(
        "max-chat-chars",
        ["CHATLOOP_MAX_CHAT_CHARS"],
        "4096",
        "longest chat message in characters (error message_too_long)",
        |c, v| {
            c.max_chat_chars = count(v)?;
            Ok(())
        }
    ),
    opt!(
        "max-chat-bytes",
        ["CHATLOOP_MAX_CHAT_BYTES"],
        "16KiB",
        "largest chat message as stored: JSON-encoded, escapes included (a control character costs 6 bytes) (error message_too_long)",
        |c, v| {
            c.max_chat_bytes = size(v)?;
            Ok(())
        }
    ),
    opt!(
        "max-welcome-bytes",
        ["CHATLOOP_MAX_WELCOME_BYTES"],
        "256KiB",
        "messages in one welcome frame or GET /rooms/{id}/messages answer, in bytes; the oldest are left out (truncated: true) beyond, but the newest always comes",
        |c, v| {
            c.max_welcome_bytes = size(v)?;
            Ok(())
        }
    ),
    opt!(
        "max-connections",
        ["CHATLOOP_MAX_CONNECTIONS"],
        "100000",
        "open connections in total (503 beyond)",
        |c, v| {
            c.max_connections = count(v)?;
            Ok(())
        }
    ),
    opt!(
        "max-connections-per-ip",
        ["CHATLOOP_MAX_CONNECTIONS_PER_IP"],
        "1000",
        "open connections per client address (IPv6: per /64); the next gets 503 and is closed; 0 = off",
        |c, v| {
            c.max_connections_per_ip = count(v)?;
            Ok(())
        }
    ),
    opt!(
        "max-room-members",
        ["CHATLOOP_MAX_ROOM_MEMBERS"],
        "10000",
        "open WebSocket connections per room (503 beyond)",
        |c, v| {
            c.max_room_members = count(v)?;
            Ok(())
        }
    ),
    opt!(
        "chat-rate",
        ["CHATLOOP_CHAT_RATE"],
        "20",
        "chat messages per second per session (token bucket rate)",
        |c, v| {
            c.chat_rate = count_u32(v)?;
            Ok(())
        }
    ),
    opt!(
        "chat-burst",
        ["CHATLOOP_CHAT_BURST"],
        "40",
        "chat messages a session may send at once (token bucket size)",
        |c, v| {
            c.chat_burst = count_u32(v)?;
            Ok(())
        }
    ),
    opt!(
        "upgrade-rate",
        ["CHATLOOP_UPGRADE_RATE"],
        "2",
        "WebSocket upgrades per second per session (token bucket rate; 429 with Retry-After beyond; 0 = off)",
        |c, v| {
            c.upgrade_rate = count_u32(v)?;
            Ok(())
        }
    ),
    opt!(
        "upgrade-burst",
        ["CHATLOOP_UPGRADE_BURST"],
        "20",
        "WebSocket upgrades a session may make at once (token bucket size)",
        |c, v| {
            c.upgrade_burst = count_u32(v)?;
            Ok(())
        }
    ),
    opt!(
        "max-output-queue",
        ["CHATLOOP_MAX_OUTPUT_QUEUE"],
        "1MiB",
        "unsent bytes per connection before it is closed as a slow consumer (1013)",
        |c, v| {
            c.max_output_queue = size(v)?;
            Ok(())
        }
    ),
    opt!(
        "request-timeout",
        ["CHATLOOP_REQUEST_TIMEOUT"],
        "10s",
        "time allowed to send a request head and body, or a WebSocket handshake (a new connection's TLS handshake included)",
        |c, v| {
            c.request_timeout = duration(v)?;
            Ok(())
        }
    ),
    opt!(
        "idle-timeout",
        ["CHATLOOP_IDLE_TIMEOUT"],
        "60s",
        "close an idle keep-alive HTTP connection after this long",
        |c, v| {
            c.idle_timeout = duration(v)?;
            Ok(())
        }
    ),
    opt!(
        "ping-interval",
        ["CHATLOOP_PING_INTERVAL"],
        "30s",
        "ping a WebSocket after this long without a frame from it",
        |c, v| {
            c.ping_interval = duration(v)?;
            Ok(())
        }
    ),
    opt!(
        "pong-timeout",
        ["CHATLOOP_PONG_TIMEOUT"],
        "60s",
        "close a WebSocket (1008) after this long without any frame from it",
        |c, v| {
            c.pong_timeout = duration(v)?;
            Ok(())
        }
    ),
    opt!(
        "typing-debounce",
        ["CHATLOOP_TYPING_DEBOUNCE"],
        "1s",
        "at most one typing notice per member per this window",
        |c, v| {
            c.typing_debounce = duration(v)?;
            Ok(())
        }
    ),
    opt!(
        "typing-quiet",
        ["CHATLOOP_TYPING_QUIET"],
        "3s",
        "send typing_stopped after this long without typing",
        |c, v| {
            c.typing_quiet = duration(v)?;
            Ok(())
        }
    ),
    opt!(
        "notice-delay",
        ["CHATLOOP_NOTICE_DELAY"],
        "10ms",
        "user_joined/user_left may wait this long to share writes (0: send at once)",
        |c, v| {
            c.notice_delay = duration(v)?;
            Ok(())
        }
    ),
    opt!(
        "max-sessions",
        ["CHATLOOP_MAX_SESSIONS"],
        "2000000",
        "live sessions in total (503 beyond)",
        |c, v| {
            c.max_sessions = count(v)?;
            Ok(())
        }
    ),
    opt!(
        "max-rooms",
        ["CHATLOOP_MAX_ROOMS"],
        "100000",
        "live rooms in total (503 beyond)",
        |c, v| {
            c.max_rooms = count(v)?;
            Ok(())
        }
    ),
    opt!(
        "max-rooms-per-session",
        ["CHATLOOP_MAX_ROOMS_PER_SESSION"],
        "50",
        "live rooms one session may have created (429 beyond); 0 = no limit",
        |c, v| {
            c.max_rooms_per_session = count(v)?;
            Ok(())
        }
    ),
    opt!(
        "create-rate",
        ["CHATLOOP_CREATE_RATE"],
        "2",
        "sessions+rooms created (and room 404s) per client address (IPv6: per /64) per second, sustained (429 beyond); 0 = off (benchmarks)",
        |c, v| {
            c.create_rate = count_u32(v)?;
            Ok(())
        }
    ),
    opt!(
        "create-burst",
        ["CHATLOOP_CREATE_BURST"],
        "60",
        "how many of those one address may spend at once before --create-rate applies",
        |c, v| {
            c.create_burst = count_u32(v)?;
            Ok(())
        }
    ),
    Opt {
        flag: "room-list",
        env: &["CHATLOOP_ROOM_LIST"],
        default: "false",
        switch: true,
        help: "turn on GET /rooms/all, which lists every live room to anyone (off: 404; a room id is the capability to read and join it)",
        set: |c, v| {
            c.room_list = boolean(v)?;
            Ok(())
        },
    },
    Opt {
        flag: "no-room-list",
        env: &["CHATLOOP_NO_ROOM_LIST"],
        default: "false",
        switch: true,
        help: "keep GET /rooms/all off: the default now; accepted so that older command lines still start",
        set: |c, v| {
            if boolean(v)? {
                c.room_list = false;
            }
            Ok(())
        },
    },
    Opt {
        flag: "lock-memory",
        env: &["CHATLOOP_LOCK_MEMORY"],
        default: "false",
        switch: true,
        help: "lock all memory (mlockall) so chat never reaches swap; needs CAP_IPC_LOCK or RLIMIT_MEMLOCK",
        set: |c, v| {
            c.lock_memory = boolean(v)?;
            Ok(())
        },
    },
    opt!(
        "echo-path",
        ["CHATLOOP_ECHO_PATH"],
        "",
        "serve a WebSocket echo endpoint at this path (conformance tests only; off when empty)",
        |c, v| {
            c.echo_path = if v.is_empty() {
                None
            } else if v.starts_with('/') {
                Some(v.to_string())
            } else {
                return Err("expected a path starting with /".into());
            };
            Ok(())
        }
    ),
    opt!(
        "redis",
        ["CHATLOOP_REDIS"],
        "",
        "cluster mode: keep sessions, rooms and history in this Redis (redis://[:password@]host:port/db, rediss:// for TLS), or in this sharded Redis Cluster (redis-cluster://[:password@]host:port,host:port... : any seed names the masters), and share rooms with every node using it; off when empty",
        |c, v| {
            c.redis = if v.is_empty() {
                None
            } else if v.starts_with("redis-cluster://") || v.starts_with("rediss-cluster://") {
                let seeds = crate::cluster::slots::Seeds::parse(v)?;
                let first = seeds
                    .addrs
                    .first()
                    .cloned()
                    .ok_or("redis-cluster:// needs a seed")?;
                Some(RedisUrl {
                    host: first.host,
                    port: first.port,
                    db: 0,
                    user: seeds.user,
                    password: seeds.password,
                    tls: seeds.tls,
                    cluster_seeds: Some(
                        seeds.addrs.into_iter().map(|a| (a.host, a.port)).collect(),
                    ),
                })
            } else {
                Some(RedisUrl::parse(v)?)
            };
            Ok(())
        }
    ),
    opt!(
        "redis-ca",
        ["CHATLOOP_REDIS_CA"],
        "",
        "cluster mode with rediss:// (TLS): PEM CA certificates Redis's certificate must chain to; the system's bundle when empty",
        |c, v| {
            c.redis_ca = (!v.is_empty()).then(|| v.to_string());
            Ok(())
        }
    ),
    opt!(
        "presence-ttl",
        ["CHATLOOP_PRESENCE_TTL"],
        "15s",
        "cluster mode: a crashed node's members leave presence this long after its last heartbeat",
        |c, v| {
            c.presence_ttl = duration(v)?;
            Ok(())
        }
    ),
    Opt {
        flag: "reuse-port",
        env: &["CHATLOOP_REUSE_PORT"],
        default: "false",
        switch: true,
        help: "listen with SO_REUSEPORT: several nodes (one per core, same --redis) share the port and the kernel spreads connections over them",
        set: |c, v| {
            c.reuse_port = boolean(v)?;
            Ok(())
        },
    },
    opt!(
        "max-redis-queue",
        ["CHATLOOP_MAX_REDIS_QUEUE"],
        "256MiB",
        "cluster mode: bytes of commands queued toward Redis and not yet answered; beyond this Redis counts as down (503s, local chat) and the node reconnects. A heartbeat needs about 0.5 KiB per open WebSocket (1 KiB right after a reconnect)",
        |c, v| {
            c.max_redis_queue = size(v)?;
            Ok(())
        }
    ),
    opt!(
        "log-level",
        ["CHATLOOP_LOG_LEVEL"],
        "info",
        "off, error, warn, info, debug or trace",
        |c, v| {
            c.log_level = v
                .parse()
                .map_err(|_| "expected off, error, warn, info, debug or trace".to_string())?;
            Ok(())
        }
    ),
    opt!(
        "log-format",
        ["CHATLOOP_LOG_FORMAT"],
        "text",
        "text or json (one JSON object per line)",
        |c, v| {
            c.log_format = match v {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => return Err("expected text or json".into()),
            };
            Ok(())
        }
    ),
];

impl Default for Config {
    fn default() -> Self {
        let mut c = Config {
            host: String::new(),
            port: 0,
            trusted_proxy: crate::proxy::Trusted::default(),
            room_ttl: Micros::ZERO,
            session_ttl: Micros::ZERO,
            history: 0,
            history_notices: 0,
            max_request_head: 0,
            max_request_body: 0,
            max_ws_message: 0,
            deflate: false,
            deflate_min_bytes: 0,
            max_chat_chars: 0,
            max_chat_bytes: 0,
            max_welcome_bytes: 0,
            max_connections: 0,
            max_connections_per_ip: 0,
            max_room_members: 0,
            chat_rate: 0,
            chat_burst: 0,
            upgrade_rate: 0,
            upgrade_burst: 0,
            max_output_queue: 0,
            request_timeout: Micros::ZERO,
            idle_timeout: Micros::ZERO,
            ping_interval: Micros::ZERO,
            pong_timeout: Micros::ZERO,
            typing_debounce: Micros::ZERO,
            typing_quiet: Micros::ZERO,
            notice_delay: Micros::ZERO,
            max_sessions: 0,
            max_rooms: 0,
            max_rooms_per_session: 0,
            create_rate: 0,
            create_burst: 0,
            room_list: false,
            min_message_ttl: Micros::ZERO,
            max_message_ttl: Micros::ZERO,
            echo_path: None,
            redis: None,
            presence_ttl: Micros::ZERO,
            max_redis_queue: 0,
            log_level: LevelFilter::Info,
            log_format: LogFormat::Text,
            lock_memory: false,
            reuse_port: false,
            tls_cert: None,
            tls_key: None,
            redis_ca: None,
        };
        for o in OPTIONS {
            (o.set)(&mut c, o.default).expect("built-in defaults parse");
        }
        c
    }
}

impl Config {
    /// Reads the command line (without the program name) and the environment.
    pub fn parse<I, S>(
        args: I,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Command, ConfigError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut cfg = Config::default();
        for o in OPTIONS {
            if let Some((name, v)) = o.env.iter().find_map(|e| env(e).map(|v| (*e, v))) {
                (o.set)(&mut cfg, v.trim())
                    .map_err(|e| ConfigError(format!("{name}={}: {e}", shown(o, &v))))?;
            }
        }
        let mut args = args.into_iter().map(Into::into);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "-h" | "--help" => return Ok(Command::Help(help())),
                "-V" | "--version" => {
                    return Ok(Command::Version(format!("chatloop {}", crate::VERSION)));
                }
                _ => {}
            }
            let Some(body) = arg.strip_prefix("--") else {
                return Err(ConfigError(format!(
                    "unexpected argument {arg:?} (see --help)"
                )));
            };
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            let Some(o) = OPTIONS.iter().find(|o| o.flag == name) else {
                return Err(ConfigError(format!("unknown flag --{name} (see --help)")));
            };
            let value = match (inline, o.switch) {
                (Some(v), _) => v,
                (None, true) => "true".to_string(),
                (None, false) => args.next().ok_or_else(|| {
                    ConfigError(format!("--{name} needs a value (default {})", o.default))
                })?,
            };
            (o.set)(&mut cfg, &value)
                .map_err(|e| ConfigError(format!("--{name} {}: {e}", shown(o, &value))))?;
        }
        cfg.validate()?;
        Ok(Command::Run(Box::new(cfg)))
    }

    /// Checks relations between settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |m: &str| Err(ConfigError(m.to_string()));
        if self.history == 0 {
            return fail("--history must be at least 1");
        }
        if self.chat_rate == 0 || self.chat_burst == 0 {
            return fail("--chat-rate and --chat-burst must be at least 1");
        }
        if self.create_rate > 0 && self.create_burst == 0 {
            return fail(
                "--create-burst must be at least 1 (or turn the budget off with --create-rate 0)",
            );
        }
        if self.upgrade_rate > 0 && self.upgrade_burst == 0 {
            return fail("--upgrade-burst must be at least 1 (or --upgrade-rate 0 for no limit)");
        }
        if self.max_ws_message < 125 {
            return fail("--max-ws-message must be at least 125 bytes");
        }
        if self.max_request_head < 256 {
            return fail("--max-request-head must be at least 256 bytes");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return fail("--tls-cert and --tls-key go together");
        }
        if self.tls_cert.is_some() && !cfg!(feature = "tls") {
            return fail("--tls-cert: this chatloop was built without TLS (cargo feature `tls`)");
        }
        if self.redis.as_ref().is_some_and(|r| r.tls) && !cfg!(feature = "tls") {
            return fail("rediss://: this chatloop was built without TLS (cargo feature `tls`)");
        }
        if self.max_output_queue < 4096 {
            return fail("--max-output-queue must be at least 4KiB");
        }
        if self.max_redis_queue < 64 * 1024 {
            return fail("--max-redis-queue must be at least 64KiB");
        }
        for (name, d) in [
            ("--room-ttl", self.room_ttl),
            ("--session-ttl", self.session_ttl),
            ("--request-timeout", self.request_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--ping-interval", self.ping_interval),
            ("--pong-timeout", self.pong_timeout),
            ("--typing-debounce", self.typing_debounce),
            ("--typing-quiet", self.typing_quiet),
            ("--presence-ttl", self.presence_ttl),
            ("--min-message-ttl", self.min_message_ttl),
        ] {
            if d == Micros::ZERO {
                return Err(ConfigError(format!("{name} must be longer than zero")));
            }
        }
        if self.min_message_ttl > self.max_message_ttl {
            return fail("--min-message-ttl must not be longer than --max-message-ttl");
        }
        Ok(())
    }

    /// The hub's share of the settings (the chat domain takes only what it needs).
    pub fn hub_config(&self) -> HubConfig {
        HubConfig {
            room_ttl: self.room_ttl,
            session_ttl: self.session_ttl,
            history: self.history,
            history_notices: self.history_notices,
            welcome_messages: 50,
            max_welcome_bytes: self.max_welcome_bytes,
            max_chat_chars: self.max_chat_chars,
            max_chat_bytes: self.max_chat_bytes,
            max_room_members: self.max_room_members,
            chat_rate: self.chat_rate,
            chat_burst: self.chat_burst,
            upgrade_rate: self.upgrade_rate,
            upgrade_burst: self.upgrade_burst,
            typing_debounce: self.typing_debounce,
            typing_quiet: self.typing_quiet,
            typing_max_per_sec: 50,
            max_sessions: self.max_sessions,
            max_rooms: self.max_rooms,
            max_rooms_per_session: self.max_rooms_per_session,
            notice_delay: self.notice_delay,
            min_message_ttl: self.min_message_ttl,
            max_message_ttl: self.max_message_ttl,
        }
    }

    /// The cluster's share of the settings, for Redis at `url`.
    pub fn cluster_config(&self, url: &RedisUrl) -> ClusterConfig {
        ClusterConfig {
            room_ttl: self.room_ttl,
            session_ttl: self.session_ttl,
            history: self.history,
            history_notices: self.history_notices,
            presence_ttl: self.presence_ttl,
            db: url.db,
            user: url.user.clone(),
            password: url.password.clone(),
            reply_limits: ClusterConfig::reply_limits(
                self.history.saturating_add(self.history_notices),
                self.max_chat_bytes
                    .min(self.max_chat_chars.saturating_mul(6)),
                self.max_rooms.max(self.max_room_members),
            ),
            max_queue: self.max_redis_queue,
            seeds: url
                .cluster_seeds
                .clone()
                .unwrap_or_else(|| vec![(url.host.clone(), url.port)])
                .into_iter()
                .map(|(host, port)| crate::cluster::slots::Addr { host, port })
                .collect(),
            room_list: self.room_list,
        }
    }
}

/// The hub's settings with every default of the command line (what tests and benches start
/// from).
impl Default for HubConfig {
    fn default() -> Self {
        Config::default().hub_config()
    }
}

impl fmt::Debug for Opt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opt")
            .field("flag", &self.flag)
            .field("env", &self.env)
            .field("default", &self.default)
            .finish_non_exhaustive()
    }
}

/// Settings whose values may hold a secret (the Redis URL's password): an error about them
/// never repeats the value.
const SECRET_VALUES: &[&str] = &["redis"];

/// A value as an error message shows it: quoted, or hidden for [`SECRET_VALUES`].
fn shown(o: &Opt, value: &str) -> String {
    if SECRET_VALUES.contains(&o.flag) {
        "(value not shown: it may hold a password)".to_string()
    } else {
        format!("{value:?}")
    }
}

/// The `--help` text, built from [`OPTIONS`].
pub fn help() -> String {
    let mut s = format!(
        "chatloop {} - live chat server for temporary rooms (REST + WebSocket)\n\n\
         Usage: chatloop [--flag value | --flag=value]...\n\n\
         Durations: 500ms, 30s, 2m, 24h or plain seconds. Sizes: bytes, 64KiB, 1MiB.\n\
         A flag wins over its environment variable.\n\nOptions:\n",
        crate::VERSION
    );
    for o in OPTIONS {
        let arg = if o.switch {
            String::new()
        } else {
            " <value>".to_string()
        };
        let default = if o.default.is_empty() {
            "(off)"
        } else {
            o.default
        };
        s.push_str(&format!(
            "  --{}{arg}\n      {} [default: {default}] [env: {}]\n",
            o.flag,
            o.help,
            o.env.join(", ")
        ));
    }
    s.push_str("  -h, --help\n      print this help\n  -V, --version\n      print the version\n");
    s
}

/// Parses `500ms`, `30s`, `2m`, `24h`, `1d` or plain seconds (`1.5` allowed).
pub fn duration(v: &str) -> Result<Micros, String> {
    let v = v.trim();
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("expected a duration like 500ms, 30s, 2m or 24h, got {v:?}"))?;
    let scale = match unit {
        "" | "s" => 1e6,
        "ms" => 1e3,
        "us" => 1.0,
        "m" => 60e6,
        "h" => 3600e6,
        "d" => 86_400e6,
        _ => return Err(format!("unknown duration unit {unit:?} (use ms, s, m, h)")),
    };
    let us = n * scale;
    if !us.is_finite() || !(0.0..=1e17).contains(&us) {
        return Err(format!("duration {v:?} is out of range"));
    }
    Ok(Micros::from_duration(Duration::from_micros(
        us.round() as u64
    )))
}

/// Parses bytes: `65536`, `64KiB`, `1MiB`, `64KB`, `1GiB`.
pub fn size(v: &str) -> Result<usize, String> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("expected a size like 65536 or 64KiB, got {v:?}"))?;
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        "g" | "gb" | "gib" => 1024 * 1024 * 1024,
        _ => return Err(format!("unknown size unit {unit:?} (use KiB, MiB, GiB)")),
    };
    n.checked_mul(scale)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| format!("size {v:?} is out of range"))
}

fn count(v: &str) -> Result<usize, String> {
    v.trim()
        .parse()
        .map_err(|_| format!("expected a whole number, got {v:?}"))
}

/// A whole number for a `u32` setting (a rate or a burst): one that does not fit is refused,
/// never truncated.
fn count_u32(v: &str) -> Result<u32, String> {
    u32::try_from(count(v)?).map_err(|_| "too large".to_string())
}

fn boolean(v: &str) -> Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("expected true or false, got {v:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match Config::parse(args.iter().copied(), |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })? {
            Command::Run(c) => Ok(*c),
            other => panic!("expected Run, got {other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = run(&[], &[]).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 8000));
        assert_eq!(c.room_ttl, Micros::from_secs(120));
        assert_eq!(c.session_ttl, Micros::from_secs(86_400));
        assert_eq!(c.max_ws_message, 65_536);
        assert_eq!(c.max_output_queue, 1 << 20);
        assert_eq!((c.chat_rate, c.chat_burst), (20, 40));
        assert_eq!(
            (c.ping_interval, c.pong_timeout),
            (Micros::from_secs(30), Micros::from_secs(60))
        );
        assert!(!c.room_list, "GET /rooms/all is off unless asked for");
        assert_eq!(c.max_welcome_bytes, 256 * 1024);
        assert!(c.max_welcome_bytes < c.max_output_queue);
        assert_eq!((c.upgrade_rate, c.upgrade_burst), (2, 20));
        assert_eq!(c.echo_path, None);
        // Per-address budgets are on by default; benchmarks turn them off explicitly.
        assert_eq!((c.create_rate, c.create_burst), (2, 60));
        assert_eq!(c.max_rooms_per_session, 50);
        assert_eq!(c.max_connections_per_ip, 1000);
        let c = run(
            &["--create-rate", "0", "--max-connections-per-ip", "0"],
            &[],
        )
        .unwrap();
        assert_eq!((c.create_rate, c.max_connections_per_ip), (0, 0));
        assert!(run(&["--create-burst", "0"], &[]).is_err());
        assert!(run(&["--create-burst", "0", "--create-rate", "0"], &[]).is_ok());
    }

    #[test]
    fn flag_wins_over_env_and_port_has_two_env_names() {
        let c = run(
            &["--room-ttl", "1s"],
            &[("CHATLOOP_ROOM_TTL", "5s"), ("PORT", "9000")],
        )
        .unwrap();
        assert_eq!(c.room_ttl, Micros::from_secs(1));
        assert_eq!(c.port, 9000);
        let c = run(&["--port=0", "--room-list"], &[("PORT", "9000")]).unwrap();
        assert_eq!(c.port, 0);
        assert!(c.room_list);
        // The old switch still starts, and keeps the list off.
        assert!(!run(&["--no-room-list"], &[]).unwrap().room_list);
        assert!(
            !run(&["--room-list", "--no-room-list"], &[])
                .unwrap()
                .room_list
        );
        assert!(run(&[], &[("CHATLOOP_ROOM_LIST", "1")]).unwrap().room_list);
    }

    #[test]
    fn trusted_proxy_takes_cidrs_from_the_flag_or_the_environment() {
        assert!(run(&[], &[]).unwrap().trusted_proxy.is_empty());
        let c = run(&["--trusted-proxy", "10.0.0.0/8, ::1"], &[]).unwrap();
        assert!(c.trusted_proxy.contains("10.2.3.4".parse().unwrap()));
        assert!(c.trusted_proxy.contains("::1".parse().unwrap()));
        assert!(!c.trusted_proxy.contains("127.0.0.1".parse().unwrap()));
        let c = run(&[], &[("CHATLOOP_TRUSTED_PROXY", "127.0.0.1")]).unwrap();
        assert!(c.trusted_proxy.contains("127.0.0.1".parse().unwrap()));
        let e = run(&["--trusted-proxy", "10.0.0.1/8"], &[]).unwrap_err();
        assert!(
            e.0.contains("--trusted-proxy") && e.0.contains("10.0.0.0/8"),
            "{e}"
        );
    }

    #[test]
    fn units_parse() {
        assert_eq!(duration("500ms"), Ok(Micros(500_000)));
        assert_eq!(duration("2m"), Ok(Micros::from_secs(120)));
        assert_eq!(duration("1.5"), Ok(Micros(1_500_000)));
        assert!(duration("soon").is_err());
        assert!(duration("3 weeks").is_err());
        assert_eq!(size("64KiB"), Ok(65_536));
        assert_eq!(size("1MiB"), Ok(1 << 20));
        assert!(size("-1").is_err());
    }

    #[test]
    fn errors_are_sentences() {
        let e = run(&["--bogus"], &[]).unwrap_err();
        assert!(e.0.contains("unknown flag --bogus"), "{e}");
        let e = run(&["--port", "x"], &[]).unwrap_err();
        assert!(e.0.contains("--port"), "{e}");
        let e = run(&[], &[("CHATLOOP_ROOM_TTL", "forever")]).unwrap_err();
        assert!(e.0.contains("CHATLOOP_ROOM_TTL"), "{e}");
        assert!(run(&["--history", "0"], &[]).is_err());
        let e = run(&["--tls-cert", "c.pem"], &[]).unwrap_err();
        assert!(e.0.contains("--tls-key"), "{e}");
    }

    #[test]
    fn redis_accepts_a_redis_cluster_seed_list_and_hides_its_password() {
        const PW: &str = "pw-5ecret";
        let c = run(
            &[
                "--redis",
                &format!("redis-cluster://:{PW}@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002"),
            ],
            &[],
        )
        .unwrap();
        let url = c.redis.as_ref().unwrap();
        assert_eq!(url.password.as_ref().map(|p| p.expose()), Some(PW));
        let cc = c.cluster_config(url);
        let seeds: Vec<String> = cc.seeds.iter().map(ToString::to_string).collect();
        assert_eq!(seeds, ["10.0.0.1:7000", "10.0.0.2:7001", "[::1]:7002"]);
        assert_eq!(cc.db, 0);
        assert_eq!(
            url.to_string(),
            "redis-cluster://***@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002"
        );
        for text in [format!("{c:?}"), format!("{url:?}"), url.to_string()] {
            assert!(!text.contains(PW), "{text}");
        }
        for bad in [
            format!("redis-cluster://:{PW}@10.0.0.1:7000/1"),
            format!("redis-cluster://:{PW}@10.0.0.1:notaport"),
        ] {
            let e = run(&["--redis", &bad], &[]).unwrap_err();
            assert!(!e.0.contains(PW), "{e}");
        }
    }

    #[test]
    fn the_redis_password_is_in_no_error_and_not_in_the_settings_debug_line() {
        const PW: &str = "pw-5ecret";
        let c = run(
            &["--redis", &format!("redis://app:{PW}@10.0.0.1:6380/2")],
            &[],
        )
        .unwrap();
        let url = c.redis.as_ref().unwrap();
        assert_eq!(url.password.as_ref().map(|p| p.expose()), Some(PW));
        assert_eq!(url.user.as_deref(), Some("app"));
        for text in [format!("{c:?}"), format!("{url:?}"), url.to_string()] {
            assert!(!text.contains(PW), "{text}");
        }
        // Mistyped URLs, where the password lands in the port, the database or the host.
        for bad in [
            format!("redis://:{PW}@10.0.0.1:notaport/0"),
            format!("redis://:{PW}"),
            format!("redis://10.0.0.1/{PW}"),
            format!("redis://{PW}@"),
            format!("redis+tls://:{PW}@10.0.0.1"), // (rediss:// is TLS, a valid scheme)
        ] {
            let e = run(&["--redis", &bad], &[]).unwrap_err();
            assert!(e.0.starts_with("--redis"), "{e}");
            assert!(!e.0.contains(PW), "{e}");
            let e = run(&[&format!("--redis={bad}")], &[]).unwrap_err();
            assert!(!e.0.contains(PW), "{e}");
            let e = run(&[], &[("CHATLOOP_REDIS", &bad)]).unwrap_err();
            assert!(e.0.contains("CHATLOOP_REDIS"), "{e}");
            assert!(!e.0.contains(PW), "{e}");
        }
        // Other flags still quote what was wrong.
        let e = run(&["--port", "x"], &[]).unwrap_err();
        assert!(e.0.contains("\"x\""), "{e}");
    }

    #[test]
    fn help_lists_every_flag_with_default_and_env() {
        let h = help();
        for o in OPTIONS {
            assert!(h.contains(&format!("--{}", o.flag)), "{}", o.flag);
            for e in o.env {
                assert!(h.contains(e), "{e}");
            }
        }
    }

    #[test]
    fn rates_and_bursts_that_do_not_fit_a_u32_are_refused_not_truncated() {
        for flag in [
            "--chat-rate",
            "--chat-burst",
            "--upgrade-rate",
            "--upgrade-burst",
            "--create-rate",
            "--create-burst",
        ] {
            let e = run(&[flag, "4294967297"], &[]).unwrap_err();
            assert!(e.0.contains(flag) && e.0.contains("too large"), "{e}");
        }
        let e = run(&[], &[("CHATLOOP_CHAT_RATE", "4294967296")]).unwrap_err();
        assert!(e.0.contains("too large"), "{e}");
        let c = run(
            &["--chat-rate", "4294967295", "--chat-burst", "4294967295"],
            &[],
        )
        .unwrap();
        assert_eq!((c.chat_rate, c.chat_burst), (u32::MAX, u32::MAX));
    }
}
