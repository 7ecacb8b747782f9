//! `chunkd`'s configuration file (TOML), and `NodeConfig`, the node it describes (what `load`
//! turns it into). Every field, its default and unit; `load` validates and
//! says which field is wrong.
//!
//! ```toml
//! node-id = 1
//! client-listen = "127.0.0.1:7401"   # clients connect here
//! peer-listen = "127.0.0.1:7501"     # other nodes connect here (Raft); when it names an
//!                                    # address (not 0.0.0.0 or ::), this node's connections
//!                                    # to its peers leave from that address too
//! metrics-listen = "127.0.0.1:9401"  # optional: Prometheus metrics on HTTP GET /metrics
//! data-dir = "/var/lib/chunkstore"   # WAL, snapshots and, by default, namespace devices
//! heartbeat-ms = 100                 # Raft heartbeat; default 100
//! election-timeout-ms = [800, 1600]  # Raft election timeout range; default [800, 1600]
//! request-timeout-ms = 5000          # a request not done by then is answered Timeout; default 5000
//! snapshot-after-entries = 5000      # log entries between a group's snapshots; default 5000
//! entries-kept-after-snapshot = 1000 # log kept behind a snapshot; default 1000
//! balance-leaders = true             # hand groups to their preferred leaders; default true
//! wal-zero-fill = true               # WAL segments written with zeros ahead; default true
//! wal-segment-bytes = 67108864       # WAL segment size, 1 MiB..=1 GiB; default 64 MiB
//!
//! seeds = ["10.0.0.1:7501"]          # peers asked for the cluster metadata; default: the
//!                                    # metadata voters' peer addresses from [[nodes]]
//!
//! [[nodes]]                          # every node of the cluster: bootstraps the cluster
//! id = 1                             # metadata on first start, and must agree with it after
//! client = "127.0.0.1:7401"          # (the lowest 5 ids are the metadata group's voters)
//! peer = "127.0.0.1:7501"
//! rack = "a"                         # optional: replicas of a group go to distinct racks
//!
//! [[namespaces]]
//! name = "test"
//! replication-factor = 3             # default 3 (at most the number of nodes)
//! groups = 16                        # Raft groups, a power of two; default 16
//! device-size = 268435456            # bytes of the default device DATA-DIR/NAME.dat; default 256 MiB
//! [namespaces.storage]               # optional engine settings (see NamespaceConfig)
//! write-block-size = 1048576
//! ```
//!
//! Options whose name starts with `unsafe-` break a guarantee on purpose; they exist for the
//! negative controls of the test suite and chunkd logs a warning when one is set. Options
//! whose name starts with `test-` are hooks for tests (power cuts, crashes at chosen points);
//! chunkd logs a warning for them too.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::raft::NodeId;
use crate::{DeviceConfig, NamespaceConfig};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ChunkdConfig {
    pub node_id: u64,
    pub client_listen: String,
    pub peer_listen: String,
    /// Where Prometheus scrapes this node's metrics (HTTP `GET /metrics`). Default: none.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    pub data_dir: PathBuf,
    pub nodes: Vec<NodeAddress>,
    /// Peer addresses asked for the cluster metadata by a node that is not one of the
    /// metadata group's voters. Default: the voters' peer addresses from `nodes`.
    #[serde(default)]
    pub seeds: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<NamespaceToml>,
    /// Raft heartbeat, milliseconds. Default 100.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Raft election timeout range, milliseconds. Default [800, 1600].
    #[serde(default = "default_election_timeout_ms")]
    pub election_timeout_ms: [u64; 2],
    /// A request not done in this time is answered Timeout. Milliseconds, default 5000.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// A group builds a snapshot (and may then drop its log up to it) after this many log
    /// entries since its last one. Default 5000.
    #[serde(default = "default_snapshot_after_entries")]
    pub snapshot_after_entries: u64,
    /// Log entries kept behind a snapshot, so a replica slightly behind catches up from the log
    /// rather than a whole snapshot. Default 1000.
    #[serde(default = "default_entries_kept_after_snapshot")]
    pub entries_kept_after_snapshot: u64,
    /// UNSAFE, for negative controls in tests only: retried writes are applied again instead
    /// of being answered from the exactly-once table. Default false.
    #[serde(default)]
    pub unsafe_skip_dedup: bool,
    /// UNSAFE (negative controls only): writes in a lease session are applied even after the
    /// session was fenced (its lease ran out). Default false.
    #[serde(default)]
    pub unsafe_skip_fencing: bool,
    /// UNSAFE (negative controls only): linearizable reads are answered from whichever replica
    /// gets them, with no check that it still leads. Default false.
    #[serde(default)]
    pub unsafe_unchecked_reads: bool,
    /// UNSAFE (negative controls only): a namespace whose engine scan found damaged blocks is
    /// served as it is instead of being rebuilt from peers first. Default false.
    #[serde(default)]
    pub unsafe_serve_damaged: bool,
    /// WAL segments are written with zeros over their whole length when they are prepared,
    /// off the write path, so that each flush's fdatasync need not also commit an extent change
    /// (store/WAL.md). Default true; false only allocates them (for comparisons).
    #[serde(default = "default_true")]
    pub wal_zero_fill: bool,
    /// A new WAL segment is started once the current one holds this many bytes (each is
    /// preallocated to this size). 1 MiB to 1 GiB; default 64 MiB.
    #[serde(default = "default_wal_segment_bytes")]
    pub wal_segment_bytes: u64,
    /// UNSAFE (negative controls only): the WAL never fdatasyncs, so an append is acknowledged
    /// before it is durable and a power cut loses it. Default false.
    #[serde(default)]
    pub unsafe_wal_skip_fsync: bool,
    /// UNSAFE (negative controls only): the WAL takes a failed fdatasync for a success and
    /// acknowledges the appends it could not make durable. Default false.
    #[serde(default)]
    pub unsafe_wal_ignore_sync_errors: bool,
    /// UNSAFE (negative controls only): a replica whose log of a group is empty (its disks
    /// wiped) while the group lived on votes at once, like a new one, instead of catching up
    /// first: the bug `rejoin` fixed. Default false.
    #[serde(default)]
    pub unsafe_wiped_replica_votes: bool,
    /// UNSAFE (negative controls only): WAL recovery takes any invalid record in the newest
    /// segment for a torn tail and cuts the log there, even with records of later (synced)
    /// flushes after it: the rule before WAL format version 3. Default false.
    #[serde(default)]
    pub unsafe_wal_torn_tail_rule: bool,
    /// Test hook (chunkcheck's disk nemesis turns it on): the engine's devices and the WAL's
    /// segments keep writes in memory until they are synced, letting a random part of them
    /// through early, so that a SIGKILL loses what a power cut could. Safe, but it costs memory
    /// and speed. Default false.
    #[serde(default)]
    pub test_power_loss_devices: bool,
    /// Test hook (the crash-window test of `roster.rs`): the process aborts when a group moves
    /// away, after its replica here stopped and before it is forgotten, as a crash there would
    /// leave it. Default false.
    #[serde(default)]
    pub test_crash_while_leaving: bool,
    /// Hand each group to its preferred leader (spread evenly over the nodes) once that replica
    /// is up and caught up, so leadership comes back to a node after it restarts. Default true.
    #[serde(default = "default_true")]
    pub balance_leaders: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NodeAddress {
    pub id: u64,
    pub client: String,
    pub peer: String,
    /// The node's rack (or zone): a group's replicas go to distinct racks where there are
    /// enough. Default: none (the node is a rack of its own).
    #[serde(default)]
    pub rack: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NamespaceToml {
    pub name: String,
    #[serde(default = "default_replication_factor")]
    pub replication_factor: usize,
    #[serde(default = "default_groups")]
    pub groups: u32,
    /// Size of the default device, bytes (used when `storage.devices` is empty). Default 256 MiB.
    #[serde(default = "default_device_size")]
    pub device_size: u64,
    /// Engine settings; `name` comes from above. Under Raft, commit-to-device defaults to false:
    /// the WAL makes writes durable, the engine flushes lazily.
    #[serde(default)]
    pub storage: Option<toml::Value>,
}

/// Bounds of `wal-segment-bytes`.
pub const WAL_SEGMENT_BYTES_MIN: u64 = 1 << 20;
pub const WAL_SEGMENT_BYTES_MAX: u64 = 1 << 30;

fn default_wal_segment_bytes() -> u64 {
    64 << 20
}

fn default_true() -> bool {
    true
}
fn default_heartbeat_ms() -> u64 {
    100
}
fn default_election_timeout_ms() -> [u64; 2] {
    [800, 1600]
}
fn default_request_timeout_ms() -> u64 {
    5000
}
fn default_snapshot_after_entries() -> u64 {
    5000
}
fn default_entries_kept_after_snapshot() -> u64 {
    1000
}
fn default_replication_factor() -> usize {
    3
}
fn default_groups() -> u32 {
    16
}
fn default_device_size() -> u64 {
    256 << 20
}

impl ChunkdConfig {
    /// Reads and checks a config file; the error names the file and the problem.
    pub fn load(path: &Path) -> Result<ChunkdConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let config: ChunkdConfig = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        config.check().map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        if !self.nodes.iter().any(|n| n.id == self.node_id) {
            return Err(format!("node-id {} is not one of [[nodes]]", self.node_id));
        }
        let mut ids: Vec<u64> = self.nodes.iter().map(|n| n.id).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.nodes.len() {
            return Err("[[nodes]] lists the same id twice".into());
        }
        if self.snapshot_after_entries == 0 {
            return Err("snapshot-after-entries must be at least 1".into());
        }
        if !(WAL_SEGMENT_BYTES_MIN..=WAL_SEGMENT_BYTES_MAX).contains(&self.wal_segment_bytes) {
            return Err(format!("wal-segment-bytes {} must be {WAL_SEGMENT_BYTES_MIN}..={WAL_SEGMENT_BYTES_MAX}", self.wal_segment_bytes));
        }
        let [low, high] = self.election_timeout_ms;
        if self.heartbeat_ms == 0 || low <= self.heartbeat_ms * 2 || high <= low {
            return Err("election-timeout-ms must be [low, high] with heartbeat-ms * 2 < low < high".into());
        }
        for ns in &self.namespaces {
            if ns.replication_factor == 0 || ns.replication_factor > self.nodes.len() {
                return Err(format!(
                    "namespace {}: replication-factor {} must be 1..={} (the number of nodes)",
                    ns.name,
                    ns.replication_factor,
                    self.nodes.len()
                ));
            }
            if !ns.groups.is_power_of_two() || ns.groups > 4096 {
                return Err(format!("namespace {}: groups {} must be a power of two up to 4096", ns.name, ns.groups));
            }
        }
        Ok(())
    }

    /// The node runtime's configuration (engine configs checked here too).
    pub fn node_config(&self) -> Result<NodeConfig, String> {
        let mut namespaces = Vec::new();
        for ns in &self.namespaces {
            let mut engine: NamespaceConfig = match &ns.storage {
                Some(value) => {
                    let mut table = value.clone();
                    if let Some(t) = table.as_table_mut() {
                        t.insert("name".into(), toml::Value::String(ns.name.clone()));
                    }
                    table.try_into().map_err(|e| format!("namespace {}: [namespaces.storage]: {e}", ns.name))?
                }
                None => NamespaceConfig { commit_to_device: false, ..NamespaceConfig::new(ns.name.clone(), Vec::new()) },
            };
            if ns.storage.as_ref().and_then(|s| s.get("commit-to-device")).is_none() {
                engine.commit_to_device = false;
            }
            if engine.devices.is_empty() {
                engine.devices = vec![DeviceConfig { path: self.data_dir.join(format!("{}.dat", ns.name)), size: Some(ns.device_size) }];
            }
            engine.sanitize().map_err(|e| e.to_string())?;
            namespaces.push(NamespaceSpec { engine, replication_factor: ns.replication_factor, groups: ns.groups });
        }
        Ok(NodeConfig {
            node_id: self.node_id,
            nodes: self.nodes.iter().map(|n| (n.id, n.peer.clone())).collect(),
            client_addresses: self.nodes.iter().map(|n| (n.id, n.client.clone())).collect(),
            racks: self.nodes.iter().filter_map(|n| n.rack.clone().map(|rack| (n.id, rack))).collect(),
            seeds: self.seeds.clone(),
            data_dir: self.data_dir.clone(),
            namespaces,
            heartbeat_ms: self.heartbeat_ms,
            election_timeout_ms: (self.election_timeout_ms[0], self.election_timeout_ms[1]),
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            snapshot_after_entries: self.snapshot_after_entries,
            entries_kept_after_snapshot: self.entries_kept_after_snapshot,
            peer_source: peer_source(&self.peer_listen),
            unsafe_skip_dedup: self.unsafe_skip_dedup,
            unsafe_skip_fencing: self.unsafe_skip_fencing,
            unsafe_unchecked_reads: self.unsafe_unchecked_reads,
            unsafe_serve_damaged: self.unsafe_serve_damaged,
            unsafe_wal_torn_tail_rule: self.unsafe_wal_torn_tail_rule,
            unsafe_wiped_replica_votes: self.unsafe_wiped_replica_votes,
            unsafe_wal_ignore_sync_errors: self.unsafe_wal_ignore_sync_errors,
            wal_zero_fill: self.wal_zero_fill,
            wal_segment_bytes: self.wal_segment_bytes,
            unsafe_wal_skip_fsync: self.unsafe_wal_skip_fsync,
            test_power_loss_devices: self.test_power_loss_devices,
            test_crash_while_leaving: self.test_crash_while_leaving,
            balance_leaders: self.balance_leaders,
        })
    }
}

/// The address of `peer-listen` when it names one: outgoing peer connections bind to it. A
/// host name (resolved by the listener) or a wildcard address leaves the choice to the kernel.
fn peer_source(peer_listen: &str) -> Option<std::net::IpAddr> {
    let address: std::net::SocketAddr = peer_listen.parse().ok()?;
    Some(address.ip()).filter(|ip| !ip.is_unspecified())
}

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
    /// UNSAFE (negative controls only): the WAL takes a failed fdatasync for a success.
    pub unsafe_wal_ignore_sync_errors: bool,
    /// UNSAFE (negative controls only): a wiped replica votes without catching up (`rejoin`).
    pub unsafe_wiped_replica_votes: bool,
    /// WAL segments zero-filled when prepared (see `WalConfig::zero_fill`).
    pub wal_zero_fill: bool,
    /// See `WalConfig::segment_bytes`.
    pub wal_segment_bytes: u64,
    /// UNSAFE (negative controls only): the WAL never fdatasyncs.
    pub unsafe_wal_skip_fsync: bool,
    /// Test hook: engine devices drop unsynced writes when the process dies (power cut).
    pub test_power_loss_devices: bool,
    /// Test hook: abort between stopping a replica whose group moved away and forgetting it.
    pub test_crash_while_leaving: bool,
    /// Hand groups to their preferred leaders (see `leadership`).
    pub balance_leaders: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(extra: &str) -> Result<ChunkdConfig, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chunkd.toml");
        let text = format!(
            "node-id = 1\nclient-listen = \"127.0.0.1:1\"\npeer-listen = \"127.0.0.1:2\"\ndata-dir = \"{}\"\n{extra}\n[[nodes]]\nid = 1\nclient = \"127.0.0.1:1\"\npeer = \"127.0.0.1:2\"\n",
            dir.path().display()
        );
        std::fs::write(&path, text).unwrap();
        ChunkdConfig::load(&path)
    }

    #[test]
    fn wal_segment_bytes_is_checked_against_its_bounds() {
        assert_eq!(with("").unwrap().wal_segment_bytes, 64 << 20);
        assert_eq!(with("wal-segment-bytes = 1048576").unwrap().wal_segment_bytes, 1 << 20);
        for bad in ["wal-segment-bytes = 4096", "wal-segment-bytes = 2147483648"] {
            let err = with(bad).unwrap_err();
            assert!(err.contains("wal-segment-bytes"), "{bad}: {err}");
        }
    }
}
