//! Which paths are mapped, and what they name inside their volume.
//!
//! A path is made absolute (from the working directory, or from a mapped directory
//! descriptor for the *at calls), normalised lexically ("." and ".." and repeated '/'
//! removed), then matched against the mapped prefixes, longest first. Inside a volume it is
//! walked from the root, following symlinks (at most `SYMLINKS_MAX`): a relative target
//! continues inside the volume, an absolute one is mapped again, and may leave it (the call
//! then passes to libc with that path).

use std::ffi::CStr;

use chunkfiles::{Attr, FsError, Kind, Volume, ROOT_INO};
use libc::c_char;

use crate::{state, table, Res};

/// Most symlinks one walk follows (Linux's limit): ELOOP past it.
const SYMLINKS_MAX: usize = 40;
/// The longest path accepted (PATH_MAX).
const PATH_BYTES_MAX: usize = 4096;

/// `path` made absolute-free of ".", ".." and empty components: "/a/b".
pub fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    format!("/{}", parts.join("/"))
}

/// A path the shim serves: mapping `mapping`, and the path inside the volume ("/" its root).
#[derive(Clone, Debug)]
pub(crate) struct Mapped {
    pub mapping: usize,
    /// The whole absolute path, as the application named it (normalised).
    pub full: String,
    pub inner: String,
    /// The path named a mapped prefix, then left it with ".." ("/data/vol/.."): it names
    /// `full`, outside the volume (calls that follow paths hand it to libc).
    pub escaped: bool,
}

/// Which mapping an absolute, normalised path falls under.
pub(crate) fn map_absolute(full: String) -> Option<Mapped> {
    let config = state::config();
    for (index, (prefix, _)) in config.maps.iter().enumerate() {
        if full == *prefix {
            return Some(Mapped { mapping: index, full, inner: "/".into(), escaped: false });
        }
        if full.starts_with(prefix.as_str()) && full.as_bytes()[prefix.len()] == b'/' {
            let inner = full[prefix.len()..].to_owned();
            return Some(Mapped { mapping: index, full, inner, escaped: false });
        }
    }
    None
}

/// The mapped path `path` names relative to `dirfd` (AT_FDCWD or a descriptor), if it is one.
/// Paths that are not UTF-8 and paths relative to an unmapped descriptor are not mapped.
///
/// # Safety
/// `path` is NULL or NUL-terminated.
pub(crate) unsafe fn classify(dirfd: i32, path: *const c_char) -> Option<Mapped> {
    if path.is_null() || !crate::engaged() {
        return None;
    }
    // SAFETY: the caller's NUL-terminated path.
    let text = unsafe { CStr::from_ptr(path) }.to_str().ok()?;
    if text.len() > PATH_BYTES_MAX {
        return None;
    }
    let raw = if text.starts_with('/') {
        text.to_owned()
    } else if dirfd == libc::AT_FDCWD {
        format!("{}/{text}", working_directory()?)
    } else {
        let dir = table::mapped(dirfd)?;
        format!("{}/{text}", dir.file.path)
    };
    let full = normalize(&raw);
    map_absolute(full.clone()).or_else(|| {
        // "/data/vol/.." and the like: through a mapped prefix, then out of it.
        let through = raw.split('/').scan(String::new(), |path, part| {
            if !part.is_empty() && part != "." && part != ".." {
                path.push('/');
                path.push_str(part);
            }
            Some(map_absolute(path.clone()))
        });
        through.flatten().next().map(|m| Mapped { mapping: m.mapping, full, inner: "/".into(), escaped: true })
    })
}

/// The working directory when it is a mapped directory (chdir into a volume changes only
/// this: the kernel's stays where it was, and every relative path is resolved here first).
static VIRTUAL_CWD: parking_lot::RwLock<Option<String>> = parking_lot::RwLock::new(None);

pub(crate) fn virtual_cwd() -> Option<String> {
    VIRTUAL_CWD.read().clone()
}

pub(crate) fn set_virtual_cwd(path: Option<String>) {
    *VIRTUAL_CWD.write() = path;
}

/// The working directory: the mapped one chdir moved into, or the kernel's.
fn working_directory() -> Option<String> {
    if let Some(path) = virtual_cwd() {
        return Some(path);
    }
    std::env::current_dir().ok()?.to_str().map(str::to_owned)
}

