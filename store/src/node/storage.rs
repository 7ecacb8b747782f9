//! Where a node keeps its WAL segments and its engines' devices, behind a trait, so that nodes
//! can run in one process on memory that a test cuts the power to.
//!
//! - No `NodeStorage` in the node's `NodeEnv` (chunkd): files under the data directory, and
//!   with the `test-power-loss-devices` hook, each behind the power-loss model.
//! - `MemStorage`: a node's disks in memory, for in-process clusters. `power_cut` drops every
//!   write not yet synced (tearing some through) and makes every later I/O of that life fail;
//!   the next life (a new node started on the same `MemStorage`) sees what the cut left.
//!
//! The node's small marker files (rejoin, hosting, leaving) and Raft snapshots stay in files
//! under the data directory either way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::config::NamespaceConfig;
use crate::device::{Device, DeviceDir, MemDevice, MemDir, PowerLossDevice, PowerLossDir};

/// A node's disks (see the module's notes).
pub trait NodeStorage: Send + Sync {
    /// Where the WAL keeps its segments.
    fn wal_dir(&self) -> Arc<dyn DeviceDir>;
    /// The devices of namespace `engine`, in the order and of the sizes its config names.
    fn devices(&self, engine: &NamespaceConfig) -> std::io::Result<Vec<Arc<dyn Device>>>;
}

/// A node's disks in memory, with power cuts (see the module's notes).
pub struct MemStorage {
    wal: MemDir,
    devices: Mutex<HashMap<(String, usize), Arc<MemDevice>>>,
    life: Mutex<Life>,
}

/// What the current life of the node was handed: cut together.
#[derive(Default)]
struct Life {
    number: u64,
    wal: Option<Arc<PowerLossDir>>,
    devices: Vec<Arc<PowerLossDevice>>,
}

impl MemStorage {
    pub fn new(name: &str) -> MemStorage {
        MemStorage { wal: MemDir::new(&format!("{name}/wal")), devices: Mutex::new(HashMap::new()), life: Mutex::new(Life::default()) }
    }

    /// Cuts the power: every unsynced write of this life is lost (some torn through), and its
    /// WAL and devices fail every later I/O. The next `wal_dir`/`devices` start a new life.
    pub fn power_cut(&self) {
        let mut life = self.life.lock().unwrap();
        if let Some(wal) = life.wal.take() {
            wal.crash();
        }
        for device in life.devices.drain(..) {
            device.crash();
        }
        life.number += 1;
    }

    /// The disks fail: every sync of this life's WAL and devices answers EIO from now on (the
    /// writes it was to make durable dropped), until `power_cut`.
    pub fn fail_syncs(&self) {
        let life = self.life.lock().unwrap();
        if let Some(wal) = &life.wal {
            wal.fail_syncs();
        }
        for device in &life.devices {
            device.fail_syncs();
        }
    }

    fn seed(life: &Life, salt: u64) -> u64 {
        (life.number + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt
    }
}

impl NodeStorage for MemStorage {
    fn wal_dir(&self) -> Arc<dyn DeviceDir> {
        let mut life = self.life.lock().unwrap();
        let seed = Self::seed(&life, 1);
        let dir = life.wal.get_or_insert_with(|| Arc::new(PowerLossDir::new(Arc::new(self.wal.clone()), seed)));
        dir.clone()
    }

    fn devices(&self, engine: &NamespaceConfig) -> std::io::Result<Vec<Arc<dyn Device>>> {
        let mut life = self.life.lock().unwrap();
        let mut memory = self.devices.lock().unwrap();
        let mut devices: Vec<Arc<dyn Device>> = Vec::new();
        for (index, config) in engine.devices.iter().enumerate() {
            let size = config.size.ok_or_else(|| std::io::Error::other(format!("device {} needs a size in memory", config.path.display())))?;
            let memory = memory.entry((engine.name.clone(), index)).or_insert_with(|| Arc::new(MemDevice::new(&format!("{}.{index}", engine.name), size)));
            let seed = Self::seed(&life, 2 + index as u64);
            let device = Arc::new(PowerLossDevice::new(memory.clone(), seed));
            life.devices.push(device.clone());
            devices.push(device);
        }
        Ok(devices)
    }
}
