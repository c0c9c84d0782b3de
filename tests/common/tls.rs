//! Test certificates made at test time with the `openssl` CLI, and a nonblocking
//! rustls client for exact-byte checks over TLS.
//!
//! [`TestPki`] makes, in a temporary folder removed on drop: a root CA (`ca.pem`,
//! which clients trust), an intermediate CA, and a server certificate for
//! `localhost`, 127.0.0.1 and ::1 signed by the intermediate; `server.pem` holds the
//! server's certificate then the intermediate (a chain), `server.key` its key
//! (PKCS#8).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use gstrsmultifdsink::tls::ALPN_HTTP11;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};

const OPENSSL_CONF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[leaf_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1,IP:::1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

pub struct TestPki {
    pub dir: PathBuf,
    /// The root CA clients trust.
    pub ca: PathBuf,
    /// The server's certificate, then the intermediate's.
    pub cert: PathBuf,
    /// The server's key, PKCS#8.
    pub key: PathBuf,
}

impl TestPki {
    pub fn new() -> TestPki {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "rsmfd-pki-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("openssl.cnf"), OPENSSL_CONF).unwrap();
        let pki = TestPki {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            dir,
        };
        pki.new_key("ca.key", "EC");
        pki.openssl(&[
            "req",
            "-config",
            "openssl.cnf",
            "-new",
            "-x509",
            "-key",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=rsmultifdsink test root CA",
            "-extensions",
            "ca_ext",
        ]);
        pki.signed(
            "int",
            "/CN=rsmultifdsink test intermediate CA",
            "ca",
            "ca_ext",
            "EC",
        );
        pki.signed("leaf", "/CN=localhost", "int", "leaf_ext", "EC");
        pki.concat("server.pem", &["leaf.pem", "int.pem"]);
        std::fs::copy(pki.path("leaf.key"), &pki.key).unwrap();
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("openssl (scripts/setup-debian installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `NAME.key` (a new key of `algorithm`, PKCS#8) and `NAME.pem`, a certificate
    /// for `subject` with the extensions of `section`, signed by `issuer`.
    fn signed(&self, name: &str, subject: &str, issuer: &str, section: &str, algorithm: &str) {
        static SERIAL: AtomicU32 = AtomicU32::new(2);
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let pem = format!("{name}.pem");
        self.new_key(&key, algorithm);
        self.openssl(&[
            "req",
            "-config",
            "openssl.cnf",
            "-new",
            "-key",
            &key,
            "-out",
            &csr,
            "-subj",
            subject,
        ]);
        let serial = SERIAL.fetch_add(1, Ordering::SeqCst).to_string();
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &format!("{issuer}.pem"),
            "-CAkey",
            &format!("{issuer}.key"),
            "-set_serial",
            &serial,
            "-days",
            "2",
            "-out",
            &pem,
            "-extfile",
            "openssl.cnf",
            "-extensions",
            section,
        ]);
    }

    /// A new private key (PKCS#8) in the file `out`: RSA 2048 for `"RSA"`, else EC
    /// P-256.
    fn new_key(&self, out: &str, algorithm: &str) {
        let (algorithm, option) = if algorithm == "RSA" {
            ("RSA", "rsa_keygen_bits:2048")
        } else {
            ("EC", "ec_paramgen_curve:P-256")
        };
        self.openssl(&[
            "genpkey",
            "-algorithm",
            algorithm,
            "-pkeyopt",
            option,
            "-out",
            out,
        ]);
    }

    fn concat(&self, out: &str, parts: &[&str]) {
        let mut all = Vec::new();
        for p in parts {
            all.extend(std::fs::read(self.path(p)).unwrap());
        }
        std::fs::write(self.path(out), all).unwrap();
    }

    /// The server's key in SEC1 form ("EC PRIVATE KEY").
    pub fn sec1_key(&self) -> PathBuf {
        self.traditional("server.key", "server-sec1.key")
    }

    /// A second server certificate (chain) with an RSA key in PKCS#1 form ("RSA
    /// PRIVATE KEY"): (certificate file, key file).
    pub fn rsa_pkcs1(&self) -> (PathBuf, PathBuf) {
        self.signed("rsa", "/CN=localhost", "int", "leaf_ext", "RSA");
        self.concat("rsa-chain.pem", &["rsa.pem", "int.pem"]);
        (
            self.path("rsa-chain.pem"),
            self.traditional("rsa.key", "rsa-pkcs1.key"),
        )
    }

    /// The key in the file `key` rewritten in its algorithm's own ("traditional")
    /// form, SEC1 for EC, PKCS#1 for RSA, to the file `out`; returns its path.
    fn traditional(&self, key: &str, out: &str) -> PathBuf {
        self.openssl(&["pkey", "-in", key, "-traditional", "-out", out]);
        self.path(out)
    }

    /// A key that belongs to no certificate here.
    pub fn other_key(&self) -> PathBuf {
        self.new_key("other.key", "EC");
        self.path("other.key")
    }

    /// A client that trusts only the test root CA, offering ALPN http/1.1.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        client_config_for(&self.ca)
    }

    /// The server's configuration from the test files.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        gstrsmultifdsink::tls::load_server_config(&self.cert, &self.key).unwrap()
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client that trusts only the CA certificates in `ca`, offering ALPN http/1.1.
pub fn client_config_for(ca: &std::path::Path) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Arc::new(config)
}

