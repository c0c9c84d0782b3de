// SPDX-License-Identifier: MPL-2.0

//! `RsMultiHandleSink`: the abstract base class of the fan-out sinks, in the role of
//! the C `GstMultiHandleSink`.
//!
//! It owns the engine, every property the C base class has (limits, sync and burst,
//! counters) and the `clear` action; it queues buffers and streamheaders and starts
//! and stops the IO threads. It knows clients only by fd. A subclass gives clients a
//! type of its own (`rsmultifdsink`: plain fds; `rsmultisocketsink`: `GSocket`s) by
//! defining the action signals and the `client-*` signals, and learns what happens to
//! clients through the virtual methods of [`RsMultiHandleSinkImpl`]:
//!
//! | virtual method | called | C counterpart |
//! |---|---|---|
//! | `client_added` | inside the adding call, after the client was added | `client-added` emission |
//! | `client_removed` | first, when a client goes; its stats still answer | `removed` |
//! | `client_fd_removed` | then; the engine has forgotten the fd | the handle-removed signal |
//! | `client_input` | a client sent data (with [`RsMultiHandleSinkExt::set_keep_client_input`]) | multisocketsink's `GstNetworkMessage` |
//! | `buffer_sent` | a buffer was written whole to a client (with [`RsMultiHandleSinkExt::set_report_sent_buffers`]) | multisocketsink's `GstNetworkMessageDispatched` |
//! | `start_serving` | NULL→READY, once the IO threads run | `init` |
//! | `stop_serving` | READY→NULL, before the clients are removed | `close` |
//! | `default_placement` | for `add` and clients the subclass adds itself | sync-method/burst |
//!
//! None of them is called with an engine lock held, so they may call back into the
//! element. What a subclass may call is in [`RsMultiHandleSinkExt`].

use std::os::fd::RawFd;

use gst::glib;
use gst::glib::subclass::prelude::*;
use gst::prelude::*;
use gst_base::subclass::prelude::*;

use crate::engine::{self, ClientConfig};

mod imp;

pub use imp::{CAT, burst_amount};

glib::wrapper! {
    /// The base class: an abstract fan-out sink over the engine.
    pub struct RsMultiHandleSink(ObjectSubclass<imp::RsMultiHandleSink>)
        @extends gst_base::BaseSink, gst::Element, gst::Object;
}

/// The class structure: the base sink's, then one pointer per virtual method.
#[repr(C)]
pub struct Class {
    parent: gst_base::ffi::GstBaseSinkClass,
    client_added: fn(&RsMultiHandleSink, RawFd),
    client_removed: fn(&RsMultiHandleSink, RawFd, ClientStatus),
    client_fd_removed: fn(&RsMultiHandleSink, RawFd),
    client_input: fn(&RsMultiHandleSink, RawFd, gst::Buffer),
    buffer_sent: fn(&RsMultiHandleSink, RawFd, gst::Buffer),
    start_serving: fn(&RsMultiHandleSink) -> Result<(), gst::ErrorMessage>,
    stop_serving: fn(&RsMultiHandleSink),
    default_placement: fn(&RsMultiHandleSink) -> ClientConfig,
}

unsafe impl ClassStruct for Class {
    type Type = imp::RsMultiHandleSink;
}

impl std::ops::Deref for Class {
    type Target = glib::Class<gst_base::BaseSink>;

    fn deref(&self) -> &Self::Target {
        // SAFETY: the parent class structure is the first field (repr(C)).
        unsafe { &*(&self.parent as *const _ as *const _) }
    }
}

/// The virtual methods of the base class. Every one has a default, so a subclass
/// overrides only what it needs and chains up with the `parent_*` call.
pub trait RsMultiHandleSinkImpl:
    BaseSinkImpl + ObjectSubclass<Type: IsA<RsMultiHandleSink>>
{
    /// A client was added (on the adding thread, inside the adding call).
    fn client_added(&self, fd: RawFd) {
        self.parent_client_added(fd)
    }

    /// A client is going away; `client_stats` still answers for it here.
    fn client_removed(&self, fd: RawFd, status: ClientStatus) {
        self.parent_client_removed(fd, status)
    }

    /// The engine has forgotten `fd`: whoever owns it may close it now, and the same
    /// number may be added again.
    fn client_fd_removed(&self, fd: RawFd) {
        self.parent_client_fd_removed(fd)
    }

    /// A client sent `data` (on the IO thread; only while the subclass asked for it
    /// with `set_keep_client_input`, otherwise what clients send is dropped).
    fn client_input(&self, fd: RawFd, data: gst::Buffer) {
        self.parent_client_input(fd, data)
    }

    /// `buffer` (queued, or of the caps' streamheader) was written whole to the
    /// client (on the IO thread; only while the subclass asked for it with
    /// `set_report_sent_buffers`).
    fn buffer_sent(&self, fd: RawFd, buffer: gst::Buffer) {
        self.parent_buffer_sent(fd, buffer)
    }

    /// The element starts serving (NULL→READY), with the IO threads running. An error
    /// fails the state change.
    fn start_serving(&self) -> Result<(), gst::ErrorMessage> {
        self.parent_start_serving()
    }

    /// The element stops serving (READY→NULL); the clients are removed after this.
    fn stop_serving(&self) {
        self.parent_stop_serving()
    }

    /// Where a client starts when no placement is given (`add`, accepted sockets):
    /// by default `sync-method` with `burst-format`/`burst-value` as the burst minimum.
    fn default_placement(&self) -> ClientConfig {
        self.parent_default_placement()
    }
}

