//! Start-up: open the devices, check their headers, and rebuild the index by scanning every
//! block. One thread reads blocks ahead while this one parses, so the scan runs at the disk's
//! sequential read rate.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use super::state::{BlockState, DeviceState, IndexEntry, State};
use super::{Counters, Inner, OpenOptions, ScanReport, SystemClock, RECORD_LOCK_COUNT};
use crate::config::NamespaceConfig;
use crate::device::{Device, FileDevice};
use crate::error::{Error, Result};
use crate::format::{
    align_up, BlockHeader, BlockItem, BlockTrailer, BlockWalker, DeviceHeader, RecordFault, BLOCK_HEADER_BYTES, BLOCK_STATE_IN_USE, BLOCK_TRAILER_BYTES,
    DEVICE_HEADER_BYTES, RECORD_ALIGN_BYTES,
};

/// Faults logged one by one per device before only counting them.
const FAULT_LOG_LINES_MAX: u64 = 10;
/// Blocks read ahead of the parser.
const READ_AHEAD_BLOCKS: usize = 4;

pub(crate) fn open(config: NamespaceConfig, options: OpenOptions) -> Result<Inner> {
    let started = Instant::now();
    let clock = options.clock.unwrap_or_else(|| Arc::new(SystemClock));
    let devices = match options.devices {
        Some(devices) => {
            if devices.len() != config.devices.len() {
                return Err(Error::Config(format!("{} devices given for {} configured", devices.len(), config.devices.len())));
            }
            devices
        }
        None => {
            let mut opened: Vec<Arc<dyn Device>> = Vec::new();
            for device in &config.devices {
                let (file, _created) = FileDevice::open_or_create(&device.path, device.size)?;
                opened.push(Arc::new(file));
            }
            opened
        }
    };
    let mut state = State { index: Default::default(), tombstones: 0, next_seq: 1, devices: Vec::new() };
    let mut report = ScanReport::default();
    let mut device_ids = Vec::new();
    for (index, device) in devices.iter().enumerate() {
        let device_id = check_device_header(&config, index, device.as_ref(), clock.now_ms())?;
        let block_count = (device.size_bytes() / config.write_block_size as u64) as u32;
        state.devices.push(DeviceState::new(block_count));
        let (durable_lsn, replaced) = match &options.durable_points {
            None => (None, false),
            Some(points) => {
                let recorded = points.iter().filter(|p| p.device as usize == index);
                let matching = recorded.clone().filter(|p| p.device_id == device_id).map(|p| p.lsn).max();
                (matching, matching.is_none() && recorded.count() > 0)
            }
        };
        if replaced {
            tracing::warn!(device = %device.path().display(), "the device is not the one the durable points were recorded on: what it held is lost here");
            report.replaced_devices.push(index as u16);
        }
        let void = options.void_points.as_ref().filter(|v| v.groups > 0).map(|v| (v.groups, v.for_device(index as u16, device_id)));
        let found = scan_device(&config, index as u16, device_id, device.as_ref(), void.as_ref(), &mut state, &mut report)?;
        // The recorded point or the highest a block header states, whichever is further.
        let durable_lsn = match (durable_lsn, found.header_durable_lsn) {
            (recorded, 0) => recorded,
            (recorded, from_headers) => Some(recorded.unwrap_or(0).max(from_headers)),
        };
        judge_trailerless(&config, index as u16, device.as_ref(), durable_lsn, found.trailerless, &mut report)?;
        // New blocks continue the device's log positions past everything seen, and past the
        // durable point and the void points even when the blocks that reached them were freed
        // since (a record written later must never fall below a void point).
        let highest_void = void.as_ref().and_then(|(_, lsns)| lsns.iter().max().copied()).unwrap_or(0);
        let next_lsn = found.next_lsn.max(durable_lsn.unwrap_or(0)).max(highest_void);
        let dev = &mut state.devices[index];
        (dev.appended_lsn, dev.handed_lsn, dev.durable_lsn, dev.requested_lsn) = (next_lsn, next_lsn, next_lsn, next_lsn);
        device_ids.push(device_id);
    }
    finish_accounting(&mut state);
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    let bytes_per_sec = report.bytes_scanned as f64 / started.elapsed().as_secs_f64().max(1e-9);
    tracing::info!(
        namespace = %config.name,
        records = state.live_records(),
        tombstones = state.tombstones,
        blocks = report.blocks_scanned,
        checksum_mismatches = report.checksum_mismatches,
        torn_records = report.torn_records,
        damaged_block_headers = report.damaged_block_headers,
        garbage_regions = report.garbage_regions,
        damaged_blocks = report.damaged_blocks.len(),
        replaced_devices = report.replaced_devices.len(),
        elapsed_ms = report.elapsed_ms,
        mib_per_sec = bytes_per_sec / (1024.0 * 1024.0),
        "namespace scanned"
    );
    let device_count = devices.len();
    Ok(Inner {
        config,
        devices,
        state: Mutex::new(state),
        flush_wakeups: (0..device_count).map(|_| Condvar::new()).collect(),
        io_locks: (0..device_count).map(|_| Mutex::new(())).collect(),
        device_ids,
        durable_wakeup: Condvar::new(),
        record_locks: (0..RECORD_LOCK_COUNT).map(|_| Mutex::new(())).collect(),
        shutting_down: AtomicBool::new(false),
        flushers_stopping: AtomicBool::new(false),
        background_wakeup: Condvar::new(),
        clock,
        observer: options.observer,
        stats: Counters::default(),
        scan_report: report,
        replicated: options.replicated,
        tombstone_floors: Mutex::new(None),
        defrag_lock: Mutex::new(()),
    })
}

