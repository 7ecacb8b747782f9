//! A group's state machine: the node's engine, restricted to the group's partitions.

use std::io::Cursor;
use std::sync::{Arc, Mutex};

use openraft::storage::RaftStateMachine;
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::group_of;
use super::log_store::append_durable;
use super::types::{CommandResult, NodeId, TypeConfig, WriteFailure};
use crate::engine::{Namespace, RecordVersion, Replicated};
use crate::wal::{GroupId, Wal, WalOp};

type Membership = StoredMembership<NodeId, openraft::BasicNode>;
type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

/// Recorded in the WAL after an engine flush: everything up to `last_applied` is durable in
/// the engine, so a restart resumes applying after it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct AppliedMarker {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
}

struct Progress {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    /// The last snapshot built or installed: its metadata and its bytes.
    snapshot: Option<(Meta, Arc<Vec<u8>>)>,
}

struct Shared {
    engine: Arc<Namespace>,
    wal: Arc<Wal>,
    /// This group's id in the node's WAL (not the group number).
    wal_group: GroupId,
    /// The group number within its namespace, and the namespace's number of groups.
    group: u32,
    groups: u32,
    progress: Mutex<Progress>,
    /// The last applied point written as a marker: markers only ever move forward (a snapshot
    /// built from an older point may finish after a newer snapshot was installed).
    marker_written: tokio::sync::Mutex<Option<LogId<NodeId>>>,
}

impl Shared {
    fn in_group(&self) -> impl Fn(&crate::key::Digest) -> bool + Send + 'static {
        let (group, groups) = (self.group, self.groups);
        move |digest| group_of(digest, groups) == group
    }

    /// Flushes the engine, then records `marker` as the durable applied point (unless a newer
    /// one was recorded already).
    async fn make_durable(&self, marker: AppliedMarker) -> Result<(), StorageError<NodeId>> {
        let mut written = self.marker_written.lock().await;
        if *written > marker.last_applied {
            return Ok(());
        }
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || engine.flush())
            .await
            .map_err(|e| StorageIOError::write_state_machine(&e))?
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        let bytes = bincode::serialize(&marker).expect("marker serializes");
        append_durable(&self.wal, self.wal_group, vec![WalOp::Applied(bytes)])
            .await
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        *written = marker.last_applied;
        if let Some(applied) = marker.last_applied {
            self.engine.set_tombstone_floor(self.group, self.groups, applied.index);
        }
        Ok(())
    }
}

/// Cheap to clone; clones share the same state.
#[derive(Clone)]
pub struct GroupStateMachine {
    shared: Arc<Shared>,
}

impl GroupStateMachine {
    /// The state machine of group number `group` (of `groups`) on `engine`, whose log is
    /// `wal_group` in `wal`, resuming from the applied point recorded there.
    pub fn new(
        engine: Arc<Namespace>,
        wal: Arc<Wal>,
        wal_group: GroupId,
        group: u32,
        groups: u32,
    ) -> Result<GroupStateMachine, StorageError<NodeId>> {
        let marker: AppliedMarker = match wal.log_state(wal_group).applied {
            Some(bytes) => bincode::deserialize(&bytes).map_err(|e| StorageIOError::read_state_machine(&e))?,
            None => AppliedMarker::default(),
        };
        if let Some(applied) = marker.last_applied {
            engine.set_tombstone_floor(group, groups, applied.index);
        }
        let written = tokio::sync::Mutex::new(marker.last_applied);
        let progress = Progress { last_applied: marker.last_applied, membership: marker.membership, snapshot: None };
        let shared = Shared { engine, wal, wal_group, group, groups, progress: Mutex::new(progress), marker_written: written };
        Ok(GroupStateMachine { shared: Arc::new(shared) })
    }

    /// Last applied log id (for tests and status).
    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        self.shared.progress.lock().unwrap().last_applied
    }
}

/// Builds a snapshot of the state as of the moment it was asked for.
pub struct GroupSnapshotBuilder {
    shared: Arc<Shared>,
    marker: AppliedMarker,
}

