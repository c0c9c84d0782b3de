//! Every `gst-launch-1.0` recipe of the README, run verbatim (only the port is
//! swapped for a free one, and a receiver's video sink for a counting fakesink),
//! and played by a real client: HTTP recipes are fetched and decoded, the raw TCP
//! recipe is played by its `tcpclientsrc` receiver line.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{
    Running, assert_no_error, current_port, free_port, http_get_on, readme_recipes, with_port,
};
use gst::prelude::*;

/// Starts a server recipe on a free port; returns the pipeline and the port.
fn start_server(recipe: &str) -> (Running, u16) {
    let server = Running::launch(&with_port(recipe, 0));
    let port = current_port(&server.tcp_server_sink());
    (server, port)
}

/// Decodes a capture (cut mid-stream); returns how many buffers the decoder gave.
fn decode(capture: &[u8], decoder: &str) -> u32 {
    common::decode(capture, decoder).frames
}

/// Fails the test with the server's error, if it posted one.
fn check_no_error(server: &gst::Pipeline, recipe: &str) {
    assert_no_error(server, &format!("{recipe}: the server pipeline failed"));
}

/// Fetches the stream over HTTP: the response head and `want` bytes of body.
/// `check` runs while waiting and fails the test if the server failed.
fn fetch(port: u16, want: usize, check: impl FnMut()) -> (String, Vec<u8>) {
    fetch_path(port, "/", want, check)
}

/// `fetch` of `path`.
fn fetch_path(port: u16, path: &str, want: usize, check: impl FnMut()) -> (String, Vec<u8>) {
    let conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    http_get_on(conn, "test", path, want, Duration::from_secs(20), check)
}

/// What a muxer's stream must be served as, and how to decode it.
fn expectation(recipe: &str) -> (&'static str, &'static str) {
    if recipe.contains("webmmux") {
        ("video/webm", "matroskademux ! vp8dec")
    } else if recipe.contains("oggmux") {
        ("application/ogg", "oggdemux ! theoradec")
    } else if recipe.contains("mpegtsmux") {
        ("video/mp2t", "tsdemux ! mpegaudioparse ! mpg123audiodec")
    } else if recipe.contains("multipartmux") {
        (
            "multipart/x-mixed-replace;boundary=",
            "multipartdemux ! jpegdec",
        )
    } else if recipe.contains("flvmux") {
        ("video/x-flv", "flvdemux ! mpegaudioparse ! mpg123audiodec")
    } else {
        panic!("no expectation for recipe {recipe}")
    }
}

#[test]
fn readme_http_recipes_play() {
    common::init();
    // Mount recipes (several elements on one port) are played below.
    let http: Vec<String> = readme_recipes()
        .into_iter()
        .filter(|r| r.contains("http=true") && !r.contains("mount="))
        .collect();
    assert!(http.len() >= 5, "README lost recipes: {http:?}");
    for recipe in http {
        let (content_type, decoder) = expectation(&recipe);
        let (server, port) = start_server(&recipe);
        // Audio streams are slow (128 kbit/s): a few seconds' worth is enough.
        let want = if recipe.starts_with("audiotestsrc") {
            12_000
        } else {
            60_000
        };
        let (head, body) = fetch(port, want, || check_no_error(&server, &recipe));
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{recipe}: {head}");
        assert!(
            head.contains(&format!("Content-Type: {content_type}")),
            "{recipe}: {head}"
        );
        assert!(
            head.contains("Cache-Control: no-cache\r\n"),
            "{recipe}: {head}"
        );
        let frames = decode(&body, decoder);
        assert!(frames > 0, "{recipe}: the capture does not decode");
        server.set_state(gst::State::Null).unwrap();
    }
}

/// The recipe with several elements on one port: its port swapped for one free
/// port (the same for all its elements, which share it), each mount fetched and
/// decoded, and its metrics path answered.
#[test]
fn readme_mount_recipe_serves_each_mount() {
    common::init();
    let recipe = readme_recipes()
        .into_iter()
        .find(|r| r.contains("mount="))
        .expect("a recipe with mounts");
    let port = free_port();
    let server = Running::launch(&with_port(&recipe, port));
    for (path, content_type, decoder, want) in [
        ("/video", "video/webm", "matroskademux ! vp8dec", 60_000),
        ("/audio", "application/ogg", "oggdemux ! opusdec", 12_000),
    ] {
        let (head, body) = fetch_path(port, path, want, || check_no_error(&server, &recipe));
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{path}: {head}");
        assert!(
            head.contains(&format!("Content-Type: {content_type}\r\n")),
            "{path}: {head}"
        );
        assert!(
            decode(&body, decoder) > 0,
            "{path}: the capture does not decode"
        );
    }
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut metrics = String::new();
    conn.read_to_string(&mut metrics).unwrap();
    assert!(metrics.starts_with("HTTP/1.0 200 OK\r\n"), "{metrics}");
    for mount in ["/video", "/audio"] {
        assert!(
            metrics.contains(&format!("rstcpserversink_clients{{mount=\"{mount}\"}} ")),
            "{metrics}"
        );
    }
    server.set_state(gst::State::Null).unwrap();
}

#[test]
fn readme_raw_tcp_recipe_plays_to_its_receiver() {
    common::init();
    let all = readme_recipes();
    let receiver_at = all
        .iter()
        .position(|r| r.starts_with("tcpclientsrc"))
        .expect("a tcpclientsrc receiver recipe");
    let server_recipe = &all[receiver_at - 1];
    assert!(!server_recipe.contains("http=true"));
    let (server, port) = start_server(server_recipe);
    let receiver = all[receiver_at]
        .split_whitespace()
        .map(|w| match w {
            w if w.starts_with("port=") => format!("port={port} host=127.0.0.1"),
            "autovideosink" => "fakesink name=out signal-handoffs=true sync=false".into(),
            w => w.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ");
    let (client, frames) = common::counting(&receiver);
    client.set_state(gst::State::Playing).unwrap();
    let start = Instant::now();
    while frames.load(Ordering::SeqCst) < 10 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "receiver got no frames"
        );
        if let Some(msg) = client.bus().unwrap().timed_pop_filtered(
            gst::ClockTime::from_mseconds(100),
            &[gst::MessageType::Error],
        ) {
            panic!("receiver error: {msg:?}");
        }
    }
    client.set_state(gst::State::Null).unwrap();
    server.set_state(gst::State::Null).unwrap();
}

/// The README's demo command (`scripts/demo`, which the set-up makes work on a fresh
/// machine) serves a WebM stream that decodes. Run as the README runs it, with a
/// free port in `PORT`.
#[test]
fn demo_script_serves_a_stream_that_decodes() {
    common::init();
    let port = free_port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo");
    let mut demo = std::process::Command::new(script)
        .env("PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("scripts/demo runs");
    // The script builds the plugin first: wait until it listens (or fails).
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = demo.try_wait().unwrap() {
            let mut err = String::new();
            demo.stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("scripts/demo exited with {status}: {err}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "scripts/demo never listened on {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (head, body) = fetch(port, 60_000, || {
        assert!(demo_running(&mut demo), "scripts/demo died while serving");
    });
    demo.kill().unwrap();
    demo.wait().unwrap();
    assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
    assert!(head.contains("Content-Type: video/webm"), "{head}");
    assert!(
        decode(&body, "matroskademux ! vp8dec") > 0,
        "the demo's stream does not decode"
    );
}

fn demo_running(demo: &mut std::process::Child) -> bool {
    demo.try_wait().unwrap().is_none()
}
