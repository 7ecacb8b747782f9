//! WAL byte format (documented in store/WAL.md). Little-endian throughout.

use super::{GroupId, WalOp};

pub const SEGMENT_MAGIC: [u8; 8] = *b"CHUNKWAL";
pub const WAL_FORMAT_VERSION: u32 = 3;
/// Segments of this version on are read (version 1 has no forget and void records, versions 1
/// and 2 no flush markers).
pub const WAL_FORMAT_VERSION_OLDEST: u32 = 1;
/// The segment header fills the first sector; records start after it.
pub const SEGMENT_HEADER_BYTES: usize = 512;
pub const SECTOR_BYTES: usize = 512;
/// Bytes before a record's body: length, CRC, type, group.
pub const RECORD_PREFIX_BYTES: usize = 13;
/// Records start at multiples of 4 bytes, so the zero padding before a sector boundary always
/// holds at least one whole (zero) length field.
pub const RECORD_ALIGN_BYTES: usize = 4;

const TYPE_ENTRY: u8 = 1;
const TYPE_TRUNCATE: u8 = 2;
const TYPE_PURGE: u8 = 3;
const TYPE_VOTE: u8 = 4;
const TYPE_COMMITTED: u8 = 5;
const TYPE_APPLIED: u8 = 6;
const TYPE_FORGET: u8 = 7;
const TYPE_VOID: u8 = 8;
const TYPE_FLUSH: u8 = 9;
/// The first version whose every flush begins with a flush marker.
pub const WAL_FORMAT_VERSION_FLUSH_MARKERS: u32 = 3;

pub fn encode_segment_header(segment_id: u64) -> Vec<u8> {
    let mut out = vec![0u8; SEGMENT_HEADER_BYTES];
    out[0..8].copy_from_slice(&SEGMENT_MAGIC);
    out[8..12].copy_from_slice(&WAL_FORMAT_VERSION.to_le_bytes());
    out[12..20].copy_from_slice(&segment_id.to_le_bytes());
    let crc = crc32fast::hash(&out[0..20]);
    out[20..24].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The segment id and format version in a valid header, or why it is not one.
pub fn decode_segment_header(buf: &[u8]) -> Result<(u64, u32), String> {
    if buf.len() < SEGMENT_HEADER_BYTES {
        return Err(format!("{} bytes, shorter than a segment header", buf.len()));
    }
    if buf[0..8] != SEGMENT_MAGIC {
        return Err(format!("magic {:02x?} is not {:02x?}", &buf[0..8], SEGMENT_MAGIC));
    }
    if crc32fast::hash(&buf[0..20]) != u32::from_le_bytes(buf[20..24].try_into().unwrap()) {
        return Err("segment header checksum mismatch".into());
    }
    let version = u32::from_le_bytes(buf[8..12].try_into().unwrap());
    if !(WAL_FORMAT_VERSION_OLDEST..=WAL_FORMAT_VERSION).contains(&version) {
        return Err(format!("format version {version}; this build reads versions {WAL_FORMAT_VERSION_OLDEST} to {WAL_FORMAT_VERSION}"));
    }
    Ok((u64::from_le_bytes(buf[12..20].try_into().unwrap()), version))
}

/// Appends the marker that begins every flush of a segment: the segment's id and the flush's
/// number (increasing over the log's life). Recovery uses it to tell a torn last flush from
/// damage in a flush that was synced (see `recovery`).
pub fn encode_flush_marker(out: &mut Vec<u8>, segment: u64, number: u64) {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    out.push(TYPE_FLUSH);
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&segment.to_le_bytes());
    out.extend_from_slice(&number.to_le_bytes());
    seal(out, start);
}

/// Appends one encoded record to `out`.
pub fn encode_record(out: &mut Vec<u8>, group: GroupId, op: &WalOp) {
    let start = out.len();
    out.extend_from_slice(&[0; 8]); // length and CRC, filled below
    match op {
        WalOp::Entry { index, term, payload } => {
            out.push(TYPE_ENTRY);
            out.extend_from_slice(&group.to_le_bytes());
            out.extend_from_slice(&index.to_le_bytes());
            out.extend_from_slice(&term.to_le_bytes());
            out.extend_from_slice(payload);
        }
        WalOp::Truncate { from_index } => {
            out.push(TYPE_TRUNCATE);
            out.extend_from_slice(&group.to_le_bytes());
            out.extend_from_slice(&from_index.to_le_bytes());
        }
        WalOp::Purge { upto_index, upto_term } => {
            out.push(TYPE_PURGE);
            out.extend_from_slice(&group.to_le_bytes());
            out.extend_from_slice(&upto_index.to_le_bytes());
            out.extend_from_slice(&upto_term.to_le_bytes());
        }
        WalOp::Vote(bytes) | WalOp::Committed(bytes) | WalOp::Applied(bytes) | WalOp::Forget(bytes) | WalOp::Void(bytes) => {
            out.push(match op {
                WalOp::Vote(_) => TYPE_VOTE,
                WalOp::Committed(_) => TYPE_COMMITTED,
                WalOp::Applied(_) => TYPE_APPLIED,
                WalOp::Forget(_) => TYPE_FORGET,
                _ => TYPE_VOID,
            });
            out.extend_from_slice(&group.to_le_bytes());
            out.extend_from_slice(bytes);
        }
    }
    seal(out, start);
}

