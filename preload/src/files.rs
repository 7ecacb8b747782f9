//! The shim's file operations on mapped paths and descriptors, as `Volume` calls: opening,
//! reading, writing, syncing, attributes and locks. Errors are `FsError::errno`, as chunkfs.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;

use chunkfiles::{Attr, Kind, LockKind, Owner, SetAttr, TimeSet, Volume};
use parking_lot::Mutex;

use crate::paths::{self, Mapped, Walked};
use crate::placeholder;
use crate::table::{self, Descriptor, OpenFile};
use crate::{state, Res};

/// Largest piece of a write that goes as one entry (as chunkfs's largest write request); a
/// longer write() is several entries, each committed before the next.
const WRITE_PIECE_BYTES: usize = 1 << 20;
/// Largest read served by one call (a shorter count is a valid read()).
const READ_BYTES_MAX: usize = 16 << 20;

/// What `open` decided: a mapped descriptor, or a path outside any volume for libc.
pub(crate) enum Opened {
    Fd(i32),
    Outside(String),
}

/// The errno of a file-layer error; one that is EIO (the cluster failed, or data is damaged)
/// is also said on stderr, since errno alone cannot say which.
pub(crate) fn errno(err: chunkfiles::FsError) -> i32 {
    let errno = err.errno();
    if errno == libc::EIO {
        crate::log(&format!("EIO: {err}"));
    }
    errno
}

/// The process's umask (read without changing it: /proc/self/status).
fn umask() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Umask:")).and_then(|v| u32::from_str_radix(v.trim(), 8).ok()).unwrap_or(0o022)
}

fn owner() -> Owner {
    // SAFETY: plain getters.
    unsafe { Owner { uid: libc::geteuid(), gid: libc::getegid() } }
}

/// Makes `name` in directory `parent` (mkdir, mknod, creat), mode masked by the umask.
pub(crate) fn make(volume: &Volume, parent: u64, name: &str, kind: Kind, mode: u32, target: &[u8]) -> Res<Attr> {
    let perm = if kind == Kind::Symlink { 0o777 } else { mode & 0o7777 & !umask() };
    volume.mknod(parent, name.as_bytes(), kind, perm, owner(), 0, target).map_err(errno)
}

/// Opens a mapped path (open, openat, creat, fopen, opendir): a new placeholder descriptor.
pub(crate) fn open(mapped: &Mapped, flags: i32, mode: u32) -> Res<Opened> {
    if flags & libc::O_TMPFILE == libc::O_TMPFILE {
        // An unnamed file in a volume: not supported (callers fall back to a named one).
        return Err(libc::EOPNOTSUPP);
    }
    let follow = flags & libc::O_NOFOLLOW == 0;
    let (volume, walked) = paths::lookup(mapped, follow)?;
    let attr = match walked {
        Walked::Outside(path) => return Ok(Opened::Outside(path)),
        Walked::Found(attr) => {
            if flags & libc::O_CREAT != 0 && flags & libc::O_EXCL != 0 {
                return Err(libc::EEXIST);
            }
            attr
        }
        Walked::Missing { parent, name } => {
            if flags & libc::O_CREAT == 0 {
                return Err(libc::ENOENT);
            }
            match make(&volume, parent, &name, Kind::File, mode, &[]) {
                Ok(attr) => attr,
                // Made by someone else meanwhile: open theirs unless O_EXCL.
                Err(libc::EEXIST) if flags & libc::O_EXCL == 0 => volume.lookup(parent, name.as_bytes()).map_err(errno)?,
                Err(e) => return Err(e),
            }
        }
    };
    let access = flags & libc::O_ACCMODE;
    let writing = access == libc::O_WRONLY || access == libc::O_RDWR;
    match attr.kind {
        Kind::Symlink if !follow => return Err(libc::ELOOP),
        Kind::Dir if writing => return Err(libc::EISDIR),
        Kind::Dir => {}
        _ if flags & libc::O_DIRECTORY != 0 => return Err(libc::ENOTDIR),
        Kind::File => {}
        // Devices, FIFOs and sockets of a volume are names only here.
        _ => return Err(libc::ENXIO),
    }
    volume.invalidate(attr.ino);
    if attr.kind == Kind::File && writing && flags & libc::O_TRUNC != 0 && attr.size != 0 {
        volume.truncate(attr.ino, 0).map_err(errno)?;
    }
    let description = placeholder::Description {
        volume: state::config().maps[mapped.mapping].1.clone(),
        ino: attr.ino,
        kind: attr.kind,
        flags: flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY | libc::O_CLOEXEC),
        path: mapped.full.clone(),
    };
    let (fd, page) = placeholder::create(&description, flags & libc::O_CLOEXEC != 0)?;
    let file = OpenFile {
        id: table::next_id(),
        mapping: mapped.mapping,
        ino: attr.ino,
        kind: attr.kind,
        path: mapped.full.clone(),
        flags: AtomicI32::new(flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY | libc::O_CLOEXEC)),
        offset: Mutex::new(page),
        session: volume.open_session(),
        failures_seen: AtomicU64::new(volume.failed_writes(attr.ino)),
    };
    table::insert(fd, Descriptor { file: Arc::new(file) });
    Ok(Opened::Fd(fd))
}

