//! What each tier of an origin → edges tree costs (docs/scale-out.md): the CPU of
//! an origin per feed client (an edge, as the origin sees it) and the CPU of an
//! edge per viewer, measured on this machine.
//!
//! The origin is the README's origin pipeline (`... ! gdppay ! rstcpserversink`,
//! with a test source of a chosen bitrate) in a process of its own (this program
//! run again), the edge is the edge program (examples/edge.rs); feed clients and viewers are
//! sockets of this process that read everything they get, so their cost is not
//! counted. CPU is the processes' (and the origin's sink IO threads') run time
//! from /proc/PID/task/*/schedstat over a window, as a percentage of one core;
//! each figure is the median of `--repeat` windows, and the cost per feed client
//! or viewer is the least-squares slope over the counts measured.
//!
//! ```text
//! cargo run --release --example scaleout-cost -- --viewers 0,100,200,400 --feeds 0,1,2,4
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    about = "Measure the CPU an origin spends per edge and an edge per viewer",
    args_override_self = true
)]
struct Args {
    /// Viewer counts the edge is measured with (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "0,100,200,400")]
    viewers: Vec<usize>,
    /// Feed client counts the origin is measured with (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,4")]
    feeds: Vec<usize>,
    /// Length of one measuring window, in seconds.
    #[arg(long, default_value_t = 5.0)]
    window: f64,
    /// Windows per figure; the median is printed.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// The stream's bitrate (vp8enc target-bitrate), in kbit/s.
    #[arg(long, default_value_t = 1000)]
    bitrate: u32,
    /// The edge program (default: `edge` next to this program).
    #[arg(long)]
    edge: Option<PathBuf>,
    /// Internal: be the origin, serving the feed on this port (this program runs
    /// itself so, to measure the origin as a process of its own).
    #[arg(long, hide = true)]
    serve_origin: Option<u16>,
}

/// The README's origin line with a moving zone plate, whose detail keeps the
/// encoder at about the bitrate asked.
fn origin_pipeline(port: u16, bitrate_kbps: u32) -> String {
    format!(
        "videotestsrc is-live=true pattern=zone-plate kt=2 kx2=10 ky2=10 ! \
         video/x-raw,width=640,height=360,framerate=30/1 ! \
         vp8enc deadline=1 keyframe-max-dist=30 target-bitrate={} ! webmmux streamable=true ! \
         gdppay ! rstcpserversink host=127.0.0.1 port={port} sync-method=latest-keyframe",
        u64::from(bitrate_kbps) * 1000
    )
}

/// The origin process: runs the origin pipeline until killed.
fn serve_origin(port: u16, bitrate_kbps: u32) -> Result<(), Box<dyn std::error::Error>> {
    use gst::prelude::*;
    gst::init()?;
    gstrsmultifdsink::plugin_register_static()?;
    let pipeline = gst::parse::launch(&origin_pipeline(port, bitrate_kbps))?;
    pipeline.set_state(gst::State::Playing)?;
    let bus = pipeline.bus().ok_or("no bus")?;
    if let Some(msg) = bus.timed_pop_filtered(None, &[gst::MessageType::Error]) {
        return Err(format!("origin: {msg:?}").into());
    }
    Ok(())
}

/// Kills the child when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Run time of the threads of `pid` (those whose name starts with `only`, if
/// given), from each task's schedstat (nanoseconds on the CPU).
fn cpu_time(pid: u32, only: Option<&str>) -> Duration {
    let mut total = 0u64;
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        if let Some(prefix) = only {
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if !comm.starts_with(prefix) {
                continue;
            }
        }
        if let Some(ns) = std::fs::read_to_string(dir.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        {
            total += ns;
        }
    }
    Duration::from_nanos(total)
}

