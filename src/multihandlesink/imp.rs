// SPDX-License-Identifier: MPL-2.0

//! GObject glue of the base class: the properties every fan-out sink shares, the
//! `clear` action, the base sink's virtual methods and the state changes, all
//! forwarded to the engine. Client events come back through [`SignalListener`] and
//! go to the subclass's virtual methods.

use std::fmt;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::{Duration, Instant};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::subclass::prelude::*;

use super::{OverloadPolicy, RecoverPolicy, RsMultiHandleSinkExt, SyncMethod};
use crate::engine::{
    self, AddOutcome, Amount, Chunk, ClientConfig, Engine, Listener, LogLevel, PushReport, Unit,
};

pub static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "rsmultihandlesink",
        gst::DebugColorFlags::empty(),
        Some("Rust multi handle sink (clients, queue, IO)"),
    )
});

const DEFAULT_SYNC_METHOD: SyncMethod = SyncMethod::Latest;
const DEFAULT_BURST_FORMAT: gst::Format = gst::Format::Undefined;
const DEFAULT_BURST_VALUE: u64 = 0;
const DEFAULT_UNIT_FORMAT: gst::Format = gst::Format::Buffers;
/// -1: no limit (`units-max`, `units-soft-max` and their `buffers-*` views).
const DEFAULT_UNITS_LIMIT: i64 = -1;
/// -1: keep as little as the clients need (`buffers-min`, `bytes-min`, `time-min`).
const DEFAULT_MIN: i32 = -1;
const DEFAULT_RECOVER_POLICY: RecoverPolicy = RecoverPolicy::None;
const DEFAULT_TIMEOUT: u64 = 0;
const DEFAULT_HANDLE_READ: bool = true;
const DEFAULT_RESEND_STREAMHEADER: bool = true;
const DEFAULT_QOS_DSCP: i32 = -1;
const DEFAULT_IO_THREADS: u32 = 1;
const MAX_IO_THREADS: u32 = 64;
const DEFAULT_REQUEST_KEYFRAME: bool = false;
const DEFAULT_OVERLOAD_POLICY: OverloadPolicy = OverloadPolicy::BackPressure;
/// 0: write as soon as data arrives.
const DEFAULT_BATCH_TIME: u64 = 0;
/// Off until the benchmark shows where sendfile from the memfd pays.
const DEFAULT_ZERO_COPY: bool = false;
/// Below this many clients zero-copy sends from memory (the engine's measured
/// break-even).
const DEFAULT_ZERO_COPY_MIN_CLIENTS: u32 = engine::ZERO_COPY_MIN_CLIENTS as u32;
const DEFAULT_IO_URING: bool = false;
/// An overload episode ends after this long without a push that met one.
const OVERLOAD_QUIET: Duration = Duration::from_secs(1);

/// Property values, as the application set them.
#[derive(Debug, Clone)]
struct Settings {
    sync_method: SyncMethod,
    burst_format: gst::Format,
    burst_value: u64,
    unit_format: gst::Format,
    units_max: i64,
    units_soft_max: i64,
    recover_policy: RecoverPolicy,
    buffers_min: i32,
    bytes_min: i32,
    time_min: i64,
    timeout: u64,
    handle_read: bool,
    /// Asked for by the subclass, not properties of the base class.
    keep_input: bool,
    report_sent: bool,
    resend_streamheader: bool,
    qos_dscp: i32,
    io_threads: u32,
    request_keyframe: bool,
    overload_policy: OverloadPolicy,
    batch_time: u64,
    zero_copy: bool,
    zero_copy_min_clients: u32,
    io_uring: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            sync_method: DEFAULT_SYNC_METHOD,
            burst_format: DEFAULT_BURST_FORMAT,
            burst_value: DEFAULT_BURST_VALUE,
            unit_format: DEFAULT_UNIT_FORMAT,
            units_max: DEFAULT_UNITS_LIMIT,
            units_soft_max: DEFAULT_UNITS_LIMIT,
            recover_policy: DEFAULT_RECOVER_POLICY,
            buffers_min: DEFAULT_MIN,
            bytes_min: DEFAULT_MIN,
            time_min: DEFAULT_MIN.into(),
            timeout: DEFAULT_TIMEOUT,
            handle_read: DEFAULT_HANDLE_READ,
            keep_input: false,
            report_sent: false,
            resend_streamheader: DEFAULT_RESEND_STREAMHEADER,
            qos_dscp: DEFAULT_QOS_DSCP,
            io_threads: DEFAULT_IO_THREADS,
            request_keyframe: DEFAULT_REQUEST_KEYFRAME,
            overload_policy: DEFAULT_OVERLOAD_POLICY,
            batch_time: DEFAULT_BATCH_TIME,
            zero_copy: DEFAULT_ZERO_COPY,
            zero_copy_min_clients: DEFAULT_ZERO_COPY_MIN_CLIENTS,
            io_uring: DEFAULT_IO_URING,
        }
    }
}

