//! The hooks that name files by path (and the fd forms of the same questions): stat and its
//! family, access, the namespace changes (unlink, rename, link, symlink, mkdir, rmdir),
//! attributes (chmod, chown, utimensat, truncate), statfs, extended attributes, realpath.

use std::ffi::{CStr, CString};

use chunkfiles::{FsError, Kind, SetAttr};
use libc::{c_char, c_int, c_void, gid_t, mode_t, off64_t, off_t, size_t, ssize_t, uid_t};

use crate::files::{self, fill_stat, fill_statx};
use crate::paths::{self, Mapped, Walked};
use crate::real::pass;
use crate::{shim, table, Res};

type Stat = libc::stat64;

fn fs(err: FsError) -> i32 {
    files::errno(err)
}

/// Runs `body` for a mapped path, or None when `path` is not mapped.
///
/// # Safety
/// `path` is NULL or NUL-terminated.
unsafe fn on_path<T: crate::Failed>(what: &str, dirfd: c_int, path: *const c_char, body: impl FnOnce(&Mapped) -> Res<T>) -> Option<T> {
    // SAFETY: the caller's path.
    let mapped = unsafe { paths::classify(dirfd, path) }?;
    Some(shim(what, || body(&mapped)))
}

/// The inode a mapped path names, or the errno (a symlink out of the volume: EXDEV, for
/// the calls that do not follow it out).
fn found(mapped: &Mapped, follow: bool) -> Res<(std::sync::Arc<chunkfiles::Volume>, chunkfiles::Attr)> {
    match paths::lookup(mapped, follow)? {
        (volume, Walked::Found(attr)) => Ok((volume, attr)),
        (_, Walked::Missing { .. }) => Err(libc::ENOENT),
        (_, Walked::Outside(_)) => Err(libc::EXDEV),
    }
}

fn c_string(path: String) -> Res<CString> {
    CString::new(path).map_err(|_| libc::EINVAL)
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

// ---- stat ----

type FstatatFn = unsafe extern "C" fn(c_int, *const c_char, *mut Stat, c_int) -> c_int;
type FstatFn = unsafe extern "C" fn(c_int, *mut Stat) -> c_int;

/// stat, lstat, fstatat and their old and 64-bit names, on a path.
unsafe fn stat_at(dirfd: c_int, path: *const c_char, buf: *mut Stat, flags: c_int) -> c_int {
    // SAFETY: the caller's path.
    if flags & libc::AT_EMPTY_PATH != 0 && !path.is_null() && unsafe { *path } == 0 {
        // SAFETY: the caller's arguments.
        return unsafe { stat_fd(dirfd, buf) };
    }
    let follow = flags & libc::AT_SYMLINK_NOFOLLOW == 0;
    // SAFETY: the caller's arguments.
    let mapped = unsafe {
        on_path("stat", dirfd, path, |mapped| {
            let (_, walked) = paths::lookup(mapped, follow)?;
            match walked {
                Walked::Found(attr) => {
                    fill_stat(&attr, mapped.mapping, &mut *buf);
                    Ok(0)
                }
                Walked::Missing { .. } => Err(libc::ENOENT),
                Walked::Outside(target) => {
                    let target = c_string(target)?;
                    match pass!(fstatat64: FstatatFn; libc::AT_FDCWD, target.as_ptr(), buf, flags) {
                        0 => Ok(0),
                        _ => Err(last_errno()),
                    }
                }
            }
        })
    };
    mapped.unwrap_or_else(|| pass!(fstatat64: FstatatFn; dirfd, path, buf, flags))
}

/// fstat and its names, on a descriptor.
unsafe fn stat_fd(fd: c_int, buf: *mut Stat) -> c_int {
    match table::mapped(fd) {
        Some(d) => shim("fstat", || {
            let attr = files::volume_of(&d.file)?.getattr(d.file.ino).map_err(fs)?;
            // SAFETY: the caller's struct stat.
            fill_stat(&attr, d.file.mapping, unsafe { &mut *buf });
            Ok(0)
        }),
        None => pass!(fstat64: FstatFn; fd, buf),
    }
}

#[no_mangle]
pub unsafe extern "C" fn stat(path: *const c_char, buf: *mut Stat) -> c_int {
    // SAFETY: the caller's arguments (struct stat and stat64 are one layout here).
    unsafe { stat_at(libc::AT_FDCWD, path, buf, 0) }
}

#[no_mangle]
pub unsafe extern "C" fn stat64(path: *const c_char, buf: *mut Stat) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { stat_at(libc::AT_FDCWD, path, buf, 0) }
}

#[no_mangle]
pub unsafe extern "C" fn lstat(path: *const c_char, buf: *mut Stat) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { stat_at(libc::AT_FDCWD, path, buf, libc::AT_SYMLINK_NOFOLLOW) }
}

#[no_mangle]
pub unsafe extern "C" fn lstat64(path: *const c_char, buf: *mut Stat) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { stat_at(libc::AT_FDCWD, path, buf, libc::AT_SYMLINK_NOFOLLOW) }
}

#[no_mangle]
pub unsafe extern "C" fn fstatat(dirfd: c_int, path: *const c_char, buf: *mut Stat, flags: c_int) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { stat_at(dirfd, path, buf, flags) }
}

