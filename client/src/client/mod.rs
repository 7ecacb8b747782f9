//! The client library. `Client` is blocking and needs no async runtime from its caller (plain
//! std sockets), so the LD_PRELOAD shim can embed it in any process; after a fork, a process
//! never reuses connections it inherited (they belong to the parent).
//!
//! Routing: a record's group comes from its digest; requests go to the group's leader from the
//! cluster map; NotLeader answers update the map (or refresh it) and the request is retried,
//! up to `retries_max` times. A node that did not answer in time is asked last for the next
//! `UNRESPONSIVE_FOR` (map refreshes, metadata requests), and a leader that did not answer, or
//! turned a request away without naming another, is passed over for another replica when
//! the refreshed map still names it (the group may not have elected anew yet). A leader that
//! did not answer is passed over for `SILENT_LEADER_PASSED_OVER` even when the other replicas
//! still name it, unless it answers a short probe: the replicas answer at once, and name the
//! new leader once the group elected one.
//!
//! Exactly-once writes: every write carries a tag (client id, birth, lane, sequence number;
//! see `raft::sessions`). A write whose fate is unknown (connection lost after sending, or an
//! in-doubt answer) is retried with the same tag, so the group applies it at most once and a
//! retry returns the first outcome. Only when the retries run out does the caller get
//! `Timeout { in_doubt: true }`; the write is then finished for the client, its lane goes to
//! a later write, and a delayed copy of it is refused by its group once that later write
//! reached the same group.
//!
//! Invariants:
//! - **A tag never changes once sent**, and a lane carries one unfinished write at a time.
//! - **A new tag is used only for a write certainly not applied** (refused as `ClientExpired`
//!   before any attempt could have been applied).
//! - **A forked child never reuses its parent's client id or connections.**

mod connection;
mod kept_session;

pub use kept_session::KeptSession;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use connection::BlockingConnection;

use crate::key::group_of;
use crate::key::Key;
use crate::ops::{OpResult, Operation, WriteOp, WritePolicy};
use crate::protocol::{encode_body, ClusterMap, ErrorReply, ReadPolicy, Request, Response, WriteTag, FRAME_BYTES_MAX_DEFAULT};
use crate::value::{Bin, Record, RecordMeta};

/// What `Client::revive` did (see `Response::Revived`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Revived {
    pub survivor: u64,
    pub last_term: u64,
    pub last_index: u64,
    pub report: String,
}

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Addresses of some nodes (HOST:PORT); the rest is learned from the cluster map.
    pub seeds: Vec<String>,
    /// Per attempt: connect, send, wait for the answer. Default 5 s.
    pub timeout: Duration,
    /// Attempts after the first, for answers that are safe to retry. Default 64.
    pub retries_max: u32,
    /// How long to keep retrying those (long enough for a group to elect a new leader).
    /// Default 15 s.
    pub retry_window: Duration,
    pub read_policy: ReadPolicy,
    /// The address connections leave from (None: the kernel picks). Default None.
    pub source: Option<std::net::IpAddr>,
}

impl ClientConfig {
    pub fn new(seeds: Vec<String>) -> ClientConfig {
        ClientConfig {
            seeds,
            timeout: Duration::from_secs(5),
            retries_max: 64,
            retry_window: Duration::from_secs(15),
            read_policy: ReadPolicy::Session,
            source: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Server(ErrorReply),
    #[error("no node reachable among {0:?}")]
    NoNodeReachable(Vec<String>),
    #[error("unknown namespace {0:?}")]
    UnknownNamespace(String),
}

pub struct Client {
    config: ClientConfig,
    identity: Mutex<Identity>,
    next_seq: AtomicU64,
    map: Mutex<ClusterMap>,
    /// Idle connections by node address, and the process that opened them.
    pool: Mutex<(u32, HashMap<String, Vec<BlockingConnection>>)>,
    /// Newest log index seen per (namespace, group): session reads never go below it.
    seen: Mutex<HashMap<(String, u32), u64>>,
    /// Map refreshes so far (each starts at the next seed).
    refreshes: AtomicU64,
    /// Nodes that did not answer in time lately (paused, down or cut off), by address, and
    /// when: they are asked last while other nodes can answer instead.
    unresponsive: Mutex<HashMap<String, Instant>>,
    /// When each node that had failed was last probed (`answers_probe`).
    probed: Mutex<HashMap<String, Instant>>,
}

/// How long a node that did not answer in time is asked last.
const UNRESPONSIVE_FOR: Duration = Duration::from_secs(10);

/// How long a group leader that did not answer in time is passed over for another replica
/// (`leader_address`): about as long as its group takes to elect anew.
const SILENT_LEADER_PASSED_OVER: Duration = Duration::from_secs(3);

/// How long such a leader has to answer a probe (a cluster-map request) to be asked again at
/// once, and how often it is probed.
const SILENT_LEADER_PROBE: Duration = Duration::from_millis(200);
const SILENT_LEADER_PROBE_EVERY: Duration = Duration::from_secs(1);

/// Idle connections kept per node.
const POOL_PER_NODE_MAX: usize = 16;

/// Who the client is to the exactly-once tables, and its unfinished writes.
struct Identity {
    /// The process the id belongs to (a forked child takes a new one).
    pid: u32,
    client_id: u64,
    born_ms: u64,
    /// Lanes of unfinished writes by client id (writes under an earlier id keep theirs).
    busy_lanes: HashMap<u64, BTreeSet<u32>>,
}

impl Identity {
    fn new(born_ms: u64) -> Identity {
        Identity { pid: std::process::id(), client_id: fresh_client_id(), born_ms, busy_lanes: HashMap::new() }
    }
}

/// A new client id, from the kernel's randomness. Not from `rand::random`: its thread-local
/// generator hands a forked child the rest of the parent's buffered block, so children forked
/// together took the same id (and the cluster refused their writes as delayed copies of each
/// other's; libchunkpreload's fork test found it).
fn fresh_client_id() -> u64 {
    use rand::RngCore;
    rand::rngs::OsRng.next_u64()
}

impl Client {
    /// Connects to the first seed that answers and loads the cluster map.
    pub fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let client = Client {
            identity: Mutex::new(Identity::new(0)),
            next_seq: AtomicU64::new(1),
            map: Mutex::new(ClusterMap::default()),
            pool: Mutex::new((std::process::id(), HashMap::new())),
            seen: Mutex::new(HashMap::new()),
            refreshes: AtomicU64::new(0),
            unresponsive: Mutex::new(HashMap::new()),
            probed: Mutex::new(HashMap::new()),
            config,
        };
        let map = client.refresh_map()?;
        client.identity.lock().unwrap().born_ms = map.now_ms;
        Ok(client)
    }

    /// The configuration the client was connected with.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    pub fn cluster_map(&self) -> ClusterMap {
        self.map.lock().unwrap().clone()
    }

