//! fanout-bench: `rsmultifdsink` against GStreamer's C `multifdsink` (and a plain
//! `writev` fan-out without GStreamer, the floor) on the same workload, in one run.
//!
//! ```text
//! cargo run --release --example fanout-bench -- [options]
//! cargo run --release --example fanout-bench -- --clients 1,100,1000 --transport unix,tcp \
//!     --size 4K --bitrate max,2M --reps 3 --csv bench.csv
//! cargo run --release --example fanout-bench -- --mode sustain --transport unix
//! cargo run --release --example fanout-bench -- --mode raw --clients 1000
//! ```
//!
//! `--help` lists every option. How the figures are made (see also docs/benchmark.md):
//!
//! * Every run is three processes, one after the other for each element (never two
//!   sinks at once): this orchestrator, a **sink process** (`__sink`: one producer thread
//!   pushing fixed-size buffers through a src pad of its own into the element, or the raw
//!   writev loop) and a **drain process** (`__drain`) that owns the other ends of the
//!   client sockets. UNIX socketpairs are handed to the drain with SCM_RIGHTS; TCP
//!   clients connect to 127.0.0.1 from the drain. The drain reads with epoll, finds the
//!   buffer boundaries and takes each buffer's stamp (sequence number, CLOCK_MONOTONIC
//!   send time taken just before `pad.push`) to measure push-to-receive latency.
//! * CPU is `getrusage(RUSAGE_SELF)` of the sink process (user + system, every thread:
//!   producer, streaming, IO) from the first measured push until everything pushed was
//!   received (or stalled), divided by the bytes the drain received for measured
//!   buffers. The drain's CPU is not counted (it is reported in the CSV).
//! * Both elements get the same settings: `sync=false`, `unit-format=buffers`,
//!   `units-max` = max lag (paced) or a large bound (unpaced), everything else default.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use gst::prelude::*;
use nix::errno::Errno;
use nix::libc;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};

/// First bytes of every buffer: magic, sequence number, send time (CLOCK_MONOTONIC
/// ns), flags (bit 0: inside the measured window).
const MAGIC: &[u8; 8] = b"FANOUTB1";
const STAMP: usize = 32;
const FLAG_MEASURED: u64 = 1;
/// Most fds in one SCM_RIGHTS message (the kernel's SCM_MAX_FD is 253).
const FDS_PER_MSG: usize = 250;
/// Fds a process needs besides the clients (stdio, epoll, GStreamer, ...).
const FD_RESERVE: usize = 300;

// ---------------------------------------------------------------------------------
// Small helpers shared by all processes

fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain libc call with a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    user: f64,
    sys: f64,
    nvcsw: i64,
    nivcsw: i64,
}

fn usage_self() -> Usage {
    // SAFETY: getrusage fills the zeroed struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Usage {
        user: tv(ru.ru_utime),
        sys: tv(ru.ru_stime),
        nvcsw: ru.ru_nvcsw,
        nivcsw: ru.ru_nivcsw,
    }
}

/// A field of /proc/self/status in kB (VmRSS, VmHWM).
fn proc_status_kb(field: &str) -> u64 {
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

fn fd_limit() -> usize {
    // SAFETY: plain libc calls with valid pointers.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
        lim.rlim_cur.min(1 << 30) as usize
    }
}

/// Child processes die with their parent (no orphaned drains or sinks).
fn die_with_parent() {
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() == 1 {
            std::process::exit(4);
        }
    }
}

/// Ends the process if it is still running after `secs`.
fn watchdog(what: &'static str, secs: f64) {
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(secs));
            eprintln!("fanout-bench {what}: watchdog fired after {secs:.0} s, exiting");
            println!("RESULT status=timeout");
            let _ = std::io::stdout().flush();
            std::process::exit(3);
        })
        .expect("watchdog thread");
}

fn set_nonblocking(fd: RawFd) {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
}

/// Counters the drain publishes and the sink process reads without a syscall: a
/// shared memfd page.
struct SharedCounters {
    fd: OwnedFd,
    ptr: *const AtomicU64,
}

// SAFETY: the pointer is a shared mapping of atomics that lives as long as the struct.
unsafe impl Send for SharedCounters {}
unsafe impl Sync for SharedCounters {}

/// Slots of the shared page.
const C_BYTES: usize = 0;
const C_MEASURED_RECORDS: usize = 1;

impl SharedCounters {
    fn create() -> SharedCounters {
        // SAFETY: memfd_create with a NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"fanout-bench".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", Errno::last());
        // SAFETY: fd was just created and is ours.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) }, 0);
        SharedCounters::map(fd)
    }

    fn map(fd: OwnedFd) -> SharedCounters {
        // SAFETY: maps one page of the memfd shared; unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert!(ptr != libc::MAP_FAILED, "mmap: {}", Errno::last());
        SharedCounters {
            fd,
            ptr: ptr as *const AtomicU64,
        }
    }

    fn get(&self, slot: usize) -> &AtomicU64 {
        assert!(slot < 512);
        // SAFETY: within the mapped page; AtomicU64 has the layout of u64.
        unsafe { &*self.ptr.add(slot) }
    }
}

impl Drop for SharedCounters {
    fn drop(&mut self) {
        // SAFETY: the mapping made in map().
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, 4096) };
    }
}

fn send_fds(sock: RawFd, fds: &[RawFd]) -> nix::Result<()> {
    let iov = [IoSlice::new(b"F")];
    let cmsg = [ControlMessage::ScmRights(fds)];
    sendmsg::<()>(sock, &iov, &cmsg, MsgFlags::empty(), None).map(|_| ())
}

/// Receives one message's fds; an empty vector at EOF.
fn recv_fds(sock: RawFd) -> nix::Result<Vec<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 253]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut out = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            // SAFETY: the kernel just installed these fds for us.
            out.extend(
                fds.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok(out)
}

/// `k=v k=v` to a map.
fn parse_kv(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// "4096", "4K", "4KiB", "64k" -> bytes (K = 1024).
fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.trim_end_matches("ib").trim_end_matches('b');
    let (num, mul) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1024),
        Some('m') => (&t[..t.len() - 1], 1024 * 1024),
        _ => (t, 1),
    };
    num.parse::<usize>()
        .map(|n| n * mul)
        .map_err(|_| format!("bad size {s:?}"))
}

/// "2M", "256k", "2000000", "max" -> bits per second (k = 1000); None = unpaced.
fn parse_bitrate(s: &str) -> Result<Option<u64>, String> {
    let t = s.trim().to_ascii_lowercase();
    if t == "max" || t == "0" {
        return Ok(None);
    }
    let t = t.trim_end_matches("bps").trim_end_matches("bit/s");
    let (num, mul) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1e3),
        Some('m') => (&t[..t.len() - 1], 1e6),
        Some('g') => (&t[..t.len() - 1], 1e9),
        _ => (t, 1.0),
    };
    num.parse::<f64>()
        .map(|n| Some((n * mul) as u64))
        .map_err(|_| format!("bad bitrate {s:?}"))
}

fn fmt_bitrate(b: Option<u64>) -> String {
    match b {
        None => "max".into(),
        Some(b) if b >= 1_000_000 && b % 1_000_000 == 0 => format!("{}M", b / 1_000_000),
        Some(b) if b >= 1_000 && b % 1_000 == 0 => format!("{}k", b / 1_000),
        Some(b) => format!("{b}"),
    }
}

fn fmt_size(s: usize) -> String {
    if s >= 1024 && s.is_multiple_of(1024) {
        format!("{}KiB", s / 1024)
    } else {
        format!("{s}B")
    }
}

// ---------------------------------------------------------------------------------
// What one run does (passed from the orchestrator to the sink and drain processes)

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Elem {
    Rs,
    C,
    Raw,
}

