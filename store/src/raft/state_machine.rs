//! A group's state machine: the node's engine, restricted to the group's partitions.

use std::io::Seek;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::storage::RaftStateMachine;
use openraft::{Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership};
use serde::{Deserialize, Serialize};

use super::fences::Fences;
use super::group_of;
use super::log_store::append_durable;
use super::sessions::{Admission, Sessions};
use super::snapshot_file::{SnapshotReader, SnapshotWriter};
use super::types::Outcome;
use super::types::{Command, CommandResult, NodeId, TypeConfig, WriteFailure};
use crate::engine::{DurablePoint, Namespace, Replicated};
use crate::ops::{RecordExistsAction, Ttl, WriteOp, WritePolicy, LOCK_HOLDER_BIN};
use crate::value::{Bin, RecordMeta, Value};
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
    /// Per engine device, the log position the engine was durable up to when this marker was
    /// written: start-up tells damage below it from a torn tail above it.
    engine_points: Vec<DurablePoint>,
    /// The fenced lease sessions as of `last_applied`.
    fences: Fences,
}

/// A marker as written before markers recorded fenced lease sessions.
#[derive(Deserialize)]
struct AppliedMarkerV2 {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    sessions: Sessions,
    engine_points: Vec<DurablePoint>,
}

/// A marker as written before markers recorded the engine's durable points.
#[derive(Deserialize)]
struct AppliedMarkerV1 {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    sessions: Sessions,
}

impl AppliedMarker {
    fn read(wal: &Wal, wal_group: GroupId) -> Result<AppliedMarker, StorageError<NodeId>> {
        let Some(bytes) = wal.log_state(wal_group).applied else { return Ok(AppliedMarker::default()) };
        if let Ok(marker) = bincode::deserialize(&bytes) {
            return Ok(marker);
        }
        if let Ok(v2) = bincode::deserialize::<AppliedMarkerV2>(&bytes) {
            let AppliedMarkerV2 { last_applied, membership, sessions, engine_points } = v2;
            return Ok(AppliedMarker { last_applied, membership, sessions, engine_points, fences: Fences::default() });
        }
        match bincode::deserialize::<AppliedMarkerV1>(&bytes) {
            Ok(v1) => Ok(AppliedMarker { last_applied: v1.last_applied, membership: v1.membership, sessions: v1.sessions, ..Default::default() }),
            Err(err) => Err(StorageIOError::read_state_machine(&err).into()),
        }
    }
}

/// The engine durable points the applied markers of these groups recorded (`None` when none
/// recorded any), for `OpenOptions::durable_points`.
pub fn recorded_engine_points(wal: &Wal, wal_groups: impl IntoIterator<Item = GroupId>) -> Result<Option<Vec<DurablePoint>>, StorageError<NodeId>> {
    let mut points: Option<Vec<DurablePoint>> = None;
    for wal_group in wal_groups {
        let marker = AppliedMarker::read(wal, wal_group)?;
        if !marker.engine_points.is_empty() {
            points.get_or_insert_with(Vec::new).extend(marker.engine_points);
        }
    }
    Ok(points)
}

/// How the names of a group's snapshot files start.
pub(crate) fn snapshot_file_prefix(wal_group: GroupId) -> String {
    format!("group-{wal_group:08x}-")
}

struct Progress {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    sessions: Sessions,
    fences: Fences,
    /// The last snapshot built or installed: its metadata and its file (snapshot_file.rs).
    snapshot: Option<(Meta, PathBuf)>,
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
    /// UNSAFE (negative control): writes of fenced sessions are applied.
    unsafe_skip_fencing: AtomicBool,
    /// Set when the node shuts down: an apply waiting for device space gives up (the entry
    /// stays in the log and is applied after the restart).
    stopping: AtomicBool,
    /// An apply is waiting for device space (the node keeps this replica from campaigning).
    waiting_for_room: AtomicBool,
    /// Where this group's snapshot files live (names start with `file_prefix`).
    snapshot_dir: PathBuf,
    file_prefix: String,
    /// Files created to receive snapshots and not installed yet.
    receiving: Mutex<Vec<PathBuf>>,
    /// True once the replica is being forgotten (`close`). Everything that writes the engine
    /// or the applied marker (apply, snapshot install, snapshot build) holds it shared and
    /// refuses once it is set: openraft's state-machine worker and snapshot tasks can outlive
    /// `Raft::shutdown`.
    closed: tokio::sync::RwLock<bool>,
}

