// SPDX-License-Identifier: MPL-2.0

//! The orchestrator: one sink process per run (never two at once), the machine's
//! other load around each run, the matrix and the sustain search.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::args::{FD_RESERVE, Mode, Opts, client_limit};
use crate::csv::Csv;
use crate::element::check_rs_props;
use crate::os::{children_cpu, usage_self};
use crate::report::{Row, print_case, print_removals, progress, ratio};
use crate::spec::{Elem, Spec, Transport, Variant, parse_kv};
use crate::system::{init_gstreamer, raise_fd_limit};
use crate::targets::{TARGETS, Verdict, run_targets};
use crate::units::{fmt_bitrate, fmt_pace, fmt_size};

/// One case: what every element runs in it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Case {
    pub transport: Transport,
    pub clients: usize,
    pub size: usize,
    /// Bits per second per client; None: unpaced.
    pub bitrate: Option<u64>,
    pub stalled: usize,
}

pub fn make_spec(o: &Opts, v: &Variant, case: Case) -> Spec {
    let Case {
        transport: t,
        clients,
        size,
        bitrate,
        stalled,
    } = case;
    let window = (o.window as u64)
        .min(o.window_total as u64 / clients.max(1) as u64)
        .max(2 * size as u64);
    let units_max = match (o.units_max, bitrate) {
        (Some(n), _) => n,
        (None, Some(b)) => ((o.max_lag * b as f64 / 8.0 / size as f64).ceil() as i64).max(4),
        // Unpaced: the window bounds the lag; kick only a client that stalls.
        (None, None) => (8 * window / size as u64).max(64) as i64,
    };
    let setup = 30.0 + clients as f64 * 0.004;
    Spec {
        elem: v.elem,
        transport: t,
        clients,
        size,
        bitrate,
        warmup: o.warmup,
        duration: o.duration,
        units_max,
        window,
        deadline: setup + o.warmup + o.duration + 40.0,
        stalled,
        label: v.label.clone(),
        rs_props: match v.elem {
            Elem::Rs => rs_props(o, v),
            _ => Vec::new(),
        },
    }
}

/// What rsmultifdsink gets in variant `v`: `--rs-prop`'s properties, each replaced by
/// the variant's value where it sets the same one, then the variant's others.
fn rs_props(o: &Opts, v: &Variant) -> Vec<(String, String)> {
    let mut props: Vec<(String, String)> = o
        .rs_prop
        .iter()
        .filter(|(k, _)| v.prop(k).is_none())
        .cloned()
        .collect();
    for (k, val) in &v.props {
        props.retain(|(x, _)| x != k);
        props.push((k.clone(), val.clone()));
    }
    props
}

/// Checks every rs column's properties on the element; exits with the reason if one
/// is wrong.
pub fn check_variants(o: &Opts, variants: &[Variant]) {
    for v in variants.iter().filter(|v| v.elem == Elem::Rs) {
        if let Err(e) = check_rs_props(&rs_props(o, v)) {
            eprintln!("fanout-bench: {}: {e}", v.label);
            std::process::exit(2);
        }
    }
}

