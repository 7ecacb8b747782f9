//! The write path below the index: appending records to a device's streaming write buffer,
//! sealing full blocks, and the per-device flusher thread that turns everything appended so
//! far into one write plus one fdatasync (group commit).
//!
//! Invariant: **a flush writes only whole sectors that no earlier flush wrote**. After each hand
//! -off the buffer's append position moves up to the next sector boundary, so a torn write can
//! only damage bytes that were never acknowledged.

use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use super::state::{BlockInfo, BlockState, Purpose, SealedBlock, State, WriteBuffer};
use super::{EngineEvent, Inner};
use crate::device::SECTOR_BYTES;
use crate::error::{Error, Result};
use crate::format::{align_up, seal_record, BlockHeader, BlockTrailer, BLOCK_HEADER_BYTES, BLOCK_STATE_IN_USE, BLOCK_TRAILER_BYTES, RECORD_ALIGN_BYTES};

/// Where an appended record landed.
pub(crate) struct Placement {
    pub block: u32,
    pub offset: u32,
    /// Log position at which the record is durable.
    pub lsn_end: u64,
}

impl Inner {
    /// Copies an encoded record into `device`'s write buffer and stamps `seq`, the block epoch
    /// and the CRC into the copy. Opens a new block when the record does not fit.
    /// `purpose` decides how far into the reserve of free blocks the append may go.
    pub(crate) fn append(&self, st: &mut State, device: u16, record: &[u8], seq: u64, purpose: Purpose) -> Result<Placement> {
        let block_size = self.config.write_block_size as usize;
        let need = align_up(record.len(), RECORD_ALIGN_BYTES);
        let records_end = block_size - BLOCK_TRAILER_BYTES;
        assert!(need <= records_end - BLOCK_HEADER_BYTES, "record size is checked against the block size first");
        let fits = st.devices[device as usize].buffer.as_ref().is_some_and(|b| b.len + need <= records_end);
        if !fits {
            self.seal(st, device);
            self.open_block(st, device, purpose)?;
        }
        let dev = &mut st.devices[device as usize];
        let buffer = dev.buffer.as_mut().expect("a buffer is open");
        let at = buffer.len;
        buffer.buf[at..at + record.len()].copy_from_slice(record);
        seal_record(&mut buffer.buf[at..at + record.len()], seq, buffer.epoch, buffer.block, at);
        buffer.len += need;
        buffer.records += 1;
        let placement = Placement { block: buffer.block, offset: at as u32, lsn_end: buffer.lsn_base + (at + record.len()) as u64 };
        dev.appended_lsn = buffer.lsn_base + buffer.len as u64;
        let info = &mut dev.blocks[buffer.block as usize];
        info.used_bytes += record.len() as u32;
        info.min_seq = info.min_seq.min(seq);
        if dev.first_unflushed_at.is_none() {
            dev.first_unflushed_at = Some(Instant::now());
            // The flusher may be asleep with nothing to wait for: it must start the
            // flush-max-ms timer now, not when its idle wait ends.
            self.flush_wakeups[device as usize].notify_one();
        }
        Ok(placement)
    }

    /// Closes the open buffer (if any): its unflushed tail and its trailer (in the last sector,
    /// which no earlier flush wrote) go to the flusher's queue.
    fn seal(&self, st: &mut State, device: u16) {
        let block_size = self.config.write_block_size as usize;
        let dev = &mut st.devices[device as usize];
        let Some(mut buffer) = dev.buffer.take() else { return };
        let trailer = BlockTrailer { used_len: buffer.len as u32, records: buffer.records };
        let trailer_at = block_size - BLOCK_TRAILER_BYTES;
        buffer.buf[trailer_at..trailer_at + BlockTrailer::BYTES].copy_from_slice(&trailer.encode(buffer.block, buffer.epoch));
        let to = align_up(buffer.len, SECTOR_BYTES).min(trailer_at);
        let lsn_end = buffer.lsn_base + block_size as u64;
        dev.appended_lsn = lsn_end;
        dev.blocks[buffer.block as usize].state = BlockState::Sealed;
        dev.sealed.push(SealedBlock { block: buffer.block, buf: Arc::new(buffer.buf), from: buffer.flushed, to, lsn_end, handed: false });
        self.flush_wakeups[device as usize].notify_one();
    }

