// SPDX-License-Identifier: MPL-2.0

//! A service: more fds for the first IO thread to serve besides clients (the server
//! sink's listening sockets and the connections still sending a request), and the
//! narrow handle through which it reaches the engine.

use std::fmt;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use nix::sys::epoll::{EpollEvent, EpollFlags};

use super::pool::Pool;
use super::token::{ServiceToken, Token};
use super::types::{AddOutcome, Fd, LogLevel};
use super::worker::Worker;

/// Fds served by the first IO thread besides its clients. Called on that thread
/// without any lock of the engine held, so it may add clients.
pub trait Service: Send {
    /// Watches its fds.
    fn register(&mut self, registry: &Registry<'_>) -> std::io::Result<()>;
    /// Stops watching its fds and closes the connections that are no clients yet.
    fn deregister(&mut self, registry: &Registry<'_>);
    /// One of its fds is readable (or closed).
    fn event(&mut self, registry: &Registry<'_>, token: ServiceToken);
    /// Does what is due at `now`; returns when to be called next. Also called
    /// whenever the IO thread is woken (for what the element changed).
    fn tick(&mut self, registry: &Registry<'_>, now: Instant) -> Option<Instant>;
}

/// What a service may do with the engine (as mio's `Registry`): watch its own fds,
/// add a client, count the clients and log; nothing else.
pub struct Registry<'a> {
    worker: &'a Worker,
    pool: &'a Pool,
}

impl Registry<'_> {
    /// Watches `fd` for input (level-triggered); its events come with `token`.
    pub fn register(&self, fd: BorrowedFd<'_>, token: ServiceToken) -> std::io::Result<()> {
        let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP;
        let event = EpollEvent::new(flags, Token::Service(token).to_epoll());
        Ok(self.worker.epoll.add(fd, event)?)
    }

    pub fn deregister(&self, fd: BorrowedFd<'_>) {
        let _ = self.worker.epoll.delete(fd);
    }

    /// Adds `fd` as a client placed as `Settings::default_placement` says, on the
    /// worker the engine chooses.
    pub fn add_client(&self, fd: Fd) -> AddOutcome {
        self.pool.add(fd, None)
    }

    /// Whether new clients are to be refused: the IO threads are overloaded and the
    /// overload policy says so (`OverloadPolicy::RefuseClients`).
    pub fn refusing_clients(&self) -> bool {
        self.pool.refusing()
    }

    /// Clients of the whole engine, not counting those being removed.
    pub fn client_count(&self) -> usize {
        self.pool.client_count()
    }

    pub fn log(&self, level: LogLevel, args: fmt::Arguments<'_>) {
        self.worker.listener.log(level, args);
    }
}

/// The engine's service, if it has one, served on the first worker's IO thread.
pub(super) struct ServiceHost {
    service: Mutex<Option<Box<dyn Service>>>,
    pool: Arc<Pool>,
}

impl ServiceHost {
    pub(super) fn new(pool: Arc<Pool>) -> ServiceHost {
        ServiceHost {
            service: Mutex::new(None),
            pool,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Box<dyn Service>>> {
        self.service.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn registry<'a>(&'a self, worker: &'a Worker) -> Registry<'a> {
        Registry {
            worker,
            pool: &self.pool,
        }
    }

    /// Deregisters the current service and registers `service` on `worker` (the
    /// first).
    pub(super) fn set(
        &self,
        worker: &Worker,
        service: Option<Box<dyn Service>>,
    ) -> std::io::Result<()> {
        let mut slot = self.lock();
        let registry = self.registry(worker);
        if let Some(mut old) = slot.take() {
            old.deregister(&registry);
        }
        if let Some(mut new) = service {
            new.register(&registry)?;
            *slot = Some(new);
        }
        Ok(())
    }

    /// Deregisters and drops the service, as the engine stops. (Its lock is only
    /// busy when a handler on the IO thread stops the engine: then the service
    /// stays until it is replaced.)
    pub(super) fn close(&self, worker: &Worker) {
        if let Ok(mut slot) = self.service.try_lock()
            && let Some(mut service) = slot.take()
        {
            service.deregister(&self.registry(worker));
        }
    }

    /// Hands the service the events of its fds and lets it do what is due. Returns
    /// when it wants to be called next.
    pub(super) fn serve(&self, worker: &Worker, events: &mut Vec<ServiceToken>) -> Option<Instant> {
        let mut slot = self.lock();
        let Some(service) = slot.as_mut() else {
            events.clear();
            return None;
        };
        let registry = self.registry(worker);
        for token in events.drain(..) {
            service.event(&registry, token);
        }
        service.tick(&registry, Instant::now())
    }
}