pub(crate) fn volume_of(file: &OpenFile) -> Res<Arc<Volume>> {
    state::volume(file.mapping)
}

/// Reads up to `len` bytes at `offset` into `out`; returns how many.
pub(crate) fn read_at(file: &OpenFile, offset: u64, out: &mut [u8]) -> Res<usize> {
    if file.kind == Kind::Dir {
        return Err(libc::EISDIR);
    }
    if !file.readable() {
        return Err(libc::EBADF);
    }
    let len = out.len().min(READ_BYTES_MAX);
    let data = volume_of(file)?.read(file.ino, offset, len as u32).map_err(errno)?;
    let n = data.len().min(len);
    out[..n].copy_from_slice(&data[..n]);
    Ok(n)
}

/// Writes `data` at `offset` (None: the end of the file, O_APPEND), in pieces of at most
/// `WRITE_PIECE_BYTES`, each committed before the next; returns where it went and how much
/// (a failure after some pieces is a short write).
pub(crate) fn write_at(file: &OpenFile, offset: Option<u64>, data: &[u8]) -> Res<(u64, usize)> {
    if file.kind == Kind::Dir {
        return Err(libc::EISDIR);
    }
    if !file.writable() {
        return Err(libc::EBADF);
    }
    let volume = volume_of(file)?;
    let sync = file.flags() & (libc::O_SYNC | libc::O_DSYNC) != 0;
    let mut written = 0;
    let mut start = offset;
    for piece in data.chunks(WRITE_PIECE_BYTES) {
        let result = match start {
            None => volume.append_as(file.session, file.ino, piece),
            Some(at) => volume.write_as(file.session, file.ino, at + written as u64, piece).map(|n| (at + written as u64, n)),
        }
        .and_then(|done| if sync { volume.flush(file.ino).map(|()| done) } else { Ok(done) });
        match result {
            Ok((at, n)) => {
                if start.is_none() {
                    start = Some(at);
                }
                written += n;
            }
            Err(err) => {
                volume.note_failed_write(file.ino);
                if written > 0 {
                    break;
                }
                return Err(errno(err));
            }
        }
    }
    Ok((start.unwrap_or(0), written))
}

/// read() at the descriptor's offset, moving it.
pub(crate) fn read(file: &OpenFile, out: &mut [u8]) -> Res<usize> {
    let offset = file.offset.lock();
    let n = read_at(file, offset.get(), out)?;
    offset.set(offset.get() + n as u64);
    Ok(n)
}

/// write() at the descriptor's offset (or the end, O_APPEND), moving it.
pub(crate) fn write(file: &OpenFile, data: &[u8]) -> Res<usize> {
    let offset = file.offset.lock();
    let at = if file.flags() & libc::O_APPEND != 0 { None } else { Some(offset.get()) };
    let (start, n) = write_at(file, at, data)?;
    offset.set(start + n as u64);
    Ok(n)
}

pub(crate) fn seek(file: &OpenFile, offset: i64, whence: i32) -> Res<i64> {
    let current = file.offset.lock();
    let size = || -> Res<i64> { Ok(volume_of(file)?.getattr(file.ino).map_err(errno)?.size as i64) };
    let target = match whence {
        libc::SEEK_SET => offset,
        libc::SEEK_CUR => (current.get() as i64).checked_add(offset).ok_or(libc::EOVERFLOW)?,
        libc::SEEK_END => size()?.checked_add(offset).ok_or(libc::EOVERFLOW)?,
        // The whole file is data (holes read as zeros but are not reported).
        libc::SEEK_DATA => {
            if offset >= size()? {
                return Err(libc::ENXIO);
            }
            offset
        }
        libc::SEEK_HOLE => {
            let size = size()?;
            if offset >= size {
                return Err(libc::ENXIO);
            }
            size
        }
        _ => return Err(libc::EINVAL),
    };
    if target < 0 {
        return Err(libc::EINVAL);
    }
    current.set(target as u64);
    Ok(target)
}

/// fsync, fdatasync, sync_file_range: commits what waits (`durability fsync`), and reports a
/// commit failure of the file once to each description open when it happened.
pub(crate) fn sync(file: &OpenFile) -> Res<()> {
    if file.kind != Kind::File {
        return Ok(());
    }
    let volume = volume_of(file)?;
    let flushed = volume.flush(file.ino);
    let failures = volume.failed_writes(file.ino);
    let seen = file.failures_seen.swap(failures, Ordering::AcqRel);
    flushed.map_err(errno)?;
    if failures > seen {
        return Err(libc::EIO);
    }
    Ok(())
}