impl Shared {
    /// Shared hold of the gate, or an error once the replica is closed.
    async fn open_gate(&self) -> Result<tokio::sync::RwLockReadGuard<'_, bool>, StorageError<NodeId>> {
        let gate = self.closed.read().await;
        if *gate {
            return Err(StorageIOError::write_state_machine(&std::io::Error::other("the replica moved away and is forgotten")).into());
        }
        Ok(gate)
    }

    /// A new file name in the snapshot directory.
    fn new_snapshot_path(&self, what: &str) -> PathBuf {
        self.snapshot_dir.join(format!("{}{what}-{:016x}", self.file_prefix, rand::random::<u64>()))
    }

    /// Makes `path` the current snapshot unless a newer one exists; the file that is not kept
    /// is deleted (open handles still read it).
    fn keep_snapshot(&self, meta: &Meta, path: PathBuf) {
        let mut progress = self.progress.lock().unwrap();
        let newer_exists = progress.snapshot.as_ref().is_some_and(|(m, _)| m.last_log_id > meta.last_log_id);
        let dropped = if newer_exists { Some(path) } else { progress.snapshot.replace((meta.clone(), path)).map(|(_, p)| p) };
        drop(progress);
        if let Some(dropped) = dropped {
            let _ = std::fs::remove_file(dropped);
        }
    }

    fn in_group(&self) -> impl Fn(&crate::key::Digest) -> bool + Send + 'static {
        let (group, groups) = (self.group, self.groups);
        move |digest| group_of(digest, groups) == group
    }

    /// Flushes the engine, then records `marker` as the durable applied point (unless a newer
    /// one was recorded already).
    async fn make_durable(&self, mut marker: AppliedMarker) -> Result<(), StorageError<NodeId>> {
        let mut written = self.marker_written.lock().await;
        if *written > marker.last_applied {
            return Ok(());
        }
        let engine = self.engine.clone();
        marker.engine_points = tokio::task::spawn_blocking(move || engine.flush_to_durable_point())
            .await
            .map_err(|e| StorageIOError::write_state_machine(&e))?
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        let bytes = bincode::serialize(&marker).expect("marker serializes");
        append_durable(&self.wal, self.wal_group, vec![WalOp::Applied(bytes)]).await.map_err(|e| StorageIOError::write_state_machine(&e))?;
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
    /// Snapshot files go to `snapshot_dir` (created if missing; this group's files left there by
    /// an earlier run are deleted: snapshots are rebuilt after a restart).
    pub fn new(
        engine: Arc<Namespace>,
        wal: Arc<Wal>,
        wal_group: GroupId,
        group: u32,
        groups: u32,
        snapshot_dir: &Path,
    ) -> Result<GroupStateMachine, StorageError<NodeId>> {
        let file_prefix = snapshot_file_prefix(wal_group);
        std::fs::create_dir_all(snapshot_dir).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        for entry in std::fs::read_dir(snapshot_dir).map_err(|e| StorageIOError::read_snapshot(None, &e))? {
            let entry = entry.map_err(|e| StorageIOError::read_snapshot(None, &e))?;
            if entry.file_name().to_string_lossy().starts_with(&file_prefix) {
                std::fs::remove_file(entry.path()).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
            }
        }
        let marker = AppliedMarker::read(&wal, wal_group)?;
        if let Some(applied) = marker.last_applied {
            engine.set_tombstone_floor(group, groups, applied.index);
        }
        let written = tokio::sync::Mutex::new(marker.last_applied);
        let progress =
            Progress { last_applied: marker.last_applied, membership: marker.membership, sessions: marker.sessions, fences: marker.fences, snapshot: None };
        let shared = Shared {
            engine,
            wal,
            wal_group,
            group,
            groups,
            progress: Mutex::new(progress),
            marker_written: written,
            unsafe_skip_dedup: AtomicBool::new(false),
            unsafe_skip_fencing: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            waiting_for_room: AtomicBool::new(false),
            snapshot_dir: snapshot_dir.to_owned(),
            file_prefix,
            receiving: Mutex::new(Vec::new()),
            closed: tokio::sync::RwLock::new(false),
        };
        Ok(GroupStateMachine { shared: Arc::new(shared) })
    }

    /// UNSAFE, for negative controls only: apply retried writes again instead of answering
    /// them from the exactly-once table.
    /// The node is shutting down: an apply waiting for device space gives up, so the group
    /// can stop.
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
    }

    /// After `stop` and the group's `Raft::shutdown`, before the replica is forgotten: waits
    /// for any apply, snapshot install or snapshot build still running, and refuses every later
    /// one.
    pub async fn close(&self) {
        *self.shared.closed.write().await = true;
    }

    /// Whether `stop` was called. A replica is forgotten only after it stopped, so a read of the
    /// engine that finds this false afterwards did not see the replica forgotten.
    pub fn is_stopped(&self) -> bool {
        self.shared.stopping.load(Ordering::SeqCst)
    }

    /// Whether an apply is waiting for device space right now.
    pub fn is_waiting_for_room(&self) -> bool {
        self.shared.waiting_for_room.load(Ordering::SeqCst)
    }

    pub fn set_unsafe_skip_dedup(&self) {
        self.shared.unsafe_skip_dedup.store(true, Ordering::Relaxed);
    }

    pub fn set_unsafe_skip_fencing(&self) {
        self.shared.unsafe_skip_fencing.store(true, Ordering::Relaxed);
    }

    /// Clients in the exactly-once table (for tests and status).
    pub fn session_clients(&self) -> usize {
        self.shared.progress.lock().unwrap().sessions.clients()
    }

    /// Last applied log id (for tests and status).
    pub fn last_applied(&self) -> Option<LogId<NodeId>> {
        self.shared.progress.lock().unwrap().last_applied
    }

    /// The durable applied point recorded in the WAL: a restart resumes after it.
    pub async fn durable_applied(&self) -> Option<LogId<NodeId>> {
        *self.shared.marker_written.lock().await
    }

    /// Writes a snapshot of the current state to a new file for a peer that must rebuild its
    /// copy (outside Raft's own snapshot bookkeeping): its metadata and the file, which the
    /// caller deletes when done.
    pub async fn export_snapshot(&self) -> Result<(Meta, PathBuf), StorageError<NodeId>> {
        let mut builder = self.clone().get_snapshot_builder().await;
        builder.write_file().await
    }

    /// A new file to receive a peer's exported snapshot into.
    pub async fn receive_file(&self) -> Result<tokio::fs::File, StorageError<NodeId>> {
        Ok(*self.clone().begin_receiving_snapshot().await?)
    }

    /// Rebuilds this replica's state from a peer's snapshot (see `export_snapshot`) received
    /// into a file: installed like a snapshot Raft sends.
    pub async fn install_exported(&self, meta: &Meta, file: tokio::fs::File) -> Result<(), StorageError<NodeId>> {
        self.clone().install_snapshot(meta, Box::new(file)).await
    }
}

