//! Directories of devices: where the WAL keeps its segments.
//!
//! A segment is a device that grows when written past its end (as a file does), in a directory
//! whose names become durable only when the directory is synced. Three kinds, like devices:
//!
//! - `FileDir`: a real directory; each device a `GrowingFile`, its blocks reserved with
//!   fallocate when created; `sync` is fsync of the directory.
//! - `MemDir`: names and bytes in memory (deterministic tests, the simulator).
//! - `PowerLossDir`: wraps another directory; every device behind a `PowerLossDevice`, and the
//!   names created, removed or renamed since the last `sync` held back, so that `crash` loses
//!   exactly what a power cut may lose: unsynced writes (some torn through), unsynced new
//!   names, unsynced removals (the file comes back) and renames (the old name comes back). A process
//!   killed without `crash` (chunkd under the `test-power-loss-devices` hook) loses its
//!   unsynced writes, and its removals not yet synced never happen (the files stay).
//!   Not modelled yet: a cut that keeps some unsynced directory operations and loses others
//!   (a real filesystem may keep any of them), and reusing a name removed since the last sync
//!   (refused here, allowed by POSIX).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::{Device, MemDevice, PowerLossDevice};

/// A directory of growing devices.
pub trait DeviceDir: Send + Sync + fmt::Debug {
    /// The path named in errors and logs.
    fn path(&self) -> &Path;
    /// The names of the devices in it, in no particular order.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Creates device `name` (an error if it exists), `len` bytes reserved where the kind can
    /// (reading as zeros); its name is durable once `sync` returns.
    fn create(&self, name: &str, len: u64) -> io::Result<Arc<dyn Device>>;
    fn open(&self, name: &str) -> io::Result<Arc<dyn Device>>;
    /// Removes device `name`; the removal is durable once `sync` returns.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Cuts device `name` to `len` bytes, durably (only while nothing has it open).
    fn set_len(&self, name: &str, len: u64) -> io::Result<()>;
    /// Renames device `from` to `to` (an error if `to` exists); durable once `sync` returns.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Makes every name created or removed so far durable.
    fn sync(&self) -> io::Result<()>;
}

/// A real directory.
#[derive(Debug)]
pub struct FileDir {
    path: PathBuf,
}

impl FileDir {
    /// The directory at `path`, created if missing.
    pub fn new(path: &Path) -> io::Result<FileDir> {
        std::fs::create_dir_all(path)?;
        Ok(FileDir { path: path.to_owned() })
    }
}

fn open_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.read(true).write(true).custom_flags(libc::O_CLOEXEC);
    options
}

impl DeviceDir for FileDir {
    fn path(&self) -> &Path {
        &self.path
    }
    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.path)? {
            if let Some(name) = entry?.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }
    fn create(&self, name: &str, len: u64) -> io::Result<Arc<dyn Device>> {
        use std::os::fd::AsRawFd;
        let path = self.path.join(name);
        let file = open_options().create_new(true).open(&path)?;
        // Blocks allocated now (reading back as zeros) make each later fdatasync a data write
        // only. Without it (a filesystem that cannot, or a full disk) the file grows with each
        // write instead.
        // SAFETY: fallocate on a file descriptor this function owns; no memory is passed.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) } != 0 {
            tracing::debug!(path = %path.display(), err = %io::Error::last_os_error(), "not preallocated");
        }
        Ok(Arc::new(GrowingFile::new(file, path)?))
    }
    fn open(&self, name: &str) -> io::Result<Arc<dyn Device>> {
        let path = self.path.join(name);
        Ok(Arc::new(GrowingFile::new(open_options().open(&path)?, path)?))
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.path.join(name))
    }
    fn set_len(&self, name: &str, len: u64) -> io::Result<()> {
        let file = open_options().open(self.path.join(name))?;
        file.set_len(len)?;
        file.sync_all()
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let (from, to) = (self.path.join(from), self.path.join(to));
        if to.exists() {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists", to.display())));
        }
        std::fs::rename(from, to)
    }
    fn sync(&self) -> io::Result<()> {
        File::open(&self.path)?.sync_all()
    }
}

