// SPDX-License-Identifier: MPL-2.0

//! One finished run as a row of figures, the medians of a case and the tables.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::orchestrate::Noise;
use crate::spec::{Elem, Spec, Variant};
use crate::units::{fmt_bitrate, fmt_rate, fmt_size};

/// One finished run, with the derived figures.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub mode: String,
    pub transport: String,
    pub clients: usize,
    pub size: usize,
    pub bitrate: String,
    /// Paced: buffers per second per client.
    pub rate: Option<f64>,
    pub elem: String,
    pub rep: usize,
    pub status: String,
    pub duration_s: f64,
    pub pushed_bytes: u64,
    pub delivered_bytes: u64,
    pub delivered_ratio: f64,
    pub push_rate_ratio: f64,
    pub cpu_s: f64,
    pub cpu_user_s: f64,
    pub cpu_sys_s: f64,
    pub cpu_s_per_gb: f64,
    pub kicked: u64,
    pub lost: u64,
    pub p50_ms: f64,
    pub push_p99_us: f64,
    pub push_max_us: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub peak_rss_mb: f64,
    pub rss_per_client_kb: f64,
    pub gbit_s: f64,
    pub drain_cpu_s: f64,
    pub gaps: u64,
    /// Streams whose stamp was not where it should be.
    pub bad: u64,
    pub flushed: bool,
    pub nvcsw: i64,
    pub setup_s: f64,
    pub loadavg: f64,
    pub busy_before_pct: f64,
    pub foreign_pct: f64,
    /// rsmultifdsink's io-threads as the run set it (0: the default).
    pub io_threads: u32,
    pub units_max: i64,
    /// The rs properties of the run (`--rs-prop`, then the variant's),
    /// `name=value;name=value`.
    pub rs_props: String,
    pub stalled: usize,
    pub stalled_removed: u64,
    pub others_removed: u64,
    /// Clients that read and were not removed.
    pub kept: u64,
    /// Clients whose stream arrived whole (in order, framing intact, up to the last
    /// buffer pushed) and without a skipped buffer.
    pub kept_exact: u64,
    /// Clients whose stream arrived up to the last buffer but skipped buffers, and
    /// how many buffers they skipped in all.
    pub kept_gap_clients: u64,
    pub kept_gaps: u64,
}

/// The run's status: the sink's, or the drain's when only that one failed.
fn status(r: &BTreeMap<String, String>) -> String {
    let status = r.get("status").cloned().unwrap_or_else(|| "?".into());
    match r.get("d_status") {
        Some(d) if status == "ok" && d != "ok" => format!("drain-{d}"),
        _ => status,
    }
}

