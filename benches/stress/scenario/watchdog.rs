// SPDX-License-Identifier: MPL-2.0

//! The watchdog: every thread of a phase beats while it makes progress; one that
//! stops for 20 s aborts the run with what every thread was doing. Also counts
//! panics on any thread, per phase.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::pace;

const WATCHDOG: Duration = Duration::from_secs(20);

static PANICS: AtomicU64 = AtomicU64::new(0);
static FIRST_PANIC: Mutex<Option<String>> = Mutex::new(None);
static PANIC_WATCH: AtomicBool = AtomicBool::new(false);

/// Counts panics on any thread (the element's IO thread included) while a run is on.
pub fn watch_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if PANIC_WATCH.load(Ordering::Relaxed) {
                PANICS.fetch_add(1, Ordering::Relaxed);
                let thread = std::thread::current();
                let mut first = FIRST_PANIC.lock().unwrap_or_else(|e| e.into_inner());
                if first.is_none() {
                    *first = Some(format!(
                        "thread '{}' panicked: {info}",
                        thread.name().unwrap_or("?")
                    ));
                }
            }
            previous(info);
        }));
    });
    PANIC_WATCH.store(true, Ordering::Relaxed);
}

/// Stops counting panics; what was seen since `watch_panics`, if anything.
pub fn end_panic_watch() -> Option<String> {
    PANIC_WATCH.store(false, Ordering::Relaxed);
    let n = PANICS.swap(0, Ordering::Relaxed);
    let first = FIRST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take();
    (n > 0).then(|| format!("{n} panics; first: {}", first.as_deref().unwrap_or("?")))
}

/// Writes to stderr past any output capture, then aborts.
fn die(msg: &str) -> ! {
    let _ = nix::unistd::write(std::io::stderr(), msg.as_bytes());
    std::process::abort()
}

/// A thread's heartbeat for the watchdog.
pub struct Beat {
    pub name: String,
    pub start: Instant,
    pub last_ms: AtomicU64,
    pub doing: Mutex<&'static str>,
    pub active: AtomicBool,
}

impl Beat {
    pub fn beat(&self, doing: &'static str) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        if let Ok(mut d) = self.doing.try_lock() {
            *d = doing;
        }
    }

    pub fn done(&self) {
        self.active.store(false, Ordering::Relaxed);
    }

    fn doing(&self) -> &'static str {
        self.doing.try_lock().map(|d| *d).unwrap_or("?")
    }

    fn ms_ago(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.last_ms.load(Ordering::Relaxed))
    }
}

/// The heartbeats of one phase's threads.
pub struct Beats {
    start: Instant,
    list: Mutex<Vec<Arc<Beat>>>,
}

impl Beats {
    pub fn new(start: Instant) -> Arc<Beats> {
        Arc::new(Beats {
            start,
            list: Mutex::default(),
        })
    }

    /// A new thread's heartbeat.
    pub fn beat(&self, name: String) -> Arc<Beat> {
        let b = Arc::new(Beat {
            name,
            start: self.start,
            last_ms: AtomicU64::new(self.start.elapsed().as_millis() as u64),
            doing: Mutex::new("starting"),
            active: AtomicBool::new(true),
        });
        self.list.lock().unwrap().push(b.clone());
        b
    }
}

/// A running watchdog thread.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Watchdog {
    /// Aborts the process when a thread of `beats` made no progress for WATCHDOG,
    /// printing every thread's last beat, the panics and what `context` tells about
    /// the phase. Takes no lock but the list of heartbeats (and whatever `context`
    /// tries), so a deadlock elsewhere cannot stop it.
    pub fn start(beats: Arc<Beats>, context: impl Fn() -> String + Send + 'static) -> Watchdog {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                pace(200);
                let list = beats.list.lock().unwrap().clone();
                for b in &list {
                    let now_ms = b.start.elapsed().as_millis() as u64;
                    if b.active.load(Ordering::Relaxed)
                        && b.ms_ago(now_ms) > WATCHDOG.as_millis() as u64
                    {
                        die(&(stall_report(b, &list, now_ms) + &context()));
                    }
                }
            }
        });
        Watchdog { stop, thread }
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("watchdog");
    }
}

/// Every thread's last beat and the panics.
fn stall_report(stuck: &Beat, beats: &[Arc<Beat>], now_ms: u64) -> String {
    let mut msg = format!(
        "\nstress: WATCHDOG: thread '{}' made no progress for {} s (last: {}); \
         deadlock or stall, aborting\n",
        stuck.name,
        stuck.ms_ago(now_ms) / 1000,
        stuck.doing()
    );
    for other in beats {
        msg += &format!(
            "stress:   thread '{}': {} ms ago, {}{}\n",
            other.name,
            other.ms_ago(now_ms),
            other.doing(),
            if other.active.load(Ordering::Relaxed) {
                ""
            } else {
                " (ended)"
            }
        );
    }
    if let Ok(first) = FIRST_PANIC.try_lock()
        && let Some(first) = first.as_deref()
    {
        msg += &format!(
            "stress:   panics so far {}, first: {first}\n",
            PANICS.load(Ordering::Relaxed)
        );
    }
    msg
}
