//! stress: `rsmultifdsink` under churn, faults and concurrent API calls (issue 5, item 1).
//!
//! ```text
//! cargo run --release --example stress              # short form (CI runs it via tests/stress.rs)
//! cargo run --release --example stress -- --long    # long form: 10,000 clients
//! cargo run --release --example stress -- --short --seed 7 --clients 2000
//! ```
//!
//! One producer thread pushes sequence-numbered buffers (a 16-byte header: magic,
//! length, sequence number and keyframe bit; then bytes that are a function of the
//! sequence number) through a src pad of its own into `rsmultifdsink` (`sync=false`,
//! `units-max` so slow clients are kicked, `buffers-min`), while:
//!
//! * 8 action threads add clients (socketpairs, pipes and TCP loopback pairs; `add` and
//!   `add-full` with every sync method and burst), `remove`, `remove-flush`, `clear`,
//!   `get-stats` (known and unknown fds) and add live fds again (duplicates);
//! * the `client-added`/`client-removed`/`client-fd-removed` handlers call `get-stats`
//!   on their own fd and `get-stats`, `add`, `remove`, `remove-flush` and `clear` on
//!   others;
//! * 4 reader threads read the other ends fast, slowly, after a stall or never, and
//!   half-close (`shutdown(SHUT_WR)`), close, or reset (SO_LINGER 0 on TCP) them;
//! * a property thread changes `units-max`, `units-soft-max`, `recover-policy`,
//!   `timeout`, `buffers-min`, `burst-format`/`burst-value` and `sync-method`;
//! * a cycler takes the element PLAYING → PAUSED → READY → NULL → PLAYING (and the
//!   partial PLAYING → PAUSED → PLAYING, PLAYING → PAUSED → READY → PLAYING) under load.
//!
//! The application owns every fd: it closes the fd it gave to `add` only after
//! `client-fd-removed` (and only once no other thread is calling an action with it).
//! At the end it prints its figures, one per line, then one line per check and
//! `stress: N passed, M failed`; the exit code is 1 if a check failed. A watchdog
//! aborts (with the thread and what it was doing) if a thread makes no progress for
//! 20 s.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;
use gstrsmultifdsink::multifdsink::SyncMethod;
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{
    AddressFamily, Shutdown, SockFlag, SockType, setsockopt, shutdown, socketpair, sockopt,
};

// ---------------------------------------------------------------------------------
// The stream

/// Every buffer starts with: magic (4), total length (u32 LE), sequence number (u64
/// LE, bit 63 = keyframe). The streamheader has its own magic and sequence u64::MAX.
const HDR: usize = 16;
const MAGIC_DATA: &[u8; 4] = b"STRB";
const MAGIC_SH: &[u8; 4] = b"STRH";
const SH_LEN: usize = 64;
const SH_SEQ: u64 = u64::MAX;
const KF_BIT: u64 = 1 << 63;
const MAX_LEN: usize = 64 * 1024;
/// Every KF_INTERVAL-th buffer is a keyframe (the others DELTA_UNIT).
const KF_INTERVAL: u64 = 10;
const TABLE_SPAN: usize = 4096;

/// Limits the property thread chooses from (units in buffers).
const UNITS_MAX: [i64; 4] = [60, 120, 200, 400];
const UNITS_SOFT_MAX: [i64; 4] = [-1, 30, 50, 100];
const RECOVER: [&str; 4] = ["none", "latest", "soft-limit", "keyframe"];
const BUFFERS_MIN: [i32; 3] = [-1, 10, 50];
const TIMEOUT_MS: [u64; 4] = [0, 0, 500, 2000];
const SYNC_METHODS: [SyncMethod; 6] = [
    SyncMethod::Latest,
    SyncMethod::NextKeyframe,
    SyncMethod::LatestKeyframe,
    SyncMethod::Burst,
    SyncMethod::BurstKeyframe,
    SyncMethod::BurstWithKeyframe,
];

const WATCHDOG: Duration = Duration::from_secs(20);
const ACTION_THREADS: usize = 8;
const READER_THREADS: usize = 4;
const FD_LIMIT: usize = 20_000;
const BURST_CALLS: u32 = 12;

fn mix(mut x: u64) -> u64 {
    // splitmix64
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Pseudo-random bytes; a buffer's payload is a slice of it chosen by its sequence
/// number, so readers compare with one memcmp.
fn table() -> &'static [u8] {
    static TABLE: OnceLock<Vec<u8>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..TABLE_SPAN + MAX_LEN)
            .map(|i| mix(i as u64 ^ 0xA5A5) as u8)
            .collect()
    })
}

fn buffer_len(seq: u64) -> usize {
    let h = mix(seq);
    let r = (h >> 8) as usize;
    match h % 100 {
        0..=79 => HDR + r % 1008,
        80..=97 => 1024 + r % 7168,
        _ => 8192 + r % (MAX_LEN - 8192 + 1),
    }
}

fn payload_offset(seq: u64) -> usize {
    if seq == SH_SEQ {
        7
    } else {
        (mix(seq ^ 0x5555) % TABLE_SPAN as u64) as usize
    }
}

fn header(magic: &[u8; 4], len: usize, seq_field: u64) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[..4].copy_from_slice(magic);
    h[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    h[8..].copy_from_slice(&seq_field.to_le_bytes());
    h
}

fn streamheader_bytes() -> Vec<u8> {
    let mut v = header(MAGIC_SH, SH_LEN, SH_SEQ).to_vec();
    let off = payload_offset(SH_SEQ);
    v.extend_from_slice(&table()[off..off + SH_LEN - HDR]);
    v
}

fn make_buffer(seq: u64, period: Duration) -> gst::Buffer {
    let len = buffer_len(seq);
    let kf = seq.is_multiple_of(KF_INTERVAL);
    let mut buffer = gst::Buffer::with_size(len).expect("buffer");
    {
        let b = buffer.get_mut().unwrap();
        {
            let mut map = b.map_writable().unwrap();
            let data = map.as_mut_slice();
            data[..HDR].copy_from_slice(&header(
                MAGIC_DATA,
                len,
                seq | if kf { KF_BIT } else { 0 },
            ));
            let off = payload_offset(seq);
            data[HDR..].copy_from_slice(&table()[off..off + len - HDR]);
        }
        b.set_pts(gst::ClockTime::from_nseconds(
            seq * period.as_nanos() as u64,
        ));
        if !kf {
            b.set_flags(gst::BufferFlags::DELTA_UNIT);
        }
    }
    buffer
}

/// Checks a byte stream as it arrives: starts at a buffer boundary, the streamheader
/// first (once), then whole buffers in increasing sequence order with exact bytes.
#[derive(Default)]
struct Verifier {
    hdr: [u8; HDR],
    hdr_got: usize,
    /// The buffer being read: (sequence, payload length, payload bytes seen).
    cur: Option<(u64, usize, usize)>,
    bytes: u64,
    buffers: u64,
    gaps: u64,
    last_seq: Option<u64>,
    streamheaders: u32,
    first_kf: Option<bool>,
    error: Option<String>,
}

impl Verifier {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && self.error.is_none() {
            if let Some((seq, len, done)) = self.cur {
                let n = (len - done).min(data.len());
                let off = payload_offset(seq) + done;
                if data[..n] != table()[off..off + n] {
                    let at = data[..n]
                        .iter()
                        .zip(&table()[off..off + n])
                        .position(|(a, b)| a != b)
                        .unwrap_or(0);
                    self.error = Some(format!(
                        "byte {} of buffer {} (stream offset {}) differs",
                        HDR + done + at,
                        seq_name(seq),
                        self.bytes + at as u64
                    ));
                    break;
                }
                self.bytes += n as u64;
                data = &data[n..];
                self.cur = (done + n < len).then_some((seq, len, done + n));
            } else {
                let n = (HDR - self.hdr_got).min(data.len());
                self.hdr[self.hdr_got..self.hdr_got + n].copy_from_slice(&data[..n]);
                self.hdr_got += n;
                self.bytes += n as u64;
                data = &data[n..];
                if self.hdr_got == HDR {
                    self.hdr_got = 0;
                    self.parse_header();
                }
            }
        }
        // After an error, only count.
        self.bytes += data.len() as u64;
    }

    fn parse_header(&mut self) {
        let h = self.hdr;
        let len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
        let field = u64::from_le_bytes(h[8..16].try_into().unwrap());
        let at = self.bytes - HDR as u64;
        if &h[..4] == MAGIC_SH {
            if len != SH_LEN || field != SH_SEQ {
                self.error = Some(format!("bad streamheader header at stream offset {at}"));
            } else if self.streamheaders > 0 || self.buffers > 0 {
                self.error = Some(format!(
                    "streamheader again at stream offset {at} after {} buffers",
                    self.buffers
                ));
            } else {
                self.streamheaders += 1;
                self.cur = Some((SH_SEQ, SH_LEN - HDR, 0));
            }
            return;
        }
        if &h[..4] != MAGIC_DATA {
            self.error = Some(format!(
                "no buffer header at stream offset {at} (not on a buffer boundary): {h:02x?}"
            ));
            return;
        }
        let seq = field & !KF_BIT;
        let kf = field & KF_BIT != 0;
        if len != buffer_len(seq) || kf != seq.is_multiple_of(KF_INTERVAL) {
            self.error = Some(format!(
                "corrupt header of buffer {seq} at stream offset {at} (length {len})"
            ));
            return;
        }
        if self.streamheaders == 0 {
            self.error = Some(format!("buffer {seq} before the streamheader"));
            return;
        }
        match self.last_seq {
            Some(last) if seq <= last => {
                self.error = Some(format!(
                    "buffer {seq} after buffer {last} (out of order or repeated) at stream offset {at}"
                ));
                return;
            }
            Some(last) => self.gaps += seq - last - 1,
            None => self.first_kf = Some(kf),
        }
        self.last_seq = Some(seq);
        self.buffers += 1;
        if len > HDR {
            self.cur = Some((seq, len - HDR, 0));
        }
    }

    fn at_boundary(&self) -> bool {
        self.hdr_got == 0 && self.cur.is_none()
    }
}