#[no_mangle]
pub unsafe extern "C" fn fstatat64(dirfd: c_int, path: *const c_char, buf: *mut Stat, flags: c_int) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { stat_at(dirfd, path, buf, flags) }
}

#[no_mangle]
pub unsafe extern "C" fn fstat(fd: c_int, buf: *mut Stat) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { stat_fd(fd, buf) }
}

#[no_mangle]
pub unsafe extern "C" fn fstat64(fd: c_int, buf: *mut Stat) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { stat_fd(fd, buf) }
}

// The old names binaries built against glibc before 2.33 import (a JVM among them); glibc
// keeps them as compat symbols only, so they pass on to the new ones.
#[no_mangle]
pub unsafe extern "C" fn __xstat(_ver: c_int, path: *const c_char, buf: *mut Stat) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { stat_at(libc::AT_FDCWD, path, buf, 0) }
}

#[no_mangle]
pub unsafe extern "C" fn __xstat64(_ver: c_int, path: *const c_char, buf: *mut Stat) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { stat_at(libc::AT_FDCWD, path, buf, 0) }
}

#[no_mangle]
pub unsafe extern "C" fn __lxstat(_ver: c_int, path: *const c_char, buf: *mut Stat) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { stat_at(libc::AT_FDCWD, path, buf, libc::AT_SYMLINK_NOFOLLOW) }
}

#[no_mangle]
pub unsafe extern "C" fn __lxstat64(_ver: c_int, path: *const c_char, buf: *mut Stat) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { stat_at(libc::AT_FDCWD, path, buf, libc::AT_SYMLINK_NOFOLLOW) }
}

#[no_mangle]
pub unsafe extern "C" fn __fxstat(_ver: c_int, fd: c_int, buf: *mut Stat) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { stat_fd(fd, buf) }
}

#[no_mangle]
pub unsafe extern "C" fn __fxstat64(_ver: c_int, fd: c_int, buf: *mut Stat) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { stat_fd(fd, buf) }
}

#[no_mangle]
pub unsafe extern "C" fn __fxstatat(_ver: c_int, dirfd: c_int, path: *const c_char, buf: *mut Stat, flags: c_int) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { stat_at(dirfd, path, buf, flags) }
}

#[no_mangle]
pub unsafe extern "C" fn __fxstatat64(_ver: c_int, dirfd: c_int, path: *const c_char, buf: *mut Stat, flags: c_int) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { stat_at(dirfd, path, buf, flags) }
}

#[no_mangle]
pub unsafe extern "C" fn statx(dirfd: c_int, path: *const c_char, flags: c_int, mask: libc::c_uint, buf: *mut libc::statx) -> c_int {
    // SAFETY: the caller's path.
    let empty = !path.is_null() && unsafe { *path } == 0 && flags & libc::AT_EMPTY_PATH != 0;
    if empty {
        if let Some(d) = table::mapped(dirfd) {
            return shim("statx", || {
                let attr = files::volume_of(&d.file)?.getattr(d.file.ino).map_err(fs)?;
                // SAFETY: the caller's struct statx.
                fill_statx(&attr, d.file.mapping, unsafe { &mut *buf });
                Ok(0)
            });
        }
    } else {
        let follow = flags & libc::AT_SYMLINK_NOFOLLOW == 0;
        // SAFETY: the caller's arguments.
        let mapped = unsafe {
            on_path("statx", dirfd, path, |mapped| match paths::lookup(mapped, follow)? {
                (_, Walked::Found(attr)) => {
                    fill_statx(&attr, mapped.mapping, &mut *buf);
                    Ok(0)
                }
                (_, Walked::Missing { .. }) => Err(libc::ENOENT),
                (_, Walked::Outside(target)) => {
                    let target = c_string(target)?;
                    match pass!(statx: unsafe extern "C" fn(c_int, *const c_char, c_int, libc::c_uint, *mut libc::statx) -> c_int; libc::AT_FDCWD, target.as_ptr(), flags, mask, buf)
                    {
                        0 => Ok(0),
                        _ => Err(last_errno()),
                    }
                }
            })
        };
        if let Some(rc) = mapped {
            return rc;
        }
    }
    pass!(statx: unsafe extern "C" fn(c_int, *const c_char, c_int, libc::c_uint, *mut libc::statx) -> c_int; dirfd, path, flags, mask, buf)
}

// ---- access ----

unsafe fn access_at(dirfd: c_int, path: *const c_char, mode: c_int, flags: c_int) -> Option<c_int> {
    let follow = flags & libc::AT_SYMLINK_NOFOLLOW == 0;
    // SAFETY: the caller's path.
    unsafe {
        on_path("access", dirfd, path, |mapped| {
            let (_, attr) = found(mapped, follow)?;
            files::access(&attr, mode).map(|()| 0)
        })
    }
}

#[no_mangle]
pub unsafe extern "C" fn access(path: *const c_char, mode: c_int) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { access_at(libc::AT_FDCWD, path, mode, 0) }.unwrap_or_else(|| pass!(access: unsafe extern "C" fn(*const c_char, c_int) -> c_int; path, mode))
}

#[no_mangle]
pub unsafe extern "C" fn faccessat(dirfd: c_int, path: *const c_char, mode: c_int, flags: c_int) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { access_at(dirfd, path, mode, flags) }
        .unwrap_or_else(|| pass!(faccessat: unsafe extern "C" fn(c_int, *const c_char, c_int, c_int) -> c_int; dirfd, path, mode, flags))
}

