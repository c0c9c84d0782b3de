//! The interface of each element against `gst-inspect-1.0` of the C element it
//! replaces (../shared/*-1.22.inspect.txt): every property with the same blurb, flags,
//! type, range and default, every signal with the same arguments. Allowed to differ:
//! our enums' GType names (`GstRs...`, so both plugins load in one process), the
//! default object name, and the properties the C element does not have (listed).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

/// The folder holding `libgstrsmultifdsink.so` for this build (target/<profile>).
fn plugin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// The lines under `heading` of an inspect text, grouped by the entry they describe
/// (an indented `name : ...`, `longer-name: ...` or `"name" : ...` line starts an
/// entry).
fn section(text: &str, heading: &str) -> BTreeMap<String, Vec<String>> {
    let mut entries: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let Some(start) = text.find(heading) else {
        return entries;
    };
    let mut current = None;
    for line in text[start..].lines().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(' ') {
            break;
        }
        let normalized = line
            .trim()
            .replace("GstRsMultiHandleSink", "GstMultiHandleSink");
        let starts_entry = line.starts_with("  ") && !line.starts_with("   ");
        // Names are padded to 20 columns: a longer one has no space before its ':'.
        if starts_entry && let Some((name, rest)) = normalized.split_once(':') {
            let name = name.trim().trim_matches('"').to_string();
            entries.insert(name.clone(), vec![rest.trim().to_string()]);
            current = Some(name);
        } else if let Some(name) = &current
            && !normalized.is_empty()
        {
            entries.get_mut(name).unwrap().push(normalized);
        }
    }
    entries
}

fn inspect(element: &str) -> String {
    let out = Command::new("gst-inspect-1.0")
        .arg(element)
        .env("GST_PLUGIN_PATH", plugin_dir())
        .output()
        .expect("gst-inspect-1.0 runs");
    assert!(out.status.success(), "gst-inspect-1.0 {element} failed");
    String::from_utf8(out.stdout).unwrap()
}

fn c_inspect(element: &str) -> String {
    let path = format!(
        "{}/../shared/{element}-1.22.inspect.txt",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// What an element may differ in from the C element it replaces.
#[derive(Default)]
struct Differences<'a> {
    /// Properties the C element does not have.
    extra: &'a [&'a str],
    /// Properties of the C element not implemented here.
    missing: &'a [&'a str],
    /// Properties flagged as changeable only in NULL or READY, where C says nothing.
    ready_only: &'a [&'a str],
    /// Whether the signals must be the same.
    signals: bool,
}

/// Asserts that `ours` has the interface of `theirs` but for `diff`.
fn assert_same_interface(ours: &str, theirs: &str, diff: Differences) {
    let (mine, c) = (inspect(ours), c_inspect(theirs));
    let mut props = section(&mine, "Element Properties:");
    let mut c_props = section(&c, "Element Properties:");
    for name in diff.missing {
        assert!(
            c_props.remove(*name).is_some(),
            "{theirs}: no property {name}"
        );
    }
    for name in diff.extra {
        assert!(props.remove(*name).is_some(), "{ours}: no property {name}");
    }
    for name in diff.ready_only {
        let flags = &mut props.get_mut(*name).expect("ready-only property")[1];
        *flags = flags
            .strip_suffix(", changeable only in NULL or READY state")
            .unwrap_or_else(|| panic!("{ours}: {name} is not flagged ready-only"))
            .to_string();
    }
    // The default object name follows the factory name.
    props.remove("name");
    c_props.remove("name");
    assert_eq!(
        props.keys().collect::<Vec<_>>(),
        c_props.keys().collect::<Vec<_>>(),
        "{ours}: property names differ from {theirs}"
    );
    for (name, lines) in &c_props {
        assert_eq!(&props[name], lines, "{ours}: property {name}");
    }
    if diff.signals {
        for heading in ["Element Signals:", "Element Actions:"] {
            assert_eq!(
                section(&mine, heading),
                section(&c, heading),
                "{ours}: {heading}"
            );
        }
    }
}

/// Properties every element here has beyond C's.
const OURS: [&str; 10] = [
    "bytes-queued",
    "time-queued",
    "io-threads",
    "request-keyframe",
    "overload-policy",
    "io-load",
    "batch-time",
    "zero-copy",
    "zero-copy-min-clients",
    "io-uring",
];

#[test]
fn rsmultifdsink_has_multifdsinks_interface() {
    assert_same_interface(
        "rsmultifdsink",
        "multifdsink",
        Differences {
            extra: &OURS,
            signals: true,
            ..Default::default()
        },
    );
}

/// rstcpserversink's signals carry fds (it is an rsmultifdsink), not tcpserversink's
/// GSockets: its properties match, and it has HTTP mode's, TLS's and `handle-read` of
/// its own; it does not implement tcpserversink's GstNetworkMessage support.
#[test]
fn rstcpserversink_has_tcpserversinks_properties() {
    let mut extra = OURS.to_vec();
    extra.extend([
        "handle-read",
        "listen-backlog",
        "http",
        "mount",
        "max-clients",
        "header-timeout",
        "max-header-size",
        "auth-jwt-secret",
        "max-clients-per-ip",
        "max-pending",
        "redirect-url",
        "proxy-protocol",
        "cors-origin",
        "metrics-path",
        "access-log",
        "tls-certificate",
        "tls-key",
    ]);
    assert_same_interface(
        "rstcpserversink",
        "tcpserversink",
        Differences {
            extra: &extra,
            missing: &["send-dispatched", "send-messages"],
            ready_only: &["host", "port"],
            signals: false,
        },
    );
}

#[test]
fn rsmultisocketsink_has_multisocketsinks_interface() {
    assert_same_interface(
        "rsmultisocketsink",
        "multisocketsink",
        Differences {
            extra: &OURS,
            signals: true,
            ..Default::default()
        },
    );
}

/// The README's "Properties" table names every property rsmultifdsink adds to
/// `GstBaseSink`'s, and no other: a property added without its row, or a row left
/// after a rename, fails here.
#[test]
fn readme_property_table_lists_every_property() {
    use gst::prelude::*;
    gst::init().unwrap();
    gstrsmultifdsink::plugin_register_static().unwrap();
    let sink = gst::ElementFactory::make("rsmultifdsink").build().unwrap();
    let base = gst_base::BaseSink::static_type();
    let mut ours: Vec<String> = sink
        .list_properties()
        .iter()
        .filter(|p| !base.is_a(p.owner_type()))
        .map(|p| p.name().to_string())
        .collect();
    ours.sort();

    let readme = include_str!("../README.md");
    let table = readme
        .split_once("\n## Properties\n")
        .expect("README has a Properties section")
        .1
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'));
    let mut documented: Vec<String> = table
        .skip(2) // the heading and the |---| line
        .flat_map(|row| {
            let cell = row.split('|').nth(1).unwrap_or_default();
            cell.split(" / ")
                .map(|name| name.trim().trim_matches('`').to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    documented.sort();
    assert_eq!(
        documented, ours,
        "README's property table against the element"
    );
}