impl Elem {
    fn name(self) -> &'static str {
        match self {
            Elem::Rs => "rs",
            Elem::C => "c",
            Elem::Raw => "raw",
        }
    }

    fn parse(s: &str) -> Result<Elem, String> {
        match s {
            "rs" | "rsmultifdsink" => Ok(Elem::Rs),
            "c" | "multifdsink" => Ok(Elem::C),
            "raw" => Ok(Elem::Raw),
            _ => Err(format!("unknown element {s:?} (rs, c, raw)")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Transport {
    Unix,
    Tcp,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Unix => "unix",
            Transport::Tcp => "tcp",
        }
    }

    fn parse(s: &str) -> Result<Transport, String> {
        match s {
            "unix" => Ok(Transport::Unix),
            "tcp" => Ok(Transport::Tcp),
            _ => Err(format!("unknown transport {s:?} (unix, tcp)")),
        }
    }
}

#[derive(Debug, Clone)]
struct Spec {
    elem: Elem,
    transport: Transport,
    clients: usize,
    size: usize,
    /// Bits per second per client stream; None = unpaced.
    bitrate: Option<u64>,
    warmup: f64,
    duration: f64,
    units_max: i64,
    /// Unpaced: in-flight bytes per client before the producer waits.
    window: u64,
    /// The sink process gives up after this many seconds.
    deadline: f64,
}

impl Spec {
    fn to_args(&self) -> Vec<String> {
        vec![
            format!("elem={}", self.elem.name()),
            format!("transport={}", self.transport.name()),
            format!("clients={}", self.clients),
            format!("size={}", self.size),
            format!("bitrate={}", self.bitrate.unwrap_or(0)),
            format!("warmup={}", self.warmup),
            format!("duration={}", self.duration),
            format!("units_max={}", self.units_max),
            format!("window={}", self.window),
            format!("deadline={}", self.deadline),
        ]
    }

    fn from_args(args: &[String]) -> Spec {
        let kv = parse_kv(&args.join(" "));
        let get = |k: &str| kv.get(k).unwrap_or_else(|| panic!("missing {k}")).as_str();
        Spec {
            elem: Elem::parse(get("elem")).unwrap(),
            transport: Transport::parse(get("transport")).unwrap(),
            clients: get("clients").parse().unwrap(),
            size: get("size").parse().unwrap(),
            bitrate: Some(get("bitrate").parse::<u64>().unwrap()).filter(|&b| b > 0),
            warmup: get("warmup").parse().unwrap(),
            duration: get("duration").parse().unwrap(),
            units_max: get("units_max").parse().unwrap(),
            window: get("window").parse().unwrap(),
            deadline: get("deadline").parse().unwrap(),
        }
    }

    /// Seconds between two buffers when paced.
    fn interval(&self) -> Option<f64> {
        self.bitrate.map(|b| self.size as f64 * 8.0 / b as f64)
    }
}

fn write_stamp(buf: &mut [u8], seq: u64, flags: u64) -> u64 {
    buf[0..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&seq.to_le_bytes());
    buf[24..32].copy_from_slice(&flags.to_le_bytes());
    let now = mono_ns();
    buf[16..24].copy_from_slice(&now.to_le_bytes());
    now
}

// ---------------------------------------------------------------------------------
// The drain process

/// Latency histogram: exact below 128 ns, then 64 sub-buckets per power of two
/// (under 1.6 % error).
struct Hist {
    counts: Vec<u64>,
    n: u64,
    max: u64,
}

impl Hist {
    fn new() -> Hist {
        Hist {
            counts: vec![0; 128 + 57 * 64],
            n: 0,
            max: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < 128 {
            v as usize
        } else {
            let e = 63 - v.leading_zeros() as usize;
            let m = (v >> (e - 6)) as usize;
            128 + (e - 7) * 64 + (m - 64)
        }
    }

    fn bucket(i: usize) -> (u64, u64) {
        if i < 128 {
            (i as u64, 1)
        } else {
            let e = (i - 128) / 64 + 7;
            let m = ((i - 128) % 64 + 64) as u64;
            (m << (e - 6), 1 << (e - 6))
        }
    }

    fn record(&mut self, v: u64) {
        self.counts[Hist::index(v)] += 1;
        self.n += 1;
        self.max = self.max.max(v);
    }

    fn quantile(&self, q: f64) -> u64 {
        if self.n == 0 {
            return 0;
        }
        let target = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                let (lo, w) = Hist::bucket(i);
                return (lo + w / 2).min(self.max);
            }
        }
        self.max
    }
}

/// Where a client's stream stands in the drain.
struct Rx {
    fd: Option<OwnedFd>,
    /// Offset inside the current buffer.
    off: usize,
    hdr: [u8; STAMP],
    next_seq: Option<u64>,
    broken: bool,
}

struct DrainStats {
    bytes: u64,
    measured_records: u64,
    records: u64,
    gaps: u64,
    bad: u64,
    hist: Hist,
}

impl DrainStats {
    fn consume(&mut self, rx: &mut Rx, data: &[u8], size: usize, now: u64) {
        self.bytes += data.len() as u64;
        if rx.broken {
            return;
        }
        let mut i = 0;
        while i < data.len() {
            if rx.off < STAMP {
                let take = (STAMP - rx.off).min(data.len() - i);
                rx.hdr[rx.off..rx.off + take].copy_from_slice(&data[i..i + take]);
                rx.off += take;
                i += take;
                if rx.off == STAMP {
                    if &rx.hdr[0..8] != MAGIC {
                        self.bad += 1;
                        rx.broken = true;
                        return;
                    }
                    let word = |k: usize| u64::from_le_bytes(rx.hdr[k..k + 8].try_into().unwrap());
                    let (seq, sent, flags) = (word(8), word(16), word(24));
                    if rx.next_seq.is_some_and(|n| n != seq) {
                        self.gaps += 1;
                    }
                    rx.next_seq = Some(seq + 1);
                    self.records += 1;
                    if flags & FLAG_MEASURED != 0 {
                        self.measured_records += 1;
                        self.hist.record(now.saturating_sub(sent));
                    }
                }
            } else {
                let take = (size - rx.off).min(data.len() - i);
                rx.off += take;
                i += take;
            }
            if rx.off == size {
                rx.off = 0;
            }
        }
    }
}

fn drain_main(args: &[String]) {
    die_with_parent();
    let kv = parse_kv(&args.join(" "));
    let transport = Transport::parse(&kv["transport"]).unwrap();
    let n: usize = kv["clients"].parse().unwrap();
    let size: usize = kv["size"].parse().unwrap();
    let deadline: f64 = kv["deadline"].parse().unwrap();
    watchdog("drain", deadline);
    fd_limit();
    let ctl: RawFd = 0; // stdin is the control socket

    let counters = SharedCounters::map(
        recv_fds(ctl)
            .expect("control socket")
            .pop()
            .expect("shared counters fd"),
    );
    let mut fds: Vec<OwnedFd> = Vec::with_capacity(n);
    match transport {
        Transport::Unix => {
            while fds.len() < n {
                let got = recv_fds(ctl).expect("client fds");
                if got.is_empty() {
                    eprintln!("fanout-bench drain: control socket closed early");
                    std::process::exit(2);
                }
                fds.extend(got);
            }
        }
        Transport::Tcp => {
            let port: u16 = kv["port"].parse().unwrap();
            for _ in 0..n {
                let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the sink");
                fds.push(OwnedFd::from(s));
            }
        }
    }
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
    let mut rxs: Vec<Rx> = Vec::with_capacity(n);
    for (i, fd) in fds.into_iter().enumerate() {
        set_nonblocking(fd.as_raw_fd());
        epoll
            .add(&fd, EpollEvent::new(EpollFlags::EPOLLIN, i as u64))
            .unwrap();
        rxs.push(Rx {
            fd: Some(fd),
            off: 0,
            hdr: [0; STAMP],
            next_seq: None,
            broken: false,
        });
    }
    println!("READY");
    std::io::stdout().flush().unwrap();

    let mut stats = DrainStats {
        bytes: 0,
        measured_records: 0,
        records: 0,
        gaps: 0,
        bad: 0,
        hist: Hist::new(),
    };
    let mut buf = vec![0u8; 256 * 1024];
    let mut events = vec![EpollEvent::empty(); 1024];
    let mut open = n;
    let end = Instant::now() + Duration::from_secs_f64(deadline - 2.0);
    let mut timed_out = false;
    while open > 0 {
        if Instant::now() > end {
            timed_out = true;
            break;
        }
        let k = match epoll.wait(&mut events, EpollTimeout::from(100u16)) {
            Ok(k) => k,
            Err(Errno::EINTR) => 0,
            Err(e) => panic!("epoll_wait: {e}"),
        };
        for ev in &events[..k] {
            let i = ev.data() as usize;
            let rx = &mut rxs[i];
            let Some(fd) = rx.fd.as_ref() else { continue };
            // SAFETY: reading into our buffer from an fd we own.
            let r = unsafe {
                libc::read(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                )
            };
            if r > 0 {
                let now = mono_ns();
                stats.consume(rx, &buf[..r as usize], size, now);
                counters.get(C_BYTES).store(stats.bytes, Ordering::Release);
                counters
                    .get(C_MEASURED_RECORDS)
                    .store(stats.measured_records, Ordering::Release);
            } else if r == 0 || !matches!(Errno::last(), Errno::EAGAIN | Errno::EINTR) {
                let fd = rx.fd.take().unwrap();
                let _ = epoll.delete(&fd);
                open -= 1;
            }
        }
    }
    let u = usage_self();
    println!(
        "RESULT d_status={} d_bytes={} d_records={} d_measured_records={} d_gaps={} d_bad={} \
         d_lat_n={} d_p50_ns={} d_p99_ns={} d_max_ns={} d_cpu_s={:.4} d_open_at_end={}",
        if timed_out { "timeout" } else { "ok" },
        stats.bytes,
        stats.records,
        stats.measured_records,
        stats.gaps,
        stats.bad,
        stats.hist.n,
        stats.hist.quantile(0.50),
        stats.hist.quantile(0.99),
        stats.hist.max,
        u.user + u.sys,
        open
    );
    std::io::stdout().flush().unwrap();
}

