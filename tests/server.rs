//! `rstcpserversink` with real clients: raw TCP to `tcpclientsrc` and plain
//! sockets; HTTP to plain sockets, `souphttpsrc ! decodebin`, `curl` and a
//! headless Chromium; bad, slow, flooding and resetting clients next to a playing
//! one; IPv6; a keyframe requested for a late joiner.
//!
//! Every server listens on 127.0.0.1 (or ::1) with `port=0` and is reached through
//! `current-port`. Waits are on conditions with deadlines, never on sleeps.

mod common;

use std::io::{ErrorKind, Write};
use std::net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::http::{
    connect, find, handles, read_head, read_some, read_to_eof, read_until_closed, wait_handles,
};
use common::*;
use gst::prelude::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// An `rstcpserversink` on 127.0.0.1, any free port, fed through the harness.
fn server(props: &[(&str, &str)]) -> (Harness, u16) {
    let mut all = vec![("host", "127.0.0.1"), ("port", "0")];
    all.extend_from_slice(props);
    let h = harness("rstcpserversink", &all);
    let port = current_port(&h.sink());
    (h, port)
}

fn request(port: u16, req: &[u8]) -> TcpStream {
    let mut s = connect(port);
    s.write_all(req).unwrap();
    s
}

fn get(port: u16, path: &str) -> TcpStream {
    request(
        port,
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes(),
    )
}

/// Reads until `have` holds `n` bytes.
fn read_more(s: &TcpStream, mut have: Vec<u8>, n: usize) -> Vec<u8> {
    if have.len() < n {
        have.extend(read_exact(s, n - have.len()));
    }
    have
}

fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a str> {
    std::str::from_utf8(head)
        .unwrap()
        .split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(": "))
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// `HTTP/1.0 200 OK`, the media type, never cached, no length: a live stream.
fn assert_stream_head(head: &[u8], content_type: &str) {
    let text = String::from_utf8_lossy(head);
    let want =
        format!("HTTP/1.0 200 OK\r\nContent-Type: {content_type}\r\nCache-Control: no-cache\r\n");
    assert!(head.starts_with(want.as_bytes()), "head: {text:?}");
    assert!(head.ends_with(b"\r\n\r\n"), "head: {text:?}");
    assert_eq!(header(head, "Content-Length"), None, "head: {text:?}");
}

/// The connection gets exactly one refusal head, no body, then EOF.
fn assert_refused(s: &TcpStream, status: &str) {
    let all = read_to_eof(s);
    let text = String::from_utf8_lossy(&all);
    assert!(
        all.starts_with(format!("{status}\r\n").as_bytes()),
        "want {status}, got {text:?}"
    );
    assert_eq!(
        find(&all, b"\r\n\r\n").map(|i| i + 4),
        Some(all.len()),
        "a head and nothing else: {text:?}"
    );
    assert_eq!(header(&all, "Content-Length"), Some("0"), "{text:?}");
}

/// Server-side sockets of `port` in CLOSE_WAIT: peers gone, fd not closed yet.
fn close_wait_sockets(port: u16) -> usize {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .map(|table| {
            table
                .lines()
                .skip(1)
                .filter(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.len() > 3
                        && f[3] == "08"
                        && f[1]
                            .rsplit(':')
                            .next()
                            .and_then(|h| u16::from_str_radix(h, 16).ok())
                            == Some(port)
                })
                .count()
        })
        .sum()
}

/// Bytes the server side of `client`'s connection (to `port`) has not read yet,
/// from the kernel's table; `None` while the connection is not listed.
fn server_side_unread(port: u16, client: &TcpStream) -> Option<u64> {
    let client_port = client.local_addr().unwrap().port();
    let port_of = |addr: &str| {
        addr.rsplit(':')
            .next()
            .and_then(|h| u16::from_str_radix(h, 16).ok())
    };
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .find_map(|table| {
            table.lines().skip(1).find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() > 4 && port_of(f[1]) == Some(port) && port_of(f[2]) == Some(client_port))
                    .then(|| {
                        f[4].split(':')
                            .nth(1)
                            .and_then(|h| u64::from_str_radix(h, 16).ok())
                    })
                    .flatten()
            })
        })
}

/// Waits until the element has read everything `client` sent.
fn wait_server_read_all(port: u16, client: &TcpStream) {
    wait_until("the server to read the request", || {
        server_side_unread(port, client) == Some(0)
    });
}