fn seq_name(seq: u64) -> String {
    if seq == SH_SEQ {
        "streamheader".into()
    } else {
        seq.to_string()
    }
}

// ---------------------------------------------------------------------------------
// Options and small helpers

#[derive(Clone, Debug)]
pub struct Options {
    pub form: &'static str,
    /// New clients to add (each one also leaves: twice as many connect/disconnect events).
    pub connects: u64,
    /// Most clients at once.
    pub max_live: usize,
    /// Buffers per second.
    pub rate: u32,
    pub full_cycles: u32,
    pub partial_cycles: u32,
    /// Mean pause between two operations of one action thread.
    pub op_pause_ms: u64,
    pub seed: u64,
}

impl Options {
    pub fn short() -> Options {
        Options {
            form: "short",
            connects: 1_000,
            max_live: 100,
            rate: 1000,
            full_cycles: 3,
            partial_cycles: 2,
            op_pause_ms: 20,
            seed: 1,
        }
    }

    pub fn long() -> Options {
        Options {
            form: "long",
            connects: 10_000,
            max_live: 300,
            rate: 1000,
            full_cycles: 8,
            partial_cycles: 6,
            op_pause_ms: 14,
            seed: 1,
        }
    }

    pub fn from_args(args: &[String]) -> Result<Options, String> {
        let mut opts = Options::short();
        let mut seed = None;
        let mut clients = None;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--short" => opts = Options::short(),
                "--long" => opts = Options::long(),
                "--seed" => seed = Some(parse_next(&mut it, "--seed")?),
                "--clients" => clients = Some(parse_next(&mut it, "--clients")?),
                "-h" | "--help" => {
                    return Err("usage: stress [--short | --long] [--seed N] [--clients N]".into());
                }
                other => return Err(format!("unknown argument {other:?} (try --help)")),
            }
        }
        if let Some(s) = seed {
            opts.seed = s;
        }
        if let Some(c) = clients {
            opts.connects = c;
        }
        Ok(opts)
    }
}

fn parse_next(it: &mut std::slice::Iter<'_, String>, what: &str) -> Result<u64, String> {
    it.next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("{what} needs a number"))
}

/// xorshift64*, seeded by splitmix.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(mix(seed) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, percent: f64) -> bool {
        ((self.next() >> 11) as f64 / (1u64 << 53) as f64) * 100.0 < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

static SEED: AtomicU64 = AtomicU64::new(1);
static THREAD_SEEDS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Handler nesting depth on this thread: handlers act on other fds only at depth 1.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    static RNG: Cell<u64> = const { Cell::new(0) };
}

/// A random number generator for code that runs on threads it does not own (signal
/// handlers on the IO thread).
fn with_thread_rng<R>(f: impl FnOnce(&mut Rng) -> R) -> R {
    RNG.with(|cell| {
        let mut rng = if cell.get() == 0 {
            Rng::new(
                SEED.load(Ordering::Relaxed) ^ (THREAD_SEEDS.fetch_add(1, Ordering::Relaxed) << 32),
            )
        } else {
            Rng(cell.get())
        };
        let r = f(&mut rng);
        cell.set(rng.0);
        r
    })
}

fn pace(ms: u64) {
    if ms > 0 {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// (device, inode) of an fd: tells whether the number still names our file.
fn identity(fd: impl AsFd) -> Option<(u64, u64)> {
    nix::sys::stat::fstat(fd).ok().map(|s| (s.st_dev, s.st_ino))
}

fn proc_status_kib(field: &str) -> u64 {
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

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Raises the soft fd limit towards the hard one (never above what we need).
fn raise_fd_limit(want: u64) {
    use nix::libc;
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 && rl.rlim_cur < want {
            rl.rlim_cur = want.min(rl.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}

static PANICS: AtomicU64 = AtomicU64::new(0);
static FIRST_PANIC: OnceLock<String> = OnceLock::new();
static PANIC_WATCH: AtomicBool = AtomicBool::new(false);

/// Counts panics on any thread (the element's IO thread included) while a run is on.
fn watch_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if PANIC_WATCH.load(Ordering::Relaxed) {
                PANICS.fetch_add(1, Ordering::Relaxed);
                let thread = std::thread::current();
                let _ = FIRST_PANIC.set(format!(
                    "thread '{}' panicked: {info}",
                    thread.name().unwrap_or("?")
                ));
            }
            previous(info);
        }));
    });
    PANIC_WATCH.store(true, Ordering::Relaxed);
}

/// Writes to stderr past any output capture, then aborts.
fn die(msg: &str) -> ! {
    let _ = nix::unistd::write(std::io::stderr(), msg.as_bytes());
    std::process::abort()
}

// ---------------------------------------------------------------------------------
// Clients: transports, behaviours and the application's ledger

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Transport {
    SocketPair,
    Pipe,
    Tcp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Behaviour {
    Fast,
    /// Reads at most this many bytes per 5 ms tick.
    Slow(u32),
    /// Reads nothing for this many ms, then fast.
    Stall(u32),
    StallForever,
    /// shutdown(SHUT_WR) from the reader after this many ms.
    HalfClose(u32),
    /// SO_LINGER 0 and close after this many ms (TCP: the peer gets a reset).
    Reset(u32),
    /// Close the reading end after this many ms.
    Close(u32),
}

impl Behaviour {
    fn name(self) -> &'static str {
        match self {
            Behaviour::Fast => "fast",
            Behaviour::Slow(_) => "slow",
            Behaviour::Stall(_) => "stall",
            Behaviour::StallForever => "stall-forever",
            Behaviour::HalfClose(_) => "half-close",
            Behaviour::Reset(_) => "reset",
            Behaviour::Close(_) => "close",
        }
    }
}

fn pick_client(rng: &mut Rng) -> (Transport, Behaviour) {
    let transport = match rng.below(100) {
        0..=54 => Transport::SocketPair,
        55..=74 => Transport::Pipe,
        _ => Transport::Tcp,
    };
    let ms = |rng: &mut Rng| rng.range(50, 3000) as u32;
    let r = rng.below(100);
    let behaviour = match transport {
        Transport::Pipe => match r {
            0..=49 => Behaviour::Fast,
            50..=64 => Behaviour::Slow(rng.range(64, 4096) as u32),
            65..=79 => Behaviour::Stall(ms(rng)),
            80..=87 => Behaviour::StallForever,
            _ => Behaviour::Close(ms(rng)),
        },
        Transport::SocketPair => match r {
            0..=44 => Behaviour::Fast,
            45..=56 => Behaviour::Slow(rng.range(64, 4096) as u32),
            57..=68 => Behaviour::Stall(ms(rng)),
            69..=74 => Behaviour::StallForever,
            75..=87 => Behaviour::HalfClose(ms(rng)),
            _ => Behaviour::Close(ms(rng)),
        },
        Transport::Tcp => match r {
            0..=34 => Behaviour::Fast,
            35..=44 => Behaviour::Slow(rng.range(64, 4096) as u32),
            45..=54 => Behaviour::Stall(ms(rng)),
            55..=59 => Behaviour::StallForever,
            60..=69 => Behaviour::HalfClose(ms(rng)),
            _ => Behaviour::Reset(ms(rng)),
        },
    };
    (transport, behaviour)
}

/// What a reader saw of its stream.
#[derive(Debug, Clone)]
struct ReaderReport {
    bytes: u64,
    buffers: u64,
    gaps: u64,
    first_kf: Option<bool>,
    at_boundary: bool,
    error: Option<String>,
    /// The reader closed or reset its end itself (it did not read to the end).
    self_closed: bool,
}

/// One client as the application sees it: the fd it gave to the element and the
/// reader of the other end. Lives until the fd is closed and the reader reported.
struct Slot {
    fd: RawFd,
    ident: Option<(u64, u64)>,
    transport: Transport,
    behaviour: Behaviour,
    add_kind: &'static str,
    /// Added with a sync method that must start on a keyframe.
    kf_required: bool,
    /// The application's fd, until it closes it (None early if the element closed it).
    sink: Option<OwnedFd>,
    /// The application has not closed the fd yet.
    open: bool,
    first_add_done: bool,
    adds_in_flight: u32,
    /// Action calls with this fd in flight (the fd must not be closed meanwhile).
    pins: u32,
    dups_in_flight: u32,
    accepted: u32,
    removed: u32,
    fd_removed: u32,
    dup_signals: u32,
    /// `remove`, `clear` or NULL was called while it could be a client.
    hard: bool,
    flush: bool,
    reader_acted: bool,
    final_status: Option<String>,
    /// (bytes-sent, buffers-dropped) from get-stats in the first client-removed.
    stats: Option<(u64, u64)>,
    drain: Arc<AtomicBool>,
    report: Option<ReaderReport>,
    finished: bool,
}

impl Slot {
    /// The element closed our fd (or the number now names another file): never
    /// close it ourselves, but keep the slot open until the element forgets it.
    fn forget_fd(&mut self) {
        if let Some(fd) = self.sink.take() {
            let _ = fd.into_raw_fd();
        }
    }
}

#[derive(Default)]
struct Ledger {
    slots: HashMap<u64, Slot>,
    by_fd: HashMap<RawFd, u64>,
    next_id: u64,
    connects: u64,
    clears_in_flight: u32,
    null_in_flight: bool,
    stop_adds: bool,
    adds_in_flight: u32,
    unfinished: usize,
    finished: usize,
    peak_live: usize,
}

impl Ledger {
    fn mark_all_hard(&mut self) {
        for s in self.slots.values_mut().filter(|s| s.open) {
            s.hard = true;
        }
    }
}

/// The checks, each counted once as passed or failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Check {
    Events,
    Streams,
    BytesSent,
    Gaps,
    Boundary,
    Keyframe,
    Status,
    Pairing,
    StatsInHandler,
    StatsUnknown,
    Duplicate,
    FdsOpen,
    FdCount,
    Refused,
    GlibMessages,
    States,
    Producer,
    Queue,
    Rss,
    Final,
    Panics,
    Deadlock,
}