// ---------------------------------------------------------------------------------
// The sink process

/// What the sink process measured.
#[derive(Default)]
struct Measured {
    usage: Usage,
    window_s: f64,
    flush_s: f64,
    pushed: u64,
    measured_pushed: u64,
    kicked: usize,
    lost: usize,
    peak_rss_kb: u64,
    flushed: bool,
    /// Time the producer spent in each measured push (element) or fan-out (raw).
    push_p99_ns: u64,
    push_max_ns: u64,
}

fn sink_main(args: &[String]) {
    die_with_parent();
    let spec = Spec::from_args(args);
    watchdog("sink", spec.deadline);
    fd_limit();

    let counters = Arc::new(SharedCounters::create());
    let (ctl, ctl_drain) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("control socketpair");
    let listener = match spec.transport {
        Transport::Tcp => {
            let l = TcpListener::bind(("127.0.0.1", 0)).expect("bind 127.0.0.1");
            // A longer accept queue than std's default, so no SYN waits for a retry.
            // SAFETY: listen() again on our listening socket only resizes the queue.
            unsafe { libc::listen(l.as_raw_fd(), 4096) };
            Some(l)
        }
        Transport::Unix => None,
    };
    let port = listener
        .as_ref()
        .map(|l| l.local_addr().unwrap().port())
        .unwrap_or(0);
    // Every fd of this process is CLOEXEC: the drain inherits only the control socket.
    let mut drain = Command::new(std::env::current_exe().expect("current exe"))
        .arg("__drain")
        .arg(format!("transport={}", spec.transport.name()))
        .arg(format!("clients={}", spec.clients))
        .arg(format!("size={}", spec.size))
        .arg(format!("port={port}"))
        .arg(format!("deadline={}", spec.deadline + 5.0))
        .stdin(Stdio::from(ctl_drain))
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn drain");
    let mut drain_out = BufReader::new(drain.stdout.take().unwrap());
    send_fds(ctl.as_raw_fd(), &[counters.fd.as_raw_fd()]).expect("send counters fd");

    // TCP: accept on a thread of its own while the element is set up and the drain
    // connects.
    let acceptor = listener.as_ref().map(|l| {
        let l = l.try_clone().expect("listener clone");
        let n = spec.clients;
        std::thread::spawn(move || {
            (0..n)
                .map(|_| OwnedFd::from(l.accept().expect("accept").0))
                .collect::<Vec<OwnedFd>>()
        })
    });
    let element = match spec.elem {
        Elem::Raw => None,
        e => Some(ElementRun::new(&spec, e)),
    };
    let base_rss_kb = proc_status_kb("VmRSS:");
    let setup_start = Instant::now();

    // The clients: our ends stay here, the other ends go to the drain.
    let mut ours: Vec<OwnedFd> = Vec::with_capacity(spec.clients);
    match acceptor {
        None => {
            let mut batch: Vec<OwnedFd> = Vec::with_capacity(FDS_PER_MSG);
            for i in 0..spec.clients {
                let (a, b) = socketpair(
                    AddressFamily::Unix,
                    SockType::Stream,
                    None,
                    SockFlag::SOCK_CLOEXEC,
                )
                .expect("socketpair (fd limit?)");
                ours.push(a);
                batch.push(b);
                if batch.len() == FDS_PER_MSG || i + 1 == spec.clients {
                    let raw: Vec<RawFd> = batch.iter().map(|f| f.as_raw_fd()).collect();
                    send_fds(ctl.as_raw_fd(), &raw).expect("send client fds");
                    batch.clear(); // in flight, so ours can be closed
                }
            }
        }
        Some(a) => ours = a.join().expect("accept thread"),
    }
    let mut line = String::new();
    loop {
        line.clear();
        if drain_out.read_line(&mut line).unwrap_or(0) == 0 {
            eprintln!("fanout-bench sink: the drain ended before it was ready");
            println!("RESULT status=drain-failed");
            std::process::exit(2);
        }
        if line.trim() == "READY" {
            break;
        }
    }
    let setup_s = setup_start.elapsed().as_secs_f64();

    let m = match element {
        Some(e) => e.run(&spec, ours, &counters),
        None => run_raw(&spec, ours, &counters),
    };
    // Every client fd is closed now: the drain sees EOF everywhere and reports.
    drop(listener);
    let mut drain_result = BTreeMap::new();
    loop {
        line.clear();
        if drain_out.read_line(&mut line).unwrap_or(0) == 0 {
            break;
        }
        if let Some(rest) = line.strip_prefix("RESULT ") {
            drain_result = parse_kv(rest);
            break;
        }
    }
    let _ = drain.wait();
    let mut out = format!(
        "RESULT status=ok elem={} cpu_user_s={:.4} cpu_sys_s={:.4} nvcsw={} nivcsw={} window_s={:.4} \
         flush_s={:.4} flushed={} pushed={} measured_pushed={} kicked={} lost={} base_rss_kb={} \
         peak_rss_kb={} setup_s={:.3} push_p99_ns={} push_max_ns={}",
        spec.elem.name(),
        m.usage.user,
        m.usage.sys,
        m.usage.nvcsw,
        m.usage.nivcsw,
        m.window_s,
        m.flush_s,
        m.flushed,
        m.pushed,
        m.measured_pushed,
        m.kicked,
        m.lost,
        base_rss_kb,
        m.peak_rss_kb,
        setup_s,
        m.push_p99_ns,
        m.push_max_ns
    );
    for (k, v) in drain_result {
        let _ = write!(out, " {k}={v}");
    }
    println!("{out}");
    std::io::stdout().flush().unwrap();
}

/// The producer's schedule and window, shared by the element and raw runs.
struct Producer {
    start: Instant,
    warm_end: Instant,
    end: Instant,
    interval: Option<f64>,
    seq: u64,
    measured_pushed: u64,
    /// Bytes that should reach the drain, summed at each push over live clients.
    expected: u64,
    window_per_client: u64,
}

enum Next {
    Push {
        measured: bool,
    },
    /// Wait this long (or for events) and ask again.
    Wait(Duration),
    Done,
}

impl Producer {
    fn new(spec: &Spec) -> Producer {
        let start = Instant::now();
        let warm_end = start + Duration::from_secs_f64(spec.warmup);
        Producer {
            start,
            warm_end,
            end: warm_end + Duration::from_secs_f64(spec.duration),
            interval: spec.interval(),
            seq: 0,
            measured_pushed: 0,
            expected: 0,
            window_per_client: spec.window,
        }
    }

    fn next(&self, counters: &SharedCounters, alive: usize) -> Next {
        let now = Instant::now();
        if now >= self.end {
            return Next::Done;
        }
        match self.interval {
            Some(iv) => {
                let due = self.start + Duration::from_secs_f64(iv * self.seq as f64);
                if now < due {
                    return Next::Wait((due - now).min(self.end - now));
                }
            }
            None => {
                let drained = counters.get(C_BYTES).load(Ordering::Acquire);
                let in_flight = self.expected.saturating_sub(drained);
                if in_flight > self.window_per_client * alive.max(1) as u64 {
                    return Next::Wait(Duration::from_micros(100));
                }
            }
        }
        Next::Push {
            measured: now >= self.warm_end,
        }
    }

    fn pushed(&mut self, measured: bool, size: usize, alive: usize) {
        self.seq += 1;
        if measured {
            self.measured_pushed += 1;
        }
        self.expected += (size * alive) as u64;
    }
}

