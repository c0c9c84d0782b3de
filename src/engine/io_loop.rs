// SPDX-License-Identifier: MPL-2.0

//! The IO thread of a worker: waits on epoll, writes to ready clients in batches,
//! reads and discards client input, expires idle clients, emits removal signals with
//! no lock held.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{EpollEvent, EpollTimeout};
use nix::sys::signal::{SigSet, Signal};

use super::token::Token;
use super::types::log;
use super::uring::Uring;
use super::worker::Worker;

/// Clients written per lock hold: the streaming thread waits at most this long.
const CLIENTS_PER_LOCK: usize = 64;
/// How often idle clients are checked for the timeout, at most.
const MAX_TIMEOUT_TICK: Duration = Duration::from_secs(1);
/// The window over which the IO thread measures how busy it is (`io-load`).
pub(super) const LOAD_WINDOW: Duration = Duration::from_millis(100);

pub(super) fn run(worker: Arc<Worker>) {
    // Writing to a pipe whose reader is gone raises SIGPIPE in the writing thread.
    // Blocked here, it stays pending instead of killing the process; EPIPE still
    // reports the error. Sockets use MSG_NOSIGNAL.
    let mut sigpipe = SigSet::empty();
    sigpipe.add(Signal::SIGPIPE);
    let _ = sigpipe.thread_block();

    log!(worker.listener, Debug, "IO thread started");
    let mut events = vec![EpollEvent::empty(); 1024];
    let mut last_expiry = Instant::now();
    // Set up when `io-uring` is first on; this thread alone submits to it.
    let mut uring = Uring::NotTried;
    // How long epoll may wait for the engine's own sake, as of the end of the last
    // pass: anything that changes it later (a push, new settings, a new client)
    // writes the waker, so it need not be read again under the lock.
    let mut engine_wait: Option<Duration> = None;
    // Time spent outside epoll_wait in the current load window.
    let mut window_start = Instant::now();
    let mut busy = Duration::ZERO;
    while !worker.stop.load(Ordering::SeqCst) {
        let wait = engine_wait;
        // Round up so a deadline is not polled for in a busy loop.
        let timeout = wait.map_or(EpollTimeout::NONE, |w| {
            let ms = w.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as u32;
            EpollTimeout::try_from(Duration::from_millis(ms.into())).unwrap_or(EpollTimeout::NONE)
        });
        let n = match worker.epoll.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(Errno::EINTR) => 0,
            Err(e) => {
                log!(worker.listener, Warning, "epoll_wait failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                0
            }
        };
        let pass_start = Instant::now();
        let mut st = worker.lock();
        for ev in &events[..n] {
            match Token::from_epoll(ev.data()) {
                Token::Client(id) => st.client_event(id, ev.events()),
                Token::Waker => {
                    let _ = worker.waker.read();
                }
            }
        }
        // Serve one batch of ready clients, then go back to epoll (without waiting
        // while clients are still ready): blocked clients' EPOLLOUT must be heard
        // even while new buffers keep every other client busy, and the lock is let
        // go so the streaming thread can queue buffers meanwhile.
        st.now = Instant::now();
        let now = st.now;
        st.end_due_batches(now);
        // io_uring has no sendfile: with zero-copy on, writes go by sendfile, one
        // call per client.
        if st.settings.io_uring && !st.settings.zero_copy && uring.ring(&*worker.listener).is_some()
        {
            let mut batch = Vec::with_capacity(CLIENTS_PER_LOCK);
            while batch.len() < CLIENTS_PER_LOCK
                && let Some(id) = st.pop_ready()
            {
                // The ready list may name a client twice; it is served once.
                if !batch.contains(&id) {
                    batch.push(id);
                }
            }
            // One SQE costs more than one system call (the benchmark's raw-uring
            // with one client): a lone client is written directly.
            match batch[..] {
                [id] => st.serve(id),
                _ => st.serve_batch(&mut uring, &batch),
            }
        } else {
            for _ in 0..CLIENTS_PER_LOCK {
                let Some(id) = st.pop_ready() else { break };
                st.serve(id);
            }
        }
        if let Some(t) = st.settings.timeout {
            let now = st.now;
            if now.duration_since(last_expiry) >= (t / 4).min(MAX_TIMEOUT_TICK) {
                last_expiry = now;
                st.expire_idle(now);
            }
        }
        engine_wait = if st.has_ready() {
            Some(Duration::ZERO)
        } else {
            let expiry = st
                .timeout()
                .map(|t| (t / 4).clamp(Duration::from_millis(5), MAX_TIMEOUT_TICK));
            let batch = st
                .batches
                .next_due()
                .map(|due| due.saturating_duration_since(Instant::now()));
            match (expiry, batch) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        };
        st.io_deadline = engine_wait.map(|w| Instant::now() + w);
        // A push waits for the clients it left behind to be reached.
        if st.backpressure_waiters > 0 && !st.io_behind() {
            worker.caught_up.notify_all();
        }
        let removed = std::mem::take(&mut st.removed);
        let input = std::mem::take(&mut st.input);
        let sent = std::mem::take(&mut st.sent);
        drop(st);
        for (fd, data) in input {
            worker.listener.client_input(fd, data);
        }
        for (fd, data) in &sent {
            worker.listener.buffer_sent(*fd, data);
        }
        drop(sent);
        worker.finish_removals(removed);
        // A mutex is not fair: let a waiting streaming thread in before taking the
        // lock again (best effort; `push` never waits for more than one batch).
        if worker.pushers.load(Ordering::Acquire) > 0 {
            std::thread::yield_now();
        }
        let now = Instant::now();
        busy += now - pass_start;
        let window = now - window_start;
        if window >= LOAD_WINDOW {
            let share = (busy.as_secs_f64() / window.as_secs_f64()).min(1.0);
            *worker.load.lock().unwrap_or_else(|e| e.into_inner()) =
                super::worker::Load { share, at: now };
            window_start = now;
            busy = Duration::ZERO;
        }
    }
    log!(worker.listener, Debug, "IO thread stopped");
}
