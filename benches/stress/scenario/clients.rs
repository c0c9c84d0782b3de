// SPDX-License-Identifier: MPL-2.0

//! Clients: transports, what their readers do, and the application's ledger of every
//! fd it gave to the element.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use super::rng::Rng;
use super::{SYNC_METHODS, identity};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Transport {
    SocketPair,
    Pipe,
    Tcp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Behaviour {
    Fast,
    /// Reads at most this many bytes per 5 ms tick.
    Slow(u32),
    /// Reads nothing for this many ms, then fast.
    Stall(u32),
    StallForever,
    /// shutdown(SHUT_WR) from the reader after this many ms.
    HalfClose(u32),
    /// SO_LINGER 0 and close after this many ms (TCP: the peer gets a reset).
    Reset(u32),
    /// Close the reading end after this many ms.
    Close(u32),
}

impl Behaviour {
    pub fn name(self) -> &'static str {
        match self {
            Behaviour::Fast => "fast",
            Behaviour::Slow(_) => "slow",
            Behaviour::Stall(_) => "stall",
            Behaviour::StallForever => "stall-forever",
            Behaviour::HalfClose(_) => "half-close",
            Behaviour::Reset(_) => "reset",
            Behaviour::Close(_) => "close",
        }
    }
}

pub fn pick_client(rng: &mut Rng) -> (Transport, Behaviour) {
    let transport = match rng.below(100) {
        0..=54 => Transport::SocketPair,
        55..=74 => Transport::Pipe,
        _ => Transport::Tcp,
    };
    let ms = |rng: &mut Rng| rng.range(50, 3000) as u32;
    let r = rng.below(100);
    let behaviour = match transport {
        Transport::Pipe => match r {
            0..=49 => Behaviour::Fast,
            50..=64 => Behaviour::Slow(rng.range(64, 4096) as u32),
            65..=79 => Behaviour::Stall(ms(rng)),
            80..=87 => Behaviour::StallForever,
            _ => Behaviour::Close(ms(rng)),
        },
        Transport::SocketPair => match r {
            0..=44 => Behaviour::Fast,
            45..=56 => Behaviour::Slow(rng.range(64, 4096) as u32),
            57..=68 => Behaviour::Stall(ms(rng)),
            69..=74 => Behaviour::StallForever,
            75..=87 => Behaviour::HalfClose(ms(rng)),
            _ => Behaviour::Close(ms(rng)),
        },
        Transport::Tcp => match r {
            0..=34 => Behaviour::Fast,
            35..=44 => Behaviour::Slow(rng.range(64, 4096) as u32),
            45..=54 => Behaviour::Stall(ms(rng)),
            55..=59 => Behaviour::StallForever,
            60..=69 => Behaviour::HalfClose(ms(rng)),
            _ => Behaviour::Reset(ms(rng)),
        },
    };
    (transport, behaviour)
}

/// What a reader saw of its stream.
#[derive(Debug, Clone)]
pub struct ReaderReport {
    pub bytes: u64,
    pub buffers: u64,
    pub gaps: u64,
    pub first_kf: Option<bool>,
    pub at_boundary: bool,
    pub error: Option<String>,
    /// The reader closed or reset its end itself (it did not read to the end).
    pub self_closed: bool,
}

/// One client as the application sees it: the fd it gave to the element and the
/// reader of the other end. Lives until the fd is closed and the reader reported.
pub struct Slot {
    pub fd: RawFd,
    pub ident: Option<(u64, u64)>,
    pub transport: Transport,
    pub behaviour: Behaviour,
    pub add_kind: &'static str,
    /// Added with a sync method that must start on a keyframe.
    pub kf_required: bool,
    /// The application's fd, until it closes it (None early if the element closed it).
    pub sink: Option<OwnedFd>,
    /// The application has not closed the fd yet.
    pub open: bool,
    pub first_add_done: bool,
    pub adds_in_flight: u32,
    /// Action calls with this fd in flight (the fd must not be closed meanwhile).
    pub pins: u32,
    pub dups_in_flight: u32,
    pub accepted: u32,
    pub removed: u32,
    pub fd_removed: u32,
    pub dup_signals: u32,
    /// `remove`, `clear` or NULL was called while it could be a client.
    pub hard: bool,
    pub flush: bool,
    pub reader_acted: bool,
    pub final_status: Option<String>,
    /// (bytes-sent, buffers-dropped) from get-stats in the first client-removed.
    pub stats: Option<(u64, u64)>,
    pub drain: Arc<AtomicBool>,
    pub report: Option<ReaderReport>,
    pub finished: bool,
}

impl Slot {
    /// A client about to be added for the first time.
    pub fn new(
        sink: OwnedFd,
        transport: Transport,
        behaviour: Behaviour,
        full: bool,
        kf_required: bool,
    ) -> Slot {
        Slot {
            fd: sink.as_raw_fd(),
            ident: identity(sink.as_fd()),
            transport,
            behaviour,
            add_kind: if full { "add-full" } else { "add" },
            kf_required,
            sink: Some(sink),
            open: true,
            first_add_done: false,
            adds_in_flight: 1,
            pins: 0,
            dups_in_flight: 0,
            accepted: 0,
            removed: 0,
            fd_removed: 0,
            dup_signals: 0,
            hard: false,
            flush: false,
            reader_acted: false,
            final_status: None,
            stats: None,
            drain: Arc::new(AtomicBool::new(false)),
            report: None,
            finished: false,
        }
    }

    /// The element closed our fd (or the number now names another file): never
    /// close it ourselves, but keep the slot open until the element forgets it.
    pub fn forget_fd(&mut self) {
        if let Some(fd) = self.sink.take() {
            let _ = fd.into_raw_fd();
        }
    }
}

#[derive(Default)]
pub struct Ledger {
    pub slots: HashMap<u64, Slot>,
    pub by_fd: HashMap<RawFd, u64>,
    pub next_id: u64,
    pub connects: u64,
    pub clears_in_flight: u32,
    pub null_in_flight: bool,
    pub stop_adds: bool,
    pub adds_in_flight: u32,
    pub unfinished: usize,
    pub finished: usize,
    pub peak_live: usize,
}

impl Ledger {
    pub fn mark_all_hard(&mut self) {
        for s in self.slots.values_mut().filter(|s| s.open) {
            s.hard = true;
        }
    }
}

pub type Bound = (gst::Format, u64);

pub fn random_bound(rng: &mut Rng) -> Bound {
    match rng.below(4) {
        0 => (gst::Format::Undefined, 0),
        1 => (gst::Format::Buffers, rng.range(1, 60)),
        2 => (gst::Format::Bytes, rng.range(1_000, 300_000)),
        _ => (gst::Format::Time, rng.range(10, 300) * 1_000_000),
    }
}

/// Sync method and burst bounds for `add-full` (never max < min in one format).
pub fn random_add_full(rng: &mut Rng) -> (&'static str, Bound, Bound) {
    let sync = rng.pick(&SYNC_METHODS);
    let min = random_bound(rng);
    let max = if rng.chance(50.0) {
        (gst::Format::Undefined, 0)
    } else {
        let m = random_bound(rng);
        if m.0 == min.0 { (m.0, min.1 + m.1) } else { m }
    };
    (sync, min, max)
}
