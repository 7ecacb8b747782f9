//! Write policies and operations, and the pure function that applies them to a record.
//!
//! `plan` has no I/O: given the record as it is (or nothing) it decides what the engine writes.
//! Every failed condition is a distinct error and nothing is ever cut short silently.

use crate::error::{Error, Result};
use crate::value::{Bin, Record, Value};

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
    Read { bin: String },
    /// Read every bin.
    ReadAll,
    Write(Bin),
    /// Add to an integer bin (a missing bin counts as 0). Overflow is an error.
    Add { bin: String, delta: i64 },
    /// Append to a bytes or string bin (the value's type must match; a missing bin is created).
    Append { bin: String, value: Value },
    Prepend { bin: String, value: Value },
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
    TruncateBytes { bin: String, len: u64 },
    DeleteBin { bin: String },
    DeleteRecord,
}

impl Operation {
    fn is_read(&self) -> bool {
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
    InSession { session: u64, op: Box<WriteOp> },
    /// Takes the record as a lock for `session`: the record holds the holder's session id in
    /// bin `LOCK_HOLDER_BIN`. Refused with `LockHeld` while another session holds it and that
    /// session's locks have not been released; taking a lock the session holds again succeeds.
    Lock { session: u64 },
    /// Gives back a lock `session` holds (the record is deleted). Giving back a lock nobody
    /// holds succeeds; one held by another session is refused with `LockNotHeld`.
    Unlock { session: u64 },
    /// Not a record write: fences lease session `session` in the key's group (its later writes
    /// are refused), and with `release` also releases its locks there. The cluster fences a
    /// session in every group before it releases it in any. Sessions numbered below
    /// `finished_below` are all finished: the group stops remembering them one by one.
    FenceSession { session: u64, release: bool, finished_below: u64 },
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
    RangeLock { session: u64, lock: RangeLock },
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
    Test { exclusive: bool },
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
    /// What the engine does for this write; `None` for operations that are not record writes
    /// by themselves (sessions, locks: the group's state machine turns them into record writes).
    pub(crate) fn as_mutation(&self) -> Option<Mutation<'_>> {
        Some(match self {
            WriteOp::Put(bins) => Mutation::Put(bins),
            WriteOp::Delete => Mutation::Delete,
            WriteOp::Touch => Mutation::Touch,
            WriteOp::Operate(ops) => Mutation::Operate(ops),
            WriteOp::InSession { op, .. } => return op.as_mutation(),
            WriteOp::Lock { .. } | WriteOp::Unlock { .. } | WriteOp::FenceSession { .. } | WriteOp::Batch(_) | WriteOp::RangeLock { .. } => return None,
        })
    }

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

/// What a request asks of one record.
#[derive(Debug)]
pub(crate) enum Mutation<'a> {
    Put(&'a [Bin]),
    Delete,
    Touch,
    Operate(&'a [Operation]),
}

/// The engine's decision.
#[derive(Debug, PartialEq)]
pub(crate) enum Plan {
    Write { bins: Vec<Bin>, generation: u32, void_time_secs: u32 },
    Delete { generation: u32 },
    /// Reads only: nothing to write.
    Nothing,
}

pub(crate) struct PlanContext {
    pub now_ms: u64,
    pub default_ttl_secs: u32,
    /// Largest bytes bin an operation may build (the record size limit).
    pub bin_bytes_max: usize,
}

pub(crate) fn next_generation(generation: u32) -> u32 {
    match generation.wrapping_add(1) {
        0 => 1,
        next => next,
    }
}

/// Decides what to write; `Err` for a failed condition or a bad request. Takes the record by
/// value so that a large bytes bin is edited in place, not copied.
pub(crate) fn plan(
    existing: Option<Record>,
    policy: &WritePolicy,
    mutation: &Mutation<'_>,
    ctx: &PlanContext,
) -> Result<(Plan, Vec<OpResult>)> {
    let current_generation = existing.as_ref().map_or(0, |r| r.meta.generation);
    if let GenerationPolicy::ExpectEqual(expected) = policy.generation {
        if expected != current_generation {
            return Err(Error::GenerationMismatch { expected, actual: current_generation });
        }
    }
    let needs_record = matches!(policy.exists, RecordExistsAction::UpdateOnly | RecordExistsAction::ReplaceOnly)
        || matches!(mutation, Mutation::Delete | Mutation::Touch);
    match (&existing, policy.exists) {
        (None, _) if needs_record => return Err(Error::RecordNotFound),
        (Some(_), RecordExistsAction::CreateOnly) => return Err(Error::RecordExists),
        _ => {}
    }
    let generation = next_generation(current_generation);
    let void_time = |existing_void: Option<u32>| -> u32 {
        let from_now = |secs: u32| ((ctx.now_ms / 1000) as u32).saturating_add(secs.max(1));
        match (policy.ttl, existing_void) {
            (Ttl::NeverExpire, _) => 0,
            (Ttl::Seconds(secs), _) => from_now(secs),
            (Ttl::DontUpdate, Some(current)) => current,
            (Ttl::DontUpdate | Ttl::NamespaceDefault, _) => match ctx.default_ttl_secs {
                0 => 0,
                secs => from_now(secs),
            },
        }
    };
    let replace = matches!(policy.exists, RecordExistsAction::Replace | RecordExistsAction::ReplaceOnly);
    match mutation {
        Mutation::Delete => Ok((Plan::Delete { generation }, Vec::new())),
        Mutation::Touch => {
            let record = existing.expect("checked above");
            let void_time_secs = void_time(Some(record.meta.void_time_secs));
            Ok((Plan::Write { bins: record.bins, generation, void_time_secs }, Vec::new()))
        }
        Mutation::Put(bins) => {
            if bins.is_empty() {
                return Err(Error::BadRequest("a put needs at least one bin".into()));
            }
            let existing_void = existing.as_ref().map(|r| r.meta.void_time_secs);
            let mut merged = match existing {
                Some(record) if !replace => record.bins,
                _ => Vec::new(),
            };
            for bin in bins.iter() {
                check_bin_name(&bin.name)?;
                set_bin(&mut merged, bin.clone());
            }
            let void_time_secs = void_time(existing_void);
            Ok((Plan::Write { bins: merged, generation, void_time_secs }, Vec::new()))
        }
        Mutation::Operate(ops) => plan_operate(existing, replace, ops, ctx, generation, void_time),
    }
}

fn plan_operate(
    existing: Option<Record>,
    replace: bool,
    ops: &[Operation],
    ctx: &PlanContext,
    generation: u32,
    void_time: impl Fn(Option<u32>) -> u32,
) -> Result<(Plan, Vec<OpResult>)> {
    if ops.is_empty() {
        return Err(Error::BadRequest("operate needs at least one operation".into()));
    }
    let reads_only = ops.iter().all(Operation::is_read);
    if existing.is_none() && reads_only {
        return Err(Error::RecordNotFound);
    }
    let existed = existing.is_some();
    let existing_void = existing.as_ref().map(|r| r.meta.void_time_secs);
    let mut bins = match existing {
        Some(record) if !replace || reads_only => record.bins,
        _ => Vec::new(),
    };
    let mut results = Vec::new();
    for op in ops {
        apply_op(&mut bins, op, &mut results, ctx)?;
    }
    if reads_only {
        return Ok((Plan::Nothing, results));
    }
    if bins.is_empty() {
        // The last bin went (or DeleteRecord with nothing after it): the record goes.
        let plan = if existed { Plan::Delete { generation } } else { Plan::Nothing };
        return Ok((plan, results));
    }
    let void_time_secs = void_time(existing_void);
    Ok((Plan::Write { bins, generation, void_time_secs }, results))
}

fn apply_op(bins: &mut Vec<Bin>, op: &Operation, results: &mut Vec<OpResult>, ctx: &PlanContext) -> Result<()> {
    match op {
        Operation::Read { bin } => {
            results.push(OpResult { bin: bin.clone(), value: find(bins, bin).cloned() });
        }
        Operation::ReadAll => {
            results.extend(bins.iter().map(|b| OpResult { bin: b.name.clone(), value: Some(b.value.clone()) }));
        }
        Operation::Write(bin) => {
            check_bin_name(&bin.name)?;
            set_bin(bins, bin.clone());
        }
        Operation::Add { bin, delta } => {
            check_bin_name(bin)?;
            let current = match find(bins, bin) {
                None => 0,
                Some(Value::Int(value)) => *value,
                Some(other) => return Err(incompatible(bin, "add", other)),
            };
            let sum = current
                .checked_add(*delta)
                .ok_or_else(|| Error::IncompatibleBin { bin: bin.clone(), reason: format!("{current} + {delta} overflows i64") })?;
            set_bin(bins, Bin::new(bin.clone(), Value::Int(sum)));
        }
        Operation::Append { bin, value } | Operation::Prepend { bin, value } => {
            check_bin_name(bin)?;
            let at_end = matches!(op, Operation::Append { .. });
            let joined = match (find(bins, bin), value) {
                (None, value @ (Value::Bytes(_) | Value::String(_))) => value.clone(),
                (Some(Value::Bytes(old)), Value::Bytes(new)) => Value::Bytes(join(old, new, at_end)),
                (Some(Value::String(old)), Value::String(new)) => {
                    Value::String(if at_end { format!("{old}{new}") } else { format!("{new}{old}") })
                }
                (Some(other), _) => return Err(incompatible(bin, "append/prepend", other)),
                (None, other) => return Err(incompatible(bin, "append/prepend", other)),
            };
            check_bytes_len(bin, value_len(&joined), ctx)?;
            set_bin(bins, Bin::new(bin.clone(), joined));
        }
        Operation::WriteBytesAt { bin, offset, data, zero_fill } => {
            check_bin_name(bin)?;
            let mut bytes = take_bytes(bins, bin)?;
            let end = offset.checked_add(data.len() as u64).unwrap_or(u64::MAX);
            check_bytes_len(bin, end, ctx)?;
            let offset = *offset as usize;
            if offset > bytes.len() && !zero_fill {
                return Err(Error::BadRequest(format!(
                    "write at offset {offset} of bin {bin:?} lies past its end ({} bytes); set zero_fill to extend with zeros",
                    bytes.len()
                )));
            }
            if bytes.len() < end as usize {
                bytes.resize(end as usize, 0);
            }
            bytes[offset..end as usize].copy_from_slice(data);
            set_bin(bins, Bin::new(bin.clone(), Value::Bytes(bytes)));
        }
        Operation::TruncateBytes { bin, len } => {
            check_bin_name(bin)?;
            let mut bytes = take_bytes(bins, bin)?;
            check_bytes_len(bin, *len, ctx)?;
            bytes.resize(*len as usize, 0);
            set_bin(bins, Bin::new(bin.clone(), Value::Bytes(bytes)));
        }
        Operation::DeleteBin { bin } => bins.retain(|b| b.name != *bin),
        Operation::DeleteRecord => bins.clear(),
    }
    Ok(())
}

fn find<'a>(bins: &'a [Bin], name: &str) -> Option<&'a Value> {
    bins.iter().find(|b| b.name == name).map(|b| &b.value)
}

