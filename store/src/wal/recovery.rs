//! Opening the WAL: replay every segment in order, cut a torn tail, start a new segment.
//!
//! A crash can tear only the last flush: each flush is written and fdatasync'd before the next
//! one is taken, and only the newest segment is written. So from format version 3 on, where
//! every flush of a segment begins (at a sector boundary) with a marker holding the segment's
//! id and the flush's number, an invalid record is a torn tail only if no marker of a later
//! flush follows it. With one after it, the flush holding the invalid record was synced: the
//! bytes were damaged afterwards (the disk, or anything else writing over the file), and
//! entries this node acknowledged may be in them. That is corruption: the log is not cut
//! (cutting it would silently drop acknowledged entries and everything after them), the WAL
//! refuses to open, and the node rebuilds from its peers (`node::wal_damage`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex};

use super::format::{decode_at, decode_segment_header, Decoded, Step, SECTOR_BYTES, SEGMENT_HEADER_BYTES, WAL_FORMAT_VERSION_FLUSH_MARKERS};
use super::{segment_id, EntryLoc, GroupLog, Segment, WalConfig, WalError, WalInner, WalResult, WalState};
use crate::device::{DeviceDir, FileDir};

pub(crate) fn open(config: WalConfig) -> WalResult<WalInner> {
    let io = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| WalError::Io { path, source }
    };
    let dir: Arc<dyn DeviceDir> = match &config.segment_dir {
        Some(dir) => dir.clone(),
        None => Arc::new(FileDir::new(&config.dir).map_err(io(&config.dir))?),
    };
    let names = dir.list().map_err(io(dir.path()))?;
    // Segments whose creation a crash interrupted (never named, never written to).
    let unfinished: Vec<&String> = names.iter().filter(|name| name.ends_with(super::flusher::PREPARING_SUFFIX)).collect();
    for name in &unfinished {
        tracing::info!(dir = %dir.path().display(), %name, "removing a WAL segment whose creation did not finish");
        dir.remove(name).map_err(io(&dir.path().join(name)))?;
    }
    if !unfinished.is_empty() {
        dir.sync().map_err(io(dir.path()))?;
    }
    let mut files: Vec<(u64, String)> = names.into_iter().filter_map(|name| Some((segment_id(&name)?, name))).collect();
    files.sort();
    let mut groups: HashMap<u32, GroupLog> = HashMap::new();
    let mut segments = BTreeMap::new();
    let mut torn: Option<(std::path::PathBuf, u64, String)> = None;
    let mut flushes_taken = 0;
    let file_count = files.len();
    for (position, (id, name)) in files.into_iter().enumerate() {
        let path = dir.path().join(&name);
        let data = read_whole(&*dir, &name).map_err(io(&path))?;
        let corrupt = |offset: u64, what: String| WalError::Corrupt { path: path.clone(), offset, what };
        let version = match decode_segment_header(&data) {
            Ok((found, version)) if found == id => version,
            Ok((found, _)) => return Err(corrupt(0, format!("header says segment {found}"))),
            // In a log written before segments were named only once complete, the newest one may
            // have been cut short while being created: then it holds no more than its header
            // sector (records are only written after the header is synced).
            Err(what) if position + 1 == file_count && data.len() <= SEGMENT_HEADER_BYTES => {
                tracing::warn!(path = %path.display(), %what, "removing a WAL segment whose creation did not finish");
                dir.remove(&name).and_then(|()| dir.sync()).map_err(io(&path))?;
                continue;
            }
            Err(what) => return Err(corrupt(0, what)),
        };
        let markers = version >= WAL_FORMAT_VERSION_FLUSH_MARKERS && !config.unsafe_torn_tail_rule;
        // The number of the last flush marker read in this segment.
        let mut flush: Option<u64> = None;
        let mut max_index = HashMap::new();
        let mut holds_forget = false;
        let mut pos = SEGMENT_HEADER_BYTES;
        let mut end = data.len();
        loop {
            let (step, next) = decode_at(&data, pos, config.record_bytes_max);
            match step {
                Step::End => break,
                Step::Padding => {}
                // Zeros from here to the end of the file: the unwritten, preallocated rest of the
                // segment (a clean end, nothing after it to lose).
                Step::Invalid(_) if data[pos..].iter().all(|&b| b == 0) => {
                    end = pos;
                    break;
                }
                Step::Invalid(what) => {
                    if markers {
                        if let Some((at, number)) = later_flush(&data, pos, id, flush, config.record_bytes_max) {
                            return Err(corrupt(pos as u64, format!("{what}, in a flush that was synced: flush {number} follows it at byte {at}")));
                        }
                    }
                    end = pos;
                    torn = Some((path.clone(), pos as u64, what));
                    break;
                }
                Step::Record(Decoded::Flush { segment, number }) => {
                    if let Some((torn_path, offset, what)) = &torn {
                        return Err(WalError::Corrupt { path: torn_path.clone(), offset: *offset, what: format!("{what}, and later segments hold records") });
                    }
                    if segment != id || flush.is_some_and(|last| number <= last) {
                        return Err(corrupt(pos as u64, format!("flush marker of segment {segment}, flush {number}, after flush {flush:?} of segment {id}")));
                    }
                    flush = Some(number);
                    flushes_taken = flushes_taken.max(number);
                }
                Step::Record(record) => {
                    if let Some((torn_path, offset, what)) = &torn {
                        return Err(WalError::Corrupt { path: torn_path.clone(), offset: *offset, what: format!("{what}, and later segments hold records") });
                    }
                    if let Decoded::Forget { group, .. } = record {
                        // As when it was appended: the voided entries pin no segment.
                        for segment in segments.values_mut() {
                            let segment: &mut Segment = segment;
                            segment.max_index.remove(&group);
                        }
                        max_index.remove(&group);
                        holds_forget = true;
                    }
                    replay(&mut groups, &mut max_index, id, pos as u64, (next - pos) as u32, record);
                }
            }
            pos = next;
        }
        if end < data.len() {
            // Cut the torn or preallocated tail so that this segment reads cleanly once it is
            // no longer the last.
            dir.set_len(&name, end as u64).map_err(io(&path))?;
        }
        let device = dir.open(&name).map_err(io(&path))?;
        let handed = data.len() as u64;
        segments.insert(id, Segment { id, path, device, handed, pending: Vec::new(), in_flight: None, max_index, holds_forget });
    }
    if let Some((path, offset, what)) = &torn {
        tracing::warn!(path = %path.display(), offset, %what, "WAL tail torn by a crash: the unacknowledged records after it were dropped");
    }
    let inner = WalInner {
        config,
        dir,
        state: Mutex::new(WalState {
            groups,
            segments,
            appended_lsn: 0,
            taken_lsn: 0,
            durable_lsn: 0,
            waiting: Default::default(),
            poisoned: None,
            shutting_down: false,
            stats: Default::default(),
            spare: None,
            preparing: None,
            flushes_taken,
            flushing: false,
            last_flush_answered: 0,
        }),
        flush_wakeup: Condvar::new(),
        preparer: Mutex::new(None),
    };
    // Appends go to a new segment, which starts with a checkpoint like every segment after
    // the first: old segments are never written again. It is made here, before any append
    // waits, so it is zero-filled like the ones the flusher prepares (about 0.1 s for 64 MiB
    // on this machine's disk).
    {
        let mut st = inner.state.lock().unwrap();
        let next = st.segments.keys().next_back().map_or(1, |last| last + 1);
        let config = &inner.config;
        st.spare = Some(super::flusher::create_segment(&*inner.dir, next, config.segment_bytes, config.zero_fill, config.unsafe_skip_fsync)?);
        inner.roll_over(&mut st)?;
    }
    let groups = inner.state.lock().unwrap().groups.len();
    tracing::info!(dir = %inner.dir.path().display(), groups, "WAL opened");
    Ok(inner)
}

