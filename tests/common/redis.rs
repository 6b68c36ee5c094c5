//! A throw-away `redis-server` for the cluster tests: one per test, on a free loopback port,
//! no persistence unless asked, its own directory under `CARGO_TARGET_TMPDIR`, killed (by its
//! own pid) when dropped. `stop()` / `restart()` keep the port, for the Redis-outage tests;
//! `pause()` / `resume()` freeze it (SIGSTOP / SIGCONT) with its sockets open; [`Proxy`]
//! cuts, stalls or slows one node's link to Redis while the others keep theirs, and can
//! inject bytes of its own toward the node (a hostile Redis).
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NOT_FOUND: &str = "redis-server not found: run tools/test.sh, which installs it, \
                         or apt-get install redis-server";

/// How long start-up (until `PING` answers `+PONG`) and shutdown may take.
const START_LIMIT: Duration = Duration::from_secs(10);
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// Options of a [`RedisServer`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RedisOptions {
    /// `--appendonly yes`: the data survives `stop()` + `restart()`.
    pub appendonly: bool,
    /// `--requirepass`: clients must authenticate (the helpers here do).
    pub password: Option<&'static str>,
}

/// A running (or stopped) `redis-server` on 127.0.0.1.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    opts: RedisOptions,
    starts: u32,
}

impl RedisServer {
    /// A fresh Redis without persistence.
    #[track_caller]
    pub fn start() -> RedisServer {
        RedisServer::start_with(RedisOptions::default())
    }

