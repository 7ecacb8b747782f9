//! chunkstore's store: the per-node storage engine, the Raft replication and the `chunkd`
//! server. The client (keys, values, operations, the wire protocol, the blocking client) is
//! the crate `chunkstore-client`, re-exported here under its old paths. See ARCHITECTURE.md.
//!
//! The engine keeps Aerospike's data model: namespace → set → record, records addressed by a
//! RIPEMD-160 digest, holding bins, with a generation and an optional void time.

pub mod async_client;
pub use chunkstore_client::client;
pub mod config;
pub mod device;
pub mod engine;
pub mod error;
pub mod format;
pub use chunkstore_client::key;
pub mod meta;
pub mod node;
pub mod ops;
pub mod protocol;
pub mod raft;
pub mod sim;
pub use chunkstore_client::value;
pub mod wal;

pub use config::{DeviceConfig, NamespaceConfig};
pub use engine::{Clock, DurablePoint, EngineEvent, Namespace, OpenOptions, Replicated, ScanReport, Stats, SystemClock, VoidPoints};
pub use error::{Error, Result};
pub use key::{Digest, Key, UserKey};
pub use ops::{BatchWrite, GenerationPolicy, OpResult, Operation, RangeLock, RangeLockKind, RecordExistsAction, Ttl, WriteOp, WritePolicy};
pub use value::{Bin, Record, RecordMeta, Value};
