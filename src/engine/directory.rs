// SPDX-License-Identifier: MPL-2.0

//! Which worker holds each client fd.

use std::collections::HashMap;

use super::types::Fd;

/// Which worker holds each client fd, and how many each holds. An fd is in it from
/// `add` until just before `client-fd-removed`: adding it again meanwhile is refused
/// as a duplicate, and from that signal on the application may add the number again.
#[derive(Default)]
pub(super) struct Directory {
    worker_of: HashMap<Fd, usize>,
    load: Vec<usize>,
}

impl Directory {
    pub(super) fn new(workers: usize) -> Directory {
        Directory {
            worker_of: HashMap::new(),
            load: vec![0; workers],
        }
    }

    /// Puts `fd` on the worker with the fewest clients and says which; `None` if
    /// `fd` is held already.
    pub(super) fn claim(&mut self, fd: Fd) -> Option<usize> {
        if self.worker_of.contains_key(&fd) {
            return None;
        }
        let index = (0..self.load.len())
            .min_by_key(|&i| self.load[i])
            .unwrap_or(0);
        self.worker_of.insert(fd, index);
        self.load[index] += 1;
        Some(index)
    }

    pub(super) fn worker_of(&self, fd: Fd) -> Option<usize> {
        self.worker_of.get(&fd).copied()
    }

    pub(super) fn forget(&mut self, fd: Fd) {
        if let Some(i) = self.worker_of.remove(&fd) {
            self.load[i] -= 1;
        }
    }
}
