//! The TLS terminator (`src/tls.rs`) on its own, with real TCP on 127.0.0.1, a
//! rustls client and curl: certificates and keys loaded or refused with a clear
//! message, exact bytes both ways, back-pressure from a slow reader to the server's
//! end, handshake deadline, plain HTTP and garbage on the TLS port, a flood of
//! half-open handshakes beside streams that keep flowing, and the endings.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::tls::{Ending, TestPki, TlsClient, client_hello, pattern, wait_eof};
use common::wait_until_within;
use gstrsmultifdsink::engine::LogLevel;
use gstrsmultifdsink::tls::{LogFn, Terminator, TlsCounts, load_server_config};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{setsockopt, sockopt};

const DEADLINE: Duration = Duration::from_secs(20);
const LONG: Duration = Duration::from_secs(60);

/// Log lines to stderr with `TLS_TEST_LOG=1`.
fn log_fn() -> LogFn {
    let on = std::env::var_os("TLS_TEST_LOG").is_some();
    Arc::new(move |level: LogLevel, args: std::fmt::Arguments<'_>| {
        if on {
            eprintln!("{level:?} {args}");
        }
    })
}

struct Setup {
    pki: TestPki,
    term: Terminator,
    listener: TcpListener,
    addr: SocketAddr,
}

fn setup() -> Setup {
    let pki = TestPki::new();
    let term = Terminator::new(pki.server_config(), log_fn()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    Setup {
        pki,
        term,
        listener,
        addr,
    }
}

impl Setup {
    /// Accepts the next connection and wraps it (handshake deadline `within`).
    fn accept(&self, within: Duration) -> UnixStream {
        let (tcp, _) = self.listener.accept().unwrap();
        self.term
            .wrap(tcp, Vec::new(), Instant::now() + within)
            .unwrap()
    }

    /// A client with a finished handshake, and the server's plaintext end.
    fn established(&self) -> (TlsClient, UnixStream) {
        let mut client = TlsClient::connect(self.addr, self.pki.client_config());
        let plain = self.accept(DEADLINE);
        client.handshake(DEADLINE);
        (client, plain)
    }

    /// As [`Self::established`], with 64 KiB socket buffers (the client's receive
    /// buffer, the server's send buffer), so what is in flight between them is
    /// bounded by those, not by TCP's autotuning.
    fn established_small_buffers(&self) -> (TlsClient, UnixStream) {
        let tcp = connect_small_rcvbuf(self.addr);
        let mut client = TlsClient::over(tcp, self.pki.client_config());
        let (server_tcp, _) = self.listener.accept().unwrap();
        setsockopt(&server_tcp, sockopt::SndBuf, &65536).unwrap();
        let plain = self
            .term
            .wrap(server_tcp, Vec::new(), Instant::now() + DEADLINE)
            .unwrap();
        client.handshake(DEADLINE);
        (client, plain)
    }

    fn counts(&self) -> TlsCounts {
        self.term.counts()
    }

    fn wait_counts(&self, want: TlsCounts) {
        wait_until_within(&format!("counts {want:?}"), DEADLINE, || {
            self.counts() == want
        });
    }
}

fn counts(handshaking: usize, established: usize, open: usize) -> TlsCounts {
    TlsCounts {
        handshaking,
        established,
        open,
    }
}

/// Copies everything the plaintext end reads back into it, until EOF; then ends it.
fn echo(plain: UnixStream) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut plain = plain;
        plain.set_nonblocking(false).unwrap();
        let mut buf = vec![0u8; 65536];
        let mut total = 0;
        loop {
            match plain.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    plain.write_all(&buf[..n]).unwrap();
                    total += n;
                }
            }
        }
        total
    })
}

/// Writes `len` bytes of the pattern to the plaintext end (blocking), then closes it.
fn send_and_close(plain: UnixStream, len: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut plain = plain;
        plain.set_nonblocking(false).unwrap();
        let mut off = 0;
        while off < len {
            let n = (len - off).min(100_000);
            plain.write_all(&pattern(off, n)).unwrap();
            off += n;
        }
    })
}