/// Writes the header of a fresh device, or checks that an existing one belongs here.
/// Returns the device id.
fn check_device_header(config: &NamespaceConfig, index: usize, device: &dyn Device, now_ms: u64) -> Result<u64> {
    let path = device.path();
    let mut buf = [0u8; DEVICE_HEADER_BYTES];
    device.read_at(&mut buf, 0).map_err(|e| Error::io(path, e))?;
    let expected = DeviceHeader {
        block_size: config.write_block_size,
        device_len: device.size_bytes() / config.write_block_size as u64 * config.write_block_size as u64,
        device_index: index as u32,
        device_count: config.devices.len() as u32,
        created_ms: now_ms,
        device_id: rand::random::<u64>() | 1,
        namespace: config.name.clone(),
    };
    let Some(found) = DeviceHeader::decode(&buf, path)? else {
        refuse_unless_blank(device, config.write_block_size)?;
        tracing::info!(device = %path.display(), "new device: writing its header");
        device.write_at(&expected.encode(), 0).map_err(|e| Error::io(path, e))?;
        device.sync().map_err(|e| Error::io(path, e))?;
        return Ok(expected.device_id);
    };
    let mismatch = |what: String| Err(Error::Config(format!("device {}: {what}; nothing was changed on the device", path.display())));
    if found.namespace != expected.namespace {
        return mismatch(format!("belongs to namespace {:?}, not {:?}", found.namespace, expected.namespace));
    }
    if found.block_size != expected.block_size {
        return mismatch(format!("was formatted with write-block-size {}, the config says {}", found.block_size, expected.block_size));
    }
    if found.device_len != expected.device_len {
        return mismatch(format!("was formatted with {} bytes, it now has {}", found.device_len, expected.device_len));
    }
    if (found.device_index, found.device_count) != (expected.device_index, expected.device_count) {
        return mismatch(format!(
            "was device {} of {}, the config lists it as device {} of {}",
            found.device_index + 1,
            found.device_count,
            expected.device_index + 1,
            expected.device_count
        ));
    }
    Ok(found.device_id)
}

/// A device is formatted only when it holds nothing: its whole first block zero (a filesystem
/// or partition table may leave the first bytes zero: ext4 starts at byte 1024, a GPT disk's
/// protective MBR at 446) and the first bytes of later blocks zero too (a device whose header
/// was wiped but whose blocks hold records is damaged, not new). Of a large device only
/// `BLANK_CHECK_BLOCKS` blocks spread over it are read, so that formatting a large disk does
/// not read a sector per block. Anything else is an error, and nothing is written.
const BLANK_CHECK_BLOCKS: u64 = 4096;

