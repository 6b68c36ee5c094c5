//! Property tests: the HTTP parser, the WebSocket frame decoder and the client JSON path take
//! arbitrary bytes, split at arbitrary points, without panicking, and always reach a decision.
//! Failing cases proptest finds are kept in `tests/fuzz_parsers.proptest-regressions`.

#[path = "common/frame.rs"]
mod frame;

use chatloop::http;
use chatloop::protocol::parse_client;
use chatloop::ws::{Step, WsEvent, WsState};
use proptest::prelude::*;

const HEAD: usize = 16 * 1024;
const BODY: usize = 64 * 1024;

/// Masks a payload into a client frame.
fn client_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    frame::client_frame(first, payload, Some(mask))
}

/// Runs the decoder the way the event loop does: bytes arrive in `chunks`, unused bytes wait.
/// Returns the text messages, or the close code that ended the stream.
fn decode_stream(chunks: &[Vec<u8>]) -> Result<Vec<String>, u16> {
    let mut st = WsState::default();
    let mut inflater = chatloop::deflate::Inflater::default();
    let mut pending: Vec<u8> = Vec::new();
    let mut texts = Vec::new();
    for c in chunks {
        pending.extend_from_slice(c);
        loop {
            match st.decode(&mut pending, 1 << 20, &mut inflater) {
                Ok(Step::Need) => break,
                Ok(Step::Consumed(n)) => {
                    assert!(n > 0 && n <= pending.len());
                    pending.drain(..n);
                }
                Ok(Step::Event(ev, n)) => {
                    if let WsEvent::Text(t) = ev {
                        texts.push(t.into_owned());
                    }
                    assert!(n > 0 && n <= pending.len());
                    pending.drain(..n);
                }
                Err(c) => return Err(c.code),
            }
        }
    }
    Ok(texts)
}

fn split(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.sort_unstable();
    let mut out = Vec::new();
    let mut last = 0;
    for p in points.into_iter().chain([bytes.len()]) {
        out.push(bytes[last..p].to_vec());
        last = p;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn http_parser_never_panics_and_always_decides(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        match http::parse(&bytes, HEAD, BODY) {
            Ok(Some((req, n))) => {
                prop_assert!(n <= bytes.len());
                prop_assert!(req.content_length <= BODY);
            }
            Ok(None) => prop_assert!(bytes.len() <= HEAD),
            Err(e) => {
                let r = e.response();
                prop_assert!(r.status >= 400);
            }
        }
    }

    #[test]
    fn http_request_split_anywhere_parses_the_same(
        path in "/[a-z0-9/]{0,40}",
        body in "[ -~]{0,200}",
        cut in 0usize..1000,
    ) {
        let raw = format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        let bytes = raw.as_bytes();
        let (full, n) = http::parse(bytes, HEAD, BODY).unwrap().unwrap();
        prop_assert_eq!(full.path, path.as_str());
        prop_assert_eq!(&bytes[n..], body.as_bytes());
        let cut = cut % n;
        prop_assert_eq!(http::parse(&bytes[..cut], HEAD, BODY), Ok(None));
    }

    #[test]
    fn ws_decoder_never_panics_on_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
    ) {
        let _ = decode_stream(&split(&bytes, &cuts));
    }

    #[test]
    fn ws_messages_survive_any_split_and_fragmentation(
        texts in proptest::collection::vec(".{0,300}", 1..6),
        frag in 1usize..50,
        mask in any::<[u8; 4]>(),
        cuts in proptest::collection::vec(any::<usize>(), 0..10),
    ) {
        let mut stream = Vec::new();
        for t in &texts {
            let b = t.as_bytes();
            let pieces: Vec<&[u8]> = if b.is_empty() { vec![b] } else { b.chunks(frag).collect() };
            for (i, p) in pieces.iter().enumerate() {
                let fin = if i + 1 == pieces.len() { 0x80 } else { 0 };
                let op = if i == 0 { 0x1 } else { 0x0 };
                stream.extend(client_frame(fin | op, p, mask));
                if i == 0 && pieces.len() > 1 {
                    stream.extend(client_frame(0x89, b"ping", mask)); // control frames may interleave
                }
            }
        }
        prop_assert_eq!(decode_stream(&split(&stream, &cuts)), Ok(texts));
    }

    #[test]
    fn client_json_path_never_panics(s in ".{0,200}") {
        let _ = parse_client(&s);
    }

    #[test]
    fn client_json_path_on_json_like_input(
        kind in prop_oneof![Just("chat".to_string()), Just("typing".to_string()), "[a-z]{0,8}"],
        msg in prop_oneof![Just("\"hi\"".to_string()), Just("5".to_string()), Just("null".to_string()), Just("[1]".to_string()), "\"[ -~]{0,20}\""],
    ) {
        let text = format!("{{\"type\":\"{kind}\",\"message\":{msg}}}");
        match parse_client(&text) {
            Ok(_) => prop_assert!(kind == "chat" || kind == "typing"),
            Err(e) => prop_assert!(["invalid_json", "unknown_type"].contains(&e.code())),
        }
    }
}
