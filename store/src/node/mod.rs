//! A chunkstore node as a library: the WAL, one engine per namespace, one Raft instance per
//! group this node replicates, and the request handler behind the server. (`chunkd` will be a
//! thin binary around it.)
//!
//! Invariants:
//! - **A write is answered `Written` only after its Raft entry is committed and applied**;
//!   any doubt (a timeout, a lost leader) is `Timeout { in_doubt: true }`, never success.
//! - **A node only proposes writes for groups it leads**; others get `NotLeader` with a hint.
//! - **Every node computes the same placement** (`placement::replicas`).

pub mod config;
pub mod placement;
pub mod raft_network;
pub mod transport;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::BasicNode;

use crate::engine::{Clock, Namespace, OpenOptions};
use crate::protocol::{ClusterMap, ErrorReply, NamespaceMap, ReadPolicy, Request, Response};
use crate::raft::{group_of, Outcome, Refusal, Command, CommandResult, GroupLogStore, GroupStateMachine, NodeId, RaftInstance, WriteFailure};
use crate::wal::{Wal, WalConfig};
use crate::NamespaceConfig;
use raft_network::{GroupNetwork, RaftReply, RaftRpc};

/// One namespace as a node hosts it.
#[derive(Clone, Debug)]
pub struct NamespaceSpec {
    /// The engine's configuration (its devices are this node's).
    pub engine: NamespaceConfig,
    pub replication_factor: usize,
    /// Raft groups the 4096 partitions map onto (a power of two, fixed at creation).
    pub groups: u32,
}

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_id: NodeId,
    /// Every node of the cluster: (id, peer address). Static until the metadata group lands.
    pub nodes: Vec<(NodeId, String)>,
    /// Every node's client address, for the cluster map.
    pub client_addresses: Vec<(NodeId, String)>,
    pub data_dir: PathBuf,
    pub namespaces: Vec<NamespaceSpec>,
    /// Raft timing, milliseconds.
    pub heartbeat_ms: u64,
    pub election_timeout_ms: (u64, u64),
    /// How long a request may take before it is answered Timeout.
    pub request_timeout: Duration,
    /// Log entries between snapshots, and entries kept behind one.
    pub snapshot_after_entries: u64,
    pub entries_kept_after_snapshot: u64,
    /// UNSAFE (negative controls only): no exactly-once deduplication of retried writes.
    pub unsafe_skip_dedup: bool,
}

struct Group {
    raft: RaftInstance,
    state_machine: GroupStateMachine,
}

struct HostedNamespace {
    engine: Arc<Namespace>,
    groups: u32,
    replication_factor: usize,
    /// The groups this node replicates.
    local: HashMap<u32, Group>,
}

pub struct Node {
    config: NodeConfig,
    wal: Arc<Wal>,
    namespaces: HashMap<String, HostedNamespace>,
    /// Set when shutdown begins: new requests are turned away (safely retryable elsewhere).
    stopping: std::sync::atomic::AtomicBool,
    /// Writes proposed and not answered yet (shutdown lets them finish).
    writes_in_flight: std::sync::atomic::AtomicUsize,
}

