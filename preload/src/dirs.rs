//! Directory streams of mapped directories: opendir, fdopendir, readdir, closedir and the
//! rest. glibc's opendir opens and reads with internal calls the shim cannot see, so a mapped
//! directory gets a stream of the shim's own: the listing as of opendir (or rewinddir), with
//! "." and "..", handed out as the `DIR *` the caller keeps.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use chunkfiles::Kind;
use libc::{c_char, c_int, c_long, DIR};
use parking_lot::Mutex;

use crate::files::{self, Opened};
use crate::real::pass;
use crate::{paths, shim, table};

/// A directory stream of the shim's.
struct Stream {
    /// The mapped descriptor it reads (dirfd returns it; closedir closes it).
    fd: c_int,
    entries: Vec<(Vec<u8>, u64, u8)>,
    position: usize,
    /// Where readdir's answer lives until the next call.
    current: libc::dirent64,
}

/// The streams handed out, by address.
static STREAMS: Mutex<Option<HashSet<usize>>> = Mutex::new(None);
static OPEN_STREAMS: AtomicUsize = AtomicUsize::new(0);

fn d_type(kind: Kind) -> u8 {
    match kind {
        Kind::File => libc::DT_REG,
        Kind::Dir => libc::DT_DIR,
        Kind::Symlink => libc::DT_LNK,
        Kind::Fifo => libc::DT_FIFO,
        Kind::Socket => libc::DT_SOCK,
        Kind::CharDevice => libc::DT_CHR,
        Kind::BlockDevice => libc::DT_BLK,
    }
}

/// The listing of the directory `fd` names.
fn listing(fd: c_int) -> crate::Res<Vec<(Vec<u8>, u64, u8)>> {
    let d = table::mapped_in_shim(fd).ok_or(libc::EBADF)?;
    if d.file.kind != Kind::Dir {
        return Err(libc::ENOTDIR);
    }
    let volume = files::volume_of(&d.file)?;
    let (parent, entries) = volume.readdir(d.file.ino).map_err(crate::files::errno)?;
    let mut out = vec![(b".".to_vec(), d.file.ino, libc::DT_DIR), (b"..".to_vec(), parent, libc::DT_DIR)];
    out.extend(entries.into_iter().map(|(name, entry)| (name, entry.ino, d_type(entry.kind))));
    Ok(out)
}

/// A new stream reading mapped directory `fd`.
fn stream_of(fd: c_int) -> crate::Res<*mut DIR> {
    let entries = listing(fd)?;
    // SAFETY: all-zero is a valid dirent64.
    let stream = Box::new(Stream { fd, entries, position: 0, current: unsafe { std::mem::zeroed() } });
    let address = Box::into_raw(stream) as usize;
    STREAMS.lock().get_or_insert_with(HashSet::new).insert(address);
    OPEN_STREAMS.fetch_add(1, Ordering::AcqRel);
    Ok(address as *mut DIR)
}

/// The shim's stream at `dir`, if it is one.
fn ours(dir: *mut DIR) -> Option<*mut Stream> {
    if OPEN_STREAMS.load(Ordering::Acquire) == 0 || !crate::engaged() {
        return None;
    }
    let address = dir as usize;
    STREAMS.lock().as_ref()?.contains(&address).then_some(address as *mut Stream)
}

#[no_mangle]
pub unsafe extern "C" fn opendir(path: *const c_char) -> *mut DIR {
    // SAFETY: the caller's path.
    match unsafe { paths::classify(libc::AT_FDCWD, path) } {
        Some(mapped) => shim("opendir", || match files::open(&mapped, libc::O_RDONLY | libc::O_DIRECTORY, 0)? {
            Opened::Fd(fd) => stream_of(fd).inspect_err(|_| {
                let _ = crate::hooks_fd::forget_and_close(fd);
            }),
            Opened::Outside(target) => {
                let target = std::ffi::CString::new(target).map_err(|_| libc::EINVAL)?;
                let dir = pass!(opendir: unsafe extern "C" fn(*const c_char) -> *mut DIR; target.as_ptr());
                if dir.is_null() {
                    Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO))
                } else {
                    Ok(dir)
                }
            }
        }),
        None => pass!(opendir: unsafe extern "C" fn(*const c_char) -> *mut DIR; path),
    }
}

#[no_mangle]
pub unsafe extern "C" fn fdopendir(fd: c_int) -> *mut DIR {
    match table::mapped(fd) {
        Some(_) => shim("fdopendir", || stream_of(fd)),
        None => pass!(fdopendir: unsafe extern "C" fn(c_int) -> *mut DIR; fd),
    }
}

