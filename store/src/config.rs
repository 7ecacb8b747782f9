//! Namespace configuration: every field, its default and its unit.
//!
//! Field names follow Aerospike's (kebab-case in TOML) so its operators feel at home.
//! `NamespaceConfig::sanitize` is called by `Namespace::open` and rejects bad values with a
//! message naming the field.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::{BLOCK_HEADER_BYTES, BLOCK_TRAILER_BYTES, RECORD_HEADER_BYTES};

pub const MIB: u64 = 1024 * 1024;

/// One storage device of a namespace: a regular file (created at `size` bytes) or a raw block
/// device (its whole size is used; `size` may be left out).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DeviceConfig {
    pub path: PathBuf,
    /// Size in bytes. Required for files; a multiple of `write-block-size`.
    #[serde(default)]
    pub size: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct NamespaceConfig {
    /// Namespace name, 1..=31 bytes of [A-Za-z0-9_-]. No default.
    pub name: String,
    /// One or more devices; records are spread over them by digest. No default.
    pub devices: Vec<DeviceConfig>,
    /// Bytes per write block, a power of two from 64 KiB to 8 MiB. Default 1 MiB.
    pub write_block_size: u32,
    /// true: a write returns only once its bytes are on stable storage (group commit).
    /// false: writes are acknowledged from the streaming write buffer. Default true.
    pub commit_to_device: bool,
    /// With commit-to-device = false: flush a partly filled buffer this long after its first
    /// write. Milliseconds, default 1000.
    pub flush_max_ms: u64,
    /// Bytes written but not yet on disk, per device, past which writes fail with
    /// DeviceOverload. Default 64 MiB; at least two write blocks.
    pub max_write_cache: u64,
    /// Blocks whose live bytes fall below this percentage are rewritten and freed. Default 50.
    pub defrag_lwm_pct: u32,
    /// Pause between defragmentation passes, milliseconds. Default 100.
    pub defrag_sleep_ms: u64,
    /// Writes stop when a device's free blocks fall below this percentage. Default 5.
    pub min_avail_pct: u32,
    /// Writes stop when index memory passes this percentage of `memory-size`. Default 90.
    pub stop_writes_pct: u32,
    /// Memory budget for the primary index, bytes. Default 4 GiB.
    pub memory_size: u64,
    /// Evict records nearest expiry when disk use passes this percentage; 0 = off (default).
    pub high_water_disk_pct: u32,
    /// Evict records nearest expiry when memory use passes this percentage; 0 = off (default).
    pub high_water_memory_pct: u32,
    /// Each eviction round evicts this many tenths of a percent of the evictable records. Default 5.
    pub evict_tenth_pct: u32,
    /// Period of the expiration/eviction supervisor, milliseconds. Default 1000.
    pub nsup_period_ms: u64,
    /// TTL given to writes that ask for the namespace default, seconds; 0 = never expire. Default 0.
    pub default_ttl_secs: u32,
    /// Largest encoded record, bytes; 0 (default) = as large as a write block allows.
    pub max_record_size: u32,
    /// UNSAFE, for negative-control tests only: never call fdatasync. A power cut then loses
    /// acknowledged writes, which is what `chunkcheck engine --unsafe-skip-fsync` must detect.
    pub unsafe_skip_fsync: bool,
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        NamespaceConfig {
            name: String::new(),
            devices: Vec::new(),
            write_block_size: MIB as u32,
            commit_to_device: true,
            flush_max_ms: 1000,
            max_write_cache: 64 * MIB,
            defrag_lwm_pct: 50,
            defrag_sleep_ms: 100,
            min_avail_pct: 5,
            stop_writes_pct: 90,
            memory_size: 4096 * MIB,
            high_water_disk_pct: 0,
            high_water_memory_pct: 0,
            evict_tenth_pct: 5,
            nsup_period_ms: 1000,
            default_ttl_secs: 0,
            max_record_size: 0,
            unsafe_skip_fsync: false,
        }
    }
}

