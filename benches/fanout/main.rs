// SPDX-License-Identifier: MPL-2.0

//! fanout: `rsmultifdsink` against GStreamer's C `multifdsink` (and a plain
//! `writev` fan-out without GStreamer, the floor) on the same workload, in one run.
//!
//! ```text
//! cargo bench --bench fanout -- [options]
//! cargo bench --bench fanout -- --clients 1,100,1000 --transport unix,tcp \
//!     --size 4K --bitrate max,2M --reps 3 --csv bench.csv
//! cargo bench --bench fanout -- --mode sustain --transport unix
//! cargo bench --bench fanout -- --mode raw --clients 1000
//! cargo bench --bench fanout -- --mode overload --rs-prop overload-policy=drop-buffers
//! cargo bench --bench fanout -- --elements rs,c --io-threads 1,2 --stalled 50
//! cargo bench --bench fanout -- --clients 1000 --rate 250 \
//!     --rs-variant bt20:batch-time=20000000
//! cargo bench --bench fanout -- --mode targets
//! ```
//!
//! `--help` lists every option. `cargo bench` passes `--bench`; without it (as
//! `cargo test --all-targets` runs every target) the program tests itself instead:
//! see `selftest`. How the figures are made (see also docs/benchmark.md):
//!
//! * Every run is three processes, one after the other for each element (never two
//!   sinks at once): this orchestrator, a **sink process** (`__sink`: one producer thread
//!   pushing fixed-size buffers through a src pad of its own into the element, or the raw
//!   writev loop) and a **drain process** (`__drain`) that owns the other ends of the
//!   client sockets. UNIX socketpairs are handed to the drain with SCM_RIGHTS; TCP
//!   clients connect to 127.0.0.1 from the drain. The drain reads with epoll, finds the
//!   buffer boundaries and takes each buffer's stamp (sequence number, CLOCK_MONOTONIC
//!   send time taken just before `pad.push`) to measure push-to-receive latency.
//! * CPU is `getrusage(RUSAGE_SELF)` of the sink process (user + system, every thread:
//!   producer, streaming, IO) from the first measured push until everything pushed was
//!   received (or stalled), divided by the bytes the drain received for measured
//!   buffers. The drain's CPU is not counted (it is reported in the CSV).
//! * Both elements get the same settings: `sync=false`, `unit-format=buffers`,
//!   `units-max` = max lag (paced) or a large bound (unpaced) or `--units-max`,
//!   everything else default (rsmultifdsink: plus `--rs-prop`, then the column's own
//!   properties: `--io-threads` and `--rs-variant` make named rs columns).
//! * `--stalled N`: N clients never read; the sink process counts the stalled and the
//!   other clients the element removes, and the drain checks that every other
//!   client's stream is whole and gap-free up to the last buffer pushed.

#[path = "../common/system.rs"]
mod system;
/// The tests' certificate maker and TLS client configuration, for `--transport tls`.
#[path = "../../tests/common/tls.rs"]
#[allow(dead_code)]
mod test_pki;

mod args;
mod csv;
mod drain;
mod element;
mod hist;
mod orchestrate;
mod os;
mod raw;
mod report;
mod selftest;
mod sink;
mod spec;
mod targets;
mod units;

use args::Opts;
use orchestrate::{Output, orchestrate};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("__sink") => sink::main(&args[1..]),
        Some("__drain") => drain::main(&args[1..]),
        _ if args.iter().any(|a| a == "--bench") => {
            let args: Vec<String> = args.into_iter().filter(|a| a != "--bench").collect();
            let o = Opts::parse(&args).unwrap_or_else(|e| e.exit());
            let mut out = Output::new(csv::Csv::open(o.csv.as_deref()));
            orchestrate(&o, &mut out);
        }
        _ => selftest::main(),
    }
}
