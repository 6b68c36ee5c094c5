use super::*;
use crate::cluster::resp::{Limits, Scan, Scanner};
use redis_protocol::resp3::decode::complete::decode;

/// A real reply of a three-master Redis 7.0 cluster to `HELLO 3` + `CLUSTER SLOTS`.
const REAL: &[u8] = b"*3\r\n*3\r\n:0\r\n:5460\r\n*4\r\n$9\r\n127.0.0.1\r\n:7101\r\n$40\r\na3b1dad1fe48af2128f393a7ddb029df5eccc7f2\r\n%0\r\n*3\r\n:5461\r\n:10922\r\n*4\r\n$9\r\n127.0.0.1\r\n:7102\r\n$40\r\n5c861ed713311366b946f87abd6af6cdcc00b3bb\r\n%0\r\n*3\r\n:10923\r\n:16383\r\n*4\r\n$9\r\n127.0.0.1\r\n:7103\r\n$40\r\n974407fcd1acae7f2fffc19b66671a2fb6022901\r\n%0\r\n";

const LIMITS: Limits = Limits {
    depth: 16,
    bytes: 1 << 20,
    elements: 4096,
};

fn asked() -> Addr {
    Addr::parse("10.0.0.9:7000").unwrap()
}

/// The bytes as the link reads them: pre-scan, then decode, then the slot map.
fn map_of(bytes: &[u8]) -> Result<SlotMap, String> {
    match Scanner::default().scan(bytes, &LIMITS) {
        Scan::Complete(n) if n == bytes.len() => {}
        other => return Err(format!("scan: {other:?}")),
    }
    let (frame, _) = decode(bytes)
        .map_err(|e| format!("{:?}", e.kind()))?
        .unwrap();
    SlotMap::from_cluster_slots(&frame, &asked()).map_err(|e| e.to_string())
}

#[test]
fn crc16_is_xmodem() {
    assert_eq!(crc16(b"123456789"), 0x31c3);
    assert_eq!(crc16(b""), 0);
}

#[test]
fn key_slots_match_redis_cluster_keyslot() {
    // Each value is what `CLUSTER KEYSLOT` of Redis 7.0.15 answered.
    for (key, slot) in [
        ("somekey", 11058),
        ("foo{hash_tag}", 2515),
        ("foo", 12182),
        ("bar", 5061),
        ("{user1000}.following", 3443),
        ("foo{}{bar}", 8363),
        ("foo{{bar}}zap", 4015),
        ("foo{bar}{zap}", 5061),
        ("{}", 15257),
        ("chatloop:{r:0123456789abcdef0123456789abcdef}:h", 1957),
        ("", 0),
        ("{", 4092),
        ("}{a}", 15495),
        ("a{b", 13340),
    ] {
        assert_eq!(key_slot(key.as_bytes()), slot, "{key}");
    }
    assert_eq!(
        key_slot(b"chatloop:{r:ab}:h"),
        key_slot(b"chatloop:{r:ab}:m"),
        "keys of one tag share a slot"
    );
}

#[test]
fn redirections() {
    let n = |s: &str| Target::Node(Addr::parse(s).unwrap());
    assert_eq!(
        Redirect::parse("MOVED 12182 127.0.0.1:7103"),
        Some(Redirect::Moved {
            slot: 12182,
            to: n("127.0.0.1:7103")
        })
    );
    assert_eq!(
        Redirect::parse("ASK 0 [::1]:7000"),
        Some(Redirect::Ask {
            slot: 0,
            to: n("[::1]:7000")
        })
    );
    assert_eq!(
        Redirect::parse("ASK 3 ::1:7000").map(|r| r.slot()),
        Some(3),
        "Redis writes IPv6 without brackets"
    );
    assert_eq!(
        Redirect::parse("MOVED 1 :7002"),
        Some(Redirect::Moved {
            slot: 1,
            to: Target::SameHost(7002)
        })
    );
    assert_eq!(
        Redirect::parse("MOVED 1 ?:7002"),
        Some(Redirect::Moved {
            slot: 1,
            to: Target::SameHost(7002)
        })
    );
    for bad in [
        "MOVED 16384 127.0.0.1:7000",
        "MOVED -1 127.0.0.1:7000",
        "MOVED 1 127.0.0.1:0",
        "MOVED 1 127.0.0.1:70000",
        "MOVED 1 127.0.0.1",
        "MOVED 1",
        "MOVED 1 127.0.0.1:7000 extra",
        "TRYAGAIN Multiple keys request during rehashing of slot",
        "CROSSSLOT Keys in request don't hash to the same slot",
        "ERR MOVED 1 a:1",
        "",
    ] {
        assert_eq!(Redirect::parse(bad), None, "{bad}");
    }
}