#[no_mangle]
pub unsafe extern "C" fn euidaccess(path: *const c_char, mode: c_int) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { access_at(libc::AT_FDCWD, path, mode, 0) }.unwrap_or_else(|| pass!(euidaccess: unsafe extern "C" fn(*const c_char, c_int) -> c_int; path, mode))
}

// ---- namespace changes ----

fn unlink_mapped(mapped: &Mapped, dir: bool) -> Res<c_int> {
    let (volume, parent, name) = paths::parent_of(mapped)?;
    if dir {
        volume.rmdir(parent, name.as_bytes()).map_err(fs)?;
    } else {
        volume.unlink(parent, name.as_bytes()).map_err(fs)?;
    }
    Ok(0)
}

#[no_mangle]
pub unsafe extern "C" fn unlink(path: *const c_char) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { on_path("unlink", libc::AT_FDCWD, path, |m| unlink_mapped(m, false)) }
        .unwrap_or_else(|| pass!(unlink: unsafe extern "C" fn(*const c_char) -> c_int; path))
}

#[no_mangle]
pub unsafe extern "C" fn unlinkat(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    let dir = flags & libc::AT_REMOVEDIR != 0;
    // SAFETY: the caller's arguments.
    unsafe { on_path("unlinkat", dirfd, path, |m| unlink_mapped(m, dir)) }
        .unwrap_or_else(|| pass!(unlinkat: unsafe extern "C" fn(c_int, *const c_char, c_int) -> c_int; dirfd, path, flags))
}

#[no_mangle]
pub unsafe extern "C" fn rmdir(path: *const c_char) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { on_path("rmdir", libc::AT_FDCWD, path, |m| unlink_mapped(m, true)) }
        .unwrap_or_else(|| pass!(rmdir: unsafe extern "C" fn(*const c_char) -> c_int; path))
}

fn mkdir_mapped(mapped: &Mapped, mode: mode_t) -> Res<c_int> {
    if mapped.inner.trim_end_matches('/').is_empty() && !mapped.escaped {
        // The volume's root, which always exists.
        return Err(libc::EEXIST);
    }
    let (volume, parent, name) = paths::parent_of(mapped)?;
    files::make(&volume, parent, &name, Kind::Dir, mode, &[]).map(|_| 0)
}

#[no_mangle]
pub unsafe extern "C" fn mkdir(path: *const c_char, mode: mode_t) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { on_path("mkdir", libc::AT_FDCWD, path, |m| mkdir_mapped(m, mode)) }
        .unwrap_or_else(|| pass!(mkdir: unsafe extern "C" fn(*const c_char, mode_t) -> c_int; path, mode))
}

#[no_mangle]
pub unsafe extern "C" fn mkdirat(dirfd: c_int, path: *const c_char, mode: mode_t) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { on_path("mkdirat", dirfd, path, |m| mkdir_mapped(m, mode)) }
        .unwrap_or_else(|| pass!(mkdirat: unsafe extern "C" fn(c_int, *const c_char, mode_t) -> c_int; dirfd, path, mode))
}

/// rename between two paths, at least one mapped: inside one volume a rename of the file
/// layer; between volumes, or between a volume and elsewhere, EXDEV (mv then copies).
///
/// # Safety
/// Both paths NUL-terminated.
unsafe fn rename_mapped(olddir: c_int, old: *const c_char, newdir: c_int, new: *const c_char, flags: libc::c_uint) -> Option<c_int> {
    // SAFETY: the caller's paths.
    unsafe { two_paths(olddir, old, newdir, new) }.map(|(from, to)| {
        shim("rename", || {
            let (from, to) = (from?, to);
            if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 {
                return Err(libc::EINVAL);
            }
            let (volume, old_parent, old_name) = paths::parent_of(&from)?;
            let (_, new_parent, new_name) = paths::parent_of(&to)?;
            let noreplace = flags & libc::RENAME_NOREPLACE != 0;
            let exchange = flags & libc::RENAME_EXCHANGE != 0;
            volume.rename(old_parent, old_name.as_bytes(), new_parent, new_name.as_bytes(), noreplace, exchange).map_err(fs)?;
            Ok(0)
        })
    })
}

/// Two paths of a call that names both (rename, link): None when neither is mapped (libc's
/// business); else both in one volume, or EXDEV (as between two filesystems).
///
/// # Safety
/// Both paths NULL or NUL-terminated.
unsafe fn two_paths(olddir: c_int, old: *const c_char, newdir: c_int, new: *const c_char) -> Option<(Res<Mapped>, Mapped)> {
    // SAFETY: the caller's paths.
    let (from, to) = unsafe { (paths::classify(olddir, old), paths::classify(newdir, new)) };
    match (from, to) {
        (None, None) => None,
        (Some(from), Some(to)) if from.mapping == to.mapping => Some((Ok(from), to)),
        (from, to) => {
            let any = to.or(from)?;
            Some((Err(libc::EXDEV), any))
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn rename(old: *const c_char, new: *const c_char) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { rename_mapped(libc::AT_FDCWD, old, libc::AT_FDCWD, new, 0) }
        .unwrap_or_else(|| pass!(rename: unsafe extern "C" fn(*const c_char, *const c_char) -> c_int; old, new))
}

#[no_mangle]
pub unsafe extern "C" fn renameat(olddir: c_int, old: *const c_char, newdir: c_int, new: *const c_char) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { rename_mapped(olddir, old, newdir, new, 0) }
        .unwrap_or_else(|| pass!(renameat: unsafe extern "C" fn(c_int, *const c_char, c_int, *const c_char) -> c_int; olddir, old, newdir, new))
}

#[no_mangle]
pub unsafe extern "C" fn renameat2(olddir: c_int, old: *const c_char, newdir: c_int, new: *const c_char, flags: libc::c_uint) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { rename_mapped(olddir, old, newdir, new, flags) }.unwrap_or_else(
        || pass!(renameat2: unsafe extern "C" fn(c_int, *const c_char, c_int, *const c_char, libc::c_uint) -> c_int; olddir, old, newdir, new, flags),
    )
}

