// SPDX-License-Identifier: MPL-2.0

//! The shared buffer queue.
//!
//! Buffers get increasing sequence numbers; a client's position is the sequence number
//! of the next buffer it sends. The queue also counts how many clients stand at each
//! position, so finding the oldest buffer anybody still needs costs nothing per client.

use std::collections::VecDeque;
use std::sync::Arc;

use super::spool::Spooled;
use super::types::{Amount, Chunk, Streamheader, Unit};

/// One queued buffer, with the streamheader it goes out under.
pub(crate) struct Entry {
    pub chunk: Chunk,
    /// The caps streamheader in force when this buffer arrived.
    pub streamheader: Option<Streamheader>,
    /// Where its bytes are in the zero-copy spool, if there.
    pub spooled: Option<Arc<Spooled>>,
    /// Bytes pushed up to and including this buffer, since the queue was made.
    end_bytes: u64,
    /// Clients whose next buffer is this one.
    refs: u32,
}

/// The buffers some client may still send, oldest first, numbered by sequence.
#[derive(Default)]
pub(crate) struct BufferQueue {
    entries: VecDeque<Entry>,
    first_seq: u64,
    pushed_bytes: u64,
    /// Clients that have sent everything and wait for the next buffer.
    refs_next: u32,
    /// No entry before this one is referenced (a hint that only moves back when a
    /// client is placed before it).
    oldest_ref_hint: u64,
}