/// Waits until the drain has every measured buffer for the live clients, or nothing
/// moved for a while. Returns whether everything arrived.
fn wait_flushed(counters: &SharedCounters, want: impl Fn() -> u64, mut step: impl FnMut()) -> bool {
    let limit = Instant::now() + Duration::from_secs(15);
    let mut last = counters.get(C_BYTES).load(Ordering::Acquire);
    let mut last_change = Instant::now();
    loop {
        if counters.get(C_MEASURED_RECORDS).load(Ordering::Acquire) >= want() {
            return true;
        }
        let now = Instant::now();
        let bytes = counters.get(C_BYTES).load(Ordering::Acquire);
        if bytes != last {
            last = bytes;
            last_change = now;
        }
        if now > limit || now - last_change > Duration::from_millis(750) {
            return false;
        }
        step();
    }
}

struct ElementRun {
    sink: gst::Element,
    src: gst::Pad,
    pool: gst::BufferPool,
    kicked: Arc<AtomicUsize>,
    lost: Arc<AtomicUsize>,
    owned: Arc<Mutex<HashMap<RawFd, OwnedFd>>>,
}

impl ElementRun {
    fn new(spec: &Spec, elem: Elem) -> ElementRun {
        gst::init().expect("gst init");
        gstrsmultifdsink::plugin_register_static().expect("register rsmultifdsink");
        let factory = match elem {
            Elem::Rs => "rsmultifdsink",
            _ => "multifdsink",
        };
        let sink = gst::ElementFactory::make(factory)
            .build()
            .unwrap_or_else(|_| panic!("no element {factory}"));
        // Identical settings for both elements; everything else stays default.
        sink.set_property("sync", false);
        sink.set_property_from_str("unit-format", "buffers");
        sink.set_property("units-max", spec.units_max);

        let kicked = Arc::new(AtomicUsize::new(0));
        let lost = Arc::new(AtomicUsize::new(0));
        let owned: Arc<Mutex<HashMap<RawFd, OwnedFd>>> = Default::default();
        let (k, l) = (kicked.clone(), lost.clone());
        sink.connect("client-removed", false, move |args| {
            let status = gst::glib::EnumValue::from_value(&args[2])
                .map(|(_, v)| v.nick())
                .unwrap_or("?");
            match status {
                "slow" => k.fetch_add(1, Ordering::SeqCst),
                "removed" => 0,
                _ => l.fetch_add(1, Ordering::SeqCst),
            };
            None
        });
        let o = owned.clone();
        sink.connect("client-fd-removed", false, move |args| {
            let fd = args[1].get::<i32>().unwrap();
            o.lock().unwrap().remove(&fd); // closes it
            None
        });

        let src = gst::Pad::builder(gst::PadDirection::Src)
            .name("src")
            .build();
        src.set_active(true).unwrap();
        src.link(&sink.static_pad("sink").unwrap()).unwrap();
        let _ = sink.set_state(gst::State::Playing).expect("PLAYING");
        src.push_event(gst::event::StreamStart::new("fanout-bench"));
        src.push_event(gst::event::Caps::new(
            &gst::Caps::builder("application/x-fanout-bench").build(),
        ));
        src.push_event(gst::event::Segment::new(&gst::FormattedSegment::<
            gst::ClockTime,
        >::new()));
        let pool = gst::BufferPool::new();
        let mut config = pool.config();
        config.set_params(None, spec.size as u32, 0, 0);
        pool.set_config(config).expect("pool config");
        pool.set_active(true).expect("pool active");
        ElementRun {
            sink,
            src,
            pool,
            kicked,
            lost,
            owned,
        }
    }

    fn alive(&self, n: usize) -> usize {
        n.saturating_sub(self.kicked.load(Ordering::SeqCst) + self.lost.load(Ordering::SeqCst))
    }

    fn run(self, spec: &Spec, fds: Vec<OwnedFd>, counters: &SharedCounters) -> Measured {
        let n = fds.len();
        {
            let mut owned = self.owned.lock().unwrap();
            for fd in fds {
                owned.insert(fd.as_raw_fd(), fd);
            }
        }
        let raws: Vec<RawFd> = self.owned.lock().unwrap().keys().copied().collect();
        for fd in raws {
            self.sink.emit_by_name::<()>("add", &[&fd]);
        }
        let iv_ns = spec.interval().map(|i| (i * 1e9) as u64).unwrap_or(0);
        let mut p = Producer::new(spec);
        let mut u0 = None;
        let mut t0 = Instant::now();
        let mut push_hist = Hist::new();
        loop {
            match p.next(counters, self.alive(n)) {
                Next::Done => break,
                Next::Wait(d) => std::thread::sleep(d),
                Next::Push { measured } => {
                    if measured && u0.is_none() {
                        u0 = Some(usage_self());
                        t0 = Instant::now();
                    }
                    let mut buf = self.pool.acquire_buffer(None).expect("pool buffer");
                    {
                        let b = buf.get_mut().unwrap();
                        b.set_pts(gst::ClockTime::from_nseconds(p.seq * iv_ns));
                        b.set_offset(p.seq);
                        let mut map = b.map_writable().unwrap();
                        write_stamp(
                            map.as_mut_slice(),
                            p.seq,
                            if measured { FLAG_MEASURED } else { 0 },
                        );
                    }
                    let t = Instant::now();
                    if let Err(e) = self.src.push(buf) {
                        panic!("push: {e:?}");
                    }
                    if measured {
                        push_hist.record(t.elapsed().as_nanos() as u64);
                    }
                    p.pushed(measured, spec.size, self.alive(n));
                }
            }
        }
        let window_s = t0.elapsed().as_secs_f64();
        let u0 = u0.unwrap_or_else(usage_self);
        let flush_start = Instant::now();
        let measured_pushed = p.measured_pushed;
        let flushed = wait_flushed(
            counters,
            || measured_pushed * self.alive(n) as u64,
            || std::thread::sleep(Duration::from_millis(2)),
        );
        let u1 = usage_self();
        let m = Measured {
            usage: Usage {
                user: u1.user - u0.user,
                sys: u1.sys - u0.sys,
                nvcsw: u1.nvcsw - u0.nvcsw,
                nivcsw: u1.nivcsw - u0.nivcsw,
            },
            window_s,
            flush_s: flush_start.elapsed().as_secs_f64(),
            pushed: p.seq,
            measured_pushed,
            kicked: self.kicked.load(Ordering::SeqCst),
            lost: self.lost.load(Ordering::SeqCst),
            peak_rss_kb: proc_status_kb("VmHWM:"),
            flushed,
            push_p99_ns: push_hist.quantile(0.99),
            push_max_ns: push_hist.max,
        };
        let _ = self.sink.set_state(gst::State::Null);
        self.owned.lock().unwrap().clear();
        let _ = self.pool.set_active(false);
        m
    }
}

