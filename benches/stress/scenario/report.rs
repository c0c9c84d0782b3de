// SPDX-License-Identifier: MPL-2.0

//! The report: each phase's figures, one per line, then one line per check; at the
//! end `stress: N passed, M failed`.

use std::collections::BTreeMap;

use super::app::Ctx;
use super::checks::{Check, Finals, Tally};
use super::{ACTION_THREADS, READER_THREADS};

/// The problems found for each check of a phase: how many, and the first few.
pub struct Problems<C> {
    by_check: BTreeMap<C, (u64, Vec<String>)>,
}

impl<C> Default for Problems<C> {
    fn default() -> Problems<C> {
        Problems {
            by_check: BTreeMap::new(),
        }
    }
}

impl<C: Ord> Problems<C> {
    pub fn add(&mut self, check: C, msg: String) {
        let e = self.by_check.entry(check).or_default();
        e.0 += 1;
        if e.1.len() < 5 {
            e.1.push(msg);
        }
    }

    pub fn get(&self, check: &C) -> Option<&(u64, Vec<String>)> {
        self.by_check.get(check)
    }
}

/// The outcome of a run: how many checks passed and failed, and every line to show.
#[derive(Default)]
pub struct Report {
    pub passed: usize,
    pub failed: usize,
    pub lines: Vec<String>,
}

impl Report {
    /// One check's line: ok, or FAILED with the first problems found.
    pub fn check(&mut self, what: &str, problems: Option<&(u64, Vec<String>)>) {
        match problems {
            None => {
                self.passed += 1;
                self.lines.push(format!("stress: check {what}: ok"));
            }
            Some((count, examples)) => {
                self.failed += 1;
                self.lines
                    .push(format!("stress: check {what}: FAILED ({count} problems)"));
                for e in examples {
                    self.lines.push(format!("stress:   {e}"));
                }
            }
        }
    }

    /// Another phase's figures and checks after these.
    pub fn append(&mut self, other: Report) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.lines.extend(other.lines);
    }

    /// The report with its last line, `stress: N passed, M failed`.
    pub fn finish(mut self) -> Report {
        let summary = format!("stress: {} passed, {} failed", self.passed, self.failed);
        self.lines.push(summary);
        self
    }
}

