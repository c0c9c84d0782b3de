//! The fan-out engine: a shared buffer queue, a read position per client and an
//! epoll IO thread that writes to the clients.
//!
//! Nothing in here knows about GStreamer or GObject, so it can be unit-tested with
//! plain pipes and socketpairs. The elements translate buffers, caps and signals
//! into the types below.

mod client;
mod client_fd;
mod io;
mod queue;
mod router;
mod rules;
pub(crate) mod shard;
mod state;
pub(crate) mod types;
mod write;

pub use self::client::ClientStats;
pub use self::router::Engine;
pub(crate) use self::shard::{AUX_TOKEN, Aux};
pub use self::types::{
    AddOutcome, Amount, Chunk, ClientConfig, ClientStatus, Counters, Fd, Listener, LogLevel,
    Payload, RecoverPolicy, Settings, Streamheader, SyncMethod, Unit,
};