/// The floor: one thread, the same producer schedule, and for each client one
/// `writev` of everything it has not sent yet (up to IOV_MAX buffers), epoll
/// (edge-triggered EPOLLOUT) for clients whose socket is full, the same units-max kick.
fn run_raw(spec: &Spec, fds: Vec<OwnedFd>, counters: &SharedCounters) -> Measured {
    struct Client {
        fd: Option<OwnedFd>,
        pos: u64,
        off: usize,
        blocked: bool,
    }
    // SAFETY: ignoring SIGPIPE: a closed peer is EPIPE.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let n = fds.len();
    let size = spec.size;
    let batch = match spec.bitrate {
        Some(_) => 1,
        None => ((128 << 10) / size).clamp(1, 64),
    };
    let ring_len = spec.units_max.max(1) as usize + batch + 2;
    let mut ring: Vec<Vec<u8>> = (0..ring_len).map(|_| vec![0u8; size]).collect();
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
    let mut clients: Vec<Client> = Vec::with_capacity(n);
    for (i, fd) in fds.into_iter().enumerate() {
        set_nonblocking(fd.as_raw_fd());
        epoll
            .add(
                &fd,
                EpollEvent::new(EpollFlags::EPOLLOUT | EpollFlags::EPOLLET, i as u64),
            )
            .unwrap();
        clients.push(Client {
            fd: Some(fd),
            pos: 0,
            off: 0,
            blocked: false,
        });
    }
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(1024);
    let (mut kicked, mut lost, mut alive) = (0usize, 0usize, n);
    // Writes what the client has not sent of buffers [pos, next). Returns false if
    // the client failed.
    let write_client = |c: &mut Client, ring: &[Vec<u8>], next: u64, iov: &mut Vec<libc::iovec>| {
        let Some(fd) = c.fd.as_ref().map(|f| f.as_raw_fd()) else {
            return true;
        };
        while c.pos < next && !c.blocked {
            iov.clear();
            let mut total = 0;
            let mut s = c.pos;
            while s < next && iov.len() < 1024 {
                let b = &ring[(s % ring.len() as u64) as usize];
                let from = if s == c.pos { c.off } else { 0 };
                iov.push(libc::iovec {
                    iov_base: b[from..].as_ptr() as *mut libc::c_void,
                    iov_len: b.len() - from,
                });
                total += b.len() - from;
                s += 1;
            }
            // SAFETY: iov points into ring buffers that outlive the call.
            let r = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as i32) };
            if r < 0 {
                match Errno::last() {
                    Errno::EINTR => continue,
                    Errno::EAGAIN => c.blocked = true,
                    _ => return false,
                }
            } else {
                let mut left = r as usize;
                while left > 0 {
                    let rest = size - c.off;
                    if left >= rest {
                        left -= rest;
                        c.off = 0;
                        c.pos += 1;
                    } else {
                        c.off += left;
                        left = 0;
                    }
                }
                if (r as usize) < total {
                    c.blocked = true;
                }
            }
        }
        true
    };
    let mut events = vec![EpollEvent::empty(); 1024];
    let mut handle_events = |clients: &mut Vec<Client>,
                             ring: &[Vec<u8>],
                             next: u64,
                             timeout: EpollTimeout,
                             iov: &mut Vec<libc::iovec>|
     -> usize {
        let k = epoll.wait(&mut events, timeout).unwrap_or(0);
        let mut failed = 0;
        for ev in &events[..k] {
            let c = &mut clients[ev.data() as usize];
            if c.fd.is_none() {
                continue;
            }
            c.blocked = false;
            if !write_client(c, ring, next, iov) {
                c.fd = None;
                failed += 1;
            }
        }
        failed
    };

    let mut p = Producer::new(spec);
    let mut u0 = None;
    let mut t0 = Instant::now();
    let mut push_hist = Hist::new();
    loop {
        match p.next(counters, alive) {
            Next::Done => break,
            Next::Wait(d) => {
                let ms = (d.as_micros().div_ceil(1000)).min(1000) as u16;
                let f = handle_events(&mut clients, &ring, p.seq, EpollTimeout::from(ms), &mut iov);
                lost += f;
                alive -= f;
            }
            Next::Push { measured } => {
                if measured && u0.is_none() {
                    u0 = Some(usage_self());
                    t0 = Instant::now();
                }
                // Unpaced, the floor writes what accumulated in one call, as a
                // batching IO thread would: up to `batch` buffers per fan-out.
                let mut measured = measured;
                for i in 0..batch {
                    if i > 0 {
                        match p.next(counters, alive) {
                            Next::Push { measured: m } => measured = m,
                            _ => break,
                        }
                    }
                    let slot = (p.seq % ring_len as u64) as usize;
                    write_stamp(
                        &mut ring[slot],
                        p.seq,
                        if measured { FLAG_MEASURED } else { 0 },
                    );
                    p.pushed(measured, size, alive);
                }
                let next = p.seq;
                let t = Instant::now();
                for c in clients.iter_mut() {
                    if c.fd.is_none() {
                        continue;
                    }
                    if next - c.pos > spec.units_max as u64 {
                        c.fd = None; // too slow: kicked (closes the fd)
                        kicked += 1;
                        alive -= 1;
                    } else if !c.blocked && !write_client(c, &ring, next, &mut iov) {
                        c.fd = None;
                        lost += 1;
                        alive -= 1;
                    }
                }
                if measured {
                    push_hist.record(t.elapsed().as_nanos() as u64);
                }
                let f = handle_events(&mut clients, &ring, next, EpollTimeout::ZERO, &mut iov);
                lost += f;
                alive -= f;
            }
        }
    }
    let window_s = t0.elapsed().as_secs_f64();
    let u0 = u0.unwrap_or_else(usage_self);
    let flush_start = Instant::now();
    let measured_pushed = p.measured_pushed;
    let want = measured_pushed * alive as u64;
    let next = p.seq;
    let flushed = wait_flushed(
        counters,
        || want,
        || {
            handle_events(
                &mut clients,
                &ring,
                next,
                EpollTimeout::from(2u16),
                &mut iov,
            );
        },
    );
    let u1 = usage_self();
    let m = Measured {
        usage: Usage {
            user: u1.user - u0.user,
            sys: u1.sys - u0.sys,
            nvcsw: u1.nvcsw - u0.nvcsw,
            nivcsw: u1.nivcsw - u0.nivcsw,
        },
        window_s,
        flush_s: flush_start.elapsed().as_secs_f64(),
        pushed: p.seq,
        measured_pushed,
        kicked,
        lost,
        peak_rss_kb: proc_status_kb("VmHWM:"),
        flushed,
        push_p99_ns: push_hist.quantile(0.99),
        push_max_ns: push_hist.max,
    };
    drop(clients);
    drop(ring);
    m
}

// ---------------------------------------------------------------------------------
// The orchestrator

#[derive(Debug, Clone)]
struct Opts {
    mode: String,
    elements: Vec<Elem>,
    transports: Vec<Transport>,
    clients: Vec<usize>,
    sizes: Vec<usize>,
    bitrates: Vec<Option<u64>>,
    duration: f64,
    warmup: f64,
    reps: usize,
    max_lag: f64,
    window: u64,
    window_total: u64,
    sustain_bitrates: Vec<u64>,
    sustain_start: usize,
    sustain_max: usize,
    sustain_resolution: f64,
    csv: Option<String>,
    wait_idle: f64,
}

const HELP: &str = "\
fanout-bench: rsmultifdsink vs C multifdsink (vs a raw writev loop), loopback only

usage: cargo run --release --example fanout-bench -- [options]

  --mode matrix|sustain|raw|all   matrix (default): every case below, all elements;
                                  sustain: highest client count without a kick at
                                  each --sustain-bitrates; raw: the matrix with only
                                  the raw writev floor; all: matrix then sustain
  --elements rs,c,raw             elements to run (default rs,c,raw; sustain: rs,c)
  --transport unix,tcp            UNIX socketpairs and/or TCP over 127.0.0.1
  --clients 1,100,1000,5000,10000 client counts (at most the fd limit - 300)
  --size 4K                       buffer sizes, 64 bytes to 64 KiB and more (list)
  --bitrate max,2M                per-client stream bitrate (paced) or max (unpaced,
                                  limited by a window of in-flight bytes) (list)
  --duration 5                    measured seconds per run
  --warmup 1                      seconds pushed before measuring
  --reps 1                        repetitions; tables show medians
  --max-lag 1                     paced runs: units-max = this many seconds of
                                  buffers (at least 4): a client further behind is kicked
  --window 4M                     unpaced: in-flight bytes per client before the
                                  producer waits (capped by --window-total / clients)
  --window-total 256M
  --sustain-bitrates 256k,2M      bitrates searched by --mode sustain
  --sustain-start 500             first client count tried (doubles, then bisects)
  --sustain-max N                 upper bound (default: the fd limit - 300)
  --sustain-resolution 0.05       stop bisecting when the bracket is this narrow
  --csv PATH                      also write every run as CSV (scripts/bench-plot.py)
  --wait-idle 0                   before each run, wait up to this many seconds for
                                  the machine to be idle (other processes under 10 %
                                  of the CPUs); every run records the CPU other
                                  processes used meanwhile (foreign%)
";

fn list<T>(s: &str, f: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
    s.split(',').filter(|x| !x.is_empty()).map(f).collect()
}

