//! `--durability fsync`: writes held in memory (bounded) until fsync, fdatasync, close or an
//! O_SYNC/O_DSYNC write commits them, for applications that sync properly.
//!
//! Invariants:
//! - **Memory stays bounded**: past `dirty_bytes_max` held by the mount, a write commits its
//!   own file's held writes before it returns.
//! - **A commit never shows a size covering bytes not yet committed**: held writes go in
//!   batches in chunk order, each carrying the size up to the end of its last chunk (the
//!   last one the whole size).
//! - **A failed commit is reported, never swallowed**: the held writes are dropped (their fate
//!   in the cluster is unknown), the failure is counted before the file's lock is let go (an
//!   fsync waiting on that lock cannot answer success in between), and the front reports EIO
//!   to every descriptor open on the file.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use chunkstore_client::ops::{BatchWrite, GenerationPolicy, Operation, RecordExistsAction, WriteOp};

use crate::error::{FsError, FsResult};
use crate::records::{FileSize, BIN_DATA};
use crate::volume::*;

/// Most chunks one commit entry carries.
const CHUNKS_PER_BATCH_MAX: usize = 64;

/// Writes held for one file.
#[derive(Default)]
pub(crate) struct Dirty {
    /// By chunk, the pieces written since the last commit in the order written: (offset in the
    /// chunk, bytes). Applied in that order, they give the chunk's new bytes.
    pub chunks: BTreeMap<u64, Vec<(u64, Vec<u8>)>>,
    /// The file's size with them, and when the last was written (None: nothing held).
    pub size: Option<(u64, i64)>,
    pub bytes: usize,
}

impl Dirty {
    /// The held size and the held pieces over [offset, offset + len), as file offsets.
    pub fn overlay(&self, offset: u64, len: u64, chunk_bytes: u64) -> Option<(u64, Vec<(u64, Vec<u8>)>)> {
        let (size, _) = self.size?;
        let end = offset.saturating_add(len);
        let mut pieces = Vec::new();
        for (&index, chunk) in self.chunks.range(offset / chunk_bytes..=end / chunk_bytes) {
            for (within, bytes) in chunk {
                pieces.push((index * chunk_bytes + within, bytes.clone()));
            }
        }
        Some((size, pieces))
    }
}

impl Volume {
    /// Holds writes in memory until they are synced, up to `dirty_bytes_max` for the mount.
    pub fn set_buffered(&mut self, dirty_bytes_max: usize) {
        self.buffered = Some(dirty_bytes_max);
    }

    /// Forgets what is held for a file being freed.
    pub(crate) fn drop_held(&self, ino: u64) {
        if let Some(file) = lock(&self.files).get(&ino).cloned() {
            let dirty = std::mem::take(&mut lock(&file).dirty);
            self.dirty_bytes.fetch_sub(dirty.bytes, Ordering::SeqCst);
        }
    }

    pub(crate) fn dirty_size(&self, ino: u64) -> Option<(u64, i64)> {
        let file = lock(&self.files).get(&ino).cloned()?;
        let state = lock(&file);
        state.dirty.size
    }

    pub(crate) fn write_buffered(&self, ino: u64, offset: u64, data: &[u8]) -> FsResult<usize> {
        let end = offset + data.len() as u64;
        let file = self.file(ino);
        let mut state = lock(&file);
        let committed = self.committed_size(ino, &mut state)?;
        let mut at = offset;
        while at < end {
            let within = at % self.chunk_bytes;
            let piece = (self.chunk_bytes - within).min(end - at);
            let from = (at - offset) as usize;
            state.dirty.chunks.entry(at / self.chunk_bytes).or_default().push((within, data[from..from + piece as usize].to_vec()));
            at += piece;
        }
        let held = state.dirty.size.map_or(committed, |(size, _)| size);
        state.dirty.size = Some((held.max(end), now_ns()));
        state.dirty.bytes += data.len();
        let total = self.dirty_bytes.fetch_add(data.len(), Ordering::SeqCst) + data.len();
        if total > self.buffered.unwrap_or(0) {
            self.commit_held(ino, &mut state)?;
        }
        Ok(data.len())
    }