/// The unit of `units-*` and burst amounts; formats without a meaning here count
/// buffers, as `multifdsink` does.
fn unit_of(format: gst::Format) -> Unit {
    match format {
        gst::Format::Bytes => Unit::Bytes,
        gst::Format::Time => Unit::Time,
        _ => Unit::Buffers,
    }
}

/// A burst bound: undefined format or -1 (G_MAXUINT64) is none.
pub fn burst_amount(format: gst::Format, value: u64) -> Option<Amount> {
    match format {
        gst::Format::Undefined | gst::Format::Percent => None,
        _ if value == u64::MAX => None,
        f => Some(Amount::new(unit_of(f), value)),
    }
}

impl Settings {
    fn engine_settings(&self, default_placement: ClientConfig) -> engine::Settings {
        let limit = |v: i64| (v > 0).then(|| Amount::new(unit_of(self.unit_format), v as u64));
        let min = |v: i64| (v > 0).then_some(v as u64);
        engine::Settings {
            units_max: limit(self.units_max),
            units_soft_max: limit(self.units_soft_max),
            recover_policy: self.recover_policy.into(),
            buffers_min: min(self.buffers_min.into()),
            bytes_min: min(self.bytes_min.into()),
            time_min: min(self.time_min),
            keep_keyframe: matches!(
                self.sync_method,
                SyncMethod::LatestKeyframe | SyncMethod::BurstKeyframe
            ),
            timeout: (self.timeout > 0).then(|| Duration::from_nanos(self.timeout)),
            handle_read: self.handle_read,
            keep_input: self.keep_input,
            report_sent: self.report_sent,
            resend_streamheader: self.resend_streamheader,
            qos_dscp: u8::try_from(self.qos_dscp).ok(),
            default_placement,
            overload_policy: self.overload_policy.into(),
            batch_time: (self.batch_time > 0).then(|| Duration::from_nanos(self.batch_time)),
            zero_copy: self.zero_copy,
            zero_copy_min_clients: self.zero_copy_min_clients as usize,
            io_uring: self.io_uring,
        }
    }

    /// `add`'s placement: `sync-method` with the burst settings as the minimum.
    fn placement(&self) -> ClientConfig {
        ClientConfig {
            sync: self.sync_method.into(),
            burst_min: burst_amount(self.burst_format, self.burst_value),
            burst_max: None,
        }
    }
}

/// Turns engine events into calls of the subclass's virtual methods, and engine
/// diagnostics into the debug log.
struct SignalListener {
    element: glib::WeakRef<super::RsMultiHandleSink>,
}

impl Listener for SignalListener {
    fn client_added(&self, fd: RawFd) {
        if let Some(element) = self.element.upgrade() {
            (element.class().as_ref().client_added)(&element, fd);
            element.imp().request_keyframe_for(fd);
        }
    }

    fn client_removed(&self, fd: RawFd, status: engine::ClientStatus) {
        if let Some(element) = self.element.upgrade() {
            (element.class().as_ref().client_removed)(&element, fd, status.into());
        }
    }

    fn client_fd_removed(&self, fd: RawFd) {
        if let Some(element) = self.element.upgrade() {
            (element.class().as_ref().client_fd_removed)(&element, fd);
        }
    }

    fn client_input(&self, fd: RawFd, data: Vec<u8>) {
        if let Some(element) = self.element.upgrade() {
            (element.class().as_ref().client_input)(
                &element,
                fd,
                gst::Buffer::from_mut_slice(data),
            );
        }
    }

    fn buffer_sent(&self, fd: RawFd, data: &engine::Payload) {
        let Some(element) = self.element.upgrade() else {
            return;
        };
        // Every payload the element queues is a mapped buffer (`chunk_of`): hand
        // back that very buffer.
        let any: &dyn std::any::Any = &**data;
        let Some(mapped) = any.downcast_ref::<gst::MappedBuffer<gst::buffer::Readable>>() else {
            return;
        };
        (element.class().as_ref().buffer_sent)(&element, fd, mapped.buffer_owned());
    }

    fn log(&self, level: LogLevel, args: fmt::Arguments<'_>) {
        super::log_as(*CAT, &self.element, level, args);
    }
}

/// An overload episode: pushes that met IO threads behind the stream, until one
/// `OVERLOAD_QUIET` passes without.
#[derive(Debug, Clone, Copy)]
struct OverloadEpisode {
    since: Instant,
    last_seen: Instant,
    waited: Duration,
    dropped: u64,
    bytes_served_at_start: u64,
}

#[derive(Default)]
pub struct RsMultiHandleSink {
    settings: Mutex<Settings>,
    engine: OnceLock<Engine>,
    overload: Mutex<Option<OverloadEpisode>>,
    /// The caps are `application/x-gdp`: keyframes come from each packet's header.
    gdp: AtomicBool,
}

impl RsMultiHandleSink {
    pub(super) fn engine(&self) -> &Engine {
        self.engine.get().expect("engine made in constructed()")
    }

