// SPDX-License-Identifier: MPL-2.0

//! The overload phase's checks, each counted once per policy, and its figures.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::super::report::{Report, join_counts};
use super::super::stream::{KF_INTERVAL, Verifier};
use super::phase::{Client, Kind, Phase, Removal, Stage};
use super::{
    BUFFER_SIZE, FULL_MIN, NULL_LIMIT, NullTiming, Policy, PushFigures, SLOW_CHUNK, SLOW_EVERY,
    UNITS_MAX,
};

/// GstBuffer, GstMemory and allocator headers around each buffer's bytes.
const BUFFER_OVERHEAD: u64 = 512;
/// Room for what is not the queue: thread stacks, allocator arenas, GStreamer's
/// own allocations, get-stats structures in flight (the churn phase's allowance).
const RSS_MARGIN_KIB: u64 = 32 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Check {
    Policy,
    Removals,
    Stalled,
    Streams,
    Gaps,
    Drained,
    Memory,
    Null,
    Ended,
}

impl Check {
    const ALL: [Check; 9] = [
        Check::Policy,
        Check::Removals,
        Check::Stalled,
        Check::Streams,
        Check::Gaps,
        Check::Drained,
        Check::Memory,
        Check::Null,
        Check::Ended,
    ];

    fn describe(self, policy: Policy) -> String {
        let what = match self {
            Check::Policy => {
                "the element has overload-policy (default back-pressure) and takes this one"
            }
            Check::Removals => {
                "only stalled clients, and slow ones past units-max with their socket full, \
                 removed (slow); no fast client; each removal signalled once"
            }
            Check::Stalled => "every stalled client removed (slow) during the overload",
            Check::Streams => {
                "every stream exact and in order from a buffer boundary, streamheader first, \
                 bytes read = bytes-sent"
            }
            Check::Gaps => match policy {
                Policy::BackPressure => "no buffer missing in any stream, buffers-dropped 0",
                Policy::DropBuffers => {
                    "buffers missing only as whole-buffer skips, as many as buffers-dropped"
                }
            },
            Check::Drained => "every kept client got every buffer up to the last one pushed",
            Check::Memory => {
                "peak RSS within (units-max + a keyframe interval + 2) x (buffer + 512 B) \
                 x io-threads, plus 32 MiB"
            }
            Check::Null => {
                "NULL while the producer pushes returns within 2 s, the push too (Flushing)"
            }
            Check::Ended => {
                "the phase ended: pushes and state changes succeeded, no error on the bus, \
                 no panic, every client let go (no thread stuck: watchdog)"
            }
        };
        format!("overload {}: {what}", policy.nick())
    }
}

/// The report of a policy that could not be chosen: every check failed.
pub fn not_run(policy: Policy, why: &str) -> Report {
    let mut report = Report::default();
    report.lines.push(format!(
        "stress: overload {}: not run: {why}",
        policy.nick()
    ));
    let problem = (1, vec![format!("not run: {why}")]);
    for check in Check::ALL {
        report.check(&check.describe(policy), Some(&problem));
    }
    report
}

/// What the run measured once everything stopped.
pub struct Finals {
    /// The last buffer pushed during the overload.
    pub last: Option<u64>,
    pub overload_took: Duration,
    /// How long the drain took, if it finished.
    pub drain_took: Option<Duration>,
    pub null: NullTiming,
    pub pushes: PushFigures,
    pub rss_baseline: u64,
    pub rss_peak: u64,
    /// VmHWM was reset at the baseline (else the peak is VmRSS sampled).
    pub rss_hwm_reset: bool,
}

/// What the clients added up to, for the figures.
#[derive(Default)]
struct Tally {
    /// Clients removed before the drain, by kind.
    removed_early: BTreeMap<&'static str, u64>,
    statuses: BTreeMap<String, u64>,
    verified_bytes: u64,
    /// Bytes read by the end of the drain (what the overload delivered).
    delivered: u64,
    dropped: u64,
    gaps: u64,
    kept: u64,
}

