// SPDX-License-Identifier: MPL-2.0

//! One element run: `rsmultifdsink` or the C `multifdsink` fed by a src pad of our
//! own, every client fd added, the producer's schedule pushed through it.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gst::prelude::*;

use crate::os::SharedCounters;
use crate::sink::{Measured, Meter, Next, Producer, Removed, wait_flushed};
use crate::spec::{Elem, FLAG_MEASURED, Spec, write_stamp};
use crate::system::init_gstreamer;

pub struct ElementRun {
    sink: gst::Element,
    src: gst::Pad,
    pool: gst::BufferPool,
    removals: Arc<Removals>,
    owned: Arc<Mutex<HashMap<RawFd, OwnedFd>>>,
}

/// What `client-removed` reported during the run (the removals at the final state
/// change to NULL, status `removed`, are not counted).
#[derive(Default)]
struct Removals {
    /// Status `slow`: over units-max.
    kicked: AtomicUsize,
    /// Any other status (error, closed, ...).
    lost: AtomicUsize,
    stalled: AtomicUsize,
    others: AtomicUsize,
    stalled_fds: Mutex<HashSet<RawFd>>,
}

impl Removals {
    fn removed(&self) -> Removed {
        Removed {
            stalled: self.stalled.load(Ordering::SeqCst),
            others: self.others.load(Ordering::SeqCst),
        }
    }
}

/// The value of a rsmultifdsink property from its text, or why it cannot be set.
fn prop_value(sink: &gst::Element, name: &str, text: &str) -> Result<gst::glib::Value, String> {
    let pspec = sink
        .find_property(name)
        .ok_or_else(|| format!("rsmultifdsink has no property {name:?} (in this build)"))?;
    if !pspec.flags().contains(gst::glib::ParamFlags::WRITABLE) {
        return Err(format!("rsmultifdsink's {name:?} is read-only"));
    }
    let value = gst::glib::Value::deserialize(text, pspec.value_type())
        .ok()
        .filter(|v| in_range(&pspec, v))
        .ok_or_else(|| {
            format!(
                "{text:?} is not a valid value of rsmultifdsink's {name:?} ({})",
                pspec.value_type()
            )
        })?;
    Ok(value)
}

/// Whether GLib would take `value` for the property as it is (setting an out-of-range
/// value panics in glib-rs).
fn in_range(pspec: &gst::glib::ParamSpec, value: &gst::glib::Value) -> bool {
    use gst::glib::translate::{ToGlibPtr, ToGlibPtrMut};
    let mut probe = value.clone();
    // SAFETY: both pointers are valid for the call; g_param_value_validate only
    // changes `probe`, our copy, and returns whether it had to.
    let changed = unsafe {
        gst::glib::gobject_ffi::g_param_value_validate(
            pspec.to_glib_none().0,
            probe.to_glib_none_mut().0,
        )
    };
    changed == 0
}

/// The properties `--io-threads`, `--io-uring` and `--rs-prop` will set on
/// rsmultifdsink, each checked on an element of this build, so a wrong one stops
/// the benchmark before the first run.
pub fn check_rs_props(
    io_threads: &[u32],
    io_uring: &[bool],
    props: &[(String, String)],
) -> Result<(), String> {
    init_gstreamer();
    let sink = gst::ElementFactory::make("rsmultifdsink")
        .build()
        .map_err(|e| format!("rsmultifdsink: {e}"))?;
    let io = io_threads
        .iter()
        .map(|n| ("io-threads".to_string(), n.to_string()));
    let uring = io_uring
        .iter()
        .map(|b| ("io-uring".to_string(), b.to_string()));
    for (name, text) in io.chain(uring).chain(props.iter().cloned()) {
        prop_value(&sink, &name, &text)?;
    }
    Ok(())
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
        if elem == Elem::Rs {
            let io = spec
                .io_threads
                .map(|n| ("io-threads".to_string(), n.to_string()));
            let uring = spec
                .io_uring
                .map(|b| ("io-uring".to_string(), b.to_string()));
            for (name, text) in io.iter().chain(&uring).chain(&spec.rs_props) {
                let value = prop_value(&sink, name, text).unwrap_or_else(|e| panic!("{e}"));
                sink.set_property_from_value(name, &value);
            }
        }

        let removals = Arc::new(Removals::default());
        let owned: Arc<Mutex<HashMap<RawFd, OwnedFd>>> = Default::default();
        let r = removals.clone();
        sink.connect("client-removed", false, move |args| {
            let fd = args[1].get::<i32>().unwrap();
            let status = gst::glib::EnumValue::from_value(&args[2])
                .map(|(_, v)| v.nick())
                .unwrap_or("?");
            match status {
                "removed" => return None,
                "slow" => r.kicked.fetch_add(1, Ordering::SeqCst),
                _ => r.lost.fetch_add(1, Ordering::SeqCst),
            };
            if r.stalled_fds.lock().unwrap().contains(&fd) {
                r.stalled.fetch_add(1, Ordering::SeqCst);
            } else {
                r.others.fetch_add(1, Ordering::SeqCst);
            }
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
            removals,
            owned,
        }
    }

    /// Clients that read and are still there, of `readers`.
    fn alive(&self, readers: usize) -> usize {
        readers.saturating_sub(self.removals.others.load(Ordering::SeqCst))
    }

    pub fn run(
        self,
        spec: &Spec,
        fds: Vec<OwnedFd>,
        stalled: &[bool],
        counters: &SharedCounters,
    ) -> Measured {
        let n = stalled.iter().filter(|s| !**s).count();
        *self.removals.stalled_fds.lock().unwrap() = fds
            .iter()
            .zip(stalled)
            .filter(|(_, s)| **s)
            .map(|(fd, _)| fd.as_raw_fd())
            .collect();
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
        let flushed = wait_flushed(
            counters,
            p.seq,
            || self.alive(n) as u64,
            || std::thread::sleep(Duration::from_millis(2)),
        );
        let m = meter.finish(
            &p,
            self.removals.kicked.load(Ordering::SeqCst),
            self.removals.lost.load(Ordering::SeqCst),
            self.removals.removed(),
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
