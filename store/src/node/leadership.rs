//! Leadership balance: each group has a preferred leader (`ClusterMeta::preferred_leaders`,
//! spread evenly over the nodes), and a node that leads a group it is not preferred for hands
//! the group over once the preferred replica is up and has caught up. So leadership returns to
//! a node after it restarts, rather than staying with the nodes that took over meanwhile.
//!
//! openraft 0.9 has no leadership transfer; this one is built from its parts:
//! 1. the leader closes its write gate (`Group::write_gate`): writes in flight finish, new ones
//!    wait (they are answered NotLeader once the gate opens again: nothing was proposed);
//! 2. it waits until the target's log holds its whole log (the target acknowledged it);
//! 3. it asks the target to campaign (`Request::Campaign`): the target starts an election at
//!    once (`Trigger::elect`), with a log at least as long as anyone's;
//! 4. the old leader grants that vote: openraft refuses a vote while a leader lease lasts, but
//!    a leader's lease counts from its own election, which lies more than `LEAD_SETTLE` back.
//!    Granting it makes the old leader a follower; the target has its quorum.
//!
//! Step 4 gives the target two votes, its own and the old leader's: enough in a group of up to
//! three voters only (the other followers keep the leader's lease while heartbeats come), so
//! larger groups are never handed over (a campaign that cannot win only bumps the term and
//! costs the group an election).
//!
//! Safety rests on Raft alone: the transfer is an ordinary election, which the target can only
//! win with a log holding every committed entry. Should any step fail (the target is down, a
//! write slipped in, another node won), the group elects as it would after any lost leader;
//! the old leader tries that group again only after `RETRY_AFTER`.
//!
//! The same hand-over runs before a move takes a group's leader out of the group
//! (`hand_over_before_leaving`): without it the new voters commit, the old leader stops, and
//! the group has no leader for an election timeout or two, so every client that touches it
//! waits (measured: a roster change that moved 12 groups this way left the cluster at under
//! 100 operations a second for 18 s).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::{Group, Node};
use crate::meta::ClusterMetaExt as _;
use crate::protocol::{ErrorReply, Request, Response};
use crate::raft::NodeId;

/// How often a node looks at the groups it leads.
const POLL: Duration = Duration::from_secs(1);
/// A node hands a group over only after leading it this long (or twice the election timeout's
/// upper end, if longer): its leader lease (counted from its election, that upper end) has
/// then run out, so it can grant the target's vote, and a group whose leadership just changed
/// gets time to settle.
const LEAD_SETTLE: Duration = Duration::from_secs(5);
/// After a failed hand-over, the group is left alone this long.
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// Hand-overs a node starts per round.
const TRANSFERS_PER_ROUND: usize = 4;
/// How long the write gate waits for writes in flight, and for the target to catch up.
const QUIESCE: Duration = Duration::from_secs(1);
/// How long the old leader waits for the target's election.
const ELECTION_WAIT: Duration = Duration::from_secs(1);
/// A peer whose health report is older than this is taken for down: no hand-over to it.
const PEER_FRESH: Duration = Duration::from_secs(3);
/// Before a move, a leader hands the group over once it has led this much longer than the
/// leader lease (openraft's: the election timeout's upper end), so that it can grant the vote.
const LEASE_MARGIN: Duration = Duration::from_millis(500);

/// What the loop remembers between rounds.
#[derive(Default)]
struct Balancer {
    /// (namespace, group) → when a failed hand-over may be tried again.
    backoff: HashMap<(String, u32), Instant>,
}

/// What a node knows of the groups it leads, shared by the balance loop and moves.
#[derive(Default)]
pub(super) struct Leading {
    /// (namespace, group) → the term this node leads it in, and since when it saw that.
    since: Mutex<HashMap<(String, u32), (u64, Instant)>>,
    /// (namespace, group) → the replicas of the move it was last handed over for (once per move).
    handed_for_move: Mutex<HashMap<(String, u32), BTreeSet<NodeId>>>,
}

impl Leading {
    /// How long this node has led `key` in `term`, as far as it saw (from now if it just saw it).
    fn led_for(&self, key: &(String, u32), term: u64) -> Duration {
        let mut since = self.since.lock().unwrap();
        match since.get(key) {
            Some(&(led_term, at)) if led_term == term => at.elapsed(),
            _ => {
                since.insert(key.clone(), (term, Instant::now()));
                Duration::ZERO
            }
        }
    }
}

