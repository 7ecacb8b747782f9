//! File tree walks from a mapped path: nftw, nftw64, ftw and ftw64. glibc's walk stats and
//! lists with internal calls the shim cannot see (`__lstat`, `__opendir`, `__readdir64`), so on
//! a mapped path every lookup failed; here the walk behaves as glibc's (the same order of
//! calls, typeflags, `struct FTW` and FTW_ACTIONRETVAL answers) made of the shim's own hooks
//! (stat, lstat, opendir, readdir, chdir), so a symlink out of the volume is followed by libc
//! as those hooks do.
//!
//! Differences from glibc's: each directory's entries are read whole and its stream closed
//! before its first entry is visited, so the walk holds one directory descriptor at a time
//! whatever `nopenfd` says; the path handed to the function is at most PATH_MAX bytes
//! (ENAMETOOLONG past it).
//!
//! FTW_CHDIR is implemented, through the interposed chdir (a mapped directory becomes the
//! shim's working directory, `getcwd` says it): the function runs in the directory of the
//! entry it is given, as glibc's (in the directory itself for FTW_DP, as glibc's), and the
//! working directory is restored with fchdir on "." opened at the start. Going back up is
//! chdir(".."), lexical in a volume; a symlink out of a volume cannot be entered with chdir
//! (EXDEV, as the shim's chdir), so such a walk that follows one fails there.

use std::collections::HashSet;
use std::ffi::CStr;

use libc::{c_char, c_int};

use crate::real::pass;
use crate::{dirs, hooks_fd, hooks_path, paths, Res};

// <ftw.h>: typeflags.
const FTW_F: c_int = 0;
const FTW_D: c_int = 1;
const FTW_DNR: c_int = 2;
const FTW_NS: c_int = 3;
const FTW_SL: c_int = 4;
const FTW_DP: c_int = 5;
const FTW_SLN: c_int = 6;
// Flags.
const FTW_PHYS: c_int = 1;
const FTW_MOUNT: c_int = 2;
const FTW_CHDIR: c_int = 4;
const FTW_DEPTH: c_int = 8;
const FTW_ACTIONRETVAL: c_int = 16;
// FTW_ACTIONRETVAL answers (FTW_CONTINUE is 0).
const FTW_STOP: c_int = 1;
const FTW_SKIP_SUBTREE: c_int = 2;
const FTW_SKIP_SIBLINGS: c_int = 3;

/// The longest path handed to the function, its NUL included (PATH_MAX).
const PATH_BYTES_MAX: usize = libc::PATH_MAX as usize;

type Stat = libc::stat64;

/// `struct FTW`, nftw's fourth argument.
#[repr(C)]
pub struct Ftw {
    /// Where the entry's last name starts in the path.
    base: c_int,
    /// Depth below the starting point (0 for it).
    level: c_int,
}

type NftwFn = unsafe extern "C" fn(*const c_char, *const Stat, c_int, *mut Ftw) -> c_int;
type FtwFn = unsafe extern "C" fn(*const c_char, *const Stat, c_int) -> c_int;

/// The application's function, in nftw's or ftw's form.
#[derive(Clone, Copy)]
enum Callback {
    Nftw(NftwFn),
    /// ftw knows fewer typeflags: a symlink is FTW_F, FTW_DP is FTW_D, FTW_SLN is FTW_NS.
    Ftw(FtwFn),
}

fn is_kind(st: &Stat, kind: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == kind
}

fn zeroed_stat() -> Stat {
    // SAFETY: all-zero is a valid struct stat.
    unsafe { std::mem::zeroed() }
}

/// One walk.
struct Walk {
    callback: Callback,
    flags: c_int,
    /// The path of the entry being visited, NUL-terminated (at most PATH_BYTES_MAX bytes).
    path: Vec<u8>,
    ftw: Ftw,
    /// The starting directory's device (FTW_MOUNT; a volume is one device).
    dev: u64,
    /// Directories already walked (dev, ino), when symlinks are followed: each is walked once.
    known: HashSet<(u64, u64)>,
}

impl Walk {
    fn flag(&self, flag: c_int) -> bool {
        self.flags & flag != 0
    }

    /// The path with the NUL moved to `end`, then `name` appended.
    fn set_path(&mut self, end: usize, name: &[u8]) -> Res<()> {
        if end + name.len() + 1 > PATH_BYTES_MAX {
            return Err(libc::ENAMETOOLONG);
        }
        self.path.truncate(end);
        self.path.extend_from_slice(name);
        self.path.push(0);
        Ok(())
    }