/// Builds a snapshot of the state as of the moment it was asked for.
pub struct GroupSnapshotBuilder {
    shared: Arc<Shared>,
    marker: AppliedMarker,
}

impl GroupSnapshotBuilder {
    /// Writes the snapshot file: its metadata and path.
    async fn write_file(&mut self) -> Result<(Meta, PathBuf), StorageError<NodeId>> {
        let _gate = self.shared.open_gate().await?;
        // Flushed first: the data then reflects at least everything up to the marker. It may
        // reflect more (applies go on meanwhile); a receiver replaying the log after it skips
        // what a record already holds.
        self.shared.make_durable(self.marker.clone()).await?;
        let path = self.shared.new_snapshot_path("snap");
        let (engine, filter, file) = (self.shared.engine.clone(), self.shared.in_group(), path.clone());
        let (sessions, fences) = (self.marker.sessions.clone(), self.marker.fences.clone());
        let written = tokio::task::spawn_blocking(move || -> Result<u64, String> {
            let mut writer = SnapshotWriter::create(&file, &sessions, &fences).map_err(|e| e.to_string())?;
            let mut failed = None;
            engine
                .export_each(filter, |version| {
                    writer.record(&version).map_err(|e| {
                        let reason = e.to_string();
                        failed = Some(reason.clone());
                        crate::Error::BadRequest(reason)
                    })
                })
                .map_err(|e| failed.take().unwrap_or_else(|| e.to_string()))?;
            writer.finish().map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| StorageIOError::read_state_machine(&e))?;
        // A replica stops before it is forgotten: a snapshot written since may lack records.
        let written = match self.shared.stopping.load(Ordering::SeqCst) {
            true => written.and(Err("the replica stopped while its snapshot was written".to_owned())),
            false => written,
        };
        let records = match written {
            Ok(records) => records,
            Err(reason) => {
                let _ = std::fs::remove_file(&path);
                return Err(StorageIOError::read_state_machine(&std::io::Error::other(reason)).into());
            }
        };
        let index = self.marker.last_applied.map_or(0, |l| l.index);
        let meta = SnapshotMeta {
            last_log_id: self.marker.last_applied,
            last_membership: self.marker.membership.clone(),
            snapshot_id: format!("group{}-index{index}-{records}records", self.shared.group),
        };
        Ok((meta, path))
    }
}

impl RaftSnapshotBuilder<TypeConfig> for GroupSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let (meta, path) = self.write_file().await?;
        let file = tokio::fs::File::open(&path).await.map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        // (A build that finishes after a newer snapshot was installed does not replace it.)
        self.shared.keep_snapshot(&meta, path);
        Ok(Snapshot { meta, snapshot: Box::new(file) })
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
        let _gate = self.shared.open_gate().await?;
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        let shared = self.shared.clone();
        // Applying is memory work when the engine's write cache has room: done here, it saves
        // a hand-off to the blocking pool per batch (8% more puts/s at 32 clients). When the
        // cache is short of room, or a device is full, the rest of the batch goes to the
        // blocking pool, where applying may wait.
        let bytes: u64 = entries.iter().map(|e| bincode::serialized_size(&e.payload).unwrap_or(u64::MAX / 4)).sum();
        if !shared.engine.write_cache_has_room(bytes) {
            return tokio::task::spawn_blocking(move || apply_all(&shared, entries)).await.map_err(|e| StorageIOError::write_state_machine(&e))?;
        }
        let mut results = Vec::with_capacity(entries.len());
        let mut rest = entries.into_iter();
        while let Some(entry) = rest.next() {
            match apply_entry(&shared, &entry, false)? {
                Some(result) => results.push(result),
                None => {
                    let remaining: Vec<Entry<TypeConfig>> = std::iter::once(entry).chain(rest).collect();
                    let more =
                        tokio::task::spawn_blocking(move || apply_all(&shared, remaining)).await.map_err(|e| StorageIOError::write_state_machine(&e))??;
                    results.extend(more);
                    break;
                }
            }
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let progress = self.shared.progress.lock().unwrap();
        let marker = AppliedMarker {
            last_applied: progress.last_applied,
            membership: progress.membership.clone(),
            sessions: progress.sessions.clone(),
            engine_points: Vec::new(),
            fences: progress.fences.clone(),
        };
        GroupSnapshotBuilder { shared: self.shared.clone(), marker }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError<NodeId>> {
        let path = self.shared.new_snapshot_path("receiving");
        let file =
            tokio::fs::OpenOptions::new().create_new(true).read(true).write(true).open(&path).await.map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        self.shared.receiving.lock().unwrap().push(path);
        Ok(Box::new(file))
    }

    async fn install_snapshot(&mut self, meta: &Meta, snapshot: Box<tokio::fs::File>) -> Result<(), StorageError<NodeId>> {
        let _gate = self.shared.open_gate().await?;
        let signature = meta.signature();
        let read_error = |e: &std::io::Error| StorageIOError::read_snapshot(Some(signature.clone()), e);
        let mut file = snapshot.into_std().await;
        let inode = file.metadata().map_err(|e| read_error(&e))?.ino();
        file.seek(std::io::SeekFrom::Start(0)).map_err(|e| read_error(&e))?;
        let (engine, filter) = (self.shared.engine.clone(), self.shared.in_group());
        let delete_seq = meta.last_log_id.map_or(0, |l| l.index);
        // Records go into the engine one at a time; a damaged file fails the install (openraft
        // then stops this replica's group rather than run on half a snapshot).
        let installed = tokio::task::spawn_blocking(move || -> Result<(Sessions, Fences, std::fs::File), String> {
            let (sessions, fences, mut reader) = SnapshotReader::open(&mut file).map_err(|e| e.to_string())?;
            let mut importer = engine.importer(filter);
            while let Some(version) = reader.next_record().map_err(|e| e.to_string())? {
                importer.add(version).map_err(|e| e.to_string())?;
            }
            importer.finish(delete_seq).map_err(|e| e.to_string())?;
            drop(reader);
            Ok((sessions, fences, file))
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        let (sessions, fences, mut file) =
            installed.map_err(|reason| StorageIOError::write_snapshot(Some(meta.signature()), &std::io::Error::other(reason)))?;
        let marker = AppliedMarker {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            sessions: sessions.clone(),
            engine_points: Vec::new(),
            fences: fences.clone(),
        };
        self.shared.make_durable(marker).await?;
        tracing::info!(group = self.shared.group, snapshot = %meta.snapshot_id, last_log = ?meta.last_log_id, "installed snapshot");
        {
            let mut progress = self.shared.progress.lock().unwrap();
            progress.last_applied = meta.last_log_id;
            progress.membership = meta.last_membership.clone();
            progress.sessions = sessions;
            progress.fences = fences;
        }
        // The received file becomes the current snapshot (renamed when it is one this state
        // machine created to receive into, copied otherwise); partial receptions are dropped.
        let received: Vec<PathBuf> = std::mem::take(&mut *self.shared.receiving.lock().unwrap());
        let kept = self.shared.new_snapshot_path("snap");
        let mut renamed = false;
        for path in received {
            if !renamed && std::fs::metadata(&path).is_ok_and(|m| m.ino() == inode) && std::fs::rename(&path, &kept).is_ok() {
                renamed = true;
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
        if !renamed {
            let copy = kept.clone();
            let copied = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
                file.seek(std::io::SeekFrom::Start(0))?;
                std::io::copy(&mut file, &mut std::fs::File::create(&copy)?)
            })
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
            copied.map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        }
        self.shared.keep_snapshot(meta, kept);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let current = self.shared.progress.lock().unwrap().snapshot.clone();
        let Some((meta, path)) = current else { return Ok(None) };
        let file = tokio::fs::File::open(&path).await.map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(file) }))
    }
}