    fn open_block(&self, st: &mut State, device: u16, purpose: Purpose) -> Result<()> {
        let block_size = self.config.write_block_size as usize;
        // Random, never derived from seq: after a crash, a block reopened under a new epoch can
        // never make records of an earlier, partly persisted life of the block valid again.
        let epoch = rand::random::<u64>() | 1;
        let dev = &mut st.devices[device as usize];
        if dev.free.len() <= purpose.free_blocks_floor() {
            return Err(Error::DeviceFull { path: self.devices[device as usize].path().to_owned() });
        }
        // Running low on free blocks: wake defragmentation rather than wait for its timer.
        if dev.available_pct() < self.config.min_avail_pct as u64 + 10 {
            self.background_wakeup.notify_all();
        }
        let Some(block) = dev.free.pop_front() else {
            return Err(Error::DeviceFull { path: self.devices[device as usize].path().to_owned() });
        };
        let mut buf = vec![0u8; block_size];
        let header = BlockHeader {
            state: BLOCK_STATE_IN_USE,
            epoch,
            block_index: block,
            device_id: self.device_ids[device as usize],
            lsn_base: dev.appended_lsn,
            version: crate::format::FORMAT_VERSION as u16,
            durable_lsn: dev.durable_lsn,
        };
        buf[..BLOCK_HEADER_BYTES].copy_from_slice(&header.encode());
        dev.blocks[block as usize] = BlockInfo { state: BlockState::Open, epoch, ..BlockInfo::free() };
        dev.buffer = Some(WriteBuffer { block, epoch, buf, len: BLOCK_HEADER_BYTES, records: 0, flushed: 0, lsn_base: dev.appended_lsn });
        dev.appended_lsn += BLOCK_HEADER_BYTES as u64;
        Ok(())
    }

    /// Waits until `device` is durable up to `lsn`, asking the flusher for it.
    pub(crate) fn wait_durable<'a>(&'a self, mut st: MutexGuard<'a, State>, device: u16, lsn: u64) -> Result<MutexGuard<'a, State>> {
        let d = device as usize;
        if st.devices[d].durable_lsn >= lsn {
            return Ok(st);
        }
        if st.devices[d].requested_lsn < lsn {
            st.devices[d].requested_lsn = lsn;
            self.flush_wakeups[d].notify_one();
        }
        loop {
            if st.devices[d].durable_lsn >= lsn {
                return Ok(st);
            }
            if let Some(reason) = &st.devices[d].poisoned {
                return Err(self.device_failed(device, reason));
            }
            st = self.durable_wakeup.wait(st).unwrap();
        }
    }

    pub(crate) fn device_failed(&self, device: u16, reason: &str) -> Error {
        Error::DeviceFailed { path: self.devices[device as usize].path().to_owned(), reason: reason.to_owned() }
    }

    /// The flusher thread of one device. Runs until shutdown, after a last flush.
    pub(crate) fn run_flusher(self: Arc<Self>, device: u16) {
        let d = device as usize;
        let flush_max = Duration::from_millis(self.config.flush_max_ms);
        let mut st = self.state.lock().unwrap();
        loop {
            let dev = &st.devices[d];
            let timer_due = dev.first_unflushed_at.map(|at| at.elapsed() >= flush_max);
            let stopping = self.flushers_stopping.load(std::sync::atomic::Ordering::Acquire);
            let wanted = dev.sealed.iter().any(|s| !s.handed)
                || dev.requested_lsn > dev.handed_lsn
                || timer_due == Some(true)
                || (stopping && dev.appended_lsn > dev.handed_lsn);
            if dev.poisoned.is_some() || (!wanted && stopping) {
                return;
            }
            if !wanted {
                let wait = match dev.first_unflushed_at {
                    Some(at) => flush_max.saturating_sub(at.elapsed()),
                    None => Duration::from_secs(1),
                };
                st = self.flush_wakeups[d].wait_timeout(st, wait).unwrap().0;
                continue;
            }
            st = self.flush_once(st, device);
        }
    }

