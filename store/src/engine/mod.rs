//! The storage engine: one `Namespace` per namespace, on one or more devices.
//!
//! Reading order: `mod.rs` (the public API, reads and the write path above the buffer),
//! `state.rs` (index and block table), `writer.rs` (buffers, flusher, group commit),
//! `scan.rs` (start-up), `defrag.rs`, `nsup.rs` (expiration and eviction).
//!
//! Invariants:
//! - **A write is acknowledged only after its bytes are on stable storage** when
//!   commit-to-device is on; with it off, after they are in the write buffer.
//! - **A read never returns bytes that failed their checksum**, nor (with commit-to-device)
//!   a version that is not yet durable: it waits for the flush first.
//! - **The newest version of a record is the one with the highest seq**; tombstones are
//!   versions too, and stay until no older version can remain on any device.
//! - **Block accounting matches the index**: a block's live bytes are the sum of the lengths
//!   of the index entries pointing into it.

mod batch;
mod defrag;
mod nsup;
mod scan;
mod state;
mod transfer;
mod writer;

pub use transfer::{Importer, RecordVersion};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::config::NamespaceConfig;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::format::{decode_body, encode_record, encoded_record_len, verify_record, RecordHeader, RECORD_FLAG_TOMBSTONE};
use crate::key::{Digest, Key};
use crate::ops::{plan, Mutation, OpResult, Operation, Plan, PlanContext, WriteOp, WritePolicy};
use crate::value::{Bin, Record, RecordMeta};

pub use state::INDEX_BYTES_PER_RECORD;
use state::{IndexEntry, Purpose, State};

/// Wall-clock source for last-update times and TTLs. Safety never depends on it.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }
}

/// Moments tests may want to act on (kill a process during defragmentation, say).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineEvent {
    DefragBlockStart { device: u16, block: u32 },
    DefragBlockDone { device: u16, block: u32, moved_records: u32, dropped_tombstones: u32 },
    Flushed { device: u16, bytes: usize },
}

pub type Observer = Arc<dyn Fn(&EngineEvent) + Send + Sync>;

/// How to open a namespace beyond its config.
#[derive(Default)]
pub struct OpenOptions {
    /// Devices already opened (tests: memory or power-loss devices), in config order.
    /// `None`: open or create the files and block devices the config names.
    pub devices: Option<Vec<Arc<dyn Device>>>,
    pub clock: Option<Arc<dyn Clock>>,
    pub observer: Option<Observer>,
    /// The namespace is a Raft state machine: every write must come through the log, so the
    /// engine does not reclaim expired records or evict on its own (a local tombstone's seq
    /// would not be a log index, and replicas would diverge). Expired records stay invisible.
    pub replicated: bool,
    /// Durable points recorded earlier (a replicated namespace records them with each applied
    /// point): start-up then tells damage to acknowledged data from a torn tail, and a device
    /// that was replaced from one that was not. `None`: only sealed blocks can be checked.
    pub durable_points: Option<Vec<DurablePoint>>,
    /// Groups of a replicated namespace whose replica left this node (`Namespace::forget_group`):
    /// their records written before these points are void, and the scan leaves them out.
    pub void_points: Option<VoidPoints>,
}

/// Per group (of `groups`, a record's group being its partition modulo `groups`), the device
/// positions below which the group's records are void.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VoidPoints {
    pub groups: u32,
    pub points: Vec<(u32, Vec<DurablePoint>)>,
}

impl VoidPoints {
    /// Per group, the void position on device `device` whose id is `device_id` (0: none). A
    /// point recorded on another device (since replaced) voids nothing here.
    fn for_device(&self, device: u16, device_id: u64) -> Vec<u64> {
        let mut lsns = vec![0; self.groups as usize];
        for (group, points) in &self.points {
            let matching = points.iter().filter(|p| p.device == device && p.device_id == device_id);
            if let (Some(lsn), Some(slot)) = (matching.map(|p| p.lsn).max(), lsns.get_mut(*group as usize)) {
                *slot = lsn;
            }
        }
        lsns
    }
}

