//! openraft's type configuration and the commands a group's log carries.

use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::key::Key;
use crate::ops::{OpResult, RangeLockHeld, WriteOp, WritePolicy};
use crate::protocol::{ErrorReply, Response, WriteTag};
use crate::value::RecordMeta;

pub type NodeId = u64;

/// A write, as proposed by a leader and applied by every replica.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub key: Key,
    pub op: WriteOp,
    pub policy: WritePolicy,
    /// The leader's wall clock when it proposed the write (TTLs, last-update times, and the
    /// idle expiry of client sessions).
    pub now_ms: u64,
    /// The client's exactly-once tag (`None`: not deduplicated).
    pub tag: Option<WriteTag>,
}

/// A write's outcome, the same on every replica.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CommandResult {
    Applied {
        meta: RecordMeta,
        results: Vec<OpResult>,
    },
    /// A condition failed or the request was bad: nothing was written.
    Failed(WriteFailure),
    /// The engine already reflected this entry (replay after restart).
    Replayed,
    /// A blank or membership entry.
    Noop,
    /// A retry of a tagged write applied earlier: what it did then.
    Duplicate(Outcome),
    /// A tagged write refused without being applied (see `sessions`).
    Refused(Refusal),
}

/// What a tagged write did the first time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Outcome {
    Written {
        meta: RecordMeta,
        results: Vec<OpResult>,
    },
    Failed(WriteFailure),
    /// Applied exactly once, but what it returned was not retained (read results over
    /// `RESULT_BYTES_MAX`, or the write was replayed after a restart from an engine that already
    /// held it and a later write to the record).
    ResultLost,
}

/// Why a tagged write was refused without being applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// Older than the lane's last write: a delayed copy of a write the client finished with.
    Stale,
    /// The client was dropped from the table (idle, or evicted): it must take a new id.
    ClientExpired,
    /// The lane is `LANES_MAX` or more.
    TooManyInFlight,
}

/// Deterministic refusals (the same on every replica from the same state).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WriteFailure {
    GenerationMismatch {
        expected: u32,
        actual: u32,
    },
    RecordExists,
    RecordNotFound,
    RecordTooBig {
        size_bytes: usize,
        limit_bytes: usize,
    },
    IncompatibleBin {
        bin: String,
        reason: String,
    },
    BadRequest(String),
    /// A write of a lease session that is fenced in the group (`fences`): not applied.
    SessionExpired {
        session: u64,
    },
    /// A lock another session holds.
    LockHeld {
        holder: u64,
    },
    /// An unlock of a lock the session does not hold (`holder`: who does, if anyone).
    LockNotHeld {
        holder: Option<u64>,
    },
    /// A byte-range lock of another owner is in the way (`ops::RangeLock`).
    RangeLockHeld(RangeLockHeld),
}

/// The refusal an engine error stands for; errors that are not answers (device failures,
/// corruption) convert to nothing (`Err(())`): those stop the replica.
impl TryFrom<&Error> for WriteFailure {
    type Error = ();

    fn try_from(err: &Error) -> Result<WriteFailure, ()> {
        Ok(match err {
            Error::GenerationMismatch { expected, actual } => WriteFailure::GenerationMismatch { expected: *expected, actual: *actual },
            Error::RecordExists => WriteFailure::RecordExists,
            Error::RecordNotFound => WriteFailure::RecordNotFound,
            Error::RecordTooBig { size_bytes, limit_bytes } => WriteFailure::RecordTooBig { size_bytes: *size_bytes, limit_bytes: *limit_bytes },
            Error::IncompatibleBin { bin, reason } => WriteFailure::IncompatibleBin { bin: bin.clone(), reason: reason.clone() },
            Error::BadRequest(what) => WriteFailure::BadRequest(what.clone()),
            _ => return Err(()),
        })
    }
}

/// What the client is told of a deterministic refusal: the variant of the same name.
impl From<WriteFailure> for ErrorReply {
    fn from(failure: WriteFailure) -> ErrorReply {
        match failure {
            WriteFailure::GenerationMismatch { expected, actual } => ErrorReply::GenerationMismatch { expected, actual },
            WriteFailure::RecordExists => ErrorReply::RecordExists,
            WriteFailure::RecordNotFound => ErrorReply::RecordNotFound,
            WriteFailure::RecordTooBig { size_bytes, limit_bytes } => ErrorReply::RecordTooBig { size_bytes, limit_bytes },
            WriteFailure::IncompatibleBin { bin, reason } => ErrorReply::IncompatibleBin { bin, reason },
            WriteFailure::BadRequest(what) => ErrorReply::BadRequest(what),
            WriteFailure::SessionExpired { session } => ErrorReply::SessionExpired { session },
            WriteFailure::LockHeld { holder } => ErrorReply::LockHeld { holder },
            WriteFailure::LockNotHeld { holder } => ErrorReply::LockNotHeld { holder },
            WriteFailure::RangeLockHeld(held) => ErrorReply::RangeLockHeld(held),
        }
    }
}

/// What the client is told of a tagged write the exactly-once table refused (not applied).
impl From<Refusal> for ErrorReply {
    fn from(refusal: Refusal) -> ErrorReply {
        match refusal {
            Refusal::Stale => ErrorReply::StaleWrite,
            Refusal::ClientExpired => ErrorReply::ClientExpired,
            Refusal::TooManyInFlight => ErrorReply::TooManyInFlight,
        }
    }
}

impl CommandResult {
    /// The answer to the client whose write, applied at log index `index`, had this result.
    pub fn into_response(self, index: u64) -> Response {
        match self {
            CommandResult::Applied { meta, results } | CommandResult::Duplicate(Outcome::Written { meta, results }) => {
                Response::Written { meta, results, index }
            }
            CommandResult::Failed(failure) | CommandResult::Duplicate(Outcome::Failed(failure)) => Response::Error(failure.into()),
            CommandResult::Duplicate(Outcome::ResultLost) => Response::Error(ErrorReply::AppliedResultLost),
            CommandResult::Refused(refusal) => Response::Error(refusal.into()),
            CommandResult::Replayed | CommandResult::Noop => Response::Error(ErrorReply::Internal(format!("unexpected apply result {self:?}"))),
        }
    }
}

openraft::declare_raft_types!(
    /// chunkstore's openraft types.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type RaftInstance = openraft::Raft<TypeConfig>;
