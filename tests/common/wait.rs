//! How long a test waits for what must happen: a safety bound against a hang, never
//! a pace. scripts/valgrind multiplies every bound by `TEST_WAIT_SCALE`, as everything
//! runs many times slower there, and more so while another test pushes 64 MiB.

use std::time::Duration;

/// `base` times `TEST_WAIT_SCALE` (1 when unset or not a number).
pub fn scaled(base: Duration) -> Duration {
    let scale = std::env::var("TEST_WAIT_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    base * scale
}
