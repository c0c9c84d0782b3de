//! A shard's state under its one lock: the queue, the clients and the lists that
//! say which clients need the IO thread, with every rule that moves clients through
//! the stream.

use std::io::IoSlice;
use std::os::fd::{BorrowedFd, RawFd};
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::epoll::EpollFlags;

use super::client::{Client, ClientId, IdMap, Pending, Phase, Watch};
use super::client_fd::{watch_writable, write_iov};
use super::queue::{BufferQueue, same_streamheader};
use super::rules::start_position;
use super::shard::Shared;
use super::types::{
    Amount, Chunk, ClientStatus, LogLevel, RecoverPolicy, Settings, Streamheader, Unit, log,
};
use super::write::{IoVec, MAX_IOV, TURN_BUDGET, Turn, consume};

pub(crate) struct State {
    pub(super) settings: Settings,
    pub(super) queue: BufferQueue,
    pub(super) streamheader: Option<Streamheader>,
    pub(super) clients: IdMap<ClientId, Client>,
    pub(super) by_fd: IdMap<RawFd, ClientId>,
    /// Clients not being removed (`num-handles`), kept so reading it walks nothing.
    pub(super) live: usize,
    pub(super) next_id: ClientId,
    /// Lists may hold stale ids; a client's phase says whether it belongs.
    pub(super) ready: std::collections::VecDeque<ClientId>,
    pub(super) idle: Vec<ClientId>,
    pub(super) joining: Vec<ClientId>,
    /// Removed by the streaming side or the IO thread; the IO thread emits signals.
    pub(super) removed: Vec<(ClientId, RawFd, ClientStatus)>,
    pub(super) running: bool,
    pub(super) bytes_to_serve: u64,
    pub(super) bytes_served: u64,
    pub(super) scratch: Vec<u8>,
    /// The IO thread's clock reading for the batch it is writing.
    pub(super) now: Instant,
}

impl State {
    pub(super) fn repeats_streamheader(&self, chunk: &Chunk) -> bool {
        let bytes = (*chunk.data).as_ref();
        self.streamheader
            .as_ref()
            .is_some_and(|sh| sh.iter().any(|h| (**h).as_ref() == bytes))
    }

    pub(super) fn push(&mut self, chunk: Chunk, shared: &Shared) {
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
    pub(super) fn enforce_limits(&mut self, shared: &Shared) {
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

    /// Reads and drops what the client sent. Some(status) when it is gone.
    fn discard_input(&mut self, fd: RawFd) -> Option<ClientStatus> {
        loop {
            match nix::unistd::read(unsafe { BorrowedFd::borrow_raw(fd) }, &mut self.scratch) {
                Ok(0) => return Some(ClientStatus::Closed),
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return None,
                // Write-only fds (a pipe's write end) cannot be read: nothing to discard.
                Err(Errno::EBADF) | Err(Errno::EINVAL) => return None,
                Err(_) => return Some(ClientStatus::Error),
            }
        }
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
                    consume(c, queue, n, entries);
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
