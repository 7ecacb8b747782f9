//! The journal workload: what a JMS server does with its journal. One writer process per file
//! appends records at 512-byte-aligned offsets and syncs each (fdatasync after the write, or
//! a file opened O_DSYNC); a record is acknowledged when the call returns. A restarted writer
//! scans the file for its last whole record and goes on after it, as a server recovering its
//! journal does.
//!
//! A record: magic, sequence number (from 1), payload length, CRC-32 of those and the payload,
//! the payload (the writing process's number, then random bytes), zeros up to the next
//! multiple of 512 bytes.
//!
//! The failover workload runs the same writer with `--lock`: it first waits for an exclusive
//! fcntl lock on that file (`L` when it has it), as a standby server waits for the live one's.
//!
//! The writer (`chunkcheck files-journal-writer`, started by the run) tells the run what it
//! does on stdout, one line each, before and after each call:
//! `R SEQ OFFSET` recovered, next record SEQ at OFFSET; `I SEQ OFFSET LEN CRC` about to write;
//! `A SEQ` written and synced; `E MESSAGE` a call failed (the writer exits 3).

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use anyhow::{Context, Result};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

pub const MAGIC: u32 = 0x4a53_4b43;
pub const HEADER_BYTES: usize = 20;
pub const SECTOR: u64 = 512;
/// Longest payload (a record then takes three sectors).
pub const PAYLOAD_BYTES_MAX: usize = 1400;
/// The writer's process number, first in the payload.
const WRITER_BYTES: usize = 8;

/// How a writer makes each record durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SyncMode {
    /// write, then fdatasync.
    Fdatasync,
    /// The file opened O_DSYNC: each write returns once durable.
    Dsync,
}

/// A record as written: where, how long, its CRC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Placed {
    pub seq: u64,
    pub offset: u64,
    pub len: u64,
    pub crc: u32,
}

/// The bytes of record `seq` of process `writer` seeded `seed`, and its CRC.
pub fn record(seed: u64, seq: u64, writer: u64) -> (Vec<u8>, u32) {
    let mut rng = SmallRng::seed_from_u64(seed ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let payload_len = rng.gen_range(WRITER_BYTES..=PAYLOAD_BYTES_MAX);
    let mut bytes = Vec::with_capacity(HEADER_BYTES + payload_len);
    bytes.extend_from_slice(&MAGIC.to_le_bytes());
    bytes.extend_from_slice(&seq.to_le_bytes());
    bytes.extend_from_slice(&(payload_len as u32).to_le_bytes());
    bytes.extend_from_slice(&[0; 4]);
    bytes.extend_from_slice(&writer.to_le_bytes());
    bytes.extend((WRITER_BYTES..payload_len).map(|_| rng.gen::<u8>()));
    let crc = crc_of(&bytes);
    bytes[16..20].copy_from_slice(&crc.to_le_bytes());
    bytes.resize((bytes.len() as u64).next_multiple_of(SECTOR) as usize, 0);
    (bytes, crc)
}

/// CRC-32 of a record's header (its CRC field left out) and payload.
fn crc_of(record: &[u8]) -> u32 {
    let payload_len = u32::from_le_bytes(record[12..16].try_into().expect("4 bytes")) as usize;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&record[..16]);
    hasher.update(&record[HEADER_BYTES..HEADER_BYTES + payload_len]);
    hasher.finalize()
}

/// What lies at `offset` of `file`.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// A whole record: its sequence number, CRC, length on disk, and writing process.
    Record { seq: u64, crc: u32, len: u64, writer: u64 },
    /// Nothing: the end of the file, or zeros to it (or for the next sector's worth).
    Absent,
    /// Bytes that are not a whole record, and how.
    Garbage(String),
}

/// Reads what is at `offset` of `data` (the whole file).
pub fn parse_at(data: &[u8], offset: u64) -> Found {
    let Some(rest) = usize::try_from(offset).ok().and_then(|at| data.get(at..)) else { return Found::Absent };
    if rest.is_empty() || rest.iter().take(SECTOR as usize).all(|&b| b == 0) {
        return Found::Absent;
    }
    let head: String = rest.iter().take(24).map(|b| format!("{b:02x}")).collect();
    if rest.len() < HEADER_BYTES || u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) != MAGIC {
        return Found::Garbage(format!("no record header ({} bytes to the end, starting {head})", rest.len()));
    }
    let seq = u64::from_le_bytes(rest[4..12].try_into().expect("8 bytes"));
    let payload_len = u32::from_le_bytes(rest[12..16].try_into().expect("4 bytes")) as usize;
    if !(WRITER_BYTES..=PAYLOAD_BYTES_MAX).contains(&payload_len) || rest.len() < HEADER_BYTES + payload_len {
        return Found::Garbage(format!("record {seq} of {payload_len} payload bytes cut short: {} bytes to the end", rest.len()));
    }
    let crc = u32::from_le_bytes(rest[16..20].try_into().expect("4 bytes"));
    if crc_of(rest) != crc {
        return Found::Garbage(format!("record {seq} of {payload_len} payload bytes fails its CRC"));
    }
    let writer = u64::from_le_bytes(rest[HEADER_BYTES..HEADER_BYTES + WRITER_BYTES].try_into().expect("8 bytes"));
    Found::Record { seq, crc, len: ((HEADER_BYTES + payload_len) as u64).next_multiple_of(SECTOR), writer }
}

