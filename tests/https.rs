//! `rstcpserversink` over HTTPS (`tls-certificate`, `tls-key`), with real clients:
//! curl with the test CA (against a plain HTTP element fed the same stream: both
//! decode, same streamheader), souphttpsrc decoding, headless Chromium playing WebM
//! in a `<video>`, exact bytes to 100 TLS clients while a flood of half-open
//! handshakes is pending, and the clear errors of a bad certificate or key at READY.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::browser::play_video;
use common::http::{fails_to_start, new_tcp_server_sink};
use common::process::KillGroupOnDrop;
use common::tls::{Ending, TestPki, TlsClient, client_hello};
use common::*;
use gst::prelude::*;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use rustls::ClientConfig;

const WAIT: Duration = Duration::from_secs(20);

/// The TLS properties for `pki`, as gst-launch-1.0 takes them.
fn tls_props(pki: &TestPki) -> String {
    format!(
        "tls-certificate={} tls-key={}",
        pki.cert.display(),
        pki.key.display()
    )
}

/// `rstcpserversink` with `props` (host and port among them), then `pki`'s
/// certificate and key, in PLAYING behind the harness.
fn tls_harness(pki: &TestPki, props: &[(&str, &str)]) -> Harness {
    let mut all = props.to_vec();
    all.extend([
        ("tls-certificate", pki.cert.to_str().unwrap()),
        ("tls-key", pki.key.to_str().unwrap()),
    ]);
    harness("rstcpserversink", &all)
}

/// [`tls_harness`] on 127.0.0.1, any free port: the harness, its sink, and where it
/// listens.
fn tls_server(pki: &TestPki, props: &[(&str, &str)]) -> (Harness, gst::Element, SocketAddr) {
    let mut all = vec![("host", "127.0.0.1"), ("port", "0")];
    all.extend_from_slice(props);
    let h = tls_harness(pki, &all);
    let sink = h.sink();
    let addr = addr_of(&sink);
    (h, sink, addr)
}

/// Where the sink listens (on 127.0.0.1).
fn addr_of(sink: &gst::Element) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], current_port(sink)))
}

/// A TLS client of `addr` that finished its handshake and sent `GET {path}`.
fn tls_get(addr: SocketAddr, config: &Arc<ClientConfig>, path: &str) -> TlsClient {
    let mut c = TlsClient::connect(addr, config.clone());
    c.handshake(WAIT);
    c.send(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes(), WAIT);
    c
}

/// Reads the client's response head; fails unless it is `200 OK`.
fn assert_ok_head(c: &mut TlsClient) {
    let head = c.read_head(WAIT);
    assert!(
        head.starts_with(b"HTTP/1.0 200 OK\r\n"),
        "{}",
        String::from_utf8_lossy(&head)
    );
}

/// Waits until the sink has `n` clients.
fn wait_clients(sink: &gst::Element, n: u32, what: &str) {
    wait_until_within(what, WAIT, || sink.property::<u32>("num-handles") == n);
}

const VIDEO: &str = "videotestsrc is-live=true ! video/x-raw,width=160,height=120,framerate=30/1 ! \
     vp8enc deadline=1 keyframe-max-dist=15 ! webmmux streamable=true";

/// [`VIDEO`] served over HTTPS with `pki`'s files: the pipeline and its sink, once
/// the caps with the streamheader are there.
fn https_server(pki: &TestPki) -> (Running, gst::Element) {
    let server = Running::launch(&format!(
        "{VIDEO} ! rstcpserversink name=sink http=true host=127.0.0.1 port=0 \
         sync-method=latest-keyframe {}",
        tls_props(pki)
    ));
    let sink = server.get("sink");
    wait_streamheader(&sink);
    (server, sink)
}

