//! Exactly-once writes: the client-session table of a group's state machine (RIFL, and the
//! Raft thesis §6.3).
//!
//! Every client write carries a tag: the client's random id, its birth time (a node's wall
//! clock when the client loaded the cluster map), a lane and a sequence number. Sequence numbers
//! rise across the client; a lane carries one write at a time (the client takes a free lane for
//! each write and frees it when the write is finished: answered, or given up and reported in
//! doubt), so the table keeps, per client and lane, only the last write and its outcome (the
//! Raft thesis keeps one per client; lanes let one client have many writes in flight).
//! Applying a tagged command first asks the table:
//! - the lane's last write again: its recorded outcome comes back; nothing is applied twice;
//! - an older write on the lane: stale (a delayed copy of a write the client has finished
//!   with): refused, never applied;
//! - a client the table no longer knows, born at or before the expiry horizon, is expired:
//!   refused, never applied (its records may have been dropped, so a retry could otherwise run
//!   twice).
//!
//! Invariants:
//! - **Admission depends only on the table and the command** (the leader's clock is in the
//!   command), so every replica, and a replica replaying its log, decides the same.
//! - **A lane's outcome is replaced only by a newer write on the lane**, and a client is dropped
//!   only whole (idle for `CLIENT_IDLE_MS` of command time, or the least recently active when
//!   the table is full); dropping a client raises the horizon past its birth, so a dropped
//!   client is refused from then on, never treated as new.
//! - **Memory is bounded**: at most `COMPLETIONS_MAX` lanes per group, `LANES_MAX` per client,
//!   and retained read results of at most `RESULT_BYTES_MAX` bytes.
//!
//! Clocks decide liveness only: a client born (by one node's clock) before the horizon (by
//! another's) is refused and takes a new id; nothing is ever applied twice whatever the clocks.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::types::{Outcome, Refusal};
use crate::ops::OpResult;
use crate::protocol::WriteTag;

/// A client with no write to the group for this long (by the leaders' clocks) is dropped.
pub const CLIENT_IDLE_MS: u64 = 10 * 60 * 1000;
/// Outcomes retained per group; past it the least recently active clients are dropped.
pub const COMPLETIONS_MAX: usize = 16_384;
/// Lanes (writes in flight at once) of one client.
pub const LANES_MAX: u32 = 1024;
/// Read results larger than this (bincode bytes) are not retained; a retry then learns that the
/// write was applied but not what it read.
pub const RESULT_BYTES_MAX: usize = 512;
/// How often (command time) idle clients are looked for.
const SWEEP_EVERY_MS: u64 = 10_000;

#[derive(Clone, Debug, PartialEq)]
pub enum Admission {
    /// Never seen: apply it, then `complete`.
    Fresh,
    Duplicate(Outcome),
    Refused(Refusal),
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct ClientRecord {
    born_ms: u64,
    /// Command time of the client's last write to the group.
    last_ms: u64,
    /// Per lane: the last write's seq and outcome.
    lanes: BTreeMap<u32, (u64, Outcome)>,
}

/// A group's table. Serialized with the applied marker and with snapshots.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sessions {
    clients: BTreeMap<u64, ClientRecord>,
    /// Clients born at or before this and not in `clients` are expired.
    horizon_ms: u64,
    next_sweep_ms: u64,
    completions: usize,
}

impl Sessions {
    /// Decides what to do with a tagged write at command time `now_ms`.
    pub fn admit(&mut self, tag: &WriteTag, now_ms: u64) -> Admission {
        if now_ms >= self.next_sweep_ms {
            self.sweep(now_ms);
        }
        if tag.lane >= LANES_MAX {
            return Admission::Refused(Refusal::TooManyInFlight);
        }
        let client = match self.clients.get_mut(&tag.client_id) {
            Some(client) => client,
            None if tag.born_ms <= self.horizon_ms => return Admission::Refused(Refusal::ClientExpired),
            None => self.clients.entry(tag.client_id).or_insert(ClientRecord { born_ms: tag.born_ms, last_ms: now_ms, lanes: BTreeMap::new() }),
        };
        client.last_ms = client.last_ms.max(now_ms);
        match client.lanes.get(&tag.lane) {
            Some((last, _)) if tag.seq < *last => Admission::Refused(Refusal::Stale),
            Some((last, outcome)) if tag.seq == *last => Admission::Duplicate(outcome.clone()),
            _ => Admission::Fresh,
        }
    }

    /// Records the outcome of a write `admit` found fresh.
    pub fn complete(&mut self, tag: &WriteTag, outcome: Outcome) {
        let outcome = match outcome {
            Outcome::Written { results, .. } if encoded_len(&results) > RESULT_BYTES_MAX => Outcome::ResultLost,
            other => other,
        };
        let Some(client) = self.clients.get_mut(&tag.client_id) else { return };
        if client.lanes.insert(tag.lane, (tag.seq, outcome)).is_none() {
            self.completions += 1;
        }
        while self.completions > COMPLETIONS_MAX {
            let oldest = self.clients.iter().min_by_key(|(id, c)| (c.last_ms, **id)).map(|(id, _)| *id);
            match oldest {
                Some(id) => self.drop_client(id),
                None => break,
            }
        }
    }

