//! The engine as the elements see it: one or more shards, each an IO thread with its
//! own clients, so writing can use more than one core. Every buffer goes to every
//! shard (an `Arc` clone each); a client lives on one shard, chosen when it is added.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock, Weak};

use super::core::{AddOutcome, Aux, ClientSink, Counters, Listener, LogLevel, Settings, Shard};
use super::{Chunk, ClientConfig, ClientStats, ClientStatus, Fd, Payload};

/// Which shard holds each fd, and how many each holds; shared with the shards'
/// listeners, which drop an fd from it before `client-fd-removed`, so the app may
/// add the number again at once.
#[derive(Default)]
struct OwnerMap {
    shard_of: HashMap<Fd, usize>,
    load: Vec<usize>,
}

impl OwnerMap {
    fn forget(&mut self, fd: Fd) {
        if let Some(i) = self.shard_of.remove(&fd) {
            self.load[i] -= 1;
        }
    }
}

type Owners = Arc<Mutex<OwnerMap>>;

/// Forwards a shard's events to the application's listener, keeping `Owners` right.
struct ShardListener {
    inner: Arc<dyn Listener>,
    owners: Owners,
}

impl Listener for ShardListener {
    fn client_added(&self, fd: Fd) {
        self.inner.client_added(fd);
    }

    fn client_removed(&self, fd: Fd, status: ClientStatus) {
        self.inner.client_removed(fd, status);
    }

    fn client_fd_removed(&self, fd: Fd) {
        self.owners.lock().unwrap().forget(fd);
        self.inner.client_fd_removed(fd);
    }

    fn client_input(&self, fd: Fd, data: Vec<u8>) {
        self.inner.client_input(fd, data);
    }

    fn buffer_sent(&self, fd: Fd, data: &Payload) {
        self.inner.buffer_sent(fd, data);
    }

    fn log(&self, level: LogLevel, args: fmt::Arguments<'_>) {
        self.inner.log(level, args);
    }
}

struct Inner {
    listener: Arc<dyn Listener>,
    shards: RwLock<Vec<Shard>>,
    owners: Owners,
    settings: Mutex<Settings>,
}

/// The fan-out engine.
pub struct Engine {
    inner: Arc<Inner>,
}

impl Inner {
    fn make_shards(self: &Arc<Self>, count: usize) -> std::io::Result<Vec<Shard>> {
        let settings = self.settings.lock().unwrap().clone();
        let weak: Weak<dyn ClientSink> = Arc::downgrade(self) as Weak<dyn ClientSink>;
        let count = count.max(1);
        *self.owners.lock().unwrap() = OwnerMap {
            shard_of: HashMap::new(),
            load: vec![0; count],
        };
        (0..count)
            .map(|_| {
                let shard = Shard::new(Arc::new(ShardListener {
                    inner: self.listener.clone(),
                    owners: self.owners.clone(),
                }))?;
                shard.set_settings(settings.clone());
                let _ = shard.shared.router.set(weak.clone());
                Ok(shard)
            })
            .collect()
    }

    /// The shard holding `fd`, if any.
    fn owner(&self, fd: Fd) -> Option<usize> {
        self.owners.lock().unwrap().shard_of.get(&fd).copied()
    }
}

impl ClientSink for Inner {
    fn add(&self, fd: Fd, config: ClientConfig) -> AddOutcome {
        let shards = self.shards.read().unwrap();
        let index = {
            let mut owners = self.owners.lock().unwrap();
            if owners.shard_of.contains_key(&fd) {
                drop(owners);
                drop(shards);
                self.listener.log(
                    LogLevel::Warning,
                    format_args!("client fd {fd}: already added, refusing duplicate"),
                );
                self.listener.client_removed(fd, ClientStatus::Duplicate);
                return AddOutcome::Duplicate;
            }
            // The shard with the fewest clients takes it.
            let index = (0..shards.len())
                .min_by_key(|&i| owners.load[i])
                .unwrap_or(0);
            owners.shard_of.insert(fd, index);
            owners.load[index] += 1;
            index
        };
        let outcome = shards[index].add(fd, config);
        if outcome != AddOutcome::Added {
            self.owners.lock().unwrap().forget(fd);
        }
        outcome
    }

    fn client_count(&self) -> usize {
        self.shards
            .read()
            .unwrap()
            .iter()
            .map(|s| s.shared.client_count())
            .sum()
    }
}

impl Engine {
    pub fn new(listener: Arc<dyn Listener>) -> std::io::Result<Engine> {
        let inner = Arc::new(Inner {
            listener,
            shards: RwLock::new(Vec::new()),
            owners: Default::default(),
            settings: Mutex::new(Settings::default()),
        });
        *inner.shards.write().unwrap() = inner.make_shards(1)?;
        Ok(Engine { inner })
    }

