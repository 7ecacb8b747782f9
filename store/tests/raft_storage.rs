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