unsafe fn link_mapped(olddir: c_int, old: *const c_char, newdir: c_int, new: *const c_char, flags: c_int) -> Option<c_int> {
    // SAFETY: the caller's paths.
    unsafe { two_paths(olddir, old, newdir, new) }.map(|(from, to)| {
        shim("link", || {
            let from = from?;
            let (volume, attr) = found(&from, flags & libc::AT_SYMLINK_FOLLOW != 0)?;
            let (_, parent, name) = paths::parent_of(&to)?;
            volume.link(attr.ino, parent, name.as_bytes()).map_err(fs)?;
            Ok(0)
        })
    })
}

#[no_mangle]
pub unsafe extern "C" fn link(old: *const c_char, new: *const c_char) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { link_mapped(libc::AT_FDCWD, old, libc::AT_FDCWD, new, 0) }
        .unwrap_or_else(|| pass!(link: unsafe extern "C" fn(*const c_char, *const c_char) -> c_int; old, new))
}

#[no_mangle]
pub unsafe extern "C" fn linkat(olddir: c_int, old: *const c_char, newdir: c_int, new: *const c_char, flags: c_int) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { link_mapped(olddir, old, newdir, new, flags) }
        .unwrap_or_else(|| pass!(linkat: unsafe extern "C" fn(c_int, *const c_char, c_int, *const c_char, c_int) -> c_int; olddir, old, newdir, new, flags))
}

unsafe fn symlink_mapped(target: *const c_char, dirfd: c_int, path: *const c_char) -> Option<c_int> {
    // SAFETY: the caller's arguments.
    unsafe {
        on_path("symlink", dirfd, path, |mapped| {
            if target.is_null() {
                return Err(libc::EFAULT);
            }
            let target = CStr::from_ptr(target).to_bytes();
            let (volume, parent, name) = paths::parent_of(mapped)?;
            files::make(&volume, parent, &name, Kind::Symlink, 0o777, target).map(|_| 0)
        })
    }
}

#[no_mangle]
pub unsafe extern "C" fn symlink(target: *const c_char, path: *const c_char) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { symlink_mapped(target, libc::AT_FDCWD, path) }
        .unwrap_or_else(|| pass!(symlink: unsafe extern "C" fn(*const c_char, *const c_char) -> c_int; target, path))
}

#[no_mangle]
pub unsafe extern "C" fn symlinkat(target: *const c_char, dirfd: c_int, path: *const c_char) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { symlink_mapped(target, dirfd, path) }
        .unwrap_or_else(|| pass!(symlinkat: unsafe extern "C" fn(*const c_char, c_int, *const c_char) -> c_int; target, dirfd, path))
}

unsafe fn readlink_mapped(dirfd: c_int, path: *const c_char, buf: *mut c_char, size: size_t) -> Option<ssize_t> {
    // SAFETY: the caller's arguments.
    unsafe {
        on_path("readlink", dirfd, path, |mapped| {
            let (volume, attr) = found(mapped, false)?;
            if attr.kind != Kind::Symlink {
                return Err(libc::EINVAL);
            }
            let target = volume.readlink(attr.ino).map_err(fs)?;
            let n = target.len().min(size);
            if n > 0 {
                std::ptr::copy_nonoverlapping(target.as_ptr(), buf.cast(), n);
            }
            Ok(n as ssize_t)
        })
    }
}

#[no_mangle]
pub unsafe extern "C" fn readlink(path: *const c_char, buf: *mut c_char, size: size_t) -> ssize_t {
    // SAFETY: the caller's arguments.
    unsafe { readlink_mapped(libc::AT_FDCWD, path, buf, size) }
        .unwrap_or_else(|| pass!(readlink: unsafe extern "C" fn(*const c_char, *mut c_char, size_t) -> ssize_t; path, buf, size))
}

#[no_mangle]
pub unsafe extern "C" fn readlinkat(dirfd: c_int, path: *const c_char, buf: *mut c_char, size: size_t) -> ssize_t {
    // SAFETY: the caller's arguments.
    unsafe { readlink_mapped(dirfd, path, buf, size) }
        .unwrap_or_else(|| pass!(readlinkat: unsafe extern "C" fn(c_int, *const c_char, *mut c_char, size_t) -> ssize_t; dirfd, path, buf, size))
}

// ---- attributes ----

