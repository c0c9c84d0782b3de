// SPDX-License-Identifier: MPL-2.0

//! The element's signals, as the application handles them: each one is checked
//! against the ledger, and handlers call back into the element (get-stats on their
//! own fd; add, remove, remove-flush and clear on others).

use std::cell::Cell;
use std::os::fd::{AsFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use gst::glib;
use gst::prelude::*;
use nix::fcntl::{FcntlArg, fcntl};

use super::app::Ctx;
use super::checks::Check;
use super::clients::Ledger;
use super::identity;
use super::rng::Rng;

static SEED: AtomicU64 = AtomicU64::new(1);
static THREAD_SEEDS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Handler nesting depth on this thread: handlers act on other fds only at depth 1.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    static RNG: Cell<Option<Rng>> = const { Cell::new(None) };
}

/// The seed the handlers' generators derive from.
pub fn seed_thread_rngs(seed: u64) {
    SEED.store(seed, Ordering::Relaxed);
}

/// A random number generator for code that runs on threads it does not own (signal
/// handlers on the IO thread).
fn with_thread_rng<R>(f: impl FnOnce(&mut Rng) -> R) -> R {
    RNG.with(|cell| {
        let mut rng = cell.get().unwrap_or_else(|| {
            Rng::new(
                SEED.load(Ordering::Relaxed) ^ (THREAD_SEEDS.fetch_add(1, Ordering::Relaxed) << 32),
            )
        });
        let r = f(&mut rng);
        cell.set(Some(rng));
        r
    })
}

/// Runs a signal handler body one level deeper.
fn in_handler<R>(f: impl FnOnce() -> R) -> R {
    DEPTH.set(DEPTH.get() + 1);
    let r = f();
    DEPTH.set(DEPTH.get() - 1);
    r
}

/// Connects the element's signals and GLib's log to the application. GLib messages:
/// the element's refused-add warnings are counted, anything else is counted and shown.
pub fn connect(ctx: &Arc<Ctx>) {
    let weak = Arc::downgrade(ctx);
    glib::log_set_default_handler(move |domain, level, msg| {
        let Some(ctx) = weak.upgrade() else {
            eprintln!("{}-{level:?}: {msg}", domain.unwrap_or("**"));
            return;
        };
        let serious = matches!(
            level,
            glib::LogLevel::Error | glib::LogLevel::Critical | glib::LogLevel::Warning
        );
        // The element warns of a refused add in GLib's default domain, as C does.
        if domain.is_none()
            && level == glib::LogLevel::Warning
            && msg.contains("before clients can be added")
        {
            Ctx::inc(&ctx.n.element_warnings);
        } else if serious {
            Ctx::inc(&ctx.n.other_glib);
            ctx.problem(
                Check::GlibMessages,
                format!("{level:?} {}: {msg}", domain.unwrap_or("")),
            );
        } else if level == glib::LogLevel::Message {
            eprintln!("{}-{level:?}: {msg}", domain.unwrap_or("**"));
        }
    });
    let weak = Arc::downgrade(ctx);
    ctx.sink.connect("client-added", false, move |args| {
        let fd = args[1].get::<i32>().unwrap();
        if let Some(ctx) = weak.upgrade() {
            in_handler(|| ctx.on_added(fd));
        }
        None
    });
    let weak = Arc::downgrade(ctx);
    ctx.sink.connect("client-removed", false, move |args| {
        let fd = args[1].get::<i32>().unwrap();
        let status = glib::EnumValue::from_value(&args[2])
            .map_or("?".to_string(), |(_, v)| v.nick().to_string());
        if let Some(ctx) = weak.upgrade() {
            in_handler(|| ctx.on_removed(fd, &status));
        }
        None
    });
    let weak = Arc::downgrade(ctx);
    ctx.sink.connect("client-fd-removed", false, move |args| {
        let fd = args[1].get::<i32>().unwrap();
        if let Some(ctx) = weak.upgrade() {
            in_handler(|| ctx.on_fd_removed(fd));
        }
        None
    });
}

impl Ctx {
    /// The client `fd` belongs to; a pairing problem if the element signalled an fd
    /// that is not one of ours.
    fn client_of(&self, l: &Ledger, fd: RawFd, signal: &str) -> Option<u64> {
        let id = l.by_fd.get(&fd).copied();
        if id.is_none() {
            self.problem(
                Check::Pairing,
                format!("{signal} for fd {fd}, not one of ours"),
            );
        }
        id
    }

