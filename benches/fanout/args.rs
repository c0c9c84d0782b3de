// SPDX-License-Identifier: MPL-2.0

//! The orchestrator's options.

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, ValueEnum};

use crate::spec::{Elem, Transport, Variant};
use crate::system::raise_fd_limit;
use crate::targets;
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
    /// The overload scenario of issue 9: 5000 unix clients asked for 2000 buffers/s
    /// each, units-max=200, 50 then 0 stalled, rs and C, medians of 3 (each of these
    /// can be changed by its option)
    Overload,
    /// The targets of issue 10 side by side with C, medians of 3, each target met or
    /// missed (see targets.rs: the cases are fixed; variants and --target choose)
    Targets,
}

/// The overload scenario's buffers per second asked of every client.
pub const OVERLOAD_BUFFERS_PER_S: u64 = 2000;

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
    /// UNIX socketpairs, TCP over 127.0.0.1 and/or TLS over it (tls: each connection
    /// through the TLS terminator, decrypted by the drain)
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
    /// Paced in buffers per second per client (of each --size), or max: instead of
    /// --bitrate, e.g. --rate 250 for 4 KiB buffers is 8.192 Mbit/s
    #[arg(long, alias = "rates", value_delimiter = ',', conflicts_with = "bitrate",
          value_parser = parse_rate)]
    pub rate: Vec<Option<f64>>,
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
    /// Clients that never read (spread over the clients; their sockets fill up), per
    /// case [overload: 50,0]
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub stalled: Vec<usize>,
    /// rsmultifdsink's io-threads; a list runs one rs variant each (rs-io1, rs-io2)
    /// instead of rs [default: the element's]
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..))]
    pub io_threads: Vec<u32>,
    /// units-max (buffers) for every element, instead of the one derived from
    /// --max-lag or --window [overload: 200]
    #[arg(long, value_name = "BUFFERS", value_parser = clap::value_parser!(i64).range(1..))]
    pub units_max: Option<i64>,
    /// Sets a property of rsmultifdsink only (after the common settings), e.g.
    /// overload-policy=drop-buffers; repeatable. An unknown property or value stops
    /// the benchmark before any run
    #[arg(long, alias = "prop", value_name = "NAME=VALUE", value_parser = parse_prop)]
    pub rs_prop: Vec<(String, String)>,
    /// Runs rsmultifdsink once more as its own column NAME with these properties (set
    /// after --rs-prop's), e.g. bt20:batch-time=20000000; repeatable. Checked like
    /// --rs-prop. In --mode targets a variant named as a default one replaces it
    #[arg(long, value_name = "NAME:PROP=VALUE[,...]", value_parser = parse_variant)]
    pub rs_variant: Vec<Variant>,
    /// --mode targets: only these targets (names as the mode lists them) [default: all]
    #[arg(long, alias = "targets", value_delimiter = ',', value_name = "NAME")]
    pub target: Vec<String>,
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

fn parse_prop(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !s.contains(char::is_whitespace) => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(format!("{s:?} is not NAME=VALUE (without spaces)")),
    }
}

/// Buffers per second, or max (unpaced).
fn parse_rate(s: &str) -> Result<Option<f64>, String> {
    if s == "max" {
        return Ok(None);
    }
    match s.trim_end_matches("/s").parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(Some(v)),
        _ => Err(format!(
            "{s:?} is not a positive number of buffers per second, or max"
        )),
    }
}

