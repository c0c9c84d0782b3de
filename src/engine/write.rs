//! The write path: one client's turn of writing from the queue.

use std::io::IoSlice;

use nix::errno::Errno;

use super::client::{Client, Pending};
use super::queue::BufferQueue;

/// Most buffers handed to one `writev`/`sendmsg` (Linux's IOV_MAX).
pub(super) const MAX_IOV: usize = 1024;
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
    pub(super) fn new() -> Self {
        IoVec {
            inline: [IoSlice::new(&[]); INLINE_IOV],
            len: 0,
            heap: Vec::new(),
        }
    }

    pub(super) fn push(&mut self, s: IoSlice<'a>) {
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

    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
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
pub(super) fn consume(c: &mut Client, queue: &mut BufferQueue, n: usize, entries: u64) {
    let mut left = n;
    while let Some(front) = c.outbox.front_mut() {
        let remaining = (*front.data).as_ref().len() - front.offset;
        if left >= remaining {
            left -= remaining;
            c.outbox.pop_front();
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
        }
        if pts.is_some() {
            c.last_buffer_ts = pts;
        }
        queue.drop_ref(c.pos);
        c.pos += 1;
        queue.add_ref(c.pos);
    }
}
