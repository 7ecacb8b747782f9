//! The file layer's records and their bins (byte formats in ARCHITECTURE.md, "The file layer").
//!
//! - volume record: bins `format` (int, `VOLUME_FORMAT`), `chunk-bytes` (int), `next-ino`
//!   (int), `created-ns` (int);
//! - inode record: bin `inode`, an `Inode` encoded with bincode 1 (fixed-width little-endian);
//! - orphan list: bin `orphans`, a bincode `Vec<(u64, i64)>` (inode, last time a mount renewed it);
//! - size record: bins `size`, `mtime-ns`, `ctime-ns` (ints), `extents` (bytes: pairs of
//!   u64 little-endian, the chunk ranges [start, end) that may hold data);
//! - chunk record: bin `data` (bytes, at most the volume's chunk size, never past the size).

use std::collections::BTreeMap;

use bincode::Options;
use chunkstore_client::value::{Bin, Record, Value};
use serde::{Deserialize, Serialize};

use crate::error::{FsError, FsResult};

/// The volume format this build writes and reads.
pub const VOLUME_FORMAT: i64 = 1;

pub const BIN_INODE: &str = "inode";
pub const BIN_ORPHANS: &str = "orphans";
pub const BIN_DATA: &str = "data";
pub const BIN_SIZE: &str = "size";
pub const BIN_MTIME: &str = "mtime-ns";
pub const BIN_CTIME: &str = "ctime-ns";
pub const BIN_EXTENTS: &str = "extents";
pub const BIN_FORMAT: &str = "format";
pub const BIN_CHUNK_BYTES: &str = "chunk-bytes";
pub const BIN_NEXT_INO: &str = "next-ino";
pub const BIN_CREATED: &str = "created-ns";

/// The largest record a decoder accepts (a directory's inode record is the largest).
const DECODE_BYTES_MAX: u64 = 8 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl Kind {
    /// The S_IFMT bits of the kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            Kind::CharDevice => libc::S_IFCHR,
            Kind::BlockDevice => libc::S_IFBLK,
        }
    }

    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDevice,
            libc::S_IFBLK => Kind::BlockDevice,
            _ => return None,
        })
    }
}

/// A directory entry: the inode it names and its kind (for readdir without a lookup).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub ino: u64,
    pub kind: Kind,
}

/// An inode's attributes as the tree keeps them. A regular file's size and mtime live with its
/// data (the size record), so that a write changes them in the same entry as its bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Inode {
    pub kind: Kind,
    /// Permission bits with setuid, setgid and sticky (no S_IFMT).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub rdev: u32,
    pub atime_ns: i64,
    /// For directories, symlinks and special files (a regular file's is in its size record).
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub crtime_ns: i64,
    /// A symlink's target.
    #[serde(with = "serde_bytes")]
    pub target: Vec<u8>,
    /// A directory's parent (itself for the root).
    pub parent: u64,
    /// A directory's entries by name.
    pub entries: BTreeMap<Vec<u8>, Entry>,
}

fn options() -> impl Options {
    bincode::DefaultOptions::new().with_fixint_encoding().with_little_endian().with_limit(DECODE_BYTES_MAX).reject_trailing_bytes()
}

pub fn encode<T: Serialize>(value: &T) -> FsResult<Vec<u8>> {
    options().serialize(value).map_err(|e| FsError::NoSpace(format!("record does not fit: {e}")))
}

pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> FsResult<T> {
    options().deserialize(bytes).map_err(|e| FsError::Corrupt(format!("{what}: {e}")))
}

pub fn int_bin(record: &Record, name: &str) -> i64 {
    match record.bin(name) {
        Some(Value::Int(v)) => *v,
        _ => 0,
    }
}

pub fn bytes_bin<'a>(record: &'a Record, name: &str) -> Option<&'a [u8]> {
    match record.bin(name) {
        Some(Value::Bytes(b)) => Some(b),
        _ => None,
    }
}

/// Most extents a size record lists: past it the two closest merge (the list then covers some
/// chunks that hold nothing, which costs only needless deletes when the file shrinks).
pub const EXTENTS_MAX: usize = 64;

/// A file's size record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileSize {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    /// The chunk index ranges [start, end) that may hold data, sorted and apart: a shrink or a
    /// reclaim deletes only these. Above the size's last chunk they may still hold bytes of a
    /// shrink whose deletes were cut short; anything that grows the file deletes them first.
    pub extents: Vec<(u64, u64)>,
    /// The record's generation (0: no record yet).
    pub generation: u32,
}

impl FileSize {
    pub fn from_record(record: Option<&Record>) -> FsResult<FileSize> {
        let Some(r) = record else { return Ok(FileSize::default()) };
        let raw = bytes_bin(r, BIN_EXTENTS).unwrap_or(&[]);
        if !raw.len().is_multiple_of(16) || raw.len() > EXTENTS_MAX * 16 + 16 {
            return Err(FsError::Corrupt(format!("size record: extents of {} bytes", raw.len())));
        }
        let extents: Vec<(u64, u64)> = raw
            .chunks_exact(16)
            .map(|p| {
                let word = |at: usize| u64::from_le_bytes([p[at], p[at + 1], p[at + 2], p[at + 3], p[at + 4], p[at + 5], p[at + 6], p[at + 7]]);
                (word(0), word(8))
            })
            .collect();
        if extents.iter().any(|&(a, b)| a >= b) || extents.windows(2).any(|w| w[0].1 >= w[1].0) {
            return Err(FsError::Corrupt(format!("size record: extents {extents:?} are not sorted and apart")));
        }
        Ok(FileSize {
            size: int_bin(r, BIN_SIZE).max(0) as u64,
            mtime_ns: int_bin(r, BIN_MTIME),
            ctime_ns: int_bin(r, BIN_CTIME),
            extents,
            generation: r.meta.generation,
        })
    }