    /// Clients known to the table (for tests and status).
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    fn sweep(&mut self, now_ms: u64) {
        let idle: Vec<u64> = self.clients.iter().filter(|(_, c)| c.last_ms.saturating_add(CLIENT_IDLE_MS) < now_ms).map(|(id, _)| *id).collect();
        for id in idle {
            self.drop_client(id);
        }
        self.next_sweep_ms = now_ms.saturating_add(SWEEP_EVERY_MS);
    }

    fn drop_client(&mut self, id: u64) {
        if let Some(client) = self.clients.remove(&id) {
            self.completions -= client.lanes.len();
            self.horizon_ms = self.horizon_ms.max(client.born_ms);
        }
    }
}

fn encoded_len(results: &[OpResult]) -> usize {
    bincode::serialized_size(results).map_or(usize::MAX, |n| n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::RecordMeta;

    fn tag(client_id: u64, lane: u32, seq: u64) -> WriteTag {
        WriteTag { client_id, born_ms: 1_000, lane, seq }
    }

    fn written(generation: u32) -> Outcome {
        Outcome::Written { meta: RecordMeta { generation, void_time_secs: 0, last_update_ms: 0 }, results: Vec::new() }
    }

    #[test]
    fn a_retry_gets_the_first_outcome_and_a_delayed_copy_of_an_older_write_is_refused() {
        let mut sessions = Sessions::default();
        assert_eq!(sessions.admit(&tag(7, 0, 1), 2_000), Admission::Fresh);
        sessions.complete(&tag(7, 0, 1), written(1));
        assert_eq!(sessions.admit(&tag(7, 0, 1), 2_001), Admission::Duplicate(written(1)));
        // Another lane is independent.
        assert_eq!(sessions.admit(&tag(7, 1, 2), 2_001), Admission::Fresh);
        // Lane 0 moves on to 4 (3 was given up, never sent here): 1 and 3 are stale from now on.
        assert_eq!(sessions.admit(&tag(7, 0, 4), 2_002), Admission::Fresh);
        sessions.complete(&tag(7, 0, 4), written(2));
        assert_eq!(sessions.admit(&tag(7, 0, 1), 2_003), Admission::Refused(Refusal::Stale));
        assert_eq!(sessions.admit(&tag(7, 0, 3), 2_003), Admission::Refused(Refusal::Stale));
        assert_eq!(sessions.admit(&tag(7, 0, 4), 2_003), Admission::Duplicate(written(2)));
        assert_eq!(sessions.completions, 1);
    }

    #[test]
    fn idle_clients_expire_and_are_refused_not_treated_as_new() {
        let mut sessions = Sessions::default();
        assert_eq!(sessions.admit(&tag(7, 0, 1), 2_000), Admission::Fresh);
        sessions.complete(&tag(7, 0, 1), written(1));
        let later = 2_000 + CLIENT_IDLE_MS + 1;
        assert_eq!(sessions.admit(&tag(8, 0, 1), later), Admission::Refused(Refusal::ClientExpired), "born before the horizon");
        assert_eq!(sessions.admit(&tag(7, 0, 1), later), Admission::Refused(Refusal::ClientExpired));
        let young = WriteTag { born_ms: later, ..tag(9, 0, 1) };
        assert_eq!(sessions.admit(&young, later), Admission::Fresh);
    }

    #[test]
    fn the_table_stays_bounded_by_dropping_the_least_recently_active_client() {
        let mut sessions = Sessions::default();
        for client in 0..(COMPLETIONS_MAX as u64 / 4 + 1) {
            for lane in 0..4 {
                let t = tag(client, lane, 1 + lane as u64);
                assert_eq!(sessions.admit(&t, 10_000 + client), Admission::Fresh);
                sessions.complete(&t, written(lane + 1));
            }
        }
        assert!(sessions.completions <= COMPLETIONS_MAX);
        assert_eq!(sessions.admit(&tag(0, 0, 1), 20_000), Admission::Refused(Refusal::ClientExpired));
        let newest = COMPLETIONS_MAX as u64 / 4;
        assert_eq!(sessions.admit(&tag(newest, 3, 4), 20_000), Admission::Duplicate(written(4)));
    }

    #[test]
    fn lanes_are_bounded_and_large_results_are_not_kept() {
        let mut sessions = Sessions::default();
        assert_eq!(sessions.admit(&tag(5, LANES_MAX, 1), 2_000), Admission::Refused(Refusal::TooManyInFlight));
        let big = vec![OpResult { bin: "b".into(), value: Some(crate::Value::Bytes(vec![0; RESULT_BYTES_MAX])) }];
        let t = tag(6, 0, 1);
        assert_eq!(sessions.admit(&t, 2_000), Admission::Fresh);
        sessions.complete(&t, Outcome::Written { meta: RecordMeta { generation: 1, void_time_secs: 0, last_update_ms: 0 }, results: big });
        assert_eq!(sessions.admit(&t, 2_001), Admission::Duplicate(Outcome::ResultLost));
    }
}