/// A device was durable up to `lsn` (its log position): every block and record written before
/// it was on stable storage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DurablePoint {
    /// The device's index in the namespace's configuration, and the id in its header.
    pub device: u16,
    pub device_id: u64,
    pub lsn: u64,
}

/// What the start-up scan found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    pub blocks_scanned: u64,
    pub bytes_scanned: u64,
    pub records_found: u64,
    pub checksum_mismatches: u64,
    pub torn_records: u64,
    pub damaged_block_headers: u64,
    /// Non-zero bytes found where only records or zero padding can be.
    pub garbage_regions: u64,
    /// (device, block) of blocks that lost records written before the durable point, or whose
    /// header is damaged: what they held is gone from this copy.
    pub damaged_blocks: Vec<(u16, u32)>,
    /// Devices that are not the ones the durable points were recorded on (replaced or
    /// reformatted): everything they held is gone from this copy.
    pub replaced_devices: Vec<u16>,
    /// Blocks left open by the last stop (no trailer) that start-up sealed.
    pub blocks_sealed_at_start: u64,
    pub elapsed_ms: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub fsyncs: AtomicU64,
    pub defrag_blocks: AtomicU64,
    pub defrag_moved_records: AtomicU64,
    pub tombstones_dropped: AtomicU64,
    pub expired: AtomicU64,
    pub evicted: AtomicU64,
}

/// A snapshot of the namespace's figures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub records: u64,
    pub tombstones: u64,
    pub writes: u64,
    pub flushes: u64,
    pub fsyncs: u64,
    pub defrag_blocks: u64,
    pub defrag_moved_records: u64,
    pub tombstones_dropped: u64,
    pub expired: u64,
    pub evicted: u64,
    pub free_blocks: u64,
    pub total_blocks: u64,
    /// Lowest free-block percentage over the devices.
    pub available_pct: u64,
    pub memory_used_bytes: u64,
    pub stop_writes: Option<String>,
    pub poisoned_devices: Vec<String>,
    pub scan: ScanReport,
}

pub(crate) struct Inner {
    pub config: NamespaceConfig,
    pub devices: Vec<Arc<dyn Device>>,
    pub state: Mutex<State>,
    /// One per device: wakes its flusher.
    pub flush_wakeups: Vec<Condvar>,
    /// One per device, held across each write+fdatasync: an I/O error reported to one sync
    /// can then never be missed by another thread's sync (Linux reports it once).
    pub io_locks: Vec<Mutex<()>>,
    /// Random id written in the device header and every block header, per device.
    pub device_ids: Vec<u64>,
    /// Wakes everyone waiting for durability.
    pub durable_wakeup: Condvar,
    /// Serializes writers (and defragmentation) per record, chosen by digest.
    pub record_locks: Vec<Mutex<()>>,
    pub shutting_down: AtomicBool,
    /// Set after defragmentation and nsup have stopped: flushers flush what is left and exit.
    pub flushers_stopping: AtomicBool,
    /// Wakes background threads early at shutdown.
    pub background_wakeup: Condvar,
    pub clock: Arc<dyn Clock>,
    pub observer: Option<Observer>,
    pub stats: Counters,
    pub scan_report: ScanReport,
    /// A Raft state machine (see `OpenOptions::replicated`).
    pub replicated: bool,
    /// In a replicated namespace: (groups, durable applied log index per group). A tombstone may
    /// be dropped only at or below its group's point: the log is never replayed from earlier.
    pub tombstone_floors: Mutex<Option<(u32, Vec<u64>)>>,
    /// Held by defragmentation while it empties a block, and by `forget_group` from the moment
    /// it takes its void points until the group's records left the index: no record of the
    /// group is copied past its void point meanwhile.
    pub defrag_lock: Mutex<()>,
}

/// One version of a record, as `Inner::commit` writes it.
pub(crate) struct Version<'a> {
    pub key: &'a Key,
    pub bins: &'a [Bin],
    pub generation: u32,
    pub void_time_secs: u32,
    pub tombstone: bool,
    pub now_ms: u64,
    /// The Raft log index of a replicated write (its seq); `None` for a local write.
    pub seq: Option<u64>,
}