/// Sockets that read whatever comes, on one thread, counting bytes; a socket
/// counts as playing once it got `playing_after` bytes.
struct Readers {
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    playing: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    count: usize,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Readers {
    fn new(conns: Vec<TcpStream>, playing_after: u64) -> Readers {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = Arc::new(AtomicU64::new(0));
        let playing = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let count = conns.len();
        let (s, b, p, c) = (stop.clone(), bytes.clone(), playing.clone(), closed.clone());
        let thread = std::thread::spawn(move || {
            let mut got = vec![0u64; conns.len()];
            let mut open = vec![true; conns.len()];
            let mut buf = vec![0u8; 256 * 1024];
            for conn in &conns {
                conn.set_nonblocking(true).unwrap();
            }
            while !s.load(Ordering::SeqCst) {
                let live: Vec<usize> = (0..conns.len()).filter(|&i| open[i]).collect();
                if live.is_empty() {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                let mut fds: Vec<PollFd> = live
                    .iter()
                    .map(|&i| PollFd::new(conns[i].as_fd(), PollFlags::POLLIN))
                    .collect();
                if poll(&mut fds, PollTimeout::from(100u16)).is_err() {
                    continue;
                }
                let ready: Vec<usize> = live
                    .iter()
                    .zip(&fds)
                    .filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty()))
                    .map(|(&i, _)| i)
                    .collect();
                for i in ready {
                    match (&conns[i]).read(&mut buf) {
                        Ok(0) => {
                            open[i] = false;
                            c.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(n) => {
                            b.fetch_add(n as u64, Ordering::Relaxed);
                            let before = got[i];
                            got[i] += n as u64;
                            if before < playing_after && got[i] >= playing_after {
                                p.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => {
                            open[i] = false;
                            c.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            }
        });
        Readers {
            stop,
            bytes,
            playing,
            closed,
            count,
            thread: Some(thread),
        }
    }

    /// Waits until every socket is playing; an error if one closes or `within` passes.
    fn wait_playing(&self, within: Duration) -> Result<(), String> {
        let start = Instant::now();
        while self.playing.load(Ordering::SeqCst) < self.count {
            if self.closed.load(Ordering::SeqCst) > 0 {
                return Err(format!(
                    "{} of {} connections closed",
                    self.closed.load(Ordering::SeqCst),
                    self.count
                ));
            }
            if start.elapsed() > within {
                return Err(format!(
                    "{} of {} connections playing after {within:?}",
                    self.playing.load(Ordering::SeqCst),
                    self.count
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One window's figures.
struct Sample {
    /// Percent of one core: the whole process.
    process: f64,
    /// Percent of one core: the threads measured apart (the origin's sink IO threads).
    part: f64,
    /// Bytes per second the readers got, per reader.
    rate_per_reader: f64,
}

fn measure(pid: u32, part: Option<&str>, readers: &Readers, window: Duration) -> Sample {
    let (p0, q0, b0, t0) = (
        cpu_time(pid, None),
        part.map(|p| cpu_time(pid, Some(p))),
        readers.bytes.load(Ordering::SeqCst),
        Instant::now(),
    );
    std::thread::sleep(window);
    let (p1, q1, b1, t1) = (
        cpu_time(pid, None),
        part.map(|p| cpu_time(pid, Some(p))),
        readers.bytes.load(Ordering::SeqCst),
        t0.elapsed(),
    );
    let percent = |d: Duration| 100.0 * d.as_secs_f64() / t1.as_secs_f64();
    Sample {
        process: percent(p1.saturating_sub(p0)),
        part: match (q0, q1) {
            (Some(a), Some(b)) => percent(b.saturating_sub(a)),
            _ => 0.0,
        },
        rate_per_reader: if readers.count == 0 {
            0.0
        } else {
            (b1 - b0) as f64 / t1.as_secs_f64() / readers.count as f64
        },
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Least-squares slope of y over x.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den == 0.0 { 0.0 } else { num / den }
}

/// A port nobody listens on now (bound, then released).
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn connect_within(addr: SocketAddr, within: Duration) -> Result<TcpStream, String> {
    let start = Instant::now();
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() > within => return Err(format!("{addr}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// `(median process %, median part %, median bytes/s per reader)` of `repeat` windows.
fn medians(pid: u32, part: Option<&str>, readers: &Readers, args: &Args) -> (f64, f64, f64) {
    let samples: Vec<Sample> = (0..args.repeat.max(1))
        .map(|_| measure(pid, part, readers, Duration::from_secs_f64(args.window)))
        .collect();
    (
        median(samples.iter().map(|s| s.process).collect()),
        median(samples.iter().map(|s| s.part).collect()),
        median(samples.iter().map(|s| s.rate_per_reader).collect()),
    )
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("scaleout-cost: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(port) = args.serve_origin {
        return serve_origin(port, args.bitrate);
    }
    let exe = std::env::current_exe()?;
    let examples = exe.parent().ok_or("no folder")?;
    let edge_program = args.edge.clone().unwrap_or_else(|| examples.join("edge"));
    if !edge_program.exists() {
        return Err(format!(
            "{}: no edge program (cargo build --release --example edge)",
            edge_program.display()
        )
        .into());
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "scaleout-cost: {cores} cores, load average {} at the start; stream {} kbit/s; \
         windows of {} s, median of {}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        args.bitrate,
        args.window,
        args.repeat
    );

    // The origin: this program again, as a process of its own.
    let origin_port = free_port()?;
    let origin = Guard(
        Command::new(&exe)
            .arg("--serve-origin")
            .arg(origin_port.to_string())
            .arg("--bitrate")
            .arg(args.bitrate.to_string())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", exe.display()))?,
    );
    let origin_addr: SocketAddr = ([127, 0, 0, 1], origin_port).into();
    drop(connect_within(origin_addr, Duration::from_secs(10))?);

    // The origin with 0, 1, 2, 4 feed clients (raw readers, as edges are to it).
    let mut origin_points = Vec::new();
    for &n in &args.feeds {
        let conns = (0..n)
            .map(|_| connect_within(origin_addr, Duration::from_secs(5)))
            .collect::<Result<Vec<_>, _>>()?;
        let readers = Readers::new(conns, 4096);
        readers.wait_playing(Duration::from_secs(10))?;
        let (process, io, rate) = medians(origin.0.id(), Some("rsmultifdsink-i"), &readers, &args);
        println!(
            "origin: {n} feed clients: process {process:.2} % of a core, sink IO threads {io:.3} %, \
             {:.0} kbit/s each",
            rate * 8.0 / 1000.0
        );
        origin_points.push((n as f64, process, io));
    }

    // The edge program, fed by the origin, with each number of viewers.
    let mut edge = Command::new(&edge_program)
        .args(["--origin-host", "127.0.0.1", "--origin-port"])
        .arg(origin_port.to_string())
        .args(["--host", "127.0.0.1", "--port", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", edge_program.display()))?;
    let mut lines = BufReader::new(edge.stdout.take().ok_or("no stdout")?).lines();
    let edge = Guard(edge);
    let mut edge_port = None;
    for line in lines.by_ref() {
        let line = line?;
        if let Some(addr) = line.strip_prefix("edge: listening on ") {
            edge_port = addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
        }
        if line.starts_with("edge: feed up") {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    let edge_addr: SocketAddr = ([127, 0, 0, 1], edge_port.ok_or("the edge said no port")?).into();
    let mut edge_points = Vec::new();
    let mut viewer_rate = 0.0;
    for &n in &args.viewers {
        let conns = (0..n)
            .map(|i| {
                let mut c = connect_within(edge_addr, Duration::from_secs(5))?;
                write!(
                    c,
                    "GET / HTTP/1.1\r\nHost: edge\r\nUser-Agent: viewer-{i}\r\n\r\n"
                )
                .map_err(|e| e.to_string())?;
                Ok(c)
            })
            .collect::<Result<Vec<_>, String>>()?;
        // Playing: past the response head and the streamheader.
        let readers = Readers::new(conns, 4096);
        readers.wait_playing(Duration::from_secs(20))?;
        let (process, _, rate) = medians(edge.0.id(), None, &readers, &args);
        println!(
            "edge: {n} viewers: process {process:.2} % of a core, {:.0} kbit/s each",
            rate * 8.0 / 1000.0
        );
        if readers.closed.load(Ordering::SeqCst) > 0 {
            return Err(format!(
                "{} viewers were closed while measured",
                readers.closed.load(Ordering::SeqCst)
            )
            .into());
        }
        if n > 0 {
            viewer_rate = rate;
        }
        edge_points.push((n as f64, process));
    }

    let per_feed_process = slope(
        &origin_points
            .iter()
            .map(|&(x, p, _)| (x, p))
            .collect::<Vec<_>>(),
    );
    let per_feed_io = slope(
        &origin_points
            .iter()
            .map(|&(x, _, io)| (x, io))
            .collect::<Vec<_>>(),
    );
    let per_viewer = slope(&edge_points);
    println!(
        "per feed client at the origin: {per_feed_process:.3} % of a core (process), \
         {per_feed_io:.4} % (sink IO threads)"
    );
    println!(
        "per viewer at an edge: {per_viewer:.4} % of a core at {:.0} kbit/s; \
         {:.0} viewers per core",
        viewer_rate * 8.0 / 1000.0,
        if per_viewer > 0.0 {
            100.0 / per_viewer
        } else {
            f64::INFINITY
        }
    );
    Ok(())
}
