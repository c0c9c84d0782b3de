//! The origin → edge feed over GDP (issue 12, point 1), with real pipelines: what
//! `gdppay` of GStreamer 1.22 pushes, where a client of the origin's feed port
//! starts, and that an edge (`tcpclientsrc ! gdpdepay ! rstcpserversink http=true`)
//! starts each of its viewers on a keyframe with the streamheader first.

mod common;

use std::io::Read;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Running, assert_no_error, current_port, wait_until};
use gst::prelude::*;
use gstrsmultifdsink::gdp::{self, PacketHeader, PayloadType, buffer_flags};

/// Starts `description` (which has one `rstcpserversink name=sink port=0`) and
/// returns it with the port it listens on.
fn start(description: &str) -> (Running, u16) {
    let pipeline = Running::launch(description);
    let port = current_port(&pipeline.get("sink"));
    (pipeline, port)
}

/// One GDP packet read from a stream.
struct Packet {
    header: PacketHeader,
    bytes: Vec<u8>,
}

fn read_packet(conn: &mut TcpStream) -> Packet {
    let mut bytes = vec![0u8; gdp::HEADER_LEN];
    conn.read_exact(&mut bytes).expect("a GDP header");
    let header = PacketHeader::parse(&bytes).expect("a valid GDP header");
    let mut payload = vec![0u8; header.payload_len as usize];
    conn.read_exact(&mut payload).expect("a GDP payload");
    bytes.extend_from_slice(&payload);
    Packet { header, bytes }
}

/// A data packet: a buffer that is not a header.
fn is_data(p: &PacketHeader) -> bool {
    p.payload_type == PayloadType::Buffer && !p.has_flag(buffer_flags::HEADER)
}

const WEBM_ORIGIN: &str = "videotestsrc is-live=true ! video/x-raw,width=320,height=240,framerate=30/1 ! \
     vp8enc deadline=1 keyframe-max-dist=30 ! webmmux streamable=true ! gdppay ! \
     rstcpserversink name=sink port=0 sync-method=latest-keyframe";

/// GStreamer 1.22's `gdppay`, as found: the caps carry a streamheader of
/// HEADER-flagged packets (the sticky events, the caps, and the payload's own
/// streamheader buffers); the buffers it pushes carry `HEADER` where the payload
/// buffer had it, but never `DELTA_UNIT`: that flag is only inside the packet
/// header. This is why the sinks read the packet header (if a later GStreamer
/// copies the flag, this test says so and the header reading still agrees).
#[test]
fn gdppay_carries_delta_unit_only_in_its_packet_headers() {
    common::init();
    let pipeline = gst::parse::launch(
        "videotestsrc num-buffers=60 ! video/x-raw,width=160,height=120 ! \
         vp8enc deadline=1 keyframe-max-dist=10 ! webmmux streamable=true ! gdppay ! \
         fakesink name=out signal-handoffs=true sync=false",
    )
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let pipeline = Running::guard(pipeline);
    let pushed: Arc<Mutex<Vec<gst::Buffer>>> = Default::default();
    let p = pushed.clone();
    let sink = pipeline.by_name("out").unwrap();
    sink.connect("handoff", false, move |args| {
        p.lock()
            .unwrap()
            .push(args[1].get::<gst::Buffer>().unwrap());
        None
    });
    pipeline.set_state(gst::State::Playing).unwrap();
    let msg = pipeline
        .bus()
        .unwrap()
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(30),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        )
        .expect("the pipeline ends");
    assert_eq!(msg.type_(), gst::MessageType::Eos, "{msg:?}");
    let caps = sink.static_pad("sink").unwrap().current_caps().unwrap();
    pipeline.set_state(gst::State::Null).unwrap();

    let s = caps.structure(0).unwrap();
    assert_eq!(s.name(), "application/x-gdp");
    let streamheader: Vec<gst::Buffer> = s
        .get::<gst::Array>("streamheader")
        .expect("gdppay's caps have a streamheader")
        .iter()
        .map(|v| v.get::<gst::Buffer>().unwrap())
        .collect();
    let mut kinds = Vec::new();
    for b in &streamheader {
        assert!(b.flags().contains(gst::BufferFlags::HEADER));
        let map = b.map_readable().unwrap();
        let h = PacketHeader::of_packet(&map).expect("one GDP packet per buffer");
        kinds.push(h.payload_type);
        if h.payload_type == PayloadType::Buffer {
            // The payload's own streamheader (WebM's EBML header and tracks).
            assert!(h.has_flag(buffer_flags::HEADER));
        }
    }
    assert!(kinds.contains(&PayloadType::Caps), "{kinds:?}");
    assert!(kinds.contains(&PayloadType::Buffer), "{kinds:?}");

    let pushed = pushed.lock().unwrap();
    let (mut data, mut delta_inside, mut delta_outside, mut keyframes) = (0, 0, 0, 0);
    for b in pushed.iter() {
        let map = b.map_readable().unwrap();
        let h = PacketHeader::of_packet(&map).expect("one GDP packet per buffer");
        // HEADER is copied both ways.
        assert_eq!(
            b.flags().contains(gst::BufferFlags::HEADER),
            h.payload_type != PayloadType::Buffer || h.has_flag(buffer_flags::HEADER),
            "{h:?} pushed with {:?}",
            b.flags()
        );
        if !is_data(&h) {
            continue;
        }
        data += 1;
        if h.has_flag(buffer_flags::DELTA_UNIT) {
            delta_inside += 1;
        } else {
            keyframes += 1;
        }
        if b.flags().contains(gst::BufferFlags::DELTA_UNIT) {
            delta_outside += 1;
        }
    }
    // webmmux marks the start of each cluster (which begins on a keyframe, every
    // ~0.67 s here) as the sync point, everything else as delta: 2 s of video.
    assert!(keyframes >= 2, "sync points in 2 s of WebM: {keyframes}");
    assert!(delta_inside > data / 2, "{delta_inside} of {data}");
    assert_eq!(
        delta_outside, 0,
        "gdppay now copies DELTA_UNIT to its buffers: reading the packet header is no longer needed"
    );
}