/// Every connection the element accepted on `port` and whose peer went away has
/// been closed by the element.
fn wait_no_close_wait(port: u16) {
    let start = Instant::now();
    while close_wait_sockets(port) != 0 {
        assert!(
            start.elapsed() < *DEADLINE,
            "{} accepted sockets of port {port} still open after their peer closed",
            close_wait_sockets(port)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Closes with a RST instead of a FIN.
fn reset(s: TcpStream) {
    nix::sys::socket::setsockopt(
        &s,
        nix::sys::socket::sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .unwrap();
    drop(s);
}

/// Pushes `b16(i)` and checks the playing client gets exactly it.
fn push_and_check(h: &mut Harness, playing: &TcpStream, i: u32) {
    h.push_bytes(&b16(i), !i.is_multiple_of(4));
    assert_eq!(
        read_exact(playing, 16),
        b16(i),
        "playing client, buffer {i}"
    );
}

/// `client` gets the stream: with `http` its response head (`HTTP/1.0 200 OK`,
/// `content_type`: [`assert_stream_head`]), then exactly `body`.
fn assert_gets_stream(client: &TcpStream, http: bool, content_type: &str, body: &[u8]) {
    let rest = if http {
        let (head, rest) = read_head(client);
        assert_stream_head(&head, content_type);
        rest
    } else {
        Vec::new()
    };
    assert_eq!(read_more(client, rest, body.len()), body, "http={http}");
}

/// The client that plays beside the ones a test throws at the sink: connects to
/// `port` (sending `GET /` if `http`), waits until it is the sink's only client,
/// pushes `b16(0)` and checks that it gets the response head (if `http`), the
/// streamheader `<h>` (the test set `streamheader_caps(&[b"<h>"])`) and that
/// buffer, exactly.
fn playing_client(h: &mut Harness, port: u16, http: bool) -> TcpStream {
    let playing = if http { get(port, "/") } else { connect(port) };
    wait_handles(&h.sink(), 1);
    h.push_bytes(&b16(0), false);
    let want = [&b"<h>"[..], &b16(0)].concat();
    assert_gets_stream(&playing, http, "application/octet-stream", &want);
    playing
}

/// The live WebM stream of [`WEBM_SERVER`] playing: the pipeline, its sink and
/// port, once the caps with the streamheader are there.
fn webm_server() -> (Running, gst::Element, u16) {
    let server = Running::launch(WEBM_SERVER);
    let sink = server.get("sink");
    let port = current_port(&sink);
    wait_caps(&sink, true);
    (server, sink, port)
}

/// The `fakesink name=out` of a client pipeline got 160x120 raw video.
fn assert_decoded_160x120(out: &gst::Element) {
    let caps = out.static_pad("sink").unwrap().current_caps().unwrap();
    let s = caps.structure(0).unwrap();
    assert_eq!(s.name(), "video/x-raw");
    assert_eq!(s.get::<i32>("width").unwrap(), 160);
    assert_eq!(s.get::<i32>("height").unwrap(), 120);
}

fn count_buffers(pad: &gst::Pad) -> Arc<AtomicUsize> {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
        n2.fetch_add(1, Ordering::SeqCst);
        gst::PadProbeReturn::Ok
    });
    n
}

fn count_handoffs(fakesink: &gst::Element) -> Arc<AtomicUsize> {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    fakesink.connect("handoff", false, move |_| {
        n2.fetch_add(1, Ordering::SeqCst);
        None
    });
    n
}

/// A live VP8/WebM test stream served over HTTP; the README's demo, smaller.
const WEBM_SERVER: &str = "videotestsrc is-live=true ! video/x-raw,width=160,height=120,framerate=30/1 ! \
     vp8enc deadline=1 ! webmmux streamable=true ! \
     rstcpserversink name=sink http=true host=127.0.0.1 port=0 sync-method=latest-keyframe";

// ---------------------------------------------------------------------------
// 1. Raw TCP (http=false)
// ---------------------------------------------------------------------------

/// Like `tcpserversink`: no HTTP, the streamheader and the buffers, byte for byte.
#[test]
fn raw_tcp_client_gets_exact_bytes_without_http() {
    let (mut h, port) = server(&[]);
    assert!(!h.sink().property::<bool>("http"), "HTTP is opt-in");
    let client = connect(port);
    wait_handles(&h.sink(), 1);
    h.set_src_caps(streamheader_caps(&[b"<header1>", b"<header2>"]));
    let mut want = b"<header1><header2>".to_vec();
    for i in 0..10 {
        h.push_bytes(&b16(i), i != 0);
        want.extend(b16(i));
    }
    assert_eq!(read_exact(&client, want.len()), want);
    h.wait_u64("bytes-served", want.len() as u64);
    assert_nothing_readable(&client);
    // A second client joins on the next buffer, after the streamheader.
    let late = connect(port);
    wait_handles(&h.sink(), 2);
    h.push_bytes(&b16(10), true);
    assert_eq!(read_exact(&client, 16), b16(10));
    let mut want_late = b"<header1><header2>".to_vec();
    want_late.extend(b16(10));
    assert_eq!(read_exact(&late, want_late.len()), want_late);
    h.stop();
    assert!(read_to_eof(&client).is_empty());
    assert!(read_to_eof(&late).is_empty());
}

/// `tcpclientsrc ! oggdemux ! theoradec` plays a live Theora/Ogg stream.
#[test]
fn raw_tcp_theora_ogg_plays_in_tcpclientsrc() {
    let server = Running::launch(
        "videotestsrc is-live=true ! video/x-raw,width=160,height=120,framerate=30/1 ! \
         theoraenc keyframe-force=10 ! oggmux ! \
         rstcpserversink name=sink host=127.0.0.1 port=0 sync-method=latest-keyframe",
    );
    let sink = server.get("sink");
    let port = current_port(&sink);
    wait_caps(&sink, true);
    let client = Running::launch(&format!(
        "tcpclientsrc host=127.0.0.1 port={port} ! oggdemux ! theoradec ! \
         fakesink name=out sync=false signal-handoffs=true"
    ));
    let out = client.get("out");
    let frames = count_handoffs(&out);
    wait_until("20 decoded frames", || frames.load(Ordering::SeqCst) >= 20);
    assert_decoded_160x120(&out);
    client.assert_no_error();
    server.assert_no_error();
    assert_eq!(handles(&sink), 1);
}

// ---------------------------------------------------------------------------
// 2. HTTP mode, plain sockets
// ---------------------------------------------------------------------------

fn webm_caps(headers: &[&[u8]]) -> gst::Caps {
    streamheader_caps_of("video/webm", headers)
}

/// GET: the status line, the type from the caps, no-cache, then the streamheader
/// and the data, exactly.
#[test]
fn http_get_gets_head_streamheader_then_data() {
    let (mut h, port) = server(&[("http", "true")]);
    h.set_src_caps(webm_caps(&[b"<ebml>", b"<tracks>"]));
    h.push_bytes(&b16(0), false);
    let client = get(port, "/");
    wait_handles(&h.sink(), 1);
    let mut body_want = b"<ebml><tracks>".to_vec();
    for i in 1..6 {
        h.push_bytes(&b16(i), i % 3 != 0);
        body_want.extend(b16(i));
    }
    assert_gets_stream(&client, true, "video/webm", &body_want);
    // The head is the server's, not the stream's: not counted as served.
    h.wait_u64("bytes-served", body_want.len() as u64);
    assert_nothing_readable(&client);
    h.stop();
    assert!(read_to_eof(&client).is_empty());
}

/// A request that comes before the stream's caps is answered once they arrive,
/// with their Content-Type; one sent slowly after the connection is read as well.
#[test]
fn http_request_before_caps_is_answered_with_their_type() {
    let (mut h, port) = server(&[("http", "true")]);
    let early = get(port, "/");
    // Sending its request in two parts, the second after the first was read.
    let mut slow = request(port, b"GET / HTTP/1.1\r\n");
    // Both read by the element before the caps come.
    wait_server_read_all(port, &early);
    wait_server_read_all(port, &slow);
    assert_nothing_readable(&early);
    assert_eq!(handles(&h.sink()), 0);
    h.set_src_caps(webm_caps(&[b"<ebml>"]));
    let (head, rest) = read_head(&early);
    assert_stream_head(&head, "video/webm");
    wait_handles(&h.sink(), 1);
    slow.write_all(b"Host: x\r\n\r\n").unwrap();
    wait_handles(&h.sink(), 2);
    h.push_bytes(&b16(0), false);
    let mut want = b"<ebml>".to_vec();
    want.extend(b16(0));
    assert_eq!(read_more(&early, rest, want.len()), want);
    let (head, rest) = read_head(&slow);
    assert_stream_head(&head, "video/webm");
    assert_eq!(read_more(&slow, rest, want.len()), want);
    h.stop();
}

/// HEAD: the same head, no body, and the connection is closed.
#[test]
fn http_head_gets_headers_only_and_is_closed() {
    let (mut h, port) = server(&[("http", "true")]);
    h.set_src_caps(webm_caps(&[b"<ebml>"]));
    h.push_bytes(&b16(0), false);
    let client = request(port, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n");
    let all = read_to_eof(&client);
    assert_stream_head(&all, "video/webm");
    assert_eq!(find(&all, b"\r\n\r\n").map(|i| i + 4), Some(all.len()));
    assert_eq!(handles(&h.sink()), 0);
    h.push_bytes(&b16(1), true);
    assert_eq!(handles(&h.sink()), 0);
    wait_no_close_wait(port);
    h.stop();
}

#[test]
fn http_mount_serves_only_its_path() {
    let (mut h, port) = server(&[("http", "true"), ("mount", "/live")]);
    assert_eq!(
        h.sink().property::<Option<String>>("mount").as_deref(),
        Some("/live")
    );
    h.set_src_caps(webm_caps(&[b"<ebml>"]));
    for path in ["/other", "/", "/live/x", "/livex"] {
        assert_refused(&get(port, path), "HTTP/1.0 404 Not Found");
    }
    assert_eq!(handles(&h.sink()), 0);
    // The query string is not part of the path.
    let client = get(port, "/live?token=1");
    wait_handles(&h.sink(), 1);
    h.push_bytes(&b16(0), false);
    let want = [&b"<ebml>"[..], &b16(0)].concat();
    assert_gets_stream(&client, true, "video/webm", &want);
    // Refusals do not touch the client that plays.
    assert_refused(&get(port, "/nope"), "HTTP/1.0 404 Not Found");
    push_and_check(&mut h, &client, 1);
    assert_eq!(handles(&h.sink()), 1);
    h.stop();
}

#[test]
fn http_max_clients_refuses_with_503() {
    let (mut h, port) = server(&[("http", "true"), ("max-clients", "1")]);
    h.set_src_caps(streamheader_caps(&[b"<h>"]));
    let first = playing_client(&mut h, port, true);

    for _ in 0..3 {
        assert_refused(&get(port, "/"), "HTTP/1.0 503 Service Unavailable");
    }
    assert_eq!(handles(&h.sink()), 1);
    push_and_check(&mut h, &first, 1);

    // Once the first one leaves, there is room again.
    drop(first);
    h.push_bytes(&b16(2), true);
    wait_handles(&h.sink(), 0);
    let second = get(port, "/");
    wait_handles(&h.sink(), 1);
    h.push_bytes(&b16(3), true);
    let want = [&b"<h>"[..], &b16(3)].concat();
    assert_gets_stream(&second, true, "application/octet-stream", &want);
    wait_no_close_wait(port);
    h.stop();
}

/// `overload-policy=refuse-clients`: once the sink sheds load (a client that reads
/// nothing lags past `units-max` and skips buffers), new HTTP clients get 503.
#[test]
fn http_refuse_clients_policy_answers_503_while_overloaded() {
    let (mut h, port) = server(&[
        ("http", "true"),
        ("units-max", "4"),
        ("overload-policy", "refuse-clients"),
    ]);
    let bus = gst::Bus::new();
    h.sink().set_bus(Some(&bus));
    h.set_src_caps_str(CHECK_CAPS);
    let _never_reads = get(port, "/");
    wait_handles(&h.sink(), 1);
    // Push until the sink announces the overload (its socket full, it lags and skips).
    let start = Instant::now();
    let mut i = 0u8;
    while bus.pop_filtered(&[gst::MessageType::Warning]).is_none() {
        assert!(start.elapsed() < *DEADLINE, "no overload");
        h.push_bytes(&vec![i; 64 * 1024], !i.is_multiple_of(4));
        i = i.wrapping_add(1);
    }
    // The refusal lasts a second after the last overloaded buffer.
    assert_refused(&get(port, "/"), "HTTP/1.0 503 Service Unavailable");
    h.stop();
}

/// Malformed, non-HTTP, oversized and silent requests are refused and closed while
/// a client that plays keeps getting every byte.
#[test]
fn http_bad_requests_refused_while_a_client_plays() {
    let (mut h, port) = server(&[
        ("http", "true"),
        ("header-timeout", "300000000"),
        ("max-header-size", "256"),
    ]);
    assert_eq!(h.sink().property::<u64>("header-timeout"), 300_000_000);
    h.set_src_caps(streamheader_caps(&[b"<h>"]));
    let playing = playing_client(&mut h, port, true);
    let mut i = 1;

    let bad: [&[u8]; 6] = [
        b"BLAH\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        b"\x00\x01\x02\x03\xff\xfe\xfd\r\n\r\n",
        b"GET /\r\n\r\n",
        b"GET / FTP/1.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
    ];
    for req in bad {
        assert_refused(&request(port, req), "HTTP/1.0 400 Bad Request");
        push_and_check(&mut h, &playing, i);
        i += 1;
    }
    assert_refused(
        &request(port, b"POST / HTTP/1.1\r\n\r\n"),
        "HTTP/1.0 405 Method Not Allowed",
    );
    push_and_check(&mut h, &playing, i);
    i += 1;

    // A head larger than max-header-size, complete or not.
    let mut long = b"GET / HTTP/1.1\r\nX-Padding: ".to_vec();
    long.extend(std::iter::repeat_n(b'a', 300));
    assert_refused(&request(port, &long), "HTTP/1.0 400 Bad Request");
    long.extend_from_slice(b"\r\n\r\n");
    assert_refused(&request(port, &long), "HTTP/1.0 400 Bad Request");
    push_and_check(&mut h, &playing, i);
    i += 1;
    // Far larger than the element reads at once: the 400 still arrives. (The
    // element closes with the rest unread, so the kernel may follow it with a
    // reset; see the report.)
    let mut huge = b"GET / HTTP/1.1\r\nX-Padding: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 64 * 1024));
    let mut s = connect(port);
    let _ = s.write_all(&huge);
    let (got, _reset) = read_until_closed(&s);
    let text = String::from_utf8_lossy(&got);
    assert!(got.starts_with(b"HTTP/1.0 400 Bad Request\r\n"), "{text:?}");
    assert_eq!(
        find(&got, b"\r\n\r\n").map(|i| i + 4),
        Some(got.len()),
        "{text:?}"
    );
    push_and_check(&mut h, &playing, i);
    i += 1;

    // Silent clients get 408 after header-timeout; the stream flows meanwhile.
    let started = Instant::now();
    let silent = connect(port);
    let partial = request(port, b"GET / HTTP/1.1\r\nHost: x\r\n");
    let mut pushed_while_waiting = 0;
    while nix::poll::poll(
        &mut [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&silent),
            nix::poll::PollFlags::POLLIN,
        )],
        nix::poll::PollTimeout::from(20u8),
    )
    .unwrap()
        == 0
    {
        assert!(started.elapsed() < *DEADLINE, "no 408 in time");
        push_and_check(&mut h, &playing, i);
        i += 1;
        pushed_while_waiting += 1;
    }
    assert_refused(&silent, "HTTP/1.0 408 Request Timeout");
    assert_refused(&partial, "HTTP/1.0 408 Request Timeout");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "408 after {waited:?}, before header-timeout"
    );
    assert!(waited < Duration::from_secs(3), "408 only after {waited:?}");
    assert!(pushed_while_waiting > 0);

    push_and_check(&mut h, &playing, i);
    assert_eq!(handles(&h.sink()), 1);
    wait_no_close_wait(port);
    h.stop();
}

