// SPDX-License-Identifier: MPL-2.0

//! The drain process (`__drain`): owns the other ends of the client sockets, reads
//! them with epoll, finds the buffer boundaries and measures each measured buffer's
//! push-to-receive latency from its stamp. Stalled clients (`--stalled`) are held
//! open and never read until the sink process says the run is over; every other
//! client's stream is checked to be in order and complete up to the last buffer.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::libc;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::hist::Hist;
use crate::os::{
    C_BYTES, C_COMPLETE, C_PUSHED, SharedCounters, die_with_parent, mono_ns, recv_fds,
    set_nonblocking, usage_self, watchdog,
};
use crate::spec::{FLAG_MEASURED, MAGIC, STAMP, Transport, is_stalled, parse_enum, parse_kv};
use crate::system::raise_fd_limit;
use crate::test_pki::client_config_for;
use rustls::ClientConnection;

/// stdin is the control socket from the sink process.
const CONTROL: RawFd = 0;

/// Where a client's stream stands in the drain.
struct Rx {
    fd: Option<OwnedFd>,
    /// TLS: the client's connection, which decrypts what `fd` reads.
    tls: Option<ClientConnection>,
    /// Offset inside the current buffer.
    off: usize,
    hdr: [u8; STAMP],
    next_seq: Option<u64>,
    /// Sequence numbers skipped in this client's stream.
    gaps: u64,
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

impl Rx {
    fn new(fd: Option<OwnedFd>) -> Rx {
        Rx {
            fd,
            tls: None,
            off: 0,
            hdr: [0; STAMP],
            next_seq: None,
            gaps: 0,
            broken: false,
        }
    }
}

impl Rx {
    /// Whether this stream has arrived up to the last of `pushed` buffers, with every
    /// stamp in its place.
    fn is_whole(&self, pushed: u64) -> bool {
        !self.broken && self.off == 0 && self.next_seq == Some(pushed)
    }
}

impl DrainStats {
    fn new() -> DrainStats {
        DrainStats {
            bytes: 0,
            measured_records: 0,
            records: 0,
            gaps: 0,
            bad: 0,
            hist: Hist::new(),
        }
    }

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
                if rx.off == STAMP && !self.stamp(rx, now) {
                    return;
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

    /// A whole stamp arrived: checks and records it. False if the stream is broken.
    fn stamp(&mut self, rx: &mut Rx, now: u64) -> bool {
        if &rx.hdr[0..8] != MAGIC {
            self.bad += 1;
            rx.broken = true;
            return false;
        }
        let word = |k: usize| u64::from_le_bytes(rx.hdr[k..k + 8].try_into().unwrap());
        let (seq, sent, flags) = (word(8), word(16), word(24));
        if rx.next_seq.is_some_and(|n| n != seq) {
            self.gaps += 1;
            rx.gaps += 1;
        }
        rx.next_seq = Some(seq + 1);
        self.records += 1;
        if flags & FLAG_MEASURED != 0 {
            self.measured_records += 1;
            self.hist.record(now.saturating_sub(sent));
        }
        true
    }
}

/// The clients whose whole stream arrived: every buffer from its first one to the
/// last one pushed, framing intact; how many of those skipped buffers, and how many
/// buffers they skipped in all.
struct Complete {
    clients: u64,
    gap_clients: u64,
    gaps: u64,
}

impl Complete {
    fn of(rxs: &[Rx], pushed: u64) -> Complete {
        let whole: Vec<&Rx> = rxs.iter().filter(|rx| rx.is_whole(pushed)).collect();
        Complete {
            clients: whole.len() as u64,
            gap_clients: whole.iter().filter(|rx| rx.gaps > 0).count() as u64,
            gaps: whole.iter().map(|rx| rx.gaps).sum(),
        }
    }
}

/// The figures of `Complete` for whole streams given as bytes, as the drain would
/// find them (for the self-test: a skipped or torn buffer must be caught).
pub fn check_streams(streams: &[Vec<u8>], size: usize, pushed: u64) -> (u64, u64, u64) {
    let mut stats = DrainStats::new();
    let rxs: Vec<Rx> = streams
        .iter()
        .map(|data| {
            let mut rx = Rx::new(None);
            // In uneven pieces, as reads return them.
            for piece in data.chunks(size / 3 + 1) {
                stats.consume(&mut rx, piece, size, 0);
            }
            rx
        })
        .collect();
    let c = Complete::of(&rxs, pushed);
    (c.clients, c.gap_clients, c.gaps)
}

/// Blocks until the sink process sends `END pushed=N` and closes the control socket
/// (after it closed every client it kept); returns N, the buffers it pushed.
fn wait_end() -> u64 {
    let mut text = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        // SAFETY: reading into our buffer from the control socket (stdin).
        let r = unsafe { libc::read(CONTROL, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        match r {
            r if r > 0 => text.extend_from_slice(&buf[..r as usize]),
            r if r < 0 && Errno::last() == Errno::EINTR => {}
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&text);
    let kv = parse_kv(text.trim().strip_prefix("END").unwrap_or(""));
    kv.get("pushed").and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The drain's end of every client: fds passed by the sink process (UNIX), or
/// connections to its listener (TCP; TLS: with the handshake done).
fn collect_clients(
    kv: &BTreeMap<String, String>,
    n: usize,
) -> Vec<(OwnedFd, Option<ClientConnection>)> {
    let mut fds: Vec<(OwnedFd, Option<ClientConnection>)> = Vec::with_capacity(n);
    match parse_enum(&kv["transport"]) {
        Transport::Unix => {
            while fds.len() < n {
                let got = recv_fds(CONTROL).expect("client fds");
                if got.is_empty() {
                    eprintln!("fanout-bench drain: control socket closed early");
                    std::process::exit(2);
                }
                fds.extend(got.into_iter().map(|fd| (fd, None)));
            }
        }
        Transport::Tcp => {
            let port: u16 = kv["port"].parse().unwrap();
            for _ in 0..n {
                let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the sink");
                fds.push((OwnedFd::from(s), None));
            }
        }
        Transport::Tls => {
            let port: u16 = kv["port"].parse().unwrap();
            let config = client_config_for(std::path::Path::new(&kv["ca"]));
            for _ in 0..n {
                let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the sink");
                let name = "localhost".try_into().unwrap();
                let mut c = ClientConnection::new(config.clone(), name).unwrap();
                while c.is_handshaking() {
                    c.complete_io(&mut s).expect("TLS handshake with the sink");
                }
                while c.wants_write() {
                    c.write_tls(&mut s).expect("TLS handshake with the sink");
                }
                fds.push((OwnedFd::from(s), Some(c)));
            }
        }
    }
    fds
}

/// Decrypts what a TLS client read into `out`. False: a TLS error (the stream is
/// broken from here on).
fn decrypt(conn: &mut ClientConnection, mut data: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    let mut chunk = [0u8; 16384];
    while !data.is_empty() {
        if conn.read_tls(&mut data).is_err() || conn.process_new_packets().is_err() {
            return false;
        }
        // Ok(0) (close_notify) or WouldBlock (no more now) end the plaintext.
        while let Ok(n @ 1..) = conn.reader().read(&mut chunk) {
            out.extend_from_slice(&chunk[..n]);
        }
    }
    true
}

pub fn main(args: &[String]) {
    die_with_parent();
    let kv = parse_kv(&args.join(" "));
    let n: usize = kv["clients"].parse().unwrap();
    let size: usize = kv["size"].parse().unwrap();
    let deadline: f64 = kv["deadline"].parse().unwrap();
    let stalled: usize = kv["stalled"].parse().unwrap();
    watchdog("drain", deadline);
    raise_fd_limit(u64::MAX);

    let counters = SharedCounters::map(
        recv_fds(CONTROL)
            .expect("control socket")
            .pop()
            .expect("shared counters fd"),
    );
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).unwrap();
    let mut rxs: Vec<Rx> = Vec::with_capacity(n);
    // Never read: their sockets fill up, then the sink's writes to them block.
    let mut held: Vec<OwnedFd> = Vec::with_capacity(stalled);
    for (i, (fd, tls)) in collect_clients(&kv, n).into_iter().enumerate() {
        if is_stalled(i, n, stalled) {
            held.push(fd);
            continue;
        }
        set_nonblocking(fd.as_raw_fd());
        epoll
            .add(&fd, EpollEvent::new(EpollFlags::EPOLLIN, rxs.len() as u64))
            .unwrap();
        let mut rx = Rx::new(Some(fd));
        rx.tls = tls;
        rxs.push(rx);
    }
    if stalled > 0 {
        // The sink knows its UNIX clients by their order; TCP ones by our port.
        let ports: Vec<String> = held
            .iter()
            .filter_map(|fd| {
                nix::sys::socket::getsockname::<nix::sys::socket::SockaddrIn>(fd.as_raw_fd()).ok()
            })
            .map(|a| a.port().to_string())
            .collect();
        println!("STALLED {}", ports.join(" "));
    }
    println!("READY");
    std::io::stdout().flush().unwrap();

    let end = Instant::now() + Duration::from_secs_f64(deadline - 2.0);
    let (stats, open, timed_out) = drain(&epoll, &mut rxs, size, &counters, end);
    let u = usage_self();
    let complete = Complete::of(&rxs, wait_end());
    drop(held);
    println!(
        "RESULT d_status={} d_bytes={} d_records={} d_measured_records={} d_gaps={} d_bad={} \
         d_lat_n={} d_p50_ns={} d_p99_ns={} d_max_ns={} d_cpu_s={:.4} d_open_at_end={} \
         d_complete={} d_complete_gap_clients={} d_complete_gaps={}",
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
        u.cpu(),
        open,
        complete.clients,
        complete.gap_clients,
        complete.gaps
    );
    std::io::stdout().flush().unwrap();
}

/// Reads every client until all are closed or `end`. Returns the figures, the
/// clients still open and whether it gave up.
fn drain(
    epoll: &Epoll,
    rxs: &mut [Rx],
    size: usize,
    counters: &SharedCounters,
    end: Instant,
) -> (DrainStats, usize, bool) {
    let mut stats = DrainStats::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut plain = Vec::with_capacity(256 * 1024);
    let mut events = vec![EpollEvent::empty(); 1024];
    let mut open = rxs.len();
    let mut timeout = EpollTimeout::from(100u16);
    while open > 0 {
        if Instant::now() > end {
            return (stats, open, true);
        }
        let k = match epoll.wait(&mut events, timeout) {
            Ok(k) => k,
            Err(Errno::EINTR) => 0,
            Err(e) => panic!("epoll_wait: {e}"),
        };
        for ev in &events[..k] {
            let rx = &mut rxs[ev.data() as usize];
            let Some(fd) = rx.fd.as_ref() else { continue };
            // SAFETY: reading into our buffer from an fd we own.
            let r = unsafe {
                libc::read(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                )
            };
            let decrypted = match (r > 0, rx.tls.as_mut()) {
                (true, Some(conn)) => decrypt(conn, &buf[..r as usize], &mut plain),
                _ => true,
            };
            if r > 0 && decrypted {
                let data = if rx.tls.is_some() {
                    &plain[..]
                } else {
                    &buf[..r as usize]
                };
                stats.consume(rx, data, size, mono_ns());
                counters.get(C_BYTES).store(stats.bytes, Ordering::Release);
            } else if r > 0 {
                // A TLS error: the stream cannot be whole.
                rx.broken = true;
                let fd = rx.fd.take().unwrap();
                let _ = epoll.delete(&fd);
                open -= 1;
            } else if r == 0 || !matches!(Errno::last(), Errno::EAGAIN | Errno::EINTR) {
                let fd = rx.fd.take().unwrap();
                let _ = epoll.delete(&fd);
                open -= 1;
            }
        }
        // The producer is done: tell the sink how many streams are whole (it waits
        // for every client it kept).
        let pushed = counters.get(C_PUSHED).load(Ordering::Acquire);
        if pushed > 0 {
            let whole = rxs.iter().filter(|rx| rx.is_whole(pushed)).count();
            counters
                .get(C_COMPLETE)
                .store(whole as u64, Ordering::Release);
            timeout = EpollTimeout::from(10u16);
        }
    }
    (stats, open, false)
}
