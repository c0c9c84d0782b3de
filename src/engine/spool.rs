// SPDX-License-Identifier: MPL-2.0

//! The zero-copy store: an append-only memfd holding one copy of each queued
//! buffer's bytes, from which clients are written with `sendfile`.
//!
//! Since Linux 6.5, `sendfile` into a TCP or UNIX socket hands the memfd's pages to
//! the socket by reference (MSG_SPLICE_PAGES) and into a pipe it splices them, so the
//! kernel copies a buffer's bytes once (into the memfd), not once per client. A
//! page handed over may sit in a socket's queue long after its client moved on, so
//! no byte is ever written twice: buffers are only appended, and the space behind
//! every buffer still needed is given back by punching holes, which drops the pages
//! from the file while the sockets keep their references.
//!
//! One store per engine, not per worker: with several IO threads every worker queues
//! the same buffers (an `Arc` each), and a buffer appended once is sent by all of
//! them, so each buffer is copied in once whatever the number of threads. A buffer's
//! place ([`Spooled`]) is shared by the workers' queue entries and by clients that
//! still owe the rest of it; when the last of them lets go, its bytes are released.
//! The hole punched is behind the oldest buffer still held anywhere.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, fallocate};
use nix::sys::memfd::{MFdFlags, memfd_create};

use super::types::{Fd, Listener, log};

/// What kind of file a client's fd is, as far as `sendfile` goes: whether it works
/// is learnt once per kind (`Spool` keeps what it learnt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FdClass {
    UnixSocket,
    TcpSocket,
    /// UDP, SCTP and other socket families or types.
    OtherSocket,
    Pipe,
    File,
    CharDevice,
    Other,
}

impl FdClass {
    pub const COUNT: usize = 7;
}

/// Where one buffer's bytes are in the store. Dropping the last reference releases
/// them (the hole is punched once everything older is released too).
pub(crate) struct Spooled {
    pub file: Arc<SpoolFile>,
    pub offset: u64,
    /// Which append this was: its place in the file's list of held buffers.
    index: u64,
}

impl Drop for Spooled {
    fn drop(&mut self) {
        self.file.release(self.index);
    }
}

/// One memfd and what of it is still held.
pub(crate) struct SpoolFile {
    fd: OwnedFd,
    /// Holes are punched in whole units of this: the page size, or the largest
    /// folio shmem may use. Punching part of a (large) folio zeroes those bytes
    /// in place, and they may still be in a socket's queue.
    granule: u64,
    held: Mutex<Held>,
}

/// The buffers appended and not yet known released, oldest first.
struct Held {
    /// Where the next append goes (bytes are never written below it again).
    end: u64,
    /// Offset of each buffer from `first_index` on, and whether it was released.
    buffers: VecDeque<(u64, bool)>,
    first_index: u64,
    /// Everything below this is a hole.
    punched: u64,
}

