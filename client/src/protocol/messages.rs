//! The messages frames carry, and their encoding: bincode 1 with fixed-width little-endian
//! integers, a size limit and no trailing bytes (see store/PROTOCOL.md). Decoding a body never
//! allocates more than the limit.

use bincode::Options;
use serde::{Deserialize, Serialize};

use crate::cluster::{ClusterMeta, NodeInfo};
use crate::key::Key;
use crate::ops::{OpResult, WriteOp, WritePolicy};
use crate::value::{Record, RecordMeta};

/// How a read may be served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadPolicy {
    /// Monotonic reads and read-your-writes for one client: never older than `min_index`, the
    /// newest log index this client has seen for the record's group.
    #[default]
    Session,
    /// Confirmed with a quorum before answering.
    Linearizable,
    /// Like `Session` (never older than what this client has seen of the group), and any
    /// replica that has applied that far may answer, not only the leader.
    AllowReplica,
    /// The leader answers when it can (as `Session`); when the group has no reachable leader,
    /// any replica answers from what it has applied: possibly stale, never dirty (replicas
    /// apply only committed entries), and not bound by what this client has seen.
    AllowUnavailable,
}

impl ReadPolicy {
    /// The name tools take and print (`--read-policy allow-replica`).
    pub fn name(self) -> &'static str {
        match self {
            ReadPolicy::Session => "session",
            ReadPolicy::Linearizable => "linearizable",
            ReadPolicy::AllowReplica => "allow-replica",
            ReadPolicy::AllowUnavailable => "allow-unavailable",
        }
    }
}

