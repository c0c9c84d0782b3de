// SPDX-License-Identifier: MPL-2.0

//! HTTPS for `rstcpserversink` (issue 11): a TLS terminator in plain Rust, so the
//! rest of the server and the engine stay fd-based and never see TLS.
//!
//! [`Terminator::wrap`] takes an accepted TCP connection and returns the other end
//! of a socketpair that behaves like the client's socket in plaintext: the server
//! reads the request from it, answers on it and hands it to the engine as any
//! client fd. One thread per terminator, with its own epoll, serves every wrapped
//! connection: it runs the handshakes (nonblocking, each with a deadline, so many of
//! them never wait on each other), then copies both ways, decrypting what the
//! viewer sends into the socketpair and encrypting what the engine writes into the
//! TCP connection.
//!
//! Back-pressure goes through: the thread stops reading the socketpair while rustls
//! holds [`TLS_SEND_LIMIT`] bytes it could not send yet, and stops reading TCP while
//! decrypted bytes wait for room in the socketpair. So a slow TLS viewer fills its
//! socketpair and looks like a slow viewer to the engine, and a connection never
//! holds more than a few fixed buffers here.
//!
//! Endings: when the engine closes its end (or shuts down writing), what it wrote is
//! sent, then a TLS close_notify, then TCP's FIN; when the viewer closes, what it sent
//! is delivered, then the socketpair is shut down for writing (the engine reads EOF);
//! a TCP error or a TLS protocol error closes both. Plain HTTP on the TLS port gets a
//! short plain-text 400 answer; any other bad handshake is closed (rustls sends its
//! alert). Neither touches any other connection.
//!
//! Certificates come from PEM files ([`load_server_config`]); the crypto is rustls
//! with the `ring` provider. The kernel's kTLS is not used (this machine has no `tls`
//! module).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{MsgFlags, send, sendmsg};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
pub use rustls::{ServerConfig, ServerConnection};

use crate::engine::{LogLevel, log};

/// The only application protocol offered (ALPN): the server speaks HTTP/1.x.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// The most plaintext the engine wrote that rustls may hold encrypted and not yet
/// sent, per connection; past it the socketpair is not read, so the engine's end
/// fills up.
pub const TLS_SEND_LIMIT: usize = 64 * 1024;

/// How much is read from either side at once.
const CHUNK: usize = 16 * 1024;

/// The most bytes moved for one connection before the others get their turn.
const TURN_BUDGET: usize = 256 * 1024;

/// How long a connection may take, once one side has ended, to flush the other
/// (the rest of the stream, close_notify) before it is closed anyway.
const CLOSE_LINGER: Duration = Duration::from_secs(5);

/// Plain HTTP on the TLS port: answered, then read and dropped for this long (so
/// closing with unread bytes does not reset the answer away), at most this much.
const DRAIN_TIME: Duration = Duration::from_secs(1);
const DRAIN_LIMIT: usize = 64 * 1024;

/// The answer to plain HTTP on the TLS port.
const PLAIN_HTTP_ANSWER: &[u8] = b"HTTP/1.0 400 Bad Request\r\n\
Content-Type: text/plain\r\n\
Content-Length: 37\r\n\
Connection: close\r\n\
\r\n\
This port speaks HTTPS: use https://\n";

