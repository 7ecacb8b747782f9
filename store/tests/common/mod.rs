//! Helpers shared by the engine tests.
#![allow(dead_code)]

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chunkstore::device::{Device, MemDevice, PowerLossDevice};
use chunkstore::{Clock, DeviceConfig, Namespace, NamespaceConfig, OpenOptions};

/// A clock tests move by hand.
#[derive(Default)]
pub struct ManualClock(pub AtomicU64);

impl ManualClock {
    pub fn at_secs(secs: u64) -> Arc<ManualClock> {
        Arc::new(ManualClock(AtomicU64::new(secs * 1000)))
    }
    pub fn advance_secs(&self, secs: u64) {
        self.0.fetch_add(secs * 1000, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A small namespace on memory devices: 64 KiB blocks, fast background threads.
pub fn small_config(devices: usize, blocks_per_device: u64) -> NamespaceConfig {
    let block = 64 * 1024u64;
    let devices = (0..devices).map(|i| DeviceConfig { path: format!("dev{i}").into(), size: Some(block * blocks_per_device) }).collect();
    NamespaceConfig {
        write_block_size: block as u32,
        max_write_cache: 8 * block,
        defrag_sleep_ms: 5,
        nsup_period_ms: 20,
        ..NamespaceConfig::new("test", devices)
    }
}

/// Memory devices that survive "power cuts": each open wraps them in a fresh PowerLossDevice.
pub struct Disks {
    pub mem: Vec<Arc<MemDevice>>,
    pub current: Vec<Arc<PowerLossDevice>>,
    pub seed: u64,
}

impl Disks {
    pub fn new(config: &NamespaceConfig, seed: u64) -> Disks {
        let mem = config.devices.iter().enumerate().map(|(i, d)| Arc::new(MemDevice::new(&format!("dev{i}"), d.size.unwrap()))).collect();
        Disks { mem, current: Vec::new(), seed }
    }

    pub fn open(&mut self, config: &NamespaceConfig, clock: Option<Arc<dyn Clock>>) -> chunkstore::Result<Namespace> {
        self.seed = self.seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.current = self.mem.iter().enumerate().map(|(i, m)| Arc::new(PowerLossDevice::new(m.clone() as Arc<dyn Device>, self.seed ^ i as u64))).collect();
        let devices = self.current.iter().map(|d| d.clone() as Arc<dyn Device>).collect();
        Namespace::open(config.clone(), OpenOptions { devices: Some(devices), clock, ..Default::default() })
    }

    /// Power cut: every unsynced write is gone (torn fragments may remain).
    pub fn crash(&self, namespace: Namespace) {
        for device in &self.current {
            device.crash();
        }
        drop(namespace);
    }
}

type WriteHook = Box<dyn Fn(&MemDevice, &[u8], u64) -> io::Result<()> + Send + Sync>;
type SyncHook = Box<dyn Fn() -> io::Result<()> + Send + Sync>;

/// A memory device whose writes and syncs go through test hooks (slow, failing or lossy disks).
pub struct HookedDevice {
    pub inner: Arc<MemDevice>,
    pub write: WriteHook,
    pub sync: SyncHook,
}

impl HookedDevice {
    pub fn new(inner: Arc<MemDevice>) -> HookedDevice {
        HookedDevice { inner, write: Box::new(|mem, data, offset| mem.write_at(data, offset)), sync: Box::new(|| Ok(())) }
    }
}

impl std::fmt::Debug for HookedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HookedDevice({:?})", self.inner.path())
    }
}

impl Device for HookedDevice {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        (self.write)(&self.inner, data, offset)
    }
    fn sync(&self) -> io::Result<()> {
        (self.sync)()
    }
}
