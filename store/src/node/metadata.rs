//! The metadata group at a node: whether this node is one of its voters, starting its member,
//! and catching up after the node lost its copy (its data directory wiped).
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

use std::collections::BTreeMap;
use std::time::Duration;

use openraft::BasicNode;

use super::transport::Connection;
use super::{keep_metadata_log_short, rejoin, roster, Node, NodeError};
use crate::meta::{self, MetaRaft, MetaTypeConfig, META_NAMESPACE, META_WAL_GROUP};
use crate::protocol::{Request, Response};
use crate::raft::{GroupLogStore, NodeId};
use super::raft_network::GroupNetwork;

/// This node's member of the metadata group.
pub(crate) struct MetaGroup {
    pub(crate) raft: MetaRaft,
    /// Set while it catches up after this node lost its copy.
    pub(crate) rejoin: rejoin::Rejoin,
    /// The group's voters as this node learned them (the cluster metadata's, else its
    /// configuration's), for a replica that knows no membership yet.
    pub(crate) voters: Vec<NodeId>,
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
        let me = self.config.node_id;
        let rejoin = match role.lost_copy {
            true => {
                let marker = rejoin::marker_path(&self.config.data_dir, META_NAMESPACE, 0);
                tracing::warn!("this metadata voter lost its copy of the metadata group: it catches up before it votes again");
                rejoin::Rejoin::start(marker.clone()).map_err(|e| NodeError::Config(format!("cannot write {}: {e}", marker.display())))?
            }
            false => rejoin::Rejoin::none(),
        };
        // The metadata changes rarely: a snapshot after every entry keeps its log (and so the
        // WAL segments it pins) to a few entries.
        let meta_config = openraft::Config {
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1),
            max_in_snapshot_log_to_keep: 0,
            ..(*self.raft_config).clone()
        };
        let meta_config = std::sync::Arc::new(meta_config.validate().map_err(|e| NodeError::Config(e.to_string()))?);
        let network = GroupNetwork::<MetaTypeConfig>::new(META_NAMESPACE.to_owned(), 0, self.peers.clone());
        let log_store = GroupLogStore::<MetaTypeConfig>::with_types(self.wal.clone(), META_WAL_GROUP);
        let raft = MetaRaft::new(me, meta_config, network, log_store, self.meta_state.clone()).await.map_err(|e| NodeError::Raft(e.to_string()))?;
        if rejoin.is_active() {
            raft.runtime_config().elect(false);
        }
        let log = self.wal.log_state(META_WAL_GROUP);
        if !role.cluster_exists && log.last.is_none() && log.vote.is_none() && role.voters.first() == Some(&me) {
            let addresses: BTreeMap<NodeId, String> = self.config.nodes.iter().cloned().collect();
            let members: BTreeMap<NodeId, BasicNode> =
                role.voters.iter().map(|id| (*id, BasicNode::new(addresses.get(id).cloned().unwrap_or_default()))).collect();
            raft.initialize(members).await.map_err(|e| NodeError::Raft(e.to_string()))?;
        }
        tokio::spawn(keep_metadata_log_short(raft.clone()));
        if self.meta.set(MetaGroup { raft, rejoin, voters: role.voters }).is_err() {
            return Err(NodeError::Config("the metadata group was started twice".into()));
        }
        Ok(())
    }

    /// Whether this node is a metadata voter, whether the cluster exists, and whether this
    /// voter lost its copy. Once the node knows the cluster, the metadata says (its voters are
    /// fixed at bootstrap). Before, its configuration says (the lowest ids), unless the peers
    /// say the cluster exists without it among the voters: a node added to a running cluster
    /// is never a metadata voter.
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
        let mut others: Vec<String> = roster::seed_addresses(&self.config);
        others.extend(self.config.nodes.iter().filter(|(id, _)| configured.contains(id)).map(|(_, peer)| peer.clone()));
        others.sort();
        others.dedup();
        others.retain(|a| Some(a) != own.as_ref());
        let needed = configured.len().div_ceil(2).min(others.len());
        let request = Request::GroupLog { namespace: META_NAMESPACE.to_owned(), group: 0 };
        let ask = |address: &String| -> rejoin::AskLog<'_> {
            let mut connection = Connection::new(address.clone()).from_source(self.config.peer_source);
            let request = &request;
            Box::pin(async move { connection.call(request, Duration::from_millis(500)).await.ok() })
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
                let mut connection = Connection::new(address.clone()).from_source(self.config.peer_source);
                match connection.call(&Request::MetadataVoters, Duration::from_secs(1)).await {
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
}
