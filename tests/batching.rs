// SPDX-License-Identifier: MPL-2.0

//! Write batching (`batch-time`): a caught-up client's new data waits up to the
//! batch time so that several buffers go out in one call, spread over the clients;
//! new clients, flushes, the end of the stream and limits are not delayed.
//!
//! SOCK_SEQPACKET socketpairs keep each `sendmsg` one record, so the reader counts
//! the engine's calls.

mod common;

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{SinkHarness, harness};
use gst::prelude::*;
use gstrsmultifdsink::engine::{
    AddOutcome, Amount, Chunk, ClientConfig, ClientStatus, Engine, Fd, Listener, Settings, Unit,
};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

/// Generous bounds for "at once" on a loaded 2-core machine; far below the batch
/// times the tests hold data back for.
const PROMPT: Duration = Duration::from_secs(2);
const LONG_BATCH: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Removals(Mutex<Vec<(Fd, ClientStatus)>>);

impl Listener for Removals {
    fn client_added(&self, _fd: Fd) {}
    fn client_removed(&self, fd: Fd, status: ClientStatus) {
        self.0.lock().unwrap().push((fd, status));
    }
    fn client_fd_removed(&self, _fd: Fd) {}
}

struct Fixture {
    engine: Engine,
    removals: Arc<Removals>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.engine.stop();
    }
}

impl Fixture {
    fn new(settings: Settings) -> Fixture {
        let removals = Arc::new(Removals::default());
        let engine = Engine::new(removals.clone()).unwrap();
        engine.set_settings(settings);
        engine.start().unwrap();
        Fixture { engine, removals }
    }

    fn add(&self, fd: RawFd) {
        assert_eq!(
            self.engine.add(fd, ClientConfig::default()),
            AddOutcome::Added
        );
    }

    fn push(&self, data: Vec<u8>) {
        self.engine.push(Chunk::from_vec(data, true, false, None));
    }

    fn removals(&self) -> Vec<(Fd, ClientStatus)> {
        self.removals.0.lock().unwrap().clone()
    }
}

fn batched(period: Duration) -> Settings {
    Settings {
        batch_time: Some(period),
        ..Settings::default()
    }
}

/// (the engine's end, the reader's end)
fn pair(kind: SockType) -> (OwnedFd, OwnedFd) {
    socketpair(AddressFamily::Unix, kind, None, SockFlag::SOCK_CLOEXEC).unwrap()
}

fn buffer(i: u8, len: usize) -> Vec<u8> {
    vec![i; len]
}

/// Reads records (SOCK_SEQPACKET) or chunks until `total` bytes came or `within`
/// passed; returns each read's bytes and when it was read.
fn read_until(fd: &OwnedFd, total: usize, within: Duration) -> Vec<(Vec<u8>, Instant)> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut n = 0;
    while n < total {
        let Some(left) = within.checked_sub(start.elapsed()) else {
            break;
        };
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        let ms = left.as_millis().min(u16::MAX.into()) as u16;
        if poll(&mut fds, PollTimeout::from(ms)).unwrap() == 0 {
            continue;
        }
        let mut buf = vec![0u8; 1 << 20];
        let k = nix::unistd::read(fd, &mut buf).unwrap();
        assert!(k > 0, "unexpected end of stream");
        buf.truncate(k);
        n += k;
        got.push((buf, Instant::now()));
    }
    got
}

fn concat(reads: &[(Vec<u8>, Instant)]) -> Vec<u8> {
    reads.iter().flat_map(|(b, _)| b.clone()).collect()
}

#[test]
fn buffers_arriving_within_the_batch_time_go_out_in_one_call() {
    let period = Duration::from_secs(1);
    let f = Fixture::new(batched(period));
    let (mine, peer) = pair(SockType::SeqPacket);
    f.add(mine.as_raw_fd());
    f.push(buffer(0, 100));
    // A new client is placed and written at once: not held for a batch.
    let first = read_until(&peer, 100, PROMPT);
    assert_eq!(concat(&first), buffer(0, 100), "the first buffer, promptly");
    // Five buffers 20 ms apart: unbatched, each would be a call of its own.
    let start = Instant::now();
    for i in 1..=5 {
        f.push(buffer(i, 100));
        std::thread::sleep(Duration::from_millis(20));
    }
    let reads = read_until(&peer, 500, period + PROMPT);
    let want: Vec<u8> = (1..=5).flat_map(|i| buffer(i, 100)).collect();
    assert_eq!(concat(&reads), want, "exact bytes");
    // One call, or two if the client's slot came between two of the pushes.
    assert!(reads.len() <= 2, "{} calls for 5 buffers", reads.len());
    let latency = reads.last().unwrap().1 - start;
    assert!(
        latency <= period + Duration::from_millis(300),
        "the batch waited {latency:?}, more than {period:?} plus scheduling"
    );
    assert!(f.removals().is_empty());
}

