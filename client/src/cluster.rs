//! The cluster metadata as nodes replicate it and clients may ask for it
//! (`Request::ClusterMeta`): nodes, roster, namespaces and each group's placement. What the
//! nodes compute from it is the server's (`meta::ClusterMetaExt`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node's id.
pub type NodeId = u64;

/// A node as the cluster knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: NodeId,
    /// Address clients connect to.
    pub client: String,
    /// Address other nodes connect to (Raft).
    pub peer: String,
    /// The rack (or zone) the node declares: a group's replicas go to distinct racks where
    /// there are enough. None: the node is a rack of its own.
    pub rack: Option<String>,
}

/// A namespace as the cluster knows it (engine settings are each node's own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceInfo {
    pub name: String,
    pub replication_factor: u32,
    pub groups: u32,
    /// Voters of each group, preferred leader first: the group's membership once its last
    /// move finished.
    pub placement: Vec<Vec<NodeId>>,
    /// Groups being moved to new replicas (group → its replicas after the move, preferred
    /// leader first). A node in a move's replicas hosts the group (as a learner until the
    /// group's membership changes).
    pub moves: BTreeMap<u32, Vec<NodeId>>,
}

/// The replicated cluster metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMeta {
    /// Every node the cluster knows, sorted by id.
    pub nodes: Vec<NodeInfo>,
    /// The nodes that own data, ascending (Aerospike's roster): groups are placed over these.
    pub roster: Vec<NodeId>,
    /// The metadata group's voters: the lowest ids when the cluster was bootstrapped, then as
    /// the group's own membership changes (the state machine copies each membership it
    /// applies here; see `metadata_voters_target`).
    pub metadata_voters: Vec<NodeId>,
    /// Sorted by name.
    pub namespaces: Vec<NamespaceInfo>,
}

impl ClusterMeta {
    pub fn node(&self, id: NodeId) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.id == id)
    }

    pub fn namespace(&self, name: &str) -> Option<&NamespaceInfo> {
        self.namespaces.iter().find(|n| n.name == name)
    }
}