    /// The path's length without its NUL.
    fn end(&self) -> usize {
        self.path.len() - 1
    }

    /// What stat and opendir are given: the path, or under FTW_CHDIR its last name (the
    /// working directory is the entry's directory by then), "." if it has none ("/").
    fn name(&self) -> *const c_char {
        if !self.flag(FTW_CHDIR) {
            return self.path.as_ptr().cast();
        }
        match self.path.get(self.ftw.base as usize..) {
            Some(name) if name.first().is_some_and(|&b| b != 0) => name.as_ptr().cast(),
            _ => c".".as_ptr(),
        }
    }

    /// Calls the application's function for the current path (hooks engaged).
    fn report(&mut self, st: &Stat, flag: c_int) -> c_int {
        let path = self.path.as_ptr().cast();
        match self.callback {
            // SAFETY: the application's function, with a NUL-terminated path, a stat and a
            // struct FTW alive for the call.
            Callback::Nftw(function) => unsafe { function(path, st, flag, &mut self.ftw) },
            Callback::Ftw(function) => {
                let flag = match flag {
                    FTW_SL => FTW_F,
                    FTW_DP => FTW_D,
                    FTW_SLN => FTW_NS,
                    flag => flag,
                };
                // SAFETY: as above.
                unsafe { function(path, st, flag) }
            }
        }
    }

    /// stat (or lstat when `follow` is false) of `name()`, through the shim's hooks.
    fn stat(&self, st: &mut Stat, follow: bool) -> Res<()> {
        let name = self.name();
        // SAFETY: a NUL-terminated path and a struct stat.
        let rc = unsafe {
            if follow {
                hooks_path::stat64(name, st)
            } else {
                hooks_path::lstat64(name, st)
            }
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(crate::errno())
        }
    }

    /// chdir through the shim's hook.
    fn chdir(path: *const c_char) -> Res<()> {
        // SAFETY: a NUL-terminated path.
        match unsafe { hooks_path::chdir(path) } {
            0 => Ok(()),
            _ => Err(crate::errno()),
        }
    }

