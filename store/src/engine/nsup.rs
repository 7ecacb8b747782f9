//! The namespace supervisor: expiration and eviction, every `nsup-period-ms`.
//!
//! An expired record is invisible at once (reads check the void time); here it is reclaimed by
//! writing a tombstone, because simply forgetting it would let an older version come back at
//! the next start-up. Eviction, when configured, deletes the records nearest their void time
//! the same way, and logs how many. Records without a TTL are never evicted.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{Inner, Version};
use crate::key::{Digest, Key};

/// Records reclaimed per round at most, so a round never holds the engine for long.
const RECLAIM_PER_ROUND_MAX: usize = 100_000;

impl Inner {
    pub(crate) fn run_nsup(self: Arc<Self>) {
        let period = Duration::from_millis(self.config.nsup_period_ms);
        loop {
            {
                let st = self.state.lock().unwrap();
                if self.is_shutting_down() {
                    return;
                }
                let (st, _) = self.background_wakeup.wait_timeout(st, period).unwrap();
                if self.is_shutting_down() {
                    return;
                }
                drop(st);
            }
            let expired = self.reclaim(self.expired_records(), true);
            self.stats.expired.fetch_add(expired, Ordering::Relaxed);
            let victims = self.eviction_victims();
            if !victims.is_empty() {
                let evicted = self.reclaim(victims, false);
                self.stats.evicted.fetch_add(evicted, Ordering::Relaxed);
                tracing::warn!(namespace = %self.config.name, evicted, "evicted records above the high-water mark");
            }
        }
    }

    fn expired_records(&self) -> Vec<Digest> {
        let st = self.state.lock().unwrap();
        st.index.iter().filter(|(_, entry)| !entry.tombstone && self.is_expired(entry)).map(|(digest, _)| *digest).take(RECLAIM_PER_ROUND_MAX).collect()
    }

    /// Records to evict now: empty unless a high-water mark is configured and passed.
    fn eviction_victims(&self) -> Vec<Digest> {
        let st = self.state.lock().unwrap();
        let disk_used_pct = 100 - st.devices.iter().map(|d| d.available_pct()).min().unwrap_or(100);
        // Live records only: tombstones written by eviction cannot be evicted, and counting
        // them would make eviction overshoot until every record with a TTL is gone.
        let live_memory_bytes = st.live_records() * super::INDEX_BYTES_PER_RECORD;
        let over_disk = self.config.high_water_disk_pct > 0 && disk_used_pct > self.config.high_water_disk_pct as u64;
        let over_memory = self.config.high_water_memory_pct > 0 && live_memory_bytes * 100 > self.config.memory_size * self.config.high_water_memory_pct as u64;
        if !over_disk && !over_memory {
            return Vec::new();
        }
        let mut evictable: Vec<(u32, Digest)> =
            st.index.iter().filter(|(_, e)| !e.tombstone && e.void_time_secs != 0).map(|(digest, e)| (e.void_time_secs, *digest)).collect();
        let count = (evictable.len() * self.config.evict_tenth_pct as usize / 1000).max(1).min(evictable.len());
        if count == 0 {
            return Vec::new();
        }
        evictable.select_nth_unstable(count - 1);
        evictable.truncate(count);
        evictable.into_iter().map(|(_, digest)| digest).take(RECLAIM_PER_ROUND_MAX).collect()
    }

    /// Writes a tombstone for each record; returns how many were reclaimed.
    fn reclaim(&self, digests: Vec<Digest>, only_if_expired: bool) -> u64 {
        let mut reclaimed = 0;
        for digest in digests {
            if self.is_shutting_down() {
                break;
            }
            match self.reclaim_one(&digest, only_if_expired) {
                Ok(true) => reclaimed += 1,
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(%err, "reclaiming a record failed; will retry next round");
                    break;
                }
            }
        }
        reclaimed
    }

    /// Tombstones one record if it is still expired or evictable (a newer write may have come
    /// in since it was picked: then it stays only if it did not expire).
    fn reclaim_one(&self, digest: &Digest, only_if_expired: bool) -> crate::error::Result<bool> {
        let record_lock = self.record_lock(digest);
        let Some((entry, bytes)) = self.read_version(digest)? else { return Ok(false) };
        if entry.tombstone || entry.void_time_secs == 0 || (only_if_expired && !self.is_expired(&entry)) {
            return Ok(false);
        }
        let (set, _) = crate::format::decode_body(&bytes).unwrap_or_default();
        let key = Key::from_digest(set, *digest);
        let generation = crate::ops::next_generation(entry.generation);
        let now_ms = self.clock.now_ms();
        let version = Version { key: &key, bins: &[], generation, void_time_secs: 0, tombstone: true, now_ms, seq: None };
        self.commit(version, record_lock)?;
        Ok(true)
    }
}