/// Chaining up to the parent class's virtual methods.
pub trait RsMultiHandleSinkImplExt: RsMultiHandleSinkImpl {
    fn parent_client_added(&self, fd: RawFd) {
        (parent_class::<Self>().client_added)(self.obj().upcast_ref(), fd)
    }

    fn parent_client_removed(&self, fd: RawFd, status: ClientStatus) {
        (parent_class::<Self>().client_removed)(self.obj().upcast_ref(), fd, status)
    }

    fn parent_client_fd_removed(&self, fd: RawFd) {
        (parent_class::<Self>().client_fd_removed)(self.obj().upcast_ref(), fd)
    }

    fn parent_client_input(&self, fd: RawFd, data: gst::Buffer) {
        (parent_class::<Self>().client_input)(self.obj().upcast_ref(), fd, data)
    }

    fn parent_buffer_sent(&self, fd: RawFd, buffer: gst::Buffer) {
        (parent_class::<Self>().buffer_sent)(self.obj().upcast_ref(), fd, buffer)
    }

    fn parent_start_serving(&self) -> Result<(), gst::ErrorMessage> {
        (parent_class::<Self>().start_serving)(self.obj().upcast_ref())
    }

    fn parent_stop_serving(&self) {
        (parent_class::<Self>().stop_serving)(self.obj().upcast_ref())
    }

    fn parent_default_placement(&self) -> ClientConfig {
        (parent_class::<Self>().default_placement)(self.obj().upcast_ref())
    }
}

impl<T: RsMultiHandleSinkImpl> RsMultiHandleSinkImplExt for T {}

fn parent_class<T: RsMultiHandleSinkImpl>() -> &'static Class {
    // SAFETY: every subclass of RsMultiHandleSink has a parent class whose structure
    // starts with `Class` (the base itself or one of its subclasses).
    unsafe { &*(T::type_data().as_ref().parent_class() as *const Class) }
}

unsafe impl<T: RsMultiHandleSinkImpl> IsSubclassable<T> for RsMultiHandleSink {
    fn class_init(class: &mut glib::Class<Self>) {
        Self::parent_class_init::<T>(class);
        let class = class.as_mut();
        class.client_added = |obj, fd| imp_of::<T>(obj).client_added(fd);
        class.client_removed = |obj, fd, status| imp_of::<T>(obj).client_removed(fd, status);
        class.client_fd_removed = |obj, fd| imp_of::<T>(obj).client_fd_removed(fd);
        class.client_input = |obj, fd, data| imp_of::<T>(obj).client_input(fd, data);
        class.buffer_sent = |obj, fd, buffer| imp_of::<T>(obj).buffer_sent(fd, buffer);
        class.start_serving = |obj| imp_of::<T>(obj).start_serving();
        class.stop_serving = |obj| imp_of::<T>(obj).stop_serving();
        class.default_placement = |obj| imp_of::<T>(obj).default_placement();
    }
}

fn imp_of<T: RsMultiHandleSinkImpl>(obj: &RsMultiHandleSink) -> &T {
    // SAFETY: the class of `obj` was initialised for `T`, so `obj` is a `T::Type`.
    unsafe { obj.unsafe_cast_ref::<T::Type>().imp() }
}

/// The base class's implementation behind any of its subclasses' instances, which
/// `RsMultiHandleSinkExt`'s methods call into.
fn base_imp<O: IsA<RsMultiHandleSink>>(obj: &O) -> &imp::RsMultiHandleSink {
    obj.upcast_ref::<RsMultiHandleSink>().imp()
}

