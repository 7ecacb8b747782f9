//! A file's data: its size record and its chunks, all in the file's own group.
//!
//! Invariants:
//! - **A write is one entry holding its bytes and the file's new size and mtime**: after any
//!   crash a reader sees both or neither. Within the entry the chunks come before the size
//!   record, so a reader of the two never sees a size covering bytes not yet applied.
//! - **No chunk holds bytes past the file's size**, except chunks a shrink has yet to delete
//!   above the size's last chunk (still listed in its extents); anything that grows the file deletes
//!   them first, so a hole never shows old bytes.
//! - **Writes to one file from one mount are ordered**: they hold the file's state in turn.

use chunkstore_client::ops::{BatchWrite, GenerationPolicy, Operation, RecordExistsAction, WriteOp};

use crate::error::{FsError, FsResult};
use crate::records::*;
use crate::volume::*;

/// Most ranged reads one read of many chunks has in flight at once.
const READ_LANES_MAX: usize = 8;

/// Most chunk deletions one entry carries when a file shrinks or is reclaimed.
const DELETES_PER_BATCH_MAX: u64 = 512;

impl Volume {
    fn chunks_for(&self, size: u64) -> u64 {
        size.div_ceil(self.chunk_bytes)
    }

    fn delete_chunk(&self, ino: u64, index: u64) -> BatchWrite {
        BatchWrite {
            key: self.keys.chunk(ino, index),
            op: WriteOp::Operate(vec![Operation::DeleteRecord]),
            policy: never_expire(RecordExistsAction::CreateOrUpdate, GenerationPolicy::None),
        }
    }

    /// Runs a change of one file's data with its state held, reading its size record again
    /// after a conflict with another mount.
    fn with_file<T>(&self, ino: u64, mut change: impl FnMut(&mut FileSize) -> FsResult<T>) -> FsResult<T> {
        let file = self.file(ino);
        let mut state = lock(&file);
        for _ in 0..CONFLICT_RETRIES_MAX {
            let mut size = match state.size {
                Some(ref size) => size.clone(),
                None => self.read_size(ino)?,
            };
            match change(&mut size) {
                Ok(out) => {
                    state.size = Some(size);
                    return Ok(out);
                }
                Err(FsError::Conflict) => state.size = None,
                Err(err) => {
                    state.size = None;
                    return Err(err);
                }
            }
        }
        Err(FsError::Io(format!("gave up after {CONFLICT_RETRIES_MAX} conflicting writes to inode {ino}")))
    }

    /// Deletes what a cut-short shrink left above the size (before the file grows), at most
    /// `DELETES_PER_BATCH_MAX` chunks an entry, the highest first.
    pub(crate) fn finish_shrink(&self, ino: u64, size: &mut FileSize) -> FsResult<()> {
        let first = self.chunks_for(size.size);
        loop {
            let doomed: Vec<u64> = size.chunks_from(first).take(DELETES_PER_BATCH_MAX as usize).collect();
            let Some(&lowest) = doomed.last() else { return Ok(()) };
            let mut writes: Vec<BatchWrite> = doomed.iter().map(|&i| self.delete_chunk(ino, i)).collect();
            let mut next = size.clone();
            next.cut_extents(lowest);
            writes.push(self.size_record_write(ino, &next));
            next.generation = self.batch(Some(ino), writes)?.generation;
            *size = next;
        }
    }

    pub(crate) fn size_record_write(&self, ino: u64, size: &FileSize) -> BatchWrite {
        BatchWrite {
            key: self.keys.size(ino),
            op: WriteOp::Put(size.bins()),
            policy: never_expire(RecordExistsAction::CreateOrUpdate, GenerationPolicy::ExpectEqual(size.generation)),
        }
    }

    /// Writes `data` at `offset`: one entry with the chunks it touches and the new size and
    /// mtime. Returns once the entry is committed on a quorum (the cluster's commit-to-device).
    pub fn write(&self, ino: u64, offset: u64, data: &[u8]) -> FsResult<usize> {
        self.write_as(None, ino, offset, data)
    }

    /// `write` through a descriptor opened under session `opened` (`Volume::open_session`): if
    /// the mount took locks under it, the write goes in it, and fails once it was fenced.
    pub fn write_as(&self, opened: Option<u64>, ino: u64, offset: u64, data: &[u8]) -> FsResult<usize> {
        self.write_at(opened, ino, Some(offset), data).map(|(_, written)| written)
    }

    /// Appends `data` at the end of the file as the cluster holds it (O_APPEND): the size the
    /// entry is checked against is the one it extends, so two processes appending at once
    /// never write over each other. Returns where the data went and how much was written.
    pub fn append_as(&self, opened: Option<u64>, ino: u64, data: &[u8]) -> FsResult<(u64, usize)> {
        if self.buffered.is_some() {
            let offset = self.getattr(ino)?.size;
            return self.write_at(opened, ino, Some(offset), data);
        }
        self.write_at(opened, ino, None, data)
    }

