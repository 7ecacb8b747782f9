//! The on-device byte format (documented byte by byte in store/FORMAT.md).
//!
//! All integers are little-endian. Every structure carries a CRC32 (crc32fast, IEEE), and the
//! decoders here bound-check everything: garbage yields a `RecordFault` or an error, never a
//! panic and never an allocation larger than a write block.

use crate::error::{Error, Result};
use crate::key::Digest;
use crate::value::{Bin, Value};

/// Version of the device, block and record formats below (what this build writes).
/// Version 2 added the block header's log position and the block trailer.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest version this build still reads (a version-1 block has no trailer: its records
/// may run to the block's end).
pub const FORMAT_VERSION_OLDEST: u32 = 1;

pub const DEVICE_MAGIC: [u8; 8] = *b"CHUNKDEV";
/// Block 0 of every device holds the device header; only its first bytes are used.
pub const DEVICE_HEADER_BYTES: usize = 84;

pub const BLOCK_MAGIC: [u8; 4] = *b"CKBK";
pub const BLOCK_HEADER_BYTES: usize = 64;
pub const BLOCK_STATE_IN_USE: u16 = 1;
pub const BLOCK_STATE_FREE: u16 = 2;
/// The last sector of every block is kept for its trailer: records end before it.
pub const BLOCK_TRAILER_BYTES: usize = 512;
pub const TRAILER_MAGIC: [u8; 4] = *b"CKTL";

pub const RECORD_MAGIC: [u8; 4] = *b"CKRC";
pub const RECORD_HEADER_BYTES: usize = 72;
/// Records start at multiples of this many bytes inside a block.
pub const RECORD_ALIGN_BYTES: usize = 8;
pub const RECORD_FLAG_TOMBSTONE: u16 = 1;

const BIN_TYPE_INT: u8 = 1;
const BIN_TYPE_FLOAT: u8 = 2;
const BIN_TYPE_STRING: u8 = 3;
const BIN_TYPE_BYTES: u8 = 4;

fn u16_at(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(buf[at..at + 2].try_into().unwrap())
}
fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().unwrap())
}
fn u64_at(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().unwrap())
}

pub fn align_up(value: usize, align: usize) -> usize {
    value.div_ceil(align) * align
}

// ---------------------------------------------------------------------------------------------
// Device header

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceHeader {
    pub block_size: u32,
    pub device_len: u64,
    pub device_index: u32,
    pub device_count: u32,
    pub created_ms: u64,
    /// Random, chosen when the device is formatted; every block header repeats it, so blocks
    /// left over from an earlier use of the device are never taken for ours.
    pub device_id: u64,
    pub namespace: String,
}

