//! The node's write-ahead log: one log shared by every Raft group of the node, with group
//! commit (one write + one fdatasync covers the appends of every group waiting at that moment).
//! Byte format: store/WAL.md.
//!
//! Reading order: `mod.rs` (API, appending), `flusher.rs` (group commit, segment rollover and
//! deletion), `recovery.rs` (open), `format.rs` (bytes).
//!
//! Invariants:
//! - **An append's callback reports success only after its bytes were written and
//!   fdatasync'd**; after any failed write or sync the log is poisoned and every later append
//!   fails.
//! - **No flush rewrites a durable sector**: each flush pads to the next 512-byte boundary.
//! - **Every segment after the first starts with a checkpoint** (each group's vote, committed,
//!   purge point and log end), so a segment can be deleted once every group has durably purged
//!   the entries in it, without losing a vote or reviving a truncated entry.
//! - **A forgotten log never comes back**: a segment holding a `Forget` is deleted only with
//!   every older segment, so no entry it voided can be replayed without it.

mod flusher;
pub mod format;
mod recovery;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use format::encode_record;

use crate::device::{Device, DeviceDir};

pub type GroupId = u32;

/// One change to one group's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WalOp {
    /// A log entry; `payload` is opaque to the WAL.
    Entry { index: u64, term: u64, payload: Vec<u8> },
    /// Entries from `from_index` on are void (a follower's conflicting suffix).
    Truncate { from_index: u64 },
    /// Entries up to `upto_index` are no longer needed (applied and durable in the engine).
    Purge { upto_index: u64, upto_term: u64 },
    /// The group's vote, opaque to the WAL.
    Vote(Vec<u8>),
    /// The group's committed log id, opaque to the WAL.
    Committed(Vec<u8>),
    /// The group state machine's durable applied point (and what it needs with it), opaque.
    Applied(Vec<u8>),
    /// The group's replica left this node: its entries, purge point, committed id and applied
    /// point are void; its vote stays. The bytes (opaque: where the engine's records of the
    /// group became void) are kept as the group's `void` until a later `Forget`.
    Forget(Vec<u8>),
    /// Sets the group's `void` bytes only (how checkpoints carry them).
    Void(Vec<u8>),
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("WAL I/O error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("WAL segment {path} is corrupt at byte {offset}: {what}; this node's log cannot be trusted: rebuild the node from its peers")]
    Corrupt { path: PathBuf, offset: u64, what: String },
    #[error("the WAL stopped accepting writes after a failed write or fdatasync ({reason}); restart after checking the disk")]
    Poisoned { reason: String },
    #[error("WAL record of {size_bytes} bytes is over the limit of {limit_bytes}")]
    TooBig { size_bytes: usize, limit_bytes: usize },
    #[error("the WAL is shut down")]
    ShutDown,
}

impl Clone for WalError {
    fn clone(&self) -> Self {
        match self {
            WalError::Io { path, source } => WalError::Io { path: path.clone(), source: std::io::Error::new(source.kind(), source.to_string()) },
            WalError::Corrupt { path, offset, what } => WalError::Corrupt { path: path.clone(), offset: *offset, what: what.clone() },
            WalError::Poisoned { reason } => WalError::Poisoned { reason: reason.clone() },
            WalError::TooBig { size_bytes, limit_bytes } => WalError::TooBig { size_bytes: *size_bytes, limit_bytes: *limit_bytes },
            WalError::ShutDown => WalError::ShutDown,
        }
    }
}

pub type WalResult<T> = Result<T, WalError>;

/// Called once the appended ops are durable (or failed).
pub type Durable = Box<dyn FnOnce(WalResult<()>) + Send>;

