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
    /// `--cluster-enabled yes` (a node of a [`RedisCluster`]), with its bus on a free port
    /// and a 1 s `cluster-node-timeout`, so that a replica replaces a lost master quickly.
    pub cluster: bool,
}

/// A running (or stopped) `redis-server` on 127.0.0.1.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    opts: RedisOptions,
    starts: u32,
    /// The cluster bus port (`--cluster-port`) of a cluster node, kept across restarts.
    bus_port: u16,
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
            bus_port: 0,
        };
        // The free port is found by binding and dropping a listener, so another process may
        // take it before redis-server binds it: try a few ports.
        let mut last = String::new();
        for _ in 0..5 {
            r.port = free_port();
            r.bus_port = free_port();
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
        let bus = self.bus_port.to_string();
        let cluster: Vec<&str> = if self.opts.cluster {
            vec![
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus,
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
            ]
        } else {
            Vec::new()
        };
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", appendonly, "--dir", &dir])
            .args(&auth)
            .args(&cluster)
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

/// How long a cluster may take to agree on its slots, or to replace a master by a replica.
const CLUSTER_LIMIT: Duration = Duration::from_secs(30);

/// A Redis Cluster on loopback ports, each node a [`RedisServer`] with `cluster: true`:
/// `masters` masters (three or more are joined by `redis-cli --cluster create`, the Debian
/// package redis-tools; a single master is given every slot with `CLUSTER ADDSLOTSRANGE`), and
/// `replicas` replicas of each. Nodes are killed (by their own pids) when it drops.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct NodeLine {
    pub id: String,
    pub port: u16,
    pub master: bool,
    pub failed: bool,
    /// Slot ranges served (inclusive), for a master.
    pub slots: Vec<(u16, u16)>,
}

impl RedisCluster {
    #[track_caller]
    pub fn start(masters: usize, replicas: usize) -> RedisCluster {
        assert!(
            masters == 1 && replicas == 0 || masters >= 3,
            "1 master, or 3 and more"
        );
        let opts = RedisOptions {
            cluster: true,
            ..Default::default()
        };
        let nodes = (0..masters * (1 + replicas))
            .map(|_| RedisServer::start_with(opts))
            .collect();
        let c = RedisCluster { nodes };
        if masters == 1 {
            c.nodes[0]
                .command(0, &["CLUSTER", "ADDSLOTSRANGE", "0", "16383"])
                .expect("CLUSTER ADDSLOTSRANGE");
        } else {
            let mut cmd = Command::new("redis-cli");
            cmd.args(["--cluster", "create"]);
            for n in &c.nodes {
                cmd.arg(format!("127.0.0.1:{}", n.port));
            }
            cmd.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
            let out = match cmd.stdin(Stdio::null()).output() {
                Ok(o) => o,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{NOT_FOUND}"),
                Err(e) => panic!("run redis-cli: {e}"),
            };
            assert!(
                out.status.success(),
                "redis-cli --cluster create: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        c.wait_until(
            "every node agrees on the slots and every replica is in sync",
            |c| c.settled(masters),
        );
        c
    }

    /// `redis-cluster://127.0.0.1:P1,127.0.0.1:P2,...` (every node a seed).
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis-cluster://{}", seeds.join(","))
    }