fn setattr_mapped(mapped: &Mapped, follow: bool, set: &SetAttr) -> Res<c_int> {
    let (volume, attr) = found(mapped, follow)?;
    volume.setattr(attr.ino, set).map_err(fs)?;
    Ok(0)
}

fn setattr_fd(d: &table::Descriptor, set: &SetAttr) -> Res<c_int> {
    files::volume_of(&d.file)?.setattr(d.file.ino, set).map_err(fs)?;
    Ok(0)
}

fn mode_set(mode: mode_t) -> SetAttr {
    SetAttr { perm: Some(mode & 0o7777), ..Default::default() }
}

/// chown's ids: -1 leaves one as it is.
fn owner_set(uid: uid_t, gid: gid_t) -> SetAttr {
    SetAttr { uid: (uid != u32::MAX).then_some(uid), gid: (gid != u32::MAX).then_some(gid), ..Default::default() }
}

#[no_mangle]
pub unsafe extern "C" fn chmod(path: *const c_char, mode: mode_t) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { on_path("chmod", libc::AT_FDCWD, path, |m| setattr_mapped(m, true, &mode_set(mode))) }
        .unwrap_or_else(|| pass!(chmod: unsafe extern "C" fn(*const c_char, mode_t) -> c_int; path, mode))
}

#[no_mangle]
pub unsafe extern "C" fn fchmodat(dirfd: c_int, path: *const c_char, mode: mode_t, flags: c_int) -> c_int {
    let follow = flags & libc::AT_SYMLINK_NOFOLLOW == 0;
    // SAFETY: the caller's arguments.
    unsafe { on_path("fchmodat", dirfd, path, |m| setattr_mapped(m, follow, &mode_set(mode))) }
        .unwrap_or_else(|| pass!(fchmodat: unsafe extern "C" fn(c_int, *const c_char, mode_t, c_int) -> c_int; dirfd, path, mode, flags))
}

#[no_mangle]
pub unsafe extern "C" fn fchmod(fd: c_int, mode: mode_t) -> c_int {
    match table::mapped(fd) {
        Some(d) => shim("fchmod", || setattr_fd(&d, &mode_set(mode))),
        None => pass!(fchmod: unsafe extern "C" fn(c_int, mode_t) -> c_int; fd, mode),
    }
}

#[no_mangle]
pub unsafe extern "C" fn chown(path: *const c_char, uid: uid_t, gid: gid_t) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { on_path("chown", libc::AT_FDCWD, path, |m| setattr_mapped(m, true, &owner_set(uid, gid))) }
        .unwrap_or_else(|| pass!(chown: unsafe extern "C" fn(*const c_char, uid_t, gid_t) -> c_int; path, uid, gid))
}

#[no_mangle]
pub unsafe extern "C" fn lchown(path: *const c_char, uid: uid_t, gid: gid_t) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { on_path("lchown", libc::AT_FDCWD, path, |m| setattr_mapped(m, false, &owner_set(uid, gid))) }
        .unwrap_or_else(|| pass!(lchown: unsafe extern "C" fn(*const c_char, uid_t, gid_t) -> c_int; path, uid, gid))
}

#[no_mangle]
pub unsafe extern "C" fn fchownat(dirfd: c_int, path: *const c_char, uid: uid_t, gid: gid_t, flags: c_int) -> c_int {
    let follow = flags & libc::AT_SYMLINK_NOFOLLOW == 0;
    // SAFETY: the caller's arguments.
    unsafe { on_path("fchownat", dirfd, path, |m| setattr_mapped(m, follow, &owner_set(uid, gid))) }
        .unwrap_or_else(|| pass!(fchownat: unsafe extern "C" fn(c_int, *const c_char, uid_t, gid_t, c_int) -> c_int; dirfd, path, uid, gid, flags))
}

#[no_mangle]
pub unsafe extern "C" fn fchown(fd: c_int, uid: uid_t, gid: gid_t) -> c_int {
    match table::mapped(fd) {
        Some(d) => shim("fchown", || setattr_fd(&d, &owner_set(uid, gid))),
        None => pass!(fchown: unsafe extern "C" fn(c_int, uid_t, gid_t) -> c_int; fd, uid, gid),
    }
}

#[no_mangle]
pub unsafe extern "C" fn utimensat(dirfd: c_int, path: *const c_char, times: *const libc::timespec, flags: c_int) -> c_int {
    if path.is_null() {
        // futimens's form.
        // SAFETY: the caller's arguments.
        return unsafe { futimens(dirfd, times) };
    }
    let follow = flags & libc::AT_SYMLINK_NOFOLLOW == 0;
    // SAFETY: the caller's arguments.
    unsafe {
        on_path("utimensat", dirfd, path, |m| {
            let (volume, attr) = found(m, follow)?;
            files::set_times(&volume, attr.ino, times).map(|()| 0)
        })
    }
    .unwrap_or_else(|| pass!(utimensat: unsafe extern "C" fn(c_int, *const c_char, *const libc::timespec, c_int) -> c_int; dirfd, path, times, flags))
}

#[no_mangle]
pub unsafe extern "C" fn futimens(fd: c_int, times: *const libc::timespec) -> c_int {
    match table::mapped(fd) {
        // SAFETY: the caller's timespecs.
        Some(d) => shim("futimens", || unsafe { files::set_times(&*files::volume_of(&d.file)?, d.file.ino, times) }.map(|()| 0)),
        None => pass!(futimens: unsafe extern "C" fn(c_int, *const libc::timespec) -> c_int; fd, times),
    }
}

