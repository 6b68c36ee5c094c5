//! loadgen: load generator for chatloop (see README.md). Every subcommand stops by itself and
//! prints one JSON line on stdout and a readable summary on stderr.

mod args;
mod clock;
mod fanout;
mod floor;
mod hist;
mod http;
mod idle;
mod join;
mod members;
mod pool;
mod report;
mod rest;
mod sys;
mod ws;
mod wsclient;

use serde_json::json;

const USAGE: &str = "usage: loadgen <fanout|idle|rest|join|floor> --addr 127.0.0.1:PORT [options]
  fanout --rooms R --members M --senders S --rate MSGS_PER_SEC_PER_ROOM --duration 10s [--warmup 2s]
  idle   --conns N --duration 30s [--per-room 100] [--sockets-per-session 50]
  rest   --clients C --duration 10s
  join   --room-members 100 --joins J --duration 10s [--concurrency 4]
  floor  --rooms R --members M --rate X --duration 10s (no --addr: loopback socket pairs)
common: --server-pid PID (sample its CPU/RSS around the window)   see README.md";

fn main() {
    clock::init();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = argv.first().cloned() else {
        eprintln!("{USAGE}");
        std::process::exit(2);
    };
    if cmd == "-h" || cmd == "--help" || cmd == "help" {
        eprintln!("{USAGE}");
        return;
    }
    let result = args::Args::parse(&argv[1..]).and_then(|a| match cmd.as_str() {
        "fanout" => fanout::run(&a),
        "floor" => floor::run(&a),
        "idle" => idle::run(&a),
        "join" => join::run(&a),
        "rest" => rest::run(&a),
        other => Err(format!("unknown subcommand {other:?}\n{USAGE}")),
    });
    match result {
        Ok(o) => report::emit(o),
        Err(e) => {
            eprintln!("loadgen {cmd}: error: {e}");
            println!("{}", json!({"scenario": cmd, "ok": false, "error": e}));
            std::process::exit(1);
        }
    }
}
