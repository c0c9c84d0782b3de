//! GStreamer's own C check suites for the elements we replace (gst-plugins-base 1.22
//! tests/check/elements), built unchanged against libgstcheck with only the factory
//! name swapped, run by `scripts/c-check-suite`. Each suite also runs unswapped against
//! the C element: that it passes there shows the harness is sound, so a failure with
//! ours is ours.

use std::path::PathBuf;
use std::process::Command;

/// The folder holding `libgstrsmultifdsink.so` for this build (target/<profile>).
fn plugin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// Runs `scripts/c-check-suite` with `args` (the element, then for ours the plugin's
/// folder) and asserts that all `checks` checks passed.
fn assert_suite_passes(args: &[&str], checks: usize) {
    let element = args[0];
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/c-check-suite"
    ))
    .args(args)
    .output()
    .expect("scripts/c-check-suite runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{element}: {report}");
    assert!(
        stdout.contains(&format!("100%: Checks: {checks}, Failures: 0, Errors: 0")),
        "{element}: {report}"
    );
    // One "Passed" line per check (libcheck's log), so none went missing.
    let passed = stdout.lines().filter(|l| l.ends_with(": Passed")).count();
    assert_eq!(passed, checks, "{element}: {report}");
}

#[test]
fn multifdsink_suite_passes_against_rsmultifdsink() {
    let dir = plugin_dir();
    assert_suite_passes(&["rsmultifdsink", dir.to_str().unwrap()], 10);
}

#[test]
fn multifdsink_suite_passes_against_c_multifdsink() {
    assert_suite_passes(&["multifdsink"], 10);
}

#[test]
fn multisocketsink_suite_passes_against_c_multisocketsink() {
    assert_suite_passes(&["multisocketsink"], 9);
}

#[test]
fn multisocketsink_suite_passes_against_rsmultisocketsink() {
    let dir = plugin_dir();
    assert_suite_passes(&["rsmultisocketsink", dir.to_str().unwrap()], 9);
}
