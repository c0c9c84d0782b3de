//! The stress program (`benches/stress/`) in its short form: streams through
//! `rsmultifdsink` under client churn, faults, concurrent action signals, property
//! changes and state cycles, then under overload (a producer far faster than the IO
//! side, with stalled and slow clients, once per overload policy), and fails if any
//! of its checks fails. Its figures are printed with `cargo test --test stress --
//! --nocapture`; the long form is `cargo bench --bench stress -- --long`.

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
    // 22 checks of the churn phase, 9 per overload policy.
    assert!(report.passed >= 40, "too few checks ran:\n{all}");
    assert_eq!(report.failed, 0, "stress checks failed:\n{all}");
    for figure in [
        "stress: connect/disconnect events ",
        "stress: overload back-pressure: removed before the drain: ",
        "stress: overload drop-buffers: removed before the drain: ",
    ] {
        assert!(
            report.lines.iter().any(|l| l.starts_with(figure)),
            "no figure {figure:?}:\n{all}"
        );
    }
}
