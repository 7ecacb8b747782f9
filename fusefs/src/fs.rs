//! The FUSE front: each request is translated, handed to the file layer (`chunkfiles::Volume`),
//! and answered once. Every POSIX decision is the file layer's; the errno comes from
//! `FsError::errno` and nowhere else.
//!
//! Invariants:
//! - **A callback never unwinds into fuser**: each runs under `catch_unwind`, and a reply
//!   dropped unsent answers EIO, so a bug fails one request instead of hanging the mount.
//! - **No kernel writeback cache**: a write request reaches the file layer before write()
//!   returns, and is answered only once committed.
//! - **The kernel's page cache of a file is dropped on every open** (no FOPEN_KEEP_CACHE), and
//!   this mount's cached size with it, so a file opened after another mount wrote shows it.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use chunkfiles::{Attr, FsError, FsResult, Kind, LockKind, Owner, SetAttr, TimeSet, Volume};
use fuser::{
    AccessFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    SessionACL, TimeOrNow, WriteFlags,
};

/// How long the kernel may keep attributes and lookups (short: other mounts change files too).
const ATTR_TTL: Duration = Duration::from_secs(1);
/// Most lock owners remembered per open file description (past it, an OFD lock of a further
/// owner is given back when the mount's lease ends rather than at close).
const LOCK_OWNERS_PER_HANDLE_MAX: usize = 64;

/// Largest write request the kernel sends (each is one entry in the cluster).
const MAX_WRITE_BYTES: u32 = 1 << 20;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn errno(err: &FsError) -> Errno {
    Errno::from_i32(err.errno())
}

fn system_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_nanos(ns.unsigned_abs())).unwrap_or(UNIX_EPOCH)
    }
}

fn ns_of(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos().min(i64::MAX as u128) as i64,
        Err(e) => -(e.duration().as_nanos().min(i64::MAX as u128) as i64),
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
    }
}

fn file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.blocks,
        atime: system_time(attr.atime_ns),
        mtime: system_time(attr.mtime_ns),
        ctime: system_time(attr.ctime_ns),
        crtime: system_time(attr.crtime_ns),
        kind: file_type(attr.kind),
        perm: (attr.perm & 0o7777) as u16,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: attr.rdev,
        blksize: 4096,
        flags: 0,
    }
}

fn time_set(time: TimeOrNow) -> TimeSet {
    match time {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(t) => TimeSet::At(ns_of(t)),
    }
}

/// Writes the unsafe committer may be behind (`--unsafe-ack-before-commit`).
const UNSAFE_QUEUE_MAX: usize = 64;

/// Every regular file is opened for direct I/O: the kernel then hands each write() to chunkfs
/// whole (up to `MAX_WRITE_BYTES`), where it becomes one atomic entry. Through the page cache
/// it splits a write that starts inside a page at that page's end, and an application or a
/// mount killed between the two requests leaves half a write (`chunkcheck files` found this:
/// journal records torn at a page boundary). Reads then skip the page cache too, which
/// chunkfs dropped at every open anyway (another mount may have written).
const FILE_OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_DIRECT_IO;

/// Runs a callback body; a panic in it fails the request (its reply, dropped, answers EIO)
/// instead of taking the mount down.
fn guarded(what: &str, body: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).is_err() {
        tracing::error!(request = what, "a request handler panicked: answered EIO");
    }
}

/// An open file or directory.
struct Handle {
    ino: u64,
    /// The mount's lease session when it was opened: its writes go in it if the mount took
    /// locks under it (`Volume::write_as`).
    session: Option<u64>,
    /// Failed writes to the file seen by this descriptor: fsync reports the ones after it.
    failures_seen: u64,
    /// Lock owners that took locks through this open file description. An OFD lock's owner is
    /// the description itself, and the kernel sends no unlock when it closes: its locks go
    /// at `release` (a process's record locks went already, at its close: `flush`).
    lock_owners: Vec<u64>,
}

