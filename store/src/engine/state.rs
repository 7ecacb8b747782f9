//! The engine's in-memory state: primary index, per-device block table and write buffers.
//! Everything here is guarded by the one `Inner::state` mutex.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::Instant;

use crate::key::Digest;

/// One primary-index entry: where the newest version of a record is and what a read or a
/// condition check needs without touching the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    /// Namespace write sequence number of this version: the higher one wins at start-up.
    pub seq: u64,
    pub block: u32,
    /// Byte offset of the record inside its block.
    pub offset: u32,
    /// Encoded length in bytes (without alignment padding).
    pub len: u32,
    pub generation: u32,
    pub void_time_secs: u32,
    pub device: u16,
    pub tombstone: bool,
}

/// Bytes the index costs per record, counted against `memory-size`: a 20-byte digest and a
/// 32-byte entry in a hashbrown slot (56 bytes with padding) plus its control byte, at the
/// table's 7/8 maximum load.
pub const INDEX_BYTES_PER_RECORD: u64 = 65;

/// Free blocks per device kept from ordinary writes (they get StopWrites at this floor), so
/// that deletes, which go on under stop-writes, and defragmentation still have room.
pub(crate) const DEFRAG_RESERVE_BLOCKS: usize = 2;

/// Who wants a new block: each may go lower into the reserve than the one before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// Writes leave DEFRAG_RESERVE_BLOCKS free.
    Write,
    /// Deletes (and expiry) leave one block for defragmentation.
    Delete,
    /// Defragmentation may take the last block: each pass frees more than it takes.
    Defrag,
}

impl Purpose {
    pub fn free_blocks_floor(self) -> usize {
        match self {
            Purpose::Write => DEFRAG_RESERVE_BLOCKS,
            Purpose::Delete => 1,
            Purpose::Defrag => 0,
        }
    }
}

/// The digest is already uniformly random: hash it by taking eight of its bytes.
#[derive(Default)]
pub(crate) struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        if bytes.len() >= 12 {
            self.0 = u64::from_le_bytes(bytes[4..12].try_into().unwrap());
        } else {
            for &b in bytes {
                self.0 = self.0.rotate_left(8) ^ b as u64;
            }
        }
    }
}

