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
        let digests: Vec<Digest> = {
            let st = self.inner.state.lock().unwrap();
            st.index.keys().filter(|d| filter(d)).copied().collect()
        };
        let mut out = Vec::with_capacity(digests.len());
        for digest in digests {
            let Some((entry, bytes)) = self.inner.read_version(&digest)? else { continue };
            let (set, bins) = decode_body(&bytes).map_err(|what| self.inner.undecodable(&entry, what))?;
            let header = crate::format::parse_header(&bytes);
            let meta = RecordMeta {
                generation: header.generation,
                void_time_secs: header.void_time_secs,
                last_update_ms: header.last_update_ms,
            };
            out.push(RecordVersion { set, digest, bins, meta, seq: header.seq, tombstone: entry.tombstone });
        }
        Ok(out)
    }

    /// Makes the records whose digest passes `filter` exactly `versions`: each version is
    /// installed unless the record already holds it (or a later one), and every other record
    /// passing `filter` is deleted with a tombstone at `delete_seq`. Local limits do not refuse
    /// any of it.
    pub fn import(&self, filter: impl Fn(&Digest) -> bool, versions: Vec<RecordVersion>, delete_seq: u64) -> Result<()> {
        let mut keep = std::collections::HashSet::with_capacity(versions.len());
        for version in versions {
            if !filter(&version.digest) {
                return Err(Error::BadRequest("a snapshot record lies outside the snapshot's partitions".into()));
            }
            keep.insert(version.digest);
            let key = Key::from_digest(version.set, version.digest);
            let lock = self.inner.record_lock(&key.digest);
            let current = self.inner.state.lock().unwrap().index.get(&key.digest).map(|e| e.seq);
            if current.is_some_and(|seq| seq >= version.seq) {
                continue;
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
            self.inner.commit(commit, lock)?;
        }
        let stale: Vec<(Digest, u32)> = {
            let st = self.inner.state.lock().unwrap();
            st.index
                .iter()
                .filter(|(d, e)| !e.tombstone && filter(d) && !keep.contains(*d))
                .map(|(d, e)| (*d, e.generation))
                .collect()
        };
        for (digest, generation) in stale {
            let key = Key::from_digest("", digest);
            let lock = self.inner.record_lock(&digest);
            let now_ms = self.inner.clock.now_ms();
            let generation = crate::ops::next_generation(generation);
            let tombstone = Version { key: &key, bins: &[], generation, void_time_secs: 0, tombstone: true, now_ms, seq: Some(delete_seq) };
            self.inner.commit(tombstone, lock)?;
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