/// Identifies a write for exactly-once retries (see `raft::sessions`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteTag {
    /// Random, chosen by the client object (a new one after a fork).
    pub client_id: u64,
    /// The client's birth: `ClusterMap::now_ms` of the map it loaded first.
    pub born_ms: u64,
    /// One of the client's writes in flight at a time: a lane is reused only after its last
    /// write was finished (answered, or given up and reported in doubt).
    pub lane: u32,
    /// The write's sequence number within the client (rising, from 1).
    pub seq: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Nodes, their addresses and which node leads each group of each namespace.
    ClusterMap,
    Get {
        namespace: String,
        key: Key,
        bins: Option<Vec<String>>,
        read: ReadPolicy,
        min_index: u64,
    },
    Write {
        namespace: String,
        key: Key,
        op: WriteOp,
        policy: WritePolicy,
        tag: WriteTag,
    },
    /// A Raft message between nodes: the group it is for and the message, encoded by the
    /// group's Raft layer.
    Raft {
        namespace: String,
        group: u32,
        #[serde(with = "serde_bytes")]
        message: Vec<u8>,
    },
    /// The cluster metadata (between nodes: a node that is not a metadata voter learns it so).
    /// Answered by the metadata group's leader after confirming its leadership with a quorum.
    ClusterMeta,
    /// Between nodes: part of a snapshot of a group, for a replica rebuilding its damaged copy.
    /// The first call (`transfer: None`) makes the snapshot once the answering replica has
    /// applied `min_applied`; later calls name the transfer and the offset to continue from.
    SnapshotPart {
        namespace: String,
        group: u32,
        min_applied: u64,
        transfer: Option<u64>,
        offset: u64,
    },
    /// Between nodes: the sender's health as its group leaders need it. `stop_writes` lists the
    /// namespaces where the sender refuses new writes, with the reason (empty: none). Sent on
    /// every change and once a second; answered `Noted`.
    /// `lost` lists the groups whose replica on the sender lost its copy and catches up (see
    /// `node::rejoin`): a group where too many have is dead.
    NodeHealth {
        node: u64,
        stop_writes: Vec<(String, String)>,
        lost: Vec<(String, u32)>,
    },
    /// Between nodes: how far the answering node's log of a group reaches, from its WAL
    /// (answered at any time, also before the node has joined). A node whose own log of the
    /// group is empty asks before it votes in the group (see `node::rejoin`).
    GroupLog {
        namespace: String,
        group: u32,
    },
    /// Opens a lease session (see `meta::leases`); answered by the metadata leader
    /// `SessionOpened`.
    SessionOpen {
        ttl_ms: u64,
    },
    /// Renews a lease session's lease for another TTL; answered by the metadata leader
    /// `SessionAlive`, or `SessionExpired` once the session has ended.
    SessionKeepAlive {
        session: u64,
    },
    /// Ends a lease session: its locks are released once it is fenced everywhere. Answered
    /// `Noted` by the metadata leader.
    SessionClose {
        session: u64,
    },
    /// Between nodes: commits `WriteOp::FenceSession` in a group, as its leader (sent by the
    /// metadata leader). Answered `Noted` once committed. With `relay`, a node that does not
    /// lead the group (or hosts none of it) passes the fence on, once (`relay` false), to the
    /// group's leader as it finds it, and answers `Noted` if that leader did: so a fence reaches
    /// a leader the metadata leader cannot reach itself (a ring partition).
    FenceSession {
        namespace: String,
        group: u32,
        session: u64,
        release: bool,
        finished_below: u64,
        relay: bool,
    },
    /// Between nodes: a node new to the cluster asks the metadata leader to add it (it owns
    /// no data until the roster names it). Answered `Noted`.
    AddNode {
        node: NodeInfo,
    },
    /// Sets the roster: the nodes that own data (answered by the metadata leader, `Noted`, or
    /// `BadRequest` saying why not). Groups then move to where the new roster puts them.
    SetRoster {
        nodes: Vec<u64>,
    },
    /// Removes a node from the cluster's node list (one off the roster, holding no replica,
    /// not a metadata voter); answered by the metadata leader `Noted` or `BadRequest`.
    ForgetNode {
        node: u64,
    },
    /// Between nodes: one step of moving a group to `replicas`, asked of the group's leader
    /// by the metadata leader; answered `MoveProgress`.
    MoveGroup {
        namespace: String,
        group: u32,
        replicas: Vec<u64>,
    },
    /// Between nodes: a group's leader hands the group over and asks this replica to start an
    /// election at once; its log must reach `last_index`, the leader's last entry. Answered
    /// `Noted` once the election started, or `BadRequest` saying why not.
    Campaign {
        namespace: String,
        group: u32,
        last_index: u64,
    },
    /// Between nodes: this node's replica of a group: its log, whether it lost its copy and
    /// catches up, and the leader it knows. Answered `GroupState`.
    GroupState {
        namespace: String,
        group: u32,
    },
    /// Rebuilds a dead group from its best surviving replica (any node orchestrates it; see
    /// `node::revive`). Answered `Revived`, or an error saying why not (the group is not
    /// dead, or no replica that answered holds any of its entries).
    Revive {
        namespace: String,
        group: u32,
    },
    /// Between nodes, part of `Revive`: this replica, which lost its copy, may grant its vote to
    /// `survivor` (whose log reaches `last_index`); a survivor that lost its copy once and
    /// caught up part of the way stops catching up. Answered `Noted`.
    ReviveReplica {
        namespace: String,
        group: u32,
        survivor: u64,
        last_index: u64,
    },
    /// Between nodes: the metadata group's voters as this node last knew the cluster metadata.
    /// A metadata voter whose log is empty asks it to learn whether it lost its copy. Answered
    /// `MetadataVoters`, also before joining.
    MetadataVoters,
    /// Between nodes: the metadata leader is about to make this node a member of the metadata
    /// group (a learner first): it starts its member if it runs none (one that starts with an
    /// empty log catches up before it votes). Answered `Noted`.
    JoinMetadata,
    /// The moves the metadata leader drives now and the stage each reached (what `chunkctl
    /// status` shows per group). Answered `MoveStages` by the metadata leader.
    MoveStages,
    /// A ranged read: `len` bytes at `offset` of the record's bytes bin `bin`, served as `Get`
    /// is. Answered `Record` holding only that bin, cut to the range (shorter past the bin's
    /// end, empty beyond it; a bin of another type whole), so a large bin is never sent whole.
    GetRange {
        namespace: String,
        key: Key,
        bin: String,
        offset: u64,
        len: u32,
        read: ReadPolicy,
        min_index: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    ClusterMap(ClusterMap),
    /// The record (or none) and the log index it reflects, for session guarantees.
    Record {
        record: Option<Record>,
        index: u64,
    },
    Written {
        meta: RecordMeta,
        results: Vec<OpResult>,
        index: u64,
    },
    Raft {
        #[serde(with = "serde_bytes")]
        message: Vec<u8>,
    },
    Error(ErrorReply),
    /// The metadata leader's copy (None while the metadata group has not been bootstrapped
    /// yet), as applied up to the metadata group's log index `applied`.
    ClusterMeta {
        cluster: Option<ClusterMeta>,
        applied: u64,
    },
    /// `data` are the snapshot's bytes from the offset asked for; `meta` is its Raft metadata
    /// (bincode), `total_len` its size.
    SnapshotPart {
        transfer: u64,
        #[serde(with = "serde_bytes")]
        meta: Vec<u8>,
        total_len: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// A `NodeHealth` report was taken into account.
    Noted,
    /// The answer to `GroupLog`: the index of the last entry the log holds or has purged
    /// (None: the log is empty), and the term of the node's vote in the group (None: it has
    /// not voted).
    GroupLog {
        last_index: Option<u64>,
        vote_term: Option<u64>,
    },
    SessionOpened {
        session: u64,
        ttl_ms: u64,
    },
    SessionAlive {
        ttl_ms: u64,
    },
    /// How far a group's move is: `done` once its voters are the new replicas; `stage` says
    /// what it waits for.
    MoveProgress {
        done: bool,
        stage: String,
    },
    /// The answer to `GroupState`: the last entry of the log as (term, index) (None: empty),
    /// the term of the replica's vote, whether it lost its copy and catches up, and the leader
    /// it knows.
    GroupState {
        last_log: Option<(u64, u64)>,
        vote_term: u64,
        lost_copy: bool,
        leader: Option<u64>,
    },
    /// A dead group was revived from `survivor`, whose log reached `last_index` (of term
    /// `last_term`): entries after it, if the group had committed any, are lost. `report` says
    /// so in words.
    Revived {
        survivor: u64,
        last_term: u64,
        last_index: u64,
        report: String,
    },
    /// The answer to `MetadataVoters` (None: this node does not know the cluster metadata).
    MetadataVoters(Option<Vec<u64>>),
    /// The answer to `MoveStages`, sorted by namespace and group.
    MoveStages(Vec<MoveStage>),
}

/// A group being moved, and what its move waits for, in words (the group leader's last answer
/// to `MoveGroup`: "node 4 catching up: at 120 of 300", "changing voters", ...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveStage {
    pub namespace: String,
    pub group: u32,
    pub stage: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// (node id, client address)
    pub nodes: Vec<(u64, String)>,
    /// The answering node's wall clock (ms since the Unix epoch): a new client's birth time.
    pub now_ms: u64,
    pub namespaces: Vec<NamespaceMap>,
    /// The metadata group's voters, and its leader as the answering node knows it (None when it
    /// has none or the node is not a voter).
    pub metadata_voters: Vec<u64>,
    pub metadata_leader: Option<u64>,
    /// The metadata voters the answering node (a voter) knows lost their copy, and whether
    /// that leaves the metadata group dead (`chunkctl revive '$meta' 0` rebuilds it).
    pub metadata_lost: Vec<u64>,
    pub metadata_dead: bool,
}

