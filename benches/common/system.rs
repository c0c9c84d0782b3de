// SPDX-License-Identifier: MPL-2.0

//! Process helpers both tools use: figures from /proc/self/status, the fd limit and
//! GStreamer with this crate's plugin.

use nix::libc;

/// A field of /proc/self/status in KiB (`VmRSS:`, `VmHWM:`); 0 if it cannot be read.
pub fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Raises the soft fd limit to `want` (at most the hard limit) and returns the soft
/// limit now (1024 if it cannot be read).
pub fn raise_fd_limit(want: u64) -> usize {
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        let target = want.min(lim.rlim_max);
        if lim.rlim_cur < target {
            lim.rlim_cur = target;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
        lim.rlim_cur.min(1 << 30) as usize
    }
}

/// GStreamer initialised and this crate's elements registered, once per process.
pub fn init_gstreamer() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        gst::init().expect("gst init");
        gstrsmultifdsink::plugin_register_static().expect("register the plugin");
    });
}
