// SPDX-License-Identifier: MPL-2.0

//! The floor: one thread, the same producer schedule, and for each client one
//! `writev` of everything it has not sent yet (up to IOV_MAX buffers), epoll
//! (edge-triggered EPOLLOUT) for clients whose socket is full, the same units-max kick.
//! A stalled client is no different: its socket fills, it stays blocked and is kicked
//! once it is units-max behind.
//!
//! `raw-uring` is the same loop making its calls differently: the writes of every due
//! client (a fan-out, or the clients epoll reported writable) go as one SENDMSG SQE
//! each, submitted together with one `io_uring_enter`. MSG_DONTWAIT makes a full
//! socket answer EAGAIN at once (io_uring would otherwise poll it and send later).

use std::os::fd::{AsRawFd, OwnedFd};

use io_uring::{IoUring, opcode, types};
use nix::errno::Errno;
use nix::libc;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::os::{SharedCounters, set_nonblocking};
use crate::sink::{Measured, Meter, Next, Producer, Removed, wait_flushed};
use crate::spec::{Elem, FLAG_MEASURED, Spec, write_stamp};

/// Most buffers in one `writev`.
const IOV_MAX: usize = 1024;

struct Client {
    fd: Option<OwnedFd>,
    /// The next buffer to send, and the bytes of it already sent.
    pos: u64,
    off: usize,
    blocked: bool,
    stalled: bool,
}

/// Most SQEs in one submission: 4096 SENDMSGs carry a batch of clients in few
/// `io_uring_enter`s while the rings stay small (256 KiB of SQEs).
const URING_ENTRIES: usize = 4096;

/// The io_uring of `raw-uring` and what one submission's SQEs point to.
struct Uring {
    ring: IoUring,
    /// The iovecs of every client of the submission, one run each.
    iov: Vec<libc::iovec>,
    /// Per SQE (its user_data is the index): the client, its first iovec, how many,
    /// the bytes asked.
    sends: Vec<(usize, usize, usize, usize)>,
    msgs: Vec<libc::msghdr>,
    /// Per completion: the SQE's index and its result.
    results: Vec<(usize, i32)>,
}

/// The ring of the last buffers and every client's place in it.
struct Fanout {
    epoll: Epoll,
    /// `raw-uring`: the writes of due clients go through io_uring, a batch at a time.
    uring: Option<Uring>,
    /// `raw-uring`: clients to write in the next batch.
    due: Vec<usize>,
    clients: Vec<Client>,
    ring: Vec<Vec<u8>>,
    size: usize,
    iov: Vec<libc::iovec>,
    events: Vec<EpollEvent>,
    kicked: usize,
    lost: usize,
    removed: Removed,
    /// Clients that read and are still there.
    alive: usize,
}

impl Fanout {
    fn new(spec: &Spec, fds: Vec<OwnedFd>, stalled: &[bool], ring_len: usize) -> Fanout {
        let uring = (spec.elem == Elem::RawUring).then(|| {
            let entries = fds.len().next_power_of_two().min(URING_ENTRIES);
            Uring {
                // One thread submits and reaps: the kernel can skip its locking and
                // IPIs for it.
                ring: IoUring::builder()
                    .setup_single_issuer()
                    .setup_coop_taskrun()
                    .build(entries as u32)
                    .expect("io_uring setup"),
                iov: Vec::new(),
                sends: Vec::with_capacity(entries),
                msgs: Vec::with_capacity(entries),
                results: Vec::with_capacity(entries),
            }
        });
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
        let mut clients = Vec::with_capacity(fds.len());
        for (i, (fd, &stalled)) in fds.into_iter().zip(stalled).enumerate() {
            set_nonblocking(fd.as_raw_fd());
            epoll
                .add(
                    &fd,
                    EpollEvent::new(EpollFlags::EPOLLOUT | EpollFlags::EPOLLET, i as u64),
                )
                .unwrap();
            clients.push(Client {
                fd: Some(fd),
                pos: 0,
                off: 0,
                blocked: false,
                stalled,
            });
        }
        Fanout {
            epoll,
            uring,
            due: Vec::new(),
            alive: clients.iter().filter(|c| !c.stalled).count(),
            clients,
            ring: (0..ring_len).map(|_| vec![0u8; spec.size]).collect(),
            size: spec.size,
            iov: Vec::with_capacity(IOV_MAX),
            events: vec![EpollEvent::empty(); 1024],
            kicked: 0,
            lost: 0,
            removed: Removed::default(),
        }
    }

