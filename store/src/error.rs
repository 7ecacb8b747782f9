//! The engine's one error enum.
//!
//! Operational errors (a failed condition, stop-writes, overload) say what to do next and leave
//! the namespace working. Fatal errors (a device that failed an fsync, a corrupt or foreign file at
//! start) are kept apart: `Error::is_fatal` tells them from the rest.

use std::path::PathBuf;

/// Everything the engine can answer instead of a result.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("generation mismatch: the write expected generation {expected}, the record is at {actual}")]
    GenerationMismatch { expected: u32, actual: u32 },

    #[error("record exists: the write's policy only creates records")]
    RecordExists,

    #[error("record not found")]
    RecordNotFound,

    #[error("record too big: {size_bytes} bytes encoded, the namespace limit is {limit_bytes} bytes")]
    RecordTooBig { size_bytes: usize, limit_bytes: usize },

    #[error("stop-writes on namespace {namespace}: {reason}; reads and deletes continue, writes resume when space returns")]
    StopWrites { namespace: String, reason: String },

    #[error("device overload on {path}: {unflushed_bytes} bytes not yet on disk, max-write-cache is {limit_bytes}; retry later")]
    DeviceOverload { path: PathBuf, unflushed_bytes: u64, limit_bytes: u64 },

    #[error("device full: {path} has no free write block; free space with deletes (defragmentation reclaims it)")]
    DeviceFull { path: PathBuf },

    #[error("device {path} failed: {reason}; the namespace stopped accepting writes for it; restart after checking the disk")]
    DeviceFailed { path: PathBuf, reason: String },

    #[error("bin {bin:?}: {reason}")]
    IncompatibleBin { bin: String, reason: String },

    #[error("bad request: {0}")]
    BadRequest(String),

    #[error("corrupt data in {path} at byte {offset}: {what}")]
    Corrupt { path: PathBuf, offset: u64, what: String },

    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("bad configuration: {0}")]
    Config(String),

    #[error("namespace {0} is shut down")]
    ShutDown(String),
}

impl Error {
    /// Fatal errors mean the namespace (or one of its devices) cannot go on safely; everything
    /// else is an answer to one request.
    pub fn is_fatal(&self) -> bool {
        matches!(self, Error::DeviceFailed { .. } | Error::Corrupt { .. } | Error::Io { .. } | Error::Config(_))
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io { path: path.into(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
