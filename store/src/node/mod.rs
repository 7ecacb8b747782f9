//! A chunkstore node as a library: the WAL, the metadata group (on its voters), one engine per
//! namespace, one Raft instance per group this node replicates, and the request handler behind
//! the server. `chunkd` is a thin binary around it.
//!
//! Life cycle: `Node::start` opens the WAL; the caller then serves the node's listeners and calls
//! `Node::join`, which starts the metadata group on its voters (asking the peers first whether
//! the cluster exists, see `metadata`), learns the cluster metadata (bootstrapping it on a fresh
//! cluster), checks the configuration against it, and starts the partition groups.
//! Until then, client requests are answered NotLeader (retry elsewhere or later).
//!
//! Requests go through `answer`, one handler each (writes in `writes`, reads in `reads`, the
//! rest in the module of their responsibility); the invariants of each are in its module.

mod cluster_view;
pub mod config;
mod groups;
pub use config::{NamespaceSpec, NodeConfig};
mod health;
mod leadership;
mod leases;
mod membership;
mod metadata;
pub mod metrics;
pub mod network;
pub mod raft_network;
mod raft_rpc;
mod reads;
mod reclaim;
mod rejoin;
mod repair;
mod revive;
mod roster;
pub mod storage;
mod touch;
pub mod transport;
mod wal_damage;
mod writes;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::BasicNode;

use crate::engine::{Clock, Namespace, OpenOptions};
use crate::meta::ClusterMetaExt as _;
use crate::meta::{self, ClusterMeta, MetaCommand, MetaStateMachine, NodeInfo, META_NAMESPACE, META_WAL_GROUP};
use crate::protocol::{ClusterMap, ErrorReply, NamespaceMap, ReadPolicy, Request, Response};
use crate::raft::{group_of, Command, GroupLogStore, GroupStateMachine, NodeId, RaftInstance};
use crate::wal::{Wal, WalConfig};
use crate::NamespaceConfig;
use groups::{namespace_wal_group, wal_prefix, Group, HostedNamespace};
use health::{lost_quorum, report_health, Answering, PeerHealth};
use raft_network::{GroupNetwork, RaftReply, RaftRpc};

/// What a node knows once it has joined the cluster.
struct Joined {
    /// The newest cluster metadata this node has seen (kept up by `roster::follow_cluster`).
    cluster: std::sync::RwLock<ClusterMeta>,
    /// The metadata group's log index `cluster` was applied up to (0: not known), so that the
    /// node never goes back to an older copy (`roster::adopt_cluster`).
    cluster_applied: std::sync::atomic::AtomicU64,
    namespaces: HashMap<String, HostedNamespace>,
}

/// What a node runs in: its wall clock, its network and its disks (`Node::start_in`).
/// `Node::start` uses the system clock, TCP and files.
pub struct NodeEnv {
    pub clock: Arc<dyn Clock>,
    pub network: Arc<dyn network::Network>,
    /// `None`: files under the data directory.
    pub storage: Option<Arc<dyn storage::NodeStorage>>,
}

pub struct Node {
    config: NodeConfig,
    /// The wall clock (`start_in`).
    clock: Arc<dyn Clock>,
    /// How this node reaches its peers (`start_in`).
    network: Arc<dyn network::Network>,
    /// Its disks, when not files (`start_in`).
    storage: Option<Arc<dyn storage::NodeStorage>>,
    wal: Arc<Wal>,
    raft_config: Arc<openraft::Config>,
    /// One connection per peer, shared by all groups.
    peers: raft_network::Peers,
    /// The cluster metadata this node knows (applied by the metadata group on its voters,
    /// remembered from a voter on other nodes).
    meta_state: MetaStateMachine,
    /// This node's member of the metadata group: set by `join` on a voter, or when the metadata
    /// leader makes this node a member (`JoinMetadata`). It stays once set, also after the
    /// group removed this node (then it neither campaigns nor is asked).
    meta: OnceLock<metadata::MetaGroup>,
    /// The metadata group's state at this node as a member (see `metadata`).
    meta_member: metadata::MemberState,
    /// Set once by `join`.
    joined: OnceLock<Joined>,
    /// Set when shutdown begins: new requests are turned away (safely retryable elsewhere).
    stopping: std::sync::atomic::AtomicBool,
    /// Proposals (writes and fences) not answered yet (shutdown lets them finish).
    writes_in_flight: std::sync::atomic::AtomicUsize,
    /// Snapshots being sent to peers that rebuild a damaged copy.
    transfers: repair::Transfers,
    /// Each peer's last health report, and when it came (see `report_health`).
    peer_health: std::sync::Mutex<HashMap<NodeId, PeerHealth>>,
    /// How each peer answers this node's own health reports: round trips, so they show that
    /// both directions work (a one-way cut lets reports in and loses the answers).
    peer_answered: std::sync::Mutex<HashMap<NodeId, Answering>>,
    /// The lease deadlines, while this node leads the metadata group (see `leases`).
    lease_clock: std::sync::Mutex<leases::LeaseClock>,
    metrics: metrics::NodeMetrics,
    /// The groups this node leads, since when (see `leadership`).
    leading: leadership::Leading,
    /// The group moves this node drives as the metadata leader (see `roster`).
    moves_driven: std::sync::Mutex<std::collections::HashMap<(String, u32), String>>,
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
    /// Opens the WAL and the metadata this node remembers. Serve the node, then call `join`.
    pub async fn start(config: NodeConfig) -> Result<Arc<Node>, NodeError> {
        let network = Arc::new(network::TcpNetwork { source: config.peer_source });
        Self::start_in(config, NodeEnv { clock: Arc::new(crate::engine::SystemClock), network, storage: None }).await
    }

