//! Devices: where blocks live. The engine sees only the small `Device` trait.
//!
//! - `FileDevice`: a regular file (created and preallocated at its configured size) or a raw
//!   block device; `sync` is fdatasync.
//! - `MemDevice`: bytes in memory, for deterministic tests.
//! - `PowerLossDevice`: wraps another device and keeps every write made since the last `sync` in
//!   process memory; each write may also leave some of its 512-byte sectors on the device
//!   underneath (a prefix: a torn write; or a random subset: out-of-order write-back), as a disk
//!   does when power fails. Killing the process (or
//!   calling `crash`) is then a power cut: only synced bytes, plus torn fragments, survive.
//!
//! The WAL keeps its segments in a `DeviceDir` (dir.rs): a directory of devices that grow as
//! they are written, with the same three kinds (files, memory, power loss).

mod dir;

pub use dir::{DeviceDir, FileDir, GrowingFile, MemDir, PowerLossDir};

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// The sector size the engine assumes a device writes atomically (and tears between).
pub const SECTOR_BYTES: usize = 512;

pub trait Device: Send + Sync + fmt::Debug {
    /// The path named in every error about this device.
    fn path(&self) -> &Path;
    fn size_bytes(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Make every completed write durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
}

#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
    size_bytes: u64,
}

impl FileDevice {
    /// Opens the device at `path`, creating and preallocating a regular file of `size` bytes
    /// when nothing is there yet. Returns the device and whether it was just created.
    ///
    /// Never resizes or truncates an existing device: a size mismatch is an error.
    pub fn open_or_create(path: &Path, size: Option<u64>) -> Result<(FileDevice, bool)> {
        match std::fs::metadata(path) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => Self::create(path, size),
            Err(err) => Err(Error::io(path, err)),
            Ok(meta) if meta.file_type().is_block_device() => {
                let file = open_rw(path)?;
                let len = block_device_len(&file).map_err(|e| Error::io(path, e))?;
                if let Some(size) = size {
                    if size > len {
                        return Err(Error::Config(format!("device {}: configured size {size} is larger than the block device ({len} bytes)", path.display())));
                    }
                }
                let size_bytes = size.unwrap_or(len);
                Ok((FileDevice { file, path: path.to_owned(), size_bytes }, false))
            }
            Ok(meta) if meta.is_file() => {
                let size = size.ok_or_else(|| need_size(path))?;
                let file = open_rw(path)?;
                if meta.len() == 0 {
                    // Created by someone else, or truncated: either way not ours to format.
                    return Err(Error::Config(format!(
                        "device {} exists but is empty (truncated?); chunkstore formats only devices it creates: \
                         remove the file to have it created",
                        path.display()
                    )));
                }
                if meta.len() != size {
                    return Err(Error::Config(format!(
                        "device {} is {} bytes but the config says size = {size}; chunkstore never resizes a device",
                        path.display(),
                        meta.len()
                    )));
                }
                Ok((FileDevice { file, path: path.to_owned(), size_bytes: size }, false))
            }
            Ok(_) => Err(Error::Config(format!("device {} is neither a regular file nor a block device", path.display()))),
        }
    }

    fn create(path: &Path, size: Option<u64>) -> Result<(FileDevice, bool)> {
        let size = size.ok_or_else(|| need_size(path))?;
        let file = OpenOptions::new().read(true).write(true).create_new(true).custom_flags(libc::O_CLOEXEC).open(path).map_err(|e| Error::io(path, e))?;
        if let Err(err) = allocate(&file, path, size) {
            // Leave nothing half-made behind: the file was ours, created a moment ago.
            let _ = std::fs::remove_file(path);
            return Err(err);
        }
        sync_parent_dir(path)?;
        Ok((FileDevice { file, path: path.to_owned(), size_bytes: size }, true))
    }
}

fn need_size(path: &Path) -> Error {
    Error::Config(format!("device {}: a file device needs size = BYTES", path.display()))
}

fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open(path).map_err(|e| Error::io(path, e))
}

/// Reserves every byte up front so a full filesystem shows up now, as a clear error, and never
/// later as ENOSPC in the middle of a flush.
fn allocate(file: &File, path: &Path, size: u64) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on an fd we own.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOSPC) {
            return Err(Error::Config(format!("device {}: the filesystem has no room for {size} bytes (fallocate: {err})", path.display())));
        }
        if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(Error::io(path, err));
        }
        file.set_len(size).map_err(|e| Error::io(path, e))?;
    }
    file.sync_all().map_err(|e| Error::io(path, e))
}

fn block_device_len(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut file = file;
    file.seek(SeekFrom::End(0))
}

/// fsync the directory holding `path`, so a newly created file's name is durable too.
pub fn sync_parent_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
}

impl Device for FileDevice {
    fn path(&self) -> &Path {
        &self.path
    }
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// A device held in memory.
#[derive(Debug)]
pub struct MemDevice {
    path: PathBuf,
    bytes: Mutex<Vec<u8>>,
    /// Writes past the end grow it (a file in a `MemDir`) instead of failing.
    grows: bool,
}

impl MemDevice {
    pub fn new(name: &str, len: u64) -> MemDevice {
        MemDevice { path: PathBuf::from(format!("mem:{name}")), bytes: Mutex::new(vec![0; len as usize]), grows: false }
    }

    /// A device that grows when written past its end, as a file does.
    pub fn growing(name: &str, len: u64) -> MemDevice {
        MemDevice { grows: true, ..MemDevice::new(name, len) }
    }

    /// Cuts or extends (with zeros) a growing device to `len` bytes.
    pub(crate) fn set_len(&self, len: u64) {
        self.bytes.lock().unwrap().resize(len as usize, 0);
    }