    /// Hands everything appended so far to the device, syncs once, and wakes the waiters.
    fn flush_once<'a>(&'a self, mut st: MutexGuard<'a, State>, device: u16) -> MutexGuard<'a, State> {
        let block_size = self.config.write_block_size as u64;
        let dev = &mut st.devices[device as usize];
        // (device offset, buffer, range of the buffer written there)
        let mut segments: Vec<(u64, Arc<Vec<u8>>, std::ops::Range<usize>)> = Vec::new();
        for sealed in dev.sealed.iter_mut().filter(|s| !s.handed) {
            sealed.handed = true;
            let base = sealed.block as u64 * block_size;
            if sealed.to > sealed.from {
                segments.push((base + sealed.from as u64, sealed.buf.clone(), sealed.from..sealed.to));
            }
            let trailer_at = block_size as usize - BLOCK_TRAILER_BYTES;
            segments.push((base + trailer_at as u64, sealed.buf.clone(), trailer_at..block_size as usize));
        }
        if let Some(buffer) = dev.buffer.as_mut().filter(|b| b.len > b.flushed) {
            let to = align_up(buffer.len, SECTOR_BYTES);
            let bytes = Arc::new(buffer.buf[buffer.flushed..to].to_vec());
            let len = bytes.len();
            segments.push((buffer.block as u64 * block_size + buffer.flushed as u64, bytes, 0..len));
            buffer.flushed = to;
            buffer.len = to;
            dev.appended_lsn = buffer.lsn_base + to as u64;
        }
        let target = dev.appended_lsn;
        dev.handed_lsn = target;
        dev.first_unflushed_at = None;
        drop(st);

        let device_io = &self.devices[device as usize];
        let io_lock = self.io_locks[device as usize].lock().unwrap();
        let mut result = Ok(());
        let mut bytes_written = 0;
        for (offset, buf, range) in &segments {
            bytes_written += range.len();
            result = device_io.write_at(&buf[range.clone()], *offset);
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() && !self.config.unsafe_skip_fsync {
            result = device_io.sync();
            self.stats.fsyncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.stats.flushes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if result.is_ok() {
            self.observe(EngineEvent::Flushed { device, bytes: bytes_written });
        }

        let mut st = self.state.lock().unwrap();
        drop(io_lock);
        let dev = &mut st.devices[device as usize];
        if dev.poisoned.is_some() && result.is_ok() {
            // Another thread's sync on this device failed: what this one wrote is in doubt.
            result = Err(std::io::Error::other("an earlier fdatasync on this device failed"));
        }
        match result {
            Ok(()) => {
                dev.durable_lsn = dev.durable_lsn.max(target);
                let durable = dev.durable_lsn;
                let mut now_in_use = Vec::new();
                dev.sealed.retain(|s| {
                    let done = s.handed && s.lsn_end <= durable;
                    if done {
                        now_in_use.push(s.block);
                    }
                    !done
                });
                for block in now_in_use {
                    dev.blocks[block as usize].state = BlockState::InUse;
                }
            }
            Err(err) => {
                if dev.poisoned.is_none() {
                    let reason = format!("write or fdatasync failed: {err}");
                    tracing::error!(device = %device_io.path().display(), %reason, "device poisoned: no more writes until restart");
                    dev.poisoned = Some(reason);
                }
            }
        }
        self.durable_wakeup.notify_all();
        st
    }
}
