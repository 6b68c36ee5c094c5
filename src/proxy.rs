//! The client's address behind a reverse proxy (`--trusted-proxy`). Pure: bytes in, answer out.
//!
//! Only peers in the trusted set may name another address, in one of two ways:
//! - the PROXY protocol header (HAProxy's proxy-protocol.txt; sent by HAProxy, nginx, AWS and
//!   GCP load balancers) at the very start of the connection: version 1 is one text line
//!   (`PROXY TCP4 <src> <dst> <sport> <dport>\r\n`, at most 107 bytes), version 2 a 16-byte
//!   binary header followed by an address block and optional TLVs (here at most
//!   [`V2_MAX`] bytes in all);
//! - for HTTP requests on a connection without such a header, `X-Forwarded-For`: the
//!   rightmost address that is not itself a trusted proxy.
//!
//! A peer outside the set that sends a PROXY header gets 400 (see `conn.rs`); its
//! `X-Forwarded-For` is ignored.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The version 2 signature.
pub const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The version 1 prefix.
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// The longest version 1 line, CRLF included (the spec's worst case).
pub const V1_MAX: usize = 107;
/// The longest version 2 header accepted: the 16-byte header, the largest address block
/// (216 bytes, UNIX sockets) and room for TLVs (TLS details, cloud endpoint ids).
pub const V2_MAX: usize = 2048;

/// What the start of a connection holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// No PROXY header: the bytes belong to the protocol itself.
    Absent,
    /// The start of a PROXY header (or too few bytes to tell): wait for more.
    Partial,
    /// A complete, valid header.
    Complete {
        /// Bytes the header takes at the start of the stream (what follows is the protocol).
        len: usize,
        /// The source address it names; `None` when it names none (v2 LOCAL, v1 UNKNOWN,
        /// unspecified or UNIX families): the connection's own peer address stands.
        client: Option<IpAddr>,
    },
}

/// A malformed PROXY header; the reason is for the 400's detail and the debug log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid(pub &'static str);

/// Reads a PROXY protocol header (either version) at the start of `buf`.
pub fn parse_header(buf: &[u8]) -> Result<Header, Invalid> {
    if buf.len() < V2_SIG.len() && V2_SIG.starts_with(buf) {
        return Ok(Header::Partial); // also the empty buffer
    }
    if buf.starts_with(V2_SIG) {
        return parse_v2(buf);
    }
    if buf.len() < V1_PREFIX.len() && V1_PREFIX.starts_with(buf) {
        return Ok(Header::Partial);
    }
    if buf.starts_with(V1_PREFIX) {
        return parse_v1(buf);
    }
    Ok(Header::Absent)
}

fn parse_v1(buf: &[u8]) -> Result<Header, Invalid> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Err(Invalid("PROXY v1 header longer than 107 bytes"))
        } else {
            Ok(Header::Partial)
        };
    };
    if lf == 0 || window[lf - 1] != b'\r' {
        return Err(Invalid("PROXY v1 header not ended by CRLF"));
    }
    let line = std::str::from_utf8(&buf[V1_PREFIX.len()..lf - 1])
        .map_err(|_| Invalid("PROXY v1 header is not ASCII"))?;
    let len = lf + 1;
    let mut parts = line.split(' ');
    let family = parts.next().unwrap_or("");
    if family == "UNKNOWN" {
        // The sender could not tell: use the connection's own address (the rest is ignored).
        return Ok(Header::Complete { len, client: None });
    }
    let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(Invalid("PROXY v1 header needs 4 fields after the family"));
    };
    let src: IpAddr = match family {
        "TCP4" => {
            v1_addr::<Ipv4Addr>(dst)?;
            v1_addr::<Ipv4Addr>(src)?.into()
        }
        "TCP6" => {
            v1_addr::<Ipv6Addr>(dst)?;
            v1_addr::<Ipv6Addr>(src)?.into()
        }
        _ => return Err(Invalid("PROXY v1 family must be TCP4, TCP6 or UNKNOWN")),
    };
    v1_port(sport)?;
    v1_port(dport)?;
    Ok(Header::Complete {
        len,
        client: Some(src.to_canonical()),
    })
}

fn v1_addr<T: std::str::FromStr>(s: &str) -> Result<T, Invalid> {
    s.parse()
        .map_err(|_| Invalid("PROXY v1 address does not match its family"))
}