    pub fn bins(&self) -> Vec<Bin> {
        let mut extents = Vec::with_capacity(self.extents.len() * 16);
        for (a, b) in &self.extents {
            extents.extend_from_slice(&a.to_le_bytes());
            extents.extend_from_slice(&b.to_le_bytes());
        }
        vec![
            Bin::new(BIN_SIZE, Value::Int(self.size as i64)),
            Bin::new(BIN_MTIME, Value::Int(self.mtime_ns)),
            Bin::new(BIN_CTIME, Value::Int(self.ctime_ns)),
            Bin::new(BIN_EXTENTS, Value::Bytes(extents)),
        ]
    }

    /// One past the highest chunk that may hold data.
    pub fn chunks_end(&self) -> u64 {
        self.extents.last().map_or(0, |e| e.1)
    }

    /// Chunks [start, end) may hold data from now on.
    pub fn add_extent(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let (mut start, mut end) = (start, end);
        self.extents.retain(|&(a, b)| {
            let touches = a <= end && start <= b;
            if touches {
                start = start.min(a);
                end = end.max(b);
            }
            !touches
        });
        let at = self.extents.partition_point(|e| e.0 < start);
        self.extents.insert(at, (start, end));
        while self.extents.len() > EXTENTS_MAX {
            let closest = (0..self.extents.len() - 1).min_by_key(|&i| self.extents[i + 1].0 - self.extents[i].1).unwrap_or(0);
            let next = self.extents.remove(closest + 1);
            self.extents[closest].1 = next.1;
        }
    }

    /// Chunks at `from` and above hold nothing any more.
    pub fn cut_extents(&mut self, from: u64) {
        self.extents.retain(|e| e.0 < from);
        if let Some(last) = self.extents.last_mut() {
            last.1 = last.1.min(from);
        }
    }

    /// The chunks at `from` and above that may hold data, the highest first.
    pub fn chunks_from(&self, from: u64) -> impl Iterator<Item = u64> + '_ {
        self.extents.iter().rev().flat_map(move |&(a, b)| (a.max(from)..b).rev())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An inode survives its encoding, and damaged bytes are an error, not a panic.
    #[test]
    fn inode_round_trip_and_damage() {
        let mut inode = Inode {
            kind: Kind::Dir,
            perm: 0o755,
            uid: 1,
            gid: 2,
            nlink: 2,
            rdev: 0,
            atime_ns: 1,
            mtime_ns: 2,
            ctime_ns: 3,
            crtime_ns: 4,
            target: Vec::new(),
            parent: 1,
            entries: BTreeMap::new(),
        };
        inode.entries.insert(b"a".to_vec(), Entry { ino: 7, kind: Kind::File });
        let bytes = encode(&inode).unwrap();
        assert_eq!(decode::<Inode>(&bytes, "t").unwrap(), inode);
        assert!(matches!(decode::<Inode>(&bytes[..bytes.len() - 3], "t"), Err(FsError::Corrupt(_))));
        let mut huge = bytes.clone();
        // A length field claiming more than the limit is refused before allocating: the
        // entries' count, after kind, five u32s, four i64 times, the empty target and parent.
        let entries_at = 4 + 5 * 4 + 4 * 8 + 8 + 8;
        assert_eq!(&huge[entries_at..entries_at + 8], &1u64.to_le_bytes());
        huge[entries_at..entries_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<Inode>(&huge, "t").is_err());
    }
}

#[cfg(test)]
mod extent_tests {
    use super::*;

    /// Extents merge when they touch, stay bounded, and a cut drops what is above it.
    #[test]
    fn extents_merge_stay_bounded_and_cut() {
        let mut size = FileSize::default();
        size.add_extent(10, 12);
        size.add_extent(0, 1);
        size.add_extent(12, 13);
        size.add_extent(5, 6);
        assert_eq!(size.extents, vec![(0, 1), (5, 6), (10, 13)]);
        size.add_extent(1, 5);
        assert_eq!(size.extents, vec![(0, 6), (10, 13)]);
        assert_eq!(size.chunks_from(5).collect::<Vec<_>>(), vec![12, 11, 10, 5]);
        size.cut_extents(11);
        assert_eq!(size.extents, vec![(0, 6), (10, 11)]);
        for i in 0..1000u64 {
            size.add_extent(i * 1000 + 100, i * 1000 + 101);
        }
        assert!(size.extents.len() <= EXTENTS_MAX);
        assert!(size.extents.windows(2).all(|w| w[0].1 < w[1].0));
        // Every chunk written is still covered.
        for i in 0..1000u64 {
            let c = i * 1000 + 100;
            assert!(size.extents.iter().any(|&(a, b)| a <= c && c < b), "{c}");
        }
        let record =
            Record { set: "s".into(), meta: chunkstore_client::value::RecordMeta { generation: 3, void_time_secs: 0, last_update_ms: 0 }, bins: size.bins() };
        let back = FileSize::from_record(Some(&record)).unwrap();
        assert_eq!(back.extents, size.extents);
        assert_eq!(back.generation, 3);
    }
}
