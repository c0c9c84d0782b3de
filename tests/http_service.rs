//! `rstcpserversink` as an HTTP service (issue 11) with real clients: per-address
//! limits and redirects, a cap on connections without a request, the PROXY
//! protocol (from raw headers and from HAProxy), several elements on one port by
//! mount (from a gst-launch-1.0 line too, fetched by curl), CORS (curl and raw
//! answers), JWT authentication, Prometheus metrics read by Prometheus' own Python
//! parser, and the access log with its rotation.
//!
//! Servers listen on 127.0.0.1; waits are on conditions with deadlines.

mod common;

use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::http::{
    connect, fails_to_start, find, handles, new_tcp_server_sink, read_to_eof, read_until_closed,
    wait_handles,
};
use common::process::KillOnDrop;
use common::*;
use gst::prelude::*;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// The head the element answers a stream with, for the check suite's caps.
const STREAM_HEAD: &str = "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\
                           Cache-Control: no-cache\r\nConnection: close\r\nServer: rstcpserversink\r\n";

/// An `rstcpserversink http=true` on 127.0.0.1, any free port, fed through the
/// harness, with the check suite's caps and a streamheader `<h>`.
fn server(props: &[(&str, &str)]) -> (Harness, u16) {
    let mut all = vec![("host", "127.0.0.1"), ("port", "0"), ("http", "true")];
    all.extend_from_slice(props);
    let mut h = harness("rstcpserversink", &all);
    let port = current_port(&h.sink());
    h.set_src_caps(streamheader_caps(&[b"<h>"]));
    (h, port)
}

/// One element on a given port (several may share it).
fn on_port(port: u16, props: &[(&str, &str)]) -> Harness {
    let port = port.to_string();
    let mut all = vec![
        ("host", "127.0.0.1"),
        ("port", port.as_str()),
        ("http", "true"),
    ];
    all.extend_from_slice(props);
    harness("rstcpserversink", &all)
}

/// A connection to 127.0.0.1:`port` from the local address `source` (127.0.0.x).
fn connect_from(source: &str, port: u16) -> TcpStream {
    try_connect_from(source, port).unwrap()
}

fn try_connect_from(source: &str, port: u16) -> nix::Result<TcpStream> {
    use nix::sys::socket::{SockaddrStorage, bind};
    let from: SocketAddr = format!("{source}:0").parse().unwrap();
    let to: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    common::http::connect_prepared(to, |fd| {
        bind(fd.as_raw_fd(), &SockaddrStorage::from(from)).unwrap();
    })
}

fn send(mut s: TcpStream, bytes: &[u8]) -> TcpStream {
    s.write_all(bytes).unwrap();
    s
}

fn get_request(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\nUser-Agent: http-service-test\r\n\r\n")
        .into_bytes()
}

fn get(port: u16, path: &str) -> TcpStream {
    send(connect(port), &get_request(path))
}

/// A response head through its blank line (text), and what followed it.
fn read_head(s: &TcpStream) -> (String, Vec<u8>) {
    let (head, rest) = common::http::read_head(s);
    (String::from_utf8(head).unwrap(), rest)
}

/// The connection gets exactly `want` (a whole answer) and is closed.
fn assert_answer(s: &TcpStream, want: &str) {
    let all = read_to_eof(s);
    assert_eq!(String::from_utf8_lossy(&all), want);
}

/// A refusal head with no headers beyond the usual ones and `extra`.
fn refusal(status: &str, extra: &str) -> String {
    format!("HTTP/1.0 {status}\r\nContent-Length: 0\r\nConnection: close\r\n{extra}\r\n")
}

/// Starts a client on `path` and checks it gets the stream's head, the
/// streamheader and `first` (the next buffer pushed by `push`).
fn play(h: &mut Harness, port: u16, path: &str, clients_after: u32, i: u32) -> TcpStream {
    play_on(h, get(port, path), clients_after, i)
}

fn play_on(h: &mut Harness, client: TcpStream, clients_after: u32, i: u32) -> TcpStream {
    wait_handles(&h.sink(), clients_after);
    h.push_bytes(&b16(i), false);
    let (head, rest) = read_head(&client);
    assert_eq!(head, format!("{STREAM_HEAD}\r\n"));
    let mut want = b"<h>".to_vec();
    want.extend(b16(i));
    let mut got = rest;
    if got.len() < want.len() {
        got.extend(read_exact(&client, want.len() - got.len()));
    }
    assert_eq!(got, want);
    client
}

/// Pushes `b16(i)`; every client in `playing` gets exactly it.
fn push_and_check(h: &mut Harness, playing: &[&TcpStream], i: u32) {
    h.push_bytes(&b16(i), !i.is_multiple_of(4));
    for (k, c) in playing.iter().enumerate() {
        assert_eq!(read_exact(*c, 16), b16(i), "playing client {k}, buffer {i}");
    }
}

