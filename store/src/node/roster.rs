//! The roster at a node: joining a running cluster, following the cluster metadata (hosting
//! the groups that move here, stopping those that moved away), and, at the metadata leader,
//! rebalancing: moving groups whose replicas are not where the roster puts them, a few at a
//! time (`meta::MOVES_AT_ONCE`).
//!
//! A move of a group to new replicas, step by step:
//! 1. the metadata leader records it (`MetaCommand::StartMove`); nodes in the new replicas
//!    start the group's Raft instance, empty;
//! 2. it asks the group's leader to move the group (`Request::MoveGroup`, repeated until
//!    done): a leader the move leaves out first hands the group to a voter that stays
//!    (`leadership`), so the group is never without a leader; the leader adds the new nodes as learners, waits until each has caught up (a
//!    snapshot, then the log) to within `CATCH_UP_LAG` entries, then changes the group's voters
//!    to the new replicas (openraft's joint consensus: a quorum of the old voters and of the new
//!    ones commits every entry in between);
//! 3. the metadata leader records the new membership (`MetaCommand::FinishMove`); nodes no
//!    longer in the group stop their replica.
//!
//! Invariants:
//! - **A group's voters change only by its own Raft log** (steps 2); the metadata only records
//!   what the group decided, after it decided it.
//! - **A node stops a replica only once the metadata says the group left it**, after the group
//!   committed a membership without it.
//! - **A replica that stopped is forgotten, all but its vote** (`reclaim`): its records' space is
//!   reclaimed, and should the group come back, it comes back empty, and catches up from the
//!   group's leader before it votes (`rejoin`).

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::membership::change_voters_step;
use super::{metadata, Node};
use crate::meta::ClusterMetaExt as _;
use crate::meta::{self, ClusterMeta, MetaCommand, MetaResult, NodeInfo};
use crate::protocol::{ErrorReply, MoveStage, Request, Response};
use crate::raft::NodeId;

/// How often a node compares the groups it hosts with the cluster metadata.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// How often a node that is not a metadata voter asks a voter for the metadata.
const FETCH_EVERY: Duration = Duration::from_secs(1);
/// How often the metadata leader looks for groups to move.
const BALANCE_POLL: Duration = Duration::from_millis(500);
/// How long `route_to_group_leader` waits for a replica that sent no health report lately.
const SILENT_REPLICA_TIMEOUT: Duration = Duration::from_secs(1);

