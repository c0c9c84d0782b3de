//! Integration tests of the fan-out engine with real file descriptors: pipes,
//! socketpairs, TCP on 127.0.0.1 and regular files.
//!
//! Every test checks exact bytes. Waiting is done on conditions with deadlines: a
//! recorder of the listener's events with a condvar, and exact reads with `poll`.
//! Counters are read after the bytes they count have been read: the engine writes
//! under its lock and counts in the same lock hold, so `counters()`/`stats()` (which
//! take that lock) see every byte a reader already got.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use gstrsmultifdsink::engine::{
    AddOutcome, Amount, Chunk, ClientConfig, ClientStats, ClientStatus, Engine, Fd, Listener,
    OverloadPolicy, RecoverPolicy, Settings, SyncMethod, Unit,
};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{setsockopt, sockopt};

#[path = "common/engine_fds.rs"]
mod engine_fds;
#[path = "common/wait.rs"]
mod wait;

use engine_fds::{tcp_pair, unix_stream_pair, with_io_uring, zero_copy};

/// How long a wait for something that must happen may take before the test fails:
/// a safety bound, never a pace.
static WAIT: LazyLock<Duration> = LazyLock::new(|| wait::scaled(Duration::from_secs(10)));

// ---------------------------------------------------------------------------------
// Data

/// The C check-suite's 16-byte buffer: "deadbee" + 8 hex digits + NUL.
fn b(i: u32) -> Vec<u8> {
    let mut v = format!("deadbee{i:08x}").into_bytes();
    v.push(0);
    assert_eq!(v.len(), 16);
    v
}

/// B(first) .. B(last), concatenated.
fn bs(range: std::ops::RangeInclusive<u32>) -> Vec<u8> {
    range.flat_map(b).collect()
}

/// The C check-suite's big buffer: 16 Ki copies of B(i), 256 KiB.
fn big(i: u32) -> Vec<u8> {
    b(i).repeat(16 * 1024)
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A sync point.
fn key(data: impl Into<Vec<u8>>) -> Chunk {
    Chunk::from_vec(data.into(), true, false, None)
}

/// A delta unit.
fn delta(data: impl Into<Vec<u8>>) -> Chunk {
    Chunk::from_vec(data.into(), false, false, None)
}

/// A HEADER-flagged buffer.
fn header(data: impl Into<Vec<u8>>) -> Chunk {
    Chunk::from_vec(data.into(), true, true, None)
}

fn timed(data: impl Into<Vec<u8>>, keyframe: bool, pts: u64) -> Chunk {
    Chunk::from_vec(data.into(), keyframe, false, Some(pts))
}

fn payloads(parts: &[&[u8]]) -> Vec<gstrsmultifdsink::engine::Payload> {
    parts
        .iter()
        .map(|p| Arc::new(p.to_vec()) as gstrsmultifdsink::engine::Payload)
        .collect()
}

fn cfg(sync: SyncMethod, min: Option<Amount>, max: Option<Amount>) -> ClientConfig {
    ClientConfig {
        sync,
        burst_min: min,
        burst_max: max,
    }
}

fn bytes(v: u64) -> Option<Amount> {
    Some(Amount::new(Unit::Bytes, v))
}

fn latest() -> ClientConfig {
    ClientConfig::default()
}

const MS: u64 = 1_000_000;

// ---------------------------------------------------------------------------------
// fd helpers

fn bfd(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: the fixture keeps every fd used by a test open until the engine is stopped.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

/// Reads exactly `n` bytes, waiting with `poll` up to `WAIT`. Panics on EOF or timeout.
fn read_exact(fd: RawFd, n: usize) -> Vec<u8> {
    let deadline = Instant::now() + *WAIT;
    let mut buf = vec![0u8; n];
    let mut got = 0;
    while got < n {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "fd {fd}: timed out after {got} of {n} bytes"
        );
        let mut pfd = [PollFd::new(bfd(fd), PollFlags::POLLIN)];
        match poll(&mut pfd, PollTimeout::try_from(left).unwrap()) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => panic!("fd {fd}: poll: {e}"),
        }
        match nix::unistd::read(bfd(fd), &mut buf[got..]) {
            Ok(0) => panic!(
                "fd {fd}: EOF after {got} of {n} bytes: {:?}",
                String::from_utf8_lossy(&buf[..got])
            ),
            Ok(k) => got += k,
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
            Err(e) => panic!("fd {fd}: read: {e}"),
        }
    }
    buf
}

/// Reads exactly `expected.len()` bytes and compares them.
#[track_caller]
fn expect_read(fd: RawFd, expected: &[u8]) {
    let got = read_exact(fd, expected.len());
    if got != expected {
        panic!(
            "fd {fd}: read {:?}\n expected {:?}",
            String::from_utf8_lossy(&got[..got.len().min(256)]),
            String::from_utf8_lossy(&expected[..expected.len().min(256)])
        );
    }
}

/// The next read returns end of file (all writers closed, nothing left unread).
#[track_caller]
fn expect_eof(fd: RawFd) {
    let mut pfd = [PollFd::new(bfd(fd), PollFlags::POLLIN)];
    let n = poll(&mut pfd, PollTimeout::try_from(*WAIT).unwrap()).unwrap();
    assert_eq!(n, 1, "fd {fd}: no EOF");
    let mut one = [0u8; 1];
    assert_eq!(
        nix::unistd::read(bfd(fd), &mut one),
        Ok(0),
        "fd {fd}: data where EOF was expected"
    );
}

/// Writes all of `data` to a (non-blocking) fd, waiting with `poll` up to `WAIT`.
fn write_all(fd: RawFd, data: &[u8]) {
    let deadline = Instant::now() + *WAIT;
    let mut done = 0;
    while done < data.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "fd {fd}: timed out writing after {done} of {} bytes",
            data.len()
        );
        let mut pfd = [PollFd::new(bfd(fd), PollFlags::POLLOUT)];
        match poll(&mut pfd, PollTimeout::try_from(left).unwrap()) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => panic!("fd {fd}: poll: {e}"),
        }
        match nix::unistd::write(bfd(fd), &data[done..]) {
            Ok(k) => done += k,
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => {}
            Err(e) => panic!("fd {fd}: write: {e}"),
        }
    }
}

fn set_nonblocking(fd: RawFd) {
    let flags = OFlag::from_bits_truncate(fcntl(bfd(fd), FcntlArg::F_GETFL).unwrap());
    fcntl(bfd(fd), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).unwrap();
}

/// The fd is still open (the engine never closes what it was given).
#[track_caller]
fn assert_open(fd: RawFd) {
    assert!(
        fcntl(bfd(fd), FcntlArg::F_GETFD).is_ok(),
        "fd {fd} was closed"
    );
}

/// A directory of its own under the system's temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "rsmultifdsink-engine-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------
// The recording listener

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ev {
    Added(Fd),
    Removed(Fd, ClientStatus),
    FdRemoved(Fd),
}

type Hook = Arc<dyn Fn(&Arc<Engine>, Fd) + Send + Sync>;

#[derive(Default)]
struct RecState {
    events: Vec<(Ev, ThreadId)>,
    /// `engine.stats(fd)` as seen from inside `client_removed`.
    stats_at_removed: Vec<(Fd, Option<ClientStats>)>,
    /// Whether `engine.stats(fd)` still answered inside `client_fd_removed`.
    stats_at_fd_removed: Vec<(Fd, bool)>,
}

/// Records the engine's events in order and lets tests wait for them.
#[derive(Default)]
struct Recorder {
    state: Mutex<RecState>,
    cond: Condvar,
    engine: OnceLock<Weak<Engine>>,
    on_removed: Mutex<Option<Hook>>,
    on_fd_removed: Mutex<Option<Hook>>,
    on_added: Mutex<Option<Hook>>,
    /// With `Settings::report_sent`, `buffer_sent` (on the IO thread) costs this
    /// long: an IO thread slower than the stream, whatever the machine.
    io_cost: Mutex<Option<Duration>>,
    /// While true, `buffer_sent` holds the IO thread until it is opened.
    io_gate: (Mutex<bool>, Condvar),
    /// With `keep_logs`, the engine's warning and info lines.
    keep_logs: std::sync::atomic::AtomicBool,
    logs: Mutex<Vec<(gstrsmultifdsink::engine::LogLevel, String)>>,
    /// From the engine's log: rounds of writes submitted through io_uring, and
    /// IO threads that found io_uring unavailable.
    uring_rounds: AtomicUsize,
    uring_unavailable: AtomicUsize,
}

impl Recorder {
    fn lock(&self) -> MutexGuard<'_, RecState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn engine(&self) -> Option<Arc<Engine>> {
        self.engine.get().and_then(Weak::upgrade)
    }

    fn record(&self, ev: Ev) {
        self.lock().events.push((ev, std::thread::current().id()));
        self.cond.notify_all();
    }

    fn events(&self) -> Vec<Ev> {
        self.lock().events.iter().map(|(e, _)| *e).collect()
    }

    fn events_of(&self, fd: Fd) -> Vec<Ev> {
        self.events()
            .into_iter()
            .filter(
                |e| matches!(e, Ev::Added(f) | Ev::Removed(f, _) | Ev::FdRemoved(f) if *f == fd),
            )
            .collect()
    }

    fn thread_of(&self, ev: Ev) -> ThreadId {
        self.lock()
            .events
            .iter()
            .find(|(e, _)| *e == ev)
            .map(|(_, t)| *t)
            .expect("event recorded")
    }

    fn stats_at_removed(&self, fd: Fd) -> Option<ClientStats> {
        self.lock()
            .stats_at_removed
            .iter()
            .rev()
            .find(|(f, _)| *f == fd)
            .and_then(|(_, s)| *s)
    }

    fn set_on_removed(&self, hook: impl Fn(&Arc<Engine>, Fd) + Send + Sync + 'static) {
        *self.on_removed.lock().unwrap() = Some(Arc::new(hook));
    }

    fn set_on_added(&self, hook: impl Fn(&Arc<Engine>, Fd) + Send + Sync + 'static) {
        *self.on_added.lock().unwrap() = Some(Arc::new(hook));
    }

    fn set_on_fd_removed(&self, hook: impl Fn(&Arc<Engine>, Fd) + Send + Sync + 'static) {
        *self.on_fd_removed.lock().unwrap() = Some(Arc::new(hook));
    }

    fn set_gate(&self, closed: bool) {
        *self.io_gate.0.lock().unwrap() = closed;
        self.io_gate.1.notify_all();
    }

    /// Waits until `pred` holds for the events so far.
    #[track_caller]
    fn wait_for(&self, what: &str, pred: impl Fn(&[Ev]) -> bool) -> Vec<Ev> {
        let deadline = Instant::now() + *WAIT;
        let mut st = self.lock();
        loop {
            let evs: Vec<Ev> = st.events.iter().map(|(e, _)| *e).collect();
            if pred(&evs) {
                return evs;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(st);
                panic!("timed out waiting for {what}; events: {evs:?}");
            }
            st = self
                .cond
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits until `fd` is fully removed; checks that `client_removed` came first and
    /// returns its status.
    #[track_caller]
    fn wait_gone(&self, fd: Fd) -> ClientStatus {
        self.wait_for(&format!("removal of fd {fd}"), |evs| {
            evs.contains(&Ev::FdRemoved(fd))
        });
        removal_status(&self.events_of(fd), fd)
    }
}

/// The events of a client added once and then removed with `status`, in the order
/// the engine must signal them.
fn added_then_removed(fd: Fd, status: ClientStatus) -> Vec<Ev> {
    vec![Ev::Added(fd), Ev::Removed(fd, status), Ev::FdRemoved(fd)]
}

/// The status of the (last) removal of `fd`, checking `Removed` directly precedes
/// `FdRemoved` in that fd's events.
#[track_caller]
fn removal_status(evs: &[Ev], fd: Fd) -> ClientStatus {
    let end = evs
        .iter()
        .rposition(|e| *e == Ev::FdRemoved(fd))
        .unwrap_or_else(|| panic!("fd {fd} not removed: {evs:?}"));
    match evs[..end].last() {
        Some(Ev::Removed(f, status)) if *f == fd => *status,
        _ => panic!("fd {fd}: client_fd_removed without client_removed before it: {evs:?}"),
    }
}

impl Listener for Recorder {
    fn log(&self, level: gstrsmultifdsink::engine::LogLevel, args: std::fmt::Arguments<'_>) {
        let line = args.to_string();
        if line.starts_with("io_uring: ") {
            self.uring_rounds.fetch_add(1, Ordering::Relaxed);
        } else if line.starts_with("io_uring unavailable") {
            self.uring_unavailable.fetch_add(1, Ordering::Relaxed);
        }
        if std::env::var("ENGINE_LOG").is_ok() {
            eprintln!("{level:?} {line}");
        }
        if level <= gstrsmultifdsink::engine::LogLevel::Info
            && self.keep_logs.load(std::sync::atomic::Ordering::SeqCst)
        {
            self.logs.lock().unwrap().push((level, args.to_string()));
        }
    }

    fn buffer_sent(&self, _fd: Fd, _data: &gstrsmultifdsink::engine::Payload) {
        if let Some(cost) = *self.io_cost.lock().unwrap() {
            // Simulated work on the IO thread, not synchronisation.
            std::thread::sleep(cost);
        }
        let (closed, cond) = &self.io_gate;
        let mut closed = closed.lock().unwrap();
        while *closed {
            closed = cond.wait(closed).unwrap();
        }
    }

    fn client_added(&self, fd: Fd) {
        self.record(Ev::Added(fd));
        let hook = self.on_added.lock().unwrap().clone();
        if let (Some(hook), Some(engine)) = (hook, self.engine()) {
            hook(&engine, fd);
        }
    }

    fn client_removed(&self, fd: Fd, status: ClientStatus) {
        let engine = self.engine();
        let stats = engine.as_ref().and_then(|e| e.stats(fd));
        self.lock().stats_at_removed.push((fd, stats));
        self.record(Ev::Removed(fd, status));
        let hook = self.on_removed.lock().unwrap().clone();
        if let (Some(hook), Some(engine)) = (hook, engine.as_ref()) {
            hook(engine, fd);
        }
    }

    fn client_fd_removed(&self, fd: Fd) {
        let engine = self.engine();
        let known = engine.as_ref().is_some_and(|e| e.stats(fd).is_some());
        self.lock().stats_at_fd_removed.push((fd, known));
        self.record(Ev::FdRemoved(fd));
        let hook = self.on_fd_removed.lock().unwrap().clone();
        if let (Some(hook), Some(engine)) = (hook, engine.as_ref()) {
            hook(engine, fd);
        }
    }
}

// ---------------------------------------------------------------------------------
// The fixture: an engine, its recorder and the fds of the test

/// Owns the engine and every fd of a test. Dropping it stops the engine first, so
/// no fd is closed while the engine may still write to it.
struct Fixture {
    engine: Arc<Engine>,
    rec: Arc<Recorder>,
    fds: Mutex<HashMap<RawFd, OwnedFd>>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.engine.stop();
    }
}

