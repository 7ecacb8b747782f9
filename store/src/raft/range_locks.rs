//! Byte-range locks (POSIX record locks, as chunkfs's fcntl locks need them) in a lock table:
//! one record whose bin `RANGE_LOCKS_BIN` lists the locks held, each with its lease session,
//! owner, pid, range and kind. A group's state machine decides every request
//! (`WriteOp::RangeLock`) the same way on every replica:
//! - locks of sessions the group has released (their lease ran out and they were fenced
//!   everywhere) are dropped before anything is decided: **a lock outlives its holder's lease
//!   only until the cluster has fenced that holder**;
//! - a request conflicts with another owner's overlapping lock when either is exclusive;
//! - the owner's own locks in the range are replaced (POSIX: a lock converts or splits the
//!   owner's locks it overlaps).

use crate::ops::{RangeLock, RangeLockKind};
use crate::raft::RangeLockHeld;

/// Most locks one table holds (a request past it is refused as a bad request).
pub const RANGE_LOCKS_MAX: usize = 4096;

/// One lock of the table: its session, owner, pid, range and kind (the same fields a refusal
/// names).
pub type Held = RangeLockHeld;

trait Overlaps {
    fn overlaps(&self, start: u64, end: u64) -> bool;
}

impl Overlaps for Held {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }
}

/// The table after `lock` of `session`, or the lock in the way. `None` for a test that found
/// nothing in the way (nothing to write).
pub fn decide(mut table: Vec<Held>, session: u64, lock: &RangeLock, released: impl Fn(u64) -> bool) -> Result<Option<Vec<Held>>, RangeLockHeld> {
    table.retain(|held| !released(held.session));
    let mine = |held: &Held| held.session == session && held.owner == lock.owner;
    let exclusive = match lock.kind {
        RangeLockKind::Shared => false,
        RangeLockKind::Exclusive => true,
        RangeLockKind::Test { exclusive } => exclusive,
        RangeLockKind::Unlock => return Ok(Some(cut(table, session, lock))),
    };
    if let Some(held) = table.iter().find(|h| !mine(h) && h.overlaps(lock.start, lock.end) && (h.exclusive || exclusive)) {
        return Err(*held);
    }
    if matches!(lock.kind, RangeLockKind::Test { .. }) {
        return Ok(None);
    }
    let mut table = cut(table, session, lock);
    table.push(Held { session, owner: lock.owner, pid: lock.pid, start: lock.start, end: lock.end, exclusive });
    Ok(Some(table))
}

/// Removes the owner's locks from the lock's range, keeping the parts outside it.
fn cut(table: Vec<Held>, session: u64, lock: &RangeLock) -> Vec<Held> {
    let mut out = Vec::with_capacity(table.len() + 1);
    for held in table {
        if held.session != session || held.owner != lock.owner || !held.overlaps(lock.start, lock.end) {
            out.push(held);
            continue;
        }
        if held.start < lock.start {
            out.push(Held { end: lock.start - 1, ..held });
        }
        if held.end > lock.end {
            out.push(Held { start: lock.end + 1, ..held });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(owner: u64, start: u64, end: u64, kind: RangeLockKind) -> RangeLock {
        RangeLock { owner, pid: owner as u32, start, end, kind }
    }

    /// Shared locks share, exclusive ones exclude, owners convert and split their own locks,
    /// and a released session's locks are gone.
    #[test]
    fn posix_record_lock_rules() {
        let none = |_| false;
        let t = decide(Vec::new(), 1, &req(10, 0, 99, RangeLockKind::Shared), none).unwrap().unwrap();
        let t = decide(t, 2, &req(20, 50, 150, RangeLockKind::Shared), none).unwrap().unwrap();
        assert_eq!(t.len(), 2);
        let held = decide(t.clone(), 2, &req(20, 50, 60, RangeLockKind::Exclusive), none).unwrap_err();
        assert_eq!((held.session, held.owner, held.start, held.end, held.exclusive), (1, 10, 0, 99, false));
        // The same session's other owner (another process on the mount) is excluded too.
        assert!(decide(t.clone(), 1, &req(11, 0, 0, RangeLockKind::Exclusive), none).is_err());
        // Owner 20 unlocks the middle: its lock splits in two.
        let t = decide(t, 2, &req(20, 70, 80, RangeLockKind::Unlock), none).unwrap().unwrap();
        let mut ranges: Vec<(u64, u64)> = t.iter().filter(|h| h.owner == 20).map(|h| (h.start, h.end)).collect();
        ranges.sort();
        assert_eq!(ranges, vec![(50, 69), (81, 150)]);
        // Owner 10 converts its own shared lock to exclusive where nobody else holds one.
        let t = decide(t, 1, &req(10, 0, 40, RangeLockKind::Exclusive), none).unwrap().unwrap();
        assert!(t.iter().any(|h| h.owner == 10 && h.exclusive && (h.start, h.end) == (0, 40)));
        assert!(t.iter().any(|h| h.owner == 10 && !h.exclusive && (h.start, h.end) == (41, 99)));
        // A test takes nothing.
        assert_eq!(decide(t.clone(), 3, &req(30, 200, 300, RangeLockKind::Test { exclusive: true }), none).unwrap(), None);
        assert!(decide(t.clone(), 3, &req(30, 0, 0, RangeLockKind::Test { exclusive: false }), none).is_err());
        // Session 1 released: its locks no longer count.
        let released = |s| s == 1;
        assert!(decide(t.clone(), 3, &req(30, 0, 40, RangeLockKind::Exclusive), released).is_ok());
        // Whole-file unlock of an owner drops all its locks.
        let t = decide(t, 2, &req(20, 0, u64::MAX, RangeLockKind::Unlock), none).unwrap().unwrap();
        assert!(t.iter().all(|h| h.owner != 20));
    }
}
