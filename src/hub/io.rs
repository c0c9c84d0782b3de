// SPDX-License-Identifier: MPL-2.0

//! The hub's thread: accepts without blocking, reads each connection's PROXY
//! header (with `proxy-protocol`) and request head (bounded size, one deadline for
//! both), routes the request, answers it and hands the socket over; refused
//! connections are drained for a moment before they are closed, so the answer is
//! not destroyed by a reset.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{SigSet, Signal};

use super::{ClientInfo, Mount, MountTarget, Shared, Wrap};
use crate::access_log::AccessEntry;
use crate::engine::log;
use crate::http::{self, Method, Parsed, Request};
use crate::metrics;
use crate::proxy_protocol::{ProxiedAddresses, ProxyParsed, parse_proxy_header};
use crate::server::{self, Decision, PortSettings, Refused, ServerConfig, Situation};

/// How long accepting pauses when the process is out of fds.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// How long a refused connection is drained before it is closed, and how often.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_POLL: Duration = Duration::from_millis(50);
/// The most a refused connection may still send before it is closed anyway.
const LINGER_BYTES: usize = 256 * 1024;
/// Epoll's numbers: the waker, the listeners from 1, connections from here.
const WAKER: u64 = 0;
const CONNECTION: u64 = 1 << 32;
/// The longest request line kept for the access log of a request refused as bad.
const BAD_LINE_MAX: usize = 256;

/// A connection's socket: TCP as accepted, or (once TLS terminates it) the plaintext
/// end of a socketpair. Either way the engine gets an fd that behaves like the
/// client's socket.
pub(super) enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    fn shutdown_write(&self) {
        let _ = match self {
            Socket::Tcp(s) => s.shutdown(Shutdown::Write),
            Socket::Unix(s) => s.shutdown(Shutdown::Write),
        };
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read(buf),
            Socket::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write(buf),
            Socket::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Tcp(s) => s.as_fd(),
            Socket::Unix(s) => s.as_fd(),
        }
    }
}

impl From<Socket> for OwnedFd {
    fn from(s: Socket) -> OwnedFd {
        match s {
            Socket::Tcp(s) => s.into(),
            Socket::Unix(s) => s.into(),
        }
    }
}

/// Where a connection is before it is answered.
enum Stage {
    /// Reading the PROXY header.
    Proxy,
    /// Reading the request head.
    Request,
    /// The request is complete; it waits for the stream's caps (for its type).
    Answering(Box<Request>),
}

/// A connection accepted that is no client yet.
struct Pending {
    socket: Socket,
    /// The client's address: the socket's peer, or the PROXY header's source.
    client: SocketAddr,
    peer: SocketAddr,
    /// Read and not yet consumed: the PROXY header, then the request head.
    buf: Vec<u8>,
    stage: Stage,
    deadline: Instant,
    accepted: Instant,
    accepted_wall: SystemTime,
}

/// A refused connection: its answer goes out, then it is drained and closed.
struct Closing {
    socket: Socket,
    unsent: Vec<u8>,
    deadline: Instant,
    drained: usize,
}

pub(super) struct Io {
    shared: Arc<Shared>,
    epoll: Epoll,
    listeners: Vec<TcpListener>,
    settings: PortSettings,
    /// Out of fds: accepting resumes at this time.
    accept_paused_until: Option<Instant>,
    /// By their epoll number, which grows: the first is the oldest.
    pending: BTreeMap<u64, Pending>,
    next_connection: u64,
    closing: Vec<Closing>,
    /// What the port does to each connection before its request (TLS).
    wrap: Option<Wrap>,
}

/// What a request is answered for: the element it was routed to (or the port's
/// first, for what belongs to none) and that element's policy now.
struct Routed {
    mount: Mount,
    config: ServerConfig,
}

