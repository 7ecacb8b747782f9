//! The hooks that make or use descriptors: open and its family, close, reads and writes,
//! seeks, syncs, sizes, fcntl and locks, dup, mmap. Each is written by hand with libc's C
//! signature (variadic ones take their optional argument as a fixed one: on x86_64 and
//! aarch64 Linux an integer variadic argument travels where a fixed one would).

use libc::{c_char, c_int, c_uint, c_ulong, c_void, iovec, mode_t, off64_t, off_t, size_t, ssize_t};

use crate::files::{self, Opened};
use crate::real::pass;
use crate::table::{self, Descriptor};
use crate::{paths, shim, shim_errno, Res};

/// Most bytes one readv/writev gathers (a longer one is a short read or write, which POSIX
/// allows): bounds the shim's buffer.
const VECTOR_BYTES_MAX: usize = 64 << 20;

/// The caller's buffer as a slice (empty for a zero length, whatever the pointer).
///
/// # Safety
/// `ptr` is valid for `len` bytes when `len` is not zero.
unsafe fn bytes<'a>(ptr: *const c_void, len: usize) -> &'a [u8] {
    if len == 0 || ptr.is_null() {
        &[]
    } else {
        // SAFETY: the caller's buffer.
        unsafe { std::slice::from_raw_parts(ptr.cast(), len) }
    }
}

/// # Safety
/// As `bytes`, writable.
unsafe fn bytes_mut<'a>(ptr: *mut c_void, len: usize) -> &'a mut [u8] {
    if len == 0 || ptr.is_null() {
        &mut []
    } else {
        // SAFETY: the caller's buffer.
        unsafe { std::slice::from_raw_parts_mut(ptr.cast(), len) }
    }
}

// ---- open ----

/// open/openat on a mapped path; `None` when the path is not mapped (the hook passes it on).
unsafe fn open_mapped(dirfd: c_int, path: *const c_char, flags: c_int, mode: mode_t) -> Option<c_int> {
    // SAFETY: the caller's path.
    let mapped = unsafe { paths::classify(dirfd, path) }?;
    let rc = shim("open", || match files::open(&mapped, flags, mode)? {
        Opened::Fd(fd) => Ok(fd),
        Opened::Outside(target) => {
            let target = std::ffi::CString::new(target).map_err(|_| libc::EINVAL)?;
            // SAFETY: a NUL-terminated path.
            let fd = unsafe { crate::real::open(target.as_ptr(), flags, mode) };
            if fd < 0 {
                Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
            } else {
                Ok(fd)
            }
        }
    });
    Some(rc)
}

type OpenFn = unsafe extern "C" fn(*const c_char, c_int, mode_t) -> c_int;
type OpenatFn = unsafe extern "C" fn(c_int, *const c_char, c_int, mode_t) -> c_int;

#[no_mangle]
pub unsafe extern "C" fn open(path: *const c_char, flags: c_int, mode: mode_t) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { open_mapped(libc::AT_FDCWD, path, flags, mode) }.unwrap_or_else(|| pass!(open: OpenFn; path, flags, mode))
}

#[no_mangle]
pub unsafe extern "C" fn open64(path: *const c_char, flags: c_int, mode: mode_t) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { open_mapped(libc::AT_FDCWD, path, flags, mode) }.unwrap_or_else(|| pass!(open64: OpenFn; path, flags, mode))
}

#[no_mangle]
pub unsafe extern "C" fn __open_2(path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { open_mapped(libc::AT_FDCWD, path, flags, 0) }.unwrap_or_else(|| pass!(__open_2: unsafe extern "C" fn(*const c_char, c_int) -> c_int; path, flags))
}

#[no_mangle]
pub unsafe extern "C" fn __open64_2(path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { open_mapped(libc::AT_FDCWD, path, flags, 0) }
        .unwrap_or_else(|| pass!(__open64_2: unsafe extern "C" fn(*const c_char, c_int) -> c_int; path, flags))
}

#[no_mangle]
pub unsafe extern "C" fn openat(dirfd: c_int, path: *const c_char, flags: c_int, mode: mode_t) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { open_mapped(dirfd, path, flags, mode) }.unwrap_or_else(|| pass!(openat: OpenatFn; dirfd, path, flags, mode))
}

#[no_mangle]
pub unsafe extern "C" fn openat64(dirfd: c_int, path: *const c_char, flags: c_int, mode: mode_t) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { open_mapped(dirfd, path, flags, mode) }.unwrap_or_else(|| pass!(openat64: OpenatFn; dirfd, path, flags, mode))
}

#[no_mangle]
pub unsafe extern "C" fn __openat_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { open_mapped(dirfd, path, flags, 0) }
        .unwrap_or_else(|| pass!(__openat_2: unsafe extern "C" fn(c_int, *const c_char, c_int) -> c_int; dirfd, path, flags))
}

#[no_mangle]
pub unsafe extern "C" fn __openat64_2(dirfd: c_int, path: *const c_char, flags: c_int) -> c_int {
    // SAFETY: the caller's arguments.
    unsafe { open_mapped(dirfd, path, flags, 0) }
        .unwrap_or_else(|| pass!(__openat64_2: unsafe extern "C" fn(c_int, *const c_char, c_int) -> c_int; dirfd, path, flags))
}

