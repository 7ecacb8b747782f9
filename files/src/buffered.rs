//! `--durability fsync`: writes held in memory (bounded) until fsync, fdatasync, close or an
//! O_SYNC/O_DSYNC write commits them, for applications that sync properly.
//!
//! Invariants:
//! - **Memory stays bounded**: past `dirty_bytes_max` held by the mount, a write commits its
//!   own file's held writes before it returns.
//! - **A commit never shows a size covering bytes not yet committed**: held writes go in
//!   entries in chunk order, each carrying the size up to the end of the last chunk it
//!   finishes, or the start of a chunk that goes on in the next entry (the last entry the
//!   whole size).
//! - **Every entry fits in a frame**: bounded in chunks and in bytes, each piece's operation
//!   counted; a chunk written in many small pieces goes on over several entries.
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
            let entries = entries(&chunks);
            for (i, entry) in entries.iter().enumerate() {
                let last = i + 1 == entries.len();
                // Up to the end of the last chunk the entry finishes, or to its start when the
                // chunk goes on in the next entry.
                let covered = match (last, entry.last()) {
                    (false, Some(part)) if part.ends_chunk => ((part.index + 1) * self.chunk_bytes).min(final_size),
                    (false, Some(part)) => (part.index * self.chunk_bytes).min(final_size),
                    _ => final_size,
                };
                self.commit_batch(ino, &mut size, entry, covered, written_ns)?;
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

    /// One entry: held pieces of some chunks and the size up to `covered`; retried after a
    /// conflict with another mount's change of the size record.
    fn commit_batch(&self, ino: u64, size: &mut FileSize, parts: &[Part], covered: u64, written_ns: i64) -> FsResult<()> {
        for _ in 0..CONFLICT_RETRIES_MAX {
            let mut writes: Vec<BatchWrite> = parts
                .iter()
                .map(|&Part { index, pieces, .. }| BatchWrite {
                    key: self.keys.chunk(ino, index),
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
            for part in parts {
                next.add_extent(part.index, part.index + 1);
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
    let Some((mut start, mut merged)) = joined.next() else {
        // Not reached (first < last); holding the bytes alone is right in any case.
        pieces.insert(first, (within, bytes.to_vec()));
        return bytes.len();
    };
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

/// What one held piece costs in an entry besides its bytes: its `WriteBytesAt` operation as
/// the wire encodes it (variant, bin name, offset, length, flag: 33 bytes), rounded up.
const PIECE_OVERHEAD_BYTES: usize = 40;

/// Some held pieces of one chunk that go in one entry.
#[derive(Clone, Copy, Debug)]
struct Part<'a> {
    index: u64,
    pieces: &'a [(u64, Vec<u8>)],
    /// The chunk's last pieces (else it goes on in the next entry).
    ends_chunk: bool,
}

/// Held chunks cut into commit entries in chunk order: at most `CHUNKS_PER_BATCH_MAX` chunks
/// and `BATCH_BYTES_MAX` bytes an entry, counting each piece's operation
/// (`PIECE_OVERHEAD_BYTES`). A chunk of many small pieces goes on over several entries; one
/// piece (at most `CHUNK_BYTES_MAX`) always fits in an entry.
fn entries(chunks: &[HeldChunk]) -> Vec<Vec<Part<'_>>> {
    let mut out = Vec::new();
    let mut entry: Vec<Part> = Vec::new();
    let mut bytes = 0;
    for (index, pieces) in chunks {
        let mut from = 0;
        while from < pieces.len() {
            if entry.len() == CHUNKS_PER_BATCH_MAX {
                out.push(std::mem::take(&mut entry));
                bytes = 0;
            }
            let mut to = from;
            while to < pieces.len() {
                let cost = pieces[to].1.len() + PIECE_OVERHEAD_BYTES;
                if bytes + cost > BATCH_BYTES_MAX && (to > from || !entry.is_empty()) {
                    break;
                }
                bytes += cost;
                to += 1;
            }
            if to == from {
                // Nothing more fits beside what the entry holds: the next entry takes it.
                out.push(std::mem::take(&mut entry));
                bytes = 0;
                continue;
            }
            entry.push(Part { index: *index, pieces: &pieces[from..to], ends_chunk: to == pieces.len() });
            from = to;
            if from < pieces.len() {
                out.push(std::mem::take(&mut entry));
                bytes = 0;
            }
        }
    }
    if !entry.is_empty() {
        out.push(entry);
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

    /// Entries stay within their chunk and byte bounds (pieces' operations counted), in chunk
    /// order, holding every piece once; a chunk of many small pieces goes on over entries, and
    /// only the entry with a chunk's last pieces finishes it.
    #[test]
    fn commit_entries_are_bounded_in_chunks_and_bytes() {
        let cost = |entry: &[Part]| entry.iter().flat_map(|p| p.pieces).map(|(_, b)| b.len() + PIECE_OVERHEAD_BYTES).sum::<usize>();
        let whole = |index: u64, bytes: usize| (index, vec![(0u64, vec![0u8; bytes])]);
        let big: Vec<_> = (0..40).map(|i| whole(i, 512 << 10)).collect();
        let cut = entries(&big);
        assert!(cut.iter().all(|e| e.len() == 7 || e.len() == 5), "{:?}", cut.iter().map(|e| e.len()).collect::<Vec<_>>());
        let small: Vec<_> = (0..200).map(|i| whole(i, 4096)).collect();
        assert_eq!(entries(&small).iter().map(|e| e.len()).collect::<Vec<_>>(), vec![64, 64, 64, 8]);
        // 1-byte pieces every other byte over chunks of 512 KiB: 262,144 pieces a chunk, whose
        // operations alone outweigh a frame.
        let sparse: Vec<_> = (0..3u64).map(|i| (i, (0..(256u64 << 10)).map(|k| (2 * k, vec![1u8])).collect::<Vec<_>>())).collect();
        for chunks in [&big, &small, &sparse] {
            let cut = entries(chunks);
            assert!(cut.iter().all(|e| cost(e) <= BATCH_BYTES_MAX && e.len() <= CHUNKS_PER_BATCH_MAX && !e.is_empty()));
            let parts: Vec<Part> = cut.concat();
            let pieces: Vec<(u64, u64)> = parts.iter().flat_map(|p| p.pieces.iter().map(move |(at, _)| (p.index, *at))).collect();
            let expected: Vec<(u64, u64)> = chunks.iter().flat_map(|(i, ps)| ps.iter().map(move |(at, _)| (*i, *at))).collect();
            assert_eq!(pieces, expected, "every piece once, in order");
            for (i, (index, _)) in chunks.iter().enumerate() {
                let finishing: Vec<&Part> = parts.iter().filter(|p| p.index == *index && p.ends_chunk).collect();
                assert_eq!(finishing.len(), 1, "chunk {i} is finished once");
                assert!(std::ptr::eq(finishing[0], parts.iter().rfind(|p| p.index == *index).unwrap()), "by its last part");
            }
        }
        assert!(entries(&sparse).len() > 3, "the sparse chunks went on over entries");
        assert!(entries(&[]).is_empty());
    }
}