fn set_bin(bins: &mut Vec<Bin>, bin: Bin) {
    match bins.iter_mut().find(|b| b.name == bin.name) {
        Some(slot) => slot.value = bin.value,
        None => bins.push(bin),
    }
}

/// Removes a bytes bin's value for in-place editing (a missing bin is empty bytes).
fn take_bytes(bins: &mut [Bin], name: &str) -> Result<Vec<u8>> {
    match bins.iter_mut().find(|b| b.name == name) {
        None => Ok(Vec::new()),
        Some(Bin { value: Value::Bytes(bytes), .. }) => Ok(std::mem::take(bytes)),
        Some(other) => Err(incompatible(name, "byte-range write", &other.value)),
    }
}

fn join(old: &[u8], new: &[u8], at_end: bool) -> Vec<u8> {
    let (first, second) = if at_end { (old, new) } else { (new, old) };
    [first, second].concat()
}

fn value_len(value: &Value) -> u64 {
    match value {
        Value::Bytes(b) => b.len() as u64,
        Value::String(s) => s.len() as u64,
        _ => 8,
    }
}

/// Refuses to build a bin that could never fit in a record, before allocating it.
fn check_bytes_len(bin: &str, len: u64, ctx: &PlanContext) -> Result<()> {
    if len > ctx.bin_bytes_max as u64 {
        tracing::debug!(bin, len, "bin would exceed the record size limit");
        return Err(Error::RecordTooBig { size_bytes: len.min(usize::MAX as u64) as usize, limit_bytes: ctx.bin_bytes_max });
    }
    Ok(())
}

fn incompatible(bin: &str, op: &str, found: &Value) -> Error {
    Error::IncompatibleBin { bin: bin.to_owned(), reason: format!("{op} does not apply to a {} bin", found.type_name()) }
}

pub(crate) fn check_bin_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > Bin::NAME_MAX_BYTES {
        return Err(Error::BadRequest(format!("bin name {name:?} must be 1..={} bytes", Bin::NAME_MAX_BYTES)));
    }
    Ok(())
}
