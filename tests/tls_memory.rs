//! What an idle TLS connection costs the server in heap, counted exactly: after the handshake
//! and a first request, a server-side [`TlsSession`] may hold rustls's connection state (keys,
//! sequence numbers, the handshake-message table rustls keeps for the connection's life) and
//! nothing else: no record buffer, no unsent ciphertext, no session tickets.
//!
//! Counted with a counting global allocator (live bytes as requested, without the allocator's
//! own headers) over the server side only: each client is dropped before counting. RSS per
//! idle wss connection, which adds the rest of a connection (its slot, socket state, hub
//! membership) and the allocator's overhead, is measured by `tools/bench.sh idlewss`.
//!
//! `cargo test --profile fast --test tls_memory -- --nocapture` prints the figure.

#![cfg(feature = "tls")]

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{IoSlice, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use chatloop::outbox::{Outbox, Queue};
use chatloop::tls::{Acceptor, Scratch, TlsSession, flush};
use common::pki::Pki;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};

struct Counting;

/// Bytes currently allocated through the global allocator.
static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The most heap one idle server-side session may hold. rustls 0.23's unbuffered server
/// connection with ring's AES-GCM keys needs about 3 320 bytes (the connection itself about
/// 1 140, a 640-byte table of handshake-message spans it keeps, 560 per direction for the
/// key schedules, about 420 for the traffic-secret state and two empty queues); a kept
/// 16 KiB record buffer, unsent ciphertext or session tickets would each pass this.
const MAX_IDLE_SESSION_BYTES: i64 = 3_600;

/// A test CA and a leaf for localhost (tests/common/pki.rs), and a client that trusts the CA
/// and offers ALPN `http/1.1`, as browsers do.
fn setup() -> (Acceptor, Arc<ClientConfig>) {
    let pki = Pki::new("memory");
    let (cert, key) = pki.leaf("server");
    let acceptor = Acceptor::load(cert.to_str().unwrap(), key.to_str().unwrap()).unwrap();
    (acceptor, pki.client_config())
}

/// A socket that takes everything.
struct Wire(Vec<u8>);

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        Ok(bufs.iter().map(|b| self.write(b).unwrap()).sum())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The loop-wide pieces a server session is driven with (not counted per session).
struct Loop {
    acceptor: Acceptor,
    client: Arc<ClientConfig>,
    queue: Queue,
    outbox: Outbox,
    scratch: Scratch,
    plain: Vec<u8>,
}

impl Loop {
    /// One connection: the full handshake, then a request from the client that the server
    /// decrypts. Returns the server side; the client is dropped.
    fn idle_session(&mut self) -> Box<TlsSession> {
        let mut server = self.acceptor.session().unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = ClientConnection::new(self.client.clone(), name).unwrap();
        let mut sent_request = false;
        for _ in 0..10 {
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            self.plain.clear();
            server.read(&mut wire, &mut self.plain).unwrap();
            if sent_request {
                assert_eq!(self.plain, b"GET /health HTTP/1.1\r\n\r\n");
                assert!(!server.handshaking());
                return server;
            }
            let mut out = Wire(Vec::new());
            let f = flush(
                &mut server,
                &mut self.queue,
                &mut self.outbox,
                &mut out,
                &mut self.scratch,
                false,
            )
            .unwrap();
            assert!(f.done);
            self.outbox.end_round();
            let mut rd = &out.0[..];
            while !rd.is_empty() {
                client.read_tls(&mut rd).unwrap();
                client.process_new_packets().unwrap();
            }
            let mut sink = [0u8; 64];
            while matches!(client.reader().read(&mut sink), Ok(n) if n > 0) {}
            if !client.is_handshaking() {
                client
                    .writer()
                    .write_all(b"GET /health HTTP/1.1\r\n\r\n")
                    .unwrap();
                sent_request = true;
            }
        }
        panic!("no handshake in 10 flights");
    }
}

#[test]
fn an_idle_tls_session_holds_only_rustls_connection_state() {
    const N: usize = 300;
    let (acceptor, client) = setup();
    let mut lp = Loop {
        acceptor,
        client,
        queue: Queue::default(),
        outbox: Outbox::default(),
        scratch: Scratch::default(),
        plain: Vec::with_capacity(64 * 1024),
    };
    // Warm-up: whatever rustls, ring and the loop-wide buffers set up once.
    for _ in 0..20 {
        drop(lp.idle_session());
    }
    let mut held: Vec<Box<TlsSession>> = Vec::with_capacity(N);
    let before = LIVE.load(Ordering::Relaxed);
    for _ in 0..N {
        held.push(lp.idle_session());
    }
    let after = LIVE.load(Ordering::Relaxed);
    let per_session = (after - before) / N as i64;
    println!(
        "{N} idle TLS sessions: {} bytes of heap in all, {per_session} bytes each \
         (the TlsSession struct itself {} bytes)",
        after - before,
        std::mem::size_of::<TlsSession>()
    );
    for s in &held {
        assert_eq!(s.queued(), 0, "an idle session holds no unsent ciphertext");
    }
    assert!(
        per_session <= MAX_IDLE_SESSION_BYTES,
        "an idle TLS session holds {per_session} bytes of heap (at most \
         {MAX_IDLE_SESSION_BYTES}): a buffer is kept that need not be"
    );
    drop(held);
    let freed = LIVE.load(Ordering::Relaxed);
    assert!(
        freed - before < 4096,
        "closing the sessions gives their memory back ({} bytes left)",
        freed - before
    );
}
