//! The file layer: volumes of files and directories stored as chunkstore records, the one
//! model both fronts (chunkfs, the FUSE filesystem, and libchunkpreload, the LD_PRELOAD shim)
//! translate POSIX calls onto. Every POSIX decision (errno, atomicity, ordering) is made here;
//! a front translates arguments, calls a `Volume` method and replies once.
//!
//! Where records live (`keys`): a volume's tree (directories and inode attributes) in one
//! partition group, each file's data (its size record and chunks) in a group of its own, so
//! that every namespace change and every `write()` is one atomic Raft entry (`WriteOp::Batch`).
//!
//! Invariants:
//! - **The file layer talks to the cluster only through the client.**
//! - **Nothing here panics on bad input or a cluster error**: every failure is an `FsError`.

mod buffered;
mod data;
pub mod error;
mod fsck;
pub mod keys;
mod locks;
pub mod records;
mod tree;
mod volume;

pub use error::{FsError, FsResult};
pub use fsck::FsckReport;
pub use locks::{LockHolder, LockKind};
pub use records::{Entry, Kind};
pub use tree::{OpenFiles, Owner, ORPHAN_GRACE_NS, ORPHAN_REAP_PERIOD};
pub use volume::*;