/// Exact bytes through `rsmultifdsink` with `application/x-gdp` caps: a
/// latest-keyframe client starts on the packet of a keyframe (flags from the
/// packet header, the buffers pushed carry none, as from gdppay), and a
/// HEADER-flagged packet that is not in the caps' streamheader (a superseded
/// caps packet) is never sent as data, even to a client that takes whatever
/// comes next.
#[test]
fn gdp_packets_place_clients_and_headers_stay_in_the_streamheader() {
    use common::SinkHarness;
    let mut h = common::harness("rsmultifdsink", &[("sync-method", "latest-keyframe")]);
    let stream_start = gdp::packet(PayloadType::Event(0x280e), 0, None, b"stream-start\0");
    let caps_now = gdp::packet(
        PayloadType::Caps,
        0,
        None,
        b"video/mpegts, streamheader=(buffer)< 47 >\0",
    );
    let caps_before = gdp::packet(PayloadType::Caps, 0, None, b"video/mpegts\0");
    h.set_src_caps(common::streamheader_caps_of(
        "application/x-gdp",
        &[&stream_start, &caps_now],
    ));
    let packet = |flags: u16, pts: u64, data: &[u8]| {
        gdp::packet(PayloadType::Buffer, flags, Some(pts), data)
    };
    let key1 = packet(0, 0, b"key one");
    let delta1 = packet(buffer_flags::DELTA_UNIT, 1, b"delta one");
    let key2 = packet(0, 2, b"key two");
    let delta2 = packet(buffer_flags::DELTA_UNIT, 3, b"delta two");
    // The early client takes whatever comes next (sync-method latest).
    let (early_read, early_write) = common::pipe();
    common::add_full(
        &h.sink(),
        common::raw(&early_write),
        "latest",
        (gst::Format::Undefined, 0),
        (gst::Format::Undefined, 0),
    );
    // What gdppay pushes: its queued HEADER packets (one superseded), then data,
    // none of it flagged DELTA_UNIT.
    for p in [&stream_start, &caps_before, &caps_now] {
        h.push_ok(common::buffer(p, false, true));
    }
    for p in [&key1, &delta1, &key2, &delta2] {
        h.push_ok(common::buffer(p, false, false));
    }
    let (late_read, late_write) = common::pipe();
    h.add_fd(common::raw(&late_write));
    let last = packet(buffer_flags::DELTA_UNIT, 4, b"delta three");
    h.push_ok(common::buffer(&last, false, false));

    let streamheader = [stream_start.clone(), caps_now.clone()].concat();
    let early: Vec<u8> = [&streamheader, &key1, &delta1, &key2, &delta2, &last]
        .into_iter()
        .flatten()
        .copied()
        .collect();
    assert_eq!(common::read_exact(&early_read, early.len()), early);
    // The late client starts on the newest keyframe's packet, not the newest packet.
    let late: Vec<u8> = [&streamheader, &key2, &delta2, &last]
        .into_iter()
        .flatten()
        .copied()
        .collect();
    assert_eq!(common::read_exact(&late_read, late.len()), late);
    h.stop();
    common::assert_nothing_readable(&early_read);
    common::assert_nothing_readable(&late_read);
}

