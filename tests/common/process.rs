//! Child processes of the tests (gst-launch-1.0, the example programs, HAProxy,
//! curl, Chromium) and where the built plugin and examples are.

use std::path::PathBuf;
use std::process::Child;

/// target/<profile>, where cargo put the test binary, the examples
/// (`examples/NAME`) and the plugin (`libgstrsmultifdsink.so`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// Fails the test, saying how to fix it, unless the plugin and the edge example are
/// built (`cargo test --test NAME` alone builds neither for a child process).
pub fn assert_plugin_and_edge_built() {
    assert!(
        target_dir().join("libgstrsmultifdsink.so").exists()
            && target_dir().join("examples/edge").exists(),
        "plugin or edge example not built in {}: cargo build --all-targets first (scripts/test does)",
        target_dir().display()
    );
}

/// Kills the process when dropped, also when the test fails half-way.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Kills a child's whole process group (it was started in its own, with
/// `process_group(0)`) and reaps it: what a shell or a browser started goes too.
pub fn kill_group(child: &mut Child) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = child.wait();
}

/// [`kill_group`] when dropped.
pub struct KillGroupOnDrop(pub Child);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        kill_group(&mut self.0);
    }
}
