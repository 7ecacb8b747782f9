//! What the nodes tell each other of themselves, and what a node decides from it: each node
//! reports its stop-writes state and the groups whose copy it lost (`report_health`, every
//! `HEALTH_POLL`, at least every `HEALTH_REFRESH`); a node refuses new writes to a group any
//! of whose replicas is in stop-writes (`stop_writes`), and finds a group dead when a quorum of
//! its voters lost their copies (`is_dead`).
//!
//! Invariants:
//! - **A write one replica has no room for is refused before it is proposed**: every replica
//!   applies every committed write, so it would stall that replica's apply.
//! - **A peer not heard from in `HEALTH_FORGET` counts as down**: its old report holds no write
//!   back.

use super::*;

impl Node {
    /// Why a new write to `group` must be refused, if it must: this node's engine is in
    /// stop-writes, or another replica of the group reported that its engine is. Every replica
    /// applies every committed write, so a write one replica has no room for would stall that
    /// replica's apply (see `apply_when_there_is_room`); deletes still go through, to free room.
    pub(super) fn stop_writes(&self, namespace: &str, hosted: &HostedNamespace, group: &Group) -> Option<String> {
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
    pub(super) fn is_dead(&self, namespace: &str, id: u32, group: &Group) -> bool {
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
    pub(super) fn lost_among(&self, voters: &[NodeId], key: &(String, u32), me_lost: bool) -> Vec<NodeId> {
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
    pub(super) fn answered_lately(&self, id: NodeId) -> bool {
        self.answering_for(id).is_some()
    }

    /// How long node `id` has been answering this node's health reports without a gap (None
    /// if it has not answered lately; the longest time for this node itself).
    pub(super) fn answering_for(&self, id: NodeId) -> Option<Duration> {
        if id == self.config.node_id {
            return Some(Duration::MAX);
        }
        let answering = *self.peer_answered.lock().unwrap().get(&id)?;
        (answering.last.elapsed() < 2 * HEALTH_REFRESH).then(|| answering.since.elapsed())
    }

    /// The groups whose replica here lost its copy and catches up.
    pub(super) fn lost_copies(&self) -> Vec<(String, u32)> {
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

    pub(super) fn note_health(&self, node: NodeId, stop_writes: Vec<(String, String)>, lost: Vec<(String, u32)>) -> Response {
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
        health.insert(node, PeerHealth { stop_writes, lost, received: tokio::time::Instant::now() });
        Response::Noted
    }

    /// The namespaces where this node's engine refuses new writes, with the reason.
    pub(super) fn own_stop_writes(&self) -> Vec<(String, String)> {
        let mut stopped: Vec<(String, String)> = self
            .namespaces()
            .into_iter()
            .flatten()
            .filter_map(|(name, hosted)| hosted.engine.stop_writes_reason().map(|reason| (name.clone(), reason)))
            .collect();
        stopped.sort();
        stopped
    }
}

/// A peer's answers to this node's health reports.
#[derive(Clone, Copy)]
pub(super) struct Answering {
    /// The first answer after a gap of `2 * HEALTH_REFRESH` or more.
    pub(super) since: tokio::time::Instant,
    pub(super) last: tokio::time::Instant,
}

/// What a peer last said of itself.
pub(super) struct PeerHealth {
    /// Namespace → why the peer refuses new writes there.
    pub(super) stop_writes: HashMap<String, String>,
    /// Groups whose replica on the peer lost its copy and catches up.
    pub(super) lost: std::collections::HashSet<(String, u32)>,
    pub(super) received: tokio::time::Instant,
}

/// How often a node looks at its own stop-writes state (and reports it when it changed).
pub(super) const HEALTH_POLL: Duration = Duration::from_millis(50);

/// A node reports its state at least this often, changed or not.
pub(super) const HEALTH_REFRESH: Duration = Duration::from_secs(1);

/// A peer's report older than this is forgotten: a replica not heard from in that long is
/// treated as down (it holds no write back), and reports afresh once it can reach us again.
pub(super) const HEALTH_FORGET: Duration = Duration::from_secs(5);

/// The node's health loop, every `HEALTH_POLL`: lets only the replicas that `may_campaign`
/// start elections, and tells the peers whether this node is in stop-writes, at once
/// when that changes and once a second regardless (a peer that restarted learns it again).
/// Group leaders refuse new writes while any replica of the group is in stop-writes. Ends when
/// the node stops.
pub(super) async fn report_health(node: std::sync::Weak<Node>) {
    #[allow(clippy::type_complexity)]
    let mut sent: Option<(Vec<(String, String)>, Vec<(String, u32)>, tokio::time::Instant)> = None;
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
                        let now = tokio::time::Instant::now();
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
        sent = Some((stop_writes, lost, tokio::time::Instant::now()));
    }
}

/// Whether a group of `voters` replicas, `lost` of which lost their copy (and do not vote), is
/// dead: the others cannot make a quorum. A group with no voters (not initialized) is not.
pub(super) fn lost_quorum(voters: usize, lost: usize) -> bool {
    lost > 0 && voters - lost < voters / 2 + 1
}
