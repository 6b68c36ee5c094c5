//! permessage-deflate (RFC 7692) against the real binary: what is negotiated, compressed
//! chat both ways, one compressed copy of a broadcast for every member that negotiated it,
//! the inflate bomb, and RSV1 rules. The client side compresses and inflates with
//! `miniz_oxide`'s own one-shot functions, not the server's code.

mod common;

use std::io::Read;

use common::{RawWs, Server, rss_kib};
use miniz_oxide::deflate::compress_to_vec;
use miniz_oxide::inflate::decompress_to_vec;
use serde_json::{Value, json};

/// A hand-made WebSocket client ([`RawWs`]) that can set RSV1 and sees it on what it reads.
struct Client {
    ws: RawWs,
    /// The `101`'s head.
    head: String,
}

#[derive(Debug)]
struct Frame {
    first: u8,
    payload: Vec<u8>,
}

impl Frame {
    fn rsv1(&self) -> bool {
        self.first & 0x40 != 0
    }
    fn opcode(&self) -> u8 {
        self.first & 0x0f
    }
    /// The message's bytes: inflated (with the RFC's 00 00 ff ff tail) if RSV1 is set.
    fn message(&self) -> Vec<u8> {
        if self.rsv1() {
            let mut data = self.payload.clone();
            // The RFC's tail, then an empty final stored block so that the one-shot
            // inflater sees a complete stream.
            data.extend_from_slice(&[0, 0, 0xff, 0xff, 0x01, 0x00, 0x00, 0xff, 0xff]);
            decompress_to_vec(&data).expect("valid deflate data")
        } else {
            self.payload.clone()
        }
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.message()).expect("JSON text")
    }
    fn close_code(&self) -> Option<u16> {
        (self.opcode() == 8).then(|| match self.payload.get(..2) {
            Some(c) => u16::from_be_bytes([c[0], c[1]]),
            None => 1005,
        })
    }
}

impl Client {
    /// Upgrades `path` offering `ext` as `Sec-WebSocket-Extensions` (if any).
    #[track_caller]
    fn open(server: &Server, path: &str, ext: Option<&str>) -> Client {
        let ext = ext.map_or(String::new(), |e| {
            format!("Sec-WebSocket-Extensions: {e}\r\n")
        });
        let (ws, head) = server.raw_ws_with(path, &ext);
        Client { ws, head }
    }

    /// The extension the server answered with, if any.
    fn extension(&self) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("sec-websocket-extensions")
                .then(|| v.trim().to_string())
        })
    }

    fn send(&mut self, first: u8, payload: &[u8]) {
        self.ws.send_first_byte(first, payload, true);
    }

    /// Sends a text message compressed (one frame, RSV1).
    fn send_compressed(&mut self, text: &str) {
        self.send(0xc1, &compress_to_vec(text.as_bytes(), 6));
    }

    fn read(&mut self) -> Option<Frame> {
        let f = self.ws.read_frame()?;
        Some(Frame {
            first: f.first,
            payload: f.payload,
        })
    }

    /// The next data frame whose JSON has this `type` (others skipped).
    #[track_caller]
    fn recv_type(&mut self, kind: &str) -> Frame {
        loop {
            let f = self.read().expect("a frame");
            assert_ne!(f.opcode(), 8, "closed: {:?}", f.close_code());
            if f.opcode() == 1 && f.json()["type"] == kind {
                return f;
            }
        }
    }

    fn close_code(&mut self) -> Option<u16> {
        while let Some(f) = self.read() {
            if f.opcode() == 8 {
                return f.close_code();
            }
        }
        None
    }
}

const ANSWER: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

fn chat_path(server: &Server, name: &str) -> (String, String) {
    let (sid, _) = server.session(name);
    let room = server.room(&sid);
    (format!("/ws/{room}?session_id={sid}"), room)
}

