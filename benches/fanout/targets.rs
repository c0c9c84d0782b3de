// SPDX-License-Identifier: MPL-2.0

//! `--mode targets`: the cases of issue 10's "Targets" section, each run with C and
//! the rs columns its targets concern, side by side in one run (medians of --reps),
//! then every target with its figure, met or missed.
//!
//! What this mode assumes of the engine is the data just below: the property that
//! turns write batching on, and the column the batching targets are measured with.
//! After the engine work is merged, only these names need checking against
//! `gst-inspect-1.0 rsmultifdsink` (a wrong one stops the benchmark before any run).

use crate::args::{Opts, client_limit};
use crate::orchestrate::{Case, Output, Sustained, run_case, search, sustained_cell};
use crate::report::{Row, median, ratio};
use crate::spec::{Elem, Transport, Variant};
use crate::units::{fmt_bitrate, fmt_size};

/// Write batching: how long a client's data may wait, guint64 ns (0: off).
pub const BATCH_TIME: &str = "batch-time";

/// The column the batching targets are measured with, and its properties; added
/// unless `--rs-variant` defines a column of the same name (which replaces it).
pub const BATCH_VARIANT: (&str, &[(&str, &str)]) = ("bt20", &[(BATCH_TIME, "20000000")]);

/// Which rs columns a target is measured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// The batching column, and every other one that sets a non-zero batch-time.
    Batching,
    /// Every other rs column: plain `rs` (what `--rs-prop` makes of it) and the
    /// extra `--rs-variant`s.
    Defaults,
    /// Every rs column.
    Every,
}

#[derive(Debug, Clone, Copy)]
pub enum Goal {
    /// CPU per delivered byte at most `max` × C's (the ratio of the medians); with
    /// `every_rep` also in each repetition (rs's i-th run against C's i-th).
    Cpu { max: f64, every_rep: bool },
    /// CPU per byte at most `cpu` × C's and p99 push-to-receive latency at most
    /// `p99_ms` (medians), and in every repetition nobody kicked, nobody lost, every
    /// stream whole and exact.
    Batched { cpu: f64, p99_ms: f64 },
    /// The sustain search over the case's transport and size: at least `min` × the
    /// clients C sustains without a kick.
    Sustain { min: f64 },
}

#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// For `--target`.
    pub name: &'static str,
    /// What the issue asks.
    pub text: &'static str,
    /// The workload (sustain: its transport, size and bitrate; the client count is
    /// searched).
    pub case: Case,
    pub who: Who,
    pub goal: Goal,
}

const K4: usize = 4096;
const K64: usize = 65536;

/// `clients` over `transport`, buffers of `size` bytes, `rate` buffers per second
/// per client (0: unpaced).
const fn case(transport: Transport, clients: usize, size: usize, rate: u64) -> Case {
    Case {
        transport,
        clients,
        size,
        bitrate: if rate == 0 {
            None
        } else {
            Some(rate * size as u64 * 8)
        },
        stalled: 0,
    }
}

