//! The `chatloop` binary: read the configuration, start logging, run the server.

use std::process::ExitCode;

use chatloop::config::{Command, Config};

mod harden;

fn main() -> ExitCode {
    let cfg = match Config::parse(std::env::args().skip(1), |k| std::env::var(k).ok()) {
        Ok(Command::Run(cfg)) => *cfg,
        Ok(Command::Help(text)) | Ok(Command::Version(text)) => {
            println!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("chatloop: {e}");
            return ExitCode::from(2);
        }
    };
    chatloop::logging::init(cfg.log_level, cfg.log_format);
    // Memory-only: chat must never reach a core file or (with --lock-memory) swap.
    if let Err(e) = harden::forbid_core_dumps() {
        log::warn!("could not turn off core dumps: {e}");
    }
    if cfg.lock_memory {
        if let Err(e) = harden::lock_memory() {
            log::error!(
                "--lock-memory: mlockall failed ({e}); give the process CAP_IPC_LOCK or raise \
                 RLIMIT_MEMLOCK (systemd: LimitMEMLOCK=infinity)"
            );
            return ExitCode::FAILURE;
        }
        log::info!("memory locked (mlockall): chat never reaches swap");
    }
    log::debug!("core dumps off, process dumpable: {}", harden::dumpable());
    let mut server = match chatloop::server::Server::bind(cfg.clone()) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot listen on {}:{}: {e}", cfg.host, cfg.port);
            return ExitCode::FAILURE;
        }
    };
    server.set_release_memory(harden::release_free_memory);
    log::info!(
        "chatloop {} listening on {}://{}",
        chatloop::VERSION,
        server.scheme(),
        server.local_addr()
    );
    log::info!(
        "room TTL {} s, session TTL {} s, max connections {}, max WebSocket message {} bytes",
        cfg.room_ttl.0 / 1_000_000,
        cfg.session_ttl.0 / 1_000_000,
        cfg.max_connections,
        cfg.max_ws_message
    );
    log::debug!("settings: {cfg:?}");
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("event loop failed: {e}");
            ExitCode::FAILURE
        }
    }
}
