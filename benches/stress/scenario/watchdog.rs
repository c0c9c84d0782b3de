// SPDX-License-Identifier: MPL-2.0

//! The watchdog: every thread beats while it makes progress; one that stops for 20 s
//! aborts the run with what every thread was doing. Also counts panics on any thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use super::app::Ctx;
use super::pace;

const WATCHDOG: Duration = Duration::from_secs(20);

static PANICS: AtomicU64 = AtomicU64::new(0);
static FIRST_PANIC: OnceLock<String> = OnceLock::new();
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
                let _ = FIRST_PANIC.set(format!(
                    "thread '{}' panicked: {info}",
                    thread.name().unwrap_or("?")
                ));
            }
            previous(info);
        }));
    });
    PANIC_WATCH.store(true, Ordering::Relaxed);
}

/// Stops counting panics; what was seen, if anything.
pub fn end_panic_watch() -> Option<String> {
    PANIC_WATCH.store(false, Ordering::Relaxed);
    let n = PANICS.load(Ordering::Relaxed);
    (n > 0).then(|| {
        format!(
            "{n} panics; first: {}",
            FIRST_PANIC.get().map_or("?", String::as_str)
        )
    })
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

/// Aborts when a thread made no progress for WATCHDOG. Takes no lock but the list
/// of heartbeats, so a deadlock elsewhere cannot stop it.
pub fn watchdog(ctx: Weak<Ctx>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        pace(200);
        let Some(beats) = ctx.upgrade().map(|c| c.beats.lock().unwrap().clone()) else {
            return;
        };
        for b in &beats {
            let now_ms = b.start.elapsed().as_millis() as u64;
            if b.active.load(Ordering::Relaxed) && b.ms_ago(now_ms) > WATCHDOG.as_millis() as u64 {
                die(&stall_report(b, &beats, &ctx, now_ms));
            }
        }
    }
}

/// Every thread's last beat, the panics and the clients not finished.
fn stall_report(stuck: &Beat, beats: &[Arc<Beat>], ctx: &Weak<Ctx>, now_ms: u64) -> String {
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
    if let Some(first) = FIRST_PANIC.get() {
        msg += &format!(
            "stress:   panics so far {}, first: {first}\n",
            PANICS.load(Ordering::Relaxed)
        );
    }
    if let Some(ctx) = ctx.upgrade() {
        msg += &ledger_report(&ctx);
    }
    msg
}

fn ledger_report(ctx: &Ctx) -> String {
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