#[test]
fn negotiation_answers_offers_and_declines_what_it_cannot_honour() {
    let server = Server::start(&["--echo-path", "/echo"]);
    let answer = |ext: Option<&str>| Client::open(&server, "/echo", ext).extension();
    assert_eq!(answer(None), None);
    // Chromium's offer, Firefox's, and offers with parameters the server can meet.
    let ok = Some(ANSWER.to_string());
    assert_eq!(
        answer(Some("permessage-deflate; client_max_window_bits")),
        ok
    );
    assert_eq!(answer(Some("permessage-deflate")), ok);
    assert_eq!(
        answer(Some(
            "permessage-deflate; client_no_context_takeover; client_max_window_bits=9"
        )),
        ok
    );
    assert_eq!(
        answer(Some("permessage-deflate; server_max_window_bits=15")),
        Some(format!("{ANSWER}; server_max_window_bits=15"))
    );
    // A smaller server window is honoured by never compressing to that client.
    assert_eq!(
        answer(Some("permessage-deflate; server_max_window_bits=10")),
        Some(format!("{ANSWER}; server_max_window_bits=10"))
    );
    // Declined: unknown parameters, bad values, other extensions.
    for bad in [
        "permessage-deflate; foo",
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; client_max_window_bits=4",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "x-webkit-deflate-frame",
    ] {
        assert_eq!(answer(Some(bad)), None, "{bad}");
    }
    // Several offers: the first that can be honoured.
    assert_eq!(
        answer(Some(
            "permessage-deflate; server_max_window_bits=99, permessage-deflate"
        )),
        ok
    );
    assert_eq!(server.metric("chatloop_ws_deflate_total"), 6.0);

    let off = Server::start(&["--echo-path", "/echo", "--deflate", "false"]);
    let c = Client::open(&off, "/echo", Some("permessage-deflate"));
    assert_eq!(c.extension(), None, "--deflate false");
}

#[test]
fn compressed_chat_from_a_client_is_inflated() {
    let server = Server::start(&[]);
    let (path, _) = chat_path(&server, "alice");
    let mut a = Client::open(
        &server,
        &path,
        Some("permessage-deflate; client_max_window_bits"),
    );
    a.recv_type("welcome");
    let text = "compress me ".repeat(40).trim().to_string();
    a.send_compressed(&json!({"type": "chat", "message": text}).to_string());
    assert_eq!(a.recv_type("chat").json()["message"], text.as_str());
    // Fragmented: RSV1 on the first frame only, a ping between the fragments.
    let msg = serde_json::to_vec(&json!({"type": "chat", "message": "z".repeat(300)})).unwrap();
    let whole = compress_to_vec(&msg, 6);
    let (p, q) = whole.split_at(whole.len() / 2);
    a.send(0x41, p);
    a.send(0x89, b"ping");
    a.send(0x80, q);
    assert_eq!(a.recv_type("chat").json()["message"], "z".repeat(300));
    assert_eq!(server.metric("chatloop_messages_inflated_total"), 2.0);
}

#[test]
fn rsv1_without_negotiation_or_on_control_frames_is_a_protocol_error() {
    let server = Server::start(&["--echo-path", "/echo"]);
    let mut plain = Client::open(&server, "/echo", None);
    plain.send_compressed("hello hello hello");
    assert_eq!(plain.close_code(), Some(1002), "RSV1 without the extension");

    let mut c = Client::open(&server, "/echo", Some("permessage-deflate"));
    c.send(0xc9, b"");
    assert_eq!(c.close_code(), Some(1002), "a compressed ping");

    let mut c = Client::open(&server, "/echo", Some("permessage-deflate"));
    c.send(0x41, &compress_to_vec(b"abc", 6));
    c.send(0xc0, b"");
    assert_eq!(c.close_code(), Some(1002), "RSV1 on a continuation");

    let mut c = Client::open(&server, "/echo", Some("permessage-deflate"));
    c.send(0xc1, b"\xff\xff\xff\xff");
    assert_eq!(c.close_code(), Some(1007), "not deflate data");
}

