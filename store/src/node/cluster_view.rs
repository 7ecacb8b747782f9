//! What a node knows of the cluster: the metadata it learns when it joins (bootstrapped on a
//! fresh cluster, checked against its own configuration), and the maps it answers clients with.
//!
//! Invariants:
//! - **A node whose configuration disagrees with the cluster metadata does not start.**
//! - **Every node uses the same placement**: the one stored in the cluster metadata.

use super::*;

impl Node {
    /// The cluster metadata this node's configuration describes (checked for what start-up
    /// needs: valid groups, distinct WAL prefixes).
    pub(super) fn configured_cluster(&self) -> Result<ClusterMeta, NodeError> {
        let config = &self.config;
        let mut wal_prefixes = HashMap::new();
        let mut declared = Vec::new();
        for spec in &config.namespaces {
            let prefix = wal_prefix(&spec.engine.name);
            if let Some(other) = wal_prefixes.insert(prefix, spec.engine.name.clone()) {
                return Err(NodeError::Config(format!("namespaces {other:?} and {:?} hash to the same log prefix; rename one", spec.engine.name)));
            }
            if prefix << 12 | 0xFFF == META_WAL_GROUP {
                return Err(NodeError::Config(format!("namespace {:?} hashes to the metadata group's log prefix; rename it", spec.engine.name)));
            }
            if !spec.groups.is_power_of_two() || spec.groups > 4096 || spec.replication_factor == 0 {
                return Err(NodeError::Config(format!("namespace {}: groups must be a power of two ≤ 4096 and replication-factor ≥ 1", spec.engine.name)));
            }
            declared.push((spec.engine.name.clone(), spec.replication_factor as u32, spec.groups));
        }
        let clients: HashMap<NodeId, String> = config.client_addresses.iter().cloned().collect();
        let racks: HashMap<NodeId, String> = config.racks.iter().cloned().collect();
        let nodes = config
            .nodes
            .iter()
            .map(|(id, peer)| NodeInfo { id: *id, client: clients.get(id).cloned().unwrap_or_default(), peer: peer.clone(), rack: racks.get(id).cloned() })
            .collect();
        Ok(ClusterMeta::from_config(nodes, &declared))
    }

