// SPDX-License-Identifier: MPL-2.0

//! Prometheus text exposition (format 0.0.4) of a server's figures.
//! `rstcpserversink` will answer its `metrics-path` with it (issue 11): the caller
//! gathers one [`MountFigures`] per mount served on the port and sends
//! [`exposition`]'s text with [`CONTENT_TYPE`].
//!
//! Each metric family is written once (its `# HELP` and `# TYPE`, then one series
//! per mount and label), as the format requires when several mounts share a port:
//! a family must not be split. Every series carries `mount="..."`.

use std::fmt::Write as _;

/// The Content-Type Prometheus expects for this format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// One mount's figures at the time of the scrape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountFigures {
    /// The mount's path, e.g. `/video`.
    pub mount: String,
    /// Clients being served now.
    pub clients: u64,
    /// Bytes written to clients since the start.
    pub bytes_served: u64,
    /// Clients removed since the start, by the status they had (`"closed"`,
    /// `"slow"`, `"error"`, ...): one series each.
    pub clients_removed: Vec<(&'static str, u64)>,
    /// Requests refused since the start, by the HTTP status code answered.
    pub requests_refused: Vec<(u16, u64)>,
    /// Buffers in the queue now.
    pub buffers_queued: u64,
    /// Bytes in the queue now.
    pub bytes_queued: u64,
}

/// The exposition of every mount's figures.
pub fn exposition(mounts: &[MountFigures]) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "rstcpserversink_clients",
        "gauge",
        "Clients being served.",
        mounts,
        |m| vec![(String::new(), m.clients)],
    );
    family(
        &mut out,
        "rstcpserversink_bytes_served_total",
        "counter",
        "Bytes written to clients.",
        mounts,
        |m| vec![(String::new(), m.bytes_served)],
    );
    family(
        &mut out,
        "rstcpserversink_clients_removed_total",
        "counter",
        "Clients removed, by the status they had when removed.",
        mounts,
        |m| {
            m.clients_removed
                .iter()
                .map(|(status, n)| (format!(",status=\"{}\"", escape(status)), *n))
                .collect()
        },
    );
    family(
        &mut out,
        "rstcpserversink_requests_refused_total",
        "counter",
        "Requests refused, by the HTTP status code answered.",
        mounts,
        |m| {
            m.requests_refused
                .iter()
                .map(|(code, n)| (format!(",code=\"{code}\""), *n))
                .collect()
        },
    );
    family(
        &mut out,
        "rstcpserversink_buffers_queued",
        "gauge",
        "Buffers held in the queue.",
        mounts,
        |m| vec![(String::new(), m.buffers_queued)],
    );
    family(
        &mut out,
        "rstcpserversink_bytes_queued",
        "gauge",
        "Bytes held in the queue.",
        mounts,
        |m| vec![(String::new(), m.bytes_queued)],
    );
    out
}

/// Writes one family: HELP, TYPE, then for each mount the series `series` gives
/// (each as the labels after `mount`, already formatted, and the value).
fn family(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    mounts: &[MountFigures],
    series: impl Fn(&MountFigures) -> Vec<(String, u64)>,
) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for m in mounts {
        let mount = escape(&m.mount);
        for (labels, value) in series(m) {
            let _ = writeln!(out, "{name}{{mount=\"{mount}\"{labels}}} {value}");
        }
    }
}

/// A label value as the format wants it: backslash, double quote and newline
/// escaped, everything else (UTF-8) as is.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::process::{Command, Stdio};

    fn two_mounts() -> Vec<MountFigures> {
        vec![
            MountFigures {
                mount: "/video".into(),
                clients: 3,
                bytes_served: 123_456_789_012,
                clients_removed: vec![("closed", 5), ("slow", 1)],
                requests_refused: vec![(404, 2), (503, 7)],
                buffers_queued: 40,
                bytes_queued: 1_048_576,
            },
            MountFigures {
                mount: "/a\"b\\c\nd".into(),
                clients: 0,
                bytes_served: 0,
                clients_removed: vec![],
                requests_refused: vec![(401, 1)],
                buffers_queued: 0,
                bytes_queued: 0,
            },
        ]
    }

    const EXPECTED: &str = r#"# HELP rstcpserversink_clients Clients being served.
