//! libchunkpreload: the file layer inside an unmodified binary, through LD_PRELOAD, with no
//! mount. Paths under a mapped prefix (`CHUNKSTORE_MAP=/data=VOLUME`) are files of a chunkstore
//! volume, through the same `chunkfiles::Volume` model as chunkfs (same records: a volume
//! written here reads the same through a mount); every other path and descriptor goes to libc
//! untouched.
//!
//! How a call travels: the exported hook (`hooks_*.rs`) asks `table` whether its descriptor or
//! `paths` whether its path is mapped; if not, it calls the next definition of the symbol
//! (libc's, found with `dlsym(RTLD_NEXT)`, `real.rs`). If so, it runs the shim's code under
//! `shim()`, which turns an errno into `-1`/NULL and a panic into EIO.
//!
//! Invariants:
//! - **Nothing unmapped changes**: before the library is initialised, with no mapping, inside
//!   the shim's own code (the client's sockets, its threads' files) and for every descriptor
//!   or path not mapped, a hook calls libc's function with the caller's arguments.
//! - **No Rust panic crosses into C**: every hook body runs under `catch_unwind`; a panic
//!   fails the call with EIO and one line on stderr.
//! - **A mapped descriptor is a real kernel descriptor** (a placeholder memfd naming its file,
//!   `placeholder.rs`), so the kernel never hands its number out to another open, and one
//!   the application lets survive exec works in the program it execs.
//! - **Every write is committed to device on a quorum before it returns** (the default
//!   durability), exactly as through chunkfs: the same `Volume` calls.

mod config;
mod dirs;
mod files;
mod hooks_fd;
mod hooks_path;
mod hooks_stdio;
mod paths;
mod placeholder;
mod real;
mod state;
mod table;
mod walk;

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};

/// Not initialised yet: every hook passes through.
const UNINIT: u8 = 0;
/// Initialised with no mapping: the library does nothing.
const INACTIVE: u8 = 1;
/// Initialised with mappings.
const ACTIVE: u8 = 2;

static STATUS: AtomicU8 = AtomicU8::new(UNINIT);

thread_local! {
    /// Set while this thread runs the shim's own code: every hook it reaches passes through.
    static IN_SHIM: Cell<bool> = const { Cell::new(false) };
}

/// Whether hooks on this thread should look at their arguments at all.
#[inline]
pub(crate) fn engaged() -> bool {
    STATUS.load(Ordering::Acquire) == ACTIVE && !IN_SHIM.with(Cell::get)
}

/// An errno a shim operation fails with.
pub(crate) type Errno = i32;
pub(crate) type Res<T> = Result<T, Errno>;

pub(crate) fn set_errno(errno: Errno) {
    // SAFETY: glibc's thread-local errno.
    unsafe { *libc::__errno_location() = errno };
}

/// What a failed call returns to C: -1 or NULL (errno carries why).
pub(crate) trait Failed {
    fn failed() -> Self;
}
impl Failed for libc::c_int {
    fn failed() -> Self {
        -1
    }
}
impl Failed for libc::ssize_t {
    fn failed() -> Self {
        -1
    }
}
impl Failed for i64 {
    fn failed() -> Self {
        -1
    }
}
impl<T> Failed for *mut T {
    fn failed() -> Self {
        std::ptr::null_mut()
    }
}

/// Runs the shim's code for one mapped call: hooks reached from inside pass through, an Err
/// sets errno and returns -1 (or NULL), a panic becomes EIO with one line on stderr.
pub(crate) fn shim<T: Failed>(what: &str, body: impl FnOnce() -> Res<T>) -> T {
    let outer = IN_SHIM.with(|flag| flag.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
    IN_SHIM.with(|flag| flag.set(outer));
    answer(what, result)
}

/// Runs shim code that calls back into the application (scandir's filter and compar, nftw's
/// function) and reaches mapped paths through the hooks themselves: unlike `shim`, hooks stay
/// engaged, so the callback's own calls on mapped paths are served. An Err sets errno and
/// returns -1 (or NULL), a panic becomes EIO with one line on stderr.
pub(crate) fn guarded<T: Failed>(what: &str, body: impl FnOnce() -> Res<T>) -> T {
    answer(what, std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)))
}

/// What C gets from a shim body's outcome.
fn answer<T: Failed>(what: &str, result: std::thread::Result<Res<T>>) -> T {
    match result {
        Ok(Ok(value)) => value,
        Ok(Err(errno)) => {
            set_errno(errno);
            T::failed()
        }
        Err(_) => {
            log(&format!("{what} panicked (a bug in libchunkpreload): answered EIO"));
            set_errno(libc::EIO);
            T::failed()
        }
    }
}

/// errno as the last failed call left it.
pub(crate) fn errno() -> Errno {
    // SAFETY: glibc's thread-local errno.
    unsafe { *libc::__errno_location() }
}

/// Runs shim code that returns an errno (or 0) instead of setting it (posix_fallocate).
pub(crate) fn shim_errno(what: &str, body: impl FnOnce() -> Res<()>) -> libc::c_int {
    let rc: libc::c_int = shim(what, || body().map(|()| 0));
    if rc == 0 {
        0
    } else {
        // SAFETY: glibc's thread-local errno, set by `shim`.
        unsafe { *libc::__errno_location() }
    }
}

/// One line on stderr, written straight to descriptor 2 (no stdio, no allocation past the
/// line itself).
pub(crate) fn log(message: &str) {
    let line = format!("libchunkpreload: {message}\n");
    thread_local! {
        static LOGGING: Cell<bool> = const { Cell::new(false) };
    }
    // Standard error moved onto a mapped file (`2> /data/log`, freopen): the line goes to that
    // file through the file layer (its placeholder refuses writes). A line logged while doing
    // so goes to the placeholder and is lost rather than looping.
    if let Some(d) = table::mapped_now(2) {
        if !LOGGING.with(|flag| flag.replace(true)) {
            let written: libc::c_int = shim("log", || files::write(&d.file, line.as_bytes()).map(|_| 1));
            LOGGING.with(|flag| flag.set(false));
            if written == 1 {
                return;
            }
        }
    }
    // SAFETY: a valid buffer of its length; a failed write of a log line is ignored.
    unsafe { real::write(2, line.as_ptr().cast(), line.len()) };
}

/// The constructor: reads the configuration before `main` (a bad one is one line on stderr
/// and exit status 1), then arms the hooks. Connecting waits for the first mapped call.
extern "C" fn init() {
    let outer = IN_SHIM.with(|flag| flag.replace(true));
    let status = match config::Config::from_env() {
        Ok(None) => INACTIVE,
        Ok(Some(config)) => {
            state::install(config);
            ACTIVE
        }
        Err(err) => {
            log(&format!("{err}"));
            // SAFETY: ends the process before main, as a bad configuration must.
            unsafe { libc::_exit(1) };
        }
    };
    IN_SHIM.with(|flag| flag.set(outer));
    STATUS.store(status, Ordering::Release);
}

#[used]
#[link_section = ".init_array"]
static INIT: extern "C" fn() = init;