/// What a subclass (or an application holding the element) may call.
pub trait RsMultiHandleSinkExt: IsA<RsMultiHandleSink> + 'static {
    /// Adds a client with `placement`, or the default placement (`None`). Refused
    /// with a warning in NULL or when the burst maximum is below its minimum.
    fn add_client(&self, fd: RawFd, placement: Option<ClientConfig>) {
        base_imp(self).add_client(fd, placement)
    }

    /// Adds a socket the subclass accepted itself, with the default placement.
    /// False (and no warning) when the element is not running: the caller still
    /// owns the fd then.
    fn add_accepted_client(&self, fd: RawFd) -> bool {
        base_imp(self).add_accepted_client(fd)
    }

    /// Clients now, not counting those being removed.
    fn client_count(&self) -> usize {
        base_imp(self).engine().client_count()
    }

    /// Whether new clients are to be refused (`overload-policy=refuse-clients`
    /// while the IO threads are overloaded).
    fn refusing_clients(&self) -> bool {
        base_imp(self).engine().refusing_clients()
    }

    /// The element's figures (`bytes-served`, `buffers-queued`, ...).
    fn counters(&self) -> engine::Counters {
        base_imp(self).engine().counters()
    }

    /// Removes a client now: `client_removed` and `client_fd_removed` have run when
    /// this returns. An unknown fd is a warning.
    fn remove_client(&self, fd: RawFd) {
        base_imp(self).remove_client(fd)
    }

    /// Sends what is already queued for the client, nothing newer, then removes it.
    fn remove_flush_client(&self, fd: RawFd) {
        base_imp(self).remove_flush_client(fd)
    }

    /// The `multihandlesink-stats` structure of a client; empty for an unknown fd.
    fn client_stats(&self, fd: RawFd) -> gst::Structure {
        base_imp(self).stats_structure(fd)
    }

    /// Whether what clients send is read and discarded (`handle-read`).
    fn set_handle_read(&self, handle_read: bool) {
        base_imp(self).set_handle_read(handle_read)
    }

    fn handle_read(&self) -> bool {
        base_imp(self).handle_read()
    }

    /// Whether what clients send goes to `client_input` instead of being dropped.
    fn set_keep_client_input(&self, keep: bool) {
        base_imp(self).set_keep_client_input(keep)
    }

    /// Whether every buffer written whole to a client goes to `buffer_sent`.
    fn set_report_sent_buffers(&self, report: bool) {
        base_imp(self).set_report_sent_buffers(report)
    }

    /// The state the element is in or going to, whichever is higher: a property
    /// that may change only in NULL or READY must not change on the way to PLAYING.
    fn highest_state(&self) -> gst::State {
        let element = self.upcast_ref::<RsMultiHandleSink>();
        let (current, pending) = (element.current_state(), element.pending_state());
        let rank = |s: gst::State| s as i32;
        if rank(pending) > rank(current) {
            pending
        } else {
            current
        }
    }
}

impl<O: IsA<RsMultiHandleSink>> RsMultiHandleSinkExt for O {}

/// How new clients join the stream (`GstMultiHandleSinkSyncMethod` values and nicks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, glib::Enum, Default)]
#[repr(i32)]
#[enum_type(name = "GstRsMultiHandleSinkSyncMethod")]
pub enum SyncMethod {
    #[default]
    #[enum_value(name = "Serve starting from the latest buffer", nick = "latest")]
    Latest = 0,
    #[enum_value(name = "Serve starting from the next keyframe", nick = "next-keyframe")]
    NextKeyframe = 1,
    #[enum_value(
        name = "Serve everything since the latest keyframe (burst)",
        nick = "latest-keyframe"
    )]
    LatestKeyframe = 2,
    #[enum_value(name = "Serve burst-value data to client", nick = "burst")]
    Burst = 3,
    #[enum_value(
        name = "Serve burst-value data starting on a keyframe",
        nick = "burst-keyframe"
    )]
    BurstKeyframe = 4,
    #[enum_value(
        name = "Serve burst-value data preferably starting on a keyframe",
        nick = "burst-with-keyframe"
    )]
    BurstWithKeyframe = 5,
}

/// What happens to a client over the soft limit (`GstMultiHandleSinkRecoverPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, glib::Enum, Default)]
#[repr(i32)]
#[enum_type(name = "GstRsMultiHandleSinkRecoverPolicy")]
pub enum RecoverPolicy {
    #[default]
    #[enum_value(name = "Do not try to recover", nick = "none")]
    None = 0,
    #[enum_value(name = "Resync client to latest buffer", nick = "latest")]
    Latest = 1,
    #[enum_value(name = "Resync client to soft limit", nick = "soft-limit")]
    SoftLimit = 2,
    #[enum_value(name = "Resync client to most recent keyframe", nick = "keyframe")]
    Keyframe = 3,
}

