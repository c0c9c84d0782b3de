//! Hosts made of network namespaces on one bridge (tests/common/netns.rs), issue
//! 12's multi-host tests; skipped, with a message, where namespaces cannot be made.
//!
//! - An origin, two edges and a viewers' host: twenty in-process viewers whose
//!   sockets belong to the viewers' host, and curl, play the origin's stream
//!   through the edge programs, and the origin serves exactly one feed connection
//!   per edge.
//! - The whole tree: origin, two edges (PROXY protocol, access logs, health port),
//!   HAProxy on a balancer host running deploy/haproxy.cfg, a thousand viewers;
//!   an edge stopped and the origin restarted.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;

use common::netns::{Host, Net};
use common::process::{KillOnDrop, assert_plugin_and_edge_built, target_dir};

/// The edge program on `host`, fed from `origin`; returns once its feed is up.
fn start_edge(host: &Host, origin: &Host) -> KillOnDrop {
    start_edge_with(host, origin, &[])
}

/// As [`start_edge`], with more of the edge program's options.
fn start_edge_with(host: &Host, origin: &Host, extra: &[String]) -> KillOnDrop {
    let mut edge = host
        .command(target_dir().join("examples/edge").to_str().unwrap())
        .args(["--origin-host", &origin.addr.to_string()])
        .args([
            "--origin-port",
            "4953",
            "--host",
            "0.0.0.0",
            "--port",
            "8080",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = edge.stdout.take().unwrap();
    let edge = KillOnDrop(edge);
    // The edge retries until the origin listens.
    let mut lines = BufReader::new(out).lines();
    let start = Instant::now();
    let mut seen = Vec::new();
    loop {
        let line = lines.next().expect("the edge ended").unwrap();
        seen.push(line.clone());
        if line.starts_with("edge: feed up") {
            break;
        }
        assert!(
            start.elapsed() < *common::DEADLINE,
            "{}: no feed: {seen:#?}",
            host.name
        );
    }
    // Its later lines are not read: a thread drains them so it never blocks.
    std::thread::spawn(move || lines.for_each(drop));
    edge
}

/// Established TCP connections on the host whose local port is `port` (`ss`).
fn established_on(host: &Host, port: u16) -> usize {
    let out = host
        .command("ss")
        .args(["-Htn", "state", "established"])
        .arg(format!("( sport = :{port} )"))
        .output()
        .unwrap();
    assert!(out.status.success(), "ss: {out:?}");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn viewers_on_their_own_host_play_the_origin_through_two_edges() {
    common::init();
    assert_plugin_and_edge_built();
    let Some(net) = Net::new(&["origin", "edge1", "edge2", "viewers"]) else {
        return;
    };
    let origin_host = net.host("origin");
    let viewers = net.host("viewers");

    let _origin = start_origin(
        origin_host,
        "videotestsrc is-live=true ! video/x-raw,width=320,height=240,framerate=30/1 ! \
         vp8enc deadline=1 keyframe-max-dist=30 ! webmmux streamable=true ! gdppay ! \
         rstcpserversink host=0.0.0.0 port=4953 sync-method=latest-keyframe",
    );
    let edges = [net.host("edge1"), net.host("edge2")];
    let _edges: Vec<KillOnDrop> = edges.iter().map(|e| start_edge(e, origin_host)).collect();

    net.assert_no_route_out();

    // Ten viewers per edge, made in-process (sockets opened in the viewers'
    // namespace), all play from a keyframe.
    let targets: Vec<std::net::SocketAddr> = edges
        .iter()
        .flat_map(|e| std::iter::repeat_n((e.addr, 8080).into(), 10))
        .collect();
    let conns = viewers.run_in(move || {
        targets
            .iter()
            .map(|a| std::net::TcpStream::connect(a).unwrap())
            .collect::<Vec<_>>()
    });
    for conn in &conns {
        assert_eq!(conn.local_addr().unwrap().ip(), viewers.addr);
    }
    let fetches: Vec<_> = conns
        .into_iter()
        .map(|conn| std::thread::spawn(move || fetch_on(conn, 30_000)))
        .collect();
    // However many viewers, the origin serves one feed connection per edge.
    assert_eq!(established_on(origin_host, 4953), 2);
    for fetch in fetches {
        let (head, body) = fetch.join().unwrap();
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
        common::decode_from_start(&body, "matroskademux", "vp8dec")
            .assert_starts_on_keyframe("an in-process viewer");
    }

    // And curl, a real client, on the viewers' host.
    let capture = std::env::temp_dir().join(format!("rsmfd-netns-{}.webm", std::process::id()));
    let status = viewers
        .command("curl")
        .args(["-s", "--max-time", "3", "-o"])
        .arg(&capture)
        .arg(format!("http://{}:8080/", edges[1].addr))
        .status()
        .unwrap();
    // 28: the time limit ended the (endless) stream, as it should.
    assert_eq!(status.code(), Some(28), "curl: {status}");
    let body = std::fs::read(&capture).unwrap();
    let _ = std::fs::remove_file(&capture);
    assert!(body.len() > 20_000, "{} bytes in 3 s", body.len());
    common::decode_from_start(&body, "matroskademux", "vp8dec").assert_starts_on_keyframe("curl");
}

/// GET / on an open connection: the response head and at least `want` bytes of body.
fn fetch_on(conn: std::net::TcpStream, want: usize) -> (String, Vec<u8>) {
    common::http_get_on(conn, "edge", "/", want, *common::DEADLINE, || {})
}

// ---------------------------------------------------------------------------
// Issue 12, point 4: the whole tree, with HAProxy in front.
// ---------------------------------------------------------------------------

const HAPROXY_CFG: &str = include_str!("../deploy/haproxy.cfg");
/// The edges' addresses on deploy/haproxy.cfg's `server` lines, replaced here.
const CFG_EDGES: [&str; 2] = ["10.0.0.11", "10.0.0.12"];
/// Where the edge program answers health checks (deploy/haproxy.cfg's `check port`).
const HEALTH_PORT: &str = "8081";
/// A small WebM stream (about 100 kbit/s, a keyframe a second), so that a
/// thousand viewers cost the shared test machine little.
const SMALL_ORIGIN: &str = "videotestsrc is-live=true ! video/x-raw,width=160,height=120,framerate=15/1 ! \
     vp8enc deadline=1 keyframe-max-dist=15 target-bitrate=100000 ! webmmux streamable=true ! \
     gdppay ! rstcpserversink host=0.0.0.0 port=4953 sync-method=latest-keyframe";
/// The start of a Matroska Cluster: a viewer's first media bytes after the header.
const CLUSTER_ID: [u8; 4] = [0x1f, 0x43, 0xb6, 0x75];
/// The start of an EBML (Matroska/WebM) header.
const EBML_ID: [u8; 4] = [0x1a, 0x45, 0xdf, 0xa3];

/// Files removed when dropped, also when the test fails.
struct TempFiles(Vec<PathBuf>);

impl Drop for TempFiles {
    fn drop(&mut self) {
        for f in &self.0 {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// `gst-launch-1.0 -q {description}` on `host`, with the plugin built here; its
/// output is discarded.
fn start_origin(host: &Host, description: &str) -> KillOnDrop {
    KillOnDrop(
        host.command("gst-launch-1.0")
            .arg("-q")
            .args(description.split_whitespace())
            .env("GST_PLUGIN_PATH", target_dir())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// HAProxy's stdout and stderr (its log and its warnings), line by line.
#[derive(Clone, Default)]
struct Output(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Output {
    fn collect(&self, from: impl std::io::Read + Send + 'static) {
        let lines = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(from).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        });
    }

    /// Waits (up to `within`) for a line containing every one of `words`.
    fn wait_for(&self, words: &[&str], within: std::time::Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(line) = self
                .0
                .lock()
                .unwrap()
                .iter()
                .find(|l| words.iter().all(|w| l.contains(w)))
            {
                return line.clone();
            }
            assert!(
                start.elapsed() < within,
                "no line with {words:?} within {within:?}: {:#?}",
                self.0.lock().unwrap()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// A viewer's connection and what it got: the response head and the body's
/// first bytes.
struct Viewer {
    /// Open while the viewer is kept.
    _conn: std::net::TcpStream,
    head: String,
    body: Vec<u8>,
}

/// Sends `GET /` on every connection and reads them all at once (one poll loop)
/// until each has its response head and `want[i]` bytes of body; the connections
/// stay open. Panics past `within` (naming how far the late ones got) or when one
/// is closed.
fn watch(
    conns: Vec<std::net::TcpStream>,
    want: &[usize],
    within: std::time::Duration,
) -> Vec<Viewer> {
    try_watch(conns, want, within).unwrap_or_else(|e| panic!("{e}"))
}

/// [`watch`], saying what went wrong instead of panicking.
fn try_watch(
    conns: Vec<std::net::TcpStream>,
    want: &[usize],
    within: std::time::Duration,
) -> Result<Vec<Viewer>, String> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::io::{ErrorKind, Read, Write};
    use std::os::fd::AsFd;
    let mut data: Vec<Vec<u8>> = vec![Vec::new(); conns.len()];
    let mut done: Vec<Option<usize>> = vec![None; conns.len()];
    for (i, mut conn) in conns.iter().enumerate() {
        write!(
            conn,
            "GET / HTTP/1.1\r\nHost: balancer\r\nUser-Agent: viewer-{i}\r\n\r\n"
        )
        .map_err(|e| format!("viewer {i}: {e}"))?;
        conn.set_nonblocking(true).unwrap();
    }
    let start = Instant::now();
    let mut buf = vec![0u8; 65536];
    loop {
        let pending: Vec<usize> = (0..conns.len()).filter(|&i| done[i].is_none()).collect();
        if pending.is_empty() {
            break;
        }
        if start.elapsed() >= within {
            return Err(format!(
                "{} of {} viewers incomplete after {within:?}, e.g. {:?}",
                pending.len(),
                conns.len(),
                pending
                    .iter()
                    .take(5)
                    .map(|&i| (i, data[i].len()))
                    .collect::<Vec<_>>()
            ));
        }
        let mut fds: Vec<PollFd> = pending
            .iter()
            .map(|&i| PollFd::new(conns[i].as_fd(), PollFlags::POLLIN))
            .collect();
        poll(&mut fds, PollTimeout::from(100u16)).unwrap();
        let ready: Vec<usize> = pending
            .iter()
            .zip(&fds)
            .filter(|(_, fd)| fd.revents().is_some_and(|r| !r.is_empty()))
            .map(|(&i, _)| i)
            .collect();
        for i in ready {
            match (&conns[i]).read(&mut buf) {
                Ok(0) => {
                    return Err(format!(
                        "viewer {i}: closed after {} bytes: {:?}",
                        data[i].len(),
                        String::from_utf8_lossy(&data[i][..data[i].len().min(200)])
                    ));
                }
                Ok(n) => data[i].extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("viewer {i}: {e}")),
            }
            if let Some(end) = data[i].windows(4).position(|w| w == b"\r\n\r\n")
                && data[i].len() >= end + 4 + want[i]
            {
                done[i] = Some(end + 4);
            }
        }
    }
    Ok(conns
        .into_iter()
        .zip(data)
        .zip(done)
        .map(|((conn, data), end)| {
            let end = end.unwrap();
            Viewer {
                _conn: conn,
                head: String::from_utf8_lossy(&data[..end]).into_owned(),
                body: data[end..].to_vec(),
            }
        })
        .collect())
}

/// `n` connections from the viewers' host to `to`.
fn connect_viewers(viewers: &Host, to: std::net::SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    viewers.run_in(move || {
        (0..n)
            .map(|_| std::net::TcpStream::connect(to).unwrap())
            .collect()
    })
}

/// The streamheader a viewer got: everything before its first Cluster.
fn header_of(body: &[u8]) -> &[u8] {
    assert_eq!(body[..4], EBML_ID, "not WebM from its first byte");
    let at = body
        .windows(4)
        .position(|w| w == CLUSTER_ID)
        .expect("no Cluster in the first bytes");
    &body[..at]
}

/// Every viewer got `200 OK`, then the streamheader `header`, then a Cluster.
fn assert_start_with_header(viewers: &[Viewer], header: &[u8]) {
    for (i, v) in viewers.iter().enumerate() {
        assert!(
            v.head.starts_with("HTTP/1.0 200 OK\r\n"),
            "viewer {i}: {}",
            v.head
        );
        assert!(
            v.body.starts_with(header) && v.body[header.len()..].starts_with(&CLUSTER_ID),
            "viewer {i}: its first bytes are not the streamheader and a Cluster"
        );
    }
}

/// Lines of an access log (empty while it does not exist).
fn log_lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// An origin, two edges (proxy-protocol=true, access logs, health port) behind
/// HAProxy running deploy/haproxy.cfg on a balancer host, and a viewers' host:
/// a thousand viewers through the balancer, spread over both edges, each gets the
/// streamheader and a keyframe first (a sample decoded in full), the origin serves
/// two feed connections, the access logs name the viewers' host; an edge stopped
/// is taken out by the health check and new viewers go to the other; an origin
/// restart takes the edge out (503) and new viewers play within 5 s of its return.
#[test]
fn a_thousand_viewers_through_haproxy_and_two_edges() {
    common::init();
    let haproxy = std::env::var("HAPROXY").unwrap_or_else(|_| "/usr/sbin/haproxy".into());
    assert!(
        std::path::Path::new(&haproxy).exists(),
        "{haproxy} not found: this test needs HAProxy (apt-get install haproxy, as \
         scripts/setup-debian does), or set HAPROXY to its path"
    );
    assert_plugin_and_edge_built();
    let Some(net) = Net::new(&["origin", "edge1", "edge2", "balancer", "viewers"]) else {
        return;
    };
    let (origin_host, balancer, viewers) = (
        net.host("origin"),
        net.host("balancer"),
        net.host("viewers"),
    );
    let edges = [net.host("edge1"), net.host("edge2")];
    let front: std::net::SocketAddr = (balancer.addr, 80).into();
    let logs: Vec<PathBuf> = edges
        .iter()
        .map(|e| {
            std::env::temp_dir().join(format!(
                "rsmfd-netns-{}-{}.access.log",
                std::process::id(),
                e.name
            ))
        })
        .collect();
    let cfg_path =
        std::env::temp_dir().join(format!("rsmfd-netns-{}-haproxy.cfg", std::process::id()));
    let _temp_files = TempFiles(logs.iter().cloned().chain([cfg_path.clone()]).collect());
    for log in &logs {
        let _ = std::fs::remove_file(log);
    }

    let mut origin = start_origin(origin_host, SMALL_ORIGIN);
    let mut edge_procs: Vec<Option<KillOnDrop>> = edges
        .iter()
        .zip(&logs)
        .map(|(e, log)| {
            Some(start_edge_with(
                e,
                origin_host,
                &[
                    "--health-port".into(),
                    HEALTH_PORT.into(),
                    "--sink-property".into(),
                    "proxy-protocol=true".into(),
                    "--sink-property".into(),
                    format!("access-log={}", log.display()),
                ],
            ))
        })
        .collect();

    // deploy/haproxy.cfg as it is, but for the edges' addresses.
    let mut cfg = HAPROXY_CFG.to_string();
    for (placeholder, edge) in CFG_EDGES.iter().zip(&edges) {
        assert!(
            cfg.contains(&format!("{placeholder}:8080")),
            "{placeholder}"
        );
        cfg = cfg.replace(placeholder, &edge.addr.to_string());
    }
    assert!(cfg.contains(&format!("check port {HEALTH_PORT}")));
    // HAProxy wants two fds per connection and fails to start when `maxconn`
    // needs more than it may have; where the hard limit is lower (20,000 in the
    // CI container, which cannot raise it) `maxconn` is lowered to fit, which is
    // still about ten times what this test uses.
    let fd_limit = {
        let mut limit = nix::libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit fills the struct it is given.
        assert_eq!(
            unsafe { nix::libc::getrlimit(nix::libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        limit.rlim_max
    };
    let maxconn_line = cfg
        .lines()
        .find(|l| l.trim_start().starts_with("maxconn "))
        .expect("maxconn in haproxy.cfg")
        .to_string();
    let maxconn: u64 = maxconn_line.trim()["maxconn ".len()..].parse().unwrap();
    if 2 * maxconn + 100 > fd_limit {
        let fits = (fd_limit - 100) / 2;
        assert!(
            fits >= 5 * 1000,
            "fd limit {fd_limit} too low for this test"
        );
        cfg = cfg.replace(&maxconn_line, &format!("    maxconn {fits}"));
    }
    std::fs::write(&cfg_path, cfg).unwrap();
    let mut balancer_proc = balancer
        .command(&haproxy)
        .arg("-db")
        .arg("-f")
        .arg(&cfg_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("haproxy starts");
    let haproxy_out = Output::default();
    haproxy_out.collect(balancer_proc.stdout.take().unwrap());
    haproxy_out.collect(balancer_proc.stderr.take().unwrap());
    let _balancer_proc = KillOnDrop(balancer_proc);

    net.assert_no_route_out();

    // HAProxy listens once it has read its configuration (the edges' health
    // checks pass from the start: their feeds are up).
    let start = Instant::now();
    loop {
        let probe = viewers.run_in(move || std::net::TcpStream::connect(front));
        if probe.is_ok() {
            break;
        }
        assert!(
            start.elapsed() < *common::DEADLINE,
            "haproxy never listened: {:#?}",
            haproxy_out.0.lock().unwrap()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // A thousand viewers; one in a hundred reads enough to be decoded in full.
    const VIEWERS: usize = 1000;
    let conns = connect_viewers(viewers, front, VIEWERS);
    let want: Vec<usize> = (0..VIEWERS)
        .map(|i| if i % 100 == 0 { 40_000 } else { 4096 })
        .collect();
    let watching = watch(conns, &want, std::time::Duration::from_secs(60));
    let header = header_of(&watching[0].body).to_vec();
    assert_start_with_header(&watching, &header);
    for v in watching.iter().step_by(100) {
        common::decode_from_start(&v.body, "matroskademux", "vp8dec")
            .assert_starts_on_keyframe("a sampled viewer");
    }
    // Spread over both edges (leastconn: about half each), and still two feed
    // connections at the origin.
    let per_edge: Vec<usize> = edges.iter().map(|e| established_on(e, 8080)).collect();
    eprintln!("viewers per edge: {per_edge:?}");
    assert_eq!(per_edge.iter().sum::<usize>(), VIEWERS, "{per_edge:?}");
    assert!(
        per_edge.iter().all(|&n| n * 100 >= VIEWERS * 30),
        "unfair spread: {per_edge:?}"
    );
    assert_eq!(established_on(origin_host, 4953), 2);

    // The viewers leave; each edge logs each of its viewers with the viewers'
    // host's address (from the PROXY header), never the balancer's.
    drop(watching);
    let start = Instant::now();
    loop {
        let counts: Vec<usize> = logs.iter().map(|l| log_lines(l).len()).collect();
        if counts == per_edge {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "access log lines {counts:?}, viewers {per_edge:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let viewer_prefix = format!("{} - ", viewers.addr);
    for log in &logs {
        for line in log_lines(log) {
            assert!(line.starts_with(&viewer_prefix), "{line}");
            assert!(line.contains("\"GET / HTTP/1.1\" 200 "), "{line}");
        }
    }

    // edge1 stops: the health check takes it out, and new viewers all go to edge2.
    edge_procs[0] = None;
    haproxy_out.wait_for(&["edges/edge1", "DOWN"], std::time::Duration::from_secs(10));
    const LATE: usize = 50;
    let late = watch(
        connect_viewers(viewers, front, LATE),
        &[4096; LATE],
        std::time::Duration::from_secs(30),
    );
    assert_start_with_header(&late, &header);
    assert_eq!(established_on(edges[1], 8080), LATE);
    drop(late);

    // The origin restarts: edge2's health check answers 503 while its feed is down
    // (HAProxy takes it out: layer 7), and new viewers play within 5 s of the
    // origin's return.
    drop(origin);
    haproxy_out.wait_for(
        &["edges/edge2", "DOWN", "Layer7"],
        std::time::Duration::from_secs(10),
    );
    origin = start_origin(origin_host, SMALL_ORIGIN);
    let back = Instant::now();
    let played = loop {
        // HAProxy closes a connection it has no edge for: try again.
        let conn = connect_viewers(viewers, front, 1);
        let last_error = match try_watch(conn, &[4096], std::time::Duration::from_secs(2)) {
            Ok(v) => break v,
            Err(e) => e,
        };
        assert!(
            back.elapsed() < std::time::Duration::from_secs(5),
            "no viewer played within 5 s of the origin's return ({last_error}): {:#?}",
            haproxy_out.0.lock().unwrap()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let elapsed = back.elapsed();
    eprintln!("a new viewer played {elapsed:?} after the origin restarted");
    assert!(elapsed < std::time::Duration::from_secs(5), "{elapsed:?}");
    // A new stream (matroskamux writes a new header each run) from its start.
    let new_header = header_of(&played[0].body).to_vec();
    assert_start_with_header(&played, &new_header);
    drop(origin);
}
