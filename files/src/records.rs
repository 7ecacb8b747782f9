//! The file layer's records and their bins (byte formats in ARCHITECTURE.md, "The file layer").
//!
//! - volume record: bins `format` (int, `VOLUME_FORMAT`), `chunk-bytes` (int), `next-ino`
//!   (int), `created-ns` (int);
//! - inode record: bin `inode`, an `Inode` encoded with bincode 1 (fixed-width little-endian);
//! - orphan list: bin `orphans`, a bincode `Vec<u64>`;
//! - size record: bins `size`, `mtime-ns`, `ctime-ns`, `chunks-end` (ints);
//! - chunk record: bin `data` (bytes, at most the volume's chunk size, never past the size).

use std::collections::BTreeMap;

use bincode::Options;
use chunkstore::value::{Bin, Record, Value};
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
pub const BIN_CHUNKS_END: &str = "chunks-end";
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

/// A file's size record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileSize {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    /// Chunks at this index and above hold nothing. Between `size`'s last chunk and it, chunks
    /// may still hold bytes of a shrink whose cleanup was cut short: anything that grows the
    /// file deletes them first.
    pub chunks_end: u64,
    /// The record's generation (0: no record yet).
    pub generation: u32,
}

impl FileSize {
    pub fn from_record(record: Option<&Record>) -> FileSize {
        match record {
            None => FileSize::default(),
            Some(r) => FileSize {
                size: int_bin(r, BIN_SIZE).max(0) as u64,
                mtime_ns: int_bin(r, BIN_MTIME),
                ctime_ns: int_bin(r, BIN_CTIME),
                chunks_end: int_bin(r, BIN_CHUNKS_END).max(0) as u64,
                generation: r.meta.generation,
            },
        }
    }

    pub fn bins(&self) -> Vec<Bin> {
        vec![
            Bin::new(BIN_SIZE, Value::Int(self.size as i64)),
            Bin::new(BIN_MTIME, Value::Int(self.mtime_ns)),
            Bin::new(BIN_CTIME, Value::Int(self.ctime_ns)),
            Bin::new(BIN_CHUNKS_END, Value::Int(self.chunks_end as i64)),
        ]
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
        // A length field claiming more than the limit is refused before allocating.
        huge[100..108].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<Inode>(&huge, "t").is_err());
    }
}
