// SPDX-License-Identifier: MPL-2.0

//! The workers and which one holds each client.

use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use super::directory::Directory;
use super::types::{AddOutcome, ClientConfig, ClientStatus, Fd, Listener, Settings, log};
use super::worker::Worker;

/// The engine's workers and the directory of their clients. A new client goes to
/// the worker with the fewest; every later call about its fd goes to that worker.
pub(super) struct Pool {
    workers: RwLock<Vec<Arc<Worker>>>,
    directory: Arc<Mutex<Directory>>,
    listener: Arc<dyn Listener>,
}

impl Pool {
    pub(super) fn new(listener: Arc<dyn Listener>) -> Pool {
        Pool {
            workers: RwLock::new(Vec::new()),
            directory: Default::default(),
            listener,
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
                let worker = Worker::new(self.listener.clone(), self.directory.clone())?;
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

    /// Clients of all workers, not counting those being removed.
    pub(super) fn client_count(&self) -> usize {
        self.workers().iter().map(|w| w.client_count()).sum()
    }
}
