// SPDX-License-Identifier: MPL-2.0

//! `io-uring`: an IO thread's batch of ready clients written with one io_uring
//! submission (one SQE per client) instead of one system call per client. Epoll
//! stays the readiness mechanism; only the writes go through the ring. Each round
//! plans one write per client of the batch (as `write_turn` does), submits them all
//! and settles each from its completion; clients with more to send go again.

use std::io::{self, IoSlice};
use std::os::fd::RawFd;

use io_uring::{IoUring, opcode, squeue, types};
use nix::errno::Errno;
use nix::libc;

use super::client::{ClientId, FdKind, Watch};
use super::client_fd::write_iov;
use super::state::WorkerState;
use super::types::{Listener, log};
use super::write::{TURN_BUDGET, Turn, Written, plan_write, settle, take_streamheader};

/// SQEs per submission: the IO thread's batch (64 clients per lock hold) fits.
const ENTRIES: u32 = 64;

/// An IO thread's ring, set up the first time `io-uring` is on.
pub(super) enum Uring {
    NotTried,
    Ready(Box<Ring>),
    /// Setup failed (a kernel without io_uring, `kernel.io_uring_disabled`, a
    /// seccomp filter) or the ring broke: the system calls write.
    Unavailable,
}

pub(super) struct Ring {
    ring: IoUring,
    /// One per SENDMSG of the submission; they point into the plans' iovecs.
    msgs: Vec<libc::msghdr>,
}

impl Uring {
    /// The ring, set up now if this is the first call; None (said once in the log)
    /// where io_uring is unavailable.
    pub(super) fn ring(&mut self, listener: &dyn Listener) -> Option<&mut Ring> {
        if let Uring::NotTried = self {
            *self = match Ring::new() {
                Ok(ring) => Uring::Ready(Box::new(ring)),
                Err(e) => {
                    log!(
                        listener,
                        Warning,
                        "io_uring unavailable ({e}): writing with one system call per client"
                    );
                    Uring::Unavailable
                }
            };
        }
        match self {
            Uring::Ready(ring) => Some(ring),
            _ => None,
        }
    }
}

impl Ring {
    fn new() -> io::Result<Ring> {
        // Only this thread submits and reaps: the kernel can skip the locking and
        // the interrupts that other threads would need (Linux 6.0; plain before).
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(ENTRIES)
            .or_else(|_| IoUring::new(ENTRIES))?;
        Ok(Ring {
            ring,
            msgs: Vec::with_capacity(ENTRIES as usize),
        })
    }