#[test]
fn a_real_cluster_slots_reply() {
    let map = map_of(REAL).unwrap();
    assert_eq!(map.nodes.len(), 3);
    assert_eq!(map.unserved(), 0);
    assert_eq!(map.owner(0), Some(0));
    assert_eq!(map.owner(5460), Some(0));
    assert_eq!(map.owner(5461), Some(1));
    assert_eq!(map.owner(16383), Some(2));
    assert_eq!(map.owner(16384), None);
    assert_eq!(map.node_of(b"foo").unwrap().to_string(), "127.0.0.1:7103");
}

#[test]
fn unknown_endpoints_are_the_host_that_answered() {
    let map = map_of(b"*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$1\r\n?\r\n:7005\r\n").unwrap();
    assert_eq!(map.nodes, vec![Addr::parse("10.0.0.9:7005").unwrap()]);
    let map = map_of(b"*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$0\r\n\r\n:7005\r\n").unwrap();
    assert_eq!(map.nodes[0].host, "10.0.0.9");
}

#[test]
fn a_partial_map_leaves_slots_unserved() {
    let map = map_of(b"*1\r\n*3\r\n:100\r\n:199\r\n*2\r\n$1\r\nh\r\n:1\r\n").unwrap();
    assert_eq!(map.unserved(), SLOTS - 100);
    assert_eq!(map.owner(99), None);
    assert_eq!(map.owner(150), Some(0));
    assert_eq!(SlotMap::default().unserved(), SLOTS);
}

#[test]
fn hostile_slot_maps_are_refused_whole() {
    for (bytes, why) in [
        (&b"$3\r\nabc\r\n"[..], BadMap::NotAnArray),
        (b"*1\r\n:1\r\n", BadMap::NotAnArray),
        (b"*1\r\n*3\r\n:5\r\n:4\r\n*2\r\n$1\r\nh\r\n:1\r\n", BadMap::BadRange),
        (b"*1\r\n*3\r\n:0\r\n:16384\r\n*2\r\n$1\r\nh\r\n:1\r\n", BadMap::BadRange),
        (b"*1\r\n*3\r\n:-1\r\n:4\r\n*2\r\n$1\r\nh\r\n:1\r\n", BadMap::BadRange),
        (b"*1\r\n*2\r\n:0\r\n:4\r\n", BadMap::BadNode),
        (b"*1\r\n*3\r\n:0\r\n:4\r\n*2\r\n$1\r\nh\r\n:0\r\n", BadMap::BadNode),
        (b"*1\r\n*3\r\n:0\r\n:4\r\n*2\r\n$1\r\nh\r\n:65536\r\n", BadMap::BadNode),
        (b"*1\r\n*3\r\n:0\r\n:4\r\n*2\r\n:1\r\n:1\r\n", BadMap::BadNode),
        (b"*1\r\n*3\r\n:0\r\n:4\r\n*2\r\n$3\r\na b\r\n:1\r\n", BadMap::BadNode),
        (
            b"*2\r\n*3\r\n:0\r\n:9\r\n*2\r\n$1\r\nh\r\n:1\r\n*3\r\n:9\r\n:20\r\n*2\r\n$1\r\ni\r\n:1\r\n",
            BadMap::Overlap(9),
        ),
    ] {
        assert_eq!(map_of(bytes), Err(why.to_string()));
    }
}

