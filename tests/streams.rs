//! Real use: a Flumotion-style application over TCP, and a real encoded stream to
//! clients that join late.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use common::*;
use gst::prelude::*;

/// The app accepts connections itself, writes its own HTTP response headers on the
/// non-blocking fd, hands the fd over with `add-full`, reads `get-stats` in
/// `client-removed` and closes the fd in `client-fd-removed`.
#[test]
fn flumotion_style_streamer_over_tcp() {
    let mut h = harness("rsmultifdsink", &[("bytes-min", "1000")]);
    h.set_src_caps(streamheader_caps(&[b"<header>"]));
    for i in 0..20 {
        h.push_bytes(&b16(i), i % 5 != 0);
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();

    let open: Arc<Mutex<HashMap<i32, OwnedFd>>> = Default::default();
    let stats: Arc<Mutex<HashMap<i32, (String, u64)>>> = Default::default();
    let closed_by_app = Arc::new(Mutex::new(Vec::new()));
    {
        let stats = stats.clone();
        h.sink().connect("client-removed", false, move |args| {
            let sink = args[0].get::<gst::Element>().unwrap();
            let fd = args[1].get::<i32>().unwrap();
            let s = sink.emit_by_name::<gst::Structure>("get-stats", &[&fd]);
            stats.lock().unwrap().insert(
                fd,
                (status_nick(&args[2]), s.get::<u64>("bytes-sent").unwrap()),
            );
            None
        });
        let open = open.clone();
        let closed = closed_by_app.clone();
        h.sink().connect("client-fd-removed", false, move |args| {
            let fd = args[1].get::<i32>().unwrap();
            drop(
                open.lock()
                    .unwrap()
                    .remove(&fd)
                    .expect("fd-removed for an fd the app owns"),
            );
            closed.lock().unwrap().push(fd);
            None
        });
    }
    let rec = Recorder::attach(&h.sink());

    const RESPONSE: &[u8] = b"HTTP/1.0 200 OK\r\nContent-Type: application/x-gst-check\r\n\r\n";
    let mut viewers = Vec::new();
    let mut fds = Vec::new();
    for _ in 0..3 {
        let mut viewer = TcpStream::connect(addr).unwrap();
        viewer.write_all(b"GET /stream HTTP/1.0\r\n\r\n").unwrap();
        let (mut conn, _) = listener.accept().unwrap();
        let mut req = [0u8; 256];
        let n = conn.read(&mut req).unwrap();
        assert!(req[..n].starts_with(b"GET /stream"));
        conn.set_nonblocking(true).unwrap();
        // A plain write() on the non-blocking fd, as the app does today.
        conn.write_all(RESPONSE).unwrap();
        let fd = conn.into_raw_fd();
        open.lock()
            .unwrap()
            .insert(fd, unsafe { OwnedFd::from_raw_fd(fd) });
        add_full(
            &h.sink(),
            fd,
            "burst",
            (gst::Format::Buffers, 3),
            (gst::Format::Undefined, u64::MAX),
        );
        viewers.push(viewer);
        fds.push(fd);
    }
    h.push_bytes(&b16(20), true);
    // Each viewer: the app's headers first, then the streamheader, then a burst of
    // three buffers, nothing interleaved.
    let mut want = RESPONSE.to_vec();
    want.extend_from_slice(b"<header>");
    for i in 18..=20 {
        want.extend(b16(i));
    }
    for v in &viewers {
        assert_eq!(read_exact(v, want.len()), want);
    }
    // Viewer 0 goes away: the element notices (handle-read), reports closed, and the
    // app reads its stats and closes the fd.
    let gone = fds[0];
    drop(viewers.remove(0));
    rec.wait_fd_removed(gone);
    let (status, sent) = stats.lock().unwrap()[&gone].clone();
    assert_eq!(status, "closed");
    assert_eq!(sent, (want.len() - RESPONSE.len()) as u64);
    assert_eq!(closed_by_app.lock().unwrap().as_slice(), &[gone]);
    // The others go on.
    h.push_bytes(&b16(21), true);
    for v in &viewers {
        assert_eq!(read_exact(v, 16), b16(21));
    }
    h.stop();
    assert_eq!(
        closed_by_app.lock().unwrap().len(),
        3,
        "NULL removes everyone with signals"
    );
    assert!(open.lock().unwrap().is_empty());
}

/// `videotestsrc ! theoraenc ! oggmux ! rsmultifdsink`: clients that join at
/// different times each get a capture that decodes from its first byte.
#[test]
fn theora_ogg_captures_of_late_clients_decode() {
    init();
    let pipeline = gst::parse::launch(
        "videotestsrc num-buffers=150 ! video/x-raw,width=160,height=120,framerate=30/1 ! \
         theoraenc keyframe-force=15 ! oggmux ! rsmultifdsink name=sink sync=false sync-method=latest-keyframe",
    )
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let sink = pipeline.by_name("sink").unwrap();
    let rec = Recorder::attach(&sink);
    // Join points: before the stream, and after about 8 and 16 Ogg pages.
    let seen = Arc::new(Mutex::new(0u32));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    {
        let seen = seen.clone();
        let tx = Mutex::new(tx);
        sink.static_pad("sink")
            .unwrap()
            .add_probe(gst::PadProbeType::BUFFER, move |_, _| {
                let mut n = seen.lock().unwrap();
                *n += 1;
                if *n == 8 || *n == 16 {
                    let _ = tx.lock().unwrap().send(());
                }
                gst::PadProbeReturn::Ok
            });
    }
    pipeline.set_state(gst::State::Ready).unwrap();
    let mut readers = Vec::new();
    let mut add_reader = || {
        let (ours, theirs) = nix::sys::socket::socketpair(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::Stream,
            None,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let fd = theirs.as_raw_fd();
        let reader = std::thread::spawn(move || {
            let mut f = std::fs::File::from(ours);
            let mut all = Vec::new();
            f.read_to_end(&mut all).unwrap();
            all
        });
        sink.emit_by_name::<()>("add", &[&fd]);
        readers.push((theirs, reader));
    };
    add_reader();
    pipeline.set_state(gst::State::Playing).unwrap();
    for _ in 0..2 {
        rx.recv_timeout(*DEADLINE).unwrap();
        add_reader();
    }
    let bus = pipeline.bus().unwrap();
    let msg = bus
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(60),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        )
        .expect("EOS");
    assert_eq!(msg.type_(), gst::MessageType::Eos, "{msg:?}");
    let served = sink.property::<u64>("bytes-served");
    assert!(served > 0);
    pipeline.set_state(gst::State::Null).unwrap();
    assert_eq!(
        rec.events()
            .iter()
            .filter(|e| matches!(e, Event::FdRemoved(_)))
            .count(),
        3
    );
    let mut frames = Vec::new();
    for (theirs, reader) in readers {
        drop(theirs); // the app closes its end: the reader sees EOF
        let capture = reader.join().unwrap();
        assert!(
            capture.starts_with(b"OggS"),
            "capture does not start on an Ogg page"
        );
        frames.push(decode_theora(&capture));
    }
    // The first client saw everything; the late ones fewer frames, but all decode.
    assert_eq!(frames[0], 150, "first client: {frames:?}");
    assert!(
        frames[1] > 0 && frames[1] < 150 && frames[2] > 0 && frames[2] <= frames[1],
        "{frames:?}"
    );
}

/// Decodes an Ogg/Theora capture; returns the number of frames, failing on any error.
fn decode_theora(capture: &[u8]) -> u32 {
    let decoded = decode(capture, "oggdemux ! theoradec");
    assert_eq!(decoded.error, None, "capture does not decode");
    decoded.frames
}
