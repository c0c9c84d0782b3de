// SPDX-License-Identifier: MPL-2.0

//! What `cargo test --all-targets` runs (it starts every bench target without
//! `--bench`): every `cargo bench --bench fanout` command of the README and of
//! docs/benchmark.md must parse, and a small matrix and sustain search, debug-built,
//! must deliver every buffer in order to every client and write its CSV. A small
//! overload case (20 clients, 2 stalled, rs with one and two IO threads, C and raw)
//! must remove exactly the stalled clients and deliver every kept client's stream
//! whole; the drain must catch a skipped buffer; a property rsmultifdsink does not
//! have must be refused before any run. Named rs variants (`--rs-variant`) and paced
//! rates (`--rate`) must run as their own columns, and `--mode targets` on its cases
//! scaled down to 4 clients must give every target its figures; scripts/bench-plot.py
//! must plot and tabulate both runs' CSVs (every column, every buffer size), and
//! plot two CSVs together; every documented plot command must run, and the one that
//! draws docs/benchmark.svg from docs/data must draw exactly the committed plot.

use crate::args::Opts;
use crate::csv::Csv;
use crate::drain::check_streams;
use crate::element::check_rs_props;
use crate::orchestrate::{Output, check_variants, orchestrate};
use crate::report::Row;
use crate::spec::{Variant, write_stamp};
use crate::targets::{TARGETS, Who, run_targets};

const DOCS: [(&str, &str); 2] = [
    ("README.md", include_str!("../../README.md")),
    ("docs/benchmark.md", include_str!("../../docs/benchmark.md")),
];

const COMMAND: &str = "cargo bench --bench fanout --";

/// Every command of the documents' shell blocks, with its document: a line ending
/// in `\` goes on on the next one; ` #` starts a comment.
fn documented_shell_commands() -> Vec<(&'static str, String)> {
    let mut found = Vec::new();
    for (name, text) in DOCS {
        let mut in_block = false;
        let mut command = String::new();
        for line in text.lines() {
            if line.starts_with("```") {
                in_block = !in_block;
                continue;
            }
            let line = line.split(" #").next().unwrap_or("").trim();
            if !in_block || (command.is_empty() && line.is_empty()) {
                continue;
            }
            command.push_str(line.trim_end_matches('\\'));
            command.push(' ');
            if !line.ends_with('\\') {
                found.push((name, command.trim_end().to_string()));
                command.clear();
            }
        }
    }
    found
}

/// The arguments of every fanout command in the documents' shell blocks.
fn documented_commands() -> Vec<(&'static str, Vec<String>)> {
    documented_shell_commands()
        .into_iter()
        .filter_map(|(name, command)| {
            let args = command.strip_prefix(COMMAND)?.split_whitespace();
            Some((name, args.map(String::from).collect()))
        })
        .collect()
}

const PLOT: &str = "scripts/bench-plot.py ";

/// Every scripts/bench-plot.py command of the documents' shell blocks.
fn documented_plot_commands() -> Vec<(&'static str, String)> {
    documented_shell_commands()
        .into_iter()
        .filter(|(_, command)| command.starts_with(PLOT))
        .collect()
}

/// Runs every documented plot command through `sh` from the source folder, as
/// written but for its file names: `bench.csv` becomes `csv` (a CSV of this run) and
/// the `-o` file one in `dir`. The command that draws `docs/benchmark.svg` (from the
/// committed CSVs under docs/data) must draw exactly the committed plot, so the
/// README's plot is the one its data and command give.
fn documented_plot_problems(csv: &std::path::Path, dir: &std::path::Path) -> Vec<String> {
    let root = env!("CARGO_MANIFEST_DIR");
    let commands = documented_plot_commands();
    let mut failures = Vec::new();
    if !commands
        .iter()
        .any(|(doc, c)| *doc == "README.md" && c.ends_with(" -o docs/benchmark.svg"))
    {
        failures.push("README: no command draws docs/benchmark.svg".into());
    }
    for (i, (doc, command)) in commands.iter().enumerate() {
        let mut words: Vec<String> = command.split_whitespace().map(String::from).collect();
        let out = dir.join(format!("documented-{i}.svg"));
        let mut committed = None;
        for j in 0..words.len() {
            if words[j] == "bench.csv" {
                words[j] = csv.display().to_string();
            }
            if j > 0 && (words[j - 1] == "-o" || words[j - 1] == "--output") {
                committed = Some(std::path::Path::new(root).join(&words[j]));
                words[j] = out.display().to_string();
            }
        }
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(words.join(" "))
            .current_dir(root)
            .stdout(std::process::Stdio::null())
            .status();
        if !status.is_ok_and(|s| s.success()) {
            failures.push(format!("{doc}: `{command}` failed"));
            continue;
        }
        if command.ends_with(" -o docs/benchmark.svg") {
            let drawn = std::fs::read(&out).unwrap_or_default();
            let kept = committed.and_then(|p| std::fs::read(p).ok());
            if kept.as_deref() != Some(drawn.as_slice()) {
                failures.push(format!(
                    "{doc}: `{command}` draws another plot than the committed \
                     docs/benchmark.svg: run it again and commit the plot"
                ));
            }
        }
    }
    failures
}