#[test]
fn load_server_config_accepts_pkcs8_sec1_pkcs1_and_chains() {
    let pki = TestPki::new();
    // PKCS#8 key, a chain of two certificates.
    let cert_text = std::fs::read_to_string(&pki.cert).unwrap();
    assert_eq!(cert_text.matches("BEGIN CERTIFICATE").count(), 2);
    load_server_config(&pki.cert, &pki.key).unwrap();
    let sec1 = pki.sec1_key();
    assert!(
        std::fs::read_to_string(&sec1)
            .unwrap()
            .contains("BEGIN EC PRIVATE KEY")
    );
    load_server_config(&pki.cert, &sec1).unwrap();
    let (rsa_cert, rsa_key) = pki.rsa_pkcs1();
    assert!(
        std::fs::read_to_string(&rsa_key)
            .unwrap()
            .contains("BEGIN RSA PRIVATE KEY")
    );
    let config = load_server_config(&rsa_cert, &rsa_key).unwrap();
    assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);

    // A client that trusts only the root CA verifies the chain served with each key.
    for (cert, key) in [(pki.cert.clone(), sec1), (rsa_cert, rsa_key)] {
        let term = Terminator::new(load_server_config(&cert, &key).unwrap(), log_fn()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TlsClient::connect(listener.local_addr().unwrap(), pki.client_config());
        let (tcp, _) = listener.accept().unwrap();
        let plain = term
            .wrap(tcp, Vec::new(), Instant::now() + DEADLINE)
            .unwrap();
        client.handshake(DEADLINE);
        assert_eq!(client.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
        // The client prefers AES-256; the server's choice, the cheaper AES-128, wins.
        assert_eq!(
            client.conn.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        let echoed = echo(plain);
        assert_eq!(client.transfer(b"ping", 4, DEADLINE), b"ping");
        client.close();
        assert_eq!(echoed.join().unwrap(), 4);
    }
}

#[test]
fn load_server_config_errors_name_the_file_and_the_problem() {
    let pki = TestPki::new();
    let missing = pki.path("missing.pem");
    let empty = pki.path("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let garbage = pki.path("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let encrypted = pki.path("encrypted.key");
    std::fs::write(
        &encrypted,
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
    )
    .unwrap();
    let other = pki.other_key();
    let cases: Vec<(&std::path::Path, &std::path::Path, Vec<String>)> = vec![
        (
            &missing,
            &pki.key,
            vec![
                format!("cannot read the TLS certificate file {}", missing.display()),
                "No such file".into(),
            ],
        ),
        (
            &pki.cert,
            &missing,
            vec![
                format!("cannot read the TLS key file {}", missing.display()),
                "No such file".into(),
            ],
        ),
        (
            &pki.dir,
            &pki.key,
            vec!["cannot read the TLS certificate file".into()],
        ),
        (
            &empty,
            &pki.key,
            vec![format!("{} holds no certificate", empty.display())],
        ),
        (&pki.key, &pki.key, vec!["holds no certificate".into()]),
        (
            &garbage,
            &pki.key,
            vec![format!("{} is not valid PEM", garbage.display())],
        ),
        (
            &pki.cert,
            &empty,
            vec![format!("{} holds no private key", empty.display())],
        ),
        (&pki.cert, &pki.cert, vec!["holds no private key".into()]),
        (&pki.cert, &encrypted, vec!["encrypted key".into()]),
        (
            &pki.cert,
            &other,
            vec![format!(
                "key in {} does not belong to the certificate in {}",
                other.display(),
                pki.cert.display()
            )],
        ),
    ];
    for (cert, key, want) in cases {
        let err = load_server_config(cert, key)
            .err()
            .unwrap_or_else(|| panic!("{} / {} loaded", cert.display(), key.display()));
        for w in want {
            assert!(err.contains(&w), "{err:?} lacks {w:?}");
        }
    }
    // Unreadable: as root every file is readable, so the check runs only when this
    // process cannot open it either.
    let unreadable = pki.path("unreadable.key");
    std::fs::copy(&pki.key, &unreadable).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&unreadable, std::fs::Permissions::from_mode(0o000)).unwrap();
    if std::fs::File::open(&unreadable).is_err() {
        let err = load_server_config(&pki.cert, &unreadable).unwrap_err();
        assert!(err.contains("Permission denied"), "{err}");
    }
}

#[test]
fn echo_exact_bytes_both_ways() {
    let s = setup();
    let (mut client, plain) = s.established();
    s.wait_counts(counts(0, 1, 1));
    let echoed = echo(plain);
    let data = pattern(0, 3 << 20);
    let back = client.transfer(&data, data.len(), LONG);
    assert!(back == data, "echoed bytes differ");
    client.close();
    assert_eq!(echoed.join().unwrap(), data.len());
    // The echo ended its end after the client's EOF: the client gets close_notify.
    let (rest, ending) = client.read_to_end(DEADLINE);
    assert!(rest.is_empty());
    assert_eq!(ending, Ending::CloseNotify);
    s.wait_counts(counts(0, 0, 0));
}

#[test]
fn already_read_bytes_start_the_handshake() {
    let s = setup();
    let mut client = TlsClient::connect(s.addr, s.pki.client_config());
    // The client's ClientHello goes out; the server reads its start itself (as after
    // a PROXY header) and hands those bytes over with the socket.
    client_send(&mut client);
    let (mut tcp, _) = s.listener.accept().unwrap();
    tcp.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut first = [0u8; 20];
    tcp.read_exact(&mut first).unwrap();
    assert_eq!(first[0], 0x16, "a TLS record");
    let plain = s
        .term
        .wrap(tcp, first.to_vec(), Instant::now() + DEADLINE)
        .unwrap();
    client.handshake(DEADLINE);
    let echoed = echo(plain);
    assert_eq!(client.transfer(b"hello", 5, DEADLINE), b"hello");
    client.close();
    assert_eq!(echoed.join().unwrap(), 5);
}

/// Lets the client send what it has (its ClientHello) without waiting for answers.
fn client_send(client: &mut TlsClient) {
    while client.conn.wants_write() {
        client.conn.write_tls(&mut client.tcp).unwrap();
    }
}

#[test]
fn server_close_sends_close_notify_after_the_last_byte() {
    let s = setup();
    let (mut client, plain) = s.established();
    let writer = send_and_close(plain, 1 << 20);
    let (got, ending) = client.read_to_end(LONG);
    writer.join().unwrap();
    assert_eq!(got.len(), 1 << 20);
    assert!(got == pattern(0, 1 << 20), "bytes differ");
    assert_eq!(ending, Ending::CloseNotify);
    client.close();
    s.wait_counts(counts(0, 0, 0));
}

#[test]
fn client_close_reaches_the_server_end_as_eof() {
    let s = setup();
    let (mut client, mut plain) = s.established();
    client.transfer(b"last words", 0, DEADLINE);
    client.close();
    assert_eq!(wait_eof(&mut plain, DEADLINE), b"last words");
    // The server end can still answer (a half-closed viewer), then ends.
    plain.write_all(b"answer").unwrap();
    drop(plain);
    let (got, ending) = client.read_to_end(DEADLINE);
    assert_eq!(got, b"answer");
    assert_eq!(ending, Ending::CloseNotify);
    s.wait_counts(counts(0, 0, 0));
}

/// Connects with a small receive buffer, so what is in flight is bounded by our
/// buffers, not by TCP's autotuning (up to 32 MiB here).
fn connect_small_rcvbuf(addr: SocketAddr) -> TcpStream {
    common::http::connect_prepared(addr, |fd| {
        setsockopt(fd, sockopt::RcvBuf, &65536).unwrap();
    })
    .unwrap()
}

#[test]
fn slow_reader_back_pressure_reaches_the_server_end() {
    let s = setup();
    let (mut client, plain) = s.established_small_buffers();

    // The server end writes as fast as it can; the client reads nothing yet. The
    // writer must find its end full after a bounded amount: the socketpair, rustls'
    // TLS_SEND_LIMIT, one chunk, and the two small TCP buffers.
    const TOTAL: usize = 16 << 20;
    const PERIOD: usize = 1 << 20;
    let period = pattern(0, PERIOD);
    let (stalled_tx, stalled_rx) = std::sync::mpsc::channel();
    let writer = {
        let period = period.clone();
        std::thread::spawn(move || {
            let mut off = 0;
            let mut reported = false;
            while off < TOTAL {
                let at = off % PERIOD;
                let n = (PERIOD - at).min(65536);
                match (&plain).write(&period[at..at + n]) {
                    Ok(k) => off += k,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        let mut fds = [PollFd::new(plain.as_fd(), PollFlags::POLLOUT)];
                        // No room for 500 ms: the reader holds everything back.
                        if poll(&mut fds, PollTimeout::from(500u16)).unwrap() == 0 && !reported {
                            stalled_tx.send(off).unwrap();
                            reported = true;
                        }
                    }
                    Err(e) => panic!("write: {e}"),
                }
            }
        })
    };
    let in_flight = stalled_rx
        .recv_timeout(LONG)
        .expect("the writer never stalled");
    assert!(
        in_flight < 3 << 20,
        "{in_flight} bytes accepted while the reader read nothing"
    );
    // Now the slow reader takes everything, exact.
    for i in 0..TOTAL / PERIOD {
        let part = client.read_exact(PERIOD, LONG);
        assert!(part == period, "bytes differ in MiB {i}");
    }
    writer.join().unwrap();
}

#[test]
fn handshake_deadline_closes_silent_connections() {
    let s = setup();
    let mut silent = TcpStream::connect(s.addr).unwrap();
    let start = Instant::now();
    let mut plain = s.accept(Duration::from_millis(300));
    s.wait_counts(counts(1, 0, 1));
    silent.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 16];
    let n = silent.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the server sent something");
    assert!(start.elapsed() >= Duration::from_millis(300));
    assert!(wait_eof(&mut plain, DEADLINE).is_empty());
    s.wait_counts(counts(0, 0, 0));
}