/// Issue 10's targets, in the order they run. Targets of the same case share its
/// runs (and C's figures).
pub const TARGETS: [Target; 9] = [
    Target {
        name: "batch-unix",
        text: "1000 clients x 4 KiB x 250/s, unix, batch-time 20 ms: CPU/byte <= 0.4x C, \
               p99 <= 50 ms, nothing lost, nobody kicked",
        case: case(Transport::Unix, 1000, K4, 250),
        who: Who::Batching,
        goal: Goal::Batched {
            cpu: 0.4,
            p99_ms: 50.0,
        },
    },
    Target {
        name: "default-1000",
        text: "1000 clients x 4 KiB x 250/s, unix, default settings: CPU/byte <= 0.75x C \
               in every repetition",
        case: case(Transport::Unix, 1000, K4, 250),
        who: Who::Defaults,
        goal: Goal::Cpu {
            max: 0.75,
            every_rep: true,
        },
    },
    Target {
        name: "batch-tcp",
        text: "1000 clients x 4 KiB x 250/s, tcp, batch-time 20 ms: CPU/byte <= 0.4x C, \
               p99 <= 50 ms, nothing lost, nobody kicked",
        case: case(Transport::Tcp, 1000, K4, 250),
        who: Who::Batching,
        goal: Goal::Batched {
            cpu: 0.4,
            p99_ms: 50.0,
        },
    },
    Target {
        name: "64k-unix",
        text: "100 clients x 64 KiB unpaced, unix, default settings: CPU/byte <= 0.5x C",
        case: case(Transport::Unix, 100, K64, 0),
        who: Who::Defaults,
        goal: Goal::Cpu {
            max: 0.5,
            every_rep: false,
        },
    },
    Target {
        name: "64k-tcp",
        text: "100 clients x 64 KiB unpaced, tcp, default settings: CPU/byte <= 0.3x C",
        case: case(Transport::Tcp, 100, K64, 0),
        who: Who::Defaults,
        goal: Goal::Cpu {
            max: 0.3,
            every_rep: false,
        },
    },
    Target {
        name: "default-9800",
        text: "9800 clients x 4 KiB x 8/s, unix, default settings: CPU/byte <= 0.65x C",
        case: case(Transport::Unix, 9800, K4, 8),
        who: Who::Defaults,
        goal: Goal::Cpu {
            max: 0.65,
            every_rep: false,
        },
    },
    Target {
        name: "default-1",
        text: "1 client x 4 KiB x 250/s, unix, default settings: CPU <= C's",
        case: case(Transport::Unix, 1, K4, 250),
        who: Who::Defaults,
        goal: Goal::Cpu {
            max: 1.0,
            every_rep: false,
        },
    },
    Target {
        name: "default-1-max",
        text: "1 client x 4 KiB unpaced, unix, default settings: CPU/byte <= C's",
        case: case(Transport::Unix, 1, K4, 0),
        who: Who::Defaults,
        goal: Goal::Cpu {
            max: 1.0,
            every_rep: false,
        },
    },
    Target {
        name: "sustain-tcp",
        text: "tcp, 4 KiB at 2 Mbit/s: at least 2x the clients C sustains without a kick \
               (one search per column)",
        case: Case {
            transport: Transport::Tcp,
            clients: 0,
            size: K4,
            bitrate: Some(2_000_000),
            stalled: 0,
        },
        who: Who::Every,
        goal: Goal::Sustain { min: 2.0 },
    },
];

pub fn names() -> Vec<&'static str> {
    TARGETS.iter().map(|t| t.name).collect()
}

pub fn is_target(name: &str) -> bool {
    TARGETS.iter().any(|t| t.name == name)
}

/// Adds the batching column unless a `--rs-variant` of that name replaces it.
pub fn add_default_variants(variants: &mut Vec<Variant>) {
    let (name, props) = BATCH_VARIANT;
    if !variants.iter().any(|v| v.label == name) {
        let props = props
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        variants.push(Variant::rs(name, props));
    }
}

/// Whether rs column `v` is measured by targets for `who`.
fn concerns(who: Who, v: &Variant) -> bool {
    let batching = v.label == BATCH_VARIANT.0 || v.prop(BATCH_TIME).is_some_and(|t| t != "0");
    match who {
        Who::Batching => batching,
        Who::Defaults => !batching,
        Who::Every => true,
    }
}

/// One target for one rs column: met (None: could not tell) and the figures.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub target: &'static str,
    pub column: String,
    pub met: Option<bool>,
    pub figures: String,
}