/// Loads the server's certificate chain and private key from PEM files: the
/// certificate file holds the server's certificate first, then any intermediates; the
/// key file a PKCS#8, PKCS#1 (RSA) or SEC1 (EC) key, unencrypted. The error says
/// which file is wrong and how, for the element's failed change to READY.
pub fn load_server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let cert_pem = std::fs::read(cert).map_err(|e| {
        format!(
            "cannot read the TLS certificate file {}: {e}",
            cert.display()
        )
    })?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "the TLS certificate file {} is not valid PEM: {e}",
                cert.display()
            )
        })?;
    if chain.is_empty() {
        return Err(format!(
            "the TLS certificate file {} holds no certificate (a PEM \
             \"-----BEGIN CERTIFICATE-----\" block)",
            cert.display()
        ));
    }
    let key_pem = std::fs::read(key)
        .map_err(|e| format!("cannot read the TLS key file {}: {e}", key.display()))?;
    let private_key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound if contains(&key_pem, b"ENCRYPTED") => format!(
            "the TLS key file {} holds an encrypted key: give an unencrypted one \
             (e.g. `openssl pkey -in KEY -out KEY.plain`)",
            key.display()
        ),
        pem::Error::NoItemsFound => format!(
            "the TLS key file {} holds no private key (a PEM \"PRIVATE KEY\", \
             \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\" block)",
            key.display()
        ),
        e => format!("the TLS key file {} is not valid PEM: {e}", key.display()),
    })?;
    let mut provider = rustls::crypto::ring::default_provider();
    // Each viewer's stream is encrypted on its own, so the server's CPU per byte is
    // what counts: AES-128-GCM (10 rounds against AES-256's 14) is chosen whenever
    // the client offers it, whatever the client prefers.
    provider
        .cipher_suites
        .sort_by_key(|s| !AES_128_GCM.contains(&s.suite()));
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up failed: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "the TLS key in {} does not belong to the certificate in {} \
                 (the first certificate of the file must be the server's)",
                key.display(),
                cert.display()
            ),
            e => format!(
                "the TLS certificate {} and key {} cannot be used: {e}",
                cert.display(),
                key.display()
            ),
        })?;
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// The suites the server prefers (TLS 1.3, then TLS 1.2 with either key type).
const AES_128_GCM: [rustls::CipherSuite; 3] = [
    rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
    rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
];

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// What the first byte a client sends on the TLS port says it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstByte {
    /// A TLS handshake record (content type 22).
    Tls,
    /// An upper-case letter: the start of a plain HTTP method.
    PlainHttp,
    /// Anything else: left to rustls, which refuses it.
    Other,
}

pub fn first_byte_kind(b: u8) -> FirstByte {
    match b {
        0x16 => FirstByte::Tls,
        b'A'..=b'Z' => FirstByte::PlainHttp,
        _ => FirstByte::Other,
    }
}

/// Where a terminator's log lines go (the element maps them to its debug category).
pub type LogFn = Arc<dyn Fn(LogLevel, fmt::Arguments<'_>) + Send + Sync>;

/// Gives `LogFn` the `log` method the `log!` macro calls.
struct Logger(LogFn);

impl Logger {
    fn log(&self, level: LogLevel, args: fmt::Arguments<'_>) {
        (self.0)(level, args)
    }
}

/// How many connections a terminator holds, by phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TlsCounts {
    /// Wrapped, handshake not finished.
    pub handshaking: usize,
    /// Handshake done, copying (or flushing their last bytes).
    pub established: usize,
    /// Every connection still held, in any phase (plain HTTP being answered too).
    pub open: usize,
}

/// What `wrap` hands to the terminator's thread.
struct Wrapped {
    tcp: TcpStream,
    plain: UnixStream,
    tls: ServerConnection,
    already_read: Vec<u8>,
    deadline: Instant,
}

struct Shared {
    config: Arc<ServerConfig>,
    incoming: Mutex<Vec<Wrapped>>,
    waker: EventFd,
    stop: AtomicBool,
    handshaking: AtomicUsize,
    established: AtomicUsize,
    open: AtomicUsize,
    log: Logger,
}

/// One thread that terminates TLS for every connection given to [`Terminator::wrap`].
/// Dropping it stops the thread and closes every connection it holds (established
/// ones after what can be sent at once and a close_notify).
pub struct Terminator {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// The waker's epoll token; connections have `id << 1 | side`, ids from 1.
const WAKER: u64 = 0;
const SIDE_TCP: u64 = 0;
const SIDE_PLAIN: u64 = 1;

impl Terminator {
    /// Starts the thread that serves connections with `config`.
    pub fn new(config: Arc<ServerConfig>, log: LogFn) -> io::Result<Terminator> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let waker =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        epoll.add(&waker, EpollEvent::new(EpollFlags::EPOLLIN, WAKER))?;
        let shared = Arc::new(Shared {
            config,
            incoming: Mutex::new(Vec::new()),
            waker,
            stop: AtomicBool::new(false),
            handshaking: AtomicUsize::new(0),
            established: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            log: Logger(log),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("rs-tls".into())
                .spawn(move || run(&shared, &epoll))?
        };
        Ok(Terminator {
            shared,
            thread: Some(thread),
        })
    }

