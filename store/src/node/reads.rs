//! Reads: a record, or a range of a bytes bin, served as the request's read policy allows
//! (linearizable through the leader's quorum check, session and allow-replica from any replica
//! that applied what the client saw, allow-unavailable from whatever this replica applied).
//!
//! Invariants:
//! - **A read never answers what is not committed**: the engine holds only applied entries.
//! - **The index answered covers the version read**, so a client that saw it is never sent back
//!   before it.

use super::*;

impl Node {
    /// `len` bytes at `offset` of a bytes bin, served as `handle_get` serves the record.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn handle_get_range(
        &self,
        namespace: String,
        key: crate::Key,
        bin: String,
        offset: u64,
        len: u32,
        read: ReadPolicy,
        min_index: u64,
    ) -> Response {
        match self.handle_get(namespace, key, Some(vec![bin.clone()]), read, min_index).await {
            Response::Record { record, index } => Response::Record { record: record.map(|r| bytes_range(r, &bin, offset, len)), index },
            other => other,
        }
    }

    /// A read of a record (`bins`: only those), served as `read` allows.
    pub(super) async fn handle_get(&self, namespace: String, key: crate::Key, bins: Option<Vec<String>>, read: ReadPolicy, min_index: u64) -> Response {
        let (hosted, group) = match self.local_group(&namespace, &key) {
            Ok(found) => found,
            Err(reply) => return Response::Error(reply),
        };
        let group_id = group_of(&key.digest, hosted.groups);
        if read != ReadPolicy::AllowUnavailable && self.is_dead(&namespace, group_id, &group) {
            return Response::Error(ErrorReply::PartitionDead { group: group_id, namespace });
        }
        match read {
            ReadPolicy::Linearizable if self.config.unsafe_unchecked_reads => {}
            ReadPolicy::Linearizable if self.out_of_touch(&group) => return Response::Error(ErrorReply::NotLeader { leader: None }),
            ReadPolicy::Linearizable => {
                let confirmed = self.while_in_touch(group.raft.metrics(), group.raft.ensure_linearizable()).await;
                match confirmed {
                    None => return Response::Error(ErrorReply::Timeout { in_doubt: false }),
                    Some(Ok(_)) => {}
                    Some(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(forward)))) => {
                        return Response::Error(ErrorReply::NotLeader { leader: forward.leader_id })
                    }
                    Some(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => return Response::Error(ErrorReply::PartitionUnavailable),
                    Some(Err(RaftError::Fatal(_))) => return Response::Error(ErrorReply::NotLeader { leader: None }),
                }
            }
            // Whatever this replica has applied: committed entries only.
            ReadPolicy::AllowUnavailable => {}
            // A replica that lost its copy and catches up holds an old prefix of the
            // group: it sends even a client that has seen nothing to the leader.
            ReadPolicy::Session | ReadPolicy::AllowReplica if group.rejoin.is_active() => {
                let leader = group.raft.metrics().borrow().current_leader.filter(|l| *l != self.config.node_id);
                return Response::Error(ErrorReply::NotLeader { leader });
            }
            ReadPolicy::Session | ReadPolicy::AllowReplica => {
                // Any replica that has applied what this client has seen may answer.
                let applied = group.state_machine.last_applied().map_or(0, |l| l.index);
                if applied < min_index {
                    let leader = group.raft.metrics().borrow().current_leader;
                    return Response::Error(ErrorReply::NotLeader { leader });
                }
            }
        }
        let index = group.state_machine.last_applied().map_or(0, |l| l.index);
        // A read may go to the device: keep it off the runtime's worker threads.
        let engine = hosted.engine.clone();
        let stopped = group.state_machine.clone();
        let read = tokio::task::spawn_blocking(move || {
            let names: Option<Vec<&str>> = bins.as_ref().map(|b| b.iter().map(String::as_str).collect());
            let record = engine.get(&key, names.as_deref())?;
            // The index answered covers the version read: a restarted replica's engine
            // can hold versions past its applied point (flushed before the crash, to be
            // replayed), and a client that saw one must never be sent back before it.
            let version = engine.current_version(&key.digest).map_or(0, |(seq, _, _)| seq);
            Ok::<_, crate::Error>((record, index.max(version)))
        })
        .await;
        match read {
            // The group moved away meanwhile: its replica may have been forgotten.
            Ok(Ok(_)) if stopped.is_stopped() => Response::Error(ErrorReply::NotLeader { leader: self.placement_hint(&namespace, group_id) }),
            Ok(Ok((record, index))) => Response::Record { record, index },
            Ok(Err(err)) => Response::Error(ErrorReply::Internal(err.to_string())),
            Err(err) => Response::Error(ErrorReply::Internal(format!("read task failed: {err}"))),
        }
    }

    /// The namespace and this node's replica of the key's group; the error to answer if the
    /// namespace is unknown or the group lives elsewhere (NotLeader with its preferred leader).
    pub(super) fn local_group(&self, namespace: &str, key: &crate::Key) -> Result<(&HostedNamespace, Arc<Group>), ErrorReply> {
        let joined = self.joined.get().ok_or(ErrorReply::NotLeader { leader: None })?;
        let hosted = joined.namespaces.get(namespace).ok_or_else(|| ErrorReply::UnknownNamespace(namespace.to_owned()))?;
        let group_id = group_of(&key.digest, hosted.groups);
        match hosted.group(group_id) {
            Some(group) => Ok((hosted, group)),
            None => Err(ErrorReply::NotLeader { leader: self.placement_hint(namespace, group_id) }),
        }
    }

    /// Where a group this node does not replicate may be led: its preferred leader.
    pub(super) fn placement_hint(&self, namespace: &str, group: u32) -> Option<NodeId> {
        let cluster = self.joined.get()?.cluster.read().unwrap();
        cluster.preferred_leaders().get(namespace).and_then(|leaders| leaders.get(group as usize).copied())
    }
}

/// `len` bytes at `offset` of the record's bytes bin `bin` (fewer past its end, none past it):
/// what a ranged read answers instead of the whole bin. A bin of another type is left whole.
pub(super) fn bytes_range(mut record: crate::Record, bin: &str, offset: u64, len: u32) -> crate::Record {
    for b in record.bins.iter_mut().filter(|b| b.name == bin) {
        if let crate::Value::Bytes(bytes) = &mut b.value {
            let start = (offset.min(bytes.len() as u64)) as usize;
            let end = (offset.saturating_add(len as u64).min(bytes.len() as u64)) as usize;
            bytes.truncate(end);
            bytes.drain(..start);
        }
    }
    record
}
