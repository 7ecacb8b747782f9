//! A replica that lost its copy of a group (its node's data directory wiped, or its WAL lost)
//! while the group lived on at the other replicas.
//!
//! Raft's safety rests on each voter remembering its log and its vote. A replica that comes
//! back empty and votes like a new one can elect a leader that lacks acknowledged writes: with
//! replicas A, B, C, writes committed on A and C while B lagged, then C wiped and A down, an
//! empty C would grant B its vote, and B's term would lose those writes.
//!
//! So a node that starts with an empty log for a group asks the group's other replicas first.
//! If any of them holds entries past the initial membership, the group lived on without this
//! copy: the replica **neither votes nor campaigns** (and does not initialize the group) until
//! its log holds everything the group had committed. It learns how far that is from a leader:
//! the first commit index a leader reports in its own term covers every entry committed before
//! (in Raft, a leader's commit index passes an entry of its own term only after every earlier
//! entry). Once its log reaches that index and is durable, it votes again.
//!
//! The state survives restarts: a marker file per group (`DATA_DIR/rejoin/NAMESPACE.GROUP`) is
//! written before the group starts and removed once caught up, so a node that crashes while
//! catching up (its log then no longer empty, but still short) keeps waiting.
//!
//! A replica that a move brings to a node is held the same way (`Node::start_group`): its log,
//! if it has one, is an old copy from before the group last left the node, cut back to what it
//! had applied, with a membership the group has since changed. Voting on it, two such copies
//! once elected a second leader in a term the group already had one.
//!
//! A group that lost a majority of its copies can elect no leader this way: it is dead
//! (`Node::is_dead`, from the replicas' health reports) until `chunkctl revive` rebuilds it
//! from the best surviving replica (see `revive`). The metadata group follows the same rules
//! (see `metadata`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use openraft::raft::{AppendEntriesRequest, VoteRequest, VoteResponse};

use super::NodeError;
use crate::protocol::Response;
use crate::raft::NodeId;

/// A group replica's catching-up state after its copy was lost.
#[derive(Debug, Default)]
pub(crate) struct Rejoin {
    /// Still catching up: no votes, no campaigns.
    active: AtomicBool,
    /// The log index to reach: the first commit index a leader reported in its own term.
    target: Mutex<Option<u64>>,
    /// The marker file that keeps the state across restarts.
    marker: Option<PathBuf>,
    /// Set by `chunkctl revive` when the group is dead: the survivor it is rebuilt from, and
    /// how far the survivor's log reaches. That candidate gets this replica's vote.
    revived_for: Mutex<Option<(NodeId, u64)>>,
}

impl Rejoin {
    /// Not catching up.
    pub(crate) fn none() -> Rejoin {
        Rejoin::default()
    }

    /// Catching up, with `marker` written (durably) first.
    pub(crate) fn start(marker: PathBuf) -> std::io::Result<Rejoin> {
        if let Some(dir) = marker.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::File::create(&marker)?;
        file.sync_all()?;
        crate::device::sync_parent_dir(&marker).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Rejoin { active: AtomicBool::new(true), target: Mutex::new(None), marker: Some(marker), revived_for: Mutex::new(None) })
    }

    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    /// Notes what a leader's AppendEntries says about the group's commit index.
    pub(crate) fn observe<C: openraft::RaftTypeConfig<NodeId = NodeId>>(&self, request: &AppendEntriesRequest<C>) {
        let Some(commit) = request.leader_commit else { return };
        if request.vote.is_committed() && commit.leader_id.term == request.vote.leader_id().term {
            self.target.lock().unwrap().get_or_insert(commit.index);
        }
    }

    /// The index the log must reach, once a leader told it.
    pub(crate) fn target(&self) -> Option<u64> {
        *self.target.lock().unwrap()
    }

    /// Caught up (the log holds `target` durably): votes again, and the marker goes.
    pub(crate) fn finish(&self) {
        self.active.store(false, Ordering::SeqCst);
        if let Some(marker) = &self.marker {
            if let Err(err) = std::fs::remove_file(marker) {
                // Left behind, it only makes the next start catch up once more.
                tracing::warn!(path = %marker.display(), %err, "could not remove a rejoin marker");
            }
        }
    }

    /// The group is dead and revived from `survivor`: its vote request, with a log reaching
    /// `last_index`, goes to Raft (which grants it as usual); every other one is still refused.
    pub(crate) fn allow_vote_for(&self, survivor: NodeId, last_index: u64) {
        *self.revived_for.lock().unwrap() = Some((survivor, last_index));
    }

    /// Whether `request` is the revived group's survivor campaigning.
    pub(crate) fn allows(&self, request: &VoteRequest<NodeId>) -> bool {
        let allowed = *self.revived_for.lock().unwrap();
        allowed.is_some_and(|(survivor, last_index)| {
            request.vote.leader_id().voted_for() == Some(survivor) && request.last_log_id.is_some_and(|l| l.index >= last_index)
        })
    }

    /// The answer to a vote request while catching up: not granted.
    pub(crate) fn refusal(current: &openraft::Vote<NodeId>) -> VoteResponse<NodeId> {
        VoteResponse::new(current, None, false)
    }
}