#[derive(Clone)]
pub struct WalConfig {
    /// Directory of the segment files (created if missing).
    pub dir: PathBuf,
    /// Where the segments live instead of files in `dir` (a `MemDir`, or a `PowerLossDir` for
    /// power-cut tests); `None`: a `FileDir` of `dir`.
    pub segment_dir: Option<Arc<dyn DeviceDir>>,
    /// A new segment is started once the current one holds this many bytes. Default 64 MiB.
    pub segment_bytes: u64,
    /// Largest record; longer appends are refused, longer lengths read back are corruption.
    /// Default 16 MiB.
    pub record_bytes_max: usize,
    /// Segments prepared ahead (off the write path) are written with zeros over their whole
    /// length, so that a flush's fdatasync writes data without also committing an extent
    /// change (see store/WAL.md). Default true.
    pub zero_fill: bool,
    /// UNSAFE, for negative-control tests only: never fdatasync.
    pub unsafe_skip_fsync: bool,
    /// UNSAFE, for negative-control tests only: a failed fdatasync is taken for a success (the
    /// appends it was to make durable are acknowledged anyway).
    pub unsafe_ignore_sync_errors: bool,
    /// UNSAFE, for negative-control tests only: recovery takes any invalid record in the newest
    /// segment for a torn tail, even with records of later flushes after it (the rule before
    /// format version 3), and cuts the log there.
    pub unsafe_torn_tail_rule: bool,
    /// Test hook: called before each fdatasync of a flush; an error it returns is taken as the
    /// fdatasync's (how the tests make a sync fail with EIO).
    pub test_sync_hook: Option<SyncHook>,
}

/// See `WalConfig::test_sync_hook`.
pub type SyncHook = Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>;

impl std::fmt::Debug for WalConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalConfig")
            .field("dir", &self.dir)
            .field("segment_dir", &self.segment_dir)
            .field("segment_bytes", &self.segment_bytes)
            .field("record_bytes_max", &self.record_bytes_max)
            .field("zero_fill", &self.zero_fill)
            .field("unsafe_skip_fsync", &self.unsafe_skip_fsync)
            .field("unsafe_torn_tail_rule", &self.unsafe_torn_tail_rule)
            .field("unsafe_ignore_sync_errors", &self.unsafe_ignore_sync_errors)
            .field("test_sync_hook", &self.test_sync_hook.is_some())
            .finish()
    }
}

impl WalConfig {
    pub fn new(dir: impl Into<PathBuf>) -> WalConfig {
        WalConfig {
            dir: dir.into(),
            segment_dir: None,
            segment_bytes: 64 << 20,
            record_bytes_max: 16 << 20,
            zero_fill: true,
            unsafe_skip_fsync: false,
            unsafe_torn_tail_rule: false,
            unsafe_ignore_sync_errors: false,
            test_sync_hook: None,
        }
    }
}

/// Where an entry's record is (the whole record, so that reads check its CRC again).
#[derive(Clone, Copy, Debug)]
pub(crate) struct EntryLoc {
    segment: u64,
    offset: u64,
    len: u32,
    term: u64,
}

/// What the WAL knows of one group.
#[derive(Clone, Debug, Default)]
pub(crate) struct GroupLog {
    entries: BTreeMap<u64, EntryLoc>,
    purged: Option<(u64, u64)>,
    vote: Option<Vec<u8>>,
    committed: Option<Vec<u8>>,
    applied: Option<Vec<u8>>,
    void: Option<Vec<u8>>,
}

impl GroupLog {
    /// What a `Forget` leaves of the group: its vote, and `void`.
    fn forget(&mut self, void: Vec<u8>) {
        *self = GroupLog { vote: self.vote.take(), void: Some(void), ..GroupLog::default() };
    }
}

/// A group's log as openraft asks for it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupLogState {
    /// (index, term) of the last purged entry.
    pub purged: Option<(u64, u64)>,
    /// (index, term) of the last entry, or of the purge point if no entry is left.
    pub last: Option<(u64, u64)>,
    pub vote: Option<Vec<u8>>,
    pub committed: Option<Vec<u8>>,
    pub applied: Option<Vec<u8>>,
    /// The bytes of the group's last `Forget`, if it was ever forgotten here.
    pub void: Option<Vec<u8>>,
}

pub(crate) struct Segment {
    id: u64,
    /// For messages: where the segment is.
    path: PathBuf,
    device: Arc<dyn Device>,
    /// File offset up to which bytes were handed to the flusher (a sector multiple).
    handed: u64,
    /// Appended bytes not yet handed; they start at file offset `handed`.
    pending: Vec<u8>,
    /// Handed bytes whose write may not have completed: (file offset, bytes).
    in_flight: Option<(u64, Arc<Vec<u8>>)>,
    /// Highest entry index per group in this segment (a group forgotten since is left out).
    max_index: HashMap<GroupId, u64>,
    /// Holds a `Forget`: deleted only together with every older segment.
    holds_forget: bool,
}

