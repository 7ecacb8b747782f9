//! Group commit, segment rollover and segment deletion.

use std::sync::{Arc, MutexGuard};

use super::format::{encode_segment_header, SECTOR_BYTES};
use super::{segment_name, Durable, GroupId, Segment, WalError, WalInner, WalOp, WalResult, WalState};
use crate::device::DeviceDir;

impl WalInner {
    pub(crate) fn run_flusher(self: Arc<Self>) {
        let mut st = self.state.lock().unwrap();
        loop {
            if st.poisoned.is_none() && st.appended_lsn > st.taken_lsn && !st.flushing {
                st.flushing = true;
                st = self.flush_once(st);
                st.flushing = false;
                st = self.prepare_next_segment(st);
                continue;
            }
            if st.shutting_down {
                return;
            }
            st = self.flush_wakeup.wait(st).unwrap();
        }
    }

    /// Writes every segment's pending bytes (oldest segment first, each synced before the next
    /// is written), then completes the waiting appends and deletes segments nobody needs.
    pub(crate) fn flush_once<'a>(&'a self, mut st: MutexGuard<'a, WalState>) -> MutexGuard<'a, WalState> {
        let mut batch = Vec::new();
        for segment in st.segments.values_mut().filter(|s| !s.pending.is_empty()) {
            let padded = segment.pending.len().next_multiple_of(SECTOR_BYTES);
            segment.pending.resize(padded, 0);
            let bytes = Arc::new(std::mem::take(&mut segment.pending));
            segment.in_flight = Some((segment.handed, bytes.clone()));
            batch.push((segment.id, segment.path.clone(), segment.device.clone(), segment.handed, bytes));
            segment.handed += padded as u64;
        }
        let target = st.appended_lsn;
        st.taken_lsn = target;
        st.flushes_taken += 1;
        // Which segments nobody needs once this batch is durable, decided now (purge points
        // and Forgets taken now are durable once this batch is; one appended while the batch
        // is written is not).
        let deletable = deletable_segments(&st);
        drop(st);

        let mut result: WalResult<()> = Ok(());
        for (_, path, device, offset, bytes) in &batch {
            let written = device.write_at(bytes, *offset).and_then(|()| match self.config.unsafe_skip_fsync {
                true => Ok(()),
                false => match &self.config.test_sync_hook {
                    Some(hook) => hook().and_then(|()| device.sync()),
                    None => device.sync(),
                }
                .or_else(|err| match self.config.unsafe_ignore_sync_errors {
                    true => Ok(()),
                    false => Err(err),
                }),
            });
            if let Err(source) = written {
                result = Err(WalError::Io { path: path.clone(), source });
                break;
            }
        }

        let mut st = self.state.lock().unwrap();
        st.stats.flushes += 1;
        st.stats.bytes += batch.iter().map(|(.., bytes)| bytes.len() as u64).sum::<u64>();
        if !self.config.unsafe_skip_fsync {
            st.stats.fsyncs += batch.len() as u64;
        }
        for (id, ..) in &batch {
            if let Some(segment) = st.segments.get_mut(id) {
                segment.in_flight = None;
            }
        }
        let mut done: Vec<(Durable, WalResult<()>)> = Vec::new();
        let mut deleted: Vec<u64> = Vec::new();
        match &result {
            Ok(()) => {
                st.durable_lsn = target;
                while st.waiting.front().is_some_and(|(lsn, _)| *lsn <= target) {
                    done.push((st.waiting.pop_front().unwrap().1, Ok(())));
                }
                st.last_flush_answered = done.len();
                for id in deletable {
                    if st.segments.remove(&id).is_some() {
                        deleted.push(id);
                    }
                }
            }
            Err(err) => {
                tracing::error!(%err, "WAL poisoned: no more appends until restart");
                st.poisoned = Some(err.to_string());
                while let Some((_, callback)) = st.waiting.pop_front() {
                    done.push((callback, Err(err.clone())));
                }
            }
        }
        drop(st);
        for (callback, outcome) in done {
            callback(outcome);
        }
        if !deleted.is_empty() {
            for id in &deleted {
                if let Err(err) = self.dir.remove(&segment_name(*id)) {
                    tracing::warn!(dir = %self.dir.path().display(), segment = id, %err, "could not delete a WAL segment nobody needs");
                }
            }
            if !self.config.unsafe_skip_fsync {
                if let Err(err) = self.dir.sync() {
                    tracing::warn!(dir = %self.dir.path().display(), %err, "could not sync the WAL directory after deleting segments");
                }
            }
        }
        self.state.lock().unwrap()
    }

