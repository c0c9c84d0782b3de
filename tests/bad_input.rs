//! Bad input never crashes, never blocks the pipeline and never harms other
//! clients: fds closed while in use, full devices, empty and huge buffers, broken
//! caps, absurd property values, calls in every state.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use common::*;
use gst::prelude::*;

const SINK: &str = "rsmultifdsink";

/// A pipe whose write end sits at a high fd number, so no other test's fds reuse
/// the number once this test closes it.
fn high_pipe(at: i32) -> (OwnedFd, i32) {
    let (r, w) = pipe();
    let n = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(at)).unwrap();
    (r, n)
}

#[test]
fn fd_closed_by_the_app_while_in_use_is_an_error_not_a_crash() {
    let mut h = harness(SINK, &[]);
    h.set_src_caps_str(CHECK_CAPS);
    let rec = Recorder::attach(&h.sink());
    let (good_r, good_w) = pipe();
    h.add_fd(raw(&good_w));
    let (_r, bad) = high_pipe(7000);
    h.add_fd(bad);
    h.push_bytes(b"one", false);
    assert_eq!(read_exact(&good_r, 3), b"one");
    // The app misbehaves: closes the fd it handed over.
    nix::unistd::close(bad).unwrap();
    h.push_bytes(b"two", false);
    rec.wait_fd_removed(bad);
    assert!(
        rec.events().contains(&Event::Removed(bad, "error".into())),
        "{:?}",
        rec.events()
    );
    assert_eq!(read_exact(&good_r, 3), b"two");
    h.stop();
}

#[test]
fn full_device_gives_error_status() {
    let mut h = harness(SINK, &[]);
    h.set_src_caps_str(CHECK_CAPS);
    let rec = Recorder::attach(&h.sink());
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let (good_r, good_w) = pipe();
    h.add_fd(raw(&good_w));
    h.add_fd(full.as_raw_fd());
    h.push_bytes(b"data", false);
    rec.wait_fd_removed(full.as_raw_fd());
    assert!(
        rec.events()
            .contains(&Event::Removed(full.as_raw_fd(), "error".into()))
    );
    assert_eq!(read_exact(&good_r, 4), b"data");
    h.stop();
}

#[test]
fn empty_and_64_mib_buffers() {
    let mut h = harness(SINK, &[]);
    h.set_src_caps_str(CHECK_CAPS);
    let (a, b) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    h.add_fd(raw(&b));
    h.push_bytes(b"", false);
    h.push_bytes(b"x", false);
    let huge: Vec<u8> = (0..64 << 20).map(|i: u32| (i % 251) as u8).collect();
    // A reader drains while the sink writes: the streaming thread never waits.
    let reader = std::thread::spawn(move || {
        // Generous: under valgrind 64 MiB take a while.
        let got = read_exact_within(&a, 1 + (64 << 20) + 3, std::time::Duration::from_secs(300));
        (got, a)
    });
    h.push_bytes(&huge, false);
    h.push_bytes(b"", false);
    h.push_bytes(b"end", false);
    let (got, _a) = reader.join().unwrap();
    assert_eq!(&got[..1], b"x");
    assert!(
        got[1..1 + huge.len()] == huge[..],
        "64 MiB buffer corrupted"
    );
    assert_eq!(&got[1 + huge.len()..], b"end");
    assert_eq!(h.u64("bytes-to-serve"), 1 + (64 << 20) + 3);
    h.stop();
}

#[test]
fn broken_streamheaders_are_ignored_with_a_warning() {
    let mut h = harness(SINK, &[]);
    let (r, w) = pipe();
    h.add_fd(raw(&w));
    // Not an array.
    h.set_src_caps(
        gst::Caps::builder(CHECK_CAPS)
            .field("streamheader", "not buffers")
            .build(),
    );
    h.push_bytes(b"a", false);
    assert_eq!(read_exact(&r, 1), b"a");
    // An array of something else.
    h.set_src_caps(
        gst::Caps::builder(CHECK_CAPS)
            .field("streamheader", gst::Array::new([1i32, 2]))
            .build(),
    );
    h.push_bytes(b"b", false);
    assert_eq!(read_exact(&r, 1), b"b");
    // Caps without, then with a good streamheader: the client gets it before the
    // next buffer.
    h.set_src_caps_str(CHECK_CAPS);
    h.set_src_caps(streamheader_caps(&[b"H"]));
    h.push_bytes(b"c", false);
    assert_eq!(read_exact(&r, 2), b"Hc");
    h.wait_u64("bytes-served", 4);
    assert_nothing_readable(&r);
    h.stop();
}

#[test]
fn absurd_property_values_are_refused_or_harmless() {
    init();
    // Out of range from a launch line: GLib refuses the value, the default stays.
    let bin = gst::parse::launch("fakesrc num-buffers=1 ! rsmultifdsink name=s qos-dscp=100")
        .expect("launch line parses")
        .downcast::<gst::Bin>()
        .unwrap();
    assert_eq!(bin.by_name("s").unwrap().property::<i32>("qos-dscp"), -1);
    // Extreme but valid values: the stream still flows.
    let mut h = harness(
        SINK,
        &[
            ("units-max", &i64::MAX.to_string()),
            ("units-soft-max", &i64::MAX.to_string()),
            ("timeout", &u64::MAX.to_string()),
            ("burst-value", &u64::MAX.to_string()),
            ("buffers-min", &i32::MAX.to_string()),
            ("bytes-min", &i32::MAX.to_string()),
            ("time-min", &i64::MAX.to_string()),
            ("qos-dscp", "63"),
            ("sync-method", "burst"),
            ("burst-format", "time"),
            ("recover-policy", "keyframe"),
        ],
    );
    h.set_src_caps_str(CHECK_CAPS);
    let (r, w) = pipe();
    h.add_fd(raw(&w));
    for i in 0..10 {
        h.push_bytes(&b16(i), false);
    }
    let want: Vec<u8> = (0..10).flat_map(b16).collect();
    assert_eq!(read_exact(&r, want.len()), want);
    h.stop();
}

#[test]
fn calls_in_every_state_do_not_crash() {
    init();
    let sink = gst::ElementFactory::make(SINK).build().unwrap();
    sink.set_property("sync", false);
    let (_r, w) = pipe();
    let fd = raw(&w);
    for state in [
        gst::State::Null,
        gst::State::Ready,
        gst::State::Paused,
        gst::State::Null,
    ] {
        let _ = sink.set_state(state);
        sink.emit_by_name::<()>("add", &[&fd]);
        let stats = sink.emit_by_name::<gst::Structure>("get-stats", &[&fd]);
        let expect_client = state != gst::State::Null;
        assert_eq!(stats.has_field("bytes-sent"), expect_client, "{state:?}");
        sink.emit_by_name::<()>("remove-flush", &[&fd]);
        sink.emit_by_name::<()>("remove", &[&fd]);
        sink.emit_by_name::<()>("remove", &[&fd]);
        sink.emit_by_name::<()>("clear", &[]);
        assert_eq!(sink.property::<u32>("num-handles"), 0);
    }
    // A fd number that is not open at all, in READY.
    sink.set_state(gst::State::Ready).unwrap();
    let rec = Recorder::attach(&sink);
    let never_opened = unsafe {
        OwnedFd::from_raw_fd(
            nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(7100)).unwrap(),
        )
    };
    let n = never_opened.as_raw_fd();
    drop(never_opened);
    sink.emit_by_name::<()>("add", &[&n]);
    rec.wait_fd_removed(n);
    sink.set_state(gst::State::Null).unwrap();
}