/// Content-Type comes from the caps that real muxers produce; the body starts
/// with their streamheader.
#[test]
fn http_content_type_from_real_muxers() {
    let cases: [(&str, &str, bool, &[u8]); 4] = [
        (
            "videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=30/1 ! \
             vp8enc deadline=1 ! webmmux streamable=true",
            "video/webm",
            true,
            b"\x1a\x45\xdf\xa3",
        ),
        (
            "videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=30/1 ! \
             theoraenc ! oggmux",
            "application/ogg",
            true,
            b"OggS",
        ),
        (
            "audiotestsrc is-live=true ! audio/x-raw,format=S16LE,rate=44100,channels=1 ! \
             flvmux streamable=true",
            "video/x-flv",
            true,
            b"FLV\x01",
        ),
        (
            "videotestsrc is-live=true ! video/x-raw,width=64,height=48,framerate=30/1 ! \
             jpegenc ! multipartmux boundary=gstboundary",
            "multipart/x-mixed-replace;boundary=gstboundary",
            false,
            b"--gstboundary\r\nContent-Type: image/jpeg\r\n",
        ),
    ];
    for (src, content_type, has_streamheader, magic) in cases {
        let running = Running::launch(&format!(
            "{src} ! rstcpserversink name=sink http=true host=127.0.0.1 port=0"
        ));
        let sink = running.get("sink");
        let port = current_port(&sink);
        let caps = wait_caps(&sink, has_streamheader);
        let client = get(port, "/");
        let (head, rest) = read_head(&client);
        assert_stream_head(&head, content_type);
        if has_streamheader {
            let sh = streamheader_bytes(&caps);
            assert!(sh.starts_with(magic), "{content_type}: {sh:02x?}");
            // The streamheader, then at least one buffer of data.
            let body = read_more(&client, rest, sh.len() + 1);
            assert_eq!(body[..sh.len()], sh[..], "{content_type}");
        } else {
            let mut body = rest;
            let start = Instant::now();
            let mut buf = [0u8; 8192];
            while find(&body, magic).is_none() {
                if let Some(n) = read_some(&client, start, &mut buf) {
                    assert_ne!(n, 0, "EOF");
                    body.extend_from_slice(&buf[..n]);
                }
            }
        }
        running.assert_no_error();
    }
}