pub struct ChunkFs {
    volume: Arc<Volume>,
    handles: Mutex<HashMap<u64, Handle>>,
    /// Open descriptors per inode (an unlinked file keeps its data while any is open here).
    open: Arc<Mutex<HashMap<u64, u32>>>,
    next_handle: AtomicU64,
    /// UNSAFE negative control (`--unsafe-ack-before-commit`): writes answered at once, and
    /// handed to this thread to commit (at most `UNSAFE_QUEUE_MAX` behind).
    unsafe_committer: Option<(Mutex<std::sync::mpsc::SyncSender<UnsafeWrite>>, std::thread::JoinHandle<()>)>,
}

/// A write the unsafe committer commits later: inode, offset, bytes.
type UnsafeWrite = (u64, u64, Vec<u8>);

/// How the mount serves.
pub struct Serving {
    /// Requests served at once.
    pub threads: usize,
    /// UNSAFE: writes answered before they are committed (negative controls only).
    pub unsafe_ack_before_commit: bool,
}

impl ChunkFs {
    pub fn new(volume: Volume) -> ChunkFs {
        ChunkFs {
            volume: Arc::new(volume),
            handles: Mutex::new(HashMap::new()),
            open: Arc::new(Mutex::new(HashMap::new())),
            next_handle: AtomicU64::new(1),
            unsafe_committer: None,
        }
    }

    /// UNSAFE (negative controls): from now on writes are answered before they are committed;
    /// one thread commits them in order, and a failure only reaches the log.
    fn ack_before_commit(&mut self) -> std::io::Result<()> {
        let (sender, receiver) = std::sync::mpsc::sync_channel::<(u64, u64, Vec<u8>)>(UNSAFE_QUEUE_MAX);
        let volume = self.volume.clone();
        let committer = std::thread::Builder::new().name("unsafe-commits".into()).spawn(move || {
            for (ino, offset, data) in receiver {
                if let Err(err) = volume.write(ino, offset, &data) {
                    tracing::error!(ino, offset, error = %err, "UNSAFE: a write answered before its commit failed to commit");
                }
            }
        })?;
        tracing::warn!("UNSAFE: --unsafe-ack-before-commit: writes are answered before they are committed");
        self.unsafe_committer = Some((Mutex::new(sender), committer));
        Ok(())
    }

    /// Starts the thread that frees orphans no mount holds open any more and renews the ones
    /// this mount holds (`Volume::reap`), every `ORPHAN_REAP_PERIOD`.
    fn start_reaper(&self) -> std::io::Result<()> {
        let (volume, open) = (self.volume.clone(), self.open.clone());
        std::thread::Builder::new().name("reaper".into()).spawn(move || loop {
            std::thread::sleep(chunkfiles::ORPHAN_REAP_PERIOD);
            let is_open = |ino: u64| lock(&open).get(&ino).is_some_and(|n| *n > 0);
            match volume.reap(&is_open) {
                Ok(0) => {}
                Ok(freed) => tracing::info!(freed, "freed the data of unlinked files no mount holds open"),
                Err(err) => tracing::warn!(error = %err, "reaping unlinked files failed (tried again later)"),
            }
        })?;
        Ok(())
    }

    fn open_handle(&self, ino: u64) -> FileHandle {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let failures_seen = self.volume.failed_writes(ino);
        let session = self.volume.open_session();
        lock(&self.handles).insert(fh, Handle { ino, session, failures_seen, lock_owners: Vec::new() });
        *lock(&self.open).entry(ino).or_insert(0) += 1;
        self.volume.invalidate(ino);
        FileHandle(fh)
    }

    /// Forgets a closed description; returns the lock owners that locked through it.
    fn close_handle(&self, fh: FileHandle) -> Vec<u64> {
        let Some(handle) = lock(&self.handles).remove(&fh.0) else { return Vec::new() };
        let mut open = lock(&self.open);
        let count = open.entry(handle.ino).or_insert(1);
        *count = count.saturating_sub(1);
        if *count == 0 {
            open.remove(&handle.ino);
        }
        handle.lock_owners
    }

    /// Notes that `owner` locked through description `fh`.
    fn note_lock_owner(&self, fh: FileHandle, owner: u64) {
        if let Some(handle) = lock(&self.handles).get_mut(&fh.0) {
            if !handle.lock_owners.contains(&owner) && handle.lock_owners.len() < LOCK_OWNERS_PER_HANDLE_MAX {
                handle.lock_owners.push(owner);
            }
        }
    }

