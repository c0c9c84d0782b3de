// SPDX-License-Identifier: MPL-2.0

//! One client: where it stands in the stream, what it still owes from a partial
//! write, and its figures for `get-stats`.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::spool::{FdClass, Spooled};
use super::types::{ClientConfig, ClientStatus, Payload, Streamheader};

pub(crate) type ClientId = u64;

/// A hasher for client ids and fd numbers: small integers from the kernel and from
/// a counter, never chosen by a peer, so a multiply does instead of SipHash on the
/// per-buffer path.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write_i32(&mut self, n: i32) {
        self.write_u64(n as u32 as u64);
    }
}

pub(crate) type IdMap<K, V> =
    std::collections::HashMap<K, V, std::hash::BuildHasherDefault<IdHasher>>;

/// Where a client is in the engine's life cycle, and so which list holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Inside `add`, before `client-added` was emitted: nothing is done with it yet.
    Adding,
    /// Waits for the next buffer to choose its start (`multifdsink` places new
    /// clients when the first buffer after `add` arrives).
    Joining,
    /// Has data to send and is believed writable: on the ready list.
    Ready,
    /// Has sent everything there is: on the idle list until the next buffer.
    Idle,
    /// Has data, but waits until its batch is due (`batch-time`) so that more
    /// buffers go out in the same call.
    Batching,
    /// The fd said EAGAIN: waits for EPOLLOUT.
    Blocked,
    /// Being removed: no more IO; signals pending.
    Removing,
}

/// How the fd is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FdKind {
    /// `sendmsg` with MSG_NOSIGNAL.
    Socket,
    /// `writev`; SIGPIPE is blocked on the IO thread.
    Stream,
}

/// Whether a client is written with `sendfile` from the spool (with zero-copy on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroCopyFd {
    /// Not written with zero-copy yet: its kind is looked up at the first write.
    Unknown,
    Kind(FdClass),
    /// `sendfile` refused this fd: writev from now on.
    Refused,
}

/// How the fd is watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Watch {
    /// Registered with epoll (edge-triggered).
    Epoll,
    /// epoll refused it with EPERM (regular files): always writable.
    AlwaysWritable,
    /// The fd is unusable; the IO thread removes the client with this errno.
    Broken(nix::errno::Errno),
}

/// The figures `get-stats` reports for a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientStats {
    pub bytes_sent: u64,
    /// Wall-clock nanoseconds since the UNIX epoch.
    pub connect_time: u64,
    pub connect_time_monotonic: u64,
    /// 0 while connected.
    pub disconnect_time: u64,
    pub disconnect_time_monotonic: u64,
    /// Nanoseconds connected, up to now or to the disconnect.
    pub connect_duration: u64,
    pub last_activity_time: u64,
    pub last_activity_time_monotonic: u64,
    pub buffers_dropped: u64,
    pub first_buffer_ts: Option<u64>,
    pub last_buffer_ts: Option<u64>,
}

/// Bytes the client must send before its next queued buffer: a streamheader buffer,
/// or the rest of a buffer written in part.
pub(crate) struct Unsent {
    pub data: Payload,
    pub offset: usize,
    /// Where `data` is in the zero-copy spool, if it is there.
    pub spooled: Option<Arc<Spooled>>,
}