#[no_mangle]
pub unsafe extern "C" fn creat(path: *const c_char, mode: mode_t) -> c_int {
    let flags = libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC;
    // SAFETY: the caller's arguments.
    unsafe { open_mapped(libc::AT_FDCWD, path, flags, mode) }.unwrap_or_else(|| pass!(creat: unsafe extern "C" fn(*const c_char, mode_t) -> c_int; path, mode))
}

#[no_mangle]
pub unsafe extern "C" fn creat64(path: *const c_char, mode: mode_t) -> c_int {
    let flags = libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC;
    // SAFETY: the caller's arguments.
    unsafe { open_mapped(libc::AT_FDCWD, path, flags, mode) }
        .unwrap_or_else(|| pass!(creat64: unsafe extern "C" fn(*const c_char, mode_t) -> c_int; path, mode))
}

// ---- close ----

/// Forgets a mapped descriptor that is being closed, committing what its writes hold and
/// giving back its locks (not in a vfork child: the table is its parent's); -1 with errno if
/// the commit failed.
pub(crate) fn forget(fd: c_int) -> c_int {
    if !table::owned_here() {
        return 0;
    }
    match table::remove(fd) {
        Some(descriptor) => shim("close", || files::closed(&descriptor.file).map(|()| 0)),
        None => 0,
    }
}

/// Closes a mapped descriptor from the shim's own code (a directory stream's, a cookie
/// stream's); the commit's error, if any.
pub(crate) fn forget_and_close(fd: c_int) -> crate::Res<()> {
    let committed = match table::remove(fd) {
        Some(descriptor) => files::closed(&descriptor.file),
        None => Ok(()),
    };
    // SAFETY: the placeholder.
    unsafe { crate::real::close(fd) };
    committed
}

#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if table::mapped(fd).is_none() {
        // SAFETY: the caller's descriptor.
        return unsafe { crate::real::close(fd) };
    }
    let committed = forget(fd);
    // The descriptor is closed either way (as Linux's close after an NFS write-back error).
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
    // SAFETY: the placeholder.
    let rc = unsafe { crate::real::close(fd) };
    if committed < 0 {
        crate::set_errno(errno);
        return -1;
    }
    rc
}

#[no_mangle]
pub unsafe extern "C" fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    if table::any_mapped() {
        for fd in table::in_range(first, last) {
            // With CLOSE_RANGE_CLOEXEC the kernel marks the placeholders themselves.
            if flags & libc::CLOSE_RANGE_CLOEXEC as c_int == 0 {
                let _ = forget(fd);
            }
        }
    }
    pass!(close_range: unsafe extern "C" fn(c_uint, c_uint, c_int) -> c_int; first, last, flags)
}

#[no_mangle]
pub unsafe extern "C" fn closefrom(first: c_int) {
    if table::any_mapped() && first >= 0 {
        for fd in table::in_range(first as u32, u32::MAX) {
            let _ = forget(fd);
        }
    }
    if let Some(real) = crate::real::real!(closefrom: unsafe extern "C" fn(c_int)) {
        // SAFETY: the caller's argument.
        unsafe { real(first) }
    }
}

// ---- read and write ----

#[no_mangle]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, count: size_t) -> ssize_t {
    match table::mapped(fd) {
        // SAFETY: the caller's buffer of `count` bytes.
        Some(d) => shim("read", || files::read(&d.file, unsafe { bytes_mut(buf, count) }).map(|n| n as ssize_t)),
        None => pass!(read: unsafe extern "C" fn(c_int, *mut c_void, size_t) -> ssize_t; fd, buf, count),
    }
}

#[no_mangle]
pub unsafe extern "C" fn __read_chk(fd: c_int, buf: *mut c_void, count: size_t, buflen: size_t) -> ssize_t {
    if count > buflen {
        let _: c_int = pass!(__chk_fail: unsafe extern "C" fn() -> c_int;);
    }
    // SAFETY: the caller's arguments.
    unsafe { read(fd, buf, count) }
}

#[no_mangle]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, count: size_t) -> ssize_t {
    match table::mapped(fd) {
        // SAFETY: the caller's buffer of `count` bytes.
        Some(d) => shim("write", || files::write(&d.file, unsafe { bytes(buf, count) }).map(|n| n as ssize_t)),
        None => pass!(write: unsafe extern "C" fn(c_int, *const c_void, size_t) -> ssize_t; fd, buf, count),
    }
}

fn offset_ok(offset: i64) -> Res<u64> {
    u64::try_from(offset).map_err(|_| libc::EINVAL)
}

unsafe fn pread_mapped(d: &Descriptor, buf: *mut c_void, count: size_t, offset: off64_t) -> ssize_t {
    // SAFETY: the caller's buffer of `count` bytes.
    shim("pread", || files::read_at(&d.file, offset_ok(offset)?, unsafe { bytes_mut(buf, count) }).map(|n| n as ssize_t))
}