/// utimes, lutimes, utime and futimes: their struct timeval pair (or utimbuf) as utimensat's
/// timespecs.
fn timespecs_of(times: Option<[(i64, i64); 2]>) -> Option<[libc::timespec; 2]> {
    times.map(|pair| pair.map(|(sec, nsec)| libc::timespec { tv_sec: sec, tv_nsec: nsec }))
}

/// # Safety
/// `times` is NULL or points to two timevals.
unsafe fn timevals(times: *const libc::timeval) -> Option<[(i64, i64); 2]> {
    // SAFETY: the caller's pair.
    (!times.is_null()).then(|| unsafe { [((*times).tv_sec, (*times).tv_usec * 1000), ((*times.add(1)).tv_sec, (*times.add(1)).tv_usec * 1000)] })
}

unsafe fn utimes_mapped(path: *const c_char, times: Option<[(i64, i64); 2]>, follow: bool) -> Option<c_int> {
    let specs = timespecs_of(times);
    let ptr = specs.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: the caller's path; `ptr` NULL or two timespecs alive for the call.
    unsafe {
        on_path("utimes", libc::AT_FDCWD, path, |m| {
            let (volume, attr) = found(m, follow)?;
            files::set_times(&volume, attr.ino, ptr).map(|()| 0)
        })
    }
}

#[no_mangle]
pub unsafe extern "C" fn utimes(path: *const c_char, times: *const libc::timeval) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { utimes_mapped(path, timevals(times), true) }
        .unwrap_or_else(|| pass!(utimes: unsafe extern "C" fn(*const c_char, *const libc::timeval) -> c_int; path, times))
}

#[no_mangle]
pub unsafe extern "C" fn lutimes(path: *const c_char, times: *const libc::timeval) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { utimes_mapped(path, timevals(times), false) }
        .unwrap_or_else(|| pass!(lutimes: unsafe extern "C" fn(*const c_char, *const libc::timeval) -> c_int; path, times))
}

#[no_mangle]
pub unsafe extern "C" fn utime(path: *const c_char, times: *const libc::utimbuf) -> c_int {
    // SAFETY: the caller's utimbuf, if any.
    let pair = (!times.is_null()).then(|| unsafe { [((*times).actime, 0), ((*times).modtime, 0)] });
    // SAFETY: the caller's arguments.
    unsafe { utimes_mapped(path, pair, true) }.unwrap_or_else(|| pass!(utime: unsafe extern "C" fn(*const c_char, *const libc::utimbuf) -> c_int; path, times))
}

#[no_mangle]
pub unsafe extern "C" fn futimes(fd: c_int, times: *const libc::timeval) -> c_int {
    match table::mapped(fd) {
        Some(d) => {
            // SAFETY: the caller's timevals.
            let specs = timespecs_of(unsafe { timevals(times) });
            let ptr = specs.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
            // SAFETY: `ptr` NULL or two timespecs alive for the call.
            shim("futimes", || unsafe { files::set_times(&*files::volume_of(&d.file)?, d.file.ino, ptr) }.map(|()| 0))
        }
        None => pass!(futimes: unsafe extern "C" fn(c_int, *const libc::timeval) -> c_int; fd, times),
    }
}

fn truncate_mapped(mapped: &Mapped, length: i64) -> Res<c_int> {
    let (volume, attr) = found(mapped, true)?;
    files::truncate(&volume, &attr, length).map(|()| 0)
}

#[no_mangle]
pub unsafe extern "C" fn truncate(path: *const c_char, length: off_t) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { on_path("truncate", libc::AT_FDCWD, path, |m| truncate_mapped(m, length)) }
        .unwrap_or_else(|| pass!(truncate: unsafe extern "C" fn(*const c_char, off_t) -> c_int; path, length))
}

#[no_mangle]
pub unsafe extern "C" fn truncate64(path: *const c_char, length: off64_t) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { on_path("truncate64", libc::AT_FDCWD, path, |m| truncate_mapped(m, length)) }
        .unwrap_or_else(|| pass!(truncate64: unsafe extern "C" fn(*const c_char, off64_t) -> c_int; path, length))
}

// ---- statfs ----

/// What statfs and statvfs say of a volume: the cluster's space is not a block count of this
/// machine, so the figures are large constants (as network filesystems without quotas
/// report); `f_type` tells a volume's files (`chunkfiles::PRELOAD_FS_TYPE`).
macro_rules! fill_space {
    ($out:expr) => {{
        // SAFETY: all-zero is a valid struct statfs and statvfs.
        *$out = unsafe { std::mem::zeroed() };
        $out.f_bsize = 4096;
        $out.f_frsize = 4096;
        $out.f_blocks = 1 << 32;
        $out.f_bfree = 1 << 31;
        $out.f_bavail = 1 << 31;
        $out.f_files = 1 << 32;
        $out.f_ffree = 1 << 31;
    }};
}

fn fill_statfs(out: &mut libc::statfs64) {
    fill_space!(out);
    out.f_type = chunkfiles::PRELOAD_FS_TYPE;
    out.f_namelen = chunkfiles::NAME_BYTES_MAX as _;
}

