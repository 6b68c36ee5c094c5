//! chatloop: a live chat server on one hand-rolled `mio` event loop.
//!
//! The pure, synchronous modules (`hub`, `http`, `api`, `ws`, `protocol`, `timer`) decide
//! everything a client can cause; `server` is the only module that touches sockets or the clock.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod api;
pub mod cluster;
pub mod config;
pub mod conn;
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
