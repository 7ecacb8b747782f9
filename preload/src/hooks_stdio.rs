//! stdio on mapped files. glibc's fopen opens with an internal call the shim cannot see, and a
//! FILE reads and writes its descriptor with internal calls too, so a mapped path (or a
//! mapped descriptor given to fdopen) gets a FILE of `fopencookie` whose read, write, seek and
//! close are the shim's. Everything that works on a FILE works on it, `fileno` included
//! (`set_fileno`). freopen onto a mapped path works for the standard streams (see
//! `freopen_mapped`).

use libc::{c_char, c_int, c_void, off64_t, size_t, ssize_t, FILE};

use crate::files::{self, Opened};
use crate::real::pass;
use crate::{paths, shim, table};

#[repr(C)]
struct CookieFunctions {
    read: Option<unsafe extern "C" fn(*mut c_void, *mut c_char, size_t) -> ssize_t>,
    write: Option<unsafe extern "C" fn(*mut c_void, *const c_char, size_t) -> ssize_t>,
    seek: Option<unsafe extern "C" fn(*mut c_void, *mut off64_t, c_int) -> c_int>,
    close: Option<unsafe extern "C" fn(*mut c_void) -> c_int>,
}

extern "C" {
    fn fopencookie(cookie: *mut c_void, mode: *const c_char, functions: CookieFunctions) -> *mut FILE;
}

fn fd_of(cookie: *mut c_void) -> c_int {
    cookie as usize as c_int
}

unsafe extern "C" fn cookie_read(cookie: *mut c_void, buf: *mut c_char, size: size_t) -> ssize_t {
    shim("fread", || {
        let d = table::mapped_in_shim(fd_of(cookie)).ok_or(libc::EBADF)?;
        // SAFETY: stdio's buffer of `size` bytes.
        let out = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), size) };
        files::read(&d.file, out).map(|n| n as ssize_t)
    })
}

unsafe extern "C" fn cookie_write(cookie: *mut c_void, buf: *const c_char, size: size_t) -> ssize_t {
    let n: ssize_t = shim("fwrite", || {
        let d = table::mapped_in_shim(fd_of(cookie)).ok_or(libc::EBADF)?;
        // SAFETY: stdio's buffer of `size` bytes.
        let data = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), size) };
        files::write(&d.file, data).map(|n| n as ssize_t)
    });
    // A cookie's write reports an error as 0 bytes written.
    n.max(0)
}

unsafe extern "C" fn cookie_seek(cookie: *mut c_void, offset: *mut off64_t, whence: c_int) -> c_int {
    shim("fseek", || {
        let d = table::mapped_in_shim(fd_of(cookie)).ok_or(libc::EBADF)?;
        // SAFETY: stdio's offset.
        let at = files::seek(&d.file, unsafe { *offset }, whence)?;
        // SAFETY: as above.
        unsafe { *offset = at };
        Ok(0)
    })
}

unsafe extern "C" fn cookie_close(cookie: *mut c_void) -> c_int {
    shim("fclose", || crate::hooks_fd::forget_and_close(fd_of(cookie)).map(|()| 0))
}

/// open(2) flags for an fopen mode ("r", "w+", "ab", "rxe", ...).
fn mode_flags(mode: &[u8]) -> crate::Res<c_int> {
    let mut flags = match mode.first() {
        Some(b'r') => libc::O_RDONLY,
        Some(b'w') => libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
        Some(b'a') => libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND,
        _ => return Err(libc::EINVAL),
    };
    for &c in &mode[1..] {
        match c {
            b'+' => flags = (flags & !libc::O_ACCMODE) | libc::O_RDWR,
            b'x' => flags |= libc::O_EXCL,
            b'e' => flags |= libc::O_CLOEXEC,
            b',' => break,
            _ => {}
        }
    }
    Ok(flags)
}

/// A FILE over mapped descriptor `fd`.
fn cookie_file(fd: c_int, mode: *const c_char) -> crate::Res<*mut FILE> {
    let functions = CookieFunctions { read: Some(cookie_read), write: Some(cookie_write), seek: Some(cookie_seek), close: Some(cookie_close) };
    // SAFETY: the caller's mode string; the cookie is the descriptor's number.
    let file = unsafe { fopencookie(fd as usize as *mut c_void, mode, functions) };
    if file.is_null() {
        return Err(libc::ENOMEM);
    }
    set_fileno(file, fd);
    Ok(file)
}

