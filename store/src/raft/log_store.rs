//! A group's Raft log, kept in the node's shared WAL.

use std::fmt::Debug;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    CommittedLeaderId, Entry, LogId, LogState, OptionalSend, RaftLogReader, RaftTypeConfig, StorageError, StorageIOError,
    Vote,
};

use super::types::{NodeId, TypeConfig};
use crate::wal::{GroupId, Wal, WalError, WalOp};

/// One group's view of the WAL. Cheap to clone. Generic over the Raft types, so that the
/// partition groups (`TypeConfig`) and the metadata group (`crate::meta::MetaTypeConfig`) keep
/// their logs the same way.
pub struct GroupLogStore<C = TypeConfig> {
    wal: Arc<Wal>,
    group: GroupId,
    types: PhantomData<C>,
}

impl<C> Clone for GroupLogStore<C> {
    fn clone(&self) -> Self {
        GroupLogStore { wal: self.wal.clone(), group: self.group, types: PhantomData }
    }
}

impl GroupLogStore<TypeConfig> {
    /// A partition group's log: WAL group `group`.
    pub fn new(wal: Arc<Wal>, group: GroupId) -> GroupLogStore<TypeConfig> {
        GroupLogStore::with_types(wal, group)
    }
}

impl<C> GroupLogStore<C> {
    /// The log of a group with other Raft types (the metadata group's).
    pub fn with_types(wal: Arc<Wal>, group: GroupId) -> GroupLogStore<C> {
        GroupLogStore { wal, group, types: PhantomData }
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

/// The Raft type configurations whose logs the WAL keeps.
pub trait WalLogTypes: RaftTypeConfig<NodeId = NodeId, Entry = Entry<Self>> {}

impl<C: RaftTypeConfig<NodeId = NodeId, Entry = Entry<C>>> WalLogTypes for C {}

impl<C: WalLogTypes> RaftLogReader<C> for GroupLogStore<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<C>>, StorageError<NodeId>> {
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
        let entries = self.wal.entries(self.group, start..end).map_err(|e| StorageIOError::read_logs(&e))?;
        entries.iter().map(|(_, _, payload)| decode(payload)).collect()
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

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        match self.wal.log_state(self.group).committed {
            Some(bytes) => decode(&bytes),
            None => Ok(None),
        }
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<C>) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let ops: Vec<WalOp> = entries
            .into_iter()
            .map(|entry| WalOp::Entry { index: entry.log_id.index, term: entry.log_id.leader_id.term, payload: encode(&entry) })
            .collect();
        // Readable at once (the WAL serves unflushed entries from memory); the callback runs
        // on the WAL's flusher thread once they are durable.
        self.wal.append(
            self.group,
            &ops,
            Box::new(move |result| callback.log_io_completed(result.map_err(std::io::Error::other))),
        );
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.append_durable(vec![WalOp::Truncate { from_index: log_id.index }])
            .await
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let op = WalOp::Purge { upto_index: log_id.index, upto_term: log_id.leader_id.term };
        self.append_durable(vec![op]).await.map_err(|e| StorageIOError::write_logs(&e).into())
    }
}
