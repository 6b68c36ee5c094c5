//! Output queues: what each connection still has to send, written with one gathered write
//! (`sendmsg`; `send` for a single slice, see [`Sock`]).
//!
//! During one loop iteration every frame for a connection is appended to a loop-wide
//! [`Outbox`] as a linked list threaded through one reused `Vec` (no allocation per
//! recipient); at the end of the iteration each connection's list is written with a single
//! vectored write. Only what the kernel does not take moves into that connection's own
//! `backlog`, which is empty (and unallocated) for any connection that keeps up.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use crate::protocol::Frame;

/// Bytes to send: a shared broadcast frame, bytes of this connection's own, or a constant.
#[derive(Debug, Clone)]
pub enum Chunk {
    /// A frame shared with other recipients (a reference-count bump, no copy).
    Shared(Frame),
    /// Bytes for this connection only (HTTP responses, pongs, close frames).
    Owned(Vec<u8>),
    /// Bytes compiled into the binary (the pages, canned responses, the ping frame).
    Static(&'static [u8]),
}

impl Chunk {
    /// The bytes the chunk sends.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Shared(f) => f,
            Chunk::Owned(v) => v,
            Chunk::Static(s) => s,
        }
    }
}

const NONE: u32 = u32::MAX;

/// The loop-wide list of chunks queued during the current iteration.
#[derive(Default)]
pub struct Outbox {
    pending: Vec<Queued>,
}

/// A chunk queued this iteration, linked to the next one of the same connection.
struct Queued {
    chunk: Chunk,
    next: u32,
}

impl std::fmt::Debug for Outbox {
    /// Never the bytes (they are what users wrote): how many chunks.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("chunks", &self.pending.len())
            .finish()
    }
}

impl Outbox {
    /// Forgets this iteration's chunks (all queues must have been flushed or cleared).
    pub fn end_round(&mut self) {
        self.pending.clear();
    }

    /// Gives back the list's memory after a peak (called between iterations, when it is
    /// empty, at most once a second).
    pub fn shrink(&mut self) {
        if self.pending.is_empty() && self.pending.capacity() > 1024 {
            self.pending = Vec::new();
        }
    }

    /// Chunks queued this iteration, all connections together.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Nothing is queued this iteration.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

/// One connection's queue: this iteration's chunks in the [`Outbox`], then its backlog.
#[derive(Debug)]
pub struct Queue {
    backlog: VecDeque<Chunk>,
    /// Bytes of the backlog's first chunk already written.
    head_off: usize,
    head: u32,
    tail: u32,
    pending_chunks: u32,
    bytes: usize,
}

impl Default for Queue {
    fn default() -> Self {
        Queue {
            backlog: VecDeque::new(),
            head_off: 0,
            head: NONE,
            tail: NONE,
            pending_chunks: 0,
            bytes: 0,
        }
    }
}

/// What a flush achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    /// Bytes the writer took.
    pub written: usize,
    /// Nothing is left to send.
    pub done: bool,
}

impl Queue {
    /// Queues a chunk. Returns `true` when it is the connection's first this iteration
    /// (the caller then remembers to flush it).
    pub fn push(&mut self, ob: &mut Outbox, chunk: Chunk) -> bool {
        self.bytes += chunk.bytes().len();
        // Consecutive owned bytes (pipelined HTTP responses) coalesce into one chunk.
        if let (Chunk::Owned(more), Some(last)) = (&chunk, self.tail_chunk(ob))
            && let Chunk::Owned(v) = last
        {
            v.extend_from_slice(more);
            return false;
        }
        let idx = ob.pending.len() as u32;
        ob.pending.push(Queued { chunk, next: NONE });
        self.pending_chunks += 1;
        if self.tail == NONE {
            self.head = idx;
            self.tail = idx;
            true
        } else {
            ob.pending[self.tail as usize].next = idx;
            self.tail = idx;
            false
        }
    }

    /// Unsent bytes (backlog and this iteration's chunks).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Nothing left to send: no bytes, no backlog, nothing queued this iteration.
    pub fn is_empty(&self) -> bool {
        self.bytes == 0 && self.backlog.is_empty() && self.head == NONE
    }

