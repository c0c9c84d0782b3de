// SPDX-License-Identifier: MPL-2.0

//! The engine's public data types: what the elements hand in (buffers, settings,
//! placements) and what they get back (outcomes, figures, events).

use std::fmt;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

/// The bytes of one buffer, shared by every client that sends it.
///
/// The elements store a mapped `gst::Buffer` here, so a buffer is mapped once and
/// all clients write from the same memory; `Any` gives them their buffer back
/// when the engine reports it sent ([`Listener::buffer_sent`]).
pub type Payload = Arc<dyn PayloadBytes>;

/// What a [`Payload`] holds: bytes of any owner type.
pub trait PayloadBytes: AsRef<[u8]> + std::any::Any + Send + Sync {}

impl<T: AsRef<[u8]> + std::any::Any + Send + Sync> PayloadBytes for T {}

/// The streamheader of one caps generation: sent once before the first buffer of
/// that generation to every client. Compared by pointer identity.
pub type Streamheader = Arc<Vec<Payload>>;

/// One buffer of the stream, as queued.
#[derive(Clone)]
pub struct Chunk {
    pub data: Payload,
    /// A sync point: a client may start here (`!DELTA_UNIT` and not a header).
    pub keyframe: bool,
    /// Flagged `HEADER`: repeats the caps' streamheader when there is one.
    pub header: bool,
    /// Presentation timestamp in nanoseconds, if known.
    pub pts: Option<u64>,
}

impl Chunk {
    pub fn new(data: Payload, keyframe: bool, header: bool, pts: Option<u64>) -> Self {
        Chunk {
            data,
            keyframe,
            header,
            pts,
        }
    }

    pub fn from_vec(data: Vec<u8>, keyframe: bool, header: bool, pts: Option<u64>) -> Self {
        Chunk::new(Arc::new(data), keyframe, header, pts)
    }

    pub fn len(&self) -> usize {
        (*self.data).as_ref().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a new client is placed in the stream (values as in `multifdsink`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMethod {
    /// From the next buffer that arrives.
    #[default]
    Latest,
    /// From the next keyframe that arrives.
    NextKeyframe,
    /// From the most recent keyframe in the queue, or the next one.
    LatestKeyframe,
    /// At least the burst minimum back from the newest buffer.
    Burst,
    /// Like burst, but on a keyframe at or before the burst minimum (within the maximum).
    BurstKeyframe,
    /// Like burst-keyframe, falling back to plain burst when no keyframe fits.
    BurstWithKeyframe,
}

/// What happens to a client that falls behind the soft limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecoverPolicy {
    #[default]
    None,
    /// Jump to the next buffer that arrives.
    Latest,
    /// Jump to the soft limit.
    SoftLimit,
    /// Jump to the most recent keyframe.
    Keyframe,
}

/// Why a client went away (values as in `multifdsink`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientStatus {
    Ok = 0,
    Closed = 1,
    Removed = 2,
    Slow = 3,
    Error = 4,
    Duplicate = 5,
    Flushing = 6,
}

/// The unit of a limit or burst amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Buffers,
    Bytes,
    /// Nanoseconds of buffer timestamps.
    Time,
}

/// An amount of queue: `None` is "no limit".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amount {
    pub unit: Unit,
    pub value: u64,
}

impl Amount {
    pub fn new(unit: Unit, value: u64) -> Self {
        Amount { unit, value }
    }
}

/// Per-client settings, as given to `add-full`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientConfig {
    pub sync: SyncMethod,
    /// The least that a burst sends (burst methods only).
    pub burst_min: Option<Amount>,
    /// The most that a burst sends (burst methods only).
    pub burst_max: Option<Amount>,
}

/// The file descriptor of a client, as the application gave it.
pub type Fd = RawFd;

/// Receives what happens to clients. Called without any engine lock held, so a
/// handler may call back into the engine.
pub trait Listener: Send + Sync {
    fn client_added(&self, fd: Fd);
    fn client_removed(&self, fd: Fd, status: ClientStatus);
    fn client_fd_removed(&self, fd: Fd);
    /// With `Settings::keep_input`: bytes a client sent (on the IO thread).
    fn client_input(&self, _fd: Fd, _data: Vec<u8>) {}
    /// With `Settings::report_sent`: a buffer, queued or streamheader, was written
    /// whole to the client (on the IO thread).
    fn buffer_sent(&self, _fd: Fd, _data: &Payload) {}
    /// Diagnostics; `args` is formatted only if the listener wants it. Unlike the
    /// signals above, this may be called with the engine lock held: it must not call
    /// back into the engine.
    fn log(&self, _level: LogLevel, _args: fmt::Arguments<'_>) {}
}

/// How much a log line matters (the elements map it to GStreamer debug levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Warning,
    Info,
    Debug,
    Log,
}

