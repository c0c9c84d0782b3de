//! The engine's state and every rule that moves clients through the stream.
//!
//! One mutex guards the queue and all clients. The streaming thread holds it only to
//! append a buffer and move the clients that this buffer concerns; the IO thread
//! holds it while it writes a batch of clients. Writes are non-blocking, so nobody
//! ever waits on a client, and because writes happen under the lock an fd is never
//! written after `remove` returned, even when the application closes and reuses it.

use std::fmt;
use std::io::IoSlice;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{MsgFlags, sendmsg, setsockopt, sockopt};
use nix::sys::stat::{SFlag, fstat};

use super::client::{Client, ClientId, FdKind, IdMap, Pending, Phase, Watch};
use super::queue::{BufferQueue, same_streamheader};
use super::{
    Amount, Chunk, ClientConfig, ClientStats, ClientStatus, Fd, Payload, RecoverPolicy,
    Streamheader, SyncMethod, Unit,
};

/// The epoll token of the waker eventfd; client tokens are their ids.
pub(crate) const WAKER_TOKEN: u64 = u64::MAX;
/// Most buffers handed to one `writev`/`sendmsg` (Linux's IOV_MAX).
const MAX_IOV: usize = 1024;
/// Bytes one client may write in one turn before the others get theirs.
const TURN_BUDGET: usize = 4 << 20;

/// Receives what happens to clients. Called without any engine lock held, so a
/// handler may call back into the engine.
pub trait Listener: Send + Sync {
    fn client_added(&self, fd: Fd);
    fn client_removed(&self, fd: Fd, status: ClientStatus);
    fn client_fd_removed(&self, fd: Fd);
    /// With `Settings::keep_input`: bytes a client sent (on the IO thread).
    fn client_input(&self, _fd: Fd, _data: Vec<u8>) {}
    /// With `Settings::report_sent`: a buffer, queued or streamheader, was written
    /// whole to the client (on the IO thread).
    fn buffer_sent(&self, _fd: Fd, _data: &Payload) {}
    /// Diagnostics; `args` is formatted only if the listener wants it. Unlike the
    /// signals above, this may be called with the engine lock held: it must not call
    /// back into the engine.
    fn log(&self, _level: LogLevel, _args: fmt::Arguments<'_>) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Warning,
    Info,
    Debug,
    Log,
}

/// Engine-wide settings; may change while streaming.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// A client with more than this still to send is removed as slow.
    pub units_max: Option<Amount>,
    /// A client with more than this still to send is recovered by `recover_policy`.
    pub units_soft_max: Option<Amount>,
    pub recover_policy: RecoverPolicy,
    /// Keep at least this much queued even when no client needs it (for bursts).
    pub buffers_min: Option<u64>,
    pub bytes_min: Option<u64>,
    pub time_min: Option<u64>,
    /// Keep the newest keyframe queued (the default sync method starts on one).
    pub keep_keyframe: bool,
    /// Remove clients that wrote nothing for this long.
    pub timeout: Option<Duration>,
    /// Read and discard what clients send; notice when they close.
    pub handle_read: bool,
    /// With `handle_read`, hand what clients send to `Listener::client_input`.
    pub keep_input: bool,
    /// Tell `Listener::buffer_sent` of every buffer written whole to a client.
    pub report_sent: bool,
    pub resend_streamheader: bool,
    /// DSCP for client sockets.
    pub qos_dscp: Option<u8>,
    /// Where clients added without a placement of their own start.
    pub default_placement: ClientConfig,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            units_max: None,
            units_soft_max: None,
            recover_policy: RecoverPolicy::None,
            buffers_min: None,
            bytes_min: None,
            time_min: None,
            keep_keyframe: false,
            timeout: None,
            handle_read: true,
            keep_input: false,
            report_sent: false,
            resend_streamheader: true,
            qos_dscp: None,
            default_placement: ClientConfig::default(),
        }
    }
}

/// The read-only figures of the element.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub bytes_to_serve: u64,
    pub bytes_served: u64,
    pub buffers_queued: u64,
    pub bytes_queued: u64,
    pub time_queued: u64,
    pub num_handles: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddOutcome {
    Added,
    /// The fd is already a client; `client-removed(duplicate)` was emitted.
    Duplicate,
    /// The engine is not started (element in NULL); nothing was done.
    NotRunning,
}

pub(crate) struct State {
    pub settings: Settings,
    queue: BufferQueue,
    streamheader: Option<Streamheader>,
    clients: IdMap<ClientId, Client>,
    by_fd: IdMap<RawFd, ClientId>,
    /// Clients not being removed (`num-handles`), kept so reading it walks nothing.
    live: usize,
    next_id: ClientId,
    /// Lists may hold stale ids; a client's phase says whether it belongs.
    ready: std::collections::VecDeque<ClientId>,
    idle: Vec<ClientId>,
    joining: Vec<ClientId>,
    /// Removed by the streaming side or the IO thread; the IO thread emits signals.
    pub removed: Vec<(ClientId, RawFd, ClientStatus)>,
    /// With `keep_input` / `report_sent`: what the IO thread reports after a pass,
    /// with no lock held.
    pub input: Vec<(RawFd, Vec<u8>)>,
    pub sent: Vec<(RawFd, Payload)>,
    running: bool,
    bytes_to_serve: u64,
    bytes_served: u64,
    scratch: Vec<u8>,
    /// The IO thread's clock reading for the batch it is writing.
    pub now: Instant,
}