    /// Waits (bounded) until `ok`; panics with every node's view of the cluster if not.
    #[track_caller]
    pub fn wait_until(&self, what: &str, ok: impl Fn(&RedisCluster) -> bool) {
        let t = Instant::now();
        while t.elapsed() < CLUSTER_LIMIT {
            if ok(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let views: Vec<String> = self
            .nodes
            .iter()
            .map(|n| match n.command(0, &["CLUSTER", "NODES"]) {
                Ok(v) => format!("--- {}:\n{v}", n.port),
                Err(e) => format!("--- {}: {e}", n.port),
            })
            .collect();
        panic!(
            "Redis Cluster: not {what} within {CLUSTER_LIMIT:?}\n{}",
            views.join("\n")
        );
    }

    /// Every live node says `cluster_state:ok` with all slots served by `masters` healthy
    /// masters, and every live replica's link to its master is up.
    fn settled(&self, masters: usize) -> bool {
        self.nodes.iter().filter(|n| n.ping()).all(|n| {
            let info = n.command(0, &["CLUSTER", "INFO"]).unwrap_or_default();
            let role = n.command(0, &["ROLE"]).unwrap_or_default();
            let lines = self.nodes_view(n);
            info.contains("cluster_state:ok")
                && info.contains("cluster_slots_ok:16384")
                && lines
                    .iter()
                    .filter(|l| l.master && !l.slots.is_empty())
                    .count()
                    == masters
                && (role.starts_with("master") || role.contains("\nconnected\n"))
        })
    }

    /// `CLUSTER NODES` as `node` sees it (nodes that failed included, flagged).
    pub fn nodes_view(&self, node: &RedisServer) -> Vec<NodeLine> {
        let text = node.command(0, &["CLUSTER", "NODES"]).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let port = f
                    .get(1)?
                    .split('@')
                    .next()?
                    .rsplit(':')
                    .next()?
                    .parse()
                    .ok()?;
                let flags = f.get(2)?;
                let slots = f
                    .iter()
                    .skip(8)
                    .filter(|s| !s.starts_with('['))
                    .filter_map(|s| match s.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => s.parse().ok().map(|a| (a, a)),
                    })
                    .collect();
                Some(NodeLine {
                    id: f.first()?.to_string(),
                    port,
                    master: flags.contains("master"),
                    failed: flags.contains("fail"),
                    slots,
                })
            })
            .collect()
    }

    /// The first live node (to ask about the cluster).
    fn live(&self) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.ping())
            .expect("a live Redis node")
    }

    /// The slot of a key (`CLUSTER KEYSLOT`).
    pub fn slot_of(&self, key: &str) -> u16 {
        self.live()
            .command(0, &["CLUSTER", "KEYSLOT", key])
            .expect("CLUSTER KEYSLOT")
            .parse()
            .expect("a slot number")
    }

    /// The index in `nodes` of the master serving `slot`, as the first live node sees it.
    pub fn master_of(&self, slot: u16) -> usize {
        let line = self
            .nodes_view(self.live())
            .into_iter()
            .find(|l| l.master && !l.failed && l.slots.iter().any(|&(a, b)| a <= slot && slot <= b))
            .expect("a master serving the slot");
        self.index_of(line.port)
    }

    fn index_of(&self, port: u16) -> usize {
        self.nodes
            .iter()
            .position(|n| n.port == port)
            .expect("one of our nodes")
    }

    /// The node's cluster id.
    pub fn id(&self, i: usize) -> String {
        self.nodes[i]
            .command(0, &["CLUSTER", "MYID"])
            .expect("CLUSTER MYID")
    }

    /// A command on the master of `key` (no redirection followed).
    pub fn command(&self, key: &str, args: &[&str]) -> Result<String, String> {
        self.nodes[self.master_of(self.slot_of(key))].command(0, args)
    }

    /// Starts moving `slot` to master `to` (by hand, as `redis-cli --cluster reshard` does):
    /// `to` is importing it and its master migrating it; no key has moved yet.
    #[track_caller]
    pub fn begin_migration(&self, slot: u16, to: usize) -> Migration {
        let from = self.master_of(slot);
        assert_ne!(from, to, "slot {slot} is on that master already");
        let s = slot.to_string();
        let (from_id, to_id) = (self.id(from), self.id(to));
        self.nodes[to]
            .command(0, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id])
            .expect("SETSLOT IMPORTING");
        self.nodes[from]
            .command(0, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id])
            .expect("SETSLOT MIGRATING");
        Migration { slot, from, to }
    }

    /// Moves up to `n` keys of the migration's slot (`MIGRATE`); returns how many moved.
    #[track_caller]
    pub fn migrate_keys(&self, m: &Migration, n: usize) -> usize {
        let s = m.slot.to_string();
        let keys = self.nodes[m.from]
            .command(0, &["CLUSTER", "GETKEYSINSLOT", &s, &n.to_string()])
            .expect("GETKEYSINSLOT");
        let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
        if keys.is_empty() {
            return 0;
        }
        let port = self.nodes[m.to].port.to_string();
        let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
        args.extend(keys.iter().copied());
        self.nodes[m.from].command(0, &args).expect("MIGRATE");
        keys.len()
    }

    /// Moves the rest of the slot's keys and gives the slot to its new master, on every node.
    #[track_caller]
    pub fn finish_migration(&self, m: Migration) {
        while self.migrate_keys(&m, 100) > 0 {}
        let s = m.slot.to_string();
        let to_id = self.id(m.to);
        for i in std::iter::once(m.to)
            .chain(std::iter::once(m.from))
            .chain((0..self.nodes.len()).filter(|&i| i != m.to && i != m.from))
        {
            if self.nodes[i].ping() {
                let _ = self.nodes[i].command(0, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
            }
        }
        self.wait_until("agreed on the migrated slot", |c| {
            c.nodes.iter().filter(|n| n.ping()).all(|n| {
                c.nodes_view(n).iter().any(|l| {
                    l.port == c.nodes[m.to].port
                        && l.slots.iter().any(|&(a, b)| a <= m.slot && m.slot <= b)
                })
            })
        });
    }

    /// Kills master `i` (SIGKILL to its own pid) and waits until one of its replicas serves
    /// its slots and the cluster is `ok` again.
    #[track_caller]
    pub fn kill_master_and_wait_for_failover(&mut self, i: usize) {
        let port = self.nodes[i].port;
        let slots = self
            .nodes_view(&self.nodes[i])
            .into_iter()
            .find(|l| l.port == port)
            .expect("the master's own line")
            .slots;
        self.nodes[i].kill();
        self.wait_until("failed over to a replica", |c| {
            let Some(n) = c.nodes.iter().find(|n| n.port != port && n.ping()) else {
                return false;
            };
            let info = n.command(0, &["CLUSTER", "INFO"]).unwrap_or_default();
            info.contains("cluster_state:ok")
                && c.nodes_view(n)
                    .iter()
                    .any(|l| l.master && !l.failed && l.port != port && l.slots == slots)
        });
    }
}

/// A slot being moved between two masters (see [`RedisCluster::begin_migration`]).
#[derive(Debug)]
pub struct Migration {
    pub slot: u16,
    pub from: usize,
    pub to: usize,
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