/// How busy the machine was around a run, from /proc/stat.
pub struct Noise {
    pub load: f64,
    /// Busy fraction of all CPUs just before the run.
    pub busy_before: f64,
    /// CPU other processes (not this benchmark) used during the run, in % of all CPUs.
    pub foreign_pct: f64,
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// (busy, total) jiffies of the whole machine.
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn busy_fraction(over: Duration) -> f64 {
    let (b0, t0) = cpu_jiffies();
    std::thread::sleep(over);
    let (b1, t1) = cpu_jiffies();
    if t1 > t0 {
        (b1 - b0) as f64 / (t1 - t0) as f64
    } else {
        0.0
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs one case, waiting first for an idle machine if asked, and measures how much
/// CPU other processes took meanwhile (our sink and drain are reaped children, so
/// their CPU is known exactly).
fn run_measured(o: &Opts, spec: &Spec) -> (BTreeMap<String, String>, Noise) {
    let mut busy_before = busy_fraction(Duration::from_millis(300));
    if o.wait_idle > 0.0 {
        let until = Instant::now() + Duration::from_secs_f64(o.wait_idle);
        while busy_before > 0.10 && Instant::now() < until {
            busy_before = busy_fraction(Duration::from_secs(1));
        }
    }
    let load = loadavg();
    // SAFETY: sysconf with a constant.
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) }.max(1) as f64;
    let (j0, _) = cpu_jiffies();
    let (c0, s0, t0) = (children_cpu(), usage_self(), Instant::now());
    let r = run_once(spec);
    let (j1, _) = cpu_jiffies();
    let (c1, s1) = (children_cpu(), usage_self());
    let wall = t0.elapsed().as_secs_f64();
    let ours = (c1 - c0) + s1.since(s0).cpu();
    let machine = (j1 - j0) as f64 / hz;
    let foreign_pct = ((machine - ours).max(0.0) / (wall * cpus() as f64) * 100.0).min(100.0);
    (
        r,
        Noise {
            load,
            busy_before,
            foreign_pct,
        },
    )
}

/// Runs one sink process (which runs its drain) with a watchdog.
fn run_once(spec: &Spec) -> BTreeMap<String, String> {
    let mut child = match Command::new(std::env::current_exe().expect("current exe"))
        .arg("__sink")
        .args(spec.to_args())
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return BTreeMap::from([("status".into(), format!("spawn-failed:{e}"))]),
    };
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("RESULT ") {
                let _ = tx.send(parse_kv(rest));
            }
        }
    });
    let result = rx.recv_timeout(Duration::from_secs_f64(spec.deadline + 15.0));
    let status = match &result {
        Ok(_) => None,
        Err(mpsc::RecvTimeoutError::Disconnected) => Some("crashed"),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            // Ends this child only (its drain follows via PDEATHSIG).
            let _ = child.kill();
            Some("killed")
        }
    };
    let exit = child.wait();
    match (result, status) {
        (Ok(r), _) => r,
        (Err(_), s) => BTreeMap::from([(
            "status".into(),
            format!("{}:{:?}", s.unwrap_or("no-result"), exit.ok()),
        )]),
    }
}

/// Runs one case and records its row.
fn run_row(o: &Opts, spec: &Spec, mode: &str, rep: usize, out: &mut Output) -> Row {
    let (r, noise) = run_measured(o, spec);
    let row = Row::new(mode, spec, rep, &r, &noise);
    progress(&row);
    out.record(&row);
    row
}

/// Where the rows go: the CSV file, and the lists the self-test checks.
pub struct Output {
    pub csv: Csv,
    pub rows: Vec<Row>,
    /// `--mode targets`: every target's verdict for every column it concerns.
    pub verdicts: Vec<Verdict>,
}

impl Output {
    pub fn new(csv: Csv) -> Output {
        Output {
            csv,
            rows: Vec::new(),
            verdicts: Vec::new(),
        }
    }

    fn record(&mut self, row: &Row) {
        self.csv.row(row);
        self.rows.push(row.clone());
    }
}

/// Every case of the matrix, each element `reps` times, and its table.
fn run_matrix(o: &Opts, out: &mut Output) {
    let limit = client_limit();
    let mode = match o.mode {
        Mode::Raw => "raw",
        Mode::Overload => "overload",
        _ => "matrix",
    };
    for &transport in &o.transport {
        for &size in &o.size {
            for bitrate in o.bitrates(size) {
                for &clients in &o.clients {
                    if clients > limit {
                        println!(
                            "\n{} clients={clients}: skipped (more than the fd limit {} - {FD_RESERVE} per process)",
                            transport.name(),
                            limit + FD_RESERVE
                        );
                        continue;
                    }
                    for &stalled in &o.stalled {
                        if stalled >= clients {
                            println!(
                                "\n{} clients={clients} stalled={stalled}: skipped (no client would read)",
                                transport.name()
                            );
                            continue;
                        }
                        let case = Case {
                            transport,
                            clients,
                            size,
                            bitrate,
                            stalled,
                        };
                        run_case(o, mode, case, &o.variants(), out);
                    }
                }
            }
        }
    }
}