pub(crate) struct Shared {
    pub state: Mutex<State>,
    pub epoll: Epoll,
    pub waker: EventFd,
    pub stop: AtomicBool,
    /// Streaming threads waiting for the lock in `push`: the IO thread yields to them.
    pub pushers: std::sync::atomic::AtomicUsize,
    pub listener: Arc<dyn Listener>,
    pub aux: Mutex<Option<Box<dyn Aux>>>,
    /// Where an aux's new clients go (all shards), once the engine set it.
    pub router: std::sync::OnceLock<std::sync::Weak<dyn ClientSink>>,
}

/// Epoll tokens with this bit belong to the `Aux`.
pub const AUX_TOKEN: u64 = 1 << 62;

/// More fds for the IO thread to serve besides clients (the server sink's listening
/// socket and connections still sending a request). Called on the IO thread without
/// the engine lock, so it may add clients.
pub(crate) trait Aux: Send {
    /// Adds its fds to `shared.epoll`, with tokens that have `AUX_TOKEN` set.
    fn register(&mut self, shared: &Shared) -> std::io::Result<()>;
    fn unregister(&mut self, shared: &Shared);
    /// An epoll event for one of its tokens (`AUX_TOKEN` cleared).
    fn event(&mut self, shared: &Shared, token: u64, flags: EpollFlags);
    /// Does what is due at `now`; returns when to be called next.
    fn tick(&mut self, shared: &Shared, now: Instant) -> Option<Instant>;
}

/// Adds clients on behalf of an aux: the engine routes them to a shard.
pub(crate) trait ClientSink: Send + Sync {
    fn add(&self, fd: Fd, config: ClientConfig) -> AddOutcome;
    fn client_count(&self) -> usize;
}

/// One IO thread with its clients and its own copy of the queue (the buffers
/// themselves are shared). The engine (`super::Engine`) runs one or more.
pub(crate) struct Shard {
    pub(crate) shared: Arc<Shared>,
    thread: Mutex<Option<(JoinHandle<()>, ThreadId)>>,
}

macro_rules! log {
    ($listener:expr, $level:ident, $($arg:tt)*) => {
        $listener.log(LogLevel::$level, format_args!($($arg)*))
    };
}
pub(crate) use log;

impl Shared {
    /// Adds a client. `client-added` is emitted before this returns; a bad fd is
    /// removed later by the IO thread, never inside `add`.
    pub fn add(&self, fd: Fd, config: ClientConfig) -> AddOutcome {
        let shared = self;
        let id = {
            let mut st = shared.lock();
            if !st.running {
                return AddOutcome::NotRunning;
            }
            if let Some(&existing) = st.by_fd.get(&fd) {
                let removing = st
                    .clients
                    .get(&existing)
                    .is_some_and(|c| c.phase == Phase::Removing);
                if !removing {
                    drop(st);
                    log!(
                        shared.listener,
                        Warning,
                        "client fd {fd}: already added, refusing duplicate"
                    );
                    shared.listener.client_removed(fd, ClientStatus::Duplicate);
                    return AddOutcome::Duplicate;
                }
            }
            let id = st.next_id;
            st.next_id += 1;
            let (kind, watch) = open_client_fd(fd, id, st.settings.handle_read, &shared.epoll);
            if let Watch::Broken(e) = watch {
                log!(
                    shared.listener,
                    Warning,
                    "client fd {fd}: unusable ({e}), will be removed"
                );
            }
            if kind == FdKind::Socket {
                apply_dscp(fd, st.settings.qos_dscp);
            }
            let mut client = Client::new(id, fd, kind, watch, config);
            client.handle_read = st.settings.handle_read;
            st.clients.insert(id, client);
            st.live += 1;
            st.by_fd.insert(fd, id);
            log!(
                shared.listener,
                Info,
                "client fd {fd}: added ({kind:?}, {watch:?}, {config:?})"
            );
            id
        };
        shared.listener.client_added(fd);
        let mut st = shared.lock();
        if let Some(c) = st.clients.get_mut(&id).filter(|c| c.phase == Phase::Adding) {
            if let Some(status) = c.removal_requested {
                // Removed (clear, remove, stop) while client-added was emitted.
                c.phase = Phase::Joining;
                let removed = st.mark_removed(id, status, shared);
                drop(st);
                shared.finish_removals(removed.into_iter().collect());
                return AddOutcome::Added;
            }
            if matches!(c.watch, Watch::Broken(_)) {
                c.phase = Phase::Ready;
                st.ready.push_back(id);
            } else {
                c.phase = Phase::Joining;
                st.joining.push(id);
            }
        }
        // With a timeout, the IO thread must wake up to time this client out even if
        // its fd never becomes ready (a full pipe, a regular file).
        let wake = !st.ready.is_empty() || st.settings.timeout.is_some();
        drop(st);
        if wake {
            shared.wake();
        }
        AddOutcome::Added
    }

    /// Adds a client through the engine, so it lands on the right shard.
    pub fn add_routed(&self, fd: Fd, config: ClientConfig) -> AddOutcome {
        match self.router.get().and_then(|r| r.upgrade()) {
            Some(router) => router.add(fd, config),
            None => self.add(fd, config),
        }
    }

    /// Clients of the whole engine.
    pub fn client_count_routed(&self) -> usize {
        match self.router.get().and_then(|r| r.upgrade()) {
            Some(router) => router.client_count(),
            None => self.client_count(),
        }
    }

