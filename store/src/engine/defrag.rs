//! Defragmentation: blocks whose live bytes fell below `defrag-lwm-pct` are emptied by
//! appending their live records again (same seq, so nothing changes order), and freed once
//! those copies are durable.
//!
//! Crash safety, step by step:
//! 1. copies are appended through the normal write path; until they are durable the old
//!    block still holds the originals (same seq: either copy wins at start-up, both are equal);
//! 2. the block's header is rewritten as "free" and synced only after the copies are durable;
//!    from then on its records are ignored at start-up (their epoch no longer matches);
//! 3. a tombstone is dropped instead of copied only when no dirty block could hold an older
//!    version of its record, so no crash can bring a deleted record back.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::state::{BlockState, Purpose};
use super::{EngineEvent, Inner};
use crate::device::SECTOR_BYTES;
use crate::error::{Error, Result};
use crate::format::{BlockHeader, BlockItem, BlockWalker, BLOCK_HEADER_BYTES, BLOCK_STATE_FREE, BLOCK_TRAILER_BYTES};

/// Blocks emptied per pass before sleeping again.
const BLOCKS_PER_PASS_MAX: usize = 8;

impl Inner {
    pub(crate) fn run_defrag(self: Arc<Self>) {
        let sleep = Duration::from_millis(self.config.defrag_sleep_ms);
        loop {
            {
                let st = self.state.lock().unwrap();
                if self.is_shutting_down() {
                    return;
                }
                let (st, _) = self.background_wakeup.wait_timeout(st, sleep).unwrap();
                if self.is_shutting_down() {
                    return;
                }
                drop(st);
            }
            for (device, block) in self.defrag_candidates() {
                if self.is_shutting_down() {
                    return;
                }
                match self.defrag_block(device, block) {
                    Ok(()) => {}
                    Err(err @ Error::Corrupt { .. }) => {
                        // Leave the block out from now on and carry on with the others.
                        tracing::error!(%err, device, block, "block quarantined: defragmentation skips it until restart");
                        self.state.lock().unwrap().devices[device as usize].blocks[block as usize].state = BlockState::Quarantined;
                    }
                    Err(err) => {
                        tracing::error!(%err, device, block, "defragmentation stopped for this pass");
                        break;
                    }
                }
            }
        }
    }

    /// Full, durable blocks under the low-water mark, emptiest first.
    fn defrag_candidates(&self) -> Vec<(u16, u32)> {
        let usable = (self.config.write_block_size as usize - BLOCK_HEADER_BYTES - BLOCK_TRAILER_BYTES) as u64;
        let st = self.state.lock().unwrap();
        let mut candidates = Vec::new();
        for (d, dev) in st.devices.iter().enumerate() {
            if dev.poisoned.is_some() {
                continue;
            }
            for (b, info) in dev.blocks.iter().enumerate() {
                if info.state == BlockState::InUse && (info.live_bytes as u64) * 100 < usable * self.config.defrag_lwm_pct as u64 {
                    candidates.push((info.live_bytes, d as u16, b as u32));
                }
            }
        }
        candidates.sort_unstable();
        candidates.into_iter().take(BLOCKS_PER_PASS_MAX).map(|(_, d, b)| (d, b)).collect()
    }

    /// Empties one block and frees it. On error the block stays in use (nothing is lost).
    pub(crate) fn defrag_block(&self, device: u16, block: u32) -> Result<()> {
        let _forgets_wait = self.defrag_lock.lock().unwrap();
        let block_size = self.config.write_block_size as usize;
        let (epoch, min_dirty_seq) = {
            let mut st = self.state.lock().unwrap();
            let info = &mut st.devices[device as usize].blocks[block as usize];
            if info.state != BlockState::InUse {
                return Ok(());
            }
            info.state = BlockState::Defragging;
            let epoch = info.epoch;
            (epoch, st.min_dirty_seq_except(device, block))
        };
        self.observe(EngineEvent::DefragBlockStart { device, block });
        let result = self.move_live_records(device, block, epoch, min_dirty_seq, block_size);
        let (moved, dropped) = match result {
            Ok(counts) => counts,
            Err(err) => {
                // Back in use; a Corrupt error makes the caller quarantine it.
                self.state.lock().unwrap().devices[device as usize].blocks[block as usize].state = BlockState::InUse;
                return Err(err);
            }
        };
        // The copies must be durable before the originals stop counting; the free header
        // records how far (the start-up scan's proof that damage to a copy is a loss).
        let durable_lsn = {
            let st = self.state.lock().unwrap();
            let lsn = st.devices[device as usize].appended_lsn;
            drop(self.wait_durable(st, device, lsn)?);
            lsn
        };
        self.write_free_header(device, block, durable_lsn)?;
        let mut st = self.state.lock().unwrap();
        let dev = &mut st.devices[device as usize];
        let info = &mut dev.blocks[block as usize];
        assert_eq!(info.live_bytes, 0, "a defragmented block still has live records");
        *info = super::state::BlockInfo::free();
        dev.free.push_back(block);
        drop(st);
        self.stats.defrag_blocks.fetch_add(1, Ordering::Relaxed);
        self.stats.defrag_moved_records.fetch_add(moved as u64, Ordering::Relaxed);
        self.stats.tombstones_dropped.fetch_add(dropped as u64, Ordering::Relaxed);
        self.observe(EngineEvent::DefragBlockDone { device, block, moved_records: moved, dropped_tombstones: dropped });
        Ok(())
    }

