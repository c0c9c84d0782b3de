// SPDX-License-Identifier: MPL-2.0

//! The threads around the clients: the producer, the state cycler, the property
//! changer and the sampler of the queue and the fds.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gst::prelude::*;
use nix::fcntl::{FcntlArg, fcntl};

use super::app::Ctx;
use super::checks::Check;
use super::clients::random_bound;
use super::rng::Rng;
use super::stream::{Sizes, make_buffer, streamheader_bytes};
use super::{
    BUFFERS_MIN, RECOVER, SYNC_METHODS, TIMEOUT_MS, UNITS_MAX, UNITS_SOFT_MAX, identity, open_fds,
    pace,
};

/// Stream-start, caps with the streamheader, and a segment: what the sink needs
/// before buffers.
pub fn push_stream_events(src: &gst::Pad) -> bool {
    let caps = gst::Caps::builder("application/x-stress")
        .field(
            "streamheader",
            gst::Array::new([{
                let mut b = gst::Buffer::from_slice(streamheader_bytes());
                b.get_mut().unwrap().set_flags(gst::BufferFlags::HEADER);
                b.to_send_value()
            }]),
        )
        .build();
    let segment = gst::FormattedSegment::<gst::ClockTime>::new();
    src.push_event(gst::event::StreamStart::new("stress"))
        && src.push_event(gst::event::Caps::new(&caps))
        && src.push_event(gst::event::Segment::new(&segment))
}

pub fn producer(ctx: Arc<Ctx>) {
    let beat = ctx.beat("producer".into());
    let mut seq = 0u64;
    let mut next = Instant::now();
    while !ctx.stop_producer.load(Ordering::Relaxed) {
        beat.beat("pushing");
        if ctx.need_events.swap(false, Ordering::SeqCst) {
            Ctx::inc(&ctx.n.event_resends);
            if !push_stream_events(&ctx.src) {
                // Not active yet (the cycler is between states): try again shortly.
                ctx.need_events.store(true, Ordering::SeqCst);
                pace(2);
                continue;
            }
        }
        let buffer = make_buffer(seq, ctx.period, Sizes::Mixed);
        let len = buffer.size() as u64;
        match ctx.src.push(buffer) {
            Ok(_) => {
                seq += 1;
                Ctx::inc(&ctx.n.pushed);
                ctx.n.pushed_bytes.fetch_add(len, Ordering::Relaxed);
            }
            Err(gst::FlowError::Flushing) => {
                // Not rendered: push the same buffer again once the sink is back.
                Ctx::inc(&ctx.n.push_flushing);
                ctx.need_events.store(true, Ordering::SeqCst);
                pace(2);
                continue;
            }
            Err(e) => {
                Ctx::inc(&ctx.n.push_errors);
                ctx.problem(Check::Producer, format!("push of buffer {seq}: {e:?}"));
                ctx.need_events.store(true, Ordering::SeqCst);
                pace(2);
                continue;
            }
        }
        next += ctx.period;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else if now - next > Duration::from_millis(100) {
            next = now;
        }
    }
    beat.done();
}

#[derive(Clone, Copy, Debug)]
enum Cycle {
    /// PLAYING → PAUSED → READY → NULL → PLAYING.
    Full,
    /// PLAYING → PAUSED → PLAYING.
    Paused,
    /// PLAYING → PAUSED → READY → PLAYING.
    Ready,
}

pub fn set_state(ctx: &Ctx, state: gst::State) {
    if let Err(e) = ctx.sink.set_state(state) {
        Ctx::inc(&ctx.n.state_errors);
        ctx.problem(Check::States, format!("set_state({state:?}): {e}"));
    }
}