fn parse_opts(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        mode: "matrix".into(),
        elements: vec![],
        transports: vec![Transport::Unix, Transport::Tcp],
        clients: vec![1, 100, 1000, 5000, 10000],
        sizes: vec![4096],
        bitrates: vec![None, Some(2_000_000)],
        duration: 5.0,
        warmup: 1.0,
        reps: 1,
        max_lag: 1.0,
        window: 4 << 20,
        window_total: 256 << 20,
        sustain_bitrates: vec![256_000, 2_000_000],
        sustain_start: 500,
        sustain_max: fd_limit().saturating_sub(FD_RESERVE),
        sustain_resolution: 0.05,
        csv: None,
        wait_idle: 0.0,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (key, inline) = match a.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        if key == "--help" || key == "-h" {
            print!("{HELP}");
            std::process::exit(0);
        }
        const KNOWN: &[&str] = &[
            "--mode",
            "--elements",
            "--element",
            "--transport",
            "--transports",
            "--clients",
            "--size",
            "--sizes",
            "--bitrate",
            "--bitrates",
            "--duration",
            "--warmup",
            "--reps",
            "--max-lag",
            "--window",
            "--window-total",
            "--sustain-bitrates",
            "--sustain-start",
            "--sustain-max",
            "--sustain-resolution",
            "--csv",
            "--wait-idle",
        ];
        if !KNOWN.contains(&key.as_str()) {
            return Err(format!("unknown option {key} (try --help)"));
        }
        let v = match inline {
            Some(v) => v,
            None => it
                .next()
                .cloned()
                .ok_or_else(|| format!("{key} needs a value"))?,
        };
        let num = |v: &str| v.parse::<f64>().map_err(|_| format!("bad number {v:?}"));
        match key.as_str() {
            "--mode" => o.mode = v,
            "--elements" | "--element" => o.elements = list(&v, Elem::parse)?,
            "--transport" | "--transports" => o.transports = list(&v, Transport::parse)?,
            "--clients" => {
                o.clients = list(&v, |x| x.parse().map_err(|_| format!("bad count {x:?}")))?
            }
            "--size" | "--sizes" => o.sizes = list(&v, parse_size)?,
            "--bitrate" | "--bitrates" => o.bitrates = list(&v, parse_bitrate)?,
            "--duration" => o.duration = num(&v)?,
            "--warmup" => o.warmup = num(&v)?,
            "--reps" => o.reps = num(&v)? as usize,
            "--max-lag" => o.max_lag = num(&v)?,
            "--window" => o.window = parse_size(&v)? as u64,
            "--window-total" => o.window_total = parse_size(&v)? as u64,
            "--sustain-bitrates" => {
                o.sustain_bitrates = list(&v, |x| {
                    parse_bitrate(x)?.ok_or_else(|| "sustain needs a paced bitrate".to_string())
                })?
            }
            "--sustain-start" => o.sustain_start = num(&v)? as usize,
            "--sustain-max" => o.sustain_max = num(&v)? as usize,
            "--sustain-resolution" => o.sustain_resolution = num(&v)?,
            "--csv" => o.csv = Some(v),
            "--wait-idle" => o.wait_idle = num(&v)?,
            _ => return Err(format!("unknown option {key} (try --help)")),
        }
    }
    if !["matrix", "sustain", "raw", "all"].contains(&o.mode.as_str()) {
        return Err(format!("unknown mode {:?}", o.mode));
    }
    if o.elements.is_empty() {
        o.elements = match o.mode.as_str() {
            "raw" => vec![Elem::Raw],
            "sustain" => vec![Elem::Rs, Elem::C],
            _ => vec![Elem::Rs, Elem::C, Elem::Raw],
        };
    } else if o.mode == "raw" {
        o.elements = vec![Elem::Raw];
    }
    if o.sizes.iter().any(|&s| s < 64) {
        return Err("buffer size must be at least 64 bytes (the stamp)".into());
    }
    if o.reps == 0 || o.duration <= 0.0 {
        return Err("--reps and --duration must be positive".into());
    }
    o.sustain_max = o
        .sustain_max
        .min(fd_limit().saturating_sub(FD_RESERVE))
        .max(1);
    Ok(o)
}

/// One finished run, with the derived figures.
#[derive(Debug, Clone, Default)]
struct Row {
    mode: String,
    transport: String,
    clients: usize,
    size: usize,
    bitrate: String,
    elem: String,
    rep: usize,
    status: String,
    duration_s: f64,
    pushed_bytes: u64,
    delivered_bytes: u64,
    delivered_ratio: f64,
    push_rate_ratio: f64,
    cpu_s: f64,
    cpu_user_s: f64,
    cpu_sys_s: f64,
    cpu_s_per_gb: f64,
    kicked: u64,
    lost: u64,
    p50_ms: f64,
    push_p99_us: f64,
    push_max_us: f64,
    p99_ms: f64,
    max_ms: f64,
    peak_rss_mb: f64,
    rss_per_client_kb: f64,
    gbit_s: f64,
    drain_cpu_s: f64,
    gaps: u64,
    flushed: bool,
    nvcsw: i64,
    setup_s: f64,
    loadavg: f64,
    busy_before_pct: f64,
    foreign_pct: f64,
}

const CSV_HEADER: &str = "mode,transport,clients,size,bitrate,element,rep,status,duration_s,\
pushed_bytes,delivered_bytes,delivered_ratio,push_rate_ratio,cpu_s,cpu_user_s,cpu_sys_s,\
cpu_s_per_gb,kicked,lost,p50_ms,p99_ms,max_ms,peak_rss_mb,rss_per_client_kb,gbit_s,\
drain_cpu_s,gaps,flushed,nvcsw,setup_s,loadavg,busy_before_pct,foreign_pct,push_p99_us,push_max_us";

impl Row {
    fn csv(&self) -> String {
        format!(
            "{},{},{},{},{},{},{},{},{:.3},{},{},{:.5},{:.4},{:.4},{:.4},{:.4},{:.4},{},{},{:.4},{:.4},{:.4},{:.2},{:.3},{:.4},{:.4},{},{},{},{:.3},{:.2},{:.1},{:.1},{:.1},{:.1}",
            self.mode,
            self.transport,
            self.clients,
            self.size,
            self.bitrate,
            self.elem,
            self.rep,
            self.status,
            self.duration_s,
            self.pushed_bytes,
            self.delivered_bytes,
            self.delivered_ratio,
            self.push_rate_ratio,
            self.cpu_s,
            self.cpu_user_s,
            self.cpu_sys_s,
            self.cpu_s_per_gb,
            self.kicked,
            self.lost,
            self.p50_ms,
            self.p99_ms,
            self.max_ms,
            self.peak_rss_mb,
            self.rss_per_client_kb,
            self.gbit_s,
            self.drain_cpu_s,
            self.gaps,
            self.flushed,
            self.nvcsw,
            self.setup_s,
            self.loadavg,
            self.busy_before_pct,
            self.foreign_pct,
            self.push_p99_us,
            self.push_max_us
        )
    }

    /// Kept up: nobody kicked or lost, everything delivered, the producer on time.
    fn sustained(&self) -> bool {
        self.status == "ok"
            && self.kicked == 0
            && self.lost == 0
            && self.delivered_ratio >= 0.99
            && self.push_rate_ratio >= 0.97
    }
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

fn make_spec(
    o: &Opts,
    elem: Elem,
    t: Transport,
    clients: usize,
    size: usize,
    bitrate: Option<u64>,
) -> Spec {
    let window = (o.window.min(o.window_total / clients.max(1) as u64)).max(2 * size as u64);
    let units_max = match bitrate {
        Some(b) => ((o.max_lag * b as f64 / 8.0 / size as f64).ceil() as i64).max(4),
        // Unpaced: the window bounds the lag; kick only a client that stalls.
        None => (8 * window / size as u64).max(64) as i64,
    };
    let setup = 30.0 + clients as f64 * 0.004;
    Spec {
        elem,
        transport: t,
        clients,
        size,
        bitrate,
        warmup: o.warmup,
        duration: o.duration,
        units_max,
        window,
        deadline: setup + o.warmup + o.duration + 40.0,
    }
}

/// Runs one sink process (which runs its drain) with a watchdog.
/// How busy the machine was around a run, from /proc/stat.
struct Noise {
    load: f64,
    /// Busy fraction of all CPUs just before the run.
    busy_before: f64,
    /// CPU other processes (not this benchmark) used during the run, in % of all CPUs.
    foreign_pct: f64,
}

/// (busy, total) jiffies of the whole machine.
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn busy_fraction(over: Duration) -> f64 {
    let (b0, t0) = cpu_jiffies();
    std::thread::sleep(over);
    let (b1, t1) = cpu_jiffies();
    if t1 > t0 {
        (b1 - b0) as f64 / (t1 - t0) as f64
    } else {
        0.0
    }
}

fn children_cpu() -> f64 {
    // SAFETY: getrusage fills the zeroed struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Runs one case, waiting first for an idle machine if asked, and measures how much
/// CPU other processes took meanwhile (our sink and drain are reaped children, so
/// their CPU is known exactly).
fn run_measured(o: &Opts, spec: &Spec) -> (BTreeMap<String, String>, Noise) {
    let mut busy_before = busy_fraction(Duration::from_millis(300));
    if o.wait_idle > 0.0 {
        let until = Instant::now() + Duration::from_secs_f64(o.wait_idle);
        while busy_before > 0.10 && Instant::now() < until {
            busy_before = busy_fraction(Duration::from_secs(1));
        }
    }
    let load = loadavg();
    // SAFETY: sysconf with a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    let (j0, _) = cpu_jiffies();
    let (c0, s0, t0) = (children_cpu(), usage_self(), Instant::now());
    let r = run_once(spec);
    let (j1, _) = cpu_jiffies();
    let (c1, s1) = (children_cpu(), usage_self());
    let wall = t0.elapsed().as_secs_f64();
    let ours = (c1 - c0) + (s1.user + s1.sys - s0.user - s0.sys);
    let machine = (j1 - j0) as f64 / hz;
    let foreign_pct = ((machine - ours).max(0.0) / (wall * cpus) * 100.0).min(100.0);
    (
        r,
        Noise {
            load,
            busy_before,
            foreign_pct,
        },
    )
}

fn run_once(spec: &Spec) -> BTreeMap<String, String> {
    let mut child = match Command::new(std::env::current_exe().expect("current exe"))
        .arg("__sink")
        .args(spec.to_args())
        .stdout(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return BTreeMap::from([("status".into(), format!("spawn-failed:{e}"))]),
    };
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("RESULT ") {
                let _ = tx.send(parse_kv(rest));
            }
        }
    });
    let result = rx.recv_timeout(Duration::from_secs_f64(spec.deadline + 15.0));
    let status = match &result {
        Ok(_) => None,
        Err(mpsc::RecvTimeoutError::Disconnected) => Some("crashed"),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            // Ends this child only (its drain follows via PDEATHSIG).
            let _ = child.kill();
            Some("killed")
        }
    };
    let exit = child.wait();
    match (result, status) {
        (Ok(r), _) => r,
        (Err(_), s) => BTreeMap::from([(
            "status".into(),
            format!("{}:{:?}", s.unwrap_or("no-result"), exit.ok()),
        )]),
    }
}