# TYPE rstcpserversink_clients gauge
rstcpserversink_clients{mount="/video"} 3
rstcpserversink_clients{mount="/a\"b\\c\nd"} 0
# HELP rstcpserversink_bytes_served_total Bytes written to clients.
# TYPE rstcpserversink_bytes_served_total counter
rstcpserversink_bytes_served_total{mount="/video"} 123456789012
rstcpserversink_bytes_served_total{mount="/a\"b\\c\nd"} 0
# HELP rstcpserversink_clients_removed_total Clients removed, by the status they had when removed.
# TYPE rstcpserversink_clients_removed_total counter
rstcpserversink_clients_removed_total{mount="/video",status="closed"} 5
rstcpserversink_clients_removed_total{mount="/video",status="slow"} 1
# HELP rstcpserversink_requests_refused_total Requests refused, by the HTTP status code answered.
# TYPE rstcpserversink_requests_refused_total counter
rstcpserversink_requests_refused_total{mount="/video",code="404"} 2
rstcpserversink_requests_refused_total{mount="/video",code="503"} 7
rstcpserversink_requests_refused_total{mount="/a\"b\\c\nd",code="401"} 1
# HELP rstcpserversink_buffers_queued Buffers held in the queue.
# TYPE rstcpserversink_buffers_queued gauge
rstcpserversink_buffers_queued{mount="/video"} 40
rstcpserversink_buffers_queued{mount="/a\"b\\c\nd"} 0
# HELP rstcpserversink_bytes_queued Bytes held in the queue.
# TYPE rstcpserversink_bytes_queued gauge
rstcpserversink_bytes_queued{mount="/video"} 1048576
rstcpserversink_bytes_queued{mount="/a\"b\\c\nd"} 0
"#;

    #[test]
    fn writes_the_exact_exposition() {
        assert_eq!(exposition(&two_mounts()), EXPECTED);
    }

    /// Parses with the official Python client's parser and prints one line per
    /// family (name and type) and per sample (name, labels sorted, value).
    const PARSE: &str = r#"
import sys
try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    sys.exit(77)
for f in text_string_to_metric_families(sys.stdin.read()):
    print("family", f.name, f.type)
    for s in f.samples:
        labels = ",".join("%s=%r" % kv for kv in sorted(s.labels.items()))
        print(" ", s.name, labels, repr(s.value))
"#;

    #[test]
    fn prometheus_parser_reads_it() {
        // Debian's interpreter, which python3-prometheus-client installs for (a
        // pyenv python3 on PATH would not see it), as tests/python.rs; $PYTHON overrides.
        let python = std::env::var("PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
        let mut child = Command::new(python)
            .args(["-c", PARSE])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs");
        let text = exposition(&two_mounts());
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        if out.status.code() == Some(77) {
            eprintln!(
                "SKIPPED: python3's prometheus_client is missing \
                 (Debian: python3-prometheus-client, installed by scripts/setup-debian)"
            );
            return;
        }
        assert!(out.status.success(), "the parser refused:\n{text}");
        // The parser names counter families without `_total`, keeps it on samples,
        // and reads the escaped mount back to the original.
        let odd = r#"'/a"b\\c\nd'"#;
        let expected = format!(
            "family rstcpserversink_clients gauge
  rstcpserversink_clients mount='/video' 3.0
  rstcpserversink_clients mount={odd} 0.0
family rstcpserversink_bytes_served counter
  rstcpserversink_bytes_served_total mount='/video' 123456789012.0
  rstcpserversink_bytes_served_total mount={odd} 0.0
family rstcpserversink_clients_removed counter
  rstcpserversink_clients_removed_total mount='/video',status='closed' 5.0
  rstcpserversink_clients_removed_total mount='/video',status='slow' 1.0
family rstcpserversink_requests_refused counter
  rstcpserversink_requests_refused_total code='404',mount='/video' 2.0
  rstcpserversink_requests_refused_total code='503',mount='/video' 7.0
  rstcpserversink_requests_refused_total code='401',mount={odd} 1.0
family rstcpserversink_buffers_queued gauge
  rstcpserversink_buffers_queued mount='/video' 40.0
  rstcpserversink_buffers_queued mount={odd} 0.0
family rstcpserversink_bytes_queued gauge
  rstcpserversink_bytes_queued mount='/video' 1048576.0
  rstcpserversink_bytes_queued mount={odd} 0.0
"
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    }

    #[test]
    fn no_mounts_is_still_valid() {
        let text = exposition(&[]);
        assert_eq!(text.lines().count(), 12);
        assert!(text.lines().all(|l| l.starts_with("# ")));
    }
}
