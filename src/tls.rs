//! TLS on the listener (`--tls-cert`, `--tls-key`): a sans-IO layer over rustls's
//! unbuffered server connection, driven by the connection that holds it (`conn.rs`, on the
//! loop's behalf); it owns no socket, only writes to the writer it is handed.
//!
//! The loop owns the buffers. Ciphertext is read into its one read buffer and decrypted into one
//! loop-wide plaintext buffer ([`Scratch`]), which is then handed to the connection's state machine
//! exactly like plaintext input. Output stays plaintext in the connection's
//! [`Queue`](crate::outbox::Queue) (broadcast frames encoded once, shared by reference) until flush
//! time, when [`flush`] encrypts it batch by batch into one loop-wide ciphertext buffer and writes
//! it: encryption is per recipient by nature, serialisation and framing are not. A connection keeps
//! bytes of its own only for an incomplete TLS record (`inbuf`) and for ciphertext the kernel did
//! not take (`pending`); both are freed when empty, so an idle TLS connection holds rustls's
//! connection state (keys, sequence numbers) and nothing else.
//!
//! A later transform of the plaintext (permessage-deflate) slots in before `flush`: the queue
//! carries whatever bytes the connection should see, this layer only encrypts them.

#[cfg(feature = "tls")]
pub use imp::*;
#[cfg(not(feature = "tls"))]
pub use stub::*;

