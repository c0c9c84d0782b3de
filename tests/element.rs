//! `rsmultifdsink` through GStreamer: every scenario of GStreamer's own multifdsink
//! check suite with real pipes, and the points of the behaviour contract.

mod common;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use common::*;
use gst::prelude::*;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

const SINK: &str = "rsmultifdsink";

#[test]
fn no_clients() {
    check_suite::no_clients(SINK);
}

#[test]
fn add_client() {
    let mut h = harness(SINK, &[]);
    let (r, w) = pipe();
    h.add_fd(raw(&w));
    h.set_src_caps_str(CHECK_CAPS);
    h.push_bytes(b"dead", false);
    assert_eq!(read_exact(&r, 4), b"dead");
    h.wait_u64("bytes-served", 4);
    h.stop();
    assert!(is_open(raw(&w)), "the element closed an fd it was given");
}

#[test]
fn add_client_in_null_state_adds_nothing() {
    init();
    let sink = gst::ElementFactory::make(SINK).build().unwrap();
    let rec = Recorder::attach(&sink);
    let (_r, w) = pipe();
    sink.emit_by_name::<()>("add", &[&raw(&w)]);
    assert_eq!(sink.property::<u32>("num-handles"), 0);
    assert!(rec.events().is_empty());
}

#[test]
fn streamheader_sent_once_then_data() {
    check_suite::streamheader_sent_once_then_data(SINK, pipe);
}

#[test]
fn changed_streamheader_is_resent() {
    let (h, _clients) = check_suite::changed_streamheader_is_resent(SINK, pipe);
    h.stop();
}

#[test]
fn changed_streamheader_not_resent_when_disabled() {
    let mut h = harness(SINK, &[("resend-streamheader", "false")]);
    let (r1, w1) = pipe();
    h.set_src_caps(streamheader_caps(&[b"first"]));
    h.add_fd(raw(&w1));
    h.push_bytes(b"f00d", false);
    assert_eq!(read_exact(&r1, 9), b"firstf00d");
    h.set_src_caps(streamheader_caps(&[b"second"]));
    h.push_bytes(b"beef", false);
    assert_eq!(read_exact(&r1, 4), b"beef");
    h.wait_u64("bytes-served", 13);
    assert_nothing_readable(&r1);
    h.stop();
}

#[test]
fn burst_client_bytes() {
    check_suite::burst_case(SINK, 0, pipe);
}

#[test]
fn burst_client_bytes_keyframe() {
    check_suite::burst_case(SINK, 1, pipe);
}

#[test]
fn burst_client_bytes_with_keyframe() {
    check_suite::burst_case(SINK, 2, pipe);
}

#[test]
fn client_next_keyframe() {
    check_suite::client_next_keyframe(SINK, pipe);
}

#[test]
fn client_kick_slow_client_others_get_everything() {
    let mut h = harness(SINK, &[("units-max", "3")]);
    let rec = Recorder::attach(&h.sink());
    h.set_src_caps_str(CHECK_CAPS);
    let big = |i: u32| b16(i).repeat(16 * 1024);
    let pipes: Vec<_> = (0..3).map(|_| pipe()).collect();
    for p in &pipes {
        h.add_fd(raw(&p.1));
    }
    for i in 0..3 {
        h.push_bytes(&big(i), false);
    }
    for i in 0..3 {
        assert_eq!(read_exact(&pipes[0].0, big(i).len()), big(i));
        assert_eq!(read_exact(&pipes[2].0, big(i).len()), big(i));
    }
    let mut i = 3;
    while h.u32("num-handles") == 3 {
        h.push_bytes(&big(i), false);
        i += 1;
        assert!(i < 20, "slow client never kicked");
        // Keep the two good readers drained so only client 2 lags.
        for k in [0, 2] {
            assert_eq!(read_exact(&pipes[k].0, big(i - 1).len()), big(i - 1));
        }
    }
    let slow = raw(&pipes[1].1);
    let events = rec.wait_fd_removed(slow);
    assert!(events.contains(&Event::Removed(slow, "slow".into())));
    assert_eq!(h.u32("num-handles"), 2);
    h.remove_fd(raw(&pipes[0].1));
    h.remove_fd(raw(&pipes[2].1));
    for p in &pipes {
        assert!(is_open(raw(&p.1)));
    }
    drop(pipes);
    h.stop();
}

