//! Reviving a dead group: one where a majority of the replicas lost their copy for good (their
//! disks wiped), so no leader can be elected (replicas that lost their copy do not vote until
//! they caught up from a leader, see `rejoin`, and there is no leader to catch up from).
//!
//! Reviving accepts a loss to get the group back: it rebuilds the group from its best
//! surviving replica, the one whose log reaches furthest, `(term, index)`. Any entry the group
//! had committed past that log lived only on the lost copies: writes acknowledged with a log
//! index above it are gone, those at or below it are kept. `Revived` says so.
//!
//! Steps (any node orchestrates them, `Request::Revive`):
//! 1. ask every replica its `GroupState`; refuse unless the group is dead (no leader, and the
//!    replicas that lost their copy leave too few for a quorum) and some replica holds entries;
//! 2. tell each replica that lost its copy to grant its vote to the survivor alone
//!    (`ReviveReplica`, `Rejoin::allow_vote_for`); a survivor that had itself lost its copy
//!    once stops catching up;
//! 3. ask the survivor to campaign (`Campaign`); it wins with the votes of the replicas that
//!    lost their copy (their logs are not longer than its), and they catch up from it.
//!
//! A replica whose disk is intact is never asked to give anything up: an intact replica with
//! a longer log would have been chosen as the survivor.
//!
//! The metadata group is revived the same way (`chunkctl revive '$meta' 0`), its replicas being
//! the metadata voters; its steps are answered before a node joined (see `metadata`).

use std::sync::Arc;
use std::time::Duration;

use openraft::{BasicNode, RaftMetrics};

use super::metadata::MetaGroup;
use super::{rejoin::Rejoin, Group, Node};
use crate::meta::{META_NAMESPACE, META_WAL_GROUP};
use crate::protocol::{ErrorReply, Request, Response};
use crate::raft::NodeId;

/// How long a replica has to answer each step.
const STEP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the survivor has to be elected.
const ELECTION_DEADLINE: Duration = Duration::from_secs(10);

/// One replica's answer to `GroupState`.
#[derive(Clone, Copy, Debug)]
struct ReplicaState {
    id: NodeId,
    last_log: Option<(u64, u64)>,
    vote_term: u64,
    lost_copy: bool,
    leader: Option<NodeId>,
}

/// This node's replica of a group, of a namespace or of the metadata, for the steps that treat
/// both alike (reviving, handing leadership over).
pub(super) enum Replica<'a> {
    Partition(Arc<Group>),
    Metadata(&'a MetaGroup),
}

impl Replica<'_> {
    pub(super) fn metrics(&self) -> RaftMetrics<NodeId, BasicNode> {
        match self {
            Replica::Partition(group) => group.raft.metrics().borrow().clone(),
            Replica::Metadata(meta) => meta.raft.metrics().borrow().clone(),
        }
    }

    pub(super) fn rejoin(&self) -> &Rejoin {
        match self {
            Replica::Partition(group) => &group.rejoin,
            Replica::Metadata(meta) => &meta.rejoin,
        }
    }

    fn wal_group(&self) -> u32 {
        match self {
            Replica::Partition(group) => group.wal_group,
            Replica::Metadata(_) => META_WAL_GROUP,
        }
    }

    /// Starts an election at once.
    pub(super) async fn elect(&self) -> Result<(), String> {
        let started = match self {
            Replica::Partition(group) => group.raft.trigger().elect().await,
            Replica::Metadata(meta) => meta.raft.trigger().elect().await,
        };
        started.map_err(|err| err.to_string())
    }
}