/// Where a replicated write comes from: its log index (used as the version's seq) and the
/// leader's clock when it was proposed (so every replica computes the same TTLs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replicated {
    pub log_index: u64,
    pub now_ms: u64,
}

fn expired_at(entry: &IndexEntry, now_secs: u32) -> bool {
    entry.void_time_secs != 0 && entry.void_time_secs <= now_secs
}

const RECORD_LOCK_COUNT: usize = 1024;
/// Reads retried when a record moved under them (defragmentation) before giving up.
const READ_ATTEMPTS_MAX: usize = 16;

impl Inner {
    /// May defragmentation drop this tombstone (given that no older version remains)?
    pub(crate) fn tombstone_may_go(&self, digest: &Digest, seq: u64) -> bool {
        if !self.replicated {
            return true;
        }
        match &*self.tombstone_floors.lock().unwrap() {
            Some((groups, floors)) => floors[(crate::key::partition_id(digest) as u32 % groups) as usize] >= seq,
            None => false,
        }
    }

    pub(crate) fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Notifies while holding the state lock, so no waiter misses the wakeup between its
    /// check and its wait.
    fn notify_all_under_lock(&self, notify: impl Fn(&Inner)) {
        let _st = self.state.lock().unwrap();
        notify(self);
    }

    pub(crate) fn observe(&self, event: EngineEvent) {
        if let Some(observer) = &self.observer {
            observer(&event);
        }
    }

    pub(crate) fn device_for(&self, digest: &Digest) -> u16 {
        (u32::from_le_bytes(digest[8..12].try_into().unwrap()) % self.devices.len() as u32) as u16
    }