pub(crate) type Index = HashMap<Digest, IndexEntry, BuildHasherDefault<DigestHasher>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockState {
    /// Reusable. Its header on the device says free (or was never valid).
    Free,
    /// The current streaming write buffer.
    Open,
    /// Full, with bytes still waiting for the flusher.
    Sealed,
    /// Full and on stable storage.
    InUse,
    /// Being emptied by defragmentation.
    Defragging,
    /// Defragmentation found records here that no longer verify: left alone (and logged) so
    /// the rest of the device keeps being defragmented.
    Quarantined,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct BlockInfo {
    pub state: BlockState,
    /// Random epoch written in the block header when the block was opened; records carry it.
    pub epoch: u64,
    /// Bytes of records written into the block (padding excluded).
    pub used_bytes: u32,
    /// Bytes of records the index still points at.
    pub live_bytes: u32,
    /// Lowest seq of any record in the block (u64::MAX when none): older versions of a record
    /// can only sit in blocks whose min_seq is below the newer version's seq.
    pub min_seq: u64,
}

impl BlockInfo {
    pub fn free() -> BlockInfo {
        BlockInfo { state: BlockState::Free, epoch: 0, used_bytes: 0, live_bytes: 0, min_seq: u64::MAX }
    }

    /// Holds a superseded version of some record (or is being emptied).
    pub fn is_dirty(&self) -> bool {
        self.state != BlockState::Free && self.used_bytes > self.live_bytes
    }
}

/// The open block being filled.
pub(crate) struct WriteBuffer {
    pub block: u32,
    pub epoch: u64,
    pub buf: Vec<u8>,
    /// Append position. Always a multiple of RECORD_ALIGN_BYTES.
    pub len: usize,
    /// Records appended (written in the trailer when the block is sealed).
    pub records: u32,
    /// Bytes [0, flushed) were handed to the flusher; always a multiple of SECTOR_BYTES, so no
    /// later flush rewrites a sector an earlier flush made durable.
    pub flushed: usize,
    /// Log position of byte 0 of this block.
    pub lsn_base: u64,
}

/// A full block whose buffer is kept until its last bytes are durable.
pub(crate) struct SealedBlock {
    pub block: u32,
    pub buf: Arc<Vec<u8>>,
    /// Byte range still to write (sector-aligned; empty when all was handed already).
    pub from: usize,
    pub to: usize,
    pub lsn_end: u64,
    pub handed: bool,
}

pub(crate) struct DeviceState {
    pub blocks: Vec<BlockInfo>,
    pub free: VecDeque<u32>,
    pub buffer: Option<WriteBuffer>,
    pub sealed: Vec<SealedBlock>,
    /// Log positions, in bytes since the namespace opened: appended ≥ handed ≥ durable.
    pub appended_lsn: u64,
    pub handed_lsn: u64,
    pub durable_lsn: u64,
    /// A flush is wanted up to here (commit-to-device writers, defragmentation, `flush`).
    pub requested_lsn: u64,
    /// When the oldest bytes not yet handed to the flusher were appended.
    pub first_unflushed_at: Option<Instant>,
    /// Set by a failed write or fsync: the device takes no more writes until restart.
    pub poisoned: Option<String>,
}

impl DeviceState {
    pub fn new(block_count: u32) -> DeviceState {
        DeviceState {
            blocks: vec![BlockInfo::free(); block_count as usize],
            free: VecDeque::new(),
            buffer: None,
            sealed: Vec::new(),
            appended_lsn: 0,
            handed_lsn: 0,
            durable_lsn: 0,
            requested_lsn: 0,
            first_unflushed_at: None,
            poisoned: None,
        }
    }

    /// Percentage of the device's data blocks that are free.
    pub fn available_pct(&self) -> u64 {
        let data_blocks = self.blocks.len().saturating_sub(1).max(1) as u64;
        self.free.len() as u64 * 100 / data_blocks
    }

    /// Log position at which a record at (block, offset, len) is durable, or 0 if it already is.
    pub fn lsn_needed(&self, block: u32, offset: u32, len: u32) -> u64 {
        let end = offset as u64 + len as u64;
        if let Some(buffer) = self.buffer.as_ref().filter(|b| b.block == block) {
            return buffer.lsn_base + end;
        }
        match self.sealed.iter().find(|s| s.block == block) {
            Some(sealed) => sealed.lsn_end,
            None => 0,
        }
    }

    /// Copies a record out of a write buffer, if it still lives in one.
    pub fn copy_from_buffers(&self, block: u32, offset: u32, len: u32) -> Option<Vec<u8>> {
        let range = offset as usize..offset as usize + len as usize;
        if let Some(buffer) = self.buffer.as_ref().filter(|b| b.block == block) {
            return Some(buffer.buf[range].to_vec());
        }
        self.sealed.iter().find(|s| s.block == block).map(|s| s.buf[range].to_vec())
    }
}

pub(crate) struct State {
    pub index: Index,
    pub tombstones: u64,
    /// Next write sequence number (also used for block epochs).
    pub next_seq: u64,
    pub devices: Vec<DeviceState>,
}

impl State {
    pub fn live_records(&self) -> u64 {
        self.index.len() as u64 - self.tombstones
    }

    pub fn memory_used_bytes(&self) -> u64 {
        self.index.len() as u64 * INDEX_BYTES_PER_RECORD
    }

    /// Puts `entry` in the index, keeping block accounting and the tombstone count right.
    pub fn install(&mut self, digest: crate::key::Digest, entry: IndexEntry) {
        let block = &mut self.devices[entry.device as usize].blocks[entry.block as usize];
        block.live_bytes += entry.len;
        if let Some(old) = self.index.insert(digest, entry) {
            self.forget(&old);
        }
        if entry.tombstone {
            self.tombstones += 1;
        }
    }

    /// Drops an entry from the index (a tombstone nothing older needs any more).
    pub fn remove(&mut self, digest: &crate::key::Digest) {
        if let Some(old) = self.index.remove(digest) {
            self.forget(&old);
        }
    }

    fn forget(&mut self, old: &IndexEntry) {
        let block = &mut self.devices[old.device as usize].blocks[old.block as usize];
        assert!(block.live_bytes >= old.len, "live bytes of a block went negative");
        block.live_bytes -= old.len;
        if old.tombstone {
            self.tombstones -= 1;
        }
    }

    /// Lowest min_seq over dirty blocks, leaving one block out: a tombstone whose seq is below
    /// it has no older version left on any device and can go.
    pub fn min_dirty_seq_except(&self, device: u16, block: u32) -> u64 {
        let mut lowest = u64::MAX;
        for (d, dev) in self.devices.iter().enumerate() {
            for (b, info) in dev.blocks.iter().enumerate() {
                if (d as u16, b as u32) != (device, block) && info.is_dirty() {
                    lowest = lowest.min(info.min_seq);
                }
            }
        }
        lowest
    }
}
