// SPDX-License-Identifier: MPL-2.0

//! The write path: one client's turn of writing from the queue, with `writev`/
//! `sendmsg` from the buffers' memory, or with zero-copy on, `sendfile` from the
//! spool.

use std::io::IoSlice;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

use nix::errno::Errno;

use super::client::{Client, Unsent, Watch, ZeroCopyFd};
use super::client_fd::{fd_class, send_file, write_iov};
use super::queue::{BufferQueue, same_streamheader};
use super::spool::{Spool, SpoolFile, Spooled};
use super::types::Payload;

/// Most buffers handed to one `writev`/`sendmsg` (Linux's IOV_MAX).
const MAX_IOV: usize = 1024;
/// Bytes one client may write in one turn before the others get theirs.
pub(super) const TURN_BUDGET: usize = 4 << 20;

/// What a turn of writing did to a client.
pub(super) enum Turn {
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

/// Writes to one client until it is caught up, blocked or out of budget, as one
/// `sendmsg`/`writev` (or, with the `zero_copy` spool, `sendfile`) after another
/// from its outbox and the queue. Adds what it wrote to `served`; `now` is the
/// batch's clock reading, for the client's activity.
pub(super) fn write_turn(
    c: &mut Client,
    queue: &mut BufferQueue,
    resend: bool,
    now: Instant,
    served: &mut u64,
    mut sent: Option<&mut Vec<(RawFd, Payload)>>,
    zero_copy: Option<&Spool>,
) -> Turn {
    if let Watch::Broken(e) = c.watch {
        return Turn::Failed(e);
    }
    let mut budget = TURN_BUDGET;
    loop {
        take_streamheader(c, queue, resend);
        if let Some(written) = zero_copy.and_then(|spool| write_spooled(c, queue, budget, spool)) {
            let sent = sent.as_deref_mut();
            match settle(c, queue, written, now, served, sent, &mut budget) {
                Some(turn) => return turn,
                None => continue,
            }
        }
        let plan = match plan_write(c, queue, budget) {
            Ok(plan) => plan,
            Err(turn) => return turn,
        };
        let (total, entries) = (plan.total, plan.entries);
        let result = if total == 0 {
            Ok(0)
        } else {
            write_iov(c.fd, c.kind, plan.iov.as_slice())
        };
        drop(plan);
        let written = Written {
            result,
            total,
            entries,
        };
        if let Some(turn) = settle(
            c,
            queue,
            written,
            now,
            served,
            sent.as_deref_mut(),
            &mut budget,
        ) {
            return turn;
        }
    }
}

/// Queues the streamheader of a new caps generation in the client's outbox before
/// that generation's first buffer (once, or again with `resend`).
pub(super) fn take_streamheader(c: &mut Client, queue: &BufferQueue, resend: bool) {
    if let Some(entry) = queue.get(c.pos)
        && !same_streamheader(&entry.streamheader, &c.streamheader)
    {
        if let Some(sh) = &entry.streamheader
            && (!c.had_streamheader || resend)
        {
            c.outbox.extend(sh.iter().map(|h| Unsent {
                data: h.clone(),
                offset: 0,
                spooled: None,
            }));
            c.had_streamheader = true;
        }
        c.streamheader = entry.streamheader.clone();
    }
}

/// What one `sendmsg`/`writev` to a client carries: its outbox, then queued buffers
/// of its streamheader generation, up to `MAX_IOV` buffers and about `budget` bytes.
pub(super) struct Plan<'a> {
    pub iov: IoVec<'a>,
    /// Bytes in `iov`.
    pub total: usize,
    /// Queued buffers in `iov` after the outbox.
    pub entries: u64,
}

/// Plans the client's next write, or says why there is none: it is caught up, or
/// its `remove-flush` is done.
pub(super) fn plan_write<'a>(
    c: &'a Client,
    queue: &'a BufferQueue,
    budget: usize,
) -> Result<Plan<'a>, Turn> {
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
        return Err(if c.flush_until.is_some() {
            Turn::Flushed
        } else {
            Turn::CaughtUp
        });
    }
    Ok(Plan {
        iov,
        total,
        entries,
    })
}

