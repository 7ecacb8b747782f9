//! Leaders out of touch. openraft 0.9 has no leader step-down: a leader cut off from its
//! followers, or paused and resumed, goes on believing it leads until a message from a newer
//! term reaches it. Requests sent to it meanwhile (by clients, or by the metadata leader
//! fencing a session) would wait the whole request timeout and then end in doubt, while the
//! rest of its group elected another leader long before.
//!
//! So a leader that has not heard from a quorum of its group for longer than an election
//! timeout (`millis_since_quorum_ack`, which openraft refreshes at every tick) counts as out
//! of touch: it turns new requests away at once (NotLeader with no leader named: nothing was
//! proposed), names no leader for the group in the cluster map it hands out, and gives up on
//! requests it was already serving as soon as it falls out of touch (`while_in_touch`).
//!
//! Followers cut off. openraft 0.9 has no pre-vote either: a replica that hears no leader
//! campaigns again and again, each time in a higher term, even when it can reach no one. When
//! its links come back, that term reaches the group's leader, which steps down, and the whole
//! group goes without a leader for another election; on the way, lease sessions wait to be
//! fenced and their locks stay held. So a replica campaigns only while enough of its group's
//! voters answered it lately that, with its own vote, they are a majority (`may_campaign`;
//! what counts is the answer to the health report every node sends each peer each second, a
//! round trip, so a cut in either direction counts). It still votes, and an election asked
//! for on purpose (a leadership hand-over) still runs.
//!
//! Replicas on their way out. A membership change that leaves a replica out reaches it as the
//! joint configuration; the leader stops sending to it once the new one is appended, so it
//! hears no leader from then on, and would campaign (in vain: the new voters hold the
//! leader's lease) in ever higher terms until the metadata tells its node to stop it. That
//! term stays with its stored vote; should the group ever move back to it, the first message
//! it answers deposes the group's leader (seen: a 3 s stall when a roster change undid an
//! earlier one). So a replica left out of the change under way never campaigns (`leaving`).
//!
//! Safety does not rest on any of this: a deposed leader cannot commit, and linearizable reads
//! still confirm leadership with a quorum; a replica that does not campaign only leaves the
//! election to the others. Only how soon clients find the new leader does.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use openraft::{BasicNode, RaftMetrics};
use tokio::sync::watch;

use super::metadata::MetaGroup;
use super::{Group, Node};
use crate::raft::NodeId;

type Metrics = RaftMetrics<NodeId, BasicNode>;

/// How often a request in flight looks whether its leader is still in touch (polled, not woken
/// by every metrics change: those come with every turn of the group's Raft loop).
const TOUCH_POLL: Duration = Duration::from_millis(100);

/// How long a peer must have answered without a gap before it counts toward a quorum this node
/// could win an election with: many heartbeat intervals (`heartbeat-ms`), so that a leader
/// reaches a node whose cut healed before the node may campaign.
const ANSWERING_HOLD: Duration = Duration::from_secs(2);

impl Node {
    /// Whether this node leads the group whose metrics these are, but has not heard from a
    /// quorum of it for longer than the election timeout's upper end.
    pub(super) fn leads_out_of_touch(&self, metrics: &Metrics) -> bool {
        metrics.current_leader == Some(self.config.node_id) && metrics.millis_since_quorum_ack.is_some_and(|ms| ms > self.config.election_timeout_ms.1)
    }

    /// `leads_out_of_touch` for a data group.
    pub(super) fn out_of_touch(&self, group: &Group) -> bool {
        self.leads_out_of_touch(&group.raft.metrics().borrow())
    }

    /// Awaits `work`, which this node serves as the leader of the group `metrics` watches, for
    /// at most the request timeout, and no longer than this node stays in touch with a quorum
    /// of the group. None when it gave up: the caller answers as it would after a timeout.
    pub(super) async fn while_in_touch<T>(&self, metrics: watch::Receiver<Metrics>, work: impl Future<Output = T>) -> Option<T> {
        let lost_touch = async {
            let mut poll = tokio::time::interval(TOUCH_POLL);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                poll.tick().await;
                if self.leads_out_of_touch(&metrics.borrow()) {
                    return;
                }
            }
        };
        tokio::select! {
            done = work => Some(done),
            () = tokio::time::sleep(self.config.request_timeout) => None,
            () = lost_touch => None,
        }
    }

    /// Whether enough of the group's voters (as `metrics` show them) have answered this node
    /// steadily for `ANSWERING_HOLD` that they and itself make a majority of them: otherwise
    /// it could not win an election. (The
    /// hold lets a leader reach a node whose cut just healed before the node, which has heard no
    /// leader for the whole cut, may campaign: else it would, at once, in a higher term.)
    fn hears_a_quorum_of(&self, metrics: &Metrics) -> bool {
        let voters: BTreeSet<NodeId> = metrics.membership_config.membership().voter_ids().collect();
        let heard = voters.iter().filter(|id| self.answering_for(**id).is_some_and(|d| d >= ANSWERING_HOLD)).count();
        heard * 2 > voters.len()
    }

    /// Whether this replica may start an election when it hears no leader: not while its
    /// apply waits for device space (as leader it would commit writes it could not answer),
    /// not while it catches up after losing its copy, and not while it is cut off from most of
    /// the group (its campaigns would only raise the term and depose the leader later).
    /// And not while a membership change under way leaves it out (`leaving`).
    pub(super) fn may_campaign(&self, group: &Group) -> bool {
        let metrics = group.raft.metrics().borrow().clone();
        !group.state_machine.is_waiting_for_room() && !group.rejoin.is_active() && !self.leaving(&metrics) && self.hears_a_quorum_of(&metrics)
    }

    /// `may_campaign` for the metadata group; also not once the group removed this node.
    pub(super) fn may_campaign_for_metadata(&self, meta: &MetaGroup) -> bool {
        let metrics = meta.raft.metrics().borrow().clone();
        !meta.rejoin.is_active() && !self.removed_from_metadata() && !self.leaving(&metrics) && self.hears_a_quorum_of(&metrics)
    }

    /// Whether the membership change under way (a joint configuration) leaves this node out.
    fn leaving(&self, metrics: &Metrics) -> bool {
        let joint = metrics.membership_config.membership().get_joint_config();
        joint.len() > 1 && joint.last().is_some_and(|new| !new.contains(&self.config.node_id))
    }
}