/// Why a client was removed (`GstMultiHandleSinkClientStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, glib::Enum)]
#[repr(i32)]
#[enum_type(name = "GstRsMultiHandleSinkClientStatus")]
pub enum ClientStatus {
    #[enum_value(name = "ok", nick = "ok")]
    Ok = 0,
    #[enum_value(name = "Closed", nick = "closed")]
    Closed = 1,
    #[enum_value(name = "Removed", nick = "removed")]
    Removed = 2,
    #[enum_value(name = "Too slow", nick = "slow")]
    Slow = 3,
    #[enum_value(name = "Error", nick = "error")]
    Error = 4,
    #[enum_value(name = "Duplicate", nick = "duplicate")]
    Duplicate = 5,
    #[enum_value(name = "Flushing", nick = "flushing")]
    Flushing = 6,
}

/// What the sink does when its IO threads, not its clients, cannot keep up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, glib::Enum, Default)]
#[repr(i32)]
#[enum_type(name = "GstRsMultiHandleSinkOverloadPolicy")]
pub enum OverloadPolicy {
    #[default]
    #[enum_value(
        name = "Slow the stream down until the IO threads catch up",
        nick = "back-pressure"
    )]
    BackPressure = 0,
    #[enum_value(
        name = "Lagging clients skip whole buffers (to a keyframe)",
        nick = "drop-buffers"
    )]
    DropBuffers = 1,
    #[enum_value(
        name = "Skip buffers and refuse new clients while overloaded",
        nick = "refuse-clients"
    )]
    RefuseClients = 2,
}

impl From<OverloadPolicy> for engine::OverloadPolicy {
    fn from(p: OverloadPolicy) -> Self {
        match p {
            OverloadPolicy::BackPressure => engine::OverloadPolicy::BackPressure,
            OverloadPolicy::DropBuffers => engine::OverloadPolicy::DropBuffers,
            OverloadPolicy::RefuseClients => engine::OverloadPolicy::RefuseClients,
        }
    }
}

impl From<SyncMethod> for engine::SyncMethod {
    fn from(m: SyncMethod) -> Self {
        match m {
            SyncMethod::Latest => engine::SyncMethod::Latest,
            SyncMethod::NextKeyframe => engine::SyncMethod::NextKeyframe,
            SyncMethod::LatestKeyframe => engine::SyncMethod::LatestKeyframe,
            SyncMethod::Burst => engine::SyncMethod::Burst,
            SyncMethod::BurstKeyframe => engine::SyncMethod::BurstKeyframe,
            SyncMethod::BurstWithKeyframe => engine::SyncMethod::BurstWithKeyframe,
        }
    }
}

impl From<RecoverPolicy> for engine::RecoverPolicy {
    fn from(p: RecoverPolicy) -> Self {
        match p {
            RecoverPolicy::None => engine::RecoverPolicy::None,
            RecoverPolicy::Latest => engine::RecoverPolicy::Latest,
            RecoverPolicy::SoftLimit => engine::RecoverPolicy::SoftLimit,
            RecoverPolicy::Keyframe => engine::RecoverPolicy::Keyframe,
        }
    }
}

impl From<engine::ClientStatus> for ClientStatus {
    fn from(s: engine::ClientStatus) -> Self {
        match s {
            engine::ClientStatus::Ok => ClientStatus::Ok,
            engine::ClientStatus::Closed => ClientStatus::Closed,
            engine::ClientStatus::Removed => ClientStatus::Removed,
            engine::ClientStatus::Slow => ClientStatus::Slow,
            engine::ClientStatus::Error => ClientStatus::Error,
            engine::ClientStatus::Duplicate => ClientStatus::Duplicate,
            engine::ClientStatus::Flushing => ClientStatus::Flushing,
        }
    }
}

/// How a subclass turns a handle argument of an action signal into the client's fd:
/// `None` when the value names no usable handle (or, for lookups, no client).
pub type HandleToFd = fn(&glib::Object, &glib::Value) -> Option<RawFd>;