    /// Hands the settings to the engine, with the placement the class chooses.
    fn apply_settings(&self) {
        let Some(engine) = self.engine.get() else {
            return;
        };
        let obj = self.obj();
        let placement = (obj.class().as_ref().default_placement)(&obj);
        let settings = self.settings.lock().unwrap().engine_settings(placement);
        engine.set_settings(settings);
    }

    pub(super) fn add_client(&self, fd: RawFd, placement: Option<ClientConfig>) {
        let config = placement.unwrap_or_else(|| {
            let obj = self.obj();
            (obj.class().as_ref().default_placement)(&obj)
        });
        if let (Some(min), Some(max)) = (config.burst_min, config.burst_max)
            && min.unit == max.unit
            && max.value < min.value
        {
            gst::warning!(
                CAT,
                imp = self,
                "client fd {fd}: burst maximum {max:?} below minimum {min:?}, not added"
            );
            return;
        }
        gst::debug!(CAT, imp = self, "adding client fd {fd} with {config:?}");
        match self.engine().add(fd, config) {
            AddOutcome::Added => {}
            AddOutcome::Duplicate => {
                gst::warning!(CAT, imp = self, "client fd {fd} is already added");
            }
            AddOutcome::NotRunning => {
                gst::warning!(
                    CAT,
                    imp = self,
                    "cannot add fd {fd}: element must be in READY, PAUSED or PLAYING"
                );
                // Where C multifdsink warns: GLib's default log domain, which is
                // what applications and GStreamer's check suite watch.
                glib::g_log!(
                    glib::LogLevel::Warning,
                    "{}: element must be set to READY, PAUSED or PLAYING before clients can be added (fd {})",
                    self.obj().name(),
                    fd
                );
            }
        }
    }

    pub(super) fn add_accepted_client(&self, fd: RawFd) -> bool {
        let config = {
            let obj = self.obj();
            (obj.class().as_ref().default_placement)(&obj)
        };
        gst::debug!(
            CAT,
            imp = self,
            "adding accepted socket fd {fd} with {config:?}"
        );
        self.engine().add(fd, config) == AddOutcome::Added
    }

    pub(super) fn remove_client(&self, fd: RawFd) {
        gst::debug!(CAT, imp = self, "removing client fd {fd}");
        self.engine().remove(fd, engine::ClientStatus::Removed);
    }

    pub(super) fn remove_flush_client(&self, fd: RawFd) {
        gst::debug!(CAT, imp = self, "flushing and removing client fd {fd}");
        self.engine().remove_flush(fd);
    }

    pub(super) fn set_handle_read(&self, handle_read: bool) {
        self.settings.lock().unwrap().handle_read = handle_read;
        self.apply_settings();
    }

    pub(super) fn handle_read(&self) -> bool {
        self.settings.lock().unwrap().handle_read
    }

    pub(super) fn set_keep_client_input(&self, keep: bool) {
        self.settings.lock().unwrap().keep_input = keep;
        self.apply_settings();
    }

    pub(super) fn set_report_sent_buffers(&self, report: bool) {
        self.settings.lock().unwrap().report_sent = report;
        self.apply_settings();
    }

    /// The base class's own placement (`default_placement` unless overridden).
    fn settings_placement(&self) -> ClientConfig {
        self.settings.lock().unwrap().placement()
    }

    /// With `request-keyframe`, asks upstream for a keyframe so a new client need
    /// not wait a whole GOP (a `GstForceKeyUnit` upstream event, as
    /// `gst_video_event_new_upstream_force_key_unit` makes).
    fn request_keyframe_for(&self, fd: RawFd) {
        if !self.settings.lock().unwrap().request_keyframe {
            return;
        }
        let event = gst::event::CustomUpstream::new(
            gst::Structure::builder("GstForceKeyUnit")
                .field("running-time", u64::MAX)
                .field("all-headers", true)
                .field("count", 0u32)
                .build(),
        );
        let sent = self
            .obj()
            .static_pad("sink")
            .is_some_and(|pad| pad.push_event(event));
        gst::debug!(
            CAT,
            imp = self,
            "client fd {fd}: requested a keyframe upstream (handled: {sent})"
        );
    }

    pub(super) fn stats_structure(&self, fd: RawFd) -> gst::Structure {
        let Some(s) = self.engine().stats(fd) else {
            gst::warning!(CAT, imp = self, "get-stats: no client with fd {fd}");
            return gst::Structure::new_empty("multihandlesink-stats");
        };
        let ts = |t: Option<u64>| t.unwrap_or(u64::MAX);
        gst::Structure::builder("multihandlesink-stats")
            .field("bytes-sent", s.bytes_sent)
            .field("connect-time", s.connect_time)
            .field("disconnect-time", s.disconnect_time)
            .field("connect-duration", s.connect_duration)
            .field("last-activity-time", s.last_activity_time)
            .field("buffers-dropped", s.buffers_dropped)
            .field("dropped-buffers", s.buffers_dropped)
            .field("first-buffer-ts", ts(s.first_buffer_ts))
            .field("last-buffer-ts", ts(s.last_buffer_ts))
            .field("connect-time-monotonic", s.connect_time_monotonic)
            .field("disconnect-time-monotonic", s.disconnect_time_monotonic)
            .field(
                "last-activity-time-monotonic",
                s.last_activity_time_monotonic,
            )
            .build()
    }

