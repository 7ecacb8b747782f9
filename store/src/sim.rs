//! Clusters in one process: nodes of the production code on memory disks (`MemStorage`) over
//! the in-memory network (`MemNetwork`), driven by a test or `chunkcheck sim`: power cuts of one
//! node or of all at once, wiped disks, failed fsyncs, wall clocks that jump, restarts on what the cut left,
//! partitions, lost, duplicated and delayed (so reordered) messages.
//!
//! The nodes run on the caller's tokio runtime (and the WAL's and engines' own threads), so a
//! seed fixes the network's draws and the caller's schedule, not the interleaving of the nodes'
//! tasks: a failing seed replays the same faults, not the same run.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{DeviceConfig, NamespaceConfig};
use crate::engine::{Clock, SystemClock};
use crate::node::network::{MemNetwork, Network};
use crate::node::storage::MemStorage;
use crate::node::{NamespaceSpec, Node, NodeConfig, NodeEnv, NodeError};
use crate::protocol::{ErrorReply, Request, Response};

/// The namespace every simulated cluster has.
pub const SIM_NAMESPACE: &str = "test";

/// The shape of a simulated cluster.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub nodes: u64,
    pub groups: u32,
    pub replication_factor: usize,
    /// Seeds the network's draws (losses, duplicates, delays).
    pub seed: u64,
    /// Each node's engine device, in memory.
    pub device_bytes: u64,
    /// UNSAFE (negative controls): the nodes' WALs never fdatasync.
    pub unsafe_wal_skip_fsync: bool,
    /// UNSAFE (negative controls): the exactly-once table is off.
    pub unsafe_skip_dedup: bool,
    /// UNSAFE (negative controls): leaders answer linearizable reads without checking that
    /// they still lead.
    pub unsafe_unchecked_reads: bool,
    /// UNSAFE (negative controls): a wiped replica votes at once, without catching up first.
    pub unsafe_wiped_replica_votes: bool,
    /// UNSAFE (negative controls): the WALs take a failed fdatasync for a success.
    pub unsafe_wal_ignore_sync_errors: bool,
}

impl Default for SimOptions {
    fn default() -> SimOptions {
        SimOptions {
            nodes: 3,
            groups: 4,
            replication_factor: 3,
            seed: 0,
            device_bytes: 32 << 20,
            unsafe_wal_skip_fsync: false,
            unsafe_skip_dedup: false,
            unsafe_unchecked_reads: false,
            unsafe_wiped_replica_votes: false,
            unsafe_wal_ignore_sync_errors: false,
        }
    }
}

/// A cluster in one process (see the module's notes).
pub struct SimCluster {
    /// Where the nodes keep what is not on their memory disks (markers, Raft snapshots).
    dir: PathBuf,
    pub net: MemNetwork,
    options: SimOptions,
    /// (id, address) of every node.
    nodes: Vec<(u64, String)>,
    storages: Vec<Arc<MemStorage>>,
    running: Vec<Option<Arc<Node>>>,
    /// Nodes wiped that may not have caught up yet (`disks_lost`).
    wiped: std::collections::BTreeSet<usize>,
    /// Each node's wall clock (`jump_clock`), kept across its lives.
    clocks: Vec<Arc<SimClock>>,
}

/// A node's wall clock: the system's, moved by the jumps a test makes (`SimCluster::jump_clock`).
/// Monotonic time (timeouts, elections, leases) is tokio's and does not jump.
#[derive(Default)]
pub struct SimClock {
    offset_ms: AtomicI64,
}

impl SimClock {
    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::SeqCst)
    }
}

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        SystemClock.now_ms().saturating_add_signed(self.offset_ms())
    }
}

