//! Write policies and operations: what a client asks of a record (the pure function that
//! applies them, `plan`, is the server's: store/src/ops.rs).

use crate::value::{Bin, Value};

/// What a write does when the record exists or not (Aerospike's record-exists-action).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RecordExistsAction {
    /// Create the record or merge the given bins into it.
    #[default]
    CreateOrUpdate,
    /// Merge the given bins into an existing record; RecordNotFound otherwise.
    UpdateOnly,
    /// Create the record or replace all its bins.
    Replace,
    /// Replace all bins of an existing record; RecordNotFound otherwise.
    ReplaceOnly,
    /// Create the record; RecordExists if it is there.
    CreateOnly,
}

/// Check-and-set on the record's generation. A missing record has generation 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum GenerationPolicy {
    #[default]
    None,
    ExpectEqual(u32),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Ttl {
    /// The namespace's `default-ttl-secs`.
    #[default]
    NamespaceDefault,
    NeverExpire,
    /// Keep the record's current void time (the default TTL for a new record).
    DontUpdate,
    Seconds(u32),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WritePolicy {
    pub exists: RecordExistsAction,
    pub generation: GenerationPolicy,
    pub ttl: Ttl,
}

/// One step of `Namespace::operate`; the list is applied atomically, in order, each step seeing
/// the ones before it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Operation {
    /// Read one bin (its value as it stands at this point of the list).
    Read {
        bin: String,
    },
    /// Read every bin.
    ReadAll,
    Write(Bin),
    /// Add to an integer bin (a missing bin counts as 0). Overflow is an error.
    Add {
        bin: String,
        delta: i64,
    },
    /// Append to a bytes or string bin (the value's type must match; a missing bin is created).
    Append {
        bin: String,
        value: Value,
    },
    Prepend {
        bin: String,
        value: Value,
    },
    /// Write `data` at `offset` of a bytes bin, extending it. An offset past the end is an
    /// error unless `zero_fill`, which fills the gap with zeros.
    WriteBytesAt {
        bin: String,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        zero_fill: bool,
    },
    /// Set a bytes bin's length: cut it, or extend it with zeros (ftruncate's semantics).
    TruncateBytes {
        bin: String,
        len: u64,
    },
    DeleteBin {
        bin: String,
    },
    DeleteRecord,
}

impl Operation {
    /// Whether the step only reads.
    pub fn is_read(&self) -> bool {
        matches!(self, Operation::Read { .. } | Operation::ReadAll)
    }
}

/// A value returned by a read step of `operate`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OpResult {
    pub bin: String,
    /// `None` when the bin does not exist at that point.
    pub value: Option<Value>,
}

/// A write to one record, owned (what a replicated command carries).
///
/// The variants after `Operate` belong to lease sessions and locks (see `raft::fences`); new
/// variants only ever go at the end, so that logs written before them still decode.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum WriteOp {
    Put(Vec<Bin>),
    Delete,
    Touch,
    Operate(Vec<Operation>),
    /// `op` on behalf of lease session `session`: refused with `SessionExpired`, and not
    /// applied, once the session is fenced in the record's group.
    InSession {
        session: u64,
        op: Box<WriteOp>,
    },
    /// Takes the record as a lock for `session`: the record holds the holder's session id in
    /// bin `LOCK_HOLDER_BIN`. Refused with `LockHeld` while another session holds it and that
    /// session's locks have not been released; taking a lock the session holds again succeeds.
    Lock {
        session: u64,
    },
    /// Gives back a lock `session` holds (the record is deleted). Giving back a lock nobody
    /// holds succeeds; one held by another session is refused with `LockNotHeld`.
    Unlock {
        session: u64,
    },
    /// Not a record write: fences lease session `session` in the key's group (its later writes
    /// are refused), and with `release` also releases its locks there. The cluster fences a
    /// session in every group before it releases it in any. Sessions numbered below
    /// `finished_below` are all finished: the group stops remembering them one by one.
    FenceSession {
        session: u64,
        release: bool,
        finished_below: u64,
    },
    /// Writes several records of one partition group as one Raft entry, all or nothing: every
    /// write's conditions are checked before any is applied, and a refusal of one refuses the
    /// whole batch (nothing written). Each record appears once; each write is a `Put`,
    /// `Delete`, `Touch` or `Operate` without read steps. The request's key is the first
    /// write's key (it routes the batch to its group). Inside `InSession`, the session's fence
    /// covers the whole batch. See store/PROTOCOL.md.
    Batch(Vec<BatchWrite>),
    /// Takes, changes or gives back a byte-range lock (POSIX record-lock semantics) of lease
    /// session `session` in the lock table this record holds (bin `RANGE_LOCKS_BIN`): see
    /// `raft::range_locks`. Refused with `RangeLockHeld` (naming the lock in the way) when
    /// another owner's lock conflicts; locks of released sessions do not count.
    RangeLock {
        session: u64,
        lock: RangeLock,
    },
}