/// A decimal port, 0..=65535, without leading zeroes.
fn v1_port(s: &str) -> Result<u16, Invalid> {
    let ok = !s.is_empty()
        && s.len() <= 5
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'));
    ok.then(|| s.parse().ok())
        .flatten()
        .ok_or(Invalid("PROXY v1 port is not a number 0..65535"))
}

fn parse_v2(buf: &[u8]) -> Result<Header, Invalid> {
    let Some(&[ver_cmd, fam, hi, lo]) = buf.get(12..16) else {
        return Ok(Header::Partial);
    };
    if ver_cmd >> 4 != 2 {
        return Err(Invalid("PROXY v2 header with a version other than 2"));
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(Invalid("PROXY v2 command must be LOCAL or PROXY")),
    };
    // The address block's length for each valid family/protocol byte.
    let need = match fam {
        0x00 => 0,
        0x11 | 0x12 => 12,
        0x21 | 0x22 => 36,
        0x31 | 0x32 => 216,
        _ => return Err(Invalid("PROXY v2 address family or protocol is not valid")),
    };
    let block = usize::from(u16::from_be_bytes([hi, lo]));
    let len = 16 + block;
    if len > V2_MAX {
        return Err(Invalid("PROXY v2 header too long"));
    }
    let Some(rest) = buf.get(16..len) else {
        return Ok(Header::Partial);
    };
    if local {
        // A connection the proxy made itself (a health check): the block is skipped whole.
        return Ok(Header::Complete { len, client: None });
    }
    if rest.len() < need {
        return Err(Invalid(
            "PROXY v2 address block shorter than its family needs",
        ));
    }
    check_tlvs(&rest[need..])?;
    let client = match fam {
        0x11 | 0x12 => <[u8; 4]>::try_from(&rest[..4]).ok().map(IpAddr::from),
        0x21 | 0x22 => <[u8; 16]>::try_from(&rest[..16]).ok().map(IpAddr::from),
        _ => None, // unspecified or UNIX: no IP address
    };
    Ok(Header::Complete {
        len,
        client: client.map(|c| c.to_canonical()),
    })
}

/// TLVs (type, 16-bit length, value) must tile the rest of the block exactly.
fn check_tlvs(mut tlvs: &[u8]) -> Result<(), Invalid> {
    while !tlvs.is_empty() {
        let Some(&[_, hi, lo]) = tlvs.get(..3) else {
            return Err(Invalid("PROXY v2 TLV cut short"));
        };
        let end = 3 + usize::from(u16::from_be_bytes([hi, lo]));
        tlvs = tlvs
            .get(end..)
            .ok_or(Invalid("PROXY v2 TLV longer than the header"))?;
    }
    Ok(())
}

/// The client named by a request's `X-Forwarded-For` values (in header order), as seen by
/// a server whose peer is a trusted proxy: walking from the right (the entry the nearest
/// proxy added), trusted proxies are skipped and the first other address is the client.
/// If every entry is a trusted proxy, the leftmost one is. `None` when there is no entry,
/// or an entry that is not an address comes before the client (the chain cannot be relied
/// on): the peer's own address stands.
pub fn forwarded_client<'a, I>(values: I, trusted: &Trusted) -> Option<IpAddr>
where
    I: DoubleEndedIterator<Item = &'a [u8]>,
{
    let mut last = None;
    for value in values.rev() {
        for entry in value.rsplit(|&b| b == b',') {
            let entry = entry.trim_ascii();
            if entry.is_empty() {
                continue;
            }
            let ip = forwarded_addr(entry)?.to_canonical();
            if !trusted.contains(ip) {
                return Some(ip);
            }
            last = Some(ip);
        }
    }
    last
}

/// One `X-Forwarded-For` entry: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]` or
/// `[2001:db8::1]:80`.
fn forwarded_addr(entry: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(entry).ok()?;
    if let Some(rest) = s.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(port_like)) {
            return None;
        }
        return v6.parse::<Ipv6Addr>().ok().map(IpAddr::from);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    let (v4, port) = s.split_once(':')?;
    if !port_like(port) {
        return None;
    }
    v4.parse::<Ipv4Addr>().ok().map(IpAddr::from)
}

fn port_like(s: &str) -> bool {
    !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit())
}

