//! Three Raft replicas of one group in one process, connected by an in-memory router: writes
//! go through the leader and every replica's engine ends up the same; a replica that was down
//! while the others purged their logs catches up from a snapshot; a replica restarted on its
//! WAL and engine replays without applying anything twice. The group has a WAL id that is not
//! its group number (as in chunkd), so the state machine must keep the two apart. Tagged
//! (exactly-once) writes proposed again get their first outcome, on every replica, after a
//! snapshot install or a replay too; the unsafe test flag shows the check failing.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chunkstore::protocol::WriteTag;
use chunkstore::raft::{Command, CommandResult, GroupLogStore, GroupStateMachine, NodeId, Outcome, RaftInstance, TypeConfig};
use chunkstore::wal::{Wal, WalConfig};
use chunkstore::{DeviceConfig, Key, Namespace, NamespaceConfig, OpenOptions, Operation, Value, WriteOp, WritePolicy};
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse};
use openraft::{BasicNode, RaftNetwork, RaftNetworkFactory};

#[derive(Clone, Default)]
struct Router(Arc<Mutex<HashMap<NodeId, RaftInstance>>>);

struct Connection {
    router: Router,
    target: NodeId,
}

impl Router {
    fn get(&self, target: NodeId) -> Option<RaftInstance> {
        self.0.lock().unwrap().get(&target).cloned()
    }
}

fn unreachable<E: std::error::Error>(target: NodeId) -> RPCError<NodeId, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(format!("node {target} is down"))))
}