    /// Writes as much as the writer takes in one vectored write (more only past 64 chunks),
    /// moving what is left of this iteration's chunks into the backlog.
    pub fn flush(&mut self, ob: &mut Outbox, w: &mut impl Write) -> io::Result<Flushed> {
        let mut written = 0;
        let result = loop {
            if self.backlog.is_empty() && self.head == NONE {
                break Ok(());
            }
            // Most flushes carry one or two frames: a small iovec array is cheaper to set up.
            let (res, full) = if self.backlog.len() + self.pending_chunks as usize <= 4 {
                self.write_gathered::<4>(ob, w)
            } else {
                self.write_gathered::<64>(ob, w)
            };
            match res {
                Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(k) => {
                    written += k;
                    self.consume(ob, k);
                    if !full {
                        // Everything fitted in one call; a short write means the socket is full.
                        if !self.backlog.is_empty() || self.head != NONE {
                            self.park(ob);
                        }
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.park(ob);
                    break Ok(());
                }
                Err(e) => break Err(e),
            }
        };
        result?;
        let done = self.backlog.is_empty() && self.head == NONE;
        if done && self.backlog.capacity() > 0 {
            self.backlog = VecDeque::new(); // give the memory back
        }
        Ok(Flushed { written, done })
    }

    /// Drops everything queued (a slow consumer being cut off).
    pub fn clear(&mut self) {
        self.backlog = VecDeque::new();
        self.head_off = 0;
        self.head = NONE;
        self.tail = NONE;
        self.pending_chunks = 0;
        self.bytes = 0;
    }

    /// Keeps only the first `keep` unsent bytes (what must still go out, such as a handshake
    /// response) and drops the rest: a slow consumer being cut off before its `101` left.
    pub fn truncate(&mut self, ob: &mut Outbox, keep: usize) {
        if keep == 0 {
            self.clear();
            return;
        }
        if keep >= self.bytes {
            return;
        }
        self.park(ob);
        // The first chunk's first `head_off` bytes were written already.
        let mut left = keep + self.head_off;
        let mut kept = VecDeque::new();
        for chunk in self.backlog.drain(..) {
            let len = chunk.bytes().len();
            if len <= left {
                left -= len;
                kept.push_back(chunk);
            } else {
                kept.push_back(Chunk::Owned(chunk.bytes()[..left].to_vec()));
                left = 0;
            }
            if left == 0 {
                break;
            }
        }
        self.backlog = kept;
        self.bytes = keep;
    }

    /// One vectored write of up to `N` chunks; also says whether all `N` slots were used.
    fn write_gathered<const N: usize>(
        &self,
        ob: &Outbox,
        w: &mut impl Write,
    ) -> (io::Result<usize>, bool) {
        let mut iov = [IoSlice::new(&[]); N];
        let n = self.gather(ob, &mut iov);
        (w.write_vectored(&iov[..n]), n == N)
    }

    fn tail_chunk<'a>(&self, ob: &'a mut Outbox) -> Option<&'a mut Chunk> {
        if self.tail == NONE {
            return None;
        }
        ob.pending.get_mut(self.tail as usize).map(|p| &mut p.chunk)
    }

    fn gather<'a>(&'a self, ob: &'a Outbox, iov: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (i, c) in self.backlog.iter().enumerate() {
            if n == iov.len() {
                return n;
            }
            let b = c.bytes();
            iov[n] = IoSlice::new(if i == 0 { &b[self.head_off..] } else { b });
            n += 1;
        }
        let mut at = self.head;
        while at != NONE && n < iov.len() {
            let p = &ob.pending[at as usize];
            let b = p.chunk.bytes();
            // The first pending chunk may be partly written while the backlog is empty.
            iov[n] = IoSlice::new(if n == 0 { &b[self.head_off..] } else { b });
            n += 1;
            at = p.next;
        }
        n
    }

    /// Marks `k` bytes as written, front first.
    fn consume(&mut self, ob: &mut Outbox, mut k: usize) {
        self.bytes -= k;
        while k > 0 {
            if let Some(front) = self.backlog.front() {
                let left = front.bytes().len() - self.head_off;
                if k >= left {
                    k -= left;
                    self.head_off = 0;
                    self.backlog.pop_front();
                } else {
                    self.head_off += k;
                    return;
                }
            } else if self.head != NONE {
                let p = &mut ob.pending[self.head as usize];
                let left = p.chunk.bytes().len() - self.head_off;
                if k >= left {
                    k -= left;
                    self.head_off = 0;
                    p.chunk = Chunk::Static(&[]);
                    self.head = p.next;
                    self.pending_chunks -= 1;
                    if self.head == NONE {
                        self.tail = NONE;
                    }
                } else {
                    self.head_off += k;
                    return;
                }
            } else {
                return;
            }
        }
        // Skip fully written empty chunks so `done` is exact.
        while self
            .backlog
            .front()
            .is_some_and(|c| c.bytes().len() == self.head_off)
        {
            self.backlog.pop_front();
            self.head_off = 0;
        }
    }

    /// Keeps this iteration's chunks unsent, for a later round (a held response).
    pub fn keep(&mut self, ob: &mut Outbox) {
        self.park(ob);
    }

    /// Moves this iteration's unwritten chunks into the backlog (kept across iterations).
    fn park(&mut self, ob: &mut Outbox) {
        let mut at = self.head;
        while at != NONE {
            let p = &mut ob.pending[at as usize];
            self.backlog
                .push_back(std::mem::replace(&mut p.chunk, Chunk::Static(&[])));
            at = p.next;
        }
        self.head = NONE;
        self.tail = NONE;
        self.pending_chunks = 0;
    }
}