    /// `start`, in the environment `env` gives: the wall clock the node and its engines go by
    /// (proposals' timestamps, expiry; monotonic time is always tokio's, which a paused runtime,
    /// tokio's `test-util`, drives) and the network to its peers.
    pub async fn start_in(config: NodeConfig, env: NodeEnv) -> Result<Arc<Node>, NodeError> {
        let NodeEnv { clock, network, storage } = env;
        if !config.nodes.iter().any(|(id, _)| *id == config.node_id) {
            return Err(NodeError::Config(format!("node {} is not in the node list", config.node_id)));
        }
        let wal_dir = config.data_dir.join("wal");
        // Made again after a corrupt WAL is set aside (its files have moved).
        let wal_config = || -> Result<WalConfig, NodeError> {
            let segment_dir: Option<Arc<dyn crate::device::DeviceDir>> = match (&storage, config.test_power_loss_devices) {
                (Some(storage), _) => Some(storage.wal_dir()),
                (None, true) => {
                    let files = crate::device::FileDir::new(&wal_dir).map_err(|source| crate::wal::WalError::Io { path: wal_dir.clone(), source })?;
                    Some(Arc::new(crate::device::PowerLossDir::new(Arc::new(files), rand::random())))
                }
                (None, false) => None,
            };
            Ok(WalConfig {
                segment_dir,
                zero_fill: config.wal_zero_fill,
                segment_bytes: config.wal_segment_bytes,
                unsafe_torn_tail_rule: config.unsafe_wal_torn_tail_rule,
                unsafe_skip_fsync: config.unsafe_wal_skip_fsync,
                unsafe_ignore_sync_errors: config.unsafe_wal_ignore_sync_errors,
                ..WalConfig::new(wal_dir.clone())
            })
        };
        let wal = match Wal::open(wal_config()?) {
            Ok(wal) => wal,
            // Disks given in `env` (memory) are not files to set aside: the start fails.
            Err(err @ crate::wal::WalError::Corrupt { .. }) if storage.is_none() => {
                wal_damage::set_aside(&config.data_dir, &config.namespaces, &err)?;
                Wal::open(wal_config()?)?
            }
            Err(err) => return Err(err.into()),
        };
        let wal = Arc::new(wal);
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
        let meta_state = MetaStateMachine::new(wal.clone()).map_err(NodeError::Config)?;
        let peers: raft_network::Peers = Arc::new(raft_network::PeerSet::new(config.nodes.iter().cloned(), network.clone()));
        if let Some(cluster) = meta_state.cluster() {
            for node in &cluster.nodes {
                peers.connect(node.id, &node.peer);
            }
        }
        Ok(Arc::new(Node {
            config,
            clock,
            network,
            storage,
            wal,
            raft_config,
            peers,
            meta_state,
            meta: OnceLock::new(),
            meta_member: Default::default(),
            joined: OnceLock::new(),
            stopping: Default::default(),
            writes_in_flight: Default::default(),
            transfers: Default::default(),
            peer_health: Default::default(),
            peer_answered: Default::default(),
            lease_clock: Default::default(),
            leading: Default::default(),
            moves_driven: Default::default(),
            metrics: Default::default(),
        }))
    }