    /// Commits the writes held for a file; a failure counts for every descriptor open on it
    /// (the volume counts it, under the file's lock).
    fn commit(&self, ino: u64) -> FsResult<()> {
        self.volume.flush(ino).inspect_err(|err| {
            tracing::error!(ino, error = %err, "committing held writes failed: reported to every descriptor open on the file");
        })
    }

    /// EIO if a write to the file failed since this descriptor's last fsync. Only fsync
    /// (`advance`) moves the mark on, as Linux does: a close of a copy of the descriptor, such
    /// as every fork-then-exec of the process makes, reports the failure without using it up,
    /// and the process's own fsync still hears of it.
    fn check_failures(&self, fh: FileHandle, advance: bool) -> FsResult<()> {
        let Some(ino) = lock(&self.handles).get(&fh.0).map(|handle| handle.ino) else { return Ok(()) };
        // (Read outside the handles' lock: it waits for a commit of the file in progress.)
        let failures = self.volume.failed_writes(ino);
        let mut handles = lock(&self.handles);
        let Some(handle) = handles.get_mut(&fh.0) else { return Ok(()) };
        if failures > handle.failures_seen {
            if advance {
                handle.failures_seen = failures;
            }
            return Err(FsError::Io("a write to this file failed to commit".into()));
        }
        Ok(())
    }

    fn owner(&self, req: &Request, parent: u64) -> FsResult<(Owner, bool)> {
        // A directory with setgid gives its group (and, to directories, the bit) to new entries.
        let dir = self.volume.getattr(parent)?;
        let setgid = dir.perm & libc::S_ISGID != 0;
        Ok((Owner { uid: req.uid(), gid: if setgid { dir.gid } else { req.gid() } }, setgid))
    }

    // The arguments are the FUSE create-like requests' (mknod, mkdir, symlink).
    #[allow(clippy::too_many_arguments)]
    fn make(&self, req: &Request, parent: u64, name: &OsStr, mode: u32, umask: u32, rdev: u32, target: &[u8]) -> FsResult<Attr> {
        let kind = if target.is_empty() { Kind::from_mode(mode).ok_or_else(|| FsError::Invalid(format!("mode {mode:o}")))? } else { Kind::Symlink };
        let (owner, setgid_dir) = self.owner(req, parent)?;
        let mut perm = if kind == Kind::Symlink { 0o777 } else { mode & 0o7777 & !umask };
        if kind == Kind::Dir && setgid_dir {
            perm |= libc::S_ISGID;
        }
        self.volume.mknod(parent, name.as_bytes(), kind, perm, owner, rdev, target)
    }
}