impl Fixture {
    /// A started engine with these settings.
    fn new(settings: Settings) -> Fixture {
        let f = Fixture::unstarted(settings);
        f.engine.start().unwrap();
        f
    }

    fn unstarted(settings: Settings) -> Fixture {
        let rec = Arc::new(Recorder::default());
        let engine = Arc::new(Engine::new(rec.clone()).unwrap());
        rec.engine.set(Arc::downgrade(&engine)).ok().unwrap();
        engine.set_settings(settings);
        Fixture {
            engine,
            rec,
            fds: Mutex::new(HashMap::new()),
        }
    }

    fn own(&self, fd: impl Into<OwnedFd>) -> RawFd {
        let fd = fd.into();
        let raw = fd.as_raw_fd();
        self.fds.lock().unwrap().insert(raw, fd);
        raw
    }

    /// A pipe: (read end, write end).
    fn pipe(&self) -> (RawFd, RawFd) {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        (self.own(r), self.own(w))
    }

    /// A one-page pipe whose buffer is full, so the engine cannot write anything to
    /// it until the test drains `filled` bytes: (read end, write end, filled).
    fn full_pipe(&self) -> (RawFd, RawFd, usize) {
        let (r, w) = self.pipe();
        fcntl(bfd(w), FcntlArg::F_SETPIPE_SZ(4096)).unwrap();
        set_nonblocking(w);
        let filler = [b'.'; 4096];
        let mut filled = 0;
        for size in [4096, 1] {
            loop {
                match nix::unistd::write(bfd(w), &filler[..size]) {
                    Ok(k) => filled += k,
                    Err(Errno::EAGAIN) => break,
                    Err(e) => panic!("filling pipe: {e}"),
                }
            }
        }
        (r, w, filled)
    }

    /// Drains the filler of a `full_pipe`.
    fn drain(&self, r: RawFd, filled: usize) {
        let got = read_exact(r, filled);
        assert!(got.iter().all(|&c| c == b'.'), "filler corrupted");
    }

    /// A connected UNIX stream socketpair: (the engine's end, the peer's end).
    fn socketpair(&self) -> (RawFd, RawFd) {
        let (a, b) = unix_stream_pair();
        (self.own(a), self.own(b))
    }

    /// A socketpair whose engine end holds the whole of an overload test's stream:
    /// its writes never fail with EAGAIN, however late the scheduler runs its reader,
    /// so it is never a slow client.
    fn roomy_socketpair(&self) -> (RawFd, RawFd) {
        let (mine, peer) = self.socketpair();
        setsockopt(&bfd(mine), sockopt::SndBufForce, &(8 << 20)).expect("SO_SNDBUFFORCE (root)");
        (mine, peer)
    }

    /// A TCP connection on 127.0.0.1: (the accepted, server end; the client end).
    fn tcp(&self) -> (RawFd, RawFd) {
        let (server, client) = tcp_pair();
        (self.own(server), self.own(client))
    }

    /// Resets the TCP connection from the client's side (an abortive close: with
    /// SO_LINGER 0 the close sends an RST) and waits until the engine removed the
    /// server end: as closed or as an error, whichever of a read or a write met
    /// the reset first.
    #[track_caller]
    fn reset_tcp_and_wait_gone(&self, server: RawFd, client: RawFd) {
        setsockopt(
            &bfd(client),
            sockopt::Linger,
            &nix::libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        )
        .unwrap();
        self.close(client);
        let status = self.rec.wait_gone(server);
        assert!(
            matches!(status, ClientStatus::Closed | ClientStatus::Error),
            "{status:?}"
        );
    }

    /// Closes one of the test's fds now.
    fn close(&self, fd: RawFd) {
        let owned = self
            .fds
            .lock()
            .unwrap()
            .remove(&fd)
            .expect("fd of this test");
        nix::unistd::close(owned).expect("close succeeds");
    }

    fn add(&self, fd: Fd, config: ClientConfig) {
        assert_eq!(
            self.engine.add(fd, config),
            AddOutcome::Added,
            "add fd {fd}"
        );
    }

    fn push(&self, chunk: Chunk) {
        self.engine.push(chunk);
    }

    fn push_all(&self, chunks: impl IntoIterator<Item = Chunk>) {
        for c in chunks {
            self.engine.push(c);
        }
    }

    fn stats(&self, fd: Fd) -> ClientStats {
        self.engine
            .stats(fd)
            .unwrap_or_else(|| panic!("no stats for fd {fd}"))
    }

    fn bytes_sent(&self, fd: Fd) -> u64 {
        self.stats(fd).bytes_sent
    }

    fn num_handles(&self) -> u64 {
        self.engine.counters().num_handles
    }

    fn buffers_queued(&self) -> u64 {
        self.engine.counters().buffers_queued
    }

    /// The queue's counters from one reading: (bytes to serve, bytes served,
    /// buffers queued, bytes queued).
    fn queue_counters(&self) -> (u64, u64, u64, u64) {
        let c = self.engine.counters();
        (
            c.bytes_to_serve,
            c.bytes_served,
            c.buffers_queued,
            c.bytes_queued,
        )
    }
}

/// Runs `f` on its own thread and fails if it does not finish in time (a deadlock).
fn with_watchdog(name: &str, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(*WAIT) {
        Ok(()) => handle.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The closure panicked: report its panic.
            if let Err(p) = handle.join() {
                std::panic::resume_unwind(p);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{name}: deadlock (no progress in {:?})", *WAIT)
        }
    }
}

// ---------------------------------------------------------------------------------
// Adding clients

#[test]
fn add_before_start_and_after_stop_is_refused() {
    let f = Fixture::unstarted(Settings::default());
    let (_r, w) = f.pipe();
    assert_eq!(f.engine.add(w, latest()), AddOutcome::NotRunning);
    assert_eq!(f.engine.add(99, latest()), AddOutcome::NotRunning);
    assert_eq!(f.num_handles(), 0);
    assert!(f.rec.events().is_empty());
    assert!(f.engine.stats(w).is_none());
    // Pushing with no clients and without start is harmless.
    f.push(key(b(0)));

    f.engine.start().unwrap();
    f.engine.stop();
    assert_eq!(f.engine.add(w, latest()), AddOutcome::NotRunning);
    assert!(f.rec.events().is_empty());
    assert_eq!(f.num_handles(), 0);
}

#[test]
fn no_clients_push_is_accepted() {
    let f = Fixture::new(Settings::default());
    f.push(key(vec![0u8; 4]));
    let c = f.engine.counters();
    assert_eq!(c.bytes_to_serve, 4);
    assert_eq!(c.bytes_served, 0);
    assert_eq!(c.num_handles, 0);
}

#[test]
fn latest_client_gets_next_buffer_after_its_own_bytes() {
    let f = Fixture::new(Settings::default());
    f.push_all([key(b(0)), key(b(1))]);
    let (r, w) = f.pipe();
    // What the application wrote itself before add stays first.
    write_all(w, b"HTTP/1.0 200 OK\r\n\r\n");
    f.add(w, latest());
    assert_eq!(f.rec.events(), vec![Ev::Added(w)]);
    assert_eq!(
        f.rec.thread_of(Ev::Added(w)),
        std::thread::current().id(),
        "client-added is emitted on the caller's thread"
    );
    assert_eq!(f.num_handles(), 1);
    let s = f.stats(w);
    assert_eq!(s.bytes_sent, 0);
    assert_eq!(s.disconnect_time, 0);
    assert_eq!(s.first_buffer_ts, None);
    // Nothing is sent before a buffer arrives after the add.
    expect_read(r, b"HTTP/1.0 200 OK\r\n\r\n");
    f.push(key(b(2)));
    f.push(delta(b(3)));
    expect_read(r, &bs(2..=3));
    assert_eq!(f.bytes_sent(w), 32);
    let c = f.engine.counters();
    assert_eq!(c.bytes_served, 32);
    assert_eq!(c.bytes_to_serve, 64);
    assert_eq!(f.rec.events(), vec![Ev::Added(w)]);
}

#[test]
fn duplicate_add_only_signals_duplicate_and_first_client_continues() {
    let f = Fixture::new(Settings::default());
    let (r, w) = f.pipe();
    f.add(w, latest());
    f.push(key(b(0)));
    expect_read(r, &b(0));
    assert_eq!(f.engine.add(w, latest()), AddOutcome::Duplicate);
    assert_eq!(
        f.rec.events(),
        vec![Ev::Added(w), Ev::Removed(w, ClientStatus::Duplicate)]
    );
    assert_eq!(f.num_handles(), 1);
    // Inside the handler the stats of the live client were readable.
    assert_eq!(f.rec.stats_at_removed(w).unwrap().bytes_sent, 16);
    f.push(key(b(1)));
    expect_read(r, &b(1));
    assert_eq!(f.bytes_sent(w), 32);
    assert!(f.engine.remove(w, ClientStatus::Removed));
    assert_eq!(
        f.rec.events(),
        vec![
            Ev::Added(w),
            Ev::Removed(w, ClientStatus::Duplicate),
            Ev::Removed(w, ClientStatus::Removed),
            Ev::FdRemoved(w)
        ]
    );
}

#[test]
fn many_clients_joining_mid_stream_get_exact_streams() {
    let f = Fixture::new(Settings::default());
    let chunk = |i: u32| {
        let len = 1 + (i as usize * 997) % 3000;
        (0..len)
            .map(|k| (k as u32).wrapping_mul(31).wrapping_add(i) as u8)
            .collect::<Vec<u8>>()
    };
    let mut clients = Vec::new();
    for i in 0..120u32 {
        if i % 4 == 0 && clients.len() < 30 {
            let (ours, peer) = f.socketpair();
            f.add(ours, latest());
            // A latest client starts with the first buffer after its add.
            clients.push((ours, peer, i));
        }
        f.push(key(chunk(i)));
    }
    for &(ours, peer, from) in &clients {
        let expected: Vec<u8> = (from..120).flat_map(chunk).collect();
        expect_read(peer, &expected);
        assert_eq!(f.bytes_sent(ours), expected.len() as u64);
    }
    let served: u64 = clients
        .iter()
        .map(|&(_, _, from)| (from..120).map(|i| chunk(i).len() as u64).sum::<u64>())
        .sum();
    assert_eq!(f.engine.counters().bytes_served, served);
}

// ---------------------------------------------------------------------------------
// Streamheaders

#[test]
fn streamheader_sent_once_then_data() {
    let f = Fixture::new(Settings::default());
    let (r1, w1) = f.pipe();
    let (r2, w2) = f.pipe();
    assert_eq!(f.num_handles(), 0);
    f.add(w1, latest());
    assert_eq!(f.num_handles(), 1);
    f.engine
        .set_streamheader(Some(payloads(&[b"babe", b"deadbeef"])));
    // The HEADER buffers that repeat the caps' streamheader are not data.
    f.push(header(b"babe".to_vec()));
    f.push(header(b"deadbeef".to_vec()));
    assert_eq!(f.engine.counters().bytes_to_serve, 0);
    f.push(key(b"f00d".to_vec()));
    expect_read(r1, b"babe");
    expect_read(r1, b"deadbeef");
    expect_read(r1, b"f00d");
    assert_eq!(f.engine.counters().bytes_served, 16);

    f.add(w2, latest());
    assert_eq!(f.num_handles(), 2);
    f.push(key(b"deaf".to_vec()));
    expect_read(r1, b"deaf");
    expect_read(r2, b"babedeadbeefdeaf");
    let c = f.engine.counters();
    assert_eq!(c.bytes_served, 36);
    assert_eq!(c.bytes_to_serve, 8);
    assert_eq!(f.bytes_sent(w1), 20);
    assert_eq!(f.bytes_sent(w2), 16);

    assert!(f.engine.remove(w1, ClientStatus::Removed));
    assert_eq!(f.num_handles(), 1);
    assert!(f.engine.remove(w2, ClientStatus::Removed));
    assert_eq!(f.num_handles(), 0);
    f.close(w1);
    f.close(w2);
    expect_eof(r1);
    expect_eof(r2);
}

