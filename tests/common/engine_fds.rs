//! Fds and settings the GStreamer-free engine tests (tests/engine.rs,
//! tests/model.rs) both use. Included there with `#[path]` rather than through
//! `mod common`, which brings GStreamer with it.

use std::os::fd::OwnedFd;

use gstrsmultifdsink::engine::Settings;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

/// A connected UNIX stream socketpair (close-on-exec), its two ends.
pub fn unix_stream_pair() -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap()
}

/// A TCP connection on 127.0.0.1: (the accepted, server end; the client end).
pub fn tcp_pair() -> (OwnedFd, OwnedFd) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (server.into(), client.into())
}

/// The default settings with writes submitted through io_uring.
pub fn with_io_uring() -> Settings {
    Settings {
        io_uring: true,
        ..Settings::default()
    }
}

/// The default settings with zero-copy: data sent by `sendfile` from the memfd,
/// every buffer whatever the number of clients.
pub fn zero_copy() -> Settings {
    Settings {
        zero_copy: true,
        zero_copy_min_clients: 0,
        ..Settings::default()
    }
}
