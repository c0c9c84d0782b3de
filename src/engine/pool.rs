// SPDX-License-Identifier: MPL-2.0

//! The workers and which one holds each client.

use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use super::directory::Directory;
use super::spool::Spool;
use super::types::{AddOutcome, ClientConfig, ClientStatus, Fd, Listener, Settings, log};
use super::worker::Worker;

/// The engine's workers and the directory of their clients. A new client goes to
/// the worker with the fewest; every later call about its fd goes to that worker.
pub(super) struct Pool {
    workers: RwLock<Vec<Arc<Worker>>>,
    directory: Arc<Mutex<Directory>>,
    listener: Arc<dyn Listener>,
    /// The zero-copy store all workers send from.
    spool: Arc<Spool>,
    /// With `OverloadPolicy::RefuseClients`: the server refuses new clients until
    /// then (the last overloaded push, plus `REFUSE_AFTER_OVERLOAD`).
    refusing_until: Mutex<Option<Instant>>,
}

/// How long new clients are refused after the last push that met an overload.
const REFUSE_AFTER_OVERLOAD: Duration = Duration::from_secs(1);

impl Pool {
    pub(super) fn new(listener: Arc<dyn Listener>, spool: Arc<Spool>) -> Pool {
        Pool {
            workers: RwLock::new(Vec::new()),
            directory: Default::default(),
            listener,
            spool,
            refusing_until: Mutex::new(None),
        }
    }

    pub(super) fn workers(&self) -> RwLockReadGuard<'_, Vec<Arc<Worker>>> {
        self.workers.read().unwrap()
    }

    /// Replaces the workers by `count` new ones with these settings. Only while no
    /// IO thread runs: the old workers' clients are forgotten.
    pub(super) fn make_workers(&self, count: usize, settings: &Settings) -> std::io::Result<()> {
        let mut workers = self.workers.write().unwrap();
        let count = count.max(1);
        *self.directory.lock().unwrap() = Directory::new(count);
        *workers = (0..count)
            .map(|_| {
                let worker = Worker::new(
                    self.listener.clone(),
                    self.directory.clone(),
                    self.spool.clone(),
                )?;
                worker.set_settings(settings.clone());
                Ok(Arc::new(worker))
            })
            .collect::<std::io::Result<_>>()?;
        Ok(())
    }

    /// Adds a client on the worker with the fewest, placed as `placement` says or
    /// as the settings' default placement. Refuses an fd that is a client already.
    pub(super) fn add(&self, fd: Fd, placement: Option<ClientConfig>) -> AddOutcome {
        let claimed = self.directory.lock().unwrap().claim(fd);
        let Some(index) = claimed else {
            log!(
                self.listener,
                Warning,
                "client fd {fd}: already added, refusing duplicate"
            );
            self.listener.client_removed(fd, ClientStatus::Duplicate);
            return AddOutcome::Duplicate;
        };
        let worker = self.workers()[index].clone();
        let outcome = worker.add(fd, placement);
        if outcome != AddOutcome::Added {
            self.directory.lock().unwrap().forget(fd);
        }
        outcome
    }

    /// The worker holding `fd`, if it is a client.
    pub(super) fn worker_of(&self, fd: Fd) -> Option<Arc<Worker>> {
        let index = self.directory.lock().unwrap().worker_of(fd)?;
        self.workers().get(index).cloned()
    }

    /// A push met an overload: refuse new clients for a while.
    pub(super) fn refuse_for_a_while(&self) {
        *self.refusing_until.lock().unwrap() = Some(Instant::now() + REFUSE_AFTER_OVERLOAD);
    }

    /// Whether new clients are refused now (overloaded, `RefuseClients`).
    pub(super) fn refusing(&self) -> bool {
        self.refusing_until
            .lock()
            .unwrap()
            .is_some_and(|until| Instant::now() < until)
    }

    /// Clients of all workers, not counting those being removed.
    pub(super) fn client_count(&self) -> usize {
        self.workers().iter().map(|w| w.client_count()).sum()
    }
}