fn to_row(mode: &str, spec: &Spec, rep: usize, r: &BTreeMap<String, String>, noise: &Noise) -> Row {
    let f = |k: &str| r.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let u = |k: &str| r.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let mut status = r.get("status").cloned().unwrap_or_else(|| "?".into());
    if status == "ok" && r.get("d_status").is_some_and(|s| s != "ok") {
        status = format!("drain-{}", r["d_status"]);
    }
    let size = spec.size as u64;
    let pushed_bytes = u("measured_pushed") * size;
    let delivered = u("d_measured_records") * size;
    let expected = pushed_bytes * spec.clients as u64;
    let cpu = f("cpu_user_s") + f("cpu_sys_s");
    let duration = spec.duration;
    let peak = u("peak_rss_kb");
    let base = u("base_rss_kb");
    Row {
        mode: mode.into(),
        transport: spec.transport.name().into(),
        clients: spec.clients,
        size: spec.size,
        bitrate: fmt_bitrate(spec.bitrate),
        elem: spec.elem.name().into(),
        rep,
        status,
        duration_s: duration,
        pushed_bytes,
        delivered_bytes: delivered,
        delivered_ratio: if expected > 0 {
            delivered as f64 / expected as f64
        } else {
            0.0
        },
        push_rate_ratio: match spec.bitrate {
            Some(b) => pushed_bytes as f64 * 8.0 / duration / b as f64,
            None => 1.0,
        },
        cpu_s: cpu,
        cpu_user_s: f("cpu_user_s"),
        cpu_sys_s: f("cpu_sys_s"),
        cpu_s_per_gb: if delivered > 0 {
            cpu / (delivered as f64 / 1e9)
        } else {
            f64::NAN
        },
        kicked: u("kicked"),
        lost: u("lost"),
        p50_ms: f("d_p50_ns") / 1e6,
        push_p99_us: f("push_p99_ns") / 1e3,
        push_max_us: f("push_max_ns") / 1e3,
        p99_ms: f("d_p99_ns") / 1e6,
        max_ms: f("d_max_ns") / 1e6,
        peak_rss_mb: peak as f64 / 1024.0,
        rss_per_client_kb: peak.saturating_sub(base) as f64 / spec.clients.max(1) as f64,
        gbit_s: delivered as f64 * 8.0 / duration / 1e9,
        drain_cpu_s: f("d_cpu_s"),
        gaps: u("d_gaps"),
        flushed: r.get("flushed").is_some_and(|v| v == "true"),
        nvcsw: u("nvcsw") as i64,
        setup_s: f("setup_s"),
        loadavg: noise.load,
        busy_before_pct: noise.busy_before * 100.0,
        foreign_pct: noise.foreign_pct,
    }
}

struct Csv(Option<std::fs::File>);

impl Csv {
    fn open(path: &Option<String>) -> Csv {
        Csv(path.as_ref().map(|p| {
            let mut f =
                std::fs::File::create(p).unwrap_or_else(|e| panic!("cannot write {p}: {e}"));
            writeln!(f, "{CSV_HEADER}").unwrap();
            f
        }))
    }

