//! The metadata group's state machine: the `ClusterMeta` in memory, written whole to the WAL
//! (as the group's applied marker) after every applied batch.

// openraft's StorageError is large, and it is what openraft's traits return.
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::sync::{Arc, Mutex};

use openraft::storage::RaftStateMachine;
use openraft::{Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError, StorageIOError, StoredMembership};
use serde::{Deserialize, Serialize};

use super::v1::ClusterMetaV1;
use super::{ClusterMeta, Leases, MetaCommand, MetaResult, MetaTypeConfig, META_WAL_GROUP};
use crate::meta::ClusterMetaExt as _;
use crate::raft::log_store::append_durable;
use crate::raft::NodeId;
use crate::wal::{Wal, WalOp};

type Membership = StoredMembership<NodeId, openraft::BasicNode>;
type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

/// Everything the state machine holds; also its applied marker in the WAL.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct MetaState {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    cluster: Option<ClusterMeta>,
    leases: Leases,
}

/// The state as written before rosters (V2) and before lease sessions (V1): without a format
/// tag, and with the cluster metadata of then.
#[derive(Deserialize)]
struct MetaStateV2 {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    cluster: Option<ClusterMetaV1>,
    leases: Leases,
}

#[derive(Deserialize)]
struct MetaStateV1 {
    last_applied: Option<LogId<NodeId>>,
    membership: Membership,
    cluster: Option<ClusterMetaV1>,
}

/// Leads the state and snapshots written since rosters (older ones begin with an option tag,
/// 0 or 1, so the two never mix).
const FORMAT_TAG: u32 = 0x4D45_5433;

impl MetaState {
    fn encode(&self) -> Vec<u8> {
        bincode::serialize(&(FORMAT_TAG, self)).expect("metadata serializes")
    }

    fn decode(bytes: &[u8]) -> Result<MetaState, bincode::Error> {
        if let Ok((FORMAT_TAG, state)) = bincode::deserialize::<(u32, MetaState)>(bytes) {
            return Ok(state);
        }
        bincode::deserialize::<MetaStateV2>(bytes)
            .map(|v2| MetaState { last_applied: v2.last_applied, membership: v2.membership, cluster: v2.cluster.map(Into::into), leases: v2.leases })
            .or_else(|err| match bincode::deserialize::<MetaStateV1>(bytes) {
                Ok(v1) => {
                    Ok(MetaState { last_applied: v1.last_applied, membership: v1.membership, cluster: v1.cluster.map(Into::into), leases: Leases::default() })
                }
                Err(_) => Err(err),
            })
    }
}

/// A snapshot's bytes: the cluster metadata and the lease sessions.
fn encode_snapshot(cluster: &Option<ClusterMeta>, leases: &Leases) -> Vec<u8> {
    bincode::serialize(&(FORMAT_TAG, cluster, leases)).expect("metadata serializes")
}

fn decode_snapshot(bytes: &[u8]) -> Result<(Option<ClusterMeta>, Leases), bincode::Error> {
    if let Ok((FORMAT_TAG, cluster, leases)) = bincode::deserialize::<(u32, Option<ClusterMeta>, Leases)>(bytes) {
        return Ok((cluster, leases));
    }
    // Before rosters: (cluster, leases); before lease sessions: the cluster alone.
    bincode::deserialize::<(Option<ClusterMetaV1>, Leases)>(bytes)
        .or_else(|err| bincode::deserialize::<Option<ClusterMetaV1>>(bytes).map(|c| (c, Leases::default())).map_err(|_| err))
        .map(|(cluster, leases)| (cluster.map(Into::into), leases))
}