#[test]
fn signals_follow_the_contract() {
    let mut h = harness(SINK, &[]);
    h.set_src_caps_str(CHECK_CAPS);
    let (r, w) = pipe();
    let fd = raw(&w);
    let stats_in_removed: Arc<Mutex<Option<gst::Structure>>> = Default::default();
    let caller = std::thread::current().id();
    let added_on_caller = Arc::new(Mutex::new(None));
    {
        let a = added_on_caller.clone();
        h.sink().connect("client-added", false, move |_| {
            *a.lock().unwrap() = Some(std::thread::current().id() == caller);
            None
        });
        let s = stats_in_removed.clone();
        h.sink().connect("client-removed", false, move |args| {
            let sink = args[0].get::<gst::Element>().unwrap();
            let fd = args[1].get::<i32>().unwrap();
            *s.lock().unwrap() = Some(sink.emit_by_name::<gst::Structure>("get-stats", &[&fd]));
            None
        });
    }
    let rec = Recorder::attach(&h.sink());
    h.add_fd(fd);
    assert_eq!(
        *added_on_caller.lock().unwrap(),
        Some(true),
        "client-added not emitted synchronously in add"
    );
    h.push_bytes(b"abcdef", false);
    assert_eq!(read_exact(&r, 6), b"abcdef");
    h.wait_u64("bytes-served", 6);
    h.remove_fd(fd);
    // remove is synchronous: both signals, in order, before it returned.
    assert_eq!(
        rec.events(),
        vec![
            Event::Added(fd),
            Event::Removed(fd, "removed".into()),
            Event::FdRemoved(fd)
        ]
    );
    let stats = stats_in_removed
        .lock()
        .unwrap()
        .clone()
        .expect("get-stats in client-removed");
    assert_eq!(stats.name(), "multihandlesink-stats");
    assert_eq!(stats.get::<u64>("bytes-sent").unwrap(), 6);
    for field in [
        "connect-time",
        "connect-time-monotonic",
        "disconnect-time",
        "disconnect-time-monotonic",
        "connect-duration",
        "last-activity-time",
        "last-activity-time-monotonic",
        "buffers-dropped",
        "dropped-buffers",
        "first-buffer-ts",
        "last-buffer-ts",
    ] {
        assert!(stats.get::<u64>(field).is_ok(), "missing {field}");
    }
    assert!(
        stats.get::<u64>("disconnect-time").unwrap() >= stats.get::<u64>("connect-time").unwrap()
    );
    assert!(stats.get::<u64>("disconnect-time").unwrap() > 0);
    // A second remove is only a warning.
    h.remove_fd(fd);
    assert_eq!(rec.events().len(), 3);
    // The element forgot the fd: the same number can be added again at once.
    h.add_fd(fd);
    assert_eq!(h.u32("num-handles"), 1);
    h.push_bytes(b"again", false);
    assert_eq!(read_exact(&r, 5), b"again");
    assert!(is_open(fd));
    h.stop();
    // NULL removed it with the signals.
    assert_eq!(rec.events().last(), Some(&Event::FdRemoved(fd)));
}

#[test]
fn duplicate_add_only_signals_duplicate() {
    let mut h = harness(SINK, &[]);
    h.set_src_caps_str(CHECK_CAPS);
    let rec = Recorder::attach(&h.sink());
    let (r, w) = pipe();
    h.add_fd(raw(&w));
    h.add_fd(raw(&w));
    assert_eq!(
        rec.events(),
        vec![
            Event::Added(raw(&w)),
            Event::Removed(raw(&w), "duplicate".into())
        ]
    );
    h.push_bytes(b"still", false);
    assert_eq!(read_exact(&r, 5), b"still");
    assert_eq!(h.u32("num-handles"), 1);
    h.stop();
}

#[test]
fn get_stats_of_unknown_fd_is_empty_structure() {
    let h = harness(SINK, &[]);
    let s = h
        .sink()
        .emit_by_name::<gst::Structure>("get-stats", &[&12345i32]);
    assert_eq!(s.n_fields(), 0);
    h.stop();
}

#[test]
fn bad_fds_are_removed_from_the_io_side_and_harm_nobody() {
    let mut h = harness(SINK, &[]);
    h.set_src_caps_str(CHECK_CAPS);
    let rec = Recorder::attach(&h.sink());
    let (r, w) = pipe();
    h.add_fd(raw(&w));
    let dir = std::fs::File::open(std::env::temp_dir()).unwrap();
    // A number far above what the test process opens, so no other test reuses it.
    let closed = {
        let (a, b) = pipe();
        let n = nix::fcntl::fcntl(&b, nix::fcntl::FcntlArg::F_DUPFD(5000)).unwrap();
        drop((a, b));
        nix::unistd::close(n).unwrap();
        n
    };
    let (read_end_only, _keep) = pipe();
    for bad in [-1, closed, dir.as_raw_fd(), raw(&read_end_only)] {
        h.add_fd(bad);
        let events = rec.wait_fd_removed(bad);
        let at = |e: Event| events.iter().position(|x| *x == e);
        // Added first, then removed (from the IO side), then forgotten.
        let added = at(Event::Added(bad)).expect("client-added");
        let removed = at(Event::Removed(bad, "error".into())).expect("client-removed(error)");
        assert!(
            added < removed && removed < at(Event::FdRemoved(bad)).unwrap(),
            "{events:?}"
        );
    }
    h.push_bytes(b"good", false);
    assert_eq!(read_exact(&r, 4), b"good");
    assert!(is_open(dir.as_raw_fd()));
    h.stop();
}

