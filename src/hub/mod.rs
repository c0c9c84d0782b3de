// SPDX-License-Identifier: MPL-2.0

//! The per-port hub of `rstcpserversink`: the listening sockets of one host and
//! port and the thread that serves them, shared by every element in the process
//! that listens there.
//!
//! An element joins at NULL→READY ([`join`]): the first one for a `(host, port)`
//! binds the sockets and starts the hub's thread (with its own epoll); later ones
//! with the same host and port register their mount on it. Each holds a
//! [`Membership`]; dropping it (READY→NULL) takes its mount off, and the last one
//! out stops the thread and closes the listening sockets, so the port stays open
//! while any element is in READY or above. `port=0` always makes a hub of its own.
//!
//! The thread (`io`) accepts, reads the optional PROXY header and the request
//! head, routes the request by mount, applies that element's policy, answers, and
//! hands the socket to the element through its [`MountTarget`], the only way the
//! hub reaches an element. Settings that act before a request is routed are the
//! port's: those of the element that came first; a later element that differs in
//! one fails to join, naming it.

mod io;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime};

use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::access_log::AccessEntry;
use crate::engine::LogLevel;
use crate::metrics::MountFigures;
use crate::server::{self, PortSettings, ServerConfig};

/// How the hub reaches one element: hand it a client, ask its figures, tell it
/// what was answered (for its counters and access log), log as it.
pub trait MountTarget: Send + Sync {
    /// Makes the answered connection `socket` a client of the element, which from
    /// now on owns it (and closes it once its engine forgot it). False if the
    /// element did not take it (it is stopping); the socket is closed then.
    fn hand_over(&self, socket: OwnedFd, client: ClientInfo) -> bool;
    /// Its clients now.
    fn client_count(&self) -> usize;
    /// Its clients from `ip` (by the client's address: the PROXY header's, if any).
    fn clients_from(&self, ip: IpAddr) -> usize;
    /// Its IO threads are overloaded and it refuses new clients.
    fn refusing_clients(&self) -> bool;
    /// Its figures for the metrics.
    fn figures(&self) -> MountFigures;
    /// A request to it was answered without becoming a client (`refused`: an
    /// error status or a redirect; otherwise HEAD, a preflight, the metrics).
    fn answered(&self, entry: &AccessEntry<'_>, refused: bool);
    /// Diagnostics, as the element logs them (`log!` works on it).
    fn log(&self, level: LogLevel, args: fmt::Arguments<'_>);
}

/// What a port does to each connection once its PROXY header (if any) is read and
/// before its request: takes the TCP connection, the bytes already read after the
/// PROXY header and the request's deadline, and gives back the plaintext end of a
/// socketpair that stands for the client from then on (a TLS terminator). An error
/// closes the connection.
pub type Wrap = Arc<
    dyn Fn(std::net::TcpStream, Vec<u8>, Instant) -> std::io::Result<std::os::unix::net::UnixStream>
        + Send
        + Sync,
>;

/// What the element keeps about a client the hub handed over.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// The client's address: the PROXY header's source, else the socket's peer.
    pub address: SocketAddr,
    /// The socket's peer (the load balancer, behind one).
    pub socket_peer: SocketAddr,
    /// When the connection was accepted.
    pub started: SystemTime,
    pub started_at: Instant,
    /// The request line; `None` for raw TCP.
    pub request_line: Option<String>,
    pub referer: Option<String>,
    pub user_agent: Option<String>,
    /// The token's subject.
    pub user: Option<String>,
    /// Bytes of the response head written before the stream.
    pub head_bytes: u64,
}

/// One element on the port.
#[derive(Clone)]
struct Mount {
    id: u64,
    config: Arc<Mutex<ServerConfig>>,
    target: Arc<dyn MountTarget>,
}

/// What the hub's thread and the elements share.
struct Shared {
    /// In the order they joined: the first one's settings are the port's.
    mounts: Mutex<Vec<Mount>>,
    stop: AtomicBool,
    /// Written to make the thread look at what changed (caps, mounts, stop).
    waker: EventFd,
}

impl Shared {
    fn wake(&self) {
        let _ = self.waker.write(1);
    }