    pub(crate) fn record_lock(&self, digest: &Digest) -> MutexGuard<'_, ()> {
        let slot = u16::from_le_bytes([digest[12], digest[13]]) as usize % RECORD_LOCK_COUNT;
        self.record_locks[slot].lock().unwrap()
    }

    pub(crate) fn now_secs(&self) -> u32 {
        (self.clock.now_ms() / 1000) as u32
    }

    /// The record's newest version as bytes, checked; `None` if the index has nothing.
    /// Waits for durability first when commit-to-device is on.
    pub(crate) fn read_version(&self, digest: &Digest) -> Result<Option<(IndexEntry, Vec<u8>)>> {
        let mut last_failure = None;
        for _ in 0..READ_ATTEMPTS_MAX {
            let mut st = self.state.lock().unwrap();
            let Some(entry) = st.index.get(digest).copied() else { return Ok(None) };
            let dev = &st.devices[entry.device as usize];
            let in_buffer = dev.copy_from_buffers(entry.block, entry.offset, entry.len);
            let lsn = dev.lsn_needed(entry.block, entry.offset, entry.len);
            if self.config.commit_to_device && lsn > 0 {
                st = self.wait_durable(st, entry.device, lsn)?;
            }
            drop(st);
            let bytes = match in_buffer {
                Some(bytes) => bytes,
                None => {
                    let mut bytes = vec![0u8; entry.len as usize];
                    let offset = self.block_offset(entry.block) + entry.offset as u64;
                    let device = &self.devices[entry.device as usize];
                    device.read_at(&mut bytes, offset).map_err(|e| Error::io(device.path(), e))?;
                    bytes
                }
            };
            match verify_record(&bytes, entry.block, entry.offset as usize) {
                Some(header) if header.digest == *digest && header.seq == entry.seq => return Ok(Some((entry, bytes))),
                _ => {}
            }
            // Either the record moved (defragmentation) and its old block was reused, or the
            // bytes are bad. If the index still points at the same place, they are bad.
            let unchanged = self.state.lock().unwrap().index.get(digest) == Some(&entry);
            let offset = self.block_offset(entry.block) + entry.offset as u64;
            last_failure = Some((entry.device, offset));
            if unchanged {
                break;
            }
        }
        let (device, offset) = last_failure.expect("loop ran");
        Err(Error::Corrupt {
            path: self.devices[device as usize].path().to_owned(),
            offset,
            what: "record failed its checksum on read; it is not returned".into(),
        })
    }

    pub(crate) fn block_offset(&self, block: u32) -> u64 {
        block as u64 * self.config.write_block_size as u64
    }

    /// The visible record at `now_secs`: `None` for nothing, a tombstone, or an expired record.
    fn read_record(&self, digest: &Digest, now_secs: u32) -> Result<Option<Record>> {
        let Some((entry, bytes)) = self.read_version(digest)? else { return Ok(None) };
        if entry.tombstone || expired_at(&entry, now_secs) {
            return Ok(None);
        }
        let header = verify_record(&bytes, entry.block, entry.offset as usize).expect("verified by read_version");
        let (set, bins) = decode_body(&bytes).map_err(|what| self.undecodable(&entry, what))?;
        let meta = RecordMeta { generation: header.generation, void_time_secs: header.void_time_secs, last_update_ms: header.last_update_ms };
        Ok(Some(Record { set, meta, bins }))
    }

    pub(crate) fn is_expired(&self, entry: &IndexEntry) -> bool {
        expired_at(entry, self.now_secs())
    }

    /// Why writes are refused right now, if they are.
    fn stop_writes_reason(&self, st: &State) -> Option<String> {
        let memory_limit = self.config.memory_size / 100 * self.config.stop_writes_pct as u64;
        if st.memory_used_bytes() > memory_limit {
            return Some(format!(
                "index memory {} bytes is past stop-writes-pct {}% of memory-size {}",
                st.memory_used_bytes(),
                self.config.stop_writes_pct,
                self.config.memory_size
            ));
        }
        for (d, dev) in st.devices.iter().enumerate() {
            let path = self.devices[d].path().display();
            if dev.available_pct() < self.config.min_avail_pct as u64 {
                return Some(format!("device {path} has {}% free blocks, below min-avail-pct {}%", dev.available_pct(), self.config.min_avail_pct));
            }
            if dev.free.len() <= state::DEFRAG_RESERVE_BLOCKS {
                return Some(format!("device {path} is down to its last {} free blocks, kept for defragmentation", dev.free.len()));
            }
        }
        None
    }

    /// The one write path: every put, delete, touch and operate (and expiry) comes here.
    pub(crate) fn write(&self, key: &Key, policy: &WritePolicy, mutation: Mutation<'_>) -> Result<(RecordMeta, Vec<OpResult>)> {
        Ok(self.write_version(key, policy, mutation, None)?.expect("only replicated writes are skipped"))
    }

    /// The write path shared by local and replicated writes. A replicated write is skipped
    /// (`Ok(None)`) when the record already holds a version from that log index or later.
    pub(crate) fn write_version(
        &self,
        key: &Key,
        policy: &WritePolicy,
        mutation: Mutation<'_>,
        replicated: Option<Replicated>,
    ) -> Result<Option<(RecordMeta, Vec<OpResult>)>> {
        if self.is_shutting_down() {
            return Err(Error::ShutDown(self.config.name.clone()));
        }
        if key.set.len() > Key::SET_NAME_MAX_BYTES {
            return Err(Error::BadRequest(format!("set name is {} bytes, the limit is {}", key.set.len(), Key::SET_NAME_MAX_BYTES)));
        }
        let now_ms = replicated.map_or_else(|| self.clock.now_ms(), |r| r.now_ms);
        let record_lock = self.record_lock(&key.digest);
        if let Some(replicated) = replicated {
            let current = self.state.lock().unwrap().index.get(&key.digest).map(|e| e.seq);
            if current.is_some_and(|seq| seq >= replicated.log_index) {
                return Ok(None);
            }
        }
        let existing = self.read_record(&key.digest, (now_ms / 1000) as u32)?;
        let ctx = PlanContext { now_ms, default_ttl_secs: self.config.default_ttl_secs, bin_bytes_max: self.config.record_size_limit() };
        let existing_meta = existing.as_ref().map(|r| r.meta.clone());
        let (plan, results) = plan(existing, policy, &mutation, &ctx)?;
        let (bins, generation, void_time_secs, tombstone) = match plan {
            Plan::Nothing => {
                let meta = existing_meta.unwrap_or(RecordMeta { generation: 0, void_time_secs: 0, last_update_ms: 0 });
                return Ok(Some((meta, results)));
            }
            Plan::Write { bins, generation, void_time_secs } => (bins, generation, void_time_secs, false),
            Plan::Delete { generation } => (Vec::new(), generation, 0, true),
        };
        let seq = replicated.map(|r| r.log_index);
        let version = Version { key, bins: &bins, generation, void_time_secs, tombstone, now_ms, seq };
        let meta = self.commit(version, record_lock)?;
        Ok(Some((meta, results)))
    }

    /// Appends one version of a record, installs it in the index and, with commit-to-device,
    /// waits until it is durable. The caller holds the record's lock, which is released before
    /// waiting.
    pub(crate) fn commit(&self, version: Version<'_>, record_lock: MutexGuard<'_, ()>) -> Result<RecordMeta> {
        let Version { key, bins, generation, void_time_secs, tombstone, now_ms, seq } = version;
        let replicated = seq.is_some();
        let flags = if tombstone { RECORD_FLAG_TOMBSTONE } else { 0 };
        let is_delete = tombstone;
        let size = encoded_record_len(&key.set, bins);
        if size > self.config.record_size_limit() {
            return Err(Error::RecordTooBig { size_bytes: size, limit_bytes: self.config.record_size_limit() });
        }
        let header =
            RecordHeader { total_len: size as u32, flags, seq: 0, block_epoch: 0, digest: key.digest, generation, void_time_secs, last_update_ms: now_ms };
        let bytes = encode_record(&header, &key.set, bins);
        let device = self.device_for(&key.digest);

        let mut st = self.state.lock().unwrap();
        if let Some(reason) = &st.devices[device as usize].poisoned {
            return Err(self.device_failed(device, reason));
        }
        // A replicated write was decided by the leader: every replica must apply it, so local
        // limits do not refuse it (the leader checks them before proposing).
        if !is_delete && !replicated {
            if let Some(reason) = self.stop_writes_reason(&st) {
                return Err(Error::StopWrites { namespace: self.config.name.clone(), reason });
            }
        }
        // A replicated write waits for the cache to drain instead of being refused (other
        // groups' writes may fill it again while this one waits: wait again).
        if replicated {
            loop {
                let dev = &st.devices[device as usize];
                if dev.appended_lsn - dev.durable_lsn + bytes.len() as u64 <= self.config.max_write_cache {
                    break;
                }
                let lsn = dev.appended_lsn;
                st = self.wait_durable(st, device, lsn)?;
            }
        }
        let dev = &st.devices[device as usize];
        let unflushed = dev.appended_lsn - dev.durable_lsn;
        if unflushed + bytes.len() as u64 > self.config.max_write_cache {
            return Err(Error::DeviceOverload {
                path: self.devices[device as usize].path().to_owned(),
                unflushed_bytes: unflushed,
                limit_bytes: self.config.max_write_cache,
            });
        }
        let seq = match seq {
            Some(seq) => {
                st.next_seq = st.next_seq.max(seq + 1);
                seq
            }
            None => {
                st.next_seq += 1;
                st.next_seq - 1
            }
        };
        let purpose = if is_delete || replicated { Purpose::Delete } else { Purpose::Write };
        let placed = self.append(&mut st, device, &bytes, seq, purpose)?;
        let entry =
            IndexEntry { seq, block: placed.block, offset: placed.offset, len: bytes.len() as u32, generation, void_time_secs, device, tombstone: is_delete };
        st.install(key.digest, entry);
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        drop(record_lock);
        if self.config.commit_to_device {
            drop(self.wait_durable(st, device, placed.lsn_end)?);
        }
        Ok(RecordMeta { generation, void_time_secs, last_update_ms: now_ms })
    }
}