/// A client of the origin's feed port (`gdppay ! rstcpserversink
/// sync-method=latest-keyframe`) gets the GDP streamheader, then starts on a
/// packet of a keyframe, wherever in the GOP it joins. Without the packet
/// header's flags every packet counted as a keyframe and clients started on any.
#[test]
fn feed_port_starts_clients_on_a_keyframe() {
    common::init();
    let (origin, port) = start(WEBM_ORIGIN);
    let sink = origin.by_name("sink").unwrap();
    let served = || sink.property::<u64>("bytes-to-serve");
    wait_until("the origin streams", || served() > 0);
    // Join after different numbers of new buffers, so clients land all over the GOP.
    for (i, buffers_between) in [1, 4, 9, 13, 22, 31].into_iter().enumerate() {
        for _ in 0..buffers_between {
            let before = served();
            wait_until("a buffer", || served() != before);
        }
        assert_no_error(&origin, "origin");
        let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.set_read_timeout(Some(*common::DEADLINE)).unwrap();
        let mut before_data = Vec::new();
        let first = loop {
            let p = read_packet(&mut conn);
            if is_data(&p.header) {
                break p;
            }
            before_data.push(p.header.payload_type);
        };
        assert!(
            before_data.contains(&PayloadType::Caps),
            "client {i}: no caps packet before the data: {before_data:?}"
        );
        assert!(
            !first.header.has_flag(buffer_flags::DELTA_UNIT),
            "client {i} started on a delta unit: {:?}",
            first.header
        );
        assert!(first.bytes.len() > gdp::HEADER_LEN);
    }
    origin.set_state(gst::State::Null).unwrap();
}

/// The origin's feed and an edge in one process: `tcpclientsrc ! gdpdepay !
/// rstcpserversink http=true sync=false sync-method=latest-keyframe`. Viewers
/// joining at different times get a stream that starts with the format's
/// streamheader and whose first frame is a keyframe, and it decodes.
fn edge_serves_viewers_from_a_keyframe(
    origin: &str,
    magic: &[u8],
    content_type: &str,
    demuxer: &str,
    decoder: &str,
) {
    common::init();
    let (origin, origin_port) = start(origin);
    let (edge, edge_port) = start(&format!(
        "tcpclientsrc host=127.0.0.1 port={origin_port} ! gdpdepay ! \
         rstcpserversink name=sink http=true port=0 sync=false sync-method=latest-keyframe"
    ));
    let edge_sink = edge.by_name("sink").unwrap();
    wait_until("the edge receives the feed", || {
        assert_no_error(&edge, "edge");
        edge_sink.property::<u64>("bytes-to-serve") > 0
    });
    for i in 0..3 {
        // Each viewer a few buffers later than the one before.
        let before = edge_sink.property::<u64>("bytes-to-serve");
        wait_until("more data at the edge", || {
            edge_sink.property::<u64>("bytes-to-serve") > before + 20_000 * i
        });
        let (head, body) = common::http_fetch(edge_port, "/", 150_000, Duration::from_secs(20));
        assert_no_error(&origin, "origin");
        assert_no_error(&edge, "edge");
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
        assert!(
            head.contains(&format!("Content-Type: {content_type}")),
            "{head}"
        );
        assert_eq!(
            &body[..magic.len()],
            magic,
            "viewer {i}: no streamheader first"
        );
        common::decode_from_start(&body, demuxer, decoder)
            .assert_starts_on_keyframe(&format!("viewer {i}"));
    }
    edge.set_state(gst::State::Null).unwrap();
    origin.set_state(gst::State::Null).unwrap();
}