    /// How many IO threads write to clients. Takes effect only while stopped.
    pub fn set_io_threads(&self, count: usize) -> std::io::Result<()> {
        let mut shards = self.inner.shards.write().unwrap();
        if shards.len() == count.max(1) {
            return Ok(());
        }
        if shards.iter().any(|s| s.is_running()) {
            return Err(std::io::Error::other(
                "IO threads can only change while stopped",
            ));
        }
        *shards = self.inner.make_shards(count)?;
        Ok(())
    }

    pub fn io_threads(&self) -> usize {
        self.inner.shards.read().unwrap().len()
    }

    /// Starts the IO threads; clients can be added from now on.
    pub fn start(&self) -> std::io::Result<()> {
        for shard in self.inner.shards.read().unwrap().iter() {
            shard.start()?;
        }
        Ok(())
    }

    /// Stops the IO threads, removes every client (status removed) and drops the
    /// queue and streamheader.
    pub fn stop(&self) {
        for shard in self.inner.shards.read().unwrap().iter() {
            shard.stop();
        }
    }

    pub fn set_settings(&self, settings: Settings) {
        *self.inner.settings.lock().unwrap() = settings.clone();
        for shard in self.inner.shards.read().unwrap().iter() {
            shard.set_settings(settings.clone());
        }
    }

    pub fn settings(&self) -> Settings {
        self.inner.settings.lock().unwrap().clone()
    }

    /// Adds a client. `client-added` is emitted before this returns; a bad fd is
    /// removed later by an IO thread, never inside `add`.
    pub fn add(&self, fd: Fd, config: ClientConfig) -> AddOutcome {
        self.inner.add(fd, config)
    }

    /// Removes a client now: both signals are emitted before this returns.
    pub fn remove(&self, fd: Fd, status: ClientStatus) -> bool {
        match self.inner.owner(fd) {
            Some(i) => self.inner.shards.read().unwrap()[i].remove(fd, status),
            None => {
                self.inner.listener.log(
                    LogLevel::Warning,
                    format_args!("client fd {fd}: no such client to remove"),
                );
                false
            }
        }
    }

    /// Sends what is already queued for the client, nothing newer, then removes it.
    pub fn remove_flush(&self, fd: Fd) -> bool {
        match self.inner.owner(fd) {
            Some(i) => self.inner.shards.read().unwrap()[i].remove_flush(fd),
            None => {
                self.inner.listener.log(
                    LogLevel::Warning,
                    format_args!("client fd {fd}: no such client to flush"),
                );
                false
            }
        }
    }

    /// Removes every client (status removed).
    pub fn clear(&self) {
        for shard in self.inner.shards.read().unwrap().iter() {
            shard.clear();
        }
    }

    /// Sets the caps' streamheader.
    pub fn set_streamheader(&self, buffers: Option<Vec<Payload>>) {
        for shard in self.inner.shards.read().unwrap().iter() {
            shard.set_streamheader(buffers.clone());
        }
    }

    /// Queues a buffer for every client. Never blocks on a client.
    pub fn push(&self, chunk: Chunk) {
        for shard in self.inner.shards.read().unwrap().iter() {
            shard.push(chunk.clone());
        }
    }

    pub fn stats(&self, fd: Fd) -> Option<ClientStats> {
        let i = self.inner.owner(fd)?;
        self.inner.shards.read().unwrap()[i].stats(fd)
    }

    /// The figures of all shards: per-client sums, and the queue as the largest shard
    /// copy holds it.
    pub fn counters(&self) -> Counters {
        let shards = self.inner.shards.read().unwrap();
        let mut total = Counters::default();
        for (i, shard) in shards.iter().enumerate() {
            let c = shard.counters();
            if i == 0 {
                total.bytes_to_serve = c.bytes_to_serve;
            }
            total.bytes_served += c.bytes_served;
            total.num_handles += c.num_handles;
            total.buffers_queued = total.buffers_queued.max(c.buffers_queued);
            total.bytes_queued = total.bytes_queued.max(c.bytes_queued);
            total.time_queued = total.time_queued.max(c.time_queued);
        }
        total
    }

    /// Whether `fd` is a client that is not being removed.
    pub fn has_client(&self, fd: Fd) -> bool {
        self.inner
            .owner(fd)
            .is_some_and(|i| self.inner.shards.read().unwrap()[i].has_client(fd))
    }

    /// Lets the first IO thread also serve `aux` (a listening socket and its pending
    /// connections); `None` unregisters the current one.
    pub(crate) fn set_service(&self, aux: Option<Box<dyn Aux>>) -> std::io::Result<()> {
        self.inner.shards.read().unwrap()[0].set_aux(aux)
    }

    /// Wakes the IO threads (for the aux to look at what changed).
    pub(crate) fn wake(&self) {
        for shard in self.inner.shards.read().unwrap().iter() {
            shard.wake();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}