impl Filesystem for ChunkFs {
    /// Unmounting: held writes are committed before the process goes.
    fn destroy(&mut self) {
        // (The unsafe committer finishes what it was handed: only faults lose those writes.)
        if let Some((sender, committer)) = self.unsafe_committer.take() {
            drop(sender);
            let _ = committer.join();
        }
        if let Err(err) = self.volume.flush_all() {
            tracing::error!(error = %err, "committing held writes at unmount failed");
        }
    }

    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        self.start_reaper()?;
        // fcntl record locks and flock both come to us (and go to the cluster). fuser 0.18 does
        // not say which of the two a request is (its issue 155), and need not: a flock is a
        // whole-file lock whose owner is the open file description, given back at its last
        // close (`release` with a lock owner), while a record lock's owner is the process,
        // given back at any close (`flush`). They share one lock table, so a flock and a
        // record lock on one file exclude each other (as on NFS, where Linux emulates flock
        // with record locks).
        if let Err(unsupported) = config.add_capabilities(InitFlags::FUSE_POSIX_LOCKS | InitFlags::FUSE_FLOCK_LOCKS) {
            tracing::warn!(?unsupported, "the kernel does not pass some locks: they stay local to this machine");
        }
        // Files are opened for direct I/O (`FILE_OPEN_FLAGS`); mmap of them needs Linux 6.6.
        if config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP).is_err() {
            tracing::warn!("the kernel (before Linux 6.6) cannot mmap files opened for direct I/O: mmap of a file here fails with ENODEV");
        }
        if let Err(nearest) = config.set_max_write(MAX_WRITE_BYTES) {
            let _ = config.set_max_write(nearest);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        guarded("lookup", || match self.volume.lookup(parent.0, name.as_bytes()) {
            Ok(attr) => reply.entry(&ATTR_TTL, &file_attr(&attr), Generation(0)),
            Err(err) => reply.error(errno(&err)),
        })
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        guarded("getattr", || match self.volume.getattr(ino.0) {
            Ok(attr) => reply.attr(&ATTR_TTL, &file_attr(&attr)),
            Err(err) => reply.error(errno(&err)),
        })
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        guarded("setattr", || {
            let result = (|| {
                let mut set = SetAttr { perm: mode.map(|m| m & 0o7777), uid, gid, size, atime: atime.map(time_set), mtime: mtime.map(time_set) };
                // chown by anyone, and a write or truncate by a non-owner, clear setuid and
                // (with group execute) setgid, as local filesystems do.
                if (uid.is_some() || gid.is_some() || (size.is_some() && req.uid() != 0)) && set.perm.is_none() {
                    let current = self.volume.getattr(ino.0)?;
                    if current.kind == Kind::File && current.perm & (libc::S_ISUID | libc::S_ISGID) != 0 {
                        let mut perm = current.perm & !libc::S_ISUID;
                        if perm & 0o010 != 0 {
                            perm &= !libc::S_ISGID;
                        }
                        if perm != current.perm {
                            set.perm = Some(perm);
                        }
                    }
                }
                self.volume.setattr(ino.0, &set)
            })();
            match result {
                Ok(attr) => reply.attr(&ATTR_TTL, &file_attr(&attr)),
                Err(err) => reply.error(errno(&err)),
            }
        })
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        guarded("readlink", || match self.volume.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(err) => reply.error(errno(&err)),
        })
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        guarded("mknod", || match self.make(req, parent.0, name, mode, umask, rdev, &[]) {
            Ok(attr) => reply.entry(&ATTR_TTL, &file_attr(&attr), Generation(0)),
            Err(err) => reply.error(errno(&err)),
        })
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        guarded("mkdir", || match self.make(req, parent.0, name, libc::S_IFDIR | (mode & 0o7777), umask, 0, &[]) {
            Ok(attr) => reply.entry(&ATTR_TTL, &file_attr(&attr), Generation(0)),
            Err(err) => reply.error(errno(&err)),
        })
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("unlink", || match self.volume.unlink(parent.0, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(err) => reply.error(errno(&err)),
        })
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("rmdir", || match self.volume.rmdir(parent.0, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(err) => reply.error(errno(&err)),
        })
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        guarded("symlink", || {
            let target = target.as_os_str().as_bytes();
            let result = if target.is_empty() { Err(FsError::NotFound) } else { self.make(req, parent.0, link_name, libc::S_IFLNK | 0o777, 0, 0, target) };
            match result {
                Ok(attr) => reply.entry(&ATTR_TTL, &file_attr(&attr), Generation(0)),
                Err(err) => reply.error(errno(&err)),
            }
        })
    }

    fn rename(&self, _req: &Request, parent: INodeNo, name: &OsStr, newparent: INodeNo, newname: &OsStr, flags: RenameFlags, reply: ReplyEmpty) {
        guarded("rename", || {
            if flags.contains(RenameFlags::RENAME_WHITEOUT) {
                return reply.error(Errno::EINVAL);
            }
            let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
            let exchange = flags.contains(RenameFlags::RENAME_EXCHANGE);
            match self.volume.rename(parent.0, name.as_bytes(), newparent.0, newname.as_bytes(), noreplace, exchange) {
                Ok(()) => reply.ok(),
                Err(err) => reply.error(errno(&err)),
            }
        })
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        guarded("link", || match self.volume.link(ino.0, newparent.0, newname.as_bytes()) {
            Ok(attr) => reply.entry(&ATTR_TTL, &file_attr(&attr), Generation(0)),
            Err(err) => reply.error(errno(&err)),
        })
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        guarded("open", || match self.volume.getattr(ino.0) {
            Ok(attr) if attr.kind == Kind::Dir => reply.error(Errno::EISDIR),
            Ok(_) => {
                let fh = self.open_handle(ino.0);
                reply.opened(fh, FILE_OPEN_FLAGS)
            }
            Err(err) => reply.error(errno(&err)),
        })
    }

    fn read(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, size: u32, _flags: OpenFlags, _lock_owner: Option<LockOwner>, reply: ReplyData) {
        guarded("read", || match self.volume.read(ino.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(err) => reply.error(errno(&err)),
        })
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        tracing::trace!(ino = ino.0, offset, len = data.len(), "write");
        if let Some((committer, _)) = &self.unsafe_committer {
            return match lock(committer).send((ino.0, offset, data.to_vec())) {
                Ok(()) => reply.written(data.len() as u32),
                Err(_) => reply.error(Errno::EIO),
            };
        }
        // An O_SYNC or O_DSYNC write returns once committed (with held writes: commit now).
        let sync = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let opened = lock(&self.handles).get(&fh.0).and_then(|handle| handle.session);
        guarded("write", || {
            match self.volume.write_as(opened, ino.0, offset, data).and_then(|n| if sync { self.volume.flush(ino.0).map(|()| n) } else { Ok(n) }) {
                Ok(written) => reply.written(written as u32),
                Err(err) => {
                    if matches!(err, FsError::Io(_)) {
                        self.volume.note_failed_write(ino.0);
                    }
                    tracing::warn!(ino = ino.0, offset, len = data.len(), error = %err, "write failed");
                    reply.error(errno(&err))
                }
            }
        })
    }

    /// A close: POSIX gives back every record lock the process holds on the file (the kernel
    /// sends no unlock of its own), then reports a failed write as close(2) may.
    fn flush(&self, _req: &Request, ino: INodeNo, fh: FileHandle, lock_owner: LockOwner, reply: ReplyEmpty) {
        guarded("flush", || {
            let committed = self.commit(ino.0);
            let unlocked = match self.volume.has_locks(ino.0) {
                true => self.volume.lock_range(ino.0, lock_owner.0, 0, 0, u64::MAX, LockKind::Unlock, false),
                false => Ok(()),
            };
            match committed.and(unlocked).and_then(|()| self.check_failures(fh, false)) {
                Ok(()) => reply.ok(),
                Err(err) => reply.error(errno(&err)),
            }
        })
    }

    fn getlk(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, lock_owner: LockOwner, start: u64, end: u64, typ: i32, pid: u32, reply: ReplyLock) {
        guarded("getlk", || {
            let exclusive = typ == libc::F_WRLCK;
            match self.volume.test_lock(ino.0, lock_owner.0, pid, start, end, exclusive) {
                Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
                Ok(Some(holder)) => reply.locked(holder.start, holder.end, if holder.exclusive { libc::F_WRLCK } else { libc::F_RDLCK }, holder.pid),
                Err(err) => reply.error(errno(&err)),
            }
        })
    }

    /// F_SETLK answers at once (EAGAIN when another owner's lock is in the way); F_SETLKW waits
    /// on a thread of its own so that the mount goes on serving meanwhile.
    fn setlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        guarded("setlk", || {
            self.note_lock_owner(fh, lock_owner.0);
            let kind = match typ {
                libc::F_RDLCK => LockKind::Shared,
                libc::F_WRLCK => LockKind::Exclusive,
                libc::F_UNLCK => LockKind::Unlock,
                _ => return reply.error(Errno::EINVAL),
            };
            if !sleep || kind == LockKind::Unlock {
                return match self.volume.lock_range(ino.0, lock_owner.0, pid, start, end, kind, false) {
                    Ok(()) => reply.ok(),
                    Err(err) => reply.error(errno(&err)),
                };
            }
            let volume = self.volume.clone();
            let spawned = std::thread::Builder::new().name("lock-wait".into()).spawn(move || {
                guarded("setlkw", || match volume.lock_range(ino.0, lock_owner.0, pid, start, end, kind, true) {
                    Ok(()) => reply.ok(),
                    Err(err) => reply.error(errno(&err)),
                })
            });
            if let Err(err) = spawned {
                tracing::warn!(error = %err, "no thread for a lock wait: answered EIO");
            }
        })
    }

    /// The last close of an open file description: its flock (`lock_owner`) and its OFD locks
    /// (owners that locked through it) go.
    fn release(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _flags: OpenFlags, lock_owner: Option<LockOwner>, _flush: bool, reply: ReplyEmpty) {
        guarded("release", || {
            let mut owners = self.close_handle(fh);
            owners.extend(lock_owner.map(|o| o.0));
            if self.volume.has_locks(ino.0) {
                for owner in owners {
                    if let Err(err) = self.volume.lock_range(ino.0, owner, 0, 0, u64::MAX, LockKind::Unlock, false) {
                        tracing::warn!(ino = ino.0, error = %err, "giving back locks at close failed (they go when the mount's lease ends)");
                    }
                }
            }
            reply.ok()
        })
    }

    /// Commits what the mount holds of the file (`--durability fsync`; with the default every
    /// write was committed before it was answered), then reports a write that failed since
    /// this descriptor last asked (EIO): it never succeeds over one.
    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        guarded("fsync", || match self.commit(ino.0).and_then(|()| self.check_failures(fh, true)) {
            Ok(()) => reply.ok(),
            Err(err) => reply.error(errno(&err)),
        })
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        guarded("opendir", || match self.volume.getattr(ino.0) {
            Ok(attr) if attr.kind == Kind::Dir => reply.opened(FileHandle(0), FopenFlags::empty()),
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(err) => reply.error(errno(&err)),
        })
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        guarded("readdir", || match self.volume.readdir(ino.0) {
            Ok((parent, entries)) => {
                let dots = [(ino.0, FileType::Directory, b".".to_vec()), (parent, FileType::Directory, b"..".to_vec())];
                let all = dots.into_iter().chain(entries.into_iter().map(|(name, e)| (e.ino, file_type(e.kind), name)));
                for (i, (entry_ino, kind, name)) in all.enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(entry_ino), (i + 1) as u64, kind, OsStr::from_bytes(&name)) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(err) => reply.error(errno(&err)),
        })
    }

    /// Directory changes are committed before they are answered.
    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok()
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // The cluster's free space is per node and namespace; a volume reports a fixed large
        // capacity (stop-writes answers ENOSPC when space runs out).
        let blocks = 1u64 << 32;
        reply.statfs(blocks, blocks, blocks, 1 << 32, 1 << 32, 4096, chunkfiles::NAME_BYTES_MAX as u32, 4096)
    }

    /// Extended attributes are not kept: ENOSYS makes the kernel stop asking (it asks for
    /// security.capability before every write otherwise).
    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS)
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS)
    }

    fn setxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _value: &[u8], _flags: i32, _position: u32, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS)
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS)
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.ok()
    }

    fn create(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, _flags: i32, reply: ReplyCreate) {
        guarded("create", || match self.make(req, parent.0, name, libc::S_IFREG | (mode & 0o7777), umask, 0, &[]) {
            Ok(attr) => {
                let fh = self.open_handle(attr.ino);
                reply.created(&ATTR_TTL, &file_attr(&attr), Generation(0), fh, FILE_OPEN_FLAGS)
            }
            Err(err) => reply.error(errno(&err)),
        })
    }

    fn fallocate(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, length: u64, mode: i32, reply: ReplyEmpty) {
        guarded("fallocate", || {
            if mode != 0 {
                return reply.error(Errno::EOPNOTSUPP);
            }
            // Space is not reserved ahead in the cluster; the size grows as posix_fallocate says.
            let result = offset.checked_add(length).ok_or(FsError::FileTooBig(chunkfiles::FILE_BYTES_MAX)).and_then(|end| match self.volume.getattr(ino.0) {
                Ok(attr) if attr.size < end => self.volume.truncate(ino.0, end),
                Ok(_) => Ok(()),
                Err(err) => Err(err),
            });
            match result {
                Ok(()) => reply.ok(),
                Err(err) => reply.error(errno(&err)),
            }
        })
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread and every thread it starts later, so that
/// `serve` takes them with sigwait and unmounts cleanly.
pub fn block_termination_signals() -> libc::sigset_t {
    // SAFETY: plain libc calls on a local signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Mounts `volume` and serves it until it is unmounted (by `umount`, or by this process on
/// SIGTERM, SIGINT or SIGHUP).
pub fn serve(volume: Volume, mountpoint: &Path, serving: Serving, signals: libc::sigset_t) -> Result<()> {
    let Serving { threads, unsafe_ack_before_commit } = serving;
    // (The lease session is opened by the caller: `Volume::start_lease`.)
    let name = volume.name().to_owned();
    let mut config = Config::default();
    config.mount_options = vec![MountOption::FSName(format!("chunkfs:{name}")), MountOption::Subtype("chunkfs".into()), MountOption::DefaultPermissions];
    // Other users may use the mount (tests switch users); the kernel checks permissions.
    config.acl = SessionACL::All;
    config.n_threads = Some(threads);
    let mut fs = ChunkFs::new(volume);
    if unsafe_ack_before_commit {
        fs.ack_before_commit().context("starting the unsafe committer")?;
    }
    // Mounted by this process where it may (root), with the source "PROGRAM#chunkfs:VOLUME":
    // mount.fuse, which util-linux hands `mount -o remount,ro|rw MOUNTPOINT` to, then runs
    // this program as the mount helper (`remount_as_helper`). Else through fuser's mount code.
    let (mut session, ours) = match mount_typed(mountpoint, &name) {
        Ok(fd) => (fuser::Session::from_fd(fs, fd, SessionACL::All, config).context("starting the FUSE session")?, true),
        Err(err) => {
            tracing::info!(error = %err, "mounting as fuse.chunkfs failed: mounting through fuser");
            (fuser::Session::new(fs, mountpoint, &config).with_context(|| format!("mounting at {}", mountpoint.display()))?, false)
        }
    };
    let mut unmounter = session.unmount_callable();
    let mountpoint_text = mountpoint.display().to_string();
    let target = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()).context("the mountpoint's path holds a NUL byte")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut signal = 0;
            // SAFETY: waits for one of the blocked signals of `signals`.
            unsafe { libc::sigwait(&signals, &mut signal) };
            tracing::info!(signal, "unmounting {mountpoint_text}");
            let result = if ours { unmount(&target) } else { unmounter.unmount() };
            if let Err(err) = result {
                eprintln!("chunkfs: unmounting {mountpoint_text}: {err}");
            }
        })
        .context("starting the signal thread")?;
    eprintln!("chunkfs: volume {name} mounted at {}", mountpoint.display());
    session.run().context("serving the mount")?;
    Ok(())
}

/// Mounts a FUSE file system at `mountpoint` with mount(2) (root only), with the options fuser
/// gives its own mounts and the source "PROGRAM#chunkfs:VOLUME"; returns the /dev/fuse
/// descriptor.
fn mount_typed(mountpoint: &Path, name: &str) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, OwnedFd};
    let fuse = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse")?;
    let fd: OwnedFd = fuse.into();
    let root_mode = std::fs::metadata(mountpoint)?.mode() & libc::S_IFMT;
    // SAFETY: plain getters.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let data = format!("fd={},rootmode={root_mode:o},user_id={uid},group_id={gid},default_permissions,allow_other", fd.as_raw_fd());
    let cstr = |s: &[u8]| std::ffi::CString::new(s).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput));
    let program = std::env::current_exe()?;
    let source = format!("{}#chunkfs:{name}", program.display());
    let (source, target, fstype, data) = (cstr(source.as_bytes())?, cstr(mountpoint.as_os_str().as_bytes())?, cstr(b"fuse")?, cstr(data.as_bytes())?);
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), libc::MS_NOSUID | libc::MS_NODEV, data.as_ptr().cast()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Unmounts what `mount_typed` mounted (lazily if it is busy).
fn unmount(target: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    // SAFETY: as above.
    match unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}