pub(crate) struct WalState {
    groups: HashMap<GroupId, GroupLog>,
    segments: BTreeMap<u64, Segment>,
    appended_lsn: u64,
    taken_lsn: u64,
    durable_lsn: u64,
    waiting: VecDeque<(u64, Durable)>,
    poisoned: Option<String>,
    shutting_down: bool,
    stats: WalStats,
    /// The next segment, created ahead by the flusher (`prepare_next_segment`), so that a
    /// rollover does no file I/O on the appending thread; and the id being prepared.
    spare: Option<Segment>,
    preparing: Option<u64>,
    /// Flushes taken so far (recovery starts it past the highest flush marker on disk): the
    /// pending bytes of every segment begin with a marker numbered one more.
    flushes_taken: u64,
    /// A flush is being written (by the flusher thread or by an appending thread): flushes
    /// never overlap.
    flushing: bool,
    /// Appends the last flush answered: more than one means appends are arriving together,
    /// and group commit on the flusher beats syncing each on its own thread.
    last_flush_answered: usize,
}

/// Counters since the log was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalStats {
    /// `append` calls accepted.
    pub appends: u64,
    pub flushes: u64,
    pub fsyncs: u64,
    /// Bytes written to segments.
    pub bytes: u64,
}

pub(crate) struct WalInner {
    config: WalConfig,
    /// Where the segments are.
    dir: Arc<dyn DeviceDir>,
    state: Mutex<WalState>,
    flush_wakeup: Condvar,
    /// The thread preparing the next segment, if one was started (joined at close).
    preparer: Mutex<Option<JoinHandle<()>>>,
}

/// The write-ahead log of a node.
pub struct Wal {
    inner: Arc<WalInner>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

fn segment_name(id: u64) -> String {
    format!("wal-{id:016}.log")
}

/// The segment id a name in the directory stands for.
fn segment_id(name: &str) -> Option<u64> {
    name.strip_prefix("wal-").and_then(|n| n.strip_suffix(".log")).and_then(|n| n.parse().ok())
}

impl Wal {
    /// Opens the log in `config.dir`, replaying every segment; returns it with the groups found.
    pub fn open(config: WalConfig) -> WalResult<Wal> {
        let inner = Arc::new(recovery::open(config)?);
        let flusher_inner = inner.clone();
        let flusher = std::thread::Builder::new()
            .name("wal-flush".into())
            .spawn(move || flusher_inner.run_flusher())
            .map_err(|e| WalError::Io { path: "wal-flush thread".into(), source: e })?;
        Ok(Wal { inner, flusher: Mutex::new(Some(flusher)) })
    }

    /// Appends `ops` to `group`'s log; `done` runs on the flusher thread once they are durable.
    pub fn append(&self, group: GroupId, ops: &[WalOp], done: Durable) {
        if self.answer_or_queue(self.inner.append(group, ops), done).is_some() {
            self.inner.flush_wakeup.notify_one();
        }
    }

    /// Answers `done` at once if the append failed, is durable already or the log is
    /// poisoned; otherwise queues it and returns the state, still locked.
    fn answer_or_queue(&self, appended: WalResult<u64>, done: Durable) -> Option<MutexGuard<'_, WalState>> {
        let lsn = match appended {
            Ok(lsn) => lsn,
            Err(err) => {
                done(Err(err));
                return None;
            }
        };
        let mut st = self.inner.state.lock().unwrap();
        if st.durable_lsn >= lsn {
            drop(st);
            done(Ok(()));
            return None;
        }
        if let Some(reason) = st.poisoned.clone() {
            // The flusher failed (and answered its waiters) since the append.
            drop(st);
            done(Err(WalError::Poisoned { reason }));
            return None;
        }
        st.waiting.push_back((lsn, done));
        Some(st)
    }

    /// Appends `ops` to `group`'s log and, when no flush is being written, writes and syncs
    /// them on this thread (with whatever else is pending): `done` then runs before this
    /// returns, without a hand-off to the flusher thread and back. When a flush is being
    /// written, the ops wait for the next one, as with `append`. For a follower's appends,
    /// where the caller has nothing else to do until they are durable.
    pub fn append_syncing(&self, group: GroupId, ops: &[WalOp], done: Durable) {
        let appended = self.append_unsynced(group, ops);
        self.sync_here(appended, done);
    }

    /// The first half of `append_syncing`: appends (readable at once) and returns the log
    /// position to sync to.
    pub fn append_unsynced(&self, group: GroupId, ops: &[WalOp]) -> WalResult<u64> {
        self.inner.append(group, ops)
    }

