// SPDX-License-Identifier: MPL-2.0

//! A worker's state under its one lock: the queue, the clients and the lists that
//! say which clients need the IO thread, with every rule that moves clients through
//! the stream.

use std::collections::VecDeque;
use std::os::fd::{BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollFlags};

use super::batch::Batches;
use super::client::{Client, ClientId, FdKind, IdMap, Phase, Watch};
use super::client_fd::{full_fds, read_input, watch_writable};
use super::queue::BufferQueue;
use super::rules::{keep_from, limit_boundaries, recover_position, start_position};
use super::spool::{Spool, Spooled};
use super::types::{
    Chunk, ClientStatus, Listener, OverloadPolicy, Payload, RecoverPolicy, Settings, Streamheader,
    log,
};
use super::write::{Turn, write_turn};

/// A worker's queue and clients, under its one lock, with the rules that move its
/// clients through the stream. Everything here runs with the lock held: nothing
/// blocks, and only `Listener::log` is called out.
pub(super) struct WorkerState {
    pub(super) settings: Settings,
    pub(super) queue: BufferQueue,
    pub(super) streamheader: Option<Streamheader>,
    pub(super) clients: IdMap<ClientId, Client>,
    pub(super) by_fd: IdMap<RawFd, ClientId>,
    /// Clients not being removed (`num-handles`), kept so reading it walks nothing.
    pub(super) live: usize,
    pub(super) next_id: ClientId,
    /// Lists may hold stale ids; a client's phase says whether it belongs.
    pub(super) ready: VecDeque<ClientId>,
    pub(super) idle: Vec<ClientId>,
    pub(super) joining: Vec<ClientId>,
    /// Clients with data that wait for their batch (`batch-time`).
    pub(super) batches: Batches,
    /// When the IO thread wakes up next at the latest (`None`: only when woken):
    /// a push that makes a batch due sooner wakes it.
    pub(super) io_deadline: Option<Instant>,
    /// Removed by the streaming side or the IO thread; the IO thread emits signals.
    pub(super) removed: Vec<Removal>,
    /// With `keep_input` / `report_sent`: what the IO thread reports after a pass,
    /// with no lock held.
    pub(super) input: Vec<(RawFd, Vec<u8>)>,
    pub(super) sent: Vec<(RawFd, Payload)>,
    pub(super) running: bool,
    /// Streaming threads waiting in `push` for the IO thread to catch up.
    pub(super) backpressure_waiters: usize,
    /// Until then most clients lag together (an overload): nobody is slow for it.
    mass_lag_until: Option<Instant>,
    pub(super) bytes_to_serve: u64,
    pub(super) bytes_served: u64,
    pub(super) scratch: Vec<u8>,
    /// The IO thread's clock reading for the batch it is writing.
    pub(super) now: Instant,
    /// The worker's epoll: removed clients leave it, blocked ones are re-armed.
    pub(super) epoll: Arc<Epoll>,
    pub(super) listener: Arc<dyn Listener>,
    /// The engine's zero-copy store (shared by all workers).
    pub(super) spool: Arc<Spool>,
}

/// Under back-pressure: when at least this many clients, and more than half of them,
/// are past `units-max` at once, the machine (IO threads, readers, network) cannot
/// send what the stream asks, rather than some clients being slow: nobody is
/// removed for it.
const MASS_LAG_MIN: usize = 8;
/// How long an overload of most clients lasts after it was last seen: readers that
/// run a little later than the others are not taken for slow clients as it ends.
const MASS_LAG_HOLD: Duration = Duration::from_millis(500);

/// Under a shedding overload policy (nobody waits, so time tells): how long a
/// client's fd may stay full past `units-max` before it is removed as slow.
const SLOW_GRACE: Duration = Duration::from_millis(500);
/// Under back-pressure: how long a socket must stay unwritable past `units-max`
/// before its client is slow (the stream waits meanwhile). A reader that was only
/// late to run empties it sooner.
const SOCKET_FULL_GRACE: Duration = Duration::from_millis(100);

/// A client marked removed whose signals are still to be emitted: id, fd, status.
pub(super) type Removal = (ClientId, RawFd, ClientStatus);

