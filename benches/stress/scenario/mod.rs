// SPDX-License-Identifier: MPL-2.0

//! The stress scenario: `rsmultifdsink` under churn, faults and concurrent API calls,
//! then under overload (`overload`). `cargo bench --bench stress` runs it as a
//! program (short or long form), the test suite's `tests/stress.rs` runs its short
//! form.
//!
//! The churn phase: one producer thread pushes sequence-numbered buffers (a 16-byte
//! header: magic, length, sequence number and keyframe bit; then bytes that are a
//! function of the sequence number) through a src pad of its own into
//! `rsmultifdsink` (`sync=false`, `units-max` so slow clients are kicked,
//! `buffers-min`), while:
//!
//! * 8 action threads add clients (socketpairs, pipes and TCP loopback pairs; `add` and
//!   `add-full` with every sync method and burst), `remove`, `remove-flush`, `clear`,
//!   `get-stats` (known and unknown fds) and add live fds again (duplicates);
//! * the `client-added`/`client-removed`/`client-fd-removed` handlers call `get-stats`
//!   on their own fd and `get-stats`, `add`, `remove`, `remove-flush` and `clear` on
//!   others;
//! * 4 reader threads read the other ends fast, slowly, after a stall or never, and
//!   half-close (`shutdown(SHUT_WR)`), close, or reset (SO_LINGER 0 on TCP) them;
//! * a property thread changes `units-max`, `units-soft-max`, `recover-policy`,
//!   `timeout`, `buffers-min`, `burst-format`/`burst-value` and `sync-method`;
//! * a cycler takes the element PLAYING → PAUSED → READY → NULL → PLAYING (and the
//!   partial PLAYING → PAUSED → PLAYING, PLAYING → PAUSED → READY → PLAYING) under load.
//!
//! The application owns every fd: it closes the fd it gave to `add` only after
//! `client-fd-removed` (and only once no other thread is calling an action with it).
//! At the end the report holds its figures, one per line, then one line per check and
//! `stress: N passed, M failed`. A watchdog aborts (with the thread and what it was
//! doing) if a thread makes no progress for 20 s.
//!
//! Then the overload phase (`overload`) runs once per overload policy, on an element
//! of its own.
//!
//! Modules: `stream` (the buffers and the verifier of what a reader got), `clients`
//! (transports, reader behaviours, the application's ledger), `app` (the shared state),
//! `handlers` (the element's signals), `actions` (the action threads), `readers`,
//! `threads` (producer, state cycler, property changer, sampler), `watchdog`,
//! `checks` (the checks and what they found), `report` (the figures) and `overload`
//! (the overload phase).

#[path = "../../common/rng.rs"]
mod rng;
#[path = "../../common/system.rs"]
mod system;

mod actions;
mod app;
mod checks;
mod clients;
mod handlers;
mod overload;
mod readers;
mod report;
mod stream;
mod threads;
mod watchdog;

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gst::prelude::*;

use app::Ctx;
use checks::{AtEnd, Finals};
use clients::Ledger;
use stream::{KF_INTERVAL, MAX_LEN};
use system::{init_gstreamer, proc_status_kib, raise_fd_limit};
use watchdog::{Beat, Watchdog};

pub use overload::Plan;
pub use report::Report;

/// Limits the property thread chooses from (units in buffers).
const UNITS_MAX: [i64; 4] = [60, 120, 200, 400];
const UNITS_SOFT_MAX: [i64; 4] = [-1, 30, 50, 100];
const RECOVER: [&str; 4] = ["none", "latest", "soft-limit", "keyframe"];
const BUFFERS_MIN: [i32; 3] = [-1, 10, 50];
const TIMEOUT_MS: [u64; 4] = [0, 0, 500, 2000];
/// Every sync method, by its nick (as `gst-launch-1.0` and the property parser take it).
const SYNC_METHODS: [&str; 6] = [
    "latest",
    "next-keyframe",
    "latest-keyframe",
    "burst",
    "burst-keyframe",
    "burst-with-keyframe",
];

const ACTION_THREADS: usize = 8;
const READER_THREADS: usize = 4;
const FD_LIMIT: usize = 20_000;

