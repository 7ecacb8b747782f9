//! A group's Raft log, kept in the node's shared WAL.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{CommittedLeaderId, Entry, LogId, LogState, OptionalSend, RaftLogReader, RaftTypeConfig, StorageError, StorageIOError, Vote};

use super::types::{NodeId, TypeConfig};
use crate::wal::{GroupId, Wal, WalError, WalOp};

/// One group's view of the WAL. Cheap to clone. Generic over the Raft types, so that the
/// partition groups (`TypeConfig`) and the metadata group (`crate::meta::MetaTypeConfig`) keep
/// their logs the same way.
pub struct GroupLogStore<C: RaftTypeConfig = TypeConfig> {
    wal: Arc<Wal>,
    group: GroupId,
    /// Shared by the clones (openraft's log reader is one).
    recent: Arc<Mutex<RecentEntries<C>>>,
    types: PhantomData<C>,
    /// This node, when appends made while following another node are synced on the
    /// appending task (`syncing_as_follower_of_others`).
    node: Option<NodeId>,
    /// The last vote saved was this node's own (a candidate's or a leader's).
    leading: bool,
}

impl<C: RaftTypeConfig> Clone for GroupLogStore<C> {
    fn clone(&self) -> Self {
        GroupLogStore { wal: self.wal.clone(), group: self.group, recent: self.recent.clone(), types: PhantomData, node: self.node, leading: self.leading }
    }
}

/// Entries kept decoded per group at most, and their encoded bytes at most.
const RECENT_ENTRIES_MAX: usize = 512;
const RECENT_BYTES_MAX: usize = 4 << 20;

/// The newest entries of a group's log, decoded, in a contiguous run that ends at the log's
/// last entry (or empty). Each entry is read soon after it is appended (by the replication to
/// every follower and by the state machine): from here that costs a clone, where the WAL costs a
/// read under its lock, a CRC check and a decode each time. Appends, truncations and purges
/// change it together with the WAL, so what it holds is what the WAL would return.
struct RecentEntries<C: RaftTypeConfig> {
    /// (entry, encoded length)
    entries: VecDeque<(Entry<C>, usize)>,
    bytes: usize,
}

impl<C: RaftTypeConfig> Default for RecentEntries<C> {
    fn default() -> Self {
        RecentEntries { entries: VecDeque::new(), bytes: 0 }
    }
}

impl<C: WalLogTypes> RecentEntries<C> {
    fn first(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn push(&mut self, entry: Entry<C>, len: usize) {
        let index = entry.log_id.index;
        self.truncate(index);
        if self.entries.back().is_some_and(|(last, _)| last.log_id.index + 1 != index) {
            // Not contiguous with what is kept (cannot happen after the truncation unless the
            // log skipped ahead, as after a snapshot install): start over from this entry.
            self.entries.clear();
            self.bytes = 0;
        }
        self.entries.push_back((entry, len));
        self.bytes += len;
        while self.entries.len() > RECENT_ENTRIES_MAX || (self.bytes > RECENT_BYTES_MAX && self.entries.len() > 1) {
            let (_, len) = self.entries.pop_front().expect("not empty");
            self.bytes -= len;
        }
    }

    /// Forgets entries from `index` on.
    fn truncate(&mut self, index: u64) {
        while self.entries.back().is_some_and(|(e, _)| e.log_id.index >= index) {
            let (_, len) = self.entries.pop_back().expect("not empty");
            self.bytes -= len;
        }
    }

    /// Forgets entries up to `index`.
    fn purge(&mut self, index: u64) {
        while self.entries.front().is_some_and(|(e, _)| e.log_id.index <= index) {
            let (_, len) = self.entries.pop_front().expect("not empty");
            self.bytes -= len;
        }
    }

    /// The entries in `start..end`, if every one of them that the log holds is here: the run
    /// ends at the log's last entry, so it suffices that it begins at or before `start`.
    fn get(&self, start: u64, end: u64) -> Option<Vec<Entry<C>>> {
        let first = self.first()?;
        if start < first {
            return None;
        }
        let from = (start - first) as usize;
        Some(self.entries.iter().skip(from).take_while(|(e, _)| e.log_id.index < end).map(|(e, _)| e.clone()).collect())
    }
}

impl GroupLogStore<TypeConfig> {
    /// A partition group's log: WAL group `group`.
    pub fn new(wal: Arc<Wal>, group: GroupId) -> GroupLogStore<TypeConfig> {
        GroupLogStore::with_types(wal, group)
    }
}

impl<C: RaftTypeConfig> GroupLogStore<C> {
    /// The log of a group with other Raft types (the metadata group's).
    pub fn with_types(wal: Arc<Wal>, group: GroupId) -> GroupLogStore<C> {
        GroupLogStore { wal, group, recent: Default::default(), types: PhantomData, node: None, leading: false }
    }

    /// Appends made while this replica follows another node's leadership are synced on the
    /// appending task (`Wal::append_syncing`): a follower has nothing to do until they are
    /// durable, and the hand-off to the flusher thread and back costs two wake-ups. A leader's
    /// appends go to the flusher, so that its sync overlaps its followers'.
    pub fn syncing_as_follower_of_others(mut self, node: NodeId) -> GroupLogStore<C> {
        self.node = Some(node);
        self
    }

