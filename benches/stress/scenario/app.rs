// SPDX-License-Identifier: MPL-2.0

//! What every thread shares: the element, the application's ledger of clients, the
//! counters behind the figures, the problems found and the heartbeats.

use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gst::prelude::*;
use nix::fcntl::OFlag;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

use super::checks::Check;
use super::clients::{Ledger, ReaderReport, Transport};
use super::readers::ReaderItem;
use super::report::Problems;
use super::watchdog::{Beat, Beats};
use super::{Options, READER_THREADS, UNITS_MAX, queue_bound};

/// What happened, counted as it happens.
#[derive(Default)]
pub struct Counters {
    pub adds: AtomicU64,
    pub add_fulls: AtomicU64,
    pub removes: AtomicU64,
    pub remove_flushes: AtomicU64,
    pub clears: AtomicU64,
    pub stats_calls: AtomicU64,
    pub stats_unknown: AtomicU64,
    pub dup_adds: AtomicU64,
    pub dup_refused: AtomicU64,
    pub dup_accepted: AtomicU64,
    pub handler_ops: AtomicU64,
    pub refused_adds: AtomicU64,
    pub removed_before_added: AtomicU64,
    pub element_warnings: AtomicU64,
    pub other_glib: AtomicU64,
    pub pushed: AtomicU64,
    pub pushed_bytes: AtomicU64,
    pub push_flushing: AtomicU64,
    pub push_errors: AtomicU64,
    pub event_resends: AtomicU64,
    pub prop_changes: AtomicU64,
    pub full_cycles: AtomicU64,
    pub partial_cycles: AtomicU64,
    pub state_errors: AtomicU64,
    pub peak_queued: AtomicU64,
    pub peak_bytes_queued: AtomicU64,
    pub peak_fds: AtomicU64,
    pub fd_checks: AtomicU64,
    pub bursts: AtomicU64,
    pub burst_ops: AtomicU64,
}

/// The run's shared state: the element and its src pad, the ledger (woken through
/// `changed`), the readers' inboxes, the stop flags, the counters, the problems found
/// and every thread's heartbeat.
pub struct Ctx {
    pub opts: Options,
    pub sink: gst::Element,
    pub src: gst::Pad,
    pub period: Duration,
    pub ledger: Mutex<Ledger>,
    pub changed: Condvar,
    pub inboxes: Vec<Mutex<Vec<ReaderItem>>>,
    pub next_reader: AtomicUsize,
    pub tcp: Mutex<TcpListener>,
    pub stop_actions: AtomicBool,
    pub stop_producer: AtomicBool,
    pub stop_readers: AtomicBool,
    pub stop_monitor: AtomicBool,
    pub need_events: AtomicBool,
    /// Bumped to make every action thread do BURST_CALLS calls without pausing.
    pub burst: AtomicU64,
    pub n: Counters,
    pub problems: Mutex<Problems<Check>>,
    pub beats: Arc<Beats>,
    pub queue_bound: u64,
}