#[test]
fn plain_http_on_the_tls_port_gets_400() {
    let s = setup();
    let mut http = TcpStream::connect(s.addr).unwrap();
    let mut plain = s.accept(DEADLINE);
    http.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let answer = wait_eof(&mut http, DEADLINE);
    let text = String::from_utf8(answer).unwrap();
    assert!(text.starts_with("HTTP/1.0 400 Bad Request\r\n"), "{text}");
    assert!(
        text.ends_with("This port speaks HTTPS: use https://\n"),
        "{text}"
    );
    // The server's end never saw a byte.
    assert!(wait_eof(&mut plain, DEADLINE).is_empty());
    s.wait_counts(counts(0, 0, 0));

    // And curl, told http:// for the TLS port.
    let url = format!("http://127.0.0.1:{}/", s.addr.port());
    let curl = std::thread::spawn(move || {
        Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "20",
                &url,
            ])
            .output()
            .unwrap()
    });
    let _plain = s.accept(DEADLINE);
    let out = curl.join().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "400");
}

#[test]
fn garbage_is_closed_without_harm() {
    let s = setup();
    let (mut client, plain) = s.established();
    let echoed = echo(plain);
    let mut hello_half = client_hello(s.pki.client_config());
    hello_half.truncate(hello_half.len() / 2);
    let mut bad_hello = client_hello(s.pki.client_config());
    // A ClientHello whose handshake length lies.
    bad_hello[6] ^= 0x7f;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("zeros", vec![0u8; 1000]),
        (
            "a TLS record header, then junk",
            [&[0x16, 3, 1, 0, 200][..], &[0xaa; 200]].concat(),
        ),
        ("an oversized record", vec![0x16, 3, 1, 0xff, 0xff, 1, 2, 3]),
        ("a broken ClientHello", bad_hello),
        ("noise", pattern(7, 5000)),
        ("lower-case text", b"hello there\r\n\r\n".to_vec()),
    ];
    for (what, bytes) in cases {
        let mut bad = TcpStream::connect(s.addr).unwrap();
        let mut bad_plain = s.accept(DEADLINE);
        let _ = bad.write_all(&bytes);
        // A TLS alert at most, then the end.
        let answer = wait_eof(&mut bad, DEADLINE);
        assert!(answer.len() < 64, "{what}: {} bytes back", answer.len());
        assert!(
            answer.is_empty() || answer[0] == 0x15,
            "{what}: not an alert"
        );
        assert!(wait_eof(&mut bad_plain, DEADLINE).is_empty(), "{what}");
        // The established stream is unaffected.
        assert_eq!(
            client.transfer(what.as_bytes(), what.len(), DEADLINE),
            what.as_bytes()
        );
    }
    // Half a ClientHello, then the client goes: closed.
    let mut half = TcpStream::connect(s.addr).unwrap();
    let mut half_plain = s.accept(DEADLINE);
    half.write_all(&hello_half).unwrap();
    drop(half);
    assert!(wait_eof(&mut half_plain, DEADLINE).is_empty());
    s.wait_counts(counts(0, 1, 1));
    client.close();
    echoed.join().unwrap();
    s.wait_counts(counts(0, 0, 0));
}

