// SPDX-License-Identifier: MPL-2.0

//! What the overload phase's threads share: the element, its clients as the
//! application holds them, the stage the run is in, the figures, the problems found;
//! and the element's signals, as the application handles them.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

use super::super::report::Problems;
use super::super::rng::Rng;
use super::super::stream::Verifier;
use super::super::watchdog::{Beat, Beats};
use super::checks::Check;
use super::{Plan, Policy, UNITS_MAX};

/// How a client's reader reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Never reads (until the element lets go of it).
    Stalled,
    /// Reads at most SLOW_RATE until the overload ends, then as fast as it can.
    Slow,
    /// Reads as fast as it can.
    Fast,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Stalled => "stalled",
            Kind::Slow => "slow",
            Kind::Fast => "fast",
        }
    }
}

/// Where the run is, in order; a removal is judged by the stage it happened in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// The producer pushes as fast as it can; readers read by their kind.
    Overload,
    /// The producer stopped; every reader but the stalled reads everything queued.
    Drain,
    /// The producer pushes as fast as it can again, every reader but the stalled
    /// reads fast, until NULL.
    Tail,
    /// The element is taken to NULL: it removes everybody.
    Null,
}

impl Stage {
    const ALL: [Stage; 4] = [Stage::Overload, Stage::Drain, Stage::Tail, Stage::Null];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Overload => "the overload",
            Stage::Drain => "the drain",
            Stage::Tail => "the second overload",
            Stage::Null => "NULL",
        }
    }
}

/// What the application saw in `client-removed`.
pub struct Removal {
    pub status: String,
    pub stage: Stage,
    /// The sequence number the producer was pushing (or had pushed last) then.
    pub pushing: u64,
    /// Bytes queued in the client's socket, not read yet (FIONREAD on its end).
    pub unread: u64,
    /// (bytes-sent, buffers-dropped) from `get-stats` in the handler.
    pub stats: Option<(u64, u64)>,
}

/// What a kept client had at the end of the drain.
pub struct Drained {
    pub bytes: u64,
    pub last_whole: Option<u64>,
    pub gaps: u64,
    /// (bytes-sent, buffers-dropped) from `get-stats`.
    pub stats: Option<(u64, u64)>,
}

const NONE: u64 = u64::MAX;

/// A reader's progress, published after every read for the main thread.
pub struct Progress {
    bytes: AtomicU64,
    last_whole: AtomicU64,
    gaps: AtomicU64,
    first: AtomicU64,
}