/// Counts a write in flight for as long as it lives.
struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(counter: &'a std::sync::atomic::AtomicUsize) -> InFlight<'a> {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("storage engine: {0}")]
    Engine(#[from] crate::Error),
    #[error("write-ahead log: {0}")]
    Wal(#[from] crate::wal::WalError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("bad node configuration: {0}")]
    Config(String),
}

impl Node {
    /// Opens everything and starts the Raft groups this node replicates. A group whose log is
    /// empty is initialized by its preferred leader (the first of its placement).
    pub async fn start(config: NodeConfig) -> Result<Arc<Node>, NodeError> {
        if !config.nodes.iter().any(|(id, _)| *id == config.node_id) {
            return Err(NodeError::Config(format!("node {} is not in the node list", config.node_id)));
        }
        let wal = Arc::new(Wal::open(WalConfig::new(config.data_dir.join("wal")))?);
        let node_ids: Vec<NodeId> = config.nodes.iter().map(|(id, _)| *id).collect();
        let peers = Arc::new(config.nodes.iter().cloned().collect::<HashMap<_, _>>());
        let raft_config = Arc::new(
            openraft::Config {
                heartbeat_interval: config.heartbeat_ms,
                election_timeout_min: config.election_timeout_ms.0,
                election_timeout_max: config.election_timeout_ms.1,
                snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_after_entries),
                max_in_snapshot_log_to_keep: config.entries_kept_after_snapshot,
                ..Default::default()
            }
            .validate()
            .map_err(|e| NodeError::Config(e.to_string()))?,
        );
        let snapshot_dir = config.data_dir.join("snapshots");
        let mut namespaces = HashMap::new();
        let mut wal_prefixes = HashMap::new();
        for spec in &config.namespaces {
            let prefix = wal_prefix(&spec.engine.name);
            if let Some(other) = wal_prefixes.insert(prefix, spec.engine.name.clone()) {
                return Err(NodeError::Config(format!(
                    "namespaces {other:?} and {:?} hash to the same log prefix; rename one",
                    spec.engine.name
                )));
            }
            if !spec.groups.is_power_of_two() || spec.groups > 4096 || spec.replication_factor == 0 {
                return Err(NodeError::Config(format!("namespace {}: groups must be a power of two ≤ 4096 and replication-factor ≥ 1", spec.engine.name)));
            }
            let options = OpenOptions { replicated: true, ..OpenOptions::default() };
            let engine = Arc::new(Namespace::open(spec.engine.clone(), options)?);
            let mut local = HashMap::new();
            for group in 0..spec.groups {
                let replicas = placement::replicas(&spec.engine.name, group, &node_ids, spec.replication_factor);
                if !replicas.contains(&config.node_id) {
                    continue;
                }
                let wal_group = prefix << 12 | group;
                let state_machine = GroupStateMachine::new(engine.clone(), wal.clone(), wal_group, group, spec.groups, &snapshot_dir)
                    .map_err(|e| NodeError::Raft(e.to_string()))?;
                if config.unsafe_skip_dedup {
                    state_machine.set_unsafe_skip_dedup();
                }
                let network = GroupNetwork { namespace: spec.engine.name.clone(), group, peers: peers.clone() };
                let log_store = GroupLogStore::new(wal.clone(), wal_group);
                let raft = RaftInstance::new(config.node_id, raft_config.clone(), network, log_store, state_machine.clone())
                    .await
                    .map_err(|e| NodeError::Raft(e.to_string()))?;
                let fresh = wal.log_state(wal_group).last.is_none();
                if fresh && replicas[0] == config.node_id {
                    let members: BTreeMap<NodeId, BasicNode> =
                        replicas.iter().map(|id| (*id, BasicNode::new(peers[id].clone()))).collect();
                    raft.initialize(members).await.map_err(|e| NodeError::Raft(e.to_string()))?;
                }
                local.insert(group, Group { raft, state_machine });
            }
            namespaces.insert(
                spec.engine.name.clone(),
                HostedNamespace { engine, groups: spec.groups, replication_factor: spec.replication_factor, local },
            );
        }
        Ok(Arc::new(Node { config, wal, namespaces, stopping: Default::default(), writes_in_flight: Default::default() }))
    }

    /// Leader of each group this node replicates, per namespace (None while electing).
    pub fn leaders(&self, namespace: &str) -> Vec<(u32, Option<NodeId>)> {
        let Some(hosted) = self.namespaces.get(namespace) else { return Vec::new() };
        let mut out: Vec<_> = hosted.local.iter().map(|(g, group)| (*g, group.raft.metrics().borrow().current_leader)).collect();
        out.sort_unstable();
        out
    }

    /// Stops the Raft groups and closes engines and WAL cleanly. Requests arriving from now on
    /// are answered NotLeader (nothing proposed: the client retries elsewhere); writes already
    /// proposed are given up to `request_timeout` to be committed and answered, and the groups
    /// this node leads up to a second for their followers to hold the whole log. Then the
    /// groups stop (a proposal still cut short is answered in doubt) and the followers elect a
    /// new leader once the leader lease (election-timeout-max) has passed: openraft 0.9.25 has
    /// no leadership transfer (TimeoutNow), and its followers refuse votes while the lease lasts.
    pub async fn shutdown(&self) {
        use std::sync::atomic::Ordering;
        self.stopping.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + self.config.request_timeout;
        while self.writes_in_flight.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let unanswered = self.writes_in_flight.load(Ordering::SeqCst);
        if unanswered > 0 {
            tracing::warn!(unanswered, "shutting down with writes still in flight (they are answered in doubt)");
        }
        let me = self.config.node_id;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        for hosted in self.namespaces.values() {
            for group in hosted.local.values() {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let _ = group.raft.wait(Some(left)).metrics(
                    |m| {
                        let last = m.last_log_index;
                        m.current_leader != Some(me)
                            || m.replication.as_ref().is_some_and(|r| r.iter().all(|(id, matched)| *id == me || matched.map(|l| l.index) >= last))
                    },
                    "followers hold the whole log",
                )
                .await;
            }
        }
        for hosted in self.namespaces.values() {
            for group in hosted.local.values() {
                let _ = group.raft.shutdown().await;
            }
            let _ = hosted.engine.flush();
        }
        let stats = self.wal.stats();
        tracing::info!(appends = stats.appends, flushes = stats.flushes, fsyncs = stats.fsyncs, "WAL totals");
        self.wal.close();
    }

    pub async fn handle(&self, request: Request) -> Response {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) && !matches!(request, Request::Raft { .. }) {
            return Response::Error(ErrorReply::NotLeader { leader: None });
        }
        match request {
            Request::ClusterMap => Response::ClusterMap(self.cluster_map()),
            Request::Raft { namespace, group, message } => self.handle_raft(&namespace, group, &message).await,
            Request::Write { namespace, key, op, policy, tag } => {
                let (hosted, group) = match self.local_group(&namespace, &key) {
                    Ok(found) => found,
                    Err(reply) => return Response::Error(reply),
                };
                if let Some(reason) = hosted.engine.stop_writes_reason() {
                    if !matches!(op, crate::WriteOp::Delete) {
                        return Response::Error(ErrorReply::StopWrites(reason));
                    }
                }
                // NotLeader is a promise that nothing was proposed: give it only before proposing.
                let leader = group.raft.current_leader().await;
                if leader != Some(self.config.node_id) {
                    return Response::Error(ErrorReply::NotLeader { leader });
                }
                let _in_flight = InFlight::new(&self.writes_in_flight);
                let command = Command { key, op, policy, now_ms: crate::engine::SystemClock.now_ms(), tag: Some(tag) };
                let proposed = tokio::time::timeout(self.config.request_timeout, group.raft.client_write(command)).await;
                match proposed {
                    Err(_) => Response::Error(ErrorReply::Timeout { in_doubt: true }),
                    Ok(Ok(written)) => match written.data {
                        CommandResult::Applied { meta, results } => Response::Written { meta, results, index: written.log_id.index },
                        CommandResult::Failed(failure) => Response::Error(failure_reply(failure)),
                        CommandResult::Duplicate(Outcome::Written { meta, results }) => {
                            Response::Written { meta, results, index: written.log_id.index }
                        }
                        CommandResult::Duplicate(Outcome::Failed(failure)) => Response::Error(failure_reply(failure)),
                        CommandResult::Duplicate(Outcome::ResultLost) => Response::Error(ErrorReply::AppliedResultLost),
                        CommandResult::Refused(refusal) => Response::Error(match refusal {
                            Refusal::Stale => ErrorReply::StaleWrite,
                            Refusal::ClientExpired => ErrorReply::ClientExpired,
                            Refusal::TooManyInFlight => ErrorReply::TooManyInFlight,
                        }),
                        other => Response::Error(ErrorReply::Internal(format!("unexpected apply result {other:?}"))),
                    },
                    // Leadership was lost after proposing: the entry may still commit under a new
                    // leader (openraft answers ForwardToLeader then too), so the fate is unknown.
                    Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                        Response::Error(ErrorReply::Timeout { in_doubt: true })
                    }
                    // The group stopped (shutdown) or failed with the entry maybe in its log.
                    Ok(Err(RaftError::Fatal(_))) => Response::Error(ErrorReply::Timeout { in_doubt: true }),
                    Ok(Err(err)) => Response::Error(ErrorReply::Internal(err.to_string())),
                }
            }
            Request::Get { namespace, key, bins, read, min_index } => {
                let (hosted, group) = match self.local_group(&namespace, &key) {
                    Ok(found) => found,
                    Err(reply) => return Response::Error(reply),
                };
                match read {
                    ReadPolicy::Linearizable => {
                        let confirmed = tokio::time::timeout(self.config.request_timeout, group.raft.ensure_linearizable()).await;
                        match confirmed {
                            Err(_) => return Response::Error(ErrorReply::Timeout { in_doubt: false }),
                            Ok(Ok(_)) => {}
                            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward)))) => {
                                return Response::Error(ErrorReply::NotLeader { leader: forward.leader_id })
                            }
                            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => {
                                return Response::Error(ErrorReply::PartitionUnavailable)
                            }
                            Ok(Err(RaftError::Fatal(_))) => return Response::Error(ErrorReply::NotLeader { leader: None }),
                        }
                    }
                    ReadPolicy::Session => {
                        // Any replica that has applied what this client has seen may answer.
                        let applied = group.state_machine.last_applied().map_or(0, |l| l.index);
                        if applied < min_index {
                            let leader = group.raft.metrics().borrow().current_leader;
                            return Response::Error(ErrorReply::NotLeader { leader });
                        }
                    }
                }
                let index = group.state_machine.last_applied().map_or(0, |l| l.index);
                // A read may go to the device: keep it off the runtime's worker threads.
                let engine = hosted.engine.clone();
                let read = tokio::task::spawn_blocking(move || {
                    let names: Option<Vec<&str>> = bins.as_ref().map(|b| b.iter().map(String::as_str).collect());
                    engine.get(&key, names.as_deref())
                })
                .await;
                match read {
                    Ok(Ok(record)) => Response::Record { record, index },
                    Ok(Err(err)) => Response::Error(ErrorReply::Internal(err.to_string())),
                    Err(err) => Response::Error(ErrorReply::Internal(format!("read task failed: {err}"))),
                }
            }
        }
    }

    /// The namespace and this node's replica of the key's group; the error to answer if the
    /// namespace is unknown or the group lives elsewhere (NotLeader with its preferred leader).
    fn local_group(&self, namespace: &str, key: &crate::Key) -> Result<(&HostedNamespace, &Group), ErrorReply> {
        let hosted = self.namespaces.get(namespace).ok_or_else(|| ErrorReply::UnknownNamespace(namespace.to_owned()))?;
        let group_id = group_of(&key.digest, hosted.groups);
        match hosted.local.get(&group_id) {
            Some(group) => Ok((hosted, group)),
            None => {
                let leader = placement::replicas(namespace, group_id, &self.node_ids(), hosted.replication_factor).first().copied();
                Err(ErrorReply::NotLeader { leader })
            }
        }
    }

    fn node_ids(&self) -> Vec<NodeId> {
        self.config.nodes.iter().map(|(id, _)| *id).collect()
    }

    fn cluster_map(&self) -> ClusterMap {
        let node_ids = self.node_ids();
        let mut namespaces: Vec<NamespaceMap> = self
            .namespaces
            .iter()
            .map(|(name, hosted)| {
                let replicas: Vec<Vec<u64>> =
                    (0..hosted.groups).map(|g| placement::replicas(name, g, &node_ids, hosted.replication_factor)).collect();
                let leaders = (0..hosted.groups)
                    .map(|g| match hosted.local.get(&g) {
                        Some(group) => group.raft.metrics().borrow().current_leader,
                        None => replicas[g as usize].first().copied(),
                    })
                    .collect();
                NamespaceMap { name: name.clone(), groups: hosted.groups, replication_factor: hosted.replication_factor as u32, leaders, replicas }
            })
            .collect();
        namespaces.sort_by(|a, b| a.name.cmp(&b.name));
        ClusterMap { nodes: self.config.client_addresses.clone(), now_ms: crate::engine::SystemClock.now_ms(), namespaces }
    }

    async fn handle_raft(&self, namespace: &str, group: u32, message: &[u8]) -> Response {
        let Some(group) = self.namespaces.get(namespace).and_then(|h| h.local.get(&group)) else {
            return Response::Error(ErrorReply::BadRequest(format!("this node does not replicate {namespace}/{group}")));
        };
        let rpc: RaftRpc = match bincode::deserialize(message) {
            Ok(rpc) => rpc,
            Err(err) => return Response::Error(ErrorReply::BadRequest(format!("malformed raft message: {err}"))),
        };
        let reply = match rpc {
            RaftRpc::AppendEntries(request) => RaftReply::AppendEntries(group.raft.append_entries(request).await),
            RaftRpc::Vote(request) => RaftReply::Vote(group.raft.vote(request).await),
            RaftRpc::InstallSnapshot(request) => RaftReply::InstallSnapshot(group.raft.install_snapshot(request).await),
        };
        Response::Raft { message: bincode::serialize(&reply).expect("raft replies serialize") }
    }
}

impl transport::Handler for Node {
    async fn handle(&self, request: Request) -> Response {
        Node::handle(self, request).await
    }
}

/// A namespace's WAL group ids are `prefix << 12 | group`, the prefix taken from a hash of the
/// name (so that it does not depend on the order of namespaces in the configuration; start-up
/// refuses two namespaces with the same prefix).
fn wal_prefix(namespace: &str) -> u32 {
    crc32fast::hash(namespace.as_bytes()) & 0xF_FFFF
}

fn failure_reply(failure: WriteFailure) -> ErrorReply {
    match failure {
        WriteFailure::GenerationMismatch { expected, actual } => ErrorReply::GenerationMismatch { expected, actual },
        WriteFailure::RecordExists => ErrorReply::RecordExists,
        WriteFailure::RecordNotFound => ErrorReply::RecordNotFound,
        WriteFailure::RecordTooBig { size_bytes, limit_bytes } => ErrorReply::RecordTooBig { size_bytes, limit_bytes },
        WriteFailure::IncompatibleBin { bin, reason } => ErrorReply::IncompatibleBin { bin, reason },
        WriteFailure::BadRequest(what) => ErrorReply::BadRequest(what),
    }
}