impl Io {
    pub(super) fn new(
        shared: Arc<Shared>,
        listeners: Vec<TcpListener>,
        settings: PortSettings,
        wrap: Option<Wrap>,
    ) -> std::io::Result<Io> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(&shared.waker, EpollEvent::new(EpollFlags::EPOLLIN, WAKER))?;
        let io = Io {
            shared,
            epoll,
            listeners,
            settings,
            accept_paused_until: None,
            pending: BTreeMap::new(),
            next_connection: 0,
            closing: Vec::new(),
            wrap,
        };
        io.watch_listeners()?;
        Ok(io)
    }

    fn watch_listeners(&self) -> std::io::Result<()> {
        for (i, l) in self.listeners.iter().enumerate() {
            let event = EpollEvent::new(EpollFlags::EPOLLIN, 1 + i as u64);
            self.epoll.add(l, event)?;
        }
        Ok(())
    }

    /// The thread: until the last element leaves. Dropping `self` at the end
    /// closes the listening sockets and every connection not handed over.
    pub(super) fn run(mut self) {
        // A write to a socket whose peer went away must not kill the process
        // (std's socket writes use MSG_NOSIGNAL; this covers anything else).
        let mut sigpipe = SigSet::empty();
        sigpipe.add(Signal::SIGPIPE);
        let _ = sigpipe.thread_block();
        let mut events = vec![EpollEvent::empty(); 256];
        let mut due = Some(Instant::now());
        while !self.shared.stop.load(Ordering::SeqCst) {
            let timeout = due.map_or(EpollTimeout::NONE, |d| {
                let wait = d.saturating_duration_since(Instant::now());
                // Rounded up, so a deadline is not polled for in a busy loop.
                let ms = wait.as_nanos().div_ceil(1_000_000).min(60_000) as u64;
                EpollTimeout::try_from(Duration::from_millis(ms)).unwrap_or(EpollTimeout::NONE)
            });
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(Errno::EINTR) => 0,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(10));
                    0
                }
            };
            let mut woken = false;
            for ev in &events[..n] {
                match ev.data() {
                    WAKER => {
                        let _ = self.shared.waker.read();
                        woken = true;
                    }
                    t if t >= CONNECTION => self.read_connection(t - CONNECTION),
                    t => self.accept_all((t - 1) as usize),
                }
            }
            if woken {
                // The caps may have come: answer the requests that waited for them.
                let waiting: Vec<u64> = self
                    .pending
                    .iter()
                    .filter(|(_, p)| matches!(p.stage, Stage::Answering(_)))
                    .map(|(t, _)| *t)
                    .collect();
                for t in waiting {
                    self.answer(t);
                }
            }
            due = self.tick(Instant::now());
        }
    }

    /// The element whose settings are the port's (the first that joined); `None`
    /// when none is left (the hub is going).
    fn first(&self) -> Option<Routed> {
        let mount = self.shared.mounts().into_iter().next()?;
        let config = mount
            .config
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Some(Routed { mount, config })
    }

    fn accept_all(&mut self, which: usize) {
        loop {
            let Some(listener) = self.listeners.get(which) else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => self.accepted(stream, server::canonical(peer)),
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
                    if let Some(first) = self.first() {
                        log!(
                            first.mount.target,
                            Warning,
                            "accept failed: {e}; pausing accepts for {ACCEPT_PAUSE:?}"
                        );
                    }
                    for l in &self.listeners {
                        let _ = self.epoll.delete(l);
                    }
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    return;
                }
                // An aborted connection: nothing to do for this one.
                Err(e) => {
                    if let Some(first) = self.first() {
                        log!(first.mount.target, Info, "accept failed: {e}");
                    }
                    continue;
                }
            }
        }
    }

    fn accepted(&mut self, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        // No element left: the hub is going, the connection is closed.
        let Some(first) = self.first() else { return };
        let target = &first.mount.target;
        log!(target, Info, "connection from {peer}");
        let now = Instant::now();
        if !first.config.http {
            if target.refusing_clients() {
                // Raw TCP has no way to say why: the connection is closed.
                log!(target, Info, "{peer}: refused, the sink is overloaded");
                return;
            }
            let info = ClientInfo {
                address: peer,
                socket_peer: peer,
                started: SystemTime::now(),
                started_at: now,
                request_line: None,
                referer: None,
                user_agent: None,
                user: None,
                head_bytes: 0,
            };
            // Raw TCP over TLS: the element streams to the plaintext end at once;
            // the handshake must end by `header-timeout` as a request would.
            let socket = match &self.wrap {
                None => Socket::Tcp(stream),
                Some(wrap) => match wrap(stream, Vec::new(), now + first.config.header_timeout) {
                    Ok(plain) => Socket::Unix(plain),
                    Err(e) => {
                        log!(target, Info, "{peer}: cannot be wrapped: {e}; closed");
                        return;
                    }
                },
            };
            hand_over(target, socket, info);
            return;
        }
        let max_pending = self.settings.max_pending as usize;
        while max_pending > 0 && self.pending.len() >= max_pending {
            let Some((&oldest, p)) = self.pending.iter().next() else {
                break;
            };
            log!(
                target,
                Info,
                "{}: dropped, the oldest of {} connections without a finished request (max-pending)",
                p.client,
                self.pending.len()
            );
            self.take_pending(oldest);
        }
        let token = self.next_connection;
        self.next_connection += 1;
        let event = EpollEvent::new(
            EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP,
            CONNECTION + token,
        );
        if let Err(e) = self.epoll.add(&stream, event) {
            log!(target, Warning, "cannot watch connection from {peer}: {e}");
            return;
        }
        let p = Pending {
            socket: Socket::Tcp(stream),
            client: peer,
            peer,
            buf: Vec::new(),
            stage: Stage::Proxy,
            deadline: now + first.config.header_timeout,
            accepted: now,
            accepted_wall: SystemTime::now(),
        };
        self.pending.insert(token, p);
        if !self.settings.proxy_protocol && !self.start_request(token) {
            return;
        }
        // Data may already be there: read now.
        self.read_connection(token);
    }

    /// Reads what the connection sent and moves it on as far as that allows.
    fn read_connection(&mut self, token: u64) {
        let mut buf = [0u8; 2048];
        loop {
            let Some(p) = self.pending.get_mut(&token) else {
                return;
            };
            match p.socket.read(&mut buf) {
                Ok(0) => {
                    let what = match p.stage {
                        Stage::Proxy => "its PROXY header",
                        Stage::Request => "its request",
                        Stage::Answering(_) => "its answer",
                    };
                    let client = p.client;
                    if let Some(first) = self.first() {
                        log!(first.mount.target, Info, "{client}: closed before {what}");
                    }
                    self.take_pending(token);
                    return;
                }
                // A complete request waits for caps: anything more is dropped.
                Ok(_) if matches!(p.stage, Stage::Answering(_)) => continue,
                Ok(n) => {
                    p.buf.extend_from_slice(&buf[..n]);
                    self.advance(token, n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.take_pending(token);
                    return;
                }
            }
        }
    }

    /// Parses what the connection has sent so far (`n` bytes just arrived).
    fn advance(&mut self, token: u64, n: usize) {
        let Some(first) = self.first() else {
            self.take_pending(token);
            return;
        };
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let mut fresh = n;
        if matches!(p.stage, Stage::Proxy) {
            match parse_proxy_header(&p.buf) {
                ProxyParsed::NeedMore => return,
                ProxyParsed::Invalid(why) => {
                    log!(
                        first.mount.target,
                        Info,
                        "{}: {why} (proxy-protocol is on); closed",
                        p.peer
                    );
                    self.take_pending(token);
                    return;
                }
                ProxyParsed::Complete(header) => {
                    if let ProxiedAddresses::Tcp { source, .. } = header.addresses {
                        p.client = server::canonical(source);
                    }
                    log!(
                        first.mount.target,
                        Debug,
                        "{}: PROXY v{} header: the client is {}",
                        p.peer,
                        header.version,
                        p.client
                    );
                    // What came after the header is the start of the request
                    // (or of the TLS handshake).
                    p.buf.drain(..header.consumed);
                }
            }
            if !self.start_request(token) {
                return;
            }
            let Some(again) = self.pending.get_mut(&token) else {
                return;
            };
            fresh = again.buf.len();
            if fresh == 0 {
                return;
            }
        }
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let max_head = first.config.max_header_size;
        // Parse again only when the head may have ended (or grown too large, or
        // just started), so a slow large head costs linear time.
        let from = p.buf.len().saturating_sub(fresh + 3);
        let may_end = p.buf[from..].contains(&b'\n');
        if !may_end && p.buf.len() <= max_head && p.buf.len() > fresh {
            return;
        }
        match http::parse_request(&p.buf, max_head) {
            Parsed::Incomplete => {}
            Parsed::Request(r) => {
                p.stage = Stage::Answering(Box::new(r));
                p.buf = Vec::new();
                self.answer(token);
            }
            Parsed::Refused(r) => {
                let (code, reason) = r.status();
                let why = format!("{r:?}");
                self.refuse(token, first, None, Refused::new(code, reason, why));
            }
        }
    }

    /// Routes a complete request and answers it, unless the stream's caps are not
    /// known yet: then it waits (until its deadline) so the Content-Type is right.
    fn answer(&mut self, token: u64) {
        let Some(Stage::Answering(req)) = self.pending.get(&token).map(|p| &p.stage) else {
            return;
        };
        let req = (**req).clone();
        let mounts = self.shared.mounts();
        if mounts.is_empty() {
            self.take_pending(token);
            return;
        }
        let configs: Vec<ServerConfig> = mounts
            .iter()
            .map(|m| m.config.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect();
        if matches!(req.method, Method::Get | Method::Head)
            && let Some(i) = configs
                .iter()
                .position(|c| c.metrics_path.as_deref() == Some(req.path.as_str()))
        {
            let routed = Routed {
                mount: mounts[i].clone(),
                config: configs[i].clone(),
            };
            return self.answer_metrics(token, &mounts, routed, &req);
        }
        let Some(i) = server::route(configs.iter().map(|c| c.mount.as_deref()), &req.path) else {
            let first = Routed {
                mount: mounts[0].clone(),
                config: configs[0].clone(),
            };
            let why = "no element serves this path".to_string();
            return self.refuse(
                token,
                first,
                Some(&req),
                Refused::new(404, "Not Found", why),
            );
        };
        let routed = Routed {
            mount: mounts[i].clone(),
            config: configs[i].clone(),
        };
        let Some(p) = self.pending.get(&token) else {
            return;
        };
        let ip = p.client.ip();
        let target = &routed.mount.target;
        let situation = Situation {
            clients: target.client_count(),
            clients_from_ip: if routed.config.max_clients_per_ip > 0 {
                mounts.iter().map(|m| m.target.clients_from(ip)).sum()
            } else {
                0
            },
            refusing: target.refusing_clients(),
            now: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        match server::decide(&routed.config, &req, &situation) {
            Decision::Refuse(r) => self.refuse(token, routed, Some(&req), r),
            Decision::Preflight => {
                let origin = routed.config.cors_origin.clone().unwrap_or_default();
                let head = http::preflight_head(&origin);
                self.answer_and_close(token, &routed, &req, 204, head, false);
            }
            Decision::Serve { user } => {
                let Some(content_type) = routed.config.content_type.clone() else {
                    return;
                };
                self.serve(token, routed, &req, &content_type, user);
            }
        }
    }

    /// 200 and the stream (GET: the socket goes to the element) or its head only.
    fn serve(
        &mut self,
        token: u64,
        routed: Routed,
        req: &Request,
        content_type: &str,
        user: Option<String>,
    ) {
        let cors = cors_headers(&routed.config);
        let head = http::stream_head_with(content_type, &cors);
        if req.method == Method::Head {
            return self.answer_and_close(token, &routed, req, 200, head, false);
        }
        let Some(mut p) = self.take_pending(token) else {
            return;
        };
        let target = &routed.mount.target;
        log!(
            target,
            Info,
            "{}: GET {} -> 200 ({content_type})",
            p.client,
            req.path
        );
        // The head is small and the socket's buffer empty: one write does it.
        match p.socket.write(&head) {
            Ok(n) if n == head.len() => {
                let info = ClientInfo {
                    address: p.client,
                    socket_peer: p.peer,
                    started: p.accepted_wall,
                    started_at: p.accepted,
                    request_line: Some(req.line.clone()),
                    referer: req.referer.clone(),
                    user_agent: req.user_agent.clone(),
                    user,
                    head_bytes: head.len() as u64,
                };
                hand_over(target, p.socket, info);
            }
            _ => log!(
                target,
                Info,
                "{}: could not write the response head",
                p.client
            ),
        }
    }

    /// The metrics of every element on the port.
    fn answer_metrics(&mut self, token: u64, mounts: &[Mount], routed: Routed, req: &Request) {
        let figures: Vec<metrics::MountFigures> =
            mounts.iter().map(|m| m.target.figures()).collect();
        let body = metrics::exposition(&figures);
        let length = body.len().to_string();
        let mut headers = vec![
            ("Content-Type", metrics::CONTENT_TYPE),
            ("Content-Length", length.as_str()),
            ("Cache-Control", "no-cache"),
            ("Connection", "close"),
        ];
        let cors = cors_headers(&routed.config);
        headers.extend_from_slice(&cors);
        let mut answer = http::response_head(200, "OK", &headers);
        if req.method == Method::Get {
            answer.extend_from_slice(body.as_bytes());
        }
        self.answer_and_close(token, &routed, req, 200, answer, false);
    }

    /// Refuses the connection with an error status (or a redirect) and closes it.
    /// `req` is `None` when no complete request came.
    fn refuse(&mut self, token: u64, routed: Routed, req: Option<&Request>, r: Refused) {
        let mut extra = cors_headers(&routed.config);
        if let Some(location) = &r.location {
            extra.push(("Location", location));
        }
        if r.code == 401 {
            extra.push(("WWW-Authenticate", "Bearer"));
        }
        let head = http::error_head_with(r.code, r.reason, &extra);
        let Some(p) = self.pending.get(&token) else {
            return;
        };
        let target = &routed.mount.target;
        match req {
            Some(req) => log!(
                target,
                Info,
                "{}: {:?} {} refused with {} {} ({})",
                p.client,
                req.method,
                req.path,
                r.code,
                r.reason,
                r.why
            ),
            None => log!(
                target,
                Info,
                "{}: refused with {} {} ({})",
                p.client,
                r.code,
                r.reason,
                r.why
            ),
        }
        let bad_line;
        let line = match req {
            Some(req) => req.line.as_str(),
            None => {
                // What a bad request started with, for the log (escaped there).
                let end = p
                    .buf
                    .iter()
                    .position(|b| *b == b'\r' || *b == b'\n')
                    .unwrap_or(p.buf.len())
                    .min(BAD_LINE_MAX);
                bad_line = String::from_utf8_lossy(&p.buf[..end]).into_owned();
                if bad_line.is_empty() { "-" } else { &bad_line }
            }
        };
        let entry = AccessEntry {
            client: p.client.ip(),
            user: None,
            started: p.accepted_wall,
            request_line: line,
            status: r.code,
            body_bytes: 0,
            referer: req.and_then(|r| r.referer.as_deref()),
            user_agent: req.and_then(|r| r.user_agent.as_deref()),
            bytes_sent: head.len() as u64,
            duration: p.accepted.elapsed(),
            removal: None,
        };
        target.answered(&entry, true);
        if let Some(p) = self.take_pending(token) {
            self.close_after(p.socket, head);
        }
    }

    /// Answers `answer` (a whole response) and closes: HEAD, preflights, metrics.
    fn answer_and_close(
        &mut self,
        token: u64,
        routed: &Routed,
        req: &Request,
        status: u16,
        answer: Vec<u8>,
        refused: bool,
    ) {
        let Some(p) = self.take_pending(token) else {
            return;
        };
        let target = &routed.mount.target;
        log!(
            target,
            Info,
            "{}: {:?} {} -> {status}",
            p.client,
            req.method,
            req.path
        );
        let head_len = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(answer.len(), |i| i + 4);
        let entry = AccessEntry {
            client: p.client.ip(),
            user: None,
            started: p.accepted_wall,
            request_line: &req.line,
            status,
            body_bytes: (answer.len() - head_len) as u64,
            referer: req.referer.as_deref(),
            user_agent: req.user_agent.as_deref(),
            bytes_sent: answer.len() as u64,
            duration: p.accepted.elapsed(),
            removal: None,
        };
        target.answered(&entry, refused);
        self.close_after(p.socket, answer);
    }

    /// Writes what it can of `answer` now, the rest later, then ends our side and
    /// drains theirs for a while: closing with unread request bytes would send a
    /// reset that can destroy the answer in flight.
    fn close_after(&mut self, mut socket: Socket, answer: Vec<u8>) {
        let sent = match socket.write(&answer) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
            Err(_) => return,
        };
        let unsent = answer[sent..].to_vec();
        if unsent.is_empty() {
            socket.shutdown_write();
        }
        self.closing.push(Closing {
            socket,
            unsent,
            deadline: Instant::now() + LINGER,
            drained: 0,
        });
    }

    /// Sends what refused connections still have to get, drains them until the
    /// peer closes, the deadline passes or they sent too much; then closes them.
    fn drain_closing(&mut self, now: Instant) {
        let mut buf = [0u8; 4096];
        self.closing.retain_mut(|c| {
            if !c.unsent.is_empty() {
                match c.socket.write(&c.unsent) {
                    Ok(n) => {
                        c.unsent.drain(..n);
                        if c.unsent.is_empty() {
                            c.socket.shutdown_write();
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => return false,
                }
            }
            loop {
                match c.socket.read(&mut buf) {
                    Ok(0) if c.unsent.is_empty() => return false,
                    Ok(0) => return c.deadline > now,
                    Ok(n) => {
                        c.drained += n;
                        if c.drained > LINGER_BYTES {
                            return false;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return c.deadline > now,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return false,
                }
            }
        });
    }

    /// Does what is due at `now`; returns when to be called next.
    fn tick(&mut self, now: Instant) -> Option<Instant> {
        if self.accept_paused_until.is_some_and(|t| t <= now) {
            self.accept_paused_until = None;
            let _ = self.watch_listeners();
        }
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in expired {
            self.expire(t);
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

    /// A connection whose deadline passed.
    fn expire(&mut self, token: u64) {
        let Some(first) = self.first() else {
            self.take_pending(token);
            return;
        };
        let Some(p) = self.pending.get(&token) else {
            return;
        };
        match &p.stage {
            Stage::Proxy => {
                log!(
                    first.mount.target,
                    Info,
                    "{}: no PROXY header in time; closed",
                    p.peer
                );
                self.take_pending(token);
            }
            Stage::Request => {
                let r = Refused::new(408, "Request Timeout", "no request in time");
                self.refuse(token, first, None, r);
            }
            Stage::Answering(req) => {
                // The stream never started (no caps): nothing to serve yet.
                let req = (**req).clone();
                let routed = self.route(&req.path).unwrap_or(first);
                let r = Refused::new(503, "Service Unavailable", "the stream has not started");
                self.refuse(token, routed, Some(&req), r);
            }
        }
    }

    /// The connection's PROXY header, if any, is read: the request comes next. The
    /// one place where a port's `wrap` (TLS) takes the TCP connection and the bytes
    /// read after the PROXY header, and gives back the plaintext end of a
    /// socketpair, which is watched from then on instead. False if the connection
    /// is gone (it could not be wrapped).
    fn start_request(&mut self, token: u64) -> bool {
        let Some(p) = self.pending.get_mut(&token) else {
            return false;
        };
        p.stage = Stage::Request;
        let Some(wrap) = self.wrap.clone() else {
            return true;
        };
        let Some(mut p) = self.take_pending(token) else {
            return false;
        };
        let Socket::Tcp(tcp) = p.socket else {
            unreachable!("only TCP connections are accepted");
        };
        let target = self.first().map(|f| f.mount.target);
        match wrap(tcp, std::mem::take(&mut p.buf), p.deadline) {
            Ok(plain) => {
                p.socket = Socket::Unix(plain);
                let event = EpollEvent::new(
                    EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP,
                    CONNECTION + token,
                );
                if let Err(e) = self.epoll.add(&p.socket, event) {
                    if let Some(t) = &target {
                        log!(t, Warning, "cannot watch connection from {}: {e}", p.client);
                    }
                    return false;
                }
                self.pending.insert(token, p);
                true
            }
            Err(e) => {
                if let Some(t) = &target {
                    log!(t, Info, "{}: cannot be wrapped: {e}; closed", p.client);
                }
                false
            }
        }
    }

    /// The element that serves `path` now, with its policy.
    fn route(&self, path: &str) -> Option<Routed> {
        let mounts = self.shared.mounts();
        let configs: Vec<ServerConfig> = mounts
            .iter()
            .map(|m| m.config.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect();
        let i = server::route(configs.iter().map(|c| c.mount.as_deref()), path)?;
        Some(Routed {
            mount: mounts[i].clone(),
            config: configs[i].clone(),
        })
    }

    fn take_pending(&mut self, token: u64) -> Option<Pending> {
        let p = self.pending.remove(&token)?;
        let _ = self.epoll.delete(&p.socket);
        Some(p)
    }
}

/// The CORS header of every answer of an element with `cors-origin`.
fn cors_headers(config: &ServerConfig) -> Vec<(&'static str, &str)> {
    match &config.cors_origin {
        Some(origin) => vec![("Access-Control-Allow-Origin", origin.as_str())],
        None => Vec::new(),
    }
}

fn hand_over(target: &Arc<dyn MountTarget>, socket: Socket, info: ClientInfo) {
    let client = info.address;
    let fd = OwnedFd::from(socket);
    log!(
        target,
        Debug,
        "{client}: streaming to fd {}",
        fd.as_raw_fd()
    );
    if !target.hand_over(fd, info) {
        log!(target, Info, "{client}: not taken, the element is stopping");
    }
}
