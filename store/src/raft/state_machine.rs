//! A group's state machine: the node's engine, restricted to the group's partitions.

use std::io::Cursor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::RaftStateMachine;
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};

use super::group_of;
use super::log_store::append_durable;
use super::sessions::{Admission, Outcome, Sessions};
use super::types::{Command, CommandResult, NodeId, TypeConfig, WriteFailure};
use crate::engine::{Namespace, RecordVersion, Replicated};
use crate::value::RecordMeta;
use crate::wal::{GroupId, Wal, WalOp};

type Membership = StoredMembership<NodeId, openraft::BasicNode>;
type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

/// Recorded in the WAL after an engine flush: everything up to `last_applied` is durable in
/// the engine, so a restart resumes applying after it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct AppliedMarker {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    /// The exactly-once table as of `last_applied`.
    sessions: Sessions,
}

/// What a snapshot holds: the exactly-once table and the group's records (tombstones included).
#[derive(Serialize, Deserialize)]
struct SnapshotContent {
    sessions: Sessions,
    versions: Vec<RecordVersion>,
}

struct Progress {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    sessions: Sessions,
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
    /// Test flag for negative controls: every tagged write is applied as if new.
    unsafe_skip_dedup: AtomicBool,
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
        let progress =
            Progress { last_applied: marker.last_applied, membership: marker.membership, sessions: marker.sessions, snapshot: None };
        let shared = Shared {
            engine,
            wal,
            wal_group,
            group,
            groups,
            progress: Mutex::new(progress),
            marker_written: written,
            unsafe_skip_dedup: AtomicBool::new(false),
        };
        Ok(GroupStateMachine { shared: Arc::new(shared) })
    }

    /// UNSAFE, for negative controls only: apply retried writes again instead of answering
    /// them from the exactly-once table.
    pub fn set_unsafe_skip_dedup(&self) {
        self.shared.unsafe_skip_dedup.store(true, Ordering::Relaxed);
    }

    /// Clients in the exactly-once table (for tests and status).
    pub fn session_clients(&self) -> usize {
        self.shared.progress.lock().unwrap().sessions.clients()
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
        let records = versions.len();
        let content = SnapshotContent { sessions: self.marker.sessions.clone(), versions };
        let data = Arc::new(bincode::serialize(&content).expect("records serialize"));
        let index = self.marker.last_applied.map_or(0, |l| l.index);
        let meta = SnapshotMeta {
            last_log_id: self.marker.last_applied,
            last_membership: self.marker.membership.clone(),
            snapshot_id: format!("group{}-index{index}-{records}records", self.shared.group),
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
        let marker = AppliedMarker {
            last_applied: progress.last_applied,
            membership: progress.membership.clone(),
            sessions: progress.sessions.clone(),
        };
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
        let SnapshotContent { sessions, versions } = bincode::deserialize(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let engine = self.shared.engine.clone();
        let filter = self.shared.in_group();
        let delete_seq = meta.last_log_id.map_or(0, |l| l.index);
        tokio::task::spawn_blocking(move || engine.import(filter, versions, delete_seq))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        let marker =
            AppliedMarker { last_applied: meta.last_log_id, membership: meta.last_membership.clone(), sessions: sessions.clone() };
        self.shared.make_durable(marker).await?;
        let mut progress = self.shared.progress.lock().unwrap();
        progress.last_applied = meta.last_log_id;
        progress.membership = meta.last_membership.clone();
        progress.sessions = sessions;
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
            EntryPayload::Normal(command) => apply_command(shared, command, entry.log_id)?,
        };
        shared.progress.lock().unwrap().last_applied = Some(entry.log_id);
        results.push(result);
    }
    Ok(results)
}

/// Applies one client command: asks the exactly-once table first (a retry gets its first
/// outcome), then the engine, and records the outcome.
fn apply_command(shared: &Shared, command: &Command, log_id: LogId<NodeId>) -> Result<CommandResult, StorageError<NodeId>> {
    let tag = command.tag.filter(|_| !shared.unsafe_skip_dedup.load(Ordering::Relaxed));
    if let Some(tag) = &tag {
        match shared.progress.lock().unwrap().sessions.admit(tag, command.now_ms) {
            Admission::Fresh => {}
            Admission::Duplicate(outcome) => return Ok(CommandResult::Duplicate(outcome)),
            Admission::Refused(refusal) => return Ok(CommandResult::Refused(refusal)),
        }
    }
    let replicated = Replicated { log_index: log_id.index, now_ms: command.now_ms };
    let (result, outcome) = match shared.engine.apply_replicated(&command.key, &command.op, &command.policy, replicated) {
        Ok(Some((meta, results))) => {
            let outcome = Outcome::Written { meta: meta.clone(), results: results.clone() };
            (CommandResult::Applied { meta, results }, outcome)
        }
        Ok(None) => (CommandResult::Replayed, replayed_outcome(shared, command, log_id.index)),
        Err(err) => match WriteFailure::from_engine(&err) {
            Some(failure) => (CommandResult::Failed(failure.clone()), Outcome::Failed(failure)),
            None => return Err(StorageIOError::apply(log_id, &err).into()),
        },
    };
    if let Some(tag) = &tag {
        shared.progress.lock().unwrap().sessions.complete(tag, outcome);
    }
    Ok(result)
}

/// The outcome of an entry the engine already held when it was replayed (it flushed past the
/// durable applied point before a restart): recoverable when the record's current version is
/// the one this entry wrote and the write read nothing; otherwise lost (and a retry says so).
fn replayed_outcome(shared: &Shared, command: &Command, index: u64) -> Outcome {
    match shared.engine.current_version(&command.key.digest) {
        Some((seq, generation, void_time_secs)) if seq == index && !command.op.has_reads() => Outcome::Written {
            meta: RecordMeta { generation, void_time_secs, last_update_ms: command.now_ms },
            results: Vec::new(),
        },
        _ => Outcome::ResultLost,
    }
}