/// Where a walk ended.
pub(crate) enum Walked {
    /// The path names this inode.
    Found(Attr),
    /// Its last component does not exist; its parent directory does (a create can make it).
    Missing { parent: u64, name: String },
    /// A symlink led out of the volume: the absolute path to hand libc instead.
    Outside(String),
}

/// Walks `inner` (absolute inside the volume) from the root; the final component's symlink
/// is followed when `follow`.
pub(crate) fn walk(volume: &Volume, mapping: usize, inner: &str, follow: bool) -> Res<Walked> {
    let mut pending: Vec<String> = inner.split('/').filter(|p| !p.is_empty()).rev().map(str::to_owned).collect();
    let mut dir = ROOT_INO;
    let mut stack: Vec<u64> = Vec::new();
    let mut followed = 0;
    let mut current = volume.getattr(ROOT_INO).map_err(crate::files::errno)?;
    while let Some(part) = pending.pop() {
        if part == "." {
            continue;
        }
        if part == ".." {
            dir = stack.pop().unwrap_or(ROOT_INO);
            current = volume.getattr(dir).map_err(crate::files::errno)?;
            continue;
        }
        if current.kind != Kind::Dir {
            return Err(libc::ENOTDIR);
        }
        let attr = match volume.lookup(dir, part.as_bytes()) {
            Ok(attr) => attr,
            Err(FsError::NotFound) if pending.is_empty() => return Ok(Walked::Missing { parent: dir, name: part }),
            Err(err) => return Err(err.errno()),
        };
        if attr.kind == Kind::Symlink && (follow || !pending.is_empty()) {
            followed += 1;
            if followed > SYMLINKS_MAX {
                return Err(libc::ELOOP);
            }
            let target = volume.readlink(attr.ino).map_err(crate::files::errno)?;
            let target = String::from_utf8(target).map_err(|_| libc::EINVAL)?;
            if target.starts_with('/') {
                let rest: Vec<String> = pending.iter().rev().cloned().collect();
                let whole = normalize(&format!("{target}/{}", rest.join("/")));
                return match map_absolute(whole.clone()) {
                    Some(m) if m.mapping == mapping => walk(volume, mapping, &m.inner, follow),
                    _ => Ok(Walked::Outside(whole)),
                };
            }
            pending.extend(target.split('/').filter(|p| !p.is_empty()).rev().map(str::to_owned));
            continue;
        }
        stack.push(dir);
        dir = attr.ino;
        current = attr;
    }
    Ok(Walked::Found(current))
}

/// What a mapped path names (following a final symlink when `follow`).
pub(crate) fn lookup(mapped: &Mapped, follow: bool) -> Res<(std::sync::Arc<Volume>, Walked)> {
    let volume = state::volume(mapped.mapping)?;
    if mapped.escaped {
        return Ok((volume, Walked::Outside(mapped.full.clone())));
    }
    let walked = walk(&volume, mapped.mapping, &mapped.inner, follow)?;
    Ok((volume, walked))
}

/// The parent directory's inode and the last name of a mapped path that is to be made or
/// removed (the path's last component itself is not followed).
pub(crate) fn parent_of(mapped: &Mapped) -> Res<(std::sync::Arc<Volume>, u64, String)> {
    if mapped.escaped {
        return Err(libc::EXDEV);
    }
    let volume = state::volume(mapped.mapping)?;
    let inner = mapped.inner.trim_end_matches('/');
    let Some((parent, name)) = inner.rsplit_once('/') else { return Err(libc::EBUSY) };
    if name.is_empty() {
        // The volume's root: it cannot be made, removed or renamed.
        return Err(libc::EBUSY);
    }
    let parent = if parent.is_empty() { "/" } else { parent };
    match walk(&volume, mapped.mapping, parent, true)? {
        Walked::Found(attr) if attr.kind == Kind::Dir => Ok((volume, attr.ino, name.to_owned())),
        Walked::Found(_) => Err(libc::ENOTDIR),
        Walked::Missing { .. } => Err(libc::ENOENT),
        Walked::Outside(_) => Err(libc::EXDEV),
    }
}