/// The bin a lock table keeps its byte-range locks in.
pub const RANGE_LOCKS_BIN: &str = "range-locks";

/// What a `WriteOp::RangeLock` asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RangeLockKind {
    Shared,
    Exclusive,
    /// Gives back the owner's locks in the range (splitting those that reach past it).
    Unlock,
    /// Takes nothing: refused with `RangeLockHeld` if a shared (or, with `exclusive`, any)
    /// lock of another owner is in the way (fcntl's F_GETLK).
    Test {
        exclusive: bool,
    },
}

/// One byte-range lock request: `owner` is the lock owner within the session (a process, or
/// an open file description), `pid` is reported to others that `Test` against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RangeLock {
    pub owner: u64,
    pub pid: u32,
    /// First byte and last byte (inclusive; `u64::MAX`: to the end of the file, ever).
    pub start: u64,
    pub end: u64,
    pub kind: RangeLockKind,
}

/// One record's write in a `WriteOp::Batch`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatchWrite {
    pub key: crate::key::Key,
    pub op: WriteOp,
    pub policy: WritePolicy,
}

/// Most writes one batch may carry.
pub const BATCH_WRITES_MAX: usize = 1024;

/// The bin a lock record keeps its holder's session id in.
pub const LOCK_HOLDER_BIN: &str = "lock-holder";

impl WriteOp {
    /// The writes of a batch (also inside a session), or `None` for a single-record write.
    pub fn batch(&self) -> Option<&[BatchWrite]> {
        match self {
            WriteOp::Batch(writes) => Some(writes),
            WriteOp::InSession { op, .. } => op.batch(),
            _ => None,
        }
    }

    /// Whether the write returns values it read (an operate with read steps).
    pub fn has_reads(&self) -> bool {
        match self {
            WriteOp::Operate(ops) => ops.iter().any(Operation::is_read),
            WriteOp::InSession { op, .. } => op.has_reads(),
            WriteOp::Batch(writes) => writes.iter().any(|w| w.op.has_reads()),
            _ => false,
        }
    }

    /// Whether the write only removes data (it goes through even in stop-writes).
    pub fn frees_room(&self) -> bool {
        match self {
            WriteOp::Delete | WriteOp::Unlock { .. } | WriteOp::FenceSession { .. } => true,
            WriteOp::RangeLock { lock, .. } => matches!(lock.kind, RangeLockKind::Unlock | RangeLockKind::Test { .. }),
            WriteOp::InSession { op, .. } => op.frees_room(),
            WriteOp::Batch(writes) => writes.iter().all(|w| w.op.frees_room()),
            _ => false,
        }
    }
}

/// The byte-range lock in the way of a `WriteOp::RangeLock`: whose, which bytes, which kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RangeLockHeld {
    pub session: u64,
    pub owner: u64,
    pub pid: u32,
    pub start: u64,
    pub end: u64,
    pub exclusive: bool,
}
