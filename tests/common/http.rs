//! Plain-socket HTTP clients of `rstcpserversink` on 127.0.0.1: connecting,
//! reading answers to their end within [`super::DEADLINE`], and the element's
//! client count.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use gst::prelude::*;

use super::{DEADLINE, init, wait_until};

/// An `rstcpserversink` with `props` set (from strings, in order), in NULL.
pub fn new_tcp_server_sink(props: &[(&str, &str)]) -> gst::Element {
    init();
    let sink = gst::ElementFactory::make("rstcpserversink")
        .build()
        .unwrap();
    for (k, v) in props {
        sink.set_property_from_str(k, v);
    }
    sink
}

/// Setting `sink` to READY must fail (the test fails naming `what` if it does
/// not); back in NULL, the error message it posted: the error's text and its
/// debug text.
pub fn fails_to_start(sink: &gst::Element, what: &str) -> (String, Option<String>) {
    let bus = gst::Bus::new();
    sink.set_bus(Some(&bus));
    assert!(
        sink.set_state(gst::State::Ready).is_err(),
        "READY with {what}"
    );
    let _ = sink.set_state(gst::State::Null);
    let msg = bus
        .pop_filtered(&[gst::MessageType::Error])
        .expect("an error message");
    let gst::MessageView::Error(e) = msg.view() else {
        unreachable!()
    };
    (e.error().to_string(), e.debug().map(|d| d.to_string()))
}

/// `num-handles` of the sink.
pub fn handles(sink: &gst::Element) -> u32 {
    sink.property::<u32>("num-handles")
}

/// Waits until the sink has `n` clients.
pub fn wait_handles(sink: &gst::Element, n: u32) {
    wait_until(&format!("num-handles {n}"), || handles(sink) == n);
}

/// A TCP connection to 127.0.0.1:`port`.
pub fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).unwrap()
}

/// A TCP connection to `to` on a socket that `prepare` sets up before it connects
/// (binds it to a source address, sets a buffer size); the connect's error, if any.
pub fn connect_prepared(to: SocketAddr, prepare: impl FnOnce(&OwnedFd)) -> nix::Result<TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, connect, socket};
    let family = if to.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
    prepare(&fd);
    connect(fd.as_raw_fd(), &SockaddrStorage::from(to))?;
    Ok(TcpStream::from(fd))
}

/// Where `needle` first starts in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One read with the time left before `start + DEADLINE` (at most 200 ms);
/// `None` when nothing came. A reset fails the test.
pub fn read_some(mut s: &TcpStream, start: Instant, buf: &mut [u8]) -> Option<usize> {
    let left = DEADLINE.saturating_sub(start.elapsed());
    assert!(!left.is_zero(), "timed out reading");
    s.set_read_timeout(Some(left.min(Duration::from_millis(200))))
        .unwrap();
    match s.read(buf) {
        Ok(n) => Some(n),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
            ) =>
        {
            None
        }
        Err(e) => panic!("read failed: {e} (reset instead of an orderly close?)"),
    }
}

/// Everything the peer sends until it closes; fails if it does not close in time
/// or resets.
pub fn read_to_eof(s: &TcpStream) -> Vec<u8> {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        assert!(
            start.elapsed() < *DEADLINE,
            "no EOF in time; got {} bytes: {:?}",
            out.len(),
            String::from_utf8_lossy(&out[..out.len().min(300)])
        );
        match read_some(s, start, &mut buf) {
            Some(0) => return out,
            Some(n) => out.extend_from_slice(&buf[..n]),
            None => {}
        }
    }
}

/// Reads a response head through its blank line; returns it and the bytes that
/// followed it in the same reads.
pub fn read_head(s: &TcpStream) -> (Vec<u8>, Vec<u8>) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = find(&got, b"\r\n\r\n") {
            let rest = got.split_off(end + 4);
            return (got, rest);
        }
        match read_some(s, start, &mut buf) {
            Some(0) => panic!(
                "EOF before the end of the head: {:?}",
                String::from_utf8_lossy(&got)
            ),
            Some(n) => got.extend_from_slice(&buf[..n]),
            None => {}
        }
    }
}

/// Like [`read_to_eof`], but a reset also ends the connection; says whether it was
/// reset.
pub fn read_until_closed(mut s: &TcpStream) -> (Vec<u8>, bool) {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let left = DEADLINE.saturating_sub(start.elapsed());
        assert!(
            !left.is_zero(),
            "not closed in time; got {} bytes",
            out.len()
        );
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return (out, false),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return (out, true),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("read failed: {e}"),
        }
    }
}
