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

/// One column of the tables: an element, and for rsmultifdsink a named set of
/// properties (`--rs-variant NAME:...`, `--io-threads` as `rs-io1`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variant {
    pub elem: Elem,
    /// The column's name: the element's (`rs`, `c`, `raw`) or the variant's.
    pub label: String,
    /// rsmultifdsink properties of this variant, set after `--rs-prop`'s.
    pub props: Vec<(String, String)>,
}

impl Variant {
    /// The element as it is, named after it.
    pub fn plain(elem: Elem) -> Variant {
        Variant {
            elem,
            label: elem.name().to_string(),
            props: Vec::new(),
        }
    }

    /// rsmultifdsink named `label`, with `props`.
    pub fn rs(label: &str, props: Vec<(String, String)>) -> Variant {
        Variant {
            elem: Elem::Rs,
            label: label.to_string(),
            props,
        }
    }

    /// The value this variant gives a property, if it sets it.
    pub fn prop(&self, name: &str) -> Option<&str> {
        self.props
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum)]
pub enum Transport {
    Unix,
    Tcp,
    /// TCP with TLS: each accepted connection wrapped by `tls::Terminator` in the
    /// sink process (the element writes to its plaintext end); the drain decrypts.
    Tls,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Unix => "unix",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
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
    /// The column this run belongs to (`rs`, `c`, `raw` or an rs variant's name).
    pub label: String,
    /// rsmultifdsink properties (`--rs-prop`, then the variant's), set in this order
    /// after the common ones.
    pub rs_props: Vec<(String, String)>,
}

impl Spec {
    /// The rsmultifdsink properties as the CSV's `rs_props` column writes them:
    /// `name=value`, `;` between them, in the order they are set.
    pub fn rs_props_column(&self) -> String {
        self.rs_props
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    }

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
            format!("label={}", self.label),
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
            label: get("label").to_string(),
            rs_props: args
                .iter()
                .filter_map(|a| {
                    let (k, v) = a.strip_prefix(RS_PROP)?.split_once('=')?;
                    Some((k.to_string(), v.to_string()))
                })
                .collect(),
        }
    }

    /// Seconds between two buffers when paced.
    pub fn interval(&self) -> Option<f64> {
        self.bitrate.map(|b| self.size as f64 * 8.0 / b as f64)
    }

    /// Buffers per second per client when paced.
    pub fn rate(&self) -> Option<f64> {
        self.interval().map(|i| 1.0 / i)
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