    /// Client `i` is gone (its fd closed): counts it as stalled or not.
    fn remove(&mut self, i: usize) {
        let c = &mut self.clients[i];
        c.fd = None;
        if c.stalled {
            self.removed.stalled += 1;
        } else {
            self.removed.others += 1;
            self.alive -= 1;
        }
    }

    /// Writes what client `i` has not sent of buffers [pos, next). Returns false if
    /// the client failed.
    fn write_client(&mut self, i: usize, next: u64) -> bool {
        let (ring, iov, size) = (&self.ring, &mut self.iov, self.size);
        let c = &mut self.clients[i];
        let Some(fd) = c.fd.as_ref().map(|f| f.as_raw_fd()) else {
            return true;
        };
        while c.pos < next && !c.blocked {
            iov.clear();
            let total = plan(c, ring, next, iov);
            // SAFETY: iov points into ring buffers that outlive the call.
            let r = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as i32) };
            if r < 0 {
                match Errno::last() {
                    Errno::EINTR => continue,
                    Errno::EAGAIN => c.blocked = true,
                    _ => return false,
                }
            } else {
                c.advance(r as usize, size);
                if (r as usize) < total {
                    c.blocked = true;
                }
            }
        }
        true
    }

    /// The client failed: closes it.
    fn lose(&mut self, i: usize) {
        self.remove(i);
        self.lost += 1;
    }

    /// Client `i` is due: written now, or with the next batch under `raw-uring`.
    fn write_or_queue(&mut self, i: usize, next: u64) {
        if self.uring.is_some() {
            self.due.push(i);
        } else if !self.write_client(i, next) {
            self.lose(i);
        }
    }

    /// `raw-uring`: writes the due clients, one SENDMSG each per submission, until
    /// each has sent everything before `next` or is blocked.
    fn write_due(&mut self, next: u64) {
        let Some(mut u) = self.uring.take() else {
            return;
        };
        let capacity = u.ring.params().sq_entries() as usize;
        let mut again = Vec::new();
        while !self.due.is_empty() {
            let chunk = self.due.len().saturating_sub(capacity);
            u.iov.clear();
            u.sends.clear();
            for i in self.due.drain(chunk..) {
                let c = &self.clients[i];
                if c.fd.is_none() || c.blocked || c.pos >= next {
                    continue;
                }
                let first = u.iov.len();
                let total = plan(c, &self.ring, next, &mut u.iov);
                u.sends.push((i, first, u.iov.len() - first, total));
            }
            // The msghdrs point into `iov`, which is complete now and stays put
            // until the completions are reaped.
            u.msgs.clear();
            for &(_, first, n, _) in &u.sends {
                // SAFETY: msghdr is plain data; all-zero is no name, no control data.
                let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
                m.msg_iov = u.iov[first..].as_ptr() as *mut libc::iovec;
                m.msg_iovlen = n;
                u.msgs.push(m);
            }
            {
                let mut sq = u.ring.submission();
                for (k, &(i, ..)) in u.sends.iter().enumerate() {
                    let fd = self.clients[i].fd.as_ref().unwrap().as_raw_fd();
                    let sqe = opcode::SendMsg::new(types::Fd(fd), &u.msgs[k])
                        .flags((libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) as u32)
                        .build()
                        .user_data(k as u64);
                    // SAFETY: the msghdr, its iovecs and the ring buffers they point
                    // into outlive the completions, reaped below before any changes.
                    unsafe { sq.push(&sqe).expect("a chunk fits the submission queue") };
                }
            }
            u.ring
                .submit_and_wait(u.sends.len())
                .expect("io_uring_enter");
            u.results.clear();
            u.results.extend(
                u.ring
                    .completion()
                    .map(|cqe| (cqe.user_data() as usize, cqe.result())),
            );
            for &(k, r) in &u.results {
                let (i, _, _, total) = u.sends[k];
                let c = &mut self.clients[i];
                if r >= 0 {
                    c.advance(r as usize, self.size);
                    if (r as usize) < total {
                        c.blocked = true;
                    } else if c.pos < next {
                        again.push(i); // more than IOV_MAX buffers were due
                    }
                } else {
                    match Errno::from_raw(-r) {
                        Errno::EAGAIN => c.blocked = true,
                        Errno::EINTR => again.push(i),
                        _ => self.lose(i),
                    }
                }
            }
            if self.due.is_empty() {
                std::mem::swap(&mut self.due, &mut again);
            }
        }
        self.uring = Some(u);
    }

    /// Writes to the clients epoll says are writable again.
    fn handle_events(&mut self, next: u64, timeout: EpollTimeout) {
        let k = self.epoll.wait(&mut self.events, timeout).unwrap_or(0);
        for e in 0..k {
            let i = self.events[e].data() as usize;
            if self.clients[i].fd.is_none() {
                continue;
            }
            self.clients[i].blocked = false;
            self.write_or_queue(i, next);
        }
        self.write_due(next);
    }

    /// Writes buffers up to `next` to every client that is not blocked, kicking those
    /// more than `units_max` behind.
    fn fan_out(&mut self, next: u64, units_max: u64) {
        for i in 0..self.clients.len() {
            let c = &mut self.clients[i];
            if c.fd.is_none() {
                continue;
            }
            if next - c.pos > units_max {
                self.remove(i); // too slow: kicked (closes the fd)
                self.kicked += 1;
            } else if !c.blocked {
                self.write_or_queue(i, next);
            }
        }
        self.write_due(next);
    }
}