impl BufferQueue {
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    /// The sequence number the next pushed buffer will get.
    pub fn next_seq(&self) -> u64 {
        self.first_seq + self.entries.len() as u64
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn get(&self, seq: u64) -> Option<&Entry> {
        let idx = seq.checked_sub(self.first_seq)?;
        self.entries.get(usize::try_from(idx).ok()?)
    }

    pub fn push(
        &mut self,
        chunk: Chunk,
        streamheader: Option<Streamheader>,
        spooled: Option<Arc<Spooled>>,
    ) -> u64 {
        let seq = self.next_seq();
        self.pushed_bytes += chunk.len() as u64;
        self.entries.push_back(Entry {
            chunk,
            streamheader,
            spooled,
            end_bytes: self.pushed_bytes,
            refs: std::mem::take(&mut self.refs_next),
        });
        seq
    }

    pub fn bytes_queued(&self) -> u64 {
        self.bytes_from(self.first_seq)
    }

    /// Time between the oldest and the newest timestamped buffer.
    pub fn time_queued(&self) -> u64 {
        let oldest = self.entries.iter().find_map(|e| e.chunk.pts);
        let newest = self.entries.iter().rev().find_map(|e| e.chunk.pts);
        match (oldest, newest) {
            (Some(o), Some(n)) => n.saturating_sub(o),
            _ => 0,
        }
    }

    /// Bytes in the buffers from `seq` to the newest.
    pub fn bytes_from(&self, seq: u64) -> u64 {
        match self.get(seq) {
            Some(e) => self.pushed_bytes - (e.end_bytes - e.chunk.len() as u64),
            None => 0,
        }
    }

    fn newest_pts(&self) -> Option<u64> {
        self.entries.back().and_then(|e| e.chunk.pts)
    }

    /// How much of the stream lies from `seq` to the newest buffer, in `unit`.
    pub fn amount_from(&self, seq: u64, unit: Unit) -> u64 {
        match unit {
            Unit::Buffers => self.next_seq().saturating_sub(seq.max(self.first_seq)),
            Unit::Bytes => self.bytes_from(seq),
            Unit::Time => match (self.get(seq).and_then(|e| e.chunk.pts), self.newest_pts()) {
                (Some(t), Some(n)) => n.saturating_sub(t),
                _ => 0,
            },
        }
    }

    /// The newest position that still has at least `amount` of the stream from it to
    /// the newest buffer (counting that buffer). `None` when the queue holds less.
    pub fn seq_holding_at_least(&self, amount: Amount) -> Option<u64> {
        if amount.value == 0 {
            return self
                .next_seq()
                .checked_sub(1)
                .filter(|s| *s >= self.first_seq);
        }
        match amount.unit {
            Unit::Buffers => self
                .next_seq()
                .checked_sub(amount.value)
                .filter(|s| *s >= self.first_seq),
            // Amounts only grow towards older positions, so search for the boundary.
            _ => {
                let (mut lo, mut hi) = (self.first_seq, self.next_seq());
                if self.amount_from(lo, amount.unit) < amount.value {
                    return None;
                }
                // Invariant: amount_from(lo) >= value; answer in [lo, hi).
                while hi - lo > 1 {
                    let mid = lo + (hi - lo) / 2;
                    if self.amount_from(mid, amount.unit) >= amount.value {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                Some(lo)
            }
        }
    }

    /// The oldest position from which at most `amount` of the stream lies ahead.
    pub fn oldest_within(&self, amount: Amount) -> u64 {
        let next = self.next_seq();
        match amount.unit {
            Unit::Buffers => next.saturating_sub(amount.value).max(self.first_seq),
            _ => {
                let (mut lo, mut hi) = (self.first_seq, next);
                if self.amount_from(lo, amount.unit) <= amount.value {
                    return lo;
                }
                // Invariant: amount_from(lo) > value, answer in (lo, hi].
                while hi - lo > 1 {
                    let mid = lo + (hi - lo) / 2;
                    if self.amount_from(mid, amount.unit) > amount.value {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                hi
            }
        }
    }

    /// The newest keyframe at or after `from`, if any.
    pub fn newest_keyframe_since(&self, from: u64) -> Option<u64> {
        let from = from.max(self.first_seq);
        (from..self.next_seq())
            .rev()
            .find(|&s| self.get(s).is_some_and(|e| e.chunk.keyframe))
    }

    /// The newest keyframe at or before `at`, not older than `floor`.
    pub fn keyframe_at_or_before(&self, at: u64, floor: u64) -> Option<u64> {
        let floor = floor.max(self.first_seq);
        let at = at.min(self.next_seq().saturating_sub(1));
        if at < floor || self.entries.is_empty() {
            return None;
        }
        (floor..=at)
            .rev()
            .find(|&s| self.get(s).is_some_and(|e| e.chunk.keyframe))
    }

    /// The oldest keyframe at or after `at`.
    pub fn keyframe_at_or_after(&self, at: u64) -> Option<u64> {
        (at.max(self.first_seq)..self.next_seq())
            .find(|&s| self.get(s).is_some_and(|e| e.chunk.keyframe))
    }

    pub fn add_ref(&mut self, seq: u64) {
        if seq >= self.next_seq() {
            self.refs_next += 1;
        } else if let Some(idx) = seq.checked_sub(self.first_seq) {
            self.entries[idx as usize].refs += 1;
            self.oldest_ref_hint = self.oldest_ref_hint.min(seq);
        }
    }

    pub fn drop_ref(&mut self, seq: u64) {
        if seq >= self.next_seq() {
            self.refs_next -= 1;
        } else if let Some(idx) = seq.checked_sub(self.first_seq) {
            self.entries[idx as usize].refs -= 1;
        }
    }

    /// The oldest position some client stands at, if any stands in the queue.
    pub fn oldest_referenced(&mut self) -> Option<u64> {
        let mut seq = self.oldest_ref_hint.max(self.first_seq);
        while let Some(e) = self.get(seq) {
            if e.refs > 0 {
                self.oldest_ref_hint = seq;
                return Some(seq);
            }
            seq += 1;
        }
        self.oldest_ref_hint = seq;
        (self.refs_next > 0).then_some(seq)
    }

    /// Drops buffers before `seq`. Nobody may stand on them.
    pub fn trim_before(&mut self, seq: u64) {
        while self.first_seq < seq {
            let Some(e) = self.entries.pop_front() else {
                break;
            };
            debug_assert_eq!(e.refs, 0, "trimmed a buffer a client still needs");
            self.first_seq += 1;
        }
    }

    /// Drops every buffer; positions continue from where they were.
    pub fn clear(&mut self) {
        let next = self.next_seq();
        self.entries.clear();
        self.first_seq = next;
        self.refs_next = 0;
        self.oldest_ref_hint = next;
    }
}

/// A streamheader generation is the same when it is the same allocation.
pub(crate) fn same_streamheader(a: &Option<Streamheader>, b: &Option<Streamheader>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(len: usize, key: bool, pts: u64) -> Chunk {
        Chunk::from_vec(vec![0; len], key, false, Some(pts))
    }

    fn queue(sizes: &[usize]) -> BufferQueue {
        let mut q = BufferQueue::default();
        for (i, &s) in sizes.iter().enumerate() {
            q.push(chunk(s, i % 3 == 0, i as u64 * 10), None, None);
        }
        q
    }

    #[test]
    fn amounts_count_from_position_to_newest() {
        let q = queue(&[10, 20, 30, 40]);
        assert_eq!(q.amount_from(0, Unit::Buffers), 4);
        assert_eq!(q.amount_from(2, Unit::Bytes), 70);
        assert_eq!(q.amount_from(1, Unit::Time), 20);
        assert_eq!(q.bytes_queued(), 100);
        assert_eq!(q.time_queued(), 30);
    }

    #[test]
    fn seq_holding_at_least_finds_newest_fitting_position() {
        let q = queue(&[10, 20, 30, 40]);
        assert_eq!(
            q.seq_holding_at_least(Amount::new(Unit::Bytes, 40)),
            Some(3)
        );
        assert_eq!(
            q.seq_holding_at_least(Amount::new(Unit::Bytes, 41)),
            Some(2)
        );
        assert_eq!(q.seq_holding_at_least(Amount::new(Unit::Bytes, 101)), None);
        assert_eq!(
            q.seq_holding_at_least(Amount::new(Unit::Buffers, 2)),
            Some(2)
        );
        assert_eq!(q.seq_holding_at_least(Amount::new(Unit::Time, 15)), Some(1));
    }

    #[test]
    fn oldest_within_respects_limit() {
        let q = queue(&[10, 20, 30, 40]);
        assert_eq!(q.oldest_within(Amount::new(Unit::Bytes, 70)), 2);
        assert_eq!(q.oldest_within(Amount::new(Unit::Bytes, 69)), 3);
        assert_eq!(q.oldest_within(Amount::new(Unit::Buffers, 1)), 3);
        assert_eq!(q.oldest_within(Amount::new(Unit::Buffers, 10)), 0);
    }

    #[test]
    fn refs_find_oldest_needed_and_trim_keeps_positions() {
        let mut q = queue(&[1, 1, 1, 1]);
        assert_eq!(q.oldest_referenced(), None);
        q.add_ref(2);
        q.add_ref(4);
        assert_eq!(q.oldest_referenced(), Some(2));
        q.trim_before(2);
        assert_eq!(q.first_seq(), 2);
        q.drop_ref(2);
        assert_eq!(q.oldest_referenced(), Some(4));
        let seq = q.push(chunk(1, true, 50), None, None);
        assert_eq!(seq, 4);
        assert_eq!(q.get(4).unwrap().refs, 1);
    }

    #[test]
    fn keyframe_searches() {
        // keyframes at 0, 3
        let q = queue(&[1, 1, 1, 1, 1]);
        assert_eq!(q.newest_keyframe_since(0), Some(3));
        assert_eq!(q.keyframe_at_or_before(2, 0), Some(0));
        assert_eq!(q.keyframe_at_or_before(2, 1), None);
        assert_eq!(q.keyframe_at_or_after(1), Some(3));
        assert_eq!(q.keyframe_at_or_after(4), None);
    }
}