/// Where glibc's struct FILE keeps its descriptor (`_fileno`) on LP64: after `_flags` and
/// thirteen pointers. glibc's ABI, unchanged since 2.1.
const FILENO_OFFSET: usize = 112;
/// What fopencookie leaves there (glibc: "not a real file, but treated as one").
const COOKIE_FILENO: c_int = -2;

/// Makes `fileno()` of a cookie stream answer the mapped descriptor (programs fstat, fsync
/// and lock `fileno(fp)`); only where the field holds what fopencookie puts there, so another
/// layout is left alone (fileno then fails with EBADF, as for any cookie stream).
fn set_fileno(file: *mut FILE, fd: c_int) {
    if cfg!(target_pointer_width = "64") {
        // SAFETY: inside the FILE fopencookie just allocated (far larger than 116 bytes).
        unsafe {
            let field = file.cast::<u8>().add(FILENO_OFFSET).cast::<c_int>();
            if *field == COOKIE_FILENO {
                *field = fd;
            }
        }
    }
}

extern "C" {
    static mut stdin: *mut FILE;
    static mut stdout: *mut FILE;
    static mut stderr: *mut FILE;
}

/// After exec: a standard descriptor (0, 1, 2) that is a mapped file the parent redirected
/// gets a FILE of the shim's as stdin, stdout or stderr. glibc's own streams read and write
/// their descriptor with internal calls the shim cannot see (they would meet the placeholder,
/// read nothing and fail every write).
pub(crate) fn adopt_standard_stream(fd: c_int) {
    let (mode, unbuffered) = match fd {
        0 => (c"r", false),
        1 => (c"w", false),
        2 => (c"w", true),
        _ => return,
    };
    let Ok(file) = cookie_file(fd, mode.as_ptr()) else { return };
    // SAFETY: glibc's standard stream variables, replaced before main runs (the constructor's
    // thread is the only one); the old streams are left as they were.
    unsafe {
        if unbuffered {
            libc::setvbuf(file, std::ptr::null_mut(), libc::_IONBF, 0);
        }
        match fd {
            0 => stdin = file,
            1 => stdout = file,
            _ => stderr = file,
        }
    }
}

unsafe fn fopen_mapped(path: *const c_char, mode: *const c_char) -> Option<*mut FILE> {
    // SAFETY: the caller's path.
    let mapped = unsafe { paths::classify(libc::AT_FDCWD, path) }?;
    Some(shim("fopen", || {
        if mode.is_null() {
            return Err(libc::EINVAL);
        }
        // SAFETY: the caller's NUL-terminated mode.
        let flags = mode_flags(unsafe { std::ffi::CStr::from_ptr(mode) }.to_bytes())?;
        match files::open(&mapped, flags, 0o666)? {
            Opened::Fd(fd) => cookie_file(fd, mode).inspect_err(|_| {
                let _ = crate::hooks_fd::forget_and_close(fd);
            }),
            Opened::Outside(target) => {
                let target = std::ffi::CString::new(target).map_err(|_| libc::EINVAL)?;
                let file = pass!(fopen: unsafe extern "C" fn(*const c_char, *const c_char) -> *mut FILE; target.as_ptr(), mode);
                if file.is_null() {
                    Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
                } else {
                    Ok(file)
                }
            }
        }
    }))
}

#[no_mangle]
pub unsafe extern "C" fn fopen(path: *const c_char, mode: *const c_char) -> *mut FILE {
    // SAFETY: the caller's arguments.
    unsafe { fopen_mapped(path, mode) }.unwrap_or_else(|| pass!(fopen: unsafe extern "C" fn(*const c_char, *const c_char) -> *mut FILE; path, mode))
}

#[no_mangle]
pub unsafe extern "C" fn fopen64(path: *const c_char, mode: *const c_char) -> *mut FILE {
    // SAFETY: the caller's arguments.
    unsafe { fopen_mapped(path, mode) }.unwrap_or_else(|| pass!(fopen64: unsafe extern "C" fn(*const c_char, *const c_char) -> *mut FILE; path, mode))
}

#[no_mangle]
pub unsafe extern "C" fn fdopen(fd: c_int, mode: *const c_char) -> *mut FILE {
    match table::mapped(fd) {
        Some(_) => shim("fdopen", || cookie_file(fd, mode)),
        None => pass!(fdopen: unsafe extern "C" fn(c_int, *const c_char) -> *mut FILE; fd, mode),
    }
}

