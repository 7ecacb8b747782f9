//! Record identity: Aerospike's 20-byte digest and 12-bit partition id.
//!
//! The digest is RIPEMD-160 over the set name, the user key's particle type byte and the key's
//! bytes (integers as 8 bytes big-endian), exactly as the Aerospike clients compute it, so
//! records keep their identity for anyone coming from Aerospike.

use ripemd::{Digest as _, Ripemd160};

/// Number of partitions a namespace is split into (Aerospike's 4096).
pub const PARTITION_COUNT: u16 = 4096;

/// A record's 20-byte digest.
pub type Digest = [u8; 20];

/// Particle type bytes used in the digest (Aerospike's wire values).
const PARTICLE_INTEGER: u8 = 1;
const PARTICLE_STRING: u8 = 3;
const PARTICLE_BLOB: u8 = 4;

/// A user key: the value an application addresses a record by.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum UserKey {
    Int(i64),
    String(String),
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// A record's address inside a namespace: set name plus digest.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Key {
    pub set: String,
    pub digest: Digest,
}

impl Key {
    /// Longest set name, in bytes (Aerospike's limit is 63).
    pub const SET_NAME_MAX_BYTES: usize = 63;

    pub fn new(set: impl Into<String>, user_key: impl Into<UserKey>) -> Key {
        let set = set.into();
        let digest = compute_digest(&set, &user_key.into());
        Key { set, digest }
    }

    /// A key known only by digest (the set name travels with it).
    pub fn from_digest(set: impl Into<String>, digest: Digest) -> Key {
        Key { set: set.into(), digest }
    }

    pub fn partition_id(&self) -> u16 {
        partition_id(&self.digest)
    }
}

pub fn compute_digest(set: &str, user_key: &UserKey) -> Digest {
    let mut hasher = Ripemd160::new();
    hasher.update(set.as_bytes());
    match user_key {
        UserKey::Int(value) => {
            hasher.update([PARTICLE_INTEGER]);
            hasher.update(value.to_be_bytes());
        }
        UserKey::String(value) => {
            hasher.update([PARTICLE_STRING]);
            hasher.update(value.as_bytes());
        }
        UserKey::Bytes(value) => {
            hasher.update([PARTICLE_BLOB]);
            hasher.update(value);
        }
    }
    hasher.finalize().into()
}

/// Aerospike's partition id: the low 12 bits of the digest's first bytes read little-endian.
pub fn partition_id(digest: &Digest) -> u16 {
    u16::from_le_bytes([digest[0], digest[1]]) & (PARTITION_COUNT - 1)
}

impl From<i64> for UserKey {
    fn from(value: i64) -> Self {
        UserKey::Int(value)
    }
}
impl From<&str> for UserKey {
    fn from(value: &str) -> Self {
        UserKey::String(value.to_owned())
    }
}
impl From<String> for UserKey {
    fn from(value: String) -> Self {
        UserKey::String(value)
    }
}
impl From<Vec<u8>> for UserKey {
    fn from(value: Vec<u8>) -> Self {
        UserKey::Bytes(value)
    }
}

/// The Raft group of a record in a namespace with `groups` groups (a power of two).
pub fn group_of(digest: &Digest, groups: u32) -> u32 {
    partition_id(digest) as u32 % groups
}