/// What a writer process is told.
pub struct WriterOptions {
    pub file: std::path::PathBuf,
    pub sync: SyncMode,
    pub seed: u64,
    /// Its process number in the run's history, written in each record.
    pub writer: u64,
    /// Wait for an exclusive fcntl lock on this file first (failover).
    pub lock: Option<std::path::PathBuf>,
    /// Refuse to write unless the file is on a FUSE mount.
    pub on_fuse: bool,
    /// Refuse to write unless libchunkpreload serves the file.
    pub on_preload: bool,
}

/// The writer process: (takes its lock,) recovers the journal's end, then appends until killed.
pub fn run_writer(options: &WriterOptions) -> Result<()> {
    let WriterOptions { file, sync, seed, writer, on_fuse, on_preload, .. } = options;
    let (sync, seed, writer) = (*sync, *seed, *writer);
    let mut out = std::io::stdout().lock();
    let mut say = |line: String| -> Result<()> {
        writeln!(out, "{line}")?;
        out.flush().context("telling the run")
    };
    let result = (|| -> Result<()> {
        // Held until the process ends (its descriptor stays open).
        let _lock = match &options.lock {
            Some(path) => {
                let held = lock_exclusive(path)?;
                say("L".into())?;
                Some(held)
            }
            None => None,
        };
        let mut options = std::fs::OpenOptions::new();
        options.read(true).write(true).create(true);
        if sync == SyncMode::Dsync {
            options.custom_flags(libc::O_DSYNC);
        }
        let journal = options.open(file).with_context(|| format!("opening {}", file.display()))?;
        // A writer started as its mount was killed could open the bare mountpoint directory's
        // file: what it acknowledged would never reach the cluster.
        if *on_fuse && filesystem_type(&journal)? != FUSE_SUPER_MAGIC {
            anyhow::bail!("{} is not on a FUSE mount", file.display());
        }
        // One started without the shim loaded would write a local file nobody checks.
        if *on_preload && filesystem_type(&journal)? != chunkfiles::PRELOAD_FS_TYPE {
            anyhow::bail!("{} is not served by libchunkpreload", file.display());
        }
        let (mut seq, mut offset) = recover(&journal)?;
        say(format!("R {seq} {offset}"))?;
        loop {
            let (bytes, crc) = record(seed, seq, writer);
            say(format!("I {seq} {offset} {} {crc}", bytes.len()))?;
            journal.write_all_at(&bytes, offset).with_context(|| format!("writing record {seq} at {offset}"))?;
            if sync == SyncMode::Fdatasync {
                journal.sync_data().with_context(|| format!("fdatasync after record {seq}"))?;
            }
            say(format!("A {seq}"))?;
            offset += bytes.len() as u64;
            seq += 1;
        }
    })();
    if let Err(err) = &result {
        let _ = say(format!("E {err:#}"));
    }
    result
}

/// Waits for an exclusive fcntl lock on the whole of `path` (created if need be).
fn lock_exclusive(path: &Path) -> Result<File> {
    use std::os::fd::AsRawFd;
    let file =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock is plain data.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: a valid descriptor and a valid flock; F_SETLKW blocks until granted.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLKW, &lock) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("locking {}", path.display()));
    }
    Ok(file)
}

const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// The type of the filesystem `file` is on, as fstatfs says.
fn filesystem_type(file: &File) -> Result<i64> {
    use std::os::fd::AsRawFd;
    // SAFETY: statfs is plain data, filled by the call on success.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a valid pointer.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error()).context("fstatfs");
    }
    Ok(stat.f_type as i64)
}

/// The next record's sequence number and offset: after the last of the whole records that
/// follow each other from the start.
fn recover(journal: &File) -> Result<(u64, u64)> {
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut &*journal, &mut data).context("reading the journal to recover")?;
    let (mut seq, mut offset) = (1, 0);
    while let Found::Record { seq: found, len, .. } = parse_at(&data, offset) {
        if found != seq {
            break;
        }
        seq += 1;
        offset += len;
    }
    Ok((seq, offset))
}