impl Row {
    /// The row of one run from the sink process's `RESULT` figures.
    pub fn new(
        mode: &str,
        spec: &Spec,
        rep: usize,
        r: &BTreeMap<String, String>,
        noise: &Noise,
    ) -> Row {
        let f = |k: &str| r.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let u = |k: &str| r.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let size = spec.size as u64;
        let pushed_bytes = u("measured_pushed") * size;
        let delivered = u("d_measured_records") * size;
        let readers = spec.clients.saturating_sub(spec.stalled) as u64;
        let expected = pushed_bytes * readers;
        let cpu = f("cpu_user_s") + f("cpu_sys_s");
        let duration = spec.duration;
        let peak = u("peak_rss_kb");
        Row {
            mode: mode.into(),
            transport: spec.transport.name().into(),
            clients: spec.clients,
            size: spec.size,
            bitrate: fmt_bitrate(spec.bitrate),
            rate: spec.rate(),
            elem: spec.label.clone(),
            rep,
            status: status(r),
            duration_s: duration,
            pushed_bytes,
            delivered_bytes: delivered,
            delivered_ratio: if expected > 0 {
                delivered as f64 / expected as f64
            } else {
                0.0
            },
            push_rate_ratio: match spec.bitrate {
                Some(b) => pushed_bytes as f64 * 8.0 / duration / b as f64,
                None => 1.0,
            },
            cpu_s: cpu,
            cpu_user_s: f("cpu_user_s"),
            cpu_sys_s: f("cpu_sys_s"),
            cpu_s_per_gb: if delivered > 0 {
                cpu / (delivered as f64 / 1e9)
            } else {
                f64::NAN
            },
            kicked: u("kicked"),
            lost: u("lost"),
            p50_ms: f("d_p50_ns") / 1e6,
            push_p99_us: f("push_p99_ns") / 1e3,
            push_max_us: f("push_max_ns") / 1e3,
            p99_ms: f("d_p99_ns") / 1e6,
            max_ms: f("d_max_ns") / 1e6,
            peak_rss_mb: peak as f64 / 1024.0,
            rss_per_client_kb: peak.saturating_sub(u("base_rss_kb")) as f64
                / spec.clients.max(1) as f64,
            gbit_s: delivered as f64 * 8.0 / duration / 1e9,
            drain_cpu_s: f("d_cpu_s"),
            gaps: u("d_gaps"),
            bad: u("d_bad"),
            flushed: r.get("flushed").is_some_and(|v| v == "true"),
            nvcsw: u("nvcsw") as i64,
            setup_s: f("setup_s"),
            loadavg: noise.load,
            busy_before_pct: noise.busy_before * 100.0,
            foreign_pct: noise.foreign_pct,
            io_threads: spec
                .rs_props
                .iter()
                .rev()
                .find(|(k, _)| k == "io-threads")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0),
            units_max: spec.units_max,
            rs_props: spec.rs_props_column(),
            stalled: spec.stalled,
            stalled_removed: u("stalled_removed"),
            others_removed: u("others_removed"),
            kept: readers.saturating_sub(u("others_removed")),
            kept_exact: u("d_complete").saturating_sub(u("d_complete_gap_clients")),
            kept_gap_clients: u("d_complete_gap_clients"),
            kept_gaps: u("d_complete_gaps"),
        }
    }

    /// The stream as the tables show it: `8192k, 250/s` or `max`.
    pub fn pace(&self) -> String {
        match self.rate {
            Some(r) => format!("{}, {}/s", self.bitrate, fmt_rate(r)),
            None => self.bitrate.clone(),
        }
    }

    /// Every kept client received its whole stream, exact and without a gap (and
    /// no stream anywhere had a bad stamp).
    pub fn kept_exact_ok(&self) -> bool {
        self.status == "ok"
            && self.kept_exact == self.kept
            && self.kept_gap_clients == 0
            && self.bad == 0
    }

    /// Kept up: nobody kicked or lost, everything delivered, the producer on time.
    pub fn sustained(&self) -> bool {
        self.status == "ok"
            && self.kicked == 0
            && self.lost == 0
            && self.delivered_ratio >= 0.99
            && self.push_rate_ratio >= 0.97
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// The medians of one element in one case, in the order of the table's columns.
struct Med {
    cols: [f64; 11],
    status: String,
}

const COLUMNS: [&str; 11] = [
    "CPU s/GB", "deliv%", "push%", "kicked", "p50 ms", "p99 ms", "max ms", "peakRSS", "RSS/cl",
    "Gbit/s", "push99us",
];

/// Column index of `kicked`, which has no ratio.
const KICKED: usize = 3;

fn medians(rows: &[Row]) -> Med {
    let m = |f: fn(&Row) -> f64| median(rows.iter().map(f).collect());
    let bad: Vec<&str> = rows
        .iter()
        .filter(|r| r.status != "ok")
        .map(|r| r.status.as_str())
        .collect();
    Med {
        cols: [
            m(|r| r.cpu_s_per_gb),
            m(|r| r.delivered_ratio),
            m(|r| r.push_rate_ratio),
            m(|r| r.kicked as f64),
            m(|r| r.p50_ms),
            m(|r| r.p99_ms),
            m(|r| r.max_ms),
            m(|r| r.peak_rss_mb),
            m(|r| r.rss_per_client_kb),
            m(|r| r.gbit_s),
            m(|r| r.push_p99_us),
        ],
        status: if bad.is_empty() {
            String::new()
        } else {
            format!("  [{}]", bad.join(","))
        },
    }
}

impl Med {
    fn cells(&self) -> Vec<String> {
        let c = &self.cols;
        vec![
            format!("{:.3}", c[0]),
            format!("{:.2}", c[1] * 100.0),
            format!("{:.1}", c[2] * 100.0),
            format!("{:.0}", c[3]),
            format!("{:.3}", c[4]),
            format!("{:.3}", c[5]),
            format!("{:.2}", c[6]),
            format!("{:.1}MB", c[7]),
            format!("{:.1}KB", c[8]),
            format!("{:.3}", c[9]),
            format!("{:.0}", c[10]),
        ]
    }

    fn ratios(&self, other: &Med) -> Vec<String> {
        (0..COLUMNS.len())
            .map(|i| match i {
                KICKED => String::new(),
                _ => ratio(self.cols[i], other.cols[i]),
            })
            .collect()
    }
}

pub fn ratio(a: f64, b: f64) -> String {
    if a.is_nan() || b.is_nan() || b == 0.0 {
        "-".into()
    } else {
        format!("{:.2}x", a / b)
    }
}

fn table_line(label: &str, cells: &[String], tail: &str) {
    let mut out = format!("  {label:<13}");
    for c in cells {
        let _ = write!(out, " {c:>9}");
    }
    println!("{out}{tail}");
}

/// The table of one case: each element's medians, then rs (each variant) against C
/// and raw.
pub fn print_case(title: &str, by_elem: &[(Variant, Vec<Row>)], reps: usize, unpaced: bool) {
    println!();
    println!("{title}  (median of {reps})");
    if unpaced {
        println!(
            "  (unpaced: the producer keeps the in-flight window full, so latency here is mostly\n   \
             time spent queued in that window; compare latency on paced runs)"
        );
    }
    let header: Vec<String> = COLUMNS.iter().map(|c| c.to_string()).collect();
    table_line("element", &header, "");
    let meds: Vec<(&Variant, Med)> = by_elem.iter().map(|(v, rows)| (v, medians(rows))).collect();
    for (v, m) in &meds {
        table_line(&v.label, &m.cells(), &m.status);
    }
    let get = |e: Elem| meds.iter().find(|(v, _)| v.elem == e).map(|(_, m)| m);
    for (rs, a) in meds.iter().filter(|(v, _)| v.elem == Elem::Rs) {
        for (other, name) in [(Elem::C, "C"), (Elem::Raw, "raw")] {
            if let Some(b) = get(other) {
                table_line(&format!("{}/{name}", rs.label), &a.ratios(b), "");
            }
        }
    }
    if let (Some(uring), Some(raw)) = (get(Elem::RawUring), get(Elem::Raw)) {
        table_line("raw-uring/raw", &uring.ratios(raw), "");
    }
    let foreign: Vec<f64> = by_elem
        .iter()
        .flat_map(|(_, rows)| rows.iter().map(|r| r.foreign_pct))
        .collect();
    let worst = foreign.iter().copied().fold(0.0, f64::max);
    println!(
        "  (other processes on the machine used {:.0}% of the CPUs during these runs, worst {:.0}%)",
        median(foreign),
        worst
    );
}

/// Who was removed in one case, per element (medians over the repetitions): the
/// stalled clients, the others, and whether every kept client's stream was whole,
/// exact and gap-free in every repetition. With `targets`, the overload targets of
/// issue 9 against these figures.
pub fn print_removals(
    by_elem: &[(Variant, Vec<Row>)],
    clients: usize,
    stalled: usize,
    targets: bool,
) {
    let others = clients - stalled;
    println!(
        "  removals: {stalled} stalled clients (never read), {others} others; 'exact' = every kept \
         client got every buffer\n  from its first to the last pushed, in order, no gap, in every repetition"
    );
    println!(
        "  {:<10} {:>10} {:>10} {:>8} {:>10} {:>9} {:>9} {:>7} {:>9}",
        "element",
        "stalled rm",
        "others rm",
        "others%",
        "kept",
        "exact",
        "gap cl",
        "Gbit/s",
        "push%"
    );
    let m = |rows: &[Row], f: fn(&Row) -> f64| median(rows.iter().map(f).collect());
    let gbit = |e: &str| {
        by_elem
            .iter()
            .find(|(v, _)| v.label == e)
            .map(|(_, rows)| m(rows, |r| r.gbit_s))
    };
    let rs_columns = || {
        by_elem
            .iter()
            .filter(|(v, _)| v.elem == Elem::Rs)
            .map(|(v, rows)| (v.label.as_str(), rows))
    };
    for (v, rows) in by_elem {
        let e = &v.label;
        let exact = rows.iter().filter(|r| r.kept_exact_ok()).count();
        println!(
            "  {:<10} {:>10} {:>10} {:>7.1}% {:>10} {:>9} {:>9} {:>7.2} {:>8.1}%",
            e,
            format!("{:.0}/{stalled}", m(rows, |r| r.stalled_removed as f64)),
            format!("{:.0}/{others}", m(rows, |r| r.others_removed as f64)),
            m(rows, |r| r.others_removed as f64) / others.max(1) as f64 * 100.0,
            format!("{:.0}", m(rows, |r| r.kept as f64)),
            format!("{exact}/{} runs", rows.len()),
            format!("{:.0}", m(rows, |r| r.kept_gap_clients as f64)),
            m(rows, |r| r.gbit_s),
            m(rows, |r| r.push_rate_ratio) * 100.0,
        );
    }
    let c = gbit("c");
    for (e, _) in rs_columns() {
        if let (Some(a), Some(c)) = (gbit(e), c) {
            println!("  {e}/C delivered throughput: {}", ratio(a, c));
        }
    }
    if !targets {
        return;
    }
    // Issue 9's targets, for every rs variant: all stalled removed and at most 1 % of
    // the others (none when nobody stalls), exact kept streams, 1.5x C's throughput.
    for (e, rows) in rs_columns() {
        let yes = |ok: bool| if ok { "met" } else { "NOT met" };
        let worst_others = rows.iter().map(|r| r.others_removed).max().unwrap_or(0);
        let all_stalled = rows.iter().all(|r| r.stalled_removed == stalled as u64);
        let exact = rows.iter().all(Row::kept_exact_ok);
        let removed_ok = if stalled > 0 {
            worst_others as f64 <= 0.01 * others as f64
        } else {
            worst_others == 0
        };
        let mut line = if stalled > 0 {
            format!(
                "  targets for {e}: all stalled removed {}; at most 1% of the others removed {} \
                 (worst run: {worst_others})",
                yes(all_stalled),
                yes(removed_ok)
            )
        } else {
            format!(
                "  targets for {e}: no client removed {} (worst run: {worst_others})",
                yes(removed_ok)
            )
        };
        let _ = write!(line, "; kept streams exact {}", yes(exact));
        if let (Some(a), Some(c), true) = (gbit(e), c, stalled > 0) {
            let _ = write!(
                line,
                "; >= 1.5x C's throughput {} ({})",
                yes(a >= 1.5 * c),
                ratio(a, c)
            );
        }
        println!("{line}");
    }
}

/// One line per run on stderr while the benchmark goes on.
pub fn progress(r: &Row) {
    let stalled = if r.stalled > 0 {
        format!(
            " ({} stalled: {} removed, others removed {}, kept exact {}/{})",
            r.stalled, r.stalled_removed, r.others_removed, r.kept_exact, r.kept
        )
    } else {
        String::new()
    };
    eprintln!(
        "  [{} {} n={} {} {} rep{}] {:<3} cpu {:.3} s/GB, deliv {:.2}%, kicked {}{stalled}, p99 {:.2} ms, {:.2} Gbit/s, push p99 {:.0} us, drain cpu {:.2} s, other procs {:.0}% {}",
        r.mode,
        r.transport,
        r.clients,
        fmt_size(r.size),
        r.pace(),
        r.rep,
        r.elem,
        r.cpu_s_per_gb,
        r.delivered_ratio * 100.0,
        r.kicked,
        r.p99_ms,
        r.gbit_s,
        r.push_p99_us,
        r.drain_cpu_s,
        r.foreign_pct,
        if r.status == "ok" { "" } else { &r.status }
    );
}