    fn chunk_of(buffer: &gst::Buffer) -> Result<Chunk, gst::FlowError> {
        let flags = buffer.flags();
        let pts = buffer.pts().map(|t| t.nseconds());
        let mapped = buffer
            .clone()
            .into_mapped_buffer_readable()
            .map_err(|_| gst::FlowError::Error)?;
        Ok(Chunk::new(
            Arc::new(mapped),
            !flags.contains(gst::BufferFlags::DELTA_UNIT),
            flags.contains(gst::BufferFlags::HEADER),
            pts,
        ))
    }

    /// A GDP packet's keyframe flag, from the payload buffer's flags in its header:
    /// `gdppay` does not copy `DELTA_UNIT` to the buffers it pushes, so without
    /// this every packet would be a keyframe. A buffer that is not exactly one
    /// packet keeps its own flags.
    fn gdp_keyframe(&self, chunk: &mut Chunk) {
        match crate::gdp::PacketHeader::of_packet((*chunk.data).as_ref()) {
            Ok(header) => {
                chunk.keyframe = header.is_sync_point();
                gst::trace!(
                    CAT,
                    imp = self,
                    "GDP packet {:?}, flags {:#06x}: keyframe {}",
                    header.payload_type,
                    header.buffer_flags,
                    chunk.keyframe
                );
            }
            Err(e) => gst::log!(
                CAT,
                imp = self,
                "buffer of {} bytes is not one GDP packet ({e}): its own flags are used",
                chunk.len()
            ),
        }
    }

    /// The caps' `streamheader` as payloads; `None` (with a warning) when it is not
    /// an array of buffers.
    fn streamheader_of(&self, caps: &gst::Caps) -> Option<Vec<engine::Payload>> {
        let value = caps.structure(0)?.value("streamheader").ok()?;
        let Ok(array) = value.get::<gst::ArrayRef>() else {
            gst::warning!(
                CAT,
                imp = self,
                "caps streamheader is not an array, ignored: {caps}"
            );
            return None;
        };
        let mut buffers = Vec::new();
        for v in array.iter() {
            let Ok(buffer) = v.get::<gst::Buffer>() else {
                gst::warning!(
                    CAT,
                    imp = self,
                    "caps streamheader holds a non-buffer, ignored: {caps}"
                );
                return None;
            };
            match Self::chunk_of(&buffer) {
                Ok(chunk) => buffers.push(chunk.data),
                Err(_) => gst::warning!(CAT, imp = self, "cannot map a streamheader buffer"),
            }
        }
        Some(buffers)
    }

    /// Follows overload episodes from what each push met, and posts one warning on
    /// the bus when one starts and one when it ends, with the figures.
    fn track_overload(&self, report: PushReport) {
        let overloaded = !report.waited.is_zero() || report.dropped > 0 || report.behind;
        let now = Instant::now();
        let mut episode = self.overload.lock().unwrap();
        match (episode.as_mut(), overloaded) {
            (Some(e), true) => {
                e.last_seen = now;
                e.waited += report.waited;
                e.dropped += report.dropped;
            }
            (None, true) => {
                let c = self.engine().counters();
                *episode = Some(OverloadEpisode {
                    since: now,
                    last_seen: now,
                    waited: report.waited,
                    dropped: report.dropped,
                    bytes_served_at_start: c.bytes_served,
                });
                drop(episode);
                let policy = self.settings.lock().unwrap().overload_policy;
                let load = self.engine().io_load();
                gst::element_imp_warning!(
                    self,
                    gst::ResourceError::Write,
                    ("overload: the IO threads cannot keep up with the stream"),
                    [
                        "overload started: {} clients, {} buffers queued, io-load {:.2}, policy {:?}",
                        c.num_handles,
                        c.buffers_queued,
                        load,
                        policy
                    ],
                    details: gst::Structure::builder("rsmultihandlesink-overload")
                        .field("state", "started")
                        .field("clients", c.num_handles)
                        .field("buffers-queued", c.buffers_queued)
                        .field("io-load", load)
                        .build()
                );
            }
            (Some(e), false) if now.duration_since(e.last_seen) >= OVERLOAD_QUIET => {
                let e = *e;
                *episode = None;
                drop(episode);
                let c = self.engine().counters();
                let secs = now.duration_since(e.since).as_secs_f64();
                // bytes-served restarts from 0 when the element starts again.
                let served = c.bytes_served.saturating_sub(e.bytes_served_at_start);
                let rate = served as f64 * 8.0 / secs;
                gst::element_imp_warning!(
                    self,
                    gst::ResourceError::Write,
                    ("overload over: the IO threads keep up with the stream again"),
                    [
                        "overload ended after {:.1} s: {} clients, served {:.1} Mbit/s, stream waited {:.1} s, {} buffers skipped",
                        secs,
                        c.num_handles,
                        rate / 1e6,
                        e.waited.as_secs_f64(),
                        e.dropped
                    ],
                    details: gst::Structure::builder("rsmultihandlesink-overload")
                        .field("state", "ended")
                        .field("clients", c.num_handles)
                        .field("duration", secs)
                        .field("bits-per-second", rate)
                        .field("waited", e.waited.as_secs_f64())
                        .field("buffers-skipped", e.dropped)
                        .build()
                );
            }
            _ => {}
        }
    }

