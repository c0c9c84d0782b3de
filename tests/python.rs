//! The Python (PyGObject) programs run against the built plugin: the
//! Flumotion-style streamer, and an app handing `Gio.Socket`s to rsmultisocketsink.

use std::path::PathBuf;
use std::process::Command;

/// The folder holding `libgstrsmultifdsink.so` for this build (target/<profile>).
fn plugin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

fn run_streamer(factory: &str) -> String {
    run_script("streamer.py", factory)
}

fn run_script(script: &str, factory: &str) -> String {
    let dir = plugin_dir();
    assert!(
        dir.join("libgstrsmultifdsink.so").exists(),
        "plugin not built in {}",
        dir.display()
    );
    // Debian's interpreter: python3-gi installs for it (a pyenv python3 on PATH
    // would not see it). $PYTHON overrides.
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    let out = Command::new(python)
        .arg(format!(
            "{}/tests/python/{script}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .arg(factory)
        .env("GST_PLUGIN_PATH", &dir)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{factory}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn python_streamer_works_with_rsmultifdsink() {
    assert!(run_streamer("rsmultifdsink").starts_with("ok: "));
}

/// The same script against the C element: proves the script checks what the C
/// element does, so rsmultifdsink passing it means drop-in behaviour.
#[test]
fn python_streamer_works_with_c_multifdsink() {
    assert!(run_streamer("multifdsink").starts_with("ok: "));
}

#[test]
fn python_gio_sockets_work_with_rsmultisocketsink() {
    assert!(run_script("socket_streamer.py", "rsmultisocketsink").starts_with("ok: "));
}

/// The same script against the C element, as above.
#[test]
fn python_gio_sockets_work_with_c_multisocketsink() {
    assert!(run_script("socket_streamer.py", "multisocketsink").starts_with("ok: "));
}