    /// Asks the seeds, then every known node, for the cluster map. Each refresh starts at the
    /// next seed: a node cut off from the others answers with a map that names no leader for
    /// the groups it can no longer lead, and the next refresh should hear another node.
    pub fn refresh_map(&self) -> Result<ClusterMap, ClientError> {
        let known: Vec<String> = self.map.lock().unwrap().nodes.iter().map(|(_, a)| a.clone()).collect();
        let mut seeds = self.config.seeds.clone();
        if !seeds.is_empty() {
            let first = self.refreshes.fetch_add(1, Ordering::Relaxed) as usize % seeds.len();
            seeds.rotate_left(first);
        }
        let mut candidates: Vec<&String> = seeds.iter().chain(known.iter()).collect();
        // Stable: the rotation still decides among the nodes that answered lately.
        candidates.sort_by_key(|addr| !self.answered_lately(addr));
        let mut tried = Vec::new();
        for addr in candidates {
            tried.push(addr.clone());
            if let Ok(Response::ClusterMap(map)) = self.call(addr, &Request::ClusterMap) {
                *self.map.lock().unwrap() = map.clone();
                return Ok(map);
            }
        }
        Err(ClientError::NoNodeReachable(tried))
    }

    pub fn get(&self, namespace: &str, key: &Key, bins: Option<Vec<String>>) -> Result<Option<Record>, ClientError> {
        self.get_with(namespace, key, bins, self.config.read_policy)
    }

    pub fn get_with(&self, namespace: &str, key: &Key, bins: Option<Vec<String>>, read: ReadPolicy) -> Result<Option<Record>, ClientError> {
        let group = self.group(namespace, key)?;
        let min_index = self.seen_index(namespace, group);
        self.read(namespace, group, Request::Get { namespace: namespace.into(), key: key.clone(), bins, read, min_index }, read)
    }

    /// `len` bytes at `offset` of the bytes bin `bin` (fewer past its end), without the rest of
    /// the bin crossing the network, and the record's meta; `None` when there is no record.
    /// An absent bin, or one of another type, reads as no bytes.
    pub fn get_range(&self, namespace: &str, key: &Key, bin: &str, offset: u64, len: u32) -> Result<Option<(RecordMeta, Vec<u8>)>, ClientError> {
        let group = self.group(namespace, key)?;
        let min_index = self.seen_index(namespace, group);
        let read = self.config.read_policy;
        let request = Request::GetRange { namespace: namespace.into(), key: key.clone(), bin: bin.into(), offset, len, read, min_index };
        let record = self.read(namespace, group, request, read)?;
        Ok(record.map(|mut record| {
            let bytes = match record.bins.iter_mut().find(|b| b.name == bin).map(|b| std::mem::replace(&mut b.value, crate::value::Value::Int(0))) {
                Some(crate::value::Value::Bytes(bytes)) => bytes,
                _ => Vec::new(),
            };
            (record.meta, bytes)
        }))
    }

    /// Sends a read (`Get` or `GetRange`) as its policy says.
    fn read(&self, namespace: &str, group: u32, mut request: Request, read: ReadPolicy) -> Result<Option<Record>, ClientError> {
        if read == ReadPolicy::AllowReplica {
            // A random replica first; one that is behind this client answers NotLeader, and the
            // leader (routed below) answers instead.
            if let Some(addr) = self.any_replica_address(namespace, group) {
                if let Ok(Response::Record { record, index }) = self.call(&addr, &request) {
                    self.saw(namespace, group, index);
                    return Ok(record);
                }
            }
        }
        if read == ReadPolicy::AllowUnavailable {
            // The leader first, as a session read; only if that fails, whichever replica answers.
            set_read_policy(&mut request, ReadPolicy::Session);
            let at_leader = self.routed_once(namespace, group, &request);
            if let Ok(Response::Record { record, index }) = at_leader {
                self.saw(namespace, group, index);
                return Ok(record);
            }
            set_read_policy(&mut request, ReadPolicy::AllowUnavailable);
            for addr in self.replica_addresses(namespace, group) {
                if let Ok(Response::Record { record, .. }) = self.call(&addr, &request) {
                    return Ok(record);
                }
            }
            return Err(match at_leader {
                Err(err) => err,
                Ok(other) => unexpected(other),
            });
        }
        match self.routed(namespace, group, &request, false)? {
            Response::Record { record, index } => {
                self.saw(namespace, group, index);
                Ok(record)
            }
            other => Err(unexpected(other)),
        }
    }

    /// The client addresses of a group's replicas (as the map has them).
    fn replica_addresses(&self, namespace: &str, group: u32) -> Vec<String> {
        let map = self.map.lock().unwrap();
        let Some(replicas) = map.namespaces.iter().find(|n| n.name == namespace).and_then(|n| n.replicas.get(group as usize)) else {
            return Vec::new();
        };
        replicas.iter().filter_map(|id| map.nodes.iter().find(|(n, _)| n == id).map(|(_, addr)| addr.clone())).collect()
    }

