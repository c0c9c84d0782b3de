//! The edge program (examples/edge.rs, issue 12 point 2) against an origin that
//! is killed and started again: a `gst-launch-1.0` child process on 127.0.0.1.
//! New viewers play within 5 s of the origin's return; viewers connected through
//! the gap continue (MPEG-TS) or are closed (EOF), never left on a silent
//! connection past `--max-gap`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::free_port;
use common::process::{KillOnDrop, assert_plugin_and_edge_built, target_dir};

/// `gst-launch-1.0 {pipeline}` with `PORT` replaced, once it accepts connections.
fn start_origin(pipeline: &str, port: u16) -> KillOnDrop {
    assert_plugin_and_edge_built();
    let pipeline = pipeline.replace("PORT", &port.to_string());
    let child = Command::new("gst-launch-1.0")
        .arg("-q")
        .args(pipeline.split_whitespace())
        .env("GST_PLUGIN_PATH", target_dir())
        .stdout(Stdio::null())
        .spawn()
        .expect("gst-launch-1.0 runs");
    let mut origin = KillOnDrop(child);
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            origin.0.try_wait().unwrap().is_none(),
            "the origin exited: {pipeline}"
        );
        assert!(
            start.elapsed() < *common::DEADLINE,
            "the origin never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    origin
}

/// Kills the origin as a crash would (SIGKILL) and waits until it is gone.
fn kill(origin: KillOnDrop) {
    drop(origin);
}

/// The edge program, its port and its stdout lines as they come.
struct Edge {
    _child: KillOnDrop,
    port: u16,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Edge {
    /// The edge with its default backoff (0.1 s doubling to 2 s) and `extra`.
    fn start(origin_port: u16, extra: &[&str]) -> Edge {
        let mut args: Vec<String> = [
            "--origin-host",
            "127.0.0.1",
            "--origin-port",
            &origin_port.to_string(),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|a| a.to_string()));
        Edge::spawn(&args)
    }

    /// The edge program with exactly these arguments.
    fn spawn(args: &[String]) -> Edge {
        let mut child = Command::new(target_dir().join("examples/edge"))
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("the edge example is built by cargo test");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut edge = Edge {
            _child: KillOnDrop(child),
            port: 0,
            lines,
            seen: Vec::new(),
        };
        let line = edge.wait_line("listening", |l| l.starts_with("edge: listening on "));
        edge.port = line.rsplit(':').next().unwrap().parse().unwrap();
        edge
    }

    /// Waits (10 s at most) until the edge says its feed from the origin is up.
    fn wait_feed_up(&mut self) {
        self.wait_line("feed up", |l| l.starts_with("edge: feed up"));
    }

    /// Waits (10 s at most) until the edge says its feed is down.
    fn wait_feed_down(&mut self) {
        self.wait_line("feed down", |l| l.starts_with("edge: feed down"));
    }

    /// Waits (10 s at most) for a line that `pred` accepts; returns it.
    fn wait_line(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait_line_within(what, *common::DEADLINE, pred)
    }

    fn wait_line_within(
        &mut self,
        what: &str,
        within: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let start = Instant::now();
        loop {
            let left = within.saturating_sub(start.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line '{what}' within {within:?}; the edge said {:#?}",
                    self.seen
                ),
            }
        }
    }
}

/// The status line of the edge's answer to a health check on `port`.
fn health(port: u16) -> String {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(*common::DEADLINE)).unwrap();
    conn.write_all(b"GET /health HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    answer.lines().next().unwrap_or_default().to_string()
}

/// An HTTP viewer of the edge: what it received so far, head included.
struct Viewer {
    conn: TcpStream,
    data: Vec<u8>,
}

impl Viewer {
    fn connect(port: u16) -> Viewer {
        let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        conn.write_all(b"GET / HTTP/1.1\r\nHost: edge\r\n\r\n")
            .unwrap();
        Viewer {
            conn,
            data: Vec::new(),
        }
    }

    /// A viewer that got `want` bytes of body within [`*common::DEADLINE`].
    fn playing(port: u16, want: usize) -> Viewer {
        let mut viewer = Viewer::connect(port);
        assert!(viewer.read_more(want, *common::DEADLINE));
        viewer
    }

    /// Reads until the body holds `want` more bytes than now; false on EOF.
    fn read_more(&mut self, want: usize, within: Duration) -> bool {
        let goal = self.body().len() + want;
        let start = Instant::now();
        while self.body().len() < goal {
            assert!(
                start.elapsed() < within,
                "viewer: body of {} bytes, {goal} wanted within {within:?}",
                self.body().len()
            );
            if !self.read_some() {
                return false;
            }
        }
        true
    }

    /// One read (waiting 50 ms at most); false on EOF.
    fn read_some(&mut self) -> bool {
        let mut buf = [0u8; 16384];
        match self.conn.read(&mut buf) {
            Ok(0) => false,
            Ok(n) => {
                self.data.extend_from_slice(&buf[..n]);
                true
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                true
            }
            Err(e) => panic!("viewer: {e}"),
        }
    }