fn change_streamheader(resend: bool) {
    let f = Fixture::new(Settings {
        resend_streamheader: resend,
        ..Settings::default()
    });
    let (r1, w1) = f.pipe();
    let (r2, w2) = f.pipe();
    f.engine
        .set_streamheader(Some(payloads(&[b"first", b"header"])));
    f.push(header(b"first".to_vec()));
    f.push(header(b"header".to_vec()));
    f.add(w1, latest());
    f.push(key(b"f00d".to_vec()));
    expect_read(r1, b"firstheaderf00d");
    f.add(w2, latest());

    f.engine
        .set_streamheader(Some(payloads(&[b"second", b"header"])));
    f.push(header(b"second".to_vec()));
    f.push(header(b"header".to_vec()));
    f.push(key(b"deadbabe".to_vec()));
    if resend {
        expect_read(r1, b"secondheaderdeadbabe");
    } else {
        expect_read(r1, b"deadbabe");
    }
    // A client that never had a streamheader gets the current one only.
    expect_read(r2, b"secondheaderdeadbabe");
    assert_eq!(f.bytes_sent(w1), if resend { 35 } else { 23 });
    assert_eq!(f.bytes_sent(w2), 20);
    assert_eq!(f.engine.counters().bytes_to_serve, 12);

    // Setting the same streamheader again (new allocation, same bytes) is no change.
    f.engine
        .set_streamheader(Some(payloads(&[b"second", b"header"])));
    f.push(key(b"cafe".to_vec()));
    expect_read(r1, b"cafe");
    expect_read(r2, b"cafe");
    assert_eq!(f.bytes_sent(w2), 24);
}

#[test]
fn streamheader_change_is_resent() {
    change_streamheader(true);
}

#[test]
fn streamheader_change_without_resend() {
    change_streamheader(false);
}

#[test]
fn streamheader_change_while_a_buffer_is_half_written() {
    let f = Fixture::new(Settings::default());
    let (r, w) = f.pipe();
    f.add(w, latest());
    f.engine.set_streamheader(Some(payloads(&[b"OLD"])));
    // Far more than the pipe holds: the engine is left in the middle of it.
    f.push(key(big(0)));
    f.engine.set_streamheader(Some(payloads(&[b"NEW", b"HDR"])));
    f.push(key(b"data".to_vec()));
    expect_read(r, b"OLD");
    expect_read(r, &big(0));
    expect_read(r, b"NEWHDRdata");
    assert_eq!(f.bytes_sent(w), 3 + big(0).len() as u64 + 10);
}

#[test]
fn header_chunks_are_dropped_only_when_they_repeat_the_streamheader() {
    let f = Fixture::new(Settings::default());
    let (r, w) = f.pipe();
    f.add(w, latest());
    // No streamheader: a HEADER buffer is data.
    f.push(header(b"hdr0".to_vec()));
    expect_read(r, b"hdr0");
    f.engine.set_streamheader(Some(payloads(&[b"SH"])));
    f.push(header(b"SH".to_vec()));
    assert_eq!(f.engine.counters().bytes_to_serve, 4);
    // A HEADER buffer with other bytes is sent as data, after the streamheader.
    f.push(header(b"other".to_vec()));
    // A non-HEADER buffer with the streamheader's bytes is data too.
    f.push(delta(b"SH".to_vec()));
    expect_read(r, b"SHotherSH");
    assert_eq!(f.engine.counters().bytes_to_serve, 11);
    assert_eq!(f.bytes_sent(w), 13);
    // Clearing the streamheader: HEADER buffers are data again.
    f.engine.set_streamheader(None);
    f.push(header(b"SH".to_vec()));
    expect_read(r, b"SH");
    assert_eq!(f.bytes_sent(w), 15);
}

// ---------------------------------------------------------------------------------
// Sync methods and bursts (the C check-suite scenarios)

/// test_burst_client_bytes{,_keyframe,_with_keyframe}: bytes-min 100, B(0)..B(8)
/// queued with no clients, three clients added, B(9) pushed.
fn burst_scenario(
    sync: SyncMethod,
    keep_keyframe: bool,
    keyframes: &[u32],
    max2: u64,
    expected: [std::ops::RangeInclusive<u32>; 3],
) {
    let f = Fixture::new(Settings {
        bytes_min: Some(100),
        keep_keyframe,
        ..Settings::default()
    });
    let chunk = |i: u32| {
        if keyframes.contains(&i) {
            key(b(i))
        } else {
            delta(b(i))
        }
    };
    f.push_all((0..=8).map(chunk));
    // 7 x 16 = 112 >= 100, 6 x 16 = 96 is not enough.
    assert_eq!(f.buffers_queued(), 7);
    assert_eq!(f.engine.counters().bytes_queued, 112);

    let (r1, w1) = f.pipe();
    let (r2, w2) = f.pipe();
    let (r3, w3) = f.pipe();
    f.add(w1, cfg(sync, bytes(80), None));
    assert_eq!(f.num_handles(), 1);
    f.add(w2, cfg(sync, bytes(50), bytes(max2)));
    f.add(w3, cfg(sync, bytes(50), bytes(50)));
    assert_eq!(f.num_handles(), 3);
    f.push(chunk(9));
    assert_eq!(f.buffers_queued(), 7);

    let mut total = 0;
    for ((r, w), range) in [(r1, w1), (r2, w2), (r3, w3)].into_iter().zip(expected) {
        let want = bs(range.clone());
        expect_read(r, &want);
        assert_eq!(f.bytes_sent(w), want.len() as u64, "fd {w}: {range:?}");
        total += want.len() as u64;
    }
    assert_eq!(f.engine.counters().bytes_served, total);
}

#[test]
fn burst_client_bytes() {
    burst_scenario(SyncMethod::Burst, false, &[], 200, [5..=9, 6..=9, 7..=9]);
}

#[test]
fn burst_client_bytes_keyframe() {
    burst_scenario(
        SyncMethod::BurstKeyframe,
        true,
        &[0, 4, 8],
        90,
        [4..=9, 8..=9, 8..=9],
    );
}

#[test]
fn burst_client_bytes_with_keyframe() {
    burst_scenario(
        SyncMethod::BurstWithKeyframe,
        false,
        &[0, 4, 8],
        90,
        [4..=9, 6..=9, 7..=9],
    );
}

#[test]
fn burst_keyframe_without_keyframe_waits_for_next_keyframe() {
    let f = Fixture::new(Settings {
        bytes_min: Some(100),
        ..Settings::default()
    });
    f.push_all((0..=8).map(|i| delta(b(i))));
    let (r, w) = f.pipe();
    f.add(w, cfg(SyncMethod::BurstKeyframe, bytes(80), None));
    f.push(delta(b(9)));
    f.push(delta(b(10)));
    f.push(key(b(11)));
    f.push(delta(b(12)));
    expect_read(r, &bs(11..=12));
    assert_eq!(f.bytes_sent(w), 32);
}

#[test]
fn next_keyframe_client() {
    // test_client_next_keyframe: the first buffer after the add is a keyframe.
    let f = Fixture::new(Settings::default());
    let (r, w) = f.pipe();
    f.add(w, cfg(SyncMethod::NextKeyframe, None, None));
    f.push(key(b(0)));
    f.push(delta(b(1)));
    expect_read(r, &bs(0..=1));

    // A second client skips delta units until the next keyframe.
    let (r2, w2) = f.pipe();
    f.add(w2, cfg(SyncMethod::NextKeyframe, None, None));
    f.push_all([delta(b(2)), delta(b(3)), key(b(4)), delta(b(5))]);
    expect_read(r2, &bs(4..=5));
    expect_read(r, &bs(2..=5));
    assert_eq!(f.bytes_sent(w2), 32);
    // Skipped while waiting for a keyframe is not "dropped".
    assert_eq!(f.stats(w2).buffers_dropped, 0);
}

#[test]
fn latest_keyframe_client() {
    // The element's sync-method is latest-keyframe: the newest keyframe is kept.
    let f = Fixture::new(Settings {
        keep_keyframe: true,
        ..Settings::default()
    });
    f.push_all([key(b(0)), delta(b(1)), delta(b(2))]);
    assert_eq!(f.buffers_queued(), 3);
    let (r, w) = f.pipe();
    f.add(w, cfg(SyncMethod::LatestKeyframe, None, None));
    f.push(delta(b(3)));
    expect_read(r, &bs(0..=3));
    assert_eq!(f.bytes_sent(w), 64);
    // The newest keyframe moved on: older buffers are dropped.
    f.push(key(b(4)));
    expect_read(r, &b(4));
    assert_eq!(f.buffers_queued(), 1);
}

#[test]
fn latest_keyframe_without_keyframe_waits_for_next_one() {
    let f = Fixture::new(Settings::default());
    f.push(delta(b(0)));
    let (r, w) = f.pipe();
    f.add(w, cfg(SyncMethod::LatestKeyframe, None, None));
    f.push_all([delta(b(1)), delta(b(2)), key(b(3)), delta(b(4))]);
    expect_read(r, &bs(3..=4));
    assert_eq!(f.bytes_sent(w), 32);
}

#[test]
fn burst_in_buffers() {
    let f = Fixture::new(Settings {
        buffers_min: Some(5),
        ..Settings::default()
    });
    f.push_all((0..=5).map(|i| key(b(i))));
    assert_eq!(f.buffers_queued(), 5);
    let (r1, w1) = f.pipe();
    let (r2, w2) = f.pipe();
    let (r3, w3) = f.pipe();
    let buffers = |n| Some(Amount::new(Unit::Buffers, n));
    // At least 3 buffers, counting the one that makes the client start.
    f.add(w1, cfg(SyncMethod::Burst, buffers(3), None));
    // More than queued: from the oldest.
    f.add(w2, cfg(SyncMethod::Burst, buffers(50), None));
    // At most strictly below the maximum.
    f.add(w3, cfg(SyncMethod::Burst, buffers(3), buffers(2)));
    f.push(key(b(6)));
    expect_read(r1, &bs(4..=6));
    expect_read(r2, &bs(1..=6));
    expect_read(r3, &bs(6..=6));
    assert_eq!(f.bytes_sent(w1), 48);
    assert_eq!(f.bytes_sent(w2), 96);
    assert_eq!(f.bytes_sent(w3), 16);
}

#[test]
fn burst_in_time() {
    let f = Fixture::new(Settings {
        time_min: Some(30 * MS),
        ..Settings::default()
    });
    f.push_all((0..=9).map(|i| timed(b(i), true, u64::from(i) * 10 * MS)));
    // 90 - 60 = 30 ms >= time-min.
    assert_eq!(f.buffers_queued(), 4);
    let time = |ns| Some(Amount::new(Unit::Time, ns));
    let (r1, w1) = f.pipe();
    let (r2, w2) = f.pipe();
    f.add(w1, cfg(SyncMethod::Burst, time(20 * MS), None));
    f.add(w2, cfg(SyncMethod::Burst, time(30 * MS), time(25 * MS)));
    f.push(timed(b(10), true, 100 * MS));
    expect_read(r1, &bs(8..=10));
    expect_read(r2, &bs(8..=10));
    let s = f.stats(w1);
    assert_eq!(s.first_buffer_ts, Some(80 * MS));
    assert_eq!(s.last_buffer_ts, Some(100 * MS));
    // Buffers without a timestamp leave last-buffer-ts alone.
    f.push(key(b(11)));
    expect_read(r1, &b(11));
    assert_eq!(f.stats(w1).last_buffer_ts, Some(100 * MS));
    assert_eq!(f.stats(w1).first_buffer_ts, Some(80 * MS));
}

// ---------------------------------------------------------------------------------
// Slow clients: hard and soft limits

