//! loadgen: load generator for chatloop (see README.md). Every subcommand stops by itself and
//! prints one JSON line on stdout and a readable summary on stderr.

mod args;
mod clock;
mod fanout;
mod floor;
mod hist;
mod http;
mod httpfloor;
mod idle;
mod join;
mod members;
mod pool;
mod report;
mod rest;
mod soak;
mod sys;
mod tls;
mod ws;
mod wsclient;

use serde_json::json;

const USAGE: &str = "usage: loadgen <fanout|idle|rest|join|soak|floor|httpfloor> --addr 127.0.0.1:PORT [options]
  fanout --rooms R --members M --senders S --rate MSGS_PER_SEC_PER_ROOM --duration 10s [--warmup 2s]
         [--nodes 127.0.0.1:P2,...] (cluster: members spread round-robin over --addr and these)
  idle   --conns N --duration 30s [--per-room 100] [--sockets-per-session 50]
  rest   --clients C --duration 10s
  join   --room-members 100 --joins J --duration 10s [--concurrency 4]
  soak   --clients N --rooms R --duration 10m [--seed S] (random chat/typing/reconnect/leave, checked)
  floor  --rooms R --members M --rate X --duration 10s [--relay] [--writev] (no --addr: loopback
         socket pairs; --relay: timestamps taken on the readers' CPU and sent to the writer over
         loopback; --writev: each write a one-slice writev instead of send)
  httpfloor --duration 30s [--host 127.0.0.1] [--port 0] [--response-bytes 243] (a minimal HTTP server: REST's floor)
common: --tls (wss/https, any server certificate: loopback benchmarks) or --tls-ca CA.pem,
        --server-pid PID (sample its CPU/RSS around the window), --extra-pids A,B (add them)
see README.md";

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
    let result = args::Args::parse(&argv[1..]).and_then(|a| {
        tls::init(&a)?;
        if tls::enabled() && (cmd == "floor" || cmd == "httpfloor") {
            return Err(format!("{cmd} has no TLS (it measures the kernel's floor)"));
        }
        match cmd.as_str() {
            "fanout" => fanout::run(&a),
            "floor" => floor::run(&a),
            "httpfloor" => httpfloor::run(&a),
            "idle" => idle::run(&a),
            "join" => join::run(&a),
            "rest" => rest::run(&a),
            "soak" => soak::run(&a),
            other => Err(format!("unknown subcommand {other:?}\n{USAGE}")),
        }
    });
    match result {
        Ok(o) => {
            // A run that completed but found a problem (e.g. soak's loss check) says "ok": false.
            let failed = o.get("ok").and_then(serde_json::Value::as_bool) == Some(false);
            report::emit(o);
            if failed {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("loadgen {cmd}: error: {e}");
            println!("{}", json!({"scenario": cmd, "ok": false, "error": e}));
            std::process::exit(1);
        }
    }
}
