//! Opening the WAL: replay every segment in order, cut a torn tail, start a new segment.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex};

use super::format::{decode_at, decode_segment_header, Decoded, Step, SEGMENT_HEADER_BYTES};
use super::{EntryLoc, GroupLog, Segment, WalConfig, WalError, WalInner, WalResult, WalState};

pub(crate) fn open(config: WalConfig) -> WalResult<WalInner> {
    let io = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| WalError::Io { path, source }
    };
    std::fs::create_dir_all(&config.dir).map_err(io(&config.dir))?;
    let mut files: Vec<(u64, std::path::PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(&config.dir).map_err(io(&config.dir))? {
        let path = entry.map_err(io(&config.dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(id) = name.strip_prefix("wal-").and_then(|n| n.strip_suffix(".log")).and_then(|n| n.parse().ok()) {
            files.push((id, path));
        }
    }
    files.sort();
    let mut groups: HashMap<u32, GroupLog> = HashMap::new();
    let mut segments = BTreeMap::new();
    let mut torn: Option<(std::path::PathBuf, u64, String)> = None;
    let file_count = files.len();
    for (position, (id, path)) in files.into_iter().enumerate() {
        let data = std::fs::read(&path).map_err(io(&path))?;
        let corrupt = |offset: u64, what: String| WalError::Corrupt { path: path.clone(), offset, what };
        match decode_segment_header(&data) {
            Ok(found) if found == id => {}
            Ok(found) => return Err(corrupt(0, format!("header says segment {found}"))),
            // The newest segment may have been cut short while being created: then it holds no
            // more than its header sector (records are only written after the header is synced).
            Err(what) if position + 1 == file_count && data.len() <= SEGMENT_HEADER_BYTES => {
                tracing::warn!(path = %path.display(), %what, "removing a WAL segment whose creation did not finish");
                std::fs::remove_file(&path).map_err(io(&path))?;
                continue;
            }
            Err(what) => return Err(corrupt(0, what)),
        }
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
                    end = pos;
                    torn = Some((path.clone(), pos as u64, what));
                    break;
                }
                Step::Record(record) => {
                    if let Some((torn_path, offset, what)) = &torn {
                        return Err(WalError::Corrupt {
                            path: torn_path.clone(),
                            offset: *offset,
                            what: format!("{what}, and later segments hold records"),
                        });
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
            let file = std::fs::OpenOptions::new().write(true).open(&path).map_err(io(&path))?;
            file.set_len(end as u64).and_then(|()| file.sync_all()).map_err(io(&path))?;
        }
        let file = std::fs::OpenOptions::new().read(true).open(&path).map_err(io(&path))?;
        let handed = data.len() as u64;
        segments.insert(id, Segment { id, path, file: Arc::new(file), handed, pending: Vec::new(), in_flight: None, max_index, holds_forget });
    }
    if let Some((path, offset, what)) = &torn {
        tracing::warn!(path = %path.display(), offset, %what, "WAL tail torn by a crash: the unacknowledged records after it were dropped");
    }
    let inner = WalInner {
        config,
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
        }),
        flush_wakeup: Condvar::new(),
    };
    // Appends go to a new segment, which starts with a checkpoint like every segment after
    // the first: old segments are never written again.
    inner.roll_over(&mut inner.state.lock().unwrap())?;
    let groups = inner.state.lock().unwrap().groups.len();
    tracing::info!(dir = %inner.config.dir.display(), groups, "WAL opened");
    Ok(inner)
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
    }
}