    fn move_live_records(&self, device: u16, block: u32, epoch: u64, min_dirty_seq: u64, block_size: usize) -> Result<(u32, u32)> {
        let dev_io = &self.devices[device as usize];
        let mut buf = vec![0u8; block_size];
        dev_io.read_at(&mut buf, self.block_offset(block)).map_err(|e| Error::io(dev_io.path(), e))?;
        let (mut moved, mut dropped) = (0, 0);
        // The header tells where the records end (its version); a block whose header no longer
        // decodes is walked to its end (the index check below keeps what must be kept).
        let records_end = BlockHeader::decode(&buf).map_or(block_size, |h| h.records_end(block_size));
        for item in BlockWalker::new(&buf[..records_end], block, epoch) {
            let BlockItem::Record { offset, header, bytes } = item else {
                // A record of this block that fails its checksum now was either never live
                // (torn before start-up) or rotted on disk; the index check below decides.
                continue;
            };
            let _record_lock = self.record_lock(&header.digest);
            let mut st = self.state.lock().unwrap();
            let Some(entry) = st.index.get(&header.digest).copied() else { continue };
            if (entry.device, entry.block, entry.offset, entry.seq) != (device, block, offset as u32, header.seq) {
                continue;
            }
            if entry.tombstone && entry.seq < min_dirty_seq && self.tombstone_may_go(&header.digest, entry.seq) {
                st.remove(&header.digest);
                dropped += 1;
                continue;
            }
            if let Some(reason) = &st.devices[device as usize].poisoned {
                return Err(self.device_failed(device, reason));
            }
            let placed = self.append(&mut st, device, bytes, entry.seq, Purpose::Defrag)?;
            st.install(header.digest, super::state::IndexEntry { block: placed.block, offset: placed.offset, ..entry });
            moved += 1;
        }
        let st = self.state.lock().unwrap();
        let live = st.devices[device as usize].blocks[block as usize].live_bytes;
        if live != 0 {
            // An index entry points into this block at a record the walk did not find: the
            // block was damaged after start-up. Keep it (and its record) rather than lose it.
            return Err(Error::Corrupt {
                path: dev_io.path().to_owned(),
                offset: self.block_offset(block),
                what: format!("{live} live bytes in a block whose records no longer verify; block kept"),
            });
        }
        Ok((moved, dropped))
    }

    /// Marks the block free on the device (one sector, synced): its old records stop counting.
    /// `durable_lsn`: the device's log is durable up to there (see `BlockHeader::durable_lsn`).
    pub(crate) fn write_free_header(&self, device: u16, block: u32, durable_lsn: u64) -> Result<()> {
        let dev_io = &self.devices[device as usize];
        let mut sector = vec![0u8; SECTOR_BYTES];
        let header = BlockHeader {
            state: BLOCK_STATE_FREE,
            epoch: rand::random::<u64>() | 1,
            block_index: block,
            device_id: self.device_ids[device as usize],
            lsn_base: 0,
            version: crate::format::FORMAT_VERSION as u16,
            durable_lsn,
        };
        sector[..BLOCK_HEADER_BYTES].copy_from_slice(&header.encode());
        let _io_lock = self.io_locks[device as usize].lock().unwrap();
        let result = dev_io.write_at(&sector, self.block_offset(block)).and_then(|()| {
            if self.config.unsafe_skip_fsync {
                Ok(())
            } else {
                self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
                dev_io.sync()
            }
        });
        if let Err(err) = result {
            // Poisoned before the I/O lock is released, so the flusher cannot miss it.
            let reason = format!("freeing block {block} failed: {err}");
            let mut st = self.state.lock().unwrap();
            st.devices[device as usize].poisoned = Some(reason.clone());
            self.durable_wakeup.notify_all();
            return Err(self.device_failed(device, &reason));
        }
        Ok(())
    }
}
