//! The disk nemesis: random regions of a stopped node's engine devices overwritten with random
//! bytes. Only blocks that hold records are hit, inside the part of each block that was
//! written (and sometimes the block's header or trailer), so every fault damages data. And the
//! wal-corrupt nemesis: one byte flipped in a record of a stopped node's WAL that a synced
//! flush follows.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use chunkstore::format::{BlockHeader, DeviceHeader, BLOCK_STATE_IN_USE, BLOCK_TRAILER_BYTES, DEVICE_HEADER_BYTES};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

/// Regions overwritten per block that holds records.
const REGIONS_PER_BLOCK: usize = 4;

/// One overwritten region.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Corruption {
    pub node: u64,
    pub file: PathBuf,
    pub offset: u64,
    pub len: u64,
}

/// The engine device files of a node's data directory (`*.dat`).
fn device_files(data_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(data_dir)
        .with_context(|| format!("listing {}", data_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "dat"))
        .collect();
    files.sort();
    Ok(files)
}

/// Overwrites `REGIONS_PER_BLOCK` regions (512 bytes to 4 KiB each) of every block holding
/// records on node `node`'s devices in `data_dir` with random bytes, chosen by `seed`, and
/// syncs them. Returns what it overwrote (nothing when no block holds records yet).
pub fn corrupt_devices(node: u64, data_dir: &Path, seed: u64) -> Result<Vec<Corruption>> {
    let mut rng = SmallRng::seed_from_u64(seed);
    // (file, block offset, written length of the block)
    let mut written = Vec::new();
    for path in device_files(data_dir)? {
        let mut file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut head = [0u8; DEVICE_HEADER_BYTES];
        file.read_exact(&mut head)?;
        let Some(device) = DeviceHeader::decode(&head, &path)? else { continue };
        let block_size = device.block_size as usize;
        let mut buf = vec![0u8; block_size];
        for block in 1..device.device_len / block_size as u64 {
            file.seek(SeekFrom::Start(block * block_size as u64))?;
            file.read_exact(&mut buf)?;
            if BlockHeader::decode(&buf).is_none_or(|h| h.state != BLOCK_STATE_IN_USE) {
                continue;
            }
            let records_end = block_size - BLOCK_TRAILER_BYTES;
            let used = buf[..records_end].iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            written.push((path.clone(), block * block_size as u64, used as u64, block_size as u64));
        }
    }
    let mut done = Vec::new();
    let regions = written.iter().flat_map(|w| std::iter::repeat_n(w.clone(), REGIONS_PER_BLOCK)).collect::<Vec<_>>();
    for (path, block_at, used, block_size) in regions {
        let len = rng.gen_range(512..=4096u64).min(block_size);
        // Mostly inside the written records; now and then over the header or the trailer.
        let offset = match rng.gen_range(0..10) {
            0 => block_at,
            1 => block_at + block_size - BLOCK_TRAILER_BYTES as u64,
            _ => block_at + rng.gen_range(0..used.max(1)),
        };
        let len = len.min(block_at + block_size - offset);
        let mut bytes = vec![0u8; len as usize];
        rng.fill_bytes(&mut bytes);
        let mut file = std::fs::OpenOptions::new().write(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
        file.seek(SeekFrom::Start(offset))?;
        file.write_all(&bytes)?;
        file.sync_data()?;
        done.push(Corruption { node, file: path, offset, len });
    }
    Ok(done)
}

/// Flips one byte inside a record (under its checksum) of node `node`'s newest WAL segment
/// holding records, chosen by `seed` among the records that a later flush's marker follows, so
/// that the damage is corruption, not a torn tail. None when no such record exists yet.
pub fn corrupt_wal(node: u64, data_dir: &Path, seed: u64) -> Result<Option<Corruption>> {
    use chunkstore::wal::format::{decode_at, Decoded, Step, SEGMENT_HEADER_BYTES};
    let wal = data_dir.join("wal");
    let mut segments: Vec<PathBuf> = match std::fs::read_dir(&wal) {
        Ok(entries) => entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "log")).collect(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("listing {}", wal.display())),
    };
    segments.sort();
    for path in segments.into_iter().rev() {
        let mut data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        // (offset, length under the checksum) of each record; offsets of the flush markers.
        let (mut records, mut markers, mut pos) = (Vec::new(), Vec::new(), SEGMENT_HEADER_BYTES);
        loop {
            match decode_at(&data, pos, 16 << 20) {
                (Step::Record(Decoded::Flush { .. }), next) => {
                    markers.push(pos);
                    pos = next;
                }
                (Step::Record(_), next) => {
                    let len = u32::from_le_bytes(data[pos..pos + 4].try_into().expect("4 bytes")) as usize;
                    records.push((pos, len));
                    pos = next;
                }
                (Step::Padding, next) => pos = next,
                _ => break,
            }
        }
        let last_marker = match markers.last() {
            Some(&at) => at,
            None if records.is_empty() => continue,
            None => return Ok(None),
        };
        let damageable: Vec<(usize, usize)> = records.into_iter().filter(|&(at, _)| at < last_marker).collect();
        if damageable.is_empty() {
            return Ok(None);
        }
        let mut rng = SmallRng::seed_from_u64(seed);
        let (at, len) = damageable[rng.gen_range(0..damageable.len())];
        // Bytes 8.. of a record are under its checksum (its length field would do too).
        let offset = at + rng.gen_range(8..4 + len);
        data[offset] ^= 1 << rng.gen_range(0..8);
        let mut file = std::fs::OpenOptions::new().write(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
        file.seek(SeekFrom::Start(offset as u64))?;
        file.write_all(&data[offset..offset + 1])?;
        file.sync_all()?;
        return Ok(Some(Corruption { node, file: path, offset: offset as u64, len: 1 }));
    }
    Ok(None)
}
