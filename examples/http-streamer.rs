//! A Flumotion-style HTTP streamer: it accepts connections itself, writes the HTTP
//! response headers, then hands each socket to `rsmultifdsink` with `add-full`.
//! When a client goes, it prints the client's stats and closes the socket.
//!
//! ```text
//! cargo run --release --example http-streamer -- [PORT] [webm|ogg]
//! ```
//! then open http://127.0.0.1:8080/ in a browser, VLC, ffplay or curl.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gst::prelude::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().map(|p| p.parse()).transpose()?.unwrap_or(8080);
    let format = args.next().unwrap_or_else(|| "webm".into());
    gst::init()?;
    gstrsmultifdsink::plugin_register_static()?;

    let (encoder, content_type) = match format.as_str() {
        "ogg" => ("theoraenc keyframe-force=30 ! oggmux", "application/ogg"),
        _ => (
            "vp8enc deadline=1 keyframe-max-dist=30 target-bitrate=1000000 ! webmmux streamable=true",
            "video/webm",
        ),
    };
    let pipeline = gst::parse::launch(&format!(
        "videotestsrc is-live=true pattern=ball ! video/x-raw,width=640,height=360,framerate=30/1 ! \
         timeoverlay ! {encoder} ! rsmultifdsink name=sink sync-method=latest-keyframe \
         units-max=2000 timeout=10000000000"
    ))?
    .downcast::<gst::Pipeline>()
    .map_err(|_| "not a pipeline")?;
    let sink = pipeline.by_name("sink").ok_or("no sink")?;

    // The app owns the sockets: it closes each once the sink has forgotten it.
    let sockets: Arc<Mutex<HashMap<i32, OwnedFd>>> = Default::default();
    sink.connect("client-removed", false, |args| {
        let sink = args[0].get::<gst::Element>().unwrap();
        let fd = args[1].get::<i32>().unwrap();
        let stats = sink.emit_by_name::<gst::Structure>("get-stats", &[&fd]);
        let status = gst::glib::EnumValue::from_value(&args[2])
            .map(|(_, v)| v.nick())
            .unwrap_or("?");
        println!(
            "client {fd} left ({status}): {} bytes in {:.1} s",
            stats.get::<u64>("bytes-sent").unwrap_or(0),
            stats.get::<u64>("connect-duration").unwrap_or(0) as f64 / 1e9
        );
        None
    });
    let owned = sockets.clone();
    sink.connect("client-fd-removed", false, move |args| {
        let fd = args[1].get::<i32>().unwrap();
        owned.lock().unwrap().remove(&fd);
        None
    });
    pipeline.set_state(gst::State::Playing)?;

    let listener = TcpListener::bind(("0.0.0.0", port))?;
    println!("streaming {content_type} on http://127.0.0.1:{port}/ (Ctrl-C to stop)");
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        // Read the request head (bounded, with a timeout), answer, hand over.
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        if !head.starts_with(b"GET ") {
            let _ = conn.write_all(b"HTTP/1.0 400 Bad Request\r\n\r\n");
            continue;
        }
        let response = format!(
            "HTTP/1.0 200 OK\r\nContent-Type: {content_type}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n"
        );
        if conn.write_all(response.as_bytes()).is_err() {
            continue;
        }
        let fd = conn.into_raw_fd();
        // SAFETY: we own this fd from into_raw_fd.
        sockets
            .lock()
            .unwrap()
            .insert(fd, unsafe { OwnedFd::from_raw_fd(fd) });
        println!("client {fd} joined");
        sink.emit_by_name::<()>("add", &[&fd]);
    }
    Ok(())
}