pub(crate) fn truncate(volume: &Volume, attr: &Attr, size: i64) -> Res<()> {
    if size < 0 {
        return Err(libc::EINVAL);
    }
    match attr.kind {
        Kind::File => volume.truncate(attr.ino, size as u64).map_err(errno),
        Kind::Dir => Err(libc::EISDIR),
        _ => Err(libc::EINVAL),
    }
}

pub(crate) fn ftruncate(file: &OpenFile, size: i64) -> Res<()> {
    if !file.writable() || file.kind != Kind::File {
        return Err(libc::EINVAL);
    }
    let volume = volume_of(file)?;
    let attr = volume.getattr(file.ino).map_err(errno)?;
    truncate(&volume, &attr, size)
}

/// fallocate mode 0 and posix_fallocate: the file grows to cover the range (reads of the new
/// part are zeros; chunks are not reserved, as on a thin volume). Other modes: EOPNOTSUPP.
pub(crate) fn allocate(file: &OpenFile, mode: i32, offset: i64, len: i64) -> Res<()> {
    if offset < 0 || len <= 0 {
        return Err(libc::EINVAL);
    }
    if mode != 0 {
        return Err(libc::EOPNOTSUPP);
    }
    if !file.writable() {
        return Err(libc::EBADF);
    }
    let end = offset.checked_add(len).ok_or(libc::EFBIG)?;
    let volume = volume_of(file)?;
    let attr = volume.getattr(file.ino).map_err(errno)?;
    if (attr.size as i64) < end {
        volume.truncate(file.ino, end as u64).map_err(errno)?;
    }
    Ok(())
}

/// After a descriptor of `file` was removed: commits what writes hold (`durability fsync`,
/// as chunkfs does at close; the failure is close's), and gives back locks as the kernel
/// would (every POSIX lock of the process on the file at any close; the description's OFD
/// and flock locks at its last close).
pub(crate) fn closed(file: &Arc<OpenFile>) -> Res<()> {
    let volume = volume_of(file)?;
    let committed = if file.kind == Kind::File && file.writable() { volume.flush(file.ino).map_err(errno) } else { Ok(()) };
    if !volume.has_locks(file.ino) {
        return committed;
    }
    let _ = volume.lock_range(file.ino, posix_owner(), 0, 0, u64::MAX, LockKind::Unlock, false);
    if table::references(file) == 0 {
        let _ = volume.lock_range(file.ino, description_owner(file), 0, 0, u64::MAX, LockKind::Unlock, false);
    }
    committed
}

/// The owner of this process's POSIX (fcntl F_SETLK, lockf) locks.
pub(crate) fn posix_owner() -> u64 {
    // SAFETY: a plain getter.
    1 << 62 | unsafe { libc::getpid() } as u64
}

/// The owner of a description's OFD and flock locks.
pub(crate) fn description_owner(file: &OpenFile) -> u64 {
    1 << 63 | file.id
}

/// A byte range from a struct flock's fields, as an inclusive [start, end].
pub(crate) fn lock_range_of(file: &OpenFile, whence: i16, start: i64, len: i64) -> Res<(u64, u64)> {
    let base = match whence as i32 {
        libc::SEEK_SET => 0,
        libc::SEEK_CUR => file.offset.lock().get() as i64,
        libc::SEEK_END => volume_of(file)?.getattr(file.ino).map_err(errno)?.size as i64,
        _ => return Err(libc::EINVAL),
    };
    let first = base.checked_add(start).ok_or(libc::EOVERFLOW)?;
    let (first, last) = match len {
        0 => (first, i64::MAX),
        len if len > 0 => (first, first.checked_add(len - 1).ok_or(libc::EOVERFLOW)?),
        len => (first.checked_add(len).ok_or(libc::EINVAL)?, first - 1),
    };
    if first < 0 || last < first {
        return Err(libc::EINVAL);
    }
    Ok((first as u64, if last == i64::MAX { u64::MAX } else { last as u64 }))
}

/// Takes, changes or gives back a lock of `owner` (waiting with `wait`).
pub(crate) fn lock(file: &OpenFile, owner: u64, kind: LockKind, range: (u64, u64), wait: bool) -> Res<()> {
    if file.kind != Kind::File {
        return Err(libc::EINVAL);
    }
    match kind {
        LockKind::Shared if !file.readable() => return Err(libc::EBADF),
        LockKind::Exclusive if !file.writable() => return Err(libc::EBADF),
        _ => {}
    }
    // SAFETY: a plain getter.
    let pid = unsafe { libc::getpid() } as u32;
    volume_of(file)?.lock_range(file.ino, owner, pid, range.0, range.1, kind, wait).map_err(errno)
}