#[test]
fn units_max_kicks_slow_client_others_get_everything() {
    // test_client_kick: units-max 3 buffers, recover-policy none.
    let f = Fixture::new(Settings {
        units_max: Some(Amount::new(Unit::Buffers, 3)),
        ..Settings::default()
    });
    let (r1, w1) = f.pipe();
    let (r2, w2) = f.pipe();
    let (r3, w3) = f.pipe();
    for w in [w1, w2, w3] {
        f.add(w, latest());
    }
    f.push_all((0..3).map(|i| key(big(i))));
    assert_eq!(f.num_handles(), 3);
    for i in 0..3 {
        expect_read(r1, &big(i));
        expect_read(r3, &big(i));
    }
    // Client 2 is never read: its pipe is full.
    assert_eq!(f.num_handles(), 3);
    let mut pushed = 3;
    while f.num_handles() == 3 {
        assert!(pushed < 20, "slow client never kicked");
        f.push(key(big(pushed)));
        pushed += 1;
    }
    assert_eq!(f.num_handles(), 2);
    assert_eq!(f.rec.wait_gone(w2), ClientStatus::Slow);
    for i in 3..pushed {
        expect_read(r1, &big(i));
        expect_read(r3, &big(i));
    }
    let kicked = f.rec.stats_at_removed(w2).unwrap();
    assert!(kicked.bytes_sent < 3 * big(0).len() as u64);
    assert!(kicked.disconnect_time > 0 && kicked.disconnect_time_monotonic > 0);

    assert!(f.engine.remove(w1, ClientStatus::Removed));
    assert!(f.engine.remove(w3, ClientStatus::Removed));
    for w in [w1, w2, w3] {
        assert_open(w);
    }
    f.close(w1);
    f.close(w3);
    expect_eof(r1);
    expect_eof(r3);
    // Whatever client 2 got is a prefix of its stream, then nothing more.
    let got = read_exact(r2, kicked.bytes_sent as usize);
    let stream: Vec<u8> = (0..pushed).flat_map(big).collect();
    assert_eq!(got, stream[..got.len()]);
    f.close(w2);
    expect_eof(r2);
}

#[test]
fn units_max_kick_is_exact_in_buffers() {
    let f = Fixture::new(Settings {
        units_max: Some(Amount::new(Unit::Buffers, 2)),
        ..Settings::default()
    });
    let (_r, w, _) = f.full_pipe();
    let (r2, w2) = f.pipe();
    f.add(w, latest());
    f.add(w2, latest());
    f.push(key(b(0)));
    expect_read(r2, &b(0));
    f.push(key(b(1)));
    expect_read(r2, &b(1));
    // Two buffers pending is within the limit.
    assert_eq!(f.num_handles(), 2);
    assert_eq!(f.buffers_queued(), 2);
    f.push(key(b(2)));
    // The third is over it: removed before push returns.
    assert_eq!(f.num_handles(), 1);
    assert_eq!(f.rec.wait_gone(w), ClientStatus::Slow);
    assert_eq!(f.rec.stats_at_removed(w).unwrap().bytes_sent, 0);
    expect_read(r2, &b(2));
    assert_open(w);
    assert_eq!(f.buffers_queued(), 1);
}

#[test]
fn units_max_in_bytes() {
    let f = Fixture::new(Settings {
        units_max: Some(Amount::new(Unit::Bytes, 40)),
        ..Settings::default()
    });
    let (_r, w, _) = f.full_pipe();
    f.add(w, latest());
    f.push(key(b(0)));
    f.push(key(b(1)));
    // 32 bytes pending.
    assert_eq!(f.num_handles(), 1);
    f.push(key(b(2)));
    // 48 bytes pending > 40.
    assert_eq!(f.num_handles(), 0);
    assert_eq!(f.rec.wait_gone(w), ClientStatus::Slow);
}

/// A client on a full pipe with a soft limit of 3 buffers and this policy; the
/// chunks are pushed, then the pipe is drained. Returns what the client got after
/// the filler, and its dropped count.
fn soft_max_scenario(policy: RecoverPolicy, chunks: Vec<Chunk>) -> (Vec<u8>, u64) {
    let f = Fixture::new(Settings {
        units_soft_max: Some(Amount::new(Unit::Buffers, 3)),
        recover_policy: policy,
        ..Settings::default()
    });
    let (r, w, filled) = f.full_pipe();
    // A client that keeps up sees every buffer regardless.
    let (r2, w2) = f.pipe();
    f.add(w, latest());
    f.add(w2, latest());
    let all: Vec<u8> = chunks
        .iter()
        .flat_map(|c| (*c.data).as_ref().to_vec())
        .collect();
    for c in chunks {
        let data = (*c.data).as_ref().to_vec();
        f.push(c);
        // Keep the second client caught up, so only the first one lags.
        expect_read(r2, &data);
    }
    assert_eq!(f.num_handles(), 2, "soft limits never remove");
    let dropped = f.stats(w).buffers_dropped;
    f.drain(r, filled);
    let expected_len = all.len() - 16 * dropped as usize;
    let got = read_exact(r, expected_len);
    assert_eq!(
        f.bytes_sent(w),
        expected_len as u64,
        "nothing more was sent"
    );
    assert_eq!(f.stats(w2).buffers_dropped, 0);
    assert_eq!(f.rec.events(), vec![Ev::Added(w), Ev::Added(w2)]);
    (got, dropped)
}

#[test]
fn soft_max_recover_latest() {
    // Over the soft limit at B3 (4 pending): everything queued is skipped, the client
    // resumes with the next buffer.
    let (got, dropped) = soft_max_scenario(
        RecoverPolicy::Latest,
        (0..=5).map(|i| delta(b(i))).collect(),
    );
    assert_eq!(dropped, 4);
    assert_eq!(got, bs(4..=5));
}

#[test]
fn soft_max_recover_soft_limit() {
    // The client keeps the newest 3 buffers: each buffer over the limit drops one.
    let (got, dropped) = soft_max_scenario(
        RecoverPolicy::SoftLimit,
        (0..=5).map(|i| delta(b(i))).collect(),
    );
    assert_eq!(dropped, 3);
    assert_eq!(got, bs(3..=5));
}

#[test]
fn soft_max_recover_keyframe() {
    // Jumps to the oldest keyframe within the soft limit.
    let (got, dropped) = soft_max_scenario(
        RecoverPolicy::Keyframe,
        vec![key(b(0)), delta(b(1)), key(b(2)), delta(b(3)), delta(b(4))],
    );
    assert_eq!(dropped, 2);
    assert_eq!(got, bs(2..=4));
}

#[test]
fn soft_max_recover_keyframe_without_keyframe_skips_all() {
    let (got, dropped) = soft_max_scenario(
        RecoverPolicy::Keyframe,
        vec![
            key(b(0)),
            delta(b(1)),
            delta(b(2)),
            delta(b(3)),
            delta(b(4)),
        ],
    );
    assert_eq!(dropped, 4);
    assert_eq!(got, b(4));
}

#[test]
fn soft_max_with_policy_none_only_the_hard_max_acts() {
    let f = Fixture::new(Settings {
        units_soft_max: Some(Amount::new(Unit::Buffers, 1)),
        units_max: Some(Amount::new(Unit::Buffers, 4)),
        recover_policy: RecoverPolicy::None,
        ..Settings::default()
    });
    let (_r, w, _) = f.full_pipe();
    f.add(w, latest());
    f.push_all((0..4).map(|i| key(b(i))));
    assert_eq!(f.stats(w).buffers_dropped, 0);
    assert_eq!(f.buffers_queued(), 4);
    f.push(key(b(4)));
    assert_eq!(f.rec.wait_gone(w), ClientStatus::Slow);
    assert_eq!(f.rec.stats_at_removed(w).unwrap().buffers_dropped, 0);
}

#[test]
fn tighter_limits_apply_when_set() {
    let f = Fixture::new(Settings::default());
    let (_r, w, _) = f.full_pipe();
    f.add(w, latest());
    f.push_all((0..5).map(|i| key(b(i))));
    assert_eq!(f.buffers_queued(), 5);
    f.engine.set_settings(Settings {
        units_max: Some(Amount::new(Unit::Buffers, 2)),
        ..Settings::default()
    });
    assert_eq!(f.num_handles(), 0);
    assert_eq!(f.rec.wait_gone(w), ClientStatus::Slow);
    assert_eq!(f.buffers_queued(), 1);
}

// ---------------------------------------------------------------------------------
// Timeout

#[test]
fn timeout_removes_idle_client_without_buffers() {
    let dir = TempDir::new("timeout");
    let timeout = Duration::from_millis(100);
    let f = Fixture::new(Settings {
        timeout: Some(timeout),
        ..Settings::default()
    });
    let start = Instant::now();
    // Not synchronisation: only makes it likely that the IO thread is parked in
    // epoll_wait with no timeout (it has no clients) when they are added.
    std::thread::sleep(Duration::from_millis(20));
    // Clients that give the IO thread no epoll event at all: a pipe that cannot be
    // written and a regular file.
    let (_r, w, _) = f.full_pipe();
    let file = f.own(std::fs::File::create(dir.0.join("idle")).unwrap());
    f.add(w, latest());
    f.add(file, latest());
    assert_eq!(f.rec.wait_gone(w), ClientStatus::Slow);
    assert_eq!(f.rec.wait_gone(file), ClientStatus::Slow);
    assert!(start.elapsed() >= timeout);
    let s = f.rec.stats_at_removed(w).unwrap();
    assert!(s.connect_duration >= timeout.as_nanos() as u64);
    assert_eq!(s.bytes_sent, 0);
    // A writable socket too.
    let (ours, _peer) = f.socketpair();
    f.add(ours, latest());
    assert_eq!(f.rec.wait_gone(ours), ClientStatus::Slow);
    assert_open(ours);
    assert_open(w);
    assert_open(file);
}

#[test]
fn timeout_set_after_add_still_applies() {
    let f = Fixture::new(Settings::default());
    let (_r, w, _) = f.full_pipe();
    let (ours, peer) = f.socketpair();
    f.add(w, latest());
    f.add(ours, latest());
    f.push(key(b(0)));
    expect_read(peer, &b(0));
    // Not synchronisation: only makes it likely that the IO thread is parked in
    // epoll_wait with no timeout when the setting changes, the case this checks.
    std::thread::sleep(Duration::from_millis(20));
    f.engine.set_settings(Settings {
        timeout: Some(Duration::from_millis(50)),
        ..Settings::default()
    });
    assert_eq!(f.rec.wait_gone(w), ClientStatus::Slow);
    assert_eq!(f.rec.wait_gone(ours), ClientStatus::Slow);
}

#[test]
fn timeout_removes_blocked_client_while_buffers_flow() {
    let timeout = Duration::from_millis(300);
    let f = Fixture::new(Settings {
        timeout: Some(timeout),
        ..Settings::default()
    });
    let (_r, w, _) = f.full_pipe();
    f.add(w, latest());
    f.push(key(b(0)));
    assert_eq!(f.rec.wait_gone(w), ClientStatus::Slow);
    // A client that is written to is not idle: keep one busy until the other went.
    let (r2, w2) = f.pipe();
    let (_r3, w3, _) = f.full_pipe();
    f.add(w2, latest());
    f.add(w3, latest());
    let mut i = 1;
    while !f.rec.events().contains(&Ev::FdRemoved(w3)) {
        f.push(key(b(i)));
        expect_read(r2, &b(i));
        i += 1;
        // Pace the stream well inside the timeout, without relying on it for order.
        std::thread::sleep(Duration::from_millis(5));
        assert!(i < 10_000);
    }
    assert_eq!(removal_status(&f.rec.events_of(w3), w3), ClientStatus::Slow);
    assert!(f.engine.has_client(w2));
}

// ---------------------------------------------------------------------------------
// Reading from clients, peers going away, bad fds

#[test]
fn handle_read_discards_input_then_peer_close_is_closed() {
    let f = Fixture::new(Settings::default());
    let (ours, peer) = f.socketpair();
    f.add(ours, latest());
    set_nonblocking(peer);
    // Far more than the socket buffers hold: only completes if the engine reads.
    write_all(peer, &vec![b'j'; 4 << 20]);
    f.push(key(b(0)));
    expect_read(peer, &b(0));
    assert_eq!(f.rec.events(), vec![Ev::Added(ours)]);
    f.close(peer);
    assert_eq!(f.rec.wait_gone(ours), ClientStatus::Closed);
    assert_eq!(f.rec.stats_at_removed(ours).unwrap().bytes_sent, 16);
    assert_open(ours);
    // Junk does not count as activity or as served data.
    assert_eq!(f.engine.counters().bytes_served, 16);
}

#[test]
fn without_handle_read_peer_close_is_noticed() {
    let f = Fixture::new(Settings {
        handle_read: false,
        ..Settings::default()
    });
    let (ours, peer) = f.socketpair();
    f.add(ours, latest());
    f.push(key(b(0)));
    expect_read(peer, &b(0));
    f.close(peer);
    let status = f.rec.wait_gone(ours);
    assert!(
        matches!(status, ClientStatus::Closed | ClientStatus::Error),
        "{status:?}"
    );
}

#[test]
fn tcp_client_gets_exact_bytes_and_reset_removes_it() {
    let f = Fixture::new(Settings::default());
    let (server, client) = f.tcp();
    let (server2, client2) = f.tcp();
    f.add(server, latest());
    f.add(server2, latest());
    f.push_all((0..3).map(|i| key(big(i))));
    for i in 0..3 {
        expect_read(client, &big(i));
        expect_read(client2, &big(i));
    }
    f.reset_tcp_and_wait_gone(server, client);
    assert_open(server);
    // The other connection is unaffected.
    f.push(key(b(3)));
    expect_read(client2, &b(3));
    assert_eq!(f.num_handles(), 1);
}

#[test]
fn tcp_reset_while_writing_removes_client() {
    let f = Fixture::new(Settings::default());
    let (server, client) = f.tcp();
    f.add(server, latest());
    // More than the socket buffers hold, so the engine is still writing.
    f.push_all((0..16).map(|i| key(big(i))));
    expect_read(client, &big(0));
    f.reset_tcp_and_wait_gone(server, client);
}