/// How a TLS stream ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// close_notify, then EOF: the server ended the stream cleanly.
    CloseNotify,
    /// EOF without close_notify (or TCP reset): the stream may be truncated.
    Unclean(String),
}

/// A rustls client on a nonblocking TCP socket, driven with poll, so a test can send
/// and receive at once without threads.
pub struct TlsClient {
    pub conn: ClientConnection,
    pub tcp: TcpStream,
    /// Plaintext received and not yet taken.
    received: Vec<u8>,
    ended: Option<Ending>,
}

impl TlsClient {
    /// Connects (TCP) and queues the ClientHello; nothing is exchanged yet.
    pub fn connect(addr: SocketAddr, config: Arc<ClientConfig>) -> TlsClient {
        let tcp = TcpStream::connect(addr).unwrap();
        Self::over(tcp, config)
    }

    /// TLS over an already connected socket.
    pub fn over(tcp: TcpStream, config: Arc<ClientConfig>) -> TlsClient {
        tcp.set_nonblocking(true).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        TlsClient {
            conn: ClientConnection::new(config, name).unwrap(),
            tcp,
            received: Vec::new(),
            ended: None,
        }
    }

    /// One round: writes what rustls has, waits up to `wait` for input, reads it.
    /// Panics on a TLS error.
    fn round(&mut self, wait: Duration) {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.tcp) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.ended
                        .get_or_insert(Ending::Unclean(format!("write: {e}")));
                    return;
                }
            }
        }
        if self.ended.is_some() {
            return;
        }
        let mut flags = PollFlags::POLLIN;
        if self.conn.wants_write() {
            flags |= PollFlags::POLLOUT;
        }
        let mut fds = [PollFd::new(self.tcp.as_fd(), flags)];
        let ms = wait.as_millis().min(1000) as u16;
        let _ = poll(&mut fds, PollTimeout::from(ms));
        loop {
            match self.conn.read_tls(&mut self.tcp) {
                Ok(0) => {
                    self.take_plaintext();
                    if self.ended.is_none() {
                        self.ended = Some(Ending::Unclean("EOF without close_notify".into()));
                    }
                    return;
                }
                Ok(_) => {
                    self.conn
                        .process_new_packets()
                        .expect("TLS error from the server");
                    self.take_plaintext();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.take_plaintext();
                    self.ended
                        .get_or_insert(Ending::Unclean(format!("read: {e}")));
                    return;
                }
            }
        }
    }

    fn take_plaintext(&mut self) {
        let mut buf = [0u8; 16384];
        loop {
            match self.conn.reader().read(&mut buf) {
                Ok(0) => {
                    self.ended.get_or_insert(Ending::CloseNotify);
                    return;
                }
                Ok(n) => self.received.extend_from_slice(&buf[..n]),
                Err(_) => return,
            }
        }
    }

    /// Finishes the handshake within `deadline`.
    pub fn handshake(&mut self, deadline: Duration) {
        let start = Instant::now();
        while self.conn.is_handshaking() {
            assert!(start.elapsed() < deadline, "TLS handshake did not finish");
            assert!(
                self.ended.is_none(),
                "closed during the handshake: {:?}",
                self.ended
            );
            self.round(Duration::from_millis(100));
        }
        // Our Finished: the server's handshake ends when it has it.
        self.round(Duration::ZERO);
    }

    /// Sends `data` while receiving; returns once everything is sent and `want`
    /// bytes arrived (all of them), within `deadline`.
    pub fn transfer(&mut self, data: &[u8], want: usize, deadline: Duration) -> Vec<u8> {
        let start = Instant::now();
        let mut sent = 0;
        while sent < data.len() || self.received.len() < want {
            assert!(
                start.elapsed() < deadline,
                "timed out: sent {sent} of {}, received {} of {want}",
                data.len(),
                self.received.len()
            );
            if sent < data.len() && !self.conn.wants_write() {
                let end = (sent + 65536).min(data.len());
                sent += self.conn.writer().write(&data[sent..end]).unwrap();
            }
            self.round(Duration::from_millis(50));
            assert!(
                self.ended.is_none() || self.received.len() >= want,
                "ended after {} of {want} bytes: {:?}",
                self.received.len(),
                self.ended
            );
        }
        std::mem::take(&mut self.received)
    }

    /// Reads exactly `n` bytes within `deadline`.
    pub fn read_exact(&mut self, n: usize, deadline: Duration) -> Vec<u8> {
        let mut got = self.transfer(&[], n, deadline);
        let rest = got.split_off(n);
        self.received = rest;
        got
    }

    /// Reads an HTTP response head (through the blank line) within `deadline`; what
    /// follows stays for the next read.
    pub fn read_head(&mut self, deadline: Duration) -> Vec<u8> {
        let start = Instant::now();
        loop {
            if let Some(end) = self.received.windows(4).position(|w| w == b"\r\n\r\n") {
                let rest = self.received.split_off(end + 4);
                return std::mem::replace(&mut self.received, rest);
            }
            assert!(
                start.elapsed() < deadline,
                "no response head: {:?}",
                String::from_utf8_lossy(&self.received)
            );
            assert!(
                self.ended.is_none(),
                "ended before the head: {:?}",
                self.ended
            );
            self.round(Duration::from_millis(50));
        }
    }

    /// Sends `data` (all of it) within `deadline`.
    pub fn send(&mut self, data: &[u8], deadline: Duration) {
        let kept = std::mem::take(&mut self.received);
        let got = self.transfer(data, 0, deadline);
        self.received = [kept, got].concat();
    }

    /// Whether the stream has ended (as far as read so far).
    pub fn ended(&self) -> Option<&Ending> {
        self.ended.as_ref()
    }

    /// Reads until the stream ends, within `deadline`: what arrived and how it ended.
    pub fn read_to_end(&mut self, deadline: Duration) -> (Vec<u8>, Ending) {
        let start = Instant::now();
        while self.ended.is_none() {
            assert!(
                start.elapsed() < deadline,
                "the stream did not end ({} bytes so far)",
                self.received.len()
            );
            self.round(Duration::from_millis(100));
        }
        (
            std::mem::take(&mut self.received),
            self.ended.clone().unwrap(),
        )
    }

    /// Sends close_notify and ends our side of TCP.
    pub fn close(&mut self) {
        self.conn.send_close_notify();
        self.round(Duration::ZERO);
        let _ = self.tcp.shutdown(std::net::Shutdown::Write);
    }
}

/// The bytes of a ClientHello a fresh client would send.
pub fn client_hello(config: Arc<ClientConfig>) -> Vec<u8> {
    let name = ServerName::try_from("localhost").unwrap();
    let mut conn = ClientConnection::new(config, name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// Reads `stream` until EOF (or a reset) within `deadline`; returns the bytes read
/// before it.
pub fn wait_eof(stream: &mut (impl Read + AsFd), deadline: Duration) -> Vec<u8> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_sub(start.elapsed());
        assert!(!left.is_zero(), "no EOF ({} bytes read)", got.len());
        let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
        let _ = poll(
            &mut fds,
            PollTimeout::from(left.as_millis().min(1000) as u16),
        );
        match stream.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(_) => return got,
        }
    }
}

/// Bytes `offset..offset + len` of a deterministic pattern that shows misplaced bytes.
pub fn pattern(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_right(13) as u8)
        .collect()
}