    /// Clients that are not being removed.
    pub fn client_count(&self) -> usize {
        self.lock().live
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough state for removal.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn wake(&self) {
        let _ = self.waker.write(1);
    }

    /// Emits the signals of clients already marked removed, then forgets them.
    pub fn finish_removals(&self, removed: Vec<(ClientId, RawFd, ClientStatus)>) {
        for (id, fd, status) in removed {
            if let Some(c) = self.lock().clients.get(&id) {
                let s = c.stats();
                log!(
                    self.listener,
                    Info,
                    "client fd {fd}: removed ({status:?}) after {} bytes in {:.3} s, {} buffers dropped",
                    s.bytes_sent,
                    s.connect_duration as f64 / 1e9,
                    s.buffers_dropped
                );
            }
            self.listener.client_removed(fd, status);
            self.lock().forget(id);
            self.listener.client_fd_removed(fd);
        }
    }
}

impl Shard {
    pub fn new(listener: Arc<dyn Listener>) -> std::io::Result<Shard> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let waker =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        epoll.add(&waker, EpollEvent::new(EpollFlags::EPOLLIN, WAKER_TOKEN))?;
        let state = State {
            settings: Settings::default(),
            queue: BufferQueue::default(),
            streamheader: None,
            clients: IdMap::default(),
            by_fd: IdMap::default(),
            live: 0,
            next_id: 1,
            ready: Default::default(),
            idle: Vec::new(),
            joining: Vec::new(),
            removed: Vec::new(),
            input: Vec::new(),
            sent: Vec::new(),
            running: false,
            bytes_to_serve: 0,
            bytes_served: 0,
            scratch: vec![0; 4096],
            now: Instant::now(),
        };
        Ok(Shard {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                epoll,
                waker,
                stop: AtomicBool::new(false),
                pushers: Default::default(),
                listener,
                aux: Mutex::new(None),
                router: std::sync::OnceLock::new(),
            }),
            thread: Mutex::new(None),
        })
    }

    pub fn is_running(&self) -> bool {
        self.thread.lock().unwrap().is_some()
    }

    /// Starts the IO thread; clients can be added from now on.
    pub fn start(&self) -> std::io::Result<()> {
        let mut thread = self.thread.lock().unwrap();
        if thread.is_some() {
            return Ok(());
        }
        self.shared.stop.store(false, Ordering::SeqCst);
        {
            let mut st = self.shared.lock();
            st.running = true;
            // bytes-to-serve and bytes-served count from the last start (NULL→READY).
            st.bytes_to_serve = 0;
            st.bytes_served = 0;
        }
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("rsmultifdsink-io".into())
            .spawn(move || super::io::run(shared))?;
        let id = handle.thread().id();
        *thread = Some((handle, id));
        Ok(())
    }

    /// Stops the IO thread, removes every client (status removed) and drops the queue
    /// and streamheader.
    pub fn stop(&self) {
        let thread = self.thread.lock().unwrap().take();
        self.shared.lock().running = false;
        if let Some((handle, id)) = thread {
            self.shared.stop.store(true, Ordering::SeqCst);
            self.shared.wake();
            // A signal handler on the IO thread may stop the element: do not join
            // ourselves; the thread ends when the handler returns.
            if std::thread::current().id() != id {
                let _ = handle.join();
            }
        }
        // The listening socket and connections still sending a request go first.
        // (The lock is only busy when a handler on the IO thread stops us.)
        if let Ok(mut slot) = self.shared.aux.try_lock()
            && let Some(mut aux) = slot.take()
        {
            aux.unregister(&self.shared);
        }
        let removed = {
            let mut st = self.shared.lock();
            let mut removed = std::mem::take(&mut st.removed);
            let ids: Vec<ClientId> = st.clients.keys().copied().collect();
            for id in ids {
                if let Some(r) = st.mark_removed(id, ClientStatus::Removed, &self.shared) {
                    removed.push(r);
                }
            }
            st.queue.clear();
            st.streamheader = None;
            st.idle.clear();
            st.ready.clear();
            st.joining.clear();
            st.input.clear();
            st.sent.clear();
            removed
        };
        self.shared.finish_removals(removed);
    }

    pub fn set_settings(&self, settings: Settings) {
        let mut st = self.shared.lock();
        let dscp_changed = st.settings.qos_dscp != settings.qos_dscp;
        st.settings = settings;
        if dscp_changed {
            let dscp = st.settings.qos_dscp;
            for c in st.clients.values().filter(|c| c.kind == FdKind::Socket) {
                apply_dscp(c.fd, dscp);
            }
        }
        // Tighter limits take effect now, not at the next buffer.
        st.enforce_limits(&self.shared);
        drop(st);
        // Always: the IO thread may be waiting with no timeout while a new `timeout`
        // must now expire idle clients, or have removals to signal.
        self.shared.wake();
    }

    /// Wakes the IO thread (for the aux to look at what changed).
    pub(crate) fn wake(&self) {
        self.shared.wake();
    }

    /// Adds a client. `client-added` is emitted before this returns; a bad fd is
    /// removed later by the IO thread, never inside `add`.
    pub fn add(&self, fd: Fd, config: ClientConfig) -> AddOutcome {
        self.shared.add(fd, config)
    }

    /// Lets the IO thread also serve `aux` (a listening socket and its pending
    /// connections); `None` unregisters the current one.
    pub(crate) fn set_aux(&self, aux: Option<Box<dyn Aux>>) -> std::io::Result<()> {
        let mut slot = self.shared.aux.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut old) = slot.take() {
            old.unregister(&self.shared);
        }
        if let Some(mut new) = aux {
            new.register(&self.shared)?;
            *slot = Some(new);
        }
        drop(slot);
        self.shared.wake();
        Ok(())
    }

    /// Removes a client now: both signals are emitted before this returns.
    pub fn remove(&self, fd: Fd, status: ClientStatus) -> bool {
        let removed = {
            let mut st = self.shared.lock();
            let id = st.by_fd.get(&fd).copied();
            let removed = id.and_then(|id| st.mark_removed(id, status, &self.shared));
            // Being added on another thread: that thread removes it after client-added.
            if removed.is_none()
                && id
                    .and_then(|id| st.clients.get(&id))
                    .is_some_and(|c| c.removal_requested.is_some())
            {
                return true;
            }
            removed
        };
        match removed {
            Some(r) => {
                self.shared.finish_removals(vec![r]);
                true
            }
            None => {
                log!(
                    self.shared.listener,
                    Warning,
                    "client fd {fd}: no such client to remove"
                );
                false
            }
        }
    }

    /// Sends what is already queued for the client, nothing newer, then removes it.
    pub fn remove_flush(&self, fd: Fd) -> bool {
        let mut st = self.shared.lock();
        let Some(id) = st.by_fd.get(&fd).copied() else {
            drop(st);
            log!(
                self.shared.listener,
                Warning,
                "client fd {fd}: no such client to flush"
            );
            return false;
        };
        let next = st.queue.next_seq();
        let c = st.clients.get_mut(&id).expect("indexed client");
        match c.phase {
            Phase::Removing => {
                drop(st);
                log!(
                    self.shared.listener,
                    Warning,
                    "client fd {fd}: already being removed"
                );
                false
            }
            Phase::Ready | Phase::Blocked if c.flush_until.is_none() => {
                log!(
                    self.shared.listener,
                    Info,
                    "client fd {fd}: flushing {} buffers",
                    next - c.pos
                );
                c.flush_until = Some(next);
                c.status = ClientStatus::Flushing;
                true
            }
            _ if c.flush_until.is_some() => true,
            _ => {
                // Nothing queued for it: it goes now.
                let r = st.mark_removed(id, ClientStatus::Removed, &self.shared);
                drop(st);
                self.shared.finish_removals(r.into_iter().collect());
                true
            }
        }
    }

    /// Removes every client (status removed).
    pub fn clear(&self) {
        let removed = {
            let mut st = self.shared.lock();
            let ids: Vec<ClientId> = st.clients.keys().copied().collect();
            ids.into_iter()
                .filter_map(|id| st.mark_removed(id, ClientStatus::Removed, &self.shared))
                .collect()
        };
        self.shared.finish_removals(removed);
    }

    /// Sets the caps' streamheader. Identical bytes keep the current generation, so
    /// clients are not sent the same headers again.
    pub fn set_streamheader(&self, buffers: Option<Vec<super::Payload>>) {
        let mut st = self.shared.lock();
        let same = match (&st.streamheader, &buffers) {
            (Some(old), Some(new)) => {
                old.len() == new.len()
                    && old
                        .iter()
                        .zip(new)
                        .all(|(a, b)| (**a).as_ref() == (**b).as_ref())
            }
            (None, None) => true,
            _ => false,
        };
        if !same {
            log!(
                self.shared.listener,
                Debug,
                "new streamheader of {} buffers",
                buffers.as_ref().map_or(0, |b| b.len())
            );
            st.streamheader = buffers.filter(|b| !b.is_empty()).map(Arc::new);
        }
    }

    /// Queues a buffer for every client. Never blocks on a client.
    pub fn push(&self, chunk: Chunk) {
        self.shared.pushers.fetch_add(1, Ordering::AcqRel);
        let mut st = self.shared.lock();
        self.shared.pushers.fetch_sub(1, Ordering::AcqRel);
        if chunk.header && st.repeats_streamheader(&chunk) {
            // Already sent from the caps to every client that needs it.
            return;
        }
        st.push(chunk, &self.shared);
        let wake = !st.ready.is_empty() || !st.removed.is_empty();
        drop(st);
        if wake {
            self.shared.wake();
        }
    }

    pub fn stats(&self, fd: Fd) -> Option<ClientStats> {
        let st = self.shared.lock();
        let id = st.by_fd.get(&fd)?;
        st.clients.get(id).map(|c| c.stats())
    }

    pub fn counters(&self) -> Counters {
        let st = self.shared.lock();
        Counters {
            bytes_to_serve: st.bytes_to_serve,
            bytes_served: st.bytes_served,
            buffers_queued: st.queue.len() as u64,
            bytes_queued: st.queue.bytes_queued(),
            time_queued: st.queue.time_queued(),
            num_handles: st.live as u64,
        }
    }

    /// Whether `fd` is a client that is not being removed.
    pub fn has_client(&self, fd: Fd) -> bool {
        let st = self.shared.lock();
        st.by_fd
            .get(&fd)
            .and_then(|id| st.clients.get(id))
            .is_some_and(|c| c.phase != Phase::Removing)
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Classifies the fd, makes it non-blocking and watches it. Errors make the client
/// broken, to be removed by the IO thread.
fn open_client_fd(fd: RawFd, id: ClientId, handle_read: bool, epoll: &Epoll) -> (FdKind, Watch) {
    if fd < 0 {
        return (FdKind::Stream, Watch::Broken(Errno::EBADF));
    }
    // SAFETY: the fd is only borrowed for these calls; the number may be closed, in
    // which case the calls fail with EBADF.
    let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
    let st = match fstat(bfd) {
        Ok(st) => st,
        Err(e) => return (FdKind::Stream, Watch::Broken(e)),
    };
    let file_type = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    if file_type == SFlag::S_IFDIR {
        return (FdKind::Stream, Watch::Broken(Errno::EISDIR));
    }
    let kind = if file_type == SFlag::S_IFSOCK {
        FdKind::Socket
    } else {
        FdKind::Stream
    };
    let flags = match fcntl(bfd, FcntlArg::F_GETFL) {
        Ok(f) => OFlag::from_bits_truncate(f),
        Err(e) => return (kind, Watch::Broken(e)),
    };
    if (flags & OFlag::O_ACCMODE) == OFlag::O_RDONLY {
        return (kind, Watch::Broken(Errno::EBADF));
    }
    if let Err(e) = fcntl(bfd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)) {
        return (kind, Watch::Broken(e));
    }
    // EPOLLOUT is only watched while the client is blocked (see `watch_writable`):
    // a caught-up client would otherwise wake the IO thread every time its peer
    // reads.
    match epoll.add(bfd, EpollEvent::new(base_events(handle_read), id)) {
        Ok(()) => (kind, Watch::Epoll),
        // Regular files and block devices cannot be polled: always writable.
        Err(Errno::EPERM) => (kind, Watch::AlwaysWritable),
        Err(e) => (kind, Watch::Broken(e)),
    }
}

