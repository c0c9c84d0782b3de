// SPDX-License-Identifier: MPL-2.0

//! The report: the figures of a run, one per line, then one line per check and
//! `stress: N passed, M failed`.

use std::collections::BTreeMap;

use super::app::Ctx;
use super::checks::{Check, Finals, Tally};
use super::{ACTION_THREADS, READER_THREADS};

/// The outcome of a run: how many checks passed and failed, and every line to show.
pub struct Report {
    pub passed: usize,
    pub failed: usize,
    pub lines: Vec<String>,
}

impl Report {
    /// The last line.
    fn summary(&self) -> String {
        format!("stress: {} passed, {} failed", self.passed, self.failed)
    }
}

fn join_counts<K: std::fmt::Display>(m: &BTreeMap<K, u64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn report(ctx: &Ctx, f: &Finals, t: &Tally) -> Report {
    let mut lines = figures(ctx, f, t);
    let problems = ctx.problems.lock().unwrap();
    let (mut passed, mut failed) = (0, 0);
    for check in Check::ALL {
        match problems.by_check.get(&check) {
            None => {
                passed += 1;
                lines.push(format!("stress: check {}: ok", check.describe()));
            }
            Some((count, examples)) => {
                failed += 1;
                lines.push(format!(
                    "stress: check {}: FAILED ({count} problems)",
                    check.describe()
                ));
                for e in examples {
                    lines.push(format!("stress:   {e}"));
                }
            }
        }
    }
    let mut report = Report {
        passed,
        failed,
        lines,
    };
    report.lines.push(report.summary());
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
