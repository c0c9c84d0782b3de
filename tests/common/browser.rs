//! Headless Chromium for the browser tests: a tiny HTTP server for the test page and
//! its reports, and the browser in its own process group, killed on drop.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Chromium's path: `$CHROMIUM` or Debian's `/usr/bin/chromium`.
pub fn chromium_path() -> PathBuf {
    let path = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "{} not found: the browser test needs Chromium (apt-get install chromium, \
         as scripts/setup-debian does), or set CHROMIUM to its path",
        path.display()
    );
    path
}

/// A tiny HTTP server for the page: `/` is the page, `/report?...` is what the
/// page's script tells the test (received on the channel).
pub fn serve_page(html: String) -> (u16, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let line = String::from_utf8_lossy(&req);
            let path = line.split(' ').nth(1).unwrap_or("").to_string();
            let response = if path == "/" {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{html}",
                    html.len()
                )
            } else if let Some(report) = path.strip_prefix("/report?") {
                let _ = tx.send(report.to_string());
                "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n".to_string()
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = conn.write_all(response.as_bytes());
        }
    });
    (port, rx)
}

/// Headless Chromium on `url`, with its own profile; killed (its whole process
/// group) on drop.
pub struct Browser {
    child: Child,
    profile: PathBuf,
}

impl Browser {
    /// `extra`: flags besides the headless set (e.g. `--ignore-certificate-errors`).
    pub fn open(url: &str, extra: &[&str]) -> Browser {
        let chromium = chromium_path();
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let profile = std::env::temp_dir().join(format!(
            "rsmfd-chromium-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).unwrap();
        let child = Command::new(&chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--mute-audio",
                "--autoplay-policy=no-user-gesture-required",
            ])
            .args(extra)
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromium.display()));
        Browser { child, profile }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A page whose `<video>` plays `src` and reports to the page server: `playing=`,
/// `error=`, then `played=T&start=S` once it advanced by more than 1 s past 1 s.
pub fn video_page(src: &str) -> String {
    format!(
        r#"<!doctype html>
<html><head><title>LOADING</title></head><body>
<video id="v" src="{src}" autoplay muted></video>
<script>
const v = document.getElementById('v');
let start = null, done = false;
function report(what) {{ fetch('/report?' + what).catch(() => {{}}); }}
v.addEventListener('error', () => report('error=' + encodeURIComponent(
  v.error ? v.error.code + ' ' + v.error.message : 'unknown')));
v.addEventListener('playing', () => {{
  if (start === null) start = v.currentTime;
  report('playing=' + v.currentTime);
}});
function check() {{
  if (!done && start !== null && v.currentTime > 1.0 && v.currentTime - start > 1.0) {{
    done = true;
    report('played=' + v.currentTime + '&start=' + start);
  }}
}}
v.addEventListener('timeupdate', check);
setInterval(check, 100);
</script></body></html>"#
    )
}
