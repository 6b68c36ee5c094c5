//! TLS for every client of loadgen (`--tls`): rustls (ring provider) driven by loadgen's own
//! loops, no async runtime. `Stream` wraps a non-blocking mio socket, plain or TLS, with the
//! read/write shape of a socket; `Blocking` does the same for the set-up HTTP client.
//!
//! `--tls` alone accepts any server certificate (its handshake signature is still checked):
//! loadgen only talks to loopback (`--addr` must be 127.0.0.0/8), where the point is the
//! server's cost, not who it is. `--tls-ca PATH` (implies `--tls`) verifies the server against
//! that PEM CA instead. Full handshakes only: the client keeps no session for resumption.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::io::{self, ErrorKind, Read, Write};
use std::net::Ipv4Addr;
use std::sync::{Arc, OnceLock};

struct Settings {
    config: Arc<ClientConfig>,
    /// The flags, for child processes (`idle` re-executes itself).
    args: Vec<String>,
}

static SETTINGS: OnceLock<Option<Settings>> = OnceLock::new();

/// Reads `--tls` and `--tls-ca PATH` once for the whole process (before any connection).
pub fn init(a: &crate::args::Args) -> Result<(), String> {
    let ca = a.opt_str("tls-ca")?;
    let on = a.flag("tls") || ca.is_some();
    let settings = if on {
        let (config, args) = match ca {
            Some(path) => (client_config(Some(&path))?, vec!["--tls-ca".into(), path]),
            None => (client_config(None)?, vec!["--tls".into()]),
        };
        Some(Settings {
            config: Arc::new(config),
            args,
        })
    } else {
        None
    };
    SETTINGS
        .set(settings)
        .map_err(|_| "TLS settings initialised twice".to_string())
}

fn settings() -> Option<&'static Settings> {
    SETTINGS.get().and_then(Option::as_ref)
}

pub fn enabled() -> bool {
    settings().is_some()
}

/// The TLS flags to hand to a child process.
pub fn child_args() -> Vec<String> {
    settings().map(|s| s.args.clone()).unwrap_or_default()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn client_config(ca: Option<&str>) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let mut config = match ca {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            let certs =
                CertificateDer::pem_file_iter(path).map_err(|e| format!("--tls-ca {path}: {e}"))?;
            for c in certs {
                let c = c.map_err(|e| format!("--tls-ca {path}: {e}"))?;
                roots.add(c).map_err(|e| format!("--tls-ca {path}: {e}"))?;
            }
            if roots.is_empty() {
                return Err(format!("--tls-ca {path}: no certificate in it"));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(
                provider().signature_verification_algorithms,
            )))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Accepts any certificate chain, but checks the handshake signature with its key (so the
/// handshake costs the server what it costs with a verifying client).
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

fn new_connection(ip: Ipv4Addr) -> io::Result<Option<Box<ClientConnection>>> {
    let Some(s) = settings() else {
        return Ok(None);
    };
    let name = ServerName::IpAddress(std::net::IpAddr::V4(ip).into());
    let mut c = ClientConnection::new(s.config.clone(), name).map_err(io::Error::other)?;
    // loadgen's own queues are bounded; rustls must take all of a write (a short write would
    // look like a closed socket to the callers).
    c.set_buffer_limit(None);
    Ok(Some(Box::new(c)))
}

/// A non-blocking client socket, plain or TLS (when `--tls` was given).
pub struct Stream {
    pub tcp: mio::net::TcpStream,
    tls: Option<Box<ClientConnection>>,
}

impl Stream {
    /// Wraps a (connecting) socket to `ip`; TLS if `--tls` was given.
    pub fn new(tcp: mio::net::TcpStream, ip: Ipv4Addr) -> io::Result<Stream> {
        Ok(Stream {
            tcp,
            tls: new_connection(ip)?,
        })
    }

    pub fn plain(tcp: mio::net::TcpStream) -> Stream {
        Stream { tcp, tls: None }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// TLS records waiting for the socket to take them.
    pub fn tls_pending(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Writes what rustls has queued until the socket would block.
    pub fn push(&mut self) -> io::Result<()> {
        match self.tls.as_mut() {
            None => Ok(()),
            Some(tls) => push(tls, &mut self.tcp),
        }
    }
}

impl Read for Stream {
    /// Plain: the socket's read. TLS: decrypted bytes; `WouldBlock` only once the socket would
    /// block (so an edge-triggered caller may read until then); `Ok(0)` at the end (with or
    /// without close_notify).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else {
            return self.tcp.read(buf);
        };
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            // Ok(0) is the end of the stream: the reader says so on the next round.
            tls.read_tls(&mut self.tcp)?;
            let r = tls.process_new_packets();
            // Handshake answers (and alerts) go out before anything else.
            let pushed = push(tls, &mut self.tcp);
            r.map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
            pushed?;
        }
    }
}

impl Write for Stream {
    /// Plain: the socket's write. TLS: rustls takes it all (encrypted now, sent as the socket
    /// allows; what it cannot take yet waits in rustls, see `tls_pending` and `push`).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else {
            return self.tcp.write(buf);
        };
        let n = tls.writer().write(buf)?;
        push(tls, &mut self.tcp)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.tls {
            None => self.tcp.flush(),
            Some(_) => self.push(),
        }
    }
}

fn push(tls: &mut ClientConnection, tcp: &mut mio::net::TcpStream) -> io::Result<()> {
    while tls.wants_write() {
        match tls.write_tls(tcp) {
            Ok(0) => return Err(io::Error::new(ErrorKind::WriteZero, "write returned 0")),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A blocking client socket for the set-up HTTP client, plain or TLS.
pub enum Blocking {
    Plain(std::net::TcpStream),
    Tls(Box<rustls::StreamOwned<ClientConnection, std::net::TcpStream>>),
}

impl Blocking {
    pub fn new(tcp: std::net::TcpStream, ip: Ipv4Addr) -> io::Result<Blocking> {
        Ok(match new_connection(ip)? {
            None => Blocking::Plain(tcp),
            Some(c) => Blocking::Tls(Box::new(rustls::StreamOwned::new(*c, tcp))),
        })
    }
}

impl Read for Blocking {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Blocking::Plain(s) => s.read(buf),
            Blocking::Tls(s) => match s.read(buf) {
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => Ok(0),
                r => r,
            },
        }
    }
}

impl Write for Blocking {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Blocking::Plain(s) => s.write(buf),
            Blocking::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Blocking::Plain(s) => s.flush(),
            Blocking::Tls(s) => s.flush(),
        }
    }
}