impl NamespaceConfig {
    /// A namespace with defaults and the given devices.
    pub fn new(name: impl Into<String>, devices: Vec<DeviceConfig>) -> NamespaceConfig {
        NamespaceConfig { name: name.into(), devices, ..NamespaceConfig::default() }
    }

    pub fn from_toml(text: &str) -> Result<NamespaceConfig> {
        toml::from_str(text).map_err(|err| Error::Config(err.to_string()))
    }

    /// Largest encoded record this namespace accepts, bytes.
    pub fn record_size_limit(&self) -> usize {
        let block_limit = self.write_block_size as usize - BLOCK_HEADER_BYTES - BLOCK_TRAILER_BYTES;
        match self.max_record_size {
            0 => block_limit,
            limit => (limit as usize).min(block_limit),
        }
    }

    /// Checks every field; the message names the field and the accepted range.
    pub fn sanitize(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(format!("namespace {:?}: {msg}", self.name)));
        let name_ok = !self.name.is_empty() && self.name.len() <= 31 && self.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !name_ok {
            return bad("name must be 1..=31 bytes of letters, digits, '_' or '-'".into());
        }
        if self.devices.is_empty() || self.devices.len() > 128 {
            return bad(format!("devices: 1..=128 devices needed, got {}", self.devices.len()));
        }
        let block = self.write_block_size as u64;
        if !block.is_power_of_two() || !(64 * 1024..=8 * MIB).contains(&block) {
            return bad(format!("write-block-size {block} must be a power of two from 65536 to 8388608"));
        }
        for device in &self.devices {
            if let Some(size) = device.size {
                if size % block != 0 || size < 4 * block {
                    return bad(format!("device {}: size {size} must be a multiple of write-block-size {block} and at least 4 blocks", device.path.display()));
                }
                if size / block > u32::MAX as u64 {
                    return bad(format!("device {}: size {size} has too many blocks", device.path.display()));
                }
            }
        }
        let mut paths: Vec<_> = self.devices.iter().map(|d| &d.path).collect();
        paths.sort();
        paths.dedup();
        if paths.len() != self.devices.len() {
            return bad("devices: the same path is listed twice".into());
        }
        if self.max_write_cache < 2 * block {
            return bad(format!("max-write-cache {} must be at least two write blocks ({})", self.max_write_cache, 2 * block));
        }
        if !(1..=60_000).contains(&self.flush_max_ms) {
            return bad(format!("flush-max-ms {} must be 1..=60000", self.flush_max_ms));
        }
        if !(1..=99).contains(&self.defrag_lwm_pct) {
            return bad(format!("defrag-lwm-pct {} must be 1..=99", self.defrag_lwm_pct));
        }
        if !(1..=60_000).contains(&self.defrag_sleep_ms) || !(1..=3_600_000).contains(&self.nsup_period_ms) {
            return bad("defrag-sleep-ms must be 1..=60000 and nsup-period-ms 1..=3600000".into());
        }
        if self.min_avail_pct > 50 {
            return bad(format!("min-avail-pct {} must be 0..=50", self.min_avail_pct));
        }
        if !(1..=100).contains(&self.stop_writes_pct) {
            return bad(format!("stop-writes-pct {} must be 1..=100", self.stop_writes_pct));
        }
        if self.high_water_disk_pct > 100 || self.high_water_memory_pct > 100 {
            return bad("high-water-disk-pct and high-water-memory-pct must be 0..=100 (0 = eviction off)".into());
        }
        if !(1..=1000).contains(&self.evict_tenth_pct) {
            return bad(format!("evict-tenth-pct {} must be 1..=1000", self.evict_tenth_pct));
        }
        if self.memory_size < MIB {
            return bad(format!("memory-size {} must be at least 1 MiB", self.memory_size));
        }
        let min_record = RECORD_HEADER_BYTES as u32 + 64;
        if self.max_record_size != 0 && self.max_record_size < min_record {
            return bad(format!("max-record-size {} must be 0 (block limit) or at least {min_record}", self.max_record_size));
        }
        Ok(())
    }
}