#[test]
fn peer_gone_before_add_or_half_closed_is_closed() {
    let f = Fixture::new(Settings::default());
    // Closed before the add: noticed without any buffer.
    let (ours, peer) = f.socketpair();
    f.close(peer);
    f.add(ours, latest());
    assert_eq!(f.rec.wait_gone(ours), ClientStatus::Closed);
    // Input already waiting at add time is read; then the peer stops sending
    // (shutdown of its write side): that is a close, as in multifdsink.
    let (ours2, peer2) = f.socketpair();
    write_all(peer2, b"GET / HTTP/1.0\r\n\r\n");
    f.add(ours2, latest());
    f.push(key(b(0)));
    expect_read(peer2, &b(0));
    nix::sys::socket::shutdown(peer2, nix::sys::socket::Shutdown::Write).unwrap();
    assert_eq!(f.rec.wait_gone(ours2), ClientStatus::Closed);
    assert_eq!(f.rec.stats_at_removed(ours2).unwrap().bytes_sent, 16);
}

const SIGPIPE_CHILD: &str = "RSMULTIFDSINK_ENGINE_SIGPIPE_CHILD";

/// Pipes whose reader went away: status error, and no SIGPIPE kills the process;
/// with zero-copy too (sendfile has no MSG_NOSIGNAL), for pipes and sockets.
/// Runs in a child process with SIGPIPE's default action restored (the Rust runtime
/// ignores SIGPIPE, which would hide the problem).
#[test]
fn pipe_reader_closed_is_error_without_sigpipe() {
    if std::env::var_os(SIGPIPE_CHILD).is_some() {
        // SAFETY: no other handler is installed in this process.
        unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        }
        .unwrap();
        pipe_reader_closed_scenario(Settings::default());
        pipe_reader_closed_while_io_thread_busy(Settings::default());
        pipe_reader_closed_scenario(zero_copy());
        pipe_reader_closed_while_io_thread_busy(zero_copy());
        socket_peer_stopped_reading_scenario(Settings::default());
        socket_peer_stopped_reading_scenario(zero_copy());
        // io_uring's WRITEV to a pipe without reader raises SIGPIPE in the IO
        // thread too.
        pipe_reader_closed_scenario(with_io_uring());
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "pipe_reader_closed_is_error_without_sigpipe",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(SIGPIPE_CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 passed"), "child did not run: {stdout}");
}

fn pipe_reader_closed_scenario(settings: Settings) {
    let f = Fixture::new(settings);
    let (rg, wg) = f.pipe();
    f.add(wg, latest());
    let mut n = 0u32;
    for round in 0..20u32 {
        let (r, w) = f.pipe();
        f.add(w, latest());
        // Everything pushed this round, which the good client must get.
        let mut want = Vec::new();
        let mut push = |data: Vec<u8>| {
            want.extend_from_slice(&data);
            f.push(key(data));
        };
        match round % 4 {
            // Reader gone before any data.
            0 => {
                f.close(r);
                push(b(n));
            }
            // Reader goes right after data was queued: the write may see EPIPE.
            1 => {
                push(b(n));
                f.close(r);
            }
            // Reader goes while the engine is blocked on a full pipe.
            2 => {
                push(big(n));
                f.close(r);
            }
            // Reader reads some, then goes.
            _ => {
                push(b(n));
                expect_read(r, &b(n));
                f.close(r);
                push(b(n + 1));
            }
        }
        n += 2;
        assert_eq!(f.rec.wait_gone(w), ClientStatus::Error, "round {round}");
        assert_open(w);
        expect_read(rg, &want);
    }
    assert_eq!(f.num_handles(), 1);
    assert!(f.engine.has_client(wg));
}

/// Makes the IO thread write to a pipe with no reader before it sees the epoll
/// event: while it is busy serving a big file client, a new pipe client whose reader
/// is already gone becomes ready, and is written in the same serving loop.
fn pipe_reader_closed_while_io_thread_busy(settings: Settings) {
    let dir = TempDir::new("sigpipe");
    let f = Fixture::new(settings);
    let file = f.own(std::fs::File::create(dir.0.join("big")).unwrap());
    f.add(file, latest());
    let payload: gstrsmultifdsink::engine::Payload = Arc::new(vec![b'z'; 4 << 20]);
    for round in 0..3 {
        for _ in 0..4 {
            f.push(Chunk::new(payload.clone(), true, false, None));
        }
        let (r, w) = f.pipe();
        f.add(w, latest());
        f.close(r);
        f.push(key(b(round)));
        assert_eq!(f.rec.wait_gone(w), ClientStatus::Error);
    }
}

/// UNIX sockets whose peer shut down reading: the next write gets EPIPE (status
/// error), with no hang-up before it that would let the client go unwritten, and
/// no SIGPIPE. A good client meanwhile gets every byte.
fn socket_peer_stopped_reading_scenario(settings: Settings) {
    let f = Fixture::new(settings);
    let (good, good_peer) = f.socketpair();
    f.add(good, latest());
    let mut want = Vec::new();
    for round in 0..6u32 {
        let (ours, peer) = f.socketpair();
        f.add(ours, latest());
        if round % 2 == 1 {
            // Reads a buffer first, so the client is mid-stream.
            f.push(key(b(2 * round)));
            want.extend(b(2 * round));
            expect_read(peer, &b(2 * round));
        }
        nix::sys::socket::shutdown(peer, nix::sys::socket::Shutdown::Read).unwrap();
        f.push(key(big(2 * round + 1)));
        want.extend(big(2 * round + 1));
        assert_eq!(f.rec.wait_gone(ours), ClientStatus::Error, "round {round}");
    }
    expect_read(good_peer, &want);
}

#[test]
fn bad_fds_are_removed_with_error_from_the_io_side() {
    let dir = TempDir::new("bad-fds");
    let f = Fixture::new(Settings::default());
    let (rg, wg) = f.pipe();
    f.add(wg, latest());

    // A number that is not open: dup high up, then close.
    let (pr, _pw) = f.pipe();
    let closed = fcntl(bfd(pr), FcntlArg::F_DUPFD_CLOEXEC(900)).unwrap();
    // SAFETY: `closed` was just made by this test and nothing else uses it.
    nix::unistd::close(unsafe { OwnedFd::from_raw_fd(closed) }).unwrap();
    let directory = f.own(std::fs::File::open(&dir.0).unwrap());
    std::fs::write(dir.0.join("ro"), b"x").unwrap();
    let read_only = f.own(std::fs::File::open(dir.0.join("ro")).unwrap());
    // The read end of a pipe is read-only too.
    let (read_end, _w) = f.pipe();

    let me = std::thread::current().id();
    for fd in [-1, closed, directory, read_only, read_end] {
        f.add(fd, latest());
        assert_eq!(f.rec.thread_of(Ev::Added(fd)), me);
    }
    for fd in [-1, closed, directory, read_only, read_end] {
        assert_eq!(f.rec.wait_gone(fd), ClientStatus::Error, "fd {fd}");
        assert_eq!(
            f.rec.events_of(fd),
            added_then_removed(fd, ClientStatus::Error)
        );
        assert_ne!(
            f.rec.thread_of(Ev::Removed(fd, ClientStatus::Error)),
            me,
            "bad fd {fd} removed inside add"
        );
    }
    for fd in [directory, read_only, read_end] {
        assert_open(fd);
    }
    f.push(key(b(0)));
    expect_read(rg, &b(0));
    assert_eq!(f.num_handles(), 1);
    assert_eq!(f.bytes_sent(wg), 16);
}

#[test]
fn regular_file_clients_get_exact_bytes() {
    let dir = TempDir::new("files");
    let f = Fixture::new(Settings::default());
    let wo = f.own(std::fs::File::create(dir.0.join("wo")).unwrap());
    let rw = f.own(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.0.join("rw"))
            .unwrap(),
    );
    f.add(wo, latest());
    f.add(rw, latest());
    f.push_all((0..4).map(|i| key(big(i))));
    let want: Vec<u8> = (0..4).flat_map(big).collect();
    for fd in [wo, rw] {
        assert!(f.engine.remove_flush(fd));
        assert_eq!(f.rec.wait_gone(fd), ClientStatus::Removed);
        assert_eq!(
            f.rec.stats_at_removed(fd).unwrap().bytes_sent,
            want.len() as u64
        );
        assert_open(fd);
    }
    assert_eq!(std::fs::read(dir.0.join("wo")).unwrap(), want);
    assert_eq!(std::fs::read(dir.0.join("rw")).unwrap(), want);
}

// ---------------------------------------------------------------------------------
// io_uring: a batch of ready clients written with one submission

/// A UNIX socket, a TCP connection, a pipe and a regular file as clients of one
/// engine, each getting a stream of big buffers (larger than any of their kernel
/// buffers, so most writes are partial): exact bytes everywhere. A pipe that is
/// full when it is first written holds up nobody (its write must answer EAGAIN,
/// not wait for room) and gets its bytes once drained.
fn every_fd_kind_gets_exact_bytes(f: &Fixture, dir: &TempDir) {
    let (unix, unix_peer) = f.socketpair();
    let (tcp, tcp_peer) = f.tcp();
    let (pipe_r, pipe_w) = f.pipe();
    let (full_r, full_w, filled) = f.full_pipe();
    let file = f.own(std::fs::File::create(dir.0.join("out")).unwrap());
    for fd in [unix, tcp, pipe_w, full_w, file] {
        f.add(fd, latest());
    }
    let mut want = Vec::new();
    for i in 0..6 {
        f.push(key(big(i)));
        f.push(delta(b(i)));
        want.extend(big(i));
        want.extend(b(i));
    }
    // One reader at a time: the others stay blocked on full fds meanwhile.
    for peer in [unix_peer, tcp_peer, pipe_r] {
        expect_read(peer, &want);
    }
    f.drain(full_r, filled);
    expect_read(full_r, &want);
    for fd in [unix, tcp, pipe_w, full_w] {
        assert_eq!(f.bytes_sent(fd), want.len() as u64, "fd {fd}");
    }
    assert!(f.engine.remove_flush(file));
    assert_eq!(f.rec.wait_gone(file), ClientStatus::Removed);
    assert_eq!(std::fs::read(dir.0.join("out")).unwrap(), want);
    assert_eq!(f.num_handles(), 4);
}

#[test]
fn io_uring_every_fd_kind_gets_exact_bytes() {
    let dir = TempDir::new("uring-kinds");
    let f = Fixture::new(with_io_uring());
    every_fd_kind_gets_exact_bytes(&f, &dir);
    assert!(f.rec.uring_rounds.load(Ordering::Relaxed) > 0);
    assert_eq!(f.rec.uring_unavailable.load(Ordering::Relaxed), 0);
}

/// Clients whose peer went away (sockets: EPIPE or a hang-up; pipes: EPIPE), one per
/// round, before, while and after data was queued for them, among clients that
/// read: only they are removed, and the others get every byte.
#[test]
fn io_uring_failing_fd_removes_only_that_client() {
    let f = Fixture::new(with_io_uring());
    // (the engine's end, the reader's end)
    let client = |socket: bool| {
        if socket {
            f.socketpair()
        } else {
            let (r, w) = f.pipe();
            (w, r)
        }
    };
    let good: Vec<(RawFd, RawFd)> = (0..6).map(|i| client(i % 2 == 0)).collect();
    for &(ours, _) in &good {
        f.add(ours, latest());
    }
    let mut n = 0;
    for round in 0..9u32 {
        let (ours, peer) = client(round % 2 == 0);
        f.add(ours, latest());
        let mut want = Vec::new();
        let mut push = |data: Vec<u8>| {
            want.extend_from_slice(&data);
            f.push(key(data));
        };
        match round % 3 {
            0 => {
                f.close(peer);
                push(b(n));
            }
            1 => {
                push(b(n));
                f.close(peer);
                push(b(n + 1));
            }
            // Blocked on its full fd when the peer goes.
            _ => {
                push(big(n));
                f.close(peer);
                push(b(n + 1));
            }
        }
        n += 2;
        let status = f.rec.wait_gone(ours);
        assert!(
            matches!(status, ClientStatus::Closed | ClientStatus::Error),
            "round {round}: {status:?}"
        );
        assert_open(ours);
        for &(_, reader) in &good {
            expect_read(reader, &want);
        }
    }
    assert_eq!(f.num_handles(), 6);
    assert!(f.rec.uring_rounds.load(Ordering::Relaxed) > 0);
}

/// Makes `io_uring_setup` fail with ENOSYS, as on a kernel without io_uring, in this
/// thread and the threads it starts from now on (a seccomp filter: the test
/// harness's other threads keep io_uring). Checks the native syscall number only.
fn deny_io_uring_setup() {
    use nix::libc;
    let stmt = |code: u32, k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let filter = [
        // The syscall number: seccomp_data.nr, at offset 0.
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0),
        stmt(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            libc::SYS_io_uring_setup as u32,
            0,
            1,
        ),
        stmt(
            libc::BPF_RET | libc::BPF_K,
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
            0,
            0,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW, 0, 0),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with a valid filter program that outlives the call.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog
            ),
            0,
            "seccomp: {}",
            Errno::last()
        );
    }
}