impl Progress {
    pub fn publish(&self, v: &Verifier) {
        self.bytes.store(v.bytes, Ordering::Relaxed);
        self.gaps.store(v.gaps, Ordering::Relaxed);
        self.first
            .store(v.first_seq.unwrap_or(NONE), Ordering::Relaxed);
        self.last_whole
            .store(v.last_whole.unwrap_or(NONE), Ordering::Release);
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn gaps(&self) -> u64 {
        self.gaps.load(Ordering::Relaxed)
    }

    /// The first buffer read, if any.
    pub fn first(&self) -> Option<u64> {
        Some(self.first.load(Ordering::Relaxed)).filter(|&s| s != NONE)
    }

    pub fn last_whole(&self) -> Option<u64> {
        Some(self.last_whole.load(Ordering::Acquire)).filter(|&s| s != NONE)
    }
}

/// One client: the fd the application gave to `add`, the other end its reader reads.
pub struct Client {
    pub kind: Kind,
    pub fd: RawFd,
    /// The reader's end; open until the reader saw the end of the stream, which
    /// comes only after the application closed `fd` (after `client-fd-removed`).
    pub reader_fd: RawFd,
    /// The application's fd; closed once the element let go of it.
    app_fd: Mutex<Option<OwnedFd>>,
    pub removal: Mutex<Option<Removal>>,
    /// The element let go of it (`client-removed`): read everything now.
    pub drain: AtomicBool,
    pub progress: Progress,
    pub drained: Mutex<Option<Drained>>,
    /// The reader's verifier once the stream ended.
    pub finished: Mutex<Option<Verifier>>,
}

impl Client {
    pub fn removal(&self) -> MutexGuard<'_, Option<Removal>> {
        self.removal.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the application's fd (the reader then sees the end of the stream);
    /// false if it was closed already.
    pub fn close_app_fd(&self) -> bool {
        self.app_fd
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .is_some()
    }
}

/// What happened, counted as it happens.
#[derive(Default)]
pub struct Counters {
    pub pushed: AtomicU64,
    pub longest_push_us: AtomicU64,
    /// The longest a reader thread took over one pass (reading what epoll
    /// reported, then the slow and new readers): how long a fast client's socket
    /// may have waited for its reader.
    pub longest_reader_pass_us: AtomicU64,
    pub peak_queued: AtomicU64,
    pub peak_rss_kib: AtomicU64,
    /// Peak `io-load`, as f64 bits.
    pub peak_io_load: AtomicU64,
    pub bus_warnings: AtomicU64,
    pub overload_warnings: AtomicU64,
    pub first_overload_warning: Mutex<Option<String>>,
}

/// The run's shared state.
pub struct Phase {
    pub policy: Policy,
    pub plan: Plan,
    pub start: Instant,
    pub sink: gst::Element,
    pub src: gst::Pad,
    pub bus: gst::Bus,
    /// `io-load` exists (the element measures its IO threads).
    pub has_io_load: bool,
    pub clients: Vec<Client>,
    by_fd: HashMap<RawFd, usize>,
    stage: AtomicU8,
    /// The overload ended: slow readers read fast from now on.
    pub all_fast: AtomicBool,
    /// The last buffer of the overload, once it ended: every kept client must
    /// read up to it.
    drain_target: AtomicU64,
    /// The sequence number being pushed, or pushed last.
    pub pushing: AtomicU64,
    /// When the push in progress started (µs since `start`, plus one); 0 between
    /// pushes.
    pub push_since_us: AtomicU64,
    pub stop_producer: AtomicBool,
    pub stop_sampler: AtomicBool,
    /// Clients whose reader finished; notified by readers and by the handlers.
    pub finished: Mutex<usize>,
    pub changed: Condvar,
    pub beats: Arc<Beats>,
    pub problems: Mutex<Problems<Check>>,
    pub n: Counters,
}

impl Phase {
    /// The element (in NULL) with its limits set, the overload policy chosen if it
    /// can be, and the clients' socketpairs (not added yet); also the readers' ends
    /// (by client) and, as `Err`, why the policy could not be chosen.
    pub fn new(
        plan: &Plan,
        policy: Policy,
        seed: u64,
    ) -> (Arc<Phase>, Vec<OwnedFd>, Result<(), String>) {
        let sink = gst::ElementFactory::make("rsmultifdsink")
            .property("sync", false)
            .property("units-max", UNITS_MAX as i64)
            .property("io-threads", plan.io_threads)
            .build()
            .expect("rsmultifdsink");
        let chosen = choose_policy(&sink, policy);
        let bus = gst::Bus::new();
        sink.set_bus(Some(&bus));
        let src = gst::Pad::builder(gst::PadDirection::Src)
            .name("src")
            .build();
        src.set_active(true).unwrap();
        src.link(&sink.static_pad("sink").unwrap()).unwrap();
        let (clients, readers) = make_clients(plan, seed);
        let by_fd = clients.iter().enumerate().map(|(i, c)| (c.fd, i)).collect();
        let phase = Arc::new(Phase {
            policy,
            plan: plan.clone(),
            start: Instant::now(),
            has_io_load: sink.find_property("io-load").is_some(),
            sink,
            src,
            bus,
            clients,
            by_fd,
            stage: AtomicU8::new(0),
            all_fast: AtomicBool::new(false),
            drain_target: AtomicU64::new(NONE),
            pushing: AtomicU64::new(0),
            push_since_us: AtomicU64::new(0),
            stop_producer: AtomicBool::new(false),
            stop_sampler: AtomicBool::new(false),
            finished: Mutex::new(0),
            changed: Condvar::new(),
            beats: Beats::new(Instant::now()),
            problems: Mutex::default(),
            n: Counters::default(),
        });
        connect(&phase);
        (phase, readers, chosen)
    }

    pub fn beat(&self, name: &str) -> Arc<Beat> {
        self.beats.beat(name.into())
    }

