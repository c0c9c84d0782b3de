// SPDX-License-Identifier: MPL-2.0

//! The listening side of `rstcpserversink`, run by the engine's IO thread: accepts
//! connections without blocking, optionally reads an HTTP request head from each
//! (bounded size, deadline) and answers it, then hands the socket to the engine.
//! Plain Rust; the element only configures it.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt, socket,
    sockopt,
};

use crate::engine::{AddOutcome, Registry, Service, ServiceToken, log};
use crate::http::{self, Method, Parsed};

/// How long a client has to send its request head, by default.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head accepted, by default.
pub const DEFAULT_MAX_HEADER_SIZE: u32 = 8192;
/// No limit on clients, by default.
pub const DEFAULT_MAX_CLIENTS: u32 = 0;
/// The kernel's queue of connections not yet accepted, by default.
pub const DEFAULT_BACKLOG: i32 = 128;

/// What the server needs to know; the element keeps it current.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Speak HTTP: read a request, answer with headers. Off: raw TCP as `tcpserversink`.
    pub http: bool,
    /// Only this path is served (404 for others); `None` serves any path.
    pub mount: Option<String>,
    /// 503 beyond this many clients; 0 is no limit.
    pub max_clients: u32,
    pub header_timeout: Duration,
    pub max_header_size: usize,
    /// From the caps; `None` until caps arrive.
    pub content_type: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            http: false,
            mount: None,
            max_clients: DEFAULT_MAX_CLIENTS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_header_size: DEFAULT_MAX_HEADER_SIZE as usize,
            content_type: None,
        }
    }
}

/// How long accepting pauses when the process is out of fds.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// How long a refused connection is drained before it is closed, and how often.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_POLL: Duration = Duration::from_millis(50);
/// The most a refused connection may still send before it is closed anyway.
const LINGER_BYTES: usize = 256 * 1024;

/// Sockets the server accepted and so must close once the engine forgot them.
pub type AcceptedSockets = Arc<Mutex<HashMap<RawFd, OwnedFd>>>;

/// An accepted connection that is no client yet: it is still sending its request
/// head, or waits for the stream's caps to be answered.
struct Incoming {
    stream: TcpStream,
    head: Vec<u8>,
    deadline: Instant,
    peer: SocketAddr,
    /// Complete, waiting for the stream's caps.
    request: Option<http::Request>,
}

pub struct Server {
    /// One per address the host resolves to (`localhost`: 127.0.0.1 and ::1).
    listeners: Vec<TcpListener>,
    /// Out of fds: accepting resumes at this time.
    accept_paused_until: Option<Instant>,
    /// Refused connections being drained before they are closed: stream, deadline,
    /// bytes drained.
    closing: Vec<(TcpStream, Instant, usize)>,
    /// By the number of their `ServiceToken::Connection`.
    incoming: HashMap<u64, Incoming>,
    next_connection: u64,
    config: Arc<Mutex<ServerConfig>>,
    accepted: AcceptedSockets,
}

/// Binds every address `host` resolves to, on `port` (0: a free port, the same for
/// all), with the given listen backlog. Fails only if none can be bound.
pub fn bind_listeners(host: &str, port: u16, backlog: i32) -> std::io::Result<Vec<TcpListener>> {
    let mut addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    addrs.dedup();
    // IPv4 first, so port 0 picks a port that IPv6 then usually also has free.
    addrs.sort_by_key(|a| a.is_ipv6());
    let mut bound: Vec<TcpListener> = Vec::new();
    let mut last = None;
    for mut addr in addrs {
        if let Some(first) = bound.first() {
            addr.set_port(first.local_addr()?.port());
        }
        match bind_one(addr, backlog) {
            Ok(l) => bound.push(l),
            Err(e) => last = Some(e),
        }
    }
    if bound.is_empty() {
        return Err(last.unwrap_or_else(|| {
            std::io::Error::new(
                ErrorKind::NotFound,
                format!("{host} resolves to no address"),
            )
        }));
    }
    Ok(bound)
}

fn bind_one(addr: SocketAddr, backlog: i32) -> std::io::Result<TcpListener> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    listen(
        &fd,
        Backlog::new(backlog.clamp(1, i32::MAX)).map_err(std::io::Error::from)?,
    )?;
    Ok(TcpListener::from(fd))
}

impl Server {
    /// Serves `listeners` as `config` says (read for each connection, so changes
    /// apply to the next one) and puts the sockets it hands over in `accepted`.
    pub fn new(
        listeners: Vec<TcpListener>,
        config: Arc<Mutex<ServerConfig>>,
        accepted: AcceptedSockets,
    ) -> Self {
        Server {
            listeners,
            accept_paused_until: None,
            closing: Vec::new(),
            incoming: HashMap::new(),
            next_connection: 0,
            config,
            accepted,
        }
    }

