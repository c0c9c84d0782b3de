// SPDX-License-Identifier: MPL-2.0

//! The overload phase: a producer far faster than the IO side, some clients that
//! never read, some that read slowly, most as fast as they can; run once per
//! overload policy (`back-pressure`, the default, and `drop-buffers`), each on an
//! element of its own.
//!
//! The producer pushes sequence-numbered 4 KiB buffers (`stream`) as fast as it can
//! into `rsmultifdsink` (`sync=false`, `units-max=200` buffers) with `plan.clients`
//! socketpair clients; 4 reader threads read the other ends: `stalled` clients never
//! (until the element lets go of them), `slow` ones 16 KiB/s, the rest as fast as
//! they can, each verifying every byte. Stages:
//!
//! 1. the overload, `plan.seconds` (longer, up to 10 s more, while a stalled client
//!    is still there);
//! 2. the drain: the producer stops, slow readers read fast, and every client still
//!    there must get every buffer up to the last one pushed; its get-stats are
//!    taken then;
//! 3. the producer pushes as fast as it can again and, while it is inside a push
//!    (held back by back-pressure), the element is taken to NULL, timed.
//!
//! Checks (`checks`): the policy exists and is chosen; only stalled clients, and
//! slow ones that really fell past units-max while their socket was full, are
//! removed (status slow); every stalled client is; every stream is exact, in order,
//! from a buffer boundary; no buffer is missing (back-pressure) or only whole
//! buffers counted in buffers-dropped (drop-buffers); every kept client drained to
//! the last buffer; peak RSS within what the limits allow; NULL during the overload
//! returns within 2 s; nothing failed, panicked or hung (watchdog).

mod checks;
mod phase;
mod threads;

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gst::prelude::*;

use super::report::Report;
use super::system::proc_status_kib;
use super::threads::push_stream_events;
use super::watchdog::{Beat, Watchdog, end_panic_watch, watch_panics};
use super::{READER_THREADS, spawn};
use checks::{Check, Finals};
use phase::{Drained, Kind, Phase, Stage};

/// Every buffer's length, its 16-byte header included.
const BUFFER_SIZE: usize = 4096;
/// The sink's `units-max`, in buffers.
const UNITS_MAX: u64 = 200;
/// A slow reader reads SLOW_CHUNK bytes every SLOW_EVERY: 16 KiB/s, a small part of
/// what the IO side gives each client even with 5,000 of them.
const SLOW_CHUNK: usize = 1024;
const SLOW_EVERY: Duration = Duration::from_micros(62_500);
/// A client removed as slow must have had at least one buffer still unread in its
/// socket. The element judges a socket full when it will not take data (for a
/// UNIX socket: over a quarter of its send buffer, tens of KiB, queued); a slow
/// reader needs over a second to read that down to one buffer, so a client the
/// element found full still holds this much when `client-removed` runs, while one
/// it merely never reached (an IO thread behind) has read its socket empty.
const FULL_MIN: u64 = BUFFER_SIZE as u64;
/// How long NULL may take while the producer is held back.
const NULL_LIMIT: Duration = Duration::from_secs(2);
/// How much longer the overload goes on while a stalled client is still there.
const STALLED_GRACE: Duration = Duration::from_secs(10);
/// How long the drain, and the readers' end after NULL, may take.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// A push that has lasted this long is held back (an unhindered one takes µs).
const HELD_BACK: Duration = Duration::from_millis(1);

/// The overload phase's size.
#[derive(Clone, Debug)]
pub struct Plan {
    pub clients: usize,
    pub stalled: usize,
    pub slow: usize,
    /// Seconds of overload.
    pub seconds: u64,
    /// The element's `io-threads`.
    pub io_threads: u32,
}

/// The element's `overload-policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    BackPressure,
    DropBuffers,
}

impl Policy {
    pub const ALL: [Policy; 2] = [Policy::BackPressure, Policy::DropBuffers];

    pub fn nick(self) -> &'static str {
        match self {
            Policy::BackPressure => "back-pressure",
            Policy::DropBuffers => "drop-buffers",
        }
    }
}