/// freopen onto a mapped path. glibc's freopen reuses the FILE it is given, whose reads and
/// writes are glibc's internal calls; a FILE of the shim's cannot take its place in memory. For
/// the standard streams (by far the common case: `freopen("/data/log", "a", stdout)`) the
/// variable holds the stream, so the shim does what freopen does through it: the old stream is
/// flushed, the file opened onto the same descriptor number (0, 1 or 2, so `write(1, ...)`
/// reaches it too), and `stdin`, `stdout` or `stderr` set to a FILE of the shim's over it,
/// which is returned. The old FILE is left open and unused. Any other stream is refused with
/// ENOTSUP and one line on stderr: closing it and returning a new one would leave a caller that
/// keeps using its old pointer with freed memory.
unsafe fn freopen_mapped(mapped: paths::Mapped, mode: *const c_char, stream: *mut FILE) -> *mut FILE {
    // SAFETY: glibc's standard stream variables, read only.
    let standard = unsafe { [stdin, stdout, stderr].iter().position(|&s| s == stream && !stream.is_null()) };
    let Some(number) = standard else {
        crate::log("freopen onto a mapped path works for stdin, stdout and stderr only (ENOTSUP)");
        crate::set_errno(libc::ENOTSUP);
        return std::ptr::null_mut();
    };
    if mode.is_null() {
        crate::set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    }
    // SAFETY: the caller's stream, still glibc's.
    unsafe { libc::fflush(stream) };
    // A symlink that leads out of the volume: libc's freopen takes the path it leads to.
    let mut outside: Option<std::ffi::CString> = None;
    let fd: c_int = shim("freopen", || {
        // SAFETY: the caller's NUL-terminated mode.
        let flags = mode_flags(unsafe { std::ffi::CStr::from_ptr(mode) }.to_bytes())?;
        match files::open(&mapped, flags & !libc::O_CLOEXEC, 0o666)? {
            Opened::Fd(fd) => Ok(fd),
            Opened::Outside(target) => {
                outside = Some(std::ffi::CString::new(target).map_err(|_| libc::EINVAL)?);
                Ok(-1)
            }
        }
    });
    if let Some(target) = outside {
        return pass!(freopen: unsafe extern "C" fn(*const c_char, *const c_char, *mut FILE) -> *mut FILE; target.as_ptr(), mode, stream);
    }
    if fd < 0 {
        return std::ptr::null_mut();
    }
    let number = number as c_int;
    // SAFETY: the shim's dup2 (the target number is the standard descriptor freopen reuses).
    let duplicated = unsafe { crate::hooks_fd::dup2(fd, number) };
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
    let _ = crate::hooks_fd::forget_and_close(fd);
    if duplicated != number {
        crate::set_errno(errno);
        return std::ptr::null_mut();
    }
    let file: *mut FILE = shim("freopen", || cookie_file(number, mode));
    if file.is_null() {
        return file;
    }
    // SAFETY: glibc's standard stream variables: replaced as freopen would have reused them.
    unsafe {
        match number {
            0 => stdin = file,
            1 => stdout = file,
            _ => {
                libc::setvbuf(file, std::ptr::null_mut(), libc::_IONBF, 0);
                stderr = file;
            }
        }
    }
    file
}

#[no_mangle]
pub unsafe extern "C" fn freopen(path: *const c_char, mode: *const c_char, stream: *mut FILE) -> *mut FILE {
    // SAFETY: the caller's path.
    match unsafe { paths::classify(libc::AT_FDCWD, path) } {
        // SAFETY: the caller's arguments.
        Some(mapped) => unsafe { freopen_mapped(mapped, mode, stream) },
        None => pass!(freopen: unsafe extern "C" fn(*const c_char, *const c_char, *mut FILE) -> *mut FILE; path, mode, stream),
    }
}

#[no_mangle]
pub unsafe extern "C" fn freopen64(path: *const c_char, mode: *const c_char, stream: *mut FILE) -> *mut FILE {
    // SAFETY: the caller's path.
    match unsafe { paths::classify(libc::AT_FDCWD, path) } {
        // SAFETY: the caller's arguments.
        Some(mapped) => unsafe { freopen_mapped(mapped, mode, stream) },
        None => pass!(freopen64: unsafe extern "C" fn(*const c_char, *const c_char, *mut FILE) -> *mut FILE; path, mode, stream),
    }
}