#[test]
fn a_steady_stream_is_written_once_per_period() {
    // A buffer every 5 ms for a second, a 100 ms batch time: about ten calls. The
    // queue is trimmed meanwhile, so batches a client left long ago end too: they
    // must not cut its current batch short.
    let period = Duration::from_millis(100);
    let f = Fixture::new(batched(period));
    let (mine, peer) = pair(SockType::SeqPacket);
    f.add(mine.as_raw_fd());
    let start = Instant::now();
    let mut pushed = 0usize;
    while start.elapsed() < Duration::from_secs(1) {
        f.push(buffer(pushed as u8, 16));
        pushed += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = start.elapsed();
    f.engine.end_batches();
    let reads = read_until(&peer, pushed * 16, PROMPT);
    let want: Vec<u8> = (0..pushed).flat_map(|i| buffer(i as u8, 16)).collect();
    assert_eq!(concat(&reads), want);
    let most = (elapsed.as_millis() / period.as_millis()) as usize + 3;
    assert!(
        reads.len() <= most,
        "{} calls for {pushed} buffers in {elapsed:?} (at most {most})",
        reads.len()
    );
}

#[test]
fn a_new_client_is_not_delayed_and_the_end_of_stream_flushes_at_once() {
    let f = Fixture::new(batched(LONG_BATCH));
    f.engine
        .set_streamheader(Some(vec![Arc::new(b"HEADER".to_vec())]));
    let (mine, peer) = pair(SockType::Stream);
    f.add(mine.as_raw_fd());
    f.push(buffer(1, 10));
    let first = read_until(&peer, 16, PROMPT);
    assert_eq!(concat(&first), [b"HEADER".to_vec(), buffer(1, 10)].concat());
    f.push(buffer(2, 10));
    assert!(
        read_until(&peer, 1, Duration::from_millis(300)).is_empty(),
        "a caught-up client's next buffer waits for its batch"
    );
    let start = Instant::now();
    f.engine.end_batches();
    let rest = read_until(&peer, 10, PROMPT);
    assert_eq!(concat(&rest), buffer(2, 10));
    assert!(start.elapsed() < PROMPT);
}

#[test]
fn remove_flush_does_not_wait_for_the_batch() {
    let f = Fixture::new(batched(LONG_BATCH));
    let (mine, peer) = pair(SockType::Stream);
    let fd = mine.as_raw_fd();
    f.add(fd);
    f.push(buffer(1, 10));
    assert_eq!(concat(&read_until(&peer, 10, PROMPT)), buffer(1, 10));
    f.push(buffer(2, 10));
    assert!(f.engine.remove_flush(fd));
    assert_eq!(concat(&read_until(&peer, 10, PROMPT)), buffer(2, 10));
    let start = Instant::now();
    while f.removals().is_empty() && start.elapsed() < PROMPT {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(f.removals(), vec![(fd, ClientStatus::Removed)]);
}

#[test]
fn a_waiting_client_past_units_max_is_written_not_removed() {
    let f = Fixture::new(Settings {
        units_max: Some(Amount::new(Unit::Buffers, 3)),
        ..batched(LONG_BATCH)
    });
    let (mine, peer) = pair(SockType::Stream);
    f.add(mine.as_raw_fd());
    f.push(buffer(0, 10));
    assert_eq!(concat(&read_until(&peer, 10, PROMPT)), buffer(0, 10));
    // Past units-max it is made ready at once, so no push waits for it long (a
    // push waits up to its limit of a second for clients that lag unwritten and
    // are not written meanwhile).
    for i in 1..=8 {
        let report = f
            .engine
            .push(Chunk::from_vec(buffer(i, 10), true, false, None));
        assert!(
            report.waited < Duration::from_millis(900),
            "push {i} waited {:?} for the IO thread",
            report.waited
        );
    }
    let want: Vec<u8> = (1..=8).flat_map(|i| buffer(i, 10)).collect();
    assert_eq!(concat(&read_until(&peer, 80, PROMPT)), want);
    assert!(f.removals().is_empty(), "{:?}", f.removals());
}

#[test]
fn a_batch_goes_early_once_it_holds_64_kib() {
    let f = Fixture::new(batched(LONG_BATCH));
    let (mine, peer) = pair(SockType::Stream);
    f.add(mine.as_raw_fd());
    f.push(buffer(0, 10));
    assert_eq!(concat(&read_until(&peer, 10, PROMPT)), buffer(0, 10));
    // 15 × 4 KiB = 60 KiB waits; the 16th makes 64 KiB.
    for i in 1..=15 {
        f.push(buffer(i, 4096));
    }
    assert!(read_until(&peer, 1, Duration::from_millis(300)).is_empty());
    f.push(buffer(16, 4096));
    let want: Vec<u8> = (1..=16).flat_map(|i| buffer(i, 4096)).collect();
    assert_eq!(concat(&read_until(&peer, want.len(), PROMPT)), want);
}

#[test]
fn clients_waiting_for_their_batch_are_not_timed_out() {
    // Each client waits up to 400 ms with data, longer than the 150 ms timeout: it
    // waits for the sink, not for its peer, so it stays.
    let f = Fixture::new(Settings {
        timeout: Some(Duration::from_millis(150)),
        ..batched(Duration::from_millis(400))
    });
    let (mine, peer) = pair(SockType::Stream);
    f.add(mine.as_raw_fd());
    // The reader hands its end back, so the client is not closed before the check.
    let reader =
        std::thread::spawn(move || (concat(&read_until(&peer, 60 * 50, PROMPT * 3)), peer));
    for i in 0..60u8 {
        f.push(buffer(i, 50));
        std::thread::sleep(Duration::from_millis(20));
    }
    let want: Vec<u8> = (0..60).flat_map(|i| buffer(i, 50)).collect();
    let (got, _peer) = reader.join().unwrap();
    assert_eq!(got, want);
    assert!(f.removals().is_empty(), "{:?}", f.removals());
}

#[test]
fn clients_are_written_at_different_times_within_the_period() {
    let period = Duration::from_millis(100);
    let f = Fixture::new(batched(period));
    let pairs: Vec<(OwnedFd, OwnedFd)> = (0..40).map(|_| pair(SockType::Stream)).collect();
    for (mine, _) in &pairs {
        f.add(mine.as_raw_fd());
    }
    f.push(buffer(0, 10));
    for (_, peer) in &pairs {
        assert_eq!(concat(&read_until(peer, 10, PROMPT)), buffer(0, 10));
    }
    let start = Instant::now();
    f.push(buffer(1, 10));
    let mut arrivals = Vec::new();
    let mut fds: Vec<PollFd> = pairs
        .iter()
        .map(|(_, peer)| PollFd::new(peer.as_fd(), PollFlags::POLLIN))
        .collect();
    let mut pending: Vec<bool> = vec![true; pairs.len()];
    while pending.iter().any(|p| *p) && start.elapsed() < PROMPT + period {
        for (fd, p) in fds.iter_mut().zip(&pending) {
            fd.set_events(if *p {
                PollFlags::POLLIN
            } else {
                PollFlags::empty()
            });
        }
        poll(&mut fds, PollTimeout::from(100u16)).unwrap();
        let now = Instant::now();
        for (i, fd) in fds.iter().enumerate() {
            if pending[i] && fd.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)) {
                pending[i] = false;
                arrivals.push(now - start);
            }
        }
    }
    assert_eq!(arrivals.len(), pairs.len(), "every client got the buffer");
    let first = *arrivals.iter().min().unwrap();
    let last = *arrivals.iter().max().unwrap();
    // All at one tick would arrive within a millisecond or two of each other.
    assert!(
        last - first >= Duration::from_millis(40),
        "arrivals spread over only {:?}",
        last - first
    );
    assert!(
        last <= period + Duration::from_millis(300),
        "the last arrival came after {last:?}"
    );
    for (_, peer) in &pairs {
        assert_eq!(concat(&read_until(peer, 10, PROMPT)), buffer(1, 10));
    }
}

