//! The metadata group at a node: whether this node is one of its voters, starting its member,
//! catching up after the node lost its copy (its data directory wiped), and, at its leader,
//! changing its voters.
//!
//! The voters are the lowest node ids when the cluster is created (at most five). Later the
//! metadata leader hands the place of each voter taken off the roster to a live roster node
//! that is not a voter (`place_metadata_voters`, one step every half second): it asks that node
//! to start its member (`JoinMetadata`), adds it as a learner, waits until it caught up, then
//! changes the voters (joint consensus), as a partition group's move does. The state machine
//! copies each membership it applies into the metadata's `metadata_voters`, so the metadata
//! says who the voters are at each index of the log. A voter removed before it received the
//! change that removed it hears no leader; it asks a voter, learns that it was removed, and
//! stops campaigning (`Membership::Unsure`).
//!
//! The metadata group is a Raft group like the partition groups, and a voter that comes back
//! empty and votes like a new one endangers it the same way (see `rejoin`): with voters A, B,
//! C, a session opened while C was down is committed on A and B; B is wiped and A down; an
//! empty B grants C its vote, and C's term forgets the session, then hands out its id again.
//! So a voter whose metadata log is empty follows the same rule as a partition replica: it
//! asks enough of the other voters (ceil(n/2) of the n) whether the group lived on, and if so
//! neither votes nor campaigns until its log reaches the commit index a leader reports in its
//! own term. A marker file (`DATA_DIR/rejoin/$meta.0`) keeps that state across restarts.
//!
//! Deciding needs the peers to answer, so it happens in `Node::join`, after the node serves
//! (peers answer `GroupLog` and `MetadataVoters` before they joined). A metadata group most of
//! whose voters lost their copy is dead, like a partition group: `chunkctl revive '$meta' 0`
//! rebuilds it from the voter whose log reaches furthest (see `revive`).
//!
//! Invariants:
//! - **A metadata voter with an empty log never votes before it knows whether the group lived
//!   on**, and never while catching up (unless `revive` names the candidate).
//! - **Only a fresh cluster is initialized**: by its first voter, once enough voters answered
//!   that none holds an entry.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use openraft::BasicNode;

use super::raft_network::GroupNetwork;
use super::{rejoin, Node, NodeError};
use crate::meta::ClusterMetaExt as _;
use crate::meta::{self, ClusterMeta, MetaRaft, MetaTypeConfig, META_NAMESPACE, META_WAL_GROUP};
use crate::protocol::{ErrorReply, Request, Response};
use crate::raft::{GroupLogStore, NodeId};

/// This node's member of the metadata group.
pub(crate) struct MetaGroup {
    pub(crate) raft: MetaRaft,
    /// Set while it catches up after this node lost its copy.
    pub(crate) rejoin: rejoin::Rejoin,
    /// The group's voters as this node learned them (the cluster metadata's, else its
    /// configuration's), for a replica that knows no membership yet.
    pub(crate) voters: Vec<NodeId>,
}

/// The rest of this node's state as a member of the metadata group.
#[derive(Default)]
pub(crate) struct MemberState {
    /// Held while the member starts (at `join`, or asked to by `JoinMetadata`).
    starting: tokio::sync::Mutex<()>,
    /// A metadata voter confirmed that this node is no longer one of the voters, although its
    /// own log still counts it (the group removed it before it received that change): it no
    /// longer campaigns, and follows the metadata by asking a voter.
    removed: AtomicBool,
    /// When a leader's message (entries or a snapshot) last reached this member. openraft 0.9
    /// keeps naming a follower's last leader until an election, and a replica that may not
    /// campaign holds none: without this, a voter the group removed before it received that
    /// change would take its frozen copy for the metadata for good.
    leader_heard: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// The stage of changing the metadata voters this node last logged, as their leader.
    stage: std::sync::Mutex<String>,
}

