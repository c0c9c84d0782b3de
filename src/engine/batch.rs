// SPDX-License-Identifier: MPL-2.0

//! Write batching (`batch-time`): which waiting clients are due when.
//!
//! A caught-up client that gets new data may wait up to `batch-time` so that the
//! buffers arriving meanwhile go out in the same call. Each client has its own slot
//! in the period (spread over the clients by id), so the IO thread writes a share of
//! the clients at every tick instead of all of them at once, and each client is
//! written at most once per period. Clients also leave early, as a group, once the
//! bytes they wait with make a call large anyway.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use super::client::ClientId;
use super::queue::BufferQueue;

/// Slots are whole milliseconds apart: epoll's timeout has that resolution, so the
/// IO thread wakes at most once a millisecond for batches.
const SLOT: Duration = Duration::from_millis(1);

/// A waiting client with this much to send is written at once: a call this large
/// costs little more per byte than a larger one.
pub(super) const BATCH_FLUSH_BYTES: u64 = 64 << 10;

/// The clients waiting for their batch, by due time and by the position they
/// started waiting at. Entries may be stale (the client left early, or was
/// removed): the caller checks the client's phase and due time.
pub(super) struct Batches {
    due: BinaryHeap<Reverse<(Instant, ClientId)>>,
    /// Clients that started waiting at the same buffer, oldest first, with their
    /// due times: their pending bytes are the queue's bytes from that buffer.
    groups: VecDeque<(u64, Vec<(Instant, ClientId)>)>,
    /// Slot times count from here.
    epoch: Instant,
}

impl Batches {
    pub(super) fn new() -> Batches {
        Batches {
            due: BinaryHeap::new(),
            groups: VecDeque::new(),
            epoch: Instant::now(),
        }
    }

    /// When a client that starts waiting at `now` is due: the next time of its slot,
    /// at most `period` away.
    pub(super) fn due_for(&self, id: ClientId, period: Duration, now: Instant) -> Instant {
        let period_ns = period.as_nanos().max(1);
        let slots = (period.as_nanos() / SLOT.as_nanos()).max(1);
        // Fibonacci hashing spreads consecutive ids evenly over the slots.
        let slot = u128::from(id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % slots;
        let offset = slot * SLOT.as_nanos();
        let phase = now.duration_since(self.epoch).as_nanos() % period_ns;
        let wait = (offset + period_ns - phase) % period_ns;
        now + Duration::from_nanos(wait as u64)
    }

    /// Clients that started waiting at buffer `seq`, with their due times.
    pub(super) fn add_group(&mut self, seq: u64, clients: Vec<(ClientId, Instant)>) {
        if clients.is_empty() {
            return;
        }
        let entries: Vec<(Instant, ClientId)> =
            clients.iter().map(|&(id, due)| (due, id)).collect();
        self.due.extend(entries.iter().copied().map(Reverse));
        self.groups.push_back((seq, entries));
    }

    /// The earliest due time, possibly of a stale entry (an early wake-up at worst).
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.due.peek().map(|Reverse((due, _))| *due)
    }

    /// Takes the entries due by `now`, as (due, client).
    pub(super) fn take_due(&mut self, now: Instant) -> Vec<(Instant, ClientId)> {
        let mut out = Vec::new();
        while let Some(Reverse((due, id))) = self.due.peek().copied() {
            if due > now {
                break;
            }
            self.due.pop();
            out.push((due, id));
        }
        out
    }

    /// Takes the groups whose pending bytes reached `BATCH_FLUSH_BYTES` (and those
    /// whose buffer left the queue: nobody waits there any more), as (due, client).
    /// A client that left its group and waits again since is in a newer group too:
    /// the due time tells which entry is its current one.
    pub(super) fn take_full_groups(&mut self, queue: &BufferQueue) -> Vec<(Instant, ClientId)> {
        let mut out = Vec::new();
        while let Some((seq, _)) = self.groups.front() {
            if *seq >= queue.first_seq() && queue.bytes_from(*seq) < BATCH_FLUSH_BYTES {
                break;
            }
            out.extend(self.groups.pop_front().expect("front exists").1);
        }
        out
    }

    /// Takes every waiting client (EOS, batching turned off, the element stops).
    pub(super) fn take_all(&mut self) -> Vec<ClientId> {
        self.due.clear();
        self.groups
            .drain(..)
            .flat_map(|(_, entries)| entries.into_iter().map(|(_, id)| id))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::types::Chunk;

    #[test]
    fn due_times_are_within_one_period_and_spread_over_it() {
        let b = Batches::new();
        let now = b.epoch + Duration::from_millis(7);
        let period = Duration::from_millis(20);
        let mut per_slot = [0u32; 20];
        for id in 1..=1000u64 {
            let due = b.due_for(id, period, now);
            let wait = due - now;
            assert!(wait < period, "client {id} waits {wait:?}");
            per_slot[(wait.as_millis()) as usize] += 1;
        }
        // 1000 clients over 20 slots: each slot gets some, none gets most.
        assert!(per_slot.iter().all(|&n| n > 10 && n < 150), "{per_slot:?}");
    }

    #[test]
    fn a_client_keeps_its_slot_from_period_to_period() {
        let b = Batches::new();
        let period = Duration::from_millis(10);
        let first = b.due_for(42, period, b.epoch + Duration::from_millis(3));
        let next = b.due_for(42, period, first + Duration::from_micros(1));
        assert_eq!(next - first, period);
    }

    #[test]
    fn periods_below_a_slot_still_wait_at_most_the_period() {
        let b = Batches::new();
        let period = Duration::from_micros(300);
        let now = b.epoch + Duration::from_micros(1234);
        let due = b.due_for(7, period, now);
        assert!(due - now < period);
    }

    #[test]
    fn due_entries_come_out_in_time_order() {
        let mut b = Batches::new();
        let t = b.epoch;
        let ms = Duration::from_millis;
        b.add_group(0, vec![(1, t + ms(5)), (2, t + ms(1)), (3, t + ms(9))]);
        assert_eq!(b.next_due(), Some(t + ms(1)));
        assert_eq!(b.take_due(t + ms(5)), vec![(t + ms(1), 2), (t + ms(5), 1)]);
        assert_eq!(b.next_due(), Some(t + ms(9)));
        assert_eq!(b.take_all(), vec![1, 2, 3]);
        assert_eq!(b.next_due(), None);
    }

    #[test]
    fn groups_leave_once_their_bytes_make_a_large_call() {
        let mut q = BufferQueue::default();
        let mut b = Batches::new();
        let t = b.epoch;
        let seq0 = q.push(
            Chunk::from_vec(vec![0; 40 << 10], true, false, None),
            None,
            None,
        );
        b.add_group(seq0, vec![(1, t)]);
        let seq1 = q.push(
            Chunk::from_vec(vec![0; 20 << 10], true, false, None),
            None,
            None,
        );
        b.add_group(seq1, vec![(2, t)]);
        assert!(b.take_full_groups(&q).is_empty());
        q.push(
            Chunk::from_vec(vec![0; 4 << 10], true, false, None),
            None,
            None,
        );
        // 64 KiB from the first group's buffer, 24 KiB from the second's.
        assert_eq!(b.take_full_groups(&q), vec![(t, 1)]);
        q.push(
            Chunk::from_vec(vec![0; 40 << 10], true, false, None),
            None,
            None,
        );
        assert_eq!(b.take_full_groups(&q), vec![(t, 2)]);
    }
}