/// A regular file as a device that grows when written past its end; its size is the file's
/// length when opened, then the furthest write (kept here, so that asking never fails).
#[derive(Debug)]
pub struct GrowingFile {
    file: File,
    path: PathBuf,
    len: AtomicU64,
}

impl GrowingFile {
    fn new(file: File, path: PathBuf) -> io::Result<GrowingFile> {
        let len = file.metadata()?.len();
        Ok(GrowingFile { file, path, len: AtomicU64::new(len) })
    }
}

impl Device for GrowingFile {
    fn path(&self) -> &Path {
        &self.path
    }
    fn size_bytes(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)?;
        self.len.fetch_max(offset + data.len() as u64, Ordering::AcqRel);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// A directory held in memory. Clones share the same devices (a restart in a test opens the
/// WAL again on a clone).
#[derive(Clone, Debug)]
pub struct MemDir {
    name: String,
    path: PathBuf,
    devices: Arc<Mutex<BTreeMap<String, Arc<MemDevice>>>>,
}

impl MemDir {
    pub fn new(name: &str) -> MemDir {
        MemDir { name: name.to_owned(), path: PathBuf::from(format!("mem:{name}")), devices: Default::default() }
    }

    /// The device `name`, for tests that damage it.
    pub fn device(&self, name: &str) -> Option<Arc<MemDevice>> {
        self.devices.lock().unwrap().get(name).cloned()
    }
}

fn not_found(dir: &Path, name: &str) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{}/{name}: no such device", dir.display()))
}

