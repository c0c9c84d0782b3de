// SPDX-License-Identifier: MPL-2.0

//! What the application does to the element from its action threads (and from
//! signal handlers): add new clients, add live ones again, remove, remove-flush,
//! clear and get-stats.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use gst::prelude::*;
use nix::fcntl::{FcntlArg, OFlag, fcntl};

use super::app::Ctx;
use super::checks::Check;
use super::clients::{Slot, pick_client, random_add_full};
use super::readers::ReaderItem;
use super::rng::Rng;
use super::{READER_THREADS, pace, sync_method};

/// Calls each action thread makes back to back in a burst.
const BURST_CALLS: u32 = 12;

/// The fields of a client's `get-stats`, every one a guint64.
const STATS_FIELDS: &str = "bytes-sent connect-time connect-time-monotonic disconnect-time \
    disconnect-time-monotonic connect-duration last-activity-time last-activity-time-monotonic \
    buffers-dropped dropped-buffers first-buffer-ts last-buffer-ts";

impl Ctx {
    /// Pins a random open client (its fd stays open until unpinned).
    fn pin_random(
        &self,
        rng: &mut Rng,
        pred: impl Fn(&Slot) -> bool,
        mark: impl FnOnce(&mut Slot),
    ) -> Option<(u64, RawFd)> {
        let mut l = self.lock();
        let n = l.by_fd.len();
        if n == 0 {
            return None;
        }
        let skip = rng.below(n as u64) as usize;
        let id = l
            .by_fd
            .values()
            .cycle()
            .skip(skip)
            .take(n.min(16))
            .copied()
            .find(|id| pred(&l.slots[id]))?;
        let s = l.slots.get_mut(&id).unwrap();
        s.pins += 1;
        mark(s);
        Some((id, s.fd))
    }

    fn unpin(&self, id: u64) {
        let mut l = self.lock();
        l.slots.get_mut(&id).unwrap().pins -= 1;
        self.maybe_close(&mut l, id);
    }

    pub fn op_remove(&self, rng: &mut Rng) -> bool {
        let Some((id, fd)) = self.pin_random(rng, |_| true, |s| s.hard = true) else {
            return false;
        };
        self.sink.emit_by_name::<()>("remove", &[&fd]);
        Ctx::inc(&self.n.removes);
        self.unpin(id);
        true
    }

    pub fn op_remove_flush(&self, rng: &mut Rng) -> bool {
        let Some((id, fd)) = self.pin_random(rng, |_| true, |s| s.flush = true) else {
            return false;
        };
        self.sink.emit_by_name::<()>("remove-flush", &[&fd]);
        Ctx::inc(&self.n.remove_flushes);
        self.unpin(id);
        true
    }

    pub fn op_clear(&self) {
        {
            let mut l = self.lock();
            l.clears_in_flight += 1;
            l.mark_all_hard();
        }
        self.sink.emit_by_name::<()>("clear", &[]);
        Ctx::inc(&self.n.clears);
        self.lock().clears_in_flight -= 1;
    }

    pub fn op_stats(&self, rng: &mut Rng) {
        if let Some((id, fd)) = self.pin_random(rng, |_| true, |_| {}) {
            self.op_stats_fd(fd);
            self.unpin(id);
        }
    }

    /// get-stats of a pinned (or signalled) client: empty if it is gone, else complete.
    pub fn op_stats_fd(&self, fd: RawFd) {
        let st = self
            .sink
            .emit_by_name::<gst::Structure>("get-stats", &[&fd]);
        Ctx::inc(&self.n.stats_calls);
        if st.n_fields() > 0
            && STATS_FIELDS
                .split_whitespace()
                .any(|f| st.get::<u64>(f).is_err())
        {
            self.problem(
                Check::StatsUnknown,
                format!("get-stats of fd {fd} incomplete: {st}"),
            );
        }
    }

    pub fn op_stats_unknown(&self, rng: &mut Rng) {
        let fd = if rng.chance(50.0) { -1 } else { i32::MAX - 7 };
        let st = self
            .sink
            .emit_by_name::<gst::Structure>("get-stats", &[&fd]);
        Ctx::inc(&self.n.stats_unknown);
        if st.n_fields() != 0 {
            self.problem(
                Check::StatsUnknown,
                format!("get-stats of unknown fd {fd} not empty: {st}"),
            );
        }
    }

    pub fn op_dup_add(&self, rng: &mut Rng) -> bool {
        let mut before = (0, 0);
        let Some((id, fd)) = self.pin_random(
            rng,
            |s| s.accepted >= 1 && s.removed == 0 && s.dups_in_flight == 0,
            |s| {
                s.dups_in_flight += 1;
                s.adds_in_flight += 1;
                before = (s.dup_signals, s.accepted);
            },
        ) else {
            return false;
        };
        self.lock().adds_in_flight += 1;
        self.sink.emit_by_name::<()>("add", &[&fd]);
        Ctx::inc(&self.n.dup_adds);
        let mut l = self.lock();
        l.adds_in_flight -= 1;
        let s = l.slots.get_mut(&id).unwrap();
        s.dups_in_flight -= 1;
        s.adds_in_flight -= 1;
        s.pins -= 1;
        let dup = s.dup_signals > before.0;
        let accepted = s.accepted > before.1;
        if !dup && !accepted {
            // The element was in NULL: refused with a warning.
            Ctx::inc(&self.n.refused_adds);
        }
        self.maybe_close(&mut l, id);
        self.changed.notify_all();
        drop(l);
        match (dup, accepted) {
            (true, false) => Ctx::inc(&self.n.dup_refused),
            // It raced a removal: the element had already let go of the old client.
            (false, true) => Ctx::inc(&self.n.dup_accepted),
            (true, true) => self.problem(
                Check::Duplicate,
                format!("duplicate add of fd {fd} both refused and accepted"),
            ),
            (false, false) => {}
        }
        true
    }