    /// NULL→READY: the IO threads, then the subclass's `start_serving`.
    fn start(&self) -> Result<(), gst::ErrorMessage> {
        let engine = self.engine.get().ok_or_else(|| {
            gst::error_msg!(
                gst::ResourceError::OpenWrite,
                ["cannot create epoll instance"]
            )
        })?;
        let threads = self.settings.lock().unwrap().io_threads;
        let started = engine
            .set_io_threads(threads as usize)
            .and_then(|()| engine.start());
        if let Err(e) = started {
            return Err(gst::error_msg!(
                gst::ResourceError::OpenWrite,
                ["cannot start {} IO threads: {}", threads, e]
            ));
        }
        self.apply_settings();
        gst::debug!(CAT, imp = self, "started {threads} IO threads");
        let obj = self.obj();
        if let Err(e) = (obj.class().as_ref().start_serving)(&obj) {
            engine.stop();
            return Err(e);
        }
        Ok(())
    }

    /// `io-threads`: stored in NULL; in READY the IO threads are made again if no
    /// client would be lost; refused (with a warning) otherwise.
    fn set_io_threads(&self, threads: u32) {
        let restart = match self.obj().highest_state() {
            gst::State::Null => false,
            gst::State::Ready if self.engine().counters().num_handles == 0 => true,
            _ => {
                gst::warning!(
                    CAT,
                    imp = self,
                    "io-threads can change only in NULL, or in READY without clients: kept at {}",
                    self.settings.lock().unwrap().io_threads
                );
                return;
            }
        };
        self.settings.lock().unwrap().io_threads = threads;
        gst::debug!(CAT, imp = self, "io-threads set to {threads}");
        if restart {
            self.stop();
            if let Err(msg) = self.start() {
                self.post_error_message(msg);
            }
        }
    }

    /// READY→NULL: the subclass's `stop_serving`, then every client is removed (with
    /// its signals) and the queue and streamheader dropped.
    fn stop(&self) {
        let obj = self.obj();
        (obj.class().as_ref().stop_serving)(&obj);
        self.engine().stop();
        // An overload episode does not outlive the stream (nor its counters).
        *self.overload.lock().unwrap() = None;
        gst::debug!(CAT, imp = self, "stopped");
    }
}

#[glib::object_subclass]
impl ObjectSubclass for RsMultiHandleSink {
    const NAME: &'static str = "GstRsMultiHandleSink";
    const ABSTRACT: bool = true;
    type Type = super::RsMultiHandleSink;
    type ParentType = gst_base::BaseSink;
    type Class = super::Class;

    fn class_init(class: &mut Self::Class) {
        // The base class's own behaviour; subclasses override through IsSubclassable.
        class.client_added = |_, _| {};
        class.client_removed = |_, _, _| {};
        class.client_fd_removed = |_, _| {};
        class.client_input = |_, _, _| {};
        class.buffer_sent = |_, _, _| {};
        class.start_serving = |_| Ok(());
        class.stop_serving = |_| {};
        class.default_placement = |obj| obj.imp().settings_placement();
    }
}