    /// Terminates TLS on `tcp` (accepted, any blocking mode; made nonblocking here):
    /// returns the plaintext end of a socketpair (nonblocking, close-on-exec) that
    /// stands for the client. `already_read` are bytes read from `tcp` before (after
    /// a PROXY header): they are the start of the handshake. Past
    /// `handshake_deadline` an unfinished handshake is closed.
    pub fn wrap(
        &self,
        tcp: TcpStream,
        already_read: Vec<u8>,
        handshake_deadline: Instant,
    ) -> io::Result<UnixStream> {
        if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
            return Err(io::Error::other("the TLS thread is not running"));
        }
        tcp.set_nonblocking(true)?;
        let (ours, theirs) = UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        theirs.set_nonblocking(true)?;
        let mut tls =
            ServerConnection::new(self.shared.config.clone()).map_err(io::Error::other)?;
        tls.set_buffer_limit(Some(TLS_SEND_LIMIT));
        self.shared.incoming.lock().unwrap().push(Wrapped {
            tcp,
            plain: ours,
            tls,
            already_read,
            deadline: handshake_deadline,
        });
        self.shared.waker.write(1)?;
        Ok(theirs)
    }

    pub fn counts(&self) -> TlsCounts {
        TlsCounts {
            handshaking: self.shared.handshaking.load(Ordering::SeqCst),
            established: self.shared.established.load(Ordering::SeqCst),
            open: self.shared.open.load(Ordering::SeqCst),
        }
    }
}

impl Drop for Terminator {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.shared.waker.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Writes to a socket with MSG_NOSIGNAL: a peer that went away gives EPIPE, never
/// SIGPIPE (the plugin runs in processes that do not ignore it).
struct NoSigPipe<'a>(BorrowedFd<'a>);

impl Write for NoSigPipe<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(send(
            self.0.as_raw_fd(),
            buf,
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
        )?)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        Ok(sendmsg::<()>(
            self.0.as_raw_fd(),
            bufs,
            &[],
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            None,
        )?)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshake,
    Established,
    /// Plain HTTP: answering, then reading and dropping until the peer closes.
    Refusing,
}

/// What a turn of a connection left to do.
enum Turn {
    /// Waits for its fds.
    Idle,
    /// Used its budget with work left: another turn after the others.
    Again,
    /// Finished or failed, with why (for the log): to be closed.
    Done(String),
}

struct Conn {
    tcp: TcpStream,
    /// `None` once the engine's side is of no more use (plain HTTP refused).
    plain: Option<UnixStream>,
    tls: ServerConnection,
    phase: Phase,
    /// For the log: the TCP peer.
    peer: String,
    /// Handshake bytes read before wrapping; fed to rustls first.
    already_read: Vec<u8>,
    /// The first byte was looked at (plain HTTP or not).
    classified: bool,
    /// The handshake's deadline, then the one of closing or refusing.
    deadline: Option<Instant>,
    /// Decrypted bytes from the viewer not yet written to the socketpair.
    to_plain: Vec<u8>,
    to_plain_sent: usize,
    /// Bytes the engine wrote, read from the socketpair: `[taken..end]` are not yet
    /// taken by rustls (allocated at the first read, CHUNK long).
    from_plain: Box<[u8]>,
    from_plain_taken: usize,
    from_plain_end: usize,
    /// Readiness as epoll's edges told it: set by an event, cleared when a read or
    /// write would block (or a read came back short). Saves the system calls that
    /// would only answer EAGAIN.
    tcp_in: bool,
    tcp_out: bool,
    plain_in: bool,
    plain_out: bool,
    /// The engine shut its end down (EPOLLRDHUP seen): reads go on until its EOF.
    plain_rdhup: bool,
    /// The viewer sends nothing more (FIN or close_notify).
    tcp_eof: bool,
    /// rustls took input since its plaintext was last taken: there may be some, or
    /// an end to notice.
    news: bool,
    /// EOF given to the engine (after everything the viewer sent).
    plain_write_shut: bool,
    /// The engine writes nothing more (its EOF was read).
    plain_eof: bool,
    /// The engine's end is closed: nothing can be delivered to it any more.
    plain_gone: bool,
    close_notify_sent: bool,
    tcp_write_shut: bool,
    /// Plaintext moved each way, for the log.
    bytes_in: u64,
    bytes_out: u64,
    /// Refusing: how much of the answer went out, how much was dropped.
    answer_sent: usize,
    drained: usize,
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == ErrorKind::WouldBlock
}

