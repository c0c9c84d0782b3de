//! Overload seen from the element: when the IO thread, not the clients, is behind,
//! `render` waits instead of anybody being kicked, the bus hears of it once when it
//! starts and once when it ends, `io-load` shows it, and a state change while
//! `render` waits returns at once.
//!
//! The IO thread is made slower than the stream, whatever the machine, through
//! rsmultisocketsink's `send-dispatched`: each buffer written to a client pushes a
//! `GstNetworkMessageDispatched` event upstream from the IO thread, and a probe on
//! the harness's src pad makes each one cost time (or holds it at a gate).

mod common;

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::*;
use gst::prelude::*;
use gst_check::Harness;
use nix::sys::socket::{setsockopt, sockopt};

const BUFFER: usize = 16 * 1024;

/// A socketpair whose sink end holds a whole test stream: writes to it never fail
/// with EAGAIN however late its reader runs, so it can never be a slow client.
fn roomy_pair() -> (gio::Socket, UnixStream) {
    let (ours, peer) = UnixStream::pair().unwrap();
    setsockopt(&ours.as_fd(), sockopt::SndBufForce, &(8 << 20)).expect("SO_SNDBUFFORCE (root)");
    (gio::Socket::from_fd(OwnedFd::from(ours)).unwrap(), peer)
}

/// Reads `buffers` whole buffers from `peer` on a thread (with a deadline); gives
/// the peer back still open, so the client is not closed (and removed) before the
/// test has counted it.
fn read_all(mut peer: UnixStream, buffers: usize) -> std::thread::JoinHandle<(usize, UnixStream)> {
    peer.set_read_timeout(Some(*DEADLINE)).unwrap();
    std::thread::spawn(move || {
        let mut got = vec![0u8; buffers * BUFFER];
        peer.read_exact(&mut got).expect("every buffer arrives");
        let whole = got.chunks(BUFFER).filter(|b| b[0] == b[BUFFER - 1]).count();
        (whole, peer)
    })
}

/// Where the IO thread is held: every dispatched event costs `cost`, and waits
/// while the gate is closed.
#[derive(Clone, Default)]
struct IoBrake {
    cost: Arc<Mutex<Duration>>,
    gate: Arc<(Mutex<bool>, Condvar)>,
}

impl IoBrake {
    fn set_gate(&self, closed: bool) {
        *self.gate.0.lock().unwrap() = closed;
        self.gate.1.notify_all();
    }
}

/// rsmultisocketsink with `units-max` 4 buffers and a braked IO thread, its
/// messages on `bus`.
fn braked_sink(brake: &IoBrake, bus: &gst::Bus) -> Harness {
    let h = harness(
        "rsmultisocketsink",
        &[("send-dispatched", "true"), ("units-max", "4")],
    );
    h.sink().set_bus(Some(bus));
    let brake = brake.clone();
    h.srcpad()
        .unwrap()
        .add_probe(gst::PadProbeType::EVENT_UPSTREAM, move |_, _| {
            // Simulated work on the IO thread, not synchronisation.
            std::thread::sleep(*brake.cost.lock().unwrap());
            let (closed, cond) = &*brake.gate;
            let mut closed = closed.lock().unwrap();
            while *closed {
                closed = cond.wait(closed).unwrap();
            }
            gst::PadProbeReturn::Ok
        });
    h
}

fn buffer_of(i: usize) -> gst::Buffer {
    buffer(&vec![i as u8; BUFFER], i % 2 == 1, false)
}

/// The overload warnings posted so far: their `state` field.
fn overload_warnings(bus: &gst::Bus) -> Vec<String> {
    std::iter::from_fn(|| bus.pop_filtered(&[gst::MessageType::Warning]))
        .filter_map(|msg| match msg.view() {
            gst::MessageView::Warning(w) => w
                .details()
                .filter(|d| d.name() == "rsmultihandlesink-overload")
                .map(|d| d.get::<String>("state").unwrap()),
            _ => None,
        })
        .collect()
}

#[test]
fn overload_is_announced_once_each_way_and_nobody_is_kicked() {
    init();
    let brake = IoBrake::default();
    *brake.cost.lock().unwrap() = Duration::from_micros(500);
    let bus = gst::Bus::new();
    let mut h = braked_sink(&brake, &bus);
    h.set_src_caps_str(CHECK_CAPS);
    const BUFFERS: usize = 150;
    let mut sockets = Vec::new();
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (socket, peer) = roomy_pair();
            h.sink().emit_by_name::<()>("add", &[&socket]);
            sockets.push(socket);
            read_all(peer, BUFFERS + 1)
        })
        .collect();
    // io-load, read while the IO thread is the bottleneck (afterwards it idles).
    let mut busy = 0.0f64;
    for i in 0..BUFFERS {
        h.push_ok(buffer_of(i));
        busy = busy.max(h.sink().property::<f64>("io-load"));
    }
    assert_eq!(overload_warnings(&bus), vec!["started".to_string()]);
    h.wait_u64("bytes-served", (4 * BUFFERS * BUFFER) as u64);
    // The episode ends once a second passed without an overloaded push; the next
    // push announces it.
    std::thread::sleep(Duration::from_millis(1100));
    h.push_ok(buffer_of(BUFFERS));
    assert_eq!(overload_warnings(&bus), vec!["ended".to_string()]);
    let mut peers = Vec::new();
    for reader in readers {
        let (whole, peer) = reader.join().unwrap();
        assert_eq!(whole, BUFFERS + 1);
        peers.push(peer);
    }
    assert_eq!(h.sink().property::<u32>("num-handles"), 4);
    assert!(
        busy > 0.5,
        "io-load {busy} while the IO thread was the bottleneck"
    );
    h.stop();
}

#[test]
fn state_change_returns_at_once_while_render_waits_for_the_io_thread() {
    init();
    let brake = IoBrake::default();
    let bus = gst::Bus::new();
    let mut h = braked_sink(&brake, &bus);
    h.set_src_caps_str(CHECK_CAPS);
    let sink = h.sink();
    let (socket, peer) = roomy_pair();
    sink.emit_by_name::<()>("add", &[&socket]);
    // The IO thread stops at its first buffer: the client falls behind, never
    // blocked, and render waits.
    brake.set_gate(true);
    let pusher = std::thread::spawn(move || {
        for i in 0..20 {
            if h.push(buffer_of(i)).is_err() {
                break;
            }
        }
        h
    });
    let queued = (6 * BUFFER) as u64;
    let deadline = Instant::now() + *DEADLINE;
    while sink.property::<u64>("bytes-to-serve") < queued {
        assert!(Instant::now() < deadline, "render never got that far");
        std::thread::sleep(Duration::from_millis(1));
    }
    let start = Instant::now();
    sink.set_state(gst::State::Ready).unwrap();
    let took = start.elapsed();
    // Far below the 1 s one render may wait at most.
    assert!(took < Duration::from_millis(500), "READY took {took:?}");
    brake.set_gate(false);
    let h = pusher.join().unwrap();
    drop(peer);
    drop(socket);
    h.stop();
}
