//! Namespace changes: each of create, mkdir, symlink, link, unlink, rmdir, rename and setattr is
//! one batch of the tree's records, all in the volume's tree group, with a generation check on
//! every record it read. A change that lost a race with another mount reads again and retries.

use std::collections::BTreeMap;

use chunkstore_client::ops::{BatchWrite, GenerationPolicy, RecordExistsAction, WriteOp};
use chunkstore_client::value::{Bin, Value};

use crate::error::{FsError, FsResult};
use crate::records::*;
use crate::volume::*;

/// A namespace change being prepared: the tree records it read (with their generations) and
/// what it will write.
pub(crate) struct Txn<'a> {
    volume: &'a Volume,
    /// By inode: the generation read (0: no record), and the inode as it will be written (None:
    /// deleted).
    inodes: BTreeMap<u64, (u32, Option<Inode>)>,
    changed: Vec<u64>,
    /// The orphan list: generation read, contents (inode, when a mount last had it open or
    /// it lost its last link) and whether it changed, if touched.
    orphans: Option<OrphanList>,
}

/// The orphan list as a transaction holds it: generation read, (inode, time) pairs, changed.
type OrphanList = (u32, Vec<(u64, i64)>, bool);

impl<'a> Txn<'a> {
    fn new(volume: &'a Volume) -> Txn<'a> {
        Txn { volume, inodes: BTreeMap::new(), changed: Vec::new(), orphans: None }
    }

    /// The inode as this change sees it (`NotFound` if there is none).
    pub fn inode(&mut self, ino: u64) -> FsResult<&mut Inode> {
        if !self.inodes.contains_key(&ino) {
            let (inode, generation) = self.volume.read_inode(ino)?;
            self.inodes.insert(ino, (generation, Some(inode)));
        }
        if !self.changed.contains(&ino) {
            self.changed.push(ino);
        }
        match self.inodes.get_mut(&ino) {
            Some((_, Some(inode))) => Ok(inode),
            _ => Err(FsError::NotFound),
        }
    }

    /// Reads without marking the record changed.
    pub fn peek(&mut self, ino: u64) -> FsResult<Inode> {
        if let Some((_, found)) = self.inodes.get(&ino) {
            return found.clone().ok_or(FsError::NotFound);
        }
        let (inode, generation) = self.volume.read_inode(ino)?;
        self.inodes.insert(ino, (generation, Some(inode.clone())));
        Ok(inode)
    }

    pub fn dir(&mut self, ino: u64) -> FsResult<&mut Inode> {
        let dir = self.inode(ino)?;
        if dir.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        Ok(dir)
    }

    pub fn create(&mut self, ino: u64, inode: Inode) {
        self.inodes.insert(ino, (0, Some(inode)));
        self.changed.push(ino);
    }

    pub fn delete(&mut self, ino: u64) -> FsResult<()> {
        self.inode(ino)?;
        if let Some((_, slot)) = self.inodes.get_mut(&ino) {
            *slot = None;
        }
        Ok(())
    }

    fn orphan_list(&mut self) -> FsResult<&mut OrphanList> {
        if self.orphans.is_none() {
            let (generation, list) = match self.volume.get(&self.volume.keys.orphans())? {
                None => (0, Vec::new()),
                Some(record) => match bytes_bin(&record, BIN_ORPHANS) {
                    Some(bytes) => (record.meta.generation, decode(bytes, "orphan list")?),
                    None => (record.meta.generation, Vec::new()),
                },
            };
            self.orphans = Some((generation, list, false));
        }
        self.orphans.as_mut().ok_or_else(|| FsError::Io("orphan list".into()))
    }

    /// Puts `ino` on the orphan list as of `now` (or moves its time to `now`).
    pub fn add_orphan(&mut self, ino: u64, now: i64) -> FsResult<()> {
        let list = self.orphan_list()?;
        list.1.retain(|&(o, _)| o != ino);
        list.1.push((ino, now));
        list.2 = true;
        Ok(())
    }

    pub fn remove_orphan(&mut self, ino: u64) -> FsResult<()> {
        let list = self.orphan_list()?;
        let before = list.1.len();
        list.1.retain(|&(o, _)| o != ino);
        list.2 |= list.1.len() != before;
        Ok(())
    }

    fn commit(self) -> FsResult<()> {
        let keys = &self.volume.keys;
        let mut writes = Vec::new();
        for ino in &self.changed {
            let Some((generation, inode)) = self.inodes.get(ino) else { continue };
            let check = GenerationPolicy::ExpectEqual(*generation);
            let key = keys.inode(*ino);
            if writes.iter().any(|w: &BatchWrite| w.key == key) {
                continue;
            }
            writes.push(match inode {
                Some(inode) => BatchWrite {
                    key,
                    op: WriteOp::Put(vec![Bin::new(BIN_INODE, Value::Bytes(encode(inode)?))]),
                    policy: never_expire(RecordExistsAction::Replace, check),
                },
                None => BatchWrite { key, op: WriteOp::Delete, policy: never_expire(RecordExistsAction::CreateOrUpdate, check) },
            });
        }
        if let Some((generation, list, true)) = &self.orphans {
            writes.push(BatchWrite {
                key: keys.orphans(),
                op: WriteOp::Put(vec![Bin::new(BIN_ORPHANS, Value::Bytes(encode(list)?))]),
                policy: never_expire(RecordExistsAction::Replace, GenerationPolicy::ExpectEqual(*generation)),
            });
        }
        if writes.is_empty() {
            return Ok(());
        }
        self.volume.batch(None, writes).map(drop)
    }
}

/// How long an orphan (a file unlinked while open) keeps its data after the last mount that
/// had it open stopped saying so: longer than any kernel's cached lookup of it (1 s) and
/// several reap periods, so a file open on another mount is never freed under it.
pub const ORPHAN_GRACE_NS: i64 = 30_000_000_000;

/// How often a mount reaps orphans and renews the ones it holds open.
pub const ORPHAN_REAP_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

/// What a caller tells the file layer about files open on its mount.
pub trait OpenFiles {
    fn is_open(&self, ino: u64) -> bool;
}

impl<F: Fn(u64) -> bool> OpenFiles for F {
    fn is_open(&self, ino: u64) -> bool {
        self(ino)
    }
}

/// Who creates an inode.
#[derive(Clone, Copy, Debug)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl Volume {
    /// Runs a namespace change, again while it loses races with other mounts.
    pub(crate) fn change<T>(&self, mut prepare: impl FnMut(&mut Txn<'_>) -> FsResult<T>) -> FsResult<T> {
        let _tree = lock(&self.tree);
        for _ in 0..CONFLICT_RETRIES_MAX {
            let mut txn = Txn::new(self);
            let out = prepare(&mut txn)?;
            match txn.commit() {
                Ok(()) => return Ok(out),
                Err(FsError::Conflict) => continue,
                Err(err) => return Err(err),
            }
        }
        Err(FsError::Io(format!("gave up after {CONFLICT_RETRIES_MAX} conflicting namespace changes")))
    }

    pub(crate) fn new_inode(kind: Kind, perm: u32, owner: Owner, parent: u64, now: i64) -> Inode {
        Inode {
            kind,
            perm: perm & 0o7777,
            uid: owner.uid,
            gid: owner.gid,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            rdev: 0,
            atime_ns: now,
            mtime_ns: now,
            ctime_ns: now,
            crtime_ns: now,
            target: Vec::new(),
            parent,
            entries: BTreeMap::new(),
        }
    }

    /// Creates an inode of `kind` named `name` in `parent`: one entry (`Exists` if taken).
    // The arguments are mknod(2)'s, with the caller and a symlink's target.
    #[allow(clippy::too_many_arguments)]
    pub fn mknod(&self, parent: u64, name: &[u8], kind: Kind, perm: u32, owner: Owner, rdev: u32, target: &[u8]) -> FsResult<Attr> {
        check_name(name)?;
        if target.len() > SYMLINK_TARGET_BYTES_MAX {
            return Err(FsError::NameTooLong(target.len()));
        }
        let ino = self.allocate_ino()?;
        let inode = self.change(|txn| {
            let now = now_ns();
            let dir = txn.dir(parent)?;
            if dir.entries.contains_key(name) {
                return Err(FsError::Exists);
            }
            if kind == Kind::Dir && dir.nlink >= LINKS_MAX {
                return Err(FsError::TooManyLinks(dir.nlink));
            }
            dir.entries.insert(name.to_vec(), Entry { ino, kind });
            dir.mtime_ns = now;
            dir.ctime_ns = now;
            if kind == Kind::Dir {
                dir.nlink += 1;
            }
            let mut inode = Volume::new_inode(kind, perm, owner, parent, now);
            inode.rdev = rdev;
            inode.target = target.to_vec();
            txn.create(ino, inode.clone());
            Ok(inode)
        })?;
        self.attr_of(ino, &inode)
    }

    /// A hard link `newname` in `newparent` to `ino` (not a directory).
    pub fn link(&self, ino: u64, newparent: u64, newname: &[u8]) -> FsResult<Attr> {
        check_name(newname)?;
        let inode = self.change(|txn| {
            let now = now_ns();
            let target = txn.inode(ino)?;
            if target.kind == Kind::Dir {
                return Err(FsError::NotSupported("hard links to directories"));
            }
            if target.nlink == 0 {
                return Err(FsError::NotFound);
            }
            if target.nlink >= LINKS_MAX {
                return Err(FsError::TooManyLinks(target.nlink));
            }
            target.nlink += 1;
            target.ctime_ns = now;
            let (kind, snapshot) = (target.kind, target.clone());
            let dir = txn.dir(newparent)?;
            if dir.entries.contains_key(newname) {
                return Err(FsError::Exists);
            }
            dir.entries.insert(newname.to_vec(), Entry { ino, kind });
            dir.mtime_ns = now;
            dir.ctime_ns = now;
            Ok(snapshot)
        })?;
        self.attr_of(ino, &inode)
    }

    /// Drops one link of `ino` inside a change; an inode left without links goes on the orphan
    /// list (its data is reclaimed once no one has it open). Directories are deleted at once.
    fn drop_link(txn: &mut Txn<'_>, ino: u64, now: i64) -> FsResult<Option<u64>> {
        let inode = txn.inode(ino)?;
        if inode.kind == Kind::Dir {
            txn.delete(ino)?;
            return Ok(None);
        }
        inode.nlink = inode.nlink.saturating_sub(1);
        inode.ctime_ns = now;
        if inode.nlink > 0 {
            return Ok(None);
        }
        if inode.kind == Kind::File {
            txn.add_orphan(ino, now)?;
            Ok(Some(ino))
        } else {
            txn.delete(ino)?;
            Ok(None)
        }
    }

    /// Removes a name; a file left without links is reclaimed by `reap` once no mount has had
    /// it open for `ORPHAN_GRACE_NS`.
    pub fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        check_name(name)?;
        self.change(|txn| {
            let now = now_ns();
            let dir = txn.dir(parent)?;
            let entry = *dir.entries.get(name).ok_or(FsError::NotFound)?;
            if entry.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            dir.entries.remove(name);
            dir.mtime_ns = now;
            dir.ctime_ns = now;
            Volume::drop_link(txn, entry.ino, now).map(drop)
        })
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        if name == b"." {
            return Err(FsError::Invalid("rmdir of \".\"".into()));
        }
        if name == b".." {
            return Err(FsError::NotEmpty);
        }
        check_name(name)?;
        self.change(|txn| {
            let now = now_ns();
            let entry = *txn.dir(parent)?.entries.get(name).ok_or(FsError::NotFound)?;
            let victim = txn.peek(entry.ino)?;
            if victim.kind != Kind::Dir {
                return Err(FsError::NotDir);
            }
            if !victim.entries.is_empty() {
                return Err(FsError::NotEmpty);
            }
            let dir = txn.dir(parent)?;
            dir.entries.remove(name);
            dir.nlink = dir.nlink.saturating_sub(1);
            dir.mtime_ns = now;
            dir.ctime_ns = now;
            txn.delete(entry.ino)
        })
    }

