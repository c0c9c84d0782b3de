// SPDX-License-Identifier: MPL-2.0

//! The sink process (`__sink`): makes the clients, starts the drain process, runs the
//! element (or the raw floor) with one producer thread and reports what it measured.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::{ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::libc;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

use crate::element::ElementRun;
use crate::hist::Hist;
use crate::os::{
    C_BYTES, C_COMPLETE, C_PUSHED, FDS_PER_MSG, SharedCounters, Usage, die_with_parent, send_fds,
    usage_self, watchdog,
};
use crate::raw::run_raw;
use crate::spec::{Elem, Spec, Transport, is_stalled, parse_kv};
use crate::system::{proc_status_kib, raise_fd_limit};
use crate::test_pki::TestPki;
use gstrsmultifdsink::tls::Terminator;

/// What the sink process measured.
pub struct Measured {
    pub usage: Usage,
    pub window_s: f64,
    pub flush_s: f64,
    pub pushed: u64,
    pub measured_pushed: u64,
    pub kicked: usize,
    pub lost: usize,
    pub removed: Removed,
    pub peak_rss_kb: u64,
    pub flushed: bool,
    /// Time the producer spent in each measured push (element) or fan-out (raw).
    pub push_p99_ns: u64,
    pub push_max_ns: u64,
}

/// Clients the sink removed during the run (for any reason), by whether they were
/// stalled.
#[derive(Debug, Clone, Copy, Default)]
pub struct Removed {
    pub stalled: usize,
    pub others: usize,
}

/// The measured window, from the first measured push: CPU, wall time and the time
/// each measured push took.
pub struct Meter {
    u0: Option<Usage>,
    t0: Instant,
    push: Hist,
    window_s: f64,
    flush_start: Instant,
}

impl Meter {
    pub fn new() -> Meter {
        Meter {
            u0: None,
            t0: Instant::now(),
            push: Hist::new(),
            window_s: 0.0,
            flush_start: Instant::now(),
        }
    }

    /// Called before each push: the window opens at the first measured one.
    pub fn before_push(&mut self, measured: bool) {
        if measured && self.u0.is_none() {
            self.u0 = Some(usage_self());
            self.t0 = Instant::now();
        }
    }

    pub fn pushed(&mut self, measured: bool, started: Instant) {
        if measured {
            self.push.record(started.elapsed().as_nanos() as u64);
        }
    }

    /// The producer is done: the window closes, the wait for the drain begins.
    pub fn end_window(&mut self) {
        self.window_s = self.t0.elapsed().as_secs_f64();
        self.u0.get_or_insert_with(usage_self);
        self.flush_start = Instant::now();
    }

    /// Everything arrived (or stalled): the figures of the run.
    pub fn finish(
        self,
        p: &Producer,
        kicked: usize,
        lost: usize,
        removed: Removed,
        flushed: bool,
    ) -> Measured {
        Measured {
            usage: usage_self().since(self.u0.unwrap_or_default()),
            window_s: self.window_s,
            flush_s: self.flush_start.elapsed().as_secs_f64(),
            pushed: p.seq,
            measured_pushed: p.measured_pushed,
            kicked,
            lost,
            removed,
            peak_rss_kb: proc_status_kib("VmHWM:"),
            flushed,
            push_p99_ns: self.push.quantile(0.99),
            push_max_ns: self.push.max,
        }
    }
}

/// The producer's schedule and window, shared by the element and raw runs.
pub struct Producer {
    start: Instant,
    warm_end: Instant,
    end: Instant,
    interval: Option<f64>,
    pub seq: u64,
    pub measured_pushed: u64,
    /// Bytes that should reach the drain, summed at each push over the live clients
    /// that read (stalled ones never do).
    expected: u64,
    window_per_client: u64,
}

pub enum Next {
    Push {
        measured: bool,
    },
    /// Wait this long (or for events) and ask again.
    Wait(Duration),
    Done,
}

