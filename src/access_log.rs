// SPDX-License-Identifier: MPL-2.0

//! Access log: one line per finished client, and a writer that never blocks the
//! thread that logs. `rstcpserversink` will use it for `access-log` (issue 11).
//!
//! A line is Apache's combined log format followed by three fields, as Apache would
//! write with
//! `LogFormat "%h %l %u %t \"%r\" %>s %b \"%{Referer}i\" \"%{User-agent}i\" %O %D %{removal}n"`:
//!
//! ```text
//! 192.0.2.7 - viewer1 [10/Oct/2000:13:55:36 +0000] "GET /video?token=REDACTED HTTP/1.1" 200 52301 "-" "VLC/3.0.18" 52420 8250000 closed
//! ```
//!
//! client address, `-` (ident), the user (JWT subject) or `-`, the request's start
//! time (always UTC), the request line, the status answered, the stream bytes (body,
//! `-` for none), Referer and User-Agent (`-` when absent), then all bytes written
//! including the response head, the duration in microseconds, and the status the
//! client was removed with (`closed`, `slow`, ...; `-` for a refused request).
//! Text from the request is escaped as Apache escapes it (`"` and `\` with a
//! backslash; `\n`, `\r`, `\t`, `\b`, `\v`; any other byte outside printable ASCII
//! as `\xhh`), so a line cannot be forged or split; the `token` query parameter's
//! value is replaced by `REDACTED` so tokens never reach the file.
//!
//! [`AccessLog`] hands lines over a bounded channel to a thread that appends them to
//! the file: a full channel (a stalled disk) drops the line and counts it instead of
//! waiting. The thread reopens the file when asked ([`reopen_all`], for SIGHUP) and
//! when the path names another file than the one open (rotation by rename), checked
//! every [`ROTATION_CHECK`].

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often the writer looks whether the path still names the open file.
pub const ROTATION_CHECK: Duration = Duration::from_secs(1);

/// Lines the channel holds by default: a few seconds of a busy server's departures.
pub const DEFAULT_CAPACITY: usize = 4096;

/// What a finished client's line says.
#[derive(Debug, Clone)]
pub struct AccessEntry<'a> {
    /// The client's address (the PROXY header's when there is one).
    pub client: IpAddr,
    /// The authenticated user (the token's subject), if any.
    pub user: Option<&'a str>,
    /// When the request came in.
    pub started: SystemTime,
    /// The request line as received (`GET /path?query HTTP/1.1`).
    pub request_line: &'a str,
    /// The status answered.
    pub status: u16,
    /// Stream bytes sent after the response head.
    pub body_bytes: u64,
    pub referer: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    /// Every byte written, response head included.
    pub bytes_sent: u64,
    /// From the request to the close.
    pub duration: Duration,
    /// The status the client was removed with; `None` for a refused request.
    pub removal: Option<&'a str>,
}

/// The line for `e`, newline included.
pub fn format_line(e: &AccessEntry<'_>) -> String {
    let or_dash = |s: Option<&str>| s.map_or_else(|| "-".to_string(), escape);
    let body = match e.body_bytes {
        0 => "-".to_string(),
        n => n.to_string(),
    };
    format!(
        "{} - {} [{}] \"{}\" {} {} \"{}\" \"{}\" {} {} {}\n",
        e.client,
        or_dash(e.user),
        apache_time(e.started),
        escape(&redact_token(e.request_line)),
        e.status,
        body,
        or_dash(e.referer.map(redact_token).as_deref()),
        or_dash(e.user_agent),
        e.bytes_sent,
        e.duration.as_micros(),
        or_dash(e.removal),
    )
}

/// `s` with the value of every `token` query parameter (after `?` or `&`, up to
/// the next `&`, `#` or space) replaced by `REDACTED`.
pub fn redact_token(s: &str) -> String {
    const KEY: &str = "token=";
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(KEY) {
        let starts_parameter = i > 0 && matches!(rest.as_bytes()[i - 1], b'?' | b'&');
        let value_start = i + KEY.len();
        out.push_str(&rest[..value_start]);
        rest = &rest[value_start..];
        if starts_parameter {
            let end = rest.find(['&', '#', ' ']).unwrap_or(rest.len());
            out.push_str("REDACTED");
            rest = &rest[end..];
        }
    }
    out.push_str(rest);
    out
}

