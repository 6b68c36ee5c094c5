//! Redis Cluster (sharded Redis), the pure pieces: which hash slot a key lives in, the slot
//! map (which master serves which slot) read from `CLUSTER SLOTS`, the `MOVED` / `ASK`
//! redirections, and the seed list of a `redis-cluster://` URL.
//!
//! Every byte here comes from Redis or from the command line and is treated as hostile: a
//! reply that is not a sane slot map is refused as a whole (never a panic, never a partial
//! map), and what one reply may make this module hold is bounded ([`MAX_NODES`]).

use redis_protocol::resp3::types::OwnedFrame;

use super::Secret;

/// Hash slots of a Redis Cluster.
pub const SLOTS: usize = 16384;

/// Masters a slot map may name; more is taken for a hostile reply (Redis advises at most
/// 1 000 nodes in one cluster).
pub const MAX_NODES: usize = 1024;

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), the checksum Redis Cluster
/// hashes keys with.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The hash slot of a key (or a sharded pub/sub channel): CRC16 of its hash tag (what is
/// between the first `{` and the first `}` after it, if that is not empty), else of the whole
/// key, modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS as u16
}

/// A Redis node's address as the cluster names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Addr {
    /// Host name or address (IPv6 without its brackets).
    pub host: String,
    /// TCP port (never 0).
    pub port: u16,
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Addr {
    /// `host:port` or `[v6]:port` (the port is required).
    pub fn parse(s: &str) -> Option<Addr> {
        let (host, port) = s.rsplit_once(':')?;
        let host = match host.strip_prefix('[') {
            Some(h) => h.strip_suffix(']')?,
            None => host,
        };
        let port: u16 = port.parse().ok()?;
        if port == 0 || host.len() > 255 || host.chars().any(|c| c.is_whitespace()) {
            return None;
        }
        Some(Addr {
            host: host.to_string(),
            port,
        })
    }
}

/// A redirection in a Redis Cluster error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    /// `MOVED slot host:port`: the slot now lives there for good; the map is out of date.
    Moved {
        /// The slot the command's key lives in.
        slot: u16,
        /// The node that serves it now.
        to: Target,
    },
    /// `ASK slot host:port`: the slot is being migrated and this key is already there; send
    /// `ASKING` and then the command to that node, once, without changing the map.
    Ask {
        /// The slot the command's key lives in.
        slot: u16,
        /// The node to ask this once.
        to: Target,
    },
}

/// Where a redirection points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// That node.
    Node(Addr),
    /// The endpoint is empty or `?` (`cluster-preferred-endpoint-type unknown-endpoint`):
    /// the same host as the node that answered, on this port.
    SameHost(u16),
}

impl Redirect {
    /// Reads `MOVED 3999 127.0.0.1:6381` or `ASK ...`; anything else is `None`.
    pub fn parse(err: &str) -> Option<Redirect> {
        let mut it = err.split(' ');
        let kind = it.next()?;
        let slot: u16 = it.next()?.parse().ok()?;
        let to = it.next()?;
        if it.next().is_some() || slot as usize >= SLOTS {
            return None;
        }
        let to = match to.rsplit_once(':') {
            Some(("" | "?", port)) => Target::SameHost(port.parse().ok().filter(|&p| p != 0)?),
            _ => Target::Node(Addr::parse(to)?),
        };
        match kind {
            "MOVED" => Some(Redirect::Moved { slot, to }),
            "ASK" => Some(Redirect::Ask { slot, to }),
            _ => None,
        }
    }

    /// The slot the redirection is about.
    pub fn slot(&self) -> u16 {
        match self {
            Redirect::Moved { slot, .. } | Redirect::Ask { slot, .. } => *slot,
        }
    }
}

/// Which master serves each slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// The masters, in the order first seen.
    pub nodes: Vec<Addr>,
    /// For each slot, its master's index in `nodes`, or [`SlotMap::NONE`] (not served).
    owner: Vec<u16>,
}