    fn mounts(&self) -> Vec<Mount> {
        self.mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The listening sockets of one host and port, and their thread.
pub struct Hub {
    shared: Arc<Shared>,
    /// Its entry in the table; `None` for port 0 (never shared).
    key: Option<PortKey>,
    settings: PortSettings,
    http: bool,
    addrs: Vec<SocketAddr>,
    thread: Option<JoinHandle<()>>,
}

/// A shared hub's key: the host and port elements ask for.
type PortKey = (String, u16);

/// Every shared hub of the process.
static HUBS: LazyLock<Mutex<HashMap<PortKey, Weak<Hub>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

static NEXT_MOUNT: AtomicU64 = AtomicU64::new(1);

fn hubs() -> std::sync::MutexGuard<'static, HashMap<PortKey, Weak<Hub>>> {
    HUBS.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for Hub {
    /// The last element left: stop the thread, which closes the listening sockets
    /// and the connections not handed over yet.
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake();
        if let Some(thread) = self.thread.take()
            && thread.thread().id() != std::thread::current().id()
        {
            let _ = thread.join();
        }
        if let Some(key) = &self.key {
            let mut table = hubs();
            // Another hub may have taken the key since (after this one's last
            // element left): only a dead entry is ours.
            if table.get(key).is_some_and(|w| w.strong_count() == 0) {
                table.remove(key);
            }
        }
    }
}

/// An element's place on a port; dropping it takes the element off.
pub struct Membership {
    hub: Arc<Hub>,
    id: u64,
}

impl Membership {
    /// The port actually bound.
    pub fn port(&self) -> u16 {
        self.hub.addrs.first().map_or(0, |a| a.port())
    }

    /// The addresses listened on.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.hub.addrs
    }

    /// Makes the hub look again at what changed (the caps arrived: requests that
    /// waited for them are answered).
    pub fn wake(&self) {
        self.hub.shared.wake();
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.hub
            .shared
            .mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|m| m.id != self.id);
        self.hub.shared.wake();
        // Dropping `hub` next stops it if this was the last element.
    }
}

/// Why an element cannot be on a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinError {
    /// Another element serves the port in a way this one cannot share.
    Conflict(String),
    /// The port cannot be bound (in use, no such address) or served.
    Listen(String),
}

impl fmt::Display for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JoinError::Conflict(s) | JoinError::Listen(s) => f.write_str(s),
        }
    }
}

/// Puts an element (its policy `config`, reached through `target`) on the port
/// `settings` name: on the hub already there, or on a new one, which wraps its
/// connections with what `make_wrap` makes (called only then). The error says why
/// it cannot (the port is taken, a setting differs from the port's, the mount is
/// served already, `make_wrap` failed).
pub fn join(
    settings: &PortSettings,
    config: Arc<Mutex<ServerConfig>>,
    target: Arc<dyn MountTarget>,
    make_wrap: impl FnOnce() -> Result<Option<Wrap>, String>,
) -> Result<Membership, JoinError> {
    let id = NEXT_MOUNT.fetch_add(1, Ordering::Relaxed);
    let mine = config.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mount = Mount { id, config, target };
    let key = (settings.host.clone(), settings.port);
    let mut table = hubs();
    let existing = if settings.port == 0 {
        None
    } else {
        table.get(&key).and_then(Weak::upgrade)
    };
    if let Some(hub) = existing {
        let checked = compatible(&hub, settings, &mine);
        if let Err(e) = checked {
            drop(table);
            // The hub may go with this reference (its last element left meanwhile):
            // dropped without the table's lock, which its drop takes.
            drop(hub);
            return Err(JoinError::Conflict(e));
        }
        hub.shared
            .mounts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(mount);
        hub.shared.wake();
        return Ok(Membership { hub, id });
    }
    let wrap = make_wrap().map_err(JoinError::Listen)?;
    let hub = Arc::new(start(settings, mine.http, mount, wrap).map_err(JoinError::Listen)?);
    if settings.port != 0 {
        table.insert(key, Arc::downgrade(&hub));
    }
    Ok(Membership { hub, id })
}

