//! Test certificates made with the system's `openssl`: a CA in a temporary directory of its
//! own and leaves for 127.0.0.1 and localhost signed by it (shared by the TLS tests).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};

/// A test CA in a directory of its own, removed when dropped.
pub struct Pki {
    /// Its directory (removed on drop).
    pub dir: PathBuf,
}

/// Runs the system's `openssl` (Debian package `openssl`), failing the test on an error.
pub fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl req` with a new P-256 key written to `key`: `first` before the key options,
/// `rest` after them, the subject's common name last.
fn new_key(first: &[&str], key: &Path, rest: &[&str], cn: &str) {
    let mut args = vec!["req"];
    args.extend_from_slice(first);
    args.extend_from_slice(&[
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ]);
    args.extend_from_slice(&["-keyout", key.to_str().unwrap()]);
    args.extend_from_slice(rest);
    let subject = format!("/CN={cn}");
    args.extend_from_slice(&["-subj", &subject]);
    openssl(&args);
}

impl Pki {
    /// A new CA (P-256, two days) in a fresh temporary directory named after `name`.
    pub fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("chatloop-tls-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let p = Pki { dir };
        let (key, cert) = (p.path("ca.key"), p.path("ca.pem"));
        new_key(
            &["-x509"],
            &key,
            &["-out", cert.to_str().unwrap(), "-days", "2"],
            "chatloop test CA",
        );
        p
    }

    /// A file in the CA's directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// A leaf for 127.0.0.1 and localhost signed by the CA: (certificate, key) paths.
    pub fn leaf(&self, name: &str) -> (PathBuf, PathBuf) {
        let (key, csr, cert, ext) = (
            self.path(&format!("{name}.key")),
            self.path(&format!("{name}.csr")),
            self.path(&format!("{name}.pem")),
            self.path(&format!("{name}.ext")),
        );
        fs::write(
            &ext,
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        new_key(&["-new"], &key, &["-out", csr.to_str().unwrap()], name);
        openssl(&[
            "x509",
            "-req",
            "-in",
            csr.to_str().unwrap(),
            "-CA",
            self.path("ca.pem").to_str().unwrap(),
            "-CAkey",
            self.path("ca.key").to_str().unwrap(),
            "-set_serial",
            &format!(
                "{}",
                1000 + name.len() as u64 * 7 + name.as_bytes()[0] as u64
            ),
            "-days",
            "2",
            "-extfile",
            ext.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ]);
        (cert, key)
    }

    /// A client that trusts the CA and offers ALPN `http/1.1`, as browsers do.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client_config_with(rustls::crypto::ring::default_provider())
    }

    /// The same with another crypto provider.
    pub fn client_config_with(
        &self,
        provider: rustls::crypto::CryptoProvider,
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(self.path("ca.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let mut c = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(c)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}