    /// Renames `name` in `parent` to `newname` in `newparent` as one entry: a file it replaces
    /// is replaced atomically (readers see the old file or the new one, never neither).
    pub fn rename(&self, parent: u64, name: &[u8], newparent: u64, newname: &[u8], noreplace: bool, exchange: bool) -> FsResult<()> {
        check_name(name)?;
        check_name(newname)?;
        self.change(|txn| {
            let now = now_ns();
            let source = *txn.dir(parent)?.entries.get(name).ok_or(FsError::NotFound)?;
            let target = txn.dir(newparent)?.entries.get(newname).copied();
            if source.kind == Kind::Dir && newparent != parent {
                // A directory may not move under itself.
                let mut up = newparent;
                for _ in 0..4096 {
                    if up == source.ino {
                        return Err(FsError::Invalid("a directory cannot move into itself".into()));
                    }
                    if up == ROOT_INO {
                        break;
                    }
                    up = txn.peek(up)?.parent;
                }
            }
            if exchange {
                let target = target.ok_or(FsError::NotFound)?;
                txn.dir(parent)?.entries.insert(name.to_vec(), target);
                txn.dir(newparent)?.entries.insert(newname.to_vec(), source);
                if parent != newparent {
                    for (moved, from, to) in [(source, parent, newparent), (target, newparent, parent)] {
                        let inode = txn.inode(moved.ino)?;
                        inode.ctime_ns = now;
                        if moved.kind == Kind::Dir {
                            inode.parent = to;
                            let from_dir = txn.dir(from)?;
                            from_dir.nlink = from_dir.nlink.saturating_sub(1);
                            txn.dir(to)?.nlink += 1;
                        }
                    }
                }
                for d in [parent, newparent] {
                    let dir = txn.dir(d)?;
                    dir.mtime_ns = now;
                    dir.ctime_ns = now;
                }
                return Ok(());
            }
            if let Some(target) = target {
                if noreplace {
                    return Err(FsError::Exists);
                }
                if target.ino == source.ino {
                    return Ok(());
                }
                let victim = txn.peek(target.ino)?;
                match (source.kind == Kind::Dir, victim.kind == Kind::Dir) {
                    (true, false) => return Err(FsError::NotDir),
                    (false, true) => return Err(FsError::IsDir),
                    (true, true) if !victim.entries.is_empty() => return Err(FsError::NotEmpty),
                    (true, true) => {
                        let dir = txn.dir(newparent)?;
                        dir.nlink = dir.nlink.saturating_sub(1);
                    }
                    (false, false) => {}
                }
                Volume::drop_link(txn, target.ino, now)?;
            }
            txn.dir(parent)?.entries.remove(name);
            txn.dir(newparent)?.entries.insert(newname.to_vec(), source);
            let moved = txn.inode(source.ino)?;
            moved.ctime_ns = now;
            if source.kind == Kind::Dir && parent != newparent {
                moved.parent = newparent;
                let old_parent = txn.dir(parent)?;
                old_parent.nlink = old_parent.nlink.saturating_sub(1);
                txn.dir(newparent)?.nlink += 1;
            }
            for d in [parent, newparent] {
                let dir = txn.dir(d)?;
                dir.mtime_ns = now;
                dir.ctime_ns = now;
            }
            Ok(())
        })
    }

