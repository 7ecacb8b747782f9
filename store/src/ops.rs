//! Write policies and operations, and the pure function that applies them to a record.
//!
//! `plan` has no I/O: given the record as it is (or nothing) it decides what the engine writes.
//! Every failed condition is a distinct error and nothing is ever cut short silently.

use crate::error::{Error, Result};
use crate::value::{Bin, Record, Value};

pub use chunkstore_client::ops::*;

/// What the engine does for a write; `None` for operations that are not record writes by
/// themselves (sessions, locks, batches: the group's state machine turns them into record
/// writes).
pub(crate) fn mutation_of(op: &WriteOp) -> Option<Mutation<'_>> {
    Some(match op {
        WriteOp::Put(bins) => Mutation::Put(bins),
        WriteOp::Delete => Mutation::Delete,
        WriteOp::Touch => Mutation::Touch,
        WriteOp::Operate(ops) => Mutation::Operate(ops),
        WriteOp::InSession { op, .. } => return mutation_of(op),
        _ => return None,
    })
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
    Write {
        bins: Vec<Bin>,
        generation: u32,
        void_time_secs: u32,
    },
    Delete {
        generation: u32,
    },
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
pub(crate) fn plan(existing: Option<Record>, policy: &WritePolicy, mutation: &Mutation<'_>, ctx: &PlanContext) -> Result<(Plan, Vec<OpResult>)> {
    let current_generation = existing.as_ref().map_or(0, |r| r.meta.generation);
    if let GenerationPolicy::ExpectEqual(expected) = policy.generation {
        if expected != current_generation {
            return Err(Error::GenerationMismatch { expected, actual: current_generation });
        }
    }
    let needs_record =
        matches!(policy.exists, RecordExistsAction::UpdateOnly | RecordExistsAction::ReplaceOnly) || matches!(mutation, Mutation::Delete | Mutation::Touch);
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
            let sum =
                current.checked_add(*delta).ok_or_else(|| Error::IncompatibleBin { bin: bin.clone(), reason: format!("{current} + {delta} overflows i64") })?;
            set_bin(bins, Bin::new(bin.clone(), Value::Int(sum)));
        }
        Operation::Append { bin, value } | Operation::Prepend { bin, value } => {
            check_bin_name(bin)?;
            let at_end = matches!(op, Operation::Append { .. });
            let joined = match (find(bins, bin), value) {
                (None, value @ (Value::Bytes(_) | Value::String(_))) => value.clone(),
                (Some(Value::Bytes(old)), Value::Bytes(new)) => Value::Bytes(join(old, new, at_end)),
                (Some(Value::String(old)), Value::String(new)) => Value::String(if at_end { format!("{old}{new}") } else { format!("{new}{old}") }),
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