    /// `write_as` at `offset`, or at the end of the file (None).
    fn write_at(&self, opened: Option<u64>, ino: u64, at_offset: Option<u64>, data: &[u8]) -> FsResult<(u64, usize)> {
        if let Some(offset) = at_offset {
            let end = offset.checked_add(data.len() as u64).ok_or(FsError::FileTooBig(FILE_BYTES_MAX))?;
            if end > FILE_BYTES_MAX {
                return Err(FsError::FileTooBig(FILE_BYTES_MAX));
            }
            if data.is_empty() {
                return Ok((offset, 0));
            }
            if self.buffered.is_some() {
                return self.write_buffered(ino, offset, data).map(|n| (offset, n));
            }
        }
        self.with_file(ino, |size| {
            let offset = at_offset.unwrap_or(size.size);
            let end = offset.checked_add(data.len() as u64).ok_or(FsError::FileTooBig(FILE_BYTES_MAX))?;
            if end > FILE_BYTES_MAX {
                return Err(FsError::FileTooBig(FILE_BYTES_MAX));
            }
            if data.is_empty() {
                return Ok((offset, 0));
            }
            if end > size.size {
                self.finish_shrink(ino, size)?;
            }
            let mut writes = Vec::new();
            let mut at = offset;
            while at < end {
                let index = at / self.chunk_bytes;
                let within = at % self.chunk_bytes;
                let piece = (self.chunk_bytes - within).min(end - at);
                let from = (at - offset) as usize;
                writes.push(BatchWrite {
                    key: self.keys.chunk(ino, index),
                    op: WriteOp::Operate(vec![Operation::WriteBytesAt {
                        bin: BIN_DATA.into(),
                        offset: within,
                        data: data[from..from + piece as usize].to_vec(),
                        zero_fill: true,
                    }]),
                    policy: never_expire(RecordExistsAction::CreateOrUpdate, GenerationPolicy::None),
                });
                at += piece;
            }
            let now = now_ns();
            let mut next = FileSize { size: size.size.max(end), mtime_ns: now, ctime_ns: now, ..size.clone() };
            next.add_extent(offset / self.chunk_bytes, self.chunks_for(end));
            writes.push(self.size_record_write(ino, &next));
            next.generation = self.batch_as(opened, Some(ino), writes)?.generation;
            *size = next;
            Ok((offset, data.len()))
        })
    }

    /// Reads up to `len` bytes at `offset` (fewer at the end of the file; holes read as zeros),
    /// with this mount's writes not committed yet (`--durability fsync`) over them. A read that
    /// reaches past the size this mount last saw asks the cluster for the size again, so a
    /// reader following a file another mount or process appends to (tail -f) sees it grow.
    pub fn read(&self, ino: u64, offset: u64, len: u32) -> FsResult<Vec<u8>> {
        let (committed, overlay) = {
            let file = self.file(ino);
            let mut state = lock(&file);
            let mut committed = self.committed_size(ino, &mut state)?;
            if offset.saturating_add(len as u64) > committed {
                let size = self.read_size(ino)?;
                committed = size.size;
                state.size = Some(size);
            }
            (committed, state.dirty.overlay(offset, len as u64, self.chunk_bytes))
        };
        let mut out = self.read_committed(ino, offset, len, committed)?;
        if let Some((dirty_size, pieces)) = overlay {
            let end = dirty_size.min(offset.saturating_add(len as u64));
            out.resize(end.saturating_sub(offset) as usize, 0);
            for (at, bytes) in pieces {
                let from = at.max(offset);
                let to = (at + bytes.len() as u64).min(end);
                if from < to {
                    out[(from - offset) as usize..(to - offset) as usize].copy_from_slice(&bytes[(from - at) as usize..(to - at) as usize]);
                }
            }
        }
        Ok(out)
    }

    /// The file's committed size, from this mount's cache (read and cached if it has none).
    pub(crate) fn committed_size(&self, ino: u64, state: &mut FileState) -> FsResult<u64> {
        if let Some(size) = &state.size {
            return Ok(size.size);
        }
        let size = self.read_size(ino)?;
        let bytes = size.size;
        state.size = Some(size);
        Ok(bytes)
    }