impl RaftSnapshotBuilder<TypeConfig> for GroupSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        // Flushed first: the data then reflects at least everything up to the marker. It may
        // reflect more (applies go on meanwhile); a receiver replaying the log after it skips
        // what a record already holds.
        self.shared.make_durable(self.marker.clone()).await?;
        let engine = self.shared.engine.clone();
        // (A build that finishes after a newer snapshot was installed must not replace it.)
        let filter = self.shared.in_group();
        let versions = tokio::task::spawn_blocking(move || engine.export(filter))
            .await
            .map_err(|e| StorageIOError::read_state_machine(&e))?
            .map_err(|e| StorageIOError::read_state_machine(&e))?;
        let data = Arc::new(bincode::serialize(&versions).expect("records serialize"));
        let index = self.marker.last_applied.map_or(0, |l| l.index);
        let meta = SnapshotMeta {
            last_log_id: self.marker.last_applied,
            last_membership: self.marker.membership.clone(),
            snapshot_id: format!("group{}-index{index}-{}records", self.shared.group, versions.len()),
        };
        {
            let mut progress = self.shared.progress.lock().unwrap();
            let newer_exists = progress.snapshot.as_ref().is_some_and(|(m, _)| m.last_log_id > meta.last_log_id);
            if !newer_exists {
                progress.snapshot = Some((meta.clone(), data.clone()));
            }
        }
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data.to_vec())) })
    }
}

impl RaftStateMachine<TypeConfig> for GroupStateMachine {
    type SnapshotBuilder = GroupSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        let progress = self.shared.progress.lock().unwrap();
        Ok((progress.last_applied, progress.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || apply_all(&shared, entries))
            .await
            .map_err(|e| StorageIOError::write_state_machine(&e))?
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let progress = self.shared.progress.lock().unwrap();
        let marker = AppliedMarker { last_applied: progress.last_applied, membership: progress.membership.clone() };
        GroupSnapshotBuilder { shared: self.shared.clone(), marker }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let versions: Vec<RecordVersion> = bincode::deserialize(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let engine = self.shared.engine.clone();
        let filter = self.shared.in_group();
        let delete_seq = meta.last_log_id.map_or(0, |l| l.index);
        tokio::task::spawn_blocking(move || engine.import(filter, versions, delete_seq))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        let marker = AppliedMarker { last_applied: meta.last_log_id, membership: meta.last_membership.clone() };
        self.shared.make_durable(marker).await?;
        let mut progress = self.shared.progress.lock().unwrap();
        progress.last_applied = meta.last_log_id;
        progress.membership = meta.last_membership.clone();
        progress.snapshot = Some((meta.clone(), Arc::new(data)));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let progress = self.shared.progress.lock().unwrap();
        Ok(progress
            .snapshot
            .as_ref()
            .map(|(meta, data)| Snapshot { meta: meta.clone(), snapshot: Box::new(Cursor::new(data.to_vec())) }))
    }
}

fn apply_all(shared: &Shared, entries: Vec<Entry<TypeConfig>>) -> Result<Vec<CommandResult>, StorageError<NodeId>> {
    let mut results = Vec::with_capacity(entries.len());
    for entry in entries {
        let result = match &entry.payload {
            EntryPayload::Blank => CommandResult::Noop,
            EntryPayload::Membership(membership) => {
                shared.progress.lock().unwrap().membership = StoredMembership::new(Some(entry.log_id), membership.clone());
                CommandResult::Noop
            }
            EntryPayload::Normal(command) => {
                let replicated = Replicated { log_index: entry.log_id.index, now_ms: command.now_ms };
                match shared.engine.apply_replicated(&command.key, &command.op, &command.policy, replicated) {
                    Ok(Some((meta, results))) => CommandResult::Applied { meta, results },
                    Ok(None) => CommandResult::Replayed,
                    Err(err) => match WriteFailure::from_engine(&err) {
                        Some(failure) => CommandResult::Failed(failure),
                        None => return Err(StorageIOError::apply(entry.log_id, &err).into()),
                    },
                }
            }
        };
        shared.progress.lock().unwrap().last_applied = Some(entry.log_id);
        results.push(result);
    }
    Ok(results)
}