/// Applies entries, waiting for room on a full device (on a thread that may block).
fn apply_all(shared: &Shared, entries: Vec<Entry<TypeConfig>>) -> Result<Vec<CommandResult>, StorageError<NodeId>> {
    let mut results = Vec::with_capacity(entries.len());
    for entry in entries {
        results.push(apply_entry(shared, &entry, true)?.expect("applying waits for room"));
    }
    Ok(results)
}

/// Applies one entry. `None`: a device is full and `wait` is false (nothing was applied).
fn apply_entry(shared: &Shared, entry: &Entry<TypeConfig>, wait: bool) -> Result<Option<CommandResult>, StorageError<NodeId>> {
    let result = match &entry.payload {
        EntryPayload::Blank => CommandResult::Noop,
        EntryPayload::Membership(membership) => {
            shared.progress.lock().unwrap().membership = StoredMembership::new(Some(entry.log_id), membership.clone());
            CommandResult::Noop
        }
        EntryPayload::Normal(command) => match apply_command(shared, command, entry.log_id, wait)? {
            Some(result) => result,
            None => return Ok(None),
        },
    };
    shared.progress.lock().unwrap().last_applied = Some(entry.log_id);
    Ok(Some(result))
}

/// Applies one client command: asks the exactly-once table first (a retry gets its first
/// outcome), then the engine, and records the outcome. `None`: a device is full and `wait` is
/// false (nothing was applied or recorded; admitting the tag again gives the same answer).
fn apply_command(shared: &Shared, command: &Command, log_id: LogId<NodeId>, wait: bool) -> Result<Option<CommandResult>, StorageError<NodeId>> {
    let tag = command.tag.filter(|_| !shared.unsafe_skip_dedup.load(Ordering::Relaxed));
    if let Some(tag) = &tag {
        match shared.progress.lock().unwrap().sessions.admit(tag, command.now_ms) {
            Admission::Fresh => {}
            Admission::Duplicate(outcome) => return Ok(Some(CommandResult::Duplicate(outcome))),
            Admission::Refused(refusal) => return Ok(Some(CommandResult::Refused(refusal))),
        }
    }
    if let WriteOp::FenceSession { session, release, finished_below } = command.op {
        shared.progress.lock().unwrap().fences.fence(session, release, finished_below);
        return Ok(Some(CommandResult::Noop));
    }
    let replicated = Replicated { log_index: log_id.index, now_ms: command.now_ms };
    let applied = match batch_outside_group(shared, command).map_or_else(|| record_write(shared, command, log_id.index), |f| Err(Refused::Failure(f))) {
        Err(failure) => Err(failure),
        // Nothing to write (a range-lock test that found nothing in the way).
        Ok(None) => Ok(Some((RecordMeta { generation: 0, void_time_secs: 0, last_update_ms: command.now_ms }, Vec::new()))),
        Ok(Some((op, policy))) => match wait {
            true => apply_when_there_is_room(shared, &command.key, &op, &policy, replicated).map_err(Refused::from),
            false => match shared.engine.apply_replicated(&command.key, &op, &policy, replicated) {
                Err(crate::Error::DeviceFull { .. }) => return Ok(None),
                other => other.map_err(Refused::from),
            },
        },
    };
    let (result, outcome) = match applied {
        Ok(Some((meta, results))) => {
            let outcome = Outcome::Written { meta: meta.clone(), results: results.clone() };
            (CommandResult::Applied { meta, results }, outcome)
        }
        Ok(None) => (CommandResult::Replayed, replayed_outcome(shared, command, log_id.index)),
        Err(Refused::Failure(failure)) => (CommandResult::Failed(failure.clone()), Outcome::Failed(failure)),
        Err(Refused::Engine(err)) => return Err(StorageIOError::apply(log_id, &err).into()),
    };
    if let Some(tag) = &tag {
        shared.progress.lock().unwrap().sessions.complete(tag, outcome);
    }
    Ok(Some(result))
}