impl SimCluster {
    /// A cluster of `options.nodes` nodes, none started; `dir` must exist and be empty.
    pub fn new(dir: PathBuf, options: SimOptions) -> SimCluster {
        let nodes: Vec<(u64, String)> = (1..=options.nodes).map(|id| (id, format!("node{id}"))).collect();
        SimCluster {
            dir,
            net: MemNetwork::new(options.seed),
            storages: nodes.iter().map(|(_, address)| Arc::new(MemStorage::new(address))).collect(),
            running: nodes.iter().map(|_| None).collect(),
            wiped: Default::default(),
            clocks: nodes.iter().map(|_| Arc::new(SimClock::default())).collect(),
            nodes,
            options,
        }
    }

    /// Node addresses, in id order.
    pub fn addresses(&self) -> Vec<String> {
        self.nodes.iter().map(|(_, address)| address.clone()).collect()
    }

    pub fn is_running(&self, index: usize) -> bool {
        self.running[index].is_some()
    }

    /// The configuration of node `index` (0-based).
    pub fn node_config(&self, index: usize) -> NodeConfig {
        let (id, _) = self.nodes[index];
        let data_dir = self.dir.join(format!("node{id}"));
        let engine = NamespaceConfig {
            write_block_size: 64 * 1024,
            commit_to_device: false,
            flush_max_ms: 50,
            ..NamespaceConfig::new(SIM_NAMESPACE, vec![DeviceConfig { path: data_dir.join("test.dat"), size: Some(self.options.device_bytes) }])
        };
        NodeConfig {
            peer_source: None,
            node_id: id,
            nodes: self.nodes.clone(),
            client_addresses: self.nodes.clone(),
            racks: Vec::new(),
            seeds: Vec::new(),
            data_dir,
            namespaces: vec![NamespaceSpec { engine, replication_factor: self.options.replication_factor, groups: self.options.groups }],
            heartbeat_ms: 50,
            election_timeout_ms: (300, 600),
            request_timeout: Duration::from_secs(5),
            snapshot_after_entries: 5000,
            entries_kept_after_snapshot: 1000,
            unsafe_skip_dedup: self.options.unsafe_skip_dedup,
            unsafe_unchecked_reads: self.options.unsafe_unchecked_reads,
            unsafe_serve_damaged: false,
            test_power_loss_devices: false,
            test_crash_while_leaving: false,
            balance_leaders: true,
            unsafe_skip_fencing: false,
            unsafe_wal_torn_tail_rule: false,
            unsafe_wiped_replica_votes: self.options.unsafe_wiped_replica_votes,
            unsafe_wal_ignore_sync_errors: self.options.unsafe_wal_ignore_sync_errors,
            wal_zero_fill: true,
            // Small segments: every node's are in memory, and each start begins a new one.
            wal_segment_bytes: 1 << 20,
            unsafe_wal_skip_fsync: self.options.unsafe_wal_skip_fsync,
        }
    }

    /// Starts node `index` on its disks as the last power cut left them; it joins the cluster
    /// in the background.
    pub async fn start(&mut self, index: usize) -> Result<(), NodeError> {
        let config = self.node_config(index);
        std::fs::create_dir_all(&config.data_dir).map_err(|e| NodeError::Config(format!("{}: {e}", config.data_dir.display())))?;
        let address = self.nodes[index].1.clone();
        let env = NodeEnv { clock: self.clocks[index].clone(), network: self.net.of(&address), storage: Some(self.storages[index].clone()) };
        let node = Node::start_in(config, env).await?;
        self.net.serve_node(&address, &node);
        let joining = node.clone();
        tokio::spawn(async move {
            if let Err(err) = joining.join().await {
                tracing::warn!(%err, "a simulated node did not join");
            }
        });
        self.running[index] = Some(node);
        Ok(())
    }

    pub async fn start_all(&mut self) -> Result<(), NodeError> {
        for index in 0..self.nodes.len() {
            if !self.is_running(index) {
                self.start(index).await?;
            }
        }
        Ok(())
    }