impl Node {
    /// This node's replica of `namespace`'s group `g` (`$meta` 0: the metadata group), or the
    /// error saying it has none.
    pub(super) fn replica(&self, namespace: &str, g: u32) -> Result<Replica<'_>, ErrorReply> {
        let found = match namespace == META_NAMESPACE {
            true => self.meta.get().filter(|_| g == 0).map(Replica::Metadata),
            false => self.namespaces().and_then(|n| n.get(namespace)).and_then(|h| h.group(g)).map(Replica::Partition),
        };
        found.ok_or_else(|| ErrorReply::BadRequest(format!("group {namespace}/{g} is not replicated here")))
    }

    /// This node's replica of `namespace`'s group `g`, for `GroupState`.
    pub(super) fn handle_group_state(&self, namespace: &str, g: u32) -> Response {
        let replica = match self.replica(namespace, g) {
            Ok(replica) => replica,
            Err(reply) => return Response::Error(reply),
        };
        let metrics = replica.metrics();
        let last_log = self.wal.log_state(replica.wal_group()).last.map(|(index, term)| (term, index));
        Response::GroupState { last_log, vote_term: metrics.vote.leader_id().term, lost_copy: replica.rejoin().is_active(), leader: metrics.current_leader }
    }

    /// Step 2 at a replica: grant the survivor's vote (see the module's comment).
    pub(super) fn handle_revive_replica(&self, namespace: &str, g: u32, survivor: NodeId, last_index: u64) -> Response {
        let replica = match self.replica(namespace, g) {
            Ok(replica) => replica,
            Err(reply) => return Response::Error(reply),
        };
        let rejoin = replica.rejoin();
        if !rejoin.is_active() {
            return Response::Noted;
        }
        if survivor == self.config.node_id {
            tracing::warn!(namespace, group = g, "revived from this replica, which had lost its copy and caught up part of the way");
            rejoin.finish();
        } else {
            tracing::warn!(namespace, group = g, survivor, last_index, "the group is revived: this replica votes for the survivor");
            rejoin.allow_vote_for(survivor, last_index);
        }
        Response::Noted
    }

    /// Revives `namespace`'s dead group `g` (steps 1 to 3 of the module's comment).
    pub(super) async fn handle_revive(&self, namespace: &str, g: u32) -> Response {
        let replicas = match namespace == META_NAMESPACE {
            true if g == 0 => self.metadata_voters(),
            true => return Response::Error(ErrorReply::BadRequest(format!("the metadata group is {META_NAMESPACE} 0, not {g}"))),
            false => match self.placement_of(namespace, g) {
                Ok(replicas) => replicas,
                Err(reply) => return Response::Error(reply),
            },
        };
        if replicas.is_empty() {
            return Response::Error(ErrorReply::NotLeader { leader: None });
        }
        let states = self.replica_states(namespace, g, &replicas).await;
        let survivor = match choose_survivor(&replicas, &states) {
            Ok(survivor) => survivor,
            Err(why) => return Response::Error(ErrorReply::BadRequest(format!("cannot revive {namespace}/{g}: {why}"))),
        };
        let (last_term, last_index) = survivor.last_log.unwrap_or((0, 0));
        tracing::warn!(namespace, group = g, survivor = survivor.id, last_term, last_index, "reviving a dead group from its best surviving replica");
        let step = Request::ReviveReplica { namespace: namespace.to_owned(), group: g, survivor: survivor.id, last_index };
        for state in states.iter().filter(|s| s.lost_copy) {
            match self.call_node(state.id, &step).await {
                Ok(Response::Noted) => {}
                other => return Response::Error(ErrorReply::Internal(format!("node {} did not take the revive step: {other:?}", state.id))),
            }
        }
        let campaign = Request::Campaign { namespace: namespace.to_owned(), group: g, last_index };
        let deadline = tokio::time::Instant::now() + ELECTION_DEADLINE;
        loop {
            let leader = match self.call_node(survivor.id, &Request::GroupState { namespace: namespace.to_owned(), group: g }).await {
                Ok(Response::GroupState { leader, .. }) => leader,
                _ => None,
            };
            if leader == Some(survivor.id) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Response::Error(ErrorReply::Internal(format!("node {} was not elected within {ELECTION_DEADLINE:?}", survivor.id)));
            }
            if leader.is_none() {
                // Refused while it still catches up, or answered before its election ended.
                let _ = self.call_node(survivor.id, &campaign).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let mut report = format!(
            "{namespace}/{g} revived from node {}, whose log reaches index {last_index} (term {last_term}). \
             Entries after index {last_index} were not on it: writes to this group acknowledged with an index \
             above {last_index} are lost, if the group had committed any; those at or below it are kept.",
            survivor.id
        );
        if survivor.vote_term > last_term {
            report.push_str(&format!(
                " Node {} had voted in term {}: leaders of terms after {last_term} may have committed entries it never received.",
                survivor.id, survivor.vote_term
            ));
        }
        Response::Revived { survivor: survivor.id, last_term, last_index, report }
    }

    /// The replicas the cluster metadata places `namespace`'s group `g` on.
    fn placement_of(&self, namespace: &str, g: u32) -> Result<Vec<NodeId>, ErrorReply> {
        let joined = self.joined.get().ok_or(ErrorReply::NotLeader { leader: None })?;
        let cluster = joined.cluster.read().unwrap();
        let ns = cluster.namespace(namespace).ok_or_else(|| ErrorReply::UnknownNamespace(namespace.to_owned()))?;
        ns.placement.get(g as usize).cloned().ok_or_else(|| ErrorReply::BadRequest(format!("namespace {namespace} has {} groups, not {g}", ns.groups)))
    }

    /// Every replica's `GroupState` that answered (this node's own included).
    async fn replica_states(&self, namespace: &str, g: u32, replicas: &[NodeId]) -> Vec<ReplicaState> {
        let request = Request::GroupState { namespace: namespace.to_owned(), group: g };
        let mut states = Vec::new();
        for &id in replicas {
            if let Ok(Response::GroupState { last_log, vote_term, lost_copy, leader }) = self.call_node(id, &request).await {
                states.push(ReplicaState { id, last_log, vote_term, lost_copy, leader });
            }
        }
        states
    }

    /// Sends `request` to node `id` (this node answers its own).
    async fn call_node(&self, id: NodeId, request: &Request) -> Result<Response, String> {
        if id == self.config.node_id {
            return Ok(Box::pin(self.handle(request.clone())).await);
        }
        let peer = self.peers.get(&id).ok_or_else(|| format!("no connection to node {id}"))?;
        peer.call(request, STEP_TIMEOUT).await.map_err(|err| err.to_string())
    }
}

