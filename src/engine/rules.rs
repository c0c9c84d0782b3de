//! Where clients stand in the queue: the placement rule for new clients.

use super::queue::BufferQueue;
use super::types::{ClientConfig, SyncMethod};

/// Where a new client starts, now that buffer `newest` is the newest. `None`: wait
/// for a later buffer (no keyframe yet).
pub(super) fn start_position(
    queue: &BufferQueue,
    config: &ClientConfig,
    newest: u64,
) -> Option<u64> {
    let first = queue.first_seq();
    // The newest position that holds at least the burst minimum (the oldest buffer
    // when the queue holds less).
    let min_pos = || {
        config
            .burst_min
            .map(|m| queue.seq_holding_at_least(m).unwrap_or(first))
            .unwrap_or(newest)
    };
    // The oldest allowed position: strictly newer than the one that reaches the
    // maximum, so a burst never sends the maximum or more.
    let floor = || {
        config
            .burst_max
            .and_then(|m| queue.seq_holding_at_least(m))
            .map(|s| s + 1)
            .unwrap_or(first)
    };
    match config.sync {
        SyncMethod::Latest => Some(newest),
        SyncMethod::NextKeyframe => queue
            .get(newest)
            .filter(|e| e.chunk.keyframe)
            .map(|_| newest),
        SyncMethod::LatestKeyframe => queue.newest_keyframe_since(first),
        SyncMethod::Burst => Some(min_pos().max(floor()).min(newest)),
        SyncMethod::BurstKeyframe => {
            let (min, floor) = (min_pos(), floor());
            queue
                .keyframe_at_or_before(min, floor)
                .or_else(|| queue.keyframe_at_or_after(min.max(floor)))
        }
        SyncMethod::BurstWithKeyframe => {
            let (min, floor) = (min_pos(), floor());
            queue
                .keyframe_at_or_before(min, floor)
                .or(Some(min.max(floor).min(newest)))
        }
    }
}