    async fn append_durable(&self, ops: Vec<WalOp>) -> Result<(), WalError> {
        append_durable(&self.wal, self.group, ops).await
    }
}

/// Appends and waits (without blocking the runtime) until the ops are durable.
pub(crate) async fn append_durable(wal: &Wal, group: GroupId, ops: Vec<WalOp>) -> Result<(), WalError> {
    let (sender, receiver) = tokio::sync::oneshot::channel();
    wal.append(group, &ops, Box::new(move |result| drop(sender.send(result))));
    receiver.await.unwrap_or(Err(WalError::ShutDown))
}

pub(crate) fn log_id(term: u64, index: u64) -> LogId<NodeId> {
    LogId::new(CommittedLeaderId::new(term, 0), index)
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    bincode::serialize(value).expect("raft types serialize")
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StorageError<NodeId>> {
    bincode::deserialize(bytes).map_err(|e| StorageIOError::read_logs(&e).into())
}

/// The committed log id this replica of `group` saved, never past its log's newest entry (a
/// stopped replica's log is trimmed to what it applied, its saved id is not); None if its log
/// is empty.
pub(crate) fn saved_committed(wal: &Wal, group: GroupId) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
    let state = wal.log_state(group);
    let committed: Option<LogId<NodeId>> = match &state.committed {
        Some(bytes) => decode(bytes)?,
        None => None,
    };
    Ok(match (committed, state.last.max(state.purged)) {
        (Some(committed), Some((index, term))) if committed.index > index => Some(log_id(term, index)),
        (Some(_), None) => None,
        (committed, _) => committed,
    })
}

/// The Raft type configurations whose logs the WAL keeps.
pub trait WalLogTypes: RaftTypeConfig<NodeId = NodeId, Entry = Entry<Self>, D: Clone> {}

impl<C: RaftTypeConfig<NodeId = NodeId, Entry = Entry<C>, D: Clone>> WalLogTypes for C {}

impl<C: WalLogTypes> RaftLogReader<C> for GroupLogStore<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(&mut self, range: RB) -> Result<Vec<Entry<C>>, StorageError<NodeId>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i + 1,
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        if let Some(entries) = self.recent.lock().unwrap().get(start, end) {
            return Ok(entries);
        }
        // Older entries (a lagging follower, a restart) are read from the segment files: on the
        // blocking pool, not on a runtime worker.
        let (wal, group) = (self.wal.clone(), self.group);
        let read = tokio::task::spawn_blocking(move || {
            let entries = wal.entries(group, start..end).map_err(|e| StorageIOError::read_logs(&e))?;
            entries.iter().map(|(_, _, payload)| decode(payload)).collect::<Result<Vec<Entry<C>>, StorageError<NodeId>>>()
        });
        read.await.map_err(|e| StorageIOError::read_logs(&e))?
    }
}

impl<C: WalLogTypes> RaftLogStorage<C> for GroupLogStore<C> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<NodeId>> {
        let state = self.wal.log_state(self.group);
        Ok(LogState {
            last_purged_log_id: state.purged.map(|(index, term)| log_id(term, index)),
            last_log_id: state.last.map(|(index, term)| log_id(term, index)),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.leading = self.node.is_some_and(|node| vote.leader_id().voted_for() == Some(node));
        self.append_durable(vec![WalOp::Vote(encode(vote))]).await.map_err(|e| StorageIOError::write_vote(&e).into())
    }

    /// openraft reads the vote once, at start. A committed vote is handed back uncommitted, so
    /// a node never resumes as leader after a restart: it must win a new term, whose first
    /// entry commits everything before it. (openraft 0.9 would resume the old leadership with
    /// the term's first entry as the read index of linearizable reads, while the commit index
    /// it lost in the restart, and the engine's unflushed applies, may be far past it: such a
    /// read returned a record as it was before writes it had acknowledged. Found by
    /// `chunkcheck register --nemesis kill`.)
    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        let vote: Option<Vote<NodeId>> = self.wal.log_state(self.group).vote.map(|bytes| decode(&bytes)).transpose()?;
        Ok(vote.map(|vote| Vote { committed: false, ..vote }))
    }

    /// Kept in memory and written with the WAL's next checkpoint: openraft calls this on every
    /// commit, and Raft does not need it durable (a stale value only means re-applying less at
    /// start-up; the rest is applied when the leader's next commit arrives, and the engine never
    /// reverts below the applied point recorded in the WAL).
    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        self.wal.set_committed_lazily(self.group, encode(&committed));
        Ok(())
    }

    /// Never past the newest entry this log holds: openraft re-applies up to the committed id
    /// at start and fails on entries it cannot read. A replica that moved away in earlier
    /// versions kept its log only up to what it applied, while the committed id it saved may
    /// lie further on; when the group moves back, that replica must still start.
    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        saved_committed(&self.wal, self.group)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<C>) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut recent = self.recent.lock().unwrap();
        let ops: Vec<WalOp> = entries
            .into_iter()
            .map(|entry| {
                let payload = encode(&entry);
                let len = payload.len();
                let op = WalOp::Entry { index: entry.log_id.index, term: entry.log_id.leader_id.term, payload };
                recent.push(entry, len);
                op
            })
            .collect();
        // Readable at once (the WAL serves unflushed entries from memory); the callback runs
        // on the WAL's flusher thread once they are durable. (Appended under the lock of the
        // recent entries, so a reader never sees them in one and not the other's order.)
        let done: crate::wal::Durable = Box::new(move |result| callback.log_io_completed(result.map_err(std::io::Error::other)));
        if self.node.is_some() && !self.leading {
            let appended = self.wal.append_unsynced(self.group, &ops);
            drop(recent);
            self.wal.sync_here(appended, done);
        } else {
            self.wal.append(self.group, &ops, done);
            drop(recent);
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.recent.lock().unwrap().truncate(log_id.index);
        self.append_durable(vec![WalOp::Truncate { from_index: log_id.index }]).await.map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let op = WalOp::Purge { upto_index: log_id.index, upto_term: log_id.leader_id.term };
        self.recent.lock().unwrap().purge(log_id.index);
        self.append_durable(vec![op]).await.map_err(|e| StorageIOError::write_logs(&e).into())
    }
}