/// Whether an element with `settings` and `config` may join `hub`.
fn compatible(hub: &Hub, settings: &PortSettings, config: &ServerConfig) -> Result<(), String> {
    let port = format!("{}:{}", settings.host, settings.port);
    if !hub.http || !config.http {
        return Err(format!(
            "{port} is already served by another rstcpserversink; elements share a port only with http=true"
        ));
    }
    let mounts = hub.shared.mounts();
    let first = mounts
        .first()
        .map(|m| m.config.lock().unwrap_or_else(|e| e.into_inner()).clone());
    let differs = |name: &str, here: String, there: String| {
        Err(format!(
            "{name} is {here} here but {there} on the element already serving {port}; elements sharing a port must agree on it"
        ))
    };
    let ours = &hub.settings;
    if settings.backlog != ours.backlog {
        return differs(
            "listen-backlog",
            settings.backlog.to_string(),
            ours.backlog.to_string(),
        );
    }
    if settings.proxy_protocol != ours.proxy_protocol {
        return differs(
            "proxy-protocol",
            settings.proxy_protocol.to_string(),
            ours.proxy_protocol.to_string(),
        );
    }
    if settings.max_pending != ours.max_pending {
        return differs(
            "max-pending",
            settings.max_pending.to_string(),
            ours.max_pending.to_string(),
        );
    }
    let cert = |s: &PortSettings| {
        s.tls
            .as_ref()
            .map_or_else(|| "unset".to_string(), |t| t.certificate.clone())
    };
    let key = |s: &PortSettings| {
        s.tls
            .as_ref()
            .map_or_else(|| "unset".to_string(), |t| t.key.clone())
    };
    if cert(settings) != cert(ours) {
        return differs("tls-certificate", cert(settings), cert(ours));
    }
    if key(settings) != key(ours) {
        return differs("tls-key", key(settings), key(ours));
    }
    if let Some(first) = &first {
        if config.header_timeout != first.header_timeout {
            return differs(
                "header-timeout",
                config.header_timeout.as_nanos().to_string(),
                first.header_timeout.as_nanos().to_string(),
            );
        }
        if config.max_header_size != first.max_header_size {
            return differs(
                "max-header-size",
                config.max_header_size.to_string(),
                first.max_header_size.to_string(),
            );
        }
    }
    for m in &mounts {
        let other = m
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .mount
            .clone();
        if other == config.mount {
            return Err(match &config.mount {
                Some(path) => format!("mount {path} is already served on {port}"),
                None => format!(
                    "another element without mount already serves any path on {port}; set mount"
                ),
            });
        }
    }
    Ok(())
}