    /// The names in directory `name()`, "." and ".." left out, through the shim's streams
    /// (read whole, the stream closed).
    fn read_directory(&self) -> Res<Vec<Vec<u8>>> {
        // SAFETY: a NUL-terminated path.
        let dir = unsafe { dirs::opendir(self.name()) };
        if dir.is_null() {
            return Err(crate::errno());
        }
        let mut names = Vec::new();
        loop {
            // SAFETY: the stream opened above.
            let entry = unsafe { dirs::readdir64(dir) };
            if entry.is_null() {
                break;
            }
            // SAFETY: readdir's entry, valid until the next call on the stream.
            let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) }.to_bytes();
            if name != b"." && name != b".." {
                names.push(name.to_vec());
            }
        }
        // SAFETY: the stream opened above, closed once.
        unsafe { dirs::closedir(dir) };
        Ok(names)
    }

    /// The starting point (glibc's ftw_startup after its chdir): stat, then the function or
    /// the directory's walk.
    fn start(&mut self) -> Res<c_int> {
        let mut st = zeroed_stat();
        let physical = self.flag(FTW_PHYS);
        let mut result = match self.stat(&mut st, !physical) {
            Err(errno) => {
                let mut link = zeroed_stat();
                if !physical && errno == libc::ENOENT && self.stat(&mut link, false).is_ok() && is_kind(&link, libc::S_IFLNK) {
                    self.report(&link, FTW_SLN)
                } else {
                    return Err(errno);
                }
            }
            Ok(()) if is_kind(&st, libc::S_IFDIR) => {
                self.dev = st.st_dev;
                if !physical {
                    self.known.insert((st.st_dev, st.st_ino));
                }
                self.directory(&st, true)?
            }
            Ok(()) => {
                let flag = if is_kind(&st, libc::S_IFLNK) { FTW_SL } else { FTW_F };
                self.report(&st, flag)
            }
        };
        if self.flag(FTW_ACTIONRETVAL) && (result == FTW_SKIP_SUBTREE || result == FTW_SKIP_SIBLINGS) {
            result = 0;
        }
        Ok(result)
    }

    /// One entry of a directory being walked (glibc's process_entry).
    fn entry(&mut self, name: &[u8]) -> Res<c_int> {
        self.set_path(self.ftw.base as usize, name)?;
        let physical = self.flag(FTW_PHYS);
        let mut st = zeroed_stat();
        let flag = match self.stat(&mut st, !physical) {
            Ok(()) if is_kind(&st, libc::S_IFDIR) => FTW_D,
            Ok(()) if is_kind(&st, libc::S_IFLNK) => FTW_SL,
            Ok(()) => FTW_F,
            Err(errno) if errno != libc::EACCES && errno != libc::ENOENT => return Err(errno),
            Err(_) if physical => FTW_NS,
            Err(_) => {
                // A dangling symlink: the function sees the link's own stat.
                if self.stat(&mut st, false).is_ok() && is_kind(&st, libc::S_IFLNK) {
                    FTW_SLN
                } else {
                    st = zeroed_stat();
                    FTW_NS
                }
            }
        };
        let mut result = 0;
        if flag == FTW_NS || !self.flag(FTW_MOUNT) || st.st_dev == self.dev {
            if flag == FTW_D {
                if physical || self.known.insert((st.st_dev, st.st_ino)) {
                    result = self.directory(&st, false)?;
                }
            } else {
                result = self.report(&st, flag);
            }
        }
        if self.flag(FTW_ACTIONRETVAL) && result == FTW_SKIP_SUBTREE {
            result = 0;
        }
        Ok(result)
    }

    /// A directory (glibc's ftw_dir): FTW_D (or FTW_DNR when it cannot be read), its entries,
    /// FTW_DP under FTW_DEPTH; `top` for the starting point.
    fn directory(&mut self, st: &Stat, top: bool) -> Res<c_int> {
        let names = match self.read_directory() {
            Ok(names) => names,
            Err(libc::EACCES) => return Ok(self.report(st, FTW_DNR)),
            Err(errno) => return Err(errno),
        };
        if !self.flag(FTW_DEPTH) {
            let result = self.report(st, FTW_D);
            if result != 0 {
                return Ok(result);
            }
        }
        if self.flag(FTW_CHDIR) {
            Self::chdir(self.name())?;
        }
        let previous_base = self.ftw.base;
        let end = self.end();
        self.ftw.level += 1;
        if self.path[..end].last() != Some(&b'/') {
            self.set_path(end, b"/")?;
        }
        self.ftw.base = self.end() as c_int;
        let mut result = 0;
        for name in &names {
            result = self.entry(name)?;
            if result != 0 {
                break;
            }
        }
        if self.flag(FTW_ACTIONRETVAL) && result == FTW_SKIP_SIBLINGS {
            result = 0;
        }
        self.set_path(end, b"")?;
        self.ftw.level -= 1;
        self.ftw.base = previous_base;
        if result == 0 && self.flag(FTW_DEPTH) {
            result = self.report(st, FTW_DP);
        }
        let go_on = result == 0 || (self.flag(FTW_ACTIONRETVAL) && result != -1 && result != FTW_STOP);
        if !top && self.flag(FTW_CHDIR) && go_on {
            Self::chdir(if self.ftw.base == 1 { c"/".as_ptr() } else { c"..".as_ptr() })?;
        }
        Ok(result)
    }
}

/// The working directory a FTW_CHDIR walk started in, given back at its end (errno kept).
struct StartDirectory(c_int);

impl StartDirectory {
    fn open() -> Res<StartDirectory> {
        // SAFETY: a NUL-terminated path (a mapped working directory opens a mapped descriptor).
        match unsafe { hooks_fd::open(c".".as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC, 0) } {
            fd if fd >= 0 => Ok(StartDirectory(fd)),
            _ => Err(crate::errno()),
        }
    }
}

impl Drop for StartDirectory {
    fn drop(&mut self) {
        let errno = crate::errno();
        // SAFETY: the descriptor opened by `open`, closed once.
        unsafe {
            hooks_path::fchdir(self.0);
            hooks_fd::close(self.0);
        }
        crate::set_errno(errno);
    }
}