/// Runs `targets` (those `--target` names, or all): each distinct case once with C
/// (and raw when asked) and the rs columns its targets concern, then the sustain
/// searches; prints every verdict and adds them to `out`.
pub fn run_targets(o: &Opts, targets: &[Target], out: &mut Output) {
    let chosen: Vec<&Target> = targets
        .iter()
        .filter(|t| o.target.is_empty() || o.target.iter().any(|n| n == t.name))
        .collect();
    let all = o.variants();
    let rs: Vec<&Variant> = all.iter().filter(|v| v.elem == Elem::Rs).collect();
    let others: Vec<Variant> = all.iter().filter(|v| v.elem != Elem::Rs).cloned().collect();
    let limit = client_limit();
    let mut verdicts = Vec::new();
    let mut done: Vec<Case> = Vec::new();
    for t in chosen
        .iter()
        .filter(|t| !matches!(t.goal, Goal::Sustain { .. }))
    {
        if done.contains(&t.case) {
            continue;
        }
        done.push(t.case);
        let mine: Vec<&&Target> = chosen.iter().filter(|x| x.case == t.case).collect();
        let mut columns = others.clone();
        columns.extend(
            rs.iter()
                .filter(|v| mine.iter().any(|x| concerns(x.who, v)))
                .map(|v| (*v).clone()),
        );
        if t.case.clients > limit {
            println!(
                "\n{} clients={}: not run (more than the fd limit - 300 = {limit} clients per process)",
                t.case.transport.name(),
                t.case.clients
            );
            continue;
        }
        let by_col = run_case(o, "targets", t.case, &columns, out);
        for x in &mine {
            verdicts.extend(judge_case(x, &by_col));
        }
    }
    for t in chosen
        .iter()
        .filter(|t| matches!(t.goal, Goal::Sustain { .. }))
    {
        verdicts.extend(run_sustain_target(o, t, &all, out));
    }
    print_verdicts(o, &chosen, &verdicts);
    out.verdicts.extend(verdicts);
}

/// The sustain searches of target `t` for C and every rs column it concerns.
fn run_sustain_target(o: &Opts, t: &Target, all: &[Variant], out: &mut Output) -> Vec<Verdict> {
    let Goal::Sustain { min } = t.goal else {
        unreachable!("a sustain target")
    };
    let bitrate = t.case.bitrate.expect("a paced sustain target");
    let mut so = o.clone();
    so.size = vec![t.case.size];
    println!(
        "\n{} {} at {}/client: sustain search (one per column) from {} clients, bound {} \
         (the fd limit {} - 300: the sink process holds one fd per client, the drain \
         process the other ends)",
        t.case.transport.name(),
        fmt_size(t.case.size),
        fmt_bitrate(Some(bitrate)),
        o.sustain_start,
        o.sustain_max,
        limit_text()
    );
    let c = search(
        &so,
        t.case.transport,
        bitrate,
        &Variant::plain(Elem::C),
        out,
    );
    all.iter()
        .filter(|v| v.elem == Elem::Rs && concerns(t.who, v))
        .map(|v| {
            let s = search(&so, t.case.transport, bitrate, v, out);
            judge_sustain(t, min, &s, &c)
        })
        .collect()
}

fn limit_text() -> String {
    (client_limit() + crate::args::FD_RESERVE).to_string()
}

fn judge_sustain(t: &Target, min: f64, s: &Sustained, c: &Sustained) -> Verdict {
    let x = s.clients as f64 / c.clients.max(1) as f64;
    let met = match (s.capped, c.capped) {
        // Both at the bound: the ratio is unknown.
        (_, true) => None,
        // rs at the bound: it sustains at least this many.
        (true, false) if x >= min => Some(true),
        (true, false) => None,
        (false, false) => Some(x >= min),
    };
    Verdict {
        target: t.name,
        column: s.variant.label.clone(),
        met,
        figures: format!(
            "{} vs C {} clients = {}{:.2}x",
            sustained_cell(s),
            sustained_cell(c),
            if s.capped { ">=" } else { "" },
            x
        ),
    }
}

/// The verdicts of target `t` for the rs columns of one case's runs.
fn judge_case(t: &Target, by_col: &[(Variant, Vec<Row>)]) -> Vec<Verdict> {
    let Some((_, c)) = by_col.iter().find(|(v, _)| v.elem == Elem::C) else {
        return Vec::new();
    };
    by_col
        .iter()
        .filter(|(v, _)| v.elem == Elem::Rs && concerns(t.who, v))
        .map(|(v, rows)| {
            let (met, figures) = match t.goal {
                Goal::Cpu { max, every_rep } => judge_cpu(rows, c, max, every_rep),
                Goal::Batched { cpu, p99_ms } => judge_batched(rows, c, cpu, p99_ms),
                Goal::Sustain { .. } => unreachable!("sustain targets are searched"),
            };
            Verdict {
                target: t.name,
                column: v.label.clone(),
                met,
                figures: format!("{figures}{}", notes(&v.label, rows, c)),
            }
        })
        .collect()
}

fn med(rows: &[Row], f: fn(&Row) -> f64) -> f64 {
    median(rows.iter().map(f).collect())
}