impl DeviceHeader {
    pub fn encode(&self) -> [u8; DEVICE_HEADER_BYTES] {
        let mut out = [0u8; DEVICE_HEADER_BYTES];
        out[0..8].copy_from_slice(&DEVICE_MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        out[16..24].copy_from_slice(&self.device_len.to_le_bytes());
        out[24..28].copy_from_slice(&self.device_index.to_le_bytes());
        out[28..32].copy_from_slice(&self.device_count.to_le_bytes());
        out[32..40].copy_from_slice(&self.created_ms.to_le_bytes());
        out[40..48].copy_from_slice(&self.device_id.to_le_bytes());
        let name = self.namespace.as_bytes();
        assert!(name.len() <= 31, "namespace names are sanitized to 31 bytes");
        out[48] = name.len() as u8;
        out[49..49 + name.len()].copy_from_slice(name);
        let crc = crc32fast::hash(&out[0..80]);
        out[80..84].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// `Ok(None)`: the header area is all zeros (a fresh device).
    pub fn decode(buf: &[u8; DEVICE_HEADER_BYTES], path: &std::path::Path) -> Result<Option<DeviceHeader>> {
        if buf.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let corrupt = |what: String| Error::Corrupt { path: path.to_owned(), offset: 0, what };
        if buf[0..8] != DEVICE_MAGIC {
            return Err(corrupt(format!("not a chunkstore device: magic {:02x?} instead of {:02x?} (nothing was written to it)", &buf[0..8], DEVICE_MAGIC)));
        }
        if crc32fast::hash(&buf[0..80]) != u32_at(buf, 80) {
            return Err(corrupt("device header checksum mismatch".into()));
        }
        let version = u32_at(buf, 8);
        if !(FORMAT_VERSION_OLDEST..=FORMAT_VERSION).contains(&version) {
            return Err(corrupt(format!("device format version {version}; this build reads versions {FORMAT_VERSION_OLDEST} to {FORMAT_VERSION}")));
        }
        let name_len = buf[48] as usize;
        if name_len > 31 {
            return Err(corrupt(format!("namespace name length {name_len} > 31")));
        }
        let namespace = String::from_utf8(buf[49..49 + name_len].to_vec()).map_err(|_| corrupt("namespace name is not UTF-8".into()))?;
        Ok(Some(DeviceHeader {
            block_size: u32_at(buf, 12),
            device_len: u64_at(buf, 16),
            device_index: u32_at(buf, 24),
            device_count: u32_at(buf, 28),
            created_ms: u64_at(buf, 32),
            device_id: u64_at(buf, 40),
            namespace,
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// Block header

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockHeader {
    pub state: u16,
    /// Random, chosen each time the block is opened; records carry it.
    pub epoch: u64,
    pub block_index: u32,
    /// The device header's id.
    pub device_id: u64,
    /// The device's log position of the block's byte 0: positions grow with every block opened,
    /// so start-up can tell bytes written before a known durable point from later ones.
    pub lsn_base: u64,
    /// The format version the block was written in (this build writes `FORMAT_VERSION`).
    pub version: u16,
    /// Everything of the device's log before this position was durable when the header was
    /// written (0: not known; headers of older builds hold 0). Start-up takes the highest one
    /// it finds as a durable point of its own: defragmentation frees a block only once the
    /// copies of its records are durable, and the free header it writes says how far, so
    /// damage to those copies (which no log replays) is never taken for a torn tail.
    pub durable_lsn: u64,
}

impl BlockHeader {
    pub fn encode(&self) -> [u8; BLOCK_HEADER_BYTES] {
        let mut out = [0u8; BLOCK_HEADER_BYTES];
        out[0..4].copy_from_slice(&BLOCK_MAGIC);
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6..8].copy_from_slice(&self.state.to_le_bytes());
        out[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        out[16..20].copy_from_slice(&self.block_index.to_le_bytes());
        out[20..28].copy_from_slice(&self.device_id.to_le_bytes());
        out[28..36].copy_from_slice(&self.lsn_base.to_le_bytes());
        out[36..44].copy_from_slice(&self.durable_lsn.to_le_bytes());
        let crc = crc32fast::hash(&out[0..60]);
        out[60..64].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// `None` for anything that is not a valid header (zeros, torn, garbage): such a block
    /// holds no records.
    pub fn decode(buf: &[u8]) -> Option<BlockHeader> {
        if buf.len() < BLOCK_HEADER_BYTES || buf[0..4] != BLOCK_MAGIC {
            return None;
        }
        let version = u16_at(buf, 4);
        if crc32fast::hash(&buf[0..60]) != u32_at(buf, 60) || !(FORMAT_VERSION_OLDEST..=FORMAT_VERSION).contains(&(version as u32)) {
            return None;
        }
        Some(BlockHeader {
            state: u16_at(buf, 6),
            epoch: u64_at(buf, 8),
            block_index: u32_at(buf, 16),
            device_id: u64_at(buf, 20),
            lsn_base: u64_at(buf, 28),
            version,
            durable_lsn: u64_at(buf, 36),
        })
    }

    /// Where the block's records end: before the trailer sector (version 1: at the block's end).
    pub fn records_end(&self, block_len: usize) -> usize {
        match self.version {
            1 => block_len,
            _ => block_len - BLOCK_TRAILER_BYTES,
        }
    }

    /// Does the block have a trailer and log position (version 2 on)?
    pub fn has_trailer(&self) -> bool {
        self.version >= 2
    }

    /// True when the bytes look like a block header that was damaged: the magic is there but
    /// the rest is bad, or the header is gone while the block holds a record that passes its
    /// CRC for this very place (a block is only ever written with its header, and freeing it
    /// writes a valid free header, so such a block lost its header).
    pub fn looks_damaged(buf: &[u8], block_index: u32) -> bool {
        if buf.len() < BLOCK_HEADER_BYTES + RECORD_HEADER_BYTES || BlockHeader::decode(buf).is_some() {
            return false;
        }
        if buf[0..4] == BLOCK_MAGIC {
            return true;
        }
        // Most such blocks were never written: one fast pass over them instead of a search.
        if buf.iter().all(|&b| b == 0) {
            return false;
        }
        (BLOCK_HEADER_BYTES..=buf.len() - RECORD_HEADER_BYTES).step_by(RECORD_ALIGN_BYTES).any(|at| {
            let total = u32_at(buf, at + 8) as usize;
            buf[at..at + 4] == RECORD_MAGIC
                && total >= RECORD_HEADER_BYTES
                && at + total <= buf.len()
                && record_crc(&buf[at..at + total], block_index, at) == u32_at(buf, at + 4)
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Block trailer (in the block's last sector, written when the block is sealed)

/// What a sealed block holds: records tile bytes [BLOCK_HEADER_BYTES, used_len) with only
/// zero padding between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockTrailer {
    pub used_len: u32,
    pub records: u32,
}

impl BlockTrailer {
    pub const BYTES: usize = 32;

    /// Encoded for the block `block_index` opened under `epoch`.
    pub fn encode(&self, block_index: u32, epoch: u64) -> [u8; BlockTrailer::BYTES] {
        let mut out = [0u8; BlockTrailer::BYTES];
        out[0..4].copy_from_slice(&TRAILER_MAGIC);
        out[4..8].copy_from_slice(&self.used_len.to_le_bytes());
        out[8..12].copy_from_slice(&self.records.to_le_bytes());
        out[12..16].copy_from_slice(&block_index.to_le_bytes());
        out[16..24].copy_from_slice(&epoch.to_le_bytes());
        let crc = crc32fast::hash(&out[0..28]);
        out[28..32].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// The trailer of a whole block (`block` is all of it), if it is valid for this block and
    /// epoch; `None` for a block that was never sealed, or whose trailer is damaged.
    pub fn decode(block: &[u8], block_index: u32, epoch: u64) -> Option<BlockTrailer> {
        let at = block.len().checked_sub(BLOCK_TRAILER_BYTES)?;
        let t = &block[at..at + BlockTrailer::BYTES];
        if t[0..4] != TRAILER_MAGIC || crc32fast::hash(&t[0..28]) != u32_at(t, 28) {
            return None;
        }
        if u32_at(t, 12) != block_index || u64_at(t, 16) != epoch {
            return None;
        }
        let used_len = u32_at(t, 4);
        (used_len as usize <= at).then_some(BlockTrailer { used_len, records: u32_at(t, 8) })
    }
}

// ---------------------------------------------------------------------------------------------
// Records

/// The fixed part of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub total_len: u32,
    pub flags: u16,
    pub seq: u64,
    pub block_epoch: u64,
    pub digest: Digest,
    pub generation: u32,
    pub void_time_secs: u32,
    pub last_update_ms: u64,
}

impl RecordHeader {
    pub fn is_tombstone(&self) -> bool {
        self.flags & RECORD_FLAG_TOMBSTONE != 0
    }
}

/// Bytes a record with this set and these bins takes, before alignment padding.
pub fn encoded_record_len(set: &str, bins: &[Bin]) -> usize {
    RECORD_HEADER_BYTES
        + set.len()
        + bins
            .iter()
            .map(|bin| {
                2 + bin.name.len()
                    + match &bin.value {
                        Value::Int(_) | Value::Float(_) => 8,
                        Value::String(s) => 4 + s.len(),
                        Value::Bytes(b) => 4 + b.len(),
                    }
            })
            .sum::<usize>()
}

/// Encodes a record with seq, block epoch and CRC left zero; `seal_record` fills them in when
/// the record takes its place in a write block. Callers check sizes and names first.
pub fn encode_record(header: &RecordHeader, set: &str, bins: &[Bin]) -> Vec<u8> {
    let total = encoded_record_len(set, bins);
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&RECORD_MAGIC);
    out.extend_from_slice(&[0; 4]); // crc, set by seal_record
    out.extend_from_slice(&(total as u32).to_le_bytes());
    out.extend_from_slice(&header.flags.to_le_bytes());
    out.extend_from_slice(&(set.len() as u16).to_le_bytes());
    out.extend_from_slice(&[0; 16]); // seq and block epoch, set by seal_record
    out.extend_from_slice(&header.digest);
    out.extend_from_slice(&header.generation.to_le_bytes());
    out.extend_from_slice(&header.void_time_secs.to_le_bytes());
    out.extend_from_slice(&header.last_update_ms.to_le_bytes());
    out.extend_from_slice(&(bins.len() as u16).to_le_bytes());
    out.extend_from_slice(&[0; 2]);
    debug_assert_eq!(out.len(), RECORD_HEADER_BYTES);
    out.extend_from_slice(set.as_bytes());
    for bin in bins {
        out.push(bin.name.len() as u8);
        out.extend_from_slice(bin.name.as_bytes());
        match &bin.value {
            Value::Int(v) => {
                out.push(BIN_TYPE_INT);
                out.extend_from_slice(&v.to_le_bytes());
            }
            Value::Float(v) => {
                out.push(BIN_TYPE_FLOAT);
                out.extend_from_slice(&v.to_bits().to_le_bytes());
            }
            Value::String(s) => {
                out.push(BIN_TYPE_STRING);
                out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Value::Bytes(b) => {
                out.push(BIN_TYPE_BYTES);
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                out.extend_from_slice(b);
            }
        }
    }
    assert_eq!(out.len(), total, "encoded_record_len and encode_record disagree");
    out
}

/// A record's CRC: over its place (block index and offset in the block, so a copy of a
/// record found anywhere else does not verify) and its bytes from offset 8 on.
pub fn record_crc(bytes: &[u8], block: u32, offset: usize) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&block.to_le_bytes());
    hasher.update(&(offset as u32).to_le_bytes());
    hasher.update(&bytes[8..]);
    hasher.finalize()
}

/// Stamps seq and block epoch into an encoded record placed at (block, offset) and computes
/// its CRC.
pub fn seal_record(record: &mut [u8], seq: u64, block_epoch: u64, block: u32, offset: usize) {
    record[16..24].copy_from_slice(&seq.to_le_bytes());
    record[24..32].copy_from_slice(&block_epoch.to_le_bytes());
    let crc = record_crc(record, block, offset);
    record[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// Why bytes at some offset of a block are not a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordFault {
    /// The header claims more bytes than the block has left: a torn tail.
    Truncated,
    /// The record of this block's epoch fails its CRC: torn or corrupt.
    ChecksumMismatch,
    /// Non-zero bytes that are no record of this epoch lie before a later record or fault of
    /// it: between records there is only zero padding, so something overwrote them.
    Garbage,
}

/// One step of walking a block.
#[derive(Debug)]
pub enum BlockItem<'a> {
    Record { offset: usize, header: RecordHeader, bytes: &'a [u8] },
    Fault { offset: usize, fault: RecordFault },
}

/// Walks the records of a block written under `epoch`, in `block` (its records area: bytes up
/// to `BlockHeader::records_end`). Bytes that are not a record header of this epoch (padding, zeros,
/// leftovers from the block's earlier life) are skipped; a header of this epoch that is cut off
/// or fails its CRC is reported as a fault and skipped, and so are non-zero skipped bytes
/// followed by a later record or fault (`RecordFault::Garbage`). Non-zero bytes after the last
/// record are not a fault by themselves (an earlier life of the block, or a torn tail):
/// `tail_garbage_at` says where they start, for the caller to judge.
pub struct BlockWalker<'a> {
    block: &'a [u8],
    block_index: u32,
    epoch: u64,
    pos: usize,
    /// First non-zero byte skipped since the last record or fault.
    garbage_at: Option<usize>,
    /// A record (or fault) found after garbage, returned after the garbage fault.
    pending: Option<BlockItem<'a>>,
}

impl<'a> BlockWalker<'a> {
    pub fn new(block: &'a [u8], block_index: u32, epoch: u64) -> BlockWalker<'a> {
        BlockWalker { block, block_index, epoch, pos: BLOCK_HEADER_BYTES, garbage_at: None, pending: None }
    }

    /// After the walk: where non-zero bytes after the last record or fault start, if any.
    pub fn tail_garbage_at(&self) -> Option<usize> {
        self.garbage_at
    }

    /// Skips `len` bytes at `pos` that are no record, remembering the first non-zero one.
    fn skip(&mut self, len: usize) {
        if self.garbage_at.is_none() {
            let end = (self.pos + len).min(self.block.len());
            if let Some(i) = self.block[self.pos..end].iter().position(|&b| b != 0) {
                self.garbage_at = Some(self.pos + i);
            }
        }
        self.pos += len;
    }

    /// Returns `item`, preceded by a garbage fault when non-zero bytes were skipped before it.
    fn found(&mut self, item: BlockItem<'a>) -> BlockItem<'a> {
        match self.garbage_at.take() {
            Some(offset) => {
                self.pending = Some(item);
                BlockItem::Fault { offset, fault: RecordFault::Garbage }
            }
            None => item,
        }
    }
}

impl<'a> Iterator for BlockWalker<'a> {
    type Item = BlockItem<'a>;

    fn next(&mut self) -> Option<BlockItem<'a>> {
        if let Some(item) = self.pending.take() {
            return Some(item);
        }
        while self.pos + RECORD_HEADER_BYTES <= self.block.len() {
            let at = self.pos;
            let head = &self.block[at..at + RECORD_HEADER_BYTES];
            if head[0..4] != RECORD_MAGIC || u64_at(head, 24) != self.epoch {
                self.skip(RECORD_ALIGN_BYTES);
                continue;
            }
            let total = u32_at(head, 8) as usize;
            if total < RECORD_HEADER_BYTES || at + total > self.block.len() {
                self.pos += RECORD_ALIGN_BYTES;
                let fault = if total < RECORD_HEADER_BYTES { RecordFault::ChecksumMismatch } else { RecordFault::Truncated };
                return Some(self.found(BlockItem::Fault { offset: at, fault }));
            }
            let bytes = &self.block[at..at + total];
            if record_crc(bytes, self.block_index, at) != u32_at(bytes, 4) {
                self.pos += RECORD_ALIGN_BYTES;
                return Some(self.found(BlockItem::Fault { offset: at, fault: RecordFault::ChecksumMismatch }));
            }
            // The padding up to the next aligned offset is zeros.
            self.pos = at + total;
            let padding = align_up(total, RECORD_ALIGN_BYTES) - total;
            let item = self.found(BlockItem::Record { offset: at, header: parse_header(bytes), bytes });
            self.skip(padding.min(self.block.len() - self.pos));
            return Some(item);
        }
        // Bytes too few for a record header at the end of the area.
        let rest = self.block.len().saturating_sub(self.pos);
        self.skip(rest);
        None
    }
}

/// Reads the fixed header of a record whose length and CRC were already checked.
pub fn parse_header(bytes: &[u8]) -> RecordHeader {
    RecordHeader {
        total_len: u32_at(bytes, 8),
        flags: u16_at(bytes, 12),
        seq: u64_at(bytes, 16),
        block_epoch: u64_at(bytes, 24),
        digest: bytes[32..52].try_into().unwrap(),
        generation: u32_at(bytes, 52),
        void_time_secs: u32_at(bytes, 56),
        last_update_ms: u64_at(bytes, 60),
    }
}

/// Checks a record read back from (block, offset): magic, length and CRC. `None` if any is
/// wrong.
pub fn verify_record(bytes: &[u8], block: u32, offset: usize) -> Option<RecordHeader> {
    if bytes.len() < RECORD_HEADER_BYTES || bytes[0..4] != RECORD_MAGIC || u32_at(bytes, 8) as usize != bytes.len() {
        return None;
    }
    if record_crc(bytes, block, offset) != u32_at(bytes, 4) {
        return None;
    }
    Some(parse_header(bytes))
}

/// Decodes set name and bins of a checked record. Errors (never panics) on malformed content.
pub fn decode_body(bytes: &[u8]) -> std::result::Result<(String, Vec<Bin>), String> {
    let set_len = u16_at(bytes, 14) as usize;
    let bin_count = u16_at(bytes, 68) as usize;
    let mut cursor = Cursor { bytes, pos: RECORD_HEADER_BYTES };
    let set = String::from_utf8(cursor.take(set_len)?.to_vec()).map_err(|_| "set name is not UTF-8")?;
    let mut bins = Vec::with_capacity(bin_count.min(1024));
    for _ in 0..bin_count {
        let name_len = cursor.take(1)?[0] as usize;
        let name = String::from_utf8(cursor.take(name_len)?.to_vec()).map_err(|_| "bin name is not UTF-8")?;
        let value = match cursor.take(1)?[0] {
            BIN_TYPE_INT => Value::Int(i64::from_le_bytes(cursor.take(8)?.try_into().unwrap())),
            BIN_TYPE_FLOAT => Value::Float(f64::from_bits(u64::from_le_bytes(cursor.take(8)?.try_into().unwrap()))),
            BIN_TYPE_STRING => {
                let len = u32::from_le_bytes(cursor.take(4)?.try_into().unwrap()) as usize;
                Value::String(String::from_utf8(cursor.take(len)?.to_vec()).map_err(|_| "string bin is not UTF-8")?)
            }
            BIN_TYPE_BYTES => {
                let len = u32::from_le_bytes(cursor.take(4)?.try_into().unwrap()) as usize;
                Value::Bytes(cursor.take(len)?.to_vec())
            }
            other => return Err(format!("unknown bin type {other}")),
        };
        bins.push(Bin { name, value });
    }
    if cursor.pos != bytes.len() {
        return Err(format!("{} bytes left over after the bins", bytes.len() - cursor.pos));
    }
    Ok((set, bins))
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, len: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(len).filter(|&end| end <= self.bytes.len()).ok_or("record body is cut short")?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }
}