impl SpoolFile {
    fn new() -> nix::Result<SpoolFile> {
        let fd = memfd_create("rsmultifdsink-spool", MFdFlags::MFD_CLOEXEC)?;
        let page = nix::sys::stat::fstat(&fd)?.st_blksize.max(1) as u64;
        // With transparent huge pages built in, shmem may back the file with folios
        // up to this size (it depends on sysfs settings that may change later).
        let folio = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        Ok(SpoolFile {
            fd,
            granule: page.max(folio),
            held: Mutex::new(Held {
                end: 0,
                buffers: VecDeque::new(),
                first_index: 0,
                punched: 0,
            }),
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Appends `data` at the end; its offset and index, or the error (what was
    /// written of it stays unused: nothing is written twice).
    fn append(&self, data: &[u8]) -> nix::Result<(u64, u64)> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let offset = held.end;
        let mut done = 0;
        let result = loop {
            if done == data.len() {
                break Ok(());
            }
            match nix::sys::uio::pwrite(&self.fd, &data[done..], (offset + done as u64) as i64) {
                Ok(n) => done += n,
                Err(Errno::EINTR) => {}
                Err(e) => break Err(e),
            }
        };
        held.end += done as u64;
        result?;
        let index = held.first_index + held.buffers.len() as u64;
        held.buffers.push_back((offset, false));
        Ok((offset, index))
    }

    fn release(&self, index: u64) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let Some(i) = index.checked_sub(held.first_index) else {
            return;
        };
        if let Some(b) = held.buffers.get_mut(i as usize) {
            b.1 = true;
        }
        while held.buffers.front().is_some_and(|b| b.1) {
            held.buffers.pop_front();
            held.first_index += 1;
        }
        // Everything below the oldest held buffer is free; only whole granules go,
        // so the one that still holds needed bytes (or the end) is never touched.
        let free_below = held.buffers.front().map_or(held.end, |b| b.0);
        let to = free_below / self.granule * self.granule;
        if to > held.punched {
            let from = held.punched;
            let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            // A failure only keeps memory longer; the next release tries again.
            if fallocate(&self.fd, flags, from as i64, (to - from) as i64).is_ok() {
                held.punched = to;
            }
        }
    }

    /// Bytes of memory the file holds now (its allocated blocks).
    fn allocated(&self) -> u64 {
        nix::sys::stat::fstat(&self.fd).map_or(0, |st| st.st_blocks as u64 * 512)
    }
}

/// Whether `sendfile` works on a kind of fd, learnt from its first use.
const UNKNOWN: u8 = 0;
const WORKS: u8 = 1;
const REFUSED: u8 = 2;

/// Whether buffers go into the store now (too few clients: they do not).
const UNDECIDED: u8 = 0;
const APPENDING: u8 = 1;
const BYPASSED: u8 = 2;

/// The engine's store and what it learnt about which fds take `sendfile`.
pub(crate) struct Spool {
    enabled: AtomicBool,
    /// Buffers are appended only while the engine has at least this many clients.
    min_clients: AtomicUsize,
    /// `APPENDING`, `BYPASSED` or `UNDECIDED` (no buffer since it was enabled): the
    /// log says when it changes.
    spooling: AtomicU8,
    /// Made at the first append while enabled; let go when disabled or stopped
    /// (buffers still queued keep it until they are released).
    file: Mutex<Option<Arc<SpoolFile>>>,
    support: [AtomicU8; FdClass::COUNT],
    /// Bytes written to clients with `sendfile`.
    sent: AtomicU64,
    listener: Arc<dyn Listener>,
}

impl Spool {
    pub fn new(listener: Arc<dyn Listener>) -> Spool {
        Spool {
            enabled: AtomicBool::new(false),
            min_clients: AtomicUsize::new(0),
            spooling: AtomicU8::new(UNDECIDED),
            file: Mutex::new(None),
            support: Default::default(),
            sent: AtomicU64::new(0),
            listener,
        }
    }

    pub fn set_enabled(&self, on: bool, min_clients: usize) {
        self.min_clients.store(min_clients, Ordering::Relaxed);
        self.spooling.store(UNDECIDED, Ordering::Relaxed);
        let was = self.enabled.swap(on, Ordering::SeqCst);
        if was && !on {
            *self.file.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Whether the next buffer goes into the store: it is enabled and the engine has
    /// `min_clients` clients or more (`clients` counts them, only when it matters).
    /// Logs when that changes.
    pub fn wanted(&self, clients: impl FnOnce() -> usize) -> bool {
        if !self.enabled() {
            return false;
        }
        let min = self.min_clients.load(Ordering::Relaxed);
        let count = if min == 0 { 0 } else { clients() };
        let wanted = count >= min;
        let state = if wanted { APPENDING } else { BYPASSED };
        if self.spooling.swap(state, Ordering::Relaxed) != state {
            log!(
                self.listener,
                Info,
                "zero-copy: {count} clients ({min} or more wanted): buffers {} the memfd from now on",
                if wanted { "go into" } else { "stay out of" }
            );
        }
        wanted
    }

    /// Copies a buffer into the store, when enabled. `None`: it goes by writev.
    pub fn append(&self, data: &[u8]) -> Option<Arc<Spooled>> {
        if !self.enabled() {
            return None;
        }
        let mut slot = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let file = match &*slot {
            Some(file) => file.clone(),
            None => match SpoolFile::new() {
                Ok(file) => slot.insert(Arc::new(file)).clone(),
                Err(e) => {
                    drop(slot);
                    log!(
                        self.listener,
                        Warning,
                        "zero-copy off: cannot make a memfd: {e}"
                    );
                    self.enabled.store(false, Ordering::SeqCst);
                    return None;
                }
            },
        };
        drop(slot);
        match file.append(data) {
            Ok((offset, index)) => Some(Arc::new(Spooled {
                file,
                offset,
                index,
            })),
            Err(e) => {
                // Out of memory for shmem (a cgroup or tmpfs limit): this buffer
                // goes by writev; the next one tries again.
                log!(
                    self.listener,
                    Info,
                    "zero-copy: cannot append {} bytes to the memfd: {e}",
                    data.len()
                );
                None
            }
        }
    }

    /// Lets the current file go (the engine stopped): buffers still held keep it.
    pub fn reset(&self) {
        *self.file.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.sent.store(0, Ordering::Relaxed);
    }

    /// Whether fds of this kind may be written with `sendfile` (not refused yet).
    pub fn may_send(&self, class: FdClass) -> bool {
        self.support[class as usize].load(Ordering::Relaxed) != REFUSED
    }

    /// `sendfile` to a fd of this kind did not refuse.
    pub fn worked(&self, class: FdClass, sent: usize) {
        let s = &self.support[class as usize];
        if s.load(Ordering::Relaxed) == UNKNOWN {
            s.store(WORKS, Ordering::Relaxed);
        }
        self.sent.fetch_add(sent as u64, Ordering::Relaxed);
    }

    /// `sendfile` refused client `fd` with `e`. The first use of a kind decides for
    /// the kind (logged once); later, only that client falls back.
    pub fn refused(&self, class: FdClass, fd: Fd, e: Errno) {
        let s = &self.support[class as usize];
        let kind_refused = s
            .compare_exchange(UNKNOWN, REFUSED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if kind_refused {
            log!(
                self.listener,
                Warning,
                "zero-copy: sendfile to {class:?} fds refused ({e}, fd {fd}): those are written with writev from now on"
            );
        } else {
            log!(
                self.listener,
                Info,
                "client fd {fd}: sendfile refused ({e}), written with writev from now on"
            );
        }
    }

    /// Bytes written to clients with `sendfile` since the engine started.
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Bytes of memory the current memfd holds, if there is one.
    pub fn allocated(&self) -> Option<u64> {
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner()).clone();
        file.map(|f| f.allocated())
    }
}
