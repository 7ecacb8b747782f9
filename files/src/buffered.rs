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

/// Most held bytes one commit entry carries (well inside a frame, `FRAME_BYTES_MAX_DEFAULT`;
/// a chunk holds at most `CHUNK_BYTES_MAX`, so an entry always takes at least one).
const BATCH_BYTES_MAX: usize = 4 << 20;

/// A chunk's held bytes: (offset in the chunk, bytes), in offset order, disjoint.
pub(crate) type HeldPieces = Vec<(u64, Vec<u8>)>;

/// A chunk's index and its held bytes.
type HeldChunk = (u64, HeldPieces);

/// Writes held for one file.
#[derive(Default)]
pub(crate) struct Dirty {
    /// By chunk, the bytes written since the last commit: (offset in the chunk, bytes), in
    /// offset order, disjoint and not touching (`hold`), so a chunk written over and over
    /// holds each byte once.
    pub chunks: BTreeMap<u64, HeldPieces>,
    /// The file's size with them, and when the last was written (None: nothing held).
    pub size: Option<(u64, i64)>,
    pub bytes: usize,
}

impl Dirty {
    /// The held size and the held pieces over [offset, offset + len), as file offsets.
    pub fn overlay(&self, offset: u64, len: u64, chunk_bytes: u64) -> Option<(u64, HeldPieces)> {
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
        let mut added = 0;
        while at < end {
            let within = at % self.chunk_bytes;
            let piece = (self.chunk_bytes - within).min(end - at);
            let from = (at - offset) as usize;
            added += hold(state.dirty.chunks.entry(at / self.chunk_bytes).or_default(), within, &data[from..from + piece as usize]);
            at += piece;
        }
        let held = state.dirty.size.map_or(committed, |(size, _)| size);
        state.dirty.size = Some((held.max(end), now_ns()));
        state.dirty.bytes += added;
        let total = self.dirty_bytes.fetch_add(added, Ordering::SeqCst) + added;
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
        let chunks: Vec<HeldChunk> = dirty.chunks.into_iter().collect();
        let result = (|| {
            let mut size = match state.size.take() {
                Some(size) => size,
                None => self.read_size(ino)?,
            };
            if final_size > size.size {
                self.finish_shrink(ino, &mut size)?;
            }
            let batches = batches(&chunks);
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
    fn commit_batch(&self, ino: u64, size: &mut FileSize, chunks: &[HeldChunk], covered: u64, written_ns: i64) -> FsResult<()> {
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

/// Holds `bytes` at `within` among a chunk's held pieces (in offset order, disjoint, not
/// touching): they replace the older bytes they cover, and join the pieces they overlap or
/// touch. Returns how many more bytes the chunk holds.
fn hold(pieces: &mut HeldPieces, within: u64, bytes: &[u8]) -> usize {
    let end = within + bytes.len() as u64;
    // The pieces that overlap or touch [within, end].
    let first = pieces.partition_point(|(at, held)| at + (held.len() as u64) < within);
    let last = pieces.partition_point(|(at, _)| *at <= end);
    if first == last {
        pieces.insert(first, (within, bytes.to_vec()));
        return bytes.len();
    }
    let joined: Vec<(u64, Vec<u8>)> = pieces.drain(first..last).collect();
    let before: usize = joined.iter().map(|(_, held)| held.len()).sum();
    let mut joined = joined.into_iter();
    let (mut start, mut merged) = joined.next().expect("first < last");
    if within < start {
        let mut grown = vec![0; (start - within) as usize];
        grown.extend_from_slice(&merged);
        (start, merged) = (within, grown);
    }
    // Gaps between the old pieces lie inside [within, end]: the new bytes fill them.
    for (at, held) in joined.chain(std::iter::once((within, bytes.to_vec()))) {
        let from = (at - start) as usize;
        if merged.len() < from + held.len() {
            merged.resize(from + held.len(), 0);
        }
        merged[from..from + held.len()].copy_from_slice(&held);
    }
    let after = merged.len();
    pieces.insert(first, (start, merged));
    after - before
}

/// Held chunks cut into commit entries in chunk order: at most `CHUNKS_PER_BATCH_MAX` chunks
/// and, past its first chunk, `BATCH_BYTES_MAX` held bytes an entry.
fn batches(chunks: &[HeldChunk]) -> Vec<&[HeldChunk]> {
    let mut out = Vec::new();
    let (mut from, mut bytes) = (0, 0);
    for (i, (_, pieces)) in chunks.iter().enumerate() {
        let held: usize = pieces.iter().map(|(_, piece)| piece.len()).sum();
        if i > from && (i - from == CHUNKS_PER_BATCH_MAX || bytes + held > BATCH_BYTES_MAX) {
            out.push(&chunks[from..i]);
            (from, bytes) = (i, 0);
        }
        bytes += held;
    }
    if from < chunks.len() {
        out.push(&chunks[from..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes a chunk's held pieces give, over `len` bytes of zeros.
    fn image(pieces: &[(u64, Vec<u8>)], len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        for (at, bytes) in pieces {
            out[*at as usize..*at as usize + bytes.len()].copy_from_slice(bytes);
        }
        out
    }

    /// Random writes into one chunk held with `hold` give the same bytes as the writes applied
    /// in order, and the pieces stay sorted, disjoint and not touching, holding each byte once.
    #[test]
    fn held_pieces_give_the_bytes_written_last_and_hold_each_byte_once() {
        let len = 4096usize;
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = |below: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below
        };
        for _ in 0..200 {
            let (mut pieces, mut expected, mut written) = (Vec::new(), vec![0u8; len], vec![false; len]);
            let mut held = 0;
            for step in 0..40u8 {
                let at = next(len as u64) as usize;
                let n = 1 + next((len - at) as u64) as usize;
                let bytes = vec![step + 1; n];
                held += hold(&mut pieces, at as u64, &bytes);
                expected[at..at + n].copy_from_slice(&bytes);
                written[at..at + n].iter_mut().for_each(|w| *w = true);
                assert_eq!(image(&pieces, len), expected);
                assert_eq!(held, written.iter().filter(|w| **w).count(), "held bytes counted twice");
                assert_eq!(held, pieces.iter().map(|(_, b)| b.len()).sum::<usize>());
                for pair in pieces.windows(2) {
                    assert!(
                        pair[0].0 + (pair[0].1.len() as u64) < pair[1].0,
                        "pieces overlap or touch: {:?}",
                        pieces.iter().map(|(a, b)| (*a, b.len())).collect::<Vec<_>>()
                    );
                }
            }
        }
    }

    /// A journal's appends into one chunk end as one piece.
    #[test]
    fn appends_into_a_chunk_join_into_one_piece() {
        let mut pieces = Vec::new();
        for i in 0..4u64 {
            assert_eq!(hold(&mut pieces, i * 512, &[i as u8; 512]), 512);
        }
        assert_eq!(pieces.len(), 1);
        assert_eq!(pieces[0].1.len(), 2048);
        assert_eq!(hold(&mut pieces, 0, &[9; 512]), 0, "an overwrite holds nothing more");
    }

    /// Entries stay within their chunk and byte bounds, in chunk order, covering every chunk.
    #[test]
    fn commit_entries_are_bounded_in_chunks_and_bytes() {
        let chunk = |index: u64, bytes: usize| (index, vec![(0u64, vec![0u8; bytes])]);
        let big: Vec<_> = (0..40).map(|i| chunk(i, 512 << 10)).collect();
        let cut = batches(&big);
        assert!(cut.iter().all(|b| b.len() == 8), "{:?}", cut.iter().map(|b| b.len()).collect::<Vec<_>>());
        let small: Vec<_> = (0..200).map(|i| chunk(i, 4096)).collect();
        let cut = batches(&small);
        assert_eq!(cut.iter().map(|b| b.len()).collect::<Vec<_>>(), vec![64, 64, 64, 8]);
        assert_eq!(cut.concat().iter().map(|(i, _)| *i).collect::<Vec<_>>(), (0..200).collect::<Vec<_>>());
        assert!(batches(&[]).is_empty());
    }
}
