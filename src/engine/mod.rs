//! The fan-out engine: a shared buffer queue, a read position per client and an
//! epoll IO thread that writes to the clients.
//!
//! Nothing in here knows about GStreamer or GObject, so it can be unit-tested with
//! plain pipes and socketpairs. The elements translate buffers, caps and signals
//! into the types below.

mod client;
pub(crate) mod core;
mod io;
mod queue;
mod router;

use std::os::fd::RawFd;
use std::sync::Arc;

pub use self::client::ClientStats;
pub(crate) use self::core::{AUX_TOKEN, Aux, Aux as Service};
pub use self::core::{AddOutcome, Counters, Listener, LogLevel, Settings};
pub use self::router::Engine;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientConfig {
    pub sync: SyncMethod,
    /// The least that a burst sends (burst methods only).
    pub burst_min: Option<Amount>,
    /// The most that a burst sends (burst methods only).
    pub burst_max: Option<Amount>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            sync: SyncMethod::Latest,
            burst_min: None,
            burst_max: None,
        }
    }
}

/// The file descriptor of a client, as the application gave it.
pub type Fd = RawFd;