#[test]
fn half_open_handshake_flood_does_not_stall_established_streams() {
    let s = setup();
    const STREAMS: usize = 4;
    const FLOOD: usize = 200;
    const LEN: usize = 4 << 20;
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let (client, plain) = s.established();
        streams.push((client, plain));
    }
    // Half the flood sends nothing, half sends half a ClientHello; their deadline is
    // far, so they are all pending while the streams flow.
    let mut hello_half = client_hello(s.pki.client_config());
    hello_half.truncate(hello_half.len() / 2);
    let mut flood = Vec::new();
    for i in 0..FLOOD {
        let mut c = TcpStream::connect(s.addr).unwrap();
        if i % 2 == 1 {
            c.write_all(&hello_half).unwrap();
        }
        let plain = s.accept(LONG);
        flood.push((c, plain));
    }
    s.wait_counts(counts(FLOOD, STREAMS, FLOOD + STREAMS));
    let (mut clients, plains): (Vec<TlsClient>, Vec<UnixStream>) = streams.into_iter().unzip();
    let writers: Vec<_> = plains
        .into_iter()
        .map(|plain| send_and_close(plain, LEN))
        .collect();
    for client in clients.iter_mut() {
        let (got, ending) = client.read_to_end(LONG);
        assert_eq!(got.len(), LEN);
        assert!(got == pattern(0, LEN), "bytes differ");
        assert_eq!(ending, Ending::CloseNotify);
        client.close();
    }
    for w in writers {
        w.join().unwrap();
    }
    // The flood was pending all along; its clients leave, their connections close.
    assert_eq!(s.counts().handshaking, FLOOD);
    for (c, mut plain) in flood {
        drop(c);
        assert!(wait_eof(&mut plain, DEADLINE).is_empty());
    }
    s.wait_counts(counts(0, 0, 0));
}

