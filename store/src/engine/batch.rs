//! Several records of one group written as one replicated entry, all or nothing.
//!
//! Every write's conditions are checked against the records as they stand before any is
//! applied; only then are they applied, in order, each with the entry's log index as its
//! version's seq. A crash between two of them is repaired by replaying the entry: the records
//! that already hold a version from this index are skipped, and the others, untouched since the
//! check (the group applies its entries one at a time and a batch names each record once),
//! pass the same check again.

use std::collections::HashSet;

use super::{Inner, Replicated};
use crate::error::{Error, Result};
use crate::format::encoded_record_len;
use crate::key::Key;
use crate::ops::{plan, BatchWrite, Mutation, Plan, PlanContext, WriteOp, BATCH_WRITES_MAX};
use crate::value::RecordMeta;

impl Inner {
    /// Applies a batch decided through Raft. `Ok(None)`: every record already reflects this
    /// entry (a replay). Otherwise the meta of the last record written.
    pub(crate) fn write_batch(&self, writes: &[BatchWrite], replicated: Replicated) -> Result<Option<RecordMeta>> {
        check_shape(writes)?;
        let ctx = PlanContext { now_ms: replicated.now_ms, default_ttl_secs: self.config.default_ttl_secs, bin_bytes_max: self.config.record_size_limit() };
        for write in writes {
            let mutation = mutation_of(&write.op)?;
            let _record_lock = self.record_lock(&write.key.digest);
            let current = self.state.lock().unwrap().index.get(&write.key.digest).map(|e| e.seq);
            if current.is_some_and(|seq| seq >= replicated.log_index) {
                continue;
            }
            let existing = self.read_record(&write.key.digest, (replicated.now_ms / 1000) as u32)?;
            if let (Plan::Write { bins, .. }, _) = plan(existing, &write.policy, &mutation, &ctx)? {
                let size = encoded_record_len(&write.key.set, &bins);
                if size > self.config.record_size_limit() {
                    return Err(Error::RecordTooBig { size_bytes: size, limit_bytes: self.config.record_size_limit() });
                }
            }
        }
        let mut last = None;
        for write in writes {
            let mutation = mutation_of(&write.op)?;
            if let Some((meta, _)) = self.write_version(&write.key, &write.policy, mutation, Some(replicated))? {
                last = Some(meta);
            }
        }
        Ok(last)
    }
}

/// What a batch may hold: 1 to `BATCH_WRITES_MAX` writes, each record once, valid set names.
/// The same answer on every replica (a deterministic refusal).
pub(crate) fn check_shape(writes: &[BatchWrite]) -> Result<()> {
    if writes.is_empty() || writes.len() > BATCH_WRITES_MAX {
        return Err(Error::BadRequest(format!("a batch holds 1 to {BATCH_WRITES_MAX} writes, not {}", writes.len())));
    }
    let mut digests = HashSet::with_capacity(writes.len());
    for write in writes {
        if !digests.insert(write.key.digest) {
            return Err(Error::BadRequest("a batch writes each record once".into()));
        }
        if write.key.set.len() > Key::SET_NAME_MAX_BYTES {
            return Err(Error::BadRequest(format!("set name is {} bytes, the limit is {}", write.key.set.len(), Key::SET_NAME_MAX_BYTES)));
        }
        if write.op.has_reads() {
            return Err(Error::BadRequest("a batch's writes cannot read".into()));
        }
    }
    Ok(())
}

/// A batch holds plain record writes only: no locks, sessions or nested batches (a session
/// wraps the whole batch).
fn mutation_of(op: &WriteOp) -> Result<Mutation<'_>> {
    match op {
        WriteOp::Put(_) | WriteOp::Delete | WriteOp::Touch | WriteOp::Operate(_) => {
            crate::ops::mutation_of(op).ok_or_else(|| Error::BadRequest(format!("{op:?} cannot be part of a batch")))
        }
        other => Err(Error::BadRequest(format!("{other:?} cannot be part of a batch"))),
    }
}