/// Where io_uring cannot be set up, `io_uring` writes with the system calls: the
/// same exact bytes, one log line.
#[test]
fn io_uring_unavailable_falls_back_to_system_calls() {
    let scenario = std::thread::spawn(|| {
        deny_io_uring_setup();
        let dir = TempDir::new("uring-fallback");
        let f = Fixture::new(with_io_uring());
        every_fd_kind_gets_exact_bytes(&f, &dir);
        assert_eq!(f.rec.uring_unavailable.load(Ordering::Relaxed), 1);
        assert_eq!(f.rec.uring_rounds.load(Ordering::Relaxed), 0);
    });
    if let Err(panic) = scenario.join() {
        std::panic::resume_unwind(panic);
    }
}

// ---------------------------------------------------------------------------------
// Removal

#[test]
fn remove_is_synchronous_and_stats_work_in_the_handler() {
    let f = Fixture::new(Settings::default());
    let (r, w) = f.pipe();
    f.add(w, latest());
    f.push(key(b(0)));
    expect_read(r, &b(0));
    assert!(f.engine.remove(w, ClientStatus::Removed));
    // Both signals before remove returned, in order.
    assert_eq!(f.rec.events(), added_then_removed(w, ClientStatus::Removed));
    let me = std::thread::current().id();
    assert_eq!(f.rec.thread_of(Ev::Removed(w, ClientStatus::Removed)), me);
    assert_eq!(f.rec.thread_of(Ev::FdRemoved(w)), me);
    let s = f
        .rec
        .stats_at_removed(w)
        .expect("stats inside client_removed");
    assert_eq!(s.bytes_sent, 16);
    assert!(s.disconnect_time >= s.connect_time && s.disconnect_time > 0);
    assert!(s.disconnect_time_monotonic >= s.connect_time_monotonic);
    assert!(s.last_activity_time_monotonic >= s.connect_time_monotonic);
    assert_eq!(s.first_buffer_ts, None);
    // Forgotten by client_fd_removed.
    assert_eq!(f.rec.lock().stats_at_fd_removed, vec![(w, false)]);
    assert!(f.engine.stats(w).is_none());
    assert_eq!(f.num_handles(), 0);
    assert_open(w);
    // A second remove is only a warning.
    assert!(!f.engine.remove(w, ClientStatus::Removed));
    assert!(!f.engine.remove_flush(w));
    assert_eq!(f.rec.events().len(), 3);
    // Nothing more is written to a removed fd.
    f.push(key(b(1)));
    // The same number can be added again at once, as a new client.
    f.add(w, latest());
    assert_eq!(f.bytes_sent(w), 0);
    f.push(key(b(2)));
    expect_read(r, &b(2));
    assert!(f.engine.remove(w, ClientStatus::Removed));
    f.close(w);
    expect_eof(r);
}

#[test]
fn remove_flush_sends_what_was_queued_then_removes() {
    let f = Fixture::new(Settings::default());
    let (r, w, filled) = f.full_pipe();
    let (r2, w2) = f.pipe();
    f.add(w, latest());
    f.add(w2, latest());
    f.push_all((0..4).map(|i| key(b(i))));
    assert!(f.engine.remove_flush(w));
    // Still a client until it is flushed; newer buffers are not for it.
    assert_eq!(f.num_handles(), 2);
    f.push_all((4..6).map(|i| key(b(i))));
    assert_eq!(f.rec.events(), vec![Ev::Added(w), Ev::Added(w2)]);
    f.drain(r, filled);
    expect_read(r, &bs(0..=3));
    assert_eq!(f.rec.wait_gone(w), ClientStatus::Removed);
    assert_eq!(f.rec.stats_at_removed(w).unwrap().bytes_sent, 64);
    assert_open(w);
    f.close(w);
    expect_eof(r);
    expect_read(r2, &bs(0..=5));
    assert_eq!(f.num_handles(), 1);
}

#[test]
fn remove_flush_of_caught_up_client_removes_it_now() {
    let f = Fixture::new(Settings::default());
    let (r, w) = f.pipe();
    f.add(w, latest());
    f.push(key(b(0)));
    expect_read(r, &b(0));
    assert!(f.engine.remove_flush(w));
    assert_eq!(f.rec.wait_gone(w), ClientStatus::Removed);
    f.push(key(b(1)));
    f.close(w);
    expect_eof(r);
    // A client that never had data goes too.
    let (r2, w2) = f.pipe();
    f.add(w2, latest());
    assert!(f.engine.remove_flush(w2));
    assert_eq!(f.rec.wait_gone(w2), ClientStatus::Removed);
    f.close(w2);
    expect_eof(r2);
}

#[test]
fn clear_removes_everybody() {
    let f = Fixture::new(Settings::default());
    let fds: Vec<(RawFd, RawFd)> = (0..4).map(|_| f.pipe()).collect();
    for &(_, w) in &fds {
        f.add(w, latest());
    }
    f.push(key(b(0)));
    for &(r, _) in &fds {
        expect_read(r, &b(0));
    }
    f.engine.clear();
    assert_eq!(f.num_handles(), 0);
    let evs = f.rec.events();
    assert_eq!(evs.len(), 4 * 3);
    for &(r, w) in &fds {
        assert_eq!(removal_status(&evs, w), ClientStatus::Removed);
        let i = evs
            .iter()
            .position(|e| *e == Ev::Removed(w, ClientStatus::Removed))
            .unwrap();
        assert_eq!(evs[i + 1], Ev::FdRemoved(w), "pairs are adjacent");
        assert_open(w);
        f.push(key(b(1)));
        f.close(w);
        expect_eof(r);
    }
    // Still running: new clients work.
    let (r, w) = f.pipe();
    f.add(w, latest());
    f.push(key(b(2)));
    expect_read(r, &b(2));
}

#[test]
fn stop_removes_everybody_and_restart_resets() {
    let f = Fixture::new(Settings::default());
    let (r1, w1) = f.pipe();
    let (_r2, w2, _) = f.full_pipe();
    f.add(w1, latest());
    f.add(w2, latest());
    f.engine.set_streamheader(Some(payloads(&[b"SH"])));
    f.push_all((0..3).map(|i| key(b(i))));
    expect_read(r1, b"SH");
    expect_read(r1, &bs(0..=2));
    assert_eq!(f.buffers_queued(), 3);
    f.engine.stop();
    assert_eq!(f.num_handles(), 0);
    for w in [w1, w2] {
        assert_eq!(
            f.rec.events_of(w),
            added_then_removed(w, ClientStatus::Removed)
        );
        assert_open(w);
    }
    assert_eq!(f.buffers_queued(), 0);
    assert_eq!(f.engine.add(w1, latest()), AddOutcome::NotRunning);

    // Start again: counters start from zero, the old streamheader is gone.
    f.engine.start().unwrap();
    let c = f.engine.counters();
    assert_eq!((c.bytes_to_serve, c.bytes_served), (0, 0));
    f.add(w1, latest());
    f.push(key(b(3)));
    expect_read(r1, &b(3));
    let c = f.engine.counters();
    assert_eq!((c.bytes_to_serve, c.bytes_served), (16, 16));
}

// ---------------------------------------------------------------------------------
// Re-entrancy

#[test]
fn handlers_may_add_and_remove_from_client_removed() {
    with_watchdog("re-entrant handlers", || {
        let f = Fixture::new(Settings::default());
        let (_ra, a) = f.pipe();
        let (_rb, b_) = f.pipe();
        let (rc, c) = f.pipe();
        f.add(a, latest());
        f.add(b_, latest());
        f.rec.set_on_removed(move |engine, fd| {
            if fd == a {
                // Remove another client, remove this one again, add a new one, and
                // read figures: none of it may deadlock.
                assert!(engine.remove(b_, ClientStatus::Removed));
                assert!(!engine.remove(a, ClientStatus::Removed));
                assert_eq!(engine.add(c, ClientConfig::default()), AddOutcome::Added);
                let _ = engine.counters();
                assert!(engine.stats(a).is_some());
                assert!(engine.has_client(c));
            }
        });
        assert!(f.engine.remove(a, ClientStatus::Removed));
        assert_eq!(
            f.rec.events()[2..],
            [
                Ev::Removed(a, ClientStatus::Removed),
                Ev::Removed(b_, ClientStatus::Removed),
                Ev::FdRemoved(b_),
                Ev::Added(c),
                Ev::FdRemoved(a),
            ]
        );
        assert_eq!(f.num_handles(), 1);
        f.push(key(b(0)));
        expect_read(rc, &b(0));
    });
}

#[test]
fn handlers_may_add_and_remove_on_the_io_thread() {
    with_watchdog("re-entrant handlers on the IO thread", || {
        let f = Fixture::new(Settings::default());
        let (ra, a) = f.pipe();
        let (_rb, b_) = f.pipe();
        let (rc, c) = f.pipe();
        f.add(a, latest());
        f.add(b_, latest());
        let first = std::sync::atomic::AtomicBool::new(true);
        f.rec.set_on_removed(move |engine, fd| {
            if fd == a && first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                assert!(engine.remove(b_, ClientStatus::Removed));
                assert_eq!(engine.add(c, ClientConfig::default()), AddOutcome::Added);
                assert!(engine.stats(a).is_some());
            }
        });
        // Re-adding the same number from client_fd_removed (once).
        let readded = std::sync::atomic::AtomicBool::new(false);
        f.rec.set_on_fd_removed(move |engine, fd| {
            if fd == a && !readded.swap(true, std::sync::atomic::Ordering::SeqCst) {
                assert_eq!(engine.add(a, ClientConfig::default()), AddOutcome::Added);
            }
        });
        // The reader of A goes away: the IO thread removes A with an error.
        f.close(ra);
        f.rec.wait_for("A re-added", |evs| {
            evs.iter().filter(|e| **e == Ev::Added(a)).count() == 2
        });
        assert_eq!(
            removal_status(&f.rec.events_of(b_), b_),
            ClientStatus::Removed
        );
        let a_events = f.rec.events_of(a);
        assert_eq!(a_events[1], Ev::Removed(a, ClientStatus::Error));
        assert!(f.engine.has_client(c));
        f.push(key(b(0)));
        expect_read(rc, &b(0));
        // The re-added A has no reader either: it goes again.
        f.rec.wait_for("A removed twice", |evs| {
            evs.iter().filter(|e| **e == Ev::FdRemoved(a)).count() == 2
        });
        assert_eq!(f.num_handles(), 1);
    });
}

#[test]
fn handler_stopping_the_engine_does_not_deadlock() {
    with_watchdog("stop from a handler", || {
        let f = Fixture::new(Settings::default());
        let (ra, a) = f.pipe();
        let (_rb, b_) = f.pipe();
        f.add(a, latest());
        f.add(b_, latest());
        f.rec.set_on_removed(move |engine, fd| {
            if fd == a {
                engine.stop();
            }
        });
        f.close(ra);
        f.rec.wait_for("both removed", |evs| {
            evs.contains(&Ev::FdRemoved(a)) && evs.contains(&Ev::FdRemoved(b_))
        });
        assert_eq!(removal_status(&f.rec.events_of(a), a), ClientStatus::Error);
        assert_eq!(
            removal_status(&f.rec.events_of(b_), b_),
            ClientStatus::Removed
        );
        assert_eq!(f.engine.add(b_, latest()), AddOutcome::NotRunning);
    });
}

#[test]
fn handlers_may_add_and_remove_from_client_added() {
    with_watchdog("re-entrant client_added", || {
        let f = Fixture::new(Settings::default());
        let (_ra, a) = f.pipe();
        let (rb, b_) = f.pipe();
        f.rec.set_on_added(move |engine, fd| {
            if fd == a {
                // Remove the client that is being added, and add another.
                assert!(engine.remove(a, ClientStatus::Removed));
                assert_eq!(engine.add(b_, ClientConfig::default()), AddOutcome::Added);
            }
        });
        f.add(a, latest());
        assert_eq!(
            f.rec.events(),
            vec![
                Ev::Added(a),
                Ev::Removed(a, ClientStatus::Removed),
                Ev::FdRemoved(a),
                Ev::Added(b_),
            ]
        );
        assert!(!f.engine.has_client(a));
        assert_eq!(f.num_handles(), 1);
        f.push(key(b(0)));
        expect_read(rb, &b(0));
    });
}

// ---------------------------------------------------------------------------------
// Counters and trimming

#[test]
fn counters_are_exact() {
    let f = Fixture::new(Settings::default());
    let (r1, w1) = f.pipe();
    let (r2, w2, filled) = f.full_pipe();
    f.add(w1, latest());
    f.add(w2, latest());
    assert_eq!(f.num_handles(), 2);
    f.push(key(vec![b'a'; 10]));
    expect_read(r1, &[b'a'; 10]);
    assert_eq!(f.queue_counters(), (10, 10, 1, 10));
    f.push(key(vec![b'b'; 20]));
    f.push(key(vec![b'c'; 30]));
    expect_read(r1, &cat(&[&[b'b'; 20], &[b'c'; 30]]));
    // The blocked client still needs all three.
    assert_eq!(f.queue_counters(), (60, 60, 3, 60));
    f.drain(r2, filled);
    expect_read(r2, &cat(&[&[b'a'; 10], &[b'b'; 20], &[b'c'; 30]]));
    let c = f.engine.counters();
    assert_eq!((c.bytes_to_serve, c.bytes_served), (60, 120));
    // Trimming happens when a buffer arrives.
    f.push(key(vec![b'd'; 5]));
    expect_read(r1, &[b'd'; 5]);
    expect_read(r2, &[b'd'; 5]);
    assert_eq!(f.queue_counters(), (65, 130, 1, 5));
    assert_eq!(f.bytes_sent(w1), 65);
    assert_eq!(f.bytes_sent(w2), 65);
    assert!(f.engine.remove(w2, ClientStatus::Removed));
    assert_eq!(f.num_handles(), 1);
    f.engine.clear();
    assert_eq!(f.num_handles(), 0);
    // Stats of an unknown fd: none.
    assert!(f.engine.stats(w1).is_none());
}

