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

use nix::sys::epoll::{EpollEvent, EpollFlags};
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt, socket,
    sockopt,
};

use crate::engine::shard::Shared;
use crate::engine::types::{LogLevel, log};
use crate::engine::{AUX_TOKEN, AddOutcome, Aux, ClientConfig};
use crate::http::{self, Method, Parsed};

/// Tokens below this are listening sockets; pending connections use higher numbers.
const FIRST_PENDING_TOKEN: u64 = 16;

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
            max_clients: 0,
            header_timeout: Duration::from_secs(10),
            max_header_size: 8192,
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
pub type Owned = Arc<Mutex<HashMap<RawFd, OwnedFd>>>;

/// A connection still sending its request head.
struct Pending {
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
    pending: HashMap<u64, Pending>,
    next_token: u64,
    pub config: Arc<Mutex<ServerConfig>>,
    /// How each accepted socket joins (the element's `add` settings).
    pub client_config: Arc<Mutex<ClientConfig>>,
    owned: Owned,
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
    if bound.len() > FIRST_PENDING_TOKEN as usize {
        bound.truncate(FIRST_PENDING_TOKEN as usize);
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
    pub fn new(
        listeners: Vec<TcpListener>,
        config: Arc<Mutex<ServerConfig>>,
        client_config: Arc<Mutex<ClientConfig>>,
        owned: Owned,
    ) -> Self {
        Server {
            listeners,
            accept_paused_until: None,
            closing: Vec::new(),
            pending: HashMap::new(),
            next_token: FIRST_PENDING_TOKEN,
            config,
            client_config,
            owned,
        }
    }

    fn accept_all(&mut self, shared: &Shared, which: usize) {
        loop {
            let Some(listener) = self.listeners.get(which) else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => self.accepted(shared, stream, peer),
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
                        shared.listener,
                        Warning,
                        "accept failed: {e}; pausing accepts for {ACCEPT_PAUSE:?}"
                    );
                    let _ = shared.epoll.delete(listener.as_fd());
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    return;
                }
                // An aborted connection: nothing to do for this one.
                Err(e) => {
                    log!(shared.listener, Info, "accept failed: {e}");
                    continue;
                }
            }
        }
    }

    fn accepted(&mut self, shared: &Shared, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let config = self.config.lock().unwrap().clone();
        log!(shared.listener, Info, "connection from {peer}");
        if !config.http {
            self.hand_over(shared, stream, peer);
            return;
        }
        let token = self.next_token;
        self.next_token += 1;
        let event = EpollEvent::new(
            EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP,
            AUX_TOKEN | token,
        );
        if let Err(e) = shared.epoll.add(stream.as_fd(), event) {
            log!(
                shared.listener,
                Warning,
                "cannot watch connection from {peer}: {e}"
            );
            return;
        }
        let pending = Pending {
            stream,
            head: Vec::new(),
            deadline: Instant::now() + config.header_timeout,
            peer,
            request: None,
        };
        self.pending.insert(token, pending);
        // Data may already be there: edge cases of level-triggered epoll aside, read now.
        self.read_request(shared, token);
    }

    /// Reads what the connection sent; answers once the head is complete.
    fn read_request(&mut self, shared: &Shared, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let max_head = self.config.lock().unwrap().max_header_size;
        let mut buf = [0u8; 2048];
        loop {
            match p.stream.read(&mut buf) {
                Ok(0) => {
                    log!(
                        shared.listener,
                        Info,
                        "{}: closed before its request",
                        p.peer
                    );
                    self.drop_pending(shared, token);
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
                            self.refuse(shared, token, code, reason);
                            return;
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.drop_pending(shared, token);
                    return;
                }
            }
        }
        self.answer(shared, token);
    }

    /// Answers a complete request, unless the stream's caps are not known yet: then
    /// it waits (until its deadline) so the Content-Type is right.
    fn answer(&mut self, shared: &Shared, token: u64) {
        let config = self.config.lock().unwrap().clone();
        let Some(req) = self.pending.get(&token).and_then(|p| p.request.clone()) else {
            return;
        };
        if config.mount.as_ref().is_some_and(|m| *m != req.path) {
            return self.refuse(shared, token, 404, "Not Found");
        }
        if config.max_clients > 0 && shared.client_count_routed() >= config.max_clients as usize {
            return self.refuse(shared, token, 503, "Service Unavailable");
        }
        let Some(content_type) = config.content_type else {
            return;
        };
        let Some(mut p) = self.take_pending(shared, token) else {
            return;
        };
        let head = http::stream_head(&content_type);
        log!(
            shared.listener,
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
            Ok(n) if n == head.len() => self.hand_over(shared, p.stream, p.peer),
            _ => log!(
                shared.listener,
                Info,
                "{}: could not write the response head",
                p.peer
            ),
        }
    }

    /// Answers with an error status and closes the connection.
    fn refuse(&mut self, shared: &Shared, token: u64, code: u16, reason: &str) {
        if let Some(mut p) = self.take_pending(shared, token) {
            log!(
                shared.listener,
                Info,
                "{}: refused with {code} {reason}",
                p.peer
            );
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

    fn hand_over(&mut self, shared: &Shared, stream: TcpStream, peer: SocketAddr) {
        let fd = OwnedFd::from(stream);
        let raw = fd.as_raw_fd();
        // Owned before add: the engine may remove it (and we close it) at once.
        self.owned.lock().unwrap().insert(raw, fd);
        let config = *self.client_config.lock().unwrap();
        log!(shared.listener, Debug, "{peer}: streaming to fd {raw}");
        if shared.add_routed(raw, config) != AddOutcome::Added {
            self.owned.lock().unwrap().remove(&raw);
        }
    }

    fn take_pending(&mut self, shared: &Shared, token: u64) -> Option<Pending> {
        let p = self.pending.remove(&token)?;
        let _ = shared.epoll.delete(p.stream.as_fd());
        Some(p)
    }

    fn drop_pending(&mut self, shared: &Shared, token: u64) {
        drop(self.take_pending(shared, token));
    }

    /// Closes every connection still sending its request.
    pub fn close_pending(&mut self, shared: &Shared) {
        let tokens: Vec<u64> = self.pending.keys().copied().collect();
        for t in tokens {
            self.drop_pending(shared, t);
        }
    }
}

impl Aux for Server {
    fn register(&mut self, shared: &Shared) -> std::io::Result<()> {
        for (i, l) in self.listeners.iter().enumerate() {
            let event = EpollEvent::new(EpollFlags::EPOLLIN, AUX_TOKEN | i as u64);
            shared.epoll.add(l.as_fd(), event)?;
        }
        Ok(())
    }

    fn unregister(&mut self, shared: &Shared) {
        for l in &self.listeners {
            let _ = shared.epoll.delete(l.as_fd());
        }
        self.close_pending(shared);
        self.closing.clear();
    }

    fn event(&mut self, shared: &Shared, token: u64, _flags: EpollFlags) {
        if token < FIRST_PENDING_TOKEN {
            self.accept_all(shared, token as usize);
        } else {
            self.read_request(shared, token);
        }
    }

    fn tick(&mut self, shared: &Shared, now: Instant) -> Option<Instant> {
        if self.accept_paused_until.is_some_and(|t| t <= now) {
            self.accept_paused_until = None;
            for (i, l) in self.listeners.iter().enumerate() {
                let event = EpollEvent::new(EpollFlags::EPOLLIN, AUX_TOKEN | i as u64);
                let _ = shared.epoll.add(l.as_fd(), event);
            }
        }
        // Requests that waited for caps: answer those that can be answered now.
        let waiting: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.request.is_some())
            .map(|(t, _)| *t)
            .collect();
        for t in waiting {
            self.answer(shared, t);
        }
        let expired: Vec<(u64, bool)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(t, p)| (*t, p.request.is_some()))
            .collect();
        for (t, complete) in expired {
            if complete {
                // The stream never started (no caps): nothing to serve yet.
                self.refuse(shared, t, 503, "Service Unavailable");
            } else {
                self.refuse(shared, t, 408, "Request Timeout");
            }
        }
        self.drain_closing(now);
        let drain_poll = (!self.closing.is_empty()).then(|| now + LINGER_POLL);
        [
            self.pending.values().map(|p| p.deadline).min(),
            drain_poll,
            self.accept_paused_until,
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// Closes an accepted socket once the engine forgot it.
pub fn release(owned: &Owned, fd: RawFd) -> bool {
    owned.lock().unwrap().remove(&fd).is_some()
}