/// A file in a fresh directory of its own.
fn temp_path(name: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "rsmfd-http-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Waits until the file at `path` has `n` lines; returns them.
fn wait_lines(path: &Path, n: usize) -> Vec<String> {
    let mut lines = Vec::new();
    wait_until(&format!("{n} lines in {}", path.display()), || {
        lines = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect();
        lines.len() >= n
    });
    assert_eq!(lines.len(), n, "{lines:#?}");
    lines
}

/// The fields of an access log line that the tests look at.
#[derive(Debug)]
struct LogLine {
    address: String,
    user: String,
    request: String,
    status: String,
    body: String,
    agent: String,
    bytes: String,
    removal: String,
}

fn fields(line: &str) -> LogLine {
    let (address, rest) = line.split_once(" - ").unwrap();
    let (user, rest) = rest.split_once(" [").unwrap();
    let (_time, rest) = rest.split_once("] \"").unwrap();
    let (request, rest) = rest.split_once("\" ").unwrap();
    let mut it = rest.splitn(3, ' ');
    let status = it.next().unwrap().to_string();
    let body = it.next().unwrap().to_string();
    // "referer" "agent" bytes duration removal
    let quoted: Vec<&str> = it.next().unwrap().split('"').collect();
    let tail: Vec<&str> = quoted[4].split_whitespace().collect();
    LogLine {
        address: address.into(),
        user: user.into(),
        request: request.into(),
        status,
        body,
        agent: quoted[3].into(),
        bytes: tail[0].into(),
        removal: tail[2].into(),
    }
}

// ---------------------------------------------------------------------------
// 3. Limits: per address, redirect, pending connections
// ---------------------------------------------------------------------------

/// `max-clients-per-ip=1`: a second client from 127.0.0.1 gets 429 while one
/// from 127.0.0.2 plays; once the first leaves, 127.0.0.1 may come again.
#[test]
fn max_clients_per_ip_answers_429_per_address() {
    let (mut h, port) = server(&[("max-clients-per-ip", "1")]);
    assert_eq!(h.sink().property::<u32>("max-clients-per-ip"), 1);
    let first = play(&mut h, port, "/", 1, 0);
    let second = get(port, "/");
    assert_answer(&second, &refusal("429 Too Many Requests", ""));
    let other = send(connect_from("127.0.0.2", port), &get_request("/"));
    let other = play_on(&mut h, other, 2, 1);
    // `first` got buffer 1 too.
    assert_eq!(read_exact(&first, 16), b16(1));
    push_and_check(&mut h, &[&first, &other], 2);
    drop(first);
    h.push_bytes(&b16(3), false);
    wait_handles(&h.sink(), 1);
    assert_eq!(read_exact(&other, 16), b16(3));
    let again = play(&mut h, port, "/", 2, 4);
    assert_eq!(read_exact(&other, 16), b16(4));
    push_and_check(&mut h, &[&again, &other], 5);
    h.stop();
}

/// `max-clients` with `redirect-url`: 302 to the URL instead of 503.
#[test]
fn max_clients_with_redirect_url_answers_302() {
    let (mut h, port) = server(&[
        ("max-clients", "1"),
        ("redirect-url", "http://edge2.example:8080/live"),
    ]);
    let playing = play(&mut h, port, "/", 1, 0);
    for _ in 0..3 {
        assert_answer(
            &get(port, "/"),
            &refusal("302 Found", "Location: http://edge2.example:8080/live\r\n"),
        );
    }
    push_and_check(&mut h, &[&playing], 1);
    assert_eq!(handles(&h.sink()), 1);
    h.stop();
}

/// `max-pending=5`: of 40 connections that send nothing (or half a request), all
/// but the newest 5 are dropped, oldest first, without an answer; the playing
/// clients get every byte meanwhile; a real request still gets in (dropping the
/// oldest waiting one).
#[test]
fn max_pending_drops_the_oldest_requestless_connections() {
    let (mut h, port) = server(&[("max-pending", "5")]);
    let a = play(&mut h, port, "/", 1, 0);
    let b = play_on(&mut h, get(port, "/"), 2, 1);
    assert_eq!(read_exact(&a, 16), b16(1));
    let mut i = 2;
    let mut idle = Vec::new();
    for k in 0..40 {
        idle.push(if k % 2 == 0 {
            connect(port)
        } else {
            send(connect(port), b"GET / HTTP/1.1\r\nHost:")
        });
        if k % 8 == 7 {
            push_and_check(&mut h, &[&a, &b], i);
            i += 1;
        }
    }
    // The oldest 35 are closed without a byte; each one was dropped when a newer
    // one came beyond the cap (one whose bytes were not read yet sees a reset).
    for (k, s) in idle.iter().take(35).enumerate() {
        assert!(read_until_closed(s).0.is_empty(), "idle connection {k}");
    }
    for s in &idle[35..] {
        assert_nothing_readable(s);
    }
    push_and_check(&mut h, &[&a, &b], i);
    i += 1;
    let c = play(&mut h, port, "/", 3, i);
    assert_eq!(read_exact(&a, 16), b16(i));
    assert_eq!(read_exact(&b, 16), b16(i));
    // The request pushed out the oldest of the 5 waiting.
    assert!(read_until_closed(&idle[35]).0.is_empty());
    for s in &idle[36..] {
        assert_nothing_readable(s);
    }
    push_and_check(&mut h, &[&a, &b, &c], i + 1);
    h.stop();
}

/// A flood: 1000 connections that never finish a request (nothing, half a request,
/// half a PROXY-less head) against `max-pending=64` while 100 clients play; every
/// playing client gets every byte, at most 64 flood connections stay open, and a
/// real request still gets in afterwards.
#[test]
fn requestless_flood_under_max_pending_does_not_disturb_100_clients() {
    let (mut h, port) = server(&[("max-pending", "64")]);
    let mut playing = Vec::new();
    for k in 0..100 {
        playing.push(get(port, "/"));
        wait_handles(&h.sink(), k + 1);
    }
    h.push_bytes(&b16(0), false);
    let want = [b"<h>".as_slice(), &b16(0)].concat();
    for c in &playing {
        let (head, mut rest) = read_head(c);
        assert_eq!(head, format!("{STREAM_HEAD}\r\n"));
        if rest.len() < want.len() {
            rest.extend(read_exact(c, want.len() - rest.len()));
        }
        assert_eq!(rest, want);
    }
    let mut flood = Vec::new();
    let mut i = 1;
    for k in 0..1000 {
        flood.push(match k % 3 {
            0 => connect(port),
            1 => send(connect(port), b"GET / HTTP/1.1\r\n"),
            _ => send(connect(port), b"G"),
        });
        if k % 100 == 99 {
            let refs: Vec<&TcpStream> = playing.iter().collect();
            push_and_check(&mut h, &refs, i);
            i += 1;
        }
    }
    // All but the newest 64 are closed without an answer.
    for (k, s) in flood.iter().take(1000 - 64).enumerate() {
        assert!(read_until_closed(s).0.is_empty(), "flood connection {k}");
    }
    for s in &flood[1000 - 64..] {
        assert_nothing_readable(s);
    }
    let refs: Vec<&TcpStream> = playing.iter().collect();
    push_and_check(&mut h, &refs, i);
    assert_eq!(handles(&h.sink()), 100);
    let late = play(&mut h, port, "/", 101, i + 1);
    for c in &playing {
        assert_eq!(read_exact(c, 16), b16(i + 1));
    }
    push_and_check(&mut h, &[&late], i + 2);
    h.stop();
}

/// With `proxy-protocol`, connections still sending their PROXY header are
/// pending too: beyond `max-pending` the oldest goes.
#[test]
fn max_pending_counts_connections_reading_the_proxy_header() {
    let (mut h, port) = server(&[("proxy-protocol", "true"), ("max-pending", "2")]);
    let partial: Vec<TcpStream> = (0..3)
        .map(|_| send(connect(port), b"PROXY TCP4 192.0.2."))
        .collect();
    assert!(read_until_closed(&partial[0]).0.is_empty());
    for s in &partial[1..] {
        assert_nothing_readable(s);
    }
    let mut v1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 5000 8080\r\n".to_vec();
    v1.extend(get_request("/"));
    let client = play_on(&mut h, send(connect(port), &v1), 1, 0);
    assert!(read_until_closed(&partial[1]).0.is_empty());
    assert_nothing_readable(&partial[2]);
    push_and_check(&mut h, &[&client], 1);
    h.stop();
}

/// On a dual-stack socket (`host=::`) an IPv4 client's address is written as IPv4
/// (not `::ffff:127.0.0.1`) in the access log and counted as such per address.
#[test]
fn ipv4_mapped_addresses_are_written_as_ipv4() {
    if TcpListener::bind("[::]:0").is_err() {
        eprintln!("SKIPPED ipv4_mapped_addresses_are_written_as_ipv4: no IPv6 on this machine");
        return;
    }
    let log = temp_path("access.log");
    let mut h = harness(
        "rstcpserversink",
        &[
            ("host", "::"),
            ("port", "0"),
            ("http", "true"),
            ("max-clients-per-ip", "1"),
            ("access-log", log.to_str().unwrap()),
        ],
    );
    let port = current_port(&h.sink());
    h.set_src_caps(streamheader_caps(&[b"<h>"]));
    let client = play(&mut h, port, "/", 1, 0);
    assert_answer(&get(port, "/"), &refusal("429 Too Many Requests", ""));
    drop(client);
    wait_handles(&h.sink(), 0);
    let lines = wait_lines(&log, 2);
    for line in &lines {
        assert_eq!(fields(line).address, "127.0.0.1", "{line}");
    }
    h.stop();
}

// ---------------------------------------------------------------------------
// 4. PROXY protocol
// ---------------------------------------------------------------------------

/// A PROXY v2 header for TCP over IPv4 from `source`.
fn proxy_v2(source: [u8; 4], source_port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend([0x21, 0x11, 0, 12]);
    h.extend(source);
    h.extend([127, 0, 0, 1]);
    h.extend(source_port.to_be_bytes());
    h.extend(8080u16.to_be_bytes());
    h
}

/// With `proxy-protocol`, the header's source address is the client's for the
/// per-address limit and the access log (v1 and v2; the request may come in the
/// same write as the header).
#[test]
fn proxy_protocol_source_address_counts_for_limits_and_log() {
    let log = temp_path("access.log");
    let (mut h, port) = server(&[
        ("proxy-protocol", "true"),
        ("max-clients-per-ip", "1"),
        ("access-log", log.to_str().unwrap()),
    ]);
    assert!(h.sink().property::<bool>("proxy-protocol"));
    let mut v1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 5000 8080\r\n".to_vec();
    v1.extend(get_request("/v1"));
    let first = play_on(&mut h, send(connect(port), &v1), 1, 0);
    // The same source again: 429, though the socket's address differs from the
    // header's anyway.
    assert_answer(
        &send(connect(port), &v1),
        &refusal("429 Too Many Requests", ""),
    );
    // v2, header and request in two writes.
    let mut second = send(connect(port), &proxy_v2([198, 51, 100, 9], 6000));
    second.write_all(&get_request("/v2")).unwrap();
    let second = play_on(&mut h, second, 2, 1);
    assert_eq!(read_exact(&first, 16), b16(1));
    // Their close is seen by the element's read; nothing is pushed meanwhile, so
    // they leave as `closed` after exactly what they got.
    drop(first);
    drop(second);
    wait_handles(&h.sink(), 0);
    let lines = wait_lines(&log, 3);
    let f = fields(&lines[0]);
    assert_eq!(
        (f.address.as_str(), f.status.as_str()),
        ("192.0.2.7", "429"),
        "{}",
        lines[0]
    );
    let mut clients: Vec<(String, String, String)> = lines[1..]
        .iter()
        .map(|l| {
            let f = fields(l);
            assert_eq!(f.status, "200", "{l}");
            (f.address, f.request, f.removal)
        })
        .collect();
    clients.sort();
    assert_eq!(
        clients,
        [
            (
                "192.0.2.7".into(),
                "GET /v1 HTTP/1.1".into(),
                "closed".into()
            ),
            (
                "198.51.100.9".into(),
                "GET /v2 HTTP/1.1".into(),
                "closed".into()
            ),
        ]
    );
    h.stop();
}

/// Without a valid PROXY header a connection is closed without an answer: a plain
/// request, garbage, a wrong v2 version, an overlong v1 line, a truncated header
/// (after `header-timeout`); a playing client is not disturbed.
#[test]
fn proxy_protocol_refuses_missing_truncated_and_garbage_headers() {
    let (mut h, port) = server(&[("proxy-protocol", "true"), ("header-timeout", "300000000")]);
    let mut v1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 5000 8080\r\n".to_vec();
    v1.extend(get_request("/"));
    let playing = play_on(&mut h, send(connect(port), &v1), 1, 0);
    let mut i = 1;
    let mut bad_v2 = proxy_v2([192, 0, 2, 1], 1);
    bad_v2[12] = 0x31;
    let long_v1 = [b"PROXY TCP4 ".as_slice(), &[b'1'; 120]].concat();
    let bad: [&[u8]; 5] = [
        &get_request("/"),
        b"\x16\x03\x01\x02\x00garbage",
        &bad_v2,
        &long_v1,
        b"PROXY TCP4 192.0.2.7 127.0.0.1 5000 80\r",
    ];
    let started = Instant::now();
    let conns: Vec<TcpStream> = bad.iter().map(|b| send(connect(port), b)).collect();
    for (k, c) in conns.iter().enumerate() {
        push_and_check(&mut h, &[&playing], i);
        i += 1;
        let (got, _reset) = read_until_closed(c);
        assert!(got.is_empty(), "connection {k} got {got:?}");
    }
    // The truncated one was closed at its deadline, not at once.
    assert!(started.elapsed() >= Duration::from_millis(300));
    push_and_check(&mut h, &[&playing], i);
    assert_eq!(handles(&h.sink()), 1);
    h.stop();
}

/// HAProxy in `mode tcp` with `send-proxy-v2` in front: a client connecting to
/// HAProxy from 127.0.0.2 plays, and the access log shows 127.0.0.2 (HAProxy
/// itself connects from 127.0.0.1).
#[test]
fn haproxy_send_proxy_v2_shows_the_client_address_in_the_access_log() {
    let haproxy = std::env::var("HAPROXY").unwrap_or_else(|_| "/usr/sbin/haproxy".into());
    assert!(
        Path::new(&haproxy).exists(),
        "{haproxy} not found: this test needs HAProxy (apt-get install haproxy, as \
         scripts/setup-debian does), or set HAPROXY to its path"
    );
    let log = temp_path("access.log");
    let (mut h, port) = server(&[
        ("proxy-protocol", "true"),
        ("access-log", log.to_str().unwrap()),
    ]);
    let front = free_port();
    let config = temp_path("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend edge\n  bind 127.0.0.1:{front}\n  default_backend streams\n\
             backend streams\n  server s1 127.0.0.1:{port} send-proxy-v2\n"
        ),
    )
    .unwrap();
    let _haproxy = KillOnDrop(
        Command::new(&haproxy)
            .args(["-db", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy starts"),
    );
    // HAProxy listens once it has read its configuration; until then the
    // connection is refused.
    let start = Instant::now();
    let client = loop {
        match try_connect_from("127.0.0.2", front) {
            Ok(s) => break s,
            Err(e) => {
                assert!(start.elapsed() < *DEADLINE, "haproxy never listened: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let client = play_on(
        &mut h,
        send(client, &get_request("/live?token=secret")),
        1,
        0,
    );
    push_and_check(&mut h, &[&client], 1);
    drop(client);
    wait_handles(&h.sink(), 0);
    let lines = wait_lines(&log, 1);
    let f = fields(&lines[0]);
    assert_eq!(f.address, "127.0.0.2", "{}", lines[0]);
    assert_eq!(
        f.request, "GET /live?token=REDACTED HTTP/1.1",
        "{}",
        lines[0]
    );
    assert_eq!(
        (f.status.as_str(), f.body.as_str()),
        ("200", "35"),
        "{}",
        lines[0]
    );
    assert_eq!(f.agent, "http-service-test");
    assert_eq!(f.bytes, (STREAM_HEAD.len() + 2 + 35).to_string());
    assert!(!lines[0].contains("secret"));
    h.stop();
}

// ---------------------------------------------------------------------------
// 7. Several elements on one port
// ---------------------------------------------------------------------------

/// Two elements with the same host and port and mounts `/a` and `/b` share one
/// listening socket: each path gets its own element's stream, `/c` gets 404.
/// With `/a`'s element in NULL its path is 404 and `/b` goes on; the port stays
/// open while an element is in READY, and closes with the last one.
#[test]
fn elements_on_one_port_serve_their_own_mounts() {
    let port = free_port();
    let mut a = on_port(port, &[("mount", "/a")]);
    let mut b = on_port(port, &[("mount", "/b")]);
    assert_eq!(current_port(&a.sink()), port);
    assert_eq!(current_port(&b.sink()), port);
    a.set_src_caps(streamheader_caps(&[b"<h>"]));
    b.set_src_caps(streamheader_caps(&[b"<h>"]));
    let on_a = play(&mut a, port, "/a", 1, 0);
    let on_b = play(&mut b, port, "/b", 1, 100);
    assert_answer(&get(port, "/c"), &refusal("404 Not Found", ""));
    assert_answer(&get(port, "/"), &refusal("404 Not Found", ""));
    push_and_check(&mut a, &[&on_a], 1);
    push_and_check(&mut b, &[&on_b], 101);
    assert_eq!((handles(&a.sink()), handles(&b.sink())), (1, 1));

    // `/a` goes: its client sees the end, its path is unknown now.
    a.sink().set_state(gst::State::Null).unwrap();
    assert!(read_to_eof(&on_a).is_empty());
    assert_answer(&get(port, "/a"), &refusal("404 Not Found", ""));
    push_and_check(&mut b, &[&on_b], 102);
    let again = play(&mut b, port, "/b", 2, 103);
    assert_eq!(read_exact(&on_b, 16), b16(103));

    // An element only in READY keeps the port open for its mount.
    let ready = new_tcp_server_sink(&[
        ("host", "127.0.0.1"),
        ("port", &port.to_string()),
        ("http", "true"),
        ("mount", "/r"),
    ]);
    ready.set_state(gst::State::Ready).unwrap();
    b.sink().set_state(gst::State::Null).unwrap();
    assert!(read_to_eof(&on_b).is_empty());
    assert!(read_to_eof(&again).is_empty());
    // The port still accepts and routes.
    assert_answer(&get(port, "/b"), &refusal("404 Not Found", ""));
    ready.set_state(gst::State::Null).unwrap();
    assert_eq!(
        TcpStream::connect(("127.0.0.1", port)).unwrap_err().kind(),
        ErrorKind::ConnectionRefused
    );
}

/// Elements share a port only in HTTP mode, with different mounts and the same
/// port-level settings; the error says which.
#[test]
fn sharing_a_port_needs_http_distinct_mounts_and_the_same_port_settings() {
    let port = free_port();
    let p = port.to_string();
    let base = [
        ("host", "127.0.0.1"),
        ("port", p.as_str()),
        ("http", "true"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut v: Vec<(&str, &str)> = base.to_vec();
        v.extend_from_slice(extra);
        new_tcp_server_sink(&v)
    };
    let first = with(&[("mount", "/a")]);
    first.set_state(gst::State::Ready).unwrap();
    let cases: [(&[(&str, &str)], &str); 7] = [
        (&[("mount", "/a")], "mount /a is already served"),
        (&[("mount", "/b"), ("http", "false")], "http=true"),
        (
            &[("mount", "/b"), ("listen-backlog", "7")],
            "listen-backlog",
        ),
        (
            &[("mount", "/b"), ("proxy-protocol", "true")],
            "proxy-protocol",
        ),
        (&[("mount", "/b"), ("max-pending", "3")], "max-pending"),
        (
            &[("mount", "/b"), ("header-timeout", "5000000000")],
            "header-timeout",
        ),
        (
            &[("mount", "/b"), ("max-header-size", "1024")],
            "max-header-size",
        ),
    ];
    for (props, want) in cases {
        let (error, _) = fails_to_start(&with(props), &format!("{props:?}"));
        assert!(error.contains(want), "{props:?}: {error}");
    }
    // A raw element does not share its port either.
    first.set_state(gst::State::Null).unwrap();
    let raw = new_tcp_server_sink(&[("host", "127.0.0.1"), ("port", p.as_str())]);
    raw.set_state(gst::State::Ready).unwrap();
    let (error, _) = fails_to_start(&with(&[("mount", "/a")]), "a raw element on the port");
    assert!(error.contains("http=true"), "{error}");
    raw.set_state(gst::State::Null).unwrap();
    // Alone again, the port is free to take.
    let second = with(&[("mount", "/b")]);
    second.set_state(gst::State::Ready).unwrap();
    second.set_state(gst::State::Null).unwrap();
}

/// One gst-launch-1.0 line serves `/video` (WebM/VP8) and `/audio` (Ogg/Opus) on
/// one port; curl fetches both and the captures decode.
#[test]
fn gst_launch_serves_video_and_audio_mounts_on_one_port() {
    // For decoding the captures.
    init();
    let port = free_port();
    let line = format!(
        "videotestsrc is-live=true ! video/x-raw,width=160,height=120,framerate=30/1 ! \
         vp8enc deadline=1 keyframe-max-dist=30 ! webmmux streamable=true ! \
         rstcpserversink http=true host=127.0.0.1 port={port} mount=/video sync-method=latest-keyframe \
         audiotestsrc is-live=true ! opusenc ! oggmux ! \
         rstcpserversink http=true host=127.0.0.1 port={port} mount=/audio sync-method=latest-keyframe"
    );
    let server = KillOnDrop(
        Command::new("gst-launch-1.0")
            .args(line.split_whitespace())
            .env("GST_PLUGIN_PATH", target_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("gst-launch-1.0 runs"),
    );
    wait_until("gst-launch-1.0 to listen", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    for (path, content_type, decoder) in [
        ("/video", "video/webm", "matroskademux ! vp8dec"),
        ("/audio", "application/ogg", "oggdemux ! opusdec"),
    ] {
        let dir = temp_path("curl");
        let (head, body) = (dir.with_file_name("head"), dir.with_file_name("body"));
        // A live stream has no end: curl stops after 3 s (exit 28) with what came.
        let status = Command::new("curl")
            .args(["-s", "--max-time", "3", "-D"])
            .arg(&head)
            .arg("-o")
            .arg(&body)
            .arg(format!("http://127.0.0.1:{port}{path}"))
            .status()
            .expect("curl runs");
        assert_eq!(status.code(), Some(28), "{path}: curl {status}");
        let head = std::fs::read_to_string(&head).unwrap();
        assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{path}: {head}");
        assert!(
            head.contains(&format!("Content-Type: {content_type}\r\n")),
            "{path}: {head}"
        );
        let body = std::fs::read(&body).unwrap();
        let decoded = decode(&body, decoder);
        assert!(
            decoded.frames > 0,
            "{path}: {} bytes do not decode",
            body.len()
        );
    }
    drop(server);
}

fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

// ---------------------------------------------------------------------------
// 8. CORS
// ---------------------------------------------------------------------------

/// `cors-origin`: the header on the stream and on errors, and preflights answered
/// 204; without it OPTIONS is 405.
#[test]
fn cors_origin_on_every_answer_and_preflights() {
    let (mut h, port) = server(&[
        ("cors-origin", "https://player.example"),
        ("mount", "/live"),
    ]);
    let allow = "Access-Control-Allow-Origin: https://player.example\r\n";
    let client = get(port, "/live");
    wait_handles(&h.sink(), 1);
    h.push_bytes(&b16(0), false);
    let (head, mut body) = read_head(&client);
    assert_eq!(head, format!("{STREAM_HEAD}{allow}\r\n"));
    let want = [b"<h>".as_slice(), &b16(0)].concat();
    body.extend(read_exact(&client, want.len() - body.len()));
    assert_eq!(body, want);
    assert_answer(&get(port, "/nope"), &refusal("404 Not Found", allow));
    let preflight = send(
        connect(port),
        b"OPTIONS /live HTTP/1.1\r\nOrigin: https://player.example\r\n\
          Access-Control-Request-Method: GET\r\n\r\n",
    );
    assert_answer(
        &preflight,
        "HTTP/1.0 204 No Content\r\nAccess-Control-Allow-Origin: https://player.example\r\n\
         Access-Control-Allow-Methods: GET, HEAD, OPTIONS\r\n\
         Access-Control-Allow-Headers: Authorization, Range\r\nAccess-Control-Max-Age: 86400\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n",
    );
    // curl sees the same.
    let out = Command::new("curl")
        .args([
            "-s",
            "-i",
            "-X",
            "OPTIONS",
            "-H",
            "Origin: https://player.example",
            "-H",
            "Access-Control-Request-Method: GET",
        ])
        .arg(format!("http://127.0.0.1:{port}/live"))
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.0 204 No Content\r\n"), "{text}");
    assert!(text.contains(allow), "{text}");
    assert!(
        text.contains("Access-Control-Allow-Methods: GET, HEAD, OPTIONS\r\n"),
        "{text}"
    );
    h.sink().set_property("cors-origin", None::<String>);
    assert_answer(
        &send(connect(port), b"OPTIONS /live HTTP/1.1\r\n\r\n"),
        &refusal("405 Method Not Allowed", ""),
    );
    push_and_check(&mut h, &[&client], 1);
    h.stop();
}

// ---------------------------------------------------------------------------
// 2. JWT
// ---------------------------------------------------------------------------

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token with `claims`, signed with `secret`.
/// With `auth-jwt-secret`, the metrics path needs a token too (its path as the mount):
/// the figures are not for everyone who can reach the port.
#[test]
fn metrics_path_needs_a_token_where_the_element_has_a_secret() {
    let (mut h, port) = server(&[
        ("mount", "/live"),
        ("metrics-path", "/metrics"),
        ("auth-jwt-secret", "s3cret"),
    ]);
    h.set_src_caps(streamheader_caps(&[b"<h>"]));
    let scrape = |request: String| {
        let s = send(connect(port), request.as_bytes());
        let all = read_to_eof(&s);
        String::from_utf8_lossy(&all).to_string()
    };
    let unauthorized = scrape(get_request_string("/metrics", ""));
    assert!(
        unauthorized.starts_with("HTTP/1.0 401 Unauthorized\r\n"),
        "{unauthorized}"
    );
    assert!(!unauthorized.contains("rstcpserversink_clients"));
    let exp = now_secs() + 600;
    // A viewer's token (for /live) is not a scraper's.
    let viewer = token("s3cret", &format!(r#"{{"exp":{exp},"mount":"/live"}}"#));
    let refused = scrape(get_request_string(
        "/metrics",
        &format!("Authorization: Bearer {viewer}\r\n"),
    ));
    assert!(refused.starts_with("HTTP/1.0 401 "), "{refused}");
    let scraper = token("s3cret", &format!(r#"{{"exp":{exp},"mount":"/metrics"}}"#));
    let answer = scrape(get_request_string(
        "/metrics",
        &format!("Authorization: Bearer {scraper}\r\n"),
    ));
    assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
    assert!(
        answer.contains("rstcpserversink_clients{mount=\"/live\"} 0\n"),
        "{answer}"
    );
}

fn get_request_string(path: &str, headers: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n")
}

fn token(secret: &str, claims: &str) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let head = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(claims);
    let signed = format!("{head}.{body}");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(ring::hmac::sign(&key, signed.as_bytes()));
    format!("{signed}.{sig}")
}

/// `auth-jwt-secret`: a good token (query or Bearer) plays; missing, malformed,
/// expired, not yet valid, wrongly signed or other-mount tokens get 401; tokens
/// never reach the access log.
#[test]
fn jwt_tokens_accepted_and_refused() {
    init();
    // Everything the elements log at any level (GST_DEBUG=rs*:9), to look for tokens.
    let debug_log = Arc::new(Mutex::new(String::new()));
    let collector = {
        let debug_log = debug_log.clone();
        gst::log::add_log_function(move |category, _, _, _, _, _, message| {
            if category.name().starts_with("rs")
                && let Some(text) = message.get()
            {
                let mut all = debug_log.lock().unwrap();
                all.push_str(text.as_str());
                all.push('\n');
            }
        })
    };
    gst::log::set_threshold_for_name("rs*", gst::DebugLevel::Memdump);
    let log = temp_path("access.log");
    let (mut h, port) = server(&[
        ("auth-jwt-secret", "s3cret"),
        ("mount", "/live"),
        ("access-log", log.to_str().unwrap()),
    ]);
    let later = now_secs() + 3600;
    let good = token(
        "s3cret",
        &format!(r#"{{"sub":"ann","mount":"live","exp":{later}}}"#),
    );
    let by_query = play(&mut h, port, &format!("/live?token={good}"), 1, 0);
    let bearer = format!("GET /live HTTP/1.1\r\nAuthorization: Bearer {good}\r\n\r\n");
    let by_header = play_on(&mut h, send(connect(port), bearer.as_bytes()), 2, 1);
    assert_eq!(read_exact(&by_query, 16), b16(1));
    let unauthorized = refusal("401 Unauthorized", "WWW-Authenticate: Bearer\r\n");
    let bad = [
        String::new(),
        "not.a.token".into(),
        token("s3cret", &format!(r#"{{"exp":{}}}"#, now_secs() - 3600)),
        token("s3cret", &format!(r#"{{"nbf":{later}}}"#)),
        token("wrong", &format!(r#"{{"exp":{later}}}"#)),
        token("s3cret", r#"{"mount":"/other"}"#),
    ];
    for t in &bad {
        let path = if t.is_empty() {
            "/live".to_string()
        } else {
            format!("/live?token={t}")
        };
        assert_answer(&get(port, &path), &unauthorized);
    }
    push_and_check(&mut h, &[&by_query, &by_header], 2);
    drop(by_query);
    drop(by_header);
    wait_handles(&h.sink(), 0);
    let lines = wait_lines(&log, 8);
    let text = lines.join("\n");
    for t in std::iter::once(&good).chain(&bad[1..]) {
        assert!(!text.contains(t.as_str()), "a token in the log:\n{text}");
    }
    let statuses: Vec<(String, String)> = lines
        .iter()
        .map(|l| {
            let f = fields(l);
            (f.status, f.user)
        })
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| s.0 == "401").count(),
        6,
        "{text}"
    );
    // Both clients logged with the token's subject as the user.
    assert_eq!(
        statuses
            .iter()
            .filter(|s| *s == &("200".to_string(), "ann".to_string()))
            .count(),
        2,
        "{text}"
    );
    gst::log::remove_log_function(collector);
    gst::log::unset_threshold_for_name("rs*");
    let debug_log = debug_log.lock().unwrap().clone();
    assert!(
        debug_log.contains("refused with 401 Unauthorized (token expired)"),
        "{debug_log}"
    );
    for secret in std::iter::once(&good)
        .chain(&bad[1..])
        .map(String::as_str)
        .chain(["s3cret"])
    {
        assert!(
            !debug_log.contains(secret),
            "`{secret}` in the debug log:\n{debug_log}"
        );
    }
    h.stop();
}

// ---------------------------------------------------------------------------
// 5. Metrics
// ---------------------------------------------------------------------------

/// Parses with Prometheus' Python client and prints `name labels value` per sample.
const PARSE: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for f in text_string_to_metric_families(sys.stdin.read()):
    for s in f.samples:
        labels = ",".join("%s=%s" % kv for kv in sorted(s.labels.items()))
        print(s.name, labels, int(s.value))
"#;

/// `metrics-path` answers the figures of every element on the port, valid for
/// Prometheus' parser: clients, removals by status, refusals by code, bytes.
#[test]
fn metrics_of_every_mount_read_by_prometheus_parser() {
    let port = free_port();
    let mut a = on_port(port, &[("mount", "/a"), ("metrics-path", "/metrics")]);
    let mut b = on_port(port, &[("mount", "/b"), ("max-clients", "1")]);
    a.set_src_caps(streamheader_caps(&[b"<h>"]));
    b.set_src_caps(streamheader_caps(&[b"<h>"]));
    let on_a = play(&mut a, port, "/a", 1, 0);
    drop(on_a);
    wait_handles(&a.sink(), 0);
    let on_b = play(&mut b, port, "/b", 1, 0);
    assert_answer(&get(port, "/b"), &refusal("503 Service Unavailable", ""));
    assert_answer(&get(port, "/nowhere"), &refusal("404 Not Found", ""));
    let scrape = get(port, "/metrics");
    let all = read_to_eof(&scrape);
    let end = find(&all, b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&all[..end]).to_string();
    let body = &all[end..];
    assert!(head.starts_with("HTTP/1.0 200 OK\r\n"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{head}"
    );
    assert!(
        head.contains(&format!("Content-Length: {}\r\n", body.len())),
        "{head}"
    );
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "/usr/bin/python3".into());
    let mut child = Command::new(python)
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child.stdin.take().unwrap().write_all(body).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "Prometheus' parser refused:\n{}",
        String::from_utf8_lossy(body)
    );
    let samples = String::from_utf8(out.stdout).unwrap();
    let served_a = a.sink().property::<u64>("bytes-served");
    for want in [
        "rstcpserversink_clients mount=/a 0".to_string(),
        "rstcpserversink_clients mount=/b 1".to_string(),
        format!("rstcpserversink_bytes_served_total mount=/a {served_a}"),
        "rstcpserversink_clients_removed_total mount=/a,status=closed 1".to_string(),
        "rstcpserversink_clients_removed_total mount=/b,status=closed 0".to_string(),
        "rstcpserversink_requests_refused_total code=503,mount=/b 1".to_string(),
        // A path no element has is counted on the port's first element.
        "rstcpserversink_requests_refused_total code=404,mount=/a 1".to_string(),
    ] {
        assert!(
            samples.lines().any(|l| l == want),
            "no `{want}` in\n{samples}"
        );
    }
    for family in [
        "rstcpserversink_buffers_queued",
        "rstcpserversink_bytes_queued",
    ] {
        for mount in ["/a", "/b"] {
            let series = format!("{family} mount={mount} ");
            assert!(
                samples.lines().any(|l| l.starts_with(&series)),
                "no `{series}` in\n{samples}"
            );
        }
    }
    push_and_check(&mut b, &[&on_b], 1);
    drop(a);
    drop(b);
}

// ---------------------------------------------------------------------------
// 6. Access log
// ---------------------------------------------------------------------------

/// `access-log`: a line per finished client (bytes, removal status) and per
/// refused request; renamed and SIGHUP, the log goes on in a new file; a path
/// that cannot be opened fails READY with a message naming it.
#[test]
fn access_log_lines_and_rotation() {
    let log = temp_path("access.log");
    let (mut h, port) = server(&[("access-log", log.to_str().unwrap()), ("mount", "/m")]);
    assert_eq!(
        h.sink().property::<Option<String>>("access-log").as_deref(),
        log.to_str()
    );
    let client = play(&mut h, port, "/m", 1, 0);
    assert_answer(&get(port, "/x"), &refusal("404 Not Found", ""));
    drop(client);
    wait_handles(&h.sink(), 0);
    let lines = wait_lines(&log, 2);
    let f = fields(&lines[0]);
    assert_eq!(
        (
            f.address.as_str(),
            f.user.as_str(),
            f.request.as_str(),
            f.status.as_str(),
            f.body.as_str(),
            f.removal.as_str()
        ),
        ("127.0.0.1", "-", "GET /x HTTP/1.1", "404", "-", "-"),
        "{}",
        lines[0]
    );
    let f = fields(&lines[1]);
    let head = STREAM_HEAD.len() + 2;
    assert_eq!(
        (
            f.address.as_str(),
            f.request.as_str(),
            f.status.as_str(),
            f.body.as_str(),
            f.agent.as_str(),
            f.removal.as_str()
        ),
        (
            "127.0.0.1",
            "GET /m HTTP/1.1",
            "200",
            "19",
            "http-service-test",
            "closed"
        ),
        "{}",
        lines[1]
    );
    assert_eq!(f.bytes, (head + 19).to_string());

    // Rotation: renamed, then SIGHUP; the next line goes to a new file.
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).unwrap();
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGHUP).unwrap();
    assert_answer(&get(port, "/y"), &refusal("404 Not Found", ""));
    let lines = wait_lines(&log, 1);
    assert!(lines[0].contains("\"GET /y HTTP/1.1\" 404"), "{}", lines[0]);
    assert_eq!(
        std::fs::read_to_string(&rotated).unwrap().lines().count(),
        2
    );
    h.stop();

    let unwritable = new_tcp_server_sink(&[
        ("host", "127.0.0.1"),
        ("port", "0"),
        ("http", "true"),
        ("access-log", "/nonexistent-dir/access.log"),
    ]);
    let (error, _) = fails_to_start(&unwritable, "an unwritable access log");
    assert!(
        error.contains("cannot open the access log /nonexistent-dir/access.log"),
        "{error}"
    );
}

// ---------------------------------------------------------------------------
// 8. CORS in a browser
// ---------------------------------------------------------------------------

/// Headless Chromium, on a page from another origin, reads the stream with
/// `fetch` from the element with `cors-origin` (with an `Authorization` header, so
/// through a preflight) and is refused the one without it on the same port.
#[test]
fn chromium_reads_a_cross_origin_stream_only_with_cors_origin() {
    let port = free_port();
    let html = format!(
        r#"<!doctype html>
<html><body><script>
async function read(path, options) {{
  try {{
    const r = await fetch('http://127.0.0.1:{port}' + path, options);
    const reader = r.body.getReader();
    let n = 0;
    while (n < 4096) {{
      const {{value, done}} = await reader.read();
      if (done) break;
      n += value.length;
    }}
    reader.cancel();
    return 'read' + r.status + '-' + (n >= 4096);
  }} catch (e) {{
    return 'blocked';
  }}
}}
(async () => {{
  const cors = await read('/cors', {{headers: {{'Authorization': 'Bearer x'}}}});
  const plain = await read('/plain', {{}});
  fetch('/report?cors=' + cors + '&plain=' + plain).catch(() => {{}});
}})();
</script></body></html>"#
    );
    let page = browser::serve_page(html);
    let origin = page.origin();
    let log = temp_path("access.log");
    let mut cors = on_port(
        port,
        &[
            ("mount", "/cors"),
            ("cors-origin", &origin),
            ("access-log", log.to_str().unwrap()),
        ],
    );
    let mut plain = on_port(port, &[("mount", "/plain")]);
    cors.set_src_caps(streamheader_caps(&[b"<h>"]));
    plain.set_src_caps(streamheader_caps(&[b"<h>"]));
    let _browser = browser::Browser::open(&format!("{origin}/"), &[]);
    // Feed both streams until the page reports.
    let report = page.wait_report(Duration::from_secs(40), || {
        cors.push_bytes(&[7u8; 1024], false);
        plain.push_bytes(&[9u8; 1024], false);
    });
    assert_eq!(report, "cors=read200-true&plain=blocked");
    // The Authorization header made Chromium ask first.
    let mut preflight = None;
    wait_until("the preflight in the access log", || {
        preflight = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains("\"OPTIONS /cors HTTP/1.1\" 204"))
            .map(String::from);
        preflight.is_some()
    });
    drop(cors);
    drop(plain);
}
