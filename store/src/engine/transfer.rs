//! Moving a set of records between engines (Raft snapshots of a partition group).
//!
//! Versions keep their seq (under Raft, the log index that wrote them), so a receiver that
//! later replays log entries skips those a version already reflects.

use serde::{Deserialize, Serialize};

use super::{Inner, Namespace, Version};
use crate::error::{Error, Result};
use crate::format::decode_body;
use crate::key::{Digest, Key};
use crate::value::{Bin, RecordMeta};

/// One record as a snapshot carries it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordVersion {
    pub set: String,
    pub digest: Digest,
    /// Empty for a tombstone.
    pub bins: Vec<Bin>,
    pub meta: RecordMeta,
    pub seq: u64,
    /// A deletion: a receiver replaying older log entries must know the record is gone.
    pub tombstone: bool,
}

impl Namespace {
    /// Every record and tombstone whose digest passes `filter`, with its seq.
    pub fn export(&self, filter: impl Fn(&Digest) -> bool) -> Result<Vec<RecordVersion>> {
        let mut out = Vec::new();
        self.export_each(filter, |version| {
            out.push(version);
            Ok(())
        })?;
        Ok(out)
    }

    /// Hands every record and tombstone whose digest passes `filter` to `sink`, one at a time
    /// (only the digests, 20 bytes a record, are held at once). Returns how many.
    pub fn export_each(&self, filter: impl Fn(&Digest) -> bool, mut sink: impl FnMut(RecordVersion) -> Result<()>) -> Result<u64> {
        let digests: Vec<Digest> = {
            let st = self.inner.state.lock().unwrap();
            st.index.keys().filter(|d| filter(d)).copied().collect()
        };
        let mut count = 0;
        for digest in digests {
            let Some((entry, bytes)) = self.inner.read_version(&digest)? else { continue };
            let (set, bins) = decode_body(&bytes).map_err(|what| self.inner.undecodable(&entry, what))?;
            let header = crate::format::parse_header(&bytes);
            let meta = RecordMeta { generation: header.generation, void_time_secs: header.void_time_secs, last_update_ms: header.last_update_ms };
            sink(RecordVersion { set, digest, bins, meta, seq: header.seq, tombstone: entry.tombstone })?;
            count += 1;
        }
        Ok(count)
    }

    /// Makes the records whose digest passes `filter` exactly `versions` (see `Importer`).
    pub fn import(&self, filter: impl Fn(&Digest) -> bool, versions: Vec<RecordVersion>, delete_seq: u64) -> Result<()> {
        let mut importer = self.importer(filter);
        for version in versions {
            importer.add(version)?;
        }
        importer.finish(delete_seq)
    }

    /// Starts making the records whose digest passes `filter` exactly the versions given to the
    /// importer, one at a time (only their digests are held).
    pub fn importer<F: Fn(&Digest) -> bool>(&self, filter: F) -> Importer<'_, F> {
        Importer { namespace: self, filter, keep: std::collections::HashSet::new() }
    }
}

/// Installs a snapshot's versions one by one: each is installed unless the record already holds
/// it (or a later one); `finish` deletes every other record passing the filter with a tombstone
/// at the snapshot's seq. Local limits do not refuse any of it.
pub struct Importer<'a, F> {
    namespace: &'a Namespace,
    filter: F,
    keep: std::collections::HashSet<Digest>,
}

impl<F: Fn(&Digest) -> bool> Importer<'_, F> {
    pub fn add(&mut self, version: RecordVersion) -> Result<()> {
        let inner = &self.namespace.inner;
        if !(self.filter)(&version.digest) {
            return Err(Error::BadRequest("a snapshot record lies outside the snapshot's partitions".into()));
        }
        self.keep.insert(version.digest);
        let key = Key::from_digest(version.set, version.digest);
        let lock = inner.record_lock(&key.digest);
        let current = inner.state.lock().unwrap().index.get(&key.digest).map(|e| e.seq);
        if current.is_some_and(|seq| seq >= version.seq) {
            return Ok(());
        }
        let commit = Version {
            key: &key,
            bins: &version.bins,
            generation: version.meta.generation,
            void_time_secs: version.meta.void_time_secs,
            tombstone: version.tombstone,
            now_ms: version.meta.last_update_ms,
            seq: Some(version.seq),
        };
        inner.commit(commit, lock)?;
        Ok(())
    }

    pub fn finish(self, delete_seq: u64) -> Result<()> {
        let inner = &self.namespace.inner;
        let stale: Vec<(Digest, u32)> = {
            let st = inner.state.lock().unwrap();
            st.index.iter().filter(|(d, e)| !e.tombstone && (self.filter)(d) && !self.keep.contains(*d)).map(|(d, e)| (*d, e.generation)).collect()
        };
        for (digest, generation) in stale {
            let key = Key::from_digest("", digest);
            let lock = inner.record_lock(&digest);
            let now_ms = inner.clock.now_ms();
            let generation = crate::ops::next_generation(generation);
            let tombstone = Version { key: &key, bins: &[], generation, void_time_secs: 0, tombstone: true, now_ms, seq: Some(delete_seq) };
            inner.commit(tombstone, lock)?;
        }
        Ok(())
    }
}

impl Inner {
    pub(crate) fn undecodable(&self, entry: &super::state::IndexEntry, what: String) -> Error {
        Error::Corrupt {
            path: self.devices[entry.device as usize].path().to_owned(),
            offset: self.block_offset(entry.block) + entry.offset as u64,
            what: format!("record passed its checksum but does not decode: {what}"),
        }
    }
}
