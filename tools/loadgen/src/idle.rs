//! `idle`: N idle WebSocket members held open for a while (to measure the server's memory per
//! connection). Sessions are shared (one session holds many sockets), rooms hold `--per-room`
//! members, source addresses are spread over 127.0.0.2.. so ephemeral ports do not run out.
//! When one process cannot hold N sockets it re-executes itself as child processes, each with a
//! share, and sums their results. `READY <n>` goes to stderr once every socket is settled.

use crate::args::{Args, loopback_src};
use crate::clock::{self, now_ns};
use crate::http;
use crate::members::Target;
use crate::pool::{OTHER_TOKENS, Pool};
use crate::report::{self, Obj};
use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// File descriptors kept free for everything else (epoll, stdio, set-up HTTP, ...).
const FD_MARGIN: u64 = 128;

struct Opts {
    addr: std::net::SocketAddrV4,
    conns: usize,
    duration: Duration,
    per_room: usize,
    per_session: usize,
    src_ips: usize,
    src_offset: usize,
    parallel: usize,
    connect_timeout: Duration,
    child: bool,
    max_per_proc: Option<u64>,
    server_pid: Option<u64>,
}

pub fn run(a: &Args) -> Result<Obj, String> {
    let conns = a.u64_or("conns", 1000)?.max(1) as usize;
    let o = Opts {
        addr: a.addr()?,
        conns,
        duration: a.dur_or("duration", Duration::from_secs(30))?,
        per_room: a.u64_or("per-room", 100)?.max(1) as usize,
        per_session: a.u64_or("sockets-per-session", 50)?.max(1) as usize,
        src_ips: a
            .u64_or("src-ips", (conns as u64 / 5000 + 1).max(4))?
            .clamp(1, 250) as usize,
        src_offset: a.u64_or("src-offset", 0)? as usize,
        parallel: a.u64_or("connect-parallel", 256)?.max(1) as usize,
        connect_timeout: a.dur_or("connect-timeout", Duration::from_secs(120))?,
        child: a.flag("child"),
        max_per_proc: a.opt_u64("max-per-proc")?,
        server_pid: a.opt_u64("server-pid")?,
    };
    a.finish()?;
    let limit = crate::sys::raise_nofile().map_err(|e| format!("raising RLIMIT_NOFILE: {e}"))?;
    let cap = o
        .max_per_proc
        .unwrap_or(u64::MAX)
        .min(limit.saturating_sub(FD_MARGIN))
        .max(1);
    if !o.child && o.conns as u64 > cap {
        return run_split(&o, cap as usize);
    }
    if o.conns as u64 > cap {
        return Err(format!(
            "{} sockets exceed this process's share {cap} (open-file limit {limit})",
            o.conns
        ));
    }
    run_single(&o)
}

fn sample_rss(pid: Option<u64>) -> Option<u64> {
    pid.and_then(|p| crate::sys::sample_process(p as u32).ok())
        .map(|s| s.rss_bytes)
}

