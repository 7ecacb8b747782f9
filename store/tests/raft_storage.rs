//! openraft's own storage test suite against chunkstore's Raft storage: the log in the shared
//! WAL, the state machine on the engine.

use std::sync::Arc;

use chunkstore::device::{Device, MemDevice};
use chunkstore::raft::{GroupLogStore, GroupStateMachine, NodeId, TypeConfig};
use chunkstore::wal::{Wal, WalConfig};
use chunkstore::{DeviceConfig, Namespace, NamespaceConfig, OpenOptions};
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageError;

struct Builder;

impl StoreBuilder<TypeConfig, GroupLogStore, GroupStateMachine, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, GroupLogStore, GroupStateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().unwrap();
        let wal = Arc::new(Wal::open(WalConfig::new(dir.path().join("wal"))).unwrap());
        let block = 64 * 1024;
        let config = NamespaceConfig {
            write_block_size: block as u32,
            commit_to_device: false,
            max_write_cache: 8 * block,
            ..NamespaceConfig::new("raft", vec![DeviceConfig { path: "dev0".into(), size: Some(64 * block) }])
        };
        let device: Arc<dyn Device> = Arc::new(MemDevice::new("dev0", 64 * block));
        let options = OpenOptions { devices: Some(vec![device]), replicated: true, ..Default::default() };
        let engine = Arc::new(Namespace::open(config, options).unwrap());
        let state_machine = GroupStateMachine::new(engine, wal.clone(), 0, 0, 1, &dir.path().join("snapshots"))?;
        Ok((dir, GroupLogStore::new(wal, 0), state_machine))
    }
}

#[test]
fn openraft_storage_suite_passes() {
    Suite::test_all(Builder).unwrap();
}

/// A replica that moved away keeps its log only up to what it applied, and may have saved a
/// committed id past that; openraft re-applies up to the committed id it reads at start, so
/// the store never hands back one past the newest entry it holds (else the replica cannot
/// start when the group moves back: "Failed to get log entries").
#[test]
fn the_committed_id_read_back_never_lies_past_the_log() {
    use chunkstore::wal::WalOp;
    use openraft::storage::RaftLogStorage;
    use openraft::{CommittedLeaderId, LogId};

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let wal = Arc::new(Wal::open(WalConfig::new(dir.path().join("wal"))).unwrap());
        let mut store = GroupLogStore::new(wal.clone(), 7);
        let committed = LogId::new(CommittedLeaderId::new(3, 0), 120);
        store.save_committed(Some(committed)).await.unwrap();
        assert_eq!(store.read_committed().await.unwrap(), None, "no entry is held: nothing is committed here");

        // Trimmed to its applied point (as stopped replicas were before they were forgotten).
        wal.append_blocking(7, &[WalOp::Purge { upto_index: 100, upto_term: 3 }]).unwrap();
        assert_eq!(store.read_committed().await.unwrap(), Some(LogId::new(CommittedLeaderId::new(3, 0), 100)));

        // Within the log, the saved id stands.
        let inside = LogId::new(CommittedLeaderId::new(3, 0), 90);
        store.save_committed(Some(inside)).await.unwrap();
        assert_eq!(store.read_committed().await.unwrap(), Some(inside));
    });
}

/// A replica being forgotten is closed after its group stopped: openraft's state-machine
/// worker and snapshot tasks can outlive `Raft::shutdown`, and whatever they still try (apply
/// an entry, build or install a snapshot) is refused, so nothing lands in the engine or the
/// applied marker after the replica was forgotten.
#[test]
fn a_closed_state_machine_applies_and_snapshots_nothing_more() {
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, SnapshotMeta};

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let (_dir, _log, mut state_machine) = Builder.build().await.unwrap();
        let entry = |index| Entry::<TypeConfig> { log_id: LogId::new(CommittedLeaderId::new(1, 0), index), payload: EntryPayload::Blank };
        state_machine.apply(vec![entry(1)]).await.unwrap();
        state_machine.close().await;
        assert!(state_machine.apply(vec![entry(2)]).await.is_err(), "applied after close");
        assert_eq!(state_machine.last_applied().map(|l| l.index), Some(1));
        let mut builder = state_machine.get_snapshot_builder().await;
        assert!(builder.build_snapshot().await.is_err(), "built a snapshot after close");
        let file = state_machine.begin_receiving_snapshot().await.unwrap();
        let meta = SnapshotMeta { last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 0), 9)), ..Default::default() };
        assert!(state_machine.install_snapshot(&meta, file).await.is_err(), "installed a snapshot after close");
        assert_eq!(state_machine.last_applied().map(|l| l.index), Some(1));
    });
}