impl RaftNetworkFactory<TypeConfig> for Router {
    type Network = Connection;
    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Connection {
        Connection { router: self.clone(), target }
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let raft = self.router.get(self.target).ok_or_else(|| unreachable(self.target))?;
        raft.append_entries(rpc).await.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>> {
        let raft = self.router.get(self.target).ok_or_else(|| unreachable(self.target))?;
        raft.install_snapshot(rpc).await.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, _option: RPCOption) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let raft = self.router.get(self.target).ok_or_else(|| unreachable(self.target))?;
        raft.vote(rpc).await.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

struct Replica {
    raft: RaftInstance,
    engine: Arc<Namespace>,
    state_machine: GroupStateMachine,
}

fn engine_config(dir: &std::path::Path) -> NamespaceConfig {
    NamespaceConfig {
        write_block_size: 64 * 1024,
        commit_to_device: false,
        flush_max_ms: 50,
        max_write_cache: 16 * 64 * 1024,
        ..NamespaceConfig::new("raft", vec![DeviceConfig { path: dir.join("engine.dat"), size: Some(32 << 20) }])
    }
}

async fn start(id: NodeId, dir: &std::path::Path, router: &Router) -> Replica {
    start_with(id, dir, router, engine_config(dir)).await
}

async fn start_with(id: NodeId, dir: &std::path::Path, router: &Router, engine_config: NamespaceConfig) -> Replica {
    std::fs::create_dir_all(dir).unwrap();
    let wal = Arc::new(Wal::open(WalConfig::new(dir.join("wal"))).unwrap());
    let options = OpenOptions { replicated: true, ..Default::default() };
    let engine = Arc::new(Namespace::open(engine_config, options).unwrap());
    let state_machine = GroupStateMachine::new(engine.clone(), wal.clone(), 5 << 12, 0, 1, &dir.join("snapshots")).unwrap();
    let config =
        openraft::Config { heartbeat_interval: 50, election_timeout_min: 300, election_timeout_max: 600, max_in_snapshot_log_to_keep: 0, ..Default::default() };
    let raft =
        RaftInstance::new(id, Arc::new(config.validate().unwrap()), router.clone(), GroupLogStore::new(wal, 5 << 12), state_machine.clone()).await.unwrap();
    router.0.lock().unwrap().insert(id, raft.clone());
    Replica { raft, engine, state_machine }
}

fn add_one(k: i64) -> Command {
    Command {
        key: Key::new("s", k),
        op: WriteOp::Operate(vec![Operation::Add { bin: "n".into(), delta: 1 }]),
        policy: WritePolicy::default(),
        now_ms: 1_700_000_000_000,
        tag: None,
    }
}

/// `add_one(k)` tagged as write `seq` of client 9.
fn tagged_add_one(k: i64, seq: u64) -> Command {
    Command { tag: Some(WriteTag { client_id: 9, born_ms: 1, lane: seq as u32, seq }), ..add_one(k) }
}

fn counter(engine: &Namespace, k: i64) -> i64 {
    engine.get(&Key::new("s", k), None).unwrap().and_then(|r| r.bin("n").and_then(Value::as_int)).unwrap_or(0)
}

/// Increments keys 0..keys through the leader; returns the log index of the last write.
async fn write_all(leader: &RaftInstance, keys: i64) -> u64 {
    let mut last = 0;
    for k in 0..keys {
        let response = leader.client_write(add_one(k)).await.unwrap();
        assert!(matches!(response.data, CommandResult::Applied { .. }), "{:?}", response.data);
        last = response.log_id.index;
    }
    last
}

async fn wait_applied(replica: &Replica, index: u64) {
    replica.raft.wait(Some(Duration::from_secs(20))).applied_index_at_least(Some(index), "replica catches up").await.unwrap();
}

fn counters(engine: &Namespace, keys: i64) -> Vec<i64> {
    (0..keys)
        .map(|k| match engine.get(&Key::new("s", k), None).unwrap() {
            Some(record) => record.bin("n").and_then(Value::as_int).unwrap_or(-1),
            None => 0,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_converge_catch_up_from_snapshots_and_replay_once() {
    let dir = tempfile::tempdir().unwrap();
    let router = Router::default();
    let mut replicas = BTreeMap::new();
    for id in 1..=3 {
        replicas.insert(id, start(id, &dir.path().join(format!("n{id}")), &router).await);
    }
    let members: BTreeMap<NodeId, BasicNode> = (1..=3).map(|id| (id, BasicNode::new(format!("n{id}")))).collect();
    replicas[&1].raft.initialize(members).await.unwrap();
    let elected = replicas[&1].raft.wait(Some(Duration::from_secs(10))).metrics(|m| m.current_leader.is_some(), "leader").await;
    let leader_id = elected.unwrap().current_leader.unwrap();
    let leader = replicas[&leader_id].raft.clone();

    // (The leader's metrics may lag its last write: wait for the index the write returned.)
    let last = write_all(&leader, 40).await;
    for (id, replica) in &replicas {
        wait_applied(replica, last).await;
        let applied = replica.raft.metrics().borrow().last_applied;
        assert_eq!(
            counters(&replica.engine, 40),
            vec![1; 40],
            "replica {id} (leader {leader_id}), applied {applied:?}, last {last}, sm {:?}",
            replica.state_machine.last_applied()
        );
    }

    // Tagged writes: proposed again, the first outcome comes back and nothing is applied twice.
    // (Key 1000 is never written again; key 5 is, by the next round.)
    let first = leader.client_write(tagged_add_one(1000, 1)).await.unwrap();
    let CommandResult::Applied { meta: meta_1000, .. } = first.data else { panic!("{:?}", first.data) };
    let retry = leader.client_write(tagged_add_one(1000, 1)).await.unwrap();
    let written_1000 = Outcome::Written { meta: meta_1000.clone(), results: Vec::new() };
    assert_eq!(retry.data, CommandResult::Duplicate(written_1000.clone()));
    let second = leader.client_write(tagged_add_one(5, 2)).await.unwrap();
    let CommandResult::Applied { meta: meta_5, .. } = second.data else { panic!("{:?}", second.data) };
    for replica in replicas.values() {
        wait_applied(replica, second.log_id.index).await;
        assert_eq!(counter(&replica.engine, 1000), 1);
        assert_eq!(replica.state_machine.session_clients(), 1);
    }

    // A follower goes down; the others write on, snapshot and purge their logs.
    let down = *replicas.keys().find(|id| **id != leader_id).unwrap();
    router.0.lock().unwrap().remove(&down);
    let gone = replicas.remove(&down).unwrap();
    gone.raft.shutdown().await.unwrap();
    drop(gone);
    let purged_to = write_all(&leader, 40).await;
    leader.trigger().snapshot().await.unwrap();
    // (No metrics().borrow() guard may live across an await: it blocks openraft's metrics.)
    let purged = leader.wait(Some(Duration::from_secs(10))).metrics(|m| m.purged.is_some_and(|p| p.index >= purged_to), "log purged").await;
    let metrics = leader.metrics().borrow().clone();
    assert!(purged.is_ok(), "the leader purged its log: {metrics:?}");

    // It comes back on its own WAL and engine and catches up (from the snapshot: its log was purged).
    let back = start(down, &dir.path().join(format!("n{down}")), &router).await;
    let last = write_all(&leader, 1).await;
    wait_applied(&back, last).await;
    let mut expected = vec![2; 40];
    expected[0] = 3;
    expected[5] = 3;
    assert_eq!(counters(&back.engine, 40), expected, "the restarted replica matches the leader");
    assert_eq!(back.state_machine.session_clients(), 1, "the snapshot carried the exactly-once table");
    let installed = back.raft.metrics().borrow().snapshot;
    assert!(installed.is_some_and(|s| s.index >= purged_to), "caught up by installing a snapshot: {installed:?}");
    replicas.insert(down, back);
    for replica in replicas.values() {
        wait_applied(replica, last).await;
        assert_eq!(counters(&replica.engine, 40), expected);
    }
    // A follower that kept its whole log restarts: openraft re-applies every entry over an
    // engine that already holds them, and nothing is counted twice.
    let again = *replicas.keys().find(|id| **id != leader_id && **id != down).unwrap();
    let replica = replicas.remove(&again).unwrap();
    router.0.lock().unwrap().remove(&again);
    replica.raft.shutdown().await.unwrap();
    drop(replica);
    let restarted = start(again, &dir.path().join(format!("n{again}")), &router).await;
    wait_applied(&restarted, last).await;
    assert_eq!(counters(&restarted.engine, 40), expected, "replayed entries were applied once");
    assert_eq!(restarted.state_machine.session_clients(), 1, "the replay rebuilt the exactly-once table");
    replicas.insert(again, restarted);

    // The leader goes; whichever replica takes over (table from a snapshot, or rebuilt by a
    // replay over an engine that already held the writes) answers the retries from its table.
    let old = replicas.remove(&leader_id).unwrap();
    router.0.lock().unwrap().remove(&leader_id);
    old.raft.shutdown().await.unwrap();
    let mut new_leader = None;
    for _ in 0..200 {
        let leaders: Vec<NodeId> = replicas.values().filter_map(|r| r.raft.metrics().borrow().current_leader).collect();
        if let Some(id) = leaders.into_iter().find(|id| *id != leader_id && replicas.contains_key(id)) {
            new_leader = Some(id);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let new_leader = &replicas[&new_leader.expect("a new leader")].raft;
    let retry = new_leader.client_write(tagged_add_one(1000, 1)).await.unwrap();
    assert_eq!(retry.data, CommandResult::Duplicate(written_1000), "the retry's outcome survived");
    let retry = new_leader.client_write(tagged_add_one(5, 2)).await.unwrap();
    let written_5 = Outcome::Written { meta: meta_5, results: Vec::new() };
    assert!([CommandResult::Duplicate(written_5), CommandResult::Duplicate(Outcome::ResultLost)].contains(&retry.data), "{:?}", retry.data);
    for replica in replicas.values() {
        wait_applied(replica, retry.log_id.index).await;
        assert_eq!(counter(&replica.engine, 1000), 1);
        assert_eq!(counters(&replica.engine, 40), expected);
    }
    for replica in replicas.values() {
        replica.raft.shutdown().await.unwrap();
    }
}

/// The negative control: with deduplication switched off, the same tagged write proposed twice
/// is applied twice (and the check above would fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_deduplication_a_retried_write_is_applied_twice() {
    for unsafe_skip_dedup in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let router = Router::default();
        let replica = start(1, dir.path(), &router).await;
        if unsafe_skip_dedup {
            replica.state_machine.set_unsafe_skip_dedup();
        }
        replica.raft.initialize(BTreeMap::from([(1, BasicNode::new("n1"))])).await.unwrap();
        replica.raft.wait(Some(Duration::from_secs(10))).metrics(|m| m.current_leader == Some(1), "leader").await.unwrap();
        replica.raft.client_write(tagged_add_one(7, 1)).await.unwrap();
        replica.raft.client_write(tagged_add_one(7, 1)).await.unwrap();
        assert_eq!(counter(&replica.engine, 7), if unsafe_skip_dedup { 2 } else { 1 }, "unsafe_skip_dedup {unsafe_skip_dedup}");
        replica.raft.shutdown().await.unwrap();
    }
}

/// Ends a waiting apply when the test ends, passed or failed (the runtime's blocking pool
/// would otherwise wait for it forever).
struct StopOnDrop(GroupStateMachine);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// A 16 KiB record for key `k`.
fn put_big(k: i64) -> Command {
    Command { op: WriteOp::Put(vec![chunkstore::Bin::new("b", Value::Bytes(vec![k as u8; 16 * 1024]))]), ..add_one(k) }
}

/// A replica whose device fills while the other two have room (nodes refuse new writes while a
/// replica reports stop-writes, but writes already in the log must be applied everywhere): its
/// apply waits for room instead of failing, which would stop its copy of the group for good.
/// The group goes on committing with the other two, the full replica still takes (and holds)
/// the log, stops promptly when asked to, and after a restart waits again where it was. (It is
/// kept from campaigning, as a node keeps a replica whose apply waits: as leader it could not
/// answer the writes it commits.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_device_fills_waits_for_room_and_the_group_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let router = Router::default();
    let mut replicas = BTreeMap::new();
    for id in 1..=2 {
        replicas.insert(id, start(id, &dir.path().join(format!("n{id}")), &router).await);
    }
    // Replica 3 starts after a leader was elected among the other two, so it never leads.
    let members: BTreeMap<NodeId, BasicNode> = (1..=3).map(|id| (id, BasicNode::new(format!("n{id}")))).collect();
    replicas[&1].raft.initialize(members).await.unwrap();
    let elected = replicas[&1].raft.wait(Some(Duration::from_secs(10))).metrics(|m| m.current_leader.is_some(), "leader").await;
    let leader_id = elected.unwrap().current_leader.unwrap();
    let follower_id = 3 - leader_id;
    let small_dir = dir.path().join("n3");
    // 2 MiB of 64 KiB blocks: room for about 100 of the 16 KiB records.
    let small =
        |dir: &std::path::Path| NamespaceConfig { devices: vec![DeviceConfig { path: dir.join("engine.dat"), size: Some(2 << 20) }], ..engine_config(dir) };
    replicas.insert(3, start_with(3, &small_dir, &router, small(&small_dir)).await);
    replicas[&3].raft.runtime_config().elect(false);
    let stop_first = StopOnDrop(replicas[&3].state_machine.clone());
    let leader = replicas[&leader_id].raft.clone();

    // 300 records (4.7 MiB): every write is committed and applied by the leader.
    let mut last = 0;
    for k in 0..300 {
        let written = leader.client_write(put_big(k)).await.unwrap();
        assert!(matches!(written.data, CommandResult::Applied { .. }), "{:?}", written.data);
        last = written.log_id.index;
    }
    wait_applied(&replicas[&follower_id], last).await;
    let stalled = |replica: &Replica| {
        let metrics = replica.raft.metrics().borrow().clone();
        assert!(metrics.running_state.is_ok(), "the full replica's group failed: {:?}", metrics.running_state);
        let applied = metrics.last_applied.map_or(0, |l| l.index);
        assert!(applied < last, "replica 3 applied {applied} of {last} entries on a 2 MiB device");
        applied
    };
    let waits_for_room = |replica: &Replica| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !replica.state_machine.is_waiting_for_room() {
            assert!(std::time::Instant::now() < deadline, "replica 3 is not waiting for room");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // Replica 3 holds the whole log, and is waiting (still running) partway through applying it.
    let holds_log = replicas[&3].raft.wait(Some(Duration::from_secs(20))).metrics(|m| m.last_log_index >= Some(last), "log").await;
    assert!(holds_log.is_ok(), "replica 3 did not take the log: {:?}", replicas[&3].raft.metrics().borrow().clone());
    waits_for_room(&replicas[&3]);
    let applied = stalled(&replicas[&3]);
    assert!(applied > 0, "replica 3 applied nothing");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stalled(&replicas[&3]), applied, "replica 3 went on applying with a full device");
    for k in 0..10 {
        assert_eq!(replicas[&3].engine.get(&Key::new("s", k), None).unwrap().and_then(|r| r.bin("b").cloned()), Some(Value::Bytes(vec![k as u8; 16 * 1024])));
    }

    // It stops promptly while waiting, and after a restart it is back where it was, waiting.
    let full = replicas.remove(&3).unwrap();
    router.0.lock().unwrap().remove(&3);
    full.state_machine.stop();
    tokio::time::timeout(Duration::from_secs(10), full.raft.shutdown()).await.expect("the waiting replica stops").unwrap();
    // Nothing of the first life may hold its WAL or engine open while the second opens them.
    drop(stop_first);
    drop(full);
    let again = start_with(3, &small_dir, &router, small(&small_dir)).await;
    again.raft.runtime_config().elect(false);
    let _stop_again = StopOnDrop(again.state_machine.clone());
    let holds_log = again.raft.wait(Some(Duration::from_secs(20))).metrics(|m| m.last_log_index >= Some(last), "log").await;
    assert!(holds_log.is_ok(), "restarted replica 3 lost its log: {:?}", again.raft.metrics().borrow().clone());
    waits_for_room(&again);
    let reapplied = stalled(&again);
    assert!(reapplied + 16 >= applied, "replica 3 applied {reapplied} after a restart, {applied} before");

    // The group still commits with the other two.
    let more = leader.client_write(add_one(7)).await.unwrap();
    wait_applied(&replicas[&follower_id], more.log_id.index).await;
    again.state_machine.stop();
    for replica in replicas.values().chain([&again]) {
        replica.raft.shutdown().await.unwrap();
    }
}
