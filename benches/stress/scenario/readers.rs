// SPDX-License-Identifier: MPL-2.0

//! The reader threads: each reads the other ends of its clients fast, slowly, after a
//! stall or never, verifies every byte, and half-closes, closes or resets them when
//! their behaviour says so.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{Shutdown, setsockopt, shutdown, sockopt};

use super::app::Ctx;
use super::clients::{Behaviour, ReaderReport};
use super::stream::{Pumped, Verifier};

/// The reading end of one client.
pub struct ReaderItem {
    /// The client's id in the ledger.
    pub slot: u64,
    fd: Option<OwnedFd>,
    behaviour: Behaviour,
    /// Set once the element let go of the client: read everything, act no more.
    drain: Arc<AtomicBool>,
    verifier: Verifier,
    born: Instant,
    in_epoll: bool,
    acted: bool,
    self_closed: bool,
    next_slow: Instant,
}

impl ReaderItem {
    pub fn new(slot: u64, fd: OwnedFd, behaviour: Behaviour, drain: Arc<AtomicBool>) -> ReaderItem {
        let now = Instant::now();
        ReaderItem {
            slot,
            fd: Some(fd),
            behaviour,
            drain,
            verifier: Verifier::default(),
            born: now,
            in_epoll: false,
            acted: false,
            self_closed: false,
            next_slow: now,
        }
    }

    /// Reads up to `max` bytes (until EAGAIN).
    fn pump(&mut self, buf: &mut [u8], max: usize) -> Pumped {
        let Some(fd) = self.fd.as_ref() else {
            return Pumped::Eof;
        };
        self.verifier.pump(fd.as_fd(), buf, max)
    }

    fn fast(&self, now: Instant) -> bool {
        if self.drain.load(Ordering::Relaxed) {
            return true;
        }
        let since = now.duration_since(self.born);
        match self.behaviour {
            Behaviour::Slow(_) | Behaviour::StallForever => false,
            Behaviour::Stall(ms) => since >= Duration::from_millis(ms.into()),
            _ => true,
        }
    }

    fn report(&self) -> ReaderReport {
        let v = &self.verifier;
        ReaderReport {
            bytes: v.bytes,
            buffers: v.buffers,
            gaps: v.gaps,
            first_kf: v.first_kf,
            at_boundary: v.at_boundary(),
            error: v.error.clone(),
            self_closed: self.self_closed,
        }
    }

    /// The reader's own act (half-close, reset, close) once its time came, unless
    /// the element already let go of it. True if the reader is done.
    fn act(&mut self, ctx: &Ctx, epoll: &Epoll, now: Instant) -> bool {
        let act_at = match self.behaviour {
            Behaviour::HalfClose(ms) | Behaviour::Reset(ms) | Behaviour::Close(ms) => {
                Duration::from_millis(ms.into())
            }
            _ => return false,
        };
        if self.acted
            || self.drain.load(Ordering::Relaxed)
            || now.duration_since(self.born) < act_at
        {
            return false;
        }
        self.acted = true;
        ctx.mark_reader_acted(self.slot);
        let fd = self.fd.as_ref().unwrap();
        match self.behaviour {
            Behaviour::HalfClose(_) => {
                let _ = shutdown(fd.as_raw_fd(), Shutdown::Write);
                return false;
            }
            Behaviour::Reset(_) => {
                let _ = setsockopt(
                    fd,
                    sockopt::Linger,
                    &nix::libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    },
                );
            }
            _ => {}
        }
        self.self_closed = true;
        if self.in_epoll {
            let _ = epoll.delete(fd);
        }
        self.fd = None;
        true
    }

    /// Reads as the behaviour says: everything once fast (epoll from then on), a
    /// little every 5 ms when slow. True at the end of the stream.
    fn read(&mut self, epoll: &Epoll, buf: &mut [u8], now: Instant) -> bool {
        let fast = self.fast(now);
        if fast && !self.in_epoll {
            self.in_epoll = true;
            let fd = self.fd.as_ref().unwrap();
            epoll
                .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, self.slot))
                .expect("epoll add");
            matches!(self.pump(buf, usize::MAX), Pumped::Eof)
        } else if !fast
            && let Behaviour::Slow(per_tick) = self.behaviour
            && now >= self.next_slow
        {
            self.next_slow = now + Duration::from_millis(5);
            matches!(self.pump(buf, per_tick as usize), Pumped::Eof)
        } else {
            false
        }
    }
}

pub fn reader_thread(ctx: Arc<Ctx>, idx: usize) {
    let beat = ctx.beat(format!("reader {idx}"));
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll");
    let mut items: HashMap<u64, ReaderItem> = HashMap::new();
    let mut events = vec![EpollEvent::empty(); 256];
    let mut buf = vec![0u8; 65536];
    loop {
        beat.beat("reading");
        let new: Vec<ReaderItem> = std::mem::take(&mut *ctx.inboxes[idx].lock().unwrap());
        let no_new = new.is_empty();
        for item in new {
            items.insert(item.slot, item);
        }
        if no_new && items.is_empty() && ctx.stop_readers.load(Ordering::Relaxed) {
            break;
        }
        let n = epoll
            .wait(&mut events, EpollTimeout::from(5u16))
            .unwrap_or(0);
        let now = Instant::now();
        let mut done = Vec::new();
        for ev in &events[..n] {
            if let Some(item) = items.get_mut(&ev.data())
                && let Pumped::Eof = item.pump(&mut buf, usize::MAX)
            {
                done.push(item.slot);
            }
        }
        for item in items.values_mut() {
            if item.fd.is_none() || done.contains(&item.slot) {
                continue;
            }
            if item.act(&ctx, &epoll, now) || item.read(&epoll, &mut buf, now) {
                done.push(item.slot);
            }
        }
        for slot in done {
            let Some(mut item) = items.remove(&slot) else {
                continue;
            };
            if let Some(fd) = item.fd.take()
                && item.in_epoll
            {
                let _ = epoll.delete(&fd);
            }
            ctx.reader_done(slot, item.report());
        }
    }
    beat.done();
}