impl Check {
    const ALL: [Check; 22] = [
        Check::Events,
        Check::Streams,
        Check::BytesSent,
        Check::Gaps,
        Check::Boundary,
        Check::Keyframe,
        Check::Status,
        Check::Pairing,
        Check::StatsInHandler,
        Check::StatsUnknown,
        Check::Duplicate,
        Check::FdsOpen,
        Check::FdCount,
        Check::Refused,
        Check::GlibMessages,
        Check::States,
        Check::Producer,
        Check::Queue,
        Check::Rss,
        Check::Final,
        Check::Panics,
        Check::Deadlock,
    ];

    fn describe(self) -> &'static str {
        match self {
            Check::Events => "connect/disconnect events reached the target",
            Check::Streams => {
                "every stream exact and in order, from a buffer boundary, streamheader first"
            }
            Check::BytesSent => "bytes read equal get-stats bytes-sent (readers that read to EOF)",
            Check::Gaps => {
                "no buffer missing beyond get-stats buffers-dropped (gap-free without drops)"
            }
            Check::Boundary => "remove-flush ends a stream on a buffer boundary",
            Check::Keyframe => "add-full with keyframe sync methods starts on a keyframe",
            Check::Status => "every client-removed has an expected status",
            Check::Pairing => "every added client: one client-removed, then one client-fd-removed",
            Check::StatsInHandler => "get-stats answers inside client-removed",
            Check::StatsUnknown => "get-stats of an unknown fd is empty; of a client, complete",
            Check::Duplicate => "duplicate add answered by client-removed(duplicate) only",
            Check::FdsOpen => "the element never closed an fd (F_GETFD and inode until we close)",
            Check::FdCount => "open fds stayed well below 20,000",
            Check::Refused => "adds refused in NULL equal the element's warnings",
            Check::GlibMessages => "no other GLib warnings or criticals",
            Check::States => "every state change succeeded",
            Check::Producer => "every push succeeded (or was flushing during a state change)",
            Check::Queue => "buffers-queued stayed within the queue limits",
            Check::Rss => "peak RSS (VmHWM) within the bound from the queue limits",
            Check::Final => "after the last clear and NULL: no clients, no queue",
            Check::Panics => "no thread panicked",
            Check::Deadlock => "no deadlock (watchdog: no thread stuck for 20 s)",
        }
    }
}

#[derive(Default)]
struct Problems {
    by_check: BTreeMap<Check, (u64, Vec<String>)>,
}

/// A thread's heartbeat for the watchdog.
struct Beat {
    name: String,
    start: Instant,
    last_ms: AtomicU64,
    doing: Mutex<&'static str>,
    active: AtomicBool,
}