fn refuse_unless_blank(device: &dyn Device, block_size: u32) -> Result<()> {
    let path = device.path();
    let not_blank = |offset: u64| {
        Err(Error::Corrupt {
            path: path.to_owned(),
            offset,
            what: format!(
                "not a chunkstore device: it has no chunkstore header but is not blank (non-zero bytes in the block at {offset}; a filesystem, a partition table or a chunkstore device whose header was lost?); nothing was written to it"
            ),
        })
    };
    let mut first = vec![0u8; block_size as usize];
    device.read_at(&mut first, 0).map_err(|e| Error::io(path, e))?;
    if first.iter().any(|&b| b != 0) {
        return not_blank(0);
    }
    let mut head = [0u8; BLOCK_HEADER_BYTES];
    let blocks = device.size_bytes() / block_size as u64;
    let stride = blocks.div_ceil(BLANK_CHECK_BLOCKS).max(1) as usize;
    for block in (1..blocks).step_by(stride) {
        let offset = block * block_size as u64;
        device.read_at(&mut head, offset).map_err(|e| Error::io(path, e))?;
        if head.iter().any(|&b| b != 0) {
            return not_blank(offset);
        }
    }
    Ok(())
}

/// A block in use with no valid trailer: the block open when the process stopped, one left
/// open by an earlier life, or a sealed block whose trailer was damaged. It is judged once the
/// whole device is scanned, against the highest durable point found.
struct Trailerless {
    block: u32,
    epoch: u64,
    lsn_base: u64,
    records_end: usize,
    /// Records found, and where the last one before any fault ends.
    records: u32,
    records_end_before_fault: usize,
    first_fault: Option<usize>,
    tail_garbage_at: Option<usize>,
}

/// What scanning one device found beyond the index.
struct DeviceScan {
    /// The log position after the last block found.
    next_lsn: u64,
    /// The highest durable point the device's block headers record (0: none).
    header_durable_lsn: u64,
    trailerless: Vec<Trailerless>,
}

