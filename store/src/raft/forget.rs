//! Forgetting a replica whose group left this node, so that its disk space is reclaimed.
//!
//! A move that takes a group away from a node ends with the node stopping its replica
//! (`node::roster`). The replica's records would stay in the engine for good: nothing writes
//! the group there any more. Forgetting it, in this order:
//! 1. the engine takes, per device, the position everything of the group was written below
//!    (its void point), with defragmentation held off so no record of the group moves past it;
//! 2. a WAL `Forget` records those points and voids the group's log, its purge point, commit
//!    point and applied point (the vote stays: the node never votes twice in a term);
//! 3. only then do the group's records leave the engine's index; defragmentation frees their
//!    space like a superseded version's, and the start-up scan leaves out whatever of them is
//!    still on the devices (`recorded_void_points`).
//!
//! A crash before 2 is durable leaves the replica as it was (stopped, whole); after, the WAL and
//! the scan agree that the replica holds nothing. Should the group come back, its replica
//! starts like one that never had a copy: an empty log, caught up by the group's leader before
//! it votes (`node::rejoin`).
//!
//! Tombstones could not do this: to win at the scan a tombstone must out-rank the record's
//! seq, and then the unchanged versions a returning replica receives (same seq) would be
//! skipped as already applied.

use std::path::Path;

use crate::engine::{DurablePoint, Namespace, VoidPoints};
use crate::wal::{GroupId, Wal, WalOp};

#[derive(Debug, thiserror::Error)]
pub enum ForgetError {
    #[error("forgetting group {group}: {source}")]
    Engine { group: u32, source: crate::Error },
    #[error("the void points of WAL group {wal_group:#x} do not decode: {what}")]
    Undecodable { wal_group: GroupId, what: String },
}

/// Forgets this node's replica of group `group` (of `groups`) of `engine`, whose log is
/// `wal_group` in `wal` (steps above), and deletes the group's snapshot files in
/// `snapshot_dir`. The replica must be stopped. Returns how many records left the index.
pub fn forget_replica(engine: &Namespace, wal: &Wal, wal_group: GroupId, group: u32, groups: u32, snapshot_dir: &Path) -> Result<u64, ForgetError> {
    let forgotten = engine
        .forget_group(group, groups, |points| {
            let bytes = bincode::serialize(points).expect("durable points serialize");
            wal.append_blocking(wal_group, &[WalOp::Forget(bytes)])
                .map_err(|e| crate::Error::Io { path: "write-ahead log".into(), source: std::io::Error::other(e.to_string()) })
        })
        .map_err(|source| ForgetError::Engine { group, source })?;
    // A snapshot file of the replica describes what it no longer holds.
    let prefix = super::state_machine::snapshot_file_prefix(wal_group);
    if let Ok(entries) = std::fs::read_dir(snapshot_dir) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                if let Err(err) = std::fs::remove_file(entry.path()) {
                    tracing::warn!(path = %entry.path().display(), %err, "cannot delete a snapshot file of a forgotten replica");
                }
            }
        }
    }
    Ok(forgotten)
}

/// The void points `Forget`s recorded for a namespace's groups, given as (group number, WAL
/// group id) out of `groups`: what `OpenOptions::void_points` takes. `None` if no group of it
/// was ever forgotten here.
pub fn recorded_void_points(wal: &Wal, groups: u32, wal_groups: impl IntoIterator<Item = (u32, GroupId)>) -> Result<Option<VoidPoints>, ForgetError> {
    let mut points = Vec::new();
    for (group, wal_group) in wal_groups {
        let Some(bytes) = wal.log_state(wal_group).void else { continue };
        let decoded: Vec<DurablePoint> = bincode::deserialize(&bytes).map_err(|e| ForgetError::Undecodable { wal_group, what: e.to_string() })?;
        points.push((group, decoded));
    }
    Ok((!points.is_empty()).then_some(VoidPoints { groups, points }))
}