impl WorkerState {
    pub(super) fn new(
        epoll: Arc<Epoll>,
        listener: Arc<dyn Listener>,
        spool: Arc<Spool>,
    ) -> WorkerState {
        WorkerState {
            settings: Settings::default(),
            queue: BufferQueue::default(),
            streamheader: None,
            clients: IdMap::default(),
            by_fd: IdMap::default(),
            live: 0,
            next_id: 1,
            ready: VecDeque::new(),
            idle: Vec::new(),
            joining: Vec::new(),
            batches: Batches::new(),
            io_deadline: None,
            removed: Vec::new(),
            input: Vec::new(),
            sent: Vec::new(),
            running: false,
            backpressure_waiters: 0,
            mass_lag_until: None,
            bytes_to_serve: 0,
            bytes_served: 0,
            scratch: vec![0; 4096],
            now: Instant::now(),
            epoll,
            listener,
            spool,
        }
    }

    pub(super) fn repeats_streamheader(&self, chunk: &Chunk) -> bool {
        let bytes = (*chunk.data).as_ref();
        self.streamheader
            .as_ref()
            .is_some_and(|sh| sh.iter().any(|h| (**h).as_ref() == bytes))
    }

    /// Queues a buffer (with its place in the zero-copy spool, if there); returns
    /// how many buffers lagging clients skipped for it (`OverloadPolicy::DropBuffers`).
    pub(super) fn push(&mut self, chunk: Chunk, spooled: Option<Arc<Spooled>>) -> u64 {
        self.bytes_to_serve += chunk.len() as u64;
        let seq = self.queue.push(chunk, self.streamheader.clone(), spooled);
        let batch = self.settings.batch_time;
        let now = batch.map(|_| Instant::now());
        let mut waiting = Vec::new();
        for id in std::mem::take(&mut self.idle) {
            let Some(c) = self.clients.get_mut(&id).filter(|c| c.phase == Phase::Idle) else {
                continue;
            };
            match batch.zip(now) {
                Some((period, now)) => {
                    let due = self.batches.due_for(id, period, now);
                    c.phase = Phase::Batching;
                    c.batch_due = Some(due);
                    waiting.push((id, due));
                }
                None => {
                    c.phase = Phase::Ready;
                    self.ready.push_back(id);
                }
            }
        }
        self.batches.add_group(seq, waiting);
        let full = self.batches.take_full_groups(&self.queue);
        self.end_batches_of(full);
        self.place_joining(seq);
        self.enforce_limits()
    }

    /// Whether the IO thread must be woken for a batch due before it would wake up
    /// anyway; if so, that is now its deadline.
    pub(super) fn batch_needs_wake(&mut self) -> bool {
        match self.batches.next_due() {
            Some(due) if self.io_deadline.is_none_or(|d| due < d) => {
                self.io_deadline = Some(due);
                true
            }
            _ => false,
        }
    }

    /// Moves a client waiting for its batch to the ready list now.
    pub(super) fn end_batch(&mut self, id: ClientId) {
        if let Some(c) = self
            .clients
            .get_mut(&id)
            .filter(|c| c.phase == Phase::Batching)
        {
            c.phase = Phase::Ready;
            c.batch_due = None;
            self.ready.push_back(id);
        }
    }

    /// Moves the clients whose batch is due by `now` to the ready list.
    pub(super) fn end_due_batches(&mut self, now: Instant) {
        let due = self.batches.take_due(now);
        self.end_batches_of(due);
    }

    /// Ends these batches, taken from `Batches` as (due, client): only entries of a
    /// client's current batch count (it may have left an older one early, been
    /// written, and be waiting again).
    fn end_batches_of(&mut self, entries: Vec<(Instant, ClientId)>) {
        for (due, id) in entries {
            if self
                .clients
                .get(&id)
                .is_some_and(|c| c.batch_due == Some(due))
            {
                self.end_batch(id);
            }
        }
    }

    /// Ends every batch now (EOS, batching turned off).
    pub(super) fn end_all_batches(&mut self) {
        for id in self.batches.take_all() {
            self.end_batch(id);
        }
    }