impl Node {
    /// Asks the metadata leader to add this node (`info`) to the cluster, until the cluster
    /// metadata has it; returns that metadata. Logs why while it is refused.
    pub(super) async fn join_as_new_node(&self, info: NodeInfo) -> ClusterMeta {
        let mut next_report = tokio::time::Instant::now();
        loop {
            if let Some((cluster, _)) = self.fetch_cluster().await {
                if cluster.node(info.id).is_some() {
                    if self.meta_raft().is_none() {
                        if let Err(err) = self.meta_state.remember(cluster.clone()).await {
                            tracing::warn!(%err, "cannot record the cluster metadata");
                        }
                    }
                    tracing::info!(node = info.id, "joined a running cluster: it owns data once the roster names it");
                    return cluster;
                }
                let outcome = self.call_meta_leader(&cluster, &Request::AddNode { node: info.clone() }).await;
                if tokio::time::Instant::now() >= next_report {
                    match outcome {
                        Ok(_) => tracing::info!("asked the metadata leader to add this node"),
                        Err(err) => tracing::warn!(%err, "the cluster does not take this node yet"),
                    }
                    next_report += Duration::from_secs(5);
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Sends `request` to the metadata leader among `cluster`'s metadata voters, following
    /// NotLeader hints; its answer, or the last error.
    async fn call_meta_leader(&self, cluster: &ClusterMeta, request: &Request) -> Result<Response, ErrorReply> {
        let mut candidates: Vec<NodeId> = cluster.metadata_voters.clone();
        let mut last = ErrorReply::NotLeader { leader: None };
        for _ in 0..8 {
            let Some(id) = candidates.pop() else { break };
            let Some(node) = cluster.node(id) else { continue };
            let peer = self.peers.connect(id, &node.peer);
            match peer.call(request, self.config.request_timeout).await {
                Ok(Response::Error(ErrorReply::NotLeader { leader: Some(leader) })) => candidates.push(leader),
                Ok(Response::Error(reply)) => last = reply,
                Ok(response) => return Ok(response),
                Err(err) => last = ErrorReply::Internal(format!("node {id}: {err}")),
            }
        }
        Err(last)
    }

    pub(super) async fn handle_add_node(&self, node: NodeInfo) -> Response {
        meta_answer(self.propose_meta(MetaCommand::AddNode(node)).await)
    }

    pub(super) async fn handle_forget_node(&self, node: NodeId) -> Response {
        meta_answer(self.propose_meta(MetaCommand::ForgetNode(node)).await)
    }

    pub(super) async fn handle_set_roster(&self, nodes: Vec<NodeId>) -> Response {
        meta_answer(self.propose_meta(MetaCommand::SetRoster(nodes)).await)
    }

    /// One step of moving `namespace`'s `group` to `replicas`, as the group's leader (see the
    /// module's steps). Answers how far the move is; repeated until it answers done.
    pub(super) async fn handle_move_group(&self, namespace: &str, group: u32, replicas: Vec<NodeId>) -> Response {
        let Some(local) = self.namespaces().and_then(|n| n.get(namespace)).and_then(|h| h.group(group)) else {
            return Response::Error(ErrorReply::NotLeader { leader: None });
        };
        let me = self.config.node_id;
        let leader = local.raft.metrics().borrow().current_leader;
        if leader != Some(me) {
            return Response::Error(ErrorReply::NotLeader { leader });
        }
        // Only the move the metadata records: a driver acting on stale metadata (a metadata
        // leader that lost its place) would otherwise change the voters back and forth.
        let cluster = self.joined.get().map(|j| j.cluster.read().unwrap().clone());
        if cluster.as_ref().and_then(|c| c.namespace(namespace)).and_then(|ns| ns.moves.get(&group)) != Some(&replicas) {
            let stage = format!("the metadata at node {me} does not record a move of {namespace}/{group} to {replicas:?}");
            return Response::MoveProgress { done: false, stage };
        }
        if let Some(answer) = self.hand_over_before_leaving(namespace, group, &local, &replicas).await {
            return answer;
        }
        let target: BTreeSet<NodeId> = replicas.iter().copied().collect();
        let peer = |id: NodeId| cluster.as_ref().and_then(|c| c.node(id)).map(|n| n.peer.clone());
        let (done, stage) = change_voters_step(&local.raft, &target, peer, self.config.request_timeout, &format!("{namespace}/{group}")).await;
        Response::MoveProgress { done, stage }
    }

    /// The first answer to `request` from `replicas` (or the leaders they name) that is not
    /// NotLeader; None if none answered so this round.
    pub(super) async fn route_to_group_leader(&self, replicas: &[NodeId], request: &Request) -> Option<Response> {
        // Replicas that answered lately first: one that is paused or cut off would hold each
        // request for the whole timeout before the next replica is tried.
        let mut ordered = replicas.to_vec();
        ordered.sort_by_key(|id| !self.answered_lately(*id));
        let mut candidates: Vec<NodeId> = ordered.into_iter().rev().collect();
        let mut tried = BTreeSet::new();
        while let Some(id) = candidates.pop() {
            if !tried.insert(id) {
                continue;
            }
            let response = if id == self.config.node_id {
                Box::pin(self.handle(request.clone())).await
            } else {
                // A replica that did not answer lately gets a short wait: it is most likely paused
                // or cut off, and the round should end soon so that it is retried once the
                // group's other replicas have elected a leader.
                let timeout = match self.answered_lately(id) {
                    true => self.config.request_timeout,
                    false => self.config.request_timeout.min(SILENT_REPLICA_TIMEOUT),
                };
                match self.peers.get(&id) {
                    Some(peer) => match peer.call(request, timeout).await {
                        Ok(response) => response,
                        Err(_) => continue,
                    },
                    None => continue,
                }
            };
            match response {
                // A leader that did not answer lately is tried last (its followers may not have
                // noticed yet that it is gone).
                Response::Error(ErrorReply::NotLeader { leader: Some(leader) }) if !self.answered_lately(leader) => candidates.insert(0, leader),
                Response::Error(ErrorReply::NotLeader { leader }) => candidates.extend(leader),
                other => return Some(other),
            }
        }
        None
    }

    /// Takes on `latest`, the cluster metadata as applied up to the metadata group's log index
    /// `applied`, if it differs from what this node holds (connecting to nodes new to it).
    /// `follow_cluster` offers its own state machine's copy only when it is not behind the one
    /// held; a confirmed leader's copy is never behind a committed one, except after the
    /// metadata group was revived without some entries: it is taken all the same, with a
    /// warning.
    fn adopt_cluster(&self, latest: ClusterMeta, applied: u64, source: CopySource) {
        let Some(joined) = self.joined.get() else { return };
        let mut cluster = joined.cluster.write().unwrap();
        let adopted = joined.cluster_applied.load(std::sync::atomic::Ordering::SeqCst);
        if source == CopySource::Leader && applied < adopted {
            tracing::warn!(applied, adopted, "the metadata leader's copy of the cluster metadata is behind the one this node held: taking it (the metadata group was revived from a replica that lacked the newer entries)");
        }
        joined.cluster_applied.store(applied, std::sync::atomic::Ordering::SeqCst);
        if *cluster == latest {
            return;
        }
        for node in &latest.nodes {
            self.peers.connect(node.id, &node.peer);
        }
        *cluster = latest;
    }

    /// The log index of the cluster metadata this node holds (see `adopt_cluster`).
    fn cluster_applied(&self) -> u64 {
        self.joined.get().map_or(0, |j| j.cluster_applied.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Starts the replicas the metadata gives this node and it does not run yet, and stops
    /// those the metadata took from it.
    async fn host_what_the_cluster_says(&self) {
        let Some(joined) = self.joined.get() else { return };
        let me = self.config.node_id;
        // The index and the copy together (`adopt_cluster` changes both under the write lock).
        let (cluster, cluster_applied) = {
            let cluster = joined.cluster.read().unwrap();
            (cluster.clone(), joined.cluster_applied.load(std::sync::atomic::Ordering::SeqCst))
        };
        for (name, hosted) in &joined.namespaces {
            let Some(info) = cluster.namespace(name) else { continue };
            for group in 0..info.groups {
                let wanted = cluster.hosts(info, group, me);
                let running = hosted.group(group).is_some();
                if wanted && !running {
                    let started = match self.host_group(name, group, cluster_applied) {
                        Err(err) => Err(super::NodeError::Config(format!("cannot record that the group is hosted here: {err}"))),
                        Ok(()) => match self.group_state_machine(&hosted.engine, name, group, info.groups) {
                            Ok(state_machine) => self.start_group(&cluster, info, group, state_machine, false).await,
                            Err(err) => Err(err),
                        },
                    };
                    match started {
                        Ok(started) => {
                            tracing::info!(namespace = %name, group, "a move brings the group here: its replica starts");
                            hosted.local.write().unwrap().insert(group, Arc::new(started));
                        }
                        Err(err) => tracing::warn!(namespace = %name, group, %err, "cannot start the replica a move brings here; retrying"),
                    }
                } else if !wanted && running {
                    let Some(stopped) = hosted.local.write().unwrap().remove(&group) else { continue };
                    self.leave_group(name, group, info.groups, &hosted.engine, stopped).await;
                } else if !wanted {
                    self.forget_left_behind(name, group, info.groups, &hosted.engine, cluster_applied).await;
                }
            }
        }
    }
}

/// Where a node's copy of the cluster metadata comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CopySource {
    /// Its own member of the metadata group.
    Own,
    /// The metadata leader, confirmed by a quorum (`Request::ClusterMeta`).
    Leader,
}

fn meta_answer(result: Result<MetaResult, ErrorReply>) -> Response {
    match result {
        Ok(MetaResult::Refused(why)) => Response::Error(ErrorReply::BadRequest(why)),
        Ok(_) => Response::Noted,
        Err(reply) => Response::Error(reply),
    }
}

/// Every node's loop: follows the cluster metadata (a member of the metadata group from its
/// own state machine, other nodes by asking a voter once a second) and hosts the groups it
/// says. Ends when the node stops.
pub(super) async fn follow_cluster(node: Weak<Node>) {
    let mut fetched_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::time::sleep(FOLLOW_POLL).await;
        let Some(node) = node.upgrade() else { return };
        if node.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let member = node.metadata_membership();
        let (own, own_applied) = match member {
            metadata::Membership::Follows => node.meta_state.cluster_applied(),
            _ => (None, 0),
        };
        let latest = match own {
            // Its own copy unless it is behind the one held: a member whose state machine lags
            // (it took the leader's copy while it was unsure of its place) must not go back to
            // older metadata, which could stop a replica that a newer move brought here.
            Some(cluster) if own_applied >= node.cluster_applied() => Some((cluster, own_applied, CopySource::Own)),
            _ if fetched_at.is_none_or(|at| at.elapsed() >= FETCH_EVERY) => {
                fetched_at = Some(tokio::time::Instant::now());
                let latest = node.fetch_cluster().await;
                if let Some((cluster, _)) = latest.as_ref().filter(|(c, _)| node.meta_state.cluster().as_ref() != Some(c)) {
                    if let Err(err) = node.meta_state.remember(cluster.clone()).await {
                        tracing::warn!(%err, "cannot record the cluster metadata");
                    }
                }
                if let Some((cluster, _)) = &latest {
                    node.note_metadata_voters(member, cluster);
                }
                latest.map(|(cluster, applied)| (cluster, applied, CopySource::Leader))
            }
            _ => None,
        };
        if let Some((latest, applied, source)) = latest {
            node.adopt_cluster(latest, applied, source);
        }
        node.host_what_the_cluster_says().await;
    }
}

/// The metadata leader's loop: starts moves for groups that are not where the roster puts
/// them (at most `MOVES_AT_ONCE` at a time) and drives each to its end (one task per move),
/// and hands the places of metadata voters off the roster to roster nodes (`metadata`). Runs
/// on every node; acts only while leading the metadata group. Ends when the node stops.
pub(super) async fn keep_balance(node: Weak<Node>) {
    loop {
        tokio::time::sleep(BALANCE_POLL).await;
        let Some(node) = node.upgrade() else { return };
        if node.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if node.leading_meta().is_err() {
            continue;
        }
        let Some(cluster) = node.meta_state.cluster() else { continue };
        node.place_metadata_voters(&cluster).await;
        let mut moving = 0;
        for ns in &cluster.namespaces {
            for (&group, replicas) in &ns.moves {
                moving += 1;
                let new = match node.moves_driven.lock().unwrap().entry((ns.name.clone(), group)) {
                    std::collections::hash_map::Entry::Occupied(_) => false,
                    std::collections::hash_map::Entry::Vacant(entry) => {
                        entry.insert("starting".into());
                        true
                    }
                };
                if new {
                    let (node, namespace, replicas) = (Arc::clone(&node), ns.name.clone(), replicas.clone());
                    tokio::spawn(async move {
                        // However the task ends (a panic too), the next leader's loop or this
                        // one may drive the move again.
                        let _driven = DrivenMove { node: &node, key: (namespace.clone(), group) };
                        node.drive_move(&namespace, group, replicas).await;
                    });
                }
            }
        }
        for ns in &cluster.namespaces {
            let targets = cluster.targets(ns);
            for group in (0..ns.groups).filter(|g| !ns.moves.contains_key(g)) {
                let current = &ns.placement[group as usize];
                let target = targets[group as usize].clone();
                if *current == target {
                    continue;
                }
                let command = match meta::same_set(current, &target) {
                    // Only the preferred leader changes: nothing moves.
                    true => MetaCommand::FinishMove { namespace: ns.name.clone(), group, replicas: target },
                    false if moving < meta::MOVES_AT_ONCE => {
                        moving += 1;
                        MetaCommand::StartMove { namespace: ns.name.clone(), group, replicas: target }
                    }
                    false => continue,
                };
                if let Err(err) = node.propose_meta(command).await {
                    tracing::warn!(namespace = %ns.name, group, %err, "cannot record a group move; retrying");
                }
            }
        }
    }
}

/// A move this node drives (an entry of `moves_driven`), removed when the driving task ends.
struct DrivenMove<'a> {
    node: &'a Node,
    key: (String, u32),
}

impl Drop for DrivenMove<'_> {
    fn drop(&mut self) {
        if let Ok(mut driven) = self.node.moves_driven.lock() {
            driven.remove(&self.key);
        }
    }
}

impl Node {
    /// Records how far the move of `namespace`'s `group` this node drives is (`MoveStages`).
    fn note_move_stage(&self, namespace: &str, group: u32, stage: String) {
        if let Some(noted) = self.moves_driven.lock().unwrap().get_mut(&(namespace.to_owned(), group)) {
            *noted = stage;
        }
    }

    /// The moves this node drives as the metadata leader, with their stages; NotLeader
    /// elsewhere (a former leader's drivers end at their next step).
    pub(super) fn handle_move_stages(&self) -> Response {
        if let Err(reply) = self.leading_meta() {
            return Response::Error(reply);
        }
        let mut stages: Vec<MoveStage> = self
            .moves_driven
            .lock()
            .unwrap()
            .iter()
            .map(|((namespace, group), stage)| MoveStage { namespace: namespace.clone(), group: *group, stage: stage.clone() })
            .collect();
        stages.sort_by(|a, b| (&a.namespace, a.group).cmp(&(&b.namespace, b.group)));
        Response::MoveStages(stages)
    }

    /// Asks `namespace`'s `group`'s leader to move the group to `replicas` until it has, then
    /// records the move finished. Gives up when this node stops leading the metadata group or
    /// the move is no longer the recorded one (the next leader takes over).
    async fn drive_move(&self, namespace: &str, group: u32, replicas: Vec<NodeId>) {
        let request = Request::MoveGroup { namespace: namespace.to_owned(), group, replicas: replicas.clone() };
        let mut stages: HashSet<String> = HashSet::new();
        loop {
            if self.leading_meta().is_err() || self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let Some(cluster) = self.meta_state.cluster() else { return };
            let Some(ns) = cluster.namespace(namespace) else { return };
            if ns.moves.get(&group) != Some(&replicas) {
                return;
            }
            let mut candidates = ns.placement[group as usize].clone();
            candidates.extend(replicas.iter().copied());
            match self.route_to_group_leader(&candidates, &request).await {
                Some(Response::MoveProgress { done: true, .. }) => {
                    self.note_move_stage(namespace, group, "recording the move finished".into());
                    let finish = MetaCommand::FinishMove { namespace: namespace.to_owned(), group, replicas: replicas.clone() };
                    match self.propose_meta(finish).await {
                        Ok(_) => return,
                        Err(err) => tracing::warn!(namespace, group, %err, "cannot record the move finished; retrying"),
                    }
                }
                Some(Response::MoveProgress { done: false, stage }) => {
                    if stages.insert(stage.clone()) {
                        tracing::info!(namespace, group, %stage, "moving the group");
                    }
                    self.note_move_stage(namespace, group, stage);
                }
                Some(other) => tracing::debug!(namespace, group, ?other, "moving the group: unexpected answer"),
                None => {
                    tracing::debug!(namespace, group, "moving the group: no leader answered");
                    self.note_move_stage(namespace, group, "waiting for the group's leader".into());
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