/// One client of a worker: its fd, where it stands in the stream, what it still
/// owes from a partial write, and its figures.
pub(crate) struct Client {
    pub id: ClientId,
    pub fd: RawFd,
    pub kind: FdKind,
    pub watch: Watch,
    /// Whether its fd is watched for input (`handle-read` when it was added).
    pub handle_read: bool,
    pub config: ClientConfig,
    pub phase: Phase,
    /// Sequence number of the next queued buffer to send (meaningful once joined).
    pub pos: u64,
    /// Whether `pos` is counted in the queue's references.
    pub positioned: bool,
    /// Streamheaders and the rest of a partially written buffer, sent before `pos`.
    pub outbox: VecDeque<Unsent>,
    /// The streamheader generation this client was last given.
    pub streamheader: Option<Streamheader>,
    pub had_streamheader: bool,
    /// With zero-copy: whether and how its fd takes `sendfile`.
    pub zero_copy: ZeroCopyFd,
    /// `remove-flush`: send up to (not including) this position, then go.
    pub flush_until: Option<u64>,
    /// Removed while still in `Adding`: the adding thread removes it with this status.
    pub removal_requested: Option<ClientStatus>,
    /// The thread inside `add` while the client is `Adding`.
    pub adding_thread: Option<std::thread::ThreadId>,
    pub status: ClientStatus,
    pub connected_at: Instant,
    pub connected_wall: SystemTime,
    /// CLOCK_MONOTONIC at connect, in nanoseconds (what `g_get_monotonic_time` reads).
    pub connected_mono_ns: u64,
    pub last_activity: Instant,
    /// Since when its fd has been seen full past `units-max` (cleared when seen
    /// with room, or caught up): slow once that lasted the grace.
    pub full_since: Option<Instant>,
    /// While `Batching`: when its batch is due (tells stale timer entries apart).
    pub batch_due: Option<Instant>,
    pub disconnected_at: Option<(Instant, SystemTime)>,
    pub bytes_sent: u64,
    pub buffers_dropped: u64,
    pub first_buffer_ts: Option<u64>,
    pub last_buffer_ts: Option<u64>,
}

/// CLOCK_MONOTONIC in nanoseconds.
pub(crate) fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|ts| ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
        .unwrap_or(0)
}

fn wall_ns(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_nanos() as u64
}

impl Client {
    pub fn new(id: ClientId, fd: RawFd, kind: FdKind, watch: Watch, config: ClientConfig) -> Self {
        let now = Instant::now();
        Client {
            id,
            fd,
            kind,
            watch,
            handle_read: true,
            config,
            phase: Phase::Adding,
            batch_due: None,
            pos: 0,
            positioned: false,
            outbox: VecDeque::new(),
            streamheader: None,
            had_streamheader: false,
            zero_copy: ZeroCopyFd::Unknown,
            flush_until: None,
            removal_requested: None,
            adding_thread: Some(std::thread::current().id()),
            status: ClientStatus::Ok,
            connected_at: now,
            connected_wall: SystemTime::now(),
            connected_mono_ns: monotonic_ns(),
            last_activity: now,
            full_since: None,
            disconnected_at: None,
            bytes_sent: 0,
            buffers_dropped: 0,
            first_buffer_ts: None,
            last_buffer_ts: None,
        }
    }

    pub fn stats(&self) -> ClientStats {
        let mono = |t: Instant| {
            self.connected_mono_ns
                + t.saturating_duration_since(self.connected_at).as_nanos() as u64
        };
        let (end, end_wall) = match self.disconnected_at {
            Some((m, w)) => (m, Some(w)),
            None => (Instant::now(), None),
        };
        // Wall clock of the last activity, derived from the connect time so both
        // clocks tell the same story.
        let activity_wall = self.connected_wall
            + self
                .last_activity
                .saturating_duration_since(self.connected_at);
        ClientStats {
            bytes_sent: self.bytes_sent,
            connect_time: wall_ns(self.connected_wall),
            connect_time_monotonic: mono(self.connected_at),
            disconnect_time: end_wall.map(wall_ns).unwrap_or(0),
            disconnect_time_monotonic: self.disconnected_at.map(|(m, _)| mono(m)).unwrap_or(0),
            connect_duration: end.saturating_duration_since(self.connected_at).as_nanos() as u64,
            last_activity_time: wall_ns(activity_wall),
            last_activity_time_monotonic: mono(self.last_activity),
            buffers_dropped: self.buffers_dropped,
            first_buffer_ts: self.first_buffer_ts,
            last_buffer_ts: self.last_buffer_ts,
        }
    }
}
