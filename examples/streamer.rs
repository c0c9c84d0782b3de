//! The streamer of a Flumotion-style pair: receives sockets from the porter over a
//! UNIX socket (SCM_RIGHTS), writes the HTTP response headers itself, and hands each
//! socket to `rsmultifdsink` with `add-full` and a keyframe burst. When a client
//! leaves, it prints the client's stats and closes the socket.
//!
//! ```text
//! cargo run --example streamer -- /tmp/streamer.sock [--exit-after N]
//! ```
//! `--exit-after N` ends it once N clients have left (for tests).

use std::collections::HashMap;
use std::io::{IoSliceMut, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex, mpsc};

use gst::prelude::*;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!("usage: streamer SOCKET_PATH [--exit-after N]");
        std::process::exit(2);
    };
    let exit_after: Option<usize> = args
        .iter()
        .position(|a| a == "--exit-after")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse())
        .transpose()?;
    gst::init()?;
    gstrsmultifdsink::plugin_register_static()?;
    let pipeline = gst::parse::launch(
        "videotestsrc is-live=true ! video/x-raw,width=320,height=240,framerate=30/1 ! \
         vp8enc deadline=1 keyframe-max-dist=15 ! webmmux streamable=true ! \
         rsmultifdsink name=sink bytes-min=2000000 units-max=3000",
    )?
    .downcast::<gst::Pipeline>()
    .map_err(|_| "not a pipeline")?;
    let sink = pipeline.by_name("sink").ok_or("no sink")?;

    let owned: Arc<Mutex<HashMap<RawFd, OwnedFd>>> = Default::default();
    let (left_tx, left_rx) = mpsc::channel::<()>();
    sink.connect("client-removed", false, |args| {
        let sink = args[0].get::<gst::Element>().unwrap();
        let fd = args[1].get::<i32>().unwrap();
        let status = gst::glib::EnumValue::from_value(&args[2]).map_or("?", |(_, v)| v.nick());
        let s = sink.emit_by_name::<gst::Structure>("get-stats", &[&fd]);
        let get = |f: &str| s.get::<u64>(f).unwrap_or(0);
        println!(
            "client-removed fd={fd} status={status} bytes-sent={} connect-duration-ms={}",
            get("bytes-sent"),
            get("connect-duration") / 1_000_000
        );
        None
    });
    let closer = owned.clone();
    let left_tx = Mutex::new(left_tx);
    sink.connect("client-fd-removed", false, move |args| {
        let fd = args[1].get::<i32>().unwrap();
        closer.lock().unwrap().remove(&fd);
        let _ = left_tx.lock().unwrap().send(());
        None
    });
    pipeline.set_state(gst::State::Playing)?;

    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    println!("streamer: waiting for the porter on {path}");
    let (porter, _) = listener.accept()?;
    std::thread::spawn({
        let sink = sink.clone();
        move || {
            let sync_type = sink.property_value("sync-method").type_();
            let burst_keyframe = gst::glib::EnumClass::with_type(sync_type)
                .and_then(|c| c.to_value_by_nick("burst-keyframe"))
                .expect("rsmultifdsink has burst-keyframe");
            while let Some((fd, request)) = receive(porter.as_raw_fd()) {
                let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
                // The app writes its own response headers on the socket.
                let mut conn = unsafe { TcpStream::from_raw_fd(fd) };
                let head = "HTTP/1.0 200 OK\r\nContent-Type: video/webm\r\nCache-Control: no-cache\r\n\r\n";
                if conn.write_all(head.as_bytes()).is_err() {
                    continue;
                }
                let _ = conn.set_nonblocking(true);
                let fd = conn.into_raw_fd();
                owned
                    .lock()
                    .unwrap()
                    .insert(fd, unsafe { OwnedFd::from_raw_fd(fd) });
                println!("client-added fd={fd} path={path}");
                // Start on a keyframe with about 200 kB of burst, at most 1 MB.
                sink.emit_by_name_with_values(
                    "add-full",
                    &[
                        fd.to_value(),
                        burst_keyframe.clone(),
                        gst::Format::Bytes.to_value(),
                        200_000u64.to_value(),
                        gst::Format::Bytes.to_value(),
                        1_000_000u64.to_value(),
                    ],
                );
            }
        }
    });
    let mut left = 0;
    while left_rx.recv().is_ok() {
        left += 1;
        if exit_after.is_some_and(|n| left >= n) {
            break;
        }
    }
    pipeline.set_state(gst::State::Null)?;
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// One socket and its request from the porter; `None` when the porter is gone.
fn receive(porter: RawFd) -> Option<(RawFd, String)> {
    let mut len = [0u8; 4];
    let mut head = vec![0u8; 8192];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let (bytes, fd) = {
        let mut iov = [IoSliceMut::new(&mut len), IoSliceMut::new(&mut head)];
        let msg = recvmsg::<()>(
            porter,
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .ok()?;
        let fd = msg.cmsgs().ok()?.find_map(|c| match c {
            ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
            _ => None,
        });
        (msg.bytes, fd)
    };
    if bytes == 0 {
        return None;
    }
    let fd = fd?;
    let n = (u32::from_be_bytes(len) as usize).min(bytes.saturating_sub(4));
    Some((fd, String::from_utf8_lossy(&head[..n]).into_owned()))
}
