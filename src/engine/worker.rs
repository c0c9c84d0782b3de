// SPDX-License-Identifier: MPL-2.0

//! One worker: the clients one IO thread writes to, with its own copy of the queue,
//! and what the engine asks of it.
//!
//! One mutex guards the queue and all clients of a worker. The streaming thread holds
//! it only to append a buffer and move the clients that this buffer concerns; the IO
//! thread holds it while it writes a batch of clients. Writes are non-blocking, so
//! nobody ever waits on a client, and because writes happen under the lock an fd is
//! never written after `remove` returned, even when the application closes and
//! reuses it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::client::{Client, ClientStats, FdKind, Phase, Watch};
use super::client_fd::{apply_dscp, open_client_fd};
use super::directory::Directory;
use super::spool::{Spool, Spooled};
use super::state::{Removal, WorkerState};
use super::token::Token;
use super::types::{
    AddOutcome, Chunk, ClientConfig, ClientStatus, Counters, Fd, Listener, OverloadPolicy, Payload,
    PushReport, Settings, log,
};

/// The longest one `push` waits for the IO thread (`OverloadPolicy::BackPressure`).
/// A sweep over thousands of clients takes milliseconds; past this, something else
/// is wrong and the buffer is queued anyway, with a warning.
const MAX_BACKPRESSURE_WAIT: Duration = Duration::from_secs(1);

/// How often a push waiting for the IO thread looks again at the clients that lag.
const JUDGE_TICK: Duration = Duration::from_millis(10);

/// How busy the IO thread was: the share of the last window it spent outside
/// `epoll_wait`, and when that was measured.
#[derive(Debug, Clone, Copy)]
pub(super) struct Load {
    pub(super) share: f64,
    pub(super) at: Instant,
}

/// One IO thread's share of the clients and its copy of the queue (the buffers
/// themselves are shared by all workers). The engine calls it from the
/// application's threads; its IO thread (`io_loop::run`) waits on its epoll.
pub(super) struct Worker {
    state: Mutex<WorkerState>,
    /// Its clients' fds and the waker.
    pub(super) epoll: Arc<Epoll>,
    pub(super) waker: EventFd,
    /// Asks the IO thread to end.
    pub(super) stop: AtomicBool,
    /// Streaming threads waiting for the lock in `push`: the IO thread yields to them.
    pub(super) pushers: AtomicUsize,
    pub(super) listener: Arc<dyn Listener>,
    /// The engine's table of which worker holds each fd: a removed client's fd
    /// leaves it just before `client-fd-removed`.
    directory: Arc<Mutex<Directory>>,
    /// Signalled by the IO thread when no client is past the overload boundary any
    /// more, for a `push` waiting under back-pressure.
    pub(super) caught_up: Condvar,
    /// Set while the element flushes or changes state: `push` does not wait.
    flushing: AtomicBool,
    pub(super) load: Mutex<Load>,
}

