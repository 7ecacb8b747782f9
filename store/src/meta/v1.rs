//! The cluster metadata as written before rosters, racks and moves, still read: every node
//! is on the roster, and each group's placement is its membership.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{ClusterMeta, NamespaceInfo, NodeInfo};
use crate::raft::NodeId;

#[derive(Deserialize)]
struct NodeInfoV1 {
    id: NodeId,
    client: String,
    peer: String,
}

#[derive(Deserialize)]
struct NamespaceInfoV1 {
    name: String,
    replication_factor: u32,
    groups: u32,
    placement: Vec<Vec<NodeId>>,
}

#[derive(Deserialize)]
pub(super) struct ClusterMetaV1 {
    nodes: Vec<NodeInfoV1>,
    namespaces: Vec<NamespaceInfoV1>,
}

impl From<ClusterMetaV1> for ClusterMeta {
    fn from(old: ClusterMetaV1) -> ClusterMeta {
        let nodes: Vec<NodeInfo> = old.nodes.into_iter().map(|n| NodeInfo { id: n.id, client: n.client, peer: n.peer, rack: None }).collect();
        let ids: Vec<NodeId> = nodes.iter().map(|n| n.id).collect();
        let namespaces = old
            .namespaces
            .into_iter()
            .map(|ns| NamespaceInfo {
                name: ns.name,
                replication_factor: ns.replication_factor,
                groups: ns.groups,
                placement: ns.placement,
                moves: BTreeMap::new(),
            })
            .collect();
        ClusterMeta { metadata_voters: super::voters(&ids), roster: ids, nodes, namespaces }
    }
}