// ---------------------------------------------------------------------------
// 3. Real players
// ---------------------------------------------------------------------------

/// `souphttpsrc ! decodebin` plays the README's kind of stream.
#[test]
fn souphttpsrc_decodebin_plays_webm() {
    let (server, _sink, port) = webm_server();
    let client = Running::launch(&format!(
        "souphttpsrc location=http://127.0.0.1:{port}/ is-live=true ! decodebin ! \
         fakesink name=out sync=false signal-handoffs=true"
    ));
    let out = client.get("out");
    let frames = count_handoffs(&out);
    wait_until("30 frames decoded from souphttpsrc", || {
        client.assert_no_error();
        frames.load(Ordering::SeqCst) >= 30
    });
    assert_decoded_160x120(&out);
    server.assert_no_error();
}

/// `curl` gets the right headers, for GET (a stream it gives up on) and HEAD.
#[test]
fn curl_gets_correct_headers() {
    let (server, sink, port) = webm_server();
    let sh_len = wait_streamheader(&sink).len();
    let url = format!("http://127.0.0.1:{port}/");
    let curl = |args: &[&str]| {
        Command::new("curl")
            .args(args)
            .arg(&url)
            .output()
            .expect("curl runs (apt-get install curl)")
    };
    let out = curl(&[
        "-s",
        "-D",
        "-",
        "--max-time",
        "2",
        "-o",
        "/dev/null",
        "-w",
        "size_download=%{size_download}",
    ]);
    // 28: the stream does not end, curl stops at --max-time.
    assert_eq!(out.status.code(), Some(28), "{out:?}");
    let stdout = out.stdout;
    let end = find(&stdout, b"\r\n\r\n").expect("a head") + 4;
    assert_stream_head(&stdout[..end], "video/webm");
    // Past the head: the streamheader and some data.
    let size: usize = std::str::from_utf8(&stdout[end..])
        .unwrap()
        .strip_prefix("size_download=")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{:?}", String::from_utf8_lossy(&stdout)));
    assert!(size > sh_len, "curl got {size} bytes of body");

    let out = curl(&["-s", "-I", "--max-time", "5"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_stream_head(&out.stdout, "video/webm");
    server.assert_no_error();
}

/// Headless Chromium plays the WebM stream in a `<video>` element: its currentTime
/// passes 1 s and advances by more than 1 s.
#[test]
fn chromium_plays_webm_in_video_element() {
    let (server, sink, port) = webm_server();
    let played = browser::play_video(&format!("http://127.0.0.1:{port}/"), &[], || {
        format!("num-handles {}", handles(&sink))
    });
    assert!(played.current > 1.0, "{}", played.report);
    assert!(played.current - played.start > 1.0, "{}", played.report);
    assert!(
        played.report.contains("&title=PLAYING%20"),
        "{}",
        played.report
    );
    server.assert_no_error();
}

// ---------------------------------------------------------------------------
// 4. Robustness
// ---------------------------------------------------------------------------

fn count(events: &[Event], added: bool) -> usize {
    events
        .iter()
        .filter(|e| match e {
            Event::Added(_) => added,
            Event::Removed(..) => !added,
            Event::FdRemoved(_) => false,
        })
        .count()
}

/// Raw mode: 200 connections opened and closed at once each become a client and
/// go; the element closes every one of their sockets; the playing client gets
/// every byte in order.
#[test]
fn raw_connection_flood_does_not_disturb_a_playing_client() {
    raw_connection_flood("1");
}

/// The same with clients spread over several IO threads.
#[test]
fn raw_connection_flood_with_io_threads() {
    raw_connection_flood("3");
}

fn raw_connection_flood(io_threads: &str) {
    let (mut h, port) = server(&[("io-threads", io_threads)]);
    let rec = Recorder::attach(&h.sink());
    h.set_src_caps(streamheader_caps(&[b"<h>"]));
    let playing = playing_client(&mut h, port, false);
    let mut i = 1;
    for _ in 0..10 {
        for _ in 0..20 {
            drop(connect(port));
        }
        push_and_check(&mut h, &playing, i);
        i += 1;
    }
    rec.wait_for("200 flood clients added and removed", |e| {
        count(e, true) == 201 && count(e, false) == 200
    });
    wait_handles(&h.sink(), 1);
    wait_no_close_wait(port);
    push_and_check(&mut h, &playing, i);
    h.stop();
    assert!(read_to_eof(&playing).is_empty());
}

/// HTTP mode: a flood of connections that close at once, send a whole request and
/// close, or send garbage; none is left open, the playing client gets every byte.
#[test]
fn http_connection_flood_does_not_disturb_a_playing_client() {
    let (mut h, port) = server(&[("http", "true")]);
    h.set_src_caps(streamheader_caps(&[b"<h>"]));
    let playing = playing_client(&mut h, port, true);
    let mut i = 1;
    for round in 0..10 {
        for k in 0..20 {
            let mut s = connect(port);
            match (round + k) % 3 {
                0 => {}
                1 => {
                    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
                }
                _ => {
                    let _ = s.write_all(b"\x01\x02\x03\x04garbage");
                }
            }
            drop(s);
        }
        push_and_check(&mut h, &playing, i);
        i += 1;
    }
    // Whole requests became clients for a moment; they all go.
    wait_handles(&h.sink(), 1);
    wait_no_close_wait(port);
    push_and_check(&mut h, &playing, i);
    assert_eq!(handles(&h.sink()), 1);
    h.stop();
}

/// Connections that send part of a request (or nothing) and wait: the stream flows
/// past them; stopping the element closes them all.
#[test]
fn half_open_connections_do_not_disturb_a_playing_client() {
    let (mut h, port) = server(&[("http", "true")]);
    h.set_src_caps(streamheader_caps(&[b"<h>"]));
    let playing = playing_client(&mut h, port, true);
    let mut half_open = Vec::new();
    let mut i = 1;
    for k in 0..60 {
        half_open.push(match k % 3 {
            0 => connect(port),
            1 => request(port, b"GET / HTTP/1.1\r\nHost: x"),
            _ => request(port, b"G"),
        });
        if k % 10 == 9 {
            push_and_check(&mut h, &playing, i);
            i += 1;
        }
    }
    // The element has read what each sent, and waits for more.
    for s in &half_open {
        wait_server_read_all(port, s);
    }
    for _ in 0..5 {
        push_and_check(&mut h, &playing, i);
        i += 1;
    }
    assert_eq!(handles(&h.sink()), 1);
    for s in &half_open {
        assert_nothing_readable(s);
    }
    h.stop();
    for s in &half_open {
        assert!(read_to_eof(s).is_empty(), "closed without a response");
    }
    assert!(read_to_eof(&playing).is_empty());
}

/// Clients that reset their connection (SO_LINGER 0), before being accepted, while
/// sending a request, or while streaming.
#[test]
fn reset_connections_do_not_disturb_a_playing_client() {
    for http in [false, true] {
        let (mut h, port) = server(&[("http", if http { "true" } else { "false" })]);
        h.set_src_caps(streamheader_caps(&[b"<h>"]));
        let playing = playing_client(&mut h, port, http);
        let mut i = 1;
        // At once, many times.
        for _ in 0..50 {
            reset(connect(port));
        }
        push_and_check(&mut h, &playing, i);
        i += 1;
        // After a partial request.
        for _ in 0..10 {
            reset(request(port, b"GET / HT"));
        }
        push_and_check(&mut h, &playing, i);
        i += 1;
        // While streaming.
        let joined = if http { get(port, "/") } else { connect(port) };
        wait_handles(&h.sink(), 2);
        push_and_check(&mut h, &playing, i);
        i += 1;
        reset(joined);
        for _ in 0..3 {
            push_and_check(&mut h, &playing, i);
            i += 1;
        }
        wait_handles(&h.sink(), 1);
        push_and_check(&mut h, &playing, i);
        h.stop();
        assert!(read_to_eof(&playing).is_empty(), "http={http}");
    }
}

/// num-handles follows clients that come and go; the element closes the sockets of
/// clients that left (a half-closed client sees the element's EOF), and stopping
/// closes every connected client after its data.
#[test]
fn clients_leaving_and_stop_close_accepted_sockets() {
    let (mut h, port) = server(&[]);
    let rec = Recorder::attach(&h.sink());
    h.set_src_caps(streamheader_caps(&[b"<h>"]));
    let clients: Vec<TcpStream> = (0..4).map(|_| connect(port)).collect();
    wait_handles(&h.sink(), 4);
    h.push_bytes(&b16(0), false);
    let mut want = b"<h>".to_vec();
    want.extend(b16(0));
    for c in &clients {
        assert_eq!(read_exact(c, want.len()), want);
    }
    let mut clients = clients.into_iter();
    let (a, b, c, d) = (
        clients.next().unwrap(),
        clients.next().unwrap(),
        clients.next().unwrap(),
        clients.next().unwrap(),
    );
    // `a` goes away: counted down, its socket closed by the element.
    drop(a);
    wait_handles(&h.sink(), 3);
    wait_no_close_wait(port);
    // `b` half-closes: the element sees the end of its input, removes it and
    // closes the socket, so `b` reads EOF.
    b.shutdown(std::net::Shutdown::Write).unwrap();
    wait_handles(&h.sink(), 2);
    assert!(read_to_eof(&b).is_empty());
    rec.wait_for("two removed as closed", |e| {
        e.iter()
            .filter(|e| matches!(e, Event::Removed(_, s) if s == "closed"))
            .count()
            == 2
    });
    // The others get everything, then EOF when the element stops.
    h.push_bytes(&b16(1), true);
    h.push_bytes(&b16(2), true);
    let mut want = b16(1);
    want.extend(b16(2));
    h.wait_u64("bytes-served", (4 * 19 + 2 * 32) as u64);
    let sink = h.sink();
    h.stop();
    assert_eq!(sink.property::<i32>("current-port"), 0);
    for s in [&c, &d] {
        assert_eq!(read_to_eof(s), want);
    }
    // Nothing listens any more.
    assert_eq!(
        TcpStream::connect(("127.0.0.1", port))
            .map(|_| ())
            .unwrap_err()
            .kind(),
        ErrorKind::ConnectionRefused
    );
}

/// Like `tcpserversink` (whose accepted sockets join with the current
/// `sync-method` and burst), settings changed while running apply to the next
/// connection.
#[test]
fn sync_method_and_burst_set_while_running_apply_to_new_connections() {
    let (mut h, port) = server(&[]);
    h.set_src_caps(streamheader_caps(&[b"<h>"]));
    // next-keyframe: a client waits for the next keyframe.
    h.sink()
        .set_property_from_str("sync-method", "next-keyframe");
    h.push_bytes(&b16(0), false);
    h.push_bytes(&b16(1), true);
    let next_kf = connect(port);
    wait_handles(&h.sink(), 1);
    h.push_bytes(&b16(2), true);
    h.push_bytes(&b16(3), false);
    h.push_bytes(&b16(4), true);
    let mut want = b"<h>".to_vec();
    want.extend(b16(3));
    want.extend(b16(4));
    assert_eq!(
        read_exact(&next_kf, want.len()),
        want,
        "a connection accepted after sync-method=next-keyframe was set"
    );
    // burst of 2 buffers: the client gets the last two at once.
    h.sink().set_property_from_str("sync-method", "burst");
    h.sink().set_property_from_str("burst-format", "buffers");
    h.sink().set_property("burst-value", 2u64);
    let burst = connect(port);
    wait_handles(&h.sink(), 2);
    h.push_bytes(&b16(5), true);
    let mut want = b"<h>".to_vec();
    want.extend(b16(4));
    want.extend(b16(5));
    assert_eq!(
        read_exact(&burst, want.len()),
        want,
        "a connection accepted after sync-method=burst burst-value=2 was set"
    );
    h.stop();
}

#[test]
fn port_in_use_fails_to_start_and_port_zero_picks_a_free_one() {
    init();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let sink = gst::ElementFactory::make("rstcpserversink")
        .property("host", "127.0.0.1")
        .property("port", i32::from(port))
        .build()
        .unwrap();
    assert!(sink.set_state(gst::State::Ready).is_err());
    assert_eq!(sink.property::<i32>("current-port"), 0);
    let _ = sink.set_state(gst::State::Null);

    sink.set_property("port", 0i32);
    sink.set_property("listen-backlog", 7i32);
    assert_eq!(sink.property::<i32>("listen-backlog"), 7);
    sink.set_state(gst::State::Ready).unwrap();
    let picked = current_port(&sink);
    assert_ne!(picked, port);
    assert_eq!(sink.property::<i32>("port"), 0);
    sink.set_state(gst::State::Null).unwrap();
    assert_eq!(sink.property::<i32>("current-port"), 0);
}

// ---------------------------------------------------------------------------
// 5. IPv6
// ---------------------------------------------------------------------------

#[test]
fn ipv6_loopback_raw_and_http() {
    if TcpListener::bind((Ipv6Addr::LOCALHOST, 0)).is_err() {
        eprintln!("SKIPPED ipv6_loopback_raw_and_http: ::1 is not configured on this machine");
        return;
    }
    for http in [false, true] {
        let mut h = harness(
            "rstcpserversink",
            &[
                ("host", "::1"),
                ("port", "0"),
                ("http", if http { "true" } else { "false" }),
            ],
        );
        let port = current_port(&h.sink());
        h.set_src_caps(webm_caps(&[b"<ebml>"]));
        let addr = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
        let mut client = TcpStream::connect(addr).unwrap();
        assert!(client.local_addr().unwrap().is_ipv6());
        if http {
            client
                .write_all(b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n")
                .unwrap();
        }
        wait_handles(&h.sink(), 1);
        h.push_bytes(&b16(0), false);
        h.push_bytes(&b16(1), true);
        let want = [&b"<ebml>"[..], &b16(0), &b16(1)].concat();
        assert_gets_stream(&client, http, "video/webm", &want);
        h.stop();
        assert!(read_to_eof(&client).is_empty());
    }
}

// ---------------------------------------------------------------------------
// 6. request-keyframe
// ---------------------------------------------------------------------------

/// The Matroska Cluster element ID: media data, after the streamheader.
const CLUSTER_ID: &[u8] = b"\x1f\x43\xb6\x75";

/// A late HTTP client on a 1000-frame GOP with sync-method=next-keyframe; returns
/// the head, what followed it within `window`, the streamheader and when the
/// first byte past the streamheader came.
fn late_client_on_long_gop(
    request_keyframe: bool,
    window: Duration,
) -> (Vec<u8>, Vec<u8>, Vec<u8>, Option<Duration>, u64) {
    let running = Running::launch(&format!(
        "videotestsrc is-live=true ! video/x-raw,width=160,height=120,framerate=30/1 ! \
         vp8enc deadline=1 lag-in-frames=0 keyframe-max-dist=1000 ! webmmux streamable=true ! \
         rstcpserversink name=sink http=true host=127.0.0.1 port=0 sync-method=next-keyframe \
         request-keyframe={request_keyframe}"
    ));
    let sink = running.get("sink");
    assert_eq!(sink.property::<bool>("request-keyframe"), request_keyframe);
    let port = current_port(&sink);
    let sh = wait_streamheader(&sink);
    // Late: some 30 buffers (15+ frames) after the stream's only keyframe so far.
    let buffers = count_buffers(&sink.static_pad("sink").unwrap());
    wait_until("30 buffers into the stream", || {
        buffers.load(Ordering::SeqCst) >= 30
    });
    let to_serve = sink.property::<u64>("bytes-to-serve");
    let joined = Instant::now();
    let client = get(port, "/");
    let (head, mut body) = read_head(&client);
    let mut first_media = None;
    let mut buf = [0u8; 65536];
    while joined.elapsed() < window {
        if body.len() > sh.len() && first_media.is_none() {
            first_media = Some(joined.elapsed());
            if request_keyframe {
                break;
            }
        }
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&client),
            nix::poll::PollFlags::POLLIN,
        )];
        let left = window.saturating_sub(joined.elapsed());
        let ms = left.as_millis().clamp(1, 1000) as u16;
        if nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)).unwrap() == 1
            && let Some(n) = read_some(&client, joined, &mut buf)
        {
            assert_ne!(n, 0, "EOF");
            body.extend_from_slice(&buf[..n]);
        }
    }
    if request_keyframe && first_media.is_some() {
        body = read_more(&client, body, sh.len() + CLUSTER_ID.len());
    }
    let grown = sink.property::<u64>("bytes-to-serve") - to_serve;
    running.assert_no_error();
    (head, body, sh, first_media, grown)
}

