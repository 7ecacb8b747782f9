//! The kernel descriptor behind each mapped descriptor: a small memfd that says which file of
//! which volume it stands for, and holds the file offset in a shared page.
//!
//! Why a memfd and not /dev/null: the descriptor must outlive exec when the application lets
//! it (a shell's `prog < /data/file` or `prog > /data/file` opens, moves the descriptor to 0 or
//! 1 and execs). The new program's copy of the library finds it in /proc/self/fd by its name
//! and reads the file, volume and flags back (`adopt_inherited`); the offset, in a page both
//! processes map, is shared as the kernel shares an open file description's (across fork too).
//! In a process without the library the descriptor reads as empty and refuses writes (it is
//! open read-only, positioned at its end), so nothing written through it is silently lost.

use std::ffi::CString;
use std::sync::atomic::{AtomicU64, Ordering};

use chunkfiles::Kind;
use libc::c_int;

use crate::Res;

/// The memfd's name (shown as "/memfd:NAME (deleted)" in /proc/self/fd).
const NAME: &str = "chunkstore-fd";
const MAGIC: &str = "chunkstore-fd 1";
/// The memfd's size: the offset page, then the description.
const SIZE: usize = 16 << 10;
const PAGE: usize = 4096;

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// The shared page holding a description's file offset (unmapped when dropped).
pub(crate) struct OffsetPage(*mut AtomicU64);

// SAFETY: the page is only touched through the atomic.
unsafe impl Send for OffsetPage {}
// SAFETY: as above.
unsafe impl Sync for OffsetPage {}

impl OffsetPage {
    pub fn get(&self) -> u64 {
        // SAFETY: a live mapping of at least 8 bytes.
        unsafe { (*self.0).load(Ordering::Acquire) }
    }

    pub fn set(&self, offset: u64) {
        // SAFETY: as above.
        unsafe { (*self.0).store(offset, Ordering::Release) }
    }

    /// Maps the offset page of memfd `fd` (open for writing).
    fn map(fd: c_int) -> Res<OffsetPage> {
        // SAFETY: a new shared mapping of the memfd's first page.
        let page = unsafe { libc::mmap(std::ptr::null_mut(), PAGE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) };
        if page == libc::MAP_FAILED {
            return Err(last_errno());
        }
        Ok(OffsetPage(page.cast()))
    }

    /// Another handle on the same page, for a forked child's copy of its open file (the child
    /// inherited the mapping; the parent's handle is forgotten there, never dropped).
    pub fn share(&self) -> OffsetPage {
        OffsetPage(self.0)
    }
}

impl Drop for OffsetPage {
    fn drop(&mut self) {
        // SAFETY: the mapping made by `map`.
        unsafe { libc::munmap(self.0.cast(), PAGE) };
    }
}

/// What a placeholder says of its file.
pub(crate) struct Description {
    pub volume: String,
    pub ino: u64,
    pub kind: Kind,
    pub flags: i32,
    pub path: String,
}

fn kind_code(kind: Kind) -> u8 {
    match kind {
        Kind::File => 0,
        Kind::Dir => 1,
        Kind::Symlink => 2,
        Kind::Fifo => 3,
        Kind::Socket => 4,
        Kind::CharDevice => 5,
        Kind::BlockDevice => 6,
    }
}

fn kind_of(code: u8) -> Option<Kind> {
    Some(match code {
        0 => Kind::File,
        1 => Kind::Dir,
        2 => Kind::Symlink,
        3 => Kind::Fifo,
        4 => Kind::Socket,
        5 => Kind::CharDevice,
        6 => Kind::BlockDevice,
        _ => return None,
    })
}

/// Reopens `/proc/self/fd/FD` with `flags`.
fn reopen(fd: c_int, flags: c_int) -> Res<c_int> {
    let path = CString::new(format!("/proc/self/fd/{fd}")).map_err(|_| libc::EINVAL)?;
    // SAFETY: a NUL-terminated path.
    let new = unsafe { crate::real::open(path.as_ptr(), flags, 0) };
    if new < 0 {
        return Err(last_errno());
    }
    Ok(new)
}

/// A new placeholder for `description`, close-on-exec as asked, with its offset page.
pub(crate) fn create(description: &Description, cloexec: bool) -> Res<(c_int, OffsetPage)> {
    let text = format!("{MAGIC}\n{}\n{}\n{}\n{}\n{}\n", description.volume, description.ino, kind_code(description.kind), description.flags, description.path);
    if PAGE + text.len() > SIZE {
        return Err(libc::ENAMETOOLONG);
    }
    let name = CString::new(NAME).map_err(|_| libc::EINVAL)?;
    // SAFETY: a NUL-terminated name.
    let memfd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if memfd < 0 {
        return Err(last_errno());
    }
    let made = (|| {
        // SAFETY: our own memfd; a buffer of its length.
        unsafe {
            if libc::ftruncate(memfd, SIZE as i64) != 0 || libc::pwrite(memfd, text.as_ptr().cast(), text.len(), PAGE as i64) != text.len() as isize {
                return Err(last_errno());
            }
        }
        let page = OffsetPage::map(memfd)?;
        // What the application holds is read-only: a process without the library cannot write
        // into the placeholder believing it wrote the file.
        let fd = reopen(memfd, libc::O_RDONLY | if cloexec { libc::O_CLOEXEC } else { 0 })?;
        // SAFETY: our descriptor; at its end, it reads as empty.
        unsafe { libc::lseek(fd, SIZE as i64, libc::SEEK_SET) };
        Ok((fd, page))
    })();
    // SAFETY: our memfd (the mapping and the reopened descriptor keep the file).
    unsafe { crate::real::close(memfd) };
    made
}

/// Whether `fd` is a placeholder, and what it says (for a new program after exec).
pub(crate) fn read(fd: c_int) -> Option<(Description, OffsetPage, u64)> {
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    if !link.to_str()?.starts_with(&format!("/memfd:{NAME}")) {
        return None;
    }
    let mut text = vec![0u8; SIZE - PAGE];
    // SAFETY: our buffer of its length.
    let n = unsafe { libc::pread(fd, text.as_mut_ptr().cast(), text.len(), PAGE as i64) };
    let text = String::from_utf8(text[..usize::try_from(n).ok()?].to_vec()).ok()?;
    let mut lines = text.lines();
    if lines.next()? != MAGIC {
        return None;
    }
    let volume = lines.next()?.to_owned();
    let ino = lines.next()?.parse().ok()?;
    let kind = kind_of(lines.next()?.parse().ok()?)?;
    let flags = lines.next()?.parse().ok()?;
    let path = lines.next()?.to_owned();
    let writable = reopen(fd, libc::O_RDWR | libc::O_CLOEXEC).ok()?;
    let page = OffsetPage::map(writable);
    // SAFETY: the descriptor just opened.
    unsafe { crate::real::close(writable) };
    let mut stat: libc::stat64 = unsafe { std::mem::zeroed() };
    // SAFETY: our buffer; the placeholder's identity groups descriptors of one description.
    if unsafe { libc::fstat64(fd, &mut stat) } != 0 {
        return None;
    }
    Some((Description { volume, ino, kind, flags, path }, page.ok()?, stat.st_ino))
}