    /// The second half of `append_syncing`, given what `append_unsynced` returned.
    pub fn sync_here(&self, appended: WalResult<u64>, done: Durable) {
        let Some(mut st) = self.answer_or_queue(appended, done) else { return };
        if st.flushing || st.shutting_down || st.last_flush_answered > 1 {
            // Whoever is flushing looks for more pending bytes when done.
            self.inner.flush_wakeup.notify_one();
            return;
        }
        st.flushing = true;
        let mut st = self.inner.flush_once(st);
        st.flushing = false;
        let more = st.appended_lsn > st.taken_lsn;
        let st = self.inner.prepare_next_segment(st);
        drop(st);
        if more {
            self.inner.flush_wakeup.notify_one();
        }
    }

    /// Appends and waits until durable.
    pub fn append_blocking(&self, group: GroupId, ops: &[WalOp]) -> WalResult<()> {
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        self.append(group, ops, Box::new(move |result| drop(sender.send(result))));
        receiver.recv().unwrap_or(Err(WalError::ShutDown))
    }

    pub fn group_ids(&self) -> Vec<GroupId> {
        let mut ids: Vec<_> = self.inner.state.lock().unwrap().groups.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    pub fn log_state(&self, group: GroupId) -> GroupLogState {
        let st = self.inner.state.lock().unwrap();
        let Some(log) = st.groups.get(&group) else { return GroupLogState::default() };
        let last = log.entries.iter().next_back().map(|(index, loc)| (*index, loc.term)).or(log.purged);
        GroupLogState {
            purged: log.purged,
            last,
            vote: log.vote.clone(),
            committed: log.committed.clone(),
            applied: log.applied.clone(),
            void: log.void.clone(),
        }
    }

    /// Entries of `group` with index in `range` that are still in the log: (index, term, payload).
    pub fn entries(&self, group: GroupId, range: std::ops::Range<u64>) -> WalResult<Vec<(u64, u64, Vec<u8>)>> {
        let mut out = Vec::new();
        let st = self.inner.state.lock().unwrap();
        let Some(log) = st.groups.get(&group) else { return Ok(out) };
        for (index, loc) in log.entries.range(range) {
            out.push((*index, loc.term, self.inner.read_payload(&st, group, *index, loc)?));
        }
        Ok(out)
    }

    pub fn stats(&self) -> WalStats {
        self.inner.state.lock().unwrap().stats
    }

    /// Records `group`'s committed log id in memory only; it reaches the disk with the next
    /// checkpoint (segment rollover or open). For data that may be stale after a crash.
    pub fn set_committed_lazily(&self, group: GroupId, bytes: Vec<u8>) {
        self.inner.state.lock().unwrap().groups.entry(group).or_default().committed = Some(bytes);
    }

    /// Segment files on disk now (for tests and status).
    pub fn segment_count(&self) -> usize {
        self.inner.state.lock().unwrap().segments.len()
    }

    /// Writes the lazily kept commit points, flushes what is pending and stops the flusher.
    pub fn close(&self) {
        {
            let mut st = self.inner.state.lock().unwrap();
            if !st.shutting_down && st.poisoned.is_none() {
                let committed: Vec<(GroupId, Vec<u8>)> = st.groups.iter().filter_map(|(g, log)| log.committed.clone().map(|c| (*g, c))).collect();
                for (group, bytes) in committed {
                    self.inner.append_one(&mut st, group, &WalOp::Committed(bytes));
                }
            }
            st.shutting_down = true;
            self.inner.flush_wakeup.notify_all();
        }
        if let Some(flusher) = self.flusher.lock().unwrap().take() {
            let _ = flusher.join();
        }
        let preparer = self.inner.preparer.lock().unwrap().take();
        if let Some(preparer) = preparer {
            let _ = preparer.join();
        }
        if let Some(spare) = self.inner.state.lock().unwrap().spare.take() {
            self.inner.remove_unused_segment(&spare);
        }
        // Anything still waiting was never made durable (a poisoned log): say so.
        let left: Vec<Durable> = self.inner.state.lock().unwrap().waiting.drain(..).map(|(_, done)| done).collect();
        for done in left {
            done(Err(WalError::ShutDown));
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.close();
    }
}

impl WalInner {
    /// Encodes ops into the active segment and updates the in-memory logs. Returns the log
    /// position that must be durable.
    fn append(&self, group: GroupId, ops: &[WalOp]) -> WalResult<u64> {
        let mut st = self.state.lock().unwrap();
        if let Some(reason) = &st.poisoned {
            return Err(WalError::Poisoned { reason: reason.clone() });
        }
        if st.shutting_down {
            return Err(WalError::ShutDown);
        }
        for op in ops {
            let size = match op {
                WalOp::Entry { payload, .. } => payload.len() + 32,
                WalOp::Vote(bytes) | WalOp::Committed(bytes) | WalOp::Applied(bytes) | WalOp::Forget(bytes) | WalOp::Void(bytes) => bytes.len() + 16,
                _ => 32,
            };
            if size > self.config.record_bytes_max {
                return Err(WalError::TooBig { size_bytes: size, limit_bytes: self.config.record_bytes_max });
            }
        }
        for op in ops {
            let active_len = {
                let active = st.segments.values().next_back().expect("an active segment");
                active.handed + active.pending.len() as u64
            };
            if active_len >= self.config.segment_bytes {
                self.roll_over(&mut st)?;
            }
            self.append_one(&mut st, group, op);
        }
        st.stats.appends += 1;
        Ok(st.appended_lsn)
    }

    fn append_one(&self, st: &mut WalState, group: GroupId, op: &WalOp) {
        let flush_number = st.flushes_taken + 1;
        let active = st.segments.values_mut().next_back().expect("an active segment");
        if active.pending.is_empty() {
            format::encode_flush_marker(&mut active.pending, active.id, flush_number);
            st.appended_lsn += active.pending.len() as u64;
        }
        let before = active.pending.len();
        encode_record(&mut active.pending, group, op);
        let record_len = (active.pending.len() - before) as u32;
        let file_offset = active.handed + before as u64;
        let segment = active.id;
        st.appended_lsn += record_len as u64;
        let log = st.groups.entry(group).or_default();
        match op {
            WalOp::Entry { index, term, .. } => {
                log.entries.split_off(index);
                log.entries.insert(*index, EntryLoc { segment, offset: file_offset, len: record_len, term: *term });
                let max = active.max_index.entry(group).or_default();
                *max = (*max).max(*index);
            }
            WalOp::Truncate { from_index } => {
                // Not counted for deletion: a later segment's checkpoint (purge point and log
                // end) and any re-appended entries cover what this truncate voided.
                log.entries.split_off(from_index);
            }
            WalOp::Purge { upto_index, upto_term } => {
                log.entries = log.entries.split_off(&(upto_index + 1));
                log.purged = Some((*upto_index, *upto_term));
            }
            WalOp::Vote(bytes) => log.vote = Some(bytes.clone()),
            WalOp::Committed(bytes) => log.committed = Some(bytes.clone()),
            WalOp::Applied(bytes) => log.applied = Some(bytes.clone()),
            WalOp::Void(bytes) => log.void = Some(bytes.clone()),
            WalOp::Forget(bytes) => {
                log.forget(bytes.clone());
                // The voided entries pin no segment; the one holding the Forget goes last.
                for segment in st.segments.values_mut() {
                    segment.max_index.remove(&group);
                }
                st.segments.values_mut().next_back().expect("an active segment").holds_forget = true;
            }
        }
    }

    /// Reads an entry's payload: from the buffers if not yet written, else from its file; the
    /// record's CRC, group and index are checked again either way.
    fn read_payload(&self, st: &WalState, group: GroupId, index: u64, loc: &EntryLoc) -> WalResult<Vec<u8>> {
        let segment = st.segments.get(&loc.segment).expect("entries in the index live in kept segments");
        let (start, end) = (loc.offset, loc.offset + loc.len as u64);
        let record = if start >= segment.handed {
            let at = (start - segment.handed) as usize;
            segment.pending[at..at + loc.len as usize].to_vec()
        } else if let Some(bytes) = segment.in_flight.as_ref().and_then(|(from, bytes)| {
            (start >= *from && end <= from + bytes.len() as u64).then(|| bytes[(start - from) as usize..(end - from) as usize].to_vec())
        }) {
            bytes
        } else {
            let mut buf = vec![0u8; loc.len as usize];
            segment.device.read_at(&mut buf, start).map_err(|e| WalError::Io { path: segment.path.clone(), source: e })?;
            buf
        };
        match format::decode_at(&record, 0, self.config.record_bytes_max) {
            (format::Step::Record(format::Decoded::Entry { group: g, index: i, payload, .. }), _) if g == group && i == index => Ok(payload.to_vec()),
            (step, _) => {
                Err(WalError::Corrupt { path: segment.path.clone(), offset: start, what: format!("entry {index} of group {group} reads back as {step:?}") })
            }
        }
    }
}