/// Escapes as Apache's log items are escaped.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x08 => out.push_str("\\b"),
            0x0b => out.push_str("\\v"),
            b' '..=b'~' => out.push(char::from(b)),
            b => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    out
}

/// `10/Oct/2000:13:55:36 +0000`, in UTC (no time zone database needed, and logs
/// from several machines line up).
fn apache_time(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{day:02}/{}/{year}:{:02}:{:02}:{:02} +0000",
        MONTHS[month as usize - 1],
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (the well-known
/// era-based conversion: 400-year eras of 146097 days, years starting in March so
/// the leap day comes last).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let march_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * march_month + 2) / 5 + 1) as u32;
    let month = if march_month < 10 {
        march_month + 3
    } else {
        march_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Bumped by [`reopen_all`]; each writer reopens when it sees a new value.
static REOPEN_GENERATION: AtomicU64 = AtomicU64::new(0);

/// Asks every access log in the process to reopen its file (what SIGHUP means to
/// a daemon after logrotate). Only an atomic increment: safe in a signal handler.
/// Each writer acts on it within [`ROTATION_CHECK`], or at its next line.
pub fn reopen_all() {
    REOPEN_GENERATION.fetch_add(1, Ordering::SeqCst);
}

enum Message {
    Line(String),
    /// Answered once everything sent before is written.
    Sync(mpsc::Sender<()>),
}

/// The writer: lines go to a thread that appends them to the file.
pub struct AccessLog {
    sender: Option<SyncSender<Message>>,
    dropped: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl AccessLog {
    /// Opens (creating if needed) `path` for appending, here so that an unwritable
    /// path fails at once, and starts the writer thread with a channel of
    /// `capacity` lines (at least one).
    pub fn open(path: impl Into<PathBuf>, capacity: usize) -> io::Result<AccessLog> {
        let path = path.into();
        let file = open_append(&path)?;
        let (sender, receiver) = mpsc::sync_channel(capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            identity: identity(&file),
            file,
            path,
            dropped: Arc::clone(&dropped),
            generation: REOPEN_GENERATION.load(Ordering::SeqCst),
            last_check: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run(receiver))?;
        Ok(AccessLog {
            sender: Some(sender),
            dropped,
            thread: Some(thread),
        })
    }

    /// Queues a line (from [`format_line`]). Never waits: with the channel full,
    /// the line is dropped and counted.
    pub fn log(&self, line: String) {
        let Some(sender) = &self.sender else { return };
        match sender.try_send(Message::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Lines not written: the channel was full, or writing them failed.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits until every line queued before is written. Blocks on the disk: for
    /// stopping and tests, never for the IO thread.
    pub fn sync(&self) {
        let Some(sender) = &self.sender else { return };
        let (ack, acked) = mpsc::channel();
        if sender.send(Message::Sync(ack)).is_ok() {
            let _ = acked.recv();
        }
    }
}

impl Drop for AccessLog {
    /// Writes what is queued and ends the thread (so blocks like [`AccessLog::sync`]).
    fn drop(&mut self) {
        self.sender = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .open(path)
}

/// What tells one file from another, whatever its name.
fn identity(file: &File) -> Option<(u64, u64)> {
    file.metadata().ok().map(|m| (m.dev(), m.ino()))
}

struct Writer {
    file: File,
    identity: Option<(u64, u64)>,
    path: PathBuf,
    dropped: Arc<AtomicU64>,
    generation: u64,
    last_check: Instant,
}

impl Writer {
    fn run(mut self, receiver: mpsc::Receiver<Message>) {
        let mut batch = Vec::new();
        loop {
            let first = match receiver.recv_timeout(ROTATION_CHECK) {
                Ok(message) => Some(message),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            // Reopen first, so lines logged after a reopen request land in the new file.
            self.reopen_if_needed();
            // Take whatever else is waiting too: one write for the lot.
            let mut acks = Vec::new();
            let mut lines = 0u64;
            for message in first.into_iter().chain(receiver.try_iter()) {
                match message {
                    Message::Line(line) => {
                        batch.extend_from_slice(line.as_bytes());
                        lines += 1;
                    }
                    Message::Sync(ack) => acks.push(ack),
                }
            }
            if !batch.is_empty() && self.file.write_all(&batch).is_err() {
                self.dropped.fetch_add(lines, Ordering::Relaxed);
            }
            batch.clear();
            for ack in acks {
                let _ = ack.send(());
            }
        }
    }

    /// Reopens on a request, or when the path names another file than the open one
    /// (looked at once per [`ROTATION_CHECK`]). If the new file cannot be opened,
    /// lines keep going to the old one and it is tried again later.
    fn reopen_if_needed(&mut self) {
        let generation = REOPEN_GENERATION.load(Ordering::SeqCst);
        let requested = generation != self.generation;
        let due = self.last_check.elapsed() >= ROTATION_CHECK;
        if !requested && !due {
            return;
        }
        self.last_check = Instant::now();
        let moved = match std::fs::metadata(&self.path) {
            Ok(m) => Some((m.dev(), m.ino())) != self.identity,
            Err(_) => true,
        };
        if (requested || moved)
            && let Ok(file) = open_append(&self.path)
        {
            self.identity = identity(&file);
            self.file = file;
            self.generation = generation;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Tests that rename or reopen files run one at a time: [`reopen_all`] is
    /// process-wide, and a reopen from one test must not race another's renames.
    static FILES: Mutex<()> = Mutex::new(());

    fn entry<'a>(request_line: &'a str) -> AccessEntry<'a> {
        AccessEntry {
            client: "192.0.2.7".parse().unwrap(),
            user: Some("viewer1"),
            started: UNIX_EPOCH + Duration::from_secs(971_186_136),
            request_line,
            status: 200,
            body_bytes: 52_301,
            referer: None,
            user_agent: Some("VLC/3.0.18 LibVLC/3.0.18"),
            bytes_sent: 52_420,
            duration: Duration::from_micros(8_250_000),
            removal: Some("closed"),
        }
    }

    #[test]
    fn formats_combined_lines_with_the_extra_fields() {
        assert_eq!(
            format_line(&entry("GET /video?token=eyJ.abc.def&x=1 HTTP/1.1")),
            "192.0.2.7 - viewer1 [10/Oct/2000:13:55:36 +0000] \"GET /video?token=REDACTED&x=1 HTTP/1.1\" 200 52301 \"-\" \"VLC/3.0.18 LibVLC/3.0.18\" 52420 8250000 closed\n"
        );
        let refused = AccessEntry {
            client: "2001:db8::1".parse().unwrap(),
            user: None,
            started: UNIX_EPOCH + Duration::from_secs(1_709_251_199),
            status: 401,
            body_bytes: 0,
            referer: Some("https://example.com/player?token=secret#x"),
            user_agent: None,
            bytes_sent: 75,
            duration: Duration::from_micros(1500),
            removal: None,
            ..entry("GET /audio HTTP/1.1")
        };
        assert_eq!(
            format_line(&refused),
            "2001:db8::1 - - [29/Feb/2024:23:59:59 +0000] \"GET /audio HTTP/1.1\" 401 - \"https://example.com/player?token=REDACTED#x\" \"-\" 75 1500 -\n"
        );
    }

    #[test]
    fn escapes_request_text_as_apache() {
        let e = AccessEntry {
            user_agent: Some("a\"b\\c\td\r\ne\x08\x0b\x01\u{7f}é"),
            ..entry("GET /x\"y HTTP/1.1")
        };
        let line = format_line(&e);
        assert!(
            line.contains(
                r#""GET /x\"y HTTP/1.1" 200 52301 "-" "a\"b\\c\td\r\ne\b\v\x01\x7f\xc3\xa9" "#
            ),
            "{line}"
        );
        // One line, whatever the request held.
        assert_eq!(line.matches('\n').count(), 1);
    }

    #[test]
    fn redacts_only_token_parameters() {
        assert_eq!(
            redact_token("GET /v?token=a.b.c HTTP/1.1"),
            "GET /v?token=REDACTED HTTP/1.1"
        );
        assert_eq!(
            redact_token("/v?a=1&token=x&token=y#token=z"),
            "/v?a=1&token=REDACTED&token=REDACTED#token=z"
        );
        assert_eq!(redact_token("/v?mytoken=keep"), "/v?mytoken=keep");
        assert_eq!(redact_token("/token=keep"), "/token=keep");
        assert_eq!(redact_token("/v?token="), "/v?token=REDACTED");
    }

    /// Expected values from Python: calendar.timegm((2000, 2, 29, 0, 0, 0)) etc.
    #[test]
    fn dates_convert_across_leap_years_and_centuries() {
        let at = |secs: u64| apache_time(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "01/Jan/1970:00:00:00 +0000");
        assert_eq!(at(951_782_400), "29/Feb/2000:00:00:00 +0000");
        assert_eq!(at(4_107_542_399), "28/Feb/2100:23:59:59 +0000"); // 2100: no leap day
        assert_eq!(at(4_133_980_799), "31/Dec/2100:23:59:59 +0000");
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("access-log-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn appends_lines_and_follows_a_rename() {
        let _files = FILES.lock().unwrap_or_else(|e| e.into_inner());
        let dir = temp_dir("rename");
        let path = dir.join("access.log");
        std::fs::write(&path, "earlier\n").unwrap();
        let log = AccessLog::open(&path, 16).unwrap();
        log.log("one\n".into());
        log.sync();
        assert_eq!(read(&path), "earlier\none\n");

        // logrotate without copytruncate: rename, and the writer sees within a
        // check that the path is gone and opens a new file there.
        let rotated = dir.join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        let deadline = Instant::now() + 5 * ROTATION_CHECK;
        while !path.exists() {
            assert!(Instant::now() < deadline, "no new file after the rename");
            std::thread::sleep(Duration::from_millis(20));
        }
        log.log("two\n".into());
        log.sync();
        assert_eq!(read(&rotated), "earlier\none\n");
        assert_eq!(read(&path), "two\n");
        assert_eq!(log.dropped(), 0);
        drop(log);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reopens_when_asked() {
        let _files = FILES.lock().unwrap_or_else(|e| e.into_inner());
        let dir = temp_dir("reopen");
        let path = dir.join("access.log");
        let log = AccessLog::open(&path, 16).unwrap();
        log.log("one\n".into());
        log.sync();
        let rotated = dir.join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        // As a SIGHUP handler would: the next line already goes to the new file.
        reopen_all();
        log.log("two\n".into());
        log.sync();
        assert_eq!(read(&rotated), "one\n");
        assert_eq!(read(&path), "two\n");
        drop(log);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unwritable_path_fails_at_open() {
        let err = AccessLog::open("/nonexistent-dir/access.log", 16)
            .err()
            .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    /// A stalled disk, made exact with a FIFO whose reader does not read and whose
    /// buffer is one page: the writer blocks inside the first line, the channel then
    /// takes `capacity` lines, and every line after that is dropped and counted,
    /// with `log` returning at once throughout. Then the reader drains and every
    /// accepted line arrives whole.
    #[test]
    fn a_stalled_disk_drops_and_counts_without_blocking() {
        let _files = FILES.lock().unwrap_or_else(|e| e.into_inner());
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use nix::sys::stat::Mode;
        use std::os::fd::AsFd;
        let dir = temp_dir("stall");
        let fifo = dir.join("access.fifo");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
        let reader = OpenOptions::new()
            .read(true)
            .custom_flags(OFlag::O_NONBLOCK.bits())
            .open(&fifo)
            .unwrap();
        let page = fcntl(&reader, FcntlArg::F_SETPIPE_SZ(4096)).unwrap() as usize;

        const CAPACITY: usize = 8;
        let log = AccessLog::open(&fifo, CAPACITY).unwrap();
        let line = |i: usize| format!("{i:04}{}\n", "x".repeat(page));
        log.log(line(0));
        // Once the first bytes reach the pipe, the writer has taken line 0 (alone:
        // nothing else was queued) and, the line being longer than the pipe, is
        // blocked inside it.
        let mut ready = [PollFd::new(reader.as_fd(), PollFlags::POLLIN)];
        assert_eq!(poll(&mut ready, PollTimeout::from(10_000u16)).unwrap(), 1);
        let started = Instant::now();
        for i in 1..=CAPACITY + 5 {
            log.log(line(i));
        }
        assert!(started.elapsed() < Duration::from_secs(1), "log() waited");
        assert_eq!(log.dropped(), 5);

        // Drain the FIFO on another thread while the writer finishes.
        let mut reader = reader;
        fcntl(&reader, FcntlArg::F_SETFL(OFlag::empty())).unwrap();
        let drain = std::thread::spawn(move || {
            let mut all = String::new();
            io::Read::read_to_string(&mut reader, &mut all).unwrap();
            all
        });
        drop(log); // writes the rest and closes the writing end: the reader sees EOF
        let all = drain.join().unwrap();
        let expected: String = (0..=CAPACITY).map(line).collect();
        assert_eq!(all, expected);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