    /// Frees the orphans no mount has had open for `ORPHAN_GRACE_NS`, and renews the time of
    /// those `open` still has open (every mount calls it every `ORPHAN_REAP_PERIOD`, so an
    /// unlinked file open on any live mount keeps its data; a mount that died stops renewing).
    /// Returns how many were freed.
    pub fn reap(&self, open: &dyn OpenFiles) -> FsResult<usize> {
        let now = now_ns();
        let orphans = self.orphans()?;
        let held: Vec<u64> = orphans.iter().map(|&(ino, _)| ino).filter(|&ino| open.is_open(ino)).collect();
        if !held.is_empty() {
            self.change(|txn| {
                for &ino in &held {
                    txn.add_orphan(ino, now)?;
                }
                Ok(())
            })?;
        }
        let mut freed = 0;
        for (ino, since) in orphans {
            if !held.contains(&ino) && since < now - ORPHAN_GRACE_NS {
                self.reclaim(ino)?;
                freed += 1;
            }
        }
        Ok(freed)
    }

    /// Frees an orphan's data and inode (after its last close, or by fsck). Does nothing for
    /// an inode that has links again or is gone.
    pub fn reclaim(&self, ino: u64) -> FsResult<()> {
        match self.read_inode(ino) {
            Ok((inode, _)) if inode.nlink > 0 => return Ok(()),
            Err(FsError::NotFound) => {}
            Err(err) => return Err(err),
            Ok(_) => {
                self.drop_held(ino);
                self.free_data(ino)?
            }
        }
        self.change(|txn| {
            match txn.peek(ino) {
                Ok(inode) if inode.nlink == 0 => txn.delete(ino)?,
                Ok(_) | Err(FsError::NotFound) => {}
                Err(err) => return Err(err),
            }
            txn.remove_orphan(ino)
        })?;
        crate::volume::lock(&self.files).remove(&ino);
        Ok(())
    }