    fn any_replica_address(&self, namespace: &str, group: u32) -> Option<String> {
        let addresses = self.replica_addresses(namespace, group);
        (!addresses.is_empty()).then(|| addresses[rand::random::<usize>() % addresses.len()].clone())
    }

    /// One attempt at the group's leader, following one NotLeader hint: no retry window.
    fn routed_once(&self, namespace: &str, group: u32, request: &Request) -> Result<Response, ClientError> {
        let mut hinted = false;
        loop {
            let addr = self.leader_address(namespace, group).ok_or(ClientError::Server(ErrorReply::PartitionUnavailable))?;
            match self.call(&addr, request) {
                Ok(Response::Error(ErrorReply::NotLeader { leader: Some(leader) })) if !hinted => {
                    self.set_leader(namespace, group, leader);
                    hinted = true;
                }
                Ok(Response::Error(reply)) => return Err(ClientError::Server(reply)),
                Ok(response) => return Ok(response),
                Err(CallError::Unsendable(why)) => return Err(CallError::unsendable(why)),
                Err(_) => return Err(ClientError::NoNodeReachable(vec![addr])),
            }
        }
    }

    pub fn put(&self, namespace: &str, key: &Key, bins: Vec<Bin>, policy: &WritePolicy) -> Result<RecordMeta, ClientError> {
        Ok(self.write(namespace, key, WriteOp::Put(bins), policy)?.0)
    }

    pub fn delete(&self, namespace: &str, key: &Key, policy: &WritePolicy) -> Result<RecordMeta, ClientError> {
        Ok(self.write(namespace, key, WriteOp::Delete, policy)?.0)
    }

    pub fn operate(&self, namespace: &str, key: &Key, ops: Vec<Operation>, policy: &WritePolicy) -> Result<(RecordMeta, Vec<OpResult>), ClientError> {
        self.write(namespace, key, WriteOp::Operate(ops), policy)
    }

    pub fn write(&self, namespace: &str, key: &Key, op: WriteOp, policy: &WritePolicy) -> Result<(RecordMeta, Vec<OpResult>), ClientError> {
        let group = self.group(namespace, key)?;
        let mut tag = self.begin_write();
        let mut request = Request::Write { namespace: namespace.into(), key: key.clone(), op, policy: *policy, tag };
        let mut outcome = self.routed(namespace, group, &request, true);
        if let Err(ClientError::Server(ErrorReply::ClientExpired)) = outcome {
            // Refused before any attempt could apply it: safe to send again under a new id.
            self.end_write(&tag);
            tag = self.reborn(tag.client_id);
            if let Request::Write { tag: t, .. } = &mut request {
                *t = tag;
            }
            outcome = self.routed(namespace, group, &request, true);
        }
        self.end_write(&tag);
        match outcome? {
            Response::Written { meta, results, index } => {
                self.saw(namespace, group, index);
                Ok((meta, results))
            }
            other => Err(unexpected(other)),
        }
    }

    /// Writes several records of one group as one entry, all or nothing (`WriteOp::Batch`),
    /// with the exactly-once retries of a single write; with `session`, as a write of that
    /// lease session (refused once it is fenced). The records must share a group: derive their
    /// digests so (`Key::from_digest`), or the batch is refused.
    pub fn write_batch(&self, namespace: &str, writes: Vec<crate::ops::BatchWrite>, session: Option<u64>) -> Result<RecordMeta, ClientError> {
        let Some(first) = writes.first() else {
            return Err(ClientError::Server(ErrorReply::BadRequest("an empty batch".into())));
        };
        let key = first.key.clone();
        let op = match session {
            Some(session) => WriteOp::InSession { session, op: Box::new(WriteOp::Batch(writes)) },
            None => WriteOp::Batch(writes),
        };
        Ok(self.write(namespace, &key, op, &WritePolicy::default())?.0)
    }

    /// Opens a lease session (see `meta::leases`) with a lease of `ttl`: keep it alive with
    /// `keep_alive` well within the TTL (a third of it is a good period), or open it as a
    /// `KeptSession`, which does that on a thread of its own. When a lease runs
    /// out, the cluster fences the session in every group (its writes are refused with
    /// `SessionExpired`), then releases its locks.
    pub fn open_session(&self, ttl: Duration) -> Result<u64, ClientError> {
        match self.meta_routed(&Request::SessionOpen { ttl_ms: ttl.as_millis() as u64 })? {
            Response::SessionOpened { session, .. } => Ok(session),
            other => Err(unexpected(other)),
        }
    }

    /// Renews the session's lease for another TTL; `SessionExpired` once it has ended.
    pub fn keep_alive(&self, session: u64) -> Result<Duration, ClientError> {
        self.keep_alive_sent(session).map(|(ttl, _)| ttl)
    }

    /// `keep_alive`, also saying when the renewal the leader confirmed was sent: the lease runs
    /// at least a TTL from then. Attempts before it (to a leader that had gone, say) do not
    /// count: the confirmed one may be seconds younger than the first.
    pub fn keep_alive_sent(&self, session: u64) -> Result<(Duration, Instant), ClientError> {
        match self.meta_routed_sent(&Request::SessionKeepAlive { session })? {
            (Response::SessionAlive { ttl_ms }, sent_at) => Ok((Duration::from_millis(ttl_ms), sent_at)),
            (other, _) => Err(unexpected(other)),
        }
    }

