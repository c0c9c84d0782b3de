// SPDX-License-Identifier: MPL-2.0

//! One element run: `rsmultifdsink` or the C `multifdsink` fed by a src pad of our
//! own, every client fd added, the producer's schedule pushed through it.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gst::prelude::*;

use crate::os::SharedCounters;
use crate::sink::{Measured, Meter, Next, Producer, wait_flushed};
use crate::spec::{Elem, FLAG_MEASURED, Spec, write_stamp};
use crate::system::init_gstreamer;

pub struct ElementRun {
    sink: gst::Element,
    src: gst::Pad,
    pool: gst::BufferPool,
    kicked: Arc<AtomicUsize>,
    lost: Arc<AtomicUsize>,
    owned: Arc<Mutex<HashMap<RawFd, OwnedFd>>>,
}

impl ElementRun {
    pub fn new(spec: &Spec, elem: Elem) -> ElementRun {
        init_gstreamer();
        let factory = match elem {
            Elem::Rs => "rsmultifdsink",
            _ => "multifdsink",
        };
        let sink = gst::ElementFactory::make(factory)
            .build()
            .unwrap_or_else(|_| panic!("no element {factory}"));
        // Identical settings for both elements; everything else stays default.
        sink.set_property("sync", false);
        sink.set_property_from_str("unit-format", "buffers");
        sink.set_property("units-max", spec.units_max);

        let kicked = Arc::new(AtomicUsize::new(0));
        let lost = Arc::new(AtomicUsize::new(0));
        let owned: Arc<Mutex<HashMap<RawFd, OwnedFd>>> = Default::default();
        let (k, l) = (kicked.clone(), lost.clone());
        sink.connect("client-removed", false, move |args| {
            let status = gst::glib::EnumValue::from_value(&args[2])
                .map(|(_, v)| v.nick())
                .unwrap_or("?");
            match status {
                "slow" => k.fetch_add(1, Ordering::SeqCst),
                "removed" => 0,
                _ => l.fetch_add(1, Ordering::SeqCst),
            };
            None
        });
        let o = owned.clone();
        sink.connect("client-fd-removed", false, move |args| {
            let fd = args[1].get::<i32>().unwrap();
            o.lock().unwrap().remove(&fd); // closes it
            None
        });
        let src = start_stream(&sink);
        ElementRun {
            sink,
            src,
            pool: buffer_pool(spec.size),
            kicked,
            lost,
            owned,
        }
    }

    fn alive(&self, n: usize) -> usize {
        n.saturating_sub(self.kicked.load(Ordering::SeqCst) + self.lost.load(Ordering::SeqCst))
    }

    pub fn run(self, spec: &Spec, fds: Vec<OwnedFd>, counters: &SharedCounters) -> Measured {
        let n = fds.len();
        self.add_all(fds);
        let mut p = Producer::new(spec);
        let mut meter = Meter::new();
        loop {
            match p.next(counters, self.alive(n)) {
                Next::Done => break,
                Next::Wait(d) => std::thread::sleep(d),
                Next::Push { measured } => {
                    meter.before_push(measured);
                    let buf = self.stamped_buffer(spec, p.seq, measured);
                    let t = Instant::now();
                    if let Err(e) = self.src.push(buf) {
                        panic!("push: {e:?}");
                    }
                    meter.pushed(measured, t);
                    p.pushed(measured, spec.size, self.alive(n));
                }
            }
        }
        meter.end_window();
        let want = p.measured_pushed;
        let flushed = wait_flushed(
            counters,
            || want * self.alive(n) as u64,
            || std::thread::sleep(Duration::from_millis(2)),
        );
        let m = meter.finish(
            &p,
            self.kicked.load(Ordering::SeqCst),
            self.lost.load(Ordering::SeqCst),
            flushed,
        );
        let _ = self.sink.set_state(gst::State::Null);
        self.owned.lock().unwrap().clear();
        let _ = self.pool.set_active(false);
        m
    }

    /// Hands every fd to the element (which keeps them open until
    /// `client-fd-removed`).
    fn add_all(&self, fds: Vec<OwnedFd>) {
        {
            let mut owned = self.owned.lock().unwrap();
            for fd in fds {
                owned.insert(fd.as_raw_fd(), fd);
            }
        }
        let raws: Vec<RawFd> = self.owned.lock().unwrap().keys().copied().collect();
        for fd in raws {
            self.sink.emit_by_name::<()>("add", &[&fd]);
        }
    }

    fn stamped_buffer(&self, spec: &Spec, seq: u64, measured: bool) -> gst::Buffer {
        let iv_ns = spec.interval().map(|i| (i * 1e9) as u64).unwrap_or(0);
        let mut buf = self.pool.acquire_buffer(None).expect("pool buffer");
        {
            let b = buf.get_mut().unwrap();
            b.set_pts(gst::ClockTime::from_nseconds(seq * iv_ns));
            b.set_offset(seq);
            let mut map = b.map_writable().unwrap();
            write_stamp(
                map.as_mut_slice(),
                seq,
                if measured { FLAG_MEASURED } else { 0 },
            );
        }
        buf
    }
}

/// A src pad linked to the sink, the sink PLAYING and the stream's sticky events sent.
fn start_stream(sink: &gst::Element) -> gst::Pad {
    let src = gst::Pad::builder(gst::PadDirection::Src)
        .name("src")
        .build();
    src.set_active(true).unwrap();
    src.link(&sink.static_pad("sink").unwrap()).unwrap();
    let _ = sink.set_state(gst::State::Playing).expect("PLAYING");
    src.push_event(gst::event::StreamStart::new("fanout-bench"));
    src.push_event(gst::event::Caps::new(
        &gst::Caps::builder("application/x-fanout-bench").build(),
    ));
    src.push_event(gst::event::Segment::new(&gst::FormattedSegment::<
        gst::ClockTime,
    >::new()));
    src
}

fn buffer_pool(size: usize) -> gst::BufferPool {
    let pool = gst::BufferPool::new();
    let mut config = pool.config();
    config.set_params(None, size as u32, 0, 0);
    pool.set_config(config).expect("pool config");
    pool.set_active(true).expect("pool active");
    pool
}