/// An accepted TCP socket as the loop reads and writes it. Output goes out with the socket
/// calls, `send` for one slice and `sendmsg` for several, not `write`/`writev`: those pass
/// through the file layer first (position lock, access checks, change notification), which
/// costs a fan-out to cold sockets about 0.3 us per delivery in kernel time (measured against
/// the relay floor, which uses `send`). Input is `recv` (std's `read` on a socket). The
/// `TcpStream` is reachable through `Deref` (shutdown, addresses).
#[derive(Debug)]
pub struct Sock(pub mio::net::TcpStream);

impl io::Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Sock {
    /// `send` with `MSG_NOSIGNAL` (std's socket write).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    /// One slice as `send`, more as one `sendmsg` with `MSG_NOSIGNAL`.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match bufs {
            [] => Ok(0),
            [one] => self.0.write(one),
            _ => socket2::SockRef::from(&self.0).send_vectored_with_flags(bufs, libc::MSG_NOSIGNAL),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl std::ops::Deref for Sock {
    type Target = mio::net::TcpStream;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// A socket for unit tests (here and in `tls`): takes at most `room` bytes in all, then says
/// `WouldBlock`; counts the write calls.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct Sink {
    pub(crate) data: Vec<u8>,
    pub(crate) room: usize,
    pub(crate) calls: usize,
}

#[cfg(test)]
impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.calls += 1;
        if self.room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(self.room - n);
            self.data.extend_from_slice(&b[..take]);
            n += take;
            if n == self.room {
                break;
            }
        }
        self.room -= n;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn one_vectored_write_for_many_chunks_and_shared_frames_are_not_copied() {
        let mut ob = Outbox::default();
        let frame: Frame = Rc::from(&b"frame"[..]);
        let (mut a, mut b) = (Queue::default(), Queue::default());
        assert!(a.push(&mut ob, Chunk::Shared(frame.clone())));
        assert!(b.push(&mut ob, Chunk::Shared(frame.clone())));
        assert!(!a.push(&mut ob, Chunk::Static(b"-x")));
        assert_eq!(Rc::strong_count(&frame), 3);
        let mut s = Sink {
            data: vec![],
            room: 1000,
            calls: 0,
        };
        assert_eq!(
            a.flush(&mut ob, &mut s).unwrap(),
            Flushed {
                written: 7,
                done: true
            }
        );
        assert_eq!((s.data.as_slice(), s.calls), (&b"frame-x"[..], 1));
        b.flush(&mut ob, &mut s).unwrap();
        ob.end_round();
        assert_eq!(Rc::strong_count(&frame), 1);
    }

    #[test]
    fn partial_writes_park_the_rest_in_order_across_rounds() {
        let mut ob = Outbox::default();
        let mut q = Queue::default();
        for part in [&b"abc"[..], b"def", b"ghi"] {
            q.push(&mut ob, Chunk::Shared(Rc::from(part)));
        }
        let mut s = Sink {
            data: vec![],
            room: 4,
            calls: 0,
        };
        assert_eq!(
            q.flush(&mut ob, &mut s).unwrap(),
            Flushed {
                written: 4,
                done: false
            }
        );
        ob.end_round();
        assert_eq!(q.bytes(), 5);
        q.push(&mut ob, Chunk::Owned(b"jk".to_vec()));
        s.room = 3;
        assert!(!q.flush(&mut ob, &mut s).unwrap().done);
        ob.end_round();
        s.room = 100;
        assert!(q.flush(&mut ob, &mut s).unwrap().done);
        assert_eq!(s.data, b"abcdefghijk");
        assert!(q.is_empty());
        assert_eq!(q.backlog.capacity(), 0);
    }

    #[test]
    fn would_block_keeps_everything_and_owned_chunks_coalesce() {
        let mut ob = Outbox::default();
        let mut q = Queue::default();
        q.push(&mut ob, Chunk::Owned(b"HTTP/1.1 200".to_vec()));
        q.push(&mut ob, Chunk::Owned(b" OK".to_vec()));
        assert_eq!(ob.len(), 1);
        let mut s = Sink {
            data: vec![],
            room: 0,
            calls: 0,
        };
        assert_eq!(
            q.flush(&mut ob, &mut s).unwrap(),
            Flushed {
                written: 0,
                done: false
            }
        );
        ob.end_round();
        s.room = 100;
        q.flush(&mut ob, &mut s).unwrap();
        assert_eq!(s.data, b"HTTP/1.1 200 OK");
    }

    #[test]
    fn more_than_64_chunks_all_go_out() {
        let mut ob = Outbox::default();
        let mut q = Queue::default();
        for i in 0..200u8 {
            q.push(&mut ob, Chunk::Shared(Rc::from(&[i][..])));
        }
        let mut s = Sink {
            data: vec![],
            room: 1000,
            calls: 0,
        };
        assert!(q.flush(&mut ob, &mut s).unwrap().done);
        assert_eq!(s.data, (0..200u8).collect::<Vec<_>>());
        assert_eq!(s.calls, 4);
    }

    #[test]
    fn truncate_keeps_the_unsent_front_only() {
        let mut ob = Outbox::default();
        let mut q = Queue::default();
        q.push(&mut ob, Chunk::Owned(b"HTTP/1.1 101 ok\r\n\r\n".to_vec()));
        q.push(&mut ob, Chunk::Shared(Rc::from(&b"welcome"[..])));
        q.push(&mut ob, Chunk::Shared(Rc::from(&b"chat"[..])));
        // Part of the 101 went out; 4 bytes of it are left, and everything after it.
        let mut s = Sink {
            data: vec![],
            room: 15,
            calls: 0,
        };
        q.flush(&mut ob, &mut s).unwrap();
        ob.end_round();
        assert_eq!(q.bytes(), 4 + 7 + 4);
        q.truncate(&mut ob, 4);
        assert_eq!(q.bytes(), 4);
        q.push(&mut ob, Chunk::Static(b"<close>"));
        s.room = 100;
        assert!(q.flush(&mut ob, &mut s).unwrap().done);
        assert_eq!(s.data, b"HTTP/1.1 101 ok\r\n\r\n<close>");

        // Cut inside a shared chunk of this round (nothing written yet).
        let mut q = Queue::default();
        q.push(&mut ob, Chunk::Shared(Rc::from(&b"abcdef"[..])));
        q.push(&mut ob, Chunk::Shared(Rc::from(&b"ghi"[..])));
        q.truncate(&mut ob, 4);
        let mut s = Sink {
            data: vec![],
            room: 100,
            calls: 0,
        };
        q.flush(&mut ob, &mut s).unwrap();
        ob.end_round();
        assert_eq!(s.data, b"abcd");
        q.truncate(&mut ob, 0);
        assert!(q.is_empty());
    }

    #[test]
    fn clear_frees_everything() {
        let mut ob = Outbox::default();
        let mut q = Queue::default();
        q.push(&mut ob, Chunk::Owned(vec![0; 100]));
        let mut s = Sink {
            data: vec![],
            room: 10,
            calls: 0,
        };
        q.flush(&mut ob, &mut s).unwrap();
        q.clear();
        assert!(q.is_empty());
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn a_socket_sends_one_slice_or_many_in_order_and_a_queue_through_it() {
        use std::io::Read;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        let mut sock = Sock(mio::net::TcpStream::from_std(server));
        assert_eq!(sock.write_vectored(&[]).unwrap(), 0);
        assert_eq!(sock.write_vectored(&[IoSlice::new(b"one|")]).unwrap(), 4);
        let three = [
            IoSlice::new(b"a"),
            IoSlice::new(b"bc"),
            IoSlice::new(b"def|"),
        ];
        assert_eq!(sock.write_vectored(&three).unwrap(), 7);
        let mut ob = Outbox::default();
        let mut q = Queue::default();
        for part in [&b"x"[..], b"yy", b"zzz"] {
            q.push(&mut ob, Chunk::Shared(Rc::from(part)));
        }
        assert!(q.flush(&mut ob, &mut sock).unwrap().done);
        drop(sock); // closes: the reader sees the end
        let mut got = Vec::new();
        let mut client = client;
        client.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"one|abcdef|xyyzzz");
    }
}
