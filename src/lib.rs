//! chatloop: a live chat server on one hand-rolled `mio` event loop.
//!
//! `server` (with `server/redis_link.rs`) is the only module that touches sockets or the
//! clock. Everything below it is synchronous and takes the time as an argument: `conn` (one
//! connection's state machine), `api` and `http` (REST), `ws` and `protocol` (frames and
//! JSON), `hub` (the chat domain), `history`, `cluster` (the Redis side), `tls` (rustls,
//! driven sans-IO), `deflate` (permessage-deflate), `proxy`, `outbox`, `timer`, `ratelimit`,
//! `throttle`, `metrics`, `web` (the pages), `config` and `redis_url` (the settings), `time`
//! (the time types); `ids` also reads the OS's random source, and `logging` installs the log
//! output. The modules form a stack with no cycle: docs/architecture.md draws it and
//! `tests/layering.rs` keeps it so. Every public item has a doc comment (`missing_docs`, an
//! error under CI's `clippy -D warnings`).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
#![warn(missing_debug_implementations)]
#![warn(missing_docs)]

pub mod api;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod deflate;
pub mod history;
pub mod http;
pub mod hub;
pub mod ids;
pub mod logging;
pub mod metrics;
pub mod outbox;
pub mod protocol;
pub mod proxy;
pub mod ratelimit;
pub mod redis_url;
pub mod server;
pub mod throttle;
pub mod time;
pub mod timer;
pub mod tls;
pub mod web;
pub mod ws;

/// The crate version, as in `Cargo.toml`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
