// SPDX-License-Identifier: MPL-2.0

//! stress: `rsmultifdsink` under churn, faults and concurrent API calls, then under
//! overload; see `scenario` for what it does and checks.
//!
//! ```text
//! cargo bench --bench stress                         # short form (1,000 clients)
//! cargo bench --bench stress -- --phase overload      # only the overload phase
//! cargo bench --bench stress -- --long               # long form: 10,000 clients
//! cargo bench --bench stress -- --seed 7 --clients 2000
//! cargo bench --bench stress -- --long --phase overload
//! ```
//!
//! It prints its figures, one per line, then one line per check and `stress: N
//! passed, M failed`; the exit code is 1 if a check failed. The test suite runs the
//! short form as `tests/stress.rs`. `cargo bench` passes `--bench`; without it (as
//! `cargo test --all-targets` runs every target) the program only checks that the
//! README's stress commands parse.

mod scenario;

use clap::{Parser, ValueEnum};

use scenario::{Options, Plan};

/// Which phases run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Phases {
    /// The churn phase, then the overload phase
    All,
    /// Clients connecting and leaving, faults, API calls and state cycles
    Churn,
    /// A producer far faster than the IO side, with stalled and slow clients
    Overload,
}

/// rsmultifdsink under churn, faults and concurrent API calls, then under overload
#[derive(Debug, Parser)]
#[command(
    name = "stress",
    override_usage = "cargo bench --bench stress -- [OPTIONS]"
)]
struct Args {
    /// The short form: 1,000 clients; overload with 200 clients (5 stalled, 10 slow)
    /// for 2 s (the default)
    #[arg(long, overrides_with = "long")]
    short: bool,
    /// The long form: 10,000 clients, 300 at once, more state cycles; overload with
    /// 5,000 clients (50 stalled, 200 slow) for 15 s
    #[arg(long, overrides_with = "short")]
    long: bool,
    /// Which phases to run
    #[arg(long, value_enum, default_value = "all")]
    phase: Phases,
    /// Seed of every random choice
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// New clients to add in the churn phase (instead of the form's number)
    #[arg(long, value_name = "N")]
    clients: Option<u64>,
    /// The overload phase's io-threads (default 1)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    io_threads: Option<u32>,
}

impl Args {
    fn parse_from_cli(args: &[String]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("stress").chain(args.iter().map(String::as_str)))
    }

    fn options(&self) -> Options {
        let short = Options::short();
        let mut o = if self.long && !self.short {
            Options {
                form: "long",
                connects: 10_000,
                max_live: 300,
                full_cycles: 8,
                partial_cycles: 6,
                op_pause_ms: 14,
                overload: Some(Plan {
                    clients: 5000,
                    stalled: 50,
                    slow: 200,
                    seconds: 15,
                    io_threads: 1,
                }),
                ..short
            }
        } else {
            short
        };
        o.seed = self.seed.unwrap_or(o.seed);
        o.connects = self.clients.unwrap_or(o.connects);
        o.churn = self.phase != Phases::Overload;
        if self.phase == Phases::Churn {
            o.overload = None;
        }
        if let (Some(plan), Some(n)) = (o.overload.as_mut(), self.io_threads) {
            plan.io_threads = n;
        }
        o
    }
}

/// Every `cargo bench --bench stress` command of the README must parse.
fn selftest() {
    const COMMAND: &str = "cargo bench --bench stress";
    let readme = include_str!("../../README.md");
    let commands: Vec<&str> = readme
        .lines()
        .filter_map(|l| l.trim().strip_prefix(COMMAND))
        .map(|rest| rest.split(" #").next().unwrap_or(""))
        .collect();
    let mut failed = commands.is_empty();
    for rest in &commands {
        let args: Vec<String> = rest
            .split_whitespace()
            .skip_while(|a| *a == "--")
            .map(String::from)
            .collect();
        if let Err(e) = Args::parse_from_cli(&args) {
            eprintln!("stress self-test: README: {COMMAND}{rest}: {e}");
            failed = true;
        }
    }
    if failed {
        eprintln!("stress self-test: the README's stress commands do not all parse");
        std::process::exit(1);
    }
    println!(
        "stress self-test: {} README commands parse (the scenario runs as tests/stress.rs)",
        commands.len()
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        return selftest();
    }
    let args: Vec<String> = args.into_iter().filter(|a| a != "--bench").collect();
    let opts = Args::parse_from_cli(&args)
        .unwrap_or_else(|e| e.exit())
        .options();
    let report = scenario::run(&opts);
    for line in &report.lines {
        println!("{line}");
    }
    std::process::exit(if report.failed == 0 { 0 } else { 1 });
}