unsafe fn pwrite_mapped(d: &Descriptor, buf: *const c_void, count: size_t, offset: off64_t) -> ssize_t {
    // SAFETY: the caller's buffer of `count` bytes. (Linux appends a pwrite to an O_APPEND
    // descriptor at the end; so does the shim.)
    shim("pwrite", || {
        let at = if d.file.flags() & libc::O_APPEND != 0 { None } else { Some(offset_ok(offset)?) };
        files::write_at(&d.file, at, unsafe { bytes(buf, count) }).map(|(_, n)| n as ssize_t)
    })
}

type PreadFn = unsafe extern "C" fn(c_int, *mut c_void, size_t, off64_t) -> ssize_t;
type PwriteFn = unsafe extern "C" fn(c_int, *const c_void, size_t, off64_t) -> ssize_t;

#[no_mangle]
pub unsafe extern "C" fn pread(fd: c_int, buf: *mut c_void, count: size_t, offset: off_t) -> ssize_t {
    match table::mapped(fd) {
        // SAFETY: the caller's arguments.
        Some(d) => unsafe { pread_mapped(&d, buf, count, offset) },
        None => pass!(pread: PreadFn; fd, buf, count, offset),
    }
}

#[no_mangle]
pub unsafe extern "C" fn pread64(fd: c_int, buf: *mut c_void, count: size_t, offset: off64_t) -> ssize_t {
    match table::mapped(fd) {
        // SAFETY: the caller's arguments.
        Some(d) => unsafe { pread_mapped(&d, buf, count, offset) },
        None => pass!(pread64: PreadFn; fd, buf, count, offset),
    }
}

#[no_mangle]
pub unsafe extern "C" fn __pread_chk(fd: c_int, buf: *mut c_void, count: size_t, offset: off_t, buflen: size_t) -> ssize_t {
    if count > buflen {
        let _: c_int = pass!(__chk_fail: unsafe extern "C" fn() -> c_int;);
    }
    // SAFETY: the caller's arguments.
    unsafe { pread(fd, buf, count, offset) }
}

#[no_mangle]
pub unsafe extern "C" fn __pread64_chk(fd: c_int, buf: *mut c_void, count: size_t, offset: off64_t, buflen: size_t) -> ssize_t {
    if count > buflen {
        let _: c_int = pass!(__chk_fail: unsafe extern "C" fn() -> c_int;);
    }
    // SAFETY: the caller's arguments.
    unsafe { pread64(fd, buf, count, offset) }
}

#[no_mangle]
pub unsafe extern "C" fn pwrite(fd: c_int, buf: *const c_void, count: size_t, offset: off_t) -> ssize_t {
    match table::mapped(fd) {
        // SAFETY: the caller's arguments.
        Some(d) => unsafe { pwrite_mapped(&d, buf, count, offset) },
        None => pass!(pwrite: PwriteFn; fd, buf, count, offset),
    }
}

#[no_mangle]
pub unsafe extern "C" fn pwrite64(fd: c_int, buf: *const c_void, count: size_t, offset: off64_t) -> ssize_t {
    match table::mapped(fd) {
        // SAFETY: the caller's arguments.
        Some(d) => unsafe { pwrite_mapped(&d, buf, count, offset) },
        None => pass!(pwrite64: PwriteFn; fd, buf, count, offset),
    }
}

/// The caller's iovecs.
///
/// # Safety
/// `iov` points to `count` iovecs (when count > 0).
unsafe fn vectors<'a>(iov: *const iovec, count: c_int) -> Res<&'a [iovec]> {
    if !(0..=libc::UIO_MAXIOV).contains(&count) {
        return Err(libc::EINVAL);
    }
    if count == 0 || iov.is_null() {
        return Ok(&[]);
    }
    // SAFETY: the caller's array.
    Ok(unsafe { std::slice::from_raw_parts(iov, count as usize) })
}

/// Gathers the caller's buffers (up to `VECTOR_BYTES_MAX`) into one, so a writev is one write.
fn gather(vectors: &[iovec]) -> Vec<u8> {
    let total: usize = vectors.iter().map(|v| v.iov_len).fold(0usize, usize::saturating_add).min(VECTOR_BYTES_MAX);
    let mut out = Vec::with_capacity(total);
    for v in vectors {
        let room = total - out.len();
        // SAFETY: the caller's buffer of iov_len bytes.
        out.extend_from_slice(&unsafe { bytes(v.iov_base, v.iov_len) }[..v.iov_len.min(room)]);
    }
    out
}

/// Spreads `data` over the caller's buffers.
fn scatter(vectors: &[iovec], data: &[u8]) {
    let mut at = 0;
    for v in vectors {
        let n = v.iov_len.min(data.len() - at);
        // SAFETY: the caller's buffer of iov_len bytes.
        let out = unsafe { bytes_mut(v.iov_base, v.iov_len) };
        out[..n].copy_from_slice(&data[at..at + n]);
        at += n;
    }
}

fn vector_len(vectors: &[iovec]) -> usize {
    vectors.iter().map(|v| v.iov_len).fold(0usize, usize::saturating_add).min(VECTOR_BYTES_MAX)
}