/// Appends to `iov` what client `c` has not sent of buffers [pos, next), at most
/// IOV_MAX buffers; returns the bytes.
fn plan(c: &Client, ring: &[Vec<u8>], next: u64, iov: &mut Vec<libc::iovec>) -> usize {
    let mut total = 0;
    let mut s = c.pos;
    while s < next && s - c.pos < IOV_MAX as u64 {
        let b = &ring[(s % ring.len() as u64) as usize];
        let from = if s == c.pos { c.off } else { 0 };
        iov.push(libc::iovec {
            iov_base: b[from..].as_ptr() as *mut libc::c_void,
            iov_len: b.len() - from,
        });
        total += b.len() - from;
        s += 1;
    }
    total
}

impl Client {
    /// `n` more bytes were sent.
    fn advance(&mut self, mut n: usize, size: usize) {
        while n > 0 {
            let rest = size - self.off;
            if n >= rest {
                n -= rest;
                self.off = 0;
                self.pos += 1;
            } else {
                self.off += n;
                n = 0;
            }
        }
    }
}

pub fn run_raw(
    spec: &Spec,
    fds: Vec<OwnedFd>,
    stalled: &[bool],
    counters: &SharedCounters,
) -> Measured {
    // SAFETY: ignoring SIGPIPE: a closed peer is EPIPE.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    // Unpaced, the floor writes what accumulated in one call, as a batching IO thread
    // would: up to `batch` buffers per fan-out.
    let batch = match spec.bitrate {
        Some(_) => 1,
        None => ((128 << 10) / spec.size).clamp(1, 64),
    };
    let ring_len = spec.units_max.max(1) as usize + batch + 2;
    let mut f = Fanout::new(spec, fds, stalled, ring_len);
    let mut p = Producer::new(spec);
    let mut meter = Meter::new();
    loop {
        match p.next(counters, f.alive) {
            Next::Done => break,
            Next::Wait(d) => {
                let ms = (d.as_micros().div_ceil(1000)).min(1000) as u16;
                f.handle_events(p.seq, EpollTimeout::from(ms));
            }
            Next::Push { measured } => {
                meter.before_push(measured);
                let measured = stamp_batch(&mut f, &mut p, counters, batch, measured);
                let next = p.seq;
                let t = std::time::Instant::now();
                f.fan_out(next, spec.units_max as u64);
                meter.pushed(measured, t);
                f.handle_events(next, EpollTimeout::ZERO);
            }
        }
    }
    meter.end_window();
    let readers = f.alive as u64;
    let next = p.seq;
    let flushed = wait_flushed(
        counters,
        next,
        || readers,
        || f.handle_events(next, EpollTimeout::from(2u16)),
    );
    meter.finish(&p, f.kicked, f.lost, f.removed, flushed)
}

/// Stamps the next buffers into the ring: one, or up to `batch` while the producer
/// may push. Returns whether the last one is measured.
fn stamp_batch(
    f: &mut Fanout,
    p: &mut Producer,
    counters: &SharedCounters,
    batch: usize,
    mut measured: bool,
) -> bool {
    for i in 0..batch {
        if i > 0 {
            match p.next(counters, f.alive) {
                Next::Push { measured: m } => measured = m,
                _ => break,
            }
        }
        let slot = (p.seq % f.ring.len() as u64) as usize;
        write_stamp(
            &mut f.ring[slot],
            p.seq,
            if measured { FLAG_MEASURED } else { 0 },
        );
        p.pushed(measured, f.size, f.alive);
    }
    measured
}