    pub fn problem(&self, check: Check, msg: String) {
        self.problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(check, msg);
    }

    pub fn stage(&self) -> Stage {
        Stage::ALL[self.stage.load(Ordering::SeqCst) as usize]
    }

    pub fn set_stage(&self, stage: Stage) {
        let i = Stage::ALL.iter().position(|s| *s == stage).unwrap();
        self.stage.store(i as u8, Ordering::SeqCst);
    }

    pub fn drain_target(&self) -> Option<u64> {
        Some(self.drain_target.load(Ordering::SeqCst)).filter(|&s| s != NONE)
    }

    /// The overload ended after buffer `last`: slow readers read fast from now on,
    /// and each reader tells when it has `last`.
    pub fn start_drain(&self, last: Option<u64>) {
        self.drain_target
            .store(last.unwrap_or(NONE), Ordering::SeqCst);
        self.all_fast.store(true, Ordering::SeqCst);
    }

    pub fn finished(&self) -> MutexGuard<'_, usize> {
        self.finished.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits (woken by readers and handlers, and every 100 ms) until `done` (given
    /// the clients whose reader finished) or the deadline; beats meanwhile. True if
    /// `done`.
    pub fn wait_until(
        &self,
        beat: &Beat,
        doing: &'static str,
        deadline: Instant,
        done: impl Fn(&Phase, usize) -> bool,
    ) -> bool {
        let mut finished = self.finished();
        loop {
            beat.beat(doing);
            if done(self, *finished) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let step = (deadline - now).min(Duration::from_millis(100));
            finished = self.changed.wait_timeout(finished, step).unwrap().0;
        }
    }

    /// (bytes-sent, buffers-dropped) of a client, if the element knows it.
    pub fn stats(&self, fd: RawFd) -> Option<(u64, u64)> {
        let st = self
            .sink
            .emit_by_name::<gst::Structure>("get-stats", &[&fd]);
        st.get::<u64>("bytes-sent")
            .ok()
            .zip(st.get::<u64>("buffers-dropped").ok())
    }

    /// The clients whose reader has not finished, for the watchdog.
    pub fn unfinished_report(&self) -> String {
        let mut msg = String::new();
        let unfinished = self
            .clients
            .iter()
            .filter(|c| c.finished.try_lock().map_or(true, |f| f.is_none()));
        for c in unfinished.take(10) {
            let removal = c.removal.try_lock().ok().map(|r| {
                r.as_ref().map_or("not removed".to_string(), |r| {
                    format!("removed {}", r.status)
                })
            });
            msg += &format!(
                "stress:   overload: fd {} ({}) unfinished: {}, read {} bytes\n",
                c.fd,
                c.kind.name(),
                removal.as_deref().unwrap_or("?"),
                c.progress.bytes()
            );
        }
        msg
    }

    fn on_removed(&self, fd: RawFd, status: &str) {
        let Some(&i) = self.by_fd.get(&fd) else {
            self.problem(
                Check::Removals,
                format!("client-removed({status}) for fd {fd}, not one of ours"),
            );
            return;
        };
        let c = &self.clients[i];
        let removal = Removal {
            status: status.to_string(),
            stage: self.stage(),
            pushing: self.pushing.load(Ordering::SeqCst),
            unread: unread_bytes(c.reader_fd),
            stats: self.stats(fd),
        };
        {
            let mut r = c.removal();
            if r.is_some() {
                drop(r);
                self.problem(
                    Check::Removals,
                    format!("fd {fd}: a second client-removed ({status})"),
                );
                return;
            }
            *r = Some(removal);
        }
        c.drain.store(true, Ordering::Relaxed);
        let _finished = self.finished();
        self.changed.notify_all();
    }

    fn on_fd_removed(&self, fd: RawFd) {
        let Some(&i) = self.by_fd.get(&fd) else {
            self.problem(
                Check::Removals,
                format!("client-fd-removed for fd {fd}, not one of ours"),
            );
            return;
        };
        let c = &self.clients[i];
        if c.removal().is_none() {
            self.problem(
                Check::Removals,
                format!("fd {fd}: client-fd-removed before client-removed"),
            );
        }
        // The element has let go of the fd: close it, and its reader sees the end.
        if !c.close_app_fd() {
            self.problem(
                Check::Removals,
                format!("fd {fd}: a second client-fd-removed"),
            );
        }
    }
}

/// Sets `overload-policy` to `policy`; an error if the element has no such
/// property, it does not default to back-pressure, or the value does not stick.
fn choose_policy(sink: &gst::Element, policy: Policy) -> Result<(), String> {
    let nick = |v: &glib::Value| {
        glib::EnumValue::from_value(v).map_or("?".to_string(), |(_, e)| e.nick().to_string())
    };
    let Some(pspec) = sink.find_property("overload-policy") else {
        return Err("the element has no overload-policy property".into());
    };
    let default = nick(pspec.default_value());
    if policy != Policy::BackPressure {
        sink.set_property_from_str("overload-policy", policy.nick());
    }
    let now = nick(&sink.property_value("overload-policy"));
    if default != Policy::BackPressure.nick() {
        Err(format!(
            "overload-policy defaults to {default}, not back-pressure"
        ))
    } else if now != policy.nick() {
        Err(format!(
            "overload-policy is {now} after setting {}",
            policy.nick()
        ))
    } else {
        Ok(())
    }
}

/// Socketpairs, the stalled and slow ones spread at random among the fast; and
/// their readers' ends.
fn make_clients(plan: &Plan, seed: u64) -> (Vec<Client>, Vec<OwnedFd>) {
    let mut kinds: Vec<Kind> = (0..plan.clients)
        .map(|i| {
            if i < plan.stalled {
                Kind::Stalled
            } else if i < plan.stalled + plan.slow {
                Kind::Slow
            } else {
                Kind::Fast
            }
        })
        .collect();
    let mut rng = Rng::new(seed ^ 0x0BE7_1040);
    for i in (1..kinds.len()).rev() {
        kinds.swap(i, rng.below(i as u64 + 1) as usize);
    }
    kinds
        .into_iter()
        .map(|kind| {
            let (app, reader) = socketpair(
                AddressFamily::Unix,
                SockType::Stream,
                None,
                SockFlag::SOCK_CLOEXEC,
            )
            .expect("socketpair (is the fd limit high enough?)");
            fcntl(reader.as_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).expect("O_NONBLOCK");
            let client = Client {
                kind,
                fd: app.as_raw_fd(),
                reader_fd: reader.as_raw_fd(),
                app_fd: Mutex::new(Some(app)),
                removal: Mutex::new(None),
                drain: AtomicBool::new(false),
                progress: Progress {
                    bytes: AtomicU64::new(0),
                    last_whole: AtomicU64::new(NONE),
                    gaps: AtomicU64::new(0),
                    first: AtomicU64::new(NONE),
                },
                drained: Mutex::new(None),
                finished: Mutex::new(None),
            };
            (client, reader)
        })
        .unzip()
}

/// Bytes waiting in a socket to be read.
fn unread_bytes(fd: RawFd) -> u64 {
    let mut n: nix::libc::c_int = 0;
    // SAFETY: FIONREAD writes one int; `fd` is the reader's end, open until its
    // reader saw the end of the stream, which needs the other end closed first (by
    // the application, after client-fd-removed, so after this client-removed).
    let r = unsafe { nix::libc::ioctl(fd, nix::libc::FIONREAD, &mut n) };
    if r == 0 { n.max(0) as u64 } else { 0 }
}

/// Connects the element's client signals to the phase.
fn connect(phase: &Arc<Phase>) {
    let weak = Arc::downgrade(phase);
    phase.sink.connect("client-removed", false, move |args| {
        let fd = args[1].get::<i32>().unwrap();
        let status = glib::EnumValue::from_value(&args[2])
            .map_or("?".to_string(), |(_, v)| v.nick().to_string());
        if let Some(phase) = weak.upgrade() {
            phase.on_removed(fd, &status);
        }
        None
    });
    let weak = Arc::downgrade(phase);
    phase.sink.connect("client-fd-removed", false, move |args| {
        let fd = args[1].get::<i32>().unwrap();
        if let Some(phase) = weak.upgrade() {
            phase.on_fd_removed(fd);
        }
        None
    });
}
