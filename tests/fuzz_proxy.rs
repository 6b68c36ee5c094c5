//! Property tests of the PROXY protocol and X-Forwarded-For parsers (`src/proxy.rs`): any
//! bytes, split anywhere, never panic and always reach a decision within a bounded number of
//! bytes; valid v1/v2 headers (with random TLVs and any bytes after them) name their source
//! address whatever follows and stay incomplete until their last byte; a mutated header is
//! still answered safely.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use chatloop::proxy::{Header, Trusted, V1_MAX, V2_MAX, V2_SIG, forwarded_client, parse_header};
use proptest::prelude::*;

fn v2(cmd: u8, fam: u8, src: IpAddr, tlvs: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut block = match src {
        IpAddr::V4(a) => [&a.octets()[..], &[127, 0, 0, 1], &[1, 2, 3, 4]].concat(),
        IpAddr::V6(a) => [&a.octets()[..], &[0; 16], &[1, 2, 3, 4]].concat(),
    };
    for (t, v) in tlvs {
        block.push(*t);
        block.extend_from_slice(&(v.len() as u16).to_be_bytes());
        block.extend_from_slice(v);
    }
    let mut h = V2_SIG.to_vec();
    h.extend_from_slice(&[0x20 | cmd, fam]);
    h.extend_from_slice(&(block.len() as u16).to_be_bytes());
    h.extend_from_slice(&block);
    h
}

fn v1(src: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    match src {
        IpAddr::V4(a) => format!("PROXY TCP4 {a} 10.0.0.1 {sport} {dport}\r\n"),
        IpAddr::V6(a) => format!("PROXY TCP6 {a} ::1 {sport} {dport}\r\n"),
    }
    .into_bytes()
}

fn any_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
        any::<[u8; 16]>().prop_map(|o| IpAddr::V6(Ipv6Addr::from(o))),
    ]
}

/// Checks what a decision says about `buf`.
fn sane(buf: &[u8]) -> Result<(), TestCaseError> {
    match parse_header(buf) {
        Ok(Header::Complete { len, .. }) => {
            prop_assert!(len <= buf.len() && len <= V2_MAX);
        }
        Ok(Header::Partial) => prop_assert!(buf.len() < V2_MAX),
        Ok(Header::Absent) | Err(_) => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_and_are_decided_within_the_bound(
        bytes in proptest::collection::vec(any::<u8>(), 0..3000),
    ) {
        for n in [0, 1, 5, 6, 12, 16, 17, V1_MAX, bytes.len()] {
            sane(&bytes[..n.min(bytes.len())])?;
        }
    }

    #[test]
    fn bytes_after_a_signature_never_panic(
        v2_sig in any::<bool>(),
        rest in proptest::collection::vec(any::<u8>(), 0..2500),
    ) {
        let start: &[u8] = if v2_sig { V2_SIG } else { b"PROXY " };
        let buf = [start, &rest].concat();
        sane(&buf)?;
        if !v2_sig && buf.len() >= V1_MAX {
            prop_assert_ne!(parse_header(&buf), Ok(Header::Partial));
        }
    }

    #[test]
    fn valid_headers_name_the_source_whatever_follows_and_wait_until_complete(
        src in any_ip(),
        sport in any::<u16>(),
        dport in any::<u16>(),
        binary in any::<bool>(),
        local in any::<bool>(),
        tlvs in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..40)), 0..5),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
        cut in any::<usize>(),
    ) {
        let (header, want) = if binary {
            let fam = if src.is_ipv4() { 0x11 } else { 0x21 };
            let cmd = u8::from(!local);
            (v2(cmd, fam, src, &tlvs), (!local).then(|| src.to_canonical()))
        } else {
            (v1(src, sport, dport), Some(src.to_canonical()))
        };
        let full = [&header[..], &tail].concat();
        prop_assert_eq!(
            parse_header(&full),
            Ok(Header::Complete { len: header.len(), client: want })
        );
        let cut = cut % header.len();
        prop_assert_eq!(parse_header(&header[..cut]), Ok(Header::Partial));
    }

    #[test]
    fn a_mutated_header_is_still_answered_safely(
        src in any_ip(),
        binary in any::<bool>(),
        at in any::<usize>(),
        byte in any::<u8>(),
    ) {
        let mut h = if binary {
            v2(1, if src.is_ipv4() { 0x11 } else { 0x21 }, src, &[(4, vec![0; 3])])
        } else {
            v1(src, 1234, 80)
        };
        let i = at % h.len();
        h[i] = byte;
        sane(&h)?;
    }

    #[test]
    fn forwarded_for_never_panics_and_skips_only_trusted_hops(
        values in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..60), 0..5),
        client in any::<[u8; 4]>(),
        hops in 0usize..4,
    ) {
        let trusted = Trusted::parse("10.0.0.0/8").unwrap();
        let _ = forwarded_client(values.iter().map(Vec::as_slice), &trusted);
        // Whatever a client put on the left, the proxies' entries decide.
        let client = Ipv4Addr::from(client);
        prop_assume!(!trusted.contains(IpAddr::V4(client)));
        let mut chain = String::from_utf8_lossy(&values.concat()).replace(',', " ");
        chain.push_str(&format!(", {client}"));
        for i in 0..hops {
            chain.push_str(&format!(", 10.0.0.{i}"));
        }
        prop_assert_eq!(
            forwarded_client([chain.as_bytes()].into_iter(), &trusted),
            Some(IpAddr::V4(client))
        );
    }
}