/// A walk from `start` (glibc's ftw_startup): trailing slashes dropped, the function called
/// with the hooks engaged; the function's first non-zero answer ends the walk and is
/// returned; -1 with errno when the walk itself fails.
///
/// # Safety
/// `start` is NUL-terminated.
unsafe fn walk(start: *const c_char, callback: Callback, flags: c_int) -> Res<c_int> {
    // SAFETY: the caller's path.
    let bytes = unsafe { CStr::from_ptr(start) }.to_bytes();
    let mut end = bytes.len();
    while end > 1 && bytes[end - 1] == b'/' {
        end -= 1;
    }
    let base = bytes[..end].iter().rposition(|&b| b == b'/').map_or(0, |slash| slash + 1);
    let mut walk = Walk { callback, flags, path: Vec::new(), ftw: Ftw { base: base as c_int, level: 0 }, dev: 0, known: HashSet::new() };
    walk.set_path(0, &bytes[..end])?;
    let _start_directory = if flags & FTW_CHDIR != 0 {
        let start_directory = StartDirectory::open()?;
        // To the directory the starting point is in.
        if base == 1 {
            Walk::chdir(c"/".as_ptr())?;
        } else if base > 1 {
            let mut parent = bytes[..base - 1].to_vec();
            parent.push(0);
            Walk::chdir(parent.as_ptr().cast())?;
        }
        Some(start_directory)
    } else {
        None
    };
    walk.start()
}

/// Whether a walk from `path` is the shim's: a mapped path (an empty one is libc's ENOENT).
///
/// # Safety
/// `path` is NULL or NUL-terminated.
unsafe fn mapped_start(path: *const c_char) -> bool {
    // SAFETY: the caller's path.
    !path.is_null() && unsafe { *path } != 0 && unsafe { paths::classify(libc::AT_FDCWD, path) }.is_some()
}

/// nftw and nftw64 on a mapped path.
///
/// # Safety
/// `path` is NUL-terminated; `function` is a C function of its type.
unsafe fn nftw_mapped(what: &str, path: *const c_char, function: Option<NftwFn>, flags: c_int) -> c_int {
    crate::guarded(what, || {
        let function = function.ok_or(libc::EINVAL)?;
        if flags & !(FTW_PHYS | FTW_MOUNT | FTW_CHDIR | FTW_DEPTH | FTW_ACTIONRETVAL) != 0 {
            return Err(libc::EINVAL);
        }
        // SAFETY: the caller's path.
        unsafe { walk(path, Callback::Nftw(function), flags) }
    })
}

/// ftw and ftw64 on a mapped path: nftw with no flags (symlinks followed), ftw's typeflags.
///
/// # Safety
/// As `nftw_mapped`.
unsafe fn ftw_mapped(what: &str, path: *const c_char, function: Option<FtwFn>) -> c_int {
    crate::guarded(what, || {
        let function = function.ok_or(libc::EINVAL)?;
        // SAFETY: the caller's path.
        unsafe { walk(path, Callback::Ftw(function), 0) }
    })
}

#[no_mangle]
pub unsafe extern "C" fn nftw(path: *const c_char, function: Option<NftwFn>, descriptors: c_int, flags: c_int) -> c_int {
    // SAFETY: the caller's arguments.
    if unsafe { mapped_start(path) } {
        return unsafe { nftw_mapped("nftw", path, function, flags) };
    }
    pass!(nftw: unsafe extern "C" fn(*const c_char, Option<NftwFn>, c_int, c_int) -> c_int; path, function, descriptors, flags)
}

#[no_mangle]
pub unsafe extern "C" fn nftw64(path: *const c_char, function: Option<NftwFn>, descriptors: c_int, flags: c_int) -> c_int {
    // SAFETY: the caller's arguments.
    if unsafe { mapped_start(path) } {
        return unsafe { nftw_mapped("nftw64", path, function, flags) };
    }
    pass!(nftw64: unsafe extern "C" fn(*const c_char, Option<NftwFn>, c_int, c_int) -> c_int; path, function, descriptors, flags)
}

#[no_mangle]
pub unsafe extern "C" fn ftw(path: *const c_char, function: Option<FtwFn>, descriptors: c_int) -> c_int {
    // SAFETY: the caller's arguments.
    if unsafe { mapped_start(path) } {
        return unsafe { ftw_mapped("ftw", path, function) };
    }
    pass!(ftw: unsafe extern "C" fn(*const c_char, Option<FtwFn>, c_int) -> c_int; path, function, descriptors)
}

#[no_mangle]
pub unsafe extern "C" fn ftw64(path: *const c_char, function: Option<FtwFn>, descriptors: c_int) -> c_int {
    // SAFETY: the caller's arguments.
    if unsafe { mapped_start(path) } {
        return unsafe { ftw_mapped("ftw64", path, function) };
    }
    pass!(ftw64: unsafe extern "C" fn(*const c_char, Option<FtwFn>, c_int) -> c_int; path, function, descriptors)
}
