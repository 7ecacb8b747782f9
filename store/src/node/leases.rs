//! Lease sessions at a node: the requests clients send (open, keep alive, close), the fences
//! the metadata leader asks group leaders to commit (directly, or relayed by a node that
//! reaches the leader), and the metadata leader's loop that ends
//! sessions whose lease ran out and fences them everywhere. The replicated parts are
//! `meta::leases` (the table) and `raft::fences` (each group's fenced sessions).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use tokio::time::Instant;

use super::Node;
use crate::meta::leases::{TTL_MS_MAX, TTL_MS_MIN};
use crate::meta::ClusterMetaExt as _;
use crate::meta::{EndReason, LeaseState, MetaCommand, MetaRaft, MetaResult};
use crate::protocol::{ErrorReply, Request, Response};
use crate::raft::{Command, CommandResult, NodeId};

/// How often the metadata leader looks for leases that ran out.
const LEASE_POLL: Duration = Duration::from_millis(50);

/// The metadata leader's clock for the leases (not replicated; see `meta::leases`).
#[derive(Default)]
pub(super) struct LeaseClock {
    /// The metadata term these deadlines were set in: a new term starts every lease afresh.
    term: Option<u64>,
    deadlines: HashMap<u64, Instant>,
    /// Sessions whose fencing runs now.
    fencing: HashSet<u64>,
}

impl Node {
    /// This node's metadata group member, if it leads the group; NotLeader otherwise.
    ///
    /// A leader that committed its own removal from the voters is not one, though openraft's
    /// metrics still name it (its vote stays until a newer leader reaches it, and none does):
    /// acting on, it would drive moves from metadata that no longer changes.
    pub(super) fn leading_meta(&self) -> Result<&MetaRaft, ErrorReply> {
        let raft = self.meta_raft().ok_or(ErrorReply::NotLeader { leader: None })?;
        let metrics = raft.metrics().borrow().clone();
        let me = self.config.node_id;
        match metrics.current_leader {
            Some(leader) if leader != me => Err(ErrorReply::NotLeader { leader: Some(leader) }),
            None => Err(ErrorReply::NotLeader { leader: None }),
            Some(_) if !metrics.membership_config.membership().voter_ids().any(|id| id == me) => Err(ErrorReply::NotLeader { leader: None }),
            Some(_) if self.leads_out_of_touch(&metrics) => Err(ErrorReply::NotLeader { leader: None }),
            Some(_) => Ok(raft),
        }
    }

    /// Proposes a metadata command as its leader.
    pub(super) async fn propose_meta(&self, command: MetaCommand) -> Result<MetaResult, ErrorReply> {
        let raft = self.leading_meta()?;
        match self.while_in_touch(raft.metrics(), raft.client_write(command)).await {
            None => Err(ErrorReply::Timeout { in_doubt: true }),
            Some(Ok(written)) => Ok(written.data),
            Some(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) | Some(Err(RaftError::Fatal(_))) => {
                Err(ErrorReply::Timeout { in_doubt: true })
            }
            Some(Err(err)) => Err(ErrorReply::Internal(err.to_string())),
        }
    }

    pub(super) async fn handle_session_open(&self, ttl_ms: u64) -> Response {
        if !(TTL_MS_MIN..=TTL_MS_MAX).contains(&ttl_ms) {
            return Response::Error(ErrorReply::BadRequest(format!("a lease TTL of {ttl_ms} ms: it must be {TTL_MS_MIN}..={TTL_MS_MAX} ms")));
        }
        match self.propose_meta(MetaCommand::OpenSession { ttl_ms }).await {
            Ok(MetaResult::SessionOpened { session }) => {
                self.lease_clock.lock().unwrap().deadlines.insert(session, Instant::now() + Duration::from_millis(ttl_ms));
                Response::SessionOpened { session, ttl_ms }
            }
            Ok(MetaResult::TooManySessions(count)) => Response::Error(ErrorReply::TooManySessions(count)),
            Ok(other) => Response::Error(ErrorReply::Internal(format!("unexpected metadata result {other:?}"))),
            Err(reply) => Response::Error(reply),
        }
    }

