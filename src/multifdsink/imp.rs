//! GObject glue of `rsmultifdsink`: properties, signals and the base sink virtual
//! methods, all forwarded to the engine.

use std::fmt;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use gst_base::subclass::prelude::*;

use super::{ClientStatus, RecoverPolicy, SyncMethod};
use crate::engine::{
    self, AddOutcome, Amount, Chunk, ClientConfig, Engine, Listener, LogLevel, Unit,
};

pub(crate) static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "rsmultifdsink",
        gst::DebugColorFlags::empty(),
        Some("Rust multi filedescriptor sink"),
    )
});

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
    resend_streamheader: bool,
    qos_dscp: i32,
    request_keyframe: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            sync_method: SyncMethod::Latest,
            burst_format: gst::Format::Undefined,
            burst_value: 0,
            unit_format: gst::Format::Buffers,
            units_max: -1,
            units_soft_max: -1,
            recover_policy: RecoverPolicy::None,
            buffers_min: -1,
            bytes_min: -1,
            time_min: -1,
            timeout: 0,
            handle_read: true,
            resend_streamheader: true,
            qos_dscp: -1,
            request_keyframe: false,
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

/// A burst bound from `add-full`: undefined format or -1 (G_MAXUINT64) is none.
pub(crate) fn burst_amount(format: gst::Format, value: u64) -> Option<Amount> {
    match format {
        gst::Format::Undefined | gst::Format::Percent => None,
        _ if value == u64::MAX => None,
        f => Some(Amount::new(unit_of(f), value)),
    }
}

impl Settings {
    fn engine_settings(&self) -> engine::Settings {
        let limit = |v: i64| (v > 0).then(|| Amount::new(unit_of(self.unit_format), v as u64));
        engine::Settings {
            units_max: limit(self.units_max),
            units_soft_max: limit(self.units_soft_max),
            recover_policy: self.recover_policy.into(),
            buffers_min: (self.buffers_min > 0).then_some(self.buffers_min as u64),
            bytes_min: (self.bytes_min > 0).then_some(self.bytes_min as u64),
            time_min: (self.time_min > 0).then_some(self.time_min as u64),
            keep_keyframe: matches!(
                self.sync_method,
                SyncMethod::LatestKeyframe | SyncMethod::BurstKeyframe
            ),
            timeout: (self.timeout > 0).then(|| std::time::Duration::from_nanos(self.timeout)),
            handle_read: self.handle_read,
            resend_streamheader: self.resend_streamheader,
            qos_dscp: u8::try_from(self.qos_dscp).ok(),
            default_placement: self.add_placement(),
        }
    }

    /// How `add` places a client: `sync-method` with `burst-format`/`burst-value` as
    /// the burst minimum and no maximum.
    fn add_placement(&self) -> ClientConfig {
        ClientConfig {
            sync: self.sync_method.into(),
            burst_min: burst_amount(self.burst_format, self.burst_value),
            burst_max: None,
        }
    }
}

/// Turns engine events into the element's signals and debug log.
struct SignalListener {
    element: glib::WeakRef<super::RsMultiFdSink>,
}

impl Listener for SignalListener {
    fn client_added(&self, fd: i32) {
        if let Some(element) = self.element.upgrade() {
            element.emit_by_name::<()>("client-added", &[&fd]);
            element.imp().request_keyframe_for(fd);
        }
    }

    fn client_removed(&self, fd: i32, status: engine::ClientStatus) {
        if let Some(element) = self.element.upgrade() {
            element.emit_by_name::<()>("client-removed", &[&fd, &ClientStatus::from(status)]);
        }
    }

    fn client_fd_removed(&self, fd: i32) {
        if let Some(element) = self.element.upgrade() {
            element.emit_by_name::<()>("client-fd-removed", &[&fd]);
            if let Some(hook) = element.imp().fd_removed_hook.get() {
                hook(fd);
            }
        }
    }

    fn log(&self, level: LogLevel, args: fmt::Arguments<'_>) {
        let level = match level {
            LogLevel::Warning => gst::DebugLevel::Warning,
            LogLevel::Info => gst::DebugLevel::Info,
            LogLevel::Debug => gst::DebugLevel::Debug,
            LogLevel::Log => gst::DebugLevel::Log,
        };
        if CAT.threshold() < level {
            return;
        }
        match self.element.upgrade() {
            Some(element) => gst::log_with_level!(CAT, level, obj = &element, "{}", args),
            None => gst::log_with_level!(CAT, level, "{}", args),
        }
    }
}