/// What a client's fd is always watched for.
fn base_events(handle_read: bool) -> EpollFlags {
    if handle_read {
        EpollFlags::EPOLLIN | EpollFlags::EPOLLET
    } else {
        EpollFlags::EPOLLET
    }
}

/// Watches a blocked client's fd for space (edge-triggered), or stops watching once
/// it is writable again. Re-arming also reports space that appeared meanwhile.
fn watch_writable(epoll: &Epoll, c: &Client, on: bool) {
    if c.watch != Watch::Epoll {
        return;
    }
    let mut events = base_events(c.handle_read);
    if on {
        events |= EpollFlags::EPOLLOUT;
    }
    // SAFETY: the app keeps the fd open until client-fd-removed.
    let bfd = unsafe { BorrowedFd::borrow_raw(c.fd) };
    let _ = epoll.modify(bfd, &mut EpollEvent::new(events, c.id));
}

fn apply_dscp(fd: RawFd, dscp: Option<u8>) {
    let Some(dscp) = dscp else { return };
    let tos = i32::from(dscp) << 2;
    // SAFETY: borrowed for one call; a stale number only makes the call fail.
    let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
    if setsockopt(&bfd, sockopt::Ipv4Tos, &tos).is_err() {
        let _ = setsockopt(&bfd, sockopt::Ipv6TClass, &tos);
    }
}