impl Default for SlotMap {
    fn default() -> SlotMap {
        SlotMap {
            nodes: Vec::new(),
            owner: vec![SlotMap::NONE; SLOTS],
        }
    }
}

/// Why a `CLUSTER SLOTS` reply was refused (for the log; never quotes the reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadMap {
    /// The reply is not an array of slot ranges.
    NotAnArray,
    /// A range that is not two slots in order below [`SLOTS`].
    BadRange,
    /// A master that is not a host and a port.
    BadNode,
    /// More than [`MAX_NODES`] masters.
    TooManyNodes,
    /// This slot is claimed by two masters.
    Overlap(u16),
}

impl std::fmt::Display for BadMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadMap::NotAnArray => f.write_str("not an array of slot ranges"),
            BadMap::BadRange => f.write_str("a slot range that is not two slots in order"),
            BadMap::BadNode => f.write_str("a master that is not a host and a port"),
            BadMap::TooManyNodes => write!(f, "more than {MAX_NODES} masters"),
            BadMap::Overlap(s) => write!(f, "slot {s} served by two masters"),
        }
    }
}

impl SlotMap {
    /// The owner of a slot no master serves.
    pub const NONE: u16 = u16::MAX;

    /// A map where one node serves every slot (a plain Redis is a cluster of one shard).
    pub fn single(addr: Addr) -> SlotMap {
        SlotMap {
            nodes: vec![addr],
            owner: vec![0; SLOTS],
        }
    }

    /// The index (in `nodes`) of the master serving `slot`, if any.
    pub fn owner(&self, slot: u16) -> Option<usize> {
        match self.owner.get(slot as usize) {
            Some(&i) if i != SlotMap::NONE => Some(i as usize),
            _ => None,
        }
    }

    /// The master of a key.
    pub fn node_of(&self, key: &[u8]) -> Option<&Addr> {
        self.owner(key_slot(key)).map(|i| &self.nodes[i])
    }

    /// Slots no master serves (a cluster being set up, or a master lost with no replica).
    pub fn unserved(&self) -> usize {
        self.owner.iter().filter(|&&i| i == SlotMap::NONE).count()
    }

    /// After a `MOVED`: `slot` is served by `to` from now on.
    pub fn set(&mut self, slot: u16, to: Addr) -> Result<(), BadMap> {
        let i = self.index_of(to)?;
        if let Some(o) = self.owner.get_mut(slot as usize) {
            *o = i;
        }
        Ok(())
    }

    fn index_of(&mut self, addr: Addr) -> Result<u16, BadMap> {
        if let Some(i) = self.nodes.iter().position(|n| *n == addr) {
            return Ok(i as u16);
        }
        if self.nodes.len() >= MAX_NODES {
            return Err(BadMap::TooManyNodes);
        }
        self.nodes.push(addr);
        Ok((self.nodes.len() - 1) as u16)
    }

    /// Reads a `CLUSTER SLOTS` reply: `[[start, end, [host, port, id, ...], replica...], ...]`.
    /// A master with an empty or `?` host is on `asked`'s host (the node that answered).
    /// The whole reply is refused if any range or master is malformed, or two ranges overlap.
    pub fn from_cluster_slots(reply: &OwnedFrame, asked: &Addr) -> Result<SlotMap, BadMap> {
        let OwnedFrame::Array { data: ranges, .. } = reply else {
            return Err(BadMap::NotAnArray);
        };
        let mut map = SlotMap::default();
        for range in ranges {
            let OwnedFrame::Array { data: r, .. } = range else {
                return Err(BadMap::NotAnArray);
            };
            let (Some(start), Some(end)) =
                (r.first().and_then(slot_of), r.get(1).and_then(slot_of))
            else {
                return Err(BadMap::BadRange);
            };
            if start > end {
                return Err(BadMap::BadRange);
            }
            let master = r
                .get(2)
                .and_then(|m| node_of(m, asked))
                .ok_or(BadMap::BadNode)?;
            let i = map.index_of(master)?;
            for s in start..=end {
                let o = &mut map.owner[s as usize];
                if *o != SlotMap::NONE {
                    return Err(BadMap::Overlap(s));
                }
                *o = i;
            }
        }
        Ok(map)
    }
}

