//! The disk nemesis: random regions of a stopped node's engine devices overwritten with random
//! bytes. Only blocks that hold records are hit, inside the part of each block that was
//! written (and sometimes the block's header or trailer), so every fault damages data.

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