/// Whether a hand-over can win: the target gets two votes, its own and the old leader's.
fn two_votes_elect(voters: usize) -> bool {
    voters <= 3
}

/// Every node's loop: hands the groups it leads to their preferred leaders. Ends when the node
/// stops.
pub(super) async fn balance_leadership(node: Weak<Node>) {
    let mut balancer = Balancer::default();
    loop {
        tokio::time::sleep(POLL).await;
        let Some(node) = node.upgrade() else { return };
        if node.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        node.balance_round(&mut balancer).await;
    }
}

impl Node {
    /// Notes since when this node leads each group it leads and, if `balance-leaders` is on,
    /// hands groups to their preferred leaders.
    async fn balance_round(&self, balancer: &mut Balancer) {
        let Some(joined) = self.joined.get() else { return };
        let cluster = joined.cluster.read().unwrap().clone();
        let preferred = cluster.preferred_leaders();
        let me = self.config.node_id;
        let now = Instant::now();
        let settle = LEAD_SETTLE.max(Duration::from_millis(2 * self.config.election_timeout_ms.1));
        let mut still_leading = HashSet::new();
        let mut candidates = Vec::new();
        for (name, hosted) in &joined.namespaces {
            let Some(ns) = cluster.namespace(name) else { continue };
            for (g, group) in hosted.groups() {
                let metrics = group.raft.metrics().borrow().clone();
                if metrics.current_leader != Some(me) {
                    continue;
                }
                let key = (name.clone(), g);
                let led_for = self.leading.led_for(&key, metrics.current_term);
                still_leading.insert(key.clone());
                if !self.config.balance_leaders {
                    continue;
                }
                let Some(&target) = preferred.get(name).and_then(|p| p.get(g as usize)) else { continue };
                if target == me || led_for < settle || ns.moves.contains_key(&g) {
                    continue;
                }
                if balancer.backoff.get(&key).is_some_and(|until| now < *until) {
                    continue;
                }
                // Only between the voters of a settled membership (no change under way).
                let membership = metrics.membership_config.membership();
                if membership.get_joint_config().len() != 1 || !membership.voter_ids().any(|id| id == target) {
                    continue;
                }
                if !two_votes_elect(membership.voter_ids().count()) {
                    continue;
                }
                if !self.peer_is_up(target) {
                    continue;
                }
                candidates.push((key, group, target));
            }
        }
        self.leading.since.lock().unwrap().retain(|key, _| still_leading.contains(key));
        self.leading.handed_for_move.lock().unwrap().retain(|key, _| still_leading.contains(key));
        balancer.backoff.retain(|_, until| now < *until);
        for ((namespace, g), group, target) in candidates.into_iter().take(TRANSFERS_PER_ROUND) {
            match self.hand_over(&namespace, g, &group, target).await {
                Ok(()) => tracing::info!(namespace, group = g, to = target, "handed leadership to the preferred leader"),
                Err(why) => {
                    tracing::info!(namespace, group = g, to = target, %why, "leadership stays here for now");
                    balancer.backoff.insert((namespace, g), Instant::now() + RETRY_AFTER);
                }
            }
        }
    }

    /// Whether `peer` reported its health recently (every node does, once a second).
    fn peer_is_up(&self, peer: NodeId) -> bool {
        self.peer_health.lock().unwrap().get(&peer).is_some_and(|h| h.received.elapsed() < PEER_FRESH)
    }