impl ObjectImpl for RsMultiHandleSink {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecInt::builder("buffers-max")
                    .nick("Buffers max")
                    .blurb("max number of buffers to queue for a client (-1 = no limit)")
                    .minimum(-1)
                    .default_value(DEFAULT_UNITS_LIMIT as i32)
                    .build(),
                glib::ParamSpecInt::builder("buffers-soft-max")
                    .nick("Buffers soft max")
                    .blurb("Recover client when going over this limit (-1 = no limit)")
                    .minimum(-1)
                    .default_value(DEFAULT_UNITS_LIMIT as i32)
                    .build(),
                glib::ParamSpecInt::builder("buffers-min")
                    .nick("Buffers min")
                    .blurb("min number of buffers to queue (-1 = as few as possible)")
                    .minimum(-1)
                    .default_value(DEFAULT_MIN)
                    .build(),
                glib::ParamSpecInt::builder("bytes-min")
                    .nick("Bytes min")
                    .blurb("min number of bytes to queue (-1 = as little as possible)")
                    .minimum(-1)
                    .default_value(DEFAULT_MIN)
                    .build(),
                glib::ParamSpecInt64::builder("time-min")
                    .nick("Time min")
                    .blurb("min amount of time to queue (in nanoseconds) (-1 = as little as possible)")
                    .minimum(-1)
                    .default_value(DEFAULT_MIN.into())
                    .build(),
                glib::ParamSpecEnum::builder_with_default("unit-format", DEFAULT_UNIT_FORMAT)
                    .nick("Units format")
                    .blurb("The unit to measure the max/soft-max/queued properties")
                    .build(),
                glib::ParamSpecInt64::builder("units-max")
                    .nick("Units max")
                    .blurb("max number of units to queue (-1 = no limit)")
                    .minimum(-1)
                    .default_value(DEFAULT_UNITS_LIMIT)
                    .build(),
                glib::ParamSpecInt64::builder("units-soft-max")
                    .nick("Units soft max")
                    .blurb("Recover client when going over this limit (-1 = no limit)")
                    .minimum(-1)
                    .default_value(DEFAULT_UNITS_LIMIT)
                    .build(),
                glib::ParamSpecUInt::builder("buffers-queued")
                    .nick("Buffers queued")
                    .blurb("Number of buffers currently queued")
                    .read_only()
                    .build(),
                glib::ParamSpecUInt64::builder("bytes-queued")
                    .nick("Bytes queued")
                    .blurb("Number of bytes currently queued")
                    .read_only()
                    .build(),
                glib::ParamSpecUInt64::builder("time-queued")
                    .nick("Time queued")
                    .blurb("Amount of time currently queued (in nanoseconds)")
                    .read_only()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("recover-policy", DEFAULT_RECOVER_POLICY)
                    .nick("Recover Policy")
                    .blurb("How to recover when client reaches the soft max")
                    .build(),
                glib::ParamSpecUInt64::builder("timeout")
                    .nick("Timeout")
                    .blurb("Maximum inactivity timeout in nanoseconds for a client (0 = no limit)")
                    .default_value(DEFAULT_TIMEOUT)
                    .build(),
                glib::ParamSpecEnum::builder_with_default("sync-method", DEFAULT_SYNC_METHOD)
                    .nick("Sync Method")
                    .blurb("How to sync new clients to the stream")
                    .build(),
                glib::ParamSpecUInt64::builder("bytes-to-serve")
                    .nick("Bytes to serve")
                    .blurb("Number of bytes received to serve to clients")
                    .read_only()
                    .build(),
                glib::ParamSpecUInt64::builder("bytes-served")
                    .nick("Bytes served")
                    .blurb("Total number of bytes send to all clients")
                    .read_only()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("burst-format", DEFAULT_BURST_FORMAT)
                    .nick("Burst format")
                    .blurb("The format of the burst units (when sync-method is burst[[-with]-keyframe])")
                    .build(),
                glib::ParamSpecUInt64::builder("burst-value")
                    .nick("Burst value")
                    .blurb("The amount of burst expressed in burst-format")
                    .default_value(DEFAULT_BURST_VALUE)
                    .build(),
                glib::ParamSpecInt::builder("qos-dscp")
                    .nick("QoS diff srv code point")
                    .blurb("Quality of Service, differentiated services code point (-1 default)")
                    .minimum(-1)
                    .maximum(63)
                    .default_value(DEFAULT_QOS_DSCP)
                    .build(),
                glib::ParamSpecBoolean::builder("resend-streamheader")
                    .nick("Resend streamheader")
                    .blurb("Resend the streamheader if it changes in the caps")
                    .default_value(DEFAULT_RESEND_STREAMHEADER)
                    .build(),
                glib::ParamSpecUInt::builder("num-handles")
                    .nick("Number of handles")
                    .blurb("The current number of client handles")
                    .read_only()
                    .build(),
                glib::ParamSpecUInt::builder("io-threads")
                    .nick("IO threads")
                    .blurb("Threads writing to clients (clients are spread over them); changes only in NULL, or in READY without clients")
                    .minimum(1)
                    .maximum(MAX_IO_THREADS)
                    .default_value(DEFAULT_IO_THREADS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("overload-policy", DEFAULT_OVERLOAD_POLICY)
                    .nick("Overload policy")
                    .blurb("What to do when the IO threads cannot keep up with the stream (clients are never kicked for it)")
                    .build(),
                glib::ParamSpecUInt64::builder("batch-time")
                    .nick("Batch time")
                    .blurb("How long in nanoseconds a client's new data may wait so that several buffers go out in one write (0 = write at once)")
                    .default_value(DEFAULT_BATCH_TIME)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecDouble::builder("io-load")
                    .nick("IO load")
                    .blurb("How busy the busiest IO thread was over its last 100 ms (0 to 1)")
                    .minimum(0.0)
                    .maximum(1.0)
                    .default_value(0.0)
                    .read_only()
                    .build(),
                glib::ParamSpecBoolean::builder("request-keyframe")
                    .nick("Request keyframe")
                    .blurb("Ask upstream for a keyframe (force-key-unit) when a client is added")
                    .default_value(DEFAULT_REQUEST_KEYFRAME)
                    .build(),
                glib::ParamSpecBoolean::builder("zero-copy")
                    .nick("Zero copy")
                    .blurb("Keep queued buffers in a memfd and send them with sendfile (sockets take the pages by reference); fds that refuse it get writev")
                    .default_value(DEFAULT_ZERO_COPY)
                    .build(),
                glib::ParamSpecUInt::builder("zero-copy-min-clients")
                    .nick("Zero copy from clients")
                    .blurb("With zero-copy, buffers go into the memfd only while there are at least this many clients (with fewer, copying them in costs more than it saves); 0: always")
                    .default_value(DEFAULT_ZERO_COPY_MIN_CLIENTS)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecBoolean::builder("io-uring")
                    .nick("io_uring")
                    .blurb("Write each batch of ready clients with one io_uring submission instead of one system call per client (falls back to the system calls where io_uring is unavailable)")
                    .default_value(DEFAULT_IO_URING)
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn signals() -> &'static [glib::subclass::Signal] {
        static SIGNALS: LazyLock<Vec<glib::subclass::Signal>> = LazyLock::new(|| {
            vec![
                glib::subclass::Signal::builder("clear")
                    .run_last()
                    .action()
                    .class_handler(|args| {
                        let element = args[0]
                            .get::<super::RsMultiHandleSink>()
                            .expect("signal emitted on a multi handle sink");
                        gst::debug!(CAT, obj = &element, "clearing all clients");
                        element.imp().engine().clear();
                        None
                    })
                    .build(),
            ]
        });
        SIGNALS.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut s = self.settings.lock().unwrap();
        match pspec.name() {
            "buffers-max" => s.units_max = value.get::<i32>().unwrap().into(),
            "buffers-soft-max" => s.units_soft_max = value.get::<i32>().unwrap().into(),
            "buffers-min" => s.buffers_min = value.get().unwrap(),
            "bytes-min" => s.bytes_min = value.get().unwrap(),
            "time-min" => s.time_min = value.get().unwrap(),
            "unit-format" => s.unit_format = value.get().unwrap(),
            "units-max" => s.units_max = value.get().unwrap(),
            "units-soft-max" => s.units_soft_max = value.get().unwrap(),
            "recover-policy" => s.recover_policy = value.get().unwrap(),
            "timeout" => s.timeout = value.get().unwrap(),
            "sync-method" => s.sync_method = value.get().unwrap(),
            "burst-format" => s.burst_format = value.get().unwrap(),
            "burst-value" => s.burst_value = value.get().unwrap(),
            "qos-dscp" => s.qos_dscp = value.get().unwrap(),
            "resend-streamheader" => s.resend_streamheader = value.get().unwrap(),
            "io-threads" => {
                drop(s);
                self.set_io_threads(value.get().unwrap());
                return;
            }
            "request-keyframe" => s.request_keyframe = value.get().unwrap(),
            "overload-policy" => s.overload_policy = value.get().unwrap(),
            "batch-time" => s.batch_time = value.get().unwrap(),
            "zero-copy" => s.zero_copy = value.get().unwrap(),
            "zero-copy-min-clients" => s.zero_copy_min_clients = value.get().unwrap(),
            "io-uring" => s.io_uring = value.get().unwrap(),
            name => unimplemented!("property {name}"),
        }
        gst::debug!(CAT, imp = self, "set {} to {:?}", pspec.name(), value);
        drop(s);
        self.apply_settings();
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let s = self.settings.lock().unwrap();
        let clamp_i32 = |v: i64| v.clamp(-1, i32::MAX as i64) as i32;
        match pspec.name() {
            "buffers-max" => clamp_i32(s.units_max).to_value(),
            "buffers-soft-max" => clamp_i32(s.units_soft_max).to_value(),
            "buffers-min" => s.buffers_min.to_value(),
            "bytes-min" => s.bytes_min.to_value(),
            "time-min" => s.time_min.to_value(),
            "unit-format" => s.unit_format.to_value(),
            "units-max" => s.units_max.to_value(),
            "units-soft-max" => s.units_soft_max.to_value(),
            "recover-policy" => s.recover_policy.to_value(),
            "timeout" => s.timeout.to_value(),
            "sync-method" => s.sync_method.to_value(),
            "burst-format" => s.burst_format.to_value(),
            "burst-value" => s.burst_value.to_value(),
            "qos-dscp" => s.qos_dscp.to_value(),
            "resend-streamheader" => s.resend_streamheader.to_value(),
            "io-threads" => s.io_threads.to_value(),
            "request-keyframe" => s.request_keyframe.to_value(),
            "overload-policy" => s.overload_policy.to_value(),
            "batch-time" => s.batch_time.to_value(),
            "zero-copy" => s.zero_copy.to_value(),
            "zero-copy-min-clients" => s.zero_copy_min_clients.to_value(),
            "io-uring" => s.io_uring.to_value(),
            "io-load" => {
                drop(s);
                self.engine().io_load().to_value()
            }
            name => {
                drop(s);
                let c = self.engine().counters();
                let clamp_u32 = |v: u64| v.min(u32::MAX as u64) as u32;
                match name {
                    "buffers-queued" => clamp_u32(c.buffers_queued).to_value(),
                    "bytes-queued" => c.bytes_queued.to_value(),
                    "time-queued" => c.time_queued.to_value(),
                    "bytes-to-serve" => c.bytes_to_serve.to_value(),
                    "bytes-served" => c.bytes_served.to_value(),
                    "num-handles" => clamp_u32(c.num_handles).to_value(),
                    _ => unimplemented!("property {name}"),
                }
            }
        }
    }

