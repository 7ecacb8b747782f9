//! A chunkfs process and its mountpoint, for the tools that mount volumes (`chunkcheck files`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long a mount may take to answer.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long chunkfs may take to commit what it holds and unmount after SIGTERM.
const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(20);

/// chunkfs, next to the running binary (as `cargo build --release` leaves it).
pub fn chunkfs_binary() -> Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name("chunkfs");
    if !path.exists() {
        bail!("{} not found: build it with cargo build --release", path.display());
    }
    Ok(path)
}

/// libchunkpreload.so, next to the running binary (as `cargo build --release` leaves it).
pub fn preload_library() -> Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name("libchunkpreload.so");
    if !path.exists() {
        bail!("{} not found: build it with cargo build --release", path.display());
    }
    Ok(path)
}

/// Whether `path` is a mountpoint now (from /proc/mounts).
pub fn is_mounted(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let path = path.to_string_lossy();
    mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(&*path))
}

/// Clears a mountpoint whose chunkfs died (`umount -l`, what the README tells users to do).
pub fn clear_mountpoint(path: &Path) {
    if is_mounted(path) {
        let _ = Command::new("umount").arg("-l").arg(path).stderr(Stdio::null()).status();
    }
}

/// A running `chunkfs mount`.
pub struct ChunkfsMount {
    child: Child,
    pub path: PathBuf,
}

impl ChunkfsMount {
    /// Mounts `volume` of the cluster at `seeds` on `path` (created), with extra chunkfs
    /// arguments, its output appended to `log`; returns once the mount is there.
    pub fn start(seeds: &[String], volume: &str, path: &Path, extra: &[String], log: &Path) -> Result<ChunkfsMount> {
        std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log).with_context(|| format!("opening {}", log.display()))?;
        let child = Command::new(chunkfs_binary()?)
            .args(["mount", "--seeds", &seeds.join(","), "--volume", volume])
            .args(extra)
            .arg(path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting chunkfs")?;
        let mut mount = ChunkfsMount { child, path: path.to_owned() };
        let deadline = Instant::now() + MOUNT_TIMEOUT;
        while !is_mounted(path) {
            if let Some(status) = mount.child.try_wait()? {
                bail!("chunkfs exited with {status} before mounting {} (log: {})", path.display(), log.display());
            }
            if Instant::now() > deadline {
                mount.kill();
                bail!("chunkfs did not mount {} within {MOUNT_TIMEOUT:?} (log: {})", path.display(), log.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(mount)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Has chunkfs exited (on its own, or killed)?
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM (chunkfs commits what it holds and unmounts); true if it exited cleanly and
    /// the mountpoint is clear. Else it is killed.
    pub fn unmount(&mut self) -> bool {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + UNMOUNT_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let clean = status.success() && !is_mounted(&self.path);
                clear_mountpoint(&self.path);
                return clean;
            }
            if Instant::now() > deadline {
                self.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9 of chunkfs, then clears the dead mountpoint.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        clear_mountpoint(&self.path);
    }
}

impl Drop for ChunkfsMount {
    fn drop(&mut self) {
        if !self.exited() && !self.unmount() {
            self.kill();
        }
        clear_mountpoint(&self.path);
    }
}