pub fn evaluate(phase: &Phase, f: Finals) -> Report {
    let mut t = Tally::default();
    for c in &phase.clients {
        check_client(phase, &f, c, &mut t);
    }
    check_totals(phase, &f);
    let mut report = Report {
        lines: figures(phase, &f, &t),
        ..Report::default()
    };
    let problems = phase.problems.lock().unwrap();
    for check in Check::ALL {
        report.check(&check.describe(phase.policy), problems.get(&check));
    }
    report
}

fn check_client(phase: &Phase, f: &Finals, c: &Client, t: &mut Tally) {
    let what = format!("fd {} ({})", c.fd, c.kind.name());
    let finished = c.finished.lock().unwrap();
    let Some(v) = finished.as_ref() else {
        phase.problem(
            Check::Ended,
            format!("{what}: its reader never saw the end"),
        );
        return;
    };
    let removal = c.removal();
    let Some(r) = removal.as_ref() else {
        phase.problem(
            Check::Removals,
            format!("{what}: never removed, not even by NULL"),
        );
        return;
    };
    *t.statuses.entry(r.status.clone()).or_default() += 1;
    if r.stage < Stage::Drain {
        *t.removed_early.entry(c.kind.name()).or_default() += 1;
    }
    t.verified_bytes += v.bytes;
    let drained = c.drained.lock().unwrap();
    t.delivered += drained
        .as_ref()
        .map_or(if r.stage < Stage::Drain { v.bytes } else { 0 }, |d| {
            d.bytes
        });
    t.kept += drained.is_some() as u64;
    check_removal(phase, c, v, r, &what);
    if c.kind == Kind::Stalled && (r.stage != Stage::Overload || r.status != "slow") {
        phase.problem(
            Check::Stalled,
            format!("{what}: removed ({}) during {}", r.status, r.stage.name()),
        );
    }
    if let Some(e) = &v.error {
        phase.problem(Check::Streams, format!("{what}: {e}"));
    }
    match r.stats {
        Some((sent, _)) if sent != v.bytes => phase.problem(
            Check::Streams,
            format!("{what}: read {} bytes, bytes-sent {sent}", v.bytes),
        ),
        None => phase.problem(
            Check::Streams,
            format!("{what}: get-stats in client-removed({}) is empty", r.status),
        ),
        _ => {}
    }
    let dropped = r.stats.map_or(0, |s| s.1);
    t.dropped += dropped;
    t.gaps += v.gaps;
    let drained_gaps = drained
        .as_ref()
        .map(|d| (d.gaps, d.stats.map_or(0, |s| s.1)));
    match phase.policy {
        Policy::BackPressure if v.gaps > 0 || dropped > 0 => phase.problem(
            Check::Gaps,
            format!(
                "{what}: {} buffers missing, buffers-dropped {dropped}",
                v.gaps
            ),
        ),
        Policy::BackPressure => {}
        // A skip shows only once a later buffer arrived: never more gaps than drops;
        // at the drain, with the last buffer read, exactly as many.
        Policy::DropBuffers => {
            if v.gaps > dropped {
                phase.problem(
                    Check::Gaps,
                    format!(
                        "{what}: {} buffers missing, buffers-dropped {dropped}",
                        v.gaps
                    ),
                );
            }
            if let Some((gaps, dropped)) = drained_gaps.filter(|(g, d)| g != d) {
                phase.problem(
                    Check::Gaps,
                    format!(
                        "{what}: at the drain {gaps} buffers missing, buffers-dropped {dropped}"
                    ),
                );
            }
        }
    }
    if let Some(d) = drained.as_ref() {
        if d.last_whole != f.last {
            phase.problem(
                Check::Drained,
                format!(
                    "{what}: last whole buffer {:?} at the drain, the last pushed {:?}",
                    d.last_whole, f.last
                ),
            );
        }
        if d.stats.map(|s| s.0) != Some(d.bytes) {
            phase.problem(
                Check::Drained,
                format!(
                    "{what}: read {} bytes at the drain, bytes-sent {:?}",
                    d.bytes,
                    d.stats.map(|s| s.0)
                ),
            );
        }
    }
}