#[test]
fn edge_serves_webm_viewers_from_a_keyframe() {
    edge_serves_viewers_from_a_keyframe(
        WEBM_ORIGIN,
        &[0x1a, 0x45, 0xdf, 0xa3],
        "video/webm",
        "matroskademux",
        "vp8dec",
    );
}

#[test]
fn edge_serves_ogg_viewers_from_a_keyframe() {
    edge_serves_viewers_from_a_keyframe(
        "videotestsrc is-live=true ! video/x-raw,width=320,height=240,framerate=30/1 ! \
         theoraenc keyframe-force=30 ! oggmux ! gdppay ! \
         rstcpserversink name=sink port=0 sync-method=latest-keyframe",
        b"OggS",
        "application/ogg",
        "oggdemux",
        "theoradec",
    );
}

/// The README's origin and edge lines (between the `feed-recipes` markers), run
/// verbatim but for the ports: a viewer of the edge gets a stream that decodes
/// from a keyframe.
#[test]
fn readme_origin_and_edge_lines_play() {
    common::init();
    let lines: Vec<&str> = common::readme_block("feed-recipes")
        .lines()
        .filter_map(|l| l.strip_prefix("gst-launch-1.0 "))
        .collect();
    let origin_line = lines
        .iter()
        .find(|l| l.contains("gdppay"))
        .expect("an origin line");
    let edge_line = lines
        .iter()
        .find(|l| l.contains("gdpdepay"))
        .expect("an edge line");
    let with_ports = |line: &str, feed_port: Option<u16>| {
        // tcpclientsrc's port (before the first `!`) is the origin's; a sink's is 0.
        let mut in_source = true;
        line.split_whitespace()
            .map(|w| {
                if w == "!" {
                    in_source = false;
                }
                match (w.starts_with("port="), in_source, feed_port) {
                    (true, true, Some(p)) => format!("port={p}"),
                    (true, _, _) => "port=0".to_string(),
                    _ => w.to_string(),
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let launch = |description: String| {
        let pipeline = Running::launch(&description);
        let port = current_port(&pipeline.tcp_server_sink());
        (pipeline, port)
    };
    let (origin, origin_port) = launch(with_ports(origin_line, None));
    let (edge, edge_port) = launch(with_ports(edge_line, Some(origin_port)));
    let (head, body) = common::http_fetch(edge_port, "/", 100_000, Duration::from_secs(20));
    assert_no_error(&origin, "origin");
    assert_no_error(&edge, "edge");
    assert!(head.contains("Content-Type: video/webm"), "{head}");
    common::decode_from_start(&body, "matroskademux", "vp8dec")
        .assert_starts_on_keyframe("the edge's viewer");
    edge.set_state(gst::State::Null).unwrap();
    origin.set_state(gst::State::Null).unwrap();
}

/// Buffers under `application/x-gdp` caps that are not one whole GDP packet
/// (garbage, a cut packet, a packet with a broken header CRC) keep their own
/// flags: a keyframe client starts on the first one not flagged delta, and every
/// byte reaches it.
#[test]
fn non_gdp_buffers_under_gdp_caps_keep_their_own_flags() {
    use common::SinkHarness;
    let mut h = common::harness("rsmultifdsink", &[("sync-method", "latest-keyframe")]);
    h.set_src_caps(gst::Caps::builder("application/x-gdp").build());
    let whole = gdp::packet(PayloadType::Buffer, buffer_flags::DELTA_UNIT, None, b"x");
    let mut broken = whole.clone();
    broken[42] ^= 0x20; // DELTA_UNIT cleared, CRC no longer matching
    let cut = &whole[..whole.len() - 1];
    let (read, write) = common::pipe();
    h.add_fd(common::raw(&write));
    // Flagged delta: not a place to start, even if its bytes say otherwise.
    h.push_ok(common::buffer(&broken, true, false));
    for data in [&b"garbage"[..], cut, &broken] {
        h.push_ok(common::buffer(data, false, false));
    }
    let want: Vec<u8> = [&b"garbage"[..], cut, &broken].concat();
    assert_eq!(common::read_exact(&read, want.len()), want);
    h.stop();
    common::assert_nothing_readable(&read);
}