/// Runs every column of `variants` in one case, `--reps` times, prints the case's
/// table and returns each column's rows.
pub fn run_case(
    o: &Opts,
    mode: &str,
    case: Case,
    variants: &[Variant],
    out: &mut Output,
) -> Vec<(Variant, Vec<Row>)> {
    let mut by_elem: Vec<(Variant, Vec<Row>)> =
        variants.iter().map(|v| (v.clone(), Vec::new())).collect();
    for rep in 0..o.reps {
        // Alternate the order so no element always runs on a warm cache.
        let mut order: Vec<usize> = (0..variants.len()).collect();
        order.rotate_left(rep % variants.len());
        for i in order {
            let spec = make_spec(o, &variants[i], case);
            let row = run_row(o, &spec, mode, rep, out);
            by_elem[i].1.push(row);
        }
    }
    let spec = make_spec(o, &variants[0], case);
    let window = match case.bitrate {
        None => format!(", window {} per client", fmt_size(spec.window as usize)),
        Some(_) => String::new(),
    };
    let stalled = match case.stalled {
        0 => String::new(),
        n => format!(", {n} stalled"),
    };
    let props: Vec<String> = by_elem
        .iter()
        .filter(|(v, _)| v.elem == Elem::Rs)
        .filter_map(|(v, _)| {
            let props = make_spec(o, v, case).rs_props;
            (!props.is_empty()).then(|| {
                let p: Vec<String> = props.iter().map(|(k, x)| format!("{k}={x}")).collect();
                format!("{}: {}", v.label, p.join(" "))
            })
        })
        .collect();
    let props = match props.is_empty() {
        true => String::new(),
        false => format!("; {}", props.join("; ")),
    };
    print_case(
        &format!(
            "{} clients={} size={} stream={} per client (units-max={} buffers{window}{stalled}{props})",
            case.transport.name(),
            case.clients,
            fmt_size(case.size),
            fmt_pace(case.bitrate, case.size),
            spec.units_max,
        ),
        &by_elem,
        o.reps,
        case.bitrate.is_none(),
    );
    if case.stalled > 0 || o.mode == Mode::Overload {
        print_removals(
            &by_elem,
            case.clients,
            case.stalled,
            o.mode == Mode::Overload,
        );
    }
    by_elem
}

/// One cell of the sustain table: the highest client count sustained, and whether
/// the search stopped at --sustain-max instead of a failure.
pub struct Sustained {
    pub transport: Transport,
    pub bitrate: u64,
    pub variant: Variant,
    pub clients: usize,
    pub capped: bool,
}

/// Doubles the client count from --sustain-start until a run is not sustained, then
/// bisects; records the result as a CSV row of its own.
pub fn search(o: &Opts, t: Transport, bitrate: u64, v: &Variant, out: &mut Output) -> Sustained {
    let (mut lo, mut hi): (usize, Option<usize>) = (0, None);
    let mut n = o.sustain_start.min(o.sustain_max).max(1);
    for _trial in 0..20 {
        let case = Case {
            transport: t,
            clients: n,
            size: o.size[0],
            bitrate: Some(bitrate),
            stalled: 0,
        };
        let spec = make_spec(o, v, case);
        let row = run_row(o, &spec, "sustain-trial", 0, out);
        let ok = row.sustained();
        eprintln!(
            "    -> {} (push rate {:.1}%)",
            if ok { "sustained" } else { "NOT sustained" },
            row.push_rate_ratio * 100.0
        );
        if ok {
            lo = n;
        } else {
            hi = Some(n);
        }
        n = match hi {
            None if lo >= o.sustain_max => break,
            None => (lo * 2).min(o.sustain_max),
            Some(h) => {
                let width = h - lo;
                if width as f64 <= o.sustain_resolution * lo as f64 || width <= 10 {
                    break;
                }
                lo + width / 2
            }
        };
    }
    let s = Sustained {
        transport: t,
        bitrate,
        variant: v.clone(),
        clients: lo,
        capped: hi.is_none(),
    };
    let spec = make_spec(
        o,
        v,
        Case {
            transport: t,
            clients: lo,
            size: o.size[0],
            bitrate: Some(bitrate),
            stalled: 0,
        },
    );
    out.csv.row(&Row {
        mode: "sustain".into(),
        transport: t.name().into(),
        clients: s.clients,
        size: o.size[0],
        bitrate: fmt_bitrate(Some(bitrate)),
        rate: spec.rate(),
        elem: v.label.clone(),
        status: if s.capped { "capped" } else { "ok" }.into(),
        duration_s: o.duration,
        rs_props: spec.rs_props_column(),
        ..Row::default()
    });
    eprintln!(
        "  => {} {} {}: {}{} clients sustained",
        t.name(),
        fmt_bitrate(Some(bitrate)),
        v.label,
        if s.capped { ">= " } else { "" },
        s.clients
    );
    s
}