/// Scans one device into the index. Sealed blocks are judged as they are read: their trailer
/// says what they hold, so any fault there is damage (`report.damaged_blocks`). Blocks without
/// a trailer are returned for `judge_trailerless`.
/// `void` is (groups, per group the position below which its records are void on this
/// device): such records are not indexed (their space is reclaimed like a superseded
/// version's).
fn scan_device(
    config: &NamespaceConfig,
    device_index: u16,
    device_id: u64,
    device: &dyn Device,
    void: Option<&(u32, Vec<u64>)>,
    st: &mut State,
    report: &mut ScanReport,
) -> Result<DeviceScan> {
    let mut found = DeviceScan { next_lsn: 0, header_durable_lsn: 0, trailerless: Vec::new() };
    let block_size = config.write_block_size as usize;
    let block_count = st.devices[device_index as usize].blocks.len() as u32;
    let path = device.path().to_owned();
    let mut faults_logged = 0;
    std::thread::scope(|scope| -> Result<()> {
        // Buffers go back and forth between reader and parser: no allocation (and no page
        // faults on fresh memory) per block.
        let (sender, receiver) = sync_channel::<std::io::Result<(u32, Vec<u8>)>>(READ_AHEAD_BLOCKS);
        let (recycle, recycled) = sync_channel::<Vec<u8>>(READ_AHEAD_BLOCKS + 2);
        scope.spawn(move || {
            for block in 1..block_count {
                let mut buf = recycled.try_recv().unwrap_or_else(|_| vec![0u8; block_size]);
                let read = device.read_at(&mut buf, block as u64 * block_size as u64).map(|()| (block, buf));
                let failed = read.is_err();
                if sender.send(read).is_err() || failed {
                    return;
                }
            }
        });
        for read in receiver {
            let (block, buf) = read.map_err(|e| Error::io(&path, e))?;
            let buf = Recycle { buf: Some(buf), to: &recycle };
            report.blocks_scanned += 1;
            report.bytes_scanned += block_size as u64;
            let dev = &mut st.devices[device_index as usize];
            let decoded = BlockHeader::decode(&buf).filter(|h| h.block_index == block && h.device_id == device_id);
            if let Some(header) = decoded {
                // Free or in use, a header of this device states a durable point truly.
                found.header_durable_lsn = found.header_durable_lsn.max(header.durable_lsn);
            }
            // Ours, in use, in its place: anything else (zeros, free, torn, another device's or
            // an earlier formatting's block) holds no records.
            let Some(header) = decoded.filter(|h| h.state == BLOCK_STATE_IN_USE) else {
                if BlockHeader::looks_damaged(&buf, block) {
                    report.damaged_block_headers += 1;
                    report.damaged_blocks.push((device_index, block));
                    tracing::warn!(device = %path.display(), block, "block header is damaged: the block's records are lost here");
                    // Reused first: rewriting it clears the damage.
                    dev.free.push_front(block);
                    continue;
                }
                dev.free.push_back(block);
                continue;
            };
            dev.blocks[block as usize].state = BlockState::InUse;
            dev.blocks[block as usize].epoch = header.epoch;
            found.next_lsn = found.next_lsn.max(header.lsn_base + block_size as u64);
            // Bytes [header, intact_until) must hold records and zero padding only.
            let records_end = header.records_end(block_size);
            let trailer = BlockTrailer::decode(&buf, block, header.epoch).filter(|_| header.has_trailer());
            let mut pending = Trailerless {
                block,
                epoch: header.epoch,
                lsn_base: header.lsn_base,
                records_end,
                records: 0,
                records_end_before_fault: BLOCK_HEADER_BYTES,
                first_fault: None,
                tail_garbage_at: None,
            };
            // A version-1 block has neither trailer nor log position: faults are counted only.
            let intact_until = trailer.map_or(0, |t| t.used_len as usize);
            let mut damage: Option<&str> = None;
            let mut walker = BlockWalker::new(&buf[..records_end], block, header.epoch);
            for item in walker.by_ref() {
                match item {
                    BlockItem::Record { offset, header: record, bytes } => {
                        pending.records += 1;
                        if pending.first_fault.is_none() {
                            pending.records_end_before_fault = align_up(offset + bytes.len(), RECORD_ALIGN_BYTES);
                        }
                        report.records_found += 1;
                        let info = &mut st.devices[device_index as usize].blocks[block as usize];
                        info.used_bytes += bytes.len() as u32;
                        info.min_seq = info.min_seq.min(record.seq);
                        st.next_seq = st.next_seq.max(record.seq.saturating_add(1));
                        if let Some((groups, lsns)) = void {
                            let group = crate::key::partition_id(&record.digest) as u32 % groups;
                            if header.lsn_base + (offset as u64) < lsns[group as usize] {
                                continue;
                            }
                        }
                        let candidate = IndexEntry {
                            seq: record.seq,
                            block,
                            offset: offset as u32,
                            len: bytes.len() as u32,
                            generation: record.generation,
                            void_time_secs: record.void_time_secs,
                            device: device_index,
                            tombstone: record.is_tombstone(),
                        };
                        let newer = st.index.get(&record.digest).is_none_or(|e| candidate.seq > e.seq);
                        if newer {
                            st.index.insert(record.digest, candidate);
                        }
                    }
                    BlockItem::Fault { offset, fault } => {
                        match fault {
                            RecordFault::Truncated => report.torn_records += 1,
                            RecordFault::ChecksumMismatch => report.checksum_mismatches += 1,
                            RecordFault::Garbage => report.garbage_regions += 1,
                        }
                        pending.first_fault.get_or_insert(offset);
                        if offset < intact_until {
                            damage.get_or_insert("a record the block must hold fails its check");
                        }
                        faults_logged += 1;
                        if faults_logged <= FAULT_LOG_LINES_MAX {
                            let at = block as u64 * block_size as u64 + offset as u64;
                            tracing::warn!(device = %path.display(), block, offset, byte = at, ?fault, "record skipped: it is never returned");
                        }
                    }
                }
            }
            pending.tail_garbage_at = walker.tail_garbage_at();
            if !header.has_trailer() {
                continue;
            }
            let Some(trailer) = trailer else {
                found.trailerless.push(pending);
                continue;
            };
            if pending.tail_garbage_at.is_some_and(|at| at < intact_until) {
                damage.get_or_insert("bytes the block's records must fill were overwritten");
            }
            if trailer.records != pending.records {
                damage.get_or_insert("the block holds fewer records than its trailer says");
            }
            if let Some(why) = damage {
                report.damaged_blocks.push((device_index, block));
                tracing::warn!(device = %path.display(), block, why, "damaged block: records written before the durable point are lost here");
            }
        }
        Ok(())
    })?;
    let faults = report.torn_records + report.checksum_mismatches + report.garbage_regions;
    if faults > FAULT_LOG_LINES_MAX {
        tracing::warn!(device = %path.display(), faults, "more skipped records than logged one by one");
    }
    Ok(found)
}

