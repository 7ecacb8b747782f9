//! The mapped descriptors: kernel descriptor number → the open file it names. Descriptors made
//! by dup share one `OpenFile` (its offset and status flags), as they share an open file
//! description in the kernel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use chunkfiles::Kind;
use parking_lot::{Mutex, RwLock};

use crate::placeholder::{self, OffsetPage};

/// An open file (or directory) of a mapped volume: one open file description.
pub(crate) struct OpenFile {
    /// This process's id for it: the owner of its OFD and flock locks.
    pub id: u64,
    /// Which mapping (`Config::maps`) it belongs to.
    pub mapping: usize,
    pub ino: u64,
    pub kind: Kind,
    /// The absolute path it was opened by (dirfd-relative calls start from it).
    pub path: String,
    /// O_ACCMODE and the status flags F_SETFL changes (O_APPEND, O_NONBLOCK, O_DIRECT, ...).
    pub flags: AtomicI32,
    /// The file offset (in the placeholder's shared page: shared with forked children and
    /// handed to a program this one execs); held through a read or write that moves it.
    pub offset: Mutex<OffsetPage>,
    /// The lease session it was opened under (`Volume::open_session`).
    pub session: Option<u64>,
    /// Commit failures of the file already reported to this description (by fsync).
    pub failures_seen: AtomicU64,
}

impl OpenFile {
    pub fn flags(&self) -> i32 {
        self.flags.load(Ordering::Relaxed)
    }

    pub fn readable(&self) -> bool {
        matches!(self.flags() & libc::O_ACCMODE, libc::O_RDONLY | libc::O_RDWR)
    }

    pub fn writable(&self) -> bool {
        matches!(self.flags() & libc::O_ACCMODE, libc::O_WRONLY | libc::O_RDWR)
    }
}

/// A mapped descriptor: its open file (its close-on-exec flag is the placeholder's own, in
/// the kernel).
#[derive(Clone)]
pub(crate) struct Descriptor {
    pub file: Arc<OpenFile>,
}

static TABLE: RwLock<Option<HashMap<i32, Descriptor>>> = RwLock::new(None);
/// How many descriptors are mapped: hooks on other descriptors skip the table when none is.
static MAPPED: AtomicUsize = AtomicUsize::new(0);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
/// The process whose table this is (set at start and in a fork's child).
static OWNER: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

pub(crate) fn set_owner() {
    // SAFETY: a plain getter.
    OWNER.store(unsafe { libc::getpid() }, Ordering::Relaxed);
}

/// Whether this process owns the table: false in the child of vfork or posix_spawn, which
/// shares the parent's memory until it execs (its closes must not change the parent's table;
/// its own descriptor table is a copy, so the kernel's closes there are its own).
pub(crate) fn owned_here() -> bool {
    // SAFETY: a plain getter (a system call: glibc caches no pid).
    OWNER.load(Ordering::Relaxed) == unsafe { libc::getpid() }
}

pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// The open file behind `fd`, if it is mapped (and hooks are engaged on this thread).
#[inline]
pub(crate) fn mapped(fd: i32) -> Option<Descriptor> {
    if fd < 0 || MAPPED.load(Ordering::Acquire) == 0 || !crate::engaged() {
        return None;
    }
    TABLE.read().as_ref()?.get(&fd).cloned()
}

/// The open file behind `fd`, from the shim's own code (where hooks are not engaged).
pub(crate) fn mapped_in_shim(fd: i32) -> Option<Descriptor> {
    TABLE.read().as_ref()?.get(&fd).cloned()
}

/// The open file behind `fd` if the table can be read without waiting (for log lines, which
/// may be written while this thread holds the table).
pub(crate) fn mapped_now(fd: i32) -> Option<Descriptor> {
    if MAPPED.load(Ordering::Acquire) == 0 {
        return None;
    }
    TABLE.try_read()?.as_ref()?.get(&fd).cloned()
}

/// Whether any mapped descriptor is open (close_range, closefrom).
pub(crate) fn any_mapped() -> bool {
    MAPPED.load(Ordering::Acquire) != 0 && crate::engaged()
}

