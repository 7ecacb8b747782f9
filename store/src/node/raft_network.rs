//! openraft's network over chunkstore connections: each Raft message travels as a
//! `Request::Raft` for its namespace and group.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse};
use openraft::{BasicNode, RaftNetwork, RaftNetworkFactory, RaftTypeConfig};
use serde::{Deserialize, Serialize};

use super::network::{Network, PeerLink};
use crate::protocol::{Request, Response};
use crate::raft::{NodeId, TypeConfig};

/// The Raft type configurations that travel over this network.
pub trait NetworkTypes: RaftTypeConfig<NodeId = NodeId, Node = BasicNode> {}

impl<C: RaftTypeConfig<NodeId = NodeId, Node = BasicNode>> NetworkTypes for C {}

#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub(crate) enum RaftRpc<C: NetworkTypes> {
    AppendEntries(AppendEntriesRequest<C>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<C>),
}

#[derive(Serialize, Deserialize)]
pub(crate) enum RaftReply {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
}

/// The node's links to its peers, by node id: one each, shared by every group. Nodes that join
/// the cluster are added as the node learns of them.
pub struct PeerSet {
    network: Arc<dyn Network>,
    connections: RwLock<HashMap<NodeId, Arc<dyn PeerLink>>>,
}

pub type Peers = Arc<PeerSet>;

impl PeerSet {
    /// Links to `nodes` (id, peer address) over `network`.
    pub fn new(nodes: impl IntoIterator<Item = (NodeId, String)>, network: Arc<dyn Network>) -> PeerSet {
        let set = PeerSet { network, connections: Default::default() };
        for (id, address) in nodes {
            set.connect(id, &address);
        }
        set
    }

    pub fn get(&self, id: &NodeId) -> Option<Arc<dyn PeerLink>> {
        self.connections.read().unwrap().get(id).cloned()
    }

    /// The link to node `id` at `address` (a new one if the node is new to this node).
    pub fn connect(&self, id: NodeId, address: &str) -> Arc<dyn PeerLink> {
        if let Some(known) = self.get(&id) {
            return known;
        }
        let mut connections = self.connections.write().unwrap();
        connections.entry(id).or_insert_with(|| self.network.link(address)).clone()
    }

    /// Every peer, by id.
    pub fn all(&self) -> Vec<(NodeId, Arc<dyn PeerLink>)> {
        let mut all: Vec<_> = self.connections.read().unwrap().iter().map(|(id, c)| (*id, c.clone())).collect();
        all.sort_unstable_by_key(|(id, _)| *id);
        all
    }
}

/// Creates connections to the other replicas of one group (the metadata group's namespace is
/// `crate::meta::META_NAMESPACE`).
pub struct GroupNetwork<C = TypeConfig> {
    pub(crate) namespace: String,
    pub(crate) group: u32,
    pub(crate) peers: Peers,
    pub(crate) types: PhantomData<C>,
}

impl<C> GroupNetwork<C> {
    pub(crate) fn new(namespace: String, group: u32, peers: Peers) -> GroupNetwork<C> {
        GroupNetwork { namespace, group, peers, types: PhantomData }
    }
}

pub struct PeerConnection<C = TypeConfig> {
    namespace: String,
    group: u32,
    target: NodeId,
    connection: Option<Arc<dyn PeerLink>>,
    types: PhantomData<C>,
}

impl<C: NetworkTypes> RaftNetworkFactory<C> for GroupNetwork<C> {
    type Network = PeerConnection<C>;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerConnection<C> {
        // A node the group's membership names by address, new to this node: connect to it.
        let connection = self.peers.get(&target).or_else(|| (!node.addr.is_empty()).then(|| self.peers.connect(target, &node.addr)));
        PeerConnection { namespace: self.namespace.clone(), group: self.group, target, connection, types: PhantomData }
    }
}

impl<C: NetworkTypes> PeerConnection<C> {
    async fn send<E: std::error::Error>(&mut self, rpc: RaftRpc<C>, option: &RPCOption) -> Result<RaftReply, RPCError<NodeId, BasicNode, E>> {
        let unknown = || std::io::Error::other(format!("node {} has no known address", self.target));
        let Some(connection) = self.connection.as_ref() else {
            return Err(RPCError::Unreachable(Unreachable::new(&unknown())));
        };
        let entries = match &rpc {
            RaftRpc::AppendEntries(append) => append.entries.len() as u64,
            _ => 0,
        };
        let message = bincode::serialize(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        // Over the frame limit: ask openraft for fewer entries per message (half as many), rather
        // than failing the same oversized batch forever.
        if message.len() + 1024 > crate::protocol::FRAME_BYTES_MAX_DEFAULT && entries > 1 {
            return Err(RPCError::PayloadTooLarge(openraft::error::PayloadTooLarge::new_entries_hint(entries / 2)));
        }
        let request = Request::Raft { namespace: self.namespace.clone(), group: self.group, message };
        let timeout = option.hard_ttl().max(Duration::from_millis(50));
        match connection.call(&request, timeout).await {
            Ok(Response::Raft { message }) => bincode::deserialize(&message).map_err(|e| RPCError::Network(NetworkError::new(&e))),
            Ok(other) => Err(RPCError::Network(NetworkError::new(&std::io::Error::other(format!("unexpected reply {other:?}"))))),
            Err(err) => Err(RPCError::Unreachable(Unreachable::new(&err))),
        }
    }
}

fn mismatch<E: std::error::Error>() -> RPCError<NodeId, BasicNode, E> {
    RPCError::Network(NetworkError::new(&std::io::Error::other("reply of another kind")))
}

fn remote<E: std::error::Error>(target: NodeId, err: E) -> RPCError<NodeId, BasicNode, E> {
    RPCError::RemoteError(openraft::error::RemoteError::new(target, err))
}

impl<C: NetworkTypes> RaftNetwork<C> for PeerConnection<C> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.send(RaftRpc::AppendEntries(rpc), &option).await? {
            RaftReply::AppendEntries(reply) => reply.map_err(|e| remote(self.target, e)),
            _ => Err(mismatch()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<C>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>> {
        match self.send(RaftRpc::InstallSnapshot(rpc), &option).await? {
            RaftReply::InstallSnapshot(reply) => reply.map_err(|e| remote(self.target, e)),
            _ => Err(mismatch()),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<NodeId>, option: RPCOption) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.send(RaftRpc::Vote(rpc), &option).await? {
            RaftReply::Vote(reply) => reply.map_err(|e| remote(self.target, e)),
            _ => Err(mismatch()),
        }
    }
}
