//! Checking a volume: dangling directory entries, wrong link counts and parents, orphans left
//! by a crash (unlinked while open, or allocated and never linked), and their data; `repair`
//! fixes each.

use std::collections::{BTreeMap, HashSet, VecDeque};

use chunkstore_client::value::Value;

use crate::error::{FsError, FsResult};
use crate::records::*;
use crate::volume::*;

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct FsckReport {
    pub inodes: u64,
    pub directories: u64,
    pub files: u64,
    /// Bytes of the regular files' sizes.
    pub bytes: u64,
    /// What is wrong, in words (empty: the volume is consistent).
    pub problems: Vec<String>,
    /// How many of the problems were repaired (with `repair`).
    pub repaired: u64,
}

impl Volume {
    pub fn fsck(&self, repair: bool) -> FsResult<FsckReport> {
        // Inodes created after the walk began are not taken for unreachable (a mount may be
        // creating them now): only those older than this.
        let started_ns = now_ns() - 60_000_000_000;
        let mut report = FsckReport::default();
        let mut links: BTreeMap<u64, u32> = BTreeMap::new();
        let mut subdirs: BTreeMap<u64, u32> = BTreeMap::new();
        let mut reached: HashSet<u64> = HashSet::from([ROOT_INO]);
        let mut queue = VecDeque::from([ROOT_INO]);
        while let Some(dir_ino) = queue.pop_front() {
            let (dir, _) = self.read_inode(dir_ino)?;
            report.directories += 1;
            for (name, entry) in &dir.entries {
                let shown = String::from_utf8_lossy(name).into_owned();
                match self.read_inode(entry.ino) {
                    Err(FsError::NotFound) => {
                        report.problems.push(format!("directory {dir_ino}: entry {shown:?} names inode {} that does not exist", entry.ino));
                        if repair {
                            let name = name.clone();
                            self.change(|txn| {
                                txn.dir(dir_ino)?.entries.remove(&name);
                                Ok(())
                            })?;
                            report.repaired += 1;
                        }
                    }
                    Err(err) => return Err(err),
                    Ok((inode, _)) => {
                        *links.entry(entry.ino).or_default() += 1;
                        if inode.kind == Kind::Dir {
                            *subdirs.entry(dir_ino).or_default() += 1;
                            if inode.parent != dir_ino {
                                report.problems.push(format!("directory {} ({shown:?} in {dir_ino}) names {} as its parent", entry.ino, inode.parent));
                                if repair {
                                    self.change(|txn| {
                                        txn.inode(entry.ino)?.parent = dir_ino;
                                        Ok(())
                                    })?;
                                    report.repaired += 1;
                                }
                            }
                        }
                        if reached.insert(entry.ino) && inode.kind == Kind::Dir {
                            queue.push_back(entry.ino);
                        }
                    }
                }
            }
        }
        for &ino in &reached {
            let (inode, _) = self.read_inode(ino)?;
            report.inodes += 1;
            let expected = match inode.kind {
                Kind::Dir => 2 + subdirs.get(&ino).copied().unwrap_or(0),
                _ => links.get(&ino).copied().unwrap_or(0),
            };
            if inode.kind == Kind::File {
                report.files += 1;
                report.bytes += self.read_size(ino)?.size;
            }
            if inode.nlink != expected {
                report.problems.push(format!("inode {ino}: link count {} but {expected} links", inode.nlink));
                if repair {
                    self.change(|txn| {
                        txn.inode(ino)?.nlink = expected;
                        Ok(())
                    })?;
                    report.repaired += 1;
                }
            }
        }
        // Inodes no entry reaches: orphans of unlinks (freed at the last close unless a crash
        // came first), and inodes allocated by a create that never committed.
        let orphans: Vec<u64> = self.orphans()?.into_iter().filter(|&(_, since)| since < now_ns() - crate::tree::ORPHAN_GRACE_NS).map(|(ino, _)| ino).collect();
        let recent_orphans: Vec<u64> = self.orphans()?.into_iter().map(|(ino, _)| ino).filter(|ino| !orphans.contains(ino)).collect();
        let next_ino = match self.get(&self.keys.volume())? {
            Some(record) => match record.bin(BIN_NEXT_INO) {
                Some(Value::Int(next)) => *next as u64,
                _ => return Err(FsError::Corrupt("the volume record has no next-ino".into())),
            },
            None => return Err(FsError::NotFound),
        };
        // Recent orphans may still be open on some mount: `reap` frees them in time.
        for ino in (ROOT_INO + 1..next_ino).filter(|ino| !reached.contains(ino) && !recent_orphans.contains(ino)) {
            let inode = match self.read_inode(ino) {
                Ok((inode, _)) => Some(inode),
                Err(FsError::NotFound) => None,
                Err(err) => return Err(err),
            };
            if inode.as_ref().is_some_and(|i| i.crtime_ns > started_ns) {
                continue;
            }
            let size = self.read_size(ino)?;
            if inode.is_none() && size.generation == 0 {
                if orphans.contains(&ino) {
                    report.problems.push(format!("inode {ino}: on the orphan list but gone"));
                    if repair {
                        self.reclaim(ino)?;
                        report.repaired += 1;
                    }
                }
                continue;
            }
            let listed = if orphans.contains(&ino) { "unlinked while open" } else { "unreachable" };
            report.problems.push(format!("inode {ino}: {listed}, holding {} bytes of data: orphaned", size.size));
            if repair {
                if inode.as_ref().is_some_and(|i| i.nlink > 0) {
                    self.change(|txn| {
                        txn.inode(ino)?.nlink = 0;
                        Ok(())
                    })?;
                }
                self.reclaim_forced(ino)?;
                report.repaired += 1;
            }
        }
        Ok(report)
    }

    /// Frees an inode's data and record whatever its link count says (fsck, for inodes no
    /// entry reaches).
    fn reclaim_forced(&self, ino: u64) -> FsResult<()> {
        self.free_data(ino)?;
        self.reclaim(ino)
    }
}