/// Runs the phase with one policy; returns its figures and checks.
pub fn run(plan: &Plan, policy: Policy, seed: u64) -> Report {
    let (phase, reader_fds, chosen) = Phase::new(plan, policy, seed);
    if let Err(why) = chosen {
        if policy != Policy::BackPressure {
            return checks::not_run(policy, &why);
        }
        // The default policy: run as the element is.
        phase.problem(Check::Policy, why);
    }
    watch_panics();
    let main_beat = phase.beat("overload main");
    let weak = Arc::downgrade(&phase);
    let watchdog = Watchdog::start(phase.beats.clone(), move || {
        weak.upgrade()
            .map_or_else(String::new, |p| p.unfinished_report())
    });
    let (readers, rss_baseline, rss_hwm_reset) = start(&phase, &main_beat, reader_fds);
    let sampler = {
        let p = phase.clone();
        spawn("stress-overload-sampler", move || threads::sampler(p))
    };

    let (last, overload_took, pushes) = overload(&phase, &main_beat);
    let drain_took = drain(&phase, &main_beat, last);
    let null = null_while_pushing(&phase, &main_beat, last.map_or(0, |l| l + 1));
    finish_readers(&phase, &main_beat, readers);

    phase.stop_sampler.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    main_beat.done();
    watchdog.stop();
    if let Some(panics) = end_panic_watch() {
        phase.problem(Check::Ended, panics);
    }
    let rss_peak = if rss_hwm_reset {
        proc_status_kib("VmHWM:")
    } else {
        0
    }
    .max(phase.n.peak_rss_kib.load(Ordering::Relaxed));
    checks::evaluate(
        &phase,
        Finals {
            last,
            overload_took,
            drain_took,
            null,
            pushes,
            rss_baseline,
            rss_peak,
            rss_hwm_reset,
        },
    )
}

/// PLAYING, the stream's events, every client added, the readers started; returns
/// the readers, the RSS baseline (KiB) and whether VmHWM could be reset to it.
fn start(
    phase: &Arc<Phase>,
    beat: &Beat,
    reader_fds: Vec<OwnedFd>,
) -> (Vec<JoinHandle<()>>, u64, bool) {
    beat.beat("to PLAYING");
    if let Err(e) = phase.sink.set_state(gst::State::Playing) {
        phase.problem(Check::Ended, format!("set_state(Playing): {e}"));
    }
    if !push_stream_events(&phase.src) {
        phase.problem(Check::Ended, "the stream's events were refused".into());
    }
    beat.beat("adding clients");
    for c in &phase.clients {
        phase.sink.emit_by_name::<()>("add", &[&c.fd]);
    }
    let mut shares: Vec<Vec<(usize, OwnedFd)>> = (0..READER_THREADS).map(|_| Vec::new()).collect();
    for (i, fd) in reader_fds.into_iter().enumerate() {
        shares[i % READER_THREADS].push((i, fd));
    }
    let readers = shares
        .into_iter()
        .enumerate()
        .map(|(idx, share)| {
            let p = phase.clone();
            spawn("stress-overload-reader", move || {
                threads::reader(p, idx, share)
            })
        })
        .collect();
    // From here on the peak counts: the clients, readers and element are set up.
    let hwm_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    (readers, proc_status_kib("VmRSS:"), hwm_reset)
}

/// The producer during the overload.
pub struct PushFigures {
    pub during_overload: u64,
    pub longest_push_us: u64,
}

/// The overload: `plan.seconds`, longer while a stalled client is still there.
/// Returns the last buffer pushed, how long it took and the producer's figures.
fn overload(phase: &Arc<Phase>, beat: &Beat) -> (Option<u64>, Duration, PushFigures) {
    let started = Instant::now();
    let (producer, _) = spawn_producer(phase, 0);
    let seconds = Duration::from_secs(phase.plan.seconds);
    phase.wait_until(beat, "overload", started + seconds, |_, _| false);
    phase.wait_until(
        beat,
        "overload: waiting for stalled clients to be removed",
        started + seconds + STALLED_GRACE,
        |p, _| {
            p.clients
                .iter()
                .filter(|c| c.kind == Kind::Stalled)
                .all(|c| c.removal().is_some())
        },
    );
    phase.set_stage(Stage::Drain);
    phase.stop_producer.store(true, Ordering::SeqCst);
    beat.beat("stopping the producer");
    let last = producer.join().expect("producer");
    let pushes = PushFigures {
        during_overload: phase.n.pushed.load(Ordering::Relaxed),
        longest_push_us: phase.n.longest_push_us.load(Ordering::Relaxed),
    };
    (last, started.elapsed(), pushes)
}