/// The action signals every subclass has, with its handle type as the first
/// argument: `add`, `add-full`, `remove`, `remove-flush` and `get-stats`.
/// `for_add` maps the handle of `add`/`add-full` (and may take it over, as
/// `rsmultisocketsink` keeps the `GSocket`); `lookup` maps the others.
pub fn client_action_signals(
    handle_type: glib::Type,
    for_add: HandleToFd,
    lookup: HandleToFd,
) -> Vec<glib::subclass::Signal> {
    use glib::subclass::Signal;
    // Runs `act` with the element and the fd, or warns that the handle is unusable.
    fn with_fd<R>(
        args: &[glib::Value],
        map: HandleToFd,
        act: impl FnOnce(&RsMultiHandleSink, RawFd) -> R,
    ) -> Option<R> {
        let element = args[0]
            .get::<RsMultiHandleSink>()
            .expect("signal emitted on a multi handle sink");
        match map(element.upcast_ref(), &args[1]) {
            Some(fd) => Some(act(&element, fd)),
            None => {
                gst::warning!(CAT, obj = &element, "no client with handle {:?}", args[1]);
                None
            }
        }
    }
    let simple = |name: &str, map: HandleToFd, act: fn(&RsMultiHandleSink, RawFd)| {
        Signal::builder(name)
            .param_types([handle_type])
            .run_last()
            .action()
            .class_handler(move |args| {
                with_fd(args, map, act);
                None
            })
            .build()
    };
    vec![
        simple("add", for_add, |element, fd| element.add_client(fd, None)),
        Signal::builder("add-full")
            .param_types([
                handle_type,
                SyncMethod::static_type(),
                gst::Format::static_type(),
                u64::static_type(),
                gst::Format::static_type(),
                u64::static_type(),
            ])
            .run_last()
            .action()
            .class_handler(move |args| {
                let placement = ClientConfig {
                    sync: args[2].get::<SyncMethod>().expect("sync method").into(),
                    burst_min: burst_amount(
                        args[3].get().expect("format"),
                        args[4].get().expect("value"),
                    ),
                    burst_max: burst_amount(
                        args[5].get().expect("format"),
                        args[6].get().expect("value"),
                    ),
                };
                with_fd(args, for_add, |element, fd| {
                    element.add_client(fd, Some(placement))
                });
                None
            })
            .build(),
        simple("remove", lookup, |element, fd| element.remove_client(fd)),
        simple("remove-flush", lookup, |element, fd| {
            element.remove_flush_client(fd)
        }),
        Signal::builder("get-stats")
            .param_types([handle_type])
            .return_type::<gst::Structure>()
            .run_last()
            .action()
            .class_handler(move |args| {
                let stats = with_fd(args, lookup, |element, fd| element.client_stats(fd))
                    .unwrap_or_else(|| gst::Structure::new_empty("multihandlesink-stats"));
                Some(stats.to_value())
            })
            .build(),
    ]
}

/// The notification signals every subclass has: `client-added` (with
/// `added_type`, which C's multisocketsink declares as GObject), `client-removed`
/// (handle, status) and `removed_name` (`client-fd-removed`, `client-socket-removed`).
pub fn client_signals(
    added_type: glib::Type,
    handle_type: glib::Type,
    removed_name: &str,
) -> Vec<glib::subclass::Signal> {
    use glib::subclass::Signal;
    vec![
        Signal::builder("client-added")
            .param_types([added_type])
            .run_last()
            .build(),
        Signal::builder("client-removed")
            .param_types([handle_type, ClientStatus::static_type()])
            .run_last()
            .build(),
        Signal::builder(removed_name)
            .param_types([handle_type])
            .run_last()
            .build(),
    ]
}

/// Element metadata of a fan-out sink: `Sink/Network`, by this project's authors.
pub fn sink_metadata(long_name: &str, description: &str) -> gst::subclass::ElementMetadata {
    gst::subclass::ElementMetadata::new(
        long_name,
        "Sink/Network",
        description,
        "The rsmultifdsink authors",
    )
}

/// Logs what the engine or the server says (`log!` on a `Listener` or a
/// `MountTarget`) in `cat`, as `element` while it exists.
pub(crate) fn log_as<T: IsA<gst::Object>>(
    cat: gst::DebugCategory,
    element: &glib::WeakRef<T>,
    level: engine::LogLevel,
    args: std::fmt::Arguments<'_>,
) {
    let level = match level {
        engine::LogLevel::Warning => gst::DebugLevel::Warning,
        engine::LogLevel::Info => gst::DebugLevel::Info,
        engine::LogLevel::Debug => gst::DebugLevel::Debug,
        engine::LogLevel::Log => gst::DebugLevel::Log,
    };
    if cat.threshold() < level {
        return;
    }
    match element.upgrade() {
        Some(element) => gst::log_with_level!(cat, level, obj = &element, "{}", args),
        None => gst::log_with_level!(cat, level, "{}", args),
    }
}