    /// What the cluster holds of the range, the file's size being `size`.
    fn read_committed(&self, ino: u64, offset: u64, len: u32, size: u64) -> FsResult<Vec<u8>> {
        if offset >= size {
            return Ok(Vec::new());
        }
        let end = size.min(offset.saturating_add(len as u64));
        // The chunks the range covers: (index, offset within, length).
        let mut pieces = Vec::new();
        let mut at = offset;
        while at < end {
            let within = at % self.chunk_bytes;
            let piece = (self.chunk_bytes - within).min(end - at);
            pieces.push((at / self.chunk_bytes, within, piece));
            at += piece;
        }
        let mut out = vec![0u8; (end - offset) as usize];
        // Large reads ask for their chunks in parallel (a round trip each).
        let lanes = pieces.len().clamp(1, READ_LANES_MAX);
        let per_lane = pieces.len().div_ceil(lanes);
        let mut slices: Vec<&mut [u8]> = Vec::with_capacity(pieces.len());
        let mut rest = out.as_mut_slice();
        for &(_, _, piece) in &pieces {
            let (head, tail) = rest.split_at_mut(piece as usize);
            slices.push(head);
            rest = tail;
        }
        let results: Vec<FsResult<()>> = std::thread::scope(|scope| {
            let mut handles = Vec::new();
            let mut slices = slices.into_iter();
            for lane in pieces.chunks(per_lane) {
                let lane_slices: Vec<&mut [u8]> = slices.by_ref().take(lane.len()).collect();
                let read_lane = move || -> FsResult<()> {
                    for (&(index, within, piece), slice) in lane.iter().zip(lane_slices) {
                        if let Some((_, bytes)) = self.client.get_range(&self.namespace, &self.keys.chunk(ino, index), BIN_DATA, within, piece as u32)? {
                            let got = bytes.len().min(slice.len());
                            slice[..got].copy_from_slice(&bytes[..got]);
                        }
                    }
                    Ok(())
                };
                if handles.is_empty() && pieces.len() <= per_lane {
                    return vec![read_lane()];
                }
                handles.push(scope.spawn(read_lane));
            }
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(FsError::Io("a read thread panicked".into())))).collect()
        });
        for result in results {
            result?;
        }
        Ok(out)
    }

    /// Sets a file's size: chunks past it are deleted (in one entry with the new size when
    /// there are few, else the size first and the chunks after, from the top).
    pub fn truncate(&self, ino: u64, new_size: u64) -> FsResult<()> {
        if new_size > FILE_BYTES_MAX {
            return Err(FsError::FileTooBig(FILE_BYTES_MAX));
        }
        let (inode, _) = self.read_inode(ino)?;
        match inode.kind {
            Kind::File => {}
            Kind::Dir => return Err(FsError::IsDir),
            _ => return Err(FsError::Invalid("truncate of a special file".into())),
        }
        self.flush(ino)?;
        self.invalidate(ino);
        self.with_file(ino, |size| {
            let now = now_ns();
            if new_size >= size.size {
                self.finish_shrink(ino, size)?;
                let mut next = FileSize { size: new_size, mtime_ns: now, ctime_ns: now, ..size.clone() };
                next.generation = self.batch(Some(ino), vec![self.size_record_write(ino, &next)])?.generation;
                *size = next;
                return Ok(());
            }
            let keep = self.chunks_for(new_size);
            let mut writes = Vec::new();
            let within = new_size % self.chunk_bytes;
            if within != 0 && size.chunks_from(keep - 1).any(|i| i == keep - 1) {
                writes.push(BatchWrite {
                    key: self.keys.chunk(ino, keep - 1),
                    op: WriteOp::Operate(vec![Operation::TruncateBytes { bin: BIN_DATA.into(), len: within }]),
                    policy: never_expire(RecordExistsAction::CreateOrUpdate, GenerationPolicy::None),
                });
            }
            let mut next = FileSize { size: new_size, mtime_ns: now, ctime_ns: now, ..size.clone() };
            let doomed: Vec<u64> = size.chunks_from(keep).take(DELETES_PER_BATCH_MAX as usize + 1).collect();
            if doomed.len() <= DELETES_PER_BATCH_MAX as usize {
                writes.extend(doomed.iter().map(|&i| self.delete_chunk(ino, i)));
                next.cut_extents(keep);
            }
            writes.push(self.size_record_write(ino, &next));
            next.generation = self.batch(Some(ino), writes)?.generation;
            *size = next;
            self.finish_shrink(ino, size)
        })
    }

    /// Sets a regular file's mtime (it lives in the size record).
    pub(crate) fn set_file_mtime(&self, ino: u64, mtime_ns: i64) -> FsResult<()> {
        self.with_file(ino, |size| {
            let mut next = FileSize { mtime_ns, ctime_ns: now_ns(), ..size.clone() };
            next.generation = self.batch(Some(ino), vec![self.size_record_write(ino, &next)])?.generation;
            *size = next;
            Ok(())
        })
    }

    /// Deletes a file's chunks and size record (an orphan being reclaimed).
    pub(crate) fn free_data(&self, ino: u64) -> FsResult<()> {
        self.with_file(ino, |size| {
            if size.generation == 0 {
                return Ok(());
            }
            size.size = 0;
            self.finish_shrink(ino, size)?;
            self.batch(
                Some(ino),
                vec![BatchWrite {
                    key: self.keys.size(ino),
                    op: WriteOp::Delete,
                    policy: never_expire(RecordExistsAction::CreateOrUpdate, GenerationPolicy::ExpectEqual(size.generation)),
                }],
            )?;
            *size = FileSize::default();
            Ok(())
        })
    }
}
