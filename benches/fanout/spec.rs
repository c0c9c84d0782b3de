// SPDX-License-Identifier: MPL-2.0

//! What one run does, as the orchestrator passes it to the sink and drain processes
//! (`key=value` arguments), and the stamp at the start of every buffer.

use std::collections::BTreeMap;

use clap::ValueEnum;

use crate::os::mono_ns;

/// First bytes of every buffer: magic, sequence number, send time (CLOCK_MONOTONIC
/// ns), flags (bit 0: inside the measured window).
pub const MAGIC: &[u8; 8] = b"FANOUTB1";
pub const STAMP: usize = 32;
pub const FLAG_MEASURED: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum)]
pub enum Elem {
    #[value(alias = "rsmultifdsink")]
    Rs,
    #[value(alias = "multifdsink")]
    C,
    Raw,
    /// The raw floor with each batch of writes submitted through io_uring
    RawUring,
}

impl Elem {
    pub fn name(self) -> &'static str {
        match self {
            Elem::Rs => "rs",
            Elem::C => "c",
            Elem::Raw => "raw",
            Elem::RawUring => "raw-uring",
        }
    }
}

/// An element with the IO threads it runs with and whether it writes through
/// io_uring (rs only; None: the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    pub elem: Elem,
    pub io_threads: Option<u32>,
    pub io_uring: Option<bool>,
}

impl Variant {
    /// As the tables name it: `rs-io2` when `--io-threads` chose the IO threads,
    /// `rs-uring` (`rs-io2-uring`) with io-uring on.
    pub fn label(self) -> String {
        let mut label = self.elem.name().to_string();
        if self.elem == Elem::Rs {
            if let Some(n) = self.io_threads {
                label += &format!("-io{n}");
            }
            if self.io_uring == Some(true) {
                label += "-uring";
            }
        }
        label
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum)]
pub enum Transport {
    Unix,
    Tcp,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Unix => "unix",
            Transport::Tcp => "tcp",
        }
    }
}

/// One of our own enums from a `key=value` argument.
pub fn parse_enum<T: ValueEnum>(s: &str) -> T {
    T::from_str(s, false).unwrap_or_else(|e| panic!("bad value {s:?}: {e}"))
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub elem: Elem,
    pub transport: Transport,
    pub clients: usize,
    pub size: usize,
    /// Bits per second per client stream; None = unpaced.
    pub bitrate: Option<u64>,
    pub warmup: f64,
    pub duration: f64,
    pub units_max: i64,
    /// Unpaced: in-flight bytes per client before the producer waits.
    pub window: u64,
    /// The sink process gives up after this many seconds.
    pub deadline: f64,
    /// Clients whose reader never reads (see `is_stalled`).
    pub stalled: usize,
    /// rsmultifdsink's `io-threads`; None leaves the element's default.
    pub io_threads: Option<u32>,
    /// rsmultifdsink's `io-uring`; None leaves the element's default.
    pub io_uring: Option<bool>,
    /// More rsmultifdsink properties (`--rs-prop`), set after the common ones.
    pub rs_props: Vec<(String, String)>,
}

impl Spec {
    pub fn to_args(&self) -> Vec<String> {
        vec![
            format!("elem={}", self.elem.name()),
            format!("transport={}", self.transport.name()),
            format!("clients={}", self.clients),
            format!("size={}", self.size),
            format!("bitrate={}", self.bitrate.unwrap_or(0)),
            format!("warmup={}", self.warmup),
            format!("duration={}", self.duration),
            format!("units_max={}", self.units_max),
            format!("window={}", self.window),
            format!("deadline={}", self.deadline),
            format!("stalled={}", self.stalled),
            format!("io_threads={}", self.io_threads.unwrap_or(0)),
            format!(
                "io_uring={}",
                self.io_uring
                    .map_or("default".to_string(), |b| b.to_string())
            ),
        ]
        .into_iter()
        .chain(
            self.rs_props
                .iter()
                .map(|(k, v)| format!("{RS_PROP}{k}={v}")),
        )
        .collect()
    }

    pub fn from_args(args: &[String]) -> Spec {
        let kv = parse_kv(&args.join(" "));
        let get = |k: &str| kv.get(k).unwrap_or_else(|| panic!("missing {k}")).as_str();
        Spec {
            elem: parse_enum(get("elem")),
            transport: parse_enum(get("transport")),
            clients: get("clients").parse().unwrap(),
            size: get("size").parse().unwrap(),
            bitrate: Some(get("bitrate").parse::<u64>().unwrap()).filter(|&b| b > 0),
            warmup: get("warmup").parse().unwrap(),
            duration: get("duration").parse().unwrap(),
            units_max: get("units_max").parse().unwrap(),
            window: get("window").parse().unwrap(),
            deadline: get("deadline").parse().unwrap(),
            stalled: get("stalled").parse().unwrap(),
            io_threads: Some(get("io_threads").parse::<u32>().unwrap()).filter(|&n| n > 0),
            io_uring: get("io_uring").parse::<bool>().ok(),
            rs_props: kv
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(RS_PROP)?.to_string(), v.clone())))
                .collect(),
        }
    }

    pub fn label(&self) -> String {
        Variant {
            elem: self.elem,
            io_threads: self.io_threads,
            io_uring: self.io_uring,
        }
        .label()
    }

    /// Seconds between two buffers when paced.
    pub fn interval(&self) -> Option<f64> {
        self.bitrate.map(|b| self.size as f64 * 8.0 / b as f64)
    }
}

/// Prefix of the `key=value` arguments that carry `--rs-prop` properties.
const RS_PROP: &str = "rsprop.";

/// Whether client `i` of `n` never reads: `stalled` of them, spread evenly over the
/// clients (the same answer in the sink and the drain process).
pub fn is_stalled(i: usize, n: usize, stalled: usize) -> bool {
    // i * stalled mod n takes each multiple of gcd(stalled, n) below n gcd times,
    // so exactly `stalled` indices land under `stalled`.
    stalled > 0 && (i * stalled) % n < stalled
}

/// `k=v k=v` to a map.
pub fn parse_kv(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Stamps a buffer; returns the send time written into it.
pub fn write_stamp(buf: &mut [u8], seq: u64, flags: u64) -> u64 {
    buf[0..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    buf[24..32].copy_from_slice(&flags.to_le_bytes());
    let now = mono_ns();
    buf[16..24].copy_from_slice(&now.to_le_bytes());
    now
}