#[test]
fn properties_by_nick_and_aliases() {
    init();
    let sink = gst::ElementFactory::make(SINK).build().unwrap();
    sink.set_property_from_str("sync-method", "burst-keyframe");
    sink.set_property_from_str("unit-format", "time");
    sink.set_property_from_str("recover-policy", "keyframe");
    assert_eq!(
        gst::glib::EnumValue::from_value(&sink.property_value("sync-method"))
            .unwrap()
            .1
            .value(),
        4
    );
    assert_eq!(
        sink.property::<gst::Format>("unit-format"),
        gst::Format::Time
    );
    sink.set_property("buffers-max", 7i32);
    assert_eq!(sink.property::<i64>("units-max"), 7);
    sink.set_property("units-soft-max", 5i64);
    assert_eq!(sink.property::<i32>("buffers-soft-max"), 5);
    let launched = gst::parse::launch(
        "fakesrc num-buffers=0 ! rsmultifdsink sync-method=burst-with-keyframe burst-format=bytes",
    )
    .unwrap()
    .downcast::<gst::Bin>()
    .unwrap();
    let s = launched.iterate_sinks().next().unwrap().unwrap();
    assert_eq!(
        gst::glib::EnumValue::from_value(&s.property_value("sync-method"))
            .unwrap()
            .1
            .nick(),
        "burst-with-keyframe"
    );
    assert_eq!(
        s.property::<gst::Format>("burst-format"),
        gst::Format::Bytes
    );
}

#[test]
fn remove_flush_sends_what_is_queued_then_removes() {
    let mut h = harness(SINK, &[]);
    h.set_src_caps_str(CHECK_CAPS);
    let rec = Recorder::attach(&h.sink());
    let (r, w) = pipe();
    let fd = raw(&w);
    h.add_fd(fd);
    // Fill the pipe so the client has data queued when flushed.
    let big = vec![7u8; 256 * 1024];
    h.push_bytes(&big, false);
    h.sink().emit_by_name::<()>("remove-flush", &[&fd]);
    h.push_bytes(b"newer", false);
    assert_eq!(read_exact(&r, big.len()), big);
    rec.wait_fd_removed(fd);
    assert!(rec.events().contains(&Event::Removed(fd, "removed".into())));
    assert_nothing_readable(&r);
    assert!(is_open(fd));
    h.stop();
}

#[test]
fn clear_removes_everyone() {
    let h = harness(SINK, &[]);
    let rec = Recorder::attach(&h.sink());
    let pipes: Vec<_> = (0..3).map(|_| pipe()).collect();
    for p in &pipes {
        h.add_fd(raw(&p.1));
    }
    h.sink().emit_by_name::<()>("clear", &[]);
    assert_eq!(h.u32("num-handles"), 0);
    for p in &pipes {
        assert!(
            rec.events()
                .contains(&Event::Removed(raw(&p.1), "removed".into()))
        );
        assert!(rec.events().contains(&Event::FdRemoved(raw(&p.1))));
    }
    h.stop();
}