    /// Makes a new client and adds it (`add` or `add-full`).
    pub fn op_add_new(&self, rng: &mut Rng) -> bool {
        {
            let l = self.lock();
            if l.stop_adds || l.by_fd.len() >= self.opts.max_live {
                return false;
            }
        }
        let (transport, behaviour) = pick_client(rng);
        let (sink_fd, reader_fd) = match self.make_pair(transport) {
            Ok(p) => p,
            Err(e) => {
                self.problem(Check::FdCount, format!("cannot make a {transport:?}: {e}"));
                return false;
            }
        };
        let _ = fcntl(reader_fd.as_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
        let fd = sink_fd.as_raw_fd();
        let full = rng.chance(40.0);
        let (sync, min, max) = random_add_full(rng);
        // The sync methods that must start a client on a keyframe.
        let kf_required =
            full && matches!(sync, "next-keyframe" | "latest-keyframe" | "burst-keyframe");
        let slot = Slot::new(sink_fd, transport, behaviour, full, kf_required);
        let drain = slot.drain.clone();
        let Some(id) = self.register(slot) else {
            return false;
        };
        let reader = ReaderItem::new(id, reader_fd, behaviour, drain);
        let r = self.next_reader.fetch_add(1, Ordering::Relaxed) % READER_THREADS;
        self.inboxes[r].lock().unwrap().push(reader);
        if full {
            let sync = sync_method(&self.sink, sync);
            self.sink
                .emit_by_name::<()>("add-full", &[&fd, &sync, &min.0, &min.1, &max.0, &max.1]);
            Ctx::inc(&self.n.add_fulls);
        } else {
            self.sink.emit_by_name::<()>("add", &[&fd]);
            Ctx::inc(&self.n.adds);
        }
        self.first_add_done(id);
        true
    }

    /// Enters a new client in the ledger, unless the target number was reached.
    fn register(&self, mut slot: Slot) -> Option<u64> {
        let mut l = self.lock();
        if l.stop_adds || l.connects >= self.opts.connects {
            return None;
        }
        l.connects += 1;
        l.adds_in_flight += 1;
        l.next_id += 1;
        let id = l.next_id;
        slot.hard = l.clears_in_flight > 0 || l.null_in_flight;
        l.by_fd.insert(slot.fd, id);
        l.slots.insert(id, slot);
        l.unfinished += 1;
        l.peak_live = l.peak_live.max(l.by_fd.len());
        self.changed.notify_all();
        Some(id)
    }

    fn first_add_done(&self, id: u64) {
        let mut l = self.lock();
        l.adds_in_flight -= 1;
        let s = l.slots.get_mut(&id).unwrap();
        s.adds_in_flight -= 1;
        s.first_add_done = true;
        if s.accepted == 0 {
            // The element was in NULL: refused with a warning, no signals.
            Ctx::inc(&self.n.refused_adds);
        }
        self.maybe_close(&mut l, id);
        self.changed.notify_all();
    }
}

pub fn action_thread(ctx: Arc<Ctx>, idx: usize) {
    let beat = ctx.beat(format!("actions {idx}"));
    let mut rng = Rng::new(ctx.opts.seed ^ ((idx as u64 + 1) * 0x1234_5678));
    let (mut seen_burst, mut burst_left) = (0, 0);
    while !ctx.stop_actions.load(Ordering::Relaxed) {
        let r = rng.below(10_000);
        match r {
            0..=1499 => {
                beat.beat("add");
                if !ctx.op_add_new(&mut rng) {
                    beat.beat("remove (full)");
                    ctx.op_remove(&mut rng);
                }
            }
            // The application removes more the more clients there are, so about
            // half of max_live are connected at a time.
            1500..=2099 if rng.below(ctx.opts.max_live as u64) < 2 * ctx.live() => {
                beat.beat("remove");
                ctx.op_remove(&mut rng);
            }
            2100..=2499 if rng.below(ctx.opts.max_live as u64) < 2 * ctx.live() => {
                beat.beat("remove-flush");
                ctx.op_remove_flush(&mut rng);
            }
            1500..=2499 => {}
            2500..=2649 => {
                beat.beat("duplicate add");
                ctx.op_dup_add(&mut rng);
            }
            2650..=2654 => {
                beat.beat("clear");
                ctx.op_clear();
            }
            2655..=2899 => {
                beat.beat("get-stats unknown");
                ctx.op_stats_unknown(&mut rng);
            }
            _ => {
                beat.beat("get-stats");
                ctx.op_stats(&mut rng);
            }
        }
        beat.beat("pausing");
        // In a burst all 8 threads make a few calls back to back, so calls really
        // overlap.
        let burst = ctx.burst.load(Ordering::Relaxed);
        if burst != seen_burst {
            seen_burst = burst;
            burst_left = BURST_CALLS;
        }
        if burst_left > 0 {
            burst_left -= 1;
            Ctx::inc(&ctx.n.burst_ops);
        } else {
            pace(rng.range(0, 2 * ctx.opts.op_pause_ms));
        }
    }
    beat.done();
}