#[test]
fn curl_downloads_exact_bytes_over_https() {
    let s = setup();
    const LEN: usize = 5 << 20;
    for host in ["localhost", "127.0.0.1"] {
        let out_file = s.pki.path("curl.out");
        let url = format!("https://{host}:{}/stream", s.addr.port());
        let ca = s.pki.ca.clone();
        let out_path = out_file.clone();
        let curl = std::thread::spawn(move || {
            Command::new("curl")
                .args(["-sS", "--max-time", "30", "--cacert"])
                .arg(&ca)
                .arg("-o")
                .arg(&out_path)
                .arg(&url)
                .output()
                .unwrap()
        });
        let mut plain = s.accept(DEADLINE);
        plain.set_nonblocking(false).unwrap();
        // An HTTP/1.0 answer without length: the stream ends with the connection, so
        // curl succeeds only if it ends with close_notify.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            plain.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"GET /stream HTTP/1.1\r\n"));
        plain
            .write_all(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
            .unwrap();
        send_and_close(plain, LEN).join().unwrap();
        let out = curl.join().unwrap();
        assert!(
            out.status.success(),
            "curl {host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = std::fs::read(&out_file).unwrap();
        assert_eq!(got.len(), LEN);
        assert!(got == pattern(0, LEN), "bytes differ");
    }
    s.wait_counts(counts(0, 0, 0));
}

#[test]
fn dropping_the_terminator_closes_everything() {
    let s = setup();
    let (mut client, mut plain) = s.established();
    let mut silent = TcpStream::connect(s.addr).unwrap();
    let mut silent_plain = s.accept(DEADLINE);
    s.wait_counts(counts(1, 1, 2));
    let Setup {
        pki: _pki, term, ..
    } = s;
    drop(term);
    // The established stream gets a clean end; the handshake is just closed.
    let (_, ending) = client.read_to_end(DEADLINE);
    assert_eq!(ending, Ending::CloseNotify);
    assert!(wait_eof(&mut plain, DEADLINE).is_empty());
    assert!(wait_eof(&mut silent_plain, DEADLINE).is_empty());
    silent.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(silent.read(&mut buf).unwrap_or(0), 0);
}

/// Through the terminator a stalled TLS viewer is a slow client to the engine: its
/// plaintext end fills, `rsmultifdsink` removes it (`slow`), and a TLS viewer that
/// reads gets every byte meanwhile.
#[test]
fn a_stalled_tls_viewer_is_a_slow_client_to_the_engine() {
    use common::{Event, Recorder, SinkHarness, harness};
    use std::os::fd::AsRawFd;
    let s = setup();
    let mut h = harness("rsmultifdsink", &[("units-max", "40")]);
    let rec = Recorder::attach(&h.sink());
    h.set_src_caps_str(common::CHECK_CAPS);

    let (mut reader, reader_plain) = s.established();
    let (stalled, stalled_plain) = s.established_small_buffers();
    s.wait_counts(counts(0, 2, 2));
    h.add_fd(reader_plain.as_raw_fd());
    h.add_fd(stalled_plain.as_raw_fd());

    const BUFFERS: usize = 200;
    const SIZE: usize = 64 * 1024;
    let total = BUFFERS * SIZE;
    let reading = std::thread::spawn(move || {
        let got = reader.read_exact(total, LONG);
        (reader, got)
    });
    for i in 0..BUFFERS {
        h.push_bytes(&pattern(i * SIZE, SIZE), false);
    }
    let (reader, got) = reading.join().unwrap();
    assert!(
        got == pattern(0, total),
        "the reading viewer's bytes differ"
    );
    let stalled_fd = stalled_plain.as_raw_fd();
    rec.wait_for("the stalled viewer removed as slow", |e| {
        e.contains(&Event::Removed(stalled_fd, "slow".into()))
    });
    assert!(
        !rec.events()
            .contains(&Event::Removed(reader_plain.as_raw_fd(), "slow".into())),
        "{:?}",
        rec.events()
    );
    // The application closes the fd it handed over: the terminator drops the
    // connection (within its linger) and keeps the other.
    rec.wait_fd_removed(stalled_fd);
    drop(stalled_plain);
    wait_until_within("the stalled connection closed", LONG, || {
        s.counts() == counts(0, 1, 1)
    });
    drop(stalled);
    h.stop();
    drop(reader_plain);
    drop(reader);
    s.wait_counts(counts(0, 0, 0));
}