/// What a turn of writing did to a client.
enum Turn {
    /// Everything sent; wait for the next buffer.
    CaughtUp,
    /// The fd is full.
    Blocked,
    /// Used its budget; more to send.
    Yield,
    /// `remove-flush` finished.
    Flushed,
    Failed(Errno),
}

impl State {
    fn repeats_streamheader(&self, chunk: &Chunk) -> bool {
        let bytes = (*chunk.data).as_ref();
        self.streamheader
            .as_ref()
            .is_some_and(|sh| sh.iter().any(|h| (**h).as_ref() == bytes))
    }

    fn push(&mut self, chunk: Chunk, shared: &Shared) {
        self.bytes_to_serve += chunk.len() as u64;
        let seq = self.queue.push(chunk, self.streamheader.clone());
        for id in std::mem::take(&mut self.idle) {
            if let Some(c) = self.clients.get_mut(&id).filter(|c| c.phase == Phase::Idle) {
                c.phase = Phase::Ready;
                self.ready.push_back(id);
            }
        }
        self.place_joining(seq, shared);
        self.enforce_limits(shared);
    }

    /// Gives clients that wait to join a start position, now that buffer `seq` is in.
    fn place_joining(&mut self, seq: u64, shared: &Shared) {
        if self.joining.is_empty() {
            return;
        }
        let mut still = Vec::new();
        for id in std::mem::take(&mut self.joining) {
            let Some(c) = self.clients.get(&id).filter(|c| c.phase == Phase::Joining) else {
                continue;
            };
            match start_position(&self.queue, &c.config, seq) {
                Some(pos) => {
                    log!(
                        shared.listener,
                        Debug,
                        "client fd {}: starts at buffer {} ({} queued after it)",
                        c.fd,
                        pos,
                        seq + 1 - pos
                    );
                    self.queue.add_ref(pos);
                    let c = self.clients.get_mut(&id).unwrap();
                    c.pos = pos;
                    c.positioned = true;
                    c.phase = Phase::Ready;
                    self.ready.push_back(id);
                }
                None => still.push(id),
            }
        }
        self.joining = still;
    }

    /// Removes clients past `units-max`, recovers clients past `units-soft-max`, then
    /// drops the buffers nobody needs.
    fn enforce_limits(&mut self, shared: &Shared) {
        let hard = self.settings.units_max.map(|a| self.queue.oldest_within(a));
        let soft = match self.settings.recover_policy {
            RecoverPolicy::None => None,
            _ => self
                .settings
                .units_soft_max
                .map(|a| self.queue.oldest_within(a)),
        };
        let boundary = match (hard, soft) {
            (Some(h), Some(s)) => Some(h.max(s)),
            (h, s) => h.or(s),
        };
        if let (Some(boundary), Some(oldest)) = (boundary, self.queue.oldest_referenced())
            && oldest < boundary
        {
            // Somebody lags: find who. Costs a scan only when a client must go or
            // be moved, never for ordinary buffers.
            let laggards: Vec<ClientId> = self
                .clients
                .values()
                .filter(|c| c.positioned && c.pos < boundary)
                .map(|c| c.id)
                .collect();
            for id in laggards {
                let pos = self.clients[&id].pos;
                if hard.is_some_and(|h| pos < h) {
                    let fd = self.clients[&id].fd;
                    log!(
                        shared.listener,
                        Info,
                        "client fd {fd}: too slow ({} buffers behind), removing",
                        self.queue.next_seq() - pos
                    );
                    if let Some(r) = self.mark_removed(id, ClientStatus::Slow, shared) {
                        self.removed.push(r);
                    }
                } else if let Some(s) = soft.filter(|s| pos < *s) {
                    self.recover(id, s, shared);
                }
            }
        }
        self.trim();
    }