    /// Learns the cluster metadata (bootstrapping it from this node's configuration on a fresh
    /// cluster), refuses a configuration that disagrees with it, then opens the namespaces and
    /// starts the Raft groups this node replicates. A group whose log is empty is initialized by
    /// its preferred leader (the first of its placement). Waits as long as the metadata group
    /// has no quorum (logging so).
    pub async fn join(self: &Arc<Self>) -> Result<(), NodeError> {
        self.start_metadata().await?;
        self.start_loops(Loops::Joining);
        let config = &self.config;
        let me = config.node_id;
        let configured = self.configured_cluster()?;
        let mut cluster = self.learn_cluster(&configured).await;
        let mut differences = cluster.differences(&configured, me);
        if !differences.is_empty() {
            differences = self.differences_from_current(&configured, differences).await;
        }
        if !differences.is_empty() {
            return Err(NodeError::Config(format!(
                "this node's configuration disagrees with the cluster metadata (fix the file; the cluster keeps what it was created with):\n  - {}",
                differences.join("\n  - ")
            )));
        }
        if cluster.node(me).is_none() {
            let info = configured.node(me).cloned().expect("start checked that the node list has this node");
            cluster = self.join_as_new_node(info).await;
        }
        for node in &cluster.nodes {
            self.peers.connect(node.id, &node.peer);
        }
        // The index of the copy it starts from, when that is its own state machine's.
        let (own, own_applied) = self.meta_state.cluster_applied();
        let cluster_index = if own.as_ref() == Some(&cluster) { own_applied } else { 0 };
        let mut namespaces = HashMap::new();
        for spec in &config.namespaces {
            namespaces.insert(spec.engine.name.clone(), self.host_namespace(spec, &cluster, cluster_index).await?);
        }
        tracing::info!(node = me, nodes = cluster.nodes.len(), namespaces = namespaces.len(), "joined the cluster");
        let cluster_applied = std::sync::atomic::AtomicU64::new(cluster_index);
        if self.joined.set(Joined { cluster: std::sync::RwLock::new(cluster), cluster_applied, namespaces }).is_err() {
            return Err(NodeError::Config("join called twice".into()));
        }
        self.start_loops(Loops::Joined);
        Ok(())
    }

    /// Every loop a node runs in the background, started here and nowhere else. Each holds the
    /// node weakly and ends once it is gone. (Per-group and per-connection tasks, and the
    /// metadata member's `keep_metadata_log_short`, live and die with what they serve.)
    fn start_loops(self: &Arc<Self>, stage: Loops) {
        let node = || Arc::downgrade(self);
        match stage {
            // Health reports go out from the start of `join`: a replica that lost its copy is
            // told apart by them while the node joins.
            Loops::Joining => spawn_loop("report_health", report_health(node())),
            Loops::Joined => {
                spawn_loop("keep_leases", leases::keep_leases(node()));
                spawn_loop("follow_cluster", roster::follow_cluster(node()));
                spawn_loop("keep_balance", roster::keep_balance(node()));
                spawn_loop("balance_leadership", leadership::balance_leadership(node()));
            }
        }
    }

    /// The metadata group's log in this node's WAL: (last purged index, last index). Its
    /// entries are purged as soon as a snapshot covers them, so the two meet once applied.
    pub fn metadata_log(&self) -> (Option<u64>, Option<u64>) {
        let state = self.wal.log_state(META_WAL_GROUP);
        (state.purged.map(|p| p.0), state.last.map(|l| l.0))
    }

    /// Whether this node has joined the cluster and holds every group it replicates (none
    /// catching up after a lost copy).
    pub fn caught_up(&self) -> bool {
        self.joined.get().is_some() && self.lost_copies().is_empty()
    }

    /// The namespaces, once joined.
    fn namespaces(&self) -> Option<&HashMap<String, HostedNamespace>> {
        self.joined.get().map(|j| &j.namespaces)
    }