#[test]
fn same_bytes_as_the_c_multifdsink() {
    init();
    assert!(
        gst::ElementFactory::find("multifdsink").is_some(),
        "the C multifdsink (gstreamer1.0-plugins-base) is required"
    );
    let mut captured = Vec::new();
    for factory in [SINK, "multifdsink"] {
        let mut h = harness(factory, &check_suite::C_COMPARISON_PROPS);
        let rec = Recorder::attach(&h.sink());
        h.set_src_caps(streamheader_caps(&[b"HEAD1", b"HEAD2"]));
        let mut clients = Vec::new();
        for (i, data) in (0..30u32).map(b16).enumerate() {
            // Clients join at different points of the stream.
            if i % 10 == 5 {
                let p = pipe();
                h.add_fd(raw(&p.1));
                clients.push(p);
            }
            h.push_bytes(&data, i % 3 != 0);
            if i % 10 == 5 {
                // The C element places a new client when its IO thread gets to it:
                // wait for that, so both place it at the same point of the stream.
                wait_readable(&clients.last().unwrap().0);
            }
        }
        // Flush everyone: what is queued for them is written, then they go.
        for p in &clients {
            h.sink().emit_by_name::<()>("remove-flush", &[&raw(&p.1)]);
        }
        h.push_bytes(b"not sent", false);
        let bytes: Vec<Vec<u8>> = clients
            .iter()
            .map(|p| {
                rec.wait_fd_removed(raw(&p.1));
                read_available(&p.0)
            })
            .collect();
        captured.push(bytes);
        h.stop();
    }
    assert!(
        captured[0].iter().all(|b| b.starts_with(b"HEAD1HEAD2")),
        "{:?}",
        captured[0]
    );
    check_suite::assert_same_bytes_as_c(
        &captured[0],
        &captured[1],
        "rsmultifdsink and multifdsink wrote different bytes",
    );
}

#[test]
fn io_threads_spread_clients_and_every_one_gets_the_same_bytes() {
    init();
    let sink = gst::ElementFactory::make(SINK).build().unwrap();
    sink.set_property("io-threads", 4u32);
    assert_eq!(sink.property::<u32>("io-threads"), 4);
    drop(sink);
    let mut h = harness(SINK, &[("io-threads", "4"), ("sync-method", "latest")]);
    // Changing the thread count while running is refused (and harmless).
    h.sink().set_property("io-threads", 2u32);
    assert_eq!(h.sink().property::<u32>("io-threads"), 4);
    let rec = Recorder::attach(&h.sink());
    h.set_src_caps(streamheader_caps(&[b"HEAD"]));
    let pipes: Vec<_> = (0..20).map(|_| pipe()).collect();
    for p in &pipes {
        h.add_fd(raw(&p.1));
    }
    assert_eq!(h.u32("num-handles"), 20);
    let mut want = b"HEAD".to_vec();
    for i in 0..50 {
        h.push_bytes(&b16(i), i % 5 != 0);
        want.extend(b16(i));
    }
    for p in &pipes {
        assert_eq!(read_exact(&p.0, want.len()), want);
    }
    h.wait_u64("bytes-served", 20 * want.len() as u64);
    assert_eq!(h.u64("bytes-to-serve"), 50 * 16);
    // Trimming happens as buffers arrive, so how many are still queued depends on
    // how far the threads had written then: at most all of them.
    assert!(h.u32("buffers-queued") <= 50);
    // Removal and re-adding work whichever thread holds the client.
    let fd = raw(&pipes[7].1);
    h.remove_fd(fd);
    assert_eq!(rec.events().last(), Some(&Event::FdRemoved(fd)));
    h.add_fd(fd);
    h.push_bytes(b"after", false);
    assert_eq!(read_exact(&pipes[7].0, 4 + 5), b"HEADafter");
    assert_eq!(h.u32("num-handles"), 20);
    h.stop();
    assert_eq!(
        rec.events()
            .iter()
            .filter(|e| matches!(e, Event::FdRemoved(_)))
            .count(),
        21
    );
}

/// `io-uring` (off by default) can be turned on and off while streaming: pipes and
/// sockets, written through io_uring or with system calls, get the same exact bytes.
#[test]
fn io_uring_on_and_off_while_streaming_gives_the_same_bytes() {
    init();
    let sink = gst::ElementFactory::make(SINK).build().unwrap();
    assert!(!sink.property::<bool>("io-uring"));
    drop(sink);
    let mut h = harness(SINK, &[("io-uring", "true"), ("sync-method", "latest")]);
    assert!(h.sink().property::<bool>("io-uring"));
    h.set_src_caps(streamheader_caps(&[b"HEAD"]));
    let pipes: Vec<_> = (0..8).map(|_| pipe()).collect();
    let sockets: Vec<_> = (0..8)
        .map(|_| std::os::unix::net::UnixStream::pair().unwrap())
        .collect();
    for fd in pipes.iter().map(|p| raw(&p.1)) {
        h.add_fd(fd);
    }
    for s in &sockets {
        h.add_fd(s.0.as_raw_fd());
    }
    let mut want = b"HEAD".to_vec();
    // 100 KiB buffers: more than a pipe holds, so writes are partial.
    for (i, on) in [true, false, true].into_iter().enumerate() {
        h.sink().set_property("io-uring", on);
        for j in 0..4u32 {
            let data = b16(i as u32 * 4 + j).repeat(6400);
            h.push_bytes(&data, j != 0);
            want.extend(data);
        }
    }
    for p in &pipes {
        assert_eq!(read_exact(&p.0, want.len()), want);
    }
    for s in &sockets {
        assert_eq!(read_exact(&s.1, want.len()), want);
    }
    h.wait_u64("bytes-served", 16 * want.len() as u64);
    h.stop();
}