    /// Cuts the power of the nodes `indexes`, all at the same moment: their unsynced writes are
    /// lost (some torn through), their network lives end, and they stop.
    pub async fn power_cut(&mut self, indexes: &[usize]) {
        let mut stopped = Vec::new();
        for &index in indexes {
            if let Some(node) = self.running[index].take() {
                self.net.unlisten(&self.nodes[index].1);
                self.storages[index].power_cut();
                stopped.push(node);
            }
        }
        // Shut down side by side: each may wait for its writes in flight, and a node whose
        // power is off must not go on answering while another waits.
        let shutdowns: Vec<_> = stopped.into_iter().map(|node| tokio::spawn(async move { node.shutdown().await })).collect();
        for shutdown in shutdowns {
            let _ = shutdown.await;
        }
    }

    /// Node `index` loses its disks: its power is cut, then its WAL, engine devices and data
    /// directory (markers, snapshots) are replaced by empty ones. `start` brings it back empty.
    /// The cluster's promise covers one replica's disks lost at a time: `disks_lost` says
    /// whether an earlier wipe is still catching up.
    pub async fn wipe(&mut self, index: usize) {
        self.power_cut(&[index]).await;
        let (id, address) = &self.nodes[index];
        self.storages[index] = Arc::new(MemStorage::new(address));
        let data_dir = self.dir.join(format!("node{id}"));
        if let Err(err) = std::fs::remove_dir_all(&data_dir) {
            if err.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(%err, dir = %data_dir.display(), "could not wipe a simulated node's data directory");
            }
        }
        self.wiped.insert(index);
    }

    /// The nodes wiped that have not caught up yet (not running, not joined, or a replica of
    /// theirs still catching up).
    pub fn disks_lost(&mut self) -> Vec<usize> {
        let running = &self.running;
        self.wiped.retain(|index| !running[*index].as_ref().is_some_and(|node| node.caught_up()));
        self.wiped.iter().copied().collect()
    }

    /// Node `index`'s disks fail: every later fdatasync of its WAL and engine devices answers
    /// EIO (the writes it was to make durable dropped) until its power is cut.
    pub fn fail_syncs(&self, index: usize) {
        self.storages[index].fail_syncs();
    }

    /// Moves node `index`'s wall clock by `delta_ms` (back when negative), as an operator or a
    /// bad time source would; it stays moved across restarts.
    pub fn jump_clock(&self, index: usize, delta_ms: i64) {
        self.clocks[index].offset_ms.fetch_add(delta_ms, Ordering::SeqCst);
    }

    /// A client outside the nodes.
    pub fn client(&self) -> SimClient {
        SimClient { network: self.net.of("client"), nodes: self.nodes.len() as u64 }
    }

    /// Stops every running node (cleanly).
    pub async fn shutdown(&mut self) {
        for node in self.running.iter_mut().filter_map(Option::take) {
            node.shutdown().await;
        }
    }
}

/// A client of a `SimCluster`, outside its nodes (it needs no access to the cluster, so power
/// cuts can happen with its requests in flight).
#[derive(Clone)]
pub struct SimClient {
    /// The network as the client sees it.
    pub network: Arc<dyn Network>,
    nodes: u64,
}

impl SimClient {
    /// Sends `request` to node `first` (an index, taken modulo the number of nodes) and on,
    /// following NotLeader hints and trying the next node after an error or a lost message,
    /// until `patience` runs out (`None`). Write tags make the retries exactly-once.
    pub async fn call_leader(&self, first: usize, request: &Request, patience: Duration) -> Option<Response> {
        if self.nodes == 0 {
            return None;
        }
        let deadline = tokio::time::Instant::now() + patience;
        let mut node = first as u64 % self.nodes + 1;
        while tokio::time::Instant::now() < deadline {
            match self.network.link(&format!("node{node}")).call(request, Duration::from_secs(1)).await {
                Ok(Response::Error(ErrorReply::NotLeader { leader: Some(leader) })) if leader != node && leader <= self.nodes => node = leader,
                Ok(Response::Error(_)) | Err(_) => {
                    node = node % self.nodes + 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(other) => return Some(other),
            }
        }
        None
    }
}
