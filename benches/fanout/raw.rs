// SPDX-License-Identifier: MPL-2.0

//! The floor: one thread, the same producer schedule, and for each client one
//! `writev` of everything it has not sent yet (up to IOV_MAX buffers), epoll
//! (edge-triggered EPOLLOUT) for clients whose socket is full, the same units-max kick.
//! A stalled client is no different: its socket fills, it stays blocked and is kicked
//! once it is units-max behind.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::libc;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::os::{SharedCounters, set_nonblocking};
use crate::sink::{Measured, Meter, Next, Producer, Removed, wait_flushed};
use crate::spec::{FLAG_MEASURED, Spec, write_stamp};

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

/// The ring of the last buffers and every client's place in it.
struct Fanout {
    epoll: Epoll,
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
            let mut total = 0;
            let mut s = c.pos;
            while s < next && iov.len() < IOV_MAX {
                let b = &ring[(s % ring.len() as u64) as usize];
                let from = if s == c.pos { c.off } else { 0 };
                iov.push(libc::iovec {
                    iov_base: b[from..].as_ptr() as *mut libc::c_void,
                    iov_len: b.len() - from,
                });
                total += b.len() - from;
                s += 1;
            }
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

    /// Writes to the clients epoll says are writable again.
    fn handle_events(&mut self, next: u64, timeout: EpollTimeout) {
        let k = self.epoll.wait(&mut self.events, timeout).unwrap_or(0);
        for e in 0..k {
            let i = self.events[e].data() as usize;
            if self.clients[i].fd.is_none() {
                continue;
            }
            self.clients[i].blocked = false;
            if !self.write_client(i, next) {
                self.lose(i);
            }
        }
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
            } else if !c.blocked && !self.write_client(i, next) {
                self.lose(i);
            }
        }
    }
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
