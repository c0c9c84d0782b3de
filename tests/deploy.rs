//! The systemd units under deploy/: `systemd-analyze verify` accepts them (with
//! the edge program's path pointed at the one cargo built), they restart what
//! they run, and what they run works: the origin unit's pipeline serves a GDP
//! feed and the edge unit's command line serves it over HTTP.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use gst::prelude::*;

const ORIGIN_UNIT: &str = include_str!("../deploy/rsmultifdsink-origin.service");
const EDGE_UNIT: &str = include_str!("../deploy/rsmultifdsink-edge.service");
const EDGE_INSTALLED: &str = "/usr/local/bin/rsmultifdsink-edge";

fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// `section.key` → values, in order (a key may repeat).
fn parse_unit(text: &str) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not KEY=VALUE: {line}"));
        assert!(!section.is_empty(), "{line} before any section");
        out.entry(format!("{section}.{}", key.trim()))
            .or_default()
            .push(value.trim().to_string());
    }
    out
}

fn one<'a>(unit: &'a HashMap<String, Vec<String>>, key: &str) -> &'a str {
    match unit.get(key).map(Vec::as_slice) {
        Some([v]) => v,
        other => panic!("{key}: {other:?}"),
    }
}

#[test]
fn units_restart_what_they_run() {
    for text in [ORIGIN_UNIT, EDGE_UNIT] {
        let unit = parse_unit(text);
        assert_eq!(one(&unit, "Service.Restart"), "always");
        assert!(one(&unit, "Service.ExecStart").starts_with('/'));
        assert_eq!(one(&unit, "Install.WantedBy"), "multi-user.target");
        assert!(one(&unit, "Unit.After").contains("network-online.target"));
    }
}

/// `systemd-analyze verify` on both units; the edge unit's program path is the
/// built example's (verify wants the executable to exist).
#[test]
fn systemd_analyze_verifies_the_units() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!("SKIPPED: systemd-analyze is not installed; the units were only parsed");
        return;
    }
    let dir = std::env::temp_dir().join(format!("rsmfd-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let edge = target_dir().join("examples/edge");
    assert!(edge.exists(), "{} not built", edge.display());
    let units = [
        ("rsmultifdsink-origin.service", ORIGIN_UNIT.to_string()),
        (
            "rsmultifdsink-edge.service",
            EDGE_UNIT.replace(EDGE_INSTALLED, edge.to_str().unwrap()),
        ),
    ];
    for (name, text) in units {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        // verify succeeds on some warnings; none may concern our unit.
        assert!(
            !stderr.lines().any(|l| l.contains(name)),
            "{name}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The command line of ExecStart, split as systemd does for these units (no
/// quoting in them), with `${VAR}` from the unit's Environment=.
fn exec_start(text: &str) -> Vec<String> {
    let unit = parse_unit(text);
    let env: HashMap<String, String> = unit
        .get("Service.Environment")
        .into_iter()
        .flatten()
        .filter_map(|e| e.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    one(&unit, "Service.ExecStart")
        .split_whitespace()
        .map(|w| {
            let mut w = w.to_string();
            for (k, v) in &env {
                w = w.replace(&format!("${{{k}}}"), v);
            }
            w
        })
        .collect()
}

#[test]
fn origin_and_edge_units_run_what_they_say() {
    common::init();
    let origin_cmd = exec_start(ORIGIN_UNIT);
    assert_eq!(
        Path::new(&origin_cmd[0]).file_name().unwrap(),
        "gst-launch-1.0"
    );
    assert_eq!(origin_cmd[1], "-q");
    // The origin's pipeline, on a free port.
    let description = origin_cmd[2..]
        .iter()
        .map(|w| if w.starts_with("port=") { "port=0" } else { w })
        .collect::<Vec<_>>()
        .join(" ");
    let origin = gst::parse::launch(&description)
        .unwrap()
        .downcast::<gst::Pipeline>()
        .unwrap();
    origin.set_state(gst::State::Playing).unwrap();
    let sink = origin.iterate_sinks().into_iter().flatten().next().unwrap();
    let origin_port = sink.property::<i32>("current-port");
    assert!(origin_port > 0);

    // The edge unit's arguments, against that origin, on a free port.
    let edge_cmd = exec_start(EDGE_UNIT);
    assert_eq!(edge_cmd[0], EDGE_INSTALLED);
    let mut args: Vec<String> = Vec::new();
    let mut words = edge_cmd[1..].iter();
    while let Some(w) = words.next() {
        args.push(w.clone());
        let value = match w.as_str() {
            "--origin-host" => Some("127.0.0.1".to_string()),
            "--origin-port" => Some(origin_port.to_string()),
            "--port" => Some("0".to_string()),
            _ => None,
        };
        if let Some(v) = value {
            words.next();
            args.push(v);
        }
    }
    let mut edge = Command::new(target_dir().join("examples/edge"))
        .args(&args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(edge.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let port: u16 = line
        .trim()
        .strip_prefix("edge: listening on ")
        .and_then(|a| a.rsplit(':').next())
        .unwrap_or_else(|| panic!("{line}"))
        .parse()
        .unwrap();
    let (head, body) = common::http_fetch(port, "/", 40_000, Duration::from_secs(20));
    let _ = edge.kill();
    let _ = edge.wait();
    origin.set_state(gst::State::Null).unwrap();
    assert!(head.contains("Content-Type: video/webm"), "{head}");
    let d = common::decode_from_start(&body, "matroskademux", "vp8dec");
    assert!(d.starts_on_keyframe(), "{:?}", d.decoded.error);
}
