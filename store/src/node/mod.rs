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
//! Invariants:
//! - **A write is answered `Written` only after its Raft entry is committed and applied**;
//!   any doubt (a timeout, a lost leader) is `Timeout { in_doubt: true }`, never success.
//! - **A node only proposes writes for groups it leads**; others get `NotLeader` with a hint.
//! - **Every node uses the same placement**: the one stored in the cluster metadata.
//! - **A node whose configuration disagrees with the cluster metadata does not start.**

pub mod config;
mod leadership;
mod leases;
mod metadata;
pub mod metrics;
pub mod placement;
pub mod raft_network;
mod reclaim;
mod rejoin;
mod repair;
mod revive;
mod roster;
mod touch;
pub mod transport;
mod wal_damage;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::BasicNode;

use crate::engine::{Clock, Namespace, OpenOptions};
use crate::meta::ClusterMetaExt as _;
use crate::meta::{self, ClusterMeta, MetaCommand, MetaRaft, MetaStateMachine, NodeInfo, META_NAMESPACE, META_WAL_GROUP};
use crate::protocol::{ClusterMap, ErrorReply, NamespaceMap, ReadPolicy, Request, Response};
use crate::raft::{group_of, Command, CommandResult, GroupLogStore, GroupStateMachine, NodeId, Outcome, RaftInstance, Refusal, WriteFailure};
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
    /// Every node of the cluster: (id, peer address). Bootstraps the cluster metadata, and must
    /// agree with it afterwards.
    pub nodes: Vec<(NodeId, String)>,
    /// Every node's client address (part of the cluster metadata too).
    pub client_addresses: Vec<(NodeId, String)>,
    /// The racks nodes declare (nodes left out are racks of their own).
    pub racks: Vec<(NodeId, String)>,
    /// Peer addresses a node that is not a metadata voter asks for the cluster metadata
    /// (empty: the voters' peer addresses from `nodes`).
    pub seeds: Vec<String>,
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
    /// Address this node's connections to its peers leave from (None: the kernel picks).
    pub peer_source: Option<std::net::IpAddr>,
    /// UNSAFE (negative controls only): no exactly-once deduplication of retried writes.
    pub unsafe_skip_dedup: bool,
    /// UNSAFE (negative controls only): writes of expired lease sessions are applied.
    pub unsafe_skip_fencing: bool,
    /// UNSAFE (negative controls only): linearizable reads served by any replica, unchecked.
    pub unsafe_unchecked_reads: bool,
    /// UNSAFE (negative controls only): a damaged engine is served without rebuilding it.
    pub unsafe_serve_damaged: bool,
    /// UNSAFE (negative controls only): damage in the newest WAL segment is taken for a torn
    /// tail (the log is cut there) even with synced flushes after it.
    pub unsafe_wal_torn_tail_rule: bool,
    /// WAL segments zero-filled when prepared (see `WalConfig::zero_fill`).
    pub wal_zero_fill: bool,
    /// Test hook: engine devices drop unsynced writes when the process dies (power cut).
    pub test_power_loss_devices: bool,
    /// Test hook: abort between stopping a replica whose group moved away and forgetting it.
    pub test_crash_while_leaving: bool,
    /// Hand groups to their preferred leaders (see `leadership`).
    pub balance_leaders: bool,
}

pub(crate) struct Group {
    raft: RaftInstance,
    state_machine: GroupStateMachine,
    /// The group's log in the WAL.
    wal_group: u32,
    /// Set while this replica catches up after its copy was lost: it neither votes nor campaigns.
    rejoin: rejoin::Rejoin,
    /// Writes (and fences) hold it shared from their leadership check until answered; a
    /// leadership hand-over holds it exclusively (see `leadership`).
    write_gate: tokio::sync::RwLock<()>,
}

struct HostedNamespace {
    engine: Arc<Namespace>,
    groups: u32,
    /// The groups this node replicates (they change as groups move: see `roster`).
    local: std::sync::RwLock<HashMap<u32, Arc<Group>>>,
}

impl HostedNamespace {
    fn group(&self, group: u32) -> Option<Arc<Group>> {
        self.local.read().unwrap().get(&group).cloned()
    }

    /// The groups this node replicates, by id.
    fn groups(&self) -> Vec<(u32, Arc<Group>)> {
        let mut all: Vec<_> = self.local.read().unwrap().iter().map(|(g, group)| (*g, group.clone())).collect();
        all.sort_unstable_by_key(|(g, _)| *g);
        all
    }
}

/// What a node knows once it has joined the cluster.
struct Joined {
    /// The newest cluster metadata this node has seen (kept up by `roster::follow_cluster`).
    cluster: std::sync::RwLock<ClusterMeta>,
    /// The metadata group's log index `cluster` was applied up to (0: not known), so that the
    /// node never goes back to an older copy (`roster::adopt_cluster`).
    cluster_applied: std::sync::atomic::AtomicU64,
    namespaces: HashMap<String, HostedNamespace>,
}

