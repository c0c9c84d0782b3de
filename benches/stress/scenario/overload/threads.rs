// SPDX-License-Identifier: MPL-2.0

//! The overload phase's threads: the producer, the readers and the sampler.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gst::prelude::*;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use super::super::pace;
use super::super::stream::{Pumped, Sizes, Verifier, make_buffer};
use super::super::system::proc_status_kib;
use super::checks::Check;
use super::phase::{Kind, Phase, Stage};
use super::{BUFFER_SIZE, SLOW_CHUNK, SLOW_EVERY};

/// Nominal time between buffers, for their timestamps only (`sync=false`).
const PERIOD: Duration = Duration::from_millis(1);

/// Pushes buffers from `seq` on as fast as it can until told to stop or the sink
/// flushes (NULL). Returns the last buffer pushed, if any.
pub fn producer(phase: Arc<Phase>, mut seq: u64) -> Option<u64> {
    let beat = phase.beat("overload producer");
    let mut last = None;
    while !phase.stop_producer.load(Ordering::SeqCst) {
        beat.beat("pushing");
        let buffer = make_buffer(seq, PERIOD, Sizes::Fixed(BUFFER_SIZE));
        phase.pushing.store(seq, Ordering::SeqCst);
        let since = Instant::now();
        phase.push_since_us.store(
            phase.start.elapsed().as_micros() as u64 + 1,
            Ordering::SeqCst,
        );
        let pushed = phase.src.push(buffer);
        phase.push_since_us.store(0, Ordering::SeqCst);
        phase
            .n
            .longest_push_us
            .fetch_max(since.elapsed().as_micros() as u64, Ordering::Relaxed);
        match pushed {
            Ok(_) => {
                last = Some(seq);
                seq += 1;
                phase.n.pushed.fetch_add(1, Ordering::Relaxed);
            }
            // NULL: the sink let go of the push.
            Err(gst::FlowError::Flushing) => break,
            Err(e) => {
                let (check, when) = match phase.stage() {
                    Stage::Null => (Check::Null, "during NULL (not Flushing)"),
                    _ => (Check::Ended, "before NULL"),
                };
                phase.problem(check, format!("push of buffer {seq} {when}: {e:?}"));
                break;
            }
        }
    }
    beat.done();
    last
}

/// The reading end of one client.
struct Item {
    client: usize,
    fd: Option<OwnedFd>,
    verifier: Verifier,
    in_epoll: bool,
    next_slow: Instant,
    /// It has the drain's last buffer.
    at_target: bool,
}

impl Item {
    /// Reads up to `max` bytes (until EAGAIN) and publishes the progress.
    fn pump(&mut self, phase: &Phase, buf: &mut [u8], max: usize) -> Pumped {
        let Some(fd) = self.fd.as_ref() else {
            return Pumped::Eof;
        };
        let pumped = self.verifier.pump(fd.as_fd(), buf, max);
        phase.clients[self.client].progress.publish(&self.verifier);
        if !self.at_target && self.verifier.last_whole == phase.drain_target() {
            // The main thread waits for every kept client to get here.
            self.at_target = true;
            let _finished = phase.finished();
            phase.changed.notify_all();
        }
        pumped
    }

    /// Whether this reader reads everything it can now.
    fn fast(&self, phase: &Phase) -> bool {
        let c = &phase.clients[self.client];
        c.drain.load(Ordering::Relaxed)
            || match c.kind {
                Kind::Fast => true,
                Kind::Slow => phase.all_fast.load(Ordering::Relaxed),
                Kind::Stalled => false,
            }
    }

    /// Reads as the kind says: everything once fast (epoll from then on), SLOW_CHUNK
    /// every SLOW_EVERY while slow, nothing while stalled.
    fn read(&mut self, phase: &Phase, epoll: &Epoll, buf: &mut [u8], now: Instant) -> Pumped {
        if self.fast(phase) {
            self.in_epoll = true;
            let fd = self.fd.as_ref().unwrap();
            epoll
                .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, self.client as u64))
                .expect("epoll add");
            self.pump(phase, buf, usize::MAX)
        } else if phase.clients[self.client].kind == Kind::Slow && now >= self.next_slow {
            // A steady rate: a late tick does not read more.
            self.next_slow = (self.next_slow + SLOW_EVERY).max(now);
            self.pump(phase, buf, SLOW_CHUNK)
        } else {
            Pumped::More
        }
    }
}