/// With request-keyframe, a late client starts within a fraction of a second on a
/// fresh keyframe (a new Cluster), not at the end of the 33 s GOP.
#[test]
fn request_keyframe_starts_a_late_client_at_once() {
    let (head, body, sh, first_media, _) = late_client_on_long_gop(true, Duration::from_secs(2));
    assert_stream_head(&head, "video/webm");
    let after = first_media.expect("no media data within 2 s of joining a 1000-frame GOP");
    eprintln!("late client: first media after {after:?}");
    assert!(
        after < Duration::from_secs(1),
        "first media after {after:?}"
    );
    assert_eq!(body[..sh.len()], sh[..]);
    assert_eq!(&body[sh.len()..sh.len() + 4], CLUSTER_ID);
}

/// Without it, the same late client gets nothing but the head for as long as we
/// watch (the stream flows meanwhile): it waits for the next keyframe.
#[test]
fn without_request_keyframe_a_late_client_waits_for_the_gop() {
    let (head, body, _sh, first_media, grown) =
        late_client_on_long_gop(false, Duration::from_millis(1500));
    assert_stream_head(&head, "video/webm");
    assert_eq!(first_media, None);
    assert!(body.is_empty(), "{} bytes arrived", body.len());
    assert!(grown > 0, "the stream flowed while the client waited");
}