impl Worker {
    pub(super) fn new(
        listener: Arc<dyn Listener>,
        directory: Arc<Mutex<Directory>>,
        spool: Arc<Spool>,
    ) -> std::io::Result<Worker> {
        let epoll = Arc::new(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?);
        let waker =
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        let token = Token::Waker.to_epoll();
        epoll.add(&waker, EpollEvent::new(EpollFlags::EPOLLIN, token))?;
        Ok(Worker {
            state: Mutex::new(WorkerState::new(epoll.clone(), listener.clone(), spool)),
            epoll,
            waker,
            stop: AtomicBool::new(false),
            pushers: AtomicUsize::new(0),
            listener,
            directory,
            caught_up: Condvar::new(),
            flushing: AtomicBool::new(false),
            load: Mutex::new(Load {
                share: 0.0,
                at: Instant::now(),
            }),
        })
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, WorkerState> {
        // A panic while holding the lock leaves consistent-enough state for removal.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the IO thread look at what changed.
    pub(super) fn wake(&self) {
        let _ = self.waker.write(1);
    }

    /// Takes clients from now on (its IO thread is about to start). The figures
    /// bytes-to-serve and bytes-served count from here (NULL to READY).
    pub(super) fn open(&self) {
        self.stop.store(false, Ordering::SeqCst);
        let mut st = self.lock();
        st.running = true;
        st.bytes_to_serve = 0;
        st.bytes_served = 0;
    }

    /// Refuses new clients and asks the IO thread to end.
    pub(super) fn halt(&self) {
        self.lock().running = false;
        self.caught_up.notify_all();
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// While flushing, `push` does not wait for the IO thread (and a waiting one
    /// returns at once), so flushes and state changes never hang on back-pressure.
    pub(super) fn set_flushing(&self, flushing: bool) {
        let _st = self.lock();
        self.flushing.store(flushing, Ordering::SeqCst);
        self.caught_up.notify_all();
    }

    /// The IO thread's busy share over its last window; 0 when it has been waiting
    /// in epoll since (it measures only when it runs).
    pub(super) fn io_load(&self) -> f64 {
        let load = *self.load.lock().unwrap_or_else(|e| e.into_inner());
        if load.at.elapsed() > 2 * super::io_loop::LOAD_WINDOW {
            0.0
        } else {
            load.share
        }
    }

    /// Removes every client (status removed) and drops the queue and streamheader.
    pub(super) fn close(&self) {
        let removed = {
            let mut st = self.lock();
            let mut removed = std::mem::take(&mut st.removed);
            removed.extend(st.mark_all_removed());
            st.queue.clear();
            st.streamheader = None;
            st.idle.clear();
            st.ready.clear();
            st.joining.clear();
            st.batches.take_all();
            st.input.clear();
            st.sent.clear();
            removed
        };
        self.finish_removals(removed);
    }

    pub(super) fn set_settings(&self, settings: Settings) {
        let mut st = self.lock();
        let dscp_changed = st.settings.qos_dscp != settings.qos_dscp;
        st.settings = settings;
        if st.settings.batch_time.is_none() {
            st.end_all_batches();
        }
        if dscp_changed {
            let dscp = st.settings.qos_dscp;
            for c in st.clients.values().filter(|c| c.kind == FdKind::Socket) {
                apply_dscp(c.fd, dscp);
            }
        }
        // Tighter limits take effect now, not at the next buffer.
        st.enforce_limits();
        drop(st);
        // Always: the IO thread may be waiting with no timeout while a new `timeout`
        // must now expire idle clients, or have removals to signal.
        self.wake();
    }

    /// Adds a client placed as `placement` says, or as the settings' default
    /// placement. `client-added` is emitted before this returns; a bad fd is removed
    /// later by the IO thread, never inside `add`. The engine has checked that `fd`
    /// is not a client already.
    pub(super) fn add(&self, fd: Fd, placement: Option<ClientConfig>) -> AddOutcome {
        let id = {
            let mut st = self.lock();
            if !st.running {
                return AddOutcome::NotRunning;
            }
            let config = placement.unwrap_or(st.settings.default_placement);
            let id = st.next_id;
            st.next_id += 1;
            let (kind, watch) = open_client_fd(fd, id, st.settings.handle_read, &self.epoll);
            if let Watch::Broken(e) = watch {
                log!(
                    self.listener,
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
                self.listener,
                Info,
                "client fd {fd}: added ({kind:?}, {watch:?}, {config:?})"
            );
            id
        };
        self.listener.client_added(fd);
        let mut st = self.lock();
        if let Some(c) = st.clients.get_mut(&id).filter(|c| c.phase == Phase::Adding) {
            if let Some(status) = c.removal_requested {
                // Removed (clear, remove, stop) while client-added was emitted.
                c.phase = Phase::Joining;
                let removed = st.mark_removed(id, status);
                drop(st);
                self.finish_removals(removed.into_iter().collect());
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
            self.wake();
        }
        AddOutcome::Added
    }

    /// Sends what clients wait with for their batch now (EOS: the stream ends, so
    /// nothing more would join their batch).
    pub(super) fn end_batches(&self) {
        let mut st = self.lock();
        st.end_all_batches();
        if st.has_ready() {
            drop(st);
            self.wake();
        }
    }

    /// Clients that are not being removed.
    pub(super) fn client_count(&self) -> usize {
        self.lock().live
    }

    /// Emits the signals of clients already marked removed, then forgets them.
    pub(super) fn finish_removals(&self, removed: Vec<Removal>) {
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
            // Before the signal, so that its handler may add the number again.
            self.directory.lock().unwrap().forget(fd);
            self.listener.client_fd_removed(fd);
        }
    }

    /// Removes a client now: both signals are emitted before this returns. False if
    /// it is no client or already being removed.
    pub(super) fn remove(&self, fd: Fd, status: ClientStatus) -> bool {
        let removed = {
            let mut st = self.lock();
            let id = st.by_fd.get(&fd).copied();
            let removed = id.and_then(|id| st.mark_removed(id, status));
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
        let Some(r) = removed else {
            return false;
        };
        self.finish_removals(vec![r]);
        true
    }

    /// Sends what is already queued for the client, nothing newer, then removes it.
    pub(super) fn remove_flush(&self, fd: Fd) -> bool {
        let mut st = self.lock();
        let next = st.queue.next_seq();
        let id = st.by_fd.get(&fd).copied();
        // Out of `by_fd` but still the engine's: forgotten, its signals under way.
        let Some(c) = id
            .and_then(|id| st.clients.get_mut(&id))
            .filter(|c| c.phase != Phase::Removing)
        else {
            drop(st);
            log!(
                self.listener,
                Warning,
                "client fd {fd}: already being removed"
            );
            return false;
        };
        match c.phase {
            Phase::Ready | Phase::Blocked | Phase::Batching if c.flush_until.is_none() => {
                log!(
                    self.listener,
                    Info,
                    "client fd {fd}: flushing {} buffers",
                    next - c.pos
                );
                c.flush_until = Some(next);
                c.status = ClientStatus::Flushing;
                // Flushes are not batched.
                let (id, batching) = (c.id, c.phase == Phase::Batching);
                if batching {
                    st.end_batch(id);
                    drop(st);
                    self.wake();
                }
                true
            }
            _ if c.flush_until.is_some() => true,
            _ => {
                // Nothing queued for it: it goes now.
                let id = c.id;
                let r = st.mark_removed(id, ClientStatus::Removed);
                drop(st);
                self.finish_removals(r.into_iter().collect());
                true
            }
        }
    }

    /// Removes every client (status removed).
    pub(super) fn clear(&self) {
        let removed = self.lock().mark_all_removed();
        self.finish_removals(removed);
    }

    /// Sets the caps' streamheader. Identical bytes keep the current generation, so
    /// clients are not sent the same headers again.
    pub(super) fn set_streamheader(&self, buffers: Option<Vec<Payload>>) {
        let mut st = self.lock();
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
                self.listener,
                Debug,
                "new streamheader of {} buffers",
                buffers.as_ref().map_or(0, |b| b.len())
            );
            st.streamheader = buffers.filter(|b| !b.is_empty()).map(Arc::new);
        }
    }

    /// Queues a buffer for every client, with its place in the zero-copy spool if
    /// there. Never waits on a client; with back-pressure, waits (bounded) for the
    /// IO thread when it is behind.
    pub(super) fn push(&self, chunk: Chunk, spooled: Option<Arc<Spooled>>) -> PushReport {
        self.pushers.fetch_add(1, Ordering::AcqRel);
        let mut st = self.lock();
        self.pushers.fetch_sub(1, Ordering::AcqRel);
        if chunk.header && st.repeats_streamheader(&chunk) {
            // Already sent from the caps to every client that needs it.
            return PushReport::default();
        }
        let dropped = st.push(chunk, spooled);
        if !st.ready.is_empty() || !st.removed.is_empty() || st.batch_needs_wake() {
            self.wake();
        }
        let mut report = PushReport {
            dropped,
            ..PushReport::default()
        };
        if st.settings.overload_policy == OverloadPolicy::BackPressure && st.io_behind() {
            let start = Instant::now();
            st.backpressure_waiters += 1;
            while st.running && !self.flushing.load(Ordering::SeqCst) && st.io_behind() {
                // Clients that blocked past the limit meanwhile are judged now.
                st.enforce_limits();
                if !st.removed.is_empty() {
                    self.wake();
                }
                if !st.io_behind() {
                    break;
                }
                let Some(left) = MAX_BACKPRESSURE_WAIT.checked_sub(start.elapsed()) else {
                    log!(
                        self.listener,
                        Warning,
                        "the IO thread did not catch up within {MAX_BACKPRESSURE_WAIT:?}; queueing on"
                    );
                    break;
                };
                st = self
                    .caught_up
                    .wait_timeout(st, left.min(JUDGE_TICK))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            st.backpressure_waiters -= 1;
            report.waited = start.elapsed();
        }
        report.behind = st.io_behind();
        report
    }

    pub(super) fn stats(&self, fd: Fd) -> Option<ClientStats> {
        let st = self.lock();
        let id = st.by_fd.get(&fd)?;
        st.clients.get(id).map(|c| c.stats())
    }

    pub(super) fn counters(&self) -> Counters {
        let st = self.lock();
        Counters {
            bytes_to_serve: st.bytes_to_serve,
            bytes_served: st.bytes_served,
            buffers_queued: st.queue.len() as u64,
            bytes_queued: st.queue.bytes_queued(),
            time_queued: st.queue.time_queued(),
            num_handles: st.live as u64,
            // The engine's spool counts these for all workers.
            bytes_served_zero_copy: 0,
        }
    }

    /// Whether `fd` is a client that is not being removed.
    pub(super) fn has_client(&self, fd: Fd) -> bool {
        let st = self.lock();
        st.by_fd
            .get(&fd)
            .and_then(|id| st.clients.get(id))
            .is_some_and(|c| c.phase != Phase::Removing)
    }
}
