//! The Flumotion-style examples run for real: the porter passes HTTP connections over
//! SCM_RIGHTS to a streamer (Rust, then Python) that serves them with rsmultifdsink.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{KillOnDrop, target_dir};

fn read_line(out: &mut BufReader<ChildStdout>) -> String {
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(!line.is_empty(), "process ended early");
    line.trim_end().to_string()
}

fn run_pair(streamer: Command) {
    common::init();
    let sock = std::env::temp_dir().join(format!(
        "rsmfd-streamer-{}-{:?}.sock",
        std::process::id(),
        std::thread::current().id()
    ));
    let mut streamer = streamer;
    streamer
        .arg(&sock)
        .args(["--exit-after", "2"])
        .stdout(Stdio::piped());
    let mut streamer = KillOnDrop(streamer.spawn().expect("streamer starts"));
    let mut s_out = BufReader::new(streamer.0.stdout.take().unwrap());
    assert!(read_line(&mut s_out).starts_with("streamer: waiting"));

    let porter = Command::new(target_dir().join("examples/porter"))
        .arg("127.0.0.1:0")
        .arg(&sock)
        .args(["--max-connections", "2"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("porter built by cargo test");
    let mut porter = KillOnDrop(porter);
    let mut p_out = BufReader::new(porter.0.stdout.take().unwrap());
    let line = read_line(&mut p_out);
    let addr = line
        .strip_prefix("porter: listening on ")
        .expect("porter address")
        .to_string();

    let mut received = Vec::new();
    for path in ["/live", "/other"] {
        let mut viewer = TcpStream::connect(&addr).unwrap();
        viewer
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        write!(viewer, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
        // Read the head and about 100 kB of stream, then leave.
        let mut data = Vec::new();
        let mut buf = [0u8; 16384];
        let start = Instant::now();
        while data.len() < 100_000 {
            assert!(start.elapsed() < Duration::from_secs(20), "stream too slow");
            let n = viewer.read(&mut buf).unwrap();
            assert!(n > 0, "stream ended");
            data.extend_from_slice(&buf[..n]);
        }
        let head_end = data.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&data[..head_end]).to_string();
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
        assert!(head.contains("Content-Type: video/webm\r\n"), "{head}");
        let body = data[head_end..].to_vec();
        // The WebM streamheader comes first: an EBML header.
        assert_eq!(
            &body[..4],
            &[0x1a, 0x45, 0xdf, 0xa3],
            "body does not start with EBML"
        );
        assert!(
            decoded_frames(&body) > 0,
            "capture of {path} does not decode"
        );
        received.push(body.len());
    }
    // The streamer reports each client's stats when it leaves, then exits.
    let mut reports = Vec::new();
    while reports.len() < 2 {
        let line = read_line(&mut s_out);
        if line.starts_with("client-removed") {
            reports.push(line);
        }
    }
    for (report, got) in reports.iter().zip(&received) {
        let sent: usize = report
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("bytes-sent="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            report.contains("status=closed") || report.contains("status=error"),
            "{report}"
        );
        // The viewer left with bytes still in flight: it read at most what was sent.
        assert!(sent >= *got, "{report}: viewer read {got}");
    }
    let status = streamer.0.wait().unwrap();
    assert!(status.success(), "streamer exit: {status}");
    assert!(porter.0.wait().unwrap().success());
}

/// Frames decoded from a WebM capture (cut at any point, so it may end in an error).
fn decoded_frames(capture: &[u8]) -> u32 {
    common::decode(capture, "matroskademux ! vp8dec").frames
}

#[test]
fn porter_and_rust_streamer() {
    run_pair(Command::new(target_dir().join("examples/streamer")));
}

#[test]
fn porter_and_python_streamer() {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    let mut cmd = Command::new(python);
    cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/streamer.py"))
        .env("GST_PLUGIN_PATH", target_dir());
    run_pair(cmd);
}

/// The measurement command of docs/scale-out.md (between its `scaleout-command`
/// markers), run with its own arguments and then small sizes (a short window, one
/// repeat, few viewers) so that it takes seconds: every figure line comes out
/// and parses, the viewers get the stream, and the feed clients cost the
/// origin's sink IO threads something.
#[test]
fn scaleout_cost_runs_as_the_doc_says() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/scale-out.md")).unwrap();
    let block = doc
        .split("<!-- scaleout-command -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- /scaleout-command -->").next())
        .expect("scaleout-command markers in docs/scale-out.md");
    let lines: Vec<&str> = block
        .lines()
        .filter(|l| l.starts_with("cargo ") || l.starts_with("target/"))
        .collect();
    let [build, run] = lines[..] else {
        panic!("a cargo build line and the program's line: {block}");
    };
    // The build line as it stands (a release build of the two examples).
    let built = Command::new("sh")
        .arg("-c")
        .arg(build)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(built.success(), "{build}: {built}");
    let (program, args) = run.split_once(' ').unwrap_or((run, ""));
    let out = Command::new(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(program))
        .args(args.split_whitespace())
        .args([
            "--window",
            "0.5",
            "--repeat",
            "1",
            "--viewers",
            "0,10",
            "--feeds",
            "0,2",
        ])
        .output()
        .expect("scaleout-cost built by the build line");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The number before `unit` in the line starting with `prefix`.
    let figure = |prefix: &str, unit: &str| -> f64 {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix}: {stdout}"));
        let before = &line[..line.find(unit).unwrap_or_else(|| panic!("{line}"))];
        before
            .split_whitespace()
            .last()
            .unwrap()
            .parse()
            .unwrap_or_else(|e| panic!("{line}: {e}"))
    };
    assert!(figure("origin: 0 feed clients:", "% of a core") > 0.0);
    assert!(figure("origin: 2 feed clients:", "kbit/s each") > 0.0);
    assert!(figure("edge: 0 viewers:", "% of a core") > 0.0);
    assert!(figure("edge: 10 viewers:", "% of a core") > 0.0);
    assert!(
        figure("edge: 10 viewers:", "kbit/s each") > 100.0,
        "{stdout}"
    );
    // Slopes from one window each are noisy: only that they are figures.
    assert!(figure("per feed client at the origin:", "% (sink IO threads)").is_finite());
    assert!(figure("per viewer at an edge:", "% of a core").is_finite());
}