/// readv/preadv/preadv2 on a mapped descriptor (offset None or -1: the descriptor's).
unsafe fn readv_mapped(d: &Descriptor, iov: *const iovec, count: c_int, offset: Option<i64>) -> ssize_t {
    shim("readv", || {
        // SAFETY: the caller's iovecs.
        let vectors = unsafe { vectors(iov, count) }?;
        let mut data = vec![0u8; vector_len(vectors)];
        let n = match offset {
            Some(offset) if offset != -1 => files::read_at(&d.file, offset_ok(offset)?, &mut data)?,
            _ => files::read(&d.file, &mut data)?,
        };
        scatter(vectors, &data[..n]);
        Ok(n as ssize_t)
    })
}

unsafe fn writev_mapped(d: &Descriptor, iov: *const iovec, count: c_int, offset: Option<i64>, append: bool) -> ssize_t {
    shim("writev", || {
        // SAFETY: the caller's iovecs.
        let data = gather(unsafe { vectors(iov, count) }?);
        let n = match offset {
            Some(offset) if offset != -1 => {
                let at = if append || d.file.flags() & libc::O_APPEND != 0 { None } else { Some(offset_ok(offset)?) };
                files::write_at(&d.file, at, &data)?.1
            }
            _ => files::write(&d.file, &data)?,
        };
        Ok(n as ssize_t)
    })
}

type VecFn = unsafe extern "C" fn(c_int, *const iovec, c_int) -> ssize_t;
type VecAtFn = unsafe extern "C" fn(c_int, *const iovec, c_int, off64_t) -> ssize_t;
type Vec2Fn = unsafe extern "C" fn(c_int, *const iovec, c_int, off64_t, c_int) -> ssize_t;

#[no_mangle]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const iovec, count: c_int) -> ssize_t {
    match table::mapped(fd) {
        // SAFETY: the caller's arguments.
        Some(d) => unsafe { readv_mapped(&d, iov, count, None) },
        None => pass!(readv: VecFn; fd, iov, count),
    }
}

#[no_mangle]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const iovec, count: c_int) -> ssize_t {
    match table::mapped(fd) {
        // SAFETY: the caller's arguments.
        Some(d) => unsafe { writev_mapped(&d, iov, count, None, false) },
        None => pass!(writev: VecFn; fd, iov, count),
    }
}

macro_rules! vector_at_hooks {
    ($($read:ident, $write:ident;)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $read(fd: c_int, iov: *const iovec, count: c_int, offset: off64_t) -> ssize_t {
            match table::mapped(fd) {
                // SAFETY: the caller's arguments.
                Some(d) => unsafe { readv_mapped(&d, iov, count, Some(offset.max(0))) },
                None => pass!($read: VecAtFn; fd, iov, count, offset),
            }
        }

        #[no_mangle]
        pub unsafe extern "C" fn $write(fd: c_int, iov: *const iovec, count: c_int, offset: off64_t) -> ssize_t {
            match table::mapped(fd) {
                // SAFETY: the caller's arguments.
                Some(d) => unsafe { writev_mapped(&d, iov, count, Some(offset.max(0)), false) },
                None => pass!($write: VecAtFn; fd, iov, count, offset),
            }
        }
    )*};
}
vector_at_hooks! { preadv, pwritev; preadv64, pwritev64; }

macro_rules! vector2_hooks {
    ($($read:ident, $write:ident;)*) => {$(
        #[no_mangle]
        pub unsafe extern "C" fn $read(fd: c_int, iov: *const iovec, count: c_int, offset: off64_t, flags: c_int) -> ssize_t {
            match table::mapped(fd) {
                // SAFETY: the caller's arguments.
                Some(d) => unsafe { readv_mapped(&d, iov, count, Some(offset)) },
                None => pass!($read: Vec2Fn; fd, iov, count, offset, flags),
            }
        }

        #[no_mangle]
        pub unsafe extern "C" fn $write(fd: c_int, iov: *const iovec, count: c_int, offset: off64_t, flags: c_int) -> ssize_t {
            match table::mapped(fd) {
                Some(d) => {
                    // Every write commits before it returns: RWF_DSYNC and RWF_SYNC hold already.
                    let append = flags & libc::RWF_APPEND != 0;
                    // SAFETY: the caller's arguments.
                    unsafe { writev_mapped(&d, iov, count, Some(offset), append) }
                }
                None => pass!($write: Vec2Fn; fd, iov, count, offset, flags),
            }
        }
    )*};
}
vector2_hooks! { preadv2, pwritev2; preadv64v2, pwritev64v2; }

// ---- seek, sync, size ----

#[no_mangle]
pub unsafe extern "C" fn lseek(fd: c_int, offset: off_t, whence: c_int) -> off_t {
    match table::mapped(fd) {
        Some(d) => shim("lseek", || files::seek(&d.file, offset, whence)),
        None => pass!(lseek: unsafe extern "C" fn(c_int, off_t, c_int) -> off_t; fd, offset, whence),
    }
}

#[no_mangle]
pub unsafe extern "C" fn lseek64(fd: c_int, offset: off64_t, whence: c_int) -> off64_t {
    match table::mapped(fd) {
        Some(d) => shim("lseek64", || files::seek(&d.file, offset, whence)),
        None => pass!(lseek64: unsafe extern "C" fn(c_int, off64_t, c_int) -> off64_t; fd, offset, whence),
    }
}