/// A namespace open on its devices. Cheap to share: all methods take `&self`.
pub struct Namespace {
    inner: Arc<Inner>,
    /// Defragmentation and nsup: stopped first, as they may wait on the flushers.
    background: Mutex<Vec<JoinHandle<()>>>,
    flushers: Mutex<Vec<JoinHandle<()>>>,
}

impl Namespace {
    /// Opens (creating devices that do not exist yet) and scans the devices to rebuild the
    /// index, then starts the flusher, defragmentation and expiration threads.
    pub fn open(config: NamespaceConfig, options: OpenOptions) -> Result<Namespace> {
        config.sanitize()?;
        let replicated = options.replicated;
        let inner = Arc::new(scan::open(config, options)?);
        let mut flushers = Vec::new();
        for device in 0..inner.devices.len() as u16 {
            let inner = inner.clone();
            flushers.push(spawn(format!("flush-{device}"), move || inner.run_flusher(device))?);
        }
        let namespace = Namespace { inner: inner.clone(), background: Mutex::new(Vec::new()), flushers: Mutex::new(flushers) };
        let defrag_inner = inner.clone();
        let defrag = spawn("defrag".into(), move || defrag_inner.run_defrag())?;
        namespace.background.lock().unwrap().push(defrag);
        if !replicated {
            let nsup = spawn("nsup".into(), move || inner.run_nsup())?;
            namespace.background.lock().unwrap().push(nsup);
        }
        Ok(namespace)
    }