    /// Gives clients that wait to join a start position, now that buffer `seq` is in.
    fn place_joining(&mut self, seq: u64) {
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
                        self.listener,
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

    /// Removes clients past `units-max`, recovers clients past `units-soft-max` (only
    /// those blocked on their own fd: see `judge`), then drops the buffers nobody
    /// needs. Returns how many buffers lagging clients skipped for the sink's own
    /// overload (`OverloadPolicy::DropBuffers`).
    pub(super) fn enforce_limits(&mut self) -> u64 {
        let (hard, soft) = limit_boundaries(&self.queue, &self.settings);
        let boundary = match (hard, soft) {
            (Some(h), Some(s)) => Some(h.max(s)),
            (h, s) => h.or(s),
        };
        let mut dropped = 0;
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
            let shed = self.settings.overload_policy != OverloadPolicy::BackPressure;
            let overload_boundary = hard.or(soft);
            let full = self.full_fds_of(&laggards);
            let now = Instant::now();
            if !shed {
                self.note_mass_lag(&laggards, hard, now);
            }
            let mass = self.mass_lag_until.is_some_and(|until| now < until);
            for id in laggards {
                let c = &self.clients[&id];
                if c.phase == Phase::Batching {
                    // Waiting for its batch, not for its peer: it goes now.
                    self.end_batch(id);
                    continue;
                }
                let full_now = full
                    .get(&c.fd)
                    .copied()
                    .unwrap_or(c.phase == Phase::Blocked);
                // A pipe that polls full is full; a socket that polls unwritable may
                // be a reader about to run (POLLOUT wants much of the buffer free):
                // it must stay so for a while. Under shedding nobody waits, so
                // every client gets the longer grace.
                let grace = if shed {
                    SLOW_GRACE
                } else if c.kind == FdKind::Socket {
                    SOCKET_FULL_GRACE
                } else {
                    Duration::ZERO
                };
                let slow = self.full_for(id, full_now, hard, now, grace);
                if slow && self.judge(id, hard, soft, mass && !shed) {
                    continue;
                }
                let c = &self.clients[&id];
                if shed && let Some(b) = overload_boundary.filter(|b| c.pos < *b) {
                    // Behind because the IO thread has not reached it (or full for
                    // less than the grace): the sink is overloaded, not the client.
                    // Skip, never kick.
                    let policy = match self.settings.recover_policy {
                        RecoverPolicy::None => RecoverPolicy::Keyframe,
                        p => p,
                    };
                    dropped += self.recover(id, b, policy);
                }
            }
        }
        let keep = keep_from(&mut self.queue, &self.settings);
        self.queue.trim_before(keep);
        dropped
    }

    /// Whether these clients' fds are full now, polled in one call: those not in the
    /// map were not asked (a regular file never blocks; a socket not blocked is
    /// taken as having room). A blocked socket that polls writable has room its IO
    /// thread has not seen yet (the EPOLLOUT waits in the queue): not slow. A pipe's
    /// poll is exact, blocked or not; a socket that is not blocked is not asked
    /// (POLLOUT needs much of its buffer free, so only a write that gets EAGAIN
    /// tells).
    fn full_fds_of(&self, ids: &[ClientId]) -> IdMap<RawFd, bool> {
        let asked: Vec<RawFd> = ids
            .iter()
            .map(|id| &self.clients[id])
            .filter(|c| {
                c.watch == Watch::Epoll && (c.phase == Phase::Blocked || c.kind == FdKind::Stream)
            })
            .map(|c| c.fd)
            .collect();
        asked.iter().copied().zip(full_fds(&asked)).collect()
    }

    /// Under back-pressure: most clients past `units-max` at once means the machine
    /// cannot send what the stream asks; those whose fd is full are no slower than the
    /// rest, and nobody is removed while it lasts (and `MASS_LAG_HOLD` after).
    fn note_mass_lag(&mut self, laggards: &[ClientId], hard: Option<u64>, now: Instant) {
        let past_hard = laggards
            .iter()
            .filter(|id| hard.is_some_and(|h| self.clients[*id].pos < h))
            .count();
        if past_hard >= MASS_LAG_MIN && past_hard * 2 > self.live {
            self.mass_lag_until = Some(now + MASS_LAG_HOLD);
            log!(
                self.listener,
                Debug,
                "{past_hard} of {} clients past units-max: overload, nobody removed",
                self.live
            );
        }
    }