impl Conn {
    fn new(w: Wrapped) -> Conn {
        let peer = w
            .tcp
            .peer_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        Conn {
            tcp: w.tcp,
            plain: Some(w.plain),
            tls: w.tls,
            phase: Phase::Handshake,
            peer,
            already_read: w.already_read,
            classified: false,
            deadline: Some(w.deadline),
            to_plain: Vec::new(),
            to_plain_sent: 0,
            from_plain: Box::default(),
            from_plain_taken: 0,
            from_plain_end: 0,
            tcp_in: true,
            tcp_out: true,
            plain_in: true,
            plain_out: true,
            plain_rdhup: false,
            tcp_eof: false,
            news: true,
            plain_write_shut: false,
            plain_eof: false,
            plain_gone: false,
            close_notify_sent: false,
            tcp_write_shut: false,
            bytes_in: 0,
            bytes_out: 0,
            answer_sent: 0,
            drained: 0,
        }
    }

    fn turn(&mut self, log: &Logger) -> Turn {
        match self.phase {
            Phase::Handshake => self.handshake(log),
            Phase::Established => self.copy(),
            Phase::Refusing => self.refuse(),
        }
    }

    /// Sends what rustls has for the viewer (handshake messages, records, alerts)
    /// until it has nothing or TCP is full. Err: the viewer is gone.
    fn flush_tls(&mut self) -> Result<usize, String> {
        let mut sent = 0;
        while self.tcp_out && self.tls.wants_write() {
            match self.tls.write_tls(&mut NoSigPipe(self.tcp.as_fd())) {
                Ok(n) => sent += n,
                Err(e) if would_block(&e) => self.tcp_out = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("write to the viewer failed: {e}")),
            }
        }
        Ok(sent)
    }

    fn handshake(&mut self, log: &Logger) -> Turn {
        // The first byte tells plain HTTP from TLS (a browser told http:// for this
        // port): that deserves an answer it can show, not a TLS alert.
        if !self.classified {
            let first = match self.already_read.first() {
                Some(&b) => Some(b),
                None => {
                    let mut b = [0u8; 1];
                    match self.tcp.peek(&mut b) {
                        Ok(0) => return Turn::Done("closed before the handshake".into()),
                        Ok(_) => Some(b[0]),
                        Err(e) if would_block(&e) => return Turn::Idle,
                        Err(e) => return Turn::Done(format!("read failed: {e}")),
                    }
                }
            };
            if first.map(first_byte_kind) == Some(FirstByte::PlainHttp) {
                log!(
                    log,
                    Info,
                    "{}: plain HTTP on the TLS port, answering 400",
                    self.peer
                );
                self.phase = Phase::Refusing;
                self.plain = None;
                self.deadline = Some(Instant::now() + DRAIN_TIME);
                return self.refuse();
            }
            self.classified = true;
        }
        while !self.already_read.is_empty() {
            let mut rest = &self.already_read[..];
            match self.tls.read_tls(&mut rest) {
                Ok(n) => {
                    self.already_read.drain(..n);
                }
                Err(e) => return Turn::Done(format!("handshake bytes refused: {e}")),
            }
            if let Err(e) = self.tls.process_new_packets() {
                let _ = self.flush_tls();
                return Turn::Done(format!("TLS handshake failed: {e}"));
            }
        }
        while self.tls.is_handshaking() {
            match self.tls.read_tls(&mut self.tcp) {
                Ok(0) => return Turn::Done("closed during the TLS handshake".into()),
                Ok(_) => {}
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Turn::Done(format!("read failed during the handshake: {e}")),
            }
            if let Err(e) = self.tls.process_new_packets() {
                let _ = self.flush_tls();
                return Turn::Done(format!("TLS handshake failed: {e}"));
            }
        }
        if let Err(e) = self.flush_tls() {
            return Turn::Done(e);
        }
        if self.tls.is_handshaking() {
            return Turn::Idle;
        }
        log!(
            log,
            Info,
            "{}: TLS established ({:?}, {:?}, ALPN {})",
            self.peer,
            self.tls.protocol_version(),
            self.tls.negotiated_cipher_suite().map(|s| s.suite()),
            self.tls
                .alpn_protocol()
                .map_or("none".into(), |p| String::from_utf8_lossy(p).into_owned())
        );
        self.phase = Phase::Established;
        self.deadline = None;
        // The request may have come with the client's Finished.
        Turn::Again
    }

    /// Established: copies both ways until nothing moves, the budget is used or the
    /// connection is over.
    fn copy(&mut self) -> Turn {
        let mut moved = 0;
        loop {
            let mut progress = false;
            match self.viewer_to_engine() {
                Ok(n) => {
                    progress |= n > 0;
                    moved += n;
                }
                Err(why) => return Turn::Done(why),
            }
            match self.engine_to_viewer() {
                Ok(n) => {
                    progress |= n > 0;
                    moved += n;
                }
                Err(why) => return Turn::Done(why),
            }
            if self.tcp_write_shut && (self.plain_write_shut || self.plain_gone) {
                return Turn::Done("closed".into());
            }
            if !progress {
                return Turn::Idle;
            }
            if moved >= TURN_BUDGET {
                return Turn::Again;
            }
        }
    }

    /// One step of viewer -> rustls -> socketpair. Returns the bytes moved (0: blocked
    /// or nothing to do; a state change counts as 1).
    fn viewer_to_engine(&mut self) -> Result<usize, String> {
        if self.to_plain_sent < self.to_plain.len() {
            let Some(plain) = self.plain.as_ref() else {
                self.to_plain.clear();
                self.to_plain_sent = 0;
                return Ok(1);
            };
            if !self.plain_out {
                return Ok(0);
            }
            return match NoSigPipe(plain.as_fd()).write(&self.to_plain[self.to_plain_sent..]) {
                Ok(n) => {
                    self.to_plain_sent += n;
                    self.bytes_in += n as u64;
                    if self.to_plain_sent == self.to_plain.len() {
                        self.to_plain.clear();
                        self.to_plain_sent = 0;
                    }
                    Ok(n)
                }
                Err(e) if would_block(&e) => {
                    self.plain_out = false;
                    Ok(0)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => Ok(0),
                // The engine's end is closed: what the viewer sends goes nowhere.
                Err(_) => {
                    self.engine_gone();
                    Ok(1)
                }
            };
        }
        // Plaintext rustls already holds first (the request may have come with the
        // handshake's last flight), then more from TCP.
        let got = self.take_plaintext();
        if got > 0 {
            return Ok(got);
        }
        if self.tcp_eof {
            if !self.plain_write_shut {
                self.plain_write_shut = true;
                if let Some(plain) = self.plain.as_ref() {
                    let _ = plain.shutdown(Shutdown::Write);
                }
                return Ok(1);
            }
            return Ok(0);
        }
        if !self.tcp_in {
            return Ok(0);
        }
        self.news = true;
        let n = match self.tls.read_tls(&mut self.tcp) {
            Ok(0) => {
                self.tcp_eof = true;
                return Ok(1);
            }
            Ok(n) => n,
            Err(e) if would_block(&e) => {
                self.tcp_in = false;
                return Ok(0);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => return Ok(0),
            Err(e) => return Err(format!("read from the viewer failed: {e}")),
        };
        if let Err(e) = self.tls.process_new_packets() {
            let _ = self.flush_tls();
            return Err(format!("TLS error from the viewer: {e}"));
        }
        Ok(n)
    }

    /// Moves the plaintext rustls decrypted into `to_plain` (dropped if the engine's
    /// end is gone); notes the viewer's end (close_notify, or TCP closed without it).
    fn take_plaintext(&mut self) -> usize {
        if !std::mem::take(&mut self.news) {
            return 0;
        }
        let mut chunk = [0u8; CHUNK];
        let mut got = 0;
        loop {
            match self.tls.reader().read(&mut chunk) {
                Ok(0) => {
                    self.tcp_eof = true;
                    return got;
                }
                Ok(k) => {
                    got += k;
                    if !self.plain_gone {
                        self.to_plain.extend_from_slice(&chunk[..k]);
                    }
                }
                Err(e) if would_block(&e) => return got,
                Err(_) => {
                    self.tcp_eof = true;
                    return got;
                }
            }
        }
    }

    /// One step of socketpair -> rustls -> viewer. Returns the bytes moved (a state
    /// change counts as 1).
    fn engine_to_viewer(&mut self) -> Result<usize, String> {
        let mut moved = self.flush_tls()?;
        if self.close_notify_sent && !self.tls.wants_write() && !self.tcp_write_shut {
            self.tcp_write_shut = true;
            let _ = self.tcp.shutdown(Shutdown::Write);
            return Ok(moved + 1);
        }
        if self.from_plain_taken < self.from_plain_end {
            let n = self
                .tls
                .writer()
                .write(&self.from_plain[self.from_plain_taken..self.from_plain_end])
                .map_err(|e| format!("encrypting failed: {e}"))?;
            self.from_plain_taken += n;
            self.bytes_out += n as u64;
            // rustls at its limit takes nothing: wait for TCP to take some.
            return Ok(moved + n);
        }
        if !self.plain_eof {
            let Some(plain) = self.plain.as_mut() else {
                self.plain_eof = true;
                return Ok(moved + 1);
            };
            if !self.plain_in {
                return Ok(moved);
            }
            if self.from_plain.is_empty() {
                self.from_plain = vec![0u8; CHUNK].into_boxed_slice();
            }
            self.from_plain_taken = 0;
            self.from_plain_end = 0;
            return match plain.read(&mut self.from_plain) {
                Ok(0) => {
                    self.plain_eof = true;
                    Ok(moved + 1)
                }
                Ok(n) => {
                    self.from_plain_end = n;
                    // A stream socket's read comes back short only when it took
                    // everything there was; but an EOF behind the data comes with
                    // the same edge, so after one the reads go on until EOF.
                    if n < self.from_plain.len() && !self.plain_rdhup {
                        self.plain_in = false;
                    }
                    Ok(moved + n)
                }
                Err(e) if would_block(&e) => {
                    self.plain_in = false;
                    Ok(moved)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => Ok(moved),
                // ECONNRESET and the like: as if the engine closed.
                Err(_) => {
                    self.plain_eof = true;
                    Ok(moved + 1)
                }
            };
        }
        if !self.close_notify_sent {
            // Everything the engine wrote is with rustls: end the TLS stream after it.
            self.tls.send_close_notify();
            self.close_notify_sent = true;
            self.deadline = Some(Instant::now() + CLOSE_LINGER);
            moved += 1 + self.flush_tls()?;
        }
        Ok(moved)
    }

    /// Notes what an epoll event says of one side's readiness.
    fn note_readiness(&mut self, side: u64, events: EpollFlags) {
        let input = EpollFlags::EPOLLIN
            | EpollFlags::EPOLLRDHUP
            | EpollFlags::EPOLLHUP
            | EpollFlags::EPOLLERR;
        let output = EpollFlags::EPOLLOUT | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR;
        let (r, w) = if side == SIDE_TCP {
            (&mut self.tcp_in, &mut self.tcp_out)
        } else {
            (&mut self.plain_in, &mut self.plain_out)
        };
        *r |= events.intersects(input);
        *w |= events.intersects(output);
        if side == SIDE_PLAIN && events.intersects(EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP) {
            self.plain_rdhup = true;
        }
    }

    /// The terminator stops: what can move without waiting moves, then an
    /// established stream gets its close_notify (so the viewer sees an end, not a
    /// cut), without waiting for anything.
    fn end_now(&mut self) {
        if self.phase != Phase::Established {
            return;
        }
        let _ = self.copy();
        if !self.close_notify_sent {
            self.tls.send_close_notify();
            self.close_notify_sent = true;
        }
        let _ = self.flush_tls();
    }

    /// The engine's end is closed (seen by EPOLLHUP or a failed write): nothing more
    /// goes to it; what it wrote before is still read and sent.
    fn engine_gone(&mut self) {
        self.plain_gone = true;
        self.to_plain.clear();
        self.to_plain_sent = 0;
        if self.deadline.is_none() {
            self.deadline = Some(Instant::now() + CLOSE_LINGER);
        }
    }

    /// Plain HTTP: sends the 400 answer, ends our side, then drops what the peer
    /// still sends until it closes.
    fn refuse(&mut self) -> Turn {
        while self.answer_sent < PLAIN_HTTP_ANSWER.len() {
            match NoSigPipe(self.tcp.as_fd()).write(&PLAIN_HTTP_ANSWER[self.answer_sent..]) {
                Ok(n) => {
                    self.answer_sent += n;
                    if self.answer_sent == PLAIN_HTTP_ANSWER.len() {
                        let _ = self.tcp.shutdown(Shutdown::Write);
                    }
                }
                Err(e) if would_block(&e) => return Turn::Idle,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Turn::Done(format!("answering plain HTTP failed: {e}")),
            }
        }
        let mut buf = [0u8; 4096];
        loop {
            match self.tcp.read(&mut buf) {
                Ok(0) => return Turn::Done("answered plain HTTP with 400".into()),
                Ok(n) => {
                    self.drained += n;
                    if self.drained > DRAIN_LIMIT {
                        return Turn::Done("answered plain HTTP with 400 (sent too much)".into());
                    }
                }
                Err(e) if would_block(&e) => return Turn::Idle,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Turn::Done(format!("answered plain HTTP with 400 ({e})")),
            }
        }
    }

    fn register(&self, epoll: &Epoll, id: u64) -> nix::Result<()> {
        let flags = EpollFlags::EPOLLIN
            | EpollFlags::EPOLLOUT
            | EpollFlags::EPOLLRDHUP
            | EpollFlags::EPOLLET;
        epoll.add(&self.tcp, EpollEvent::new(flags, id << 1 | SIDE_TCP))?;
        if let Some(plain) = &self.plain {
            epoll.add(plain, EpollEvent::new(flags, id << 1 | SIDE_PLAIN))?;
        }
        Ok(())
    }
}

/// The counters follow each connection's phase.
fn count(shared: &Shared, phase: Phase, up: bool) {
    let counter = match phase {
        Phase::Handshake => &shared.handshaking,
        Phase::Established => &shared.established,
        Phase::Refusing => return,
    };
    if up {
        counter.fetch_add(1, Ordering::SeqCst);
    } else {
        counter.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The thread: connections by id, deadlines in a heap (stale entries are skipped),
/// connections that used their budget in `again`.
fn run(shared: &Shared, epoll: &Epoll) {
    let log = &shared.log;
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    let mut deadlines: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut again: Vec<u64> = Vec::new();
    let mut ready: Vec<u64> = Vec::new();
    let mut next_id: u64 = 1;
    let mut events = vec![EpollEvent::empty(); 256];
    loop {
        let timeout = if !again.is_empty() {
            EpollTimeout::ZERO
        } else {
            match deadlines.peek() {
                None => EpollTimeout::NONE,
                Some(Reverse((at, _))) => {
                    let left = at.saturating_duration_since(Instant::now());
                    // Rounded up, so a wake-up is never before the deadline.
                    let ms = left.as_micros().div_ceil(1000).min(60_000) as u16;
                    EpollTimeout::from(ms)
                }
            }
        };
        let n = match epoll.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(Errno::EINTR) => 0,
            Err(e) => {
                log!(log, Warning, "TLS thread: epoll_wait failed: {e}");
                return;
            }
        };
        ready.clear();
        ready.append(&mut again);
        for ev in &events[..n] {
            let data = ev.data();
            if data == WAKER {
                let _ = shared.waker.read();
                if shared.stop.load(Ordering::SeqCst) {
                    let left = conns.len();
                    for c in conns.values_mut() {
                        c.end_now();
                    }
                    drop(conns);
                    shared.open.fetch_sub(left, Ordering::SeqCst);
                    shared.handshaking.store(0, Ordering::SeqCst);
                    shared.established.store(0, Ordering::SeqCst);
                    log!(log, Debug, "TLS thread stops, closing {left} connections");
                    return;
                }
                let new: Vec<Wrapped> = std::mem::take(&mut *shared.incoming.lock().unwrap());
                for w in new {
                    let id = next_id;
                    next_id += 1;
                    let conn = Conn::new(w);
                    if let Err(e) = conn.register(epoll, id) {
                        log!(
                            log,
                            Warning,
                            "{}: cannot watch the connection: {e}",
                            conn.peer
                        );
                        continue;
                    }
                    log!(log, Debug, "{}: TLS handshake starts", conn.peer);
                    if let Some(at) = conn.deadline {
                        deadlines.push(Reverse((at, id)));
                    }
                    shared.open.fetch_add(1, Ordering::SeqCst);
                    count(shared, Phase::Handshake, true);
                    conns.insert(id, conn);
                    ready.push(id);
                }
                continue;
            }
            let id = data >> 1;
            if let Some(c) = conns.get_mut(&id) {
                c.note_readiness(data & 1, ev.events());
            }
            if data & 1 == SIDE_PLAIN
                && ev.events().contains(EpollFlags::EPOLLHUP)
                && let Some(c) = conns.get_mut(&id)
            {
                if c.phase == Phase::Handshake {
                    close(
                        shared,
                        &mut conns,
                        id,
                        "the server closed it during the handshake",
                    );
                    continue;
                }
                c.engine_gone();
                if let Some(at) = c.deadline {
                    deadlines.push(Reverse((at, id)));
                }
            }
            if data & 1 == SIDE_TCP
                && ev.events().contains(EpollFlags::EPOLLERR)
                && let Some(c) = conns.get(&id)
            {
                let why = match c.tcp.take_error() {
                    Ok(Some(e)) => format!("connection error: {e}"),
                    _ => "connection error".into(),
                };
                close(shared, &mut conns, id, &why);
                continue;
            }
            ready.push(id);
        }
        ready.sort_unstable();
        ready.dedup();
        for &id in &ready {
            let Some(c) = conns.get_mut(&id) else {
                continue;
            };
            let before = (c.phase, c.deadline);
            let turn = c.turn(log);
            if c.phase != before.0 {
                count(shared, before.0, false);
                count(shared, c.phase, true);
            }
            if c.deadline != before.1
                && let Some(at) = c.deadline
            {
                deadlines.push(Reverse((at, id)));
            }
            match turn {
                Turn::Idle => {}
                Turn::Again => again.push(id),
                Turn::Done(why) => close(shared, &mut conns, id, &why),
            }
        }
        let now = Instant::now();
        while let Some(&Reverse((at, id))) = deadlines.peek() {
            if at > now {
                break;
            }
            deadlines.pop();
            let Some(c) = conns.get(&id) else { continue };
            if c.deadline != Some(at) {
                continue;
            }
            let why = match c.phase {
                Phase::Handshake => "TLS handshake timed out",
                Phase::Established => "closing timed out",
                Phase::Refusing => "answered plain HTTP with 400",
            };
            close(shared, &mut conns, id, why);
        }
    }
}

/// Closes a connection (both its fds) and logs why.
fn close(shared: &Shared, conns: &mut HashMap<u64, Conn>, id: u64, why: &str) {
    let Some(c) = conns.remove(&id) else { return };
    count(shared, c.phase, false);
    shared.open.fetch_sub(1, Ordering::SeqCst);
    let log = &shared.log;
    match c.phase {
        Phase::Established => log!(
            log,
            Debug,
            "{}: TLS connection ends ({why}); {} bytes from the viewer, {} to it",
            c.peer,
            c.bytes_in,
            c.bytes_out
        ),
        _ => log!(log, Info, "{}: {why}", c.peer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes() {
        assert_eq!(first_byte_kind(0x16), FirstByte::Tls);
        for b in [b'G', b'H', b'P', b'O'] {
            assert_eq!(first_byte_kind(b), FirstByte::PlainHttp);
        }
        assert_eq!(first_byte_kind(0), FirstByte::Other);
        assert_eq!(first_byte_kind(b'g'), FirstByte::Other);
    }

    #[test]
    fn plain_http_answer_is_consistent() {
        let text = std::str::from_utf8(PLAIN_HTTP_ANSWER).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
    }
}