#[test]
fn trimming_by_mins_and_keyframe() {
    // No clients, no mins: only the newest buffer stays.
    let f = Fixture::new(Settings::default());
    f.push_all((0..5).map(|i| key(b(i))));
    assert_eq!(f.buffers_queued(), 1);
    drop(f);

    let f = Fixture::new(Settings {
        buffers_min: Some(4),
        ..Settings::default()
    });
    f.push_all((0..3).map(|i| key(b(i))));
    assert_eq!(f.buffers_queued(), 3);
    f.push_all((3..10).map(|i| key(b(i))));
    assert_eq!(f.buffers_queued(), 4);
    assert_eq!(f.engine.counters().bytes_queued, 64);
    // Lowering the minimum trims at once.
    f.engine.set_settings(Settings {
        buffers_min: Some(2),
        ..Settings::default()
    });
    assert_eq!(f.buffers_queued(), 2);
    // A burst can only reach what was kept.
    let (r, w) = f.pipe();
    f.add(
        w,
        cfg(
            SyncMethod::Burst,
            Some(Amount::new(Unit::Buffers, 10)),
            None,
        ),
    );
    f.push(key(b(10)));
    expect_read(r, &bs(8..=10));
    drop(f);

    let f = Fixture::new(Settings {
        bytes_min: Some(100),
        ..Settings::default()
    });
    f.push_all((0..20).map(|i| key(b(i))));
    assert_eq!(f.buffers_queued(), 7);
    f.push(key(vec![0u8; 100]));
    assert_eq!(f.buffers_queued(), 1);
    drop(f);

    let f = Fixture::new(Settings {
        time_min: Some(25 * MS),
        ..Settings::default()
    });
    f.push_all((0..10).map(|i| timed(b(i), true, u64::from(i) * 10 * MS)));
    assert_eq!(f.buffers_queued(), 4);
    assert_eq!(f.engine.counters().time_queued, 30 * MS);
    drop(f);

    let f = Fixture::new(Settings {
        keep_keyframe: true,
        ..Settings::default()
    });
    f.push(key(b(0)));
    f.push_all((1..6).map(|i| delta(b(i))));
    assert_eq!(f.buffers_queued(), 6);
    f.push(key(b(6)));
    assert_eq!(f.buffers_queued(), 1);
}

/// A `clear` on another thread while `client-added` is being emitted: the removal
/// signals wait until `client-added` returned (the app must never see
/// `client-fd-removed`, and close the fd, while `client-added` for it runs).
#[test]
fn removal_during_client_added_waits_for_it() {
    let f = Fixture::new(Settings::default());
    let (_r, w) = f.pipe();
    let seen_during_added: Arc<Mutex<Option<Vec<Ev>>>> = Default::default();
    let seen = seen_during_added.clone();
    // Weak: the recorder owns this hook, a strong reference would be a cycle.
    let rec = Arc::downgrade(&f.rec);
    f.rec.set_on_added(move |engine, _fd| {
        let engine = engine.clone();
        std::thread::spawn(move || engine.clear()).join().unwrap();
        *seen.lock().unwrap() = rec.upgrade().map(|r| r.events());
    });
    f.add(w, latest());
    let during = seen_during_added.lock().unwrap().clone().unwrap();
    assert_eq!(
        during,
        vec![Ev::Added(w)],
        "removal signals overtook client-added"
    );
    assert_eq!(
        f.rec.events_of(w),
        added_then_removed(w, ClientStatus::Removed)
    );
    assert!(!f.engine.has_client(w));
}

// ---------------------------------------------------------------------------------
// Overload: the IO thread, not the clients, is behind

/// Buffer `i` of an overload test: 16 KiB of one byte value, a keyframe every
/// second one (so one is always within `units-max` 4 for a recovery to land on).
fn overload_buffer(i: u32) -> Chunk {
    let data = vec![(i % 251) as u8; 16 * 1024];
    if i.is_multiple_of(2) {
        key(data)
    } else {
        delta(data)
    }
}

/// Reads everything `fd` receives until `want` bytes or EOF; returns the buffer
/// numbers seen, in order (each 16 KiB run of one byte value is one buffer).
fn read_buffers(fd: RawFd, want: usize) -> std::thread::JoinHandle<Vec<u32>> {
    std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut total = 0;
        let deadline = Instant::now() + *WAIT;
        while total < want {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "fd {fd}: only {total} of {want} bytes arrived"
            );
            let mut pfd = [PollFd::new(bfd(fd), PollFlags::POLLIN)];
            let ms = PollTimeout::try_from(left.as_millis().min(10_000) as i32).unwrap();
            if poll(&mut pfd, ms).unwrap_or(0) == 0 {
                continue;
            }
            match nix::unistd::read(bfd(fd), &mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    got.extend_from_slice(&chunk[..n]);
                    total += n;
                }
                Err(Errno::EINTR) => {}
                Err(e) => panic!("read: {e}"),
            }
        }
        got.chunks(16 * 1024)
            .map(|b| {
                assert!(b.iter().all(|&c| c == b[0]), "a buffer was cut or mixed");
                u32::from(b[0])
            })
            .collect()
    })
}

/// Adds `n` clients on roomy socketpairs (never slow), each drained by a reader
/// thread that expects `buffers` overload buffers (see `read_buffers`).
fn draining_clients(f: &Fixture, n: usize, buffers: u32) -> Vec<std::thread::JoinHandle<Vec<u32>>> {
    (0..n)
        .map(|_| {
            let (mine, peer) = f.roomy_socketpair();
            f.add(mine, latest());
            read_buffers(peer, buffers as usize * 16 * 1024)
        })
        .collect()
}

/// An engine whose IO thread costs `cost` per buffer written to a client, with
/// `units-max` of `limit` buffers: a fast producer outruns it at once.
fn slow_io_fixture(policy: OverloadPolicy, cost: Duration, limit: u64) -> Fixture {
    let f = Fixture::new(Settings {
        units_max: Some(Amount::new(Unit::Buffers, limit)),
        report_sent: true,
        overload_policy: policy,
        ..Settings::default()
    });
    *f.rec.io_cost.lock().unwrap() = Some(cost);
    f
}

#[test]
fn saturated_io_thread_keeps_every_draining_client_and_slows_the_stream() {
    let f = slow_io_fixture(OverloadPolicy::BackPressure, Duration::from_micros(600), 4);
    const BUFFERS: u32 = 200;
    let readers = draining_clients(&f, 8, BUFFERS);
    let mut waited = Duration::ZERO;
    // io-load, read while the IO thread is the bottleneck (afterwards it idles).
    let mut busiest = 0.0f64;
    for i in 0..BUFFERS {
        waited += f.engine.push(overload_buffer(i)).waited;
        busiest = busiest.max(f.engine.io_load());
    }
    for reader in readers {
        let got = reader.join().unwrap();
        let want: Vec<u32> = (0..BUFFERS).map(|i| i % 251).collect();
        assert_eq!(got, want, "a draining client lost buffers");
    }
    // Nobody went: the stream waited for the IO thread instead.
    assert_eq!(f.num_handles(), 8);
    assert!(
        !f.rec.events().iter().any(|e| matches!(e, Ev::Removed(..))),
        "{:?}",
        f.rec.events()
    );
    assert!(waited > Duration::ZERO, "the stream never waited");
    assert!(
        busiest > 0.5,
        "io-load at most {busiest} while the IO thread was behind"
    );
}

#[test]
fn stalled_client_next_to_draining_ones_is_removed_as_slow() {
    let f = slow_io_fixture(OverloadPolicy::BackPressure, Duration::from_micros(100), 4);
    const BUFFERS: u32 = 200;
    let readers = draining_clients(&f, 4, BUFFERS);
    let (stalled, _never_read) = f.socketpair();
    f.add(stalled, latest());
    for i in 0..BUFFERS {
        f.engine.push(overload_buffer(i));
    }
    // Its socket filled up while it was past units-max: slow.
    assert_eq!(f.rec.wait_gone(stalled), ClientStatus::Slow);
    for reader in readers {
        assert_eq!(reader.join().unwrap().len(), BUFFERS as usize);
    }
    assert_eq!(f.num_handles(), 4);
}

#[test]
fn flushing_releases_a_push_waiting_for_the_io_thread() {
    let f = Arc::new(slow_io_fixture(
        OverloadPolicy::BackPressure,
        Duration::ZERO,
        4,
    ));
    let (mine, peer) = f.socketpair();
    f.add(mine, latest());
    let reader = read_buffers(peer, 12 * 16 * 1024);
    // The IO thread stops after its first pass: the client stays behind, not blocked.
    f.rec.set_gate(true);
    let pusher = {
        let f = f.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            for i in 0..12 {
                f.engine.push(overload_buffer(i));
            }
            start.elapsed()
        })
    };
    f.engine.set_flushing(true);
    let took = pusher.join().unwrap();
    // Far below the 1 s a push may wait at most.
    assert!(took < Duration::from_millis(500), "pushes took {took:?}");
    f.engine.set_flushing(false);
    f.rec.set_gate(false);
    assert_eq!(reader.join().unwrap().len(), 12);
}

#[test]
fn drop_buffers_policy_never_waits_and_skips_to_keyframes() {
    let f = slow_io_fixture(OverloadPolicy::DropBuffers, Duration::from_micros(300), 4);
    const BUFFERS: u32 = 200;
    let (mine, peer) = f.socketpair();
    f.add(mine, latest());
    let mut waited = Duration::ZERO;
    let mut dropped = 0;
    for i in 0..=BUFFERS {
        let report = f.engine.push(overload_buffer(i));
        waited += report.waited;
        dropped += report.dropped;
    }
    // Nothing is skipped after the last push: the rest all arrives.
    let stats_dropped = f.stats(mine).buffers_dropped;
    assert_eq!(waited, Duration::ZERO);
    assert!(dropped > 0, "nothing was dropped");
    assert_eq!(stats_dropped, dropped);
    let received = (BUFFERS + 1) as u64 - dropped;
    let got = read_buffers(peer, received as usize * 16 * 1024)
        .join()
        .unwrap();
    // In order; every jump lands on a keyframe.
    for pair in got.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        assert!(b > a || b < 10, "out of order: {a} then {b}");
        if b != (a + 1) % 251 {
            assert_eq!(b % 2, 0, "skipped to {b}, not a keyframe");
        }
    }
    assert_eq!(f.num_handles(), 1);
}