    /// Renews a lease. The leader first confirms it leads and has applied everything committed
    /// (a new leader may not have applied a session opened under the old one yet). A lease
    /// whose deadline passed in this term is not renewed: it is answered SessionExpired.
    pub(super) async fn handle_keep_alive(&self, session: u64) -> Response {
        let raft = match self.leading_meta() {
            Ok(raft) => raft,
            Err(reply) => return Response::Error(reply),
        };
        match self.while_in_touch(raft.metrics(), raft.ensure_linearizable()).await {
            Some(Ok(_)) => {}
            Some(Err(_)) => return Response::Error(ErrorReply::NotLeader { leader: None }),
            None => return Response::Error(ErrorReply::Timeout { in_doubt: false }),
        }
        let term = raft.metrics().borrow().current_term;
        match self.meta_state.lease_state(session) {
            LeaseState::Open { ttl_ms } => {
                let mut clock = self.lease_clock.lock().unwrap();
                let now = Instant::now();
                // A lease that ran out in this term stays out: `keep_leases` is recording its end,
                // and a renewal answered now would tell the holder it holds a lease that ends.
                if clock.term == Some(term) && clock.deadlines.get(&session).is_some_and(|deadline| now > *deadline) {
                    return Response::Error(ErrorReply::SessionExpired { session });
                }
                clock.deadlines.insert(session, now + Duration::from_millis(ttl_ms));
                Response::SessionAlive { ttl_ms }
            }
            LeaseState::Ending(_) | LeaseState::Gone => Response::Error(ErrorReply::SessionExpired { session }),
        }
    }

    /// Ends a session at its client's request; its fencing follows (`keep_leases`).
    pub(super) async fn handle_session_close(&self, session: u64) -> Response {
        match self.propose_meta(MetaCommand::EndSession { session, reason: EndReason::Closed }).await {
            Ok(_) => Response::Noted,
            Err(reply) => Response::Error(reply),
        }
    }

    /// Commits a `FenceSession` entry in one of this node's groups, as its leader. A node that
    /// does not lead the group passes the fence on (`relay`) to the group's leader.
    pub(super) async fn handle_fence(&self, namespace: &str, group: u32, session: u64, release: bool, finished_below: u64, relay: bool) -> Response {
        let local = self.namespaces().and_then(|n| n.get(namespace)).and_then(|h| h.group(group));
        let leader = match &local {
            Some(local) => local.raft.current_leader().await,
            None => None,
        };
        let local = match local {
            Some(local) if leader == Some(self.config.node_id) => local,
            _ if relay => {
                let request = Request::FenceSession { namespace: namespace.to_owned(), group, session, release, finished_below, relay: false };
                return self.relay_fence(namespace, group, &request, leader).await;
            }
            _ => return Response::Error(ErrorReply::NotLeader { leader }),
        };
        let op = crate::WriteOp::FenceSession { session, release, finished_below };
        let command = |now_ms| Command { key: crate::Key::new("", 0), op, policy: Default::default(), now_ms, tag: None };
        match self.propose(&local, command).await {
            Ok(written) if written.data == CommandResult::Noop => Response::Noted,
            Ok(written) => Response::Error(ErrorReply::Internal(format!("unexpected fence result {:?}", written.data))),
            Err(not_proposed) => Response::Error(not_proposed.into()),
        }
    }

    /// Passes a fence (`relay` false: it goes no further) to the leader of the group, found
    /// among its replicas as this node sees them. Anything but `Noted` is answered as NotLeader
    /// naming the leader this node knows (`hint`), so that the metadata leader goes on trying
    /// its other routes; a fence is idempotent, so one that was committed after all does no
    /// harm when committed again. Bounded by half the request timeout, so that the metadata
    /// leader, which waits a whole one for this node, hears the answer.
    async fn relay_fence(&self, namespace: &str, group: u32, request: &Request, hint: Option<NodeId>) -> Response {
        let not_leader = Response::Error(ErrorReply::NotLeader { leader: hint });
        let replicas = self.joined.get().and_then(|joined| {
            let cluster = joined.cluster.read().unwrap();
            cluster.namespace(namespace).and_then(|ns| ns.placement.get(group as usize).cloned())
        });
        let Some(mut replicas) = replicas else { return not_leader };
        if let Some(hint) = hint.filter(|h| !replicas.contains(h)) {
            replicas.insert(0, hint);
        }
        match tokio::time::timeout(self.config.request_timeout / 2, self.route_to_group_leader(&replicas, request)).await {
            Ok(Some(Response::Noted)) => {
                tracing::info!(namespace, group, "relayed a fence to the group's leader");
                Response::Noted
            }
            Ok(other) => {
                tracing::debug!(namespace, group, ?other, "a relayed fence did not reach the group's leader");
                not_leader
            }
            Err(_) => not_leader,
        }
    }