/// With zero-copy on, makes the client's next write if its next bytes are in the
/// spool: one `sendfile` of the contiguous range from there (the rest of a buffer
/// sent in part, then queued buffers, which follow each other in the file), so
/// neither many buffers nor a partial write cost a copy per client. Streamheader
/// bytes before them (never in the spool) go alone by `writev`, so the buffers
/// after them still go by `sendfile`. `None`: this write goes by `plan_write`
/// (the fd does not take `sendfile`, or the next buffer is not in the spool).
fn write_spooled(
    c: &mut Client,
    queue: &BufferQueue,
    budget: usize,
    spool: &Spool,
) -> Option<Written> {
    let class = match c.zero_copy {
        ZeroCopyFd::Refused => return None,
        ZeroCopyFd::Kind(class) => class,
        ZeroCopyFd::Unknown => {
            let class = fd_class(c.fd);
            c.zero_copy = ZeroCopyFd::Kind(class);
            class
        }
    };
    if !spool.may_send(class) {
        return None;
    }
    if c.outbox.front().is_some_and(|p| p.spooled.is_none()) {
        let mut iov = IoVec::new();
        let mut total = 0;
        for p in c.outbox.iter().take_while(|p| p.spooled.is_none()) {
            let bytes = &(*p.data).as_ref()[p.offset..];
            total += bytes.len();
            iov.push(IoSlice::new(bytes));
            if iov.len() == MAX_IOV {
                break;
            }
        }
        let result = if total == 0 {
            Ok(0)
        } else {
            write_iov(c.fd, c.kind, iov.as_slice())
        };
        return Some(Written {
            result,
            total,
            entries: 0,
        });
    }
    let range = plan_spooled(c, queue, budget)?;
    let (total, entries) = (range.len, range.entries);
    if total == 0 {
        return Some(Written {
            result: Ok(0),
            total,
            entries,
        });
    }
    match send_file(c.fd, range.file.fd(), range.offset, total) {
        Err(e @ (Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP)) => {
            spool.refused(class, c.fd, e);
            c.zero_copy = ZeroCopyFd::Refused;
            None
        }
        result => {
            spool.worked(class, *result.as_ref().unwrap_or(&0));
            Some(Written {
                result,
                total,
                entries,
            })
        }
    }
}

/// A contiguous range of the spool that one `sendfile` sends: the client's outbox
/// (or its head), then `entries` queued buffers.
struct SpooledRange<'a> {
    file: &'a SpoolFile,
    offset: u64,
    len: usize,
    entries: u64,
}

impl<'a> SpooledRange<'a> {
    /// Adds `len` bytes of a buffer from `from` on, if they follow in the same file.
    fn extend(range: &mut Option<Self>, s: &'a Spooled, from: usize, len: usize) -> bool {
        let start = s.offset + from as u64;
        match range {
            None => {
                *range = Some(SpooledRange {
                    file: &s.file,
                    offset: start,
                    len,
                    entries: 0,
                });
                true
            }
            Some(r)
                if std::ptr::eq(r.file, Arc::as_ptr(&s.file))
                    && r.offset + r.len as u64 == start =>
            {
                r.len += len;
                true
            }
            Some(_) => false,
        }
    }
}

/// The longest range of the spool the client sends next (about `budget` bytes),
/// or `None` when its next bytes are not in the spool.
fn plan_spooled<'a>(
    c: &'a Client,
    queue: &'a BufferQueue,
    budget: usize,
) -> Option<SpooledRange<'a>> {
    let mut range = None;
    let mut whole_outbox = true;
    for p in &c.outbox {
        let len = (*p.data).as_ref().len() - p.offset;
        let fits = p
            .spooled
            .as_ref()
            .is_some_and(|s| SpooledRange::extend(&mut range, s, p.offset, len));
        if !fits {
            whole_outbox = false;
            break;
        }
    }
    if whole_outbox {
        let limit = c.flush_until.unwrap_or(u64::MAX).min(queue.next_seq());
        let mut entries = 0;
        while c.pos + entries < limit && range.as_ref().is_none_or(|r| r.len < budget) {
            let entry = queue.get(c.pos + entries).unwrap();
            if !same_streamheader(&entry.streamheader, &c.streamheader) {
                break;
            }
            let fits = entry
                .spooled
                .as_ref()
                .is_some_and(|s| SpooledRange::extend(&mut range, s, 0, entry.chunk.len()));
            if !fits {
                break;
            }
            entries += 1;
        }
        if let Some(r) = range.as_mut() {
            r.entries = entries;
        }
    }
    range
}

/// The outcome of one planned write, once the plan's borrows are over.
pub(super) struct Written {
    pub result: nix::Result<usize>,
    pub total: usize,
    pub entries: u64,
}

/// Accounts one write's outcome to the client. `None`: the turn goes on (more to
/// write, budget left); otherwise how the turn ends.
pub(super) fn settle(
    c: &mut Client,
    queue: &mut BufferQueue,
    written: Written,
    now: Instant,
    served: &mut u64,
    sent: Option<&mut Vec<(RawFd, Payload)>>,
    budget: &mut usize,
) -> Option<Turn> {
    match written.result {
        Ok(n) => {
            consume(c, queue, n, written.entries, sent);
            *served += n as u64;
            if n > 0 {
                c.bytes_sent += n as u64;
                c.last_activity = now;
            }
            if n < written.total && c.watch == Watch::Epoll {
                // A short write means the fd is full; edge-triggered epoll
                // tells us when it drains.
                return Some(Turn::Blocked);
            }
            *budget = budget.saturating_sub(n);
            (*budget == 0).then_some(Turn::Yield)
        }
        Err(Errno::EINTR) => None,
        Err(Errno::EAGAIN) => Some(Turn::Blocked),
        Err(e) => Some(Turn::Failed(e)),
    }
}

/// The iovec of one write: on the stack for the usual handful of buffers, so the
/// common write (one new buffer to a caught-up client) allocates nothing; on the
/// heap only for a client catching up on many.
pub(super) struct IoVec<'a> {
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

    pub(super) fn as_slice(&self) -> &[IoSlice<'a>] {
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
            let done = c.outbox.pop_front().expect("front exists");
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
            c.outbox.push_back(Unsent {
                data: entry.chunk.data.clone(),
                offset: left,
                spooled: entry.spooled.clone(),
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