/// Where the marker of `namespace`'s `group` lives.
pub(crate) fn marker_path(data_dir: &Path, namespace: &str, group: u32) -> PathBuf {
    data_dir.join("rejoin").join(format!("{namespace}.{group}"))
}

/// What one of a group's other replicas said of its log (`Request::GroupLog`).
pub(super) struct LogAnswer<K> {
    pub from: K,
    pub last_index: Option<u64>,
    pub vote_term: Option<u64>,
}

impl<K> LogAnswer<K> {
    /// Whether the replica's log holds entries past the initial membership (index 0; a
    /// leader's first entry is index 1): the group lived on.
    pub fn lived_on(&self) -> bool {
        self.last_index.is_some_and(|index| index >= 1)
    }
}

/// One `GroupLog` question to one of the other replicas; None if it did not answer.
pub(super) type AskLog<'a> = Pin<Box<dyn Future<Output = Option<Response>> + Send + 'a>>;

impl super::Node {
    /// For a replica whose log of `namespace`'s `group` is empty: asks `others` (through `ask`)
    /// how far their logs reach, round after round, until `needed` of them answered (logging at
    /// once and every 5 s while fewer do). Then records the highest vote term they reported as
    /// this replica's own vote in `wal_group`, so that it never votes twice in a term it forgot,
    /// nor takes entries from a leader of an older term. Returns the answers.
    pub(super) async fn survey_logs<'a, K: Clone>(
        &self,
        (namespace, group, wal_group): (&str, u32, u32),
        others: &'a [K],
        needed: usize,
        ask: impl Fn(&'a K) -> AskLog<'a>,
    ) -> Result<Vec<LogAnswer<K>>, NodeError> {
        let started = tokio::time::Instant::now();
        let mut next_report = started;
        let answers = loop {
            let mut answers = Vec::new();
            for other in others {
                if let Some(Response::GroupLog { last_index, vote_term }) = ask(other).await {
                    answers.push(LogAnswer { from: other.clone(), last_index, vote_term });
                }
            }
            if answers.len() >= needed {
                break answers;
            }
            if tokio::time::Instant::now() >= next_report {
                tracing::warn!(
                    namespace,
                    group,
                    waited_s = started.elapsed().as_secs(),
                    answered = answers.len(),
                    needed,
                    "this node's log of the group is empty: waiting for enough of the other replicas to say whether the group lived on without it"
                );
                next_report += Duration::from_secs(5);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        // A vote this replica kept (its copy was forgotten, not lost) is never taken back.
        let kept_term =
            self.wal.log_state(wal_group).vote.and_then(|bytes| bincode::deserialize::<openraft::Vote<NodeId>>(&bytes).ok()).map(|v| v.leader_id().term);
        if let Some(term) = answers.iter().filter_map(|a| a.vote_term).max().filter(|term| kept_term.is_none_or(|kept| kept < *term)) {
            let vote = openraft::Vote::new(term, self.config.node_id);
            let op = crate::wal::WalOp::Vote(bincode::serialize(&vote).expect("votes serialize"));
            crate::raft::log_store::append_durable(&self.wal, wal_group, vec![op]).await.map_err(|e| NodeError::Raft(e.to_string()))?;
        }
        Ok(answers)
    }
}
