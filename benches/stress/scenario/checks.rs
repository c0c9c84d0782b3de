// SPDX-License-Identifier: MPL-2.0

//! The checks: each one passes or fails once per run; problems are collected as they
//! are found (by the handlers and threads during the run, and by `evaluate` from the
//! ledger at the end).

use std::collections::BTreeMap;
use std::time::Duration;

use super::FD_LIMIT;
use super::app::Ctx;
use super::clients::{ReaderReport, Slot};
use super::report::{Report, report};
use super::watchdog::end_panic_watch;

/// The checks, each counted once as passed or failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Check {
    Events,
    Streams,
    BytesSent,
    Gaps,
    Boundary,
    Keyframe,
    Status,
    Pairing,
    StatsInHandler,
    StatsUnknown,
    Duplicate,
    FdsOpen,
    FdCount,
    Refused,
    GlibMessages,
    States,
    Producer,
    Queue,
    Rss,
    Final,
    Panics,
    Deadlock,
}

impl Check {
    pub const ALL: [Check; 22] = [
        Check::Events,
        Check::Streams,
        Check::BytesSent,
        Check::Gaps,
        Check::Boundary,
        Check::Keyframe,
        Check::Status,
        Check::Pairing,
        Check::StatsInHandler,
        Check::StatsUnknown,
        Check::Duplicate,
        Check::FdsOpen,
        Check::FdCount,
        Check::Refused,
        Check::GlibMessages,
        Check::States,
        Check::Producer,
        Check::Queue,
        Check::Rss,
        Check::Final,
        Check::Panics,
        Check::Deadlock,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Check::Events => "connect/disconnect events reached the target",
            Check::Streams => {
                "every stream exact and in order, from a buffer boundary, streamheader first"
            }
            Check::BytesSent => "bytes read equal get-stats bytes-sent (readers that read to EOF)",
            Check::Gaps => {
                "no buffer missing beyond get-stats buffers-dropped (gap-free without drops)"
            }
            Check::Boundary => "remove-flush ends a stream on a buffer boundary",
            Check::Keyframe => "add-full with keyframe sync methods starts on a keyframe",
            Check::Status => "every client-removed has an expected status",
            Check::Pairing => "every added client: one client-removed, then one client-fd-removed",
            Check::StatsInHandler => "get-stats answers inside client-removed",
            Check::StatsUnknown => "get-stats of an unknown fd is empty; of a client, complete",
            Check::Duplicate => "duplicate add answered by client-removed(duplicate) only",
            Check::FdsOpen => "the element never closed an fd (F_GETFD and inode until we close)",
            Check::FdCount => "open fds stayed well below 20,000",
            Check::Refused => "adds refused in NULL equal the element's warnings",
            Check::GlibMessages => "no other GLib warnings or criticals",
            Check::States => "every state change succeeded",
            Check::Producer => "every push succeeded (or was flushing during a state change)",
            Check::Queue => "buffers-queued stayed within the queue limits",
            Check::Rss => "peak RSS (VmHWM) within the bound from the queue limits",
            Check::Final => "after the last clear and NULL: no clients, no queue",
            Check::Panics => "no thread panicked",
            Check::Deadlock => "no deadlock (watchdog: no thread stuck for 20 s)",
        }
    }
}

/// What the element said after the last clear and after NULL.
pub struct AtEnd {
    pub handles_after_clear: u32,
    pub handles_after_null: u32,
    pub queued_after_null: u32,
}

/// What the run measured once everything stopped.
pub struct Finals {
    pub end: AtEnd,
    pub rss_baseline: u64,
    pub rss_peak: u64,
    pub rss_bound: u64,
    pub elapsed: Duration,
}

/// What the streams added up to, for the figures.
#[derive(Default)]
pub struct Tally {
    pub by_status: BTreeMap<String, u64>,
    pub by_transport: BTreeMap<String, u64>,
    pub by_behaviour: BTreeMap<String, BTreeMap<String, u64>>,
    pub add_kinds: BTreeMap<&'static str, u64>,
    pub verified_bytes: u64,
    pub verified_buffers: u64,
    pub gaps: u64,
    pub dropped: u64,
    pub exact_compared: u64,
    pub partial_tails: u64,
    pub multi_generation: u64,
    pub refused: u64,
    pub kf_checked: u64,
    pub flush_checked: u64,
    pub empty_streams: u64,
    pub streams: u64,
    pub peak_live: usize,
    pub connects: u64,
    pub disconnects: u64,
}

/// Checks every client and the totals, and reports.
pub fn evaluate(ctx: &Ctx, f: Finals) -> Report {
    let mut t = Tally::default();
    {
        let l = ctx.lock();
        for s in l.slots.values() {
            check_client(ctx, s, &mut t);
        }
        t.peak_live = l.peak_live;
        t.connects = l.connects;
        t.disconnects = l.slots.values().map(|s| s.removed as u64).sum();
    }
    check_totals(ctx, &f, &t);
    if let Some(panics) = end_panic_watch() {
        ctx.problem(Check::Panics, panics);
    }
    report(ctx, &f, &t)
}