fn run_single(o: &Opts) -> Result<Obj, String> {
    let rss_before = sample_rss(o.server_pid);
    let n_sessions = o.conns.div_ceil(o.per_session);
    let n_rooms = o.conns.div_ceil(o.per_room);
    eprintln!(
        "idle: creating {n_sessions} sessions and {n_rooms} rooms, then {} sockets from {} source address(es)",
        o.conns, o.src_ips
    );
    let sessions = http::create_sessions(o.addr, n_sessions, "idle", 4)?;
    let mut client = http::Client::new(o.addr);
    let rooms = (0..n_rooms)
        .map(|r| client.create_room(&sessions[r % n_sessions]))
        .collect::<Result<Vec<_>, _>>()?;
    drop(client);
    let targets = (0..o.conns)
        .map(|i| Target {
            addr: o.addr,
            path: format!(
                "/ws/{}?session_id={}",
                rooms[i % n_rooms],
                sessions[i % n_sessions]
            ),
            src: Some(loopback_src(i, o.src_ips, o.src_offset)),
        })
        .collect();
    let mut pool = Pool::new(targets)?;
    let t0 = now_ns();
    pool.connect_all(o.parallel, t0 + o.connect_timeout.as_nanos() as u64);
    let connect_s = clock::secs(now_ns() - t0);
    let established = pool.established;
    eprintln!("READY {established}");
    eprintln!(
        "idle: {established}/{} established in {connect_s:.2}s; failures {:?}",
        o.conns, pool.failures
    );
    let rss_ready = sample_rss(o.server_pid);

    // Hold: until the duration passes, or (child) until the parent closes our stdin.
    let stdin_token = Token(OTHER_TOKENS);
    let mut stdin_eof = false;
    if o.child {
        pool.poll
            .registry()
            .register(&mut SourceFd(&0), stdin_token, Interest::READABLE)
            .map_err(|e| format!("watching stdin: {e}"))?;
    }
    let hold_end = if o.child {
        // Safety net only: the parent ends the hold by closing stdin.
        now_ns() + (o.duration + o.connect_timeout + Duration::from_secs(60)).as_nanos() as u64
    } else {
        now_ns() + o.duration.as_nanos() as u64
    };
    let mut events = Events::with_capacity(1024);
    let mut buf = [0u8; 64];
    while now_ns() < hold_end && !stdin_eof {
        let timeout = clock::until(hold_end).min(Duration::from_millis(200));
        pool.poll_once(&mut events, timeout, &mut |ev, _| {
            if ev.token() == stdin_token {
                // SAFETY: plain read(2) of fd 0 into a stack buffer.
                let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    stdin_eof = true;
                }
            }
        });
    }
    let held = pool.open_now();
    let rss_end = sample_rss(o.server_pid);
    let pings = pool.pings();
    pool.close_all(Duration::from_secs(2));

    let mut r = Obj::new();
    r.insert("scenario".into(), json!("idle"));
    r.insert("ok".into(), json!(true));
    r.insert("conns".into(), json!(o.conns));
    r.insert("established".into(), json!(established));
    r.insert("held_at_end".into(), json!(held));
    r.insert("failures".into(), json!(pool.failed()));
    r.insert("failure_reasons".into(), json!(pool.failures));
    r.insert("dropped".into(), json!(pool.dropped));
    r.insert("frames".into(), json!(pool.frames));
    r.insert(
        "first_frame_not_welcome".into(),
        json!(pool.first_not_welcome),
    );
    r.insert("pings_answered".into(), json!(pings));
    r.insert("connect_s".into(), json!(report::round(connect_s, 3)));
    r.insert("rooms".into(), json!(n_rooms));
    r.insert("sessions".into(), json!(n_sessions));
    r.insert("processes".into(), json!(1));
    add_rss(&mut r, rss_before, rss_ready, rss_end, established);
    Ok(r)
}

fn add_rss(
    r: &mut Obj,
    before: Option<u64>,
    ready: Option<u64>,
    end: Option<u64>,
    established: u64,
) {
    if let (Some(b), Some(rd)) = (before, ready) {
        r.insert("server_rss_before".into(), json!(b));
        r.insert("server_rss_ready".into(), json!(rd));
        r.insert("server_rss_end".into(), json!(end));
        let per = report::ratio(rd.saturating_sub(b) as f64, established as f64);
        r.insert(
            "server_rss_bytes_per_conn".into(),
            json!(report::round(per, 1)),
        );
        eprintln!(
            "idle: server RSS {} KiB before, {} KiB with {established} sockets open => {per:.0} bytes per connection",
            b / 1024,
            rd / 1024
        );
    }
}

enum Msg {
    Line(usize, String),
    Eof(usize),
}