/// Runs the orchestrator on `args`; returns its rows and the CSV's lines.
fn run(args: &[&str], csv: &std::path::Path) -> (Vec<Row>, usize) {
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.extend(["--csv".into(), csv.display().to_string()]);
    let o = Opts::parse(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let mut out = Output::new(Csv::open(o.csv.as_deref()));
    orchestrate(&o, &mut out);
    drop(out.csv);
    let written = std::fs::read_to_string(csv)
        .expect("the CSV")
        .lines()
        .count();
    (out.rows, written)
}

/// What is wrong with a run that had to deliver everything to every client that
/// reads and remove (as `slow`) exactly the stalled ones.
fn problems(r: &Row) -> Option<String> {
    let fine = r.status == "ok"
        && r.flushed
        && r.gaps == 0
        && r.kicked == r.stalled as u64
        && r.stalled_removed == r.stalled as u64
        && r.others_removed == 0
        && r.lost == 0
        && r.kept_exact_ok()
        && r.delivered_ratio >= 0.999;
    (!fine).then(|| format!("{r:?}"))
}

/// The drain's check of whole streams on made-up ones: an exact one, one that skips
/// a buffer, one torn off before the last buffer.
fn stream_check_problems() -> Option<String> {
    let size = 64;
    let stream = |seqs: &[u64]| -> Vec<u8> {
        let mut data = vec![0u8; size * seqs.len()];
        for (buf, &seq) in data.chunks_mut(size).zip(seqs) {
            write_stamp(buf, seq, 0);
        }
        data
    };
    let streams = [
        stream(&[3, 4, 5, 6]),
        stream(&[2, 3, 5, 6]),
        stream(&[1, 2, 3, 4, 5]),
    ];
    let got = check_streams(&streams, size, 7);
    // Two streams reach buffer 6; one of them skipped one buffer.
    (got != (2, 1, 1)).then(|| format!("stream check: (complete, gap clients, gaps) = {got:?}"))
}

/// The properties of every rs column are checked on the element: known properties
/// with valid values pass, anything else is refused with a message.
fn prop_check_problems() -> Vec<String> {
    let prop = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    let mut failures = Vec::new();
    let good = [
        prop("recover-policy", "keyframe"),
        prop("io-threads", "2"),
        prop("units-soft-max", "100"),
    ];
    if let Err(e) = check_rs_props(&good.concat()) {
        failures.push(format!("valid properties refused: {e}"));
    }
    for props in [
        prop("no-such-property", "1"),
        prop("recover-policy", "no-such-policy"),
        prop("num-handles", "1"),
        prop("io-threads", "100000"),
    ] {
        if check_rs_props(&props).is_ok() {
            failures.push(format!("accepted: {props:?}"));
        }
    }
    failures
}

fn args(line: &str) -> Vec<String> {
    line.split_whitespace().map(String::from).collect()
}

/// The columns, paces and targets the options make, and the options refused.
fn option_problems() -> Vec<String> {
    let mut failures = Vec::new();
    let parse = |line: &str| Opts::parse(&args(line));
    let labels = |o: &Opts| -> Vec<String> { o.variants().into_iter().map(|v| v.label).collect() };
    match parse("--io-threads 1,2 --rs-variant bt:io-threads=1,recover-policy=keyframe") {
        Ok(o) => {
            if labels(&o) != ["rs-io1", "rs-io2", "c", "raw", "bt"] {
                failures.push(format!("columns {:?}", labels(&o)));
            }
            let bt = o.variants().pop().unwrap();
            if bt.prop("recover-policy") != Some("keyframe") || bt.prop("io-threads") != Some("1") {
                failures.push(format!("variant {bt:?}"));
            }
        }
        Err(e) => failures.push(format!("variants refused: {e}")),
    }
    match parse("--rate 250,max --size 4K,64K") {
        Ok(o) => {
            let want = [
                (4096, vec![Some(8_192_000), None]),
                (65536, vec![Some(131_072_000), None]),
            ];
            for (size, bitrates) in want {
                if o.bitrates(size) != bitrates {
                    failures.push(format!("--rate 250,max at {size}: {:?}", o.bitrates(size)));
                }
            }
        }
        Err(e) => failures.push(format!("--rate refused: {e}")),
    }
    // The batching column is added unless a variant of its name replaces it.
    let bt20 = |line: &str| {
        parse(line)
            .map(|o| o.variants().into_iter().find(|v| v.label == "bt20"))
            .map_err(|e| e.to_string())
    };
    let want = Variant::rs("bt20", vec![("batch-time".into(), "20000000".into())]);
    match bt20("--mode targets") {
        Ok(Some(v)) if v == want => {}
        other => failures.push(format!("targets' default bt20: {other:?}")),
    }
    let mine = Variant::rs("bt20", vec![("io-threads".into(), "1".into())]);
    match bt20("--mode targets --rs-variant bt20:io-threads=1") {
        Ok(Some(v)) if v == mine => {}
        other => failures.push(format!("bt20 replaced: {other:?}")),
    }
    for bad in [
        "--rs-variant noprops",
        "--rs-variant a:",
        "--rs-variant a:b",
        "--rs-variant rs:io-threads=1",
        "--rs-variant multifdsink:io-threads=1",
        "--rs-variant raw-x:io-threads=1",
        "--rs-variant a,b:io-threads=1",
        "--rs-variant a:io-threads=1 --rs-variant a:io-threads=2",
        "--io-threads 1 --rs-variant rs-io1:io-threads=1",
        "--rate 250 --bitrate 2M",
        "--rate 0",
        "--mode raw --rs-variant a:io-threads=1",
        "--mode targets --clients 5",
        "--mode targets --rate 250",
        "--mode targets --elements rs",
        "--mode targets --target no-such-target",
        "--target batch-unix",
    ] {
        if parse(bad).is_ok() {
            failures.push(format!("accepted: {bad}"));
        }
    }
    failures
}

/// `--mode targets` on the targets' cases with at most 4 clients (a debug build on a
/// shared machine cannot meet them, so only that every target got its figures from
/// runs that delivered everything): batching measured with `bt20` (here io-threads=1,
/// as the batching property is not in every build), default settings with `rs` and
/// the extra column `x`, the sustain search with all three.
fn targets_problems(dir: &std::path::Path) -> (usize, Vec<String>) {
    let line = "--mode targets --reps 1 --duration 0.5 --warmup 0.3 --sustain-start 2 \
                --sustain-max 4 --rs-variant bt20:io-threads=1 --rs-variant x:recover-policy=none";
    let mut a = args(line);
    let csv = dir.join("targets.csv");
    a.extend(["--csv".into(), csv.display().to_string()]);
    let o = Opts::parse(&a).expect("targets options");
    let small = TARGETS.map(|mut t| {
        t.case.clients = t.case.clients.min(4);
        t
    });
    let mut out = Output::new(Csv::open(o.csv.as_deref()));
    check_variants(&o, &o.variants());
    run_targets(&o, &small, &mut out);
    drop(out.csv);
    let mut failures: Vec<String> = out.rows.iter().filter_map(problems).collect();
    for t in &TARGETS {
        let mut got: Vec<&str> = out
            .verdicts
            .iter()
            .filter(|v| v.target == t.name)
            .map(|v| v.column.as_str())
            .collect();
        got.sort();
        let want: &[&str] = match t.who {
            Who::Batching => &["bt20"],
            Who::Defaults => &["rs", "x"],
            Who::Every => &["bt20", "rs", "x"],
        };
        if got != want {
            failures.push(format!("target {}: verdicts for {got:?}", t.name));
        }
    }
    // Every ratio was measured; the sustain searches all stop at the bound of 4.
    for v in &out.verdicts {
        let sustain = v.target == "sustain-tcp";
        if sustain == v.met.is_some() || v.figures.is_empty() {
            failures.push(format!("verdict {v:?}"));
        }
    }
    let searches = out
        .verdicts
        .iter()
        .filter(|v| v.target == "sustain-tcp")
        .count()
        + 1;
    let lines = std::fs::read_to_string(&csv).map_or(0, |t| t.lines().count());
    if lines != 1 + out.rows.len() + searches {
        failures.push(format!(
            "targets: {} runs, {lines} CSV lines",
            out.rows.len()
        ));
    }
    (out.rows.len(), failures)
}

/// The runs of `--elements c --rs-variant io1:... --rate 300 --size 4K,64K`: C and
/// the variant with its properties, paced at 300 buffers/s of each size.
fn variant_problems(rows: &[Row]) -> Vec<String> {
    let mut labels: Vec<(&str, usize)> = rows.iter().map(|r| (r.elem.as_str(), r.size)).collect();
    labels.sort();
    let mut failures = Vec::new();
    if labels != [("c", 4096), ("c", 65536), ("io1", 4096), ("io1", 65536)] {
        failures.push(format!("variant case ran {labels:?}"));
    }
    for r in rows {
        let props = if r.elem == "io1" {
            "io-threads=1;units-soft-max=1000"
        } else {
            ""
        };
        let paced = r.rate.is_some_and(|x| (x - 300.0).abs() < 1e-6);
        if !paced || r.rs_props != props || r.io_threads != u32::from(r.elem == "io1") {
            failures.push(format!("variant case row {r:?}"));
        }
    }
    failures
}

/// Runs scripts/bench-plot.py with `args`; its standard output, or why it failed.
fn plot_script(args: &[&std::ffi::OsStr]) -> Result<String, String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench-plot.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "bench-plot.py {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// scripts/bench-plot.py on the variant case's CSV (C and `io1`, 4 KiB and 64 KiB):
/// a band of panels per size with both columns, a Markdown row per column, size and
/// client count; on it and the unpaced case's CSV together (as the README's matrix
/// plot is drawn from several commands): the columns and panels of both; and on the
/// targets' CSV: its tables and the sustain table.
fn plot_problems(
    variants_csv: &std::path::Path,
    unpaced_csv: &std::path::Path,
    targets_csv: &std::path::Path,
) -> Vec<String> {
    let svg = variants_csv.with_extension("svg");
    let mut failures = Vec::new();
    let both_svg = unpaced_csv.with_extension("both.svg");
    let both_args = [
        variants_csv.as_os_str(),
        unpaced_csv.as_os_str(),
        "-o".as_ref(),
        both_svg.as_os_str(),
    ];
    match plot_script(&both_args) {
        Ok(_) => {
            let text = std::fs::read_to_string(&both_svg).unwrap_or_default();
            for want in ["rs io1", "rs uring", "rs zc-bt", "300/s", "unpaced (max)"] {
                if !text.contains(want) {
                    failures.push(format!("plot of two CSVs: no {want:?}"));
                }
            }
        }
        Err(e) => failures.push(e),
    }
    match plot_script(&[variants_csv.as_os_str(), "-o".as_ref(), svg.as_os_str()]) {
        Ok(_) => {
            let text = std::fs::read_to_string(&svg).unwrap_or_default();
            for want in [
                "4 KiB buffers",
                "64 KiB buffers",
                "rs io1",
                "multifdsink (C)",
            ] {
                if !text.contains(want) {
                    failures.push(format!("plot: no {want:?}"));
                }
            }
        }
        Err(e) => failures.push(e),
    }
    match plot_script(&[variants_csv.as_os_str(), "--markdown".as_ref()]) {
        Ok(md) => {
            for want in ["| 3 | io1 |", "| 3 | c |"] {
                if md.matches(want).count() != 2 {
                    failures.push(format!("markdown: {want:?} not once per size:\n{md}"));
                }
            }
        }
        Err(e) => failures.push(e),
    }
    match plot_script(&[targets_csv.as_os_str(), "--markdown".as_ref()]) {
        Ok(md) => {
            for want in [
                "#### targets: unix, 64 KiB",
                "| 4 | bt20 |",
                "sustained without a kick",
            ] {
                if !md.contains(want) {
                    failures.push(format!("targets markdown: no {want:?}:\n{md}"));
                }
            }
        }
        Err(e) => failures.push(e),
    }
    failures
}

pub fn main() {
    let mut failures = Vec::new();
    let commands = documented_commands();
    if commands.len() < 6 {
        failures.push(format!("only {} documented commands found", commands.len()));
    }
    for (doc, args) in &commands {
        if let Err(e) = Opts::parse(args) {
            failures.push(format!("{doc}: {COMMAND} {}: {e}", args.join(" ")));
        }
    }
    let dir = std::env::temp_dir().join(format!("fanout-selftest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let short = ["--clients", "3", "--duration", "0.5", "--warmup", "0.2"];
    let cases: [&[&str]; 4] = [
        &[
            "--transport",
            "unix",
            "--bitrate",
            "max",
            "--elements",
            "rs,c,raw,raw-uring",
            "--rs-variant",
            "uring:io-uring=true",
            "--rs-variant",
            "zc-bt:zero-copy=true,batch-time=5000000",
        ],
        &["--transport", "tcp,tls", "--bitrate", "1M"],
        &[
            "--transport",
            "unix",
            "--rate",
            "300",
            "--size",
            "4K,64K",
            "--elements",
            "c",
            "--rs-variant",
            "io1:io-threads=1,units-soft-max=1000",
        ],
        &[
            "--mode",
            "sustain",
            "--transport",
            "unix",
            "--elements",
            "rs",
            "--sustain-bitrates",
            "1M",
            "--sustain-start",
            "2",
            "--sustain-max",
            "4",
        ],
    ];
    failures.extend(stream_check_problems());
    failures.extend(prop_check_problems());
    failures.extend(option_problems());
    // The stalled clients' sockets fill within about 50 buffers; they must then be
    // units-max behind before the run ends (1.3 s at 488 buffers/s).
    let overload = [
        "--mode",
        "overload",
        "--clients",
        "20",
        "--stalled",
        "2",
        "--bitrate",
        "16M",
        "--units-max",
        "200",
        "--duration",
        "1",
        "--warmup",
        "0.3",
        "--reps",
        "1",
        "--elements",
        "rs,c,raw",
        "--io-threads",
        "1,2",
        "--rs-prop",
        "recover-policy=none",
    ];
    let cases_run = cases
        .iter()
        .map(|case| {
            short
                .iter()
                .chain(case.iter())
                .copied()
                .collect::<Vec<&str>>()
        })
        .chain(std::iter::once(overload.to_vec()));
    let mut runs = 0;
    for (i, args) in cases_run.enumerate() {
        let (rows, csv_lines) = run(&args, &dir.join(format!("{i}.csv")));
        runs += rows.len();
        // Header, one line per run, and one per sustain result.
        let sustain_results = usize::from(args.contains(&"sustain"));
        if rows.is_empty() || csv_lines != 1 + rows.len() + sustain_results {
            failures.push(format!(
                "{args:?}: {} runs, {csv_lines} CSV lines",
                rows.len()
            ));
        }
        failures.extend(rows.iter().filter_map(problems));
        if args.contains(&"io1:io-threads=1,units-soft-max=1000") {
            failures.extend(variant_problems(&rows));
        }
    }
    let (target_runs, target_failures) = targets_problems(&dir);
    runs += target_runs;
    failures.extend(target_failures);
    failures.extend(plot_problems(
        &dir.join("2.csv"),
        &dir.join("0.csv"),
        &dir.join("targets.csv"),
    ));
    failures.extend(documented_plot_problems(&dir.join("0.csv"), &dir));
    let _ = std::fs::remove_dir_all(&dir);
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("fanout self-test: {f}");
        }
        std::process::exit(1);
    }
    println!(
        "fanout self-test: {} documented commands parse; {runs} runs delivered everything \
         and removed only the stalled clients",
        commands.len()
    );
}