pub fn cycler(ctx: Arc<Ctx>) {
    let beat = ctx.beat("cycler".into());
    let mut rng = Rng::new(ctx.opts.seed ^ 0xC1C1);
    let mut plan = Vec::new();
    for i in 0..ctx.opts.full_cycles.max(ctx.opts.partial_cycles) {
        if i < ctx.opts.full_cycles {
            plan.push(Cycle::Full);
        }
        if i < ctx.opts.partial_cycles {
            plan.push(if i % 2 == 0 {
                Cycle::Paused
            } else {
                Cycle::Ready
            });
        }
    }
    let total = plan.len() as u64;
    for (i, cycle) in plan.into_iter().enumerate() {
        let threshold = ctx.opts.connects * (i as u64 + 1) / (total + 1);
        {
            let mut l = ctx.lock();
            while l.connects < threshold && !ctx.stop_actions.load(Ordering::Relaxed) {
                beat.beat("waiting for the next cycle");
                l = ctx
                    .changed
                    .wait_timeout(l, Duration::from_millis(500))
                    .unwrap()
                    .0;
            }
        }
        if ctx.stop_actions.load(Ordering::Relaxed) {
            break;
        }
        let mut step = |what: &'static str, state: gst::State| {
            beat.beat(what);
            set_state(&ctx, state);
            beat.beat(what);
            pace(rng.range(10, 150));
        };
        step("to PAUSED", gst::State::Paused);
        match cycle {
            Cycle::Paused => {}
            Cycle::Ready => {
                step("to READY", gst::State::Ready);
                ctx.need_events.store(true, Ordering::SeqCst);
            }
            Cycle::Full => {
                step("to READY", gst::State::Ready);
                ctx.need_events.store(true, Ordering::SeqCst);
                {
                    let mut l = ctx.lock();
                    l.null_in_flight = true;
                    l.mark_all_hard();
                }
                step("to NULL", gst::State::Null);
                ctx.lock().null_in_flight = false;
                ctx.need_events.store(true, Ordering::SeqCst);
            }
        }
        step("to PLAYING", gst::State::Playing);
        match cycle {
            Cycle::Full => Ctx::inc(&ctx.n.full_cycles),
            _ => Ctx::inc(&ctx.n.partial_cycles),
        }
    }
    beat.done();
}

pub fn property_thread(ctx: Arc<Ctx>) {
    let beat = ctx.beat("properties".into());
    let mut rng = Rng::new(ctx.opts.seed ^ 0x9009);
    let sink = &ctx.sink;
    while !ctx.stop_actions.load(Ordering::Relaxed) {
        beat.beat("changing properties");
        match rng.below(8) {
            0 => sink.set_property("units-max", rng.pick(&UNITS_MAX)),
            1 => sink.set_property("units-soft-max", rng.pick(&UNITS_SOFT_MAX)),
            2 => sink.set_property_from_str("recover-policy", rng.pick(&RECOVER)),
            3 => sink.set_property("timeout", rng.pick(&TIMEOUT_MS) * 1_000_000),
            4 => sink.set_property("buffers-min", rng.pick(&BUFFERS_MIN)),
            5 => {
                let (format, value) = random_bound(&mut rng);
                sink.set_property("burst-format", format);
                sink.set_property("burst-value", value);
            }
            6 => sink.set_property_from_str("sync-method", rng.pick(&SYNC_METHODS)),
            _ => {
                let _ = sink.property::<u32>("num-handles");
                let _ = sink.property::<u64>("bytes-served");
                let _ = sink.property::<u64>("time-queued");
            }
        }
        Ctx::inc(&ctx.n.prop_changes);
        if rng.chance(10.0) {
            Ctx::inc(&ctx.n.bursts);
            ctx.burst.fetch_add(1, Ordering::Relaxed);
        }
        pace(rng.range(30, 250));
    }
    beat.done();
}

/// Samples the queue and the fds; checks that every fd we own is still ours.
pub fn sampler(ctx: Arc<Ctx>) {
    let beat = ctx.beat("sampler".into());
    let mut last_fd_count = Instant::now() - Duration::from_secs(1);
    while !ctx.stop_monitor.load(Ordering::Relaxed) {
        beat.beat("reading buffers-queued");
        let queued = ctx.sink.property::<u32>("buffers-queued") as u64;
        let bytes = ctx.sink.property::<u64>("bytes-queued");
        Ctx::peak(&ctx.n.peak_queued, queued);
        Ctx::peak(&ctx.n.peak_bytes_queued, bytes);
        if queued > ctx.queue_bound {
            ctx.problem(
                Check::Queue,
                format!(
                    "buffers-queued {queued} above the bound {}",
                    ctx.queue_bound
                ),
            );
        }
        beat.beat("checking fds");
        let mut lost = Vec::new();
        {
            let mut l = ctx.lock();
            for s in l.slots.values_mut() {
                if let Some(sink) = &s.sink {
                    Ctx::inc(&ctx.n.fd_checks);
                    let open = fcntl(sink.as_fd(), FcntlArg::F_GETFD).is_ok();
                    if !open || identity(sink.as_fd()) != s.ident {
                        lost.push(s.fd);
                        s.forget_fd();
                    }
                }
            }
        }
        for fd in lost {
            ctx.problem(
                Check::FdsOpen,
                format!("fd {fd} closed or replaced while the application owns it"),
            );
        }
        if last_fd_count.elapsed() >= Duration::from_millis(500) {
            last_fd_count = Instant::now();
            Ctx::peak(&ctx.n.peak_fds, open_fds() as u64);
        }
        pace(50);
    }
    beat.done();
}
