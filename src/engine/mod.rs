// SPDX-License-Identifier: MPL-2.0

//! The fan-out engine: a shared buffer queue, a read position per client and an
//! epoll IO thread that writes to the clients.
//!
//! Nothing in here knows about GStreamer or GObject, so it can be unit-tested with
//! plain pipes and socketpairs. The elements translate buffers, caps and signals
//! into the types below.
//!
//! The engine runs one or more workers, each with an IO thread and its own clients,
//! so writing can use more than one core. Every buffer goes to every worker (an
//! `Arc` clone each); a client lives on one worker, chosen when it is added. The
//! files, each using only those listed before it: `types` (what the elements hand
//! in and get back), `spool` (the zero-copy store), `client`, `queue`, `token`
//! (epoll's numbers), `client_fd` (the system calls on a client's fd), `write` (a
//! client's turn of writing), `rules` (where clients stand), `state` (a worker's
//! clients and queue under its lock), `directory` (which worker holds each fd),
//! `worker`, `pool` (the workers), `io_loop` (an IO
//! thread), then `Engine` here.

mod batch;
mod client;
mod client_fd;
mod directory;
mod io_loop;
mod pool;
mod queue;
mod rules;
mod spool;
mod state;
mod token;
mod types;
mod uring;
mod worker;
mod write;

pub use self::client::ClientStats;
pub(crate) use self::types::log;
pub use self::types::{
    AddOutcome, Amount, Chunk, ClientConfig, ClientStatus, Counters, Fd, Listener, LogLevel,
    OverloadPolicy, Payload, PushReport, RecoverPolicy, Settings, Streamheader, SyncMethod, Unit,
    ZERO_COPY_MIN_CLIENTS,
};

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use self::pool::Pool;
use self::spool::Spool;

/// The fan-out engine: its workers and their IO threads. Every call
/// about one client goes to the worker that holds it; buffers, settings and
/// streamheaders go to all.
pub struct Engine {
    pool: Arc<Pool>,
    /// The IO threads while started, one per worker, in the pool's order.
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The latest settings, for the workers `set_io_threads` makes.
    settings: Mutex<Settings>,
    listener: Arc<dyn Listener>,
    /// The zero-copy store: one per engine, whatever the number of workers.
    spool: Arc<Spool>,
}

impl Engine {
    pub fn new(listener: Arc<dyn Listener>) -> std::io::Result<Engine> {
        let spool = Arc::new(Spool::new(listener.clone()));
        let pool = Arc::new(Pool::new(listener.clone(), spool.clone()));
        let settings = Settings::default();
        pool.make_workers(1, &settings)?;
        Ok(Engine {
            pool,
            threads: Mutex::new(Vec::new()),
            settings: Mutex::new(settings),
            listener,
            spool,
        })
    }

    /// How many IO threads write to clients. Takes effect only while stopped.
    pub fn set_io_threads(&self, count: usize) -> std::io::Result<()> {
        let threads = self.threads.lock().unwrap();
        if self.pool.workers().len() == count.max(1) {
            return Ok(());
        }
        if !threads.is_empty() {
            return Err(std::io::Error::other(
                "IO threads can only change while stopped",
            ));
        }
        let settings = self.settings.lock().unwrap().clone();
        self.pool.make_workers(count, &settings)
    }

    pub fn io_threads(&self) -> usize {
        self.pool.workers().len()
    }

    /// Starts the IO threads; clients can be added from now on.
    pub fn start(&self) -> std::io::Result<()> {
        let mut threads = self.threads.lock().unwrap();
        if !threads.is_empty() {
            return Ok(());
        }
        for worker in self.pool.workers().iter() {
            worker.open();
            let worker = worker.clone();
            let thread = std::thread::Builder::new()
                .name("rsmultifdsink-io".into())
                .spawn(move || io_loop::run(worker))?;
            threads.push(thread);
        }
        Ok(())
    }

    /// Stops the IO threads, removes every client (status removed) and drops the
    /// queue and streamheader.
    pub fn stop(&self) {
        let mut threads = std::mem::take(&mut *self.threads.lock().unwrap()).into_iter();
        for worker in self.pool.workers().iter() {
            worker.halt();
            // A signal handler on the IO thread may stop the element: do not join
            // ourselves; the thread ends when the handler returns.
            if let Some(thread) = threads.next()
                && thread.thread().id() != std::thread::current().id()
            {
                let _ = thread.join();
            }
            worker.close();
        }
        self.spool.reset();
    }

    pub fn set_settings(&self, settings: Settings) {
        self.spool
            .set_enabled(settings.zero_copy, settings.zero_copy_min_clients);
        *self.settings.lock().unwrap() = settings.clone();
        for worker in self.pool.workers().iter() {
            worker.set_settings(settings.clone());
        }
    }