#[test]
fn no_buffer_or_streamheader_is_kept_after_null() {
    let mut h = harness(SINK, &[("buffers-min", "100")]);
    let header = buffer(b"HEAD", false, true);
    let caps = gst::Caps::builder(CHECK_CAPS)
        .field("streamheader", gst::Array::new([header.to_send_value()]))
        .build();
    h.set_src_caps(caps);
    let (r, w) = pipe();
    h.add_fd(raw(&w));
    let data = buffer(b"data", false, false);
    h.push_ok(data.clone());
    assert_eq!(read_exact(&r, 8), b"HEADdata");
    // Writable means ours is the only reference.
    assert!(
        !data.is_writable(),
        "the queue holds the buffer while running"
    );
    h.stop();
    assert!(data.is_writable(), "a queued buffer outlived NULL");
}

/// `zero-copy` (off by default): the same scenario with it off, on for every buffer
/// (`zero-copy-min-clients=0`) and on from the second client (so the first client's
/// queue holds buffers sent both ways) gives every client the same bytes, over pipes
/// and UNIX sockets, with buffers larger than either holds (partial writes), a
/// streamheader and clients joining mid-stream.
#[test]
fn zero_copy_gives_the_same_bytes_as_writev() {
    init();
    let sink = gst::ElementFactory::make(SINK).build().unwrap();
    assert!(!sink.property::<bool>("zero-copy"));
    sink.set_property("zero-copy", true);
    assert!(sink.property::<bool>("zero-copy"));
    assert_eq!(sink.property::<u32>("zero-copy-min-clients"), 64);
    let mut captured = Vec::new();
    for (zero_copy, min_clients) in [("false", "64"), ("true", "0"), ("true", "2")] {
        let mut h = harness(
            SINK,
            &[
                ("zero-copy", zero_copy),
                ("zero-copy-min-clients", min_clients),
                ("sync-method", "burst"),
                ("burst-format", "bytes"),
                ("burst-value", "300000"),
                ("bytes-min", "600000"),
            ],
        );
        assert_eq!(h.sink().property::<bool>("zero-copy"), zero_copy == "true");
        let rec = Recorder::attach(&h.sink());
        h.set_src_caps(streamheader_caps(&[b"HEAD1", b"HEAD2"]));
        let mut clients: Vec<(OwnedFd, OwnedFd)> = Vec::new();
        let mut read = Vec::new();
        for i in 0..12u32 {
            if i % 4 == 1 {
                let p = if i % 8 == 1 {
                    pipe()
                } else {
                    let (a, b) = UnixStream::pair().unwrap();
                    (OwnedFd::from(b), OwnedFd::from(a))
                };
                h.add_fd(raw(&p.1));
                clients.push(p);
                read.push(Vec::new());
            }
            let data: Vec<u8> = b16(i).repeat(10_000 + 1000 * i as usize);
            h.push_bytes(&data, i % 3 != 0);
            // Readers take what is there, so later buffers meet full fds.
            for (p, got) in clients.iter().zip(read.iter_mut()) {
                got.extend(read_available(&p.0));
            }
        }
        for p in &clients {
            h.sink().emit_by_name::<()>("remove-flush", &[&raw(&p.1)]);
        }
        // Each flush ends once its reader took everything.
        for (p, got) in clients.iter().zip(read.iter_mut()) {
            let start = std::time::Instant::now();
            while !rec.events().contains(&Event::FdRemoved(raw(&p.1))) {
                assert!(
                    start.elapsed() < *DEADLINE,
                    "flush of fd {} never ended",
                    raw(&p.1)
                );
                let mut fds = [PollFd::new(p.0.as_fd(), PollFlags::POLLIN)];
                poll(&mut fds, PollTimeout::from(10u8)).unwrap();
                got.extend(read_available(&p.0));
            }
            got.extend(read_available(&p.0));
        }
        captured.push(read);
        h.stop();
    }
    assert!(captured[0].iter().all(|b| b.starts_with(b"HEAD1HEAD2")));
    for run in &captured[1..] {
        assert!(
            captured[0] == *run,
            "zero-copy changed the bytes: {:?} vs {:?} bytes",
            captured[0].iter().map(Vec::len).collect::<Vec<_>>(),
            run.iter().map(Vec::len).collect::<Vec<_>>()
        );
    }
}