/// curl over HTTPS with the test CA gets the stream (head, streamheader, data that
/// decodes), as a plain HTTP client of an element fed the same stream does.
#[test]
fn curl_over_https_and_plain_http_both_decode() {
    let pki = TestPki::new();
    let server = Running::launch(&format!(
        "{VIDEO} ! tee name=t \
         t. ! queue ! rstcpserversink name=tls http=true host=127.0.0.1 port=0 \
              sync-method=latest-keyframe {} \
         t. ! queue ! rstcpserversink name=plain http=true host=127.0.0.1 port=0 \
              sync-method=latest-keyframe",
        tls_props(&pki)
    ));
    let (tls, plain) = (server.get("tls"), server.get("plain"));
    let header = wait_streamheader(&tls);
    assert_eq!(wait_streamheader(&plain), header);
    let captures = [
        (
            format!("https://localhost:{}/", current_port(&tls)),
            pki.path("tls.webm"),
        ),
        (
            format!("http://127.0.0.1:{}/", current_port(&plain)),
            pki.path("plain.webm"),
        ),
    ];
    let curls: Vec<_> = captures
        .iter()
        .map(|(url, out)| {
            Command::new("curl")
                .args(["-sS", "--max-time", "4", "--cacert"])
                .arg(&pki.ca)
                .arg("-o")
                .arg(out)
                .arg(url)
                // Its "(28) Operation timed out" is expected.
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("curl")
        })
        .collect();
    for (mut curl, (url, out)) in curls.into_iter().zip(&captures) {
        // 28: the live stream does not end, curl stops at --max-time.
        assert_eq!(curl.wait().unwrap().code(), Some(28), "curl {url}");
        let capture = std::fs::read(out).unwrap();
        assert!(capture.starts_with(&header), "{url}: no streamheader first");
        let decoded = decode(&capture, "matroskademux ! vp8dec");
        assert!(decoded.frames >= 30, "{url}: {} frames", decoded.frames);
    }
    // HEAD over HTTPS: the head alone, then a clean TLS end (curl checks it).
    let out = Command::new("curl")
        .args(["-sS", "-I", "--max-time", "10", "--cacert"])
        .arg(&pki.ca)
        .arg(&captures[0].0)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let head = String::from_utf8_lossy(&out.stdout);
    assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
    assert!(head.contains("Content-Type: video/webm"), "{head}");
    server.assert_no_error();
}