impl Beat {
    fn beat(&self, doing: &'static str) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        if let Ok(mut d) = self.doing.try_lock() {
            *d = doing;
        }
    }

    fn done(&self) {
        self.active.store(false, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Counters {
    adds: AtomicU64,
    add_fulls: AtomicU64,
    removes: AtomicU64,
    remove_flushes: AtomicU64,
    clears: AtomicU64,
    stats_calls: AtomicU64,
    stats_unknown: AtomicU64,
    dup_adds: AtomicU64,
    dup_refused: AtomicU64,
    dup_accepted: AtomicU64,
    handler_ops: AtomicU64,
    refused_adds: AtomicU64,
    removed_before_added: AtomicU64,
    element_warnings: AtomicU64,
    other_glib: AtomicU64,
    pushed: AtomicU64,
    pushed_bytes: AtomicU64,
    push_flushing: AtomicU64,
    push_errors: AtomicU64,
    event_resends: AtomicU64,
    prop_changes: AtomicU64,
    full_cycles: AtomicU64,
    partial_cycles: AtomicU64,
    state_errors: AtomicU64,
    peak_queued: AtomicU64,
    peak_bytes_queued: AtomicU64,
    peak_fds: AtomicU64,
    fd_checks: AtomicU64,
    bursts: AtomicU64,
    burst_ops: AtomicU64,
}

struct Ctx {
    opts: Options,
    sink: gst::Element,
    src: gst::Pad,
    start: Instant,
    period: Duration,
    ledger: Mutex<Ledger>,
    changed: Condvar,
    inboxes: Vec<Mutex<Vec<ReaderItem>>>,
    next_reader: AtomicUsize,
    tcp: Mutex<TcpListener>,
    stop_actions: AtomicBool,
    stop_producer: AtomicBool,
    stop_readers: AtomicBool,
    stop_monitor: AtomicBool,
    need_events: AtomicBool,
    /// Bumped to make every action thread do BURST_CALLS calls without pausing.
    burst: AtomicU64,
    n: Counters,
    problems: Mutex<Problems>,
    beats: Mutex<Vec<Arc<Beat>>>,
    queue_bound: u64,
}

impl Ctx {
    fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Clients whose fd the application has not closed yet.
    fn live(&self) -> u64 {
        self.lock().by_fd.len() as u64
    }

    fn beat(&self, name: String) -> Arc<Beat> {
        let b = Arc::new(Beat {
            name,
            start: self.start,
            last_ms: AtomicU64::new(self.start.elapsed().as_millis() as u64),
            doing: Mutex::new("starting"),
            active: AtomicBool::new(true),
        });
        self.beats.lock().unwrap().push(b.clone());
        b
    }

    fn problem(&self, check: Check, msg: String) {
        let mut p = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        let e = p.by_check.entry(check).or_default();
        e.0 += 1;
        if e.1.len() < 5 {
            e.1.push(msg);
        }
    }

    fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn peak(c: &AtomicU64, v: u64) {
        c.fetch_max(v, Ordering::Relaxed);
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// Closes the application's fd once the element forgot every client on it and no
    /// other thread is using the number.
    fn maybe_close(&self, l: &mut Ledger, id: u64) {
        let Some(s) = l.slots.get_mut(&id) else {
            return;
        };
        if !s.open
            || !s.first_add_done
            || s.adds_in_flight > 0
            || s.pins > 0
            || s.accepted != s.fd_removed
        {
            return;
        }
        let fd = s.fd;
        s.open = false;
        s.sink = None;
        s.drain.store(true, Ordering::Relaxed);
        let finished = s.report.is_some();
        l.by_fd.remove(&fd);
        if finished {
            self.finish(l, id);
        }
    }

    fn finish(&self, l: &mut Ledger, id: u64) {
        let s = l.slots.get_mut(&id).unwrap();
        if !s.finished {
            s.finished = true;
            l.unfinished -= 1;
            l.finished += 1;
            self.changed.notify_all();
        }
    }

    // --- signal handlers -----------------------------------------------------------

    fn on_added(&self, fd: RawFd) {
        {
            let mut l = self.lock();
            let Some(&id) = l.by_fd.get(&fd) else {
                drop(l);
                self.problem(
                    Check::Pairing,
                    format!("client-added for fd {fd}, not one of ours"),
                );
                return;
            };
            let s = l.slots.get_mut(&id).unwrap();
            s.accepted += 1;
            if s.removed >= s.accepted {
                Ctx::inc(&self.n.removed_before_added);
            }
        }
        if DEPTH.get() == 1 && with_thread_rng(|r| r.chance(10.0)) {
            Ctx::inc(&self.n.handler_ops);
            self.op_stats_fd(fd);
        }
    }

    fn on_removed(&self, fd: RawFd, status: &str) {
        if status == "duplicate" {
            let mut l = self.lock();
            let ok = l
                .by_fd
                .get(&fd)
                .copied()
                .and_then(|id| l.slots.get_mut(&id))
                .map(|s| {
                    s.dup_signals += 1;
                    s.dups_in_flight > 0
                });
            drop(l);
            if ok != Some(true) {
                self.problem(
                    Check::Duplicate,
                    format!("client-removed(duplicate) for fd {fd} without a duplicate add"),
                );
            }
            return;
        }
        // get-stats must still answer here.
        let st = self
            .sink
            .emit_by_name::<gst::Structure>("get-stats", &[&fd]);
        Ctx::inc(&self.n.stats_calls);
        let stats = st
            .get::<u64>("bytes-sent")
            .ok()
            .zip(st.get::<u64>("buffers-dropped").ok());
        {
            let mut l = self.lock();
            let Some(&id) = l.by_fd.get(&fd) else {
                drop(l);
                self.problem(
                    Check::Pairing,
                    format!("client-removed({status}) for fd {fd}, not one of ours"),
                );
                return;
            };
            let s = l.slots.get_mut(&id).unwrap();
            let allowed = match status {
                "removed" => s.hard || s.flush,
                "slow" => true,
                "closed" | "error" => s.reader_acted,
                _ => false,
            };
            let desc = format!(
                "fd {fd} ({:?}, {}, remove/clear/NULL: {}, remove-flush: {}, reader acted: {}) removed with status {status}",
                s.transport,
                s.behaviour.name(),
                s.hard,
                s.flush,
                s.reader_acted
            );
            s.removed += 1;
            s.final_status = Some(status.to_string());
            if s.stats.is_none() {
                s.stats = stats;
            }
            s.drain.store(true, Ordering::Relaxed);
            drop(l);
            if !allowed {
                self.problem(Check::Status, desc);
            }
            if stats.is_none() {
                self.problem(
                    Check::StatsInHandler,
                    format!("get-stats in client-removed({status}) of fd {fd} is empty: {st}"),
                );
            }
        }
        if DEPTH.get() == 1 {
            self.handler_actions();
        }
    }

    fn on_fd_removed(&self, fd: RawFd) {
        let mut l = self.lock();
        let Some(&id) = l.by_fd.get(&fd) else {
            drop(l);
            self.problem(
                Check::Pairing,
                format!("client-fd-removed for fd {fd}, not one of ours"),
            );
            return;
        };
        let s = l.slots.get_mut(&id).unwrap();
        let (open, same) = s.sink.as_ref().map_or((false, false), |sink| {
            (
                fcntl(sink.as_fd(), FcntlArg::F_GETFD).is_ok(),
                identity(sink.as_fd()) == s.ident,
            )
        });
        if !open || !same {
            s.forget_fd();
        }
        let bad_order = s.fd_removed >= s.removed;
        s.fd_removed += 1;
        self.maybe_close(&mut l, id);
        drop(l);
        Ctx::inc(&self.n.fd_checks);
        if !open || !same {
            self.problem(
                Check::FdsOpen,
                format!("fd {fd} at client-fd-removed: open {open}, same file {same}"),
            );
        }
        if bad_order {
            self.problem(
                Check::Pairing,
                format!("client-fd-removed for fd {fd} without a client-removed before it"),
            );
        }
        if DEPTH.get() == 1 && with_thread_rng(|r| r.chance(5.0)) {
            Ctx::inc(&self.n.handler_ops);
            with_thread_rng(|r| self.op_stats(r));
        }
    }

    /// What a client-removed handler does to other clients.
    fn handler_actions(&self) {
        let r = with_thread_rng(|r| r.below(1000));
        let mut rng = with_thread_rng(|r| Rng::new(r.next()));
        let did = match r {
            0..=249 => {
                self.op_stats(&mut rng);
                true
            }
            250..=309 => self.op_remove(&mut rng),
            310..=349 => self.op_remove_flush(&mut rng),
            350..=449 => self.op_add_new(&mut rng),
            450..=451 => {
                self.op_clear();
                true
            }
            _ => false,
        };
        if did {
            Ctx::inc(&self.n.handler_ops);
        }
    }

    // --- application actions -------------------------------------------------------

    /// Pins a random open client (its fd stays open until unpinned).
    fn pin_random(
        &self,
        rng: &mut Rng,
        pred: impl Fn(&Slot) -> bool,
        mark: impl FnOnce(&mut Slot),
    ) -> Option<(u64, RawFd)> {
        let mut l = self.lock();
        let n = l.by_fd.len();
        if n == 0 {
            return None;
        }
        let skip = rng.below(n as u64) as usize;
        let id = l
            .by_fd
            .values()
            .cycle()
            .skip(skip)
            .take(n.min(16))
            .copied()
            .find(|id| pred(&l.slots[id]))?;
        let s = l.slots.get_mut(&id).unwrap();
        s.pins += 1;
        mark(s);
        Some((id, s.fd))
    }

    fn unpin(&self, id: u64) {
        let mut l = self.lock();
        l.slots.get_mut(&id).unwrap().pins -= 1;
        self.maybe_close(&mut l, id);
    }

    fn op_remove(&self, rng: &mut Rng) -> bool {
        let Some((id, fd)) = self.pin_random(rng, |_| true, |s| s.hard = true) else {
            return false;
        };
        self.sink.emit_by_name::<()>("remove", &[&fd]);
        Ctx::inc(&self.n.removes);
        self.unpin(id);
        true
    }

    fn op_remove_flush(&self, rng: &mut Rng) -> bool {
        let Some((id, fd)) = self.pin_random(rng, |_| true, |s| s.flush = true) else {
            return false;
        };
        self.sink.emit_by_name::<()>("remove-flush", &[&fd]);
        Ctx::inc(&self.n.remove_flushes);
        self.unpin(id);
        true
    }

    fn op_clear(&self) {
        {
            let mut l = self.lock();
            l.clears_in_flight += 1;
            l.mark_all_hard();
        }
        self.sink.emit_by_name::<()>("clear", &[]);
        Ctx::inc(&self.n.clears);
        self.lock().clears_in_flight -= 1;
    }

    fn op_stats(&self, rng: &mut Rng) {
        if let Some((id, fd)) = self.pin_random(rng, |_| true, |_| {}) {
            self.op_stats_fd(fd);
            self.unpin(id);
        }
    }

    /// get-stats of a pinned (or signalled) client: empty if it is gone, else complete.
    fn op_stats_fd(&self, fd: RawFd) {
        let st = self
            .sink
            .emit_by_name::<gst::Structure>("get-stats", &[&fd]);
        Ctx::inc(&self.n.stats_calls);
        const FIELDS: [&str; 12] = [
            "bytes-sent",
            "connect-time",
            "connect-time-monotonic",
            "disconnect-time",
            "disconnect-time-monotonic",
            "connect-duration",
            "last-activity-time",
            "last-activity-time-monotonic",
            "buffers-dropped",
            "dropped-buffers",
            "first-buffer-ts",
            "last-buffer-ts",
        ];
        if st.n_fields() > 0 && FIELDS.iter().any(|f| st.get::<u64>(*f).is_err()) {
            self.problem(
                Check::StatsUnknown,
                format!("get-stats of fd {fd} incomplete: {st}"),
            );
        }
    }

    fn op_stats_unknown(&self, rng: &mut Rng) {
        let fd = if rng.chance(50.0) { -1 } else { i32::MAX - 7 };
        let st = self
            .sink
            .emit_by_name::<gst::Structure>("get-stats", &[&fd]);
        Ctx::inc(&self.n.stats_unknown);
        if st.n_fields() != 0 {
            self.problem(
                Check::StatsUnknown,
                format!("get-stats of unknown fd {fd} not empty: {st}"),
            );
        }
    }

    fn op_dup_add(&self, rng: &mut Rng) -> bool {
        let mut before = (0, 0);
        let Some((id, fd)) = self.pin_random(
            rng,
            |s| s.accepted >= 1 && s.removed == 0 && s.dups_in_flight == 0,
            |s| {
                s.dups_in_flight += 1;
                s.adds_in_flight += 1;
                before = (s.dup_signals, s.accepted);
            },
        ) else {
            return false;
        };
        self.lock().adds_in_flight += 1;
        self.sink.emit_by_name::<()>("add", &[&fd]);
        Ctx::inc(&self.n.dup_adds);
        let mut l = self.lock();
        l.adds_in_flight -= 1;
        let s = l.slots.get_mut(&id).unwrap();
        s.dups_in_flight -= 1;
        s.adds_in_flight -= 1;
        s.pins -= 1;
        let dup = s.dup_signals > before.0;
        let accepted = s.accepted > before.1;
        if !dup && !accepted {
            // The element was in NULL: refused with a warning.
            Ctx::inc(&self.n.refused_adds);
        }
        self.maybe_close(&mut l, id);
        self.changed.notify_all();
        drop(l);
        match (dup, accepted) {
            (true, false) => Ctx::inc(&self.n.dup_refused),
            // It raced a removal: the element had already let go of the old client.
            (false, true) => Ctx::inc(&self.n.dup_accepted),
            (true, true) => self.problem(
                Check::Duplicate,
                format!("duplicate add of fd {fd} both refused and accepted"),
            ),
            (false, false) => {}
        }
        true
    }

    /// Makes a new client and adds it (`add` or `add-full`).
    fn op_add_new(&self, rng: &mut Rng) -> bool {
        {
            let l = self.lock();
            if l.stop_adds || l.by_fd.len() >= self.opts.max_live {
                return false;
            }
        }
        let (transport, behaviour) = pick_client(rng);
        let (sink_fd, reader_fd) = match self.make_pair(transport) {
            Ok(p) => p,
            Err(e) => {
                self.problem(Check::FdCount, format!("cannot make a {transport:?}: {e}"));
                return false;
            }
        };
        let _ = fcntl(reader_fd.as_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
        let fd = sink_fd.as_raw_fd();
        let full = rng.chance(40.0);
        let (sync, min, max) = random_add_full(rng);
        let kf_required = full
            && matches!(
                sync,
                SyncMethod::NextKeyframe | SyncMethod::LatestKeyframe | SyncMethod::BurstKeyframe
            );
        let drain = Arc::new(AtomicBool::new(false));
        let id = {
            let mut l = self.lock();
            if l.stop_adds || l.connects >= self.opts.connects {
                return false;
            }
            l.connects += 1;
            l.adds_in_flight += 1;
            l.next_id += 1;
            let id = l.next_id;
            let hard = l.clears_in_flight > 0 || l.null_in_flight;
            l.slots.insert(
                id,
                Slot {
                    fd,
                    ident: identity(sink_fd.as_fd()),
                    transport,
                    behaviour,
                    add_kind: if full { "add-full" } else { "add" },
                    kf_required,
                    sink: Some(sink_fd),
                    open: true,
                    first_add_done: false,
                    adds_in_flight: 1,
                    pins: 0,
                    dups_in_flight: 0,
                    accepted: 0,
                    removed: 0,
                    fd_removed: 0,
                    dup_signals: 0,
                    hard,
                    flush: false,
                    reader_acted: false,
                    final_status: None,
                    stats: None,
                    drain: drain.clone(),
                    report: None,
                    finished: false,
                },
            );
            l.by_fd.insert(fd, id);
            l.unfinished += 1;
            l.peak_live = l.peak_live.max(l.by_fd.len());
            self.changed.notify_all();
            id
        };
        let now = Instant::now();
        let reader = ReaderItem {
            slot: id,
            fd: Some(reader_fd),
            behaviour,
            drain,
            verifier: Verifier::default(),
            born: now,
            in_epoll: false,
            acted: false,
            self_closed: false,
            next_slow: now,
        };
        let r = self.next_reader.fetch_add(1, Ordering::Relaxed) % READER_THREADS;
        self.inboxes[r].lock().unwrap().push(reader);
        if full {
            self.sink
                .emit_by_name::<()>("add-full", &[&fd, &sync, &min.0, &min.1, &max.0, &max.1]);
            Ctx::inc(&self.n.add_fulls);
        } else {
            self.sink.emit_by_name::<()>("add", &[&fd]);
            Ctx::inc(&self.n.adds);
        }
        let mut l = self.lock();
        l.adds_in_flight -= 1;
        let s = l.slots.get_mut(&id).unwrap();
        s.adds_in_flight -= 1;
        s.first_add_done = true;
        if s.accepted == 0 {
            // The element was in NULL: refused with a warning, no signals.
            Ctx::inc(&self.n.refused_adds);
        }
        self.maybe_close(&mut l, id);
        self.changed.notify_all();
        true
    }

    fn make_pair(&self, transport: Transport) -> std::io::Result<(OwnedFd, OwnedFd)> {
        Ok(match transport {
            Transport::SocketPair => socketpair(
                AddressFamily::Unix,
                SockType::Stream,
                None,
                SockFlag::SOCK_CLOEXEC,
            )?,
            Transport::Pipe => {
                let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
                (w, r)
            }
            Transport::Tcp => {
                let listener = self.tcp.lock().unwrap();
                let client = TcpStream::connect(listener.local_addr()?)?;
                let (server, _) = listener.accept()?;
                (server.into(), client.into())
            }
        })
    }

    fn mark_reader_acted(&self, slot: u64) {
        if let Some(s) = self.lock().slots.get_mut(&slot) {
            s.reader_acted = true;
        }
    }

    fn reader_done(&self, slot: u64, report: ReaderReport) {
        let mut l = self.lock();
        let s = l.slots.get_mut(&slot).unwrap();
        s.report = Some(report);
        if !s.open {
            self.finish(&mut l, slot);
        }
    }
}

/// Runs a signal handler body one level deeper.
fn in_handler<R>(f: impl FnOnce() -> R) -> R {
    DEPTH.set(DEPTH.get() + 1);
    let r = f();
    DEPTH.set(DEPTH.get() - 1);
    r
}

type Bound = (gst::Format, u64);

fn random_bound(rng: &mut Rng) -> Bound {
    match rng.below(4) {
        0 => (gst::Format::Undefined, 0),
        1 => (gst::Format::Buffers, rng.range(1, 60)),
        2 => (gst::Format::Bytes, rng.range(1_000, 300_000)),
        _ => (gst::Format::Time, rng.range(10, 300) * 1_000_000),
    }
}

/// Sync method and burst bounds for `add-full` (never max < min in one format).
fn random_add_full(rng: &mut Rng) -> (SyncMethod, Bound, Bound) {
    let sync = rng.pick(&SYNC_METHODS);
    let min = random_bound(rng);
    let max = if rng.chance(50.0) {
        (gst::Format::Undefined, 0)
    } else {
        let m = random_bound(rng);
        if m.0 == min.0 { (m.0, min.1 + m.1) } else { m }
    };
    (sync, min, max)
}

// ---------------------------------------------------------------------------------
// Readers

struct ReaderItem {
    slot: u64,
    fd: Option<OwnedFd>,
    behaviour: Behaviour,
    drain: Arc<AtomicBool>,
    verifier: Verifier,
    born: Instant,
    in_epoll: bool,
    acted: bool,
    self_closed: bool,
    next_slow: Instant,
}

enum Pumped {
    More,
    Eof,
}

impl ReaderItem {
    /// Reads up to `max` bytes (until EAGAIN).
    fn pump(&mut self, buf: &mut [u8], max: usize) -> Pumped {
        let Some(fd) = self.fd.as_ref() else {
            return Pumped::Eof;
        };
        let mut left = max;
        while left > 0 {
            let want = left.min(buf.len());
            match nix::unistd::read(fd.as_fd(), &mut buf[..want]) {
                Ok(0) => return Pumped::Eof,
                Ok(n) => {
                    self.verifier.feed(&buf[..n]);
                    left -= n;
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => break,
                Err(e) => {
                    if self.verifier.error.is_none() {
                        self.verifier.error = Some(format!("read failed: {e}"));
                    }
                    return Pumped::Eof;
                }
            }
        }
        Pumped::More
    }

    fn fast(&self, now: Instant) -> bool {
        if self.drain.load(Ordering::Relaxed) {
            return true;
        }
        let since = now.duration_since(self.born);
        match self.behaviour {
            Behaviour::Slow(_) | Behaviour::StallForever => false,
            Behaviour::Stall(ms) => since >= Duration::from_millis(ms.into()),
            _ => true,
        }
    }

    fn report(&self) -> ReaderReport {
        let v = &self.verifier;
        ReaderReport {
            bytes: v.bytes,
            buffers: v.buffers,
            gaps: v.gaps,
            first_kf: v.first_kf,
            at_boundary: v.at_boundary(),
            error: v.error.clone(),
            self_closed: self.self_closed,
        }
    }
}

fn reader_thread(ctx: Arc<Ctx>, idx: usize) {
    let beat = ctx.beat(format!("reader {idx}"));
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll");
    let mut items: HashMap<u64, ReaderItem> = HashMap::new();
    let mut events = vec![EpollEvent::empty(); 256];
    let mut buf = vec![0u8; 65536];
    loop {
        beat.beat("reading");
        let new: Vec<ReaderItem> = std::mem::take(&mut *ctx.inboxes[idx].lock().unwrap());
        let no_new = new.is_empty();
        for item in new {
            items.insert(item.slot, item);
        }
        if no_new && items.is_empty() && ctx.stop_readers.load(Ordering::Relaxed) {
            break;
        }
        let n = epoll
            .wait(&mut events, EpollTimeout::from(5u16))
            .unwrap_or(0);
        let now = Instant::now();
        let mut done = Vec::new();
        for ev in &events[..n] {
            if let Some(item) = items.get_mut(&ev.data())
                && let Pumped::Eof = item.pump(&mut buf, usize::MAX)
            {
                done.push(item.slot);
            }
        }
        for item in items.values_mut() {
            if item.fd.is_none() || done.contains(&item.slot) {
                continue;
            }
            let since = now.duration_since(item.born);
            let drain = item.drain.load(Ordering::Relaxed);
            // The reader's own acts, unless the element already let go of it.
            let act_at = match item.behaviour {
                Behaviour::HalfClose(ms) | Behaviour::Reset(ms) | Behaviour::Close(ms) => {
                    Some(Duration::from_millis(ms.into()))
                }
                _ => None,
            };
            if !item.acted && !drain && act_at.is_some_and(|t| since >= t) {
                item.acted = true;
                ctx.mark_reader_acted(item.slot);
                let fd = item.fd.as_ref().unwrap();
                match item.behaviour {
                    Behaviour::HalfClose(_) => {
                        let _ = shutdown(fd.as_raw_fd(), Shutdown::Write);
                    }
                    Behaviour::Reset(_) => {
                        let _ = setsockopt(
                            fd,
                            sockopt::Linger,
                            &nix::libc::linger {
                                l_onoff: 1,
                                l_linger: 0,
                            },
                        );
                        item.self_closed = true;
                    }
                    _ => item.self_closed = true,
                }
                if item.self_closed {
                    if item.in_epoll {
                        let _ = epoll.delete(item.fd.as_ref().unwrap());
                    }
                    item.fd = None;
                    done.push(item.slot);
                    continue;
                }
            }
            let fast = item.fast(now);
            if fast && !item.in_epoll {
                item.in_epoll = true;
                let fd = item.fd.as_ref().unwrap();
                epoll
                    .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, item.slot))
                    .expect("epoll add");
                if let Pumped::Eof = item.pump(&mut buf, usize::MAX) {
                    done.push(item.slot);
                }
            } else if !fast
                && let Behaviour::Slow(per_tick) = item.behaviour
                && now >= item.next_slow
            {
                item.next_slow = now + Duration::from_millis(5);
                if let Pumped::Eof = item.pump(&mut buf, per_tick as usize) {
                    done.push(item.slot);
                }
            }
        }
        for slot in done {
            let Some(mut item) = items.remove(&slot) else {
                continue;
            };
            if let Some(fd) = item.fd.take()
                && item.in_epoll
            {
                let _ = epoll.delete(&fd);
            }
            ctx.reader_done(slot, item.report());
        }
    }
    beat.done();
}

// ---------------------------------------------------------------------------------
// Producer, cycler, property changer, sampler, watchdog

fn push_events(ctx: &Ctx) -> bool {
    let caps = gst::Caps::builder("application/x-stress")
        .field(
            "streamheader",
            gst::Array::new([{
                let mut b = gst::Buffer::from_slice(streamheader_bytes());
                b.get_mut().unwrap().set_flags(gst::BufferFlags::HEADER);
                b.to_send_value()
            }]),
        )
        .build();
    let segment = gst::FormattedSegment::<gst::ClockTime>::new();
    ctx.src.push_event(gst::event::StreamStart::new("stress"))
        && ctx.src.push_event(gst::event::Caps::new(&caps))
        && ctx.src.push_event(gst::event::Segment::new(&segment))
}

fn producer(ctx: Arc<Ctx>) {
    let beat = ctx.beat("producer".into());
    let mut seq = 0u64;
    let mut next = Instant::now();
    while !ctx.stop_producer.load(Ordering::Relaxed) {
        beat.beat("pushing");
        if ctx.need_events.swap(false, Ordering::SeqCst) {
            Ctx::inc(&ctx.n.event_resends);
            if !push_events(&ctx) {
                // Not active yet (the cycler is between states): try again shortly.
                ctx.need_events.store(true, Ordering::SeqCst);
                pace(2);
                continue;
            }
        }
        let buffer = make_buffer(seq, ctx.period);
        let len = buffer.size() as u64;
        match ctx.src.push(buffer) {
            Ok(_) => {
                seq += 1;
                Ctx::inc(&ctx.n.pushed);
                ctx.n.pushed_bytes.fetch_add(len, Ordering::Relaxed);
            }
            Err(gst::FlowError::Flushing) => {
                // Not rendered: push the same buffer again once the sink is back.
                Ctx::inc(&ctx.n.push_flushing);
                ctx.need_events.store(true, Ordering::SeqCst);
                pace(2);
                continue;
            }
            Err(e) => {
                Ctx::inc(&ctx.n.push_errors);
                ctx.problem(Check::Producer, format!("push of buffer {seq}: {e:?}"));
                ctx.need_events.store(true, Ordering::SeqCst);
                pace(2);
                continue;
            }
        }
        next += ctx.period;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else if now - next > Duration::from_millis(100) {
            next = now;
        }
    }
    beat.done();
}

#[derive(Clone, Copy, Debug)]
enum Cycle {
    /// PLAYING → PAUSED → READY → NULL → PLAYING.
    Full,
    /// PLAYING → PAUSED → PLAYING.
    Paused,
    /// PLAYING → PAUSED → READY → PLAYING.
    Ready,
}

fn set_state(ctx: &Ctx, state: gst::State) {
    if let Err(e) = ctx.sink.set_state(state) {
        Ctx::inc(&ctx.n.state_errors);
        ctx.problem(Check::States, format!("set_state({state:?}): {e}"));
    }
}

fn cycler(ctx: Arc<Ctx>) {
    let beat = ctx.beat("cycler".into());
    let mut rng = Rng::new(ctx.opts.seed ^ 0xC1C1);
    let mut plan = Vec::new();
    for i in 0..ctx.opts.full_cycles.max(ctx.opts.partial_cycles) {
        if i < ctx.opts.full_cycles {
            plan.push(Cycle::Full);
        }
        if i < ctx.opts.partial_cycles {
            plan.push(if i % 2 == 0 {
                Cycle::Paused
            } else {
                Cycle::Ready
            });
        }
    }
    let total = plan.len() as u64;
    for (i, cycle) in plan.into_iter().enumerate() {
        let threshold = ctx.opts.connects * (i as u64 + 1) / (total + 1);
        {
            let mut l = ctx.lock();
            while l.connects < threshold && !ctx.stop_actions.load(Ordering::Relaxed) {
                beat.beat("waiting for the next cycle");
                l = ctx
                    .changed
                    .wait_timeout(l, Duration::from_millis(500))
                    .unwrap()
                    .0;
            }
        }
        if ctx.stop_actions.load(Ordering::Relaxed) {
            break;
        }
        let mut step = |what: &'static str, state: gst::State| {
            beat.beat(what);
            set_state(&ctx, state);
            beat.beat(what);
            pace(rng.range(10, 150));
        };
        step("to PAUSED", gst::State::Paused);
        match cycle {
            Cycle::Paused => {}
            Cycle::Ready => {
                step("to READY", gst::State::Ready);
                ctx.need_events.store(true, Ordering::SeqCst);
            }
            Cycle::Full => {
                step("to READY", gst::State::Ready);
                ctx.need_events.store(true, Ordering::SeqCst);
                {
                    let mut l = ctx.lock();
                    l.null_in_flight = true;
                    l.mark_all_hard();
                }
                step("to NULL", gst::State::Null);
                ctx.lock().null_in_flight = false;
                ctx.need_events.store(true, Ordering::SeqCst);
            }
        }
        step("to PLAYING", gst::State::Playing);
        match cycle {
            Cycle::Full => Ctx::inc(&ctx.n.full_cycles),
            _ => Ctx::inc(&ctx.n.partial_cycles),
        }
    }
    beat.done();
}

fn property_thread(ctx: Arc<Ctx>) {
    let beat = ctx.beat("properties".into());
    let mut rng = Rng::new(ctx.opts.seed ^ 0x9009);
    let sink = &ctx.sink;
    while !ctx.stop_actions.load(Ordering::Relaxed) {
        beat.beat("changing properties");
        match rng.below(8) {
            0 => sink.set_property("units-max", rng.pick(&UNITS_MAX)),
            1 => sink.set_property("units-soft-max", rng.pick(&UNITS_SOFT_MAX)),
            2 => sink.set_property_from_str("recover-policy", rng.pick(&RECOVER)),
            3 => sink.set_property("timeout", rng.pick(&TIMEOUT_MS) * 1_000_000),
            4 => sink.set_property("buffers-min", rng.pick(&BUFFERS_MIN)),
            5 => {
                let (format, value) = random_bound(&mut rng);
                sink.set_property("burst-format", format);
                sink.set_property("burst-value", value);
            }
            6 => sink.set_property("sync-method", rng.pick(&SYNC_METHODS)),
            _ => {
                let _ = sink.property::<u32>("num-handles");
                let _ = sink.property::<u64>("bytes-served");
                let _ = sink.property::<u64>("time-queued");
            }
        }
        Ctx::inc(&ctx.n.prop_changes);
        if rng.chance(10.0) {
            Ctx::inc(&ctx.n.bursts);
            ctx.burst.fetch_add(1, Ordering::Relaxed);
        }
        pace(rng.range(30, 250));
    }
    beat.done();
}

/// Samples the queue and the fds; checks that every fd we own is still ours.
fn sampler(ctx: Arc<Ctx>) {
    let beat = ctx.beat("sampler".into());
    let mut last_fd_count = Instant::now() - Duration::from_secs(1);
    while !ctx.stop_monitor.load(Ordering::Relaxed) {
        beat.beat("reading buffers-queued");
        let queued = ctx.sink.property::<u32>("buffers-queued") as u64;
        let bytes = ctx.sink.property::<u64>("bytes-queued");
        Ctx::peak(&ctx.n.peak_queued, queued);
        Ctx::peak(&ctx.n.peak_bytes_queued, bytes);
        if queued > ctx.queue_bound {
            ctx.problem(
                Check::Queue,
                format!(
                    "buffers-queued {queued} above the bound {}",
                    ctx.queue_bound
                ),
            );
        }
        beat.beat("checking fds");
        let mut lost = Vec::new();
        {
            let mut l = ctx.lock();
            for s in l.slots.values_mut() {
                if let Some(sink) = &s.sink {
                    Ctx::inc(&ctx.n.fd_checks);
                    let open = fcntl(sink.as_fd(), FcntlArg::F_GETFD).is_ok();
                    if !open || identity(sink.as_fd()) != s.ident {
                        lost.push(s.fd);
                        s.forget_fd();
                    }
                }
            }
        }
        for fd in lost {
            ctx.problem(
                Check::FdsOpen,
                format!("fd {fd} closed or replaced while the application owns it"),
            );
        }
        if last_fd_count.elapsed() >= Duration::from_millis(500) {
            last_fd_count = Instant::now();
            Ctx::peak(&ctx.n.peak_fds, open_fds() as u64);
        }
        pace(50);
    }
    beat.done();
}

/// Aborts when a thread made no progress for WATCHDOG. Takes no lock but the list
/// of heartbeats, so a deadlock elsewhere cannot stop it.
fn watchdog(ctx: Weak<Ctx>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        pace(200);
        let Some(beats) = ctx.upgrade().map(|c| c.beats.lock().unwrap().clone()) else {
            return;
        };
        for b in &beats {
            if !b.active.load(Ordering::Relaxed) {
                continue;
            }
            let last = b.last_ms.load(Ordering::Relaxed);
            let now_ms = b.start.elapsed().as_millis() as u64;
            if now_ms.saturating_sub(last) > WATCHDOG.as_millis() as u64 {
                let doing = b.doing.try_lock().map(|d| *d).unwrap_or("?");
                let mut msg = format!(
                    "\nstress: WATCHDOG: thread '{}' made no progress for {} s (last: {}); \
                     deadlock or stall, aborting\n",
                    b.name,
                    (now_ms - last) / 1000,
                    doing
                );
                for other in &beats {
                    msg += &format!(
                        "stress:   thread '{}': {} ms ago, {}{}\n",
                        other.name,
                        now_ms.saturating_sub(other.last_ms.load(Ordering::Relaxed)),
                        other.doing.try_lock().map(|d| *d).unwrap_or("?"),
                        if other.active.load(Ordering::Relaxed) {
                            ""
                        } else {
                            " (ended)"
                        }
                    );
                }
                if let Some(first) = FIRST_PANIC.get() {
                    msg += &format!(
                        "stress:   panics so far {}, first: {first}\n",
                        PANICS.load(Ordering::Relaxed)
                    );
                }
                if let Some(ctx) = ctx.upgrade() {
                    match ctx.ledger.try_lock() {
                        Ok(l) => {
                            msg += &format!(
                                "stress:   ledger: {} clients unfinished, {} open, {} adds in flight\n",
                                l.unfinished,
                                l.by_fd.len(),
                                l.adds_in_flight
                            );
                            for s in l.slots.values().filter(|s| !s.finished).take(10) {
                                msg += &format!(
                                    "stress:   unfinished fd {} {:?} {}: open {}, accepted {}, removed {}, fd-removed {}, adds in flight {}, pins {}, reader reported {}\n",
                                    s.fd,
                                    s.transport,
                                    s.behaviour.name(),
                                    s.open,
                                    s.accepted,
                                    s.removed,
                                    s.fd_removed,
                                    s.adds_in_flight,
                                    s.pins,
                                    s.report.is_some()
                                );
                            }
                        }
                        Err(_) => msg += "stress:   ledger: locked\n",
                    }
                }
                die(&msg);
            }
        }
    }
}

fn action_thread(ctx: Arc<Ctx>, idx: usize) {
    let beat = ctx.beat(format!("actions {idx}"));
    let mut rng = Rng::new(ctx.opts.seed ^ ((idx as u64 + 1) * 0x1234_5678));
    let (mut seen_burst, mut burst_left) = (0, 0);
    while !ctx.stop_actions.load(Ordering::Relaxed) {
        let r = rng.below(10_000);
        match r {
            0..=1499 => {
                beat.beat("add");
                if !ctx.op_add_new(&mut rng) {
                    beat.beat("remove (full)");
                    ctx.op_remove(&mut rng);
                }
            }
            // The application removes more the more clients there are, so about
            // half of max_live are connected at a time.
            1500..=2099 if rng.below(ctx.opts.max_live as u64) < 2 * ctx.live() => {
                beat.beat("remove");
                ctx.op_remove(&mut rng);
            }
            2100..=2499 if rng.below(ctx.opts.max_live as u64) < 2 * ctx.live() => {
                beat.beat("remove-flush");
                ctx.op_remove_flush(&mut rng);
            }
            1500..=2499 => {}
            2500..=2649 => {
                beat.beat("duplicate add");
                ctx.op_dup_add(&mut rng);
            }
            2650..=2654 => {
                beat.beat("clear");
                ctx.op_clear();
            }
            2655..=2899 => {
                beat.beat("get-stats unknown");
                ctx.op_stats_unknown(&mut rng);
            }
            _ => {
                beat.beat("get-stats");
                ctx.op_stats(&mut rng);
            }
        }
        beat.beat("pausing");
        // In a burst all 8 threads make a few calls back to back, so calls really
        // overlap.
        let burst = ctx.burst.load(Ordering::Relaxed);
        if burst != seen_burst {
            seen_burst = burst;
            burst_left = BURST_CALLS;
        }
        if burst_left > 0 {
            burst_left -= 1;
            Ctx::inc(&ctx.n.burst_ops);
        } else {
            pace(rng.range(0, 2 * ctx.opts.op_pause_ms));
        }
    }
    beat.done();
}

// ---------------------------------------------------------------------------------
// The run

pub struct Report {
    pub passed: usize,
    pub failed: usize,
    pub lines: Vec<String>,
}

fn init() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        gst::init().expect("gst init");
        gstrsmultifdsink::plugin_register_static().expect("register plugin");
    });
}