/// How much of the scenario to run.
#[derive(Clone, Debug)]
pub struct Options {
    pub form: &'static str,
    /// New clients to add (each one also leaves: twice as many connect/disconnect events).
    pub connects: u64,
    /// Most clients at once.
    pub max_live: usize,
    /// Buffers per second.
    pub rate: u32,
    pub full_cycles: u32,
    pub partial_cycles: u32,
    /// Mean pause between two operations of one action thread.
    pub op_pause_ms: u64,
    pub seed: u64,
    /// Run the churn phase (everything above).
    pub churn: bool,
    /// The overload phase's size, if it runs.
    pub overload: Option<Plan>,
}

impl Options {
    /// The short form: 1,000 clients, what the test suite runs.
    pub fn short() -> Options {
        Options {
            form: "short",
            connects: 1_000,
            max_live: 100,
            rate: 1000,
            full_cycles: 3,
            partial_cycles: 2,
            op_pause_ms: 20,
            seed: 1,
            churn: true,
            overload: Some(Plan {
                clients: 200,
                stalled: 5,
                slow: 10,
                seconds: 2,
                io_threads: 1,
            }),
        }
    }
}

/// A sync method as a value of the element's enum (the type of its `sync-method`
/// property), for `add-full`.
fn sync_method(sink: &gst::Element, nick: &str) -> gst::glib::Value {
    let enum_type = sink.property_type("sync-method").expect("sync-method");
    gst::glib::EnumClass::with_type(enum_type)
        .and_then(|c| c.to_value_by_nick(nick))
        .unwrap_or_else(|| panic!("no sync method {nick}"))
}