/// What the check of one journal found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FileVerdict {
    pub file: String,
    pub sync: Option<SyncMode>,
    pub bytes: u64,
    /// Acknowledged records.
    pub acked: u64,
    /// Whole records from the start, one after another.
    pub records: u64,
    /// Who wrote them: (process, records in a row), in file order.
    pub writer_runs: Vec<(u64, u64)>,
    /// Acknowledged records missing (nothing where they were written).
    pub lost: Vec<Placed>,
    /// Acknowledged records whose place holds something else, and bytes that are not a whole
    /// record before the end of the journal.
    pub corrupt: Vec<String>,
}

/// Checks a journal's bytes against the records acknowledged for it: each is there, whole,
/// where it was written, in order from the start; after the last whole record there is
/// nothing (a record not acknowledged is there whole or not at all).
pub fn check_file(name: &str, data: &[u8], acked: &[Placed]) -> FileVerdict {
    let mut verdict = FileVerdict { file: name.to_owned(), bytes: data.len() as u64, acked: acked.len() as u64, ..Default::default() };
    // The chain: whole records one after another from the start.
    let (mut seq, mut chain_end) = (1, 0);
    loop {
        match parse_at(data, chain_end) {
            Found::Record { seq: found, len, writer, .. } if found == seq => {
                seq += 1;
                chain_end += len;
                match verdict.writer_runs.last_mut() {
                    Some((last, count)) if *last == writer => *count += 1,
                    _ => verdict.writer_runs.push((writer, 1)),
                }
            }
            Found::Record { seq: found, .. } => {
                verdict.corrupt.push(format!("record {found} at {chain_end} where record {seq} belongs"));
                break;
            }
            Found::Garbage(how) => {
                verdict.corrupt.push(format!("bytes at {chain_end} (after record {}) are not a whole record: {how}", seq - 1));
                break;
            }
            Found::Absent => break,
        }
    }
    verdict.records = seq - 1;
    // Past the chain: only zeros to the end.
    if verdict.corrupt.is_empty() {
        if let Some(at) = data.iter().skip(chain_end as usize).position(|&b| b != 0) {
            verdict.corrupt.push(format!("bytes at {}, past the last whole record (which ends at {chain_end})", chain_end + at as u64));
        }
    }
    for placed in acked {
        match parse_at(data, placed.offset) {
            Found::Record { seq, crc, .. } if seq == placed.seq && crc == placed.crc => {}
            // Damage where it was written, past the whole records.
            Found::Garbage(how) if placed.offset >= chain_end => {
                verdict.corrupt.push(format!("acknowledged record {} at {}: {how}", placed.seq, placed.offset))
            }
            // Nothing there, or records written later over its place (a writer that recovered
            // a journal without it went on from an earlier end).
            _ => verdict.lost.push(*placed),
        }
    }
    verdict
}

/// A process that took the failover lock, and the sequence number of the first record it set
/// out to write (none if it wrote nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    pub process: u64,
    pub first_seq: Option<u64>,
}