/// Judges the blocks without a trailer against `durable_lsn` (everything of the device's log
/// before it was durable when the process stopped, when known): a fault before it is damage
/// to data that was acknowledged, not a torn tail. Then seals the intact ones (one synced
/// trailer sector each, describing what they hold now), so that later lives, whose durable
/// points pass them, judge them by their trailer rather than take them for sealed blocks
/// whose trailer was lost. Damaged blocks are left as they are for the node to retire once
/// their records are restored.
fn judge_trailerless(
    config: &NamespaceConfig,
    device_index: u16,
    device: &dyn Device,
    durable_lsn: Option<u64>,
    trailerless: Vec<Trailerless>,
    report: &mut ScanReport,
) -> Result<()> {
    let block_size = config.write_block_size as u64;
    let path = device.path();
    let mut sealed = 0;
    for block in trailerless {
        let intact_until = match durable_lsn {
            Some(durable) if block.lsn_base + block_size <= durable => {
                Err("the block was sealed before the durable point but its trailer is missing or damaged")
            }
            Some(durable) => Ok(durable.saturating_sub(block.lsn_base).min(block.records_end as u64) as usize),
            None => Ok(0),
        };
        let damage = intact_until.and_then(|intact_until| {
            if block.first_fault.is_some_and(|at| at < intact_until) {
                Err("a record written before the durable point fails its check")
            } else if block.tail_garbage_at.is_some_and(|at| at < intact_until) {
                Err("bytes written before the durable point were overwritten")
            } else {
                Ok(())
            }
        });
        if let Err(why) = damage {
            report.damaged_blocks.push((device_index, block.block));
            tracing::warn!(device = %path.display(), block = block.block, why, "damaged block: records written before the durable point are lost here");
            continue;
        }
        let trailer = BlockTrailer { used_len: block.records_end_before_fault as u32, records: block.records };
        let mut sector = vec![0u8; BLOCK_TRAILER_BYTES];
        sector[..BlockTrailer::BYTES].copy_from_slice(&trailer.encode(block.block, block.epoch));
        let at = block.block as u64 * block_size + (block_size - BLOCK_TRAILER_BYTES as u64);
        device.write_at(&sector, at).map_err(|e| Error::io(path, e))?;
        sealed += 1;
    }
    if sealed > 0 {
        if !config.unsafe_skip_fsync {
            device.sync().map_err(|e| Error::io(path, e))?;
        }
        report.blocks_sealed_at_start += sealed;
        tracing::info!(device = %path.display(), blocks = sealed, "blocks left open by the last stop were sealed");
    }
    Ok(())
}

/// Hands a block buffer back to the reader when parsing is done with it.
struct Recycle<'a> {
    buf: Option<Vec<u8>>,
    to: &'a std::sync::mpsc::SyncSender<Vec<u8>>,
}

impl std::ops::Deref for Recycle<'_> {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        self.buf.as_ref().expect("present until dropped")
    }
}

impl Drop for Recycle<'_> {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            let _ = self.to.try_send(buf);
        }
    }
}

/// After all devices are scanned: live bytes per block from the final index, and the count of
/// tombstones.
fn finish_accounting(st: &mut State) {
    let mut tombstones = 0;
    for entry in st.index.values() {
        st.devices[entry.device as usize].blocks[entry.block as usize].live_bytes += entry.len;
        tombstones += entry.tombstone as u64;
    }
    st.tombstones = tombstones;
}