fn slot_of(f: &OwnedFrame) -> Option<u16> {
    match f {
        OwnedFrame::Number { data, .. } if (0..SLOTS as i64).contains(data) => Some(*data as u16),
        _ => None,
    }
}

fn text(f: &OwnedFrame) -> Option<&str> {
    match f {
        OwnedFrame::BlobString { data, .. } | OwnedFrame::SimpleString { data, .. } => {
            std::str::from_utf8(data).ok()
        }
        _ => None,
    }
}

fn node_of(f: &OwnedFrame, asked: &Addr) -> Option<Addr> {
    let OwnedFrame::Array { data, .. } = f else {
        return None;
    };
    let host = text(data.first()?)?;
    let port = match data.get(1)? {
        OwnedFrame::Number { data, .. } => u16::try_from(*data).ok().filter(|&p| p != 0)?,
        _ => return None,
    };
    let host = match host {
        "" | "?" => asked.host.clone(),
        h if h.len() <= 255 && !h.chars().any(|c| c.is_whitespace() || c == '/') => h.into(),
        _ => return None,
    };
    Some(Addr { host, port })
}

/// Where a Redis Cluster is: `redis-cluster://[[user]:password@]host:port[,host:port...]`
/// (`rediss-cluster://` for TLS); any of the seeds answers `CLUSTER SLOTS`. No database:
/// a cluster has only database 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seeds {
    /// The nodes to ask for the slot map, in the URL's order (at most [`MAX_SEEDS`]).
    pub addrs: Vec<Addr>,
    /// The ACL user name (`None`: the default user).
    pub user: Option<String>,
    /// The password, sent only in `HELLO 3 AUTH`.
    pub password: Option<Secret>,
    /// `rediss-cluster://`: every connection to the cluster is TLS.
    pub tls: bool,
}

/// At most this many seeds in one URL.
pub const MAX_SEEDS: usize = 64;

impl Seeds {
    /// Parses the URL. As with `RedisUrl::parse`, the error never quotes the text (it may
    /// hold the password anywhere).
    pub fn parse(s: &str) -> Result<Seeds, String> {
        const SHAPE: &str = "expected redis-cluster://[[user]:password@]host:port[,host:port...]";
        let (tls, rest) = match s.strip_prefix("rediss-cluster://") {
            Some(rest) => (true, rest),
            None => (
                false,
                s.strip_prefix("redis-cluster://")
                    .ok_or_else(|| format!("{SHAPE} (the scheme)"))?,
            ),
        };
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((a, r)) => (Some(a), r),
            None => (None, rest),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') {
            return Err(format!("{SHAPE} (a cluster has no database number)"));
        }
        let mut addrs = Vec::new();
        for part in rest.split(',') {
            let addr = if part.contains(':') && !part.ends_with(']') {
                Addr::parse(part)
            } else {
                Addr::parse(&format!("{part}:6379"))
            };
            let addr = addr.ok_or_else(|| format!("{SHAPE} (a seed is not host:port)"))?;
            if addr.host.is_empty() {
                return Err(format!("{SHAPE} (a seed has no host)"));
            }
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
            if addrs.len() > MAX_SEEDS {
                return Err(format!("{SHAPE} (more than {MAX_SEEDS} seeds)"));
            }
        }
        let (user, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once(':') {
                Some((u, p)) => ((!u.is_empty()).then(|| u.to_string()), Some(Secret::new(p))),
                None => (None, Some(Secret::new(a))),
            },
        };
        Ok(Seeds {
            addrs,
            user,
            password,
            tls,
        })
    }
}

impl std::fmt::Display for Seeds {
    /// The URL without its password (for logs).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let auth = if self.password.is_some() { "***@" } else { "" };
        write!(f, "{scheme}-cluster://{auth}")?;
        for (i, a) in self.addrs.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{a}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