#[derive(Default)]
pub struct RsMultiFdSink {
    settings: Mutex<Settings>,
    engine: OnceLock<Engine>,
    /// Runs after `client-fd-removed`: `rstcpserversink` closes its own sockets here.
    pub(crate) fd_removed_hook: OnceLock<Box<dyn Fn(i32) + Send + Sync>>,
}

/// Subclasses (`rstcpserversink`) inherit every property and signal.
pub trait RsMultiFdSinkImpl: BaseSinkImpl {}

unsafe impl<T: RsMultiFdSinkImpl> IsSubclassable<T> for super::RsMultiFdSink {}

impl RsMultiFdSink {
    pub(crate) fn engine(&self) -> &Engine {
        self.engine.get().expect("engine made in constructed()")
    }

    fn apply_settings(&self) {
        let settings = self.settings.lock().unwrap().engine_settings();
        self.engine().set_settings(settings);
    }

    /// How `add` places a client.
    fn add_config(&self) -> ClientConfig {
        self.settings.lock().unwrap().add_placement()
    }

    /// `add` and `add-full`.
    pub(crate) fn add_client(&self, fd: i32, config: ClientConfig) {
        let obj = self.obj();
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
                glib::g_warning!(
                    "rsmultifdsink",
                    "{}: element must be set to READY, PAUSED or PLAYING before clients can be added (fd {})",
                    obj.name(),
                    fd
                );
            }
        }
    }

    /// With `request-keyframe`, asks upstream for a keyframe so a new client need
    /// not wait a whole GOP (a `GstForceKeyUnit` upstream event, as
    /// `gst_video_event_new_upstream_force_key_unit` makes).
    fn request_keyframe_for(&self, fd: i32) {
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

    fn stats_structure(&self, fd: i32) -> gst::Structure {
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
}

#[glib::object_subclass]
impl ObjectSubclass for RsMultiFdSink {
    const NAME: &'static str = "GstRsMultiFdSink";
    type Type = super::RsMultiFdSink;
    type ParentType = gst_base::BaseSink;
}

/// An action signal taking an fd and returning nothing.
fn fd_action(name: &str, act: fn(&RsMultiFdSink, i32)) -> glib::subclass::Signal {
    glib::subclass::Signal::builder(name)
        .param_types([i32::static_type()])
        .run_last()
        .action()
        .class_handler(move |args| {
            let fd = args[1].get::<i32>().expect("fd");
            with_imp(args, |imp| act(imp, fd));
            None
        })
        .build()
}

/// Forwards an action signal to the element's implementation.
fn with_imp<R>(args: &[glib::Value], f: impl FnOnce(&RsMultiFdSink) -> R) -> R {
    let element = args[0]
        .get::<super::RsMultiFdSink>()
        .expect("signal emitted on an rsmultifdsink");
    f(element.imp())
}

impl ObjectImpl for RsMultiFdSink {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecInt::builder("buffers-max")
                    .nick("Buffers max")
                    .blurb("max number of buffers to queue for a client (-1 = no limit)")
                    .minimum(-1)
                    .default_value(-1)
                    .build(),
                glib::ParamSpecInt::builder("buffers-soft-max")
                    .nick("Buffers soft max")
                    .blurb("Recover client when going over this limit (-1 = no limit)")
                    .minimum(-1)
                    .default_value(-1)
                    .build(),
                glib::ParamSpecInt::builder("buffers-min")
                    .nick("Buffers min")
                    .blurb("min number of buffers to queue (-1 = as few as possible)")
                    .minimum(-1)
                    .default_value(-1)
                    .build(),
                glib::ParamSpecInt::builder("bytes-min")
                    .nick("Bytes min")
                    .blurb("min number of bytes to queue (-1 = as little as possible)")
                    .minimum(-1)
                    .default_value(-1)
                    .build(),
                glib::ParamSpecInt64::builder("time-min")
                    .nick("Time min")
                    .blurb("min amount of time to queue (in nanoseconds) (-1 = as little as possible)")
                    .minimum(-1)
                    .default_value(-1)
                    .build(),
                glib::ParamSpecEnum::builder_with_default("unit-format", gst::Format::Buffers)
                    .nick("Units format")
                    .blurb("The unit to measure the max/soft-max/queued properties")
                    .build(),
                glib::ParamSpecInt64::builder("units-max")
                    .nick("Units max")
                    .blurb("max number of units to queue (-1 = no limit)")
                    .minimum(-1)
                    .default_value(-1)
                    .build(),
                glib::ParamSpecInt64::builder("units-soft-max")
                    .nick("Units soft max")
                    .blurb("Recover client when going over this limit (-1 = no limit)")
                    .minimum(-1)
                    .default_value(-1)
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
                glib::ParamSpecEnum::builder_with_default("recover-policy", RecoverPolicy::None)
                    .nick("Recover Policy")
                    .blurb("How to recover when client reaches the soft max")
                    .build(),
                glib::ParamSpecUInt64::builder("timeout")
                    .nick("Timeout")
                    .blurb("Maximum inactivity timeout in nanoseconds for a client (0 = no limit)")
                    .default_value(0)
                    .build(),
                glib::ParamSpecEnum::builder_with_default("sync-method", SyncMethod::Latest)
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
                glib::ParamSpecEnum::builder_with_default("burst-format", gst::Format::Undefined)
                    .nick("Burst format")
                    .blurb("The format of the burst units (when sync-method is burst[[-with]-keyframe])")
                    .build(),
                glib::ParamSpecUInt64::builder("burst-value")
                    .nick("Burst value")
                    .blurb("The amount of burst expressed in burst-format")
                    .default_value(0)
                    .build(),
                glib::ParamSpecInt::builder("qos-dscp")
                    .nick("QoS diff srv code point")
                    .blurb("Quality of Service, differentiated services code point (-1 default)")
                    .minimum(-1)
                    .maximum(63)
                    .default_value(-1)
                    .build(),
                glib::ParamSpecBoolean::builder("resend-streamheader")
                    .nick("Resend streamheader")
                    .blurb("Resend the streamheader if it changes in the caps")
                    .default_value(true)
                    .build(),
                glib::ParamSpecUInt::builder("num-handles")
                    .nick("Number of handles")
                    .blurb("The current number of client handles")
                    .read_only()
                    .build(),
                glib::ParamSpecUInt::builder("io-threads")
                    .nick("IO threads")
                    .blurb("Threads writing to clients (clients are spread over them); changes only in NULL")
                    .minimum(1)
                    .maximum(64)
                    .default_value(1)
                    .build(),
                glib::ParamSpecBoolean::builder("request-keyframe")
                    .nick("Request keyframe")
                    .blurb("Ask upstream for a keyframe (force-key-unit) when a client is added")
                    .default_value(false)
                    .build(),
                glib::ParamSpecBoolean::builder("handle-read")
                    .nick("Handle Read")
                    .blurb("Handle client reads and discard the data")
                    .default_value(true)
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn signals() -> &'static [glib::subclass::Signal] {
        static SIGNALS: LazyLock<Vec<glib::subclass::Signal>> = LazyLock::new(|| {
            use glib::subclass::Signal;
            vec![
                fd_action("add", |imp, fd| imp.add_client(fd, imp.add_config())),
                Signal::builder("add-full")
                    .param_types([
                        i32::static_type(),
                        SyncMethod::static_type(),
                        gst::Format::static_type(),
                        u64::static_type(),
                        gst::Format::static_type(),
                        u64::static_type(),
                    ])
                    .run_last()
                    .action()
                    .class_handler(|args| {
                        let fd = args[1].get::<i32>().expect("fd");
                        let sync = args[2].get::<SyncMethod>().expect("sync method");
                        let min_format = args[3].get::<gst::Format>().expect("format");
                        let min_value = args[4].get::<u64>().expect("value");
                        let max_format = args[5].get::<gst::Format>().expect("format");
                        let max_value = args[6].get::<u64>().expect("value");
                        let config = ClientConfig {
                            sync: sync.into(),
                            burst_min: burst_amount(min_format, min_value),
                            burst_max: burst_amount(max_format, max_value),
                        };
                        with_imp(args, |imp| imp.add_client(fd, config));
                        None
                    })
                    .build(),
                fd_action("remove", |imp, fd| {
                    gst::debug!(CAT, imp = imp, "removing client fd {fd}");
                    imp.engine().remove(fd, engine::ClientStatus::Removed);
                }),
                fd_action("remove-flush", |imp, fd| {
                    gst::debug!(CAT, imp = imp, "flushing and removing client fd {fd}");
                    imp.engine().remove_flush(fd);
                }),
                Signal::builder("get-stats")
                    .param_types([i32::static_type()])
                    .return_type::<gst::Structure>()
                    .run_last()
                    .action()
                    .class_handler(|args| {
                        let fd = args[1].get::<i32>().expect("fd");
                        Some(with_imp(args, |imp| imp.stats_structure(fd)).to_value())
                    })
                    .build(),
                Signal::builder("clear")
                    .run_last()
                    .action()
                    .class_handler(|args| {
                        with_imp(args, |imp| {
                            gst::debug!(CAT, imp = imp, "clearing all clients");
                            imp.engine().clear()
                        });
                        None
                    })
                    .build(),
                Signal::builder("client-added")
                    .param_types([i32::static_type()])
                    .run_last()
                    .build(),
                Signal::builder("client-removed")
                    .param_types([i32::static_type(), ClientStatus::static_type()])
                    .run_last()
                    .build(),
                Signal::builder("client-fd-removed")
                    .param_types([i32::static_type()])
                    .run_last()
                    .build(),
            ]
        });
        SIGNALS.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        if pspec.name() == "io-threads" {
            let threads = value.get::<u32>().unwrap() as usize;
            match self.engine().set_io_threads(threads) {
                Ok(()) => gst::debug!(CAT, imp = self, "{threads} IO threads"),
                Err(e) => gst::warning!(CAT, imp = self, "io-threads not changed: {e}"),
            }
            return;
        }
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
            "handle-read" => s.handle_read = value.get().unwrap(),
            "request-keyframe" => s.request_keyframe = value.get().unwrap(),
            name => unimplemented!("property {name}"),
        }
        gst::debug!(CAT, imp = self, "set {} to {:?}", pspec.name(), value);
        drop(s);
        self.apply_settings();
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        if pspec.name() == "io-threads" {
            return (self.engine().io_threads() as u32).to_value();
        }
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
            "handle-read" => s.handle_read.to_value(),
            "request-keyframe" => s.request_keyframe.to_value(),
            name => {
                drop(s);
                let c = self.engine().counters();
                match name {
                    "buffers-queued" => (c.buffers_queued.min(u32::MAX as u64) as u32).to_value(),
                    "bytes-queued" => c.bytes_queued.to_value(),
                    "time-queued" => c.time_queued.to_value(),
                    "bytes-to-serve" => c.bytes_to_serve.to_value(),
                    "bytes-served" => c.bytes_served.to_value(),
                    "num-handles" => (c.num_handles.min(u32::MAX as u64) as u32).to_value(),
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
        self.apply_settings_if_ready();
    }
}

impl RsMultiFdSink {
    fn apply_settings_if_ready(&self) {
        if self.engine.get().is_some() {
            self.apply_settings();
        }
    }
}

impl GstObjectImpl for RsMultiFdSink {}

impl ElementImpl for RsMultiFdSink {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "Multi filedescriptor sink (Rust)",
                "Sink/Network",
                "Send data to multiple filedescriptors",
                "The rsmultifdsink authors",
            )
        });
        Some(&*METADATA)
    }

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
        if transition == gst::StateChange::NullToReady {
            let Some(engine) = self.engine.get() else {
                gst::element_imp_error!(
                    self,
                    gst::ResourceError::OpenWrite,
                    ["cannot create epoll instance"]
                );
                return Err(gst::StateChangeError);
            };
            if let Err(e) = engine.start() {
                gst::element_imp_error!(
                    self,
                    gst::ResourceError::OpenWrite,
                    ["cannot start IO thread: {}", e]
                );
                return Err(gst::StateChangeError);
            }
            gst::debug!(CAT, imp = self, "started");
        }
        let result = self.parent_change_state(transition);
        if transition == gst::StateChange::ReadyToNull {
            // Removes every client with its signals and drops queue and streamheader.
            self.engine().stop();
            gst::debug!(CAT, imp = self, "stopped");
        }
        result
    }
}