/// How this node follows the cluster metadata, by what its metadata group member knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Membership {
    /// A member that hears a leader, or a voter: its own state machine is the metadata.
    Follows,
    /// A voter by its own log that hears no leader: perhaps removed without knowing. It
    /// asks a voter, and what that says decides (`note_metadata_voters`).
    Unsure,
    /// No member, or one the group does not count (any more): it asks a voter.
    Outside,
}

/// What this node is in the metadata group.
struct Role {
    voter: bool,
    /// The cluster exists already (its metadata group must not be initialized again).
    cluster_exists: bool,
    /// A voter whose log is empty while the group lived on (or that was catching up).
    lost_copy: bool,
    voters: Vec<NodeId>,
}

impl Node {
    /// Starts this node's member of the metadata group if it is a voter: catching up first
    /// if it lost its copy, initializing the group if the cluster is new and this node is its
    /// first voter.
    pub(super) async fn start_metadata(&self) -> Result<(), NodeError> {
        let role = self.metadata_role().await?;
        if !role.voter {
            return Ok(());
        }
        let _starting = self.meta_member.starting.lock().await;
        let me = self.config.node_id;
        if role.lost_copy {
            tracing::warn!("this metadata voter lost its copy of the metadata group: it catches up before it votes again");
        }
        let raft = self.start_metadata_member(role.lost_copy, role.voters.clone()).await?;
        let log = self.wal.log_state(META_WAL_GROUP);
        if !role.cluster_exists && log.last.is_none() && log.vote.is_none() && role.voters.first() == Some(&me) {
            let addresses: BTreeMap<NodeId, String> = self.config.nodes.iter().cloned().collect();
            let members: BTreeMap<NodeId, BasicNode> =
                role.voters.iter().map(|id| (*id, BasicNode::new(addresses.get(id).cloned().unwrap_or_default()))).collect();
            raft.initialize(members).await.map_err(|e| NodeError::Raft(e.to_string()))?;
        }
        Ok(())
    }

    /// `JoinMetadata`: the metadata leader makes this node a member. Starts the member unless
    /// it runs; it catches up before it votes, like any replica that lost its copy: an empty
    /// log may be a voter's that lost its copy (no one here can tell), and a log from an
    /// earlier membership holds a voter set the group has since changed.
    pub(super) async fn handle_join_metadata(&self) -> Response {
        let _starting = self.meta_member.starting.lock().await;
        if self.meta.get().is_some() {
            return Response::Noted;
        }
        match self.wal.log_state(META_WAL_GROUP).last {
            None => tracing::info!("this node joins the metadata group with an empty log: it catches up before it votes"),
            Some((index, _)) => tracing::info!(index, "this node joins the metadata group again with an old log: it catches up before it votes"),
        }
        match self.start_metadata_member(true, self.metadata_voters()).await {
            Ok(_) => {
                tracing::info!("the metadata leader makes this node a member of the metadata group: its member started");
                Response::Noted
            }
            Err(err) => Response::Error(ErrorReply::Internal(format!("cannot start this node's member of the metadata group: {err}"))),
        }
    }

