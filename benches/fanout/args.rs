// SPDX-License-Identifier: MPL-2.0

//! The orchestrator's options.

use clap::{Parser, ValueEnum};

use crate::spec::{Elem, Transport};
use crate::system::raise_fd_limit;
use crate::units::{parse_bitrate, parse_size};

/// Fds a process needs besides the clients (stdio, epoll, GStreamer, ...).
pub const FD_RESERVE: usize = 300;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Every case of the options, all elements
    Matrix,
    /// The highest client count without a kick at each --sustain-bitrates
    Sustain,
    /// The matrix with only the raw writev floor
    Raw,
    /// Matrix, then sustain
    All,
}

/// rsmultifdsink vs C multifdsink (vs a raw writev loop), loopback only
#[derive(Debug, Clone, Parser)]
#[command(
    name = "fanout",
    override_usage = "cargo bench --bench fanout -- [OPTIONS]",
    after_help = "Each element runs alone in a sink process of its own, with the clients drained \
                  by another process; docs/benchmark.md explains every figure."
)]
pub struct Opts {
    #[arg(long, value_enum, default_value_t = Mode::Matrix)]
    pub mode: Mode,
    /// Elements to run [default: rs,c,raw; sustain: rs,c]
    #[arg(long, alias = "element", value_enum, value_delimiter = ',')]
    pub elements: Vec<Elem>,
    /// UNIX socketpairs and/or TCP over 127.0.0.1
    #[arg(
        long,
        alias = "transports",
        value_enum,
        value_delimiter = ',',
        default_value = "unix,tcp"
    )]
    pub transport: Vec<Transport>,
    /// Client counts (at most the fd limit - 300)
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000,5000,10000")]
    pub clients: Vec<usize>,
    /// Buffer sizes, 64 bytes to 64 KiB and more
    #[arg(long, alias = "sizes", value_delimiter = ',', default_value = "4K",
          value_parser = parse_buffer_size)]
    pub size: Vec<usize>,
    /// Per-client stream bitrate (paced), or max (unpaced, limited by a window of
    /// in-flight bytes)
    #[arg(long, alias = "bitrates", value_delimiter = ',', default_value = "max,2M",
          value_parser = parse_bitrate)]
    pub bitrate: Vec<Option<u64>>,
    /// Measured seconds per run
    #[arg(long, default_value_t = 5.0, value_parser = parse_positive)]
    pub duration: f64,
    /// Seconds pushed before measuring
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Repetitions; tables show medians
    #[arg(long, default_value_t = 1, value_parser = parse_reps)]
    pub reps: usize,
    /// Paced runs: units-max = this many seconds of buffers (at least 4): a client
    /// further behind is kicked
    #[arg(long, default_value_t = 1.0)]
    pub max_lag: f64,
    /// Unpaced: in-flight bytes per client before the producer waits (capped by
    /// --window-total / clients)
    #[arg(long, default_value = "4M", value_parser = parse_size)]
    pub window: usize,
    /// Unpaced: in-flight bytes over all clients
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub window_total: usize,
    /// Bitrates searched by --mode sustain
    #[arg(long, value_delimiter = ',', default_value = "256k,2M",
          value_parser = parse_paced_bitrate)]
    pub sustain_bitrates: Vec<u64>,
    /// First client count tried (doubles, then bisects)
    #[arg(long, default_value_t = 500)]
    pub sustain_start: usize,
    /// Upper bound [default: the fd limit - 300]
    #[arg(long, value_name = "N", default_value_t = client_limit(), hide_default_value = true)]
    pub sustain_max: usize,
    /// Stop bisecting when the bracket is this narrow
    #[arg(long, default_value_t = 0.05)]
    pub sustain_resolution: f64,
    /// Also write every run as CSV (scripts/bench-plot.py)
    #[arg(long, value_name = "PATH")]
    pub csv: Option<String>,
    /// Before each run, wait up to this many seconds for the machine to be idle
    /// (other processes under 10 % of the CPUs); every run records the CPU other
    /// processes used meanwhile (foreign%)
    #[arg(long, default_value_t = 0.0)]
    pub wait_idle: f64,
}

fn parse_buffer_size(s: &str) -> Result<usize, String> {
    let size = parse_size(s)?;
    if size < 64 {
        return Err("buffer size must be at least 64 bytes (the stamp)".into());
    }
    Ok(size)
}

fn parse_paced_bitrate(s: &str) -> Result<u64, String> {
    parse_bitrate(s)?.ok_or_else(|| "sustain needs a paced bitrate".to_string())
}

fn parse_reps(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{s:?} is not a positive count")),
    }
}

fn parse_positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a positive number")),
    }
}

/// The client count a process can hold.
pub fn client_limit() -> usize {
    raise_fd_limit(u64::MAX).saturating_sub(FD_RESERVE)
}

impl Opts {
    /// The options from the command line (without the program name), with the
    /// defaults that depend on the mode and the fd limit filled in.
    pub fn parse(args: &[String]) -> Result<Opts, clap::Error> {
        let mut o =
            Opts::try_parse_from(std::iter::once("fanout").chain(args.iter().map(String::as_str)))?;
        if o.mode == Mode::Raw {
            o.elements = vec![Elem::Raw];
        } else if o.elements.is_empty() {
            o.elements = match o.mode {
                Mode::Sustain => vec![Elem::Rs, Elem::C],
                _ => vec![Elem::Rs, Elem::C, Elem::Raw],
            };
        }
        o.sustain_max = o.sustain_max.min(client_limit()).max(1);
        Ok(o)
    }
}