/// Applies a roster or placement command to `cluster`.
fn apply_cluster_change(cluster: &mut ClusterMeta, command: MetaCommand) -> MetaResult {
    match command {
        MetaCommand::AddNode(node) => {
            if let Some(known) = cluster.node(node.id) {
                return match *known == node {
                    true => MetaResult::Noop,
                    false => MetaResult::Refused(format!("node {} is known already, with other addresses: {known:?}", node.id)),
                };
            }
            if let Some(other) = cluster.nodes.iter().find(|n| n.peer == node.peer || n.client == node.client) {
                return MetaResult::Refused(format!("node {} has the same address as node {}", node.id, other.id));
            }
            tracing::info!(node = node.id, peer = %node.peer, rack = ?node.rack, "a node joined the cluster (not on the roster yet)");
            cluster.nodes.push(node);
            cluster.nodes.sort_by_key(|n| n.id);
            MetaResult::Noop
        }
        MetaCommand::SetRoster(mut roster) => {
            roster.sort_unstable();
            roster.dedup();
            if let Err(why) = cluster.check_roster(&roster) {
                return MetaResult::Refused(why);
            }
            tracing::info!(?roster, "roster set");
            cluster.roster = roster;
            MetaResult::Noop
        }
        MetaCommand::ForgetNode(node) => {
            if let Err(why) = cluster.check_forget(node) {
                return MetaResult::Refused(why);
            }
            tracing::info!(node, "a node left the cluster");
            cluster.nodes.retain(|n| n.id != node);
            MetaResult::Noop
        }
        MetaCommand::StartMove { namespace, group, replicas } => {
            let Some(ns) = cluster.namespaces.iter_mut().find(|n| n.name == namespace) else {
                return MetaResult::Refused(format!("no namespace {namespace:?}"));
            };
            if group >= ns.groups || ns.moves.contains_key(&group) {
                return MetaResult::Refused(format!("{namespace}/{group} is moving already, or no such group"));
            }
            tracing::info!(namespace, group, from = ?ns.placement[group as usize], to = ?replicas, "group moves");
            ns.moves.insert(group, replicas);
            MetaResult::Noop
        }
        MetaCommand::FinishMove { namespace, group, replicas } => {
            let Some(ns) = cluster.namespaces.iter_mut().find(|n| n.name == namespace) else {
                return MetaResult::Refused(format!("no namespace {namespace:?}"));
            };
            if group >= ns.groups {
                return MetaResult::Refused(format!("no group {group} in {namespace}"));
            }
            tracing::info!(namespace, group, replicas = ?replicas, "group moved");
            ns.moves.remove(&group);
            ns.placement[group as usize] = replicas;
            MetaResult::Noop
        }
        other => MetaResult::Refused(format!("not a cluster change: {other:?}")),
    }
}

struct Shared {
    wal: Arc<Wal>,
    state: Mutex<MetaState>,
    /// The last snapshot built or installed (a few hundred bytes).
    snapshot: Mutex<Option<(Meta, Vec<u8>)>>,
}

impl Shared {
    /// Writes `state` to the WAL and waits until it is durable.
    async fn persist(&self, state: &MetaState) -> Result<(), StorageError<NodeId>> {
        let bytes = state.encode();
        append_durable(&self.wal, META_WAL_GROUP, vec![WalOp::Applied(bytes)]).await.map_err(|e| StorageIOError::write_state_machine(&e).into())
    }
}

/// Cheap to clone; clones share the same state.
#[derive(Clone)]
pub struct MetaStateMachine {
    shared: Arc<Shared>,
}

impl MetaStateMachine {
    /// The state machine resuming from the marker in `wal` (empty for a fresh node).
    pub fn new(wal: Arc<Wal>) -> Result<MetaStateMachine, String> {
        let state = match wal.log_state(META_WAL_GROUP).applied {
            Some(bytes) => MetaState::decode(&bytes).map_err(|e| format!("the cluster metadata in the WAL does not decode: {e}"))?,
            None => MetaState::default(),
        };
        Ok(MetaStateMachine { shared: Arc::new(Shared { wal, state: Mutex::new(state), snapshot: Mutex::new(None) }) })
    }

    /// The cluster metadata, once bootstrapped.
    pub fn cluster(&self) -> Option<ClusterMeta> {
        self.shared.state.lock().unwrap().cluster.clone()
    }

    /// The cluster metadata and the metadata group's log index this state machine applied it
    /// up to (0 for a copy `remember`ed from a voter).
    pub fn cluster_applied(&self) -> (Option<ClusterMeta>, u64) {
        let state = self.shared.state.lock().unwrap();
        (state.cluster.clone(), state.last_applied.map_or(0, |l| l.index))
    }

    /// The lease sessions table (as applied here).
    pub fn leases(&self) -> Leases {
        self.shared.state.lock().unwrap().leases.clone()
    }

    pub fn lease_state(&self, session: u64) -> super::LeaseState {
        self.shared.state.lock().unwrap().leases.state(session)
    }

    pub fn leases_finished_below(&self) -> u64 {
        self.shared.state.lock().unwrap().leases.finished_below()
    }

    /// Keeps `cluster` as learnt from the metadata group (a node that is not a voter), durably,
    /// so that the node restarts without asking again. A state machine that applied entries of
    /// the group (a member, or a former one) keeps its own: what it holds goes with the log
    /// index it applied, and a fetched copy must not replace it under that index.
    pub async fn remember(&self, cluster: ClusterMeta) -> Result<(), String> {
        let state = {
            let mut state = self.shared.state.lock().unwrap();
            if state.last_applied.is_some() {
                return Ok(());
            }
            state.cluster = Some(cluster);
            state.clone()
        };
        self.shared.persist(&state).await.map_err(|e| e.to_string())
    }
}

