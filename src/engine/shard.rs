//! The engine's state and every rule that moves clients through the stream.
//!
//! One mutex guards the queue and all clients. The streaming thread holds it only to
//! append a buffer and move the clients that this buffer concerns; the IO thread
//! holds it while it writes a batch of clients. Writes are non-blocking, so nobody
//! ever waits on a client, and because writes happen under the lock an fd is never
//! written after `remove` returned, even when the application closes and reuses it.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{JoinHandle, ThreadId};
use std::time::Instant;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::ClientStats;
use super::client::{Client, ClientId, FdKind, IdMap, Phase, Watch};
use super::client_fd::{apply_dscp, open_client_fd};
use super::queue::BufferQueue;
use super::state::State;
use super::types::{
    AddOutcome, Chunk, ClientConfig, ClientStatus, Counters, Fd, Listener, LogLevel, Settings, log,
};

/// The epoll token of the waker eventfd; client tokens are their ids.
pub(crate) const WAKER_TOKEN: u64 = u64::MAX;

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