    fn recover(&mut self, id: ClientId, soft_boundary: u64, shared: &Shared) {
        let next = self.queue.next_seq();
        let old = self.clients[&id].pos;
        let new = match self.settings.recover_policy {
            RecoverPolicy::None => return,
            RecoverPolicy::Latest => next,
            RecoverPolicy::SoftLimit => soft_boundary,
            // The oldest keyframe within the soft limit.
            RecoverPolicy::Keyframe => self
                .queue
                .keyframe_at_or_after(soft_boundary)
                .unwrap_or(next),
        };
        self.queue.drop_ref(old);
        self.queue.add_ref(new);
        let c = self.clients.get_mut(&id).unwrap();
        c.pos = new;
        c.buffers_dropped += new - old;
        log!(
            shared.listener,
            Info,
            "client fd {}: over soft limit, skipped {} buffers ({:?})",
            c.fd,
            new - old,
            self.settings.recover_policy
        );
    }

    fn trim(&mut self) {
        let next = self.queue.next_seq();
        // The newest buffer always stays, as in multifdsink (buffers-queued is 1
        // with no clients, and a latest-keyframe client can start on it).
        let mut keep = self
            .queue
            .oldest_referenced()
            .unwrap_or(next)
            .min(next.saturating_sub(1));
        let s = &self.settings;
        let mins = [
            s.buffers_min.map(|v| Amount::new(Unit::Buffers, v)),
            s.bytes_min.map(|v| Amount::new(Unit::Bytes, v)),
            s.time_min.map(|v| Amount::new(Unit::Time, v)),
        ];
        for min in mins.into_iter().flatten() {
            keep = keep.min(
                self.queue
                    .seq_holding_at_least(min)
                    .unwrap_or(self.queue.first_seq()),
            );
        }
        if s.keep_keyframe
            && let Some(k) = self.queue.newest_keyframe_since(0)
        {
            keep = keep.min(k);
        }
        self.queue.trim_before(keep);
    }

    /// Marks a client removed: no more IO, out of epoll, its position released.
    /// Returns what the caller must emit signals for (None if already removing).
    pub fn mark_removed(
        &mut self,
        id: ClientId,
        status: ClientStatus,
        shared: &Shared,
    ) -> Option<(ClientId, RawFd, ClientStatus)> {
        let c = self.clients.get_mut(&id)?;
        if c.phase == Phase::Removing {
            return None;
        }
        if c.phase == Phase::Adding && c.adding_thread != Some(std::thread::current().id()) {
            // `client-added` is being emitted on another thread: removal signals
            // must not overtake it, so that thread removes the client right after.
            // (A handler of client-added removing it on that thread is served now.)
            c.removal_requested.get_or_insert(status);
            return None;
        }
        c.phase = Phase::Removing;
        self.live -= 1;
        c.status = status;
        c.disconnected_at = Some((Instant::now(), SystemTime::now()));
        if c.watch == Watch::Epoll {
            // SAFETY: the app keeps the fd open until client-fd-removed.
            let _ = shared.epoll.delete(unsafe { BorrowedFd::borrow_raw(c.fd) });
        }
        let (fd, pos, positioned) = (c.fd, c.pos, c.positioned);
        c.positioned = false;
        c.outbox.clear();
        if positioned {
            self.queue.drop_ref(pos);
        }
        Some((id, fd, status))
    }

    /// Drops a removed client for good; its fd number may be added again.
    pub fn forget(&mut self, id: ClientId) {
        if let Some(c) = self.clients.remove(&id)
            && self.by_fd.get(&c.fd) == Some(&id)
        {
            self.by_fd.remove(&c.fd);
        }
    }

    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    pub fn timeout(&self) -> Option<Duration> {
        self.settings.timeout.filter(|_| !self.clients.is_empty())
    }