    /// Before a move that leaves this leader out of `group` (the new `replicas`): hands the
    /// group to a voter that stays, once per move, so that it never goes without a leader.
    /// Some(answer) for the move's step when it waits for that or did it; None when the move
    /// goes on here (this node stays, the group is mid-change or too large for a hand-over, no
    /// staying voter is up, or the hand-over was tried).
    pub(super) async fn hand_over_before_leaving(&self, namespace: &str, g: u32, group: &Group, replicas: &[NodeId]) -> Option<Response> {
        let me = self.config.node_id;
        let metrics = group.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        if replicas.contains(&me) || membership.get_joint_config().len() != 1 || metrics.current_leader != Some(me) {
            return None;
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if !two_votes_elect(voters.len()) {
            return None;
        }
        let successor = replicas.iter().copied().find(|id| voters.contains(id) && self.peer_is_up(*id))?;
        let key = (namespace.to_owned(), g);
        let target: BTreeSet<NodeId> = replicas.iter().copied().collect();
        if self.leading.handed_for_move.lock().unwrap().get(&key) == Some(&target) {
            return None;
        }
        let progress = |stage: String| Some(Response::MoveProgress { done: false, stage });
        if self.leading.led_for(&key, metrics.current_term) < Duration::from_millis(self.config.election_timeout_ms.1) + LEASE_MARGIN {
            return progress(format!("waiting until this leader's lease allows handing the group to node {successor}"));
        }
        self.leading.handed_for_move.lock().unwrap().insert(key, target);
        match self.hand_over(namespace, g, group, successor).await {
            Ok(()) => {
                tracing::info!(namespace, group = g, to = successor, "handed leadership to a replica that stays before the move");
                progress(format!("handed leadership to node {successor}, which stays"))
            }
            Err(why) => {
                tracing::info!(namespace, group = g, to = successor, %why, "no hand-over before the move: the group elects once it moved");
                progress(format!("no hand-over to node {successor}: {why}"))
            }
        }
    }

    /// Hands the leadership of `group` to `target` (steps 1 to 4 above); Err says why not.
    async fn hand_over(&self, namespace: &str, g: u32, group: &Group, target: NodeId) -> Result<(), String> {
        let me = self.config.node_id;
        let _gate = tokio::time::timeout(QUIESCE, group.write_gate.write()).await.map_err(|_| "writes in flight did not finish".to_string())?;
        let deadline = tokio::time::Instant::now() + QUIESCE;
        let last_index = loop {
            let metrics = group.raft.metrics().borrow().clone();
            if metrics.current_leader != Some(me) {
                return Err("no longer the leader".into());
            }
            let last = metrics.last_log_index.unwrap_or(0);
            let matched = metrics.replication.as_ref().and_then(|r| r.get(&target).copied()).flatten().map_or(0, |l| l.index);
            if matched >= last {
                break last;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("node {target} did not catch up: at {matched} of {last}"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let peer = self.peers.get(&target).ok_or_else(|| format!("no connection to node {target}"))?;
        let request = Request::Campaign { namespace: namespace.to_owned(), group: g, last_index };
        match peer.call(&request, QUIESCE).await {
            Ok(Response::Noted) => {}
            Ok(Response::Error(err)) => return Err(format!("node {target} will not campaign: {err}")),
            Ok(other) => return Err(format!("node {target} answered {other:?}")),
            Err(err) => return Err(format!("node {target} unreachable: {err}")),
        }
        let mut watch = group.raft.metrics();
        let stepped_down = tokio::time::timeout(ELECTION_WAIT, async {
            while watch.borrow().current_leader == Some(me) {
                if watch.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        match (stepped_down, group.raft.metrics().borrow().current_leader) {
            (Err(_), _) => Err(format!("still the leader after node {target} campaigned")),
            (Ok(()), Some(leader)) if leader != target => Err(format!("node {leader} won the election instead")),
            (Ok(()), _) => Ok(()),
        }
    }

    /// A leader asks this node to campaign for `group` (it is handing the group over). Refused
    /// unless this node is a voter of the group with a log reaching `last_index`, and not
    /// catching up after losing its copy.
    pub(super) async fn handle_campaign(&self, namespace: &str, g: u32, last_index: u64) -> Response {
        let replica = match self.replica(namespace, g) {
            Ok(replica) => replica,
            Err(reply) => return Response::Error(reply),
        };
        if replica.rejoin().is_active() {
            return Response::Error(ErrorReply::BadRequest("this replica is catching up after losing its copy".into()));
        }
        let metrics = replica.metrics();
        let me = self.config.node_id;
        if !metrics.membership_config.membership().voter_ids().any(|id| id == me) {
            return Response::Error(ErrorReply::BadRequest(format!("node {me} is not a voter of {namespace}/{g}")));
        }
        let have = metrics.last_log_index.unwrap_or(0);
        if have < last_index {
            return Response::Error(ErrorReply::BadRequest(format!("this log reaches {have}, not {last_index}")));
        }
        match replica.elect().await {
            Ok(()) => Response::Noted,
            Err(err) => Response::Error(ErrorReply::Internal(err)),
        }
    }
}