    /// Reads until the edge closes the connection; how long that took. Fails
    /// after `within`.
    fn wait_eof(&mut self, within: Duration) -> Duration {
        let start = Instant::now();
        while self.read_some() {
            assert!(
                start.elapsed() < within,
                "viewer still open after {within:?} ({} bytes)",
                self.data.len()
            );
        }
        start.elapsed()
    }

    fn head(&self) -> String {
        let end = self.head_end().expect("a response head");
        String::from_utf8_lossy(&self.data[..end]).to_string()
    }

    fn head_end(&self) -> Option<usize> {
        self.data
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|p| p + 4)
    }

    fn body(&self) -> &[u8] {
        self.head_end().map_or(&[], |end| &self.data[end..])
    }
}

const TS_ORIGIN: &str = "audiotestsrc is-live=true ! lamemp3enc ! mpegaudioparse ! mpegtsmux ! \
     gdppay ! rstcpserversink port=PORT";
const TS_DECODER: &str = "tsdemux ! mpegaudioparse ! mpg123audiodec";

const WEBM_ORIGIN: &str = "videotestsrc is-live=true ! video/x-raw,width=320,height=240,framerate=30/1 ! \
     vp8enc deadline=1 keyframe-max-dist=30 ! webmmux streamable=true ! gdppay ! \
     rstcpserversink port=PORT sync-method=latest-keyframe";

/// An origin (`gst-launch-1.0 {pipeline}` on a free port) and an edge program fed
/// from it with the default options and `extra`; the origin's port.
fn origin_and_edge(pipeline: &str, extra: &[&str]) -> (KillOnDrop, u16, Edge) {
    let origin_port = free_port();
    let origin = start_origin(pipeline, origin_port);
    let edge = Edge::start(origin_port, extra);
    (origin, origin_port, edge)
}

/// A new viewer plays within 5 s of `restarted`: its stream decodes from a keyframe.
fn new_viewer_plays(
    edge: &Edge,
    restarted: Instant,
    want: usize,
    demuxer: &str,
    decoder: &str,
) -> Viewer {
    let mut viewer = Viewer::connect(edge.port);
    let left = Duration::from_secs(5).saturating_sub(restarted.elapsed());
    assert!(
        viewer.read_more(want, left),
        "the new viewer was closed ({} bytes)",
        viewer.data.len()
    );
    assert!(
        restarted.elapsed() <= Duration::from_secs(5),
        "{:?} after the origin's restart",
        restarted.elapsed()
    );
    eprintln!(
        "a new viewer had {want} bytes {:?} after the origin's return",
        restarted.elapsed()
    );
    assert!(viewer.head().starts_with("HTTP/1.0 200 OK\r\n"));
    common::decode_from_start(viewer.body(), demuxer, decoder)
        .assert_starts_on_keyframe("the new viewer's stream");
    viewer
}

/// MPEG-TS (MP3; no video encoder that mpegtsmux takes has a decoder installed on
/// Debian 12's base/good/bad/ugly set): a viewer connected before the origin is
/// killed goes on receiving, and decoding, the restarted origin's stream.
#[test]
fn mpegts_viewers_continue_through_an_origin_restart() {
    common::init();
    // Every buffer of audio-only MPEG-TS is a delta unit: start anywhere.
    let (origin, origin_port, mut edge) =
        origin_and_edge(TS_ORIGIN, &["--max-gap", "10", "--sync-method", "latest"]);
    edge.wait_feed_up();

    let mut before = Viewer::playing(edge.port, 16_000);
    let frames_before = common::decode(before.body(), TS_DECODER).frames;
    assert!(frames_before > 0, "the stream does not decode");

    kill(origin);
    edge.wait_feed_down();
    // The edge keeps trying while the origin is away (capped backoff).
    edge.wait_line("a second attempt", |l| l.contains("(attempt 2)"));
    let origin = start_origin(TS_ORIGIN, origin_port);
    let restarted = Instant::now();
    edge.wait_line_within("feed up again", Duration::from_secs(5), |l| {
        l.starts_with("edge: feed up")
    });
    let verdict = edge.wait_line("the verdict on viewers", |l| l.contains("the new feed has"));
    assert!(
        verdict.contains("same streamheader: 1 viewers continue"),
        "{verdict}"
    );

    new_viewer_plays(
        &edge,
        restarted,
        16_000,
        "tsdemux ! mpegaudioparse",
        "mpg123audiodec",
    );

    // The viewer from before the restart got the new stream, and it decodes.
    let had = before.body().len();
    assert!(
        before.read_more(16_000, Duration::from_secs(5)),
        "the old viewer was closed"
    );
    let frames_after = common::decode(before.body(), TS_DECODER).frames;
    assert!(
        frames_after > frames_before + 20,
        "{had} bytes gave {frames_before} frames, {} gave {frames_after}",
        before.body().len()
    );
    drop(origin);
}