/// Binds the port and starts its thread with `first` on it.
fn start(
    settings: &PortSettings,
    http: bool,
    first: Mount,
    wrap: Option<Wrap>,
) -> Result<Hub, String> {
    let listeners = server::bind_listeners(&settings.host, settings.port, settings.backlog)
        .map_err(|e| format!("cannot listen on {}:{}: {e}", settings.host, settings.port))?;
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    let waker = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .map_err(|e| format!("cannot make the hub's waker: {e}"))?;
    let shared = Arc::new(Shared {
        mounts: Mutex::new(vec![first]),
        stop: AtomicBool::new(false),
        waker,
    });
    let io = io::Io::new(shared.clone(), listeners, settings.clone(), wrap)
        .map_err(|e| format!("cannot watch the listening sockets: {e}"))?;
    let thread = std::thread::Builder::new()
        .name(format!(
            "rstcpserversink-{}",
            addrs.first().map_or(0, |a| a.port())
        ))
        .spawn(move || io.run())
        .map_err(|e| format!("cannot start the listening thread: {e}"))?;
    let key = (settings.port != 0).then(|| (settings.host.clone(), settings.port));
    Ok(Hub {
        shared,
        key,
        settings: settings.clone(),
        http,
        addrs,
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    //! The hub without GStreamer: fake elements that keep what they are handed.

    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    use super::*;

    #[derive(Default)]
    struct Fake {
        sockets: Mutex<Vec<OwnedFd>>,
        answered: Mutex<Vec<u16>>,
    }

    impl MountTarget for Fake {
        fn hand_over(&self, socket: OwnedFd, _client: ClientInfo) -> bool {
            self.sockets.lock().unwrap().push(socket);
            true
        }
        fn client_count(&self) -> usize {
            self.sockets.lock().unwrap().len()
        }
        fn clients_from(&self, _ip: IpAddr) -> usize {
            0
        }
        fn refusing_clients(&self) -> bool {
            false
        }
        fn figures(&self) -> MountFigures {
            MountFigures::default()
        }
        fn answered(&self, entry: &AccessEntry<'_>, _refused: bool) {
            self.answered.lock().unwrap().push(entry.status);
        }
        fn log(&self, _level: LogLevel, _args: fmt::Arguments<'_>) {}
    }

    /// Connections as accepted (no TLS).
    fn plain() -> Result<Option<Wrap>, String> {
        Ok(None)
    }

    fn policy(mount: &str) -> Arc<Mutex<ServerConfig>> {
        Arc::new(Mutex::new(ServerConfig {
            http: true,
            mount: Some(mount.into()),
            content_type: Some("text/plain".into()),
            ..Default::default()
        }))
    }

    fn port_settings(port: u16) -> PortSettings {
        PortSettings {
            host: "127.0.0.1".into(),
            port,
            backlog: 16,
            proxy_protocol: false,
            max_pending: 0,
            tls: None,
        }
    }

    /// The status line the server answers `GET path` with.
    fn status_of(port: u16, path: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while !got.windows(2).any(|w| w == b"\r\n") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed without an answer");
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        text.split("\r\n").next().unwrap().to_string()
    }

    /// Waits until the fake holds `n` sockets.
    fn wait_sockets(fake: &Fake, n: usize) {
        let start = Instant::now();
        while fake.sockets.lock().unwrap().len() != n {
            assert!(start.elapsed() < Duration::from_secs(10), "not handed over");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn elements_share_a_port_by_mount_until_the_last_one_leaves() {
        let a_fake = Arc::new(Fake::default());
        let b_fake = Arc::new(Fake::default());
        let a = join(&port_settings(0), policy("/a"), a_fake.clone(), plain).unwrap();
        let port = a.port();
        // Port 0 is never shared: join the port it got by its number.
        let b_alone = join(&port_settings(0), policy("/b"), b_fake.clone(), plain).unwrap();
        assert_ne!(b_alone.port(), port);
        drop(b_alone);
        drop(a);
        let a = join(&port_settings(port), policy("/a"), a_fake.clone(), plain).unwrap();
        let b = join(&port_settings(port), policy("/b"), b_fake.clone(), plain).unwrap();
        assert_eq!(b.port(), port);
        assert_eq!(status_of(port, "/a"), "HTTP/1.0 200 OK");
        wait_sockets(&a_fake, 1);
        assert_eq!(status_of(port, "/b"), "HTTP/1.0 200 OK");
        wait_sockets(&b_fake, 1);
        // A path nobody has is answered as the port's first element.
        assert_eq!(status_of(port, "/c"), "HTTP/1.0 404 Not Found");
        assert_eq!(*a_fake.answered.lock().unwrap(), [404]);
        drop(a);
        assert_eq!(status_of(port, "/a"), "HTTP/1.0 404 Not Found");
        assert_eq!(*b_fake.answered.lock().unwrap(), [404]);
        assert_eq!(status_of(port, "/b"), "HTTP/1.0 200 OK");
        wait_sockets(&b_fake, 2);
        drop(b);
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
    }

    #[test]
    fn a_port_refuses_elements_it_cannot_share_with() {
        let first = join(
            &port_settings(0),
            policy("/a"),
            Arc::new(Fake::default()),
            plain,
        )
        .unwrap();
        let port = first.port();
        // Kept in the table under its number only when asked for by number.
        drop(first);
        let first = join(
            &port_settings(port),
            policy("/a"),
            Arc::new(Fake::default()),
            plain,
        )
        .unwrap();
        let same_mount = join(
            &port_settings(port),
            policy("/a"),
            Arc::new(Fake::default()),
            plain,
        );
        assert!(matches!(&same_mount, Err(JoinError::Conflict(e)) if e.contains("mount /a")));
        let backlog = PortSettings {
            backlog: 5,
            ..port_settings(port)
        };
        let other_backlog = join(&backlog, policy("/b"), Arc::new(Fake::default()), plain);
        assert!(
            matches!(&other_backlog, Err(JoinError::Conflict(e)) if e.contains("listen-backlog"))
        );
        let raw = Arc::new(Mutex::new(ServerConfig::default()));
        let raw_joins = join(&port_settings(port), raw, Arc::new(Fake::default()), plain);
        assert!(matches!(&raw_joins, Err(JoinError::Conflict(e)) if e.contains("http=true")));
        drop(first);
    }

    /// Copies between `a` and `b` both ways until either side ends.
    fn relay(a: std::net::TcpStream, b: std::os::unix::net::UnixStream) {
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let (mut a, mut b) = (a, b);
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut a, &mut b);
            let _ = b.shutdown(std::net::Shutdown::Write);
        });
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut b2, &mut a2);
            let _ = a2.shutdown(std::net::Shutdown::Write);
        });
    }

    /// A port's `wrap` (where TLS goes) gets the TCP connection and the bytes read
    /// after the PROXY header; the hub then reads the request from the plaintext
    /// end it returned, answers on it and hands that end to the element.
    #[test]
    fn a_wrap_takes_the_connection_after_the_proxy_header() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let make_wrap = {
            let seen = seen.clone();
            move || -> Result<Option<Wrap>, String> {
                Ok(Some(Arc::new(
                    move |tcp: TcpStream, already_read: Vec<u8>, _deadline: Instant| {
                        seen.lock().unwrap().push(already_read.clone());
                        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
                        tcp.set_nonblocking(false)?;
                        // A stand-in terminator: what came with the PROXY header
                        // first, then everything as it is.
                        (&ours).write_all(&already_read)?;
                        relay(tcp, ours);
                        theirs.set_nonblocking(true)?;
                        Ok(theirs)
                    },
                )))
            }
        };
        let fake = Arc::new(Fake::default());
        let settings = PortSettings {
            proxy_protocol: true,
            ..port_settings(0)
        };
        let hub = join(&settings, policy("/a"), fake.clone(), make_wrap).unwrap();
        let mut s = TcpStream::connect(("127.0.0.1", hub.port())).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 5000 80\r\nGET /a HTTP/1.0\r\n\r\n")
            .unwrap();
        let mut head = [0u8; 17];
        s.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.0 200 OK\r\n");
        wait_sockets(&fake, 1);
        assert_eq!(*seen.lock().unwrap(), [b"GET /a HTTP/1.0\r\n\r\n".to_vec()]);
        // What the element writes to the plaintext end reaches the client.
        let end = fake.sockets.lock().unwrap().pop().unwrap();
        std::fs::File::from(end).write_all(b"stream").unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        assert!(rest.ends_with(b"\r\n\r\nstream"), "{rest:?}");
        drop(hub);
    }
}
