// SPDX-License-Identifier: MPL-2.0

//! Where clients stand in the queue: where a new client starts, where the limits
//! fall, where a slow client recovers to and how much of the queue stays.

use super::queue::BufferQueue;
use super::types::{Amount, ClientConfig, RecoverPolicy, Settings, SyncMethod, Unit};

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

/// Where the limits fall: clients before `hard` (`units-max`) are removed as slow,
/// clients before `soft` (`units-soft-max`, only with a recover policy) recover.
pub(super) fn limit_boundaries(
    queue: &BufferQueue,
    settings: &Settings,
) -> (Option<u64>, Option<u64>) {
    let hard = settings.units_max.map(|a| queue.oldest_within(a));
    let soft = match settings.recover_policy {
        RecoverPolicy::None => None,
        _ => settings.units_soft_max.map(|a| queue.oldest_within(a)),
    };
    (hard, soft)
}

/// Where a client behind the soft limit jumps to; `None` with no recover policy.
pub(super) fn recover_position(
    queue: &BufferQueue,
    policy: RecoverPolicy,
    soft_boundary: u64,
) -> Option<u64> {
    let next = queue.next_seq();
    match policy {
        RecoverPolicy::None => None,
        RecoverPolicy::Latest => Some(next),
        RecoverPolicy::SoftLimit => Some(soft_boundary),
        // The oldest keyframe within the soft limit.
        RecoverPolicy::Keyframe => Some(queue.keyframe_at_or_after(soft_boundary).unwrap_or(next)),
    }
}

/// The oldest buffer the queue keeps: what clients still need, the minimums and,
/// for keyframe sync methods, the newest keyframe.
pub(super) fn keep_from(queue: &mut BufferQueue, settings: &Settings) -> u64 {
    let next = queue.next_seq();
    // The newest buffer always stays, as in multifdsink (buffers-queued is 1
    // with no clients, and a latest-keyframe client can start on it).
    let mut keep = queue
        .oldest_referenced()
        .unwrap_or(next)
        .min(next.saturating_sub(1));
    let mins = [
        settings.buffers_min.map(|v| Amount::new(Unit::Buffers, v)),
        settings.bytes_min.map(|v| Amount::new(Unit::Bytes, v)),
        settings.time_min.map(|v| Amount::new(Unit::Time, v)),
    ];
    for min in mins.into_iter().flatten() {
        keep = keep.min(queue.seq_holding_at_least(min).unwrap_or(queue.first_seq()));
    }
    if settings.keep_keyframe
        && let Some(k) = queue.newest_keyframe_since(0)
    {
        keep = keep.min(k);
    }
    keep
}