/// souphttpsrc verifies the server with the test CA and decodes the stream.
#[test]
fn souphttpsrc_decodes_over_https() {
    let pki = TestPki::new();
    let (server, sink) = https_server(&pki);
    // Verified against the test CA through `tls-database` (`ssl-ca-file` is not
    // applied by Debian 12's souphttpsrc with libsoup 3: it answers "Unacceptable
    // TLS certificate" for a chain the same file database accepts).
    let (client, frames) = counting(&format!(
        "souphttpsrc name=src location=https://localhost:{}/ ssl-strict=true ! \
         matroskademux ! vp8dec ! fakesink name=out signal-handoffs=true sync=false",
        current_port(&sink)
    ));
    let database = gio::TlsFileDatabase::new(&pki.ca).unwrap();
    client
        .by_name("src")
        .unwrap()
        .set_property("tls-database", &database);
    client.set_state(gst::State::Playing).unwrap();
    let start = Instant::now();
    while frames.load(Ordering::SeqCst) < 30 {
        if let Some(msg) = client
            .bus()
            .unwrap()
            .pop_filtered(&[gst::MessageType::Error])
        {
            panic!("souphttpsrc: {msg:?}");
        }
        assert!(
            start.elapsed() < WAIT,
            "souphttpsrc decoded {} frames",
            frames.load(Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    client.set_state(gst::State::Null).unwrap();
    server.assert_no_error();
}

/// Headless Chromium plays the WebM stream over HTTPS in a `<video>` (the test
/// certificate's errors ignored, as the browser does not know the test CA).
#[test]
fn chromium_plays_webm_over_https() {
    let pki = TestPki::new();
    let (server, sink) = https_server(&pki);
    let played = play_video(
        &format!("https://localhost:{}/", current_port(&sink)),
        &["--ignore-certificate-errors"],
        String::new,
    );
    assert!(played.current > 1.0, "{}", played.report);
    server.assert_no_error();
}

/// A missing, unreadable or mismatched certificate or key fails NULL -> READY with
/// a message that names the file; one of the two without the other too.
#[test]
fn bad_certificate_or_key_fails_ready_with_the_reason() {
    init();
    let pki = TestPki::new();
    let other = pki.other_key();
    let missing = pki.path("missing.pem");
    let cases: Vec<(Option<&std::path::Path>, Option<&std::path::Path>, String)> = vec![
        (
            Some(&missing),
            Some(&pki.key),
            format!("cannot read the TLS certificate file {}", missing.display()),
        ),
        (
            Some(&pki.cert),
            Some(&missing),
            format!("cannot read the TLS key file {}", missing.display()),
        ),
        (
            Some(&pki.cert),
            Some(&other),
            format!(
                "the TLS key in {} does not belong to the certificate",
                other.display()
            ),
        ),
        (
            Some(&pki.key),
            Some(&pki.key),
            "holds no certificate".into(),
        ),
        (Some(&pki.cert), None, "tls-key".into()),
        (None, Some(&pki.key), "tls-certificate".into()),
    ];
    for (cert, key, want) in cases {
        let mut props = vec![("http", "true"), ("host", "127.0.0.1"), ("port", "0")];
        if let Some(c) = cert {
            props.push(("tls-certificate", c.to_str().unwrap()));
        }
        if let Some(k) = key {
            props.push(("tls-key", k.to_str().unwrap()));
        }
        let sink = new_tcp_server_sink(&props);
        let (error, debug) = fails_to_start(&sink, &format!("{cert:?} / {key:?}"));
        let text = format!("{error} {debug:?}");
        assert!(text.contains(&want), "{text:?} lacks {want:?}");
    }
}

/// 100 TLS clients get exactly the bytes pushed while 200 half-open handshakes (half
/// silent, half with half a ClientHello) are pending; nobody is removed, and the
/// flood goes when its clients do.
#[test]
fn handshake_flood_while_100_clients_play() {
    let pki = TestPki::new();
    let (mut h, sink, addr) =
        tls_server(&pki, &[("http", "true"), ("header-timeout", "60000000000")]);
    let rec = Recorder::attach(&sink);
    h.set_src_caps(streamheader_caps(&[b"<head>"]));
    let config = pki.client_config();
    let mut clients: Vec<TlsClient> = (0..100).map(|_| tls_get(addr, &config, "/")).collect();
    for c in clients.iter_mut() {
        assert_ok_head(c);
    }
    wait_clients(&sink, 100, "100 clients");

    let mut half = client_hello(config.clone());
    half.truncate(half.len() / 2);
    let flood: Vec<TcpStream> = (0..200)
        .map(|i| {
            let mut s = TcpStream::connect(addr).unwrap();
            if i % 2 == 1 {
                s.write_all(&half).unwrap();
            }
            s
        })
        .collect();
    let mut want = b"<head>".to_vec();
    for i in 0..200 {
        h.push_bytes(&b16(i), false);
        want.extend(b16(i));
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let got = c.read_exact(want.len(), WAIT);
        assert!(got == want, "client {i}: bytes differ");
    }
    // The flood is still pending: the server has closed none of it.
    for s in &flood {
        let mut fds = [PollFd::new(std::os::fd::AsFd::as_fd(s), PollFlags::POLLIN)];
        assert_eq!(
            poll(&mut fds, PollTimeout::ZERO).unwrap(),
            0,
            "a flood connection was answered"
        );
    }
    drop(flood);
    assert!(
        !rec.events().iter().any(|e| matches!(e, Event::Removed(..))),
        "{:?}",
        rec.events()
    );
    // The clients leave cleanly; the element ends their TLS streams at NULL.
    h.sink().set_state(gst::State::Null).unwrap();
    for c in clients.iter_mut() {
        let (rest, ending) = c.read_to_end(WAIT);
        assert!(rest.is_empty());
        assert_eq!(ending, Ending::CloseNotify);
    }
}

/// The README's HTTPS recipe, run as it stands (the files in a temporary folder and
/// a free port swapped in): the openssl line makes the certificate, the gst-launch
/// line serves it, the curl line gets a stream that decodes.
#[test]
fn readme_https_recipe_works() {
    init();
    let lines: Vec<&str> = readme_block("https-recipe")
        .lines()
        .filter(|l| {
            l.starts_with("openssl ") || l.starts_with("gst-launch-1.0 ") || l.starts_with("curl ")
        })
        .collect();
    let [openssl, launch, curl] = lines[..] else {
        panic!("the HTTPS recipe has an openssl, a gst-launch-1.0 and a curl line: {lines:?}");
    };
    let dir = TestPki::new();
    let out = Command::new("sh")
        .arg("-c")
        .arg(openssl)
        .current_dir(&dir.dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{openssl}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let description = launch
        .strip_prefix("gst-launch-1.0 ")
        .unwrap()
        .split_whitespace()
        .map(|w| match w.split_once('=') {
            Some(("port", _)) => "port=0".to_string(),
            Some((k @ ("tls-certificate" | "tls-key"), file)) => {
                format!("{k}={}", dir.path(file).display())
            }
            _ => w.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ");
    let server = Running::launch(&description);
    let sink = server.tcp_server_sink();
    wait_streamheader(&sink);
    let port = current_port(&sink);
    let curl_line = curl
        .split_whitespace()
        .map(|w| match w.strip_prefix("https://127.0.0.1:") {
            Some(_) => format!("https://127.0.0.1:{port}/"),
            None => w.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("{curl_line} --max-time 4"))
        .current_dir(&dir.dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(28), "{curl_line}: {out:?}");
    let capture = std::fs::read(dir.path("out.webm")).unwrap();
    let decoded = decode(&capture, "matroskademux ! vp8dec");
    assert!(decoded.frames >= 30, "{} frames", decoded.frames);
    server.assert_no_error();
}

/// Behind a load balancer: the PROXY header comes in plain text, then the TLS
/// handshake (here in the same packet as the header, so the bytes read past the
/// header go to the terminator with the socket). The header's address is the
/// client's: `max-clients-per-ip=1` refuses a second client from 192.0.2.7 with
/// 429 over TLS and serves one from 192.0.2.8.
#[test]
fn proxy_header_then_tls() {
    let pki = TestPki::new();
    let (mut h, sink, addr) = tls_server(
        &pki,
        &[
            ("http", "true"),
            ("proxy-protocol", "true"),
            ("max-clients-per-ip", "1"),
        ],
    );
    let port = addr.port();
    h.set_src_caps(streamheader_caps(&[b"<head>"]));
    let viewer = |source: &str| {
        let tcp = TcpStream::connect(addr).unwrap();
        let mut c = TlsClient::over(tcp.try_clone().unwrap(), pki.client_config());
        let mut first = format!("PROXY TCP4 {source} 127.0.0.1 40000 {port}\r\n").into_bytes();
        while c.conn.wants_write() {
            c.conn.write_tls(&mut first).unwrap();
        }
        (&tcp).write_all(&first).unwrap();
        c.handshake(WAIT);
        c.send(b"GET / HTTP/1.0\r\n\r\n", WAIT);
        let head = c.read_head(WAIT);
        (c, String::from_utf8(head).unwrap())
    };
    let (mut first, head) = viewer("192.0.2.7");
    assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
    wait_clients(&sink, 1, "the first client");
    let (mut second, head) = viewer("192.0.2.7");
    assert!(head.starts_with("HTTP/1.0 429 "), "{head}");
    let (_, ending) = second.read_to_end(WAIT);
    assert_eq!(ending, Ending::CloseNotify);
    let (mut third, head) = viewer("192.0.2.8");
    assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
    wait_clients(&sink, 2, "two clients");
    h.push_bytes(&b16(1), false);
    let want = [&b"<head>"[..], &b16(1)].concat();
    assert_eq!(first.read_exact(want.len(), WAIT), want);
    assert_eq!(third.read_exact(want.len(), WAIT), want);
}

/// The TLS files are the port's: an element naming other files (or none) cannot
/// join a TLS port, with an error naming the setting; one naming the same files
/// shares it, and its mount is served over TLS.
#[test]
fn elements_sharing_a_port_agree_on_tls() {
    init();
    let pki = TestPki::new();
    let port = free_port().to_string();
    let (cert, key) = (pki.cert.to_str().unwrap(), pki.key.to_str().unwrap());
    let element = |mount: &str, tls: bool| {
        let mut props = vec![
            ("http", "true"),
            ("host", "127.0.0.1"),
            ("port", port.as_str()),
            ("mount", mount),
        ];
        if tls {
            props.extend([("tls-certificate", cert), ("tls-key", key)]);
        }
        new_tcp_server_sink(&props)
    };
    let first = element("/a", true);
    first.set_state(gst::State::Ready).unwrap();
    let plain = element("/b", false);
    let (error, _) = fails_to_start(&plain, "no TLS files on a TLS port");
    assert!(
        error.contains("tls-certificate is unset here but"),
        "{error}"
    );

    let mut h = tls_harness(
        &pki,
        &[
            ("http", "true"),
            ("host", "127.0.0.1"),
            ("port", port.as_str()),
            ("mount", "/c"),
        ],
    );
    h.set_src_caps(streamheader_caps(&[b"<c>"]));
    let addr = SocketAddr::from(([127, 0, 0, 1], port.parse::<u16>().unwrap()));
    let mut c = tls_get(addr, &pki.client_config(), "/c");
    assert_ok_head(&mut c);
    wait_clients(&h.sink(), 1, "the client");
    h.push_bytes(&b16(0), false);
    let want = [&b"<c>"[..], &b16(0)].concat();
    assert_eq!(c.read_exact(want.len(), WAIT), want);
    h.sink().set_state(gst::State::Null).unwrap();
    first.set_state(gst::State::Null).unwrap();
}

/// Without `http` the raw stream goes over TLS: the streamheader and the buffers,
/// exact, then a clean end at NULL.
#[test]
fn raw_stream_over_tls() {
    let pki = TestPki::new();
    let (mut h, sink, addr) = tls_server(&pki, &[]);
    h.set_src_caps(streamheader_caps(&[b"<raw>"]));
    let mut c = TlsClient::connect(addr, pki.client_config());
    c.handshake(WAIT);
    wait_clients(&sink, 1, "the client");
    let mut want = b"<raw>".to_vec();
    for i in 0..50 {
        h.push_bytes(&b16(i), false);
        want.extend(b16(i));
    }
    assert_eq!(c.read_exact(want.len(), WAIT), want);
    sink.set_state(gst::State::Null).unwrap();
    let (rest, _) = c.read_to_end(WAIT);
    assert!(rest.is_empty());
}

/// A connection that never finishes its handshake is closed at `header-timeout`,
/// as a request-less one is over plain HTTP, and a playing client is untouched.
#[test]
fn unfinished_handshake_closed_at_header_timeout() {
    let pki = TestPki::new();
    let (mut h, sink, addr) =
        tls_server(&pki, &[("http", "true"), ("header-timeout", "500000000")]);
    h.set_src_caps(streamheader_caps(&[b"<h>"]));
    let mut playing = tls_get(addr, &pki.client_config(), "/");
    playing.read_head(WAIT);
    wait_clients(&sink, 1, "the playing client");

    let mut half = client_hello(pki.client_config());
    half.truncate(half.len() / 2);
    let start = Instant::now();
    let mut silent = TcpStream::connect(addr).unwrap();
    let mut halfway = TcpStream::connect(addr).unwrap();
    halfway.write_all(&half).unwrap();
    for s in [&mut silent, &mut halfway] {
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 64];
        // Closed (EOF or reset) without a byte of answer.
        assert!(matches!(std::io::Read::read(s, &mut buf), Ok(0) | Err(_)));
    }
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(450),
        "closed after {waited:?}"
    );
    assert!(waited < Duration::from_secs(5), "closed after {waited:?}");
    h.push_bytes(&b16(0), false);
    let want = [&b"<h>"[..], &b16(0)].concat();
    assert_eq!(playing.read_exact(want.len(), WAIT), want);
    assert_eq!(sink.property::<u32>("num-handles"), 1);
}

/// The README's "put it on the internet" block, run as it stands in a temporary
/// folder (a free port for 8443, and curl stopped after 4 s): the certificate and the
/// token come from its openssl lines, gst-launch-1.0 serves both mounts with every
/// option, curl (with a PROXY header, over TLS, with the token) gets video that
/// decodes, and the options act: no token, a token for another mount and an
/// unauthorised scrape get 401; the access log has the viewer with its subject and the
/// token redacted.
#[test]
fn readme_internet_recipe_works() {
    init();
    let port = free_port();
    let block = readme_block("internet-recipe").replace("8443", &port.to_string());
    let lines: Vec<&str> = block
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("```"))
        .filter(|l| !l.starts_with("<!--"))
        .collect();
    let [openssl, b64, claims, token, launch, curl] = lines[..] else {
        panic!("the internet recipe changed shape: {lines:?}");
    };
    assert!(openssl.starts_with("openssl ") && launch.starts_with("gst-launch-1.0 "));
    assert!(curl.starts_with("curl "));
    // Its folder is removed on drop.
    let pki = TestPki::new();
    let dir = pki.dir.clone();
    let sh = |script: &str| {
        let out = Command::new("bash")
            .arg("-c")
            .arg(script)
            .current_dir(&dir)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            out,
        )
    };
    let (code, _, out) = sh(&format!(
        "set -e\n{openssl}\n{b64}\n{claims}\n{token}\nprintf %s \"$TOKEN\" > token"
    ));
    assert_eq!(code, Some(0), "{out:?}");
    let plugins = common::process::target_dir();
    let _server = KillGroupOnDrop({
        use std::os::unix::process::CommandExt;
        Command::new("sh")
            .arg("-c")
            .arg(format!("exec {launch}"))
            .current_dir(&dir)
            .env("GST_PLUGIN_PATH", &plugins)
            .stdout(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap()
    });
    wait_until_within("gst-launch-1.0 to listen", WAIT, || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let (code, _, out) = sh(&format!("TOKEN=$(cat token)\n{curl} --max-time 4"));
    assert_eq!(code, Some(28), "{curl}: {out:?}");
    let capture = std::fs::read(dir.join("video.webm")).unwrap();
    let decoded = decode(&capture, "matroskademux ! vp8dec");
    assert!(decoded.frames >= 30, "{} frames", decoded.frames);
    let status = |target: &str| {
        let (_, code, out) = sh(&format!(
            "TOKEN=$(cat token)\ncurl -sk --haproxy-protocol --max-time 4 -o /dev/null \
             -w '%{{http_code}}' \"https://127.0.0.1:{port}{target}\""
        ));
        assert!(!code.is_empty(), "{out:?}");
        code
    };
    assert_eq!(status("/video"), "401", "no token");
    assert_eq!(status("/audio?token=$TOKEN"), "401", "a token for /video");
    assert_eq!(status("/metrics"), "401", "a scrape without a token");
    assert_eq!(status("/nowhere"), "404");
    let log = dir.join("video.log");
    wait_until_within("the viewer's access log line", WAIT, || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains(" 200 "))
    });
    let lines = std::fs::read_to_string(&log).unwrap();
    let viewer = lines
        .lines()
        .find(|l| l.contains(" 200 "))
        .unwrap()
        .to_string();
    assert!(viewer.starts_with("127.0.0.1 - ann ["), "{viewer}");
    assert!(
        viewer.contains("GET /video?token=REDACTED HTTP/1.1"),
        "{viewer}"
    );
    let secret_token = std::fs::read_to_string(dir.join("token")).unwrap();
    assert!(!lines.contains(&secret_token), "{lines}");
}