    #[track_caller]
    pub fn start_with(opts: RedisOptions) -> RedisServer {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "redis-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the Redis directory");
        let mut r = RedisServer {
            child: None,
            port: 0,
            dir,
            opts,
            starts: 0,
        };
        // The free port is found by binding and dropping a listener, so another process may
        // take it before redis-server binds it: try a few ports.
        let mut last = String::new();
        for _ in 0..5 {
            r.port = free_port();
            match r.spawn() {
                Ok(()) => return r,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start on a free port: {last}");
    }

    /// `redis://127.0.0.1:PORT/DB`
    pub fn url(&self, db: u32) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Freezes Redis (SIGSTOP to its own pid): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused Redis run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let child = self.child.as_ref().expect("a running Redis");
        let status = Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} {}", child.id());
    }

    /// Stops Redis gracefully (SIGTERM, which also flushes the append-only file), SIGKILL if
    /// it has not exited within the bound. The port is kept for [`RedisServer::restart`].
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let t = Instant::now();
        while t.elapsed() < STOP_LIMIT {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills Redis with SIGKILL (no flush); the port is kept.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts Redis again on the same port (and directory) after [`RedisServer::stop`].
    #[track_caller]
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart() of a running Redis");
        // The old listening socket is gone with the process; Redis sets SO_REUSEADDR, but
        // allow a few attempts in case the port is briefly unavailable.
        let mut last = String::new();
        for _ in 0..20 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server did not restart on port {}: {last}", self.port);
    }

    /// The last `n` lines of every log this instance wrote.
    pub fn log_tail(&self, n: usize) -> String {
        let mut out = String::new();
        for i in 0..self.starts {
            let path = self.dir.join(format!("redis-{i}.log"));
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {} ---\n", path.display()));
            for l in &lines[lines.len().saturating_sub(n)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Sends one command (in database `db`) and returns its reply in a readable form:
    /// `+OK` → `OK`, `:3` → `3`, bulk → its text, `-ERR x` → `Err("ERR x")`, arrays joined
    /// with newlines.
    pub fn command(&self, db: u32, args: &[&str]) -> Result<String, String> {
        let stream = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(2))
            .map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let mut w = stream.try_clone().map_err(|e| e.to_string())?;
        let mut r = BufReader::new(stream);
        if let Some(pw) = self.opts.password {
            w.write_all(&encode(&["AUTH", pw]))
                .map_err(|e| e.to_string())?;
            read_reply(&mut r)?;
        }
        if db != 0 {
            w.write_all(&encode(&["SELECT", &db.to_string()]))
                .map_err(|e| e.to_string())?;
            read_reply(&mut r)?;
        }
        w.write_all(&encode(args)).map_err(|e| e.to_string())?;
        read_reply(&mut r)
    }

    /// True when a TCP connect + `PING` answers `+PONG`.
    pub fn ping(&self) -> bool {
        matches!(self.command(0, &["PING"]).as_deref(), Ok("PONG"))
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log_path = self.dir.join(format!("redis-{}.log", self.starts));
        self.starts += 1;
        let log = File::create(&log_path).map_err(|e| e.to_string())?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let port = self.port.to_string();
        let dir = self.dir.to_str().expect("UTF-8 temp path").to_string();
        let appendonly = if self.opts.appendonly { "yes" } else { "no" };
        let auth: Vec<&str> = match self.opts.password {
            Some(pw) => vec!["--requirepass", pw],
            None => Vec::new(),
        };
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", appendonly, "--dir", &dir])
            .args(&auth)
            .args(["--daemonize", "no", "--logfile", ""])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{NOT_FOUND}"),
            Err(e) => panic!("spawn redis-server: {e}"),
        };
        let t = Instant::now();
        while t.elapsed() < START_LIMIT {
            if let Ok(Some(status)) = child.try_wait() {
                let text = std::fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!(
                    "redis-server exited ({status}) on port {}:\n{text}",
                    self.port
                ));
            }
            if self.ping() {
                self.child = Some(child);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        Err(format!(
            "redis-server on port {} did not answer PING within {START_LIMIT:?}:\n{text}",
            self.port
        ))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // A paused Redis would not die of SIGKILL before SIGCONT on every kernel.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.kill();
        // (A failing cluster test has printed the log tail already.)
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn read_reply(r: &mut BufReader<TcpStream>) -> Result<String, String> {
    let mut line = String::new();
    let n = r.read_line(&mut line).map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("connection closed".into());
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at(1);
    match kind {
        "+" | ":" => Ok(rest.to_string()),
        "-" => Err(rest.to_string()),
        "$" => {
            let len: i64 = rest.parse().map_err(|_| format!("bad reply {line:?}"))?;
            if len < 0 {
                return Ok(String::new());
            }
            let mut buf = vec![0u8; len as usize + 2];
            r.read_exact(&mut buf).map_err(|e| e.to_string())?;
            buf.truncate(len as usize);
            Ok(String::from_utf8_lossy(&buf).into_owned())
        }
        "*" => {
            let len: i64 = rest.parse().map_err(|_| format!("bad reply {line:?}"))?;
            let mut items = Vec::new();
            for _ in 0..len.max(0) {
                items.push(read_reply(r)?);
            }
            Ok(items.join("\n"))
        }
        _ => Err(format!("unexpected reply {line:?}")),
    }
}

/// A TCP proxy in front of Redis, for one node's link to it: `cut()` closes its connections
/// and refuses new ones (as when Redis or the route dies), `stall()` keeps them open but
/// forwards nothing (a silent network partition), `trickle()` forwards a few bytes at a time
/// (a Redis that answers, but far too slowly), `restore()` heals any of them (connections open
/// during a stall or trickle are closed, never replayed late). `inject()` writes bytes of its
/// own to the node, as a hostile or broken Redis would. Threads end when the proxy drops.
pub struct Proxy {
    pub port: u16,
    shared: Arc<ProxyShared>,
}

struct ProxyShared {
    target: SocketAddr,
    mode: AtomicU8,
    stop: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
    /// The node's side of each connection, and a lock so that injected bytes never land in
    /// the middle of a chunk being forwarded.
    clients: Mutex<Vec<TcpStream>>,
    /// Connections accepted so far.
    accepted: AtomicU32,
}

const PASS: u8 = 0;
const CUT: u8 = 1;
const STALL: u8 = 2;
const TRICKLE: u8 = 3;
/// In trickle mode: at most this many bytes per direction and connection per tick.
const TRICKLE_BYTES: usize = 8;
const TRICKLE_TICK: Duration = Duration::from_millis(50);
/// Longer than one read of a forwarding thread (50 ms), so that a new mode is in force.
const MODE_SETTLE: Duration = Duration::from_millis(150);

impl Proxy {
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(ProxyShared {
            target,
            mode: AtomicU8::new(PASS),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            clients: Mutex::new(Vec::new()),
            accepted: AtomicU32::new(0),
        });
        let sh = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if sh.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                if sh.mode.load(Ordering::SeqCst) == CUT {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect_timeout(&sh.target, Duration::from_secs(2))
                else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                {
                    let mut conns = sh.conns.lock().unwrap();
                    conns.push(client.try_clone().unwrap());
                    conns.push(server.try_clone().unwrap());
                    sh.clients.lock().unwrap().push(client.try_clone().unwrap());
                    sh.accepted.fetch_add(1, Ordering::SeqCst);
                }
                for (from, to, toward_node) in [
                    (
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        false,
                    ),
                    (server, client, true),
                ] {
                    let sh = sh.clone();
                    std::thread::spawn(move || pump(from, to, toward_node, &sh));
                }
            }
        });
        Proxy { port, shared }
    }

    /// `redis://127.0.0.1:PROXYPORT/DB`
    pub fn url(&self, db: u32) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    /// Closes every proxied connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.shared.mode.store(CUT, Ordering::SeqCst);
        self.close_all();
    }

    /// Forwards nothing more (connections stay open, new ones are accepted and left
    /// hanging) until [`Proxy::restore`]. Returns once no forwarding thread can still be in
    /// the middle of a read that began before (they wait at most 50 ms per read).
    pub fn stall(&self) {
        self.shared.mode.store(STALL, Ordering::SeqCst);
        std::thread::sleep(MODE_SETTLE);
    }

    /// Forwards at most a few bytes per direction every 50 ms until [`Proxy::restore`]:
    /// replies keep coming, so a node never sees a silent link, but far slower than asked.
    pub fn trickle(&self) {
        self.shared.mode.store(TRICKLE, Ordering::SeqCst);
        std::thread::sleep(MODE_SETTLE);
    }

    /// Back to forwarding; connections left over from a stall or trickle are closed first.
    pub fn restore(&self) {
        if matches!(self.shared.mode.load(Ordering::SeqCst), STALL | TRICKLE) {
            self.close_all();
        }
        self.shared.mode.store(PASS, Ordering::SeqCst);
    }

    /// Writes `bytes` to the node on every open connection, between forwarded chunks.
    pub fn inject(&self, bytes: &[u8]) {
        let mut clients = self.shared.clients.lock().unwrap();
        for c in clients.iter_mut() {
            let _ = c.write_all(bytes);
        }
    }

    /// How many connections the proxy has accepted so far (a node's reconnects).
    pub fn accepted(&self) -> u32 {
        self.shared.accepted.load(Ordering::SeqCst)
    }

    fn close_all(&self) {
        for c in self.shared.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        self.shared.clients.lock().unwrap().clear();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.close_all();
        // Wake the accept loop so that it sees `stop`.
        let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port));
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, toward_node: bool, sh: &ProxyShared) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = [0u8; 16384];
    while !sh.stop.load(Ordering::SeqCst) {
        let mode = sh.mode.load(Ordering::SeqCst);
        if mode == STALL {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let want = if mode == TRICKLE && toward_node {
            std::thread::sleep(TRICKLE_TICK);
            TRICKLE_BYTES
        } else {
            buf.len()
        };
        match from.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => {
                let _guard = toward_node.then(|| sh.clients.lock().unwrap());
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