/// Fills a struct stat.
pub(crate) fn fill_stat(attr: &Attr, mapping: usize, out: &mut libc::stat64) {
    // SAFETY: all-zero is a valid struct stat.
    *out = unsafe { std::mem::zeroed() };
    out.st_dev = device_of(mapping);
    out.st_ino = attr.ino;
    out.st_nlink = attr.nlink as _;
    out.st_mode = attr.kind.mode_bits() | (attr.perm & 0o7777);
    out.st_uid = attr.uid;
    out.st_gid = attr.gid;
    out.st_rdev = attr.rdev as _;
    out.st_size = attr.size as i64;
    out.st_blksize = 4096;
    out.st_blocks = attr.blocks as i64;
    (out.st_atime, out.st_atime_nsec) = split_ns(attr.atime_ns);
    (out.st_mtime, out.st_mtime_nsec) = split_ns(attr.mtime_ns);
    (out.st_ctime, out.st_ctime_nsec) = split_ns(attr.ctime_ns);
}

/// A device number of its own for each mapping (high, so it meets no real device).
pub(crate) fn device_of(mapping: usize) -> u64 {
    libc::makedev(0xcc5, mapping as u32)
}

pub(crate) fn split_ns(ns: i64) -> (i64, i64) {
    (ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000))
}

pub(crate) fn fill_statx(attr: &Attr, mapping: usize, out: &mut libc::statx) {
    // SAFETY: all-zero is a valid struct statx.
    *out = unsafe { std::mem::zeroed() };
    out.stx_mask = libc::STATX_BASIC_STATS | libc::STATX_BTIME;
    out.stx_blksize = 4096;
    out.stx_nlink = attr.nlink;
    out.stx_uid = attr.uid;
    out.stx_gid = attr.gid;
    out.stx_mode = (attr.kind.mode_bits() | (attr.perm & 0o7777)) as u16;
    out.stx_ino = attr.ino;
    out.stx_size = attr.size;
    out.stx_blocks = attr.blocks;
    let time = |ns: i64| {
        let (sec, nsec) = split_ns(ns);
        // SAFETY: all-zero is a valid timestamp.
        let mut stamp: libc::statx_timestamp = unsafe { std::mem::zeroed() };
        stamp.tv_sec = sec;
        stamp.tv_nsec = nsec as u32;
        stamp
    };
    out.stx_atime = time(attr.atime_ns);
    out.stx_btime = time(attr.crtime_ns);
    out.stx_ctime = time(attr.ctime_ns);
    out.stx_mtime = time(attr.mtime_ns);
    let dev = device_of(mapping);
    out.stx_dev_major = libc::major(dev);
    out.stx_dev_minor = libc::minor(dev);
}

/// A time from utimensat's struct timespec (None: UTIME_OMIT).
pub(crate) fn time_set(ts: &libc::timespec) -> Option<TimeSet> {
    match ts.tv_nsec {
        libc::UTIME_OMIT => None,
        libc::UTIME_NOW => Some(TimeSet::Now),
        nsec => Some(TimeSet::At(ts.tv_sec.saturating_mul(1_000_000_000).saturating_add(nsec))),
    }
}

/// utimensat/futimens on an inode (`times` NULL: both now).
///
/// # Safety
/// `times` is NULL or points to two timespecs.
pub(crate) unsafe fn set_times(volume: &Volume, ino: u64, times: *const libc::timespec) -> Res<()> {
    let (atime, mtime) = if times.is_null() {
        (Some(TimeSet::Now), Some(TimeSet::Now))
    } else {
        // SAFETY: the caller's two timespecs.
        let times = unsafe { std::slice::from_raw_parts(times, 2) };
        (time_set(&times[0]), time_set(&times[1]))
    };
    volume.setattr(ino, &SetAttr { atime, mtime, ..Default::default() }).map(|_| ()).map_err(errno)
}

/// access(): whether the caller may (mode) use the inode; root may do anything but execute a
/// file no one may execute.
pub(crate) fn access(attr: &Attr, mode: i32) -> Res<()> {
    if mode == libc::F_OK {
        return Ok(());
    }
    // SAFETY: plain getters.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let perm = attr.perm;
    let granted = if uid == 0 {
        let any_exec = perm & 0o111 != 0 || attr.kind == Kind::Dir;
        0o6 | if any_exec { 0o1 } else { 0 }
    } else if uid == attr.uid {
        (perm >> 6) & 7
    } else if gid == attr.gid {
        (perm >> 3) & 7
    } else {
        perm & 7
    };
    if (mode as u32) & !granted & 7 != 0 {
        return Err(libc::EACCES);
    }
    Ok(())
}
