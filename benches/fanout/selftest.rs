// SPDX-License-Identifier: MPL-2.0

//! What `cargo test --all-targets` runs (it starts every bench target without
//! `--bench`): every `cargo bench --bench fanout` command of the README and of
//! docs/benchmark.md must parse, and a small matrix and sustain search, debug-built,
//! must deliver every buffer in order to every client and write its CSV. A small
//! overload case (20 clients, 2 stalled, rs with one and two IO threads, C and raw)
//! must remove exactly the stalled clients and deliver every kept client's stream
//! whole; the drain must catch a skipped buffer; a property rsmultifdsink does not
//! have must be refused before any run.

use crate::args::Opts;
use crate::csv::Csv;
use crate::drain::check_streams;
use crate::element::check_rs_props;
use crate::orchestrate::{Output, orchestrate};
use crate::report::Row;
use crate::spec::write_stamp;

const DOCS: [(&str, &str); 2] = [
    ("README.md", include_str!("../../README.md")),
    ("docs/benchmark.md", include_str!("../../docs/benchmark.md")),
];

const COMMAND: &str = "cargo bench --bench fanout --";

/// The arguments of every fanout command in the documents' shell blocks (a line
/// ending in `\` goes on on the next one; `#` starts a comment).
fn documented_commands() -> Vec<(&'static str, Vec<String>)> {
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
            if !in_block || (command.is_empty() && !line.starts_with(COMMAND)) {
                continue;
            }
            command.push_str(line.trim_end_matches('\\'));
            command.push(' ');
            if !line.ends_with('\\') {
                let args = command[COMMAND.len()..].split_whitespace();
                found.push((name, args.map(String::from).collect()));
                command.clear();
            }
        }
    }
    found
}

/// Runs the orchestrator on `args`; returns its rows and the CSV's lines.
fn run(args: &[&str], csv: &std::path::Path) -> (Vec<Row>, usize) {
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.extend(["--csv".into(), csv.display().to_string()]);
    let o = Opts::parse(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let mut out = Output {
        csv: Csv::open(o.csv.as_deref()),
        rows: Vec::new(),
    };
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

/// `--rs-prop` and `--io-threads` are checked on the element: known properties with
/// valid values pass, anything else is refused with a message.
fn prop_check_problems() -> Vec<String> {
    let prop = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    let mut failures = Vec::new();
    if let Err(e) = check_rs_props(&[1, 2], &[false, true], &prop("recover-policy", "keyframe")) {
        failures.push(format!("valid properties refused: {e}"));
    }
    for (io, props) in [
        (vec![], prop("no-such-property", "1")),
        (vec![], prop("recover-policy", "no-such-policy")),
        (vec![], prop("num-handles", "1")),
        (vec![100_000], vec![]),
    ] {
        if check_rs_props(&io, &[], &props).is_ok() {
            failures.push(format!("accepted: io-threads {io:?}, {props:?}"));
        }
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
    let cases: [&[&str]; 3] = [
        &[
            "--transport",
            "unix",
            "--bitrate",
            "max",
            "--elements",
            "rs,c,raw,raw-uring",
            "--io-uring",
            "false,true",
        ],
        &["--transport", "tcp", "--bitrate", "1M"],
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
    }
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