    /// The cluster metadata: what this node already knows, else bootstrapped (a voter that
    /// leads a fresh metadata group proposes `configured`) or fetched from the voters.
    pub(super) async fn learn_cluster(&self, configured: &ClusterMeta) -> ClusterMeta {
        let me = self.config.node_id;
        let started = tokio::time::Instant::now();
        let mut next_report = started + Duration::from_secs(5);
        loop {
            if let Some(cluster) = self.meta_state.cluster() {
                return cluster;
            }
            match self.meta_raft() {
                Some(raft) => {
                    if raft.current_leader().await == Some(me) {
                        let bootstrap = raft.client_write(MetaCommand::Bootstrap(configured.clone()));
                        match tokio::time::timeout(self.config.request_timeout, bootstrap).await {
                            Ok(Ok(_)) => continue,
                            Ok(Err(err)) => tracing::warn!(%err, "proposing the cluster metadata failed; retrying"),
                            Err(_) => tracing::warn!("proposing the cluster metadata timed out; retrying"),
                        }
                    }
                }
                None => {
                    if let Some((cluster, _)) = self.fetch_cluster().await {
                        match self.meta_state.remember(cluster).await {
                            Ok(()) => continue,
                            Err(err) => tracing::warn!(%err, "cannot record the cluster metadata; retrying"),
                        }
                    }
                }
            }
            if tokio::time::Instant::now() >= next_report {
                tracing::info!(waited_s = started.elapsed().as_secs(), "waiting for the metadata group (it needs a quorum of its voters)");
                next_report += Duration::from_secs(5);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How this node's configuration (`configured`) differs from the metadata leader's copy of
    /// the cluster metadata, given that it differs from this node's own copy as `differences`
    /// say. Its own copy may be behind: nodes may have joined while it was down (and its file
    /// was updated to list them), or the metadata group removed this voter before it received
    /// that change. So a node asks the metadata leader before refusing to start, and, like
    /// `learn_cluster`, waits as long as no leader answers (logging so every 5 s).
    pub(super) async fn differences_from_current(&self, configured: &ClusterMeta, differences: Vec<String>) -> Vec<String> {
        let started = tokio::time::Instant::now();
        let mut next_report = started + Duration::from_secs(5);
        loop {
            // One round of asking, however many of the addresses are silent.
            if let Ok(Some((current, _))) = tokio::time::timeout(CURRENT_METADATA_ROUND, self.fetch_cluster()).await {
                let now = current.differences(configured, self.config.node_id);
                if now.is_empty() {
                    tracing::info!("this node's copy of the cluster metadata is behind its configuration; the metadata leader's copy agrees with it");
                }
                return now;
            }
            if tokio::time::Instant::now() >= next_report {
                tracing::info!(
                    waited_s = started.elapsed().as_secs(),
                    ?differences,
                    "this node's configuration disagrees with its copy of the cluster metadata: waiting for the metadata leader's copy to decide"
                );
                next_report += Duration::from_secs(5);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Asks the metadata voters this node knows of (else the seeds, else the voters its
    /// configuration names) for the cluster metadata; None if none knew. The other nodes it
    /// knows are asked last: the voters may all have changed since it learned them.
    pub(super) async fn fetch_cluster(&self) -> Option<(ClusterMeta, u64)> {
        let known = self.joined.get().map(|j| j.cluster.read().unwrap().clone()).or_else(|| self.meta_state.cluster());
        let me = self.config.node_id;
        let (addresses, peers): (Vec<String>, Vec<(NodeId, String)>) = match known {
            // Then the nodes its configuration lists (its copy may be behind them).
            Some(cluster) => {
                let (voters, others): (Vec<&NodeInfo>, Vec<&NodeInfo>) =
                    cluster.nodes.iter().filter(|n| n.id != me).partition(|n| cluster.metadata_voters.contains(&n.id));
                let mut addresses: Vec<String> = voters.into_iter().chain(others).map(|n| n.peer.clone()).collect();
                addresses.extend(self.config.nodes.iter().filter(|(id, _)| *id != me).map(|(_, peer)| peer.clone()));
                let mut peers: Vec<(NodeId, String)> = cluster.nodes.iter().map(|n| (n.id, n.peer.clone())).collect();
                peers.extend(self.config.nodes.iter().cloned());
                (addresses, peers)
            }
            // The configured voters first, then every other configured node.
            None => {
                let mut addresses = seed_addresses(&self.config);
                addresses.extend(self.config.nodes.iter().filter(|(id, _)| *id != me).map(|(_, peer)| peer.clone()));
                (addresses, self.config.nodes.clone())
            }
        };
        fetch_cluster_from(&addresses, &peers, &*self.network, Duration::from_secs(2)).await
    }

    pub(super) fn cluster_map(&self) -> ClusterMap {
        let Some(joined) = self.joined.get() else { return ClusterMap::default() };
        let cluster = joined.cluster.read().unwrap().clone();
        let preferred = cluster.preferred_leaders();
        let namespaces: Vec<NamespaceMap> = cluster
            .namespaces
            .iter()
            .filter_map(|info| {
                let hosted = joined.namespaces.get(&info.name)?;
                let leaders = (0..info.groups)
                    .map(|g| match hosted.group(g) {
                        Some(group) if self.out_of_touch(&group) => None,
                        Some(group) => group.raft.metrics().borrow().current_leader,
                        None => preferred.get(&info.name).and_then(|p| p.get(g as usize)).copied(),
                    })
                    .collect();
                let local = hosted.groups();
                let lost = local.iter().filter(|(_, group)| group.rejoin.is_active()).map(|(g, _)| *g).collect();
                let dead = local.iter().filter(|(g, group)| self.is_dead(&info.name, *g, group)).map(|(g, _)| *g).collect();
                Some(NamespaceMap {
                    name: info.name.clone(),
                    groups: info.groups,
                    replication_factor: info.replication_factor,
                    leaders,
                    replicas: info.placement.clone(),
                    lost,
                    dead,
                })
            })
            .collect();
        let nodes = cluster.nodes.iter().map(|n| (n.id, n.client.clone())).collect();
        let metadata_voters = cluster.metadata_voters.clone();
        let metadata_leader = self.meta_raft().and_then(|raft| {
            let metrics = raft.metrics().borrow().clone();
            metrics.current_leader.filter(|_| !self.leads_out_of_touch(&metrics))
        });
        let (metadata_lost, metadata_dead) = self.metadata_lost();
        ClusterMap { nodes, now_ms: self.clock.now_ms(), namespaces, metadata_voters, metadata_leader, metadata_lost, metadata_dead }
    }

    /// The cluster metadata, confirmed by the metadata group's leader with a quorum (so a node
    /// that learns it never gets a stale copy); others answer NotLeader.
    pub(super) async fn handle_cluster_meta(&self) -> Response {
        let Some(raft) = self.meta_raft() else { return Response::Error(ErrorReply::NotLeader { leader: None }) };
        match self.while_in_touch(raft.metrics(), raft.ensure_linearizable()).await {
            Some(Ok(_)) => {
                let (cluster, applied) = self.meta_state.cluster_applied();
                Response::ClusterMeta { cluster, applied }
            }
            Some(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward)))) => {
                Response::Error(ErrorReply::NotLeader { leader: forward.leader_id })
            }
            Some(Err(_)) | None => Response::Error(ErrorReply::PartitionUnavailable),
        }
    }
}

/// The longest one round of asking for the metadata leader's copy takes, at a starting node
/// whose configuration disagrees with its own copy (`Node::differences_from_current`).
pub(super) const CURRENT_METADATA_ROUND: Duration = Duration::from_secs(5);

/// Where a node asks for the cluster metadata before it knows it: `seeds`, else the peer
/// addresses of the voters its `[[nodes]]` name.
pub(super) fn seed_addresses(config: &NodeConfig) -> Vec<String> {
    if !config.seeds.is_empty() {
        return config.seeds.clone();
    }
    let ids: Vec<NodeId> = config.nodes.iter().map(|(id, _)| *id).collect();
    let voters = meta::voters(&ids);
    config.nodes.iter().filter(|(id, _)| voters.contains(id)).map(|(_, peer)| peer.clone()).collect()
}

/// The cluster metadata from the first of `addresses` that knows it (only the metadata leader
/// answers it, once a quorum confirmed its leadership). A node that names the leader sends the
/// question there next, if `peers` (id, peer address) has its address: a new node's
/// configuration may not list the metadata voters of today among its first addresses.
/// With it, the metadata group's log index it was applied up to.
pub(super) async fn fetch_cluster_from(
    addresses: &[String],
    peers: &[(NodeId, String)],
    network: &dyn super::network::Network,
    timeout: Duration,
) -> Option<(ClusterMeta, u64)> {
    let mut queue: std::collections::VecDeque<String> = addresses.iter().cloned().collect();
    let mut asked: Vec<String> = Vec::new();
    while let Some(address) = queue.pop_front() {
        if asked.contains(&address) {
            continue;
        }
        asked.push(address.clone());
        match network.link(&address).call(&Request::ClusterMeta, timeout).await {
            Ok(Response::ClusterMeta { cluster: Some(cluster), applied }) => return Some((cluster, applied)),
            Ok(Response::Error(ErrorReply::NotLeader { leader: Some(leader) })) => {
                if let Some((_, peer)) = peers.iter().find(|(id, _)| *id == leader) {
                    queue.push_front(peer.clone());
                }
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::network::TcpNetwork;
    use super::*;
    use crate::node::transport;

    /// Answers every request the same way.
    struct Answer(Response);

    impl transport::Handler for Answer {
        async fn handle(&self, _request: Request) -> Response {
            self.0.clone()
        }
    }

    async fn answering(response: Response) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(transport::serve(listener, Arc::new(Answer(response))));
        address
    }

    /// A new node whose configuration lists the metadata leader, but not among the addresses
    /// it asks first, still learns the cluster: the node it asks names the leader.
    #[tokio::test]
    async fn the_cluster_metadata_is_fetched_from_the_leader_a_follower_names() {
        let node = |id: u64| NodeInfo { id, client: format!("127.0.0.1:{}", 7400 + id), peer: format!("127.0.0.1:{}", 7500 + id), rack: None };
        let cluster = ClusterMeta::from_config(vec![node(1), node(2), node(3)], &[("test".to_string(), 3, 4)]);
        let leader = answering(Response::ClusterMeta { cluster: Some(cluster.clone()), applied: 12 }).await;
        let follower = answering(Response::Error(ErrorReply::NotLeader { leader: Some(7) })).await;
        let peers = vec![(7, leader.clone()), (8, follower.clone())];
        let fetched = fetch_cluster_from(std::slice::from_ref(&follower), &peers, &TcpNetwork::default(), Duration::from_secs(2)).await;
        assert_eq!(fetched, Some((cluster, 12)));
        // A leader this node has no address for: nothing to follow.
        assert_eq!(fetch_cluster_from(&[follower], &peers[1..], &TcpNetwork::default(), Duration::from_secs(2)).await, None);
    }
}