#[test]
fn an_inflate_bomb_closes_with_1009_without_inflating_it() {
    // 48 MiB of zeros compress to under 64 KiB: one frame within --max-ws-message.
    let zeros = vec![b' '; 48 << 20];
    let bomb = compress_to_vec(&zeros, 10);
    drop(zeros);
    assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
    let server = Server::start(&[]);
    let (path, room) = chat_path(&server, "attacker");
    let (sid_b, _) = server.session("bystander");
    let (mut bystander, _) = server.join(&room, &sid_b);
    let rss_before = rss_kib(server.pid());
    for _ in 0..20 {
        let mut a = Client::open(&server, &path, Some("permessage-deflate"));
        a.recv_type("welcome");
        a.send(0xc1, &bomb);
        assert_eq!(a.close_code(), Some(1009));
    }
    let rss_after = rss_kib(server.pid());
    eprintln!("RSS before {rss_before} KiB, after 20 bombs {rss_after} KiB");
    assert!(
        rss_after < rss_before + 4 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    // The bystander chats on.
    bystander.chat("still here");
    assert_eq!(bystander.recv_type("chat")["message"], "still here");
    assert_eq!(server.metric("chatloop_messages_inflated_total"), 0.0);
}

#[test]
fn a_broadcast_is_compressed_once_for_every_member_that_negotiated_it() {
    let server = Server::start(&[]);
    let (path, _) = chat_path(&server, "alice");
    let deflate = Some("permessage-deflate; client_max_window_bits");
    let mut a = Client::open(&server, &path, deflate);
    let mut b = Client::open(&server, &path, None);
    let mut c = Client::open(
        &server,
        &path,
        Some("permessage-deflate; server_max_window_bits=10"),
    );
    let mut d = Client::open(&server, &path, Some("permessage-deflate"));
    for m in [&mut a, &mut b, &mut c, &mut d] {
        m.recv_type("welcome");
    }
    server.wait_user_count(
        path.split('/').nth(2).unwrap().split('?').next().unwrap(),
        4,
    );
    let before = server.metric("chatloop_messages_compressed_total");
    let long = "a long message, ".repeat(200).trim().to_string();
    a.send_compressed(&json!({"type": "chat", "message": long}).to_string());
    let fa = a.recv_type("chat");
    let fb = b.recv_type("chat");
    let fc = c.recv_type("chat");
    let fd = d.recv_type("chat");
    assert!(
        fa.rsv1() && fd.rsv1(),
        "compressed for those that negotiated it"
    );
    assert!(!fb.rsv1(), "plain for a client that did not offer it");
    assert!(
        !fc.rsv1(),
        "plain for a client that asked for a smaller server window"
    );
    assert_eq!(fa.payload, fd.payload, "the same compressed bytes");
    assert!(
        fa.payload.len() * 4 < fb.payload.len(),
        "{} vs {}",
        fa.payload.len(),
        fb.payload.len()
    );
    for f in [&fa, &fb, &fc, &fd] {
        assert_eq!(
            f.message(),
            fb.payload,
            "every member decodes the same message"
        );
        assert_eq!(f.json()["message"], long.as_str());
    }
    assert_eq!(
        server.metric("chatloop_messages_compressed_total") - before,
        1.0,
        "compressed once for two recipients"
    );
    // Below --deflate-min-bytes: plain for everyone, nothing compressed.
    d.send(
        0x81,
        json!({"type": "chat", "message": "short"})
            .to_string()
            .as_bytes(),
    );
    for m in [&mut a, &mut b, &mut c, &mut d] {
        let f = m.recv_type("chat");
        assert!(!f.rsv1());
        assert_eq!(f.json()["message"], "short");
    }
    assert_eq!(
        server.metric("chatloop_messages_compressed_total") - before,
        1.0
    );
    // A welcome carrying that history is compressed too (per recipient, but large).
    let mut e = Client::open(&server, &path, deflate);
    let w = e.recv_type("welcome");
    assert!(w.rsv1());
    let history = w.json()["messages"].as_array().cloned().unwrap_or_default();
    assert!(history.iter().any(|m| m["message"] == long.as_str()));
    let mut f = Client::open(&server, &path, None);
    let wf = f.recv_type("welcome");
    assert!(!wf.rsv1() && wf.payload.len() > 2 * w.payload.len());
}

#[test]
fn the_echo_endpoint_compresses_its_answers_and_the_cut_off_is_a_flag() {
    let server = Server::start(&["--echo-path", "/echo", "--deflate-min-bytes", "0"]);
    let mut c = Client::open(&server, "/echo", Some("permessage-deflate"));
    c.send_compressed("hello hello hello hello");
    let f = c.read().unwrap();
    assert!(f.rsv1());
    assert_eq!(f.message(), b"hello hello hello hello");
    c.send(0x82, &[7; 3000]);
    let f = c.read().unwrap();
    assert_eq!((f.rsv1(), f.opcode()), (true, 2));
    assert_eq!(f.message(), vec![7; 3000]);
}

/// A chat frame's JSON as the server writes it, with `n` characters of word-like text.
fn chat_json(n: usize, seed: u64) -> Vec<u8> {
    let words = [
        "the", "meeting", "moved", "to", "tomorrow", "at", "ten", "please", "bring", "your",
        "notes", "and", "coffee", "we", "will", "review", "release", "plan", "for", "chatloop",
        "server", "deflate", "numbers", "look", "good", "thanks", "everyone", "see", "you",
    ];
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut text = String::new();
    while text.len() < n {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        text.push_str(words[(x >> 33) as usize % words.len()]);
        text.push(if (x >> 20).is_multiple_of(11) {
            '.'
        } else {
            ' '
        });
    }
    text.truncate(n);
    serde_json::to_vec(&json!({
        "type": "chat", "id": format!("{:016x}{:016x}", x, x.rotate_left(17)),
        "user": "alice", "user_id": format!("{:032x}", u128::from(x) * 7919),
        "message": text, "ts": "2026-12-04T20:45:12.123456Z",
        "room_id": "3f2a9c1e7b5d4a60b8e1c2d3f4a5b6c7",
    }))
    .unwrap()
}

/// CPU time of this thread (wall time means little on a loaded machine).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Figures for the report (not a check): the cut-off, bytes of a join into a room with 50
/// messages of history, and server CPU per delivery with deflate negotiated vs not.
/// `cargo test --profile fast --test deflate figures -- --ignored --nocapture`
#[test]
#[ignore]
fn figures() {
    use chatloop::deflate::Deflater;
    // 1. The cut-off: time to compress and bytes saved, per payload size.
    let mut d = Deflater::new(0);
    println!("payload_bytes compressed_bytes saved_% ns_per_compress ns_per_saved_byte");
    for n in [16, 64, 128, 256, 512, 768, 1024, 2048, 4096, 16384] {
        let msgs: Vec<Vec<u8>> = (0..200).map(|i| chat_json(n, i)).collect();
        let plain: usize = msgs.iter().map(Vec::len).sum();
        let t = thread_cpu_ns();
        let mut comp = 0;
        for _ in 0..20 {
            comp = 0;
            for m in &msgs {
                comp += d.compress(m).map_or(m.len(), <[u8]>::len);
            }
        }
        let ns = (thread_cpu_ns() - t) as f64 / (20.0 * msgs.len() as f64);
        let saved = (plain - comp) as f64 / msgs.len() as f64;
        println!(
            "{:6} {:6} {:5.1} {:8.0} {:6.2}",
            plain / msgs.len(),
            comp / msgs.len(),
            100.0 * saved * msgs.len() as f64 / plain as f64,
            ns,
            ns / saved.max(1.0)
        );
    }

    // 2. Bytes on the wire for a join into a room with 50 messages of history.
    for (label, min) in [
        ("typical chat (~150 chars)", 150usize),
        ("long messages (~1500 chars)", 1500),
    ] {
        let server = Server::start(&["--chat-burst", "100"]);
        let (path, _) = chat_path(&server, "writer");
        let mut w = Client::open(&server, &path, None);
        w.recv_type("welcome");
        for i in 0..50 {
            let j: Value = serde_json::from_slice(&chat_json(min, i)).unwrap();
            w.send(
                0x81,
                json!({"type": "chat", "message": j["message"]})
                    .to_string()
                    .as_bytes(),
            );
            w.recv_type("chat");
        }
        for ext in [None, Some("permessage-deflate; client_max_window_bits")] {
            let mut c = Client::open(&server, &path, ext);
            let f = c.recv_type("welcome");
            let head = c.head.len();
            println!(
                "join, 50 x {label}, {}: 101 {head} B + welcome frame {} B (payload {} B inflated)",
                if ext.is_some() { "deflate" } else { "plain" },
                f.payload.len() + 4,
                f.message().len()
            );
        }
    }

    // 3. Server CPU per delivery, 10 rooms x 50 members, deflate vs not, in one run.
    for (label, chars) in [("150-char chat", 150usize), ("1500-char chat", 1500)] {
        for ext in [None, Some("permessage-deflate")] {
            let server = Server::start(&[
                "--chat-rate",
                "1000",
                "--chat-burst",
                "1000",
                "--upgrade-rate",
                "0",
                "--max-room-members",
                "100",
            ]);
            let mut rooms = Vec::new();
            for r in 0..10 {
                let (sid, _) = server.session(&format!("u{r}"));
                let room = server.room(&sid);
                let path = format!("/ws/{room}?session_id={sid}");
                let members: Vec<Client> = (0..50)
                    .map(|_| {
                        let mut c = Client::open(&server, &path, ext);
                        c.recv_type("welcome");
                        c
                    })
                    .collect();
                rooms.push(members);
            }
            std::thread::sleep(std::time::Duration::from_millis(300));
            for m in rooms.iter_mut().flatten() {
                m.ws.stream.set_nonblocking(true).unwrap();
                m.ws.buf.clear();
            }
            let cpu = |pid: u32| -> u64 {
                let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
                let f: Vec<&str> = s.rsplit_once(") ").unwrap().1.split(' ').collect();
                f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
            };
            let before = cpu(server.pid());
            let rounds = 200;
            let mut sink = vec![0u8; 1 << 20];
            for i in 0..rounds {
                for room in rooms.iter_mut() {
                    let j: Value = serde_json::from_slice(&chat_json(chars, i)).unwrap();
                    room[0].send(
                        0x81,
                        json!({"type": "chat", "message": j["message"]})
                            .to_string()
                            .as_bytes(),
                    );
                }
                for m in rooms.iter_mut().flatten() {
                    while let Ok(n) = m.ws.stream.read(&mut sink) {
                        if n == 0 {
                            break;
                        }
                    }
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
            for m in rooms.iter_mut().flatten() {
                while let Ok(n) = m.ws.stream.read(&mut sink) {
                    if n == 0 {
                        break;
                    }
                }
            }
            let ticks = cpu(server.pid()) - before;
            let deliveries = rounds as f64 * 10.0 * 50.0;
            let compressed = server.metric("chatloop_messages_compressed_total");
            let out = server.metric("chatloop_bytes_out_total");
            println!(
                "10x50, {label}, {}: {:.2} us CPU per delivery ({deliveries} deliveries, {compressed} compressions, {out} bytes out)",
                if ext.is_some() { "deflate" } else { "plain" },
                ticks as f64 * 10_000.0 / deliveries
            );
        }
    }
}
