// SPDX-License-Identifier: MPL-2.0

//! Sizes and bitrates as the options take them and the tables show them.

/// "4096", "4K", "4KiB", "64k" -> bytes (K = 1024).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.trim_end_matches("ib").trim_end_matches('b');
    let (num, mul) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1024),
        Some('m') => (&t[..t.len() - 1], 1024 * 1024),
        _ => (t, 1),
    };
    num.parse::<usize>()
        .map(|n| n * mul)
        .map_err(|_| format!("bad size {s:?}"))
}

/// "2M", "256k", "2000000", "max" -> bits per second (k = 1000); None = unpaced.
pub fn parse_bitrate(s: &str) -> Result<Option<u64>, String> {
    let t = s.trim().to_ascii_lowercase();
    if t == "max" || t == "0" {
        return Ok(None);
    }
    let t = t.trim_end_matches("bps").trim_end_matches("bit/s");
    let (num, mul) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1e3),
        Some('m') => (&t[..t.len() - 1], 1e6),
        Some('g') => (&t[..t.len() - 1], 1e9),
        _ => (t, 1.0),
    };
    num.parse::<f64>()
        .map(|n| Some((n * mul) as u64))
        .map_err(|_| format!("bad bitrate {s:?}"))
}

pub fn fmt_bitrate(b: Option<u64>) -> String {
    match b {
        None => "max".into(),
        Some(b) if b >= 1_000_000 && b % 1_000_000 == 0 => format!("{}M", b / 1_000_000),
        Some(b) if b >= 1_000 && b % 1_000 == 0 => format!("{}k", b / 1_000),
        // Paced by --rate: 3.2768M (the shortest exact decimal).
        Some(b) if b >= 1_000_000 => format!("{}M", b as f64 / 1e6),
        Some(b) if b >= 1_000 => format!("{}k", b as f64 / 1e3),
        Some(b) => format!("{b}"),
    }
}

pub fn fmt_size(s: usize) -> String {
    if s >= 1024 && s.is_multiple_of(1024) {
        format!("{}KiB", s / 1024)
    } else {
        format!("{s}B")
    }
}

/// Buffers per second as the tables show them: `250`, `8`, `30.52`.
pub fn fmt_rate(rate: f64) -> String {
    format!("{}", (rate * 100.0).round() / 100.0)
}

/// A paced stream as the tables show it: the bitrate and the buffers per second of
/// `size` bytes (`8192k, 250/s`); `max` unpaced.
pub fn fmt_pace(b: Option<u64>, size: usize) -> String {
    match b {
        None => "max".into(),
        Some(bits) => format!(
            "{}, {}/s",
            fmt_bitrate(b),
            fmt_rate(bits as f64 / 8.0 / size as f64)
        ),
    }
}