/// Whether a removal was right: NULL removes everybody (`removed`); before that,
/// only a stalled client or (during the overload) a slow one, and only when it
/// really was slow: past units-max, its socket full.
fn check_removal(phase: &Phase, c: &Client, v: &Verifier, r: &Removal, what: &str) {
    // Buffers between the newest one the client had whole and the one being
    // pushed: at least what the element counted against units-max.
    let lag = match v.last_whole {
        Some(whole) => r.pushing.saturating_sub(whole),
        None => r.pushing + 1,
    };
    let removed = format!(
        "{what}: removed ({}) during {}, {lag} buffers behind, {} bytes unread in its socket",
        r.status,
        r.stage.name(),
        r.unread
    );
    let may_be_slow = matches!(
        (r.stage, c.kind),
        (Stage::Overload, Kind::Stalled | Kind::Slow) | (Stage::Tail, Kind::Stalled)
    );
    let problem = if r.stage == Stage::Null {
        (r.status != "removed").then_some(removed)
    } else if !may_be_slow || r.status != "slow" {
        Some(removed)
    } else if lag < UNITS_MAX {
        Some(format!("{removed}: not past units-max ({UNITS_MAX})"))
    } else if r.unread < FULL_MIN {
        Some(format!("{removed}: its socket was not full"))
    } else {
        None
    };
    if let Some(p) = problem {
        phase.problem(Check::Removals, p);
    }
}

/// The element's own limit: what the queue may hold, in KiB.
fn queue_allowance_kib(phase: &Phase) -> u64 {
    let buffers = UNITS_MAX + KF_INTERVAL + 2;
    buffers * (BUFFER_SIZE as u64 + BUFFER_OVERHEAD) * u64::from(phase.plan.io_threads) / 1024
}

fn check_totals(phase: &Phase, f: &Finals) {
    match (f.last, f.drain_took) {
        (None, _) => phase.problem(Check::Drained, "no buffer was pushed".into()),
        (Some(last), None) => phase.problem(
            Check::Drained,
            format!("kept clients did not all get buffer {last} within the limit"),
        ),
        _ => {}
    }
    let bound = f.rss_baseline + queue_allowance_kib(phase) + RSS_MARGIN_KIB;
    if f.rss_peak > bound {
        phase.problem(
            Check::Memory,
            format!(
                "peak RSS {} KiB > bound {bound} KiB (baseline {} KiB)",
                f.rss_peak, f.rss_baseline
            ),
        );
    }
    let n = &f.null;
    if n.took > NULL_LIMIT {
        phase.problem(
            Check::Null,
            format!("set_state(Null) took {} ms", n.took.as_millis()),
        );
    }
    match n.producer_out {
        None => phase.problem(
            Check::Null,
            format!(
                "the push was still in progress {} ms after NULL",
                NULL_LIMIT.as_millis()
            ),
        ),
        Some(out) if out > NULL_LIMIT => phase.problem(
            Check::Null,
            format!("the push returned {} ms after NULL", out.as_millis()),
        ),
        _ => {}
    }
}