    /// Whether the client's fd has stayed full past `units-max` for `grace` (or is
    /// full past the soft limit only, where it recovers at once).
    fn full_for(
        &mut self,
        id: ClientId,
        full_now: bool,
        hard: Option<u64>,
        now: Instant,
        grace: Duration,
    ) -> bool {
        let c = self.clients.get_mut(&id).expect("laggard");
        if !full_now {
            c.full_since = None;
            return false;
        }
        if hard.is_none_or(|h| c.pos >= h) {
            return true;
        }
        let since = *c.full_since.get_or_insert(now);
        now.duration_since(since) >= grace
    }

    /// Judges a client whose fd is full: past `units-max` it is removed as slow
    /// (unless most clients lag with it, `mass`), past `units-soft-max` it recovers.
    /// True if it was removed or moved.
    fn judge(&mut self, id: ClientId, hard: Option<u64>, soft: Option<u64>, mass: bool) -> bool {
        let (pos, fd) = (self.clients[&id].pos, self.clients[&id].fd);
        if hard.is_some_and(|h| pos < h) {
            if mass {
                return false;
            }
            log!(
                self.listener,
                Info,
                "client fd {fd}: too slow ({} buffers behind, its fd full), removing",
                self.queue.next_seq() - pos
            );
            self.evict(id, ClientStatus::Slow);
            true
        } else if let Some(s) = soft.filter(|s| pos < *s) {
            self.recover(id, s, self.settings.recover_policy);
            true
        } else {
            false
        }
    }

    /// The position past which a client that is not blocked means the IO thread is
    /// behind: `units-max`, else `units-soft-max` with a recover policy.
    fn overload_boundary(&self) -> Option<u64> {
        let (hard, soft) = limit_boundaries(&self.queue, &self.settings);
        hard.or(soft)
    }

    /// Whether a client stands past the overload boundary: one the IO thread has not
    /// reached yet, or one that blocked since `enforce_limits` last judged, or most
    /// clients at once.
    pub(super) fn io_behind(&mut self) -> bool {
        match self.overload_boundary() {
            Some(b) => self.queue.oldest_referenced().is_some_and(|o| o < b),
            None => false,
        }
    }

    /// Moves a client forward to where `policy` puts it; returns the buffers skipped.
    fn recover(&mut self, id: ClientId, soft_boundary: u64, policy: RecoverPolicy) -> u64 {
        let Some(new) = recover_position(&self.queue, policy, soft_boundary) else {
            return 0;
        };
        let old = self.clients[&id].pos;
        self.queue.drop_ref(old);
        self.queue.add_ref(new);
        let c = self.clients.get_mut(&id).unwrap();
        c.pos = new;
        c.buffers_dropped += new - old;
        log!(
            self.listener,
            Info,
            "client fd {}: over the limit, skipped {} buffers ({policy:?})",
            c.fd,
            new - old,
        );
        new - old
    }