/// A batch naming a record of another group is refused (the leader checks this before
/// proposing; every replica checks it again, as it must never write another group's records).
fn batch_outside_group(shared: &Shared, command: &Command) -> Option<WriteFailure> {
    let writes = command.op.batch()?;
    let stray = writes.iter().find(|w| group_of(&w.key.digest, shared.groups) != shared.group)?;
    Some(WriteFailure::BadRequest(format!("a batch writes records of one group: {:?} is not in group {}", stray.key, shared.group)))
}

/// Why a command wrote nothing: a deterministic refusal (the same on every replica), or an
/// engine error that stops the replica.
enum Refused {
    Failure(WriteFailure),
    Engine(crate::Error),
}

impl From<crate::Error> for Refused {
    fn from(err: crate::Error) -> Refused {
        match WriteFailure::try_from(&err) {
            Ok(failure) => Refused::Failure(failure),
            Err(()) => Refused::Engine(err),
        }
    }
}

/// The record write a command makes, after the checks of lease sessions and locks
/// (`fences`): a write in a fenced session is refused; a lock becomes a write of its holder
/// (never expiring: TTLs go by each replica's clock) or a delete. A command the engine already
/// reflects (replayed after a restart) skips the lock checks, which would see its own effect:
/// the engine then reports it replayed.
fn record_write(shared: &Shared, command: &Command, index: u64) -> Result<Option<(WriteOp, WritePolicy)>, Refused> {
    let refuse = |failure| Err(Refused::Failure(failure));
    if let WriteOp::RangeLock { session, lock } = &command.op {
        return range_lock_write(shared, command, *session, lock, index);
    }
    let session = match &command.op {
        WriteOp::InSession { session, op } => match op.as_ref() {
            WriteOp::Put(_) | WriteOp::Delete | WriteOp::Touch | WriteOp::Operate(_) | WriteOp::Batch(_) => *session,
            other => return refuse(WriteFailure::BadRequest(format!("{other:?} cannot be a write in a session"))),
        },
        WriteOp::Lock { session } | WriteOp::Unlock { session } => *session,
        _ => return Ok(Some((command.op.clone(), command.policy))),
    };
    if !shared.unsafe_skip_fencing.load(Ordering::Relaxed) && shared.progress.lock().unwrap().fences.is_fenced(session) {
        return refuse(WriteFailure::SessionExpired { session });
    }
    let lock_policy = WritePolicy { exists: RecordExistsAction::Replace, ttl: Ttl::NeverExpire, ..command.policy };
    let replayed = shared.engine.current_version(&command.key.digest).is_some_and(|(seq, _, _)| seq >= index);
    let holder = || -> Result<Option<u64>, Refused> {
        if replayed {
            return Ok(Some(session));
        }
        let record = shared.engine.get(&command.key, Some(&[LOCK_HOLDER_BIN]))?;
        Ok(record.and_then(|r| match r.bin(LOCK_HOLDER_BIN) {
            Some(Value::Int(id)) => Some(*id as u64),
            _ => None,
        }))
    };
    match &command.op {
        WriteOp::Lock { .. } => match holder()? {
            Some(other) if other != session && !shared.progress.lock().unwrap().fences.is_released(other) => refuse(WriteFailure::LockHeld { holder: other }),
            _ => Ok(Some((WriteOp::Put(vec![Bin::new(LOCK_HOLDER_BIN, Value::Int(session as i64))]), lock_policy))),
        },
        WriteOp::Unlock { .. } => match holder()? {
            Some(holder) if holder == session => Ok(Some((WriteOp::Delete, command.policy))),
            holder => refuse(WriteFailure::LockNotHeld { holder }),
        },
        _ => Ok(Some((command.op.clone(), command.policy))),
    }
}