/// Whether `x` <= `max`, or None when `x` is not a number (a run failed).
fn at_most(x: f64, max: f64) -> Option<bool> {
    (!x.is_nan()).then_some(x <= max)
}

/// CPU per byte of `rows` against C's `c`: the ratio of the medians, and each
/// repetition's.
fn cpu_ratio(rows: &[Row], c: &[Row]) -> (f64, String, Vec<f64>) {
    let (a, b) = (med(rows, |r| r.cpu_s_per_gb), med(c, |r| r.cpu_s_per_gb));
    let each: Vec<f64> = rows
        .iter()
        .zip(c)
        .map(|(r, c)| r.cpu_s_per_gb / c.cpu_s_per_gb)
        .collect();
    let text = format!("CPU {a:.3} vs C {b:.3} s/GB = {}", ratio(a, b));
    (a / b, text, each)
}

fn judge_cpu(rows: &[Row], c: &[Row], max: f64, every_rep: bool) -> (Option<bool>, String) {
    let (x, mut text, each) = cpu_ratio(rows, c);
    let mut met = at_most(x, max);
    if every_rep {
        let reps: Vec<String> = each.iter().map(|r| format!("{r:.2}x")).collect();
        text.push_str(&format!("; each repetition {}", reps.join(" ")));
        for r in each {
            met = match (met, at_most(r, max)) {
                (Some(a), Some(b)) => Some(a && b),
                _ => None,
            };
        }
    }
    (met, text)
}

fn judge_batched(rows: &[Row], c: &[Row], cpu: f64, p99_ms: f64) -> (Option<bool>, String) {
    let (x, text, _) = cpu_ratio(rows, c);
    let p99 = med(rows, |r| r.p99_ms);
    let p99s: Vec<String> = rows.iter().map(|r| format!("{:.1}", r.p99_ms)).collect();
    let whole =
        |r: &Row| r.kicked == 0 && r.lost == 0 && r.others_removed == 0 && r.kept_exact_ok();
    let clean = rows.iter().filter(|r| whole(r)).count();
    let met = match (at_most(x, cpu), at_most(p99, p99_ms)) {
        (Some(a), Some(b)) => Some(a && b && clean == rows.len()),
        _ => None,
    };
    let text = format!(
        "{text}; p99 {p99:.1} ms (each repetition {} ms); nobody kicked or lost, every stream \
         exact in {clean}/{} repetitions",
        p99s.join(" "),
        rows.len()
    );
    (met, text)
}

/// What makes a CPU comparison less clean: kicks, losses, undelivered bytes or a
/// failed run, of the column or of C.
fn notes(label: &str, rows: &[Row], c: &[Row]) -> String {
    let mut notes = Vec::new();
    for (name, rows) in [(label, rows), ("C", c)] {
        let kicked: u64 = rows.iter().map(|r| r.kicked + r.lost).sum();
        let failed = rows.iter().filter(|r| r.status != "ok").count();
        let short = rows.iter().filter(|r| r.delivered_ratio < 0.99).count();
        if kicked > 0 {
            notes.push(format!(
                "{name}: {kicked} clients kicked or lost over the runs"
            ));
        }
        if short > 0 {
            notes.push(format!("{name}: under 99% delivered in {short} runs"));
        }
        if failed > 0 {
            notes.push(format!("{name}: {failed} runs failed"));
        }
    }
    match notes.is_empty() {
        true => String::new(),
        false => format!(" [{}]", notes.join("; ")),
    }
}

fn print_verdicts(o: &Opts, chosen: &[&Target], verdicts: &[Verdict]) {
    println!(
        "\nTargets of issue 10 (sink CPU per delivered byte, medians of {} repetitions of {} s; \
         side by side with C in this run):",
        o.reps, o.duration
    );
    for t in chosen {
        println!("  {}: {}", t.name, t.text);
        let mine: Vec<&Verdict> = verdicts.iter().filter(|v| v.target == t.name).collect();
        if mine.is_empty() {
            println!("    not measured (no run or no column for it)");
        }
        for v in mine {
            let word = match v.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "unknown",
            };
            println!("    {word:<7} {:<8} {}", v.column, v.figures);
        }
    }
}