impl DeviceDir for MemDir {
    fn path(&self) -> &Path {
        &self.path
    }
    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.devices.lock().unwrap().keys().cloned().collect())
    }
    fn create(&self, name: &str, len: u64) -> io::Result<Arc<dyn Device>> {
        let mut devices = self.devices.lock().unwrap();
        if devices.contains_key(name) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{}/{name} exists", self.path.display())));
        }
        // `len` bytes of zeros, as fallocate leaves a file.
        let device = Arc::new(MemDevice::growing(&format!("{}/{name}", self.name), len));
        devices.insert(name.to_owned(), device.clone());
        Ok(device)
    }
    fn open(&self, name: &str) -> io::Result<Arc<dyn Device>> {
        let device = self.device(name).ok_or_else(|| not_found(&self.path, name))?;
        Ok(device)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.devices.lock().unwrap().remove(name).map(drop).ok_or_else(|| not_found(&self.path, name))
    }
    fn set_len(&self, name: &str, len: u64) -> io::Result<()> {
        self.device(name).ok_or_else(|| not_found(&self.path, name))?.set_len(len);
        Ok(())
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut devices = self.devices.lock().unwrap();
        if devices.contains_key(to) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{}/{to} exists", self.path.display())));
        }
        let device = devices.remove(from).ok_or_else(|| not_found(&self.path, from))?;
        devices.insert(to.to_owned(), device);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Another directory as a power cut would leave it (see the module's notes).
#[derive(Debug)]
pub struct PowerLossDir {
    inner: Arc<dyn DeviceDir>,
    state: Mutex<PowerLossDirState>,
}

#[derive(Debug, Default)]
struct PowerLossDirState {
    /// Every device handed out and still open (all lose their unsynced writes in a crash).
    devices: Vec<Weak<PowerLossDevice>>,
    /// Names created since the last sync: a crash removes them.
    created: BTreeSet<String>,
    /// Names removed since the last sync: hidden here, removed underneath at the next sync (a
    /// crash brings them back).
    removed: BTreeSet<String>,
    /// Renames of durable names since the last sync, (from, to) in order: a crash undoes them.
    renamed: Vec<(String, String)>,
    seed: u64,
    crashed: bool,
    /// Syncs fail (`fail_syncs`).
    failing: bool,
}

impl PowerLossDir {
    /// `seed` decides which sectors of unsynced writes reach the devices early.
    pub fn new(inner: Arc<dyn DeviceDir>, seed: u64) -> PowerLossDir {
        PowerLossDir { inner, state: Mutex::new(PowerLossDirState { seed, ..Default::default() }) }
    }

    /// The disk fails: every device handed out (and every later one) fails its syncs
    /// (`PowerLossDevice::fail_syncs`), and so do syncs of the directory. Until `crash`.
    pub fn fail_syncs(&self) {
        let mut state = self.state.lock().unwrap();
        state.failing = true;
        for device in state.devices.iter().filter_map(|device| device.upgrade()) {
            device.fail_syncs();
        }
    }

    /// Cuts the power: every device drops its unsynced writes and refuses further I/O, names
    /// created since the last sync disappear, and names removed since then come back.
    pub fn crash(&self) {
        let mut state = self.state.lock().unwrap();
        state.crashed = true;
        for device in state.devices.drain(..).filter_map(|device| device.upgrade()) {
            device.crash();
        }
        for name in std::mem::take(&mut state.created) {
            if let Err(err) = self.inner.remove(&name) {
                tracing::warn!(%name, %err, "power-loss directory: could not drop an unsynced name");
            }
        }
        for (from, to) in std::mem::take(&mut state.renamed).into_iter().rev() {
            if let Err(err) = self.inner.rename(&to, &from) {
                tracing::warn!(%from, %to, %err, "power-loss directory: could not undo an unsynced rename");
            }
        }
        state.removed.clear();
    }

    fn wrap(&self, state: &mut PowerLossDirState, device: Arc<dyn Device>) -> Arc<dyn Device> {
        state.seed = state.seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let device = Arc::new(PowerLossDevice::new(device, state.seed));
        if state.failing {
            device.fail_syncs();
        }
        state.devices.retain(|open| open.strong_count() > 0);
        state.devices.push(Arc::downgrade(&device));
        device
    }

    fn powered(state: &PowerLossDirState) -> io::Result<()> {
        match state.crashed {
            true => Err(io::Error::other("power cut (PowerLossDir::crash)")),
            false => Ok(()),
        }
    }
}

impl DeviceDir for PowerLossDir {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn list(&self) -> io::Result<Vec<String>> {
        let state = self.state.lock().unwrap();
        Ok(self.inner.list()?.into_iter().filter(|name| !state.removed.contains(name)).collect())
    }
    fn create(&self, name: &str, len: u64) -> io::Result<Arc<dyn Device>> {
        let mut state = self.state.lock().unwrap();
        Self::powered(&state)?;
        if state.removed.contains(name) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{}/{name} was removed but not yet synced", self.path().display())));
        }
        let device = self.inner.create(name, len)?;
        state.created.insert(name.to_owned());
        Ok(self.wrap(&mut state, device))
    }
    fn open(&self, name: &str) -> io::Result<Arc<dyn Device>> {
        let mut state = self.state.lock().unwrap();
        Self::powered(&state)?;
        if state.removed.contains(name) {
            return Err(not_found(self.path(), name));
        }
        let device = self.inner.open(name)?;
        Ok(self.wrap(&mut state, device))
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        Self::powered(&state)?;
        if state.created.remove(name) {
            // Never durable: gone either way.
            return self.inner.remove(name);
        }
        if !self.inner.list()?.iter().any(|n| n == name) || !state.removed.insert(name.to_owned()) {
            return Err(not_found(self.path(), name));
        }
        Ok(())
    }
    fn set_len(&self, name: &str, len: u64) -> io::Result<()> {
        let state = self.state.lock().unwrap();
        Self::powered(&state)?;
        self.inner.set_len(name, len)
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        Self::powered(&state)?;
        if state.removed.contains(from) {
            return Err(not_found(self.path(), from));
        }
        if state.removed.contains(to) {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{}/{to} was removed but not yet synced", self.path().display())));
        }
        self.inner.rename(from, to)?;
        match state.created.remove(from) {
            // Never durable under its old name: a crash drops it under the new one.
            true => drop(state.created.insert(to.to_owned())),
            false => state.renamed.push((from.to_owned(), to.to_owned())),
        }
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        Self::powered(&state)?;
        if state.failing {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        for name in std::mem::take(&mut state.removed) {
            self.inner.remove(&name)?;
        }
        self.inner.sync()?;
        state.created.clear();
        state.renamed.clear();
        Ok(())
    }
}