    pub fn name(&self) -> &str {
        &self.inner.config.name
    }

    pub fn config(&self) -> &NamespaceConfig {
        &self.inner.config
    }

    /// The record with all its bins, or only the named ones (`Some(&[...])`).
    pub fn get(&self, key: &Key, bins: Option<&[&str]>) -> Result<Option<Record>> {
        let mut record = self.inner.read_record(&key.digest, self.inner.now_secs())?;
        if let (Some(record), Some(names)) = (record.as_mut(), bins) {
            record.bins.retain(|bin| names.contains(&bin.name.as_str()));
        }
        Ok(record)
    }

    /// The record's metadata, if it exists (same checks as a read).
    pub fn exists(&self, key: &Key) -> Result<Option<RecordMeta>> {
        Ok(self.inner.read_record(&key.digest, self.inner.now_secs())?.map(|r| r.meta))
    }

    pub fn put(&self, key: &Key, bins: &[Bin], policy: &WritePolicy) -> Result<RecordMeta> {
        Ok(self.inner.write(key, policy, Mutation::Put(bins))?.0)
    }

    /// Durable delete: writes a tombstone. RecordNotFound if there is nothing to delete.
    pub fn delete(&self, key: &Key, policy: &WritePolicy) -> Result<RecordMeta> {
        Ok(self.inner.write(key, policy, Mutation::Delete)?.0)
    }

    /// Rewrites the record with generation + 1 and a void time from the policy's TTL.
    pub fn touch(&self, key: &Key, policy: &WritePolicy) -> Result<RecordMeta> {
        Ok(self.inner.write(key, policy, Mutation::Touch)?.0)
    }

    /// Applies `ops` atomically; returns the record's metadata after them and one result per
    /// read step (ReadAll gives one per bin).
    pub fn operate(&self, key: &Key, ops: &[Operation], policy: &WritePolicy) -> Result<(RecordMeta, Vec<OpResult>)> {
        self.inner.write(key, policy, Mutation::Operate(ops))
    }

    /// Applies a write decided through Raft at `replicated.log_index`. Every replica gets the
    /// same result from the same state; local limits (stop-writes, a full write cache) do not
    /// refuse it. `Ok(None)`: the record already reflects this entry (a replay after restart).
    pub fn apply_replicated(&self, key: &Key, op: &WriteOp, policy: &WritePolicy, replicated: Replicated) -> Result<Option<(RecordMeta, Vec<OpResult>)>> {
        if let Some(writes) = op.batch() {
            return Ok(self.inner.write_batch(writes, replicated)?.map(|meta| (meta, Vec::new())));
        }
        let mutation = crate::ops::mutation_of(op).ok_or_else(|| Error::BadRequest(format!("{op:?} is not a record write")))?;
        self.inner.write_version(key, policy, mutation, Some(replicated))
    }