/// A byte-range lock request (`raft::range_locks`): refused for a fenced session, decided
/// against the lock table's locks of sessions not yet released, and written back as the new
/// table (deleted when empty). A replayed entry (the table already holds a version from this
/// index or later) skips the decision, which would see its own effect; the engine skips it.
fn range_lock_write(
    shared: &Shared,
    command: &Command,
    session: u64,
    lock: &crate::ops::RangeLock,
    index: u64,
) -> Result<Option<(WriteOp, WritePolicy)>, Refused> {
    use super::range_locks::{decide, Held, RANGE_LOCKS_MAX};
    use crate::ops::{Operation, RANGE_LOCKS_BIN};
    let policy = WritePolicy { exists: RecordExistsAction::Replace, ttl: Ttl::NeverExpire, ..command.policy };
    if shared.engine.current_version(&command.key.digest).is_some_and(|(seq, _, _)| seq >= index) {
        return Ok(Some((WriteOp::Touch, policy)));
    }
    if !shared.unsafe_skip_fencing.load(Ordering::Relaxed) && shared.progress.lock().unwrap().fences.is_fenced(session) {
        return Err(Refused::Failure(WriteFailure::SessionExpired { session }));
    }
    let record = shared.engine.get(&command.key, Some(&[RANGE_LOCKS_BIN]))?;
    let table: Vec<Held> = match record.as_ref().and_then(|r| r.bin(RANGE_LOCKS_BIN)) {
        Some(Value::Bytes(bytes)) => crate::protocol::decode_body(bytes, RANGE_LOCKS_MAX * 64)
            .map_err(|e| Refused::Failure(WriteFailure::BadRequest(format!("the lock table does not decode: {e}"))))?,
        _ => Vec::new(),
    };
    let fences = &shared.progress.lock().unwrap().fences;
    let decided = decide(table, session, lock, |s| fences.is_released(s));
    match decided {
        Err(held) => Err(Refused::Failure(WriteFailure::RangeLockHeld(held))),
        Ok(None) => Ok(None),
        Ok(Some(table)) if table.is_empty() => Ok(Some((WriteOp::Operate(vec![Operation::DeleteRecord]), policy))),
        Ok(Some(table)) if table.len() > RANGE_LOCKS_MAX => {
            Err(Refused::Failure(WriteFailure::BadRequest(format!("a lock table holds at most {RANGE_LOCKS_MAX} locks"))))
        }
        Ok(Some(table)) => {
            let bytes = crate::protocol::encode_body(&table, RANGE_LOCKS_MAX * 64).map_err(|e| Refused::Failure(WriteFailure::BadRequest(e)))?;
            Ok(Some((WriteOp::Put(vec![Bin::new(RANGE_LOCKS_BIN, Value::Bytes(bytes))]), policy)))
        }
    }
}

