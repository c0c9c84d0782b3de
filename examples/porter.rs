//! The porter of a Flumotion-style pair: accepts HTTP connections, reads each
//! request head, and passes the socket (with the request) over a UNIX socket to a
//! streamer process with SCM_RIGHTS. It never streams anything itself.
//!
//! ```text
//! cargo run --example streamer -- /tmp/streamer.sock &
//! cargo run --example porter -- 127.0.0.1:8800 /tmp/streamer.sock
//! ```
//! `--max-connections N` makes it exit after passing N connections (for tests).

use std::io::{IoSlice, Read};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(listen), Some(streamer)) = (args.first(), args.get(1)) else {
        eprintln!("usage: porter LISTEN_ADDR STREAMER_SOCKET [--max-connections N]");
        std::process::exit(2);
    };
    let max: Option<usize> = args
        .iter()
        .position(|a| a == "--max-connections")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse())
        .transpose()?;
    let listener = TcpListener::bind(listen)?;
    let to_streamer = UnixStream::connect(streamer)?;
    println!("porter: listening on {}", listener.local_addr()?);
    let mut passed = 0;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        match pass(&conn, &to_streamer) {
            Ok(()) => passed += 1,
            Err(e) => eprintln!("porter: dropped a connection: {e}"),
        }
        // Our copy closes here; the streamer holds its own.
        drop(conn);
        if max.is_some_and(|m| passed >= m) {
            break;
        }
    }
    Ok(())
}

/// Reads the request head and sends it, with the socket, to the streamer.
fn pass(conn: &TcpStream, to_streamer: &UnixStream) -> Result<(), Box<dyn std::error::Error>> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let mut reader = conn;
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = reader.read(&mut buf)?;
        if n == 0 || head.len() + n > 8192 {
            return Err("no complete request".into());
        }
        head.extend_from_slice(&buf[..n]);
    }
    // One message: the request as data (length-prefixed), the socket as ancillary data.
    let len = (head.len() as u32).to_be_bytes();
    let fds = [conn.as_raw_fd()];
    sendmsg::<()>(
        to_streamer.as_raw_fd(),
        &[IoSlice::new(&len), IoSlice::new(&head)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}