pub struct Node {
    config: NodeConfig,
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
    /// Writes proposed and not answered yet (shutdown lets them finish).
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

/// A peer's answers to this node's health reports.
#[derive(Clone, Copy)]
struct Answering {
    /// The first answer after a gap of `2 * HEALTH_REFRESH` or more.
    since: std::time::Instant,
    last: std::time::Instant,
}

/// What a peer last said of itself.
struct PeerHealth {
    /// Namespace → why the peer refuses new writes there.
    stop_writes: HashMap<String, String>,
    /// Groups whose replica on the peer lost its copy and catches up.
    lost: std::collections::HashSet<(String, u32)>,
    received: std::time::Instant,
}

/// How often a node looks at its own stop-writes state (and reports it when it changed).
const HEALTH_POLL: Duration = Duration::from_millis(50);
/// A node reports its state at least this often, changed or not.
const HEALTH_REFRESH: Duration = Duration::from_secs(1);
/// A peer's report older than this is forgotten: a replica not heard from in that long is
/// treated as down (it holds no write back), and reports afresh once it can reach us again.
const HEALTH_FORGET: Duration = Duration::from_secs(5);

/// The longest one round of asking for the metadata leader's copy takes, at a starting node
/// whose configuration disagrees with its own copy (`Node::differences_from_current`).
const CURRENT_METADATA_ROUND: Duration = Duration::from_secs(5);

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
    /// Opens the WAL and the metadata this node remembers. Serve the node, then call `join`.
    pub async fn start(config: NodeConfig) -> Result<Arc<Node>, NodeError> {
        if !config.nodes.iter().any(|(id, _)| *id == config.node_id) {
            return Err(NodeError::Config(format!("node {} is not in the node list", config.node_id)));
        }
        let wal_config = WalConfig {
            zero_fill: config.wal_zero_fill,
            unsafe_torn_tail_rule: config.unsafe_wal_torn_tail_rule,
            ..WalConfig::new(config.data_dir.join("wal"))
        };
        let wal = match Wal::open(wal_config.clone()) {
            Ok(wal) => wal,
            Err(err @ crate::wal::WalError::Corrupt { .. }) => {
                wal_damage::set_aside(&config.data_dir, &config.namespaces, &err)?;
                Wal::open(wal_config)?
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
        let peers: raft_network::Peers = Arc::new(raft_network::PeerSet::new(config.nodes.iter().cloned(), config.peer_source));
        if let Some(cluster) = meta_state.cluster() {
            for node in &cluster.nodes {
                peers.connect(node.id, &node.peer);
            }
        }
        Ok(Arc::new(Node {
            config,
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
        tokio::spawn(report_health(Arc::downgrade(self)));
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
            let info = cluster.namespace(&spec.engine.name).expect("differences checked every namespace");
            let hosted: Vec<u32> = (0..info.groups).filter(|g| cluster.hosts(info, *g, me)).collect();
            let wal_group = |group: u32| namespace_wal_group(&spec.engine.name, group);
            // The engine's durable point as the groups' applied markers recorded it: the scan
            // then tells damage to acknowledged records from a torn tail.
            let durable_points =
                crate::raft::recorded_engine_points(&self.wal, hosted.iter().map(|group| wal_group(*group))).map_err(|e| NodeError::Raft(e.to_string()))?;
            let devices = match config.test_power_loss_devices {
                true => Some(power_loss_devices(&spec.engine)?),
                false => None,
            };
            // Records of replicas that moved away and were forgotten stay out of the index.
            let void_points = crate::raft::forget::recorded_void_points(&self.wal, info.groups, (0..info.groups).map(|g| (g, wal_group(g))))
                .map_err(|e| NodeError::Raft(e.to_string()))?;
            let options = OpenOptions { replicated: true, durable_points, void_points, devices, ..OpenOptions::default() };
            let engine = Arc::new(Namespace::open(spec.engine.clone(), options)?);
            self.finish_interrupted(&spec.engine.name, info.groups, &hosted, &engine).await;
            let mut state_machines = Vec::new();
            for &group in &hosted {
                state_machines.push(self.group_state_machine(&engine, &spec.engine.name, group, info.groups)?);
            }
            if engine.lost_acknowledged_records() && !config.unsafe_serve_damaged {
                tracing::warn!(namespace = %spec.engine.name, groups = hosted.len(),
                    "the engine lost acknowledged records: rebuilding every group this node replicates here from its peers before serving");
                for (&group, state_machine) in hosted.iter().zip(&state_machines) {
                    let mut replicas = info.placement[group as usize].clone();
                    replicas.extend(info.moves.get(&group).into_iter().flatten());
                    self.rebuild_group(&spec.engine.name, group, &replicas, state_machine).await;
                }
                let retire = engine.clone();
                tokio::task::spawn_blocking(move || retire.retire_damaged_blocks()).await.map_err(|e| NodeError::Raft(e.to_string()))??;
            }
            let mut local = HashMap::new();
            for (&group, state_machine) in hosted.iter().zip(state_machines) {
                self.host_group(&spec.engine.name, group, cluster_index)
                    .map_err(|e| NodeError::Config(format!("cannot record that group {group} is hosted here: {e}")))?;
                let started = self.start_group(&cluster, info, group, state_machine, true).await?;
                local.insert(group, Arc::new(started));
            }
            let local = std::sync::RwLock::new(local);
            namespaces.insert(spec.engine.name.clone(), HostedNamespace { engine, groups: info.groups, local });
        }
        tracing::info!(node = me, nodes = cluster.nodes.len(), namespaces = namespaces.len(), "joined the cluster");
        let cluster_applied = std::sync::atomic::AtomicU64::new(cluster_index);
        if self.joined.set(Joined { cluster: std::sync::RwLock::new(cluster), cluster_applied, namespaces }).is_err() {
            return Err(NodeError::Config("join called twice".into()));
        }
        tokio::spawn(leases::keep_leases(Arc::downgrade(self)));
        tokio::spawn(roster::follow_cluster(Arc::downgrade(self)));
        tokio::spawn(roster::keep_balance(Arc::downgrade(self)));
        tokio::spawn(leadership::balance_leadership(Arc::downgrade(self)));
        Ok(())
    }

    /// The state machine of this node's replica of `namespace`'s `group`, over `engine`.
    fn group_state_machine(&self, engine: &Arc<Namespace>, namespace: &str, group: u32, groups: u32) -> Result<GroupStateMachine, NodeError> {
        let snapshot_dir = self.config.data_dir.join("snapshots");
        let wal_group = namespace_wal_group(namespace, group);
        let state_machine =
            GroupStateMachine::new(engine.clone(), self.wal.clone(), wal_group, group, groups, &snapshot_dir).map_err(|e| NodeError::Raft(e.to_string()))?;
        if self.config.unsafe_skip_dedup {
            state_machine.set_unsafe_skip_dedup();
        }
        if self.config.unsafe_skip_fencing {
            state_machine.set_unsafe_skip_fencing();
        }
        Ok(state_machine)
    }

    /// Starts this node's Raft instance of `info`'s `group`. A voter (in the group's placement)
    /// whose log is empty while the group lived on catches up before it votes (`rejoin_state`);
    /// at cluster creation (`at_start`, empty log, never voted), the group's preferred leader
    /// initializes it. A replica a move brings here starts empty, as a learner the group's
    /// leader adds.
    async fn start_group(
        &self,
        cluster: &ClusterMeta,
        info: &meta::NamespaceInfo,
        group: u32,
        state_machine: GroupStateMachine,
        at_start: bool,
    ) -> Result<Group, NodeError> {
        let me = self.config.node_id;
        let wal_group = namespace_wal_group(&info.name, group);
        let replicas = &info.placement[group as usize];
        let fresh = self.wal.log_state(wal_group).last.is_none();
        let rejoin = match replicas.contains(&me) {
            true => self.rejoin_state(&info.name, group, replicas, wal_group, fresh).await?,
            // A move brings the group here. If this replica holds anything, it is from before
            // the group last left this node (a replica that left is forgotten, `reclaim`, but
            // one whose forgetting failed keeps its log), with a membership the group has long
            // changed; voting on it, replicas like it
            // could elect a second leader in a term the group already has one (seen in a
            // roster run: "two incomparable leaders"). So it catches up from the group's
            // leader before it votes, like a replica that lost its copy.
            false => {
                let marker = rejoin::marker_path(&self.config.data_dir, &info.name, group);
                tracing::info!(namespace = %info.name, group, "a move brings the group here: its replica catches up before it votes");
                rejoin::Rejoin::start(marker.clone()).map_err(|e| NodeError::Config(format!("cannot write {}: {e}", marker.display())))?
            }
        };
        let network = GroupNetwork::new(info.name.clone(), group, self.peers.clone());
        let log_store = GroupLogStore::new(self.wal.clone(), wal_group).syncing_as_follower_of_others(me);
        let raft =
            RaftInstance::new(me, self.raft_config.clone(), network, log_store, state_machine.clone()).await.map_err(|e| NodeError::Raft(e.to_string()))?;
        if rejoin.is_active() {
            raft.runtime_config().elect(false);
        }
        let voted = self.wal.log_state(wal_group).vote.is_some();
        if at_start && fresh && !voted && !rejoin.is_active() && replicas.first() == Some(&me) {
            let members: BTreeMap<NodeId, BasicNode> =
                replicas.iter().map(|id| (*id, BasicNode::new(cluster.node(*id).map(|n| n.peer.clone()).unwrap_or_default()))).collect();
            raft.initialize(members).await.map_err(|e| NodeError::Raft(e.to_string()))?;
        }
        Ok(Group { raft, state_machine, wal_group, rejoin, write_gate: Default::default() })
    }

    /// Whether this replica of `namespace`'s `group` must catch up before it votes (see
    /// `rejoin`): it was catching up when it stopped (its marker is there), or its log is empty
    /// while the group lived on at other replicas. With an empty log it waits (logging at once and every
    /// 5 s) until enough of the other replicas have answered that any entry the group committed,
    /// and any term a leader was elected in, is known to one of them: ceil(n/2) of the n
    /// replicas. A term it learns is recorded as its own vote first, so that it never votes
    /// twice in a term it forgot, nor takes entries from a leader of an older term.
    async fn rejoin_state(&self, namespace: &str, group: u32, replicas: &[NodeId], wal_group: u32, fresh: bool) -> Result<rejoin::Rejoin, NodeError> {
        let marker = rejoin::marker_path(&self.config.data_dir, namespace, group);
        let start = |reason: &str| {
            tracing::warn!(namespace, group, reason, "this replica catches up before it votes again in this group");
            rejoin::Rejoin::start(marker.clone()).map_err(|e| NodeError::Config(format!("cannot write {}: {e}", marker.display())))
        };
        if marker.exists() {
            return start("it was catching up when the node stopped");
        }
        let me = self.config.node_id;
        let others: Vec<NodeId> = replicas.iter().copied().filter(|id| *id != me).collect();
        if !fresh || others.is_empty() {
            return Ok(rejoin::Rejoin::none());
        }
        let needed = replicas.len().div_ceil(2);
        let request = Request::GroupLog { namespace: namespace.to_owned(), group };
        let ask = |id: &NodeId| -> rejoin::AskLog<'_> {
            let peer = self.peers.get(id);
            let request = &request;
            Box::pin(async move { peer?.call(request, Duration::from_secs(2)).await.ok() })
        };
        let answers = self.survey_logs((namespace, group, wal_group), &others, needed, ask).await?;
        let lived_on = answers.iter().find(|a| a.lived_on()).map(|a| (a.from, a.last_index.unwrap_or(0)));
        match lived_on {
            Some((id, index)) => start(&format!("its log is empty and node {id}'s reaches index {index}")),
            None => Ok(rejoin::Rejoin::none()),
        }
    }

    /// How far this node's log of `namespace`'s `group` reaches (for a replica deciding whether
    /// it must catch up before it votes).
    fn group_log(&self, namespace: &str, group: u32) -> Response {
        let wal_group = match namespace == META_NAMESPACE {
            true => META_WAL_GROUP,
            false => namespace_wal_group(namespace, group),
        };
        let state = self.wal.log_state(wal_group);
        let vote: Option<openraft::Vote<NodeId>> = state.vote.and_then(|bytes| bincode::deserialize(&bytes).ok());
        Response::GroupLog { last_index: state.last.map(|(index, _)| index), vote_term: vote.map(|v| v.leader_id().term) }
    }

    /// The cluster metadata this node's configuration describes (checked for what start-up
    /// needs: valid groups, distinct WAL prefixes).
    fn configured_cluster(&self) -> Result<ClusterMeta, NodeError> {
        let config = &self.config;
        let mut wal_prefixes = HashMap::new();
        let mut declared = Vec::new();
        for spec in &config.namespaces {
            let prefix = wal_prefix(&spec.engine.name);
            if let Some(other) = wal_prefixes.insert(prefix, spec.engine.name.clone()) {
                return Err(NodeError::Config(format!("namespaces {other:?} and {:?} hash to the same log prefix; rename one", spec.engine.name)));
            }
            if prefix << 12 | 0xFFF == META_WAL_GROUP {
                return Err(NodeError::Config(format!("namespace {:?} hashes to the metadata group's log prefix; rename it", spec.engine.name)));
            }
            if !spec.groups.is_power_of_two() || spec.groups > 4096 || spec.replication_factor == 0 {
                return Err(NodeError::Config(format!("namespace {}: groups must be a power of two ≤ 4096 and replication-factor ≥ 1", spec.engine.name)));
            }
            declared.push((spec.engine.name.clone(), spec.replication_factor as u32, spec.groups));
        }
        let clients: HashMap<NodeId, String> = config.client_addresses.iter().cloned().collect();
        let racks: HashMap<NodeId, String> = config.racks.iter().cloned().collect();
        let nodes = config
            .nodes
            .iter()
            .map(|(id, peer)| NodeInfo { id: *id, client: clients.get(id).cloned().unwrap_or_default(), peer: peer.clone(), rack: racks.get(id).cloned() })
            .collect();
        Ok(ClusterMeta::from_config(nodes, &declared))
    }

    /// The cluster metadata: what this node already knows, else bootstrapped (a voter that
    /// leads a fresh metadata group proposes `configured`) or fetched from the voters.
    async fn learn_cluster(&self, configured: &ClusterMeta) -> ClusterMeta {
        let me = self.config.node_id;
        let started = tokio::time::Instant::now();
        let mut next_report = started + Duration::from_secs(5);
        loop {
            if let Some(cluster) = self.meta_state.cluster() {
                return cluster;
            }
            match self.meta_raft() {
                Some(raft) => {
                    if raft.current_leader().await == Some(me) {
                        let bootstrap = raft.client_write(MetaCommand::Bootstrap(configured.clone()));
                        match tokio::time::timeout(self.config.request_timeout, bootstrap).await {
                            Ok(Ok(_)) => continue,
                            Ok(Err(err)) => tracing::warn!(%err, "proposing the cluster metadata failed; retrying"),
                            Err(_) => tracing::warn!("proposing the cluster metadata timed out; retrying"),
                        }
                    }
                }
                None => {
                    if let Some((cluster, _)) = self.fetch_cluster().await {
                        match self.meta_state.remember(cluster).await {
                            Ok(()) => continue,
                            Err(err) => tracing::warn!(%err, "cannot record the cluster metadata; retrying"),
                        }
                    }
                }
            }
            if tokio::time::Instant::now() >= next_report {
                tracing::info!(waited_s = started.elapsed().as_secs(), "waiting for the metadata group (it needs a quorum of its voters)");
                next_report += Duration::from_secs(5);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How this node's configuration (`configured`) differs from the metadata leader's copy of
    /// the cluster metadata, given that it differs from this node's own copy as `differences`
    /// say. Its own copy may be behind: nodes may have joined while it was down (and its file
    /// was updated to list them), or the metadata group removed this voter before it received
    /// that change. So a node asks the metadata leader before refusing to start, and, like
    /// `learn_cluster`, waits as long as no leader answers (logging so every 5 s).
    async fn differences_from_current(&self, configured: &ClusterMeta, differences: Vec<String>) -> Vec<String> {
        let started = tokio::time::Instant::now();
        let mut next_report = started + Duration::from_secs(5);
        loop {
            // One round of asking, however many of the addresses are silent.
            if let Ok(Some((current, _))) = tokio::time::timeout(CURRENT_METADATA_ROUND, self.fetch_cluster()).await {
                let now = current.differences(configured, self.config.node_id);
                if now.is_empty() {
                    tracing::info!("this node's copy of the cluster metadata is behind its configuration; the metadata leader's copy agrees with it");
                }
                return now;
            }
            if tokio::time::Instant::now() >= next_report {
                tracing::info!(
                    waited_s = started.elapsed().as_secs(),
                    ?differences,
                    "this node's configuration disagrees with its copy of the cluster metadata: waiting for the metadata leader's copy to decide"
                );
                next_report += Duration::from_secs(5);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Asks the metadata voters this node knows of (else the seeds, else the voters its
    /// configuration names) for the cluster metadata; None if none knew. The other nodes it
    /// knows are asked last: the voters may all have changed since it learned them.
    async fn fetch_cluster(&self) -> Option<(ClusterMeta, u64)> {
        let known = self.joined.get().map(|j| j.cluster.read().unwrap().clone()).or_else(|| self.meta_state.cluster());
        let me = self.config.node_id;
        let (addresses, peers): (Vec<String>, Vec<(NodeId, String)>) = match known {
            // Then the nodes its configuration lists (its copy may be behind them).
            Some(cluster) => {
                let (voters, others): (Vec<&NodeInfo>, Vec<&NodeInfo>) =
                    cluster.nodes.iter().filter(|n| n.id != me).partition(|n| cluster.metadata_voters.contains(&n.id));
                let mut addresses: Vec<String> = voters.into_iter().chain(others).map(|n| n.peer.clone()).collect();
                addresses.extend(self.config.nodes.iter().filter(|(id, _)| *id != me).map(|(_, peer)| peer.clone()));
                let mut peers: Vec<(NodeId, String)> = cluster.nodes.iter().map(|n| (n.id, n.peer.clone())).collect();
                peers.extend(self.config.nodes.iter().cloned());
                (addresses, peers)
            }
            // The configured voters first, then every other configured node.
            None => {
                let mut addresses = roster::seed_addresses(&self.config);
                addresses.extend(self.config.nodes.iter().filter(|(id, _)| *id != me).map(|(_, peer)| peer.clone()));
                (addresses, self.config.nodes.clone())
            }
        };
        roster::fetch_cluster_from(&addresses, &peers, self.config.peer_source, Duration::from_secs(2)).await
    }

    /// The metadata group's log in this node's WAL: (last purged index, last index). Its
    /// entries are purged as soon as a snapshot covers them, so the two meet once applied.
    pub fn metadata_log(&self) -> (Option<u64>, Option<u64>) {
        let state = self.wal.log_state(META_WAL_GROUP);
        (state.purged.map(|p| p.0), state.last.map(|l| l.0))
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
            tracing::warn!(unanswered, "shutting down with writes still in flight (they are answered in doubt)");
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
            Request::Write { namespace, key, op, policy, tag } => {
                let (hosted, group) = match self.local_group(&namespace, &key) {
                    Ok(found) => found,
                    Err(reply) => return Response::Error(reply),
                };
                let group_id = group_of(&key.digest, hosted.groups);
                if self.is_dead(&namespace, group_id, &group) {
                    return Response::Error(ErrorReply::PartitionDead { group: group_id, namespace });
                }
                if let Some(writes) = op.batch() {
                    if let Err(reply) = batch_fits(writes, &key, group_id, hosted.groups) {
                        return Response::Error(reply);
                    }
                }
                if !op.frees_room() {
                    if let Some(reason) = self.stop_writes(&namespace, hosted, &group) {
                        return Response::Error(ErrorReply::StopWrites(reason));
                    }
                }
                // NotLeader is a promise that nothing was proposed: give it only before proposing.
                let _gate = group.write_gate.read().await;
                let leader = group.raft.current_leader().await;
                if leader != Some(self.config.node_id) {
                    return Response::Error(ErrorReply::NotLeader { leader });
                }
                if self.out_of_touch(&group) {
                    return Response::Error(ErrorReply::NotLeader { leader: None });
                }
                let _in_flight = InFlight::new(&self.writes_in_flight);
                let command = Command { key, op, policy, now_ms: crate::engine::SystemClock.now_ms(), tag: Some(tag) };
                let proposed = self.while_in_touch(group.raft.metrics(), group.raft.client_write(command)).await;
                match proposed {
                    None => Response::Error(ErrorReply::Timeout { in_doubt: true }),
                    Some(Ok(written)) => match written.data {
                        CommandResult::Applied { meta, results } => Response::Written { meta, results, index: written.log_id.index },
                        CommandResult::Failed(failure) => Response::Error(failure_reply(failure)),
                        CommandResult::Duplicate(Outcome::Written { meta, results }) => Response::Written { meta, results, index: written.log_id.index },
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
                    Some(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => Response::Error(ErrorReply::Timeout { in_doubt: true }),
                    // The group stopped (shutdown) or failed with the entry maybe in its log.
                    Some(Err(RaftError::Fatal(_))) => Response::Error(ErrorReply::Timeout { in_doubt: true }),
                    Some(Err(err)) => Response::Error(ErrorReply::Internal(err.to_string())),
                }
            }
            Request::Get { namespace, key, bins, read, min_index } => self.handle_get(namespace, key, bins, read, min_index).await,
            Request::GetRange { namespace, key, bin, offset, len, read, min_index } => {
                match self.handle_get(namespace, key, Some(vec![bin.clone()]), read, min_index).await {
                    Response::Record { record, index } => Response::Record { record: record.map(|r| bytes_range(r, &bin, offset, len)), index },
                    other => other,
                }
            }
        }
    }

    /// A read of a record (`bins`: only those), served as `read` allows.
    async fn handle_get(&self, namespace: String, key: crate::Key, bins: Option<Vec<String>>, read: ReadPolicy, min_index: u64) -> Response {
        let (hosted, group) = match self.local_group(&namespace, &key) {
            Ok(found) => found,
            Err(reply) => return Response::Error(reply),
        };
        let group_id = group_of(&key.digest, hosted.groups);
        if read != ReadPolicy::AllowUnavailable && self.is_dead(&namespace, group_id, &group) {
            return Response::Error(ErrorReply::PartitionDead { group: group_id, namespace });
        }
        match read {
            ReadPolicy::Linearizable if self.config.unsafe_unchecked_reads => {}
            ReadPolicy::Linearizable if self.out_of_touch(&group) => return Response::Error(ErrorReply::NotLeader { leader: None }),
            ReadPolicy::Linearizable => {
                let confirmed = self.while_in_touch(group.raft.metrics(), group.raft.ensure_linearizable()).await;
                match confirmed {
                    None => return Response::Error(ErrorReply::Timeout { in_doubt: false }),
                    Some(Ok(_)) => {}
                    Some(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward)))) => {
                        return Response::Error(ErrorReply::NotLeader { leader: forward.leader_id })
                    }
                    Some(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => return Response::Error(ErrorReply::PartitionUnavailable),
                    Some(Err(RaftError::Fatal(_))) => return Response::Error(ErrorReply::NotLeader { leader: None }),
                }
            }
            // Whatever this replica has applied: committed entries only.
            ReadPolicy::AllowUnavailable => {}
            // A replica that lost its copy and catches up holds an old prefix of the
            // group: it sends even a client that has seen nothing to the leader.
            ReadPolicy::Session | ReadPolicy::AllowReplica if group.rejoin.is_active() => {
                let leader = group.raft.metrics().borrow().current_leader.filter(|l| *l != self.config.node_id);
                return Response::Error(ErrorReply::NotLeader { leader });
            }
            ReadPolicy::Session | ReadPolicy::AllowReplica => {
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
        let stopped = group.state_machine.clone();
        let read = tokio::task::spawn_blocking(move || {
            let names: Option<Vec<&str>> = bins.as_ref().map(|b| b.iter().map(String::as_str).collect());
            let record = engine.get(&key, names.as_deref())?;
            // The index answered covers the version read: a restarted replica's engine
            // can hold versions past its applied point (flushed before the crash, to be
            // replayed), and a client that saw one must never be sent back before it.
            let version = engine.current_version(&key.digest).map_or(0, |(seq, _, _)| seq);
            Ok::<_, crate::Error>((record, index.max(version)))
        })
        .await;
        match read {
            // The group moved away meanwhile: its replica may have been forgotten.
            Ok(Ok(_)) if stopped.is_stopped() => Response::Error(ErrorReply::NotLeader { leader: self.placement_hint(&namespace, group_id) }),
            Ok(Ok((record, index))) => Response::Record { record, index },
            Ok(Err(err)) => Response::Error(ErrorReply::Internal(err.to_string())),
            Err(err) => Response::Error(ErrorReply::Internal(format!("read task failed: {err}"))),
        }
    }

    /// The namespace and this node's replica of the key's group; the error to answer if the
    /// namespace is unknown or the group lives elsewhere (NotLeader with its preferred leader).
    fn local_group(&self, namespace: &str, key: &crate::Key) -> Result<(&HostedNamespace, Arc<Group>), ErrorReply> {
        let joined = self.joined.get().ok_or(ErrorReply::NotLeader { leader: None })?;
        let hosted = joined.namespaces.get(namespace).ok_or_else(|| ErrorReply::UnknownNamespace(namespace.to_owned()))?;
        let group_id = group_of(&key.digest, hosted.groups);
        match hosted.group(group_id) {
            Some(group) => Ok((hosted, group)),
            None => Err(ErrorReply::NotLeader { leader: self.placement_hint(namespace, group_id) }),
        }
    }

    /// Where a group this node does not replicate may be led: its preferred leader.
    fn placement_hint(&self, namespace: &str, group: u32) -> Option<NodeId> {
        let cluster = self.joined.get()?.cluster.read().unwrap();
        cluster.preferred_leaders().get(namespace).and_then(|leaders| leaders.get(group as usize).copied())
    }

    /// Why a new write to `group` must be refused, if it must: this node's engine is in
    /// stop-writes, or another replica of the group reported that its engine is. Every replica
    /// applies every committed write, so a write one replica has no room for would stall that
    /// replica's apply (see `apply_when_there_is_room`); deletes still go through, to free room.
    fn stop_writes(&self, namespace: &str, hosted: &HostedNamespace, group: &Group) -> Option<String> {
        if let Some(reason) = hosted.engine.stop_writes_reason() {
            return Some(reason);
        }
        let health = self.peer_health.lock().unwrap();
        let stopped: Vec<(NodeId, &String)> = health
            .iter()
            .filter(|(_, h)| h.received.elapsed() < HEALTH_FORGET)
            .filter_map(|(id, h)| h.stop_writes.get(namespace).map(|reason| (*id, reason)))
            .collect();
        if stopped.is_empty() {
            return None;
        }
        let metrics = group.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        stopped.into_iter().find(|(id, _)| membership.get_node(id).is_some()).map(|(id, reason)| format!("replica node {id} of this group: {reason}"))
    }

    /// Whether `group` is dead: it has no leader, and so many of its voters lost their copy
    /// (this replica as it knows, the others as their last health reports say) that the rest
    /// cannot make a quorum. The replicas that lost their copy do not vote until they caught up
    /// from a leader (see `rejoin`), and no leader can be elected without them: only
    /// `chunkctl revive` brings such a group back (see `revive`).
    fn is_dead(&self, namespace: &str, id: u32, group: &Group) -> bool {
        let metrics = group.raft.metrics();
        let metrics = metrics.borrow();
        if metrics.current_leader.is_some() {
            return false;
        }
        let mut voters: Vec<NodeId> = metrics.membership_config.membership().voter_ids().collect();
        if voters.is_empty() {
            // A replica that lost its copy knows no membership yet: the metadata's placement.
            let placed = self.joined.get().and_then(|j| j.cluster.read().unwrap().namespace(namespace).and_then(|ns| ns.placement.get(id as usize).cloned()));
            voters = placed.unwrap_or_default();
        }
        let lost = self.lost_among(&voters, &(namespace.to_owned(), id), group.rejoin.is_active());
        lost_quorum(voters.len(), lost.len())
    }

    /// Those of `voters` that lost their copy of group `key`: this node if `me_lost`, the
    /// others as their last health reports say.
    fn lost_among(&self, voters: &[NodeId], key: &(String, u32), me_lost: bool) -> Vec<NodeId> {
        let me = self.config.node_id;
        let health = self.peer_health.lock().unwrap();
        voters
            .iter()
            .copied()
            .filter(|voter| match *voter == me {
                true => me_lost,
                false => health.get(voter).is_some_and(|h| h.received.elapsed() < HEALTH_FORGET && h.lost.contains(key)),
            })
            .collect()
    }

    /// Whether node `id` is this node or lately answered this node's health report (sent once
    /// a second): a node that did not is likely paused, down or cut off, in either direction.
    fn answered_lately(&self, id: NodeId) -> bool {
        self.answering_for(id).is_some()
    }

    /// How long node `id` has been answering this node's health reports without a gap (None
    /// if it has not answered lately; the longest time for this node itself).
    fn answering_for(&self, id: NodeId) -> Option<Duration> {
        if id == self.config.node_id {
            return Some(Duration::MAX);
        }
        let answering = *self.peer_answered.lock().unwrap().get(&id)?;
        (answering.last.elapsed() < 2 * HEALTH_REFRESH).then(|| answering.since.elapsed())
    }

    /// The groups whose replica here lost its copy and catches up.
    fn lost_copies(&self) -> Vec<(String, u32)> {
        let mut lost = Vec::new();
        for (name, hosted) in self.namespaces().into_iter().flatten() {
            lost.extend(hosted.groups().into_iter().filter(|(_, group)| group.rejoin.is_active()).map(|(g, _)| (name.clone(), g)));
        }
        if self.meta.get().is_some_and(|m| m.rejoin.is_active()) {
            lost.push((META_NAMESPACE.to_owned(), 0));
        }
        lost.sort_unstable();
        lost
    }

    fn note_health(&self, node: NodeId, stop_writes: Vec<(String, String)>, lost: Vec<(String, u32)>) -> Response {
        if node == self.config.node_id || self.peers.get(&node).is_none() {
            return Response::Error(ErrorReply::BadRequest(format!("health report from node {node}, which is not a peer of this node")));
        }
        let stop_writes: HashMap<String, String> = stop_writes.into_iter().collect();
        let mut health = self.peer_health.lock().unwrap();
        let was_stopped: Vec<String> = health.get(&node).map(|h| h.stop_writes.keys().cloned().collect()).unwrap_or_default();
        for (namespace, reason) in &stop_writes {
            if !was_stopped.contains(namespace) {
                tracing::warn!(peer = node, namespace, reason, "a peer is in stop-writes: new writes to the groups it replicates are refused");
            }
        }
        for namespace in was_stopped.iter().filter(|ns| !stop_writes.contains_key(*ns)) {
            tracing::info!(peer = node, namespace, "a peer left stop-writes");
        }
        let lost = lost.into_iter().collect();
        health.insert(node, PeerHealth { stop_writes, lost, received: std::time::Instant::now() });
        Response::Noted
    }

    /// The namespaces where this node's engine refuses new writes, with the reason.
    fn own_stop_writes(&self) -> Vec<(String, String)> {
        let mut stopped: Vec<(String, String)> = self
            .namespaces()
            .into_iter()
            .flatten()
            .filter_map(|(name, hosted)| hosted.engine.stop_writes_reason().map(|reason| (name.clone(), reason)))
            .collect();
        stopped.sort();
        stopped
    }

    fn cluster_map(&self) -> ClusterMap {
        let Some(joined) = self.joined.get() else { return ClusterMap::default() };
        let cluster = joined.cluster.read().unwrap().clone();
        let preferred = cluster.preferred_leaders();
        let namespaces: Vec<NamespaceMap> = cluster
            .namespaces
            .iter()
            .filter_map(|info| {
                let hosted = joined.namespaces.get(&info.name)?;
                let leaders = (0..info.groups)
                    .map(|g| match hosted.group(g) {
                        Some(group) if self.out_of_touch(&group) => None,
                        Some(group) => group.raft.metrics().borrow().current_leader,
                        None => preferred.get(&info.name).and_then(|p| p.get(g as usize)).copied(),
                    })
                    .collect();
                let local = hosted.groups();
                let lost = local.iter().filter(|(_, group)| group.rejoin.is_active()).map(|(g, _)| *g).collect();
                let dead = local.iter().filter(|(g, group)| self.is_dead(&info.name, *g, group)).map(|(g, _)| *g).collect();
                Some(NamespaceMap {
                    name: info.name.clone(),
                    groups: info.groups,
                    replication_factor: info.replication_factor,
                    leaders,
                    replicas: info.placement.clone(),
                    lost,
                    dead,
                })
            })
            .collect();
        let nodes = cluster.nodes.iter().map(|n| (n.id, n.client.clone())).collect();
        let metadata_voters = cluster.metadata_voters.clone();
        let metadata_leader = self.meta_raft().and_then(|raft| {
            let metrics = raft.metrics().borrow().clone();
            metrics.current_leader.filter(|_| !self.leads_out_of_touch(&metrics))
        });
        let (metadata_lost, metadata_dead) = self.metadata_lost();
        ClusterMap { nodes, now_ms: crate::engine::SystemClock.now_ms(), namespaces, metadata_voters, metadata_leader, metadata_lost, metadata_dead }
    }

    /// The cluster metadata, confirmed by the metadata group's leader with a quorum (so a node
    /// that learns it never gets a stale copy); others answer NotLeader.
    async fn handle_cluster_meta(&self) -> Response {
        let Some(raft) = self.meta_raft() else { return Response::Error(ErrorReply::NotLeader { leader: None }) };
        match self.while_in_touch(raft.metrics(), raft.ensure_linearizable()).await {
            Some(Ok(_)) => {
                let (cluster, applied) = self.meta_state.cluster_applied();
                Response::ClusterMeta { cluster, applied }
            }
            Some(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward)))) => {
                Response::Error(ErrorReply::NotLeader { leader: forward.leader_id })
            }
            Some(Err(_)) | None => Response::Error(ErrorReply::PartitionUnavailable),
        }
    }

    async fn handle_meta_raft(&self, group: u32, message: &[u8]) -> Response {
        match self.meta.get() {
            Some(meta) if group == 0 => {
                // The metadata group's messages are few: decoding one twice costs nothing. A
                // leader's message counts if its term is not behind this member's (a deposed
                // leader's is refused).
                let vote = match decode_rpc::<crate::meta::MetaTypeConfig>(message) {
                    Ok(RaftRpc::AppendEntries(request)) => Some(request.vote),
                    Ok(RaftRpc::InstallSnapshot(request)) => Some(request.vote),
                    _ => None,
                };
                if vote.is_some_and(|vote| vote >= meta.raft.metrics().borrow().vote) {
                    self.note_metadata_leader_message();
                }
                serve_replica(&meta.raft, &meta.rejoin, message).await
            }
            _ => Response::Error(ErrorReply::BadRequest("this node is not a voter of the metadata group".into())),
        }
    }

    async fn handle_raft(&self, namespace: &str, group: u32, message: &[u8]) -> Response {
        let Some(group) = self.namespaces().and_then(|n| n.get(namespace)).and_then(|h| h.group(group)) else {
            return Response::Error(ErrorReply::BadRequest(format!("this node does not replicate {namespace}/{group}")));
        };
        serve_replica(&group.raft, &group.rejoin, message).await
    }
}

/// Hands a Raft message from a peer to this node's replica, `raft`. While the replica catches
/// up after losing its copy (`rejoin`), no vote is granted (but the revived survivor's, see
/// `revive`), and a leader's commit index is noted.
async fn serve_replica<C: raft_network::NetworkTypes>(raft: &openraft::Raft<C>, rejoin: &rejoin::Rejoin, message: &[u8]) -> Response {
    if !rejoin.is_active() {
        return serve_raft(raft, message).await;
    }
    let rpc = match decode_rpc(message) {
        Ok(rpc) => rpc,
        Err(reply) => return Response::Error(reply),
    };
    match &rpc {
        RaftRpc::Vote(request) if !rejoin.allows(request) => {
            let current = raft.metrics().borrow().vote;
            return encode_reply(&RaftReply::Vote(Ok(rejoin::Rejoin::refusal(&current))));
        }
        RaftRpc::Vote(_) => {}
        RaftRpc::AppendEntries(request) => rejoin.observe(request),
        RaftRpc::InstallSnapshot(_) => {}
    }
    serve_rpc(raft, rpc).await
}

/// openraft checks its snapshot policy only when entries are applied, and skips the check while
/// a snapshot is being built: an entry applied then would stay in the log (pinning its WAL
/// segment) until the next metadata change. Once a second, a metadata group whose snapshot is
/// behind its applied point builds one (openraft then purges the log). Ends when the group stops.
async fn keep_metadata_log_short(raft: MetaRaft) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let metrics = raft.metrics().borrow().clone();
        if metrics.running_state.is_err() {
            return;
        }
        if metrics.snapshot.map(|l| l.index) < metrics.last_applied.map(|l| l.index) && raft.trigger().snapshot().await.is_err() {
            return;
        }
    }
}

/// The node's health loop, every `HEALTH_POLL`: lets only the replicas that `may_campaign`
/// start elections, and tells the peers whether this node is in stop-writes, at once
/// when that changes and once a second regardless (a peer that restarted learns it again).
/// Group leaders refuse new writes while any replica of the group is in stop-writes. Ends when
/// the node stops.
async fn report_health(node: std::sync::Weak<Node>) {
    #[allow(clippy::type_complexity)]
    let mut sent: Option<(Vec<(String, String)>, Vec<(String, u32)>, std::time::Instant)> = None;
    let mut not_campaigning: Vec<(String, u32)> = Vec::new();
    loop {
        tokio::time::sleep(HEALTH_POLL).await;
        let Some(node) = node.upgrade() else { return };
        if node.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        // Which replicas may campaign (`may_campaign`). (openraft 0.9 cannot make a leader
        // step down: one that fills while leading keeps leading, refusing writes with
        // StopWrites, until room frees up.) A replica catching up after its copy was lost votes
        // again once its log durably reaches the commit index a leader reported in its own term.
        let mut held_back = Vec::new();
        for (name, hosted) in node.namespaces().into_iter().flatten() {
            for (id, group) in hosted.groups() {
                let campaign = node.may_campaign(&group);
                group.raft.runtime_config().elect(campaign);
                if !campaign {
                    held_back.push((name.clone(), id));
                }
                node.finish_rejoin_once_caught_up(name, id, group.wal_group, &group.rejoin).await;
            }
        }
        if let Some(meta) = node.meta.get() {
            let campaign = node.may_campaign_for_metadata(meta);
            meta.raft.runtime_config().elect(campaign);
            if !campaign {
                held_back.push((META_NAMESPACE.to_owned(), 0));
            }
            node.finish_rejoin_once_caught_up(META_NAMESPACE, 0, META_WAL_GROUP, &meta.rejoin).await;
        }
        if held_back != not_campaigning {
            let heard: Vec<NodeId> = node.peers.all().into_iter().map(|(id, _)| id).filter(|id| node.answered_lately(*id)).collect();
            tracing::info!(groups = ?held_back, answered = ?heard, "replicas that do not campaign changed");
            not_campaigning = held_back;
        }
        let stop_writes = node.own_stop_writes();
        let lost = node.lost_copies();
        let due = match &sent {
            None => true,
            Some((last, last_lost, at)) => *last != stop_writes || *last_lost != lost || at.elapsed() >= HEALTH_REFRESH,
        };
        if !due {
            continue;
        }
        let me = node.config.node_id;
        let request = Request::NodeHealth { node: me, stop_writes: stop_writes.clone(), lost: lost.clone() };
        for (id, peer) in node.peers.all().into_iter().filter(|(id, _)| *id != me) {
            let (peer, request, weak) = (peer.clone(), request.clone(), Arc::downgrade(&node));
            tokio::spawn(async move {
                // Any answer (even a refusal from a peer that does not know this node yet)
                // was a round trip.
                if peer.call(&request, HEALTH_REFRESH).await.is_ok() {
                    if let Some(node) = weak.upgrade() {
                        let now = std::time::Instant::now();
                        let mut answered = node.peer_answered.lock().unwrap();
                        let answering = answered.entry(id).or_insert(Answering { since: now, last: now });
                        if answering.last.elapsed() >= 2 * HEALTH_REFRESH {
                            answering.since = now;
                        }
                        answering.last = now;
                    }
                }
            });
        }
        sent = Some((stop_writes, lost, std::time::Instant::now()));
    }
}

impl Node {
    /// Ends `rejoin` (the replica votes again) once its log durably reaches the commit index a
    /// leader reported in its own term.
    async fn finish_rejoin_once_caught_up(&self, namespace: &str, group: u32, wal_group: u32, rejoin: &rejoin::Rejoin) {
        let Some(target) = rejoin.target().filter(|_| rejoin.is_active()) else { return };
        if self.wal.log_state(wal_group).last.is_some_and(|(index, _)| index >= target)
            && crate::raft::log_store::append_durable(&self.wal, wal_group, Vec::new()).await.is_ok()
        {
            rejoin.finish();
            tracing::warn!(namespace, group, index = target, "caught up from the group's leader: this replica votes again");
        }
    }
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

/// Whether a group of `voters` replicas, `lost` of which lost their copy (and do not vote), is
/// dead: the others cannot make a quorum. A group with no voters (not initialized) is not.
fn lost_quorum(voters: usize, lost: usize) -> bool {
    lost > 0 && voters - lost < voters / 2 + 1
}

/// Hands a Raft message from a peer to `raft` and encodes its reply.
async fn serve_raft<C: raft_network::NetworkTypes>(raft: &openraft::Raft<C>, message: &[u8]) -> Response {
    match decode_rpc(message) {
        Ok(rpc) => serve_rpc(raft, rpc).await,
        Err(reply) => Response::Error(reply),
    }
}

fn decode_rpc<C: raft_network::NetworkTypes>(message: &[u8]) -> Result<RaftRpc<C>, ErrorReply> {
    bincode::deserialize(message).map_err(|err| ErrorReply::BadRequest(format!("malformed raft message: {err}")))
}

async fn serve_rpc<C: raft_network::NetworkTypes>(raft: &openraft::Raft<C>, rpc: RaftRpc<C>) -> Response {
    let reply = match rpc {
        RaftRpc::AppendEntries(request) => RaftReply::AppendEntries(raft.append_entries(request).await),
        RaftRpc::Vote(request) => RaftReply::Vote(raft.vote(request).await),
        RaftRpc::InstallSnapshot(request) => RaftReply::InstallSnapshot(raft.install_snapshot(request).await),
    };
    encode_reply(&reply)
}

fn encode_reply(reply: &RaftReply) -> Response {
    Response::Raft { message: bincode::serialize(reply).expect("raft replies serialize") }
}

impl transport::Handler for Node {
    async fn handle(&self, request: Request) -> Response {
        Node::handle(self, request).await
    }
}

/// The namespace's devices, each behind a `PowerLossDevice` (the `test-power-loss-devices` hook).
fn power_loss_devices(engine: &NamespaceConfig) -> Result<Vec<Arc<dyn crate::device::Device>>, NodeError> {
    let mut devices: Vec<Arc<dyn crate::device::Device>> = Vec::new();
    for device in &engine.devices {
        let (file, _created) = crate::device::FileDevice::open_or_create(&device.path, device.size)?;
        devices.push(Arc::new(crate::device::PowerLossDevice::new(Arc::new(file), rand::random())));
    }
    Ok(devices)
}

/// A namespace's WAL group ids are `prefix << 12 | group`, the prefix taken from a hash of the
/// name (so that it does not depend on the order of namespaces in the configuration; start-up
/// refuses two namespaces with the same prefix).
fn wal_prefix(namespace: &str) -> u32 {
    crc32fast::hash(namespace.as_bytes()) & 0xF_FFFF
}

/// The WAL group id of `namespace`'s Raft group `group`.
fn namespace_wal_group(namespace: &str, group: u32) -> u32 {
    wal_prefix(namespace) << 12 | group
}

fn failure_reply(failure: WriteFailure) -> ErrorReply {
    match failure {
        WriteFailure::GenerationMismatch { expected, actual } => ErrorReply::GenerationMismatch { expected, actual },
        WriteFailure::RecordExists => ErrorReply::RecordExists,
        WriteFailure::RecordNotFound => ErrorReply::RecordNotFound,
        WriteFailure::RecordTooBig { size_bytes, limit_bytes } => ErrorReply::RecordTooBig { size_bytes, limit_bytes },
        WriteFailure::IncompatibleBin { bin, reason } => ErrorReply::IncompatibleBin { bin, reason },
        WriteFailure::BadRequest(what) => ErrorReply::BadRequest(what),
        WriteFailure::SessionExpired { session } => ErrorReply::SessionExpired { session },
        WriteFailure::LockHeld { holder } => ErrorReply::LockHeld { holder },
        WriteFailure::LockNotHeld { holder } => ErrorReply::LockNotHeld { holder },
        WriteFailure::RangeLockHeld(held) => ErrorReply::RangeLockHeld(held),
    }
}

/// A batch's records must all be in the request key's group, the first of them being that key.
fn batch_fits(writes: &[crate::BatchWrite], key: &crate::Key, group: u32, groups: u32) -> Result<(), ErrorReply> {
    if writes.first().map(|w| &w.key) != Some(key) {
        return Err(ErrorReply::BadRequest("a batch's request key is its first write's key".into()));
    }
    match writes.iter().find(|w| group_of(&w.key.digest, groups) != group) {
        Some(stray) => Err(ErrorReply::BadRequest(format!(
            "a batch writes records of one group: {:?} is in group {}, not {group}",
            stray.key,
            group_of(&stray.key.digest, groups)
        ))),
        None => Ok(()),
    }
}

/// `len` bytes at `offset` of the record's bytes bin `bin` (fewer past its end, none past it):
/// what a ranged read answers instead of the whole bin. A bin of another type is left whole.
fn bytes_range(mut record: crate::Record, bin: &str, offset: u64, len: u32) -> crate::Record {
    for b in record.bins.iter_mut().filter(|b| b.name == bin) {
        if let crate::Value::Bytes(bytes) = &mut b.value {
            let start = (offset.min(bytes.len() as u64)) as usize;
            let end = (offset.saturating_add(len as u64).min(bytes.len() as u64)) as usize;
            bytes.truncate(end);
            bytes.drain(..start);
        }
    }
    record
}
