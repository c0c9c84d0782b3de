// SPDX-License-Identifier: MPL-2.0

//! What `cargo test --all-targets` runs (it starts every bench target without
//! `--bench`): every `cargo bench --bench fanout` command of the README and of
//! docs/benchmark.md must parse, and a small matrix and sustain search, debug-built,
//! must deliver every buffer in order to every client and write its CSV.

use crate::args::Opts;
use crate::csv::Csv;
use crate::orchestrate::{Output, orchestrate};
use crate::report::Row;

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

/// What is wrong with a run that had to deliver everything.
fn problems(r: &Row) -> Option<String> {
    let fine = r.status == "ok"
        && r.flushed
        && r.gaps == 0
        && r.kicked == 0
        && r.lost == 0
        && r.delivered_ratio >= 0.999;
    (!fine).then(|| format!("{r:?}"))
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
        &["--transport", "unix", "--bitrate", "max"],
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
    let mut runs = 0;
    for (i, case) in cases.iter().enumerate() {
        let args: Vec<&str> = short.iter().chain(case.iter()).copied().collect();
        let (rows, csv_lines) = run(&args, &dir.join(format!("{i}.csv")));
        runs += rows.len();
        // Header, one line per run, and one per sustain result.
        let sustain_results = usize::from(case.contains(&"sustain"));
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
        "fanout self-test: {} documented commands parse; {runs} runs delivered everything",
        commands.len()
    );
}