/// Engine-wide settings; may change while streaming.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// A client with more than this still to send is removed as slow.
    pub units_max: Option<Amount>,
    /// A client with more than this still to send is recovered by `recover_policy`.
    pub units_soft_max: Option<Amount>,
    pub recover_policy: RecoverPolicy,
    /// Keep at least this much queued even when no client needs it (for bursts).
    pub buffers_min: Option<u64>,
    pub bytes_min: Option<u64>,
    pub time_min: Option<u64>,
    /// Keep the newest keyframe queued (the default sync method starts on one).
    pub keep_keyframe: bool,
    /// Remove clients that wrote nothing for this long.
    pub timeout: Option<Duration>,
    /// Read and discard what clients send; notice when they close.
    pub handle_read: bool,
    /// With `handle_read`, hand what clients send to `Listener::client_input`.
    pub keep_input: bool,
    /// Tell `Listener::buffer_sent` of every buffer written whole to a client.
    pub report_sent: bool,
    pub resend_streamheader: bool,
    /// DSCP for client sockets.
    pub qos_dscp: Option<u8>,
    /// How a client joins when nobody chose for it (the server's accepted sockets):
    /// the element's `sync-method` and burst.
    pub default_placement: ClientConfig,
    /// What happens when the IO threads, not the clients, fall behind.
    pub overload_policy: OverloadPolicy,
    /// How long a caught-up client's new data may wait so that several buffers go
    /// out in one call (`batch-time`); `None` writes as soon as data arrives.
    pub batch_time: Option<Duration>,
    /// Keep queued buffers in an append-only memfd and write clients with
    /// `sendfile` from it (fds that refuse it are written with writev).
    pub zero_copy: bool,
    /// With `zero_copy`, buffers go into the memfd only while the engine has at least
    /// this many clients: with fewer, copying a buffer into the memfd (a fresh shmem
    /// page per 4 KiB, punched out again) costs more than the per-client copies it
    /// saves. 0: every buffer.
    pub zero_copy_min_clients: usize,
    /// Write each IO thread's batch of ready clients through io_uring (one SQE per
    /// client, one submission for all) instead of one system call each; where
    /// io_uring cannot be set up, the system calls are used.
    pub io_uring: bool,
}

/// What the engine does when the IO threads cannot keep up with the stream: a
/// client that is not blocked on its own fd is past the limit (`units-max`, or
/// `units-soft-max` with a recover policy) only because its IO thread has not
/// reached it yet. Such a client is never removed or recovered as slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverloadPolicy {
    /// `push` waits (bounded, and not while flushing) until the IO threads caught
    /// up: every byte the machine can send is delivered and the source is slowed.
    #[default]
    BackPressure,
    /// `push` never waits: lagging clients skip whole buffers, to where
    /// `recover_policy` puts them (`keyframe` when it is `none`).
    DropBuffers,
    /// As `DropBuffers`, and the server refuses new clients while it lasts.
    RefuseClients,
}

/// What one `Engine::push` met: how long it waited for the IO threads, and how many
/// buffers lagging clients skipped for it (summed over clients).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushReport {
    pub waited: Duration,
    pub dropped: u64,
    /// Some client was still past the limit, not blocked, when `push` returned.
    pub behind: bool,
}

/// Clients from which zero-copy pays (`docs/benchmark.md`, "zero-copy with few
/// clients": over UNIX sockets with 64 KiB buffers it costs 2x the CPU of writev at
/// 4 clients and breaks even at 64-100).
pub const ZERO_COPY_MIN_CLIENTS: usize = 64;

impl Default for Settings {
    fn default() -> Self {
        Settings {
            units_max: None,
            units_soft_max: None,
            recover_policy: RecoverPolicy::None,
            buffers_min: None,
            bytes_min: None,
            time_min: None,
            keep_keyframe: false,
            timeout: None,
            handle_read: true,
            keep_input: false,
            report_sent: false,
            resend_streamheader: true,
            qos_dscp: None,
            default_placement: ClientConfig::default(),
            overload_policy: OverloadPolicy::BackPressure,
            batch_time: None,
            zero_copy: false,
            zero_copy_min_clients: ZERO_COPY_MIN_CLIENTS,
            io_uring: false,
        }
    }
}

/// The read-only figures of the element.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub bytes_to_serve: u64,
    pub bytes_served: u64,
    /// Of `bytes_served`, those written with `sendfile` (zero-copy).
    pub bytes_served_zero_copy: u64,
    pub buffers_queued: u64,
    pub bytes_queued: u64,
    pub time_queued: u64,
    pub num_handles: u64,
}

/// What `Engine::add` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddOutcome {
    Added,
    /// The fd is already a client; `client-removed(duplicate)` was emitted.
    Duplicate,
    /// The engine is not started (element in NULL); nothing was done.
    NotRunning,
}

/// `log!(to, Level, "format", args)`: logs through anything with a
/// `log(LogLevel, fmt::Arguments)` method (a `Listener`, the hub's `MountTarget`).
macro_rules! log {
    ($to:expr, $level:ident, $($arg:tt)*) => {
        $to.log($crate::engine::LogLevel::$level, format_args!($($arg)*))
    };
}
pub(crate) use log;
