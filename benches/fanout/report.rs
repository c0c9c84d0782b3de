// SPDX-License-Identifier: MPL-2.0

//! One finished run as a row of figures, the medians of a case and the tables.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::orchestrate::Noise;
use crate::spec::{Elem, Spec};
use crate::units::{fmt_bitrate, fmt_size};

/// One finished run, with the derived figures.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub mode: String,
    pub transport: String,
    pub clients: usize,
    pub size: usize,
    pub bitrate: String,
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
    pub flushed: bool,
    pub nvcsw: i64,
    pub setup_s: f64,
    pub loadavg: f64,
    pub busy_before_pct: f64,
    pub foreign_pct: f64,
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
        let expected = pushed_bytes * spec.clients as u64;
        let cpu = f("cpu_user_s") + f("cpu_sys_s");
        let duration = spec.duration;
        let peak = u("peak_rss_kb");
        Row {
            mode: mode.into(),
            transport: spec.transport.name().into(),
            clients: spec.clients,
            size: spec.size,
            bitrate: fmt_bitrate(spec.bitrate),
            elem: spec.elem.name().into(),
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
            flushed: r.get("flushed").is_some_and(|v| v == "true"),
            nvcsw: u("nvcsw") as i64,
            setup_s: f("setup_s"),
            loadavg: noise.load,
            busy_before_pct: noise.busy_before * 100.0,
            foreign_pct: noise.foreign_pct,
        }
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
    let mut out = format!("  {label:<7}");
    for c in cells {
        let _ = write!(out, " {c:>9}");
    }
    println!("{out}{tail}");
}

/// The table of one case: each element's medians, then rs against C and raw.
pub fn print_case(title: &str, by_elem: &[(Elem, Vec<Row>)], reps: usize, unpaced: bool) {
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
    let meds: Vec<(Elem, Med)> = by_elem
        .iter()
        .map(|(e, rows)| (*e, medians(rows)))
        .collect();
    for (e, m) in &meds {
        table_line(e.name(), &m.cells(), &m.status);
    }
    let get = |e: Elem| meds.iter().find(|(x, _)| *x == e).map(|(_, m)| m);
    for (label, other) in [("rs/C", Elem::C), ("rs/raw", Elem::Raw)] {
        if let (Some(a), Some(b)) = (get(Elem::Rs), get(other)) {
            table_line(label, &a.ratios(b), "");
        }
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

/// One line per run on stderr while the benchmark goes on.
pub fn progress(r: &Row) {
    eprintln!(
        "  [{} {} n={} {} {} rep{}] {:<3} cpu {:.3} s/GB, deliv {:.2}%, kicked {}, p99 {:.2} ms, {:.2} Gbit/s, push p99 {:.0} us, drain cpu {:.2} s, other procs {:.0}% {}",
        r.mode,
        r.transport,
        r.clients,
        fmt_size(r.size),
        r.bitrate,
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