pub struct MetaSnapshotBuilder {
    shared: Arc<Shared>,
}

impl RaftSnapshotBuilder<MetaTypeConfig> for MetaSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<MetaTypeConfig>, StorageError<NodeId>> {
        let state = self.shared.state.lock().unwrap().clone();
        let bytes = encode_snapshot(&state.cluster, &state.leases);
        let index = state.last_applied.map_or(0, |l| l.index);
        let meta = Meta { last_log_id: state.last_applied, last_membership: state.membership, snapshot_id: format!("meta-index{index}") };
        *self.shared.snapshot.lock().unwrap() = Some((meta.clone(), bytes.clone()));
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) })
    }
}

impl RaftStateMachine<MetaTypeConfig> for MetaStateMachine {
    type SnapshotBuilder = MetaSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        let state = self.shared.state.lock().unwrap();
        Ok((state.last_applied, state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<MetaResult>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<MetaTypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut next = self.shared.state.lock().unwrap().clone();
        if next.last_applied.is_none() {
            // A node that joins the group as a learner may have remembered a fetched copy
            // (`remember`): the group's state starts from its first entry, not from that.
            next.cluster = None;
        }
        let mut results = Vec::new();
        for entry in entries {
            results.push(match entry.payload {
                EntryPayload::Blank => MetaResult::Noop,
                EntryPayload::Membership(membership) => {
                    // The metadata records the group's voters as its own log changed them (in a
                    // joint configuration: the old and the new together).
                    if let Some(cluster) = next.cluster.as_mut() {
                        let voters: Vec<NodeId> = membership.voter_ids().collect();
                        if cluster.metadata_voters != voters {
                            tracing::info!(from = ?cluster.metadata_voters, to = ?voters, "the metadata group's voters changed");
                            cluster.metadata_voters = voters;
                        }
                    }
                    next.membership = StoredMembership::new(Some(entry.log_id), membership);
                    MetaResult::Noop
                }
                EntryPayload::Normal(MetaCommand::Bootstrap(cluster)) => {
                    if next.cluster.is_some() {
                        MetaResult::AlreadyBootstrapped
                    } else {
                        tracing::info!(nodes = cluster.nodes.len(), namespaces = cluster.namespaces.len(), "cluster metadata bootstrapped");
                        next.cluster = Some(cluster);
                        MetaResult::Bootstrapped
                    }
                }
                EntryPayload::Normal(MetaCommand::OpenSession { ttl_ms }) => match next.leases.open(ttl_ms) {
                    Ok(session) => MetaResult::SessionOpened { session },
                    Err(count) => MetaResult::TooManySessions(count),
                },
                EntryPayload::Normal(MetaCommand::EndSession { session, reason }) => {
                    let was_open = next.leases.end(session, reason);
                    if was_open {
                        tracing::info!(session, ?reason, "lease session ends: fencing it in every group");
                    }
                    MetaResult::SessionEnded { was_open }
                }
                EntryPayload::Normal(MetaCommand::SessionFinished { session }) => {
                    next.leases.finish(session);
                    MetaResult::Noop
                }
                EntryPayload::Normal(change) => match next.cluster.as_mut() {
                    Some(cluster) => apply_cluster_change(cluster, change),
                    None => MetaResult::Refused("the cluster is not bootstrapped yet".into()),
                },
            });
            next.last_applied = Some(entry.log_id);
        }
        // Durable first, then visible: a restart never finds less than was reported applied.
        self.shared.persist(&next).await?;
        *self.shared.state.lock().unwrap() = next;
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        MetaSnapshotBuilder { shared: self.shared.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &Meta, snapshot: Box<Cursor<Vec<u8>>>) -> Result<(), StorageError<NodeId>> {
        let bytes = snapshot.into_inner();
        let (cluster, leases) = decode_snapshot(&bytes).map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let next = MetaState { last_applied: meta.last_log_id, membership: meta.last_membership.clone(), cluster, leases };
        self.shared.persist(&next).await?;
        *self.shared.state.lock().unwrap() = next;
        *self.shared.snapshot.lock().unwrap() = Some((meta.clone(), bytes));
        tracing::info!(snapshot = %meta.snapshot_id, "installed metadata snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<MetaTypeConfig>>, StorageError<NodeId>> {
        let current = self.shared.snapshot.lock().unwrap().clone();
        Ok(current.map(|(meta, bytes)| Snapshot { meta, snapshot: Box::new(Cursor::new(bytes)) }))
    }
}