/// Records `fd` (a placeholder just opened) as naming `file`.
pub(crate) fn insert(fd: i32, descriptor: Descriptor) {
    let mut table = TABLE.write();
    if table.get_or_insert_with(HashMap::new).insert(fd, descriptor).is_none() {
        MAPPED.fetch_add(1, Ordering::AcqRel);
    }
}

/// Forgets `fd`; the descriptor it named, if mapped.
pub(crate) fn remove(fd: i32) -> Option<Descriptor> {
    let removed = TABLE.write().as_mut()?.remove(&fd);
    if removed.is_some() {
        MAPPED.fetch_sub(1, Ordering::AcqRel);
    }
    removed
}

/// Mapped descriptors in [first, last].
pub(crate) fn in_range(first: u32, last: u32) -> Vec<i32> {
    let table = TABLE.read();
    let Some(table) = table.as_ref() else { return Vec::new() };
    table.keys().copied().filter(|&fd| fd as u32 >= first && fd as u32 <= last).collect()
}

/// Whether a descriptor of mapping `mapping` names inode `ino` now (orphans this process holds
/// open are renewed, `state::start_reaper`).
pub(crate) fn holds(mapping: usize, ino: u64) -> bool {
    TABLE.read().as_ref().is_some_and(|t| t.values().any(|d| d.file.mapping == mapping && d.file.ino == ino))
}

/// How many descriptors name `file` now.
pub(crate) fn references(file: &Arc<OpenFile>) -> usize {
    TABLE.read().as_ref().map_or(0, |t| t.values().filter(|d| Arc::ptr_eq(&d.file, file)).count())
}

pub(crate) fn before_fork() {
    std::mem::forget(TABLE.write());
    crate::dirs::before_fork();
}

/// After fork, in both processes. The child copies each open file (one copy per open file,
/// so descriptors that shared one still do): their offset locks may have been held by a
/// thread that does not exist in the child. The copies use the same offset pages (inherited
/// mappings); the parent's structures are forgotten in the child, never dropped (dropping
/// would unmap those pages).
pub(crate) fn after_fork(child: bool) {
    crate::dirs::after_fork();
    // SAFETY: locked by `before_fork` on this thread, its guard forgotten.
    unsafe { TABLE.force_unlock_write() };
    if !child {
        return;
    }
    set_owner();
    let mut table = TABLE.write();
    let Some(table) = table.as_mut() else { return };
    let old = std::mem::take(table);
    let mut copies: HashMap<*const OpenFile, Arc<OpenFile>> = HashMap::new();
    for (&fd, descriptor) in &old {
        let file = &descriptor.file;
        let copy = copies.entry(Arc::as_ptr(file)).or_insert_with(|| {
            // SAFETY: the child has one thread; whoever held the lock is gone.
            let page = unsafe { &*file.offset.data_ptr() }.share();
            Arc::new(OpenFile {
                id: file.id,
                mapping: file.mapping,
                ino: file.ino,
                kind: file.kind,
                path: file.path.clone(),
                flags: AtomicI32::new(file.flags()),
                offset: Mutex::new(page),
                session: None,
                failures_seen: AtomicU64::new(0),
            })
        });
        table.insert(fd, Descriptor { file: copy.clone() });
    }
    std::mem::forget(old);
}

/// At start: takes over the placeholders a program that exec'd this one left open (the
/// descriptors it let survive exec), for the mappings this process has too.
pub(crate) fn adopt_inherited() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else { return };
    let fds: Vec<i32> = entries.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect();
    let config = crate::state::config();
    let mut by_inode: HashMap<u64, Arc<OpenFile>> = HashMap::new();
    for fd in fds {
        let Some((description, page, inode)) = placeholder::read(fd) else { continue };
        let Some(mapped) = crate::paths::map_absolute(description.path.clone()) else { continue };
        if config.maps[mapped.mapping].1 != description.volume {
            continue;
        }
        let file = by_inode.entry(inode).or_insert_with(|| {
            Arc::new(OpenFile {
                id: next_id(),
                mapping: mapped.mapping,
                ino: description.ino,
                kind: description.kind,
                path: description.path,
                flags: AtomicI32::new(description.flags),
                offset: Mutex::new(page),
                session: None,
                failures_seen: AtomicU64::new(0),
            })
        });
        insert(fd, Descriptor { file: file.clone() });
        crate::hooks_stdio::adopt_standard_stream(fd);
    }
}