/// One namespace's groups as the answering node sees them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceMap {
    pub name: String,
    pub groups: u32,
    pub replication_factor: u32,
    /// The leader of each group if known (for groups the node does not replicate: the
    /// preferred leader, a hint).
    pub leaders: Vec<Option<u64>>,
    /// The replicas of each group.
    pub replicas: Vec<Vec<u64>>,
    /// Groups whose replica on the answering node lost its copy and catches up.
    pub lost: Vec<u32>,
    /// Groups the answering node takes for dead (see `ErrorReply::PartitionDead`).
    pub dead: Vec<u32>,
}

/// Every error a client can get, saying which of them happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ErrorReply {
    #[error("not the leader of this group (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error("partition unavailable: no quorum of its replicas is reachable")]
    PartitionUnavailable,
    #[error("timed out (in doubt: {in_doubt}; an in-doubt write may or may not have been applied)")]
    Timeout { in_doubt: bool },
    #[error("stop-writes: {0}")]
    StopWrites(String),
    #[error("device overload: {0}")]
    DeviceOverload(String),
    #[error("generation mismatch: expected {expected}, the record is at {actual}")]
    GenerationMismatch { expected: u32, actual: u32 },
    #[error("record exists")]
    RecordExists,
    #[error("record not found")]
    RecordNotFound,
    #[error("record too big: {size_bytes} bytes, the limit is {limit_bytes}")]
    RecordTooBig { size_bytes: usize, limit_bytes: usize },
    #[error("bin {bin:?}: {reason}")]
    IncompatibleBin { bin: String, reason: String },
    #[error("unknown namespace {0:?}")]
    UnknownNamespace(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("the write was applied exactly once, but its result was not retained (read the record to see its state)")]
    AppliedResultLost,
    #[error("a delayed copy of a write this client had finished with: refused, not applied")]
    StaleWrite,
    #[error("this client's session expired (idle or evicted); the write was not applied: use a new client id")]
    ClientExpired,
    #[error("too many writes in flight from this client; the write was not applied")]
    TooManyInFlight,
    #[error("server error: {0}")]
    Internal(String),
    #[error("lease session {session} has expired (or was closed): the write was not applied")]
    SessionExpired { session: u64 },
    #[error("the lock is held by lease session {holder}")]
    LockHeld { holder: u64 },
    #[error("this session does not hold the lock (holder: {holder:?})")]
    LockNotHeld { holder: Option<u64> },
    #[error("too many lease sessions are open ({0}); close some first")]
    TooManySessions(usize),
    #[error("group {namespace}/{group} is dead: a majority of its replicas lost their copy; `chunkctl revive {namespace} {group}` rebuilds it from the best surviving replica")]
    PartitionDead { namespace: String, group: u32 },
    #[error("a byte-range lock is in the way: {0:?}")]
    RangeLockHeld(crate::ops::RangeLockHeld),
}

fn options(limit: usize) -> impl Options {
    bincode::DefaultOptions::new().with_fixint_encoding().with_little_endian().with_limit(limit as u64).reject_trailing_bytes()
}

/// Encodes a message body (fails only past `limit`).
pub fn encode_body<T: Serialize>(message: &T, limit: usize) -> Result<Vec<u8>, String> {
    options(limit).serialize(message).map_err(|e| format!("message does not fit in {limit} bytes: {e}"))
}

/// Decodes a message body; any malformed input is an error, never a panic.
pub fn decode_body<T: serde::de::DeserializeOwned>(body: &[u8], limit: usize) -> Result<T, String> {
    options(limit).deserialize(body).map_err(|e| format!("malformed message: {e}"))
}