/// The replica to revive from: the group must be dead (no replica knows a leader, and those
/// that lost their copy leave fewer than a quorum), and the survivor is the replica whose log
/// reaches furthest (term, then index; ties to one that kept its copy, then the lowest id).
fn choose_survivor(replicas: &[NodeId], states: &[ReplicaState]) -> Result<ReplicaState, String> {
    if let Some(led) = states.iter().find(|s| s.leader.is_some()) {
        return Err(format!("it is not dead: node {} knows its leader, node {}", led.id, led.leader.unwrap_or_default()));
    }
    let lost = states.iter().filter(|s| s.lost_copy).count();
    let quorum = replicas.len() / 2 + 1;
    if replicas.len() - lost >= quorum {
        let silent: Vec<NodeId> = replicas.iter().copied().filter(|id| !states.iter().any(|s| s.id == *id)).collect();
        return Err(format!(
            "it is not dead: only {lost} of its {} replicas lost their copy (replicas not answering: {silent:?}); \
             it comes back by itself once a quorum of replicas with their copy is up",
            replicas.len()
        ));
    }
    let best =
        states.iter().filter(|s| s.last_log.is_some_and(|(_, index)| index > 0)).max_by_key(|s| (s.last_log, !s.lost_copy, std::cmp::Reverse(s.id))).copied();
    best.ok_or_else(|| {
        let answered: Vec<NodeId> = states.iter().map(|s| s.id).collect();
        format!("no replica that answered ({answered:?} of {replicas:?}) holds any of its entries")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(id: NodeId, last_log: Option<(u64, u64)>, lost_copy: bool) -> ReplicaState {
        ReplicaState { id, last_log, vote_term: 0, lost_copy, leader: None }
    }

    #[test]
    fn the_survivor_is_the_longest_log_of_a_dead_group() {
        let replicas = [1, 2, 3];
        // Two lost their copy; the one that caught up part of the way is shorter than node 1.
        let states = [state(1, Some((3, 40)), false), state(2, None, true), state(3, Some((3, 12)), true)];
        assert_eq!(choose_survivor(&replicas, &states).unwrap().id, 1);
        // Term first, then index.
        let states = [state(1, Some((2, 90)), false), state(2, Some((3, 12)), true), state(3, None, true)];
        assert_eq!(choose_survivor(&replicas, &states).unwrap().id, 2);
    }

    #[test]
    fn a_group_that_is_only_unavailable_or_led_is_not_revived() {
        let replicas = [1, 2, 3];
        // One lost copy, one replica silent: unavailable, not dead.
        let err = choose_survivor(&replicas, &[state(1, Some((3, 40)), false), state(2, None, true)]).unwrap_err();
        assert!(err.contains("not dead") && err.contains("[3]"), "{err}");
        let mut led = state(1, Some((3, 40)), false);
        led.leader = Some(1);
        let err = choose_survivor(&replicas, &[led, state(2, None, true), state(3, None, true)]).unwrap_err();
        assert!(err.contains("knows its leader"), "{err}");
        // Dead, but nothing survives among those that answered.
        let err = choose_survivor(&replicas, &[state(2, None, true), state(3, None, true)]).unwrap_err();
        assert!(err.contains("holds any of its entries"), "{err}");
    }
}