    /// Commits what this mount holds of `ino` (fsync, fdatasync, close); EIO-worthy errors
    /// mean the held writes' fate is unknown.
    pub fn flush(&self, ino: u64) -> FsResult<()> {
        let Some(file) = lock(&self.files).get(&ino).cloned() else { return Ok(()) };
        let mut state = lock(&file);
        self.commit_held(ino, &mut state)
    }

    /// Commits every file's held writes (unmount); the first error, after trying them all.
    pub fn flush_all(&self) -> FsResult<()> {
        let inodes: Vec<u64> = lock(&self.files).keys().copied().collect();
        let mut first_error = None;
        for ino in inodes {
            if let Err(err) = self.flush(ino) {
                tracing::error!(ino, error = %err, "committing held writes failed");
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn commit_held(&self, ino: u64, state: &mut FileState) -> FsResult<()> {
        let dirty = std::mem::take(&mut state.dirty);
        self.dirty_bytes.fetch_sub(dirty.bytes, Ordering::SeqCst);
        let Some((final_size, written_ns)) = dirty.size else { return Ok(()) };
        let chunks: Vec<(u64, Vec<(u64, Vec<u8>)>)> = dirty.chunks.into_iter().collect();
        let result = (|| {
            let mut size = match state.size.take() {
                Some(size) => size,
                None => self.read_size(ino)?,
            };
            if final_size > size.size {
                self.finish_shrink(ino, &mut size)?;
            }
            let batches: Vec<&[(u64, Vec<(u64, Vec<u8>)>)]> = chunks.chunks(CHUNKS_PER_BATCH_MAX).collect();
            for (i, batch) in batches.iter().enumerate() {
                let last = i + 1 == batches.len();
                let covered = match (last, batch.last()) {
                    (false, Some((index, _))) => ((index + 1) * self.chunk_bytes).min(final_size),
                    _ => final_size,
                };
                self.commit_batch(ino, &mut size, batch, covered, written_ns)?;
            }
            state.size = Some(size);
            Ok(())
        })();
        if result.is_err() {
            state.size = None;
            state.failed_writes += 1;
        }
        result
    }

    /// One entry: the held pieces of some chunks and the size up to `covered`; retried after a
    /// conflict with another mount's change of the size record.
    fn commit_batch(&self, ino: u64, size: &mut FileSize, chunks: &[(u64, Vec<(u64, Vec<u8>)>)], covered: u64, written_ns: i64) -> FsResult<()> {
        for _ in 0..CONFLICT_RETRIES_MAX {
            let mut writes: Vec<BatchWrite> = chunks
                .iter()
                .map(|(index, pieces)| BatchWrite {
                    key: self.keys.chunk(ino, *index),
                    op: WriteOp::Operate(
                        pieces
                            .iter()
                            .map(|(within, bytes)| Operation::WriteBytesAt { bin: BIN_DATA.into(), offset: *within, data: bytes.clone(), zero_fill: true })
                            .collect(),
                    ),
                    policy: never_expire(RecordExistsAction::CreateOrUpdate, GenerationPolicy::None),
                })
                .collect();
            let mut next = FileSize { size: covered.max(size.size), mtime_ns: written_ns, ctime_ns: written_ns, ..size.clone() };
            for (index, _) in chunks {
                next.add_extent(*index, index + 1);
            }
            writes.push(self.size_record_write(ino, &next));
            match self.batch(Some(ino), writes) {
                Ok(meta) => {
                    next.generation = meta.generation;
                    *size = next;
                    return Ok(());
                }
                Err(FsError::Conflict) => *size = self.read_size(ino)?,
                Err(err) => return Err(err),
            }
        }
        Err(FsError::Io(format!("gave up after {CONFLICT_RETRIES_MAX} conflicting commits to inode {ino}")))
    }
}