    /// Changes an inode's attributes; a size change goes to the file's data (`truncate`).
    pub fn setattr(&self, ino: u64, set: &SetAttr) -> FsResult<Attr> {
        // Held writes (`--durability fsync`) go first: a new size or mtime applies after them.
        self.flush(ino)?;
        if let Some(size) = set.size {
            self.truncate(ino, size)?;
        }
        let mtime_of_file = set.mtime.is_some() && self.read_inode(ino)?.0.kind == Kind::File;
        if mtime_of_file {
            if let Some(mtime) = set.mtime {
                self.set_file_mtime(ino, mtime.resolve(now_ns()))?;
            }
        }
        if set.perm.is_some() || set.uid.is_some() || set.gid.is_some() || set.atime.is_some() || set.mtime.is_some() {
            self.change(|txn| {
                let now = now_ns();
                let inode = txn.inode(ino)?;
                if let Some(perm) = set.perm {
                    inode.perm = perm & 0o7777;
                }
                if let Some(uid) = set.uid {
                    inode.uid = uid;
                }
                if let Some(gid) = set.gid {
                    inode.gid = gid;
                }
                if let Some(atime) = set.atime {
                    inode.atime_ns = atime.resolve(now);
                }
                if let Some(mtime) = set.mtime {
                    inode.mtime_ns = mtime.resolve(now);
                }
                inode.ctime_ns = now;
                Ok(())
            })?;
        }
        self.getattr(ino)
    }
}