fn figures(phase: &Phase, f: &Finals, t: &Tally) -> Vec<String> {
    let p = format!("stress: overload {}:", phase.policy.nick());
    let plan = &phase.plan;
    let n = &phase.n;
    let mib = |b: u64| b as f64 / 1_048_576.0;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let slow_rate = SLOW_CHUNK as f64 / SLOW_EVERY.as_secs_f64() / 1024.0;
    let mut lines = vec![format!(
        "{p} {} clients ({} stalled, {} slow at {slow_rate:.0} KiB/s, {} fast), units-max {UNITS_MAX} buffers of {BUFFER_SIZE} bytes, io-threads {}",
        plan.clients,
        plan.stalled,
        plan.slow,
        plan.clients - plan.stalled - plan.slow,
        plan.io_threads
    )];
    let overload_s = f.overload_took.as_secs_f64();
    lines.push(format!(
        "{p} overload {overload_s:.1} s: {} buffers pushed ({:.0} MiB/s into the sink), longest push {:.1} ms",
        f.pushes.during_overload,
        mib(f.pushes.during_overload * BUFFER_SIZE as u64) / overload_s,
        f.pushes.longest_push_us as f64 / 1000.0
    ));
    lines.push(format!(
        "{p} readers: longest pass {:.1} ms (a fast client's socket waited at most that long, plus scheduling)",
        n.longest_reader_pass_us.load(Ordering::Relaxed) as f64 / 1000.0
    ));
    let of = |k: Kind| {
        let total = phase.clients.iter().filter(|c| c.kind == k).count();
        let removed = t.removed_early.get(k.name()).copied().unwrap_or(0);
        format!("{} {removed} of {total}", k.name())
    };
    lines.push(format!(
        "{p} removed before the drain: {}, {}, {}; final status {}",
        of(Kind::Stalled),
        of(Kind::Slow),
        of(Kind::Fast),
        join_counts(&t.statuses)
    ));
    let drain_s = f.drain_took.map_or(0.0, |d| d.as_secs_f64());
    lines.push(format!(
        "{p} delivered {:.1} MiB by the end of the drain ({:.0} MiB/s), {:.1} MiB verified in all; buffers-dropped {} (gaps seen {})",
        mib(t.delivered),
        mib(t.delivered) / (overload_s + drain_s),
        mib(t.verified_bytes),
        t.dropped,
        t.gaps
    ));
    lines.push(format!(
        "{p} drain to buffer {} by {} kept clients: {}",
        f.last.map_or("-".into(), |l| l.to_string()),
        t.kept,
        f.drain_took
            .map_or("did not finish".into(), |d| format!("{:.0} ms", ms(d)))
    ));
    let null = &f.null;
    lines.push(format!(
        "{p} NULL asked {}, took {:.1} ms{}; the push returned {}",
        null.push_age
            .map_or("between two pushes".into(), |a| format!(
                "{:.1} ms into a push",
                ms(a)
            )),
        ms(null.took),
        if null.ok { "" } else { " (failed)" },
        null.producer_out
            .map_or("not within the limit".into(), |d| format!(
                "{:.1} ms after",
                ms(d)
            ))
    ));
    let first = n.first_overload_warning.lock().unwrap().clone();
    lines.push(format!(
        "{p} peak buffers-queued {}, peak io-load {}, warnings on the bus {} ({} about overload{})",
        n.peak_queued.load(Ordering::Relaxed),
        if phase.has_io_load {
            format!(
                "{:.2}",
                f64::from_bits(n.peak_io_load.load(Ordering::Relaxed))
            )
        } else {
            "(no io-load property)".into()
        },
        n.bus_warnings.load(Ordering::Relaxed),
        n.overload_warnings.load(Ordering::Relaxed),
        first.map_or(String::new(), |w| format!("; first: {w}"))
    ));
    lines.push(format!(
        "{p} peak RSS {:.1} MiB ({}; baseline {:.1} MiB, bound {:.1} MiB)",
        f.rss_peak as f64 / 1024.0,
        if f.rss_hwm_reset {
            "VmHWM"
        } else {
            "VmRSS sampled"
        },
        f.rss_baseline as f64 / 1024.0,
        (f.rss_baseline + queue_allowance_kib(phase) + RSS_MARGIN_KIB) as f64 / 1024.0
    ));
    lines
}
