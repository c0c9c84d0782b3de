//! The stress program (`benches/stress/`) in its short form: streams through
//! `rsmultifdsink` under client churn, faults, concurrent action signals, property
//! changes and state cycles, and fails if any of its checks fails. Its figures are
//! printed with `cargo test --test stress -- --nocapture`; the long form is
//! `cargo bench --bench stress -- --long`.

// The scenario is shared with the stress program; it lives beside that program's main.
#[path = "../benches/stress/scenario/mod.rs"]
mod scenario;

#[test]
fn stress_short_form() {
    let report = scenario::run(&scenario::Options::short());
    for line in &report.lines {
        println!("{line}");
    }
    let all = report.lines.join("\n");
    assert_eq!(
        report.lines.last().map(String::as_str),
        Some(format!("stress: {} passed, {} failed", report.passed, report.failed).as_str()),
        "{all}"
    );
    assert!(report.passed >= 22, "too few checks ran:\n{all}");
    assert_eq!(report.failed, 0, "stress checks failed:\n{all}");
    assert!(
        report
            .lines
            .iter()
            .any(|l| l.starts_with("stress: connect/disconnect events ")),
        "no event figure:\n{all}"
    );
}