#[no_mangle]
pub unsafe extern "C" fn fsync(fd: c_int) -> c_int {
    match table::mapped(fd) {
        Some(d) => shim("fsync", || files::sync(&d.file).map(|()| 0)),
        None => pass!(fsync: unsafe extern "C" fn(c_int) -> c_int; fd),
    }
}

#[no_mangle]
pub unsafe extern "C" fn fdatasync(fd: c_int) -> c_int {
    match table::mapped(fd) {
        Some(d) => shim("fdatasync", || files::sync(&d.file).map(|()| 0)),
        None => pass!(fdatasync: unsafe extern "C" fn(c_int) -> c_int; fd),
    }
}

#[no_mangle]
pub unsafe extern "C" fn sync_file_range(fd: c_int, offset: off64_t, nbytes: off64_t, flags: c_uint) -> c_int {
    match table::mapped(fd) {
        Some(d) => shim("sync_file_range", || files::sync(&d.file).map(|()| 0)),
        None => pass!(sync_file_range: unsafe extern "C" fn(c_int, off64_t, off64_t, c_uint) -> c_int; fd, offset, nbytes, flags),
    }
}

#[no_mangle]
pub unsafe extern "C" fn syncfs(fd: c_int) -> c_int {
    match table::mapped(fd) {
        Some(d) => shim("syncfs", || {
            files::volume_of(&d.file)?.flush_all().map_err(files::errno)?;
            Ok(0)
        }),
        None => pass!(syncfs: unsafe extern "C" fn(c_int) -> c_int; fd),
    }
}

#[no_mangle]
pub unsafe extern "C" fn ftruncate(fd: c_int, length: off_t) -> c_int {
    match table::mapped(fd) {
        Some(d) => shim("ftruncate", || files::ftruncate(&d.file, length).map(|()| 0)),
        None => pass!(ftruncate: unsafe extern "C" fn(c_int, off_t) -> c_int; fd, length),
    }
}

#[no_mangle]
pub unsafe extern "C" fn ftruncate64(fd: c_int, length: off64_t) -> c_int {
    match table::mapped(fd) {
        Some(d) => shim("ftruncate64", || files::ftruncate(&d.file, length).map(|()| 0)),
        None => pass!(ftruncate64: unsafe extern "C" fn(c_int, off64_t) -> c_int; fd, length),
    }
}

#[no_mangle]
pub unsafe extern "C" fn fallocate(fd: c_int, mode: c_int, offset: off_t, len: off_t) -> c_int {
    match table::mapped(fd) {
        Some(d) => shim("fallocate", || files::allocate(&d.file, mode, offset, len).map(|()| 0)),
        None => pass!(fallocate: unsafe extern "C" fn(c_int, c_int, off_t, off_t) -> c_int; fd, mode, offset, len),
    }
}

#[no_mangle]
pub unsafe extern "C" fn fallocate64(fd: c_int, mode: c_int, offset: off64_t, len: off64_t) -> c_int {
    match table::mapped(fd) {
        Some(d) => shim("fallocate64", || files::allocate(&d.file, mode, offset, len).map(|()| 0)),
        None => pass!(fallocate64: unsafe extern "C" fn(c_int, c_int, off64_t, off64_t) -> c_int; fd, mode, offset, len),
    }
}

#[no_mangle]
pub unsafe extern "C" fn posix_fallocate(fd: c_int, offset: off_t, len: off_t) -> c_int {
    match table::mapped(fd) {
        Some(d) => shim_errno("posix_fallocate", || files::allocate(&d.file, 0, offset, len)),
        None => pass!(posix_fallocate: unsafe extern "C" fn(c_int, off_t, off_t) -> c_int; fd, offset, len),
    }
}

#[no_mangle]
pub unsafe extern "C" fn posix_fallocate64(fd: c_int, offset: off64_t, len: off64_t) -> c_int {
    match table::mapped(fd) {
        Some(d) => shim_errno("posix_fallocate64", || files::allocate(&d.file, 0, offset, len)),
        None => pass!(posix_fallocate64: unsafe extern "C" fn(c_int, off64_t, off64_t) -> c_int; fd, offset, len),
    }
}

// ---- fcntl, locks, dup ----

/// A new descriptor naming the same open file as `d` (dup, F_DUPFD, F_DUPFD_CLOEXEC): the
/// kernel's duplicate of the placeholder gives the number and the close-on-exec flag.
fn duplicate(fd: c_int, d: &Descriptor, cmd: c_int, min: c_int) -> Res<c_int> {
    // SAFETY: duplicating the placeholder.
    let new = unsafe { crate::real::fcntl(fd, cmd, min as c_ulong) };
    if new < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EMFILE));
    }
    table::insert(new, Descriptor { file: d.file.clone() });
    Ok(new)
}

fn lock_kind(l_type: i16) -> Res<chunkfiles::LockKind> {
    match l_type as c_int {
        libc::F_RDLCK => Ok(chunkfiles::LockKind::Shared),
        libc::F_WRLCK => Ok(chunkfiles::LockKind::Exclusive),
        libc::F_UNLCK => Ok(chunkfiles::LockKind::Unlock),
        _ => Err(libc::EINVAL),
    }
}