    /// Adds a client. `client-added` is emitted before this returns; a bad fd is
    /// removed later by an IO thread, never inside `add`.
    pub fn add(&self, fd: Fd, config: ClientConfig) -> AddOutcome {
        self.pool.add(fd, Some(config))
    }

    /// Removes a client now: both signals are emitted before this returns.
    pub fn remove(&self, fd: Fd, status: ClientStatus) -> bool {
        let removed = self
            .pool
            .worker_of(fd)
            .is_some_and(|w| w.remove(fd, status));
        if !removed {
            log!(
                self.listener,
                Warning,
                "client fd {fd}: no such client to remove"
            );
        }
        removed
    }

    /// Sends what is already queued for the client, nothing newer, then removes it.
    pub fn remove_flush(&self, fd: Fd) -> bool {
        match self.pool.worker_of(fd) {
            Some(worker) => worker.remove_flush(fd),
            None => {
                log!(
                    self.listener,
                    Warning,
                    "client fd {fd}: no such client to flush"
                );
                false
            }
        }
    }

    /// Removes every client (status removed).
    pub fn clear(&self) {
        for worker in self.pool.workers().iter() {
            worker.clear();
        }
    }

    /// Sets the caps' streamheader.
    pub fn set_streamheader(&self, buffers: Option<Vec<Payload>>) {
        for worker in self.pool.workers().iter() {
            worker.set_streamheader(buffers.clone());
        }
    }

    /// Queues a buffer for every client. Never waits on a client; with back-pressure
    /// it may wait (bounded, not while flushing) for IO threads that are behind.
    pub fn push(&self, chunk: Chunk) -> PushReport {
        let mut total = PushReport::default();
        // Copied into the spool once, for every worker's clients, when there are
        // enough of them for it to pay; each buffer decides alone, so a client's
        // queue may mix spooled buffers (sendfile) and others (writev).
        let spooled = self
            .spool
            .wanted(|| self.pool.client_count())
            .then(|| self.spool.append((*chunk.data).as_ref()))
            .flatten();
        for worker in self.pool.workers().iter() {
            let report = worker.push(chunk.clone(), spooled.clone());
            total.waited += report.waited;
            total.dropped += report.dropped;
            total.behind |= report.behind;
        }
        if (total.dropped > 0 || total.behind)
            && self.settings.lock().unwrap().overload_policy == OverloadPolicy::RefuseClients
        {
            self.pool.refuse_for_a_while();
        }
        total
    }

    /// While flushing (a flush or a state change is under way), `push` does not wait
    /// for the IO threads.
    /// Writes at once what clients hold back for their batch (`batch-time`): call
    /// it at the end of the stream, when no more buffers will join their batch.
    pub fn end_batches(&self) {
        for worker in self.pool.workers().iter() {
            worker.end_batches();
        }
    }

    pub fn set_flushing(&self, flushing: bool) {
        for worker in self.pool.workers().iter() {
            worker.set_flushing(flushing);
        }
    }

    /// How busy the busiest IO thread was over its last 100 ms, 0 to 1.
    pub fn io_load(&self) -> f64 {
        self.pool
            .workers()
            .iter()
            .map(|w| w.io_load())
            .fold(0.0, f64::max)
    }

    pub fn stats(&self, fd: Fd) -> Option<ClientStats> {
        self.pool.worker_of(fd)?.stats(fd)
    }

    /// The figures of all workers: per-client sums, and the queue as the largest
    /// worker's copy holds it.
    pub fn counters(&self) -> Counters {
        let mut total = Counters::default();
        for (i, worker) in self.pool.workers().iter().enumerate() {
            let c = worker.counters();
            if i == 0 {
                total.bytes_to_serve = c.bytes_to_serve;
            }
            total.bytes_served += c.bytes_served;
            total.num_handles += c.num_handles;
            total.buffers_queued = total.buffers_queued.max(c.buffers_queued);
            total.bytes_queued = total.bytes_queued.max(c.bytes_queued);
            total.time_queued = total.time_queued.max(c.time_queued);
        }
        total.bytes_served_zero_copy = self.spool.bytes_sent();
        total
    }

    /// Bytes of memory the zero-copy store's memfd holds now (its allocated
    /// blocks; holes punched behind the oldest buffer still needed do not count);
    /// `None` while it has no memfd.
    pub fn spool_allocated(&self) -> Option<u64> {
        self.spool.allocated()
    }

    /// Clients of all IO threads, not counting those being removed.
    pub fn client_count(&self) -> usize {
        self.pool.client_count()
    }

    /// Whether new clients are to be refused: the IO threads are overloaded and the
    /// overload policy says so (`OverloadPolicy::RefuseClients`).
    pub fn refusing_clients(&self) -> bool {
        self.pool.refusing()
    }

    /// Whether `fd` is a client that is not being removed.
    pub fn has_client(&self, fd: Fd) -> bool {
        self.pool.worker_of(fd).is_some_and(|w| w.has_client(fd))
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}