/// WebM: the viewers connected when the origin went away are closed (EOF) once
/// the gap passes `--max-gap`, and so is one who connects during the outage;
/// after the origin's return a new viewer plays within 5 s. The health port says
/// 503 while the feed is down, 200 while it is up.
#[test]
fn webm_viewers_are_closed_after_the_gap_limit() {
    common::init();
    let (origin, origin_port, mut edge) =
        origin_and_edge(WEBM_ORIGIN, &["--max-gap", "2", "--health-port", "0"]);
    let line = edge.wait_line("health port", |l| l.starts_with("edge: health checks on "));
    let health_port: u16 = line.rsplit(':').next().unwrap().parse().unwrap();
    edge.wait_feed_up();
    assert_eq!(health(health_port), "HTTP/1.0 200 OK");
    let mut viewer = Viewer::playing(edge.port, 50_000);

    let killed = Instant::now();
    kill(origin);
    edge.wait_feed_down();
    assert_eq!(health(health_port), "HTTP/1.0 503 Service Unavailable");
    // Silence, then a clean close: EOF within the limit and a margin.
    viewer.wait_eof(Duration::from_secs(4));
    let closed_after = killed.elapsed();
    assert!(
        closed_after >= Duration::from_millis(1500),
        "closed {closed_after:?} after the kill, before the 2 s limit"
    );
    edge.wait_line("viewers closed", |l| l.contains("closing 1 viewers"));

    // A viewer arriving during the outage is not left waiting either.
    let mut late = Viewer::connect(edge.port);
    let waited = late.wait_eof(Duration::from_secs(2));
    assert!(waited < Duration::from_secs(2));

    let origin = start_origin(WEBM_ORIGIN, origin_port);
    let restarted = Instant::now();
    // Until the feed is back, the edge still closes whoever connects.
    edge.wait_line_within("feed up again", Duration::from_secs(5), |l| {
        l.starts_with("edge: feed up")
    });
    assert_eq!(health(health_port), "HTTP/1.0 200 OK");
    new_viewer_plays(&edge, restarted, 40_000, "matroskademux", "vp8dec");
    drop(origin);
}

/// WebM through a short outage: when the new feed's streamheader differs, the
/// viewer connected before it is closed and the one who connected during it
/// (given nothing until a buffer comes to place it) plays the new stream; when
/// it is the same both go on (what the edge decided is in its output). Either
/// way none is left silent.
#[test]
fn webm_viewers_through_a_short_outage_continue_or_are_closed() {
    common::init();
    let (origin, origin_port, mut edge) = origin_and_edge(WEBM_ORIGIN, &["--max-gap", "10"]);
    edge.wait_feed_up();
    let mut viewer = Viewer::playing(edge.port, 50_000);

    kill(origin);
    edge.wait_feed_down();
    // A viewer arriving in the gap: placed when the next buffer comes, so it
    // waits (nothing of the old stream) until the feed is back.
    let mut in_gap = Viewer::connect(edge.port);

    let origin = start_origin(WEBM_ORIGIN, origin_port);
    let restarted = Instant::now();
    let verdict = edge.wait_line("the verdict on viewers", |l| l.contains("the new feed has"));
    eprintln!("{verdict}");
    if verdict.contains("another streamheader") {
        // The viewer who had the old header is closed; the one who had nothing
        // yet starts on the new stream.
        assert!(
            verdict.contains("closing 1 viewers, 1 waiting start on it"),
            "{verdict}"
        );
        viewer.wait_eof(Duration::from_secs(2));
        assert!(in_gap.read_more(40_000, Duration::from_secs(5)));
        let d = common::decode_from_start(in_gap.body(), "matroskademux", "vp8dec");
        assert!(d.starts_on_keyframe(), "{:?}", d.decoded.error);
    } else {
        assert!(verdict.contains("2 viewers continue"), "{verdict}");
        for v in [&mut viewer, &mut in_gap] {
            assert!(
                v.read_more(50_000, Duration::from_secs(5)),
                "closed though the edge said it continues"
            );
        }
    }
    new_viewer_plays(&edge, restarted, 40_000, "matroskademux", "vp8dec");
    drop(origin);
}

/// The README's edge program command, run with its own arguments (only the ports
/// swapped for the test's): it serves the origin's feed to a viewer.
#[test]
fn readme_edge_program_command_serves() {
    common::init();
    let readme = include_str!("../README.md");
    let command = readme
        .lines()
        .find_map(|l| l.strip_prefix("cargo run --release --example edge -- "))
        .expect("the README shows the edge program's command");
    let words: Vec<&str> = command.split_whitespace().collect();
    let origin_port = free_port();
    let mut args = Vec::new();
    let mut i = 0;
    while i < words.len() {
        args.push(words[i].to_string());
        match words[i] {
            "--origin-port" => {
                args.push(origin_port.to_string());
                i += 1;
            }
            "--port" => {
                args.push("0".into());
                i += 1;
            }
            _ => {}
        }
        i += 1;
    }
    let origin = start_origin(WEBM_ORIGIN, origin_port);
    let mut edge = Edge::spawn(&args);
    edge.wait_feed_up();
    let viewer = Viewer::playing(edge.port, 40_000);
    common::decode_from_start(viewer.body(), "matroskademux", "vp8dec")
        .assert_starts_on_keyframe("the viewer");
    drop(origin);
}
