//! The chunkstore client: what an application, a tool or a front (chunkfs, the LD_PRELOAD shim)
//! needs to talk to a cluster, and nothing of the server: keys and digests (`key`), values
//! (`value`), write operations (`ops`), the wire protocol's frames and messages (`protocol`),
//! the cluster metadata's data types (`cluster`) and the blocking client (`client`), which
//! needs no async runtime (callers on tokio: `chunkstore::async_client::AsyncClient`).
//!
//! Invariant: **this crate links no server code and no async runtime** (no openraft, no
//! engine, no tokio), so the shim can be loaded into any process.

pub mod client;
pub mod cluster;
pub mod key;
pub mod ops;
pub mod protocol;
pub mod value;

pub use key::{group_of, Digest, Key, UserKey};
pub use ops::{BatchWrite, GenerationPolicy, OpResult, Operation, RangeLock, RangeLockHeld, RangeLockKind, RecordExistsAction, Ttl, WriteOp, WritePolicy};
pub use value::{Bin, Record, RecordMeta, Value};