    /// Makes each write (`fd`, kind, watch, iovec) and returns its result, as
    /// `write_iov` would: sockets by SENDMSG and pipes and other pollable fds by
    /// WRITEV through the ring; fds that cannot be polled (regular files) by the
    /// system call, as io_uring would either refuse them RWF_NOWAIT or wait on the
    /// disk. Err when the ring broke; the writes it did not make were made by system
    /// calls.
    fn write(
        &mut self,
        writes: &[(RawFd, FdKind, Watch, &[IoSlice<'_>])],
    ) -> (Vec<nix::Result<usize>>, io::Result<()>) {
        let mut results: Vec<Option<nix::Result<usize>>> = writes
            .iter()
            .map(|&(fd, kind, watch, iov)| {
                if iov.iter().all(|s| s.is_empty()) {
                    Some(Ok(0))
                } else if watch != Watch::Epoll {
                    Some(write_iov(fd, kind, iov))
                } else {
                    None
                }
            })
            .collect();
        let mut broke = Ok(());
        let mut start = 0;
        while start < writes.len() && broke.is_ok() {
            let end = (start + ENTRIES as usize).min(writes.len());
            broke = self.submit(&writes[start..end], &mut results[start..end]);
            start = end;
        }
        let results = writes
            .iter()
            .zip(results)
            .map(|(&(fd, kind, _, iov), r)| match r {
                // Refused before writing anything: a socket-like fd that is no
                // socket, or an fd that cannot promise not to wait (RWF_NOWAIT).
                // The system call handles both.
                None | Some(Err(Errno::ENOTSOCK | Errno::EOPNOTSUPP)) => write_iov(fd, kind, iov),
                Some(r) => r,
            })
            .collect();
        (results, broke)
    }

    /// One submission of at most ENTRIES writes, those without a result yet; fills
    /// in the results of those it made.
    fn submit(
        &mut self,
        writes: &[(RawFd, FdKind, Watch, &[IoSlice<'_>])],
        results: &mut [Option<nix::Result<usize>>],
    ) -> io::Result<()> {
        // Every msghdr is in place before any SQE points to one.
        self.msgs.clear();
        for &(_, _, _, iov) in writes {
            // SAFETY: msghdr is plain data; all zero is no address, no control data.
            let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
            m.msg_iov = iov.as_ptr() as *mut libc::iovec;
            m.msg_iovlen = iov.len();
            self.msgs.push(m);
        }
        let mut queued = 0;
        {
            let mut sq = self.ring.submission();
            for (k, &(fd, kind, _, iov)) in writes.iter().enumerate() {
                if results[k].is_some() {
                    continue;
                }
                // Neither may wait: a full fd must answer EAGAIN at once (epoll says
                // when it drains), not be polled by io_uring and written later. For
                // a non-blocking pipe only RWF_NOWAIT makes io_uring do that.
                let sqe: squeue::Entry = match kind {
                    FdKind::Socket => opcode::SendMsg::new(types::Fd(fd), &self.msgs[k])
                        .flags((libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) as u32)
                        .build(),
                    // Offset -1: at the file position, as write(2).
                    FdKind::Stream => opcode::Writev::new(
                        types::Fd(fd),
                        iov.as_ptr() as *const libc::iovec,
                        iov.len() as u32,
                    )
                    .offset(u64::MAX)
                    .rw_flags(libc::RWF_NOWAIT)
                    .build(),
                };
                // SAFETY: the msghdrs, the iovecs (IoSlice is an iovec) and the
                // payloads they point to stay untouched until every completion of
                // this submission is reaped below, under the worker lock.
                unsafe { sq.push(&sqe.user_data(k as u64)) }
                    .expect("a submission holds ENTRIES SQEs");
                queued += 1;
            }
        }
        let mut pending = queued;
        while pending > 0 {
            match self.ring.submit_and_wait(pending) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                // Nothing of this call was submitted (the kernel says how many it
                // took when it took any); the ring is dropped with what it holds.
                Err(e) => return Err(e),
            }
            for cqe in self.ring.completion() {
                let r = cqe.result();
                results[cqe.user_data() as usize] = Some(if r >= 0 {
                    Ok(r as usize)
                } else {
                    Err(Errno::from_raw(-r))
                });
                pending -= 1;
            }
        }
        Ok(())
    }
}

impl WorkerState {
    /// Writes to these ready clients as `serve` does, each until it is caught up,
    /// blocked or out of budget, a round at a time: one write per client that has
    /// something to send, all submitted to `ring` together.
    pub(super) fn serve_batch(&mut self, uring: &mut Uring, ids: &[ClientId]) {
        let Uring::Ready(ring) = uring else {
            ids.iter().for_each(|&id| self.serve(id));
            return;
        };
        let resend = self.settings.resend_streamheader;
        // Clients whose turn goes on, with the budget left to each.
        let mut going: Vec<(ClientId, usize)> = Vec::with_capacity(ids.len());
        for &id in ids {
            match self.clients[&id].watch {
                Watch::Broken(e) => self.finish_turn(id, Turn::Failed(e)),
                _ => going.push((id, TURN_BUDGET)),
            }
        }
        let mut broke = Ok(());
        let mut ended = Vec::new();
        while !going.is_empty() {
            for &(id, _) in &going {
                let c = self.clients.get_mut(&id).unwrap();
                take_streamheader(c, &self.queue, resend);
            }
            let mut planned = Vec::with_capacity(going.len());
            let mut plans = Vec::with_capacity(going.len());
            for (k, &(id, budget)) in going.iter().enumerate() {
                let c = &self.clients[&id];
                match plan_write(c, &self.queue, budget) {
                    Ok(plan) => {
                        planned.push((k, c.fd, c.kind, c.watch));
                        plans.push(plan);
                    }
                    Err(turn) => ended.push((id, turn)),
                }
            }
            let writes: Vec<_> = planned
                .iter()
                .zip(&plans)
                .map(|(&(_, fd, kind, watch), plan)| (fd, kind, watch, plan.iov.as_slice()))
                .collect();
            log!(
                self.listener,
                Log,
                "io_uring: {} writes in one round",
                writes.len()
            );
            let (results, status) = ring.write(&writes);
            broke = broke.and(status);
            drop(writes);
            let written: Vec<(usize, Written)> = planned
                .iter()
                .zip(plans)
                .zip(results)
                .map(|((&(k, ..), plan), result)| {
                    let written = Written {
                        result,
                        total: plan.total,
                        entries: plan.entries,
                    };
                    (k, written)
                })
                .collect();
            let mut next = Vec::with_capacity(written.len());
            for (k, w) in written {
                let (id, mut budget) = going[k];
                let c = self.clients.get_mut(&id).unwrap();
                let sent = self.settings.report_sent.then_some(&mut self.sent);
                let now = self.now;
                match settle(
                    c,
                    &mut self.queue,
                    w,
                    now,
                    &mut self.bytes_served,
                    sent,
                    &mut budget,
                ) {
                    None => next.push((id, budget)),
                    Some(turn) => ended.push((id, turn)),
                }
            }
            for (id, turn) in ended.drain(..) {
                self.finish_turn(id, turn);
            }
            going = next;
            if broke.is_err() {
                break;
            }
        }
        if let Err(e) = broke {
            log!(
                self.listener,
                Warning,
                "io_uring failed ({e}): writing with one system call per client from now on"
            );
            *uring = Uring::Unavailable;
            going.iter().for_each(|&(id, _)| self.serve(id));
        }
    }
}