impl BaseSinkImpl for RsMultiFdSink {
    fn set_caps(&self, caps: &gst::Caps) -> Result<(), gst::LoggableError> {
        let streamheader = caps.structure(0).and_then(|s| {
            let value = s.value("streamheader").ok()?;
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
                match v.get::<gst::Buffer>() {
                    Ok(b) => match Self::chunk_of(&b) {
                        Ok(chunk) => buffers.push(chunk.data),
                        Err(_) => {
                            gst::warning!(CAT, imp = self, "cannot map a streamheader buffer")
                        }
                    },
                    Err(_) => {
                        gst::warning!(
                            CAT,
                            imp = self,
                            "caps streamheader holds a non-buffer, ignored: {caps}"
                        );
                        return None;
                    }
                }
            }
            Some(buffers)
        });
        gst::debug!(
            CAT,
            imp = self,
            "caps {caps}: streamheader of {} buffers",
            streamheader.as_ref().map_or(0, Vec::len)
        );
        self.engine().set_streamheader(streamheader);
        Ok(())
    }

    fn render(&self, buffer: &gst::Buffer) -> Result<gst::FlowSuccess, gst::FlowError> {
        let chunk = Self::chunk_of(buffer).inspect_err(|_| {
            gst::element_imp_error!(self, gst::ResourceError::Read, ["cannot map buffer"]);
        })?;
        gst::log!(
            CAT,
            imp = self,
            "queueing buffer of {} bytes, pts {:?}",
            chunk.len(),
            buffer.pts()
        );
        self.engine().push(chunk);
        Ok(gst::FlowSuccess::Ok)
    }
}
