//! A group's snapshot as a file, written and read one record at a time, so that neither
//! building, sending nor installing a snapshot holds the group's records in memory.
//!
//! Layout (all integers little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `CHKSNAP\0` |
//! | 4 | format version, 2 (version 1 files, without the fences item, are still read) |
//! | 4 + 4 + n | the exactly-once table: length n, CRC32 of the bytes, bincode bytes |
//! | 4 + 4 + n | the fenced lease sessions (`fences::Fences`), the same way |
//! | (4 + 4 + n)* | one item per record version: length n (1..=`ITEM_BYTES_MAX`), CRC32, bincode bytes |
//! | 4 + 8 + 4 | end: a zero length, the number of record items, CRC32 of those 8 bytes |
//!
//! Reading checks every length before allocating and every checksum, and a file that ends
//! before its end item is an error: a torn or damaged snapshot is refused, never half-installed
//! as if complete.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use crate::engine::RecordVersion;

use super::fences::Fences;
use super::sessions::Sessions;

const MAGIC: &[u8; 8] = b"CHKSNAP\0";
const VERSION: u32 = 2;
/// The largest item: a record (at most 8 MiB of bins) with room to spare; the table.
pub const ITEM_BYTES_MAX: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    #[error("snapshot file: {0}")]
    Io(#[from] std::io::Error),
    #[error("snapshot file is damaged: {0}")]
    Corrupt(String),
}

/// Writes a snapshot file: `new`, `record` for each version, `finish`.
pub struct SnapshotWriter {
    out: BufWriter<std::fs::File>,
    records: u64,
}

impl SnapshotWriter {
    pub fn create(path: &Path, sessions: &Sessions, fences: &Fences) -> Result<SnapshotWriter, SnapshotFileError> {
        let file = std::fs::OpenOptions::new().create_new(true).write(true).read(true).open(path)?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        let mut writer = SnapshotWriter { out, records: 0 };
        writer.item(&bincode::serialize(sessions).expect("sessions serialize"))?;
        writer.item(&bincode::serialize(fences).expect("fences serialize"))?;
        Ok(writer)
    }

    pub fn record(&mut self, version: &RecordVersion) -> Result<(), SnapshotFileError> {
        self.item(&bincode::serialize(version).expect("records serialize"))?;
        self.records += 1;
        Ok(())
    }

    /// Writes the end item; returns the number of records.
    pub fn finish(mut self) -> Result<u64, SnapshotFileError> {
        let count = self.records.to_le_bytes();
        self.out.write_all(&0u32.to_le_bytes())?;
        self.out.write_all(&count)?;
        self.out.write_all(&crc32fast::hash(&count).to_le_bytes())?;
        self.out.flush()?;
        Ok(self.records)
    }

    fn item(&mut self, bytes: &[u8]) -> Result<(), SnapshotFileError> {
        if bytes.is_empty() || bytes.len() > ITEM_BYTES_MAX {
            return Err(SnapshotFileError::Corrupt(format!("an item of {} bytes cannot be written", bytes.len())));
        }
        self.out.write_all(&(bytes.len() as u32).to_le_bytes())?;
        self.out.write_all(&crc32fast::hash(bytes).to_le_bytes())?;
        self.out.write_all(bytes)?;
        Ok(())
    }
}

/// Reads a snapshot file from its start: the tables, then the records one at a time.
pub struct SnapshotReader<R> {
    input: BufReader<R>,
    records: u64,
    done: bool,
}

impl<R: Read> SnapshotReader<R> {
    pub fn open(input: R) -> Result<(Sessions, Fences, SnapshotReader<R>), SnapshotFileError> {
        let mut input = BufReader::with_capacity(1 << 20, input);
        let mut head = [0u8; 12];
        input.read_exact(&mut head).map_err(|e| truncated("header", e))?;
        if &head[..8] != MAGIC {
            return Err(SnapshotFileError::Corrupt("not a chunkstore snapshot (bad magic)".into()));
        }
        let version = u32::from_le_bytes(head[8..12].try_into().unwrap());
        if version != VERSION && version != 1 {
            return Err(SnapshotFileError::Corrupt(format!("snapshot format version {version}, this build reads {VERSION}")));
        }
        let mut reader = SnapshotReader { input, records: 0, done: false };
        let bytes = reader.item()?.ok_or_else(|| SnapshotFileError::Corrupt("no session table".into()))?;
        let sessions = bincode::deserialize(&bytes).map_err(|e| SnapshotFileError::Corrupt(format!("session table: {e}")))?;
        let fences = match version {
            1 => Fences::default(),
            _ => {
                let bytes = reader.item()?.ok_or_else(|| SnapshotFileError::Corrupt("no fences table".into()))?;
                bincode::deserialize(&bytes).map_err(|e| SnapshotFileError::Corrupt(format!("fences table: {e}")))?
            }
        };
        Ok((sessions, fences, reader))
    }