/// Records written by a lock holder after a later holder had started (failover). `holders`:
/// the processes in the order they took the lock. A journal only grows, and each holder goes on
/// from the end of what the ones before it wrote, so with fencing every record of a holder has
/// a lower sequence number than the first record any later holder set out to write, and lies
/// below every later holder's records. A whole record at a 512-byte boundary is a dual write if
/// its writer never took the lock, if its sequence number is at or past the first of a later
/// holder (an old holder that woke up and wrote over its successor's records from where it had
/// stopped: the file reads as one clean chain, but not one its holders could have written), or
/// if it lies past a record of a later holder (records found past a chain the old holder
/// broke count too).
pub fn dual_writes(data: &[u8], holders: &[Holder]) -> u64 {
    // For each holder, the lowest first sequence number of the holders after it.
    let mut limits = vec![u64::MAX; holders.len()];
    let mut lowest_after = u64::MAX;
    for (epoch, holder) in holders.iter().enumerate().rev() {
        limits[epoch] = lowest_after;
        lowest_after = lowest_after.min(holder.first_seq.unwrap_or(u64::MAX));
    }
    let epoch = |writer: u64| holders.iter().position(|h| h.process == writer);
    let (mut latest, mut dual) = (0, 0);
    let mut offset = 0;
    while offset < data.len() as u64 {
        match parse_at(data, offset) {
            Found::Record { writer, len, seq, .. } => {
                match epoch(writer) {
                    Some(e) if e >= latest && seq < limits[e] => latest = e,
                    _ => dual += 1,
                }
                offset += len;
            }
            _ => offset += SECTOR,
        }
    }
    dual
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(records: u64) -> (Vec<u8>, Vec<Placed>) {
        let (mut data, mut placed) = (Vec::new(), Vec::new());
        for seq in 1..=records {
            let (bytes, crc) = record(7, seq, 1);
            placed.push(Placed { seq, offset: data.len() as u64, len: bytes.len() as u64, crc });
            data.extend_from_slice(&bytes);
        }
        (data, placed)
    }

    #[test]
    fn a_whole_journal_passes_and_an_unacknowledged_whole_tail_is_allowed() {
        let (data, placed) = journal(20);
        let verdict = check_file("j", &data, &placed[..18]);
        assert!(verdict.lost.is_empty() && verdict.corrupt.is_empty(), "{verdict:?}");
        assert_eq!(verdict.records, 20);
        let mut padded = data.clone();
        padded.extend_from_slice(&[0; 4096]);
        assert!(check_file("j", &padded, &placed).corrupt.is_empty());
    }

    #[test]
    fn a_missing_acknowledged_record_is_lost() {
        let (data, placed) = journal(20);
        let cut = &data[..placed[15].offset as usize];
        let verdict = check_file("j", cut, &placed);
        assert_eq!(verdict.lost.iter().map(|p| p.seq).collect::<Vec<_>>(), (16..=20).collect::<Vec<_>>());
        assert!(verdict.corrupt.is_empty());
    }

    #[test]
    fn an_acknowledged_record_written_over_by_a_later_one_is_lost() {
        let (data, placed) = journal(20);
        let mut rewritten = data[..placed[15].offset as usize].to_vec();
        for seq in 16..=20 {
            rewritten.extend_from_slice(&record(8, seq, 2).0);
        }
        let verdict = check_file("j", &rewritten, &placed);
        assert_eq!(verdict.lost.len(), 5, "{verdict:?}");
        assert!(verdict.corrupt.is_empty(), "{verdict:?}");
    }

    #[test]
    fn damage_in_the_middle_or_a_torn_tail_is_corrupt() {
        let (mut data, placed) = journal(20);
        let middle = placed[10].offset as usize + 30;
        data[middle] ^= 0xff;
        let verdict = check_file("j", &data, &placed);
        assert!(verdict.corrupt.len() >= 2, "the damaged record and the chain broken there: {verdict:?}");
        let (data, placed) = journal(20);
        let torn = &data[..placed[19].offset as usize + 100];
        let verdict = check_file("j", torn, &placed[..19]);
        assert_eq!(verdict.corrupt.len(), 1, "{verdict:?}");
        assert!(verdict.lost.is_empty());
    }

    #[test]
    fn a_record_of_an_earlier_holder_after_a_later_ones_is_a_dual_write() {
        let mut data = Vec::new();
        for (seq, writer) in [(1, 4), (2, 4), (3, 7), (4, 7), (5, 9)] {
            data.extend_from_slice(&record(1, seq, writer).0);
        }
        let holders = |order: [(u64, u64); 3]| order.map(|(process, first)| Holder { process, first_seq: Some(first) });
        assert_eq!(dual_writes(&data, &holders([(4, 1), (7, 3), (9, 5)])), 0);
        assert_eq!(dual_writes(&data, &holders([(4, 1), (9, 5), (7, 3)])), 1, "9 wrote after 7 had taken over");
        // An old holder's late record over the new holder's, breaking the chain: found anyway.
        let mut late = data.clone();
        late.extend_from_slice(&[0xee; 1024]);
        late.extend_from_slice(&record(2, 6, 4).0);
        assert_eq!(dual_writes(&late, &holders([(4, 1), (7, 3), (9, 5)])), 1);
        // A holder that took the lock and wrote nothing sets no limit.
        let quiet = [
            Holder { process: 4, first_seq: Some(1) },
            Holder { process: 5, first_seq: None },
            Holder { process: 7, first_seq: Some(3) },
            Holder { process: 9, first_seq: Some(5) },
        ];
        assert_eq!(dual_writes(&data, &quiet), 0);
    }

    /// The case a ten-second pause found: the old holder wakes up and goes on from where it
    /// stopped, over every record its successor wrote, and the successor's next instance then
    /// recovers the old holder's chain. The file is one clean chain; the sequence numbers give
    /// it away.
    #[test]
    fn an_old_holder_writing_over_its_successor_from_where_it_stopped_is_a_dual_write() {
        let mut data = Vec::new();
        for (seq, writer) in [(1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (6, 7), (7, 7)] {
            data.extend_from_slice(&record(1, seq, writer).0);
        }
        let holders = [Holder { process: 0, first_seq: Some(1) }, Holder { process: 3, first_seq: Some(3) }, Holder { process: 7, first_seq: Some(6) }];
        assert_eq!(dual_writes(&data, &holders), 3, "0's records 3, 4 and 5 came after 3 had taken over");
    }

    #[test]
    fn recovery_goes_on_after_the_last_whole_record() {
        let (data, placed) = journal(5);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        std::fs::write(&path, &data[..placed[4].offset as usize + 7]).unwrap();
        assert_eq!(recover(&File::open(&path).unwrap()).unwrap(), (5, placed[4].offset));
    }
}