    fn row(&mut self, r: &Row) {
        if let Some(f) = &mut self.0 {
            writeln!(f, "{}", r.csv()).unwrap();
            f.flush().unwrap();
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// The medians of one element in one case.
struct Med {
    cpu_gb: f64,
    deliv: f64,
    push: f64,
    kicked: f64,
    p50: f64,
    p99: f64,
    max: f64,
    rss: f64,
    rss_cl: f64,
    gbit: f64,
    push99: f64,
    status: String,
}

fn medians(rows: &[Row]) -> Med {
    let m = |f: fn(&Row) -> f64| median(rows.iter().map(f).collect());
    let bad: Vec<&str> = rows
        .iter()
        .filter(|r| r.status != "ok")
        .map(|r| r.status.as_str())
        .collect();
    Med {
        cpu_gb: m(|r| r.cpu_s_per_gb),
        deliv: m(|r| r.delivered_ratio),
        push: m(|r| r.push_rate_ratio),
        kicked: m(|r| r.kicked as f64),
        p50: m(|r| r.p50_ms),
        p99: m(|r| r.p99_ms),
        max: m(|r| r.max_ms),
        rss: m(|r| r.peak_rss_mb),
        rss_cl: m(|r| r.rss_per_client_kb),
        gbit: m(|r| r.gbit_s),
        push99: m(|r| r.push_p99_us),
        status: if bad.is_empty() {
            String::new()
        } else {
            format!("  [{}]", bad.join(","))
        },
    }
}

fn ratio(a: f64, b: f64) -> String {
    if a.is_nan() || b.is_nan() || b == 0.0 {
        "-".into()
    } else {
        format!("{:.2}x", a / b)
    }
}

fn print_case(title: &str, by_elem: &[(Elem, Vec<Row>)], reps: usize, unpaced: bool) {
    println!();
    println!("{title}  (median of {reps})");
    if unpaced {
        println!(
            "  (unpaced: the producer keeps the in-flight window full, so latency here is mostly\n   \
             time spent queued in that window; compare latency on paced runs)"
        );
    }
    let cols = [
        "CPU s/GB", "deliv%", "push%", "kicked", "p50 ms", "p99 ms", "max ms", "peakRSS", "RSS/cl",
        "Gbit/s", "push99us",
    ];
    let line = |label: &str, cells: &[String], tail: &str| {
        let mut out = format!("  {label:<7}");
        for c in cells {
            let _ = write!(out, " {c:>9}");
        }
        println!("{out}{tail}");
    };
    line(
        "element",
        &cols.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "",
    );
    let meds: Vec<(Elem, Med)> = by_elem
        .iter()
        .map(|(e, rows)| (*e, medians(rows)))
        .collect();
    for (e, m) in &meds {
        line(
            e.name(),
            &[
                format!("{:.3}", m.cpu_gb),
                format!("{:.2}", m.deliv * 100.0),
                format!("{:.1}", m.push * 100.0),
                format!("{:.0}", m.kicked),
                format!("{:.3}", m.p50),
                format!("{:.3}", m.p99),
                format!("{:.2}", m.max),
                format!("{:.1}MB", m.rss),
                format!("{:.1}KB", m.rss_cl),
                format!("{:.3}", m.gbit),
                format!("{:.0}", m.push99),
            ],
            &m.status,
        );
    }
    let foreign: Vec<f64> = by_elem
        .iter()
        .flat_map(|(_, rows)| rows.iter().map(|r| r.foreign_pct))
        .collect();
    let worst = foreign.iter().copied().fold(0.0, f64::max);
    let get = |e: Elem| meds.iter().find(|(x, _)| *x == e).map(|(_, m)| m);
    for (label, other) in [("rs/C", Elem::C), ("rs/raw", Elem::Raw)] {
        if let (Some(a), Some(b)) = (get(Elem::Rs), get(other)) {
            line(
                label,
                &[
                    ratio(a.cpu_gb, b.cpu_gb),
                    ratio(a.deliv, b.deliv),
                    ratio(a.push, b.push),
                    String::new(),
                    ratio(a.p50, b.p50),
                    ratio(a.p99, b.p99),
                    ratio(a.max, b.max),
                    ratio(a.rss, b.rss),
                    ratio(a.rss_cl, b.rss_cl),
                    ratio(a.gbit, b.gbit),
                    ratio(a.push99, b.push99),
                ],
                "",
            );
        }
    }
    println!(
        "  (other processes on the machine used {:.0}% of the CPUs during these runs, worst {:.0}%)",
        median(foreign),
        worst
    );
}

fn progress(r: &Row) {
    eprintln!(
        "  [{} {} n={} {} {} rep{}] {:<3} cpu {:.3} s/GB, deliv {:.2}%, kicked {}, p99 {:.2} ms, {:.2} Gbit/s, push p99 {:.0} us, drain cpu {:.2} s, other procs {:.0}% {}",
        r.mode,
        r.transport,
        r.clients,
        fmt_size(r.size),
        r.bitrate,
        r.rep,
        r.elem,
        r.cpu_s_per_gb,
        r.delivered_ratio * 100.0,
        r.kicked,
        r.p99_ms,
        r.gbit_s,
        r.push_p99_us,
        r.drain_cpu_s,
        r.foreign_pct,
        if r.status == "ok" { "" } else { &r.status }
    );
}

fn run_matrix(o: &Opts, csv: &mut Csv) {
    let limit = fd_limit().saturating_sub(FD_RESERVE);
    let mode = if o.mode == "raw" { "raw" } else { "matrix" };
    for &t in &o.transports {
        for &size in &o.sizes {
            for &bitrate in &o.bitrates {
                for &clients in &o.clients {
                    if clients > limit {
                        println!(
                            "\n{} clients={clients}: skipped (more than the fd limit {} - {FD_RESERVE} per process)",
                            t.name(),
                            limit + FD_RESERVE
                        );
                        continue;
                    }
                    let mut by_elem: Vec<(Elem, Vec<Row>)> =
                        o.elements.iter().map(|&e| (e, Vec::new())).collect();
                    for rep in 0..o.reps {
                        // Alternate the order so no element always runs on a warm cache.
                        let mut order = o.elements.clone();
                        let k = rep % order.len();
                        order.rotate_left(k);
                        for e in order {
                            let spec = make_spec(o, e, t, clients, size, bitrate);
                            let (r, noise) = run_measured(o, &spec);
                            let row = to_row(mode, &spec, rep, &r, &noise);
                            progress(&row);
                            csv.row(&row);
                            by_elem
                                .iter_mut()
                                .find(|(x, _)| *x == e)
                                .unwrap()
                                .1
                                .push(row);
                        }
                    }
                    let spec = make_spec(o, o.elements[0], t, clients, size, bitrate);
                    print_case(
                        &format!(
                            "{} clients={} size={} bitrate={}/client (units-max={} buffers{})",
                            t.name(),
                            clients,
                            fmt_size(size),
                            fmt_bitrate(bitrate),
                            spec.units_max,
                            match bitrate {
                                None => format!(
                                    ", window {} per client",
                                    fmt_size(spec.window as usize)
                                ),
                                Some(_) => String::new(),
                            }
                        ),
                        &by_elem,
                        o.reps,
                        bitrate.is_none(),
                    );
                }
            }
        }
    }
}

fn run_sustain(o: &Opts, csv: &mut Csv) {
    let size = o.sizes[0];
    let mut results: Vec<(Transport, u64, Elem, usize, bool)> = Vec::new();
    for &t in &o.transports {
        for &bitrate in &o.sustain_bitrates {
            for &e in &o.elements {
                let (mut lo, mut hi): (usize, Option<usize>) = (0, None);
                let mut n = o.sustain_start.min(o.sustain_max).max(1);
                for _trial in 0..20 {
                    let spec = make_spec(o, e, t, n, size, Some(bitrate));
                    let (r, noise) = run_measured(o, &spec);
                    let row = to_row("sustain-trial", &spec, 0, &r, &noise);
                    let ok = row.sustained();
                    progress(&row);
                    eprintln!(
                        "    -> {} (push rate {:.1}%)",
                        if ok { "sustained" } else { "NOT sustained" },
                        row.push_rate_ratio * 100.0
                    );
                    csv.row(&row);
                    if ok {
                        lo = n;
                    } else {
                        hi = Some(n);
                    }
                    let next = match hi {
                        None if lo >= o.sustain_max => break,
                        None => (lo * 2).min(o.sustain_max),
                        Some(h) => {
                            let width = h - lo;
                            if width as f64 <= o.sustain_resolution * lo as f64 || width <= 10 {
                                break;
                            }
                            lo + width / 2
                        }
                    };
                    n = next;
                }
                let capped = hi.is_none();
                let row = Row {
                    mode: "sustain".into(),
                    transport: t.name().into(),
                    clients: lo,
                    size,
                    bitrate: fmt_bitrate(Some(bitrate)),
                    elem: e.name().into(),
                    status: if capped { "capped".into() } else { "ok".into() },
                    duration_s: o.duration,
                    ..Row::default()
                };
                csv.row(&row);
                eprintln!(
                    "  => {} {} {}: {}{} clients sustained",
                    t.name(),
                    fmt_bitrate(Some(bitrate)),
                    e.name(),
                    if capped { ">= " } else { "" },
                    lo
                );
                results.push((t, bitrate, e, lo, capped));
            }
        }
    }
    println!();
    println!(
        "Highest client count sustained without a kick ({} buffers, units-max = {} s of stream, {} s runs; \
         'sustained' = no client kicked or lost, >= 99% delivered, producer on schedule)",
        fmt_size(size),
        o.max_lag,
        o.duration
    );
    print!("  {:<6} {:>9}", "", "bitrate");
    for e in &o.elements {
        print!(" {:>9}", e.name());
    }
    if o.elements.contains(&Elem::Rs) && o.elements.contains(&Elem::C) {
        print!(" {:>7}", "rs/C");
    }
    println!();
    for &t in &o.transports {
        for &b in &o.sustain_bitrates {
            print!("  {:<6} {:>9}", t.name(), fmt_bitrate(Some(b)));
            let get = |e: Elem| {
                results
                    .iter()
                    .find(|r| r.0 == t && r.1 == b && r.2 == e)
                    .map(|r| (r.3, r.4))
            };
            for &e in &o.elements {
                let (n, capped) = get(e).unwrap();
                print!(" {:>9}", format!("{}{}", if capped { ">=" } else { "" }, n));
            }
            if let (Some((a, _)), Some((c, _))) = (get(Elem::Rs), get(Elem::C)) {
                print!(" {:>7}", ratio(a as f64, c as f64));
            }
            println!();
        }
    }
}

fn orchestrate(args: &[String]) {
    let o = match parse_opts(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("fanout-bench: {e}");
            std::process::exit(2);
        }
    };
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let gst_version = {
        gst::init().ok();
        gst::version_string().to_string()
    };
    println!("fanout-bench: rsmultifdsink vs multifdsink, loopback only");
    println!(
        "  machine: {cpus} CPUs, Linux {}, {gst_version}, fd limit {}, load {:.2}",
        kernel.trim(),
        fd_limit(),
        loadavg()
    );
    println!(
        "  each element runs alone in its own sink process (never two at once); CPU = getrusage(RUSAGE_SELF)\n  \
         of that process (producer + element threads, user+sys) from the first measured push until the\n  \
         drain process received everything, per GB received. Latency = drain receive time - stamp taken\n  \
         just before pad.push. Same settings for both: sync=false unit-format=buffers units-max=<below>."
    );
    let mut csv = Csv::open(&o.csv);
    if o.mode != "sustain" {
        run_matrix(&o, &mut csv);
    }
    if o.mode == "sustain" || o.mode == "all" {
        let mut s = o.clone();
        if o.mode == "all" {
            s.elements.retain(|e| *e != Elem::Raw);
        }
        run_sustain(&s, &mut csv);
    }
    if let Some(p) = &o.csv {
        println!("\nCSV written to {p}");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("__sink") => sink_main(&args[2..]),
        Some("__drain") => drain_main(&args[2..]),
        _ => orchestrate(&args[1..]),
    }
}
