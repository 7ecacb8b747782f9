//! Lease sessions: the replicated table in the metadata group, and the leader's clock for it.
//!
//! A client opens a session with a lease TTL and renews it with keep-alives sent to the
//! metadata leader. The table (replicated) says which sessions are open and which are ending;
//! the deadlines (not replicated) live only at the leader, on its monotonic clock, so a wall
//! clock jump never ends a lease early. A new leader gives every open session a whole TTL from
//! the moment it took over: a lease may run longer than its TTL across a leader change, never
//! shorter than the client was promised.
//!
//! A session ends (lease not renewed in time, or closed by its client) in three replicated
//! steps, each retried until done, by whichever node leads the metadata group:
//! 1. `EndSession`: the table marks it ending; keep-alives are refused from here on;
//! 2. every group of every namespace fences it (its later writes refused), then every group
//!    releases it (its locks free) — see `raft::fences`;
//! 3. `SessionFinished`: it leaves the table.
//!
//! Invariants:
//! - **Session ids are never reused**: `next_id` only rises.
//! - **`finished_below` is the lowest open or ending session** (or `next_id`): every session
//!   below it has been fenced and released everywhere.
//! - **The table is bounded**: at most `SESSIONS_MAX` sessions open or ending.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Sessions open or ending at once; opening more is refused.
pub const SESSIONS_MAX: usize = 100_000;
/// The shortest and longest lease TTL a session may ask for.
pub const TTL_MS_MIN: u64 = 200;
pub const TTL_MS_MAX: u64 = 3_600_000;

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    /// Its lease was not renewed in time.
    Expired,
    /// Its client closed it.
    Closed,
}

/// The replicated table of lease sessions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leases {
    next_id: u64,
    /// Open sessions and their lease TTL.
    open: BTreeMap<u64, u64>,
    /// Sessions being fenced and released.
    ending: BTreeMap<u64, EndReason>,
}

impl Default for Leases {
    fn default() -> Leases {
        // Session 0 is never handed out.
        Leases { next_id: 1, open: BTreeMap::new(), ending: BTreeMap::new() }
    }
}

/// A session's state in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseState {
    Open {
        ttl_ms: u64,
    },
    Ending(EndReason),
    /// Ended and fenced everywhere, or never opened.
    Gone,
}

impl Leases {
    /// Opens a session; `Err(count)` when `SESSIONS_MAX` are open or ending already.
    pub fn open(&mut self, ttl_ms: u64) -> Result<u64, usize> {
        let count = self.open.len() + self.ending.len();
        if count >= SESSIONS_MAX {
            return Err(count);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.open.insert(id, ttl_ms);
        Ok(id)
    }

    /// Marks an open session ending; false if it was not open.
    pub fn end(&mut self, session: u64, reason: EndReason) -> bool {
        match self.open.remove(&session) {
            Some(_) => {
                self.ending.insert(session, reason);
                true
            }
            None => false,
        }
    }

    /// Forgets an ending session once it is fenced and released everywhere.
    pub fn finish(&mut self, session: u64) {
        self.ending.remove(&session);
    }

    pub fn state(&self, session: u64) -> LeaseState {
        if let Some(ttl_ms) = self.open.get(&session) {
            return LeaseState::Open { ttl_ms: *ttl_ms };
        }
        match self.ending.get(&session) {
            Some(reason) => LeaseState::Ending(*reason),
            None => LeaseState::Gone,
        }
    }

    /// Every session below this has been fenced and released everywhere.
    pub fn finished_below(&self) -> u64 {
        let lowest_open = self.open.keys().next().copied().unwrap_or(self.next_id);
        let lowest_ending = self.ending.keys().next().copied().unwrap_or(self.next_id);
        lowest_open.min(lowest_ending)
    }

    /// Sessions open or ending.
    pub fn len(&self) -> usize {
        self.open.len() + self.ending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn open_sessions(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.open.iter().map(|(id, ttl)| (*id, *ttl))
    }

    pub fn ending_sessions(&self) -> impl Iterator<Item = u64> + '_ {
        self.ending.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_goes_open_then_ending_then_gone_and_ids_are_never_reused() {
        let mut leases = Leases::default();
        let a = leases.open(1000).unwrap();
        let b = leases.open(2000).unwrap();
        assert!(a >= 1 && b > a);
        assert_eq!(leases.state(a), LeaseState::Open { ttl_ms: 1000 });
        assert_eq!(leases.finished_below(), a);
        assert!(leases.end(a, EndReason::Expired));
        assert!(!leases.end(a, EndReason::Closed), "ending twice");
        assert_eq!(leases.state(a), LeaseState::Ending(EndReason::Expired));
        assert_eq!(leases.finished_below(), a, "an ending session is not finished");
        leases.finish(a);
        assert_eq!(leases.state(a), LeaseState::Gone);
        assert_eq!(leases.finished_below(), b);
        leases.end(b, EndReason::Closed);
        leases.finish(b);
        let c = leases.open(1000).unwrap();
        assert!(c > b);
        assert_eq!(leases.finished_below(), c);
    }

    #[test]
    fn the_table_is_bounded() {
        let mut leases = Leases::default();
        for _ in 0..SESSIONS_MAX {
            leases.open(1000).unwrap();
        }
        assert_eq!(leases.open(1000), Err(SESSIONS_MAX));
    }
}
