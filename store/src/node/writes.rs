//! Writes: the admission checks a client write passes (its group is here and alive, a batch
//! stays in one group, no replica is in stop-writes), and `propose`, the one way every write
//! and every fence becomes a Raft entry.
//!
//! Invariants:
//! - **A write is answered `Written` only after its Raft entry is committed and applied**;
//!   any doubt (a timeout, a lost leader) is `Timeout { in_doubt: true }`, never success.
//! - **A node only proposes for groups it leads, in touch with a quorum**; others get
//!   `NotLeader`, which promises that nothing was proposed.
//! - **Every entry proposed fits in a peer frame** (`ENTRY_BYTES_MAX`): a larger one could
//!   never reach the followers, and its group would stall.

use openraft::raft::ClientWriteResponse;

use super::*;
use crate::raft::TypeConfig;

/// The most bytes a write's entry may take: a peer frame carries it to the followers with the
/// rest of an AppendEntries message around it (log ids, vote, the group's name).
pub const ENTRY_BYTES_MAX: usize = crate::protocol::FRAME_BYTES_MAX_DEFAULT - (64 << 10);

/// Why `propose` did not answer with the applied entry.
pub(super) enum NotProposed {
    /// Refused before proposing (nothing was proposed): this node does not lead the group
    /// (the leader it knows, if any), or leads it out of touch with a quorum.
    NotLeader(Option<NodeId>),
    /// Proposed, but no answer came: leadership or touch was lost meanwhile (`None`) or openraft
    /// failed the proposal; the entry may still commit.
    Unanswered(Option<RaftError<NodeId, ClientWriteError<NodeId, openraft::BasicNode>>>),
}

impl Node {
    /// A client's write of one record, or of a batch in one group.
    pub(super) async fn handle_write(
        &self,
        namespace: String,
        key: crate::Key,
        op: crate::WriteOp,
        policy: crate::WritePolicy,
        tag: crate::protocol::WriteTag,
    ) -> Response {
        let (hosted, group) = match self.local_group(&namespace, &key) {
            Ok(found) => found,
            Err(reply) => return Response::Error(reply),
        };
        let group_id = group_of(&key.digest, hosted.groups);
        if self.is_dead(&namespace, group_id, &group) {
            return Response::Error(ErrorReply::PartitionDead { group: group_id, namespace });
        }
        if let Some(writes) = op.batch() {
            if let Err(reply) = batch_fits(writes, &key, group_id, hosted.groups) {
                return Response::Error(reply);
            }
        }
        // An entry must fit in the frame that carries it to the followers, or the group
        // would retry sending it forever.
        match bincode::serialized_size(&(&key, &op, &policy)) {
            Ok(bytes) if bytes as usize <= ENTRY_BYTES_MAX => {}
            Ok(bytes) => {
                return Response::Error(ErrorReply::BadRequest(format!("a write of {bytes} bytes: a log entry holds at most {ENTRY_BYTES_MAX} bytes")))
            }
            Err(err) => return Response::Error(ErrorReply::BadRequest(format!("a write that cannot be encoded: {err}"))),
        }
        if !op.frees_room() {
            if let Some(reason) = self.stop_writes(&namespace, hosted, &group) {
                return Response::Error(ErrorReply::StopWrites(reason));
            }
        }
        let command = |now_ms| Command { key, op, policy, now_ms, tag: Some(tag) };
        match self.propose(&group, command).await {
            Ok(written) => written.data.into_response(written.log_id.index),
            Err(not_proposed) => Response::Error(not_proposed.into()),
        }
    }

    /// Proposes the command `command` makes (given the time) to `group` as its leader and waits
    /// until it is applied. First the
    /// checks every proposal passes: the write gate (a leadership transfer closes it and waits
    /// for proposals in flight), leadership, and touch with a quorum; the wait ends early if
    /// touch is lost.
    pub(super) async fn propose(&self, group: &Group, command: impl FnOnce(u64) -> Command) -> Result<ClientWriteResponse<TypeConfig>, NotProposed> {
        let _gate = group.write_gate.read().await;
        let leader = group.raft.current_leader().await;
        if leader != Some(self.config.node_id) {
            return Err(NotProposed::NotLeader(leader));
        }
        if self.out_of_touch(group) {
            return Err(NotProposed::NotLeader(None));
        }
        let _in_flight = InFlight::new(&self.writes_in_flight);
        // Stamped once admitted (a hand-over may have held the gate a while).
        let command = command(self.clock.now_ms());
        match self.while_in_touch(group.raft.metrics(), group.raft.client_write(command)).await {
            Some(Ok(written)) => Ok(written),
            Some(Err(err)) => Err(NotProposed::Unanswered(Some(err))),
            None => Err(NotProposed::Unanswered(None)),
        }
    }
}

/// Counts a proposal in flight for as long as it lives (shutdown waits for them).
struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(counter: &'a std::sync::atomic::AtomicUsize) -> InFlight<'a> {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// What the client is told when `propose` did not answer with the applied entry.
impl From<NotProposed> for ErrorReply {
    fn from(not_proposed: NotProposed) -> ErrorReply {
        match not_proposed {
            // Refused before proposing: nothing was proposed.
            NotProposed::NotLeader(leader) => ErrorReply::NotLeader { leader },
            // Proposed, then leadership or touch was lost (openraft answers ForwardToLeader
            // then too), or the group stopped (shutdown) or failed with the entry maybe in its
            // log: the entry may still commit under a new leader, so the fate is unknown.
            NotProposed::Unanswered(None)
            | NotProposed::Unanswered(Some(RaftError::APIError(ClientWriteError::ForwardToLeader(_))))
            | NotProposed::Unanswered(Some(RaftError::Fatal(_))) => ErrorReply::Timeout { in_doubt: true },
            NotProposed::Unanswered(Some(err)) => ErrorReply::Internal(err.to_string()),
        }
    }
}

/// A batch's records must all be in the request key's group, the first of them being that key.
fn batch_fits(writes: &[crate::BatchWrite], key: &crate::Key, group: u32, groups: u32) -> Result<(), ErrorReply> {
    if writes.first().map(|w| &w.key) != Some(key) {
        return Err(ErrorReply::BadRequest("a batch's request key is its first write's key".into()));
    }
    match writes.iter().find(|w| group_of(&w.key.digest, groups) != group) {
        Some(stray) => Err(ErrorReply::BadRequest(format!(
            "a batch writes records of one group: {:?} is in group {}, not {group}",
            stray.key,
            group_of(&stray.key.digest, groups)
        ))),
        None => Ok(()),
    }
}
