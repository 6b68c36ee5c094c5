//! Pipelined requests from clients that never read (issue 12, finding 1): the server stops
//! answering a connection once its unsent output passes the pause mark (256 KiB), the rest of
//! the requests wait unread, static pages go out without a copy per response, and so three
//! such clients cost a few MiB at most, not hundreds. Meanwhile a well-behaved client on
//! another address gets complete answers, an honest pipelining client that reads slowly gets
//! all 10 000 answers in order, and a client that never reads is cut off after the request
//! timeout.
mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;

const PAGE_REQ: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

/// The most the server's resident memory may grow while it holds the attackers.
const GROWTH_KIB: u64 = 4 * 1024;

/// 64 KiB of pipelined `GET /`, sent on a fresh connection that then never reads.
fn attacker(s: &Server) -> TcpStream {
    let batch = PAGE_REQ.repeat(64 * 1024 / PAGE_REQ.len());
    let mut t = TcpStream::connect(s.addr).expect("connect");
    t.set_write_timeout(Some(TIMEOUT)).unwrap();
    t.write_all(&batch)
        .expect("64 KiB fit in the socket buffers");
    t
}

#[test]
fn pipelined_page_requests_that_are_never_read_cost_the_server_a_few_mib_at_most() {
    let s = Server::start(&[]);
    let page = s.http().get("/", None);
    assert_eq!(page.status, 200);
    assert!(page.body.len() > 10_000, "the demo page is the big answer");
    std::thread::sleep(Duration::from_millis(200));
    let before = rss_kib(s.pid());
    let attackers: Vec<TcpStream> = (0..3).map(|_| attacker(&s)).collect();
    // The bystander, from another address, gets complete and correct answers meanwhile.
    let mut by = Http::connect_from(s.addr, "127.0.0.2");
    for i in 0..20 {
        let r = by.get("/", None);
        assert_eq!(r.status, 200, "bystander request {i}");
        assert!(
            r.body == page.body,
            "bystander request {i}: a different page"
        );
        assert_eq!(by.get("/health", None).status, 200);
    }
    // Whatever the server does with the attackers' requests, it has done it by now.
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(s.pid());
    eprintln!(
        "server RSS: {before} KiB before, {after} KiB with 3 attackers holding 64 KiB of \
         pipelined GET / each (+{} KiB)",
        after.saturating_sub(before)
    );
    assert!(
        after < before + GROWTH_KIB,
        "3 clients that never read grew the server from {before} KiB to {after} KiB"
    );
    assert_eq!(by.get("/health", None).status, 200);
    drop(attackers);
}

#[test]
fn an_honest_pipelining_client_that_reads_slowly_gets_every_answer_in_order() {
    let s = Server::start(&[]);
    let page_len = s.http().get("/", None).body.len();
    std::thread::sleep(Duration::from_millis(200));
    let before = rss_kib(s.pid());
    let n = 10_000;
    let path = |i: usize| match i % 10 {
        0 => "/",
        k if k % 2 == 1 => "/ping",
        _ => "/health",
    };
    let mut batch = Vec::new();
    for i in 0..n {
        batch.extend_from_slice(format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", path(i)).as_bytes());
    }
    let mut pipe = s.http();
    let writer = {
        let mut stream = pipe.stream.try_clone().unwrap();
        std::thread::spawn(move || stream.write_all(&batch).is_ok())
    };
    // It reads nothing at first: the server stops answering at the pause mark and holds
    // little (1 000 demo pages answered at once would be 42 MB).
    std::thread::sleep(Duration::from_millis(300));
    let stalled = rss_kib(s.pid());
    eprintln!("server RSS: {before} KiB before, {stalled} KiB while the pipeliner does not read");
    assert!(
        stalled < before + GROWTH_KIB,
        "a pipelining client that does not read grew the server from {before} KiB to {stalled} KiB"
    );
    // Then it reads, slowly: a short nap every 100 answers.
    for i in 0..n {
        let r = pipe.read_response(false);
        assert_eq!(r.status, 200, "response {i}");
        match path(i) {
            "/" => assert_eq!(r.body.len(), page_len, "response {i} out of order"),
            "/ping" => assert!(r.text().contains("pong"), "response {i} out of order"),
            _ => assert!(r.text().contains("\"ok\""), "response {i} out of order"),
        }
        if i % 100 == 99 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    assert!(writer.join().unwrap());
    assert_eq!(pipe.get("/health", None).status, 200);
}

#[test]
fn under_a_tiny_output_cap_pipelining_is_paused_never_cut_off() {
    // Each page alone is ten times the cap: one answer is always allowed whole, and
    // answering stops at the pause mark (half the cap), so the cap itself is never reached.
    let s = Server::start(&["--max-output-queue", "4KiB"]);
    let page_len = s.http().get("/", None).body.len();
    assert!(page_len > 40 * 1024);
    let n = 300;
    let mut batch = Vec::new();
    for i in 0..n {
        let path = if i % 3 == 0 { "/" } else { "/health" };
        batch.extend_from_slice(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    }
    let mut pipe = s.http();
    pipe.send_raw(&batch);
    std::thread::sleep(Duration::from_millis(200));
    for i in 0..n {
        let r = pipe.read_response(false);
        assert_eq!(r.status, 200, "response {i}");
        if i % 3 == 0 {
            assert_eq!(r.body.len(), page_len, "response {i}");
        } else {
            assert!(r.text().contains("\"ok\""), "response {i}");
        }
    }
    assert_eq!(pipe.get("/health", None).status, 200);
    assert_eq!(s.metric("chatloop_slow_consumers_total"), 0.0);
}

#[test]
fn a_client_that_never_reads_its_answers_is_cut_off_after_the_request_timeout() {
    let s = Server::start(&["--request-timeout", "1s"]);
    let _attacker = attacker(&s);
    let connections = || metric_in(&s.metrics_text(), "chatloop_connections");
    // The attacker and the metrics request itself.
    assert_eq!(connections(), 2.0);
    // Its unanswered requests run the request timeout (1 s, then 408 and close); what it
    // never reads is given up after the 2 s linger.
    let gone = wait_for(Duration::from_secs(8), || connections() == 1.0);
    assert!(
        gone.is_some(),
        "the connection that never reads is still open"
    );
    assert_eq!(s.http().get("/health", None).status, 200);
}