/// `NAME:PROP=VALUE[,PROP=VALUE...]`: a named rsmultifdsink variant.
fn parse_variant(s: &str) -> Result<Variant, String> {
    let (name, props) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not NAME:PROP=VALUE[,PROP=VALUE...]"))?;
    let name_ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !name_ok {
        return Err(format!(
            "variant name {name:?}: use letters, digits, '-', '_' or '.'"
        ));
    }
    // The plot tells the floors (raw, raw-...) from rs columns by name.
    if Elem::from_str(name, true).is_ok() || name.starts_with("raw") {
        return Err(format!(
            "variant name {name:?} is an element's name or starts with raw"
        ));
    }
    let props = props
        .split(',')
        .map(parse_prop)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Variant::rs(name, props))
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
        let matches = Opts::command().try_get_matches_from(
            std::iter::once("fanout").chain(args.iter().map(String::as_str)),
        )?;
        let mut o = Opts::from_arg_matches(&matches)?;
        if o.mode == Mode::Overload {
            let default = |id: &str| matches.value_source(id) != Some(ValueSource::CommandLine);
            if default("elements") {
                o.elements = vec![Elem::Rs, Elem::C];
            }
            if default("transport") {
                o.transport = vec![Transport::Unix];
            }
            if default("clients") {
                o.clients = vec![5000];
            }
            if default("bitrate") {
                o.bitrate = vec![Some(OVERLOAD_BUFFERS_PER_S * o.size[0] as u64 * 8)];
            }
            if default("units_max") {
                o.units_max = Some(200);
            }
            if default("stalled") {
                o.stalled = vec![50, 0];
            }
            if default("reps") {
                o.reps = 3;
            }
        }
        let refuse = |msg: String| Err(Opts::command().error(ErrorKind::ArgumentConflict, msg));
        if o.mode == Mode::Targets {
            let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
            let fixed = [
                "transport",
                "clients",
                "size",
                "bitrate",
                "rate",
                "stalled",
                "sustain_bitrates",
            ];
            if let Some(id) = fixed.iter().find(|id| given(id)) {
                return refuse(format!(
                    "--mode targets runs the fixed cases of issue 10: --{} is not used",
                    id.replace('_', "-")
                ));
            }
            if !given("reps") {
                o.reps = 3;
            }
            if o.elements.is_empty() {
                o.elements = vec![Elem::Rs, Elem::C];
            }
            if !o.elements.contains(&Elem::C) {
                return refuse("--mode targets compares with C: --elements must include c".into());
            }
            if let Some(t) = o.target.iter().find(|t| !targets::is_target(t)) {
                return refuse(format!(
                    "no target {t:?}; the targets are {}",
                    targets::names().join(", ")
                ));
            }
            targets::add_default_variants(&mut o.rs_variant);
        } else if !o.target.is_empty() {
            return refuse("--target is for --mode targets".into());
        }
        if o.mode == Mode::Raw {
            if !o.rs_variant.is_empty() {
                return refuse("--mode raw runs only the raw floor: no --rs-variant".into());
            }
            o.elements = vec![Elem::Raw];
        } else if o.elements.is_empty() {
            o.elements = match o.mode {
                Mode::Sustain => vec![Elem::Rs, Elem::C],
                _ => vec![Elem::Rs, Elem::C, Elem::Raw],
            };
        }
        let labels: Vec<String> = o.variants().into_iter().map(|v| v.label).collect();
        if let Some(dup) = labels
            .iter()
            .enumerate()
            .find_map(|(i, l)| labels[..i].contains(l).then_some(l))
        {
            return refuse(format!("two columns named {dup:?}"));
        }
        o.sustain_max = o.sustain_max.min(client_limit()).max(1);
        Ok(o)
    }

    /// The columns every case runs, in order: each element of --elements (rs once per
    /// --io-threads value, as rs-io1, rs-io2, ... when given), then each --rs-variant.
    pub fn variants(&self) -> Vec<Variant> {
        let mut v = Vec::new();
        for &elem in &self.elements {
            if elem == Elem::Rs && !self.io_threads.is_empty() {
                v.extend(self.io_threads.iter().map(|n| {
                    let props = vec![("io-threads".to_string(), n.to_string())];
                    Variant::rs(&format!("rs-io{n}"), props)
                }));
            } else {
                v.push(Variant::plain(elem));
            }
        }
        v.extend(self.rs_variant.iter().cloned());
        v
    }

    /// The paced bitrates (None: unpaced) of the cases with buffers of `size`: --rate
    /// in buffers per second when given, else --bitrate.
    pub fn bitrates(&self, size: usize) -> Vec<Option<u64>> {
        if self.rate.is_empty() {
            return self.bitrate.clone();
        }
        self.rate
            .iter()
            .map(|r| r.map(|r| bitrate_of(r, size)))
            .collect()
    }
}

/// The bitrate of `rate` buffers of `size` bytes per second.
pub fn bitrate_of(rate: f64, size: usize) -> u64 {
    (rate * size as f64 * 8.0).round().max(1.0) as u64
}