    /// Once the active segment is half full, creates the next one (header, zeros, syncs) on a
    /// thread of its own, for the rollover to take: writing a segment's length of zeros takes
    /// long enough that flushes must not wait for it.
    pub(crate) fn prepare_next_segment<'a>(self: &'a Arc<Self>, mut st: MutexGuard<'a, WalState>) -> MutexGuard<'a, WalState> {
        let active = st.segments.values().next_back().expect("an active segment");
        let half_full = active.handed + active.pending.len() as u64 >= self.config.segment_bytes / 2;
        if !half_full || st.spare.is_some() || st.preparing.is_some() || st.poisoned.is_some() || st.shutting_down {
            return st;
        }
        let id = active.id + 1;
        st.preparing = Some(id);
        let inner = self.clone();
        let spawned = std::thread::Builder::new().name("wal-prepare".into()).spawn(move || inner.prepare_segment(id));
        match spawned {
            Ok(handle) => {
                // The previous one has finished (`preparing` was clear).
                let _ = self.preparer.lock().unwrap().replace(handle);
            }
            Err(err) => {
                tracing::warn!(%err, "could not start the thread that prepares WAL segments (the rollover will create them)");
                st.preparing = None;
            }
        }
        st
    }

    fn prepare_segment(&self, id: u64) {
        let made = create_segment(&*self.dir, id, self.config.segment_bytes, self.config.zero_fill, self.config.unsafe_skip_fsync);
        let mut st = self.state.lock().unwrap();
        st.preparing = None;
        match made {
            Ok(segment) if !st.shutting_down && st.segments.keys().next_back() == Some(&(id - 1)) => st.spare = Some(segment),
            // A rollover could not wait and made its own (with a later id), or the log is
            // closing: this one, empty, is not needed.
            Ok(segment) => self.remove_unused_segment(&segment),
            Err(err) => tracing::warn!(%err, "could not prepare the next WAL segment (the rollover will create it)"),
        }
    }

    /// Starts a new segment (the spare the flusher prepared, if it is ready): then a checkpoint
    /// of every group.
    pub(crate) fn roll_over(&self, st: &mut WalState) -> WalResult<()> {
        let next = st.segments.keys().next_back().map_or(1, |last| last + 1);
        let segment = match st.spare.take() {
            Some(spare) if spare.id == next => spare,
            stale => {
                if let Some(stale) = stale {
                    self.remove_unused_segment(&stale);
                }
                // The id being prepared (if any) is left to the flusher, which deletes its file.
                let id = match st.preparing {
                    Some(preparing) => next.max(preparing + 1),
                    None => next,
                };
                // On the appending thread: allocated only, not written with zeros (that would
                // stall every append for the length of a segment's write).
                create_segment(&*self.dir, id, self.config.segment_bytes, false, self.config.unsafe_skip_fsync)?
            }
        };
        let id = segment.id;
        st.segments.insert(id, segment);
        let mut groups: Vec<GroupId> = st.groups.keys().copied().collect();
        groups.sort_unstable();
        for group in groups {
            let log = st.groups[&group].clone();
            let mut checkpoint = Vec::new();
            if let Some(void) = log.void {
                checkpoint.push(WalOp::Void(void));
            }
            if let Some(vote) = log.vote {
                checkpoint.push(WalOp::Vote(vote));
            }
            if let Some(committed) = log.committed {
                checkpoint.push(WalOp::Committed(committed));
            }
            if let Some(applied) = log.applied {
                checkpoint.push(WalOp::Applied(applied));
            }
            if let Some((upto_index, upto_term)) = log.purged {
                checkpoint.push(WalOp::Purge { upto_index, upto_term });
            }
            let end = log.entries.keys().next_back().copied().or(log.purged.map(|(i, _)| i));
            checkpoint.push(WalOp::Truncate { from_index: end.map_or(0, |last| last + 1) });
            for op in &checkpoint {
                self.append_one(st, group, op);
            }
        }
        Ok(())
    }
}

