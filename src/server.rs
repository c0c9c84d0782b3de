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

use crate::engine::core::{LogLevel, Shared, log};
use crate::engine::{AUX_TOKEN, AddOutcome, Aux, ClientConfig};
use crate::http::{self, Method, Parsed};

/// The token of the listening socket; pending connections use higher numbers.
const LISTENER_TOKEN: u64 = 0;

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

/// Sockets the server accepted and so must close once the engine forgot them.
pub type Owned = Arc<Mutex<HashMap<RawFd, OwnedFd>>>;

/// A connection still sending its request head.
struct Pending {
    stream: TcpStream,
    head: Vec<u8>,
    deadline: Instant,
    peer: SocketAddr,
}

pub struct Server {
    listener: TcpListener,
    pending: HashMap<u64, Pending>,
    next_token: u64,
    pub config: Arc<Mutex<ServerConfig>>,
    /// How each accepted socket joins (the element's `add` settings).
    pub client_config: Arc<Mutex<ClientConfig>>,
    owned: Owned,
}

/// Binds `host:port` (port 0: any free port) with the given listen backlog.
pub fn bind_listener(host: &str, port: u16, backlog: i32) -> std::io::Result<TcpListener> {
    let mut last = None;
    for addr in (host, port).to_socket_addrs()? {
        match bind_one(addr, backlog) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            ErrorKind::NotFound,
            format!("{host} resolves to no address"),
        )
    }))
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
        listener: TcpListener,
        config: Arc<Mutex<ServerConfig>>,
        client_config: Arc<Mutex<ClientConfig>>,
        owned: Owned,
    ) -> Self {
        Server {
            listener,
            pending: HashMap::new(),
            next_token: LISTENER_TOKEN + 1,
            config,
            client_config,
            owned,
        }
    }

    fn accept_all(&mut self, shared: &Shared) {
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => self.accepted(shared, stream, peer),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // Out of fds, aborted connections: nothing to do for this one.
                Err(e) => {
                    log!(shared.listener, Warning, "accept failed: {e}");
                    return;
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
        let config = self.config.lock().unwrap().clone();
        let mut buf = [0u8; 2048];
        let parsed = loop {
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
                Ok(n) => {
                    p.head.extend_from_slice(&buf[..n]);
                    match http::parse_request(&p.head, config.max_header_size) {
                        Parsed::Incomplete => continue,
                        Parsed::Request(r) => break Ok(r),
                        Parsed::Refused(r) => break Err(r),
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.drop_pending(shared, token);
                    return;
                }
            }
        };
        let mut p = self
            .take_pending(shared, token)
            .expect("pending connection");
        let (code, reason) = match parsed {
            Err(r) => r.status(),
            Ok(req) if config.mount.as_ref().is_some_and(|m| *m != req.path) => (404, "Not Found"),
            Ok(_)
                if config.max_clients > 0
                    && shared.client_count() >= config.max_clients as usize =>
            {
                (503, "Service Unavailable")
            }
            Ok(req) => {
                let content_type = config
                    .content_type
                    .as_deref()
                    .unwrap_or("application/octet-stream");
                let head = http::stream_head(content_type);
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
                return;
            }
        };
        log!(
            shared.listener,
            Info,
            "{}: refused with {code} {reason}",
            p.peer
        );
        let _ = p.stream.write(&http::error_head(code, reason));
        let _ = p.stream.flush();
    }

    fn hand_over(&mut self, shared: &Shared, stream: TcpStream, peer: SocketAddr) {
        let fd = OwnedFd::from(stream);
        let raw = fd.as_raw_fd();
        // Owned before add: the engine may remove it (and we close it) at once.
        self.owned.lock().unwrap().insert(raw, fd);
        let config = *self.client_config.lock().unwrap();
        log!(shared.listener, Debug, "{peer}: streaming to fd {raw}");
        if shared.add(raw, config) != AddOutcome::Added {
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
        shared
            .epoll
            .add(
                self.listener.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, AUX_TOKEN | LISTENER_TOKEN),
            )
            .map_err(Into::into)
    }

    fn unregister(&mut self, shared: &Shared) {
        let _ = shared.epoll.delete(self.listener.as_fd());
        self.close_pending(shared);
    }

    fn event(&mut self, shared: &Shared, token: u64, _flags: EpollFlags) {
        if token == LISTENER_TOKEN {
            self.accept_all(shared);
        } else {
            self.read_request(shared, token);
        }
    }

    fn tick(&mut self, shared: &Shared, now: Instant) -> Option<Instant> {
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in expired {
            if let Some(mut p) = self.take_pending(shared, t) {
                log!(
                    shared.listener,
                    Info,
                    "{}: no complete request in time, closing",
                    p.peer
                );
                let _ = p.stream.write(&http::error_head(408, "Request Timeout"));
            }
        }
        self.pending.values().map(|p| p.deadline).min()
    }
}

/// Closes an accepted socket once the engine forgot it.
pub fn release(owned: &Owned, fd: RawFd) -> bool {
    owned.lock().unwrap().remove(&fd).is_some()
}