/// Splits the work over child processes (re-executing this binary), forwards their stderr,
/// prints one `READY <sum>` when all are ready, holds, then ends them by closing their stdin.
fn run_split(o: &Opts, cap: usize) -> Result<Obj, String> {
    let n = o.conns.div_ceil(cap);
    let exe = std::env::current_exe().map_err(|e| format!("finding my own executable: {e}"))?;
    eprintln!(
        "idle: {} sockets exceed {cap} per process: splitting over {n} child processes",
        o.conns
    );
    let rss_before = sample_rss(o.server_pid);
    let (tx, rx) = mpsc::channel();
    let mut children: Vec<(Child, Option<ChildStdin>)> = Vec::new();
    let mut outs = Vec::new();
    for c in 0..n {
        let share = o.conns / n + usize::from(c < o.conns % n);
        let mut cmd = Command::new(&exe);
        cmd.args(["idle", "--child", "--addr", &o.addr.to_string()]);
        cmd.args(crate::tls::child_args());
        for (k, v) in [
            ("conns", share.to_string()),
            ("duration", format!("{}ms", o.duration.as_millis())),
            ("per-room", o.per_room.to_string()),
            ("sockets-per-session", o.per_session.to_string()),
            ("src-ips", o.src_ips.to_string()),
            ("src-offset", (o.src_offset + c * o.src_ips).to_string()),
            ("connect-parallel", o.parallel.div_ceil(n).to_string()),
            (
                "connect-timeout",
                format!("{}ms", o.connect_timeout.as_millis()),
            ),
        ] {
            cmd.arg(format!("--{k}")).arg(v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting child {c}: {e}"))?;
        let stdin = child.stdin.take();
        let (Some(err), Some(mut out)) = (child.stderr.take(), child.stdout.take()) else {
            return Err("child without pipes".into());
        };
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(Msg::Line(c, line));
            }
            let _ = tx.send(Msg::Eof(c));
        });
        outs.push(std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        }));
        children.push((child, stdin));
    }
    drop(tx);
    // Wait until every child printed READY (or ended).
    let mut ready = vec![None::<u64>; n];
    let deadline = now_ns() + (o.connect_timeout + Duration::from_secs(60)).as_nanos() as u64;
    while ready.iter().any(Option::is_none) && now_ns() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Msg::Line(c, l)) => {
                match l.strip_prefix("READY ").and_then(|v| v.trim().parse().ok()) {
                    Some(v) => ready[c] = Some(v),
                    None => eprintln!("[child {c}] {l}"),
                }
            }
            Ok(Msg::Eof(c)) => {
                ready[c].get_or_insert(0);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let total: u64 = ready.iter().map(|r| r.unwrap_or(0)).sum();
    eprintln!("READY {total}");
    let rss_ready = sample_rss(o.server_pid);
    let hold_end = now_ns() + o.duration.as_nanos() as u64;
    while now_ns() < hold_end {
        if let Ok(Msg::Line(c, l)) =
            rx.recv_timeout(clock::until(hold_end).min(Duration::from_millis(200)))
        {
            eprintln!("[child {c}] {l}");
        }
    }
    let rss_end = sample_rss(o.server_pid);
    for (_, stdin) in children.iter_mut() {
        stdin.take(); // closing it ends the child's hold
    }
    // Bounded wait for the children; one that does not end is killed (it is our own child).
    let wait_end = now_ns() + 30_000_000_000;
    for (c, (child, _)) in children.iter_mut().enumerate() {
        loop {
            while let Ok(Msg::Line(c, l)) = rx.try_recv() {
                eprintln!("[child {c}] {l}");
            }
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if now_ns() < wait_end => std::thread::sleep(Duration::from_millis(50)),
                _ => {
                    eprintln!("idle: child {c} did not exit in time; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
    }
    while let Ok(m) = rx.try_recv() {
        if let Msg::Line(c, l) = m {
            eprintln!("[child {c}] {l}");
        }
    }
    let mut r = Obj::new();
    let mut sums: BTreeMap<&str, u64> = BTreeMap::new();
    let mut maps: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
    let mut errors = Vec::new();
    for (c, h) in outs.into_iter().enumerate() {
        let text = h.join().unwrap_or_default();
        let v: Value = match text.lines().last().map(serde_json::from_str) {
            Some(Ok(v)) => v,
            _ => {
                errors.push(format!("child {c} printed no result"));
                continue;
            }
        };
        if v.get("ok") != Some(&json!(true)) {
            errors.push(format!(
                "child {c}: {}",
                v.get("error").unwrap_or(&Value::Null)
            ));
        }
        for k in [
            "conns",
            "established",
            "held_at_end",
            "failures",
            "pings_answered",
            "first_frame_not_welcome",
            "rooms",
            "sessions",
        ] {
            *sums.entry(k).or_default() += v.get(k).and_then(Value::as_u64).unwrap_or(0);
        }
        for k in ["failure_reasons", "dropped", "frames"] {
            if let Some(m) = v.get(k).and_then(Value::as_object) {
                for (name, x) in m {
                    *maps.entry(k).or_default().entry(name.clone()).or_default() +=
                        x.as_u64().unwrap_or(0);
                }
            }
        }
    }
    r.insert("scenario".into(), json!("idle"));
    r.insert("ok".into(), json!(errors.is_empty()));
    r.insert("conns".into(), json!(o.conns));
    for (k, v) in sums {
        if k != "conns" {
            r.insert(k.into(), json!(v));
        }
    }
    for (k, v) in maps {
        r.insert(k.into(), json!(v));
    }
    r.insert("processes".into(), json!(n));
    if !errors.is_empty() {
        r.insert("error".into(), json!(errors.join("; ")));
    }
    add_rss(&mut r, rss_before, rss_ready, rss_end, total);
    Ok(r)
}