/// Segments before the active one whose every entry is purged (or forgotten) as of now. A
/// segment holding a Forget goes only once every older one goes: an older segment left alone
/// would bring back the applied point and purge point it voided. (Segments before the active
/// one have a successor whose checkpoint is in the batch being taken or an earlier one.)
fn deletable_segments(st: &WalState) -> Vec<u64> {
    let active_id = *st.segments.keys().next_back().expect("an active segment");
    let purged: std::collections::HashMap<GroupId, u64> = st.groups.iter().filter_map(|(g, log)| log.purged.map(|(i, _)| (*g, i))).collect();
    let mut deletable: Vec<u64> = Vec::new();
    let mut every_older_goes = true;
    for segment in st.segments.values().filter(|s| s.id < active_id) {
        let unneeded = segment.max_index.iter().all(|(g, max)| purged.get(g).is_some_and(|p| p >= max));
        if unneeded && (every_older_goes || !segment.holds_forget) {
            deletable.push(segment.id);
        } else {
            every_older_goes = false;
        }
    }
    deletable
}

impl WalInner {
    /// Deletes a segment that never held a record (a failure is only logged: recovery reads
    /// such a segment as empty).
    pub(crate) fn remove_unused_segment(&self, segment: &Segment) {
        if let Err(err) = self.dir.remove(&segment_name(segment.id)) {
            tracing::warn!(path = %segment.path.display(), %err, "could not delete an unused WAL segment");
        }
    }
}

/// Creates segment `id` with its header, its blocks reserved to `bytes` (and with `zero_fill`,
/// written with zeros over that length), synced, and only then given its name (a rename, the
/// directory synced): a segment's name never stands for one whose header is not durable, so a
/// crash during creation leaves a `*.prepare` file that recovery removes, never a headerless
/// segment that reads as damage. `bytes` must not exceed `segment_bytes`: a segment is left
/// for a new one only once it holds that many, so its file then ends where its records end,
/// and only the newest segment can end in (preallocated) zeros, which recovery reads as a
/// clean end.
pub(crate) fn create_segment(dir: &dyn DeviceDir, id: u64, bytes: u64, zero_fill: bool, skip_fsync: bool) -> WalResult<Segment> {
    let name = segment_name(id);
    let preparing = format!("{name}{PREPARING_SUFFIX}");
    let path = dir.path().join(&name);
    let io = |source| WalError::Io { path: path.clone(), source };
    // The directory reserves the blocks where it can (files: fallocate), so that they read
    // back as zeros and each flush's fdatasync is a data write only: 1.4x the fdatasyncs per
    // second on this machine's disk.
    let device = dir.create(&preparing, bytes).map_err(io)?;
    let mut named = false;
    let written = (|| {
        if zero_fill {
            // Blocks written once (with zeros) make each flush's fdatasync cheaper still than
            // allocated ones: ext4 need not convert an unwritten extent, a metadata change its
            // journal must commit (1.6x the syncs per second on this machine's disk,
            // BENCHMARKS.md).
            let zeros = vec![0u8; 1 << 20];
            let mut at = 0;
            while at < bytes {
                let len = (bytes - at).min(zeros.len() as u64) as usize;
                device.write_at(&zeros[..len], at)?;
                at += len as u64;
            }
        }
        device.write_at(&encode_segment_header(id), 0)?;
        if !skip_fsync {
            device.sync()?;
        }
        dir.rename(&preparing, &name)?;
        named = true;
        if !skip_fsync {
            dir.sync()?;
        }
        Ok(())
    })();
    if let Err(err) = written {
        // Under whichever name it has by now, so that a later try can make segment `id` again.
        let made = if named { &name } else { &preparing };
        if let Err(cleanup) = dir.remove(made) {
            tracing::debug!(%made, %cleanup, "could not remove a WAL segment whose creation failed");
        }
        return Err(io(err));
    }
    let handed = super::format::SEGMENT_HEADER_BYTES as u64;
    Ok(Segment { id, path, device, handed, pending: Vec::new(), in_flight: None, max_index: Default::default(), holds_forget: false })
}

/// What a segment is named while it is being created.
pub(crate) const PREPARING_SUFFIX: &str = ".prepare";