impl Producer {
    pub fn new(spec: &Spec) -> Producer {
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

    pub fn next(&self, counters: &SharedCounters, alive: usize) -> Next {
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

    pub fn pushed(&mut self, measured: bool, size: usize, alive: usize) {
        self.seq += 1;
        if measured {
            self.measured_pushed += 1;
        }
        self.expected += (size * alive) as u64;
    }
}

/// How long the drain may receive nothing before the wait for the last buffers gives
/// up, for a sink that sends at once.
const QUIET: Duration = Duration::from_millis(750);

/// Waits until every live client that reads has received the last of the `pushed`
/// buffers (streams arrive in order, so it has every measured buffer the sink sent
/// it), or nothing moved for a while. Returns whether everything arrived.
pub fn wait_flushed(
    counters: &SharedCounters,
    pushed: u64,
    readers: impl Fn() -> u64,
    step: impl FnMut(),
) -> bool {
    wait_flushed_holding(counters, pushed, readers, step, Duration::ZERO)
}

/// `wait_flushed` for a sink that may hold data back for up to `hold` (rs's write
/// batching): the last buffers may arrive that much later.
pub fn wait_flushed_holding(
    counters: &SharedCounters,
    pushed: u64,
    readers: impl Fn() -> u64,
    mut step: impl FnMut(),
    hold: Duration,
) -> bool {
    counters.get(C_PUSHED).store(pushed, Ordering::Release);
    let quiet = QUIET + 2 * hold;
    let limit = Instant::now() + Duration::from_secs(15) + quiet;
    let mut last = counters.get(C_BYTES).load(Ordering::Acquire);
    let mut last_change = Instant::now();
    loop {
        if counters.get(C_COMPLETE).load(Ordering::Acquire) >= readers() {
            return true;
        }
        let now = Instant::now();
        let bytes = counters.get(C_BYTES).load(Ordering::Acquire);
        if bytes != last {
            last = bytes;
            last_change = now;
        }
        if now > limit || now - last_change > quiet {
            return false;
        }
        step();
    }
}

/// The drain process and the sink's end of its control socket.
struct Drain {
    child: std::process::Child,
    out: BufReader<ChildStdout>,
    ctl: OwnedFd,
}

impl Drain {
    /// `ca`: the CA file TLS clients trust (TLS only).
    fn spawn(
        spec: &Spec,
        port: u16,
        ca: Option<&std::path::Path>,
        counters: &SharedCounters,
    ) -> Drain {
        let (ctl, ctl_drain) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .expect("control socketpair");
        // Every fd of this process is CLOEXEC: the drain inherits only the control socket.
        let mut child = Command::new(std::env::current_exe().expect("current exe"))
            .arg("__drain")
            .arg(format!("transport={}", spec.transport.name()))
            .arg(format!("clients={}", spec.clients))
            .arg(format!("size={}", spec.size))
            .arg(format!("port={port}"))
            .arg(format!("deadline={}", spec.deadline + 5.0))
            .arg(format!("stalled={}", spec.stalled))
            .args(ca.map(|ca| format!("ca={}", ca.display())))
            .stdin(Stdio::from(ctl_drain))
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn drain");
        let out = BufReader::new(child.stdout.take().unwrap());
        send_fds(ctl.as_raw_fd(), &[counters.fd.as_raw_fd()]).expect("send counters fd");
        Drain { child, out, ctl }
    }

    /// UNIX: makes the socketpairs, keeps one end of each and passes the other.
    fn pass_socketpairs(&self, n: usize) -> Vec<OwnedFd> {
        let mut ours = Vec::with_capacity(n);
        let mut batch: Vec<OwnedFd> = Vec::with_capacity(FDS_PER_MSG);
        for i in 0..n {
            let (a, b) = socketpair(
                AddressFamily::Unix,
                SockType::Stream,
                None,
                SockFlag::SOCK_CLOEXEC,
            )
            .expect("socketpair (fd limit?)");
            ours.push(a);
            batch.push(b);
            if batch.len() == FDS_PER_MSG || i + 1 == n {
                let raw: Vec<RawFd> = batch.iter().map(|f| f.as_raw_fd()).collect();
                send_fds(self.ctl.as_raw_fd(), &raw).expect("send client fds");
                batch.clear(); // in flight, so ours can be closed
            }
        }
        ours
    }

    /// Waits for the drain's READY; returns the ports of its stalled TCP clients.
    fn wait_ready(&mut self) -> Vec<u16> {
        let mut line = String::new();
        let mut stalled_ports = Vec::new();
        loop {
            line.clear();
            if self.out.read_line(&mut line).unwrap_or(0) == 0 {
                eprintln!("fanout-bench sink: the drain ended before it was ready");
                println!("RESULT status=drain-failed");
                std::process::exit(2);
            }
            if let Some(ports) = line.trim().strip_prefix("STALLED") {
                stalled_ports = ports
                    .split_whitespace()
                    .map(|p| p.parse().unwrap())
                    .collect();
            }
            if line.trim() == "READY" {
                return stalled_ports;
            }
        }
    }

    /// The drain's figures, once every client fd is closed (it sees EOF everywhere):
    /// tells it how many buffers were pushed, which also ends the stalled clients.
    fn result(self, pushed: u64) -> BTreeMap<String, String> {
        let Drain {
            mut child,
            mut out,
            ctl,
        } = self;
        let mut ctl = std::fs::File::from(ctl);
        let _ = writeln!(ctl, "END pushed={pushed}");
        drop(ctl);
        let mut line = String::new();
        let mut result = BTreeMap::new();
        loop {
            line.clear();
            if out.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            if let Some(rest) = line.strip_prefix("RESULT ") {
                result = parse_kv(rest);
                break;
            }
        }
        let _ = child.wait();
        result
    }
}

/// TCP: listens on 127.0.0.1 with a long accept queue.
fn listen() -> TcpListener {
    let l = TcpListener::bind(("127.0.0.1", 0)).expect("bind 127.0.0.1");
    // A longer accept queue than std's default, so no SYN waits for a retry.
    // SAFETY: listen() again on our listening socket only resizes the queue.
    unsafe { libc::listen(l.as_raw_fd(), 4096) };
    l
}

/// TCP: accepts on a thread of its own while the element is set up and the drain
/// connects; each connection with the drain's port. TLS: each one wrapped at once
/// (the drain's handshake needs the terminator's answers), the client being the
/// plaintext end.
fn accept_all(
    l: &TcpListener,
    n: usize,
    tls: Option<Arc<Terminator>>,
) -> JoinHandle<Vec<(OwnedFd, u16)>> {
    let l = l.try_clone().expect("listener clone");
    std::thread::spawn(move || {
        (0..n)
            .map(|_| {
                let (s, peer) = l.accept().expect("accept");
                let fd = match &tls {
                    None => OwnedFd::from(s),
                    Some(t) => OwnedFd::from(
                        t.wrap(s, Vec::new(), Instant::now() + Duration::from_secs(60))
                            .expect("TLS wrap"),
                    ),
                };
                (fd, peer.port())
            })
            .collect()
    })
}

pub fn main(args: &[String]) {
    die_with_parent();
    let spec = Spec::from_args(args);
    watchdog("sink", spec.deadline);
    raise_fd_limit(u64::MAX);

    let counters = Arc::new(SharedCounters::create());
    let listener = matches!(spec.transport, Transport::Tcp | Transport::Tls).then(listen);
    let port = listener
        .as_ref()
        .map_or(0, |l| l.local_addr().unwrap().port());
    // TLS: a test CA and server certificate, and the terminator (its thread is part
    // of this process's CPU time).
    let tls = (spec.transport == Transport::Tls).then(|| {
        let pki = TestPki::new();
        let term = Terminator::new(pki.server_config(), Arc::new(|_, _| {})).expect("TLS thread");
        (pki, Arc::new(term))
    });
    let mut drain = Drain::spawn(
        &spec,
        port,
        tls.as_ref().map(|(p, _)| p.ca.as_path()),
        &counters,
    );
    let acceptor = listener
        .as_ref()
        .map(|l| accept_all(l, spec.clients, tls.as_ref().map(|(_, t)| t.clone())));
    let element = match spec.elem {
        Elem::Raw | Elem::RawUring => None,
        e => Some(ElementRun::new(&spec, e)),
    };
    let base_rss_kb = proc_status_kib("VmRSS:");
    let setup_start = Instant::now();

    // The clients: our ends stay here, the other ends go to the drain. UNIX clients
    // are in the drain's order; TCP ones are known by the drain's port.
    let (ours, stalled): (Vec<OwnedFd>, Vec<bool>) = match acceptor {
        None => {
            let ours = drain.pass_socketpairs(spec.clients);
            drain.wait_ready();
            let stalled = (0..ours.len())
                .map(|i| is_stalled(i, spec.clients, spec.stalled))
                .collect();
            (ours, stalled)
        }
        Some(a) => {
            let accepted = a.join().expect("accept thread");
            let ports = drain.wait_ready();
            accepted
                .into_iter()
                .map(|(fd, port)| (fd, ports.contains(&port)))
                .unzip()
        }
    };
    let setup_s = setup_start.elapsed().as_secs_f64();

    let m = match element {
        Some(e) => e.run(&spec, ours, &stalled, &counters),
        None => run_raw(&spec, ours, &stalled, &counters),
    };
    // Every client fd is closed now: the drain sees EOF everywhere and reports.
    drop(listener);
    // TLS: the terminator sends each stream's end (close_notify) as the element
    // closes its ends; it stays until the drain has seen them all.
    let drain_result = drain.result(m.pushed);
    drop(tls);
    let mut out = format!(
        "RESULT status=ok elem={} cpu_user_s={:.4} cpu_sys_s={:.4} nvcsw={} nivcsw={} window_s={:.4} \
         flush_s={:.4} flushed={} pushed={} measured_pushed={} kicked={} lost={} \
         stalled_removed={} others_removed={} base_rss_kb={} peak_rss_kb={} setup_s={:.3} \
         push_p99_ns={} push_max_ns={}",
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
        m.removed.stalled,
        m.removed.others,
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