    /// Watches every listening socket.
    fn watch_listeners(&self, registry: &Registry<'_>) -> std::io::Result<()> {
        for (i, l) in self.listeners.iter().enumerate() {
            registry.register(l.as_fd(), ServiceToken::Listener(i))?;
        }
        Ok(())
    }

    fn accept_all(&mut self, registry: &Registry<'_>, which: usize) {
        loop {
            let Some(listener) = self.listeners.get(which) else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => self.accepted(registry, stream, peer),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // Out of fds or memory: the connection stays queued and the
                // listener readable, so stop watching it for a while rather than
                // spin; tick() watches it again.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(
                            nix::libc::EMFILE
                                | nix::libc::ENFILE
                                | nix::libc::ENOBUFS
                                | nix::libc::ENOMEM
                        )
                    ) =>
                {
                    log!(
                        registry,
                        Warning,
                        "accept failed: {e}; pausing accepts for {ACCEPT_PAUSE:?}"
                    );
                    registry.deregister(listener.as_fd());
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    return;
                }
                // An aborted connection: nothing to do for this one.
                Err(e) => {
                    log!(registry, Info, "accept failed: {e}");
                    continue;
                }
            }
        }
    }

    fn accepted(&mut self, registry: &Registry<'_>, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let config = self.config.lock().unwrap().clone();
        log!(registry, Info, "connection from {peer}");
        if !config.http {
            if registry.refusing_clients() {
                // Raw TCP has no way to say why: the connection is closed.
                log!(registry, Info, "{peer}: refused, the sink is overloaded");
                return;
            }
            self.hand_over(registry, stream, peer);
            return;
        }
        let token = self.next_connection;
        self.next_connection += 1;
        if let Err(e) = registry.register(stream.as_fd(), ServiceToken::Connection(token)) {
            log!(
                registry,
                Warning,
                "cannot watch connection from {peer}: {e}"
            );
            return;
        }
        let incoming = Incoming {
            stream,
            head: Vec::new(),
            deadline: Instant::now() + config.header_timeout,
            peer,
            request: None,
        };
        self.incoming.insert(token, incoming);
        // Data may already be there: edge cases of level-triggered epoll aside, read now.
        self.read_request(registry, token);
    }

    /// Reads what the connection sent; answers once the head is complete.
    fn read_request(&mut self, registry: &Registry<'_>, token: u64) {
        let Some(p) = self.incoming.get_mut(&token) else {
            return;
        };
        let max_head = self.config.lock().unwrap().max_header_size;
        let mut buf = [0u8; 2048];
        loop {
            match p.stream.read(&mut buf) {
                Ok(0) => {
                    log!(registry, Info, "{}: closed before its request", p.peer);
                    self.drop_incoming(registry, token);
                    return;
                }
                // A complete request waits for caps: anything more is dropped.
                Ok(_) if p.request.is_some() => continue,
                Ok(n) => {
                    p.head.extend_from_slice(&buf[..n]);
                    // Parse again only when the head may have ended (or grown too
                    // large, or just started), so a slow large head costs linear time.
                    let from = p.head.len().saturating_sub(n + 3);
                    let may_end = p.head[from..].contains(&b'\n');
                    if !may_end && p.head.len() <= max_head && p.head.len() > n {
                        continue;
                    }
                    match http::parse_request(&p.head, max_head) {
                        Parsed::Incomplete => continue,
                        Parsed::Request(r) => {
                            p.request = Some(r);
                            break;
                        }
                        Parsed::Refused(r) => {
                            let (code, reason) = r.status();
                            self.refuse(registry, token, code, reason);
                            return;
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.drop_incoming(registry, token);
                    return;
                }
            }
        }
        self.answer(registry, token);
    }

    /// Answers a complete request, unless the stream's caps are not known yet: then
    /// it waits (until its deadline) so the Content-Type is right.
    fn answer(&mut self, registry: &Registry<'_>, token: u64) {
        let config = self.config.lock().unwrap().clone();
        let Some(req) = self.incoming.get(&token).and_then(|p| p.request.clone()) else {
            return;
        };
        if config.mount.as_ref().is_some_and(|m| *m != req.path) {
            return self.refuse(registry, token, 404, "Not Found");
        }
        if config.max_clients > 0 && registry.client_count() >= config.max_clients as usize
            || registry.refusing_clients()
        {
            return self.refuse(registry, token, 503, "Service Unavailable");
        }
        let Some(content_type) = config.content_type else {
            return;
        };
        let Some(mut p) = self.take_incoming(registry, token) else {
            return;
        };
        let head = http::stream_head(&content_type);
        log!(
            registry,
            Info,
            "{}: {:?} {} -> 200 ({content_type})",
            p.peer,
            req.method,
            req.path
        );
        if req.method == Method::Head {
            let _ = p.stream.write_all(&head);
            return;
        }
        // The head is small and the socket's buffer empty: one write does it.
        match p.stream.write(&head) {
            Ok(n) if n == head.len() => self.hand_over(registry, p.stream, p.peer),
            _ => log!(
                registry,
                Info,
                "{}: could not write the response head",
                p.peer
            ),
        }
    }

    /// Answers with an error status and closes the connection.
    fn refuse(&mut self, registry: &Registry<'_>, token: u64, code: u16, reason: &str) {
        if let Some(mut p) = self.take_incoming(registry, token) {
            log!(registry, Info, "{}: refused with {code} {reason}", p.peer);
            let _ = p.stream.write(&http::error_head(code, reason));
            // Closing with unread request bytes would send a reset that can destroy
            // the answer in flight: end our side, then drain theirs for a while.
            let _ = p.stream.shutdown(std::net::Shutdown::Write);
            self.closing.push((p.stream, Instant::now() + LINGER, 0));
        }
    }

    /// Drains refused connections until the peer closes, the deadline passes or
    /// they sent too much; then closes them.
    fn drain_closing(&mut self, now: Instant) {
        let mut buf = [0u8; 4096];
        self.closing.retain_mut(|(stream, deadline, drained)| {
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return false,
                    Ok(n) => {
                        *drained += n;
                        if *drained > LINGER_BYTES {
                            return false;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return *deadline > now,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return false,
                }
            }
        });
    }

    fn hand_over(&mut self, registry: &Registry<'_>, stream: TcpStream, peer: SocketAddr) {
        let fd = OwnedFd::from(stream);
        let raw = fd.as_raw_fd();
        // Ours before add: the engine may remove it (and we close it) at once.
        self.accepted.lock().unwrap().insert(raw, fd);
        log!(registry, Debug, "{peer}: streaming to fd {raw}");
        if registry.add_client(raw) != AddOutcome::Added {
            self.accepted.lock().unwrap().remove(&raw);
        }
    }

    fn take_incoming(&mut self, registry: &Registry<'_>, token: u64) -> Option<Incoming> {
        let p = self.incoming.remove(&token)?;
        registry.deregister(p.stream.as_fd());
        Some(p)
    }

    fn drop_incoming(&mut self, registry: &Registry<'_>, token: u64) {
        drop(self.take_incoming(registry, token));
    }
}

impl Service for Server {
    fn register(&mut self, registry: &Registry<'_>) -> std::io::Result<()> {
        self.watch_listeners(registry)
    }

    fn deregister(&mut self, registry: &Registry<'_>) {
        for l in &self.listeners {
            registry.deregister(l.as_fd());
        }
        let tokens: Vec<u64> = self.incoming.keys().copied().collect();
        for t in tokens {
            self.drop_incoming(registry, t);
        }
        self.closing.clear();
    }

    fn event(&mut self, registry: &Registry<'_>, token: ServiceToken) {
        match token {
            ServiceToken::Listener(i) => self.accept_all(registry, i),
            ServiceToken::Connection(n) => self.read_request(registry, n),
        }
    }

    fn tick(&mut self, registry: &Registry<'_>, now: Instant) -> Option<Instant> {
        if self.accept_paused_until.is_some_and(|t| t <= now) {
            self.accept_paused_until = None;
            let _ = self.watch_listeners(registry);
        }
        // Requests that waited for caps: answer those that can be answered now.
        let waiting: Vec<u64> = self
            .incoming
            .iter()
            .filter(|(_, p)| p.request.is_some())
            .map(|(t, _)| *t)
            .collect();
        for t in waiting {
            self.answer(registry, t);
        }
        let expired: Vec<(u64, bool)> = self
            .incoming
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(t, p)| (*t, p.request.is_some()))
            .collect();
        for (t, complete) in expired {
            if complete {
                // The stream never started (no caps): nothing to serve yet.
                self.refuse(registry, t, 503, "Service Unavailable");
            } else {
                self.refuse(registry, t, 408, "Request Timeout");
            }
        }
        self.drain_closing(now);
        let drain_poll = (!self.closing.is_empty()).then(|| now + LINGER_POLL);
        [
            self.incoming.values().map(|p| p.deadline).min(),
            drain_poll,
            self.accept_paused_until,
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// Closes a socket the server accepted, once the engine forgot it (after
/// `client-fd-removed`). False for an fd the server did not accept.
pub fn release(accepted: &AcceptedSockets, fd: RawFd) -> bool {
    accepted.lock().unwrap().remove(&fd).is_some()
}