/// One client: counted by transport, add and status; its signals paired; its stream
/// compared with what the element said it sent.
fn check_client(ctx: &Ctx, s: &Slot, t: &mut Tally) {
    *t.by_transport
        .entry(format!("{:?}", s.transport).to_lowercase())
        .or_default() += 1;
    *t.add_kinds.entry(s.add_kind).or_default() += 1;
    let status = s.final_status.clone().unwrap_or_else(|| "refused".into());
    *t.by_status.entry(status.clone()).or_default() += 1;
    *t.by_behaviour
        .entry(s.behaviour.name().to_string())
        .or_default()
        .entry(status.clone())
        .or_default() += 1;
    let what = format!("fd {} ({:?}, {})", s.fd, s.transport, s.behaviour.name());
    if s.removed != s.accepted || s.fd_removed != s.accepted {
        ctx.problem(
            Check::Pairing,
            format!(
                "{what}: added {} times, {} client-removed, {} client-fd-removed",
                s.accepted, s.removed, s.fd_removed
            ),
        );
    }
    let Some(r) = &s.report else {
        ctx.problem(Check::Streams, format!("{what}: reader never reported"));
        return;
    };
    if s.accepted == 0 {
        t.refused += 1;
        if r.bytes != 0 {
            ctx.problem(
                Check::Streams,
                format!("{what}: refused add, yet {} bytes arrived", r.bytes),
            );
        }
        return;
    }
    if s.accepted > 1 {
        // A duplicate add raced the removal and became a second client on the
        // same fd: the stream is two streams back to back.
        t.multi_generation += 1;
        return;
    }
    check_stream(ctx, s, r, &what, &status, t);
}

/// A client the element added once: its stream exact, from a buffer boundary, as long
/// as the element said it sent, with no more buffers missing than it said it dropped.
fn check_stream(ctx: &Ctx, s: &Slot, r: &ReaderReport, what: &str, status: &str, t: &mut Tally) {
    t.streams += 1;
    t.verified_bytes += r.bytes;
    t.verified_buffers += r.buffers;
    t.gaps += r.gaps;
    if r.bytes == 0 {
        t.empty_streams += 1;
    }
    if !r.at_boundary {
        t.partial_tails += 1;
    }
    if let Some(e) = &r.error {
        ctx.problem(Check::Streams, format!("{what}: {e}"));
    }
    let dropped = s.stats.map(|(_, d)| d);
    t.dropped += dropped.unwrap_or(0);
    match (s.stats, r.self_closed) {
        (Some((sent, dropped)), false) => {
            t.exact_compared += 1;
            if r.bytes != sent {
                ctx.problem(
                    Check::BytesSent,
                    format!(
                        "{what} (status {status}): read {} bytes, bytes-sent {sent}",
                        r.bytes
                    ),
                );
            }
            // A skip is only visible when something was written after it (a
            // stalled client may be skipped forward, then removed before it
            // drained): never more gaps than drops, none without drops.
            if r.gaps > dropped {
                ctx.problem(
                    Check::Gaps,
                    format!(
                        "{what} (status {status}): {} buffers missing, buffers-dropped {dropped}",
                        r.gaps
                    ),
                );
            }
        }
        (Some((_, dropped)), true) if r.gaps > dropped => ctx.problem(
            Check::Gaps,
            format!(
                "{what}: {} buffers missing before it closed, buffers-dropped {dropped}",
                r.gaps
            ),
        ),
        _ => {}
    }
    if s.flush && !s.hard && status == "removed" && !r.self_closed {
        t.flush_checked += 1;
        if !r.at_boundary {
            ctx.problem(
                Check::Boundary,
                format!(
                    "{what}: remove-flush ended mid-buffer after {} bytes",
                    r.bytes
                ),
            );
        }
    }
    if s.kf_required && r.buffers > 0 && dropped == Some(0) {
        t.kf_checked += 1;
        if r.first_kf != Some(true) {
            ctx.problem(
                Check::Keyframe,
                format!("{what}: first buffer is not a keyframe"),
            );
        }
    }
}

fn check_totals(ctx: &Ctx, f: &Finals, t: &Tally) {
    let (connects, disconnects) = (t.connects, t.disconnects);
    let n = &ctx.n;
    let g = Ctx::get;
    if connects + disconnects < 2 * ctx.opts.connects.saturating_sub(ctx.opts.connects / 10) {
        ctx.problem(
            Check::Events,
            format!("{connects} connects + {disconnects} disconnects"),
        );
    }
    if g(&n.refused_adds) != g(&n.element_warnings) {
        ctx.problem(
            Check::Refused,
            format!(
                "{} adds refused, {} warnings from the element",
                g(&n.refused_adds),
                g(&n.element_warnings)
            ),
        );
    }
    if g(&n.peak_fds) >= (FD_LIMIT / 2) as u64 {
        ctx.problem(
            Check::FdCount,
            format!("{} fds open at the peak", g(&n.peak_fds)),
        );
    }
    if f.rss_peak > f.rss_bound {
        ctx.problem(
            Check::Rss,
            format!("VmHWM {} KiB > bound {} KiB", f.rss_peak, f.rss_bound),
        );
    }
    if f.end.handles_after_clear != 0
        || f.end.handles_after_null != 0
        || f.end.queued_after_null != 0
    {
        ctx.problem(
            Check::Final,
            format!(
                "num-handles {} after clear, {} after NULL; buffers-queued {} after NULL",
                f.end.handles_after_clear, f.end.handles_after_null, f.end.queued_after_null
            ),
        );
    }
}