#[test]
fn a_map_naming_too_many_masters_is_refused() {
    let mut bytes = format!("*{}\r\n", MAX_NODES + 1).into_bytes();
    for i in 0..=MAX_NODES {
        bytes.extend_from_slice(
            format!("*3\r\n:{i}\r\n:{i}\r\n*2\r\n$1\r\nh\r\n:{}\r\n", i + 1).as_bytes(),
        );
    }
    let big = Limits {
        elements: 1 << 20,
        ..LIMITS
    };
    assert!(matches!(
        Scanner::default().scan(&bytes, &big),
        Scan::Complete(_)
    ));
    let (frame, _) = decode(&bytes).unwrap().unwrap();
    assert_eq!(
        SlotMap::from_cluster_slots(&frame, &asked()),
        Err(BadMap::TooManyNodes)
    );
    // ... and a MOVED to one more master than that as well.
    let mut map = SlotMap::default();
    for i in 0..MAX_NODES {
        map.set(i as u16, Addr::parse(&format!("h:{}", i + 1)).unwrap())
            .unwrap();
    }
    assert_eq!(
        map.set(0, Addr::parse("h:9999").unwrap()),
        Err(BadMap::TooManyNodes)
    );
    map.set(0, Addr::parse("h:5").unwrap()).unwrap();
    assert_eq!(map.owner(0), Some(4));
}

#[test]
fn a_deep_or_huge_reply_never_reaches_the_map() {
    let deep = "*1\r\n".repeat(5000);
    assert!(matches!(
        Scanner::default().scan(deep.as_bytes(), &LIMITS),
        Scan::Invalid(_)
    ));
    assert!(matches!(
        Scanner::default().scan(b"*2000000000\r\n", &LIMITS),
        Scan::Invalid(_)
    ));
}

#[test]
fn moved_updates_one_slot() {
    let mut map = map_of(REAL).unwrap();
    map.set(0, Addr::parse("127.0.0.1:7104").unwrap()).unwrap();
    assert_eq!(map.owner(0), Some(3));
    assert_eq!(map.owner(1), Some(0));
    let one = SlotMap::single(Addr::parse("r:6379").unwrap());
    assert_eq!(one.unserved(), 0);
    assert_eq!(one.node_of(b"anything"), Some(&one.nodes[0]));
}

#[test]
fn seeds() {
    let s = Seeds::parse("redis-cluster://app:pw@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002").unwrap();
    assert_eq!(
        s.addrs,
        vec![
            Addr::parse("10.0.0.1:7000").unwrap(),
            Addr::parse("10.0.0.2:7001").unwrap(),
            Addr::parse("[::1]:7002").unwrap()
        ]
    );
    assert_eq!(s.user.as_deref(), Some("app"));
    assert_eq!(s.password.as_ref().map(Secret::expose), Some("pw"));
    assert!(!s.tls);
    assert_eq!(
        s.to_string(),
        "redis-cluster://***@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002"
    );
    let s = Seeds::parse("rediss-cluster://h/").unwrap();
    assert!(s.tls);
    assert_eq!(s.addrs, vec![Addr::parse("h:6379").unwrap()]);
    assert_eq!(s.to_string(), "rediss-cluster://h:6379");
    let s = Seeds::parse("redis-cluster://:pw@h:1,h:1").unwrap();
    assert_eq!(s.addrs.len(), 1, "duplicates count once");
    assert_eq!(s.user, None);
    let many = (1..=MAX_SEEDS + 1)
        .map(|p| format!("h:{p}"))
        .collect::<Vec<_>>()
        .join(",");
    for bad in [
        "redis://h:1".to_string(),
        "redis-cluster://".into(),
        "redis-cluster://h:1,".into(),
        "redis-cluster://h:1/0".into(),
        "redis-cluster://h:notaport".into(),
        "redis-cluster://:secret".into(),
        "redis-cluster://secret@h:1,,".into(),
        format!("redis-cluster://{many}"),
    ] {
        let e = Seeds::parse(&bad).unwrap_err();
        assert!(!e.contains("secret"), "{e}");
    }
}