/// Fills in the length and CRC of the record begun at `start` and pads it to the alignment.
fn seal(out: &mut Vec<u8>, start: usize) {
    let len = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    out.resize(out.len().next_multiple_of(RECORD_ALIGN_BYTES), 0);
}

/// A record read back.
#[derive(Debug, PartialEq)]
pub enum Decoded<'a> {
    Entry {
        group: GroupId,
        index: u64,
        term: u64,
        payload: &'a [u8],
    },
    Truncate {
        group: GroupId,
        from_index: u64,
    },
    Purge {
        group: GroupId,
        upto_index: u64,
        upto_term: u64,
    },
    Vote {
        group: GroupId,
        bytes: &'a [u8],
    },
    Committed {
        group: GroupId,
        bytes: &'a [u8],
    },
    Applied {
        group: GroupId,
        bytes: &'a [u8],
    },
    Forget {
        group: GroupId,
        bytes: &'a [u8],
    },
    Void {
        group: GroupId,
        bytes: &'a [u8],
    },
    /// The marker at the start of a flush (format version 3 on).
    Flush {
        segment: u64,
        number: u64,
    },
}

/// One step of reading a segment.
#[derive(Debug, PartialEq)]
pub enum Step<'a> {
    Record(Decoded<'a>),
    /// Zero padding up to the next sector.
    Padding,
    /// End of the data: the bytes here are not a valid record (a torn or never-written tail,
    /// or corruption; the caller decides which from where it is).
    Invalid(String),
    End,
}

/// Reads the record at `pos` (records are never larger than `record_bytes_max`). Returns the
/// step and the position after it.
pub fn decode_at(buf: &[u8], pos: usize, record_bytes_max: usize) -> (Step<'_>, usize) {
    if pos >= buf.len() {
        return (Step::End, pos);
    }
    if buf.len() - pos < 4 {
        return (Step::Invalid("a record length is cut off".into()), pos);
    }
    let len = u32::from_le_bytes(buf[pos..pos + 4].try_into().unwrap()) as usize;
    if len == 0 {
        // Every flush starts at a sector boundary with a record; padding only ever follows a
        // record inside its sector. Zeros at a boundary are a torn (or never written) flush.
        if pos.is_multiple_of(SECTOR_BYTES) {
            return (Step::Invalid("zeros where a flush should begin".into()), pos);
        }
        let next = (pos / SECTOR_BYTES + 1) * SECTOR_BYTES;
        if buf[pos..next.min(buf.len())].iter().any(|&b| b != 0) {
            return (Step::Invalid("non-zero bytes in padding".into()), pos);
        }
        return (Step::Padding, next);
    }
    if len < RECORD_PREFIX_BYTES - 4 || len > record_bytes_max {
        return (Step::Invalid(format!("record length {len} out of range")), pos);
    }
    let end = pos + 4 + len;
    if end > buf.len() || !pos.is_multiple_of(RECORD_ALIGN_BYTES) {
        return (Step::Invalid(format!("record of {len} bytes runs past the end of the segment")), pos);
    }
    let record = &buf[pos..end];
    if crc32fast::hash(&record[8..]) != u32::from_le_bytes(record[4..8].try_into().unwrap()) {
        return (Step::Invalid("record checksum mismatch".into()), pos);
    }
    let group = u32::from_le_bytes(record[9..13].try_into().unwrap());
    let body = &record[RECORD_PREFIX_BYTES..];
    let u64_at = |at: usize| body.get(at..at + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    let decoded = match record[8] {
        TYPE_ENTRY => match (u64_at(0), u64_at(8)) {
            (Some(index), Some(term)) => Decoded::Entry { group, index, term, payload: &body[16..] },
            _ => return (Step::Invalid("entry record too short".into()), pos),
        },
        TYPE_TRUNCATE => match u64_at(0) {
            Some(from_index) => Decoded::Truncate { group, from_index },
            None => return (Step::Invalid("truncate record too short".into()), pos),
        },
        TYPE_PURGE => match (u64_at(0), u64_at(8)) {
            (Some(upto_index), Some(upto_term)) => Decoded::Purge { group, upto_index, upto_term },
            _ => return (Step::Invalid("purge record too short".into()), pos),
        },
        TYPE_VOTE => Decoded::Vote { group, bytes: body },
        TYPE_COMMITTED => Decoded::Committed { group, bytes: body },
        TYPE_APPLIED => Decoded::Applied { group, bytes: body },
        TYPE_FORGET => Decoded::Forget { group, bytes: body },
        TYPE_VOID => Decoded::Void { group, bytes: body },
        TYPE_FLUSH => match (u64_at(0), u64_at(8)) {
            (Some(segment), Some(number)) => Decoded::Flush { segment, number },
            _ => return (Step::Invalid("flush marker too short".into()), pos),
        },
        other => return (Step::Invalid(format!("unknown record type {other}")), pos),
    };
    (Step::Record(decoded), end.next_multiple_of(RECORD_ALIGN_BYTES))
}