fn fill_statvfs(out: &mut libc::statvfs64) {
    fill_space!(out);
    out.f_favail = 1 << 31;
    out.f_namemax = chunkfiles::NAME_BYTES_MAX as _;
}

macro_rules! statfs_hooks {
    ($($path_fn:ident, $fd_fn:ident, $ty:ty, $fill:ident;)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $path_fn(path: *const c_char, buf: *mut $ty) -> c_int {
            // SAFETY: the caller's arguments.
            unsafe {
                on_path(stringify!($path_fn), libc::AT_FDCWD, path, |m| {
                    found(m, true)?;
                    $fill(&mut *buf.cast());
                    Ok(0)
                })
            }
            .unwrap_or_else(|| pass!($path_fn: unsafe extern "C" fn(*const c_char, *mut $ty) -> c_int; path, buf))
        }

        #[no_mangle]
        pub unsafe extern "C" fn $fd_fn(fd: c_int, buf: *mut $ty) -> c_int {
            match table::mapped(fd) {
                Some(_) => {
                    // SAFETY: the caller's struct.
                    $fill(unsafe { &mut *buf.cast() });
                    0
                }
                None => pass!($fd_fn: unsafe extern "C" fn(c_int, *mut $ty) -> c_int; fd, buf),
            }
        }
    )*};
}
statfs_hooks! {
    statfs, fstatfs, libc::statfs64, fill_statfs;
    statfs64, fstatfs64, libc::statfs64, fill_statfs;
    statvfs, fstatvfs, libc::statvfs64, fill_statvfs;
    statvfs64, fstatvfs64, libc::statvfs64, fill_statvfs;
}

// ---- extended attributes: a volume has none (ENOTSUP, as on a filesystem without them) ----

macro_rules! xattr_path_hooks {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(path: *const c_char, $($arg: $ty),*) -> $ret {
            // SAFETY: the caller's path.
            unsafe { on_path(stringify!($name), libc::AT_FDCWD, path, |_| Err::<$ret, _>(libc::ENOTSUP)) }
                .unwrap_or_else(|| pass!($name: unsafe extern "C" fn(*const c_char, $($ty),*) -> $ret; path, $($arg),*))
        }
    )*};
}
xattr_path_hooks! {
    getxattr(name: *const c_char, value: *mut c_void, size: size_t) -> ssize_t;
    lgetxattr(name: *const c_char, value: *mut c_void, size: size_t) -> ssize_t;
    listxattr(list: *mut c_char, size: size_t) -> ssize_t;
    llistxattr(list: *mut c_char, size: size_t) -> ssize_t;
    setxattr(name: *const c_char, value: *const c_void, size: size_t, flags: c_int) -> c_int;
    lsetxattr(name: *const c_char, value: *const c_void, size: size_t, flags: c_int) -> c_int;
    removexattr(name: *const c_char) -> c_int;
    lremovexattr(name: *const c_char) -> c_int;
}

macro_rules! xattr_fd_hooks {
    ($($name:ident($($arg:ident: $ty:ty),*) -> $ret:ty;)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $name(fd: c_int, $($arg: $ty),*) -> $ret {
            match table::mapped(fd) {
                Some(_) => {
                    crate::set_errno(libc::ENOTSUP);
                    -1
                }
                None => pass!($name: unsafe extern "C" fn(c_int, $($ty),*) -> $ret; fd, $($arg),*),
            }
        }
    )*};
}
xattr_fd_hooks! {
    fgetxattr(name: *const c_char, value: *mut c_void, size: size_t) -> ssize_t;
    flistxattr(list: *mut c_char, size: size_t) -> ssize_t;
    fsetxattr(name: *const c_char, value: *const c_void, size: size_t, flags: c_int) -> c_int;
    fremovexattr(name: *const c_char) -> c_int;
}

// ---- the working directory ----

fn chdir_mapped(mapped: &Mapped) -> Res<c_int> {
    if mapped.escaped {
        // Out of the volume again: the kernel's working directory takes over.
        let target = c_string(mapped.full.clone())?;
        if pass!(chdir: unsafe extern "C" fn(*const c_char) -> c_int; target.as_ptr()) != 0 {
            return Err(last_errno());
        }
        paths::set_virtual_cwd(None);
        return Ok(0);
    }
    let (_, attr) = found(mapped, true)?;
    if attr.kind != Kind::Dir {
        return Err(libc::ENOTDIR);
    }
    paths::set_virtual_cwd(Some(mapped.full.clone()));
    Ok(0)
}