/// The `--trusted-proxy` set: address ranges whose connections may name the client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trusted {
    nets: Vec<Cidr>,
}

impl Trusted {
    /// Parses a comma-separated list of CIDRs (`10.0.0.0/8, 2001:db8::/32, 192.0.2.7`);
    /// empty trusts nobody.
    pub fn parse(list: &str) -> Result<Trusted, String> {
        let nets = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Cidr::parse)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Trusted { nets })
    }

    /// No range is trusted (the default): no connection may name its client.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Whether `ip` is in one of the ranges (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|n| n.contains(ip))
    }
}

impl fmt::Display for Trusted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, n) in self.nets.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}/{}", n.net, n.prefix)?;
        }
        Ok(())
    }
}

/// One address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `192.0.2.0/24`, `2001:db8::/32`, or one address (`/32` or `/128`).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR range"))?;
        let net = net.to_canonical();
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0..{max}"))?,
        };
        let c = Cidr { net, prefix };
        if c.masked(net) != net {
            return Err(format!(
                "{s:?} has bits set beyond its /{prefix} prefix (did you mean {}/{prefix}?)",
                c.masked(net)
            ));
        }
        Ok(c)
    }

    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
            }
        }
    }

    /// `ip` is in this range (an IPv4 address is never in an IPv6 range, nor the reverse).
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.net.is_ipv4() && self.masked(ip) == self.net
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn complete(buf: &[u8]) -> (usize, Option<IpAddr>) {
        match parse_header(buf) {
            Ok(Header::Complete { len, client }) => (len, client),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    /// A v2 header: command, family byte, address block, TLVs.
    fn v2(cmd: u8, fam: u8, block: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIG.to_vec();
        h.push(0x20 | cmd);
        h.push(fam);
        h.extend_from_slice(&((block.len() + tlvs.len()) as u16).to_be_bytes());
        h.extend_from_slice(block);
        h.extend_from_slice(tlvs);
        h
    }

    fn v4_block(src: [u8; 4]) -> Vec<u8> {
        [&src[..], &[10, 0, 0, 1], &[0xc3, 0x50], &[0, 80]].concat()
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let h = b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\nGET / HTTP/1.1\r\n\r\n";
        assert_eq!(complete(h), (43, Some(ip("203.0.113.7"))));
        let h = b"PROXY TCP6 2001:db8::7 2001:db8::1 1 65535\r\n";
        assert_eq!(complete(h), (h.len(), Some(ip("2001:db8::7"))));
        // A v4-mapped source counts as the IPv4 address.
        let h = b"PROXY TCP6 ::ffff:198.51.100.2 ::1 1 2\r\n";
        assert_eq!(complete(h).1, Some(ip("198.51.100.2")));
        assert_eq!(complete(b"PROXY UNKNOWN\r\n"), (15, None));
        let h = b"PROXY UNKNOWN ffff:f::1 ffff:f::2 65535 65535\r\n";
        assert_eq!(complete(h), (h.len(), None));
    }

    #[test]
    fn v1_partial_until_the_crlf_and_at_most_107_bytes() {
        let full = b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\n";
        for n in 0..full.len() {
            assert_eq!(parse_header(&full[..n]), Ok(Header::Partial), "{n} bytes");
        }
        let long = [&b"PROXY UNKNOWN "[..], &[b'x'; 200]].concat();
        assert!(parse_header(&long[..106]) == Ok(Header::Partial));
        assert!(parse_header(&long[..107]).is_err());
        let mut max = b"PROXY UNKNOWN ".to_vec();
        max.resize(105, b'f');
        max.extend_from_slice(b"\r\n");
        assert_eq!(complete(&max), (107, None));
    }

    #[test]
    fn v1_malformed_is_invalid() {
        for bad in [
            &b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\n"[..], // LF alone
            b"PROXY TCP4 203.0.113.7 10.0.0.1 56324\r\n",        // a field missing
            b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443 9\r\n",  // one too many
            b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n",          // family mismatch
            b"PROXY TCP6 203.0.113.7 2001:db8::1 1 2\r\n",
            b"PROXY TCP4 203.0.113.07 10.0.0.1 1 2\r\n", // leading zero
            b"PROXY TCP4 203.0.113.7 10.0.0.1 01 2\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 65536 2\r\n",
            b"PROXY TCP4 203.0.113.7  10.0.0.1 1 2\r\n", // two spaces
            b"PROXY UDP4 203.0.113.7 10.0.0.1 1 2\r\n",
            b"PROXY \r\n",
            b"PROXY / HTTP/1.1\r\n", // an HTTP method called PROXY
            b"PROXY TCP4 \xff.0.113.7 10.0.0.1 1 2\r\n",
        ] {
            assert!(
                parse_header(bad).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn v2_proxy_local_families_and_tlvs() {
        let h = v2(1, 0x11, &v4_block([203, 0, 113, 7]), &[]);
        assert_eq!(complete(&h), (28, Some(ip("203.0.113.7"))));
        let mut src6 = [0u8; 16];
        src6[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        src6[15] = 7;
        let block6 = [&src6[..], &[0; 16], &[0, 1, 0, 2]].concat();
        assert_eq!(
            complete(&v2(1, 0x21, &block6, &[])).1,
            Some(ip("2001:db8::7"))
        );
        assert_eq!(
            complete(&v2(1, 0x12, &v4_block([198, 51, 100, 1]), &[])).1,
            Some(ip("198.51.100.1")),
            "UDP over IPv4 names an address too"
        );
        // TLVs (an AWS endpoint id, a NOOP, an empty one) are skipped.
        let tlvs = [
            &[0xea, 0, 5][..],
            b"\x01vpce",
            &[0x04, 0, 2, 0, 0],
            &[0x05, 0, 0],
        ]
        .concat();
        let h = v2(1, 0x11, &v4_block([192, 0, 2, 9]), &tlvs);
        assert_eq!(complete(&h), (h.len(), Some(ip("192.0.2.9"))));
        // LOCAL (a health check): no client address, whatever the block says.
        let h = v2(0, 0x11, &v4_block([192, 0, 2, 9]), &[]);
        assert_eq!(complete(&h), (28, None));
        assert_eq!(complete(&v2(0, 0x00, &[], &[])), (16, None));
        // Unspecified and UNIX families: the peer's address stands.
        assert_eq!(complete(&v2(1, 0x00, &[], &[])), (16, None));
        assert_eq!(complete(&v2(1, 0x31, &[0; 216], &[])), (232, None));
        // Followed by the request: only the header's length is used.
        let mut h = v2(1, 0x11, &v4_block([203, 0, 113, 7]), &[]);
        h.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(complete(&h).0, 28);
    }

    #[test]
    fn v2_partial_until_complete() {
        let h = v2(1, 0x11, &v4_block([203, 0, 113, 7]), &[0x04, 0, 1, 0]);
        for n in 0..h.len() {
            assert_eq!(parse_header(&h[..n]), Ok(Header::Partial), "{n} bytes");
        }
        assert!(matches!(parse_header(&h), Ok(Header::Complete { .. })));
    }

    #[test]
    fn v2_malformed_is_invalid() {
        let block = v4_block([203, 0, 113, 7]);
        let mut bad_version = v2(1, 0x11, &block, &[]);
        bad_version[12] = 0x11;
        let mut bad_command = v2(1, 0x11, &block, &[]);
        bad_command[12] = 0x22;
        for (bad, why) in [
            (bad_version, "version"),
            (bad_command, "command"),
            (v2(1, 0x13, &block, &[]), "protocol"),
            (v2(1, 0x41, &block, &[]), "family"),
            (v2(1, 0x11, &block[..8], &[]), "short IPv4 block"),
            (v2(1, 0x21, &block, &[]), "short IPv6 block"),
            (v2(1, 0x11, &block, &[0x04, 0, 9, 1]), "TLV overruns"),
            (v2(1, 0x11, &block, &[0x04, 0]), "TLV header cut"),
        ] {
            assert!(parse_header(&bad).is_err(), "{why} accepted");
        }
        // Oversized: rejected from the 16-byte header, before the rest is waited for.
        let mut big = V2_SIG.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse_header(&big), Err(Invalid("PROXY v2 header too long")));
        let max = v2(
            1,
            0x11,
            &block,
            &[[0x04, 0x07, 0xe1].as_slice(), &[0; 2017]].concat(),
        );
        assert_eq!(max.len(), V2_MAX);
        assert!(matches!(parse_header(&max), Ok(Header::Complete { .. })));
        let over = v2(
            1,
            0x11,
            &block,
            &[[0x04, 0x07, 0xe2].as_slice(), &[0; 2018]].concat(),
        );
        assert!(parse_header(&over).is_err());
    }

    #[test]
    fn anything_else_is_not_a_proxy_header() {
        for other in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"POST /sessions HTTP/1.1\r\n",
            b"PUT",
            b"\r\nGET / HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01",
        ] {
            assert_eq!(parse_header(other), Ok(Header::Absent), "{other:?}");
        }
        for prefix in [&b""[..], b"P", b"PROX", b"PROXY", b"\r\n\r\n\0"] {
            assert_eq!(parse_header(prefix), Ok(Header::Partial), "{prefix:?}");
        }
    }

    #[test]
    fn cidrs_parse_and_match() {
        let t = Trusted::parse(" 10.0.0.0/8, 192.0.2.7 ,2001:db8::/32,::1").unwrap();
        for yes in [
            "10.1.2.3",
            "192.0.2.7",
            "2001:db8:ffff::1",
            "::1",
            "::ffff:10.9.9.9",
        ] {
            assert!(t.contains(ip(yes)), "{yes}");
        }
        for no in ["11.0.0.1", "192.0.2.8", "2001:db9::1", "::2", "127.0.0.1"] {
            assert!(!t.contains(ip(no)), "{no}");
        }
        assert_eq!(
            t.to_string(),
            "10.0.0.0/8,192.0.2.7/32,2001:db8::/32,::1/128"
        );
        assert!(Trusted::parse("").unwrap().is_empty());
        assert!(Trusted::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(
            !Trusted::parse("0.0.0.0/0")
                .unwrap()
                .contains(ip("2001:db8::1"))
        );
        assert!(Trusted::parse("::/0").unwrap().contains(ip("2001:db8::1")));
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0/33",
            "::/129",
            "nope",
            "10.0.0.0/",
            "10.0.0.0/x",
        ] {
            assert!(Trusted::parse(bad).is_err(), "{bad}");
        }
        let e = Trusted::parse("10.0.0.1/8").unwrap_err();
        assert!(e.contains("10.0.0.0/8"), "{e}");
    }

    #[test]
    fn x_forwarded_for_rightmost_untrusted() {
        let t = Trusted::parse("10.0.0.0/8,2001:db8::/32").unwrap();
        let xff = |vals: &[&str]| forwarded_client(vals.iter().map(|v| v.as_bytes()), &t);
        assert_eq!(xff(&["203.0.113.7"]), Some(ip("203.0.113.7")));
        // A client's own claim stays on the left; the proxy's entry is the one used.
        assert_eq!(
            xff(&["1.1.1.1, 203.0.113.7, 10.0.0.2"]),
            Some(ip("203.0.113.7"))
        );
        // Several header lines are one list, in order.
        assert_eq!(
            xff(&["1.1.1.1", "203.0.113.7 , 10.0.0.2"]),
            Some(ip("203.0.113.7"))
        );
        assert_eq!(xff(&["garbage", "203.0.113.8"]), Some(ip("203.0.113.8")));
        // Ports and brackets.
        assert_eq!(xff(&["203.0.113.7:5678"]), Some(ip("203.0.113.7")));
        assert_eq!(xff(&["[2001:db9::5]:443"]), Some(ip("2001:db9::5")));
        assert_eq!(xff(&["[2001:db9::5]"]), Some(ip("2001:db9::5")));
        assert_eq!(xff(&["2001:db9::5"]), Some(ip("2001:db9::5")));
        assert_eq!(xff(&["::ffff:203.0.113.7"]), Some(ip("203.0.113.7")));
        // Every hop trusted: the leftmost.
        assert_eq!(xff(&["10.0.0.5, 10.0.0.2"]), Some(ip("10.0.0.5")));
        // Nothing usable: the peer's own address stands.
        assert_eq!(xff(&[]), None);
        assert_eq!(xff(&[" , "]), None);
        assert_eq!(xff(&["203.0.113.7, unknown"]), None);
        assert_eq!(xff(&["1.2.3.4:x"]), None);
        assert_eq!(xff(&["[2001:db9::5]x"]), None);
        assert_eq!(xff(&["\u{e9}"]), None);
    }
}