    /// The seq, generation and void time of a record's current version (a tombstone included),
    /// from the index.
    pub fn current_version(&self, digest: &crate::key::Digest) -> Option<(u64, u32, u32)> {
        let st = self.inner.state.lock().unwrap();
        st.index.get(digest).map(|e| (e.seq, e.generation, e.void_time_secs))
    }

    /// Makes everything written so far durable (what commit-to-device = false leaves buffered).
    pub fn flush(&self) -> Result<()> {
        self.flush_to_durable_point().map(drop)
    }

    /// Flushes everything written so far and returns each device's durable point (what
    /// `OpenOptions::durable_points` takes after a restart).
    pub fn flush_to_durable_point(&self) -> Result<Vec<DurablePoint>> {
        let mut points = Vec::with_capacity(self.inner.devices.len());
        for device in 0..self.inner.devices.len() as u16 {
            let st = self.inner.state.lock().unwrap();
            let lsn = st.devices[device as usize].appended_lsn;
            drop(self.inner.wait_durable(st, device, lsn)?);
            points.push(DurablePoint { device, device_id: self.inner.device_ids[device as usize], lsn });
        }
        Ok(points)
    }

    /// Did the start-up scan find acknowledged records missing (damaged blocks, or a device
    /// that is not the one the durable points were recorded on)?
    pub fn lost_acknowledged_records(&self) -> bool {
        let report = &self.inner.scan_report;
        !report.damaged_blocks.is_empty() || !report.replaced_devices.is_empty()
    }

    /// After the records of damaged blocks were restored from elsewhere: empties the damaged
    /// blocks still in use (their intact records move) and frees them, so the next start-up
    /// does not find the damage again. (A block whose header was damaged is free already and
    /// is rewritten when it is reused.)
    pub fn retire_damaged_blocks(&self) -> Result<()> {
        for &(device, block) in &self.inner.scan_report.damaged_blocks {
            self.inner.defrag_block(device, block)?;
        }
        Ok(())
    }

    /// Replicated namespaces: group `group` (of `groups`) has everything up to `applied_index`
    /// durable and will never replay its log from before it; tombstones of the group at or
    /// below it may be dropped once nothing older remains.
    pub fn set_tombstone_floor(&self, group: u32, groups: u32, applied_index: u64) {
        let mut floors = self.inner.tombstone_floors.lock().unwrap();
        let (known_groups, values) = floors.get_or_insert_with(|| (groups, vec![0; groups as usize]));
        if *known_groups == groups && (group as usize) < values.len() {
            values[group as usize] = values[group as usize].max(applied_index);
        }
    }

    /// Forgets replicated group `group` (of `groups`), whose replica left this node: every
    /// record of the group written so far becomes void. The device positions it was written
    /// below are handed to `persist`, which must record them durably (a restart passes them in
    /// `OpenOptions::void_points`); only then do the records leave the index, so defragmentation
    /// frees their space. The group must not be written meanwhile. Returns how many records
    /// (tombstones included) left the index. If `persist` fails, nothing changes.
    pub fn forget_group(&self, group: u32, groups: u32, persist: impl FnOnce(&[DurablePoint]) -> Result<()>) -> Result<u64> {
        let inner = &self.inner;
        let _no_defrag = inner.defrag_lock.lock().unwrap();
        let points: Vec<DurablePoint> = {
            let st = inner.state.lock().unwrap();
            st.devices.iter().enumerate().map(|(d, dev)| DurablePoint { device: d as u16, device_id: inner.device_ids[d], lsn: dev.appended_lsn }).collect()
        };
        persist(&points)?;
        let in_group = |digest: &Digest| crate::key::partition_id(digest) as u32 % groups == group;
        let mut st = inner.state.lock().unwrap();
        let gone: Vec<Digest> = st.index.keys().filter(|digest| in_group(digest)).copied().collect();
        for digest in &gone {
            st.remove(digest);
        }
        drop(st);
        // The group's log starts over should it come back: no tombstone floor from before.
        if let Some((known_groups, floors)) = &mut *inner.tombstone_floors.lock().unwrap() {
            if *known_groups == groups && (group as usize) < floors.len() {
                floors[group as usize] = 0;
            }
        }
        self.wake_background();
        Ok(gone.len() as u64)
    }