    fn constructed(&self) {
        self.parent_constructed();
        let listener = Arc::new(SignalListener {
            element: self.obj().downgrade(),
        });
        match Engine::new(listener) {
            Ok(engine) => {
                let _ = self.engine.set(engine);
            }
            // Without epoll nothing works; the state change to READY reports it.
            Err(e) => gst::error!(CAT, imp = self, "cannot create the IO engine: {e}"),
        }
        self.apply_settings();
    }
}

impl GstObjectImpl for RsMultiHandleSink {}

impl ElementImpl for RsMultiHandleSink {
    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            vec![
                gst::PadTemplate::new(
                    "sink",
                    gst::PadDirection::Sink,
                    gst::PadPresence::Always,
                    &gst::Caps::new_any(),
                )
                .unwrap(),
            ]
        });
        TEMPLATES.as_ref()
    }

    fn change_state(
        &self,
        transition: gst::StateChange,
    ) -> Result<gst::StateChangeSuccess, gst::StateChangeError> {
        if transition == gst::StateChange::NullToReady
            && let Err(msg) = self.start()
        {
            self.post_error_message(msg);
            return Err(gst::StateChangeError);
        }
        let result = self.parent_change_state(transition);
        if transition == gst::StateChange::ReadyToNull {
            self.stop();
        }
        result
    }
}

