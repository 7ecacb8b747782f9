//! Lease sessions as one group sees them: which are fenced (their writes refused) and which are
//! released (their locks free). Kept with the group's exactly-once table (in the applied marker
//! and in snapshots), changed only by `WriteOp::FenceSession` entries, so every replica decides
//! the same.
//!
//! A lease session lives in the metadata group (see `meta::leases`). When it ends (its lease ran
//! out, or its client closed it), the metadata leader fences it in **every** group of every
//! namespace, and only then releases it in every group. So a lock the session held is free in
//! its group only after no group accepts the session's writes any more: whoever takes the lock
//! next writes after every write of the old holder, in every group (unique write ownership).
//!
//! Invariants:
//! - **A session once fenced stays fenced** (and once released stays released) in the group.
//! - **Memory is bounded by the sessions still ending**: `finished_below` (every session below
//!   it has finished, fenced and released everywhere) replaces the sessions below it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A group's fenced sessions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fences {
    /// Every session numbered below this is fenced and released.
    finished_below: u64,
    /// Sessions at or above `finished_below`: whether their locks are released too.
    ended: BTreeMap<u64, bool>,
}

impl Fences {
    /// Applies a `FenceSession` entry.
    pub fn fence(&mut self, session: u64, release: bool, finished_below: u64) {
        if session >= self.finished_below {
            let released = self.ended.entry(session).or_insert(false);
            *released |= release;
        }
        if finished_below > self.finished_below {
            self.finished_below = finished_below;
            self.ended = self.ended.split_off(&finished_below);
        }
    }

    /// Whether the session's writes are refused.
    pub fn is_fenced(&self, session: u64) -> bool {
        session < self.finished_below || self.ended.contains_key(&session)
    }

    /// Whether the session's locks are free.
    pub fn is_released(&self, session: u64) -> bool {
        session < self.finished_below || self.ended.get(&session).copied().unwrap_or(false)
    }

    /// Sessions remembered one by one.
    pub fn len(&self) -> usize {
        self.ended.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ended.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fenced_session_stays_fenced_and_is_released_only_when_told() {
        let mut fences = Fences::default();
        assert!(!fences.is_fenced(5));
        fences.fence(5, false, 0);
        assert!(fences.is_fenced(5) && !fences.is_released(5));
        // A fence arriving again (a retry) does not undo the release.
        fences.fence(5, true, 0);
        fences.fence(5, false, 0);
        assert!(fences.is_fenced(5) && fences.is_released(5));
        assert!(!fences.is_fenced(4) && !fences.is_fenced(6));
    }

    #[test]
    fn finished_sessions_are_forgotten_one_by_one_but_stay_fenced() {
        let mut fences = Fences::default();
        for session in 1..=10 {
            fences.fence(session, true, 0);
        }
        fences.fence(12, false, 11);
        assert_eq!(fences.len(), 1);
        assert!((0..11).all(|s| fences.is_fenced(s) && fences.is_released(s)));
        assert!(fences.is_fenced(12) && !fences.is_released(12));
        assert!(!fences.is_fenced(11));
        // An older floor never lowers it.
        fences.fence(13, false, 3);
        assert!(fences.is_released(10));
    }
}
