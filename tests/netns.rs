//! An origin, an edge and a viewer on three separate hosts (network namespaces on
//! one bridge, tests/common/netns.rs): the viewer plays the origin's stream
//! through the edge program. The groundwork of issue 12's multi-host test;
//! skipped, with a message, where namespaces cannot be made.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Instant;

use common::netns::Net;

fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn viewer_on_its_own_host_plays_the_origin_through_an_edge() {
    common::init();
    assert!(
        target_dir().join("libgstrsmultifdsink.so").exists()
            && target_dir().join("examples/edge").exists(),
        "plugin or edge example not built in {}: cargo build --all-targets first (scripts/test does)",
        target_dir().display()
    );
    let Some(net) = Net::new(&["origin", "edge1", "viewers"]) else {
        return;
    };
    let (origin_host, edge_host, viewers) =
        (net.host("origin"), net.host("edge1"), net.host("viewers"));

    let _origin = Guard(
        origin_host
            .command("gst-launch-1.0")
            .arg("-q")
            .args(
                "videotestsrc is-live=true ! video/x-raw,width=320,height=240,framerate=30/1 ! \
                 vp8enc deadline=1 keyframe-max-dist=30 ! webmmux streamable=true ! gdppay ! \
                 rstcpserversink host=0.0.0.0 port=4953 sync-method=latest-keyframe"
                    .split_whitespace(),
            )
            .env("GST_PLUGIN_PATH", target_dir())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut edge = edge_host
        .command(target_dir().join("examples/edge").to_str().unwrap())
        .args(["--origin-host", &origin_host.addr.to_string()])
        .args([
            "--origin-port",
            "4953",
            "--host",
            "0.0.0.0",
            "--port",
            "8080",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = edge.stdout.take().unwrap();
    let _edge = Guard(edge);
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
        assert!(start.elapsed() < common::DEADLINE, "no feed: {seen:#?}");
    }

    // Traffic stays among the hosts: none has a route out of 10.77.0.0/24.
    for host in &net.hosts {
        let routes = net.routes(host);
        assert!(
            routes.lines().all(|r| r.starts_with("10.77.0.0/24 ")),
            "{}: {routes}",
            host.name
        );
    }

    let capture = std::env::temp_dir().join(format!("rsmfd-netns-{}.webm", std::process::id()));
    let status = viewers
        .command("curl")
        .args(["-s", "--max-time", "3", "-o"])
        .arg(&capture)
        .arg(format!("http://{}:8080/", edge_host.addr))
        .status()
        .unwrap();
    // 28: the time limit ended the (endless) stream, as it should.
    assert_eq!(status.code(), Some(28), "curl: {status}");
    let body = std::fs::read(&capture).unwrap();
    let _ = std::fs::remove_file(&capture);
    assert!(body.len() > 20_000, "{} bytes in 3 s", body.len());
    let d = common::decode_from_start(&body, "matroskademux", "vp8dec");
    assert!(
        d.starts_on_keyframe(),
        "{} frames, first {:?}, error {:?}",
        d.decoded.frames,
        d.first_frame_flags,
        d.decoded.error
    );
}