    /// Handles an epoll event for a client.
    pub fn client_event(&mut self, id: ClientId, flags: EpollFlags, shared: &Shared) {
        let Some(c) = self.clients.get(&id) else {
            return;
        };
        if c.phase == Phase::Removing {
            return;
        }
        let fd = c.fd;
        if flags.contains(EpollFlags::EPOLLIN)
            && self.settings.handle_read
            && let Some(status) = self.discard_input(fd)
        {
            log!(
                shared.listener,
                Info,
                "client fd {fd}: {}",
                if status == ClientStatus::Closed {
                    "closed by peer"
                } else {
                    "read error"
                }
            );
            if let Some(r) = self.mark_removed(id, status, shared) {
                self.removed.push(r);
            }
            return;
        }
        if flags.intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP) {
            let status = if flags.contains(EpollFlags::EPOLLERR) {
                ClientStatus::Error
            } else {
                ClientStatus::Closed
            };
            log!(shared.listener, Info, "client fd {fd}: hung up ({flags:?})");
            if let Some(r) = self.mark_removed(id, status, shared) {
                self.removed.push(r);
            }
            return;
        }
        if flags.contains(EpollFlags::EPOLLOUT) {
            let c = self.clients.get_mut(&id).unwrap();
            if c.phase == Phase::Blocked {
                c.phase = Phase::Ready;
                watch_writable(&shared.epoll, c, false);
                self.ready.push_back(id);
            }
        }
    }

    /// Reads what the client sent: dropped, or kept for `client_input` with
    /// `keep_input`. Some(status) when it is gone.
    fn discard_input(&mut self, fd: RawFd) -> Option<ClientStatus> {
        let mut kept = Vec::new();
        let status = loop {
            match nix::unistd::read(unsafe { BorrowedFd::borrow_raw(fd) }, &mut self.scratch) {
                Ok(0) => break Some(ClientStatus::Closed),
                Ok(n) => {
                    if self.settings.keep_input {
                        kept.extend_from_slice(&self.scratch[..n]);
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break None,
                // Write-only fds (a pipe's write end) cannot be read: nothing to discard.
                Err(Errno::EBADF) | Err(Errno::EINVAL) => break None,
                Err(_) => break Some(ClientStatus::Error),
            }
        };
        if !kept.is_empty() {
            self.input.push((fd, kept));
        }
        status
    }

    /// Takes the next ready client off the list, if any.
    pub fn pop_ready(&mut self) -> Option<ClientId> {
        while let Some(id) = self.ready.pop_front() {
            if self
                .clients
                .get(&id)
                .is_some_and(|c| c.phase == Phase::Ready)
            {
                return Some(id);
            }
        }
        None
    }

    /// Writes to one ready client until it is caught up, blocked or out of budget.
    pub fn serve(&mut self, id: ClientId, shared: &Shared) {
        let turn = self.write_turn(id);
        let c = self.clients.get_mut(&id).unwrap();
        let fd = c.fd;
        match turn {
            Turn::CaughtUp => {
                c.phase = Phase::Idle;
                self.idle.push(id);
            }
            Turn::Blocked => {
                c.phase = Phase::Blocked;
                watch_writable(&shared.epoll, c, true);
            }
            Turn::Yield => self.ready.push_back(id),
            Turn::Flushed => {
                log!(shared.listener, Info, "client fd {fd}: flushed");
                if let Some(r) = self.mark_removed(id, ClientStatus::Removed, shared) {
                    self.removed.push(r);
                }
            }
            Turn::Failed(e) => {
                log!(shared.listener, Info, "client fd {fd}: write failed: {e}");
                // A reset is the peer closing; anything else is an error of the fd.
                let status = if e == Errno::ECONNRESET {
                    ClientStatus::Closed
                } else {
                    ClientStatus::Error
                };
                if let Some(r) = self.mark_removed(id, status, shared) {
                    self.removed.push(r);
                }
            }
        }
    }

    fn write_turn(&mut self, id: ClientId) -> Turn {
        let resend = self.settings.resend_streamheader;
        let mut sent = self.settings.report_sent.then_some(&mut self.sent);
        let queue = &mut self.queue;
        let c = self.clients.get_mut(&id).unwrap();
        if let Watch::Broken(e) = c.watch {
            return Turn::Failed(e);
        }
        let mut budget = TURN_BUDGET;
        loop {
            // Streamheaders of a new caps generation go out before its first buffer.
            if let Some(entry) = queue.get(c.pos)
                && !same_streamheader(&entry.streamheader, &c.streamheader)
            {
                if let Some(sh) = &entry.streamheader
                    && (!c.had_streamheader || resend)
                {
                    c.outbox.extend(sh.iter().map(|h| Pending {
                        data: h.clone(),
                        offset: 0,
                    }));
                    c.had_streamheader = true;
                }
                c.streamheader = entry.streamheader.clone();
            }
            let limit = c.flush_until.unwrap_or(u64::MAX).min(queue.next_seq());
            let mut iov = IoVec::new();
            let mut total = 0usize;
            for p in &c.outbox {
                let bytes = &(*p.data).as_ref()[p.offset..];
                total += bytes.len();
                iov.push(IoSlice::new(bytes));
            }
            let mut entries = 0u64;
            while iov.len() < MAX_IOV && c.pos + entries < limit && total < budget {
                let entry = queue.get(c.pos + entries).unwrap();
                if !same_streamheader(&entry.streamheader, &c.streamheader) {
                    break;
                }
                let bytes = (*entry.chunk.data).as_ref();
                total += bytes.len();
                iov.push(IoSlice::new(bytes));
                entries += 1;
            }
            if iov.is_empty() {
                return if c.flush_until.is_some() {
                    Turn::Flushed
                } else {
                    Turn::CaughtUp
                };
            }
            let result = if total == 0 {
                Ok(0)
            } else {
                write_iov(c.fd, c.kind, iov.as_slice())
            };
            drop(iov);
            match result {
                Ok(n) => {
                    consume(c, queue, n, entries, sent.as_deref_mut());
                    self.bytes_served += n as u64;
                    if n > 0 {
                        c.bytes_sent += n as u64;
                        c.last_activity = self.now;
                    }
                    if n < total && c.watch == Watch::Epoll {
                        // A short write means the fd is full; edge-triggered epoll
                        // tells us when it drains.
                        return Turn::Blocked;
                    }
                    budget = budget.saturating_sub(n);
                    if budget == 0 {
                        return Turn::Yield;
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Turn::Blocked,
                Err(e) => return Turn::Failed(e),
            }
        }
    }

    /// Removes clients that wrote nothing for longer than the timeout.
    pub fn expire_idle(&mut self, now: Instant, shared: &Shared) {
        let Some(timeout) = self.settings.timeout else {
            return;
        };
        let expired: Vec<ClientId> = self
            .clients
            .values()
            .filter(|c| c.phase != Phase::Removing && c.phase != Phase::Adding)
            .filter(|c| now.saturating_duration_since(c.last_activity) > timeout)
            .map(|c| c.id)
            .collect();
        for id in expired {
            log!(
                shared.listener,
                Info,
                "client fd {}: timed out",
                self.clients[&id].fd
            );
            if let Some(r) = self.mark_removed(id, ClientStatus::Slow, shared) {
                self.removed.push(r);
            }
        }
    }
}

/// The iovec of one write: on the stack for the usual handful of buffers, so the
/// common write (one new buffer to a caught-up client) allocates nothing; on the
/// heap only for a client catching up on many.
struct IoVec<'a> {
    inline: [IoSlice<'a>; INLINE_IOV],
    len: usize,
    heap: Vec<IoSlice<'a>>,
}

const INLINE_IOV: usize = 16;

impl<'a> IoVec<'a> {
    fn new() -> Self {
        IoVec {
            inline: [IoSlice::new(&[]); INLINE_IOV],
            len: 0,
            heap: Vec::new(),
        }
    }

    fn push(&mut self, s: IoSlice<'a>) {
        if self.len < INLINE_IOV {
            self.inline[self.len] = s;
        } else {
            if self.heap.is_empty() {
                self.heap.reserve(MAX_IOV);
                self.heap.extend_from_slice(&self.inline);
            }
            self.heap.push(s);
        }
        self.len += 1;
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn as_slice(&self) -> &[IoSlice<'a>] {
        if self.len <= INLINE_IOV {
            &self.inline[..self.len]
        } else {
            &self.heap
        }
    }
}

/// Accounts `n` written bytes: the outbox first, then `entries` queued buffers. A
/// buffer written in part moves to the outbox, so positions stay on boundaries.
/// Buffers written whole go to `sent`, if given.
fn consume(
    c: &mut Client,
    queue: &mut BufferQueue,
    n: usize,
    entries: u64,
    mut sent: Option<&mut Vec<(RawFd, Payload)>>,
) {
    let mut left = n;
    while let Some(front) = c.outbox.front_mut() {
        let remaining = (*front.data).as_ref().len() - front.offset;
        if left >= remaining {
            left -= remaining;
            let done = c.outbox.pop_front().unwrap();
            if let Some(sent) = sent.as_deref_mut() {
                sent.push((c.fd, done.data));
            }
        } else {
            front.offset += left;
            return;
        }
    }
    for _ in 0..entries {
        let entry = queue.get(c.pos).unwrap();
        let len = entry.chunk.len();
        if left == 0 && len > 0 {
            return;
        }
        let pts = entry.chunk.pts;
        if c.first_buffer_ts.is_none() {
            c.first_buffer_ts = pts;
        }
        if left < len {
            c.outbox.push_back(Pending {
                data: entry.chunk.data.clone(),
                offset: left,
            });
            left = 0;
        } else {
            left -= len;
            if let Some(sent) = sent.as_deref_mut() {
                sent.push((c.fd, entry.chunk.data.clone()));
            }
        }
        if pts.is_some() {
            c.last_buffer_ts = pts;
        }
        queue.drop_ref(c.pos);
        c.pos += 1;
        queue.add_ref(c.pos);
    }
}

fn write_iov(fd: RawFd, kind: FdKind, iov: &[IoSlice<'_>]) -> nix::Result<usize> {
    // SAFETY: the client's fd stays open until client-fd-removed, and writes happen
    // under the engine lock, which removal takes first.
    let bfd = unsafe { BorrowedFd::borrow_raw(fd) };
    match kind {
        FdKind::Socket => match sendmsg::<()>(
            fd,
            iov,
            &[],
            MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            None,
        ) {
            // A socket that is not connected-mode (or a socket-like fd) may refuse
            // sendmsg; writev still works for those.
            Err(Errno::ENOTSOCK) => nix::sys::uio::writev(bfd, iov),
            r => r,
        },
        FdKind::Stream => nix::sys::uio::writev(bfd, iov),
    }
}

/// Where a new client starts, now that buffer `newest` is the newest. `None`: wait
/// for a later buffer (no keyframe yet).
fn start_position(queue: &BufferQueue, config: &ClientConfig, newest: u64) -> Option<u64> {
    let first = queue.first_seq();
    // The newest position that holds at least the burst minimum (the oldest buffer
    // when the queue holds less).
    let min_pos = || {
        config
            .burst_min
            .map(|m| queue.seq_holding_at_least(m).unwrap_or(first))
            .unwrap_or(newest)
    };
    // The oldest allowed position: strictly newer than the one that reaches the
    // maximum, so a burst never sends the maximum or more.
    let floor = || {
        config
            .burst_max
            .and_then(|m| queue.seq_holding_at_least(m))
            .map(|s| s + 1)
            .unwrap_or(first)
    };
    match config.sync {
        SyncMethod::Latest => Some(newest),
        SyncMethod::NextKeyframe => queue
            .get(newest)
            .filter(|e| e.chunk.keyframe)
            .map(|_| newest),
        SyncMethod::LatestKeyframe => queue.newest_keyframe_since(first),
        SyncMethod::Burst => Some(min_pos().max(floor()).min(newest)),
        SyncMethod::BurstKeyframe => {
            let (min, floor) = (min_pos(), floor());
            queue
                .keyframe_at_or_before(min, floor)
                .or_else(|| queue.keyframe_at_or_after(min.max(floor)))
        }
        SyncMethod::BurstWithKeyframe => {
            let (min, floor) = (min_pos(), floor());
            queue
                .keyframe_at_or_before(min, floor)
                .or(Some(min.max(floor).min(newest)))
        }
    }
}
