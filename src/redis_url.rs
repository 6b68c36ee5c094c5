//! Where Redis is (`--redis`): the URL and its password, which no log or error ever shows.
//!
//! A setting, not part of the cluster's state machine: `config` parses it, `cluster` and the
//! event loop read it.

/// A password: its `Debug` never shows it, and nothing else formats it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a password read from the URL.
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The password itself, for the one place that sends it (`HELLO ... AUTH`).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where Redis is: `redis://[[user]:password@]host[:port][/db]`; `rediss://` for TLS.
/// Neither `Debug` nor `Display` shows the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl {
    /// The host name or address (IPv6 without its brackets).
    pub host: String,
    /// The TCP port (6379 when the URL names none).
    pub port: u16,
    /// The database number selected after connecting (0 when the URL names none).
    pub db: u32,
    /// The ACL user name (`None`: the default user).
    pub user: Option<String>,
    /// The password, sent only in `HELLO 3 AUTH`.
    pub password: Option<Secret>,
    /// `rediss://`: the connection to Redis is TLS.
    pub tls: bool,
    /// `redis-cluster://host:port,host:port...`: a Redis Cluster's seeds (`host` and `port`
    /// are the first); `None` for one Redis.
    /// (`config` parses that form with `cluster::slots::Seeds`.)
    pub cluster_seeds: Option<Vec<(String, u16)>>,
}

impl RedisUrl {
    /// Parses the URL. The error never quotes the text: a mistyped URL may hold the password
    /// anywhere (`redis://:secret` reads as host "" and port "secret").
    pub fn parse(s: &str) -> Result<RedisUrl, String> {
        const SHAPE: &str = "expected redis://[[user]:password@]host[:port][/db]";
        let (tls, rest) = match s.strip_prefix("rediss://") {
            Some(rest) => (true, rest),
            None => (
                false,
                s.strip_prefix("redis://").ok_or_else(|| {
                    format!("{SHAPE} (the scheme must be redis://, or rediss:// for TLS)")
                })?,
            ),
        };
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((a, r)) => (Some(a), r),
            None => (None, rest),
        };
        let (hostport, db) = match rest.split_once('/') {
            Some((h, "")) => (h, 0),
            Some((h, d)) => (
                h,
                d.parse()
                    .map_err(|_| format!("{SHAPE} (the database is not a number)"))?,
            ),
            None => (rest, 0),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse()
                    .map_err(|_| format!("{SHAPE} (the port is not a number 0..65535)"))?,
            ),
            _ => (hostport, 6379),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{SHAPE} (no host)"));
        }
        let (user, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once(':') {
                Some((u, p)) => ((!u.is_empty()).then(|| u.to_string()), Some(Secret::new(p))),
                None => (None, Some(Secret::new(a))),
            },
        };
        Ok(RedisUrl {
            host: host.to_string(),
            port,
            db,
            user,
            password,
            tls,
            cluster_seeds: None,
        })
    }
}

impl std::fmt::Display for RedisUrl {
    /// The URL without its password (for logs).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(seeds) = &self.cluster_seeds {
            let auth = if self.password.is_some() { "***@" } else { "" };
            let scheme = if self.tls { "rediss" } else { "redis" };
            write!(f, "{scheme}-cluster://{auth}")?;
            for (i, (host, port)) in seeds.iter().enumerate() {
                let sep = if i > 0 { "," } else { "" };
                if host.contains(':') {
                    write!(f, "{sep}[{host}]:{port}")?;
                } else {
                    write!(f, "{sep}{host}:{port}")?;
                }
            }
            return Ok(());
        }
        let auth = if self.password.is_some() { "***@" } else { "" };
        let scheme = if self.tls { "rediss" } else { "redis" };
        write!(
            f,
            "{scheme}://{auth}{}:{}/{}",
            self.host, self.port, self.db
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_defaults_and_auth() {
        let u = RedisUrl::parse("redis://127.0.0.1:6380/3").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db), ("127.0.0.1", 6380, 3));
        let u = RedisUrl::parse("redis://localhost").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.db), ("localhost", 6379, 0));
        let u = RedisUrl::parse("redis://:s3cret@[::1]:7000/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 7000));
        assert_eq!(u.password.as_ref().map(Secret::expose), Some("s3cret"));
        assert!(!format!("{u:?}").contains("s3cret"));
        assert!(!u.to_string().contains("s3cret"));
        assert!(!u.tls);
        let u = RedisUrl::parse("rediss://:pw@cache.example:6380/2").unwrap();
        assert!(u.tls);
        assert_eq!((u.host.as_str(), u.port, u.db), ("cache.example", 6380, 2));
        assert_eq!(u.to_string(), "rediss://***@cache.example:6380/2");
        assert!(RedisUrl::parse("http://x").is_err());
        assert!(RedisUrl::parse("redis://h:notaport").is_err());
        assert!(RedisUrl::parse("redis://h/x").is_err());
    }
}
