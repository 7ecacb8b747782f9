//! One step of changing a Raft group's voters, the same for a partition group moving and for
//! the metadata group handing a voter's place to another node: learners first, caught up,
//! then openraft's joint consensus.
//!
//! Invariant: **a node votes in a group only once it holds the group's log to within
//! `CATCH_UP_LAG` entries** (it was a learner until then).

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::{BasicNode, ChangeMembers};

use super::raft_network::NetworkTypes;
use crate::raft::NodeId;

/// A learner within this many entries of the leader's log has caught up: the membership
/// change that makes it a voter follows.
const CATCH_UP_LAG: u64 = 64;

/// One step of changing the voters of the Raft group `raft` leads (`what` names it in the log)
/// to `target`; repeated until it answers done, with the stage it reached. It adds the nodes
/// new to the group as learners (`peer` gives their addresses), waits until each has caught up
/// (a snapshot, then the log) to within `CATCH_UP_LAG` entries, then changes the voters
/// (openraft's joint consensus: a quorum of the old voters and of the new ones commits every
/// entry in between), and last removes learners a change left behind. Each call waits at most
/// `timeout` per Raft change.
pub(super) async fn change_voters_step<C: NetworkTypes<Responder = openraft::impls::OneshotResponder<C>>>(
    raft: &openraft::Raft<C>,
    target: &BTreeSet<NodeId>,
    peer: impl Fn(NodeId) -> Option<String>,
    timeout: Duration,
    what: &str,
) -> (bool, String) {
    let metrics = raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership().clone();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    if voters == *target {
        let stray: BTreeSet<NodeId> = membership.learner_ids().filter(|id| !target.contains(id)).collect();
        if stray.is_empty() {
            return (true, "moved".into());
        }
        return match tokio::time::timeout(timeout, raft.change_membership(ChangeMembers::RemoveNodes(stray.clone()), false)).await {
            Ok(Ok(_)) => (true, format!("moved; learners {stray:?} removed")),
            Ok(Err(err)) => (false, format!("removing learners {stray:?}: {err}")),
            Err(_) => (false, format!("removing learners {stray:?}")),
        };
    }
    for id in target.iter().copied().filter(|id| membership.get_node(id).is_none()) {
        let Some(address) = peer(id) else {
            return (false, format!("node {id} is not known here yet"));
        };
        match tokio::time::timeout(timeout, raft.add_learner(id, BasicNode::new(address), false)).await {
            Ok(Ok(_)) => tracing::info!(group = what, learner = id, "added a learner: it catches up before it votes"),
            Ok(Err(err)) => return (false, format!("adding node {id} as a learner: {err}")),
            Err(_) => return (false, format!("adding node {id} as a learner")),
        }
    }
    let metrics = raft.metrics().borrow().clone();
    let last = metrics.last_log_index.unwrap_or(0);
    for id in target.iter().filter(|id| !voters.contains(id)) {
        // None: the learner has not acknowledged any entry yet (it may not even run the
        // group yet): however short the log, it has not caught up.
        let matched = metrics.replication.as_ref().and_then(|r| r.get(id).copied()).flatten().map(|l| l.index);
        match matched {
            Some(matched) if last.saturating_sub(matched) <= CATCH_UP_LAG => {}
            Some(matched) => return (false, format!("node {id} catching up: at {matched} of {last}")),
            None => return (false, format!("node {id} has not acknowledged any entry yet")),
        }
    }
    match tokio::time::timeout(timeout, raft.change_membership(target.clone(), false)).await {
        Ok(Ok(_)) => {
            tracing::info!(group = what, from = ?voters, to = ?target, "the group's voters changed");
            (true, "voters changed".into())
        }
        Ok(Err(err)) => (false, format!("changing voters: {err}")),
        Err(_) => (false, "changing voters".into()),
    }
}