    /// Ends the session: it is fenced everywhere, then its locks are released.
    pub fn close_session(&self, session: u64) -> Result<(), ClientError> {
        match self.meta_routed(&Request::SessionClose { session })? {
            Response::Noted => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The cluster metadata (nodes, roster, each group's replicas and moves), as the metadata
    /// leader confirms it.
    pub fn cluster_meta(&self) -> Result<crate::cluster::ClusterMeta, ClientError> {
        match self.meta_routed(&Request::ClusterMeta)? {
            Response::ClusterMeta { cluster: Some(cluster), .. } => Ok(cluster),
            other => Err(unexpected(other)),
        }
    }

    /// The group moves the metadata leader drives now, with the stage each reached.
    pub fn move_stages(&self) -> Result<Vec<crate::protocol::MoveStage>, ClientError> {
        match self.meta_routed(&Request::MoveStages)? {
            Response::MoveStages(stages) => Ok(stages),
            other => Err(unexpected(other)),
        }
    }

    /// Makes `nodes` the roster (the nodes that own data); groups then move to where it puts
    /// them. Refused (`BadRequest`, saying why) for unknown nodes or too few of them.
    pub fn set_roster(&self, nodes: &[u64]) -> Result<(), ClientError> {
        match self.meta_routed(&Request::SetRoster { nodes: nodes.to_vec() })? {
            Response::Noted => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Removes a node from the cluster's node list: only a node off the roster that holds no
    /// replica and is not a metadata voter.
    pub fn forget_node(&self, node: u64) -> Result<(), ClientError> {
        match self.meta_routed(&Request::ForgetNode { node })? {
            Response::Noted => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Rebuilds a dead group (a majority of its replicas lost their copy) from its best
    /// surviving replica: answers the survivor, how far its log reaches (writes acknowledged
    /// with a higher index in this group are lost) and a report in words. Refused, saying why,
    /// for a group that is not dead. Takes up to about 15 s: give the client a long timeout.
    pub fn revive(&self, namespace: &str, group: u32) -> Result<Revived, ClientError> {
        match self.meta_routed(&Request::Revive { namespace: namespace.to_owned(), group })? {
            Response::Revived { survivor, last_term, last_index, report } => Ok(Revived { survivor, last_term, last_index, report }),
            other => Err(unexpected(other)),
        }
    }

    /// A write on behalf of a lease session: refused with `SessionExpired` (and not applied)
    /// once the session has been fenced in the record's group.
    pub fn write_in_session(
        &self,
        session: u64,
        namespace: &str,
        key: &Key,
        op: WriteOp,
        policy: &WritePolicy,
    ) -> Result<(RecordMeta, Vec<OpResult>), ClientError> {
        self.write(namespace, key, WriteOp::InSession { session, op: Box::new(op) }, policy)
    }

    /// Takes the record `key` as a lock for `session`, waiting up to `wait` while another
    /// session holds it (`LockHeld` after that). Taking a lock the session holds succeeds.
    pub fn lock(&self, session: u64, namespace: &str, key: &Key, wait: Duration) -> Result<(), ClientError> {
        let give_up_at = Instant::now() + wait;
        let mut pause = Duration::from_millis(10);
        loop {
            match self.write(namespace, key, WriteOp::Lock { session }, &WritePolicy::default()) {
                Err(ClientError::Server(ErrorReply::LockHeld { .. })) if Instant::now() < give_up_at => {
                    std::thread::sleep(pause.min(give_up_at.saturating_duration_since(Instant::now())));
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                other => return other.map(|_| ()),
            }
        }
    }

    /// Takes the record `key` as a lock for `session` if no other session holds it; `LockHeld`
    /// at once otherwise (`lock` without waiting).
    pub fn try_lock(&self, session: u64, namespace: &str, key: &Key) -> Result<(), ClientError> {
        self.lock(session, namespace, key, Duration::ZERO)
    }

    /// A byte-range lock request of `session` on the lock table `key` (`WriteOp::RangeLock`):
    /// `RangeLockHeld` names the lock in the way; `SessionExpired` once the session is fenced.
    pub fn range_lock(&self, session: u64, namespace: &str, key: &Key, lock: crate::ops::RangeLock) -> Result<(), ClientError> {
        self.write(namespace, key, WriteOp::RangeLock { session, lock }, &WritePolicy::default()).map(|_| ())
    }

    /// Gives back a lock `session` holds.
    pub fn unlock(&self, session: u64, namespace: &str, key: &Key) -> Result<(), ClientError> {
        self.write(namespace, key, WriteOp::Unlock { session }, &WritePolicy::default()).map(|_| ())
    }

    /// Sends a lease-session request to the metadata leader (from the map, then the metadata
    /// voters, following NotLeader hints), retrying within the retry window. Every such
    /// request is safe to repeat (a repeated open leaves a session that expires unused).
    fn meta_routed(&self, request: &Request) -> Result<Response, ClientError> {
        self.meta_routed_sent(request).map(|(response, _)| response)
    }

    /// `meta_routed`, with when the attempt that was answered was sent.
    fn meta_routed_sent(&self, request: &Request) -> Result<(Response, Instant), ClientError> {
        let give_up_at = Instant::now() + self.config.retry_window;
        let mut hint: Option<u64> = None;
        let mut attempt = 0usize;
        let mut tried = Vec::new();
        loop {
            let target = {
                let map = self.map.lock().unwrap();
                let address = |id: u64| map.nodes.iter().find(|(n, _)| *n == id).map(|(_, addr)| addr.clone());
                // The voters in turn, those that answered lately first.
                let mut voters: Vec<(u64, Option<String>)> = map.metadata_voters.iter().map(|&v| (v, address(v))).collect();
                voters.sort_by_key(|(_, addr)| addr.as_deref().is_some_and(|a| !self.answered_lately(a)));
                let id =
                    hint.take().or(map.metadata_leader.filter(|_| attempt == 0)).or_else(|| (!voters.is_empty()).then(|| voters[attempt % voters.len()].0));
                id.and_then(address)
            };
            attempt += 1;
            if let Some(addr) = target {
                tried.push(addr.clone());
                let sent_at = Instant::now();
                match self.call(&addr, request) {
                    Ok(Response::Error(ErrorReply::NotLeader { leader })) => hint = leader,
                    Err(CallError::Unsendable(why)) => return Err(CallError::unsendable(why)),
                    Ok(Response::Error(ErrorReply::Timeout { .. })) | Err(_) => {}
                    Ok(Response::Error(reply)) => return Err(ClientError::Server(reply)),
                    Ok(response) => return Ok((response, sent_at)),
                }
            }
            if Instant::now() >= give_up_at {
                return Err(ClientError::NoNodeReachable(tried));
            }
            if hint.is_none() {
                std::thread::sleep(Duration::from_millis(50));
                if attempt.is_multiple_of(4) {
                    let _ = self.refresh_map();
                }
            }
        }
    }

    /// Sends one request to one node: no routing, no retries (for tools and tests).
    pub fn call_node(&self, addr: &str, request: &Request) -> Result<Response, ClientError> {
        self.call(addr, request).map_err(|err| match err {
            CallError::NotSent => ClientError::NoNodeReachable(vec![addr.to_owned()]),
            CallError::Lost => ClientError::Server(ErrorReply::Timeout { in_doubt: true }),
            CallError::Unsendable(why) => CallError::unsendable(why),
        })
    }

    /// A new write's tag on the lowest free lane; the write is unfinished until `end_write`.
    fn begin_write(&self) -> WriteTag {
        let mut identity = self.identity();
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let client_id = identity.client_id;
        let busy = identity.busy_lanes.entry(client_id).or_default();
        let lane = (0..).find(|lane| !busy.contains(lane)).expect("a free lane");
        busy.insert(lane);
        WriteTag { client_id, born_ms: identity.born_ms, lane, seq }
    }

    fn end_write(&self, tag: &WriteTag) {
        let mut identity = self.identity();
        if let Some(busy) = identity.busy_lanes.get_mut(&tag.client_id) {
            busy.remove(&tag.lane);
            if busy.is_empty() {
                identity.busy_lanes.remove(&tag.client_id);
            }
        }
    }

    /// After `ClientExpired`: a new id (unless another thread took one already) born now, and
    /// a new tag for the refused write.
    fn reborn(&self, expired_id: u64) -> WriteTag {
        let born_ms = self.refresh_map().map(|m| m.now_ms).ok();
        {
            let mut identity = self.identity();
            if identity.client_id == expired_id {
                identity.client_id = fresh_client_id();
                identity.born_ms = born_ms.unwrap_or(identity.born_ms);
            }
        }
        self.begin_write()
    }

    /// The identity, renewed first if this process is a fork of the one that made it.
    fn identity(&self) -> std::sync::MutexGuard<'_, Identity> {
        let mut identity = self.identity.lock().unwrap();
        if identity.pid != std::process::id() {
            *identity = Identity::new(identity.born_ms);
        }
        identity
    }

    fn group(&self, namespace: &str, key: &Key) -> Result<u32, ClientError> {
        let groups = self.map.lock().unwrap().namespaces.iter().find(|n| n.name == namespace).map(|n| n.groups);
        let groups = match groups {
            Some(groups) => groups,
            None => self
                .refresh_map()?
                .namespaces
                .iter()
                .find(|n| n.name == namespace)
                .map(|n| n.groups)
                .ok_or_else(|| ClientError::UnknownNamespace(namespace.into()))?,
        };
        Ok(group_of(&key.digest, groups))
    }

    /// The newest log index of `namespace`'s `group` this client has seen, its own writes'
    /// included (0: none). After `revive`, writes acknowledged above the survivor's last
    /// index are the ones lost.
    pub fn seen_index(&self, namespace: &str, group: u32) -> u64 {
        self.seen.lock().unwrap().get(&(namespace.to_owned(), group)).copied().unwrap_or(0)
    }

    fn saw(&self, namespace: &str, group: u32, index: u64) {
        let mut seen = self.seen.lock().unwrap();
        let entry = seen.entry((namespace.to_owned(), group)).or_default();
        *entry = (*entry).max(index);
    }

    /// Where to send the group's next request: its leader as the map names it, unless that node
    /// failed to answer within the last `SILENT_LEADER_PASSED_OVER` and does not answer a probe
    /// within `SILENT_LEADER_PROBE` either; then another replica that did not fail, picked at
    /// random. Until the group elects anew, its other replicas keep naming the silent leader (a
    /// paused or cut-off node), and each request sent there would wait a whole timeout; a
    /// replica answers at once, naming the new leader once there is one. The probe keeps a
    /// leader that failed once (a slow moment, a connection its restart closed) in use.
    fn leader_address(&self, namespace: &str, group: u32) -> Option<String> {
        let (address, others) = {
            let map = self.map.lock().unwrap();
            let ns = map.namespaces.iter().find(|n| n.name == namespace)?;
            let leader = ns.leaders.get(group as usize).copied().flatten()?;
            let address_of = |id: u64| map.nodes.iter().find(|(node, _)| *node == id).map(|(_, addr)| addr.clone());
            let replicas = ns.replicas.get(group as usize).map(Vec::as_slice).unwrap_or_default();
            let others: Vec<String> = replicas.iter().filter(|id| **id != leader).filter_map(|id| address_of(*id)).collect();
            (address_of(leader)?, others)
        };
        if !self.failed_within(&address, SILENT_LEADER_PASSED_OVER) || self.answers_probe(&address) {
            return Some(address);
        }
        let others: Vec<String> = others.into_iter().filter(|addr| !self.failed_within(addr, SILENT_LEADER_PASSED_OVER)).collect();
        match others.is_empty() {
            true => Some(address),
            false => Some(others[rand::random::<usize>() % others.len()].clone()),
        }
    }

    /// Whether `addr` answers a cluster-map request within `SILENT_LEADER_PROBE` (then it no
    /// longer counts as having failed, and the connection joins the pool). One thread probes a
    /// node at most once per `SILENT_LEADER_PROBE_EVERY`; meanwhile the others take it for
    /// silent. A probe that fails counts as a failure (a paused node accepts connections, so
    /// each probe of it costs the whole probe timeout).
    fn answers_probe(&self, addr: &str) -> bool {
        {
            let mut probed = self.probed.lock().unwrap();
            if probed.get(addr).is_some_and(|at| at.elapsed() < SILENT_LEADER_PROBE_EVERY) {
                return false;
            }
            probed.insert(addr.to_owned(), Instant::now());
        }
        let Ok(probe) = encode_body(&Request::ClusterMap, FRAME_BYTES_MAX_DEFAULT) else { return false };
        let answered = BlockingConnection::connect(addr, SILENT_LEADER_PROBE, self.config.source)
            .ok()
            .and_then(|mut connection| connection.call(probe, Instant::now() + SILENT_LEADER_PROBE).ok().map(|_| connection));
        let Some(connection) = answered else {
            self.unresponsive.lock().unwrap().insert(addr.to_owned(), Instant::now());
            return false;
        };
        self.unresponsive.lock().unwrap().remove(addr);
        self.return_connection(addr, connection);
        true
    }

    /// Whether `addr` failed to answer a request within the last `window`.
    fn failed_within(&self, addr: &str, window: Duration) -> bool {
        self.unresponsive.lock().unwrap().get(addr).is_some_and(|since| since.elapsed() < window)
    }

    /// After the leader could not be reached: try the group's other replicas (they answer
    /// NotLeader with the new leader once one is elected).
    fn forget_leader(&self, namespace: &str, group: u32) {
        let mut map = self.map.lock().unwrap();
        let Some(ns) = map.namespaces.iter_mut().find(|n| n.name == namespace) else { return };
        let (Some(slot), Some(replicas)) = (ns.leaders.get(group as usize).copied(), ns.replicas.get(group as usize)) else { return };
        let others: Vec<u64> = replicas.iter().copied().filter(|r| Some(*r) != slot).collect();
        if !others.is_empty() {
            let pick = others[rand::random::<usize>() % others.len()];
            ns.leaders[group as usize] = Some(pick);
        }
    }

    /// After `asked`, taken for the group's leader, answered that it does not lead (naming no
    /// leader) or did not answer: refreshes the map, and if the map still names `asked` (the
    /// other nodes may not have elected a new leader yet), tries another replica next.
    fn look_for_leader(&self, namespace: &str, group: u32, asked: &str) {
        let _ = self.refresh_map();
        if self.leader_address(namespace, group).as_deref() == Some(asked) {
            self.forget_leader(namespace, group);
        }
    }

    /// Whether `addr` answered its last request in time (or was never asked).
    fn answered_lately(&self, addr: &str) -> bool {
        self.unresponsive.lock().unwrap().get(addr).is_none_or(|since| since.elapsed() >= UNRESPONSIVE_FOR)
    }

    fn set_leader(&self, namespace: &str, group: u32, leader: u64) {
        let mut map = self.map.lock().unwrap();
        if let Some(ns) = map.namespaces.iter_mut().find(|n| n.name == namespace) {
            if let Some(slot) = ns.leaders.get_mut(group as usize) {
                *slot = Some(leader);
            }
        }
    }

    /// Sends to the group's leader, retrying what is safe to retry: reads, and writes (their
    /// tag makes a retry apply at most once).
    fn routed(&self, namespace: &str, group: u32, request: &Request, is_write: bool) -> Result<Response, ClientError> {
        let mut attempt = 0;
        let give_up_at = Instant::now() + self.config.retry_window;
        // Whether an attempt may have reached the group (then the outcome is in doubt unless
        // an answer settles it).
        let mut maybe_applied = false;
        let in_doubt = |maybe_applied: bool| ClientError::Server(ErrorReply::Timeout { in_doubt: maybe_applied });
        loop {
            let retry = |attempt: &mut u32| -> bool {
                *attempt += 1;
                if *attempt > self.config.retries_max || Instant::now() >= give_up_at {
                    return false;
                }
                std::thread::sleep(Duration::from_millis((25u64 << (*attempt).min(4)).min(400)));
                true
            };
            let unavailable = |maybe_applied: bool| {
                if maybe_applied {
                    in_doubt(true)
                } else {
                    ClientError::Server(ErrorReply::PartitionUnavailable)
                }
            };
            let Some(addr) = self.leader_address(namespace, group) else {
                if !retry(&mut attempt) {
                    return Err(unavailable(maybe_applied));
                }
                let _ = self.refresh_map();
                if self.leader_address(namespace, group).is_none() {
                    // No leader known: ask a replica, which names the leader once one is
                    // elected, or answers that the group is dead.
                    self.forget_leader(namespace, group);
                }
                continue;
            };
            match self.call(&addr, request) {
                Ok(Response::Error(ErrorReply::NotLeader { leader })) => {
                    if !retry(&mut attempt) {
                        return Err(unavailable(maybe_applied));
                    }
                    match leader {
                        Some(leader) => self.set_leader(namespace, group, leader),
                        None => self.look_for_leader(namespace, group, &addr),
                    }
                }
                Ok(Response::Error(ErrorReply::Timeout { in_doubt: true })) if is_write => {
                    maybe_applied = true;
                    if !retry(&mut attempt) {
                        return Err(in_doubt(true));
                    }
                    let _ = self.refresh_map();
                }
                // A group found dead after an attempt that may have reached it.
                Ok(Response::Error(ErrorReply::PartitionDead { .. })) if maybe_applied => return Err(in_doubt(true)),
                // An expired client's retry: an earlier attempt may have been applied.
                Ok(Response::Error(ErrorReply::ClientExpired)) if maybe_applied => return Err(in_doubt(true)),
                Ok(Response::Error(reply)) => return Err(ClientError::Server(reply)),
                Ok(response) => return Ok(response),
                Err(CallError::Unsendable(why)) => return Err(if maybe_applied { in_doubt(true) } else { CallError::unsendable(why) }),
                Err(CallError::NotSent) => {
                    if !retry(&mut attempt) {
                        return Err(if maybe_applied { in_doubt(true) } else { ClientError::NoNodeReachable(vec![addr]) });
                    }
                    // The leader is unreachable: ask another replica who leads now (a refreshed
                    // map would still name the dead node until the group elects a new leader).
                    self.forget_leader(namespace, group);
                }
                Err(CallError::Lost) => {
                    maybe_applied |= is_write;
                    if !retry(&mut attempt) {
                        return Err(in_doubt(is_write));
                    }
                    self.look_for_leader(namespace, group, &addr);
                }
            }
        }
    }

    fn call(&self, addr: &str, request: &Request) -> Result<Response, CallError> {
        // Encoded before a connection is taken: a request no frame can hold costs no
        // connection, and no node is blamed for it.
        let body = encode_body(request, FRAME_BYTES_MAX_DEFAULT).map_err(CallError::Unsendable)?;
        let answered = self.call_once(addr, body);
        let mut unresponsive = self.unresponsive.lock().unwrap();
        match answered {
            Ok(_) => drop(unresponsive.remove(addr)),
            Err(CallError::Unsendable(_)) => {}
            Err(_) => drop(unresponsive.insert(addr.to_owned(), Instant::now())),
        }
        answered
    }

    fn call_once(&self, addr: &str, body: Vec<u8>) -> Result<Response, CallError> {
        let mut connection = match self.take_connection(addr) {
            Some(connection) => connection,
            None => BlockingConnection::connect(addr, self.config.timeout, self.config.source).map_err(|_| CallError::NotSent)?,
        };
        let deadline = Instant::now() + self.config.timeout;
        match connection.call(body, deadline) {
            Ok(response) => {
                self.return_connection(addr, connection);
                Ok(response)
            }
            Err(err) => Err(err),
        }
    }

    fn take_connection(&self, addr: &str) -> Option<BlockingConnection> {
        let mut pool = self.pool.lock().unwrap();
        if pool.0 != std::process::id() {
            // Forked: the inherited sockets are the parent's. Forget them without closing
            // them under the parent (leak the fds into the child rather than shut them down).
            for (_, connections) in pool.1.drain() {
                connections.into_iter().for_each(BlockingConnection::abandon);
            }
            pool.0 = std::process::id();
        }
        pool.1.get_mut(addr).and_then(Vec::pop)
    }

    fn return_connection(&self, addr: &str, connection: BlockingConnection) {
        let mut pool = self.pool.lock().unwrap();
        if pool.0 != std::process::id() {
            connection.abandon();
            return;
        }
        let idle = pool.1.entry(addr.to_owned()).or_default();
        if idle.len() < POOL_PER_NODE_MAX {
            idle.push(connection);
        }
    }
}

/// Why a call failed: before the request could have reached the server, or after.
pub(crate) enum CallError {
    NotSent,
    Lost,
    /// The request cannot be encoded in a frame (too large): sending it again anywhere fails
    /// the same way, so it is refused at once.
    Unsendable(String),
}

impl CallError {
    /// The refusal of a request no node could ever be sent.
    fn unsendable(why: String) -> ClientError {
        ClientError::Server(ErrorReply::BadRequest(why))
    }
}

fn set_read_policy(request: &mut Request, policy: ReadPolicy) {
    if let Request::Get { read, .. } | Request::GetRange { read, .. } = request {
        *read = policy;
    }
}

fn unexpected(response: Response) -> ClientError {
    ClientError::Server(ErrorReply::Internal(format!("unexpected response {response:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The id a child forked now takes.
    fn id_of_a_forked_child() -> u64 {
        let mut fds = [0; 2];
        // SAFETY: plain system calls; the child only computes, writes and exits.
        unsafe {
            assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
            let pid = libc::fork();
            if pid == 0 {
                let id = fresh_client_id().to_le_bytes();
                libc::write(fds[1], id.as_ptr().cast(), 8);
                libc::_exit(0);
            }
            let mut bytes = [0u8; 8];
            assert_eq!(libc::read(fds[0], bytes.as_mut_ptr().cast(), 8), 8);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
            libc::close(fds[0]);
            libc::close(fds[1]);
            u64::from_le_bytes(bytes)
        }
    }

    /// Children forked one after the other take different client ids, even when the parent's
    /// thread-local generator holds a buffered block (which `rand::random` would hand to each).
    #[test]
    fn children_forked_together_take_different_client_ids() {
        let _: u64 = rand::random();
        assert_ne!(id_of_a_forked_child(), id_of_a_forked_child());
    }
    use crate::protocol::{decode_body, decode_frame, encode_body, Frame, FrameKind, NamespaceMap, FRAME_BYTES_MAX_DEFAULT};
    use std::io::{Read, Write};
    use std::sync::Arc;

    /// A server for tests, on plain threads: answers every request to `listener` with
    /// `answer`.
    fn serve(listener: std::net::TcpListener, answer: Arc<dyn Fn(Request) -> Response + Send + Sync>) {
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let answer = answer.clone();
                std::thread::spawn(move || {
                    let mut stream = stream;
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while let Ok(Some((frame, used))) = decode_frame(&buf, FRAME_BYTES_MAX_DEFAULT) {
                            buf.drain(..used);
                            let Ok(request) = decode_body::<Request>(&frame.body, FRAME_BYTES_MAX_DEFAULT) else { return };
                            let body = encode_body(&answer(request), FRAME_BYTES_MAX_DEFAULT).unwrap();
                            let mut out = Vec::new();
                            Frame { kind: FrameKind::Response, request_id: frame.request_id, body }.encode(&mut out);
                            if stream.write_all(&out).is_err() {
                                return;
                            }
                        }
                        match stream.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
    }

    /// A leader that did not answer (nor a probe: nothing listens at nodes 2 and 3) is passed
    /// over for another replica for a few seconds, though the map still names it (its group has
    /// not elected anew yet); replicas that did not answer either are not picked; once the
    /// window passed, the leader is asked again; a leader that answers the probe stays in use.
    #[test]
    fn a_leader_that_did_not_answer_is_passed_over_while_the_replicas_still_name_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap().to_string();
        let nodes: Vec<(u64, String)> = vec![(1, server.clone()), (2, "127.0.0.1:9".into()), (3, "127.0.0.1:11".into())];
        let namespace = NamespaceMap {
            name: "test".into(),
            groups: 1,
            replication_factor: 3,
            leaders: vec![Some(2)],
            replicas: vec![vec![1, 2, 3]],
            ..NamespaceMap::default()
        };
        let map = ClusterMap { nodes: nodes.clone(), namespaces: vec![namespace], ..ClusterMap::default() };
        // Answers every request with the same cluster map.
        serve(listener, Arc::new(move |_| Response::ClusterMap(map.clone())));
        let client = Client::connect(ClientConfig::new(vec![server.clone()])).unwrap();
        let address = |id: u64| nodes[id as usize - 1].1.clone();
        assert_eq!(client.leader_address("test", 0), Some(address(2)), "a leader that answers is asked");

        let failed = |id: u64, ago: Duration| {
            client.unresponsive.lock().unwrap().insert(address(id), Instant::now() - ago);
        };
        failed(2, Duration::ZERO);
        for _ in 0..20 {
            let picked = client.leader_address("test", 0).unwrap();
            assert!(picked == address(1) || picked == address(3), "the silent leader was asked: {picked}");
        }
        failed(3, Duration::ZERO);
        for _ in 0..20 {
            assert_eq!(client.leader_address("test", 0), Some(address(1)), "a replica that did not answer either was picked");
        }
        failed(1, Duration::ZERO);
        assert_eq!(client.leader_address("test", 0), Some(address(2)), "with no replica left to ask, the leader is asked");
        failed(2, SILENT_LEADER_PASSED_OVER);
        assert_eq!(client.leader_address("test", 0), Some(address(2)), "the leader is asked again once the window passed");
        // A leader that failed once but answers the probe (node 1, the map server) stays in use.
        client.set_leader("test", 0, 1);
        client.unresponsive.lock().unwrap().clear();
        failed(1, Duration::ZERO);
        assert_eq!(client.leader_address("test", 0), Some(address(1)), "a leader that answers the probe was passed over");
        assert!(!client.failed_within(&address(1), SILENT_LEADER_PASSED_OVER), "the probe's answer did not clear the failure");
    }

    /// Answers keep-alives `NotLeader` (an election under way) until `elected` has passed since
    /// the first one, then `SessionAlive`; everything else with a map naming itself the only
    /// metadata voter.
    struct ElectingServer {
        map: ClusterMap,
        first: Mutex<Option<Instant>>,
        /// When the last keep-alive was refused.
        last_refused: Mutex<Option<Instant>>,
        elected: Duration,
    }

    impl ElectingServer {
        fn handle(&self, request: Request) -> Response {
            match request {
                Request::SessionKeepAlive { .. } => {
                    let first = *self.first.lock().unwrap().get_or_insert_with(Instant::now);
                    match first.elapsed() < self.elected {
                        true => {
                            *self.last_refused.lock().unwrap() = Some(Instant::now());
                            Response::Error(ErrorReply::NotLeader { leader: None })
                        }
                        false => Response::SessionAlive { ttl_ms: 1000 },
                    }
                }
                _ => Response::ClusterMap(self.map.clone()),
            }
        }
    }

    /// A renewal answered only after a metadata election counts from when the answered attempt
    /// was sent, not from the first attempt: a lease holder's view of its lease (`KeptSession`)
    /// must not age by the time the election took.
    #[test]
    fn a_renewal_counts_from_the_attempt_the_leader_answered() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server_address = listener.local_addr().unwrap().to_string();
        let map = ClusterMap { nodes: vec![(1, server_address.clone())], metadata_voters: vec![1], metadata_leader: Some(1), ..ClusterMap::default() };
        let elected = Duration::from_millis(600);
        let server = Arc::new(ElectingServer { map, first: Mutex::new(None), last_refused: Mutex::new(None), elected });
        let answering = server.clone();
        serve(listener, Arc::new(move |request| answering.handle(request)));
        let client = Client::connect(ClientConfig::new(vec![server_address])).unwrap();
        let called = Instant::now();
        let (ttl, sent_at) = client.keep_alive_sent(7).unwrap();
        assert_eq!(ttl, Duration::from_millis(1000));
        // The answered attempt went out after the client heard the last refusal.
        let last_refused = server.last_refused.lock().unwrap().expect("the server refused the first attempts");
        assert!(sent_at > last_refused, "the renewal counts from {:?} after the call, before the last refusal ({:?})", sent_at - called, last_refused - called);
        assert!(sent_at <= Instant::now());
    }

    /// A request too large for a frame is refused at once with a clear error: not retried
    /// for the whole retry window, not reported as an unreachable cluster, and the node it
    /// was meant for is not taken for a silent one.
    #[test]
    fn a_request_too_large_for_a_frame_is_refused_at_once() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap().to_string();
        let namespace =
            NamespaceMap { name: "test".into(), groups: 1, replication_factor: 1, leaders: vec![Some(1)], replicas: vec![vec![1]], ..NamespaceMap::default() };
        let map = ClusterMap { nodes: vec![(1, server.clone())], namespaces: vec![namespace], ..ClusterMap::default() };
        serve(listener, Arc::new(move |_| Response::ClusterMap(map.clone())));
        let client = Client::connect(ClientConfig::new(vec![server.clone()])).unwrap();
        let key = Key::new("set", "big");
        let bin = Bin { name: "b".into(), value: crate::value::Value::Bytes(vec![7; FRAME_BYTES_MAX_DEFAULT + 1]) };
        let started = Instant::now();
        let refused = client.write("test", &key, WriteOp::Put(vec![bin]), &WritePolicy::default());
        assert!(matches!(&refused, Err(ClientError::Server(ErrorReply::BadRequest(why))) if why.contains("does not fit")), "{refused:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "refused only after {:?}", started.elapsed());
        assert!(!client.failed_within(&server, Duration::from_secs(60)), "the node was taken for a silent one");
    }
}
