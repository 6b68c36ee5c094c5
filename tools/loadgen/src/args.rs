//! Minimal `--flag value` parser (no external dependency).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

pub struct Args {
    values: BTreeMap<String, Option<String>>,
    used: std::cell::RefCell<Vec<String>>,
}

impl Args {
    /// Parses `--name value`, `--name=value` and bare `--name` (a boolean switch).
    pub fn parse(raw: &[String]) -> Result<Args, String> {
        let mut values = BTreeMap::new();
        let mut i = 0;
        while i < raw.len() {
            let a = &raw[i];
            let Some(name) = a.strip_prefix("--") else {
                return Err(format!(
                    "unexpected argument {a:?} (flags look like --name value)"
                ));
            };
            if let Some((k, v)) = name.split_once('=') {
                values.insert(k.to_string(), Some(v.to_string()));
                i += 1;
                continue;
            }
            let next = raw.get(i + 1);
            match next {
                Some(v) if !v.starts_with("--") => {
                    values.insert(name.to_string(), Some(v.clone()));
                    i += 2;
                }
                _ => {
                    values.insert(name.to_string(), None);
                    i += 1;
                }
            }
        }
        Ok(Args {
            values,
            used: std::cell::RefCell::new(Vec::new()),
        })
    }

    fn raw(&self, name: &str) -> Option<&Option<String>> {
        self.used.borrow_mut().push(name.to_string());
        self.values.get(name)
    }

    pub fn flag(&self, name: &str) -> bool {
        self.raw(name).is_some()
    }

    pub fn opt_str(&self, name: &str) -> Result<Option<String>, String> {
        match self.raw(name) {
            None => Ok(None),
            Some(None) => Err(format!("--{name} needs a value")),
            Some(Some(v)) => Ok(Some(v.clone())),
        }
    }

    pub fn u64_or(&self, name: &str, default: u64) -> Result<u64, String> {
        match self.opt_str(name)? {
            None => Ok(default),
            Some(v) => v
                .replace('_', "")
                .parse()
                .map_err(|_| format!("--{name}: {v:?} is not a non-negative integer")),
        }
    }

    pub fn opt_u64(&self, name: &str) -> Result<Option<u64>, String> {
        match self.opt_str(name)? {
            None => Ok(None),
            Some(_) => self.u64_or(name, 0).map(Some),
        }
    }

    pub fn f64_or(&self, name: &str, default: f64) -> Result<f64, String> {
        match self.opt_str(name)? {
            None => Ok(default),
            Some(v) => match v.parse::<f64>() {
                Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
                _ => Err(format!("--{name}: {v:?} is not a non-negative number")),
            },
        }
    }

    pub fn dur_or(&self, name: &str, default: Duration) -> Result<Duration, String> {
        match self.opt_str(name)? {
            None => Ok(default),
            Some(v) => parse_duration(&v).map_err(|e| format!("--{name}: {e}")),
        }
    }

    /// `--addr`, which must be an IPv4 loopback address (127.0.0.0/8) with a port.
    pub fn addr(&self) -> Result<SocketAddrV4, String> {
        let v = self
            .opt_str("addr")?
            .ok_or("--addr 127.0.0.1:PORT is required")?;
        parse_loopback_addr(&v)
    }

    /// Errors on flags nobody asked for (typos would otherwise be silently ignored).
    pub fn finish(&self) -> Result<(), String> {
        let used = self.used.borrow();
        let unknown: Vec<_> = self
            .values
            .keys()
            .filter(|k| !used.iter().any(|u| u == *k))
            .map(|k| format!("--{k}"))
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(format!("unknown flag(s): {}", unknown.join(", ")))
        }
    }
}

pub fn parse_loopback_addr(v: &str) -> Result<SocketAddrV4, String> {
    let v = v.trim_start_matches("http://").trim_end_matches('/');
    let v = if let Some(rest) = v.strip_prefix("localhost:") {
        format!("127.0.0.1:{rest}")
    } else {
        v.to_string()
    };
    let a: SocketAddrV4 = v
        .parse()
        .map_err(|_| format!("--addr: {v:?} is not IPv4:PORT"))?;
    if !a.ip().is_loopback() {
        return Err(format!(
            "--addr: {} is not in 127.0.0.0/8; this tool only targets loopback",
            a.ip()
        ));
    }
    if a.port() == 0 {
        return Err("--addr: port 0 is not a server port".into());
    }
    Ok(a)
}

/// `500ms`, `30s`, `2m`, `1h`, `1.5s` or plain seconds.
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    let v = v.trim();
    let (num, mult) = if let Some(n) = v.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = v.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (v, 1.0)
    };
    match num.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 && x * mult < 1e7 => {
            Ok(Duration::from_secs_f64(x * mult))
        }
        _ => Err(format!("{v:?} is not a duration like 500ms, 10s, 2m")),
    }
}

/// Source address for connection `i`: 127.0.0.2 .. 127.0.0.(1+count), shifted by `offset`
/// (so child processes can use their own addresses); stays within 127.0.0.2..=127.0.0.251.
pub fn loopback_src(i: usize, count: usize, offset: usize) -> Ipv4Addr {
    let count = count.clamp(1, 250);
    Ipv4Addr::new(127, 0, 0, 2 + ((i % count + offset) % 250) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn flags_and_unknown() {
        let a = Args::parse(&s(&["--rooms", "3", "--child", "--rate=20", "--typo", "x"])).unwrap();
        assert_eq!(a.u64_or("rooms", 1).unwrap(), 3);
        assert!(a.flag("child"));
        assert_eq!(a.f64_or("rate", 1.0).unwrap(), 20.0);
        assert_eq!(a.u64_or("absent", 7).unwrap(), 7);
        let e = a.finish().unwrap_err();
        assert!(e.contains("--typo"), "{e}");
        assert!(Args::parse(&s(&["stray"])).is_err());
    }

    #[test]
    fn only_loopback() {
        assert!(parse_loopback_addr("127.0.0.1:8000").is_ok());
        assert!(parse_loopback_addr("127.5.0.1:8000").is_ok());
        assert!(parse_loopback_addr("localhost:8000").is_ok());
        assert!(parse_loopback_addr("10.0.0.1:8000").is_err());
        assert!(parse_loopback_addr("127.0.0.1:0").is_err());
        assert_eq!(loopback_src(0, 4, 0), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(loopback_src(5, 4, 0), Ipv4Addr::new(127, 0, 0, 3));
        assert_eq!(loopback_src(5, 4, 8), Ipv4Addr::new(127, 0, 0, 11));
        assert_eq!(loopback_src(0, 1, 249), Ipv4Addr::new(127, 0, 0, 251));
        assert_eq!(loopback_src(0, 1, 250), Ipv4Addr::new(127, 0, 0, 2));
    }
}