/// The plain HTTP answer to a plaintext request on the TLS port (written before closing).
pub const PLAIN_HTTP_ON_TLS: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n\
Content-Length: 71\r\nConnection: close\r\n\r\n{\"detail\":\"This port speaks TLS: use https:// and wss:// to reach it\"}\n";

#[cfg(feature = "tls")]
mod imp {
    use std::io::{self, IoSlice, Write};
    use std::path::PathBuf;
    use std::sync::Arc;

    use rustls::ServerConfig;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
    use rustls::unbuffered::{
        ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError,
        WriteTraffic,
    };

    use crate::outbox::{Flushed, Outbox, Queue};

    /// Plaintext encrypted per batch at flush time (four full records).
    const BATCH: usize = 4 * 16 * 1024;
    /// Most ciphertext kept for an incomplete record or handshake message (rustls accepts
    /// handshake messages up to 64 KiB; records are at most 16 KiB + 256 + 5).
    const MAX_INBUF: usize = 96 * 1024;

    /// The listener's TLS settings: the current certificate and key, reloadable.
    #[derive(Debug)]
    pub struct Acceptor {
        config: Arc<ServerConfig>,
        cert: PathBuf,
        key: PathBuf,
    }

    impl Acceptor {
        /// Reads the PEM certificate chain and private key; fails with a sentence.
        pub fn load(cert: &str, key: &str) -> Result<Acceptor, String> {
            let (cert, key) = (PathBuf::from(cert), PathBuf::from(key));
            Ok(Acceptor {
                config: server_config(&cert, &key)?,
                cert,
                key,
            })
        }

        /// Reads the files again; on any error the current pair stays in use. Connections
        /// already open keep the keys they negotiated; new handshakes use the new pair.
        pub fn reload(&mut self) -> Result<(), String> {
            self.config = server_config(&self.cert, &self.key)?;
            Ok(())
        }

        /// A new server-side TLS connection.
        pub fn session(&self) -> Result<Box<TlsSession>, String> {
            let conn = UnbufferedServerConnection::new(self.config.clone())
                .map_err(|e| format!("cannot start a TLS connection: {e}"))?;
            Ok(Box::new(TlsSession {
                conn,
                inbuf: Vec::new(),
                pending: Vec::new(),
                started: false,
                ready: false,
                close_sent: false,
            }))
        }
    }

    fn server_config(cert: &PathBuf, key: &PathBuf) -> Result<Arc<ServerConfig>, String> {
        let certs = CertificateDer::pem_file_iter(cert)
            .map_err(|e| format!("cannot read the certificate {}: {e}", cert.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("bad certificate file {}: {e}", cert.display()))?;
        if certs.is_empty() {
            return Err(format!("no certificate in {}", cert.display()));
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
        // ring: see the commit that chose it (build time, binary size, speed on this machine).
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS settings: {e}"))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| format!("certificate and key do not make a pair: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// Loop-wide buffers: decrypted input of the current read, ciphertext of the current write.
    pub struct Scratch {
        /// Plaintext decrypted from the current read (cleared before each read).
        pub plain: Vec<u8>,
        cipher: Vec<u8>,
    }

    impl std::fmt::Debug for Scratch {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Scratch(..)")
        }
    }

    impl std::fmt::Debug for TlsSession {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("TlsSession")
                .field("ready", &self.ready)
                .field("inbuf_bytes", &self.inbuf.len())
                .field("pending_bytes", &self.pending.len())
                .finish_non_exhaustive()
        }
    }

    impl std::fmt::Debug for RedisTls {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("RedisTls(..)")
        }
    }

    impl Default for Scratch {
        fn default() -> Self {
            Scratch {
                plain: Vec::new(),
                cipher: vec![0; BATCH + 1024],
            }
        }
    }

    /// Why a TLS connection ended, and what to send it (best effort) before closing.
    #[derive(Debug)]
    pub struct Failed {
        /// What went wrong, for the log (never key material or application data).
        pub reason: String,
        /// Ciphertext to send before closing (a TLS alert), possibly empty.
        pub last_words: Vec<u8>,
    }

    /// One connection's TLS state.
    pub struct TlsSession {
        pub(super) conn: UnbufferedServerConnection,
        /// Ciphertext of an incomplete record; empty (unallocated) otherwise.
        pub(super) inbuf: Vec<u8>,
        /// Ciphertext not yet taken by the socket; empty (unallocated) otherwise.
        pub(super) pending: Vec<u8>,
        /// Some bytes have arrived.
        started: bool,
        /// The handshake is complete: application data flows.
        ready: bool,
        close_sent: bool,
    }

    impl TlsSession {
        /// Handles ciphertext from the socket: decrypted application data is appended to
        /// `plain`, handshake output queued for the next flush.
        pub fn read(&mut self, data: &mut [u8], plain: &mut Vec<u8>) -> Result<(), Failed> {
            if !self.started && !data.is_empty() {
                self.started = true;
                // A TLS connection starts with a handshake record (22); a letter is a plain
                // HTTP request line sent to the wrong scheme: tell it so, in plain HTTP.
                if data[0].is_ascii_uppercase() {
                    return Err(Failed {
                        reason: "plaintext HTTP on the TLS port".into(),
                        last_words: super::PLAIN_HTTP_ON_TLS.to_vec(),
                    });
                }
            }
            if self.inbuf.is_empty() {
                let used = self.process(data, plain)?;
                if used < data.len() {
                    self.keep(&data[used..])?;
                }
            } else {
                if self.inbuf.len() + data.len() > MAX_INBUF {
                    return Err(too_large());
                }
                let mut buf = std::mem::take(&mut self.inbuf);
                buf.extend_from_slice(data);
                let used = self.process(&mut buf, plain)?;
                buf.drain(..used);
                if !buf.is_empty() {
                    self.inbuf = buf; // else dropped: an idle connection holds no buffer
                }
            }
            Ok(())
        }

        fn keep(&mut self, rest: &[u8]) -> Result<(), Failed> {
            if rest.len() > MAX_INBUF {
                return Err(too_large());
            }
            self.inbuf.extend_from_slice(rest);
            Ok(())
        }

        /// Runs rustls over `buf` until it needs more input; returns the bytes it used.
        fn process(&mut self, buf: &mut [u8], plain: &mut Vec<u8>) -> Result<usize, Failed> {
            let mut pos = 0;
            loop {
                let status = self.conn.process_tls_records(&mut buf[pos..]);
                let mut discard = status.discard;
                let mut stop = false;
                let mut error = None;
                match status.state {
                    Err(e) => error = Some(e.to_string()),
                    Ok(ConnectionState::ReadTraffic(mut r)) => {
                        while let Some(rec) = r.next_record() {
                            match rec {
                                Ok(rec) => {
                                    discard += rec.discard;
                                    plain.extend_from_slice(rec.payload);
                                }
                                Err(e) => {
                                    error = Some(e.to_string());
                                    break;
                                }
                            }
                        }
                    }
                    Ok(ConnectionState::EncodeTlsData(mut e)) => {
                        if let Err(e) = encode(&mut e, &mut self.pending) {
                            error = Some(e);
                        }
                    }
                    Ok(ConnectionState::TransmitTlsData(t)) => t.done(), // sent at flush, in order
                    Ok(ConnectionState::WriteTraffic(_)) => {
                        self.ready = true;
                        stop = true;
                    }
                    Ok(ConnectionState::BlockedHandshake) | Ok(ConnectionState::Closed) => {
                        stop = true
                    }
                    Ok(ConnectionState::PeerClosed) => {} // its FIN follows: read as EOF
                    Ok(_) => error = Some("unexpected TLS state (early data)".into()),
                }
                pos += discard;
                if let Some(e) = error {
                    let at = pos.min(buf.len());
                    return Err(self.fail(&e, &mut buf[at..]));
                }
                if stop {
                    return Ok(pos);
                }
            }
        }

        /// The connection is unusable: collect the alert rustls queued for the peer, if any.
        /// `rest` is the input after what rustls said to discard: rustls keeps positions into
        /// it (a shorter buffer would make it index out of bounds).
        ///
        /// `process` encodes every chunk rustls queues before it reads on, so what is queued
        /// now is at most the one fatal alert of this error: the first call hands it over and
        /// the collecting stops there. Calling again would make rustls read the bad record a
        /// second time and send a second fatal alert (a debug assertion in rustls). Only when
        /// the error queued nothing does a second call look once more.
        fn fail(&mut self, reason: &str, rest: &mut [u8]) -> Failed {
            let mut last_words = std::mem::take(&mut self.pending);
            for _ in 0..2 {
                match self.conn.process_tls_records(rest).state {
                    Ok(ConnectionState::EncodeTlsData(mut e)) => {
                        let _ = encode(&mut e, &mut last_words);
                        break;
                    }
                    Ok(ConnectionState::TransmitTlsData(t)) => {
                        t.done();
                        break;
                    }
                    Err(_) => {} // it may have queued its alert only now
                    Ok(_) => break,
                }
            }
            self.inbuf = Vec::new();
            Failed {
                reason: reason.to_string(),
                last_words,
            }
        }

        /// Ciphertext is waiting for the socket.
        pub fn wants_write(&self) -> bool {
            !self.pending.is_empty()
        }

        /// Ciphertext bytes waiting for the socket (counted against `--max-output-queue`).
        pub fn queued(&self) -> usize {
            self.pending.len()
        }

        /// The handshake is not complete yet: no application data flows.
        pub fn handshaking(&self) -> bool {
            !self.ready
        }

        /// Writes pending ciphertext; `true` when none is left.
        fn write_pending(&mut self, w: &mut impl Write) -> io::Result<bool> {
            let mut done = 0;
            let result = loop {
                if done == self.pending.len() {
                    break Ok(true);
                }
                match w.write(&self.pending[done..]) {
                    Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            if done == self.pending.len() {
                self.pending = Vec::new();
            } else {
                self.pending.drain(..done);
            }
            result
        }

        /// Runs rustls until it can encrypt, then calls `f` with the encrypting state and the
        /// pending buffer; `None` while the handshake is not complete (or after close).
        fn write_traffic<R>(
            &mut self,
            f: impl FnOnce(&mut WriteTraffic<'_, ServerConnectionData>, &mut Vec<u8>) -> R,
        ) -> io::Result<Option<R>> {
            let mut buf = std::mem::take(&mut self.inbuf);
            let mut f = Some(f);
            let mut pos = 0;
            let result = loop {
                let status = self.conn.process_tls_records(&mut buf[pos..]);
                let discard = status.discard;
                let out = match status.state {
                    Err(e) => Some(Err(io::Error::other(e))),
                    Ok(ConnectionState::WriteTraffic(mut w)) => {
                        Some(Ok(f.take().map(|f| f(&mut w, &mut self.pending))))
                    }
                    Ok(ConnectionState::EncodeTlsData(mut e)) => encode(&mut e, &mut self.pending)
                        .err()
                        .map(|e| Err(io::Error::other(e))),
                    Ok(ConnectionState::TransmitTlsData(t)) => {
                        t.done();
                        None
                    }
                    Ok(ConnectionState::PeerClosed) => None,
                    Ok(ConnectionState::BlockedHandshake) | Ok(ConnectionState::Closed) => {
                        Some(Ok(None))
                    }
                    // Input is always processed when it is read, so no record waits here.
                    Ok(_) => Some(Err(io::Error::other("unexpected TLS state at write"))),
                };
                pos += discard;
                if let Some(r) = out {
                    break r;
                }
            };
            buf.drain(..pos.min(buf.len()));
            if !buf.is_empty() {
                self.inbuf = buf;
            }
            result
        }

        /// Encrypts `plain` into `cipher` (grown if needed); returns the ciphertext length.
        fn encrypt(&mut self, plain: &[u8], cipher: &mut Vec<u8>) -> io::Result<usize> {
            let r = self.write_traffic(|w, _| match w.encrypt(plain, cipher) {
                Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                    cipher.resize(required_size, 0);
                    w.encrypt(plain, cipher)
                }
                other => other,
            })?;
            match r {
                Some(Ok(n)) => Ok(n),
                Some(Err(e)) => Err(io::Error::other(e)),
                None => Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "TLS handshake not complete",
                )),
            }
        }

        /// Queues a close_notify alert (once, after the handshake).
        fn close_notify(&mut self) -> io::Result<()> {
            if !self.ready || self.close_sent {
                return Ok(());
            }
            self.close_sent = true;
            let r = self.write_traffic(|w, pending| {
                let start = pending.len();
                let need = match w.queue_close_notify(&mut []) {
                    Ok(_) => return Ok(()),
                    Err(EncryptError::InsufficientSize(s)) => s.required_size,
                    Err(e) => return Err(e),
                };
                pending.resize(start + need, 0);
                w.queue_close_notify(&mut pending[start..]).map(|_| ())
            })?;
            match r {
                Some(Err(e)) => Err(io::Error::other(e)),
                _ => Ok(()),
            }
        }
    }

    /// Cluster mode's `rediss://` client settings: the CAs Redis's certificate must chain to.
    #[derive(Debug)]
    pub struct RedisTlsConfig(Arc<rustls::ClientConfig>);

    /// Where Debian, Fedora and Alpine (and most others) keep the system's CA bundle.
    const CA_BUNDLES: &[&str] = &[
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ];

    impl RedisTlsConfig {
        /// `ca`: a PEM file of CA certificates (`--redis-ca`); else `SSL_CERT_FILE` or the
        /// system's bundle.
        pub fn load(ca: Option<&str>) -> Result<RedisTlsConfig, String> {
            let path = match ca {
                Some(p) => PathBuf::from(p),
                None => std::env::var_os("SSL_CERT_FILE")
                    .map(PathBuf::from)
                    .or_else(|| CA_BUNDLES.iter().map(PathBuf::from).find(|p| p.exists()))
                    .ok_or("rediss://: no system CA bundle found; name one with --redis-ca")?,
            };
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(&path)
                .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("bad CA file {}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("no usable CA certificate in {}", path.display()));
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("TLS settings: {e}"))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Ok(RedisTlsConfig(Arc::new(config)))
        }

        /// A client connection to `host` (its certificate must name it).
        pub fn connect(&self, host: &str) -> Result<RedisTls, String> {
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| format!("rediss://: {host:?} is no valid server name: {e}"))?;
            let conn = rustls::ClientConnection::new(self.0.clone(), name)
                .map_err(|e| format!("rediss://: {e}"))?;
            Ok(RedisTls { conn })
        }
    }

    /// The one TLS connection to Redis: rustls's buffered client (one per process, so its
    /// buffers cost nothing worth the unbuffered API's bookkeeping).
    pub struct RedisTls {
        conn: rustls::ClientConnection,
    }

    impl RedisTls {
        /// Ciphertext from the socket; Redis's bytes are appended to `plain`.
        pub fn read(&mut self, mut cipher: &[u8], plain: &mut Vec<u8>) -> Result<(), String> {
            use std::io::Read;
            while !cipher.is_empty() {
                self.conn.read_tls(&mut cipher).map_err(|e| e.to_string())?;
                let state = self.conn.process_new_packets().map_err(|e| e.to_string())?;
                let n = state.plaintext_bytes_to_read();
                let start = plain.len();
                plain.resize(start + n, 0);
                self.conn
                    .reader()
                    .read_exact(&mut plain[start..])
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        }

        /// Takes what rustls will buffer of `data` and writes what ciphertext the socket
        /// takes; `WouldBlock` when it took nothing.
        pub fn send(&mut self, data: &[u8], sock: &mut impl Write) -> io::Result<usize> {
            let n = if data.is_empty() {
                0
            } else {
                self.conn.writer().write(data)?
            };
            self.flush(sock)?;
            if n == 0 && !data.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        }

        /// Writes pending ciphertext (handshake, records) until done or the socket is full.
        pub fn flush(&mut self, sock: &mut impl Write) -> io::Result<()> {
            while self.conn.wants_write() {
                match self.conn.write_tls(sock) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }
    }

    fn too_large() -> Failed {
        Failed {
            reason: "a TLS record or handshake message is too large".into(),
            last_words: Vec::new(),
        }
    }

    fn encode(
        e: &mut EncodeTlsData<'_, ServerConnectionData>,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        let start = out.len();
        match e.encode(&mut []) {
            Ok(_) | Err(EncodeError::AlreadyEncoded) => Ok(()),
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                out.resize(start + required_size, 0);
                e.encode(&mut out[start..])
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Writes a TLS connection's output: ciphertext still pending first, then its queue,
    /// encrypted batch by batch into the loop-wide buffer; a closing connection gets a
    /// close_notify after its last byte. `done` only when nothing at all is left.
    pub fn flush(
        s: &mut TlsSession,
        q: &mut Queue,
        ob: &mut Outbox,
        stream: &mut impl Write,
        scratch: &mut Scratch,
        closing: bool,
    ) -> io::Result<Flushed> {
        if !s.write_pending(stream)? {
            q.keep(ob);
            return Ok(Flushed {
                written: 0,
                done: false,
            });
        }
        let mut f = q.flush(
            ob,
            &mut Writer {
                s: &mut *s,
                stream: &mut *stream,
                scratch,
            },
        )?;
        if f.done && closing && s.pending.is_empty() {
            s.close_notify()?;
            s.write_pending(stream)?;
        }
        f.done &= s.pending.is_empty();
        Ok(f)
    }

    /// A `Write` for [`Queue::flush`]: takes plaintext, writes ciphertext. It accepts all it
    /// is given unless the socket fills up (what the socket did not take of an encrypted batch
    /// waits in `pending`), so the queue's "short write means full socket" rule holds.
    struct Writer<'a, W: Write> {
        s: &'a mut TlsSession,
        stream: &'a mut W,
        scratch: &'a mut Scratch,
    }

    impl<W: Write> Write for Writer<'_, W> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }

        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if !self.s.write_pending(self.stream)? {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let Scratch { plain, cipher } = &mut *self.scratch;
            let (mut i, mut off, mut consumed) = (0, 0, 0);
            loop {
                plain.clear();
                while i < bufs.len() && plain.len() < BATCH {
                    let b = &bufs[i][off..];
                    let take = b.len().min(BATCH - plain.len());
                    plain.extend_from_slice(&b[..take]);
                    if take == b.len() {
                        i += 1;
                        off = 0;
                    } else {
                        off += take;
                    }
                }
                if plain.is_empty() {
                    return Ok(consumed);
                }
                let n = self.s.encrypt(plain, cipher)?;
                consumed += plain.len();
                let mut done = 0;
                while done < n {
                    match self.stream.write(&cipher[done..n]) {
                        Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(k) => done += k,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                if done < n {
                    // Encrypted is sent: the rest waits for the socket, ahead of anything else.
                    self.s.pending.extend_from_slice(&cipher[done..n]);
                    return Ok(consumed);
                }
            }
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}

/// The plaintext build: no TLS type can exist, so every TLS branch of the loop is dead code.
#[cfg(not(feature = "tls"))]
mod stub {
    use std::io::{self, Write};

    use crate::outbox::{Flushed, Outbox, Queue};

    /// Uninhabited: no certificate can be loaded without the `tls` feature.
    #[derive(Debug)]
    pub enum Acceptor {}

    impl Acceptor {
        /// Always refuses: this build has no TLS.
        pub fn load(_cert: &str, _key: &str) -> Result<Acceptor, String> {
            Err("this chatloop was built without TLS (cargo feature `tls`)".into())
        }
        /// Never called (no `Acceptor` exists).
        pub fn reload(&mut self) -> Result<(), String> {
            match *self {}
        }
        /// Never called (no `Acceptor` exists).
        pub fn session(&self) -> Result<Box<TlsSession>, String> {
            match *self {}
        }
    }

    /// The loop-wide buffers of the TLS build; here only the (always empty) plaintext one.
    #[derive(Debug, Default)]
    pub struct Scratch {
        /// Never written in this build.
        pub plain: Vec<u8>,
    }

    /// Why a TLS connection ended (never made in this build).
    #[derive(Debug)]
    pub struct Failed {
        /// What went wrong.
        pub reason: String,
        /// Ciphertext to send before closing.
        pub last_words: Vec<u8>,
    }

    /// Uninhabited: no connection is TLS in this build.
    #[derive(Debug)]
    pub enum TlsSession {}

    impl TlsSession {
        /// Never called (no `TlsSession` exists).
        pub fn read(&mut self, _data: &mut [u8], _plain: &mut Vec<u8>) -> Result<(), Failed> {
            match *self {}
        }
        /// Never called (no `TlsSession` exists).
        pub fn wants_write(&self) -> bool {
            match *self {}
        }
        /// Never called (no `TlsSession` exists).
        pub fn queued(&self) -> usize {
            match *self {}
        }
        /// Never called (no `TlsSession` exists).
        pub fn handshaking(&self) -> bool {
            match *self {}
        }
    }

    /// Uninhabited: `rediss://` is refused in this build.
    #[derive(Debug)]
    pub enum RedisTlsConfig {}

    impl RedisTlsConfig {
        /// Always refuses: this build has no TLS.
        pub fn load(_ca: Option<&str>) -> Result<RedisTlsConfig, String> {
            Err("rediss://: this chatloop was built without TLS (cargo feature `tls`)".into())
        }
        /// Never called (no `RedisTlsConfig` exists).
        pub fn connect(&self, _host: &str) -> Result<RedisTls, String> {
            match *self {}
        }
    }

    /// Uninhabited: no Redis link is TLS in this build.
    #[derive(Debug)]
    pub enum RedisTls {}

    impl RedisTls {
        /// Never called (no `RedisTls` exists).
        pub fn read(&mut self, _cipher: &[u8], _plain: &mut Vec<u8>) -> Result<(), String> {
            match *self {}
        }
        /// Never called (no `RedisTls` exists).
        pub fn send(&mut self, _data: &[u8], _sock: &mut impl Write) -> io::Result<usize> {
            match *self {}
        }
        /// Never called (no `RedisTls` exists).
        pub fn flush(&mut self, _sock: &mut impl Write) -> io::Result<()> {
            match *self {}
        }
    }

    /// Never called (no `TlsSession` exists).
    pub fn flush(
        s: &mut TlsSession,
        _q: &mut Queue,
        _ob: &mut Outbox,
        _stream: &mut impl Write,
        _scratch: &mut Scratch,
        _closing: bool,
    ) -> io::Result<Flushed> {
        match *s {}
    }
}
#[cfg(all(test, feature = "tls"))]
mod tests {
    use std::io::{self, Read, Write};
    use std::process::Command;
    use std::rc::Rc;
    use std::sync::Arc;

    use rustls::pki_types::ServerName;
    use rustls::pki_types::pem::PemObject;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    use super::*;
    use crate::outbox::{Chunk, Outbox, Queue, Sink};

    /// A self-signed pair made with the system's openssl, and a client that trusts it.
    fn setup(name: &str) -> (Acceptor, Arc<ClientConfig>) {
        let dir =
            std::env::temp_dir().join(format!("chatloop-tls-unit-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let out = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
            .args(["-addext", "subjectAltName=DNS:localhost"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let acceptor = Acceptor::load(cert.to_str().unwrap(), key.to_str().unwrap()).unwrap();
        let mut roots = RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_file_iter(&cert).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let _ = std::fs::remove_dir_all(&dir);
        let client =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        (acceptor, Arc::new(client))
    }

    struct Pair {
        server: Box<TlsSession>,
        client: ClientConnection,
        queue: Queue,
        outbox: Outbox,
        scratch: Scratch,
    }

    impl Pair {
        fn new(name: &str) -> Pair {
            let (acceptor, client) = setup(name);
            Pair {
                server: acceptor.session().unwrap(),
                client: ClientConnection::new(client, ServerName::try_from("localhost").unwrap())
                    .unwrap(),
                queue: Queue::default(),
                outbox: Outbox::default(),
                scratch: Scratch::default(),
            }
        }

        /// Client to server, `chunk` bytes per read; returns the plaintext the server got.
        fn client_sends(&mut self, chunk: usize) -> Vec<u8> {
            let mut wire = Vec::new();
            while self.client.wants_write() {
                self.client.write_tls(&mut wire).unwrap();
            }
            let mut plain = Vec::new();
            for piece in wire.chunks_mut(chunk) {
                self.server.read(piece, &mut plain).unwrap();
            }
            plain
        }

        /// Server to client through a socket that takes `room` bytes; `done` of the flush.
        fn server_sends(&mut self, room: usize, closing: bool) -> (bool, Vec<u8>) {
            let mut sink = Sink {
                data: Vec::new(),
                room,
                calls: 0,
            };
            let f = flush(
                &mut self.server,
                &mut self.queue,
                &mut self.outbox,
                &mut sink,
                &mut self.scratch,
                closing,
            )
            .unwrap();
            self.outbox.end_round();
            let mut rd = &sink.data[..];
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !rd.is_empty() {
                self.client.read_tls(&mut rd).unwrap();
                self.client.process_new_packets().unwrap();
                while let Ok(n) = self.client.reader().read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
            }
            (f.done, got)
        }

        fn handshake(&mut self, chunk: usize) {
            for _ in 0..10 {
                assert!(self.client_sends(chunk).is_empty());
                self.server_sends(usize::MAX, false);
                if !self.client.is_handshaking() && !self.server.handshaking() {
                    return;
                }
            }
            panic!("no handshake");
        }
    }

    #[test]
    fn records_split_anywhere_decrypt_and_an_idle_session_holds_no_buffer() {
        let mut p = Pair::new("split");
        p.handshake(1); // the handshake fed one byte at a time
        assert_eq!(p.server.conn.alpn_protocol(), None); // the client offered none
        p.client
            .writer()
            .write_all(b"GET /health HTTP/1.1")
            .unwrap();
        p.client.writer().write_all(b"\r\n\r\n").unwrap();
        assert_eq!(p.client_sends(3), b"GET /health HTTP/1.1\r\n\r\n");
        assert_eq!(
            p.server.inbuf.capacity(),
            0,
            "a complete record leaves no buffer"
        );
        assert_eq!(
            p.server.pending.capacity(),
            0,
            "written ciphertext leaves no buffer"
        );
        assert_eq!(p.server.queued(), 0);
    }

    #[test]
    fn shared_frames_are_encrypted_at_flush_and_unsent_ciphertext_is_counted() {
        let mut p = Pair::new("flush");
        p.handshake(4096);
        let frame: crate::protocol::Frame = Rc::from(&b"shared frame"[..]);
        let big = vec![b'x'; 100_000]; // more than one batch: several records
        p.queue.push(&mut p.outbox, Chunk::Shared(frame.clone()));
        p.queue.push(&mut p.outbox, Chunk::Owned(big.clone()));
        // The socket takes 1000 bytes: what was encrypted and not taken waits, counted.
        let (done, got) = p.server_sends(1000, false);
        assert!(!done);
        assert!(p.server.queued() > 0);
        assert_eq!(
            Rc::strong_count(&frame),
            1,
            "the frame was encrypted, not copied"
        );
        let mut all = got;
        for _ in 0..100 {
            let (done, got) = p.server_sends(50_000, false);
            all.extend_from_slice(&got);
            if done {
                break;
            }
        }
        assert_eq!(all.len(), 12 + big.len());
        assert_eq!(&all[..12], b"shared frame");
        assert!(all[12..] == big[..]);
        assert_eq!(p.server.queued(), 0);
        assert_eq!(p.server.pending.capacity(), 0);
        // Closing: a close_notify follows the last byte.
        p.queue.push(&mut p.outbox, Chunk::Static(b"bye"));
        let (done, got) = p.server_sends(usize::MAX, true);
        assert!(done);
        assert_eq!(got, b"bye");
        assert!(
            matches!(p.client.reader().read(&mut [0u8; 8]), Ok(0)),
            "no close_notify"
        );
    }

    #[test]
    fn output_before_the_handshake_is_refused_not_sent_in_clear() {
        let mut p = Pair::new("early");
        p.client_sends(4096);
        p.queue.push(
            &mut p.outbox,
            Chunk::Static(b"HTTP/1.1 408 Request Timeout\r\n\r\n"),
        );
        let mut sink = Sink {
            data: Vec::new(),
            room: usize::MAX,
            calls: 0,
        };
        let r = flush(
            &mut p.server,
            &mut p.queue,
            &mut p.outbox,
            &mut sink,
            &mut p.scratch,
            true,
        );
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::NotConnected);
        assert!(!sink.data.windows(8).any(|w| w == b"HTTP/1.1"));
    }

    #[test]
    fn plaintext_http_and_garbage_fail_with_last_words() {
        let (acceptor, _) = setup("garbage");
        let mut plain = Vec::new();
        let f = acceptor
            .session()
            .unwrap()
            .read(&mut b"GET / HTTP/1.1\r\n\r\n".to_vec(), &mut plain)
            .unwrap_err();
        assert_eq!(f.last_words, PLAIN_HTTP_ON_TLS);
        let text = std::str::from_utf8(PLAIN_HTTP_ON_TLS).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{text}"
        );
        // A record too large to be TLS: an alert record (type 21) goes back.
        let f = acceptor
            .session()
            .unwrap()
            .read(&mut b"\x16\x03\x01\xff\xff".to_vec(), &mut plain)
            .unwrap_err();
        assert_eq!(f.last_words.first(), Some(&21), "{f:?}");
        // A handshake record that decodes to nothing.
        assert!(
            acceptor
                .session()
                .unwrap()
                .read(&mut b"\x16\x03\x01\x00\x05hello".to_vec(), &mut plain)
                .is_err()
        );
        assert!(plain.is_empty());
    }
}
