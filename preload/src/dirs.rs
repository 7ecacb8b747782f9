//! Directory streams of mapped directories: opendir, fdopendir, readdir, closedir and the
//! rest. glibc's opendir opens and reads with internal calls the shim cannot see, so a mapped
//! directory gets a stream of the shim's own: the listing as of opendir (or rewinddir), with
//! "." and "..", handed out as the `DIR *` the caller keeps. For the same reason scandir (and
//! scandirat) list a mapped directory here, and getdents64 on a mapped directory descriptor
//! reads its listing, at the descriptor's offset.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use chunkfiles::Kind;
use libc::{c_char, c_int, c_long, c_void, dirent64, size_t, ssize_t, DIR};
use parking_lot::Mutex;

use crate::files::{self, Opened};
use crate::paths::Mapped;
use crate::real::pass;
use crate::{paths, shim, table};

/// One entry of a listing: its name, inode number and d_type.
type Entry = (Vec<u8>, u64, u8);

/// A directory stream of the shim's.
struct Stream {
    /// The mapped descriptor it reads (dirfd returns it; closedir closes it).
    fd: c_int,
    entries: Vec<Entry>,
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
fn listing(fd: c_int) -> crate::Res<Vec<Entry>> {
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

/// Fills `out` with a listing's entry; `next` is the position after it (its d_off).
fn fill(out: &mut dirent64, (name, ino, kind): &Entry, next: usize) {
    out.d_ino = *ino;
    out.d_off = next as i64;
    out.d_reclen = std::mem::size_of::<dirent64>() as u16;
    out.d_type = *kind;
    let n = name.len().min(out.d_name.len() - 1);
    for (to, from) in out.d_name.iter_mut().zip(&name[..n]) {
        *to = *from as c_char;
    }
    out.d_name[n] = 0;
}

/// The next entry of a stream of the shim's, or NULL at its end.
unsafe fn next(stream: *mut Stream) -> *mut libc::dirent64 {
    // SAFETY: a live stream of the shim's (the caller's DIR).
    let stream = unsafe { &mut *stream };
    let Some(entry) = stream.entries.get(stream.position) else {
        return std::ptr::null_mut();
    };
    stream.position += 1;
    fill(&mut stream.current, entry, stream.position);
    &mut stream.current
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

// ---- scandir ----

/// scandir's filter: keeps an entry when it returns non-zero.
type Filter = Option<unsafe extern "C" fn(*const dirent64) -> c_int>;
/// scandir's compar: `int (*)(const struct dirent **, const struct dirent **)`.
type CompareFn = unsafe extern "C" fn(*mut *const dirent64, *mut *const dirent64) -> c_int;
type Compare = Option<CompareFn>;
/// What qsort calls.
type QsortFn = unsafe extern "C" fn(*const c_void, *const c_void) -> c_int;
type ScandirFn = unsafe extern "C" fn(*const c_char, *mut *mut *mut dirent64, Filter, Compare) -> c_int;
type ScandiratFn = unsafe extern "C" fn(c_int, *const c_char, *mut *mut *mut dirent64, Filter, Compare) -> c_int;

/// What a mapped path lists.
enum Listed {
    Entries(Vec<Entry>),
    /// A symlink led out of the volume: libc lists this path.
    Outside(std::ffi::CString),
}

/// The listing of the mapped directory `mapped` names (opened and closed as opendir and
/// closedir would, so permissions and ENOTDIR are theirs).
fn list_path(mapped: &Mapped) -> crate::Res<Listed> {
    match files::open(mapped, libc::O_RDONLY | libc::O_DIRECTORY, 0)? {
        Opened::Fd(fd) => {
            let entries = listing(fd);
            let closed = crate::hooks_fd::forget_and_close(fd);
            let entries = entries?;
            closed?;
            Ok(Listed::Entries(entries))
        }
        Opened::Outside(target) => Ok(Listed::Outside(std::ffi::CString::new(target).map_err(|_| libc::EINVAL)?)),
    }
}

/// dirent64s from malloc, freed unless handed to the caller.
struct Malloced(Vec<*mut dirent64>);

impl Drop for Malloced {
    fn drop(&mut self) {
        for entry in self.0.drain(..) {
            // SAFETY: from malloc, not handed out.
            unsafe { libc::free(entry.cast()) };
        }
    }
}

/// scandir's answer from a listing: the entries `filter` keeps, each copied into a malloc'ed
/// dirent64, in a malloc'ed array at `*namelist` (NULL when none is kept, as glibc's) that
/// the caller frees, sorted with `compar` when given; their count. The application's
/// `filter` and `compar` run with the hooks engaged.
///
/// # Safety
/// `namelist` is NULL or writable; `filter` and `compar` are C functions of their types.
unsafe fn keep(entries: &[Entry], namelist: *mut *mut *mut dirent64, filter: Filter, compar: Compare) -> crate::Res<c_int> {
    if namelist.is_null() {
        return Err(libc::EFAULT);
    }
    let mut kept = Malloced(Vec::new());
    for (index, entry) in entries.iter().enumerate() {
        // SAFETY: all-zero is a valid dirent64.
        let mut out: dirent64 = unsafe { std::mem::zeroed() };
        fill(&mut out, entry, index + 1);
        if let Some(filter) = filter {
            // SAFETY: the application's filter, given an entry alive for the call.
            if unsafe { filter(&out) } == 0 {
                continue;
            }
        }
        // SAFETY: a fresh allocation, written whole below.
        let copy = unsafe { libc::malloc(std::mem::size_of::<dirent64>()) }.cast::<dirent64>();
        if copy.is_null() {
            return Err(libc::ENOMEM);
        }
        // SAFETY: `copy` holds one dirent64.
        unsafe { copy.write(out) };
        kept.0.push(copy);
    }
    let count = c_int::try_from(kept.0.len()).map_err(|_| libc::EOVERFLOW)?;
    if count == 0 {
        // SAFETY: the caller's pointer, checked above.
        unsafe { *namelist = std::ptr::null_mut() };
        return Ok(0);
    }
    // SAFETY: a fresh allocation of `count` pointers, filled below.
    let array = unsafe { libc::malloc(kept.0.len() * std::mem::size_of::<*mut dirent64>()) }.cast::<*mut dirent64>();
    if array.is_null() {
        return Err(libc::ENOMEM);
    }
    // SAFETY: `array` holds `kept.0.len()` pointers; from here the caller owns the entries.
    unsafe { std::ptr::copy_nonoverlapping(kept.0.as_ptr(), array, kept.0.len()) };
    let len = std::mem::take(&mut kept.0).len();
    if let Some(compar) = compar {
        // SAFETY: qsort hands compar two pointers into the array, each a `const struct dirent
        // **`: the signature compar is declared with; the same call glibc's scandir makes.
        let compar = unsafe { std::mem::transmute::<CompareFn, QsortFn>(compar) };
        // SAFETY: `len` pointers at `array`.
        unsafe { libc::qsort(array.cast(), len, std::mem::size_of::<*mut dirent64>(), Some(compar)) };
    }
    // SAFETY: the caller's pointer, checked above.
    unsafe { *namelist = array };
    Ok(count)
}

/// scandir and its names on a mapped path: the shim's listing, through `keep`; a symlink out
/// of the volume hands libc's scandirat the path it leads to.
///
/// # Safety
/// As `keep`.
unsafe fn scandir_mapped(mapped: &Mapped, namelist: *mut *mut *mut dirent64, filter: Filter, compar: Compare) -> c_int {
    let mut listed = None;
    let rc: c_int = shim("scandir", || {
        listed = Some(list_path(mapped)?);
        Ok(0)
    });
    match listed {
        None => rc,
        // SAFETY: the caller's arguments.
        Some(Listed::Entries(entries)) => crate::guarded("scandir", || unsafe { keep(&entries, namelist, filter, compar) }),
        // The caller's arguments, with the path the symlink leads to.
        Some(Listed::Outside(target)) => pass!(scandirat: ScandiratFn; libc::AT_FDCWD, target.as_ptr(), namelist, filter, compar),
    }
}

#[no_mangle]
pub unsafe extern "C" fn scandir(path: *const c_char, namelist: *mut *mut *mut dirent64, filter: Filter, compar: Compare) -> c_int {
    // SAFETY: the caller's path.
    match unsafe { paths::classify(libc::AT_FDCWD, path) } {
        // SAFETY: the caller's arguments.
        Some(mapped) => unsafe { scandir_mapped(&mapped, namelist, filter, compar) },
        None => pass!(scandir: ScandirFn; path, namelist, filter, compar),
    }
}

#[no_mangle]
pub unsafe extern "C" fn scandir64(path: *const c_char, namelist: *mut *mut *mut dirent64, filter: Filter, compar: Compare) -> c_int {
    // SAFETY: the caller's path.
    match unsafe { paths::classify(libc::AT_FDCWD, path) } {
        // SAFETY: the caller's arguments.
        Some(mapped) => unsafe { scandir_mapped(&mapped, namelist, filter, compar) },
        None => pass!(scandir64: ScandirFn; path, namelist, filter, compar),
    }
}

#[no_mangle]
pub unsafe extern "C" fn scandirat(dirfd: c_int, path: *const c_char, namelist: *mut *mut *mut dirent64, filter: Filter, compar: Compare) -> c_int {
    // SAFETY: the caller's path.
    match unsafe { paths::classify(dirfd, path) } {
        // SAFETY: the caller's arguments.
        Some(mapped) => unsafe { scandir_mapped(&mapped, namelist, filter, compar) },
        None => pass!(scandirat: ScandiratFn; dirfd, path, namelist, filter, compar),
    }
}

#[no_mangle]
pub unsafe extern "C" fn scandirat64(dirfd: c_int, path: *const c_char, namelist: *mut *mut *mut dirent64, filter: Filter, compar: Compare) -> c_int {
    // SAFETY: the caller's path.
    match unsafe { paths::classify(dirfd, path) } {
        // SAFETY: the caller's arguments.
        Some(mapped) => unsafe { scandir_mapped(&mapped, namelist, filter, compar) },
        None => pass!(scandirat64: ScandiratFn; dirfd, path, namelist, filter, compar),
    }
}

// ---- getdents64 ----

/// Where a `struct linux_dirent64`'s name starts: after d_ino (8 bytes), d_off (8), d_reclen
/// (2) and d_type (1).
const DIRENT_NAME_OFFSET: usize = 19;

/// One `struct linux_dirent64` record: NUL-terminated name, zero-padded to 8 bytes.
fn dirent_record((name, ino, kind): &Entry, next: usize) -> Vec<u8> {
    let reclen = (DIRENT_NAME_OFFSET + name.len() + 1).next_multiple_of(8);
    let mut record = Vec::with_capacity(reclen);
    record.extend_from_slice(&ino.to_ne_bytes());
    record.extend_from_slice(&(next as i64).to_ne_bytes());
    record.extend_from_slice(&(reclen as u16).to_ne_bytes());
    record.push(*kind);
    record.extend_from_slice(name);
    record.resize(reclen, 0);
    record
}

/// getdents64 on mapped descriptor `fd`: the records of its listing from the descriptor's
/// offset (the index of the next entry; each record's d_off is the index after it, so lseek to
/// a d_off resumes there and lseek to 0 rewinds, as the kernel's cookies do), as many as fit
/// in `count` bytes; the offset moves past them.
///
/// # Safety
/// `buf` holds `count` writable bytes.
unsafe fn dirents(fd: c_int, file: &table::OpenFile, buf: *mut u8, count: usize) -> crate::Res<ssize_t> {
    if file.kind != Kind::Dir {
        return Err(libc::ENOTDIR);
    }
    let offset = file.offset.lock();
    let entries = listing(fd)?;
    let mut position = usize::try_from(offset.get()).unwrap_or(usize::MAX);
    let mut used = 0;
    while let Some(entry) = entries.get(position) {
        let record = dirent_record(entry, position + 1);
        if used + record.len() > count {
            if used == 0 {
                return Err(libc::EINVAL);
            }
            break;
        }
        // SAFETY: `used + record.len()` <= `count`, the caller's buffer's size.
        unsafe { std::ptr::copy_nonoverlapping(record.as_ptr(), buf.add(used), record.len()) };
        used += record.len();
        position += 1;
    }
    if used > 0 {
        offset.set(position as u64);
    }
    Ok(used as ssize_t)
}

#[no_mangle]
pub unsafe extern "C" fn getdents64(fd: c_int, buf: *mut c_void, count: size_t) -> ssize_t {
    match table::mapped(fd) {
        // SAFETY: the caller's buffer of `count` bytes.
        Some(d) => shim("getdents64", || unsafe { dirents(fd, &d.file, buf.cast(), count) }),
        None => pass!(getdents64: unsafe extern "C" fn(c_int, *mut c_void, size_t) -> ssize_t; fd, buf, count),
    }
}

pub(crate) fn before_fork() {
    std::mem::forget(STREAMS.lock());
}

pub(crate) fn after_fork() {
    // SAFETY: locked by `before_fork` on this thread, its guard forgotten.
    unsafe { STREAMS.force_unlock() };
}