    /// The next record, or `None` after the last (once the end item has been checked).
    pub fn next_record(&mut self) -> Result<Option<RecordVersion>, SnapshotFileError> {
        if self.done {
            return Ok(None);
        }
        match self.item()? {
            Some(bytes) => {
                let version = bincode::deserialize(&bytes).map_err(|e| SnapshotFileError::Corrupt(format!("record {}: {e}", self.records)))?;
                self.records += 1;
                Ok(Some(version))
            }
            None => {
                self.done = true;
                Ok(None)
            }
        }
    }

    /// An item's bytes, or `None` at a valid end item.
    fn item(&mut self) -> Result<Option<Vec<u8>>, SnapshotFileError> {
        let mut prefix = [0u8; 8];
        self.input.read_exact(&mut prefix[..4]).map_err(|e| truncated("item length", e))?;
        let len = u32::from_le_bytes(prefix[..4].try_into().unwrap()) as usize;
        if len == 0 {
            let mut end = [0u8; 12];
            self.input.read_exact(&mut end).map_err(|e| truncated("end", e))?;
            let count = u64::from_le_bytes(end[..8].try_into().unwrap());
            if crc32fast::hash(&end[..8]) != u32::from_le_bytes(end[8..].try_into().unwrap()) {
                return Err(SnapshotFileError::Corrupt("end item checksum mismatch".into()));
            }
            if count != self.records {
                return Err(SnapshotFileError::Corrupt(format!("end item counts {count} records, the file has {}", self.records)));
            }
            return Ok(None);
        }
        if len > ITEM_BYTES_MAX {
            return Err(SnapshotFileError::Corrupt(format!("item of {len} bytes (limit {ITEM_BYTES_MAX})")));
        }
        self.input.read_exact(&mut prefix[4..]).map_err(|e| truncated("item checksum", e))?;
        let mut bytes = vec![0u8; len];
        self.input.read_exact(&mut bytes).map_err(|e| truncated("item", e))?;
        if crc32fast::hash(&bytes) != u32::from_le_bytes(prefix[4..].try_into().unwrap()) {
            return Err(SnapshotFileError::Corrupt(format!("checksum mismatch in item {}", self.records)));
        }
        Ok(Some(bytes))
    }
}

fn truncated(what: &str, err: std::io::Error) -> SnapshotFileError {
    match err.kind() {
        std::io::ErrorKind::UnexpectedEof => SnapshotFileError::Corrupt(format!("file ends inside the {what}")),
        _ => SnapshotFileError::Io(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::{Bin, RecordMeta};
    use crate::Value;

    fn version(i: u8) -> RecordVersion {
        RecordVersion {
            set: "s".into(),
            digest: [i; 20],
            bins: vec![Bin::new("b", Value::Bytes(vec![i; 100]))],
            meta: RecordMeta { generation: 1, void_time_secs: 0, last_update_ms: 5 },
            seq: i as u64,
            tombstone: false,
        }
    }

    fn write(path: &Path, n: u8) {
        let mut fences = Fences::default();
        fences.fence(7, true, 3);
        let mut writer = SnapshotWriter::create(path, &Sessions::default(), &fences).unwrap();
        for i in 0..n {
            writer.record(&version(i)).unwrap();
        }
        assert_eq!(writer.finish().unwrap(), n as u64);
    }

    fn read_all(bytes: &[u8]) -> Result<Vec<RecordVersion>, SnapshotFileError> {
        let (_, fences, mut reader) = SnapshotReader::open(bytes)?;
        assert!(fences.is_released(7) && fences.is_fenced(2) && !fences.is_fenced(8));
        let mut out = Vec::new();
        while let Some(v) = reader.next_record()? {
            out.push(v);
        }
        Ok(out)
    }

    #[test]
    fn round_trip_and_every_truncation_or_flipped_byte_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.snap");
        write(&path, 5);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(read_all(&bytes).unwrap(), (0..5).map(version).collect::<Vec<_>>());
        for cut in 0..bytes.len() {
            assert!(read_all(&bytes[..cut]).is_err(), "a file cut at {cut} of {} bytes was accepted", bytes.len());
        }
        for at in (0..bytes.len()).step_by(7) {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x40;
            assert!(read_all(&damaged).is_err(), "a flipped byte at {at} was accepted");
        }
        // An absurd length is refused before allocating.
        let mut huge = bytes[..12].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read_all(&huge), Err(SnapshotFileError::Corrupt(_))));
    }
}