    /// Marks a client removed: no more IO, out of epoll, its position released.
    /// Returns what the caller must emit signals for (None if already removing).
    pub(super) fn mark_removed(&mut self, id: ClientId, status: ClientStatus) -> Option<Removal> {
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
            let _ = self.epoll.delete(unsafe { BorrowedFd::borrow_raw(c.fd) });
        }
        let (fd, pos, positioned) = (c.fd, c.pos, c.positioned);
        c.positioned = false;
        c.outbox.clear();
        if positioned {
            self.queue.drop_ref(pos);
        }
        Some((id, fd, status))
    }

    /// Marks every client removed (status removed).
    pub(super) fn mark_all_removed(&mut self) -> Vec<Removal> {
        let ids: Vec<ClientId> = self.clients.keys().copied().collect();
        ids.into_iter()
            .filter_map(|id| self.mark_removed(id, ClientStatus::Removed))
            .collect()
    }

    /// Marks a client removed and leaves its signals to the IO thread.
    fn evict(&mut self, id: ClientId, status: ClientStatus) {
        if let Some(r) = self.mark_removed(id, status) {
            self.removed.push(r);
        }
    }

    /// Drops a removed client for good; its fd number may be added again.
    pub(super) fn forget(&mut self, id: ClientId) {
        if let Some(c) = self.clients.remove(&id)
            && self.by_fd.get(&c.fd) == Some(&id)
        {
            self.by_fd.remove(&c.fd);
        }
    }

    pub(super) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    pub(super) fn timeout(&self) -> Option<Duration> {
        self.settings.timeout.filter(|_| !self.clients.is_empty())
    }

    /// Handles an epoll event for a client.
    pub(super) fn client_event(&mut self, id: ClientId, flags: EpollFlags) {
        let Some(c) = self.clients.get(&id) else {
            return;
        };
        if c.phase == Phase::Removing {
            return;
        }
        let fd = c.fd;
        if flags.contains(EpollFlags::EPOLLIN) && self.settings.handle_read {
            let mut kept = Vec::new();
            let keep = self.settings.keep_input.then_some(&mut kept);
            let gone = read_input(fd, &mut self.scratch, keep);
            if !kept.is_empty() {
                self.input.push((fd, kept));
            }
            if let Some(status) = gone {
                log!(
                    self.listener,
                    Info,
                    "client fd {fd}: {}",
                    if status == ClientStatus::Closed {
                        "closed by peer"
                    } else {
                        "read error"
                    }
                );
                self.evict(id, status);
                return;
            }
        }
        if flags.intersects(EpollFlags::EPOLLERR | EpollFlags::EPOLLHUP) {
            let status = if flags.contains(EpollFlags::EPOLLERR) {
                ClientStatus::Error
            } else {
                ClientStatus::Closed
            };
            log!(self.listener, Info, "client fd {fd}: hung up ({flags:?})");
            self.evict(id, status);
            return;
        }
        if flags.contains(EpollFlags::EPOLLOUT) {
            let c = self.clients.get_mut(&id).unwrap();
            if c.phase == Phase::Blocked {
                c.phase = Phase::Ready;
                watch_writable(&self.epoll, c, false);
                self.ready.push_back(id);
            }
        }
    }

    /// Takes the next ready client off the list, if any.
    pub(super) fn pop_ready(&mut self) -> Option<ClientId> {
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
    pub(super) fn serve(&mut self, id: ClientId) {
        let resend = self.settings.resend_streamheader;
        let c = self.clients.get_mut(&id).unwrap();
        let sent = self.settings.report_sent.then_some(&mut self.sent);
        let zero_copy = self.settings.zero_copy.then_some(&*self.spool);
        let turn = write_turn(
            c,
            &mut self.queue,
            resend,
            self.now,
            &mut self.bytes_served,
            sent,
            zero_copy,
        );
        self.finish_turn(id, turn);
    }

    /// Moves a client on by how its turn of writing ended.
    pub(super) fn finish_turn(&mut self, id: ClientId, turn: Turn) {
        let c = self.clients.get_mut(&id).unwrap();
        let fd = c.fd;
        match turn {
            Turn::CaughtUp => {
                c.phase = Phase::Idle;
                c.full_since = None;
                self.idle.push(id);
            }
            Turn::Blocked => {
                c.phase = Phase::Blocked;
                // Past a limit, it is judged at the next push (or the next look
                // of a push that waits), where whether most clients lag is known.
                watch_writable(&self.epoll, c, true);
            }
            Turn::Yield => self.ready.push_back(id),
            Turn::Flushed => {
                log!(self.listener, Info, "client fd {fd}: flushed");
                self.evict(id, ClientStatus::Removed);
            }
            Turn::Failed(e) => {
                log!(self.listener, Info, "client fd {fd}: write failed: {e}");
                // A reset is the peer closing; anything else is an error of the fd.
                let status = if e == Errno::ECONNRESET {
                    ClientStatus::Closed
                } else {
                    ClientStatus::Error
                };
                self.evict(id, status);
            }
        }
    }

    /// Removes clients that wrote nothing for longer than the timeout.
    pub(super) fn expire_idle(&mut self, now: Instant) {
        let Some(timeout) = self.settings.timeout else {
            return;
        };
        let expired: Vec<ClientId> = self
            .clients
            .values()
            // A ready or batching client waits for the IO thread, not for its peer.
            .filter(|c| {
                !matches!(
                    c.phase,
                    Phase::Removing | Phase::Adding | Phase::Ready | Phase::Batching
                )
            })
            .filter(|c| now.saturating_duration_since(c.last_activity) > timeout)
            .map(|c| c.id)
            .collect();
        for id in expired {
            log!(
                self.listener,
                Info,
                "client fd {}: timed out",
                self.clients[&id].fd
            );
            self.evict(id, ClientStatus::Slow);
        }
    }
}