pub fn join_counts<K: std::fmt::Display>(m: &BTreeMap<K, u64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The churn phase's figures and checks.
pub fn report(ctx: &Ctx, f: &Finals, t: &Tally) -> Report {
    let mut report = Report {
        lines: figures(ctx, f, t),
        ..Report::default()
    };
    let problems = ctx.problems.lock().unwrap();
    for check in Check::ALL {
        report.check(check.describe(), problems.get(&check));
    }
    report
}

/// The figures of the run, one per line.
fn figures(ctx: &Ctx, f: &Finals, t: &Tally) -> Vec<String> {
    let mut lines = client_figures(ctx, f, t);
    lines.extend(call_figures(ctx));
    lines.extend(stream_figures(ctx, f, t));
    lines
}

/// The run and its clients: how many, of which kind, how they ended.
fn client_figures(ctx: &Ctx, f: &Finals, t: &Tally) -> Vec<String> {
    let mut lines = Vec::new();
    lines.push(format!(
        "stress: form {}, seed {}, {} buffers/s, {} action threads, {} reader threads",
        ctx.opts.form, ctx.opts.seed, ctx.opts.rate, ACTION_THREADS, READER_THREADS
    ));
    lines.push(format!("stress: elapsed {:.1} s", f.elapsed.as_secs_f64()));
    lines.push(format!(
        "stress: connect/disconnect events {} ({} connects, {} disconnects)",
        t.connects + t.disconnects,
        t.connects,
        t.disconnects
    ));
    lines.push(format!(
        "stress: clients by transport {}",
        join_counts(&t.by_transport)
    ));
    lines.push(format!(
        "stress: clients added with {}",
        join_counts(&t.add_kinds)
    ));
    lines.push(format!(
        "stress: final status {}",
        join_counts(&t.by_status)
    ));
    for (b, statuses) in &t.by_behaviour {
        lines.push(format!("stress: reader {b}: {}", join_counts(statuses)));
    }
    lines.push(format!("stress: peak clients at once {}", t.peak_live));
    lines
}

/// The calls the application made, and what the element did with them.
fn call_figures(ctx: &Ctx) -> Vec<String> {
    let n = &ctx.n;
    let g = Ctx::get;
    let mut lines = Vec::new();
    lines.push(format!(
        "stress: calls add {}, add-full {}, remove {}, remove-flush {}, clear {}, get-stats {} (+{} unknown fds), duplicate add {}",
        g(&n.adds),
        g(&n.add_fulls),
        g(&n.removes),
        g(&n.remove_flushes),
        g(&n.clears),
        g(&n.stats_calls),
        g(&n.stats_unknown),
        g(&n.dup_adds)
    ));
    lines.push(format!(
        "stress: calls made from signal handlers {}; bursts of back-to-back calls from all action threads {} ({} calls)",
        g(&n.handler_ops),
        g(&n.bursts),
        g(&n.burst_ops)
    ));
    lines.push(format!(
        "stress: duplicate adds refused (client-removed duplicate) {}, accepted after a racing removal {}",
        g(&n.dup_refused),
        g(&n.dup_accepted)
    ));
    lines.push(format!(
        "stress: adds refused in NULL {} (element warnings {}); other GLib warnings/criticals {}",
        g(&n.refused_adds),
        g(&n.element_warnings),
        g(&n.other_glib)
    ));
    lines.push(format!(
        "stress: client-removed signalled before client-added {}",
        g(&n.removed_before_added)
    ));
    lines.push(format!(
        "stress: state cycles to NULL {}, partial {}, state change errors {}",
        g(&n.full_cycles),
        g(&n.partial_cycles),
        g(&n.state_errors)
    ));
    lines.push(format!("stress: property changes {}", g(&n.prop_changes)));
    lines
}

/// The stream, the fds, the queue and the memory.
fn stream_figures(ctx: &Ctx, f: &Finals, t: &Tally) -> Vec<String> {
    let n = &ctx.n;
    let g = Ctx::get;
    let mut lines = Vec::new();
    let mib = |kib: u64| kib as f64 / 1024.0;
    lines.push(format!(
        "stress: buffers pushed {} ({:.1} MiB), flushing retries {}, errors {}, sticky event resends {}",
        g(&n.pushed),
        g(&n.pushed_bytes) as f64 / 1048576.0,
        g(&n.push_flushing),
        g(&n.push_errors),
        g(&n.event_resends)
    ));
    lines.push(format!(
        "stress: verified {:.1} MiB in {} buffers over {} streams ({} compared with bytes-sent exactly, {} ended mid-buffer, {} empty)",
        t.verified_bytes as f64 / 1048576.0,
        t.verified_buffers,
        t.streams,
        t.exact_compared,
        t.partial_tails,
        t.empty_streams
    ));
    lines.push(format!(
        "stress: buffers skipped by recover-policy {} (gaps seen {})",
        t.dropped, t.gaps
    ));
    lines.push(format!(
        "stress: remove-flush streams checked for a clean end {}, keyframe starts checked {}",
        t.flush_checked, t.kf_checked
    ));
    lines.push(format!(
        "stress: fd checks {}, peak open fds {}",
        g(&n.fd_checks),
        g(&n.peak_fds)
    ));
    lines.push(format!(
        "stress: peak buffers-queued {} (bound {}), peak bytes-queued {:.1} MiB",
        g(&n.peak_queued),
        ctx.queue_bound,
        g(&n.peak_bytes_queued) as f64 / 1048576.0
    ));
    lines.push(format!(
        "stress: peak RSS {:.1} MiB (baseline {:.1} MiB, bound {:.1} MiB)",
        mib(f.rss_peak),
        mib(f.rss_baseline),
        mib(f.rss_bound)
    ));
    lines
}