    /// Starts this node's member of the metadata group (once; the caller holds `starting`),
    /// catching up before it votes if `lost_copy`.
    async fn start_metadata_member(&self, lost_copy: bool, voters: Vec<NodeId>) -> Result<MetaRaft, NodeError> {
        let me = self.config.node_id;
        let rejoin = match lost_copy {
            true => {
                let marker = rejoin::marker_path(&self.config.data_dir, META_NAMESPACE, 0);
                rejoin::Rejoin::start(marker.clone()).map_err(|e| NodeError::Config(format!("cannot write {}: {e}", marker.display())))?
            }
            false => rejoin::Rejoin::none(),
        };
        // The metadata changes rarely: a snapshot after every entry keeps its log (and so the
        // WAL segments it pins) to a few entries.
        let meta_config =
            openraft::Config { snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1), max_in_snapshot_log_to_keep: 0, ..(*self.raft_config).clone() };
        let meta_config = std::sync::Arc::new(meta_config.validate().map_err(|e| NodeError::Config(e.to_string()))?);
        let network = GroupNetwork::<MetaTypeConfig>::new(META_NAMESPACE.to_owned(), 0, self.peers.clone());
        let log_store = GroupLogStore::<MetaTypeConfig>::with_types(self.wal.clone(), META_WAL_GROUP);
        let raft = MetaRaft::new(me, meta_config, network, log_store, self.meta_state.clone()).await.map_err(|e| NodeError::Raft(e.to_string()))?;
        if rejoin.is_active() {
            raft.runtime_config().elect(false);
        }
        tokio::spawn(keep_metadata_log_short(raft.clone()));
        if self.meta.set(MetaGroup { raft: raft.clone(), rejoin, voters }).is_err() {
            return Err(NodeError::Config("the metadata group was started twice".into()));
        }
        Ok(raft)
    }

    /// Whether this node is a metadata voter, whether the cluster exists, and whether this
    /// voter lost its copy. Once the node knows the cluster, the metadata says (as this node
    /// applied it: a voter it has since lost is one the metadata leader asks to start again,
    /// `JoinMetadata`). Before, its configuration says (the lowest ids), unless the peers say
    /// the cluster exists without it among the voters: a node added to a running cluster
    /// becomes a metadata voter only when the metadata leader makes it one.
    async fn metadata_role(&self) -> Result<Role, NodeError> {
        let me = self.config.node_id;
        let marker = rejoin::marker_path(&self.config.data_dir, META_NAMESPACE, 0);
        if let Some(cluster) = self.meta_state.cluster() {
            let voter = cluster.metadata_voters.contains(&me);
            return Ok(Role { voter, cluster_exists: true, lost_copy: voter && marker.exists(), voters: cluster.metadata_voters });
        }
        let ids: Vec<NodeId> = self.config.nodes.iter().map(|(id, _)| *id).collect();
        let configured = meta::voters(&ids);
        if !configured.contains(&me) {
            return Ok(Role { voter: false, cluster_exists: false, lost_copy: false, voters: configured });
        }
        if marker.exists() {
            // It was catching up when it stopped (it applied no metadata yet).
            return Ok(Role { voter: true, cluster_exists: true, lost_copy: true, voters: configured });
        }
        if self.wal.log_state(META_WAL_GROUP).last.is_some() {
            return Ok(Role { voter: true, cluster_exists: true, lost_copy: false, voters: configured });
        }
        // An empty log: a new cluster, a node added to a running one, or a voter that lost its
        // copy. Only the peers can tell.
        let own = self.config.nodes.iter().find(|(id, _)| *id == me).map(|(_, peer)| peer.clone());
        let mut others: Vec<String> = super::cluster_view::seed_addresses(&self.config);
        others.extend(self.config.nodes.iter().filter(|(id, _)| configured.contains(id)).map(|(_, peer)| peer.clone()));
        others.sort();
        others.dedup();
        others.retain(|a| Some(a) != own.as_ref());
        let needed = configured.len().div_ceil(2).min(others.len());
        let request = Request::GroupLog { namespace: META_NAMESPACE.to_owned(), group: 0 };
        let ask = |address: &String| -> rejoin::AskLog<'_> {
            let link = self.network.link(address);
            let request = &request;
            Box::pin(async move { link.call(request, Duration::from_millis(500)).await.ok() })
        };
        let answers = self.survey_logs((META_NAMESPACE, 0, META_WAL_GROUP), &others, needed, ask).await?;
        let lived_on: Vec<String> = answers.into_iter().filter(|a| a.lived_on()).map(|a| a.from).collect();
        if lived_on.is_empty() {
            return Ok(Role { voter: true, cluster_exists: false, lost_copy: false, voters: configured });
        }
        // The cluster exists (or is being created by this node's configuration among others):
        // the metadata of a peer that holds it says whether this node is one of its voters.
        let started = tokio::time::Instant::now();
        let mut next_report = started + Duration::from_secs(5);
        loop {
            let mut created = 0;
            for address in &lived_on {
                match self.network.link(address).call(&Request::MetadataVoters, Duration::from_secs(1)).await {
                    Ok(Response::MetadataVoters(Some(voters))) if voters.contains(&me) => {
                        return Ok(Role { voter: true, cluster_exists: true, lost_copy: true, voters });
                    }
                    Ok(Response::MetadataVoters(Some(voters))) => {
                        tracing::info!(?voters, "the cluster exists already: this node joins it, not as a metadata voter");
                        return Ok(Role { voter: false, cluster_exists: true, lost_copy: false, voters });
                    }
                    Ok(Response::MetadataVoters(None)) => created += 1,
                    _ => {}
                }
            }
            if created == lived_on.len() {
                // Not bootstrapped yet anywhere: a cluster being created from the same
                // configuration. This voter catches up before it votes (it cannot tell).
                return Ok(Role { voter: true, cluster_exists: true, lost_copy: true, voters: configured });
            }
            if tokio::time::Instant::now() >= next_report {
                tracing::warn!(waited_s = started.elapsed().as_secs(), peers = ?lived_on, "waiting for a peer that holds the metadata log to say who its voters are");
                next_report += Duration::from_secs(5);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// This node's metadata group member, once started (on a voter).
    pub(super) fn meta_raft(&self) -> Option<&MetaRaft> {
        self.meta.get().map(|m| &m.raft)
    }

    /// The metadata voters this node knows: the cluster metadata's, else those it started with.
    pub(super) fn metadata_voters(&self) -> Vec<NodeId> {
        if let Some(joined) = self.joined.get() {
            return joined.cluster.read().unwrap().metadata_voters.clone();
        }
        match self.meta_state.cluster() {
            Some(cluster) => cluster.metadata_voters,
            None => self.meta.get().map(|m| m.voters.clone()).unwrap_or_default(),
        }
    }

    /// `MetadataVoters`: from the metadata this node knows, confirmed or not.
    pub(super) fn handle_metadata_voters(&self) -> Response {
        Response::MetadataVoters(self.meta_state.cluster().map(|c| c.metadata_voters))
    }

    /// The metadata voters that lost their copy (this node as it knows, the others as their
    /// last health reports say), and whether that leaves the group dead: no leader here, and
    /// too few voters with their copy for a quorum.
    pub(super) fn metadata_lost(&self) -> (Vec<NodeId>, bool) {
        let Some(meta) = self.meta.get() else { return (Vec::new(), false) };
        let metrics = meta.raft.metrics().borrow().clone();
        let mut voters: Vec<NodeId> = metrics.membership_config.membership().voter_ids().collect();
        if voters.is_empty() {
            voters = self.metadata_voters();
        }
        let lost = self.lost_among(&voters, &(META_NAMESPACE.to_owned(), 0), meta.rejoin.is_active());
        let dead = metrics.current_leader.is_none() && super::lost_quorum(voters.len(), lost.len());
        (lost, dead)
    }

    /// How this node follows the cluster metadata (see `Membership`).
    pub(super) fn metadata_membership(&self) -> Membership {
        let Some(meta) = self.meta.get() else { return Membership::Outside };
        let me = self.config.node_id;
        let metrics = meta.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voter = membership.voter_ids().any(|id| id == me);
        let learner = membership.learner_ids().any(|id| id == me);
        // A leader it names counts only while its messages arrive (a few election timeouts).
        let silence_max = Duration::from_millis(2 * self.config.election_timeout_ms.1);
        let hears_leader = match metrics.current_leader {
            Some(leader) if leader == me => true,
            Some(_) => self.meta_member.leader_heard.lock().unwrap().is_some_and(|at| at.elapsed() < silence_max),
            None => false,
        };
        if voter && hears_leader {
            // A leader that counts this node a voter is in touch: whatever was said before.
            self.meta_member.removed.store(false, Ordering::SeqCst);
        }
        if self.meta_member.removed.load(Ordering::SeqCst) {
            return Membership::Outside;
        }
        match (voter, hears_leader, learner) {
            (true, true, _) | (false, true, true) => Membership::Follows,
            (true, false, _) => Membership::Unsure,
            (false, _, _) => Membership::Outside,
        }
    }

    /// Takes note of the metadata voters a voter confirmed (`cluster`, fetched while this node
    /// followed as `member`): a node `Unsure` whether it is still a voter and not among them
    /// was removed, and stops campaigning.
    pub(super) fn note_metadata_voters(&self, member: Membership, cluster: &ClusterMeta) {
        let me = self.config.node_id;
        if cluster.metadata_voters.contains(&me) {
            self.meta_member.removed.store(false, Ordering::SeqCst);
        } else if member == Membership::Unsure && !self.meta_member.removed.swap(true, Ordering::SeqCst) {
            tracing::warn!(voters = ?cluster.metadata_voters, "the metadata group removed this node from its voters: its member no longer campaigns");
        }
    }

    /// A leader's message reached this node's member (see `MemberState::leader_heard`).
    pub(super) fn note_metadata_leader_message(&self) {
        *self.meta_member.leader_heard.lock().unwrap() = Some(tokio::time::Instant::now());
    }

    /// Whether a voter confirmed that the metadata group removed this node (see `MemberState`).
    pub(super) fn removed_from_metadata(&self) -> bool {
        self.meta_member.removed.load(Ordering::SeqCst)
    }

    /// One step, as the metadata leader, of handing the places of metadata voters off the
    /// roster to live roster nodes (`ClusterMeta::metadata_voters_target`), by the group's own
    /// membership changes (`membership::change_voters_step`); the state machine then records the
    /// new voters in the metadata. A node about to become a member is asked to start its
    /// member first (`JoinMetadata`). Logs each stage it reaches once.
    pub(super) async fn place_metadata_voters(&self, cluster: &ClusterMeta) {
        let Some(meta) = self.meta.get() else { return };
        let membership = meta.raft.metrics().borrow().membership_config.membership().clone();
        // In a joint configuration, the voters it moves to.
        let current: Vec<NodeId> = membership.get_joint_config().last().map(|c| c.iter().copied().collect()).unwrap_or_default();
        if current.is_empty() {
            return;
        }
        let target: BTreeSet<NodeId> = cluster.metadata_voters_target(&current, |id| self.answered_lately(id)).into_iter().collect();
        let settled = membership.get_joint_config().len() == 1
            && current.iter().copied().collect::<BTreeSet<_>>() == target
            && membership.learner_ids().all(|id| target.contains(&id));
        if settled {
            return;
        }
        for id in target.iter().copied().filter(|id| !current.contains(id)) {
            if let Some(peer) = self.peers.get(&id) {
                if let Err(err) = peer.call(&Request::JoinMetadata, self.config.request_timeout).await {
                    tracing::debug!(node = id, %err, "asking a node to start its metadata member");
                }
            }
        }
        let peer = |id: NodeId| cluster.node(id).map(|n| n.peer.clone());
        let (done, stage) = super::membership::change_voters_step(&meta.raft, &target, peer, self.config.request_timeout, "$meta/0").await;
        let mut last = self.meta_member.stage.lock().unwrap();
        if *last != stage {
            tracing::info!(from = ?current, to = ?target, done, %stage, "handing metadata voters' places to roster nodes");
            *last = stage;
        }
    }
}

/// openraft checks its snapshot policy only when entries are applied, and skips the check while
/// a snapshot is being built: an entry applied then would stay in the log (pinning its WAL
/// segment) until the next metadata change. Once a second, a metadata group whose snapshot is
/// behind its applied point builds one (openraft then purges the log). Ends when the group stops.
pub(super) async fn keep_metadata_log_short(raft: MetaRaft) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let metrics = raft.metrics().borrow().clone();
        if metrics.running_state.is_err() {
            return;
        }
        if metrics.snapshot.map(|l| l.index) < metrics.last_applied.map(|l| l.index) && raft.trigger().snapshot().await.is_err() {
            return;
        }
    }
}