impl Ctx {
    /// The element (PLAYING comes later) fed by a src pad of its own, and the state
    /// around it.
    pub fn new(opts: &Options, start: Instant) -> Arc<Ctx> {
        let sink = gst::ElementFactory::make("rsmultifdsink")
            .build()
            .expect("rsmultifdsink");
        sink.set_property("sync", false);
        sink.set_property("units-max", UNITS_MAX[2]);
        sink.set_property("buffers-min", 10i32);
        let src = gst::Pad::builder(gst::PadDirection::Src)
            .name("src")
            .build();
        src.set_active(true).unwrap();
        src.link(&sink.static_pad("sink").unwrap()).unwrap();
        Arc::new(Ctx {
            opts: opts.clone(),
            sink,
            src,
            period: Duration::from_secs(1) / opts.rate,
            ledger: Mutex::new(Ledger::default()),
            changed: Condvar::new(),
            inboxes: (0..READER_THREADS).map(|_| Mutex::default()).collect(),
            next_reader: AtomicUsize::new(0),
            tcp: Mutex::new(TcpListener::bind("127.0.0.1:0").expect("listen")),
            stop_actions: AtomicBool::new(false),
            stop_producer: AtomicBool::new(false),
            stop_readers: AtomicBool::new(false),
            stop_monitor: AtomicBool::new(false),
            need_events: AtomicBool::new(true),
            burst: AtomicU64::new(0),
            n: Counters::default(),
            problems: Mutex::default(),
            beats: Beats::new(start),
            queue_bound: queue_bound(),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Clients whose fd the application has not closed yet.
    pub fn live(&self) -> u64 {
        self.lock().by_fd.len() as u64
    }

    pub fn beat(&self, name: String) -> Arc<Beat> {
        self.beats.beat(name)
    }

    pub fn problem(&self, check: Check, msg: String) {
        self.problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(check, msg);
    }

    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn peak(c: &AtomicU64, v: u64) {
        c.fetch_max(v, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Closes the application's fd once the element forgot every client on it and no
    /// other thread is using the number.
    pub fn maybe_close(&self, l: &mut Ledger, id: u64) {
        let Some(s) = l.slots.get_mut(&id) else {
            return;
        };
        if !s.open
            || !s.first_add_done
            || s.adds_in_flight > 0
            || s.pins > 0
            || s.accepted != s.fd_removed
        {
            return;
        }
        let fd = s.fd;
        s.open = false;
        s.sink = None;
        s.drain.store(true, Ordering::Relaxed);
        let finished = s.report.is_some();
        l.by_fd.remove(&fd);
        if finished {
            self.finish(l, id);
        }
    }

    pub fn finish(&self, l: &mut Ledger, id: u64) {
        let s = l.slots.get_mut(&id).unwrap();
        if !s.finished {
            s.finished = true;
            l.unfinished -= 1;
            l.finished += 1;
            self.changed.notify_all();
        }
    }

    pub fn make_pair(&self, transport: Transport) -> std::io::Result<(OwnedFd, OwnedFd)> {
        Ok(match transport {
            Transport::SocketPair => socketpair(
                AddressFamily::Unix,
                SockType::Stream,
                None,
                SockFlag::SOCK_CLOEXEC,
            )?,
            Transport::Pipe => {
                let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
                (w, r)
            }
            Transport::Tcp => {
                let listener = self.tcp.lock().unwrap();
                let client = TcpStream::connect(listener.local_addr()?)?;
                let (server, _) = listener.accept()?;
                (server.into(), client.into())
            }
        })
    }

    pub fn mark_reader_acted(&self, slot: u64) {
        if let Some(s) = self.lock().slots.get_mut(&slot) {
            s.reader_acted = true;
        }
    }

    pub fn reader_done(&self, slot: u64, report: ReaderReport) {
        let mut l = self.lock();
        let s = l.slots.get_mut(&slot).unwrap();
        s.report = Some(report);
        if !s.open {
            self.finish(&mut l, slot);
        }
    }
}

/// The clients not finished, for the watchdog's report.
pub fn ledger_report(ctx: &Ctx) -> String {
    let Ok(l) = ctx.ledger.try_lock() else {
        return "stress:   ledger: locked\n".into();
    };
    let mut msg = format!(
        "stress:   ledger: {} clients unfinished, {} open, {} adds in flight\n",
        l.unfinished,
        l.by_fd.len(),
        l.adds_in_flight
    );
    for s in l.slots.values().filter(|s| !s.finished).take(10) {
        msg += &format!(
            "stress:   unfinished fd {} {:?} {}: open {}, accepted {}, removed {}, fd-removed {}, adds in flight {}, pins {}, reader reported {}\n",
            s.fd,
            s.transport,
            s.behaviour.name(),
            s.open,
            s.accepted,
            s.removed,
            s.fd_removed,
            s.adds_in_flight,
            s.pins,
            s.report.is_some()
        );
    }
    msg
}