fn fcntl_mapped(fd: c_int, d: &Descriptor, cmd: c_int, arg: c_ulong) -> Res<c_int> {
    const F_OFD_GETLK: c_int = 36;
    const F_OFD_SETLK: c_int = 37;
    const F_OFD_SETLKW: c_int = 38;
    match cmd {
        // The placeholder's own flag is the descriptor's.
        libc::F_GETFD | libc::F_SETFD => {
            // SAFETY: the placeholder.
            let rc = unsafe { crate::real::fcntl(fd, cmd, arg) };
            if rc < 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EBADF));
            }
            Ok(rc)
        }
        libc::F_GETFL => Ok(d.file.flags()),
        libc::F_SETFL => {
            let changeable = libc::O_APPEND | libc::O_NONBLOCK | libc::O_DIRECT | libc::O_NOATIME | libc::O_ASYNC;
            let flags = d.file.flags();
            d.file.flags.store((flags & !changeable) | (arg as c_int & changeable), std::sync::atomic::Ordering::Relaxed);
            Ok(0)
        }
        libc::F_DUPFD | libc::F_DUPFD_CLOEXEC => duplicate(fd, d, cmd, arg as c_int),
        libc::F_GETLK | libc::F_SETLK | libc::F_SETLKW | F_OFD_GETLK | F_OFD_SETLK | F_OFD_SETLKW => {
            if arg == 0 {
                return Err(libc::EFAULT);
            }
            // SAFETY: the caller's struct flock.
            let flock = unsafe { &mut *(arg as *mut libc::flock64) };
            let ofd = matches!(cmd, F_OFD_GETLK | F_OFD_SETLK | F_OFD_SETLKW);
            if ofd && flock.l_pid != 0 {
                return Err(libc::EINVAL);
            }
            let owner = if ofd { files::description_owner(&d.file) } else { files::posix_owner() };
            let range = files::lock_range_of(&d.file, flock.l_whence, flock.l_start, flock.l_len)?;
            let kind = lock_kind(flock.l_type)?;
            if matches!(cmd, libc::F_GETLK | F_OFD_GETLK) {
                let exclusive = match kind {
                    chunkfiles::LockKind::Exclusive => true,
                    chunkfiles::LockKind::Shared => false,
                    chunkfiles::LockKind::Unlock => return Err(libc::EINVAL),
                };
                // SAFETY: a plain getter.
                let pid = unsafe { libc::getpid() } as u32;
                let held = files::volume_of(&d.file)?.test_lock(d.file.ino, owner, pid, range.0, range.1, exclusive).map_err(files::errno)?;
                match held {
                    None => flock.l_type = libc::F_UNLCK as i16,
                    Some(holder) => {
                        flock.l_type = if holder.exclusive { libc::F_WRLCK } else { libc::F_RDLCK } as i16;
                        flock.l_whence = libc::SEEK_SET as i16;
                        flock.l_start = holder.start as i64;
                        flock.l_len = if holder.end == u64::MAX { 0 } else { (holder.end - holder.start + 1) as i64 };
                        flock.l_pid = if ofd { -1 } else { holder.pid as i32 };
                    }
                }
                return Ok(0);
            }
            let wait = matches!(cmd, libc::F_SETLKW | F_OFD_SETLKW);
            files::lock(&d.file, owner, kind, range, wait).map(|()| 0)
        }
        // Leases, notifications, pipe sizes, seals: not for files of a volume.
        _ => Err(libc::EINVAL),
    }
}

#[no_mangle]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    match table::mapped(fd) {
        Some(d) => shim("fcntl", || fcntl_mapped(fd, &d, cmd, arg)),
        // SAFETY: the caller's arguments.
        None => unsafe { crate::real::fcntl(fd, cmd, arg) },
    }
}

#[no_mangle]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    match table::mapped(fd) {
        Some(d) => shim("fcntl64", || fcntl_mapped(fd, &d, cmd, arg)),
        None => pass!(fcntl64: unsafe extern "C" fn(c_int, c_int, c_ulong) -> c_int; fd, cmd, arg),
    }
}

#[no_mangle]
pub unsafe extern "C" fn flock(fd: c_int, operation: c_int) -> c_int {
    match table::mapped(fd) {
        Some(d) => shim("flock", || {
            let kind = match operation & !libc::LOCK_NB {
                libc::LOCK_SH => chunkfiles::LockKind::Shared,
                libc::LOCK_EX => chunkfiles::LockKind::Exclusive,
                libc::LOCK_UN => chunkfiles::LockKind::Unlock,
                _ => return Err(libc::EINVAL),
            };
            // flock does not care how the descriptor was opened.
            let volume = files::volume_of(&d.file)?;
            // SAFETY: a plain getter.
            let pid = unsafe { libc::getpid() } as u32;
            match volume.lock_range(d.file.ino, files::description_owner(&d.file), pid, 0, u64::MAX, kind, operation & libc::LOCK_NB == 0) {
                Ok(()) => Ok(0),
                Err(chunkfiles::FsError::WouldBlock) => Err(libc::EWOULDBLOCK),
                Err(e) => Err(e.errno()),
            }
        }),
        None => pass!(flock: unsafe extern "C" fn(c_int, c_int) -> c_int; fd, operation),
    }
}

