//! A group's Raft state survives a clean restart of the node's WAL: vote and committed (the
//! commit point is kept in memory and written at checkpoints and at close; a crash may lose it,
//! which Raft tolerates).

use std::sync::Arc;

use chunkstore::raft::{GroupLogStore, TypeConfig};
use chunkstore::wal::{Wal, WalConfig, WalOp};
use openraft::storage::RaftLogStorage;
use openraft::{CommittedLeaderId, LeaderId, LogId, Vote};

#[test]
fn vote_and_committed_survive_a_reopen_and_the_vote_comes_back_uncommitted() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let wal = Arc::new(Wal::open(WalConfig::new(dir.path())).unwrap());
        let mut store = GroupLogStore::new(wal.clone(), 7 << 12 | 3);
        // The log reaches index 20 (the committed id is never read back past the log's end).
        wal.append_blocking(7 << 12 | 3, &[WalOp::Purge { upto_index: 20, upto_term: 4 }]).unwrap();
        let vote = Vote { leader_id: LeaderId::new(4, 2), committed: true };
        store.save_vote(&vote).await.unwrap();
        let committed = LogId::new(CommittedLeaderId::new(4, 0), 17);
        store.save_committed(Some(committed)).await.unwrap();
        drop(store);
        drop(wal);
        let wal = Arc::new(Wal::open(WalConfig::new(dir.path())).unwrap());
        let mut store = GroupLogStore::new(wal, 7 << 12 | 3);
        // The vote survives, handed back uncommitted: a restarted node must win a new term
        // rather than resume leadership (see `read_vote`).
        assert_eq!(store.read_vote().await.unwrap(), Some(Vote { committed: false, ..vote }));
        assert_eq!(<GroupLogStore as RaftLogStorage<TypeConfig>>::read_committed(&mut store).await.unwrap(), Some(committed));
    });
}