#[test]
fn turning_batching_off_sends_what_waits() {
    let f = Fixture::new(batched(LONG_BATCH));
    let (mine, peer) = pair(SockType::Stream);
    f.add(mine.as_raw_fd());
    f.push(buffer(0, 10));
    assert_eq!(concat(&read_until(&peer, 10, PROMPT)), buffer(0, 10));
    f.push(buffer(1, 10));
    assert!(read_until(&peer, 1, Duration::from_millis(300)).is_empty());
    f.engine.set_settings(Settings::default());
    assert_eq!(concat(&read_until(&peer, 10, PROMPT)), buffer(1, 10));
}

/// Through GStreamer: the `batch-time` property holds a caught-up client's data
/// back, and EOS sends what waits at once (in one call).
#[test]
fn batch_time_property_and_eos() {
    for (factory, port) in [("rsmultifdsink", None), ("rstcpserversink", Some("0"))] {
        let mut props = vec![("batch-time", "30000000000")];
        props.extend(port.map(|p| ("port", p)));
        let mut h = harness(factory, &props);
        assert_eq!(h.sink().property::<u64>("batch-time"), 30_000_000_000);
        let (mine, peer) = pair(SockType::SeqPacket);
        h.add_fd(mine.as_raw_fd());
        h.push_bytes(b"first", false);
        assert_eq!(concat(&read_until(&peer, 5, PROMPT)), b"first");
        for part in [&b"a"[..], b"b", b"c"] {
            h.push_bytes(part, true);
        }
        assert!(
            read_until(&peer, 1, Duration::from_millis(300)).is_empty(),
            "{factory}: held for the batch"
        );
        assert!(h.push_event(gst::event::Eos::new()));
        let reads = read_until(&peer, 3, PROMPT);
        assert_eq!(concat(&reads), b"abc", "{factory}");
        assert_eq!(reads.len(), 1, "{factory}: one call");
        h.stop();
    }
    let sink = gst::ElementFactory::make("rsmultifdsink").build().unwrap();
    assert_eq!(
        sink.property::<u64>("batch-time"),
        0,
        "default: write at once"
    );
}