    /// Flips bits in place, as a failing disk would (for corruption tests).
    pub fn corrupt(&self, offset: u64, len: usize) {
        let mut bytes = self.bytes.lock().unwrap();
        for byte in &mut bytes[offset as usize..offset as usize + len] {
            *byte ^= 0x5a;
        }
    }
}

impl Device for MemDevice {
    fn path(&self) -> &Path {
        &self.path
    }
    fn size_bytes(&self) -> u64 {
        self.bytes.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.bytes.lock().unwrap();
        let range = checked_range(bytes.len(), offset, buf.len())?;
        buf.copy_from_slice(&bytes[range]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.bytes.lock().unwrap();
        if self.grows {
            let end = offset.checked_add(data.len() as u64).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            if end > bytes.len() as u64 {
                bytes.resize(usize::try_from(end).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?, 0);
            }
        }
        let range = checked_range(bytes.len(), offset, data.len())?;
        bytes[range].copy_from_slice(data);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}

fn checked_range(len: usize, offset: u64, count: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    match start.checked_add(count) {
        Some(end) if end <= len => Ok(start..end),
        _ => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "access past the end of the device")),
    }
}

/// Writes not yet synced live here, so a kill of the process (or `crash`) loses them.
#[derive(Debug)]
pub struct PowerLossDevice {
    inner: std::sync::Arc<dyn Device>,
    state: Mutex<PowerLossState>,
}

#[derive(Debug)]
struct PowerLossState {
    pending: Vec<(u64, Vec<u8>)>,
    rng: u64,
    powered: bool,
    /// Every sync from now on fails (`fail_syncs`).
    failing: bool,
}

impl PowerLossDevice {
    /// `seed` decides which sectors of unsynced writes reach the device underneath early.
    pub fn new(inner: std::sync::Arc<dyn Device>, seed: u64) -> PowerLossDevice {
        let state = PowerLossState { pending: Vec::new(), rng: seed | 1, powered: true, failing: false };
        PowerLossDevice { inner, state: Mutex::new(state) }
    }

    /// Cuts the power: every unsynced write is dropped and the device refuses further I/O.
    pub fn crash(&self) {
        let mut state = self.state.lock().unwrap();
        state.pending.clear();
        state.powered = false;
    }

    /// The disk fails: every later sync answers EIO, and the writes it was to make durable
    /// are dropped (as Linux drops dirty pages a failed writeback could not write: a retried
    /// fsync then succeeds without them). Until `crash`.
    pub fn fail_syncs(&self) {
        self.state.lock().unwrap().failing = true;
    }

    /// Bytes written since the last sync (and so at risk).
    pub fn unsynced_bytes(&self) -> usize {
        self.state.lock().unwrap().pending.iter().map(|(_, data)| data.len()).sum()
    }
}

impl PowerLossState {
    /// Where the furthest pending write ends.
    fn pending_end(&self) -> u64 {
        self.pending.iter().map(|(offset, data)| offset + data.len() as u64).max().unwrap_or(0)
    }
}

fn power_off() -> io::Error {
    io::Error::other("power cut (PowerLossDevice::crash)")
}

impl Device for PowerLossDevice {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn size_bytes(&self) -> u64 {
        let state = self.state.lock().unwrap();
        self.inner.size_bytes().max(state.pending_end())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let state = self.state.lock().unwrap();
        if !state.powered {
            return Err(power_off());
        }
        let end = offset.checked_add(buf.len() as u64).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // A growing device (a WAL segment) may have been written past its end underneath by
        // writes still pending here: that part reads from them.
        let inner_len = self.inner.size_bytes();
        if end > inner_len && end <= state.pending_end() {
            let within = inner_len.saturating_sub(offset).min(buf.len() as u64) as usize;
            self.inner.read_at(&mut buf[..within], offset)?;
            buf[within..].fill(0);
        } else {
            self.inner.read_at(buf, offset)?;
        }
        for (write_offset, data) in &state.pending {
            let write_end = write_offset + data.len() as u64;
            if *write_offset >= end || write_end <= offset {
                continue;
            }
            let from = offset.max(*write_offset);
            let to = end.min(write_end);
            buf[(from - offset) as usize..(to - offset) as usize].copy_from_slice(&data[(from - write_offset) as usize..(to - write_offset) as usize]);
        }
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        if !state.powered {
            return Err(power_off());
        }
        // Some unsynced writes reach the device early, sector by sector, as a disk's cache
        // may write them back: a third leave a random prefix of their sectors (a torn last
        // write), a third a random subset, out of order; the rest nothing.
        let roll = xorshift(&mut state.rng);
        let sectors = data.len().div_ceil(SECTOR_BYTES);
        match roll % 3 {
            0 => {
                let kept = ((roll >> 8) % (sectors as u64 + 1)) as usize * SECTOR_BYTES;
                self.inner.write_at(&data[..kept.min(data.len())], offset)?;
            }
            1 => {
                for sector in 0..sectors {
                    if xorshift(&mut state.rng) & 1 == 0 {
                        let from = sector * SECTOR_BYTES;
                        let to = (from + SECTOR_BYTES).min(data.len());
                        self.inner.write_at(&data[from..to], offset + from as u64)?;
                    }
                }
            }
            _ => {}
        }
        state.pending.push((offset, data.to_vec()));
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        if !state.powered {
            return Err(power_off());
        }
        if state.failing {
            state.pending.clear();
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        for (offset, data) in state.pending.drain(..) {
            self.inner.write_at(&data, offset)?;
        }
        self.inner.sync()
    }
}

fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}