/// Reads the given clients (by index) until each stream ended, verifying every
/// byte; hands each verifier to its client at the end.
pub fn reader(phase: Arc<Phase>, idx: usize, fds: Vec<(usize, OwnedFd)>) {
    let beat = phase.beat(&format!("overload reader {idx}"));
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).expect("epoll");
    let now = Instant::now();
    let mut items: HashMap<usize, Item> = fds
        .into_iter()
        .map(|(client, fd)| {
            let item = Item {
                client,
                fd: Some(fd),
                verifier: Verifier::new(Sizes::Fixed(BUFFER_SIZE)),
                in_epoll: false,
                next_slow: now,
                at_target: false,
            };
            (client, item)
        })
        .collect();
    let mut events = vec![EpollEvent::empty(); 256];
    let mut buf = vec![0u8; 65536];
    while !items.is_empty() {
        beat.beat("reading");
        let n = epoll
            .wait(&mut events, EpollTimeout::from(5u16))
            .unwrap_or(0);
        let pass = Instant::now();
        let mut done = Vec::new();
        for ev in &events[..n] {
            let client = ev.data() as usize;
            if let Some(item) = items.get_mut(&client)
                && let Pumped::Eof = item.pump(&phase, &mut buf, usize::MAX)
            {
                done.push(client);
            }
        }
        let now = Instant::now();
        for item in items.values_mut().filter(|i| !i.in_epoll) {
            if let Pumped::Eof = item.read(&phase, &epoll, &mut buf, now) {
                done.push(item.client);
            }
        }
        phase
            .n
            .longest_reader_pass_us
            .fetch_max(pass.elapsed().as_micros() as u64, Ordering::Relaxed);
        for client in done {
            let Some(mut item) = items.remove(&client) else {
                continue;
            };
            if let Some(fd) = item.fd.take()
                && item.in_epoll
            {
                let _ = epoll.delete(&fd);
            }
            *phase.clients[client]
                .finished
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(item.verifier);
            *phase.finished() += 1;
            phase.changed.notify_all();
        }
    }
    beat.done();
}

/// Samples `buffers-queued`, `io-load` and RSS, and reads the element's bus, until
/// told to stop.
pub fn sampler(phase: Arc<Phase>) {
    let beat = phase.beat("overload sampler");
    let n = &phase.n;
    while !phase.stop_sampler.load(Ordering::Relaxed) {
        beat.beat("sampling");
        n.peak_queued.fetch_max(
            phase.sink.property::<u32>("buffers-queued").into(),
            Ordering::Relaxed,
        );
        n.peak_rss_kib
            .fetch_max(proc_status_kib("VmRSS:"), Ordering::Relaxed);
        if phase.has_io_load {
            let load = phase.sink.property::<f64>("io-load");
            let peak = f64::from_bits(n.peak_io_load.load(Ordering::Relaxed));
            n.peak_io_load
                .store(peak.max(load).to_bits(), Ordering::Relaxed);
        }
        while let Some(msg) = phase.bus.pop() {
            read_message(&phase, &msg);
        }
        pace(20);
    }
    while let Some(msg) = phase.bus.pop() {
        read_message(&phase, &msg);
    }
    beat.done();
}

/// Counts the element's warnings (those about overload apart); an error is a
/// problem.
fn read_message(phase: &Phase, msg: &gst::Message) {
    match msg.view() {
        gst::MessageView::Warning(w) => {
            phase.n.bus_warnings.fetch_add(1, Ordering::Relaxed);
            let text = format!("{} ({})", w.error(), w.debug().unwrap_or_default());
            if text.to_lowercase().contains("overload") {
                phase.n.overload_warnings.fetch_add(1, Ordering::Relaxed);
                let mut first = phase.n.first_overload_warning.lock().unwrap();
                first.get_or_insert(text);
            }
        }
        gst::MessageView::Error(e) => phase.problem(
            Check::Ended,
            format!(
                "error on the bus: {} ({})",
                e.error(),
                e.debug().unwrap_or_default()
            ),
        ),
        _ => {}
    }
}