fn run_sustain(o: &Opts, out: &mut Output) {
    let mut results = Vec::new();
    let variants = o.variants();
    for &t in &o.transport {
        for &bitrate in &o.sustain_bitrates {
            for v in &variants {
                results.push(search(o, t, bitrate, v, out));
            }
        }
    }
    print_sustain_table(o, &variants, &results);
}

/// The sustain table's cell: the count, with ">=" when the search hit the bound.
pub fn sustained_cell(s: &Sustained) -> String {
    format!("{}{}", if s.capped { ">=" } else { "" }, s.clients)
}

fn print_sustain_table(o: &Opts, variants: &[Variant], results: &[Sustained]) {
    println!();
    println!(
        "Highest client count sustained without a kick ({} buffers, units-max = {} s of stream, {} s runs; \
         'sustained' = no client kicked or lost, >= 99% delivered, producer on schedule)",
        fmt_size(o.size[0]),
        o.max_lag,
        o.duration
    );
    let rs: Vec<&Variant> = variants.iter().filter(|v| v.elem == Elem::Rs).collect();
    let has_c = variants.iter().any(|v| v.elem == Elem::C);
    print!("  {:<6} {:>9}", "", "bitrate");
    for v in variants {
        print!(" {:>9}", v.label);
    }
    for v in rs.iter().filter(|_| has_c) {
        print!(" {:>9}", format!("{}/C", v.label));
    }
    println!();
    for &t in &o.transport {
        for &b in &o.sustain_bitrates {
            print!("  {:<6} {:>9}", t.name(), fmt_bitrate(Some(b)));
            let get = |v: &Variant| {
                results
                    .iter()
                    .find(|r| r.transport == t && r.bitrate == b && r.variant == *v)
            };
            for v in variants {
                print!(" {:>9}", sustained_cell(get(v).unwrap()));
            }
            let c = Variant::plain(Elem::C);
            for v in rs.iter().filter(|_| has_c) {
                if let (Some(a), Some(c)) = (get(v), get(&c)) {
                    print!(" {:>9}", ratio(a.clients as f64, c.clients as f64));
                }
            }
            println!();
        }
    }
}

/// The machine, then the matrix and/or the sustain search.
pub fn orchestrate(o: &Opts, out: &mut Output) {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    init_gstreamer();
    check_variants(o, &o.variants());
    println!("fanout-bench: rsmultifdsink vs multifdsink, loopback only");
    println!(
        "  machine: {} CPUs, Linux {}, {}, fd limit {}, load {:.2}",
        cpus(),
        kernel.trim(),
        gst::version_string(),
        raise_fd_limit(u64::MAX),
        loadavg()
    );
    println!(
        "  each element runs alone in its own sink process (never two at once); CPU = getrusage(RUSAGE_SELF)\n  \
         of that process (producer + element threads, user+sys) from the first measured push until the\n  \
         drain process received everything, per GB received. Latency = drain receive time - stamp taken\n  \
         just before pad.push. Same settings for both: sync=false unit-format=buffers units-max=<below>."
    );
    if o.mode == Mode::Targets {
        run_targets(o, &TARGETS, out);
    } else if o.mode != Mode::Sustain {
        run_matrix(o, out);
    }
    if o.mode == Mode::Sustain || o.mode == Mode::All {
        let mut s = o.clone();
        if o.mode == Mode::All {
            s.elements
                .retain(|e| !matches!(e, Elem::Raw | Elem::RawUring));
        }
        run_sustain(&s, out);
    }
    if let Some(p) = &o.csv {
        println!("\nCSV written to {p}");
    }
}
