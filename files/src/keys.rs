//! Where each record of a volume lives: its key, and so its partition group.
//!
//! Digests are RIPEMD-160 over a label, the volume name and the record's numbers, with the
//! partition bits (the first 12 bits, read as the store reads them) replaced by the partition
//! of what the record belongs to:
//! - the volume's **tree** (the volume record, every inode's attributes, directories, the
//!   orphan list) all share the partition of the volume's name, so a namespace change is one
//!   batch in one group;
//! - a **file's data** (its size record and its chunks) share the partition of (volume, inode),
//!   so a `write()` (chunks and size together) is one batch in one group.

use chunkstore_client::key::{Digest, Key, PARTITION_COUNT};
use ripemd::{Digest as _, Ripemd160};

/// The set every file-layer record is in.
pub const SET: &str = "chunkfs";

fn hash(parts: &[&[u8]]) -> Digest {
    let mut hasher = Ripemd160::new();
    for part in parts {
        hasher.update((part.len() as u32).to_le_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

fn partition_of(parts: &[&[u8]]) -> u16 {
    let digest = hash(parts);
    u16::from_le_bytes([digest[0], digest[1]]) & (PARTITION_COUNT - 1)
}

/// A digest placed in `partition` (the store's `partition_id` reads it back).
fn in_partition(mut digest: Digest, partition: u16) -> Digest {
    let low = partition & 0xff;
    let high = (partition >> 8) & 0x0f;
    digest[0] = low as u8;
    digest[1] = (digest[1] & 0xf0) | high as u8;
    digest
}

#[derive(Clone, Debug)]
pub struct VolumeKeys {
    volume: String,
    tree_partition: u16,
}

impl VolumeKeys {
    pub fn new(volume: &str) -> VolumeKeys {
        VolumeKeys { volume: volume.to_owned(), tree_partition: partition_of(&[b"tree", volume.as_bytes()]) }
    }

    fn tree_key(&self, label: &[u8], number: u64) -> Key {
        let digest = hash(&[label, self.volume.as_bytes(), &number.to_le_bytes()]);
        Key::from_digest(SET, in_partition(digest, self.tree_partition))
    }

    /// The volume record: format, chunk size, the next free inode number.
    pub fn volume(&self) -> Key {
        self.tree_key(b"volume", 0)
    }

    /// An inode's attributes (and, for a directory, its entries).
    pub fn inode(&self, ino: u64) -> Key {
        self.tree_key(b"inode", ino)
    }

    /// The inodes whose last link went while they were open (reclaimed at their last close, or
    /// by fsck after a crash).
    pub fn orphans(&self) -> Key {
        self.tree_key(b"orphans", 0)
    }

    fn file_partition(&self, ino: u64) -> u16 {
        partition_of(&[b"file", self.volume.as_bytes(), &ino.to_le_bytes()])
    }

    /// A file's size, mtime and allocated extent.
    pub fn size(&self, ino: u64) -> Key {
        let digest = hash(&[b"size", self.volume.as_bytes(), &ino.to_le_bytes()]);
        Key::from_digest(SET, in_partition(digest, self.file_partition(ino)))
    }

    /// A file's lock table (byte-range locks, in the file's group).
    pub fn locks(&self, ino: u64) -> Key {
        let digest = hash(&[b"locks", self.volume.as_bytes(), &ino.to_le_bytes()]);
        Key::from_digest(SET, in_partition(digest, self.file_partition(ino)))
    }

    /// Chunk `index` of a file's data.
    pub fn chunk(&self, ino: u64, index: u64) -> Key {
        let digest = hash(&[b"chunk", self.volume.as_bytes(), &ino.to_le_bytes(), &index.to_le_bytes()]);
        Key::from_digest(SET, in_partition(digest, self.file_partition(ino)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chunkstore_client::key::partition_id;

    /// A file's records share a partition, the tree's records share another.
    #[test]
    fn records_of_one_file_share_a_partition() {
        let keys = VolumeKeys::new("vol");
        for ino in [1u64, 2, 77, u64::MAX] {
            let p = partition_id(&keys.size(ino).digest);
            assert_eq!(partition_id(&keys.locks(ino).digest), p);
            for index in [0u64, 1, 1000, 1 << 30] {
                assert_eq!(partition_id(&keys.chunk(ino, index).digest), p);
            }
        }
        let t = partition_id(&keys.volume().digest);
        assert_eq!(partition_id(&keys.inode(5).digest), t);
        assert_eq!(partition_id(&keys.orphans().digest), t);
        // Files spread over partitions (not all in one).
        let spread: std::collections::HashSet<u16> = (0..64).map(|i| partition_id(&keys.size(i).digest)).collect();
        assert!(spread.len() > 32, "{}", spread.len());
        assert_ne!(keys.chunk(1, 0).digest, keys.chunk(1, 1).digest);
    }
}
