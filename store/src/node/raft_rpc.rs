//! Raft messages from peers, handed to the group they are for: the metadata group, or a
//! partition group (through its rejoin guard while the replica catches up after losing its
//! copy).

use super::*;

impl Node {
    pub(super) async fn handle_meta_raft(&self, group: u32, message: &[u8]) -> Response {
        match self.meta.get() {
            Some(meta) if group == 0 => {
                // The metadata group's messages are few: decoding one twice costs nothing. A
                // leader's message counts if its term is not behind this member's (a deposed
                // leader's is refused).
                let vote = match decode_rpc::<crate::meta::MetaTypeConfig>(message) {
                    Ok(RaftRpc::AppendEntries(request)) => Some(request.vote),
                    Ok(RaftRpc::InstallSnapshot(request)) => Some(request.vote),
                    _ => None,
                };
                if vote.is_some_and(|vote| vote >= meta.raft.metrics().borrow().vote) {
                    self.note_metadata_leader_message();
                }
                serve_replica(&meta.raft, &meta.rejoin, message).await
            }
            _ => Response::Error(ErrorReply::BadRequest("this node is not a voter of the metadata group".into())),
        }
    }

    pub(super) async fn handle_raft(&self, namespace: &str, group: u32, message: &[u8]) -> Response {
        let Some(group) = self.namespaces().and_then(|n| n.get(namespace)).and_then(|h| h.group(group)) else {
            return Response::Error(ErrorReply::BadRequest(format!("this node does not replicate {namespace}/{group}")));
        };
        serve_replica(&group.raft, &group.rejoin, message).await
    }
}

/// Hands a Raft message from a peer to this node's replica, `raft`. While the replica catches
/// up after losing its copy (`rejoin`), no vote is granted (but the revived survivor's, see
/// `revive`), and a leader's commit index is noted.
pub(super) async fn serve_replica<C: raft_network::NetworkTypes>(raft: &openraft::Raft<C>, rejoin: &rejoin::Rejoin, message: &[u8]) -> Response {
    if !rejoin.is_active() {
        return serve_raft(raft, message).await;
    }
    let rpc = match decode_rpc(message) {
        Ok(rpc) => rpc,
        Err(reply) => return Response::Error(reply),
    };
    match &rpc {
        RaftRpc::Vote(request) if !rejoin.allows(request) => {
            let current = raft.metrics().borrow().vote;
            return encode_reply(&RaftReply::Vote(Ok(rejoin::Rejoin::refusal(&current))));
        }
        RaftRpc::Vote(_) => {}
        RaftRpc::AppendEntries(request) => rejoin.observe(request),
        RaftRpc::InstallSnapshot(_) => {}
    }
    serve_rpc(raft, rpc).await
}

/// Hands a Raft message from a peer to `raft` and encodes its reply.
pub(super) async fn serve_raft<C: raft_network::NetworkTypes>(raft: &openraft::Raft<C>, message: &[u8]) -> Response {
    match decode_rpc(message) {
        Ok(rpc) => serve_rpc(raft, rpc).await,
        Err(reply) => Response::Error(reply),
    }
}

pub(super) fn decode_rpc<C: raft_network::NetworkTypes>(message: &[u8]) -> Result<RaftRpc<C>, ErrorReply> {
    bincode::deserialize(message).map_err(|err| ErrorReply::BadRequest(format!("malformed raft message: {err}")))
}

pub(super) async fn serve_rpc<C: raft_network::NetworkTypes>(raft: &openraft::Raft<C>, rpc: RaftRpc<C>) -> Response {
    let reply = match rpc {
        RaftRpc::AppendEntries(request) => RaftReply::AppendEntries(raft.append_entries(request).await),
        RaftRpc::Vote(request) => RaftReply::Vote(raft.vote(request).await),
        RaftRpc::InstallSnapshot(request) => RaftReply::InstallSnapshot(raft.install_snapshot(request).await),
    };
    encode_reply(&reply)
}

pub(super) fn encode_reply(reply: &RaftReply) -> Response {
    Response::Raft { message: bincode::serialize(reply).expect("raft replies serialize") }
}