/// Every byte of segment `name`.
fn read_whole(dir: &dyn DeviceDir, name: &str) -> std::io::Result<Vec<u8>> {
    let device = dir.open(name)?;
    let len = usize::try_from(device.size_bytes()).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
    let mut data = vec![0u8; len];
    device.read_at(&mut data, 0)?;
    Ok(data)
}

fn replay(groups: &mut HashMap<u32, GroupLog>, max_index: &mut HashMap<u32, u64>, segment: u64, offset: u64, len: u32, record: Decoded<'_>) {
    match record {
        Decoded::Entry { group, index, term, .. } => {
            let log = groups.entry(group).or_default();
            log.entries.split_off(&index);
            log.entries.insert(index, EntryLoc { segment, offset, len, term });
            let max = max_index.entry(group).or_default();
            *max = (*max).max(index);
        }
        Decoded::Truncate { group, from_index } => {
            groups.entry(group).or_default().entries.split_off(&from_index);
        }
        Decoded::Purge { group, upto_index, upto_term } => {
            let log = groups.entry(group).or_default();
            log.entries = log.entries.split_off(&(upto_index + 1));
            log.purged = Some((upto_index, upto_term));
        }
        Decoded::Vote { group, bytes } => groups.entry(group).or_default().vote = Some(bytes.to_vec()),
        Decoded::Committed { group, bytes } => groups.entry(group).or_default().committed = Some(bytes.to_vec()),
        Decoded::Applied { group, bytes } => groups.entry(group).or_default().applied = Some(bytes.to_vec()),
        Decoded::Forget { group, bytes } => groups.entry(group).or_default().forget(bytes.to_vec()),
        Decoded::Void { group, bytes } => groups.entry(group).or_default().void = Some(bytes.to_vec()),
        Decoded::Flush { .. } => {}
    }
}

/// The first marker of a flush of segment `segment` numbered past `flush` at a sector boundary
/// after `pos`: (its byte offset, its number).
fn later_flush(data: &[u8], pos: usize, segment: u64, flush: Option<u64>, record_bytes_max: usize) -> Option<(usize, u64)> {
    let mut at = (pos + 1).next_multiple_of(SECTOR_BYTES);
    while at < data.len() {
        if let (Step::Record(Decoded::Flush { segment: found, number }), _) = decode_at(data, at, record_bytes_max) {
            if found == segment && flush.is_none_or(|last| number > last) {
                return Some((at, number));
            }
        }
        at += SECTOR_BYTES;
    }
    None
}
