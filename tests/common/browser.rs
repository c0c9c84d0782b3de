//! Headless Chromium for the browser tests: a page of the test's own origin (a tiny
//! HTTP server on 127.0.0.1 that serves the page and the files it loads, and takes
//! the reports its script sends back), and Chromium opening it with the flags this
//! machine needs (no sandbox as root, no GPU, no background traffic).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

/// Chromium's path: `CHROMIUM`, else Debian's `/usr/bin/chromium`.
pub fn chromium_path() -> PathBuf {
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        chromium.exists(),
        "{} not found: this test needs Chromium (apt-get install chromium, as \
         scripts/setup-debian does), or set CHROMIUM to its path",
        chromium.display()
    );
    chromium
}

/// A file the page server answers besides the page: path, content type, bytes.
pub struct PageFile {
    pub path: String,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

/// The test's origin: `/` is the page, `files` are served at their paths,
/// `/report?...` is what the page's script tells the test (received on
/// `reports`, still percent-encoded), and `/log?...` a line the script wants in
/// the test's output (printed to stderr, decoded).
pub struct PageServer {
    pub port: u16,
    pub reports: Receiver<String>,
}

impl PageServer {
    pub fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Waits for the page's next report, calling `tick` (e.g. feeding a stream)
    /// between short waits; fails the test at `timeout`.
    pub fn wait_report(&self, timeout: Duration, mut tick: impl FnMut()) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            tick();
            match self.reports.recv_timeout(Duration::from_millis(20)) {
                Ok(report) => return report,
                Err(_) => assert!(
                    Instant::now() < deadline,
                    "no report from Chromium in {timeout:?}"
                ),
            }
        }
    }
}

pub fn serve_page(html: String) -> PageServer {
    serve_page_with(html, Vec::new())
}

pub fn serve_page_with(html: String, files: Vec<PageFile>) -> PageServer {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            answer(conn, &html, &files, &tx);
        }
    });
    PageServer { port, reports: rx }
}

fn answer(mut conn: std::net::TcpStream, html: &str, files: &[PageFile], tx: &Sender<String>) {
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
    let ok = |content_type: &str, body: &[u8]| {
        let mut response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        response.extend_from_slice(body);
        response
    };
    let no_content = b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n".to_vec();
    let response = if path == "/" {
        ok("text/html", html.as_bytes())
    } else if let Some(file) = files.iter().find(|f| f.path == path) {
        ok(file.content_type, &file.body)
    } else if let Some(report) = path.strip_prefix("/report?") {
        let _ = tx.send(report.to_string());
        no_content
    } else if let Some(text) = path.strip_prefix("/log?") {
        eprintln!("page: {}", percent_decode(text));
        no_content
    } else {
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec()
    };
    let _ = conn.write_all(&response);
}

/// Decodes `%XX` (as `encodeURIComponent` writes them); other bytes stay.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `key=value` pairs of a report, decoded.
pub fn report_fields(report: &str) -> Vec<(String, String)> {
    report
        .split('&')
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Headless Chromium with a profile of its own, in its own process group, which
/// it kills (and removes the profile) on drop.
pub struct Browser {
    child: Child,
    profile: PathBuf,
}

impl Browser {
    /// Opens `url`. `extra` flags come after the ones every test needs.
    pub fn open(url: &str, extra: &[&str]) -> Browser {
        use std::os::unix::process::CommandExt;
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let chromium = chromium_path();
        let profile = std::env::temp_dir().join(format!(
            "rsmfd-chromium-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
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
        super::process::kill_group(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A page whose `<video>` plays `src` (muted, autoplay) and reports to the page
/// server: `playing=T` when it starts, `error=CODE MESSAGE` if it fails, and once
/// its time has passed 1 s and advanced by more than 1 s since it started,
/// `played=T&start=S&title=PLAYING%20T` (the title it set then).
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
    document.title = 'PLAYING ' + v.currentTime;
    report('played=' + v.currentTime + '&start=' + start + '&title=' + encodeURIComponent(document.title));
  }}
}}
v.addEventListener('timeupdate', check);
setInterval(check, 100);
</script></body></html>"#
    )
}

/// The `played=` report of a [`video_page`].
pub struct Played {
    /// The report as it came (still percent-encoded).
    pub report: String,
    /// The video's time when it reported.
    pub current: f64,
    /// Its time when it started playing.
    pub start: f64,
}

/// Headless Chromium (muted, autoplay allowed, and `extra` flags) opens a
/// [`video_page`] playing `src`; waits up to 40 s for its `played=` report. Fails
/// the test on an `error=` report, or at the deadline with the reports so far and
/// `context()` (what the server saw).
pub fn play_video(src: &str, extra: &[&str], context: impl Fn() -> String) -> Played {
    let page = serve_page(video_page(src));
    let flags: Vec<&str> = extra
        .iter()
        .copied()
        .chain(["--mute-audio", "--autoplay-policy=no-user-gesture-required"])
        .collect();
    let _browser = Browser::open(&format!("{}/", page.origin()), &flags);
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut seen = Vec::new();
    let report = loop {
        match page
            .reports
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(r) if r.starts_with("played=") => break r,
            Ok(r) if r.starts_with("error=") => panic!("the video element failed: {r}"),
            Ok(r) => seen.push(r),
            Err(_) => panic!(
                "Chromium did not play 1 s of {src} in time; reports: {seen:?}; {}",
                context()
            ),
        }
    };
    let field = |name: &str| -> f64 {
        report
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {report}"))
    };
    let (current, start) = (field("played"), field("start"));
    Played {
        report,
        current,
        start,
    }
}