    /// Leader of each group this node replicates, per namespace (None while electing).
    pub fn leaders(&self, namespace: &str) -> Vec<(u32, Option<NodeId>)> {
        let Some(hosted) = self.namespaces().and_then(|n| n.get(namespace)) else { return Vec::new() };
        hosted.groups().into_iter().map(|(g, group)| (g, group.raft.metrics().borrow().current_leader)).collect()
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
            tracing::warn!(unanswered, "shutting down with proposals still in flight (they are answered in doubt)");
        }
        let me = self.config.node_id;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        let empty = HashMap::new();
        let namespaces = self.namespaces().unwrap_or(&empty);
        for hosted in namespaces.values() {
            for (_, group) in hosted.groups() {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let _ = group
                    .raft
                    .wait(Some(left))
                    .metrics(
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
        for hosted in namespaces.values() {
            for (_, group) in hosted.groups() {
                // An apply waiting for device space gives up, so the group can stop.
                group.state_machine.stop();
                let _ = group.raft.shutdown().await;
            }
            let _ = hosted.engine.flush();
        }
        if let Some(raft) = self.meta_raft() {
            let _ = raft.shutdown().await;
        }
        let stats = self.wal.stats();
        tracing::info!(appends = stats.appends, flushes = stats.flushes, fsyncs = stats.fsyncs, "WAL totals");
        self.wal.close();
    }

    /// Answers one request (counted in the metrics).
    pub async fn handle(&self, request: Request) -> Response {
        let kind = metrics::NodeMetrics::kind(&request);
        let started = std::time::Instant::now();
        let response = self.answer(request).await;
        self.metrics.observe(kind, &response, started.elapsed());
        response
    }

    async fn answer(&self, request: Request) -> Response {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) && !matches!(request, Request::Raft { .. }) {
            return Response::Error(ErrorReply::NotLeader { leader: None });
        }
        let joined = self.joined.get().is_some();
        match request {
            Request::ClusterMeta => self.handle_cluster_meta().await,
            Request::Raft { namespace, group, message } if namespace == META_NAMESPACE => self.handle_meta_raft(group, &message).await,
            Request::NodeHealth { node, stop_writes, lost } => self.note_health(node, stop_writes, lost),
            Request::GroupLog { namespace, group } => self.group_log(&namespace, group),
            Request::MetadataVoters => self.handle_metadata_voters(),
            // Until it has joined, the node knows no groups: clients retry (NotLeader promises
            // that nothing was done).
            // Reviving the metadata group is answered before joining too: its members that lost
            // their copy cannot join before it has a leader again.
            _ if !joined && !revives_metadata(&request) => Response::Error(ErrorReply::NotLeader { leader: None }),
            Request::ClusterMap => Response::ClusterMap(self.cluster_map()),
            Request::Raft { namespace, group, message } => self.handle_raft(&namespace, group, &message).await,
            Request::SnapshotPart { namespace, group, min_applied, transfer, offset } => {
                self.handle_snapshot_part(&namespace, group, min_applied, transfer, offset).await
            }
            Request::SessionOpen { ttl_ms } => self.handle_session_open(ttl_ms).await,
            Request::SessionKeepAlive { session } => self.handle_keep_alive(session).await,
            Request::SessionClose { session } => self.handle_session_close(session).await,
            Request::FenceSession { namespace, group, session, release, finished_below, relay } => {
                self.handle_fence(&namespace, group, session, release, finished_below, relay).await
            }
            Request::AddNode { node } => self.handle_add_node(node).await,
            Request::SetRoster { nodes } => self.handle_set_roster(nodes).await,
            Request::ForgetNode { node } => self.handle_forget_node(node).await,
            Request::JoinMetadata => self.handle_join_metadata().await,
            Request::MoveGroup { namespace, group, replicas } => self.handle_move_group(&namespace, group, replicas).await,
            Request::MoveStages => self.handle_move_stages(),
            Request::Campaign { namespace, group, last_index } => self.handle_campaign(&namespace, group, last_index).await,
            Request::GroupState { namespace, group } => self.handle_group_state(&namespace, group),
            Request::Revive { namespace, group } => self.handle_revive(&namespace, group).await,
            Request::ReviveReplica { namespace, group, survivor, last_index } => self.handle_revive_replica(&namespace, group, survivor, last_index),
            Request::Write { op: crate::WriteOp::FenceSession { .. }, .. } => {
                Response::Error(ErrorReply::BadRequest("sessions are fenced by the metadata leader, not by a write".into()))
            }
            Request::Write { namespace, key, op, policy, tag } => self.handle_write(namespace, key, op, policy, tag).await,
            Request::Get { namespace, key, bins, read, min_index } => self.handle_get(namespace, key, bins, read, min_index).await,
            Request::GetRange { namespace, key, bin, offset, len, read, min_index } => {
                self.handle_get_range(namespace, key, bin, offset, len, read, min_index).await
            }
        }
    }
}

/// When in `join` a node's background loops start.
enum Loops {
    /// Once the metadata member runs, before the metadata is learned.
    Joining,
    /// Once the node has joined (its groups run).
    Joined,
}

/// Runs one of the node's background loops, saying when it ends.
fn spawn_loop(name: &'static str, work: impl std::future::Future<Output = ()> + Send + 'static) {
    tokio::spawn(async move {
        work.await;
        tracing::debug!(background_loop = name, "ended");
    });
}

/// Whether `request` is a step of reviving the metadata group (see `revive`).
fn revives_metadata(request: &Request) -> bool {
    match request {
        Request::Campaign { namespace, .. }
        | Request::GroupState { namespace, .. }
        | Request::Revive { namespace, .. }
        | Request::ReviveReplica { namespace, .. } => namespace == META_NAMESPACE,
        _ => false,
    }
}

impl transport::Handler for Node {
    async fn handle(&self, request: Request) -> Response {
        Node::handle(self, request).await
    }
}