#[no_mangle]
pub unsafe extern "C" fn chdir(path: *const c_char) -> c_int {
    // SAFETY: the caller's path.
    match unsafe { on_path("chdir", libc::AT_FDCWD, path, chdir_mapped) } {
        Some(rc) => rc,
        None => {
            let rc = pass!(chdir: unsafe extern "C" fn(*const c_char) -> c_int; path);
            if rc == 0 {
                paths::set_virtual_cwd(None);
            }
            rc
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn fchdir(fd: c_int) -> c_int {
    match table::mapped(fd) {
        Some(d) => {
            if d.file.kind != Kind::Dir {
                crate::set_errno(libc::ENOTDIR);
                return -1;
            }
            paths::set_virtual_cwd(Some(d.file.path.clone()));
            0
        }
        None => {
            let rc = pass!(fchdir: unsafe extern "C" fn(c_int) -> c_int; fd);
            if rc == 0 {
                paths::set_virtual_cwd(None);
            }
            rc
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn getcwd(buf: *mut c_char, size: size_t) -> *mut c_char {
    let Some(cwd) = paths::virtual_cwd().filter(|_| crate::engaged()) else {
        return pass!(getcwd: unsafe extern "C" fn(*mut c_char, size_t) -> *mut c_char; buf, size);
    };
    let bytes = cwd.as_bytes();
    if buf.is_null() {
        // glibc's extension: a buffer of its own (at least `size` bytes when size is given).
        let length = (bytes.len() + 1).max(size);
        // SAFETY: a fresh buffer, filled below.
        let out = unsafe { libc::malloc(length) }.cast::<c_char>();
        if out.is_null() {
            crate::set_errno(libc::ENOMEM);
            return out;
        }
        // SAFETY: `length` > bytes.len().
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.cast(), bytes.len());
            *out.add(bytes.len()) = 0;
        }
        return out;
    }
    if size <= bytes.len() {
        crate::set_errno(libc::ERANGE);
        return std::ptr::null_mut();
    }
    // SAFETY: the caller's buffer of `size` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.cast(), bytes.len());
        *buf.add(bytes.len()) = 0;
    }
    buf
}

// ---- realpath ----

/// realpath of a mapped path: absolute, with every symlink resolved (glibc's own realpath
/// walks with internal calls the shim cannot see).
#[no_mangle]
pub unsafe extern "C" fn realpath(path: *const c_char, resolved: *mut c_char) -> *mut c_char {
    // SAFETY: the caller's path.
    let mapped = unsafe {
        on_path("realpath", libc::AT_FDCWD, path, |mapped| {
            let full = match resolve(mapped.clone(), 0)? {
                Resolved::Inside(full) => full,
                Resolved::Outside(target) => {
                    let target = c_string(target)?;
                    let out = pass!(realpath: unsafe extern "C" fn(*const c_char, *mut c_char) -> *mut c_char; target.as_ptr(), resolved);
                    return if out.is_null() { Err(last_errno()) } else { Ok(out) };
                }
            };
            let bytes = full.as_bytes();
            if bytes.len() >= libc::PATH_MAX as usize {
                return Err(libc::ENAMETOOLONG);
            }
            let out = if resolved.is_null() { libc::malloc(bytes.len() + 1).cast::<c_char>() } else { resolved };
            if out.is_null() {
                return Err(libc::ENOMEM);
            }
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.cast(), bytes.len());
            *out.add(bytes.len()) = 0;
            Ok(out)
        })
    };
    mapped.unwrap_or_else(|| pass!(realpath: unsafe extern "C" fn(*const c_char, *mut c_char) -> *mut c_char; path, resolved))
}

enum Resolved {
    Inside(String),
    Outside(String),
}

/// The canonical path of a mapped path: its directory's path read back up the tree, then its
/// last name, or, for a symlink, its target's canonical path.
fn resolve(mapped: Mapped, depth: usize) -> Res<Resolved> {
    if depth > 40 {
        return Err(libc::ELOOP);
    }
    let (volume, attr) = found(&mapped, false)?;
    let prefix = &crate::state::config().maps[mapped.mapping].0;
    if attr.kind == Kind::Dir {
        return dir_path(&volume, prefix, attr.ino).map(Resolved::Inside);
    }
    let inner = mapped.inner.trim_end_matches('/');
    let (parent, name) = inner.rsplit_once('/').ok_or(libc::EINVAL)?;
    let parent_full = format!("{}{}", prefix, parent);
    let parent = Mapped { mapping: mapped.mapping, full: parent_full, inner: if parent.is_empty() { "/".into() } else { parent.into() }, escaped: false };
    let (_, parent_attr) = found(&parent, true)?;
    let parent_path = dir_path(&volume, prefix, parent_attr.ino)?;
    if attr.kind != Kind::Symlink {
        return Ok(Resolved::Inside(format!("{parent_path}/{name}")));
    }
    let target = String::from_utf8(volume.readlink(attr.ino).map_err(fs)?).map_err(|_| libc::EINVAL)?;
    let next = if target.starts_with('/') { paths::normalize(&target) } else { paths::normalize(&format!("{parent_path}/{target}")) };
    match paths::map_absolute(next.clone()) {
        Some(next) => resolve(next, depth + 1),
        None => Ok(Resolved::Outside(next)),
    }
}

/// The absolute path of directory `dir`, read up through its parents.
fn dir_path(volume: &chunkfiles::Volume, prefix: &str, mut dir: u64) -> Res<String> {
    let mut names = Vec::new();
    while dir != chunkfiles::ROOT_INO {
        let (parent, _) = volume.readdir(dir).map_err(fs)?;
        let (_, siblings) = volume.readdir(parent).map_err(fs)?;
        let (name, _) = siblings.into_iter().find(|(_, e)| e.ino == dir).ok_or(libc::ENOENT)?;
        names.push(String::from_utf8(name).map_err(|_| libc::EINVAL)?);
        dir = parent;
        if names.len() > 4096 {
            return Err(libc::ELOOP);
        }
    }
    names.reverse();
    Ok(names.iter().fold(prefix.to_owned(), |path, name| format!("{path}/{name}")))
}