#[no_mangle]
pub unsafe extern "C" fn lockf(fd: c_int, cmd: c_int, len: off_t) -> c_int {
    match table::mapped(fd) {
        Some(d) => shim("lockf", || {
            let range = files::lock_range_of(&d.file, libc::SEEK_CUR as i16, 0, len)?;
            let owner = files::posix_owner();
            match cmd {
                libc::F_LOCK => files::lock(&d.file, owner, chunkfiles::LockKind::Exclusive, range, true),
                libc::F_TLOCK => {
                    files::lock(&d.file, owner, chunkfiles::LockKind::Exclusive, range, false).map_err(|e| if e == libc::EAGAIN { libc::EACCES } else { e })
                }
                libc::F_ULOCK => files::lock(&d.file, owner, chunkfiles::LockKind::Unlock, range, false),
                libc::F_TEST => {
                    // SAFETY: a plain getter.
                    let pid = unsafe { libc::getpid() } as u32;
                    match files::volume_of(&d.file)?.test_lock(d.file.ino, owner, pid, range.0, range.1, true).map_err(files::errno)? {
                        None => Ok(()),
                        Some(_) => Err(libc::EACCES),
                    }
                }
                _ => Err(libc::EINVAL),
            }
            .map(|()| 0)
        }),
        None => pass!(lockf: unsafe extern "C" fn(c_int, c_int, off_t) -> c_int; fd, cmd, len),
    }
}

#[no_mangle]
pub unsafe extern "C" fn lockf64(fd: c_int, cmd: c_int, len: off64_t) -> c_int {
    match table::mapped(fd) {
        // SAFETY: the same call (off_t is 64 bits here).
        Some(_) => unsafe { lockf(fd, cmd, len) },
        None => pass!(lockf64: unsafe extern "C" fn(c_int, c_int, off64_t) -> c_int; fd, cmd, len),
    }
}

#[no_mangle]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    match table::mapped(fd) {
        Some(d) => shim("dup", || duplicate(fd, &d, libc::F_DUPFD, 0)),
        None => pass!(dup: unsafe extern "C" fn(c_int) -> c_int; fd),
    }
}

/// dup2/dup3: the kernel closes `new` if open; a mapped one is forgotten first.
fn dup_onto(old: c_int, new: c_int, flags: c_int, three: bool) -> c_int {
    let source = table::mapped(old);
    if old == new {
        return if three {
            crate::set_errno(libc::EINVAL);
            -1
        } else if source.is_some() {
            new
        } else {
            pass!(dup2: unsafe extern "C" fn(c_int, c_int) -> c_int; old, new)
        };
    }
    if table::mapped(new).is_some() {
        let _ = forget(new);
    }
    match source.filter(|_| table::owned_here()) {
        Some(d) => {
            let rc = pass!(dup3: unsafe extern "C" fn(c_int, c_int, c_int) -> c_int; old, new, flags);
            if rc >= 0 {
                table::insert(rc, Descriptor { file: d.file.clone() });
            }
            rc
        }
        None if three => pass!(dup3: unsafe extern "C" fn(c_int, c_int, c_int) -> c_int; old, new, flags),
        None => pass!(dup2: unsafe extern "C" fn(c_int, c_int) -> c_int; old, new),
    }
}

#[no_mangle]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    dup_onto(old, new, 0, false)
}

#[no_mangle]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    dup_onto(old, new, flags, true)
}

// ---- copying between descriptors ----

#[no_mangle]
pub unsafe extern "C" fn copy_file_range(fd_in: c_int, off_in: *mut off64_t, fd_out: c_int, off_out: *mut off64_t, len: size_t, flags: c_uint) -> ssize_t {
    if table::mapped(fd_in).is_some() || table::mapped(fd_out).is_some() {
        // As between two filesystems: callers (cp) fall back to read and write.
        crate::set_errno(libc::EXDEV);
        return -1;
    }
    pass!(copy_file_range: unsafe extern "C" fn(c_int, *mut off64_t, c_int, *mut off64_t, size_t, c_uint) -> ssize_t; fd_in, off_in, fd_out, off_out, len, flags)
}

#[no_mangle]
pub unsafe extern "C" fn sendfile(out_fd: c_int, in_fd: c_int, offset: *mut off_t, count: size_t) -> ssize_t {
    if table::mapped(in_fd).is_some() || table::mapped(out_fd).is_some() {
        // Callers of sendfile on files fall back to read and write on EINVAL.
        crate::set_errno(libc::EINVAL);
        return -1;
    }
    pass!(sendfile: unsafe extern "C" fn(c_int, c_int, *mut off_t, size_t) -> ssize_t; out_fd, in_fd, offset, count)
}

#[no_mangle]
pub unsafe extern "C" fn sendfile64(out_fd: c_int, in_fd: c_int, offset: *mut off64_t, count: size_t) -> ssize_t {
    if table::mapped(in_fd).is_some() || table::mapped(out_fd).is_some() {
        crate::set_errno(libc::EINVAL);
        return -1;
    }
    pass!(sendfile64: unsafe extern "C" fn(c_int, c_int, *mut off64_t, size_t) -> ssize_t; out_fd, in_fd, offset, count)
}