    /// Why writes are refused right now (stop-writes), if they are.
    pub fn stop_writes_reason(&self) -> Option<String> {
        let st = self.inner.state.lock().unwrap();
        self.inner.stop_writes_reason(&st)
    }

    pub fn stats(&self) -> Stats {
        let inner = &self.inner;
        let st = inner.state.lock().unwrap();
        let counter = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            records: st.live_records(),
            tombstones: st.tombstones,
            writes: counter(&inner.stats.writes),
            flushes: counter(&inner.stats.flushes),
            fsyncs: counter(&inner.stats.fsyncs),
            defrag_blocks: counter(&inner.stats.defrag_blocks),
            defrag_moved_records: counter(&inner.stats.defrag_moved_records),
            tombstones_dropped: counter(&inner.stats.tombstones_dropped),
            expired: counter(&inner.stats.expired),
            evicted: counter(&inner.stats.evicted),
            free_blocks: st.devices.iter().map(|d| d.free.len() as u64).sum(),
            total_blocks: st.devices.iter().map(|d| d.blocks.len() as u64 - 1).sum(),
            available_pct: st.devices.iter().map(|d| d.available_pct()).min().unwrap_or(0),
            memory_used_bytes: st.memory_used_bytes(),
            stop_writes: inner.stop_writes_reason(&st),
            poisoned_devices: st
                .devices
                .iter()
                .enumerate()
                .filter_map(|(d, dev)| dev.poisoned.as_ref().map(|r| format!("{}: {r}", inner.devices[d].path().display())))
                .collect(),
            scan: inner.scan_report.clone(),
        }
    }

    /// Whether writes of `bytes` in all would find room in every device's write cache with
    /// half of it to spare, so that applying them now does not wait for a flush (unless other
    /// writers fill the cache meanwhile).
    pub fn write_cache_has_room(&self, bytes: u64) -> bool {
        let st = self.inner.state.lock().unwrap();
        let limit = self.inner.config.max_write_cache;
        st.devices.iter().all(|dev| dev.appended_lsn - dev.durable_lsn + bytes + limit / 2 <= limit)
    }

    /// Wakes defragmentation (and nsup) now rather than at their next timer.
    pub fn wake_background(&self) {
        self.inner.notify_all_under_lock(|inner| inner.background_wakeup.notify_all());
    }

    /// Clean shutdown: flushes what is buffered and stops the background threads.
    pub fn close(self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&self) -> Result<()> {
        let mut flushers = self.flushers.lock().unwrap();
        if flushers.is_empty() {
            return Ok(()); // already closed
        }
        // New writes are refused from here; background threads finish their step and exit.
        self.inner.shutting_down.store(true, Ordering::Release);
        self.inner.notify_all_under_lock(|inner| inner.background_wakeup.notify_all());
        for worker in self.background.lock().unwrap().drain(..) {
            let _ = worker.join();
        }
        let flushed = self.flush();
        self.inner.flushers_stopping.store(true, Ordering::Release);
        self.inner.notify_all_under_lock(|inner| inner.flush_wakeups.iter().for_each(Condvar::notify_all));
        for worker in flushers.drain(..) {
            let _ = worker.join();
        }
        if flushed.is_ok() {
            tracing::info!(namespace = %self.inner.config.name, "namespace closed clean");
        }
        flushed
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Err(err) = self.shutdown() {
            tracing::error!(namespace = %self.inner.config.name, %err, "namespace closed with buffered writes not flushed");
        }
    }
}

fn spawn(name: String, body: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name.clone()).spawn(body).map_err(|e| Error::io(format!("thread {name}"), e))
}