/// The next entry of a stream of the shim's, or NULL at its end.
unsafe fn next(stream: *mut Stream) -> *mut libc::dirent64 {
    // SAFETY: a live stream of the shim's (the caller's DIR).
    let stream = unsafe { &mut *stream };
    let Some((name, ino, kind)) = stream.entries.get(stream.position) else {
        return std::ptr::null_mut();
    };
    stream.position += 1;
    let current = &mut stream.current;
    current.d_ino = *ino;
    current.d_off = stream.position as i64;
    current.d_reclen = std::mem::size_of::<libc::dirent64>() as u16;
    current.d_type = *kind;
    let n = name.len().min(current.d_name.len() - 1);
    for (to, from) in current.d_name.iter_mut().zip(&name[..n]) {
        *to = *from as c_char;
    }
    current.d_name[n] = 0;
    current
}

#[no_mangle]
pub unsafe extern "C" fn readdir(dir: *mut DIR) -> *mut libc::dirent64 {
    match ours(dir) {
        // SAFETY: the shim's stream.
        Some(stream) => unsafe { next(stream) },
        None => pass!(readdir: unsafe extern "C" fn(*mut DIR) -> *mut libc::dirent64; dir),
    }
}

#[no_mangle]
pub unsafe extern "C" fn readdir64(dir: *mut DIR) -> *mut libc::dirent64 {
    match ours(dir) {
        // SAFETY: the shim's stream.
        Some(stream) => unsafe { next(stream) },
        None => pass!(readdir64: unsafe extern "C" fn(*mut DIR) -> *mut libc::dirent64; dir),
    }
}

#[no_mangle]
pub unsafe extern "C" fn closedir(dir: *mut DIR) -> c_int {
    match ours(dir) {
        Some(stream) => {
            if let Some(streams) = STREAMS.lock().as_mut() {
                streams.remove(&(dir as usize));
            }
            OPEN_STREAMS.fetch_sub(1, Ordering::AcqRel);
            // SAFETY: made by `stream_of` with Box::into_raw, forgotten by the set above.
            let stream = unsafe { Box::from_raw(stream) };
            shim("closedir", || crate::hooks_fd::forget_and_close(stream.fd).map(|()| 0))
        }
        None => pass!(closedir: unsafe extern "C" fn(*mut DIR) -> c_int; dir),
    }
}

#[no_mangle]
pub unsafe extern "C" fn dirfd(dir: *mut DIR) -> c_int {
    match ours(dir) {
        // SAFETY: the shim's stream.
        Some(stream) => unsafe { (*stream).fd },
        None => pass!(dirfd: unsafe extern "C" fn(*mut DIR) -> c_int; dir),
    }
}

#[no_mangle]
pub unsafe extern "C" fn rewinddir(dir: *mut DIR) {
    match ours(dir) {
        Some(stream) => {
            // SAFETY: the shim's stream.
            let stream = unsafe { &mut *stream };
            let fd = stream.fd;
            let _: c_int = shim("rewinddir", || {
                stream.entries = listing(fd)?;
                Ok(0)
            });
            stream.position = 0;
        }
        None => {
            if let Some(real) = crate::real::real!(rewinddir: unsafe extern "C" fn(*mut DIR)) {
                // SAFETY: the caller's stream.
                unsafe { real(dir) }
            }
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn telldir(dir: *mut DIR) -> c_long {
    match ours(dir) {
        // SAFETY: the shim's stream.
        Some(stream) => unsafe { (*stream).position as c_long },
        None => pass!(telldir: unsafe extern "C" fn(*mut DIR) -> c_long; dir),
    }
}

#[no_mangle]
pub unsafe extern "C" fn seekdir(dir: *mut DIR, position: c_long) {
    match ours(dir) {
        // SAFETY: the shim's stream.
        Some(stream) => unsafe { (*stream).position = position.max(0) as usize },
        None => {
            if let Some(real) = crate::real::real!(seekdir: unsafe extern "C" fn(*mut DIR, c_long)) {
                // SAFETY: the caller's arguments.
                unsafe { real(dir, position) }
            }
        }
    }
}

pub(crate) fn before_fork() {
    std::mem::forget(STREAMS.lock());
}

pub(crate) fn after_fork() {
    // SAFETY: locked by `before_fork` on this thread, its guard forgotten.
    unsafe { STREAMS.force_unlock() };
}