/// How often an apply that found its device full looks again.
const DEVICE_FULL_RETRY: Duration = Duration::from_millis(50);

/// Applies a command to the engine. A committed entry must be applied on every replica, in
/// order: when this replica's device is full (its leader refuses new writes while any replica
/// reports stop-writes, so this is the last resort for writes already in the log), the apply
/// waits for defragmentation to free room instead of failing, which would stop this replica of
/// the group for good. The other replicas go on committing meanwhile. Gives up only when the
/// node shuts down (the entry stays in the log and is applied after the restart).
fn apply_when_there_is_room(
    shared: &Shared,
    key: &crate::Key,
    op: &WriteOp,
    policy: &WritePolicy,
    replicated: Replicated,
) -> crate::Result<Option<(RecordMeta, Vec<crate::OpResult>)>> {
    let mut waiting_since: Option<Instant> = None;
    loop {
        match shared.engine.apply_replicated(key, op, policy, replicated) {
            Err(crate::Error::DeviceFull { path }) if !shared.stopping.load(Ordering::SeqCst) => {
                if waiting_since.is_none() {
                    tracing::warn!(group = shared.group, index = replicated.log_index, device = %path.display(),
                        "the device is full: applying waits for defragmentation to free room (the other replicas go on)");
                    waiting_since = Some(Instant::now());
                    shared.waiting_for_room.store(true, Ordering::SeqCst);
                }
                shared.engine.wake_background();
                std::thread::sleep(DEVICE_FULL_RETRY);
            }
            done => {
                if let Some(since) = waiting_since {
                    shared.waiting_for_room.store(false, Ordering::SeqCst);
                    tracing::info!(
                        group = shared.group,
                        index = replicated.log_index,
                        waited_ms = since.elapsed().as_millis() as u64,
                        "applying goes on: the device has room again (or the node is stopping)"
                    );
                }
                return done;
            }
        }
    }
}

/// The outcome of an entry the engine already held when it was replayed (it flushed past the
/// durable applied point before a restart): recoverable when the record's current version is
/// the one this entry wrote and the write read nothing; otherwise lost (and a retry says so).
fn replayed_outcome(shared: &Shared, command: &Command, index: u64) -> Outcome {
    match shared.engine.current_version(&command.key.digest) {
        Some((seq, generation, void_time_secs)) if seq == index && !command.op.has_reads() => {
            Outcome::Written { meta: RecordMeta { generation, void_time_secs, last_update_ms: command.now_ms }, results: Vec::new() }
        }
        _ => Outcome::ResultLost,
    }
}