#[test]
fn most_clients_full_at_once_is_an_overload_and_nobody_is_kicked() {
    // Ten clients whose readers start late: every socket fills, all ten fall past
    // units-max together. That is the machine not keeping up, not ten slow clients.
    let f = Arc::new(Fixture::new(Settings {
        units_max: Some(Amount::new(Unit::Buffers, 4)),
        ..Settings::default()
    }));
    const BUFFERS: u32 = 100;
    let peers: Vec<RawFd> = (0..10)
        .map(|_| {
            let (mine, peer) = f.socketpair();
            f.add(mine, latest());
            peer
        })
        .collect();
    let pusher = {
        let f = f.clone();
        std::thread::spawn(move || {
            for i in 0..BUFFERS {
                f.engine.push(overload_buffer(i));
            }
        })
    };
    // Wait until every socket is full (13 buffers fit in one) and every client past
    // the limit (4 more).
    let deadline = Instant::now() + *WAIT;
    while f.engine.counters().bytes_to_serve < 18 * 16 * 1024 {
        assert!(
            Instant::now() < deadline,
            "the producer never got past the limit"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let readers: Vec<_> = peers
        .into_iter()
        .map(|peer| read_buffers(peer, BUFFERS as usize * 16 * 1024))
        .collect();
    pusher.join().unwrap();
    for reader in readers {
        assert_eq!(reader.join().unwrap().len(), BUFFERS as usize);
    }
    assert!(
        !f.rec.events().iter().any(|e| matches!(e, Ev::Removed(..))),
        "{:?}",
        f.rec.events()
    );
}

#[test]
fn refuse_clients_policy_refuses_while_overloaded_and_for_a_second_after() {
    let f = slow_io_fixture(OverloadPolicy::RefuseClients, Duration::from_micros(300), 4);
    // Room for the whole stream: the client itself is never slow.
    let (mine, _peer) = f.roomy_socketpair();
    f.add(mine, latest());
    let mut dropped = 0;
    for i in 0..100 {
        dropped += f.engine.push(overload_buffer(i)).dropped;
    }
    assert!(dropped > 0, "no overload");
    // As the server asks it for each new connection.
    let refusing_seen = |want: bool| {
        let deadline = Instant::now() + *WAIT;
        loop {
            if f.engine.refusing_clients() == want {
                return Instant::now();
            }
            assert!(Instant::now() < deadline, "refusing never became {want}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let refused_at = refusing_seen(true);
    let accepted_at = refusing_seen(false);
    // For a second after the last overloaded push, not much longer.
    let after = accepted_at - refused_at;
    assert!(after < Duration::from_secs(3), "refused for {after:?}");
    assert_eq!(f.num_handles(), 1);
}

#[test]
fn drop_buffers_policy_removes_a_client_whose_fd_stays_full() {
    let f = slow_io_fixture(OverloadPolicy::DropBuffers, Duration::from_micros(100), 4);
    // /dev/null always takes data: that client is never slow.
    let kept = f.own(
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap(),
    );
    let (stalled, _never_read) = f.socketpair();
    f.add(kept, latest());
    f.add(stalled, latest());
    let start = Instant::now();
    let mut i = 0;
    // Push until the stalled client goes: its fd full past units-max for the grace.
    while !f.rec.events().contains(&Ev::FdRemoved(stalled)) {
        assert!(
            start.elapsed() < *WAIT,
            "the stalled client was never removed"
        );
        f.engine.push(overload_buffer(i % 200));
        i += 1;
    }
    assert_eq!(f.rec.wait_gone(stalled), ClientStatus::Slow);
    // Not before the grace: the others skip, this one was given time.
    assert!(start.elapsed() >= Duration::from_millis(500));
    assert_eq!(f.num_handles(), 1);
}

// ---------------------------------------------------------------------------------
// Zero-copy: sendfile from the memfd

/// The streamheader then 4 buffers of 256 KiB (more than a pipe or UNIX socket
/// holds at once, so writes are partial) to one client of each fd kind, each on an engine
/// of its own: exact bytes, and every buffer's bytes went by sendfile (the
/// streamheader, never in the memfd, by writev).
#[test]
fn zero_copy_every_fd_kind_gets_exact_bytes() {
    let dir = TempDir::new("zero-copy-kinds");
    let data: Vec<u8> = (0..4).flat_map(big).collect();
    let want = cat(&[b"HEAD", &data]);
    for kind in ["unix", "tcp", "pipe", "file", "/dev/null"] {
        let f = Fixture::new(zero_copy());
        f.engine.set_streamheader(Some(payloads(&[b"HE", b"AD"])));
        let path = dir.0.join(kind.replace('/', "_"));
        let (ours, read_end) = match kind {
            "unix" => {
                let (ours, peer) = f.socketpair();
                (ours, Some(peer))
            }
            "tcp" => {
                let (ours, peer) = f.tcp();
                (ours, Some(peer))
            }
            "pipe" => {
                let (r, w) = f.pipe();
                (w, Some(r))
            }
            "file" => (f.own(std::fs::File::create(&path).unwrap()), None),
            _ => (
                f.own(std::fs::OpenOptions::new().write(true).open(kind).unwrap()),
                None,
            ),
        };
        f.add(ours, latest());
        f.push_all((0..4).map(|i| key(big(i))));
        match read_end {
            Some(r) => expect_read(r, &want),
            None => {
                assert!(f.engine.remove_flush(ours));
                assert_eq!(f.rec.wait_gone(ours), ClientStatus::Removed, "{kind}");
                assert_eq!(
                    f.rec.stats_at_removed(ours).unwrap().bytes_sent,
                    want.len() as u64,
                    "{kind}"
                );
            }
        }
        if kind == "file" {
            assert!(
                std::fs::read(&path).unwrap() == want,
                "{kind}: bytes differ"
            );
        }
        let c = f.engine.counters();
        assert_eq!(c.bytes_served, want.len() as u64, "{kind}");
        assert_eq!(c.bytes_served_zero_copy, data.len() as u64, "{kind}");
    }
}

/// 64 KiB buffer `i` of the long stream: its bytes tell where they belong.
fn long_stream_buffer(i: u32) -> Vec<u8> {
    let mut v: Vec<u8> = (0..65536u32).map(|j| (i * 7 + j / 3) as u8).collect();
    v[..4].copy_from_slice(&i.to_be_bytes());
    v
}

/// Over a 64 MiB stream the memfd holds only what is still needed (holes are
/// punched behind the clients), and a client that took 2 MiB into its socket and
/// reads them only after the stream moved 64 MiB on (those pages long punched
/// out of the memfd) reads exact bytes: the socket kept the pages by reference and
/// nothing was written over them.
#[test]
fn zero_copy_memfd_stays_bounded_and_late_reader_gets_exact_bytes() {
    let f = Fixture::new(zero_copy());
    let (late, late_peer) = f.roomy_socketpair();
    let (a, a_peer) = f.socketpair();
    let (b, b_peer) = f.socketpair();
    for fd in [late, a, b] {
        f.add(fd, latest());
    }
    // The late client takes 2 MiB into its socket and leaves.
    let early: Vec<u8> = (0..32).flat_map(long_stream_buffer).collect();
    f.push_all((0..32).map(|k| key(long_stream_buffer(k))));
    for peer in [a_peer, b_peer] {
        expect_read(peer, &early);
    }
    let deadline = Instant::now() + *WAIT;
    while f.bytes_sent(late) < early.len() as u64 {
        assert!(
            Instant::now() < deadline,
            "late client never took its 2 MiB"
        );
        std::thread::yield_now();
    }
    assert!(f.engine.remove(late, ClientStatus::Removed));
    // Then 64 batches of the same 16 buffers (each push is appended anew).
    let batch: Vec<gstrsmultifdsink::engine::Payload> = (32..48)
        .map(|k| Arc::new(long_stream_buffer(k)) as gstrsmultifdsink::engine::Payload)
        .collect();
    let batch_bytes: Vec<u8> = (32..48).flat_map(long_stream_buffer).collect();
    let mut most = 0;
    for _ in 0..64 {
        for p in &batch {
            f.push(Chunk::new(p.clone(), true, false, None));
        }
        for peer in [a_peer, b_peer] {
            expect_read(peer, &batch_bytes);
        }
        most = most.max(f.engine.spool_allocated().expect("a memfd"));
    }
    // Two batches (the one just read is released at the next push) and the
    // granule being filled, with room for huge folios: far below the 66 MiB pushed.
    assert!(most <= 8 << 20, "memfd held {most} bytes");
    // Everything went by sendfile: the late client's 2 MiB and the others' 66 MiB.
    assert_eq!(
        f.engine.counters().bytes_served_zero_copy,
        3 * early.len() as u64 + 2 * 64 * 16 * 65536
    );
    expect_read(late_peer, &early);
}

/// With `zero_copy_min_clients`, buffers go into the memfd only while the engine
/// has that many clients: two clients of three wanted get theirs by writev (no
/// memfd is even made), a third client turns sendfile on for what is pushed next,
/// and removing it turns it off again. The log says each change; every client
/// reads exact bytes throughout.
#[test]
fn zero_copy_spools_only_while_enough_clients() {
    let f = Fixture::new(Settings {
        zero_copy_min_clients: 3,
        ..zero_copy()
    });
    f.rec
        .keep_logs
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (a, a_peer) = f.socketpair();
    let (b, b_peer) = f.socketpair();
    f.add(a, latest());
    f.add(b, latest());
    let part = |from: u32| -> Vec<u8> { (from..from + 4).flat_map(big).collect() };
    f.push_all((0..4).map(|i| key(big(i))));
    for peer in [a_peer, b_peer] {
        expect_read(peer, &part(0));
    }
    assert_eq!(f.engine.counters().bytes_served_zero_copy, 0);
    assert_eq!(f.engine.spool_allocated(), None, "a memfd for two clients");

    let (c, c_peer) = f.socketpair();
    f.add(c, latest());
    f.push_all((4..8).map(|i| key(big(i))));
    for peer in [a_peer, b_peer, c_peer] {
        expect_read(peer, &part(4));
    }
    let spooled = 3 * part(4).len() as u64;
    assert_eq!(f.engine.counters().bytes_served_zero_copy, spooled);

    assert!(f.engine.remove(c, ClientStatus::Removed));
    f.push_all((8..12).map(|i| key(big(i))));
    for peer in [a_peer, b_peer] {
        expect_read(peer, &part(8));
    }
    assert_eq!(f.engine.counters().bytes_served_zero_copy, spooled);

    let logs = f.rec.logs.lock().unwrap().clone();
    let changes: Vec<&str> = logs
        .iter()
        .filter(|(_, l)| l.starts_with("zero-copy: ") && l.contains("the memfd from now on"))
        .map(|(_, l)| l.as_str())
        .collect();
    assert_eq!(
        changes,
        [
            "zero-copy: 2 clients (3 or more wanted): buffers stay out of the memfd from now on",
            "zero-copy: 3 clients (3 or more wanted): buffers go into the memfd from now on",
            "zero-copy: 2 clients (3 or more wanted): buffers stay out of the memfd from now on",
        ]
    );
}

/// A kind whose first sendfile is refused (a regular file opened O_APPEND: EINVAL)
/// is written with writev from then on, logged once; sockets on the same engine
/// still go by sendfile. Every fd gets exact bytes.
#[test]
fn zero_copy_refused_kind_falls_back_to_writev() {
    let dir = TempDir::new("zero-copy-refused-kind");
    let f = Fixture::new(zero_copy());
    f.rec
        .keep_logs
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let append = |name: &str| {
        f.own(
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(dir.0.join(name))
                .unwrap(),
        )
    };
    let first = append("first");
    let (ours, peer) = f.socketpair();
    f.add(first, latest());
    f.add(ours, latest());
    f.push_all((0..4).map(|i| key(big(i))));
    // Later files, O_APPEND or not, go by writev: the kind is known to refuse.
    let second = append("second");
    let plain = f.own(std::fs::File::create(dir.0.join("plain")).unwrap());
    f.add(second, latest());
    f.add(plain, latest());
    f.push_all((4..8).map(|i| key(big(i))));
    let all: Vec<u8> = (0..8).flat_map(big).collect();
    let later: Vec<u8> = (4..8).flat_map(big).collect();
    expect_read(peer, &all);
    for fd in [first, second, plain] {
        assert!(f.engine.remove_flush(fd));
        assert_eq!(f.rec.wait_gone(fd), ClientStatus::Removed);
    }
    assert!(std::fs::read(dir.0.join("first")).unwrap() == all);
    assert!(std::fs::read(dir.0.join("second")).unwrap() == later);
    assert!(std::fs::read(dir.0.join("plain")).unwrap() == later);
    assert_eq!(f.engine.counters().bytes_served_zero_copy, all.len() as u64);
    let logs = f.rec.logs.lock().unwrap().clone();
    let refusals: Vec<_> = logs.iter().filter(|(_, l)| l.contains("refused")).collect();
    assert_eq!(refusals.len(), 1, "{logs:?}");
    assert_eq!(refusals[0].0, gstrsmultifdsink::engine::LogLevel::Warning);
    assert!(
        refusals[0].1.contains("sendfile to File fds refused"),
        "{refusals:?}"
    );
}

/// Once a kind took sendfile, a fd of that kind that refuses it falls back alone
/// (logged for that client); the others of its kind keep sendfile.
#[test]
fn zero_copy_refused_fd_of_a_working_kind_falls_back_alone() {
    let dir = TempDir::new("zero-copy-refused-fd");
    let f = Fixture::new(zero_copy());
    f.rec
        .keep_logs
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let plain = f.own(std::fs::File::create(dir.0.join("plain")).unwrap());
    f.add(plain, latest());
    f.push_all((0..2).map(|i| key(big(i))));
    // Its first sendfile is done once these bytes were written.
    let deadline = Instant::now() + *WAIT;
    while f.bytes_sent(plain) < 2 * big(0).len() as u64 {
        assert!(Instant::now() < deadline, "file client never written");
        std::thread::yield_now();
    }
    let appending = f.own(
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(dir.0.join("appending"))
            .unwrap(),
    );
    f.add(appending, latest());
    f.push_all((2..6).map(|i| key(big(i))));
    for fd in [plain, appending] {
        assert!(f.engine.remove_flush(fd));
        assert_eq!(f.rec.wait_gone(fd), ClientStatus::Removed);
    }
    let all: Vec<u8> = (0..6).flat_map(big).collect();
    let later: Vec<u8> = (2..6).flat_map(big).collect();
    assert!(std::fs::read(dir.0.join("plain")).unwrap() == all);
    assert!(std::fs::read(dir.0.join("appending")).unwrap() == later);
    assert_eq!(f.engine.counters().bytes_served_zero_copy, all.len() as u64);
    let logs = f.rec.logs.lock().unwrap().clone();
    let refusals: Vec<_> = logs.iter().filter(|(_, l)| l.contains("refused")).collect();
    assert_eq!(refusals.len(), 1, "{logs:?}");
    assert_eq!(refusals[0].0, gstrsmultifdsink::engine::LogLevel::Info);
    assert!(
        refusals[0]
            .1
            .contains(&format!("client fd {appending}: sendfile refused")),
        "{refusals:?}"
    );
}
