//! libc's own definitions of the hooked symbols: `dlsym(RTLD_NEXT, name)`, looked up once.
//!
//! A symbol libc does not export under its plain name (glibc 2.33 made `__xstat` and its
//! family compat-only, so dlsym does not find them) is not called through here: those hooks
//! pass through to `stat`/`fstatat` instead (`hooks_path.rs`).

use libc::{c_char, c_int, c_void, size_t, ssize_t};

/// `real!(name: unsafe extern "C" fn(ARGS) -> RET)`: libc's `name`, or None if no library
/// after this one defines it.
macro_rules! real {
    ($name:ident : $ty:ty) => {{
        static ADDRESS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let mut address = ADDRESS.load(std::sync::atomic::Ordering::Relaxed);
        if address == 0 {
            // SAFETY: a NUL-terminated symbol name.
            #[allow(unused_unsafe)]
            let found = unsafe { libc::dlsym(libc::RTLD_NEXT, concat!(stringify!($name), "\0").as_ptr().cast()) } as usize;
            address = found;
            ADDRESS.store(address, std::sync::atomic::Ordering::Relaxed);
        }
        // SAFETY: the symbol libc defines under this name has this C signature.
        #[allow(unused_unsafe)]
        let function = (address != 0).then(|| unsafe { std::mem::transmute::<usize, $ty>(address) });
        function
    }};
}
pub(crate) use real;

/// Calls libc's `name` with the arguments, or fails with ENOSYS when there is none:
/// `pass!(name: TYPE; args...)`.
macro_rules! pass {
    ($name:ident : $ty:ty ; $($arg:expr),* $(,)?) => {{
        #[allow(unused_unsafe)]
        let result = match $crate::real::real!($name: $ty) {
            // SAFETY: the caller's own arguments, handed on unchanged.
            Some(f) => unsafe { f($($arg),*) },
            None => {
                $crate::set_errno(libc::ENOSYS);
                $crate::Failed::failed()
            }
        };
        result
    }};
}
pub(crate) use pass;

pub(crate) unsafe fn write(fd: c_int, buf: *const c_void, count: size_t) -> ssize_t {
    pass!(write: unsafe extern "C" fn(c_int, *const c_void, size_t) -> ssize_t; fd, buf, count)
}

pub(crate) unsafe fn close(fd: c_int) -> c_int {
    pass!(close: unsafe extern "C" fn(c_int) -> c_int; fd)
}

pub(crate) unsafe fn open(path: *const c_char, flags: c_int, mode: libc::mode_t) -> c_int {
    pass!(open: unsafe extern "C" fn(*const c_char, c_int, libc::mode_t) -> c_int; path, flags, mode)
}

pub(crate) unsafe fn fcntl(fd: c_int, cmd: c_int, arg: libc::c_ulong) -> c_int {
    pass!(fcntl: unsafe extern "C" fn(c_int, c_int, libc::c_ulong) -> c_int; fd, cmd, arg)
}