/// Runs the stress program and prints its figures and checks.
pub fn run(opts: &Options) -> Report {
    init();
    watch_panics();
    SEED.store(opts.seed, Ordering::Relaxed);
    raise_fd_limit(8192);
    let start = Instant::now();

    let sink = gst::ElementFactory::make("rsmultifdsink")
        .build()
        .expect("rsmultifdsink");
    sink.set_property("sync", false);
    sink.set_property("units-max", UNITS_MAX[2]);
    sink.set_property("buffers-min", 10i32);
    let src = gst::Pad::builder(gst::PadDirection::Src)
        .name("src")
        .build();
    src.set_active(true).unwrap();
    src.link(&sink.static_pad("sink").unwrap()).unwrap();

    let max_units = *UNITS_MAX.iter().max().unwrap() as u64;
    let max_min = *BUFFERS_MIN.iter().max().unwrap() as u64;
    // Clients beyond units-max are removed; buffers-min and the newest keyframe may
    // keep a few more; one buffer arrives while the limit is enforced.
    let queue_bound = max_units.max(max_min) + KF_INTERVAL + 2;

    let ctx = Arc::new(Ctx {
        opts: opts.clone(),
        sink: sink.clone(),
        src,
        start,
        period: Duration::from_secs(1) / opts.rate,
        ledger: Mutex::new(Ledger::default()),
        changed: Condvar::new(),
        inboxes: (0..READER_THREADS).map(|_| Mutex::default()).collect(),
        next_reader: AtomicUsize::new(0),
        tcp: Mutex::new(TcpListener::bind("127.0.0.1:0").expect("listen")),
        stop_actions: AtomicBool::new(false),
        stop_producer: AtomicBool::new(false),
        stop_readers: AtomicBool::new(false),
        stop_monitor: AtomicBool::new(false),
        need_events: AtomicBool::new(true),
        burst: AtomicU64::new(0),
        n: Counters::default(),
        problems: Mutex::default(),
        beats: Mutex::default(),
        queue_bound,
    });

    // GLib messages: the element's refused-add warnings are counted, anything else
    // is counted and shown.
    {
        let weak = Arc::downgrade(&ctx);
        glib::log_set_default_handler(move |domain, level, msg| {
            let Some(ctx) = weak.upgrade() else {
                eprintln!("{}-{level:?}: {msg}", domain.unwrap_or("**"));
                return;
            };
            let serious = matches!(
                level,
                glib::LogLevel::Error | glib::LogLevel::Critical | glib::LogLevel::Warning
            );
            // The element warns of a refused add in GLib's default domain, as C does.
            if domain.is_none()
                && level == glib::LogLevel::Warning
                && msg.contains("before clients can be added")
            {
                Ctx::inc(&ctx.n.element_warnings);
            } else if serious {
                Ctx::inc(&ctx.n.other_glib);
                ctx.problem(
                    Check::GlibMessages,
                    format!("{level:?} {}: {msg}", domain.unwrap_or("")),
                );
            } else if level == glib::LogLevel::Message {
                eprintln!("{}-{level:?}: {msg}", domain.unwrap_or("**"));
            }
        });
    }

    let weak = Arc::downgrade(&ctx);
    sink.connect("client-added", false, move |args| {
        let fd = args[1].get::<i32>().unwrap();
        if let Some(ctx) = weak.upgrade() {
            in_handler(|| ctx.on_added(fd));
        }
        None
    });
    let weak = Arc::downgrade(&ctx);
    sink.connect("client-removed", false, move |args| {
        let fd = args[1].get::<i32>().unwrap();
        let status = glib::EnumValue::from_value(&args[2])
            .map_or("?".to_string(), |(_, v)| v.nick().to_string());
        if let Some(ctx) = weak.upgrade() {
            in_handler(|| ctx.on_removed(fd, &status));
        }
        None
    });
    let weak = Arc::downgrade(&ctx);
    sink.connect("client-fd-removed", false, move |args| {
        let fd = args[1].get::<i32>().unwrap();
        if let Some(ctx) = weak.upgrade() {
            in_handler(|| ctx.on_fd_removed(fd));
        }
        None
    });

    let main_beat = ctx.beat("main".into());
    let watchdog_stop = Arc::new(AtomicBool::new(false));
    let watchdog_thread = {
        let (weak, stop) = (Arc::downgrade(&ctx), watchdog_stop.clone());
        std::thread::spawn(move || watchdog(weak, stop))
    };

    set_state(&ctx, gst::State::Playing);
    let rss_baseline = proc_status_kib("VmRSS:").max(proc_status_kib("VmHWM:"));

    let mut threads = Vec::new();
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .expect("spawn")
    };
    for i in 0..READER_THREADS {
        let c = ctx.clone();
        threads.push(spawn(
            "stress-reader",
            Box::new(move || reader_thread(c, i)),
        ));
    }
    let sampler_thread = {
        let c = ctx.clone();
        spawn("stress-sampler", Box::new(move || sampler(c)))
    };
    let producer_thread = {
        let c = ctx.clone();
        spawn("stress-producer", Box::new(move || producer(c)))
    };
    let mut workers = Vec::new();
    for i in 0..ACTION_THREADS {
        let c = ctx.clone();
        workers.push(spawn(
            "stress-actions",
            Box::new(move || action_thread(c, i)),
        ));
    }
    {
        let c = ctx.clone();
        workers.push(spawn("stress-props", Box::new(move || property_thread(c))));
        let c = ctx.clone();
        workers.push(spawn("stress-cycler", Box::new(move || cycler(c))));
    }

    // Until the target number of clients was added.
    {
        let mut l = ctx.lock();
        let mut last = 0;
        while l.connects < opts.connects {
            if l.connects != last {
                last = l.connects;
                main_beat.beat("waiting for the clients to be added");
            }
            l = ctx
                .changed
                .wait_timeout(l, Duration::from_millis(500))
                .unwrap()
                .0;
        }
    }
    main_beat.beat("stopping the actions");
    ctx.stop_actions.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("worker thread");
    }
    // Let adds in flight (handlers) finish, then remove everybody.
    {
        let mut l = ctx.lock();
        l.stop_adds = true;
        while l.adds_in_flight > 0 {
            main_beat.beat("waiting for adds in flight");
            l = ctx
                .changed
                .wait_timeout(l, Duration::from_millis(500))
                .unwrap()
                .0;
        }
    }
    main_beat.beat("final clear");
    ctx.op_clear();
    {
        let mut l = ctx.lock();
        let mut last = usize::MAX;
        while l.unfinished > 0 {
            if l.unfinished != last {
                last = l.unfinished;
                main_beat.beat("waiting for every client to finish");
            }
            l = ctx
                .changed
                .wait_timeout(l, Duration::from_millis(500))
                .unwrap()
                .0;
        }
    }
    main_beat.beat("stopping the producer");
    let handles_after_clear = sink.property::<u32>("num-handles");
    ctx.stop_producer.store(true, Ordering::Relaxed);
    producer_thread.join().expect("producer");
    main_beat.beat("to NULL");
    set_state(&ctx, gst::State::Null);
    let queued_after_null = sink.property::<u32>("buffers-queued");
    let handles_after_null = sink.property::<u32>("num-handles");
    ctx.stop_readers.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("reader");
    }
    ctx.stop_monitor.store(true, Ordering::Relaxed);
    sampler_thread.join().expect("sampler");
    main_beat.done();
    watchdog_stop.store(true, Ordering::Relaxed);
    watchdog_thread.join().expect("watchdog");
    let elapsed = start.elapsed();

    let rss_peak = proc_status_kib("VmHWM:");
    // Every queued buffer at the largest size, a partly written buffer per client,
    // and room for threads, readers and the allocator.
    let rss_allowance_kib =
        (queue_bound * MAX_LEN as u64 + opts.max_live as u64 * MAX_LEN as u64) / 1024 + 32 * 1024;
    let rss_bound = rss_baseline + rss_allowance_kib;

    evaluate(
        &ctx,
        Finals {
            handles_after_clear,
            handles_after_null,
            queued_after_null,
            rss_baseline,
            rss_peak,
            rss_bound,
            elapsed,
        },
    )
}