#[no_mangle]
pub unsafe extern "C" fn splice(fd_in: c_int, off_in: *mut off64_t, fd_out: c_int, off_out: *mut off64_t, len: size_t, flags: c_uint) -> ssize_t {
    if table::mapped(fd_in).is_some() || table::mapped(fd_out).is_some() {
        crate::set_errno(libc::EINVAL);
        return -1;
    }
    pass!(splice: unsafe extern "C" fn(c_int, *mut off64_t, c_int, *mut off64_t, size_t, c_uint) -> ssize_t; fd_in, off_in, fd_out, off_out, len, flags)
}

// ---- mmap ----

static SHARED_WRITABLE_LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// mmap of a mapped file: a private mapping is filled with the file's bytes (a copy, as
/// MAP_PRIVATE promises; a read-only shared mapping too, a snapshot of the file when mapped);
/// a writable shared mapping fails with ENODEV and one line on stderr (its stores could not
/// reach the cluster, and must not be lost silently).
unsafe fn mmap_mapped(d: &Descriptor, addr: *mut c_void, len: size_t, prot: c_int, flags: c_int, offset: off64_t) -> *mut c_void {
    let shared = flags & (libc::MAP_SHARED | libc::MAP_SHARED_VALIDATE) != 0;
    if shared && prot & libc::PROT_WRITE != 0 {
        if !SHARED_WRITABLE_LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            crate::log(&format!("a writable MAP_SHARED mapping of {} is not supported (ENODEV)", d.file.path));
        }
        crate::set_errno(libc::ENODEV);
        return libc::MAP_FAILED;
    }
    if offset < 0 || len == 0 {
        crate::set_errno(libc::EINVAL);
        return libc::MAP_FAILED;
    }
    let anonymous = (flags & !(libc::MAP_SHARED | libc::MAP_SHARED_VALIDATE)) | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    type MmapFn = unsafe extern "C" fn(*mut c_void, size_t, c_int, c_int, c_int, off64_t) -> *mut c_void;
    let Some(real_mmap) = crate::real::real!(mmap64: MmapFn) else {
        crate::set_errno(libc::ENOSYS);
        return libc::MAP_FAILED;
    };
    // SAFETY: a new anonymous mapping where the caller asked.
    let area = unsafe { real_mmap(addr, len, libc::PROT_READ | libc::PROT_WRITE, anonymous, -1, 0) };
    if area == libc::MAP_FAILED {
        return area;
    }
    let filled: c_int = shim("mmap", || {
        // SAFETY: the mapping just made, `len` bytes.
        let out = unsafe { bytes_mut(area, len) };
        let mut at = 0;
        while at < len {
            let n = files::read_at(&d.file, offset as u64 + at as u64, &mut out[at..])?;
            if n == 0 {
                break;
            }
            at += n;
        }
        Ok(0)
    });
    if filled < 0 {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
        // SAFETY: unmapping what was mapped above.
        unsafe { libc::munmap(area, len) };
        crate::set_errno(errno);
        return libc::MAP_FAILED;
    }
    // SAFETY: the mapping made above, given the protection asked for.
    if unsafe { libc::mprotect(area, len, prot) } != 0 {
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EINVAL);
        // SAFETY: as above.
        unsafe { libc::munmap(area, len) };
        crate::set_errno(errno);
        return libc::MAP_FAILED;
    }
    area
}

#[no_mangle]
pub unsafe extern "C" fn mmap(addr: *mut c_void, len: size_t, prot: c_int, flags: c_int, fd: c_int, offset: off_t) -> *mut c_void {
    match table::mapped(fd).filter(|_| flags & libc::MAP_ANONYMOUS == 0) {
        // SAFETY: the caller's arguments.
        Some(d) => unsafe { mmap_mapped(&d, addr, len, prot, flags, offset) },
        None => match crate::real::real!(mmap: unsafe extern "C" fn(*mut c_void, size_t, c_int, c_int, c_int, off_t) -> *mut c_void) {
            // SAFETY: the caller's arguments.
            Some(f) => unsafe { f(addr, len, prot, flags, fd, offset) },
            None => libc::MAP_FAILED,
        },
    }
}

#[no_mangle]
pub unsafe extern "C" fn mmap64(addr: *mut c_void, len: size_t, prot: c_int, flags: c_int, fd: c_int, offset: off64_t) -> *mut c_void {
    match table::mapped(fd).filter(|_| flags & libc::MAP_ANONYMOUS == 0) {
        // SAFETY: the caller's arguments.
        Some(d) => unsafe { mmap_mapped(&d, addr, len, prot, flags, offset) },
        None => match crate::real::real!(mmap64: unsafe extern "C" fn(*mut c_void, size_t, c_int, c_int, c_int, off64_t) -> *mut c_void) {
            // SAFETY: the caller's arguments.
            Some(f) => unsafe { f(addr, len, prot, flags, fd, offset) },
            None => libc::MAP_FAILED,
        },
    }
}

#[no_mangle]
pub unsafe extern "C" fn sync() {
    if crate::engaged() {
        let _: c_int = shim("sync", || {
            for volume in crate::state::opened_volumes() {
                volume.flush_all().map_err(files::errno)?;
            }
            Ok(0)
        });
    }
    if let Some(real) = crate::real::real!(sync: unsafe extern "C" fn()) {
        // SAFETY: no arguments.
        unsafe { real() }
    }
}