    fn on_added(&self, fd: RawFd) {
        {
            let mut l = self.lock();
            let Some(id) = self.client_of(&l, fd, "client-added") else {
                return;
            };
            let s = l.slots.get_mut(&id).unwrap();
            s.accepted += 1;
            if s.removed >= s.accepted {
                Ctx::inc(&self.n.removed_before_added);
            }
        }
        if DEPTH.get() == 1 && with_thread_rng(|r| r.chance(10.0)) {
            Ctx::inc(&self.n.handler_ops);
            self.op_stats_fd(fd);
        }
    }

    /// client-removed(duplicate): only right while a duplicate add is in flight.
    fn on_duplicate(&self, fd: RawFd) {
        let mut l = self.lock();
        let ok = l
            .by_fd
            .get(&fd)
            .copied()
            .and_then(|id| l.slots.get_mut(&id))
            .map(|s| {
                s.dup_signals += 1;
                s.dups_in_flight > 0
            });
        drop(l);
        if ok != Some(true) {
            self.problem(
                Check::Duplicate,
                format!("client-removed(duplicate) for fd {fd} without a duplicate add"),
            );
        }
    }

    fn on_removed(&self, fd: RawFd, status: &str) {
        if status == "duplicate" {
            return self.on_duplicate(fd);
        }
        // get-stats must still answer here.
        let st = self
            .sink
            .emit_by_name::<gst::Structure>("get-stats", &[&fd]);
        Ctx::inc(&self.n.stats_calls);
        let stats = st
            .get::<u64>("bytes-sent")
            .ok()
            .zip(st.get::<u64>("buffers-dropped").ok());
        {
            let mut l = self.lock();
            let Some(id) = self.client_of(&l, fd, &format!("client-removed({status})")) else {
                return;
            };
            let s = l.slots.get_mut(&id).unwrap();
            let allowed = match status {
                "removed" => s.hard || s.flush,
                "slow" => true,
                "closed" | "error" => s.reader_acted,
                _ => false,
            };
            let desc = format!(
                "fd {fd} ({:?}, {}, remove/clear/NULL: {}, remove-flush: {}, reader acted: {}) removed with status {status}",
                s.transport,
                s.behaviour.name(),
                s.hard,
                s.flush,
                s.reader_acted
            );
            s.removed += 1;
            s.final_status = Some(status.to_string());
            if s.stats.is_none() {
                s.stats = stats;
            }
            s.drain.store(true, Ordering::Relaxed);
            drop(l);
            if !allowed {
                self.problem(Check::Status, desc);
            }
            if stats.is_none() {
                self.problem(
                    Check::StatsInHandler,
                    format!("get-stats in client-removed({status}) of fd {fd} is empty: {st}"),
                );
            }
        }
        if DEPTH.get() == 1 {
            self.handler_actions();
        }
    }

    fn on_fd_removed(&self, fd: RawFd) {
        let mut l = self.lock();
        let Some(id) = self.client_of(&l, fd, "client-fd-removed") else {
            return;
        };
        let s = l.slots.get_mut(&id).unwrap();
        let (open, same) = s.sink.as_ref().map_or((false, false), |sink| {
            (
                fcntl(sink.as_fd(), FcntlArg::F_GETFD).is_ok(),
                identity(sink.as_fd()) == s.ident,
            )
        });
        if !open || !same {
            s.forget_fd();
        }
        let bad_order = s.fd_removed >= s.removed;
        s.fd_removed += 1;
        self.maybe_close(&mut l, id);
        drop(l);
        Ctx::inc(&self.n.fd_checks);
        if !open || !same {
            self.problem(
                Check::FdsOpen,
                format!("fd {fd} at client-fd-removed: open {open}, same file {same}"),
            );
        }
        if bad_order {
            self.problem(
                Check::Pairing,
                format!("client-fd-removed for fd {fd} without a client-removed before it"),
            );
        }
        if DEPTH.get() == 1 && with_thread_rng(|r| r.chance(5.0)) {
            Ctx::inc(&self.n.handler_ops);
            with_thread_rng(|r| self.op_stats(r));
        }
    }

    /// What a client-removed handler does to other clients.
    fn handler_actions(&self) {
        let r = with_thread_rng(|r| r.below(1000));
        let mut rng = with_thread_rng(|r| Rng::new(r.next()));
        let did = match r {
            0..=249 => {
                self.op_stats(&mut rng);
                true
            }
            250..=309 => self.op_remove(&mut rng),
            310..=349 => self.op_remove_flush(&mut rng),
            350..=449 => self.op_add_new(&mut rng),
            450..=451 => {
                self.op_clear();
                true
            }
            _ => false,
        };
        if did {
            Ctx::inc(&self.n.handler_ops);
        }
    }
}