impl BaseSinkImpl for RsMultiHandleSink {
    fn set_caps(&self, caps: &gst::Caps) -> Result<(), gst::LoggableError> {
        let streamheader = self.streamheader_of(caps);
        gst::debug!(
            CAT,
            imp = self,
            "caps {caps}: streamheader of {} buffers",
            streamheader.as_ref().map_or(0, Vec::len)
        );
        self.engine().set_streamheader(streamheader);
        let gdp = caps
            .structure(0)
            .is_some_and(|s| s.name() == "application/x-gdp");
        if gdp {
            gst::debug!(
                CAT,
                imp = self,
                "GDP stream: clients start on packets of buffers that are not delta units"
            );
        }
        self.gdp.store(gdp, Ordering::Relaxed);
        Ok(())
    }

    fn render(&self, buffer: &gst::Buffer) -> Result<gst::FlowSuccess, gst::FlowError> {
        let mut chunk = Self::chunk_of(buffer).inspect_err(|_| {
            gst::element_imp_error!(self, gst::ResourceError::Read, ["cannot map buffer"]);
        })?;
        if self.gdp.load(Ordering::Relaxed) {
            if chunk.header {
                // gdppay puts every packet it flags HEADER (sticky events, caps, the
                // payload's streamheader) in the caps' streamheader first; one that
                // is not there now was replaced (a first caps without streamheader,
                // as mpegtsmux sends) and must not reach clients after the current.
                gst::log!(
                    CAT,
                    imp = self,
                    "GDP header packet of {} bytes: the caps' streamheader has it or replaced it, not queued",
                    chunk.len()
                );
                return Ok(gst::FlowSuccess::Ok);
            }
            self.gdp_keyframe(&mut chunk);
        }
        gst::log!(
            CAT,
            imp = self,
            "queueing buffer of {} bytes, pts {:?}",
            chunk.len(),
            buffer.pts()
        );
        let report = self.engine().push(chunk);
        self.track_overload(report);
        Ok(gst::FlowSuccess::Ok)
    }

    /// The end of the stream: what clients hold back for their batch goes now.
    fn event(&self, event: gst::Event) -> bool {
        if let gst::EventView::Eos(_) = event.view()
            && let Some(engine) = self.engine.get()
        {
            engine.end_batches();
        }
        self.parent_event(event)
    }

    /// A flush or a state change: a render waiting for the IO threads returns.
    fn unlock(&self) -> Result<(), gst::ErrorMessage> {
        if let Some(engine) = self.engine.get() {
            engine.set_flushing(true);
        }
        Ok(())
    }

    fn unlock_stop(&self) -> Result<(), gst::ErrorMessage> {
        if let Some(engine) = self.engine.get() {
            engine.set_flushing(false);
        }
        Ok(())
    }
}