struct Finals {
    handles_after_clear: u32,
    handles_after_null: u32,
    queued_after_null: u32,
    rss_baseline: u64,
    rss_peak: u64,
    rss_bound: u64,
    elapsed: Duration,
}

#[derive(Default)]
struct Tally {
    by_status: BTreeMap<String, u64>,
    by_transport: BTreeMap<String, u64>,
    by_behaviour: BTreeMap<String, BTreeMap<String, u64>>,
    add_kinds: BTreeMap<&'static str, u64>,
    verified_bytes: u64,
    verified_buffers: u64,
    gaps: u64,
    dropped: u64,
    exact_compared: u64,
    partial_tails: u64,
    multi_generation: u64,
    refused: u64,
    kf_checked: u64,
    flush_checked: u64,
    empty_streams: u64,
    streams: u64,
}

fn evaluate(ctx: &Arc<Ctx>, f: Finals) -> Report {
    let opts = &ctx.opts;
    let mut t = Tally::default();
    let l = ctx.lock();
    for s in l.slots.values() {
        *t.by_transport
            .entry(format!("{:?}", s.transport).to_lowercase())
            .or_default() += 1;
        *t.add_kinds.entry(s.add_kind).or_default() += 1;
        let status = s.final_status.clone().unwrap_or_else(|| "refused".into());
        *t.by_status.entry(status.clone()).or_default() += 1;
        *t.by_behaviour
            .entry(s.behaviour.name().to_string())
            .or_default()
            .entry(status.clone())
            .or_default() += 1;
        let what = format!("fd {} ({:?}, {})", s.fd, s.transport, s.behaviour.name());
        if s.removed != s.accepted || s.fd_removed != s.accepted {
            ctx.problem(
                Check::Pairing,
                format!(
                    "{what}: added {} times, {} client-removed, {} client-fd-removed",
                    s.accepted, s.removed, s.fd_removed
                ),
            );
        }
        let Some(r) = &s.report else {
            ctx.problem(Check::Streams, format!("{what}: reader never reported"));
            continue;
        };
        if s.accepted == 0 {
            t.refused += 1;
            if r.bytes != 0 {
                ctx.problem(
                    Check::Streams,
                    format!("{what}: refused add, yet {} bytes arrived", r.bytes),
                );
            }
            continue;
        }
        if s.accepted > 1 {
            // A duplicate add raced the removal and became a second client on the
            // same fd: the stream is two streams back to back.
            t.multi_generation += 1;
            continue;
        }
        t.streams += 1;
        t.verified_bytes += r.bytes;
        t.verified_buffers += r.buffers;
        t.gaps += r.gaps;
        if r.bytes == 0 {
            t.empty_streams += 1;
        }
        if !r.at_boundary {
            t.partial_tails += 1;
        }
        if let Some(e) = &r.error {
            ctx.problem(Check::Streams, format!("{what}: {e}"));
        }
        let dropped = s.stats.map(|(_, d)| d);
        t.dropped += dropped.unwrap_or(0);
        match (s.stats, r.self_closed) {
            (Some((sent, dropped)), false) => {
                t.exact_compared += 1;
                if r.bytes != sent {
                    ctx.problem(
                        Check::BytesSent,
                        format!(
                            "{what} (status {status}): read {} bytes, bytes-sent {sent}",
                            r.bytes
                        ),
                    );
                }
                // A skip is only visible when something was written after it (a
                // stalled client may be skipped forward, then removed before it
                // drained): never more gaps than drops, none without drops.
                if r.gaps > dropped {
                    ctx.problem(
                        Check::Gaps,
                        format!(
                            "{what} (status {status}): {} buffers missing, buffers-dropped {dropped}",
                            r.gaps
                        ),
                    );
                }
            }
            (Some((_, dropped)), true) if r.gaps > dropped => ctx.problem(
                Check::Gaps,
                format!(
                    "{what}: {} buffers missing before it closed, buffers-dropped {dropped}",
                    r.gaps
                ),
            ),
            _ => {}
        }
        if s.flush && !s.hard && status == "removed" && !r.self_closed {
            t.flush_checked += 1;
            if !r.at_boundary {
                ctx.problem(
                    Check::Boundary,
                    format!(
                        "{what}: remove-flush ended mid-buffer after {} bytes",
                        r.bytes
                    ),
                );
            }
        }
        if s.kf_required && r.buffers > 0 && dropped == Some(0) {
            t.kf_checked += 1;
            if r.first_kf != Some(true) {
                ctx.problem(
                    Check::Keyframe,
                    format!("{what}: first buffer is not a keyframe"),
                );
            }
        }
    }
    let peak_live = l.peak_live;
    let connects = l.connects;
    let disconnects: u64 = l.slots.values().map(|s| s.removed as u64).sum();
    drop(l);

    let n = &ctx.n;
    let g = Ctx::get;
    if connects + disconnects < 2 * opts.connects.saturating_sub(opts.connects / 10) {
        ctx.problem(
            Check::Events,
            format!("{connects} connects + {disconnects} disconnects"),
        );
    }
    if g(&n.refused_adds) != g(&n.element_warnings) {
        ctx.problem(
            Check::Refused,
            format!(
                "{} adds refused, {} warnings from the element",
                g(&n.refused_adds),
                g(&n.element_warnings)
            ),
        );
    }
    if g(&n.peak_fds) >= (FD_LIMIT / 2) as u64 {
        ctx.problem(
            Check::FdCount,
            format!("{} fds open at the peak", g(&n.peak_fds)),
        );
    }
    if f.rss_peak > f.rss_bound {
        ctx.problem(
            Check::Rss,
            format!("VmHWM {} KiB > bound {} KiB", f.rss_peak, f.rss_bound),
        );
    }
    if f.handles_after_clear != 0 || f.handles_after_null != 0 || f.queued_after_null != 0 {
        ctx.problem(
            Check::Final,
            format!(
                "num-handles {} after clear, {} after NULL; buffers-queued {} after NULL",
                f.handles_after_clear, f.handles_after_null, f.queued_after_null
            ),
        );
    }

    PANIC_WATCH.store(false, Ordering::Relaxed);
    if PANICS.load(Ordering::Relaxed) > 0 {
        ctx.problem(
            Check::Panics,
            format!(
                "{} panics; first: {}",
                PANICS.load(Ordering::Relaxed),
                FIRST_PANIC.get().map_or("?", String::as_str)
            ),
        );
    }
    let mut lines = Vec::new();
    let mut out = |s: String| {
        println!("{s}");
        lines.push(s);
    };
    let mib = |kib: u64| kib as f64 / 1024.0;
    out(format!(
        "stress: form {}, seed {}, {} buffers/s, {} action threads, {} reader threads",
        opts.form, opts.seed, opts.rate, ACTION_THREADS, READER_THREADS
    ));
    out(format!("stress: elapsed {:.1} s", f.elapsed.as_secs_f64()));
    out(format!(
        "stress: connect/disconnect events {} ({connects} connects, {disconnects} disconnects)",
        connects + disconnects
    ));
    out(format!(
        "stress: clients by transport {}",
        join_counts(&t.by_transport)
    ));
    out(format!(
        "stress: clients added with {}",
        join_counts(&t.add_kinds)
    ));
    out(format!(
        "stress: final status {}",
        join_counts(&t.by_status)
    ));
    for (b, statuses) in &t.by_behaviour {
        out(format!("stress: reader {b}: {}", join_counts(statuses)));
    }
    out(format!("stress: peak clients at once {peak_live}"));
    out(format!(
        "stress: calls add {}, add-full {}, remove {}, remove-flush {}, clear {}, get-stats {} (+{} unknown fds), duplicate add {}",
        g(&n.adds),
        g(&n.add_fulls),
        g(&n.removes),
        g(&n.remove_flushes),
        g(&n.clears),
        g(&n.stats_calls),
        g(&n.stats_unknown),
        g(&n.dup_adds)
    ));
    out(format!(
        "stress: calls made from signal handlers {}; bursts of back-to-back calls from all action threads {} ({} calls)",
        g(&n.handler_ops),
        g(&n.bursts),
        g(&n.burst_ops)
    ));
    out(format!(
        "stress: duplicate adds refused (client-removed duplicate) {}, accepted after a racing removal {}",
        g(&n.dup_refused),
        g(&n.dup_accepted)
    ));
    out(format!(
        "stress: adds refused in NULL {} (element warnings {}); other GLib warnings/criticals {}",
        g(&n.refused_adds),
        g(&n.element_warnings),
        g(&n.other_glib)
    ));
    out(format!(
        "stress: client-removed signalled before client-added {}",
        g(&n.removed_before_added)
    ));
    out(format!(
        "stress: state cycles to NULL {}, partial {}, state change errors {}",
        g(&n.full_cycles),
        g(&n.partial_cycles),
        g(&n.state_errors)
    ));
    out(format!("stress: property changes {}", g(&n.prop_changes)));
    out(format!(
        "stress: buffers pushed {} ({:.1} MiB), flushing retries {}, errors {}, sticky event resends {}",
        g(&n.pushed),
        g(&n.pushed_bytes) as f64 / 1048576.0,
        g(&n.push_flushing),
        g(&n.push_errors),
        g(&n.event_resends)
    ));
    out(format!(
        "stress: verified {:.1} MiB in {} buffers over {} streams ({} compared with bytes-sent exactly, {} ended mid-buffer, {} empty)",
        t.verified_bytes as f64 / 1048576.0,
        t.verified_buffers,
        t.streams,
        t.exact_compared,
        t.partial_tails,
        t.empty_streams
    ));
    out(format!(
        "stress: buffers skipped by recover-policy {} (gaps seen {})",
        t.dropped, t.gaps
    ));
    out(format!(
        "stress: remove-flush streams checked for a clean end {}, keyframe starts checked {}",
        t.flush_checked, t.kf_checked
    ));
    out(format!(
        "stress: fd checks {}, peak open fds {}",
        g(&n.fd_checks),
        g(&n.peak_fds)
    ));
    out(format!(
        "stress: peak buffers-queued {} (bound {}), peak bytes-queued {:.1} MiB",
        g(&n.peak_queued),
        ctx.queue_bound,
        g(&n.peak_bytes_queued) as f64 / 1048576.0
    ));
    out(format!(
        "stress: peak RSS {:.1} MiB (baseline {:.1} MiB, bound {:.1} MiB)",
        mib(f.rss_peak),
        mib(f.rss_baseline),
        mib(f.rss_bound)
    ));
    let problems = ctx.problems.lock().unwrap();
    let (mut passed, mut failed) = (0, 0);
    for check in Check::ALL {
        match problems.by_check.get(&check) {
            None => {
                passed += 1;
                out(format!("stress: check {}: ok", check.describe()));
            }
            Some((count, examples)) => {
                failed += 1;
                out(format!(
                    "stress: check {}: FAILED ({count} problems)",
                    check.describe()
                ));
                for e in examples {
                    out(format!("stress:   {e}"));
                }
            }
        }
    }
    out(format!("stress: {passed} passed, {failed} failed"));
    Report {
        passed,
        failed,
        lines,
    }
}

fn join_counts<K: std::fmt::Display>(m: &BTreeMap<K, u64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match Options::from_args(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let report = run(&opts);
    std::process::exit(if report.failed == 0 { 0 } else { 1 });
}