fn pace(ms: u64) {
    if ms > 0 {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// (device, inode) of an fd: tells whether the number still names our file.
fn identity(fd: impl AsFd) -> Option<(u64, u64)> {
    nix::sys::stat::fstat(fd).ok().map(|s| (s.st_dev, s.st_ino))
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("spawn")
}

/// The threads of a run, by when they stop.
struct Threads {
    /// Action threads, the property changer and the cycler: stop first.
    workers: Vec<JoinHandle<()>>,
    producer: JoinHandle<()>,
    readers: Vec<JoinHandle<()>>,
    sampler: JoinHandle<()>,
}

impl Threads {
    fn start(ctx: &Arc<Ctx>) -> Threads {
        let with = |f: fn(Arc<Ctx>)| {
            let c = ctx.clone();
            move || f(c)
        };
        let readers = (0..READER_THREADS)
            .map(|i| {
                let c = ctx.clone();
                spawn("stress-reader", move || readers::reader_thread(c, i))
            })
            .collect();
        let sampler = spawn("stress-sampler", with(threads::sampler));
        let producer = spawn("stress-producer", with(threads::producer));
        let mut workers: Vec<JoinHandle<()>> = (0..ACTION_THREADS)
            .map(|i| {
                let c = ctx.clone();
                spawn("stress-actions", move || actions::action_thread(c, i))
            })
            .collect();
        workers.push(spawn("stress-props", with(threads::property_thread)));
        workers.push(spawn("stress-cycler", with(threads::cycler)));
        Threads {
            workers,
            producer,
            readers,
            sampler,
        }
    }
}

/// Waits (woken by the ledger's changes) until `done`; beats for the watchdog
/// whenever `progress` moves.
fn wait_ledger(
    ctx: &Ctx,
    beat: &Beat,
    doing: &'static str,
    done: impl Fn(&Ledger) -> bool,
    progress: impl Fn(&Ledger) -> u64,
) {
    let mut l = ctx.lock();
    let mut last = None;
    while !done(&l) {
        if last != Some(progress(&l)) {
            last = Some(progress(&l));
            beat.beat(doing);
        }
        l = ctx
            .changed
            .wait_timeout(l, Duration::from_millis(500))
            .unwrap()
            .0;
    }
}

/// Runs the scenario's phases; returns their figures and checks.
pub fn run(opts: &Options) -> Report {
    init_gstreamer();
    let overload_fds = opts
        .overload
        .as_ref()
        .map_or(0, |p| 2 * p.clients as u64 + 256);
    raise_fd_limit(overload_fds.max(8192));
    let mut report = Report::default();
    if opts.churn {
        report.append(churn(opts));
    }
    if let Some(plan) = &opts.overload {
        for policy in overload::Policy::ALL {
            report.append(overload::run(plan, policy, opts.seed));
        }
    }
    report.finish()
}

/// The churn phase.
fn churn(opts: &Options) -> Report {
    watchdog::watch_panics();
    handlers::seed_thread_rngs(opts.seed);
    let start = Instant::now();
    let ctx = Ctx::new(opts, start);
    handlers::connect(&ctx);

    let main_beat = ctx.beat("main".into());
    let weak = Arc::downgrade(&ctx);
    let watchdog = Watchdog::start(ctx.beats.clone(), move || {
        weak.upgrade()
            .map_or_else(String::new, |ctx| app::ledger_report(&ctx))
    });
    threads::set_state(&ctx, gst::State::Playing);
    let rss_baseline = proc_status_kib("VmRSS:").max(proc_status_kib("VmHWM:"));
    let threads = Threads::start(&ctx);

    wait_ledger(
        &ctx,
        &main_beat,
        "waiting for the clients to be added",
        |l| l.connects >= opts.connects,
        |l| l.connects,
    );
    let end = wind_down(&ctx, &main_beat, threads);
    main_beat.done();
    watchdog.stop();
    let elapsed = start.elapsed();
    // Every queued buffer at the largest size, a partly written buffer per client,
    // and room for threads, readers and the allocator.
    let rss_allowance_kib =
        (ctx.queue_bound * MAX_LEN as u64 + opts.max_live as u64 * MAX_LEN as u64) / 1024
            + 32 * 1024;
    let finals = Finals {
        end,
        rss_baseline,
        rss_peak: proc_status_kib("VmHWM:"),
        rss_bound: rss_baseline + rss_allowance_kib,
        elapsed,
    };
    checks::evaluate(&ctx, finals)
}

/// Stops the actions, removes every client, stops the producer, takes the element to
/// NULL and stops the readers and the sampler; returns what the element said on the
/// way.
fn wind_down(ctx: &Arc<Ctx>, main_beat: &Beat, threads: Threads) -> AtEnd {
    main_beat.beat("stopping the actions");
    ctx.stop_actions.store(true, Ordering::Relaxed);
    for w in threads.workers {
        w.join().expect("worker thread");
    }
    // Let adds in flight (handlers) finish, then remove everybody.
    ctx.lock().stop_adds = true;
    wait_ledger(
        ctx,
        main_beat,
        "waiting for adds in flight",
        |l| l.adds_in_flight == 0,
        |l| l.adds_in_flight.into(),
    );
    main_beat.beat("final clear");
    ctx.op_clear();
    wait_ledger(
        ctx,
        main_beat,
        "waiting for every client to finish",
        |l| l.unfinished == 0,
        |l| l.unfinished as u64,
    );
    main_beat.beat("stopping the producer");
    let handles_after_clear = ctx.sink.property::<u32>("num-handles");
    ctx.stop_producer.store(true, Ordering::Relaxed);
    threads.producer.join().expect("producer");
    main_beat.beat("to NULL");
    threads::set_state(ctx, gst::State::Null);
    let queued_after_null = ctx.sink.property::<u32>("buffers-queued");
    let handles_after_null = ctx.sink.property::<u32>("num-handles");
    ctx.stop_readers.store(true, Ordering::Relaxed);
    for t in threads.readers {
        t.join().expect("reader");
    }
    ctx.stop_monitor.store(true, Ordering::Relaxed);
    threads.sampler.join().expect("sampler");
    AtEnd {
        handles_after_clear,
        handles_after_null,
        queued_after_null,
    }
}

/// Clients beyond units-max are removed; buffers-min and the newest keyframe may
/// keep a few more; one buffer arrives while the limit is enforced.
fn queue_bound() -> u64 {
    let max_units = *UNITS_MAX.iter().max().unwrap() as u64;
    let max_min = *BUFFERS_MIN.iter().max().unwrap() as u64;
    max_units.max(max_min) + KF_INTERVAL + 2
}