    /// Sends one `FenceSession` to the leader of a group until it is done (true), or this node
    /// no longer leads the metadata group or stops (false). Each round tries `route` (the
    /// group's preferred leader, then its replicas), then, as relays, the `others` nodes that
    /// answered lately: in a ring partition no replica may be reachable from here while some
    /// other node reaches the group's leader.
    async fn fence_in_group(&self, route: &[NodeId], others: &[NodeId], request: &Request) -> bool {
        let mut reported = false;
        loop {
            let mut candidates = route.to_vec();
            candidates.extend(others.iter().filter(|id| self.answered_lately(**id)));
            if matches!(self.route_to_group_leader(&candidates, request).await, Some(Response::Noted)) {
                return true;
            }
            if self.leading_meta().is_err() || self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                return false;
            }
            if !reported {
                if let Request::FenceSession { namespace, group, session, release, .. } = request {
                    tracing::warn!(session, namespace, group, release, "cannot fence the session in this group yet: retrying");
                }
                reported = true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Fences `session` in every group of every namespace, then releases it in every group,
    /// then records it finished. The groups are fenced at once, each retried until done (a
    /// group without a quorum holds the session's locks until it has one again, but no other
    /// group waits behind it).
    async fn fence_everywhere(self: &Arc<Self>, session: u64) {
        let Some(cluster) = self.meta_state.cluster() else { return };
        let finished_below = self.meta_state.leases_finished_below();
        let preferred = cluster.preferred_leaders();
        for release in [false, true] {
            let mut fences = tokio::task::JoinSet::new();
            for ns in &cluster.namespaces {
                for group in 0..ns.groups {
                    let request = Request::FenceSession { namespace: ns.name.clone(), group, session, release, finished_below, relay: true };
                    let first = preferred.get(&ns.name).and_then(|p| p.get(group as usize)).copied();
                    let rest = ns.placement[group as usize].iter().copied().filter(|id| Some(*id) != first);
                    let route: Vec<NodeId> = first.into_iter().chain(rest).collect();
                    let others: Vec<NodeId> = cluster.nodes.iter().map(|n| n.id).filter(|id| !route.contains(id)).collect();
                    let node = Arc::clone(self);
                    fences.spawn(async move { node.fence_in_group(&route, &others, &request).await });
                }
            }
            // Every group must be fenced before any is released.
            while let Some(done) = fences.join_next().await {
                if !matches!(done, Ok(true)) {
                    return; // the next metadata leader takes over
                }
            }
        }
        match self.propose_meta(MetaCommand::SessionFinished { session }).await {
            Ok(_) => tracing::info!(session, "lease session fenced and released in every group"),
            Err(err) => tracing::warn!(session, %err, "recording the session finished failed; the next round retries"),
        }
    }
}

/// The metadata leader's loop: ends sessions whose lease ran out, and fences ending sessions
/// everywhere (one task per session). Runs on every node; acts only while leading.
pub(super) async fn keep_leases(node: Weak<Node>) {
    loop {
        tokio::time::sleep(LEASE_POLL).await;
        let Some(node) = node.upgrade() else { return };
        if node.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let Some(raft) = node.meta_raft() else { continue };
        let (leader, term) = {
            let metrics = raft.metrics();
            let metrics = metrics.borrow();
            (metrics.current_leader, metrics.current_term)
        };
        if leader != Some(node.config.node_id) || node.joined.get().is_none() {
            let mut clock = node.lease_clock.lock().unwrap();
            clock.term = None;
            clock.deadlines.clear();
            continue;
        }
        let leases = node.meta_state.leases();
        let now = Instant::now();
        let (expired, ending) = {
            let mut clock = node.lease_clock.lock().unwrap();
            if clock.term != Some(term) {
                // A new term: every open lease starts afresh from now.
                clock.term = Some(term);
                clock.deadlines.clear();
            }
            let open: HashMap<u64, u64> = leases.open_sessions().collect();
            clock.deadlines.retain(|id, _| open.contains_key(id));
            let mut expired = Vec::new();
            for (id, ttl_ms) in &open {
                let deadline = *clock.deadlines.entry(*id).or_insert(now + Duration::from_millis(*ttl_ms));
                if now > deadline {
                    expired.push(*id);
                }
            }
            let ending: Vec<u64> = leases.ending_sessions().filter(|id| !clock.fencing.contains(id)).collect();
            clock.fencing.extend(ending.iter().copied());
            (expired, ending)
        };
        for session in expired {
            match node.propose_meta(MetaCommand::EndSession { session, reason: EndReason::Expired }).await {
                Ok(_) => tracing::info!(session, "lease session expired: it was not renewed in time"),
                Err(err) => tracing::warn!(session, %err, "ending an expired lease session failed; retrying"),
            }
        }
        for session in ending {
            let node = Arc::clone(&node);
            tokio::spawn(async move {
                node.fence_everywhere(session).await;
                node.lease_clock.lock().unwrap().fencing.remove(&session);
            });
        }
    }
}