fn spawn_producer(phase: &Arc<Phase>, seq: u64) -> (JoinHandle<Option<u64>>, mpsc::Receiver<()>) {
    let p = phase.clone();
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("stress-overload-producer".into())
        .spawn(move || {
            let last = threads::producer(p, seq);
            let _ = tx.send(());
            last
        })
        .expect("spawn");
    (handle, rx)
}

/// Every reader but the stalled reads fast until every client still there has the
/// last buffer; then each one's progress and get-stats are taken. Returns how long
/// that took, if it finished.
fn drain(phase: &Arc<Phase>, beat: &Beat, last: Option<u64>) -> Option<Duration> {
    let started = Instant::now();
    phase.start_drain(last);
    let target = last?;
    let kept = |c: &phase::Client| c.kind != Kind::Stalled && c.removal().is_none();
    let done = phase.wait_until(beat, "drain", started + DRAIN_LIMIT, |p, _| {
        p.clients
            .iter()
            .filter(|c| kept(c))
            .all(|c| c.progress.last_whole() == Some(target))
    });
    let took = started.elapsed();
    for c in phase.clients.iter().filter(|c| kept(c)) {
        let stats = phase.stats(c.fd);
        let v = &c.progress;
        *c.drained.lock().unwrap() = Some(Drained {
            bytes: v.bytes(),
            last_whole: v.last_whole(),
            // Every client joins before buffer 0 is pushed: a first buffer after 0
            // is a skip made before its first byte, which no gap shows.
            gaps: v.gaps() + v.first().unwrap_or(0),
            stats,
        });
    }
    done.then_some(took)
}

/// What NULL during the overload did.
pub struct NullTiming {
    /// How long the push in progress had lasted when NULL was asked for (None: the
    /// producer was between pushes).
    pub push_age: Option<Duration>,
    pub took: Duration,
    pub ok: bool,
    /// How long after NULL was asked for the producer got out of its push.
    pub producer_out: Option<Duration>,
}

/// Pushes as fast as possible again and, once a push is held back (or after 1 s),
/// takes the element to NULL.
fn null_while_pushing(phase: &Arc<Phase>, beat: &Beat, seq: u64) -> NullTiming {
    phase.set_stage(Stage::Tail);
    phase.stop_producer.store(false, Ordering::SeqCst);
    let (producer, out) = spawn_producer(phase, seq);
    let since = Instant::now();
    let push_age = || {
        let at = phase.push_since_us.load(Ordering::SeqCst);
        (at > 0).then(|| {
            phase
                .start
                .elapsed()
                .saturating_sub(Duration::from_micros(at - 1))
        })
    };
    beat.beat("waiting for a push held back");
    while since.elapsed() < Duration::from_secs(1) && push_age().is_none_or(|a| a < HELD_BACK) {
        std::thread::sleep(Duration::from_micros(200));
    }
    phase.set_stage(Stage::Null);
    let age = push_age();
    beat.beat("to NULL");
    let asked = Instant::now();
    let ok = match phase.sink.set_state(gst::State::Null) {
        Ok(_) => true,
        Err(e) => {
            phase.problem(Check::Null, format!("set_state(Null): {e}"));
            false
        }
    };
    let took = asked.elapsed();
    beat.beat("waiting for the producer");
    let producer_out = out
        .recv_timeout(NULL_LIMIT.saturating_sub(took))
        .ok()
        .map(|()| asked.elapsed());
    if producer_out.is_none() {
        // Stop it the ordinary way; the watchdog reports it if it never returns.
        phase.stop_producer.store(true, Ordering::SeqCst);
    }
    producer.join().expect("producer");
    NullTiming {
        push_age: age,
        took,
        ok,
        producer_out,
    }
}

/// Waits until every reader saw the end of its stream; past the limit, closes the
/// fds the element never let go of, so the readers end.
fn finish_readers(phase: &Arc<Phase>, beat: &Beat, readers: Vec<JoinHandle<()>>) {
    let all = phase.clients.len();
    let deadline = Instant::now() + DRAIN_LIMIT;
    if !phase.wait_until(beat, "waiting for the readers", deadline, |_, finished| {
        finished >= all
    }) {
        for c in &phase.clients {
            if c.close_app_fd() {
                phase.problem(
                    Check::Removals,
                    format!("fd {}: no client-fd-removed after NULL", c.fd),
                );
            }
        }
    }
    for r in readers {
        r.join().expect("reader");
    }
}
